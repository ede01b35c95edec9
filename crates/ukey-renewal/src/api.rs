//! The two things the engine talks to: the token ([`SessionToken`], over a `ukey-token`
//! session) and the portal ([`PortalApi`], a trait so that tests can make a network or
//! a portal fail; its real implementation is `ukey-portal-client`'s
//! [`PortalClient`]).
//!
//! # Which objects are ours
//!
//! Objects are named by what they are, never by handle (handles do not survive a new
//! session or process, and a resumed renewal must find its objects again) and never by
//! CKA_ID alone (container-style UKeys give a signing pair and an encryption pair one
//! CKA_ID):
//! - a **certificate** by its value (DER);
//! - a **key** by [`KeyRef`]: class, CKA_ID *and* key material equal to the public key
//!   it must carry (RSA: CKA_MODULUS and exponent; EC: CKA_EC_POINT where the object
//!   shows it). An EC private key shows no point, so it is proven by an operation: a
//!   signature that verifies with the public key (when CKA_SIGN allows), else an ECDH
//!   agreement that gives the expected secret (when CKA_DERIVE allows). A key nothing
//!   proves is not ours: never used, moved or deleted;
//! - objects the engine created for a pending renewal by their [`PendingId`]
//!   (`ukey-renew:<renewal id>:<role>`), which nothing else on a token carries.

use secrecy::SecretString;
use ukey_portal_api::{
    ChallengeResponse, InstalledRequest, InstalledResponse, IssueRequest, IssueResponse,
    RenewalStatus, StatusRequest,
};
use ukey_portal_client::{Answer, ClientError, PortalClient};
use ukey_token::cryptoki::object::{Attribute, ObjectHandle};
use ukey_token::{
    KeyAlg, KeyMatch, KeyObject, KeyTransport, Module, ObjectInfo, ObjectKind, PublicKey, Session,
    TokenSigner, TokenSummary,
};

use crate::journal::PendingId;

/// The key the escrowed encryption key's envelope is addressed to: a session object
/// generated for one renewal run (it never outlives the session, so a crash or a pulled
/// key leaves nothing behind, and a resumed run makes a new one), which can only
/// receive a key. Named by handle: it exists only in this session.
#[derive(Debug)]
pub struct TransportKey {
    handle: ObjectHandle,
    /// Its public key, sent in the issue request.
    pub public: PublicKey,
}

/// Token result.
pub type TokenResult<T> = Result<T, ukey_token::Error>;

/// The portal protocol, synchronously.
pub trait PortalApi {
    /// `status`.
    fn status(&self, req: &StatusRequest) -> Result<Answer<RenewalStatus>, ClientError>;
    /// `challenge`.
    fn challenge(&self, order_id: &str) -> Result<Answer<ChallengeResponse>, ClientError>;
    /// `issue`.
    fn issue(
        &self,
        order_id: &str,
        req: &IssueRequest,
    ) -> Result<Answer<IssueResponse>, ClientError>;
    /// `installed`.
    fn installed(
        &self,
        order_id: &str,
        req: &InstalledRequest,
    ) -> Result<Answer<InstalledResponse>, ClientError>;
    /// One CMP exchange (RFC 6712) with the CA's CMP endpoint.
    fn cmp(&self, message: &[u8]) -> Result<Answer<Vec<u8>>, ClientError>;
}

impl PortalApi for PortalClient {
    fn status(&self, req: &StatusRequest) -> Result<Answer<RenewalStatus>, ClientError> {
        PortalClient::status(self, req)
    }
    fn challenge(&self, order_id: &str) -> Result<Answer<ChallengeResponse>, ClientError> {
        PortalClient::challenge(self, order_id)
    }
    fn issue(
        &self,
        order_id: &str,
        req: &IssueRequest,
    ) -> Result<Answer<IssueResponse>, ClientError> {
        PortalClient::issue(self, order_id, req)
    }
    fn installed(
        &self,
        order_id: &str,
        req: &InstalledRequest,
    ) -> Result<Answer<InstalledResponse>, ClientError> {
        PortalClient::installed(self, order_id, req)
    }
    /// The client's base URL is the CMP endpoint's.
    fn cmp(&self, message: &[u8]) -> Result<Answer<Vec<u8>>, ClientError> {
        PortalClient::cmp(self, "", message)
    }
}

/// A key pair the engine uses or changes: its CKA_ID and the public key its objects
/// must hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRef {
    /// CKA_ID.
    pub id: Vec<u8>,
    /// The public key (from its certificate, or read back after generation).
    pub public: PublicKey,
}

impl KeyRef {
    /// The key of a certificate, under `id`.
    pub fn of_certificate(id: &[u8], cert_der: &[u8]) -> TokenResult<KeyRef> {
        Ok(KeyRef {
            id: id.to_vec(),
            public: PublicKey::from_certificate(cert_der)?,
        })
    }
}

/// What a private key is used for here; a token that says the key may not do it
/// (CKA_SIGN / CKA_DECRYPT / CKA_UNWRAP / CKA_DERIVE false) is not asked to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyUse {
    /// Signing (challenge, CSR, installed, self-test).
    Sign,
    /// Decryption / key agreement with an encryption key (self-test).
    Decrypt,
}

/// Application of the CKO_DATA markers the engine leaves on a token.
pub const MARKER_APPLICATION: &str = "ukey-renew";
/// Label prefix of the marker that says a renewal's activation has begun.
pub const ACTIVATION_MARKER_PREFIX: &str = "ukey-renew activating ";

/// The token side of a renewal: one read-write session with one token.
#[derive(Debug)]
pub struct SessionToken<'m> {
    session: Session<'m>,
    /// Private key objects (by handle) an operation has proven to hold a public key:
    /// a key whose attributes show no material (EC and SM2 private keys) is proven once
    /// per session, not at every lookup (each proof is a signature: 270 ms on a USB
    /// key's chip). Forgotten when the object is destroyed through this session.
    proven: std::cell::RefCell<Vec<(ObjectHandle, PublicKey)>>,
}

impl<'m> SessionToken<'m> {
    /// Opens a read-write session with `token` (one per renewal: several renewals run
    /// at once on several sessions of one module).
    pub fn open(module: &'m Module, token: &TokenSummary) -> TokenResult<SessionToken<'m>> {
        Ok(SessionToken {
            session: module.open_rw_session(token)?,
            proven: std::cell::RefCell::new(Vec::new()),
        })
    }

    /// C_Login. Never retried by the engine.
    pub fn login(&self, pin: &SecretString) -> TokenResult<()> {
        self.session.login(pin)
    }

    /// Every object visible.
    pub fn objects(&self) -> TokenResult<Vec<ObjectInfo>> {
        self.session.snapshot()
    }

    // --- Objects of a pending renewal, found by their pending id. ---

    /// How many objects of `kind` carry the pending id.
    pub fn pending_count(&self, kind: ObjectKind, id: &PendingId) -> TokenResult<usize> {
        Ok(self.session.find_kind_by_id(kind, id.as_bytes())?.len())
    }

    /// The public key of the pending key pair, from its public key object.
    pub fn pending_public_key(&self, id: &PendingId) -> TokenResult<Option<PublicKey>> {
        self.session.public_key_by_id(id.as_bytes())
    }

    /// Generates the pending key pair. Its private key needs no proof in this session:
    /// the module made the pair, and its public key is read from the pair's own object.
    pub fn generate_key_pair(&self, alg: KeyAlg, id: &PendingId, label: &str) -> TokenResult<()> {
        let pair = self.session.generate_key_pair(alg, id.as_bytes(), label)?;
        if let Ok(public) = self.session.public_key(pair.public) {
            self.proven.borrow_mut().push((pair.private, public));
        }
        Ok(())
    }

    /// Destroys every object of `kind` with the pending id; returns how many.
    pub fn destroy_pending(&self, kind: ObjectKind, id: &PendingId) -> TokenResult<usize> {
        let handles = self.session.find_kind_by_id(kind, id.as_bytes())?;
        for h in &handles {
            self.destroy(*h)?;
        }
        Ok(handles.len())
    }

    /// Moves every object of `kind` with the pending id to `to` / `label`.
    pub fn relabel_pending(
        &self,
        kind: ObjectKind,
        id: &PendingId,
        to: &[u8],
        label: &str,
    ) -> TokenResult<usize> {
        let handles = self.session.find_kind_by_id(kind, id.as_bytes())?;
        for h in &handles {
            self.session.set_id_and_label(*h, to, label)?;
        }
        Ok(handles.len())
    }

    // --- Keys, by identity. ---

    /// Destroys an object, forgetting any proof about it.
    fn destroy(&self, handle: ObjectHandle) -> TokenResult<()> {
        self.proven.borrow_mut().retain(|(h, _)| *h != handle);
        self.session.destroy(handle)
    }

    /// Whether the private key object `obj` is proven to be `key`'s.
    fn proven(&self, obj: &KeyObject, key: &KeyRef) -> TokenResult<bool> {
        match key.public.compare(obj) {
            KeyMatch::Same => return Ok(true),
            KeyMatch::Different => return Ok(false),
            KeyMatch::Unknown => {}
        }
        let known = self
            .proven
            .borrow()
            .iter()
            .any(|(h, p)| *h == obj.handle && *p == key.public);
        if known {
            return Ok(true);
        }
        let proven = self.prove(obj, key)?;
        if proven {
            self.proven
                .borrow_mut()
                .push((obj.handle, key.public.clone()));
        }
        Ok(proven)
    }

    /// Proves by an operation whether `obj` holds `key`: a signature it makes verifies,
    /// or it decrypts (SM2) or agrees (ECDH) as the public key says.
    fn prove(&self, obj: &KeyObject, key: &KeyRef) -> TokenResult<bool> {
        let rng = aws_lc_rs::rand::SystemRandom::new();
        if obj.sign != Some(false) {
            let mut data = vec![0u8; 32];
            aws_lc_rs::rand::SecureRandom::fill(&rng, &mut data).map_err(|_| {
                ukey_token::Error::ObjectInvalid {
                    what: "no random numbers for a key proof".into(),
                }
            })?;
            match self.session.sign_data(&key.public, obj.handle, &data) {
                Ok(sig) => return Ok(crate::checks::verify_with_public(&key.public, &data, &sig)),
                Err(e) if is_token_gone(&e) => return Err(e),
                // Not allowed to sign, or another key type: try agreement.
                Err(_) => {}
            }
        }
        if obj.decrypt != Some(false) {
            if let PublicKey::Sm2 { point } = &key.public {
                if let Ok((ciphertext, plaintext)) = crate::checks::sm2_decrypt_test(point) {
                    match self.session.decrypt_sm2(obj.handle, &ciphertext) {
                        Ok(got) => return Ok(got == plaintext),
                        Err(e) if is_token_gone(&e) => return Err(e),
                        Err(_) => {}
                    }
                }
            }
        }
        if obj.derive != Some(false) {
            if let PublicKey::EcP256 { point } = &key.public {
                if let Ok((peer, shared)) = crate::checks::ecdh_test(point) {
                    match self.session.ecdh_shared_secret(obj.handle, &peer) {
                        Ok(got) => return Ok(got == shared),
                        Err(e) if is_token_gone(&e) => return Err(e),
                        Err(_) => {}
                    }
                }
            }
        }
        Ok(false)
    }

    /// Every private key object of `key` (class, CKA_ID and key material).
    pub fn private_keys(&self, key: &KeyRef) -> TokenResult<Vec<KeyObject>> {
        let mut out = Vec::new();
        for obj in self.session.key_objects(
            ukey_token::cryptoki::object::ObjectClass::PRIVATE_KEY,
            &key.id,
        )? {
            if self.proven(&obj, key)? {
                out.push(obj);
            }
        }
        Ok(out)
    }

    /// Every public key object of `key` (class, CKA_ID and key material).
    pub fn public_keys(&self, key: &KeyRef) -> TokenResult<Vec<KeyObject>> {
        Ok(self
            .session
            .key_objects(
                ukey_token::cryptoki::object::ObjectClass::PUBLIC_KEY,
                &key.id,
            )?
            .into_iter()
            .filter(|o| key.public.compare(o) == KeyMatch::Same)
            .collect())
    }

    /// The private key of `key` for `usage`.
    pub fn private_key(&self, key: &KeyRef, usage: KeyUse) -> TokenResult<ObjectHandle> {
        let allowed = |o: &KeyObject| match usage {
            KeyUse::Sign => o.sign != Some(false),
            KeyUse::Decrypt => match key.public {
                PublicKey::Rsa { .. } | PublicKey::Sm2 { .. } => o.decrypt != Some(false),
                PublicKey::EcP256 { .. } => o.derive != Some(false),
            },
        };
        let keys = self.private_keys(key)?;
        keys.iter()
            .find(|o| allowed(o))
            .map(|o| o.handle)
            .ok_or_else(|| ukey_token::Error::ObjectInvalid {
                what: if keys.is_empty() {
                    format!(
                        "no private key with CKA_ID {} holds the certificate's key",
                        hex::encode(&key.id)
                    )
                } else {
                    format!(
                        "the private key with CKA_ID {} may not be used for {usage:?}",
                        hex::encode(&key.id)
                    )
                },
            })
    }

    /// Whether the private key of `key` is on the token.
    pub fn has_private_key(&self, key: &KeyRef) -> TokenResult<bool> {
        Ok(!self.private_keys(key)?.is_empty())
    }

    /// Destroys the private and public key objects of `key` (nothing else with its
    /// CKA_ID); returns how many.
    pub fn destroy_key_pair(&self, key: &KeyRef) -> TokenResult<usize> {
        let objects: Vec<KeyObject> = self
            .private_keys(key)?
            .into_iter()
            .chain(self.public_keys(key)?)
            .collect();
        for o in &objects {
            self.destroy(o.handle)?;
        }
        Ok(objects.len())
    }

    /// Sets CKA_ID and CKA_LABEL of the private and public key objects of `key`.
    pub fn relabel_key_pair(&self, key: &KeyRef, to: &[u8], label: &str) -> TokenResult<usize> {
        let objects: Vec<KeyObject> = self
            .private_keys(key)?
            .into_iter()
            .chain(self.public_keys(key)?)
            .collect();
        for o in &objects {
            self.session.set_id_and_label(o.handle, to, label)?;
        }
        Ok(objects.len())
    }

    /// The objects whose CKA_ID or label an activation changes that the token says
    /// cannot be changed (CKA_MODIFIABLE false), described.
    pub fn unmodifiable(&self, keys: &[&KeyRef], certs: &[&[u8]]) -> TokenResult<Vec<String>> {
        let mut out = Vec::new();
        for key in keys {
            for o in self
                .private_keys(key)?
                .into_iter()
                .chain(self.public_keys(key)?)
            {
                if o.modifiable == Some(false) {
                    out.push(format!(
                        "key \"{}\" (CKA_ID {})",
                        o.label,
                        hex::encode(&key.id)
                    ));
                }
            }
        }
        for der in certs {
            for h in self.session.find_certificate_by_value(der)? {
                if self.session.modifiable(h)? == Some(false) {
                    out.push(format!("certificate {}", serial_hex(der)));
                }
            }
        }
        Ok(out)
    }

    /// Signs with the private key of `key`.
    pub fn sign(&self, key: &KeyRef, data: &[u8]) -> TokenResult<Vec<u8>> {
        let h = self.private_key(key, KeyUse::Sign)?;
        self.session.sign_data(&key.public, h, data)
    }

    /// A PKCS#10 CSR with `params`, signed by the private key of `key`. A token error
    /// while signing (a pulled key, CKR_DEVICE_ERROR) comes back as itself.
    pub fn csr(&self, key: &KeyRef, params: &rcgen::CertificateParams) -> TokenResult<Vec<u8>> {
        let h = self.private_key(key, KeyUse::Sign)?;
        TokenSigner::new(&self.session, h, key.public.clone()).csr(params)
    }

    /// Unwraps an escrowed key with the private key of `recipient`.
    pub fn unwrap_escrowed_key(
        &self,
        recipient: &TransportKey,
        transport: &KeyTransport<'_>,
        wrapped_private_key: &[u8],
        alg: KeyAlg,
        id: &PendingId,
        label: &str,
    ) -> TokenResult<()> {
        self.session
            .unwrap_escrowed_key(
                recipient.handle,
                transport,
                wrapped_private_key,
                alg,
                id.as_bytes(),
                label,
            )
            .map(|_| ())
    }

    /// Opens a GM/T 0009 envelope on the token with the private key of `recipient` (the
    /// new SM2 signing key), leaving the escrowed key under `id` and `label`.
    pub fn unwrap_sm2_envelope(
        &self,
        recipient: &KeyRef,
        envelope: &ukey_portal_api::gm::Sm2EnvelopedKey,
        id: &PendingId,
        label: &str,
    ) -> TokenResult<()> {
        let h = self.private_key(recipient, KeyUse::Sign)?;
        self.session
            .unwrap_sm2_envelope(
                h,
                &envelope.sym_encrypted_key,
                &envelope.encrypted_private_key,
                id.as_bytes(),
                label,
            )
            .map(|_| ())
    }

    /// SM2 decryption with the private key of `key`.
    pub fn decrypt_sm2(&self, key: &KeyRef, ciphertext: &[u8]) -> TokenResult<Vec<u8>> {
        let h = self.private_key(key, KeyUse::Decrypt)?;
        self.session.decrypt_sm2(h, ciphertext)
    }

    /// A transport key for this renewal run (see [`TransportKey`]).
    pub fn generate_transport_key(&self, alg: KeyAlg) -> TokenResult<TransportKey> {
        let (handle, public) = self.session.generate_transport_key(alg)?;
        Ok(TransportKey { handle, public })
    }

    /// Destroys the transport key now rather than at the end of the session.
    pub fn destroy_transport_key(&self, key: TransportKey) -> TokenResult<()> {
        self.destroy(key.handle)
    }

    /// RSA-OAEP (SHA-1) decryption with the private key of `key`.
    pub fn decrypt_rsa_oaep(&self, key: &KeyRef, ciphertext: &[u8]) -> TokenResult<Vec<u8>> {
        let h = self.private_key(key, KeyUse::Decrypt)?;
        self.session.decrypt_rsa_oaep(h, ciphertext)
    }

    /// ECDH shared secret of the private key of `key` with `peer_point`.
    pub fn ecdh(&self, key: &KeyRef, peer_point: &[u8]) -> TokenResult<Vec<u8>> {
        let h = self.private_key(key, KeyUse::Decrypt)?;
        self.session.ecdh_shared_secret(h, peer_point)
    }

    // --- Certificates, by value. ---

    /// Whether a certificate object with value `der` (and, if given, CKA_ID `id`) exists.
    pub fn has_certificate(&self, der: &[u8], id: Option<&[u8]>) -> TokenResult<bool> {
        let mut template = vec![
            Attribute::Class(ObjectKind::Certificate.class()),
            Attribute::Value(der.to_vec()),
        ];
        if let Some(id) = id {
            template.push(Attribute::Id(id.to_vec()));
        }
        Ok(!self.session.find_objects(&template)?.is_empty())
    }

    /// Writes a certificate object.
    pub fn write_certificate(&self, der: &[u8], id: &[u8], label: &str) -> TokenResult<()> {
        self.session.write_certificate(der, id, label).map(|_| ())
    }

    /// Sets CKA_ID and CKA_LABEL of every certificate object whose value is `der`.
    pub fn relabel_certificate(&self, der: &[u8], to: &[u8], label: &str) -> TokenResult<usize> {
        let handles = self.session.find_certificate_by_value(der)?;
        for h in &handles {
            self.session.set_id_and_label(*h, to, label)?;
        }
        Ok(handles.len())
    }

    /// Destroys every certificate object whose value is `der` (and, if given, whose
    /// CKA_ID is `id`).
    pub fn destroy_certificate(&self, der: &[u8], id: Option<&[u8]>) -> TokenResult<usize> {
        let mut n = 0;
        for h in self.session.find_certificate_by_value(der)? {
            if let Some(id) = id {
                let same = self
                    .session
                    .attributes(h, &[ukey_token::cryptoki::object::AttributeType::Id])?
                    .into_iter()
                    .any(|a| matches!(a, Attribute::Id(v) if v == id));
                if !same {
                    continue;
                }
            }
            self.destroy(h)?;
            n += 1;
        }
        Ok(n)
    }

    // --- Markers on the token. ---

    /// Records on the token that activation of renewal `renewal_id` has begun (journals
    /// are per user; the key travels between users and machines).
    pub fn mark_activation(&self, renewal_id: &str) -> TokenResult<()> {
        if self.activations()?.iter().any(|r| r == renewal_id) {
            return Ok(());
        }
        self.session
            .write_data_object(
                MARKER_APPLICATION,
                &format!("{ACTIVATION_MARKER_PREFIX}{renewal_id}"),
                renewal_id.as_bytes(),
            )
            .map(|_| ())
    }

    /// Removes the activation marker of `renewal_id`.
    pub fn unmark_activation(&self, renewal_id: &str) -> TokenResult<()> {
        let want = format!("{ACTIVATION_MARKER_PREFIX}{renewal_id}");
        for (h, label) in self.session.data_objects(MARKER_APPLICATION)? {
            if label == want {
                self.destroy(h)?;
            }
        }
        Ok(())
    }

    /// The renewal ids whose activation has begun on this token and not ended.
    pub fn activations(&self) -> TokenResult<Vec<String>> {
        Ok(self
            .session
            .data_objects(MARKER_APPLICATION)?
            .into_iter()
            .filter_map(|(_, l)| l.strip_prefix(ACTIVATION_MARKER_PREFIX).map(str::to_owned))
            .collect())
    }
}

/// How a token's new objects take the old ones' place (see ARCHITECTURE.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// PKCS#11: objects are moved by CKA_ID and label (the four
    /// [`crate::engine::ActivationStep`]s).
    Objects,
    /// SKF: the new key pairs live in their own container, complete since the write
    /// step; activation retires the old container unless it holds an encryption key
    /// that must be kept.
    Containers,
}

macro_rules! token_side {
    ($( $(#[$doc:meta])* fn $name:ident(&self $(, $arg:ident : $ty:ty)*) -> $ret:ty; )*) => {
        /// The token side of a renewal, as the engine uses it: [`SessionToken`] over a
        /// PKCS#11 session, [`crate::skf::SkfToken`] over an SKF application. Keys are
        /// named by [`KeyRef`] (id + public key), certificates by value, a pending
        /// renewal's objects by [`PendingId`].
        pub trait TokenSide {
            /// How activation works on this token.
            fn activation(&self) -> Activation {
                Activation::Objects
            }
            /// Does the token's SM2 key decrypt what is encrypted to its public key?
            fn sm2_decrypts(&self, key: &KeyRef) -> TokenResult<bool>;
            /// [`Activation::Containers`]: retires the old key's container (deletes it
            /// unless it holds an encryption key, which is kept for sealed bids);
            /// returns how many containers went.
            fn retire_old(&self, _old: &KeyRef) -> TokenResult<usize> {
                Ok(0)
            }
            $( $(#[$doc])* fn $name(&self $(, $arg: $ty)*) -> $ret; )*
        }

        impl TokenSide for SessionToken<'_> {
            fn sm2_decrypts(&self, key: &KeyRef) -> TokenResult<bool> {
                let PublicKey::Sm2 { point } = &key.public else {
                    return Ok(false);
                };
                let (ciphertext, plaintext) = crate::checks::sm2_decrypt_test(point)
                    .map_err(|what| ukey_token::Error::ObjectInvalid { what })?;
                Ok(SessionToken::decrypt_sm2(self, key, &ciphertext)? == plaintext)
            }
            $( fn $name(&self $(, $arg: $ty)*) -> $ret { SessionToken::$name(self $(, $arg)*) } )*
        }
    };
}

token_side! {
    /// Verifies the PIN once; never retried.
    fn login(&self, pin: &SecretString) -> TokenResult<()>;
    /// Every object visible (pending ones are found among them).
    fn objects(&self) -> TokenResult<Vec<ObjectInfo>>;
    /// How many objects of `kind` carry the pending id.
    fn pending_count(&self, kind: ObjectKind, id: &PendingId) -> TokenResult<usize>;
    /// The pending key pair's public key.
    fn pending_public_key(&self, id: &PendingId) -> TokenResult<Option<PublicKey>>;
    /// Generates the pending signing key pair.
    fn generate_key_pair(&self, alg: KeyAlg, id: &PendingId, label: &str) -> TokenResult<()>;
    /// Destroys the pending objects of `kind`; returns how many.
    fn destroy_pending(&self, kind: ObjectKind, id: &PendingId) -> TokenResult<usize>;
    /// Moves the pending objects of `kind` to `to` / `label`.
    fn relabel_pending(&self, kind: ObjectKind, id: &PendingId, to: &[u8], label: &str) -> TokenResult<usize>;
    /// Whether `key`'s private key is on the token.
    fn has_private_key(&self, key: &KeyRef) -> TokenResult<bool>;
    /// Destroys `key`'s objects.
    fn destroy_key_pair(&self, key: &KeyRef) -> TokenResult<usize>;
    /// Moves `key`'s objects to `to` / `label`.
    fn relabel_key_pair(&self, key: &KeyRef, to: &[u8], label: &str) -> TokenResult<usize>;
    /// Which of these objects cannot be changed.
    fn unmodifiable(&self, keys: &[&KeyRef], certs: &[&[u8]]) -> TokenResult<Vec<String>>;
    /// Signs with `key`.
    fn sign(&self, key: &KeyRef, data: &[u8]) -> TokenResult<Vec<u8>>;
    /// A CSR signed by `key`.
    fn csr(&self, key: &KeyRef, params: &rcgen::CertificateParams) -> TokenResult<Vec<u8>>;
    /// Unwraps an escrowed key with a transport key.
    fn unwrap_escrowed_key(&self, recipient: &TransportKey, transport: &KeyTransport<'_>, wrapped_private_key: &[u8], alg: KeyAlg, id: &PendingId, label: &str) -> TokenResult<()>;
    /// Imports a GM/T 0009 envelope addressed to `recipient`.
    fn unwrap_sm2_envelope(&self, recipient: &KeyRef, envelope: &ukey_portal_api::gm::Sm2EnvelopedKey, id: &PendingId, label: &str) -> TokenResult<()>;
    /// A transport key for this run.
    fn generate_transport_key(&self, alg: KeyAlg) -> TokenResult<TransportKey>;
    /// Destroys the transport key.
    fn destroy_transport_key(&self, key: TransportKey) -> TokenResult<()>;
    /// RSA-OAEP decryption with `key`.
    fn decrypt_rsa_oaep(&self, key: &KeyRef, ciphertext: &[u8]) -> TokenResult<Vec<u8>>;
    /// ECDH with `key`.
    fn ecdh(&self, key: &KeyRef, peer_point: &[u8]) -> TokenResult<Vec<u8>>;
    /// Whether the certificate is on the token (under `id`, when given).
    fn has_certificate(&self, der: &[u8], id: Option<&[u8]>) -> TokenResult<bool>;
    /// Writes a certificate under `id`.
    fn write_certificate(&self, der: &[u8], id: &[u8], label: &str) -> TokenResult<()>;
    /// Moves a certificate to `to` / `label`.
    fn relabel_certificate(&self, der: &[u8], to: &[u8], label: &str) -> TokenResult<usize>;
    /// Destroys a certificate (under `id`, when given).
    fn destroy_certificate(&self, der: &[u8], id: Option<&[u8]>) -> TokenResult<usize>;
    /// Marks on the token that a renewal's activation has begun.
    fn mark_activation(&self, renewal_id: &str) -> TokenResult<()>;
    /// Removes that mark.
    fn unmark_activation(&self, renewal_id: &str) -> TokenResult<()>;
    /// The renewals whose activation has begun on this token.
    fn activations(&self) -> TokenResult<Vec<String>>;
}

fn is_token_gone(e: &ukey_token::Error) -> bool {
    matches!(
        e,
        ukey_token::Error::TokenRemoved { .. }
            | ukey_token::Error::TokenNotPresent { .. }
            | ukey_token::Error::DeviceError { .. }
    )
}

fn serial_hex(der: &[u8]) -> String {
    use x509_parser::prelude::{FromDer, X509Certificate};
    X509Certificate::from_der(der)
        .map(|(_, c)| ukey_portal_api::serial_hex_from_bytes(c.raw_serial()))
        .unwrap_or_else(|_| "(unparsable)".into())
}
