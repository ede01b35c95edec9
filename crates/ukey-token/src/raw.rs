//! C_GetSlotInfo and C_GetTokenInfo as the module fills them, byte for byte.
//!
//! `cryptoki` parses these structures whole: one field it cannot read (a clock that is
//! not 16 digits, seen on a real module) fails the call, and a label in GBK becomes
//! replacement characters. A user with such a key was told there is no key. So the two
//! calls are made here through the module's own function list (the library is opened a
//! second time, which gives the same, already initialised library), and every field is
//! read on its own by [`crate::module`], which records what was odd as a [`Quirk`].
//!
//! This is the one place of `ukey-token` where `unsafe` is allowed: calling C functions
//! of the loaded library is the job.
#![allow(unsafe_code)]

use std::path::Path;

use cryptoki_sys::{
    CK_C_GetFunctionList, CK_FUNCTION_LIST_PTR, CK_RV, CK_SLOT_ID, CK_SLOT_INFO, CK_TOKEN_INFO,
    CKR_OK,
};

/// C_GetSlotInfo and C_GetTokenInfo of a loaded library.
pub(crate) struct RawInfo {
    // Keeps the library mapped while the function pointers below are used.
    _library: libloading::Library,
    get_slot_info: unsafe extern "C" fn(CK_SLOT_ID, *mut CK_SLOT_INFO) -> CK_RV,
    get_token_info: unsafe extern "C" fn(CK_SLOT_ID, *mut CK_TOKEN_INFO) -> CK_RV,
}

impl std::fmt::Debug for RawInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RawInfo")
    }
}

impl RawInfo {
    /// Opens `path` again and takes its C_GetSlotInfo and C_GetTokenInfo from
    /// C_GetFunctionList. Call it after the library is loaded and initialised.
    pub(crate) fn open(path: &Path) -> Result<RawInfo, String> {
        // SAFETY: the same library cryptoki has just loaded successfully; loading it
        // again runs no initialiser a second time (the dynamic loader counts
        // references) and gives the same mapped code.
        let library = unsafe { libloading::Library::new(path) }.map_err(|e| e.to_string())?;
        // SAFETY: C_GetFunctionList has this signature in every PKCS#11 library
        // (PKCS#11 2.40 §5.2); cryptoki resolved the same symbol.
        let get_list: libloading::Symbol<'_, CK_C_GetFunctionList> =
            unsafe { library.get(b"C_GetFunctionList\0") }.map_err(|e| e.to_string())?;
        let get_list = (*get_list).ok_or("C_GetFunctionList is null")?;
        let mut list: CK_FUNCTION_LIST_PTR = std::ptr::null_mut();
        // SAFETY: `list` is a valid out-pointer; the library writes a pointer to its
        // static function table.
        let rv = unsafe { get_list(&mut list) };
        if rv != CKR_OK || list.is_null() {
            return Err(format!("C_GetFunctionList returned {rv:#x}"));
        }
        // SAFETY: non-null, and the table is static data of the library, which
        // `_library` keeps mapped as long as this value lives.
        let table = unsafe { &*list };
        let get_slot_info = table.C_GetSlotInfo.ok_or("no C_GetSlotInfo")?;
        let get_token_info = table.C_GetTokenInfo.ok_or("no C_GetTokenInfo")?;
        Ok(RawInfo {
            _library: library,
            get_slot_info,
            get_token_info,
        })
    }

    /// C_GetSlotInfo, or the CKR_ value it returned.
    pub(crate) fn slot_info(&self, slot: CK_SLOT_ID) -> Result<CK_SLOT_INFO, CK_RV> {
        let mut info = CK_SLOT_INFO::default();
        // SAFETY: `info` is a valid CK_SLOT_INFO for the call to fill; the function
        // pointer comes from the library's own table and the library is initialised
        // (by `Module::load`) with OS locking, so any thread may call it.
        let rv = unsafe { (self.get_slot_info)(slot, &mut info) };
        if rv == CKR_OK { Ok(info) } else { Err(rv) }
    }

    /// C_GetTokenInfo, or the CKR_ value it returned.
    pub(crate) fn token_info(&self, slot: CK_SLOT_ID) -> Result<CK_TOKEN_INFO, CK_RV> {
        let mut info = CK_TOKEN_INFO::default();
        // SAFETY: as in `slot_info`: a valid out-structure, a function of the loaded
        // and initialised library.
        let rv = unsafe { (self.get_token_info)(slot, &mut info) };
        if rv == CKR_OK { Ok(info) } else { Err(rv) }
    }
}
