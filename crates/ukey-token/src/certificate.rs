//! What a user (and the renewal engine) needs to know about one X.509 certificate,
//! parsed from the DER in a token's CKO_CERTIFICATE object.
//!
//! Names are formatted here rather than with x509-parser's `Display`, which escapes
//! non-ASCII bytes: on a Chinese UKey `CN=张三` must come out as `张三`.

use serde::Serialize;
use time::OffsetDateTime;
use ukey_trust::attribute_text;
use x509_parser::oid_registry;
use x509_parser::prelude::{FromDer, X509Certificate, X509Name};
use x509_parser::public_key::PublicKey;

/// What a certificate's key may be used for, from its keyUsage extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Usage {
    /// digitalSignature / nonRepudiation (or certificate / CRL signing) only.
    Signing,
    /// keyEncipherment / dataEncipherment / keyAgreement only.
    Encryption,
    /// Both kinds, or no keyUsage extension at all (which allows every use).
    Both,
}

impl Usage {
    /// `signing`, `encryption` or `both`.
    pub fn as_str(self) -> &'static str {
        match self {
            Usage::Signing => "signing",
            Usage::Encryption => "encryption",
            Usage::Both => "both",
        }
    }
}

/// A parsed certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateDetails {
    /// Serial number, upper-case hex exactly as `openssl x509 -noout -serial` prints it
    /// (without `serial=`).
    pub serial: String,
    /// Subject, e.g. `C=CN, O=某某建设工程有限公司, CN=张三`.
    pub subject: String,
    /// The subject's first commonName, if any.
    pub subject_cn: Option<String>,
    /// The subject's first organizationName, if any.
    pub subject_o: Option<String>,
    /// Issuer, formatted like the subject.
    pub issuer: String,
    /// Start of validity (UTC).
    pub not_before: OffsetDateTime,
    /// End of validity (UTC).
    pub not_after: OffsetDateTime,
    /// Key algorithm and size: `RSA-2048`, `EC-P256`, `SM2`, ...
    pub key_algorithm: String,
    /// Signing, encryption or both.
    pub usage: Usage,
    /// The SubjectPublicKeyInfo, DER, to match the certificate against a key.
    pub public_key_info: Vec<u8>,
    /// basicConstraints CA:TRUE: a CA's certificate stored on the key (a root or an
    /// intermediate), never the holder's own and never renewed.
    pub is_ca: bool,
}

impl CertificateDetails {
    /// Parses a DER certificate. Trailing bytes after the certificate are rejected.
    pub fn from_der(der: &[u8]) -> Result<CertificateDetails, String> {
        let (rest, cert) = X509Certificate::from_der(der).map_err(|e| e.to_string())?;
        if !rest.is_empty() {
            return Err(format!(
                "{} unexpected bytes after the certificate",
                rest.len()
            ));
        }
        let usage = match cert.key_usage().map_err(|e| e.to_string())? {
            None => Usage::Both,
            Some(ext) => {
                let ku = ext.value;
                let sign = ku.digital_signature()
                    || ku.non_repudiation()
                    || ku.key_cert_sign()
                    || ku.crl_sign();
                let encrypt = ku.key_encipherment()
                    || ku.data_encipherment()
                    || ku.key_agreement()
                    || ku.encipher_only()
                    || ku.decipher_only();
                match (sign, encrypt) {
                    (true, false) => Usage::Signing,
                    (false, true) => Usage::Encryption,
                    _ => Usage::Both,
                }
            }
        };
        Ok(CertificateDetails {
            serial: openssl_serial(cert.raw_serial()),
            subject: format_name(cert.subject()),
            subject_cn: first_value(cert.subject(), &oid_registry::OID_X509_COMMON_NAME),
            subject_o: first_value(cert.subject(), &oid_registry::OID_X509_ORGANIZATION_NAME),
            issuer: format_name(cert.issuer()),
            not_before: cert.validity().not_before.to_datetime(),
            not_after: cert.validity().not_after.to_datetime(),
            key_algorithm: key_algorithm(&cert),
            usage,
            public_key_info: cert.public_key().raw.to_vec(),
            is_ca: cert
                .basic_constraints()
                .ok()
                .flatten()
                .is_some_and(|bc| bc.value.ca),
        })
    }

    /// Whole days until `not_after`, rounded up: a certificate expiring in 10 days
    /// minus a few seconds says 10. Zero or less once expired (see [`Self::is_expired`]).
    pub fn days_left(&self, now: OffsetDateTime) -> i64 {
        let secs = (self.not_after - now).whole_seconds();
        secs.div_euclid(86_400) + i64::from(secs.rem_euclid(86_400) != 0)
    }

    /// Whether `now` is past `not_after`.
    pub fn is_expired(&self, now: OffsetDateTime) -> bool {
        now > self.not_after
    }
}

/// The serial as `openssl x509 -serial` prints it: the integer's magnitude in upper-case
/// hex, two digits per byte, without the 0x00 byte DER adds before a high bit; a
/// negative serial (high bit set without that byte) gets a `-` and its magnitude.
pub fn openssl_serial(raw: &[u8]) -> String {
    if raw.is_empty() {
        return "00".to_owned();
    }
    let negative = raw[0] & 0x80 != 0;
    let magnitude: Vec<u8> = if negative {
        // Two's complement: invert and add one.
        let mut m: Vec<u8> = raw.iter().map(|b| !b).collect();
        for b in m.iter_mut().rev() {
            let (v, carry) = b.overflowing_add(1);
            *b = v;
            if !carry {
                break;
            }
        }
        m
    } else {
        raw.to_vec()
    };
    let first = magnitude.iter().position(|&b| b != 0);
    let digits = match first {
        Some(i) => hex::encode_upper(&magnitude[i..]),
        None => "00".to_owned(),
    };
    if negative {
        format!("-{digits}")
    } else {
        digits
    }
}

/// Short names for the attributes seen on Chinese CA certificates; others print as
/// their dotted OID, as OpenSSL does.
fn attribute_short_name(oid: &x509_parser::der_parser::oid::Oid<'_>) -> String {
    use oid_registry::*;
    let table = [
        (&OID_X509_COMMON_NAME, "CN"),
        (&OID_X509_COUNTRY_NAME, "C"),
        (&OID_X509_LOCALITY_NAME, "L"),
        (&OID_X509_STATE_OR_PROVINCE_NAME, "ST"),
        (&OID_X509_ORGANIZATION_NAME, "O"),
        (&OID_X509_ORGANIZATIONAL_UNIT, "OU"),
        (&OID_X509_SERIALNUMBER, "serialNumber"),
        (&OID_X509_STREET_ADDRESS, "street"),
        (&OID_X509_TITLE, "title"),
        (&OID_X509_GIVEN_NAME, "GN"),
        (&OID_X509_SURNAME, "SN"),
        (&OID_PKCS9_EMAIL_ADDRESS, "emailAddress"),
        (&OID_DOMAIN_COMPONENT, "DC"),
        (&OID_X509_UNIQUE_IDENTIFIER, "x500UniqueIdentifier"),
    ];
    table
        .iter()
        .find(|(o, _)| *o == oid)
        .map(|(_, n)| (*n).to_owned())
        .unwrap_or_else(|| oid.to_id_string())
}

/// `C=CN, O=某某建设工程有限公司, CN=张三`, in the certificate's own order (as
/// `openssl x509 -nameopt utf8,sep_comma_plus_space` prints it). Multi-valued RDNs are
/// joined with `+`.
pub fn format_name(name: &X509Name<'_>) -> String {
    name.iter_rdn()
        .map(|rdn| {
            rdn.iter()
                .map(|atv| {
                    format!(
                        "{}={}",
                        attribute_short_name(atv.attr_type()),
                        attribute_text(atv.attr_value())
                    )
                })
                .collect::<Vec<_>>()
                .join("+")
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn first_value(name: &X509Name<'_>, oid: &x509_parser::der_parser::oid::Oid<'_>) -> Option<String> {
    name.iter_by_oid(oid)
        .next()
        .map(|atv| attribute_text(atv.attr_value()))
}

/// `RSA-2048`, `EC-P256`, `EC-P384`, `EC-P521`, `SM2`, `Ed25519`, or the OID.
fn key_algorithm(cert: &X509Certificate<'_>) -> String {
    use oid_registry::*;
    let spki = cert.public_key();
    let alg = &spki.algorithm.algorithm;
    if *alg == OID_PKCS1_RSAENCRYPTION {
        if let Ok(PublicKey::RSA(rsa)) = spki.parsed() {
            return format!("RSA-{}", bit_length(rsa.modulus));
        }
        return "RSA".to_owned();
    }
    if *alg == OID_KEY_TYPE_EC_PUBLIC_KEY {
        let curve = spki
            .algorithm
            .parameters
            .as_ref()
            .and_then(|p| p.clone().oid().ok());
        let sm2 = x509_parser::der_parser::oid!(1.2.156.10197.1.301);
        return match curve {
            Some(c) if c == OID_EC_P256 => "EC-P256".to_owned(),
            Some(c) if c == OID_NIST_EC_P384 => "EC-P384".to_owned(),
            Some(c) if c == OID_NIST_EC_P521 => "EC-P521".to_owned(),
            Some(c) if c == sm2 => "SM2".to_owned(),
            Some(c) => format!("EC-{}", c.to_id_string()),
            None => "EC".to_owned(),
        };
    }
    if *alg == OID_SIG_ED25519 {
        return "Ed25519".to_owned();
    }
    alg.to_id_string()
}

/// Bit length of a big-endian unsigned integer (leading zero bytes ignored).
fn bit_length(be: &[u8]) -> usize {
    match be.iter().position(|&b| b != 0) {
        Some(i) => (be.len() - i - 1) * 8 + (8 - be[i].leading_zeros() as usize),
        None => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serial_matches_openssl_rules() {
        assert_eq!(openssl_serial(&[0x01]), "01");
        assert_eq!(openssl_serial(&[0x0A, 0xBC]), "0ABC");
        // DER pads a positive serial with a high bit with 0x00; OpenSSL does not print it.
        assert_eq!(openssl_serial(&[0x00, 0xB2, 0x01]), "B201");
        // Negative serial (RFC 5280 forbids it, real CAs have issued them).
        assert_eq!(openssl_serial(&[0xFF]), "-01");
        assert_eq!(openssl_serial(&[0xFF, 0x00]), "-0100");
        assert_eq!(openssl_serial(&[0x80]), "-80");
        assert_eq!(openssl_serial(&[0x00]), "00");
        assert_eq!(openssl_serial(&[]), "00");
    }

    /// Chinese CAs encode names as UTF8String, and older ones as BMPString or
    /// UniversalString; each must come out as readable Chinese, not escaped bytes.
    #[test]
    fn chinese_names_come_out_intact_in_every_string_type() {
        use rcgen::{CertificateParams, DistinguishedName, DnType, DnValue, KeyPair};
        let mut dn = DistinguishedName::new();
        dn.push(
            DnType::CountryName,
            DnValue::PrintableString("CN".try_into().unwrap()),
        );
        dn.push(
            DnType::OrganizationName,
            DnValue::BmpString("某某建设工程有限公司".try_into().unwrap()),
        );
        dn.push(
            DnType::OrganizationalUnitName,
            DnValue::UniversalString("工程部".try_into().unwrap()),
        );
        dn.push(DnType::CommonName, DnValue::Utf8String("张三".into()));
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name = dn;
        params.serial_number = Some(vec![0x00, 0xC0, 0x01].into());
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let cert = params.self_signed(&key).unwrap();

        let d = CertificateDetails::from_der(cert.der()).unwrap();
        assert_eq!(
            d.subject,
            "C=CN, O=某某建设工程有限公司, OU=工程部, CN=张三"
        );
        assert_eq!(d.issuer, d.subject);
        assert_eq!(d.subject_cn.as_deref(), Some("张三"));
        assert_eq!(d.subject_o.as_deref(), Some("某某建设工程有限公司"));
        assert_eq!(d.serial, "C001");
        assert_eq!(d.key_algorithm, "EC-P256");

        // x509-parser's own Display would not do: that is why format_name exists.
        let (_, parsed) = X509Certificate::from_der(cert.der()).unwrap();
        assert_ne!(parsed.subject().to_string(), d.subject);
    }

    #[test]
    fn garbage_and_trailing_bytes_are_rejected() {
        assert!(CertificateDetails::from_der(b"\x30\x03\x02\x01\x01").is_err());
        assert!(CertificateDetails::from_der(&[]).is_err());
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let cert = rcgen::CertificateParams::new(vec!["x".to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let mut der = cert.der().to_vec();
        assert_eq!(
            CertificateDetails::from_der(&der).unwrap().usage,
            Usage::Both
        );
        der.push(0);
        assert!(CertificateDetails::from_der(&der).is_err());
    }

    #[test]
    fn bit_length_ignores_leading_zeros() {
        assert_eq!(bit_length(&[0x00, 0x80, 0x00]), 16);
        assert_eq!(bit_length(&[0x01]), 1);
        assert_eq!(bit_length(&[]), 0);
    }

    #[test]
    fn days_left_rounds_up() {
        let now = time::macros::datetime!(2026-01-01 00:00 UTC);
        let mut d = CertificateDetails {
            serial: "01".into(),
            subject: String::new(),
            subject_cn: None,
            subject_o: None,
            issuer: String::new(),
            not_before: now,
            not_after: now + time::Duration::days(10) - time::Duration::seconds(3),
            key_algorithm: "RSA-2048".into(),
            usage: Usage::Signing,
            public_key_info: vec![],
            is_ca: false,
        };
        assert_eq!(d.days_left(now), 10);
        assert!(!d.is_expired(now));
        d.not_after = now - time::Duration::days(5) - time::Duration::seconds(3);
        assert_eq!(d.days_left(now), -5);
        assert!(d.is_expired(now));
    }
}
