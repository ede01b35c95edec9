//! `cargo xtask`: every chore a newcomer would otherwise learn from a wiki.
//!
//! - `cargo xtask setup`: install what the project needs on a Debian machine (apt
//!   packages, cargo-nextest), saying what it installs. Every other task runs it first.
//! - `cargo xtask test`: formatting, clippy, every Rust test (nextest: one process a
//!   test, because SoftHSM2 is configured through a process-wide environment variable),
//!   and doc tests.
//! - `cargo xtask demo`: the main job on SoftHSM2 fixture keys (see `demo`).

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use anyhow::{Context, Result, bail};

/// Debian packages the tests and the demo need at run time.
const RUNTIME_PACKAGES: &[(&str, &str)] = &[
    // (package, a file whose presence shows it is installed)
    ("softhsm2", "/usr/bin/softhsm2-util"),
    ("opensc", "/usr/bin/pkcs11-tool"),
    ("openssl", "/usr/bin/openssl"),
];

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let task = args.first().map(String::as_str).unwrap_or("help");
    let result = match task {
        "setup" => setup(),
        "test" => test(),
        "demo" => demo(),
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
         setup   install the apt packages and tools the project needs (Debian, as root)\n  \
         test    formatting, clippy, every Rust test and doc test\n  \
         demo    list a SoftHSM2 key that looks like a real UKey with the `ukey` CLI"
    );
}

fn workspace_root() -> PathBuf {
    // xtask lives one level below the workspace root.
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// A cargo command run in the workspace root, inheriting the target dir.
fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(workspace_root());
    cmd
}

fn run(cmd: &mut Command) -> Result<()> {
    eprintln!("xtask: running {cmd:?}");
    let status = cmd
        .status()
        .with_context(|| format!("could not start {:?}", cmd.get_program()))?;
    if !status.success() {
        bail!("{:?} failed with {status}", cmd.get_program());
    }
    Ok(())
}

fn setup() -> Result<()> {
    let missing: Vec<&str> = RUNTIME_PACKAGES
        .iter()
        .filter(|(_, marker)| !Path::new(marker).exists())
        .map(|(pkg, _)| *pkg)
        .collect();
    if missing.is_empty() {
        eprintln!("xtask: system packages present ({} checked)", RUNTIME_PACKAGES.len());
    } else {
        apt_install(&missing)?;
    }
    if !cargo()
        .args(["nextest", "--version"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
    {
        eprintln!("xtask: installing cargo-nextest from crates.io (the test runner)");
        run(cargo().args(["install", "cargo-nextest", "--locked"]))?;
    }
    Ok(())
}

fn apt_install(packages: &[&str]) -> Result<()> {
    eprintln!("xtask: installing Debian packages: {}", packages.join(" "));
    let is_root = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false);
    let prefix: &[&str] = if is_root { &[] } else { &["sudo"] };
    let mut update = Command::new(prefix.first().copied().unwrap_or("apt-get"));
    if !is_root {
        update.arg("apt-get");
    }
    update.args(["-q", "update"]);
    run(&mut update)?;
    let mut install = Command::new(prefix.first().copied().unwrap_or("apt-get"));
    if !is_root {
        install.arg("apt-get");
    }
    install
        .env("DEBIAN_FRONTEND", "noninteractive")
        .args(["install", "-y", "-q", "-o", "DPkg::Lock::Timeout=600"])
        .args(packages);
    run(&mut install)
}

fn test() -> Result<()> {
    setup()?;
    run(cargo().args(["fmt", "--all", "--check"]))?;
    run(cargo().args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    run(cargo().args([
        "nextest",
        "run",
        "--workspace",
        "--no-fail-fast",
        "--failure-output",
        "final",
    ]))?;
    run(cargo().args(["test", "--workspace", "--doc", "--quiet"]))?;
    Ok(())
}

fn demo() -> Result<()> {
    setup()?;
    run(cargo().args([
        "build",
        "--quiet",
        "-p",
        "ukey-cli",
        "-p",
        "softhsm-fixtures",
    ]))?;
    let bin_dir = target_dir().join("debug");
    let demo_dir = tempdir("ukey-demo")?;
    let result = (|| {
        let fixtures = bin_dir.join("softhsm-fixtures");
        eprintln!("xtask: creating a SoftHSM2 key that looks like a UKey (expires in 10 days)");
        run(Command::new(&fixtures).arg("--dir").arg(&demo_dir).args([
            "create",
            "--label",
            "Demo UKey",
            "--days",
            "10",
        ]))?;
        let conf = demo_dir.join("softhsm2.conf");
        run(Command::new(bin_dir.join("ukey"))
            .env("SOFTHSM2_CONF", &conf)
            .arg("--module")
            .arg(softhsm_module()?)
            .arg("list"))
    })();
    let _ = std::fs::remove_dir_all(&demo_dir);
    result
}

/// SoftHSM2's module on Debian (multiarch or not) and Fedora.
fn softhsm_module() -> Result<PathBuf> {
    [
        "/usr/lib/softhsm/libsofthsm2.so",
        "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
        "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
        "/usr/lib64/pkcs11/libsofthsm2.so",
    ]
    .iter()
    .map(PathBuf::from)
    .find(|p| p.is_file())
    .context("SoftHSM2's module not found: apt-get install softhsm2")
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
}

fn tempdir(prefix: &str) -> Result<PathBuf> {
    let base = if Path::new("/dev/shm").is_dir() {
        PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    let dir = base.join(format!("{prefix}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}
