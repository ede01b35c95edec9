//! `cargo xtask package [--debug]`: a `.deb` of the desktop app built by the Tauri
//! bundler, with the `ukey` CLI in /usr/bin as well; then the same check as
//! `package --check`.
//!
//! `cargo xtask package --check [FILE.deb]`: lists the .deb (`dpkg-deb -c`), checks the
//! files and the dependencies it declares, unpacks it (`dpkg-deb -x`) into a throw-away
//! directory and runs `ukey --version` from there.
//!
//! The Tauri CLI comes from npm (xtask/tauri-cli/package.json). src-tauri/tauri.conf.json
//! stays as the app keeps it (`bundle.active: false` for everyday builds); the bundle
//! settings are given to `tauri build --config` here.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::setup::{self, Part};
use crate::util::{self, TempDir, cargo, output, run, target_dir, workspace_root};

pub fn package(args: &[String]) -> Result<()> {
    let mut debug = false;
    let mut check_only = false;
    let mut deb_arg: Option<PathBuf> = None;
    for a in args {
        match a.as_str() {
            "--debug" => debug = true,
            "--check" => check_only = true,
            other if check_only && !other.starts_with('-') => deb_arg = Some(other.into()),
            other => bail!("unknown package option `{other}` (--debug, --check [FILE.deb])"),
        }
    }
    if check_only {
        let deb = match deb_arg {
            Some(d) => d,
            None => find_deb().context("no .deb found: run `cargo xtask package` first")?,
        };
        return check(&deb);
    }
    let deb = build(debug)?;
    check(&deb)?;
    println!("{}", deb.display());
    Ok(())
}

fn build(debug: bool) -> Result<PathBuf> {
    setup::setup(&[Part::Rust, Part::App])?;
    let root = workspace_root();
    let cli_dir = root.join("xtask/tauri-cli");
    setup::npm_ci(&cli_dir)?;
    let tauri = cli_dir.join("node_modules/.bin/tauri");
    if !tauri.is_file() {
        bail!("the Tauri CLI is missing: {}", tauri.display());
    }

    eprintln!("xtask package: building the frontend (ui/dist)");
    run(Command::new("npm")
        .args(["run", "build"])
        .current_dir(root.join("ui")))?;

    let profile = if debug { "debug" } else { "release" };
    eprintln!("xtask package: building the `ukey` CLI ({profile})");
    let mut b = cargo();
    b.args(["build", "-p", "ukey-cli"]);
    if !debug {
        b.arg("--release");
    }
    run(&mut b)?;
    let ukey = util::bin(profile, "ukey");

    // Old bundles would make find_deb ambiguous.
    let bundle_dir = target_dir().join(profile).join("bundle/deb");
    if bundle_dir.is_dir() {
        std::fs::remove_dir_all(&bundle_dir)
            .with_context(|| format!("removing old bundles in {}", bundle_dir.display()))?;
    }

    let config = serde_json::json!({
        "bundle": {
            "active": true,
            "targets": ["deb"],
            "category": "Utility",
            "shortDescription": "UKey 证书更新 / Renew the certificate on a USB key",
            "longDescription": "Renews the certificate on a USB crypto key (PKCS#11 token) in place, against the CA's portal. 在原 USB Key 上更新证书。",
            "linux": {
                "deb": {
                    "section": "utils",
                    "files": {
                        "/usr/bin/ukey": ukey.to_string_lossy(),
                        "/usr/share/doc/ukey-renew/config.example.toml":
                            root.join("docs/config.example.toml").to_string_lossy(),
                    }
                }
            }
        }
    });
    let config_file = target_dir().join("xtask-tauri-bundle.json");
    std::fs::write(&config_file, serde_json::to_vec_pretty(&config)?)?;
    eprintln!("xtask package: bundling the desktop app as a .deb (Tauri bundler)");
    let mut t = Command::new(&tauri);
    t.current_dir(root.join("src-tauri"))
        .args(["build", "--bundles", "deb", "--ci", "--config"])
        .arg(&config_file);
    if debug {
        t.arg("--debug");
    }
    t.env("CARGO_TARGET_DIR", target_dir());
    run(&mut t)?;
    let deb = newest_deb(&bundle_dir)
        .with_context(|| format!("the bundler wrote no .deb in {}", bundle_dir.display()))?;
    eprintln!("xtask package: built {}", deb.display());
    Ok(deb)
}

/// The newest .deb the bundler wrote (release or debug).
pub fn find_deb() -> Option<PathBuf> {
    ["release", "debug"]
        .iter()
        .filter_map(|p| newest_deb(&target_dir().join(p).join("bundle/deb")))
        .max_by_key(|d| std::fs::metadata(d).and_then(|m| m.modified()).ok())
}

fn newest_deb(dir: &Path) -> Option<PathBuf> {
    std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "deb"))
        .max_by_key(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
}

/// Checks a .deb without installing it: contents, control fields, and `ukey --version`
/// run from the unpacked tree.
pub fn check(deb: &Path) -> Result<()> {
    eprintln!("xtask package: checking {}", deb.display());
    let listing = output(Command::new("dpkg-deb").arg("-c").arg(deb))?;
    // "mode owner size date time path": the path may hold spaces and may or may not
    // start with "./" depending on the tool that built the archive.
    let paths: Vec<String> = listing
        .lines()
        .map(|l| l.split_whitespace().skip(5).collect::<Vec<_>>().join(" "))
        .map(|p| p.trim_start_matches("./").to_owned())
        .collect();
    for want in [
        "usr/bin/ukey-desktop",
        "usr/bin/ukey",
        "usr/share/doc/ukey-renew/config.example.toml",
    ] {
        if !paths.iter().any(|p| p == want) {
            bail!("{} lacks {want}; it holds:\n{listing}", deb.display());
        }
    }
    if !paths
        .iter()
        .any(|p| p.starts_with("usr/share/applications/") && p.ends_with(".desktop"))
    {
        bail!("{} has no .desktop entry:\n{listing}", deb.display());
    }
    let depends = output(
        Command::new("dpkg-deb")
            .args(["-f"])
            .arg(deb)
            .arg("Depends"),
    )?;
    if !depends.contains("libwebkit2gtk-4.1") {
        bail!("the .deb does not depend on WebKitGTK 4.1 (Depends: {depends})");
    }
    let version = output(
        Command::new("dpkg-deb")
            .args(["-f"])
            .arg(deb)
            .arg("Version"),
    )?;

    let root = TempDir::new("ukey-deb-check")?;
    run(Command::new("dpkg-deb").arg("-x").arg(deb).arg(root.path()))?;
    let ukey = root.path().join("usr/bin/ukey");
    let out = output(Command::new(&ukey).arg("--version"))?;
    let expected = format!("ukey {}", env!("CARGO_PKG_VERSION"));
    if out.trim() != expected {
        bail!("`ukey --version` from the .deb printed {out:?}, expected {expected:?}");
    }
    let desktop = root.path().join("usr/bin/ukey-desktop");
    let meta = std::fs::metadata(&desktop)?;
    if meta.len() == 0 {
        bail!("{} is empty", desktop.display());
    }
    println!(
        "package check: {} (version {}): ukey-desktop ({:.1} MB) and ukey in /usr/bin, .desktop entry, Depends: {}; `ukey --version` from the unpacked tree: {}",
        deb.file_name().unwrap_or_default().to_string_lossy(),
        version.trim(),
        meta.len() as f64 / 1e6,
        depends.trim(),
        out.trim()
    );
    Ok(())
}
