//! Generates the Tauri context and one permission per app command, so that
//! `capabilities/default.json` can allow exactly the commands the UI uses.

const COMMANDS: &[&str] = &[
    "get_snapshot",
    "refresh",
    "get_settings",
    "save_settings",
    "plan_renewal",
    "renew",
    "diagnose",
    "save_report",
];

fn main() {
    tauri_build::try_build(
        tauri_build::Attributes::new()
            .app_manifest(tauri_build::AppManifest::new().commands(COMMANDS)),
    )
    .expect("tauri build script: see the message above");
}
