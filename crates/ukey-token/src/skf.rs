//! SKF keys (GM/T 0016) behind the same [`Module`](crate::Module) as PKCS#11 tokens:
//! an SKF library's devices are listed, watched and refreshed as tokens, one token per
//! device application (an application has its own PIN and containers, as a PKCS#11
//! token has), with the PIN's tries left, which SKF reports and PKCS#11 cannot.
//!
//! How SKF's objects appear as a token's:
//! - a **container** holds a signing and an encryption key pair, each with its
//!   certificate; its name plays the CKA_ID's part: both certificates of a container
//!   carry its name as their `key_id` (as container-style PKCS#11 modules give both
//!   pairs one CKA_ID), and keys are told apart by their public key;
//! - a certificate's key is there when the container's half exports a public key
//!   (SKF has no public-key-only objects); a container with a key and no certificate
//!   is an orphan key;
//! - RSA containers are listed with their certificates; the backend uses SM2 only.
//!
//! [`SkfSession`] is the SKF side of a renewal or a self-test: one device connection
//! and one open application, the PIN verified once.

use std::path::Path;
use std::sync::Arc;

use secrecy::SecretString;
use ukey_skf::{Application, ContainerKind, Half, SkfError, SkfLibrary};

use crate::certificate::CertificateDetails;
use crate::config::Interface;
use crate::error::{Error, Pkcs11Call, Result, TokenName};
use crate::listing::{CertificateEntry, KeyEntry, KeyEvidence, TokenListing};
use crate::module::{LibraryInfo, PinState, TokenFlags, TokenSummary};

/// The SKF side of a [`Module`](crate::Module).
#[derive(Debug)]
pub struct SkfBackend {
    lib: Arc<SkfLibrary>,
}

/// Maps an SKF failure to this crate's error, naming the token.
pub fn map_error(e: SkfError, token: Option<&TokenSummary>) -> Error {
    let name = token.map(|t| Box::new(t.name()));
    let call = |function: &str, sar: ukey_skf::Sar| Pkcs11Call::skf(function, sar.0, sar.name());
    match e {
        SkfError::PinIncorrect { remaining } => Error::PinIncorrect {
            token: name,
            call: call("SKF_VerifyPIN", ukey_skf::Sar::PIN_INCORRECT),
            tries_left: Some(remaining),
        },
        SkfError::PinLocked => Error::PinLocked {
            token: name,
            call: call("SKF_VerifyPIN", ukey_skf::Sar::PIN_LOCKED),
        },
        SkfError::Call { function, sar } if sar == ukey_skf::Sar::DEVICE_REMOVED => {
            Error::TokenRemoved {
                token: name,
                call: call(function, sar),
            }
        }
        SkfError::Call { function, sar } if sar == ukey_skf::Sar::NO_ROOM => Error::DeviceMemory {
            token: name,
            call: call(function, sar),
        },
        SkfError::Call { function, sar } if sar == ukey_skf::Sar::PIN_LEN_RANGE => {
            Error::PinLenRange {
                token: name,
                call: call(function, sar),
            }
        }
        SkfError::Call { function, sar } => Error::Skf {
            token: name,
            call: call(function, sar),
        },
        SkfError::Load { path, message } => Error::ModuleInvalid {
            path,
            reason: message,
        },
        SkfError::Missing(function) => Error::NotSupported {
            what: format!("the SKF library has no {function}"),
        },
        SkfError::Blob { function, source } => Error::ObjectInvalid {
            what: format!("{function} answered a malformed structure: {source}"),
        },
        other => Error::ObjectInvalid {
            what: other.to_string(),
        },
    }
}

impl SkfBackend {
    pub(crate) fn load(path: &Path) -> Result<SkfBackend> {
        if !path.exists() {
            return Err(Error::ModuleNotFound {
                path: Some(path.to_owned()),
                searched: vec![path.to_owned()],
            });
        }
        let lib = SkfLibrary::load(path).map_err(|e| map_error(e, None))?;
        tracing::debug!(library = %path.display(), "SKF library loaded");
        Ok(SkfBackend { lib })
    }

    pub(crate) fn library_info(&self) -> LibraryInfo {
        LibraryInfo {
            manufacturer: String::new(),
            description: "SKF (GM/T 0016) library".to_owned(),
            version: String::new(),
            cryptoki_version: "GM/T 0016".to_owned(),
        }
    }

    /// The library.
    pub fn library(&self) -> &Arc<SkfLibrary> {
        &self.lib
    }

    /// The functions an SM2 renewal needs that the library lacks (with an escrowed
    /// encryption key: its import and the session-key self-test too).
    pub fn missing_for_renewal(&self, with_encryption: bool) -> Vec<&'static str> {
        const SIGNING: &[&str] = &[
            "SKF_CreateContainer",
            "SKF_DeleteContainer",
            "SKF_GenECCKeyPair",
            "SKF_ECCSignData",
            "SKF_ExportPublicKey",
            "SKF_ImportCertificate",
        ];
        const ENCRYPTION: &[&str] = &[
            "SKF_ImportECCKeyPair",
            "SKF_ImportSessionKey",
            "SKF_DecryptInit",
            "SKF_Decrypt",
        ];
        let extra: &[&str] = if with_encryption { ENCRYPTION } else { &[] };
        SIGNING
            .iter()
            .chain(extra)
            .copied()
            .filter(|f| !self.lib.has(f))
            .collect()
    }

    /// Every application of every present device. A device that cannot be read is
    /// skipped with a warning (it is usually being pulled out).
    pub(crate) fn tokens(&self) -> Result<Vec<TokenSummary>> {
        let names = self.lib.devices(true).map_err(|e| map_error(e, None))?;
        let mut out = Vec::new();
        for (i, name) in names.iter().enumerate() {
            match self.device_tokens(i, name) {
                Ok(t) => out.extend(t),
                Err(e) => tracing::warn!(device = %name, "skipping SKF device: {e}"),
            }
        }
        Ok(out)
    }

    fn device_tokens(&self, index: usize, name: &str) -> Result<Vec<TokenSummary>> {
        let dev = self.lib.connect(name).map_err(|e| map_error(e, None))?;
        let info = dev.info().map_err(|e| map_error(e, None))?;
        // Chinese keys' libraries often write DEVINFO text in GBK: decoded as PKCS#11
        // token info is (`quirks::text`), each oddity kept as a quirk. NUL-terminated is
        // SKF's normal form, not a quirk: only the bytes before the NUL are read.
        let mut quirks = Vec::new();
        let decoded = |field: &'static str, raw: &[u8], lossy: &str, q: &mut Vec<crate::Quirk>| {
            if raw.is_empty() {
                lossy.to_owned()
            } else {
                crate::quirks::text(field, raw, q)
            }
        };
        let device_label = decoded("Label", &info.label_raw, &info.label, &mut quirks);
        let manufacturer = decoded(
            "Manufacturer",
            &info.manufacturer_raw,
            &info.manufacturer,
            &mut quirks,
        );
        let apps = dev.applications().map_err(|e| map_error(e, None))?;
        let several = apps.len() > 1;
        let mut out = Vec::new();
        for app_name in apps {
            let app = dev
                .open_application(&app_name)
                .map_err(|e| map_error(e, None))?;
            let pin = app.user_pin_info().map_err(|e| map_error(e, None))?;
            let (id, label) = if several {
                (
                    format!("{}/{app_name}", info.serial),
                    format!("{device_label} {app_name}"),
                )
            } else {
                (info.serial.clone(), device_label.clone())
            };
            out.push(TokenSummary {
                id,
                slot_id: index as u64,
                slot_description: name.to_owned(),
                label,
                serial: info.serial.clone(),
                manufacturer: manufacturer.clone(),
                model: "SKF".to_owned(),
                hardware_version: "unknown".to_owned(),
                firmware_version: "unknown".to_owned(),
                clock: None,
                free_public_memory: Some(info.free_space as usize),
                free_private_memory: None,
                flags: TokenFlags {
                    token_initialized: true,
                    login_required: true,
                    write_protected: false,
                    rng: true,
                },
                pin: PinState {
                    initialized: true,
                    count_low: pin.remaining < pin.max_retries,
                    final_try: pin.remaining == 1,
                    locked: pin.remaining == 0,
                    to_be_changed: false,
                    protected_authentication_path: false,
                    tries_left: Some(pin.remaining),
                    max_tries: Some(pin.max_retries),
                },
                quirks: quirks.clone(),
                interface: Interface::Skf,
                application: Some(app_name),
                slot: None,
            });
        }
        Ok(out)
    }

    /// Reads the token again (PIN tries after a failed verification); fails with
    /// [`Error::TokenRemoved`] when its device is gone.
    pub(crate) fn refresh(&self, token: &TokenSummary) -> Result<TokenSummary> {
        let removed = || Error::TokenRemoved {
            token: Some(Box::new(token.name())),
            call: Pkcs11Call::skf(
                "SKF_EnumDev",
                ukey_skf::Sar::DEVICE_REMOVED.0,
                ukey_skf::Sar::DEVICE_REMOVED.name(),
            ),
        };
        let names = self
            .lib
            .devices(true)
            .map_err(|e| map_error(e, Some(token)))?;
        let index = names
            .iter()
            .position(|n| *n == token.slot_description)
            .ok_or_else(removed)?;
        self.device_tokens(index, &token.slot_description)
            .map_err(|_| removed())?
            .into_iter()
            .find(|t| t.same_token(token) && t.application == token.application)
            .ok_or_else(removed)
    }

    /// Opens the token's device and application.
    pub fn open(&self, token: &TokenSummary) -> Result<SkfSession> {
        let dev = self
            .lib
            .connect(&token.slot_description)
            .map_err(|e| map_error(e, Some(token)))?;
        let info = dev.info().map_err(|e| map_error(e, Some(token)))?;
        if info.serial != token.serial {
            return Err(Error::TokenRemoved {
                token: Some(Box::new(token.name())),
                call: Pkcs11Call::skf(
                    "SKF_GetDevInfo",
                    ukey_skf::Sar::DEVICE_REMOVED.0,
                    format!("another device ({}) is there now", info.serial),
                ),
            });
        }
        let app_name = token.application.clone().unwrap_or_default();
        let app = dev
            .open_application(&app_name)
            .map_err(|e| map_error(e, Some(token)))?;
        Ok(SkfSession {
            app,
            token: token.clone(),
        })
    }

    /// Lists one token: every container's certificates (the container's name as their
    /// `key_id`) and keys without a certificate. SKF shows certificates without the
    /// PIN; a PIN given is verified once, as PKCS#11 listing logs in.
    pub(crate) fn list_token(
        &self,
        token: &TokenSummary,
        pin: Option<&SecretString>,
    ) -> TokenListing {
        let mut listing = TokenListing {
            token: token.clone(),
            certificates: vec![],
            orphan_keys: vec![],
            private_objects_visible: true,
            errors: vec![],
        };
        let session = match self.open(token) {
            Ok(s) => s,
            Err(e) => {
                listing.errors.push(e);
                return listing;
            }
        };
        if let Some(pin) = pin
            && let Err(e) = session.login(pin)
        {
            listing.errors.push(e);
            return listing;
        }
        match session.containers() {
            Ok(containers) => {
                for c in containers {
                    c.add_to(&mut listing);
                }
            }
            Err(e) => listing.errors.push(e),
        }
        drop(session);
        match self.refresh(token) {
            Ok(now) => listing.token = now,
            Err(e) => {
                listing.certificates.clear();
                listing.orphan_keys.clear();
                listing.errors.push(e);
            }
        }
        listing
    }
}

/// What one container holds.
#[derive(Debug, Clone)]
pub struct ContainerInfo {
    /// Its name.
    pub name: String,
    /// Empty, RSA, ECC.
    pub kind: ContainerKind,
    /// The signing key's SM2 point, if any (RSA keys are not read).
    pub sign_key: Option<Vec<u8>>,
    /// The encryption key's SM2 point, if any.
    pub enc_key: Option<Vec<u8>>,
    /// The signing certificate.
    pub sign_cert: Option<Vec<u8>>,
    /// The encryption certificate.
    pub enc_cert: Option<Vec<u8>>,
}

impl ContainerInfo {
    /// The half's public point.
    pub fn key(&self, half: Half) -> Option<&[u8]> {
        match half {
            Half::Sign => self.sign_key.as_deref(),
            Half::Encrypt => self.enc_key.as_deref(),
        }
    }

    /// The half's certificate.
    pub fn cert(&self, half: Half) -> Option<&[u8]> {
        match half {
            Half::Sign => self.sign_cert.as_deref(),
            Half::Encrypt => self.enc_cert.as_deref(),
        }
    }

    fn add_to(&self, listing: &mut TokenListing) {
        let id = self.name.as_bytes().to_vec();
        for (half, role) in [(Half::Sign, "sign"), (Half::Encrypt, "enc")] {
            let key = match self.kind {
                ContainerKind::Rsa => KeyEvidence::Unknown,
                _ if self.key(half).is_some() => KeyEvidence::PrivateKey,
                _ => KeyEvidence::Absent,
            };
            match self.cert(half) {
                Some(der) => listing.certificates.push(CertificateEntry {
                    key_id: id.clone(),
                    label: format!("{} ({role})", self.name),
                    der: der.to_vec(),
                    details: CertificateDetails::from_der(der).map_err(|reason| {
                        Error::CertificateMalformed {
                            label: format!("{} ({role})", self.name),
                            key_id: hex::encode(&id),
                            reason,
                        }
                    }),
                    key,
                }),
                None if key == KeyEvidence::PrivateKey => listing.orphan_keys.push(KeyEntry {
                    class: "private",
                    key_id: hex::encode(&id),
                    label: format!("{} ({role})", self.name),
                    key_type: "SM2".to_owned(),
                }),
                None => {}
            }
        }
    }
}

/// One device connection and application, for a renewal or a self-test.
#[derive(Debug)]
pub struct SkfSession {
    app: Application,
    token: TokenSummary,
}

impl SkfSession {
    /// The token.
    pub fn token(&self) -> &TokenSummary {
        &self.token
    }

    /// The open application.
    pub fn application(&self) -> &Application {
        &self.app
    }

    /// Maps an SKF failure on this token.
    pub fn err(&self, e: SkfError) -> Error {
        map_error(e, Some(&self.token))
    }

    /// Verifies the user PIN once; a wrong PIN gives [`Error::PinIncorrect`] with the
    /// tries left. Never retried.
    pub fn login(&self, pin: &SecretString) -> Result<()> {
        self.app.verify_user_pin(pin).map_err(|e| self.err(e))
    }

    /// Every container, with its keys' public points and its certificates.
    pub fn containers(&self) -> Result<Vec<ContainerInfo>> {
        let names = self.app.containers().map_err(|e| self.err(e))?;
        names.iter().map(|n| self.container(n)).collect()
    }

    /// One container, by name.
    pub fn container(&self, name: &str) -> Result<ContainerInfo> {
        let c = self.app.open_container(name).map_err(|e| self.err(e))?;
        let kind = c.kind().map_err(|e| self.err(e))?;
        let key = |half| -> Result<Option<Vec<u8>>> {
            if kind == ContainerKind::Rsa {
                return Ok(None);
            }
            c.sm2_public_key(half).map_err(|e| self.err(e))
        };
        Ok(ContainerInfo {
            name: name.to_owned(),
            kind,
            sign_key: key(Half::Sign)?,
            enc_key: key(Half::Encrypt)?,
            sign_cert: c.certificate(Half::Sign).map_err(|e| self.err(e))?,
            enc_cert: c.certificate(Half::Encrypt).map_err(|e| self.err(e))?,
        })
    }

    /// Does the encryption key of container `name` (whose certificate's point is
    /// `point`) decrypt what is encrypted to it? SKF decrypts with an encryption key only
    /// by importing a session key: the host SM2-encrypts a random SM4 key to `point`, the
    /// key imports it (`SKF_ImportSessionKey`) and decrypts a block the host encrypted
    /// under it. `Ok(false)`: the key refused or decrypted wrongly.
    pub fn sm2_decrypts(&self, name: &str, point: &[u8]) -> Result<bool> {
        use ukey_skf::abi::EccCipherBlob;
        let bad = |what: String| Error::ObjectInvalid { what };
        let random = || -> Result<[u8; 16]> {
            let mut b = [0u8; 16];
            aws_lc_rs::rand::SecureRandom::fill(&aws_lc_rs::rand::SystemRandom::new(), &mut b)
                .map_err(|_| bad("no random numbers for the self-test".into()))?;
            Ok(b)
        };
        let (session_key, block) = (random()?, random()?);
        let sealed = ukey_trust::gm::encrypt(point, &session_key)
            .ok_or_else(|| bad("SM2 encryption to the certificate's key failed".into()))?;
        let wrapped = EccCipherBlob::from_der(&sealed).map_err(|e| bad(e.to_string()))?;
        let expected = ukey_trust::gm::sm4_encrypt_block(&session_key, &block)
            .ok_or_else(|| bad("SM4 encryption failed".into()))?;
        let c = self.app.open_container(name).map_err(|e| self.err(e))?;
        let k = match c.import_session_key(&wrapped) {
            Ok(k) => k,
            Err(e @ SkfError::Call { .. }) if !e.is_removed() => {
                tracing::warn!(
                    container = name,
                    "the encryption key did not import a session key: {e}"
                );
                return Ok(false);
            }
            Err(e) => return Err(self.err(e)),
        };
        let got = k.decrypt_ecb(&expected).map_err(|e| self.err(e))?;
        Ok(got == block)
    }

    /// Signs `message` with the SM2 signing key of container `name`: the host computes
    /// e = SM3(Z ‖ M) with the GM ID and the key's point, the device signs e. Returns a
    /// DER signature.
    pub fn sign_sm2(&self, name: &str, point: &[u8], message: &[u8]) -> Result<Vec<u8>> {
        let e = ukey_trust::gm::message_digest(ukey_trust::gm::GM_DISTID, point, message)
            .ok_or_else(|| Error::ObjectInvalid {
                what: "the signing key is not an SM2 point".into(),
            })?;
        let c = self.app.open_container(name).map_err(|e| self.err(e))?;
        c.sign_digest(&e).map_err(|e| self.err(e))
    }
}

impl TokenSummary {
    /// Is this key used through SKF?
    pub fn is_skf(&self) -> bool {
        self.interface == Interface::Skf
    }

    /// A name for messages (`TokenName`), as [`TokenSummary::name`] gives.
    pub fn skf_name(&self) -> TokenName {
        self.name()
    }
}
