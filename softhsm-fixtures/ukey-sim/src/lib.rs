//! ukey-sim: a PKCS#11 module that forwards to SoftHSM2 and adds what a USB key does
//! and SoftHSM2 does not: hot-plug, a PIN retry counter that locks, faults on cue and
//! latency.
//!
//! The crate builds two things:
//! - the cdylib `libukey_sim.so`, a PKCS#11 module (`C_GetFunctionList`) that an
//!   application loads instead of SoftHSM2 (see [`module`]);
//! - this library, whose [`Control`] tells a running module (in any process) what the
//!   simulated hardware does, through a state directory (see [`state`]).
//!
//! Environment read by the module at `C_Initialize`:
//! - `UKEY_SIM_BACKEND`: SoftHSM2's module (else [`softhsm_module`] searches).
//! - `UKEY_SIM_STATE`: the state directory (else [`default_state_dir`]).
//! - `UKEY_SIM_TRACE=1`: print each call's function name and return value to stderr
//!   (never arguments, so never a PIN).
//! - `SOFTHSM2_CONF`: read by SoftHSM2 itself.

// This crate is the project's PKCS#11 FFI: the module's entry points take raw pointers
// from C callers. Every unsafe block states why it holds.
#![allow(unsafe_code)]

pub mod gm;
pub mod mechanisms;
pub mod module;
pub mod names;
pub mod profile;
pub mod skf;
pub mod state;

use std::path::{Path, PathBuf};
use std::time::Duration;

pub use names::{FUNCTIONS, is_function, rv_from_name, rv_name};
pub use profile::{PROFILES, Profile};
pub use state::{
    DEFAULT_PIN_TRIES, Fault, FaultAction, FaultTiming, PinCounter, SimState, StateFile,
    TokenInfoOverride, TokenState,
};

/// Environment variable naming the state directory.
pub const STATE_ENV: &str = "UKEY_SIM_STATE";
/// Environment variable naming SoftHSM2's module.
pub const BACKEND_ENV: &str = "UKEY_SIM_BACKEND";
/// Environment variable naming the shim module itself (for [`module_path`]).
pub const MODULE_ENV: &str = "UKEY_SIM_MODULE";

/// Errors of the control API.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SimError {
    /// Reading or writing the state directory failed.
    #[error("ukey-sim state {path}: {source}")]
    Io {
        /// File or directory concerned.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The state file is not valid JSON of the expected shape. Nothing is overwritten.
    #[error("ukey-sim state file {path} is damaged (fix or delete it): {source}")]
    Corrupt {
        /// The state file.
        path: PathBuf,
        /// The parse error.
        source: serde_json::Error,
    },
    /// The state file was written by a newer ukey-sim.
    #[error("ukey-sim state file {path} has format version {version}, newer than this ukey-sim")]
    NewerFormat {
        /// The state file.
        path: PathBuf,
        /// Its version.
        version: u32,
    },
    /// Not a PKCS#11 or SKF function name.
    #[error(
        "unknown function {0:?} (expected a PKCS#11 name like C_CreateObject or an SKF name like SKF_ImportCertificate)"
    )]
    UnknownFunction(String),
    /// Not a known CKR_ (or, for an SKF function, SAR_) name or number.
    #[error(
        "unknown return value {0:?} (expected a name like CKR_DEVICE_REMOVED, or SAR_FAIL for an SKF function)"
    )]
    UnknownReturnValue(String),
    /// Not a token serial.
    #[error("invalid token serial {0:?} (1 to 16 printable ASCII characters)")]
    InvalidSerial(String),
    /// Some other argument is out of range.
    #[error("{0}")]
    InvalidArgument(String),
    /// A file searched for was not found.
    #[error("{what} not found; looked in: {looked_in}")]
    NotFound {
        /// What was searched for.
        what: &'static str,
        /// Where.
        looked_in: String,
    },
}

/// Controls the simulated hardware of every token served by ukey-sim modules using one
/// state directory. Changes are seen by running modules at their next PKCS#11 call (or
/// within about 20 ms by a blocked `C_WaitForSlotEvent`).
#[derive(Debug, Clone)]
pub struct Control {
    file: StateFile,
}

impl Control {
    /// Control through the state directory `dir` (created if missing).
    pub fn new(dir: impl Into<PathBuf>) -> Result<Control, SimError> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir).map_err(|source| SimError::Io {
            path: dir.clone(),
            source,
        })?;
        Ok(Control {
            file: StateFile::new(dir),
        })
    }

    /// Control through the directory the module would use in this environment
    /// ([`default_state_dir`]).
    pub fn from_env() -> Result<Control, SimError> {
        Control::new(default_state_dir())
    }

    /// The state directory: give it to the module as `UKEY_SIM_STATE`.
    pub fn dir(&self) -> &Path {
        self.file.dir()
    }

    /// Everything known about every token.
    pub fn status(&self) -> Result<SimState, SimError> {
        self.file.read()
    }

    /// One token's state (defaults if nothing was said about it yet).
    pub fn token(&self, serial: &str) -> Result<TokenState, SimError> {
        check_serial(serial)?;
        Ok(self.file.read()?.token(serial).cloned().unwrap_or_default())
    }

    /// Changes one token's state under the lock and returns the new state.
    pub fn update(
        &self,
        serial: &str,
        change: impl FnOnce(&mut TokenState),
    ) -> Result<TokenState, SimError> {
        check_serial(serial)?;
        self.file.update(|state| {
            let token = state.token_mut(serial);
            change(token);
            token.clone()
        })
    }

    /// Pulls the token out: its slot shows no token, its sessions fail with
    /// CKR_DEVICE_REMOVED.
    pub fn unplug(&self, serial: &str) -> Result<(), SimError> {
        self.update(serial, |t| t.set_plugged(false)).map(drop)
    }

    /// Plugs the token back in (the same token, with its objects; old sessions are gone).
    pub fn plug(&self, serial: &str) -> Result<(), SimError> {
        self.update(serial, |t| t.set_plugged(true)).map(drop)
    }

    /// Arms a fault. Its call count starts at zero now.
    pub fn add_fault(&self, serial: &str, fault: Fault) -> Result<(), SimError> {
        if !is_function(&fault.function) && !skf::is_skf_function(&fault.function) {
            return Err(SimError::UnknownFunction(fault.function));
        }
        if fault.nth == 0 {
            return Err(SimError::InvalidArgument(
                "a fault's call number counts from 1".into(),
            ));
        }
        if let FaultAction::Fail { rv } = &fault.action
            && (if skf::is_skf_function(&fault.function) {
                ukey_skf::Sar::from_name(rv).is_none()
            } else {
                rv_from_name(rv).is_none()
            })
        {
            return Err(SimError::UnknownReturnValue(rv.clone()));
        }
        let fault = Fault {
            calls: 0,
            fired: 0,
            ..fault
        };
        self.update(serial, |t| t.faults.push(fault)).map(drop)
    }

    /// Makes C_GetTokenInfo report these fields as a vendor's module would (an empty
    /// override restores SoftHSM2's own). Hex fields must be hex of at most the
    /// field's size (label and manufacturerID 32 bytes, model and serialNumber 16).
    pub fn set_token_info(&self, serial: &str, info: TokenInfoOverride) -> Result<(), SimError> {
        for (name, value, max) in [
            ("label", &info.label_hex, 32),
            ("manufacturer", &info.manufacturer_hex, 32),
            ("model", &info.model_hex, 16),
            ("serial", &info.serial_hex, 16),
        ] {
            if let Some(v) = value {
                let bytes = hex::decode(v)
                    .map_err(|e| SimError::InvalidArgument(format!("{name}: not hex: {e}")))?;
                if bytes.len() > max {
                    return Err(SimError::InvalidArgument(format!(
                        "{name}: {} bytes, the field holds {max}",
                        bytes.len()
                    )));
                }
            }
        }
        if info.utc_time.as_ref().is_some_and(|t| t.len() > 16) {
            return Err(SimError::InvalidArgument("utcTime holds 16 bytes".into()));
        }
        self.update(serial, |t| t.token_info = info).map(drop)
    }

    /// Makes C_GetMechanismInfo report key sizes `min`..=`max` bits for `mechanism` (a
    /// CKM_ value) on the token, as a chip that generates only those; `None` restores
    /// SoftHSM2's range.
    pub fn set_key_sizes(
        &self,
        serial: &str,
        mechanism: u64,
        range: Option<(u64, u64)>,
    ) -> Result<(), SimError> {
        if let Some((min, max)) = range
            && min > max
        {
            return Err(SimError::InvalidArgument(format!(
                "key sizes: min {min} is above max {max}"
            )));
        }
        self.update(serial, |t| match range {
            Some(r) => {
                t.key_sizes.insert(mechanism.to_string(), r);
            }
            None => {
                t.key_sizes.remove(&mechanism.to_string());
            }
        })
        .map(drop)
    }

    /// Makes the token a GM key speaking the vendor profile `name` (see
    /// [`gm::PROFILES`]), or a plain key again with `None`. SM2 keys already on it stay.
    pub fn set_gm(&self, serial: &str, name: Option<&str>) -> Result<(), SimError> {
        if let Some(name) = name
            && gm::profile(name).is_none()
        {
            return Err(SimError::InvalidArgument(format!(
                "unknown GM profile {name:?} (known: {})",
                gm::PROFILES
                    .iter()
                    .map(|p| p.name)
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        self.update(serial, |t| t.gm = name.map(str::to_owned))
            .map(drop)
    }

    /// Disarms every fault of the token.
    pub fn clear_faults(&self, serial: &str) -> Result<(), SimError> {
        self.update(serial, |t| t.faults.clear()).map(drop)
    }

    /// Delays every call of `function` on the token by `delay` (zero removes it).
    pub fn set_latency(
        &self,
        serial: &str,
        function: &str,
        delay: Duration,
    ) -> Result<(), SimError> {
        if !is_function(function) && !skf::is_skf_function(function) {
            return Err(SimError::UnknownFunction(function.to_owned()));
        }
        let ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
        self.update(serial, |t| {
            if ms == 0 {
                t.latency_ms.remove(function);
            } else {
                t.latency_ms.insert(function.to_owned(), ms);
            }
        })
        .map(drop)
    }

    /// Removes every delay of the token.
    pub fn clear_latency(&self, serial: &str) -> Result<(), SimError> {
        self.update(serial, |t| t.latency_ms.clear()).map(drop)
    }

    /// Sets how many wrong user PINs in a row lock the token (keeps the failures so far).
    pub fn set_pin_tries(&self, serial: &str, max_tries: u32) -> Result<(), SimError> {
        if !(1..=100).contains(&max_tries) {
            return Err(SimError::InvalidArgument(format!(
                "PIN tries must be 1 to 100, not {max_tries}"
            )));
        }
        self.update(serial, |t| t.pin.max_tries = max_tries)
            .map(drop)
    }

    /// Clears the failure count (unlocks), as the CA's unlock (SO C_InitPIN) does.
    pub fn reset_pin_counter(&self, serial: &str) -> Result<(), SimError> {
        self.update(serial, |t| t.pin.failures = 0).map(drop)
    }
}

fn check_serial(serial: &str) -> Result<(), SimError> {
    let ok =
        !serial.is_empty() && serial.len() <= 16 && serial.bytes().all(|b| b.is_ascii_graphic());
    if ok {
        Ok(())
    } else {
        Err(SimError::InvalidSerial(serial.to_owned()))
    }
}

/// The state directory in this environment: `UKEY_SIM_STATE`; else `ukey-sim-state`
/// next to `SOFTHSM2_CONF` (one state per SoftHSM2 installation, whose serials it
/// names); else `ukey-sim-state` in the temp directory.
pub fn default_state_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os(STATE_ENV).filter(|v| !v.is_empty()) {
        return PathBuf::from(dir);
    }
    if let Some(conf) = std::env::var_os("SOFTHSM2_CONF").filter(|v| !v.is_empty())
        && let Some(parent) = Path::new(&conf).parent()
    {
        return parent.join("ukey-sim-state");
    }
    std::env::temp_dir().join("ukey-sim-state")
}

/// SoftHSM2's PKCS#11 module: `UKEY_SIM_BACKEND`, `SOFTHSM2_MODULE`, or the usual
/// Debian, Fedora, Homebrew paths.
pub fn softhsm_module() -> Result<PathBuf, SimError> {
    for var in [BACKEND_ENV, "SOFTHSM2_MODULE"] {
        if let Some(path) = std::env::var_os(var).filter(|v| !v.is_empty()) {
            return Ok(PathBuf::from(path));
        }
    }
    const CANDIDATES: &[&str] = &[
        "/usr/lib/softhsm/libsofthsm2.so",
        "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
        "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
        "/usr/lib64/pkcs11/libsofthsm2.so",
        "/usr/lib/pkcs11/libsofthsm2.so",
        "/usr/lib64/softhsm/libsofthsm2.so",
        "/usr/local/lib/softhsm/libsofthsm2.so",
        "/opt/homebrew/lib/softhsm/libsofthsm2.so",
    ];
    CANDIDATES
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .ok_or_else(|| SimError::NotFound {
            what: "SoftHSM2 module (libsofthsm2.so; set UKEY_SIM_BACKEND)",
            looked_in: CANDIDATES.join(", "),
        })
}

/// File name of the shim module on this platform (`libukey_sim.so`).
pub fn module_file_name() -> String {
    format!(
        "{}ukey_sim{}",
        std::env::consts::DLL_PREFIX,
        std::env::consts::DLL_SUFFIX
    )
}

/// The built shim module: `UKEY_SIM_MODULE`, else found from the running executable in
/// a cargo target directory (`target/<profile>/` and its `deps/`, newest first), so that
/// tests and the demo load the module built with them.
pub fn module_path() -> Result<PathBuf, SimError> {
    if let Some(path) = std::env::var_os(MODULE_ENV).filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(path));
    }
    let name = module_file_name();
    let exe = std::env::current_exe().map_err(|source| SimError::Io {
        path: PathBuf::from("/proc/self/exe"),
        source,
    })?;
    let mut candidates = Vec::new();
    for dir in exe.ancestors().skip(1).take(3) {
        candidates.push(dir.join(&name));
        candidates.push(dir.join("deps").join(&name));
    }
    let newest = candidates
        .iter()
        .filter_map(|p| {
            let modified = std::fs::metadata(p).and_then(|m| m.modified()).ok()?;
            Some((modified, p))
        })
        .max_by_key(|(modified, _)| *modified)
        .map(|(_, p)| p.clone());
    newest.ok_or_else(|| SimError::NotFound {
        what: "ukey-sim module (build it with `cargo build -p ukey-sim`, or set UKEY_SIM_MODULE)",
        looked_in: candidates
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", "),
    })
}
