//! What a fixture token should hold (`TokenSpec`, `CertSpec`) and what was built
//! (`TokenFixture`, `CertFixture`).

use std::fmt;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

/// Key algorithm of a key pair generated on the token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum KeyAlg {
    /// RSA with a 2048-bit modulus and exponent 65537.
    #[serde(rename = "RSA-2048")]
    Rsa2048,
    /// ECDSA on NIST P-256 (prime256v1).
    #[serde(rename = "EC-P256")]
    EcP256,
}

impl KeyAlg {
    /// The name `ukey list` prints for this algorithm: `RSA-2048` or `EC-P256`.
    pub fn display_name(self) -> &'static str {
        match self {
            KeyAlg::Rsa2048 => "RSA-2048",
            KeyAlg::EcP256 => "EC-P256",
        }
    }
}

impl fmt::Display for KeyAlg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.display_name())
    }
}

/// What a certificate is for, as a Chinese CA's dual-certificate UKeys separate them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CertUsage {
    /// digitalSignature + nonRepudiation (签名证书).
    Signing,
    /// keyEncipherment + dataEncipherment, + keyAgreement for EC (加密证书).
    Encryption,
}

impl fmt::Display for CertUsage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CertUsage::Signing => "signing",
            CertUsage::Encryption => "encryption",
        })
    }
}

/// One key pair (and usually its certificate) on a fixture token.
///
/// As JSON (`softhsm-fixtures create --spec`), `key_id` is hex and every field but
/// `alg`, `usage`, `subject_cn`, `days_left`, `key_id` and `label` may be left out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertSpec {
    /// Key algorithm; the key pair is generated on the token.
    pub alg: KeyAlg,
    /// Key usage and extended key usage of the certificate.
    pub usage: CertUsage,
    /// Subject common name, e.g. "张三" (UTF8String).
    pub subject_cn: String,
    /// Subject organisation, e.g. "某某建设工程有限公司".
    #[serde(default)]
    pub subject_o: Option<String>,
    /// not_after = now + days_left (negative: already expired);
    /// not_before = min(not_after - 365 days, now - 1 day).
    pub days_left: i64,
    /// CKA_ID shared by the certificate, private key and public key.
    #[serde(with = "hex_bytes")]
    pub key_id: Vec<u8>,
    /// CKA_LABEL of the certificate and key objects.
    pub label: String,
    /// false: key pair without certificate (orphan key).
    #[serde(default = "yes")]
    pub with_cert: bool,
    /// false: certificate without key pair (orphan certificate; the key pair is
    /// generated on the token, certified, then destroyed).
    #[serde(default = "yes")]
    pub with_key: bool,
    /// true: the certificate object's CKA_VALUE is garbage that no DER parser accepts.
    #[serde(default)]
    pub corrupt_cert: bool,
    /// true: the serial's first byte has its high bit set, so its DER encoding carries
    /// a leading 0x00 byte (17 content bytes). Listing code must not print that byte.
    #[serde(default)]
    pub high_bit_serial: bool,
}

fn yes() -> bool {
    true
}

fn default_user_pin() -> String {
    DEFAULT_USER_PIN.to_owned()
}

fn default_so_pin() -> String {
    DEFAULT_SO_PIN.to_owned()
}

impl CertSpec {
    /// A signing certificate (CKA_ID 01, label "`cn` 签名") with O=某某建设工程有限公司.
    pub fn signing(alg: KeyAlg, cn: &str, days_left: i64) -> CertSpec {
        CertSpec {
            alg,
            usage: CertUsage::Signing,
            subject_cn: cn.to_owned(),
            subject_o: Some(DEFAULT_ORG.to_owned()),
            days_left,
            key_id: vec![0x01],
            label: format!("{cn} 签名"),
            with_cert: true,
            with_key: true,
            corrupt_cert: false,
            high_bit_serial: false,
        }
    }

    /// An encryption certificate (CKA_ID 02, label "`cn` 加密") with O=某某建设工程有限公司.
    pub fn encryption(alg: KeyAlg, cn: &str, days_left: i64) -> CertSpec {
        CertSpec {
            usage: CertUsage::Encryption,
            key_id: vec![0x02],
            label: format!("{cn} 加密"),
            ..CertSpec::signing(alg, cn, days_left)
        }
    }
}

/// The organisation the default specs put in their subjects.
pub const DEFAULT_ORG: &str = "某某建设工程有限公司";
/// The default user PIN of fixture tokens.
pub const DEFAULT_USER_PIN: &str = "123456";
/// The default security officer PIN of fixture tokens.
pub const DEFAULT_SO_PIN: &str = "12345678";

/// A whole fixture token. As JSON, the PINs default to 123456 / 12345678.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenSpec {
    /// Token label (at most 32 bytes of UTF-8).
    pub label: String,
    /// User PIN; fixture PINs are test data, known to every test.
    #[serde(default = "default_user_pin")]
    pub user_pin: String,
    /// Security officer PIN.
    #[serde(default = "default_so_pin")]
    pub so_pin: String,
    /// Key pairs and certificates, written in this order.
    #[serde(default)]
    pub certs: Vec<CertSpec>,
}

impl fmt::Debug for TokenSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenSpec")
            .field("label", &self.label)
            .field("user_pin", &"[redacted]")
            .field("so_pin", &"[redacted]")
            .field("certs", &self.certs)
            .finish()
    }
}

impl TokenSpec {
    /// One signing RSA-2048 certificate CN=张三, O=某某建设工程有限公司, 10 days left.
    pub fn ukey(label: &str) -> TokenSpec {
        TokenSpec {
            label: label.to_owned(),
            user_pin: DEFAULT_USER_PIN.to_owned(),
            so_pin: DEFAULT_SO_PIN.to_owned(),
            certs: vec![CertSpec::signing(KeyAlg::Rsa2048, "张三", 10)],
        }
    }

    /// A dual-certificate key: a signing and an encryption certificate and key pair,
    /// both of `alg`, CN=张三, 10 days left. The encryption certificate's serial has its
    /// high bit set (DER leading 0x00), so listing code meets one on every dual token.
    pub fn dual(label: &str, alg: KeyAlg) -> TokenSpec {
        TokenSpec {
            certs: vec![
                CertSpec::signing(alg, "张三", 10),
                CertSpec {
                    high_bit_serial: true,
                    ..CertSpec::encryption(alg, "张三", 10)
                },
            ],
            ..TokenSpec::ukey(label)
        }
    }

    /// An initialised token with PINs set and no objects at all.
    pub fn empty(label: &str) -> TokenSpec {
        TokenSpec {
            certs: Vec::new(),
            ..TokenSpec::ukey(label)
        }
    }
}

/// A token that `SoftHsm::create_token` built.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenFixture {
    /// Token serial as C_GetTokenInfo reports it, trimmed.
    pub serial: String,
    /// Token label, trimmed.
    pub label: String,
    /// User PIN (fixture test data).
    pub user_pin: String,
    /// Security officer PIN (fixture test data).
    pub so_pin: String,
    /// One entry per `CertSpec`, in order.
    pub certs: Vec<CertFixture>,
}

impl fmt::Debug for TokenFixture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenFixture")
            .field("serial", &self.serial)
            .field("label", &self.label)
            .field("user_pin", &"[redacted]")
            .field("so_pin", &"[redacted]")
            .field("certs", &self.certs)
            .finish()
    }
}

/// A key pair and certificate on a fixture token.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertFixture {
    /// Upper-case hex, as `openssl x509 -noout -serial` prints it (without `serial=`).
    pub serial_hex: String,
    /// The certificate as issued. With `corrupt_cert` the token holds other bytes
    /// (`value_on_token`); with `with_cert: false` the token holds no certificate.
    #[serde(with = "hex_bytes")]
    pub der: Vec<u8>,
    /// CKA_ID of the objects.
    #[serde(with = "hex_bytes")]
    pub key_id: Vec<u8>,
    /// CKA_LABEL of the objects.
    pub label: String,
    /// Subject CN.
    pub subject_cn: String,
    /// Key algorithm.
    pub alg: KeyAlg,
    /// Certificate usage.
    pub usage: CertUsage,
    /// notBefore of the certificate.
    #[serde(with = "time::serde::rfc3339")]
    pub not_before: OffsetDateTime,
    /// notAfter of the certificate.
    #[serde(with = "time::serde::rfc3339")]
    pub not_after: OffsetDateTime,
    /// Whether a CKO_CERTIFICATE object was written.
    pub has_cert_object: bool,
    /// Whether the private (and public) key objects are on the token.
    pub has_private_key: bool,
    /// CKA_VALUE of the certificate object as written (differs from `der` only
    /// for a corrupt certificate; empty when no certificate object was written).
    #[serde(with = "hex_bytes")]
    pub value_on_token: Vec<u8>,
}

impl fmt::Debug for CertFixture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertFixture")
            .field("serial_hex", &self.serial_hex)
            .field("der", &format_args!("[{} bytes]", self.der.len()))
            .field("key_id", &format_args!("{}", hex::encode(&self.key_id)))
            .field("label", &self.label)
            .field("subject_cn", &self.subject_cn)
            .field("alg", &self.alg)
            .field("usage", &self.usage)
            .field("not_before", &self.not_before)
            .field("not_after", &self.not_after)
            .field("has_cert_object", &self.has_cert_object)
            .field("has_private_key", &self.has_private_key)
            .field(
                "value_on_token",
                &format_args!("[{} bytes]", self.value_on_token.len()),
            )
            .finish()
    }
}

impl CertFixture {
    /// The issued certificate as PEM.
    pub fn pem(&self) -> String {
        crate::ca::der_to_pem(&self.der)
    }

    /// CKA_ID as lower-case hex, as `pkcs11-tool --id` takes it.
    pub fn key_id_hex(&self) -> String {
        hex::encode(&self.key_id)
    }
}

mod hex_bytes {
    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(bytes))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = String::deserialize(d)?;
        hex::decode(text).map_err(serde::de::Error::custom)
    }
}
