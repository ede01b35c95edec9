//! Trust anchors: the CA certificates a renewed (or listed) certificate must chain to.

use std::path::Path;

use x509_parser::prelude::{FromDer, X509Certificate};

/// A trust anchor: a CA certificate and where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Anchor {
    /// The certificate, DER.
    pub der: Vec<u8>,
    /// Where it came from (file name and block), for messages.
    pub source: String,
}

/// Why a trust anchor file was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("trust anchor {origin}: {reason}")]
pub struct AnchorError {
    /// The file (and block).
    pub origin: String,
    /// Why.
    pub reason: String,
}

impl Anchor {
    /// Every certificate of a PEM file (all its blocks must be CERTIFICATEs) or the one
    /// certificate of a DER file. Each must be a CA certificate (basicConstraints
    /// CA:TRUE, and keyCertSign where keyUsage is present), valid DER with nothing after.
    pub fn load(path: &Path) -> Result<Vec<Anchor>, AnchorError> {
        let bytes = std::fs::read(path).map_err(|e| AnchorError {
            origin: path.display().to_string(),
            reason: e.to_string(),
        })?;
        Anchor::parse(&bytes, &path.display().to_string())
    }

    /// Like [`Anchor::load`], from bytes.
    pub fn parse(bytes: &[u8], source: &str) -> Result<Vec<Anchor>, AnchorError> {
        let bad = |origin: String, reason: String| AnchorError { origin, reason };
        let blocks: Vec<(String, Vec<u8>)> = if bytes.first() == Some(&0x30) {
            vec![(source.to_owned(), bytes.to_vec())]
        } else {
            let pems = pem::parse_many(bytes).map_err(|e| bad(source.to_owned(), e.to_string()))?;
            let mut out = Vec::new();
            for (i, p) in pems.into_iter().enumerate() {
                let at = format!("{source} (block {})", i + 1);
                if p.tag() != "CERTIFICATE" {
                    return Err(bad(at, format!("a {} block, not a CERTIFICATE", p.tag())));
                }
                out.push((at, p.into_contents()));
            }
            out
        };
        if blocks.is_empty() {
            return Err(bad(
                source.to_owned(),
                "no certificate in the file".to_owned(),
            ));
        }
        blocks
            .into_iter()
            .map(|(at, der)| {
                check_ca(&der).map_err(|reason| bad(at.clone(), reason))?;
                Ok(Anchor { der, source: at })
            })
            .collect()
    }
}

/// Whether `der` is a CA certificate fit to be an anchor; `Err` says why not.
pub fn check_ca(der: &[u8]) -> Result<(), String> {
    let (rest, cert) =
        X509Certificate::from_der(der).map_err(|e| format!("not an X.509 certificate: {e}"))?;
    if !rest.is_empty() {
        return Err(format!("{} bytes after the certificate", rest.len()));
    }
    let name = crate::names::format(cert.subject());
    match cert.basic_constraints() {
        Ok(Some(bc)) if bc.value.ca => {}
        Ok(_) => {
            return Err(format!(
                "{name} is not a CA certificate (no basicConstraints CA:TRUE)"
            ));
        }
        Err(e) => return Err(format!("{name}: basicConstraints: {e}")),
    }
    match cert.key_usage() {
        Ok(Some(ku)) if !ku.value.key_cert_sign() => Err(format!(
            "{name} may not sign certificates (keyUsage without keyCertSign)"
        )),
        Ok(_) => Ok(()),
        Err(e) => Err(format!("{name}: keyUsage: {e}")),
    }
}

/// A certificate as a PEM block.
pub fn to_pem(der: &[u8]) -> String {
    pem::encode(&pem::Pem::new("CERTIFICATE", der.to_vec()))
}
