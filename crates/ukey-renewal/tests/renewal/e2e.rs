//! End-to-end: SoftHSM2 + the reference portal on loopback; afterwards pkcs11-tool and
//! openssl (not our code) confirm the result.

use secrecy::SecretString;
use softhsm_fixtures::{KeyAlg as FxAlg, TokenSpec};
use ukey_portal_api::{KeyAlgorithm, KeyPolicy};
use ukey_renewal::{Event, Outcome, Report, Step, preflight, renew};

use super::common::*;

struct Case {
    spec: TokenSpec,
    policy: KeyPolicy,
    target: KeyAlgorithm,
    with_enc: bool,
}

fn renew_one(env: &Env, token_index: usize) -> Report {
    let module = env.module();
    let fx = &env.tokens[token_index];
    let token = summary(&module, &fx.serial);
    let client = env.client();
    let opts = env.options();
    let plan = preflight(&module, &token, None, &client, &opts).unwrap();
    let mut events = Vec::new();
    let report = renew(
        &module,
        plan,
        &SecretString::from(fx.user_pin.clone()),
        &client,
        &opts,
        &mut |e| events.push(e),
    )
    .unwrap();
    // Every step ran, in order, and the journal is closed.
    let started: Vec<Step> = events
        .iter()
        .filter_map(|e| match e {
            Event::StepStarted { step } => Some(*step),
            _ => None,
        })
        .collect();
    assert_eq!(
        started,
        vec![
            Step::Login,
            Step::Key,
            Step::Request,
            Step::Verify,
            Step::Write,
            Step::SelfTest,
            Step::Activate,
            Step::Installed
        ]
    );
    let j = opts
        .journals
        .load(&fx.serial, &fx.certs[0].serial_hex)
        .unwrap()
        .unwrap();
    assert_eq!(j.outcome, Outcome::Completed);
    report
}

/// What pkcs11-tool and openssl see after a renewal.
fn confirm_externally(env: &Env, token_index: usize, report: &Report, new_alg: FxAlg) {
    let fx = &env.tokens[token_index];
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let id = hex::encode(&fx.certs[0].key_id);
    let pin = fx.user_pin.as_str();
    let ca = env.hsm.ca().unwrap();

    // The new certificate is on the token under the old CKA_ID, and chains to the CA.
    let cert_path = d.join("new.der");
    p11(
        &env.hsm,
        &fx.label,
        pin,
        &[
            "--read-object",
            "--type",
            "cert",
            "--id",
            &id,
            "-o",
            cert_path.to_str().unwrap(),
        ],
    );
    let serial = openssl(
        d,
        &[
            "x509", "-inform", "DER", "-in", "new.der", "-noout", "-serial",
        ],
    );
    assert_eq!(serial.trim(), format!("serial={}", report.new_serial));
    openssl(
        d,
        &[
            "x509", "-inform", "DER", "-in", "new.der", "-out", "new.pem",
        ],
    );
    let verify = openssl(
        d,
        &[
            "verify",
            "-CAfile",
            ca.root_cert_path.to_str().unwrap(),
            "-untrusted",
            ca.issuing_cert_path.to_str().unwrap(),
            "new.pem",
        ],
    );
    assert!(verify.contains("new.pem: OK"), "{verify}");
    let subject = openssl(
        d,
        &[
            "x509", "-in", "new.pem", "-noout", "-subject", "-nameopt", "utf8",
        ],
    );
    assert!(subject.contains("张三"), "{subject}");

    // Its key pair is on the token: the private key with that id signs, and the
    // certificate's public key verifies the signature.
    openssl(
        d,
        &[
            "x509", "-in", "new.pem", "-noout", "-pubkey", "-out", "pub.pem",
        ],
    );
    std::fs::write(d.join("data"), b"bid document 2026").unwrap();
    match new_alg {
        FxAlg::Rsa2048 => {
            p11(
                &env.hsm,
                &fx.label,
                pin,
                &[
                    "--sign",
                    "--id",
                    &id,
                    "-m",
                    "SHA256-RSA-PKCS",
                    "-i",
                    d.join("data").to_str().unwrap(),
                    "-o",
                    d.join("sig").to_str().unwrap(),
                ],
            );
            let v = openssl(
                d,
                &[
                    "dgst",
                    "-sha256",
                    "-verify",
                    "pub.pem",
                    "-signature",
                    "sig",
                    "data",
                ],
            );
            assert!(v.contains("Verified OK"), "{v}");
        }
        FxAlg::EcP256 => {
            openssl(d, &["dgst", "-sha256", "-binary", "-out", "hash", "data"]);
            p11(
                &env.hsm,
                &fx.label,
                pin,
                &[
                    "--sign",
                    "--id",
                    &id,
                    "-m",
                    "ECDSA",
                    "--signature-format",
                    "openssl",
                    "-i",
                    d.join("hash").to_str().unwrap(),
                    "-o",
                    d.join("sig").to_str().unwrap(),
                ],
            );
            let v = openssl(
                d,
                &[
                    "pkeyutl", "-verify", "-pubin", "-inkey", "pub.pem", "-in", "hash", "-sigfile",
                    "sig",
                ],
            );
            assert!(v.contains("Signature Verified Successfully"), "{v}");
        }
    }

    // The old signing certificate is gone.
    let listing = p11(
        &env.hsm,
        &fx.label,
        pin,
        &["--list-objects", "--type", "cert"],
    );
    let old_serial = fx.certs[0].serial_hex.to_ascii_lowercase();
    assert!(
        !listing
            .to_ascii_lowercase()
            .contains(&format!("serial:     {old_serial}")),
        "{listing}"
    );
    assert!(
        listing.contains(&format!("serial:     {}", report.new_serial)),
        "{listing}"
    );
}

/// A new signing key only signs (pkcs11-tool reads its usage flags), and the escrowed
/// encryption key came to a transport key that is gone: nothing on the token carries
/// its label.
fn new_signing_key_only_signs(env: &Env, token_index: usize) {
    let fx = &env.tokens[token_index];
    let id = hex::encode(&fx.certs[0].key_id);
    let keys = p11(
        &env.hsm,
        &fx.label,
        &fx.user_pin,
        &["--list-objects", "--type", "privkey"],
    );
    // One block per object; the one with the signing certificate's id.
    let usage: Vec<&str> = keys
        .split("Private Key Object")
        .filter(|block| {
            block
                .lines()
                .any(|l| l.trim().strip_prefix("ID:").map(str::trim) == Some(id.as_str()))
        })
        .flat_map(|block| {
            block
                .lines()
                .filter_map(|l| l.trim().strip_prefix("Usage:"))
        })
        .map(str::trim)
        .collect();
    assert_eq!(usage, ["sign"], "{keys}");
    let all = p11(&env.hsm, &fx.label, &fx.user_pin, &["--list-objects"]);
    assert!(!all.contains("transport"), "{all}");
}

fn archived_key_still_decrypts(env: &Env, token_index: usize) {
    let fx = &env.tokens[token_index];
    let old_enc = &fx.certs[1];
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("old.pem"), old_enc.pem()).unwrap();
    openssl(
        d,
        &[
            "x509",
            "-in",
            "old.pem",
            "-noout",
            "-pubkey",
            "-out",
            "oldpub.pem",
        ],
    );
    std::fs::write(d.join("secret"), "投标文件密钥 bid key".as_bytes()).unwrap();
    openssl(
        d,
        &[
            "pkeyutl",
            "-encrypt",
            "-pubin",
            "-inkey",
            "oldpub.pem",
            "-pkeyopt",
            "rsa_padding_mode:oaep",
            "-in",
            "secret",
            "-out",
            "ct",
        ],
    );
    let archived_id = hex::encode(format!("archived {}", old_enc.serial_hex));
    p11(
        &env.hsm,
        &fx.label,
        &fx.user_pin,
        &[
            "--decrypt",
            "--id",
            &archived_id,
            "-m",
            "RSA-PKCS-OAEP",
            "--hash-algorithm",
            "SHA-1",
            "--mgf",
            "MGF1-SHA1",
            "-i",
            d.join("ct").to_str().unwrap(),
            "-o",
            d.join("plain").to_str().unwrap(),
        ],
    );
    assert_eq!(
        std::fs::read(d.join("plain")).unwrap(),
        std::fs::read(d.join("secret")).unwrap()
    );
    let labels = p11(&env.hsm, &fx.label, &fx.user_pin, &["--list-objects"]);
    assert!(
        labels.contains(&format!("archived {}", old_enc.serial_hex)),
        "{labels}"
    );
}

fn run_case(case: Case) -> (Env, Report) {
    let env = Env::new(&[case.spec]);
    let fx = &env.tokens[0];
    let old_enc = fx.certs.get(1);
    env.order(
        &fx.certs[0],
        case.policy,
        case.target,
        old_enc,
        case.with_enc,
    );
    let report = renew_one(&env, 0);
    assert_eq!(report.old_serial, fx.certs[0].serial_hex);
    assert_ne!(report.new_serial, report.old_serial);
    assert!(report.not_after > fx.certs[0].not_after);
    (env, report)
}

#[test]
fn rsa_new_key() {
    let (env, report) = run_case(Case {
        spec: TokenSpec::ukey("RSA new"),
        policy: KeyPolicy::New,
        target: KeyAlgorithm::Rsa2048,
        with_enc: false,
    });
    confirm_externally(&env, 0, &report, FxAlg::Rsa2048);
}

/// After a finished renewal, with the CA's root certificate also stored on the key:
/// the root is never a candidate (never sent to the portal), and "nothing to do" is
/// said as "already renewed, valid until …".
#[test]
fn a_second_run_says_already_renewed_and_ignores_a_ca_certificate() {
    let (env, report) = run_case(Case {
        spec: TokenSpec::ukey("Twice"),
        policy: KeyPolicy::New,
        target: KeyAlgorithm::Rsa2048,
        with_enc: false,
    });
    let fx = &env.tokens[0];
    let ca = env.hsm.ca().unwrap();
    let root = tempfile::tempdir().unwrap();
    let root_der = root.path().join("root.der");
    std::fs::write(&root_der, pem_to_der(&ca.root_cert_pem)).unwrap();
    p11(
        &env.hsm,
        &fx.label,
        &fx.user_pin,
        &[
            "--write-object",
            root_der.to_str().unwrap(),
            "--type",
            "cert",
            "--id",
            "ca01",
            "--label",
            "Root CA",
        ],
    );
    let module = env.module();
    let token = summary(&module, &fx.serial);
    let counting = Counting {
        inner: &env.client(),
        asked: std::cell::RefCell::new(Vec::new()),
    };
    let err = preflight(&module, &token, None, &counting, &env.options()).unwrap_err();
    match &err {
        ukey_renewal::RenewalError::AlreadyRenewed { serial, not_after } => {
            assert_eq!(serial, &report.new_serial);
            assert_eq!(*not_after, report.not_after);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(err.kind(), ukey_renewal::ErrorKind::NothingToDo);
    assert!(
        err.user_message(ukey_token::Lang::En)
            .contains(&report.not_after.date().to_string()),
        "{}",
        err.user_message(ukey_token::Lang::En)
    );
    assert_eq!(*counting.asked.borrow(), vec![report.new_serial.clone()]);
}

/// The real client, recording which serials it was asked about.
struct Counting<'a> {
    inner: &'a dyn ukey_renewal::PortalApi,
    asked: std::cell::RefCell<Vec<String>>,
}

impl ukey_renewal::PortalApi for Counting<'_> {
    fn status(
        &self,
        req: &ukey_portal_api::StatusRequest,
    ) -> Result<
        ukey_portal_client::Answer<ukey_portal_api::RenewalStatus>,
        ukey_portal_client::ClientError,
    > {
        self.asked.borrow_mut().push(req.serial_hex.clone());
        self.inner.status(req)
    }
    fn challenge(
        &self,
        order_id: &str,
    ) -> Result<
        ukey_portal_client::Answer<ukey_portal_api::ChallengeResponse>,
        ukey_portal_client::ClientError,
    > {
        self.inner.challenge(order_id)
    }
    fn issue(
        &self,
        order_id: &str,
        req: &ukey_portal_api::IssueRequest,
    ) -> Result<
        ukey_portal_client::Answer<ukey_portal_api::IssueResponse>,
        ukey_portal_client::ClientError,
    > {
        self.inner.issue(order_id, req)
    }
    fn installed(
        &self,
        order_id: &str,
        req: &ukey_portal_api::InstalledRequest,
    ) -> Result<
        ukey_portal_client::Answer<ukey_portal_api::InstalledResponse>,
        ukey_portal_client::ClientError,
    > {
        self.inner.installed(order_id, req)
    }
    fn cmp(
        &self,
        message: &[u8],
    ) -> Result<ukey_portal_client::Answer<Vec<u8>>, ukey_portal_client::ClientError> {
        self.inner.cmp(message)
    }
}

#[test]
fn rsa_same_key() {
    let (env, report) = run_case(Case {
        spec: TokenSpec::ukey("RSA same"),
        policy: KeyPolicy::Same,
        target: KeyAlgorithm::Rsa2048,
        with_enc: false,
    });
    confirm_externally(&env, 0, &report, FxAlg::Rsa2048);
}

#[test]
fn p256_new_key() {
    let mut spec = TokenSpec::ukey("EC new");
    spec.certs[0].alg = FxAlg::EcP256;
    let (env, report) = run_case(Case {
        spec,
        policy: KeyPolicy::New,
        target: KeyAlgorithm::EcP256,
        with_enc: false,
    });
    confirm_externally(&env, 0, &report, FxAlg::EcP256);
}

#[test]
fn p256_same_key_with_encryption() {
    let (env, report) = run_case(Case {
        spec: TokenSpec::dual("EC dual", FxAlg::EcP256),
        policy: KeyPolicy::Same,
        target: KeyAlgorithm::EcP256,
        with_enc: true,
    });
    confirm_externally(&env, 0, &report, FxAlg::EcP256);
    assert!(report.encryption_serial.is_some());
}

#[test]
fn rsa_dual_new_key_archives_old_decryption_key() {
    let (env, report) = run_case(Case {
        spec: TokenSpec::dual("RSA dual", FxAlg::Rsa2048),
        policy: KeyPolicy::New,
        target: KeyAlgorithm::Rsa2048,
        with_enc: true,
    });
    confirm_externally(&env, 0, &report, FxAlg::Rsa2048);
    new_signing_key_only_signs(&env, 0);
    assert_eq!(
        report.archived_serial.as_deref(),
        Some(env.tokens[0].certs[1].serial_hex.as_str())
    );
    archived_key_still_decrypts(&env, 0);
}

#[test]
fn algorithm_upgrade_rsa_to_p256() {
    let (env, report) = run_case(Case {
        spec: TokenSpec::ukey("Upgrade"),
        policy: KeyPolicy::New,
        target: KeyAlgorithm::EcP256,
        with_enc: false,
    });
    confirm_externally(&env, 0, &report, FxAlg::EcP256);
}

#[test]
fn several_keys_at_once_each_on_its_own_session() {
    let env = Env::new(&[
        TokenSpec::ukey("Key A"),
        TokenSpec::dual("Key B", FxAlg::Rsa2048),
        {
            let mut s = TokenSpec::ukey("Key C");
            s.certs[0].alg = FxAlg::EcP256;
            s
        },
    ]);
    for fx in &env.tokens {
        env.order(
            &fx.certs[0],
            KeyPolicy::New,
            KeyAlgorithm::Rsa2048,
            fx.certs.get(1),
            fx.certs.len() > 1,
        );
    }
    let module = env.module();
    let opts = env.options();
    let reports: Vec<Report> = std::thread::scope(|s| {
        let handles: Vec<_> = env
            .tokens
            .iter()
            .map(|fx| {
                let module = &module;
                let opts = &opts;
                let env = &env;
                s.spawn(move || {
                    let token = summary(module, &fx.serial);
                    let client = env.client();
                    let plan =
                        ukey_renewal::preflight(module, &token, None, &client, opts).unwrap();
                    ukey_renewal::renew(
                        module,
                        plan,
                        &SecretString::from(fx.user_pin.clone()),
                        &client,
                        opts,
                        &mut |_| {},
                    )
                    .unwrap()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    drop(module);
    assert_eq!(reports.len(), 3);
    for (i, r) in reports.iter().enumerate() {
        assert_eq!(r.token_serial, env.tokens[i].serial);
        confirm_externally(&env, i, r, FxAlg::Rsa2048);
    }
    archived_key_still_decrypts(&env, 1);
}

#[test]
fn p256_dual_new_key() {
    let (env, report) = run_case(Case {
        spec: TokenSpec::dual("EC dual new", FxAlg::EcP256),
        policy: KeyPolicy::New,
        target: KeyAlgorithm::EcP256,
        with_enc: true,
    });
    confirm_externally(&env, 0, &report, FxAlg::EcP256);
    new_signing_key_only_signs(&env, 0);
    assert_eq!(
        report.archived_serial.as_deref(),
        Some(env.tokens[0].certs[1].serial_hex.as_str())
    );
}

#[test]
fn upgrade_rsa_dual_to_p256_with_escrowed_key_over_ecdh() {
    let (env, report) = run_case(Case {
        spec: TokenSpec::dual("Upgrade dual", FxAlg::Rsa2048),
        policy: KeyPolicy::New,
        target: KeyAlgorithm::EcP256,
        with_enc: true,
    });
    confirm_externally(&env, 0, &report, FxAlg::EcP256);
    new_signing_key_only_signs(&env, 0);
    archived_key_still_decrypts(&env, 0);
}
