//! The key-escrow envelope: the portal, acting as key-management centre, generates an
//! encryption key pair and seals its PKCS#8 private key so that only the transport key
//! the token made for this renewal can open it (see [`ukey_portal_api::KeyEnvelope`]
//! for the format).

use aws_lc_rs::agreement::{self, ECDH_P256, PrivateKey, UnparsedPublicKey};
use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::key_wrap::{AES_256, AesKek, KeyWrapPadded};
use aws_lc_rs::rsa::{KeySize, OAEP_SHA1_MGF1SHA1, OaepPublicEncryptingKey, PublicEncryptingKey};
use aws_lc_rs::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair, KeyPair as _};
use ukey_portal_api::{
    CONTENT_WRAP_AES256_KWP, KeyAlgorithm, KeyEnvelope, KeyTransport, PRIVATE_KEY_FORMAT_PKCS8,
};
use x509_parser::prelude::FromDer;
use x509_parser::x509::SubjectPublicKeyInfo;
use zeroize::Zeroizing;

use crate::crypto::{KeyKind, random_bytes, sha256};

/// Failure to generate or seal a key.
#[derive(Debug, thiserror::Error)]
pub enum EnvelopeError {
    /// The recipient key is not RSA (≥2048) or EC P-256.
    #[error("cannot seal an envelope for a {0} key")]
    UnsupportedRecipient(String),
    /// A cryptographic primitive failed.
    #[error("cryptographic failure: {0}")]
    Crypto(&'static str),
}

/// A freshly generated escrowed encryption key pair.
#[derive(Debug)]
pub struct EscrowKey {
    /// PKCS#8 PrivateKeyInfo DER (kept in the portal's store: it is the escrow copy).
    pub pkcs8: Vec<u8>,
    /// SubjectPublicKeyInfo DER, certified in the encryption certificate.
    pub spki: Vec<u8>,
}

/// Generates an encryption key pair of `alg`.
pub fn generate_escrow_key(alg: KeyAlgorithm) -> Result<EscrowKey, EnvelopeError> {
    match alg {
        KeyAlgorithm::Rsa2048 => {
            let kp = aws_lc_rs::rsa::KeyPair::generate(KeySize::Rsa2048)
                .map_err(|_| EnvelopeError::Crypto("RSA key generation"))?;
            let pkcs8 = kp
                .as_der()
                .map_err(|_| EnvelopeError::Crypto("PKCS#8 encoding"))?;
            let spki = kp
                .public_key()
                .as_der()
                .map_err(|_| EnvelopeError::Crypto("SPKI encoding"))?;
            Ok(EscrowKey {
                pkcs8: pkcs8.as_ref().to_vec(),
                spki: spki.as_ref().to_vec(),
            })
        }
        KeyAlgorithm::EcP256 => {
            let kp = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_ASN1_SIGNING)
                .map_err(|_| EnvelopeError::Crypto("EC key generation"))?;
            let pkcs8 = kp
                .to_pkcs8v1()
                .map_err(|_| EnvelopeError::Crypto("PKCS#8 encoding"))?;
            let spki = kp
                .public_key()
                .as_der()
                .map_err(|_| EnvelopeError::Crypto("SPKI encoding"))?;
            Ok(EscrowKey {
                pkcs8: pkcs8.as_ref().to_vec(),
                spki: spki.as_ref().to_vec(),
            })
        }
        KeyAlgorithm::Sm2 => {
            use sm2::pkcs8::{EncodePrivateKey as _, EncodePublicKey as _};
            let secret = (0..8)
                .find_map(|_| {
                    let d = Zeroizing::new(random_bytes(32).ok()?);
                    sm2::SecretKey::from_slice(&d).ok()
                })
                .ok_or(EnvelopeError::Crypto("SM2 key generation"))?;
            let pkcs8 = secret
                .to_pkcs8_der()
                .map_err(|_| EnvelopeError::Crypto("PKCS#8 encoding"))?;
            let spki = secret
                .public_key()
                .to_public_key_der()
                .map_err(|_| EnvelopeError::Crypto("SPKI encoding"))?;
            Ok(EscrowKey {
                pkcs8: pkcs8.as_bytes().to_vec(),
                spki: spki.as_bytes().to_vec(),
            })
        }
    }
}

/// The GM/T 0009 `SM2EnvelopedKey` of the SM2 key `pkcs8`, its SM4 key encrypted to the
/// SM2 key in `recipient_spki` (the new signing key, as GM/T 0092 answers a CSR).
pub fn seal_gm(recipient_spki: &[u8], pkcs8: &[u8]) -> Result<Vec<u8>, EnvelopeError> {
    use sm2::elliptic_curve::sec1::ToSec1Point as _;
    use sm2::pkcs8::DecodePrivateKey as _;
    use sm4::cipher::{Array, BlockCipherEncrypt as _, KeyInit as _};
    let (_, spki) = SubjectPublicKeyInfo::from_der(recipient_spki)
        .map_err(|_| EnvelopeError::UnsupportedRecipient("unparsable".into()))?;
    if KeyKind::of(&spki) != KeyKind::Sm2 {
        return Err(EnvelopeError::UnsupportedRecipient(
            KeyKind::of(&spki).describe(),
        ));
    }
    let recipient = sm2::pke::EncryptingKey::from_sec1_bytes(&spki.subject_public_key.data)
        .map_err(|_| EnvelopeError::UnsupportedRecipient("SM2 (not a curve point)".into()))?;
    let secret = sm2::SecretKey::from_pkcs8_der(pkcs8)
        .map_err(|_| EnvelopeError::Crypto("the escrowed SM2 key"))?;
    let d = Zeroizing::new(secret.to_bytes());
    let sm4_key = Zeroizing::new(random_bytes(16).map_err(|_| EnvelopeError::Crypto("random"))?);
    let sym_encrypted_key = recipient
        .encrypt_der(&mut getrandom::SysRng, &sm4_key)
        .map_err(|_| EnvelopeError::Crypto("SM2 encryption"))?;
    let cipher =
        sm4::Sm4::new_from_slice(&sm4_key).map_err(|_| EnvelopeError::Crypto("SM4 key"))?;
    // The 64-byte form of GM/T 0016's ENVELOPEDKEYBLOB (the 256-bit key right-aligned),
    // which an SKF key's SKF_ImportECCKeyPair takes as it is.
    let mut padded = Zeroizing::new([0u8; 64]);
    padded[32..].copy_from_slice(&d[..]);
    let mut encrypted_private_key = Vec::with_capacity(64);
    for chunk in padded.chunks(16) {
        let mut block = Array::try_from(chunk).map_err(|_| EnvelopeError::Crypto("SM4 block"))?;
        cipher.encrypt_block(&mut block);
        encrypted_private_key.extend_from_slice(&block);
    }
    ukey_portal_api::gm::Sm2EnvelopedKey {
        sym_alg: ukey_portal_api::gm::SM4_ECB,
        sym_encrypted_key,
        public_key: secret.public_key().to_sec1_point(false).as_bytes().to_vec(),
        encrypted_private_key,
    }
    .to_der()
    .map_err(|_| EnvelopeError::Crypto("SM2EnvelopedKey encoding"))
}

/// Seals `pkcs8` (of `key_alg`) for the key in `recipient_spki` (DER).
pub fn seal(
    recipient_spki: &[u8],
    pkcs8: &[u8],
    key_alg: KeyAlgorithm,
) -> Result<KeyEnvelope, EnvelopeError> {
    let (_, spki) = SubjectPublicKeyInfo::from_der(recipient_spki)
        .map_err(|_| EnvelopeError::UnsupportedRecipient("unparsable".into()))?;
    let (cek, key_transport) = match KeyKind::of(&spki) {
        KeyKind::Rsa { bits } if bits >= 2048 => {
            let cek =
                Zeroizing::new(random_bytes(32).map_err(|_| EnvelopeError::Crypto("random"))?);
            let public = PublicEncryptingKey::from_der(recipient_spki)
                .map_err(|_| EnvelopeError::UnsupportedRecipient("RSA (rejected)".into()))?;
            let oaep = OaepPublicEncryptingKey::new(public)
                .map_err(|_| EnvelopeError::Crypto("RSA-OAEP key"))?;
            let mut out = vec![0u8; oaep.ciphertext_size()];
            let wrapped = oaep
                .encrypt(&OAEP_SHA1_MGF1SHA1, &cek, &mut out, None)
                .map_err(|_| EnvelopeError::Crypto("RSA-OAEP encryption"))?
                .to_vec();
            (
                cek,
                KeyTransport::RsaOaepSha1 {
                    wrapped_key: wrapped,
                },
            )
        }
        KeyKind::EcP256 => {
            let ephemeral =
                PrivateKey::generate(&ECDH_P256).map_err(|_| EnvelopeError::Crypto("ECDH key"))?;
            let ephemeral_public = ephemeral
                .compute_public_key()
                .map_err(|_| EnvelopeError::Crypto("ECDH public key"))?
                .as_ref()
                .to_vec();
            let peer = UnparsedPublicKey::new(&ECDH_P256, spki.subject_public_key.as_ref());
            // CKD_NULL: the shared x-coordinate is the AES-256 key.
            let cek = agreement::agree(&ephemeral, peer, EnvelopeError::Crypto("ECDH"), |z| {
                Ok(Zeroizing::new(z.to_vec()))
            })?;
            (
                cek,
                KeyTransport::EcdhP256 {
                    ephemeral_public_key: ephemeral_public,
                },
            )
        }
        other => return Err(EnvelopeError::UnsupportedRecipient(other.describe())),
    };
    let kek = AesKek::new(&AES_256, &cek).map_err(|_| EnvelopeError::Crypto("AES key"))?;
    let mut out = vec![0u8; pkcs8.len() + 16];
    let wrapped = kek
        .wrap_with_padding(pkcs8, &mut out)
        .map_err(|_| EnvelopeError::Crypto("AES key wrap"))?
        .to_vec();
    Ok(KeyEnvelope {
        version: 1,
        recipient_spki_sha256: sha256(recipient_spki),
        key_transport,
        content_wrap: CONTENT_WRAP_AES256_KWP.to_owned(),
        private_key_algorithm: key_alg,
        private_key_format: PRIVATE_KEY_FORMAT_PKCS8.to_owned(),
        wrapped_private_key: wrapped,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_lc_rs::rsa::{OaepPrivateDecryptingKey, PrivateDecryptingKey};

    fn unwrap_kwp(cek: &[u8], wrapped: &[u8]) -> Vec<u8> {
        let kek = AesKek::new(&AES_256, cek).unwrap();
        let mut out = vec![0u8; wrapped.len()];
        kek.unwrap_with_padding(wrapped, &mut out).unwrap().to_vec()
    }

    #[test]
    fn rsa_envelope_opens_with_the_recipient_key() {
        let recipient = aws_lc_rs::rsa::KeyPair::generate(KeySize::Rsa2048).unwrap();
        let spki = recipient.public_key().as_der().unwrap();
        let escrow = generate_escrow_key(KeyAlgorithm::EcP256).unwrap();
        let env = seal(spki.as_ref(), &escrow.pkcs8, KeyAlgorithm::EcP256).unwrap();
        let KeyTransport::RsaOaepSha1 { wrapped_key } = &env.key_transport else {
            panic!()
        };
        let pkcs8 = recipient.as_der().unwrap();
        let dec = OaepPrivateDecryptingKey::new(
            PrivateDecryptingKey::from_pkcs8(pkcs8.as_ref()).unwrap(),
        )
        .unwrap();
        let mut buf = vec![0u8; dec.min_output_size()];
        let cek = dec
            .decrypt(&OAEP_SHA1_MGF1SHA1, wrapped_key, &mut buf, None)
            .unwrap()
            .to_vec();
        assert_eq!(unwrap_kwp(&cek, &env.wrapped_private_key), escrow.pkcs8);
        assert_eq!(env.recipient_spki_sha256, sha256(spki.as_ref()));
    }

    #[test]
    fn ec_envelope_opens_with_the_recipient_key() {
        let recipient = PrivateKey::generate(&ECDH_P256).unwrap();
        let point = recipient.compute_public_key().unwrap().as_ref().to_vec();
        let spki = ec_spki(&point);
        let escrow = generate_escrow_key(KeyAlgorithm::EcP256).unwrap();
        let env = seal(&spki, &escrow.pkcs8, KeyAlgorithm::EcP256).unwrap();
        let KeyTransport::EcdhP256 {
            ephemeral_public_key,
        } = &env.key_transport
        else {
            panic!()
        };
        let cek = agreement::agree(
            &recipient,
            UnparsedPublicKey::new(&ECDH_P256, ephemeral_public_key),
            (),
            |z| Ok(z.to_vec()),
        )
        .unwrap();
        assert_eq!(unwrap_kwp(&cek, &env.wrapped_private_key), escrow.pkcs8);
    }

    fn ec_spki(point: &[u8]) -> Vec<u8> {
        ukey_token::PublicKey::EcP256 {
            point: point.to_vec(),
        }
        .spki()
    }

    #[test]
    fn rejects_unsupported_recipients() {
        assert!(matches!(
            seal(b"garbage", b"k", KeyAlgorithm::EcP256),
            Err(EnvelopeError::UnsupportedRecipient(_))
        ));
    }
}
