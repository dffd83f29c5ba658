//! The issuer end to end (issue #2): real `oidc-kms` and `oidc-gateway` processes on loopback, tokens
//! verified by `jsonwebtoken` against the JWKS fetched through discovery.

mod common;

use std::time::Duration;

use base64::Engine as _;
use common::*;
use oidc_kms::grpc::pb;
use serde_json::json;

fn struct_claims(value: serde_json::Value) -> prost_types::Struct {
    fn to_value(v: serde_json::Value) -> prost_types::Value {
        use prost_types::value::Kind;
        let kind = match v {
            serde_json::Value::Null => Kind::NullValue(0),
            serde_json::Value::Bool(b) => Kind::BoolValue(b),
            serde_json::Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap()),
            serde_json::Value::String(s) => Kind::StringValue(s),
            serde_json::Value::Array(a) => Kind::ListValue(prost_types::ListValue {
                values: a.into_iter().map(to_value).collect(),
            }),
            serde_json::Value::Object(o) => Kind::StructValue(prost_types::Struct {
                fields: o.into_iter().map(|(k, v)| (k, to_value(v))).collect(),
            }),
        };
        prost_types::Value { kind: Some(kind) }
    }
    match to_value(value).kind {
        Some(prost_types::value::Kind::StructValue(s)) => s,
        _ => panic!("claims must be an object"),
    }
}

#[test]
fn fresh_store_signs_tokens_that_verify_against_the_published_jwks() {
    let stack = Stack::start("/", &[]);
    let (discovery, jwks) = stack.fetch_jwks();
    assert_eq!(discovery["issuer"], stack.kms.issuer);
    assert_eq!(
        discovery["jwks_uri"],
        format!("{}openid/v1/jwks", stack.kms.issuer)
    );
    assert_eq!(discovery["response_types_supported"], json!(["id_token"]));
    assert_eq!(discovery["subject_types_supported"], json!(["public"]));
    assert_eq!(
        discovery["id_token_signing_alg_values_supported"],
        json!(["RS256"])
    );

    let keys = jwks["keys"].as_array().unwrap();
    assert_eq!(keys.len(), 1, "a fresh store publishes one key");
    let k = &keys[0];
    assert_eq!(
        (k["kty"].as_str(), k["use"].as_str(), k["alg"].as_str()),
        (Some("RSA"), Some("sig"), Some("RS256"))
    );
    assert_eq!(k["e"], "AQAB");
    let n = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(k["n"].as_str().unwrap())
        .expect("n is unpadded base64url");
    assert_eq!(n.len(), 256, "RSA-2048 modulus, no leading zero byte");
    assert_ne!(n[0], 0);

    let mut req = sign_request("system:serviceaccount:default:app", &[AUD]);
    req.claims = Some(struct_claims(
        json!({"kubernetes.io": {"namespace": "default", "pod": {"name": "p"}}}),
    ));
    let signed = stack.kms.sign(req).unwrap();
    let claims = verify(&signed.token, &jwks, &stack.kms.issuer, AUD).expect("verifies");
    assert_eq!(claims["iss"], stack.kms.issuer);
    assert_eq!(claims["sub"], "system:serviceaccount:default:app");
    assert_eq!(claims["aud"], json!([AUD]), "aud is always an array");
    assert_eq!(claims["kubernetes.io"]["namespace"], "default");
    let (iat, exp) = (
        claims["iat"].as_i64().unwrap(),
        claims["exp"].as_i64().unwrap(),
    );
    assert_eq!(exp - iat, 3600, "default lifetime is one hour");
    assert_eq!(claims["nbf"].as_i64(), Some(iat));
    assert_eq!(signed.expires_at, exp);
    let (header, _) = token_parts(&signed.token);
    assert_eq!(
        header,
        json!({"alg": "RS256", "kid": k["kid"], "typ": "JWT"})
    );
    assert_eq!(signed.key_id, k["kid"]);

    let other = stack.kms.sign_simple();
    assert_ne!(
        token_parts(&other.token).1["jti"],
        claims["jti"],
        "jti is unique per token"
    );
}

#[test]
fn kid_is_the_sha256_of_the_spki_and_survives_restart() {
    let mut stack = Stack::start("/", &[]);
    let before = stack.kms.kids();
    let list = stack.kms.list_keys();
    assert_eq!(list.keys.len(), 1);
    assert_eq!(list.keys[0].state(), pb::KeyState::Active);
    stack.kms.restart();
    assert_eq!(
        stack.kms.kids(),
        before,
        "same keys, same kids after restart"
    );
    // The kid is the SHA-256 of the DER SPKI rebuilt independently from n and e.
    let (_, jwks) = stack.fetch_jwks();
    let k = &jwks["keys"][0];
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let n = b64.decode(k["n"].as_str().unwrap()).unwrap();
    let e = b64.decode(k["e"].as_str().unwrap()).unwrap();
    let spki = rsa_spki_der(&n, &e);
    let kid = b64.encode(ring::digest::digest(&ring::digest::SHA256, &spki));
    assert_eq!(k["kid"], kid);
}

/// DER SPKI for an RSA key, written out here independently of the service's encoder.
fn rsa_spki_der(n: &[u8], e: &[u8]) -> Vec<u8> {
    use rsa::pkcs8::EncodePublicKey as _;
    let key = rsa::RsaPublicKey::new(
        rsa::BigUint::from_bytes_be(n),
        rsa::BigUint::from_bytes_be(e),
    )
    .unwrap();
    key.to_public_key_der().unwrap().as_bytes().to_vec()
}

#[test]
fn rotation_follows_aks_rules_through_the_gateway() {
    let stack = Stack::start("/", &[]);
    let t1 = stack.kms.sign_simple();
    let kid1 = t1.key_id.clone();

    let r = stack.kms.rotate(0).unwrap();
    let kid2 = r.active_key_id.clone();
    assert_ne!(kid2, kid1);
    let t2 = stack.kms.sign_simple();
    assert_eq!(t2.key_id, kid2, "the new key signs at once");
    let jwks = stack.wait_for_gateway_kids(&[kid1.clone(), kid2.clone()]);
    verify(&t1.token, &jwks, &stack.kms.issuer, AUD)
        .expect("old token verifies after one rotation");
    verify(&t2.token, &jwks, &stack.kms.issuer, AUD).expect("new token verifies");

    let r = stack.kms.rotate(0).unwrap();
    let kid3 = r.active_key_id.clone();
    let mut want = vec![kid2.clone(), kid3.clone()];
    want.sort();
    assert_eq!(
        stack.kms.kids(),
        want,
        "rotating twice retires the oldest key at once"
    );
    let jwks = stack.wait_for_gateway_kids(&want);
    let err = verify(&t1.token, &jwks, &stack.kms.issuer, AUD).unwrap_err();
    assert!(err.contains("not in JWKS"), "{err}");
    verify(&t2.token, &jwks, &stack.kms.issuer, AUD).expect("key2's token still verifies");
}

#[test]
fn issuer_with_a_path_serves_under_that_path() {
    for path in ["/tenant/a", "/tenant/a/"] {
        let stack = Stack::start(path, &[]);
        let (discovery, jwks) = stack.fetch_jwks();
        assert_eq!(
            discovery["jwks_uri"],
            format!("http://127.0.0.1:{}/tenant/a/openid/v1/jwks", stack.gw.port)
        );
        let t = stack.kms.sign_simple();
        verify(&t.token, &jwks, &stack.kms.issuer, AUD).unwrap();
        assert_eq!(http_get(&stack.gw.url("/openid/v1/jwks"), &[]).status, 404);
    }
}

#[test]
fn bad_requests_get_invalid_argument_naming_the_field() {
    let stack = Stack::start("/", &[]);
    let cases: Vec<(pb::SignTokenRequest, &str)> = vec![
        (
            pb::SignTokenRequest {
                lifetime_seconds: 90_000,
                ..sign_request("s", &[AUD])
            },
            "lifetime_seconds",
        ),
        (
            pb::SignTokenRequest {
                claims: Some(struct_claims(json!({"iss": "https://evil.example/"}))),
                ..sign_request("s", &[AUD])
            },
            "claims.iss",
        ),
        (sign_request("", &[AUD]), "subject"),
        (sign_request("s", &[]), "audiences"),
        (sign_request("s", &[""]), "audiences[0]"),
        (
            pb::SignTokenRequest {
                lifetime_seconds: -5,
                ..sign_request("s", &[AUD])
            },
            "lifetime_seconds",
        ),
    ];
    for (req, field) in cases {
        let status = stack.kms.sign(req).unwrap_err();
        assert_eq!(
            status.code(),
            tonic::Code::InvalidArgument,
            "{field}: {status:?}"
        );
        assert!(
            status.message().starts_with(field),
            "{field}: {}",
            status.message()
        );
    }
    let status = stack
        .kms
        .sign(pb::SignTokenRequest {
            lifetime_seconds: 90_000,
            ..sign_request("s", &[AUD])
        })
        .unwrap_err();
    assert!(
        status.message().contains("86400"),
        "states the maximum: {}",
        status.message()
    );
    // A pre-publication lead shorter than twice the JWKS cache lifetime (300 s here), longer than
    // 30 days, or negative is refused, and no key is made.
    let kids = stack.kms.kids();
    for (lead, says) in [
        (10, "at least 600 s"),
        (599, "at least 600 s"),
        (31 * 86_400, "30 days"),
        (-1, "negative"),
    ] {
        let status = stack.kms.rotate(lead).unwrap_err();
        assert_eq!(
            status.code(),
            tonic::Code::InvalidArgument,
            "{lead}: {status:?}"
        );
        assert!(
            status.message().starts_with("prepublish_seconds") && status.message().contains(says),
            "{lead}: {}",
            status.message()
        );
    }
    assert_eq!(stack.kms.kids(), kids);
    // A lifetime at the maximum is fine, and exact.
    let t = stack
        .kms
        .sign(pb::SignTokenRequest {
            lifetime_seconds: 86_400,
            ..sign_request("s", &[AUD])
        })
        .unwrap();
    let (_, claims) = token_parts(&t.token);
    assert_eq!(
        claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap(),
        86_400
    );
}

#[test]
fn gateway_speaks_http_the_way_verifiers_expect() {
    let stack = Stack::start("/", &[]);
    let jwks_url = stack.gw.url("/openid/v1/jwks");
    let get = http_get(&jwks_url, &[]);
    assert_eq!(get.status, 200);
    assert!(
        get.header("content-type")
            .unwrap()
            .starts_with("application/jwk-set+json")
    );
    let cc = get.header("cache-control").unwrap();
    let max_age: u64 = cc.split("max-age=").nth(1).unwrap().parse().unwrap();
    assert!(cc.contains("public") && max_age <= 300, "{cc}");
    let etag = get.header("etag").unwrap().to_owned();

    let head = http("HEAD", &jwks_url, &[]);
    assert_eq!(head.status, 200);
    assert!(head.body.is_empty());
    assert_eq!(head.header("content-type"), get.header("content-type"));
    assert_eq!(head.header("etag"), Some(etag.as_str()));

    for method in ["POST", "PUT", "DELETE"] {
        let r = http(method, &jwks_url, &[]);
        assert_eq!(r.status, 405, "{method}");
        assert_eq!(r.header("allow"), Some("GET, HEAD"));
    }
    for accept in ["text/html", "application/xml", "*/*"] {
        assert_eq!(
            http_get(&jwks_url, &[("Accept", accept)]).status,
            200,
            "{accept}"
        );
    }
    assert_eq!(http_get(&jwks_url, &[("If-None-Match", &etag)]).status, 304);
    assert_eq!(
        http_get(&jwks_url, &[("If-None-Match", "\"other\"")]).status,
        200
    );
    assert_eq!(http_get(&stack.gw.url("/no/such/path"), &[]).status, 404);
    let disc = http_get(&stack.gw.url("/.well-known/openid-configuration"), &[]);
    assert!(
        disc.header("content-type")
            .unwrap()
            .starts_with("application/json")
    );
    // The jwks_uri comes from the configured issuer, never from the Host header.
    let spoofed = http_get(
        &stack.gw.url("/.well-known/openid-configuration"),
        &[("Host", "evil.example")],
    );
    let doc: serde_json::Value = serde_json::from_slice(&spoofed.body).unwrap();
    assert_eq!(
        doc["jwks_uri"],
        format!("{}openid/v1/jwks", stack.kms.issuer)
    );

    // The ETag changes exactly when the key set does.
    assert_eq!(http_get(&jwks_url, &[]).header("etag"), Some(etag.as_str()));
    let r = stack.kms.rotate(0).unwrap();
    let mut kids = vec![r.active_key_id];
    kids.extend(
        r.keys
            .iter()
            .filter(|k| k.state() == pb::KeyState::Previous)
            .map(|k| k.key_id.clone()),
    );
    stack.wait_for_gateway_kids(&kids);
    let after = http_get(&jwks_url, &[("If-None-Match", &etag)]);
    assert_eq!(after.status, 200);
    assert_ne!(after.header("etag"), Some(etag.as_str()));
}

#[test]
fn sigterm_exits_cleanly_and_a_second_process_on_the_same_store_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let kek = write_kek(dir.path());
    let data = dir.path().join("data");
    let mut kms = Kms::start(&data, &kek, "https://issuer.example/", &[]);
    let port = free_port();
    let mut second = Proc::spawn(
        kms_bin(),
        &kms_args(port, &data, &kek, "https://issuer.example/", &[]),
        dir.path().join("second.log"),
        None,
    );
    let status = wait_exit(&mut second.child, Duration::from_secs(20)).expect("refused promptly");
    assert!(!status.success());
    assert!(
        second.log_text().contains("another oidc-kms process"),
        "{}",
        second.log_text()
    );
    assert!(kms.proc.terminate().success());
}
