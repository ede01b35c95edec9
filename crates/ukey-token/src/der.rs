//! The DER this crate builds or reads by itself (public keys, ECDSA signatures, the
//! serial attribute of a certificate object), through RustCrypto's `der` and `spki`
//! crates rather than by hand.

use der::asn1::{AnyRef, BitStringRef, ObjectIdentifier, OctetStringRef, UintRef};
use der::{Decode, Encode, Sequence};
use spki::{AlgorithmIdentifier, SubjectPublicKeyInfo};

/// rsaEncryption.
pub(crate) const RSA_ENCRYPTION: ObjectIdentifier =
    ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.1");
/// id-ecPublicKey.
pub(crate) const EC_PUBLIC_KEY: ObjectIdentifier =
    ObjectIdentifier::new_unwrap("1.2.840.10045.2.1");
/// The SM2 curve (1.2.156.10197.1.301).
pub(crate) const SM2_CURVE: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.156.10197.1.301");
/// SM2-with-SM3 (1.2.156.10197.1.501).
pub(crate) const SM2_WITH_SM3: ObjectIdentifier =
    ObjectIdentifier::new_unwrap("1.2.156.10197.1.501");
/// prime256v1 (NIST P-256).
pub(crate) const PRIME256V1: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.3.1.7");

/// PKCS#1 `RSAPublicKey`.
#[derive(Sequence)]
struct RsaPublicKey<'a> {
    modulus: UintRef<'a>,
    public_exponent: UintRef<'a>,
}

/// `ECDSA-Sig-Value ::= SEQUENCE { r INTEGER, s INTEGER }`.
#[derive(Sequence)]
struct EcdsaSigValue<'a> {
    r: UintRef<'a>,
    s: UintRef<'a>,
}

/// Encodes a value whose size is bounded by a key or a signature: `der` fails only
/// beyond 256 MiB or for an unsigned integer longer than that.
fn encode(value: &impl Encode) -> Vec<u8> {
    value
        .to_der()
        .expect("DER of a key-sized value always encodes")
}

fn uint(magnitude: &[u8]) -> UintRef<'_> {
    UintRef::new(magnitude).expect("a key-sized unsigned integer always encodes")
}

/// A non-negative INTEGER from big-endian magnitude bytes (leading zeros dropped, a
/// zero byte added where the high bit is set).
pub(crate) fn unsigned_integer(magnitude: &[u8]) -> Vec<u8> {
    encode(&uint(magnitude))
}

/// PKCS#1 `RSAPublicKey` DER.
pub(crate) fn rsa_public_key(modulus: &[u8], exponent: &[u8]) -> Vec<u8> {
    encode(&RsaPublicKey {
        modulus: uint(modulus),
        public_exponent: uint(exponent),
    })
}

/// SubjectPublicKeyInfo: an RSA key (`raw` is its PKCS#1 DER, parameters NULL), or a
/// P-256 or SM2 key (`raw` is the SEC1 point; id-ecPublicKey with the named curve).
pub(crate) fn spki(alg: crate::KeyAlg, raw: &[u8]) -> Vec<u8> {
    let (oid, parameters) = match alg {
        crate::KeyAlg::Rsa2048 => (RSA_ENCRYPTION, AnyRef::NULL.to_der()),
        crate::KeyAlg::EcP256 => (EC_PUBLIC_KEY, PRIME256V1.to_der()),
        crate::KeyAlg::Sm2 => (EC_PUBLIC_KEY, SM2_CURVE.to_der()),
    };
    let parameters = parameters.expect("an OID or NULL always encodes");
    let info = SubjectPublicKeyInfo {
        algorithm: AlgorithmIdentifier {
            oid,
            parameters: AnyRef::from_der(&parameters).ok(),
        },
        subject_public_key: BitStringRef::from_bytes(raw)
            .expect("a key-sized bit string always encodes"),
    };
    encode(&info)
}

/// The content of a DER OCTET STRING, if `der` is exactly one.
pub(crate) fn unwrap_octet_string(der: &[u8]) -> Option<Vec<u8>> {
    OctetStringRef::from_der(der)
        .ok()
        .map(|o| o.as_bytes().to_vec())
}

/// `ECDSA-Sig-Value` DER from PKCS#11's raw `r || s`.
pub fn ecdsa_signature(raw: &[u8]) -> Vec<u8> {
    let (r, s) = raw.split_at(raw.len() / 2);
    encode(&EcdsaSigValue {
        r: uint(r),
        s: uint(s),
    })
}

/// A PKCS#10 `CertificationRequest`, its parts left encoded.
#[derive(Sequence)]
struct CertificationRequest<'a> {
    info: AnyRef<'a>,
    signature_algorithm: AnyRef<'a>,
    signature: BitStringRef<'a>,
}

/// `CertificationRequestInfo`, its parts left encoded (the attributes are `[0]`).
#[derive(Sequence)]
struct CertificationRequestInfo<'a> {
    version: AnyRef<'a>,
    subject: AnyRef<'a>,
    subject_pk_info: AnyRef<'a>,
    attributes: AnyRef<'a>,
}

/// The `CertificationRequestInfo` of `csr` with its SubjectPublicKeyInfo replaced by
/// `spki`: the to-be-signed part of a CSR for another key with the same subject and
/// attributes.
pub(crate) fn csr_info_with_key(csr: &[u8], spki: &[u8]) -> Result<Vec<u8>, der::Error> {
    let outer = CertificationRequest::from_der(csr)?;
    let info_der = outer.info.to_der()?;
    let info = CertificationRequestInfo::from_der(&info_der)?;
    CertificationRequestInfo {
        subject_pk_info: AnyRef::from_der(spki)?,
        ..info
    }
    .to_der()
}

/// A `CertificationRequest` from its signed info, signed with SM2-with-SM3 (`signature`
/// is the DER `SEQUENCE { r, s }`; the algorithm without parameters, as GM/T 0015 and
/// OpenSSL write it).
pub(crate) fn sm2_csr(info: &[u8], signature: &[u8]) -> Result<Vec<u8>, der::Error> {
    let algorithm = AlgorithmIdentifier::<AnyRef<'_>> {
        oid: SM2_WITH_SM3,
        parameters: None,
    }
    .to_der()?;
    CertificationRequest {
        info: AnyRef::from_der(info)?,
        signature_algorithm: AnyRef::from_der(&algorithm)?,
        signature: BitStringRef::from_bytes(signature)?,
    }
    .to_der()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodings() {
        assert_eq!(
            unsigned_integer(&[0x00, 0x80]),
            vec![0x02, 0x02, 0x00, 0x80]
        );
        assert_eq!(
            unsigned_integer(&[0x01, 0x00, 0x01]),
            vec![0x02, 3, 1, 0, 1]
        );
        assert_eq!(unwrap_octet_string(&[0x04, 0x02, 1, 2]), Some(vec![1, 2]));
        assert_eq!(unwrap_octet_string(&[0x04, 0x03, 1, 2]), None);
        assert_eq!(
            unwrap_octet_string(&[0x04, 0x01, 1, 2]),
            None,
            "trailing bytes"
        );
        let sig = ecdsa_signature(&[[0x80; 32], [0x01; 32]].concat());
        assert_eq!(sig[0], 0x30);
        assert_eq!(sig.len(), 2 + 35 + 34);
        assert_eq!(encode(&PRIME256V1), crate::keys::P256_EC_PARAMS);
    }

    #[test]
    fn a_p256_spki_is_what_openssl_and_aws_lc_write() {
        // aws-lc-rs writes the SPKI of a fresh key; ours from its point must be equal.
        let key = aws_lc_rs::signature::EcdsaKeyPair::generate(
            &aws_lc_rs::signature::ECDSA_P256_SHA256_ASN1_SIGNING,
        )
        .unwrap();
        use aws_lc_rs::encoding::AsDer as _;
        use aws_lc_rs::signature::KeyPair as _;
        let theirs = key.public_key().as_der().unwrap();
        let point = key.public_key().as_ref();
        assert_eq!(spki(crate::KeyAlg::EcP256, point), theirs.as_ref());
    }

    #[test]
    fn an_rsa_spki_is_what_aws_lc_writes() {
        use aws_lc_rs::encoding::AsDer as _;
        use aws_lc_rs::signature::KeyPair as _;
        let key = aws_lc_rs::rsa::KeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048).unwrap();
        let public = key.public_key();
        let theirs = public.as_der().unwrap();
        let modulus = public.modulus().big_endian_without_leading_zero();
        let exponent = public.exponent().big_endian_without_leading_zero();
        assert_eq!(
            spki(crate::KeyAlg::Rsa2048, &rsa_public_key(modulus, exponent)),
            theirs.as_ref()
        );
    }
}
