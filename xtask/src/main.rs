//! `cargo xtask`: every chore a newcomer would otherwise learn from a wiki.
//!
//! - `cargo xtask setup [--only rust,app,e2e]`: install what the project needs on a
//!   Debian machine (apt packages, cargo-nextest, tauri-driver, npm packages), saying
//!   what it installs. `test`, `demo`, `bench` and `package` run the part they need first.
//! - `cargo xtask test`: formatting, clippy, every Rust test (nextest), doc tests, the
//!   frontend tests, the real-window end-to-end test, the .deb built and checked; a summary last.
//! - `cargo xtask demo`: the main job on a SoftHSM2 key behind ukey-sim and the reference
//!   portal on loopback (see `demo`).
//! - `cargo xtask bench [--quick] [--out FILE]`: every benchmark in one run, a table and
//!   the same figures as JSON.
//! - `cargo xtask package [--debug] | package --check [FILE.deb]`: the .deb.

mod bench;
mod demo;
mod package;
mod setup;
mod test;
mod util;

use std::process::ExitCode;

use anyhow::Result;

fn main() -> ExitCode {
    util::install_signal_flag();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let task = args.first().map(String::as_str).unwrap_or("help");
    let rest = args.get(1..).unwrap_or(&[]);
    let result: Result<()> = match task {
        "setup" => setup::parse_parts(rest).and_then(|parts| setup::setup(&parts)),
        "test" => test::test(rest),
        "demo" => demo::demo(rest),
        "package" => package::package(rest),
        "bench" => bench::bench(rest),
        "help" | "--help" | "-h" => {
            print_help();
            Ok(())
        }
        other => {
            print_help();
            Err(anyhow::anyhow!("unknown task `{other}`"))
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn print_help() {
    println!(
        "usage: cargo xtask <task>\n\n\
         tasks:\n  \
         setup [--only rust,app,e2e]   install the apt/npm packages and tools the project needs\n  \
         test                          fmt, clippy, Rust tests, doc tests, Vitest, real-window E2E, .deb build + check\n  \
         demo [--cli]                  renew a SoftHSM2 key against the reference portal (app with a display, else CLI)\n  \
         bench [--quick] [--out FILE] [--only renewal,parallel,latency,idle,diagnose,portal,memory]\n  \
                                       every benchmark in one run: table + JSON\n  \
         package [--debug]             build the .deb (desktop app + ukey CLI) and check it\n  \
         package --check [FILE.deb]    check a built .deb"
    );
}
