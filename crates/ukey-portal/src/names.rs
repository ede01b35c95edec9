//! Distinguished-name matching: how an order's issuer (typed by an operator as text,
//! or given as DER by a client) is compared with a certificate's issuer or subject.
//!
//! The normal form ([`NameKey`]) is the sorted set of `oid=value` pairs, each value
//! trimmed, inner whitespace collapsed and lower-cased. RDN order is ignored, so
//! OpenSSL's forward spelling (`C=CN, O=…, CN=…`) and RFC 4514's reversed one match;
//! string types (PrintableString vs UTF8String) are ignored too. Two different CAs whose
//! names differ only in attribute order or case would collide: no real PKI does that.

use x509_parser::x509::X509Name;

/// Normal form of a distinguished name, used as the database key for issuers.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NameKey(String);

impl NameKey {
    /// The stored form.
    pub fn as_str(&self) -> &str {
        &self.0
    }
    /// Rebuilds a key read back from the database.
    pub fn from_stored(s: String) -> NameKey {
        NameKey(s)
    }
    fn from_pairs(mut pairs: Vec<(String, String)>) -> NameKey {
        pairs.sort();
        let parts: Vec<String> = pairs.into_iter().map(|(o, v)| format!("{o}={v}")).collect();
        NameKey(parts.join("\n"))
    }
}

/// A DN string or DER that could not be understood.
#[derive(Debug, Clone, thiserror::Error)]
#[error("invalid distinguished name: {0}")]
pub struct NameError(pub String);

fn normalise_value(v: &str) -> String {
    v.split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .to_lowercase()
}

/// Normal form of a parsed X.509 Name.
pub fn key_of_name(name: &X509Name<'_>) -> NameKey {
    let mut pairs = Vec::new();
    for rdn in name.iter() {
        for attr in rdn.iter() {
            let oid = attr.attr_type().to_id_string();
            let value = match attr.as_str() {
                Ok(s) => normalise_value(s),
                Err(_) => match other_string(attr) {
                    Some(s) => normalise_value(&s),
                    None => format!("#{}", hex::encode(attr.attr_value().data)),
                },
            };
            pairs.push((oid, value));
        }
    }
    NameKey::from_pairs(pairs)
}

/// BMPString (UTF-16BE) and TeletexString (treated as Latin-1) values, which
/// `as_str` does not decode.
fn other_string(attr: &x509_parser::x509::AttributeTypeAndValue<'_>) -> Option<String> {
    use x509_parser::der_parser::asn1_rs::Tag;
    let data = attr.attr_value().data;
    match attr.attr_value().tag() {
        Tag::BmpString if data.len() % 2 == 0 => {
            let units: Vec<u16> = data
                .chunks(2)
                .map(|c| u16::from_be_bytes([c[0], c[1]]))
                .collect();
            String::from_utf16(&units).ok()
        }
        Tag::T61String => Some(data.iter().map(|&b| char::from(b)).collect()),
        _ => None,
    }
}

/// Normal form of the DER of a Name (e.g. a certificate's `issuer` field).
pub fn key_of_name_der(der: &[u8]) -> Result<NameKey, NameError> {
    use x509_parser::prelude::FromDer;
    let (rest, name) =
        X509Name::from_der(der).map_err(|e| NameError(format!("not a DER Name: {e}")))?;
    if !rest.is_empty() {
        return Err(NameError("trailing bytes after the Name".into()));
    }
    if name.iter().next().is_none() {
        return Err(NameError("empty Name".into()));
    }
    Ok(key_of_name(&name))
}

/// Display form of a Name, `C=CN, O=…, CN=…` in DER order.
pub fn display_name(name: &X509Name<'_>) -> String {
    let mut parts = Vec::new();
    for rdn in name.iter() {
        for attr in rdn.iter() {
            let oid = attr.attr_type().to_id_string();
            let short = short_name(&oid).map(str::to_owned).unwrap_or(oid);
            let value = match attr.as_str() {
                Ok(s) => s.to_owned(),
                Err(_) => other_string(attr)
                    .unwrap_or_else(|| format!("#{}", hex::encode(attr.attr_value().data))),
            };
            parts.push(format!("{short}={value}"));
        }
    }
    parts.join(", ")
}

const ATTRIBUTES: &[(&str, &str)] = &[
    ("CN", "2.5.4.3"),
    ("SN", "2.5.4.4"),
    ("SURNAME", "2.5.4.4"),
    ("SERIALNUMBER", "2.5.4.5"),
    ("C", "2.5.4.6"),
    ("L", "2.5.4.7"),
    ("ST", "2.5.4.8"),
    ("S", "2.5.4.8"),
    ("STREET", "2.5.4.9"),
    ("O", "2.5.4.10"),
    ("OU", "2.5.4.11"),
    ("T", "2.5.4.12"),
    ("TITLE", "2.5.4.12"),
    ("GN", "2.5.4.42"),
    ("GIVENNAME", "2.5.4.42"),
    ("DC", "0.9.2342.19200300.100.1.25"),
    ("UID", "0.9.2342.19200300.100.1.1"),
    ("E", "1.2.840.113549.1.9.1"),
    ("EMAIL", "1.2.840.113549.1.9.1"),
    ("EMAILADDRESS", "1.2.840.113549.1.9.1"),
];

fn short_name(oid: &str) -> Option<&'static str> {
    ATTRIBUTES.iter().find(|(_, o)| *o == oid).map(|(s, _)| *s)
}

fn oid_of(attr: &str) -> Option<String> {
    let upper = attr.trim().to_ascii_uppercase();
    if let Some((_, oid)) = ATTRIBUTES.iter().find(|(s, _)| *s == upper) {
        return Some((*oid).to_owned());
    }
    let dotted = upper.strip_prefix("OID.").unwrap_or(&upper);
    if !dotted.is_empty()
        && dotted.split('.').count() >= 2
        && dotted
            .split('.')
            .all(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_digit()))
    {
        return Some(dotted.to_owned());
    }
    None
}

/// Normal form of a DN typed as text: `CN=UKey CA, O=Example` (commas or semicolons,
/// RFC 4514 escapes `\,` `\+` `\\` `\XX`, `+` for multi-valued RDNs), OpenSSL's
/// `/C=CN/O=Example/CN=UKey CA`, or OpenSSL's default `C = CN, O = Example`.
pub fn key_of_dn_string(dn: &str) -> Result<NameKey, NameError> {
    let dn = dn.trim();
    if dn.is_empty() {
        return Err(NameError("empty DN".into()));
    }
    let components: Vec<String> = if dn.starts_with('/') {
        dn.split('/')
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect()
    } else {
        split_unescaped(dn, &[',', ';', '+'])
    };
    let mut pairs = Vec::new();
    for component in components {
        let (attr, value) = component
            .split_once('=')
            .ok_or_else(|| NameError(format!("{component:?} is not TYPE=value")))?;
        let oid = oid_of(attr).ok_or_else(|| {
            NameError(format!(
                "unknown attribute type {:?} (use CN, O, OU, C, ... or an OID)",
                attr.trim()
            ))
        })?;
        let value = unescape(value.trim())?;
        if value.is_empty() {
            return Err(NameError(format!("empty value for {}", attr.trim())));
        }
        pairs.push((oid, normalise_value(&value)));
    }
    Ok(NameKey::from_pairs(pairs))
}

fn split_unescaped(s: &str, separators: &[char]) -> Vec<String> {
    let mut out = Vec::new();
    let mut current = String::new();
    let mut chars = s.chars();
    let mut in_quotes = false;
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                current.push(c);
                if let Some(n) = chars.next() {
                    current.push(n);
                }
            }
            '"' => {
                in_quotes = !in_quotes;
                current.push(c);
            }
            c if !in_quotes && separators.contains(&c) => {
                out.push(std::mem::take(&mut current));
            }
            c => current.push(c),
        }
    }
    out.push(current);
    out.into_iter()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .collect()
}

fn unescape(v: &str) -> Result<String, NameError> {
    let v = v
        .strip_prefix('"')
        .and_then(|x| x.strip_suffix('"'))
        .unwrap_or(v);
    let mut bytes = Vec::with_capacity(v.len());
    let raw = v.as_bytes();
    let mut i = 0;
    while i < raw.len() {
        if raw[i] == b'\\' {
            let hex_pair = raw.get(i + 1..i + 3).and_then(|p| {
                std::str::from_utf8(p)
                    .ok()
                    .and_then(|s| u8::from_str_radix(s, 16).ok())
            });
            if let Some(b) = hex_pair {
                bytes.push(b);
                i += 3;
            } else if let Some(&b) = raw.get(i + 1) {
                bytes.push(b);
                i += 2;
            } else {
                return Err(NameError("dangling backslash".into()));
            }
        } else {
            bytes.push(raw[i]);
            i += 1;
        }
    }
    String::from_utf8(bytes).map_err(|_| NameError("escaped bytes are not UTF-8".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name_der(cn: &str, o: &str) -> Vec<u8> {
        let mut params = rcgen::CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.distinguished_name.push(
            rcgen::DnType::CountryName,
            rcgen::DnValue::PrintableString("CN".try_into().unwrap()),
        );
        params
            .distinguished_name
            .push(rcgen::DnType::OrganizationName, o);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        let (_, parsed) = x509_parser::parse_x509_certificate(cert.der()).unwrap();
        parsed.subject().as_raw().to_vec()
    }

    #[test]
    fn text_and_der_spellings_match() {
        let der = name_der("UKey  Test CA", "某某 CA");
        let k = key_of_name_der(&der).unwrap();
        assert_eq!(
            key_of_dn_string("CN=ukey test ca, O=某某 CA, C=cn").unwrap(),
            k
        );
        assert_eq!(
            key_of_dn_string("/C=CN/O=某某 CA/CN=UKey Test CA").unwrap(),
            k
        );
        assert_eq!(
            key_of_dn_string("C = CN, O = 某某 CA, CN = UKey Test CA").unwrap(),
            k
        );
        assert_eq!(
            key_of_dn_string("2.5.4.3=UKey Test CA;O=某某 CA;C=CN").unwrap(),
            k
        );
        assert_ne!(key_of_dn_string("CN=Other CA, O=某某 CA, C=CN").unwrap(), k);
        assert_ne!(key_of_dn_string("CN=UKey Test CA, C=CN").unwrap(), k);
    }

    #[test]
    fn escapes_and_errors() {
        let a = key_of_dn_string(r"CN=Acme\, Inc., O=X").unwrap();
        let b = key_of_dn_string(r#"CN="Acme, Inc.", O=X"#).unwrap();
        assert_eq!(a, b);
        assert!(key_of_dn_string("").is_err());
        assert!(key_of_dn_string("nonsense").is_err());
        assert!(key_of_dn_string("XX=1").is_err());
        assert!(key_of_name_der(b"\x30\x03\x02\x01\x00").is_err());
    }
}
