//! The key service without a window: a real SoftHSM2 token through ukey-token, the
//! snapshot a window would get, and a token inserted while the service runs.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use softhsm_fixtures::{SoftHsm, TokenSpec, softhsm_module};
use ukey_desktop::service::{Emitter, Request, Service, ServiceConfig};
use ukey_desktop::view::{KeyView, Snapshot, StatusView};
use ukey_token::Lang;

#[derive(Default)]
struct Recorder {
    snapshots: Mutex<Vec<Snapshot>>,
    ready: Mutex<Vec<String>>,
}

impl Emitter for Recorder {
    fn snapshot(&self, snapshot: &Snapshot) {
        self.snapshots.lock().expect("lock").push(snapshot.clone());
    }
    fn renewal_ready(&self, _key: &KeyView, cert_serial: &str) {
        self.ready
            .lock()
            .expect("lock")
            .push(cert_serial.to_owned());
    }
}

fn wait_for(
    rec: &Recorder,
    what: &str,
    within: Duration,
    f: impl Fn(&Snapshot) -> bool,
) -> Snapshot {
    let start = Instant::now();
    loop {
        if let Some(s) = rec
            .snapshots
            .lock()
            .expect("lock")
            .iter()
            .rev()
            .find(|s| f(s))
        {
            return s.clone();
        }
        assert!(
            start.elapsed() < within,
            "no snapshot with {what} within {within:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn lists_tokens_and_sees_one_inserted_while_running() {
    let hsm = SoftHsm::new().expect("softhsm");
    let first = hsm
        .create_token(&TokenSpec::ukey("UKey-One"))
        .expect("token");
    let rec = Arc::new(Recorder::default());
    let service = Service::start(
        ServiceConfig {
            module: Some(softhsm_module().expect("module")),
            portal: None,
            portal_url: None,
            data_dir: None,
            lang: Lang::ZhCn,
        },
        rec.clone(),
    );

    let snap = wait_for(&rec, "the first token", Duration::from_secs(10), |s| {
        s.keys.len() == 1
    });
    assert!(snap.module.error.is_none(), "{:?}", snap.module);
    let key = &snap.keys[0];
    assert_eq!(key.serial, first.serial);
    let cert = &key.certificates[0];
    assert_eq!(cert.holder.as_deref(), Some("张三"));
    assert_eq!(cert.organisation.as_deref(), Some("某某建设工程有限公司"));
    assert_eq!(
        cert.serial.as_deref(),
        Some(first.certs[0].serial_hex.as_str())
    );
    assert!(
        matches!(cert.days_left, Some(9..=10)),
        "{:?}",
        cert.days_left
    );
    assert_eq!(cert.algorithm.as_deref(), Some("RSA-2048"));
    // No portal configured: nothing to ask, nobody notified.
    let settled = wait_for(&rec, "the status settled", Duration::from_secs(5), |s| {
        s.keys
            .first()
            .is_some_and(|k| k.certificates[0].status == StatusView::Unknown)
    });
    assert!(!settled.portal_configured);
    assert_eq!(service.snapshot().keys.len(), 1);

    // Another token appears while the service holds the module (another process made it).
    let inserted = Instant::now();
    let second = hsm
        .create_token_in_child(&TokenSpec::ukey("UKey-Two"))
        .expect("second token");
    let snap = wait_for(&rec, "the second token", Duration::from_secs(10), |s| {
        s.keys.len() == 2
    });
    assert!(snap.keys.iter().any(|k| k.serial == second.serial));
    eprintln!(
        "second token listed {:?} after it was created",
        inserted.elapsed()
    );
    assert!(rec.ready.lock().expect("lock").is_empty());
}

#[test]
fn a_missing_module_is_shown_not_fatal() {
    let rec = Arc::new(Recorder::default());
    let _service = Service::start(
        ServiceConfig {
            module: Some("/nonexistent/libnope.so".into()),
            portal: None,
            portal_url: None,
            data_dir: None,
            lang: Lang::En,
        },
        rec.clone(),
    );
    let snap = wait_for(&rec, "the module error", Duration::from_secs(5), |s| {
        s.module.error.is_some()
    });
    let err = snap.module.error.expect("error");
    assert!(
        err.code == "module_not_found" || err.code == "module_invalid",
        "{err:?}"
    );
    assert!(snap.keys.is_empty());
}

/// The service on the ukey-sim module (keys that report hot-plug as USB keys do), with
/// a recorder for what it emits.
fn start_on_sim() -> (Service, Arc<Recorder>) {
    let rec = Arc::new(Recorder::default());
    let service = Service::start(
        ServiceConfig {
            module: Some(ukey_sim::module_path().expect("libukey_sim.so")),
            portal: None,
            portal_url: None,
            data_dir: None,
            lang: Lang::En,
        },
        rec.clone(),
    );
    (service, rec)
}

#[test]
fn a_renewal_that_hangs_delays_no_insert_and_no_second_renewal_starts() {
    // Keys behind ukey-sim, which reports hot-plug as a USB key does; the second one
    // starts unplugged.
    let hsm = SoftHsm::new().expect("softhsm");
    let first = hsm
        .create_token(&TokenSpec::ukey("UKey-One"))
        .expect("token");
    let second = hsm
        .create_token(&TokenSpec::ukey("UKey-Two"))
        .expect("second token");
    hsm.activate();
    let sim = ukey_sim::Control::new(ukey_sim::default_state_dir()).expect("ukey-sim state");
    sim.unplug(&second.serial).expect("unplug");
    let (service, rec) = start_on_sim();
    wait_for(&rec, "the first token", Duration::from_secs(10), |s| {
        s.keys.len() == 1
    });

    // A renewal whose portal never answers: it holds the module (with a session open on
    // the key) until the test lets it go.
    let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
    let (started_tx, started_rx) = std::sync::mpsc::channel::<()>();
    let (reply_tx, reply_rx) = std::sync::mpsc::channel();
    let serial = first.serial.clone();
    service
        .send(Request::Renew {
            token_id: first.serial.clone(),
            cert_serial: first.certs[0].serial_hex.clone(),
            job: Box::new(move |module| {
                let token = module
                    .tokens()
                    .expect("tokens")
                    .into_iter()
                    .find(|t| t.serial == serial)
                    .expect("the key");
                let session = module.open_session(&token).expect("session");
                started_tx.send(()).expect("started");
                // Waits far longer than the test waits for the insert below.
                let _ = release_rx.recv_timeout(Duration::from_secs(60));
                // The session survived the watcher's polls meanwhile.
                session.find_objects(&[]).expect("session still open");
                Err(ukey_desktop::error::IpcError::new(
                    "portal_timeout",
                    "no answer",
                ))
            }),
            reply: reply_tx,
        })
        .expect("send");
    started_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("the renewal started");

    // A second renewal on the same key is refused at once.
    let (again_tx, again_rx) = std::sync::mpsc::channel();
    service
        .send(Request::Renew {
            token_id: first.serial.clone(),
            cert_serial: first.certs[0].serial_hex.clone(),
            job: Box::new(|_| panic!("a second renewal must not start")),
            reply: again_tx,
        })
        .expect("send");
    let again = again_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("an answer");
    assert_eq!(again.expect_err("refused").code, "renewal_running");

    // Meanwhile another key is plugged in and is listed.
    sim.plug(&second.serial).expect("plug");
    let snap = wait_for(&rec, "the second token", Duration::from_secs(20), |s| {
        s.keys.len() == 2
    });
    assert!(snap.keys.iter().any(|k| k.serial == second.serial));
    assert!(
        reply_rx.try_recv().is_err(),
        "the renewal is still running while the insert was shown"
    );

    release_tx.send(()).expect("release");
    let outcome = reply_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("the renewal's answer");
    assert_eq!(outcome.expect_err("failed").code, "portal_timeout");
}

#[test]
fn two_keys_whose_module_gives_one_serial_are_two_keys() {
    let hsm = SoftHsm::new().expect("softhsm");
    let a = hsm.create_token(&TokenSpec::ukey("A")).expect("token");
    let b = hsm.create_token(&TokenSpec::ukey("B")).expect("token");
    hsm.activate();
    let sim = ukey_sim::Control::new(ukey_sim::default_state_dir()).expect("ukey-sim state");
    for fx in [&a, &b] {
        sim.set_token_info(
            &fx.serial,
            ukey_sim::TokenInfoOverride {
                serial_hex: Some("30303030303030303030303030303030".into()),
                ..Default::default()
            },
        )
        .expect("override");
    }
    let (_service, rec) = start_on_sim();
    let snap = wait_for(&rec, "both keys", Duration::from_secs(10), |s| {
        s.keys.len() == 2
    });
    assert!(snap.keys.iter().all(|k| k.serial == "0000000000000000"));
    assert_ne!(snap.keys[0].id, snap.keys[1].id);
    assert!(
        snap.keys
            .iter()
            .all(|k| k.id.starts_with("0000000000000000@"))
    );
    // One leaves: the other stays listed under the same id.
    let stays = snap
        .keys
        .iter()
        .find(|k| k.label == "A")
        .expect("A")
        .id
        .clone();
    sim.unplug(&b.serial).expect("unplug");
    let snap = wait_for(&rec, "one key", Duration::from_secs(10), |s| {
        s.keys.len() == 1
    });
    assert_eq!(snap.keys[0].id, stays);
}
