//! The few DER encodings this crate builds by hand (public keys, ECDSA signatures).

/// A DER length.
fn length(len: usize) -> Vec<u8> {
    if len < 0x80 {
        // Short form: fits in 7 bits (checked above).
        vec![len as u8]
    } else {
        let bytes: Vec<u8> = len
            .to_be_bytes()
            .iter()
            .copied()
            .skip_while(|b| *b == 0)
            .collect();
        let mut out = vec![0x80 | bytes.len() as u8];
        out.extend(bytes);
        out
    }
}

/// Tag + length + value.
pub(crate) fn tlv(tag: u8, value: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    out.extend(length(value.len()));
    out.extend_from_slice(value);
    out
}

/// SEQUENCE of already-encoded elements.
pub(crate) fn sequence(items: &[Vec<u8>]) -> Vec<u8> {
    tlv(0x30, &items.concat())
}

/// A non-negative INTEGER from big-endian magnitude bytes.
pub(crate) fn integer(magnitude: &[u8]) -> Vec<u8> {
    let mut v: Vec<u8> = magnitude.iter().copied().skip_while(|b| *b == 0).collect();
    if v.is_empty() || v[0] & 0x80 != 0 {
        v.insert(0, 0);
    }
    tlv(0x02, &v)
}

/// OBJECT IDENTIFIER from its encoded content bytes.
pub(crate) fn oid(content: &[u8]) -> Vec<u8> {
    tlv(0x06, content)
}

/// BIT STRING with no unused bits.
pub(crate) fn bit_string(bytes: &[u8]) -> Vec<u8> {
    let mut v = vec![0u8];
    v.extend_from_slice(bytes);
    tlv(0x03, &v)
}

/// The content of a DER OCTET STRING, if `der` is exactly one.
pub(crate) fn unwrap_octet_string(der: &[u8]) -> Option<Vec<u8>> {
    let (&tag, rest) = der.split_first()?;
    if tag != 0x04 {
        return None;
    }
    let (&first, rest) = rest.split_first()?;
    let (len, body) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7F);
        if n == 0 || n > 2 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
        (len, &rest[n..])
    };
    (body.len() == len).then(|| body.to_vec())
}

/// `ECDSA-Sig-Value ::= SEQUENCE { r INTEGER, s INTEGER }` from PKCS#11's raw `r || s`.
pub fn ecdsa_signature(raw: &[u8]) -> Vec<u8> {
    let (r, s) = raw.split_at(raw.len() / 2);
    sequence(&[integer(r), integer(s)])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodings() {
        assert_eq!(integer(&[0x00, 0x80]), vec![0x02, 0x02, 0x00, 0x80]);
        assert_eq!(integer(&[]), vec![0x02, 0x01, 0x00]);
        assert_eq!(length(0x7F), vec![0x7F]);
        assert_eq!(length(0x100), vec![0x82, 0x01, 0x00]);
        assert_eq!(unwrap_octet_string(&[0x04, 0x02, 1, 2]), Some(vec![1, 2]));
        assert_eq!(unwrap_octet_string(&[0x04, 0x03, 1, 2]), None);
        let sig = ecdsa_signature(&[[0x80; 32], [0x01; 32]].concat());
        assert_eq!(sig[0], 0x30);
        assert_eq!(sig.len(), 2 + 35 + 34);
    }
}
