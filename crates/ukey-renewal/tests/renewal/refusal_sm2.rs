//! Refusal of SM2 certificates the engine must not install, on a GM key (ukey-sim's
//! TASS profile): a portal here (axum) answers `issue` with a certificate OpenSSL minted
//! for the case from the CSR the key made. Each case: the renewal is refused, and the
//! token is byte-for-byte as before (every object and attribute), the journal rolled
//! back.

use std::path::PathBuf;
use std::sync::Arc;

use axum::extract::State;
use axum::routing::post;
use axum::{Json, Router};
use secrecy::SecretString;
use softhsm_fixtures::openssl_sm2::{GM_DISTID_OPT, OpenSslSm2};
use softhsm_fixtures::{SoftHsm, TokenSpec};
use ukey_portal_api::{
    ChallengeResponse, IssueRequest, IssueResponse, KeyAlgorithm, KeyPolicy, OrderTerms,
    RenewalStatus,
};
use ukey_renewal::{JournalStore, Options, Outcome, Refusal, RenewalError, preflight, renew};
use ukey_token::Module;

use super::common::*;

#[derive(Debug, Clone, Copy, PartialEq)]
enum Sm2Case {
    /// Another SM2 CA, with the same name as the trusted one.
    OtherCa,
    /// The trusted CA, but signed with OpenSSL's empty ID instead of the GM ID.
    EmptyId,
    /// Another subject, the key's own public key.
    AnotherSubject,
    /// The right subject, another SM2 key.
    AnotherKey,
}

struct Fake {
    case: Sm2Case,
    ssl: OpenSslSm2,
    old_subject: String,
}

const CA_SUBJECT: &str = "/C=CN/O=某某数字认证/CN=某某 SM2 CA";

fn run(ssl: &OpenSslSm2, args: &[&str]) {
    ssl.run(args)
        .unwrap_or_else(|e| panic!("openssl {args:?}: {e}"));
}

/// What OpenSSL mints for the case, from the key's CSR (DER).
fn mint(fake: &Fake, csr_der: &[u8]) -> Vec<u8> {
    let ssl = &fake.ssl;
    std::fs::write(ssl.dir().join("token.csr"), csr_der).unwrap();
    // The key's CSR is SM2-signed with the GM ID: OpenSSL checks it so.
    let verified = ssl.output(&[
        "req",
        "-inform",
        "DER",
        "-in",
        "token.csr",
        "-noout",
        "-verify",
        "-vfyopt",
        GM_DISTID_OPT,
    ]);
    let said = String::from_utf8_lossy(&verified.stderr).into_owned()
        + &String::from_utf8_lossy(&verified.stdout);
    assert!(said.contains("verify OK"), "the key's CSR: {said}");
    run(
        ssl,
        &[
            "req",
            "-inform",
            "DER",
            "-in",
            "token.csr",
            "-pubkey",
            "-noout",
            "-out",
            "token.pub",
        ],
    );
    let (csr, ca) = match fake.case {
        Sm2Case::OtherCa => ("token.csr", "rogue"),
        Sm2Case::EmptyId => ("token.csr", "ca"),
        Sm2Case::AnotherSubject => {
            run(ssl, &["genpkey", "-algorithm", "SM2", "-out", "other.key"]);
            run(
                ssl,
                &[
                    "req",
                    "-new",
                    "-key",
                    "other.key",
                    "-sm3",
                    "-sigopt",
                    GM_DISTID_OPT,
                    "-utf8",
                    "-subj",
                    "/C=CN/O=某某建设工程有限公司/CN=李四",
                    "-outform",
                    "DER",
                    "-out",
                    "other.csr",
                ],
            );
            ("other.csr", "ca")
        }
        Sm2Case::AnotherKey => {
            run(ssl, &["genpkey", "-algorithm", "SM2", "-out", "other.key"]);
            run(
                ssl,
                &[
                    "req",
                    "-new",
                    "-key",
                    "other.key",
                    "-sm3",
                    "-sigopt",
                    GM_DISTID_OPT,
                    "-utf8",
                    "-subj",
                    &fake.old_subject,
                    "-outform",
                    "DER",
                    "-out",
                    "other.csr",
                ],
            );
            ("other.csr", "ca")
        }
    };
    std::fs::write(
        ssl.dir().join("leaf.ext"),
        "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,nonRepudiation\n",
    )
    .unwrap();
    let (ca_pem, ca_key) = (format!("{ca}.pem"), format!("{ca}.key"));
    let mut args = vec![
        "x509",
        "-req",
        "-inform",
        "DER",
        "-in",
        csr,
        "-CA",
        &ca_pem,
        "-CAkey",
        &ca_key,
        "-sm3",
        "-vfyopt",
        GM_DISTID_OPT,
        "-days",
        "365",
        "-set_serial",
        "0x5A0102",
        "-extfile",
        "leaf.ext",
        "-outform",
        "DER",
        "-out",
        "leaf.der",
    ];
    if fake.case == Sm2Case::AnotherSubject {
        // The token's own key under another name.
        args.extend(["-force_pubkey", "token.pub"]);
    }
    if fake.case != Sm2Case::EmptyId {
        args.extend(["-sigopt", GM_DISTID_OPT]);
    }
    run(ssl, &args);
    ssl.read("leaf.der").unwrap()
}

async fn status() -> Json<RenewalStatus> {
    Json(RenewalStatus::Ready {
        order_id: "ord_fake".into(),
        terms: OrderTerms {
            years: 1,
            key_policy: KeyPolicy::New,
            target_algorithm: KeyAlgorithm::Sm2,
            with_encryption_cert: false,
        },
        renewal_code_required: false,
    })
}

async fn challenge() -> Json<ChallengeResponse> {
    Json(ChallengeResponse {
        challenge_id: "ch_1".into(),
        nonce: vec![7; 32],
        expires_at: time::OffsetDateTime::now_utc() + time::Duration::minutes(5),
    })
}

async fn issue(
    State(fake): State<Arc<Fake>>,
    Json(req): Json<IssueRequest>,
) -> Json<IssueResponse> {
    let der = mint(&fake, &req.csr_der);
    let ca = fake
        .ssl
        .der(if fake.case == Sm2Case::OtherCa {
            "rogue.pem"
        } else {
            "ca.pem"
        })
        .unwrap();
    Json(IssueResponse {
        order_id: "ord_fake".into(),
        certificate_serial_hex: "5A0102".into(),
        certificate_der: der,
        chain_der: vec![ca],
        encryption: None,
    })
}

/// The ukey-sim module, built if this test binary runs alone.
fn shim() -> PathBuf {
    if let Ok(p) = ukey_sim::module_path()
        && p.is_file()
    {
        return p;
    }
    let exe = std::env::current_exe().unwrap();
    let target = exe.ancestors().nth(3).unwrap().to_owned();
    let status = std::process::Command::new(env!("CARGO"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["build", "-p", "ukey-sim", "--lib"])
        .env("CARGO_TARGET_DIR", &target)
        .status()
        .unwrap();
    assert!(status.success(), "building the ukey-sim module");
    ukey_sim::module_path().unwrap()
}

fn snapshot(module: &Module, serial: &str, pin: &str) -> Vec<ukey_token::ObjectInfo> {
    let token = summary(module, serial);
    let s = module.open_session(&token).unwrap();
    s.login(&SecretString::from(pin.to_owned())).unwrap();
    s.snapshot().unwrap()
}

fn refused(case: Sm2Case) -> RenewalError {
    let hsm = SoftHsm::new().unwrap();
    let fx = hsm.create_token(&TokenSpec::ukey("GM refusal")).unwrap();
    let state = hsm.dir().join("ukey-sim-state");
    ukey_sim::Control::new(&state)
        .unwrap()
        .set_gm(&fx.serial, Some("tass"))
        .unwrap();
    hsm.activate();
    #[allow(unsafe_code)]
    // SAFETY: one test per process (nextest); set before any thread or module.
    unsafe {
        std::env::set_var(ukey_sim::STATE_ENV, &state);
    }
    let dir = tempfile::tempdir().unwrap();
    let ssl = OpenSslSm2::new(dir.path());
    ssl.ca("ca", CA_SUBJECT).unwrap();
    ssl.ca("rogue", CA_SUBJECT).unwrap();
    let old_subject = format!(
        "/{}",
        ukey_token::CertificateDetails::from_der(&fx.certs[0].der)
            .unwrap()
            .subject
            .split(", ")
            .collect::<Vec<_>>()
            .join("/")
    );
    let trusted = ssl.der("ca.pem").unwrap();
    let fake = Arc::new(Fake {
        case,
        ssl,
        old_subject,
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let app = Router::new()
        .route("/api/v1/status", post(status))
        .route("/api/v1/orders/{id}/challenge", post(challenge))
        .route("/api/v1/orders/{id}/issue", post(issue))
        .with_state(fake);
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    rt.spawn(async move { axum::serve(listener, app).await });

    let module = Module::load(&shim()).unwrap();
    let before = snapshot(&module, &fx.serial, &fx.user_pin);
    let data = tempfile::tempdir().unwrap();
    let opts = Options::new(JournalStore::new(data.path()), vec![trusted]);
    let client = ukey_portal_client::PortalClient::new(&url).unwrap();
    let token = summary(&module, &fx.serial);
    let plan = preflight(&module, &token, None, &client, &opts).unwrap();
    let err = renew(
        &module,
        plan,
        &SecretString::from(fx.user_pin.clone()),
        &client,
        &opts,
        &mut |_| {},
    )
    .unwrap_err();
    let after = snapshot(&module, &fx.serial, &fx.user_pin);
    assert_eq!(before, after, "token changed after refusal {case:?}: {err}");
    let j = opts
        .journals
        .load(&fx.serial, &fx.certs[0].serial_hex)
        .unwrap()
        .unwrap();
    assert!(
        matches!(j.outcome, Outcome::RolledBack { .. }),
        "{:?}",
        j.outcome
    );
    err
}

#[test]
fn an_sm2_certificate_from_another_sm2_ca_is_refused() {
    let e = refused(Sm2Case::OtherCa);
    assert!(
        matches!(e, RenewalError::Refused(Refusal::Untrusted(_))),
        "{e}"
    );
}

#[test]
fn an_sm2_certificate_signed_with_the_empty_id_is_refused() {
    let e = refused(Sm2Case::EmptyId);
    assert!(
        matches!(e, RenewalError::Refused(Refusal::Untrusted(_))),
        "{e}"
    );
}

#[test]
fn an_sm2_certificate_for_another_subject_is_refused() {
    let e = refused(Sm2Case::AnotherSubject);
    assert!(
        matches!(e, RenewalError::Refused(Refusal::Subject { .. })),
        "{e}"
    );
}

#[test]
fn an_sm2_certificate_for_another_key_is_refused() {
    let e = refused(Sm2Case::AnotherKey);
    assert!(
        matches!(e, RenewalError::Refused(Refusal::PublicKey)),
        "{e}"
    );
}
