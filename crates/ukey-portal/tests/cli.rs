//! The `ukey-portal` binary with a CA made by OpenSSL: serve, admin CLI, a renewal
//! over HTTP, `openssl verify` and `openssl crl -verify`. Also HTTPS.

mod common;

use rcgen::PublicKeyData as _;
use std::path::Path;

use common::*;
use rcgen::SigningKey as _;
use ukey_portal_api::{
    ChallengeResponse, ErrorCode, InstalledRequest, InstalledResponse, IssueRequest, IssueResponse,
    OrderView, RenewalStatus, StatusRequest, challenge_signed_data, installed_signed_data, paths,
};

use common::{openssl_ok as openssl, portal_cli as cli};

#[tokio::test]
async fn openssl_made_ca_works_end_to_end_through_the_binary() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    // An RSA CA with a PKCS#1 ("traditional") key, and an EC holder key in SEC1 form,
    // exactly as the openssl CLI writes them.
    openssl(d, &["genrsa", "-traditional", "-out", "ca.key", "2048"]);
    openssl(
        d,
        &[
            "req",
            "-x509",
            "-new",
            "-key",
            "ca.key",
            "-days",
            "3650",
            "-subj",
            "/C=CN/O=OpenSSL Test/CN=OpenSSL Test CA",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
            "-out",
            "ca.pem",
        ],
    );
    openssl(
        d,
        &[
            "ecparam",
            "-name",
            "prime256v1",
            "-genkey",
            "-noout",
            "-out",
            "old.key",
        ],
    );
    openssl(
        d,
        &[
            "req",
            "-new",
            "-key",
            "old.key",
            "-utf8",
            "-subj",
            &format!("/C=CN/O={ORG}/CN={CN}"),
            "-out",
            "old.csr",
        ],
    );
    openssl(
        d,
        &[
            "x509",
            "-req",
            "-in",
            "old.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-set_serial",
            "0x00C0FFEE01",
            "-days",
            "30",
            "-out",
            "old.pem",
        ],
    );
    let old_der = pem::parse(std::fs::read(d.join("old.pem")).unwrap())
        .unwrap()
        .into_contents();
    let old_key =
        ukey_portal::ca::load_key(&std::fs::read_to_string(d.join("old.key")).unwrap()).unwrap();
    let data = d.join("data");

    let (_server, base) = spawn_serve(
        portal_bin()
            .arg("--data")
            .arg(&data)
            .args(["serve", "--listen", "127.0.0.1:0", "--ca-cert"])
            .arg(d.join("ca.pem"))
            .arg("--ca-key")
            .arg(d.join("ca.key"))
            .env("RUST_LOG", "warn"),
    );
    let base = base.expect("serve prints its URL");
    assert!(base.starts_with("http://127.0.0.1:"), "{base:?}");

    // The business side, on the same data directory while the server runs. The issuer
    // is typed the way `openssl x509 -issuer` prints it.
    let id = cli(
        &data,
        &[
            "order",
            "create",
            "--serial",
            "C0:FF:EE:01",
            "--issuer",
            "C = CN, O = OpenSSL Test, CN = OpenSSL Test CA",
            "--algorithm",
            "EC-P256",
            "--encryption-cert",
        ],
    );
    let id = id.trim().to_owned();
    assert!(id.starts_with("ord_"), "{id}");
    let other = cli(
        &data,
        &[
            "order",
            "create",
            "--serial",
            "01",
            "--issuer-cert",
            d.join("ca.pem").to_str().unwrap(),
            "--state",
            "ready",
        ],
    );
    let show: OrderView =
        serde_json::from_str(&cli(&data, &["order", "show", &id, "--json"])).unwrap();
    assert_eq!(show.state, "awaiting_payment");
    assert_eq!(show.serial_hex, "C0FFEE01");
    let text = cli(&data, &["order", "pay", &id]);
    assert!(text.contains("ready"), "{text}");

    let http = reqwest::Client::new();
    let post = |path: String, body: serde_json::Value| {
        http.post(format!("{base}{path}")).json(&body).send()
    };

    // status by the DER issuer of the OpenSSL certificate matches the typed DN
    let (_, old) = x509_parser::parse_x509_certificate(&old_der).unwrap();
    let st = StatusRequest {
        issuer_der: Some(old.issuer().as_raw().to_vec()),
        issuer_dn: None,
        serial_hex: "c0ffee01".into(),
    };
    let status: RenewalStatus = post(paths::STATUS.into(), serde_json::to_value(&st).unwrap())
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(status.order_id(), Some(id.as_str()), "{status:?}");
    let st = StatusRequest {
        issuer_der: Some(old.issuer().as_raw().to_vec()),
        issuer_dn: None,
        serial_hex: "01".into(),
    };
    let status: RenewalStatus = post(paths::STATUS.into(), serde_json::to_value(&st).unwrap())
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        status.order_id(),
        Some(other.trim()),
        "--issuer-cert matches the DER issuer"
    );

    // renew with a new key
    let new_key = new_key(ukey_portal_api::KeyAlgorithm::EcP256);
    let ch: ChallengeResponse = http
        .post(format!("{base}{}", paths::challenge(&id)))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let csr_der = csr(&new_key, CN, ORG);
    let transport = new_key_transport();
    let req = IssueRequest {
        challenge_id: ch.challenge_id,
        challenge_signature: old_key
            .sign(&challenge_signed_data(
                &id,
                &ch.nonce,
                &csr_der,
                Some(&transport),
            ))
            .unwrap(),
        signature_algorithm: ukey_portal_api::SignatureAlgorithm::EcdsaP256Sha256,
        old_certificate_der: old_der.clone(),
        csr_der,
        transport_key_spki: Some(transport),
        renewal_code: None,
    };
    let r = post(paths::issue(&id), serde_json::to_value(&req).unwrap())
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.text().await.unwrap());
    let issued: IssueResponse = r.json().await.unwrap();
    let (ok, text) = openssl_verify(&d.join("ca.pem"), None, &issued.certificate_der, d);
    assert!(ok, "{text}");
    let enc = issued.encryption.as_ref().unwrap();
    let (ok, text) = openssl_verify(&d.join("ca.pem"), None, &enc.certificate_der, d);
    assert!(ok, "{text}");
    let (_, new) = x509_parser::parse_x509_certificate(&issued.certificate_der).unwrap();
    assert_eq!(
        new.subject().as_raw(),
        old.subject().as_raw(),
        "subject copied byte for byte"
    );
    assert_eq!(new.issuer().as_raw(), old.issuer().as_raw());

    let inst = InstalledRequest {
        certificate_serial_hex: issued.certificate_serial_hex.clone(),
        signature: new_key
            .sign(&installed_signed_data(&id, &issued.certificate_serial_hex))
            .unwrap(),
        signature_algorithm: ukey_portal_api::SignatureAlgorithm::EcdsaP256Sha256,
    };
    let done: InstalledResponse = post(paths::installed(&id), serde_json::to_value(&inst).unwrap())
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(done.revoked_serials_hex, vec!["C0FFEE01".to_owned()]);

    let crl = http
        .get(format!("{base}{}", paths::CRL))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let (ok, text) = openssl_crl(&d.join("ca.pem"), &crl, d);
    assert!(ok, "{text}");
    assert!(text.contains("Serial Number: C0FFEE01"), "{text}");

    let list: Vec<OrderView> =
        serde_json::from_str(&cli(&data, &["order", "list", "--json"])).unwrap();
    assert_eq!(
        list.iter().find(|o| o.order_id == id).unwrap().state,
        "completed"
    );
    assert_eq!(
        list.iter()
            .find(|o| o.order_id == id)
            .unwrap()
            .subject
            .as_deref(),
        Some(&*format!("C=CN, O={ORG}, CN={CN}"))
    );
}

#[test]
fn cli_refuses_bad_input_with_a_message_and_nonzero_exit() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let id = cli(&data, &["order", "create", "--serial", "0A"]);
    for (args, needle) in [
        (vec!["order", "create", "--serial", "xyz"], "invalid_serial"),
        (vec!["order", "create", "--serial", "0A"], "still open"),
        (
            vec!["order", "create", "--serial", "0B", "--years", "11"],
            "years",
        ),
        (
            vec!["order", "create", "--serial", "0B", "--issuer", "nonsense"],
            "invalid_issuer",
        ),
        (
            vec!["order", "create", "--serial", "0B", "--algorithm", "DSA"],
            "unknown algorithm",
        ),
        (
            vec!["order", "reject", id.trim(), "--reason", "  "],
            "reason",
        ),
        (
            vec!["order", "ship", "ord_missing", "--tracking", "X"],
            "order_not_found",
        ),
    ] {
        let (ok, text) = run(portal_bin().arg("--data").arg(&data).args(&args));
        assert!(!ok, "{args:?} should fail");
        assert!(text.contains(needle), "{args:?}: {text}");
    }
    let list = cli(&data, &["order", "list"]);
    assert_eq!(list.lines().count(), 1, "{list}");
    // a CA key that does not match the certificate is refused before anything is copied
    let other = tempfile::tempdir().unwrap();
    openssl(
        other.path(),
        &[
            "ecparam",
            "-name",
            "prime256v1",
            "-genkey",
            "-noout",
            "-out",
            "k.pem",
        ],
    );
    let (ok, text) = run(portal_bin()
        .arg("--data")
        .arg(&data)
        .args(["serve", "--ca-cert"])
        .arg(data.join("ca-cert.pem"))
        .arg("--ca-key")
        .arg(other.path().join("k.pem")));
    assert!(!ok);
    assert!(text.contains("does not belong"), "{text}");
}

#[tokio::test]
async fn https_with_rustls() {
    let tmp = tempfile::tempdir().unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    std::fs::write(tmp.path().join("tls.pem"), cert.pem()).unwrap();
    std::fs::write(tmp.path().join("tls.key"), key.serialize_pem()).unwrap();
    let portal = std::sync::Arc::new(
        ukey_portal::Portal::open(&ukey_portal::PortalConfig::new(tmp.path().join("data")))
            .unwrap(),
    );
    let tls = ukey_portal::TlsFiles {
        cert: tmp.path().join("tls.pem"),
        key: tmp.path().join("tls.key"),
    };
    let server = ukey_portal::start(portal, "127.0.0.1:0".parse().unwrap(), Some(tls), None)
        .await
        .unwrap();
    assert!(
        server.url.starts_with("https://127.0.0.1:"),
        "{}",
        server.url
    );
    let client = reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(cert.pem().as_bytes()).unwrap()])
        .build()
        .unwrap();
    let r = client
        .get(format!("{}{}", server.url, paths::OPENAPI))
        .send()
        .await
        .unwrap();
    assert!(r.headers().contains_key("date"));
    assert_eq!(r.text().await.unwrap(), ukey_portal_api::OPENAPI_YAML);
    let r = client
        .post(format!("{}{}", server.url, paths::STATUS))
        .json(&serde_json::json!({"serial_hex": "zz", "issuer_dn": "CN=x"}))
        .send()
        .await
        .unwrap();
    expect_error(r, 400, ErrorCode::InvalidSerial).await;
    // a client that does not trust the certificate cannot connect
    let strict = reqwest::Client::builder()
        .tls_certs_only([])
        .build()
        .unwrap();
    assert!(
        strict
            .get(format!("{}{}", server.url, paths::OPENAPI))
            .send()
            .await
            .is_err()
    );
    server.stop().await.unwrap();
}

#[test]
fn ca_accept_issuer_works_on_a_new_data_dir_and_a_bad_pem_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    openssl(
        d,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "old.key",
            "-out",
            "old-ca.pem",
            "-days",
            "30",
            "-subj",
            "/CN=Old CA",
        ],
    );
    std::fs::write(
        d.join("bad.pem"),
        "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
    )
    .unwrap();

    // A data directory that does not exist yet: accepting an issuer is a first step.
    let data = d.join("new-data");
    let bad = run(portal_bin()
        .arg("--data")
        .arg(&data)
        .args(["ca", "accept-issuer"])
        .arg(d.join("bad.pem")));
    assert!(!bad.0, "a bad PEM must be refused: {}", bad.1);
    assert!(
        !data.join("accepted-issuers.pem").exists(),
        "a refused PEM must not be written"
    );

    let out = cli(
        &data,
        &[
            "ca",
            "accept-issuer",
            d.join("old-ca.pem").to_str().unwrap(),
        ],
    );
    assert!(out.contains("accepted 1"), "{out}");
    let written = std::fs::read_to_string(data.join("accepted-issuers.pem")).unwrap();
    assert_eq!(
        written,
        std::fs::read_to_string(d.join("old-ca.pem")).unwrap()
    );
}

/// A transport key's SubjectPublicKeyInfo (a fresh P-256 key).
fn new_key_transport() -> Vec<u8> {
    rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .unwrap()
        .subject_public_key_info()
}

/// Issue 16, secrets at rest: a data directory the portal makes is its owner's alone
/// (0700, every file 0600, the SQLite journal files included, after it has issued);
/// one that others can read stops it, with the fix, before anything is read or written.
#[cfg(unix)]
#[tokio::test]
async fn the_data_directory_is_the_owners_alone_and_an_open_one_is_refused() {
    use std::os::unix::fs::PermissionsExt as _;
    let h = Harness::start().await;
    let holder = h.holder(ukey_portal_api::KeyAlgorithm::EcP256);
    let order = h.order(
        &holder,
        ukey_portal_api::InitialState::Ready,
        ukey_portal_api::KeyPolicy::New,
        ukey_portal_api::KeyAlgorithm::EcP256,
        true,
    );
    let new = new_key(ukey_portal_api::KeyAlgorithm::EcP256);
    h.issue(&order.order_id, &holder, &new).await;
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    let data = h.data_dir();
    assert_eq!(mode(&data), 0o700);
    let mut files = Vec::new();
    for e in std::fs::read_dir(&data).unwrap() {
        let p = e.unwrap().path();
        files.push(p.file_name().unwrap().to_string_lossy().into_owned());
        assert_eq!(mode(&p), 0o600, "{}", p.display());
    }
    for want in ["portal.sqlite3", "ca-key.pem", "admin-token", "cmp-key.pem"] {
        assert!(files.iter().any(|f| f == want), "{want} in {files:?}");
    }

    // Opened up to others: the binary refuses, says how to fix it, and writes nothing.
    let tmp = tempfile::tempdir().unwrap();
    let open = tmp.path().join("data");
    cli(&open, &["order", "list"]);
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o755)).unwrap();
    let before: Vec<_> = std::fs::read_dir(&open)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    let (ok, text) = run(portal_bin()
        .arg("--data")
        .arg(&open)
        .args(["order", "list"]));
    assert!(!ok, "{text}");
    assert!(text.contains("chmod 700"), "{text}");
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o700)).unwrap();
    std::fs::set_permissions(
        open.join("admin-token"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let (ok, text) = run(portal_bin()
        .arg("--data")
        .arg(&open)
        .args(["order", "list"]));
    assert!(!ok, "{text}");
    assert!(text.contains("admin-token (644)"), "{text}");
    let after: Vec<_> = std::fs::read_dir(&open)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(after, before);
}

/// The reason `openssl crl -text` gives for `serial`.
fn crl_reason(text: &str, serial: &str) -> Option<String> {
    let at = text.find(&format!("Serial Number: {serial}"))?;
    let rest = &text[at..];
    let end = rest[1..]
        .find("Serial Number:")
        .map_or(rest.len(), |i| i + 1);
    let block = &rest[..end];
    let i = block.find("X509v3 CRL Reason Code:")?;
    block[i..].lines().nth(1).map(|l| l.trim().to_owned())
}

/// Issue 16, operators can act: `ukey-portal revoke --serial … --reason keyCompromise`,
/// and `order cancel`, which revokes what the order issued; OpenSSL reads each reason
/// from the CRL it verifies.
#[tokio::test]
async fn an_operator_revokes_with_a_reason_and_a_cancelled_order_revokes_what_it_issued() {
    use ukey_portal_api::{InitialState, KeyAlgorithm, KeyPolicy};
    let h = Harness::start().await;
    let data = h.data_dir();
    // A completed renewal: its new certificate revoked for key compromise.
    let holder = h.holder(KeyAlgorithm::EcP256);
    let order = h.order(
        &holder,
        InitialState::Ready,
        KeyPolicy::New,
        KeyAlgorithm::EcP256,
        false,
    );
    let new = new_key(KeyAlgorithm::EcP256);
    let issued = h.issue(&order.order_id, &holder, &new).await;
    let r = h
        .installed(&order.order_id, &issued.certificate_serial_hex, &new)
        .await;
    assert!(r.status().is_success());
    cli(
        &data,
        &[
            "revoke",
            "--serial",
            &issued.certificate_serial_hex,
            "--reason",
            "keyCompromise",
        ],
    );
    // Issued, never installed, then cancelled.
    let other = h.holder(KeyAlgorithm::EcP256);
    let order2 = h.order(
        &other,
        InitialState::Ready,
        KeyPolicy::New,
        KeyAlgorithm::EcP256,
        false,
    );
    let new2 = new_key(KeyAlgorithm::EcP256);
    let issued2 = h.issue(&order2.order_id, &other, &new2).await;
    let out = cli(
        &data,
        &[
            "order",
            "cancel",
            &order2.order_id,
            "--reason",
            "付款已退回 refunded",
        ],
    );
    assert!(out.contains(&issued2.certificate_serial_hex), "{out}");
    match h.status(&other).await {
        RenewalStatus::Rejected { reason, .. } => assert!(reason.contains("refunded"), "{reason}"),
        s => panic!("{s:?}"),
    }

    let dir = tempfile::tempdir().unwrap();
    let (ok, text) = openssl_crl(&data.join("ca-cert.pem"), &h.crl_der().await, dir.path());
    assert!(ok, "{text}");
    for (serial, reason) in [
        (issued.certificate_serial_hex.as_str(), "Key Compromise"),
        (
            issued2.certificate_serial_hex.as_str(),
            "Cessation Of Operation",
        ),
        (holder.serial_hex.as_str(), "Superseded"),
    ] {
        assert_eq!(
            crl_reason(&text, serial).as_deref(),
            Some(reason),
            "{serial} in:\n{text}"
        );
    }

    // Refused, with a message: cancelling a completed order, revoking twice, a serial
    // this portal did not issue, an unknown reason.
    let refused = |args: &[&str], says: &str| {
        let (ok, text) = run(portal_bin().arg("--data").arg(&data).args(args));
        assert!(!ok, "{args:?}: {text}");
        assert!(text.contains(says), "{args:?}: {text}");
    };
    refused(
        &["order", "cancel", &order.order_id, "--reason", "x"],
        "revoking its certificate",
    );
    refused(
        &[
            "revoke",
            "--serial",
            &issued.certificate_serial_hex,
            "--reason",
            "superseded",
        ],
        "already revoked (keyCompromise)",
    );
    refused(
        &["revoke", "--serial", "0A0B", "--reason", "keyCompromise"],
        "issued no certificate",
    );
    refused(
        &[
            "revoke",
            "--serial",
            &issued2.certificate_serial_hex,
            "--reason",
            "lost",
        ],
        "keyCompromise",
    );
}
