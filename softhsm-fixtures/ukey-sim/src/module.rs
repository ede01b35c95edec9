//! The PKCS#11 module: `C_GetFunctionList` and a function list that forwards every call
//! to SoftHSM2, adding the behaviour of a USB key.
//!
//! What the application sees:
//! - **Slots.** One slot per initialised SoftHSM2 token, with SoftHSM2's slot id, which
//!   SoftHSM2 derives from the token serial: a key keeps its slot across plug-ins,
//!   `C_Finalize`/`C_Initialize` and processes, as a key in a fixed USB reader does.
//!   SoftHSM2's free "uninitialised token" slot is hidden (a UKey middleware has no
//!   such slot, and a watcher would see a token that is always present).
//!   `C_GetSlotList(FALSE)` lists every slot, `C_GetSlotList(TRUE)` the plugged ones.
//! - **Pulled out.** `C_GetSlotInfo` clears CKF_TOKEN_PRESENT; `C_GetTokenInfo`,
//!   `C_OpenSession` and the other slot calls return CKR_TOKEN_NOT_PRESENT; calls on the
//!   token's sessions return CKR_DEVICE_REMOVED, and the SoftHSM2 sessions behind them
//!   are closed (which logs the token out, as pulling a key does).
//! - **Plugged back in.** The same token is back; sessions opened before it was pulled
//!   stay dead and return CKR_SESSION_HANDLE_INVALID.
//! - **A new key.** SoftHSM2 never shows a token created after its C_Initialize. When a
//!   controller plugs in a serial the shim does not know (`ukey-sim plug SERIAL` after
//!   creating the token), the shim re-initialises SoftHSM2 at the next C_GetSlotList or
//!   C_WaitForSlotEvent poll, as soon as no session is open (re-initialising would kill
//!   them), and reports the new slot as an event. Creating a token alone does not make
//!   it appear: a half-written token (certificate not yet on it) is never shown.
//! - **Events.** `C_WaitForSlotEvent` reports a slot whose token was plugged or pulled
//!   since the application last heard of it; it blocks (polling the state every 20 ms)
//!   unless CKF_DONT_BLOCK is given, and `C_Finalize` wakes it with
//!   CKR_CRYPTOKI_NOT_INITIALIZED.
//! - **PIN.** A retry counter kept in the state directory (so it survives pulling the
//!   key and reloading the module): CKF_USER_PIN_COUNT_LOW after a wrong PIN,
//!   CKF_USER_PIN_FINAL_TRY when one try is left, CKF_USER_PIN_LOCKED when none is.
//!   The wrong PIN that uses the last try returns CKR_PIN_INCORRECT (as smart cards
//!   answer "0 tries left"); every later C_Login (and C_SetPIN) of the user returns
//!   CKR_PIN_LOCKED without reaching SoftHSM2, even with the right PIN. A good login
//!   resets the counter, so does the SO's C_InitPIN.
//! - **Faults and latency** as configured per token and function (see [`crate::state`]),
//!   and a chip's own time per operation from a latency profile (see [`crate::profile`]).
//!
//! Session handles are the shim's own (SoftHSM2's are mapped), so a dead session's
//! handle is never reused for a new SoftHSM2 session. Object handles pass through.

#![allow(non_snake_case)] // PKCS#11 names: C_Initialize, pInitArgs, ...

use std::cell::Cell;
use std::collections::{HashMap, VecDeque};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::PathBuf;
use std::ptr;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, PoisonError, RwLock};
use std::time::{Duration, Instant};

use cryptoki_sys::*;

use crate::names::{rv_from_name, rv_name};
use crate::state::{FaultAction, FaultTiming, SimState, StateFile};

/// How often a blocked C_WaitForSlotEvent or a delayed call looks at the state.
const POLL: Duration = Duration::from_millis(20);

/// Text patched into C_GetInfo and C_GetSlotInfo, so a diagnosis shows the shim. The
/// manufacturer is not "SoftHSM": clients that special-case SoftHSM2 (no slot events,
/// re-initialise to see new tokens) must treat the shim like a vendor module.
const MANUFACTURER: &str = "ukey-sim";
const LIBRARY_DESCRIPTION: &str = "ukey-sim over SoftHSM2";
const SLOT_DESCRIPTION: &str = "ukey-sim USB key reader";

/// Calls a SoftHSM2 function from the backend's list, or CKR_FUNCTION_NOT_SUPPORTED
/// when SoftHSM2 left it out.
macro_rules! backend {
    ($backend:expr, $function:ident ( $($arg:expr),* $(,)? )) => {
        match $backend.list.$function {
            // SAFETY: the pointer comes from SoftHSM2's own function list, which stays
            // valid while the library is loaded (for the life of the process). The
            // arguments are either our own valid locals or the pointers our caller
            // passed to the same function under the same PKCS#11 contract.
            Some(function) => unsafe { function($($arg),*) },
            None => CKR_FUNCTION_NOT_SUPPORTED,
        }
    };
}

mod sm2;

/// SoftHSM2, loaded once for the life of the process.
struct Backend {
    list: CK_FUNCTION_LIST,
    path: PathBuf,
    _library: libloading::Library,
}

static BACKEND: OnceLock<Result<Backend, String>> = OnceLock::new();

fn load_backend() -> Result<&'static Backend, String> {
    BACKEND
        .get_or_init(|| {
            let path = crate::softhsm_module().map_err(|e| e.to_string())?;
            // SAFETY: loading runs the library's initialisers; SoftHSM2 is a PKCS#11
            // module made to be dlopen()ed by applications, which is what this is.
            let library = unsafe { libloading::Library::new(&path) }
                .map_err(|e| format!("cannot load {}: {e}", path.display()))?;
            type GetFunctionList = unsafe extern "C" fn(CK_FUNCTION_LIST_PTR_PTR) -> CK_RV;
            // SAFETY: every PKCS#11 module exports C_GetFunctionList with this signature
            // (PKCS#11 2.40 section 5.2).
            let get: libloading::Symbol<GetFunctionList> =
                unsafe { library.get(b"C_GetFunctionList\0") }
                    .map_err(|e| format!("{}: {e}", path.display()))?;
            let mut list: CK_FUNCTION_LIST_PTR = ptr::null_mut();
            // SAFETY: `list` is a valid out-pointer for one pointer.
            let rv = unsafe { get(&mut list) };
            if rv != CKR_OK || list.is_null() {
                return Err(format!(
                    "{}: C_GetFunctionList returned {}",
                    path.display(),
                    rv_name(rv)
                ));
            }
            // SAFETY: SoftHSM2 returned a non-null pointer to its static function list,
            // valid while the library stays loaded; we copy it and keep the library.
            let list = unsafe { *list };
            Ok(Backend {
                list,
                path,
                _library: library,
            })
        })
        .as_ref()
        .map_err(Clone::clone)
}

/// Which chip time a call takes (see [`crate::profile`]).
#[derive(Debug, Clone, Copy)]
enum Chip {
    /// The function's.
    Function,
    /// The mechanism's for this function, else the function's (RSA key pairs take
    /// seconds, EC ones a fraction of that).
    Mechanism(CK_MECHANISM_TYPE),
    /// None: the middleware answers without the chip (a length query).
    NotUsed,
}

/// Every call into SoftHSM2 holds this shared; re-initialising SoftHSM2 to see a new
/// token holds it exclusively (and only tries: a call delayed by simulated latency
/// postpones the re-scan instead of blocking the discovery call).
static GATE: RwLock<()> = RwLock::new(());

/// The initialised module (between C_Initialize and C_Finalize).
static SHIM: RwLock<Option<Arc<Shim>>> = RwLock::new(None);

fn shim() -> Result<Arc<Shim>, CK_RV> {
    SHIM.read()
        .unwrap_or_else(PoisonError::into_inner)
        .clone()
        .ok_or(CKR_CRYPTOKI_NOT_INITIALIZED)
}

fn trace_enabled() -> bool {
    static TRACE: OnceLock<bool> = OnceLock::new();
    *TRACE.get_or_init(|| std::env::var_os("UKEY_SIM_TRACE").is_some_and(|v| v != "0"))
}

/// Problems the user of the simulator must see (bad state file, SoftHSM2 missing).
fn warn(message: &str) {
    eprintln!("ukey-sim: {message}");
}

/// Runs an entry point: a panic becomes CKR_GENERAL_ERROR instead of unwinding into C.
fn entry(name: &'static str, body: impl FnOnce() -> Result<CK_RV, CK_RV>) -> CK_RV {
    let _gate = GATE.read().unwrap_or_else(PoisonError::into_inner);
    ungated_entry(name, body)
}

/// [`entry`] for the discovery calls: first re-scans SoftHSM2's tokens if a new serial
/// was plugged in.
fn discovery_entry(name: &'static str, body: impl FnOnce() -> Result<CK_RV, CK_RV>) -> CK_RV {
    if let Ok(shim) = shim() {
        shim.rescan_if_pending();
    }
    entry(name, body)
}

/// [`entry`] without the gate, for C_WaitForSlotEvent, which must not hold it while
/// it sleeps.
fn ungated_entry(name: &'static str, body: impl FnOnce() -> Result<CK_RV, CK_RV>) -> CK_RV {
    let rv = match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(rv) | Err(rv)) => rv,
        Err(_) => {
            warn(&format!("{name} panicked"));
            CKR_GENERAL_ERROR
        }
    };
    if trace_enabled() {
        eprintln!("ukey-sim: {name} -> {}", rv_name(rv));
    }
    rv
}

fn ok_or(rv: CK_RV) -> Result<CK_RV, CK_RV> {
    if rv == CKR_OK { Ok(rv) } else { Err(rv) }
}

fn trimmed(field: &[u8]) -> String {
    String::from_utf8_lossy(field)
        .trim_end_matches([' ', '\0'])
        .to_owned()
}

fn pad(field: &mut [u8], text: &str) {
    field.fill(b' ');
    let n = text.len().min(field.len());
    field[..n].copy_from_slice(&text.as_bytes()[..n]);
}

struct SlotEntry {
    id: CK_SLOT_ID,
    serial: String,
}

struct SessionEntry {
    slot: CK_SLOT_ID,
    serial: String,
    /// SoftHSM2's session, until it is closed because the token was pulled.
    backend: Option<CK_SESSION_HANDLE>,
    /// The token's event count when the session was opened: a later plug or pull
    /// event kills the session.
    events_at_open: u64,
    /// Calls running on it now; its SoftHSM2 session is closed only when idle.
    in_flight: u32,
    /// Its GM operation and SM4 keys (a GM key's session state).
    gm: sm2::GmSession,
}

fn session_dead(state: &SimState, session: &SessionEntry) -> bool {
    session.backend.is_none()
        || !state.plugged(&session.serial)
        || state.events(&session.serial) != session.events_at_open
}

/// What a dead session answers: removed while the token is out, gone once it is back.
fn dead_session_rv(state: &SimState, serial: &str) -> CK_RV {
    if state.plugged(serial) {
        CKR_SESSION_HANDLE_INVALID
    } else {
        CKR_DEVICE_REMOVED
    }
}

struct Inner {
    file: StateFile,
    bytes: Vec<u8>,
    state: SimState,
    slots: Vec<SlotEntry>,
    sessions: HashMap<CK_SESSION_HANDLE, SessionEntry>,
    next_session: CK_SESSION_HANDLE,
    /// Token event counts the application has been told about by C_WaitForSlotEvent.
    /// A slot whose serial is missing here appeared by a re-scan: its event is due.
    seen_events: HashMap<String, u64>,
    /// Slots that disappeared in a re-scan (token deleted), to report as events.
    vanished: VecDeque<CK_SLOT_ID>,
    /// A serial unknown to SoftHSM2's slot list was plugged in: re-scan when possible.
    rescan_pending: bool,
    /// Unknown serials already re-scanned for, with their event count then: a serial
    /// that SoftHSM2 still does not have is tried again only after a new plug event.
    rescanned: HashMap<String, u64>,
}

impl Inner {
    /// Re-reads the state file if it changed, and closes the SoftHSM2 sessions of
    /// tokens that were pulled out.
    fn refresh(&mut self, backend: &Backend) {
        let bytes = match self.file.read_bytes() {
            Ok(bytes) => bytes,
            Err(e) => {
                warn(&format!("{e}; keeping the last state"));
                return;
            }
        };
        if bytes == self.bytes {
            return;
        }
        match self.file.parse(&bytes) {
            Ok(state) => {
                self.state = state;
                self.bytes = bytes;
            }
            Err(e) => {
                warn(&format!("{e}; keeping the last state"));
                self.bytes = bytes;
                return;
            }
        }
        self.rescan_pending |= !self.unknown_plugged().is_empty();
        for session in self.sessions.values_mut() {
            if session.in_flight == 0
                && session_dead(&self.state, session)
                && let Some(handle) = session.backend.take()
            {
                backend!(backend, C_CloseSession(handle));
            }
        }
    }

    /// Plugged serials that SoftHSM2's slot list lacks and that were not re-scanned for
    /// since their last plug event.
    fn unknown_plugged(&self) -> Vec<(String, u64)> {
        self.state
            .tokens
            .iter()
            .filter(|(serial, t)| {
                t.plugged
                    && !self.slots.iter().any(|s| &s.serial == *serial)
                    && self.rescanned.get(*serial) != Some(&t.events)
            })
            .map(|(serial, t)| (serial.clone(), t.events))
            .collect()
    }

    fn slot(&self, id: CK_SLOT_ID) -> Result<&SlotEntry, CK_RV> {
        self.slots
            .iter()
            .find(|s| s.id == id)
            .ok_or(CKR_SLOT_ID_INVALID)
    }
}

/// The application's C_Initialize arguments, kept to re-initialise SoftHSM2 alike.
#[derive(Clone, Copy)]
struct InitArgs {
    create_mutex: CK_CREATEMUTEX,
    destroy_mutex: CK_DESTROYMUTEX,
    lock_mutex: CK_LOCKMUTEX,
    unlock_mutex: CK_UNLOCKMUTEX,
    flags: CK_FLAGS,
}

impl InitArgs {
    /// Copies the arguments (pReserved must be NULL per PKCS#11 and is not kept).
    ///
    /// # Safety
    /// `args` must be null or point to a CK_C_INITIALIZE_ARGS.
    unsafe fn copy(args: CK_VOID_PTR) -> Option<InitArgs> {
        let args = args.cast::<CK_C_INITIALIZE_ARGS>();
        // SAFETY: per this function's contract, non-null `args` points to a
        // CK_C_INITIALIZE_ARGS (C_Initialize's contract with its caller).
        let args = unsafe { args.as_ref() }?;
        Some(InitArgs {
            create_mutex: args.CreateMutex,
            destroy_mutex: args.DestroyMutex,
            lock_mutex: args.LockMutex,
            unlock_mutex: args.UnlockMutex,
            flags: args.flags,
        })
    }

    fn to_c(self) -> CK_C_INITIALIZE_ARGS {
        CK_C_INITIALIZE_ARGS {
            CreateMutex: self.create_mutex,
            DestroyMutex: self.destroy_mutex,
            LockMutex: self.lock_mutex,
            UnlockMutex: self.unlock_mutex,
            flags: self.flags,
            pReserved: ptr::null_mut(),
        }
    }
}

/// Lists SoftHSM2's initialised tokens: (slot, serial, label).
fn list_tokens(backend: &Backend) -> Result<Vec<(CK_SLOT_ID, String, String)>, CK_RV> {
    let mut count: CK_ULONG = 0;
    ok_or(backend!(
        backend,
        C_GetSlotList(CK_FALSE, ptr::null_mut(), &mut count)
    ))?;
    let mut ids: Vec<CK_SLOT_ID> = vec![0; count as usize];
    ok_or(backend!(
        backend,
        C_GetSlotList(CK_FALSE, ids.as_mut_ptr(), &mut count)
    ))?;
    ids.truncate(count as usize);
    let mut tokens = Vec::new();
    for id in ids {
        let mut info = CK_TOKEN_INFO::default();
        if backend!(backend, C_GetTokenInfo(id, &mut info)) != CKR_OK
            || info.flags & CKF_TOKEN_INITIALIZED == 0
        {
            continue;
        }
        tokens.push((id, trimmed(&info.serialNumber), trimmed(&info.label)));
    }
    Ok(tokens)
}

/// Records token labels in the state, so `ukey-sim status` can list tokens by label.
fn record_labels(file: &StateFile, tokens: &[(CK_SLOT_ID, String, String)]) -> Result<(), CK_RV> {
    let known = file.read().map_err(|e| {
        warn(&e.to_string());
        CKR_GENERAL_ERROR
    })?;
    let news = tokens.iter().any(|(_, serial, label)| {
        known.token(serial).and_then(|t| t.label.as_ref()) != Some(label)
    });
    if news {
        file.update(|state| {
            for (_, serial, label) in tokens {
                state.token_mut(serial).label = Some(label.clone());
            }
        })
        .map_err(|e| {
            warn(&e.to_string());
            CKR_GENERAL_ERROR
        })?;
    }
    Ok(())
}

struct Shim {
    backend: &'static Backend,
    init_args: Option<InitArgs>,
    file: StateFile,
    inner: Mutex<Inner>,
    finalized: Mutex<bool>,
    wake: Condvar,
}

/// The session a call runs on, held "in flight" until dropped.
struct SessionCall<'a> {
    shim: &'a Shim,
    handle: CK_SESSION_HANDLE,
    backend: CK_SESSION_HANDLE,
    slot: CK_SLOT_ID,
    serial: String,
}

impl Drop for SessionCall<'_> {
    fn drop(&mut self) {
        let mut inner = self.shim.lock();
        let Inner {
            sessions, state, ..
        } = &mut *inner;
        if let Some(session) = sessions.get_mut(&self.handle) {
            session.in_flight = session.in_flight.saturating_sub(1);
            if session.in_flight == 0
                && session_dead(state, session)
                && let Some(handle) = session.backend.take()
            {
                backend!(self.shim.backend, C_CloseSession(handle));
            }
        }
    }
}

impl Shim {
    /// Lists SoftHSM2's initialised tokens and reads the state.
    fn start(backend: &'static Backend, init_args: Option<InitArgs>) -> Result<Shim, CK_RV> {
        let file = StateFile::new(crate::default_state_dir());
        let tokens = list_tokens(backend)?;
        record_labels(&file, &tokens)?;
        let slots: Vec<SlotEntry> = tokens
            .into_iter()
            .map(|(id, serial, _)| SlotEntry { id, serial })
            .collect();
        let bytes = file.read_bytes().map_err(|e| {
            warn(&e.to_string());
            CKR_GENERAL_ERROR
        })?;
        let state = file.parse(&bytes).map_err(|e| {
            warn(&e.to_string());
            CKR_GENERAL_ERROR
        })?;
        let seen_events = slots
            .iter()
            .map(|s| (s.serial.clone(), state.events(&s.serial)))
            .collect();
        // SoftHSM2 was just initialised: serials it lacks now need no re-scan until
        // they are plugged in again.
        let rescanned = state
            .tokens
            .iter()
            .filter(|(serial, _)| !slots.iter().any(|s| &s.serial == *serial))
            .map(|(serial, t)| (serial.clone(), t.events))
            .collect();
        Ok(Shim {
            backend,
            init_args,
            file: file.clone(),
            inner: Mutex::new(Inner {
                file,
                bytes,
                state,
                slots,
                sessions: HashMap::new(),
                next_session: 1,
                seen_events,
                vanished: VecDeque::new(),
                rescan_pending: false,
                rescanned,
            }),
            finalized: Mutex::new(false),
            wake: Condvar::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn refreshed(&self) -> MutexGuard<'_, Inner> {
        let mut inner = self.lock();
        inner.refresh(self.backend);
        inner
    }

    fn is_finalized(&self) -> bool {
        *self
            .finalized
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Re-initialises SoftHSM2 to see tokens created since, if a serial it does not
    /// know was plugged in and no session is open. Never blocks on other calls.
    fn rescan_if_pending(&self) {
        if !self.lock().rescan_pending {
            return;
        }
        let Ok(_gate) = GATE.try_write() else {
            return; // another call is in SoftHSM2 now; the next poll retries
        };
        let mut inner = self.refreshed();
        if !inner.rescan_pending || inner.sessions.values().any(|s| s.backend.is_some()) {
            return;
        }
        inner.rescan_pending = false;
        let unknown = inner.unknown_plugged();
        inner.rescanned.extend(unknown);
        backend!(self.backend, C_Finalize(ptr::null_mut()));
        let mut args = self.init_args.map(InitArgs::to_c);
        let args_ptr = args
            .as_mut()
            .map_or(ptr::null_mut(), |a| ptr::from_mut(a).cast());
        let rv = backend!(self.backend, C_Initialize(args_ptr));
        if rv != CKR_OK {
            warn(&format!("re-initialising SoftHSM2 failed: {}", rv_name(rv)));
            return;
        }
        let tokens = match list_tokens(self.backend) {
            Ok(tokens) => tokens,
            Err(rv) => {
                warn(&format!("listing SoftHSM2's slots failed: {}", rv_name(rv)));
                return;
            }
        };
        let _ = record_labels(&self.file, &tokens);
        let Inner {
            slots, vanished, ..
        } = &mut *inner;
        for old in slots.iter() {
            if !tokens.iter().any(|(_, serial, _)| *serial == old.serial) {
                vanished.push_back(old.id);
            }
        }
        *slots = tokens
            .into_iter()
            .map(|(id, serial, _)| SlotEntry { id, serial })
            .collect();
    }

    /// The serial and event count of the token in a slot, if it is plugged in.
    fn plugged_slot(&self, slot: CK_SLOT_ID) -> Result<(String, u64), CK_RV> {
        let inner = self.refreshed();
        let serial = inner.slot(slot)?.serial.clone();
        if !inner.state.plugged(&serial) {
            return Err(CKR_TOKEN_NOT_PRESENT);
        }
        let events = inner.state.events(&serial);
        Ok((serial, events))
    }

    /// Starts a call on a live session.
    fn session(&self, handle: CK_SESSION_HANDLE) -> Result<SessionCall<'_>, CK_RV> {
        let mut inner = self.refreshed();
        let Inner {
            sessions, state, ..
        } = &mut *inner;
        let session = sessions
            .get_mut(&handle)
            .ok_or(CKR_SESSION_HANDLE_INVALID)?;
        if session_dead(state, session) {
            return Err(dead_session_rv(state, &session.serial));
        }
        let backend = session.backend.ok_or(CKR_SESSION_HANDLE_INVALID)?;
        session.in_flight += 1;
        Ok(SessionCall {
            shim: self,
            handle,
            backend,
            slot: session.slot,
            serial: session.serial.clone(),
        })
    }

    /// Runs `call` on the token `serial` with its faults, latency and chip time.
    fn run(&self, name: &'static str, serial: &str, call: impl FnOnce() -> CK_RV) -> CK_RV {
        self.run_with(name, Chip::Function, serial, call)
    }

    /// [`Shim::run`], with the chip time chosen by `chip`.
    fn run_with(
        &self,
        name: &'static str,
        chip: Chip,
        serial: &str,
        call: impl FnOnce() -> CK_RV,
    ) -> CK_RV {
        let started = Instant::now();
        let (before, after, latency, chip_time, events) = {
            let inner = self.lock();
            let events = inner.state.events(serial);
            match inner.state.token(serial) {
                Some(t) => (
                    t.has_fault(name, FaultTiming::Before),
                    t.has_fault(name, FaultTiming::After),
                    t.latency(name),
                    match chip {
                        Chip::Function => t.chip_time(name, None),
                        Chip::Mechanism(m) => t.chip_time(name, Some(m)),
                        Chip::NotUsed => None,
                    },
                    events,
                ),
                None => (false, false, None, None, events),
            }
        };
        if before && let Some(rv) = self.fire(name, serial, FaultTiming::Before) {
            return rv;
        }
        if let Some(delay) = latency
            && let Err(rv) = self.delay(serial, events, delay)
        {
            return rv;
        }
        let rv = call();
        // The chip's time: SoftHSM2's own work ran inside it. What the call did stays
        // done if the key is pulled now, as on a card that committed before the reader
        // lost it.
        if let Some(chip) = chip_time
            && let Err(removed) = self.delay(serial, events, chip.saturating_sub(started.elapsed()))
        {
            return removed;
        }
        if after && let Some(fault) = self.fire(name, serial, FaultTiming::After) {
            return fault;
        }
        rv
    }

    /// Counts a call against the token's faults; the return value of one that fires.
    fn fire(&self, name: &str, serial: &str, timing: FaultTiming) -> Option<CK_RV> {
        match self
            .file
            .update(|state| state.token_mut(serial).count_call(name, timing))
        {
            Ok(None) => None,
            Ok(Some(FaultAction::Fail { rv })) => {
                Some(rv_from_name(&rv).unwrap_or(CKR_GENERAL_ERROR))
            }
            Ok(Some(FaultAction::Unplug)) => {
                // Let every session of the token see it at once.
                drop(self.refreshed());
                Some(CKR_DEVICE_REMOVED)
            }
            Err(e) => {
                warn(&format!("cannot count a fault: {e}"));
                Some(CKR_GENERAL_ERROR)
            }
        }
    }

    /// Sleeps like a slow key; fails as removed if the key is pulled meanwhile.
    fn delay(&self, serial: &str, events: u64, delay: Duration) -> Result<(), CK_RV> {
        let end = Instant::now() + delay;
        loop {
            let now = Instant::now();
            if now >= end {
                return Ok(());
            }
            std::thread::sleep(POLL.min(end - now));
            if self.is_finalized() {
                return Err(CKR_CRYPTOKI_NOT_INITIALIZED);
            }
            let inner = self.refreshed();
            if !inner.state.plugged(serial) || inner.state.events(serial) != events {
                return Err(CKR_DEVICE_REMOVED);
            }
        }
    }

    /// A user PIN failure or success, kept in the state file.
    fn record_pin(&self, serial: &str, rv: CK_RV) {
        let result = match rv {
            CKR_PIN_INCORRECT => self.file.update(|state| {
                let pin = &mut state.token_mut(serial).pin;
                pin.failures = (pin.failures + 1).min(pin.max_tries);
            }),
            CKR_OK => self.reset_pin(serial),
            _ => Ok(()),
        };
        if let Err(e) = result {
            warn(&format!("cannot record the PIN retry counter: {e}"));
        }
    }

    fn reset_pin(&self, serial: &str) -> Result<(), crate::SimError> {
        let failures = self
            .lock()
            .state
            .token(serial)
            .map_or(0, |t| t.pin.failures);
        if failures == 0 {
            // Nothing to reset: a good login writes nothing.
            return Ok(());
        }
        self.file
            .update(|state| state.token_mut(serial).pin.failures = 0)
    }

    fn pin_locked(&self, serial: &str) -> bool {
        self.refreshed()
            .state
            .token(serial)
            .is_some_and(|t| t.pin.locked())
    }
}

// ---------------------------------------------------------------------------------
// General purpose functions

unsafe extern "C" fn C_Initialize(pInitArgs: CK_VOID_PTR) -> CK_RV {
    entry("C_Initialize", || {
        let mut slot = SHIM.write().unwrap_or_else(PoisonError::into_inner);
        if slot.is_some() {
            return Err(CKR_CRYPTOKI_ALREADY_INITIALIZED);
        }
        let backend = load_backend().map_err(|e| {
            warn(&e);
            CKR_GENERAL_ERROR
        })?;
        // SoftHSM2 checks the arguments (locking flags and callbacks) itself.
        ok_or(backend!(backend, C_Initialize(pInitArgs)))?;
        // SAFETY: SoftHSM2 accepted pInitArgs, so it is null or a CK_C_INITIALIZE_ARGS.
        let init_args = unsafe { InitArgs::copy(pInitArgs) };
        match Shim::start(backend, init_args) {
            Ok(shim) => {
                *slot = Some(Arc::new(shim));
                Ok(CKR_OK)
            }
            Err(rv) => {
                backend!(backend, C_Finalize(ptr::null_mut()));
                Err(rv)
            }
        }
    })
}

unsafe extern "C" fn C_Finalize(pReserved: CK_VOID_PTR) -> CK_RV {
    entry("C_Finalize", || {
        if !pReserved.is_null() {
            return Err(CKR_ARGUMENTS_BAD);
        }
        let shim = SHIM
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
            .ok_or(CKR_CRYPTOKI_NOT_INITIALIZED)?;
        *shim
            .finalized
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = true;
        shim.wake.notify_all();
        Ok(backend!(shim.backend, C_Finalize(ptr::null_mut())))
    })
}

unsafe extern "C" fn C_GetInfo(pInfo: CK_INFO_PTR) -> CK_RV {
    entry("C_GetInfo", || {
        let shim = shim()?;
        if pInfo.is_null() {
            return Err(CKR_ARGUMENTS_BAD);
        }
        ok_or(backend!(shim.backend, C_GetInfo(pInfo)))?;
        // SAFETY: pInfo is non-null and, per C_GetInfo's contract, points to a
        // CK_INFO that SoftHSM2 just filled.
        let info = unsafe { &mut *pInfo };
        pad(&mut info.manufacturerID, MANUFACTURER);
        pad(&mut info.libraryDescription, LIBRARY_DESCRIPTION);
        Ok(CKR_OK)
    })
}

/// The PKCS#11 entry point: hands out the shim's function list.
///
/// # Safety
/// `ppFunctionList` must be null or valid for writing one pointer (PKCS#11 5.2).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn C_GetFunctionList(ppFunctionList: CK_FUNCTION_LIST_PTR_PTR) -> CK_RV {
    if ppFunctionList.is_null() {
        return CKR_ARGUMENTS_BAD;
    }
    // SAFETY: non-null, and the caller provides room for one pointer. The list is a
    // static that callers only read, as PKCS#11 requires; the cast to *mut is the C
    // API's type, not a licence to write.
    unsafe { *ppFunctionList = ptr::from_ref(&FUNCTION_LIST).cast_mut() };
    CKR_OK
}

// ---------------------------------------------------------------------------------
// Slot and token management

/// Writes a list with PKCS#11's two-call convention (size query, then fill).
///
/// # Safety
/// `count` must be valid for reads and writes; `list` null or valid for writing
/// `*count` items.
unsafe fn write_list<T: Copy>(list: *mut T, count: *mut CK_ULONG, items: &[T]) -> CK_RV {
    let n = items.len() as CK_ULONG;
    // SAFETY: the caller guarantees `count` and `list` per this function's contract,
    // and we write at most `*count` items into `list`.
    unsafe {
        if list.is_null() {
            *count = n;
            return CKR_OK;
        }
        if *count < n {
            *count = n;
            return CKR_BUFFER_TOO_SMALL;
        }
        ptr::copy_nonoverlapping(items.as_ptr(), list, items.len());
        *count = n;
    }
    CKR_OK
}

unsafe extern "C" fn C_GetSlotList(
    tokenPresent: CK_BBOOL,
    pSlotList: CK_SLOT_ID_PTR,
    pulCount: CK_ULONG_PTR,
) -> CK_RV {
    discovery_entry("C_GetSlotList", || {
        let shim = shim()?;
        if pulCount.is_null() {
            return Err(CKR_ARGUMENTS_BAD);
        }
        let ids: Vec<CK_SLOT_ID> = {
            let inner = shim.refreshed();
            inner
                .slots
                .iter()
                .filter(|s| tokenPresent == CK_FALSE || inner.state.plugged(&s.serial))
                .map(|s| s.id)
                .collect()
        };
        // SAFETY: pulCount is non-null; pSlotList is null or holds *pulCount slots,
        // per C_GetSlotList's contract with our caller.
        Ok(unsafe { write_list(pSlotList, pulCount, &ids) })
    })
}

unsafe extern "C" fn C_GetSlotInfo(slotID: CK_SLOT_ID, pInfo: CK_SLOT_INFO_PTR) -> CK_RV {
    entry("C_GetSlotInfo", || {
        let shim = shim()?;
        if pInfo.is_null() {
            return Err(CKR_ARGUMENTS_BAD);
        }
        let (serial, present) = {
            let inner = shim.refreshed();
            let serial = inner.slot(slotID)?.serial.clone();
            let present = inner.state.plugged(&serial);
            (serial, present)
        };
        let rv = shim.run("C_GetSlotInfo", &serial, || {
            backend!(shim.backend, C_GetSlotInfo(slotID, pInfo))
        });
        ok_or(rv)?;
        // SAFETY: pInfo is non-null and points to the CK_SLOT_INFO SoftHSM2 filled.
        let info = unsafe { &mut *pInfo };
        pad(&mut info.slotDescription, SLOT_DESCRIPTION);
        info.flags = (info.flags & !CKF_TOKEN_PRESENT) | CKF_REMOVABLE_DEVICE | CKF_HW_SLOT;
        if present {
            info.flags |= CKF_TOKEN_PRESENT;
        }
        Ok(CKR_OK)
    })
}

/// Replaces the fields of `info` the override names, as a vendor module fills them.
fn apply_token_info(info: &mut CK_TOKEN_INFO, odd: &crate::state::TokenInfoOverride) {
    let pad = odd.pad.unwrap_or(b' ');
    let put = |field: &mut [u8], hex_value: &Option<String>| {
        if let Some(bytes) = hex_value.as_deref().and_then(|h| hex::decode(h).ok()) {
            field.fill(pad);
            let n = bytes.len().min(field.len());
            field[..n].copy_from_slice(&bytes[..n]);
        }
    };
    put(&mut info.label, &odd.label_hex);
    put(&mut info.manufacturerID, &odd.manufacturer_hex);
    put(&mut info.model, &odd.model_hex);
    put(&mut info.serialNumber, &odd.serial_hex);
    if let Some(t) = &odd.utc_time {
        info.utcTime.fill(b' ');
        let n = t.len().min(16);
        info.utcTime[..n].copy_from_slice(&t.as_bytes()[..n]);
        info.flags |= CKF_CLOCK_ON_TOKEN;
    }
    if let Some((major, minor)) = odd.hardware_version {
        info.hardwareVersion = CK_VERSION { major, minor };
    }
    if let Some((major, minor)) = odd.firmware_version {
        info.firmwareVersion = CK_VERSION { major, minor };
    }
    if odd.counters_unavailable {
        for c in [
            &mut info.ulMaxSessionCount,
            &mut info.ulSessionCount,
            &mut info.ulMaxRwSessionCount,
            &mut info.ulRwSessionCount,
            &mut info.ulTotalPublicMemory,
            &mut info.ulFreePublicMemory,
            &mut info.ulTotalPrivateMemory,
            &mut info.ulFreePrivateMemory,
        ] {
            *c = CK_UNAVAILABLE_INFORMATION;
        }
    }
    if odd.counters_nonsense {
        info.ulTotalPublicMemory = 1024;
        info.ulFreePublicMemory = 1 << 40;
    }
}

unsafe extern "C" fn C_GetTokenInfo(slotID: CK_SLOT_ID, pInfo: CK_TOKEN_INFO_PTR) -> CK_RV {
    entry("C_GetTokenInfo", || {
        let shim = shim()?;
        if pInfo.is_null() {
            return Err(CKR_ARGUMENTS_BAD);
        }
        let (serial, _) = shim.plugged_slot(slotID)?;
        let rv = shim.run("C_GetTokenInfo", &serial, || {
            backend!(shim.backend, C_GetTokenInfo(slotID, pInfo))
        });
        ok_or(rv)?;
        let (pin_flags, odd) = {
            let shim_state = shim.lock();
            let token = shim_state.state.token(&serial);
            (
                token.map_or(0, |t| t.pin.flags()),
                token.map(|t| t.token_info.clone()).unwrap_or_default(),
            )
        };
        // SAFETY: pInfo is non-null and points to the CK_TOKEN_INFO SoftHSM2 filled.
        let info = unsafe { &mut *pInfo };
        // SoftHSM2 sets COUNT_LOW on its own; the simulated counter decides instead.
        info.flags &= !(CKF_USER_PIN_COUNT_LOW | CKF_USER_PIN_FINAL_TRY | CKF_USER_PIN_LOCKED);
        info.flags |= pin_flags;
        // A GM key's module names its vendor (an override still wins).
        if let Some(p) = shim.gm_profile(&serial) {
            pad(&mut info.manufacturerID, p.manufacturer);
        }
        apply_token_info(info, &odd);
        Ok(CKR_OK)
    })
}

unsafe extern "C" fn C_GetMechanismList(
    slotID: CK_SLOT_ID,
    pMechanismList: CK_MECHANISM_TYPE_PTR,
    pulCount: CK_ULONG_PTR,
) -> CK_RV {
    entry("C_GetMechanismList", || {
        let shim = shim()?;
        let (serial, _) = shim.plugged_slot(slotID)?;
        let hidden = crate::mechanisms::hidden_for(shim.file.dir(), &serial);
        let gm = shim.gm_profile(&serial);
        if hidden.is_empty() && gm.is_none() {
            return Ok(shim.run("C_GetMechanismList", &serial, || {
                backend!(
                    shim.backend,
                    C_GetMechanismList(slotID, pMechanismList, pulCount)
                )
            }));
        }
        if pulCount.is_null() {
            return Err(CKR_ARGUMENTS_BAD);
        }
        // Some mechanisms are hidden (see crate::mechanisms) or added (a GM key's):
        // fetch the whole list, then hand out the rest.
        Ok(shim.run("C_GetMechanismList", &serial, || {
            let mut n: CK_ULONG = 0;
            let rv = backend!(
                shim.backend,
                C_GetMechanismList(slotID, ptr::null_mut(), &mut n)
            );
            if rv != CKR_OK {
                return rv;
            }
            let mut all: Vec<CK_MECHANISM_TYPE> = vec![0; n as usize];
            let rv = backend!(
                shim.backend,
                C_GetMechanismList(slotID, all.as_mut_ptr(), &mut n)
            );
            if rv != CKR_OK {
                return rv;
            }
            all.truncate(n as usize);
            // A GM key adds its vendor's mechanisms.
            all.extend(gm.map(sm2::mechanism_list).unwrap_or_default());
            // SAFETY: pulCount is non-null; pMechanismList is null or holds *pulCount
            // items, per C_GetMechanismList's contract with our caller.
            unsafe { crate::mechanisms::write_filtered(&all, &hidden, pMechanismList, pulCount) }
        }))
    })
}

unsafe extern "C" fn C_GetMechanismInfo(
    slotID: CK_SLOT_ID,
    type_: CK_MECHANISM_TYPE,
    pInfo: CK_MECHANISM_INFO_PTR,
) -> CK_RV {
    entry("C_GetMechanismInfo", || {
        let shim = shim()?;
        let (serial, _) = shim.plugged_slot(slotID)?;
        if crate::mechanisms::hidden_for(shim.file.dir(), &serial).contains(&type_) {
            return Err(CKR_MECHANISM_INVALID);
        }
        if let Some(info) = shim
            .gm_profile(&serial)
            .and_then(|p| sm2::mechanism_info(p, type_))
        {
            if pInfo.is_null() {
                return Err(CKR_ARGUMENTS_BAD);
            }
            return Ok(shim.run("C_GetMechanismInfo", &serial, || {
                // SAFETY: pInfo is non-null and valid for one CK_MECHANISM_INFO.
                unsafe { *pInfo = info };
                CKR_OK
            }));
        }
        let rv = shim.run("C_GetMechanismInfo", &serial, || {
            backend!(shim.backend, C_GetMechanismInfo(slotID, type_, pInfo))
        });
        let sizes = shim
            .lock()
            .state
            .token(&serial)
            .and_then(|t| t.key_sizes.get(&type_.to_string()).copied());
        if let (CKR_OK, Some((min, max)), false) = (rv, sizes, pInfo.is_null()) {
            // SAFETY: non-null, and SoftHSM2 just filled it.
            let info = unsafe { &mut *pInfo };
            info.ulMinKeySize = min as CK_ULONG;
            info.ulMaxKeySize = max as CK_ULONG;
        }
        Ok(rv)
    })
}

unsafe extern "C" fn C_InitToken(
    slotID: CK_SLOT_ID,
    pPin: CK_UTF8CHAR_PTR,
    ulPinLen: CK_ULONG,
    pLabel: CK_UTF8CHAR_PTR,
) -> CK_RV {
    entry("C_InitToken", || {
        let shim = shim()?;
        let (serial, _) = shim.plugged_slot(slotID)?;
        let rv = shim.run("C_InitToken", &serial, || {
            backend!(shim.backend, C_InitToken(slotID, pPin, ulPinLen, pLabel))
        });
        if rv == CKR_OK {
            // A re-initialised token has no user PIN yet: nothing to count against.
            shim.record_pin(&serial, CKR_OK);
        }
        Ok(rv)
    })
}

unsafe extern "C" fn C_InitPIN(
    hSession: CK_SESSION_HANDLE,
    pPin: CK_UTF8CHAR_PTR,
    ulPinLen: CK_ULONG,
) -> CK_RV {
    entry("C_InitPIN", || {
        let shim = shim()?;
        let call = shim.session(hSession)?;
        let rv = shim.run("C_InitPIN", &call.serial, || {
            backend!(shim.backend, C_InitPIN(call.backend, pPin, ulPinLen))
        });
        if rv == CKR_OK {
            // The SO set a new user PIN: this is how the CA unlocks a key.
            shim.record_pin(&call.serial, CKR_OK);
        }
        Ok(rv)
    })
}

unsafe extern "C" fn C_SetPIN(
    hSession: CK_SESSION_HANDLE,
    pOldPin: CK_UTF8CHAR_PTR,
    ulOldLen: CK_ULONG,
    pNewPin: CK_UTF8CHAR_PTR,
    ulNewLen: CK_ULONG,
) -> CK_RV {
    entry("C_SetPIN", || {
        let shim = shim()?;
        let call = shim.session(hSession)?;
        let mut info = CK_SESSION_INFO::default();
        ok_or(backend!(
            shim.backend,
            C_GetSessionInfo(call.backend, &mut info)
        ))?;
        // In an SO session C_SetPIN changes the SO PIN, which has no simulated counter.
        let user_pin = info.state != CKS_RW_SO_FUNCTIONS;
        if user_pin && shim.pin_locked(&call.serial) {
            return Err(CKR_PIN_LOCKED);
        }
        let rv = shim.run("C_SetPIN", &call.serial, || {
            backend!(
                shim.backend,
                C_SetPIN(call.backend, pOldPin, ulOldLen, pNewPin, ulNewLen)
            )
        });
        if user_pin {
            shim.record_pin(&call.serial, rv);
        }
        Ok(rv)
    })
}

// ---------------------------------------------------------------------------------
// Session management

unsafe extern "C" fn C_OpenSession(
    slotID: CK_SLOT_ID,
    flags: CK_FLAGS,
    _pApplication: CK_VOID_PTR,
    _Notify: CK_NOTIFY,
    phSession: CK_SESSION_HANDLE_PTR,
) -> CK_RV {
    entry("C_OpenSession", || {
        let shim = shim()?;
        if phSession.is_null() {
            return Err(CKR_ARGUMENTS_BAD);
        }
        let (serial, events) = shim.plugged_slot(slotID)?;
        let opened: Cell<Option<CK_SESSION_HANDLE>> = Cell::new(None);
        // SoftHSM2 never calls Notify; the shim does not either.
        let rv = shim.run("C_OpenSession", &serial, || {
            let mut handle: CK_SESSION_HANDLE = 0;
            let rv = backend!(
                shim.backend,
                C_OpenSession(slotID, flags, ptr::null_mut(), None, &mut handle)
            );
            if rv == CKR_OK {
                opened.set(Some(handle));
            }
            rv
        });
        let Some(backend_handle) = opened.get() else {
            return Err(rv);
        };
        if rv != CKR_OK {
            // A fault after the call: the application never gets this session.
            backend!(shim.backend, C_CloseSession(backend_handle));
            return Err(rv);
        }
        let mut inner = shim.lock();
        let handle = inner.next_session;
        inner.next_session += 1;
        inner.sessions.insert(
            handle,
            SessionEntry {
                slot: slotID,
                serial,
                backend: Some(backend_handle),
                // Taken before the call: a pull during it leaves the session dead.
                events_at_open: events,
                in_flight: 0,
                gm: sm2::GmSession::default(),
            },
        );
        // SAFETY: phSession is non-null and valid for writing one handle.
        unsafe { *phSession = handle };
        Ok(CKR_OK)
    })
}

unsafe extern "C" fn C_CloseSession(hSession: CK_SESSION_HANDLE) -> CK_RV {
    entry("C_CloseSession", || {
        let shim = shim()?;
        let mut inner = shim.refreshed();
        let session = inner
            .sessions
            .remove(&hSession)
            .ok_or(CKR_SESSION_HANDLE_INVALID)?;
        let dead = session_dead(&inner.state, &session);
        let dead_rv = dead_session_rv(&inner.state, &session.serial);
        drop(inner);
        match (session.backend, dead) {
            (Some(handle), false) => Ok(backend!(shim.backend, C_CloseSession(handle))),
            (Some(handle), true) => {
                backend!(shim.backend, C_CloseSession(handle));
                Err(dead_rv)
            }
            (None, _) => Err(dead_rv),
        }
    })
}

unsafe extern "C" fn C_CloseAllSessions(slotID: CK_SLOT_ID) -> CK_RV {
    entry("C_CloseAllSessions", || {
        let shim = shim()?;
        let mut inner = shim.refreshed();
        inner.slot(slotID)?;
        inner.sessions.retain(|_, s| s.slot != slotID);
        drop(inner);
        Ok(backend!(shim.backend, C_CloseAllSessions(slotID)))
    })
}

unsafe extern "C" fn C_Login(
    hSession: CK_SESSION_HANDLE,
    userType: CK_USER_TYPE,
    pPin: CK_UTF8CHAR_PTR,
    ulPinLen: CK_ULONG,
) -> CK_RV {
    entry("C_Login", || {
        let shim = shim()?;
        let call = shim.session(hSession)?;
        let user_pin = userType == CKU_USER || userType == CKU_CONTEXT_SPECIFIC;
        if user_pin && shim.pin_locked(&call.serial) {
            // Locked: the PIN is not even tried, right or wrong.
            return Err(CKR_PIN_LOCKED);
        }
        let rv = shim.run("C_Login", &call.serial, || {
            backend!(
                shim.backend,
                C_Login(call.backend, userType, pPin, ulPinLen)
            )
        });
        if user_pin {
            shim.record_pin(&call.serial, rv);
        }
        Ok(rv)
    })
}

// ---------------------------------------------------------------------------------
// Everything else that works on a session is forwarded as is, with faults and latency.

macro_rules! forward_session_functions {
    ($( $name:ident ( $($arg:ident : $ty:ty),* $(,)? ); )*) => {
        $(
            unsafe extern "C" fn $name(hSession: CK_SESSION_HANDLE, $($arg: $ty),*) -> CK_RV {
                entry(stringify!($name), || {
                    let shim = shim()?;
                    let call = shim.session(hSession)?;
                    Ok(shim.run(stringify!($name), &call.serial, || {
                        backend!(shim.backend, $name(call.backend, $($arg),*))
                    }))
                })
            }
        )*
    };
}

forward_session_functions! {
    C_GetSessionInfo(pInfo: CK_SESSION_INFO_PTR);
    C_GetOperationState(pOperationState: CK_BYTE_PTR, pulOperationStateLen: CK_ULONG_PTR);
    C_SetOperationState(
        pOperationState: CK_BYTE_PTR,
        ulOperationStateLen: CK_ULONG,
        hEncryptionKey: CK_OBJECT_HANDLE,
        hAuthenticationKey: CK_OBJECT_HANDLE,
    );
    C_Logout();
    C_GetObjectSize(hObject: CK_OBJECT_HANDLE, pulSize: CK_ULONG_PTR);
    C_FindObjectsFinal();
    C_EncryptInit(pMechanism: CK_MECHANISM_PTR, hKey: CK_OBJECT_HANDLE);
    C_Encrypt(pData: CK_BYTE_PTR, ulDataLen: CK_ULONG, pEncryptedData: CK_BYTE_PTR, pulEncryptedDataLen: CK_ULONG_PTR);
    C_EncryptUpdate(pPart: CK_BYTE_PTR, ulPartLen: CK_ULONG, pEncryptedPart: CK_BYTE_PTR, pulEncryptedPartLen: CK_ULONG_PTR);
    C_EncryptFinal(pLastEncryptedPart: CK_BYTE_PTR, pulLastEncryptedPartLen: CK_ULONG_PTR);
    C_DecryptUpdate(pEncryptedPart: CK_BYTE_PTR, ulEncryptedPartLen: CK_ULONG, pPart: CK_BYTE_PTR, pulPartLen: CK_ULONG_PTR);
    C_DecryptFinal(pLastPart: CK_BYTE_PTR, pulLastPartLen: CK_ULONG_PTR);
    C_DigestInit(pMechanism: CK_MECHANISM_PTR);
    C_Digest(pData: CK_BYTE_PTR, ulDataLen: CK_ULONG, pDigest: CK_BYTE_PTR, pulDigestLen: CK_ULONG_PTR);
    C_DigestUpdate(pPart: CK_BYTE_PTR, ulPartLen: CK_ULONG);
    C_DigestKey(hKey: CK_OBJECT_HANDLE);
    C_DigestFinal(pDigest: CK_BYTE_PTR, pulDigestLen: CK_ULONG_PTR);
    C_SignUpdate(pPart: CK_BYTE_PTR, ulPartLen: CK_ULONG);
    C_SignFinal(pSignature: CK_BYTE_PTR, pulSignatureLen: CK_ULONG_PTR);
    C_SignRecoverInit(pMechanism: CK_MECHANISM_PTR, hKey: CK_OBJECT_HANDLE);
    C_SignRecover(pData: CK_BYTE_PTR, ulDataLen: CK_ULONG, pSignature: CK_BYTE_PTR, pulSignatureLen: CK_ULONG_PTR);
    C_VerifyInit(pMechanism: CK_MECHANISM_PTR, hKey: CK_OBJECT_HANDLE);
    C_Verify(pData: CK_BYTE_PTR, ulDataLen: CK_ULONG, pSignature: CK_BYTE_PTR, ulSignatureLen: CK_ULONG);
    C_VerifyUpdate(pPart: CK_BYTE_PTR, ulPartLen: CK_ULONG);
    C_VerifyFinal(pSignature: CK_BYTE_PTR, ulSignatureLen: CK_ULONG);
    C_VerifyRecoverInit(pMechanism: CK_MECHANISM_PTR, hKey: CK_OBJECT_HANDLE);
    C_VerifyRecover(pSignature: CK_BYTE_PTR, ulSignatureLen: CK_ULONG, pData: CK_BYTE_PTR, pulDataLen: CK_ULONG_PTR);
    C_DigestEncryptUpdate(pPart: CK_BYTE_PTR, ulPartLen: CK_ULONG, pEncryptedPart: CK_BYTE_PTR, pulEncryptedPartLen: CK_ULONG_PTR);
    C_DecryptDigestUpdate(pEncryptedPart: CK_BYTE_PTR, ulEncryptedPartLen: CK_ULONG, pPart: CK_BYTE_PTR, pulPartLen: CK_ULONG_PTR);
    C_SignEncryptUpdate(pPart: CK_BYTE_PTR, ulPartLen: CK_ULONG, pEncryptedPart: CK_BYTE_PTR, pulEncryptedPartLen: CK_ULONG_PTR);
    C_DecryptVerifyUpdate(pEncryptedPart: CK_BYTE_PTR, ulEncryptedPartLen: CK_ULONG, pPart: CK_BYTE_PTR, pulPartLen: CK_ULONG_PTR);
    C_GenerateKey(
        pMechanism: CK_MECHANISM_PTR,
        pTemplate: CK_ATTRIBUTE_PTR,
        ulCount: CK_ULONG,
        phKey: CK_OBJECT_HANDLE_PTR,
    );
    C_SeedRandom(pSeed: CK_BYTE_PTR, ulSeedLen: CK_ULONG);
    C_GenerateRandom(RandomData: CK_BYTE_PTR, ulRandomLen: CK_ULONG);
    C_GetFunctionStatus();
    C_CancelFunction();
}

// ---------------------------------------------------------------------------------
// Object and key calls: forwarded, except on a GM key (see `sm2`), whose SM2 keys are
// stored by SoftHSM2 in another form than the application sees, and whose SM4 keys
// live in the shim.

/// The mechanism type of a CK_MECHANISM the caller passed, if any.
///
/// # Safety
/// `mechanism` is null or points to a valid CK_MECHANISM.
unsafe fn mechanism_type(mechanism: CK_MECHANISM_PTR) -> Option<CK_MECHANISM_TYPE> {
    // SAFETY: per this function's contract; only the type is read.
    (!mechanism.is_null()).then(|| unsafe { (*mechanism).mechanism })
}

unsafe extern "C" fn C_CreateObject(
    hSession: CK_SESSION_HANDLE,
    pTemplate: CK_ATTRIBUTE_PTR,
    ulCount: CK_ULONG,
    phObject: CK_OBJECT_HANDLE_PTR,
) -> CK_RV {
    entry("C_CreateObject", || {
        let shim = shim()?;
        let call = shim.session(hSession)?;
        let gm = shim.gm_profile(&call.serial);
        Ok(shim.run("C_CreateObject", &call.serial, || {
            // SAFETY: our caller's arguments, under the same C_CreateObject contract.
            gm.and_then(|p| unsafe { sm2::create_object(&call, p, pTemplate, ulCount, phObject) })
                .unwrap_or_else(|| {
                    backend!(
                        shim.backend,
                        C_CreateObject(call.backend, pTemplate, ulCount, phObject)
                    )
                })
        }))
    })
}

unsafe extern "C" fn C_CopyObject(
    hSession: CK_SESSION_HANDLE,
    hObject: CK_OBJECT_HANDLE,
    pTemplate: CK_ATTRIBUTE_PTR,
    ulCount: CK_ULONG,
    phNewObject: CK_OBJECT_HANDLE_PTR,
) -> CK_RV {
    entry("C_CopyObject", || {
        let shim = shim()?;
        let call = shim.session(hSession)?;
        let gm = shim.gm_profile(&call.serial);
        Ok(shim.run("C_CopyObject", &call.serial, || {
            // SAFETY: our caller's template, under the same contract.
            gm.and_then(|_| unsafe { sm2::refuse_fixed(&call, hObject, pTemplate, ulCount) })
                .unwrap_or_else(|| {
                    backend!(
                        shim.backend,
                        C_CopyObject(call.backend, hObject, pTemplate, ulCount, phNewObject)
                    )
                })
        }))
    })
}

unsafe extern "C" fn C_DestroyObject(
    hSession: CK_SESSION_HANDLE,
    hObject: CK_OBJECT_HANDLE,
) -> CK_RV {
    entry("C_DestroyObject", || {
        let shim = shim()?;
        let call = shim.session(hSession)?;
        let gm = shim.gm_profile(&call.serial);
        Ok(shim.run("C_DestroyObject", &call.serial, || {
            gm.and_then(|_| sm2::destroy_object(&call, hObject))
                .unwrap_or_else(|| backend!(shim.backend, C_DestroyObject(call.backend, hObject)))
        }))
    })
}

unsafe extern "C" fn C_GetAttributeValue(
    hSession: CK_SESSION_HANDLE,
    hObject: CK_OBJECT_HANDLE,
    pTemplate: CK_ATTRIBUTE_PTR,
    ulCount: CK_ULONG,
) -> CK_RV {
    entry("C_GetAttributeValue", || {
        let shim = shim()?;
        let call = shim.session(hSession)?;
        let gm = shim.gm_profile(&call.serial);
        Ok(shim.run("C_GetAttributeValue", &call.serial, || match gm {
            // SAFETY: our caller's arguments, under the same contract.
            Some(p) => unsafe { sm2::get_attribute_value(&call, p, hObject, pTemplate, ulCount) },
            None => backend!(
                shim.backend,
                C_GetAttributeValue(call.backend, hObject, pTemplate, ulCount)
            ),
        }))
    })
}

unsafe extern "C" fn C_SetAttributeValue(
    hSession: CK_SESSION_HANDLE,
    hObject: CK_OBJECT_HANDLE,
    pTemplate: CK_ATTRIBUTE_PTR,
    ulCount: CK_ULONG,
) -> CK_RV {
    entry("C_SetAttributeValue", || {
        let shim = shim()?;
        let call = shim.session(hSession)?;
        let gm = shim.gm_profile(&call.serial);
        Ok(shim.run("C_SetAttributeValue", &call.serial, || {
            // SAFETY: our caller's template, under the same contract.
            gm.and_then(|_| unsafe { sm2::refuse_fixed(&call, hObject, pTemplate, ulCount) })
                .unwrap_or_else(|| {
                    backend!(
                        shim.backend,
                        C_SetAttributeValue(call.backend, hObject, pTemplate, ulCount)
                    )
                })
        }))
    })
}

unsafe extern "C" fn C_FindObjectsInit(
    hSession: CK_SESSION_HANDLE,
    pTemplate: CK_ATTRIBUTE_PTR,
    ulCount: CK_ULONG,
) -> CK_RV {
    entry("C_FindObjectsInit", || {
        let shim = shim()?;
        let call = shim.session(hSession)?;
        let translated = match shim.gm_profile(&call.serial) {
            // SAFETY: our caller's template, under the same contract.
            Some(p) => unsafe { sm2::find_template(p, pTemplate, ulCount) }?,
            None => None,
        };
        Ok(
            shim.run("C_FindObjectsInit", &call.serial, || match translated {
                Some(mut t) => {
                    let mut c = sm2::to_c(&mut t);
                    backend!(
                        shim.backend,
                        C_FindObjectsInit(call.backend, c.as_mut_ptr(), c.len() as CK_ULONG)
                    )
                }
                None => backend!(
                    shim.backend,
                    C_FindObjectsInit(call.backend, pTemplate, ulCount)
                ),
            }),
        )
    })
}

unsafe extern "C" fn C_FindObjects(
    hSession: CK_SESSION_HANDLE,
    phObject: CK_OBJECT_HANDLE_PTR,
    ulMaxObjectCount: CK_ULONG,
    pulObjectCount: CK_ULONG_PTR,
) -> CK_RV {
    entry("C_FindObjects", || {
        let shim = shim()?;
        let call = shim.session(hSession)?;
        let gm = shim.gm_profile(&call.serial);
        Ok(shim.run("C_FindObjects", &call.serial, || {
            loop {
                let rv = backend!(
                    shim.backend,
                    C_FindObjects(call.backend, phObject, ulMaxObjectCount, pulObjectCount)
                );
                if rv != CKR_OK || gm.is_none() || phObject.is_null() || pulObjectCount.is_null() {
                    return rv;
                }
                // SAFETY: SoftHSM2 wrote *pulObjectCount ≤ ulMaxObjectCount handles
                // into the caller's buffer of ulMaxObjectCount.
                let found =
                    unsafe { std::slice::from_raw_parts_mut(phObject, *pulObjectCount as usize) };
                let n = found.len();
                let kept = sm2::hide_master(&call, found);
                // SAFETY: non-null, checked above.
                unsafe { *pulObjectCount = kept as CK_ULONG };
                // A page that held only the hidden key is not the end of the search.
                if kept > 0 || n == 0 {
                    return rv;
                }
            }
        }))
    })
}

unsafe extern "C" fn C_SignInit(
    hSession: CK_SESSION_HANDLE,
    pMechanism: CK_MECHANISM_PTR,
    hKey: CK_OBJECT_HANDLE,
) -> CK_RV {
    entry("C_SignInit", || {
        let shim = shim()?;
        let call = shim.session(hSession)?;
        let gm = shim.gm_profile(&call.serial);
        // SAFETY: our caller's mechanism pointer, under the C_SignInit contract.
        let mechanism = unsafe { mechanism_type(pMechanism) };
        Ok(shim.run("C_SignInit", &call.serial, || {
            gm.zip(mechanism)
                .and_then(|(p, m)| sm2::operation_init(&call, p, m, hKey, true))
                .unwrap_or_else(|| {
                    backend!(shim.backend, C_SignInit(call.backend, pMechanism, hKey))
                })
        }))
    })
}

unsafe extern "C" fn C_DecryptInit(
    hSession: CK_SESSION_HANDLE,
    pMechanism: CK_MECHANISM_PTR,
    hKey: CK_OBJECT_HANDLE,
) -> CK_RV {
    entry("C_DecryptInit", || {
        let shim = shim()?;
        let call = shim.session(hSession)?;
        let gm = shim.gm_profile(&call.serial);
        // SAFETY: our caller's mechanism pointer, under the C_DecryptInit contract.
        let mechanism = unsafe { mechanism_type(pMechanism) };
        Ok(shim.run("C_DecryptInit", &call.serial, || {
            gm.zip(mechanism)
                .and_then(|(p, m)| sm2::operation_init(&call, p, m, hKey, false))
                .unwrap_or_else(|| {
                    backend!(shim.backend, C_DecryptInit(call.backend, pMechanism, hKey))
                })
        }))
    })
}

unsafe extern "C" fn C_Decrypt(
    hSession: CK_SESSION_HANDLE,
    pEncryptedData: CK_BYTE_PTR,
    ulEncryptedDataLen: CK_ULONG,
    pData: CK_BYTE_PTR,
    pulDataLen: CK_ULONG_PTR,
) -> CK_RV {
    entry("C_Decrypt", || {
        let shim = shim()?;
        let call = shim.session(hSession)?;
        if sm2::has_operation(&call, false) {
            return Ok(shim.run("C_Decrypt", &call.serial, || {
                // SAFETY: our caller's buffers, under the C_Decrypt contract.
                unsafe {
                    sm2::finish_operation(
                        &call,
                        pEncryptedData,
                        ulEncryptedDataLen,
                        pData,
                        pulDataLen,
                    )
                }
            }));
        }
        Ok(shim.run("C_Decrypt", &call.serial, || {
            backend!(
                shim.backend,
                C_Decrypt(
                    call.backend,
                    pEncryptedData,
                    ulEncryptedDataLen,
                    pData,
                    pulDataLen
                )
            )
        }))
    })
}

unsafe extern "C" fn C_WrapKey(
    hSession: CK_SESSION_HANDLE,
    pMechanism: CK_MECHANISM_PTR,
    hWrappingKey: CK_OBJECT_HANDLE,
    hKey: CK_OBJECT_HANDLE,
    pWrappedKey: CK_BYTE_PTR,
    pulWrappedKeyLen: CK_ULONG_PTR,
) -> CK_RV {
    entry("C_WrapKey", || {
        let shim = shim()?;
        let call = shim.session(hSession)?;
        let gm = shim.gm_profile(&call.serial);
        Ok(shim.run("C_WrapKey", &call.serial, || {
            if gm.is_some() && sm2::unextractable(&call, hKey) {
                return CKR_KEY_UNEXTRACTABLE;
            }
            backend!(
                shim.backend,
                C_WrapKey(
                    call.backend,
                    pMechanism,
                    hWrappingKey,
                    hKey,
                    pWrappedKey,
                    pulWrappedKeyLen
                )
            )
        }))
    })
}

unsafe extern "C" fn C_UnwrapKey(
    hSession: CK_SESSION_HANDLE,
    pMechanism: CK_MECHANISM_PTR,
    hUnwrappingKey: CK_OBJECT_HANDLE,
    pWrappedKey: CK_BYTE_PTR,
    ulWrappedKeyLen: CK_ULONG,
    pTemplate: CK_ATTRIBUTE_PTR,
    ulAttributeCount: CK_ULONG,
    phKey: CK_OBJECT_HANDLE_PTR,
) -> CK_RV {
    entry("C_UnwrapKey", || {
        let shim = shim()?;
        let call = shim.session(hSession)?;
        let gm = shim.gm_profile(&call.serial);
        // SAFETY: our caller's mechanism pointer, under the C_UnwrapKey contract.
        let mechanism = unsafe { mechanism_type(pMechanism) };
        Ok(shim.run("C_UnwrapKey", &call.serial, || {
            let gm_call = gm.zip(mechanism).and_then(|(p, m)| {
                let wrapped = if ulWrappedKeyLen == 0 || pWrappedKey.is_null() {
                    Vec::new()
                } else {
                    // SAFETY: pWrappedKey holds ulWrappedKeyLen bytes, per the contract.
                    unsafe { std::slice::from_raw_parts(pWrappedKey, ulWrappedKeyLen as usize) }
                        .to_vec()
                };
                // SAFETY: our caller's template and out-pointer, under the same contract.
                unsafe {
                    sm2::unwrap_key(
                        &call,
                        p,
                        m,
                        hUnwrappingKey,
                        &wrapped,
                        pTemplate,
                        ulAttributeCount,
                        phKey,
                    )
                }
            });
            gm_call.unwrap_or_else(|| {
                backend!(
                    shim.backend,
                    C_UnwrapKey(
                        call.backend,
                        pMechanism,
                        hUnwrappingKey,
                        pWrappedKey,
                        ulWrappedKeyLen,
                        pTemplate,
                        ulAttributeCount,
                        phKey,
                    )
                )
            })
        }))
    })
}

unsafe extern "C" fn C_DeriveKey(
    hSession: CK_SESSION_HANDLE,
    pMechanism: CK_MECHANISM_PTR,
    hBaseKey: CK_OBJECT_HANDLE,
    pTemplate: CK_ATTRIBUTE_PTR,
    ulAttributeCount: CK_ULONG,
    phKey: CK_OBJECT_HANDLE_PTR,
) -> CK_RV {
    entry("C_DeriveKey", || {
        let shim = shim()?;
        let call = shim.session(hSession)?;
        let gm = shim.gm_profile(&call.serial);
        Ok(shim.run("C_DeriveKey", &call.serial, || {
            // SM2 key agreement is not offered; SoftHSM2 would treat the sealed value
            // as a scalar.
            if gm.is_some() && sm2::unextractable(&call, hBaseKey) {
                return CKR_KEY_TYPE_INCONSISTENT;
            }
            backend!(
                shim.backend,
                C_DeriveKey(
                    call.backend,
                    pMechanism,
                    hBaseKey,
                    pTemplate,
                    ulAttributeCount,
                    phKey
                )
            )
        }))
    })
}

/// Forwarded like the others, except that a length query (no output buffer) costs no
/// chip time: a module answers it without signing (PKCS#11 5.2 "length of output").
unsafe extern "C" fn C_Sign(
    hSession: CK_SESSION_HANDLE,
    pData: CK_BYTE_PTR,
    ulDataLen: CK_ULONG,
    pSignature: CK_BYTE_PTR,
    pulSignatureLen: CK_ULONG_PTR,
) -> CK_RV {
    entry("C_Sign", || {
        let shim = shim()?;
        let call = shim.session(hSession)?;
        if sm2::has_operation(&call, true) {
            let chip = if pSignature.is_null() {
                Chip::NotUsed
            } else {
                Chip::Function
            };
            return Ok(shim.run_with("C_Sign", chip, &call.serial, || {
                // SAFETY: our caller's buffers, under the C_Sign contract.
                unsafe {
                    sm2::finish_operation(&call, pData, ulDataLen, pSignature, pulSignatureLen)
                }
            }));
        }
        let forward = || {
            backend!(
                shim.backend,
                C_Sign(call.backend, pData, ulDataLen, pSignature, pulSignatureLen)
            )
        };
        Ok(if pSignature.is_null() {
            shim.run_with("C_Sign", Chip::NotUsed, &call.serial, forward)
        } else {
            shim.run("C_Sign", &call.serial, forward)
        })
    })
}

/// Forwarded like the others, with its mechanism known, because a chip's time for it
/// depends on the mechanism (RSA key pairs take seconds).
unsafe extern "C" fn C_GenerateKeyPair(
    hSession: CK_SESSION_HANDLE,
    pMechanism: CK_MECHANISM_PTR,
    pPublicKeyTemplate: CK_ATTRIBUTE_PTR,
    ulPublicKeyAttributeCount: CK_ULONG,
    pPrivateKeyTemplate: CK_ATTRIBUTE_PTR,
    ulPrivateKeyAttributeCount: CK_ULONG,
    phPublicKey: CK_OBJECT_HANDLE_PTR,
    phPrivateKey: CK_OBJECT_HANDLE_PTR,
) -> CK_RV {
    entry("C_GenerateKeyPair", || {
        let shim = shim()?;
        let call = shim.session(hSession)?;
        let mechanism = (!pMechanism.is_null()).then(|| {
            // SAFETY: non-null, and the caller passes a valid CK_MECHANISM under the
            // C_GenerateKeyPair contract; only its type is read.
            unsafe { (*pMechanism).mechanism }
        });
        if let Some(p) = shim.gm_profile(&call.serial)
            && mechanism == Some(p.key_pair_gen)
        {
            // An SM2 key pair takes a chip what an EC one does.
            return Ok(shim.run_with(
                "C_GenerateKeyPair",
                Chip::Mechanism(CKM_EC_KEY_PAIR_GEN),
                &call.serial,
                || {
                    // SAFETY: our caller's templates and out-pointers, under the
                    // C_GenerateKeyPair contract.
                    unsafe {
                        sm2::generate_key_pair(
                            &call,
                            p,
                            (pPublicKeyTemplate, ulPublicKeyAttributeCount),
                            (pPrivateKeyTemplate, ulPrivateKeyAttributeCount),
                            (phPublicKey, phPrivateKey),
                        )
                    }
                },
            ));
        }
        Ok(shim.run_with(
            "C_GenerateKeyPair",
            mechanism.map_or(Chip::Function, Chip::Mechanism),
            &call.serial,
            || {
                backend!(
                    shim.backend,
                    C_GenerateKeyPair(
                        call.backend,
                        pMechanism,
                        pPublicKeyTemplate,
                        ulPublicKeyAttributeCount,
                        pPrivateKeyTemplate,
                        ulPrivateKeyAttributeCount,
                        phPublicKey,
                        phPrivateKey,
                    )
                )
            },
        ))
    })
}

// ---------------------------------------------------------------------------------
// Slot events

unsafe extern "C" fn C_WaitForSlotEvent(
    flags: CK_FLAGS,
    pSlot: CK_SLOT_ID_PTR,
    pReserved: CK_VOID_PTR,
) -> CK_RV {
    ungated_entry("C_WaitForSlotEvent", || {
        let shim = shim()?;
        if pSlot.is_null() || !pReserved.is_null() {
            return Err(CKR_ARGUMENTS_BAD);
        }
        loop {
            shim.rescan_if_pending();
            {
                let _gate = GATE.read().unwrap_or_else(PoisonError::into_inner);
                let mut inner = shim.refreshed();
                let Inner {
                    slots,
                    state,
                    seen_events,
                    vanished,
                    ..
                } = &mut *inner;
                let mut event = vanished.pop_front();
                for slot in slots.iter() {
                    if event.is_some() {
                        break;
                    }
                    let now = state.events(&slot.serial);
                    if seen_events.insert(slot.serial.clone(), now) != Some(now) {
                        event = Some(slot.id);
                    }
                }
                if let Some(slot) = event {
                    // SAFETY: pSlot is non-null and valid for writing one slot id.
                    unsafe { *pSlot = slot };
                    return Ok(CKR_OK);
                }
            }
            if flags & CKF_DONT_BLOCK != 0 {
                return Err(CKR_NO_EVENT);
            }
            let finalized = shim
                .finalized
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if *finalized {
                return Err(CKR_CRYPTOKI_NOT_INITIALIZED);
            }
            let (finalized, _) = shim
                .wake
                .wait_timeout(finalized, POLL)
                .unwrap_or_else(PoisonError::into_inner);
            if *finalized {
                return Err(CKR_CRYPTOKI_NOT_INITIALIZED);
            }
        }
    })
}

/// Where SoftHSM2 was loaded from, once a C_Initialize has loaded it (for diagnostics).
pub fn backend_path() -> Option<PathBuf> {
    BACKEND
        .get()
        .and_then(|b| b.as_ref().ok())
        .map(|b| b.path.clone())
}

static FUNCTION_LIST: CK_FUNCTION_LIST = CK_FUNCTION_LIST {
    version: CK_VERSION {
        major: 2,
        minor: 40,
    },
    C_Initialize: Some(C_Initialize),
    C_Finalize: Some(C_Finalize),
    C_GetInfo: Some(C_GetInfo),
    C_GetFunctionList: Some(C_GetFunctionList),
    C_GetSlotList: Some(C_GetSlotList),
    C_GetSlotInfo: Some(C_GetSlotInfo),
    C_GetTokenInfo: Some(C_GetTokenInfo),
    C_GetMechanismList: Some(C_GetMechanismList),
    C_GetMechanismInfo: Some(C_GetMechanismInfo),
    C_InitToken: Some(C_InitToken),
    C_InitPIN: Some(C_InitPIN),
    C_SetPIN: Some(C_SetPIN),
    C_OpenSession: Some(C_OpenSession),
    C_CloseSession: Some(C_CloseSession),
    C_CloseAllSessions: Some(C_CloseAllSessions),
    C_GetSessionInfo: Some(C_GetSessionInfo),
    C_GetOperationState: Some(C_GetOperationState),
    C_SetOperationState: Some(C_SetOperationState),
    C_Login: Some(C_Login),
    C_Logout: Some(C_Logout),
    C_CreateObject: Some(C_CreateObject),
    C_CopyObject: Some(C_CopyObject),
    C_DestroyObject: Some(C_DestroyObject),
    C_GetObjectSize: Some(C_GetObjectSize),
    C_GetAttributeValue: Some(C_GetAttributeValue),
    C_SetAttributeValue: Some(C_SetAttributeValue),
    C_FindObjectsInit: Some(C_FindObjectsInit),
    C_FindObjects: Some(C_FindObjects),
    C_FindObjectsFinal: Some(C_FindObjectsFinal),
    C_EncryptInit: Some(C_EncryptInit),
    C_Encrypt: Some(C_Encrypt),
    C_EncryptUpdate: Some(C_EncryptUpdate),
    C_EncryptFinal: Some(C_EncryptFinal),
    C_DecryptInit: Some(C_DecryptInit),
    C_Decrypt: Some(C_Decrypt),
    C_DecryptUpdate: Some(C_DecryptUpdate),
    C_DecryptFinal: Some(C_DecryptFinal),
    C_DigestInit: Some(C_DigestInit),
    C_Digest: Some(C_Digest),
    C_DigestUpdate: Some(C_DigestUpdate),
    C_DigestKey: Some(C_DigestKey),
    C_DigestFinal: Some(C_DigestFinal),
    C_SignInit: Some(C_SignInit),
    C_Sign: Some(C_Sign),
    C_SignUpdate: Some(C_SignUpdate),
    C_SignFinal: Some(C_SignFinal),
    C_SignRecoverInit: Some(C_SignRecoverInit),
    C_SignRecover: Some(C_SignRecover),
    C_VerifyInit: Some(C_VerifyInit),
    C_Verify: Some(C_Verify),
    C_VerifyUpdate: Some(C_VerifyUpdate),
    C_VerifyFinal: Some(C_VerifyFinal),
    C_VerifyRecoverInit: Some(C_VerifyRecoverInit),
    C_VerifyRecover: Some(C_VerifyRecover),
    C_DigestEncryptUpdate: Some(C_DigestEncryptUpdate),
    C_DecryptDigestUpdate: Some(C_DecryptDigestUpdate),
    C_SignEncryptUpdate: Some(C_SignEncryptUpdate),
    C_DecryptVerifyUpdate: Some(C_DecryptVerifyUpdate),
    C_GenerateKey: Some(C_GenerateKey),
    C_GenerateKeyPair: Some(C_GenerateKeyPair),
    C_WrapKey: Some(C_WrapKey),
    C_UnwrapKey: Some(C_UnwrapKey),
    C_DeriveKey: Some(C_DeriveKey),
    C_SeedRandom: Some(C_SeedRandom),
    C_GenerateRandom: Some(C_GenerateRandom),
    C_GetFunctionStatus: Some(C_GetFunctionStatus),
    C_CancelFunction: Some(C_CancelFunction),
    C_WaitForSlotEvent: Some(C_WaitForSlotEvent),
};
