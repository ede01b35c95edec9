//! The software SKF key, loaded as a vendor's SKF library is: through `ukey-skf`'s
//! backend (libloading, the GM/T 0016 prototypes), steered through the state directory
//! and the `ukey-sim` CLI. Each test is its own process (`cargo nextest`), since the
//! state directory comes from the environment.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use secrecy::SecretString;
use ukey_sim::skf::{ProvisionHalf, SkfDevice, SkfStore, provision};
use ukey_sim::{Control, Fault};
use ukey_skf::abi::{EccCipherBlob, EccPublicKeyBlob, EnvelopedKeyBlob, Sar};
use ukey_skf::{DevEvent, Half, SkfError, SkfLibrary};

const PIN: &str = "12345678";
const GM_ID: &str = "1234567812345678";

struct Lab {
    _dir: tempfile::TempDir,
    state: PathBuf,
    store: SkfStore,
    control: Control,
    lib: Arc<SkfLibrary>,
}

#[allow(unsafe_code)]
fn lab(serials: &[&str]) -> Lab {
    let dir = tempfile::tempdir().expect("temp dir");
    let state = dir.path().join("state");
    // SAFETY: nextest runs each test in its own process, and this runs before the test
    // starts a thread or loads the library: nothing reads the environment concurrently.
    unsafe { std::env::set_var(ukey_sim::STATE_ENV, &state) };
    let store = SkfStore::new(&state);
    for s in serials {
        store
            .create(&SkfDevice::new(s, "测试 Key", "ukey-sim", PIN, "admin123").expect("device"))
            .expect("create device");
    }
    let control = Control::new(&state).expect("control");
    let lib =
        SkfLibrary::load(&ukey_sim::module_path().expect("libukey_sim.so")).expect("load SKF");
    Lab {
        _dir: dir,
        state,
        store,
        control,
        lib,
    }
}

fn pin(s: &str) -> SecretString {
    SecretString::from(s.to_owned())
}

fn cli(state: &Path, args: &[&str]) -> String {
    let exe = env!("CARGO_BIN_EXE_ukey-sim");
    let out = Command::new(exe)
        .arg("--state")
        .arg(state)
        .args(args)
        .output()
        .expect("run ukey-sim");
    assert!(
        out.status.success(),
        "ukey-sim {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8")
}

#[test]
fn devices_applications_and_info_are_listed() {
    let lab = lab(&["SKF0001", "SKF0002"]);
    let names = lab.lib.devices(true).expect("devices");
    assert_eq!(names, ["ukey-sim SKF SKF0001", "ukey-sim SKF SKF0002"]);
    let dev = lab.lib.connect(&names[1]).expect("connect");
    let info = dev.info().expect("info");
    assert_eq!(info.serial, "SKF0002");
    assert_eq!(info.label, "测试 Key");
    assert_eq!(info.manufacturer, "ukey-sim");
    assert_eq!(dev.applications().expect("apps"), ["ukey-sim"]);
    let app = dev.open_application("ukey-sim").expect("open app");
    assert!(app.containers().expect("containers").is_empty());
    assert!(dev.open_application("nope").is_err());

    lab.control.unplug("SKF0001").expect("unplug");
    assert_eq!(
        lab.lib.devices(true).expect("devices"),
        ["ukey-sim SKF SKF0002"]
    );
    assert_eq!(lab.lib.devices(false).expect("devices").len(), 2);
}

#[test]
fn wrong_pins_count_down_across_processes_and_lock() {
    let lab = lab(&["SKFPIN1"]);
    lab.control.set_pin_tries("SKFPIN1", 3).expect("tries");
    let dev = lab.lib.connect("ukey-sim SKF SKFPIN1").expect("connect");
    let app = dev.open_application("ukey-sim").expect("app");
    let info = app.user_pin_info().expect("pin info");
    assert_eq!(
        (info.max_retries, info.remaining, info.is_default),
        (3, 3, true)
    );

    match app.verify_user_pin(&pin("000000")) {
        Err(SkfError::PinIncorrect { remaining: 2 }) => {}
        other => panic!("expected 2 tries left, got {other:?}"),
    }
    // Another process sees the count (the CLI reads the same state).
    let listed: serde_json::Value =
        serde_json::from_str(&cli(&lab.state, &["skf", "list", "--json"])).expect("json");
    assert_eq!(listed[0]["pin_tries_left"], 2);
    // A good PIN resets it.
    app.verify_user_pin(&pin(PIN)).expect("good PIN");
    assert_eq!(app.user_pin_info().expect("info").remaining, 3);

    for left in [2, 1] {
        match app.verify_user_pin(&pin("000000")) {
            Err(SkfError::PinIncorrect { remaining }) => assert_eq!(remaining, left),
            other => panic!("expected {left} left, got {other:?}"),
        }
    }
    assert!(matches!(
        app.verify_user_pin(&pin("000000")),
        Err(SkfError::PinLocked)
    ));
    // Locked: even the right PIN is refused, after a reload of the library too.
    drop(app);
    drop(dev);
    let lib = SkfLibrary::load(lab.lib.path()).expect("reload");
    let dev = lib.connect("ukey-sim SKF SKFPIN1").expect("connect");
    let app = dev.open_application("ukey-sim").expect("app");
    assert!(matches!(
        app.verify_user_pin(&pin(PIN)),
        Err(SkfError::PinLocked)
    ));
    assert_eq!(app.user_pin_info().expect("info").remaining, 0);
    // The CA's unlock.
    cli(&lab.state, &["pin-reset", "SKFPIN1"]);
    app.verify_user_pin(&pin(PIN)).expect("unlocked");
}

#[test]
fn keys_signatures_envelopes_and_session_keys() {
    let lab = lab(&["SKFKEY1"]);
    let dev = lab.lib.connect("ukey-sim SKF SKFKEY1").expect("connect");
    let app = dev.open_application("ukey-sim").expect("app");
    // Nothing changes without the PIN.
    assert_eq!(
        app.create_container("c1").expect_err("no PIN").sar(),
        Some(Sar::USER_NOT_LOGGED_IN)
    );
    app.verify_user_pin(&pin(PIN)).expect("PIN");
    let c = app.create_container("c1").expect("container");
    assert_eq!(c.kind().expect("kind"), ukey_skf::ContainerKind::Empty);
    assert_eq!(c.sm2_public_key(Half::Sign).expect("no key"), None);
    let point = c.generate_sm2().expect("generate");
    assert_eq!(c.kind().expect("kind"), ukey_skf::ContainerKind::Ecc);
    assert_eq!(
        c.sm2_public_key(Half::Sign).expect("key"),
        Some(point.clone())
    );

    // The host computes e = SM3(Z ‖ M); the signature verifies as SM2-with-SM3, GM ID.
    let msg = b"bid document";
    let e = ukey_trust::gm::message_digest(GM_ID, &point, msg).expect("e");
    let sig = c.sign_digest(&e).expect("sign");
    assert!(ukey_trust::gm::verify(GM_ID, &point, msg, &sig));
    assert!(!ukey_trust::gm::verify(GM_ID, &point, b"other", &sig));

    // Certificates, per half.
    assert_eq!(c.certificate(Half::Sign).expect("none"), None);
    c.import_certificate(Half::Sign, b"\x30\x03\x02\x01\x01")
        .expect("import");
    assert_eq!(
        c.certificate(Half::Sign).expect("cert"),
        Some(b"\x30\x03\x02\x01\x01".to_vec())
    );
    assert_eq!(c.certificate(Half::Encrypt).expect("none"), None);

    // An escrowed key pair, its SM4 key encrypted to the signing key.
    let (d, enc_point) = ukey_sim::gm::generate().expect("escrowed key");
    let mut sm4 = [0u8; 16];
    getrandom::fill(&mut sm4).expect("random");
    let mut padded = [0u8; 64];
    padded[32..].copy_from_slice(&d);
    let encrypted = ukey_sim::gm::sm4_ecb(&sm4, &padded, false).expect("sm4");
    let wrapped = ukey_trust::gm::encrypt(&point, &sm4).expect("sm2 encrypt");
    let blob = EnvelopedKeyBlob {
        version: 1,
        symm_alg_id: ukey_skf::abi::SGD_SMS4_ECB,
        bits: 256,
        encrypted_private_key: encrypted.try_into().expect("64 bytes"),
        public_key: EccPublicKeyBlob::from_point(&enc_point).expect("blob"),
        cipher: EccCipherBlob::from_der(&wrapped).expect("cipher blob"),
    };
    // One whose public key does not match its private key is refused, nothing stored.
    let mut wrong = blob.clone();
    wrong.public_key = EccPublicKeyBlob::from_point(&point).expect("blob");
    assert_eq!(
        c.import_enveloped_key(&wrong).expect_err("mismatch").sar(),
        Some(Sar::IN_DATA)
    );
    assert_eq!(c.sm2_public_key(Half::Encrypt).expect("none"), None);
    c.import_enveloped_key(&blob).expect("import envelope");
    assert_eq!(
        c.sm2_public_key(Half::Encrypt).expect("enc key"),
        Some(enc_point.clone())
    );

    // A digital envelope to the encryption key opens on the device.
    let session = [7u8; 16];
    let sealed = ukey_trust::gm::encrypt(&enc_point, &session).expect("seal");
    let k = c
        .import_session_key(&EccCipherBlob::from_der(&sealed).expect("blob"))
        .expect("session key");
    let ct = ukey_sim::gm::sm4_ecb(&session, b"sixteen byte msg", false).expect("ct");
    assert_eq!(k.decrypt_ecb(&ct).expect("decrypt"), b"sixteen byte msg");
    // One sealed to the signing key does not.
    let other = ukey_trust::gm::encrypt(&point, &session).expect("seal");
    assert!(
        c.import_session_key(&EccCipherBlob::from_der(&other).expect("blob"))
            .is_err()
    );

    // The private keys are nowhere in what the library answers, and the device file is
    // the owner's only.
    use std::os::unix::fs::PermissionsExt;
    let file = lab.state.join("skf/SKFKEY1.json");
    assert_eq!(
        std::fs::metadata(&file).expect("file").permissions().mode() & 0o077,
        0
    );
    drop(k);
    drop(c);
    app.delete_container("c1").expect("delete");
    assert!(app.containers().expect("list").is_empty());
}

#[test]
fn a_fault_fails_the_nth_call_and_a_pull_kills_open_handles() {
    let lab = lab(&["SKFFLT1"]);
    let (d, point) = ukey_sim::gm::generate().expect("key");
    provision(
        &lab.store,
        "SKFFLT1",
        "ukey-sim",
        "old",
        false,
        ProvisionHalf {
            scalar: Some(d.to_vec()),
            public: Some(point),
            cert: Some(b"cert-1".to_vec()),
        },
        ProvisionHalf::default(),
    )
    .expect("provision");
    cli(
        &lab.state,
        &[
            "fault",
            "SKFFLT1",
            "--function",
            "SKF_ImportCertificate",
            "--nth",
            "2",
            "--rv",
            "SAR_NO_ROOM",
        ],
    );
    let dev = lab.lib.connect("ukey-sim SKF SKFFLT1").expect("connect");
    let app = dev.open_application("ukey-sim").expect("app");
    app.verify_user_pin(&pin(PIN)).expect("PIN");
    let c = app.open_container("old").expect("open");
    c.import_certificate(Half::Encrypt, b"first")
        .expect("first call passes");
    let err = c
        .import_certificate(Half::Encrypt, b"second")
        .expect_err("second fails");
    assert_eq!(err.sar(), Some(Sar::NO_ROOM));
    assert_eq!(
        c.certificate(Half::Encrypt).expect("read"),
        Some(b"first".to_vec()),
        "a failed write wrote nothing"
    );

    // Pulled inside the write, after it took effect: the caller sees the key gone.
    lab.control
        .add_fault(
            "SKFFLT1",
            Fault::unplug("SKF_ImportCertificate", 1).after_call(),
        )
        .expect("fault");
    assert!(
        c.import_certificate(Half::Sign, b"cert-2")
            .expect_err("pulled")
            .is_removed()
    );
    assert!(lab.lib.devices(true).expect("list").is_empty());
    assert!(
        c.certificate(Half::Sign)
            .expect_err("dead handle")
            .is_removed()
    );
    lab.control.plug("SKFFLT1").expect("plug");
    // Old handles stay dead after the key is back; a new connection sees the write.
    assert!(
        c.certificate(Half::Sign)
            .expect_err("still dead")
            .is_removed()
    );
    drop(c);
    drop(app);
    drop(dev);
    let dev = lab.lib.connect("ukey-sim SKF SKFFLT1").expect("reconnect");
    let app = dev.open_application("ukey-sim").expect("app");
    let c = app.open_container("old").expect("open");
    assert_eq!(
        c.certificate(Half::Sign).expect("read"),
        Some(b"cert-2".to_vec())
    );
    // And the login went with the pull.
    assert_eq!(
        c.import_certificate(Half::Sign, b"x")
            .expect_err("logged out")
            .sar(),
        Some(Sar::USER_NOT_LOGGED_IN)
    );
}

#[test]
fn insertions_and_removals_are_reported() {
    let lab = lab(&["SKFEVT1"]);
    assert!(lab.lib.has_events());
    // The first look is the baseline.
    assert_eq!(lab.lib.devices(true).expect("devices").len(), 1);
    let lib = Arc::clone(&lab.lib);
    let waiter = std::thread::spawn(move || {
        let mut events = Vec::new();
        while events.len() < 3 {
            match lib.wait_for_event().expect("wait") {
                Some(e) => events.push(e),
                None => break,
            }
        }
        events
    });
    std::thread::sleep(Duration::from_millis(100));
    lab.control.unplug("SKFEVT1").expect("unplug");
    std::thread::sleep(Duration::from_millis(100));
    lab.control.plug("SKFEVT1").expect("plug");
    std::thread::sleep(Duration::from_millis(100));
    lab.store
        .create(&SkfDevice::new("SKFEVT2", "second", "ukey-sim", PIN, "admin123").expect("device"))
        .expect("create");
    let start = Instant::now();
    let events = waiter.join().expect("waiter");
    assert!(start.elapsed() < Duration::from_secs(5));
    assert_eq!(
        events,
        [
            DevEvent::Removed("ukey-sim SKF SKFEVT1".into()),
            DevEvent::Inserted("ukey-sim SKF SKFEVT1".into()),
            DevEvent::Inserted("ukey-sim SKF SKFEVT2".into()),
        ]
    );
    // A cancelled wait ends without an event.
    let lib = Arc::clone(&lab.lib);
    let waiter = std::thread::spawn(move || lib.wait_for_event().expect("wait"));
    std::thread::sleep(Duration::from_millis(100));
    lab.lib.cancel_wait().expect("cancel");
    assert_eq!(waiter.join().expect("waiter"), None);
}

#[test]
fn latency_delays_a_call_and_a_pull_during_it_does_nothing() {
    let lab = lab(&["SKFLAT1"]);
    let dev = lab.lib.connect("ukey-sim SKF SKFLAT1").expect("connect");
    let app = dev.open_application("ukey-sim").expect("app");
    app.verify_user_pin(&pin(PIN)).expect("PIN");
    lab.control
        .set_latency("SKFLAT1", "SKF_CreateContainer", Duration::from_millis(300))
        .expect("latency");
    let t0 = Instant::now();
    app.create_container("slow").expect("create");
    assert!(
        t0.elapsed() >= Duration::from_millis(300),
        "{:?}",
        t0.elapsed()
    );
    // Pulled while the call waits: it fails and nothing is created.
    let control = lab.control.clone();
    let puller = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(100));
        control.unplug("SKFLAT1").expect("unplug");
    });
    let err = app.create_container("never").expect_err("pulled");
    puller.join().expect("puller");
    assert!(err.is_removed(), "{err:?}");
    lab.control.plug("SKFLAT1").expect("plug");
    lab.control.clear_latency("SKFLAT1").expect("no latency");
    let dev = lab.lib.connect("ukey-sim SKF SKFLAT1").expect("reconnect");
    let app = dev.open_application("ukey-sim").expect("app");
    assert_eq!(app.containers().expect("list"), ["slow"]);
}
