//! One conformance suite for every crypto backend: it compiles against whichever backend the build
//! signs with (ring by default, aws-lc-rs with `--features aws-lc`), as rustls compiles its API
//! tests once per provider. `.ci/run` runs it both ways:
//!
//! ```sh
//! cargo test --test backend_conformance
//! cargo test --features aws-lc --test backend_conformance
//! ```
//!
//! What every backend must do: sign and verify for each key type, in JOSE form and size; keep a
//! key's kid across a PKCS#8 round trip; load keys made by another implementation (OpenSSL) with the
//! kid OpenSSL derives; and, RSA PKCS#1 v1.5 being deterministic, produce the very signature OpenSSL
//! produced for a fixed key and input, byte for byte, so the two backends are interchangeable.
//!
//! The fixtures in `tests/fixtures/` are test-only keys made once with OpenSSL 3:
//!
//! ```sh
//! openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 | openssl pkcs8 -topk8 -nocrypt -outform DER -out rsa2048.pkcs8.der
//! openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 | openssl pkcs8 -topk8 -nocrypt -outform DER -out p256.pkcs8.der
//! printf '%s' "$FIXED_INPUT" | openssl dgst -sha256 -sign <(openssl pkey -inform DER -in rsa2048.pkcs8.der) -out rsa2048.rs256.sig
//! openssl pkey -inform DER -in KEY -pubout -outform DER | openssl dgst -sha256 -binary | basenc --base64url  # kid, '=' dropped
//! ```

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use oidc_kms::jwk::Jwk;
use oidc_kms::keys::crypto::BACKEND;
use oidc_kms::keys::{KeyError, KeySpec, PublicParams, Signer, SoftwareKey, kid_of};
use oidc_kms::token;
use ring::signature::{self, RsaPublicKeyComponents, UnparsedPublicKey};

const RSA2048_PKCS8: &[u8] = include_bytes!("fixtures/rsa2048.pkcs8.der");
const RSA2048_KID: &str = "5O0cKVeE4qc5IfGaHuVi1lkKrfe2eAMg45sb7X5RTk4";
/// OpenSSL's RS256 signature of [`FIXED_INPUT`] under [`RSA2048_PKCS8`].
const RSA2048_RS256_SIG: &[u8] = include_bytes!("fixtures/rsa2048.rs256.sig");
const P256_PKCS8: &[u8] = include_bytes!("fixtures/p256.pkcs8.der");
const P256_KID: &str = "lpujpQv5BfsK8nzTKrPf2DU9OIQzuHFNCcoJP1wf-eE";

/// A JWS signing input: `{"alg":"RS256","kid":"fixture","typ":"JWT"}` . `{"iss":…,"sub":…}`.
const FIXED_INPUT: &str = "eyJhbGciOiJSUzI1NiIsImtpZCI6ImZpeHR1cmUiLCJ0eXAiOiJKV1QifQ.eyJpc3MiOiJodHRwczovL2lzc3Vlci5leGFtcGxlLyIsInN1YiI6InN5c3RlbTpzZXJ2aWNlYWNjb3VudDpkZWZhdWx0OmFwcCJ9";

const ALL_SPECS: [KeySpec; 5] = [
    KeySpec::Rsa(2048),
    KeySpec::Rsa(3072),
    KeySpec::Rsa(4096),
    KeySpec::P256,
    KeySpec::P384,
];

/// The JOSE signature length: the modulus for RSA, r‖s at full curve width for ECDSA.
fn jose_len(spec: KeySpec) -> usize {
    match spec {
        KeySpec::Rsa(bits) => bits as usize / 8,
        KeySpec::P256 => 64,
        KeySpec::P384 => 96,
    }
}

/// Verifies with ring from the public numbers alone, whichever backend signed: a signature made
/// by aws-lc-rs must verify under ring and the other way round.
fn verify(key: &dyn Signer, message: &[u8], sig: &[u8]) -> bool {
    let public = key.public_key();
    match (public.spec(), public.params()) {
        (KeySpec::Rsa(_), PublicParams::Rsa { n, e }) => RsaPublicKeyComponents { n, e }
            .verify(&signature::RSA_PKCS1_2048_8192_SHA256, message, sig)
            .is_ok(),
        (spec, PublicParams::Ec { x, y }) => {
            let alg = if spec == KeySpec::P384 {
                &signature::ECDSA_P384_SHA384_FIXED
            } else {
                &signature::ECDSA_P256_SHA256_FIXED
            };
            let mut point = vec![4u8];
            point.extend_from_slice(x);
            point.extend_from_slice(y);
            UnparsedPublicKey::new(alg, &point)
                .verify(message, sig)
                .is_ok()
        }
        _ => false,
    }
}

/// Verifies a compact JWS with `jsonwebtoken` (RustCrypto) against the key's JWK, as a relying
/// party would: a third implementation, independent of both backends.
fn relying_party_accepts(key: &dyn Signer, jws: &str) -> bool {
    use jsonwebtoken::{Algorithm, DecodingKey, Validation, decode};
    let jwk: jsonwebtoken::jwk::Jwk = serde_json::from_value(
        serde_json::to_value(Jwk::from_public_key(key.public_key())).unwrap(),
    )
    .unwrap();
    let alg = match key.public_key().spec() {
        KeySpec::Rsa(_) => Algorithm::RS256,
        KeySpec::P256 => Algorithm::ES256,
        KeySpec::P384 => Algorithm::ES384,
    };
    let mut validation = Validation::new(alg);
    validation.required_spec_claims.clear();
    validation.validate_exp = false;
    validation.validate_aud = false;
    decode::<serde_json::Value>(jws, &DecodingKey::from_jwk(&jwk).unwrap(), &validation).is_ok()
}

#[test]
fn the_build_signs_with_the_backend_its_features_name() {
    let expected = if cfg!(feature = "aws-lc") {
        "aws-lc-rs"
    } else {
        "ring"
    };
    assert_eq!(BACKEND, expected);
}

#[test]
fn every_key_type_signs_verifies_and_keeps_its_kid_across_pkcs8() {
    for spec in ALL_SPECS {
        let (key, pkcs8) = SoftwareKey::generate(spec).unwrap();
        assert_eq!(key.public_key().spec(), spec);
        assert_eq!(key.kid(), kid_of(key.public_key().spki_der()), "{spec}");

        let header = token::encoded_header(spec.jws_algorithm(), key.kid());
        let input = format!(
            "{header}.{}",
            URL_SAFE_NO_PAD.encode(br#"{"sub":"conformance"}"#)
        );
        let sig = key.sign(input.as_bytes()).unwrap();
        assert_eq!(sig.len(), jose_len(spec), "{spec}: JOSE signature size");
        assert!(verify(&key, input.as_bytes(), &sig), "{spec}: verifies");
        assert!(
            !verify(&key, b"another message", &sig),
            "{spec}: bound to its message"
        );
        let jws = format!("{input}.{}", URL_SAFE_NO_PAD.encode(&sig));
        assert!(relying_party_accepts(&key, &jws), "{spec}: jsonwebtoken");

        let again = SoftwareKey::from_pkcs8(spec, &pkcs8).unwrap();
        assert_eq!(again.kid(), key.kid(), "{spec}: kid survives PKCS#8");
        assert_eq!(again.public_key(), key.public_key());
        let sig = again.sign(input.as_bytes()).unwrap();
        assert!(
            verify(&key, input.as_bytes(), &sig),
            "{spec}: reloaded key signs"
        );
    }
}

#[test]
fn rsa_signatures_are_byte_identical_to_openssl() {
    let key = SoftwareKey::from_pkcs8(KeySpec::Rsa(2048), RSA2048_PKCS8).unwrap();
    assert_eq!(key.kid(), RSA2048_KID, "kid as OpenSSL derives it");
    let sig = key.sign(FIXED_INPUT.as_bytes()).unwrap();
    assert_eq!(sig, RSA2048_RS256_SIG, "{BACKEND} differs from OpenSSL");
    assert_eq!(
        key.sign(FIXED_INPUT.as_bytes()).unwrap(),
        sig,
        "deterministic"
    );
    assert!(verify(&key, FIXED_INPUT.as_bytes(), &sig));
}

#[test]
fn ec_keys_from_another_implementation_load_with_the_same_kid() {
    let key = SoftwareKey::from_pkcs8(KeySpec::P256, P256_PKCS8).unwrap();
    assert_eq!(key.kid(), P256_KID);
    let sig = key.sign(FIXED_INPUT.as_bytes()).unwrap();
    assert_eq!(sig.len(), 64);
    assert!(verify(&key, FIXED_INPUT.as_bytes(), &sig));
    // ECDSA is randomized: a second signature differs and verifies too.
    let other = key.sign(FIXED_INPUT.as_bytes()).unwrap();
    assert_ne!(sig, other);
    assert!(verify(&key, FIXED_INPUT.as_bytes(), &other));
}

#[test]
fn keys_of_another_type_or_size_are_refused() {
    for (spec, pkcs8) in [
        (KeySpec::Rsa(3072), RSA2048_PKCS8),
        (KeySpec::Rsa(4096), RSA2048_PKCS8),
        (KeySpec::P256, RSA2048_PKCS8),
        (KeySpec::P384, P256_PKCS8),
        (KeySpec::Rsa(2048), P256_PKCS8),
        (KeySpec::P256, b"not a key".as_slice()),
    ] {
        assert_eq!(
            SoftwareKey::from_pkcs8(spec, pkcs8).unwrap_err(),
            KeyError::Invalid(spec),
            "{spec}"
        );
    }
}

#[test]
fn debug_output_never_shows_the_private_key() {
    let key = SoftwareKey::from_pkcs8(KeySpec::Rsa(2048), RSA2048_PKCS8).unwrap();
    let text = format!("{key:?}");
    assert!(
        text.contains("[redacted]") && text.contains(RSA2048_KID),
        "{text}"
    );
}
