//! A public key as the outside world sees it: its DER SubjectPublicKeyInfo, its `kid`, and the
//! numbers a JWK carries.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::digest::{SHA256, digest};

use super::spec::KeySpec;

/// The numbers of a public key, big-endian, without leading zero bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PublicParams {
    /// RSA modulus and public exponent.
    Rsa {
        /// Modulus.
        n: Vec<u8>,
        /// Public exponent.
        e: Vec<u8>,
    },
    /// EC point coordinates, each the curve's full width.
    Ec {
        /// X coordinate.
        x: Vec<u8>,
        /// Y coordinate.
        y: Vec<u8>,
    },
}

/// A public key and its identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicKey {
    spec: KeySpec,
    kid: String,
    spki_der: Vec<u8>,
    params: PublicParams,
}

/// The Kubernetes `kid`: unpadded base64url of SHA-256 over the DER SubjectPublicKeyInfo. It depends
/// only on the public key, so a key keeps its kid across restarts and across signers.
pub fn kid_of(spki_der: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(digest(&SHA256, spki_der))
}

impl PublicKey {
    /// Assembles a public key; the kid is derived from `spki_der`.
    pub fn new(spec: KeySpec, spki_der: Vec<u8>, params: PublicParams) -> Self {
        PublicKey {
            spec,
            kid: kid_of(&spki_der),
            spki_der,
            params,
        }
    }
    /// The key type.
    pub fn spec(&self) -> KeySpec {
        self.spec
    }
    /// The key id.
    pub fn kid(&self) -> &str {
        &self.kid
    }
    /// DER SubjectPublicKeyInfo.
    pub fn spki_der(&self) -> &[u8] {
        &self.spki_der
    }
    /// The JWK numbers.
    pub fn params(&self) -> &PublicParams {
        &self.params
    }
}
