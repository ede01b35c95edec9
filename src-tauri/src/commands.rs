//! IPC commands: thin, they parse arguments and hand over to the service, the
//! settings or the engine crates. Every command the UI may call is listed in
//! `build.rs` (which makes its permission) and in `capabilities/default.json`.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::mpsc;

use secrecy::SecretString;
use serde::Serialize;
use tauri::State;
use tauri::ipc::Channel;
use tauri_plugin_autostart::ManagerExt as _;

use crate::AppState;
use crate::error::{IpcError, IpcResult};
use crate::renewal::{
    self, DiagnosticsResult, EngineConfig, PlanView, PortalStatus, RenewEvent, RenewOutcome,
};
use crate::service::{Request, StatusSource};
use crate::settings::{self, AppSettings, Settings};
use crate::view::Snapshot;
use ukey_token::UserSettings;

/// The keys, certificates and statuses as they are now (later changes come as
/// `snapshot` events).
#[tauri::command]
pub fn get_snapshot(state: State<'_, AppState>) -> Snapshot {
    state.service.snapshot()
}

/// Re-reads the keys and asks the portal again.
#[tauri::command]
pub fn refresh(state: State<'_, AppState>) -> IpcResult<()> {
    state.service.send(Request::Refresh)
}

/// A module discovery found.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DetectedModule {
    /// Vendor name.
    pub name: String,
    /// Library path.
    pub path: String,
}

/// What the settings page shows.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SettingsView {
    /// As in the user's files (config.toml and the app's settings.json): what the page
    /// edits.
    pub file: Settings,
    /// In force (the CA's config, the user's files, the environment).
    pub effective: Settings,
    /// What the CA's system-wide file sets (shown where the user's file is silent).
    pub system: Settings,
    /// Settings set by the environment (not editable here).
    pub env_overrides: Vec<&'static str>,
    /// `zh-CN` or `en`.
    pub language: &'static str,
    /// Modules found on this machine.
    pub detected_modules: Vec<DetectedModule>,
    /// The app's own settings file.
    pub settings_path: String,
    /// The user's config.toml (shared with the `ukey` CLI).
    pub config_path: Option<String>,
    /// The CA's system-wide config.toml.
    pub system_config_path: String,
    /// Whether autostart is really registered with the desktop.
    pub autostart_registered: Option<bool>,
    /// App version.
    pub version: &'static str,
}

/// The form as in the user's files.
fn file_form(state: &AppState) -> IpcResult<Settings> {
    let app = state
        .file_settings
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let user = match &state.config_path {
        Some(p) => ukey_token::Config::load(p)
            .map_err(|e| IpcError::new("settings_file_damaged", e.to_string()))?,
        None => ukey_token::Config::default(),
    };
    Ok(Settings::from_parts(&app, &UserSettings::of(&user)))
}

fn settings_view(app: &tauri::AppHandle, state: &AppState) -> IpcResult<SettingsView> {
    let file = file_form(state)?;
    let effective = state.effective();
    let system_path = ukey_token::Config::system_path();
    let system = ukey_token::Config::load(&system_path)
        .map(|c| Settings::from_parts(&AppSettings::default(), &UserSettings::of(&c)))
        .unwrap_or_default();
    let config = ukey_token::Config::load_default().unwrap_or_default();
    Ok(SettingsView {
        language: settings::effective_language(&effective),
        env_overrides: state.env.names(),
        detected_modules: ukey_token::discover_all(&config)
            .into_iter()
            .map(|m| DetectedModule {
                name: m.name,
                path: m.path.display().to_string(),
            })
            .collect(),
        settings_path: state.settings_path.display().to_string(),
        config_path: state.config_path.as_ref().map(|p| p.display().to_string()),
        system_config_path: system_path.display().to_string(),
        autostart_registered: app.autolaunch().is_enabled().ok(),
        version: env!("CARGO_PKG_VERSION"),
        file,
        effective,
        system,
    })
}

/// The settings page's content.
#[tauri::command]
pub fn get_settings(app: tauri::AppHandle, state: State<'_, AppState>) -> IpcResult<SettingsView> {
    settings_view(&app, &state)
}

/// Validates and saves the settings (the engine's in the user's config.toml, which the
/// CLI reads too; language and autostart in the app's file), applies autostart and
/// reloads the service. Invalid input changes nothing.
#[tauri::command]
pub fn save_settings(
    app: tauri::AppHandle,
    state: State<'_, AppState>,
    settings: Settings,
) -> IpcResult<SettingsView> {
    settings.validate()?;
    {
        let old = file_form(&state)?;
        let chosen = state.chosen_files.lock().unwrap_or_else(|e| e.into_inner());
        let unchosen = unchosen_paths(&settings, &old, &chosen);
        if let Some(p) = unchosen.first() {
            return Err(IpcError::new(
                "settings_path_not_chosen",
                format!(
                    "请用“选择”按钮选择文件 / choose the file with the button: {}",
                    p.display()
                ),
            ));
        }
    }
    let autostart_on = settings.autostart;
    let (app_settings, user) = settings.into_parts();
    let config_path = state.config_path.as_ref().ok_or_else(|| {
        IpcError::new(
            "settings_io",
            "找不到用户配置目录 / no configuration directory for this user",
        )
    })?;
    user.save(config_path)
        .map_err(|e| IpcError::new("settings_io", e.to_string()))?;
    app_settings.save(&state.settings_path)?;
    if autostart_on {
        crate::ensure_autostart_dir();
    }
    let autostart = if autostart_on {
        app.autolaunch().enable()
    } else {
        app.autolaunch().disable()
    };
    if let Err(e) = autostart {
        tracing::warn!("autostart: {e}");
    }
    *state
        .file_settings
        .lock()
        .unwrap_or_else(|e| e.into_inner()) = app_settings;
    state
        .service
        .send(Request::Reconfigure(crate::service_config(
            &state.effective(),
            &state.data_dir,
        )))?;
    settings_view(&app, &state)
}

/// The portal client for these settings, if a portal is configured.
pub fn status_source(settings: &Settings) -> Option<Arc<dyn StatusSource>> {
    if crate::renewal::cmp_options().is_some() {
        return Some(Arc::new(crate::renewal::CmpStatus));
    }
    PortalStatus::for_url(settings.portal_url.as_deref())
}

fn engine_config(state: &AppState) -> EngineConfig {
    let s = state.effective();
    EngineConfig {
        portal_url: s.portal_url.clone(),
        cmp: crate::renewal::cmp_options(),
        trust_anchors: s.trust_anchors.clone(),
        data_dir: state.data_dir.clone(),
        lang: settings::lang(&s),
    }
}

/// Runs `f` with the module on the key service thread and waits for its answer.
async fn with_module<T: Send + 'static>(
    state: &AppState,
    f: impl FnOnce(Option<&ukey_token::Module>) -> T + Send + 'static,
) -> IpcResult<T> {
    let (tx, rx) = mpsc::channel();
    state.service.send(Request::WithModule(Box::new(move |m| {
        // The command may have been dropped meanwhile: nobody to answer then.
        let _ = tx.send(f(m));
    })))?;
    tauri::async_runtime::spawn_blocking(move || rx.recv())
        .await
        .map_err(|_| IpcError::worker_gone())?
        .map_err(|_| IpcError::worker_gone())
}

/// What renewing this certificate will do (the engine's notices), before the PIN.
#[tauri::command]
pub async fn plan_renewal(
    state: State<'_, AppState>,
    token_id: String,
    cert_serial: String,
) -> IpcResult<PlanView> {
    let cfg = engine_config(&state);
    let lang = cfg.lang;
    with_module(&state, move |m| match m {
        Some(m) => renewal::plan(m, &token_id, &cert_serial, &cfg),
        None => Err(no_module(lang)),
    })
    .await?
}

fn no_module(lang: ukey_token::Lang) -> IpcError {
    IpcError::new(
        "module_not_found",
        lang.pick("没有可用的 UKey 驱动", "no usable PKCS#11 module"),
    )
}

/// Renews one certificate. The PIN is used for this one attempt and dropped; a wrong
/// PIN comes back as `pin_incorrect` and is not tried again. `confirm_final_try`: the
/// user was shown that this is the PIN's last try. `renewal_code`: the order's code,
/// when the portal asks for one (a wrong one comes back as `renewal_code_invalid`).
#[tauri::command]
#[allow(clippy::too_many_arguments)]
pub async fn renew(
    state: State<'_, AppState>,
    token_id: String,
    cert_serial: String,
    pin: SecretString,
    confirm_final_try: bool,
    renewal_code: Option<String>,
    on_event: Channel<RenewEvent>,
) -> IpcResult<RenewOutcome> {
    let cfg = engine_config(&state);
    let (tx, rx) = mpsc::channel();
    let (t, c) = (token_id.clone(), cert_serial.clone());
    state.service.send(Request::Renew {
        token_id,
        cert_serial,
        job: Box::new(move |module| {
            let mut send = |e: RenewEvent| {
                if let Err(err) = on_event.send(e) {
                    tracing::debug!("progress channel closed: {err}");
                }
            };
            let entered = renewal::Entered {
                pin: &pin,
                confirm_final_try,
                renewal_code,
            };
            let outcome = renewal::renew(module, &t, &c, entered, &cfg, &mut send);
            drop(pin);
            outcome
        }),
        reply: tx,
    })?;
    tauri::async_runtime::spawn_blocking(move || rx.recv())
        .await
        .map_err(|_| IpcError::worker_gone())?
        .map_err(|_| IpcError::worker_gone())?
}

/// Runs the diagnosis (`ukey diagnose`) and keeps its redacted form for "save".
#[tauri::command]
pub async fn diagnose(
    state: State<'_, AppState>,
    pin: Option<SecretString>,
    token_id: Option<String>,
) -> IpcResult<DiagnosticsResult> {
    let cfg = engine_config(&state);
    let module_path = state.effective().pkcs11_module;
    // With a PIN, the diagnosis proves each key signs: the PIN goes to C_Login once on
    // one token (never at a last try or locked), and is dropped with the job.
    let result = with_module(&state, move |m| {
        renewal::diagnose(m, &cfg, module_path, pin, token_id)
    })
    .await?;
    *state.last_report.lock().unwrap_or_else(|e| e.into_inner()) = Some(result.report.redacted());
    Ok(result)
}

/// Asks where to save the last diagnosis (a save dialog opened here, not a path from
/// the webview) and writes it there, redacted, as JSON. `None`: the user cancelled.
#[tauri::command]
pub async fn save_report(
    app: tauri::AppHandle,
    state: State<'_, AppState>,
) -> IpcResult<Option<String>> {
    use tauri_plugin_dialog::DialogExt as _;
    let report = state
        .last_report
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone()
        .ok_or_else(|| IpcError::new("no_report", "先运行诊断 / run the diagnosis first"))?;
    let lang = settings::lang(&state.effective());
    let chosen = app
        .dialog()
        .file()
        .set_title(lang.pick("保存诊断报告", "Save the diagnosis report"))
        .set_file_name("ukey-diagnose.json")
        .add_filter("JSON", &["json"])
        .blocking_save_file();
    let Some(chosen) = chosen else {
        return Ok(None);
    };
    let path = chosen
        .into_path()
        .map_err(|e| IpcError::new("save_failed", e.to_string()))?;
    let json =
        serde_json::to_vec_pretty(&report).map_err(|e| IpcError::new("internal", e.to_string()))?;
    std::fs::write(&path, json)
        .map_err(|e| IpcError::new("save_failed", format!("{}: {e}", path.display())))?;
    Ok(Some(path.display().to_string()))
}

/// Opens a file dialog here (not in the webview) for the PKCS#11 module (`kind =
/// "module"`) or a trust anchor (`"trust"`) and remembers the choice, so that
/// `save_settings` accepts it. `None`: the user cancelled.
#[tauri::command]
pub async fn choose_file(
    app: tauri::AppHandle,
    state: State<'_, AppState>,
    kind: String,
) -> IpcResult<Option<String>> {
    use tauri_plugin_dialog::DialogExt as _;
    let lang = settings::lang(&state.effective());
    let (title, extensions): (&str, &[&str]) = match kind.as_str() {
        "module" => (
            lang.pick("选择 PKCS#11 驱动", "Choose the PKCS#11 module"),
            &["so", "dylib", "dll"],
        ),
        "trust" => (
            lang.pick("选择根证书", "Choose a trusted root certificate"),
            &["pem", "crt", "cer", "der"],
        ),
        other => {
            return Err(IpcError::new(
                "internal",
                format!("no such file kind {other:?}"),
            ));
        }
    };
    let chosen = app
        .dialog()
        .file()
        .set_title(title)
        .add_filter(title, extensions)
        .blocking_pick_file();
    let Some(chosen) = chosen else {
        return Ok(None);
    };
    let path = chosen
        .into_path()
        .map_err(|e| IpcError::new("internal", e.to_string()))?;
    state
        .chosen_files
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(path.clone());
    Ok(Some(path.display().to_string()))
}

/// Paths in `new` that are neither in `old` (the file as it was) nor among `chosen`
/// (picked in a dialog Rust opened): the webview may not bring its own.
pub fn unchosen_paths(new: &Settings, old: &Settings, chosen: &[PathBuf]) -> Vec<PathBuf> {
    let known = |p: &PathBuf| {
        chosen.contains(p) || old.pkcs11_module.as_ref() == Some(p) || old.trust_anchors.contains(p)
    };
    new.pkcs11_module
        .iter()
        .chain(new.trust_anchors.iter())
        .filter(|p| !known(p))
        .cloned()
        .collect()
}

/// Whether `page` may be opened for the configured portal: the same origin (scheme,
/// host and port) as `portal`. `Err` says why not, in both languages.
pub fn check_portal_page(portal: Option<&str>, page: &str) -> IpcResult<tauri::Url> {
    let refuse = |why: &str| {
        IpcError::new(
            "page_not_on_portal",
            format!("只打开 CA 门户自己的页面 / only the portal's own pages are opened: {why}"),
        )
    };
    let portal = portal.ok_or_else(|| refuse("no portal is configured"))?;
    let portal = tauri::Url::parse(portal).map_err(|e| refuse(&e.to_string()))?;
    let url = tauri::Url::parse(page).map_err(|e| refuse(&e.to_string()))?;
    if url.origin() != portal.origin() {
        return Err(refuse(&format!(
            "{} is not on {}",
            url.origin().ascii_serialization(),
            portal.origin().ascii_serialization()
        )));
    }
    Ok(url)
}

/// Opens a page of the configured portal (payment, application) in the browser. The
/// URL comes from a portal answer through the webview: only the portal's own origin is
/// opened, by Rust (the webview has no opener permission).
#[tauri::command]
pub fn open_portal_page(
    app: tauri::AppHandle,
    state: State<'_, AppState>,
    url: String,
) -> IpcResult<()> {
    use tauri_plugin_opener::OpenerExt as _;
    let url = check_portal_page(state.effective().portal_url.as_deref(), &url)?;
    app.opener()
        .open_url(url.as_str(), None::<&str>)
        .map_err(|e| IpcError::new("open_failed", e.to_string()))
}

#[cfg(test)]
mod portal_page_tests {
    use super::{check_portal_page, unchosen_paths};
    use crate::settings::Settings;

    #[test]
    fn settings_take_only_paths_chosen_in_a_dialog_or_already_there() {
        let old = Settings {
            pkcs11_module: Some("/usr/lib/old.so".into()),
            trust_anchors: vec!["/etc/ukey/root.pem".into()],
            ..Settings::default()
        };
        let chosen = vec![std::path::PathBuf::from("/opt/vendor/libp11.so")];
        let keep = old.clone();
        assert!(unchosen_paths(&keep, &old, &chosen).is_empty());
        let picked = Settings {
            pkcs11_module: Some("/opt/vendor/libp11.so".into()),
            ..old.clone()
        };
        assert!(unchosen_paths(&picked, &old, &chosen).is_empty());
        let injected = Settings {
            trust_anchors: vec!["/etc/ukey/root.pem".into(), "/tmp/evil.pem".into()],
            ..old.clone()
        };
        assert_eq!(
            unchosen_paths(&injected, &old, &chosen),
            vec![std::path::PathBuf::from("/tmp/evil.pem")]
        );
    }

    #[test]
    fn only_the_portal_origin_is_opened() {
        let portal = Some("https://portal.example.cn/base");
        assert!(check_portal_page(portal, "https://portal.example.cn/pay?serial=0A").is_ok());
        for other in [
            "https://evil.example/pay",
            "http://portal.example.cn/pay",
            "https://portal.example.cn:8443/pay",
            "file:///etc/passwd",
            "not a url",
        ] {
            let e = check_portal_page(portal, other).unwrap_err();
            assert_eq!(e.code, "page_not_on_portal", "{other}");
        }
        assert!(check_portal_page(None, "https://portal.example.cn/pay").is_err());
    }
}
