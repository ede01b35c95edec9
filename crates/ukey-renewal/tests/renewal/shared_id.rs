//! Container-style UKeys: the signing pair and the encryption pair share one CKA_ID.
//! The token is written by `pkcs11-tool` from keys and certificates `openssl` made (none
//! of our code), and afterwards `openssl`, `pkcs11-tool` and PyKCS11 judge it: renewing the
//! signing certificate leaves the encryption pair untouched, so what was encrypted to
//! the encryption certificate still decrypts on the token.

use std::path::Path;

use secrecy::SecretString;
use softhsm_fixtures::{SoftHsm, TokenSpec};
use ukey_portal_api::{CreateOrderRequest, InitialState, KeyAlgorithm, KeyPolicy};
use ukey_renewal::{preflight, renew};

use super::common::*;

const SUBJECT: &str = "/C=CN/O=某某建设工程有限公司/CN=张三";

/// Makes `<name>.key` (`alg`: `rsa` or `ec`), and `<name>.pem` / `<name>.der` issued by
/// the fixtures' issuing CA with `usage`, valid `days`.
fn openssl_cert(hsm: &SoftHsm, d: &Path, name: &str, alg: &str, usage: &str, serial: &str) {
    let ca = hsm.ca().unwrap();
    let key = format!("{name}.key");
    match alg {
        "rsa" => openssl(
            d,
            &[
                "genpkey",
                "-algorithm",
                "RSA",
                "-pkeyopt",
                "rsa_keygen_bits:2048",
                "-out",
                &key,
            ],
        ),
        _ => openssl(
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
        ),
    };
    std::fs::write(
        d.join(format!("{name}.ext")),
        format!("keyUsage = critical, {usage}\nbasicConstraints = CA:FALSE\n"),
    )
    .unwrap();
    let csr = format!("{name}.csr");
    openssl(
        d,
        &[
            "req", "-new", "-utf8", "-key", &key, "-subj", SUBJECT, "-out", &csr,
        ],
    );
    openssl(
        d,
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            ca.issuing_cert_path.to_str().unwrap(),
            "-CAkey",
            ca.issuing_key_path.to_str().unwrap(),
            "-set_serial",
            serial,
            "-days",
            "10",
            "-extfile",
            &format!("{name}.ext"),
            "-out",
            &format!("{name}.pem"),
        ],
    );
    openssl(
        d,
        &[
            "x509",
            "-in",
            &format!("{name}.pem"),
            "-outform",
            "DER",
            "-out",
            &format!("{name}.der"),
        ],
    );
    openssl(
        d,
        &[
            "pkey",
            "-in",
            &key,
            "-pubout",
            "-outform",
            "DER",
            "-out",
            &format!("{name}.pub.der"),
        ],
    );
}

/// Writes `<name>`'s private key (with `usage`), public key (unless `public` is false)
/// and certificate under CKA_ID `id` with `pkcs11-tool`.
#[allow(clippy::too_many_arguments)]
fn write_pair(
    hsm: &SoftHsm,
    fx: &softhsm_fixtures::TokenFixture,
    d: &Path,
    name: &str,
    id: &str,
    label: &str,
    usage: &str,
    public: bool,
) {
    let p = |f: String| d.join(f).to_str().unwrap().to_owned();
    p11(
        hsm,
        &fx.label,
        &fx.user_pin,
        &[
            "--write-object",
            &p(format!("{name}.key")),
            "--type",
            "privkey",
            "--id",
            id,
            "--label",
            label,
            usage,
        ],
    );
    if public {
        p11(
            hsm,
            &fx.label,
            &fx.user_pin,
            &[
                "--write-object",
                &p(format!("{name}.pub.der")),
                "--type",
                "pubkey",
                "--id",
                id,
                "--label",
                label,
            ],
        );
    }
    p11(
        hsm,
        &fx.label,
        &fx.user_pin,
        &[
            "--write-object",
            &p(format!("{name}.der")),
            "--type",
            "cert",
            "--id",
            id,
            "--label",
            label,
        ],
    );
}

struct Container {
    env: Env,
    dir: tempfile::TempDir,
}

/// An empty token, then (encryption first, so that a lookup by CKA_ID alone meets the
/// wrong key first) an encryption pair and a signing pair under CKA_ID 01.
fn container(alg: &str, public_objects: bool, policy: KeyPolicy) -> Container {
    let hsm = SoftHsm::new().unwrap();
    let fx = hsm.create_token(&TokenSpec::empty("Container")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let enc_usage = if alg == "rsa" {
        "keyEncipherment, dataEncipherment"
    } else {
        "keyAgreement"
    };
    openssl_cert(&hsm, d, "enc", alg, enc_usage, "0x51");
    openssl_cert(
        &hsm,
        d,
        "sig",
        alg,
        "digitalSignature, nonRepudiation",
        "0x52",
    );
    let enc_flag = if alg == "rsa" {
        "--usage-decrypt"
    } else {
        "--usage-derive"
    };
    write_pair(
        &hsm,
        &fx,
        d,
        "enc",
        "01",
        "张三 加密",
        enc_flag,
        public_objects,
    );
    write_pair(
        &hsm,
        &fx,
        d,
        "sig",
        "01",
        "张三 签名",
        "--usage-sign",
        public_objects,
    );
    let env = Env::with_hsm(hsm, vec![fx]);
    env.server
        .portal
        .create_order(&CreateOrderRequest {
            serial_hex: "52".into(),
            issuer_der: None,
            issuer_dn: None,
            years: 1,
            state: InitialState::Ready,
            key_policy: policy,
            with_encryption_cert: false,
            target_algorithm: if alg == "rsa" {
                KeyAlgorithm::Rsa2048
            } else {
                KeyAlgorithm::EcP256
            },
            old_encryption_serial_hex: None,
        })
        .unwrap();
    Container { env, dir }
}

fn renew_signing(c: &Container) -> ukey_renewal::Report {
    let env = &c.env;
    let module = env.module();
    let fx = &env.tokens[0];
    let token = summary(&module, &fx.serial);
    let client = env.client();
    let opts = env.options();
    let plan = preflight(&module, &token, None, &client, &opts).unwrap();
    assert_eq!(plan.journal.old.serial, "52", "the signing certificate");
    renew(
        &module,
        plan,
        &SecretString::from(fx.user_pin.clone()),
        &client,
        &opts,
        &mut |_| {},
    )
    .unwrap()
}

/// What `pkcs11-tool --list-objects` shows, logged in.
fn objects(c: &Container) -> String {
    let fx = &c.env.tokens[0];
    p11(&c.env.hsm, &fx.label, &fx.user_pin, &["--list-objects"])
}

/// PyKCS11 (Debian's python3-pykcs11, a PKCS#11 client none of us wrote): decrypts
/// `ciphertext` with RSA-OAEP (SHA-1) using the private key labelled `label`.
const PYKCS11_DECRYPT: &str = r#"
import sys, PyKCS11
module, label, pin, path = sys.argv[1:5]
lib = PyKCS11.PyKCS11Lib()
lib.load(module)
s = None
for slot in lib.getSlotList(tokenPresent=True):
    if lib.getTokenInfo(slot).label.strip() == "Container":
        s = lib.openSession(slot)
s.login(pin)
keys = s.findObjects([(PyKCS11.CKA_CLASS, PyKCS11.CKO_PRIVATE_KEY), (PyKCS11.CKA_LABEL, label)])
assert len(keys) == 1, f"{len(keys)} private keys labelled {label}"
mech = PyKCS11.RSAOAEPMechanism(PyKCS11.CKM_SHA_1, PyKCS11.CKG_MGF1_SHA1)
ct = open(path, "rb").read()
sys.stdout.buffer.write(bytes(s.decrypt(keys[0], ct, mech)))
"#;

/// openssl encrypts to the encryption certificate; the token decrypts it (PyKCS11)
/// with the key labelled "张三 加密".
fn encryption_key_still_decrypts(c: &Container) {
    let d = c.dir.path();
    let fx = &c.env.tokens[0];
    std::fs::write(d.join("bid.txt"), "投标文件 sealed bid 2026").unwrap();
    openssl(
        d,
        &[
            "pkeyutl",
            "-encrypt",
            "-certin",
            "-inkey",
            "enc.pem",
            "-pkeyopt",
            "rsa_padding_mode:oaep",
            "-in",
            "bid.txt",
            "-out",
            "bid.enc",
        ],
    );
    let module = module_path();
    let out = run(
        &c.env.hsm,
        "/usr/bin/python3",
        &[
            "-c",
            PYKCS11_DECRYPT,
            &module,
            "张三 加密",
            &fx.user_pin,
            d.join("bid.enc").to_str().unwrap(),
        ],
    );
    assert_eq!(out, "投标文件 sealed bid 2026");
}

#[test]
fn new_key_renewal_keeps_the_encryption_pair_under_a_shared_id() {
    let c = container("rsa", true, KeyPolicy::New);
    let report = renew_signing(&c);
    let after = objects(&c);
    // The encryption pair is all there: its certificate, private and public key.
    assert_eq!(after.matches("label:      张三 加密").count(), 3, "{after}");
    // The old signing certificate is gone, the new one is there.
    let d = c.dir.path();
    let old = openssl(d, &["x509", "-in", "sig.pem", "-noout", "-serial"]);
    assert!(old.trim().ends_with("=52"), "{old}");
    assert_ne!(report.new_serial, "52");
    encryption_key_still_decrypts(&c);
}

#[test]
fn same_key_renewal_without_public_key_objects() {
    let c = container("rsa", false, KeyPolicy::Same);
    let report = renew_signing(&c);
    let after = objects(&c);
    assert_eq!(after.matches("label:      张三 加密").count(), 2, "{after}");
    assert_eq!(after.matches("Private Key Object").count(), 2, "{after}");
    assert_ne!(report.new_serial, "52");
    encryption_key_still_decrypts(&c);
}

#[test]
fn ec_new_key_renewal_leaves_the_key_agreement_pair_alone() {
    // EC private keys show no point: the engine proves which key is the signing key
    // by a signature, and touches nothing it cannot prove.
    let c = container("ec", true, KeyPolicy::New);
    renew_signing(&c);
    let after = objects(&c);
    assert_eq!(after.matches("label:      张三 加密").count(), 3, "{after}");
    assert_eq!(after.matches("Private Key Object").count(), 2, "{after}");
}

/// A token whose old encryption certificate cannot be changed (CKA_MODIFIABLE false,
/// as some vendors write it): archiving it would fail half-way through activation, so
/// the renewal is refused before the first change and the token is as before.
#[test]
fn read_only_object_is_refused_before_anything_changes() {
    use ukey_token::cryptoki::object::{Attribute, CertificateType, ObjectClass};
    let env = Env::new(&[TokenSpec::dual(
        "Read-only",
        softhsm_fixtures::KeyAlg::Rsa2048,
    )]);
    let fx = &env.tokens[0];
    env.order(
        &fx.certs[0],
        KeyPolicy::New,
        KeyAlgorithm::Rsa2048,
        Some(&fx.certs[1]),
        true,
    );
    let module = env.module();
    let token = summary(&module, &fx.serial);
    let pin = SecretString::from(fx.user_pin.clone());
    let snapshot = || {
        let s = module.open_session(&token).unwrap();
        s.login(&pin).unwrap();
        s.snapshot().unwrap()
    };
    {
        let s = module.open_rw_session(&token).unwrap();
        s.login(&pin).unwrap();
        let enc = &fx.certs[1];
        let mut template = vec![
            Attribute::Class(ObjectClass::CERTIFICATE),
            Attribute::CertificateType(CertificateType::X_509),
            Attribute::Token(true),
            Attribute::Private(false),
            Attribute::Modifiable(false),
            Attribute::Id(enc.key_id.clone()),
            Attribute::Label(enc.label.as_bytes().to_vec()),
            Attribute::Value(enc.der.clone()),
        ];
        for h in s.find_certificate_by_value(&enc.der).unwrap() {
            template.extend(
                s.attributes(
                    h,
                    &[
                        ukey_token::cryptoki::object::AttributeType::Subject,
                        ukey_token::cryptoki::object::AttributeType::Issuer,
                        ukey_token::cryptoki::object::AttributeType::SerialNumber,
                    ],
                )
                .unwrap(),
            );
            s.destroy(h).unwrap();
        }
        s.cryptoki().create_object(&template).unwrap();
    }
    let before = snapshot();
    let client = env.client();
    let opts = env.options();
    let plan = preflight(&module, &token, None, &client, &opts).unwrap();
    let err = renew(&module, plan, &pin, &client, &opts, &mut |_| {}).unwrap_err();
    assert_eq!(err.code(), "read_only_objects", "{err}");
    assert!(
        err.user_message(ukey_token::Lang::ZhCn)
            .contains("未做任何改动"),
        "{}",
        err.user_message(ukey_token::Lang::ZhCn)
    );
    assert_eq!(snapshot(), before, "the token changed");
}
