//! JSON Web Key encoding (RFC 7517/7518) of our public keys, in the exact form verifiers in the field
//! insist on: unpadded base64url, RSA `n` without a leading zero byte, EC coordinates full width.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};

use crate::keys::{PublicKey, PublicParams};

/// One public JWK.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Jwk {
    /// Key type: `RSA` or `EC`.
    pub kty: String,
    /// Always `sig`.
    #[serde(rename = "use")]
    pub use_: String,
    /// Key id.
    pub kid: String,
    /// JWS algorithm.
    pub alg: String,
    /// RSA modulus.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub n: Option<String>,
    /// RSA public exponent.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub e: Option<String>,
    /// EC curve.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub crv: Option<String>,
    /// EC x coordinate.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub x: Option<String>,
    /// EC y coordinate.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub y: Option<String>,
}

/// Unpadded base64url of an unsigned big-endian integer, minimal: leading zero bytes dropped
/// (DER adds one when the top bit is set; JWK forbids it).
pub fn encode_uint(be: &[u8]) -> String {
    let start = be
        .iter()
        .position(|b| *b != 0)
        .unwrap_or(be.len().saturating_sub(1));
    URL_SAFE_NO_PAD.encode(&be[start..])
}

impl Jwk {
    /// The JWK of a public key.
    pub fn from_public_key(key: &PublicKey) -> Jwk {
        let spec = key.spec();
        let mut jwk = Jwk {
            kty: String::new(),
            use_: "sig".into(),
            kid: key.kid().to_owned(),
            alg: spec.jws_algorithm().into(),
            n: None,
            e: None,
            crv: None,
            x: None,
            y: None,
        };
        match key.params() {
            PublicParams::Rsa { n, e } => {
                jwk.kty = "RSA".into();
                jwk.n = Some(encode_uint(n));
                jwk.e = Some(encode_uint(e));
            }
            PublicParams::Ec { x, y } => {
                jwk.kty = "EC".into();
                jwk.crv = spec.curve_name().map(Into::into);
                // Coordinates keep their full width, leading zeros included (RFC 7518 §6.2.1.2).
                jwk.x = Some(URL_SAFE_NO_PAD.encode(x));
                jwk.y = Some(URL_SAFE_NO_PAD.encode(y));
            }
        }
        jwk
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::{KeySpec, Signer, SoftwareKey};

    #[test]
    fn uint_drops_der_leading_zero_of_a_top_bit_modulus() {
        let mut der_style = vec![0x00, 0xc3];
        der_style.extend([0x11; 255]);
        let n = URL_SAFE_NO_PAD.decode(encode_uint(&der_style)).unwrap();
        assert_eq!(n.len(), 256);
        assert_eq!(n[0], 0xc3);
        assert_eq!(encode_uint(&[0x01, 0x00, 0x01]), "AQAB");
        assert_eq!(encode_uint(&[0, 0, 1, 0, 1]), "AQAB");
        assert_eq!(encode_uint(&[0]), "AA");
    }

    #[test]
    fn ec_jwk_has_full_width_coordinates_and_no_rsa_members() {
        for (spec, crv, width) in [(KeySpec::P256, "P-256", 32), (KeySpec::P384, "P-384", 48)] {
            let (key, _) = SoftwareKey::generate(spec).unwrap();
            let jwk = Jwk::from_public_key(key.public_key());
            assert_eq!(jwk.kty, "EC");
            assert_eq!(jwk.crv.as_deref(), Some(crv));
            for c in [jwk.x.as_ref().unwrap(), jwk.y.as_ref().unwrap()] {
                assert_eq!(URL_SAFE_NO_PAD.decode(c).unwrap().len(), width);
            }
            let json = serde_json::to_value(&jwk).unwrap();
            assert!(json.get("n").is_none() && json.get("e").is_none());
            assert_eq!(json["use"], "sig");
        }
    }
}
