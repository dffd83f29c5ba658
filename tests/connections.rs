//! Hostile connections against the real binaries: a client that opens more connections than the
//! process has file descriptors, and clients that open one and send nothing (or stop half-way).
//! Neither may make a server spin, flood its log, or hold a connection forever; both servers
//! recover by themselves. A live idle gRPC client, on the other hand, keeps its connection.

mod common;
#[path = "common/ops.rs"]
mod ops;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::Duration;

use common::*;

/// The descriptor limit the servers run under here: enough to start, soon exhausted.
const FD_LIMIT: u32 = 64;

/// Spawns `bin` with `args` under a descriptor limit of [`FD_LIMIT`].
fn spawn_limited(bin: &str, args: &[String], log: &Path) -> Proc {
    let mut all = vec![
        "-c".to_string(),
        format!("ulimit -n {FD_LIMIT} && exec \"$0\" \"$@\""),
        bin.to_string(),
    ];
    all.extend(args.iter().cloned());
    Proc::spawn("sh", &all, log.to_path_buf(), None)
}

/// CPU seconds (user + system) the process has used so far, from /proc.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the parenthesised command name; utime and stime are the 14th and 15th fields.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    let hz = String::from_utf8(
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    ticks / hz.trim().parse::<f64>().unwrap()
}

/// Opens connections to `port` until well past the descriptor limit, holds them while the process
/// has no descriptor left, and returns the CPU seconds it used meanwhile.
fn exhaust_descriptors(port: u16, pid: u32) -> f64 {
    let mut held = Vec::new();
    for _ in 0..(2 * FD_LIMIT) {
        held.push(TcpStream::connect(("127.0.0.1", port)).unwrap());
    }
    let before = cpu_seconds(pid);
    // Connections the server could not accept wait in its backlog; give its loop time to try.
    std::thread::sleep(Duration::from_secs(3));
    let used = cpu_seconds(pid) - before;
    drop(held);
    used
}

fn warnings(log: &str) -> usize {
    log.matches("cannot accept connections").count()
}

#[test]
fn running_out_of_descriptors_pauses_accepting_and_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let kek = write_kek(dir.path());
    let data = dir.path().join("data");
    let kms_port = free_port();
    let mut kms = spawn_limited(
        kms_bin(),
        &kms_args(
            kms_port,
            &data,
            &kek,
            "https://issuer.example/",
            &["--algorithm".into(), "ES256".into()],
        ),
        &dir.path().join("kms.log"),
    );
    let gw_port = free_port();
    let mut gateway = spawn_limited(
        gateway_bin(),
        &[
            "--kms".into(),
            format!("http://127.0.0.1:{kms_port}"),
            "--listen".into(),
            format!("127.0.0.1:{gw_port}"),
        ],
        &dir.path().join("gateway.log"),
    );
    let jwks_url = format!("http://127.0.0.1:{gw_port}/openid/v1/jwks");
    let ready = || {
        eventually(Duration::from_secs(30), || {
            (http_get(&jwks_url, &[]).status == 200).then_some(())
        })
    };
    ready().unwrap_or_else(|| panic!("gateway not serving: {}", gateway.log_text()));

    for (name, port, proc) in [
        ("gateway", gw_port, &mut gateway),
        ("gRPC", kms_port, &mut kms),
    ] {
        let cpu = exhaust_descriptors(port, proc.child.id());
        // A loop retrying accept(2) at once burns a whole core (3 s here); pausing costs ~nothing.
        assert!(cpu < 1.0, "{name}: {cpu:.2} CPU s while out of descriptors");
        let log = proc.log_text();
        let warned = warnings(&log);
        assert!(
            (1..=3).contains(&warned),
            "{name}: says it cannot accept, without flooding the log ({warned} warnings): {log}"
        );
        assert!(
            log.contains(&format!("listener=\"{name}\"")),
            "the warning names the listener: {log}"
        );
    }
    // Once the connections are gone, both serve again: the gateway answers, and its answer comes
    // from the key service.
    ready().unwrap_or_else(|| panic!("gateway did not recover: {}", gateway.log_text()));
    let (signed, _) = ops::sign_with_request_id(kms_port, "after", sign_request("s", &[AUD]));
    signed.expect("the key service signs again");
    assert!(gateway.terminate().success(), "{}", gateway.log_text());
    assert!(kms.terminate().success(), "{}", kms.log_text());
}

/// Sends `first` (perhaps nothing) on `conn` and reads until the server closes it. Returns what the
/// read ended with: `Ok` when the server closed the connection, an error when our own 60 s bound
/// ran out first.
fn held_silent<S: Read + Write + Send + 'static>(
    conn: std::io::Result<S>,
    first: &'static [u8],
    set_timeout: fn(&S, Option<Duration>) -> std::io::Result<()>,
) -> std::thread::JoinHandle<std::io::Result<usize>> {
    std::thread::spawn(move || {
        let mut conn = conn?;
        conn.write_all(first)?;
        set_timeout(&conn, Some(Duration::from_secs(60)))?;
        conn.read_to_end(&mut Vec::new())
    })
}

fn tcp_silent(port: u16, first: &'static [u8]) -> std::thread::JoinHandle<std::io::Result<usize>> {
    held_silent(
        TcpStream::connect(("127.0.0.1", port)),
        first,
        TcpStream::set_read_timeout,
    )
}

#[test]
fn a_client_that_sends_nothing_is_disconnected_and_does_not_delay_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let kek = write_kek(dir.path());
    let socket = dir.path().join("signer.sock");
    let gw_port = free_port();
    let metrics_port = free_port();
    let mut kms = Kms::start(
        &dir.path().join("data"),
        &kek,
        &format!("http://127.0.0.1:{gw_port}/"),
        &[
            "--algorithm",
            "ES256",
            "--k8s-signer-socket",
            socket.to_str().unwrap(),
            "--metrics-listen",
            &format!("127.0.0.1:{metrics_port}"),
        ],
    );
    let gw = Gateway::start_on(gw_port, kms.port, dir.path(), &[]);

    // Each server closes each of these (the HTTP servers after 10 s without traffic or without
    // finished headers, the gRPC ones after 30 s), all at once.
    let preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    let clients = [
        ("gateway, nothing sent", tcp_silent(gw.port, b"")),
        (
            "gateway, only the HTTP/2 preface",
            tcp_silent(gw.port, preface),
        ),
        (
            "gateway, headers never finished",
            tcp_silent(gw.port, b"GET /openid/v1/jwks HTTP/1.1\r\nHost: x\r\n"),
        ),
        (
            "gateway, idle after a request",
            tcp_silent(gw.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"),
        ),
        ("metrics, nothing sent", tcp_silent(metrics_port, b"")),
        ("gRPC, nothing sent", tcp_silent(kms.port, b"")),
        (
            "gRPC, only the HTTP/2 preface",
            tcp_silent(kms.port, preface),
        ),
        (
            "signer socket, nothing sent",
            held_silent(
                std::os::unix::net::UnixStream::connect(&socket),
                b"",
                std::os::unix::net::UnixStream::set_read_timeout,
            ),
        ),
    ];
    for (what, client) in clients {
        let read = client.join().unwrap();
        assert!(
            read.is_ok(),
            "{what}: the server kept the connection: {read:?}"
        );
    }
    // The gateway still answers.
    let healthz = http_get(&format!("http://127.0.0.1:{}/healthz", gw.port), &[]);
    assert_eq!(healthz.status, 200);

    // Connections that never speak HTTP/2, on the gRPC port and the signer socket, do not hold up
    // SIGTERM (Proc::terminate gives it 20 s; the grace period is 10 s).
    let _tcp = TcpStream::connect(("127.0.0.1", kms.port)).unwrap();
    let _unix = std::os::unix::net::UnixStream::connect(&socket).unwrap();
    let status = kms.proc.terminate();
    assert!(status.success(), "{status}: {}", kms.proc.log_text());
    assert!(!socket.exists(), "the socket file is removed");
}

/// A client that keeps an HTTP/2 connection open between calls, as kube-apiserver and tonic
/// channels do, keeps it past the server's idle timeout: the server pings it, and its answers are
/// traffic.
#[test]
fn an_idle_grpc_client_that_answers_pings_keeps_its_connection() {
    let dir = tempfile::tempdir().unwrap();
    let kek = write_kek(dir.path());
    let kms = Kms::start(
        &dir.path().join("data"),
        &kek,
        "https://issuer.example/",
        &["--algorithm", "ES256"],
    );
    let port = kms.port;
    client_runtime().block_on(async move {
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        let (client, connection) = h2::client::handshake(tcp).await.unwrap();
        let connection = tokio::spawn(connection);
        let mut client = client.ready().await.unwrap();

        // Quiet for longer than the server's 30 s idle timeout.
        tokio::time::sleep(Duration::from_secs(40)).await;
        assert!(
            !connection.is_finished(),
            "the server closed an idle connection that answers pings: {:?}",
            connection.await
        );

        // And a call on the same connection is answered.
        let request = http::Request::post(format!(
            "http://127.0.0.1:{port}/grpc.health.v1.Health/Check"
        ))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap();
        let (response, mut body) = client.send_request(request, false).unwrap();
        // An empty HealthCheckRequest: no compression, zero length.
        body.send_data(bytes::Bytes::from_static(&[0, 0, 0, 0, 0]), true)
            .unwrap();
        let response = response.await.unwrap();
        assert_eq!(response.status(), 200);
        let mut body = response.into_body();
        while let Some(chunk) = body.data().await {
            let chunk = chunk.unwrap();
            let _ = body.flow_control().release_capacity(chunk.len());
        }
        let trailers = body.trailers().await.unwrap().unwrap_or_default();
        assert_eq!(
            trailers.get("grpc-status").map(|v| v.as_bytes()),
            Some(&b"0"[..]),
            "{trailers:?}"
        );
    });
}
