//! A certificate chain to a trust anchor, validated by `rustls-webpki`: every
//! certificate valid at the time given, issuers CA:TRUE within their pathLen, every
//! signature with one of the algorithms given (no SHA-1), and keyCertSign on every CA
//! in the path where it has keyUsage. Extended key usages are not restricted: a
//! document-signing certificate carries whatever its CA puts there.

use std::time::Duration;

use rustls_pki_types::{CertificateDer, SignatureVerificationAlgorithm, UnixTime};
use time::OffsetDateTime;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::names;

/// The signature algorithms accepted by [`verify`]: RSA PKCS#1 and PSS with SHA-2,
/// ECDSA on P-256/P-384 with SHA-2, Ed25519, and SM2-with-SM3 with the GM ID
/// ([`crate::gm`]). SHA-1 is not among them.
pub static DEFAULT_ALGORITHMS: &[&dyn SignatureVerificationAlgorithm] = &[
    webpki::aws_lc_rs::RSA_PKCS1_2048_8192_SHA256,
    webpki::aws_lc_rs::RSA_PKCS1_2048_8192_SHA384,
    webpki::aws_lc_rs::RSA_PKCS1_2048_8192_SHA512,
    webpki::aws_lc_rs::RSA_PKCS1_2048_8192_SHA256_ABSENT_PARAMS,
    webpki::aws_lc_rs::RSA_PKCS1_2048_8192_SHA384_ABSENT_PARAMS,
    webpki::aws_lc_rs::RSA_PKCS1_2048_8192_SHA512_ABSENT_PARAMS,
    webpki::aws_lc_rs::RSA_PSS_2048_8192_SHA256_LEGACY_KEY,
    webpki::aws_lc_rs::RSA_PSS_2048_8192_SHA384_LEGACY_KEY,
    webpki::aws_lc_rs::RSA_PSS_2048_8192_SHA512_LEGACY_KEY,
    webpki::aws_lc_rs::ECDSA_P256_SHA256,
    webpki::aws_lc_rs::ECDSA_P256_SHA384,
    webpki::aws_lc_rs::ECDSA_P384_SHA256,
    webpki::aws_lc_rs::ECDSA_P384_SHA384,
    webpki::aws_lc_rs::ED25519,
    &crate::gm::SM2_SM3_GM,
    &crate::gm::SM2_SM3_GM_NULL_PARAMS,
];

/// A chain that validated: the subjects from the leaf's issuer up to the anchor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// Subjects of the intermediates, then of the anchor.
    pub path: Vec<String>,
}

/// Why a chain did not validate.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ChainError {
    /// No trust anchor is configured.
    #[error("no trust anchor is configured")]
    NoAnchors,
    /// The certificate (or an anchor) cannot be parsed.
    #[error("cannot be parsed: {0}")]
    Malformed(String),
    /// The leaf is itself a CA certificate.
    #[error("it is a CA certificate")]
    LeafIsCa,
    /// The leaf is outside its validity.
    #[error("it is not valid at this time ({0})")]
    LeafNotValid(String),
    /// A CA certificate of the path is outside its validity.
    #[error("a CA certificate in the chain is not valid at this time ({0})")]
    CaNotValid(String),
    /// An issuer in the path is not a CA, or its pathLen is exceeded.
    #[error("an issuer in the chain may not issue certificates ({0})")]
    NotACa(String),
    /// A signature uses an algorithm that is not accepted (SHA-1, unknown).
    #[error("a signature in the chain uses an algorithm that is not accepted ({0})")]
    Algorithm(String),
    /// No path from the leaf to an anchor: unknown issuer or a signature that does not
    /// verify.
    #[error(
        "issuer {issuer} is neither a trust anchor nor in the chain given, or its signature does not match"
    )]
    UnknownIssuer {
        /// The leaf's issuer.
        issuer: String,
    },
    /// Anything else webpki refused.
    #[error("{0}")]
    Other(String),
}

impl ChainError {
    /// For the user, in Chinese or English.
    pub fn explain(&self, zh: bool) -> String {
        if !zh {
            return self.to_string();
        }
        match self {
            ChainError::NoAnchors => "未配置受信任的根证书".to_owned(),
            ChainError::Malformed(e) => format!("证书无法解析（{e}）"),
            ChainError::LeafIsCa => "这是一张 CA 证书".to_owned(),
            ChainError::LeafNotValid(e) => format!("证书不在有效期内（{e}）"),
            ChainError::CaNotValid(e) => format!("证书链中的 CA 证书不在有效期内（{e}）"),
            ChainError::NotACa(e) => format!("证书链中的签发者无权签发证书（{e}）"),
            ChainError::Algorithm(e) => format!("证书链使用了不被接受的签名算法（{e}）"),
            ChainError::UnknownIssuer { issuer } => format!(
                "签发者“{issuer}”既不是受信任的根证书，也不在给出的证书链中，或其签名不匹配"
            ),
            ChainError::Other(e) => e.clone(),
        }
    }
}

fn unix(t: OffsetDateTime) -> UnixTime {
    UnixTime::since_unix_epoch(Duration::from_secs(t.unix_timestamp().max(0) as u64))
}

/// Validates `leaf` through `intermediates` (not trusted by themselves) to one of
/// `anchors` (DER), at `at`, with [`DEFAULT_ALGORITHMS`].
pub fn verify(
    leaf: &[u8],
    intermediates: &[Vec<u8>],
    anchors: &[Vec<u8>],
    at: OffsetDateTime,
) -> Result<Verified, ChainError> {
    verify_with(leaf, intermediates, anchors, at, &[])
}

/// Like [`verify`], also accepting the signature algorithms in `extra`.
pub fn verify_with(
    leaf: &[u8],
    intermediates: &[Vec<u8>],
    anchors: &[Vec<u8>],
    at: OffsetDateTime,
    extra: &[&dyn SignatureVerificationAlgorithm],
) -> Result<Verified, ChainError> {
    if anchors.is_empty() {
        return Err(ChainError::NoAnchors);
    }
    let (_, parsed) =
        X509Certificate::from_der(leaf).map_err(|e| ChainError::Malformed(e.to_string()))?;
    let issuer = names::format(parsed.issuer());
    let anchor_ders: Vec<CertificateDer<'_>> = anchors
        .iter()
        .map(|a| CertificateDer::from(a.as_slice()))
        .collect();
    let trust: Vec<_> = anchor_ders
        .iter()
        .map(|d| webpki::anchor_from_trusted_cert(d))
        .collect::<Result<_, _>>()
        .map_err(|e| ChainError::Malformed(format!("trust anchor: {e}")))?;
    let inter: Vec<CertificateDer<'_>> = intermediates
        .iter()
        .map(|d| CertificateDer::from(d.as_slice()))
        .collect();
    let leaf_der = CertificateDer::from(leaf);
    let ee = webpki::EndEntityCert::try_from(&leaf_der)
        .map_err(|e| ChainError::Malformed(e.to_string()))?;
    let algs: Vec<&dyn SignatureVerificationAlgorithm> = DEFAULT_ALGORITHMS
        .iter()
        .chain(extra.iter())
        .copied()
        .collect();
    let path = ee
        .verify_for_usage(&algs, &trust, &inter, unix(at), AnyUsage, None, None)
        .map_err(|e| map_error(e, &parsed, at, &issuer))?;
    let mut subjects = Vec::new();
    for c in path.intermediate_certificates() {
        let der = c.der();
        let (_, ca) =
            X509Certificate::from_der(&der).map_err(|e| ChainError::Malformed(e.to_string()))?;
        let name = names::format(ca.subject());
        if let Ok(Some(ku)) = ca.key_usage() {
            if !ku.value.key_cert_sign() {
                return Err(ChainError::NotACa(format!(
                    "{name} has keyUsage without keyCertSign"
                )));
            }
        }
        subjects.push(name);
    }
    // webpki keeps only the anchor's name (the content of its Name, without the
    // SEQUENCE header), key and name constraints: its pathLen and keyUsage are ours to
    // check.
    let anchor_subject = path.anchor().subject.as_ref().to_vec();
    let inter_count = subjects.len();
    let anchor = anchors
        .iter()
        .filter_map(|a| X509Certificate::from_der(a).ok().map(|(_, c)| c))
        .find(|c| {
            let raw = c.subject().as_raw();
            raw.len() >= anchor_subject.len() && raw.ends_with(&anchor_subject)
        });
    let anchor_name = match &anchor {
        Some(c) => {
            let name = names::format(c.subject());
            if let Ok(Some(bc)) = c.basic_constraints() {
                if let Some(n) = bc.value.path_len_constraint {
                    if inter_count > n as usize {
                        return Err(ChainError::NotACa(format!(
                            "{name} allows {n} intermediate CA(s), the chain has {inter_count}"
                        )));
                    }
                }
            }
            if let Ok(Some(ku)) = c.key_usage() {
                if !ku.value.key_cert_sign() {
                    return Err(ChainError::NotACa(format!(
                        "{name} has keyUsage without keyCertSign"
                    )));
                }
            }
            name
        }
        None => String::new(),
    };
    subjects.push(anchor_name);
    Ok(Verified { path: subjects })
}

fn map_error(
    e: webpki::Error,
    leaf: &X509Certificate<'_>,
    at: OffsetDateTime,
    issuer: &str,
) -> ChainError {
    use webpki::Error as E;
    let leaf_valid = leaf.validity().not_before.to_datetime() <= at
        && at <= leaf.validity().not_after.to_datetime();
    match e {
        E::CaUsedAsEndEntity => ChainError::LeafIsCa,
        E::CertExpired { .. } | E::CertNotValidYet { .. } | E::InvalidCertValidity => {
            if leaf_valid {
                ChainError::CaNotValid(format!("{e:?}"))
            } else {
                ChainError::LeafNotValid(format!(
                    "{} to {}",
                    leaf.validity().not_before,
                    leaf.validity().not_after
                ))
            }
        }
        E::EndEntityUsedAsCa | E::PathLenConstraintViolated => ChainError::NotACa(format!("{e:?}")),
        E::UnsupportedSignatureAlgorithmContext(_)
        | E::UnsupportedSignatureAlgorithmForPublicKeyContext(_)
        | E::SignatureAlgorithmMismatch => ChainError::Algorithm(format!("{e:?}")),
        E::UnknownIssuer | E::InvalidSignatureForPublicKey => ChainError::UnknownIssuer {
            issuer: issuer.to_owned(),
        },
        E::BadDer | E::BadDerTime | E::TrailingData(_) | E::MalformedExtensions => {
            ChainError::Malformed(format!("{e:?}"))
        }
        other => ChainError::Other(format!("{other:?}")),
    }
}

/// Accepts any extended key usage (and none).
#[derive(Debug, Clone, Copy)]
struct AnyUsage;

impl webpki::ExtendedKeyUsageValidator for AnyUsage {
    fn validate(&self, _iter: webpki::KeyPurposeIdIter<'_, '_>) -> Result<(), webpki::Error> {
        Ok(())
    }
}
