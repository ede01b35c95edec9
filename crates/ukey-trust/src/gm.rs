//! 国密: SM2-with-SM3 signatures for the chain check, with the distinguishing ID the
//! Chinese PKI uses (GM/T 0009: `1234567812345678`).
//!
//! `rustls-webpki` knows no SM2; it takes the algorithm as a
//! [`SignatureVerificationAlgorithm`], which this module implements with RustCrypto's
//! `sm2` (Z = SM3(ENTL ‖ ID ‖ a ‖ b ‖ xG ‖ yG ‖ xA ‖ yA), then SM3(Z ‖ M), then the
//! SM2 verification). A certificate signed with another ID (OpenSSL 3.0 signs with an
//! empty one unless told `-sigopt distid:1234567812345678`) does not verify.

use rustls_pki_types::{AlgorithmIdentifier, InvalidSignature, SignatureVerificationAlgorithm};
use signature::Verifier as _;

/// The default distinguishing ID of GM/T 0009, used by certificates, CSRs and
/// signatures in the Chinese PKI.
pub const GM_DISTID: &str = "1234567812345678";

/// Contents of the SubjectPublicKeyInfo's AlgorithmIdentifier of an SM2 key:
/// id-ecPublicKey (1.2.840.10045.2.1) with the named curve SM2 (1.2.156.10197.1.301).
const SM2_PUBLIC_KEY: &[u8] = &[
    0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, // id-ecPublicKey
    0x06, 0x08, 0x2a, 0x81, 0x1c, 0xcf, 0x55, 0x01, 0x82, 0x2d, // sm2 curve
];

/// Contents of the AlgorithmIdentifier of SM2-with-SM3 (1.2.156.10197.1.501), without
/// parameters (as OpenSSL and GM/T 0015 write it).
const SM2_WITH_SM3: &[u8] = &[0x06, 0x08, 0x2a, 0x81, 0x1c, 0xcf, 0x55, 0x01, 0x83, 0x75];

/// The same with NULL parameters, as some CAs write it.
const SM2_WITH_SM3_NULL: &[u8] = &[
    0x06, 0x08, 0x2a, 0x81, 0x1c, 0xcf, 0x55, 0x01, 0x83, 0x75, 0x05, 0x00,
];

/// SM2-with-SM3 with one distinguishing ID.
#[derive(Debug)]
pub struct Sm2WithSm3 {
    distid: &'static str,
    signature_alg_id: &'static [u8],
}

/// SM2-with-SM3, GM ID, no parameters.
pub static SM2_SM3_GM: Sm2WithSm3 = Sm2WithSm3 {
    distid: GM_DISTID,
    signature_alg_id: SM2_WITH_SM3,
};

/// SM2-with-SM3, GM ID, NULL parameters.
pub static SM2_SM3_GM_NULL_PARAMS: Sm2WithSm3 = Sm2WithSm3 {
    distid: GM_DISTID,
    signature_alg_id: SM2_WITH_SM3_NULL,
};

impl SignatureVerificationAlgorithm for Sm2WithSm3 {
    fn public_key_alg_id(&self) -> AlgorithmIdentifier {
        AlgorithmIdentifier::from_slice(SM2_PUBLIC_KEY)
    }

    fn signature_alg_id(&self) -> AlgorithmIdentifier {
        AlgorithmIdentifier::from_slice(self.signature_alg_id)
    }

    fn verify_signature(
        &self,
        public_key: &[u8],
        message: &[u8],
        signature: &[u8],
    ) -> Result<(), InvalidSignature> {
        verify(self.distid, public_key, message, signature)
            .then_some(())
            .ok_or(InvalidSignature)
    }

    fn fips(&self) -> bool {
        false
    }
}

/// Whether `signature` (DER, `SEQUENCE { r INTEGER, s INTEGER }`) is an SM2 signature of
/// `message` by the SEC1 point `public_key`, with Z computed for `distid`.
pub fn verify(distid: &str, public_key: &[u8], message: &[u8], signature: &[u8]) -> bool {
    let Ok(key) = sm2::dsa::VerifyingKey::from_sec1_bytes(distid, public_key) else {
        return false;
    };
    let Ok(sig) = sm2::dsa::Signature::from_der(signature) else {
        return false;
    };
    key.verify(message, &sig).is_ok()
}

/// The SM2 curve's a, b, xG, yG (GM/T 0003.5), as Z hashes them.
const CURVE: [&str; 4] = [
    "FFFFFFFEFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF00000000FFFFFFFFFFFFFFFC",
    "28E9FA9E9D9F5E344D5A9E4BCF6509A7F39789F515AB8F92DDBCBD414D940E93",
    "32C4AE2C1F1981195F9904466A39C9948FE30BBFF2660BE1715A4589334C74C7",
    "BC3736A2F4F6779C59BDCEE36B692153D0A9877CC62A474002DF32E52139F0A0",
];

/// The digest an SM2 signature signs: e = SM3(Z ‖ M), Z = SM3(ENTL ‖ ID ‖ a ‖ b ‖ xG ‖
/// yG ‖ xA ‖ yA) for the uncompressed point `public_key` and `distid` (GM/T 0003.2
/// §5.5). For a token that signs prehashed digests. `None`: not an uncompressed point,
/// or an ID longer than 8191 bytes.
pub fn message_digest(distid: &str, public_key: &[u8], message: &[u8]) -> Option<[u8; 32]> {
    use sm3::Digest as _;
    if public_key.len() != 65 || public_key[0] != 0x04 {
        return None;
    }
    let entl = u16::try_from(distid.len().checked_mul(8)?).ok()?;
    let mut z = sm3::Sm3::new();
    z.update(entl.to_be_bytes());
    z.update(distid.as_bytes());
    for c in CURVE {
        z.update(hex::decode(c).ok()?);
    }
    z.update(&public_key[1..]);
    let mut e = sm3::Sm3::new();
    e.update(z.finalize());
    e.update(message);
    Some(e.finalize().into())
}

/// SM2 encryption of `message` to the uncompressed point `public_key`: a GM/T 0009
/// `SM2Cipher` DER (C1 C3 C2), as `openssl pkeyutl -encrypt` writes it. `None`: not a
/// point on the curve, or no randomness.
pub fn encrypt(public_key: &[u8], message: &[u8]) -> Option<Vec<u8>> {
    sm2::pke::EncryptingKey::from_sec1_bytes(public_key)
        .ok()?
        .encrypt_der(&mut getrandom::SysRng, message)
        .ok()
}

/// SM4-ECB encryption of one 16-byte block (the self-test of a session key an SKF key
/// imported: the host encrypts, the key decrypts). `None`: not a 16-byte key or block.
pub fn sm4_encrypt_block(key: &[u8], block: &[u8]) -> Option<[u8; 16]> {
    use sm4::cipher::{Array, BlockCipherEncrypt, KeyInit};
    let cipher = sm4::Sm4::new_from_slice(key).ok()?;
    let mut b = Array::try_from(block).ok()?;
    cipher.encrypt_block(&mut b);
    Some(b.into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use sm2::dsa::signature::hazmat::PrehashSigner;
    use sm2::elliptic_curve::sec1::ToSec1Point;

    #[test]
    fn a_prehashed_signature_over_our_digest_verifies_as_a_message_signature() {
        let key = sm2::dsa::SigningKey::from_slice(GM_DISTID, &[0x42; 32]).unwrap();
        let point = key
            .verifying_key()
            .as_affine()
            .to_sec1_point(false)
            .as_bytes()
            .to_vec();
        let e = message_digest(GM_DISTID, &point, b"bid").unwrap();
        let sig: sm2::dsa::Signature = key.sign_prehash(&e).unwrap();
        let der = sig.to_der();
        assert!(verify(GM_DISTID, &point, b"bid", der.as_bytes()));
        // Z depends on the ID: the digest for the empty ID signs something else.
        let other = message_digest("", &point, b"bid").unwrap();
        let sig: sm2::dsa::Signature = key.sign_prehash(&other).unwrap();
        assert!(!verify(GM_DISTID, &point, b"bid", sig.to_der().as_bytes()));
        assert_eq!(message_digest(GM_DISTID, &point[1..], b"bid"), None);
    }
}
