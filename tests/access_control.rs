//! Access control end to end: the real `oidc-kms` binary serving gRPC over TLS with client
//! certificates from a CA made for the test, called by tonic clients holding different identities.
//! Also the plaintext rule: plaintext gRPC only on loopback unless `--insecure-plaintext`, and the
//! TLS and policy flags' refusals (exit 64, naming the flag).

mod common;
#[path = "common/tls.rs"]
mod pki;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{Proc, eventually, free_port, kms_args, kms_bin, wait_exit, write_kek};
use oidc_kms::grpc::pb::{self, key_service_client::KeyServiceClient};
use pki::{Pem, TestCa};
use tonic::Code;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

const ISSUER: &str = "https://issuer.example/";
const APISERVER: &str = "spiffe://cluster.local/ns/kube-system/sa/kube-apiserver";
const ADMIN: &str = "ops.example";

/// The calls the tests make.
#[derive(Debug, Clone, Copy)]
enum Call {
    SignToken,
    RotateKeys,
    GetJwks,
    ListKeys,
    Health,
}

/// An `oidc-kms` serving mutual TLS on 127.0.0.1.
struct TlsKms {
    proc: Proc,
    port: u16,
    /// The CA that issued the server's certificate (and the trusted clients').
    server_ca: String,
    rt: tokio::runtime::Runtime,
}

impl TlsKms {
    /// Starts the service with `ca` as both server and client CA, and `policy` as the access
    /// policy file if given; waits until a client holding `probe` gets a health answer.
    fn start(dir: &Path, ca: &TestCa, policy: Option<&str>, probe: &Pem) -> TlsKms {
        let port = free_port();
        let (cert, key) = ca.server().write(dir, "server");
        let client_ca = ca.write(dir, "client-ca");
        let mut extra: Vec<String> = vec![
            "--algorithm".into(),
            "ES256".into(),
            "--tls-cert".into(),
            path(&cert),
            "--tls-key".into(),
            path(&key),
            "--tls-client-ca".into(),
            path(&client_ca),
        ];
        if let Some(policy) = policy {
            let file = dir.join("policy.json");
            std::fs::write(&file, policy).unwrap();
            extra.extend(["--access-policy".into(), path(&file)]);
        }
        let kek = write_kek(dir);
        let args = kms_args(port, &dir.join("data"), &kek, ISSUER, &extra);
        let mut kms = TlsKms {
            proc: Proc::spawn(kms_bin(), &args, dir.join("kms.log"), None),
            port,
            server_ca: ca.cert_pem(),
            rt: common::client_runtime(),
        };
        let ready = eventually(Duration::from_secs(60), || {
            if let Ok(Some(status)) = kms.proc.child.try_wait() {
                panic!("oidc-kms exited with {status}: {}", kms.proc.log_text());
            }
            kms.call(Some(probe), Call::Health).ok()
        });
        ready.unwrap_or_else(|| panic!("oidc-kms did not answer: {}", kms.proc.log_text()));
        kms
    }

    fn channel(&self, client: Option<&Pem>, trust: &str) -> Channel {
        let mut tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(trust))
            .domain_name("localhost");
        if let Some(id) = client {
            tls = tls.identity(Identity::from_pem(&id.cert, &id.key));
        }
        // A lazy channel spawns its worker on the current runtime.
        let _runtime = self.rt.enter();
        Endpoint::from_shared(format!("https://127.0.0.1:{}", self.port))
            .unwrap()
            .tls_config(tls)
            .unwrap()
            .timeout(Duration::from_secs(10))
            .connect_lazy()
    }

    /// Makes `call` on a fresh connection presenting `client` (or no certificate).
    fn call(&self, client: Option<&Pem>, call: Call) -> Result<(), tonic::Status> {
        let channel = self.channel(client, &self.server_ca);
        self.rt.block_on(async {
            let mut kms = KeyServiceClient::new(channel.clone());
            match call {
                Call::SignToken => kms
                    .sign_token(common::sign_request(
                        "system:serviceaccount:default:app",
                        &[common::AUD],
                    ))
                    .await
                    .map(drop),
                Call::RotateKeys => kms
                    .rotate_keys(pb::RotateKeysRequest {
                        prepublish_seconds: 0,
                    })
                    .await
                    .map(drop),
                Call::GetJwks => kms.get_jwks(pb::GetJwksRequest {}).await.map(drop),
                Call::ListKeys => kms.list_keys(pb::ListKeysRequest {}).await.map(drop),
                Call::Health => HealthClient::new(channel)
                    .check(HealthCheckRequest {
                        service: String::new(),
                    })
                    .await
                    .map(drop),
            }
        })
    }

    fn key_count(&self, admin: &Pem) -> usize {
        let channel = self.channel(Some(admin), &self.server_ca);
        self.rt.block_on(async {
            KeyServiceClient::new(channel)
                .list_keys(pb::ListKeysRequest {})
                .await
                .unwrap()
                .into_inner()
                .keys
                .len()
        })
    }
}

fn path(p: &Path) -> String {
    p.display().to_string()
}

#[track_caller]
fn assert_code(result: Result<(), tonic::Status>, code: Code, what: &str) -> String {
    match result {
        Ok(()) => panic!("{what}: allowed, expected {code:?}"),
        Err(status) => {
            assert_eq!(status.code(), code, "{what}: {status:?}");
            status.message().to_owned()
        }
    }
}

#[test]
fn the_policy_decides_who_may_call_what() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("oidc-kms test CA");
    let admin = ca.client(&[ADMIN]);
    let apiserver = ca.client(&[APISERVER]);
    let stranger = ca.client(&["stranger.example"]);
    let policy =
        format!(r#"{{ "clients": {{ "{APISERVER}": ["signer"], "{ADMIN}": ["admin"] }} }}"#);
    let kms = TlsKms::start(dir.path(), &ca, Some(&policy), &admin);

    // The admin may do everything.
    for call in [
        Call::RotateKeys,
        Call::ListKeys,
        Call::SignToken,
        Call::GetJwks,
    ] {
        kms.call(Some(&admin), call)
            .unwrap_or_else(|s| panic!("admin {call:?}: {s:?}"));
    }

    // The API server signs and reads the JWKS, and nothing else.
    for call in [Call::SignToken, Call::GetJwks, Call::Health] {
        kms.call(Some(&apiserver), call)
            .unwrap_or_else(|s| panic!("apiserver {call:?}: {s:?}"));
    }
    let msg = assert_code(
        kms.call(Some(&apiserver), Call::RotateKeys),
        Code::PermissionDenied,
        "apiserver RotateKeys",
    );
    assert!(
        msg.contains(APISERVER) && msg.contains("oidckms.v1.KeyService/RotateKeys"),
        "the refusal names the identity and the RPC: {msg}"
    );
    assert_code(
        kms.call(Some(&apiserver), Call::ListKeys),
        Code::PermissionDenied,
        "apiserver ListKeys",
    );

    // A certificate from our CA whose identity the policy does not name: health only.
    for call in [
        Call::SignToken,
        Call::GetJwks,
        Call::RotateKeys,
        Call::ListKeys,
    ] {
        let msg = assert_code(
            kms.call(Some(&stranger), call),
            Code::PermissionDenied,
            "stranger",
        );
        assert!(msg.contains("stranger.example"), "{msg}");
    }
    kms.call(Some(&stranger), Call::Health)
        .expect("health is open to any verified client");

    // No client certificate: the handshake is admitted (the server asks for a certificate but does
    // not insist), so the client gets a gRPC status saying what is missing — for every service.
    for call in [Call::GetJwks, Call::SignToken, Call::Health] {
        let msg = assert_code(
            kms.call(None, call),
            Code::Unauthenticated,
            "no client certificate",
        );
        assert!(msg.contains("client certificate"), "{msg}");
    }

    // A certificate from another CA, even one claiming the admin's name, is refused by the TLS
    // handshake: rustls rejects the chain, so no request reaches the service. Under TLS 1.3 the
    // client has finished its side of the handshake before the server's alert arrives, so it sees
    // a broken connection rather than a gRPC status from us: UNAVAILABLE, UNKNOWN or CANCELLED
    // ("connection closed"), depending on when the alert lands.
    let keys_before = kms.key_count(&admin);
    let forger = TestCa::new("another CA").client(&[ADMIN]);
    for call in [Call::RotateKeys, Call::GetJwks, Call::Health] {
        match kms.call(Some(&forger), call) {
            Ok(()) => panic!("a certificate from another CA was accepted for {call:?}"),
            Err(status) => assert!(
                matches!(
                    status.code(),
                    Code::Unavailable | Code::Unknown | Code::Cancelled
                ),
                "{call:?} with a foreign certificate: {status:?}"
            ),
        }
    }
    assert_eq!(kms.key_count(&admin), keys_before, "no rotation happened");

    // The audit trail names the certificate identity, for allowed and refused calls alike.
    let log = kms.proc.log_text();
    let audited = |rpc: &str, outcome: &str| {
        log.lines().any(|l| {
            l.contains("audit") && l.contains(APISERVER) && l.contains(rpc) && l.contains(outcome)
        })
    };
    assert!(audited("SignToken", "ok"), "{log}");
    assert!(audited("RotateKeys", "PERMISSION_DENIED"), "{log}");
}

#[test]
fn without_a_policy_file_verified_clients_may_sign_and_read_only() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("oidc-kms test CA");
    let anyone = ca.client(&["anyone.example"]);
    let kms = TlsKms::start(dir.path(), &ca, None, &anyone);
    kms.call(Some(&anyone), Call::SignToken).unwrap();
    kms.call(Some(&anyone), Call::GetJwks).unwrap();
    for call in [Call::RotateKeys, Call::ListKeys] {
        assert_code(
            kms.call(Some(&anyone), call),
            Code::PermissionDenied,
            "default policy",
        );
    }
    assert_code(
        kms.call(None, Call::SignToken),
        Code::Unauthenticated,
        "no certificate",
    );
}

/// Starts `oidc-kms` with `extra` (listening on `listen`) and waits for it to exit.
fn run_to_exit(dir: &Path, listen: &str, extra: &[&str]) -> (i32, String) {
    let mut args = kms_args(0, &dir.join("data"), &write_kek(dir), ISSUER, &[]);
    args[1] = listen.into();
    args.extend(extra.iter().map(|s| s.to_string()));
    let log = dir.join(format!("exit-{}.log", free_port()));
    let mut proc = Proc::spawn(kms_bin(), &args, log, None);
    let status = wait_exit(&mut proc.child, Duration::from_secs(30))
        .unwrap_or_else(|| panic!("still running with {extra:?}: {}", proc.log_text()));
    (status.code().unwrap_or(-1), proc.log_text())
}

#[test]
fn plaintext_beyond_loopback_needs_insecure_plaintext() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let everywhere = format!("0.0.0.0:{port}");

    let (code, log) = run_to_exit(dir.path(), &everywhere, &["--algorithm", "ES256"]);
    assert_eq!(code, 64, "{log}");
    assert!(
        log.contains("--listen") && log.contains("--insecure-plaintext"),
        "{log}"
    );
    // A LAN-style address is no better than 0.0.0.0 (refused before any bind is tried).
    let (code, log) = run_to_exit(dir.path(), "10.255.255.1:50051", &[]);
    assert_eq!(code, 64, "{log}");

    // With the flag it serves, and says loudly that it is insecure. Bound on 0.0.0.0 only for this
    // moment, and reached through 127.0.0.1.
    let mut args = kms_args(
        port,
        &dir.path().join("data"),
        &write_kek(dir.path()),
        ISSUER,
        &[
            "--algorithm".into(),
            "ES256".into(),
            "--insecure-plaintext".into(),
        ],
    );
    args[1] = everywhere;
    let mut proc = Proc::spawn(kms_bin(), &args, dir.path().join("insecure.log"), None);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let answered = eventually(Duration::from_secs(60), || {
        if let Ok(Some(status)) = proc.child.try_wait() {
            panic!("exited with {status}: {}", proc.log_text());
        }
        rt.block_on(async {
            let mut c = KeyServiceClient::connect(format!("http://127.0.0.1:{port}"))
                .await
                .ok()?;
            c.get_jwks(pb::GetJwksRequest {}).await.ok()
        })
    });
    let status = proc.terminate();
    let log = proc.log_text();
    assert!(answered.is_some(), "did not serve: {log}");
    assert!(status.success(), "{status}: {log}");
    assert!(
        log.contains("INSECURE") && log.contains("--insecure-plaintext"),
        "{log}"
    );

    // IPv6 loopback is loopback.
    let port6 = free_port();
    let mut args = kms_args(
        port6,
        &dir.path().join("data"),
        &write_kek(dir.path()),
        ISSUER,
        &[],
    );
    args[1] = format!("[::1]:{port6}");
    let mut proc = Proc::spawn(kms_bin(), &args, dir.path().join("v6.log"), None);
    std::thread::sleep(Duration::from_millis(500));
    match proc.child.try_wait().unwrap() {
        // A machine without IPv6 cannot bind ::1 (exit 69); the rule itself did not refuse it.
        Some(status) => assert_ne!(status.code(), Some(64), "{}", proc.log_text()),
        None => {
            proc.terminate();
        }
    }
}

#[test]
fn tls_and_policy_mistakes_exit_64_naming_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("oidc-kms test CA");
    let (cert, key) = ca.server().write(dir.path(), "server");
    let client_ca = ca.write(dir.path(), "client-ca");
    let (cert, key, client_ca) = (path(&cert), path(&key), path(&client_ca));
    let policy = |name: &str, text: &str| -> String {
        let file: PathBuf = dir.path().join(name);
        std::fs::write(&file, text).unwrap();
        path(&file)
    };
    let good_policy = policy("good.json", r#"{"clients": {"ops.example": ["admin"]}}"#);
    let unknown_role = policy("bad.json", r#"{"clients": {"ops.example": ["root"]}}"#);
    let missing = path(&dir.path().join("missing.pem"));
    let listen = "127.0.0.1:1";
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["--tls-cert", &cert, "--tls-client-ca", &client_ca],
            "--tls-key",
        ),
        (
            vec!["--tls-cert", &cert, "--tls-key", &key],
            "--tls-client-ca",
        ),
        (vec!["--tls-client-ca", &client_ca], "--tls-cert"),
        (vec!["--access-policy", &good_policy], "--access-policy"),
        (
            vec![
                "--tls-cert",
                &missing,
                "--tls-key",
                &key,
                "--tls-client-ca",
                &client_ca,
            ],
            "--tls-cert",
        ),
        (
            vec![
                "--tls-cert",
                &cert,
                "--tls-key",
                &cert,
                "--tls-client-ca",
                &client_ca,
            ],
            "--tls-key",
        ),
        (
            vec![
                "--tls-cert",
                &cert,
                "--tls-key",
                &key,
                "--tls-client-ca",
                &key,
            ],
            "--tls-client-ca",
        ),
        (
            vec![
                "--tls-cert",
                &cert,
                "--tls-key",
                &key,
                "--tls-client-ca",
                &client_ca,
                "--access-policy",
                &unknown_role,
            ],
            "--access-policy",
        ),
        (
            vec![
                "--tls-cert",
                &cert,
                "--tls-key",
                &key,
                "--tls-client-ca",
                &client_ca,
                "--insecure-plaintext",
            ],
            "--insecure-plaintext",
        ),
    ];
    for (extra, flag) in cases {
        let (code, log) = run_to_exit(dir.path(), listen, &extra);
        assert_eq!(code, 64, "{extra:?}: {log}");
        assert!(log.contains(flag), "{extra:?} should name {flag}: {log}");
    }
}

#[test]
fn the_gateway_and_the_admin_cli_reach_a_mutual_tls_key_service() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("oidc-kms test CA");
    let gateway_id = ca.client(&["gateway.example"]);
    let admin = ca.client(&[ADMIN]);
    let apiserver = ca.client(&[APISERVER]);
    let policy = format!(
        r#"{{"clients": {{"gateway.example": ["reader"], "{ADMIN}": ["admin"], "{APISERVER}": ["signer"]}}}}"#
    );
    let kms = TlsKms::start(dir.path(), &ca, Some(&policy), &admin);
    let url = format!("https://127.0.0.1:{}", kms.port);
    let ca_file = path(&ca.write(dir.path(), "kms-ca"));
    let pem = |id: &Pem, name: &str| {
        let (cert, key) = id.write(dir.path(), name);
        (path(&cert), path(&key))
    };

    // The gateway presents its certificate, is granted GetJwks, and serves the key set.
    let (gw_cert, gw_key) = pem(&gateway_id, "gateway");
    let gateway = |name: &str, identity: &[&str]| {
        let port = free_port();
        let mut args: Vec<String> = [
            "--kms",
            &url,
            "--kms-ca-cert",
            &ca_file,
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--refresh-interval",
            "1s",
        ]
        .map(String::from)
        .to_vec();
        args.extend(identity.iter().map(|s| s.to_string()));
        let proc = Proc::spawn(common::gateway_bin(), &args, dir.path().join(name), None);
        (proc, port)
    };
    let (gw, gw_port) = gateway(
        "gw.log",
        &["--kms-client-cert", &gw_cert, "--kms-client-key", &gw_key],
    );
    let jwks = eventually(Duration::from_secs(30), || {
        let r = common::http_get(&format!("http://127.0.0.1:{gw_port}/openid/v1/jwks"), &[]);
        (r.status == 200).then(|| serde_json::from_slice::<serde_json::Value>(&r.body).unwrap())
    })
    .unwrap_or_else(|| panic!("the gateway never served the JWKS: {}", gw.log_text()));
    assert_eq!(jwks["keys"].as_array().map(Vec::len), Some(1), "{jwks}");

    // Without a client certificate it is refused, says so, and never becomes ready.
    let (anon, anon_port) = gateway("anon.log", &[]);
    let refused = eventually(Duration::from_secs(30), || {
        let log = anon.log_text();
        log.contains("cannot fetch the key set").then_some(log)
    })
    .expect("the refusal is logged");
    assert!(refused.to_lowercase().contains("certificate"), "{refused}");
    let ready = common::http_get(&format!("http://127.0.0.1:{anon_port}/readyz"), &[]);
    assert_eq!(ready.status, 503);

    // The admin CLI over mutual TLS: the admin lists keys; the API server may not rotate.
    let cli = |id: &(String, String), args: &[&str]| {
        let out = std::process::Command::new(kms_bin())
            .args(args)
            .args(["--kms", &url, "--ca-cert", &ca_file, "--client-cert", &id.0])
            .args(["--client-key", &id.1])
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).to_string()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let admin_files = pem(&admin, "admin");
    let cli_at = |kms_url: &str| {
        let out = std::process::Command::new(kms_bin())
            .args(["keys", "list", "--kms", kms_url])
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).to_string()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let (code, out) = cli(&admin_files, &["keys", "list", "--json"]);
    assert_eq!(code, Some(0), "{out}");
    let listed: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(listed["keys"].as_array().map(Vec::len), Some(1), "{out}");
    let (code, out) = cli(&pem(&apiserver, "apiserver"), &["keys", "rotate"]);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("PERMISSION_DENIED"), "{out}");
    // A plaintext URL for a TLS service, or a certificate from another CA: the connection fails
    // (exit 69), and the message says what to check.
    let (code, out) = cli_at(&format!("http://127.0.0.1:{}", kms.port));
    assert_eq!(code, Some(69), "{out}");
    assert!(out.contains("use an https:// URL and --ca-cert"), "{out}");
    let stranger = TestCa::new("another CA").client(&[ADMIN]);
    let (code, out) = cli(&pem(&stranger, "stranger"), &["keys", "list"]);
    assert_eq!(code, Some(69), "{out}");
    assert!(
        out.contains("the TLS connection failed: check that --ca-cert"),
        "{out}"
    );
    // The gateway's port is not the key service, and says so in gRPC.
    let (code, out) = cli_at(&format!("http://127.0.0.1:{gw_port}"));
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("UNIMPLEMENTED: this is oidc-gateway"), "{out}");

    // An https:// URL needs the CA bundle: a usage error, exit 64.
    let out = std::process::Command::new(kms_bin())
        .args(["keys", "list", "--kms", &url])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--ca-cert is required"));
}
