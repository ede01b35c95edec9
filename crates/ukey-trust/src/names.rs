//! Distinguished names, compared by what they say: the same attribute types with the
//! same decoded values in the same RDN order, whatever the string type (a UTF8String
//! 张三 equals a BMPString 张三); never as formatted strings, which two different names
//! can share (`CN=a, O=b` formats like one CN whose value is `a, O=b`).

use x509_parser::asn1_rs::{Any, Tag};
use x509_parser::prelude::X509Name;

/// The text of an attribute value, whatever its string type: UTF8String,
/// PrintableString, IA5String, BMPString (UTF-16), UniversalString (UTF-32), T61String
/// (Latin-1); anything else as `#` + hex of the DER.
pub fn attribute_text(value: &Any<'_>) -> String {
    let data = value.data;
    match value.tag() {
        Tag::Utf8String
        | Tag::PrintableString
        | Tag::Ia5String
        | Tag::NumericString
        | Tag::VisibleString => String::from_utf8_lossy(data).into_owned(),
        // BMPString: UTF-16 big-endian.
        Tag::BmpString => {
            let units: Vec<u16> = data
                .chunks(2)
                .map(|c| u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]))
                .collect();
            String::from_utf16_lossy(&units)
        }
        // UniversalString: UTF-32 big-endian.
        Tag::UniversalString => data
            .chunks(4)
            .map(|c| {
                let mut b = [0u8; 4];
                b[..c.len()].copy_from_slice(c);
                char::from_u32(u32::from_be_bytes(b)).unwrap_or('\u{FFFD}')
            })
            .collect(),
        // T61String is in practice Latin-1.
        Tag::T61String => data.iter().map(|&b| char::from(b)).collect(),
        _ => format!("#{}", hex::encode(value.as_bytes())),
    }
}

/// The name as RDNs of (attribute type OID, decoded value), each RDN's attributes
/// sorted (an RDN is a set).
fn parts(name: &X509Name<'_>) -> Vec<Vec<(String, String)>> {
    name.iter_rdn()
        .map(|rdn| {
            let mut set: Vec<(String, String)> = rdn
                .iter()
                .map(|atv| {
                    (
                        atv.attr_type().to_id_string(),
                        attribute_text(atv.attr_value()),
                    )
                })
                .collect();
            set.sort();
            set
        })
        .collect()
}

/// Whether two names are the same: equal DER, or the same attribute types with the same
/// decoded values in the same RDN order.
pub fn same_name(a: &X509Name<'_>, b: &X509Name<'_>) -> bool {
    a.as_raw() == b.as_raw() || parts(a) == parts(b)
}

/// `C=CN, O=…, CN=…` for messages (short names for the common attributes, else the
/// OID).
pub fn format(name: &X509Name<'_>) -> String {
    name.iter_rdn()
        .map(|rdn| {
            rdn.iter()
                .map(|atv| {
                    let oid = atv.attr_type().to_id_string();
                    let short = match oid.as_str() {
                        "2.5.4.3" => "CN",
                        "2.5.4.6" => "C",
                        "2.5.4.7" => "L",
                        "2.5.4.8" => "ST",
                        "2.5.4.10" => "O",
                        "2.5.4.11" => "OU",
                        _ => oid.as_str(),
                    }
                    .to_owned();
                    format!("{short}={}", attribute_text(atv.attr_value()))
                })
                .collect::<Vec<_>>()
                .join("+")
        })
        .collect::<Vec<_>>()
        .join(", ")
}
