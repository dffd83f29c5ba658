//! Criterion micro-benchmarks of the hot paths, one thread, no I/O: the claims of a token encoded
//! after its precomputed header, one signature per algorithm, a token request checked and a
//! `jti` drawn, and the gateway's documents rendered for a key set. `cargo bench` runs them; CI
//! only compiles them (`cargo clippy --all-targets`). The end-to-end figures are
//! `oidc-kms-bench`'s (see BENCHMARKS.md).

use std::hint::black_box;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, criterion_main};
use oidc_kms::gateway::Documents;
use oidc_kms::jwk::Jwk;
use oidc_kms::keys::{KeySpec, Signer as _, SoftwareKey};
use oidc_kms::token::{self, Claims, TokenRequest};
use serde_json::{Map, Value, json};

const ISSUER: &str = "https://issuer.example.com/";

/// Extra claims like kube-apiserver's.
fn kubernetes_claims() -> Map<String, Value> {
    let Value::Object(map) = json!({
        "kubernetes.io": {
            "namespace": "default",
            "serviceaccount": {"name": "app", "uid": "5f0c2c5e-8f39-4b4e-9b7c-2f1f6b2b7a11"}
        }
    }) else {
        unreachable!("an object")
    };
    map
}

fn request() -> TokenRequest {
    TokenRequest {
        subject: "system:serviceaccount:default:app".into(),
        audiences: vec!["api://AzureADTokenExchange".into()],
        lifetime: Some(Duration::from_secs(3600)),
        extra_claims: kubernetes_claims(),
    }
}

fn signing_input(header: &str, request: &TokenRequest, jti: &str) -> String {
    let claims = Claims {
        iss: ISSUER,
        sub: &request.subject,
        aud: &request.audiences,
        iat: 1_700_000_000,
        nbf: 1_700_000_000,
        exp: 1_700_003_600,
        jti,
        extra: &request.extra_claims,
    };
    token::signing_input(header, &claims)
}

fn claims(c: &mut Criterion) {
    let header = token::encoded_header("RS256", "kid-of-forty-three-characters-aaaaaaaaaaaaa");
    let request = request();
    let rng = ring::rand::SystemRandom::new();
    c.bench_function("claims/signing_input", |b| {
        b.iter(|| signing_input(black_box(&header), black_box(&request), "jti"))
    });
    c.bench_function("claims/validate_request", |b| {
        b.iter(|| black_box(&request).validate(Duration::from_secs(86_400)))
    });
    c.bench_function("claims/new_jti", |b| b.iter(|| token::new_jti(&rng)));
}

fn signing(c: &mut Criterion) {
    let mut group = c.benchmark_group("sign");
    for spec in [KeySpec::Rsa(2048), KeySpec::P256] {
        // One key per algorithm, made before any timing.
        let (key, _pkcs8) = SoftwareKey::generate(spec).unwrap();
        let header = token::encoded_header(spec.jws_algorithm(), key.kid());
        let input = signing_input(&header, &request(), "00000000-0000-4000-8000-000000000000");
        group.bench_with_input(
            BenchmarkId::from_parameter(spec.jws_algorithm()),
            &input,
            |b, input| b.iter(|| key.sign(black_box(input.as_bytes())).unwrap()),
        );
    }
    group.finish();
}

fn jwks(c: &mut Criterion) {
    let keys: Vec<Jwk> = [KeySpec::Rsa(2048), KeySpec::Rsa(2048), KeySpec::P256]
        .into_iter()
        .map(|spec| Jwk::from_public_key(SoftwareKey::generate(spec).unwrap().0.public_key()))
        .collect();
    c.bench_function("jwks/render_3_keys", |b| {
        b.iter(|| {
            Documents::render(
                black_box(ISSUER),
                black_box(keys.clone()),
                Duration::from_secs(300),
            )
            .unwrap()
        })
    });
}

mod group {
    criterion::criterion_group!(benches, super::claims, super::signing, super::jwks);
}
criterion_main!(group::benches);
