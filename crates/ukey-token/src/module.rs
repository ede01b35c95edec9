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
use cryptoki::slot::Slot;
use cryptoki_sys::{CK_SLOT_INFO, CK_TOKEN_INFO};
use serde::Serialize;

use crate::error::{Error, Result, TokenName};
use crate::quirks::{self, Quirk};
use crate::raw::RawInfo;
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
    /// Tries left before the PIN locks, when the interface says (SKF's
    /// `SKF_GetPINInfo`; PKCS#11 has only the flags above).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tries_left: Option<u32>,
    /// Wrong PINs in a row that lock it, when the interface says.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_tries: Option<u32>,
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
    /// The key's identity for this process: its serial, or `serial@slot` when the serial
    /// cannot tell keys apart (zeros or blanks, or another present key reports the same
    /// one). Front ends name a key by it in commands (`ukey renew --token`, the app).
    pub id: String,
    /// The slot's id. May change when the module is re-initialised; identify a token
    /// by [`TokenSummary::id`] (+ label) instead.
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
    /// Hardware version, `major.minor` (`unknown` when the module's is out of range).
    pub hardware_version: String,
    /// Firmware version, `major.minor` (`unknown` when the module's is out of range).
    pub firmware_version: String,
    /// The token's clock (UTC), when it has a readable one.
    pub clock: Option<String>,
    /// Free public memory in bytes, when the token says.
    pub free_public_memory: Option<usize>,
    /// Free private memory in bytes, when the token says.
    pub free_private_memory: Option<usize>,
    /// Token flags.
    pub flags: TokenFlags,
    /// User PIN state.
    pub pin: PinState,
    /// Fields the module filled in its own way (each shown decoded or as unknown).
    pub quirks: Vec<Quirk>,
    /// The interface the key is used through.
    pub interface: crate::config::Interface,
    /// The SKF application this token is (an SKF device holds one or more, each with
    /// its own PIN and containers); `None` for PKCS#11.
    pub application: Option<String>,
    /// The PKCS#11 slot (`None` for an SKF key).
    #[serde(skip)]
    pub(crate) slot: Option<SlotHandle>,
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
    /// The PKCS#11 slot, or an error for a key used through another interface.
    pub(crate) fn slot(&self) -> Result<Slot> {
        self.slot.map(|s| s.0).ok_or_else(|| Error::NotSupported {
            what: format!("{} is an SKF key, not a PKCS#11 token", self.id),
        })
    }

    /// The name used in messages and events.
    pub fn name(&self) -> TokenName {
        TokenName {
            label: self.label.clone(),
            serial: self.serial.clone(),
            slot_id: Some(self.slot_id),
        }
    }

    /// Whether `other` is the same physical token (same id and label).
    pub fn same_token(&self, other: &TokenSummary) -> bool {
        self.id == other.id && self.label == other.label
    }

    /// Whether the serial alone does not identify this key ([`TokenSummary::id`] then
    /// carries the slot).
    pub fn serial_is_shared(&self) -> bool {
        self.id != self.serial
    }

    /// Whether `id` names this key: its id, or `serial@slot` of its slot (an id given
    /// while another key shared its serial stays valid after that key leaves).
    pub fn answers_to(&self, id: &str) -> bool {
        self.id == id || format!("{}@{}", self.serial, self.slot_id) == id
    }

    /// Makes the id `serial@slot`.
    pub(crate) fn qualify(&mut self) {
        self.id = format!("{}@{}", self.serial, self.slot_id);
    }

    /// Reads each field on its own (see [`crate::quirks`]): an odd field is shown
    /// decoded or as unknown and recorded as a quirk, never a reason to drop the token.
    fn from_raw(slot: Slot, slot_info: &CK_SLOT_INFO, info: &CK_TOKEN_INFO) -> TokenSummary {
        use cryptoki_sys as ck;
        let mut q = Vec::new();
        let slot_description = quirks::text("slotDescription", &slot_info.slotDescription, &mut q);
        let label = quirks::text("label", &info.label, &mut q);
        let serial = quirks::text("serialNumber", &info.serialNumber, &mut q);
        quirks::check_serial(&serial, &info.serialNumber, &mut q);
        let manufacturer = quirks::text("manufacturerID", &info.manufacturerID, &mut q);
        let model = quirks::text("model", &info.model, &mut q);
        let unknown = || "unknown".to_owned();
        let hardware_version = quirks::version(
            "hardwareVersion",
            info.hardwareVersion.major,
            info.hardwareVersion.minor,
            &mut q,
        )
        .unwrap_or_else(unknown);
        let firmware_version = quirks::version(
            "firmwareVersion",
            info.firmwareVersion.major,
            info.firmwareVersion.minor,
            &mut q,
        )
        .unwrap_or_else(unknown);
        let f = info.flags;
        let has = |bit: ck::CK_FLAGS| f & bit != 0;
        let clock = if has(ck::CKF_CLOCK_ON_TOKEN) {
            quirks::clock(&info.utcTime, &mut q)
        } else {
            None
        };
        let (free_public_memory, _) = quirks::memory(
            "ulFreePublicMemory",
            info.ulFreePublicMemory,
            info.ulTotalPublicMemory,
            &mut q,
        );
        let (free_private_memory, _) = quirks::memory(
            "ulFreePrivateMemory",
            info.ulFreePrivateMemory,
            info.ulTotalPrivateMemory,
            &mut q,
        );
        let shared = q
            .iter()
            .any(|q| q.kind == quirks::QuirkKind::SerialNotUnique);
        let mut token = TokenSummary {
            id: serial.clone(),
            slot_id: slot.id(),
            slot_description,
            label,
            serial,
            manufacturer,
            model,
            hardware_version,
            firmware_version,
            clock,
            free_public_memory,
            free_private_memory,
            flags: TokenFlags {
                token_initialized: has(ck::CKF_TOKEN_INITIALIZED),
                login_required: has(ck::CKF_LOGIN_REQUIRED),
                write_protected: has(ck::CKF_WRITE_PROTECTED),
                rng: has(ck::CKF_RNG),
            },
            pin: PinState {
                initialized: has(ck::CKF_USER_PIN_INITIALIZED),
                count_low: has(ck::CKF_USER_PIN_COUNT_LOW),
                final_try: has(ck::CKF_USER_PIN_FINAL_TRY),
                locked: has(ck::CKF_USER_PIN_LOCKED),
                to_be_changed: has(ck::CKF_USER_PIN_TO_BE_CHANGED),
                protected_authentication_path: has(ck::CKF_PROTECTED_AUTHENTICATION_PATH),
                tries_left: None,
                max_tries: None,
            },
            quirks: q,
            interface: crate::config::Interface::Pkcs11,
            application: None,
            slot: Some(SlotHandle(slot)),
        };
        if shared {
            token.qualify();
        }
        token
    }
}

/// A loaded and initialised PKCS#11 module. Load one per library per process: PKCS#11
/// allows a library to be initialised once, and C_Finalize (on drop) ends it for every
/// user in the process.
///
/// A module may also be an SKF (GM/T 0016) library ([`Module::load_as`]): then its
/// tokens are the SKF devices' applications ([`crate::skf`]), listed, watched and
/// refreshed through the same methods; PKCS#11 sessions are not available on them
/// ([`Module::skf`] gives the SKF side).
#[derive(Debug)]
pub struct Module {
    backend: Backend,
    path: PathBuf,
    info: LibraryInfo,
    /// The SM2 mechanism profile the configuration gives this library, if any (see
    /// [`Module::use_config`]); else built-ins are matched per token.
    sm2_configured: Option<crate::gm::MechanismProfile>,
}

#[derive(Debug)]
enum Backend {
    Pkcs11 {
        pkcs11: Pkcs11,
        /// C_GetSlotInfo / C_GetTokenInfo read field by field (see [`crate::raw`]).
        raw: RawInfo,
        /// Whether our C_Initialize started the library: only then does drop call
        /// C_Finalize (a library someone else in the process initialised stays theirs).
        owns_init: bool,
    },
    Skf(crate::skf::SkfBackend),
}

impl Module {
    /// Loads the library at `path` and calls C_Initialize.
    ///
    /// A missing file gives [`Error::ModuleNotFound`]; a file that is not a PKCS#11
    /// library (no `C_GetFunctionList`, not a shared object, wrong architecture, or
    /// C_Initialize fails) gives [`Error::ModuleInvalid`], both with the path; a module
    /// whose C_Initialize fails with CKR_GENERAL_ERROR, CKR_DEVICE_ERROR or
    /// CKR_FUNCTION_FAILED (its service is not running) gives
    /// [`Error::ModuleServiceDown`].
    pub fn load(path: &Path) -> Result<Module> {
        Module::load_as(path, None)
    }

    /// Loads the library at `path` as a PKCS#11 module or an SKF library. `None`: as
    /// what it exports (`C_GetFunctionList`: PKCS#11, checked first; else
    /// `SKF_EnumDev`: SKF).
    pub fn load_as(path: &Path, kind: Option<crate::config::Interface>) -> Result<Module> {
        use crate::config::Interface;
        let kind = match kind {
            Some(k) => k,
            None => detect_interface(path),
        };
        match kind {
            Interface::Pkcs11 => Module::load_pkcs11(path),
            Interface::Skf => {
                let backend = crate::skf::SkfBackend::load(path)?;
                Ok(Module {
                    info: backend.library_info(),
                    backend: Backend::Skf(backend),
                    path: path.to_owned(),
                    sm2_configured: None,
                })
            }
        }
    }

    /// Loads a module as discovery or the configuration found it.
    pub fn load_found(found: &crate::config::FoundModule) -> Result<Module> {
        Module::load_as(&found.path, found.kind)
    }

    /// The interface the library speaks.
    pub fn interface(&self) -> crate::config::Interface {
        match self.backend {
            Backend::Pkcs11 { .. } => crate::config::Interface::Pkcs11,
            Backend::Skf(_) => crate::config::Interface::Skf,
        }
    }

    /// The SKF side, when the library is an SKF library.
    pub fn skf(&self) -> Option<&crate::skf::SkfBackend> {
        match &self.backend {
            Backend::Skf(b) => Some(b),
            Backend::Pkcs11 { .. } => None,
        }
    }

    fn p11(&self) -> Result<(&Pkcs11, &RawInfo)> {
        match &self.backend {
            Backend::Pkcs11 { pkcs11, raw, .. } => Ok((pkcs11, raw)),
            Backend::Skf(_) => Err(Error::NotSupported {
                what: format!(
                    "{} is an SKF library, not a PKCS#11 module",
                    self.path.display()
                ),
            }),
        }
    }

    fn load_pkcs11(path: &Path) -> Result<Module> {
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
                // It is a PKCS#11 module, but what it drives is out of reach.
                Err(
                    e @ CkError::Pkcs11(
                        RvError::GeneralError | RvError::DeviceError | RvError::FunctionFailed,
                        _,
                    ),
                ) => {
                    let e = Error::from_cryptoki(e, None);
                    return Err(Error::ModuleServiceDown {
                        path: path.to_owned(),
                        reason: format!("C_Initialize failed: {e}"),
                    });
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
        let raw = match RawInfo::open(path) {
            Ok(r) => r,
            Err(e) => {
                if owns_init && let Err(fe) = pkcs11.finalize() {
                    tracing::debug!("C_Finalize after a failed C_GetFunctionList: {fe}");
                }
                return Err(invalid(format!("C_GetFunctionList: {e}")));
            }
        };
        tracing::debug!(module = %path.display(), ?info, "PKCS#11 module loaded");
        Ok(Module {
            backend: Backend::Pkcs11 {
                pkcs11,
                raw,
                owns_init,
            },
            path: path.to_owned(),
            info,
            sm2_configured: None,
        })
    }

    /// Takes the configuration's SM2 profile for this library (a `[[modules]]` entry
    /// with its path and an `sm2_profile` or `[modules.sm2]`). Fails on a profile name
    /// that no built-in has.
    pub fn use_config(&mut self, config: &crate::Config) -> Result<()> {
        self.sm2_configured =
            crate::gm::configured_for(config, &self.path).map_err(|reason| Error::Config {
                path: config
                    .sources
                    .iter()
                    .find(|(setting, _)| setting.starts_with("modules"))
                    .map(|(_, p)| p.clone())
                    .unwrap_or_else(|| PathBuf::from("config.toml")),
                reason,
            })?;
        Ok(())
    }

    /// The SM2 mechanism profile `token` is used through: the configured one, else a
    /// built-in claiming the library's file name or the token's manufacturer.
    pub fn sm2_profile(&self, token: &TokenSummary) -> Option<crate::gm::MechanismProfile> {
        self.sm2_configured
            .clone()
            .or_else(|| crate::gm::built_in_for(&self.path, &token.manufacturer))
    }

    /// C_GetMechanismList of a token's slot with vendor-defined mechanisms kept.
    pub(crate) fn mechanism_list(&self, token: &TokenSummary) -> cryptoki::error::Result<Vec<u64>> {
        let slot = token.slot().map_err(|_| {
            CkError::Pkcs11(
                RvError::SlotIdInvalid,
                cryptoki::context::Function::GetMechanismList,
            )
        })?;
        let Ok((_, raw)) = self.p11() else {
            return Ok(Vec::new());
        };
        match raw.mechanism_list(slot.into()) {
            Ok(list) => Ok(list),
            Err(rv) => cryptoki::error::Rv::from(rv)
                .into_result(cryptoki::context::Function::GetMechanismList)
                .map(|()| Vec::new()),
        }
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
    pub(crate) fn pkcs11(&self) -> Result<&Pkcs11> {
        self.p11().map(|(p, _)| p)
    }

    /// C_Finalize then C_Initialize: SoftHSM2 (and some vendor modules) only see tokens
    /// created or deleted by other processes after this. Takes `&mut self`, so no
    /// [`Session`] from this module can be open (see the module invariant).
    ///
    /// A library that another user in this process initialised is never finalised
    /// under it: then this is a no-op, and tokens made by other processes appear only
    /// if the module reports them by itself.
    pub fn reinitialize(&mut self) -> Result<()> {
        let Backend::Pkcs11 {
            pkcs11, owns_init, ..
        } = &self.backend
        else {
            // An SKF library lists devices as they come and go.
            return Ok(());
        };
        if !owns_init {
            tracing::debug!("module shared with another user in this process: not re-initialised");
            return Ok(());
        }
        // finalize() consumes a handle; the library stays loaded through `pkcs11`.
        if let Err(e) = pkcs11.clone().finalize() {
            tracing::debug!("C_Finalize before re-initialise: {e}");
        }
        pkcs11
            .initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
            .map_err(|e| Error::from_cryptoki(e, None))?;
        Ok(())
    }

    /// Every initialised token present in a slot. A slot whose token cannot be read is
    /// skipped with a warning (it is usually being removed); uninitialised tokens (blank
    /// cards, SoftHSM2's spare slot) are left out.
    pub fn tokens(&self) -> Result<Vec<TokenSummary>> {
        let pkcs11 = match &self.backend {
            Backend::Skf(b) => return b.tokens(),
            Backend::Pkcs11 { pkcs11, .. } => pkcs11,
        };
        let slots = pkcs11
            .get_slots_with_token()
            .map_err(|e| Error::from_cryptoki(e, None))?;
        let mut out: Vec<TokenSummary> = Vec::new();
        for slot in slots {
            match self.token_in(slot) {
                Ok(t) if t.flags.token_initialized => out.push(t),
                Ok(_) => {}
                Err(e) => tracing::warn!(slot = slot.id(), "skipping slot: {e}"),
            }
        }
        // Two keys present with one serial (a module that numbers every key alike):
        // neither serial identifies its key, so both ids carry the slot.
        let serials: Vec<String> = out.iter().map(|t| t.serial.clone()).collect();
        for t in &mut out {
            if !t.serial_is_shared() && serials.iter().filter(|s| **s == t.serial).count() > 1 {
                t.quirks.push(Quirk::new(
                    "serialNumber",
                    quirks::QuirkKind::SerialNotUnique,
                    t.serial.as_bytes(),
                ));
                t.qualify();
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
        let failed = |function, rv: cryptoki_sys::CK_RV| {
            let e = cryptoki::error::Rv::from(rv)
                .into_result(function)
                .err()
                .unwrap_or(CkError::Pkcs11(RvError::GeneralError, function));
            Error::from_cryptoki(e, Some(slot_name()))
        };
        let (_, raw) = self.p11()?;
        let slot_info = raw
            .slot_info(slot.id())
            .map_err(|rv| failed(cryptoki::context::Function::GetSlotInfo, rv))?;
        let info = raw
            .token_info(slot.id())
            .map_err(|rv| failed(cryptoki::context::Function::GetTokenInfo, rv))?;
        let token = TokenSummary::from_raw(slot, &slot_info, &info);
        for q in &token.quirks {
            tracing::debug!(slot = slot.id(), field = q.field, kind = ?q.kind, raw = %q.raw, "odd token info");
        }
        Ok(token)
    }

    /// Reads `token`'s info again (e.g. the PIN flags after a failed login). Fails with
    /// [`Error::TokenRemoved`] if another token, or none, is in its slot now.
    pub fn refresh(&self, token: &TokenSummary) -> Result<TokenSummary> {
        if let Backend::Skf(b) = &self.backend {
            return b.refresh(token);
        }
        let mut now = self
            .token_in(token.slot()?)
            .map_err(|e| removed_if_gone(e, token))?;
        if token.serial_is_shared() && !now.serial_is_shared() {
            // Seen alone, its serial looks unique; it is still the key of that slot.
            now.qualify();
        }
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
            .pkcs11()?
            .open_ro_session(token.slot()?)
            .map_err(|e| Error::from_cryptoki_on_token(e, token.name()))?;
        Ok(Session::new(self, s, token.clone()))
    }

    /// Opens a read-write session with `token` (for writing certificates and keys).
    pub fn open_rw_session(&self, token: &TokenSummary) -> Result<Session<'_>> {
        let s = self
            .pkcs11()?
            .open_rw_session(token.slot()?)
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

/// What the library at `path` exports: PKCS#11 when it has `C_GetFunctionList` (or
/// cannot be opened: loading it as PKCS#11 reports why), else SKF when it has
/// `SKF_EnumDev`.
#[allow(unsafe_code)]
fn detect_interface(path: &Path) -> crate::config::Interface {
    use crate::config::Interface;
    // SAFETY: opening the library the caller names, to be loaded anyway; only symbol
    // addresses are looked up, nothing is called.
    let Ok(lib) = (unsafe { libloading::Library::new(path) }) else {
        return Interface::Pkcs11;
    };
    // SAFETY: looking symbols up by name; the pointers are not used.
    let has = |name: &[u8]| unsafe { lib.get::<*const ()>(name) }.is_ok();
    if !has(b"C_GetFunctionList\0") && has(b"SKF_EnumDev\0") {
        Interface::Skf
    } else {
        Interface::Pkcs11
    }
}

impl Drop for Module {
    fn drop(&mut self) {
        let Backend::Pkcs11 {
            pkcs11, owns_init, ..
        } = &self.backend
        else {
            return;
        };
        if !owns_init {
            return;
        }
        if let Err(e) = pkcs11.clone().finalize() {
            tracing::debug!("C_Finalize on drop: {e}");
        }
    }
}
