//! The two public documents, rendered once per key set: the discovery document and the JWKS, each
//! with its ETag, so a request costs a lookup and a copy of prepared bytes.

use std::time::Duration;

use bytes::Bytes;
use http::HeaderValue;
use ring::digest::{SHA256, digest};
use serde::Serialize;

use crate::issuer::Issuer;
use crate::jwk::Jwk;
use crate::token::b64url;

/// One rendered document.
#[derive(Debug, Clone)]
pub struct Document {
    /// The request path it is served at.
    pub path: String,
    /// Its bytes.
    pub body: Bytes,
    /// A strong ETag over the bytes.
    pub etag: String,
    /// Its media type.
    pub content_type: &'static str,
}

impl Document {
    fn new(path: String, body: Vec<u8>, content_type: &'static str) -> Self {
        let etag = format!("\"{}\"", b64url(&digest(&SHA256, &body).as_ref()[..16]));
        Document {
            path,
            body: Bytes::from(body),
            etag,
            content_type,
        }
    }
}

/// The discovery document and JWKS of one key set.
#[derive(Debug, Clone)]
pub struct Documents {
    /// `{issuer}/.well-known/openid-configuration`.
    pub discovery: Document,
    /// `{issuer}/openid/v1/jwks`.
    pub jwks: Document,
    /// The `Cache-Control` values for both, by seconds left: `[0]` is `max-age=0`, the last is the
    /// key service's full cache hint. See [`Documents::cache_control`].
    cache_controls: Vec<HeaderValue>,
    /// The kids served, oldest first.
    pub kids: Vec<String>,
}

#[derive(Serialize)]
struct Discovery<'a> {
    issuer: &'a str,
    jwks_uri: String,
    response_types_supported: [&'static str; 1],
    subject_types_supported: [&'static str; 1],
    id_token_signing_alg_values_supported: Vec<&'a str>,
}

#[derive(Serialize)]
struct JwkSet<'a> {
    keys: &'a [Jwk],
}

/// The longest a relying party is told to cache: short, so a rotation is noticed quickly. The
/// gateway applies the cap itself, whatever hint the key service sends.
pub use crate::key_manager::MAX_CACHE_AGE;

/// Why a key set cannot be served.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DocumentError {
    /// The key service named an issuer we cannot serve.
    #[error("the key service's issuer is not valid: {0}")]
    Issuer(String),
    /// An empty key set would make every token fail: never served.
    #[error("the key service published no keys")]
    NoKeys,
}

impl Documents {
    /// Renders the documents for `issuer` and `keys`; `max_age` is capped at [`MAX_CACHE_AGE`].
    pub fn render(issuer: &str, keys: Vec<Jwk>, max_age: Duration) -> Result<Self, DocumentError> {
        let issuer = Issuer::parse(issuer).map_err(DocumentError::Issuer)?;
        if keys.is_empty() {
            return Err(DocumentError::NoKeys);
        }
        let mut algs: Vec<&str> = Vec::new();
        for k in &keys {
            if !algs.contains(&k.alg.as_str()) {
                algs.push(&k.alg);
            }
        }
        let discovery = serde_json::to_vec(&Discovery {
            issuer: issuer.as_str(),
            jwks_uri: issuer.jwks_url(),
            response_types_supported: ["id_token"],
            subject_types_supported: ["public"],
            id_token_signing_alg_values_supported: algs,
        })
        .expect("discovery serializes");
        let jwks = serde_json::to_vec(&JwkSet { keys: &keys }).expect("JWKS serializes");
        let max_age = max_age.min(MAX_CACHE_AGE).as_secs();
        let cache_controls = (0..=max_age)
            .map(|secs| {
                HeaderValue::try_from(format!("public, max-age={secs}")).expect("ASCII header")
            })
            .collect();
        Ok(Documents {
            discovery: Document::new(issuer.discovery_path(), discovery, "application/json"),
            jwks: Document::new(issuer.jwks_path(), jwks, "application/jwk-set+json"),
            cache_controls,
            kids: keys.into_iter().map(|k| k.kid).collect(),
        })
    }

    /// The `Cache-Control` for documents fetched `age` ago: the cache hint less that age, so no
    /// relying party keeps a key set longer after the key service published it than the hint
    /// allows (a pre-published key then reaches every cache before it signs), however long this
    /// gateway waited between refreshes or has been serving a stale set.
    pub fn cache_control(&self, age: Duration) -> &HeaderValue {
        let full = self.cache_controls.len() - 1;
        // Whole seconds, rounded up: a cache may keep the set to the second it says, never past
        // the hint.
        let age_secs = age.as_secs() + u64::from(age.subsec_nanos() > 0);
        let left = full.saturating_sub(usize::try_from(age_secs).unwrap_or(usize::MAX));
        &self.cache_controls[left]
    }

    /// The document served at `path`, if any.
    pub fn at(&self, path: &str) -> Option<&Document> {
        [&self.discovery, &self.jwks]
            .into_iter()
            .find(|d| d.path == path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jwk(kid: &str, alg: &str) -> Jwk {
        Jwk {
            kty: "EC".into(),
            use_: "sig".into(),
            kid: kid.into(),
            alg: alg.into(),
            n: None,
            e: None,
            crv: Some("P-256".into()),
            x: Some("AA".into()),
            y: Some("AA".into()),
        }
    }

    #[test]
    fn discovery_points_at_the_jwks_under_the_issuer_path() {
        let d = Documents::render(
            "https://issuer.example/t/1",
            vec![jwk("a", "RS256"), jwk("b", "ES256"), jwk("c", "RS256")],
            Duration::from_secs(3600),
        )
        .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&d.discovery.body).unwrap();
        assert_eq!(v["issuer"], "https://issuer.example/t/1");
        assert_eq!(v["jwks_uri"], "https://issuer.example/t/1/openid/v1/jwks");
        assert_eq!(
            v["id_token_signing_alg_values_supported"],
            serde_json::json!(["RS256", "ES256"])
        );
        assert_eq!(d.jwks.path, "/t/1/openid/v1/jwks");
        assert_eq!(d.discovery.path, "/t/1/.well-known/openid-configuration");
        assert_eq!(d.cache_control(Duration::ZERO), "public, max-age=300");
    }

    #[test]
    fn max_age_counts_down_with_the_age_of_the_key_set() {
        let d = Documents::render(
            "https://i.example/",
            vec![jwk("a", "ES256")],
            Duration::from_secs(60),
        )
        .unwrap();
        let at = |secs| {
            d.cache_control(Duration::from_millis(secs))
                .to_str()
                .unwrap()
        };
        assert_eq!(at(0), "public, max-age=60");
        assert_eq!(
            at(1),
            "public, max-age=59",
            "rounded up: never past the hint"
        );
        assert_eq!(at(1_000), "public, max-age=59");
        assert_eq!(at(45_500), "public, max-age=14");
        assert_eq!(at(60_000), "public, max-age=0");
        assert_eq!(
            at(3_600_000),
            "public, max-age=0",
            "stale: revalidate every time"
        );
    }

    #[test]
    fn etag_changes_exactly_when_the_key_set_does() {
        let one = Documents::render("https://i.example/", vec![jwk("a", "ES256")], MAX_CACHE_AGE)
            .unwrap();
        let same = Documents::render("https://i.example/", vec![jwk("a", "ES256")], MAX_CACHE_AGE)
            .unwrap();
        let two = Documents::render(
            "https://i.example/",
            vec![jwk("a", "ES256"), jwk("b", "ES256")],
            MAX_CACHE_AGE,
        )
        .unwrap();
        assert_eq!(one.jwks.etag, same.jwks.etag);
        assert_ne!(one.jwks.etag, two.jwks.etag);
    }

    #[test]
    fn an_empty_key_set_is_never_rendered() {
        assert_eq!(
            Documents::render("https://i.example/", vec![], MAX_CACHE_AGE).unwrap_err(),
            DocumentError::NoKeys
        );
    }
}
