//! The key-encryption key (KEK): 32 bytes, given as base64, that seals every private key at rest.
//! It is never logged or printed; its bytes are zeroized on drop.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use ring::hkdf;
use ring::rand::{SecureRandom, SystemRandom};
use zeroize::{Zeroize, Zeroizing};

/// Why a KEK could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KekError {
    /// Not base64.
    #[error(
        "the key-encryption key is not valid base64 (expected 32 random bytes, base64-encoded)"
    )]
    NotBase64,
    /// Base64, but not 32 bytes.
    #[error("the key-encryption key decodes to {0} bytes; it must be exactly 32 (a 256-bit key)")]
    WrongLength(usize),
    /// The system random source failed.
    #[error("the system random number generator failed")]
    Random,
}

/// A 256-bit key-encryption key.
pub struct Kek(Zeroizing<[u8; 32]>);

impl Kek {
    /// Reads a KEK from base64 text; surrounding white space (a trailing newline) is ignored.
    pub fn from_base64(text: &str) -> Result<Self, KekError> {
        let mut raw = STANDARD
            .decode(text.trim())
            .map_err(|_| KekError::NotBase64)?;
        let result = if raw.len() == 32 {
            let mut bytes = Zeroizing::new([0u8; 32]);
            bytes.copy_from_slice(&raw);
            Ok(Kek(bytes))
        } else {
            Err(KekError::WrongLength(raw.len()))
        };
        raw.zeroize();
        result
    }

    /// A fresh random KEK.
    pub fn generate() -> Result<Self, KekError> {
        let mut bytes = Zeroizing::new([0u8; 32]);
        SystemRandom::new()
            .fill(&mut bytes[..])
            .map_err(|_| KekError::Random)?;
        Ok(Kek(bytes))
    }

    /// The KEK as base64 text, for writing a new KEK file. The string is zeroized on drop.
    pub fn to_base64(&self) -> Zeroizing<String> {
        Zeroizing::new(STANDARD.encode(&self.0[..]))
    }

    /// Derives a 32-byte subkey for one purpose (HKDF-SHA256), so sealing, the store's MAC and the
    /// KEK check value never share a key.
    pub(crate) fn derive(&self, purpose: &'static [u8]) -> Zeroizing<[u8; 32]> {
        struct Len32;
        impl hkdf::KeyType for Len32 {
            fn len(&self) -> usize {
                32
            }
        }
        let salt = hkdf::Salt::new(hkdf::HKDF_SHA256, b"oidc-kms kek v1");
        let prk = salt.extract(&self.0[..]);
        let mut out = Zeroizing::new([0u8; 32]);
        // HKDF can only fail for an output longer than 255 hash blocks; 32 bytes is one block.
        prk.expand(&[purpose], Len32)
            .and_then(|okm| okm.fill(&mut out[..]))
            .expect("HKDF-SHA256 yields 32 bytes");
        out
    }
}

impl std::fmt::Debug for Kek {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Kek([redacted])")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_base64_with_a_trailing_newline() {
        let kek = Kek::generate().unwrap();
        let text = format!("{}\n", kek.to_base64().as_str());
        let again = Kek::from_base64(&text).unwrap();
        assert_eq!(&again.0[..], &kek.0[..]);
    }

    #[test]
    fn refuses_wrong_sizes_and_garbage() {
        assert_eq!(
            Kek::from_base64("AAAA").unwrap_err(),
            KekError::WrongLength(3)
        );
        assert_eq!(
            Kek::from_base64("not base64!").unwrap_err(),
            KekError::NotBase64
        );
    }

    #[test]
    fn debug_shows_no_key_bytes() {
        let kek = Kek::from_base64(&STANDARD.encode([7u8; 32])).unwrap();
        assert_eq!(format!("{kek:?}"), "Kek([redacted])");
    }

    #[test]
    fn subkeys_differ_by_purpose() {
        let kek = Kek::generate().unwrap();
        assert_ne!(&kek.derive(b"a")[..], &kek.derive(b"b")[..]);
        assert_eq!(&kek.derive(b"a")[..], &kek.derive(b"a")[..]);
    }
}
