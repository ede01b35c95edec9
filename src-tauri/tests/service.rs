//! The key service without a window: a real SoftHSM2 token through ukey-token, the
//! snapshot a window would get, and a token inserted while the service runs.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use softhsm_fixtures::{SoftHsm, TokenSpec, softhsm_module};
use ukey_desktop::service::{Emitter, Service, ServiceConfig};
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
