//! Faults and hostile input with the real binaries (issue #5): SIGKILL during rotations, input
//! limits over gRPC, overload, the gateway through a key-service outage, and the audit trail.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::*;
use oidc_kms::grpc::pb::{self, key_service_client::KeyServiceClient};

/// What the crash test's client saw, in order.
enum Seen {
    /// A RotateKeys answered with this new (active) key.
    Rotated(String),
    /// A SignToken answered with this token of this key.
    Signed(String, String),
}

#[test]
fn fifty_sigkills_during_rotations_and_signatures_lose_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let kek = write_kek(dir.path());
    let data = dir.path().join("data");
    let issuer = "https://issuer.example/";
    let args: &[&str] = &["--algorithm", "ES256", "--rotation-period", "off"];
    let mut kms = Kms::start(&data, &kek, issuer, args);
    let (mut rotations, mut checked) = (0, 0);
    // Every token any round was given, with its key: checked again after every later restart.
    let mut all_tokens: Vec<(String, String)> = Vec::new();
    for round in 0..50 {
        let active_before = kms.list_keys().active_key_id;
        let kids_before = kms.kids();
        let endpoint = format!("http://127.0.0.1:{}", kms.port);
        // A client that rotates and signs until the service dies under it; it also says whether
        // the call in flight at that moment was a rotation (which may have landed unanswered).
        let client = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let mut seen = Vec::new();
                let Ok(mut c) = KeyServiceClient::connect(endpoint).await else {
                    return (seen, false);
                };
                for i in 0.. {
                    if i % 3 == 0 {
                        let request = pb::RotateKeysRequest {
                            prepublish_seconds: 0,
                        };
                        match c.rotate_keys(request).await {
                            Ok(r) => seen.push(Seen::Rotated(r.into_inner().new_key_id)),
                            Err(_) => return (seen, true),
                        }
                    } else {
                        match c.sign_token(sign_request("s", &[AUD])).await {
                            Ok(t) => {
                                let t = t.into_inner();
                                seen.push(Seen::Signed(t.key_id, t.token));
                            }
                            Err(_) => return (seen, false),
                        }
                    }
                }
                unreachable!("the loop ends when the service dies")
            })
        });
        std::thread::sleep(Duration::from_millis(random_in(30..200)));
        kms.proc.kill();
        let (seen, rotation_in_flight) = client.join().unwrap();

        kms = Kms::start(&data, &kek, issuer, args);
        let kids = kms.kids();
        assert!(kids.len() <= 3, "round {round}: {kids:?}");

        // Which keys must have survived: the last key the client saw become active; the key
        // active before it (AKS keeps it as the previous key), unless a rotation was in flight
        // and may have landed unanswered; with no rotation at all, everything as it was.
        let (mut active, mut before_last) = (active_before.clone(), None);
        for s in &seen {
            if let Seen::Rotated(kid) = s {
                before_last = Some(std::mem::replace(&mut active, kid.clone()));
                rotations += 1;
            }
        }
        let mut required = vec![active.clone()];
        match (&before_last, rotation_in_flight) {
            (Some(prev), false) => required.push(prev.clone()),
            (None, false) => required.extend(kids_before.iter().cloned()),
            (_, true) => {}
        }
        for kid in &required {
            assert!(
                kids.contains(kid),
                "round {round}: key {kid} lost (in flight: rotation {rotation_in_flight}): {kids:?}"
            );
        }

        // Every token ever returned whose key is still published verifies against the JWKS a
        // relying party gets; the tokens of the keys that had to survive are among them.
        all_tokens.extend(seen.into_iter().filter_map(|s| match s {
            Seen::Signed(kid, token) => Some((kid, token)),
            Seen::Rotated(_) => None,
        }));
        let jwks = jwks_json(&kms);
        for (kid, token) in &all_tokens {
            if kids.contains(kid) {
                verify(token, &jwks, issuer, AUD)
                    .unwrap_or_else(|e| panic!("round {round}, {kid}: {e}"));
                checked += 1;
            }
        }
        // Keys no longer published only ever go by the AKS rule: never the ones required above.
        all_tokens.retain(|(kid, _)| kids.contains(kid));
    }
    assert!(
        rotations >= 50 && checked >= 50,
        "{rotations} rotations, {checked} tokens checked"
    );
}

/// The JWKS as the gateway would render it, from GetJwks.
fn jwks_json(kms: &Kms) -> serde_json::Value {
    let keys: Vec<serde_json::Value> = kms
        .jwks()
        .keys
        .into_iter()
        .map(|k| {
            let mut m = serde_json::Map::new();
            for (name, v) in [
                ("kty", k.kty),
                ("kid", k.kid),
                ("use", k.r#use),
                ("alg", k.alg),
                ("n", k.n),
                ("e", k.e),
                ("crv", k.crv),
                ("x", k.x),
                ("y", k.y),
            ] {
                if !v.is_empty() {
                    m.insert(name.into(), v.into());
                }
            }
            serde_json::Value::Object(m)
        })
        .collect();
    serde_json::json!({ "keys": keys })
}

#[test]
fn input_limits_name_the_field_and_the_limit() {
    let stack = Stack::start("/", &["--algorithm", "ES256"]);
    let long = "x".repeat(601);
    let many: Vec<String> = (0..21).map(|i| format!("a{i}")).collect();
    let many: Vec<&str> = many.iter().map(String::as_str).collect();
    let blob = prost_types::Struct {
        fields: [(
            "blob".to_owned(),
            prost_types::Value {
                kind: Some(prost_types::value::Kind::StringValue("x".repeat(17 * 1024))),
            },
        )]
        .into_iter()
        .collect(),
    };
    let mut deep = prost_types::Value {
        kind: Some(prost_types::value::Kind::NumberValue(1.0)),
    };
    // 20 levels: past our limit of 16, inside the protobuf decoder's own recursion limit.
    for _ in 0..20 {
        deep = prost_types::Value {
            kind: Some(prost_types::value::Kind::StructValue(prost_types::Struct {
                fields: [("a".to_owned(), deep)].into_iter().collect(),
            })),
        };
    }
    let deep = match deep.kind {
        Some(prost_types::value::Kind::StructValue(s)) => s,
        _ => unreachable!(),
    };
    let cases = vec![
        (sign_request(&long, &[AUD]), "subject", "600"),
        (sign_request("s", &many), "audiences", "20"),
        (sign_request("s", &[&long]), "audiences[0]", "600"),
        (
            pb::SignTokenRequest {
                claims: Some(blob),
                ..sign_request("s", &[AUD])
            },
            "claims",
            "16384",
        ),
        (
            pb::SignTokenRequest {
                claims: Some(deep),
                ..sign_request("s", &[AUD])
            },
            "claims",
            "16",
        ),
    ];
    for (req, field, limit) in cases {
        let status = stack.kms.sign(req).unwrap_err();
        assert_eq!(
            status.code(),
            tonic::Code::InvalidArgument,
            "{field}: {status:?}"
        );
        assert!(
            status.message().starts_with(field) && status.message().contains(limit),
            "{}",
            status.message()
        );
    }
    // A request far above any limit is refused by the transport before it is decoded.
    let huge = sign_request(&"y".repeat(200 * 1024), &[AUD]);
    let status = stack.kms.sign(huge).unwrap_err();
    assert_eq!(status.code(), tonic::Code::OutOfRange, "{status:?}");
    assert!(status.message().contains("65536"), "{status:?}");
    // Bytes that are not a SignTokenRequest: a subject that is not UTF-8, and a lifetime of the
    // wrong wire type. The caller's mistake, so INVALID_ARGUMENT, not INTERNAL.
    let cases = [
        (
            WrongTypes {
                subject: vec![0xff, 0xfe],
                audiences: vec![AUD.into()],
                lifetime_seconds: String::new(),
            },
            "invalid string",
        ),
        (
            WrongTypes {
                subject: b"s".to_vec(),
                audiences: vec![AUD.into()],
                lifetime_seconds: "3600".into(),
            },
            "invalid wire type",
        ),
    ];
    for (garbage, reason) in cases {
        let status = call_with(stack.kms.port, garbage).unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
        assert!(
            status.message().contains("not valid protobuf") && status.message().contains(reason),
            "{status:?}"
        );
    }
    stack.kms.sign_simple();
}

/// SignTokenRequest's field numbers with the wrong types.
#[derive(Clone, PartialEq, prost::Message)]
struct WrongTypes {
    #[prost(bytes = "vec", tag = "1")]
    subject: Vec<u8>,
    #[prost(string, repeated, tag = "2")]
    audiences: Vec<String>,
    #[prost(string, tag = "3")]
    lifetime_seconds: String,
}

/// Sends `message` as a SignToken request, whatever its type.
fn call_with(port: u16, message: WrongTypes) -> Result<pb::SignTokenResponse, tonic::Status> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let channel = loopback_channel(port).await;
        let mut grpc = tonic::client::Grpc::new(channel);
        grpc.ready().await.unwrap();
        let path = http::uri::PathAndQuery::from_static("/oidckms.v1.KeyService/SignToken");
        let codec = tonic_prost::ProstCodec::<WrongTypes, pb::SignTokenResponse>::default();
        grpc.unary(tonic::Request::new(message), path, codec)
            .await
            .map(tonic::Response::into_inner)
    })
}

#[test]
fn a_flood_is_shed_quickly_and_throughput_recovers() {
    let stack = Stack::start("/", &[]); // RS256: about half a millisecond of CPU per signature
    let endpoint = format!("http://127.0.0.1:{}", stack.kms.port);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    // Capacity is one queue of 64 per core plus the workers; offer ten times that at once.
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let offered = 10 * (cores * 64 + cores);
    let outcomes: Vec<(tonic::Code, Duration)> = rt.block_on(async {
        let mut clients = Vec::new();
        for _ in 0..8 {
            clients.push(KeyServiceClient::connect(endpoint.clone()).await.unwrap());
        }
        let mut tasks = Vec::new();
        for i in 0..offered {
            let mut c = clients[i % clients.len()].clone();
            tasks.push(tokio::spawn(async move {
                let started = Instant::now();
                let code = match c.sign_token(sign_request("s", &[AUD])).await {
                    Ok(_) => tonic::Code::Ok,
                    Err(s) => s.code(),
                };
                (code, started.elapsed())
            }));
        }
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.unwrap());
        }
        out
    });
    let mut by_code: HashMap<tonic::Code, Vec<Duration>> = HashMap::new();
    for (code, took) in outcomes {
        by_code.entry(code).or_default().push(took);
    }
    let codes: Vec<_> = by_code.iter().map(|(c, v)| (*c, v.len())).collect();
    assert_eq!(
        by_code
            .keys()
            .filter(|c| **c != tonic::Code::Ok && **c != tonic::Code::ResourceExhausted)
            .count(),
        0,
        "only successes and RESOURCE_EXHAUSTED: {codes:?}"
    );
    let ok = by_code
        .get(&tonic::Code::Ok)
        .expect("some requests are served");
    let shed = by_code
        .get(&tonic::Code::ResourceExhausted)
        .expect("some requests are shed");
    let median = |v: &Vec<Duration>| {
        let mut v = v.clone();
        v.sort();
        v[v.len() / 2]
    };
    // Shed requests are answered without waiting their turn in the queue.
    assert!(
        median(shed) < median(ok),
        "shed {:?} vs served {:?}",
        median(shed),
        median(ok)
    );
    // After the flood, every request is served again.
    for _ in 0..20 {
        stack.kms.sign_simple();
    }
}

#[test]
fn an_expired_deadline_is_not_signed() {
    // In process, through the gRPC adapter: a real client enforces its own deadline and gives up
    // first, so the server's side is tested by handing it a request whose deadline has passed.
    use oidc_kms::grpc::key_service::KeyServiceApi;
    use oidc_kms::grpc::pb::key_service_server::KeyService as _;
    let dir = tempfile::tempdir().unwrap();
    let store =
        oidc_kms::keys::FileStore::open(dir.path(), &oidc_kms::keys::Kek::generate().unwrap())
            .unwrap();
    let settings = oidc_kms::key_manager::Settings {
        issuer: oidc_kms::issuer::Issuer::parse("https://issuer.example/").unwrap(),
        policy: oidc_kms::lifecycle::Policy::default(),
        new_key_spec: oidc_kms::keys::KeySpec::P256,
    };
    let manager = oidc_kms::key_manager::KeyManager::open(
        Box::new(store),
        std::sync::Arc::new(oidc_kms::clock::SystemClock),
        settings,
    )
    .unwrap();
    let api = KeyServiceApi::new(manager);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut req = tonic::Request::new(sign_request("deadline-test", &[AUD]));
    req.metadata_mut()
        .insert("grpc-timeout", "1n".parse().unwrap());
    let status = rt.block_on(api.sign_token(req)).unwrap_err();
    assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{status:?}");
    assert!(status.message().contains("nothing was signed"));
    let mut req = tonic::Request::new(sign_request("deadline-test", &[AUD]));
    req.metadata_mut()
        .insert("grpc-timeout", "10S".parse().unwrap());
    assert!(
        rt.block_on(api.sign_token(req)).is_ok(),
        "a deadline in the future is fine"
    );
}

#[test]
fn the_gateway_rides_out_a_key_service_outage_then_stops_serving_stale_keys() {
    let dir = tempfile::tempdir().unwrap();
    let kek = write_kek(dir.path());
    let gw_port = free_port();
    let issuer = format!("http://127.0.0.1:{gw_port}/");
    let mut kms = Kms::start(
        &dir.path().join("data"),
        &kek,
        &issuer,
        &["--algorithm", "ES256"],
    );
    let gw = Gateway::start_on(
        gw_port,
        kms.port,
        dir.path(),
        &["--refresh-interval", "1s", "--max-stale", "8s"],
    );
    let before = http_get(&gw.url("/openid/v1/jwks"), &[]);
    assert_eq!(before.status, 200);
    let discovery_before = http_get(&gw.url("/.well-known/openid-configuration"), &[]);
    assert_eq!(discovery_before.status, 200);

    kms.proc.kill();
    // Not ready while it cannot refresh, but still serving the last good key set.
    eventually(Duration::from_secs(10), || {
        (http_get(&gw.url("/readyz"), &[]).status == 503).then_some(())
    })
    .expect("readiness drops while the key service is down");
    assert_eq!(
        http_get(&gw.url("/healthz"), &[]).status,
        200,
        "still alive"
    );
    // Within --max-stale both documents are still the last good ones, byte for byte.
    let during = http_get(&gw.url("/openid/v1/jwks"), &[]);
    assert_eq!(during.status, 200, "serves the last good key set");
    assert_eq!(
        during.body, before.body,
        "the last good key set, never an empty one"
    );
    assert_eq!(during.header("etag"), before.header("etag"));
    // Caches are told to keep it only for what is left of the hint: it counts down as the set
    // ages, so no relying party holds it longer after it was fetched than the key service allows.
    let max_age = |r: &HttpResponse| -> u64 {
        let cc = r.header("cache-control").unwrap();
        cc.strip_prefix("public, max-age=")
            .unwrap()
            .parse()
            .unwrap()
    };
    // The hint is 300 s (the default --prepublish is longer), less the copy's age, rounded up.
    let first = max_age(&before);
    assert!((290..=300).contains(&first), "{first}");
    eventually(Duration::from_secs(5), || {
        let r = http_get(&gw.url("/openid/v1/jwks"), &[]);
        (r.status == 200 && max_age(&r) < first).then_some(())
    })
    .expect("max-age counts down while the set ages");
    let discovery = http_get(&gw.url("/.well-known/openid-configuration"), &[]);
    assert_eq!(
        (discovery.status, discovery.body),
        (200, discovery_before.body)
    );
    // Past --max-stale: 503, never an empty or stale set.
    let stale = eventually(Duration::from_secs(15), || {
        let r = http_get(&gw.url("/openid/v1/jwks"), &[]);
        (r.status == 503).then_some(r)
    })
    .expect("503 once the key set is older than --max-stale");
    assert!(
        String::from_utf8_lossy(&stale.body).contains("older than --max-stale"),
        "says why: {}",
        String::from_utf8_lossy(&stale.body)
    );
    let told = eventually(Duration::from_secs(5), || {
        let log = gw.proc.log_text();
        log.contains("older than --max-stale; the documents answer 503")
            .then_some(())
    });
    assert!(
        told.is_some(),
        "the switch is logged: {}",
        gw.proc.log_text()
    );
    // Paths that were never ours are still 404, and other methods on ours 405.
    assert_eq!(http_get(&gw.url("/favicon.ico"), &[]).status, 404);
    assert_eq!(http("DELETE", &gw.url("/openid/v1/jwks"), &[]).status, 405);
    // ...and counted under the JWKS path, where alerts look for it.
    let metrics = String::from_utf8(http_get(&gw.url("/metrics"), &[]).body).unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("oidc_gateway_http_responses_total")
                && l.contains("path=\"/openid/v1/jwks\"")
                && l.contains("status=\"503\"")),
        "{metrics}"
    );

    // The key service comes back on the same port: the gateway recovers by itself.
    kms.restart_after_kill();
    eventually(Duration::from_secs(20), || {
        (http_get(&gw.url("/readyz"), &[]).status == 200).then_some(())
    })
    .expect("ready again");
    let after = http_get(&gw.url("/openid/v1/jwks"), &[]);
    assert_eq!((after.status, after.body), (200, before.body));
}

#[test]
fn every_signature_and_rotation_leaves_an_audit_record_without_the_token() {
    let stack = Stack::start("/", &["--algorithm", "ES256"]);
    let t = stack
        .kms
        .sign(sign_request(
            "system:serviceaccount:ns:audited",
            &["aud-1", "aud-2"],
        ))
        .unwrap();
    let refused = stack.kms.sign(sign_request("", &[AUD])).unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    let r = stack.kms.rotate(0).unwrap();
    let log = eventually(Duration::from_secs(10), || {
        let log = plain_log(&stack.kms.proc.log_text());
        log.contains(&format!("kid={}", r.new_key_id))
            .then_some(log)
    })
    .expect("the rotation is audited");
    // The audiences as a JSON array (an audience may hold a comma), quoted like any text field.
    assert!(
        stack
            .kms
            .proc
            .log_text()
            .contains(r#"aud="[\"aud-1\",\"aud-2\"]""#),
        "{log}"
    );
    let audit: Vec<&str> = log.lines().filter(|l| l.contains("audit")).collect();
    let signed = audit
        .iter()
        .find(|l| l.contains("sub=system:serviceaccount:ns:audited"))
        .unwrap_or_else(|| panic!("no audit record of the signature: {log}"));
    for field in [
        format!("kid={}", t.key_id),
        format!("jti={}", t.token_id),
        format!("exp={}", t.expires_at),
        "outcome=ok".into(),
        "rpc=oidckms.v1.KeyService/SignToken".into(),
        "caller=unauthenticated@127.0.0.1".into(),
    ] {
        assert!(signed.contains(&field), "missing {field}: {signed}");
    }
    // Its time is the line's own timestamp (RFC 3339, UTC), and each call has exactly one record.
    assert!(
        signed
            .get(..4)
            .is_some_and(|y| y.bytes().all(|b| b.is_ascii_digit()))
            && signed.get(10..11) == Some("T")
            && signed.contains("Z "),
        "timestamped: {signed}"
    );
    assert_eq!(
        audit
            .iter()
            .filter(|l| l.contains(&format!("jti={}", t.token_id)))
            .count(),
        1,
        "one record per signature: {log}"
    );
    assert!(
        audit.iter().any(|l| l.contains("outcome=INVALID_ARGUMENT")),
        "{log}"
    );
    assert!(
        audit
            .iter()
            .any(|l| l.contains("RotateKeys") && l.contains(&format!("kid={}", r.new_key_id))),
        "{log}"
    );
    let signature = t.token.rsplit('.').next().unwrap();
    assert!(
        !log.contains(signature) && !log.contains(&t.token),
        "the token is never logged"
    );
}

/// The log without colour codes and quotes, so fields read as `name=value`.
fn plain_log(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else if c != '"' {
            out.push(c);
        }
    }
    out
}
