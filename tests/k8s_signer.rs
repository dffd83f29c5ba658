//! The Kubernetes external JWT signer (issue #4): the real `oidc-kms` binary with
//! `--k8s-signer-socket`, driven by a client that does what kube-apiserver does (see
//! `common/k8s.rs`), over both proto packages, through rotations, beside the gateway's JWKS.

mod common;
#[path = "common/k8s.rs"]
mod k8s;

use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use common::*;
use k8s::{ApiServer, PACKAGES, Package, encode, pod_claims, verify};
use serde_json::json;
use tonic::Code;

const KUBE_AUD: &str = "https://kubernetes.default.svc.cluster.local";

fn socket_in(dir: &tempfile::TempDir) -> PathBuf {
    dir.path().join("signer.sock")
}

fn start_api(socket: &Path, package: Package, issuer: &str) -> ApiServer {
    ApiServer::start(socket, package, issuer).unwrap_or_else(|e| panic!("{package:?}: {e}"))
}

#[test]
fn kube_apiserver_signs_and_verifies_through_both_packages() {
    let sock_dir = tempfile::tempdir().unwrap();
    let sock = socket_in(&sock_dir);
    let stack = Stack::start("/", &["--k8s-signer-socket", sock.to_str().unwrap()]);
    let issuer = stack.kms.issuer.clone();

    let mut timestamps = Vec::new();
    for package in PACKAGES {
        let mut api = start_api(&sock, package, &issuer);
        assert_eq!(
            api.max_token_expiration_seconds, 86_400,
            "{package:?}: Metadata is --max-token-lifetime (default 24h)"
        );
        let cache = api.cache.clone();
        assert!(
            cache.keys.values().all(|k| !k.exclude_from_oidc_discovery),
            "our keys all sign bound tokens, so none is excluded from discovery"
        );
        assert_eq!(
            cache.keys.keys().cloned().collect::<Vec<_>>(),
            stack.kms.kids(),
            "{package:?}: FetchKeys holds exactly the published keys"
        );
        timestamps.push(cache.data_timestamp);

        // A pod token, as kube-apiserver builds, signs and assembles it.
        let (token, kid) = api.issue_pod_token("default", "app", KUBE_AUD);
        assert!(
            cache.keys.contains_key(&kid),
            "{package:?}: kid is in FetchKeys"
        );
        let claims = verify(&token, &cache, &issuer, KUBE_AUD)
            .unwrap_or_else(|e| panic!("{package:?}: {e}"));
        assert_eq!(claims["sub"], "system:serviceaccount:default:app");
        assert_eq!(claims["kubernetes.io"]["serviceaccount"]["name"], "app");
        assert_eq!(claims["aud"], json!([KUBE_AUD]));

        // The signature covers the claims exactly as sent: JSON that re-encoding would change
        // (spaces, key order, an escaped slash) still verifies.
        let now = claims["iat"].as_i64().unwrap();
        let odd = format!(
            r#"{{ "sub":"system:serviceaccount:ns:x", "iss":"{issuer}", "aud":["a\/b"], "nbf":{now}, "iat":{now}, "exp":{} }}"#,
            now + 600
        );
        let (token, _) = api
            .issue(&URL_SAFE_NO_PAD.encode(odd.as_bytes()))
            .unwrap_or_else(|e| panic!("{package:?}: {e}"));
        verify(&token, &cache, &issuer, "a/b").unwrap_or_else(|e| panic!("{package:?}: {e}"));

        // Relying parties see the same keys through discovery and the gateway's JWKS, and the
        // token verifies there too (JWK, not SPKI: both encode the same key).
        let jwks = stack.wait_for_gateway_kids(&cache.discovery_kids());
        common::verify(&token, &jwks, &issuer, "a/b")
            .unwrap_or_else(|e| panic!("{package:?} via gateway: {e}"));
    }
    assert_eq!(
        timestamps[0], timestamps[1],
        "one key set, one data_timestamp, whichever package asks"
    );

    // Each Sign left an audit record naming the package's RPC, the subject and the outcome,
    // never the claims it signed.
    let log = eventually(Duration::from_secs(10), || {
        let log = stack.kms.proc.log_text();
        (log.contains("v1alpha1.ExternalJWTSigner/Sign")
            && log.contains("v1.ExternalJWTSigner/Sign"))
        .then_some(log)
    })
    .expect("both packages' Sign calls are audited");
    for package in ["v1alpha1", "v1"] {
        let rpc = format!("\"{package}.ExternalJWTSigner/Sign\"");
        let record = log
            .lines()
            .find(|l| {
                l.contains("audit")
                    && l.contains(&rpc)
                    && l.contains("system:serviceaccount:default:app")
            })
            .unwrap_or_else(|| panic!("{package}: no audit record: {log}"));
        assert!(record.contains("outcome=\"ok\""), "{record}");
        assert!(record.contains("jti="), "{record}");
    }
    assert!(!log.contains("kubernetes.io"), "no claims in the log");
}

#[test]
fn rotation_between_fetches_moves_data_timestamp_and_old_tokens_keep_verifying() {
    let sock_dir = tempfile::tempdir().unwrap();
    let sock = socket_in(&sock_dir);
    let stack = Stack::start(
        "/",
        &[
            "--k8s-signer-socket",
            sock.to_str().unwrap(),
            "--prepublish",
            "3s",
        ],
    );
    let issuer = stack.kms.issuer.clone();
    let mut api = start_api(&sock, Package::V1, &issuer);
    let mut old = start_api(&sock, Package::V1alpha1, &issuer);
    let first = api.cache.clone();
    assert!(
        first.refresh_hint_seconds <= 1,
        "refresh hint {} s must be within half the 3 s pre-publication",
        first.refresh_hint_seconds
    );
    let (token_a, kid_a) = api.issue_pod_token("default", "app", KUBE_AUD);

    // An immediate rotation between two FetchKeys calls.
    let rotated = stack.kms.rotate(0).expect("RotateKeys");
    let second = api.refresh().unwrap().clone();
    assert!(
        second.data_timestamp > first.data_timestamp,
        "data_timestamp moves: {:?} -> {:?}",
        first.data_timestamp,
        second.data_timestamp
    );
    assert!(second.keys.contains_key(&rotated.new_key_id));
    assert!(
        second.keys.contains_key(&kid_a),
        "the old key stays published"
    );
    verify(&token_a, &second, &issuer, KUBE_AUD).expect("an old token verifies after rotation");
    let (token_b, kid_b) = api.issue_pod_token("default", "app", KUBE_AUD);
    assert_eq!(kid_b, rotated.new_key_id, "the new key signs at once");
    verify(&token_b, &second, &issuer, KUBE_AUD).unwrap();
    // An apiserver still on the old cache finds the new kid by fetching again.
    assert!(!old.cache.keys.contains_key(&kid_b));
    old.authenticate(&token_b, KUBE_AUD)
        .expect("an unknown kid triggers FetchKeys");
    assert_eq!(old.cache.data_timestamp, second.data_timestamp);
    stack.wait_for_gateway_kids(&second.discovery_kids());

    // A pre-published rotation: the key is in FetchKeys before it signs anything.
    let rotated = stack
        .kms
        .rotate(3)
        .expect("RotateKeys with pre-publication");
    let third = api.refresh().unwrap().clone();
    let kid_c = rotated.new_key_id;
    assert!(third.data_timestamp > second.data_timestamp);
    assert!(
        third.keys.contains_key(&kid_c),
        "pre-published key is fetched"
    );
    let (_, kid) = api.issue_pod_token("default", "app", KUBE_AUD);
    assert_eq!(kid, kid_b, "the pre-published key does not sign yet");
    let end = Instant::now() + Duration::from_secs(15);
    let token_c = loop {
        let (token, kid) = api.issue_pod_token("default", "app", KUBE_AUD);
        if kid == kid_c {
            break token;
        }
        assert!(Instant::now() < end, "the pre-published key never signed");
        api.sleep(Duration::from_millis(200));
    };
    for token in [&token_a, &token_b, &token_c] {
        verify(token, &third, &issuer, KUBE_AUD).expect("verifies with the cache fetched before");
    }
    let jwks = stack.wait_for_gateway_kids(&third.discovery_kids());
    for token in [&token_a, &token_b, &token_c] {
        common::verify(token, &jwks, &issuer, KUBE_AUD).expect("verifies at the gateway");
    }
}

#[test]
fn bad_claims_get_invalid_argument_on_both_packages() {
    let dir = tempfile::tempdir().unwrap();
    let kek = write_kek(dir.path());
    let sock = socket_in(&dir);
    let issuer = "https://issuer.example/";
    let _kms = Kms::start(
        &dir.path().join("data"),
        &kek,
        issuer,
        &[
            "--k8s-signer-socket",
            sock.to_str().unwrap(),
            "--max-token-lifetime",
            "1h",
        ],
    );
    for package in PACKAGES {
        let mut api = start_api(&sock, package, issuer);
        assert_eq!(api.max_token_expiration_seconds, 3600, "{package:?}");
        let good = pod_claims(issuer, "default", "app", &[KUBE_AUD], 3600);
        let with = |key: &str, value: serde_json::Value| {
            let mut c = good.clone();
            c[key] = value;
            encode(&c)
        };
        let iat = good["iat"].as_i64().unwrap();
        api.issue(&encode(&good))
            .unwrap_or_else(|e| panic!("{package:?}: exactly the maximum lifetime signs: {e}"));
        let padded = format!("{}=", encode(&good));
        let cases = [
            ("not base64url", "%%%not-base64%%%".to_owned()),
            ("padded base64url", padded),
            (
                "standard base64",
                base64::engine::general_purpose::STANDARD.encode(b"{\"a\":\"?>?\"}"),
            ),
            ("not JSON", URL_SAFE_NO_PAD.encode(b"not json")),
            ("a JSON array", URL_SAFE_NO_PAD.encode(b"[]")),
            ("lifetime over max", with("exp", json!(iat + 3601))),
            ("expiry too far ahead", {
                let mut c = good.clone();
                c["iat"] = json!(iat + 7200);
                c["nbf"] = json!(iat + 7200);
                c["exp"] = json!(iat + 7300);
                encode(&c)
            }),
            (
                "foreign issuer",
                with("iss", json!("https://evil.example/")),
            ),
            (
                "issuer without its slash",
                with("iss", json!("https://issuer.example")),
            ),
            ("no issuer", {
                let mut c = good.clone();
                c.as_object_mut().unwrap().remove("iss");
                encode(&c)
            }),
            ("no exp", {
                let mut c = good.clone();
                c.as_object_mut().unwrap().remove("exp");
                encode(&c)
            }),
            ("already expired", {
                let mut c = good.clone();
                c["iat"] = json!(iat - 7200);
                c["nbf"] = json!(iat - 7200);
                c["exp"] = json!(iat - 3600);
                encode(&c)
            }),
            ("exp before iat", with("exp", json!(iat - 1))),
            ("audience of the wrong type", with("aud", json!([1]))),
            ("a claim named twice", {
                // A foreign issuer first, ours last: a first-wins verifier would see the foreign one.
                let text = serde_json::to_string(&good).unwrap();
                let twice = text.replacen('{', r#"{"iss":"https://evil.example/","#, 1);
                URL_SAFE_NO_PAD.encode(twice.as_bytes())
            }),
            ("claims far above the request limit", {
                let mut c = good.clone();
                c["pad"] = json!("x".repeat(200 * 1024));
                encode(&c)
            }),
        ];
        for (label, claims) in cases {
            match api.sign(&claims) {
                Ok(_) => panic!("{package:?}: {label}: signed it"),
                // The transport refuses an oversized request before it is decoded.
                Err(s) if label.starts_with("claims far above") => {
                    assert_eq!(s.code(), Code::OutOfRange, "{package:?}: {label}: {s}")
                }
                Err(s) => assert_eq!(s.code(), Code::InvalidArgument, "{package:?}: {label}: {s}"),
            }
        }
    }
}

#[test]
fn ecdsa_keys_are_spki_and_signatures_are_jose() {
    for (alg, sig_len) in [("ES256", 64), ("ES384", 96)] {
        let dir = tempfile::tempdir().unwrap();
        let kek = write_kek(dir.path());
        let sock = socket_in(&dir);
        let issuer = "https://issuer.example/tenant";
        let _kms = Kms::start(
            &dir.path().join("data"),
            &kek,
            issuer,
            &[
                "--k8s-signer-socket",
                sock.to_str().unwrap(),
                "--algorithm",
                alg,
            ],
        );
        for package in PACKAGES {
            let mut api = start_api(&sock, package, issuer);
            let (token, kid) = api.issue_pod_token("kube-system", "coredns", KUBE_AUD);
            assert_eq!(format!("{:?}", api.cache.keys[&kid].alg), alg);
            let signature = URL_SAFE_NO_PAD
                .decode(token.rsplit('.').next().unwrap())
                .unwrap();
            assert_eq!(signature.len(), sig_len, "{alg}: fixed-width r||s, not DER");
            verify(&token, &api.cache, issuer, KUBE_AUD)
                .unwrap_or_else(|e| panic!("{alg} {package:?}: {e}"));
        }
    }
}

fn spawn_kms(dir: &Path, name: &str, issuer: &str, extra: &[&str]) -> Proc {
    let own = dir.join(name);
    std::fs::create_dir(&own).unwrap();
    let kek = write_kek(&own);
    let data = own.join("data");
    let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
    Proc::spawn(
        kms_bin(),
        &kms_args(free_port(), &data, &kek, issuer, &extra),
        own.join("kms.log"),
        None,
    )
}

fn refused(mut p: Proc, code: i32, says: &str) {
    let status = wait_exit(&mut p.child, Duration::from_secs(30)).expect("exits");
    let log = p.log_text();
    assert_eq!(status.code(), Some(code), "{log}");
    assert!(log.contains(says), "{log}");
}

#[test]
fn socket_is_private_replaces_a_stale_file_and_refuses_a_live_one() {
    let dir = tempfile::tempdir().unwrap();
    let sock = socket_in(&dir);
    let sock_arg = sock.to_str().unwrap();
    let issuer = "https://issuer.example/";

    // A stale socket file: a listener that went away without removing it.
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    let stale_ino = std::fs::metadata(&sock).unwrap().ino();
    let kek = write_kek(dir.path());
    let mut kms = Kms::start(
        &dir.path().join("data"),
        &kek,
        issuer,
        &["--k8s-signer-socket", sock_arg],
    );
    let meta = std::fs::metadata(&sock).unwrap();
    assert!(std::os::unix::fs::FileTypeExt::is_socket(&meta.file_type()));
    assert_ne!(meta.ino(), stale_ino, "the stale file was replaced");
    assert_eq!(meta.permissions().mode() & 0o777, 0o600, "socket mode");
    let mut api = start_api(&sock, Package::V1, issuer);
    api.issue_pod_token("default", "app", KUBE_AUD);
    let others: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(others.is_empty(), "no staging directory left: {others:?}");

    // A second service on the same path while the first listens is refused, and the first
    // keeps serving on its socket.
    refused(
        spawn_kms(
            dir.path(),
            "second",
            issuer,
            &["--k8s-signer-socket", sock_arg],
        ),
        69,
        "another process is listening",
    );
    assert!(
        !dir.path().join("second/data/keyring.json").exists(),
        "a start refused for its socket makes no key store"
    );
    assert_eq!(std::fs::metadata(&sock).unwrap().ino(), meta.ino());
    api.issue_pod_token("default", "app", KUBE_AUD);

    // A clean shutdown removes the socket file.
    drop(api);
    let status = kms.proc.terminate();
    assert!(status.success(), "clean exit: {status}");
    assert!(!sock.exists(), "socket file removed on shutdown");

    // Something that is not a socket is never replaced.
    std::fs::write(&sock, b"precious").unwrap();
    refused(
        spawn_kms(
            dir.path(),
            "third",
            issuer,
            &["--k8s-signer-socket", sock_arg],
        ),
        69,
        "not a socket",
    );
    assert_eq!(std::fs::read(&sock).unwrap(), b"precious");

    // A socket in a directory that is not there: the message names the directory.
    let nowhere = dir.path().join("nowhere");
    refused(
        spawn_kms(
            dir.path(),
            "fifth",
            issuer,
            &[
                "--k8s-signer-socket",
                nowhere.join("s.sock").to_str().unwrap(),
            ],
        ),
        69,
        &format!(
            "{}: the socket's directory does not exist",
            nowhere.display()
        ),
    );

    // kube-apiserver refuses a signer whose maximum lifetime is below 600 s: a config error.
    refused(
        spawn_kms(
            dir.path(),
            "fourth",
            issuer,
            &[
                "--k8s-signer-socket",
                sock_arg,
                "--max-token-lifetime",
                "5m",
            ],
        ),
        64,
        "--max-token-lifetime must be at least 10m",
    );
}
