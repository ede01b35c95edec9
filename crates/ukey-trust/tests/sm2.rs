//! SM2-with-SM3 chains made by OpenSSL 3 (the outside judge): the GM distinguishing ID
//! verifies, an empty ID (OpenSSL's default) or another CA does not.

use std::path::Path;
use std::process::Command;

use time::OffsetDateTime;
use ukey_trust::{ChainError, verify};

const GM: &str = "distid:1234567812345678";

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn der(dir: &Path, pem_file: &str) -> Vec<u8> {
    let text = std::fs::read_to_string(dir.join(pem_file)).expect("pem");
    pem::parse(text).expect("pem block").into_contents()
}

/// An SM2 root CA signed with the GM ID, in `dir` as `{name}.key` / `{name}.pem`.
fn sm2_ca(dir: &Path, name: &str) {
    let key = format!("{name}.key");
    openssl(dir, &["genpkey", "-algorithm", "SM2", "-out", &key]);
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-new",
            "-key",
            &key,
            "-sm3",
            "-sigopt",
            GM,
            "-subj",
            &format!("/C=CN/O=Test SM2 CA/CN={name}"),
            "-days",
            "3650",
            "-out",
            &format!("{name}.pem"),
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
    );
}

/// A leaf for a fresh SM2 key, issued by `ca`; `sigopt` chooses the ID it is signed with.
fn sm2_leaf(dir: &Path, ca: &str, out: &str, sigopt: &[&str]) {
    std::fs::write(
        dir.join("leaf.ext"),
        "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,nonRepudiation\n",
    )
    .unwrap();
    openssl(dir, &["genpkey", "-algorithm", "SM2", "-out", "leaf.key"]);
    openssl(
        dir,
        &[
            "req",
            "-new",
            "-key",
            "leaf.key",
            "-sm3",
            "-sigopt",
            GM,
            "-subj",
            "/C=CN/CN=Zhang San",
            "-out",
            "leaf.csr",
        ],
    );
    let (ca_pem, ca_key) = (format!("{ca}.pem"), format!("{ca}.key"));
    let mut args = vec![
        "x509", "-req", "-in", "leaf.csr", "-CA", &ca_pem, "-CAkey", &ca_key, "-sm3", "-vfyopt",
        GM, "-days", "365", "-extfile", "leaf.ext", "-out", out,
    ];
    args.extend(sigopt);
    openssl(dir, &args);
}

#[test]
fn an_sm2_chain_with_the_gm_id_verifies_and_others_do_not() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    sm2_ca(d, "root");
    sm2_ca(d, "other");
    sm2_leaf(d, "root", "gm.pem", &["-sigopt", GM]);
    sm2_leaf(d, "root", "empty-id.pem", &[]);
    sm2_leaf(d, "other", "other-ca.pem", &["-sigopt", GM]);
    // OpenSSL agrees on which is good.
    openssl(
        d,
        &["verify", "-vfyopt", GM, "-CAfile", "root.pem", "gm.pem"],
    );

    let now = OffsetDateTime::now_utc();
    let root = vec![der(d, "root.pem")];
    let ok = verify(&der(d, "gm.pem"), &[], &root, now).expect("GM-ID chain verifies");
    assert_eq!(ok.path.len(), 1);
    assert!(ok.path[0].contains("root"), "{:?}", ok.path);

    for (file, why) in [
        ("empty-id.pem", "signed with an empty ID"),
        ("other-ca.pem", "issued by another SM2 CA"),
    ] {
        match verify(&der(d, file), &[], &root, now) {
            Err(ChainError::UnknownIssuer { .. }) => {}
            other => panic!("{why}: {other:?}"),
        }
    }
    // The other CA as anchor: its own leaf verifies, the first CA's does not.
    let other = vec![der(d, "other.pem")];
    verify(&der(d, "other-ca.pem"), &[], &other, now).expect("other CA's leaf");
    assert!(verify(&der(d, "gm.pem"), &[], &other, now).is_err());
}

#[test]
fn a_signature_with_the_gm_id_verifies_only_with_that_id() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    openssl(d, &["genpkey", "-algorithm", "SM2", "-out", "k.key"]);
    openssl(
        d,
        &[
            "pkey", "-in", "k.key", "-pubout", "-outform", "DER", "-out", "k.pub",
        ],
    );
    std::fs::write(d.join("msg"), "投标文件摘要 / bid digest").unwrap();
    openssl(
        d,
        &[
            "pkeyutl", "-sign", "-rawin", "-digest", "sm3", "-inkey", "k.key", "-pkeyopt", GM,
            "-in", "msg", "-out", "sig",
        ],
    );
    let spki = std::fs::read(d.join("k.pub")).unwrap();
    // The SEC1 point is the last 65 bytes of the SPKI (BIT STRING, uncompressed).
    let point = &spki[spki.len() - 65..];
    assert_eq!(point[0], 0x04);
    let (msg, sig) = (
        std::fs::read(d.join("msg")).unwrap(),
        std::fs::read(d.join("sig")).unwrap(),
    );
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
