//! What kind of key to make: RSA of a given size (RS256), or an elliptic curve (ES256, ES384).

use std::fmt;
use std::str::FromStr;

/// The type of a signing key, which fixes its JWS algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KeySpec {
    /// RSA with PKCS#1 v1.5 and SHA-256 (RS256); the modulus size in bits.
    Rsa(u32),
    /// ECDSA over P-256 with SHA-256 (ES256).
    P256,
    /// ECDSA over P-384 with SHA-384 (ES384).
    P384,
}

/// A key type we do not make.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    /// Not one of our JWS algorithms.
    #[error("unsupported algorithm {0:?}: use RS256, ES256 or ES384")]
    Algorithm(String),
    /// An RSA size we do not make.
    #[error("RSA keys are 2048, 3072 or 4096 bits, not {0}")]
    RsaBits(u32),
}

/// The RSA sizes we make: 2048 bits is the floor verifiers accept, 4096 the sensible ceiling.
pub const RSA_BITS: [u32; 3] = [2048, 3072, 4096];

impl KeySpec {
    /// The default: RS256 with a 2048-bit key, what the AKS issuer publishes.
    pub const DEFAULT: KeySpec = KeySpec::Rsa(2048);

    /// Builds a spec from a JWS algorithm name and, for RSA, a size.
    pub fn from_algorithm(alg: &str, rsa_bits: u32) -> Result<Self, SpecError> {
        match alg {
            "RS256" if RSA_BITS.contains(&rsa_bits) => Ok(KeySpec::Rsa(rsa_bits)),
            "RS256" => Err(SpecError::RsaBits(rsa_bits)),
            "ES256" => Ok(KeySpec::P256),
            "ES384" => Ok(KeySpec::P384),
            other => Err(SpecError::Algorithm(other.to_owned())),
        }
    }

    /// The JWS `alg` this key signs with.
    pub fn jws_algorithm(self) -> &'static str {
        match self {
            KeySpec::Rsa(_) => "RS256",
            KeySpec::P256 => "ES256",
            KeySpec::P384 => "ES384",
        }
    }

    /// The curve's name as JWK `crv` writes it: `P-256` or `P-384`; `None` for RSA.
    pub fn curve_name(self) -> Option<&'static str> {
        match self {
            KeySpec::Rsa(_) => None,
            KeySpec::P256 => Some("P-256"),
            KeySpec::P384 => Some("P-384"),
        }
    }

    /// Modulus size for RSA, field size for EC.
    pub fn bits(self) -> u32 {
        match self {
            KeySpec::Rsa(bits) => bits,
            KeySpec::P256 => 256,
            KeySpec::P384 => 384,
        }
    }
}

/// Written as `RS256-2048`, `ES256`, `ES384`: the form the key store records.
impl fmt::Display for KeySpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeySpec::Rsa(bits) => write!(f, "RS256-{bits}"),
            other => f.write_str(other.jws_algorithm()),
        }
    }
}

impl FromStr for KeySpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.split_once('-') {
            Some(("RS256", bits)) => {
                let bits = bits.parse().map_err(|_| format!("bad RSA size in {s:?}"))?;
                KeySpec::from_algorithm("RS256", bits).map_err(|e| e.to_string())
            }
            None if s != "RS256" => KeySpec::from_algorithm(s, 0).map_err(|e| e.to_string()),
            _ => Err(format!("unknown key type {s:?}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_and_parse_round_trip() {
        for spec in [
            KeySpec::Rsa(2048),
            KeySpec::Rsa(4096),
            KeySpec::P256,
            KeySpec::P384,
        ] {
            assert_eq!(spec.to_string().parse::<KeySpec>().unwrap(), spec);
        }
        assert!("RS256".parse::<KeySpec>().is_err());
        assert!("RS256-1024".parse::<KeySpec>().is_err());
        assert!(KeySpec::from_algorithm("HS256", 2048).is_err());
    }
}
