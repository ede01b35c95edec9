//! The settings page's values live in two files:
//!
//! - the engine's, shared with the `ukey` CLI: the user's `config.toml`
//!   ([`ukey_token::Config::default_path`], over the CA's `/etc/ukey/config.toml`):
//!   PKCS#11 module, portal URL, trust anchors, support contact;
//! - the app's own `settings.json` in the app config dir: language and autostart.
//!
//! | setting          | form key        | file                           | environment           |
//! |------------------|-----------------|--------------------------------|-----------------------|
//! | PKCS#11 module   | `pkcs11Module`  | config.toml `pkcs11_module`    | `UKEY_PKCS11_MODULE`  |
//! | portal URL       | `portalUrl`     | config.toml `portal_url`       | `UKEY_PORTAL_URL`     |
//! | trust anchors    | `trustAnchors`  | config.toml `[renewal] trust_anchors` | `UKEY_TRUST` (paths, `:`-separated) |
//! | support contact  | `supportContact`| config.toml `support_contact`  | -                     |
//! | language         | `language`      | settings.json `language`       | `UKEY_LANG`           |
//! | autostart        | `autostart`     | settings.json `autostart`      | -                     |
//!
//! `UKEY_CONFIG` moves config.toml, `UKEY_CONFIG_DIR` settings.json, `UKEY_DATA_DIR` the
//! renewal journal. The environment wins over the files; the settings page shows which
//! values come from the environment and saving never writes them into a file. A
//! settings.json of an older version, which held the engine's settings too, is moved
//! over on start ([`migrate`]).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use ukey_token::{Config, Lang, UserSettings};

use crate::error::IpcError;

/// Name of the app's settings file in the app config dir.
pub const FILE_NAME: &str = "settings.json";

/// The settings page's form: what the user can set, from both files.
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
        Settings::from_parts(&AppSettings::default(), &UserSettings::default())
    }
}

/// The app's own file: only what is the app's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct AppSettings {
    /// `zh-CN` or `en`; `None`: from the system locale.
    pub language: Option<String>,
    /// Start at login (opt-out).
    pub autostart: bool,
    /// Engine settings an older version kept here: read, moved to config.toml by
    /// [`migrate`], never written again.
    #[serde(skip_serializing)]
    pkcs11_module: Option<PathBuf>,
    #[serde(skip_serializing)]
    portal_url: Option<String>,
    #[serde(skip_serializing)]
    trust_anchors: Vec<PathBuf>,
    #[serde(skip_serializing)]
    support_contact: Option<String>,
}

impl Default for AppSettings {
    fn default() -> Self {
        AppSettings {
            language: None,
            autostart: true,
            pkcs11_module: None,
            portal_url: None,
            trust_anchors: vec![],
            support_contact: None,
        }
    }
}

impl Settings {
    /// The form for the app's file and the user's config.toml.
    pub fn from_parts(app: &AppSettings, user: &UserSettings) -> Settings {
        Settings {
            pkcs11_module: user.pkcs11_module.clone(),
            portal_url: user.portal_url.clone(),
            trust_anchors: user.trust_anchors.clone(),
            language: app.language.clone(),
            autostart: app.autostart,
            support_contact: user.support_contact.clone(),
        }
    }

    /// The form split into the app's file and the user's config.toml.
    pub fn into_parts(self) -> (AppSettings, UserSettings) {
        (
            AppSettings {
                language: self.language,
                autostart: self.autostart,
                ..AppSettings::default()
            },
            UserSettings {
                pkcs11_module: self.pkcs11_module,
                portal_url: self.portal_url,
                support_contact: self.support_contact,
                trust_anchors: self.trust_anchors,
            },
        )
    }

    /// The settings in force: the app's file and the merged configuration files (the
    /// CA's and the user's), before the environment.
    pub fn in_force(app: &AppSettings, config: &Config) -> Settings {
        Settings::from_parts(app, &UserSettings::of(config))
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
}

impl AppSettings {
    /// Reads the file; a missing file gives the defaults, a damaged one an error (and
    /// the caller keeps running on defaults without overwriting it).
    pub fn load(path: &Path) -> Result<AppSettings, IpcError> {
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
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(AppSettings::default()),
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

/// Values from the environment that override the files.
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

/// Moves the engine settings an older settings.json held into the user's config.toml
/// (where it does not set them already) and rewrites settings.json without them. Says
/// what it moved; a failure leaves both files as they were.
pub fn migrate(
    app: &AppSettings,
    app_path: &Path,
    config_path: &Path,
) -> Result<Vec<&'static str>, IpcError> {
    let config_err = |e: ukey_token::Error| IpcError::new("settings_io", e.to_string());
    let mut user = UserSettings::of(&Config::load(config_path).map_err(config_err)?);
    let mut moved = vec![];
    if let Some(m) = &app.pkcs11_module {
        moved.push("pkcs11_module");
        user.pkcs11_module.get_or_insert_with(|| m.clone());
    }
    if let Some(u) = &app.portal_url {
        moved.push("portal_url");
        user.portal_url.get_or_insert_with(|| u.clone());
    }
    if let Some(c) = &app.support_contact {
        moved.push("support_contact");
        user.support_contact.get_or_insert_with(|| c.clone());
    }
    if !app.trust_anchors.is_empty() {
        moved.push("trust_anchors");
        for a in &app.trust_anchors {
            if !user.trust_anchors.contains(a) {
                user.trust_anchors.push(a.clone());
            }
        }
    }
    if moved.is_empty() {
        return Ok(moved);
    }
    user.save(config_path).map_err(config_err)?;
    // Written without the engine's settings (they are never serialised).
    app.save(app_path)?;
    Ok(moved)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_file_gives_defaults_with_autostart_on() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = AppSettings::load(&dir.path().join(FILE_NAME)).expect("loads");
        assert_eq!(s, AppSettings::default());
        assert!(s.autostart);
    }

    #[test]
    fn save_then_load_round_trips() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("sub").join(FILE_NAME);
        let s = AppSettings {
            language: Some("en".into()),
            autostart: false,
            ..AppSettings::default()
        };
        s.save(&path).expect("saves");
        assert_eq!(AppSettings::load(&path).expect("loads"), s);
        let text = std::fs::read_to_string(&path).expect("read");
        assert!(text.contains("\"autostart\": false"), "{text}");
    }

    #[test]
    fn damaged_file_is_an_error_and_is_left_alone() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(FILE_NAME);
        std::fs::write(&path, b"{not json").expect("write");
        let err = AppSettings::load(&path).unwrap_err();
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

    #[test]
    fn the_form_is_split_between_the_apps_file_and_config_toml() {
        let form = Settings {
            pkcs11_module: Some("/opt/vendor/libp11.so".into()),
            portal_url: Some("https://portal.ca.example".into()),
            trust_anchors: vec!["/etc/ukey/root.pem".into()],
            language: Some("en".into()),
            autostart: false,
            support_contact: Some("400-800-1234".into()),
        };
        let (app, user) = form.clone().into_parts();
        let dir = tempfile::tempdir().expect("tempdir");
        let app_path = dir.path().join(FILE_NAME);
        app.save(&app_path).expect("save");
        let json = std::fs::read_to_string(&app_path).expect("read");
        for engine in [
            "portalUrl",
            "pkcs11Module",
            "trustAnchors",
            "supportContact",
        ] {
            assert!(!json.contains(engine), "{engine} in settings.json: {json}");
        }
        assert_eq!(Settings::from_parts(&app, &user), form);
        // What is in force comes from the merged configuration files.
        let config = Config {
            portal_url: Some("https://portal.ca.example".into()),
            ..Config::default()
        };
        let in_force = Settings::in_force(&app, &config);
        assert_eq!(in_force.portal_url, form.portal_url);
        assert_eq!(in_force.language.as_deref(), Some("en"));
        assert_eq!(in_force.pkcs11_module, None);
    }

    #[test]
    fn an_older_settings_file_is_moved_into_config_toml() {
        let dir = tempfile::tempdir().expect("tempdir");
        let app_path = dir.path().join(FILE_NAME);
        let config_path = dir.path().join("ukey").join("config.toml");
        std::fs::write(
            &app_path,
            r#"{"portalUrl":"https://old.example","trustAnchors":["/etc/ukey/old.pem"],"supportContact":"400-1","language":"en","autostart":false}"#,
        )
        .expect("write");
        // The user's config.toml already names a portal: it stays.
        std::fs::create_dir_all(config_path.parent().expect("dir")).expect("mkdir");
        std::fs::write(&config_path, "portal_url = \"https://mine.example\"\n").expect("write");
        let app = AppSettings::load(&app_path).expect("an old file loads");
        let moved = migrate(&app, &app_path, &config_path).expect("migrate");
        assert_eq!(moved, ["portal_url", "support_contact", "trust_anchors"]);
        let cfg = Config::load(&config_path).expect("config");
        assert_eq!(cfg.portal_url.as_deref(), Some("https://mine.example"));
        assert_eq!(cfg.support_contact.as_deref(), Some("400-1"));
        assert_eq!(
            cfg.renewal.trust_anchors,
            [PathBuf::from("/etc/ukey/old.pem")]
        );
        let json = std::fs::read_to_string(&app_path).expect("read");
        assert!(
            !json.contains("old.example") && !json.contains("400-1"),
            "{json}"
        );
        let again = AppSettings::load(&app_path).expect("load");
        assert_eq!(again.language.as_deref(), Some("en"));
        assert!(!again.autostart);
        // Nothing left to move.
        assert!(
            migrate(&again, &app_path, &config_path)
                .expect("again")
                .is_empty()
        );
    }
}
