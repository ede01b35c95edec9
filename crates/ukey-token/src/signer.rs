//! Signing with a key on the token, and an rcgen adapter so that
//! `CertificateParams::serialize_request` signs a CSR on the token.
//!
//! RSA signs with CKM_SHA256_RSA_PKCS. SoftHSM2 (and many UKeys) have no
//! CKM_ECDSA_SHA256, so for EC the data is hashed here with SHA-256, signed with
//! CKM_ECDSA, and PKCS#11's raw `r || s` is DER-encoded as X.509 expects.
//!
//! SM2 signs through the module's mechanism profile ([`crate::gm`]) with the GM ID: the
//! host computes e = SM3(Z ‖ M) when the module signs prehashed digests, else the module
//! does. rcgen cannot sign SM2, so an SM2 CSR is rcgen's request info (subject,
//! extensions) with the SM2 key put in, signed here ([`TokenSigner::csr`]).

use cryptoki::mechanism::Mechanism;
use cryptoki::object::ObjectHandle;

use crate::der;
use crate::error::{Error, Result};
use crate::gm::SignatureFormat;
use crate::keys::{KeyAlg, PublicKey, no_sm2_profile, vendor_mechanism};
use crate::session::Session;

impl Session<'_> {
    /// Signs `data` with the private key `key` whose public key is `public`:
    /// RSASSA-PKCS1-v1_5 with SHA-256, ECDSA P-256 with SHA-256, or SM2 with SM3 and the
    /// GM ID; EC signatures as DER `SEQUENCE { r, s }`.
    pub fn sign_data(&self, public: &PublicKey, key: ObjectHandle, data: &[u8]) -> Result<Vec<u8>> {
        match public {
            PublicKey::Rsa { .. } => self.sign(&Mechanism::Sha256RsaPkcs, key, data),
            PublicKey::EcP256 { .. } => {
                let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, data);
                let raw = self.sign(&Mechanism::Ecdsa, key, digest.as_ref())?;
                Ok(der::ecdsa_signature(&raw))
            }
            PublicKey::Sm2 { point } => self.sign_sm2(point, key, data),
        }
    }

    fn sign_sm2(&self, point: &[u8], key: ObjectHandle, data: &[u8]) -> Result<Vec<u8>> {
        let p = self.sm2_profile().ok_or_else(|| no_sm2_profile(self))?;
        let out = match (p.sign_prehashed, p.sign_with_sm3) {
            (Some(m), _) => {
                let e = ukey_trust::gm::message_digest(ukey_trust::gm::GM_DISTID, point, data)
                    .ok_or_else(|| Error::ObjectInvalid {
                        what: "SM2 public key is not an uncompressed point".into(),
                    })?;
                self.sign(&vendor_mechanism(m)?, key, &e)?
            }
            (None, Some(m)) => self.sign(&vendor_mechanism(m)?, key, data)?,
            (None, None) => return Err(no_sm2_profile(self)),
        };
        match p.signature {
            SignatureFormat::Raw if out.len() == 64 => Ok(der::ecdsa_signature(&out)),
            SignatureFormat::Der => Ok(out),
            SignatureFormat::Raw => Err(Error::ObjectInvalid {
                what: format!(
                    "the module returned a {}-byte SM2 signature, not r ‖ s (64 bytes): is its profile's signature format right?",
                    out.len()
                ),
            }),
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
        self.session.sign_data(&self.public, self.key, data)
    }

    /// A PKCS#10 CSR with `params`, signed on the token: by rcgen for RSA and P-256;
    /// for SM2, rcgen's request info with the SM2 key put in, signed with SM2-with-SM3
    /// and the GM ID.
    pub fn csr(&self, params: &rcgen::CertificateParams) -> Result<Vec<u8>> {
        let failed = |e: String| Error::ObjectInvalid {
            what: format!("CSR signing on the token failed: {e}"),
        };
        let PublicKey::Sm2 { point } = &self.public else {
            return match params.serialize_request(self) {
                Ok(csr) => Ok(csr.der().to_vec()),
                Err(e) => Err(self.take_error().unwrap_or_else(|| failed(e.to_string()))),
            };
        };
        sm2_csr(point, params, |info| self.sign_data(info))
    }
}

/// An SM2 PKCS#10 CSR with `params` for the key at `point`: rcgen writes the request
/// info (rcgen has no SM2, so under a placeholder), the SM2 key is put in, and `sign`
/// (a key on a token: PKCS#11 or SKF) signs the info with SM2-with-SM3 and the GM ID,
/// giving a DER signature.
pub fn sm2_csr(
    point: &[u8],
    params: &rcgen::CertificateParams,
    sign: impl FnOnce(&[u8]) -> Result<Vec<u8>>,
) -> Result<Vec<u8>> {
    let failed = |e: String| Error::ObjectInvalid {
        what: format!("CSR signing on the token failed: {e}"),
    };
    let placeholder = Sm2Placeholder {
        point: point.to_vec(),
    };
    let draft = params
        .serialize_request(&placeholder)
        .map_err(|e| failed(e.to_string()))?;
    let spki = PublicKey::Sm2 {
        point: point.to_vec(),
    }
    .spki();
    let info = der::csr_info_with_key(draft.der(), &spki).map_err(|e| failed(e.to_string()))?;
    let signature = sign(&info)?;
    der::sm2_csr(&info, &signature).map_err(|e| failed(e.to_string()))
}

/// What rcgen writes an SM2 request's info with: the point under a P-256 label, no
/// signature. [`TokenSigner::csr`] replaces the key and signs; nothing of it is kept.
struct Sm2Placeholder {
    point: Vec<u8>,
}

impl rcgen::PublicKeyData for Sm2Placeholder {
    fn der_bytes(&self) -> &[u8] {
        &self.point
    }

    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        &rcgen::PKCS_ECDSA_P256_SHA256
    }
}

impl rcgen::SigningKey for Sm2Placeholder {
    fn sign(&self, _msg: &[u8]) -> std::result::Result<Vec<u8>, rcgen::Error> {
        Ok(Vec::new())
    }
}

impl rcgen::PublicKeyData for TokenSigner<'_, '_> {
    fn der_bytes(&self) -> &[u8] {
        &self.raw_public
    }

    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        match self.public.alg() {
            KeyAlg::Rsa2048 => &rcgen::PKCS_RSA_SHA256,
            // rcgen has no SM2: an SM2 signer refuses to sign for rcgen (below), and
            // its CSRs go through `TokenSigner::csr`.
            KeyAlg::EcP256 | KeyAlg::Sm2 => &rcgen::PKCS_ECDSA_P256_SHA256,
        }
    }
}

impl rcgen::SigningKey for TokenSigner<'_, '_> {
    fn sign(&self, msg: &[u8]) -> std::result::Result<Vec<u8>, rcgen::Error> {
        if self.public.alg() == KeyAlg::Sm2 {
            // rcgen would label an SM2 signature ECDSA.
            return Err(rcgen::Error::RemoteKeyError);
        }
        // rcgen's error type carries no source; the token error is kept for
        // `take_error` (and logged: never a PIN, signing takes none).
        self.sign_data(msg).map_err(|e| {
            tracing::warn!("signing on the token failed: {e}");
            *self.failure.borrow_mut() = Some(e);
            rcgen::Error::RemoteKeyError
        })
    }
}
