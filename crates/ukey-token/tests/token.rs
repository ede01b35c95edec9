//! ukey-token against SoftHSM2 tokens built by softhsm-fixtures, through the real
//! PKCS#11 path. Each test runs in its own process under nextest: the module is
//! initialised once per process, after `SoftHsm::create_token` has finalised it.

use std::path::Path;
use std::time::Duration;

use secrecy::SecretString;
use softhsm_fixtures::{CertSpec, KeyAlg, SoftHsm, TokenSpec};
use ukey_token::{Error, KeyEvidence, Lang, Module, TokenEvent, Usage, WatchMode, Watcher};

fn module(hsm: &SoftHsm) -> Module {
    hsm.activate();
    Module::load(hsm.module_path()).expect("load SoftHSM2")
}

#[test]
fn lists_a_ukey_with_chinese_subject_and_paired_key() {
    let hsm = SoftHsm::new().unwrap();
    let fx = hsm.create_token(&TokenSpec::ukey("张三的UKey")).unwrap();
    let m = module(&hsm);

    let listings = m.list().unwrap();
    assert_eq!(listings.len(), 1, "{listings:#?}");
    let l = &listings[0];
    assert!(l.errors.is_empty(), "{:?}", l.errors);
    assert_eq!(l.token.label, "张三的UKey");
    assert_eq!(l.token.serial, fx.serial);
    assert!(l.token.pin.initialized);
    assert!(!l.token.pin.locked);
    assert_eq!(l.certificates.len(), 1);

    let c = &l.certificates[0];
    let d = c.details.as_ref().unwrap();
    let expected = &fx.certs[0];
    assert_eq!(d.serial, expected.serial_hex);
    assert_eq!(d.subject_cn.as_deref(), Some("张三"));
    assert_eq!(d.subject_o.as_deref(), Some("某某建设工程有限公司"));
    assert!(d.subject.contains("CN=张三"), "{}", d.subject);
    assert!(
        d.subject.contains("O=某某建设工程有限公司"),
        "{}",
        d.subject
    );
    assert!(!d.subject.contains("\\x"), "escaped: {}", d.subject);
    assert_ne!(d.issuer, d.subject);
    assert_eq!(d.key_algorithm, "RSA-2048");
    assert_eq!(d.usage, Usage::Signing);
    assert_eq!(d.not_after, expected.not_after);
    assert_eq!(d.days_left(time::OffsetDateTime::now_utc()), 10);
    assert_eq!(c.key_id, expected.key_id);
    assert_eq!(c.label, expected.label);
    // Without login only the public key is visible: inferred pairing.
    assert_eq!(c.key, KeyEvidence::PublicKey);
    assert_eq!(c.key.has_private_key(), Some(true));
    assert!(l.orphan_keys.is_empty(), "{:?}", l.orphan_keys);
}

#[test]
fn login_makes_pairing_definite_and_wrong_pin_is_typed() {
    let hsm = SoftHsm::new().unwrap();
    let mut spec = TokenSpec::ukey("UKey-A");
    spec.certs.push(CertSpec {
        with_key: false,
        key_id: vec![0x07],
        label: "孤立证书".into(),
        ..CertSpec::signing(KeyAlg::EcP256, "李四", 30)
    });
    let fx = hsm.create_token(&spec).unwrap();
    let m = module(&hsm);
    let token = m.tokens().unwrap().remove(0);

    let wrong = SecretString::from("000000".to_owned());
    let l = m.list_token(&token, Some(&wrong));
    assert_eq!(l.errors.len(), 1);
    let e = &l.errors[0];
    assert!(matches!(e, Error::PinIncorrect { .. }), "{e:?}");
    assert_eq!(e.call().unwrap().function, "C_Login");
    assert_eq!(e.call().unwrap().rv_name, "CKR_PIN_INCORRECT");
    assert!(e.user_message(Lang::ZhCn).contains("UKey-A"));
    // SoftHSM2 sets COUNT_LOW after a wrong PIN.
    assert!(m.refresh(&token).unwrap().pin.count_low);

    let pin = SecretString::from(fx.user_pin.clone());
    let l = m.list_token(&token, Some(&pin));
    assert!(l.errors.is_empty(), "{:?}", l.errors);
    assert!(l.private_objects_visible);
    let by_id = |id: u8| l.certificates.iter().find(|c| c.key_id == [id]).unwrap();
    assert_eq!(by_id(0x01).key, KeyEvidence::PrivateKey);
    assert_eq!(by_id(0x07).key, KeyEvidence::Absent);
    assert_eq!(by_id(0x07).key.has_private_key(), Some(false));

    // Without login the orphan certificate cannot be told apart from a hidden key.
    let l = m.list_token(&token, None);
    assert_eq!(by_id_of(&l, 0x07).key, KeyEvidence::Unknown);
}

fn by_id_of(l: &ukey_token::TokenListing, id: u8) -> &ukey_token::CertificateEntry {
    l.certificates.iter().find(|c| c.key_id == [id]).unwrap()
}

#[test]
fn dual_certificate_key_lists_signing_and_encryption() {
    let hsm = SoftHsm::new().unwrap();
    let rsa = hsm
        .create_token(&TokenSpec::dual("双证书RSA", KeyAlg::Rsa2048))
        .unwrap();
    let ec = hsm
        .create_token(&TokenSpec::dual("双证书EC", KeyAlg::EcP256))
        .unwrap();
    let m = module(&hsm);
    let listings = m.list().unwrap();
    assert_eq!(listings.len(), 2);
    for (fx, alg) in [(&rsa, "RSA-2048"), (&ec, "EC-P256")] {
        let l = listings
            .iter()
            .find(|l| l.token.serial == fx.serial)
            .unwrap();
        assert_eq!(l.certificates.len(), 2);
        for cf in &fx.certs {
            let c = by_id_of(l, cf.key_id[0]);
            let d = c.details.as_ref().unwrap();
            assert_eq!(d.serial, cf.serial_hex, "serial of {}", cf.label);
            assert_eq!(d.key_algorithm, alg);
            let usage = match cf.usage {
                softhsm_fixtures::CertUsage::Signing => Usage::Signing,
                softhsm_fixtures::CertUsage::Encryption => Usage::Encryption,
            };
            assert_eq!(d.usage, usage);
            assert_eq!(c.key.has_private_key(), Some(true));
        }
    }
}

#[test]
fn expired_certificate_has_negative_days_left() {
    let hsm = SoftHsm::new().unwrap();
    let mut spec = TokenSpec::ukey("过期");
    spec.certs = vec![CertSpec::signing(KeyAlg::Rsa2048, "王五", -3)];
    hsm.create_token(&spec).unwrap();
    let m = module(&hsm);
    let l = m.list().unwrap().remove(0);
    let d = l.certificates[0].details.as_ref().unwrap();
    let now = time::OffsetDateTime::now_utc();
    assert!(d.is_expired(now));
    assert_eq!(d.days_left(now), -3);
}

#[test]
fn corrupt_certificate_and_orphan_key_do_not_hide_the_rest() {
    let hsm = SoftHsm::new().unwrap();
    let mut spec = TokenSpec::ukey("坏证书");
    spec.certs.push(CertSpec {
        corrupt_cert: true,
        key_id: vec![0x05],
        label: "corrupt".into(),
        ..CertSpec::signing(KeyAlg::Rsa2048, "坏", 10)
    });
    spec.certs.push(CertSpec {
        with_cert: false,
        key_id: vec![0x09],
        label: "孤立密钥".into(),
        ..CertSpec::encryption(KeyAlg::EcP256, "无证书", 10)
    });
    let good = hsm.create_token(&TokenSpec::ukey("好的")).unwrap();
    hsm.create_token(&spec).unwrap();
    let m = module(&hsm);
    let listings = m.list().unwrap();
    assert_eq!(listings.len(), 2);

    let bad = listings.iter().find(|l| l.token.label == "坏证书").unwrap();
    assert_eq!(bad.certificates.len(), 2, "{:?}", bad.certificates);
    let corrupt = by_id_of(bad, 0x05);
    let e = corrupt.details.as_ref().unwrap_err();
    assert_eq!(e.code(), "certificate_malformed");
    assert!(e.user_message(Lang::En).contains("corrupt"));
    assert!(by_id_of(bad, 0x01).details.is_ok());
    assert_eq!(bad.orphan_keys.len(), 1, "{:?}", bad.orphan_keys);
    assert_eq!(bad.orphan_keys[0].key_id, "09");
    assert_eq!(bad.orphan_keys[0].label, "孤立密钥");
    assert_eq!(bad.orphan_keys[0].key_type, "EC");

    let ok = listings
        .iter()
        .find(|l| l.token.serial == good.serial)
        .unwrap();
    assert!(ok.errors.is_empty());
    assert_eq!(
        ok.certificates[0].details.as_ref().unwrap().serial,
        good.certs[0].serial_hex
    );
}

#[test]
fn several_tokens_each_listed() {
    let hsm = SoftHsm::new().unwrap();
    let serials: Vec<String> = (0..3)
        .map(|i| {
            hsm.create_token(&TokenSpec::ukey(&format!("UKey-{i}")))
                .unwrap()
                .serial
        })
        .collect();
    let m = module(&hsm);
    let tokens = m.tokens().unwrap();
    let mut seen: Vec<String> = tokens.iter().map(|t| t.serial.clone()).collect();
    seen.sort();
    let mut want = serials.clone();
    want.sort();
    assert_eq!(seen, want);
}

#[test]
fn token_deleted_between_calls_is_reported_as_removed() {
    let hsm = SoftHsm::new().unwrap();
    let a = hsm.create_token(&TokenSpec::ukey("stays")).unwrap();
    let b = hsm.create_token(&TokenSpec::ukey("goes")).unwrap();
    let m = module(&hsm);
    let tokens = m.tokens().unwrap();
    let gone = tokens
        .iter()
        .find(|t| t.serial == b.serial)
        .unwrap()
        .clone();

    // Another process deletes the token; our slot still says "present".
    let status = hsm
        .command("softhsm2-util")
        .args(["--delete-token", "--serial", &b.serial])
        .output()
        .unwrap();
    assert!(status.status.success(), "{status:?}");

    let l = m.list_token(&gone, None);
    assert!(
        !l.errors.is_empty(),
        "listing a deleted token must fail: {l:?}"
    );
    assert_eq!(l.errors[0].code(), "token_removed", "{:?}", l.errors[0]);
    assert!(l.errors[0].user_message(Lang::En).contains("goes"));

    let stays = tokens.iter().find(|t| t.serial == a.serial).unwrap();
    let l = m.list_token(stays, None);
    assert!(l.errors.is_empty(), "{:?}", l.errors);
    assert_eq!(l.certificates.len(), 1);
}

/// Another process (softhsm2-util) initialises a free slot's token labelled `label`.
fn init_token_elsewhere(hsm: &SoftHsm, label: &str) {
    let out = hsm
        .command("softhsm2-util")
        .args(["--init-token", "--free", "--label", label])
        .args(["--pin", "123456", "--so-pin", "12345678"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
}

#[test]
fn watcher_sees_a_token_appear_and_disappear() {
    let hsm = SoftHsm::new().unwrap();
    let first = hsm.create_token(&TokenSpec::ukey("already here")).unwrap();
    let m = module(&hsm);
    let mut w = Watcher::new(m, WatchMode::Auto);
    assert_eq!(w.mode(), WatchMode::Reinitialize);

    let ev = w.poll().unwrap();
    assert!(
        matches!(&ev[..], [TokenEvent::Inserted { token }] if token.serial == first.serial),
        "{ev:?}"
    );
    assert!(w.poll().unwrap().is_empty());

    // Another process creates a token: SoftHSM2 shows it only after re-initialising.
    init_token_elsewhere(&hsm, "新插入");
    let ev = w
        .wait(Duration::from_millis(50), Duration::from_secs(10))
        .unwrap();
    let new_serial = match &ev[..] {
        [TokenEvent::Inserted { token }] if token.label == "新插入" => token.serial.clone(),
        other => panic!("expected one insertion, got {other:?}"),
    };
    // Between polls the module is usable: list the new token.
    assert_eq!(w.module().tokens().unwrap().len(), 2);

    let out = hsm
        .command("softhsm2-util")
        .args(["--delete-token", "--serial", &new_serial])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let ev = w
        .wait(Duration::from_millis(50), Duration::from_secs(10))
        .unwrap();
    assert!(
        matches!(&ev[..], [TokenEvent::Removed { serial, label, .. }] if *serial == new_serial && label == "新插入"),
        "{ev:?}"
    );
    assert_eq!(w.tokens().len(), 1);
    assert_eq!(w.tokens()[0].serial, first.serial);
}

#[test]
fn a_session_on_another_thread_survives_the_watchers_polls() {
    use ukey_token::cryptoki::mechanism::Mechanism;
    let hsm = SoftHsm::new().unwrap();
    let fx = hsm.create_token(&TokenSpec::ukey("busy")).unwrap();
    let mut w = Watcher::new(module(&hsm), WatchMode::Reinitialize);
    assert_eq!(w.poll().unwrap().len(), 1);

    // A renewal on another thread holds the module with a logged-in session while the
    // watcher keeps polling: the re-scan (C_Finalize) waits, the session lives on.
    let shared = w.shared_module();
    let pin = fx.user_pin.clone();
    let key_id = fx.certs[0].key_id.clone();
    let (logged_in, polled) = (std::sync::mpsc::channel(), std::sync::mpsc::channel::<()>());
    let worker = std::thread::spawn(move || {
        let token = shared.tokens().unwrap().remove(0);
        let s = shared.open_session(&token).unwrap();
        s.login(&SecretString::from(pin)).unwrap();
        logged_in.0.send(()).unwrap();
        polled.1.recv().unwrap();
        let key = s
            .find_private_key(&key_id)
            .unwrap()
            .expect("still logged in");
        s.sign(&Mechanism::Sha256RsaPkcs, key, b"after the polls")
            .unwrap()
    });
    logged_in.1.recv().unwrap();
    for _ in 0..5 {
        assert!(w.poll().unwrap().is_empty(), "the token stays listed");
    }
    polled.0.send(()).unwrap();
    assert_eq!(worker.join().expect("worker").len(), 256);

    // Once the other handle is gone, re-scans happen again: a token made by another
    // process appears.
    init_token_elsewhere(&hsm, "later");
    let ev = w
        .wait(Duration::from_millis(50), Duration::from_secs(10))
        .unwrap();
    assert!(
        matches!(&ev[..], [TokenEvent::Inserted { token }] if token.label == "later"),
        "{ev:?}"
    );
}

#[test]
fn a_gbk_object_label_is_shown_decoded() {
    use ukey_token::cryptoki::object::{Attribute, ObjectClass};
    let hsm = SoftHsm::new().unwrap();
    let fx = hsm.create_token(&TokenSpec::ukey("gbk")).unwrap();
    let m = module(&hsm);
    let token = m.tokens().unwrap().remove(0);
    {
        let s = m.open_rw_session(&token).unwrap();
        s.login(&SecretString::from(fx.user_pin.clone())).unwrap();
        let cert = s
            .find_objects(&[Attribute::Class(ObjectClass::CERTIFICATE)])
            .unwrap()[0];
        // 张三 签名 in GBK, as a vendor's tool writes it.
        let gbk = vec![0xD5, 0xC5, 0xC8, 0xFD, b' ', 0xC7, 0xA9, 0xC3, 0xFB];
        s.cryptoki()
            .update_attributes(cert, &[Attribute::Label(gbk)])
            .unwrap();
    }
    let l = m.list_token(&token, None);
    assert!(l.errors.is_empty(), "{:?}", l.errors);
    assert_eq!(l.certificates[0].label, "张三 签名");
}

#[test]
fn session_signs_with_the_token_key() {
    use ukey_token::cryptoki::mechanism::Mechanism;
    let hsm = SoftHsm::new().unwrap();
    let fx = hsm.create_token(&TokenSpec::ukey("sign")).unwrap();
    let m = module(&hsm);
    let token = m.tokens().unwrap().remove(0);
    let s = m.open_session(&token).unwrap();
    assert!(s.find_private_key(&fx.certs[0].key_id).unwrap().is_none());
    s.login(&SecretString::from(fx.user_pin.clone())).unwrap();
    let key = s.find_private_key(&fx.certs[0].key_id).unwrap().unwrap();
    assert!(
        s.mechanisms()
            .unwrap()
            .contains(&ukey_token::cryptoki::mechanism::MechanismType::SHA256_RSA_PKCS)
    );
    let sig = s
        .sign(&Mechanism::Sha256RsaPkcs, key, b"challenge")
        .unwrap();
    assert_eq!(sig.len(), 256);
}

#[test]
fn a_file_that_is_not_a_pkcs11_library_is_rejected_with_its_path() {
    let dir = tempfile::tempdir().unwrap();
    let text = dir.path().join("not-a-module.so");
    std::fs::write(&text, "this is not a shared object").unwrap();
    let e = Module::load(&text).unwrap_err();
    assert_eq!(e.code(), "module_invalid", "{e:?}");
    assert!(e.to_string().contains("not-a-module.so"), "{e}");

    // A real shared library without C_GetFunctionList.
    let libz = [
        "/usr/lib/x86_64-linux-gnu/libz.so.1",
        "/lib/x86_64-linux-gnu/libz.so.1",
        "/usr/lib64/libz.so.1",
    ]
    .into_iter()
    .map(Path::new)
    .find(|p| p.exists());
    if let Some(libz) = libz {
        let e = Module::load(libz).unwrap_err();
        assert!(
            matches!(&e, Error::ModuleInvalid { reason, .. } if reason.contains("C_GetFunctionList")),
            "{e:?}"
        );
        assert!(
            e.user_message(Lang::ZhCn)
                .contains("不是可用的 PKCS#11 驱动模块")
        );
    }

    let e = Module::load(&dir.path().join("missing.so")).unwrap_err();
    assert_eq!(e.code(), "module_not_found");
    assert!(e.to_string().contains("missing.so"));
}

/// OpenSC's module, as discovery finds it (OpenSC is a test dependency: `cargo xtask
/// setup` installs it).
fn opensc_module() -> std::path::PathBuf {
    ukey_token::discover_all(&ukey_token::Config::default())
        .into_iter()
        .find(|m| m.name == "OpenSC")
        .expect("OpenSC's PKCS#11 module is installed (apt install opensc)")
        .path
}

/// A configuration listing OpenSC first, then SoftHSM2 (after an entry that is no
/// library at all), as a machine with OpenSC and a vendor driver would be.
fn opensc_then_softhsm(hsm: &SoftHsm) -> ukey_token::Config {
    let bogus = hsm.dir().join("libnot-a-module.so");
    std::fs::write(&bogus, b"not a shared object").unwrap();
    let entry = |name: &str, path: &Path| ukey_token::ModuleEntry::new(name, path);
    ukey_token::Config {
        modules: vec![
            entry("Broken driver", &bogus),
            entry("OpenSC", &opensc_module()),
            entry("SoftHSM2", hsm.module_path()),
        ],
        ..ukey_token::Config::default()
    }
}

/// Without a configured module, discovery prefers the module that has a token over the
/// first one found (OpenSC, with no reader here), skipping one that does not load; the
/// probe is finalised, so the real load initialises the module afresh and lists the key.
#[test]
fn discovery_prefers_the_module_with_a_token() {
    let hsm = SoftHsm::new().unwrap();
    let fx = hsm
        .create_token(&TokenSpec::ukey("Found by discovery"))
        .unwrap();
    hsm.activate();
    let config = opensc_then_softhsm(&hsm);
    let found = ukey_token::discover_all(&config);
    assert_eq!(found[0].name, "Broken driver", "{found:?}");
    assert_eq!(found[1].name, "OpenSC", "{found:?}");

    let path = ukey_token::resolve_module_path(None, &config).unwrap();
    assert_eq!(path, hsm.module_path());
    let m = Module::load(&path).unwrap();
    let tokens = m.tokens().unwrap();
    assert_eq!(tokens.len(), 1);
    assert_eq!(tokens[0].serial, fx.serial);
    // A second resolution while this process holds the module: it is looked at but
    // not finalised, so the session below still works.
    assert_eq!(
        ukey_token::resolve_module_path(None, &config).unwrap(),
        hsm.module_path()
    );
    let s = m.open_session(&tokens[0]).unwrap();
    s.login(&SecretString::from(fx.user_pin.clone())).unwrap();
    assert!(!s.snapshot().unwrap().is_empty());

    // An explicit choice is never second-guessed.
    let explicit = ukey_token::Config {
        pkcs11_module: Some(opensc_module()),
        ..config
    };
    assert_eq!(
        ukey_token::resolve_module_path(None, &explicit).unwrap(),
        opensc_module()
    );
}

/// No module has a token: the first that loads (OpenSC), not the broken one before it.
#[test]
fn discovery_without_any_token_falls_back_to_the_first_module_that_loads() {
    let hsm = SoftHsm::new().unwrap();
    hsm.activate();
    let config = opensc_then_softhsm(&hsm);
    assert_eq!(
        ukey_token::resolve_module_path(None, &config).unwrap(),
        opensc_module()
    );
}

/// A library another user in this process initialised is never finalised under it by a
/// re-scan: that user's session keeps working.
#[test]
fn reinitialize_leaves_a_library_another_user_started() {
    let hsm = SoftHsm::new().unwrap();
    let fx = hsm.create_token(&TokenSpec::ukey("Shared")).unwrap();
    hsm.activate();
    let path = softhsm_fixtures::softhsm_module().unwrap();
    let other = cryptoki::context::Pkcs11::new(&path).unwrap();
    other
        .initialize(cryptoki::context::CInitializeArgs::new(
            cryptoki::context::CInitializeFlags::OS_LOCKING_OK,
        ))
        .unwrap();
    let slot = other
        .get_slots_with_token()
        .unwrap()
        .into_iter()
        .find(|s| {
            other
                .get_token_info(*s)
                .map(|t| t.serial_number().trim() == fx.serial)
                .unwrap_or(false)
        })
        .unwrap();
    let session = other.open_ro_session(slot).unwrap();
    let mut module = Module::load(&path).unwrap();
    module.reinitialize().unwrap();
    assert_eq!(module.tokens().unwrap().len(), 1);
    session
        .get_session_info()
        .expect("the other user's session survives the re-scan");
    drop(module);
    session
        .get_session_info()
        .expect("and dropping the shared module does not end it either");
}
