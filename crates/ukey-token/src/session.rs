//! A session with one token: login, objects, mechanisms, signing.
//!
//! Every failure names the token and, for calls on a token we had just seen, reads the
//! ambiguous return values of a vanished token as [`Error::TokenRemoved`]
//! (see [`Error::from_cryptoki_on_token`]).

use std::cell::Cell;
use std::fmt;

use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::{Attribute, AttributeType, ObjectClass, ObjectHandle};
use cryptoki::session::UserType;
use secrecy::SecretString;

use crate::error::{Error, Result};
use crate::module::{Module, TokenSummary};

/// An open session with a token. Borrows its [`Module`], so the module cannot be
/// re-initialised while the session lives. Closed on drop.
pub struct Session<'m> {
    module: &'m Module,
    inner: cryptoki::session::Session,
    token: TokenSummary,
    logged_in: Cell<bool>,
}

impl fmt::Debug for Session<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Session")
            .field("token", &self.token.name().to_string())
            .field("logged_in", &self.logged_in.get())
            .finish_non_exhaustive()
    }
}

impl<'m> Session<'m> {
    pub(crate) fn new(
        module: &'m Module,
        inner: cryptoki::session::Session,
        token: TokenSummary,
    ) -> Session<'m> {
        Session {
            module,
            inner,
            token,
            logged_in: Cell::new(false),
        }
    }

    /// The token this session is with.
    pub fn token(&self) -> &TokenSummary {
        &self.token
    }

    fn err(&self, e: cryptoki::error::Error) -> Error {
        use cryptoki::error::{Error as CkError, RvError};
        // CKR_GENERAL_ERROR is how SoftHSM2 reports a deleted token, but other modules
        // (tpm2-pkcs11) use it for any failure: it means removal only if the token is
        // no longer in its slot.
        if let CkError::Pkcs11(RvError::GeneralError, function) = e
            && self.module.refresh(&self.token).is_ok()
        {
            return Error::from_cryptoki(
                CkError::Pkcs11(RvError::GeneralError, function),
                Some(self.token.name()),
            );
        }
        Error::from_cryptoki_on_token(e, self.token.name())
    }

    /// C_Login as the user. The PIN is borrowed for the call only: never stored, never
    /// logged, never retried here. A wrong PIN gives [`Error::PinIncorrect`] (read the
    /// token's PIN flags again with [`Module::refresh`] to show the remaining tries).
    pub fn login(&self, pin: &SecretString) -> Result<()> {
        match self.inner.login(UserType::User, Some(pin)) {
            Ok(()) => {}
            Err(cryptoki::error::Error::Pkcs11(
                cryptoki::error::RvError::UserAlreadyLoggedIn,
                _,
            )) => {}
            Err(e) => return Err(self.err(e)),
        }
        self.logged_in.set(true);
        Ok(())
    }

    /// C_Login without a PIN, for tokens with a protected authentication path (the PIN
    /// is typed on the device).
    pub fn login_on_device(&self) -> Result<()> {
        self.inner
            .login(UserType::User, None)
            .map_err(|e| self.err(e))?;
        self.logged_in.set(true);
        Ok(())
    }

    /// Whether [`Session::login`] succeeded on this session.
    pub fn is_logged_in(&self) -> bool {
        self.logged_in.get()
    }

    /// C_Logout.
    pub fn logout(&self) -> Result<()> {
        self.inner.logout().map_err(|e| self.err(e))?;
        self.logged_in.set(false);
        Ok(())
    }

    /// C_FindObjects with `template`.
    pub fn find_objects(&self, template: &[Attribute]) -> Result<Vec<ObjectHandle>> {
        self.inner.find_objects(template).map_err(|e| self.err(e))
    }

    /// C_GetAttributeValue; attributes the object does not have are left out.
    pub fn attributes(
        &self,
        object: ObjectHandle,
        types: &[AttributeType],
    ) -> Result<Vec<Attribute>> {
        self.inner
            .get_attributes(object, types)
            .map_err(|e| self.err(e))
    }

    /// The private key whose CKA_ID is `key_id` (visible only after login on most tokens).
    pub fn find_private_key(&self, key_id: &[u8]) -> Result<Option<ObjectHandle>> {
        Ok(self
            .find_objects(&[
                Attribute::Class(ObjectClass::PRIVATE_KEY),
                Attribute::Id(key_id.to_vec()),
            ])?
            .into_iter()
            .next())
    }

    /// C_GetMechanismList for the token's slot, vendor-defined mechanisms included
    /// (cryptoki's own list drops them, and 国密 lives there).
    pub fn mechanisms(&self) -> Result<Vec<MechanismType>> {
        let list = self
            .module
            .mechanism_list(&self.token)
            .map_err(|e| self.err(e))?;
        Ok(list
            .into_iter()
            .filter_map(|m| {
                MechanismType::try_from(m)
                    .or_else(|_| MechanismType::new_vendor_defined(m))
                    .ok()
            })
            .collect())
    }

    /// The SM2 mechanism profile this token is used through, if any (see
    /// [`Module::sm2_profile`]).
    pub fn sm2_profile(&self) -> Option<crate::gm::MechanismProfile> {
        self.module.sm2_profile(&self.token)
    }

    /// The key sizes C_GetMechanismInfo gives for `mechanism` (bits), as (min, max);
    /// `None` when the module gives no range (both zero) or does not answer.
    pub fn key_sizes(&self, mechanism: MechanismType) -> Result<Option<(usize, usize)>> {
        let info = self
            .module
            .pkcs11()?
            .get_mechanism_info(self.token.slot()?, mechanism)
            .map_err(|e| self.err(e))?;
        let (min, max) = (info.min_key_size(), info.max_key_size());
        Ok((min != 0 || max != 0).then_some((min, max)))
    }

    /// C_Sign (single part). For ECDSA on SoftHSM2 there is no CKM_ECDSA_SHA256: hash in
    /// software and sign with CKM_ECDSA.
    pub fn sign(&self, mechanism: &Mechanism, key: ObjectHandle, data: &[u8]) -> Result<Vec<u8>> {
        self.inner
            .sign(mechanism, key, data)
            .map_err(|e| self.err(e))
    }

    /// The cryptoki session, for this crate's own modules (key generation, unwrap,
    /// objects) and for tests that write odd objects; the product's other crates use
    /// the wrapped operations.
    pub fn cryptoki(&self) -> &cryptoki::session::Session {
        &self.inner
    }

    /// Maps a cryptoki error from a call made through [`Session::cryptoki`] the way this
    /// type maps its own.
    pub fn map_error(&self, e: cryptoki::error::Error) -> Error {
        self.err(e)
    }
}
