//! A loaded PKCS#11 module, its slots and the tokens in them.
//!
//! **Invariant:** a [`Session`] borrows the [`Module`] it came from, and
//! [`Module::reinitialize`] (C_Finalize + C_Initialize, which SoftHSM2 needs to see
//! tokens created or deleted by another process) takes `&mut self`. So the borrow
//! checker guarantees that no session of ours is open when the module is
//! re-initialised: a re-scan can never kill a session in use. A module shared between
//! threads lives in an `Arc`, and only the sole holder can get the `&mut` (see
//! [`crate::Watcher`]).

use std::path::{Path, PathBuf};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::slot::{Slot, TokenInfo};
use serde::Serialize;

use crate::error::{Error, Result, TokenName};
use crate::session::Session;

/// The module's own description (C_GetInfo).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LibraryInfo {
    /// Library manufacturer, e.g. `SoftHSM`.
    pub manufacturer: String,
    /// Library description, e.g. `Implementation of PKCS11`.
    pub description: String,
    /// Library version, e.g. `2.6`.
    pub version: String,
    /// Cryptoki (PKCS#11) version the library implements, e.g. `2.40`.
    pub cryptoki_version: String,
}

/// The user PIN's state, from the token flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct PinState {
    /// CKF_USER_PIN_INITIALIZED.
    pub initialized: bool,
    /// CKF_USER_PIN_COUNT_LOW: a wrong PIN was entered since the last good one.
    pub count_low: bool,
    /// CKF_USER_PIN_FINAL_TRY: one more wrong PIN locks the token.
    pub final_try: bool,
    /// CKF_USER_PIN_LOCKED.
    pub locked: bool,
    /// CKF_USER_PIN_TO_BE_CHANGED.
    pub to_be_changed: bool,
    /// CKF_PROTECTED_AUTHENTICATION_PATH: the PIN is entered on the device (PIN pad).
    pub protected_authentication_path: bool,
}

/// Token flags other than the PIN state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct TokenFlags {
    /// CKF_TOKEN_INITIALIZED.
    pub token_initialized: bool,
    /// CKF_LOGIN_REQUIRED.
    pub login_required: bool,
    /// CKF_WRITE_PROTECTED.
    pub write_protected: bool,
    /// CKF_RNG.
    pub rng: bool,
}

/// A token as seen in a slot at one moment (C_GetSlotInfo + C_GetTokenInfo).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TokenSummary {
    /// The slot's id. May change when the module is re-initialised; identify a token
    /// by [`TokenSummary::serial`] (+ label) instead.
    pub slot_id: u64,
    /// Slot description (reader name for card readers).
    pub slot_description: String,
    /// Token label (trimmed).
    pub label: String,
    /// Token serial number (trimmed).
    pub serial: String,
    /// Token manufacturer.
    pub manufacturer: String,
    /// Token model.
    pub model: String,
    /// Hardware version, `major.minor`.
    pub hardware_version: String,
    /// Firmware version, `major.minor`.
    pub firmware_version: String,
    /// Free public memory in bytes, when the token says.
    pub free_public_memory: Option<usize>,
    /// Free private memory in bytes, when the token says.
    pub free_private_memory: Option<usize>,
    /// Token flags.
    pub flags: TokenFlags,
    /// User PIN state.
    pub pin: PinState,
    #[serde(skip)]
    pub(crate) slot: SlotHandle,
}

/// cryptoki's `Slot` cannot be built outside cryptoki, and is not `Eq`; keep it here.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SlotHandle(pub(crate) Slot);

impl PartialEq for SlotHandle {
    fn eq(&self, other: &Self) -> bool {
        self.0.id() == other.0.id()
    }
}
impl Eq for SlotHandle {}

impl TokenSummary {
    /// The name used in messages and events.
    pub fn name(&self) -> TokenName {
        TokenName {
            label: self.label.clone(),
            serial: self.serial.clone(),
            slot_id: Some(self.slot_id),
        }
    }

    /// Whether `other` is the same physical token (same serial and label).
    pub fn same_token(&self, other: &TokenSummary) -> bool {
        self.serial == other.serial && self.label == other.label
    }

    fn from_info(slot: Slot, slot_description: String, info: &TokenInfo) -> TokenSummary {
        TokenSummary {
            slot_id: slot.id(),
            slot_description,
            label: info.label().trim().to_owned(),
            serial: info.serial_number().trim().to_owned(),
            manufacturer: info.manufacturer_id().trim().to_owned(),
            model: info.model().trim().to_owned(),
            hardware_version: info.hardware_version().to_string(),
            firmware_version: info.firmware_version().to_string(),
            free_public_memory: info.free_public_memory(),
            free_private_memory: info.free_private_memory(),
            flags: TokenFlags {
                token_initialized: info.token_initialized(),
                login_required: info.login_required(),
                write_protected: info.write_protected(),
                rng: info.rng(),
            },
            pin: PinState {
                initialized: info.user_pin_initialized(),
                count_low: info.user_pin_count_low(),
                final_try: info.user_pin_final_try(),
                locked: info.user_pin_locked(),
                to_be_changed: info.user_pin_to_be_changed(),
                protected_authentication_path: info.protected_authentication_path(),
            },
            slot: SlotHandle(slot),
        }
    }
}

/// A loaded and initialised PKCS#11 module. Load one per library per process: PKCS#11
/// allows a library to be initialised once, and C_Finalize (on drop) ends it for every
/// user in the process.
#[derive(Debug)]
pub struct Module {
    pkcs11: Pkcs11,
    path: PathBuf,
    info: LibraryInfo,
    /// Whether our C_Initialize started the library: only then does drop call
    /// C_Finalize (a library someone else in the process initialised stays theirs).
    owns_init: bool,
}

impl Module {
    /// Loads the library at `path` and calls C_Initialize.
    ///
    /// A missing file gives [`Error::ModuleNotFound`]; a file that is not a PKCS#11
    /// library (no `C_GetFunctionList`, not a shared object, wrong architecture, or
    /// C_Initialize fails) gives [`Error::ModuleInvalid`], both with the path.
    pub fn load(path: &Path) -> Result<Module> {
        if !path.exists() {
            return Err(Error::ModuleNotFound {
                path: Some(path.to_owned()),
                searched: vec![path.to_owned()],
            });
        }
        let invalid = |reason: String| Error::ModuleInvalid {
            path: path.to_owned(),
            reason,
        };
        if path.is_dir() {
            return Err(invalid("it is a directory".to_owned()));
        }
        let pkcs11 = Pkcs11::new(path).map_err(|e| match e {
            CkError::LibraryLoading(le) => invalid(format!("cannot load it as a library: {le}")),
            CkError::MissingSymbol(sym) => invalid(format!(
                "it does not export {sym}, so it is not a PKCS#11 library"
            )),
            other => invalid(other.to_string()),
        })?;
        let owns_init =
            match pkcs11.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
                Ok(()) => true,
                Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {
                    tracing::warn!(
                        module = %path.display(),
                        "module already initialised in this process; sharing it"
                    );
                    false
                }
                Err(e) => {
                    let e = Error::from_cryptoki(e, None);
                    return Err(invalid(format!("C_Initialize failed: {e}")));
                }
            };
        let info = match pkcs11.get_library_info() {
            Ok(info) => info,
            Err(e) => {
                if owns_init && let Err(fe) = pkcs11.finalize() {
                    tracing::debug!("C_Finalize after a failed C_GetInfo: {fe}");
                }
                return Err(invalid(format!("C_GetInfo failed: {e}")));
            }
        };
        let info = LibraryInfo {
            manufacturer: info.manufacturer_id().trim().to_owned(),
            description: info.library_description().trim().to_owned(),
            version: info.library_version().to_string(),
            cryptoki_version: info.cryptoki_version().to_string(),
        };
        tracing::debug!(module = %path.display(), ?info, "PKCS#11 module loaded");
        Ok(Module {
            pkcs11,
            path: path.to_owned(),
            info,
            owns_init,
        })
    }

    /// The library's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// C_GetInfo, read at load time.
    pub fn library_info(&self) -> &LibraryInfo {
        &self.info
    }

    /// The cryptoki context, for this crate's sessions (mechanism lists).
    pub(crate) fn pkcs11(&self) -> &Pkcs11 {
        &self.pkcs11
    }

    /// C_Finalize then C_Initialize: SoftHSM2 (and some vendor modules) only see tokens
    /// created or deleted by other processes after this. Takes `&mut self`, so no
    /// [`Session`] from this module can be open (see the module invariant).
    ///
    /// A library that another user in this process initialised is never finalised
    /// under it: then this is a no-op, and tokens made by other processes appear only
    /// if the module reports them by itself.
    pub fn reinitialize(&mut self) -> Result<()> {
        if !self.owns_init {
            tracing::debug!("module shared with another user in this process: not re-initialised");
            return Ok(());
        }
        // finalize() consumes a handle; the library stays loaded through `self.pkcs11`.
        if let Err(e) = self.pkcs11.clone().finalize() {
            tracing::debug!("C_Finalize before re-initialise: {e}");
        }
        self.pkcs11
            .initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
            .map_err(|e| Error::from_cryptoki(e, None))?;
        Ok(())
    }

    /// Every initialised token present in a slot. A slot whose token cannot be read is
    /// skipped with a warning (it is usually being removed); uninitialised tokens (blank
    /// cards, SoftHSM2's spare slot) are left out.
    pub fn tokens(&self) -> Result<Vec<TokenSummary>> {
        let slots = self
            .pkcs11
            .get_slots_with_token()
            .map_err(|e| Error::from_cryptoki(e, None))?;
        let mut out = Vec::new();
        for slot in slots {
            match self.token_in(slot) {
                Ok(t) if t.flags.token_initialized => out.push(t),
                Ok(_) => {}
                Err(e) => tracing::warn!(slot = slot.id(), "skipping slot: {e}"),
            }
        }
        Ok(out)
    }

    /// The token in `slot`.
    fn token_in(&self, slot: Slot) -> Result<TokenSummary> {
        let slot_name = || TokenName {
            slot_id: Some(slot.id()),
            ..TokenName::default()
        };
        let slot_info = self
            .pkcs11
            .get_slot_info(slot)
            .map_err(|e| Error::from_cryptoki(e, Some(slot_name())))?;
        let info = self
            .pkcs11
            .get_token_info(slot)
            .map_err(|e| Error::from_cryptoki(e, Some(slot_name())))?;
        Ok(TokenSummary::from_info(
            slot,
            slot_info.slot_description().trim().to_owned(),
            &info,
        ))
    }

    /// Reads `token`'s info again (e.g. the PIN flags after a failed login). Fails with
    /// [`Error::TokenRemoved`] if another token, or none, is in its slot now.
    pub fn refresh(&self, token: &TokenSummary) -> Result<TokenSummary> {
        let now = self
            .token_in(token.slot.0)
            .map_err(|e| removed_if_gone(e, token))?;
        if now.same_token(token) {
            Ok(now)
        } else {
            Err(Error::TokenRemoved {
                token: Some(Box::new(token.name())),
                call: crate::error::Pkcs11Call::new(
                    cryptoki::context::Function::GetTokenInfo,
                    RvError::TokenNotPresent,
                ),
            })
        }
    }

    /// Opens a read-only session with `token`.
    pub fn open_session(&self, token: &TokenSummary) -> Result<Session<'_>> {
        let s = self
            .pkcs11
            .open_ro_session(token.slot.0)
            .map_err(|e| Error::from_cryptoki_on_token(e, token.name()))?;
        Ok(Session::new(self, s, token.clone()))
    }

    /// Opens a read-write session with `token` (for writing certificates and keys).
    pub fn open_rw_session(&self, token: &TokenSummary) -> Result<Session<'_>> {
        let s = self
            .pkcs11
            .open_rw_session(token.slot.0)
            .map_err(|e| Error::from_cryptoki_on_token(e, token.name()))?;
        Ok(Session::new(self, s, token.clone()))
    }
}

fn removed_if_gone(e: Error, token: &TokenSummary) -> Error {
    match e {
        Error::TokenNotPresent { call, .. } | Error::Pkcs11 { call, .. } => Error::TokenRemoved {
            token: Some(Box::new(token.name())),
            call,
        },
        other => other,
    }
}

impl Drop for Module {
    fn drop(&mut self) {
        if !self.owns_init {
            return;
        }
        if let Err(e) = self.pkcs11.clone().finalize() {
            tracing::debug!("C_Finalize on drop: {e}");
        }
    }
}
