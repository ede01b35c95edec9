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
