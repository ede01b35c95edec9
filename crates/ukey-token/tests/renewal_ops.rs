//! The operations the renewal engine needs, on SoftHSM2, checked with tools that are
//! not ours (OpenSSL, OpenSC's pkcs11-tool) where they can be.

use std::process::Command;

use secrecy::SecretString;
use softhsm_fixtures::{SoftHsm, TokenSpec};
use ukey_token::cryptoki::object::{Attribute, ObjectClass};
use ukey_token::{KeyAlg, Module, ObjectKind, TokenSigner};

fn setup(label: &str) -> (SoftHsm, softhsm_fixtures::TokenFixture, Module) {
    let hsm = SoftHsm::new().unwrap();
    let fx = hsm.create_token(&TokenSpec::ukey(label)).unwrap();
    let module = Module::load(hsm.module_path()).unwrap();
    (hsm, fx, module)
}

fn openssl(dir: &std::path::Path, args: &[&str]) -> String {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .unwrap();
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn generated_keys_sign_csrs_that_openssl_verifies() {
    let (hsm, fx, module) = setup("Keygen");
    let token = module.tokens().unwrap().remove(0);
    let s = module.open_rw_session(&token).unwrap();
    s.login(&SecretString::from(fx.user_pin.clone())).unwrap();
    let dir = tempfile::tempdir().unwrap();
    for (alg, id) in [
        (KeyAlg::Rsa2048, b"r".as_slice()),
        (KeyAlg::EcP256, b"e".as_slice()),
    ] {
        let pair = s.generate_key_pair(alg, id, "pending test").unwrap();
        let public = s.public_key(pair.public).unwrap();
        assert_eq!(public.alg(), alg);
        assert_eq!(s.public_key_by_id(id).unwrap(), Some(public.clone()));
        // The private key is sensitive and not extractable, like a UKey's.
        let attrs = s
            .attributes(
                pair.private,
                &[
                    ukey_token::cryptoki::object::AttributeType::Sensitive,
                    ukey_token::cryptoki::object::AttributeType::Extractable,
                ],
            )
            .unwrap();
        assert!(
            attrs.contains(&Attribute::Sensitive(true))
                && attrs.contains(&Attribute::Extractable(false))
        );

        let mut params = rcgen::CertificateParams::default();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "张三");
        let signer = TokenSigner::new(&s, pair.private, public.clone());
        let csr = params.serialize_request(&signer).unwrap();
        let path = dir.path().join(format!("{}.csr", alg.as_str()));
        std::fs::write(&path, csr.pem().unwrap()).unwrap();
        // `openssl req -verify` exits 0 even on failure: read what it says.
        let out = openssl(
            dir.path(),
            &["req", "-in", path.to_str().unwrap(), "-noout", "-verify"],
        );
        assert!(
            out.contains("verify OK")
                || out.contains("Certificate request self-signature verify OK"),
            "{alg:?}: {out}"
        );
        // The SPKI we build is the one OpenSSL reads from the CSR.
        let spki = openssl(
            dir.path(),
            &["req", "-in", path.to_str().unwrap(), "-noout", "-pubkey"],
        );
        let der = {
            use std::io::Write;
            let mut child = Command::new("openssl")
                .args(["pkey", "-pubin", "-outform", "DER"])
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            child
                .stdin
                .take()
                .unwrap()
                .write_all(spki.as_bytes())
                .unwrap();
            child.wait_with_output().unwrap().stdout
        };
        assert_eq!(der, public.spki(), "{alg:?}");
    }
    drop(s);
    drop(hsm);
}

#[test]
fn certificate_objects_are_written_renamed_and_destroyed() {
    let (_hsm, fx, module) = setup("Objects");
    let token = module.tokens().unwrap().remove(0);
    let s = module.open_rw_session(&token).unwrap();
    s.login(&SecretString::from(fx.user_pin.clone())).unwrap();
    let before = s.snapshot().unwrap();
    let der = &fx.certs[0].der;
    let h = s
        .write_certificate(der, b"pending", "pending label")
        .unwrap();
    assert_eq!(s.find_certificate_by_value(der).unwrap().len(), 2);
    assert_eq!(
        s.find_kind_by_id(ObjectKind::Certificate, b"pending")
            .unwrap(),
        vec![h]
    );
    s.set_id_and_label(h, b"final", "证书").unwrap();
    let info = s.object_info(ObjectKind::Certificate, h).unwrap();
    assert_eq!(
        (info.id(), info.label.as_str()),
        (b"final".to_vec(), "证书")
    );
    assert_eq!(info.value_hex, hex::encode(der));
    assert!(
        s.find_kind_by_id(ObjectKind::Certificate, b"pending")
            .unwrap()
            .is_empty()
    );
    s.destroy(h).unwrap();
    assert_eq!(s.snapshot().unwrap(), before);
    // Garbage is refused before the token is touched.
    assert_eq!(
        s.write_certificate(b"garbage", b"x", "x")
            .unwrap_err()
            .code(),
        "object_invalid"
    );
    assert_eq!(s.snapshot().unwrap(), before);
    assert!(
        s.find_objects(&[
            Attribute::Class(ObjectClass::CERTIFICATE),
            Attribute::Id(b"x".to_vec())
        ])
        .unwrap()
        .is_empty()
    );
}
