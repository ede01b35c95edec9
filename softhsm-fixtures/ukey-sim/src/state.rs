//! The control state shared by the shim (inside the application under test) and its
//! controllers (tests, the `ukey-sim` CLI): one JSON file, `state.json`, in the state
//! directory.
//!
//! Why one file and not one per token: a reader gets one consistent snapshot of all
//! tokens with a single read, and the shim, which re-reads it on every PKCS#11 call,
//! compares bytes instead of trusting mtimes (1 to 4 ms granular on many file systems:
//! two quick changes could look like one). Writers (both sides) hold an exclusive lock
//! on `state.lock` for their read-modify-write and replace the file atomically
//! (temp file + rename), so a reader never sees half a file.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use cryptoki_sys::{CK_FLAGS, CKF_USER_PIN_COUNT_LOW, CKF_USER_PIN_FINAL_TRY, CKF_USER_PIN_LOCKED};
use serde::{Deserialize, Serialize};

use crate::SimError;

/// Tries a UKey allows before it locks the user PIN, unless configured otherwise.
pub const DEFAULT_PIN_TRIES: u32 = 6;

const STATE_FILE: &str = "state.json";
const LOCK_FILE: &str = "state.lock";
const FORMAT_VERSION: u32 = 1;

/// Everything the controllers have said about every token, by token serial.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct SimState {
    /// Format version of the file.
    pub version: u32,
    /// Bumped by every write; lets a reader tell two snapshots apart.
    pub generation: u64,
    /// Tokens by serial (as C_GetTokenInfo reports it, trimmed). A token absent from
    /// the map is plugged in and has the default PIN tries, no faults and no latency.
    pub tokens: BTreeMap<String, TokenState>,
}

impl Default for SimState {
    fn default() -> Self {
        SimState {
            version: FORMAT_VERSION,
            generation: 0,
            tokens: BTreeMap::new(),
        }
    }
}

impl SimState {
    /// The token's state, if anything was ever said about it.
    pub fn token(&self, serial: &str) -> Option<&TokenState> {
        self.tokens.get(serial)
    }

    /// The token's state, created with defaults when absent.
    pub fn token_mut(&mut self, serial: &str) -> &mut TokenState {
        self.tokens.entry(serial.to_owned()).or_default()
    }

    /// Is the token plugged in? (Unknown tokens are.)
    pub fn plugged(&self, serial: &str) -> bool {
        self.token(serial).is_none_or(|t| t.plugged)
    }

    /// How many times the token was plugged in or pulled out.
    pub fn events(&self, serial: &str) -> u64 {
        self.token(serial).map_or(0, |t| t.events)
    }
}

/// One token's simulated hardware state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct TokenState {
    /// Token label, written by the shim when it first sees the token (informational).
    pub label: Option<String>,
    /// Plugged in (the slot shows the token) or pulled out.
    pub plugged: bool,
    /// Count of plug-in and pull-out events; C_WaitForSlotEvent reports a change of it,
    /// and a session opened before a change is dead after it.
    pub events: u64,
    /// The user PIN retry counter.
    pub pin: PinCounter,
    /// Faults armed on this token.
    pub faults: Vec<Fault>,
    /// Delay in milliseconds before forwarding a function, by function name.
    pub latency_ms: BTreeMap<String, u64>,
    /// How long a call takes on the key's own chip, in milliseconds, by function name
    /// or `FUNCTION/CKM_VALUE` for one mechanism (`C_GenerateKeyPair/0` is RSA): the
    /// call returns no sooner than this after it started, SoftHSM2's own work counted
    /// in it, so that the host's CPU does not add to a chip's time (see
    /// [`crate::profile`]). Set by a latency profile.
    pub chip_ms: BTreeMap<String, u64>,
    /// The latency profile `chip_ms` came from, if any.
    pub profile: Option<String>,
    /// Fields of C_GetTokenInfo replaced as a vendor's module fills them.
    pub token_info: TokenInfoOverride,
    /// Key sizes C_GetMechanismInfo reports (min, max bits), by CKM_ value (decimal):
    /// a chip that generates only some sizes.
    pub key_sizes: BTreeMap<String, (u64, u64)>,
    /// The 国密 vendor profile the token speaks (see [`crate::gm`]): its SM2/SM4
    /// mechanisms and key types, and its manufacturerID. `None`: a plain key.
    pub gm: Option<String>,
}

impl Default for TokenState {
    fn default() -> Self {
        TokenState {
            label: None,
            plugged: true,
            events: 0,
            pin: PinCounter::default(),
            faults: Vec::new(),
            latency_ms: BTreeMap::new(),
            chip_ms: BTreeMap::new(),
            profile: None,
            token_info: TokenInfoOverride::default(),
            key_sizes: BTreeMap::new(),
            gm: None,
        }
    }
}

/// C_GetTokenInfo fields a real module fills in its own way: raw bytes (hex) for the
/// text fields, copied in and padded with `pad` to the field's size; a raw utcTime
/// (which also sets CKF_CLOCK_ON_TOKEN); versions; counters. Unset: SoftHSM2's value.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct TokenInfoOverride {
    /// `label`, hex.
    pub label_hex: Option<String>,
    /// `manufacturerID`, hex.
    pub manufacturer_hex: Option<String>,
    /// `model`, hex.
    pub model_hex: Option<String>,
    /// `serialNumber`, hex.
    pub serial_hex: Option<String>,
    /// Padding byte of the text fields (default a blank, 0x20; real modules use 0x00).
    pub pad: Option<u8>,
    /// `utcTime`, as raw text (16 bytes, padded with blanks).
    pub utc_time: Option<String>,
    /// `hardwareVersion` (major, minor).
    pub hardware_version: Option<(u8, u8)>,
    /// `firmwareVersion` (major, minor).
    pub firmware_version: Option<(u8, u8)>,
    /// Report every counter as CK_UNAVAILABLE_INFORMATION.
    pub counters_unavailable: bool,
    /// Report free memory above total memory.
    pub counters_nonsense: bool,
}

impl TokenInfoOverride {
    /// Whether nothing is overridden.
    pub fn is_empty(&self) -> bool {
        *self == TokenInfoOverride::default()
    }
}

impl TokenState {
    /// Plug the token in or pull it out; counts an event only on a change.
    pub fn set_plugged(&mut self, plugged: bool) {
        if self.plugged != plugged {
            self.plugged = plugged;
            self.events += 1;
        }
    }

    /// Is a fault armed for this function at this timing?
    pub fn has_fault(&self, function: &str, timing: FaultTiming) -> bool {
        self.faults
            .iter()
            .any(|f| f.function == function && f.timing == timing)
    }

    /// Counts a call of `function` for every fault armed on it at `timing`, and returns
    /// the action of the first fault that fires. A firing `Unplug` pulls the token out.
    pub fn count_call(&mut self, function: &str, timing: FaultTiming) -> Option<FaultAction> {
        let mut fired = None;
        for fault in self
            .faults
            .iter_mut()
            .filter(|f| f.function == function && f.timing == timing)
        {
            fault.calls += 1;
            let fires = fault.calls == fault.nth || (fault.repeat && fault.calls > fault.nth);
            if fires && fired.is_none() {
                fault.fired += 1;
                fired = Some(fault.action.clone());
            }
        }
        if fired == Some(FaultAction::Unplug) {
            self.set_plugged(false);
        }
        fired
    }

    /// The chip time of a function (for `mechanism` when one was given and has its
    /// own figure, else the function's).
    pub fn chip_time(&self, function: &str, mechanism: Option<u64>) -> Option<std::time::Duration> {
        mechanism
            .and_then(|m| self.chip_ms.get(&format!("{function}/{m}")))
            .or_else(|| self.chip_ms.get(function))
            .filter(|ms| **ms > 0)
            .map(|ms| std::time::Duration::from_millis(*ms))
    }

    /// The delay configured for a function.
    pub fn latency(&self, function: &str) -> Option<std::time::Duration> {
        self.latency_ms
            .get(function)
            .filter(|ms| **ms > 0)
            .map(|ms| std::time::Duration::from_millis(*ms))
    }
}

/// The user PIN retry counter of a token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct PinCounter {
    /// Wrong PINs in a row that lock the PIN.
    pub max_tries: u32,
    /// Wrong PINs in a row so far (reset by a good login or by the SO's C_InitPIN).
    pub failures: u32,
}

impl Default for PinCounter {
    fn default() -> Self {
        PinCounter {
            max_tries: DEFAULT_PIN_TRIES,
            failures: 0,
        }
    }
}

impl PinCounter {
    /// Tries left before the PIN locks.
    pub fn remaining(&self) -> u32 {
        self.max_tries.saturating_sub(self.failures)
    }

    /// Is the user PIN locked?
    pub fn locked(&self) -> bool {
        self.remaining() == 0
    }

    /// C_GetTokenInfo flags for this counter: COUNT_LOW after any failure, FINAL_TRY
    /// when one try is left, LOCKED when none is.
    pub fn flags(&self) -> CK_FLAGS {
        let mut flags = 0;
        if self.failures > 0 {
            flags |= CKF_USER_PIN_COUNT_LOW;
        }
        match self.remaining() {
            0 => flags |= CKF_USER_PIN_LOCKED,
            1 => flags |= CKF_USER_PIN_FINAL_TRY,
            _ => {}
        }
        flags
    }
}

/// When a fault acts, relative to the real call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum FaultTiming {
    /// The call is not forwarded: nothing happens on the token.
    #[default]
    Before,
    /// The call is forwarded and takes effect, then the application sees the fault:
    /// "was it written or not?", as when a key is pulled at the end of a write.
    After,
}

/// What a fault does when it fires.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum FaultAction {
    /// The call returns this CKR_ value (a name such as `CKR_DEVICE_MEMORY`).
    Fail {
        /// Name (or number) of the return value.
        rv: String,
    },
    /// The token is pulled out at this call; the call returns CKR_DEVICE_REMOVED and
    /// the token stays out until plugged back in.
    Unplug,
}

/// A fault armed on one function of one token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fault {
    /// PKCS#11 function name, e.g. `C_CreateObject`.
    pub function: String,
    /// The call that fires, counting from 1 since the fault was set.
    pub nth: u64,
    /// Also fire on every call after the nth.
    #[serde(default)]
    pub repeat: bool,
    /// What happens.
    pub action: FaultAction,
    /// Before or after forwarding the call.
    #[serde(default)]
    pub timing: FaultTiming,
    /// Calls counted so far.
    #[serde(default)]
    pub calls: u64,
    /// Times it fired so far.
    #[serde(default)]
    pub fired: u64,
}

impl Fault {
    /// The nth call of `function` fails with `rv` (a `CKR_` name) and has no effect.
    pub fn fail(function: &str, nth: u64, rv: &str) -> Fault {
        Fault {
            function: function.to_owned(),
            nth,
            repeat: false,
            action: FaultAction::Fail { rv: rv.to_owned() },
            timing: FaultTiming::Before,
            calls: 0,
            fired: 0,
        }
    }

    /// The token is pulled out at the nth call of `function`.
    pub fn unplug(function: &str, nth: u64) -> Fault {
        Fault {
            action: FaultAction::Unplug,
            ..Fault::fail(function, nth, "CKR_DEVICE_REMOVED")
        }
    }

    /// Fire on the nth call and on every call after it.
    pub fn repeating(mut self) -> Fault {
        self.repeat = true;
        self
    }

    /// Let the call take effect, then report the fault.
    pub fn after_call(mut self) -> Fault {
        self.timing = FaultTiming::After;
        self
    }
}

static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// The state directory on disk: reading, and locked read-modify-write.
#[derive(Debug, Clone)]
pub struct StateFile {
    dir: PathBuf,
}

impl StateFile {
    /// The state in `dir` (created on first write).
    pub fn new(dir: impl Into<PathBuf>) -> StateFile {
        StateFile { dir: dir.into() }
    }

    /// The state directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Path of `state.json`.
    pub fn path(&self) -> PathBuf {
        self.dir.join(STATE_FILE)
    }

    /// The raw bytes of the state file; empty when it does not exist yet.
    pub fn read_bytes(&self) -> Result<Vec<u8>, SimError> {
        let path = self.path();
        match fs::read(&path) {
            Ok(bytes) => Ok(bytes),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(source) => Err(SimError::Io { path, source }),
        }
    }

    /// Parses bytes from `read_bytes`.
    pub fn parse(&self, bytes: &[u8]) -> Result<SimState, SimError> {
        if bytes.is_empty() {
            return Ok(SimState::default());
        }
        let state: SimState =
            serde_json::from_slice(bytes).map_err(|source| SimError::Corrupt {
                path: self.path(),
                source,
            })?;
        if state.version > FORMAT_VERSION {
            return Err(SimError::NewerFormat {
                path: self.path(),
                version: state.version,
            });
        }
        Ok(state)
    }

    /// The current state.
    pub fn read(&self) -> Result<SimState, SimError> {
        self.parse(&self.read_bytes()?)
    }

    /// Runs `f` holding the state directory's exclusive lock (`state.lock`), which every
    /// writer of `state.json` and of the SKF devices' files holds.
    pub fn locked<R>(&self, f: impl FnOnce() -> Result<R, SimError>) -> Result<R, SimError> {
        fs::create_dir_all(&self.dir).map_err(|source| SimError::Io {
            path: self.dir.clone(),
            source,
        })?;
        let lock_path = self.dir.join(LOCK_FILE);
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|source| SimError::Io {
                path: lock_path.clone(),
                source,
            })?;
        lock.lock().map_err(|source| SimError::Io {
            path: lock_path.clone(),
            source,
        })?;
        // The lock is released when `lock` is dropped (also on the error paths).
        let result = f();
        drop(lock);
        result
    }

    /// Locked read-modify-write. The file is written (generation bumped) only when
    /// `change` altered the state. Returns what `change` returned.
    pub fn update<R>(&self, change: impl FnOnce(&mut SimState) -> R) -> Result<R, SimError> {
        self.locked(|| {
            let before = self.read()?;
            let mut state = before.clone();
            let result = change(&mut state);
            if state != before {
                state.generation = before.generation + 1;
                state.version = FORMAT_VERSION;
                self.write(&state)?;
            }
            Ok(result)
        })
    }

    fn write(&self, state: &SimState) -> Result<(), SimError> {
        let path = self.path();
        let n = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
        let temp = self
            .dir
            .join(format!(".{STATE_FILE}.{}.{n}.tmp", std::process::id()));
        let io = |source| SimError::Io {
            path: temp.clone(),
            source,
        };
        let mut json = serde_json::to_vec_pretty(state).map_err(|source| SimError::Corrupt {
            path: path.clone(),
            source,
        })?;
        json.push(b'\n');
        let mut file = File::create(&temp).map_err(io)?;
        file.write_all(&json).map_err(io)?;
        drop(file);
        fs::rename(&temp, &path).map_err(|source| {
            let _ = fs::remove_file(&temp);
            SimError::Io {
                path: path.clone(),
                source,
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pin_flags_at_each_step() {
        let mut pin = PinCounter {
            max_tries: 3,
            failures: 0,
        };
        assert_eq!(pin.flags(), 0);
        pin.failures = 1;
        assert_eq!(pin.flags(), CKF_USER_PIN_COUNT_LOW);
        pin.failures = 2;
        assert_eq!(pin.flags(), CKF_USER_PIN_COUNT_LOW | CKF_USER_PIN_FINAL_TRY);
        pin.failures = 3;
        assert!(pin.locked());
        assert_eq!(pin.flags(), CKF_USER_PIN_COUNT_LOW | CKF_USER_PIN_LOCKED);
    }

    #[test]
    fn nth_call_fires_once_or_repeatedly() {
        let mut token = TokenState::default();
        token
            .faults
            .push(Fault::fail("C_Sign", 2, "CKR_DEVICE_ERROR"));
        assert_eq!(token.count_call("C_Sign", FaultTiming::Before), None);
        assert!(token.count_call("C_Sign", FaultTiming::Before).is_some());
        assert_eq!(token.count_call("C_Sign", FaultTiming::Before), None);
        assert_eq!(token.count_call("C_Sign", FaultTiming::After), None);

        let mut token = TokenState::default();
        token
            .faults
            .push(Fault::unplug("C_CreateObject", 1).repeating());
        assert_eq!(
            token.count_call("C_CreateObject", FaultTiming::Before),
            Some(FaultAction::Unplug)
        );
        assert!(!token.plugged);
        assert_eq!(token.events, 1);
        assert_eq!(
            token.count_call("C_CreateObject", FaultTiming::Before),
            Some(FaultAction::Unplug)
        );
        // Already out: no second event.
        assert_eq!(token.events, 1);
    }

    #[test]
    fn update_writes_only_changes_and_survives_reread() {
        let dir = tempfile::tempdir().expect("temp dir");
        let file = StateFile::new(dir.path().join("state"));
        assert_eq!(file.read().expect("read"), SimState::default());
        file.update(|s| s.token_mut("abc").set_plugged(false))
            .expect("update");
        let first = file.read_bytes().expect("bytes");
        file.update(|s| s.token_mut("abc").set_plugged(false))
            .expect("update");
        assert_eq!(
            file.read_bytes().expect("bytes"),
            first,
            "no-op must not write"
        );
        let state = file.read().expect("read");
        assert!(!state.plugged("abc"));
        assert!(state.plugged("other"));
        assert_eq!(state.events("abc"), 1);
        assert_eq!(state.generation, 1);
    }

    #[test]
    fn corrupt_file_is_a_clear_error() {
        let dir = tempfile::tempdir().expect("temp dir");
        let file = StateFile::new(dir.path());
        fs::write(file.path(), b"{not json").expect("write");
        let err = file.read().expect_err("must fail");
        assert!(err.to_string().contains("state.json"), "{err}");
        // An update does not overwrite what it cannot read.
        assert!(file.update(|_| ()).is_err());
        assert_eq!(fs::read(file.path()).expect("read"), b"{not json");
    }
}
