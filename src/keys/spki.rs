//! DER SubjectPublicKeyInfo (RFC 5280) for our public keys: what Kubernetes hashes into a `kid`
//! and what its external-signer protocol carries.

const RSA_ENCRYPTION: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01];
const EC_PUBLIC_KEY: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];
const SECP256R1: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
const SECP384R1: &[u8] = &[0x2b, 0x81, 0x04, 0x00, 0x22];

fn tlv(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    let len = content.len();
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes = len.to_be_bytes();
        let skip = bytes.iter().take_while(|b| **b == 0).count();
        out.push(0x80 | (bytes.len() - skip) as u8);
        out.extend_from_slice(&bytes[skip..]);
    }
    out.extend_from_slice(content);
    out
}

fn spki(algorithm: Vec<u8>, key: &[u8]) -> Vec<u8> {
    let mut bits = vec![0u8]; // no unused bits
    bits.extend_from_slice(key);
    let mut body = tlv(0x30, &algorithm);
    body.extend(tlv(0x03, &bits));
    tlv(0x30, &body)
}

/// SPKI for an RSA key given its DER `RSAPublicKey` (PKCS#1).
pub fn rsa(pkcs1_public_key: &[u8]) -> Vec<u8> {
    let mut alg = tlv(0x06, RSA_ENCRYPTION);
    alg.extend(tlv(0x05, &[]));
    spki(alg, pkcs1_public_key)
}

/// SPKI for an EC key given its uncompressed point (`04 || x || y`).
pub fn ec(named_curve_p384: bool, uncompressed_point: &[u8]) -> Vec<u8> {
    let mut alg = tlv(0x06, EC_PUBLIC_KEY);
    alg.extend(tlv(
        0x06,
        if named_curve_p384 {
            SECP384R1
        } else {
            SECP256R1
        },
    ));
    spki(alg, uncompressed_point)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_lengths_use_the_minimal_long_form() {
        assert_eq!(&tlv(0x04, &[0; 0x7f])[..2], &[0x04, 0x7f]);
        assert_eq!(&tlv(0x04, &[0; 0x80])[..3], &[0x04, 0x81, 0x80]);
        assert_eq!(&tlv(0x04, &[0; 0x10e])[..4], &[0x04, 0x82, 0x01, 0x0e]);
    }
}
