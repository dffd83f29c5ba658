//! Sealing: a private key at rest is AES-256-GCM ciphertext under a subkey of the KEK, with a fresh
//! random nonce per seal and the key id bound as associated data, so a record moved to another key
//! id, altered, or opened with another KEK fails to open.

use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};
use zeroize::Zeroizing;

use super::kek::Kek;

const SEAL_PURPOSE: &[u8] = b"seal private keys";
const AAD_PREFIX: &[u8] = b"oidc-kms sealed key v1 kid=";

/// A sealed private key: the nonce and the ciphertext with its tag.
#[derive(Clone, PartialEq, Eq)]
pub struct SealedKey {
    /// The 96-bit GCM nonce, random per seal.
    pub nonce: [u8; NONCE_LEN],
    /// Ciphertext followed by the 16-byte tag.
    pub ciphertext: Vec<u8>,
}

impl std::fmt::Debug for SealedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SealedKey({} bytes)", self.ciphertext.len())
    }
}

/// Sealing or opening failed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SealError {
    /// The ciphertext, nonce, tag, key id or KEK do not match.
    #[error("sealed key did not open: wrong KEK, altered record, or record of another key id")]
    Open,
    /// The system random source failed.
    #[error("the system random number generator failed")]
    Random,
}

/// Seals one key-encryption context: the AEAD key derived from the KEK.
pub struct Sealer {
    key: LessSafeKey,
    rng: SystemRandom,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sealer([redacted])")
    }
}

fn aad(kid: &str) -> Vec<u8> {
    let mut aad = AAD_PREFIX.to_vec();
    aad.extend_from_slice(kid.as_bytes());
    aad
}

impl Sealer {
    /// A sealer for this KEK.
    pub fn new(kek: &Kek) -> Self {
        let subkey = kek.derive(SEAL_PURPOSE);
        let key = UnboundKey::new(&AES_256_GCM, &subkey[..]).expect("32-byte AES-256 key");
        Sealer {
            key: LessSafeKey::new(key),
            rng: SystemRandom::new(),
        }
    }

    /// Seals `plaintext` for key id `kid`.
    pub fn seal(&self, kid: &str, plaintext: &[u8]) -> Result<SealedKey, SealError> {
        let mut nonce = [0u8; NONCE_LEN];
        self.rng.fill(&mut nonce).map_err(|_| SealError::Random)?;
        let mut buf = plaintext.to_vec();
        let result = self.key.seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(aad(kid)),
            &mut buf,
        );
        match result {
            Ok(()) => Ok(SealedKey {
                nonce,
                ciphertext: buf,
            }),
            Err(_) => {
                zeroize::Zeroize::zeroize(&mut buf);
                Err(SealError::Random)
            }
        }
    }

    /// Opens a record sealed for `kid`. The plaintext is zeroized when dropped.
    pub fn open(&self, kid: &str, sealed: &SealedKey) -> Result<Zeroizing<Vec<u8>>, SealError> {
        let mut buf = Zeroizing::new(sealed.ciphertext.clone());
        let len = self
            .key
            .open_in_place(
                Nonce::assume_unique_for_key(sealed.nonce),
                Aad::from(aad(kid)),
                &mut buf,
            )
            .map_err(|_| SealError::Open)?
            .len();
        buf.truncate(len);
        Ok(buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sealer() -> Sealer {
        Sealer::new(&Kek::generate().unwrap())
    }

    #[test]
    fn round_trip_with_fresh_nonces() {
        let s = sealer();
        let a = s.seal("kid-1", b"private key bytes").unwrap();
        let b = s.seal("kid-1", b"private key bytes").unwrap();
        assert_ne!(a.nonce, b.nonce, "a nonce is never reused");
        assert_ne!(a.ciphertext, b.ciphertext);
        assert!(!a.ciphertext.windows(7).any(|w| w == b"private"));
        assert_eq!(&s.open("kid-1", &a).unwrap()[..], b"private key bytes");
    }

    #[test]
    fn any_flipped_bit_is_refused() {
        let s = sealer();
        let sealed = s.seal("kid-1", b"secret").unwrap();
        for i in 0..sealed.ciphertext.len() {
            let mut bad = sealed.clone();
            bad.ciphertext[i] ^= 0x01;
            assert_eq!(s.open("kid-1", &bad).unwrap_err(), SealError::Open);
        }
        let mut bad = sealed.clone();
        bad.nonce[0] ^= 0x80;
        assert_eq!(s.open("kid-1", &bad).unwrap_err(), SealError::Open);
        let mut short = sealed;
        short.ciphertext.truncate(3);
        assert_eq!(s.open("kid-1", &short).unwrap_err(), SealError::Open);
    }

    #[test]
    fn wrong_kek_is_refused() {
        let sealed = sealer().seal("kid-1", b"secret").unwrap();
        assert_eq!(
            sealer().open("kid-1", &sealed).unwrap_err(),
            SealError::Open
        );
    }

    #[test]
    fn record_moved_to_another_kid_is_refused() {
        let s = sealer();
        let sealed = s.seal("kid-1", b"secret").unwrap();
        assert_eq!(s.open("kid-2", &sealed).unwrap_err(), SealError::Open);
    }

    #[test]
    fn debug_shows_no_bytes() {
        let s = sealer();
        let sealed = s.seal("kid", b"secret").unwrap();
        assert_eq!(format!("{sealed:?}"), "SealedKey(22 bytes)");
        assert_eq!(format!("{s:?}"), "Sealer([redacted])");
    }
}
