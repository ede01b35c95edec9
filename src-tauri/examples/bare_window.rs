//! A bare Tauri 2 window: the same Tauri build and window size as the app, an empty
//! page, no plugins, no commands. `cargo xtask bench` measures its memory in the same
//! run as the app's (tests/e2e/memory.mjs), so that the app's figure is read against
//! what WebKitGTK and Tauri alone take on this machine.
//!
//! Prints `bare window loaded` to stderr once the page has loaded.

fn main() {
    tauri::Builder::default()
        .on_page_load(|_, payload| {
            if matches!(payload.event(), tauri::webview::PageLoadEvent::Finished) {
                eprintln!("bare window loaded");
            }
        })
        .run(tauri::generate_context!(
            "examples/bare_window/tauri.conf.json"
        ))
        .expect("running the bare window");
}
