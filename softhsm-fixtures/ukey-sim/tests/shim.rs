//! The ukey-sim module, loaded like an application loads it (cryptoki, pkcs11-tool,
//! ukey-token's watcher), over a private SoftHSM2 installation.
//!
//! Run with `cargo nextest run -p ukey-sim`: each test is its own process, because a
//! PKCS#11 module is one global state per process (and SOFTHSM2_CONF is read from the
//! process environment).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::object::{Attribute, ObjectClass};
use cryptoki::session::{Session, SessionState, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;
use softhsm_fixtures::{SoftHsm, TokenFixture, TokenSpec};
use ukey_sim::{Control, Fault};

#[path = "shim/gm.rs"]
mod gm;

const USER_PIN: &str = "123456";
const SO_PIN: &str = "12345678";

/// A SoftHSM2 installation with tokens, and the ukey-sim state that controls them.
struct Sim {
    hsm: SoftHsm,
    control: Control,
    tokens: Vec<TokenFixture>,
}

fn sim(specs: &[TokenSpec]) -> Sim {
    let hsm = SoftHsm::new().expect("private SoftHSM2 installation");
    let tokens = specs
        .iter()
        .map(|spec| hsm.create_token(spec).expect("fixture token"))
        .collect();
    let state_dir = hsm.dir().join("ukey-sim-state");
    set_state_env(&state_dir);
    hsm.activate();
    let control = Control::new(&state_dir).expect("state directory");
    Sim {
        hsm,
        control,
        tokens,
    }
}

#[allow(unsafe_code)]
fn set_state_env(dir: &Path) {
    // SAFETY: nextest runs each test in its own process, and this runs before the test
    // starts a thread or loads a module: nothing reads the environment concurrently.
    unsafe { std::env::set_var(ukey_sim::STATE_ENV, dir) };
}

fn shim_path() -> PathBuf {
    ukey_sim::module_path().expect("libukey_sim.so is built with the tests")
}

impl Sim {
    fn serial(&self, i: usize) -> &str {
        &self.tokens[i].serial
    }

    /// Loads and initialises the shim, as an application does.
    fn load(&self) -> Pkcs11 {
        let pkcs11 = Pkcs11::new(shim_path()).expect("load the shim");
        pkcs11
            .initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
            .expect("C_Initialize through the shim");
        pkcs11
    }

    /// A command (pkcs11-tool, ukey-sim) with SOFTHSM2_CONF and UKEY_SIM_STATE set.
    fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut command = self.hsm.command(program);
        command.env(ukey_sim::STATE_ENV, self.control.dir());
        command
    }

    fn cli(&self, args: &[&str]) -> Output {
        self.command(env!("CARGO_BIN_EXE_ukey-sim"))
            .args(args)
            .output()
            .expect("run ukey-sim")
    }
}

fn slot_of(pkcs11: &Pkcs11, serial: &str) -> Slot {
    pkcs11
        .get_slots_with_token()
        .expect("C_GetSlotList")
        .into_iter()
        .find(|slot| {
            pkcs11
                .get_token_info(*slot)
                .is_ok_and(|info| info.serial_number().trim() == serial)
        })
        .unwrap_or_else(|| panic!("no slot shows token {serial}"))
}

fn present_ids(pkcs11: &Pkcs11) -> Vec<u64> {
    pkcs11
        .get_slots_with_token()
        .expect("C_GetSlotList(TRUE)")
        .iter()
        .map(Slot::id)
        .collect()
}

/// The CKR_ value of a failed call.
fn rv<T: std::fmt::Debug>(result: cryptoki::error::Result<T>) -> RvError {
    match result {
        Err(CkError::Pkcs11(rv, _)) => rv,
        other => panic!("expected a PKCS#11 error, got {other:?}"),
    }
}

fn login(session: &Session, pin: &str) -> cryptoki::error::Result<()> {
    session.login(UserType::User, Some(&AuthPin::from(pin)))
}

fn data_object(label: &str) -> Vec<Attribute> {
    vec![
        Attribute::Class(ObjectClass::DATA),
        Attribute::Token(true),
        Attribute::Private(false),
        Attribute::Label(label.as_bytes().to_vec()),
        Attribute::Value(b"renewal journal".to_vec()),
    ]
}

fn count_labelled(session: &Session, label: &str) -> usize {
    session
        .find_objects(&[Attribute::Label(label.as_bytes().to_vec())])
        .expect("C_FindObjects")
        .len()
}

fn text(output: &Output) -> String {
    format!(
        "status {:?}\n--- stdout\n{}\n--- stderr\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

// ----------------------------------------------------------------------------------
// OpenSC's pkcs11-tool through the shim

#[test]
fn pkcs11_tool_lists_tokens_and_objects_through_the_shim() {
    let sim = sim(&[TokenSpec::ukey("UKEY-A"), TokenSpec::empty("UKEY-B")]);
    let shim = shim_path();
    let list = |extra: &[&str]| {
        sim.command("pkcs11-tool")
            .arg("--module")
            .arg(&shim)
            .args(["-L", "-O", "--token-label", "UKEY-A"])
            .args(extra)
            .output()
            .expect("run pkcs11-tool")
    };
    let out = list(&[]);
    let all = text(&out);
    assert!(out.status.success(), "{all}");
    for token in &sim.tokens {
        assert!(
            all.contains(&token.serial),
            "serial {} missing: {all}",
            token.serial
        );
        assert!(
            all.contains(&token.label),
            "label {} missing: {all}",
            token.label
        );
    }
    // -O lists the public objects of UKEY-A: the certificate, by its label.
    assert!(all.contains("Certificate Object"), "{all}");
    assert!(all.contains("张三 签名"), "{all}");
    assert!(
        !all.contains("uninitialized"),
        "the free slot is hidden: {all}"
    );

    // Pulled out with the CLI, UKEY-B's slot shows no token.
    let cli = sim.cli(&["unplug", sim.serial(1)]);
    assert!(cli.status.success(), "{}", text(&cli));
    let out = list(&[]);
    let all = text(&out);
    assert!(out.status.success(), "{all}");
    assert!(all.contains(sim.serial(0)), "{all}");
    assert!(
        !all.contains(sim.serial(1)),
        "unplugged token still listed: {all}"
    );
    assert!(all.contains("(empty)"), "{all}");
}

/// Runs `pkcs11-tool --test` on the only token, through `module`.
fn pkcs11_tool_test(sim: &Sim, module: &Path) -> Output {
    sim.command("pkcs11-tool")
        .arg("--module")
        .arg(module)
        .args(["--login", "--pin", USER_PIN, "--test"])
        .output()
        .expect("run pkcs11-tool --test")
}

#[test]
fn pkcs11_tool_test_passes_through_the_shim_as_on_softhsm() {
    let sim = sim(&[TokenSpec::empty("TEST")]);
    let shim = shim_path();
    // Key generation through the shim (C_GenerateKeyPair forwarded); EC because
    // SoftHSM 2.6.1 fails pkcs11-tool's RSA-OAEP-SHA256 step (see the next test).
    let keygen = sim
        .command("pkcs11-tool")
        .arg("--module")
        .arg(&shim)
        .args(["--login", "--pin", USER_PIN, "--keypairgen"])
        .args(["--key-type", "EC:prime256v1", "--id", "01", "--label", "ec"])
        .output()
        .expect("run pkcs11-tool --keypairgen");
    assert!(keygen.status.success(), "{}", text(&keygen));

    let direct = pkcs11_tool_test(&sim, &softhsm_fixtures::softhsm_module().expect("SoftHSM2"));
    let shimmed = pkcs11_tool_test(&sim, &shim);
    assert!(
        direct.status.success(),
        "on SoftHSM2 directly: {}",
        text(&direct)
    );
    assert!(
        shimmed.status.success(),
        "through the shim: {}",
        text(&shimmed)
    );
    assert_eq!(
        String::from_utf8_lossy(&direct.stdout),
        String::from_utf8_lossy(&shimmed.stdout)
    );
    assert!(String::from_utf8_lossy(&shimmed.stdout).contains("No errors"));
}

#[test]
fn pkcs11_tool_test_on_an_rsa_key_ends_as_on_softhsm() {
    // SoftHSM 2.6.1 rejects pkcs11-tool's OAEP-SHA256 decryption test with
    // CKR_ARGUMENTS_BAD; the shim must fail (or pass) exactly the same way.
    let sim = sim(&[TokenSpec::ukey("RSA")]);
    let direct = pkcs11_tool_test(&sim, &softhsm_fixtures::softhsm_module().expect("SoftHSM2"));
    let shimmed = pkcs11_tool_test(&sim, &shim_path());
    assert_eq!(
        direct.status.code(),
        shimmed.status.code(),
        "{}",
        text(&shimmed)
    );
    assert_eq!(text(&direct), text(&shimmed));
    // It got as far as signing with the token's key.
    assert!(String::from_utf8_lossy(&shimmed.stdout).contains("RSA-PKCS: OK"));
}

// ----------------------------------------------------------------------------------
// Hot-plug

#[test]
fn unplug_and_plug_are_seen_by_the_slot_list() {
    let sim = sim(&[TokenSpec::empty("A"), TokenSpec::empty("B")]);
    let pkcs11 = sim.load();
    let a = slot_of(&pkcs11, sim.serial(0));
    let b = slot_of(&pkcs11, sim.serial(1));
    assert_eq!(present_ids(&pkcs11).len(), 2);
    assert!(
        pkcs11
            .get_slot_info(a)
            .expect("slot info")
            .removable_device()
    );

    sim.control.unplug(sim.serial(0)).expect("unplug");
    assert_eq!(present_ids(&pkcs11), vec![b.id()]);
    let all: Vec<u64> = pkcs11
        .get_all_slots()
        .expect("all")
        .iter()
        .map(Slot::id)
        .collect();
    assert!(all.contains(&a.id()), "the reader stays, empty");
    assert!(!pkcs11.get_slot_info(a).expect("slot info").token_present());
    assert_eq!(rv(pkcs11.get_token_info(a)), RvError::TokenNotPresent);
    assert_eq!(rv(pkcs11.open_ro_session(a)), RvError::TokenNotPresent);

    sim.control.plug(sim.serial(0)).expect("plug");
    let mut ids = present_ids(&pkcs11);
    ids.sort_unstable();
    let mut expected = vec![a.id(), b.id()];
    expected.sort_unstable();
    assert_eq!(ids, expected, "the same slots come back");
    let info = pkcs11.get_token_info(a).expect("token info");
    assert_eq!(info.serial_number().trim(), sim.serial(0), "the same token");
    assert_eq!(info.label().trim(), "A");
}

#[test]
fn slot_events_without_blocking() {
    let sim = sim(&[TokenSpec::empty("A")]);
    let pkcs11 = sim.load();
    let slot = slot_of(&pkcs11, sim.serial(0));
    assert_eq!(pkcs11.get_slot_event().expect("no event yet"), None);

    sim.control.unplug(sim.serial(0)).expect("unplug");
    let event = pkcs11.get_slot_event().expect("event");
    assert_eq!(event.map(|s| s.id()), Some(slot.id()));
    assert_eq!(pkcs11.get_slot_event().expect("drained"), None);

    sim.control.plug(sim.serial(0)).expect("plug");
    let event = pkcs11.get_slot_event().expect("event");
    assert_eq!(event.map(|s| s.id()), Some(slot.id()));
    assert_eq!(pkcs11.get_slot_event().expect("drained"), None);
}

#[test]
fn blocking_slot_event_wakes_on_unplug_and_plug() {
    let sim = sim(&[TokenSpec::empty("A")]);
    let pkcs11 = sim.load();
    let slot = slot_of(&pkcs11, sim.serial(0));
    for change in ["unplug", "plug"] {
        let (tx, rx) = mpsc::channel();
        let waiter = pkcs11.clone();
        let thread = std::thread::spawn(move || {
            let result = waiter.wait_for_slot_event();
            tx.send((result.map(|s| s.id()), Instant::now()))
                .expect("send");
        });
        // The waiter is blocked: nothing has happened.
        assert!(
            rx.recv_timeout(Duration::from_millis(150)).is_err(),
            "{change}: returned early"
        );
        let changed_at = Instant::now();
        match change {
            "unplug" => sim.control.unplug(sim.serial(0)).expect("unplug"),
            _ => sim.control.plug(sim.serial(0)).expect("plug"),
        }
        let (result, woke_at) = rx.recv_timeout(Duration::from_secs(5)).expect("woken");
        assert_eq!(result.expect("event"), slot.id());
        let latency = woke_at - changed_at;
        println!("{change} -> C_WaitForSlotEvent returned after {latency:?}");
        assert!(
            latency < Duration::from_millis(500),
            "{change}: {latency:?}"
        );
        thread.join().expect("waiter thread");
    }
}

#[test]
fn finalize_wakes_a_blocked_waiter() {
    let sim = sim(&[TokenSpec::empty("A")]);
    let pkcs11 = sim.load();
    let (tx, rx) = mpsc::channel();
    let waiter = pkcs11.clone();
    let thread = std::thread::spawn(move || {
        tx.send(waiter.wait_for_slot_event().map(|s| s.id()))
            .expect("send");
    });
    assert!(
        rx.recv_timeout(Duration::from_millis(150)).is_err(),
        "returned early"
    );
    pkcs11.finalize().expect("C_Finalize");
    let result = rx
        .recv_timeout(Duration::from_secs(5))
        .expect("woken by C_Finalize");
    assert_eq!(rv(result), RvError::CryptokiNotInitialized);
    thread.join().expect("waiter thread");
}

#[test]
fn open_session_fails_as_removed_after_unplug() {
    let sim = sim(&[TokenSpec::empty("A")]);
    let pkcs11 = sim.load();
    let slot = slot_of(&pkcs11, sim.serial(0));
    let session = pkcs11.open_rw_session(slot).expect("session");
    login(&session, USER_PIN).expect("login");
    session
        .create_object(&data_object("before"))
        .expect("write");

    sim.control.unplug(sim.serial(0)).expect("unplug");
    assert_eq!(
        rv(session.create_object(&data_object("during"))),
        RvError::DeviceRemoved
    );
    assert_eq!(rv(session.get_session_info()), RvError::DeviceRemoved);
    assert_eq!(rv(session.generate_random_vec(8)), RvError::DeviceRemoved);

    sim.control.plug(sim.serial(0)).expect("plug");
    // The old session died with the removal.
    assert_eq!(
        rv(session.get_session_info()),
        RvError::SessionHandleInvalid
    );
    assert_eq!(rv(session.close()), RvError::SessionHandleInvalid);

    // A new session sees the same token, logged out (pulling the key logged it out).
    let session = pkcs11.open_rw_session(slot).expect("new session");
    let state = session.get_session_info().expect("info").session_state();
    assert_eq!(state, SessionState::RwPublic);
    assert_eq!(count_labelled(&session, "before"), 1);
    assert_eq!(count_labelled(&session, "during"), 0);
    login(&session, USER_PIN).expect("login again");
}

// ----------------------------------------------------------------------------------
// PIN retry counter

#[test]
fn pin_locks_after_the_configured_tries_and_survives_a_reload() {
    let sim = sim(&[TokenSpec::empty("A")]);
    let serial = sim.serial(0).to_owned();
    sim.control.set_pin_tries(&serial, 3).expect("tries");
    let pkcs11 = sim.load();
    let slot = slot_of(&pkcs11, &serial);
    let flags = |p: &Pkcs11| {
        let info = p.get_token_info(slot).expect("token info");
        (
            info.user_pin_count_low(),
            info.user_pin_final_try(),
            info.user_pin_locked(),
        )
    };
    assert_eq!(flags(&pkcs11), (false, false, false));

    let session = pkcs11.open_ro_session(slot).expect("session");
    // A failure, then a good login: the counter resets.
    assert_eq!(rv(login(&session, "000000")), RvError::PinIncorrect);
    assert_eq!(flags(&pkcs11), (true, false, false));
    login(&session, USER_PIN).expect("good PIN");
    session.logout().expect("logout");
    assert_eq!(flags(&pkcs11), (false, false, false));

    assert_eq!(rv(login(&session, "000000")), RvError::PinIncorrect);
    assert_eq!(flags(&pkcs11), (true, false, false), "after 1 of 3");
    assert_eq!(rv(login(&session, "000000")), RvError::PinIncorrect);
    assert_eq!(
        flags(&pkcs11),
        (true, true, false),
        "after 2 of 3: final try"
    );
    assert_eq!(rv(login(&session, "000000")), RvError::PinIncorrect);
    assert_eq!(flags(&pkcs11), (true, false, true), "after 3 of 3: locked");
    // Locked: even the right PIN is refused.
    assert_eq!(rv(login(&session, USER_PIN)), RvError::PinLocked);
    drop(session);

    // Pulled out and plugged back, and the module reloaded: still locked.
    sim.control.unplug(&serial).expect("unplug");
    sim.control.plug(&serial).expect("plug");
    pkcs11.finalize().expect("C_Finalize");
    let pkcs11 = sim.load();
    assert_eq!(flags(&pkcs11), (true, false, true), "after reload");
    let session = pkcs11.open_rw_session(slot).expect("session");
    assert_eq!(rv(login(&session, USER_PIN)), RvError::PinLocked);

    // The CA unlocks it: SO login and C_InitPIN set a new user PIN.
    session
        .login(UserType::So, Some(&AuthPin::from(SO_PIN)))
        .expect("SO login");
    session
        .init_pin(&AuthPin::from("654321"))
        .expect("C_InitPIN");
    session.logout().expect("SO logout");
    assert_eq!(flags(&pkcs11), (false, false, false), "unlocked");
    login(&session, "654321").expect("new PIN");
    assert_eq!(sim.control.token(&serial).expect("state").pin.failures, 0);
}

#[test]
fn set_pin_with_a_wrong_old_pin_counts_as_a_try() {
    let sim = sim(&[TokenSpec::empty("A")]);
    let serial = sim.serial(0).to_owned();
    sim.control.set_pin_tries(&serial, 2).expect("tries");
    let pkcs11 = sim.load();
    let slot = slot_of(&pkcs11, &serial);
    let session = pkcs11.open_rw_session(slot).expect("session");
    let wrong = AuthPin::from("000000");
    let new = AuthPin::from("654321");
    assert_eq!(rv(session.set_pin(&wrong, &new)), RvError::PinIncorrect);
    assert!(
        pkcs11
            .get_token_info(slot)
            .expect("info")
            .user_pin_final_try()
    );
    assert_eq!(rv(session.set_pin(&wrong, &new)), RvError::PinIncorrect);
    assert!(pkcs11.get_token_info(slot).expect("info").user_pin_locked());
    let right = AuthPin::from(USER_PIN);
    assert_eq!(rv(session.set_pin(&right, &new)), RvError::PinLocked);
    assert_eq!(rv(login(&session, USER_PIN)), RvError::PinLocked);
    // The PIN was not changed behind the lock: unlocking restores the old one.
    sim.control.reset_pin_counter(&serial).expect("unlock");
    login(&session, USER_PIN).expect("old PIN still valid");
}

#[test]
fn pin_tries_are_shared_between_processes() {
    let sim = sim(&[TokenSpec::empty("A")]);
    let serial = sim.serial(0).to_owned();
    sim.control.set_pin_tries(&serial, 3).expect("tries");
    let pkcs11 = sim.load();
    let slot = slot_of(&pkcs11, &serial);
    // Another program (pkcs11-tool) tries a wrong PIN twice through the shim.
    for _ in 0..2 {
        let out = sim
            .command("pkcs11-tool")
            .arg("--module")
            .arg(shim_path())
            .args(["--login", "--pin", "000000", "-O"])
            .output()
            .expect("run pkcs11-tool");
        assert!(
            !out.status.success(),
            "a wrong PIN logged in: {}",
            text(&out)
        );
    }
    // This process sees the count: one try left.
    let info = pkcs11.get_token_info(slot).expect("token info");
    assert!(info.user_pin_final_try(), "{info:?}");
    let session = pkcs11.open_ro_session(slot).expect("session");
    assert_eq!(rv(login(&session, "000000")), RvError::PinIncorrect);
    assert!(pkcs11.get_token_info(slot).expect("info").user_pin_locked());
    assert_eq!(sim.control.token(&serial).expect("state").pin.failures, 3);
}

// ----------------------------------------------------------------------------------
// Faults and latency

#[test]
fn fault_fires_at_the_chosen_call_only() {
    let sim = sim(&[TokenSpec::empty("A")]);
    let serial = sim.serial(0).to_owned();
    let pkcs11 = sim.load();
    let slot = slot_of(&pkcs11, &serial);
    let session = pkcs11.open_rw_session(slot).expect("session");
    login(&session, USER_PIN).expect("login");

    sim.control
        .add_fault(
            &serial,
            Fault::fail("C_CreateObject", 2, "CKR_DEVICE_MEMORY"),
        )
        .expect("arm");
    session
        .create_object(&data_object("one"))
        .expect("1st call");
    assert_eq!(
        rv(session.create_object(&data_object("two"))),
        RvError::DeviceMemory
    );
    session
        .create_object(&data_object("three"))
        .expect("3rd call");
    assert_eq!(count_labelled(&session, "one"), 1);
    assert_eq!(
        count_labelled(&session, "two"),
        0,
        "a failed write left nothing"
    );
    assert_eq!(count_labelled(&session, "three"), 1);
    let fault = &sim.control.token(&serial).expect("state").faults[0];
    assert_eq!((fault.calls, fault.fired), (3, 1));

    // After the call: the object is written, yet the application is told it failed.
    sim.control.clear_faults(&serial).expect("clear");
    sim.control
        .add_fault(
            &serial,
            Fault::fail("C_CreateObject", 1, "CKR_DEVICE_ERROR").after_call(),
        )
        .expect("arm");
    assert_eq!(
        rv(session.create_object(&data_object("four"))),
        RvError::DeviceError
    );
    assert_eq!(count_labelled(&session, "four"), 1);
}

#[test]
fn fault_can_pull_the_key_in_the_middle_of_a_write() {
    let sim = sim(&[TokenSpec::empty("A")]);
    let serial = sim.serial(0).to_owned();
    let pkcs11 = sim.load();
    let slot = slot_of(&pkcs11, &serial);
    let session = pkcs11.open_rw_session(slot).expect("session");
    login(&session, USER_PIN).expect("login");

    sim.control
        .add_fault(&serial, Fault::unplug("C_CreateObject", 2))
        .expect("arm");
    session
        .create_object(&data_object("first"))
        .expect("1st write");
    assert_eq!(
        rv(session.create_object(&data_object("second"))),
        RvError::DeviceRemoved
    );
    // The key is out, and stays out.
    assert!(present_ids(&pkcs11).is_empty());
    assert!(!sim.control.token(&serial).expect("state").plugged);
    assert_eq!(
        pkcs11.get_slot_event().expect("event").map(|s| s.id()),
        Some(slot.id())
    );
    assert_eq!(rv(session.find_objects(&[])), RvError::DeviceRemoved);

    sim.control.plug(&serial).expect("plug");
    let session = pkcs11.open_ro_session(slot).expect("new session");
    assert_eq!(count_labelled(&session, "first"), 1);
    assert_eq!(count_labelled(&session, "second"), 0);
}

#[test]
fn latency_delays_the_chosen_function() {
    let sim = sim(&[TokenSpec::empty("A")]);
    let serial = sim.serial(0).to_owned();
    let pkcs11 = sim.load();
    let slot = slot_of(&pkcs11, &serial);
    let session = pkcs11.open_ro_session(slot).expect("session");
    let delay = Duration::from_millis(300);
    sim.control
        .set_latency(&serial, "C_GenerateRandom", delay)
        .expect("latency");
    let started = Instant::now();
    session.generate_random_vec(16).expect("random");
    let took = started.elapsed();
    assert!(took >= delay, "took {took:?}");
}

#[test]
fn pulling_the_key_cuts_a_slow_call_short() {
    let sim = sim(&[TokenSpec::empty("A")]);
    let serial = sim.serial(0).to_owned();
    let pkcs11 = sim.load();
    let slot = slot_of(&pkcs11, &serial);
    let session = pkcs11.open_ro_session(slot).expect("session");
    // A real key takes about 10 s to generate an RSA key; here any slow call will do.
    sim.control
        .set_latency(&serial, "C_GenerateRandom", Duration::from_secs(30))
        .expect("latency");
    let control = sim.control.clone();
    let puller = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(200));
        control.unplug(&serial).expect("unplug");
    });
    let started = Instant::now();
    assert_eq!(rv(session.generate_random_vec(16)), RvError::DeviceRemoved);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    puller.join().expect("puller");
}

#[test]
fn chip_times_are_per_mechanism_and_count_from_the_call() {
    use cryptoki::mechanism::Mechanism;
    let sim = sim(&[TokenSpec::empty("A")]);
    let serial = sim.serial(0).to_owned();
    let pkcs11 = sim.load();
    let session = pkcs11
        .open_rw_session(slot_of(&pkcs11, &serial))
        .expect("session");
    login(&session, USER_PIN).expect("login");
    // As a profile sets them: RSA key pairs and EC key pairs take different times.
    sim.control
        .update(&serial, |t| {
            t.chip_ms = [
                ("C_GenerateKeyPair/0".to_owned(), 1200),
                ("C_GenerateKeyPair/4160".to_owned(), 400),
            ]
            .into();
        })
        .expect("chip times");
    let session_key = |extra: Vec<Attribute>| {
        let mut public = vec![Attribute::Token(false)];
        public.extend(extra);
        (public, vec![Attribute::Token(false), Attribute::Sign(true)])
    };
    let (public, private) = session_key(vec![
        Attribute::ModulusBits(1024.into()),
        Attribute::PublicExponent(vec![1, 0, 1]),
    ]);
    let started = Instant::now();
    session
        .generate_key_pair(&Mechanism::RsaPkcsKeyPairGen, &public, &private)
        .expect("RSA key pair");
    let rsa = started.elapsed();
    // P-256: 06 08 2a 86 48 ce 3d 03 01 07
    let (public, private) = session_key(vec![Attribute::EcParams(vec![
        0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07,
    ])]);
    let started = Instant::now();
    session
        .generate_key_pair(&Mechanism::EccKeyPairGen, &public, &private)
        .expect("EC key pair");
    let ec = started.elapsed();
    assert!(rsa >= Duration::from_millis(1200), "RSA took {rsa:?}");
    assert!(ec >= Duration::from_millis(400), "EC took {ec:?}");
}

#[test]
fn a_key_pulled_while_its_chip_works_answers_removed_with_the_work_done() {
    let sim = sim(&[TokenSpec::empty("A")]);
    let serial = sim.serial(0).to_owned();
    let pkcs11 = sim.load();
    let slot = slot_of(&pkcs11, &serial);
    let session = pkcs11.open_rw_session(slot).expect("session");
    sim.control
        .update(&serial, |t| {
            t.chip_ms = [("C_CreateObject".to_owned(), 30_000)].into();
        })
        .expect("chip time");
    let control = sim.control.clone();
    let pull = serial.clone();
    let puller = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        control.unplug(&pull).expect("unplug");
    });
    let started = Instant::now();
    assert_eq!(
        rv(session.create_object(&data_object("written"))),
        RvError::DeviceRemoved
    );
    assert!(started.elapsed() < Duration::from_secs(20));
    puller.join().expect("puller");
    // The chip had committed the write before the reader lost it: a client must check
    // what is on the key after a removal, not assume the call did nothing.
    sim.control.plug(&serial).expect("plug");
    let session = pkcs11.open_ro_session(slot).expect("new session");
    assert_eq!(count_labelled(&session, "written"), 1);
}

#[test]
fn cli_sets_lists_and_removes_a_latency_profile() {
    let sim = sim(&[TokenSpec::empty("A")]);
    let serial = sim.serial(0);
    let list = sim.cli(&["profile", "--list"]);
    assert!(list.status.success(), "{}", text(&list));
    let listed = String::from_utf8_lossy(&list.stdout);
    assert!(
        listed.contains("usb-key") && listed.contains("[1] JCAlgTest"),
        "{listed}"
    );

    let bad = sim.cli(&["profile", serial, "floppy"]);
    assert!(!bad.status.success());
    assert!(text(&bad).contains("usb-key"), "{}", text(&bad));
    assert!(sim.control.token(serial).expect("state").chip_ms.is_empty());

    let set = sim.cli(&["profile", serial, "usb-key"]);
    assert!(set.status.success(), "{}", text(&set));
    let token = sim.control.token(serial).expect("state");
    assert_eq!(token.profile.as_deref(), Some("usb-key"));
    assert_eq!(token.chip_ms, ukey_sim::profile::USB_KEY.chip_ms());
    let status = sim.cli(&["status"]);
    assert!(text(&status).contains("C_Sign 270 ms"), "{}", text(&status));

    let off = sim.cli(&["profile", serial, "none"]);
    assert!(off.status.success(), "{}", text(&off));
    let token = sim.control.token(serial).expect("state");
    assert!(token.chip_ms.is_empty() && token.profile.is_none());
}

// ----------------------------------------------------------------------------------
// The CLI

#[test]
fn cli_rejects_bad_input_and_keeps_the_state() {
    let sim = sim(&[TokenSpec::empty("A")]);
    let serial = sim.serial(0);
    let ok = sim.cli(&[
        "fault",
        serial,
        "--function",
        "C_Sign",
        "--nth",
        "2",
        "--rv",
        "CKR_DEVICE_ERROR",
    ]);
    assert!(ok.status.success(), "{}", text(&ok));
    let before = std::fs::read(sim.control.dir().join("state.json")).expect("state");

    for bad in [
        &["fault", serial, "--function", "C_Sign", "--rv", "CKR_NOPE"][..],
        &[
            "fault",
            serial,
            "--function",
            "C_Sgn",
            "--rv",
            "CKR_DEVICE_ERROR",
        ][..],
        &[
            "fault",
            serial,
            "--function",
            "C_Sign",
            "--nth",
            "0",
            "--unplug",
        ][..],
        &["pin-tries", serial, "--max", "0"][..],
        &["unplug", "serial-with-more-than-16-chars"][..],
    ] {
        let out = sim.cli(bad);
        assert!(!out.status.success(), "{bad:?} accepted: {}", text(&out));
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("error"),
            "{bad:?}: {}",
            text(&out)
        );
    }
    let after = std::fs::read(sim.control.dir().join("state.json")).expect("state");
    assert_eq!(before, after, "bad input changed the state");

    let status = sim.cli(&["status", "--json"]);
    assert!(status.status.success(), "{}", text(&status));
    let state: ukey_sim::SimState = serde_json::from_slice(&status.stdout).expect("JSON status");
    let token = state.token(serial).expect("token listed");
    assert_eq!(token.faults.len(), 1);
    assert_eq!(token.faults[0].nth, 2);
}

// ----------------------------------------------------------------------------------
// ukey-token's watcher pointed at the shim

#[test]
fn watcher_reports_insert_and_removal_within_500_ms() {
    use ukey_token::{TokenEvent, WatchMode, Watcher};

    let sim = sim(&[TokenSpec::empty("A"), TokenSpec::empty("B")]);
    let serial = sim.serial(0).to_owned();
    let module = ukey_token::Module::load(&shim_path()).expect("load the shim");
    let mut watcher = Watcher::new(module, WatchMode::Auto);
    assert_eq!(
        watcher.mode(),
        WatchMode::SlotEvents,
        "the shim has slot events"
    );
    let first = watcher.poll().expect("first poll");
    assert_eq!(first.len(), 2, "both tokens present at start: {first:?}");

    let interval = Duration::from_millis(10);
    let limit = Duration::from_millis(500);
    sim.control.unplug(&serial).expect("unplug");
    let started = Instant::now();
    let events = watcher
        .wait(interval, Duration::from_secs(5))
        .expect("wait");
    let took = started.elapsed();
    println!("watcher saw the removal after {took:?}");
    assert!(
        matches!(&events[..], [TokenEvent::Removed { serial: s, .. }] if *s == serial),
        "{events:?}"
    );
    assert!(took < limit, "removal seen after {took:?}");

    sim.control.plug(&serial).expect("plug");
    let started = Instant::now();
    let events = watcher
        .wait(interval, Duration::from_secs(5))
        .expect("wait");
    let took = started.elapsed();
    println!("watcher saw the insertion after {took:?}");
    assert!(
        matches!(&events[..], [TokenEvent::Inserted { token }] if token.serial == serial),
        "{events:?}"
    );
    assert!(took < limit, "insertion seen after {took:?}");
}

// ----------------------------------------------------------------------------------
// A key created while the module is loaded

/// Creates a token in another process with softhsm2-util; returns its serial.
fn init_token_in_child(sim: &Sim, label: &str) -> String {
    let init = sim
        .command("softhsm2-util")
        .args(["--init-token", "--free", "--label", label])
        .args(["--pin", USER_PIN, "--so-pin", SO_PIN])
        .output()
        .expect("run softhsm2-util");
    assert!(init.status.success(), "{}", text(&init));
    let show = sim
        .command("softhsm2-util")
        .arg("--show-slots")
        .output()
        .expect("run softhsm2-util --show-slots");
    let listing = String::from_utf8_lossy(&show.stdout).into_owned();
    // Each slot block names "Serial number:" before "Label:".
    listing
        .split("\nSlot ")
        .find(|block| {
            block.lines().any(|l| {
                l.trim()
                    .strip_prefix("Label:")
                    .is_some_and(|v| v.trim() == label)
            })
        })
        .and_then(|block| {
            block
                .lines()
                .find_map(|l| l.trim().strip_prefix("Serial number:"))
                .map(|v| v.trim().to_owned())
        })
        .unwrap_or_else(|| panic!("token {label} not in: {listing}"))
}

#[test]
fn a_key_created_after_loading_appears_when_plugged_in() {
    let sim = sim(&[TokenSpec::empty("A")]);
    let pkcs11 = sim.load();
    let a = slot_of(&pkcs11, sim.serial(0));
    let session = pkcs11.open_ro_session(a).expect("session on A");

    let serial = init_token_in_child(&sim, "NEW");
    assert_eq!(
        present_ids(&pkcs11),
        vec![a.id()],
        "not shown before it is plugged in"
    );
    sim.control.plug(&serial).expect("plug the new key");
    // A session is open: re-initialising SoftHSM2 would kill it, so the shim waits.
    assert_eq!(present_ids(&pkcs11), vec![a.id()]);
    session
        .get_session_info()
        .expect("the open session is unharmed");
    drop(session);

    assert_eq!(
        present_ids(&pkcs11).len(),
        2,
        "shown once no session is open"
    );
    let new = slot_of(&pkcs11, &serial);
    assert_eq!(
        pkcs11.get_slot_event().expect("event").map(|s| s.id()),
        Some(new.id())
    );
    assert_eq!(pkcs11.get_slot_event().expect("drained"), None);
    let session = pkcs11.open_rw_session(new).expect("session on the new key");
    login(&session, USER_PIN).expect("login on the new key");
    // The old key is still there and usable.
    let session = pkcs11.open_ro_session(a).expect("session on A again");
    session.get_session_info().expect("A works");
}

// ----------------------------------------------------------------------------------
// Token info filled as vendors' modules fill it: ukey-token lists the key anyway

/// One quirk at a time through the shim: cryptoki's whole-structure parse may fail on
/// it (the bug users hit: "No token found"), ukey-token lists the token and names it.
#[test]
fn odd_token_info_never_hides_a_token() {
    use ukey_sim::TokenInfoOverride;
    use ukey_token::QuirkKind;

    let sim = sim(&[TokenSpec::empty("A")]);
    let serial = sim.serial(0).to_owned();
    let module = ukey_token::Module::load(&shim_path()).expect("load the shim");
    let cases: Vec<(TokenInfoOverride, &str, QuirkKind)> = vec![
        (
            // A clock that is not 16 digits: cryptoki fails the whole C_GetTokenInfo.
            TokenInfoOverride {
                utc_time: Some("2026-12-01".into()),
                ..Default::default()
            },
            "utcTime",
            QuirkKind::ClockUnreadable,
        ),
        (
            // GBK: 张三的Key.
            TokenInfoOverride {
                label_hex: Some("d5c5c8fdb5c44b6579".into()),
                ..Default::default()
            },
            "label",
            QuirkKind::Gbk,
        ),
        (
            TokenInfoOverride {
                manufacturer_hex: Some(hex::encode("Longmai")),
                pad: Some(0),
                ..Default::default()
            },
            "manufacturerID",
            QuirkKind::NulPadded,
        ),
        (
            TokenInfoOverride {
                model_hex: Some("ff80fe".into()),
                ..Default::default()
            },
            "model",
            QuirkKind::NotText,
        ),
        (
            TokenInfoOverride {
                serial_hex: Some(hex::encode("0000000000000000")),
                ..Default::default()
            },
            "serialNumber",
            QuirkKind::SerialNotUnique,
        ),
        (
            TokenInfoOverride {
                hardware_version: Some((1, 255)),
                ..Default::default()
            },
            "hardwareVersion",
            QuirkKind::VersionOutOfRange,
        ),
        (
            TokenInfoOverride {
                counters_nonsense: true,
                ..Default::default()
            },
            "ulFreePublicMemory",
            QuirkKind::CounterNonsense,
        ),
    ];
    for (odd, field, kind) in cases {
        sim.control
            .set_token_info(&serial, odd.clone())
            .expect("override");
        let tokens = module.tokens().expect("slots");
        assert_eq!(tokens.len(), 1, "{odd:?}: the token is listed");
        let t = &tokens[0];
        assert!(
            t.quirks.iter().any(|q| q.field == field && q.kind == kind),
            "{odd:?}: {:?}",
            t.quirks
        );
        match kind {
            QuirkKind::Gbk => assert_eq!(t.label, "张三的Key"),
            QuirkKind::NulPadded => assert_eq!(t.manufacturer, "Longmai"),
            QuirkKind::NotText => assert_eq!(t.model, "\\xff\\x80\\xfe"),
            QuirkKind::VersionOutOfRange => assert_eq!(t.hardware_version, "unknown"),
            QuirkKind::CounterNonsense => assert_eq!(t.free_public_memory, None),
            QuirkKind::ClockUnreadable => {
                assert_eq!(t.clock, None);
                // What cryptoki alone makes of it: the whole token info fails.
                let raw = Pkcs11::new(shim_path()).expect("load");
                let _ = raw.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK));
                let slot = raw
                    .get_slots_with_token()
                    .expect("slots")
                    .into_iter()
                    .find(|s| s.id() == t.slot_id)
                    .expect("the token's slot");
                assert!(
                    raw.get_token_info(slot).is_err(),
                    "cryptoki parses it whole"
                );
            }
            _ => {}
        }
        // The listing (sessions, objects) works on it too.
        let listing = module.list_token(t, None);
        assert!(listing.errors.is_empty(), "{odd:?}: {:?}", listing.errors);
    }
    // Counters unavailable are simply unknown, not a quirk; a readable clock is shown.
    sim.control
        .set_token_info(
            &serial,
            TokenInfoOverride {
                counters_unavailable: true,
                utc_time: Some("2026120113450900".into()),
                ..Default::default()
            },
        )
        .expect("override");
    let t = &module.tokens().expect("slots")[0];
    assert!(t.quirks.is_empty(), "{:?}", t.quirks);
    assert_eq!(t.free_private_memory, None);
    assert_eq!(t.clock.as_deref(), Some("2026-12-01 13:45:09"));
}

/// Two keys whose module gives them one serial: listed as two, with ids that carry
/// their slots, and the watcher reports the one pulled out.
#[test]
fn keys_that_share_a_serial_are_told_apart() {
    use ukey_token::{TokenEvent, WatchMode, Watcher};
    let sim = sim(&[TokenSpec::empty("A"), TokenSpec::empty("B")]);
    for i in 0..2 {
        sim.control
            .set_token_info(
                sim.serial(i),
                ukey_sim::TokenInfoOverride {
                    serial_hex: Some(hex::encode("ABCD1234")),
                    ..Default::default()
                },
            )
            .expect("override");
    }
    let module = ukey_token::Module::load(&shim_path()).expect("load the shim");
    let tokens = module.tokens().expect("slots");
    assert_eq!(tokens.len(), 2);
    assert!(tokens.iter().all(|t| t.serial == "ABCD1234"));
    assert!(
        tokens
            .iter()
            .all(|t| t.id == format!("ABCD1234@{}", t.slot_id))
    );
    assert!(tokens.iter().all(|t| t.serial_is_shared()));
    assert_ne!(tokens[0].id, tokens[1].id);
    let b = tokens.iter().find(|t| t.label == "B").expect("B").clone();
    // Seen again on its own (a refresh), it is still the key of its slot.
    assert_eq!(module.refresh(&b).expect("refresh").id, b.id);

    let mut watcher = Watcher::new(module, WatchMode::Auto);
    assert_eq!(watcher.poll().expect("poll").len(), 2);
    sim.control.unplug(sim.serial(1)).expect("unplug B");
    let events = watcher
        .wait(Duration::from_millis(10), Duration::from_secs(5))
        .expect("wait");
    assert!(
        matches!(&events[..], [TokenEvent::Removed { id, label, .. }] if *id == b.id && label == "B"),
        "{events:?}"
    );
}

/// One object whose attributes the module will not give (its C_GetAttributeValue fails):
/// that object is reported, the token and its other certificate are still listed.
#[test]
fn an_unreadable_object_marks_that_object_not_the_token() {
    let sim = sim(&[TokenSpec::dual("Dual", softhsm_fixtures::KeyAlg::Rsa2048)]);
    let module = ukey_token::Module::load(&shim_path()).expect("load the shim");
    let token = module.tokens().expect("slots").remove(0);
    let whole = module.list_token(&token, None);
    assert!(whole.errors.is_empty(), "{:?}", whole.errors);
    assert_eq!(whole.certificates.len(), 2);

    for rv in [
        "CKR_GENERAL_ERROR",
        "CKR_FUNCTION_FAILED",
        "CKR_DEVICE_ERROR",
    ] {
        sim.control
            .add_fault(sim.serial(0), Fault::fail("C_GetAttributeValue", 1, rv))
            .expect("fault");
        let listing = module.list_token(&token, None);
        assert_eq!(listing.errors.len(), 1, "{rv}: {:?}", listing.errors);
        assert_ne!(listing.errors[0].code(), "token_removed", "{rv}");
        assert_eq!(listing.certificates.len(), 1, "{rv}: the other certificate");
        assert!(
            module
                .tokens()
                .expect("slots")
                .iter()
                .any(|t| t.serial == token.serial),
            "{rv}: the token is still listed"
        );
        sim.control.clear_faults(sim.serial(0)).expect("clear");
    }
}
