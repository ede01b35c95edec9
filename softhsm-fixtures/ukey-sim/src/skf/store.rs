//! The software SKF devices on disk: one JSON file per device, `skf/<serial>.json` in
//! the state directory, read by every call and replaced atomically (temp file + rename,
//! under the state directory's lock) by every change, so that a write either happened
//! or did not, as a card's file update does, and several processes see one device.
//!
//! The device's private keys are in this file, readable by its owner only (0600): it is
//! a test double, and what it promises is the interface's, that no function of the
//! library gives a private key out.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::SimError;
use crate::state::StateFile;

const FORMAT_VERSION: u32 = 1;

/// One SKF device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SkfDevice {
    /// Format version of the file.
    pub version: u32,
    /// `DEVINFO.SerialNumber`; also the key of the device's simulated hardware state
    /// (plugged, PIN counter, faults, latency) in `state.json`.
    pub serial: String,
    /// The name `SKF_EnumDev` lists (a reader's name on real devices).
    pub name: String,
    /// `DEVINFO.Label`.
    pub label: String,
    /// `DEVINFO.Manufacturer`.
    pub manufacturer: String,
    /// `DEVINFO.Issuer`.
    pub issuer: String,
    /// `DEVINFO.Label` as raw bytes (hex), as a vendor's library fills it (GBK text);
    /// `None`: `label` in UTF-8.
    #[serde(default)]
    pub label_hex: Option<String>,
    /// Applications.
    pub apps: Vec<SkfApp>,
}

/// An application: PINs, containers and files.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SkfApp {
    /// Name.
    pub name: String,
    /// The user PIN (its retry counter is the device's `pin` in `state.json`).
    pub user_pin: PinRecord,
    /// The admin (SO) PIN.
    pub admin_pin: PinRecord,
    /// The user PIN is still the one it was made with.
    pub user_pin_default: bool,
    /// Containers, in creation order.
    pub containers: Vec<SkfContainer>,
    /// Files, by name, hex content.
    #[serde(default)]
    pub files: BTreeMap<String, String>,
}

/// A PIN as its salted SM3 hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PinRecord {
    /// Salt, hex.
    pub salt: String,
    /// SM3(salt ‖ PIN), hex.
    pub hash: String,
}

impl PinRecord {
    /// The record of `pin`.
    pub fn new(pin: &str) -> Result<PinRecord, SimError> {
        let mut salt = [0u8; 16];
        getrandom::fill(&mut salt)
            .map_err(|e| SimError::InvalidArgument(format!("no randomness: {e}")))?;
        Ok(PinRecord {
            salt: hex::encode(salt),
            hash: hex::encode(pin_hash(&salt, pin.as_bytes())),
        })
    }

    /// Does `pin` match?
    pub fn matches(&self, pin: &[u8]) -> bool {
        let Ok(salt) = hex::decode(&self.salt) else {
            return false;
        };
        hex::encode(pin_hash(&salt, pin)) == self.hash
    }
}

fn pin_hash(salt: &[u8], pin: &[u8]) -> [u8; 32] {
    use sm3::Digest;
    let mut h = sm3::Sm3::new();
    h.update(salt);
    h.update(pin);
    h.finalize().into()
}

/// A container: a signing and an encryption half.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SkfContainer {
    /// Name.
    pub name: String,
    /// An RSA container (its keys are listed, not used: the sim does no RSA).
    #[serde(default)]
    pub rsa: bool,
    /// The signing key pair and certificate.
    pub sign: KeyHalf,
    /// The encryption key pair and certificate.
    pub enc: KeyHalf,
}

impl SkfContainer {
    /// `SKF_GetContainerType`: 0 empty, 1 RSA, 2 ECC.
    pub fn container_type(&self) -> u32 {
        if self.sign.public.is_none() && self.enc.public.is_none() {
            0
        } else if self.rsa {
            1
        } else {
            2
        }
    }

    /// The half `SKF_*(…, bSignFlag, …)` names.
    pub fn half(&self, sign: bool) -> &KeyHalf {
        if sign { &self.sign } else { &self.enc }
    }

    /// The same, to change.
    pub fn half_mut(&mut self, sign: bool) -> &mut KeyHalf {
        if sign { &mut self.sign } else { &mut self.enc }
    }
}

/// One key pair of a container and its certificate.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyHalf {
    /// The SM2 private scalar, hex (never given out by the library).
    pub scalar: Option<String>,
    /// The public key, hex: an SM2 point (65 bytes, uncompressed), or an RSA key's
    /// SubjectPublicKeyInfo.
    pub public: Option<String>,
    /// The certificate, DER hex.
    pub cert: Option<String>,
}

impl KeyHalf {
    /// The scalar's bytes.
    pub fn scalar_bytes(&self) -> Option<Vec<u8>> {
        self.scalar.as_deref().and_then(|h| hex::decode(h).ok())
    }

    /// The public key's bytes.
    pub fn public_bytes(&self) -> Option<Vec<u8>> {
        self.public.as_deref().and_then(|h| hex::decode(h).ok())
    }

    /// The certificate's bytes.
    pub fn cert_bytes(&self) -> Option<Vec<u8>> {
        self.cert.as_deref().and_then(|h| hex::decode(h).ok())
    }
}

impl SkfDevice {
    /// A new device with one application, `app`, holding no container.
    pub fn new(
        serial: &str,
        label: &str,
        app: &str,
        user_pin: &str,
        admin_pin: &str,
    ) -> Result<SkfDevice, SimError> {
        Ok(SkfDevice {
            version: FORMAT_VERSION,
            serial: serial.to_owned(),
            name: format!("ukey-sim SKF {serial}"),
            label: label.to_owned(),
            manufacturer: "ukey-sim".to_owned(),
            issuer: "ukey-sim".to_owned(),
            label_hex: None,
            apps: vec![SkfApp {
                name: app.to_owned(),
                user_pin: PinRecord::new(user_pin)?,
                admin_pin: PinRecord::new(admin_pin)?,
                user_pin_default: true,
                containers: Vec::new(),
                files: BTreeMap::new(),
            }],
        })
    }

    /// The application named `name`.
    pub fn app(&self, name: &str) -> Option<&SkfApp> {
        self.apps.iter().find(|a| a.name == name)
    }

    /// The same, to change.
    pub fn app_mut(&mut self, name: &str) -> Option<&mut SkfApp> {
        self.apps.iter_mut().find(|a| a.name == name)
    }
}

impl SkfApp {
    /// The container named `name`.
    pub fn container(&self, name: &str) -> Option<&SkfContainer> {
        self.containers.iter().find(|c| c.name == name)
    }

    /// The same, to change.
    pub fn container_mut(&mut self, name: &str) -> Option<&mut SkfContainer> {
        self.containers.iter_mut().find(|c| c.name == name)
    }
}

/// The devices of one state directory.
#[derive(Debug, Clone)]
pub struct SkfStore {
    state: StateFile,
}

impl SkfStore {
    /// The devices kept in the state directory `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> SkfStore {
        SkfStore {
            state: StateFile::new(dir),
        }
    }

    /// The state directory.
    pub fn state(&self) -> &StateFile {
        &self.state
    }

    fn dir(&self) -> PathBuf {
        self.state.dir().join("skf")
    }

    fn path(&self, serial: &str) -> PathBuf {
        self.dir().join(format!("{serial}.json"))
    }

    /// Every device's serial, sorted.
    pub fn serials(&self) -> Result<Vec<String>, SimError> {
        let dir = self.dir();
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => return Err(SimError::Io { path: dir, source }),
        };
        let mut out: Vec<String> = entries
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                name.strip_suffix(".json").map(str::to_owned)
            })
            .collect();
        out.sort();
        Ok(out)
    }

    /// One device, if it exists.
    pub fn get(&self, serial: &str) -> Result<Option<SkfDevice>, SimError> {
        let path = self.path(serial);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(SimError::Io { path, source }),
        };
        let device: SkfDevice =
            serde_json::from_slice(&bytes).map_err(|source| SimError::Corrupt {
                path: path.clone(),
                source,
            })?;
        if device.version > FORMAT_VERSION {
            return Err(SimError::NewerFormat {
                path,
                version: device.version,
            });
        }
        Ok(Some(device))
    }

    /// Creates a device; refuses a serial that exists.
    pub fn create(&self, device: &SkfDevice) -> Result<(), SimError> {
        self.state.locked(|| {
            if self.get(&device.serial)?.is_some() {
                return Err(SimError::InvalidArgument(format!(
                    "an SKF device with serial {} exists",
                    device.serial
                )));
            }
            self.write(device)
        })
    }

    /// Deletes a device (its simulated hardware state in `state.json` stays).
    pub fn delete(&self, serial: &str) -> Result<bool, SimError> {
        self.state.locked(|| {
            let path = self.path(serial);
            match std::fs::remove_file(&path) {
                Ok(()) => Ok(true),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
                Err(source) => Err(SimError::Io { path, source }),
            }
        })
    }

    /// Locked read-modify-write of one device: the device is written when `change`
    /// succeeded and altered it; a failed `change` writes nothing.
    pub fn update<R, E>(
        &self,
        serial: &str,
        change: impl FnOnce(&mut SkfDevice) -> Result<R, E>,
    ) -> Result<Result<R, E>, SimError> {
        self.state.locked(|| {
            let Some(before) = self.get(serial)? else {
                return Err(SimError::NotFound {
                    what: "SKF device",
                    looked_in: self.path(serial).display().to_string(),
                });
            };
            let mut device = before.clone();
            let result = change(&mut device);
            if result.is_ok() && device != before {
                self.write(&device)?;
            }
            Ok(result)
        })
    }

    fn write(&self, device: &SkfDevice) -> Result<(), SimError> {
        let dir = self.dir();
        std::fs::create_dir_all(&dir).map_err(|source| SimError::Io {
            path: dir.clone(),
            source,
        })?;
        let path = self.path(&device.serial);
        let json = serde_json::to_vec_pretty(device).map_err(|source| SimError::Corrupt {
            path: path.clone(),
            source,
        })?;
        write_private(&dir, &path, &json)
    }
}

/// Writes `bytes` to `path` through a 0600 temp file in `dir` and a rename.
fn write_private(dir: &Path, path: &Path, bytes: &[u8]) -> Result<(), SimError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let temp = dir.join(format!(
        ".{}.{}.tmp",
        path.file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("device"),
        std::process::id()
    ));
    let io = |source| SimError::Io {
        path: temp.clone(),
        source,
    };
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&temp)
        .map_err(io)?;
    file.write_all(bytes).map_err(io)?;
    drop(file);
    std::fs::rename(&temp, path).map_err(|source| {
        let _ = std::fs::remove_file(&temp);
        SimError::Io {
            path: path.to_path_buf(),
            source,
        }
    })
}
