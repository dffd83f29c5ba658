//! The key lifecycle with the real binaries (issue #3): a scheduled rotation seen through the
//! gateway, EC algorithms verified from the JWKS alone, an algorithm change, concurrent rotations.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::*;
use oidc_kms::grpc::pb;

#[test]
fn scheduled_rotation_goes_next_active_previous_gone_in_the_gateway_jwks() {
    // Period 8 s, pre-publication 2 s, tokens live at most 5 s.
    let stack = Stack::start(
        "/",
        &[
            "--algorithm",
            "ES256",
            "--rotation-period",
            "8s",
            "--prepublish",
            "2s",
            "--max-token-lifetime",
            "5s",
        ],
    );
    let first = stack.kms.sign_simple();
    let k1 = first.key_id.clone();
    let (_, jwks) = stack.fetch_jwks();
    verify(&first.token, &jwks, &stack.kms.issuer, AUD).expect("k1's token verifies");

    // The next key appears in the gateway's JWKS while k1 still signs.
    let k2 = eventually(Duration::from_secs(20), || {
        let list = stack.kms.list_keys();
        list.keys
            .iter()
            .find(|k| k.state() == pb::KeyState::Next)
            .map(|k| k.key_id.clone())
    })
    .expect("a next key is pre-published");
    let jwks = stack.wait_for_gateway_kids(&[k1.clone(), k2.clone()]);
    let while_next = stack.kms.sign_simple();
    let listed = stack.kms.list_keys();
    if listed
        .keys
        .iter()
        .any(|k| k.key_id == k2 && k.state() == pb::KeyState::Next)
    {
        assert_eq!(while_next.key_id, k1, "a next key does not sign");
    }
    verify(&while_next.token, &jwks, &stack.kms.issuer, AUD)
        .expect("a token signed while k2 is next verifies");

    // Then k2 signs, and its token verifies against the JWKS the gateway already served.
    let second = eventually(Duration::from_secs(20), || {
        let t = stack.kms.sign_simple();
        (t.key_id == k2).then_some(t)
    })
    .expect("the next key becomes active");
    verify(&second.token, &jwks, &stack.kms.issuer, AUD)
        .expect("a token of the new key verifies against the JWKS fetched before it signed");

    // k1 stops signing but stays published as previous: the gateway serves both keys, and k1's
    // last token still verifies against what it serves now.
    let states: Vec<_> = stack
        .kms
        .list_keys()
        .keys
        .into_iter()
        .map(|k| (k.key_id.clone(), k.state()))
        .collect();
    assert!(
        states.contains(&(k1.clone(), pb::KeyState::Previous))
            && states.contains(&(k2.clone(), pb::KeyState::Active)),
        "{states:?}"
    );
    let jwks = stack.wait_for_gateway_kids(&[k1.clone(), k2.clone()]);
    if while_next.key_id == k1 {
        verify(&while_next.token, &jwks, &stack.kms.issuer, AUD)
            .expect("k1's token verifies after k1 stopped signing");
    }

    // After the max lifetime it leaves the gateway's JWKS, and its sealed record leaves the store.
    eventually(Duration::from_secs(20), || {
        let (_, jwks) = stack.fetch_jwks();
        (!jwks_kids(&jwks).contains(&k1)).then_some(())
    })
    .expect("the old key leaves the gateway's JWKS");
    let erased = eventually(Duration::from_secs(10), || {
        let text = std::fs::read(stack.kms.data_dir.join("keyring.json")).ok()?;
        let file: serde_json::Value = serde_json::from_slice(&text).ok()?;
        let kids = |list: &str| -> Vec<String> {
            file[list]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|k| k["kid"].as_str().map(str::to_owned))
                .collect()
        };
        (!kids("keys").contains(&k1) && kids("retired").contains(&k1)).then_some(())
    });
    assert!(
        erased.is_some(),
        "k1's sealed key is erased from keyring.json; only its record stays, in the history"
    );
    let listed = stack.kms.list_keys();
    assert!(
        listed
            .keys
            .iter()
            .any(|k| k.key_id == k1 && k.state() == pb::KeyState::Retired),
        "ListKeys shows k1 as retired: {listed:?}"
    );
    // And the cache hint keeps relying parties within half the pre-publication lead.
    // (1 s, half the 2 s lead, less the age of the gateway's copy.)
    let cc = http_get(&stack.gw.url("/openid/v1/jwks"), &[]);
    let cc = cc.header("cache-control").unwrap();
    let max_age: u64 = cc
        .strip_prefix("public, max-age=")
        .unwrap()
        .parse()
        .unwrap();
    assert!(max_age <= 1, "{cc}");
}

#[test]
fn ec_services_issue_tokens_that_verify_from_the_jwks_alone() {
    for (alg, crv, sig_len) in [("ES256", "P-256", 64), ("ES384", "P-384", 96)] {
        let stack = Stack::start("/", &["--algorithm", alg]);
        let (discovery, jwks) = stack.fetch_jwks();
        assert_eq!(
            discovery["id_token_signing_alg_values_supported"],
            serde_json::json!([alg])
        );
        let k = &jwks["keys"][0];
        assert_eq!(
            (k["kty"].as_str(), k["crv"].as_str(), k["alg"].as_str()),
            (Some("EC"), Some(crv), Some(alg))
        );
        assert!(k.get("n").is_none());
        let t = stack.kms.sign_simple();
        let sig = t.token.rsplit('.').next().unwrap();
        let sig =
            base64::Engine::decode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, sig).unwrap();
        assert_eq!(sig.len(), sig_len, "{alg}: JOSE r||s, not DER");
        verify(&t.token, &jwks, &stack.kms.issuer, AUD).unwrap_or_else(|e| panic!("{alg}: {e}"));
    }
}

#[test]
fn larger_rsa_keys_issue_tokens_that_verify_from_the_jwks_alone() {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    for bits in [3072usize, 4096] {
        let stack = Stack::start("/", &["--rsa-bits", &bits.to_string()]);
        let (_, jwks) = stack.fetch_jwks();
        let k = &jwks["keys"][0];
        assert_eq!(
            (k["kty"].as_str(), k["alg"].as_str()),
            (Some("RSA"), Some("RS256"))
        );
        let n = b64.decode(k["n"].as_str().unwrap()).unwrap();
        assert_eq!(n.len(), bits / 8, "{bits}: the modulus, no leading zero");
        let t = stack.kms.sign_simple();
        let sig = b64.decode(t.token.rsplit('.').next().unwrap()).unwrap();
        assert_eq!(sig.len(), bits / 8);
        verify(&t.token, &jwks, &stack.kms.issuer, AUD).unwrap_or_else(|e| panic!("{bits}: {e}"));
    }
}

#[test]
fn algorithm_change_applies_at_the_next_rotation_and_rotations_can_race() {
    let dir = tempfile::tempdir().unwrap();
    let kek = write_kek(dir.path());
    let data = dir.path().join("data");
    let gw_port = free_port();
    let issuer = format!("http://127.0.0.1:{gw_port}/");
    let mut kms = Kms::start(&data, &kek, &issuer, &[]);
    let rs = kms.sign_simple();
    assert_eq!(token_parts(&rs.token).0["alg"], "RS256");
    assert!(kms.proc.terminate().success());

    let kms = Kms::start(&data, &kek, &issuer, &["--algorithm", "ES256"]);
    let gw = Gateway::start_on(gw_port, kms.port, dir.path(), &["--refresh-interval", "1s"]);
    assert_eq!(
        token_parts(&kms.sign_simple().token).0["alg"],
        "RS256",
        "still RS256 until the next rotation"
    );
    kms.rotate(0).unwrap();
    let es = kms.sign_simple();
    assert_eq!(token_parts(&es.token).0["alg"], "ES256");
    let discovery = eventually(Duration::from_secs(20), || {
        let r = http_get(&gw.url("/.well-known/openid-configuration"), &[]);
        let d: serde_json::Value = serde_json::from_slice(&r.body).ok()?;
        (d["id_token_signing_alg_values_supported"].as_array()?.len() == 2).then_some(d)
    })
    .expect("discovery lists both algorithms during the overlap");
    assert_eq!(
        discovery["id_token_signing_alg_values_supported"],
        serde_json::json!(["RS256", "ES256"])
    );
    let jwks: serde_json::Value =
        serde_json::from_slice(&http_get(&gw.url("/openid/v1/jwks"), &[]).body).unwrap();
    verify(&rs.token, &jwks, &issuer, AUD).expect("RS256 token still verifies");
    verify(&es.token, &jwks, &issuer, AUD).expect("ES256 token verifies");

    // Eight rotations at once, while signing continues.
    let endpoint = format!("http://127.0.0.1:{}", kms.port);
    let results: Vec<Result<String, String>> = std::thread::scope(|s| {
        let rotations: Vec<_> = (0..8)
            .map(|_| {
                let endpoint = endpoint.clone();
                s.spawn(move || {
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .unwrap();
                    rt.block_on(async {
                        let mut c = pb::key_service_client::KeyServiceClient::connect(endpoint)
                            .await
                            .map_err(|e| e.to_string())?;
                        c.rotate_keys(pb::RotateKeysRequest {
                            prepublish_seconds: 0,
                        })
                        .await
                        .map(|r| r.into_inner().new_key_id)
                        .map_err(|e| e.to_string())
                    })
                })
            })
            .collect();
        let signing = s.spawn(|| {
            (0..20)
                .map(|_| kms.sign(sign_request("s", &[AUD])).is_ok())
                .collect::<Vec<_>>()
        });
        let signed = signing.join().unwrap();
        assert!(
            signed.iter().all(|ok| *ok),
            "SignToken kept answering: {signed:?}"
        );
        rotations.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let new_kids: Vec<String> = results
        .into_iter()
        .map(|r| r.expect("every rotation succeeds"))
        .collect();
    assert_eq!(
        new_kids.iter().collect::<HashSet<_>>().len(),
        8,
        "eight distinct new keys"
    );
    let kids = kms.kids();
    assert_eq!(
        kids.len(),
        2,
        "after back-to-back rotations: the last key and its predecessor, {kids:?}"
    );
    assert!(kids.iter().all(|k| new_kids.contains(k)));
    let mut kms = kms;
    kms.restart();
    assert_eq!(kms.kids(), kids, "the store reopens with the same keys");
}
