//! The portal's CMP server (`/.well-known/cmp`) judged by OpenSSL 3's own CMP client
//! (`openssl cmp -cmd kur`, old key and certificate from files, a new key made by
//! OpenSSL), and its freshness and authentication refusals by messages this workspace's
//! `ukey-cmp` builds.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{Harness, Holder, run, write_pem};
use rcgen::SigningKey as _;
use ukey_cmp::server;
use ukey_cmp::spki::AlgorithmIdentifierOwned;
use ukey_cmp::{Answer, CmpSigner, RequestKind, Transaction};
use ukey_portal_api::{InitialState, KeyAlgorithm, KeyPolicy, RenewalStatus, paths};

struct Signer<'a>(&'a rcgen::KeyPair);

impl CmpSigner for Signer<'_> {
    fn algorithm(&self) -> AlgorithmIdentifierOwned {
        ukey_cmp::signature_algorithm(&rcgen::PublicKeyData::subject_public_key_info(self.0))
            .expect("alg")
    }
    fn sign(&self, data: &[u8]) -> ukey_cmp::Result<Vec<u8>> {
        Ok(self.0.sign(data).expect("sign"))
    }
}

/// The holder's key and certificate, the CA certificate and a new OpenSSL P-256 key,
/// as files.
fn files(h: &Harness, holder: &Holder, dir: &Path) {
    std::fs::write(dir.join("old.key"), holder.key.serialize_pem()).expect("key");
    write_pem(&dir.join("old.pem"), "CERTIFICATE", &holder.cert_der);
    std::fs::copy(h.data_dir().join("ca-cert.pem"), dir.join("ca.pem")).expect("ca");
    let (ok, out) = run(std::process::Command::new("openssl")
        .args([
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
        ])
        .arg("-out")
        .arg(dir.join("new.key")));
    assert!(ok, "{out}");
}

/// `openssl cmp -cmd kur` against the portal, started on a blocking thread (the portal
/// serves on this runtime).
fn spawn_openssl_kur(
    h: &Harness,
    dir: &Path,
    path: &str,
    extra: &[&str],
) -> tokio::task::JoinHandle<(bool, String)> {
    let server = h.server.url.trim_start_matches("http://").to_owned();
    let dir = dir.to_owned();
    let path = path.trim_start_matches('/').to_owned();
    let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let mut cmd = std::process::Command::new("openssl");
        cmd.current_dir(&dir)
            .args(["cmp", "-cmd", "kur", "-server", &server, "-path", &path])
            .args(["-cert", "old.pem", "-key", "old.key", "-newkey", "new.key"])
            .args(["-trusted", "ca.pem", "-certout", "out.pem"])
            .args(&extra);
        run(&mut cmd)
    })
}

/// [`spawn_openssl_kur`], awaited.
async fn openssl_kur(h: &Harness, dir: &Path, path: &str, extra: &[&str]) -> (bool, String) {
    spawn_openssl_kur(h, dir, path, extra).await.expect("join")
}

fn pubkey_of(args: &[&str], file: &Path) -> String {
    let (ok, out) = run(std::process::Command::new("openssl").args(args).arg(file));
    assert!(ok, "{out}");
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openssl_kur_gets_a_certificate_for_its_new_key_and_its_certconf_completes_the_order() {
    let h = Harness::start().await;
    let holder = h.holder(KeyAlgorithm::EcP256);
    let order = h.order(
        &holder,
        InitialState::Ready,
        KeyPolicy::New,
        KeyAlgorithm::EcP256,
        false,
    );
    let dir = tempfile::tempdir().expect("dir");
    files(&h, &holder, dir.path());

    let (ok, out) = openssl_kur(&h, dir.path(), "/.well-known/cmp/p/renewal", &[]).await;
    assert!(ok, "openssl cmp kur failed:\n{out}");

    // The certificate OpenSSL saved chains to the portal's CA and carries the new key.
    let saved = std::fs::read_to_string(dir.path().join("out.pem")).expect("certout");
    let der = pem::parse(&saved).expect("pem").into_contents();
    let (ok, text) = common::openssl_verify(&dir.path().join("ca.pem"), None, &der, dir.path());
    assert!(ok, "{text}");
    assert_eq!(
        pubkey_of(
            &["x509", "-noout", "-pubkey", "-in"],
            &dir.path().join("out.pem")
        ),
        pubkey_of(&["pkey", "-pubout", "-in"], &dir.path().join("new.key")),
    );
    // OpenSSL confirmed: the order is completed and the old certificate revoked.
    match h.status(&holder).await {
        RenewalStatus::Completed {
            certificate_serial_hex,
            ..
        } => assert_eq!(
            certificate_serial_hex,
            ukey_portal_api::serial_hex_from_bytes(
                x509_parser::parse_x509_certificate(&der)
                    .expect("cert")
                    .1
                    .raw_serial()
            )
        ),
        other => panic!("{other:?}"),
    }
    let crl = h.crl_der().await;
    let (ok, text) = common::openssl_crl(&dir.path().join("ca.pem"), &crl, dir.path());
    assert!(ok, "{text}");
    assert!(
        text.contains(&holder.serial_hex),
        "old serial in the CRL:\n{text}"
    );
    assert_eq!(
        h.portal().show_order(&order.order_id).unwrap().state,
        "completed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openssl_is_told_unpaid_waits_and_a_review_decides_while_it_polls() {
    let h = Harness::start_with(|c| c.cmp.cmp_check_after = 1).await;
    let dir = tempfile::tempdir().expect("dir");

    // Unpaid: "waiting", polled until OpenSSL gives up; nothing issued.
    let holder = h.holder(KeyAlgorithm::EcP256);
    let order = h.order(
        &holder,
        InitialState::AwaitingPayment,
        KeyPolicy::New,
        KeyAlgorithm::EcP256,
        false,
    );
    files(&h, &holder, dir.path());
    let (ok, out) = openssl_kur(&h, dir.path(), paths::CMP, &["-total_timeout", "3"]).await;
    assert!(!ok, "{out}");
    assert!(
        out.contains("received 'waiting' PKIStatus") && out.contains("awaiting payment"),
        "OpenSSL reports the wait and its reason:\n{out}"
    );
    assert!(!dir.path().join("out.pem").exists());
    assert_eq!(
        h.portal().show_order(&order.order_id).unwrap().state,
        "awaiting_payment"
    );

    // Paid, held for review: OpenSSL polls; the reviewer approves; it gets the certificate.
    h.portal().pay(&order.order_id).unwrap();
    h.portal().review(&order.order_id).unwrap();
    assert!(matches!(
        h.status(&holder).await,
        RenewalStatus::UnderReview { .. }
    ));
    let polling = spawn_openssl_kur(&h, dir.path(), paths::CMP, &["-total_timeout", "60"]);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        !polling.is_finished(),
        "OpenSSL polls while the review lasts"
    );
    h.portal().approve(&order.order_id).unwrap();
    let (ok, out) = polling.await.expect("join");
    assert!(ok, "{out}");
    assert!(dir.path().join("out.pem").exists());
    assert_eq!(
        h.portal().show_order(&order.order_id).unwrap().state,
        "completed"
    );

    // Under review, then rejected: OpenSSL reports the reviewer's reason.
    let rejected = h.holder(KeyAlgorithm::EcP256);
    let order = h.order(
        &rejected,
        InitialState::Ready,
        KeyPolicy::New,
        KeyAlgorithm::EcP256,
        false,
    );
    h.portal().review(&order.order_id).unwrap();
    let dir = tempfile::tempdir().expect("dir");
    files(&h, &rejected, dir.path());
    let polling = spawn_openssl_kur(&h, dir.path(), paths::CMP, &["-total_timeout", "60"]);
    tokio::time::sleep(Duration::from_secs(2)).await;
    h.portal()
        .reject(&order.order_id, "营业执照已过期 business licence expired")
        .unwrap();
    let (ok, out) = polling.await.expect("join");
    assert!(!ok, "{out}");
    assert!(out.contains("business licence expired"), "{out}");
    assert!(!dir.path().join("out.pem").exists());
}

/// Sends a DER PKIMessage; returns the DER answer.
async fn post_cmp(h: &Harness, der: Vec<u8>) -> Vec<u8> {
    let r = h
        .client
        .post(h.url(paths::CMP))
        .header("content-type", "application/pkixcmp")
        .body(der)
        .send()
        .await
        .expect("post");
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "application/pkixcmp");
    r.bytes().await.expect("body").to_vec()
}

/// The client's check: the protecting certificate chains to the portal's CA.
fn trust(h: &Harness) -> impl Fn(&[u8], &[Vec<u8>]) -> ukey_cmp::Result<()> + '_ {
    move |cert, extra| {
        ukey_trust::chain::verify(
            cert,
            extra,
            &[h.portal().ca().cert_der().to_vec()],
            time::OffsetDateTime::now_utc(),
        )
        .map(drop)
        .map_err(|e| ukey_cmp::CmpError::Untrusted(e.explain(false)))
    }
}

/// The answer's text after the checks a client makes.
fn answer_of(h: &Harness, der: &[u8], tx: &mut Transaction) -> Answer {
    let checked = ukey_cmp::check_answer(der, tx, &trust(h)).expect("checked answer");
    ukey_cmp::answer(&checked).expect("answer")
}

fn kur(holder: &Holder, new: &rcgen::KeyPair, tx: &Transaction) -> Vec<u8> {
    ukey_cmp::request(
        RequestKind::KeyUpdate,
        &holder.cert_der,
        &rcgen::PublicKeyData::subject_public_key_info(new),
        &Signer(&holder.key),
        &Signer(new),
        tx,
    )
    .expect("kur")
}

fn rejected_text(a: &Answer) -> &str {
    match a {
        Answer::Rejected { text } | Answer::Error { text } => text,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replays_stale_times_foreign_signers_and_wrong_nonces_are_refused_and_change_nothing() {
    let h = Harness::start().await;
    let holder = h.holder(KeyAlgorithm::EcP256);
    let order = h.order(
        &holder,
        InitialState::Ready,
        KeyPolicy::New,
        KeyAlgorithm::EcP256,
        false,
    );
    let new = common::new_key(KeyAlgorithm::EcP256);
    let before = h.dump();

    // A stale messageTime (10 minutes slow), and one from the future.
    for offset in [-600, 600] {
        let mut tx = Transaction::new().expect("tx");
        tx.clock_offset_secs = offset;
        let rsp = post_cmp(&h, kur(&holder, &new, &tx)).await;
        assert!(rejected_text(&answer_of(&h, &rsp, &mut tx)).contains("messageTime"));
    }
    // Protected by a key that is not the certificate's.
    let mut tx = Transaction::new().expect("tx");
    let other = common::new_key(KeyAlgorithm::EcP256);
    let forged = ukey_cmp::request(
        RequestKind::KeyUpdate,
        &holder.cert_der,
        &rcgen::PublicKeyData::subject_public_key_info(&new),
        &Signer(&other),
        &Signer(&new),
        &tx,
    )
    .expect("kur");
    let rsp = post_cmp(&h, forged).await;
    assert!(rejected_text(&answer_of(&h, &rsp, &mut tx)).contains("does not verify"));
    // A certificate of another CA, with an order for its serial.
    let stranger_ca = {
        let key = common::new_key(KeyAlgorithm::EcP256);
        let mut p = rcgen::CertificateParams::default();
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.distinguished_name = common::subject("Stranger CA", "Elsewhere");
        let cert = p.self_signed(&key).expect("ca");
        rcgen::Issuer::from_ca_cert_der(cert.der(), key).expect("issuer")
    };
    let stranger = Holder::issued_by(&stranger_ca, KeyAlgorithm::EcP256, common::CN, common::ORG);
    let mut tx = Transaction::new().expect("tx");
    let rsp = post_cmp(&h, kur(&stranger, &new, &tx)).await;
    assert!(rejected_text(&answer_of(&h, &rsp, &mut tx)).contains("order"));
    // A proof of possession by another key than the one requested.
    let mut tx = Transaction::new().expect("tx");
    let bad_pop = ukey_cmp::request(
        RequestKind::KeyUpdate,
        &holder.cert_der,
        &rcgen::PublicKeyData::subject_public_key_info(&new),
        &Signer(&holder.key),
        &Signer(&other),
        &tx,
    )
    .expect("kur");
    let rsp = post_cmp(&h, bad_pop).await;
    assert!(rejected_text(&answer_of(&h, &rsp, &mut tx)).contains("proof of possession"));
    // Garbage.
    let rsp = post_cmp(&h, b"not a PKIMessage".to_vec()).await;
    assert!(server::read(&rsp).is_err(), "an answer to no transaction");
    assert_eq!(h.dump(), before, "refused requests change no row");

    // A good request; then its replay (same transactionID and nonce) is refused.
    let mut tx = Transaction::new().expect("tx");
    let good = kur(&holder, &new, &tx);
    let rsp = post_cmp(&h, good.clone()).await;
    let Answer::Issued {
        cert_der,
        cert_req_id,
        ..
    } = answer_of(&h, &rsp, &mut tx)
    else {
        panic!("not issued")
    };
    let issued = h.dump();
    let rsp = post_cmp(&h, good).await;
    // The replay's answer is addressed to the same nonce as the first answer was.
    let mut again = tx.clone();
    assert!(rejected_text(&answer_of(&h, &rsp, &mut again)).contains("transactionID"));
    assert_eq!(h.dump(), issued);

    // certConf with a wrong recipNonce: refused, the order stays issued.
    let mut wrong = tx.clone();
    wrong.recip_nonce = Some(vec![9; 16]);
    let conf = ukey_cmp::cert_conf(
        &holder.cert_der,
        &cert_der,
        &cert_req_id,
        &Signer(&holder.key),
        &mut wrong,
    )
    .expect("certConf");
    let rsp = post_cmp(&h, conf).await;
    assert!(rejected_text(&answer_of(&h, &rsp, &mut wrong)).contains("recipNonce"));
    assert_eq!(
        h.portal().show_order(&order.order_id).unwrap().state,
        "issued"
    );
    // The right one completes it, and once more is answered pkiConf again.
    let conf = ukey_cmp::cert_conf(
        &holder.cert_der,
        &cert_der,
        &cert_req_id,
        &Signer(&holder.key),
        &mut tx,
    )
    .expect("certConf");
    let rsp = post_cmp(&h, conf).await;
    let checked = ukey_cmp::check_answer(&rsp, &mut tx, &trust(&h)).expect("checked");
    assert!(ukey_cmp::is_pki_conf(&checked));
    assert_eq!(
        h.portal().show_order(&order.order_id).unwrap().state,
        "completed"
    );
    let conf = ukey_cmp::cert_conf(
        &holder.cert_der,
        &cert_der,
        &cert_req_id,
        &Signer(&holder.key),
        &mut tx,
    )
    .expect("certConf");
    let rsp = post_cmp(&h, conf).await;
    let checked = ukey_cmp::check_answer(&rsp, &mut tx, &trust(&h)).expect("checked");
    assert!(ukey_cmp::is_pki_conf(&checked));
}

/// The renewal code over CMP: OpenSSL's client sends it as a generalInfo INTEGER
/// (`-geninfo 1.3.6.1.4.1.32473.1.16:int:N`). Without it, or with a wrong one, OpenSSL is
/// told why and gets no certificate; with it, the renewal goes through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openssl_must_send_the_orders_renewal_code_in_general_info() {
    let h = Harness::start().await;
    h.portal().set_renewal_code_required(true).unwrap();
    let holder = h.holder(KeyAlgorithm::EcP256);
    let order = h.ready_order(&holder, KeyAlgorithm::EcP256);
    let code = order.renewal_code.clone().expect("a code");
    let dir = tempfile::tempdir().expect("dir");
    files(&h, &holder, dir.path());
    let oid = server::RENEWAL_CODE.to_string();
    assert_eq!(oid, "1.3.6.1.4.1.32473.1.16");

    let (ok, out) = openssl_kur(&h, dir.path(), "/.well-known/cmp", &[]).await;
    assert!(!ok, "no code, no certificate:\n{out}");
    assert!(out.contains("renewal code"), "{out}");
    assert!(!dir.path().join("out.pem").exists());

    let wrong = if code == "12345678" {
        "87654321"
    } else {
        "12345678"
    };
    let geninfo = format!("{oid}:int:{wrong}");
    let (ok, out) = openssl_kur(&h, dir.path(), "/.well-known/cmp", &["-geninfo", &geninfo]).await;
    assert!(!ok, "a wrong code, no certificate:\n{out}");
    assert!(out.contains("wrong renewal code"), "{out}");
    assert_eq!(
        h.portal()
            .store()
            .order(&order.order_id)
            .unwrap()
            .unwrap()
            .renewal_code_failures,
        1
    );

    let geninfo = format!("{oid}:int:{code}");
    let (ok, out) = openssl_kur(&h, dir.path(), "/.well-known/cmp", &["-geninfo", &geninfo]).await;
    assert!(ok, "the right code:\n{out}");
    assert!(dir.path().join("out.pem").exists());
    assert_eq!(
        h.portal().show_order(&order.order_id).unwrap().state,
        "completed"
    );
}
