//! Errors typed for what the user has to do about them.
//!
//! Every error that comes from a PKCS#11 call keeps that call underneath
//! ([`Pkcs11Call`]: the function name such as `C_Login` and the `CKR_` value), so a
//! support desk can search for it, while [`Error::user_message`] says in plain
//! Chinese or English what happened and what to do.

use std::fmt;
use std::path::PathBuf;

use cryptoki::context::Function;
use cryptoki::error::{Error as CkError, Rv, RvError};

/// The language of user-facing messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Lang {
    /// Simplified Chinese (zh-CN).
    ZhCn,
    /// English.
    #[default]
    En,
}

impl Lang {
    /// Picks the language from a locale name such as `zh_CN.UTF-8`, `zh-Hans` or `en-US`:
    /// any Chinese locale gives [`Lang::ZhCn`], everything else [`Lang::En`].
    pub fn from_locale(locale: &str) -> Lang {
        if locale.to_ascii_lowercase().starts_with("zh") {
            Lang::ZhCn
        } else {
            Lang::En
        }
    }

    /// Picks one of two texts.
    pub fn pick<'a>(self, zh: &'a str, en: &'a str) -> &'a str {
        match self {
            Lang::ZhCn => zh,
            Lang::En => en,
        }
    }
}

/// One failed PKCS#11 call: which function, and what it returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pkcs11Call {
    /// The function as the PKCS#11 specification names it, e.g. `C_Login`.
    pub function: String,
    /// The return value's name, e.g. `CKR_PIN_INCORRECT`.
    pub rv_name: String,
    /// The numeric return value (`CK_RV`), when known.
    pub rv: Option<u64>,
    /// The cryptoki error, when the failure came from the module as an `RvError`.
    pub rv_error: Option<RvError>,
}

impl Pkcs11Call {
    /// Describes a failure returned by `function`.
    pub fn new(function: Function, rv: RvError) -> Pkcs11Call {
        Pkcs11Call {
            function: function_name(function),
            rv_name: rv_name(rv),
            rv: rv_code(rv),
            rv_error: Some(rv),
        }
    }

    /// A failure returned by an SKF function (`SKF_VerifyPIN`, `SAR_PIN_INCORRECT`).
    pub fn skf(function: &str, code: u32, name: String) -> Pkcs11Call {
        Pkcs11Call {
            function: function.to_owned(),
            rv_name: name,
            rv: Some(u64::from(code)),
            rv_error: None,
        }
    }

    /// A failure in cryptoki itself (not a `CKR_` value), e.g. a missing function pointer.
    fn library(function: &str, what: String) -> Pkcs11Call {
        Pkcs11Call {
            function: function.to_owned(),
            rv_name: what,
            rv: None,
            rv_error: None,
        }
    }
}

impl fmt::Display for Pkcs11Call {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.rv {
            Some(rv) => write!(f, "{} returned {} (0x{rv:X})", self.function, self.rv_name),
            None => write!(f, "{} failed: {}", self.function, self.rv_name),
        }
    }
}

/// The token an error concerns, to name it in messages.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TokenName {
    /// CKA_LABEL of the token (trimmed).
    pub label: String,
    /// Serial number of the token (trimmed).
    pub serial: String,
    /// Slot id the token was seen in.
    pub slot_id: Option<u64>,
}

impl fmt::Display for TokenName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.label.is_empty(), self.serial.is_empty()) {
            (false, false) => write!(f, "\"{}\" ({})", self.label, self.serial),
            (false, true) => write!(f, "\"{}\"", self.label),
            (true, false) => write!(f, "{}", self.serial),
            (true, true) => match self.slot_id {
                Some(slot) => write!(f, "slot {slot}"),
                None => write!(f, "?"),
            },
        }
    }
}

fn on_token(token: &Option<Box<TokenName>>) -> String {
    token
        .as_ref()
        .map(|t| format!(" on token {t}"))
        .unwrap_or_default()
}

/// Everything that can go wrong in this crate.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No PKCS#11 module at the given path, or none found by discovery.
    #[error("PKCS#11 module not found: {}", path_or_searched(.path, .searched))]
    ModuleNotFound {
        /// The path asked for; `None` when discovery found nothing.
        path: Option<PathBuf>,
        /// The paths tried during discovery.
        searched: Vec<PathBuf>,
    },
    /// The file exists but is not a usable PKCS#11 library.
    #[error("{} is not a usable PKCS#11 module: {reason}", .path.display())]
    ModuleInvalid {
        /// The module's path.
        path: PathBuf,
        /// What went wrong (loader message or failed call).
        reason: String,
    },
    /// The library is a PKCS#11 module, but C_Initialize failed in a way that says it
    /// could not reach what it drives: a service it needs (pcscd, tpm2-abrmd, a vendor
    /// daemon) is not running.
    #[error("PKCS#11 module {} could not start: {reason}", .path.display())]
    ModuleServiceDown {
        /// The module's path.
        path: PathBuf,
        /// The failed call.
        reason: String,
    },
    /// The configuration file could not be read or parsed.
    #[error("configuration file {}: {reason}", .path.display())]
    Config {
        /// The configuration file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The PIN was wrong; the token may allow fewer tries now.
    #[error("wrong PIN{}{}: {call}", on_token(.token), tries_left_text(*.tries_left))]
    PinIncorrect {
        /// The token.
        token: Option<Box<TokenName>>,
        /// The failed call.
        call: Pkcs11Call,
        /// Tries left, when the token says (SKF does; PKCS#11 only has flags).
        tries_left: Option<u32>,
    },
    /// The PIN is locked after too many wrong tries.
    #[error("PIN locked{}: {call}", on_token(.token))]
    PinLocked {
        /// The token.
        token: Option<Box<TokenName>>,
        /// The failed call.
        call: Pkcs11Call,
    },
    /// The PIN is too short or too long for the token.
    #[error("PIN length out of range{}: {call}", on_token(.token))]
    PinLenRange {
        /// The token.
        token: Option<Box<TokenName>>,
        /// The failed call.
        call: Pkcs11Call,
    },
    /// The token was removed (or, for SoftHSM2, deleted) while we were using it.
    #[error("token removed{}: {call}", on_token(.token))]
    TokenRemoved {
        /// The token.
        token: Option<Box<TokenName>>,
        /// The failed call.
        call: Pkcs11Call,
    },
    /// There is no token in the slot.
    #[error("no token present{}: {call}", on_token(.token))]
    TokenNotPresent {
        /// The token (or just the slot).
        token: Option<Box<TokenName>>,
        /// The failed call.
        call: Pkcs11Call,
    },
    /// The token is out of memory.
    #[error("token memory full{}: {call}", on_token(.token))]
    DeviceMemory {
        /// The token.
        token: Option<Box<TokenName>>,
        /// The failed call.
        call: Pkcs11Call,
    },
    /// The token or its reader reports a hardware problem.
    #[error("device error{}: {call}", on_token(.token))]
    DeviceError {
        /// The token.
        token: Option<Box<TokenName>>,
        /// The failed call.
        call: Pkcs11Call,
    },
    /// A certificate object's value is not a valid X.509 certificate.
    #[error(
        "certificate object {label:?} (CKA_ID {key_id}) is not a valid X.509 certificate: {reason}"
    )]
    CertificateMalformed {
        /// CKA_LABEL of the object.
        label: String,
        /// CKA_ID of the object, hex.
        key_id: String,
        /// The parser's message.
        reason: String,
    },
    /// An object on the token, or data to put on it, is not what it must be (e.g. a
    /// public key of an unsupported type, a certificate that is not DER).
    #[error("unexpected object: {what}")]
    ObjectInvalid {
        /// What is wrong.
        what: String,
    },
    /// Any other PKCS#11 failure.
    #[error("PKCS#11 call failed{}: {call}", on_token(.token))]
    Pkcs11 {
        /// The token, when the call concerned one.
        token: Option<Box<TokenName>>,
        /// The failed call.
        call: Pkcs11Call,
    },
    /// Any other SKF (GM/T 0016) failure.
    #[error("SKF call failed{}: {call}", on_token(.token))]
    Skf {
        /// The token, when the call concerned one.
        token: Option<Box<TokenName>>,
        /// The failed call (an `SKF_` function and its `SAR_` code).
        call: Pkcs11Call,
    },
    /// The operation is not available through this key's interface (e.g. an RSA key
    /// pair on an SKF key, whose interface the backend uses for SM2 only).
    #[error("not supported: {what}")]
    NotSupported {
        /// What was asked.
        what: String,
    },
}

fn tries_left_text(n: Option<u32>) -> String {
    n.map(|n| format!(", {n} tries left")).unwrap_or_default()
}

fn path_or_searched(path: &Option<PathBuf>, searched: &[PathBuf]) -> String {
    match path {
        Some(p) => p.display().to_string(),
        None if searched.is_empty() => "no candidate paths".to_owned(),
        None => format!(
            "none of {} known paths exist (e.g. {})",
            searched.len(),
            searched[0].display()
        ),
    }
}

/// Result type of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Maps a cryptoki error to the variant that says what the user must do.
    ///
    /// `token` names the token the call concerned, if any.
    pub fn from_cryptoki(err: CkError, token: Option<TokenName>) -> Error {
        let token = token.map(Box::new);
        match err {
            CkError::Pkcs11(rv, function) => {
                let call = Pkcs11Call::new(function, rv);
                match rv {
                    RvError::PinIncorrect => Error::PinIncorrect {
                        token,
                        call,
                        tries_left: None,
                    },
                    RvError::PinLocked => Error::PinLocked { token, call },
                    RvError::PinLenRange => Error::PinLenRange { token, call },
                    RvError::DeviceRemoved => Error::TokenRemoved { token, call },
                    RvError::TokenNotPresent | RvError::TokenNotRecognized => {
                        Error::TokenNotPresent { token, call }
                    }
                    RvError::DeviceMemory => Error::DeviceMemory { token, call },
                    RvError::DeviceError => Error::DeviceError { token, call },
                    _ => Error::Pkcs11 { token, call },
                }
            }
            other => Error::Pkcs11 {
                token,
                call: Pkcs11Call::library("cryptoki", other.to_string()),
            },
        }
    }

    /// Like [`Error::from_cryptoki`], for a call made on a token we had just seen
    /// present. There, SoftHSM2 reports a deleted token (and real modules an unplugged
    /// one) with CKR_GENERAL_ERROR, CKR_OBJECT_HANDLE_INVALID, CKR_SESSION_HANDLE_INVALID,
    /// CKR_SESSION_CLOSED or CKR_TOKEN_NOT_PRESENT, so those become [`Error::TokenRemoved`].
    pub fn from_cryptoki_on_token(err: CkError, token: TokenName) -> Error {
        match err {
            CkError::Pkcs11(
                rv @ (RvError::GeneralError
                | RvError::ObjectHandleInvalid
                | RvError::SessionHandleInvalid
                | RvError::SessionClosed
                | RvError::TokenNotPresent
                | RvError::TokenNotRecognized
                | RvError::DeviceRemoved),
                function,
            ) => Error::TokenRemoved {
                token: Some(Box::new(token)),
                call: Pkcs11Call::new(function, rv),
            },
            other => Error::from_cryptoki(other, Some(token)),
        }
    }

    /// The PKCS#11 call underneath, if the error came from one.
    pub fn call(&self) -> Option<&Pkcs11Call> {
        match self {
            Error::PinIncorrect { call, .. }
            | Error::PinLocked { call, .. }
            | Error::PinLenRange { call, .. }
            | Error::TokenRemoved { call, .. }
            | Error::TokenNotPresent { call, .. }
            | Error::DeviceMemory { call, .. }
            | Error::DeviceError { call, .. }
            | Error::Pkcs11 { call, .. }
            | Error::Skf { call, .. } => Some(call),
            _ => None,
        }
    }

    /// The token the error concerns, if known.
    pub fn token(&self) -> Option<&TokenName> {
        match self {
            Error::PinIncorrect { token, .. }
            | Error::PinLocked { token, .. }
            | Error::PinLenRange { token, .. }
            | Error::TokenRemoved { token, .. }
            | Error::TokenNotPresent { token, .. }
            | Error::DeviceMemory { token, .. }
            | Error::DeviceError { token, .. }
            | Error::Pkcs11 { token, .. }
            | Error::Skf { token, .. } => token.as_deref(),
            _ => None,
        }
    }

    /// A stable machine-readable code (`pin_incorrect`, `token_removed`, ...), for JSON
    /// output and for front ends that translate by code.
    pub fn code(&self) -> &'static str {
        match self {
            Error::ModuleNotFound { .. } => "module_not_found",
            Error::ModuleInvalid { .. } => "module_invalid",
            Error::ModuleServiceDown { .. } => "module_service_down",
            Error::Config { .. } => "config_invalid",
            Error::PinIncorrect { .. } => "pin_incorrect",
            Error::PinLocked { .. } => "pin_locked",
            Error::PinLenRange { .. } => "pin_len_range",
            Error::TokenRemoved { .. } => "token_removed",
            Error::TokenNotPresent { .. } => "token_not_present",
            Error::DeviceMemory { .. } => "device_memory",
            Error::DeviceError { .. } => "device_error",
            Error::CertificateMalformed { .. } => "certificate_malformed",
            Error::ObjectInvalid { .. } => "object_invalid",
            Error::Pkcs11 { .. } => "pkcs11_error",
            Error::Skf { .. } => "skf_error",
            Error::NotSupported { .. } => "not_supported",
        }
    }

    /// One or two sentences for the user, in `lang`, naming the token and saying what
    /// to do. The technical detail (call and CKR_ value) is appended in brackets.
    pub fn user_message(&self, lang: Lang) -> String {
        let token = |t: &Option<Box<TokenName>>| match t {
            Some(t) => lang
                .pick(&format!("UKey {t}"), &format!("token {t}"))
                .to_owned(),
            None => lang.pick("UKey", "the token").to_owned(),
        };
        let detail = self.call().map(|c| format!(" [{c}]")).unwrap_or_default();
        let text = match self {
            Error::ModuleNotFound { path: Some(p), .. } => match lang {
                Lang::ZhCn => format!(
                    "找不到 PKCS#11 驱动模块 {}。请检查路径，或安装 UKey 厂商的驱动。",
                    p.display()
                ),
                Lang::En => format!(
                    "No PKCS#11 module at {}. Check the path, or install the UKey vendor's driver.",
                    p.display()
                ),
            },
            Error::ModuleNotFound { path: None, .. } => lang
                .pick(
                    "没有找到任何 PKCS#11 驱动模块。请安装 UKey 厂商的驱动，或用 --module 指定路径。",
                    "No PKCS#11 module was found. Install the UKey vendor's driver, or give its path with --module.",
                )
                .to_owned(),
            Error::ModuleInvalid { path, reason } => match lang {
                Lang::ZhCn => format!(
                    "{} 不是可用的 PKCS#11 驱动模块（{reason}）。请指定 UKey 厂商提供的 PKCS#11 库（.so / .dll / .dylib）。",
                    path.display()
                ),
                Lang::En => format!(
                    "{} is not a usable PKCS#11 module ({reason}). Point to the PKCS#11 library (.so / .dll / .dylib) from the UKey vendor.",
                    path.display()
                ),
            },
            Error::ModuleServiceDown { path, reason } => match lang {
                Lang::ZhCn => format!(
                    "UKey 驱动 {} 已加载但无法启动：它依赖的服务（如 pcscd、tpm2-abrmd 或厂商的后台程序）可能没有运行。请启动该服务或重新安装驱动后重试。（{reason}）",
                    path.display()
                ),
                Lang::En => format!(
                    "The key's driver {} loaded but could not start: the service it needs (pcscd, tpm2-abrmd or the vendor's daemon) may not be running. Start it, or reinstall the driver, and retry. ({reason})",
                    path.display()
                ),
            },
            Error::Config { path, reason } => match lang {
                Lang::ZhCn => format!("配置文件 {} 有误：{reason}", path.display()),
                Lang::En => format!("The configuration file {} is invalid: {reason}", path.display()),
            },
            Error::PinIncorrect { token: t, tries_left: Some(n), .. } => match lang {
                Lang::ZhCn => format!("{} 的 PIN 码不正确，还可尝试 {n} 次。次数用完 UKey 将被锁定。", token(t)),
                Lang::En => format!("Wrong PIN for {}: {n} {} left. When none is left the token locks.", token(t), if *n == 1 { "try" } else { "tries" }),
            },
            Error::PinIncorrect { token: t, .. } => match lang {
                Lang::ZhCn => format!("{} 的 PIN 码不正确。请注意剩余的尝试次数，多次输错会锁定 UKey。", token(t)),
                Lang::En => format!("Wrong PIN for {}. Mind the remaining tries: too many wrong PINs lock the token.", token(t)),
            },
            Error::PinLocked { token: t, .. } => match lang {
                Lang::ZhCn => format!("{} 的 PIN 码已锁定。请联系发证机构（CA）解锁。", token(t)),
                Lang::En => format!("The PIN of {} is locked. Contact your certificate authority (CA) to unlock it.", token(t)),
            },
            Error::PinLenRange { token: t, .. } => match lang {
                Lang::ZhCn => format!("PIN 码长度不符合 {} 的要求。", token(t)),
                Lang::En => format!("The PIN's length is not accepted by {}.", token(t)),
            },
            Error::TokenRemoved { token: t, .. } => match lang {
                Lang::ZhCn => format!("{} 已被拔出。请重新插入后再试。", token(t)),
                Lang::En => format!("{} was removed. Insert it again and retry.", capitalise(&token(t))),
            },
            Error::TokenNotPresent { token: t, .. } => match lang {
                Lang::ZhCn => format!("{} 不在读卡器中。请插入 UKey。", token(t)),
                Lang::En => format!("{} is not present. Insert the token.", capitalise(&token(t))),
            },
            Error::DeviceMemory { token: t, .. } => match lang {
                Lang::ZhCn => format!("{} 存储空间不足。", token(t)),
                Lang::En => format!("{} is out of memory.", capitalise(&token(t))),
            },
            Error::DeviceError { token: t, .. } => match lang {
                Lang::ZhCn => format!("{} 报告设备错误。请重新插入后再试；如仍失败，请联系厂商。", token(t)),
                Lang::En => format!("{} reports a device error. Re-insert it and retry; if it persists, contact the vendor.", capitalise(&token(t))),
            },
            Error::CertificateMalformed { label, key_id, reason } => match lang {
                Lang::ZhCn => format!("证书对象“{label}”（CKA_ID {key_id}）已损坏，无法解析：{reason}"),
                Lang::En => format!("The certificate object \"{label}\" (CKA_ID {key_id}) is corrupt and cannot be parsed: {reason}"),
            },
            Error::ObjectInvalid { what } => match lang {
                Lang::ZhCn => format!("UKey 上的对象不符合要求：{what}"),
                Lang::En => format!("An object on the token is not as expected: {what}"),
            },
            Error::Pkcs11 { token: t, .. } | Error::Skf { token: t, .. } => match lang {
                Lang::ZhCn => format!("访问 {} 时出错。", token(t)),
                Lang::En => format!("An error occurred while using {}.", token(t)),
            },
            Error::NotSupported { what } => match lang {
                Lang::ZhCn => format!("此 UKey 的接口不支持该操作：{what}"),
                Lang::En => format!("This key's interface does not support it: {what}"),
            },
        };
        format!("{text}{detail}")
    }
}

fn capitalise(s: &str) -> String {
    let mut chars = s.chars();
    match chars.next() {
        Some(c) => c.to_uppercase().chain(chars).collect(),
        None => String::new(),
    }
}

/// `Function::Login` -> `C_Login`.
fn function_name(function: Function) -> String {
    format!("C_{function:?}")
}

/// `RvError::PinIncorrect` -> `CKR_PIN_INCORRECT`.
fn rv_name(rv: RvError) -> String {
    match rv {
        RvError::VendorDefined(code) => return format!("CKR_VENDOR_DEFINED+0x{code:X}"),
        RvError::UnknownErrorCode(code) => return format!("CKR_UNKNOWN(0x{code:X})"),
        _ => {}
    }
    let debug = format!("{rv:?}");
    let mut out = String::from("CKR_");
    for (i, c) in debug.chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(c.to_ascii_uppercase());
    }
    out
}

/// The numeric CK_RV of an `RvError`. cryptoki only converts the other way, so search
/// the range where the standard codes live (0x0..0x300); the search runs only when an
/// error is being reported.
fn rv_code(rv: RvError) -> Option<u64> {
    match rv {
        RvError::VendorDefined(code) | RvError::UnknownErrorCode(code) => return Some(code),
        _ => {}
    }
    (0u64..0x300).find(|&code| matches!(Rv::from(code), Rv::Error(e) if e == rv))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rv_names_and_codes_follow_the_specification() {
        assert_eq!(rv_name(RvError::PinIncorrect), "CKR_PIN_INCORRECT");
        assert_eq!(rv_code(RvError::PinIncorrect), Some(0xA0));
        assert_eq!(rv_name(RvError::GeneralError), "CKR_GENERAL_ERROR");
        assert_eq!(rv_code(RvError::GeneralError), Some(0x05));
        assert_eq!(rv_name(RvError::PinLenRange), "CKR_PIN_LEN_RANGE");
        assert_eq!(rv_code(RvError::PinLocked), Some(0xA4));
        assert_eq!(rv_code(RvError::DeviceRemoved), Some(0x32));
        assert_eq!(
            function_name(Function::WaitForSlotEvent),
            "C_WaitForSlotEvent"
        );
    }

    #[test]
    fn errors_map_to_what_the_user_must_do() {
        let token = TokenName {
            label: "张三的UKey".into(),
            serial: "1234".into(),
            slot_id: Some(3),
        };
        let e = Error::from_cryptoki(
            CkError::Pkcs11(RvError::PinIncorrect, Function::Login),
            Some(token.clone()),
        );
        assert_eq!(e.code(), "pin_incorrect");
        let zh = e.user_message(Lang::ZhCn);
        assert!(
            zh.contains("PIN 码不正确") && zh.contains("张三的UKey"),
            "{zh}"
        );
        assert!(
            zh.contains("C_Login returned CKR_PIN_INCORRECT (0xA0)"),
            "{zh}"
        );
        let en = e.user_message(Lang::En);
        assert!(
            en.starts_with("Wrong PIN for token \"张三的UKey\" (1234)"),
            "{en}"
        );

        // The same return value is a removal when it concerns a token we just saw.
        let e = Error::from_cryptoki_on_token(
            CkError::Pkcs11(RvError::GeneralError, Function::FindObjectsInit),
            token.clone(),
        );
        assert_eq!(e.code(), "token_removed");
        let e = Error::from_cryptoki(
            CkError::Pkcs11(RvError::GeneralError, Function::FindObjectsInit),
            Some(token),
        );
        assert_eq!(e.code(), "pkcs11_error");
    }

    #[test]
    fn locale_picks_language() {
        assert_eq!(Lang::from_locale("zh_CN.UTF-8"), Lang::ZhCn);
        assert_eq!(Lang::from_locale("zh-Hans-CN"), Lang::ZhCn);
        assert_eq!(Lang::from_locale("en-US"), Lang::En);
        assert_eq!(Lang::from_locale("C"), Lang::En);
    }
}
