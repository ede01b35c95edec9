//! `cargo xtask setup [--only rust,app,e2e]`: installs what the tests, the demo, the
//! benchmarks and the package need on a Debian machine, saying what it installs and
//! skipping what is present.
//!
//! - `rust`: SoftHSM2, OpenSC (`pkcs11-tool`), OpenSSL, PyKCS11, swtpm and tpm2-pkcs11
//!   (a second real PKCS#11 module), the PostgreSQL server (the portal's store on
//!   PostgreSQL); cargo-nextest.
//! - `app`: the Tauri build libraries (WebKitGTK 4.1, GTK 3, appindicator, librsvg,
//!   libssl, libxdo, pkg-config), Node.js + npm, and `npm ci` in ui/.
//! - `e2e`: Xvfb, WebKitWebDriver, a CJK font, a D-Bus session; tauri-driver; `npm ci`
//!   in tests/e2e.

use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{Result, bail};

use crate::util::{self, cargo, have, run, workspace_root};

/// What `setup` can install, in the order it installs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    Rust,
    App,
    E2e,
}

impl Part {
    pub const ALL: [Part; 3] = [Part::Rust, Part::App, Part::E2e];

    fn parse(s: &str) -> Result<Part> {
        Ok(match s {
            "rust" => Part::Rust,
            "app" => Part::App,
            "e2e" => Part::E2e,
            other => bail!("unknown setup part `{other}` (rust, app, e2e)"),
        })
    }

    /// Debian packages of this part.
    fn packages(self) -> &'static [&'static str] {
        match self {
            Part::Rust => &[
                "softhsm2",
                "opensc",
                "openssl",
                "python3-pykcs11",
                // A second real PKCS#11 module: tpm2-pkcs11 over a software TPM.
                "swtpm",
                "swtpm-tools",
                "tpm2-abrmd",
                "libtss2-tcti-tabrmd0",
                "libtpm2-pkcs11-1",
                "dbus",
                // The portal's store on PostgreSQL: tests start a server in a temp dir.
                "postgresql",
            ],
            Part::App => &[
                "libwebkit2gtk-4.1-dev",
                "libgtk-3-dev",
                "libayatana-appindicator3-dev",
                "librsvg2-dev",
                "libssl-dev",
                "libxdo-dev",
                "pkg-config",
                "build-essential",
            ],
            Part::E2e => &[
                "xvfb",
                "webkit2gtk-driver",
                "fonts-noto-cjk",
                "dbus-x11",
                "dbus",
                "xauth",
            ],
        }
    }
}

/// Parses `--only a,b` (default: everything).
pub fn parse_parts(args: &[String]) -> Result<Vec<Part>> {
    let mut parts = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let list = if let Some(v) = a.strip_prefix("--only=") {
            v.to_owned()
        } else if a == "--only" {
            match it.next() {
                Some(v) => v.clone(),
                None => bail!("--only needs a value: rust, app, e2e"),
            }
        } else {
            bail!("unknown setup option `{a}`");
        };
        for p in list.split(',').filter(|s| !s.is_empty()) {
            let p = Part::parse(p)?;
            if !parts.contains(&p) {
                parts.push(p);
            }
        }
    }
    if parts.is_empty() {
        parts = Part::ALL.to_vec();
    }
    Ok(parts)
}

pub fn setup(parts: &[Part]) -> Result<()> {
    let mut wanted: Vec<&str> = parts.iter().flat_map(|p| p.packages()).copied().collect();
    if parts.contains(&Part::App) && !(have("node") && have("npm")) {
        // Debian's own Node.js; the frontend needs Node 20 or later (see check_node).
        wanted.extend(["nodejs", "npm"]);
    }
    let missing: Vec<&str> = wanted
        .iter()
        .copied()
        .filter(|p| !deb_installed(p))
        .collect();
    if missing.is_empty() {
        eprintln!(
            "xtask setup: Debian packages present ({} checked)",
            wanted.len()
        );
    } else {
        apt_install(&missing)?;
    }

    if parts.contains(&Part::Rust) && !cargo_has("nextest") {
        eprintln!("xtask setup: installing cargo-nextest from crates.io (the test runner)");
        run(cargo().args(["install", "cargo-nextest", "--locked"]))?;
    }
    if parts.contains(&Part::App) {
        check_node()?;
        npm_ci(&workspace_root().join("ui"))?;
    }
    if parts.contains(&Part::E2e) {
        if tauri_driver().is_none() {
            eprintln!(
                "xtask setup: installing tauri-driver from crates.io (WebDriver for the real-window test)"
            );
            run(cargo().args(["install", "tauri-driver", "--locked", "--version", "^2"]))?;
        }
        npm_ci(&workspace_root().join("tests/e2e"))?;
    }
    Ok(())
}

/// tauri-driver on PATH or in cargo's bin dir.
pub fn tauri_driver() -> Option<std::path::PathBuf> {
    util::which("tauri-driver").or_else(|| {
        let home = std::env::var_os("CARGO_HOME")
            .map(std::path::PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cargo")))?;
        let p = home.join("bin/tauri-driver");
        p.is_file().then_some(p)
    })
}

fn cargo_has(subcommand: &str) -> bool {
    cargo()
        .args([subcommand, "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn deb_installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .stderr(Stdio::null())
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).ends_with("install ok installed"))
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

fn apt_get() -> Command {
    if is_root() {
        Command::new("apt-get")
    } else {
        let mut c = Command::new("sudo");
        c.arg("apt-get");
        c
    }
}

fn apt_install(packages: &[&str]) -> Result<()> {
    if !util::have("apt-get") {
        bail!(
            "these Debian packages are missing and there is no apt-get here: {}",
            packages.join(" ")
        );
    }
    eprintln!(
        "xtask setup: installing Debian packages: {}",
        packages.join(" ")
    );
    run(apt_get().args(["-q", "-o", "DPkg::Lock::Timeout=600", "update"]))?;
    run(apt_get()
        .env("DEBIAN_FRONTEND", "noninteractive")
        .args([
            "install",
            "-y",
            "-q",
            "--no-install-recommends",
            "-o",
            "DPkg::Lock::Timeout=600",
        ])
        .args(packages))
}

/// Vite 8 and Vitest 4 need Node 20.19 or later; Debian 12's own nodejs is 18.
fn check_node() -> Result<()> {
    let out = Command::new("node").arg("--version").output()?;
    let v = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let major: u32 = v
        .trim_start_matches('v')
        .split('.')
        .next()
        .and_then(|m| m.parse().ok())
        .unwrap_or(0);
    if major < 20 {
        eprintln!(
            "xtask setup: WARNING: Node.js {v} is older than 20; the frontend (Vite 8, Vitest 4) \
             needs Node 20.19 or later. Install a newer nodejs package."
        );
    }
    Ok(())
}

/// `npm ci` in `dir` when it has a package-lock.json and node_modules is missing or
/// older than the lock file.
pub fn npm_ci(dir: &Path) -> Result<()> {
    let lock = dir.join("package-lock.json");
    if !lock.is_file() {
        if dir.join("package.json").is_file() {
            eprintln!(
                "xtask setup: {} has no package-lock.json; running npm install",
                dir.display()
            );
            return run(Command::new("npm")
                .args(["install", "--no-audit", "--no-fund"])
                .current_dir(dir));
        }
        return Ok(());
    }
    let stamp = dir.join("node_modules/.package-lock.json");
    let fresh = match (modified(&stamp), modified(&lock)) {
        (Some(s), Some(l)) => s >= l,
        _ => false,
    };
    if fresh {
        eprintln!(
            "xtask setup: {}/node_modules up to date",
            dir.strip_prefix(workspace_root()).unwrap_or(dir).display()
        );
        return Ok(());
    }
    eprintln!(
        "xtask setup: installing npm packages in {} (npm ci)",
        dir.display()
    );
    let ci = run(Command::new("npm")
        .args(["ci", "--no-audit", "--no-fund"])
        .current_dir(dir));
    if ci.is_err() {
        // A lock file written where the registry serves only some platforms' optional
        // packages (the Tauri CLI ships one binary package per platform) lacks the others,
        // and `npm ci` then refuses it; `npm install --no-save` installs the same pinned
        // versions from it without rewriting it.
        eprintln!(
            "xtask setup: npm ci refused {}; installing from the lock file with npm install --no-save",
            dir.display()
        );
        return run(Command::new("npm")
            .args(["install", "--no-audit", "--no-fund", "--no-save"])
            .current_dir(dir));
    }
    Ok(())
}

fn modified(p: &Path) -> Option<std::time::SystemTime> {
    std::fs::metadata(p).and_then(|m| m.modified()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn parts_default_to_everything_and_parse_lists() {
        assert_eq!(parse_parts(&[]).expect("default"), Part::ALL.to_vec());
        assert_eq!(
            parse_parts(&args(&["--only", "rust"])).expect("rust"),
            vec![Part::Rust]
        );
        assert_eq!(
            parse_parts(&args(&["--only=e2e,rust,e2e"])).expect("list"),
            vec![Part::E2e, Part::Rust]
        );
        assert!(parse_parts(&args(&["--only", "gui"])).is_err());
        assert!(parse_parts(&args(&["--only"])).is_err());
    }

    #[test]
    fn dpkg_query_tells_installed_from_missing() {
        // dpkg itself is installed on every Debian machine; this name never exists.
        assert!(deb_installed("dpkg"));
        assert!(!deb_installed("no-such-package-ukey-renew"));
    }
}
