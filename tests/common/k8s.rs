//! A stand-in for kube-apiserver's external-signer client (KEP-740), honest about what the real one
//! checks: it dials the Unix socket with plaintext gRPC and authority "localhost", reads Metadata,
//! fills a key cache from FetchKeys while applying every rule to the answer (each key parsed as
//! SubjectPublicKeyInfo by RustCrypto's `spki`/`rsa`, not by our code), builds claims the way
//! kube-apiserver does, assembles `header.claims.signature` itself, and verifies the token with
//! `jsonwebtoken` against the cached keys.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use oidc_kms::grpc::{k8s_v1, k8s_v1alpha1};
use rsa::pkcs8::spki::{SubjectPublicKeyInfoRef, der::Decode as _};
use rsa::pkcs8::{DecodePublicKey as _, ObjectIdentifier};
use rsa::traits::PublicKeyParts as _;
use serde_json::{Value, json};
use tonic::Status;
use tonic::transport::{Channel, Endpoint};

const RSA_ENCRYPTION: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.1");
const EC_PUBLIC_KEY: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.2.1");
const P256: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.3.1.7");
const P384: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.132.0.34");
const P521: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.132.0.35");

/// The proto package kube-apiserver calls: `v1alpha1` (1.32–1.33) or `v1` (1.34 and later).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Package {
    V1alpha1,
    V1,
}

pub const PACKAGES: [Package; 2] = [Package::V1alpha1, Package::V1];

enum Client {
    V1alpha1(k8s_v1alpha1::external_jwt_signer_client::ExternalJwtSignerClient<Channel>),
    V1(k8s_v1::external_jwt_signer_client::ExternalJwtSignerClient<Channel>),
}

/// A FetchKeys answer, package-independent.
#[derive(Debug, Clone)]
pub struct RawKeys {
    pub keys: Vec<(String, Vec<u8>, bool)>,
    pub data_timestamp: Option<prost_types::Timestamp>,
    pub refresh_hint_seconds: i64,
}

/// One verification key in the cache.
#[derive(Clone)]
pub struct CachedKey {
    /// The JWS algorithm this key type allows.
    pub alg: Algorithm,
    pub spki_der: Vec<u8>,
    pub exclude_from_oidc_discovery: bool,
    decoding: DecodingKey,
}

/// What kube-apiserver keeps from a FetchKeys answer that passed every rule.
#[derive(Clone)]
pub struct KeyCache {
    pub keys: BTreeMap<String, CachedKey>,
    /// `data_timestamp` as (seconds, nanos).
    pub data_timestamp: (i64, i32),
    pub refresh_hint_seconds: i64,
}

impl KeyCache {
    /// Applies every FetchKeys rule; the error says which one failed.
    pub fn from_response(raw: RawKeys) -> Result<KeyCache, String> {
        if raw.keys.is_empty() {
            return Err("keys is empty".into());
        }
        let ts = raw.data_timestamp.ok_or("data_timestamp is not set")?;
        if ts.seconds <= 0 || !(0..1_000_000_000).contains(&ts.nanos) {
            return Err(format!("data_timestamp {ts:?} is not a valid moment"));
        }
        if raw.refresh_hint_seconds <= 0 {
            return Err(format!(
                "refresh_hint_seconds {} is not above zero",
                raw.refresh_hint_seconds
            ));
        }
        let mut keys = BTreeMap::new();
        for (kid, der, exclude) in raw.keys {
            if kid.is_empty() || kid.len() > 1024 {
                return Err(format!("key_id of {} bytes", kid.len()));
            }
            let (alg, decoding) = parse_spki(&der).map_err(|e| format!("key {kid}: {e}"))?;
            let key = CachedKey {
                alg,
                spki_der: der,
                exclude_from_oidc_discovery: exclude,
                decoding,
            };
            if keys.insert(kid.clone(), key).is_some() {
                return Err(format!("key_id {kid} appears twice"));
            }
        }
        Ok(KeyCache {
            keys,
            data_timestamp: (ts.seconds, ts.nanos),
            refresh_hint_seconds: raw.refresh_hint_seconds,
        })
    }

    /// The kids that belong in OIDC discovery, sorted.
    pub fn discovery_kids(&self) -> Vec<String> {
        self.keys
            .iter()
            .filter(|(_, k)| !k.exclude_from_oidc_discovery)
            .map(|(kid, _)| kid.clone())
            .collect()
    }
}

/// Parses DER SubjectPublicKeyInfo with RustCrypto and returns the algorithm it allows and a key
/// `jsonwebtoken` can verify with.
fn parse_spki(der: &[u8]) -> Result<(Algorithm, DecodingKey), String> {
    let spki = SubjectPublicKeyInfoRef::from_der(der).map_err(|e| format!("not SPKI: {e}"))?;
    match spki.algorithm.oid {
        RSA_ENCRYPTION => {
            let key = rsa::RsaPublicKey::from_public_key_der(der)
                .map_err(|e| format!("not an RSA SPKI: {e}"))?;
            if key.size() < 256 {
                return Err(format!("RSA key of {} bits", key.size() * 8));
            }
            Ok((
                Algorithm::RS256,
                DecodingKey::from_rsa_raw_components(
                    &key.n().to_bytes_be(),
                    &key.e().to_bytes_be(),
                ),
            ))
        }
        EC_PUBLIC_KEY => {
            let curve = spki
                .algorithm
                .parameters_oid()
                .map_err(|e| format!("EC key without a named curve: {e}"))?;
            let (alg, point_len) = match curve {
                P256 => (Algorithm::ES256, 65),
                P384 => (Algorithm::ES384, 97),
                P521 => return Err("P-521 (ES512) is not verifiable by jsonwebtoken".into()),
                other => return Err(format!("unsupported curve {other}")),
            };
            let point = spki
                .subject_public_key
                .as_bytes()
                .ok_or("public key bit string has unused bits")?;
            if point.len() != point_len || point[0] != 4 {
                return Err("EC point is not uncompressed".into());
            }
            Ok((alg, DecodingKey::from_ec_der(point)))
        }
        other => Err(format!("unsupported key algorithm {other}")),
    }
}

fn is_unpadded_base64url(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        && URL_SAFE_NO_PAD.decode(s).is_ok()
}

/// Checks the header as kube-apiserver does (exactly `alg`, `kid`, `typ` = "JWT"; a supported
/// `alg`; a kid of 1..=1024 bytes) and returns (alg, kid).
pub fn check_header(encoded: &str) -> Result<(Algorithm, String), String> {
    if !is_unpadded_base64url(encoded) {
        return Err(format!("header {encoded:?} is not unpadded base64url"));
    }
    let header: serde_json::Map<String, Value> =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(encoded).map_err(|e| e.to_string())?)
            .map_err(|e| format!("header is not a JSON object: {e}"))?;
    let members: BTreeSet<&str> = header.keys().map(String::as_str).collect();
    if members != BTreeSet::from(["alg", "kid", "typ"]) {
        return Err(format!("header members are {members:?}"));
    }
    if header["typ"] != "JWT" {
        return Err(format!("typ is {}", header["typ"]));
    }
    let alg = match header["alg"].as_str() {
        Some("RS256") => Algorithm::RS256,
        Some("ES256") => Algorithm::ES256,
        Some("ES384") => Algorithm::ES384,
        other => {
            return Err(format!(
                "alg {other:?} is not one kube-apiserver accepts here"
            ));
        }
    };
    let kid = header["kid"].as_str().ok_or("kid is not a string")?;
    if kid.is_empty() || kid.len() > 1024 {
        return Err(format!("kid of {} bytes", kid.len()));
    }
    Ok((alg, kid.to_owned()))
}

/// Verifies an assembled token with `jsonwebtoken` against the cache.
pub fn verify(
    token: &str,
    cache: &KeyCache,
    issuer: &str,
    audience: &str,
) -> Result<Value, String> {
    let header = token.split('.').next().ok_or("no header")?;
    let (alg, kid) = check_header(header)?;
    let key = cache
        .keys
        .get(&kid)
        .ok_or_else(|| format!("kid {kid} is not in the key cache"))?;
    if key.alg != alg {
        return Err(format!(
            "header alg {alg:?} does not fit the {:?} key",
            key.alg
        ));
    }
    let mut validation = Validation::new(alg);
    validation.set_issuer(&[issuer]);
    validation.set_audience(&[audience]);
    validation.set_required_spec_claims(&["exp", "nbf", "iss", "sub", "aud"]);
    validation.validate_nbf = true;
    validation.leeway = 0;
    jsonwebtoken::decode::<Value>(token, &key.decoding, &validation)
        .map(|d| d.claims)
        .map_err(|e| e.to_string())
}

fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn uid() -> String {
    let mut b = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b).unwrap();
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

/// The claims kube-apiserver puts in a pod's projected service-account token.
pub fn pod_claims(issuer: &str, namespace: &str, name: &str, aud: &[&str], lifetime: i64) -> Value {
    let now = now_secs();
    json!({
        "aud": aud,
        "exp": now + lifetime,
        "iat": now,
        "iss": issuer,
        "jti": uid(),
        "kubernetes.io": {
            "namespace": namespace,
            "node": {"name": "node-1", "uid": uid()},
            "pod": {"name": format!("{name}-7d4b9c-x2x5q"), "uid": uid()},
            "serviceaccount": {"name": name, "uid": uid()},
        },
        "nbf": now,
        "sub": format!("system:serviceaccount:{namespace}:{name}"),
    })
}

/// Encodes claims as kube-apiserver does: compact JSON (Go sorts map keys), unpadded base64url.
pub fn encode(claims: &Value) -> String {
    URL_SAFE_NO_PAD.encode(serde_json::to_vec(claims).unwrap())
}

/// kube-apiserver's side of the socket.
pub struct ApiServer {
    pub package: Package,
    pub socket: PathBuf,
    pub issuer: String,
    rt: tokio::runtime::Runtime,
    client: Client,
    /// From Metadata, read once at start.
    pub max_token_expiration_seconds: i64,
    /// Filled from FetchKeys at start, refreshed by [`ApiServer::refresh`].
    pub cache: KeyCache,
}

impl ApiServer {
    /// Dials the socket, reads Metadata (refusing, as kube-apiserver does, a maximum below 600 s)
    /// and fills the key cache.
    pub fn start(socket: &Path, package: Package, issuer: &str) -> Result<ApiServer, String> {
        let rt = super::client_runtime();
        let path = socket.to_path_buf();
        let channel = rt
            .block_on(async {
                Endpoint::try_from("http://localhost")?
                    .connect_with_connector(tower::service_fn(move |_| {
                        let path = path.clone();
                        async move {
                            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                                tokio::net::UnixStream::connect(path).await?,
                            ))
                        }
                    }))
                    .await
            })
            .map_err(|e| format!("dial {}: {e}", socket.display()))?;
        let client = match package {
            Package::V1alpha1 => Client::V1alpha1(
                k8s_v1alpha1::external_jwt_signer_client::ExternalJwtSignerClient::new(channel),
            ),
            Package::V1 => Client::V1(
                k8s_v1::external_jwt_signer_client::ExternalJwtSignerClient::new(channel),
            ),
        };
        let mut api = ApiServer {
            package,
            socket: socket.to_path_buf(),
            issuer: issuer.to_owned(),
            rt,
            client,
            max_token_expiration_seconds: 0,
            cache: KeyCache {
                keys: BTreeMap::new(),
                data_timestamp: (0, 0),
                refresh_hint_seconds: 0,
            },
        };
        let max = api.metadata().map_err(|s| format!("Metadata: {s}"))?;
        if max < 600 {
            return Err(format!("max_token_expiration_seconds {max} is below 600"));
        }
        api.max_token_expiration_seconds = max;
        api.refresh()?;
        Ok(api)
    }

    pub fn metadata(&mut self) -> Result<i64, Status> {
        let rt = &self.rt;
        Ok(match &mut self.client {
            Client::V1alpha1(c) => {
                rt.block_on(c.metadata(k8s_v1alpha1::MetadataRequest {}))?
                    .into_inner()
                    .max_token_expiration_seconds
            }
            Client::V1(c) => {
                rt.block_on(c.metadata(k8s_v1::MetadataRequest {}))?
                    .into_inner()
                    .max_token_expiration_seconds
            }
        })
    }

    /// FetchKeys as sent, before any rule is applied.
    pub fn fetch_keys_raw(&mut self) -> Result<RawKeys, Status> {
        let rt = &self.rt;
        Ok(match &mut self.client {
            Client::V1alpha1(c) => {
                let r = rt
                    .block_on(c.fetch_keys(k8s_v1alpha1::FetchKeysRequest {}))?
                    .into_inner();
                RawKeys {
                    keys: r
                        .keys
                        .into_iter()
                        .map(|k| (k.key_id, k.key, k.exclude_from_oidc_discovery))
                        .collect(),
                    data_timestamp: r.data_timestamp,
                    refresh_hint_seconds: r.refresh_hint_seconds,
                }
            }
            Client::V1(c) => {
                let r = rt
                    .block_on(c.fetch_keys(k8s_v1::FetchKeysRequest {}))?
                    .into_inner();
                RawKeys {
                    keys: r
                        .keys
                        .into_iter()
                        .map(|k| (k.key_id, k.key, k.exclude_from_oidc_discovery))
                        .collect(),
                    data_timestamp: r.data_timestamp,
                    refresh_hint_seconds: r.refresh_hint_seconds,
                }
            }
        })
    }

    /// Replaces the cache from FetchKeys; the answer must pass every rule.
    pub fn refresh(&mut self) -> Result<&KeyCache, String> {
        let raw = self
            .fetch_keys_raw()
            .map_err(|s| format!("FetchKeys: {s}"))?;
        self.cache = KeyCache::from_response(raw)?;
        Ok(&self.cache)
    }

    /// Sign as sent: (header, signature).
    pub fn sign(&mut self, claims: &str) -> Result<(String, String), Status> {
        let rt = &self.rt;
        let claims = claims.to_owned();
        Ok(match &mut self.client {
            Client::V1alpha1(c) => {
                let r = rt
                    .block_on(c.sign(k8s_v1alpha1::SignJwtRequest { claims }))?
                    .into_inner();
                (r.header, r.signature)
            }
            Client::V1(c) => {
                let r = rt
                    .block_on(c.sign(k8s_v1::SignJwtRequest { claims }))?
                    .into_inner();
                (r.header, r.signature)
            }
        })
    }

    /// What kube-apiserver does to issue a token: Sign the encoded claims, check the header,
    /// assemble `header.claims.signature`. Returns the token and its kid.
    pub fn issue(&mut self, encoded_claims: &str) -> Result<(String, String), String> {
        let (header, signature) = self
            .sign(encoded_claims)
            .map_err(|s| format!("Sign: {s}"))?;
        let (_, kid) = check_header(&header)?;
        if !is_unpadded_base64url(&signature) {
            return Err(format!("signature {signature:?} is not unpadded base64url"));
        }
        Ok((format!("{header}.{encoded_claims}.{signature}"), kid))
    }

    /// Issues a pod token for `namespace/name` with audience `aud`, lifetime one hour.
    pub fn issue_pod_token(&mut self, namespace: &str, name: &str, aud: &str) -> (String, String) {
        let claims = pod_claims(&self.issuer, namespace, name, &[aud], 3600);
        self.issue(&encode(&claims))
            .unwrap_or_else(|e| panic!("{:?}: {e}", self.package))
    }

    /// Verifies as the token authenticator does: a kid missing from the cache triggers one
    /// FetchKeys before giving up.
    pub fn authenticate(&mut self, token: &str, audience: &str) -> Result<Value, String> {
        let header = token.split('.').next().unwrap_or_default();
        let (_, kid) = check_header(header)?;
        if !self.cache.keys.contains_key(&kid) {
            self.refresh()?;
        }
        verify(token, &self.cache, &self.issuer, audience)
    }

    /// Waits `d` on this client's runtime (keeps the connection's background work going).
    pub fn sleep(&self, d: Duration) {
        self.rt.block_on(async { tokio::time::sleep(d).await });
    }
}
