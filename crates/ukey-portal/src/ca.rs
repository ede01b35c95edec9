//! The portal's certification authority: loading an existing CA (PEM made by OpenSSL or
//! anything else) or creating one in the data directory, issuing certificates with
//! rcgen, checking that a presented certificate chains to it, and signing CRLs.
//!
//! Files in the data directory: `ca-cert.pem` (the issuing CA certificate, optionally
//! followed by its parents: they are returned as the chain), `ca-key.pem` (its private
//! key, mode 0600) or, for a key in the HSM, `ca-key.pkcs11` (its `pkcs11:` URI, no
//! secret), and optionally `accepted-issuers.pem` (further CA certificates whose
//! certificates may be renewed, e.g. a previous CA generation).
//!
//! **CA rollover.** Importing a CA of another key does not throw the old key away: the
//! old certificate and key (file or `pkcs11:` URI) move to `retired-cas/<SKI>/`. A
//! retired CA issues nothing, but it still signs the CRL of what it issued, and its
//! certificates may still be renewed. CAs are told apart by key (the subject key
//! identifier of their certificate), never by name: a new key under the same name is
//! another CA with its own CRL.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, CrlDistributionPoint,
    DistinguishedName, DnType, DnValue, IsCa, Issuer, KeyPair, KeyUsagePurpose, RevocationReason,
    RevokedCertParams, SerialNumber, SubjectPublicKeyInfo as RcgenSpki,
};
use time::{Duration, OffsetDateTime};
use x509_parser::certificate::X509Certificate;
use x509_parser::prelude::FromDer;
use x509_parser::x509::X509Name;

use crate::crypto::random_bytes;
use crate::names::{NameKey, display_name, key_of_name};

/// CA setup or issuing failure.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A PEM file holds nothing usable.
    #[error("{0}")]
    BadPem(String),
    /// The CA key does not belong to the CA certificate, or is of an unsupported type.
    #[error("{0}")]
    BadKey(String),
    /// rcgen refused to build a certificate or CRL.
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    /// The subject cannot be reproduced by rcgen (repeated or multi-valued attributes).
    #[error("unsupported subject: {0}")]
    UnsupportedSubject(String),
    /// Randomness failure.
    #[error("random number generator failure")]
    Random,
    /// The data directory is open to other users (or cannot be made private).
    #[error("{0}")]
    DataDir(String),
    /// The CA key in the HSM (issue 16).
    #[error(transparent)]
    Hsm(#[from] crate::hsm::HsmError),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> CaError + '_ {
    move |source| CaError::Io {
        path: path.to_owned(),
        source,
    }
}

/// A CA certificate whose issued certificates the portal accepts for renewal.
#[derive(Debug, Clone)]
pub struct TrustedIssuer {
    /// Normal form of its subject.
    pub name_key: NameKey,
    /// Its subject key identifier, lower-case hex (see [`key_id_of`]).
    pub ski: String,
    /// Its certificate, DER.
    pub cert_der: Vec<u8>,
}

/// What an issued certificate is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Usage {
    /// digitalSignature + nonRepudiation.
    Signing,
    /// keyEncipherment + dataEncipherment (RSA) or keyAgreement (EC).
    Encryption {
        /// True for an EC key.
        ec: bool,
    },
}

/// A certificate the CA just issued.
#[derive(Debug, Clone)]
pub struct IssuedCert {
    /// DER.
    pub der: Vec<u8>,
    /// Canonical serial hex.
    pub serial_hex: String,
    /// Display form of the subject.
    pub subject: String,
}

/// An entry of the CRL.
#[derive(Debug, Clone)]
pub struct Revoked {
    /// Canonical serial hex.
    pub serial_hex: String,
    /// When it was revoked.
    pub revoked_at: OffsetDateTime,
    /// Why (the CRL entry's reasonCode).
    pub reason: Reason,
}

/// A revocation's reason (RFC 5280 §5.3.1), as an operator gives it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// `unspecified`.
    Unspecified,
    /// `keyCompromise`: the holder's key is no longer the holder's alone.
    KeyCompromise,
    /// `affiliationChanged`.
    AffiliationChanged,
    /// `superseded`: renewed (what an installed renewal records).
    Superseded,
    /// `cessationOfOperation`: no longer needed (a cancelled order's certificates).
    CessationOfOperation,
    /// `privilegeWithdrawn`.
    PrivilegeWithdrawn,
}

impl Reason {
    /// Every reason.
    pub const ALL: [Reason; 6] = [
        Reason::Unspecified,
        Reason::KeyCompromise,
        Reason::AffiliationChanged,
        Reason::Superseded,
        Reason::CessationOfOperation,
        Reason::PrivilegeWithdrawn,
    ];

    /// RFC 5280's name, as stored and typed.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Unspecified => "unspecified",
            Reason::KeyCompromise => "keyCompromise",
            Reason::AffiliationChanged => "affiliationChanged",
            Reason::Superseded => "superseded",
            Reason::CessationOfOperation => "cessationOfOperation",
            Reason::PrivilegeWithdrawn => "privilegeWithdrawn",
        }
    }

    /// From [`Reason::as_str`].
    pub fn parse(s: &str) -> Option<Reason> {
        Reason::ALL.into_iter().find(|r| r.as_str() == s)
    }

    fn rcgen(self) -> RevocationReason {
        match self {
            Reason::Unspecified => RevocationReason::Unspecified,
            Reason::KeyCompromise => RevocationReason::KeyCompromise,
            Reason::AffiliationChanged => RevocationReason::AffiliationChanged,
            Reason::Superseded => RevocationReason::Superseded,
            Reason::CessationOfOperation => RevocationReason::CessationOfOperation,
            Reason::PrivilegeWithdrawn => RevocationReason::PrivilegeWithdrawn,
        }
    }
}

/// The kind of key a new CA gets (`--ca-alg`); an imported CA is what its key is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CaAlg {
    /// EC P-256 (signs RSA and P-256 certificates with ECDSA; rcgen).
    #[default]
    EcP256,
    /// SM2 (signs SM2 certificates with SM2-with-SM3 and the GM ID).
    Sm2,
}

/// The key of an RSA or EC CA: from a PEM file, or in the HSM.
enum CaKey {
    File(Box<KeyPair>),
    Hsm(crate::hsm::HsmKey),
}

impl rcgen::PublicKeyData for CaKey {
    fn der_bytes(&self) -> &[u8] {
        match self {
            CaKey::File(k) => rcgen::PublicKeyData::der_bytes(k.as_ref()),
            CaKey::Hsm(k) => rcgen::PublicKeyData::der_bytes(k),
        }
    }

    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        match self {
            CaKey::File(k) => rcgen::PublicKeyData::algorithm(k.as_ref()),
            CaKey::Hsm(k) => rcgen::PublicKeyData::algorithm(k),
        }
    }
}

impl rcgen::SigningKey for CaKey {
    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
        match self {
            CaKey::File(k) => rcgen::SigningKey::sign(k.as_ref(), msg),
            CaKey::Hsm(k) => rcgen::SigningKey::sign(k, msg),
        }
    }
}

/// A CA whose key is in the HSM, named by a `pkcs11:` URI (`--ca-key pkcs11:…`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HsmCaImport {
    /// The key's URI: `pkcs11:token=…;object=…` (RFC 7512).
    pub uri: String,
    /// The CA certificate of that key (PEM; parents may follow); `None`: the data
    /// directory's, or, when it has none, a self-signed root made through the HSM key.
    pub cert: Option<PathBuf>,
    /// The subject of such a root (`C=CN, O=…, CN=…`); `None`: the reference CA's.
    pub subject: Option<String>,
}

/// What signs for the CA.
enum Signer {
    /// RSA or EC key (rcgen), a file's or the HSM's.
    Rcgen(Box<Issuer<'static, CaKey>>),
    /// SM2 key (x509-cert + sm2).
    Sm2(Box<crate::sm2ca::Sm2Ca>),
}

/// The portal's issuing CA.
pub struct Ca {
    cert_der: Vec<u8>,
    chain_der: Vec<Vec<u8>>,
    name_key: NameKey,
    display_name: String,
    signer: Signer,
    trusted: Vec<TrustedIssuer>,
    /// The `pkcs11:` URI of a key in the HSM.
    hsm_uri: Option<String>,
    /// Its subject key identifier, lower-case hex.
    ski: String,
    /// The CAs this one replaced whose keys the portal still holds (each signs the CRL
    /// of what it issued).
    retired: Vec<Ca>,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca")
            .field("name", &self.display_name)
            .finish_non_exhaustive()
    }
}

const CERT_FILE: &str = "ca-cert.pem";
const KEY_FILE: &str = "ca-key.pem";
const HSM_KEY_FILE: &str = "ca-key.pkcs11";
const ACCEPTED_FILE: &str = "accepted-issuers.pem";
const CMP_CERT_FILE: &str = "cmp-cert.pem";
const CMP_KEY_FILE: &str = "cmp-key.pem";
/// Where a CA replaced by one of another key is kept, one directory per SKI.
pub const RETIRED_DIR: &str = "retired-cas";

impl Ca {
    /// Opens the CA of `data_dir`. With `import = Some((cert, key))` those PEM files are
    /// checked and copied into the data directory first (replacing any CA there);
    /// without, an existing CA is used, or a new CA with a key of `alg` is created.
    pub fn open(
        data_dir: &Path,
        import: Option<(&Path, &Path)>,
        alg: CaAlg,
    ) -> Result<Ca, CaError> {
        Ca::open_with(data_dir, import, None, alg, None)
    }

    /// [`Ca::open`], with a CA key in the HSM: `hsm_import` makes the data directory's
    /// CA the key that URI names (its certificate given, the data directory's, or a new
    /// self-signed root made through the HSM key), recorded in `ca-key.pkcs11`; a data
    /// directory whose CA key is recorded there opens it in `hsm`.
    pub fn open_with(
        data_dir: &Path,
        import: Option<(&Path, &Path)>,
        hsm_import: Option<&HsmCaImport>,
        alg: CaAlg,
        hsm: Option<&crate::hsm::Hsm>,
    ) -> Result<Ca, CaError> {
        let mut ca = Ca::open_active(data_dir, import, hsm_import, alg, hsm)?;
        ca.retired = retired_cas(data_dir, &ca.ski, hsm)?;
        for old in &ca.retired {
            ca.trusted.push(TrustedIssuer {
                name_key: old.name_key.clone(),
                ski: old.ski.clone(),
                cert_der: old.cert_der.clone(),
            });
        }
        Ok(ca)
    }

    fn open_active(
        data_dir: &Path,
        import: Option<(&Path, &Path)>,
        hsm_import: Option<&HsmCaImport>,
        alg: CaAlg,
        hsm: Option<&crate::hsm::Hsm>,
    ) -> Result<Ca, CaError> {
        let cert_path = data_dir.join(CERT_FILE);
        let key_path = data_dir.join(KEY_FILE);
        let hsm_key_path = data_dir.join(HSM_KEY_FILE);
        if let Some(imp) = hsm_import {
            return Ca::import_hsm(data_dir, imp, alg, hsm);
        }
        Ca::load_dir(data_dir, import.is_none(), hsm)
            .transpose()
            .unwrap_or_else(|| {
                Ca::create_or_import(data_dir, import, alg, &cert_path, &key_path, &hsm_key_path)
            })
    }

    /// The CA of `dir` (`ca-cert.pem` with `ca-key.pem` or `ca-key.pkcs11`), when it has
    /// one and `existing` (else `None`: an import or a new CA is made instead).
    fn load_dir(
        dir: &Path,
        existing: bool,
        hsm: Option<&crate::hsm::Hsm>,
    ) -> Result<Option<Ca>, CaError> {
        let cert_path = dir.join(CERT_FILE);
        let key_path = dir.join(KEY_FILE);
        let hsm_key_path = dir.join(HSM_KEY_FILE);
        if !existing {
            return Ok(None);
        }
        if hsm_key_path.exists() {
            let uri = std::fs::read_to_string(&hsm_key_path).map_err(io_err(&hsm_key_path))?;
            let uri = uri.trim();
            let hsm = hsm.ok_or_else(|| crate::hsm::HsmError::CaKeyNeedsHsm {
                uri: uri.to_owned(),
            })?;
            let key = hsm.ca_key(&crate::hsm::Pkcs11Uri::parse(uri)?)?;
            let cert_pem = std::fs::read_to_string(&cert_path).map_err(io_err(&cert_path))?;
            return Ca::from_hsm_key(&cert_pem, key, accepted_issuers(dir)?).map(Some);
        }
        if !cert_path.exists() {
            return Ok(None);
        }
        let cert_pem = std::fs::read_to_string(&cert_path).map_err(io_err(&cert_path))?;
        let key_pem = std::fs::read_to_string(&key_path).map_err(io_err(&key_path))?;
        Ca::from_pem(&cert_pem, &key_pem, accepted_issuers(dir)?).map(Some)
    }

    fn create_or_import(
        data_dir: &Path,
        import: Option<(&Path, &Path)>,
        alg: CaAlg,
        cert_path: &Path,
        key_path: &Path,
        hsm_key_path: &Path,
    ) -> Result<Ca, CaError> {
        if let Some((cert_src, key_src)) = import {
            let cert_pem = std::fs::read_to_string(cert_src).map_err(io_err(cert_src))?;
            let key_pem = std::fs::read_to_string(key_src).map_err(io_err(key_src))?;
            // Validate before copying, so a bad pair never replaces a good one.
            let new = Ca::from_pem(&cert_pem, &key_pem, Vec::new())?;
            retire_current(data_dir, &new.ski)?;
            write_private(cert_path, cert_pem.as_bytes())?;
            write_private(key_path, key_pem.as_bytes())?;
            remove_if_there(hsm_key_path)?;
        } else {
            let (cert_pem, key_pem) = match alg {
                CaAlg::EcP256 => create_ca()?,
                CaAlg::Sm2 => create_sm2_ca()?,
            };
            write_private(cert_path, cert_pem.as_bytes())?;
            write_private(key_path, key_pem.as_bytes())?;
        }
        let cert_pem = std::fs::read_to_string(cert_path).map_err(io_err(cert_path))?;
        let key_pem = std::fs::read_to_string(key_path).map_err(io_err(key_path))?;
        Ca::from_pem(&cert_pem, &key_pem, accepted_issuers(data_dir)?)
    }

    /// `--ca-key pkcs11:…`: the data directory's CA becomes the HSM key's. Its
    /// certificate: the one given, else the data directory's when it is that key's, else
    /// (no CA yet) a self-signed root made through the HSM key. A data directory whose CA
    /// is another key's is not replaced without the new certificate.
    fn import_hsm(
        data_dir: &Path,
        imp: &HsmCaImport,
        alg: CaAlg,
        hsm: Option<&crate::hsm::Hsm>,
    ) -> Result<Ca, CaError> {
        let uri = crate::hsm::Pkcs11Uri::parse(&imp.uri)?;
        if alg == CaAlg::Sm2 {
            return Err(crate::hsm::HsmError::KeyUnsupported {
                uri: imp.uri.clone(),
                detail: crate::hsm::SM2_REFUSAL.into(),
            }
            .into());
        }
        let hsm = hsm.ok_or_else(|| crate::hsm::HsmError::CaKeyNeedsHsm {
            uri: imp.uri.clone(),
        })?;
        let key = hsm.ca_key(&uri)?;
        let cert_path = data_dir.join(CERT_FILE);
        let cert_pem = match &imp.cert {
            Some(src) => std::fs::read_to_string(src).map_err(io_err(src))?,
            None if cert_path.exists() => {
                let pem = std::fs::read_to_string(&cert_path).map_err(io_err(&cert_path))?;
                let first = parse_cert_bundle(&pem)?.remove(0);
                let (_, cert) = X509Certificate::from_der(&first)
                    .map_err(|e| CaError::BadPem(format!("CA certificate: {e}")))?;
                if cert.public_key().subject_public_key.as_ref()
                    != rcgen::PublicKeyData::der_bytes(&key)
                {
                    return Err(CaError::BadKey(format!(
                        "数据目录中的 CA 证书（{}）不是该 HSM 密钥的证书 / the data directory's CA certificate ({}) is not of the HSM key {}: \
                         give that key's certificate with --ca-cert, or move {} and {} away to make a new root with it",
                        display_name(cert.subject()),
                        display_name(cert.subject()),
                        imp.uri,
                        cert_path.display(),
                        data_dir.join(KEY_FILE).display()
                    )));
                }
                let other_subject = imp.subject.as_deref().is_some_and(|want| {
                    crate::names::key_of_dn_string(want).ok() != Some(key_of_name(cert.subject()))
                });
                if other_subject {
                    return Err(CaError::BadKey(format!(
                        "数据目录中已有该 HSM 密钥的 CA 证书，主题为 {} / the data directory already holds a CA certificate of this key, with subject {}: \
                         move {} away to make a new root with another subject",
                        display_name(cert.subject()),
                        display_name(cert.subject()),
                        cert_path.display()
                    )));
                }
                pem
            }
            None => self_signed_root(&key, imp.subject.as_deref())?,
        };
        let ca = Ca::from_hsm_key(&cert_pem, key, accepted_issuers(data_dir)?)?;
        retire_current(data_dir, &ca.ski)?;
        write_private(&cert_path, cert_pem.as_bytes())?;
        write_private(
            &data_dir.join(HSM_KEY_FILE),
            format!("{}\n", imp.uri).as_bytes(),
        )?;
        // The CA key is the HSM's now: no file key beside it.
        remove_if_there(&data_dir.join(KEY_FILE))?;
        Ok(ca)
    }

    /// Builds a CA from a PEM bundle (issuing CA first) and its key in the HSM, after
    /// proving that key is the certificate's: a signature made in the HSM verifies with
    /// the certificate's public key.
    pub fn from_hsm_key(
        cert_pem: &str,
        key: crate::hsm::HsmKey,
        accepted: Vec<Vec<u8>>,
    ) -> Result<Ca, CaError> {
        let chain_der = parse_cert_bundle(cert_pem)?;
        let (_, cert) = X509Certificate::from_der(&chain_der[0])
            .map_err(|e| CaError::BadPem(format!("CA certificate: {e}")))?;
        let probe = b"ukey-portal: the HSM key is the CA certificate's";
        let sig = key.sign_bytes(probe)?;
        let alg = if rcgen::PublicKeyData::algorithm(&key) == &rcgen::PKCS_RSA_SHA256 {
            ukey_portal_api::SignatureAlgorithm::RsaPkcs1Sha256
        } else {
            ukey_portal_api::SignatureAlgorithm::EcdsaP256Sha256
        };
        if cert.public_key().subject_public_key.as_ref() != rcgen::PublicKeyData::der_bytes(&key)
            || !crate::crypto::verify(cert.public_key(), alg, probe, &sig)
        {
            return Err(CaError::BadKey(format!(
                "HSM 密钥 {} 不是该 CA 证书的密钥 / the HSM key {} does not belong to the CA certificate",
                key.uri(),
                key.uri()
            )));
        }
        let uri = key.uri().to_owned();
        let signer = Signer::Rcgen(Box::new(Issuer::from_ca_cert_der(
            &chain_der[0].as_slice().into(),
            CaKey::Hsm(key),
        )?));
        let mut ca = Ca::assemble(chain_der, signer, accepted)?;
        ca.hsm_uri = Some(uri);
        Ok(ca)
    }

    /// The `pkcs11:` URI of the CA key when it is in the HSM.
    pub fn hsm_uri(&self) -> Option<&str> {
        self.hsm_uri.as_deref()
    }

    /// Adds CA certificates (PEM bundle) whose certificates may be renewed too.
    /// Nothing is written unless `pem` holds at least one valid certificate; the data directory
    /// is created when it does not exist yet (a CA may be accepted before the first serve).
    pub fn add_accepted_issuers(data_dir: &Path, pem: &str) -> Result<usize, CaError> {
        let certs = parse_cert_bundle(pem)?;
        crate::datadir::prepare(data_dir).map_err(CaError::DataDir)?;
        let path = data_dir.join(ACCEPTED_FILE);
        let mut existing = if path.exists() {
            std::fs::read_to_string(&path).map_err(io_err(&path))?
        } else {
            String::new()
        };
        existing.push_str(pem);
        if !existing.ends_with('\n') {
            existing.push('\n');
        }
        write_private(&path, existing.as_bytes())?;
        Ok(certs.len())
    }

    /// Builds a CA from a PEM bundle (issuing CA first) and its key: RSA or EC (PKCS#8,
    /// SEC1 or PKCS#1), or SM2 (PKCS#8, as `openssl genpkey -algorithm SM2` writes it).
    pub fn from_pem(cert_pem: &str, key_pem: &str, accepted: Vec<Vec<u8>>) -> Result<Ca, CaError> {
        use sm2::pkcs8::DecodePrivateKey as _;
        let chain_der = parse_cert_bundle(cert_pem)?;
        let cert_der = chain_der[0].clone();
        let (_, cert) = X509Certificate::from_der(&cert_der)
            .map_err(|e| CaError::BadPem(format!("CA certificate: {e}")))?;
        let signer = if sm2::SecretKey::from_pkcs8_pem(key_pem).is_ok() {
            let first = pem::encode(&pem::Pem::new("CERTIFICATE", cert_der.clone()));
            Signer::Sm2(Box::new(crate::sm2ca::Sm2Ca::from_pem(&first, key_pem)?))
        } else {
            let key = load_key(key_pem)?;
            if cert.public_key().subject_public_key.as_ref() != key.public_key_raw() {
                return Err(CaError::BadKey(
                    "the CA key does not belong to the CA certificate".into(),
                ));
            }
            Signer::Rcgen(Box::new(Issuer::from_ca_cert_der(
                &cert_der.as_slice().into(),
                CaKey::File(Box::new(key)),
            )?))
        };
        Ca::assemble(chain_der, signer, accepted)
    }

    fn assemble(
        chain_der: Vec<Vec<u8>>,
        signer: Signer,
        accepted: Vec<Vec<u8>>,
    ) -> Result<Ca, CaError> {
        let cert_der = chain_der[0].clone();
        let (_, cert) = X509Certificate::from_der(&cert_der)
            .map_err(|e| CaError::BadPem(format!("CA certificate: {e}")))?;
        let name_key = key_of_name(cert.subject());
        let display = display_name(cert.subject());
        let ski = hex::encode(key_id_of(&cert));
        let mut trusted = vec![TrustedIssuer {
            name_key: name_key.clone(),
            ski: ski.clone(),
            cert_der: cert_der.clone(),
        }];
        for der in accepted {
            let (_, c) = X509Certificate::from_der(&der)
                .map_err(|e| CaError::BadPem(format!("accepted issuer: {e}")))?;
            trusted.push(TrustedIssuer {
                name_key: key_of_name(c.subject()),
                ski: hex::encode(key_id_of(&c)),
                cert_der: der.clone(),
            });
        }
        Ok(Ca {
            cert_der,
            chain_der,
            name_key,
            display_name: display,
            signer,
            trusted,
            hsm_uri: None,
            ski,
            retired: Vec::new(),
        })
    }

    /// Its subject key identifier, lower-case hex: what its revocations are kept under.
    pub fn ski(&self) -> &str {
        &self.ski
    }

    /// The CAs it replaced whose keys the portal holds (retired: they sign CRLs only).
    pub fn retired(&self) -> &[Ca] {
        &self.retired
    }

    /// Every CA whose key the portal holds: this one, then the retired ones.
    pub fn keyring(&self) -> impl Iterator<Item = &Ca> {
        std::iter::once(self).chain(self.retired.iter())
    }

    /// The CA of the key `ski` (lower-case hex) names, if the portal holds that key.
    pub fn by_ski(&self, ski: &str) -> Option<&Ca> {
        self.keyring().find(|c| c.ski == ski)
    }

    /// The CA of the portal's keyring whose key signed `der` (a certificate).
    pub fn signer_of(&self, der: &[u8]) -> Option<&Ca> {
        let (_, cert) = X509Certificate::from_der(der).ok()?;
        self.keyring().find(|c| {
            X509Certificate::from_der(&c.cert_der)
                .ok()
                .is_some_and(|(_, ca)| {
                    c.name_key == key_of_name(cert.issuer()) && signed_by(&cert, &ca)
                })
        })
    }

    /// The SKI of the first trusted issuer named `name` (revocations recorded before
    /// they were kept by key name their issuer this way).
    pub fn ski_for_name(&self, name: &NameKey) -> Option<&str> {
        self.trusted
            .iter()
            .find(|t| t.name_key == *name)
            .map(|t| t.ski.as_str())
    }

    /// Every issuer whose certificates may be renewed: the keyring's CAs and the
    /// accepted issuers.
    pub fn trusted(&self) -> &[TrustedIssuer] {
        &self.trusted
    }

    /// Its certificate's validity end.
    pub fn not_after(&self) -> Option<OffsetDateTime> {
        X509Certificate::from_der(&self.cert_der)
            .ok()
            .map(|(_, c)| c.validity().not_after.to_datetime())
    }

    /// The kind of key the CA signs with.
    pub fn alg(&self) -> CaAlg {
        match self.signer {
            Signer::Rcgen(_) => CaAlg::EcP256,
            Signer::Sm2(_) => CaAlg::Sm2,
        }
    }

    /// What its key is: "RSA-2048", "EC-P256", "SM2", …
    pub fn key_description(&self) -> String {
        let key = match &self.signer {
            Signer::Sm2(_) => return crate::crypto::KeyKind::Sm2.describe(),
            Signer::Rcgen(issuer) => issuer.key(),
        };
        let spki = rcgen::PublicKeyData::subject_public_key_info(key);
        x509_parser::x509::SubjectPublicKeyInfo::from_der(&spki)
            .map(|(_, k)| crate::crypto::KeyKind::of(&k).describe())
            .unwrap_or_else(|_| "?".into())
    }

    /// Whether this CA issues certificates for keys of `alg`: an SM2 CA issues SM2
    /// certificates, an RSA or EC CA the others.
    pub fn issues(&self, alg: ukey_portal_api::KeyAlgorithm) -> bool {
        (alg == ukey_portal_api::KeyAlgorithm::Sm2) == (self.alg() == CaAlg::Sm2)
    }

    /// The issuing CA certificate, DER.
    pub fn cert_der(&self) -> &[u8] {
        &self.cert_der
    }
    /// Issuing CA first, then its parents as configured.
    pub fn chain_der(&self) -> &[Vec<u8>] {
        &self.chain_der
    }
    /// Normal form of the CA's subject (= issuer of what it issues).
    pub fn name_key(&self) -> &NameKey {
        &self.name_key
    }
    /// Display form of the CA's subject.
    pub fn display_name(&self) -> &str {
        &self.display_name
    }

    /// The trusted issuer (the portal's CA, a retired one, or an accepted issuer) whose
    /// key signed `cert`.
    pub fn issuer_of(&self, cert: &X509Certificate<'_>) -> Option<&TrustedIssuer> {
        let issuer_key = key_of_name(cert.issuer());
        self.trusted
            .iter()
            .filter(|t| t.name_key == issuer_key)
            .find(|t| {
                X509Certificate::from_der(&t.cert_der)
                    .ok()
                    .is_some_and(|(_, ca)| signed_by(cert, &ca))
            })
    }

    /// Issues a certificate for `public_key_spki` with the subject of `subject`.
    pub fn issue(
        &self,
        subject: &X509Name<'_>,
        public_key_spki: &[u8],
        usage: Usage,
        years: u32,
        crl_url: Option<&str>,
        now: OffsetDateTime,
    ) -> Result<IssuedCert, CaError> {
        let issuer = match &self.signer {
            Signer::Rcgen(issuer) => issuer,
            Signer::Sm2(ca) => {
                return ca.issue(
                    subject.as_raw(),
                    public_key_spki,
                    usage,
                    years,
                    crl_url,
                    now,
                );
            }
        };
        let mut params = CertificateParams::default();
        params.distinguished_name = dn_from_name(subject)?;
        params.not_before = now - Duration::minutes(5);
        params.not_after = add_years(now, years);
        let mut serial = random_bytes(16).map_err(|_| CaError::Random)?;
        // Positive, and a fixed length so the canonical hex is always 32 digits.
        serial[0] = (serial[0] & 0x7f) | 0x40;
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = match usage {
            Usage::Signing => vec![
                KeyUsagePurpose::DigitalSignature,
                KeyUsagePurpose::ContentCommitment,
            ],
            Usage::Encryption { ec: false } => {
                vec![
                    KeyUsagePurpose::KeyEncipherment,
                    KeyUsagePurpose::DataEncipherment,
                ]
            }
            Usage::Encryption { ec: true } => vec![KeyUsagePurpose::KeyAgreement],
        };
        params.use_authority_key_identifier_extension = true;
        if let Some(url) = crl_url {
            params.crl_distribution_points = vec![CrlDistributionPoint {
                uris: vec![url.to_owned()],
            }];
        }
        let spki = RcgenSpki::from_der(public_key_spki)?;
        let cert = params.signed_by(&spki, issuer.as_ref())?;
        Ok(IssuedCert {
            der: cert.der().to_vec(),
            serial_hex: ukey_portal_api::serial_hex_from_bytes(&serial),
            subject: display_name(subject),
        })
    }

    /// The key and certificate protecting the portal's CMP answers: an end-entity
    /// certificate (digitalSignature; P-256 under an RSA or EC CA, SM2 under an SM2
    /// CA) this CA issued for the purpose, kept in the data directory, made at first
    /// use and again when the CA changed or it nears its end. Clients check it as any
    /// certificate, up to their trust anchors.
    pub fn cmp_identity(
        &self,
        data_dir: &Path,
        now: OffsetDateTime,
    ) -> Result<CmpIdentity, CaError> {
        let cert_path = data_dir.join(CMP_CERT_FILE);
        let key_path = data_dir.join(CMP_KEY_FILE);
        if cert_path.exists() && key_path.exists() {
            let cert_pem = std::fs::read_to_string(&cert_path).map_err(io_err(&cert_path))?;
            let key_pem = std::fs::read_to_string(&key_path).map_err(io_err(&key_path))?;
            let der = parse_cert_bundle(&cert_pem)?.remove(0);
            let (_, own) = X509Certificate::from_der(&self.cert_der)
                .map_err(|e| CaError::BadPem(format!("CA certificate: {e}")))?;
            let current = X509Certificate::from_der(&der).ok().is_some_and(|(_, c)| {
                signed_by(&c, &own)
                    && c.validity().not_after.timestamp()
                        > (now + Duration::days(30)).unix_timestamp()
            });
            let key = match &self.signer {
                Signer::Rcgen(_) => load_key(&key_pem).map(CmpKey::Rcgen),
                Signer::Sm2(_) => crate::sm2ca::Sm2Signer::from_pem(&key_pem).map(CmpKey::Sm2),
            };
            if let (true, Ok(key)) = (current, key) {
                return Ok(CmpIdentity { key, cert_der: der });
            }
        }
        let cn = format!(
            "{} CMP",
            self.display_name
                .replace([',', '+', '=', '"', '\\', '<', '>', ';'], " ")
        );
        let (key, cert_der, cert_pem, key_pem) = match &self.signer {
            Signer::Rcgen(issuer) => {
                let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
                let mut params = CertificateParams::default();
                let mut dn = DistinguishedName::new();
                dn.push(DnType::CommonName, cn);
                params.distinguished_name = dn;
                params.not_before = now - Duration::minutes(5);
                params.not_after = add_years(now, 2);
                let mut serial = random_bytes(16).map_err(|_| CaError::Random)?;
                serial[0] = (serial[0] & 0x7f) | 0x40;
                params.serial_number = Some(SerialNumber::from_slice(&serial));
                params.is_ca = IsCa::ExplicitNoCa;
                params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
                params.use_authority_key_identifier_extension = true;
                let cert = params.signed_by(&key, issuer.as_ref())?;
                let key_pem = zeroize::Zeroizing::new(key.serialize_pem());
                (CmpKey::Rcgen(key), cert.der().to_vec(), cert.pem(), key_pem)
            }
            Signer::Sm2(ca) => {
                let (key, der, key_pem) = ca.issue_signer(&cn, now)?;
                let pem = pem::encode(&pem::Pem::new("CERTIFICATE", der.clone()));
                (CmpKey::Sm2(key), der, pem, key_pem)
            }
        };
        write_private(&cert_path, cert_pem.as_bytes())?;
        write_private(&key_path, key_pem.as_bytes())?;
        Ok(CmpIdentity { key, cert_der })
    }

    /// Signs a CRL listing `revoked` (each with its reason), valid for 7 days.
    pub fn crl(
        &self,
        revoked: &[Revoked],
        crl_number: u64,
        now: OffsetDateTime,
    ) -> Result<Vec<u8>, CaError> {
        let issuer = match &self.signer {
            Signer::Rcgen(issuer) => issuer,
            Signer::Sm2(ca) => return ca.crl(revoked, crl_number, now),
        };
        let mut entries = Vec::with_capacity(revoked.len());
        for r in revoked {
            let bytes = hex::decode(&r.serial_hex).map_err(|_| {
                CaError::BadPem(format!("stored serial {} is not hex", r.serial_hex))
            })?;
            entries.push(RevokedCertParams {
                serial_number: SerialNumber::from_slice(&bytes),
                revocation_time: r.revoked_at,
                reason_code: Some(r.reason.rcgen()),
                invalidity_date: None,
            });
        }
        let params = CertificateRevocationListParams {
            this_update: now - Duration::minutes(5),
            next_update: now + Duration::days(7),
            crl_number: SerialNumber::from_slice(&crl_number.to_be_bytes()),
            issuing_distribution_point: None,
            revoked_certs: entries,
            // The CRL's authority key identifier is the CA certificate's SKI, whatever
            // method made it: a relying party holding two CA certificates of one name
            // finds the CRL's issuer by it.
            key_identifier_method: rcgen::KeyIdMethod::PreSpecified(
                hex::decode(&self.ski).unwrap_or_default(),
            ),
        };
        Ok(params.signed_by(issuer.as_ref())?.der().to_vec())
    }
}

/// What protects the portal's CMP answers (see [`Ca::cmp_identity`]).
pub struct CmpIdentity {
    key: CmpKey,
    cert_der: Vec<u8>,
}

/// The key of the CMP protection certificate: RSA or EC (rcgen), or SM2.
enum CmpKey {
    Rcgen(KeyPair),
    Sm2(crate::sm2ca::Sm2Signer),
}

impl std::fmt::Debug for CmpIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CmpIdentity").finish_non_exhaustive()
    }
}

impl CmpIdentity {
    /// The protection certificate, DER.
    pub fn cert_der(&self) -> &[u8] {
        &self.cert_der
    }

    /// Its key, as the CMP layer signs with it.
    pub fn signer(&self) -> CaCmpSigner<'_> {
        CaCmpSigner(&self.key)
    }
}

/// The key signing the portal's CMP messages.
pub struct CaCmpSigner<'a>(&'a CmpKey);

impl std::fmt::Debug for CaCmpSigner<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaCmpSigner").finish_non_exhaustive()
    }
}

impl ukey_cmp::CmpSigner for CaCmpSigner<'_> {
    fn algorithm(&self) -> ukey_cmp::spki::AlgorithmIdentifierOwned {
        let key = match self.0 {
            CmpKey::Sm2(_) => {
                return ukey_cmp::spki::AlgorithmIdentifierOwned {
                    oid: ukey_cmp::SM2_WITH_SM3,
                    parameters: None,
                };
            }
            CmpKey::Rcgen(k) => k,
        };
        let alg = key.algorithm();
        let (oid, null) = if alg == &rcgen::PKCS_RSA_SHA256 {
            (ukey_cmp::SHA256_WITH_RSA, true)
        } else if alg == &rcgen::PKCS_ECDSA_P384_SHA384 {
            // ecdsa-with-SHA384
            (
                ukey_cmp::spki::ObjectIdentifier::new_unwrap("1.2.840.10045.4.3.3"),
                false,
            )
        } else {
            (ukey_cmp::ECDSA_WITH_SHA256, false)
        };
        use ukey_cmp::der::asn1::{Any, Null};
        ukey_cmp::spki::AlgorithmIdentifierOwned {
            oid,
            parameters: null.then(|| Any::from(Null)),
        }
    }

    fn sign(&self, data: &[u8]) -> ukey_cmp::Result<Vec<u8>> {
        let signed = match self.0 {
            CmpKey::Rcgen(k) => rcgen::SigningKey::sign(k, data).map_err(|e| e.to_string()),
            CmpKey::Sm2(k) => k.sign(data).map_err(|e| e.to_string()),
        };
        signed.map_err(ukey_cmp::CmpError::Signing)
    }
}

fn add_years(now: OffsetDateTime, years: u32) -> OffsetDateTime {
    let target_year = now.year() + years as i32;
    now.replace_year(target_year)
        // 29 February in a non-leap target year: the day before.
        .or_else(|_| (now - Duration::days(1)).replace_year(target_year))
        .unwrap_or(now + Duration::days(365 * i64::from(years)))
}

/// Converts an X.509 Name to rcgen's model, keeping string types. rcgen keeps one value
/// per attribute type and no multi-valued RDNs: such subjects are refused, not altered.
pub fn dn_from_name(name: &X509Name<'_>) -> Result<DistinguishedName, CaError> {
    use x509_parser::der_parser::asn1_rs::Tag;
    let mut dn = DistinguishedName::new();
    for rdn in name.iter() {
        let mut attrs = rdn.iter();
        let (Some(attr), None) = (attrs.next(), attrs.next()) else {
            return Err(CaError::UnsupportedSubject("multi-valued RDN".into()));
        };
        let oid: Vec<u64> = attr
            .attr_type()
            .iter()
            .ok_or_else(|| CaError::UnsupportedSubject("attribute OID too large".into()))?
            .collect();
        let ty = DnType::from_oid(&oid);
        if dn.get(&ty).is_some() {
            return Err(CaError::UnsupportedSubject(format!(
                "repeated attribute {}",
                attr.attr_type().to_id_string()
            )));
        }
        let data = attr.attr_value().data;
        let text = || {
            std::str::from_utf8(data)
                .map(str::to_owned)
                .map_err(|_| CaError::UnsupportedSubject("attribute is not UTF-8".into()))
        };
        let value = match attr.attr_value().tag() {
            Tag::Utf8String => DnValue::Utf8String(text()?),
            Tag::PrintableString => DnValue::PrintableString(text()?.as_str().try_into()?),
            Tag::Ia5String => DnValue::Ia5String(text()?.as_str().try_into()?),
            Tag::T61String => DnValue::TeletexString(text()?.as_str().try_into()?),
            Tag::BmpString => {
                DnValue::BmpString(rcgen::string::BmpString::from_utf16be(data.to_vec())?)
            }
            Tag::UniversalString => DnValue::UniversalString(
                rcgen::string::UniversalString::from_utf32be(data.to_vec())?,
            ),
            t => {
                return Err(CaError::UnsupportedSubject(format!(
                    "attribute string type {t}"
                )));
            }
        };
        dn.push(ty, value);
    }
    Ok(dn)
}

/// Parses every CERTIFICATE block of a PEM bundle (at least one).
pub fn parse_cert_bundle(pem_text: &str) -> Result<Vec<Vec<u8>>, CaError> {
    let blocks = pem::parse_many(pem_text).map_err(|e| CaError::BadPem(format!("PEM: {e}")))?;
    let certs: Vec<Vec<u8>> = blocks
        .into_iter()
        .filter(|b| b.tag() == "CERTIFICATE")
        .map(|b| b.into_contents())
        .collect();
    if certs.is_empty() {
        return Err(CaError::BadPem("no CERTIFICATE in the PEM file".into()));
    }
    for der in &certs {
        X509Certificate::from_der(der).map_err(|e| CaError::BadPem(format!("certificate: {e}")))?;
    }
    Ok(certs)
}

/// Loads a CA private key from PEM: PKCS#8 (`PRIVATE KEY`), SEC1 (`EC PRIVATE KEY`,
/// P-256/P-384) or PKCS#1 (`RSA PRIVATE KEY`), as OpenSSL writes them.
pub fn load_key(key_pem: &str) -> Result<KeyPair, CaError> {
    use aws_lc_rs::encoding::AsDer;
    use aws_lc_rs::signature::{
        ECDSA_P256_SHA256_ASN1_SIGNING, ECDSA_P384_SHA384_ASN1_SIGNING, EcdsaKeyPair,
    };
    let blocks = pem::parse_many(key_pem).map_err(|e| CaError::BadPem(format!("key PEM: {e}")))?;
    let block = blocks
        .into_iter()
        .find(|b| b.tag().ends_with("PRIVATE KEY"))
        .ok_or_else(|| CaError::BadPem("no PRIVATE KEY block in the key file".into()))?;
    let pkcs8: Vec<u8> = match block.tag() {
        "PRIVATE KEY" => block.into_contents(),
        "EC PRIVATE KEY" => {
            let der = block.into_contents();
            let kp = EcdsaKeyPair::from_private_key_der(&ECDSA_P256_SHA256_ASN1_SIGNING, &der)
                .or_else(|_| {
                    EcdsaKeyPair::from_private_key_der(&ECDSA_P384_SHA384_ASN1_SIGNING, &der)
                })
                .map_err(|e| CaError::BadKey(format!("EC key: {e}")))?;
            kp.to_pkcs8v1()
                .map_err(|_| CaError::BadKey("EC key re-encoding".into()))?
                .as_ref()
                .to_vec()
        }
        "RSA PRIVATE KEY" => {
            let kp = aws_lc_rs::rsa::KeyPair::from_der(&block.into_contents())
                .map_err(|e| CaError::BadKey(format!("RSA key: {e}")))?;
            kp.as_der()
                .map_err(|_| CaError::BadKey("RSA key re-encoding".into()))?
                .as_ref()
                .to_vec()
        }
        "ENCRYPTED PRIVATE KEY" => {
            return Err(CaError::BadKey(
                "the CA key is encrypted: decrypt it first (openssl pkey -in KEY -out PLAIN)"
                    .into(),
            ));
        }
        other => return Err(CaError::BadKey(format!("unsupported key type {other}"))),
    };
    KeyPair::try_from(pkcs8.as_slice()).map_err(|e| CaError::BadKey(format!("CA key: {e}")))
}

fn create_ca() -> Result<(String, String), CaError> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let cert = root_params(None)?.self_signed(&key)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// A self-signed root for a key in the HSM, signed there.
fn self_signed_root(key: &crate::hsm::HsmKey, subject: Option<&str>) -> Result<String, CaError> {
    Ok(root_params(subject)?.self_signed(key)?.pem())
}

/// The certificate of a new root: `subject` (`C=CN, O=…, CN=…`) or the reference CA's,
/// 20 years, keyCertSign + cRLSign + digitalSignature.
fn root_params(subject: Option<&str>) -> Result<CertificateParams, CaError> {
    let mut params = CertificateParams::default();
    params.distinguished_name = match subject {
        Some(s) => parse_subject(s)?,
        None => {
            let mut dn = DistinguishedName::new();
            dn.push(
                DnType::CountryName,
                DnValue::PrintableString("CN".try_into()?),
            );
            dn.push(DnType::OrganizationName, "UKey Renew Reference Portal");
            dn.push(DnType::CommonName, "UKey Renew Reference CA");
            dn
        }
    };
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = OffsetDateTime::now_utc();
    params.not_before = now - Duration::hours(1);
    params.not_after = add_years(now, 20);
    let mut serial = random_bytes(16).map_err(|_| CaError::Random)?;
    serial[0] &= 0x7f;
    params.serial_number = Some(SerialNumber::from_slice(&serial));
    Ok(params)
}

/// A subject typed as `C=CN, O=…, OU=…, CN=…` (also L, ST; a value holds no comma):
/// C as PrintableString, the others UTF8String.
pub fn parse_subject(s: &str) -> Result<DistinguishedName, CaError> {
    let mut dn = DistinguishedName::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (k, v) = part
            .split_once('=')
            .ok_or_else(|| CaError::UnsupportedSubject(format!("{part:?} is not TYPE=value")))?;
        let (k, v) = (k.trim(), v.trim());
        let ty = match k.to_ascii_uppercase().as_str() {
            "C" => {
                dn.push(DnType::CountryName, DnValue::PrintableString(v.try_into()?));
                continue;
            }
            "O" => DnType::OrganizationName,
            "OU" => DnType::OrganizationalUnitName,
            "CN" => DnType::CommonName,
            "L" => DnType::LocalityName,
            "ST" => DnType::StateOrProvinceName,
            other => {
                return Err(CaError::UnsupportedSubject(format!(
                    "attribute {other}: C, O, OU, CN, L or ST"
                )));
            }
        };
        dn.push(ty, DnValue::Utf8String(v.to_owned()));
    }
    if dn.iter().next().is_none() {
        return Err(CaError::UnsupportedSubject("an empty subject".into()));
    }
    Ok(dn)
}

fn accepted_issuers(data_dir: &Path) -> Result<Vec<Vec<u8>>, CaError> {
    let path = data_dir.join(ACCEPTED_FILE);
    if !path.exists() {
        return Ok(Vec::new());
    }
    let pem = std::fs::read_to_string(&path).map_err(io_err(&path))?;
    parse_cert_bundle(&pem)
}

/// A certificate's key identifier: its subjectKeyIdentifier extension, else the
/// SHA-1 of its subjectPublicKey (RFC 5280 §4.2.1.2, method 1).
pub fn key_id_of(cert: &X509Certificate<'_>) -> Vec<u8> {
    for ext in cert.extensions() {
        if let x509_parser::extensions::ParsedExtension::SubjectKeyIdentifier(id) =
            ext.parsed_extension()
        {
            return id.0.to_vec();
        }
    }
    aws_lc_rs::digest::digest(
        &aws_lc_rs::digest::SHA1_FOR_LEGACY_USE_ONLY,
        &cert.public_key().subject_public_key.data,
    )
    .as_ref()
    .to_vec()
}

/// Before the data directory's CA is replaced by the CA of key `new_ski`: when the one
/// there is another key's, its certificate and key (file or `pkcs11:` URI) are copied
/// to `retired-cas/<SKI>/` (written before anything is replaced, so a crash between
/// leaves the CA in both places, never in none).
fn retire_current(data_dir: &Path, new_ski: &str) -> Result<(), CaError> {
    let cert_path = data_dir.join(CERT_FILE);
    if !cert_path.exists() {
        return Ok(());
    }
    let cert_pem = std::fs::read_to_string(&cert_path).map_err(io_err(&cert_path))?;
    let first = parse_cert_bundle(&cert_pem)?.remove(0);
    let (_, cert) = X509Certificate::from_der(&first)
        .map_err(|e| CaError::BadPem(format!("CA certificate: {e}")))?;
    let ski = hex::encode(key_id_of(&cert));
    if ski == new_ski {
        return Ok(());
    }
    let dir = data_dir.join(RETIRED_DIR).join(&ski);
    crate::datadir::prepare(&dir).map_err(CaError::DataDir)?;
    for name in [CERT_FILE, KEY_FILE, HSM_KEY_FILE] {
        let from = data_dir.join(name);
        if from.exists() {
            let bytes = std::fs::read(&from).map_err(io_err(&from))?;
            write_private(&dir.join(name), &bytes)?;
        }
    }
    Ok(())
}

/// The retired CAs of `data_dir` (see [`RETIRED_DIR`]), the active one (`active_ski`)
/// left out, oldest directory name first.
fn retired_cas(
    data_dir: &Path,
    active_ski: &str,
    hsm: Option<&crate::hsm::Hsm>,
) -> Result<Vec<Ca>, CaError> {
    let root = data_dir.join(RETIRED_DIR);
    if !root.exists() {
        return Ok(Vec::new());
    }
    let mut dirs = Vec::new();
    for entry in std::fs::read_dir(&root).map_err(io_err(&root))? {
        let entry = entry.map_err(io_err(&root))?;
        if entry.path().is_dir() {
            dirs.push(entry.path());
        }
    }
    dirs.sort();
    let mut out: Vec<Ca> = Vec::new();
    for dir in dirs {
        let ca = Ca::load_dir(&dir, true, hsm)
            .map_err(|e| {
                CaError::BadKey(format!(
                    "已停用的 CA {} 无法载入 / the retired CA in {} cannot be loaded: {e}",
                    dir.display(),
                    dir.display()
                ))
            })?
            .ok_or_else(|| {
                CaError::BadKey(format!(
                    "已停用的 CA 目录 {} 中没有证书 / the retired CA directory {} holds no ca-cert.pem",
                    dir.display(),
                    dir.display()
                ))
            })?;
        if ca.ski != active_ski && out.iter().all(|o| o.ski != ca.ski) {
            out.push(ca);
        }
    }
    Ok(out)
}

fn remove_if_there(path: &Path) -> Result<(), CaError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err(path)(e)),
    }
}

/// Whether `cert` is signed by `ca`'s key: SM2-with-SM3 with the GM ID (which
/// x509-parser does not verify), else x509-parser's check.
fn signed_by(cert: &X509Certificate<'_>, ca: &X509Certificate<'_>) -> bool {
    if cert.signature_algorithm.algorithm.to_id_string() == crate::crypto::OID_SM2_WITH_SM3 {
        return ukey_trust::gm::verify(
            ukey_trust::gm::GM_DISTID,
            &ca.public_key().subject_public_key.data,
            cert.tbs_certificate.as_ref(),
            &cert.signature_value.data,
        );
    }
    cert.verify_signature(Some(ca.public_key())).is_ok()
}

/// A new SM2 root, as [`create_ca`] makes an EC one.
fn create_sm2_ca() -> Result<(String, String), CaError> {
    let ca = crate::sm2ca::Sm2Ca::generate(
        "UKey Renew Reference SM2 CA",
        "UKey Renew Reference Portal",
        OffsetDateTime::now_utc(),
    )?;
    let cert = pem::encode(&pem::Pem::new("CERTIFICATE", ca.cert_der().to_vec()));
    Ok((cert, ca.key_pem()?.to_string()))
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<(), CaError> {
    use std::io::Write as _;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(0o600);
    }
    let mut f = options.open(path).map_err(io_err(path))?;
    f.write_all(bytes).map_err(io_err(path))
}

/// Writes a file of the data directory, readable only by the owner (every file there:
/// keys, the admin token, certificates).
pub fn write_secret_file(path: &Path, bytes: &[u8]) -> Result<(), CaError> {
    write_private(path, bytes)
}
