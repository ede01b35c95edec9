//! Issue 16, §3: a CA rollover. The portal's CA is replaced by a new key under the
//! same name (the hard case: names cannot tell the two apart); the old CA is retired,
//! not thrown away. Each CA key keeps its own revocations and signs its own CRL, which
//! OpenSSL verifies with that CA's certificate; a certificate of the retired CA can
//! still be renewed, and its revocation lands on the retired CA's CRL.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;
use ukey_portal_api::{ErrorCode, IssueResponse, KeyAlgorithm, paths};

use common::{openssl_ok as openssl, portal_cli as cli};

const CA_SUBJECT: &str = "/C=CN/O=Rollover Test/CN=Rollover Test CA";
const CA_DN: &str = "C = CN, O = Rollover Test, CN = Rollover Test CA";

/// A P-256 CA made by OpenSSL: `<name>.key`, `<name>.pem`; its SKI, lower-case hex.
fn make_ca(d: &Path, name: &str) -> String {
    let key = format!("{name}.key");
    let cert = format!("{name}.pem");
    openssl(
        d,
        &[
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-out",
            &key,
        ],
    );
    openssl(
        d,
        &[
            "req",
            "-x509",
            "-new",
            "-key",
            &key,
            "-days",
            "3650",
            "-subj",
            CA_SUBJECT,
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
            "-out",
            &cert,
        ],
    );
    let (ok, text) = run(Command::new("openssl").current_dir(d).args([
        "x509",
        "-in",
        &cert,
        "-noout",
        "-ext",
        "subjectKeyIdentifier",
    ]));
    assert!(ok, "{text}");
    let ski = text
        .lines()
        .nth(1)
        .expect("OpenSSL gives the CA a subjectKeyIdentifier")
        .trim()
        .replace(':', "")
        .to_ascii_lowercase();
    assert_eq!(ski.len(), 40, "{text}");
    ski
}

fn serve(data: &Path, d: &Path, ca: &str) -> (Server, Api) {
    let (server, base) = spawn_serve(
        portal_bin()
            .arg("--data")
            .arg(data)
            .args(["serve", "--listen", "127.0.0.1:0", "--ca-cert"])
            .arg(d.join(format!("{ca}.pem")))
            .arg("--ca-key")
            .arg(d.join(format!("{ca}.key")))
            .env("RUST_LOG", "warn"),
    );
    let base = base.expect("serve prints its URL");
    (server, Api::new(&base))
}

/// A paid order for `holder`'s certificate, made by the operator's CLI.
fn paid_order(data: &Path, holder: &Holder) -> String {
    cli(
        data,
        &[
            "order",
            "create",
            "--serial",
            &holder.serial_hex,
            "--issuer",
            CA_DN,
            "--algorithm",
            "EC-P256",
            "--state",
            "ready",
        ],
    )
    .trim()
    .to_owned()
}

/// Renews `holder` through the whole protocol (issue, installed); the new holder.
async fn renew(api: &Api, order_id: &str, holder: &Holder) -> (Holder, IssueResponse) {
    let key = new_key(KeyAlgorithm::EcP256);
    let issued = api.issue(order_id, holder, &key).await;
    let r = api
        .installed(order_id, &issued.certificate_serial_hex, &key)
        .await;
    assert!(r.status().is_success(), "{}", r.text().await.unwrap());
    let next = Holder {
        key,
        cert_der: issued.certificate_der.clone(),
        serial_hex: issued.certificate_serial_hex.clone(),
    };
    (next, issued)
}

async fn get(api: &Api, path: &str) -> reqwest::Response {
    reqwest::get(api.url(path)).await.unwrap()
}

/// The serials a CRL lists, as `openssl crl -text` prints them.
fn listed(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("Serial Number: "))
        .map(str::to_owned)
        .collect()
}

/// `openssl verify -crl_check` of `cert_der` with both CA certificates (one name) and
/// both CRLs: OpenSSL must pick each certificate's CA and CRL by key identifier.
fn verify_with_crls(d: &Path, cert_der: &[u8], name: &str) -> (bool, String) {
    let cert = d.join(format!("{name}.pem"));
    write_pem(&cert, "CERTIFICATE", cert_der);
    let (ok, text) = run(Command::new("openssl").current_dir(d).args([
        "verify",
        "-crl_check",
        "-CAfile",
        "both-cas.pem",
        "-CRLfile",
        "crl-a.pem",
        "-CRLfile",
        "crl-b.pem",
        &format!("{name}.pem"),
    ]));
    (ok && text.contains(": OK"), text)
}

#[tokio::test]
async fn a_rollover_keeps_the_old_ca_signing_the_crl_of_what_it_issued() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let data = d.join("data");
    let ski_a = make_ca(d, "a");
    let ski_b = make_ca(d, "b");
    assert_ne!(ski_a, ski_b);

    // The holder's certificate, issued by CA A outside the portal (as a CA's old
    // system would have), renewed at the portal under A: H0 → H1.
    let ca_a =
        ukey_portal::ca::load_key(&std::fs::read_to_string(d.join("a.key")).unwrap()).unwrap();
    let a_pem = std::fs::read_to_string(d.join("a.pem")).unwrap();
    let a_der = pem::parse(&a_pem).unwrap().into_contents();
    let issuer_a = rcgen::Issuer::from_ca_cert_der(&a_der.as_slice().into(), ca_a).unwrap();
    let h0 = Holder::issued_by(&issuer_a, KeyAlgorithm::EcP256, CN, ORG);
    let (h1, _) = {
        let (_server, api) = serve(&data, d, "a");
        let order = paid_order(&data, &h0);
        renew(&api, &order, &h0).await
    };

    // The rollover: serve with CA B (same name, new key). A is kept, retired.
    let retired = data.join("retired-cas").join(&ski_a);
    assert!(!retired.exists());
    let (_server, api) = serve(&data, d, "b");
    assert_eq!(
        std::fs::read_to_string(retired.join("ca-cert.pem")).unwrap(),
        a_pem
    );
    assert!(retired.join("ca-key.pem").exists());
    let show = cli(&data, &["ca", "show"]);
    assert!(
        show.contains(&ski_a) && show.contains(&ski_b) && show.contains("retired"),
        "{show}"
    );

    // H1 (A's, A retired) is renewed under B: H2. The new certificate names B's CRL.
    let order = paid_order(&data, &h1);
    let (h2, issued) = renew(&api, &order, &h1).await;
    let (ok, text) = openssl_verify(&d.join("b.pem"), None, &h2.cert_der, d);
    assert!(ok, "{text}");
    let (ok, text) = openssl_verify(&d.join("a.pem"), None, &h2.cert_der, d);
    assert!(!ok, "H2 is B's, not A's: {text}");
    let (_, parsed) = x509_parser::parse_x509_certificate(&issued.certificate_der).unwrap();
    let cdp = format!("{:?}", parsed.extensions());
    assert!(cdp.contains(&paths::crl_of_key(&ski_b)), "{cdp}");
    cli(
        &data,
        &[
            "revoke",
            "--serial",
            &h2.serial_hex,
            "--reason",
            "keyCompromise",
        ],
    );

    // Each CA key's CRL, signed by that key, lists what that key issued.
    let crl_a = get(&api, &paths::crl_of_key(&ski_a)).await;
    assert_eq!(crl_a.headers()["content-type"], "application/pkix-crl");
    let crl_a = crl_a.bytes().await.unwrap().to_vec();
    let crl_b = get(&api, &paths::crl_of_key(&ski_b))
        .await
        .bytes()
        .await
        .unwrap();
    assert_eq!(
        get(&api, paths::CRL).await.bytes().await.unwrap(),
        crl_b,
        "/crl is the issuing CA's"
    );
    let (ok, text_a) = openssl_crl(&d.join("a.pem"), &crl_a, d);
    assert!(ok, "A's CRL verifies with A: {text_a}");
    let (ok, text_b) = openssl_crl(&d.join("b.pem"), &crl_b, d);
    assert!(ok, "B's CRL verifies with B: {text_b}");
    let (ok, _) = openssl_crl(&d.join("b.pem"), &crl_a, d);
    assert!(!ok, "A's CRL does not verify with B");
    let mut on_a = listed(&text_a);
    on_a.sort();
    let mut want_a = vec![h0.serial_hex.clone(), h1.serial_hex.clone()];
    want_a.sort();
    assert_eq!(on_a, want_a, "A's CRL:\n{text_a}");
    assert_eq!(
        listed(&text_b),
        vec![h2.serial_hex.clone()],
        "B's CRL:\n{text_b}"
    );

    // A relying party with both CA certificates and both CRLs: each revoked
    // certificate is found revoked, each CRL matched to its CA by key identifier.
    std::fs::write(
        d.join("both-cas.pem"),
        a_pem + &std::fs::read_to_string(d.join("b.pem")).unwrap(),
    )
    .unwrap();
    for (name, der) in [("crl-a", &crl_a[..]), ("crl-b", &crl_b[..])] {
        write_pem(&d.join(format!("{name}.pem")), "X509 CRL", der);
    }
    for (holder, name) in [(&h1, "h1"), (&h2, "h2")] {
        let (ok, text) = verify_with_crls(d, &holder.cert_der, name);
        assert!(
            !ok && text.contains("certificate revoked"),
            "{name}: {text}"
        );
    }

    // A key the portal does not hold has no CRL here.
    let r = get(&api, &paths::crl_of_key(&"ab".repeat(20))).await;
    expect_error(r, 404, ErrorCode::CaKeyNotFound).await;

    // The rollover survives a restart with the new CA given again: nothing is retired
    // twice, and A still signs its CRL.
    drop(_server);
    let (_server, api) = serve(&data, d, "b");
    let again = get(&api, &paths::crl_of_key(&ski_a))
        .await
        .bytes()
        .await
        .unwrap();
    let (ok, text) = openssl_crl(&d.join("a.pem"), &again, d);
    assert!(ok && listed(&text).len() == 2, "{text}");
    assert_eq!(
        std::fs::read_dir(data.join("retired-cas")).unwrap().count(),
        1
    );
}

fn sqlite(db: &Path, sql: &str) -> String {
    let (ok, text) = run(Command::new("python3")
        .args([
            "-c",
            "import sqlite3,sys\nc=sqlite3.connect(sys.argv[1])\nfor r in c.execute(sys.argv[2]): print('|'.join(map(str,r)))\nc.commit()",
        ])
        .arg(db)
        .arg(sql));
    assert!(ok, "{sql}: {text}");
    text
}

/// A holder of a certificate from the CA `a` (made by [`make_ca`]) renewed once by a
/// portal serving `a` (stopped again): the holder before and after.
async fn renewed_once(data: &Path, d: &Path) -> (Holder, Holder) {
    let ca_a =
        ukey_portal::ca::load_key(&std::fs::read_to_string(d.join("a.key")).unwrap()).unwrap();
    let a_der = pem::parse(std::fs::read(d.join("a.pem")).unwrap())
        .unwrap()
        .into_contents();
    let issuer_a = rcgen::Issuer::from_ca_cert_der(&a_der.as_slice().into(), ca_a).unwrap();
    let h0 = Holder::issued_by(&issuer_a, KeyAlgorithm::EcP256, CN, ORG);
    let (_server, api) = serve(data, d, "a");
    let order = paid_order(data, &h0);
    let h1 = renew(&api, &order, &h0).await.0;
    (h0, h1)
}

/// A database from before revocations were kept by CA key (migration 6 names their
/// issuer `name:<name key>`, and certificates carry no CA key): at start the portal
/// resolves both from the CAs it knows, and the CRL lists what it listed before.
#[tokio::test]
async fn revocations_recorded_by_issuer_name_are_resolved_to_the_ca_key_at_start() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let data = d.join("data");
    let ski_a = make_ca(d, "a");
    let (h0, h1) = renewed_once(&data, d).await;
    cli(
        &data,
        &[
            "revoke",
            "--serial",
            &h1.serial_hex,
            "--reason",
            "affiliationChanged",
        ],
    );
    // What the rows looked like before: issuers by name, certificates without a key.
    let db = data.join("portal.sqlite3");
    sqlite(
        &db,
        "UPDATE revocations SET issuer_ski = 'name:' ||
           (SELECT issuer_key FROM orders WHERE orders.id = revocations.order_id)",
    );
    sqlite(&db, "UPDATE certificates SET issuer_ski = NULL");
    sqlite(&db, "UPDATE orders SET issuer_ski = NULL");
    // As migration 6 leaves it.
    sqlite(
        &db,
        "UPDATE meta SET value = 1 WHERE key = 'revocations_by_name'",
    );
    assert!(sqlite(&db, "SELECT issuer_ski FROM revocations").contains("name:"));

    let (_server, api) = serve(&data, d, "a");
    assert_eq!(
        sqlite(&db, "SELECT DISTINCT issuer_ski FROM revocations").trim(),
        ski_a
    );
    assert_eq!(
        sqlite(&db, "SELECT DISTINCT issuer_ski FROM certificates").trim(),
        ski_a
    );
    assert_eq!(
        sqlite(
            &db,
            "SELECT value FROM meta WHERE key = 'revocations_by_name'"
        )
        .trim(),
        "0",
        "nothing left to resolve: later starts do not look"
    );
    let crl = get(&api, paths::CRL).await.bytes().await.unwrap();
    let (ok, text) = openssl_crl(&d.join("a.pem"), &crl, d);
    assert!(ok, "{text}");
    let mut on = listed(&text);
    on.sort();
    let mut want = vec![h0.serial_hex.clone(), h1.serial_hex.clone()];
    want.sort();
    assert_eq!(on, want, "{text}");
}

/// A database from before the CRL number was split into counters (migration 7): the
/// portal carries the number on, and a revocation moves it by one.
#[tokio::test]
async fn a_database_from_before_migration_7_keeps_its_crl_number() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let data = d.join("data");
    make_ca(d, "a");
    let (h0, h1) = renewed_once(&data, d).await;
    // As schema version 6 left it: one counter in `meta`.
    let db = data.join("portal.sqlite3");
    sqlite(&db, "DROP TABLE crl_number_shards");
    sqlite(
        &db,
        "INSERT INTO meta (key, value) VALUES ('crl_number', 41)",
    );
    sqlite(&db, "PRAGMA user_version = 6");

    let (_server, api) = serve(&data, d, "a");
    assert_eq!(sqlite(&db, "PRAGMA user_version").trim(), "7");
    assert_eq!(
        sqlite(&db, "SELECT count(*) FROM meta WHERE key = 'crl_number'").trim(),
        "0"
    );
    let crl = get(&api, paths::CRL).await.bytes().await.unwrap();
    let (ok, text) = openssl_crl(&d.join("a.pem"), &crl, d);
    assert!(ok, "{text}");
    assert_eq!(crl_number(&crl), 41, "{text}");
    assert_eq!(listed(&text), vec![h0.serial_hex.clone()], "{text}");

    cli(
        &data,
        &[
            "revoke",
            "--serial",
            &h1.serial_hex,
            "--reason",
            "keyCompromise",
        ],
    );
    let crl = get(&api, paths::CRL).await.bytes().await.unwrap();
    let (ok, text) = openssl_crl(&d.join("a.pem"), &crl, d);
    assert!(ok, "{text}");
    assert_eq!(crl_number(&crl), 42, "{text}");
    assert_eq!(listed(&text).len(), 2, "{text}");
}
