//! 国密: an SM2 certificate authority (issue 13 §4, first part). It makes or loads an SM2
//! CA (an OpenSSL-made one: `openssl genpkey -algorithm SM2`, PKCS#8 PEM) and issues
//! SM2-with-SM3 certificates signed with the GM/T 0009 distinguishing ID
//! `1234567812345678`, as the Chinese PKI expects and `openssl verify -vfyopt
//! distid:1234567812345678` checks.
//!
//! rcgen cannot sign with SM2, so certificates and CRLs are assembled with RustCrypto's
//! `x509-cert` types and signed by `sm2`'s `SigningKey`. The portal's [`crate::ca::Ca`]
//! issues through it when its CA key is an SM2 key.

use std::str::FromStr as _;
use std::time::{Duration as StdDuration, UNIX_EPOCH};

use sm2::dsa::{DerSignature, SigningKey};
use sm2::elliptic_curve::pkcs8::{DecodePrivateKey as _, EncodePrivateKey as _, LineEnding};
use time::{Duration, OffsetDateTime};
use x509_cert::SubjectPublicKeyInfo;
use x509_cert::builder::profile::BuilderProfile;
use x509_cert::builder::{Builder as _, CertificateBuilder};
use x509_cert::certificate::{Certificate, TbsCertificate};
use x509_cert::der::{Decode as _, Encode as _};
use x509_cert::ext::pkix::crl::dp::DistributionPoint;
use x509_cert::ext::pkix::name::{DistributionPointName, GeneralName};
use x509_cert::ext::pkix::{
    AuthorityKeyIdentifier, BasicConstraints, CrlDistributionPoints, KeyUsage, KeyUsages,
    SubjectKeyIdentifier,
};
use x509_cert::ext::{Extension, ToExtension as _};
use x509_cert::name::Name;
use x509_cert::serial_number::SerialNumber;
use x509_cert::spki::{EncodePublicKey as _, SubjectPublicKeyInfoRef};
use x509_cert::time::{Time, Validity};
use zeroize::Zeroizing;

use crate::ca::{CaError, IssuedCert, Revoked, Usage};

/// The GM/T 0009 default distinguishing ID (the client's own constant).
pub use ukey_trust::gm::GM_DISTID;

/// An SM2 key that signs with the GM ID, DER signatures (the portal's CMP protection).
pub struct Sm2Signer(SigningKey);

impl std::fmt::Debug for Sm2Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sm2Signer").finish_non_exhaustive()
    }
}

impl Sm2Signer {
    /// From a PKCS#8 PEM key.
    pub fn from_pem(pem: &str) -> Result<Sm2Signer, CaError> {
        let secret = sm2::SecretKey::from_pkcs8_pem(pem)
            .map_err(|e| bad("SM2 key (PKCS#8 PEM)")(e.to_string()))?;
        SigningKey::new(GM_DISTID, &secret)
            .map(Sm2Signer)
            .map_err(|e| bad("SM2 key")(e.to_string()))
    }

    /// A DER SM2-with-SM3 signature of `data`, Z for the GM ID.
    pub fn sign(&self, data: &[u8]) -> Result<Vec<u8>, CaError> {
        signature::Signer::<sm2::dsa::Signature>::try_sign(&self.0, data)
            .map(|s| s.to_der().to_bytes().to_vec())
            .map_err(|e| bad("SM2 signature")(e.to_string()))
    }
}

/// An SM2 CA: its certificate and signing key.
pub struct Sm2Ca {
    key: SigningKey,
    cert_der: Vec<u8>,
    subject: Name,
}

impl std::fmt::Debug for Sm2Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sm2Ca")
            .field("subject", &self.subject.to_string())
            .finish_non_exhaustive()
    }
}

fn bad(what: &str) -> impl Fn(String) -> CaError + '_ {
    move |e| CaError::BadKey(format!("{what}: {e}"))
}

fn x509_time(t: OffsetDateTime) -> Result<Time, CaError> {
    let since = StdDuration::from_secs(u64::try_from(t.unix_timestamp()).unwrap_or(0));
    Time::try_from(UNIX_EPOCH + since).map_err(|e| bad("time")(e.to_string()))
}

fn fresh_key() -> Result<SigningKey, CaError> {
    // A random scalar below the curve order: retried in the (2^-32) case it is not.
    for _ in 0..8 {
        let bytes = Zeroizing::new(crate::crypto::random_bytes(32).map_err(|_| CaError::Random)?);
        if let Ok(k) = SigningKey::from_slice(GM_DISTID, &bytes) {
            return Ok(k);
        }
    }
    Err(CaError::Random)
}

fn serial() -> Result<SerialNumber, CaError> {
    let mut s = crate::crypto::random_bytes(16).map_err(|_| CaError::Random)?;
    s[0] = (s[0] & 0x7f) | 0x40;
    SerialNumber::new(&s).map_err(|e| bad("serial")(e.to_string()))
}

/// The CA key as the x509-cert builder wants it: signatures in DER, as X.509 carries
/// them (`sm2::dsa::Signature` encodes to raw `r ‖ s`, which verifiers reject).
struct DerSigner<'a>(&'a SigningKey);

impl signature::Signer<DerSignature> for DerSigner<'_> {
    fn try_sign(&self, msg: &[u8]) -> Result<DerSignature, signature::Error> {
        signature::Signer::<sm2::dsa::Signature>::try_sign(self.0, msg).map(|s| s.to_der())
    }
}

impl signature::Keypair for DerSigner<'_> {
    type VerifyingKey = sm2::dsa::VerifyingKey;

    fn verifying_key(&self) -> Self::VerifyingKey {
        self.0.verifying_key().clone()
    }
}

impl x509_cert::spki::DynSignatureAlgorithmIdentifier for DerSigner<'_> {
    fn signature_algorithm_identifier(
        &self,
    ) -> x509_cert::spki::Result<x509_cert::spki::AlgorithmIdentifierOwned> {
        self.0.signature_algorithm_identifier()
    }
}

/// What the builder puts in: the names and the extensions of a root or a leaf.
struct Profile {
    issuer: Name,
    subject: Name,
    ca: bool,
    usage: Option<Usage>,
    crl_url: Option<String>,
}

impl BuilderProfile for Profile {
    fn get_issuer(&self, _subject: &Name) -> Name {
        self.issuer.clone()
    }

    fn get_subject(&self) -> Name {
        self.subject.clone()
    }

    fn build_extensions(
        &self,
        spk: SubjectPublicKeyInfoRef<'_>,
        issuer_spk: SubjectPublicKeyInfoRef<'_>,
        tbs: &TbsCertificate,
    ) -> x509_cert::builder::Result<Vec<Extension>> {
        let mut out: Vec<Extension> = Vec::new();
        let ski = SubjectKeyIdentifier::try_from(spk)?;
        let aki = SubjectKeyIdentifier::try_from(issuer_spk)?;
        out.push(
            AuthorityKeyIdentifier {
                key_identifier: Some(aki.0),
                ..Default::default()
            }
            .to_extension(tbs.subject(), &out)?,
        );
        out.push(ski.to_extension(tbs.subject(), &out)?);
        out.push(
            BasicConstraints {
                ca: self.ca,
                path_len_constraint: None,
            }
            .to_extension(tbs.subject(), &out)?,
        );
        let usages = match (self.ca, self.usage) {
            (true, _) => KeyUsages::KeyCertSign | KeyUsages::CRLSign,
            (false, Some(Usage::Encryption { .. })) => {
                KeyUsages::KeyEncipherment | KeyUsages::DataEncipherment | KeyUsages::KeyAgreement
            }
            (false, _) => KeyUsages::DigitalSignature | KeyUsages::NonRepudiation,
        };
        out.push(KeyUsage(usages).to_extension(tbs.subject(), &out)?);
        if let Some(url) = &self.crl_url {
            let uri = x509_cert::der::asn1::Ia5String::new(url.as_str())?;
            let dp = DistributionPoint {
                distribution_point: Some(DistributionPointName::FullName(vec![
                    GeneralName::UniformResourceIdentifier(uri),
                ])),
                reasons: None,
                crl_issuer: None,
            };
            out.push(CrlDistributionPoints(vec![dp]).to_extension(tbs.subject(), &out)?);
        }
        Ok(out)
    }
}

impl Sm2Ca {
    /// A new self-signed SM2 root CA named `CN=<cn>, O=<org>, C=CN`, valid 20 years.
    pub fn generate(cn: &str, org: &str, now: OffsetDateTime) -> Result<Sm2Ca, CaError> {
        let key = fresh_key()?;
        let subject = Name::from_str(&format!("CN={cn},O={org},C=CN"))
            .map_err(|e| CaError::UnsupportedSubject(e.to_string()))?;
        let spki = SubjectPublicKeyInfo::from_key(key.verifying_key())
            .map_err(|e| bad("public key")(e.to_string()))?;
        let validity = Validity::new(
            x509_time(now - Duration::minutes(5))?,
            x509_time(now + Duration::days(365 * 20))?,
        );
        let profile = Profile {
            issuer: subject.clone(),
            subject: subject.clone(),
            ca: true,
            usage: None,
            crl_url: None,
        };
        let cert = CertificateBuilder::new(profile, serial()?, validity, spki)
            .and_then(|b| b.build::<_, DerSignature>(&DerSigner(&key)))
            .map_err(|e| bad("SM2 root certificate")(e.to_string()))?;
        let cert_der = cert.to_der().map_err(|e| bad("encoding")(e.to_string()))?;
        Ok(Sm2Ca {
            key,
            cert_der,
            subject,
        })
    }

    /// An existing SM2 CA: its certificate (PEM) and PKCS#8 private key (PEM, as
    /// `openssl genpkey -algorithm SM2` writes it). The key must be the certificate's.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Sm2Ca, CaError> {
        let block =
            pem::parse(cert_pem).map_err(|e| CaError::BadPem(format!("CA certificate: {e}")))?;
        let cert_der = block.into_contents();
        let cert = Certificate::from_der(&cert_der)
            .map_err(|e| CaError::BadPem(format!("CA certificate: {e}")))?;
        let secret = sm2::SecretKey::from_pkcs8_pem(key_pem)
            .map_err(|e| bad("CA key (an SM2 PKCS#8 PEM key)")(e.to_string()))?;
        let key = SigningKey::new(GM_DISTID, &secret).map_err(|e| bad("CA key")(e.to_string()))?;
        let ours = key
            .verifying_key()
            .to_public_key_der()
            .map_err(|e| bad("CA key")(e.to_string()))?;
        let theirs = cert
            .tbs_certificate()
            .subject_public_key_info()
            .to_der()
            .map_err(|e| bad("CA certificate")(e.to_string()))?;
        if ours.as_bytes() != theirs.as_slice() {
            return Err(CaError::BadKey(
                "the SM2 CA key is not the CA certificate's key".into(),
            ));
        }
        let subject = cert.tbs_certificate().subject().clone();
        Ok(Sm2Ca {
            key,
            cert_der,
            subject,
        })
    }

    /// A fresh SM2 key and a two-year end-entity certificate for it (digitalSignature)
    /// named `CN=<cn>`, issued by this CA: what protects the portal's CMP answers. The
    /// key comes as PKCS#8 PEM too, for the data directory.
    pub fn issue_signer(
        &self,
        cn: &str,
        now: OffsetDateTime,
    ) -> Result<(Sm2Signer, Vec<u8>, Zeroizing<String>), CaError> {
        let key = fresh_key()?;
        let subject = Name::from_str(&format!("CN={cn}"))
            .map_err(|e| CaError::UnsupportedSubject(e.to_string()))?;
        let spki = key
            .verifying_key()
            .to_public_key_der()
            .map_err(|e| bad("public key")(e.to_string()))?;
        let issued = self.issue(
            &subject.to_der().map_err(|e| bad("name")(e.to_string()))?,
            spki.as_bytes(),
            Usage::Signing,
            2,
            None,
            now,
        )?;
        let pem = sm2::SecretKey::from(key.as_nonzero_scalar())
            .to_pkcs8_pem(LineEnding::LF)
            .map_err(|e| bad("key")(e.to_string()))?;
        Ok((Sm2Signer(key), issued.der, pem))
    }

    /// The CA certificate, DER.
    pub fn cert_der(&self) -> &[u8] {
        &self.cert_der
    }

    /// The CA key as PKCS#8 PEM (for the portal's data directory, mode 0600).
    pub fn key_pem(&self) -> Result<Zeroizing<String>, CaError> {
        let secret = sm2::SecretKey::from(self.key.as_nonzero_scalar());
        secret
            .to_pkcs8_pem(LineEnding::LF)
            .map_err(|e| bad("CA key")(e.to_string()))
    }

    /// Issues an SM2-with-SM3 certificate for `spki_der` (an SM2 public key) with the
    /// subject `subject_der` (a DER Name, e.g. the old certificate's).
    pub fn issue(
        &self,
        subject_der: &[u8],
        spki_der: &[u8],
        usage: Usage,
        years: u32,
        crl_url: Option<&str>,
        now: OffsetDateTime,
    ) -> Result<IssuedCert, CaError> {
        let subject =
            Name::from_der(subject_der).map_err(|e| CaError::UnsupportedSubject(e.to_string()))?;
        let spki = SubjectPublicKeyInfo::from_der(spki_der)
            .map_err(|e| bad("public key")(e.to_string()))?;
        let curve: Option<&[u8]> = spki.algorithm.parameters.as_ref().map(|p| p.value());
        if curve != Some(&SM2_CURVE_OID_CONTENT[..]) {
            return Err(CaError::BadKey("the public key is not an SM2 key".into()));
        }
        let serial = serial()?;
        let serial_bytes = serial.as_bytes().to_vec();
        let end = now
            .replace_year(now.year() + years as i32)
            .unwrap_or(now + Duration::days(365 * i64::from(years)));
        let validity = Validity::new(x509_time(now - Duration::minutes(5))?, x509_time(end)?);
        let profile = Profile {
            issuer: self.subject.clone(),
            subject: subject.clone(),
            ca: false,
            usage: Some(usage),
            crl_url: crl_url.map(str::to_owned),
        };
        let cert = CertificateBuilder::new(profile, serial, validity, spki)
            .and_then(|b| b.build::<_, DerSignature>(&DerSigner(&self.key)))
            .map_err(|e| bad("SM2 certificate")(e.to_string()))?;
        let der = cert.to_der().map_err(|e| bad("encoding")(e.to_string()))?;
        Ok(IssuedCert {
            der,
            serial_hex: ukey_portal_api::serial_hex_from_bytes(&serial_bytes),
            subject: subject.to_string(),
        })
    }
}

impl Sm2Ca {
    /// A CRL listing `revoked` (reason superseded), valid 7 days, signed SM2-with-SM3
    /// with the GM ID (`openssl crl -verify` checks it given the ID).
    pub fn crl(
        &self,
        revoked: &[Revoked],
        crl_number: u64,
        now: OffsetDateTime,
    ) -> Result<Vec<u8>, CaError> {
        use x509_cert::crl::{CertificateList, RevokedCert, TbsCertList};
        use x509_cert::der::referenced::OwnedToRef as _;
        use x509_cert::ext::pkix::{CrlNumber, CrlReason};
        let enc = |e: x509_cert::der::Error| bad("CRL")(e.to_string());
        let no_ext: &[Extension] = &[];
        let mut entries: Vec<RevokedCert> = Vec::with_capacity(revoked.len());
        for r in revoked {
            let bytes = hex::decode(&r.serial_hex).map_err(|_| {
                CaError::BadPem(format!("stored serial {} is not hex", r.serial_hex))
            })?;
            entries.push(RevokedCert {
                serial_number: SerialNumber::new(&bytes).map_err(enc)?,
                revocation_date: x509_time(r.revoked_at)?,
                crl_entry_extensions: Some(vec![
                    match r.reason {
                        crate::ca::Reason::Unspecified => CrlReason::Unspecified,
                        crate::ca::Reason::KeyCompromise => CrlReason::KeyCompromise,
                        crate::ca::Reason::AffiliationChanged => CrlReason::AffiliationChanged,
                        crate::ca::Reason::Superseded => CrlReason::Superseded,
                        crate::ca::Reason::CessationOfOperation => CrlReason::CessationOfOperation,
                        crate::ca::Reason::PrivilegeWithdrawn => CrlReason::PrivilegeWithdrawn,
                    }
                    .to_extension(&self.subject, no_ext)
                    .map_err(enc)?,
                ]),
            });
        }
        let issuer_spki = SubjectPublicKeyInfo::from_key(self.key.verifying_key())
            .map_err(|e| bad("public key")(e.to_string()))?;
        let aki = SubjectKeyIdentifier::try_from(issuer_spki.owned_to_ref())
            .map_err(|e| bad("key identifier")(e.to_string()))?;
        let algorithm =
            x509_cert::spki::DynSignatureAlgorithmIdentifier::signature_algorithm_identifier(
                &DerSigner(&self.key),
            )
            .map_err(|e| bad("algorithm")(e.to_string()))?;
        let tbs = TbsCertList {
            version: x509_cert::Version::V2,
            signature: algorithm.clone(),
            issuer: self.subject.clone(),
            this_update: x509_time(now - Duration::minutes(5))?,
            next_update: Some(x509_time(now + Duration::days(7))?),
            revoked_certificates: (!entries.is_empty()).then_some(entries),
            crl_extensions: Some(vec![
                CrlNumber::try_from(crl_number)
                    .map_err(enc)?
                    .to_extension(&self.subject, no_ext)
                    .map_err(enc)?,
                AuthorityKeyIdentifier {
                    key_identifier: Some(aki.0),
                    ..Default::default()
                }
                .to_extension(&self.subject, no_ext)
                .map_err(enc)?,
            ]),
        };
        let tbs_der = tbs.to_der().map_err(enc)?;
        let signature: DerSignature = signature::Signer::try_sign(&DerSigner(&self.key), &tbs_der)
            .map_err(|e| bad("CRL signature")(e.to_string()))?;
        CertificateList {
            tbs_cert_list: tbs,
            signature_algorithm: algorithm,
            signature: x509_cert::der::asn1::BitString::from_bytes(&signature.to_bytes())
                .map_err(enc)?,
        }
        .to_der()
        .map_err(enc)
    }

    /// The CA's subject, DER.
    pub fn subject_der(&self) -> Result<Vec<u8>, CaError> {
        self.subject
            .to_der()
            .map_err(|e| bad("subject")(e.to_string()))
    }
}

/// The content of the named-curve OID 1.2.156.10197.1.301 (SM2).
const SM2_CURVE_OID_CONTENT: [u8; 8] = [0x2A, 0x81, 0x1C, 0xCF, 0x55, 0x01, 0x82, 0x2D];
