//! The crypto backend that private keys sign with: ring by default, aws-lc-rs with the cargo
//! feature `aws-lc` (about 1.8× ring's RSA signing rate, RSA key generation of its own, and a
//! FIPS-validated build). Their signing APIs mirror each other, so [`software_key`] imports
//! [`backend`] and reads the same for both; the few places where they differ are the functions
//! here. Sealing, HMAC, HKDF and digests stay on ring whichever backend signs.
//!
//! [`software_key`]: super::software_key

#[cfg(feature = "aws-lc")]
pub(crate) use aws_lc_rs as backend;
#[cfg(not(feature = "aws-lc"))]
pub(crate) use ring as backend;

use zeroize::Zeroizing;

use backend::signature::{EcdsaKeyPair, EcdsaSigningAlgorithm};

/// The name of the backend this build signs with: `ring` or `aws-lc-rs`.
#[cfg(not(feature = "aws-lc"))]
pub const BACKEND: &str = "ring";
/// The name of the backend this build signs with: `ring` or `aws-lc-rs`.
#[cfg(feature = "aws-lc")]
pub const BACKEND: &str = "aws-lc-rs";

/// Parses an ECDSA key pair from PKCS#8 (ring wants a random source here, aws-lc-rs does not).
pub(crate) fn ecdsa_from_pkcs8(
    alg: &'static EcdsaSigningAlgorithm,
    pkcs8: &[u8],
) -> Result<EcdsaKeyPair, backend::error::KeyRejected> {
    #[cfg(not(feature = "aws-lc"))]
    {
        EcdsaKeyPair::from_pkcs8(alg, pkcs8, &backend::rand::SystemRandom::new())
    }
    #[cfg(feature = "aws-lc")]
    {
        EcdsaKeyPair::from_pkcs8(alg, pkcs8)
    }
}

/// Generates an RSA private key of `bits` and returns its PKCS#8 encoding. ring cannot generate
/// RSA keys, so the default build uses the `rsa` crate; aws-lc-rs generates them itself.
pub(crate) fn generate_rsa_pkcs8(bits: u32) -> Option<Zeroizing<Vec<u8>>> {
    #[cfg(not(feature = "aws-lc"))]
    {
        use rsa::pkcs8::EncodePrivateKey as _;
        let key = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, bits as usize).ok()?;
        let doc = key.to_pkcs8_der().ok()?;
        Some(Zeroizing::new(doc.as_bytes().to_vec()))
    }
    #[cfg(feature = "aws-lc")]
    {
        use backend::encoding::AsDer as _;
        use backend::rsa::KeySize;
        let size = match bits {
            2048 => KeySize::Rsa2048,
            3072 => KeySize::Rsa3072,
            4096 => KeySize::Rsa4096,
            _ => return None,
        };
        let pair = backend::signature::RsaKeyPair::generate(size).ok()?;
        let doc = pair.as_der().ok()?;
        Some(Zeroizing::new(doc.as_ref().to_vec()))
    }
}
