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
    NotLater,
    NotYetValid,
    IntermediateNotCa,
    LookalikeSubject,
    EncryptionMissing,
    EncryptionOtherRecipient,
    EncryptionAlgorithmMismatch,
    EncryptionEnvelopeVersion,
    EncryptionTransportMismatch,
}

impl Mode {
    fn with_encryption(self) -> bool {
        matches!(
            self,
            Mode::EncryptionMissing
                | Mode::EncryptionOtherRecipient
                | Mode::EncryptionAlgorithmMismatch
                | Mode::EncryptionEnvelopeVersion
                | Mode::EncryptionTransportMismatch
        )
    }
}

struct Fake {
    mode: Mode,
    issuing_pem: String,
    issuing_key_pem: String,
    issuing_der: Vec<u8>,
    old_der: Vec<u8>,
    extra_chain: std::sync::Mutex<Vec<Vec<u8>>>,
}

/// An RSA encryption certificate from the real issuing CA, for the encryption cases
/// (they are refused before its key would be needed).
fn encryption_certificate(fake: &Fake) -> Vec<u8> {
    let issuer = Issuer::from_ca_cert_pem(
        &fake.issuing_pem,
        KeyPair::from_pem(&fake.issuing_key_pem).unwrap(),
    )
    .unwrap();
    let key = KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256)
        .or_else(|_| KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256))
        .unwrap();
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name = ukey_renewal::checks::subject_of(&fake.old_der).unwrap();
    p.key_usages = vec![
        KeyUsagePurpose::KeyEncipherment,
        KeyUsagePurpose::DataEncipherment,
        KeyUsagePurpose::KeyAgreement,
    ];
    let now = time::OffsetDateTime::now_utc();
    p.not_before = now - time::Duration::days(1);
    p.not_after = now + time::Duration::days(365);
    p.is_ca = IsCa::ExplicitNoCa;
    p.serial_number = Some(vec![0x5A, 0x0E].into());
    p.signed_by(&key, &issuer).unwrap().der().to_vec()
}

fn envelope(fake: &Fake, req: &IssueRequest, enc_der: &[u8]) -> ukey_portal_api::KeyEnvelope {
    use x509_parser::prelude::FromDer;
    // Addressed to the request's transport key; the "other recipient" case addresses it
    // to the new signing key (the CSR's), which must only sign.
    let spki = if fake.mode == Mode::EncryptionOtherRecipient {
        let (_, csr) =
            x509_parser::certification_request::X509CertificationRequest::from_der(&req.csr_der)
                .unwrap();
        csr.certification_request_info.subject_pki.raw.to_vec()
    } else {
        req.transport_key_spki
            .clone()
            .expect("the client sends a transport key when an encryption certificate comes")
    };
    let recipient = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &spki)
        .as_ref()
        .to_vec();
    let (_, enc) = x509_parser::prelude::X509Certificate::from_der(enc_der).unwrap();
    let rsa = matches!(
        enc.public_key().parsed(),
        Ok(x509_parser::public_key::PublicKey::RSA(_))
    );
    // The mismatch case names the other algorithm than the certificate's.
    let algorithm = match (rsa, fake.mode == Mode::EncryptionAlgorithmMismatch) {
        (true, false) | (false, true) => KeyAlgorithm::Rsa2048,
        _ => KeyAlgorithm::EcP256,
    };
    ukey_portal_api::KeyEnvelope {
        version: if fake.mode == Mode::EncryptionEnvelopeVersion {
            2
        } else {
            1
        },
        recipient_spki_sha256: recipient,
        // The transport key is RSA (as the token's new key): ECDH cannot reach it.
        key_transport: if fake.mode == Mode::EncryptionTransportMismatch {
            ukey_portal_api::KeyTransport::EcdhP256 {
                ephemeral_public_key: vec![4; 65],
            }
        } else {
            ukey_portal_api::KeyTransport::RsaOaepSha1 {
                wrapped_key: vec![1; 256],
            }
        },
        content_wrap: ukey_portal_api::CONTENT_WRAP_AES256_KWP.to_owned(),
        private_key_algorithm: algorithm,
        private_key_format: ukey_portal_api::PRIVATE_KEY_FORMAT_PKCS8.to_owned(),
        wrapped_private_key: vec![2; 64],
    }
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
    // rcgen writes extensions (keyUsage among them) only when one of a few others is
    // set: basicConstraints CA:FALSE, as a CA writes it.
    params.is_ca = IsCa::ExplicitNoCa;
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
        Mode::NotLater => {
            // The old certificate has 10 days left.
            params.not_after = now + time::Duration::days(5);
        }
        Mode::NotYetValid => {
            params.not_before = now + time::Duration::days(2);
        }
        Mode::IntermediateNotCa => {
            // Signed by a certificate the real CA issued without CA:TRUE.
            let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
            let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
            p.distinguished_name.push(DnType::CommonName, "Not a CA");
            p.key_usages = vec![KeyUsagePurpose::KeyCertSign];
            p.is_ca = IsCa::ExplicitNoCa;
            p.not_before = now - time::Duration::days(1);
            p.not_after = now + time::Duration::days(400);
            let not_ca = p.signed_by(&key, &issuer).unwrap();
            *fake.extra_chain.lock().unwrap() = vec![not_ca.der().to_vec()];
            let not_ca_issuer = Issuer::new(p, key);
            return params
                .signed_by(&csr.public_key, &not_ca_issuer)
                .unwrap()
                .der()
                .to_vec();
        }
        Mode::LookalikeSubject => {
            use x509_parser::prelude::FromDer as _;
            // One attribute of the old first type holding the text of all of them:
            // formatted, it reads exactly like the old subject.
            let old = ukey_token::certificate::format_name(
                x509_parser::prelude::X509Certificate::from_der(&fake.old_der)
                    .unwrap()
                    .1
                    .subject(),
            );
            let (ty, value) = old.split_once('=').unwrap();
            let ty = match ty {
                "C" => DnType::CountryName,
                "O" => DnType::OrganizationName,
                _ => DnType::CommonName,
            };
            let mut dn = rcgen::DistinguishedName::new();
            dn.push(ty, rcgen::DnValue::Utf8String(value.to_owned()));
            params.distinguished_name = dn;
        }
        _ => {}
    }
    params
        .signed_by(&csr.public_key, &issuer)
        .unwrap()
        .der()
        .to_vec()
}

async fn status(State(fake): State<Arc<Fake>>) -> Json<RenewalStatus> {
    Json(RenewalStatus::Ready {
        order_id: "ord_fake".into(),
        terms: OrderTerms {
            years: 1,
            key_policy: KeyPolicy::New,
            target_algorithm: KeyAlgorithm::Rsa2048,
            with_encryption_cert: fake.mode.with_encryption(),
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
            let mut chain = fake.extra_chain.lock().unwrap().clone();
            chain.push(fake.issuing_der.clone());
            let encryption = match fake.mode {
                Mode::EncryptionOtherRecipient
                | Mode::EncryptionAlgorithmMismatch
                | Mode::EncryptionEnvelopeVersion
                | Mode::EncryptionTransportMismatch => {
                    let enc = encryption_certificate(&fake);
                    Some(ukey_portal_api::EncryptionIssue {
                        certificate_serial_hex: "5A0E".into(),
                        envelope: Some(envelope(&fake, &req, &enc)),
                        gm_enveloped_key: None,
                        certificate_der: enc,
                    })
                }
                _ => None,
            };
            Json(IssueResponse {
                order_id: "ord_fake".into(),
                certificate_serial_hex: "5A0102".into(),
                certificate_der: der,
                chain_der: chain,
                encryption,
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
        old_der: env.tokens[0].certs[0].der.clone(),
        extra_chain: std::sync::Mutex::new(Vec::new()),
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
    let client = ukey_portal_client::PortalClient::new(&url).unwrap();
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

#[test]
fn a_certificate_that_does_not_end_later_is_refused() {
    let e = refused(Mode::NotLater);
    assert!(matches!(e, RenewalError::Refused(Refusal::NotLater)), "{e}");
}

#[test]
fn a_certificate_not_yet_valid_is_refused() {
    let e = refused(Mode::NotYetValid);
    assert!(
        matches!(e, RenewalError::Refused(Refusal::NotValidNow(_))),
        "{e}"
    );
}

#[test]
fn an_intermediate_that_is_not_a_ca_is_refused() {
    let e = refused(Mode::IntermediateNotCa);
    assert!(
        matches!(e, RenewalError::Refused(Refusal::Untrusted(_))),
        "{e}"
    );
}

#[test]
fn a_subject_that_formats_alike_but_differs_is_refused() {
    let e = refused(Mode::LookalikeSubject);
    assert!(
        matches!(e, RenewalError::Refused(Refusal::Subject { .. })),
        "{e}"
    );
}

#[test]
fn encryption_refusals() {
    for (mode, words) in [
        (Mode::EncryptionMissing, "none came"),
        (Mode::EncryptionOtherRecipient, "another key"),
        (Mode::EncryptionAlgorithmMismatch, "does not match"),
        (Mode::EncryptionEnvelopeVersion, "version 2"),
        (Mode::EncryptionTransportMismatch, "does not fit"),
    ] {
        let e = refused(mode);
        match &e {
            RenewalError::Refused(Refusal::Encryption(why)) => {
                assert!(why.contains(words), "{mode:?}: {why}")
            }
            other => panic!("{mode:?}: {other}"),
        }
    }
}
