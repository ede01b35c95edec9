//! `SoftHsm`: a private SoftHSM2 installation (config, token directory, test CA).

use std::ffi::OsStr;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, MutexGuard, OnceLock};

use tempfile::TempDir;

use crate::ca::TestCa;
use crate::spec::{TokenFixture, TokenSpec};
use crate::{FixtureError, softhsm_module};

/// The environment variable SoftHSM2 reads its configuration path from.
pub const SOFTHSM2_CONF: &str = "SOFTHSM2_CONF";

/// Serialises, within one process, everything that sets SOFTHSM2_CONF or initialises
/// the module: a PKCS#11 module is one global state per process.
static PROCESS_LOCK: Mutex<()> = Mutex::new(());

pub(crate) fn process_lock() -> MutexGuard<'static, ()> {
    // A panic while holding the lock leaves nothing half-done that a later caller
    // could trip over (each user initialises and finalises on its own), so a
    // poisoned lock is still good to use.
    PROCESS_LOCK
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A private SoftHSM2 installation: a directory (on tmpfs /dev/shm when available)
/// holding `softhsm2.conf`, a `tokens/` directory with one subdirectory per token,
/// and the test CA's PEM files. Removed on drop unless opened with [`SoftHsm::at`].
pub struct SoftHsm {
    dir: PathBuf,
    conf_path: PathBuf,
    token_dir: PathBuf,
    module: PathBuf,
    ca: OnceLock<TestCa>,
    ca_lock: Mutex<()>,
    // Last field: dropped (directory removed) after everything else.
    _temp: Option<TempDir>,
}

impl std::fmt::Debug for SoftHsm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SoftHsm")
            .field("dir", &self.dir)
            .field("module", &self.module)
            .field("persistent", &self._temp.is_none())
            .finish_non_exhaustive()
    }
}

impl SoftHsm {
    /// A fresh installation in a temporary directory under /dev/shm when it exists and
    /// is writable (token writes are then fast), else under the system temp directory.
    /// The directory is removed when the `SoftHsm` is dropped.
    pub fn new() -> Result<SoftHsm, FixtureError> {
        let module = softhsm_module()?;
        let base = fast_temp_base();
        let temp = tempfile::Builder::new()
            .prefix("softhsm-fixtures-")
            .tempdir_in(&base)
            .map_err(FixtureError::io("create a temporary directory in", &base))?;
        let dir = temp.path().to_owned();
        let mut hsm = Self::open(&dir, module)?;
        hsm._temp = Some(temp);
        Ok(hsm)
    }

    /// Creates, or reopens, a persistent installation in `dir` (kept on drop): the
    /// CLI and the demo use this, and so can several processes in turn.
    pub fn at(dir: &Path) -> Result<SoftHsm, FixtureError> {
        let module = softhsm_module()?;
        fs::create_dir_all(dir).map_err(FixtureError::io("create directory", dir))?;
        let dir = std::path::absolute(dir).map_err(FixtureError::io("resolve", dir))?;
        Self::open(&dir, module)
    }

    fn open(dir: &Path, module: PathBuf) -> Result<SoftHsm, FixtureError> {
        let token_dir = dir.join("tokens");
        fs::create_dir_all(&token_dir).map_err(FixtureError::io("create directory", &token_dir))?;
        let conf_path = dir.join("softhsm2.conf");
        let conf = format!(
            "# Written by softhsm-fixtures: a private SoftHSM2 for UKey Renew tests.\n\
             directories.tokendir = {}\n\
             objectstore.backend = file\n\
             log.level = ERROR\n\
             slots.removable = true\n",
            token_dir.display()
        );
        if fs::read_to_string(&conf_path).ok().as_deref() != Some(conf.as_str()) {
            fs::write(&conf_path, conf).map_err(FixtureError::io("write", &conf_path))?;
        }
        Ok(SoftHsm {
            dir: dir.to_owned(),
            conf_path,
            token_dir,
            module,
            ca: OnceLock::new(),
            ca_lock: Mutex::new(()),
            _temp: None,
        })
    }

    /// The installation's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Path of `softhsm2.conf`: the value for SOFTHSM2_CONF.
    pub fn conf_path(&self) -> &Path {
        &self.conf_path
    }

    /// The directory SoftHSM2 keeps its tokens in (one subdirectory per token).
    pub fn token_dir(&self) -> &Path {
        &self.token_dir
    }

    /// The SoftHSM2 PKCS#11 module in use.
    pub fn module_path(&self) -> &Path {
        &self.module
    }

    /// Sets SOFTHSM2_CONF for THIS process, so that a module initialised afterwards in
    /// this process uses this installation. Meant for tests, which own their process
    /// under nextest; call it before anything in the process initialises the module.
    pub fn activate(&self) {
        let _guard = process_lock();
        set_softhsm2_conf(&self.conf_path);
    }

    /// A `Command` for `program` with SOFTHSM2_CONF set to this installation (for
    /// `ukey`, `softhsm2-util`, `pkcs11-tool`...), without touching this process's
    /// environment.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut command = Command::new(program);
        command.env(SOFTHSM2_CONF, &self.conf_path);
        command
    }

    /// The test CA (root + issuing CA), created on first use and kept in `dir()`.
    pub fn ca(&self) -> Result<&TestCa, FixtureError> {
        if let Some(ca) = self.ca.get() {
            return Ok(ca);
        }
        let _guard = self.ca_lock.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(ca) = self.ca.get() {
            return Ok(ca);
        }
        let ca = TestCa::load_or_create(&self.dir)?;
        Ok(self.ca.get_or_init(|| ca))
    }

    /// Creates a token (C_InitToken on the free slot, user PIN set) and writes its key
    /// pairs and certificates, in-process through cryptoki, then finalizes the module,
    /// so that the code under test can C_Initialize it afterwards in this process.
    /// Activates `self` first. Fails with [`FixtureError::ModuleInUse`] when something
    /// else in this process has the module initialised.
    pub fn create_token(&self, spec: &TokenSpec) -> Result<TokenFixture, FixtureError> {
        crate::token::validate(spec)?;
        let ca = self.ca()?;
        let _guard = process_lock();
        set_softhsm2_conf(&self.conf_path);
        crate::token::create(&self.module, &self.conf_path, ca, spec).map_err(|failed| {
            if let Some(serial) = &failed.half_built {
                // Best effort: the error that matters is the one being returned.
                let _ = self.delete_token_locked(serial);
            }
            failed.error
        })
    }

    /// Like [`SoftHsm::create_token`], but in a child process running the
    /// `softhsm-fixtures` CLI (see [`fixtures_cli`]): for a test whose own process
    /// already has the module initialised, a watcher test for instance. The new token
    /// is seen by this process after its next C_Finalize + C_Initialize.
    pub fn create_token_in_child(&self, spec: &TokenSpec) -> Result<TokenFixture, FixtureError> {
        use std::io::Write;
        use std::process::Stdio;

        crate::token::validate(spec)?;
        // The CA files must exist before the child looks for them, or both would
        // create one.
        self.ca()?;
        let program = fixtures_cli()?;
        let json = serde_json::to_string(spec)
            .map_err(|e| FixtureError::InvalidSpec(format!("cannot serialise the spec: {e}")))?;
        let mut child = self
            .command(&program)
            .arg("--dir")
            .arg(&self.dir)
            .args(["create", "--spec", "-", "--json"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(FixtureError::io("run", &program))?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin
                .write_all(json.as_bytes())
                .map_err(FixtureError::io("write the spec to", &program))?;
        }
        let output = child
            .wait_with_output()
            .map_err(FixtureError::io("run", &program))?;
        if !output.status.success() {
            return Err(FixtureError::Tool {
                program: program.display().to_string(),
                status: output.status.to_string(),
                stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
            });
        }
        serde_json::from_slice(&output.stdout).map_err(|e| FixtureError::Tool {
            program: program.display().to_string(),
            status: output.status.to_string(),
            stderr: format!("unreadable JSON on stdout: {e}"),
        })
    }

    /// Deletes the token with this serial (its directory under `token_dir()`), with
    /// `softhsm2-util --delete-token`. Processes that have the module initialised keep
    /// a stale slot until they re-initialise.
    pub fn delete_token(&self, token_serial: &str) -> Result<(), FixtureError> {
        let serial = token_serial.trim();
        if serial.is_empty() || !serial.chars().all(|c| c.is_ascii_alphanumeric()) {
            return Err(FixtureError::InvalidSpec(format!(
                "token serial {token_serial:?} is not a SoftHSM2 serial"
            )));
        }
        let _guard = process_lock();
        self.delete_token_locked(serial)
    }

    fn delete_token_locked(&self, serial: &str) -> Result<(), FixtureError> {
        let before = self.token_dirs()?;
        let output = self
            .command("softhsm2-util")
            .args(["--delete-token", "--serial", serial])
            .output()
            .map_err(|source| {
                if source.kind() == std::io::ErrorKind::NotFound {
                    FixtureError::SoftHsmNotInstalled {
                        searched: "softhsm2-util in PATH".to_owned(),
                    }
                } else {
                    FixtureError::io("run", "softhsm2-util")(source)
                }
            })?;
        let stderr = String::from_utf8_lossy(&output.stderr).trim().to_owned();
        let stdout = String::from_utf8_lossy(&output.stdout).trim().to_owned();
        if !output.status.success() {
            if stderr.contains("Could not find") || stdout.contains("Could not find") {
                return Err(FixtureError::TokenNotFound {
                    serial: serial.to_owned(),
                    dir: self.dir.clone(),
                });
            }
            return Err(FixtureError::Tool {
                program: "softhsm2-util --delete-token".to_owned(),
                status: output.status.to_string(),
                stderr: if stderr.is_empty() { stdout } else { stderr },
            });
        }
        if self.token_dirs()?.len() >= before.len() {
            return Err(FixtureError::Tool {
                program: "softhsm2-util --delete-token".to_owned(),
                status: output.status.to_string(),
                stderr: format!("no token directory was removed ({stdout})"),
            });
        }
        Ok(())
    }

    /// The token directories now on disk (one per initialised token).
    pub fn token_dirs(&self) -> Result<Vec<PathBuf>, FixtureError> {
        let entries =
            fs::read_dir(&self.token_dir).map_err(FixtureError::io("list", &self.token_dir))?;
        let mut dirs = Vec::new();
        for entry in entries {
            let entry = entry.map_err(FixtureError::io("list", &self.token_dir))?;
            if entry.path().is_dir() {
                dirs.push(entry.path());
            }
        }
        dirs.sort();
        Ok(dirs)
    }
}

/// The `softhsm-fixtures` CLI binary: env `SOFTHSM_FIXTURES_BIN`, else next to the
/// running test binary (`target/<profile>/softhsm-fixtures`, built by
/// `cargo build -p softhsm-fixtures` or any workspace-wide test run).
pub fn fixtures_cli() -> Result<PathBuf, FixtureError> {
    if let Some(path) = std::env::var_os("SOFTHSM_FIXTURES_BIN").filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(path));
    }
    let name = format!("softhsm-fixtures{}", std::env::consts::EXE_SUFFIX);
    let exe =
        std::env::current_exe().map_err(FixtureError::io("locate", "the current executable"))?;
    let candidates: Vec<PathBuf> = exe
        .ancestors()
        .skip(1)
        .take(2)
        .map(|dir| dir.join(&name))
        .collect();
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .ok_or_else(|| FixtureError::CliNotFound {
            searched: candidates
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
        })
}

/// /dev/shm when it is a writable directory, else the system temp directory.
fn fast_temp_base() -> PathBuf {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() && tempfile::tempdir_in(shm).is_ok() {
        shm.to_owned()
    } else {
        std::env::temp_dir()
    }
}

/// The installation this process activated last.
static ACTIVATED: Mutex<Option<PathBuf>> = Mutex::new(None);

/// What a second installation in one process means, and what to run instead.
pub const ONE_PROCESS_PER_TEST: &str = "these tests need one process per test: \
    SOFTHSM2_CONF is process-wide and a PKCS#11 module is initialised once per process, \
    so each test makes its own SoftHSM2 installation in its own process. Plain `cargo test` \
    runs many tests in one process; run `cargo xtask test` (everything) or `cargo nextest \
    run` (the Rust tests) instead.";

/// Sets SOFTHSM2_CONF in this process's environment.
#[allow(unsafe_code)]
fn set_softhsm2_conf(path: &Path) {
    {
        let mut active = ACTIVATED.lock().unwrap_or_else(|p| p.into_inner());
        match active.as_deref() {
            // Another installation still alive (its directory is removed on drop): two
            // tests share this process. One after the other is fine.
            Some(p) if p != path && p.exists() => panic!("{ONE_PROCESS_PER_TEST}"),
            _ => *active = Some(path.to_owned()),
        }
    }
    if std::env::var_os(SOFTHSM2_CONF).as_deref() == Some(path.as_os_str()) {
        return;
    }
    // SAFETY: `set_var` is unsound only when another thread reads or writes the
    // environment at the same time. The contract of `SoftHsm::activate` and
    // `create_token` is that they are called by a test that owns its process (nextest
    // runs each test in its own process) before any code in it initialises the PKCS#11
    // module, which is the only other reader of SOFTHSM2_CONF; our own readers are
    // serialised by PROCESS_LOCK, which the callers hold.
    unsafe { std::env::set_var(SOFTHSM2_CONF, path) }
}

#[cfg(test)]
mod one_process {
    use super::*;

    /// Plain `cargo test` runs many tests in one process: the second installation
    /// stops with a message that says what to run instead.
    #[test]
    #[should_panic(expected = "cargo xtask test")]
    fn a_second_installation_in_one_process_stops_with_a_message() {
        let a = SoftHsm::new().unwrap();
        let b = SoftHsm::new().unwrap();
        a.activate();
        a.activate();
        b.activate();
    }
}
