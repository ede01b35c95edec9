//! 国密 on a GM key: ukey-sim speaking a vendor's SM2 mechanisms over SoftHSM2, the
//! reference portal with an OpenSSL-made SM2 CA. OpenSSL 3 judges every signature,
//! CSR and certificate with the GM ID (and refuses them without it).

mod common;

use std::path::PathBuf;
use std::process::Output;

use secrecy::SecretString;
use serde_json::Value;
use softhsm_fixtures::openssl_sm2::{GM_DISTID_OPT, OpenSslSm2};
use softhsm_fixtures::{SoftHsm, TokenFixture, TokenSpec, softhsm_module};
use ukey_portal_api::{CreateOrderRequest, InitialState, KeyAlgorithm, KeyPolicy};
use ukey_sim::Control;
use ukey_token::{KeyAlg, Module, PublicKey, TokenSigner};

const UKEY: &str = env!("CARGO_BIN_EXE_ukey");

/// A SoftHSM2 installation with one key behind ukey-sim, made a GM key of `profile`.
struct GmKey {
    hsm: SoftHsm,
    token: TokenFixture,
    shim: PathBuf,
    state: PathBuf,
    ssl: OpenSslSm2,
    _dir: tempfile::TempDir,
}

fn gm_key(spec: TokenSpec, profile: &str) -> GmKey {
    let hsm = SoftHsm::new().unwrap();
    let token = hsm.create_token(&spec).unwrap();
    let state = hsm.dir().join("ukey-sim-state");
    let shim = hsm.dir().join(ukey_sim::module_file_name());
    std::fs::copy(common::shim_module(), &shim).unwrap();
    Control::new(&state)
        .unwrap()
        .set_gm(&token.serial, Some(profile))
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ssl = OpenSslSm2::new(dir.path());
    GmKey {
        hsm,
        token,
        shim,
        state,
        ssl,
        _dir: dir,
    }
}

impl GmKey {
    fn ukey(&self, args: &[&str], stdin: &str) -> Output {
        use std::io::Write as _;
        let mut child = self
            .hsm
            .command(UKEY)
            .arg("--module")
            .arg(&self.shim)
            .args(args)
            .env_remove("UKEY_PKCS11_MODULE")
            .env("UKEY_CONFIG", self.hsm.dir().join("config.toml"))
            .env("UKEY_SYSTEM_CONFIG", self.hsm.dir().join("no-system.toml"))
            .env("UKEY_DATA_DIR", self.hsm.dir().join("data"))
            .env(ukey_sim::STATE_ENV, &self.state)
            .env(ukey_sim::BACKEND_ENV, softhsm_module().unwrap())
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(stdin.as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    }

    fn path(&self, file: &str) -> PathBuf {
        self.ssl.dir().join(file)
    }

    fn write(&self, file: &str, bytes: &[u8]) {
        std::fs::write(self.path(file), bytes).unwrap();
    }
}

fn text(out: &Output) -> String {
    format!(
        "status {:?}\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn pem(tag: &str, der: &[u8]) -> String {
    pem::encode(&pem::Pem::new(tag, der.to_vec()))
}

/// The token layer on a GM key: an SM2 key pair made through the vendor's mechanism,
/// a CSR and a signature made on the key. OpenSSL verifies both with the GM ID only.
fn token_layer_on(profile: &str) {
    let k = gm_key(TokenSpec::empty("GM token"), profile);
    k.hsm.activate();
    #[allow(unsafe_code)]
    // SAFETY: one test per process (nextest); no thread reads the environment yet.
    unsafe {
        std::env::set_var(ukey_sim::STATE_ENV, &k.state);
    }
    let module = Module::load(&k.shim).unwrap();
    let token = module.tokens().unwrap().remove(0);
    let s = module.open_rw_session(&token).unwrap();
    assert_eq!(
        s.sm2_profile().map(|p| p.name),
        Some(profile.to_owned()),
        "the built-in profile is found by the token's manufacturer"
    );
    s.login(&SecretString::from(k.token.user_pin.clone()))
        .unwrap();
    let pair = s
        .generate_key_pair(KeyAlg::Sm2, b"sm2", "SM2 test")
        .unwrap();
    let public = s.public_key(pair.public).unwrap();
    assert!(matches!(public, PublicKey::Sm2 { .. }), "{public:?}");

    let mut params = rcgen::CertificateParams::default();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "张三");
    params
        .distinguished_name
        .push(rcgen::DnType::OrganizationName, "某某建设工程有限公司");
    let csr = TokenSigner::new(&s, pair.private, public.clone())
        .csr(&params)
        .unwrap();
    k.write("t.csr", pem("CERTIFICATE REQUEST", &csr).as_bytes());
    let verify = |extra: &[&str]| {
        let mut args = vec!["req", "-in", "t.csr", "-noout", "-verify"];
        args.extend_from_slice(extra);
        let out = k.ssl.output(&args);
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    };
    let with_id = verify(&["-vfyopt", GM_DISTID_OPT]);
    assert!(with_id.contains("verify OK"), "{profile}: {with_id}");
    let without = verify(&[]);
    assert!(
        !without.contains("verify OK"),
        "{profile}: the empty ID must fail: {without}"
    );
    // The key OpenSSL reads from the CSR is the token's.
    let spki = k
        .ssl
        .output(&["req", "-in", "t.csr", "-noout", "-pubkey"])
        .stdout;
    k.write("t.pub", &spki);
    k.ssl
        .run(&[
            "pkey", "-pubin", "-in", "t.pub", "-outform", "DER", "-out", "t.spki",
        ])
        .unwrap();
    assert_eq!(k.ssl.read("t.spki").unwrap(), public.spki());
    let subject = k
        .ssl
        .run(&[
            "req", "-in", "t.csr", "-noout", "-subject", "-nameopt", "utf8",
        ])
        .unwrap();
    assert!(
        subject.contains("张三") && subject.contains("某某建设工程有限公司"),
        "{subject}"
    );

    // A message signed on the token verifies with pkeyutl and the GM ID.
    let msg = "投标文件 sealed bid".as_bytes();
    let sig = s.sign_data(&public, pair.private, msg).unwrap();
    k.write("m.txt", msg);
    k.write("m.sig", &sig);
    let out = k.ssl.output(&[
        "pkeyutl",
        "-verify",
        "-pubin",
        "-inkey",
        "t.pub",
        "-rawin",
        "-digest",
        "sm3",
        "-pkeyopt",
        GM_DISTID_OPT,
        "-in",
        "m.txt",
        "-sigfile",
        "m.sig",
    ]);
    assert!(out.status.success(), "{profile}: {}", text(&out));
}

#[test]
fn an_sm2_key_csr_and_signature_on_a_tass_key_verify_with_openssl() {
    token_layer_on("tass");
}

#[test]
fn an_sm2_key_csr_and_signature_on_a_luna_key_verify_with_openssl() {
    token_layer_on("luna");
}

/// An SM2 portal (OpenSSL-made CA) that also accepts the fixtures' RSA CA, with a paid
/// upgrade order for the key's RSA certificate.
fn sm2_portal(k: &GmKey) -> common::LoopbackPortal {
    k.ssl
        .ca("sm2ca", "/C=CN/O=某某数字认证/CN=某某 SM2 CA")
        .unwrap();
    let rsa_ca = k.hsm.ca().unwrap();
    let portal = common::start_portal_with_ca(
        &k.path("sm2ca.pem"),
        &k.path("sm2ca.key"),
        Some(&rsa_ca.issuing_cert_pem),
    );
    portal
        .server
        .portal
        .create_order(&CreateOrderRequest {
            serial_hex: k.token.certs[0].serial_hex.clone(),
            issuer_der: ukey_renewal::status_request(&k.token.certs[0].der)
                .unwrap()
                .issuer_der,
            issuer_dn: None,
            years: 1,
            state: InitialState::Ready,
            key_policy: KeyPolicy::New,
            with_encryption_cert: false,
            target_algorithm: KeyAlgorithm::Sm2,
            old_encryption_serial_hex: None,
        })
        .unwrap();
    portal
}

fn list(k: &GmKey) -> Value {
    let out = k.ukey(&["list", "--json"], "");
    assert!(out.status.success(), "{}", text(&out));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn ukey_renew_upgrades_an_rsa_certificate_to_sm2_on_the_same_key() {
    let k = gm_key(TokenSpec::ukey("GM UKey"), "tass");
    let portal = sm2_portal(&k);
    let rsa_root = k.hsm.ca().unwrap().root_cert_path.clone();
    let url = portal.server.url.clone();
    let out = k.ukey(
        &[
            "renew",
            "--portal",
            &url,
            "--pin-stdin",
            "--yes",
            "--json",
            "--trust",
            k.path("sm2ca.pem").to_str().unwrap(),
            "--trust",
            rsa_root.to_str().unwrap(),
        ],
        &format!("{}\n", k.token.user_pin),
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["status"], "renewed", "{v:#}");

    // The key now holds one signing certificate: SM2, from the SM2 CA.
    let listed = list(&k);
    let certs = listed["tokens"][0]["certificates"]
        .as_array()
        .unwrap()
        .clone();
    assert_eq!(certs.len(), 1, "{listed:#}");
    assert_eq!(certs[0]["key_algorithm"], "SM2", "{listed:#}");
    let serial = certs[0]["serial"].as_str().unwrap().to_owned();
    assert_ne!(serial, k.token.certs[0].serial_hex);

    // Read back by OpenSC's pkcs11-tool, judged by OpenSSL with the GM ID.
    let der = read_certificate(&k, &serial);
    k.write("new.der", &der);
    k.ssl
        .run(&[
            "x509", "-inform", "DER", "-in", "new.der", "-out", "new.pem",
        ])
        .unwrap();
    assert!(k.ssl.verifies_with_gm_id("sm2ca", "new.pem"));
    let empty_id = k.ssl.output(&["verify", "-CAfile", "sm2ca.pem", "new.pem"]);
    assert!(!empty_id.status.success(), "{}", text(&empty_id));
    let subject = k
        .ssl
        .run(&[
            "x509", "-in", "new.pem", "-noout", "-subject", "-nameopt", "utf8",
        ])
        .unwrap();
    assert!(subject.contains("张三"), "{subject}");

    // `ukey diagnose` on the GM key: the SM2 certificate chains to the SM2 CA, its key
    // signs on the key (self-test), through the profile it names.
    let out = k.ukey(
        &[
            "diagnose",
            "--json",
            "--pin-stdin",
            "--trust",
            k.path("sm2ca.pem").to_str().unwrap(),
        ],
        &format!("{}\n", k.token.user_pin),
    );
    let r: Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&out)));
    let sections = r["sections"].as_array().unwrap();
    let of = |kind: &str| sections.iter().find(|s| s["kind"] == kind).unwrap();
    let check = |section: &Value, id: &str| {
        section["checks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["id"] == id)
            .unwrap_or_else(|| panic!("no {id} in {section:#}"))["status"]
            .clone()
    };
    let cert = of("certificate");
    assert_eq!(cert["verdict"], "ok", "{cert:#}");
    assert_eq!(check(cert, "certificate.chain"), "pass", "{cert:#}");
    assert_eq!(check(cert, "certificate.self_test"), "pass", "{cert:#}");
    assert_eq!(of("token")["verdict"], "ok", "{r:#}");
    assert_eq!(
        check(of("environment"), "environment.sm2_profile"),
        "pass",
        "{r:#}"
    );
}

/// A certificate's DER, as OpenSC's pkcs11-tool reads it from the key (through the
/// shim), found by its serial among the certificate objects.
fn read_certificate(k: &GmKey, serial_hex: &str) -> Vec<u8> {
    let listing = k
        .hsm
        .command("pkcs11-tool")
        .arg("--module")
        .arg(&k.shim)
        .env(ukey_sim::STATE_ENV, &k.state)
        .args(["--token-label", &k.token.label, "-O", "--type", "cert"])
        .output()
        .unwrap();
    let all = String::from_utf8_lossy(&listing.stdout).into_owned();
    let ids: Vec<String> = all
        .lines()
        .filter_map(|l| l.trim().strip_prefix("ID:"))
        .map(|id| id.trim().to_owned())
        .collect();
    for id in ids {
        let out = k.path(&format!("cert-{id}.der"));
        let read = k
            .hsm
            .command("pkcs11-tool")
            .arg("--module")
            .arg(&k.shim)
            .env(ukey_sim::STATE_ENV, &k.state)
            .args([
                "--token-label",
                &k.token.label,
                "--read-object",
                "--type",
                "cert",
                "--id",
                &id,
                "-o",
            ])
            .arg(&out)
            .output()
            .unwrap();
        assert!(read.status.success(), "{}", text(&read));
        let der = std::fs::read(&out).unwrap();
        let serial = k
            .ssl
            .run(&[
                "x509",
                "-inform",
                "DER",
                "-in",
                out.to_str().unwrap(),
                "-noout",
                "-serial",
            ])
            .unwrap();
        if serial
            .trim()
            .trim_start_matches("serial=")
            .eq_ignore_ascii_case(serial_hex)
        {
            return der;
        }
    }
    panic!("no certificate with serial {serial_hex} on the key: {all}");
}

/// PyKCS11 (a PKCS#11 client none of us wrote) decrypts a file on the key with every
/// private key that can: `sm2:<CKM hex>` (the vendor's SM2 decryption) or `oaep`
/// (RSA-OAEP SHA-1); or signs it with `sign:<CKM hex>`. Prints what each key that
/// succeeds gives, hex, one line each.
const PYKCS11_DECRYPT: &str = r#"
import sys, PyKCS11 as P
module, serial, pin, kind, path = sys.argv[1:6]
lib = P.PyKCS11Lib(); lib.load(module)
slot = [s for s in lib.getSlotList(tokenPresent=True) if lib.getTokenInfo(s).serialNumber.strip() == serial][0]
s = lib.openSession(slot); s.login(pin)
ct = open(path, "rb").read()
if kind == "oaep":
    mech = P.RSAOAEPMechanism(P.CKM_SHA_1, P.CKG_MGF1_SHA1)
else:
    mech = P.Mechanism(int(kind.split(":")[1], 16), None)
for k in s.findObjects([(P.CKA_CLASS, P.CKO_PRIVATE_KEY)]):
    try:
        if kind.startswith("sign:"):
            print(bytes(s.sign(k, ct, mech)).hex())
        else:
            print(bytes(s.decrypt(k, ct, mech)).hex())
    except P.PyKCS11Error:
        pass
"#;

fn decrypted_on_key(k: &GmKey, kind: &str, file: &str) -> Vec<Vec<u8>> {
    let out = k
        .hsm
        .command("/usr/bin/python3")
        .arg("-c")
        .arg(PYKCS11_DECRYPT)
        .arg(&k.shim)
        .args([&k.token.serial, &k.token.user_pin, kind])
        .arg(k.path(file))
        .env(ukey_sim::STATE_ENV, &k.state)
        .env(ukey_sim::BACKEND_ENV, softhsm_module().unwrap())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| hex::decode(l.trim()).unwrap())
        .collect()
}

/// The key's RSA certificates before the upgrade.
struct OldRsa {
    sig_serial: String,
    sig_der: Vec<u8>,
    enc_serial: String,
    enc_der: Vec<u8>,
}

/// The key as a CA's driver left it before 国密, made by tools none of us wrote: an RSA
/// CA, a signing and an encryption RSA pair with their certificates made by OpenSSL,
/// written onto the key by OpenSC's pkcs11-tool (through SoftHSM2).
fn openssl_rsa_dual(k: &GmKey) -> OldRsa {
    let ssl = &k.ssl;
    ssl.run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "rsaca.key",
        "-out",
        "rsaca.pem",
        "-days",
        "3650",
        "-utf8",
        "-subj",
        "/C=CN/O=某某数字认证/CN=某某 RSA CA",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    ])
    .unwrap();
    let mut made = Vec::new();
    for (name, usage, serial, id, label, flag) in [
        (
            "sig",
            "digitalSignature,nonRepudiation",
            "5201",
            "01",
            "张三 签名",
            "--usage-sign",
        ),
        (
            "enc",
            "keyEncipherment,dataEncipherment",
            "5202",
            "02",
            "张三 加密",
            "--usage-decrypt",
        ),
    ] {
        k.write(
            &format!("{name}.ext"),
            format!("basicConstraints=CA:FALSE\nkeyUsage=critical,{usage}\n").as_bytes(),
        );
        let (key, csr, der, public) = (
            format!("{name}.key"),
            format!("{name}.csr"),
            format!("{name}.der"),
            format!("{name}.pub.der"),
        );
        ssl.run(&[
            "req",
            "-new",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            &key,
            "-utf8",
            "-subj",
            "/C=CN/O=某某建设工程有限公司/CN=张三",
            "-out",
            &csr,
        ])
        .unwrap();
        ssl.run(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "rsaca.pem",
            "-CAkey",
            "rsaca.key",
            "-set_serial",
            &format!("0x{serial}"),
            "-days",
            "10",
            "-extfile",
            &format!("{name}.ext"),
            "-outform",
            "DER",
            "-out",
            &der,
        ])
        .unwrap();
        ssl.run(&[
            "pkey", "-in", &key, "-pubout", "-outform", "DER", "-out", &public,
        ])
        .unwrap();
        for (file, kind) in [(&key, "privkey"), (&public, "pubkey"), (&der, "cert")] {
            let out = k
                .hsm
                .command("pkcs11-tool")
                .arg("--module")
                .arg(softhsm_module().unwrap())
                .args([
                    "--token-label",
                    &k.token.label,
                    "--login",
                    "--pin",
                    &k.token.user_pin,
                ])
                .arg("--write-object")
                .arg(k.path(file))
                .args(["--type", kind, "--id", id, "--label", label])
                .args(if kind == "privkey" {
                    vec![flag]
                } else {
                    vec![]
                })
                .output()
                .unwrap();
            assert!(out.status.success(), "pkcs11-tool {file}: {}", text(&out));
        }
        made.push((serial.to_owned(), ssl.read(&der).unwrap()));
    }
    let (enc_serial, enc_der) = made.pop().unwrap();
    let (sig_serial, sig_der) = made.pop().unwrap();
    OldRsa {
        sig_serial,
        sig_der,
        enc_serial,
        enc_der,
    }
}

/// ukey-sim's TASS profile with its SM4 numbers, as a user configures a vendor's
/// unpublished constants: `[[modules]]` with a `[modules.sm2]` table.
fn configure_tass_with_sm4(k: &GmKey) {
    let tass = ukey_sim::gm::profile("tass").unwrap();
    let toml = format!(
        "[[modules]]\nname = \"GM key (ukey-sim)\"\npath = \"{}\"\n\n[modules.sm2]\nname = \"tass-sm4\"\n\
         ckk_sm2 = {:#x}\nkey_pair_gen = {:#x}\nsign_prehashed = {:#x}\nsign_with_sm3 = {:#x}\n\
         sm2_decrypt = {:#x}\nckk_sm4 = {:#x}\nsm4_ecb = {:#x}\n",
        k.shim.display(),
        tass.ckk_sm2,
        tass.key_pair_gen,
        tass.sign_prehashed,
        tass.sign_with_sm3,
        tass.sm2_decrypt.unwrap(),
        tass.ckk_sm4.unwrap(),
        tass.sm4_ecb.unwrap(),
    );
    std::fs::write(k.hsm.dir().join("config.toml"), toml).unwrap();
}

#[test]
fn ukey_renew_upgrades_a_dual_rsa_key_to_dual_sm2_with_the_escrowed_key_on_the_key() {
    let k = gm_key(TokenSpec::empty("GM dual"), "tass");
    configure_tass_with_sm4(&k);
    k.ssl
        .ca("sm2ca", "/C=CN/O=某某数字认证/CN=某某 SM2 CA")
        .unwrap();
    let old = openssl_rsa_dual(&k);
    let portal = common::start_portal_with_ca(
        &k.path("sm2ca.pem"),
        &k.path("sm2ca.key"),
        Some(&std::fs::read_to_string(k.path("rsaca.pem")).unwrap()),
    );
    portal
        .server
        .portal
        .create_order(&CreateOrderRequest {
            serial_hex: old.sig_serial.clone(),
            issuer_der: ukey_renewal::status_request(&old.sig_der)
                .unwrap()
                .issuer_der,
            issuer_dn: None,
            years: 1,
            state: InitialState::Ready,
            key_policy: KeyPolicy::New,
            with_encryption_cert: true,
            target_algorithm: KeyAlgorithm::Sm2,
            old_encryption_serial_hex: Some(old.enc_serial.clone()),
        })
        .unwrap();
    // The old RSA encryption certificate, to encrypt a sealed bid to before and after.
    k.write("old-enc.der", &old.enc_der);
    k.ssl
        .run(&[
            "x509",
            "-inform",
            "DER",
            "-in",
            "old-enc.der",
            "-out",
            "old-enc.pem",
        ])
        .unwrap();
    k.write("old-bid.txt", "旧的投标文件 sealed with RSA".as_bytes());
    k.ssl
        .run(&[
            "pkeyutl",
            "-encrypt",
            "-certin",
            "-inkey",
            "old-enc.pem",
            "-pkeyopt",
            "rsa_padding_mode:oaep",
            "-in",
            "old-bid.txt",
            "-out",
            "old-bid.enc",
        ])
        .unwrap();

    let rsa_root = k.path("rsaca.pem");
    let out = k.ukey(
        &[
            "renew",
            "--portal",
            &portal.server.url,
            "--pin-stdin",
            "--yes",
            "--json",
            "--trust",
            k.path("sm2ca.pem").to_str().unwrap(),
            "--trust",
            rsa_root.to_str().unwrap(),
        ],
        &format!("{}\n", k.token.user_pin),
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));

    // Two new SM2 certificates on the key, both verified by OpenSSL with the GM ID.
    let listed = list(&k);
    let certs = listed["tokens"][0]["certificates"]
        .as_array()
        .unwrap()
        .clone();
    let sm2: Vec<&Value> = certs
        .iter()
        .filter(|c| c["key_algorithm"] == "SM2")
        .collect();
    assert_eq!(sm2.len(), 2, "{listed:#}");
    for (i, c) in sm2.iter().enumerate() {
        let der = read_certificate(&k, c["serial"].as_str().unwrap());
        let name = format!("new{i}");
        k.write(&format!("{name}.der"), &der);
        k.ssl
            .run(&[
                "x509",
                "-inform",
                "DER",
                "-in",
                &format!("{name}.der"),
                "-out",
                &format!("{name}.pem"),
            ])
            .unwrap();
        assert!(
            k.ssl.verifies_with_gm_id("sm2ca", &format!("{name}.pem")),
            "{c:#}"
        );
    }
    let enc = sm2
        .iter()
        .position(|c| c["usage"] == "encryption")
        .unwrap_or_else(|| panic!("no SM2 encryption certificate: {listed:#}"));

    // OpenSSL encrypts to the new SM2 encryption certificate: the key decrypts it with
    // the escrowed key, now on it.
    k.write("bid.txt", "新的投标文件 sealed with SM2".as_bytes());
    k.ssl
        .run(&[
            "pkeyutl",
            "-encrypt",
            "-certin",
            "-inkey",
            &format!("new{enc}.pem"),
            "-in",
            "bid.txt",
            "-out",
            "bid.enc",
        ])
        .unwrap();
    let tass = ukey_sim::gm::profile("tass").unwrap();
    let got = decrypted_on_key(
        &k,
        &format!("sm2:{:x}", tass.sm2_decrypt.unwrap()),
        "bid.enc",
    );
    assert_eq!(
        got,
        vec!["新的投标文件 sealed with SM2".as_bytes().to_vec()]
    );

    // The old RSA encryption key is kept: bids sealed to it still open.
    let got = decrypted_on_key(&k, "oaep", "old-bid.enc");
    assert_eq!(
        got,
        vec!["旧的投标文件 sealed with RSA".as_bytes().to_vec()]
    );

    // One key signs with the vendor's SM2-with-SM3 (the new signing key; the escrowed
    // key may only decrypt): OpenSSL verifies it with the signing certificate and the
    // GM ID.
    k.write("tender.txt", "投标承诺书".as_bytes());
    let sigs = decrypted_on_key(&k, &format!("sign:{:x}", tass.sign_with_sm3), "tender.txt");
    assert_eq!(sigs.len(), 1, "one signing key");
    let signing = 1 - enc;
    k.ssl
        .run(&[
            "x509",
            "-in",
            &format!("new{signing}.pem"),
            "-noout",
            "-pubkey",
            "-out",
            "sign.pub",
        ])
        .unwrap();
    let sig = &sigs[0];
    let int = |v: &[u8]| {
        let v = &v[v.iter().position(|b| *b != 0).unwrap_or(v.len() - 1)..];
        let pad = usize::from(v[0] & 0x80 != 0);
        [vec![0x02, (v.len() + pad) as u8], vec![0; pad], v.to_vec()].concat()
    };
    let body = [int(&sig[..32]), int(&sig[32..])].concat();
    k.write("tender.sig", &[vec![0x30, body.len() as u8], body].concat());
    let verify = k.ssl.output(&[
        "pkeyutl",
        "-verify",
        "-pubin",
        "-inkey",
        "sign.pub",
        "-rawin",
        "-digest",
        "sm3",
        "-pkeyopt",
        GM_DISTID_OPT,
        "-in",
        "tender.txt",
        "-sigfile",
        "tender.sig",
    ]);
    assert!(verify.status.success(), "{}", text(&verify));
}
