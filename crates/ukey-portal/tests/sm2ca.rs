//! The SM2 CA, judged by OpenSSL 3: its root and the certificates it issues verify with
//! the GM distinguishing ID (and not with OpenSSL's default empty one), for SM2 keys made
//! by OpenSSL, including for the subject of an RSA certificate (the algorithm upgrade).

use std::path::Path;
use std::process::Output;

use softhsm_fixtures::openssl_sm2::{GM_DISTID_OPT as GM, OpenSslSm2};
use time::OffsetDateTime;
use ukey_portal::ca::Usage;
use ukey_portal::sm2ca::Sm2Ca;
use x509_parser::prelude::{FromDer as _, X509Certificate};

fn openssl(dir: &Path, args: &[&str]) -> Output {
    OpenSslSm2::new(dir).output(args)
}

fn ok(dir: &Path, args: &[&str]) -> String {
    OpenSslSm2::new(dir)
        .run(args)
        .unwrap_or_else(|e| panic!("{e}"))
}

fn pem(label: &str, der: &[u8]) -> String {
    pem::encode(&pem::Pem::new(label, der.to_vec()))
}

/// Whether OpenSSL verifies `sig` (a file) over the raw `tbs` (a file) with the public
/// key `key` and `distid`: how a GM-ID self-signature or CRL is judged, as OpenSSL 3.0's
/// `verify -check_ss_sig` and `crl -verify` take no -vfyopt.
fn pkeyutl_verifies(dir: &Path, key: &str, tbs: &str, sig: &str, distid: &str) -> Output {
    openssl(
        dir,
        &[
            "pkeyutl", "-verify", "-rawin", "-digest", "sm3", "-pubin", "-inkey", key, "-in", tbs,
            "-sigfile", sig, "-pkeyopt", distid,
        ],
    )
}

/// An SM2 key made by OpenSSL: its SubjectPublicKeyInfo, DER.
fn openssl_sm2_spki(dir: &Path, name: &str) -> Vec<u8> {
    OpenSslSm2::new(dir).key(name).unwrap()
}

/// The subject (DER) of an RSA certificate made by OpenSSL: the one being upgraded.
fn rsa_subject(dir: &Path) -> Vec<u8> {
    ok(
        dir,
        &[
            "req",
            "-x509",
            "-nodes",
            "-newkey",
            "rsa:2048",
            "-keyout",
            "rsa.key",
            "-out",
            "rsa.pem",
            "-days",
            "30",
            "-utf8",
            "-subj",
            "/C=CN/O=某某建设工程有限公司/CN=张三",
            "-outform",
            "DER",
        ],
    );
    let der = std::fs::read(dir.join("rsa.pem")).unwrap();
    let (_, cert) = X509Certificate::from_der(&der).unwrap();
    cert.subject().as_raw().to_vec()
}

#[test]
fn a_generated_sm2_ca_issues_what_openssl_verifies_with_the_gm_id_only() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let now = OffsetDateTime::now_utc();
    let ca = Sm2Ca::generate("UKey Test SM2 Root", "测试证书认证中心", now).unwrap();
    std::fs::write(d.join("root.pem"), pem("CERTIFICATE", ca.cert_der())).unwrap();
    let text = ok(d, &["x509", "-in", "root.pem", "-noout", "-text"]);
    assert!(text.contains("SM2-with-SM3"), "{text}");
    assert!(text.contains("CA:TRUE"), "{text}");
    // The root's own signature too: OpenSSL 3.0's `verify -check_ss_sig` ignores
    // -vfyopt (it fails OpenSSL's own GM-ID roots), so pkeyutl judges it on the raw TBS.
    let (_, root) = X509Certificate::from_der(ca.cert_der()).unwrap();
    std::fs::write(d.join("root.tbs"), root.tbs_certificate.as_ref()).unwrap();
    std::fs::write(d.join("root.sig"), root.signature_value.data.as_ref()).unwrap();
    ok(
        d,
        &[
            "x509", "-in", "root.pem", "-noout", "-pubkey", "-out", "root.pub",
        ],
    );
    let pkeyutl = |distid: &str| pkeyutl_verifies(d, "root.pub", "root.tbs", "root.sig", distid);
    let good = pkeyutl(GM);
    assert!(
        good.status.success(),
        "{}",
        String::from_utf8_lossy(&good.stderr)
    );
    assert!(!pkeyutl("distid:0000000000000000").status.success());

    // The upgrade: the subject of an RSA certificate, a new SM2 key.
    let subject = rsa_subject(d);
    for (name, usage) in [
        ("sign", Usage::Signing),
        ("enc", Usage::Encryption { ec: true }),
    ] {
        let spki = openssl_sm2_spki(d, name);
        let issued = ca
            .issue(
                &subject,
                &spki,
                usage,
                1,
                Some("http://127.0.0.1/crl/sm2.crl"),
                now,
            )
            .unwrap();
        let file = format!("{name}.pem");
        std::fs::write(d.join(&file), pem("CERTIFICATE", &issued.der)).unwrap();
        ok(d, &["verify", "-vfyopt", GM, "-CAfile", "root.pem", &file]);
        // OpenSSL's default (empty) ID does not verify it: the GM ID was used.
        assert!(
            !openssl(d, &["verify", "-CAfile", "root.pem", &file])
                .status
                .success()
        );
        let text = ok(
            d,
            &["x509", "-in", &file, "-noout", "-text", "-nameopt", "utf8"],
        );
        assert!(
            text.contains("CN=张三") || text.contains("CN = 张三"),
            "{text}"
        );
        assert!(text.contains("http://127.0.0.1/crl/sm2.crl"), "{text}");
        let serial = ok(d, &["x509", "-in", &file, "-noout", "-serial"]);
        assert_eq!(
            serial.trim().trim_start_matches("serial="),
            issued.serial_hex
        );
        // The certificate carries the SM2 key it was asked for.
        let key = ok(d, &["x509", "-in", &file, "-noout", "-pubkey"]);
        let theirs = ok(d, &["pkey", "-in", &format!("{name}.key"), "-pubout"]);
        assert_eq!(key, theirs);
    }
    let text = ok(d, &["x509", "-in", "sign.pem", "-noout", "-text"]);
    assert!(
        text.contains("Digital Signature, Non Repudiation"),
        "{text}"
    );

    // The CA's key written out loads again and issues under the same root.
    let reloaded =
        Sm2Ca::from_pem(&pem("CERTIFICATE", ca.cert_der()), &ca.key_pem().unwrap()).unwrap();
    let spki = openssl_sm2_spki(d, "again");
    let issued = reloaded
        .issue(&subject, &spki, Usage::Signing, 2, None, now)
        .unwrap();
    std::fs::write(d.join("again.pem"), pem("CERTIFICATE", &issued.der)).unwrap();
    ok(
        d,
        &["verify", "-vfyopt", GM, "-CAfile", "root.pem", "again.pem"],
    );
}

#[test]
fn an_openssl_made_sm2_ca_is_loaded_and_bad_input_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let now = OffsetDateTime::now_utc();
    OpenSslSm2::new(d)
        .ca("ca", "/C=CN/O=OpenSSL SM2 CA/CN=Root")
        .unwrap();
    let cert_pem = std::fs::read_to_string(d.join("ca.pem")).unwrap();
    let key_pem = std::fs::read_to_string(d.join("ca.key")).unwrap();
    let ca = Sm2Ca::from_pem(&cert_pem, &key_pem).unwrap();
    let subject = rsa_subject(d);
    let spki = openssl_sm2_spki(d, "leaf");
    let issued = ca
        .issue(&subject, &spki, Usage::Signing, 1, None, now)
        .unwrap();
    std::fs::write(d.join("leaf.pem"), pem("CERTIFICATE", &issued.der)).unwrap();
    ok(
        d,
        &["verify", "-vfyopt", GM, "-CAfile", "ca.pem", "leaf.pem"],
    );

    // Another SM2 key than the certificate's, an RSA key, garbage: refused.
    ok(d, &["genpkey", "-algorithm", "SM2", "-out", "other.key"]);
    let other = std::fs::read_to_string(d.join("other.key")).unwrap();
    let e = Sm2Ca::from_pem(&cert_pem, &other).unwrap_err().to_string();
    assert!(e.contains("not the CA certificate's key"), "{e}");
    let rsa = std::fs::read_to_string(d.join("rsa.key")).unwrap();
    assert!(Sm2Ca::from_pem(&cert_pem, &rsa).is_err());
    assert!(Sm2Ca::from_pem("not a certificate", &key_pem).is_err());

    // A P-256 key is not an SM2 key: no SM2 certificate for it.
    ok(
        d,
        &[
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-out",
            "p256.key",
        ],
    );
    ok(
        d,
        &[
            "pkey",
            "-in",
            "p256.key",
            "-pubout",
            "-outform",
            "DER",
            "-out",
            "p256.spki",
        ],
    );
    let p256 = std::fs::read(d.join("p256.spki")).unwrap();
    let e = ca
        .issue(&subject, &p256, Usage::Signing, 1, None, now)
        .unwrap_err()
        .to_string();
    assert!(e.contains("not an SM2 key"), "{e}");
}

/// The SM2 CA's CRL: OpenSSL reads its entries and number, and its signature verifies
/// with the GM ID (pkeyutl on the raw TBSCertList, as `openssl crl -verify` has no
/// -vfyopt in 3.0) and not with another ID.
#[test]
fn the_sm2_crl_lists_the_revoked_and_verifies_with_the_gm_id() {
    use x509_parser::revocation_list::CertificateRevocationList;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let now = OffsetDateTime::now_utc();
    let ca = Sm2Ca::generate("UKey Test SM2 Root", "测试证书认证中心", now).unwrap();
    std::fs::write(d.join("root.pem"), pem("CERTIFICATE", ca.cert_der())).unwrap();
    let revoked = [
        ukey_portal::ca::Revoked {
            serial_hex: "5A0102".into(),
            revoked_at: now - time::Duration::hours(1),
            reason: ukey_portal::ca::Reason::Superseded,
        },
        ukey_portal::ca::Revoked {
            serial_hex: "7F33AA".into(),
            revoked_at: now,
            reason: ukey_portal::ca::Reason::KeyCompromise,
        },
    ];
    let crl = ca.crl(&revoked, 7, now).unwrap();
    std::fs::write(d.join("ca.crl"), &crl).unwrap();
    let text = ok(
        d,
        &["crl", "-inform", "DER", "-in", "ca.crl", "-noout", "-text"],
    );
    for want in [
        "5A0102",
        "7F33AA",
        "Superseded",
        "Key Compromise",
        "SM2-with-SM3",
        "X509v3 CRL Number",
    ] {
        assert!(text.contains(want), "{want} missing: {text}");
    }
    let (_, parsed) = CertificateRevocationList::from_der(&crl).unwrap();
    assert_eq!(parsed.crl_number().map(|n| n.to_string()), Some("7".into()));
    std::fs::write(d.join("crl.tbs"), parsed.tbs_cert_list.as_ref()).unwrap();
    std::fs::write(d.join("crl.sig"), parsed.signature_value.data.as_ref()).unwrap();
    ok(
        d,
        &[
            "x509", "-in", "root.pem", "-noout", "-pubkey", "-out", "root.pub",
        ],
    );
    let pkeyutl = |distid: &str| pkeyutl_verifies(d, "root.pub", "crl.tbs", "crl.sig", distid);
    let good = pkeyutl(GM);
    assert!(
        good.status.success(),
        "{}",
        String::from_utf8_lossy(&good.stderr)
    );
    assert!(!pkeyutl("distid:0000000000000000").status.success());
    // An empty CRL is well-formed too.
    let empty = ca.crl(&[], 8, now).unwrap();
    std::fs::write(d.join("empty.crl"), &empty).unwrap();
    let text = ok(
        d,
        &[
            "crl",
            "-inform",
            "DER",
            "-in",
            "empty.crl",
            "-noout",
            "-text",
        ],
    );
    assert!(text.contains("No Revoked Certificates"), "{text}");
}
