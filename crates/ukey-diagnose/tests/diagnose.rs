//! The diagnosis against SoftHSM2 fixture tokens and, for what SoftHSM2 cannot do (PIN
//! lockout, pulling the key, a missing mechanism), the ukey-sim shim over them; portals
//! on real loopback sockets. Each test is its own process under nextest: a PKCS#11
//! module is initialised once per process.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use secrecy::SecretString;
use softhsm_fixtures::{CertSpec, KeyAlg, SoftHsm, TokenFixture, TokenSpec};
use ukey_diagnose::{Options, Report, SectionKind, Status, TrustAnchor, Verdict, diagnose};
use ukey_portal_api::KeyPolicy;
use ukey_renewal::journal::{HistoryEntry, ObjectNames, OldObjects, StepState};
use ukey_renewal::{Journal, JournalStore, Outcome, Step};
use ukey_renewal::{KeyId, PendingId};
use ukey_sim::{Control, Fault};

/// A fixture installation and the options to diagnose it directly through SoftHSM2.
struct Setup {
    hsm: SoftHsm,
    tokens: Vec<TokenFixture>,
    journal: tempfile::TempDir,
}

fn setup(specs: &[TokenSpec]) -> Setup {
    let hsm = SoftHsm::new().expect("SoftHSM2 installation");
    let tokens = specs
        .iter()
        .map(|s| hsm.create_token(s).expect("fixture token"))
        .collect();
    hsm.activate();
    Setup {
        hsm,
        tokens,
        journal: tempfile::tempdir().expect("temp dir"),
    }
}

impl Setup {
    fn options(&self) -> Options {
        let mut o = Options::new("test");
        o.module = Some(self.hsm.module_path().to_owned());
        o.journal_dir = Some(self.journal.path().join("journal"));
        o
    }

    fn anchors(&self) -> Vec<TrustAnchor> {
        let ca = self.hsm.ca().expect("test CA");
        let mut a = TrustAnchor::load(&ca.root_cert_path).expect("root");
        a.extend(TrustAnchor::load(&ca.issuing_cert_path).expect("issuing"));
        a
    }

    /// Switches to ukey-sim over the same tokens: returns its control.
    fn sim(&self) -> (Control, PathBuf) {
        let dir = self.hsm.dir().join("ukey-sim-state");
        set_env(ukey_sim::STATE_ENV, &dir);
        let control = Control::new(&dir).expect("state dir");
        let module = ukey_sim::module_path().expect("libukey_sim.so built with the tests");
        (control, module)
    }

    fn serial(&self) -> &str {
        &self.tokens[0].serial
    }
}

#[allow(unsafe_code)]
fn set_env(key: &str, value: &Path) {
    // SAFETY: nextest runs each test in its own process, and this runs before the test
    // loads a module or starts a thread: nothing reads the environment concurrently.
    unsafe { std::env::set_var(key, value) };
}

fn pin(p: &str) -> SecretString {
    SecretString::from(p.to_owned())
}

fn token_section<'r>(r: &'r Report, serial: &str) -> &'r ukey_diagnose::Section {
    r.section(&format!("token:{serial}"))
        .unwrap_or_else(|| panic!("no token section in {r:#?}"))
}

fn certs(r: &Report) -> Vec<&ukey_diagnose::Section> {
    r.sections_of(SectionKind::Certificate).collect()
}

fn status_of(s: &ukey_diagnose::Section, id: &str) -> Status {
    s.check(id)
        .unwrap_or_else(|| panic!("no check {id} in {s:#?}"))
        .status
}

#[test]
fn healthy_key_passes_everything_including_chain_and_self_test() {
    let spec = TokenSpec {
        certs: vec![CertSpec::signing(KeyAlg::Rsa2048, "张三", 200)],
        ..TokenSpec::ukey("张三的UKey")
    };
    let s = setup(&[spec]);
    let mut o = s.options();
    o.trust_anchors = s.anchors();
    o.pin = Some(pin("123456"));
    let r = diagnose(&o);

    let env = r.section("environment").unwrap();
    assert_eq!(status_of(env, "environment.module"), Status::Pass);
    let module = env.check("environment.module").unwrap();
    assert_eq!(module.facts.get("manufacturer").unwrap(), "SoftHSM");
    let t = token_section(&r, s.serial());
    assert_eq!(t.verdict, Some(Verdict::Ok), "{t:#?}");
    assert_eq!(status_of(t, "token.pin"), Status::Pass);
    assert_eq!(status_of(t, "token.mechanisms"), Status::Pass);
    assert_eq!(status_of(t, "token.read"), Status::Pass);
    assert_eq!(status_of(t, "token.self_test"), Status::Pass, "{t:#?}");
    let c = certs(&r);
    assert_eq!(c.len(), 1);
    assert_eq!(c[0].verdict, Some(Verdict::Ok), "{:#?}", c[0]);
    assert_eq!(
        status_of(c[0], "certificate.chain"),
        Status::Pass,
        "{:#?}",
        c[0]
    );
    assert_eq!(status_of(c[0], "certificate.self_test"), Status::Pass);
    // Logged in: the key's presence is definite.
    let key = c[0].check("certificate.key").unwrap();
    assert_eq!(key.facts.get("key_evidence").unwrap(), "private_key");
    let v = c[0].check("certificate.validity").unwrap();
    assert_eq!(
        v.facts.get("serial").unwrap(),
        s.tokens[0].certs[0].serial_hex.as_str()
    );
    assert_eq!(v.facts.get("days_left").unwrap(), 200);
    assert_eq!(v.facts.get("key_algorithm").unwrap(), "RSA-2048");
    assert!(r.sections_of(SectionKind::OrphanKey).next().is_none());
    assert_eq!(r.section("journal").unwrap().checks[0].status, Status::Pass);
    // Nothing failed (the environment may warn about other drivers on this machine).
    assert_eq!(r.counts.fail, 0, "{r:#?}");
}

#[test]
fn ec_key_self_test_and_untrusted_chain() {
    let spec = TokenSpec {
        certs: vec![CertSpec::signing(KeyAlg::EcP256, "李四", 100)],
        ..TokenSpec::ukey("UKey-EC")
    };
    let s = setup(&[spec]);
    let mut o = s.options();
    o.pin = Some(pin("123456"));
    // Trust only an unrelated CA: the chain must fail.
    let other = SoftHsm::new().unwrap();
    o.trust_anchors = TrustAnchor::load(&other.ca().unwrap().root_cert_path).unwrap();
    let r = diagnose(&o);
    let c = certs(&r);
    assert_eq!(
        status_of(c[0], "certificate.self_test"),
        Status::Pass,
        "{:#?}",
        c[0]
    );
    assert_eq!(status_of(c[0], "certificate.chain"), Status::Fail);
    assert_eq!(c[0].verdict, Some(Verdict::Untrusted));
}

#[test]
fn expiring_certificate_says_in_how_many_days() {
    let s = setup(&[TokenSpec::ukey("UKey")]);
    let r = diagnose(&s.options());
    let c = certs(&r);
    assert_eq!(c[0].verdict, Some(Verdict::Expiring));
    assert_eq!(status_of(c[0], "certificate.validity"), Status::Warn);
    assert_eq!(c[0].summary.as_ref().unwrap().en, "expiring in 10 days");
    assert_eq!(c[0].summary.as_ref().unwrap().zh_cn, "10 天后过期");
    // No trust anchors given: the chain is skipped, not failed.
    assert_eq!(status_of(c[0], "certificate.chain"), Status::Skip);
    assert_eq!(r.overall, Status::Warn.max(r.overall));
}

#[test]
fn expired_certificate_fails() {
    let spec = TokenSpec {
        certs: vec![CertSpec::signing(KeyAlg::Rsa2048, "张三", -5)],
        ..TokenSpec::ukey("UKey")
    };
    let s = setup(&[spec]);
    let r = diagnose(&s.options());
    let c = certs(&r);
    assert_eq!(c[0].verdict, Some(Verdict::Expired));
    assert_eq!(status_of(c[0], "certificate.validity"), Status::Fail);
    assert_eq!(r.overall, Status::Fail);
}

#[test]
fn orphan_key_gets_its_own_verdict() {
    let mut spec = TokenSpec::ukey("UKey");
    spec.certs[0].days_left = 300;
    spec.certs.push(CertSpec {
        with_cert: false,
        key_id: vec![0x09],
        label: "leftover".into(),
        ..CertSpec::signing(KeyAlg::Rsa2048, "张三", 300)
    });
    let s = setup(&[spec]);
    let r = diagnose(&s.options());
    let keys: Vec<_> = r.sections_of(SectionKind::OrphanKey).collect();
    assert_eq!(keys.len(), 1, "{r:#?}");
    assert_eq!(keys[0].verdict, Some(Verdict::Orphan));
    assert_eq!(keys[0].checks[0].facts.get("key_id").unwrap(), "09");
    assert_eq!(certs(&r)[0].verdict, Some(Verdict::Ok));
}

#[test]
fn orphan_certificate_is_suspected_without_pin_and_proven_with_it() {
    let mut spec = TokenSpec::ukey("UKey");
    spec.certs[0].days_left = 300;
    spec.certs.push(CertSpec {
        with_key: false,
        key_id: vec![0x07],
        label: "孤立证书".into(),
        ..CertSpec::signing(KeyAlg::EcP256, "李四", 300)
    });
    let s = setup(&[spec]);
    let find = |r: &Report| {
        certs(r)
            .into_iter()
            .find(|c| c.title.en.contains("李四"))
            .cloned()
            .expect("the orphan certificate's section")
    };
    let r = diagnose(&s.options());
    let c = find(&r);
    assert_eq!(c.verdict, Some(Verdict::KeyUnknown), "{c:#?}");
    assert_eq!(status_of(&c, "certificate.key"), Status::Warn);

    let mut o = s.options();
    o.pin = Some(pin("123456"));
    let r = diagnose(&o);
    let c = find(&r);
    assert_eq!(c.verdict, Some(Verdict::Orphan), "{c:#?}");
    assert_eq!(status_of(&c, "certificate.key"), Status::Fail);
    // The paired one is fine.
    let ok = certs(&r)
        .into_iter()
        .find(|c| c.title.en.contains("张三"))
        .unwrap();
    assert_eq!(ok.verdict, Some(Verdict::Ok));
}

#[test]
fn corrupt_certificate_object() {
    let mut spec = TokenSpec::ukey("UKey");
    spec.certs[0].corrupt_cert = true;
    let s = setup(&[spec]);
    let r = diagnose(&s.options());
    let c = certs(&r);
    assert_eq!(c[0].verdict, Some(Verdict::Corrupt));
    assert_eq!(status_of(c[0], "certificate.parse"), Status::Fail);
}

/// Sets the simulated PIN failure count (6 tries by default).
fn set_failures(control: &Control, serial: &str, failures: u32) {
    control
        .update(serial, |t| t.pin.failures = failures)
        .expect("set PIN failures");
}

fn failures(control: &Control, serial: &str) -> u32 {
    control.token(serial).unwrap().pin.failures
}

#[test]
fn pin_count_low_warns_and_a_wrong_pin_is_tried_once_only() {
    let s = setup(&[TokenSpec::ukey("UKey")]);
    let (control, module) = s.sim();
    set_failures(&control, s.serial(), 1);
    let mut o = s.options();
    o.module = Some(module);
    o.pin = Some(pin("000000"));
    let r = diagnose(&o);
    let t = token_section(&r, s.serial());
    assert_eq!(t.verdict, Some(Verdict::PinCountLow), "{t:#?}");
    let p = t.check("token.pin").unwrap();
    assert_eq!(p.status, Status::Warn);
    assert!(
        p.reason.en.contains("wrong PIN was entered"),
        "{}",
        p.reason.en
    );
    // The wrong PIN was tried exactly once.
    assert_eq!(status_of(t, "token.self_test"), Status::Fail);
    assert!(
        t.check("token.self_test")
            .unwrap()
            .reason
            .en
            .contains("did not retry")
    );
    assert_eq!(failures(&control, s.serial()), 2);
    let env = r.section("environment").unwrap();
    assert_eq!(
        env.check("environment.module")
            .unwrap()
            .facts
            .get("manufacturer")
            .unwrap(),
        "ukey-sim"
    );
}

#[test]
fn final_try_is_not_tried_even_with_a_pin() {
    let s = setup(&[TokenSpec::ukey("UKey")]);
    let (control, module) = s.sim();
    set_failures(&control, s.serial(), 5);
    let mut o = s.options();
    o.module = Some(module);
    o.pin = Some(pin("000000"));
    let r = diagnose(&o);
    let t = token_section(&r, s.serial());
    assert_eq!(t.verdict, Some(Verdict::PinFinalTry), "{t:#?}");
    assert_eq!(status_of(t, "token.pin"), Status::Warn);
    assert_eq!(status_of(t, "token.self_test"), Status::Skip);
    // Not one login: the counter did not move and the key is not locked.
    assert_eq!(failures(&control, s.serial()), 5);
}

#[test]
fn locked_pin_says_contact_the_ca() {
    let s = setup(&[TokenSpec::ukey("UKey")]);
    let (control, module) = s.sim();
    set_failures(&control, s.serial(), 6);
    let mut o = s.options();
    o.module = Some(module);
    o.pin = Some(pin("123456"));
    let r = diagnose(&o);
    let t = token_section(&r, s.serial());
    assert_eq!(t.verdict, Some(Verdict::PinLocked), "{t:#?}");
    let p = t.check("token.pin").unwrap();
    assert_eq!(p.status, Status::Fail);
    let action = p.action.as_ref().unwrap();
    assert!(action.en.contains("contact the CA") || action.en.contains("Contact the CA"));
    assert!(action.en.contains("do not try again"), "{}", action.en);
    assert!(action.zh_cn.contains("不要再尝试"), "{}", action.zh_cn);
    assert_eq!(status_of(t, "token.self_test"), Status::Skip);
    assert_eq!(failures(&control, s.serial()), 6);
}

#[test]
fn missing_mechanism_fails_the_token() {
    let s = setup(&[TokenSpec::ukey("UKey")]);
    let (control, module) = s.sim();
    // CKM_RSA_PKCS_KEY_PAIR_GEN = 0x0000: this key cannot make a new RSA key.
    control.hide_mechanism(s.serial(), 0x0000).unwrap();
    let mut o = s.options();
    o.module = Some(module);
    let r = diagnose(&o);
    let t = token_section(&r, s.serial());
    assert_eq!(t.verdict, Some(Verdict::MissingMechanism), "{t:#?}");
    let m = t.check("token.mechanisms").unwrap();
    assert_eq!(m.status, Status::Fail);
    let missing = m.facts.get("missing").unwrap().as_array().unwrap();
    assert_eq!(missing.len(), 1, "{missing:?}");
    assert!(
        missing[0]
            .as_str()
            .unwrap()
            .contains("CKM_RSA_PKCS_KEY_PAIR_GEN")
    );
}

#[test]
fn token_pulled_during_the_diagnosis() {
    let s = setup(&[TokenSpec::ukey("UKey")]);
    let (control, module) = s.sim();
    control
        .add_fault(s.serial(), Fault::unplug("C_FindObjectsInit", 1))
        .unwrap();
    let mut o = s.options();
    o.module = Some(module);
    let r = diagnose(&o);
    let t = token_section(&r, s.serial());
    assert_eq!(t.verdict, Some(Verdict::Removed), "{t:#?}");
    let read = t.check("token.read").unwrap();
    assert_eq!(read.status, Status::Fail);
    assert!(read.reason.en.contains("removed"), "{}", read.reason.en);
    // Nothing half-read is reported as a certificate.
    assert!(certs(&r).is_empty());
}

#[test]
fn unreachable_portal_fails_reach_and_skips_clock() {
    let s = setup(&[TokenSpec::ukey("UKey")]);
    // A port nobody listens on: bind, note, close.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut o = s.options();
    o.portal = Some(format!("http://127.0.0.1:{port}"));
    let r = diagnose(&o);
    let p = r.section("portal").unwrap();
    assert_eq!(status_of(p, "portal.reach"), Status::Fail, "{p:#?}");
    assert_eq!(status_of(p, "portal.clock"), Status::Skip);
}

/// A one-thread HTTP server answering every request with `Date: date` and 404.
fn date_server(date: String) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut line = String::new();
            let mut length = 0usize;
            loop {
                line.clear();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    length = v.trim().parse().unwrap_or(0);
                }
            }
            let mut body = vec![0; length];
            let _ = std::io::Read::read_exact(&mut reader, &mut body);
            let text = r#"{"code":"not_found","message":"no such route"}"#;
            let mut stream = stream;
            let _ = write!(
                stream,
                "HTTP/1.1 404 Not Found\r\nDate: {date}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{text}",
                text.len()
            );
        }
    });
    url
}

#[test]
fn skewed_clock_against_the_portal_date_fails() {
    let s = setup(&[TokenSpec::ukey("UKey")]);
    let an_hour_ago = SystemTime::now() - Duration::from_secs(3600);
    let url = date_server(httpdate::fmt_http_date(an_hour_ago));
    let mut o = s.options();
    o.portal = Some(url);
    let r = diagnose(&o);
    let p = r.section("portal").unwrap();
    assert_eq!(status_of(p, "portal.reach"), Status::Pass, "{p:#?}");
    let clock = p.check("portal.clock").unwrap();
    assert_eq!(clock.status, Status::Fail, "{clock:#?}");
    let skew = clock.facts.get("skew_seconds").unwrap().as_i64().unwrap();
    assert!((3595..=3605).contains(&skew), "{skew}");
    assert!(clock.reason.en.contains("ahead"), "{}", clock.reason.en);
    // The status lookup got a 404 from this portal: a warning, not a crash.
    assert_eq!(status_of(p, "portal.status"), Status::Warn);

    // And a portal whose clock agrees passes.
    let url = date_server(httpdate::fmt_http_date(SystemTime::now()));
    o.portal = Some(url);
    let r = diagnose(&o);
    assert_eq!(
        status_of(r.section("portal").unwrap(), "portal.clock"),
        Status::Pass
    );
}

/// A journal as the renewal engine writes it, stopped at `step`.
fn journal(s: &Setup, step: Step, outcome: Outcome) -> Journal {
    let cert = &s.tokens[0].certs[0];
    let names = |id: &[u8]| ObjectNames {
        pending_id: PendingId::new("00aa", "sig"),
        pending_label: "pending".into(),
        final_id: KeyId::new(id.to_vec()).unwrap(),
        final_label: "张三 签名".into(),
    };
    let now = time::OffsetDateTime::now_utc();
    Journal {
        version: ukey_renewal::journal::JOURNAL_VERSION,
        renewal_id: "00aa".into(),
        token_serial: s.serial().to_owned(),
        token_label: s.tokens[0].label.clone(),
        order_id: "order-1".into(),
        key_policy: KeyPolicy::New,
        new_alg: ukey_token::KeyAlg::Rsa2048,
        with_encryption: false,
        old: OldObjects {
            serial: cert.serial_hex.clone(),
            cert_der_hex: hex::encode(&cert.der),
            id: KeyId::new(cert.key_id.clone()).unwrap(),
            label: cert.label.clone(),
            alg: ukey_token::KeyAlg::Rsa2048,
        },
        old_encryption: None,
        signing: names(&cert.key_id),
        encryption: None,
        archive: None,
        issued: None,
        step,
        state: StepState::Started,
        activate_done: 0,
        outcome,
        history: vec![HistoryEntry {
            step,
            state: StepState::Started,
            at: now,
        }],
        cmp: None,
    }
}

#[test]
fn unfinished_journal_is_reported_with_its_step() {
    let s = setup(&[TokenSpec::ukey("UKey")]);
    let store = JournalStore::new(s.journal.path());
    store
        .save(&journal(&s, Step::Write, Outcome::Unfinished))
        .unwrap();
    let r = diagnose(&s.options());
    let j = r.section("journal").unwrap();
    assert_eq!(j.checks.len(), 1, "{j:#?}");
    let c = &j.checks[0];
    assert_eq!(c.status, Status::Warn);
    assert_eq!(c.facts.get("step").unwrap(), "write");
    assert_eq!(
        c.facts.get("certificate_serial").unwrap(),
        s.tokens[0].certs[0].serial_hex.as_str()
    );
    assert!(c.reason.en.contains("\"write\""), "{}", c.reason.en);
    assert!(c.reason.zh_cn.contains("write"), "{}", c.reason.zh_cn);

    // Completed: nothing to report.
    store
        .save(&journal(&s, Step::Installed, Outcome::Completed))
        .unwrap();
    let r = diagnose(&s.options());
    let j = r.section("journal").unwrap();
    assert_eq!(j.checks.len(), 1, "{j:#?}");
    assert_eq!(j.checks[0].status, Status::Pass);
}

#[test]
fn redacted_report_has_no_name_or_id_number() {
    let id = "11010519491231002X";
    let spec = TokenSpec {
        certs: vec![CertSpec::signing(
            KeyAlg::Rsa2048,
            &format!("张三{id}"),
            100,
        )],
        ..TokenSpec::ukey("张三的UKey")
    };
    let s = setup(&[spec]);
    let r = diagnose(&s.options());
    let full = serde_json::to_string(&r).unwrap();
    assert!(full.contains("张三") && full.contains(id));
    let red = serde_json::to_string(&r.redacted()).unwrap();
    assert!(!red.contains("张三"), "{red}");
    assert!(!red.contains(id), "{red}");
    assert!(!red.contains("11010519491231002"), "{red}");
    // The company name and the serial stay: support needs them.
    assert!(red.contains("某某建设工程有限公司"));
    assert!(red.contains(&s.tokens[0].certs[0].serial_hex));
    assert!(red.contains("\"redacted\":true"));
}

#[test]
fn no_module_is_a_failing_check_not_an_error() {
    let mut o = Options::new("test");
    o.module = Some(PathBuf::from("/nonexistent/libvendor.so"));
    let r = diagnose(&o);
    let env = r.section("environment").unwrap();
    assert_eq!(status_of(env, "environment.module"), Status::Fail);
    assert_eq!(r.overall, Status::Fail);
    assert!(r.sections_of(SectionKind::Token).next().is_none());
}

/// The reference portal on loopback, with the fixtures' issuing CA imported.
struct PortalServer {
    server: ukey_portal::RunningServer,
    _rt: tokio::runtime::Runtime,
    _dir: tempfile::TempDir,
}

fn reference_portal(hsm: &SoftHsm) -> PortalServer {
    reference_portal_tls(hsm, None)
}

/// A CA and a server certificate for 127.0.0.1 signed by it, as PEM files in `dir`:
/// (CA certificate path, TLS files).
fn tls_files(dir: &Path) -> (PathBuf, ukey_portal::TlsFiles) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "Portal TLS Test CA");
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate().unwrap();
    let params =
        CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()]).unwrap();
    let cert = params.signed_by(&key, &issuer).unwrap();
    let ca_path = dir.join("tls-ca.pem");
    std::fs::write(&ca_path, ca_cert.pem()).unwrap();
    let files = ukey_portal::TlsFiles {
        cert: dir.join("tls-cert.pem"),
        key: dir.join("tls-key.pem"),
    };
    std::fs::write(&files.cert, cert.pem()).unwrap();
    std::fs::write(&files.key, key.serialize_pem()).unwrap();
    (ca_path, files)
}

fn reference_portal_tls(hsm: &SoftHsm, tls: Option<ukey_portal::TlsFiles>) -> PortalServer {
    let ca = hsm.ca().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut config = ukey_portal::PortalConfig::new(dir.path().join("data"));
    config.ca_import = Some((ca.issuing_cert_path.clone(), ca.issuing_key_path.clone()));
    let portal = std::sync::Arc::new(ukey_portal::Portal::open(&config).unwrap());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let server = rt
        .block_on(ukey_portal::start(
            portal,
            "127.0.0.1:0".parse().unwrap(),
            tls,
            None,
        ))
        .unwrap();
    PortalServer {
        server,
        _rt: rt,
        _dir: dir,
    }
}

#[test]
fn reference_portal_gives_renewal_status_and_completes_the_chain() {
    let spec = TokenSpec {
        certs: vec![CertSpec::signing(KeyAlg::Rsa2048, "张三", 20)],
        ..TokenSpec::ukey("UKey")
    };
    let s = setup(&[spec]);
    let p = reference_portal(&s.hsm);
    let order = p
        .server
        .portal
        .create_order(&ukey_portal_api::CreateOrderRequest {
            serial_hex: s.tokens[0].certs[0].serial_hex.clone(),
            issuer_der: None,
            issuer_dn: None,
            years: 1,
            state: ukey_portal_api::InitialState::AwaitingPayment,
            key_policy: KeyPolicy::New,
            with_encryption_cert: false,
            target_algorithm: ukey_portal_api::KeyAlgorithm::Rsa2048,
            old_encryption_serial_hex: None,
        })
        .unwrap();
    let mut o = s.options();
    o.portal = Some(p.server.url.clone());
    // Only the root is trusted: the portal's issuing CA completes the chain.
    let ca = s.hsm.ca().unwrap();
    o.trust_anchors = TrustAnchor::load(&ca.root_cert_path).unwrap();
    let r = diagnose(&o);
    let portal = r.section("portal").unwrap();
    assert_eq!(
        status_of(portal, "portal.reach"),
        Status::Pass,
        "{portal:#?}"
    );
    assert_eq!(status_of(portal, "portal.tls"), Status::Skip);
    assert_eq!(status_of(portal, "portal.clock"), Status::Pass);
    let st = portal.check("portal.status").unwrap();
    assert_eq!(st.status, Status::Warn, "{st:#?}");
    assert_eq!(st.facts.get("state").unwrap(), "awaiting_payment");
    assert!(
        st.action.as_ref().unwrap().en.contains("/pay"),
        "{:?}",
        st.action
    );
    let c = certs(&r);
    assert_eq!(
        status_of(c[0], "certificate.chain"),
        Status::Pass,
        "{:#?}",
        c[0]
    );

    p.server.portal.pay(&order.order_id).unwrap();
    let r = diagnose(&o);
    let st = r
        .section("portal")
        .unwrap()
        .check("portal.status")
        .unwrap()
        .clone();
    assert_eq!(st.status, Status::Pass, "{st:#?}");
    assert_eq!(st.facts.get("state").unwrap(), "ready");
}

/// Every file of the token directory, with its bytes.
fn token_files(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(token_files(&p));
        } else {
            out.push((p.clone(), std::fs::read(&p).unwrap()));
        }
    }
    out.sort();
    out
}

fn changed_files(before: &[(PathBuf, Vec<u8>)], after: &[(PathBuf, Vec<u8>)]) -> Vec<String> {
    assert_eq!(before.len(), after.len(), "files added or removed");
    after
        .iter()
        .filter(|(p, bytes)| !before.iter().any(|(q, b)| q == p && b == bytes))
        .map(|(p, _)| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect()
}

#[test]
fn the_diagnosis_never_writes_to_the_token() {
    let mut spec = TokenSpec::dual("UKey", KeyAlg::EcP256);
    spec.certs.push(CertSpec {
        with_cert: false,
        key_id: vec![0x09],
        label: "leftover".into(),
        ..CertSpec::signing(KeyAlg::Rsa2048, "张三", 300)
    });
    let s = setup(&[spec]);
    let before = token_files(s.hsm.token_dir());
    assert!(before.len() > 4);

    // Without a PIN, not one byte of the token directory changes.
    let mut o = s.options();
    o.trust_anchors = s.anchors();
    let r = diagnose(&o);
    assert_eq!(r.sections_of(SectionKind::Certificate).count(), 2);
    let after = token_files(s.hsm.token_dir());
    assert!(changed_files(&before, &after).is_empty());

    // With the PIN, SoftHSM2 itself rewrites its token.object at C_Login (its PIN
    // bookkeeping); every key and certificate object stays byte for byte the same.
    o.pin = Some(pin("123456"));
    let r = diagnose(&o);
    assert_eq!(
        status_of(token_section(&r, s.serial()), "token.self_test"),
        Status::Pass
    );
    let after = token_files(s.hsm.token_dir());
    let changed = changed_files(&before, &after);
    assert!(
        changed.iter().all(|f| f == "token.object"),
        "changed: {changed:?}"
    );
}

#[test]
fn with_several_tokens_the_pin_is_used_only_on_the_named_one() {
    let s = setup(&[TokenSpec::ukey("UKey-A"), TokenSpec::ukey("UKey-B")]);
    let (a, b) = (s.tokens[0].serial.clone(), s.tokens[1].serial.clone());
    let mut o = s.options();
    o.pin = Some(pin("123456"));
    let r = diagnose(&o);
    for serial in [&a, &b] {
        let t = token_section(&r, serial);
        assert_eq!(status_of(t, "token.self_test"), Status::Skip, "{t:#?}");
    }
    o.pin_token = Some(b.clone());
    let r = diagnose(&o);
    assert_eq!(
        status_of(token_section(&r, &a), "token.self_test"),
        Status::Skip
    );
    assert_eq!(
        status_of(token_section(&r, &b), "token.self_test"),
        Status::Pass
    );
}

#[test]
fn https_portal_tls_fails_without_its_ca_and_passes_with_it() {
    let s = setup(&[TokenSpec::ukey("UKey")]);
    let (ca, files) = tls_files(s.hsm.dir());
    let p = reference_portal_tls(&s.hsm, Some(files));
    assert!(p.server.url.starts_with("https://"), "{}", p.server.url);
    let mut o = s.options();
    o.portal = Some(p.server.url.clone());
    let r = diagnose(&o);
    let portal = r.section("portal").unwrap();
    let tls = portal.check("portal.tls").unwrap();
    assert_eq!(tls.status, Status::Fail, "{portal:#?}");
    assert_eq!(status_of(portal, "portal.clock"), Status::Skip);

    o.trust_anchors = TrustAnchor::load(&ca).unwrap();
    let r = diagnose(&o);
    let portal = r.section("portal").unwrap();
    assert_eq!(status_of(portal, "portal.tls"), Status::Pass, "{portal:#?}");
    assert_eq!(status_of(portal, "portal.clock"), Status::Pass);
    assert_eq!(
        status_of(portal, "portal.status"),
        Status::Pass,
        "{portal:#?}"
    );
}
