//! The two things the engine talks to, as traits: the token ([`TokenApi`]) and the
//! portal ([`PortalApi`]), with their real implementations over `ukey-token`
//! ([`SessionToken`]) and `ukey-portal-client` ([`BlockingPortalClient`]).
//!
//! Token operations name objects by class and CKA_ID, never by handle: handles do not
//! survive a new session or process, and a resumed renewal must find its objects again.

use secrecy::SecretString;
use ukey_portal_api::{
    ChallengeResponse, InstalledRequest, InstalledResponse, IssueRequest, IssueResponse,
    RenewalStatus, StatusRequest,
};
use ukey_portal_client::{Answer, BlockingPortalClient, ClientError};
use ukey_token::cryptoki::mechanism::MechanismType;
use ukey_token::cryptoki::object::ObjectHandle;
use ukey_token::{
    KeyAlg, KeyTransport, Module, ObjectInfo, ObjectKind, PinState, PublicKey, Session,
    TokenSigner, TokenSummary,
};

/// Token result.
pub type TokenResult<T> = Result<T, ukey_token::Error>;

/// What the engine does on a token, through one session.
pub trait TokenApi {
    /// The token's serial.
    fn serial(&self) -> String;
    /// The PIN flags, read now.
    fn pin_state(&self) -> TokenResult<PinState>;
    /// C_Login. Never retried by the engine.
    fn login(&self, pin: &SecretString) -> TokenResult<()>;
    /// The mechanisms the token offers.
    fn mechanisms(&self) -> TokenResult<Vec<MechanismType>>;
    /// Every object visible.
    fn objects(&self) -> TokenResult<Vec<ObjectInfo>>;
    /// How many objects of `kind` have CKA_ID `id`.
    fn count(&self, kind: ObjectKind, id: &[u8]) -> TokenResult<usize>;
    /// Whether a certificate object with value `der` (and, if given, CKA_ID `id`) exists.
    fn has_certificate(&self, der: &[u8], id: Option<&[u8]>) -> TokenResult<bool>;
    /// The public key of the key pair with CKA_ID `id`.
    fn public_key(&self, id: &[u8]) -> TokenResult<Option<PublicKey>>;
    /// Generates a key pair under `id` / `label`.
    fn generate_key_pair(&self, alg: KeyAlg, id: &[u8], label: &str) -> TokenResult<()>;
    /// Signs with the private key `id`.
    fn sign(&self, id: &[u8], alg: KeyAlg, data: &[u8]) -> TokenResult<Vec<u8>>;
    /// A PKCS#10 CSR with `params`, signed by the private key `id` whose public key is
    /// `public`.
    fn csr(
        &self,
        id: &[u8],
        public: &PublicKey,
        params: &rcgen::CertificateParams,
    ) -> TokenResult<Vec<u8>>;
    /// Writes a certificate object.
    fn write_certificate(&self, der: &[u8], id: &[u8], label: &str) -> TokenResult<()>;
    /// Sets CKA_ID and CKA_LABEL of every object of `kind` with CKA_ID `from`; returns
    /// how many.
    fn relabel(&self, kind: ObjectKind, from: &[u8], to: &[u8], label: &str) -> TokenResult<usize>;
    /// Destroys every object of `kind` with CKA_ID `id`; returns how many.
    fn destroy(&self, kind: ObjectKind, id: &[u8]) -> TokenResult<usize>;
    /// Destroys every certificate object whose value is `der`.
    fn destroy_certificate(&self, der: &[u8]) -> TokenResult<usize>;
    /// Unwraps an escrowed key with the private key `recipient_id`.
    fn unwrap_escrowed_key(
        &self,
        recipient_id: &[u8],
        transport: &KeyTransport<'_>,
        wrapped_private_key: &[u8],
        alg: KeyAlg,
        id: &[u8],
        label: &str,
    ) -> TokenResult<()>;
    /// RSA-OAEP (SHA-1) decryption with the private key `id`.
    fn decrypt_rsa_oaep(&self, id: &[u8], ciphertext: &[u8]) -> TokenResult<Vec<u8>>;
    /// ECDH shared secret of the private key `id` with `peer_point`.
    fn ecdh(&self, id: &[u8], peer_point: &[u8]) -> TokenResult<Vec<u8>>;
}

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
}

impl PortalApi for BlockingPortalClient {
    fn status(&self, req: &StatusRequest) -> Result<Answer<RenewalStatus>, ClientError> {
        BlockingPortalClient::status(self, req)
    }
    fn challenge(&self, order_id: &str) -> Result<Answer<ChallengeResponse>, ClientError> {
        BlockingPortalClient::challenge(self, order_id)
    }
    fn issue(
        &self,
        order_id: &str,
        req: &IssueRequest,
    ) -> Result<Answer<IssueResponse>, ClientError> {
        BlockingPortalClient::issue(self, order_id, req)
    }
    fn installed(
        &self,
        order_id: &str,
        req: &InstalledRequest,
    ) -> Result<Answer<InstalledResponse>, ClientError> {
        BlockingPortalClient::installed(self, order_id, req)
    }
}

/// [`TokenApi`] over a read-write `ukey-token` session.
#[derive(Debug)]
pub struct SessionToken<'m> {
    module: &'m Module,
    token: TokenSummary,
    session: Session<'m>,
}

impl<'m> SessionToken<'m> {
    /// Opens a read-write session with `token` (one per renewal: several renewals run
    /// at once on several sessions of one module).
    pub fn open(module: &'m Module, token: &TokenSummary) -> TokenResult<SessionToken<'m>> {
        Ok(SessionToken {
            module,
            token: token.clone(),
            session: module.open_rw_session(token)?,
        })
    }

    /// The session.
    pub fn session(&self) -> &Session<'m> {
        &self.session
    }

    fn one(&self, kind: ObjectKind, id: &[u8]) -> TokenResult<ObjectHandle> {
        self.session
            .find_kind_by_id(kind, id)?
            .into_iter()
            .next()
            .ok_or_else(|| ukey_token::Error::ObjectInvalid {
                what: format!("no {kind:?} with CKA_ID {}", hex::encode(id)),
            })
    }
}

impl TokenApi for SessionToken<'_> {
    fn serial(&self) -> String {
        self.token.serial.clone()
    }
    fn pin_state(&self) -> TokenResult<PinState> {
        Ok(self.module.refresh(&self.token)?.pin)
    }
    fn login(&self, pin: &SecretString) -> TokenResult<()> {
        self.session.login(pin)
    }
    fn mechanisms(&self) -> TokenResult<Vec<MechanismType>> {
        self.session.mechanisms()
    }
    fn objects(&self) -> TokenResult<Vec<ObjectInfo>> {
        self.session.snapshot()
    }
    fn public_key(&self, id: &[u8]) -> TokenResult<Option<PublicKey>> {
        self.session.public_key_by_id(id)
    }
    fn count(&self, kind: ObjectKind, id: &[u8]) -> TokenResult<usize> {
        Ok(self.session.find_kind_by_id(kind, id)?.len())
    }
    fn has_certificate(&self, der: &[u8], id: Option<&[u8]>) -> TokenResult<bool> {
        let mut template = vec![
            ukey_token::cryptoki::object::Attribute::Class(ObjectKind::Certificate.class()),
            ukey_token::cryptoki::object::Attribute::Value(der.to_vec()),
        ];
        if let Some(id) = id {
            template.push(ukey_token::cryptoki::object::Attribute::Id(id.to_vec()));
        }
        Ok(!self.session.find_objects(&template)?.is_empty())
    }
    fn generate_key_pair(&self, alg: KeyAlg, id: &[u8], label: &str) -> TokenResult<()> {
        self.session.generate_key_pair(alg, id, label).map(|_| ())
    }
    fn sign(&self, id: &[u8], alg: KeyAlg, data: &[u8]) -> TokenResult<Vec<u8>> {
        let key = self.one(ObjectKind::PrivateKey, id)?;
        self.session.sign_data(alg, key, data)
    }
    fn csr(
        &self,
        id: &[u8],
        public: &PublicKey,
        params: &rcgen::CertificateParams,
    ) -> TokenResult<Vec<u8>> {
        let key = self.one(ObjectKind::PrivateKey, id)?;
        let signer = TokenSigner::new(&self.session, key, public.clone());
        let csr =
            params
                .serialize_request(&signer)
                .map_err(|e| ukey_token::Error::ObjectInvalid {
                    what: format!("CSR signing on the token failed: {e}"),
                })?;
        Ok(csr.der().to_vec())
    }
    fn write_certificate(&self, der: &[u8], id: &[u8], label: &str) -> TokenResult<()> {
        self.session.write_certificate(der, id, label).map(|_| ())
    }
    fn relabel(&self, kind: ObjectKind, from: &[u8], to: &[u8], label: &str) -> TokenResult<usize> {
        let handles = self.session.find_kind_by_id(kind, from)?;
        for h in &handles {
            self.session.set_id_and_label(*h, to, label)?;
        }
        Ok(handles.len())
    }
    fn destroy(&self, kind: ObjectKind, id: &[u8]) -> TokenResult<usize> {
        let handles = self.session.find_kind_by_id(kind, id)?;
        for h in &handles {
            self.session.destroy(*h)?;
        }
        Ok(handles.len())
    }
    fn destroy_certificate(&self, der: &[u8]) -> TokenResult<usize> {
        let handles = self.session.find_certificate_by_value(der)?;
        for h in &handles {
            self.session.destroy(*h)?;
        }
        Ok(handles.len())
    }
    fn unwrap_escrowed_key(
        &self,
        recipient_id: &[u8],
        transport: &KeyTransport<'_>,
        wrapped_private_key: &[u8],
        alg: KeyAlg,
        id: &[u8],
        label: &str,
    ) -> TokenResult<()> {
        let recipient = self.one(ObjectKind::PrivateKey, recipient_id)?;
        self.session
            .unwrap_escrowed_key(recipient, transport, wrapped_private_key, alg, id, label)
            .map(|_| ())
    }
    fn decrypt_rsa_oaep(&self, id: &[u8], ciphertext: &[u8]) -> TokenResult<Vec<u8>> {
        let key = self.one(ObjectKind::PrivateKey, id)?;
        self.session.decrypt_rsa_oaep(key, ciphertext)
    }
    fn ecdh(&self, id: &[u8], peer_point: &[u8]) -> TokenResult<Vec<u8>> {
        let key = self.one(ObjectKind::PrivateKey, id)?;
        self.session.ecdh_shared_secret(key, peer_point)
    }
}
