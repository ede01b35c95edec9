//! `cargo xtask demo [--cli] [--sm2]`: the main job, on a SoftHSM2 key behind ukey-sim and
//! the reference portal on loopback, all in a temp dir that is removed at the end. With
//! `--sm2`, the 国密 upgrade: the key is a GM key (ukey-sim's TASS profile), the portal
//! runs an SM2 CA, and the paid order turns the RSA certificate into an SM2 one.
//!
//! 1. A key (SoftHSM2 token) whose signing certificate expires in 10 days, made by the
//!    fixtures CLI, seen through the ukey-sim module and unplugged to start with.
//! 2. The reference portal on 127.0.0.1 (any free port) that also renews certificates of
//!    the fixtures' CA, with a paid ("ready") renewal order for the key's certificate.
//! 3. With a display (and without `--cli`): the desktop app against them; the demo prints
//!    the PIN and the command that plugs the key in, and waits until the app is closed.
//!    Without one: `ukey watch` sees the key plugged in, `ukey renew` renews it, and
//!    `ukey list` shows the new validity.
//!
//! Every process started here is stopped on every way out (error, Ctrl-C included).

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::setup::{self, Part};
use crate::util::{
    self, ChildGuard, Lines, TempDir, cargo, check_interrupted, output, run, workspace_root,
};

/// The demo key's user PIN (softhsm-fixtures' default).
pub const DEMO_PIN: &str = "123456";

/// A demo world: key, ukey-sim state and portal data in one temp dir, and the
/// environment every process of the demo gets.
#[derive(Debug)]
pub struct World {
    pub dir: TempDir,
    pub env: BTreeMap<String, OsString>,
    pub token_serial: String,
    pub cert_serial: String,
    pub portal_ca: PathBuf,
    pub fixtures_ca: PathBuf,
    /// `debug` or `release`: which build of the binaries this world runs.
    pub profile: &'static str,
}

impl World {
    /// A command for one of the workspace's binaries, with the demo's environment.
    pub fn cmd(&self, bin: &str) -> Command {
        let mut c = Command::new(util::bin(self.profile, bin));
        c.envs(&self.env);
        c
    }

    pub fn hsm_dir(&self) -> PathBuf {
        self.dir.path().join("hsm")
    }
}

pub fn demo(args: &[String]) -> Result<()> {
    let (mut cli, mut sm2, mut skf) = (false, false, false);
    for a in args {
        match a.as_str() {
            "--cli" => cli = true,
            "--sm2" => sm2 = true,
            "--skf" => skf = true,
            other => bail!("unknown demo option `{other}` (--cli, --sm2, --skf)"),
        }
    }
    let gui = !cli && util::have_display();
    if gui {
        setup::setup(&Part::ALL)?;
    } else {
        setup::setup(&[Part::Rust])?;
    }
    build_binaries(false)?;

    let mut world = make_world_with("debug", "Demo UKey", "张三", 10, sm2 || skf)?;
    if skf {
        skf_key(&mut world)?;
        println!(
            "demo: SKF key {} (\"张三的 UKey\", the software SKF key), SM2 signing and encryption certificates; {} expires in 10 days; PIN {DEMO_PIN}",
            world.token_serial, world.cert_serial
        );
    } else {
        println!(
            "demo: key {} (\"Demo UKey\"), RSA-2048 certificate {} expires in 10 days; PIN {DEMO_PIN}",
            world.token_serial, world.cert_serial
        );
    }
    let key = &world.token_serial;
    run(world.cmd("ukey-sim").args(["unplug", key]))?;
    if skf {
        println!(
            "demo: the ukey-sim library is used through SKF (GM/T 0016): [[modules]] kind = \"skf\"; the portal runs an SM2 CA; the order renews both certificates with the escrowed encryption key"
        );
    } else if sm2 {
        run(world.cmd("ukey-sim").args(["gm", key, "tass"]))?;
        order(&world, &world.cert_serial, &["--algorithm", "SM2"])?;
        println!(
            "demo: 国密 upgrade: the key speaks TASS's SM2 mechanisms (ukey-sim gm), the portal runs an SM2 CA, the order is 续期+算法升级 RSA → SM2"
        );
    } else {
        order_ready(&world, &world.cert_serial)?;
    }
    let (_portal, url) = start_portal(&world)?;
    println!("demo: reference portal at {url}, with a paid renewal order for the certificate");

    if gui {
        desktop(&world, &url)
    } else {
        if !cli {
            println!(
                "demo: no display ($DISPLAY / $WAYLAND_DISPLAY unset): the same flow with the `ukey` CLI"
            );
        }
        cli_flow(&world, &url)
    }
}

pub fn build_binaries(release: bool) -> Result<()> {
    let mut c = cargo();
    c.args([
        "build",
        "--quiet",
        "-p",
        "ukey-cli",
        "-p",
        "softhsm-fixtures",
        "-p",
        "ukey-sim",
        "-p",
        "ukey-portal",
    ]);
    if release {
        c.arg("--release");
    }
    run(&mut c)
}

/// A fresh temp dir with one key (RSA-2048) whose certificate expires in `days`.
pub fn make_world(profile: &'static str, label: &str, cn: &str, days: i64) -> Result<World> {
    make_world_with(profile, label, cn, days, false)
}

/// [`make_world`], the portal's CA an SM2 one when `sm2`.
pub fn make_world_with(
    profile: &'static str,
    label: &str,
    cn: &str,
    days: i64,
    sm2: bool,
) -> Result<World> {
    let dir = TempDir::new("ukey-demo")?;
    let hsm = dir.path().join("hsm");
    let mut env = BTreeMap::new();
    env.insert(
        "SOFTHSM2_CONF".to_owned(),
        hsm.join("softhsm2.conf").into_os_string(),
    );
    env.insert(
        "UKEY_SIM_STATE".to_owned(),
        dir.path().join("sim").into_os_string(),
    );
    env.insert(
        "UKEY_PKCS11_MODULE".to_owned(),
        util::bin(profile, "libukey_sim.so").into_os_string(),
    );
    // Never the user's own config files (nor a CA's system-wide one) or journal.
    env.insert(
        "UKEY_CONFIG".to_owned(),
        dir.path().join("ukey-config.toml").into_os_string(),
    );
    env.insert(
        "UKEY_SYSTEM_CONFIG".to_owned(),
        dir.path().join("ukey-system-config.toml").into_os_string(),
    );
    env.insert(
        "UKEY_DATA_DIR".to_owned(),
        dir.path().join("data").into_os_string(),
    );
    env.insert(
        "UKEY_PORTAL_DATA".to_owned(),
        dir.path().join("portal").into_os_string(),
    );
    let mut world = World {
        fixtures_ca: hsm.join("issuing-ca.pem"),
        portal_ca: dir.path().join("portal/ca-cert.pem"),
        dir,
        env,
        token_serial: String::new(),
        cert_serial: String::new(),
        profile,
    };
    let (serial, cert) = add_key(&world, label, cn, days, "rsa2048")?;
    world.token_serial = serial;
    world.cert_serial = cert;
    // The portal (its own CA) also renews certificates of the fixtures' CA. `ca show`
    // first: it creates the data dir and CA, which `accept-issuer` does not (yet).
    output(
        world
            .cmd("ukey-portal")
            .args(["ca", "show", "--alg", if sm2 { "sm2" } else { "ec" }]),
    )?;
    output(
        world
            .cmd("ukey-portal")
            .args(["ca", "accept-issuer"])
            .arg(&world.fixtures_ca),
    )?;
    Ok(world)
}

/// Replaces the world's key with a software SKF key (ukey-sim's SKF face) holding an SM2
/// signing and encryption pair whose certificates the portal's SM2 CA issued (OpenSSL,
/// with the GM ID), the library configured as SKF, and a paid dual-certificate order.
fn skf_key(world: &mut World) -> Result<()> {
    let dir = world.dir.path().join("skf");
    std::fs::create_dir_all(&dir)?;
    let portal = world.dir.path().join("portal");
    let (ca_cert, ca_key) = (portal.join("ca-cert.pem"), portal.join("ca-key.pem"));
    std::fs::write(
        dir.join("sig.ext"),
        "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,nonRepudiation\n",
    )?;
    std::fs::write(
        dir.join("enc.ext"),
        "basicConstraints=CA:FALSE\nkeyUsage=critical,keyEncipherment,dataEncipherment\n",
    )?;
    let openssl = |args: &[&str]| -> Result<String> {
        output(Command::new("openssl").args(args).current_dir(&dir))
    };
    for half in ["sig", "enc"] {
        openssl(&[
            "genpkey",
            "-algorithm",
            "SM2",
            "-out",
            &format!("{half}.key"),
        ])?;
        openssl(&[
            "req",
            "-new",
            "-key",
            &format!("{half}.key"),
            "-sm3",
            "-sigopt",
            "distid:1234567812345678",
            "-utf8",
            "-subj",
            "/C=CN/O=某某建设工程有限公司/CN=张三",
            "-out",
            &format!("{half}.csr"),
        ])?;
        openssl(&[
            "x509",
            "-req",
            "-in",
            &format!("{half}.csr"),
            "-CA",
            &ca_cert.display().to_string(),
            "-CAkey",
            &ca_key.display().to_string(),
            "-sm3",
            "-sigopt",
            "distid:1234567812345678",
            "-vfyopt",
            "distid:1234567812345678",
            "-days",
            "10",
            "-extfile",
            &format!("{half}.ext"),
            "-out",
            &format!("{half}.pem"),
        ])?;
    }
    let serial = |half: &str| -> Result<String> {
        Ok(
            openssl(&["x509", "-in", &format!("{half}.pem"), "-noout", "-serial"])?
                .trim()
                .trim_start_matches("serial=")
                .to_owned(),
        )
    };
    let key = "SKFDEMO01";
    output(world.cmd("ukey-sim").args([
        "skf",
        "create",
        key,
        "--label",
        "张三的 UKey",
        "--pin",
        DEMO_PIN,
    ]))?;
    output(
        world
            .cmd("ukey-sim")
            .args(["skf", "provision", key, "--sign-key"])
            .arg(dir.join("sig.key"))
            .arg("--sign-cert")
            .arg(dir.join("sig.pem"))
            .arg("--enc-key")
            .arg(dir.join("enc.key"))
            .arg("--enc-cert")
            .arg(dir.join("enc.pem")),
    )?;
    let module = world
        .env
        .get("UKEY_PKCS11_MODULE")
        .context("the demo world names no module")?;
    let config = world
        .env
        .get("UKEY_CONFIG")
        .context("the demo world has no config file")?;
    std::fs::write(
        config,
        format!(
            "[[modules]]\nname = \"ukey-sim SKF (demo)\"\npath = \"{}\"\nkind = \"skf\"\n",
            Path::new(module).display()
        ),
    )?;
    let (sig, enc) = (serial("sig")?, serial("enc")?);
    output(world.cmd("ukey-portal").args([
        "order",
        "create",
        "--serial",
        &sig,
        "--state",
        "ready",
        "--algorithm",
        "SM2",
        "--encryption-cert",
        "--old-encryption-serial",
        &enc,
    ]))?;
    world.token_serial = key.to_owned();
    world.cert_serial = sig;
    Ok(())
}

/// Creates one more key in the world; returns (token serial, certificate serial).
pub fn add_key(
    world: &World,
    label: &str,
    cn: &str,
    days: i64,
    alg: &str,
) -> Result<(String, String)> {
    let json = output(
        world
            .cmd("softhsm-fixtures")
            .arg("--dir")
            .arg(world.hsm_dir())
            .args([
                "create", "--label", label, "--cn", cn, "--alg", alg, "--json",
            ])
            .arg("--days")
            .arg(days.to_string()),
    )?;
    let v: serde_json::Value =
        serde_json::from_str(&json).context("softhsm-fixtures printed no JSON")?;
    let serial = v["serial"]
        .as_str()
        .context("no token serial in softhsm-fixtures' output")?
        .to_owned();
    let cert = v["certs"][0]["serial_hex"]
        .as_str()
        .context("no certificate serial in softhsm-fixtures' output")?
        .to_owned();
    Ok((serial, cert))
}

/// A ready ("paid") renewal order for a certificate of the fixtures' CA.
pub fn order_ready(world: &World, cert_serial: &str) -> Result<()> {
    order(world, cert_serial, &[])
}

pub fn order(world: &World, cert_serial: &str, extra: &[&str]) -> Result<()> {
    let ca = &world.fixtures_ca;
    output(
        world
            .cmd("ukey-portal")
            .args([
                "order",
                "create",
                "--serial",
                cert_serial,
                "--state",
                "ready",
            ])
            .arg("--issuer-cert")
            .arg(ca)
            .args(extra),
    )?;
    Ok(())
}

/// Starts `ukey-portal serve` on loopback; returns the guard and the URL it printed.
pub fn start_portal(world: &World) -> Result<(ChildGuard, String)> {
    let mut portal = ChildGuard::spawn(
        "ukey-portal",
        world
            .cmd("ukey-portal")
            .args(["serve", "--listen", "127.0.0.1:0"])
            .stdout(Stdio::piped()),
    )?;
    let lines = Lines::new(portal.take_stdout().context("portal stdout")?);
    let (_, url) = lines
        .next(Duration::from_secs(30))
        .context("the portal printed no URL")?;
    let url = url.trim().to_owned();
    if !url.starts_with("http") {
        bail!("the portal's first line is not a URL: {url:?}");
    }
    // Keep reading (and discarding) its output so that it never blocks on a full pipe.
    std::thread::spawn(move || while lines.next(Duration::from_secs(3600)).is_ok() {});
    Ok((portal, url))
}

/// Whether the built `ukey` has this command yet (`renew`, `diagnose`).
pub fn has_command(profile: &str, command: &str) -> bool {
    Command::new(util::bin(profile, "ukey"))
        .args(["help", command])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn cli_flow(world: &World, url: &str) -> Result<()> {
    let key = &world.token_serial;
    println!("\ndemo: 1/3 `ukey watch` is watching; plugging the key in (ukey-sim plug {key})");
    let mut watch = ChildGuard::spawn(
        "ukey watch",
        world
            .cmd("ukey")
            .args(["watch", "--interval-ms", "200"])
            .stdout(Stdio::piped()),
    )?;
    let lines = Lines::new(watch.take_stdout().context("watch stdout")?);
    std::thread::sleep(Duration::from_millis(500));
    check_interrupted()?;
    let plugged = Instant::now();
    run(world.cmd("ukey-sim").args(["plug", key]))?;
    let (seen, line) = lines
        .next(Duration::from_secs(10))
        .context("`ukey watch` did not see the key within 10 s")?;
    println!(
        "ukey watch | {line}\ndemo: seen {:.0} ms after plugging it in",
        seen.duration_since(plugged).as_secs_f64() * 1e3
    );
    watch.stop();

    println!("\ndemo: 2/3 before: `ukey list`");
    run(world.cmd("ukey").arg("list"))?;

    if !has_command(world.profile, "renew") {
        let bar = "!".repeat(72);
        println!(
            "{bar}\ndemo: this build of `ukey` has no `renew` command yet; the renewal step is skipped\n{bar}"
        );
        return Ok(());
    }
    println!(
        "\ndemo: 3/3 `ukey renew --portal {url} --pin-stdin --yes --trust <portal CA>` (PIN {DEMO_PIN} on stdin)"
    );
    let mut renew = ChildGuard::spawn(
        "ukey renew",
        world
            .cmd("ukey")
            .args(["renew", "--portal", url, "--pin-stdin", "--yes", "--trust"])
            .arg(&world.portal_ca)
            .stdin(Stdio::piped()),
    )?;
    if let Some(stdin) = renew.child_mut().and_then(|c| c.stdin.as_mut()) {
        stdin.write_all(format!("{DEMO_PIN}\n").as_bytes())?;
    }
    if let Some(c) = renew.child_mut() {
        drop(c.stdin.take());
    }
    let status = renew.wait()?;
    if !status.success() {
        bail!("`ukey renew` failed with {status}");
    }
    println!("\ndemo: after: `ukey list` shows the new validity");
    run(world.cmd("ukey").arg("list"))?;
    println!("\ndemo: done; removing the demo key, portal data and temp files");
    Ok(())
}

fn desktop(world: &World, url: &str) -> Result<()> {
    let root = workspace_root();
    run(Command::new("npm")
        .args(["run", "build"])
        .current_dir(root.join("ui")))?;
    run(cargo().args(["build", "--quiet", "-p", "ukey-desktop"]))?;
    let dir = world.dir.path();
    // A settings file with autostart off: on a first run (no file) the app would add
    // itself to the user's session autostart (~/.config/autostart), which a demo must
    // not leave behind.
    let app_config = dir.join("app-config");
    std::fs::create_dir_all(&app_config)?;
    std::fs::write(app_config.join("settings.json"), br#"{"autostart": false}"#)?;
    let mut app_cmd = world.cmd("ukey-desktop");
    app_cmd
        .env("UKEY_PORTAL_URL", url)
        .env("UKEY_TRUST", &world.portal_ca)
        .env("UKEY_CONFIG_DIR", &app_config)
        // Anything else the app or WebKit saves stays in the demo dir.
        .env("XDG_CONFIG_HOME", dir.join("xdg-config"))
        .env("XDG_DATA_HOME", dir.join("xdg-data"))
        .env("XDG_CACHE_HOME", dir.join("xdg-cache"))
        .env("UKEY_EXIT_ON_CLOSE", "1");
    let mut app = ChildGuard::spawn("ukey-desktop", &mut app_cmd)?;
    let plug = plug_command(world);
    println!(
        "\ndemo: the desktop app is starting against the portal at {url}.\n\
         \n  1. Plug the key in, from a second terminal:\n\n     {plug}\n\
         \n  2. Click 立即更新 (update now) and enter the PIN: {DEMO_PIN}\n\
         \n  3. Close the window when done; the demo then removes everything it made.\n"
    );
    let status = app.wait()?;
    println!("demo: the app closed ({status}); the key now holds:");
    run(world.cmd("ukey").arg("list"))?;
    Ok(())
}

/// A shell command a user can paste into a second terminal to plug the key in.
fn plug_command(world: &World) -> String {
    let state = world
        .env
        .get("UKEY_SIM_STATE")
        .map(|s| Path::new(s).display().to_string())
        .unwrap_or_default();
    format!(
        "{} --state {state} plug {}",
        util::bin(world.profile, "ukey-sim").display(),
        world.token_serial
    )
}
