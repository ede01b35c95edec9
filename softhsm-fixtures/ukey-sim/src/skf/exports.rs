//! The GM/T 0016 C ABI of the software SKF key: `SKF_*` functions exported by
//! `libukey_sim.so`, with SKF's 32-bit `ULONG` and `BOOL`, its packed blobs written byte
//! by byte (`ukey_skf::abi`), and handles that are numbers cast to pointers.
//!
//! Every function runs inside [`entry`] (a panic becomes `SAR_FAIL`, never an unwind
//! into C) and every function that concerns a device inside [`device_call`], which
//! applies the device's simulated hardware from `state.json`: pulled out
//! (`SAR_DEVICE_REMOVED`, also for handles opened before a pull), latency, chip time,
//! and faults on cue (the Nth call fails with a chosen `SAR_` code, or pulls the key
//! out, before the work or after it).

#![allow(non_snake_case)]

use std::collections::BTreeMap;
use std::ffi::{CStr, c_char, c_void};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use ukey_skf::abi::{
    ADMIN_TYPE, DevInfo, ECC_CIPHER_BLOB_HEADER_LEN, ECC_SIGNATURE_BLOB_LEN,
    ENVELOPED_KEY_BLOB_HEADER_LEN, EccCipherBlob, EccPublicKeyBlob, EccSignatureBlob,
    EnvelopedKeyBlob, SGD_SM2_1, SGD_SMS4_CBC, SGD_SMS4_ECB, Sar, USER_TYPE,
};

use super::store::{KeyHalf, SkfContainer, SkfDevice, SkfStore};
use crate::gm;
use crate::state::{FaultAction, FaultTiming};

type Handle = *mut c_void;
type R = Result<(), Sar>;

/// Admin PIN tries (the sim counts only the user PIN's).
const ADMIN_TRIES: u32 = 10;
/// How often a blocked wait or a delay looks at the state.
const POLL: Duration = Duration::from_millis(20);
/// Largest ECCCIPHERBLOB `CipherLen` accepted (an escrowed SM4 key is 16 bytes).
const MAX_CIPHER_LEN: usize = 4096;

#[derive(Debug, Clone)]
struct Dev {
    serial: String,
    /// The device's plug event count when it was connected: a pull kills the handle.
    events: u64,
}

#[derive(Debug, Clone)]
struct App {
    dev: Dev,
    name: String,
}

#[derive(Debug, Clone)]
struct Con {
    app: App,
    name: String,
}

#[derive(Debug, Clone)]
struct SymKey {
    dev: Dev,
    key: [u8; 16],
    alg: u32,
    /// Set by EncryptInit / DecryptInit: (encrypt, padding, iv).
    op: Option<(bool, u32, [u8; 16])>,
}

#[derive(Debug, Default)]
struct Registry {
    next: usize,
    devs: BTreeMap<usize, Dev>,
    apps: BTreeMap<usize, App>,
    cons: BTreeMap<usize, Con>,
    keys: BTreeMap<usize, SymKey>,
    /// (serial, application) → (PIN type, plug event count at login).
    logins: BTreeMap<(String, String), (u32, u64)>,
    /// What SKF_WaitForDevEvent last reported: serial → (name, present, events).
    seen: Option<BTreeMap<String, (String, bool, u64)>>,
}

static REGISTRY: Mutex<Registry> = Mutex::new(Registry {
    next: 0,
    devs: BTreeMap::new(),
    apps: BTreeMap::new(),
    cons: BTreeMap::new(),
    keys: BTreeMap::new(),
    logins: BTreeMap::new(),
    seen: None,
});
static CANCEL_WAIT: AtomicBool = AtomicBool::new(false);

fn registry() -> MutexGuard<'static, Registry> {
    REGISTRY.lock().unwrap_or_else(|p| p.into_inner())
}

impl Registry {
    fn add(&mut self) -> usize {
        self.next += 1;
        0x5_F000 + self.next
    }
}

fn store() -> SkfStore {
    SkfStore::new(crate::default_state_dir())
}

/// Runs an entry point: a panic is `SAR_FAIL`.
fn entry(f: impl FnOnce() -> R) -> u32 {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(Ok(())) => Sar::OK.0,
        Ok(Err(sar)) => sar.0,
        Err(_) => Sar::FAIL.0,
    }
}

fn sim_err(_: crate::SimError) -> Sar {
    Sar::FAIL
}

fn fault_sar(action: &FaultAction) -> Sar {
    match action {
        FaultAction::Unplug => Sar::DEVICE_REMOVED,
        FaultAction::Fail { rv } => Sar::from_name(rv).unwrap_or(Sar::FAIL),
    }
}

/// Is the device present (and, for a handle, still the insertion it was opened in)?
fn present(store: &SkfStore, serial: &str, events: Option<u64>) -> Result<bool, Sar> {
    let state = store.state().read().map_err(sim_err)?;
    let token = state.token(serial).cloned().unwrap_or_default();
    Ok(token.plugged && events.is_none_or(|e| e == token.events))
}

/// Sleeps `d` in slices; a pull during it ends it with `SAR_DEVICE_REMOVED`.
fn sleep_present(store: &SkfStore, serial: &str, events: Option<u64>, d: Duration) -> R {
    let end = Instant::now() + d;
    loop {
        let now = Instant::now();
        if now >= end {
            return Ok(());
        }
        std::thread::sleep(POLL.min(end - now));
        if !present(store, serial, events)? {
            return Err(Sar::DEVICE_REMOVED);
        }
    }
}

/// One call of `function` on device `serial` (opened at plug event `events`, when
/// through a handle): the simulated hardware around `f`.
fn device_call<T>(
    function: &'static str,
    serial: &str,
    events: Option<u64>,
    f: impl FnOnce(&SkfStore) -> Result<T, Sar>,
) -> Result<T, Sar> {
    let store = store();
    let state = store.state().read().map_err(sim_err)?;
    let token = state.token(serial).cloned().unwrap_or_default();
    if !token.plugged || events.is_some_and(|e| e != token.events) {
        return Err(Sar::DEVICE_REMOVED);
    }
    if let Some(d) = token.latency(function) {
        sleep_present(&store, serial, events, d)?;
    }
    let fault = |timing| -> R {
        if !token.has_fault(function, timing) {
            return Ok(());
        }
        let fired = store
            .state()
            .update(|s| s.token_mut(serial).count_call(function, timing))
            .map_err(sim_err)?;
        fired.map_or(Ok(()), |a| Err(fault_sar(&a)))
    };
    fault(FaultTiming::Before)?;
    let start = Instant::now();
    let out = f(&store);
    if let Some(chip) = token.chip_time(function, None) {
        // The work is done: a pull now is a card that committed before the reader lost it.
        sleep_present(&store, serial, events, chip.saturating_sub(start.elapsed()))?;
    }
    fault(FaultTiming::After)?;
    out
}

fn device(store: &SkfStore, serial: &str) -> Result<SkfDevice, Sar> {
    store
        .get(serial)
        .map_err(sim_err)?
        .ok_or(Sar::DEVICE_REMOVED)
}

/// Changes the device; `change`'s error leaves it as it was.
fn change<T>(
    store: &SkfStore,
    serial: &str,
    change: impl FnOnce(&mut SkfDevice) -> Result<T, Sar>,
) -> Result<T, Sar> {
    match store.update(serial, change) {
        Ok(r) => r,
        Err(crate::SimError::NotFound { .. }) => Err(Sar::DEVICE_REMOVED),
        Err(e) => Err(sim_err(e)),
    }
}

fn dev_of(h: Handle) -> Result<Dev, Sar> {
    registry()
        .devs
        .get(&(h as usize))
        .cloned()
        .ok_or(Sar::INVALID_HANDLE)
}

fn app_of(h: Handle) -> Result<App, Sar> {
    registry()
        .apps
        .get(&(h as usize))
        .cloned()
        .ok_or(Sar::INVALID_HANDLE)
}

fn con_of(h: Handle) -> Result<Con, Sar> {
    registry()
        .cons
        .get(&(h as usize))
        .cloned()
        .ok_or(Sar::INVALID_HANDLE)
}

fn require_user(app: &App) -> R {
    let reg = registry();
    match reg.logins.get(&(app.dev.serial.clone(), app.name.clone())) {
        Some((USER_TYPE, events)) if *events == app.dev.events => Ok(()),
        _ => Err(Sar::USER_NOT_LOGGED_IN),
    }
}

fn with_container<T>(
    device: &mut SkfDevice,
    con: &Con,
    f: impl FnOnce(&mut SkfContainer) -> Result<T, Sar>,
) -> Result<T, Sar> {
    let app = device
        .app_mut(&con.app.name)
        .ok_or(Sar::APPLICATION_NOT_EXISTS)?;
    let c = app.container_mut(&con.name).ok_or(Sar::FILE_NOT_EXIST)?;
    f(c)
}

fn read_container(store: &SkfStore, con: &Con) -> Result<SkfContainer, Sar> {
    let device = device(store, &con.app.dev.serial)?;
    device
        .app(&con.app.name)
        .ok_or(Sar::APPLICATION_NOT_EXISTS)?
        .container(&con.name)
        .cloned()
        .ok_or(Sar::FILE_NOT_EXIST)
}

fn scalar(half: &KeyHalf) -> Result<Vec<u8>, Sar> {
    half.scalar_bytes().ok_or(Sar::KEY_NOT_FOUND)
}

// ---------------------------------------------------------------------------------
// Pointer helpers. Each states what it needs of its caller's pointers.

/// A C string's bytes (without the NUL).
///
/// # Safety
/// `p` must be null or point to a NUL-terminated string that outlives the call.
unsafe fn c_str<'a>(p: *const c_char) -> Result<&'a [u8], Sar> {
    if p.is_null() {
        return Err(Sar::INVALID_PARAM);
    }
    // SAFETY: non-null and NUL-terminated per this function's contract.
    Ok(unsafe { CStr::from_ptr(p) }.to_bytes())
}

/// A C string as UTF-8 text (names of devices, applications, containers, files).
///
/// # Safety
/// As [`c_str`].
unsafe fn c_name<'a>(p: *const c_char) -> Result<&'a str, Sar> {
    // SAFETY: forwarded contract.
    let bytes = unsafe { c_str(p) }?;
    if bytes.is_empty() || bytes.len() > 64 {
        return Err(Sar::NAME_LEN);
    }
    std::str::from_utf8(bytes).map_err(|_| Sar::INVALID_PARAM)
}

/// `len` bytes at `p`.
///
/// # Safety
/// `p` must be null or valid for reading `len` bytes.
unsafe fn input<'a>(p: *const u8, len: u32) -> Result<&'a [u8], Sar> {
    if p.is_null() {
        return Err(Sar::INVALID_PARAM);
    }
    // SAFETY: valid for `len` bytes per this function's contract.
    Ok(unsafe { std::slice::from_raw_parts(p, len as usize) })
}

/// Writes `v` to `p`.
///
/// # Safety
/// `p` must be null or valid for writing a `T`.
unsafe fn put<T>(p: *mut T, v: T) -> R {
    if p.is_null() {
        return Err(Sar::INVALID_PARAM);
    }
    // SAFETY: non-null and writable per this function's contract.
    unsafe { p.write_unaligned(v) };
    Ok(())
}

/// Writes a fixed-size structure's bytes to the caller's structure.
///
/// # Safety
/// `p` must be null or valid for writing `bytes.len()` bytes (the size of the
/// structure the C prototype names).
unsafe fn put_struct(p: *mut u8, bytes: &[u8]) -> R {
    if p.is_null() {
        return Err(Sar::INVALID_PARAM);
    }
    // SAFETY: writable for the structure's size per this function's contract; the
    // source is our own buffer, so the two do not overlap.
    unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), p, bytes.len()) };
    Ok(())
}

/// SKF's two-call output: with `out` null, `*len` gets the size; else `*len` is the
/// buffer's size, `SAR_BUFFER_TOO_SMALL` when short, and the data's size after.
///
/// # Safety
/// `len` must be null or valid for reads and writes; `out` null or valid for writing
/// `*len` bytes.
unsafe fn put_bytes(data: &[u8], out: *mut u8, len: *mut u32) -> R {
    if len.is_null() {
        return Err(Sar::INVALID_PARAM);
    }
    let n = u32::try_from(data.len()).map_err(|_| Sar::FAIL)?;
    // SAFETY: `len` is valid per this function's contract; `out` is written only when
    // non-null and at most `*len` bytes.
    unsafe {
        if out.is_null() {
            *len = n;
            return Ok(());
        }
        if *len < n {
            *len = n;
            return Err(Sar::BUFFER_TOO_SMALL);
        }
        std::ptr::copy_nonoverlapping(data.as_ptr(), out, data.len());
        *len = n;
    }
    Ok(())
}

/// A list of names as SKF writes it: each NUL-terminated, and one more NUL.
///
/// # Safety
/// As [`put_bytes`].
unsafe fn put_names(names: &[String], out: *mut c_char, len: *mut u32) -> R {
    let mut bytes = Vec::new();
    for n in names {
        bytes.extend_from_slice(n.as_bytes());
        bytes.push(0);
    }
    if names.is_empty() {
        bytes.push(0);
    }
    bytes.push(0);
    // SAFETY: forwarded contract.
    unsafe { put_bytes(&bytes, out.cast(), len) }
}

// ---------------------------------------------------------------------------------
// Devices

fn snapshot(store: &SkfStore) -> Result<BTreeMap<String, (String, bool, u64)>, Sar> {
    let state = store.state().read().map_err(sim_err)?;
    let mut out = BTreeMap::new();
    for serial in store.serials().map_err(sim_err)? {
        let Some(d) = store.get(&serial).ok().flatten() else {
            continue;
        };
        let t = state.token(&serial).cloned().unwrap_or_default();
        out.insert(serial, (d.name, t.plugged, t.events));
    }
    Ok(out)
}

fn ensure_seen(store: &SkfStore) -> R {
    let mut reg = registry();
    if reg.seen.is_none() {
        reg.seen = Some(snapshot(store)?);
    }
    Ok(())
}

/// Lists device names (`bPresent`: only those plugged in).
///
/// # Safety
/// `pulSize` valid for reads and writes; `szNameList` null or valid for `*pulSize` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn SKF_EnumDev(
    bPresent: u32,
    szNameList: *mut c_char,
    pulSize: *mut u32,
) -> u32 {
    entry(|| {
        let store = store();
        ensure_seen(&store)?;
        let names: Vec<String> = snapshot(&store)?
            .into_values()
            .filter(|(_, plugged, _)| bPresent == 0 || *plugged)
            .map(|(name, _, _)| name)
            .collect();
        // SAFETY: the caller's buffers, per this function's contract.
        unsafe { put_names(&names, szNameList, pulSize) }
    })
}

fn serial_of_name(store: &SkfStore, name: &str) -> Result<String, Sar> {
    snapshot(store)?
        .into_iter()
        .find(|(_, (n, _, _))| n == name)
        .map(|(serial, _)| serial)
        .ok_or(Sar::DEVICE_REMOVED)
}

/// Connects to a device by name.
///
/// # Safety
/// `szName` a NUL-terminated string; `phDev` valid for writing a handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn SKF_ConnectDev(szName: *const c_char, phDev: *mut Handle) -> u32 {
    entry(|| {
        // SAFETY: per this function's contract.
        let name = unsafe { c_name(szName) }?;
        let store = store();
        let serial = serial_of_name(&store, name)?;
        let events = device_call("SKF_ConnectDev", &serial, None, |store| {
            let state = store.state().read().map_err(sim_err)?;
            Ok(state.events(&serial))
        })?;
        let mut reg = registry();
        let h = reg.add();
        reg.devs.insert(h, Dev { serial, events });
        // SAFETY: per this function's contract.
        unsafe { put(phDev, h as Handle) }
    })
}

/// Closes a device handle and everything opened through it.
///
/// # Safety
/// None beyond passing a handle value.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn SKF_DisConnectDev(hDev: Handle) -> u32 {
    entry(|| {
        let h = hDev as usize;
        let mut reg = registry();
        if reg.devs.remove(&h).is_none() {
            return Err(Sar::INVALID_HANDLE);
        }
        // Applications and containers opened through it stay usable until the device
        // is pulled (their handles name the device, not this handle).
        Ok(())
    })
}

/// 1 when the named device is present, else 0.
///
/// # Safety
/// `szDevName` a NUL-terminated string; `pulDevState` valid for writing.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn SKF_GetDevState(szDevName: *const c_char, pulDevState: *mut u32) -> u32 {
    entry(|| {
        // SAFETY: per this function's contract.
        let name = unsafe { c_name(szDevName) }?;
        let store = store();
        let present = snapshot(&store)?
            .into_values()
            .any(|(n, plugged, _)| n == name && plugged);
        // SAFETY: per this function's contract.
        unsafe { put(pulDevState, u32::from(present)) }
    })
}

/// Fills a `DEVINFO`.
///
/// # Safety
/// `pDevInfo` valid for writing a `DEVINFO` (`ukey_skf::abi::DEV_INFO_LEN` bytes).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn SKF_GetDevInfo(hDev: Handle, pDevInfo: *mut u8) -> u32 {
    entry(|| {
        let dev = dev_of(hDev)?;
        let info = device_call("SKF_GetDevInfo", &dev.serial, Some(dev.events), |store| {
            let d = device(store, &dev.serial)?;
            Ok(DevInfo {
                manufacturer: d.manufacturer,
                issuer: d.issuer,
                label: d.label,
                serial: d.serial,
                total_space: 64 * 1024,
                free_space: 48 * 1024,
                label_raw: d
                    .label_hex
                    .as_deref()
                    .and_then(|h| hex::decode(h).ok())
                    .unwrap_or_default(),
                manufacturer_raw: Vec::new(),
            })
        })?;
        // SAFETY: per this function's contract.
        unsafe { put_struct(pDevInfo, &info.to_bytes()) }
    })
}

/// Exclusive access (a no-op: the sim serialises every change itself).
///
/// # Safety
/// None beyond passing a handle value.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn SKF_LockDev(hDev: Handle, _ulTimeOut: u32) -> u32 {
    entry(|| dev_of(hDev).map(drop))
}

/// Ends exclusive access.
///
/// # Safety
/// None beyond passing a handle value.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn SKF_UnlockDev(hDev: Handle) -> u32 {
    entry(|| dev_of(hDev).map(drop))
}

/// Blocks until a device is plugged in (event 1) or pulled out (event 2), and names
/// it. `SKF_CancelWaitForDevEvent` ends it with `SAR_NOT_EVENTERR`.
///
/// # Safety
/// `szDevName` valid for `*pulDevNameLen` bytes; `pulDevNameLen` and `pulEvent` valid
/// for reads and writes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn SKF_WaitForDevEvent(
    szDevName: *mut c_char,
    pulDevNameLen: *mut u32,
    pulEvent: *mut u32,
) -> u32 {
    entry(|| {
        let store = store();
        ensure_seen(&store)?;
        CANCEL_WAIT.store(false, Ordering::SeqCst);
        loop {
            if CANCEL_WAIT.swap(false, Ordering::SeqCst) {
                return Err(Sar::NO_EVENT);
            }
            let now = snapshot(&store)?;
            let found = next_event(&mut registry(), &now);
            if let Some((name, event)) = found {
                let mut bytes = name.into_bytes();
                bytes.push(0);
                // SAFETY: per this function's contract.
                unsafe {
                    put_bytes(&bytes, szDevName.cast(), pulDevNameLen)?;
                    put(pulEvent, event)?;
                }
                return Ok(());
            }
            std::thread::sleep(POLL);
        }
    })
}

/// The next change between what was reported and `now`, remembered as reported: a
/// new or plugged-in device is inserted (1), a pulled or deleted one removed (2); a
/// pull and a plug between two looks are reported as both, the pull first.
fn next_event(
    reg: &mut Registry,
    now: &BTreeMap<String, (String, bool, u64)>,
) -> Option<(String, u32)> {
    let seen = reg.seen.get_or_insert_with(BTreeMap::new);
    for (serial, (name, plugged, events)) in now {
        let (event, remember) = match seen.get(serial) {
            None => (plugged.then_some(1), (*plugged, *events)),
            Some((_, _, e0)) if e0 == events => continue,
            Some((_, true, e0)) if *plugged => (Some(2), (false, *e0)),
            Some((_, true, _)) => (Some(2), (false, *events)),
            Some((_, false, _)) if *plugged => (Some(1), (true, *events)),
            Some(_) => (None, (false, *events)),
        };
        seen.insert(serial.clone(), (name.clone(), remember.0, remember.1));
        if let Some(event) = event {
            return Some((name.clone(), event));
        }
    }
    let gone = seen.keys().find(|s| !now.contains_key(*s)).cloned()?;
    let (name, plugged, _) = seen.remove(&gone)?;
    plugged.then_some((name, 2))
}

/// Ends a blocked `SKF_WaitForDevEvent`.
///
/// # Safety
/// None.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn SKF_CancelWaitForDevEvent() -> u32 {
    CANCEL_WAIT.store(true, Ordering::SeqCst);
    Sar::OK.0
}

// ---------------------------------------------------------------------------------
// Applications and PINs

/// Lists application names.
///
/// # Safety
/// As [`SKF_EnumDev`]'s buffers.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn SKF_EnumApplication(
    hDev: Handle,
    szAppName: *mut c_char,
    pulSize: *mut u32,
) -> u32 {
    entry(|| {
        let dev = dev_of(hDev)?;
        let names = device_call(
            "SKF_EnumApplication",
            &dev.serial,
            Some(dev.events),
            |store| {
                Ok(device(store, &dev.serial)?
                    .apps
                    .into_iter()
                    .map(|a| a.name)
                    .collect::<Vec<_>>())
            },
        )?;
        // SAFETY: per this function's contract.
        unsafe { put_names(&names, szAppName, pulSize) }
    })
}

/// Opens an application.
///
/// # Safety
/// `szAppName` a NUL-terminated string; `phApplication` valid for writing a handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn SKF_OpenApplication(
    hDev: Handle,
    szAppName: *const c_char,
    phApplication: *mut Handle,
) -> u32 {
    entry(|| {
        let dev = dev_of(hDev)?;
        // SAFETY: per this function's contract.
        let name = unsafe { c_name(szAppName) }?.to_owned();
        device_call(
            "SKF_OpenApplication",
            &dev.serial,
            Some(dev.events),
            |store| {
                device(store, &dev.serial)?
                    .app(&name)
                    .map(drop)
                    .ok_or(Sar::APPLICATION_NOT_EXISTS)
            },
        )?;
        let mut reg = registry();
        let h = reg.add();
        reg.apps.insert(h, App { dev, name });
        // SAFETY: per this function's contract.
        unsafe { put(phApplication, h as Handle) }
    })
}

/// Closes an application handle.
///
/// # Safety
/// None beyond passing a handle value.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn SKF_CloseApplication(hApplication: Handle) -> u32 {
    entry(|| {
        registry()
            .apps
            .remove(&(hApplication as usize))
            .map(drop)
            .ok_or(Sar::INVALID_HANDLE)
    })
}

fn pin_info(app: &App, pin_type: u32) -> Result<(u32, u32, bool), Sar> {
    device_call(
        "SKF_GetPINInfo",
        &app.dev.serial,
        Some(app.dev.events),
        |store| {
            let d = device(store, &app.dev.serial)?;
            let a = d.app(&app.name).ok_or(Sar::APPLICATION_NOT_EXISTS)?;
            match pin_type {
                USER_TYPE => {
                    let state = store.state().read().map_err(sim_err)?;
                    let pin = state
                        .token(&app.dev.serial)
                        .map(|t| t.pin.clone())
                        .unwrap_or_default();
                    Ok((pin.max_tries, pin.remaining(), a.user_pin_default))
                }
                ADMIN_TYPE => Ok((ADMIN_TRIES, ADMIN_TRIES, false)),
                _ => Err(Sar::USER_TYPE_INVALID),
            }
        },
    )
}

/// The PIN's retry limit, tries left, and whether it is the default PIN.
///
/// # Safety
/// The three output pointers valid for writing.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn SKF_GetPINInfo(
    hApplication: Handle,
    ulPINType: u32,
    pulMaxRetryCount: *mut u32,
    pulRemainRetryCount: *mut u32,
    pbDefaultPin: *mut u32,
) -> u32 {
    entry(|| {
        let app = app_of(hApplication)?;
        let (max, remain, default) = pin_info(&app, ulPINType)?;
        // SAFETY: per this function's contract.
        unsafe {
            put(pulMaxRetryCount, max)?;
            put(pulRemainRetryCount, remain)?;
            put(pbDefaultPin, u32::from(default))
        }
    })
}

/// Checks a PIN once. A wrong user PIN counts against the device's retry counter
/// (shared by every process, kept across pulls); `*pulRetryCount` gets the tries left.
///
/// # Safety
/// `szPIN` a NUL-terminated string; `pulRetryCount` valid for writing.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn SKF_VerifyPIN(
    hApplication: Handle,
    ulPINType: u32,
    szPIN: *const c_char,
    pulRetryCount: *mut u32,
) -> u32 {
    entry(|| {
        let app = app_of(hApplication)?;
        // SAFETY: per this function's contract.
        let pin = unsafe { c_str(szPIN) }?;
        let serial = app.dev.serial.clone();
        let (result, left) =
            device_call("SKF_VerifyPIN", &serial, Some(app.dev.events), |store| {
                let d = device(store, &serial)?;
                let a = d.app(&app.name).ok_or(Sar::APPLICATION_NOT_EXISTS)?;
                match ulPINType {
                    USER_TYPE => {
                        let good = a.user_pin.matches(pin);
                        store
                            .state()
                            .update(|s| {
                                let counter = &mut s.token_mut(&serial).pin;
                                if counter.locked() {
                                    (Err(Sar::PIN_LOCKED), 0)
                                } else if good {
                                    counter.failures = 0;
                                    (Ok(()), counter.remaining())
                                } else {
                                    counter.failures += 1;
                                    let left = counter.remaining();
                                    let sar = if left == 0 {
                                        Sar::PIN_LOCKED
                                    } else {
                                        Sar::PIN_INCORRECT
                                    };
                                    (Err(sar), left)
                                }
                            })
                            .map_err(sim_err)
                    }
                    ADMIN_TYPE => Ok(if a.admin_pin.matches(pin) {
                        (Ok(()), ADMIN_TRIES)
                    } else {
                        (Err(Sar::PIN_INCORRECT), ADMIN_TRIES)
                    }),
                    _ => Err(Sar::USER_TYPE_INVALID),
                }
            })?;
        if !pulRetryCount.is_null() {
            // SAFETY: non-null, and writable per this function's contract.
            unsafe { put(pulRetryCount, left) }?;
        }
        if result.is_ok() {
            registry()
                .logins
                .insert((serial, app.name.clone()), (ulPINType, app.dev.events));
        }
        result
    })
}

/// Changes a PIN (the old one is checked as `SKF_VerifyPIN` does).
///
/// # Safety
/// `szOldPin`, `szNewPin` NUL-terminated strings; `pulRetryCount` valid for writing.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn SKF_ChangePIN(
    hApplication: Handle,
    ulPINType: u32,
    szOldPin: *const c_char,
    szNewPin: *const c_char,
    pulRetryCount: *mut u32,
) -> u32 {
    // SAFETY: forwarded contract.
    let rv = unsafe { SKF_VerifyPIN(hApplication, ulPINType, szOldPin, pulRetryCount) };
    if rv != Sar::OK.0 {
        return rv;
    }
    entry(|| {
        let app = app_of(hApplication)?;
        // SAFETY: per this function's contract.
        let new = unsafe { c_str(szNewPin) }?;
        let new = std::str::from_utf8(new).map_err(|_| Sar::PIN_INVALID)?;
        if !(4..=16).contains(&new.len()) {
            return Err(Sar::PIN_LEN_RANGE);
        }
        let record = super::store::PinRecord::new(new).map_err(sim_err)?;
        device_call(
            "SKF_ChangePIN",
            &app.dev.serial,
            Some(app.dev.events),
            |store| {
                change(store, &app.dev.serial, |d| {
                    let a = d.app_mut(&app.name).ok_or(Sar::APPLICATION_NOT_EXISTS)?;
                    if ulPINType == USER_TYPE {
                        a.user_pin = record;
                        a.user_pin_default = false;
                    } else {
                        a.admin_pin = record;
                    }
                    Ok(())
                })
            },
        )
    })
}

/// Ends the application's logged-in state.
///
/// # Safety
/// None beyond passing a handle value.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn SKF_ClearSecureState(hApplication: Handle) -> u32 {
    entry(|| {
        let app = app_of(hApplication)?;
        registry().logins.remove(&(app.dev.serial, app.name));
        Ok(())
    })
}

// ---------------------------------------------------------------------------------
// Containers

/// Lists container names.
///
/// # Safety
/// As [`SKF_EnumDev`]'s buffers.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn SKF_EnumContainer(
    hApplication: Handle,
    szContainerName: *mut c_char,
    pulSize: *mut u32,
) -> u32 {
    entry(|| {
        let app = app_of(hApplication)?;
        let names = device_call(
            "SKF_EnumContainer",
            &app.dev.serial,
            Some(app.dev.events),
            |store| {
                Ok(device(store, &app.dev.serial)?
                    .app(&app.name)
                    .ok_or(Sar::APPLICATION_NOT_EXISTS)?
                    .containers
                    .iter()
                    .map(|c| c.name.clone())
                    .collect::<Vec<_>>())
            },
        )?;
        // SAFETY: per this function's contract.
        unsafe { put_names(&names, szContainerName, pulSize) }
    })
}

fn open_container(app: App, name: String) -> Result<usize, Sar> {
    let mut reg = registry();
    let h = reg.add();
    reg.cons.insert(h, Con { app, name });
    Ok(h)
}

/// Creates an empty container (user PIN verified).
///
/// # Safety
/// `szContainerName` a NUL-terminated string; `phContainer` valid for writing a handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn SKF_CreateContainer(
    hApplication: Handle,
    szContainerName: *const c_char,
    phContainer: *mut Handle,
) -> u32 {
    entry(|| {
        let app = app_of(hApplication)?;
        // SAFETY: per this function's contract.
        let name = unsafe { c_name(szContainerName) }?.to_owned();
        require_user(&app)?;
        device_call(
            "SKF_CreateContainer",
            &app.dev.serial,
            Some(app.dev.events),
            |store| {
                change(store, &app.dev.serial, |d| {
                    let a = d.app_mut(&app.name).ok_or(Sar::APPLICATION_NOT_EXISTS)?;
                    if a.container(&name).is_some() {
                        return Err(Sar::FILE_ALREADY_EXIST);
                    }
                    if a.containers.len() >= 16 {
                        return Err(Sar::REACH_MAX_CONTAINER_COUNT);
                    }
                    a.containers.push(SkfContainer {
                        name: name.clone(),
                        rsa: false,
                        sign: KeyHalf::default(),
                        enc: KeyHalf::default(),
                    });
                    Ok(())
                })
            },
        )?;
        let h = open_container(app, name)?;
        // SAFETY: per this function's contract.
        unsafe { put(phContainer, h as Handle) }
    })
}

/// Deletes a container with its keys and certificates (user PIN verified).
///
/// # Safety
/// `szContainerName` a NUL-terminated string.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn SKF_DeleteContainer(
    hApplication: Handle,
    szContainerName: *const c_char,
) -> u32 {
    entry(|| {
        let app = app_of(hApplication)?;
        // SAFETY: per this function's contract.
        let name = unsafe { c_name(szContainerName) }?.to_owned();
        require_user(&app)?;
        device_call(
            "SKF_DeleteContainer",
            &app.dev.serial,
            Some(app.dev.events),
            |store| {
                change(store, &app.dev.serial, |d| {
                    let a = d.app_mut(&app.name).ok_or(Sar::APPLICATION_NOT_EXISTS)?;
                    let before = a.containers.len();
                    a.containers.retain(|c| c.name != name);
                    if a.containers.len() == before {
                        return Err(Sar::FILE_NOT_EXIST);
                    }
                    Ok(())
                })
            },
        )
    })
}

/// Opens a container.
///
/// # Safety
/// `szContainerName` a NUL-terminated string; `phContainer` valid for writing a handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn SKF_OpenContainer(
    hApplication: Handle,
    szContainerName: *const c_char,
    phContainer: *mut Handle,
) -> u32 {
    entry(|| {
        let app = app_of(hApplication)?;
        // SAFETY: per this function's contract.
        let name = unsafe { c_name(szContainerName) }?.to_owned();
        device_call(
            "SKF_OpenContainer",
            &app.dev.serial,
            Some(app.dev.events),
            |store| {
                device(store, &app.dev.serial)?
                    .app(&app.name)
                    .ok_or(Sar::APPLICATION_NOT_EXISTS)?
                    .container(&name)
                    .map(drop)
                    .ok_or(Sar::FILE_NOT_EXIST)
            },
        )?;
        let h = open_container(app, name)?;
        // SAFETY: per this function's contract.
        unsafe { put(phContainer, h as Handle) }
    })
}

/// Closes a container handle.
///
/// # Safety
/// None beyond passing a handle value.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn SKF_CloseContainer(hContainer: Handle) -> u32 {
    entry(|| {
        registry()
            .cons
            .remove(&(hContainer as usize))
            .map(drop)
            .ok_or(Sar::INVALID_HANDLE)
    })
}

/// 0 empty, 1 RSA, 2 ECC.
///
/// # Safety
/// `pulContainerType` valid for writing.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn SKF_GetContainerType(
    hContainer: Handle,
    pulContainerType: *mut u32,
) -> u32 {
    entry(|| {
        let con = con_of(hContainer)?;
        let t = device_call(
            "SKF_GetContainerType",
            &con.app.dev.serial,
            Some(con.app.dev.events),
            |store| Ok(read_container(store, &con)?.container_type()),
        )?;
        // SAFETY: per this function's contract.
        unsafe { put(pulContainerType, t) }
    })
}

/// Stores the signing (`bSignFlag` true) or encryption certificate (user PIN verified).
///
/// # Safety
/// `pbCert` valid for `ulCertLen` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn SKF_ImportCertificate(
    hContainer: Handle,
    bSignFlag: u32,
    pbCert: *const u8,
    ulCertLen: u32,
) -> u32 {
    entry(|| {
        let con = con_of(hContainer)?;
        // SAFETY: per this function's contract.
        let cert = unsafe { input(pbCert, ulCertLen) }?;
        if cert.is_empty() {
            return Err(Sar::IN_DATA_LEN);
        }
        require_user(&con.app)?;
        device_call(
            "SKF_ImportCertificate",
            &con.app.dev.serial,
            Some(con.app.dev.events),
            |store| {
                change(store, &con.app.dev.serial, |d| {
                    with_container(d, &con, |c| {
                        c.half_mut(bSignFlag != 0).cert = Some(hex::encode(cert));
                        Ok(())
                    })
                })
            },
        )
    })
}

/// Reads the signing or encryption certificate.
///
/// # Safety
/// As [`put_bytes`]: `pulCertLen` valid for reads and writes, `pbCert` null or valid
/// for `*pulCertLen` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn SKF_ExportCertificate(
    hContainer: Handle,
    bSignFlag: u32,
    pbCert: *mut u8,
    pulCertLen: *mut u32,
) -> u32 {
    entry(|| {
        let con = con_of(hContainer)?;
        let cert = device_call(
            "SKF_ExportCertificate",
            &con.app.dev.serial,
            Some(con.app.dev.events),
            |store| {
                read_container(store, &con)?
                    .half(bSignFlag != 0)
                    .cert_bytes()
                    .ok_or(Sar::CERT_NOT_FOUND)
            },
        )?;
        // SAFETY: per this function's contract.
        unsafe { put_bytes(&cert, pbCert, pulCertLen) }
    })
}

// ---------------------------------------------------------------------------------
// Keys

/// Random bytes.
///
/// # Safety
/// `pbRandom` valid for writing `ulRandomLen` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn SKF_GenRandom(hDev: Handle, pbRandom: *mut u8, ulRandomLen: u32) -> u32 {
    entry(|| {
        let dev = dev_of(hDev)?;
        let mut bytes = vec![0u8; ulRandomLen as usize];
        device_call("SKF_GenRandom", &dev.serial, Some(dev.events), |_| {
            getrandom::fill(&mut bytes).map_err(|_| Sar::FAIL)
        })?;
        // SAFETY: per this function's contract.
        unsafe { put_struct(pbRandom, &bytes) }
    })
}

/// Generates the container's SM2 signing key pair (replacing one there, whose
/// certificate goes with it) and gives its public key (user PIN verified).
///
/// # Safety
/// `pBlob` valid for writing an `ECCPUBLICKEYBLOB` (132 bytes).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn SKF_GenECCKeyPair(
    hContainer: Handle,
    ulAlgId: u32,
    pBlob: *mut u8,
) -> u32 {
    entry(|| {
        let con = con_of(hContainer)?;
        if ulAlgId != SGD_SM2_1 {
            return Err(Sar::NOT_SUPPORTED);
        }
        require_user(&con.app)?;
        let point = device_call(
            "SKF_GenECCKeyPair",
            &con.app.dev.serial,
            Some(con.app.dev.events),
            |store| {
                let (d, point) = gm::generate().map_err(|_| Sar::FAIL)?;
                change(store, &con.app.dev.serial, |dev| {
                    with_container(dev, &con, |c| {
                        if c.rsa {
                            return Err(Sar::KEY_USAGE);
                        }
                        c.sign = KeyHalf {
                            scalar: Some(hex::encode(d)),
                            public: Some(hex::encode(&point)),
                            cert: None,
                        };
                        Ok(())
                    })
                })?;
                Ok(point)
            },
        )?;
        let blob = EccPublicKeyBlob::from_point(&point).map_err(|_| Sar::FAIL)?;
        // SAFETY: per this function's contract.
        unsafe { put_struct(pBlob, &blob.to_bytes()) }
    })
}

/// Reads an `ENVELOPEDKEYBLOB` (variable length: its cipher's length is inside it).
///
/// # Safety
/// `p` null or pointing to a whole `ENVELOPEDKEYBLOB`.
unsafe fn enveloped_blob(p: *const u8) -> Result<EnvelopedKeyBlob, Sar> {
    let fixed = ENVELOPED_KEY_BLOB_HEADER_LEN + ECC_CIPHER_BLOB_HEADER_LEN;
    // SAFETY: the blob's fixed part is there per this function's contract.
    let head = unsafe { input(p, fixed as u32) }?;
    let at = fixed - 4;
    let n = u32::from_le_bytes([head[at], head[at + 1], head[at + 2], head[at + 3]]) as usize;
    if n == 0 || n > MAX_CIPHER_LEN {
        return Err(Sar::IN_DATA_LEN);
    }
    // SAFETY: a whole blob holds `CipherLen` bytes after its fixed part.
    let whole = unsafe { input(p, (fixed + n) as u32) }?;
    EnvelopedKeyBlob::from_bytes(whole).map_err(|_| Sar::IN_DATA)
}

/// Imports the escrowed encryption key pair of an `ENVELOPEDKEYBLOB`: its SM4 key is
/// SM2-decrypted with the container's signing key, the private key SM4-ECB decrypted
/// and checked against the blob's public key (user PIN verified).
///
/// # Safety
/// `pEnvelopedKeyBlob` pointing to a whole `ENVELOPEDKEYBLOB`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn SKF_ImportECCKeyPair(
    hContainer: Handle,
    pEnvelopedKeyBlob: *const u8,
) -> u32 {
    entry(|| {
        let con = con_of(hContainer)?;
        // SAFETY: per this function's contract.
        let blob = unsafe { enveloped_blob(pEnvelopedKeyBlob) }?;
        if blob.version != 1 || blob.symm_alg_id != SGD_SMS4_ECB || blob.bits != 256 {
            return Err(Sar::IN_DATA);
        }
        require_user(&con.app)?;
        device_call(
            "SKF_ImportECCKeyPair",
            &con.app.dev.serial,
            Some(con.app.dev.events),
            |store| {
                let c = read_container(store, &con)?;
                let sign = scalar(&c.sign)?;
                let wrapped = blob.cipher.to_der().map_err(|_| Sar::IN_DATA)?;
                let sm4 = gm::decrypt(&sign, &wrapped).map_err(|_| Sar::IN_DATA)?;
                let plain = gm::sm4_ecb(&sm4, &blob.encrypted_private_key, true)
                    .map_err(|_| Sar::IN_DATA)?;
                let d = gm::scalar_of(&plain).map_err(|_| Sar::IN_DATA)?;
                let point = gm::public_point(&d).map_err(|_| Sar::IN_DATA)?;
                if point != blob.public_key.point() {
                    return Err(Sar::IN_DATA);
                }
                change(store, &con.app.dev.serial, |dev| {
                    with_container(dev, &con, |c| {
                        let public = Some(hex::encode(&point));
                        let cert = if c.enc.public == public {
                            c.enc.cert.clone()
                        } else {
                            None
                        };
                        c.enc = KeyHalf {
                            scalar: Some(hex::encode(d)),
                            public,
                            cert,
                        };
                        Ok(())
                    })
                })
            },
        )
    })
}

/// Signs a 32-byte digest e = SM3(Z ‖ M) with the container's signing key (user PIN
/// verified).
///
/// # Safety
/// `pbData` valid for `ulDataLen` bytes; `pSignature` for writing an
/// `ECCSIGNATUREBLOB` (128 bytes).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn SKF_ECCSignData(
    hContainer: Handle,
    pbData: *const u8,
    ulDataLen: u32,
    pSignature: *mut u8,
) -> u32 {
    entry(|| {
        let con = con_of(hContainer)?;
        // SAFETY: per this function's contract.
        let data = unsafe { input(pbData, ulDataLen) }?;
        if data.len() != 32 {
            return Err(Sar::IN_DATA_LEN);
        }
        require_user(&con.app)?;
        let rs = device_call(
            "SKF_ECCSignData",
            &con.app.dev.serial,
            Some(con.app.dev.events),
            |store| {
                let c = read_container(store, &con)?;
                gm::sign(&scalar(&c.sign)?, data, true).map_err(|_| Sar::FAIL)
            },
        )?;
        let mut r = [0u8; 32];
        let mut s = [0u8; 32];
        r.copy_from_slice(&rs[..32]);
        s.copy_from_slice(&rs[32..]);
        let blob = EccSignatureBlob { r, s }.to_bytes();
        debug_assert_eq!(blob.len(), ECC_SIGNATURE_BLOB_LEN);
        // SAFETY: per this function's contract.
        unsafe { put_struct(pSignature, &blob) }
    })
}

/// The signing or encryption public key: an `ECCPUBLICKEYBLOB` (the sim's RSA
/// containers are listed only: `SAR_NOTSUPPORTYETERR`).
///
/// # Safety
/// As [`put_bytes`].
#[unsafe(no_mangle)]
pub unsafe extern "C" fn SKF_ExportPublicKey(
    hContainer: Handle,
    bSignFlag: u32,
    pbBlob: *mut u8,
    pulBlobLen: *mut u32,
) -> u32 {
    entry(|| {
        let con = con_of(hContainer)?;
        let blob = device_call(
            "SKF_ExportPublicKey",
            &con.app.dev.serial,
            Some(con.app.dev.events),
            |store| {
                let c = read_container(store, &con)?;
                if c.rsa {
                    return Err(Sar::NOT_SUPPORTED);
                }
                let point = c
                    .half(bSignFlag != 0)
                    .public_bytes()
                    .ok_or(Sar::KEY_NOT_FOUND)?;
                EccPublicKeyBlob::from_point(&point)
                    .map(|b| b.to_bytes())
                    .map_err(|_| Sar::FAIL)
            },
        )?;
        // SAFETY: per this function's contract.
        unsafe { put_bytes(&blob, pbBlob, pulBlobLen) }
    })
}

/// Imports a session key SM2-encrypted to the container's encryption key (an
/// `ECCCIPHERBLOB`), for SM4 in ECB or CBC mode (user PIN verified): how a digital
/// envelope, such as a sealed bid, is opened with an SKF key.
///
/// # Safety
/// `pbWrapedData` valid for `ulWrapedLen` bytes; `phKey` valid for writing a handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn SKF_ImportSessionKey(
    hContainer: Handle,
    ulAlgId: u32,
    pbWrapedData: *const u8,
    ulWrapedLen: u32,
    phKey: *mut Handle,
) -> u32 {
    entry(|| {
        let con = con_of(hContainer)?;
        if ulAlgId != SGD_SMS4_ECB && ulAlgId != SGD_SMS4_CBC {
            return Err(Sar::NOT_SUPPORTED);
        }
        // SAFETY: per this function's contract.
        let wrapped = unsafe { input(pbWrapedData, ulWrapedLen) }?;
        let blob = EccCipherBlob::from_bytes(wrapped).map_err(|_| Sar::IN_DATA)?;
        require_user(&con.app)?;
        let key = device_call(
            "SKF_ImportSessionKey",
            &con.app.dev.serial,
            Some(con.app.dev.events),
            |store| {
                let c = read_container(store, &con)?;
                let der = blob.to_der().map_err(|_| Sar::IN_DATA)?;
                let plain = gm::decrypt(&scalar(&c.enc)?, &der).map_err(|_| Sar::IN_DATA)?;
                <[u8; 16]>::try_from(plain.as_slice()).map_err(|_| Sar::IN_DATA)
            },
        )?;
        let mut reg = registry();
        let h = reg.add();
        reg.keys.insert(
            h,
            SymKey {
                dev: con.app.dev.clone(),
                key,
                alg: ulAlgId,
                op: None,
            },
        );
        // SAFETY: per this function's contract.
        unsafe { put(phKey, h as Handle) }
    })
}

/// `BLOCKCIPHERPARAM`, passed by value: `BYTE IV[32]; ULONG IVLen; ULONG PaddingType;
/// ULONG FeedBitLen` (44 bytes, no padding between fields, so `repr(C)` lays it out
/// as the packed C structure).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct BlockCipherParam {
    /// IV.
    pub iv: [u8; 32],
    /// Its length.
    pub iv_len: u32,
    /// 0 none, 1 PKCS#5.
    pub padding_type: u32,
    /// Feedback bits (OFB/CFB).
    pub feed_bit_len: u32,
}

fn cipher_init(h: Handle, encrypt: bool, p: BlockCipherParam) -> R {
    let mut reg = registry();
    let k = reg.keys.get_mut(&(h as usize)).ok_or(Sar::INVALID_HANDLE)?;
    if p.padding_type > 1 || p.iv_len as usize > 32 {
        return Err(Sar::INVALID_PARAM);
    }
    let mut iv = [0u8; 16];
    if k.alg == SGD_SMS4_CBC {
        if p.iv_len != 16 {
            return Err(Sar::INVALID_PARAM);
        }
        iv.copy_from_slice(&p.iv[..16]);
    }
    k.op = Some((encrypt, p.padding_type, iv));
    Ok(())
}

fn sm4(key: &[u8; 16], cbc: Option<[u8; 16]>, data: &[u8], encrypt: bool) -> Result<Vec<u8>, Sar> {
    let Some(mut chain) = cbc else {
        return gm::sm4_ecb(key, data, !encrypt).map_err(|_| Sar::IN_DATA_LEN);
    };
    let mut out = Vec::with_capacity(data.len());
    for block in data.chunks(16) {
        if encrypt {
            let x: Vec<u8> = block.iter().zip(chain).map(|(a, b)| a ^ b).collect();
            let c = gm::sm4_ecb(key, &x, false).map_err(|_| Sar::IN_DATA_LEN)?;
            chain.copy_from_slice(&c);
            out.extend_from_slice(&c);
        } else {
            let p = gm::sm4_ecb(key, block, true).map_err(|_| Sar::IN_DATA_LEN)?;
            out.extend(p.iter().zip(chain).map(|(a, b)| a ^ b));
            chain.copy_from_slice(block);
        }
    }
    Ok(out)
}

/// A single-part encryption or decryption with a session key.
///
/// # Safety
/// `data` valid for `len` bytes; `out`/`out_len` as [`put_bytes`].
unsafe fn cipher(
    h: Handle,
    function: &'static str,
    encrypt: bool,
    data: *const u8,
    len: u32,
    out: *mut u8,
    out_len: *mut u32,
) -> R {
    let k = registry()
        .keys
        .get(&(h as usize))
        .cloned()
        .ok_or(Sar::INVALID_HANDLE)?;
    let Some((op_encrypt, padding, iv)) = k.op else {
        return Err(Sar::NOT_INITIALIZED);
    };
    if op_encrypt != encrypt {
        return Err(Sar::NOT_INITIALIZED);
    }
    // SAFETY: per this function's contract.
    let data = unsafe { input(data, len) }?;
    let result = device_call(function, &k.dev.serial, Some(k.dev.events), |_| {
        let cbc = (k.alg == SGD_SMS4_CBC).then_some(iv);
        if encrypt {
            let mut d = data.to_vec();
            if padding == 1 {
                let n = 16 - d.len() % 16;
                d.extend(std::iter::repeat_n(n as u8, n));
            }
            sm4(&k.key, cbc, &d, true)
        } else {
            let mut p = sm4(&k.key, cbc, data, false)?;
            if padding == 1 {
                let n = *p.last().ok_or(Sar::IN_DATA_LEN)? as usize;
                if n == 0
                    || n > 16
                    || n > p.len()
                    || p[p.len() - n..].iter().any(|b| *b as usize != n)
                {
                    return Err(Sar::IN_DATA);
                }
                p.truncate(p.len() - n);
            }
            Ok(p)
        }
    })?;
    // SAFETY: per this function's contract.
    unsafe { put_bytes(&result, out, out_len) }?;
    if !out.is_null()
        && let Some(k) = registry().keys.get_mut(&(h as usize))
    {
        k.op = None;
    }
    Ok(())
}

/// Starts an encryption with a session key.
///
/// # Safety
/// None beyond passing a handle value and the structure by value.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn SKF_EncryptInit(hKey: Handle, EncryptParam: BlockCipherParam) -> u32 {
    entry(|| cipher_init(hKey, true, EncryptParam))
}

/// Encrypts in one part.
///
/// # Safety
/// `pbData` valid for `ulDataLen` bytes; the output as [`put_bytes`].
#[unsafe(no_mangle)]
pub unsafe extern "C" fn SKF_Encrypt(
    hKey: Handle,
    pbData: *const u8,
    ulDataLen: u32,
    pbEncryptedData: *mut u8,
    pulEncryptedLen: *mut u32,
) -> u32 {
    // SAFETY: forwarded contract.
    entry(|| unsafe {
        cipher(
            hKey,
            "SKF_Encrypt",
            true,
            pbData,
            ulDataLen,
            pbEncryptedData,
            pulEncryptedLen,
        )
    })
}

/// Starts a decryption with a session key.
///
/// # Safety
/// None beyond passing a handle value and the structure by value.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn SKF_DecryptInit(hKey: Handle, DecryptParam: BlockCipherParam) -> u32 {
    entry(|| cipher_init(hKey, false, DecryptParam))
}

/// Decrypts in one part.
///
/// # Safety
/// `pbEncryptedData` valid for `ulEncryptedLen` bytes; the output as [`put_bytes`].
#[unsafe(no_mangle)]
pub unsafe extern "C" fn SKF_Decrypt(
    hKey: Handle,
    pbEncryptedData: *const u8,
    ulEncryptedLen: u32,
    pbData: *mut u8,
    pulDataLen: *mut u32,
) -> u32 {
    // SAFETY: forwarded contract.
    entry(|| unsafe {
        cipher(
            hKey,
            "SKF_Decrypt",
            false,
            pbEncryptedData,
            ulEncryptedLen,
            pbData,
            pulDataLen,
        )
    })
}

/// Closes a session key handle.
///
/// # Safety
/// None beyond passing a handle value.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn SKF_CloseHandle(hHandle: Handle) -> u32 {
    entry(|| {
        registry()
            .keys
            .remove(&(hHandle as usize))
            .map(drop)
            .ok_or(Sar::INVALID_HANDLE)
    })
}

// ---------------------------------------------------------------------------------
// Files

/// Lists file names.
///
/// # Safety
/// As [`SKF_EnumDev`]'s buffers.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn SKF_EnumFiles(
    hApplication: Handle,
    szFileList: *mut c_char,
    pulSize: *mut u32,
) -> u32 {
    entry(|| {
        let app = app_of(hApplication)?;
        let names = device_call(
            "SKF_EnumFiles",
            &app.dev.serial,
            Some(app.dev.events),
            |store| {
                Ok(device(store, &app.dev.serial)?
                    .app(&app.name)
                    .ok_or(Sar::APPLICATION_NOT_EXISTS)?
                    .files
                    .keys()
                    .cloned()
                    .collect::<Vec<_>>())
            },
        )?;
        // SAFETY: per this function's contract.
        unsafe { put_names(&names, szFileList, pulSize) }
    })
}

/// Creates a file of `ulFileSize` zero bytes (user PIN verified; rights are not
/// enforced beyond that).
///
/// # Safety
/// `szFileName` a NUL-terminated string.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn SKF_CreateFile(
    hApplication: Handle,
    szFileName: *const c_char,
    ulFileSize: u32,
    _ulReadRights: u32,
    _ulWriteRights: u32,
) -> u32 {
    entry(|| {
        let app = app_of(hApplication)?;
        // SAFETY: per this function's contract.
        let name = unsafe { c_name(szFileName) }?.to_owned();
        if ulFileSize > 64 * 1024 {
            return Err(Sar::NO_ROOM);
        }
        require_user(&app)?;
        device_call(
            "SKF_CreateFile",
            &app.dev.serial,
            Some(app.dev.events),
            |store| {
                change(store, &app.dev.serial, |d| {
                    let a = d.app_mut(&app.name).ok_or(Sar::APPLICATION_NOT_EXISTS)?;
                    if a.files.contains_key(&name) {
                        return Err(Sar::FILE_ALREADY_EXIST);
                    }
                    a.files
                        .insert(name.clone(), hex::encode(vec![0u8; ulFileSize as usize]));
                    Ok(())
                })
            },
        )
    })
}

/// Deletes a file (user PIN verified).
///
/// # Safety
/// `szFileName` a NUL-terminated string.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn SKF_DeleteFile(hApplication: Handle, szFileName: *const c_char) -> u32 {
    entry(|| {
        let app = app_of(hApplication)?;
        // SAFETY: per this function's contract.
        let name = unsafe { c_name(szFileName) }?.to_owned();
        require_user(&app)?;
        device_call(
            "SKF_DeleteFile",
            &app.dev.serial,
            Some(app.dev.events),
            |store| {
                change(store, &app.dev.serial, |d| {
                    let a = d.app_mut(&app.name).ok_or(Sar::APPLICATION_NOT_EXISTS)?;
                    a.files.remove(&name).map(drop).ok_or(Sar::FILE_NOT_EXIST)
                })
            },
        )
    })
}

/// Reads up to `ulSize` bytes of a file from `ulOffset`.
///
/// # Safety
/// `szFileName` a NUL-terminated string; the output as [`put_bytes`].
#[unsafe(no_mangle)]
pub unsafe extern "C" fn SKF_ReadFile(
    hApplication: Handle,
    szFileName: *const c_char,
    ulOffset: u32,
    ulSize: u32,
    pbOutData: *mut u8,
    pulOutLen: *mut u32,
) -> u32 {
    entry(|| {
        let app = app_of(hApplication)?;
        // SAFETY: per this function's contract.
        let name = unsafe { c_name(szFileName) }?.to_owned();
        let data = device_call(
            "SKF_ReadFile",
            &app.dev.serial,
            Some(app.dev.events),
            |store| {
                let d = device(store, &app.dev.serial)?;
                let a = d.app(&app.name).ok_or(Sar::APPLICATION_NOT_EXISTS)?;
                let content = hex::decode(a.files.get(&name).ok_or(Sar::FILE_NOT_EXIST)?)
                    .map_err(|_| Sar::FAIL)?;
                let start = (ulOffset as usize).min(content.len());
                let end = start.saturating_add(ulSize as usize).min(content.len());
                Ok(content[start..end].to_vec())
            },
        )?;
        // SAFETY: per this function's contract.
        unsafe { put_bytes(&data, pbOutData, pulOutLen) }
    })
}

/// Writes bytes into a file at `ulOffset` (within its size; user PIN verified).
///
/// # Safety
/// `szFileName` a NUL-terminated string; `pbData` valid for `ulSize` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn SKF_WriteFile(
    hApplication: Handle,
    szFileName: *const c_char,
    ulOffset: u32,
    pbData: *const u8,
    ulSize: u32,
) -> u32 {
    entry(|| {
        let app = app_of(hApplication)?;
        // SAFETY: per this function's contract.
        let name = unsafe { c_name(szFileName) }?.to_owned();
        // SAFETY: per this function's contract.
        let data = unsafe { input(pbData, ulSize) }?;
        require_user(&app)?;
        device_call(
            "SKF_WriteFile",
            &app.dev.serial,
            Some(app.dev.events),
            |store| {
                change(store, &app.dev.serial, |d| {
                    let a = d.app_mut(&app.name).ok_or(Sar::APPLICATION_NOT_EXISTS)?;
                    let f = a.files.get_mut(&name).ok_or(Sar::FILE_NOT_EXIST)?;
                    let mut content = hex::decode(&*f).map_err(|_| Sar::FAIL)?;
                    let start = ulOffset as usize;
                    let end = start.checked_add(data.len()).ok_or(Sar::IN_DATA_LEN)?;
                    if end > content.len() {
                        return Err(Sar::IN_DATA_LEN);
                    }
                    content[start..end].copy_from_slice(data);
                    *f = hex::encode(content);
                    Ok(())
                })
            },
        )
    })
}
