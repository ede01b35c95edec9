//! Signing with a key on the token, and an rcgen adapter so that
//! `CertificateParams::serialize_request` signs a CSR on the token.
//!
//! RSA signs with CKM_SHA256_RSA_PKCS. SoftHSM2 (and many UKeys) have no
//! CKM_ECDSA_SHA256, so for EC the data is hashed here with SHA-256, signed with
//! CKM_ECDSA, and PKCS#11's raw `r || s` is DER-encoded as X.509 expects.

use cryptoki::mechanism::Mechanism;
use cryptoki::object::ObjectHandle;

use crate::der;
use crate::error::Result;
use crate::keys::{KeyAlg, PublicKey};
use crate::session::Session;

impl Session<'_> {
    /// Signs `data` with the private key `key` of algorithm `alg`: RSASSA-PKCS1-v1_5
    /// with SHA-256, or ECDSA P-256 with SHA-256 as a DER `ECDSA-Sig-Value`.
    pub fn sign_data(&self, alg: KeyAlg, key: ObjectHandle, data: &[u8]) -> Result<Vec<u8>> {
        match alg {
            KeyAlg::Rsa2048 => self.sign(&Mechanism::Sha256RsaPkcs, key, data),
            KeyAlg::EcP256 => {
                let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, data);
                let raw = self.sign(&Mechanism::Ecdsa, key, digest.as_ref())?;
                Ok(der::ecdsa_signature(&raw))
            }
        }
    }
}

/// A private key on the token with its public half: signs CSRs through rcgen.
pub struct TokenSigner<'s, 'm> {
    session: &'s Session<'m>,
    key: ObjectHandle,
    public: PublicKey,
    raw_public: Vec<u8>,
    /// The token error of the last failed signature: rcgen's error type carries no
    /// source, so [`TokenSigner::take_error`] gives it back typed.
    failure: std::cell::RefCell<Option<crate::error::Error>>,
}

impl std::fmt::Debug for TokenSigner<'_, '_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenSigner")
            .field("alg", &self.public.alg())
            .finish_non_exhaustive()
    }
}

impl<'s, 'm> TokenSigner<'s, 'm> {
    /// The private key `key` whose public key is `public`.
    pub fn new(session: &'s Session<'m>, key: ObjectHandle, public: PublicKey) -> Self {
        let raw_public = public.raw();
        TokenSigner {
            session,
            key,
            public,
            raw_public,
            failure: std::cell::RefCell::new(None),
        }
    }

    /// The public key.
    pub fn public_key(&self) -> &PublicKey {
        &self.public
    }

    /// The token error behind the last `rcgen::Error::RemoteKeyError` of this signer
    /// (a pulled key, CKR_DEVICE_ERROR, ...), taken out.
    pub fn take_error(&self) -> Option<crate::error::Error> {
        self.failure.borrow_mut().take()
    }

    /// Signs `data` on the token (see [`Session::sign_data`]).
    pub fn sign_data(&self, data: &[u8]) -> Result<Vec<u8>> {
        self.session.sign_data(self.public.alg(), self.key, data)
    }
}

impl rcgen::PublicKeyData for TokenSigner<'_, '_> {
    fn der_bytes(&self) -> &[u8] {
        &self.raw_public
    }

    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        match self.public.alg() {
            KeyAlg::Rsa2048 => &rcgen::PKCS_RSA_SHA256,
            KeyAlg::EcP256 => &rcgen::PKCS_ECDSA_P256_SHA256,
        }
    }
}

impl rcgen::SigningKey for TokenSigner<'_, '_> {
    fn sign(&self, msg: &[u8]) -> std::result::Result<Vec<u8>, rcgen::Error> {
        // rcgen's error type carries no source; the token error is kept for
        // `take_error` (and logged: never a PIN, signing takes none).
        self.sign_data(msg).map_err(|e| {
            tracing::warn!("signing on the token failed: {e}");
            *self.failure.borrow_mut() = Some(e);
            rcgen::Error::RemoteKeyError
        })
    }
}
