//! Small cryptographic helpers: public-key classification, signature verification of
//! the two algorithms a token can produce, hashing and randomness (aws-lc-rs).

use aws_lc_rs::digest;
use aws_lc_rs::signature::{self, UnparsedPublicKey};
use ukey_portal_api::{KeyAlgorithm, SignatureAlgorithm};
use x509_parser::public_key::PublicKey;
use x509_parser::x509::SubjectPublicKeyInfo;

const OID_P256: &str = "1.2.840.10045.3.1.7";
const OID_SM2: &str = "1.2.156.10197.1.301";
/// SM2-with-SM3 (1.2.156.10197.1.501).
pub const OID_SM2_WITH_SM3: &str = "1.2.156.10197.1.501";

/// What kind of public key a SubjectPublicKeyInfo holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyKind {
    /// RSA with this modulus size in bits.
    Rsa {
        /// Modulus size.
        bits: usize,
    },
    /// EC on P-256.
    EcP256,
    /// SM2 (id-ecPublicKey on the SM2 curve).
    Sm2,
    /// Anything else (named for messages).
    Other(String),
}

impl KeyKind {
    /// Classifies a parsed SPKI.
    pub fn of(spki: &SubjectPublicKeyInfo<'_>) -> KeyKind {
        match spki.parsed() {
            Ok(PublicKey::RSA(rsa)) => KeyKind::Rsa {
                bits: rsa.key_size(),
            },
            Ok(PublicKey::EC(_)) => {
                let curve = spki
                    .algorithm
                    .parameters
                    .as_ref()
                    .and_then(|p| p.as_oid().ok())
                    .map(|o| o.to_id_string());
                if curve.as_deref() == Some(OID_P256) {
                    KeyKind::EcP256
                } else if curve.as_deref() == Some(OID_SM2) {
                    KeyKind::Sm2
                } else {
                    KeyKind::Other(format!(
                        "EC on curve {}",
                        curve.unwrap_or_else(|| "?".into())
                    ))
                }
            }
            Ok(_) | Err(_) => KeyKind::Other(spki.algorithm.algorithm.to_id_string()),
        }
    }

    /// The protocol's name for this key, if it is one the protocol supports.
    pub fn algorithm(&self) -> Option<KeyAlgorithm> {
        match self {
            KeyKind::Rsa { bits: 2048 } => Some(KeyAlgorithm::Rsa2048),
            KeyKind::EcP256 => Some(KeyAlgorithm::EcP256),
            KeyKind::Sm2 => Some(KeyAlgorithm::Sm2),
            _ => None,
        }
    }

    /// Human-readable description.
    pub fn describe(&self) -> String {
        match self {
            KeyKind::Rsa { bits } => format!("RSA-{bits}"),
            KeyKind::EcP256 => "EC-P256".into(),
            KeyKind::Sm2 => "SM2".into(),
            KeyKind::Other(s) => s.clone(),
        }
    }
}

/// Verifies `signature` over `data` with the key in `spki` using `alg`. False if the
/// key does not fit the algorithm or the signature is wrong.
pub fn verify(
    spki: &SubjectPublicKeyInfo<'_>,
    alg: SignatureAlgorithm,
    data: &[u8],
    sig: &[u8],
) -> bool {
    let key_bytes: &[u8] = &spki.subject_public_key.data;
    match (alg, KeyKind::of(spki)) {
        (SignatureAlgorithm::RsaPkcs1Sha256, KeyKind::Rsa { bits })
            if (2048..=8192).contains(&bits) =>
        {
            UnparsedPublicKey::new(&signature::RSA_PKCS1_2048_8192_SHA256, key_bytes)
                .verify(data, sig)
                .is_ok()
        }
        (SignatureAlgorithm::EcdsaP256Sha256, KeyKind::EcP256) => {
            UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_ASN1, key_bytes)
                .verify(data, sig)
                .is_ok()
        }
        (SignatureAlgorithm::Sm2Sm3, KeyKind::Sm2) => {
            ukey_trust::gm::verify(ukey_trust::gm::GM_DISTID, key_bytes, data, sig)
        }
        _ => false,
    }
}

/// Whether a CSR's self-signature verifies: x509-parser's check, or SM2-with-SM3 with
/// the GM ID (which x509-parser does not know) for an SM2 key.
pub fn csr_signature_ok(
    csr: &x509_parser::certification_request::X509CertificationRequest<'_>,
) -> bool {
    if csr.signature_algorithm.algorithm.to_id_string() != OID_SM2_WITH_SM3 {
        return csr.verify_signature().is_ok();
    }
    let info = &csr.certification_request_info;
    KeyKind::of(&info.subject_pki) == KeyKind::Sm2
        && ukey_trust::gm::verify(
            ukey_trust::gm::GM_DISTID,
            &info.subject_pki.subject_public_key.data,
            info.raw,
            &csr.signature_value.data,
        )
}

/// SHA-256.
pub fn sha256(data: &[u8]) -> Vec<u8> {
    digest::digest(&digest::SHA256, data).as_ref().to_vec()
}

/// `n` random bytes from the system CSPRNG.
pub fn random_bytes(n: usize) -> Result<Vec<u8>, aws_lc_rs::error::Unspecified> {
    let mut out = vec![0u8; n];
    aws_lc_rs::rand::fill(&mut out)?;
    Ok(out)
}

/// A random identifier with a prefix, e.g. `ord_5f0c…` (128 bits).
pub fn random_id(prefix: &str) -> Result<String, aws_lc_rs::error::Unspecified> {
    Ok(format!("{prefix}_{}", hex::encode(random_bytes(16)?)))
}

/// A fresh renewal code: 8 decimal digits, the first not 0 (10000000..=99999999, so
/// that it reads the same as a CMP INTEGER), uniformly drawn.
pub fn renewal_code() -> Result<String, aws_lc_rs::error::Unspecified> {
    loop {
        let b = random_bytes(4)?;
        let n = u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
        // Rejection sampling: 42 whole ranges of 90 000 000 fit in 2^32.
        if n < 42 * 90_000_000 {
            return Ok((10_000_000 + n % 90_000_000).to_string());
        }
    }
}

/// Equality that takes the same time wherever the inputs differ.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && aws_lc_rs::constant_time::verify_slices_are_equal(a, b).is_ok()
}
