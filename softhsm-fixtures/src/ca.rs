//! The test CA: a self-signed root and an issuing CA under it (EC P-256 keys, Chinese
//! subjects), kept as PEM files in the SoftHsm directory, and the issuing of end-entity
//! certificates for public keys read back from a token.

use std::fs;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, DnValue,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, PublicKeyData, SerialNumber,
    SignatureAlgorithm,
};
use time::{Duration, OffsetDateTime};

use crate::FixtureError;
use crate::spec::{CertSpec, CertUsage, KeyAlg};

/// Organisation of the test CA.
pub const CA_ORG: &str = "测试证书认证中心";
/// Common name of the test root CA.
pub const ROOT_CN: &str = "UKey Test Root CA";
/// Common name of the test issuing CA.
pub const ISSUING_CN: &str = "UKey Test Issuing CA";

const ROOT_CERT_FILE: &str = "root-ca.pem";
const ROOT_KEY_FILE: &str = "root-ca.key.pem";
const ISSUING_CERT_FILE: &str = "issuing-ca.pem";
const ISSUING_KEY_FILE: &str = "issuing-ca.key.pem";

/// The test CA of one SoftHsm directory.
pub struct TestCa {
    /// The root CA certificate, PEM.
    pub root_cert_pem: String,
    /// The issuing CA certificate, PEM.
    pub issuing_cert_pem: String,
    /// `<dir>/root-ca.pem`.
    pub root_cert_path: PathBuf,
    /// `<dir>/issuing-ca.pem`.
    pub issuing_cert_path: PathBuf,
    /// `<dir>/issuing-ca.key.pem` (PKCS#8, unencrypted: test material only).
    pub issuing_key_path: PathBuf,
    /// `<dir>/root-ca.key.pem` (PKCS#8, unencrypted: test material only).
    pub root_key_path: PathBuf,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for TestCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestCa")
            .field("root_cert_path", &self.root_cert_path)
            .field("issuing_cert_path", &self.issuing_cert_path)
            .field("issuing_key_path", &self.issuing_key_path)
            .finish_non_exhaustive()
    }
}

/// A certificate the test CA issued.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedCert {
    /// The certificate, DER.
    pub der: Vec<u8>,
    /// Serial as `openssl x509 -noout -serial` prints it (upper-case hex).
    pub serial_hex: String,
    /// notBefore.
    pub not_before: OffsetDateTime,
    /// notAfter.
    pub not_after: OffsetDateTime,
}

impl TestCa {
    /// Loads the CA from `dir`, or creates it there when none of its files exist.
    pub fn load_or_create(dir: &Path) -> Result<TestCa, FixtureError> {
        let paths = [
            ROOT_CERT_FILE,
            ROOT_KEY_FILE,
            ISSUING_CERT_FILE,
            ISSUING_KEY_FILE,
        ]
        .map(|name| dir.join(name));
        let existing = paths.iter().filter(|p| p.exists()).count();
        if existing == 0 {
            Self::create(dir)?;
        } else if existing < paths.len() {
            return Err(FixtureError::CaFiles {
                dir: dir.to_owned(),
                reason: format!(
                    "only {existing} of {ROOT_CERT_FILE}, {ROOT_KEY_FILE}, {ISSUING_CERT_FILE}, \
                     {ISSUING_KEY_FILE} exist; remove them to start a new CA"
                ),
            });
        }
        Self::load(dir)
    }

    fn create(dir: &Path) -> Result<(), FixtureError> {
        let root_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let now = now_seconds();
        let mut root = CertificateParams::default();
        root.distinguished_name = ca_name(ROOT_CN);
        root.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        root.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        root.not_before = now - Duration::days(3650);
        root.not_after = now + Duration::days(7300);
        root.serial_number = Some(random_serial(false)?.0);
        let root_cert = root.self_signed(&root_key)?;
        let root_issuer = Issuer::new(root, root_key);

        let issuing_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut issuing = CertificateParams::default();
        issuing.distinguished_name = ca_name(ISSUING_CN);
        issuing.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        issuing.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
        ];
        issuing.use_authority_key_identifier_extension = true;
        issuing.not_before = now - Duration::days(3000);
        issuing.not_after = now + Duration::days(5000);
        issuing.serial_number = Some(random_serial(false)?.0);
        let issuing_cert = issuing.signed_by(&issuing_key, &root_issuer)?;

        write_file(&dir.join(ROOT_CERT_FILE), &root_cert.pem())?;
        write_file(&dir.join(ROOT_KEY_FILE), &root_issuer.key().serialize_pem())?;
        write_file(&dir.join(ISSUING_CERT_FILE), &issuing_cert.pem())?;
        write_file(&dir.join(ISSUING_KEY_FILE), &issuing_key.serialize_pem())?;
        Ok(())
    }

    fn load(dir: &Path) -> Result<TestCa, FixtureError> {
        let read = |name: &str| {
            let path = dir.join(name);
            fs::read_to_string(&path).map_err(FixtureError::io("read", path))
        };
        let bad = |reason: String| FixtureError::CaFiles {
            dir: dir.to_owned(),
            reason,
        };
        let root_cert_pem = read(ROOT_CERT_FILE)?;
        let issuing_cert_pem = read(ISSUING_CERT_FILE)?;
        let issuing_key = KeyPair::from_pem(&read(ISSUING_KEY_FILE)?)
            .map_err(|e| bad(format!("{ISSUING_KEY_FILE}: {e}")))?;
        let issuer = Issuer::from_ca_cert_pem(&issuing_cert_pem, issuing_key)
            .map_err(|e| bad(format!("{ISSUING_CERT_FILE}: {e}")))?;
        Ok(TestCa {
            root_cert_pem,
            issuing_cert_pem,
            root_cert_path: dir.join(ROOT_CERT_FILE),
            issuing_cert_path: dir.join(ISSUING_CERT_FILE),
            issuing_key_path: dir.join(ISSUING_KEY_FILE),
            root_key_path: dir.join(ROOT_KEY_FILE),
            issuer,
        })
    }

    /// The issuing CA as an rcgen issuer, for code that signs its own certificates
    /// (the reference portal, for instance) under the same chain.
    pub fn issuer(&self) -> &Issuer<'static, KeyPair> {
        &self.issuer
    }

    /// Issues an end-entity certificate for `public_key` as `spec` describes: subject
    /// C=CN, O, CN in UTF8String; key usage and EKU for signing or encryption; validity
    /// from `days_left`; a random positive 16-byte serial.
    pub fn issue(
        &self,
        public_key: &SubjectPublicKey,
        spec: &CertSpec,
    ) -> Result<IssuedCert, FixtureError> {
        if public_key.alg != spec.alg {
            return Err(FixtureError::InvalidSpec(format!(
                "the public key is {} but the certificate spec says {}",
                public_key.alg, spec.alg
            )));
        }
        let now = now_seconds();
        let not_after = now + Duration::days(spec.days_left);
        let not_before = (not_after - Duration::days(365)).min(now - Duration::days(1));
        let (serial, serial_hex) = random_serial(spec.high_bit_serial)?;

        let mut params = CertificateParams::default();
        params.distinguished_name = subject_name(&spec.subject_cn, spec.subject_o.as_deref());
        params.serial_number = Some(serial);
        params.not_before = not_before;
        params.not_after = not_after;
        params.is_ca = IsCa::ExplicitNoCa;
        params.use_authority_key_identifier_extension = true;
        params.key_usages = key_usages(spec.usage, spec.alg);
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ClientAuth,
            ExtendedKeyUsagePurpose::EmailProtection,
        ];
        let cert = params.signed_by(public_key, &self.issuer)?;
        Ok(IssuedCert {
            der: cert.der().to_vec(),
            serial_hex,
            not_before,
            not_after,
        })
    }
}

/// Key usages real Chinese CA UKey certificates carry.
fn key_usages(usage: CertUsage, alg: KeyAlg) -> Vec<KeyUsagePurpose> {
    match (usage, alg) {
        (CertUsage::Signing, _) => vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::ContentCommitment,
        ],
        (CertUsage::Encryption, KeyAlg::Rsa2048) => vec![
            KeyUsagePurpose::KeyEncipherment,
            KeyUsagePurpose::DataEncipherment,
        ],
        (CertUsage::Encryption, KeyAlg::EcP256) => vec![
            KeyUsagePurpose::KeyEncipherment,
            KeyUsagePurpose::DataEncipherment,
            KeyUsagePurpose::KeyAgreement,
        ],
    }
}

fn ca_name(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CountryName, country_cn());
    dn.push(DnType::OrganizationName, CA_ORG);
    dn.push(DnType::CommonName, cn);
    dn
}

fn subject_name(cn: &str, org: Option<&str>) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CountryName, country_cn());
    if let Some(org) = org {
        dn.push(
            DnType::OrganizationName,
            DnValue::Utf8String(org.to_owned()),
        );
    }
    dn.push(DnType::CommonName, DnValue::Utf8String(cn.to_owned()));
    dn
}

/// C=CN as a PrintableString, as RFC 5280 wants country names.
fn country_cn() -> DnValue {
    match rcgen::string::PrintableString::try_from("CN") {
        Ok(s) => DnValue::PrintableString(s),
        // "CN" is printable; this arm is never taken but costs nothing.
        Err(_) => DnValue::Utf8String("CN".to_owned()),
    }
}

/// 16 random bytes as a positive serial, and its `openssl x509 -serial` spelling.
/// `high_bit`: set the first byte's high bit, so DER needs a leading 0x00;
/// otherwise clear it and keep the first byte non-zero, so the serial is 16 bytes.
fn random_serial(high_bit: bool) -> Result<(SerialNumber, String), FixtureError> {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).map_err(|e| FixtureError::Random(e.to_string()))?;
    if high_bit {
        bytes[0] |= 0x80;
    } else {
        bytes[0] &= 0x7f;
        if bytes[0] == 0 {
            bytes[0] = 0x01;
        }
    }
    Ok((SerialNumber::from_slice(&bytes), hex::encode_upper(bytes)))
}

fn now_seconds() -> OffsetDateTime {
    let now = OffsetDateTime::now_utc();
    now.replace_nanosecond(0).unwrap_or(now)
}

fn write_file(path: &Path, text: &str) -> Result<(), FixtureError> {
    fs::write(path, text).map_err(FixtureError::io("write", path))
}

/// PEM ("CERTIFICATE") of a DER certificate.
pub(crate) fn der_to_pem(der: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut b64 = String::with_capacity(der.len().div_ceil(3) * 4);
    for chunk in der.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, b)| acc | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..4 {
            if i <= chunk.len() {
                b64.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                b64.push('=');
            }
        }
    }
    let mut pem = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        pem.push_str(&String::from_utf8_lossy(line));
        pem.push('\n');
    }
    pem.push_str("-----END CERTIFICATE-----\n");
    pem
}

/// A public key read back from a token, in the form rcgen certifies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubjectPublicKey {
    alg: KeyAlg,
    /// RSA: PKCS#1 RSAPublicKey DER; EC: the uncompressed point 04||X||Y.
    key_bytes: Vec<u8>,
}

impl SubjectPublicKey {
    /// An RSA key from CKA_MODULUS and CKA_PUBLIC_EXPONENT (big-endian, unsigned).
    pub fn from_rsa(modulus: &[u8], public_exponent: &[u8]) -> Result<Self, FixtureError> {
        let modulus = strip_leading_zeros(modulus);
        if modulus.len() != 256 {
            return Err(FixtureError::PublicKey(format!(
                "RSA modulus of {} bits, expected 2048",
                modulus.len() * 8
            )));
        }
        Ok(SubjectPublicKey {
            alg: KeyAlg::Rsa2048,
            key_bytes: rsa_public_key_der(modulus, public_exponent)?,
        })
    }

    /// A P-256 key from CKA_EC_POINT, which PKCS#11 wraps in a DER OCTET STRING
    /// (a raw 65-byte point is accepted too, as some modules send that).
    pub fn from_ec_point(ec_point: &[u8]) -> Result<Self, FixtureError> {
        let point = match ec_point {
            [0x04, 0x41, rest @ ..] if rest.len() == 65 => rest,
            [0x04, ..] if ec_point.len() == 65 => ec_point,
            _ => {
                return Err(FixtureError::PublicKey(format!(
                    "CKA_EC_POINT of {} bytes is not a P-256 point (hex {})",
                    ec_point.len(),
                    hex::encode(ec_point)
                )));
            }
        };
        if point.first() != Some(&0x04) {
            return Err(FixtureError::PublicKey(
                "the EC point is not in uncompressed form".to_owned(),
            ));
        }
        Ok(SubjectPublicKey {
            alg: KeyAlg::EcP256,
            key_bytes: point.to_vec(),
        })
    }

    /// The key algorithm.
    pub fn alg(&self) -> KeyAlg {
        self.alg
    }
}

impl PublicKeyData for SubjectPublicKey {
    fn der_bytes(&self) -> &[u8] {
        &self.key_bytes
    }

    fn algorithm(&self) -> &'static SignatureAlgorithm {
        // Only the SubjectPublicKeyInfo algorithm identifier is taken from this:
        // rsaEncryption + NULL, or id-ecPublicKey + prime256v1.
        match self.alg {
            KeyAlg::Rsa2048 => &rcgen::PKCS_RSA_SHA256,
            KeyAlg::EcP256 => &rcgen::PKCS_ECDSA_P256_SHA256,
        }
    }
}

fn strip_leading_zeros(bytes: &[u8]) -> &[u8] {
    let start = bytes.iter().position(|b| *b != 0).unwrap_or(bytes.len());
    &bytes[start..]
}

/// PKCS#1 `RSAPublicKey` DER (with the `der` crate).
fn rsa_public_key_der(modulus: &[u8], public_exponent: &[u8]) -> Result<Vec<u8>, FixtureError> {
    #[derive(der::Sequence)]
    struct RsaPublicKey<'a> {
        modulus: der::asn1::UintRef<'a>,
        public_exponent: der::asn1::UintRef<'a>,
    }
    let bad = |e: der::Error| FixtureError::PublicKey(format!("RSA public key DER: {e}"));
    der::Encode::to_der(&RsaPublicKey {
        modulus: der::asn1::UintRef::new(modulus).map_err(bad)?,
        public_exponent: der::asn1::UintRef::new(public_exponent).map_err(bad)?,
    })
    .map_err(bad)
}

/// CKA_SERIAL_NUMBER: the DER INTEGER of a certificate's serial, from its content
/// bytes as the certificate has them.
pub(crate) fn serial_number_der(raw_serial: &[u8]) -> Result<Vec<u8>, FixtureError> {
    let bad = |e: der::Error| FixtureError::PublicKey(format!("serial number DER: {e}"));
    der::Encode::to_der(&der::asn1::IntRef::new(raw_serial).map_err(bad)?).map_err(bad)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn der_of_rsa_keys_and_serials() {
        let key = rsa_public_key_der(&[0x80; 4], &[0x01, 0x00, 0x01]).unwrap();
        assert_eq!(
            key,
            [
                0x30, 12, 0x02, 5, 0, 0x80, 0x80, 0x80, 0x80, 0x02, 3, 1, 0, 1
            ]
        );
        // A serial with the high bit set carries its leading zero, as in the certificate.
        assert_eq!(
            serial_number_der(&[0x00, 0x80]).unwrap(),
            [0x02, 2, 0, 0x80]
        );
        assert_eq!(serial_number_der(&[0x52]).unwrap(), [0x02, 1, 0x52]);
    }

    #[test]
    fn ec_point_is_unwrapped_from_its_octet_string() {
        let mut raw = vec![0x04];
        raw.extend([7u8; 64]);
        let mut wrapped = vec![0x04, 0x41];
        wrapped.extend(&raw);
        assert_eq!(
            SubjectPublicKey::from_ec_point(&wrapped).unwrap().key_bytes,
            raw
        );
        assert_eq!(
            SubjectPublicKey::from_ec_point(&raw).unwrap().key_bytes,
            raw
        );
        assert!(SubjectPublicKey::from_ec_point(&raw[..30]).is_err());
    }

    #[test]
    fn pem_is_base64_in_64_column_lines() {
        let pem = der_to_pem(b"Man");
        assert_eq!(
            pem,
            "-----BEGIN CERTIFICATE-----\nTWFu\n-----END CERTIFICATE-----\n"
        );
        assert!(der_to_pem(b"Ma").contains("\nTWE=\n"));
        assert!(der_to_pem(b"M").contains("\nTQ==\n"));
    }

    #[test]
    fn serials_are_16_bytes_with_the_requested_high_bit() {
        for _ in 0..50 {
            let (serial, hex) = random_serial(false).unwrap();
            assert_eq!(serial.len(), 16);
            assert!(serial.as_ref()[0] > 0 && serial.as_ref()[0] < 0x80, "{hex}");
            assert_eq!(hex, hex::encode_upper(serial.as_ref()));
            let (serial, _) = random_serial(true).unwrap();
            assert!(serial.as_ref()[0] >= 0x80);
        }
    }
}
