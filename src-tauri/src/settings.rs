//! The app's settings: a JSON file in the app config dir, plus environment overrides
//! for tests and managed installs.
//!
//! | setting          | file key        | environment           |
//! |------------------|-----------------|-----------------------|
//! | PKCS#11 module   | `pkcs11Module`  | `UKEY_PKCS11_MODULE`  |
//! | portal URL       | `portalUrl`     | `UKEY_PORTAL_URL`     |
//! | trust anchors    | `trustAnchors`  | `UKEY_TRUST` (paths, `:`-separated) |
//! | language         | `language`      | `UKEY_LANG`           |
//! | autostart        | `autostart`     | -                     |
//! | support contact  | `supportContact`| -                     |
//!
//! `UKEY_CONFIG_DIR` moves the settings file, `UKEY_DATA_DIR` the renewal journal.
//! The environment wins over the file; the settings page shows which values come from
//! the environment and saving never writes them into the file.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use ukey_token::Lang;

use crate::error::IpcError;

/// Name of the settings file in the config dir.
pub const FILE_NAME: &str = "settings.json";

/// What the user can set. Missing keys take their defaults, so an older file loads.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct Settings {
    /// PKCS#11 module chosen by the user; `None`: detect.
    pub pkcs11_module: Option<PathBuf>,
    /// Base URL of the CA's renewal portal.
    pub portal_url: Option<String>,
    /// CA certificates (PEM files) an issued certificate must chain to.
    pub trust_anchors: Vec<PathBuf>,
    /// `zh-CN` or `en`; `None`: from the system locale (Chinese unless it is English).
    pub language: Option<String>,
    /// Start at login (opt-out).
    pub autostart: bool,
    /// Who to call when a PIN is locked (the CA's hotline), shown as is.
    pub support_contact: Option<String>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            pkcs11_module: None,
            portal_url: None,
            trust_anchors: vec![],
            language: None,
            autostart: true,
            support_contact: None,
        }
    }
}

/// Languages the UI has.
pub const LANGUAGES: &[&str] = &["zh-CN", "en"];

impl Settings {
    /// Checks what a user typed; the file is not touched when this fails.
    pub fn validate(&self) -> Result<(), IpcError> {
        if let Some(url) = &self.portal_url {
            // The portal client's own rule: https://, plain http:// only on this computer.
            let ok = !url.contains(char::is_whitespace)
                && ukey_portal_client::PortalClient::new(url).is_ok();
            if !ok {
                return Err(IpcError::new(
                    "settings_portal_url",
                    format!(
                        "门户地址必须以 https:// 开头（http:// 仅限本机地址）/ the portal URL must start with https:// (http:// only for this computer): {url:?}"
                    ),
                ));
            }
        }
        if let Some(m) = &self.pkcs11_module {
            if !m.is_file() {
                return Err(IpcError::new(
                    "settings_module_missing",
                    format!("找不到驱动文件 / no such module file: {}", m.display()),
                ));
            }
        }
        for t in &self.trust_anchors {
            if !t.is_file() {
                return Err(IpcError::new(
                    "settings_trust_missing",
                    format!(
                        "找不到根证书文件 / no such trust anchor file: {}",
                        t.display()
                    ),
                ));
            }
        }
        if let Some(l) = &self.language {
            if !LANGUAGES.contains(&l.as_str()) {
                return Err(IpcError::new(
                    "settings_language",
                    format!("不支持的语言 / unsupported language: {l:?}"),
                ));
            }
        }
        Ok(())
    }

    /// Reads the file; a missing file gives the defaults, a damaged one an error (and
    /// the caller keeps running on defaults without overwriting it).
    pub fn load(path: &Path) -> Result<Settings, IpcError> {
        match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                IpcError::new(
                    "settings_file_damaged",
                    format!(
                        "设置文件已损坏 / the settings file is damaged ({}): {e}",
                        path.display()
                    ),
                )
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Settings::default()),
            Err(e) => Err(IpcError::new(
                "settings_io",
                format!("{}: {e}", path.display()),
            )),
        }
    }

    /// Writes the file atomically (temporary file + rename), creating the directory.
    pub fn save(&self, path: &Path) -> Result<(), IpcError> {
        let io =
            |e: std::io::Error| IpcError::new("settings_io", format!("{}: {e}", path.display()));
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let text = serde_json::to_vec_pretty(self)
            .map_err(|e| IpcError::new("internal", e.to_string()))?;
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, text).map_err(io)?;
        std::fs::rename(&tmp, path).map_err(io)
    }
}

/// Values from the environment that override the file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EnvOverrides {
    /// `UKEY_PKCS11_MODULE`.
    pub pkcs11_module: Option<PathBuf>,
    /// `UKEY_PORTAL_URL`.
    pub portal_url: Option<String>,
    /// `UKEY_TRUST`.
    pub trust_anchors: Option<Vec<PathBuf>>,
    /// `UKEY_LANG`.
    pub language: Option<String>,
}

impl EnvOverrides {
    /// Reads the process environment.
    pub fn from_env() -> EnvOverrides {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        EnvOverrides {
            pkcs11_module: var(ukey_token::config::MODULE_ENV).map(PathBuf::from),
            portal_url: var("UKEY_PORTAL_URL"),
            trust_anchors: std::env::var_os("UKEY_TRUST")
                .filter(|v| !v.is_empty())
                .map(|v| std::env::split_paths(&v).collect()),
            language: var("UKEY_LANG"),
        }
    }

    /// Names of the settings the environment sets (camelCase, as in the file).
    pub fn names(&self) -> Vec<&'static str> {
        let mut n = vec![];
        if self.pkcs11_module.is_some() {
            n.push("pkcs11Module");
        }
        if self.portal_url.is_some() {
            n.push("portalUrl");
        }
        if self.trust_anchors.is_some() {
            n.push("trustAnchors");
        }
        if self.language.is_some() {
            n.push("language");
        }
        n
    }

    /// The settings in force: the file's, overridden by the environment.
    pub fn apply(&self, file: &Settings) -> Settings {
        let mut s = file.clone();
        if let Some(m) = &self.pkcs11_module {
            s.pkcs11_module = Some(m.clone());
        }
        if let Some(u) = &self.portal_url {
            s.portal_url = Some(u.clone());
        }
        if let Some(t) = &self.trust_anchors {
            s.trust_anchors = t.clone();
        }
        if let Some(l) = &self.language {
            s.language = Some(l.clone());
        }
        s
    }
}

/// The language in force: the setting, else the system locale (Chinese unless the
/// locale is English: the app is for Chinese CAs' customers).
pub fn effective_language(settings: &Settings) -> &'static str {
    match settings.language.as_deref() {
        Some("en") => "en",
        Some(_) => "zh-CN",
        None => match sys_locale::get_locale() {
            Some(l) if l.to_ascii_lowercase().starts_with("en") => "en",
            _ => "zh-CN",
        },
    }
}

/// [`effective_language`] for backend messages.
pub fn lang(settings: &Settings) -> Lang {
    Lang::from_locale(effective_language(settings))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_file_gives_defaults_with_autostart_on() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = Settings::load(&dir.path().join(FILE_NAME)).expect("loads");
        assert_eq!(s, Settings::default());
        assert!(s.autostart);
    }

    #[test]
    fn save_then_load_round_trips() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("sub").join(FILE_NAME);
        let s = Settings {
            portal_url: Some("https://portal.example".into()),
            language: Some("en".into()),
            autostart: false,
            support_contact: Some("400-000-0000".into()),
            ..Settings::default()
        };
        s.save(&path).expect("saves");
        assert_eq!(Settings::load(&path).expect("loads"), s);
        let text = std::fs::read_to_string(&path).expect("read");
        assert!(text.contains("\"portalUrl\""), "{text}");
    }

    #[test]
    fn damaged_file_is_an_error_and_is_left_alone() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(FILE_NAME);
        std::fs::write(&path, b"{not json").expect("write");
        let err = Settings::load(&path).unwrap_err();
        assert_eq!(err.code, "settings_file_damaged");
        assert_eq!(std::fs::read(&path).expect("read"), b"{not json");
    }

    #[test]
    fn bad_input_is_refused_with_a_code() {
        let bad_url = Settings {
            portal_url: Some("ftp://x".into()),
            ..Settings::default()
        };
        assert_eq!(bad_url.validate().unwrap_err().code, "settings_portal_url");
        for url in ["http://portal.example", "http://10.1.2.3:8080"] {
            let plain = Settings {
                portal_url: Some(url.into()),
                ..Settings::default()
            };
            let e = plain.validate().unwrap_err();
            assert_eq!(e.code, "settings_portal_url", "{url}");
            assert!(e.message.contains("https://"), "{}", e.message);
        }
        for url in ["http://127.0.0.1:8443", "https://portal.example"] {
            let ok = Settings {
                portal_url: Some(url.into()),
                ..Settings::default()
            };
            assert!(ok.validate().is_ok(), "{url}");
        }
        let bad_module = Settings {
            pkcs11_module: Some("/nonexistent/libp11.so".into()),
            ..Settings::default()
        };
        assert_eq!(
            bad_module.validate().unwrap_err().code,
            "settings_module_missing"
        );
        let bad_lang = Settings {
            language: Some("fr".into()),
            ..Settings::default()
        };
        assert_eq!(bad_lang.validate().unwrap_err().code, "settings_language");
        assert!(Settings::default().validate().is_ok());
    }

    #[test]
    fn environment_overrides_the_file() {
        let file = Settings {
            portal_url: Some("https://file.example".into()),
            language: Some("en".into()),
            ..Settings::default()
        };
        let env = EnvOverrides {
            portal_url: Some("http://127.0.0.1:9".into()),
            ..EnvOverrides::default()
        };
        let s = env.apply(&file);
        assert_eq!(s.portal_url.as_deref(), Some("http://127.0.0.1:9"));
        assert_eq!(s.language.as_deref(), Some("en"));
        assert_eq!(env.names(), vec!["portalUrl"]);
        assert_eq!(effective_language(&s), "en");
    }
}

/// The engine settings of the configuration files the CLI reads too (the CA's
/// `/etc/ukey/config.toml` under the user's `~/.config/ukey/config.toml`), below the
/// app's own file: what the app's file leaves unset comes from them, and their trust
/// anchors are always trusted.
pub fn over_config(file: &Settings, config: &ukey_token::Config) -> Settings {
    let mut s = file.clone();
    if s.portal_url.is_none() {
        s.portal_url = config.portal_url.clone();
    }
    if s.pkcs11_module.is_none() {
        s.pkcs11_module = config.pkcs11_module.clone();
    }
    let mut anchors = config.renewal.trust_anchors.clone();
    for a in &file.trust_anchors {
        if !anchors.contains(a) {
            anchors.push(a.clone());
        }
    }
    s.trust_anchors = anchors;
    s
}

#[cfg(test)]
mod config_layer_tests {
    use super::*;

    #[test]
    fn the_apps_file_is_read_over_the_configuration_files() {
        let config = ukey_token::Config {
            portal_url: Some("https://portal.ca.example".into()),
            pkcs11_module: Some("/opt/ca/libca.so".into()),
            renewal: ukey_token::RenewalConfig {
                trust_anchors: vec!["/etc/ukey/ca-root.pem".into()],
                ..Default::default()
            },
            ..Default::default()
        };
        // A fresh install: everything from the CA's file.
        let s = over_config(&Settings::default(), &config);
        assert_eq!(s.portal_url.as_deref(), Some("https://portal.ca.example"));
        assert_eq!(s.pkcs11_module, Some(PathBuf::from("/opt/ca/libca.so")));
        assert_eq!(s.trust_anchors, [PathBuf::from("/etc/ukey/ca-root.pem")]);
        // The user's own choices win; anchors add up.
        let mine = Settings {
            portal_url: Some("https://other.example".into()),
            trust_anchors: vec!["/home/u/extra.pem".into()],
            ..Settings::default()
        };
        let s = over_config(&mine, &config);
        assert_eq!(s.portal_url.as_deref(), Some("https://other.example"));
        assert_eq!(
            s.trust_anchors,
            [
                PathBuf::from("/etc/ukey/ca-root.pem"),
                PathBuf::from("/home/u/extra.pem")
            ]
        );
    }
}
