//! Hostile connections against the real binaries: a client that opens more connections than the
//! process has file descriptors, and a client that opens one and sends nothing. Neither may make a
//! server spin, flood its log, or hold a connection forever; both servers recover by themselves.

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

#[test]
fn a_client_that_sends_nothing_is_disconnected_and_does_not_delay_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let kek = write_kek(dir.path());
    let socket = dir.path().join("signer.sock");
    let gw_port = free_port();
    let mut kms = Kms::start(
        &dir.path().join("data"),
        &kek,
        &format!("http://127.0.0.1:{gw_port}/"),
        &[
            "--algorithm",
            "ES256",
            "--k8s-signer-socket",
            socket.to_str().unwrap(),
        ],
    );
    let gw = Gateway::start_on(gw_port, kms.port, dir.path(), &[]);

    let mut gateway = TcpStream::connect(("127.0.0.1", gw.port)).unwrap();
    // A request that never finishes its headers.
    gateway
        .write_all(b"GET /openid/v1/jwks HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    gateway
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    // The server closes it (after its 10 s header timeout); a read error means our own 60 s ran
    // out first.
    let mut buf = Vec::new();
    let read = gateway.read_to_end(&mut buf);
    assert!(
        read.is_ok(),
        "the gateway kept a silent connection: {read:?}"
    );

    // Connections that never speak HTTP/2, on the gRPC port and the signer socket, do not hold up
    // SIGTERM (Proc::terminate gives it 20 s; the grace period is 10 s).
    let _tcp = TcpStream::connect(("127.0.0.1", kms.port)).unwrap();
    let _unix = std::os::unix::net::UnixStream::connect(&socket).unwrap();
    let status = kms.proc.terminate();
    assert!(status.success(), "{status}: {}", kms.proc.log_text());
    assert!(!socket.exists(), "the socket file is removed");
}
