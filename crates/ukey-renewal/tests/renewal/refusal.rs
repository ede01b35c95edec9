//! Refusal: a portal (a small axum server here) that answers `issue` with a
//! certificate the engine must not install. Each case: an error naming why, and the
//! token byte-for-byte unchanged (every object, every attribute value, compared before
//! and after), the journal rolled back.

use std::sync::Arc;

use axum::extract::State;
use axum::routing::post;
use axum::{Json, Router};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DnType, IsCa, Issuer,
    KeyPair, KeyUsagePurpose,
};
use secrecy::SecretString;
use softhsm_fixtures::TokenSpec;
use ukey_portal_api::{
    ChallengeResponse, IssueRequest, IssueResponse, KeyAlgorithm, KeyPolicy, OrderTerms,
    RenewalStatus,
};
use ukey_renewal::{Outcome, Refusal, RenewalError, preflight, renew};
use ukey_token::ObjectInfo;

use super::common::*;

#[derive(Debug, Clone, Copy, PartialEq)]
enum Mode {
    AnotherKey,
    AnotherSubject,
    UntrustedIssuer,
    Expired,
    CaCertificate,
    Oversized,
    GarbageBody,
    GarbageDer,
}

struct Fake {
    mode: Mode,
    issuing_pem: String,
    issuing_key_pem: String,
    issuing_der: Vec<u8>,
}

fn sign_leaf(fake: &Fake, csr_der: &[u8]) -> Vec<u8> {
    let issuer = Issuer::from_ca_cert_pem(
        &fake.issuing_pem,
        KeyPair::from_pem(&fake.issuing_key_pem).unwrap(),
    )
    .unwrap();
    let csr = CertificateSigningRequestParams::from_der(&csr_der.to_vec().into()).unwrap();
    let mut params: CertificateParams = csr.params.clone();
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::days(1);
    params.not_after = now + time::Duration::days(365);
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::ContentCommitment,
    ];
    params.serial_number = Some(vec![0x5A, 0x01, 0x02].into());
    match fake.mode {
        Mode::AnotherKey => {
            let other = KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256)
                .or_else(|_| KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256))
                .unwrap();
            return params.signed_by(&other, &issuer).unwrap().der().to_vec();
        }
        Mode::AnotherSubject => {
            params.distinguished_name.push(DnType::CommonName, "李四");
        }
        Mode::UntrustedIssuer => {
            let rogue_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
            let mut rogue = CertificateParams::new(Vec::<String>::new()).unwrap();
            // Same name as the real issuing CA: only the signature tells them apart.
            rogue.distinguished_name = ukey_renewal::checks::subject_of(&fake.issuing_der).unwrap();
            rogue.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            let rogue_issuer = Issuer::new(rogue, rogue_key);
            return params
                .signed_by(&csr.public_key, &rogue_issuer)
                .unwrap()
                .der()
                .to_vec();
        }
        Mode::Expired => {
            params.not_before = now - time::Duration::days(400);
            params.not_after = now - time::Duration::days(1);
        }
        Mode::CaCertificate => {
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.key_usages = vec![
                KeyUsagePurpose::KeyCertSign,
                KeyUsagePurpose::DigitalSignature,
            ];
        }
        _ => {}
    }
    params
        .signed_by(&csr.public_key, &issuer)
        .unwrap()
        .der()
        .to_vec()
}

async fn status() -> Json<RenewalStatus> {
    Json(RenewalStatus::Ready {
        order_id: "ord_fake".into(),
        terms: OrderTerms {
            years: 1,
            key_policy: KeyPolicy::New,
            target_algorithm: KeyAlgorithm::Rsa2048,
            with_encryption_cert: false,
        },
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
) -> axum::response::Response {
    use axum::response::IntoResponse;
    match fake.mode {
        Mode::Oversized => {
            let big = format!("{{\"pad\":\"{}\"}}", "A".repeat(2 * 1024 * 1024));
            ([("content-type", "application/json")], big).into_response()
        }
        Mode::GarbageBody => {
            ([("content-type", "application/json")], "<html>oops</html>").into_response()
        }
        _ => {
            let der = if fake.mode == Mode::GarbageDer {
                b"\x30\x82\x01\x00garbage".to_vec()
            } else {
                sign_leaf(&fake, &req.csr_der)
            };
            Json(IssueResponse {
                order_id: "ord_fake".into(),
                certificate_serial_hex: "5A0102".into(),
                certificate_der: der,
                chain_der: vec![fake.issuing_der.clone()],
                encryption: None,
            })
            .into_response()
        }
    }
}

fn snapshot(env: &Env, module: &ukey_token::Module, serial: &str) -> Vec<ObjectInfo> {
    let token = summary(module, serial);
    let s = module.open_session(&token).unwrap();
    s.login(&SecretString::from(env.tokens[0].user_pin.clone()))
        .unwrap();
    let snap = s.snapshot().unwrap();
    drop(s);
    snap
}

fn refused(mode: Mode) -> RenewalError {
    let env = Env::new(&[TokenSpec::ukey("Refusal")]);
    let ca = env.hsm.ca().unwrap();
    let fake = Arc::new(Fake {
        mode,
        issuing_pem: ca.issuing_cert_pem.clone(),
        issuing_key_pem: std::fs::read_to_string(&ca.issuing_key_path).unwrap(),
        issuing_der: pem_to_der(&ca.issuing_cert_pem),
    });
    let app = Router::new()
        .route("/api/v1/status", post(status))
        .route("/api/v1/orders/{id}/challenge", post(challenge))
        .route("/api/v1/orders/{id}/issue", post(issue))
        .with_state(fake);
    let listener = env
        ._rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    env._rt
        .spawn(async move { axum::serve(listener, app).await });

    let module = env.module();
    let fx = &env.tokens[0];
    let before = snapshot(&env, &module, &fx.serial);
    let client = ukey_portal_client::BlockingPortalClient::new(
        ukey_portal_client::PortalClient::new(&url).unwrap(),
    )
    .unwrap();
    let opts = env.options();
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
    let after = snapshot(&env, &module, &fx.serial);
    assert_eq!(before, after, "token changed after refusal {mode:?}: {err}");
    assert!(before.len() >= 3, "{before:?}");
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
fn another_key_is_refused() {
    let e = refused(Mode::AnotherKey);
    assert!(
        matches!(e, RenewalError::Refused(Refusal::PublicKey)),
        "{e}"
    );
}

#[test]
fn another_subject_is_refused() {
    let e = refused(Mode::AnotherSubject);
    assert!(
        matches!(e, RenewalError::Refused(Refusal::Subject { .. })),
        "{e}"
    );
}

#[test]
fn untrusted_issuer_is_refused() {
    let e = refused(Mode::UntrustedIssuer);
    assert!(
        matches!(e, RenewalError::Refused(Refusal::Untrusted(_))),
        "{e}"
    );
}

#[test]
fn expired_certificate_is_refused() {
    let e = refused(Mode::Expired);
    assert!(
        matches!(e, RenewalError::Refused(Refusal::NotValidNow(_))),
        "{e}"
    );
}

#[test]
fn ca_certificate_is_refused() {
    let e = refused(Mode::CaCertificate);
    assert!(
        matches!(e, RenewalError::Refused(Refusal::KeyUsage(_))),
        "{e}"
    );
}

#[test]
fn oversized_answer_is_refused() {
    let e = refused(Mode::Oversized);
    assert!(
        matches!(
            e,
            RenewalError::Portal(ukey_portal_client::ClientError::TooLarge { .. })
        ),
        "{e}"
    );
}

#[test]
fn garbage_body_is_refused() {
    let e = refused(Mode::GarbageBody);
    assert!(
        matches!(
            e,
            RenewalError::Portal(ukey_portal_client::ClientError::Garbage { .. })
        ),
        "{e}"
    );
}

#[test]
fn garbage_certificate_is_refused() {
    let e = refused(Mode::GarbageDer);
    assert!(
        matches!(e, RenewalError::Refused(Refusal::Malformed(_))),
        "{e}"
    );
}
