//! A second real PKCS#11 module: tpm2-pkcs11 over a software TPM (swtpm), which none of
//! us wrote and which has its own ways (every token's serial is `0000000000000000`,
//! RSA keys of 1024 to 3072 bits only, no AES key wrap and no ECDH). The key pair is
//! made on the TPM by OpenSC's `pkcs11-tool`, its certificate by `openssl` from the
//! test CA; then `ukey list`, `ukey renew` and `ukey diagnose` work through the module,
//! and `pkcs11-tool` + `openssl` judge the result.

mod common;

use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use softhsm_fixtures::SoftHsm;
use ukey_portal_api::{CreateOrderRequest, InitialState, KeyAlgorithm, KeyPolicy};

const UKEY: &str = env!("CARGO_BIN_EXE_ukey");
const PIN: &str = "123456";
const SO_PIN: &str = "12345678";

/// Where Debian installs tpm2-pkcs11 (package libtpm2-pkcs11-1).
fn tpm2_module() -> PathBuf {
    [
        "/usr/lib/x86_64-linux-gnu/pkcs11/libtpm2_pkcs11.so",
        "/usr/lib/aarch64-linux-gnu/pkcs11/libtpm2_pkcs11.so",
        "/usr/lib/pkcs11/libtpm2_pkcs11.so",
        "/usr/lib64/pkcs11/libtpm2_pkcs11.so",
    ]
    .iter()
    .map(PathBuf::from)
    .find(|p| p.is_file())
    .expect("tpm2-pkcs11 is not installed: run `cargo xtask setup` (apt-get install swtpm libtpm2-pkcs11-1)")
}

/// A free port whose successor is free too: the TCTI reaches swtpm's control channel
/// on the port after the server's.
fn free_port_pair() -> u16 {
    for _ in 0..100 {
        let a = TcpListener::bind("127.0.0.1:0").expect("a free port");
        let port = a.local_addr().unwrap().port();
        if port < u16::MAX && TcpListener::bind(("127.0.0.1", port + 1)).is_ok() {
            return port;
        }
    }
    panic!("no two free consecutive ports");
}

/// A private D-Bus session bus: the daemon and its address.
fn session_bus() -> (Child, String) {
    let mut bus = Command::new("dbus-daemon")
        .args(["--session", "--nofork", "--print-address"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("dbus-daemon (apt-get install dbus)");
    let mut address = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(bus.stdout.take().unwrap()),
        &mut address,
    )
    .unwrap();
    let address = address.trim().to_owned();
    assert!(!address.is_empty(), "dbus-daemon gave no address");
    (bus, address)
}

/// A software TPM for this test, its resource manager (tpm2-abrmd, on a D-Bus session
/// bus of its own: a TPM holds three loaded objects at a time, and a renewal uses more),
/// and tpm2-pkcs11's store.
struct Tpm {
    dir: tempfile::TempDir,
    /// Stopped in reverse order.
    children: Vec<Child>,
    bus: String,
    module: PathBuf,
}

impl Tpm {
    fn start() -> Tpm {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("state")).unwrap();
        std::fs::create_dir_all(dir.path().join("store")).unwrap();
        let port = free_port_pair();
        let ctrl = port + 1;
        let mut children = vec![];
        let swtpm = Command::new("swtpm")
            .args(["socket", "--tpm2", "--tpmstate"])
            .arg(format!("dir={}", dir.path().join("state").display()))
            .args(["--server", &format!("type=tcp,port={port}")])
            .args(["--ctrl", &format!("type=tcp,port={ctrl}")])
            .args(["--flags", "not-need-init,startup-clear"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("swtpm is not installed: run `cargo xtask setup` (apt-get install swtpm)");
        let started = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "swtpm did not listen"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        children.push(swtpm);
        // A session bus for tpm2-abrmd alone.
        let (bus, address) = session_bus();
        children.push(bus);
        let abrmd = Command::new("tpm2-abrmd")
            .args(["--session", "--allow-root"])
            .arg(format!("--tcti=swtpm:port={port}"))
            .env("DBUS_SESSION_BUS_ADDRESS", &address)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect(
                "tpm2-abrmd is not installed: run `cargo xtask setup` (apt-get install tpm2-abrmd)",
            );
        children.push(abrmd);
        let tpm = Tpm {
            dir,
            children,
            bus: address,
            module: tpm2_module(),
        };
        // tpm2-abrmd is up once it owns its name on the bus.
        let started = Instant::now();
        loop {
            let mut cmd = Command::new("pkcs11-tool");
            cmd.arg("--module").arg(&tpm.module).arg("-L");
            let ok = tpm.env(&mut cmd).output().is_ok_and(|o| o.status.success());
            if ok {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "tpm2-abrmd did not come up"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        tpm
    }

    /// `cmd` talks to this TPM through tpm2-pkcs11.
    fn env<'c>(&self, cmd: &'c mut Command) -> &'c mut Command {
        cmd.env("TPM2_PKCS11_TCTI", "tabrmd:bus_type=session")
            .env("DBUS_SESSION_BUS_ADDRESS", &self.bus)
            .env("TPM2_PKCS11_STORE", self.dir.path().join("store"))
    }

    fn p11(&self, args: &[&str]) -> String {
        let mut cmd = Command::new("pkcs11-tool");
        cmd.arg("--module").arg(&self.module).args(args);
        let out = self.env(&mut cmd).output().unwrap();
        assert!(out.status.success(), "pkcs11-tool {args:?}: {}", text(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

impl Drop for Tpm {
    fn drop(&mut self) {
        for child in self.children.iter_mut().rev() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn text(out: &Output) -> String {
    format!(
        "status {:?}\nstdout {}\nstderr {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn openssl(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "openssl {args:?}: {}", text(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `ukey` through tpm2-pkcs11, with `stdin` as standard input and `env` added.
fn ukey_with(tpm: &Tpm, hsm: &SoftHsm, args: &[&str], stdin: &str, env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(UKEY);
    cmd.arg("--module")
        .arg(&tpm.module)
        .args(args)
        .env_remove("UKEY_PKCS11_MODULE")
        .env_remove("UKEY_FAILPOINT")
        .env("UKEY_CONFIG", hsm.dir().join("no-config.toml"))
        .env(
            "UKEY_SYSTEM_CONFIG",
            hsm.dir().join("no-system-config.toml"),
        )
        .env("UKEY_DATA_DIR", tpm.path("data"))
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = tpm.env(&mut cmd).spawn().unwrap();
    let _ = child.stdin.take().unwrap().write_all(stdin.as_bytes());
    child.wait_with_output().unwrap()
}

/// `ukey` through tpm2-pkcs11, with `stdin` as standard input.
fn ukey(tpm: &Tpm, hsm: &SoftHsm, args: &[&str], stdin: &str) -> Output {
    ukey_with(tpm, hsm, args, stdin, &[])
}

/// The certificate with CKA_ID 01 on the TPM, PEM, in `name`.
fn read_cert(tpm: &Tpm, name: &str) {
    let der = tpm.path(&format!("{name}.der"));
    tpm.p11(&[
        "--read-object",
        "--type",
        "cert",
        "--id",
        "01",
        "-o",
        der.to_str().unwrap(),
    ]);
    openssl(
        tpm.dir.path(),
        &[
            "x509",
            "-inform",
            "DER",
            "-in",
            &format!("{name}.der"),
            "-out",
            &format!("{name}.pem"),
        ],
    );
}

/// The serial of the certificate `name`.pem (as `openssl x509 -serial` prints it), and
/// whether the TPM's private key with CKA_ID 01 signs what that certificate's public key
/// verifies (pkcs11-tool signs, openssl verifies). Leaves the key in `name`-pub.pem.
fn tpm_key_signs_for(tpm: &Tpm, name: &str) -> (String, bool) {
    let d = tpm.dir.path();
    let (pem, public, sig) = (
        format!("{name}.pem"),
        format!("{name}-pub.pem"),
        format!("{name}.sig"),
    );
    let serial = openssl(d, &["x509", "-in", &pem, "-noout", "-serial"]);
    openssl(
        d,
        &["x509", "-in", &pem, "-noout", "-pubkey", "-out", &public],
    );
    std::fs::write(d.join("bid.txt"), b"bid 2026").unwrap();
    tpm.p11(&[
        "--login",
        "--pin",
        PIN,
        "--sign",
        "--id",
        "01",
        "-m",
        "SHA256-RSA-PKCS",
        "-i",
        tpm.path("bid.txt").to_str().unwrap(),
        "-o",
        tpm.path(&sig).to_str().unwrap(),
    ]);
    let out = Command::new("openssl")
        .current_dir(d)
        .args([
            "dgst",
            "-sha256",
            "-verify",
            &public,
            "-signature",
            &sig,
            "bid.txt",
        ])
        .output()
        .unwrap();
    let verified = String::from_utf8_lossy(&out.stdout).contains("Verified OK");
    (serial.trim().to_owned(), verified)
}

/// A token on the TPM, an RSA key pair made on it by pkcs11-tool (CKA_ID 01), and a
/// certificate for its key (serial 5A17) made by openssl from the test CA. The public
/// key is left in `pub.pem`.
fn make_key(tpm: &Tpm, ca: &softhsm_fixtures::TestCa) {
    let d = tpm.dir.path();
    tpm.p11(&[
        "--init-token",
        "--slot-index",
        "0",
        "--label",
        "TPM UKey",
        "--so-pin",
        SO_PIN,
    ]);
    tpm.p11(&[
        "--init-pin",
        "--slot-index",
        "0",
        "--login",
        "--so-pin",
        SO_PIN,
        "--pin",
        PIN,
    ]);
    tpm.p11(&[
        "--login",
        "--pin",
        PIN,
        "--keypairgen",
        "--key-type",
        "rsa:2048",
        "--id",
        "01",
        "--label",
        "sig",
    ]);
    tpm.p11(&[
        "--read-object",
        "--type",
        "pubkey",
        "--id",
        "01",
        "-o",
        tpm.path("pub.der").to_str().unwrap(),
    ]);
    openssl(
        d,
        &[
            "pkey", "-pubin", "-inform", "DER", "-in", "pub.der", "-out", "pub.pem",
        ],
    );
    std::fs::write(
        tpm.path("ext.cnf"),
        "[v3]\nbasicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,nonRepudiation\nsubjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n",
    )
    .unwrap();
    openssl(
        d,
        &[
            "x509",
            "-new",
            "-force_pubkey",
            "pub.pem",
            "-subj",
            "/C=CN/O=Test Construction Co/CN=Zhang San",
            "-CA",
            ca.issuing_cert_path.to_str().unwrap(),
            "-CAkey",
            ca.issuing_key_path.to_str().unwrap(),
            "-set_serial",
            "0x5A17",
            "-days",
            "10",
            "-extfile",
            "ext.cnf",
            "-extensions",
            "v3",
            "-outform",
            "DER",
            "-out",
            "cert.der",
        ],
    );
    tpm.p11(&[
        "--login",
        "--pin",
        PIN,
        "--write-object",
        tpm.path("cert.der").to_str().unwrap(),
        "--type",
        "cert",
        "--id",
        "01",
        "--label",
        "sig",
    ]);
}

#[test]
fn a_key_on_tpm2_pkcs11_is_listed_renewed_and_diagnosed() {
    let hsm = SoftHsm::new().unwrap();
    let ca = hsm.ca().unwrap();
    let portal = common::start_portal(&hsm);
    let tpm = Tpm::start();
    let d = tpm.dir.path();

    make_key(&tpm, ca);

    // `ukey list`: the token, its serial shown as the module gives it (zeros: the id
    // carries the slot), the certificate with its key.
    let out = ukey(&tpm, &hsm, &["list", "--json"], "");
    assert!(out.status.success(), "{}", text(&out));
    let list: Value = serde_json::from_slice(&out.stdout).unwrap();
    let tokens = list["tokens"].as_array().unwrap();
    assert_eq!(tokens.len(), 1, "{list:#}");
    let token = &tokens[0];
    assert_eq!(token["label"], "TPM UKey");
    let id = token["id"].as_str().unwrap().to_owned();
    assert!(id.starts_with("0000000000000000@"), "{token:#}");
    assert!(
        token["quirks"]
            .as_array()
            .unwrap()
            .iter()
            .any(|q| q["kind"] == "serial_not_unique"),
        "{token:#}"
    );
    assert_eq!(token["certificates"][0]["serial"], "5A17", "{token:#}");

    // A same-key renewal through the module.
    let order = |serial: &str, policy: KeyPolicy, years: u32| {
        portal
            .server
            .portal
            .create_order(&CreateOrderRequest {
                serial_hex: serial.to_owned(),
                issuer_der: None,
                issuer_dn: None,
                years,
                state: InitialState::Ready,
                key_policy: policy,
                with_encryption_cert: false,
                target_algorithm: KeyAlgorithm::Rsa2048,
                old_encryption_serial_hex: None,
            })
            .unwrap()
    };
    order("5A17", KeyPolicy::Same, 1);
    let renew = |stdin: &str| {
        ukey(
            &tpm,
            &hsm,
            &[
                "renew",
                "--portal",
                &portal.server.url,
                "--trust",
                ca.root_cert_path.to_str().unwrap(),
                "--token",
                &id,
                "--pin-stdin",
                "--yes",
                "--json",
            ],
            stdin,
        )
    };
    let out = renew(&format!("{PIN}\n"));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    let new_serial = report["new_serial"].as_str().unwrap().to_owned();

    // openssl, reading what pkcs11-tool reads back: the new certificate is on the TPM
    // under the key's id, chains to the CA, and carries the TPM's key.
    read_cert(&tpm, "renewed");
    // The TPM key signs, and the renewed certificate verifies it.
    let (serial, signs) = tpm_key_signs_for(&tpm, "renewed");
    assert_eq!(serial, format!("serial={new_serial}"));
    assert!(signs, "the TPM key signs for the renewed certificate");
    let verify = openssl(
        d,
        &[
            "verify",
            "-CAfile",
            ca.root_cert_path.to_str().unwrap(),
            "-untrusted",
            ca.issuing_cert_path.to_str().unwrap(),
            "renewed.pem",
        ],
    );
    assert!(verify.contains("renewed.pem: OK"), "{verify}");
    let key_of = |name: &str| std::fs::read_to_string(d.join(format!("{name}-pub.pem"))).unwrap();
    assert_eq!(
        key_of("renewed"),
        std::fs::read_to_string(d.join("pub.pem")).unwrap(),
        "the same key"
    );

    // A new-key renewal of the renewed certificate: a new key pair on the TPM.
    // Two years: a certificate must end later than the one it renews.
    order(&new_serial, KeyPolicy::New, 2);
    let out = renew(&format!("{PIN}\n"));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    let newest = report["new_serial"].as_str().unwrap().to_owned();
    read_cert(&tpm, "newest");
    let (serial, signs) = tpm_key_signs_for(&tpm, "newest");
    assert_eq!(serial, format!("serial={newest}"));
    assert!(signs, "the new TPM key signs for the newest certificate");
    assert_ne!(
        key_of("newest"),
        std::fs::read_to_string(d.join("pub.pem")).unwrap(),
        "a new key"
    );

    // The diagnosis through the module: the token, its quirk, the certificate.
    let out = ukey(
        &tpm,
        &hsm,
        &[
            "diagnose",
            "--json",
            "--pin-stdin",
            "--trust",
            ca.root_cert_path.to_str().unwrap(),
            "--trust",
            ca.issuing_cert_path.to_str().unwrap(),
        ],
        &format!("{PIN}\n"),
    );
    let r: Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&out)));
    let sections = r["sections"].as_array().unwrap();
    let token = sections
        .iter()
        .find(|s| s["kind"] == "token")
        .expect("token section");
    assert!(
        token["checks"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["id"] == "token.quirk"),
        "{token:#}"
    );
    let cert = sections
        .iter()
        .find(|s| s["kind"] == "certificate")
        .expect("certificate section");
    assert_eq!(cert["verdict"], "ok", "{cert:#}");
}

/// tpm2-pkcs11 with its resource manager down (a bus on which no tpm2-abrmd runs): the
/// module loads, C_Initialize fails, and the user is told the key's service is not
/// running, not that the driver is not a PKCS#11 library.
#[test]
fn a_module_whose_service_is_not_running_says_so() {
    let hsm = SoftHsm::new().unwrap();
    let (mut bus, address) = session_bus();
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(UKEY)
        .arg("--module")
        .arg(tpm2_module())
        .args(["--lang", "en", "list", "--json"])
        .env_remove("UKEY_PKCS11_MODULE")
        .env("UKEY_CONFIG", hsm.dir().join("no-config.toml"))
        .env(
            "UKEY_SYSTEM_CONFIG",
            hsm.dir().join("no-system-config.toml"),
        )
        .env("TPM2_PKCS11_TCTI", "tabrmd:bus_type=session")
        .env("DBUS_SESSION_BUS_ADDRESS", &address)
        .env("TPM2_PKCS11_STORE", dir.path())
        .output()
        .unwrap();
    let _ = bus.kill();
    let _ = bus.wait();
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["error"]["code"], "module_service_down", "{v}");
    let message = v["error"]["message"].as_str().unwrap();
    assert!(message.contains("may not be running"), "{message}");
}

/// The crash tests on tpm2-pkcs11: `ukey renew` killed at each step boundary and
/// between activation sub-steps (same key, then new key), then run again: it finishes,
/// and the TPM's key under the certificate's id signs what the renewed certificate
/// verifies.
#[test]
fn renewals_killed_at_every_step_on_tpm2_pkcs11_then_finished() {
    let hsm = SoftHsm::new().unwrap();
    let ca = hsm.ca().unwrap();
    let portal = common::start_portal(&hsm);
    let tpm = Tpm::start();
    make_key(&tpm, ca);
    let out = ukey(&tpm, &hsm, &["list", "--json"], "");
    let list: Value = serde_json::from_slice(&out.stdout).unwrap();
    let id = list["tokens"][0]["id"].as_str().unwrap().to_owned();
    let renew = |failpoint: Option<&str>| {
        let root = ca.root_cert_path.to_str().unwrap();
        let args = [
            "renew",
            "--portal",
            &portal.server.url,
            "--trust",
            root,
            "--token",
            &id,
            "--pin-stdin",
            "--yes",
            "--json",
        ];
        let env: Vec<(&str, &str)> = failpoint
            .map(|p| ("UKEY_FAILPOINT", p))
            .into_iter()
            .collect();
        ukey_with(&tpm, &hsm, &args, &format!("{PIN}\n"), &env)
    };
    let mut serial = "5A17".to_owned();
    let mut years = 0;
    // The steps and activation sub-steps of a single-certificate key, shared between
    // the two policies: the portal grants at most ten years, and each renewal must end
    // later than the last.
    let runs: [(KeyPolicy, &[&str]); 2] = [
        (
            KeyPolicy::Same,
            &[
                "write:after",
                "activate.2:after",
                "activate:after",
                "installed:before",
            ],
        ),
        (
            KeyPolicy::New,
            &[
                "key:after",
                "request:after",
                "write:after",
                "self_test:after",
                "activate.2:after",
                "activate.3:before",
            ],
        ),
    ];
    for (policy, points) in runs {
        for &point in points {
            years += 1;
            portal
                .server
                .portal
                .create_order(&CreateOrderRequest {
                    serial_hex: serial.clone(),
                    issuer_der: None,
                    issuer_dn: None,
                    years,
                    state: InitialState::Ready,
                    key_policy: policy,
                    with_encryption_cert: false,
                    target_algorithm: KeyAlgorithm::Rsa2048,
                    old_encryption_serial_hex: None,
                })
                .unwrap();
            let out = renew(Some(point));
            assert_eq!(
                std::os::unix::process::ExitStatusExt::signal(&out.status),
                Some(6),
                "{policy:?} {point}: {}",
                text(&out)
            );
            let out = renew(None);
            assert_eq!(
                out.status.code(),
                Some(0),
                "{policy:?} {point}: {}",
                text(&out)
            );
            let v: Value = serde_json::from_slice(&out.stdout).unwrap();
            assert_eq!(v["resumed"], true, "{policy:?} {point}: {v}");
            serial = v["new_serial"].as_str().unwrap().to_owned();
            // The certificate under id 01 is the renewed one, and the TPM's key under
            // id 01 signs what it verifies.
            read_cert(&tpm, "now");
            let (now, signs) = tpm_key_signs_for(&tpm, "now");
            assert_eq!(now, format!("serial={serial}"), "{policy:?} {point}");
            assert!(signs, "{policy:?} {point}: the TPM key signs for it");
        }
    }
    // Nothing of the interrupted runs is left: one certificate, one private key.
    let objects = tpm.p11(&["--login", "--pin", PIN, "--list-objects"]);
    assert_eq!(
        objects.matches("Certificate Object").count(),
        1,
        "{objects}"
    );
    assert_eq!(
        objects.matches("Private Key Object").count(),
        1,
        "{objects}"
    );
}
