//! The token side of a renewal on an SKF key (GM/T 0016): [`SkfToken`], over one
//! device connection and application (`ukey_token::skf::SkfSession`).
//!
//! # Containers during a renewal
//!
//! SKF has no object ids to move: a key pair lives in a container for its life, a
//! container cannot be renamed, and an escrowed encryption pair can only be imported
//! into the container whose signing key its envelope is addressed to. So:
//! - the new signing pair is generated in a **new container**, named after the renewal
//!   ([`container_name`]: `ukey-renew-<renewal id>`), which the engine's pending ids of
//!   both roles map to, and which is also its final id;
//! - `write` imports the escrowed encryption pair into it (`SKF_ImportECCKeyPair`, the
//!   envelope addressed to the new signing key) and both certificates: from then on it
//!   is a complete, working container, self-tested before activation;
//! - activation retires the **old container**: deleted when it holds no encryption key,
//!   kept whole when it does (SKF cannot delete half a container, and the old
//!   decryption key must stay so that bids sealed to the old certificate open; its
//!   signing certificate, revoked, stays beside it);
//! - a rollback deletes the new container, which only this renewal's ids name.
//!
//! At every moment one complete container with a working certificate is on the key:
//! the old one until the new one is complete and tested, both during activation, the
//! new one after. Each change is one SKF call, which a card applies whole or not at
//! all; a resumed run finds the new container by its name and redoes what is missing.
//! The activation marker is a file in the application (`ukey-renew-act-<renewal id>`).

use secrecy::SecretString;
use ukey_skf::abi::{EnvelopedKeyBlob, Sar};
use ukey_skf::{Half, SkfError};
use ukey_token::skf::{ContainerInfo, SkfBackend, SkfSession};
use ukey_token::{KeyAlg, KeyTransport, ObjectInfo, ObjectKind, PublicKey, TokenSummary};

use crate::api::{Activation, KeyRef, TokenResult, TokenSide, TransportKey};
use crate::journal::PendingId;

/// The container a renewal's new key pairs live in.
pub fn container_name(renewal_id: &str) -> String {
    format!("{CONTAINER_PREFIX}{renewal_id}")
}

const CONTAINER_PREFIX: &str = "ukey-renew-";
const MARKER_PREFIX: &str = "ukey-renew-act-";

/// The SKF side of a renewal.
#[derive(Debug)]
pub struct SkfToken {
    s: SkfSession,
}

fn unsupported(what: &str) -> ukey_token::Error {
    ukey_token::Error::NotSupported {
        what: format!("{what} on an SKF key"),
    }
}

fn role(id: &PendingId) -> Half {
    if id.as_bytes().ends_with(b":enc") {
        Half::Encrypt
    } else {
        Half::Sign
    }
}

fn sm2_point(key: &KeyRef) -> TokenResult<&[u8]> {
    match &key.public {
        PublicKey::Sm2 { point } => Ok(point),
        _ => Err(unsupported("an RSA or P-256 key")),
    }
}

impl SkfToken {
    /// Opens the token's device and application.
    pub fn open(backend: &SkfBackend, token: &TokenSummary) -> TokenResult<SkfToken> {
        Ok(SkfToken {
            s: backend.open(token)?,
        })
    }

    /// The container an id names: a pending id's renewal container, else the id's
    /// bytes as the container's name.
    fn container_of(id: &[u8]) -> String {
        match PendingId::parse(id) {
            Some(p) => container_name(p.renewal_id()),
            None => String::from_utf8_lossy(id).into_owned(),
        }
    }

    /// The container, `None` when there is none of that name.
    fn find(&self, name: &str) -> TokenResult<Option<ContainerInfo>> {
        let names = self
            .s
            .application()
            .containers()
            .map_err(|e| self.s.err(e))?;
        if !names.iter().any(|n| n == name) {
            return Ok(None);
        }
        self.s.container(name).map(Some)
    }

    /// Which half of the container holds `point`.
    fn half_of(c: &ContainerInfo, point: &[u8]) -> Option<Half> {
        [Half::Sign, Half::Encrypt]
            .into_iter()
            .find(|h| c.key(*h) == Some(point))
    }

    fn delete(&self, name: &str) -> TokenResult<usize> {
        match self.s.application().delete_container(name) {
            Ok(()) => Ok(1),
            Err(e) if e.sar() == Some(Sar::FILE_NOT_EXIST) => Ok(0),
            Err(e) => Err(self.s.err(e)),
        }
    }
}

impl TokenSide for SkfToken {
    fn activation(&self) -> Activation {
        Activation::Containers
    }

    fn login(&self, pin: &SecretString) -> TokenResult<()> {
        self.s.login(pin)
    }

    /// The renewal containers, as the pending objects the engine looks for.
    fn objects(&self) -> TokenResult<Vec<ObjectInfo>> {
        let mut out = Vec::new();
        for c in self.s.containers()? {
            let Some(rid) = c.name.strip_prefix(CONTAINER_PREFIX) else {
                continue;
            };
            for (half, role) in [(Half::Sign, "sig"), (Half::Encrypt, "enc")] {
                let id = hex::encode(PendingId::new(rid, role).as_bytes());
                let mut add = |kind| {
                    out.push(ObjectInfo {
                        kind,
                        id_hex: id.clone(),
                        label: c.name.clone(),
                        value_hex: String::new(),
                        flags: String::new(),
                    })
                };
                if c.key(half).is_some() {
                    add(ObjectKind::PrivateKey);
                }
                if c.cert(half).is_some() {
                    add(ObjectKind::Certificate);
                }
            }
        }
        Ok(out)
    }

    fn pending_count(&self, kind: ObjectKind, id: &PendingId) -> TokenResult<usize> {
        let Some(c) = self.find(&Self::container_of(id.as_bytes()))? else {
            return Ok(0);
        };
        let half = role(id);
        Ok(usize::from(match kind {
            ObjectKind::PrivateKey => c.key(half).is_some(),
            ObjectKind::PublicKey => half == Half::Sign && c.key(half).is_some(),
            ObjectKind::Certificate => c.cert(half).is_some(),
            _ => false,
        }))
    }

    fn pending_public_key(&self, id: &PendingId) -> TokenResult<Option<PublicKey>> {
        Ok(self
            .find(&Self::container_of(id.as_bytes()))?
            .and_then(|c| c.key(role(id)).map(|p| p.to_vec()))
            .map(|point| PublicKey::Sm2 { point }))
    }

    fn generate_key_pair(&self, alg: KeyAlg, id: &PendingId, _label: &str) -> TokenResult<()> {
        if alg != KeyAlg::Sm2 {
            return Err(unsupported("an RSA or P-256 key pair"));
        }
        let name = Self::container_of(id.as_bytes());
        let app = self.s.application();
        let c = match self.find(&name)? {
            Some(_) => app.open_container(&name),
            None => app.create_container(&name),
        }
        .map_err(|e| self.s.err(e))?;
        c.generate_sm2().map(drop).map_err(|e| self.s.err(e))
    }

    /// A pending key goes with its container (SKF deletes keys no other way); a
    /// pending certificate goes with it too, so on its own it is left (0).
    fn destroy_pending(&self, kind: ObjectKind, id: &PendingId) -> TokenResult<usize> {
        if !matches!(kind, ObjectKind::PrivateKey | ObjectKind::PublicKey) {
            return Ok(0);
        }
        self.delete(&Self::container_of(id.as_bytes()))
    }

    fn relabel_pending(
        &self,
        _: ObjectKind,
        _: &PendingId,
        _: &[u8],
        _: &str,
    ) -> TokenResult<usize> {
        Err(unsupported("moving objects between containers"))
    }

    fn has_private_key(&self, key: &KeyRef) -> TokenResult<bool> {
        let Ok(point) = sm2_point(key) else {
            return Ok(false);
        };
        Ok(self
            .find(&Self::container_of(&key.id))?
            .is_some_and(|c| Self::half_of(&c, point).is_some()))
    }

    fn destroy_key_pair(&self, _: &KeyRef) -> TokenResult<usize> {
        Err(unsupported("deleting one key pair of a container"))
    }

    fn relabel_key_pair(&self, _: &KeyRef, _: &[u8], _: &str) -> TokenResult<usize> {
        Err(unsupported("moving a key pair between containers"))
    }

    fn unmodifiable(&self, _: &[&KeyRef], _: &[&[u8]]) -> TokenResult<Vec<String>> {
        Ok(Vec::new())
    }

    /// Signs with a container's signing key (SKF signs with no other).
    fn sign(&self, key: &KeyRef, data: &[u8]) -> TokenResult<Vec<u8>> {
        let point = sm2_point(key)?;
        let name = Self::container_of(&key.id);
        let c = self
            .find(&name)?
            .ok_or_else(|| ukey_token::Error::ObjectInvalid {
                what: format!("no container {name:?} on the key"),
            })?;
        if c.key(Half::Sign) != Some(point) {
            return Err(ukey_token::Error::ObjectInvalid {
                what: format!("container {name:?} holds no signing key for this certificate"),
            });
        }
        self.s.sign_sm2(&name, point, data)
    }

    fn csr(&self, key: &KeyRef, params: &rcgen::CertificateParams) -> TokenResult<Vec<u8>> {
        let point = sm2_point(key)?.to_vec();
        ukey_token::signer::sm2_csr(&point, params, |info| self.sign(key, info))
    }

    fn unwrap_escrowed_key(
        &self,
        _: &TransportKey,
        _: &KeyTransport<'_>,
        _: &[u8],
        _: KeyAlg,
        _: &PendingId,
        _: &str,
    ) -> TokenResult<()> {
        Err(unsupported("an RSA or P-256 escrowed key"))
    }

    /// `SKF_ImportECCKeyPair` into the recipient's container: the envelope is
    /// addressed to that container's signing key.
    fn unwrap_sm2_envelope(
        &self,
        recipient: &KeyRef,
        envelope: &ukey_portal_api::gm::Sm2EnvelopedKey,
        _id: &PendingId,
        _label: &str,
    ) -> TokenResult<()> {
        let point = sm2_point(recipient)?;
        let name = Self::container_of(&recipient.id);
        match self.find(&name)? {
            Some(c) if c.key(Half::Sign) == Some(point) => {}
            _ => {
                return Err(ukey_token::Error::ObjectInvalid {
                    what: format!("container {name:?} holds no signing key the envelope is for"),
                });
            }
        }
        let blob = EnvelopedKeyBlob::from_gm_t_0009(envelope).map_err(|e| {
            ukey_token::Error::ObjectInvalid {
                what: format!("the SM2 envelope as an ENVELOPEDKEYBLOB: {e}"),
            }
        })?;
        let c = self
            .s
            .application()
            .open_container(&name)
            .map_err(|e| self.s.err(e))?;
        c.import_enveloped_key(&blob).map_err(|e| self.s.err(e))
    }

    /// SKF decrypts with an encryption key only by importing a session key (see
    /// `SkfSession::sm2_decrypts`).
    fn sm2_decrypts(&self, key: &KeyRef) -> TokenResult<bool> {
        let point = sm2_point(key)?;
        self.s.sm2_decrypts(&Self::container_of(&key.id), point)
    }

    fn generate_transport_key(&self, _: KeyAlg) -> TokenResult<TransportKey> {
        Err(unsupported("a transport key"))
    }

    fn destroy_transport_key(&self, _: TransportKey) -> TokenResult<()> {
        Ok(())
    }

    fn decrypt_rsa_oaep(&self, _: &KeyRef, _: &[u8]) -> TokenResult<Vec<u8>> {
        Err(unsupported("RSA decryption"))
    }

    fn ecdh(&self, _: &KeyRef, _: &[u8]) -> TokenResult<Vec<u8>> {
        Err(unsupported("ECDH"))
    }

    fn has_certificate(&self, der: &[u8], id: Option<&[u8]>) -> TokenResult<bool> {
        let holds = |c: &ContainerInfo| {
            c.sign_cert.as_deref() == Some(der) || c.enc_cert.as_deref() == Some(der)
        };
        match id {
            Some(id) => Ok(self
                .find(&Self::container_of(id))?
                .is_some_and(|c| holds(&c))),
            None => Ok(self.s.containers()?.iter().any(holds)),
        }
    }

    /// Imports the certificate into the container `id` names, in the half whose key
    /// it carries.
    fn write_certificate(&self, der: &[u8], id: &[u8], _label: &str) -> TokenResult<()> {
        let name = Self::container_of(id);
        let public = PublicKey::from_certificate(der)?;
        let PublicKey::Sm2 { point } = &public else {
            return Err(unsupported("an RSA or P-256 certificate"));
        };
        let c = self
            .find(&name)?
            .ok_or_else(|| ukey_token::Error::ObjectInvalid {
                what: format!("no container {name:?} on the key"),
            })?;
        let half = Self::half_of(&c, point).ok_or_else(|| ukey_token::Error::ObjectInvalid {
            what: format!("container {name:?} holds no key for this certificate"),
        })?;
        let c = self
            .s
            .application()
            .open_container(&name)
            .map_err(|e| self.s.err(e))?;
        c.import_certificate(half, der).map_err(|e| self.s.err(e))
    }

    fn relabel_certificate(&self, _: &[u8], _: &[u8], _: &str) -> TokenResult<usize> {
        Err(unsupported("moving a certificate between containers"))
    }

    fn destroy_certificate(&self, _: &[u8], _: Option<&[u8]>) -> TokenResult<usize> {
        Err(unsupported("deleting one certificate of a container"))
    }

    fn mark_activation(&self, renewal_id: &str) -> TokenResult<()> {
        let name = format!("{MARKER_PREFIX}{renewal_id}");
        match self
            .s
            .application()
            .write_new_file(&name, renewal_id.as_bytes())
        {
            Ok(()) => Ok(()),
            Err(e) if e.sar() == Some(Sar::FILE_ALREADY_EXIST) => Ok(()),
            Err(e) => Err(self.s.err(e)),
        }
    }

    fn unmark_activation(&self, renewal_id: &str) -> TokenResult<()> {
        let name = format!("{MARKER_PREFIX}{renewal_id}");
        match self.s.application().delete_file(&name) {
            Ok(()) => Ok(()),
            Err(e) if e.sar() == Some(Sar::FILE_NOT_EXIST) => Ok(()),
            Err(e) => Err(self.s.err(e)),
        }
    }

    fn activations(&self) -> TokenResult<Vec<String>> {
        let files = match self.s.application().files() {
            Ok(f) => f,
            // A library without files has no markers.
            Err(SkfError::Missing(_)) => return Ok(Vec::new()),
            Err(e) => return Err(self.s.err(e)),
        };
        Ok(files
            .into_iter()
            .filter_map(|f| f.strip_prefix(MARKER_PREFIX).map(str::to_owned))
            .collect())
    }

    /// Deletes the old key's container when it holds no encryption key; a container
    /// that is not the old key's (or is gone) is left alone.
    fn retire_old(&self, old: &KeyRef) -> TokenResult<usize> {
        let point = sm2_point(old)?;
        let name = Self::container_of(&old.id);
        let Some(c) = self.find(&name)? else {
            return Ok(0);
        };
        if c.key(Half::Sign) != Some(point) {
            return Ok(0);
        }
        if c.key(Half::Encrypt).is_some() {
            tracing::info!(container = %name, "old container kept: it holds the old encryption key");
            return Ok(0);
        }
        self.delete(&name)
    }
}
