//! Crash and resume: `ukey renew` (the real binary, through the ukey-sim PKCS#11 shim
//! over SoftHSM2) is killed with a hard abort at every step boundary and inside
//! writes (`UKEY_FAILPOINT`), or the key is pulled out / fills up mid-write (ukey-sim
//! faults). After each interruption a certificate on the token still works (signs, and
//! its certificate verifies the signature): the old one or the new one, never neither.
//! A new `ukey renew` then finishes the job: renewed, old signing certificate gone, old
//! decryption key archived, no pending objects left.

mod common;

use std::io::Write;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{Output, Stdio};

use serde_json::Value;
use softhsm_fixtures::{KeyAlg, SoftHsm, TokenFixture, TokenSpec, softhsm_module};
use ukey_portal_api::{CreateOrderRequest, InitialState, KeyAlgorithm, KeyPolicy};
use ukey_sim::{Control, Fault};
use ukey_token::{Module, ObjectInfo};

const UKEY: &str = env!("CARGO_BIN_EXE_ukey");

struct Lab {
    hsm: SoftHsm,
    control: Control,
    portal: common::LoopbackPortal,
    data: tempfile::TempDir,
    shim: PathBuf,
    /// The 国密 lab: an SM2 portal CA; tokens are GM keys upgraded RSA → SM2.
    sm2: Option<Sm2Lab>,
}

/// What the 国密 lab adds: the OpenSSL-made SM2 CA the portal issues with, and a
/// configuration giving ukey-sim's TASS profile its SM4 numbers.
struct Sm2Lab {
    ca_cert: PathBuf,
    config: PathBuf,
    /// The issuer Name (DER) of the fixtures' certificates, which orders name.
    issuer_der: Vec<u8>,
    _dir: tempfile::TempDir,
}

impl Lab {
    fn new() -> Lab {
        let hsm = SoftHsm::new().unwrap();
        let portal = common::start_portal(&hsm);
        let control = Control::new(hsm.dir().join("ukey-sim-state")).unwrap();
        // A private copy: the shared target directory's module may be rebuilt (and
        // briefly missing) while this test runs.
        let shim = hsm.dir().join(ukey_sim::module_file_name());
        std::fs::copy(common::shim_module(), &shim).unwrap();
        Lab {
            hsm,
            control,
            portal,
            data: tempfile::tempdir().unwrap(),
            shim,
            sm2: None,
        }
    }

    /// The 国密 lab: the portal's CA is an OpenSSL-made SM2 CA that also accepts the
    /// fixtures' RSA CA; [`Lab::token`] makes GM keys with an RSA → SM2 dual order.
    fn sm2() -> Lab {
        let hsm = SoftHsm::new().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let ssl = softhsm_fixtures::openssl_sm2::OpenSslSm2::new(dir.path());
        ssl.ca("sm2ca", "/C=CN/O=某某数字认证/CN=某某 SM2 CA")
            .unwrap();
        let portal = common::start_portal_with_ca(
            &dir.path().join("sm2ca.pem"),
            &dir.path().join("sm2ca.key"),
            Some(&hsm.ca().unwrap().issuing_cert_pem),
        );
        let control = Control::new(hsm.dir().join("ukey-sim-state")).unwrap();
        let shim = hsm.dir().join(ukey_sim::module_file_name());
        std::fs::copy(common::shim_module(), &shim).unwrap();
        // `look` loads the shim in this process.
        #[allow(unsafe_code)]
        // SAFETY: one test per process (nextest), set before any thread or module.
        unsafe {
            std::env::set_var(ukey_sim::STATE_ENV, control.dir());
        }
        // Any fixture certificate names the fixtures' issuing CA.
        let probe = hsm.create_token(&TokenSpec::ukey("Issuer probe")).unwrap();
        let issuer_der = ukey_renewal::status_request(&probe.certs[0].der)
            .unwrap()
            .issuer_der
            .unwrap();
        let config = hsm.dir().join("gm-config.toml");
        let tass = ukey_sim::gm::profile("tass").unwrap();
        std::fs::write(
            &config,
            format!(
                "[[modules]]\nname = \"GM key\"\npath = \"{}\"\n[modules.sm2]\nname = \"tass-sm4\"\n\
                 ckk_sm2 = {:#x}\nkey_pair_gen = {:#x}\nsign_prehashed = {:#x}\nsm2_decrypt = {:#x}\n\
                 ckk_sm4 = {:#x}\nsm4_ecb = {:#x}\n",
                shim.display(),
                tass.ckk_sm2,
                tass.key_pair_gen,
                tass.sign_prehashed,
                tass.sm2_decrypt.unwrap(),
                tass.ckk_sm4.unwrap(),
                tass.sm4_ecb.unwrap(),
            ),
        )
        .unwrap();
        Lab {
            hsm,
            control,
            portal,
            data: tempfile::tempdir().unwrap(),
            shim,
            sm2: Some(Sm2Lab {
                ca_cert: dir.path().join("sm2ca.pem"),
                config,
                issuer_der,
                _dir: dir,
            }),
        }
    }

    /// A dual-certificate RSA token with a ready new-key order (every sub-step runs);
    /// in the 国密 lab a GM key with an RSA → SM2 order.
    fn token(&self, label: &str) -> TokenFixture {
        let fx = self
            .hsm
            .create_token(&TokenSpec::dual(label, KeyAlg::Rsa2048))
            .unwrap();
        let target = if self.sm2.is_some() {
            self.control.set_gm(&fx.serial, Some("tass")).unwrap();
            KeyAlgorithm::Sm2
        } else {
            KeyAlgorithm::Rsa2048
        };
        self.order(
            &fx.certs[0].serial_hex,
            KeyPolicy::New,
            target,
            Some(&fx.certs[1].serial_hex),
        );
        fx
    }

    /// A ready one-year order for the certificate `serial`; with `old_encryption`, it
    /// also renews that encryption certificate.
    fn order(
        &self,
        serial: &str,
        policy: KeyPolicy,
        target: KeyAlgorithm,
        old_encryption: Option<&str>,
    ) {
        self.portal
            .server
            .portal
            .create_order(&CreateOrderRequest {
                serial_hex: serial.to_owned(),
                // In the 国密 lab the old certificates are the fixtures' CA's, not the
                // portal's own: any fixture certificate names it as its issuer.
                issuer_der: self.sm2.as_ref().map(|l| l.issuer_der.clone()),
                issuer_dn: None,
                years: 1,
                state: InitialState::Ready,
                key_policy: policy,
                with_encryption_cert: old_encryption.is_some(),
                target_algorithm: target,
                old_encryption_serial_hex: old_encryption.map(str::to_owned),
            })
            .unwrap();
    }

    fn renew(&self, fx: &TokenFixture, failpoint: Option<&str>) -> Output {
        self.renew_with(fx, failpoint, &fx.user_pin, &[])
    }

    fn renew_with(
        &self,
        fx: &TokenFixture,
        failpoint: Option<&str>,
        pin: &str,
        extra: &[&str],
    ) -> Output {
        self.renew_as(&fx.serial, failpoint, pin, extra, self.data.path())
    }

    /// `ukey renew --token <token>` as a user whose data directory (journals) is
    /// `data`.
    fn renew_as(
        &self,
        token: &str,
        failpoint: Option<&str>,
        pin: &str,
        extra: &[&str],
        data: &std::path::Path,
    ) -> Output {
        let root = match &self.sm2 {
            Some(l) => l.ca_cert.clone(),
            None => self.hsm.ca().unwrap().root_cert_path.clone(),
        };
        let config = match &self.sm2 {
            Some(l) => l.config.clone(),
            None => self.hsm.dir().join("no-config.toml"),
        };
        let mut cmd = self.hsm.command(UKEY);
        cmd.arg("--module")
            .arg(&self.shim)
            .args([
                "renew",
                "--portal",
                &self.portal.server.url,
                "--token",
                token,
            ])
            .args(["--pin-stdin", "--yes", "--json", "--trust"])
            .arg(&root)
            .args(extra)
            .env_remove("UKEY_PKCS11_MODULE")
            .env_remove("UKEY_FAILPOINT")
            .env("UKEY_CONFIG", config)
            .env("UKEY_DATA_DIR", data)
            .env(ukey_sim::STATE_ENV, self.control.dir())
            .env(ukey_sim::BACKEND_ENV, softhsm_module().unwrap())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(p) = failpoint {
            cmd.env("UKEY_FAILPOINT", p);
        }
        let mut child = cmd.spawn().unwrap();
        // The process may exit before reading the PIN (its output says why).
        let _ = writeln!(child.stdin.take().unwrap(), "{pin}");
        child.wait_with_output().unwrap()
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

/// What is on the token now (read with SoftHSM2 directly, logged in): every object, and
/// the serials of signing certificates whose key pair works (the private key with the
/// certificate's CKA_ID signs, the certificate's public key verifies).
struct Seen {
    objects: Vec<ObjectInfo>,
    working: Vec<String>,
}

fn look(lab: &Lab, fx: &TokenFixture) -> Seen {
    // A GM key's SM2 keys sign only through ukey-sim (SoftHSM2 holds them sealed).
    let module = if lab.sm2.is_some() {
        Module::load(&lab.shim).unwrap()
    } else {
        Module::load(&softhsm_module().unwrap()).unwrap()
    };
    let (objects, working) = common::working_signing_certs(&module, &fx.serial, &fx.user_pin);
    Seen { objects, working }
}

/// Objects a finished renewal must not leave: pending objects, activation markers.
fn leftovers(seen: &Seen) -> Vec<&ObjectInfo> {
    seen.objects
        .iter()
        .filter(|o| {
            o.label.starts_with(ukey_renewal::PENDING_LABEL_PREFIX)
                || o.kind == ukey_token::ObjectKind::Data
        })
        .collect()
}

fn assert_finished(lab: &Lab, fx: &TokenFixture, out: &Output, point: &str) -> Value {
    assert_eq!(
        out.status.code(),
        Some(0),
        "resume after {point}: {}",
        text(out)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["status"], "renewed", "{point}: {v}");
    let new_serial = v["new_serial"].as_str().unwrap().to_owned();
    let seen = look(lab, fx);
    assert_eq!(
        seen.working,
        vec![new_serial.clone()],
        "{point}: only the new certificate works"
    );
    let certs: Vec<String> = seen
        .objects
        .iter()
        .filter(|o| o.kind == ukey_token::ObjectKind::Certificate)
        .map(|o| {
            ukey_token::CertificateDetails::from_der(&hex::decode(&o.value_hex).unwrap())
                .unwrap()
                .serial
        })
        .collect();
    assert!(
        !certs.contains(&fx.certs[0].serial_hex),
        "{point}: old signing certificate left: {certs:?}"
    );
    if lab.sm2.is_some() {
        // The 国密 upgrade: both new certificates are SM2.
        let sm2 = seen
            .objects
            .iter()
            .filter(|o| o.kind == ukey_token::ObjectKind::Certificate)
            .filter_map(|o| {
                ukey_token::CertificateDetails::from_der(&hex::decode(&o.value_hex).unwrap()).ok()
            })
            .filter(|d| d.key_algorithm == "SM2")
            .count();
        assert_eq!(
            sm2, 2,
            "{point}: new SM2 signing and encryption certificates"
        );
    }
    assert!(
        certs.contains(&fx.certs[1].serial_hex),
        "{point}: archived encryption certificate lost"
    );
    let archived = format!("archived {}", fx.certs[1].serial_hex);
    assert_eq!(
        seen.objects
            .iter()
            .filter(|o| o.label.starts_with(&archived))
            .count(),
        3,
        "{point}: archived cert, private and public key: {:?}",
        seen.objects
    );
    assert!(
        !seen
            .objects
            .iter()
            .any(|o| o.label.starts_with(ukey_renewal::PENDING_LABEL_PREFIX)),
        "{point}: pending objects left: {:?}",
        seen.objects
    );
    // Exactly one certificate and key pair under the old CKA_ID.
    let at_old_id = seen
        .objects
        .iter()
        .filter(|o| o.id() == fx.certs[0].key_id)
        .count();
    assert_eq!(at_old_id, 3, "{point}: {:?}", seen.objects);
    v
}

#[test]
fn killed_at_every_step_boundary_then_resumed() {
    killed_at_every_step_boundary_in(Lab::new());
}

/// The 国密 upgrade (RSA dual → SM2 dual, the escrowed key in a GM/T 0009 envelope
/// opened on the key) killed at every step boundary, then resumed.
#[test]
fn sm2_upgrade_killed_at_every_step_boundary_then_resumed() {
    killed_at_every_step_boundary_in(Lab::sm2());
}

fn killed_at_every_step_boundary_in(lab: Lab) {
    let points = common::crash_points();
    let mut covered = 0;
    for (i, point) in points.iter().enumerate() {
        let fx = lab.token(&format!("Crash {i}"));
        let out = lab.renew(&fx, Some(point));
        assert_eq!(
            out.status.signal(),
            Some(6),
            "{point}: expected an abort: {}",
            text(&out)
        );
        let seen = look(&lab, &fx);
        assert!(
            !seen.working.is_empty(),
            "{point}: neither certificate works: {:?}",
            seen.objects
        );
        // Killed again while logging in to resume: the journal must still know where
        // it was (activation begun or not).
        if point.starts_with("activate") || point.starts_with("installed") {
            let out = lab.renew(&fx, Some("login:after"));
            assert_eq!(
                out.status.signal(),
                Some(6),
                "{point} + login: {}",
                text(&out)
            );
            assert!(
                !look(&lab, &fx).working.is_empty(),
                "{point} + login: neither works"
            );
            covered += 1;
        }
        let out = lab.renew(&fx, None);
        let v = assert_finished(&lab, &fx, &out, point);
        assert_eq!(v["resumed"], true, "{point}: {v}");
        covered += 1;
    }
    println!("crash points covered (hard abort, then resumed): {covered}");
    let double = points
        .iter()
        .filter(|p| p.starts_with("activate") || p.starts_with("installed"))
        .count();
    assert_eq!(covered, points.len() + double);
}

fn with_fault(fault: Fault, expect_code: &str, unplug: bool) {
    with_fault_in(Lab::new(), fault, expect_code, unplug);
}

fn with_fault_in(lab: Lab, fault: Fault, expect_code: &str, unplug: bool) {
    let fx = lab.token("Fault");
    let before = look(&lab, &fx).objects;
    lab.control.add_fault(&fx.serial, fault.clone()).unwrap();
    let out = lab.renew(&fx, None);
    assert_eq!(out.status.code(), Some(7), "{fault:?}: {}", text(&out));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["error"]["code"], expect_code, "{v}");
    if unplug {
        lab.control.plug(&fx.serial).unwrap();
    }
    let seen = look(&lab, &fx);
    assert!(
        !seen.working.is_empty(),
        "{fault:?}: neither certificate works"
    );
    if expect_code == "device_memory" {
        // Token full: rolled back, the token is exactly as before.
        assert_eq!(
            seen.objects, before,
            "token changed after CKR_DEVICE_MEMORY"
        );
    }
    lab.control.clear_faults(&fx.serial).unwrap();
    let out = lab.renew(&fx, None);
    assert_finished(&lab, &fx, &out, &format!("{fault:?}"));
    println!("crash point covered: {fault:?}");
}

#[test]
fn token_full_while_writing_rolls_back_cleanly_then_renews() {
    with_fault(
        Fault::fail("C_CreateObject", 1, "CKR_DEVICE_MEMORY"),
        "device_memory",
        false,
    );
}

#[test]
fn key_pulled_out_as_the_certificate_is_written_then_resumed() {
    with_fault(
        Fault::unplug("C_CreateObject", 1).after_call(),
        "token_removed",
        true,
    );
}

#[test]
fn key_pulled_out_while_unwrapping_the_escrowed_key_then_resumed() {
    with_fault(Fault::unplug("C_UnwrapKey", 2), "token_removed", true);
}

#[test]
fn sm2_key_pulled_out_as_the_certificate_is_written_then_resumed() {
    with_fault_in(
        Lab::sm2(),
        Fault::unplug("C_CreateObject", 1).after_call(),
        "token_removed",
        true,
    );
}

/// The first C_UnwrapKey of an SM2 upgrade opens the SM4 key with the signing key, the
/// second the escrowed private key with the SM4 key: pulled out inside each.
#[test]
fn sm2_key_pulled_out_while_opening_the_gm_envelope_then_resumed() {
    with_fault_in(
        Lab::sm2(),
        Fault::unplug("C_UnwrapKey", 1),
        "token_removed",
        true,
    );
    with_fault_in(
        Lab::sm2(),
        Fault::unplug("C_UnwrapKey", 2).after_call(),
        "token_removed",
        true,
    );
}

#[test]
fn sm2_key_pulled_out_while_generating_the_new_key_then_resumed() {
    with_fault_in(
        Lab::sm2(),
        Fault::unplug("C_GenerateKeyPair", 1),
        "token_removed",
        true,
    );
}

#[test]
fn key_pulled_out_during_activation_then_resumed() {
    with_fault(
        Fault::unplug("C_SetAttributeValue", 2).after_call(),
        "token_removed",
        true,
    );
}

#[test]
fn key_pulled_out_while_generating_the_new_key_then_resumed() {
    with_fault(Fault::unplug("C_GenerateKeyPair", 1), "token_removed", true);
}

/// The first C_Sign of a new-key renewal on an RSA key signs the CSR (through rcgen):
/// the token's error must reach the engine as itself, so the renewal is resumable.
#[test]
fn key_pulled_out_while_signing_the_request_then_resumed() {
    with_fault(Fault::unplug("C_Sign", 1), "token_removed", true);
}

#[test]
fn device_error_while_signing_the_request_then_resumed() {
    with_fault(
        Fault::fail("C_Sign", 1, "CKR_DEVICE_ERROR"),
        "device_error",
        false,
    );
}

fn code_of(out: &Output) -> String {
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    v["error"]["code"].as_str().unwrap_or("").to_owned()
}

/// One try left: no PIN is tried without --confirm-final-try (--yes is not enough);
/// with it, the renewal goes on. A locked PIN stops before anything changes.
#[test]
fn final_try_needs_explicit_confirmation_and_locked_stops() {
    let lab = Lab::new();
    let fx = lab.token("Final try");
    lab.control.set_pin_tries(&fx.serial, 1).unwrap();
    let before = look(&lab, &fx).objects;
    // look() logged in with the right PIN: the counter is still clean.
    let out = lab.renew(&fx, None);
    assert_eq!(out.status.code(), Some(6), "{}", text(&out));
    assert_eq!(code_of(&out), "pin_final_try");
    assert!(String::from_utf8_lossy(&out.stderr).contains("--confirm-final-try"));
    assert_eq!(
        lab.control.token(&fx.serial).unwrap().pin.failures,
        0,
        "no PIN was tried"
    );
    assert_eq!(look(&lab, &fx).objects, before);
    let out = lab.renew_with(&fx, None, &fx.user_pin, &["--confirm-final-try"]);
    assert_finished(&lab, &fx, &out, "final try confirmed");

    let fx = lab.token("Locked");
    lab.control.set_pin_tries(&fx.serial, 1).unwrap();
    let out = lab.renew_with(&fx, None, "000000", &["--confirm-final-try"]);
    assert_eq!(out.status.code(), Some(7), "{}", text(&out));
    assert!(
        matches!(code_of(&out).as_str(), "pin_incorrect" | "pin_locked"),
        "{}",
        text(&out)
    );
    assert_eq!(
        lab.control.token(&fx.serial).unwrap().pin.failures,
        1,
        "tried once, never retried"
    );
    let out = lab.renew(&fx, None);
    assert_eq!(out.status.code(), Some(6), "{}", text(&out));
    assert_eq!(code_of(&out), "pin_locked");
    assert_eq!(lab.control.token(&fx.serial).unwrap().pin.failures, 1);
}

/// A token that lacks a mechanism the order needs (here EC key generation, for an
/// RSA → P-256 upgrade) is "user action needed" (exit 6), not a failure: retrying
/// cannot help, the CA can (by mailing a new key). Nothing is tried, nothing changes;
/// with the mechanism shown again, the same order renews.
#[test]
fn missing_mechanism_is_user_action_and_says_to_contact_the_ca() {
    let lab = Lab::new();
    let fx = lab
        .hsm
        .create_token(&TokenSpec::ukey("No EC keygen"))
        .unwrap();
    lab.order(
        &fx.certs[0].serial_hex,
        KeyPolicy::New,
        KeyAlgorithm::EcP256,
        None,
    );
    // CKM_EC_KEY_PAIR_GEN.
    lab.control.hide_mechanism(&fx.serial, 0x1040).unwrap();
    let before = look(&lab, &fx).objects;
    for (lang, contact) in [("en", "Contact your CA"), ("zh-CN", "请联系发证机构")] {
        let out = lab.renew_with(&fx, None, &fx.user_pin, &["--lang", lang]);
        assert_eq!(out.status.code(), Some(6), "{}", text(&out));
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["status"], "action_needed", "{v}");
        assert_eq!(v["error"]["code"], "mechanism_missing", "{v}");
        let message = v["error"]["message"].as_str().unwrap();
        assert!(message.contains(contact), "{message}");
        assert!(message.contains("CKM_EC_KEY_PAIR_GEN"), "{message}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(contact),
            "{}",
            text(&out)
        );
    }
    assert_eq!(
        lab.control.token(&fx.serial).unwrap().pin.failures,
        0,
        "no PIN was tried"
    );
    assert_eq!(look(&lab, &fx).objects, before, "the token is unchanged");

    lab.control.show_all_mechanisms(&fx.serial).unwrap();
    let out = lab.renew(&fx, None);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
}

/// A chip that generates only some key sizes (C_GetMechanismInfo says which): a
/// renewal that needs 2048-bit RSA on a key that offers 1024 only is refused before the
/// PIN, naming what the key offers; with 2048 in its range it renews.
#[test]
fn a_key_that_cannot_make_2048_bit_rsa_is_refused_before_the_pin() {
    let lab = Lab::new();
    let fx = lab.hsm.create_token(&TokenSpec::ukey("Small RSA")).unwrap();
    lab.order(
        &fx.certs[0].serial_hex,
        KeyPolicy::New,
        KeyAlgorithm::Rsa2048,
        None,
    );
    // CKM_RSA_PKCS_KEY_PAIR_GEN.
    lab.control
        .set_key_sizes(&fx.serial, 0x0000, Some((512, 1024)))
        .unwrap();
    let before = look(&lab, &fx).objects;
    let out = lab.renew_with(&fx, None, &fx.user_pin, &["--lang", "en"]);
    assert_eq!(out.status.code(), Some(6), "{}", text(&out));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["error"]["code"], "key_size_unsupported", "{v}");
    let message = v["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("512–1024") && message.contains("2048"),
        "{message}"
    );
    assert_eq!(lab.control.token(&fx.serial).unwrap().pin.failures, 0);
    assert_eq!(look(&lab, &fx).objects, before, "the token is unchanged");

    lab.control
        .set_key_sizes(&fx.serial, 0x0000, Some((1024, 4096)))
        .unwrap();
    let out = lab.renew(&fx, None);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
}

/// The key travels: a renewal stopped between activation sub-steps (the old signing
/// key already removed, the new one still under its pending id: the only working key
/// of that certificate), then another user (another data directory, so no journal of
/// the first) renews another certificate on the same key. Nothing of the first is
/// lost — the activation marker on the token says it is not abandoned — and the first
/// still finishes.
#[test]
fn another_user_renewing_another_certificate_keeps_a_stopped_activation() {
    let lab = Lab::new();
    let mut second = softhsm_fixtures::CertSpec::signing(KeyAlg::EcP256, "李四", 10);
    second.key_id = vec![0x03];
    second.label = "李四 签名".into();
    let fx = lab
        .hsm
        .create_token(&TokenSpec {
            certs: vec![
                softhsm_fixtures::CertSpec::signing(KeyAlg::Rsa2048, "张三", 10),
                second,
            ],
            ..TokenSpec::ukey("Travels")
        })
        .unwrap();
    for cert in &fx.certs {
        lab.order(
            &cert.serial_hex,
            KeyPolicy::New,
            KeyAlgorithm::Rsa2048,
            None,
        );
    }
    let (a, b) = (&fx.certs[0].serial_hex, &fx.certs[1].serial_hex);
    let out = lab.renew_with(&fx, Some("activate.3:before"), &fx.user_pin, &["--cert", a]);
    assert_eq!(out.status.signal(), Some(6), "{}", text(&out));
    let stopped = look(&lab, &fx);
    assert!(!stopped.working.contains(a), "old key of A already removed");
    assert_eq!(
        stopped.working.len(),
        2,
        "A's pending pair and B: {:?}",
        stopped.objects
    );

    let other_user = tempfile::tempdir().unwrap();
    let out = lab.renew_as(
        &fx.serial,
        None,
        &fx.user_pin,
        &["--cert", b],
        other_user.path(),
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let b_new = v["new_serial"].as_str().unwrap().to_owned();
    let seen = look(&lab, &fx);
    assert_eq!(seen.working.len(), 2, "{:?}", seen.objects);
    assert!(seen.working.contains(&b_new));
    let pending_before: Vec<&ObjectInfo> = stopped
        .objects
        .iter()
        .filter(|o| o.label.starts_with(ukey_renewal::PENDING_LABEL_PREFIX))
        .collect();
    assert!(!pending_before.is_empty());
    for o in pending_before {
        assert!(seen.objects.contains(o), "lost {o:?}");
    }

    // The first user finishes A.
    let out = lab.renew_with(&fx, None, &fx.user_pin, &["--cert", a]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let a_new = v["new_serial"].as_str().unwrap().to_owned();
    let done = look(&lab, &fx);
    let mut working = done.working.clone();
    working.sort();
    let mut want = vec![a_new, b_new];
    want.sort();
    assert_eq!(working, want, "{:?}", done.objects);
    assert!(
        leftovers(&done).is_empty(),
        "pending objects or activation marker left: {:?}",
        done.objects
    );
}

/// Crash tests beyond the dual new-key case: a single-certificate key, renewed with a
/// new key and with the same key, killed around writing and at every activation
/// sub-step, then resumed: one certificate works at every moment, and in the end only
/// the new one, under the old CKA_ID, with no pending objects left.
#[test]
fn single_certificate_key_killed_then_resumed_new_key_and_same_key() {
    let lab = Lab::new();
    let points = [
        "write:after",
        "self_test:after",
        "activate.2:before",
        "activate.2:after",
        "activate.3:before",
        "activate.3:after",
        "activate:after",
        "installed:before",
    ];
    let mut n = 0;
    for policy in [KeyPolicy::Same, KeyPolicy::New] {
        for point in points {
            n += 1;
            let fx = lab
                .hsm
                .create_token(&TokenSpec::ukey(&format!("Single {n}")))
                .unwrap();
            lab.order(&fx.certs[0].serial_hex, policy, KeyAlgorithm::Rsa2048, None);
            let out = lab.renew(&fx, Some(point));
            assert_eq!(
                out.status.signal(),
                Some(6),
                "{policy:?} {point}: {}",
                text(&out)
            );
            assert!(
                !look(&lab, &fx).working.is_empty(),
                "{policy:?} {point}: neither certificate works"
            );
            let out = lab.renew(&fx, None);
            assert_eq!(
                out.status.code(),
                Some(0),
                "{policy:?} {point}: {}",
                text(&out)
            );
            let v: Value = serde_json::from_slice(&out.stdout).unwrap();
            let new_serial = v["new_serial"].as_str().unwrap().to_owned();
            let seen = look(&lab, &fx);
            assert_eq!(seen.working, vec![new_serial], "{policy:?} {point}");
            let at_old_id = seen
                .objects
                .iter()
                .filter(|o| o.id() == fx.certs[0].key_id)
                .count();
            assert_eq!(at_old_id, 3, "{policy:?} {point}: {:?}", seen.objects);
            assert!(
                leftovers(&seen).is_empty(),
                "{policy:?} {point}: {:?}",
                seen.objects
            );
        }
    }
}

/// `ukey renew --abandon` before activation puts the key back as it was and closes the
/// journal; once activation has begun it refuses (the renewal can only be finished),
/// and the next `ukey renew` finishes it.
#[test]
fn abandon_before_activation_restores_the_key_and_refuses_after() {
    let lab = Lab::new();
    let fx = lab.token("Abandon");
    let before = look(&lab, &fx).objects;
    let out = lab.renew(&fx, Some("self_test:after"));
    assert_eq!(out.status.signal(), Some(6), "{}", text(&out));
    assert_ne!(
        look(&lab, &fx).objects,
        before,
        "pending objects were written"
    );
    let out = lab.renew_with(&fx, None, &fx.user_pin, &["--abandon"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["status"], "abandoned", "{v}");
    assert_eq!(look(&lab, &fx).objects, before, "the key is as before");
    // Nothing left to abandon.
    let out = lab.renew_with(&fx, None, &fx.user_pin, &["--abandon"]);
    assert_eq!(out.status.code(), Some(6), "{}", text(&out));

    let out = lab.renew(&fx, Some("activate.2:after"));
    assert_eq!(out.status.signal(), Some(6), "{}", text(&out));
    let out = lab.renew_with(&fx, None, &fx.user_pin, &["--abandon"]);
    assert_eq!(out.status.code(), Some(6), "{}", text(&out));
    let out = lab.renew(&fx, None);
    assert_finished(&lab, &fx, &out, "after a refused abandon");
}

/// A module that numbers every key `0000000000000000` (ukey-sim reports it for two
/// keys): `--token` with the serial names neither and lists their ids; a renewal of
/// one, interrupted, is not taken for the other's; each renews by its id.
#[test]
fn two_keys_with_one_serial_are_told_apart() {
    let lab = Lab::new();
    let a = lab.token("Shared A");
    let b = lab.token("Shared B");
    let shared = "0000000000000000";
    for fx in [&a, &b] {
        lab.control
            .set_token_info(
                &fx.serial,
                ukey_sim::TokenInfoOverride {
                    serial_hex: Some(hex::encode(shared)),
                    ..Default::default()
                },
            )
            .unwrap();
    }
    // The list shows both, with ids that carry their slots.
    let out = lab
        .hsm
        .command(UKEY)
        .arg("--module")
        .arg(&lab.shim)
        .args(["list", "--json"])
        .env_remove("UKEY_PKCS11_MODULE")
        .env("UKEY_CONFIG", lab.hsm.dir().join("no-config.toml"))
        .env(ukey_sim::STATE_ENV, lab.control.dir())
        .env(ukey_sim::BACKEND_ENV, softhsm_module().unwrap())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let list: Value = serde_json::from_slice(&out.stdout).unwrap();
    let tokens = list["tokens"].as_array().unwrap();
    assert_eq!(tokens.len(), 2, "{list:#}");
    let id_of = |label: &str| {
        tokens
            .iter()
            .find(|t| t["label"] == label)
            .map(|t| t["id"].as_str().unwrap().to_owned())
            .unwrap()
    };
    let (id_a, id_b) = (id_of("Shared A"), id_of("Shared B"));
    assert!(
        id_a.starts_with("0000000000000000@") && id_a != id_b,
        "{id_a} {id_b}"
    );
    assert!(tokens.iter().all(|t| t["serial"] == shared));

    // The serial alone names neither key.
    let out = lab.renew_as(shared, None, &a.user_pin, &[], lab.data.path());
    assert_ne!(out.status.code(), Some(0), "{}", text(&out));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let message = v["error"]["message"].as_str().unwrap();
    assert!(
        message.contains(&id_a) && message.contains(&id_b),
        "{message}"
    );

    // A's renewal is killed after the new certificate is written.
    let before_b = look(&lab, &b);
    let out = lab.renew_as(
        &id_a,
        Some("write:after"),
        &a.user_pin,
        &[],
        lab.data.path(),
    );
    assert!(out.status.signal().is_some(), "{}", text(&out));
    // B renews on its own: A's journal (same serial) is not taken for B's.
    let out = lab.renew_as(&id_b, None, &b.user_pin, &[], lab.data.path());
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["status"], "renewed", "{v}");
    assert_eq!(v["resumed"], false, "{v}");
    let after_b = look(&lab, &b);
    assert_ne!(
        after_b.working, before_b.working,
        "B's certificate was renewed"
    );
    // A resumes and finishes.
    let out = lab.renew_as(&id_a, None, &a.user_pin, &[], lab.data.path());
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["resumed"], true, "{v}");
}
