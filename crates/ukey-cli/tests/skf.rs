//! SKF keys (GM/T 0016): `ukey` on the software SKF key (`libukey_sim.so`'s SKF face)
//! against the reference portal with an OpenSSL-made SM2 CA. What the renewal leaves
//! on the key is read and used through the library's C ABI by this test's own calls
//! (not our backend), and OpenSSL judges it.

mod common;

use std::ffi::{CString, c_char, c_void};
use std::path::{Path, PathBuf};
use std::process::Output;

use serde_json::Value;
use softhsm_fixtures::openssl_sm2::{GM_DISTID_OPT, OpenSslSm2};
use ukey_portal_api::{CreateOrderRequest, InitialState, KeyAlgorithm, KeyPolicy};
use ukey_sim::skf::{ProvisionHalf, SkfDevice, SkfStore, provision};

const UKEY: &str = env!("CARGO_BIN_EXE_ukey");
const PIN: &str = "12345678";
const SERIAL: &str = "SKF2026A01";
const SUBJECT: &str = "/C=CN/O=某某建设工程有限公司/CN=张三";

/// Software SKF keys, the CA that issued their certificates (OpenSSL), the portal of that
/// CA, and the files `ukey` runs with.
struct SkfLab {
    dir: tempfile::TempDir,
    state: PathBuf,
    lib: PathBuf,
    ssl: OpenSslSm2,
    store: SkfStore,
    portal: common::LoopbackPortal,
}

/// One software SKF key holding an SM2 dual-certificate container ("SM2_CONTAINER")
/// and a paid dual-certificate order for it.
struct SkfKey {
    serial: String,
    device: String,
    old_sign_serial: String,
    old_enc_serial: String,
}

#[allow(unsafe_code)]
fn lab() -> SkfLab {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    // SAFETY: nextest runs each test in its own process, and this runs before the test
    // starts a thread or loads the library: nothing reads the environment concurrently.
    // The library called through its C ABI in this process reads it.
    unsafe { std::env::set_var(ukey_sim::STATE_ENV, &state) };
    let ssl_dir = dir.path().join("ssl");
    std::fs::create_dir_all(&ssl_dir).unwrap();
    let ssl = OpenSslSm2::new(&ssl_dir);
    ssl.ca("sm2ca", "/C=CN/O=某某数字认证/CN=某某 SM2 CA")
        .unwrap();
    let lib = dir.path().join(ukey_sim::module_file_name());
    std::fs::copy(common::shim_module(), &lib).unwrap();
    std::fs::write(
        dir.path().join("config.toml"),
        format!(
            "[[modules]]\nname = \"ukey-sim SKF\"\npath = \"{}\"\nkind = \"skf\"\n",
            lib.display()
        ),
    )
    .unwrap();
    let portal =
        common::start_portal_with_ca(&ssl_dir.join("sm2ca.pem"), &ssl_dir.join("sm2ca.key"), None);
    SkfLab {
        store: SkfStore::new(&state),
        dir,
        state,
        lib,
        ssl,
        portal,
    }
}

/// A lab with the one key [`SERIAL`].
fn skf_key() -> (SkfLab, SkfKey) {
    let lab = lab();
    let key = lab.key(SERIAL);
    (lab, key)
}

impl SkfLab {
    /// A new SKF key `serial`: the CA's personalisation of an SM2 signing and encryption
    /// pair with their certificates, and a paid order to renew them.
    fn key(&self, serial: &str) -> SkfKey {
        let (sig, enc) = (format!("{serial}-sig"), format!("{serial}-enc"));
        self.ssl
            .leaf(
                "sm2ca",
                &sig,
                SUBJECT,
                softhsm_fixtures::openssl_sm2::SignedId::Gm,
            )
            .unwrap();
        self.ssl.encryption_leaf("sm2ca", &enc, SUBJECT).unwrap();
        self.store
            .create(&SkfDevice::new(serial, "张三的UKey", "ukey-sim", PIN, "admin123").unwrap())
            .unwrap();
        self.container(serial, self.half(&sig), self.half(&enc));
        let serial_of = |name: &str| {
            self.ssl
                .run(&["x509", "-in", &format!("{name}.pem"), "-noout", "-serial"])
                .unwrap()
                .trim()
                .trim_start_matches("serial=")
                .to_owned()
        };
        let key = SkfKey {
            serial: serial.to_owned(),
            device: format!("ukey-sim SKF {serial}"),
            old_sign_serial: serial_of(&sig),
            old_enc_serial: serial_of(&enc),
        };
        let der = self.ssl.read(&format!("{sig}.der")).unwrap();
        self.portal
            .server
            .portal
            .create_order(&CreateOrderRequest {
                serial_hex: key.old_sign_serial.clone(),
                issuer_der: ukey_renewal::status_request(&der).unwrap().issuer_der,
                issuer_dn: None,
                // OpenSSL issued the old certificates for a year from today; the
                // renewal must end later.
                years: 2,
                state: InitialState::Ready,
                key_policy: KeyPolicy::New,
                with_encryption_cert: true,
                target_algorithm: KeyAlgorithm::Sm2,
                old_encryption_serial_hex: Some(key.old_enc_serial.clone()),
            })
            .unwrap();
        key
    }

    /// What the CA's personalisation writes for the OpenSSL key and certificate `name`.
    fn half(&self, name: &str) -> ProvisionHalf {
        let (d, point) = self.ssl.scalar_and_point(name).unwrap();
        ProvisionHalf {
            scalar: Some(d),
            public: Some(point),
            cert: Some(self.ssl.read(&format!("{name}.der")).unwrap()),
        }
    }

    /// Writes (or rewrites) the key's "SM2_CONTAINER".
    fn container(&self, serial: &str, sign: ProvisionHalf, enc: ProvisionHalf) {
        provision(
            &self.store,
            serial,
            "ukey-sim",
            "SM2_CONTAINER",
            false,
            sign,
            enc,
        )
        .unwrap();
    }

    fn ukey_with(&self, args: &[&str], stdin: &str, failpoint: Option<&str>) -> Output {
        use std::io::Write as _;
        let mut cmd = std::process::Command::new(UKEY);
        cmd.arg("--module")
            .arg(&self.lib)
            .args(args)
            .env_remove("UKEY_PKCS11_MODULE")
            .env_remove("UKEY_FAILPOINT")
            .env("UKEY_CONFIG", self.dir.path().join("config.toml"))
            .env("UKEY_SYSTEM_CONFIG", self.dir.path().join("no-system.toml"))
            .env("UKEY_DATA_DIR", self.dir.path().join("data"))
            .env("UKEY_LANG", "en")
            .env(ukey_sim::STATE_ENV, &self.state)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        if let Some(p) = failpoint {
            cmd.env("UKEY_FAILPOINT", p);
        }
        let mut child = cmd.spawn().unwrap();
        // The process may exit before reading the PIN (its output says why).
        let _ = child.stdin.take().unwrap().write_all(stdin.as_bytes());
        child.wait_with_output().unwrap()
    }

    fn ukey(&self, args: &[&str], stdin: &str) -> Output {
        self.ukey_with(args, stdin, None)
    }

    fn path(&self, file: &str) -> PathBuf {
        self.ssl.dir().join(file)
    }

    fn list(&self) -> Value {
        let out = self.ukey(&["list", "--json"], "");
        assert!(out.status.success(), "{}", text(&out));
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// `ukey renew --token` the key, `UKEY_FAILPOINT` set when given.
    fn renew_at(&self, key: &SkfKey, pin: &str, extra: &[&str], failpoint: Option<&str>) -> Output {
        let trust = self.path("sm2ca.pem");
        let mut args = vec![
            "renew",
            "--portal",
            &self.portal.server.url,
            "--token",
            &key.serial,
            "--pin-stdin",
            "--yes",
            "--json",
            "--trust",
            trust.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        self.ukey_with(&args, &format!("{pin}\n"), failpoint)
    }

    fn renew(&self, key: &SkfKey, pin: &str, extra: &[&str]) -> Output {
        self.renew_at(key, pin, extra, None)
    }

    fn control(&self) -> ukey_sim::Control {
        ukey_sim::Control::new(&self.state).unwrap()
    }
}

fn text(out: &Output) -> String {
    format!(
        "status {:?}\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The library through its C ABI, as a vendor's middleware or a bid tool calls it:
/// GM/T 0016 prototypes, 32-bit ULONG, handles as pointers.
struct CAbi {
    lib: libloading::Library,
}

type H = *mut c_void;

#[allow(unsafe_code)]
impl CAbi {
    fn load(path: &Path) -> CAbi {
        // SAFETY: loading the library under test.
        let lib = unsafe { libloading::Library::new(path) }.unwrap();
        CAbi { lib }
    }

    fn f<T: Copy>(&self, name: &str) -> T {
        let name = format!("{name}\0");
        // SAFETY: the caller names the symbol with its GM/T 0016 prototype `T`; the
        // library outlives every use (it lives in `self`).
        unsafe { *self.lib.get::<T>(name.as_bytes()).unwrap() }
    }

    /// Connects to `device`, opens the application and verifies the PIN: the
    /// application handle.
    fn login(&self, device: &str, pin: &str) -> H {
        let connect: unsafe extern "C" fn(*const c_char, *mut H) -> u32 = self.f("SKF_ConnectDev");
        let open: unsafe extern "C" fn(H, *const c_char, *mut H) -> u32 =
            self.f("SKF_OpenApplication");
        let verify: unsafe extern "C" fn(H, u32, *const c_char, *mut u32) -> u32 =
            self.f("SKF_VerifyPIN");
        let (name, app, pin) = (
            CString::new(device).unwrap(),
            CString::new("ukey-sim").unwrap(),
            CString::new(pin).unwrap(),
        );
        let (mut dev, mut h, mut left) = (std::ptr::null_mut(), std::ptr::null_mut(), 0u32);
        // SAFETY: NUL-terminated names, writable outputs.
        unsafe {
            assert_eq!(connect(name.as_ptr(), &mut dev), 0);
            assert_eq!(open(dev, app.as_ptr(), &mut h), 0);
            assert_eq!(verify(h, 1, pin.as_ptr(), &mut left), 0);
        }
        h
    }

    fn containers(&self, app: H) -> Vec<String> {
        let enum_c: unsafe extern "C" fn(H, *mut c_char, *mut u32) -> u32 =
            self.f("SKF_EnumContainer");
        let mut buf = vec![0u8; 4096];
        let mut len = buf.len() as u32;
        // SAFETY: `buf` holds `len` bytes.
        assert_eq!(unsafe { enum_c(app, buf.as_mut_ptr().cast(), &mut len) }, 0);
        buf[..len as usize]
            .split(|b| *b == 0)
            .take_while(|n| !n.is_empty())
            .map(|n| String::from_utf8(n.to_vec()).unwrap())
            .collect()
    }

    fn container(&self, app: H, name: &str) -> H {
        let open: unsafe extern "C" fn(H, *const c_char, *mut H) -> u32 =
            self.f("SKF_OpenContainer");
        let name = CString::new(name).unwrap();
        let mut h = std::ptr::null_mut();
        // SAFETY: NUL-terminated name, writable output.
        assert_eq!(unsafe { open(app, name.as_ptr(), &mut h) }, 0);
        h
    }

    fn certificate(&self, con: H, sign: bool) -> Option<Vec<u8>> {
        let export: unsafe extern "C" fn(H, u32, *mut u8, *mut u32) -> u32 =
            self.f("SKF_ExportCertificate");
        let mut buf = vec![0u8; 8192];
        let mut len = buf.len() as u32;
        // SAFETY: `buf` holds `len` bytes.
        let rv = unsafe { export(con, u32::from(sign), buf.as_mut_ptr(), &mut len) };
        (rv == 0).then(|| buf[..len as usize].to_vec())
    }

    /// `SKF_ECCSignData` over e, `None` when it fails.
    fn try_sign(&self, con: H, e: &[u8; 32]) -> Option<Vec<u8>> {
        let sign: unsafe extern "C" fn(H, *const u8, u32, *mut u8) -> u32 =
            self.f("SKF_ECCSignData");
        let mut blob = [0u8; 128];
        // SAFETY: 32 bytes in, a whole ECCSIGNATUREBLOB out.
        let rv = unsafe { sign(con, e.as_ptr(), 32, blob.as_mut_ptr()) };
        (rv == 0).then(|| [&blob[32..64], &blob[96..128]].concat())
    }

    /// The application's file names.
    fn files(&self, app: H) -> Vec<String> {
        let enum_f: unsafe extern "C" fn(H, *mut c_char, *mut u32) -> u32 = self.f("SKF_EnumFiles");
        let mut buf = vec![0u8; 4096];
        let mut len = buf.len() as u32;
        // SAFETY: `buf` holds `len` bytes.
        assert_eq!(unsafe { enum_f(app, buf.as_mut_ptr().cast(), &mut len) }, 0);
        buf[..len as usize]
            .split(|b| *b == 0)
            .take_while(|n| !n.is_empty())
            .map(|n| String::from_utf8(n.to_vec()).unwrap())
            .collect()
    }

    /// `SKF_ECCSignData` over e, as r ‖ s from the ECCSIGNATUREBLOB's 64-byte fields.
    fn sign(&self, con: H, e: &[u8; 32]) -> Vec<u8> {
        let sign: unsafe extern "C" fn(H, *const u8, u32, *mut u8) -> u32 =
            self.f("SKF_ECCSignData");
        let mut blob = [0u8; 128];
        // SAFETY: 32 bytes in, a whole ECCSIGNATUREBLOB out.
        assert_eq!(unsafe { sign(con, e.as_ptr(), 32, blob.as_mut_ptr()) }, 0);
        [&blob[32..64], &blob[96..128]].concat()
    }

    /// Opens a digital envelope: the SM4 key through `SKF_ImportSessionKey`, the data
    /// through `SKF_DecryptInit` / `SKF_Decrypt` (ECB, no padding).
    fn open_envelope(&self, con: H, wrapped_key: &[u8], data: &[u8]) -> Result<Vec<u8>, u32> {
        #[repr(C)]
        #[derive(Clone, Copy)]
        struct Param {
            iv: [u8; 32],
            iv_len: u32,
            padding: u32,
            feed: u32,
        }
        let import: unsafe extern "C" fn(H, u32, *const u8, u32, *mut H) -> u32 =
            self.f("SKF_ImportSessionKey");
        let init: unsafe extern "C" fn(H, Param) -> u32 = self.f("SKF_DecryptInit");
        let decrypt: unsafe extern "C" fn(H, *const u8, u32, *mut u8, *mut u32) -> u32 =
            self.f("SKF_Decrypt");
        let mut key = std::ptr::null_mut();
        let mut out = vec![0u8; data.len() + 16];
        let mut len = out.len() as u32;
        // SAFETY: buffers of the lengths given; the parameter block by value.
        unsafe {
            let rv = import(
                con,
                0x401,
                wrapped_key.as_ptr(),
                wrapped_key.len() as u32,
                &mut key,
            );
            if rv != 0 {
                return Err(rv);
            }
            assert_eq!(
                init(
                    key,
                    Param {
                        iv: [0; 32],
                        iv_len: 0,
                        padding: 0,
                        feed: 0
                    }
                ),
                0
            );
            assert_eq!(
                decrypt(
                    key,
                    data.as_ptr(),
                    data.len() as u32,
                    out.as_mut_ptr(),
                    &mut len
                ),
                0
            );
        }
        out.truncate(len as usize);
        Ok(out)
    }
}

/// A bid sealed by OpenSSL to the certificate `cert_pem`: a random SM4 key encrypts the
/// bid (ECB), `pkeyutl -encrypt` seals the key. Returns (bid, sealed key as an
/// ECCCIPHERBLOB, encrypted bid).
fn seal_bid(ssl: &OpenSslSm2, cert_pem: &str, tag: &str) -> (Vec<u8>, Vec<u8>, Vec<u8>) {
    let bid = format!("投标报价 {tag}: 1,234,567.89 元 ").into_bytes();
    let mut bid = bid;
    bid.resize(64, b'.');
    std::fs::write(ssl.dir().join("bid.txt"), &bid).unwrap();
    let key = ssl.run(&["rand", "-hex", "16"]).unwrap().trim().to_owned();
    std::fs::write(ssl.dir().join("k.bin"), hex::decode(&key).unwrap()).unwrap();
    ssl.run(&[
        "enc", "-sm4-ecb", "-K", &key, "-nopad", "-in", "bid.txt", "-out", "bid.enc",
    ])
    .unwrap();
    ssl.run(&[
        "x509", "-in", cert_pem, "-noout", "-pubkey", "-out", "enc.pub",
    ])
    .unwrap();
    ssl.run(&[
        "pkeyutl", "-encrypt", "-pubin", "-inkey", "enc.pub", "-in", "k.bin", "-out", "k.sm2",
    ])
    .unwrap();
    let blob = ukey_skf::EccCipherBlob::from_der(&ssl.read("k.sm2").unwrap()).unwrap();
    (bid, blob.to_bytes(), ssl.read("bid.enc").unwrap())
}

#[test]
fn ukey_lists_an_skf_key_with_its_interface_and_tries_left() {
    let (lab, key) = skf_key();
    let v = lab.list();
    assert_eq!(v["module"]["interface"], "skf", "{v:#}");
    let t = &v["tokens"][0];
    assert_eq!(t["interface"], "skf");
    assert_eq!(t["serial"], SERIAL);
    assert_eq!(t["label"], "张三的UKey");
    assert_eq!(t["pin"]["tries_left"], 6);
    assert_eq!(t["pin"]["max_tries"], 6);
    let certs = t["certificates"].as_array().unwrap();
    assert_eq!(certs.len(), 2, "{v:#}");
    for c in certs {
        assert_eq!(c["key_algorithm"], "SM2");
        assert_eq!(c["has_private_key"], true);
        assert_eq!(c["key_id"], hex::encode("SM2_CONTAINER"));
    }
    let out = lab.ukey(&["list"], "");
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(
        s.contains("PIN: 6 tries left") && s.contains(&key.device),
        "{s}"
    );
    // `ukey status` asks the portal about the SKF key's signing certificate.
    let out = lab.ukey(
        &["status", "--portal", &lab.portal.server.url, "--json"],
        "",
    );
    let v: Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&out)));
    let rows = v["certificates"].as_array().unwrap();
    let signing = rows
        .iter()
        .find(|r| r["serial"] == key.old_sign_serial.as_str())
        .unwrap_or_else(|| panic!("{v:#}"));
    assert_eq!(signing["state"], "ready", "{v:#}");
    assert_eq!(signing["token_serial"], SERIAL);
}

#[test]
fn ukey_renew_on_an_skf_key_writes_dual_sm2_certificates_openssl_accepts() {
    let (lab, key) = skf_key();
    // A bid sealed to the old encryption certificate before the renewal.
    let old_enc_pem = format!("{SERIAL}-enc.pem");
    let (old_bid, old_key, old_enc) = seal_bid(&lab.ssl, &old_enc_pem, "old");

    let out = lab.renew(&key, PIN, &[]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["status"], "renewed", "{v:#}");
    assert_eq!(v["archived_serial"], key.old_enc_serial.as_str(), "{v:#}");

    // Through the C ABI: the old container (kept: it holds the old decryption key) and
    // the new one with both certificates.
    let c = CAbi::load(&lab.lib);
    let app = c.login(&key.device, PIN);
    let names = c.containers(app);
    assert_eq!(names.len(), 2, "{names:?}");
    assert!(names.contains(&"SM2_CONTAINER".to_owned()));
    let new_name = names.iter().find(|n| n.starts_with("ukey-renew-")).unwrap();
    let con = c.container(app, new_name);
    let sign_der = c.certificate(con, true).expect("signing certificate");
    let enc_der = c.certificate(con, false).expect("encryption certificate");
    for (der, file) in [(&sign_der, "newsig"), (&enc_der, "newenc")] {
        std::fs::write(lab.path(&format!("{file}.der")), der).unwrap();
        lab.ssl
            .run(&[
                "x509",
                "-inform",
                "DER",
                "-in",
                &format!("{file}.der"),
                "-out",
                &format!("{file}.pem"),
            ])
            .unwrap();
        assert!(
            lab.ssl.verifies_with_gm_id("sm2ca", &format!("{file}.pem")),
            "{file}"
        );
        let empty_id = lab
            .ssl
            .output(&["verify", "-CAfile", "sm2ca.pem", &format!("{file}.pem")]);
        assert!(
            !empty_id.status.success(),
            "{file} must not verify with the empty ID"
        );
        let subject = lab
            .ssl
            .run(&[
                "x509",
                "-in",
                &format!("{file}.pem"),
                "-noout",
                "-subject",
                "-nameopt",
                "utf8",
            ])
            .unwrap();
        assert!(subject.contains("张三"), "{subject}");
    }

    // A signature made through the library verifies with OpenSSL and the GM ID.
    lab.ssl
        .run(&[
            "x509",
            "-in",
            "newsig.pem",
            "-noout",
            "-pubkey",
            "-out",
            "newsig.pub",
        ])
        .unwrap();
    let ukey_token::PublicKey::Sm2 { point } =
        ukey_token::PublicKey::from_certificate(&sign_der).unwrap()
    else {
        panic!("not an SM2 certificate");
    };
    let msg = "投标文件 sealed bid".as_bytes();
    let e = ukey_trust::gm::message_digest(ukey_trust::gm::GM_DISTID, &point, msg).unwrap();
    let rs = c.sign(con, &e);
    let der = ukey_skf::EccSignatureBlob::from_bytes(
        &[&[0u8; 32][..], &rs[..32], &[0u8; 32], &rs[32..]].concat(),
    )
    .unwrap()
    .to_der()
    .unwrap();
    std::fs::write(lab.path("m.txt"), msg).unwrap();
    std::fs::write(lab.path("m.sig"), &der).unwrap();
    let out = lab.ssl.output(&[
        "pkeyutl",
        "-verify",
        "-pubin",
        "-inkey",
        "newsig.pub",
        "-rawin",
        "-digest",
        "sm3",
        "-pkeyopt",
        GM_DISTID_OPT,
        "-in",
        "m.txt",
        "-sigfile",
        "m.sig",
    ]);
    assert!(out.status.success(), "{}", text(&out));

    // A bid OpenSSL seals to the new encryption certificate opens through the library;
    // the bid sealed to the old one still opens in the kept container.
    let (bid, wrapped, enc) = seal_bid(&lab.ssl, "newenc.pem", "new");
    assert_eq!(c.open_envelope(con, &wrapped, &enc).unwrap(), bid);
    let old = c.container(app, "SM2_CONTAINER");
    assert_eq!(c.open_envelope(old, &old_key, &old_enc).unwrap(), old_bid);
    // Not the other way round.
    assert!(c.open_envelope(con, &old_key, &old_enc).is_err());

    // `ukey list` names the new certificates with the new container.
    let v = lab.list();
    let certs = v["tokens"][0]["certificates"].as_array().unwrap();
    for der in [&sign_der, &enc_der] {
        let serial = ukey_renewal::status_request(der).unwrap().serial_hex;
        assert!(
            certs.iter().any(|c| c["key_id"] == hex::encode(new_name)
                && c["has_private_key"] == true
                && c["serial"].as_str().unwrap().eq_ignore_ascii_case(&serial)),
            "{v:#}"
        );
    }
}

#[test]
fn a_wrong_pin_says_how_many_tries_are_left_and_the_last_needs_confirmation() {
    let (lab, key) = skf_key();
    lab.control().set_pin_tries(SERIAL, 3).unwrap();
    let json = |out: &Output| -> Value {
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(out)))
    };
    let v = json(&lab.renew(&key, "000000", &[]));
    assert_eq!(v["error"]["code"], "pin_incorrect", "{v:#}");
    assert_eq!(v["error"]["tries_left"], 2, "{v:#}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("2 tries left"),
        "{v:#}"
    );
    assert_eq!(lab.list()["tokens"][0]["pin"]["tries_left"], 2);

    let v = json(&lab.renew(&key, "000000", &[]));
    assert_eq!(v["error"]["tries_left"], 1, "{v:#}");
    // One try left: not without the user's confirmation, and nothing is tried.
    let v = json(&lab.renew(&key, PIN, &[]));
    assert_eq!(v["error"]["code"], "pin_final_try", "{v:#}");
    assert_eq!(lab.list()["tokens"][0]["pin"]["tries_left"], 1);
    // A wrong last try locks it: the message says who to call.
    let v = json(&lab.renew(&key, "000000", &["--confirm-final-try"]));
    assert_eq!(v["error"]["code"], "pin_locked", "{v:#}");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("CA"),
        "{v:#}"
    );
    let t = &lab.list()["tokens"][0];
    assert_eq!(t["pin"]["tries_left"], 0);
    assert_eq!(t["pin"]["locked"], true);
    // Locked: refused before any PIN is sent.
    let v = json(&lab.renew(&key, PIN, &["--confirm-final-try"]));
    assert_eq!(v["error"]["code"], "pin_locked", "{v:#}");
    assert_eq!(lab.control().token(SERIAL).unwrap().pin.failures, 3);
}

/// What is on an SKF key now, read through the library's C ABI: each container's
/// certificates, and the serials of signing certificates whose container's signing key
/// signs what the certificate's key verifies; the application's files.
#[derive(Debug)]
struct Seen {
    containers: Vec<(String, Option<String>, Option<String>)>,
    working: Vec<String>,
    files: Vec<String>,
}

fn serial_of(der: &[u8]) -> String {
    ukey_renewal::status_request(der).unwrap().serial_hex
}

fn look(lab: &SkfLab, key: &SkfKey) -> Seen {
    let c = CAbi::load(&lab.lib);
    let app = c.login(&key.device, PIN);
    let mut seen = Seen {
        containers: Vec::new(),
        working: Vec::new(),
        files: c.files(app),
    };
    for name in c.containers(app) {
        let con = c.container(app, &name);
        let sign = c.certificate(con, true);
        let enc = c.certificate(con, false);
        if let Some(der) = &sign {
            if let Ok(ukey_token::PublicKey::Sm2 { point }) =
                ukey_token::PublicKey::from_certificate(der)
            {
                let msg = b"still works?";
                let e =
                    ukey_trust::gm::message_digest(ukey_trust::gm::GM_DISTID, &point, msg).unwrap();
                if let Some(rs) = c.try_sign(con, &e) {
                    let sig = ukey_skf::EccSignatureBlob::from_bytes(
                        &[&[0u8; 32][..], &rs[..32], &[0u8; 32], &rs[32..]].concat(),
                    )
                    .unwrap()
                    .to_der()
                    .unwrap();
                    if ukey_trust::gm::verify(ukey_trust::gm::GM_DISTID, &point, msg, &sig) {
                        seen.working.push(serial_of(der));
                    }
                }
            }
        }
        seen.containers.push((
            name,
            sign.as_deref().map(serial_of),
            enc.as_deref().map(serial_of),
        ));
    }
    seen
}

/// A finished renewal leaves the old container (it keeps the old encryption pair) and
/// one complete new one, working; no other container and no marker.
fn assert_finished(lab: &SkfLab, key: &SkfKey, out: &Output, point: &str) -> Value {
    assert_eq!(
        out.status.code(),
        Some(0),
        "resume after {point}: {}",
        text(out)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["status"], "renewed", "{point}: {v}");
    let new_sign = v["new_serial"].as_str().unwrap();
    let new_enc = v["encryption_serial"].as_str().unwrap();
    let seen = look(lab, key);
    assert!(
        seen.working.iter().any(|s| s == new_sign),
        "{point}: the new certificate works: {seen:?}"
    );
    assert_eq!(seen.containers.len(), 2, "{point}: {seen:?}");
    assert!(
        seen.containers.contains(&(
            "SM2_CONTAINER".to_owned(),
            Some(key.old_sign_serial.clone()),
            Some(key.old_enc_serial.clone())
        )),
        "{point}: the old container (the archive) is gone or changed: {seen:?}"
    );
    assert!(
        seen.containers
            .iter()
            .any(|(n, s, e)| n.starts_with("ukey-renew-")
                && s.as_deref() == Some(new_sign)
                && e.as_deref() == Some(new_enc)),
        "{point}: no complete new container: {seen:?}"
    );
    assert!(seen.files.is_empty(), "{point}: markers left: {seen:?}");
    v
}

/// An SKF renewal killed at every step boundary, then resumed: at every moment a
/// certificate works, and the resumed run finishes.
#[test]
fn skf_renewal_killed_at_every_step_boundary_then_resumed() {
    let lab = lab();
    let points = common::crash_points();
    for (i, point) in points.iter().enumerate() {
        let key = lab.key(&format!("SKFCRASH{i:02}"));
        let out = lab.renew_at(&key, PIN, &[], Some(point));
        use std::os::unix::process::ExitStatusExt as _;
        assert_eq!(
            out.status.signal(),
            Some(6),
            "{point}: expected an abort: {}",
            text(&out)
        );
        let seen = look(&lab, &key);
        assert!(
            !seen.working.is_empty(),
            "{point}: no certificate works: {seen:?}"
        );
        let out = lab.renew(&key, PIN, &[]);
        let v = assert_finished(&lab, &key, &out, point);
        assert_eq!(v["resumed"], true, "{point}: {v}");
    }
    println!("SKF crash points covered: {}", points.len());
}

/// A fault on the key during a renewal: the renewal stops, a certificate works, and the
/// next run finishes (a full key rolls back and leaves the key as it was first).
fn with_fault(function: &str, nth: u64, rv: Option<&str>, after: bool, expect: &str) {
    let lab = lab();
    let key = lab.key("SKFFAULT1");
    let before = look(&lab, &key);
    let mut fault = match rv {
        Some(rv) => ukey_sim::Fault::fail(function, nth, rv),
        None => ukey_sim::Fault::unplug(function, nth),
    };
    if after {
        fault = fault.after_call();
    }
    lab.control().add_fault(&key.serial, fault).unwrap();
    let out = lab.renew(&key, PIN, &[]);
    let v: Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&out)));
    assert_eq!(v["error"]["code"], expect, "{function}: {v}");
    lab.control().plug(&key.serial).unwrap();
    lab.control().clear_faults(&key.serial).unwrap();
    let seen = look(&lab, &key);
    assert!(
        !seen.working.is_empty(),
        "{function}: no certificate works: {seen:?}"
    );
    if rv.is_some() {
        assert_eq!(
            seen.containers, before.containers,
            "{function}: not rolled back"
        );
    }
    let out = lab.renew(&key, PIN, &[]);
    assert_finished(&lab, &key, &out, function);
}

#[test]
fn skf_key_full_while_writing_the_certificate_rolls_back_then_renews() {
    with_fault(
        "SKF_ImportCertificate",
        1,
        Some("SAR_NO_ROOM"),
        false,
        "device_memory",
    );
}

#[test]
fn skf_key_pulled_out_as_the_certificate_is_written_then_resumed() {
    with_fault("SKF_ImportCertificate", 1, None, true, "token_removed");
}

#[test]
fn skf_key_pulled_out_as_the_second_certificate_is_written_then_resumed() {
    with_fault("SKF_ImportCertificate", 2, None, false, "token_removed");
}

#[test]
fn skf_key_pulled_out_while_importing_the_escrowed_key_then_resumed() {
    with_fault("SKF_ImportECCKeyPair", 1, None, true, "token_removed");
}

#[test]
fn skf_key_pulled_out_while_generating_the_new_key_then_resumed() {
    with_fault("SKF_GenECCKeyPair", 1, None, true, "token_removed");
}

#[test]
fn skf_key_pulled_out_while_creating_the_new_container_then_resumed() {
    with_fault("SKF_CreateContainer", 1, None, true, "token_removed");
}

#[test]
fn skf_key_pulled_out_while_signing_the_request_then_resumed() {
    with_fault("SKF_ECCSignData", 1, None, false, "token_removed");
}

#[test]
fn skf_key_pulled_out_while_retiring_the_old_container_then_resumed() {
    // A single-certificate key has no encryption pair to keep: its old container goes
    // at activation, which is where it is pulled out (after the delete took effect).
    let lab = lab();
    let key = lab.key("SKFRETIRE1");
    lab.container(
        "SKFRETIRE1",
        lab.half("SKFRETIRE1-sig"),
        ProvisionHalf::default(),
    );
    // (Its order still brings a new encryption certificate: the new container gets one.)
    lab.control()
        .add_fault(
            &key.serial,
            ukey_sim::Fault::unplug("SKF_DeleteContainer", 1).after_call(),
        )
        .unwrap();
    let out = lab.renew(&key, PIN, &[]);
    let v: Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&out)));
    assert_eq!(v["error"]["code"], "token_removed", "{v}");
    lab.control().plug(&key.serial).unwrap();
    lab.control().clear_faults(&key.serial).unwrap();
    let seen = look(&lab, &key);
    assert!(!seen.working.is_empty(), "no certificate works: {seen:?}");
    let out = lab.renew(&key, PIN, &[]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let seen = look(&lab, &key);
    assert_eq!(seen.containers.len(), 1, "the old container went: {seen:?}");
    assert!(seen.containers[0].0.starts_with("ukey-renew-"), "{seen:?}");
}

/// `ukey diagnose` on an SKF key: the PIN's tries left, the interface and the library's
/// functions, each certificate chained to the CA, and with the PIN each key proving
/// itself (the signing key signs, the encryption key opens a session key); a wrong PIN
/// says how many tries are left and is not retried.
#[test]
fn ukey_diagnose_on_an_skf_key_says_tries_left_and_self_tests_both_keys() {
    let (lab, _key) = skf_key();
    let trust = lab.path("sm2ca.pem");
    let diagnose = |pin: &str| -> Value {
        let out = lab.ukey(
            &[
                "diagnose",
                "--json",
                "--pin-stdin",
                "--trust",
                trust.to_str().unwrap(),
            ],
            &format!("{pin}\n"),
        );
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&out)))
    };
    let checks = |r: &Value, id: &str| -> Vec<Value> {
        r["sections"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|s| s["checks"].as_array().unwrap().clone())
            .filter(|c| c["id"] == id)
            .collect()
    };
    let r = diagnose(PIN);
    let pin = &checks(&r, "token.pin")[0];
    assert_eq!(pin["status"], "pass", "{pin:#}");
    assert_eq!(pin["facts"]["tries_remaining"], 6, "{pin:#}");
    assert!(
        pin["reason"]["en"]
            .as_str()
            .unwrap()
            .contains("PIN: 6 tries left"),
        "{pin:#}"
    );
    let mech = &checks(&r, "token.mechanisms")[0];
    assert_eq!(mech["status"], "pass", "{mech:#}");
    assert_eq!(mech["facts"]["interface"], "skf", "{mech:#}");
    let tests = checks(&r, "certificate.self_test");
    assert_eq!(tests.len(), 2, "{r:#}");
    for t in &tests {
        assert_eq!(t["status"], "pass", "{t:#}");
    }
    for c in checks(&r, "certificate.chain") {
        assert_eq!(c["status"], "pass", "{c:#}");
    }

    let r = diagnose("000000");
    let t = &checks(&r, "token.self_test")[0];
    assert_eq!(t["status"], "fail", "{t:#}");
    assert!(
        t["reason"]["en"].as_str().unwrap().contains("5 tries left"),
        "{t:#}"
    );
    assert_eq!(t["facts"]["pin_tries_left"], 5, "{t:#}");
    assert_eq!(
        lab.control().token(SERIAL).unwrap().pin.failures,
        1,
        "tried once"
    );
}

/// What an SKF key cannot do is refused before the PIN, the key untouched: an order that
/// keeps the key pair (SKF cannot replace a container's certificate with a tested one in
/// one step).
#[test]
fn a_same_key_order_on_an_skf_key_is_refused_before_the_pin() {
    let lab = lab();
    let key = lab.key("SKFSAME01");
    // A second key, whose order keeps the key pair.
    let other = "SKFSAME02";
    let (sig, enc) = (format!("{other}-sig"), format!("{other}-enc"));
    lab.ssl
        .leaf(
            "sm2ca",
            &sig,
            SUBJECT,
            softhsm_fixtures::openssl_sm2::SignedId::Gm,
        )
        .unwrap();
    lab.ssl.encryption_leaf("sm2ca", &enc, SUBJECT).unwrap();
    lab.store
        .create(&SkfDevice::new(other, "张三的UKey", "ukey-sim", PIN, "admin123").unwrap())
        .unwrap();
    lab.container(other, lab.half(&sig), ProvisionHalf::default());
    let der = lab.ssl.read(&format!("{sig}.der")).unwrap();
    let req = ukey_renewal::status_request(&der).unwrap();
    lab.portal
        .server
        .portal
        .create_order(&CreateOrderRequest {
            serial_hex: req.serial_hex.clone(),
            issuer_der: req.issuer_der,
            issuer_dn: None,
            years: 2,
            state: InitialState::Ready,
            key_policy: KeyPolicy::Same,
            with_encryption_cert: false,
            target_algorithm: KeyAlgorithm::Sm2,
            old_encryption_serial_hex: None,
        })
        .unwrap();
    let same = SkfKey {
        serial: other.to_owned(),
        device: format!("ukey-sim SKF {other}"),
        old_sign_serial: req.serial_hex,
        old_enc_serial: String::new(),
    };
    let before = look(&lab, &same);
    let out = lab.renew(&same, "000000", &[]);
    let v: Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&out)));
    assert_eq!(v["error"]["code"], "interface_unsupported", "{v:#}");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("SKF"),
        "{v:#}"
    );
    // Refused before the PIN: the wrong PIN given was never tried.
    assert_eq!(lab.control().token(other).unwrap().pin.failures, 0);
    assert_eq!(look(&lab, &same).containers, before.containers);
    // The other key, with a new-key order, is unaffected.
    let out = lab.renew(&key, PIN, &[]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
}

/// An RSA container (an old CA's RSA certificate on a GM key) is listed with its
/// certificate and diagnosed: the backend uses SM2 only, and says so.
#[test]
fn an_rsa_container_is_listed_and_diagnosed() {
    let lab = lab();
    let _key = lab.key("SKFRSA01");
    lab.ssl
        .run(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "rsa.key",
            "-subj",
            "/C=CN/O=某某建设工程有限公司/CN=张三",
            "-utf8",
            "-days",
            "30",
            "-outform",
            "DER",
            "-out",
            "rsa.der",
        ])
        .unwrap();
    lab.ssl
        .run(&[
            "pkey", "-in", "rsa.key", "-pubout", "-outform", "DER", "-out", "rsa.spki",
        ])
        .unwrap();
    provision(
        &lab.store,
        "SKFRSA01",
        "ukey-sim",
        "RSA_CONTAINER",
        true,
        ProvisionHalf {
            scalar: None,
            public: Some(lab.ssl.read("rsa.spki").unwrap()),
            cert: Some(lab.ssl.read("rsa.der").unwrap()),
        },
        ProvisionHalf::default(),
    )
    .unwrap();
    let v = lab.list();
    let certs = v["tokens"][0]["certificates"].as_array().unwrap();
    let rsa = certs
        .iter()
        .find(|c| c["key_id"] == hex::encode("RSA_CONTAINER"))
        .unwrap_or_else(|| panic!("{v:#}"));
    assert!(
        rsa["key_algorithm"].as_str().unwrap().starts_with("RSA"),
        "{rsa:#}"
    );
    assert_eq!(rsa["key_evidence"], "unknown", "{rsa:#}");
    assert_eq!(certs.len(), 3, "{v:#}");
    let trust = lab.path("sm2ca.pem");
    let out = lab.ukey(
        &["diagnose", "--json", "--trust", trust.to_str().unwrap()],
        "",
    );
    let r: Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&out)));
    let mech = r["sections"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|s| s["checks"].as_array().unwrap().clone())
        .find(|c| c["id"] == "token.mechanisms")
        .unwrap();
    assert_eq!(mech["status"], "warn", "{mech:#}");
    assert!(
        mech["reason"]["en"]
            .as_str()
            .unwrap()
            .contains("RSA containers are listed only"),
        "{mech:#}"
    );
}

/// A vendor's SKF library writes DEVINFO.Label in GBK: listed decoded ("张三的UKey"), the
/// raw bytes kept as a quirk, as PKCS#11 token info is.
#[test]
fn a_gbk_label_is_listed_decoded_with_its_quirk() {
    let lab = lab();
    let device = SkfDevice {
        label_hex: Some("d5c5c8fdb5c4554b6579".into()),
        ..SkfDevice::new("SKFGBK01", "unused", "ukey-sim", PIN, "admin123").unwrap()
    };
    lab.store.create(&device).unwrap();
    let v = lab.list();
    let t = &v["tokens"][0];
    assert_eq!(t["label"], "张三的UKey", "{v:#}");
    let q = t["quirks"].as_array().unwrap();
    assert!(
        q.iter()
            .any(|q| q["field"] == "Label" && q["raw"] == "d5c5c8fdb5c4554b6579"),
        "{v:#}"
    );
}

/// 国密 over CMP: an SKF key's SM2 signing certificate renewed with `ukey renew --cmp`
/// against the SM2 portal's `/.well-known/cmp` (messages protected with SM2-with-SM3 and
/// the GM ID both ways): the certificate read through the library's C ABI verifies with
/// OpenSSL and the GM ID, and the certConf completed the order.
#[test]
fn an_skf_keys_sm2_certificate_is_renewed_over_cmp() {
    let (lab, key) = skf_key();
    // CMP renews the signing certificate alone (an escrowed key travels in the REST
    // protocol's envelope only): the dual order is replaced by a signing one.
    let portal = &lab.portal.server.portal;
    let dual = portal
        .list_orders()
        .unwrap()
        .into_iter()
        .find(|o| o.serial_hex == key.old_sign_serial)
        .unwrap();
    portal.reject(&dual.order_id, "replaced").unwrap();
    let der = lab.ssl.read(&format!("{}-sig.der", key.serial)).unwrap();
    let order = portal
        .create_order(&CreateOrderRequest {
            serial_hex: key.old_sign_serial.clone(),
            issuer_der: ukey_renewal::status_request(&der).unwrap().issuer_der,
            issuer_dn: None,
            years: 2,
            state: InitialState::Ready,
            key_policy: KeyPolicy::New,
            with_encryption_cert: false,
            target_algorithm: KeyAlgorithm::Sm2,
            old_encryption_serial_hex: None,
        })
        .unwrap()
        .order_id;
    let url = format!("{}/.well-known/cmp", lab.portal.server.url);
    let trust = lab.path("sm2ca.pem");
    let out = lab.ukey(
        &[
            "renew",
            "--cmp",
            &url,
            "--token",
            &key.serial,
            "--pin-stdin",
            "--yes",
            "--json",
            "--trust",
            trust.to_str().unwrap(),
        ],
        &format!("{PIN}\n"),
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["status"], "renewed", "{v:#}");

    let c = CAbi::load(&lab.lib);
    let app = c.login(&key.device, PIN);
    let names = c.containers(app);
    let new_name = names
        .iter()
        .find(|n| n.starts_with("ukey-renew-"))
        .unwrap_or_else(|| panic!("no new container: {names:?}"));
    let sign_der = c
        .certificate(c.container(app, new_name), true)
        .expect("signing certificate");
    assert_eq!(serial_of(&sign_der), v["new_serial"].as_str().unwrap());
    std::fs::write(lab.path("cmpsig.der"), &sign_der).unwrap();
    lab.ssl
        .run(&[
            "x509",
            "-inform",
            "DER",
            "-in",
            "cmpsig.der",
            "-out",
            "cmpsig.pem",
        ])
        .unwrap();
    assert!(lab.ssl.verifies_with_gm_id("sm2ca", "cmpsig.pem"));
    assert_eq!(
        portal.show_order(&order).unwrap().state,
        "completed",
        "the certConf reached the portal"
    );
}
