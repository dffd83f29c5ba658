//! A private key held in process memory and signed with the crypto backend ([`super::crypto`]:
//! ring by default, aws-lc-rs with the `aws-lc` feature). It is created from (and generated as)
//! PKCS#8, which only ever lives in zeroizing buffers on its way to or from the sealer.

use zeroize::Zeroizing;

use super::crypto::{self, backend};
use super::public_key::{PublicKey, PublicParams};
use super::signer::{SignError, Signer};
use super::spec::KeySpec;
use super::spki;
use backend::rand::SystemRandom;
use backend::signature::{
    self, ECDSA_P256_SHA256_FIXED_SIGNING, ECDSA_P384_SHA384_FIXED_SIGNING, EcdsaKeyPair,
    KeyPair as _, RsaKeyPair, RsaPublicKeyComponents,
};

/// Making or loading a key failed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    /// Key generation failed.
    #[error("could not generate a {0} key")]
    Generate(KeySpec),
    /// The PKCS#8 bytes are not a usable key of the expected type.
    #[error("stored key material is not a valid {0} key")]
    Invalid(KeySpec),
}

enum KeyPair {
    Rsa(RsaKeyPair),
    Ec(EcdsaKeyPair),
}

/// A private key held by the crypto backend.
pub struct SoftwareKey {
    pair: KeyPair,
    public: PublicKey,
    rng: SystemRandom,
}

impl std::fmt::Debug for SoftwareKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SoftwareKey")
            .field("kid", &self.public.kid())
            .field("spec", &self.public.spec())
            .field("private", &"[redacted]")
            .finish()
    }
}

fn ec_alg(spec: KeySpec) -> &'static signature::EcdsaSigningAlgorithm {
    if spec == KeySpec::P384 {
        &ECDSA_P384_SHA384_FIXED_SIGNING
    } else {
        &ECDSA_P256_SHA256_FIXED_SIGNING
    }
}

impl SoftwareKey {
    /// Generates a new key; returns it and its PKCS#8 encoding (to be sealed, then dropped).
    pub fn generate(spec: KeySpec) -> Result<(Self, Zeroizing<Vec<u8>>), KeyError> {
        let pkcs8 = match spec {
            KeySpec::Rsa(bits) => {
                crypto::generate_rsa_pkcs8(bits).ok_or(KeyError::Generate(spec))?
            }
            KeySpec::P256 | KeySpec::P384 => {
                let doc = EcdsaKeyPair::generate_pkcs8(ec_alg(spec), &SystemRandom::new())
                    .map_err(|_| KeyError::Generate(spec))?;
                Zeroizing::new(doc.as_ref().to_vec())
            }
        };
        let key = Self::from_pkcs8(spec, &pkcs8)?;
        Ok((key, pkcs8))
    }

    /// Loads a key from PKCS#8.
    pub fn from_pkcs8(spec: KeySpec, pkcs8: &[u8]) -> Result<Self, KeyError> {
        let (pair, public) = match spec {
            KeySpec::Rsa(bits) => {
                let pair = RsaKeyPair::from_pkcs8(pkcs8).map_err(|_| KeyError::Invalid(spec))?;
                if pair.public_key().modulus_len() * 8 != bits as usize {
                    return Err(KeyError::Invalid(spec));
                }
                let components = RsaPublicKeyComponents::<Vec<u8>>::from(pair.public_key());
                let (n, e) = (components.n, components.e);
                let spki = spki::rsa(pair.public_key().as_ref());
                let public = PublicKey::new(spec, spki, PublicParams::Rsa { n, e });
                (KeyPair::Rsa(pair), public)
            }
            KeySpec::P256 | KeySpec::P384 => {
                let pair = crypto::ecdsa_from_pkcs8(ec_alg(spec), pkcs8)
                    .map_err(|_| KeyError::Invalid(spec))?;
                let point = pair.public_key().as_ref();
                let width = (point.len() - 1) / 2;
                let x = point[1..1 + width].to_vec();
                let y = point[1 + width..].to_vec();
                let spki = spki::ec(spec == KeySpec::P384, point);
                let public = PublicKey::new(spec, spki, PublicParams::Ec { x, y });
                (KeyPair::Ec(pair), public)
            }
        };
        Ok(SoftwareKey {
            pair,
            public,
            rng: SystemRandom::new(),
        })
    }
}

impl Signer for SoftwareKey {
    fn public_key(&self) -> &PublicKey {
        &self.public
    }

    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, SignError> {
        let failed = || SignError {
            kid: self.public.kid().to_owned(),
        };
        match &self.pair {
            KeyPair::Rsa(pair) => {
                let mut sig = vec![0u8; pair.public_key().modulus_len()];
                pair.sign(&signature::RSA_PKCS1_SHA256, &self.rng, message, &mut sig)
                    .map_err(|_| failed())?;
                Ok(sig)
            }
            KeyPair::Ec(pair) => pair
                .sign(&self.rng, message)
                .map(|s| s.as_ref().to_vec())
                .map_err(|_| failed()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use backend::signature::UnparsedPublicKey;

    #[test]
    fn ec_keys_sign_in_jose_form_and_verify() {
        for (spec, width, alg) in [
            (KeySpec::P256, 32, &signature::ECDSA_P256_SHA256_FIXED),
            (KeySpec::P384, 48, &signature::ECDSA_P384_SHA384_FIXED),
        ] {
            let (key, pkcs8) = SoftwareKey::generate(spec).unwrap();
            let sig = key.sign(b"hello").unwrap();
            assert_eq!(sig.len(), 2 * width);
            let PublicParams::Ec { x, y } = key.public_key().params() else {
                panic!()
            };
            let mut point = vec![4u8];
            point.extend(x);
            point.extend(y);
            UnparsedPublicKey::new(alg, &point)
                .verify(b"hello", &sig)
                .unwrap();
            let again = SoftwareKey::from_pkcs8(spec, &pkcs8).unwrap();
            assert_eq!(again.kid(), key.kid());
        }
    }

    #[test]
    fn wrong_type_or_garbage_is_refused() {
        let (_, pkcs8) = SoftwareKey::generate(KeySpec::P256).unwrap();
        assert_eq!(
            SoftwareKey::from_pkcs8(KeySpec::P384, &pkcs8).unwrap_err(),
            KeyError::Invalid(KeySpec::P384)
        );
        assert!(SoftwareKey::from_pkcs8(KeySpec::Rsa(2048), b"junk").is_err());
    }

    #[test]
    fn debug_is_redacted() {
        let (key, _) = SoftwareKey::generate(KeySpec::P256).unwrap();
        let text = format!("{key:?}");
        assert!(text.contains("[redacted]") && text.contains(key.kid()));
    }
}
