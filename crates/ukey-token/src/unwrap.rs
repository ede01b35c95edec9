//! Putting an escrowed private key on the token without it being in the clear on this
//! machine (C_UnwrapKey), and the decryption the renewal self-test needs.
//!
//! The envelope (see the portal protocol) is addressed to a transport key
//! ([`Session::generate_transport_key`]): an AES-256 key reaches the token either
//! RSA-OAEP(SHA-1, MGF1-SHA-1, empty label)-wrapped to it (the only OAEP SoftHSM 2.6.1
//! unwraps), or by ECDH (CKM_ECDH1_DERIVE, CKD_NULL: SoftHSM 2.6.1 has no other KDF)
//! with an ephemeral P-256 key; that AES key is a session object used only to
//! C_UnwrapKey(CKM_AES_KEY_WRAP_PAD) the PKCS#8 private key into a token object, then
//! destroyed.

use cryptoki::mechanism::elliptic_curve::{EcKdf, Ecdh1DeriveParams};
use cryptoki::mechanism::rsa::{PkcsMgfType, PkcsOaepParams, PkcsOaepSource};
use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};

use crate::error::{Error, Result};
use crate::keys::{KeyAlg, no_sm2_profile, vendor_mechanism};
use crate::session::Session;

/// How the envelope's AES-256 key reaches the token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyTransport<'a> {
    /// RSA-OAEP with SHA-1 / MGF1-SHA-1, empty label.
    RsaOaepSha1 {
        /// The wrapped 32-byte AES key.
        wrapped_key: &'a [u8],
    },
    /// ECDH on P-256 with an ephemeral public key, no KDF (CKD_NULL: the shared
    /// x-coordinate is the AES key).
    EcdhP256 {
        /// Uncompressed SEC1 point of the sender's ephemeral key.
        ephemeral_public_key: &'a [u8],
    },
}

fn oaep_sha1() -> Mechanism<'static> {
    Mechanism::RsaPkcsOaep(PkcsOaepParams::new(
        MechanismType::SHA1,
        PkcsMgfType::MGF1_SHA1,
        PkcsOaepSource::empty(),
    ))
}

impl Session<'_> {
    /// Unwraps an escrowed PKCS#8 private key of `alg` (wrapped with AES key wrap with
    /// padding, RFC 5649) onto the token under `id` and `label`, using `recipient` (a
    /// private key on the token) to recover the AES key. The new key is a sensitive,
    /// non-extractable token object that decrypts and unwraps (RSA) or derives (EC).
    pub fn unwrap_escrowed_key(
        &self,
        recipient: ObjectHandle,
        transport: &KeyTransport<'_>,
        wrapped_private_key: &[u8],
        alg: KeyAlg,
        id: &[u8],
        label: &str,
    ) -> Result<ObjectHandle> {
        if alg == KeyAlg::Sm2 {
            return Err(Error::ObjectInvalid {
                what: "an SM2 escrowed key comes in a GM/T 0009 envelope, not AES key wrap".into(),
            });
        }
        let aes_template = [
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::AES),
            Attribute::Token(false),
            Attribute::Unwrap(true),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
        ];
        let aes = match transport {
            KeyTransport::RsaOaepSha1 { wrapped_key } => self
                .cryptoki()
                .unwrap_key(&oaep_sha1(), recipient, wrapped_key, &aes_template)
                .map_err(|e| self.map_error(e))?,
            KeyTransport::EcdhP256 {
                ephemeral_public_key,
            } => {
                let params = Ecdh1DeriveParams::new(EcKdf::null(), ephemeral_public_key);
                let mut template = aes_template.to_vec();
                template.push(Attribute::ValueLen(32.into()));
                self.cryptoki()
                    .derive_key(&Mechanism::Ecdh1Derive(params), recipient, &template)
                    .map_err(|e| self.map_error(e))?
            }
        };
        let mut template = vec![
            Attribute::Class(ObjectClass::PRIVATE_KEY),
            Attribute::Token(true),
            Attribute::Private(true),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Id(id.to_vec()),
            Attribute::Label(label.as_bytes().to_vec()),
        ];
        match alg {
            KeyAlg::Rsa2048 => template.extend([
                Attribute::KeyType(KeyType::RSA),
                Attribute::Decrypt(true),
                Attribute::Unwrap(true),
                Attribute::Sign(false),
            ]),
            KeyAlg::EcP256 => template.extend([
                Attribute::KeyType(KeyType::EC),
                Attribute::Derive(true),
                Attribute::Sign(false),
            ]),
            KeyAlg::Sm2 => {} // refused above
        }
        let result = self
            .cryptoki()
            .unwrap_key(
                &Mechanism::AesKeyWrapPad,
                aes,
                wrapped_private_key,
                &template,
            )
            .map_err(|e| self.map_error(e));
        // The AES key is a session object; destroy it now rather than at session close.
        if let Err(e) = self.cryptoki().destroy_object(aes) {
            tracing::debug!("destroying the envelope's AES key: {e}");
        }
        let key = result?;
        tracing::debug!(
            alg = alg.as_str(),
            label,
            "escrowed key unwrapped onto the token"
        );
        Ok(key)
    }

    /// Opens a GM/T 0009 envelope on the token: the SM4 key `sym_encrypted_key` (an
    /// `SM2Cipher`) is unwrapped with the SM2 private key `recipient` (the new signing
    /// key, whose CKA_UNWRAP allows it; it never decrypts data), then the SM2 private key
    /// `encrypted_private_key` (SM4-ECB) with it, onto the token under `id` and `label`:
    /// sensitive, never extractable, decrypt only. The SM4 key is a session object,
    /// destroyed at once. Both mechanisms come from the token's profile.
    pub fn unwrap_sm2_envelope(
        &self,
        recipient: ObjectHandle,
        sym_encrypted_key: &[u8],
        encrypted_private_key: &[u8],
        id: &[u8],
        label: &str,
    ) -> Result<ObjectHandle> {
        let p = self
            .sm2_profile()
            .filter(|p| p.can_import_envelope())
            .ok_or_else(|| no_sm2_profile(self))?;
        let (Some(sm2_decrypt), Some(sm4_ecb), Some(ckk_sm4)) =
            (p.sm2_decrypt, p.sm4_ecb, p.ckk_sm4)
        else {
            return Err(no_sm2_profile(self));
        };
        let key_type = |v: u64| KeyType::new_vendor_defined(v).unwrap_or(KeyType::GENERIC_SECRET);
        let sm4 = self
            .cryptoki()
            .unwrap_key(
                &vendor_mechanism(sm2_decrypt)?,
                recipient,
                sym_encrypted_key,
                &[
                    Attribute::Class(ObjectClass::SECRET_KEY),
                    Attribute::KeyType(key_type(ckk_sm4)),
                    Attribute::Token(false),
                    Attribute::Unwrap(true),
                    Attribute::Sensitive(true),
                    Attribute::Extractable(false),
                ],
            )
            .map_err(|e| self.map_error(e))?;
        let result = self
            .cryptoki()
            .unwrap_key(
                &vendor_mechanism(sm4_ecb)?,
                sm4,
                encrypted_private_key,
                &[
                    Attribute::Class(ObjectClass::PRIVATE_KEY),
                    Attribute::KeyType(key_type(p.ckk_sm2)),
                    Attribute::EcParams(crate::gm::SM2_EC_PARAMS.to_vec()),
                    Attribute::Token(true),
                    Attribute::Private(true),
                    Attribute::Sensitive(true),
                    Attribute::Extractable(false),
                    Attribute::Id(id.to_vec()),
                    Attribute::Label(label.as_bytes().to_vec()),
                    Attribute::Decrypt(true),
                    Attribute::Sign(false),
                    Attribute::Unwrap(false),
                    Attribute::Derive(false),
                ],
            )
            .map_err(|e| self.map_error(e));
        if let Err(e) = self.cryptoki().destroy_object(sm4) {
            tracing::debug!("destroying the envelope's SM4 key: {e}");
        }
        let key = result?;
        tracing::debug!(label, "escrowed SM2 key unwrapped onto the token");
        Ok(key)
    }

    /// SM2 decryption (a GM/T 0009 `SM2Cipher`) with a private key on the token, through
    /// the token's profile.
    pub fn decrypt_sm2(&self, key: ObjectHandle, ciphertext: &[u8]) -> Result<Vec<u8>> {
        let m = self
            .sm2_profile()
            .and_then(|p| p.sm2_decrypt)
            .ok_or_else(|| no_sm2_profile(self))?;
        self.cryptoki()
            .decrypt(&vendor_mechanism(m)?, key, ciphertext)
            .map_err(|e| self.map_error(e))
    }

    /// RSA-OAEP (SHA-1) decryption with a private key on the token.
    pub fn decrypt_rsa_oaep(&self, key: ObjectHandle, ciphertext: &[u8]) -> Result<Vec<u8>> {
        self.cryptoki()
            .decrypt(&oaep_sha1(), key, ciphertext)
            .map_err(|e| self.map_error(e))
    }

    /// ECDH (CKD_NULL) of the private key `key` with `peer_point`: the 32-byte shared
    /// x-coordinate, derived into an extractable session secret and read back (used by
    /// the self-test, never for a secret that matters).
    pub fn ecdh_shared_secret(&self, key: ObjectHandle, peer_point: &[u8]) -> Result<Vec<u8>> {
        let params = Ecdh1DeriveParams::new(EcKdf::null(), peer_point);
        let secret = self
            .cryptoki()
            .derive_key(
                &Mechanism::Ecdh1Derive(params),
                key,
                &[
                    Attribute::Class(ObjectClass::SECRET_KEY),
                    Attribute::KeyType(KeyType::GENERIC_SECRET),
                    Attribute::ValueLen(32.into()),
                    Attribute::Token(false),
                    Attribute::Sensitive(false),
                    Attribute::Extractable(true),
                ],
            )
            .map_err(|e| self.map_error(e))?;
        let value = self.attributes(secret, &[AttributeType::Value]);
        if let Err(e) = self.cryptoki().destroy_object(secret) {
            tracing::debug!("destroying the self-test secret: {e}");
        }
        value?
            .into_iter()
            .find_map(|a| match a {
                Attribute::Value(v) => Some(v),
                _ => None,
            })
            .ok_or_else(|| Error::ObjectInvalid {
                what: "derived secret has no CKA_VALUE".to_owned(),
            })
    }
}
