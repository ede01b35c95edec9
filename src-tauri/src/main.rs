//! `ukey-desktop`: the UKey Renew desktop app. Everything is in the library.

// No console window on Windows release builds.
#![cfg_attr(not(debug_assertions), windows_subsystem = "windows")]

fn main() {
    ukey_desktop::run();
}
