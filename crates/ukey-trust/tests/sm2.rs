//! SM2-with-SM3 chains made by OpenSSL 3 (the outside judge): the GM distinguishing ID
//! verifies, an empty ID (OpenSSL's default) or another CA does not.

use softhsm_fixtures::openssl_sm2::{GM_DISTID_OPT, OpenSslSm2, SignedId};
use time::OffsetDateTime;
use ukey_trust::{ChainError, verify};

#[test]
fn an_sm2_chain_with_the_gm_id_verifies_and_others_do_not() {
    let dir = tempfile::tempdir().unwrap();
    let o = OpenSslSm2::new(dir.path());
    o.ca("root", "/C=CN/O=Test SM2 CA/CN=root").unwrap();
    o.ca("other", "/C=CN/O=Test SM2 CA/CN=other").unwrap();
    let subject = "/C=CN/CN=Zhang San";
    o.leaf("root", "gm", subject, SignedId::Gm).unwrap();
    o.leaf("root", "empty-id", subject, SignedId::Empty)
        .unwrap();
    o.leaf("other", "other-ca", subject, SignedId::Gm).unwrap();
    // OpenSSL agrees on which is good.
    assert!(o.verifies_with_gm_id("root", "gm.pem"));
    let der = |f: &str| o.read(f).unwrap();

    let now = OffsetDateTime::now_utc();
    let root = vec![o.der("root.pem").unwrap()];
    let ok = verify(&der("gm.der"), &[], &root, now).expect("GM-ID chain verifies");
    assert_eq!(ok.path.len(), 1);
    assert!(ok.path[0].contains("root"), "{:?}", ok.path);

    for (file, why) in [
        ("empty-id.der", "signed with an empty ID"),
        ("other-ca.der", "issued by another SM2 CA"),
    ] {
        match verify(&der(file), &[], &root, now) {
            Err(ChainError::UnknownIssuer { .. }) => {}
            other => panic!("{why}: {other:?}"),
        }
    }
    // The other CA as anchor: its own leaf verifies, the first CA's does not.
    let other = vec![o.der("other.pem").unwrap()];
    verify(&der("other-ca.der"), &[], &other, now).expect("other CA's leaf");
    assert!(verify(&der("gm.der"), &[], &other, now).is_err());
}

#[test]
fn a_signature_with_the_gm_id_verifies_only_with_that_id() {
    let dir = tempfile::tempdir().unwrap();
    let o = OpenSslSm2::new(dir.path());
    let spki = o.key("k").unwrap();
    std::fs::write(dir.path().join("msg"), "投标文件摘要 / bid digest").unwrap();
    o.run(&[
        "pkeyutl",
        "-sign",
        "-rawin",
        "-digest",
        "sm3",
        "-inkey",
        "k.key",
        "-pkeyopt",
        GM_DISTID_OPT,
        "-in",
        "msg",
        "-out",
        "sig",
    ])
    .unwrap();
    // The SEC1 point is the last 65 bytes of the SPKI (BIT STRING, uncompressed).
    let point = &spki[spki.len() - 65..];
    assert_eq!(point[0], 0x04);
    let (msg, sig) = (o.read("msg").unwrap(), o.read("sig").unwrap());
    assert!(ukey_trust::gm::verify(
        ukey_trust::gm::GM_DISTID,
        point,
        &msg,
        &sig
    ));
    assert!(!ukey_trust::gm::verify("", point, &msg, &sig));
    assert!(!ukey_trust::gm::verify(
        ukey_trust::gm::GM_DISTID,
        point,
        b"other",
        &sig
    ));
    assert!(!ukey_trust::gm::verify(
        ukey_trust::gm::GM_DISTID,
        point,
        &msg,
        b"\x30\x00"
    ));
}
