//! Names of PKCS#11 functions and return values, as used by the control API, the CLI and
//! the state file (`"C_GenerateKeyPair"`, `"CKR_DEVICE_REMOVED"`).

use cryptoki_sys::*;

/// Every function of the PKCS#11 2.40 function list, in `CK_FUNCTION_LIST` order.
/// Faults and latency can be set on any of them that concerns a token (a session or slot
/// function); the ones that concern no token (`C_Initialize`, `C_GetSlotList`, ...) are
/// accepted but never fire.
pub const FUNCTIONS: &[&str] = &[
    "C_Initialize",
    "C_Finalize",
    "C_GetInfo",
    "C_GetFunctionList",
    "C_GetSlotList",
    "C_GetSlotInfo",
    "C_GetTokenInfo",
    "C_GetMechanismList",
    "C_GetMechanismInfo",
    "C_InitToken",
    "C_InitPIN",
    "C_SetPIN",
    "C_OpenSession",
    "C_CloseSession",
    "C_CloseAllSessions",
    "C_GetSessionInfo",
    "C_GetOperationState",
    "C_SetOperationState",
    "C_Login",
    "C_Logout",
    "C_CreateObject",
    "C_CopyObject",
    "C_DestroyObject",
    "C_GetObjectSize",
    "C_GetAttributeValue",
    "C_SetAttributeValue",
    "C_FindObjectsInit",
    "C_FindObjects",
    "C_FindObjectsFinal",
    "C_EncryptInit",
    "C_Encrypt",
    "C_EncryptUpdate",
    "C_EncryptFinal",
    "C_DecryptInit",
    "C_Decrypt",
    "C_DecryptUpdate",
    "C_DecryptFinal",
    "C_DigestInit",
    "C_Digest",
    "C_DigestUpdate",
    "C_DigestKey",
    "C_DigestFinal",
    "C_SignInit",
    "C_Sign",
    "C_SignUpdate",
    "C_SignFinal",
    "C_SignRecoverInit",
    "C_SignRecover",
    "C_VerifyInit",
    "C_Verify",
    "C_VerifyUpdate",
    "C_VerifyFinal",
    "C_VerifyRecoverInit",
    "C_VerifyRecover",
    "C_DigestEncryptUpdate",
    "C_DecryptDigestUpdate",
    "C_SignEncryptUpdate",
    "C_DecryptVerifyUpdate",
    "C_GenerateKey",
    "C_GenerateKeyPair",
    "C_WrapKey",
    "C_UnwrapKey",
    "C_DeriveKey",
    "C_SeedRandom",
    "C_GenerateRandom",
    "C_GetFunctionStatus",
    "C_CancelFunction",
    "C_WaitForSlotEvent",
];

/// Is `name` a PKCS#11 function name (exact spelling, `C_` prefix included)?
pub fn is_function(name: &str) -> bool {
    FUNCTIONS.contains(&name)
}

/// Return values a fault may inject, with their names. The first four are the ones a
/// USB key really produces in the middle of a write; the rest help test error paths.
const RETURN_VALUES: &[(&str, CK_RV)] = &[
    ("CKR_DEVICE_REMOVED", CKR_DEVICE_REMOVED),
    ("CKR_DEVICE_MEMORY", CKR_DEVICE_MEMORY),
    ("CKR_DEVICE_ERROR", CKR_DEVICE_ERROR),
    ("CKR_GENERAL_ERROR", CKR_GENERAL_ERROR),
    ("CKR_FUNCTION_FAILED", CKR_FUNCTION_FAILED),
    ("CKR_HOST_MEMORY", CKR_HOST_MEMORY),
    ("CKR_TOKEN_NOT_PRESENT", CKR_TOKEN_NOT_PRESENT),
    ("CKR_TOKEN_WRITE_PROTECTED", CKR_TOKEN_WRITE_PROTECTED),
    ("CKR_SESSION_HANDLE_INVALID", CKR_SESSION_HANDLE_INVALID),
    ("CKR_SESSION_CLOSED", CKR_SESSION_CLOSED),
    ("CKR_USER_NOT_LOGGED_IN", CKR_USER_NOT_LOGGED_IN),
    ("CKR_PIN_INCORRECT", CKR_PIN_INCORRECT),
    ("CKR_PIN_LOCKED", CKR_PIN_LOCKED),
    ("CKR_OBJECT_HANDLE_INVALID", CKR_OBJECT_HANDLE_INVALID),
    ("CKR_KEY_HANDLE_INVALID", CKR_KEY_HANDLE_INVALID),
    ("CKR_DATA_LEN_RANGE", CKR_DATA_LEN_RANGE),
    ("CKR_MECHANISM_INVALID", CKR_MECHANISM_INVALID),
    ("CKR_TEMPLATE_INCONSISTENT", CKR_TEMPLATE_INCONSISTENT),
    ("CKR_FUNCTION_NOT_SUPPORTED", CKR_FUNCTION_NOT_SUPPORTED),
    ("CKR_CANCEL", CKR_CANCEL),
    ("CKR_OK", CKR_OK),
];

/// The value of a `CKR_` name (`"CKR_DEVICE_MEMORY"`), or of a number written in hex
/// (`"0x30"`) or decimal.
pub fn rv_from_name(name: &str) -> Option<CK_RV> {
    if let Some((_, rv)) = RETURN_VALUES.iter().find(|(n, _)| *n == name) {
        return Some(*rv);
    }
    if let Some(hex) = name.strip_prefix("0x").or_else(|| name.strip_prefix("0X")) {
        return CK_RV::from_str_radix(hex, 16).ok();
    }
    name.parse().ok()
}

/// The name of a return value, or its hex number when it is not one we name.
pub fn rv_name(rv: CK_RV) -> String {
    match RETURN_VALUES.iter().find(|(_, v)| *v == rv) {
        Some((n, _)) => (*n).to_owned(),
        None => format!("0x{rv:08X}"),
    }
}

/// The `CKR_` names `rv_from_name` knows, for help texts.
pub fn rv_names() -> impl Iterator<Item = &'static str> {
    RETURN_VALUES.iter().map(|(n, _)| *n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn function_list_matches_pkcs11_2_40() {
        // CK_FUNCTION_LIST has a version and one pointer per function.
        let pointers = (std::mem::size_of::<CK_FUNCTION_LIST>() - 8) / 8;
        assert_eq!(FUNCTIONS.len(), pointers);
        assert!(is_function("C_CreateObject"));
        assert!(!is_function("C_CreateObjects"));
    }

    #[test]
    fn return_values_round_trip() {
        assert_eq!(rv_from_name("CKR_DEVICE_MEMORY"), Some(CKR_DEVICE_MEMORY));
        assert_eq!(rv_from_name("0x32"), Some(CKR_DEVICE_REMOVED));
        assert_eq!(rv_from_name("50"), Some(CKR_DEVICE_REMOVED));
        assert_eq!(rv_from_name("CKR_NOPE"), None);
        assert_eq!(rv_name(CKR_DEVICE_ERROR), "CKR_DEVICE_ERROR");
        assert_eq!(rv_name(0x1234), "0x00001234");
    }
}
