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
const DEVICE: &str = "ukey-sim SKF SKF2026A01";
const SUBJECT: &str = "/C=CN/O=某某建设工程有限公司/CN=张三";

/// A software SKF key holding an SM2 dual-certificate container ("SM2_CONTAINER"), the
/// CA that issued it (OpenSSL), and the files `ukey` runs with.
struct SkfKey {
    dir: tempfile::TempDir,
    state: PathBuf,
    lib: PathBuf,
    ssl: OpenSslSm2,
    old_sign_serial: String,
    old_enc_serial: String,
}

#[allow(unsafe_code)]
fn skf_key() -> SkfKey {
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
    ssl.leaf(
        "sm2ca",
        "oldsig",
        SUBJECT,
        softhsm_fixtures::openssl_sm2::SignedId::Gm,
    )
    .unwrap();
    ssl.encryption_leaf("sm2ca", "oldenc", SUBJECT).unwrap();
    let store = SkfStore::new(&state);
    store
        .create(&SkfDevice::new(SERIAL, "张三的UKey", "ukey-sim", PIN, "admin123").unwrap())
        .unwrap();
    let half = |name: &str| {
        let (d, point) = ssl.scalar_and_point(name).unwrap();
        ProvisionHalf {
            scalar: Some(d),
            public: Some(point),
            cert: Some(ssl.read(&format!("{name}.der")).unwrap()),
        }
    };
    provision(
        &store,
        SERIAL,
        "ukey-sim",
        "SM2_CONTAINER",
        false,
        half("oldsig"),
        half("oldenc"),
    )
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
    let serial = |name: &str| {
        ssl.run(&["x509", "-in", &format!("{name}.pem"), "-noout", "-serial"])
            .unwrap()
            .trim()
            .trim_start_matches("serial=")
            .to_owned()
    };
    SkfKey {
        old_sign_serial: serial("oldsig"),
        old_enc_serial: serial("oldenc"),
        dir,
        state,
        lib,
        ssl,
    }
}

impl SkfKey {
    fn ukey(&self, args: &[&str], stdin: &str) -> Output {
        use std::io::Write as _;
        let mut child = std::process::Command::new(UKEY)
            .arg("--module")
            .arg(&self.lib)
            .args(args)
            .env_remove("UKEY_PKCS11_MODULE")
            .env("UKEY_CONFIG", self.dir.path().join("config.toml"))
            .env("UKEY_SYSTEM_CONFIG", self.dir.path().join("no-system.toml"))
            .env("UKEY_DATA_DIR", self.dir.path().join("data"))
            .env("UKEY_LANG", "en")
            .env(ukey_sim::STATE_ENV, &self.state)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(stdin.as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    }

    fn path(&self, file: &str) -> PathBuf {
        self.ssl.dir().join(file)
    }

    fn list(&self) -> Value {
        let out = self.ukey(&["list", "--json"], "");
        assert!(out.status.success(), "{}", text(&out));
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// The SM2 portal with a paid dual-certificate order for the old signing certificate.
    fn portal(&self) -> common::LoopbackPortal {
        let portal =
            common::start_portal_with_ca(&self.path("sm2ca.pem"), &self.path("sm2ca.key"), None);
        let der = self.ssl.read("oldsig.der").unwrap();
        portal
            .server
            .portal
            .create_order(&CreateOrderRequest {
                serial_hex: self.old_sign_serial.clone(),
                issuer_der: ukey_renewal::status_request(&der).unwrap().issuer_der,
                issuer_dn: None,
                // OpenSSL issued the old certificates for a year from today; the
                // renewal must end later.
                years: 2,
                state: InitialState::Ready,
                key_policy: KeyPolicy::New,
                with_encryption_cert: true,
                target_algorithm: KeyAlgorithm::Sm2,
                old_encryption_serial_hex: Some(self.old_enc_serial.clone()),
            })
            .unwrap();
        portal
    }

    fn renew(&self, portal: &common::LoopbackPortal, pin: &str, extra: &[&str]) -> Output {
        let trust = self.path("sm2ca.pem");
        let mut args = vec![
            "renew",
            "--portal",
            &portal.server.url,
            "--pin-stdin",
            "--yes",
            "--json",
            "--trust",
            trust.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        self.ukey(&args, &format!("{pin}\n"))
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

    /// Connects, opens the application and verifies the PIN: the application handle.
    fn login(&self, pin: &str) -> H {
        let connect: unsafe extern "C" fn(*const c_char, *mut H) -> u32 = self.f("SKF_ConnectDev");
        let open: unsafe extern "C" fn(H, *const c_char, *mut H) -> u32 =
            self.f("SKF_OpenApplication");
        let verify: unsafe extern "C" fn(H, u32, *const c_char, *mut u32) -> u32 =
            self.f("SKF_VerifyPIN");
        let (name, app, pin) = (
            CString::new(DEVICE).unwrap(),
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
    let k = skf_key();
    let v = k.list();
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
    let out = k.ukey(&["list"], "");
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(s.contains("PIN: 6 tries left") && s.contains(DEVICE), "{s}");
}

#[test]
fn ukey_renew_on_an_skf_key_writes_dual_sm2_certificates_openssl_accepts() {
    let k = skf_key();
    let portal = k.portal();
    let before = CAbi::load(&k.lib);
    let app = before.login(PIN);
    // A bid sealed to the old encryption certificate before the renewal.
    let (old_bid, old_key, old_enc) = seal_bid(&k.ssl, "oldenc.pem", "old");
    let _ = app;
    drop(before);

    let out = k.renew(&portal, PIN, &[]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["status"], "renewed", "{v:#}");
    assert_eq!(v["archived_serial"], k.old_enc_serial.as_str(), "{v:#}");

    // Through the C ABI: the old container (kept: it holds the old decryption key) and
    // the new one with both certificates.
    let c = CAbi::load(&k.lib);
    let app = c.login(PIN);
    let names = c.containers(app);
    assert_eq!(names.len(), 2, "{names:?}");
    assert!(names.contains(&"SM2_CONTAINER".to_owned()));
    let new_name = names.iter().find(|n| n.starts_with("ukey-renew-")).unwrap();
    let con = c.container(app, new_name);
    let sign_der = c.certificate(con, true).expect("signing certificate");
    let enc_der = c.certificate(con, false).expect("encryption certificate");
    for (der, file) in [(&sign_der, "newsig"), (&enc_der, "newenc")] {
        std::fs::write(k.path(&format!("{file}.der")), der).unwrap();
        k.ssl
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
            k.ssl.verifies_with_gm_id("sm2ca", &format!("{file}.pem")),
            "{file}"
        );
        let empty_id = k
            .ssl
            .output(&["verify", "-CAfile", "sm2ca.pem", &format!("{file}.pem")]);
        assert!(
            !empty_id.status.success(),
            "{file} must not verify with the empty ID"
        );
        let subject = k
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
    k.ssl
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
    let spki = k
        .ssl
        .run(&["pkey", "-pubin", "-in", "newsig.pub", "-text", "-noout"])
        .unwrap();
    assert!(spki.contains("SM2") || spki.contains("pub:"), "{spki}");
    let point = {
        let cert = ukey_token::PublicKey::from_certificate(&sign_der).unwrap();
        match cert {
            ukey_token::PublicKey::Sm2 { point } => point,
            other => panic!("not SM2: {other:?}"),
        }
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
    std::fs::write(k.path("m.txt"), msg).unwrap();
    std::fs::write(k.path("m.sig"), &der).unwrap();
    let out = k.ssl.output(&[
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
    let (bid, key, enc) = seal_bid(&k.ssl, "newenc.pem", "new");
    assert_eq!(c.open_envelope(con, &key, &enc).unwrap(), bid);
    let old = c.container(app, "SM2_CONTAINER");
    assert_eq!(c.open_envelope(old, &old_key, &old_enc).unwrap(), old_bid);
    // Not the other way round.
    assert!(c.open_envelope(con, &old_key, &old_enc).is_err());

    // `ukey list` now names the new certificates with the new container.
    let v = k.list();
    let certs = v["tokens"][0]["certificates"].as_array().unwrap();
    let new_serial = |der: &[u8]| {
        certs
            .iter()
            .find(|c| {
                c["key_id"] == hex::encode(new_name) && c["has_private_key"] == true && {
                    let s = c["serial"].as_str().unwrap();
                    ukey_renewal::status_request(der)
                        .unwrap()
                        .serial_hex
                        .eq_ignore_ascii_case(s)
                }
            })
            .is_some()
    };
    assert!(new_serial(&sign_der) && new_serial(&enc_der), "{v:#}");
}

#[test]
fn a_wrong_pin_says_how_many_tries_are_left_and_the_last_needs_confirmation() {
    let k = skf_key();
    let portal = k.portal();
    ukey_sim::Control::new(&k.state)
        .unwrap()
        .set_pin_tries(SERIAL, 3)
        .unwrap();
    let out = k.renew(&portal, "000000", &[]);
    assert_ne!(out.status.code(), Some(0), "{}", text(&out));
    let v: Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&out)));
    assert_eq!(v["error"]["code"], "pin_incorrect", "{v:#}");
    assert_eq!(v["error"]["tries_left"], 2, "{v:#}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("2 tries left"),
        "{v:#}"
    );
    assert_eq!(k.list()["tokens"][0]["pin"]["tries_left"], 2);

    let out = k.renew(&portal, "000000", &[]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["error"]["tries_left"], 1, "{v:#}");
    // One try left: not without the user's confirmation, and nothing is tried.
    let out = k.renew(&portal, PIN, &[]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["error"]["code"], "pin_final_try", "{v:#}");
    assert_eq!(k.list()["tokens"][0]["pin"]["tries_left"], 1);
    // A wrong last try locks it: the message says who to call.
    let out = k.renew(&portal, "000000", &["--confirm-final-try"]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["error"]["code"], "pin_locked", "{v:#}");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("CA"),
        "{v:#}"
    );
    let t = &k.list()["tokens"][0];
    assert_eq!(t["pin"]["tries_left"], 0);
    assert_eq!(t["pin"]["locked"], true);
    // Locked: refused before any PIN is sent.
    let out = k.renew(&portal, PIN, &["--confirm-final-try"]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["error"]["code"], "pin_locked", "{v:#}");
    assert_eq!(
        ukey_sim::Control::new(&k.state)
            .unwrap()
            .token(SERIAL)
            .unwrap()
            .pin
            .failures,
        3
    );
}
