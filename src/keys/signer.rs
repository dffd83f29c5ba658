//! The one thing a caller may do with a private key: ask it to sign. No method returns private bytes,
//! whichever backend holds the key (software sealed on disk today; a hardware module tomorrow).

use super::public_key::PublicKey;

/// A signing operation failed inside the backend.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("the key backend failed to sign with key {kid}")]
pub struct SignError {
    /// The key that failed.
    pub kid: String,
}

/// A private key held by a backend, usable only to sign.
pub trait Signer: Send + Sync + std::fmt::Debug {
    /// Its public half.
    fn public_key(&self) -> &PublicKey;
    /// Signs `message` with the key's JWS algorithm; ECDSA signatures come in JOSE form (r‖s).
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, SignError>;
    /// The key id.
    fn kid(&self) -> &str {
        self.public_key().kid()
    }
}
