//! The one trust path, against certificates made by rcgen and openssl (not our code).

#![allow(clippy::cloned_ref_to_slice_refs)]

use std::process::Command;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, DnValue, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use time::{Duration, OffsetDateTime};
use ukey_trust::{Anchor, ChainError, names, verify};
use x509_parser::prelude::{FromDer, X509Certificate};

struct Ca {
    der: Vec<u8>,
    pem: String,
    issuer: Issuer<'static, KeyPair>,
}

fn ca_params(cn: &str, path_len: Option<u8>) -> CertificateParams {
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name.push(DnType::CommonName, cn);
    p.is_ca = IsCa::Ca(match path_len {
        Some(n) => BasicConstraints::Constrained(n),
        None => BasicConstraints::Unconstrained,
    });
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let now = OffsetDateTime::now_utc();
    p.not_before = now - Duration::days(10);
    p.not_after = now + Duration::days(3650);
    p
}

fn root(cn: &str, path_len: Option<u8>) -> Ca {
    let key = KeyPair::generate().unwrap();
    let params = ca_params(cn, path_len);
    let cert = params.self_signed(&key).unwrap();
    Ca {
        der: cert.der().to_vec(),
        pem: cert.pem(),
        issuer: Issuer::new(params, key),
    }
}

fn sub(parent: &Ca, params: CertificateParams) -> Ca {
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &parent.issuer).unwrap();
    Ca {
        der: cert.der().to_vec(),
        pem: cert.pem(),
        issuer: Issuer::new(params, key),
    }
}

fn leaf_params() -> CertificateParams {
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name.push(DnType::CommonName, "张三");
    p.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::ContentCommitment,
    ];
    // rcgen writes extensions only with one of a few set: CA:FALSE, as CAs write it.
    p.is_ca = IsCa::ExplicitNoCa;
    let now = OffsetDateTime::now_utc();
    p.not_before = now - Duration::days(1);
    p.not_after = now + Duration::days(365);
    p
}

fn leaf(parent: &Ca) -> Vec<u8> {
    sub(parent, leaf_params()).der
}

fn now() -> OffsetDateTime {
    OffsetDateTime::now_utc()
}

#[test]
fn a_chain_through_an_intermediate_validates() {
    let r = root("Root", None);
    let i = sub(&r, ca_params("Issuing", Some(0)));
    let l = leaf(&i);
    let v = verify(&l, &[i.der.clone()], &[r.der.clone()], now()).unwrap();
    assert_eq!(v.path, vec!["CN=Issuing".to_owned(), "CN=Root".to_owned()]);
    // Without the intermediate, or with another root, it does not.
    assert!(matches!(
        verify(&l, &[], &[r.der.clone()], now()),
        Err(ChainError::UnknownIssuer { .. })
    ));
    let other = root("Root", None);
    assert!(matches!(
        verify(&l, &[i.der.clone()], &[other.der], now()),
        Err(ChainError::UnknownIssuer { .. })
    ));
    assert_eq!(
        verify(&l, &[i.der.clone()], &[], now()),
        Err(ChainError::NoAnchors)
    );
}

#[test]
fn an_intermediate_that_is_not_a_ca_breaks_the_chain() {
    let r = root("Root", None);
    let mut p = leaf_params();
    p.distinguished_name = DistinguishedName::new();
    p.distinguished_name.push(DnType::CommonName, "Not a CA");
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let not_ca = sub(&r, p);
    let l = leaf(&not_ca);
    let e = verify(&l, &[not_ca.der.clone()], &[r.der.clone()], now()).unwrap_err();
    assert!(
        matches!(e, ChainError::NotACa(_) | ChainError::UnknownIssuer { .. }),
        "{e:?}"
    );
    assert!(verify(&l, &[not_ca.der], &[r.der], now()).is_err());
}

#[test]
fn path_length_and_key_cert_sign_are_enforced() {
    // pathLen 0 on the root: no intermediate below it may issue.
    let r = root("Root", Some(0));
    let i = sub(&r, ca_params("Issuing", None));
    let l = leaf(&i);
    let e = verify(&l, &[i.der.clone()], &[r.der.clone()], now()).unwrap_err();
    assert!(matches!(e, ChainError::NotACa(_)), "{e:?}");

    // A CA:TRUE intermediate whose keyUsage lacks keyCertSign.
    let r = root("Root", None);
    let mut p = ca_params("No keyCertSign", None);
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    let i = sub(&r, p);
    let l = leaf(&i);
    let e = verify(&l, &[i.der], &[r.der], now()).unwrap_err();
    assert!(matches!(e, ChainError::NotACa(_)), "{e:?}");
}

#[test]
fn validity_of_the_leaf_and_of_each_ca() {
    let r = root("Root", None);
    let mut p = ca_params("Expired issuing", None);
    p.not_before = now() - Duration::days(100);
    p.not_after = now() - Duration::days(1);
    let i = sub(&r, p);
    let mut lp = leaf_params();
    lp.not_before = now() - Duration::days(50);
    lp.not_after = now() + Duration::days(50);
    let l = sub(&i, lp).der;
    let e = verify(&l, &[i.der], &[r.der.clone()], now()).unwrap_err();
    assert!(matches!(e, ChainError::CaNotValid(_)), "{e:?}");

    let i = sub(&r, ca_params("Issuing", None));
    let mut lp = leaf_params();
    lp.not_before = now() + Duration::days(2);
    lp.not_after = now() + Duration::days(300);
    let l = sub(&i, lp).der;
    let e = verify(&l, &[i.der.clone()], &[r.der.clone()], now()).unwrap_err();
    assert!(matches!(e, ChainError::LeafNotValid(_)), "{e:?}");
    // At its start it is fine.
    verify(&l, &[i.der], &[r.der], now() + Duration::days(3)).unwrap();
}

#[test]
fn a_ca_certificate_is_not_a_leaf() {
    let r = root("Root", None);
    let i = sub(&r, ca_params("Issuing", None));
    let e = verify(&i.der, &[], &[r.der], now()).unwrap_err();
    assert_eq!(e, ChainError::LeafIsCa);
}

#[test]
fn sha1_signatures_are_not_accepted() {
    // openssl signs a leaf with SHA-1 under an rcgen root.
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let key = KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256);
    let (root_pem, root_key_pem, root_der) = match key {
        Ok(k) => {
            let params = ca_params("RSA Root", None);
            let c = params.self_signed(&k).unwrap();
            (c.pem(), k.serialize_pem(), c.der().to_vec())
        }
        Err(_) => {
            // rcgen built without RSA generation: let openssl make the root.
            openssl(
                d,
                &[
                    "req",
                    "-x509",
                    "-newkey",
                    "rsa:2048",
                    "-nodes",
                    "-keyout",
                    "root.key",
                    "-subj",
                    "/CN=RSA Root",
                    "-addext",
                    "basicConstraints=critical,CA:TRUE",
                    "-addext",
                    "keyUsage=critical,keyCertSign,cRLSign",
                    "-days",
                    "30",
                    "-out",
                    "root.pem",
                ],
            );
            let pem = std::fs::read_to_string(d.join("root.pem")).unwrap();
            let der = pem::parse(&pem).unwrap().into_contents();
            (
                pem,
                std::fs::read_to_string(d.join("root.key")).unwrap(),
                der,
            )
        }
    };
    std::fs::write(d.join("root.pem"), &root_pem).unwrap();
    std::fs::write(d.join("root.key"), &root_key_pem).unwrap();
    std::fs::write(d.join("ext"), "keyUsage=critical,digitalSignature\n").unwrap();
    openssl(
        d,
        &[
            "req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout", "leaf.key", "-subj",
            "/CN=Leaf", "-out", "leaf.csr",
        ],
    );
    for (md, out) in [("-sha1", "sha1.der"), ("-sha256", "sha256.der")] {
        openssl(
            d,
            &[
                "x509",
                "-req",
                "-in",
                "leaf.csr",
                "-CA",
                "root.pem",
                "-CAkey",
                "root.key",
                "-set_serial",
                "7",
                "-days",
                "10",
                md,
                "-extfile",
                "ext",
                "-outform",
                "DER",
                "-out",
                out,
            ],
        );
    }
    let sha256 = std::fs::read(d.join("sha256.der")).unwrap();
    verify(&sha256, &[], &[root_der.clone()], now()).unwrap();
    let sha1 = std::fs::read(d.join("sha1.der")).unwrap();
    let e = verify(&sha1, &[], &[root_der], now()).unwrap_err();
    assert!(matches!(e, ChainError::Algorithm(_)), "{e:?}");
}

fn openssl(dir: &std::path::Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn anchor_files_hold_only_ca_certificates() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let r = root("Root", None);
    let i = sub(&r, ca_params("Issuing", None));
    let l = sub(&i, leaf_params());
    // Two CA blocks: two anchors.
    std::fs::write(d.join("two.pem"), format!("{}{}", r.pem, i.pem)).unwrap();
    assert_eq!(Anchor::load(&d.join("two.pem")).unwrap().len(), 2);
    // DER works too.
    std::fs::write(d.join("root.der"), &r.der).unwrap();
    assert_eq!(Anchor::load(&d.join("root.der")).unwrap()[0].der, r.der);
    // A holder's certificate among them: the whole file is refused, naming the block.
    std::fs::write(d.join("mixed.pem"), format!("{}{}", r.pem, l.pem)).unwrap();
    let e = Anchor::load(&d.join("mixed.pem")).unwrap_err();
    assert!(
        e.origin.contains("block 2") && e.reason.contains("not a CA"),
        "{e}"
    );
    // A private key block, garbage, an empty file.
    let key = KeyPair::generate().unwrap();
    std::fs::write(
        d.join("key.pem"),
        format!("{}{}", r.pem, key.serialize_pem()),
    )
    .unwrap();
    assert!(
        Anchor::load(&d.join("key.pem"))
            .unwrap_err()
            .reason
            .contains("PRIVATE KEY")
    );
    std::fs::write(d.join("garbage.der"), [0x30, 0x03, 1, 2, 3]).unwrap();
    assert!(Anchor::load(&d.join("garbage.der")).is_err());
    std::fs::write(d.join("empty.pem"), "").unwrap();
    assert!(Anchor::load(&d.join("empty.pem")).is_err());
    assert!(Anchor::load(&d.join("missing.pem")).is_err());
}

fn name_der(build: impl FnOnce(&mut DistinguishedName)) -> Vec<u8> {
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name = DistinguishedName::new();
    build(&mut p.distinguished_name);
    p.self_signed(&key).unwrap().der().to_vec()
}

fn same(a: &[u8], b: &[u8]) -> bool {
    let (_, a) = X509Certificate::from_der(a).unwrap();
    let (_, b) = X509Certificate::from_der(b).unwrap();
    names::same_name(a.subject(), b.subject())
}

#[test]
fn names_compare_by_attribute_and_decoded_value() {
    let utf8 = name_der(|n| {
        n.push(
            DnType::CountryName,
            DnValue::PrintableString("CN".try_into().unwrap()),
        );
        n.push(DnType::CommonName, DnValue::Utf8String("张三".into()));
    });
    let bmp = name_der(|n| {
        n.push(
            DnType::CountryName,
            DnValue::PrintableString("CN".try_into().unwrap()),
        );
        n.push(
            DnType::CommonName,
            DnValue::BmpString("张三".try_into().unwrap()),
        );
    });
    assert!(same(&utf8, &bmp), "the same name in another string type");

    // Formats alike, differs: two attributes, or one CN holding the text of both.
    let two = name_der(|n| {
        n.push(DnType::CommonName, "a");
        n.push(DnType::OrganizationName, "b");
    });
    let one = name_der(|n| n.push(DnType::CommonName, "a, O=b"));
    let (_, c2) = X509Certificate::from_der(&two).unwrap();
    let (_, c1) = X509Certificate::from_der(&one).unwrap();
    assert_eq!(names::format(c2.subject()), names::format(c1.subject()));
    assert!(!same(&two, &one));

    let other_order = name_der(|n| {
        n.push(DnType::OrganizationName, "b");
        n.push(DnType::CommonName, "a");
    });
    assert!(!same(&two, &other_order), "RDN order matters");
}
