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
    "open_portal_page",
    "choose_file",
];

fn main() {
    placeholder_frontend();
    tauri_build::try_build(
        tauri_build::Attributes::new()
            .app_manifest(tauri_build::AppManifest::new().commands(COMMANDS)),
    )
    .expect("tauri build script: see the message above");
}

/// `tauri.conf.json` embeds `../ui/dist`, which `npm --prefix ui run build` makes. So
/// that `cargo build/clippy/test --workspace` work in a fresh clone without Node, a
/// missing dist gets a page saying how to build the real one (dist is git-ignored;
/// the next `npm run build` replaces it).
fn placeholder_frontend() {
    let dist = std::path::Path::new("../ui/dist");
    println!("cargo:rerun-if-changed=../ui/dist/index.html");
    if dist.join("index.html").exists() {
        return;
    }
    let page = "<!doctype html><html lang=\"zh-CN\"><meta charset=\"utf-8\"><title>UKey Renew</title>\
<p>界面尚未构建 / The UI is not built: run <code>npm --prefix ui ci &amp;&amp; npm --prefix ui run build</code>, \
then build ukey-desktop again.</p></html>\n";
    if let Err(e) =
        std::fs::create_dir_all(dist).and_then(|()| std::fs::write(dist.join("index.html"), page))
    {
        println!("cargo:warning=cannot write a placeholder ui/dist: {e}");
    }
}
