//! C_GetSlotInfo and C_GetTokenInfo as the module fills them, byte for byte, and
//! C_GetMechanismList with vendor-defined mechanisms (cryptoki drops those).
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
    CK_C_GetFunctionList, CK_FUNCTION_LIST_PTR, CK_MECHANISM_TYPE, CK_RV, CK_SLOT_ID, CK_SLOT_INFO,
    CK_TOKEN_INFO, CK_ULONG, CKR_OK,
};

/// C_GetSlotInfo and C_GetTokenInfo of a loaded library.
pub(crate) struct RawInfo {
    // Keeps the library mapped while the function pointers below are used.
    _library: libloading::Library,
    get_slot_info: unsafe extern "C" fn(CK_SLOT_ID, *mut CK_SLOT_INFO) -> CK_RV,
    get_token_info: unsafe extern "C" fn(CK_SLOT_ID, *mut CK_TOKEN_INFO) -> CK_RV,
    get_mechanism_list:
        unsafe extern "C" fn(CK_SLOT_ID, *mut CK_MECHANISM_TYPE, *mut CK_ULONG) -> CK_RV,
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
        let get_mechanism_list = table.C_GetMechanismList.ok_or("no C_GetMechanismList")?;
        Ok(RawInfo {
            _library: library,
            get_slot_info,
            get_token_info,
            get_mechanism_list,
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

    /// C_GetMechanismList, every value (vendor-defined ones too), or the CKR_ value.
    pub(crate) fn mechanism_list(&self, slot: CK_SLOT_ID) -> Result<Vec<CK_MECHANISM_TYPE>, CK_RV> {
        let mut count: CK_ULONG = 0;
        // SAFETY: a length query: null list, valid count out-pointer; a function of the
        // loaded and initialised library.
        let rv = unsafe { (self.get_mechanism_list)(slot, std::ptr::null_mut(), &mut count) };
        if rv != CKR_OK {
            return Err(rv);
        }
        let mut list: Vec<CK_MECHANISM_TYPE> = vec![0; count as usize];
        // SAFETY: `list` holds `count` entries, as the module asked for.
        let rv = unsafe { (self.get_mechanism_list)(slot, list.as_mut_ptr(), &mut count) };
        if rv != CKR_OK {
            return Err(rv);
        }
        list.truncate(count as usize);
        Ok(list)
    }
}
