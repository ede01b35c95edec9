//! UKey Renew desktop app: the Tauri shell. It wires the key service ([`service`]),
//! the settings ([`settings`]) and the commands ([`commands`]) to a window, a tray
//! icon, desktop notifications, autostart and single-instance. All logic lives in the
//! workspace crates (ukey-token, ukey-renewal, ukey-diagnose, ukey-portal-client).
//!
//! Events to the UI: `snapshot` (a [`view::Snapshot`]) whenever keys, statuses or the
//! module change. Renewal progress goes over the `renew` command's channel.
//!
//! Environment (tests, managed installs): the settings overrides of [`settings`]
//! (`UKEY_PKCS11_MODULE`, `UKEY_PORTAL_URL`, `UKEY_TRUST`, `UKEY_LANG`), plus
//! `UKEY_CONFIG_DIR` (settings file), `UKEY_DATA_DIR` (renewal journals, shared with
//! `ukey renew`), `UKEY_LOG` (tracing filter, default `info,cryptoki=off`) and
//! `UKEY_EXIT_ON_CLOSE` (closing the window quits instead of hiding to the tray).

pub mod commands;
pub mod error;
pub mod renewal;
pub mod service;
pub mod settings;
pub mod view;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use tauri::menu::{Menu, MenuItem};
use tauri::tray::{MouseButton, MouseButtonState, TrayIconBuilder, TrayIconEvent};
use tauri::{AppHandle, Emitter as _, Manager, WindowEvent};
use tauri_plugin_autostart::ManagerExt as _;
use tauri_plugin_notification::NotificationExt as _;

use crate::service::{Emitter, Service, ServiceConfig};
use crate::settings::{AppSettings, EnvOverrides, Settings};
use crate::view::{KeyView, Snapshot};

/// Name of the event carrying a [`Snapshot`].
pub const SNAPSHOT_EVENT: &str = "snapshot";
/// Command-line flag autostart launches us with: start in the tray, window hidden.
pub const MINIMIZED_FLAG: &str = "--minimized";

/// App state shared by the commands.
#[derive(Debug)]
pub struct AppState {
    /// The key service.
    pub service: Service,
    /// The app's own settings file (language, autostart).
    pub settings_path: PathBuf,
    /// The user's config.toml, shared with the CLI (module, portal, trust anchors,
    /// support contact); `None` when the system gives no config directory.
    pub config_path: Option<PathBuf>,
    /// The app's own settings as in its file.
    pub file_settings: Mutex<AppSettings>,
    /// Environment overrides, read once at start.
    pub env: EnvOverrides,
    /// Directory of the renewal journals (shared with `ukey renew`).
    pub data_dir: PathBuf,
    /// The last diagnosis, redacted, for "save report".
    pub last_report: Mutex<Option<ukey_diagnose::Report>>,
    /// Files the user chose in a dialog Rust opened (module, trust anchors): the only
    /// new paths `save_settings` accepts from the webview.
    pub chosen_files: Mutex<Vec<PathBuf>>,
}

impl AppState {
    /// The settings in force.
    pub fn effective(&self) -> Settings {
        let file = self
            .file_settings
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let config = ukey_token::Config::load_default().unwrap_or_else(|e| {
            tracing::warn!("configuration file: {e}");
            ukey_token::Config::default()
        });
        self.env.apply(&Settings::in_force(&file, &config))
    }
}

struct TauriEmitter(AppHandle);

impl Emitter for TauriEmitter {
    fn snapshot(&self, snapshot: &Snapshot) {
        if let Err(e) = self.0.emit(SNAPSHOT_EVENT, snapshot) {
            tracing::warn!("emitting snapshot: {e}");
        }
    }

    fn renewal_ready(&self, key: &KeyView, cert_serial: &str) {
        let lang = self
            .0
            .try_state::<AppState>()
            .map(|s| settings::effective_language(&s.effective()))
            .unwrap_or("zh-CN");
        let holder = key
            .certificates
            .iter()
            .find(|c| c.serial.as_deref() == Some(cert_serial))
            .and_then(|c| c.holder.clone())
            .unwrap_or_else(|| key.label.clone());
        let (title, body) = if lang == "en" {
            (
                "Certificate update available — renew now".to_owned(),
                format!(
                    "{holder}'s certificate on key {} can be renewed now.",
                    key.label
                ),
            )
        } else {
            (
                "证书有可用更新 — 立即更新".to_owned(),
                format!("{holder} 的证书（UKey {}）现在可以更新。", key.label),
            )
        };
        // show() returns Ok even without a notification daemon; the in-app banner is
        // the indication that does not depend on the desktop.
        if let Err(e) = self
            .0
            .notification()
            .builder()
            .title(title)
            .body(body)
            .show()
        {
            tracing::warn!("desktop notification: {e}");
        }
    }
}

fn dir_from_env(var: &str) -> Option<PathBuf> {
    std::env::var_os(var)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

fn show_main_window(app: &AppHandle) {
    if let Some(w) = app.get_webview_window("main") {
        let _ = w.unminimize();
        let _ = w.show();
        let _ = w.set_focus();
    }
}

/// The service configuration for these settings.
pub fn service_config(settings: &Settings, data_dir: &std::path::Path) -> ServiceConfig {
    ServiceConfig {
        module: settings.pkcs11_module.clone(),
        portal: commands::status_source(settings),
        portal_url: settings.portal_url.clone(),
        data_dir: Some(data_dir.to_owned()),
        lang: settings::lang(settings),
    }
}

fn setup(app: &mut tauri::App) -> Result<(), Box<dyn std::error::Error>> {
    let handle = app.handle().clone();
    let config_dir = match dir_from_env("UKEY_CONFIG_DIR") {
        Some(d) => d,
        None => app.path().app_config_dir()?,
    };
    // The engine's default ($UKEY_DATA_DIR, else ~/.local/share/ukey): a renewal
    // interrupted in `ukey renew` is finished here and the other way round.
    let data_dir = match ukey_renewal::default_data_dir() {
        Some(d) => d,
        None => app.path().app_data_dir()?,
    };
    let settings_path = config_dir.join(settings::FILE_NAME);
    let first_run = !settings_path.exists();
    let file_settings = match AppSettings::load(&settings_path) {
        Ok(s) => s,
        Err(e) => {
            // Keep the damaged file for the user to look at; run on defaults.
            tracing::warn!("{}", e.message);
            AppSettings::default()
        }
    };
    let config_path = ukey_token::Config::default_path();
    if let Some(config_path) = &config_path {
        match settings::migrate(&file_settings, &settings_path, config_path) {
            Ok(moved) if moved.is_empty() => {}
            Ok(moved) => tracing::info!(
                ?moved,
                to = %config_path.display(),
                "engine settings moved from settings.json to config.toml"
            ),
            Err(e) => tracing::warn!("moving settings to config.toml: {}", e.message),
        }
    }
    if first_run && file_settings.autostart {
        // Autostart is opt-out: turned on at first start, off in the settings page.
        ensure_autostart_dir();
        match app.autolaunch().enable() {
            Ok(()) => tracing::info!("autostart enabled (first run)"),
            Err(e) => tracing::warn!("enabling autostart: {e}"),
        }
        if let Err(e) = file_settings.save(&settings_path) {
            tracing::warn!("{}", e.message);
        }
    }
    let env = EnvOverrides::from_env();
    let config = ukey_token::Config::load_default().unwrap_or_else(|e| {
        tracing::warn!("configuration file: {e}");
        ukey_token::Config::default()
    });
    let effective = env.apply(&Settings::in_force(&file_settings, &config));
    let emitter: Arc<dyn Emitter> = Arc::new(TauriEmitter(handle.clone()));
    let service = Service::start(service_config(&effective, &data_dir), emitter);
    app.manage(AppState {
        service,
        settings_path,
        config_path,
        file_settings: Mutex::new(file_settings),
        env,
        data_dir,
        last_report: Mutex::new(None),
        chosen_files: Mutex::new(Vec::new()),
    });

    let zh = settings::effective_language(&effective) != "en";
    let open = MenuItem::with_id(
        app,
        "open",
        if zh {
            "打开 UKey 证书更新"
        } else {
            "Open UKey Renew"
        },
        true,
        None::<&str>,
    )?;
    let quit = MenuItem::with_id(
        app,
        "quit",
        if zh { "退出" } else { "Quit" },
        true,
        None::<&str>,
    )?;
    let menu = Menu::with_items(app, &[&open, &quit])?;
    let mut tray = TrayIconBuilder::with_id("main")
        .tooltip(if zh {
            "UKey 证书更新"
        } else {
            "UKey Renew"
        })
        .menu(&menu)
        .show_menu_on_left_click(false)
        .on_menu_event(|app, event| match event.id.as_ref() {
            "open" => show_main_window(app),
            "quit" => app.exit(0),
            _ => {}
        })
        .on_tray_icon_event(|tray, event| {
            if let TrayIconEvent::Click {
                button: MouseButton::Left,
                button_state: MouseButtonState::Up,
                ..
            } = event
            {
                show_main_window(tray.app_handle());
            }
        });
    if let Some(icon) = app.default_window_icon() {
        tray = tray.icon(icon.clone());
    }
    tray.build(app)?;

    if std::env::args().any(|a| a == MINIMIZED_FLAG) {
        if let Some(w) = app.get_webview_window("main") {
            w.hide()?;
        }
    }
    Ok(())
}

/// Runs the app until the user quits from the tray.
pub fn run() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("UKEY_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,cryptoki=off")),
        )
        .with_writer(std::io::stderr)
        .init();
    let result = tauri::Builder::default()
        // First: a second start only brings the running window forward.
        .plugin(tauri_plugin_single_instance::init(|app, _args, _cwd| {
            show_main_window(app);
        }))
        .plugin(tauri_plugin_autostart::init(
            tauri_plugin_autostart::MacosLauncher::LaunchAgent,
            Some(vec![MINIMIZED_FLAG]),
        ))
        .plugin(tauri_plugin_notification::init())
        .plugin(tauri_plugin_opener::init())
        .plugin(tauri_plugin_dialog::init())
        .plugin(tauri_plugin_clipboard_manager::init())
        .setup(setup)
        .on_window_event(|window, event| {
            // Closing the window keeps the app in the tray, watching for keys.
            if let WindowEvent::CloseRequested { api, .. } = event {
                if std::env::var_os("UKEY_EXIT_ON_CLOSE").is_none() {
                    api.prevent_close();
                    let _ = window.hide();
                }
            }
        })
        .invoke_handler(tauri::generate_handler![
            commands::get_snapshot,
            commands::refresh,
            commands::get_settings,
            commands::save_settings,
            commands::plan_renewal,
            commands::renew,
            commands::diagnose,
            commands::save_report,
            commands::open_portal_page,
            commands::choose_file,
        ])
        .run(tauri::generate_context!());
    if let Err(e) = result {
        eprintln!("ukey-desktop: {e}");
        std::process::exit(1);
    }
}

/// Creates the desktop's autostart directory (`$XDG_CONFIG_HOME/autostart`, else
/// `~/.config/autostart`) if it is missing: on a fresh account neither it nor
/// `~/.config` exists yet, and the autostart entry cannot be written without it.
pub(crate) fn ensure_autostart_dir() {
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .filter(|v| !v.is_empty())
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| std::path::PathBuf::from(h).join(".config")));
    if let Some(dir) = base.map(|b| b.join("autostart")) {
        if let Err(e) = std::fs::create_dir_all(&dir) {
            tracing::warn!("creating {}: {e}", dir.display());
        }
    }
}
