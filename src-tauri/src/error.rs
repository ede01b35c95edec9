//! Errors as they cross IPC: `{"code": "...", "message": "..."}`.
//!
//! The UI translates by `code` (ui/src/lib/i18n.ts); `message` is the backend's own
//! sentence in the app language, shown when the UI has no translation for a code and
//! in the diagnostics copy. The shape is pinned by a test below: the UI depends on it.

use serde::Serialize;
use ukey_token::Lang;

/// An error for the UI.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, thiserror::Error)]
#[error("{code}: {message}")]
pub struct IpcError {
    /// Stable snake_case code (`pin_incorrect`, `token_removed`, `settings_invalid`...).
    pub code: String,
    /// Human sentence in the app language.
    pub message: String,
}

impl IpcError {
    /// An error with a code of this app.
    pub fn new(code: &str, message: impl Into<String>) -> IpcError {
        IpcError {
            code: code.to_owned(),
            message: message.into(),
        }
    }

    /// A token-layer error, with its own code and user message.
    pub fn from_token(err: &ukey_token::Error, lang: Lang) -> IpcError {
        IpcError {
            code: err.code().to_owned(),
            message: err.user_message(lang),
        }
    }

    /// The app's worker thread is gone (it panicked): nothing the user can fix.
    pub fn worker_gone() -> IpcError {
        IpcError::new(
            "internal",
            "内部错误：后台线程已停止，请重启程序 / internal error: the background worker stopped, restart the app",
        )
    }
}

/// Result of a command.
pub type IpcResult<T> = Result<T, IpcError>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipc_error_json_shape_is_code_and_message_only() {
        let e = IpcError::new("pin_incorrect", "PIN 不正确");
        let json = serde_json::to_value(&e).expect("serialises");
        assert_eq!(
            json,
            serde_json::json!({"code": "pin_incorrect", "message": "PIN 不正确"})
        );
        // Exactly these two keys, in this order, as the UI's `toIpcError` reads them.
        let text = serde_json::to_string(&e).expect("serialises");
        assert_eq!(text, r#"{"code":"pin_incorrect","message":"PIN 不正确"}"#);
    }

    #[test]
    fn token_errors_keep_their_code_and_translate() {
        let err = ukey_token::Error::ModuleNotFound {
            path: Some("/nope/libx.so".into()),
            searched: vec![],
        };
        let zh = IpcError::from_token(&err, Lang::ZhCn);
        let en = IpcError::from_token(&err, Lang::En);
        assert_eq!(zh.code, "module_not_found");
        assert_eq!(en.code, "module_not_found");
        assert_ne!(zh.message, en.message);
        assert!(en.message.contains("/nope/libx.so"), "{}", en.message);
    }
}
