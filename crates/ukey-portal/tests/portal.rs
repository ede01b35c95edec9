//! The portal protocol over real HTTP on loopback, against a SQLite file.

mod common;

use common::*;
use rcgen::PublicKeyData as _;
use ukey_portal_api::{
    ErrorCode, InitialState, InstalledResponse, KeyAlgorithm, KeyPolicy, OPENAPI_YAML,
    RenewalStatus, StatusRequest, paths,
};

#[tokio::test]
async fn status_walks_through_every_state() {
    let h = Harness::start().await;
    let holder = h.holder(KeyAlgorithm::Rsa2048);

    // none
    assert_eq!(h.status(&holder).await, RenewalStatus::None);

    // awaiting payment: payment URL on this portal, serial prefilled
    let order = h.order(
        &holder,
        InitialState::AwaitingPayment,
        KeyPolicy::New,
        KeyAlgorithm::Rsa2048,
        false,
    );
    match h.status(&holder).await {
        RenewalStatus::AwaitingPayment {
            order_id,
            payment_url,
            terms,
        } => {
            assert_eq!(order_id, order.order_id);
            assert_eq!(
                payment_url,
                format!("{}/pay?serial={}", h.server.url, holder.serial_hex)
            );
            assert_eq!(terms.years, 2);
            let page = h
                .client
                .get(&payment_url)
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap();
            assert!(
                page.contains(&holder.serial_hex) && page.contains("待支付"),
                "{page}"
            );
        }
        other => panic!("{other:?}"),
    }

    // the same lookup by DN text (any attribute order, OpenSSL spelling)
    let by_dn: RenewalStatus = h
        .post_ok(
            paths::STATUS,
            &StatusRequest {
                issuer_der: None,
                issuer_dn: Some(
                    "CN = UKey Renew Reference CA, O = UKey Renew Reference Portal, C = CN".into(),
                ),
                serial_hex: holder.serial_hex.to_lowercase(),
            },
        )
        .await;
    assert_eq!(by_dn.state_name(), "awaiting_payment");

    // ready
    h.portal().pay(&order.order_id).unwrap();
    let ready = h.status(&holder).await;
    assert!(matches!(ready, RenewalStatus::Ready { .. }), "{ready:?}");
    // no personal data in a status answer
    let raw = h
        .post(
            paths::STATUS,
            &StatusRequest {
                issuer_der: Some(holder.issuer_der()),
                issuer_dn: None,
                serial_hex: holder.serial_hex.clone(),
            },
        )
        .await
        .text()
        .await
        .unwrap();
    assert!(!raw.contains(CN) && !raw.contains(ORG), "{raw}");

    // issued
    let new_key = new_key(KeyAlgorithm::Rsa2048);
    let issued = h.issue(&order.order_id, &holder, &new_key).await;
    match h.status(&holder).await {
        RenewalStatus::Issued {
            certificate_serial_hex,
            ..
        } => {
            assert_eq!(certificate_serial_hex, issued.certificate_serial_hex)
        }
        other => panic!("{other:?}"),
    }

    // completed
    let r = h
        .installed(&order.order_id, &issued.certificate_serial_hex, &new_key)
        .await;
    assert!(r.status().is_success());
    assert!(matches!(
        h.status(&holder).await,
        RenewalStatus::Completed { .. }
    ));

    // rejected, with the reviewer's reason
    let h2 = h.holder(KeyAlgorithm::EcP256);
    let o2 = h.order(
        &h2,
        InitialState::AwaitingPayment,
        KeyPolicy::New,
        KeyAlgorithm::EcP256,
        false,
    );
    h.portal()
        .reject(&o2.order_id, "营业执照已过期 / business licence expired")
        .unwrap();
    match h.status(&h2).await {
        RenewalStatus::Rejected { reason, .. } => {
            assert_eq!(reason, "营业执照已过期 / business licence expired")
        }
        other => panic!("{other:?}"),
    }

    // requires a new key, with the tracking number
    let h3 = h.holder(KeyAlgorithm::Rsa2048);
    let o3 = h.order(
        &h3,
        InitialState::Ready,
        KeyPolicy::New,
        KeyAlgorithm::EcP256,
        false,
    );
    h.portal().ship(&o3.order_id, "SF1234567890").unwrap();
    match h.status(&h3).await {
        RenewalStatus::RequiresNewKey {
            tracking_number,
            terms,
            ..
        } => {
            assert_eq!(tracking_number, "SF1234567890");
            assert_eq!(terms.target_algorithm, KeyAlgorithm::EcP256);
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn renewal_with_new_key_verifies_with_openssl_and_revokes_the_old_certificate() {
    let h = Harness::start().await;
    let holder = h.holder(KeyAlgorithm::Rsa2048);
    let order = h.order(
        &holder,
        InitialState::Ready,
        KeyPolicy::New,
        KeyAlgorithm::Rsa2048,
        false,
    );
    let new_key = new_key(KeyAlgorithm::Rsa2048);
    let issued = h.issue(&order.order_id, &holder, &new_key).await;

    // the renewed certificate: CA-signed, same subject, the CSR's key, 2 years
    let ca_file = h.data_dir().join("ca-cert.pem");
    let (ok, text) = openssl_verify(&ca_file, None, &issued.certificate_der, h.dir.path());
    assert!(ok, "{text}");
    let (_, new) = x509_parser::parse_x509_certificate(&issued.certificate_der).unwrap();
    let (_, old) = x509_parser::parse_x509_certificate(&holder.cert_der).unwrap();
    assert_eq!(new.subject().as_raw(), old.subject().as_raw());
    assert_eq!(
        new.public_key().subject_public_key.as_ref(),
        new_key.public_key_raw()
    );
    let days = (new.validity().not_after.to_datetime() - new.validity().not_before.to_datetime())
        .whole_days();
    assert!((729..=732).contains(&days), "{days}");
    assert_eq!(issued.chain_der, vec![h.portal().ca().cert_der().to_vec()]);
    assert!(issued.encryption.is_none());

    // before "installed" the old certificate is not revoked
    let crl = h.crl_der().await;
    let (ok, text) = openssl_crl(&ca_file, &crl, h.dir.path());
    assert!(ok, "{text}");
    assert!(!text.contains(&holder.serial_hex), "{text}");
    let number_before = crl_number(&crl);

    let r = h
        .installed(&order.order_id, &issued.certificate_serial_hex, &new_key)
        .await;
    assert!(r.headers().contains_key("date"));
    let done: InstalledResponse = r.json().await.unwrap();
    assert_eq!(done.revoked_serials_hex, vec![holder.serial_hex.clone()]);

    let crl = h.crl_der().await;
    let (ok, text) = openssl_crl(&ca_file, &crl, h.dir.path());
    assert!(ok, "{text}");
    assert!(
        text.contains(&format!("Serial Number: {}", holder.serial_hex)),
        "{text}"
    );
    assert!(text.contains("Superseded"), "{text}");
    assert_eq!(
        crl_number(&crl),
        number_before + 1,
        "a new CRL, a new number"
    );

    // a repeated confirmation is fine (and changes no CRL); the old certificate cannot
    // be renewed again
    let again = h
        .installed(&order.order_id, &issued.certificate_serial_hex, &new_key)
        .await;
    assert!(again.status().is_success());
    assert_eq!(crl_number(&h.crl_der().await), number_before + 1);
    let o2 = h.order(
        &holder,
        InitialState::Ready,
        KeyPolicy::New,
        KeyAlgorithm::Rsa2048,
        false,
    );
    let req = h.issue_request(&o2.order_id, &holder, &new_key).await;
    let before = h.dump();
    expect_error(
        h.post(&paths::issue(&o2.order_id), &req).await,
        422,
        ErrorCode::CertificateRevoked,
    )
    .await;
    assert_eq!(before, h.dump());
}

#[tokio::test]
async fn same_key_policy_on_ec_keeps_the_key() {
    let h = Harness::start().await;
    let holder = h.holder(KeyAlgorithm::EcP256);
    let order = h.order(
        &holder,
        InitialState::Ready,
        KeyPolicy::Same,
        KeyAlgorithm::EcP256,
        false,
    );
    let issued = h.issue(&order.order_id, &holder, &holder.key).await;
    let (_, new) = x509_parser::parse_x509_certificate(&issued.certificate_der).unwrap();
    assert_eq!(
        new.public_key().subject_public_key.as_ref(),
        holder.key.public_key_raw()
    );
    let (ok, text) = openssl_verify(
        &h.data_dir().join("ca-cert.pem"),
        None,
        &issued.certificate_der,
        h.dir.path(),
    );
    assert!(ok, "{text}");
    let r = h
        .installed(&order.order_id, &issued.certificate_serial_hex, &holder.key)
        .await;
    assert!(r.status().is_success());
}

#[tokio::test]
async fn issue_is_idempotent_per_key_and_a_new_key_revokes_the_earlier_certificate() {
    let h = Harness::start().await;
    let holder = h.holder(KeyAlgorithm::EcP256);
    let order = h.order(
        &holder,
        InitialState::Ready,
        KeyPolicy::New,
        KeyAlgorithm::EcP256,
        true,
    );
    let key_a = new_key(KeyAlgorithm::EcP256);

    let first = h.issue(&order.order_id, &holder, &key_a).await;
    let again = h.issue(&order.order_id, &holder, &key_a).await;
    assert_eq!(first.certificate_der, again.certificate_der);
    let (e1, e2) = (
        first.encryption.as_ref().unwrap(),
        again.encryption.as_ref().unwrap(),
    );
    assert_eq!(
        e1.certificate_der, e2.certificate_der,
        "same encryption certificate"
    );
    assert_ne!(e1.envelope, e2.envelope, "a fresh envelope each time");

    // a crash and a new key before completion: new certificates, earlier ones revoked
    let key_b = new_key(KeyAlgorithm::EcP256);
    let second = h.issue(&order.order_id, &holder, &key_b).await;
    assert_ne!(second.certificate_serial_hex, first.certificate_serial_hex);
    let enc2 = second.encryption.as_ref().unwrap();
    assert_ne!(enc2.certificate_serial_hex, e1.certificate_serial_hex);
    let (ok, text) = openssl_crl(
        &h.data_dir().join("ca-cert.pem"),
        &h.crl_der().await,
        h.dir.path(),
    );
    assert!(ok, "{text}");
    assert!(
        text.contains(&format!("Serial Number: {}", first.certificate_serial_hex)),
        "{text}"
    );
    assert!(
        text.contains(&format!("Serial Number: {}", e1.certificate_serial_hex)),
        "{text}"
    );
    assert!(
        !text.contains(&holder.serial_hex),
        "old certificate stays valid until installed"
    );
    match h.status(&holder).await {
        RenewalStatus::Issued {
            certificate_serial_hex,
            ..
        } => assert_eq!(certificate_serial_hex, second.certificate_serial_hex),
        other => panic!("{other:?}"),
    }

    // installing the superseded certificate is refused, the current one completes,
    // and afterwards another key's confirmation is a conflict
    let before = h.dump();
    expect_error(
        h.installed(&order.order_id, &first.certificate_serial_hex, &key_a)
            .await,
        409,
        ErrorCode::CertificateNotIssued,
    )
    .await;
    assert_eq!(before, h.dump());
    assert!(
        h.installed(&order.order_id, &second.certificate_serial_hex, &key_b)
            .await
            .status()
            .is_success()
    );
    let before = h.dump();
    expect_error(
        h.installed(&order.order_id, &first.certificate_serial_hex, &key_a)
            .await,
        409,
        ErrorCode::AlreadyInstalled,
    )
    .await;
    assert_eq!(before, h.dump());
    // and nothing more can be issued on a completed order
    let r = h
        .client
        .post(h.url(&paths::challenge(&order.order_id)))
        .send()
        .await
        .unwrap();
    expect_error(r, 409, ErrorCode::OrderCompleted).await;
}

#[tokio::test]
async fn malformed_requests_get_clear_codes_and_change_nothing() {
    let h = Harness::start().await;
    let holder = h.holder(KeyAlgorithm::Rsa2048);
    let order = h.order(
        &holder,
        InitialState::Ready,
        KeyPolicy::New,
        KeyAlgorithm::Rsa2048,
        false,
    );
    let good = h
        .issue_request(&order.order_id, &holder, &new_key(KeyAlgorithm::Rsa2048))
        .await;
    let issue_path = paths::issue(&order.order_id);
    let before = h.dump();

    // body larger than 64 KiB
    let big = serde_json::json!({"serial_hex": "01", "issuer_dn": "x".repeat(70 * 1024)});
    expect_error(
        h.post(paths::STATUS, &big).await,
        413,
        ErrorCode::BodyTooLarge,
    )
    .await;
    // not JSON; JSON of the wrong shape; wrong media type
    let r = h
        .client
        .post(h.url(&issue_path))
        .header("content-type", "application/json")
        .body("{nope")
        .send()
        .await
        .unwrap();
    expect_error(r, 400, ErrorCode::MalformedJson).await;
    expect_error(
        h.post(&issue_path, &serde_json::json!({"challenge_id": 5}))
            .await,
        400,
        ErrorCode::MalformedJson,
    )
    .await;
    let r = h
        .client
        .post(h.url(paths::STATUS))
        .body("serial_hex=01")
        .send()
        .await
        .unwrap();
    expect_error(r, 415, ErrorCode::UnsupportedMediaType).await;
    // bad base64
    let mut bad = serde_json::to_value(&good).unwrap();
    bad["csr_der"] = "***not base64***".into();
    expect_error(
        h.post(&issue_path, &bad).await,
        400,
        ErrorCode::InvalidBase64,
    )
    .await;
    // serial and issuer
    let st = |issuer_dn: Option<&str>, serial: &str| StatusRequest {
        issuer_der: None,
        issuer_dn: issuer_dn.map(str::to_owned),
        serial_hex: serial.to_owned(),
    };
    expect_error(
        h.post(paths::STATUS, &st(Some("CN=x"), "zz-not-hex")).await,
        400,
        ErrorCode::InvalidSerial,
    )
    .await;
    expect_error(
        h.post(paths::STATUS, &st(None, "01")).await,
        400,
        ErrorCode::InvalidIssuer,
    )
    .await;
    expect_error(
        h.post(paths::STATUS, &st(Some("garbage"), "01")).await,
        400,
        ErrorCode::InvalidIssuer,
    )
    .await;
    let bad_der = StatusRequest {
        issuer_der: Some(vec![0x30, 0x05, 1, 2]),
        issuer_dn: None,
        serial_hex: "01".into(),
    };
    expect_error(
        h.post(paths::STATUS, &bad_der).await,
        400,
        ErrorCode::InvalidIssuer,
    )
    .await;
    // malformed certificate
    let mut req = good.clone();
    req.old_certificate_der = b"\x30\x03\x02\x01\x01".to_vec();
    expect_error(
        h.post(&issue_path, &req).await,
        400,
        ErrorCode::MalformedCertificate,
    )
    .await;
    // malformed CSR (the challenge answer covers its hash, so sign that)
    let mut req = good.clone();
    req.csr_der = b"not a csr".to_vec();
    let ch_nonce = h
        .portal()
        .store()
        .challenge(&req.challenge_id)
        .unwrap()
        .unwrap()
        .nonce;
    req.challenge_signature = rcgen::SigningKey::sign(
        &holder.key,
        &ukey_portal_api::challenge_signed_data(
            &order.order_id,
            &ch_nonce,
            &req.csr_der,
            req.transport_key_spki.as_deref(),
        ),
    )
    .unwrap();
    expect_error(
        h.post(&issue_path, &req).await,
        400,
        ErrorCode::MalformedCsr,
    )
    .await;
    // CSR whose signature is broken
    let mut req = good.clone();
    let n = req.csr_der.len();
    req.csr_der[n - 5] ^= 0x55;
    req.challenge_signature = rcgen::SigningKey::sign(
        &holder.key,
        &ukey_portal_api::challenge_signed_data(
            &order.order_id,
            &ch_nonce,
            &req.csr_der,
            req.transport_key_spki.as_deref(),
        ),
    )
    .unwrap();
    expect_error(
        h.post(&issue_path, &req).await,
        400,
        ErrorCode::CsrSignatureInvalid,
    )
    .await;
    // unknown order, unknown route, wrong method
    let r = h
        .client
        .post(h.url(&paths::challenge("ord_nope")))
        .send()
        .await
        .unwrap();
    expect_error(r, 404, ErrorCode::OrderNotFound).await;
    expect_error(
        h.post(&paths::issue("ord_nope"), &good).await,
        404,
        ErrorCode::OrderNotFound,
    )
    .await;
    expect_error(
        h.client.get(h.url("/api/v1/nothing")).send().await.unwrap(),
        404,
        ErrorCode::NotFound,
    )
    .await;
    expect_error(
        h.client.get(h.url(paths::STATUS)).send().await.unwrap(),
        405,
        ErrorCode::MethodNotAllowed,
    )
    .await;

    assert_eq!(before, h.dump(), "a failed request changed the database");
    // and the good request still works afterwards
    let _: ukey_portal_api::IssueResponse = h.post_ok(&issue_path, &good).await;
    assert_ne!(before, h.dump());
}

#[tokio::test]
async fn proof_failures_get_clear_codes_and_change_nothing() {
    let h = Harness::start().await;
    let holder = h.holder(KeyAlgorithm::Rsa2048);
    let order = h.order(
        &holder,
        InitialState::Ready,
        KeyPolicy::New,
        KeyAlgorithm::Rsa2048,
        false,
    );
    let issue_path = paths::issue(&order.order_id);
    let nk = new_key(KeyAlgorithm::Rsa2048);
    let good = h.issue_request(&order.order_id, &holder, &nk).await;
    let before = h.dump();

    // challenge signed by another key
    let mut req = good.clone();
    let intruder = new_key(KeyAlgorithm::Rsa2048);
    let nonce = h
        .portal()
        .store()
        .challenge(&req.challenge_id)
        .unwrap()
        .unwrap()
        .nonce;
    req.challenge_signature = rcgen::SigningKey::sign(
        &intruder,
        &ukey_portal_api::challenge_signed_data(
            &order.order_id,
            &nonce,
            &req.csr_der,
            req.transport_key_spki.as_deref(),
        ),
    )
    .unwrap();
    expect_error(
        h.post(&issue_path, &req).await,
        403,
        ErrorCode::ChallengeSignatureInvalid,
    )
    .await;
    // signature by the right key over another CSR (the answer is bound to the CSR)
    let mut req = good.clone();
    req.csr_der = csr(&new_key(KeyAlgorithm::Rsa2048), CN, ORG);
    expect_error(
        h.post(&issue_path, &req).await,
        403,
        ErrorCode::ChallengeSignatureInvalid,
    )
    .await;
    // the wrong algorithm name for the key
    let mut req = good.clone();
    req.signature_algorithm = ukey_portal_api::SignatureAlgorithm::EcdsaP256Sha256;
    expect_error(
        h.post(&issue_path, &req).await,
        403,
        ErrorCode::ChallengeSignatureInvalid,
    )
    .await;
    // unknown challenge
    let mut req = good.clone();
    req.challenge_id = "ch_unknown".into();
    expect_error(
        h.post(&issue_path, &req).await,
        404,
        ErrorCode::ChallengeNotFound,
    )
    .await;
    // requests that each need their own fresh challenge: prepared first, so the
    // database snapshot below includes every challenge
    let mut cases = Vec::new();
    // a CSR for another subject
    let req = signed_request(&h, &order.order_id, &holder, csr(&nk, "李四", ORG)).await;
    cases.push((req, 422, ErrorCode::SubjectMismatch));
    // a CSR with the wrong algorithm, and one reusing the old key against policy "new"
    let req = signed_request(
        &h,
        &order.order_id,
        &holder,
        csr(&new_key(KeyAlgorithm::EcP256), CN, ORG),
    )
    .await;
    cases.push((req, 422, ErrorCode::AlgorithmMismatch));
    let req = signed_request(&h, &order.order_id, &holder, csr(&holder.key, CN, ORG)).await;
    cases.push((req, 422, ErrorCode::KeyPolicyViolation));
    // somebody else's certificate (another serial)
    let other = h.holder(KeyAlgorithm::Rsa2048);
    let req = signed_request(&h, &order.order_id, &other, csr(&nk, CN, ORG)).await;
    cases.push((req, 422, ErrorCode::CertificateMismatch));
    // a forged certificate: same issuer name and serial, signed by another key
    let forger_key = new_key(KeyAlgorithm::EcP256);
    let mut ca_params = rcgen::CertificateParams::default();
    ca_params.distinguished_name = h.portal().ca().display_name().split(", ").fold(
        rcgen::DistinguishedName::new(),
        |mut dn, part| {
            let (k, v) = part.split_once('=').unwrap();
            match k {
                "C" => dn.push(
                    rcgen::DnType::CountryName,
                    rcgen::DnValue::PrintableString(v.try_into().unwrap()),
                ),
                "O" => dn.push(rcgen::DnType::OrganizationName, v),
                _ => dn.push(rcgen::DnType::CommonName, v),
            }
            dn
        },
    );
    let forger = rcgen::Issuer::new(ca_params, forger_key);
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = subject(CN, ORG);
    params.serial_number = Some(rcgen::SerialNumber::from_slice(
        &hex::decode(&holder.serial_hex).unwrap(),
    ));
    let stolen_key = new_key(KeyAlgorithm::Rsa2048);
    let forged = params
        .signed_by(&stolen_key, &forger)
        .unwrap()
        .der()
        .to_vec();
    let forged_holder = Holder {
        key: stolen_key,
        cert_der: forged,
        serial_hex: holder.serial_hex.clone(),
    };
    let req = signed_request(&h, &order.order_id, &forged_holder, csr(&nk, CN, ORG)).await;
    cases.push((req, 422, ErrorCode::CertificateNotTrusted));

    let before2 = h.dump();
    for (req, status, code) in &cases {
        expect_error(h.post(&issue_path, req).await, *status, *code).await;
    }
    assert_eq!(before2, h.dump(), "a failed request changed the database");

    // the first challenge is still unused: the good request succeeds once, then replays fail
    let _: ukey_portal_api::IssueResponse = h.post_ok(&issue_path, &good).await;
    assert_ne!(before, h.dump());
    let after = h.dump();
    expect_error(
        h.post(&issue_path, &good).await,
        409,
        ErrorCode::ChallengeUsed,
    )
    .await;
    assert_eq!(after, h.dump());
}

/// A fresh challenge answered by `holder` for `csr_der`.
async fn signed_request(
    h: &Harness,
    order_id: &str,
    holder: &Holder,
    csr_der: Vec<u8>,
) -> ukey_portal_api::IssueRequest {
    let ch = h.challenge(order_id).await;
    let transport = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .unwrap()
        .subject_public_key_info();
    ukey_portal_api::IssueRequest {
        challenge_signature: rcgen::SigningKey::sign(
            &holder.key,
            &ukey_portal_api::challenge_signed_data(
                order_id,
                &ch.nonce,
                &csr_der,
                Some(&transport),
            ),
        )
        .unwrap(),
        challenge_id: ch.challenge_id,
        signature_algorithm: holder.sig_alg(),
        old_certificate_der: holder.cert_der.clone(),
        csr_der,
        transport_key_spki: Some(transport),
        renewal_code: None,
    }
}

#[tokio::test]
async fn unpaid_rejected_and_shipped_orders_cannot_issue() {
    let h = Harness::start().await;
    let holder = h.holder(KeyAlgorithm::Rsa2048);
    let order = h.order(
        &holder,
        InitialState::AwaitingPayment,
        KeyPolicy::New,
        KeyAlgorithm::Rsa2048,
        false,
    );
    let before = h.dump();
    let r = h
        .client
        .post(h.url(&paths::challenge(&order.order_id)))
        .send()
        .await
        .unwrap();
    let e = expect_error(r, 409, ErrorCode::OrderNotReady).await;
    assert!(e.message.contains("awaiting_payment"), "{}", e.message);
    assert_eq!(before, h.dump());

    // a challenge obtained while ready stops working once the order is rejected
    h.portal().pay(&order.order_id).unwrap();
    let req = h
        .issue_request(&order.order_id, &holder, &new_key(KeyAlgorithm::Rsa2048))
        .await;
    h.portal()
        .reject(&order.order_id, "材料不全 / incomplete documents")
        .unwrap();
    let before = h.dump();
    expect_error(
        h.post(&paths::issue(&order.order_id), &req).await,
        409,
        ErrorCode::OrderNotReady,
    )
    .await;
    assert_eq!(before, h.dump());

    let h2 = h.holder(KeyAlgorithm::Rsa2048);
    let o2 = h.order(
        &h2,
        InitialState::Ready,
        KeyPolicy::New,
        KeyAlgorithm::EcP256,
        false,
    );
    h.portal().ship(&o2.order_id, "EMS001").unwrap();
    let r = h
        .client
        .post(h.url(&paths::challenge(&o2.order_id)))
        .send()
        .await
        .unwrap();
    expect_error(r, 409, ErrorCode::OrderNotReady).await;
}

#[tokio::test]
async fn an_expired_challenge_is_refused() {
    let h = Harness::start_with(|c| c.challenge_ttl = time::Duration::seconds(1)).await;
    let holder = h.holder(KeyAlgorithm::EcP256);
    let order = h.order(
        &holder,
        InitialState::Ready,
        KeyPolicy::New,
        KeyAlgorithm::EcP256,
        false,
    );
    let req = h
        .issue_request(&order.order_id, &holder, &new_key(KeyAlgorithm::EcP256))
        .await;
    tokio::time::sleep(std::time::Duration::from_millis(2100)).await;
    let before = h.dump();
    expect_error(
        h.post(&paths::issue(&order.order_id), &req).await,
        410,
        ErrorCode::ChallengeExpired,
    )
    .await;
    assert_eq!(before, h.dump());
}

#[tokio::test]
async fn installed_failures_get_clear_codes_and_change_nothing() {
    let h = Harness::start().await;
    let holder = h.holder(KeyAlgorithm::EcP256);
    let order = h.order(
        &holder,
        InitialState::Ready,
        KeyPolicy::New,
        KeyAlgorithm::EcP256,
        false,
    );
    let nk = new_key(KeyAlgorithm::EcP256);
    let issued = h.issue(&order.order_id, &holder, &nk).await;
    let before = h.dump();
    // signed by the old key instead of the new one
    expect_error(
        h.installed(&order.order_id, &issued.certificate_serial_hex, &holder.key)
            .await,
        403,
        ErrorCode::InstalledSignatureInvalid,
    )
    .await;
    // a serial this order never issued; a bad serial; an unknown order
    expect_error(
        h.installed(&order.order_id, "0BADBEEF", &nk).await,
        409,
        ErrorCode::CertificateNotIssued,
    )
    .await;
    expect_error(
        h.installed(&order.order_id, "xyz", &nk).await,
        400,
        ErrorCode::InvalidSerial,
    )
    .await;
    expect_error(
        h.installed("ord_nope", &issued.certificate_serial_hex, &nk)
            .await,
        404,
        ErrorCode::OrderNotFound,
    )
    .await;
    assert_eq!(before, h.dump());
}

#[tokio::test]
async fn admin_api_needs_the_bearer_token_and_manages_orders() {
    let h = Harness::start().await;
    let url = h.url(paths::ADMIN_ORDERS);
    let before = h.dump();
    expect_error(
        h.client.get(&url).send().await.unwrap(),
        401,
        ErrorCode::Unauthorized,
    )
    .await;
    let r = h
        .client
        .get(&url)
        .bearer_auth("0123456789abcdef0123456789abcdef")
        .send()
        .await
        .unwrap();
    expect_error(r, 401, ErrorCode::Unauthorized).await;
    let r = h
        .client
        .post(&url)
        .json(&serde_json::json!({"serial_hex": "01"}))
        .send()
        .await
        .unwrap();
    expect_error(r, 401, ErrorCode::Unauthorized).await;
    assert_eq!(before, h.dump());

    let token = h.admin_token();
    let create =
        |body: serde_json::Value| h.client.post(&url).bearer_auth(&token).json(&body).send();
    let r = create(
        serde_json::json!({"serial_hex": "3a:5f", "years": 3, "target_algorithm": "EC-P256",
        "with_encryption_cert": true, "key_policy": "same"}),
    )
    .await
    .unwrap();
    assert_eq!(r.status().as_u16(), 201);
    let v: ukey_portal_api::OrderView = r.json().await.unwrap();
    assert_eq!(
        (v.state.as_str(), v.serial_hex.as_str(), v.terms.years),
        ("awaiting_payment", "3A5F", 3)
    );
    expect_error(
        create(serde_json::json!({"serial_hex": "3A5F"}))
            .await
            .unwrap(),
        409,
        ErrorCode::InvalidTransition,
    )
    .await;
    expect_error(
        create(serde_json::json!({"serial_hex": "77", "years": 0}))
            .await
            .unwrap(),
        400,
        ErrorCode::InvalidArgument,
    )
    .await;

    let post = |path: String, body: serde_json::Value| {
        h.client
            .post(h.url(&path))
            .bearer_auth(&token)
            .json(&body)
            .send()
    };
    let id = v.order_id.clone();
    let r = post(
        paths::ADMIN_SHIP.replace("{order_id}", &id),
        serde_json::json!({"tracking_number": " "}),
    )
    .await
    .unwrap();
    expect_error(r, 400, ErrorCode::InvalidArgument).await;
    let r = h
        .client
        .post(h.url(&paths::ADMIN_PAY.replace("{order_id}", &id)))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.json::<ukey_portal_api::OrderView>().await.unwrap().state,
        "ready"
    );
    let r = h
        .client
        .post(h.url(&paths::ADMIN_PAY.replace("{order_id}", &id)))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    expect_error(r, 409, ErrorCode::InvalidTransition).await;
    let r = post(
        paths::ADMIN_REJECT.replace("{order_id}", &id),
        serde_json::json!({"reason": "重复申请"}),
    )
    .await
    .unwrap();
    assert_eq!(
        r.json::<ukey_portal_api::OrderView>()
            .await
            .unwrap()
            .reject_reason
            .as_deref(),
        Some("重复申请")
    );
    let r = h
        .client
        .get(h.url(&paths::ADMIN_ORDER.replace("{order_id}", &id)))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.json::<ukey_portal_api::OrderView>().await.unwrap().state,
        "rejected"
    );
    let r = h
        .client
        .get(h.url(&paths::ADMIN_ORDER.replace("{order_id}", "ord_x")))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    expect_error(r, 404, ErrorCode::OrderNotFound).await;
    let list: Vec<ukey_portal_api::OrderView> = h
        .client
        .get(&url)
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list.len(), 1);
}

#[tokio::test]
async fn every_mounted_route_is_documented_and_served() {
    let h = Harness::start().await;
    let served = h
        .client
        .get(h.url(paths::OPENAPI))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(served, OPENAPI_YAML);
    for path in paths::ALL {
        assert!(
            OPENAPI_YAML.contains(&format!("\n  {path}:")),
            "{path} is not in openapi.yaml"
        );
        let concrete = path.replace("{order_id}", "ord_x");
        for method in [reqwest::Method::GET, reqwest::Method::POST] {
            let r = h
                .client
                .request(method.clone(), h.url(&concrete))
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            let body = r.text().await.unwrap();
            assert!(
                !body.contains("\"not_found\""),
                "{method} {path} is not mounted: {status} {body}"
            );
        }
    }
    let ca = h
        .client
        .get(h.url(paths::CA_CERT))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(ca.as_ref(), h.portal().ca().cert_der());
}

#[tokio::test]
async fn the_escrowed_key_goes_only_to_a_transport_key_the_old_key_signed_for() {
    let h = Harness::start().await;
    let holder = h.holder(KeyAlgorithm::EcP256);
    let order = h
        .portal()
        .create_order(&ukey_portal_api::CreateOrderRequest {
            serial_hex: holder.serial_hex.clone(),
            issuer_der: None,
            issuer_dn: None,
            years: 1,
            state: InitialState::Ready,
            key_policy: KeyPolicy::New,
            with_encryption_cert: true,
            target_algorithm: KeyAlgorithm::EcP256,
            old_encryption_serial_hex: None,
        })
        .unwrap();
    let issue_path = paths::issue(&order.order_id);
    let new = new_key(KeyAlgorithm::EcP256);
    // No transport key, the CSR's key, the old certificate's key: refused, nothing kept.
    let refused = [
        None,
        Some(new.subject_public_key_info()),
        Some(holder.key.subject_public_key_info()),
        Some(b"not a key".to_vec()),
    ];
    for transport in refused {
        let req = h
            .issue_request_with(&order.order_id, &holder, &new, transport.clone())
            .await;
        let e = expect_error(
            h.post(&issue_path, &req).await,
            422,
            ErrorCode::TransportKeyInvalid,
        )
        .await;
        assert!(!e.message.is_empty(), "{transport:?}");
    }
    assert!(
        matches!(h.status(&holder).await, RenewalStatus::Ready { .. }),
        "nothing issued"
    );

    // The transport key is covered by the old key's signature: swapping it after
    // signing is refused.
    let mut swapped = h
        .issue_request_with(
            &order.order_id,
            &holder,
            &new,
            Some(new_key(KeyAlgorithm::EcP256).subject_public_key_info()),
        )
        .await;
    swapped.transport_key_spki = Some(new_key(KeyAlgorithm::EcP256).subject_public_key_info());
    expect_error(
        h.post(&issue_path, &swapped).await,
        403,
        ErrorCode::ChallengeSignatureInvalid,
    )
    .await;

    // A transport key made for it receives the envelope.
    let transport = new_key(KeyAlgorithm::Rsa2048);
    let req = h
        .issue_request_with(
            &order.order_id,
            &holder,
            &new,
            Some(transport.subject_public_key_info()),
        )
        .await;
    let issued: ukey_portal_api::IssueResponse = h.post_ok(&issue_path, &req).await;
    let enc = issued.encryption.expect("an encryption certificate");
    assert_eq!(
        enc.envelope.as_ref().unwrap().recipient_spki_sha256,
        aws_lc_rs::digest::digest(
            &aws_lc_rs::digest::SHA256,
            &transport.subject_public_key_info()
        )
        .as_ref()
    );
    assert!(matches!(
        enc.envelope.as_ref().unwrap().key_transport,
        ukey_portal_api::KeyTransport::RsaOaepSha1 { .. }
    ));
}

#[tokio::test]
async fn completion_also_revokes_the_named_old_encryption_certificate() {
    let h = Harness::start().await;
    let holder = h.holder(KeyAlgorithm::Rsa2048);
    let old_enc = h.holder(KeyAlgorithm::Rsa2048);
    let order = h
        .portal()
        .create_order(&ukey_portal_api::CreateOrderRequest {
            serial_hex: holder.serial_hex.clone(),
            issuer_der: None,
            issuer_dn: None,
            years: 1,
            state: InitialState::Ready,
            key_policy: KeyPolicy::Same,
            with_encryption_cert: true,
            target_algorithm: KeyAlgorithm::Rsa2048,
            old_encryption_serial_hex: Some(old_enc.serial_hex.to_lowercase()),
        })
        .unwrap();
    let issued = h.issue(&order.order_id, &holder, &holder.key).await;
    let enc = issued.encryption.as_ref().unwrap();
    assert_eq!(
        enc.envelope.as_ref().unwrap().private_key_algorithm,
        KeyAlgorithm::Rsa2048
    );
    let (ok, text) = openssl_verify(
        &h.data_dir().join("ca-cert.pem"),
        None,
        &enc.certificate_der,
        h.dir.path(),
    );
    assert!(ok, "{text}");
    let done: InstalledResponse = h
        .installed(&order.order_id, &issued.certificate_serial_hex, &holder.key)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        done.revoked_serials_hex,
        vec![holder.serial_hex.clone(), old_enc.serial_hex.clone()]
    );
    let (ok, text) = openssl_crl(
        &h.data_dir().join("ca-cert.pem"),
        &h.crl_der().await,
        h.dir.path(),
    );
    assert!(ok, "{text}");
    for serial in [&holder.serial_hex, &old_enc.serial_hex] {
        assert!(text.contains(&format!("Serial Number: {serial}")), "{text}");
    }
    assert!(
        !text.contains(&enc.certificate_serial_hex),
        "the new encryption certificate stays valid"
    );
}

#[tokio::test]
async fn concurrent_identical_requests_get_the_same_certificate() {
    let h = Harness::start().await;
    let holder = h.holder(KeyAlgorithm::EcP256);
    let order = h.order(
        &holder,
        InitialState::Ready,
        KeyPolicy::New,
        KeyAlgorithm::EcP256,
        true,
    );
    let nk = new_key(KeyAlgorithm::EcP256);
    let mut reqs = Vec::new();
    for _ in 0..6 {
        reqs.push(h.issue_request(&order.order_id, &holder, &nk).await);
    }
    let path = paths::issue(&order.order_id);
    let answers = futures_join_all(reqs.iter().map(|r| h.post(&path, r))).await;
    let mut certs = Vec::new();
    for a in answers {
        assert!(a.status().is_success());
        let r: ukey_portal_api::IssueResponse = a.json().await.unwrap();
        certs.push((r.certificate_der, r.encryption.unwrap().certificate_der));
    }
    certs.dedup();
    assert_eq!(certs.len(), 1, "every answer names the same certificates");
    let (_, crl_text) = openssl_crl(
        &h.data_dir().join("ca-cert.pem"),
        &h.crl_der().await,
        h.dir.path(),
    );
    assert!(
        !crl_text.contains("Serial Number"),
        "nothing was revoked: {crl_text}"
    );
}

/// Runs futures concurrently on this task (no extra dependency).
async fn futures_join_all<F: std::future::Future>(futs: impl Iterator<Item = F>) -> Vec<F::Output> {
    let handles: Vec<_> = futs.map(Box::pin).collect();
    let mut out = Vec::new();
    let mut pending: Vec<_> = handles.into_iter().map(Some).collect();
    let mut results: Vec<Option<F::Output>> = (0..pending.len()).map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut done = true;
        for (i, slot) in pending.iter_mut().enumerate() {
            if let Some(f) = slot {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => {
                        results[i] = Some(v);
                        *slot = None;
                    }
                    std::task::Poll::Pending => done = false,
                }
            }
        }
        if done {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    })
    .await;
    for r in results {
        out.extend(r);
    }
    out
}

/// A renewal code (issue 16: a moment of access to an unlocked key must not become a
/// year-long certificate): with the policy on, an order gets an 8-digit code that the
/// admin view and `order show` give, the unauthenticated pay page never shows, and every
/// issue request must carry. A request without it or with a wrong one changes nothing
/// but the count of wrong codes; after five wrong codes even the right one is refused.
#[tokio::test]
async fn renewal_codes_guard_issuance() {
    let h = Harness::start().await;
    let before = h.holder(KeyAlgorithm::EcP256);
    let unguarded = h.ready_order(&before, KeyAlgorithm::EcP256);
    assert_eq!(unguarded.renewal_code, None, "made before the policy");
    assert!(!h.portal().renewal_code_required().unwrap());
    h.portal().set_renewal_code_required(true).unwrap();

    let holder = h.holder(KeyAlgorithm::EcP256);
    let order = h.ready_order(&holder, KeyAlgorithm::EcP256);
    let code = order.renewal_code.clone().expect("a code");
    assert_eq!(code.len(), 8);
    assert!(!code.starts_with('0') && code.bytes().all(|b| b.is_ascii_digit()));
    assert_ne!(
        h.ready_order(&h.holder(KeyAlgorithm::EcP256), KeyAlgorithm::EcP256)
            .renewal_code,
        Some(code.clone()),
        "each order its own code"
    );
    match h.status(&holder).await {
        RenewalStatus::Ready {
            renewal_code_required,
            ..
        } => assert!(renewal_code_required),
        other => panic!("{other:?}"),
    }
    let page = h
        .client
        .get(h.url(&format!("/pay?serial={}", holder.serial_hex)))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(page.contains("续期码"), "{page}");
    assert!(!page.contains(&code), "the pay page never shows the code");

    let new_key = new_key(KeyAlgorithm::EcP256);
    let dump = h.dump();
    let req = h.issue_request(&order.order_id, &holder, &new_key).await;
    let r = h.post(&paths::issue(&order.order_id), &req).await;
    let e = expect_error(r, 403, ErrorCode::RenewalCodeRequired).await;
    assert!(e.message.contains("续期码"), "{}", e.message);
    assert_eq!(
        strip_challenges(&h.dump()),
        strip_challenges(&dump),
        "no row changed"
    );

    let mut req = h.issue_request(&order.order_id, &holder, &new_key).await;
    req.renewal_code = Some(
        if code == "12345678" {
            "87654321"
        } else {
            "12345678"
        }
        .into(),
    );
    let r = h.post(&paths::issue(&order.order_id), &req).await;
    let e = expect_error(r, 403, ErrorCode::RenewalCodeInvalid).await;
    assert!(e.message.contains("4 tries left"), "{}", e.message);
    let stored = h.portal().store().order(&order.order_id).unwrap().unwrap();
    assert_eq!(stored.renewal_code_failures, 1);
    assert_eq!(stored.state.as_str(), "ready", "nothing issued");

    // Typed as the page shows it.
    let mut req = h.issue_request(&order.order_id, &holder, &new_key).await;
    req.renewal_code = Some(format!("{}-{}", &code[..4], &code[4..]));
    let issued: ukey_portal_api::IssueResponse =
        h.post_ok(&paths::issue(&order.order_id), &req).await;
    assert!(!issued.certificate_der.is_empty());

    // An order whose tries are used up refuses the right code too.
    let other = h.holder(KeyAlgorithm::EcP256);
    let locked = h.ready_order(&other, KeyAlgorithm::EcP256);
    let right = locked.renewal_code.clone().unwrap();
    let wrong = if right == "99999999" {
        "88888888"
    } else {
        "99999999"
    };
    for _ in 0..5 {
        let mut req = h.issue_request(&locked.order_id, &other, &new_key).await;
        req.renewal_code = Some(wrong.into());
        let r = h.post(&paths::issue(&locked.order_id), &req).await;
        expect_error(r, 403, ErrorCode::RenewalCodeInvalid).await;
    }
    let mut req = h.issue_request(&locked.order_id, &other, &new_key).await;
    req.renewal_code = Some(right);
    let r = h.post(&paths::issue(&locked.order_id), &req).await;
    let e = expect_error(r, 403, ErrorCode::RenewalCodeInvalid).await;
    assert!(e.message.contains("too many"), "{}", e.message);

    // The order made before the policy still renews without a code.
    h.issue(&unguarded.order_id, &before, &new_key).await;
}

/// The dump without the challenges table (each request above takes a fresh challenge).
fn strip_challenges(dump: &str) -> String {
    let mut out = String::new();
    let mut skip = false;
    for line in dump.lines() {
        if line.starts_with("== ") {
            skip = line == "== challenges";
        }
        if !skip {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// The sweep of renewals left half-way (issue 16, §3): an order issued but never
/// confirmed installed goes back to ready, and what it issued is on the CRL
/// (cessationOfOperation, read by openssl crl); the holder can renew again; completed
/// orders and recent ones are left alone.
#[tokio::test]
async fn the_sweep_revokes_unconfirmed_renewals_and_reopens_their_orders() {
    let h = Harness::start().await;
    let holder = h.holder(KeyAlgorithm::EcP256);
    let order = h.ready_order(&holder, KeyAlgorithm::EcP256);
    let stale = h
        .issue(&order.order_id, &holder, &new_key(KeyAlgorithm::EcP256))
        .await;
    // A completed renewal is not touched.
    let done_holder = h.holder(KeyAlgorithm::EcP256);
    let done = h.ready_order(&done_holder, KeyAlgorithm::EcP256);
    let done_key = new_key(KeyAlgorithm::EcP256);
    let installed = h.issue(&done.order_id, &done_holder, &done_key).await;
    assert!(
        h.installed(&done.order_id, &installed.certificate_serial_hex, &done_key)
            .await
            .status()
            .is_success()
    );

    let recent = h
        .portal()
        .sweep_unconfirmed(time::Duration::days(30))
        .unwrap();
    assert!(recent.is_empty(), "nothing that old: {recent:?}");
    let swept = h.portal().sweep_unconfirmed(time::Duration::ZERO).unwrap();
    assert_eq!(
        swept,
        vec![(
            order.order_id.clone(),
            vec![stale.certificate_serial_hex.clone()]
        )]
    );
    assert!(matches!(
        h.status(&holder).await,
        RenewalStatus::Ready { .. }
    ));
    assert_eq!(
        h.portal().show_order(&done.order_id).unwrap().state,
        "completed"
    );
    let dir = tempfile::tempdir().unwrap();
    let (ok, text) = openssl_crl(
        &h.data_dir().join("ca-cert.pem"),
        &h.crl_der().await,
        dir.path(),
    );
    assert!(ok, "{text}");
    let at = text
        .find(&stale.certificate_serial_hex)
        .expect("on the CRL");
    assert!(
        text[at..].contains("Cessation Of Operation"),
        "{}",
        &text[at..]
    );
    assert!(
        !text.contains(&holder.serial_hex),
        "the certificate being renewed stays valid"
    );
    // The holder renews again.
    h.issue(&order.order_id, &holder, &new_key(KeyAlgorithm::EcP256))
        .await;
}
