//! Operability (issue #7) with the real binaries: Prometheus metrics scraped after real calls,
//! JSON logs with a span and request id per call, the layered configuration (file < env < flag) of
//! both binaries, exit 64 on invalid configuration, grpc.health.v1 per service (and NOT_SERVING
//! once shutdown begins), and the admin CLI against a live key service.

mod common;
#[path = "common/ops.rs"]
mod ops;

use std::path::Path;
use std::time::Duration;

use base64::Engine as _;
use common::*;
use serde_json::Value;
use tonic_health::pb::health_check_response::ServingStatus;

const KEY_SERVICE: &str = "oidckms.v1.KeyService";

fn metrics_url(port: u16) -> String {
    format!("http://127.0.0.1:{port}/metrics")
}

#[test]
fn metrics_move_with_real_calls_on_the_key_service_and_the_gateway() {
    let metrics_port = free_port();
    let metrics_addr = format!("127.0.0.1:{metrics_port}");
    let mut stack = Stack::start("/", &["--metrics-listen", &metrics_addr]);

    let before = ops::scrape(&metrics_url(metrics_port));
    assert!(
        before.content_type.starts_with("text/plain"),
        "{}",
        before.content_type
    );
    assert_eq!(
        before.get("oidc_kms_rotations_total", &[("reason", "manual")]),
        Some(0.0),
        "counters exist at zero before the first event:\n{}",
        before.text
    );
    assert_eq!(
        before.get("oidc_kms_rotations_total", &[("reason", "scheduled")]),
        Some(0.0)
    );

    let first_kid = (0..3)
        .map(|_| stack.kms.sign_simple().key_id)
        .last()
        .unwrap();
    let refused = stack
        .kms
        .sign(sign_request("", &[AUD]))
        .expect_err("an empty subject is refused");
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    let rotation = stack.kms.rotate(0).expect("RotateKeys");

    let m = ops::scrape(&metrics_url(metrics_port));
    let sign = |code| {
        m.get(
            "oidc_kms_grpc_requests_total",
            &[
                ("service", KEY_SERVICE),
                ("method", "SignToken"),
                ("code", code),
            ],
        )
    };
    assert_eq!(sign("OK"), Some(3.0), "{}", m.text);
    assert_eq!(sign("INVALID_ARGUMENT"), Some(1.0), "{}", m.text);
    assert_eq!(
        m.get(
            "oidc_kms_grpc_requests_total",
            &[
                ("service", KEY_SERVICE),
                ("method", "RotateKeys"),
                ("code", "OK")
            ]
        ),
        Some(1.0)
    );
    assert!(
        m.sum(
            "oidc_kms_grpc_request_duration_seconds_count",
            &[("method", "SignToken")]
        ) >= 4.0
    );
    assert_eq!(
        m.get("oidc_kms_tokens_signed_total", &[("kid", &first_kid)]),
        Some(3.0)
    );
    assert_eq!(m.sum("oidc_kms_tokens_signed_total", &[]), 3.0);
    assert_eq!(
        m.get(
            "oidc_kms_sign_duration_seconds_count",
            &[("algorithm", "RS256")]
        ),
        Some(3.0),
        "{}",
        m.text
    );
    assert!(
        m.text
            .contains("# TYPE oidc_kms_sign_duration_seconds histogram"),
        "latency is a histogram"
    );
    assert_eq!(
        m.get("oidc_kms_rotations_total", &[("reason", "manual")]),
        Some(1.0)
    );
    assert_eq!(
        m.get("oidc_kms_rotations_total", &[("reason", "scheduled")]),
        Some(0.0)
    );
    assert_eq!(m.get("oidc_kms_keys", &[("state", "active")]), Some(1.0));
    assert_eq!(m.get("oidc_kms_keys", &[("state", "previous")]), Some(1.0));
    let age = m.get("oidc_kms_active_key_age_seconds", &[]).unwrap();
    assert!((0.0..60.0).contains(&age), "the new key is young: {age}");
    // Default schedule: 7 d period, 1 h pre-publication, from the rotation just made.
    let next = m.get("oidc_kms_next_rotation_seconds", &[]).unwrap();
    let expected = (7 * 24 - 1) as f64 * 3600.0;
    assert!(
        (expected - 120.0..=expected).contains(&next),
        "next rotation in {next} s, expected about {expected}"
    );
    assert_eq!(
        m.get(
            "oidc_kms_tokens_signed_total",
            &[("kid", &rotation.new_key_id)]
        ),
        None,
        "the new key has signed nothing yet"
    );

    // The gateway: responses by path and status, JWKS age, readiness.
    stack.wait_for_gateway_kids(&stack.kms.kids());
    for _ in 0..2 {
        assert_eq!(http_get(&stack.gw.url("/openid/v1/jwks"), &[]).status, 200);
    }
    assert_eq!(http_get(&stack.gw.url("/nope"), &[]).status, 404);
    let tagged = http_get(&stack.gw.url("/healthz"), &[("x-request-id", "probe-7")]);
    assert_eq!(tagged.status, 200);
    assert_eq!(tagged.header("x-request-id"), Some("probe-7"));
    assert_eq!(http_get(&stack.gw.url("/readyz"), &[]).status, 200);
    let g = ops::scrape(&stack.gw.url("/metrics"));
    let served = |path, status| {
        g.get(
            "oidc_gateway_http_responses_total",
            &[("path", path), ("status", status)],
        )
        .unwrap_or(0.0)
    };
    assert!(served("/openid/v1/jwks", "200") >= 2.0, "{}", g.text);
    assert_eq!(served("other", "404"), 1.0, "{}", g.text);
    assert_eq!(served("/healthz", "200"), 1.0, "{}", g.text);
    let jwks_age = g.get("oidc_gateway_jwks_age_seconds", &[]).unwrap();
    assert!(
        (0.0..30.0).contains(&jwks_age),
        "refreshed every second: {jwks_age}"
    );
    assert_eq!(g.get("oidc_gateway_jwks_keys", &[]), Some(2.0));
    assert_eq!(g.get("oidc_gateway_ready", &[]), Some(1.0));
    assert_eq!(g.get("oidc_gateway_refresh_errors_total", &[]), Some(0.0));

    // The key service goes away: refresh errors count up, readiness drops, the age grows.
    assert!(stack.kms.proc.terminate().success());
    let g = eventually(Duration::from_secs(20), || {
        let g = ops::scrape(&stack.gw.url("/metrics"));
        (g.get("oidc_gateway_refresh_errors_total", &[])
            .unwrap_or(0.0)
            >= 2.0)
            .then_some(g)
    })
    .expect("refresh errors are counted");
    assert_eq!(g.get("oidc_gateway_ready", &[]), Some(0.0));
    assert!(g.get("oidc_gateway_jwks_age_seconds", &[]).unwrap() >= 1.0);
}

#[test]
fn scheduled_rotations_are_counted_and_the_next_one_is_announced() {
    let dir = tempfile::tempdir().unwrap();
    let kek = write_kek(dir.path());
    let metrics_port = free_port();
    let metrics_addr = format!("127.0.0.1:{metrics_port}");
    let kms = Kms::start(
        &dir.path().join("data"),
        &kek,
        "https://issuer.example/",
        &[
            "--algorithm",
            "ES256",
            "--rotation-period",
            "4s",
            "--prepublish",
            "2s",
            "--max-token-lifetime",
            "10m",
            "--metrics-listen",
            &metrics_addr,
        ],
    );
    let first = ops::scrape(&metrics_url(metrics_port));
    let next = first.get("oidc_kms_next_rotation_seconds", &[]).unwrap();
    assert!(
        next <= 3.0,
        "the first scheduled rotation starts within 3 s: {next}"
    );
    let m = eventually(Duration::from_secs(20), || {
        let m = ops::scrape(&metrics_url(metrics_port));
        (m.get("oidc_kms_rotations_total", &[("reason", "scheduled")]) >= Some(1.0)).then_some(m)
    })
    .unwrap_or_else(|| panic!("no scheduled rotation counted: {}", kms.proc.log_text()));
    assert_eq!(
        m.get("oidc_kms_rotations_total", &[("reason", "manual")]),
        Some(0.0)
    );
    assert!(
        m.get("oidc_kms_keys", &[("state", "next")]).unwrap()
            + m.get("oidc_kms_keys", &[("state", "previous")]).unwrap()
            >= 1.0,
        "{}",
        m.text
    );
}

/// Every line is a JSON object; returns them.
fn json_lines(log: &str) -> Vec<Value> {
    log.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

#[test]
fn json_logs_carry_an_rpc_span_with_a_request_id_and_no_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let kek = write_kek(dir.path());
    let kms = Kms::start(
        &dir.path().join("data"),
        &kek,
        "https://issuer.example/",
        &["--log-format", "json", "--algorithm", "ES256"],
    );

    let mut req = sign_request("system:serviceaccount:ns:app", &[AUD]);
    req.claims = Some(prost_types::Struct {
        fields: [(
            "secret-ish".to_owned(),
            prost_types::Value {
                kind: Some(prost_types::value::Kind::StringValue(
                    "claim-value-7".into(),
                )),
            },
        )]
        .into(),
    });
    let (signed, echoed) = ops::sign_with_request_id(kms.port, "req-ops-1", req);
    let token = signed.expect("SignToken").token;
    assert_eq!(echoed.as_deref(), Some("req-ops-1"));
    let (refused, echoed) = ops::sign_with_request_id(
        kms.port,
        "req-ops-2",
        sign_request("system:serviceaccount:ns:app", &[]),
    );
    assert_eq!(refused.unwrap_err().code(), tonic::Code::InvalidArgument);
    assert_eq!(echoed.as_deref(), Some("req-ops-2"));
    // A caller-chosen id that could forge log structure is replaced.
    let (_, echoed) = ops::sign_with_request_id(
        kms.port,
        "bad id with spaces",
        sign_request("system:serviceaccount:ns:app", &[AUD]),
    );
    let replaced = echoed.unwrap();
    assert_eq!(replaced.len(), 32, "{replaced}");

    let log = eventually(Duration::from_secs(10), || {
        let log = kms.proc.log_text();
        log.contains("req-ops-2").then_some(log)
    })
    .expect("the calls are logged");
    let lines = json_lines(&log);
    let finished = |id: &str| {
        lines.iter().find(|l| {
            l["message"] == "rpc finished"
                && l["span"]["name"] == "rpc"
                && l["span"]["request_id"] == id
                && l["span"]["rpc"] == "oidckms.v1.KeyService/SignToken"
        })
    };
    // A signed token's line is its audit record, at info, in the call's span; a refusal also
    // gets an `rpc finished` line with its status code.
    let audited = |id: &str| {
        lines.iter().find(|l| {
            l["target"] == "audit"
                && l["span"]["name"] == "rpc"
                && l["span"]["request_id"] == id
                && l["span"]["rpc"] == "oidckms.v1.KeyService/SignToken"
        })
    };
    let ok = audited("req-ops-1").unwrap_or_else(|| panic!("no rpc span for req-ops-1:\n{log}"));
    assert_eq!(ok["outcome"], "ok");
    assert_eq!(ok["level"], "INFO");
    assert!(finished("req-ops-1").is_none(), "at debug only:\n{log}");
    assert_eq!(audited("req-ops-2").unwrap()["outcome"], "INVALID_ARGUMENT");
    let refused = finished("req-ops-2").unwrap_or_else(|| panic!("no rpc finished line:\n{log}"));
    assert_eq!(refused["code"], "INVALID_ARGUMENT");
    assert_eq!(refused["level"], "INFO");
    assert!(audited(&replaced).is_some(), "{log}");

    // Nothing secret: not the token (nor its signature or payload), not the KEK, not claims.
    let kek_text = std::fs::read_to_string(&kek).unwrap();
    let parts: Vec<&str> = token.split('.').collect();
    for secret in [
        token.as_str(),
        parts[1],
        parts[2],
        kek_text.trim(),
        "claim-value-7",
    ] {
        assert!(!log.contains(secret), "the log holds {secret:?}:\n{log}");
    }
    let kek_bytes = base64::engine::general_purpose::STANDARD
        .decode(kek_text.trim())
        .unwrap();
    let kek_b64url = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&kek_bytes);
    assert!(!log.contains(&kek_b64url));

    // The gateway's requests get an `http` span with the request id too (logged at debug).
    let gw_port = free_port();
    let mut gw = ops::spawn(
        gateway_bin(),
        &[
            "--kms".into(),
            format!("http://127.0.0.1:{}", kms.port),
            "--listen".into(),
            format!("127.0.0.1:{gw_port}"),
            "--log-format".into(),
            "json".into(),
        ],
        &[("RUST_LOG", "info,oidc_kms::gateway=debug")],
        dir.path().join("gw.log"),
    );
    let ready = eventually(Duration::from_secs(30), || {
        (http_get(&format!("http://127.0.0.1:{gw_port}/readyz"), &[]).status == 200).then_some(())
    });
    assert!(ready.is_some(), "{}", gw.log_text());
    let r = http_get(
        &format!("http://127.0.0.1:{gw_port}/openid/v1/jwks"),
        &[("x-request-id", "gw-req-1")],
    );
    assert_eq!(r.status, 200);
    let log = eventually(Duration::from_secs(10), || {
        let log = gw.log_text();
        log.contains("gw-req-1").then_some(log)
    })
    .unwrap_or_else(|| panic!("gateway request not logged: {}", gw.log_text()));
    let lines = json_lines(&log);
    assert!(
        lines.iter().any(|l| l["span"]["name"] == "http"
            && l["span"]["request_id"] == "gw-req-1"
            && l["span"]["path"] == "/openid/v1/jwks"
            && l["status"] == 200),
        "{log}"
    );
    gw.kill();
}

#[test]
fn health_reports_each_service_and_the_whole_server() {
    let dir = tempfile::tempdir().unwrap();
    let kek = write_kek(dir.path());
    // Started bare, with no client of its own left connected: the test's calls are the only ones.
    let port = free_port();
    let args = kms_args(
        port,
        &dir.path().join("data"),
        &kek,
        "https://issuer.example/",
        &["--algorithm".into(), "ES256".into()],
    );
    let mut proc = ops::spawn(kms_bin(), &args, &[], dir.path().join("kms.log"));
    ops::wait_for_jwks(port, &mut proc);
    for service in [
        "",
        KEY_SERVICE,
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    ] {
        assert_eq!(
            ops::health(port, service).unwrap(),
            ServingStatus::Serving,
            "{service:?}"
        );
    }
    let unknown = ops::health(port, "no.such.Service").unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound);

    // A client watching health hears NOT_SERVING once shutdown begins, before the server goes.
    let pid = proc.child.id().to_string();
    let seen = ops::watch_health_while(port, KEY_SERVICE, || {
        let sent = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap();
        assert!(sent.success());
    });
    assert_eq!(
        seen,
        [ServingStatus::Serving, ServingStatus::NotServing],
        "{}",
        proc.log_text()
    );
    let status = wait_exit(&mut proc.child, Duration::from_secs(20)).expect("exits");
    assert!(status.success(), "{status}: {}", proc.log_text());
    // The watch ended with the shutdown; it did not hold the process until the grace period ran out.
    let log = proc.log_text();
    assert!(!log.contains("connections still open"), "{log}");
}

/// Starts oidc-kms with `args` and `env` and returns the issuer its GetJwks reports.
fn issuer_with(args: &[&str], env: &[(&str, &str)], dir: &Path) -> String {
    let port = free_port();
    let mut all: Vec<String> = vec!["--listen".into(), format!("127.0.0.1:{port}")];
    all.extend(args.iter().map(|s| s.to_string()));
    let mut p = ops::spawn(kms_bin(), &all, env, dir.join(format!("kms-{port}.log")));
    let issuer = ops::wait_for_jwks(port, &mut p).issuer;
    assert!(p.terminate().success(), "{}", p.log_text());
    issuer
}

#[test]
fn configuration_layers_file_under_env_under_flag() {
    let dir = tempfile::tempdir().unwrap();
    // The KEK comes from the CLI, as an operator would make it.
    let kek = dir.path().join("kek.b64");
    let made = ops::cli(&["kek", "generate", "--out", kek.to_str().unwrap()]);
    assert_eq!(made.code, 0, "{}", made.stderr);
    let config = dir.path().join("oidc-kms.toml");
    let metrics_port = free_port();
    std::fs::write(
        &config,
        format!(
            "# oidc-kms settings\n\
             issuer = \"https://file.example/\"\n\
             data-dir = {:?}\n\
             kek-file = {:?}\n\
             algorithm = \"ES256\"\n\
             max-token-lifetime = \"2h\"\n\
             rotation-period = \"off\"\n\
             metrics-listen = \"127.0.0.1:{metrics_port}\"\n",
            dir.path().join("data"),
            kek
        ),
    )
    .unwrap();
    let config = config.to_str().unwrap();

    assert_eq!(
        issuer_with(&["--config", config], &[], dir.path()),
        "https://file.example/"
    );
    assert_eq!(
        issuer_with(
            &[],
            &[
                ("OIDC_KMS_CONFIG", config),
                ("OIDC_KMS_ISSUER", "https://env.example/")
            ],
            dir.path()
        ),
        "https://env.example/"
    );
    assert_eq!(
        issuer_with(
            &["--config", config, "--issuer", "https://flag.example/"],
            &[("OIDC_KMS_ISSUER", "https://env.example/")],
            dir.path()
        ),
        "https://flag.example/"
    );

    // Settings under their defaults take the file's values too: the lifetime limit, the metrics
    // port, the algorithm, the schedule.
    let port = free_port();
    let mut p = ops::spawn(
        kms_bin(),
        &[
            "--config".into(),
            config.into(),
            "--listen".into(),
            format!("127.0.0.1:{port}"),
        ],
        &[],
        dir.path().join("kms-lifetime.log"),
    );
    let jwks = ops::wait_for_jwks(port, &mut p);
    assert!(jwks.keys.iter().all(|k| k.alg == "ES256"));
    let mut too_long = sign_request("s", &[AUD]);
    too_long.lifetime_seconds = 3 * 3600;
    let (refused, _) = ops::sign_with_request_id(port, "lifetime", too_long);
    let refused = refused.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    assert!(refused.message().contains("7200"), "{}", refused.message());
    let m = ops::scrape(&metrics_url(metrics_port));
    assert_eq!(
        m.get("oidc_kms_next_rotation_seconds", &[]),
        Some(f64::INFINITY),
        "rotation-period = off: nothing scheduled"
    );
    assert!(p.terminate().success());
    // ...and the environment still beats the file for them.
    let port = free_port();
    let mut p = ops::spawn(
        kms_bin(),
        &[
            "--config".into(),
            config.into(),
            "--listen".into(),
            format!("127.0.0.1:{port}"),
        ],
        &[("OIDC_KMS_MAX_TOKEN_LIFETIME", "4h")],
        dir.path().join("kms-lifetime-env.log"),
    );
    ops::wait_for_jwks(port, &mut p);
    let mut three_hours = sign_request("s", &[AUD]);
    three_hours.lifetime_seconds = 3 * 3600;
    let (signed, _) = ops::sign_with_request_id(port, "lifetime-env", three_hours);
    signed.expect("4h from the environment beats 2h from the file");
    assert!(p.terminate().success());
}

/// Starts oidc-gateway with `args` and `env`, waits until `port` serves discovery, and returns the
/// issuer it names (which says which key service the gateway reached).
fn gateway_issuer_with(args: &[&str], env: &[(&str, &str)], port: u16, dir: &Path) -> String {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    let mut p = ops::spawn(
        gateway_bin(),
        &args,
        env,
        dir.join(format!("gw-{port}.log")),
    );
    let url = format!("http://127.0.0.1:{port}/.well-known/openid-configuration");
    let issuer = eventually(Duration::from_secs(30), || {
        let r = http_get(&url, &[]);
        (r.status == 200).then(|| {
            let doc: Value = serde_json::from_slice(&r.body).unwrap();
            doc["issuer"].as_str().unwrap().to_owned()
        })
    })
    .unwrap_or_else(|| panic!("gateway never served {url}: {}", p.log_text()));
    assert!(p.terminate().success(), "{}", p.log_text());
    issuer
}

#[test]
fn gateway_configuration_layers_file_under_env_under_flag() {
    let dir = tempfile::tempdir().unwrap();
    let kek = write_kek(dir.path());
    // Two key services with different issuers: the discovery document tells them apart.
    let start = |name: &str| {
        Kms::start(
            &dir.path().join(name),
            &kek,
            &format!("https://{name}.example/"),
            &["--algorithm", "ES256"],
        )
    };
    let (file_kms, env_kms) = (start("file"), start("env"));
    let kms_url = |kms: &Kms| format!("http://{}", kms.endpoint());
    let (file_port, env_port, flag_port) = (free_port(), free_port(), free_port());
    let config = dir.path().join("oidc-gateway.toml");
    std::fs::write(
        &config,
        format!(
            "kms = \"{}\"\nlisten = \"127.0.0.1:{file_port}\"\nmax-stale = \"10m\"\n",
            kms_url(&file_kms)
        ),
    )
    .unwrap();
    let config = config.to_str().unwrap();

    assert_eq!(
        gateway_issuer_with(&["--config", config], &[], file_port, dir.path()),
        "https://file.example/",
        "the file's kms and listen apply"
    );
    let env_kms_url = kms_url(&env_kms);
    let env_listen = format!("127.0.0.1:{env_port}");
    assert_eq!(
        gateway_issuer_with(
            &[],
            &[
                ("OIDC_GATEWAY_CONFIG", config),
                ("OIDC_GATEWAY_KMS", &env_kms_url),
                ("OIDC_GATEWAY_LISTEN", &env_listen),
            ],
            env_port,
            dir.path()
        ),
        "https://env.example/",
        "the environment beats the file"
    );
    let flag_listen = format!("127.0.0.1:{flag_port}");
    assert_eq!(
        gateway_issuer_with(
            &[
                "--config",
                config,
                "--kms",
                &kms_url(&file_kms),
                "--listen",
                &flag_listen
            ],
            &[
                ("OIDC_GATEWAY_KMS", &env_kms_url),
                ("OIDC_GATEWAY_LISTEN", &env_listen),
            ],
            flag_port,
            dir.path()
        ),
        "https://file.example/",
        "flags beat the environment"
    );
}

/// Arguments, environment, and what the error must mention.
type Case<'a> = (Vec<String>, Vec<(&'a str, &'a str)>, Vec<&'a str>);
/// Environment variables for one run.
type Env<'a> = Vec<(&'a str, &'a str)>;

#[test]
fn invalid_configuration_exits_64_naming_the_setting() {
    let dir = tempfile::tempdir().unwrap();
    let kek = write_kek(dir.path());
    let data = dir.path().join("data");
    let base = |extra: &[&str]| -> Vec<String> {
        let mut args = kms_args(free_port(), &data, &kek, "https://issuer.example/", &[]);
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    };
    let toml = |name: &str, text: &str| -> String {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path.display().to_string()
    };
    let unknown = toml("unknown.toml", "colour = \"blue\"\n");
    let underscore = toml("underscore.toml", "max_token_lifetime = \"2h\"\n");
    let bad_toml = toml("bad.toml", "issuer = \n");
    let bad_value = toml("value.toml", "rsa-bits = \"many\"\n");
    let too_long = toml("long.toml", "max-token-lifetime = \"48h\"\n");
    let float = toml("float.toml", "rsa-bits = 2048.0\n");
    let cases: Vec<Case> = vec![
        (
            {
                let mut a = base(&[]);
                let i = a.iter().position(|x| x == "--issuer").unwrap();
                a[i + 1] = "ftp://issuer.example/".into();
                a
            },
            vec![],
            vec!["--issuer"],
        ),
        (
            base(&[]),
            vec![("OIDC_KMS_MAX_TOKEN_LIFETIME", "48h")],
            vec!["--max-token-lifetime", "OIDC_KMS_MAX_TOKEN_LIFETIME"],
        ),
        (
            base(&["--config", &too_long]),
            vec![],
            vec!["--max-token-lifetime", "config file", "long.toml"],
        ),
        (
            base(&["--config", &unknown]),
            vec![],
            vec!["unknown.toml", "unknown setting `colour`"],
        ),
        (
            base(&["--config", &underscore]),
            vec![],
            vec!["did you mean `max-token-lifetime`?"],
        ),
        (
            base(&["--config", &bad_toml]),
            vec![],
            vec!["not valid TOML"],
        ),
        (
            base(&["--config", &bad_value]),
            vec![],
            vec!["rsa-bits", "many"],
        ),
        (
            base(&["--config", "/nonexistent/oidc-kms.toml"]),
            vec![],
            vec!["/nonexistent/oidc-kms.toml", "cannot read"],
        ),
        (base(&["--log-format", "xml"]), vec![], vec!["--log-format"]),
        (
            base(&[]),
            vec![("OIDC_KMS_RSA_BITS", "abc")],
            vec![
                "--rsa-bits",
                "set by the environment variable OIDC_KMS_RSA_BITS",
            ],
        ),
        (
            base(&["--config", &float]),
            vec![],
            vec!["rsa-bits", "fractional"],
        ),
        (
            base(&["--metrics-listen", "not-an-address"]),
            vec![],
            vec!["--metrics-listen"],
        ),
    ];
    for (args, env, wants) in cases {
        let (code, out) = ops::run_to_exit(kms_bin(), &args, &env, dir.path());
        assert_eq!(code, 64, "{args:?} {env:?}: {out}");
        for want in wants {
            assert!(
                out.contains(want),
                "{args:?} {env:?}: {want:?} not in {out}"
            );
        }
    }
    // A bad value is blamed on where it came from, never on a file that does not set it.
    let other = toml("other.toml", "rotation-period = \"7d\"\n");
    let blamed: Vec<(Vec<String>, Env, &str)> = vec![
        (
            base(&["--config", &other, "--rsa-bits", "1024"]),
            vec![],
            "--rsa-bits: RSA keys are 2048, 3072 or 4096 bits, not 1024\n",
        ),
        (
            base(&["--config", &other]),
            vec![("OIDC_KMS_RSA_BITS", "1024")],
            "--rsa-bits: RSA keys are 2048, 3072 or 4096 bits, not 1024 (set by the environment \
             variable OIDC_KMS_RSA_BITS)",
        ),
        (
            base(&["--config", &other, "--algorithm", "HS256"]),
            vec![],
            "--algorithm: unsupported algorithm \"HS256\": use RS256, ES256 or ES384\n",
        ),
    ];
    for (args, env, want) in blamed {
        let (code, out) = ops::run_to_exit(kms_bin(), &args, &env, dir.path());
        assert_eq!(code, 64, "{args:?} {env:?}: {out}");
        assert!(
            out.contains(want),
            "{args:?} {env:?}: {want:?} not in {out}"
        );
        assert!(!out.contains("config file"), "{args:?} {env:?}: {out}");
    }
    assert!(
        !data.exists(),
        "invalid configuration never touches the store"
    );

    // The gateway too.
    for (args, want) in [
        (vec!["--refresh-interval", "0"], "--refresh-interval"),
        (vec!["--refresh-interval", "1ms"], "at least 1s"),
        (
            vec!["--max-stale", "0"],
            "--max-stale: must be at least 10s",
        ),
        (
            vec!["--refresh-interval", "10m", "--max-stale", "2s"],
            "at least 10m, twice the refresh interval (5m)",
        ),
        (vec!["--kms", "not a url"], "--kms"),
        (vec!["--kms", "ftp://kms.example"], "use http://"),
        (
            vec![
                "--kms",
                "https://kms.example",
                "--kms-ca-cert",
                unknown.as_str(),
            ],
            "--kms-ca-cert",
        ),
        (
            vec!["--config", unknown.as_str()],
            "unknown setting `colour`",
        ),
    ] {
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        let (code, out) = ops::run_to_exit(gateway_bin(), &args, &[], dir.path());
        assert_eq!(code, 64, "{args:?}: {out}");
        assert!(out.contains(want), "{args:?}: {out}");
    }

    // --help documents every setting with its default, and the config file.
    let help = ops::cli(&["--help"]);
    assert_eq!(help.code, 0);
    for want in [
        "--config",
        "--metrics-listen",
        "--log-format",
        "[default: 24h]",
        "[default: off]",
        "flag > environment > config file > default",
    ] {
        assert!(help.stdout.contains(want), "{want:?} not in --help");
    }
}

#[test]
fn admin_cli_against_a_live_service() {
    let stack = Stack::start("/", &[]);
    let url = format!("http://{}", stack.kms.endpoint());

    // keys list
    let run = ops::cli(&["keys", "list", "--kms", &url, "--json"]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let listed: Value = serde_json::from_str(&run.stdout).unwrap();
    let active = stack.kms.list_keys().active_key_id;
    assert_eq!(listed["active_key_id"], active.as_str());
    assert_eq!(listed["keys"][0]["key_id"], active.as_str());
    assert_eq!(listed["keys"][0]["state"], "active");
    assert_eq!(listed["keys"][0]["algorithm"], "RS256");
    assert!(
        listed["keys"][0]["created_at"]
            .as_str()
            .unwrap()
            .ends_with('Z')
    );
    let run = ops::cli(&["keys", "list", "--kms", &url]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(run.stdout.contains("STATE"), "{}", run.stdout);
    assert!(run.stdout.contains(&format!("active key: {active}")));

    // token sign, verified by jsonwebtoken against the gateway's JWKS
    let run = ops::cli(&[
        "token",
        "sign",
        "--kms",
        &url,
        "--sub",
        "system:serviceaccount:default:cli",
        "--aud",
        AUD,
        "--aud",
        "second",
        "--lifetime",
        "10m",
        "--claims",
        r#"{"kubernetes.io": {"namespace": "default"}, "n": 5}"#,
    ]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let token = run.stdout.trim();
    assert_eq!(run.stdout.lines().count(), 1, "only the token on stdout");
    assert!(run.stderr.contains("key id:"), "{}", run.stderr);
    let (_, jwks) = stack.fetch_jwks();
    let claims = verify(token, &jwks, &stack.kms.issuer, AUD).expect("verifies");
    assert_eq!(claims["sub"], "system:serviceaccount:default:cli");
    assert_eq!(claims["aud"], serde_json::json!([AUD, "second"]));
    assert_eq!(claims["kubernetes.io"]["namespace"], "default");
    assert_eq!(claims["n"], 5);
    assert_eq!(
        claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap(),
        600
    );
    let run = ops::cli(&[
        "token", "sign", "--kms", &url, "--sub", "s", "--aud", AUD, "--json",
    ]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let signed: Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(signed["key_id"], active.as_str());
    let claims = verify(
        signed["token"].as_str().unwrap(),
        &jwks,
        &stack.kms.issuer,
        AUD,
    )
    .unwrap();
    // Its expiry in RFC 3339, like every time --json prints: the token's own exp.
    assert_eq!(
        signed["expires_at"],
        oidc_kms::clock::rfc3339(claims["exp"].as_i64().unwrap(), 0)
    );

    // Refusals: the status code and message, a non-zero exit.
    let run = ops::cli(&[
        "token",
        "sign",
        "--kms",
        &url,
        "--sub",
        "s",
        "--aud",
        AUD,
        "--lifetime",
        "48h",
    ]);
    assert_eq!(run.code, 1);
    assert!(
        run.stderr.contains("INVALID_ARGUMENT") && run.stderr.contains("lifetime_seconds"),
        "{}",
        run.stderr
    );
    assert!(run.stdout.is_empty());
    let run = ops::cli(&[
        "token", "sign", "--kms", &url, "--sub", "s", "--aud", AUD, "--claims", "[1]",
    ]);
    assert_eq!(run.code, 64, "{}", run.stderr);
    assert!(run.stderr.contains("--claims"));
    let run = ops::cli(&["token", "sign", "--kms", &url, "--sub", "s"]);
    assert_eq!(run.code, 64, "--aud is required: {}", run.stderr);
    let dead = format!("http://127.0.0.1:{}", free_port());
    let run = ops::cli(&["keys", "list", "--kms", &dead]);
    assert_eq!(run.code, 69, "{}", run.stderr);
    assert!(run.stderr.contains("cannot reach the key service"));

    // keys rotate: immediate, then pre-published, then refused while one is pending.
    let run = ops::cli(&["keys", "rotate", "--kms", &url, "--json"]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let rotated: Value = serde_json::from_str(&run.stdout).unwrap();
    let new_kid = rotated["new_key_id"].as_str().unwrap().to_owned();
    assert_ne!(new_kid, active);
    assert_eq!(rotated["active_key_id"], new_kid.as_str());
    assert_eq!(stack.kms.list_keys().active_key_id, new_kid);
    // Durations the wire carries in seconds are refused, not rounded, when they are not whole:
    // 999ms rounded to 0 would have been an immediate rotation.
    for args in [
        ["keys", "rotate", "--prepublish", "999ms"].as_slice(),
        [
            "token",
            "sign",
            "--sub",
            "s",
            "--aud",
            AUD,
            "--lifetime",
            "500ms",
        ]
        .as_slice(),
    ] {
        let run = ops::cli(&[args, &["--kms", &url]].concat());
        assert_eq!(run.code, 64, "{args:?}: {}", run.stderr);
        assert!(run.stderr.contains("whole seconds"), "{}", run.stderr);
    }
    assert_eq!(
        stack.kms.list_keys().active_key_id,
        new_kid,
        "nothing rotated"
    );
    let run = ops::cli(&["keys", "rotate", "--kms", &url, "--prepublish", "10m"]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(run.stdout.contains("signs in 10m"), "{}", run.stdout);
    let run = ops::cli(&["keys", "rotate", "--kms", &url, "--prepublish", "10m"]);
    assert_eq!(run.code, 1);
    assert!(
        run.stderr
            .contains("RotateKeys failed: FAILED_PRECONDITION"),
        "{}",
        run.stderr
    );
    let listed: Value =
        serde_json::from_str(&ops::cli(&["keys", "list", "--kms", &url, "--json"]).stdout).unwrap();
    let states: Vec<&str> = listed["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["state"].as_str().unwrap())
        .collect();
    assert!(states.contains(&"next"), "{states:?}");

    // The service did what the CLI asked, as grpcurl would show it: GetJwks has the new keys.
    let kids = stack.kms.kids();
    assert_eq!(kids.len(), 3, "previous, active, next: {kids:?}");
}

#[test]
fn kek_generate_prints_or_writes_a_private_file_and_never_overwrites() {
    let run = ops::cli(&["kek", "generate"]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let printed = run.stdout.trim();
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(printed)
        .unwrap();
    assert_eq!(bytes.len(), 32);
    assert_ne!(ops::cli(&["kek", "generate"]).stdout.trim(), printed);
    let run = ops::cli(&["kek", "generate", "--json"]);
    let v: Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(
        base64::engine::general_purpose::STANDARD
            .decode(v["kek"].as_str().unwrap())
            .unwrap()
            .len(),
        32
    );

    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("kek.b64");
    let out_s = out.to_str().unwrap();
    let run = ops::cli(&["kek", "generate", "--out", out_s]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(run.stdout.is_empty(), "the KEK is not printed with --out");
    let written = std::fs::read_to_string(&out).unwrap();
    assert!(oidc_kms::keys::Kek::from_base64(&written).is_ok());
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&out).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let run = ops::cli(&["kek", "generate", "--out", out_s]);
    assert_eq!(run.code, 73, "{}", run.stderr);
    assert!(run.stderr.contains("refusing to overwrite"));
    assert_eq!(std::fs::read_to_string(&out).unwrap(), written);
}

#[test]
fn serving_flags_and_admin_commands_do_not_mix() {
    let run = ops::cli(&["--listen", "127.0.0.1:1", "keys", "list"]);
    assert_eq!(run.code, 64, "{}", run.stderr);
    let run = ops::cli(&["keys", "list", "--issuer", "https://x.example/"]);
    assert_eq!(run.code, 64, "{}", run.stderr);
}
