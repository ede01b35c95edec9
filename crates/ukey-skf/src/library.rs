//! The SKF backend's FFI: a vendor's SKF library loaded with `libloading`, behind safe
//! types ([`SkfLibrary`], [`Device`], [`Application`], [`Container`], [`SessionKey`]).
//! This module and the software SKF key (`ukey-sim`'s `skf::exports`) are the places
//! SKF `unsafe` lives; every block says why it holds.
//!
//! SKF's `ULONG` and `BOOL` are 32-bit, its handles `void*`, its blobs packed: every
//! blob goes through its byte codec in [`crate::abi`], never a Rust struct cast.
//! Calls are serialised by one lock per library (vendors' libraries rarely say they
//! are thread-safe), except `SKF_WaitForDevEvent`, which blocks, and its cancel.

use std::ffi::{CString, c_char, c_void};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use secrecy::zeroize::Zeroizing;
use secrecy::{ExposeSecret, SecretString};

use crate::abi::{
    BlobError, DEV_INFO_LEN, DevInfo, ECC_PUBLIC_KEY_BLOB_LEN, ECC_SIGNATURE_BLOB_LEN,
    EccCipherBlob, EccPublicKeyBlob, EccSignatureBlob, EnvelopedKeyBlob, SGD_SM2_1, SGD_SMS4_ECB,
    Sar, USER_TYPE,
};

type H = *mut c_void;

/// What an SKF call or the library's loading can fail with.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SkfError {
    /// The library could not be loaded.
    #[error("cannot load SKF library {path}: {message}")]
    Load {
        /// The library.
        path: PathBuf,
        /// The loader's message.
        message: String,
    },
    /// The library lacks a function this operation needs.
    #[error("the SKF library lacks {0}")]
    Missing(&'static str),
    /// A function returned an error code.
    #[error("{function} failed: {sar}")]
    Call {
        /// The function.
        function: &'static str,
        /// Its return code.
        sar: Sar,
    },
    /// A wrong PIN; the device says how many tries remain.
    #[error("wrong PIN, {remaining} tries left")]
    PinIncorrect {
        /// Tries left.
        remaining: u32,
    },
    /// The PIN is locked.
    #[error("the PIN is locked")]
    PinLocked,
    /// The device gave bytes that are not the blob the standard defines.
    #[error("{function}: {source}")]
    Blob {
        /// The function.
        function: &'static str,
        /// What is wrong.
        source: BlobError,
    },
    /// An argument cannot be passed (a name with a NUL, an oversized buffer).
    #[error("invalid argument: {0}")]
    Argument(String),
}

impl SkfError {
    /// The SKF code, when a call returned one.
    pub fn sar(&self) -> Option<Sar> {
        match self {
            SkfError::Call { sar, .. } => Some(*sar),
            SkfError::PinIncorrect { .. } => Some(Sar::PIN_INCORRECT),
            SkfError::PinLocked => Some(Sar::PIN_LOCKED),
            _ => None,
        }
    }

    /// Was the device pulled out (or its handle opened before a pull)?
    pub fn is_removed(&self) -> bool {
        self.sar() == Some(Sar::DEVICE_REMOVED)
    }
}

/// Result of this module.
pub type Result<T, E = SkfError> = std::result::Result<T, E>;

macro_rules! functions {
    ($( $field:ident : $name:literal fn($($arg:ty),*) ;)*) => {
        /// The library's entry points (optional ones are `None` when absent).
        #[derive(Clone, Copy)]
        #[allow(clippy::type_complexity)]
        struct Functions {
            $( $field: Option<unsafe extern "C" fn($($arg),*) -> u32>, )*
        }

        impl Functions {
            /// Looks every function up.
            ///
            /// # Safety
            /// Each symbol found must have the GM/T 0016 prototype given here, and the
            /// pointers are valid only while `lib` stays loaded.
            unsafe fn load(lib: &libloading::Library) -> Functions {
                Functions {
                    $( $field: {
                        // SAFETY: the symbol's type is the standard's prototype (this
                        // function's contract); the pointer is copied out and used only
                        // while `SkfLibrary` keeps `lib` loaded.
                        unsafe { lib.get::<unsafe extern "C" fn($($arg),*) -> u32>(concat!($name, "\0").as_bytes()) }
                            .ok()
                            .map(|s| *s)
                    }, )*
                }
            }
        }

        /// Names of the functions the backend uses.
        pub const USED_FUNCTIONS: &[&str] = &[$($name),*];
    };
}

functions! {
    enum_dev: "SKF_EnumDev" fn(u32, *mut c_char, *mut u32);
    connect_dev: "SKF_ConnectDev" fn(*const c_char, *mut H);
    disconnect_dev: "SKF_DisConnectDev" fn(H);
    get_dev_info: "SKF_GetDevInfo" fn(H, *mut u8);
    wait_for_dev_event: "SKF_WaitForDevEvent" fn(*mut c_char, *mut u32, *mut u32);
    cancel_wait_for_dev_event: "SKF_CancelWaitForDevEvent" fn();
    enum_application: "SKF_EnumApplication" fn(H, *mut c_char, *mut u32);
    open_application: "SKF_OpenApplication" fn(H, *const c_char, *mut H);
    close_application: "SKF_CloseApplication" fn(H);
    get_pin_info: "SKF_GetPINInfo" fn(H, u32, *mut u32, *mut u32, *mut u32);
    verify_pin: "SKF_VerifyPIN" fn(H, u32, *const c_char, *mut u32);
    clear_secure_state: "SKF_ClearSecureState" fn(H);
    enum_container: "SKF_EnumContainer" fn(H, *mut c_char, *mut u32);
    create_container: "SKF_CreateContainer" fn(H, *const c_char, *mut H);
    delete_container: "SKF_DeleteContainer" fn(H, *const c_char);
    open_container: "SKF_OpenContainer" fn(H, *const c_char, *mut H);
    close_container: "SKF_CloseContainer" fn(H);
    get_container_type: "SKF_GetContainerType" fn(H, *mut u32);
    import_certificate: "SKF_ImportCertificate" fn(H, u32, *const u8, u32);
    export_certificate: "SKF_ExportCertificate" fn(H, u32, *mut u8, *mut u32);
    gen_ecc_key_pair: "SKF_GenECCKeyPair" fn(H, u32, *mut u8);
    import_ecc_key_pair: "SKF_ImportECCKeyPair" fn(H, *const u8);
    ecc_sign_data: "SKF_ECCSignData" fn(H, *const u8, u32, *mut u8);
    export_public_key: "SKF_ExportPublicKey" fn(H, u32, *mut u8, *mut u32);
    import_session_key: "SKF_ImportSessionKey" fn(H, u32, *const u8, u32, *mut H);
    decrypt_init: "SKF_DecryptInit" fn(H, BlockCipherParam);
    decrypt: "SKF_Decrypt" fn(H, *const u8, u32, *mut u8, *mut u32);
    close_handle: "SKF_CloseHandle" fn(H);
    enum_files: "SKF_EnumFiles" fn(H, *mut c_char, *mut u32);
    create_file: "SKF_CreateFile" fn(H, *const c_char, u32, u32, u32);
    delete_file: "SKF_DeleteFile" fn(H, *const c_char);
    read_file: "SKF_ReadFile" fn(H, *const c_char, u32, u32, *mut u8, *mut u32);
    write_file: "SKF_WriteFile" fn(H, *const c_char, u32, *const u8, u32);
}

/// `BLOCKCIPHERPARAM`, passed by value: `BYTE IV[32]; ULONG IVLen; ULONG PaddingType;
/// ULONG FeedBitLen` (44 bytes; no padding between the fields, so `repr(C)` has the
/// packed structure's layout).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct BlockCipherParam {
    /// IV.
    pub iv: [u8; 32],
    /// Its length.
    pub iv_len: u32,
    /// 0 none, 1 PKCS#5.
    pub padding_type: u32,
    /// Feedback bits.
    pub feed_bit_len: u32,
}

/// A loaded SKF library.
pub struct SkfLibrary {
    path: PathBuf,
    f: Functions,
    lock: Mutex<()>,
    // Dropped last: the function pointers in `f` point into it.
    _lib: libloading::Library,
}

impl std::fmt::Debug for SkfLibrary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SkfLibrary")
            .field("path", &self.path)
            .finish()
    }
}

/// Handles are the library's, used only through it; they carry no Rust data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Handle(usize);

impl Handle {
    fn ptr(self) -> H {
        self.0 as H
    }
}

/// The functions every SKF library must have for the backend to use it.
const REQUIRED: &[&str] = &[
    "SKF_EnumDev",
    "SKF_ConnectDev",
    "SKF_DisConnectDev",
    "SKF_GetDevInfo",
    "SKF_EnumApplication",
    "SKF_OpenApplication",
    "SKF_CloseApplication",
    "SKF_GetPINInfo",
    "SKF_VerifyPIN",
    "SKF_EnumContainer",
    "SKF_OpenContainer",
    "SKF_CloseContainer",
    "SKF_ExportCertificate",
];

fn check(function: &'static str, rv: u32) -> Result<()> {
    if rv == Sar::OK.0 {
        Ok(())
    } else {
        Err(SkfError::Call {
            function,
            sar: Sar(rv),
        })
    }
}

fn c_string(s: &str) -> Result<CString> {
    CString::new(s).map_err(|_| SkfError::Argument(format!("{s:?} holds a NUL byte")))
}

fn len32(n: usize) -> Result<u32> {
    u32::try_from(n).map_err(|_| SkfError::Argument(format!("{n} bytes is too long")))
}

/// Splits SKF's name list (NUL-separated, ended by an empty name).
pub fn split_names(bytes: &[u8]) -> Vec<String> {
    bytes
        .split(|b| *b == 0)
        .take_while(|n| !n.is_empty())
        .map(|n| String::from_utf8_lossy(n).into_owned())
        .collect()
}

macro_rules! call {
    ($lib:expr, $field:ident, $name:literal, $($arg:expr),*) => {{
        let f = $lib.f.$field.ok_or(SkfError::Missing($name))?;
        let _guard = $lib.lock.lock().unwrap_or_else(|p| p.into_inner());
        // SAFETY: `f` is the library's own function with the standard's prototype
        // (see `Functions::load`); each call site passes handles the library gave and
        // buffers sized as the prototype requires, stated where the call is made.
        check($name, unsafe { f($($arg),*) })
    }};
}

/// A device insertion or removal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DevEvent {
    /// Plugged in.
    Inserted(String),
    /// Pulled out.
    Removed(String),
}

/// PIN state of an application.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PinInfo {
    /// Wrong PINs in a row that lock it.
    pub max_retries: u32,
    /// Tries left.
    pub remaining: u32,
    /// Still the PIN the device came with.
    pub is_default: bool,
}

impl SkfLibrary {
    /// Loads an SKF library. It must export at least the functions to list devices,
    /// applications, containers, certificates and the PIN state.
    pub fn load(path: &Path) -> Result<Arc<SkfLibrary>> {
        // SAFETY: loading a library runs its initialisers; loading the SKF library the
        // user or configuration named is the job of this backend.
        let lib = unsafe { libloading::Library::new(path) }.map_err(|e| SkfError::Load {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        // SAFETY: SKF symbols have the GM/T 0016 prototypes `Functions` declares, and
        // the pointers live in `SkfLibrary` next to the library that keeps them valid.
        let f = unsafe { Functions::load(&lib) };
        let lib = SkfLibrary {
            path: path.to_path_buf(),
            f,
            lock: Mutex::new(()),
            _lib: lib,
        };
        if let Some(missing) = REQUIRED.iter().find(|n| !lib.has(n)) {
            return Err(SkfError::Load {
                path: path.to_path_buf(),
                message: format!("not an SKF library: it lacks {missing}"),
            });
        }
        Ok(Arc::new(lib))
    }

    /// The library's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Does the library export `function`?
    pub fn has(&self, function: &str) -> bool {
        let f = &self.f;
        let present = [
            ("SKF_EnumDev", f.enum_dev.is_some()),
            ("SKF_ConnectDev", f.connect_dev.is_some()),
            ("SKF_DisConnectDev", f.disconnect_dev.is_some()),
            ("SKF_GetDevInfo", f.get_dev_info.is_some()),
            ("SKF_WaitForDevEvent", f.wait_for_dev_event.is_some()),
            (
                "SKF_CancelWaitForDevEvent",
                f.cancel_wait_for_dev_event.is_some(),
            ),
            ("SKF_EnumApplication", f.enum_application.is_some()),
            ("SKF_OpenApplication", f.open_application.is_some()),
            ("SKF_CloseApplication", f.close_application.is_some()),
            ("SKF_GetPINInfo", f.get_pin_info.is_some()),
            ("SKF_VerifyPIN", f.verify_pin.is_some()),
            ("SKF_ClearSecureState", f.clear_secure_state.is_some()),
            ("SKF_EnumContainer", f.enum_container.is_some()),
            ("SKF_CreateContainer", f.create_container.is_some()),
            ("SKF_DeleteContainer", f.delete_container.is_some()),
            ("SKF_OpenContainer", f.open_container.is_some()),
            ("SKF_CloseContainer", f.close_container.is_some()),
            ("SKF_GetContainerType", f.get_container_type.is_some()),
            ("SKF_ImportCertificate", f.import_certificate.is_some()),
            ("SKF_ExportCertificate", f.export_certificate.is_some()),
            ("SKF_GenECCKeyPair", f.gen_ecc_key_pair.is_some()),
            ("SKF_ImportECCKeyPair", f.import_ecc_key_pair.is_some()),
            ("SKF_ECCSignData", f.ecc_sign_data.is_some()),
            ("SKF_ExportPublicKey", f.export_public_key.is_some()),
            ("SKF_ImportSessionKey", f.import_session_key.is_some()),
            ("SKF_DecryptInit", f.decrypt_init.is_some()),
            ("SKF_Decrypt", f.decrypt.is_some()),
            ("SKF_CloseHandle", f.close_handle.is_some()),
            ("SKF_EnumFiles", f.enum_files.is_some()),
            ("SKF_CreateFile", f.create_file.is_some()),
            ("SKF_DeleteFile", f.delete_file.is_some()),
            ("SKF_ReadFile", f.read_file.is_some()),
            ("SKF_WriteFile", f.write_file.is_some()),
        ];
        present.iter().any(|(n, p)| *n == function && *p)
    }

    /// Reads a name list with SKF's two-call convention.
    fn names(
        &self,
        function: &'static str,
        mut call: impl FnMut(*mut c_char, *mut u32) -> Result<()>,
    ) -> Result<Vec<String>> {
        let mut size = 0u32;
        call(std::ptr::null_mut(), &mut size)?;
        // Some libraries answer the size query with 0 for an empty list.
        if size == 0 {
            return Ok(Vec::new());
        }
        let mut buf = vec![0u8; size as usize + 2];
        let mut size = len32(buf.len() - 2)?;
        call(buf.as_mut_ptr().cast(), &mut size)?;
        if size as usize > buf.len() {
            return Err(SkfError::Blob {
                function,
                source: BlobError::Field(format!(
                    "a list of {size} bytes in a buffer of {}",
                    buf.len()
                )),
            });
        }
        buf.truncate(size as usize);
        Ok(split_names(&buf))
    }

    /// Reads variable-length bytes with SKF's two-call convention.
    fn bytes(&self, mut call: impl FnMut(*mut u8, *mut u32) -> Result<()>) -> Result<Vec<u8>> {
        let mut size = 0u32;
        call(std::ptr::null_mut(), &mut size)?;
        let mut buf = vec![0u8; size as usize];
        let mut size = len32(buf.len())?;
        call(buf.as_mut_ptr(), &mut size)?;
        buf.truncate(size as usize);
        Ok(buf)
    }

    /// Names of the devices (`present_only`: those plugged in).
    pub fn devices(&self, present_only: bool) -> Result<Vec<String>> {
        self.names("SKF_EnumDev", |buf, size| {
            // buf is null or holds *size bytes (`names`).
            call!(
                self,
                enum_dev,
                "SKF_EnumDev",
                u32::from(present_only),
                buf,
                size
            )
        })
    }

    /// Connects to the device named `name`.
    pub fn connect(self: &Arc<Self>, name: &str) -> Result<Device> {
        let c = c_string(name)?;
        let mut h: H = std::ptr::null_mut();
        // `c` is NUL-terminated, `h` writable.
        call!(self, connect_dev, "SKF_ConnectDev", c.as_ptr(), &mut h)?;
        Ok(Device {
            inner: Arc::new(DevInner {
                lib: Arc::clone(self),
                h: Handle(h as usize),
                name: name.to_owned(),
            }),
        })
    }

    /// Blocks until a device is plugged in or pulled out (`None` when the library
    /// has no events, or the wait was cancelled).
    pub fn wait_for_event(&self) -> Result<Option<DevEvent>> {
        let Some(f) = self.f.wait_for_dev_event else {
            return Ok(None);
        };
        let mut name = [0u8; 256];
        let mut len = len32(name.len())?;
        let mut event = 0u32;
        // SAFETY: `name` holds `len` bytes, `len` and `event` are writable; the library's
        // lock is not held so that the wait blocks no other call.
        let rv = unsafe { f(name.as_mut_ptr().cast(), &mut len, &mut event) };
        if rv == Sar::NO_EVENT.0 {
            return Ok(None);
        }
        check("SKF_WaitForDevEvent", rv)?;
        let n = (len as usize).min(name.len());
        let dev = split_names(&name[..n])
            .into_iter()
            .next()
            .unwrap_or_default();
        Ok(match event {
            1 => Some(DevEvent::Inserted(dev)),
            2 => Some(DevEvent::Removed(dev)),
            _ => None,
        })
    }

    /// Ends a blocked [`SkfLibrary::wait_for_event`].
    pub fn cancel_wait(&self) -> Result<()> {
        let Some(f) = self.f.cancel_wait_for_dev_event else {
            return Ok(());
        };
        // SAFETY: no arguments.
        check("SKF_CancelWaitForDevEvent", unsafe { f() })
    }

    /// Does the library report insertions and removals?
    pub fn has_events(&self) -> bool {
        self.f.wait_for_dev_event.is_some() && self.f.cancel_wait_for_dev_event.is_some()
    }
}

/// A connected device; disconnected when it and everything opened through it are
/// dropped.
#[derive(Debug, Clone)]
pub struct Device {
    inner: Arc<DevInner>,
}

/// What a [`Device`] shares with the applications opened through it.
#[derive(Debug)]
pub struct DevInner {
    lib: Arc<SkfLibrary>,
    h: Handle,
    name: String,
}

impl std::ops::Deref for Device {
    type Target = DevInner;
    fn deref(&self) -> &DevInner {
        &self.inner
    }
}

impl Drop for DevInner {
    fn drop(&mut self) {
        // A pulled device's handle may fail to close; nothing to do about it.
        let _ = (|| call!(self.lib, disconnect_dev, "SKF_DisConnectDev", self.h.ptr()))();
    }
}

impl Device {
    /// The name it was connected by.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `DEVINFO`.
    pub fn info(&self) -> Result<DevInfo> {
        let mut b = vec![0u8; DEV_INFO_LEN];
        // `b` holds a whole DEVINFO.
        call!(
            self.lib,
            get_dev_info,
            "SKF_GetDevInfo",
            self.h.ptr(),
            b.as_mut_ptr()
        )?;
        DevInfo::from_bytes(&b).map_err(|source| SkfError::Blob {
            function: "SKF_GetDevInfo",
            source,
        })
    }

    /// Application names.
    pub fn applications(&self) -> Result<Vec<String>> {
        self.lib.names("SKF_EnumApplication", |buf, size| {
            call!(
                self.lib,
                enum_application,
                "SKF_EnumApplication",
                self.h.ptr(),
                buf,
                size
            )
        })
    }

    /// Opens an application.
    pub fn open_application(&self, name: &str) -> Result<Application> {
        let c = c_string(name)?;
        let mut h: H = std::ptr::null_mut();
        call!(
            self.lib,
            open_application,
            "SKF_OpenApplication",
            self.h.ptr(),
            c.as_ptr(),
            &mut h
        )?;
        Ok(Application {
            inner: Arc::new(AppInner {
                dev: self.clone(),
                h: Handle(h as usize),
                name: name.to_owned(),
            }),
        })
    }
}

/// An open application; closed when it and its containers are dropped.
#[derive(Debug, Clone)]
pub struct Application {
    inner: Arc<AppInner>,
}

/// What an [`Application`] shares with the containers opened through it.
#[derive(Debug)]
pub struct AppInner {
    dev: Device,
    h: Handle,
    name: String,
}

impl std::ops::Deref for Application {
    type Target = AppInner;
    fn deref(&self) -> &AppInner {
        &self.inner
    }
}

impl Drop for AppInner {
    fn drop(&mut self) {
        let _ = (|| {
            call!(
                self.dev.lib,
                close_application,
                "SKF_CloseApplication",
                self.h.ptr()
            )
        })();
    }
}

impl Application {
    fn lib(&self) -> &SkfLibrary {
        &self.dev.lib
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The user PIN's state: tries left, of how many.
    pub fn user_pin_info(&self) -> Result<PinInfo> {
        self.pin_info(USER_TYPE)
    }

    fn pin_info(&self, pin_type: u32) -> Result<PinInfo> {
        let (mut max, mut remaining, mut default) = (0u32, 0u32, 0u32);
        call!(
            self.lib(),
            get_pin_info,
            "SKF_GetPINInfo",
            self.h.ptr(),
            pin_type,
            &mut max,
            &mut remaining,
            &mut default
        )?;
        Ok(PinInfo {
            max_retries: max,
            remaining,
            is_default: default != 0,
        })
    }

    /// Verifies the user PIN, once. A wrong PIN gives [`SkfError::PinIncorrect`] with
    /// the tries left, a locked one [`SkfError::PinLocked`]. Never retried here.
    pub fn verify_user_pin(&self, pin: &SecretString) -> Result<()> {
        self.verify(USER_TYPE, pin)
    }

    fn verify(&self, pin_type: u32, pin: &SecretString) -> Result<()> {
        let mut bytes = Zeroizing::new(pin.expose_secret().as_bytes().to_vec());
        if bytes.contains(&0) {
            return Err(SkfError::Argument("a PIN holds a NUL byte".into()));
        }
        bytes.push(0);
        let mut left = 0u32;
        match call!(
            self.lib(),
            verify_pin,
            "SKF_VerifyPIN",
            self.h.ptr(),
            pin_type,
            bytes.as_ptr().cast(),
            &mut left
        ) {
            Ok(()) => Ok(()),
            Err(SkfError::Call { sar, .. }) if sar == Sar::PIN_LOCKED => Err(SkfError::PinLocked),
            Err(SkfError::Call { sar, .. }) if sar == Sar::PIN_INCORRECT => {
                // Some libraries leave the count unset: ask.
                let remaining = if left > 0 {
                    left
                } else {
                    self.pin_info(pin_type).map(|i| i.remaining).unwrap_or(0)
                };
                if remaining == 0 {
                    Err(SkfError::PinLocked)
                } else {
                    Err(SkfError::PinIncorrect { remaining })
                }
            }
            Err(e) => Err(e),
        }
    }

    /// Ends the logged-in state (where the library has the function).
    pub fn logout(&self) -> Result<()> {
        if self.lib().f.clear_secure_state.is_none() {
            return Ok(());
        }
        call!(
            self.lib(),
            clear_secure_state,
            "SKF_ClearSecureState",
            self.h.ptr()
        )
    }

    /// Container names.
    pub fn containers(&self) -> Result<Vec<String>> {
        self.lib().names("SKF_EnumContainer", |buf, size| {
            call!(
                self.lib(),
                enum_container,
                "SKF_EnumContainer",
                self.h.ptr(),
                buf,
                size
            )
        })
    }

    /// A container handle the library gave for `name`.
    fn container(&self, h: H, name: &str) -> Container {
        Container {
            app: self.clone(),
            h: Handle(h as usize),
            name: name.to_owned(),
        }
    }

    /// Opens a container.
    pub fn open_container(&self, name: &str) -> Result<Container> {
        let c = c_string(name)?;
        let mut h: H = std::ptr::null_mut();
        call!(
            self.lib(),
            open_container,
            "SKF_OpenContainer",
            self.h.ptr(),
            c.as_ptr(),
            &mut h
        )?;
        Ok(self.container(h, name))
    }

    /// Creates an empty container (user PIN verified).
    pub fn create_container(&self, name: &str) -> Result<Container> {
        let c = c_string(name)?;
        let mut h: H = std::ptr::null_mut();
        call!(
            self.lib(),
            create_container,
            "SKF_CreateContainer",
            self.h.ptr(),
            c.as_ptr(),
            &mut h
        )?;
        Ok(self.container(h, name))
    }

    /// Deletes a container with its keys and certificates (user PIN verified).
    pub fn delete_container(&self, name: &str) -> Result<()> {
        let c = c_string(name)?;
        call!(
            self.lib(),
            delete_container,
            "SKF_DeleteContainer",
            self.h.ptr(),
            c.as_ptr()
        )
    }

    /// File names.
    pub fn files(&self) -> Result<Vec<String>> {
        self.lib().names("SKF_EnumFiles", |buf, size| {
            call!(
                self.lib(),
                enum_files,
                "SKF_EnumFiles",
                self.h.ptr(),
                buf,
                size
            )
        })
    }

    /// Creates a file holding `data` (user PIN verified; readable by anyone, written by
    /// the user: rights 0xFF and 0x10, SECURE_ANYONE_ACCOUNT and SECURE_USER_ACCOUNT).
    pub fn write_new_file(&self, name: &str, data: &[u8]) -> Result<()> {
        let c = c_string(name)?;
        let n = len32(data.len())?;
        call!(
            self.lib(),
            create_file,
            "SKF_CreateFile",
            self.h.ptr(),
            c.as_ptr(),
            n,
            0xFF,
            0x10
        )?;
        call!(
            self.lib(),
            write_file,
            "SKF_WriteFile",
            self.h.ptr(),
            c.as_ptr(),
            0,
            data.as_ptr(),
            n
        )
    }

    /// A file's content (up to 64 KiB).
    pub fn read_file(&self, name: &str) -> Result<Vec<u8>> {
        let c = c_string(name)?;
        let mut buf = vec![0u8; 64 * 1024];
        let mut len = len32(buf.len())?;
        call!(
            self.lib(),
            read_file,
            "SKF_ReadFile",
            self.h.ptr(),
            c.as_ptr(),
            0,
            len,
            buf.as_mut_ptr(),
            &mut len
        )?;
        buf.truncate((len as usize).min(buf.len()));
        Ok(buf)
    }

    /// Deletes a file (user PIN verified).
    pub fn delete_file(&self, name: &str) -> Result<()> {
        let c = c_string(name)?;
        call!(
            self.lib(),
            delete_file,
            "SKF_DeleteFile",
            self.h.ptr(),
            c.as_ptr()
        )
    }
}

/// An open container; closed on drop.
#[derive(Debug)]
pub struct Container {
    app: Application,
    h: Handle,
    name: String,
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = (|| {
            call!(
                self.app.lib(),
                close_container,
                "SKF_CloseContainer",
                self.h.ptr()
            )
        })();
    }
}

/// Which key pair of a container.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Half {
    /// The signing pair (`bSignFlag` TRUE).
    Sign,
    /// The encryption pair.
    Encrypt,
}

impl Half {
    fn flag(self) -> u32 {
        u32::from(self == Half::Sign)
    }
}

/// A container's type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContainerKind {
    /// No key yet.
    Empty,
    /// RSA keys.
    Rsa,
    /// ECC (SM2) keys.
    Ecc,
    /// A value the standard does not define.
    Other(u32),
}

impl Container {
    fn lib(&self) -> &SkfLibrary {
        self.app.lib()
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Empty, RSA or ECC.
    pub fn kind(&self) -> Result<ContainerKind> {
        let mut t = 0u32;
        call!(
            self.lib(),
            get_container_type,
            "SKF_GetContainerType",
            self.h.ptr(),
            &mut t
        )?;
        Ok(match t {
            0 => ContainerKind::Empty,
            1 => ContainerKind::Rsa,
            2 => ContainerKind::Ecc,
            n => ContainerKind::Other(n),
        })
    }

    /// The signing or encryption certificate, `None` when there is none.
    pub fn certificate(&self, half: Half) -> Result<Option<Vec<u8>>> {
        let r = self.lib().bytes(|buf, size| {
            call!(
                self.lib(),
                export_certificate,
                "SKF_ExportCertificate",
                self.h.ptr(),
                half.flag(),
                buf,
                size
            )
        });
        match r {
            Ok(b) if b.is_empty() => Ok(None),
            Ok(b) => Ok(Some(b)),
            Err(SkfError::Call { sar, .. })
                if sar == Sar::CERT_NOT_FOUND || sar == Sar::FILE_NOT_EXIST =>
            {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// Stores a certificate (user PIN verified).
    pub fn import_certificate(&self, half: Half, der: &[u8]) -> Result<()> {
        let n = len32(der.len())?;
        call!(
            self.lib(),
            import_certificate,
            "SKF_ImportCertificate",
            self.h.ptr(),
            half.flag(),
            der.as_ptr(),
            n
        )
    }

    /// The SM2 public key of a half, as an uncompressed point; `None` when the half
    /// has no key.
    pub fn sm2_public_key(&self, half: Half) -> Result<Option<Vec<u8>>> {
        let r = self.lib().bytes(|buf, size| {
            call!(
                self.lib(),
                export_public_key,
                "SKF_ExportPublicKey",
                self.h.ptr(),
                half.flag(),
                buf,
                size
            )
        });
        let blob = match r {
            Ok(b) => b,
            Err(SkfError::Call { sar, .. }) if sar == Sar::KEY_NOT_FOUND => return Ok(None),
            Err(e) => return Err(e),
        };
        // Some libraries answer more than the blob (an RSA-sized buffer); the blob is first.
        let blob = blob.get(..ECC_PUBLIC_KEY_BLOB_LEN).ok_or(SkfError::Blob {
            function: "SKF_ExportPublicKey",
            source: BlobError::Length {
                what: "ECCPUBLICKEYBLOB",
                got: blob.len(),
                want: ECC_PUBLIC_KEY_BLOB_LEN,
            },
        })?;
        let key = EccPublicKeyBlob::from_bytes(blob).map_err(|source| SkfError::Blob {
            function: "SKF_ExportPublicKey",
            source,
        })?;
        Ok(Some(key.point()))
    }

    /// Generates the signing SM2 key pair and returns its point (user PIN verified).
    pub fn generate_sm2(&self) -> Result<Vec<u8>> {
        let mut blob = vec![0u8; ECC_PUBLIC_KEY_BLOB_LEN];
        // `blob` holds a whole ECCPUBLICKEYBLOB.
        call!(
            self.lib(),
            gen_ecc_key_pair,
            "SKF_GenECCKeyPair",
            self.h.ptr(),
            SGD_SM2_1,
            blob.as_mut_ptr()
        )?;
        let key = EccPublicKeyBlob::from_bytes(&blob).map_err(|source| SkfError::Blob {
            function: "SKF_GenECCKeyPair",
            source,
        })?;
        Ok(key.point())
    }

    /// Signs e = SM3(Z ‖ M) (32 bytes, computed by the host) with the signing key;
    /// returns the DER signature X.509 uses (user PIN verified).
    pub fn sign_digest(&self, e: &[u8; 32]) -> Result<Vec<u8>> {
        let mut blob = vec![0u8; ECC_SIGNATURE_BLOB_LEN];
        call!(
            self.lib(),
            ecc_sign_data,
            "SKF_ECCSignData",
            self.h.ptr(),
            e.as_ptr(),
            32,
            blob.as_mut_ptr()
        )?;
        let sig = EccSignatureBlob::from_bytes(&blob).map_err(|source| SkfError::Blob {
            function: "SKF_ECCSignData",
            source,
        })?;
        sig.to_der().map_err(|source| SkfError::Blob {
            function: "SKF_ECCSignData",
            source,
        })
    }

    /// Imports an escrowed encryption key pair (user PIN verified).
    pub fn import_enveloped_key(&self, blob: &EnvelopedKeyBlob) -> Result<()> {
        let bytes = blob.to_bytes();
        call!(
            self.lib(),
            import_ecc_key_pair,
            "SKF_ImportECCKeyPair",
            self.h.ptr(),
            bytes.as_ptr()
        )
    }

    /// Imports an SM4 session key SM2-encrypted to the encryption key (user PIN
    /// verified): how a digital envelope is opened.
    pub fn import_session_key(&self, wrapped: &EccCipherBlob) -> Result<SessionKey<'_>> {
        let bytes = wrapped.to_bytes();
        let n = len32(bytes.len())?;
        let mut h: H = std::ptr::null_mut();
        call!(
            self.lib(),
            import_session_key,
            "SKF_ImportSessionKey",
            self.h.ptr(),
            SGD_SMS4_ECB,
            bytes.as_ptr(),
            n,
            &mut h
        )?;
        Ok(SessionKey {
            lib: self.lib(),
            h: Handle(h as usize),
        })
    }
}

/// An SM4 session key on the device; closed on drop.
#[derive(Debug)]
pub struct SessionKey<'a> {
    lib: &'a SkfLibrary,
    h: Handle,
}

impl Drop for SessionKey<'_> {
    fn drop(&mut self) {
        if self.lib.f.close_handle.is_some() {
            let _ = (|| call!(self.lib, close_handle, "SKF_CloseHandle", self.h.ptr()))();
        }
    }
}

impl SessionKey<'_> {
    /// SM4-ECB decryption without padding, in one part.
    pub fn decrypt_ecb(&self, data: &[u8]) -> Result<Vec<u8>> {
        let param = BlockCipherParam {
            iv: [0; 32],
            iv_len: 0,
            padding_type: 0,
            feed_bit_len: 0,
        };
        call!(
            self.lib,
            decrypt_init,
            "SKF_DecryptInit",
            self.h.ptr(),
            param
        )?;
        let n = len32(data.len())?;
        let mut out = vec![0u8; data.len() + 16];
        let mut len = len32(out.len())?;
        call!(
            self.lib,
            decrypt,
            "SKF_Decrypt",
            self.h.ptr(),
            data.as_ptr(),
            n,
            out.as_mut_ptr(),
            &mut len
        )?;
        out.truncate((len as usize).min(out.len()));
        Ok(out)
    }
}
