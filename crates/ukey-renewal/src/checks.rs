//! Checks of what the portal issued, before anything is written to the token, and the
//! software half of the self-test.
//!
//! **Invariant:** the engine never trusts the portal. A certificate is written only if
//! it parses completely, chains to a configured trust anchor, names the same subject as
//! the old certificate, certifies exactly the public key on the token, is valid now
//! (within the allowed clock skew), ends later than the old one, and has the key usage
//! its role needs.

use time::{Duration, OffsetDateTime};
use ukey_token::PublicKey;
use ukey_token::certificate::format_name;
use x509_parser::prelude::{FromDer, X509Certificate};
use x509_parser::public_key::PublicKey as X509Key;

use crate::error::Refusal;

/// The role of a certificate being checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Signing: digitalSignature or nonRepudiation, not a CA.
    Signing,
    /// Encryption: keyEncipherment/dataEncipherment (RSA) or keyAgreement (EC).
    Encryption,
}

/// What the issued certificate must match.
#[derive(Debug, Clone)]
pub struct Expectations<'a> {
    /// The old certificate (DER).
    pub old_der: &'a [u8],
    /// The public key on the token (`None` for an escrowed key: checked by the self-test).
    pub public_key: Option<&'a PublicKey>,
    /// Trust anchors (DER).
    pub anchors: &'a [Vec<u8>],
    /// Intermediates the portal sent (DER).
    pub chain: &'a [Vec<u8>],
    /// Now.
    pub now: OffsetDateTime,
    /// Allowed clock skew.
    pub skew: Duration,
    /// Role.
    pub role: Role,
}

fn parse(der: &[u8]) -> Result<X509Certificate<'_>, Refusal> {
    let (rest, cert) =
        X509Certificate::from_der(der).map_err(|e| Refusal::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(Refusal::Malformed(format!(
            "{} bytes after the certificate",
            rest.len()
        )));
    }
    Ok(cert)
}

/// Whether two public keys are the same key.
pub fn same_key(cert_key: &X509Certificate<'_>, token_key: &PublicKey) -> bool {
    match (cert_key.public_key().parsed(), token_key) {
        (Ok(X509Key::RSA(rsa)), PublicKey::Rsa { modulus, exponent }) => {
            strip(rsa.modulus) == strip(modulus) && strip(rsa.exponent) == strip(exponent)
        }
        // An EC key is its curve and point: the whole SubjectPublicKeyInfo (named curve,
        // uncompressed point) must be the token key's, so a P-256 and an SM2 key with
        // the same coordinates differ.
        (Ok(X509Key::EC(_)), PublicKey::EcP256 { .. } | PublicKey::Sm2 { .. }) => {
            cert_key.public_key().raw == token_key.spki().as_slice()
        }
        _ => false,
    }
}

fn strip(v: &[u8]) -> &[u8] {
    let i = v.iter().position(|b| *b != 0).unwrap_or(v.len());
    &v[i..]
}

/// Checks an issued certificate; `Ok` carries its not-after.
pub fn check_issued(der: &[u8], x: &Expectations<'_>) -> Result<OffsetDateTime, Refusal> {
    let cert = parse(der)?;
    let old = parse(x.old_der).map_err(|e| Refusal::Malformed(format!("old certificate: {e}")))?;
    // Trust first: nothing else an untrusted issuer says means anything. A portal whose
    // clock is ahead issues certificates that start a little in our future: validate at
    // their start when it is within the accepted skew.
    let not_before = cert.validity().not_before.to_datetime();
    let at = if not_before > x.now && not_before <= x.now + x.skew {
        not_before
    } else {
        x.now
    };
    ukey_trust::verify(der, x.chain, x.anchors, at).map_err(|e| match e {
        ukey_trust::ChainError::LeafIsCa => Refusal::KeyUsage("it is a CA certificate".to_owned()),
        ukey_trust::ChainError::LeafNotValid(why) => Refusal::NotValidNow(why),
        ukey_trust::ChainError::Malformed(why) => Refusal::Malformed(why),
        other => Refusal::Untrusted(other.to_string()),
    })?;

    // Same subject: the same attribute types with the same values in the same order
    // (never compared as formatted text).
    if !ukey_trust::same_name(cert.subject(), old.subject()) {
        return Err(Refusal::Subject {
            got: format_name(cert.subject()),
            want: format_name(old.subject()),
        });
    }
    if let Some(pk) = x.public_key {
        if !same_key(&cert, pk) {
            return Err(Refusal::PublicKey);
        }
    }
    let not_after = cert.validity().not_after.to_datetime();
    if not_before > x.now + x.skew {
        return Err(Refusal::NotValidNow(format!("starts {not_before}")));
    }
    if not_after <= x.now {
        return Err(Refusal::NotValidNow(format!("expired {not_after}")));
    }
    if x.role == Role::Signing && not_after <= old.validity().not_after.to_datetime() {
        return Err(Refusal::NotLater);
    }
    check_usage(&cert, x.role)?;
    Ok(not_after)
}

fn check_usage(cert: &X509Certificate<'_>, role: Role) -> Result<(), Refusal> {
    if let Ok(Some(bc)) = cert.basic_constraints() {
        if bc.value.ca {
            return Err(Refusal::KeyUsage("it is a CA certificate".to_owned()));
        }
    }
    let ku = match cert.key_usage() {
        Ok(Some(ku)) => ku.value,
        Ok(None) => return Err(Refusal::KeyUsage("no keyUsage extension".to_owned())),
        Err(e) => return Err(Refusal::Malformed(e.to_string())),
    };
    let ok = match role {
        Role::Signing => ku.digital_signature() || ku.non_repudiation(),
        Role::Encryption => ku.key_encipherment() || ku.data_encipherment() || ku.key_agreement(),
    };
    if ok {
        Ok(())
    } else {
        Err(Refusal::KeyUsage(format!("{ku} does not allow {role:?}")))
    }
}

/// Verifies `signature` over `data` with the certificate's public key (self-test).
pub fn verify_with_certificate(
    cert_der: &[u8],
    data: &[u8],
    signature: &[u8],
) -> Result<(), String> {
    let public = PublicKey::from_certificate(cert_der).map_err(|e| e.to_string())?;
    if verify_with_public(&public, data, signature) {
        Ok(())
    } else {
        Err("the signature made on the token does not verify with the new certificate".to_owned())
    }
}

/// Whether `signature` over `data` verifies with `public` (RSASSA-PKCS1-v1_5 SHA-256,
/// ECDSA P-256 SHA-256 in DER, or SM2 with SM3 and the GM ID in DER): proves which
/// token key holds a public key.
pub fn verify_with_public(public: &PublicKey, data: &[u8], signature: &[u8]) -> bool {
    use aws_lc_rs::signature::{
        ECDSA_P256_SHA256_ASN1, RSA_PKCS1_2048_8192_SHA256, UnparsedPublicKey,
    };
    let raw = public.raw();
    match public {
        PublicKey::Rsa { .. } => UnparsedPublicKey::new(&RSA_PKCS1_2048_8192_SHA256, &raw)
            .verify(data, signature)
            .is_ok(),
        PublicKey::EcP256 { .. } => UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, &raw)
            .verify(data, signature)
            .is_ok(),
        PublicKey::Sm2 { point } => {
            ukey_trust::gm::verify(ukey_trust::gm::GM_DISTID, point, data, signature)
        }
    }
}

/// An ephemeral P-256 point and the secret ECDH with it must give for the key whose
/// public point is `point`.
pub fn ecdh_test(point: &[u8]) -> Result<(Vec<u8>, Vec<u8>), String> {
    use aws_lc_rs::agreement::{
        ECDH_P256, EphemeralPrivateKey, UnparsedPublicKey, agree_ephemeral,
    };
    let rng = aws_lc_rs::rand::SystemRandom::new();
    let eph = EphemeralPrivateKey::generate(&ECDH_P256, &rng).map_err(|e| e.to_string())?;
    let peer_point = eph
        .compute_public_key()
        .map_err(|e| e.to_string())?
        .as_ref()
        .to_vec();
    let shared = agree_ephemeral(
        eph,
        UnparsedPublicKey::new(&ECDH_P256, point),
        "ECDH failed",
        |z| Ok(z.to_vec()),
    )
    .map_err(|e: &str| e.to_owned())?;
    Ok((peer_point, shared))
}

/// A test value encrypted to an encryption certificate's key, and what the token must
/// give back: RSA-OAEP(SHA-1) of random bytes, or for EC an ephemeral ECDH point and
/// the expected shared secret.
#[derive(Debug)]
pub enum DecryptTest {
    /// RSA: decrypt `ciphertext`, expect `plaintext`.
    Rsa {
        /// Ciphertext.
        ciphertext: Vec<u8>,
        /// Expected.
        plaintext: Vec<u8>,
    },
    /// EC: derive with `peer_point`, expect `shared`.
    Ec {
        /// Ephemeral public point.
        peer_point: Vec<u8>,
        /// Expected shared secret.
        shared: Vec<u8>,
    },
    /// SM2: decrypt `ciphertext` (an `SM2Cipher`), expect `plaintext`.
    Sm2 {
        /// Ciphertext.
        ciphertext: Vec<u8>,
        /// Expected.
        plaintext: Vec<u8>,
    },
}

/// A random 32-byte message SM2-encrypted to `point`: what the key of `point` must
/// decrypt.
pub fn sm2_decrypt_test(point: &[u8]) -> Result<(Vec<u8>, Vec<u8>), String> {
    use aws_lc_rs::rand::{SecureRandom, SystemRandom};
    let mut plaintext = vec![0u8; 32];
    SystemRandom::new()
        .fill(&mut plaintext)
        .map_err(|e| e.to_string())?;
    let ciphertext = ukey_trust::gm::encrypt(point, &plaintext)
        .ok_or("SM2 encryption to the certificate's key failed")?;
    Ok((ciphertext, plaintext))
}

/// Makes a [`DecryptTest`] for the encryption certificate.
pub fn decrypt_test(cert_der: &[u8]) -> Result<DecryptTest, String> {
    use aws_lc_rs::rand::{SecureRandom, SystemRandom};
    if let Ok(PublicKey::Sm2 { point }) = PublicKey::from_certificate(cert_der) {
        let (ciphertext, plaintext) = sm2_decrypt_test(&point)?;
        return Ok(DecryptTest::Sm2 {
            ciphertext,
            plaintext,
        });
    }
    let cert = parse(cert_der).map_err(|e| e.to_string())?;
    let rng = SystemRandom::new();
    match cert.public_key().parsed() {
        Ok(X509Key::RSA(_)) => {
            use aws_lc_rs::rsa::{
                OAEP_SHA1_MGF1SHA1, OaepPublicEncryptingKey, PublicEncryptingKey,
            };
            let public = OaepPublicEncryptingKey::new(
                PublicEncryptingKey::from_der(cert.public_key().raw).map_err(|e| e.to_string())?,
            )
            .map_err(|e| e.to_string())?;
            let mut plaintext = vec![0u8; 32];
            rng.fill(&mut plaintext).map_err(|e| e.to_string())?;
            let mut out = vec![0u8; public.ciphertext_size()];
            let ciphertext = public
                .encrypt(&OAEP_SHA1_MGF1SHA1, &plaintext, &mut out, None)
                .map_err(|e| e.to_string())?
                .to_vec();
            Ok(DecryptTest::Rsa {
                ciphertext,
                plaintext,
            })
        }
        Ok(X509Key::EC(point)) => {
            let (peer_point, shared) = ecdh_test(point.data())?;
            Ok(DecryptTest::Ec { peer_point, shared })
        }
        _ => Err("unsupported encryption key type".to_owned()),
    }
}

/// The subject of `der` as an rcgen name, copying each attribute's string type so the
/// CSR's subject is byte-for-byte the old certificate's.
pub fn subject_of(der: &[u8]) -> Result<rcgen::DistinguishedName, String> {
    use rcgen::{DistinguishedName, DnType, DnValue};
    use x509_parser::asn1_rs::Tag;
    let cert = parse(der).map_err(|e| e.to_string())?;
    let mut dn = DistinguishedName::new();
    for rdn in cert.subject().iter() {
        let mut attrs = rdn.iter();
        let (Some(attr), None) = (attrs.next(), attrs.next()) else {
            return Err("multi-valued RDN in the subject".to_owned());
        };
        let oid: Vec<u64> = attr
            .attr_type()
            .iter()
            .ok_or("attribute OID too large")?
            .collect();
        let data = attr.attr_value().data;
        let text = || {
            std::str::from_utf8(data)
                .map(str::to_owned)
                .map_err(|e| e.to_string())
        };
        let value = match attr.attr_value().tag() {
            Tag::Utf8String => DnValue::Utf8String(text()?),
            Tag::PrintableString => DnValue::PrintableString(
                text()?
                    .as_str()
                    .try_into()
                    .map_err(|e: rcgen::Error| e.to_string())?,
            ),
            Tag::Ia5String => DnValue::Ia5String(
                text()?
                    .as_str()
                    .try_into()
                    .map_err(|e: rcgen::Error| e.to_string())?,
            ),
            Tag::T61String => DnValue::TeletexString(
                text()?
                    .as_str()
                    .try_into()
                    .map_err(|e: rcgen::Error| e.to_string())?,
            ),
            Tag::BmpString => DnValue::BmpString(
                rcgen::string::BmpString::from_utf16be(data.to_vec()).map_err(|e| e.to_string())?,
            ),
            Tag::UniversalString => DnValue::UniversalString(
                rcgen::string::UniversalString::from_utf32be(data.to_vec())
                    .map_err(|e| e.to_string())?,
            ),
            t => return Err(format!("attribute string type {t}")),
        };
        dn.push(DnType::from_oid(&oid), value);
    }
    Ok(dn)
}
