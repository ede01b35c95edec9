//! Issue 16, secrets at rest: the portal with a real HSM (SoftHSM2). The escrow's
//! key-encryption key and the CA key live in the HSM; every portal runs as a
//! `ukey-portal` child process with its own SOFTHSM2_CONF and token directory (a test
//! process loads no PKCS#11 module itself), and SoftHSM2's own tools (`softhsm2-util`,
//! OpenSC's `pkcs11-tool`) and `openssl` judge what it did.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use aws_lc_rs::agreement::{self, ECDH_P256, PrivateKey, UnparsedPublicKey};
use aws_lc_rs::key_wrap::{AES_256, AesKek, KeyWrapPadded as _};
use common::*;
use rcgen::{CertificateParams, IsCa, Issuer, KeyPair};
use ukey_portal_api::{IssueResponse, KeyAlgorithm, KeyTransport, OrderView, paths};

/// The user PIN of every test token: distinctive, so that no output may show it.
const USER_PIN: &str = "ukey-pin-739015";
const WRONG_PIN: &str = "wrong-pin-486220";
const SO_PIN: &str = "so-pin-55817";

/// A SoftHSM2 installation of its own (configuration, token directory, PIN file)
/// standing in for the CA's HSM.
struct SoftHsm2 {
    dir: tempfile::TempDir,
    module: PathBuf,
    conf: PathBuf,
    pin_file: PathBuf,
    logs: std::cell::Cell<u32>,
}

impl SoftHsm2 {
    fn new() -> SoftHsm2 {
        let dir = tempfile::tempdir().unwrap();
        let tokens = dir.path().join("tokens");
        std::fs::create_dir(&tokens).unwrap();
        let conf = dir.path().join("softhsm2.conf");
        std::fs::write(
            &conf,
            format!(
                "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
                tokens.display()
            ),
        )
        .unwrap();
        let pin_file = dir.path().join("hsm-pin");
        write_pin(&pin_file, USER_PIN);
        SoftHsm2 {
            module: softhsm_fixtures::softhsm_module().unwrap(),
            dir,
            conf,
            pin_file,
            logs: std::cell::Cell::new(0),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `softhsm2-util --init-token`: a new token with the user PIN.
    fn init_token(&self, label: &str) {
        let (ok, text) = run(Command::new("softhsm2-util")
            .env("SOFTHSM2_CONF", &self.conf)
            .args(["--init-token", "--free", "--label", label])
            .args(["--so-pin", SO_PIN, "--pin", USER_PIN]));
        assert!(ok, "softhsm2-util: {text}");
    }

    /// `pkcs11-tool` on `token`, logged in.
    fn tool(&self, token: &str, args: &[&str]) -> String {
        let (ok, text) = run(Command::new("pkcs11-tool")
            .env("SOFTHSM2_CONF", &self.conf)
            .arg("--module")
            .arg(&self.module)
            .args(["--token-label", token, "--login", "--pin", USER_PIN])
            .args(args));
        assert!(ok, "pkcs11-tool {args:?}: {text}");
        text
    }

    /// `ukey-portal --data DATA --hsm-module … --hsm-pin-file …` (and SOFTHSM2_CONF).
    fn portal(&self, data: &Path) -> Command {
        let mut cmd = self.bare_portal(data);
        cmd.arg("--hsm-module")
            .arg(&self.module)
            .arg("--hsm-pin-file")
            .arg(&self.pin_file);
        cmd
    }

    /// `ukey-portal --data DATA` with this HSM's SOFTHSM2_CONF but no HSM option.
    fn bare_portal(&self, data: &Path) -> Command {
        let mut cmd = portal_bin();
        cmd.arg("--data")
            .arg(data)
            .env("SOFTHSM2_CONF", &self.conf)
            .env("RUST_LOG", "warn")
            .env_remove(ukey_portal::hsm::PIN_ENV);
        cmd
    }

    /// Runs a portal command that must succeed; its output.
    fn ok(&self, cmd: &mut Command) -> String {
        let (ok, text) = run(cmd);
        assert!(ok, "{cmd:?}: {text}");
        assert_no_pin(&text);
        text
    }

    /// Runs a portal command that must fail; its output.
    fn refused(&self, cmd: &mut Command) -> String {
        let (ok, text) = run(cmd);
        assert!(!ok, "{cmd:?} should fail: {text}");
        assert_no_pin(&text);
        text
    }

    /// Starts `cmd serve ARGS`, its standard error kept in a file.
    fn serve(&self, cmd: &mut Command, args: &[&str]) -> Serving {
        let n = self.logs.get() + 1;
        self.logs.set(n);
        let log = self.path(&format!("serve-{n}.log"));
        let (server, url) = spawn_serve(
            cmd.args(["serve", "--listen", "127.0.0.1:0"])
                .args(args)
                .stderr(Stdio::from(std::fs::File::create(&log).unwrap())),
        );
        Serving { server, url, log }
    }
}

struct Serving {
    server: Server,
    url: Option<String>,
    log: PathBuf,
}

impl Serving {
    fn api(&self) -> Api {
        Api::new(self.url.as_deref().expect("the portal started"))
    }

    /// What the portal wrote to standard error so far.
    fn log(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap();
        assert_no_pin(&text);
        text
    }

    /// A portal that refused to start: its message (and it ended).
    fn refusal(mut self) -> String {
        assert!(self.url.is_none(), "the portal started: {}", self.log());
        let status = self.server.0.wait().unwrap();
        assert!(!status.success());
        self.log()
    }
}

fn write_pin(path: &Path, pin: &str) {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::write(path, format!("{pin}\n")).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

fn assert_no_pin(text: &str) {
    for pin in [USER_PIN, WRONG_PIN, SO_PIN] {
        assert!(!text.contains(pin), "a PIN in the output: {text}");
    }
}

/// Every file of the data directory, raw: the SQLite file, its WAL and the rest.
fn raw_data_dir(data: &Path) -> Vec<u8> {
    let mut all = Vec::new();
    for e in std::fs::read_dir(data).unwrap() {
        let p = e.unwrap().path();
        if p.is_file() {
            all.extend(std::fs::read(&p).unwrap());
        }
    }
    assert!(
        data.join("portal.sqlite3-wal").exists() || data.join("portal.sqlite3").exists(),
        "the database is there"
    );
    all
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    needle.len() <= hay.len() && hay.windows(needle.len()).any(|w| w == needle)
}

/// The secrets of an escrowed PKCS#8 key: the PKCS#8 itself, its inner private key,
/// and the private scalar (EC) or private exponent and primes (RSA).
fn secrets_of(pkcs8: &[u8]) -> Vec<(&'static str, Vec<u8>)> {
    use der::Decode as _;
    use der::asn1::{AnyRef, OctetStringRef, UintRef};
    #[derive(der::Sequence)]
    struct PrivateKeyInfo<'a> {
        version: u8,
        algorithm: AnyRef<'a>,
        private_key: OctetStringRef<'a>,
    }
    #[derive(der::Sequence)]
    struct RsaPrivateKey<'a> {
        version: u8,
        n: UintRef<'a>,
        e: UintRef<'a>,
        d: UintRef<'a>,
        p: UintRef<'a>,
        q: UintRef<'a>,
        dp: UintRef<'a>,
        dq: UintRef<'a>,
        qinv: UintRef<'a>,
    }
    let info = PrivateKeyInfo::from_der(pkcs8).expect("a PKCS#8 v1 key");
    let inner = info.private_key.as_bytes();
    let mut out = vec![("PKCS#8", pkcs8.to_vec()), ("private key", inner.to_vec())];
    if let Ok(rsa) = RsaPrivateKey::from_der(inner) {
        out.push(("RSA d", rsa.d.as_bytes().to_vec()));
        out.push(("RSA p", rsa.p.as_bytes().to_vec()));
        out.push(("RSA q", rsa.q.as_bytes().to_vec()));
    } else {
        let kp = aws_lc_rs::signature::EcdsaKeyPair::from_pkcs8(
            &aws_lc_rs::signature::ECDSA_P256_SHA256_ASN1_SIGNING,
            pkcs8,
        )
        .expect("an EC P-256 key");
        use aws_lc_rs::encoding::AsBigEndian as _;
        let d = kp.private_key().as_be_bytes().unwrap();
        out.push(("EC private scalar", d.as_ref().to_vec()));
    }
    out
}

/// A transport key the test holds (P-256, ECDH), as a token makes one per renewal.
struct Transport {
    key: PrivateKey,
    spki: Vec<u8>,
}

impl Transport {
    fn new() -> Transport {
        let key = PrivateKey::generate(&ECDH_P256).unwrap();
        let point = key.compute_public_key().unwrap().as_ref().to_vec();
        let spki = ukey_token::PublicKey::EcP256 { point }.spki();
        Transport { key, spki }
    }

    /// Opens the envelope of an issue answer: the escrowed PKCS#8, as the token gets it.
    fn open(&self, issued: &IssueResponse) -> Vec<u8> {
        let env = issued
            .encryption
            .as_ref()
            .and_then(|e| e.envelope.as_ref())
            .expect("an envelope");
        let KeyTransport::EcdhP256 {
            ephemeral_public_key,
        } = &env.key_transport
        else {
            panic!("ECDH transport expected: {:?}", env.key_transport)
        };
        let cek = agreement::agree(
            &self.key,
            UnparsedPublicKey::new(&ECDH_P256, ephemeral_public_key),
            (),
            |z| Ok(z.to_vec()),
        )
        .unwrap();
        let kek = AesKek::new(&AES_256, &cek).unwrap();
        let mut out = vec![0u8; env.wrapped_private_key.len()];
        kek.unwrap_with_padding(&env.wrapped_private_key, &mut out)
            .unwrap()
            .to_vec()
    }
}

/// A renewal with an escrowed encryption key, issued.
struct Escrowed {
    order_id: String,
    holder: Holder,
    new_key: KeyPair,
    encryption_serial: String,
    pkcs8: Vec<u8>,
}

/// The CA of a data directory as the test's rcgen issuer (a CA kept in files).
fn file_ca(data: &Path) -> Issuer<'static, KeyPair> {
    Issuer::from_ca_cert_pem(
        &std::fs::read_to_string(data.join("ca-cert.pem")).unwrap(),
        KeyPair::from_pem(&std::fs::read_to_string(data.join("ca-key.pem")).unwrap()).unwrap(),
    )
    .unwrap()
}

/// Makes `cmd` the admin CLI's creation of a ready order with an escrowed key for
/// `holder`.
fn order(cmd: &mut Command, holder: &Holder, alg: &str, issuer: Option<&Path>) {
    cmd.args(["order", "create", "--serial", &holder.serial_hex])
        .args(["--state", "ready", "--algorithm", alg, "--encryption-cert"]);
    if let Some(ca) = issuer {
        cmd.arg("--issuer-cert").arg(ca);
    }
}

/// Renews `holder` through `api` with an escrowed key; opens the envelope.
async fn issue_escrowed(api: &Api, order_id: &str, holder: Holder, alg: KeyAlgorithm) -> Escrowed {
    let new_key = new_key(alg);
    let transport = Transport::new();
    let req = api
        .issue_request_with(order_id, &holder, &new_key, Some(transport.spki.clone()))
        .await;
    let issued: IssueResponse = api.post_ok(&paths::issue(order_id), &req).await;
    let pkcs8 = transport.open(&issued);
    let enc = issued.encryption.as_ref().unwrap();
    // The key delivered is the encryption certificate's.
    let (_, cert) = x509_parser::parse_x509_certificate(&enc.certificate_der).unwrap();
    let spki_of_key = match alg {
        KeyAlgorithm::EcP256 => {
            use aws_lc_rs::signature::KeyPair as _;
            aws_lc_rs::signature::EcdsaKeyPair::from_pkcs8(
                &aws_lc_rs::signature::ECDSA_P256_SHA256_ASN1_SIGNING,
                &pkcs8,
            )
            .unwrap()
            .public_key()
            .as_ref()
            .to_vec()
        }
        _ => {
            use aws_lc_rs::signature::KeyPair as _;
            aws_lc_rs::rsa::KeyPair::from_pkcs8(&pkcs8)
                .unwrap()
                .public_key()
                .as_ref()
                .to_vec()
        }
    };
    assert_eq!(cert.public_key().subject_public_key.as_ref(), spki_of_key);
    Escrowed {
        order_id: order_id.to_owned(),
        holder,
        new_key,
        encryption_serial: enc.certificate_serial_hex.clone(),
        pkcs8,
    }
}

/// A portal (with the HSM's key-encryption key on `token`, or none) issues an EC and an
/// RSA renewal with escrowed keys; returns them, the portal still running.
async fn escrow_two(hsm: &SoftHsm2, data: &Path, token: Option<&str>) -> (Serving, Vec<Escrowed>) {
    escrow_two_on(hsm, data, token, None).await
}

/// [`escrow_two`] with the store on the PostgreSQL database `database`.
async fn escrow_two_on(
    hsm: &SoftHsm2,
    data: &Path,
    token: Option<&str>,
    database: Option<&str>,
) -> (Serving, Vec<Escrowed>) {
    let portal = |hsm: &SoftHsm2| {
        let mut c = match token {
            Some(t) => {
                let mut c = hsm.portal(data);
                c.args(["--hsm-token", t]);
                c
            }
            None => hsm.bare_portal(data),
        };
        if let Some(db) = database {
            c.env("UKEY_PORTAL_DATABASE", db);
        }
        c
    };
    hsm.ok(portal(hsm).args(["ca", "show"]));
    let ca = file_ca(data);
    let serving = hsm.serve(&mut portal(hsm), &[]);
    let api = serving.api();
    let mut out = Vec::new();
    for (alg, name) in [
        (KeyAlgorithm::EcP256, "EC-P256"),
        (KeyAlgorithm::Rsa2048, "RSA-2048"),
    ] {
        let holder = Holder::issued_by(&ca, alg, CN, ORG);
        let mut cmd = portal(hsm);
        order(&mut cmd, &holder, name, None);
        let order_id = hsm.ok(cmd.arg("--json"));
        let view: OrderView = serde_json::from_str(&order_id).unwrap();
        out.push(issue_escrowed(&api, &view.order_id, holder, alg).await);
    }
    (serving, out)
}

/// Asks again for an issued order's certificates with the same new key (the portal
/// reads the escrowed key back from its database); the answer.
async fn repeat(api: &Api, e: &Escrowed) -> (reqwest::StatusCode, Transport, String) {
    let transport = Transport::new();
    let req = api
        .issue_request_with(
            &e.order_id,
            &e.holder,
            &e.new_key,
            Some(transport.spki.clone()),
        )
        .await;
    let r = api.post(&paths::issue(&e.order_id), &req).await;
    (r.status(), transport, r.text().await.unwrap())
}

#[tokio::test]
async fn escrowed_keys_are_sealed_under_the_hsm_key_and_the_database_holds_none_in_clear() {
    let hsm = SoftHsm2::new();
    hsm.init_token("portal-hsm");
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");

    // The key-encryption key, made once; pkcs11-tool shows it cannot leave the HSM.
    let made = hsm.ok(hsm
        .portal(&data)
        .args(["--hsm-token", "portal-hsm", "hsm", "init"]));
    assert!(
        made.contains("made") && made.contains("ukey-portal-kek"),
        "{made}"
    );
    let again = hsm.ok(hsm
        .portal(&data)
        .args(["--hsm-token", "portal-hsm", "hsm", "init"]));
    assert!(again.contains("already there"), "{again}");
    let objects = hsm.tool("portal-hsm", &["--list-objects", "--type", "secrkey"]);
    assert_eq!(objects.matches("Secret Key Object").count(), 1, "{objects}");
    assert!(objects.contains("ukey-portal-kek"), "{objects}");
    assert!(
        objects.contains("sensitive") && objects.contains("never extractable"),
        "{objects}"
    );

    // With the HSM: the escrow is sealed; start-up names the token and the key.
    let (serving, escrowed) = escrow_two(&hsm, &data, Some("portal-hsm")).await;
    let log = serving.log();
    assert!(
        log.contains("portal-hsm") && log.contains("ukey-portal-kek") && log.contains("sealed"),
        "{log}"
    );
    assert!(!log.contains("file permissions"), "{log}");
    let raw = raw_data_dir(&data);
    for e in &escrowed {
        for (what, secret) in secrets_of(&e.pkcs8) {
            assert!(
                !contains(&raw, &secret),
                "{what} of {}'s escrowed key is in the data directory in clear",
                e.encryption_serial
            );
        }
    }
    assert!(
        contains(&raw, ukey_portal::hsm::SEALED_MAGIC),
        "sealed blobs are stored"
    );

    // The same search finds them where no HSM seals the escrow: the check can fail.
    let plain = tmp.path().join("plain");
    let (plain_serving, plain_escrowed) = escrow_two(&hsm, &plain, None).await;
    assert!(plain_serving.log().contains("file permissions"));
    let raw_plain = raw_data_dir(&plain);
    for e in &plain_escrowed {
        for (what, secret) in secrets_of(&e.pkcs8) {
            assert!(contains(&raw_plain, &secret), "{what} found without an HSM");
        }
    }
    drop(plain_serving);

    // Restarted, with the same HSM: the escrowed key read back from the database and
    // opened in the HSM reaches the holder again, the same key in a fresh envelope.
    drop(serving);
    let serving = hsm.serve(hsm.portal(&data).args(["--hsm-token", "portal-hsm"]), &[]);
    for e in &escrowed {
        let (status, transport, text) = repeat(&serving.api(), e).await;
        assert!(status.is_success(), "{status} {text}");
        let again: IssueResponse = serde_json::from_str(&text).unwrap();
        assert_eq!(
            again.encryption.as_ref().unwrap().certificate_serial_hex,
            e.encryption_serial
        );
        assert_eq!(transport.open(&again), e.pkcs8, "the same escrowed key");
    }
    drop(serving);

    // Without the HSM the portal cannot open it, and says so (the holder gets an
    // internal error; the operator reads why).
    let serving = hsm.serve(&mut hsm.bare_portal(&data), &[]);
    let (status, _, text) = repeat(&serving.api(), &escrowed[0]).await;
    assert_eq!(status.as_u16(), 500, "{text}");
    let log = serving.log();
    assert!(
        log.contains(&escrowed[0].encryption_serial)
            && log.contains("ukey-portal-kek")
            && log.contains("未配置 HSM")
            && log.contains("runs without an HSM"),
        "{log}"
    );
    drop(serving);

    // Another HSM token, with a key-encryption key of its own (same label): the blob
    // names the key it was sealed under, which that token does not hold.
    hsm.init_token("other-hsm");
    hsm.ok(hsm
        .portal(&data)
        .args(["--hsm-token", "other-hsm", "hsm", "init"]));
    let serving = hsm.serve(hsm.portal(&data).args(["--hsm-token", "other-hsm"]), &[]);
    let (status, _, _) = repeat(&serving.api(), &escrowed[0]).await;
    assert_eq!(status.as_u16(), 500);
    let log = serving.log();
    assert!(
        log.contains("does not hold") && log.contains("other-hsm"),
        "{log}"
    );
    drop(serving);

    // A sealed key moved to another certificate's row does not open: the serial is
    // bound into the encryption.
    {
        let db = rusqlite::Connection::open(data.join("portal.sqlite3")).unwrap();
        let blob = |serial: &str| -> Vec<u8> {
            db.query_row(
                "SELECT escrow_pkcs8 FROM certificates WHERE serial_hex = ?1",
                [serial],
                |r| r.get(0),
            )
            .unwrap()
        };
        let (a, b) = (
            &escrowed[0].encryption_serial,
            &escrowed[1].encryption_serial,
        );
        let (blob_a, blob_b) = (blob(a), blob(b));
        for (serial, value) in [(a, &blob_b), (b, &blob_a)] {
            db.execute(
                "UPDATE certificates SET escrow_pkcs8 = ?1 WHERE serial_hex = ?2",
                rusqlite::params![value, serial],
            )
            .unwrap();
        }
    }
    let serving = hsm.serve(hsm.portal(&data).args(["--hsm-token", "portal-hsm"]), &[]);
    let (status, _, _) = repeat(&serving.api(), &escrowed[0]).await;
    assert_eq!(status.as_u16(), 500);
    let log = serving.log();
    assert!(log.contains("does not open"), "{log}");
}

#[test]
fn an_hsm_portal_refuses_to_start_on_a_wrong_pin_or_a_missing_token_or_key() {
    let hsm = SoftHsm2::new();
    hsm.init_token("portal-hsm");
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let with_token = |token: &str| {
        let mut c = hsm.portal(&data);
        c.args(["--hsm-token", token]);
        c
    };

    // No key-encryption key yet: serve says to make it.
    let text = hsm.serve(&mut with_token("portal-hsm"), &[]).refusal();
    assert!(
        text.contains("ukey-portal hsm init") && text.contains("ukey-portal-kek"),
        "{text}"
    );
    hsm.ok(with_token("portal-hsm").args(["hsm", "init"]));
    let serving = hsm.serve(&mut with_token("portal-hsm"), &[]);
    assert!(serving.url.is_some(), "{}", serving.log());
    drop(serving);

    // A token that is not there: named, with those that are.
    let text = hsm.serve(&mut with_token("no-such-token"), &[]).refusal();
    assert!(
        text.contains("no token labelled \"no-such-token\"") && text.contains("\"portal-hsm\""),
        "{text}"
    );

    // A wrong PIN: refused once, not retried, and shown nowhere.
    let wrong = hsm.path("wrong-pin");
    write_pin(&wrong, WRONG_PIN);
    let text = hsm
        .serve(
            hsm.bare_portal(&data)
                .arg("--hsm-module")
                .arg(&hsm.module)
                .arg("--hsm-pin-file")
                .arg(&wrong)
                .args(["--hsm-token", "portal-hsm"]),
            &[],
        )
        .refusal();
    assert!(
        text.contains("refused the PIN") && text.contains("PIN 不正确"),
        "{text}"
    );

    // No PIN at all; a PIN file others can read; a PIN on the command line.
    let text = hsm.refused(
        hsm.bare_portal(&data)
            .arg("--hsm-module")
            .arg(&hsm.module)
            .args(["--hsm-token", "portal-hsm", "order", "list"]),
    );
    assert!(text.contains(ukey_portal::hsm::PIN_ENV), "{text}");
    {
        use std::os::unix::fs::PermissionsExt as _;
        let open = hsm.path("open-pin");
        write_pin(&open, USER_PIN);
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o644)).unwrap();
        let text = hsm.refused(
            hsm.bare_portal(&data)
                .arg("--hsm-module")
                .arg(&hsm.module)
                .arg("--hsm-pin-file")
                .arg(&open)
                .args(["--hsm-token", "portal-hsm", "order", "list"]),
        );
        assert!(text.contains("chmod 600"), "{text}");
    }
    let text = hsm.refused(
        hsm.portal(&data)
            .args(["--hsm-pin", USER_PIN, "order", "list"]),
    );
    assert!(text.contains("unexpected argument"), "{text}");

    // The PIN from the environment works as the file does.
    let serving = hsm.serve(
        hsm.bare_portal(&data)
            .arg("--hsm-module")
            .arg(&hsm.module)
            .args(["--hsm-token", "portal-hsm"])
            .env(ukey_portal::hsm::PIN_ENV, USER_PIN),
        &[],
    );
    assert!(serving.url.is_some(), "{}", serving.log());
    drop(serving);

    // A module that is not there.
    let text = hsm.refused(
        hsm.bare_portal(&data)
            .args(["--hsm-module", "/nonexistent/libpkcs11.so"])
            .arg("--hsm-pin-file")
            .arg(&hsm.pin_file)
            .args(["--hsm-token", "portal-hsm", "order", "list"]),
    );
    assert!(
        text.contains("cannot load the HSM's PKCS#11 module"),
        "{text}"
    );
}

/// A CA kept outside the portal (the holders' current certificates are its), as rcgen
/// issuer and PEM file: the portal accepts it as an issuer it renews for.
fn outside_ca(path: &Path) -> Issuer<'static, KeyPair> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = CertificateParams::default();
    params.distinguished_name = subject("Previous CA", "测试旧 CA");
    params.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    let cert = params.self_signed(&key).unwrap();
    std::fs::write(path, cert.pem()).unwrap();
    Issuer::new(params, key)
}

/// The CA key in the HSM (made there by pkcs11-tool, never extractable): the CA
/// certificate, issued certificates, the CMP protection certificate and the CRL are
/// signed through PKCS#11, and OpenSSL verifies them.
async fn ca_key_in_the_hsm(key_type: &str, with_kek: bool, via_serve: bool) {
    let hsm = SoftHsm2::new();
    hsm.init_token("ca-hsm");
    hsm.tool(
        "ca-hsm",
        &[
            "--keypairgen",
            "--key-type",
            key_type,
            "--label",
            "ukey-ca",
            "--id",
            "01",
        ],
    );
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let uri = "pkcs11:token=ca-hsm;object=ukey-ca";
    let portal_at = |data: &Path| {
        let mut c = hsm.portal(data);
        if with_kek {
            c.args(["--hsm-token", "ca-hsm"]);
        }
        c
    };
    let portal = || portal_at(&data);
    if with_kek {
        // The escrow's key-encryption key beside the CA key, on the same token.
        hsm.ok(portal().args(["hsm", "init"]));
    }

    // Refused: an SM2 CA in the HSM; a key the token does not hold.
    let text = hsm
        .serve(
            &mut portal_at(&tmp.path().join("sm2")),
            &["--ca-key", uri, "--ca-alg", "sm2"],
        )
        .refusal();
    assert!(
        text.contains("SM2") && text.contains("SoftHSM2 has no SM2"),
        "{text}"
    );
    let text = hsm.refused(portal().args([
        "ca",
        "init",
        "--ca-key",
        "pkcs11:token=ca-hsm;object=no-such-key",
    ]));
    assert!(
        text.contains("no private key in the HSM matches") && text.contains("\"ukey-ca\""),
        "{text}"
    );

    // The CA: a self-signed root made through the HSM key, the key named in the data
    // directory, no key file. Made by `ca init` (RSA) or by serve's first start (P-256).
    let subject = if via_serve {
        "CN=UKey Renew Reference CA"
    } else {
        let init = hsm.ok(portal().args([
            "ca",
            "init",
            "--ca-key",
            uri,
            "--subject",
            "C=CN, O=测试 HSM CA, CN=UKey HSM Root",
        ]));
        assert!(
            init.contains(uri) && init.contains("SHA-256 fingerprint"),
            "{init}"
        );
        // Again with another subject: the root there is kept, and the operator told.
        let text =
            hsm.refused(portal().args(["ca", "init", "--ca-key", uri, "--subject", "CN=Other"]));
        assert!(
            text.contains("already holds a CA certificate of this key"),
            "{text}"
        );
        "CN=UKey HSM Root"
    };
    if via_serve {
        let first = hsm.serve(&mut portal(), &["--ca-key", uri]);
        assert!(first.url.is_some(), "{}", first.log());
    }
    let ca_pem = data.join("ca-cert.pem");
    assert!(!data.join("ca-key.pem").exists());
    assert_eq!(
        std::fs::read_to_string(data.join("ca-key.pkcs11"))
            .unwrap()
            .trim(),
        uri
    );
    let (ok, text) = run(Command::new("openssl")
        .args(["x509", "-noout", "-subject", "-nameopt", "utf8", "-in"])
        .arg(&ca_pem));
    assert!(ok && text.contains(subject), "{text}");
    let d = tmp.path();
    let ca_der = pem::parse(std::fs::read(&ca_pem).unwrap())
        .unwrap()
        .into_contents();
    let (ok, text) = openssl_verify(&ca_pem, None, &ca_der, d);
    assert!(ok, "the self-signed root verifies: {text}");

    // The holders' certificates are the previous CA's, kept outside the portal.
    let old_ca_pem = d.join("old-ca.pem");
    let old_ca = outside_ca(&old_ca_pem);
    hsm.ok(portal().args(["ca", "accept-issuer"]).arg(&old_ca_pem));

    // Serving: the key is found from the data directory; the CMP certificate is the
    // HSM CA's.
    let serving = hsm.serve(&mut portal(), &[]);
    let log = serving.log();
    assert!(
        log.contains("the CA key is in the HSM: pkcs11:token=ca-hsm"),
        "{log}"
    );
    assert_eq!(
        log.contains("sealed under the key-encryption key"),
        with_kek,
        "{log}"
    );
    let cmp_der = pem::parse(std::fs::read(data.join("cmp-cert.pem")).unwrap())
        .unwrap()
        .into_contents();
    let (ok, text) = openssl_verify(&ca_pem, None, &cmp_der, d);
    assert!(ok, "CMP protection certificate: {text}");

    // A renewal of a certificate the previous CA issued.
    let holder = Holder::issued_by(&old_ca, KeyAlgorithm::EcP256, CN, ORG);
    let mut cmd = portal();
    order(&mut cmd, &holder, "EC-P256", Some(&old_ca_pem));
    let view: OrderView = serde_json::from_str(&hsm.ok(cmd.arg("--json"))).unwrap();
    let api = serving.api();
    let e = issue_escrowed(&api, &view.order_id, holder, KeyAlgorithm::EcP256).await;
    let repeat_answer: IssueResponse = {
        let (status, _, text) = repeat(&api, &e).await;
        assert!(status.is_success(), "{text}");
        serde_json::from_str(&text).unwrap()
    };
    for der in [
        &repeat_answer.certificate_der,
        &repeat_answer.encryption.as_ref().unwrap().certificate_der,
    ] {
        let (ok, text) = openssl_verify(&ca_pem, None, der, d);
        assert!(ok, "openssl verify of an issued certificate: {text}");
    }
    let raw = raw_data_dir(&data);
    for (what, secret) in secrets_of(&e.pkcs8) {
        assert_eq!(
            contains(&raw, &secret),
            !with_kek,
            "{what}: in clear exactly when no key-encryption key seals it"
        );
    }

    // Revoked by the operator; the CRL is signed in the HSM and OpenSSL verifies it.
    let r = api
        .installed(
            &e.order_id,
            &repeat_answer.certificate_serial_hex,
            &e.new_key,
        )
        .await;
    assert!(r.status().is_success());
    let serial = repeat_answer.certificate_serial_hex.clone();
    hsm.ok(portal().args(["revoke", "--serial", &serial, "--reason", "keyCompromise"]));
    let crl = api.crl_der().await;
    let (ok, text) = openssl_crl(&ca_pem, &crl, d);
    assert!(ok, "openssl crl -verify: {text}");
    assert!(text.contains(&format!("Serial Number: {serial}")), "{text}");
    drop(serving);

    // The key never left the HSM: pkcs11-tool reads it sensitive, never extractable.
    let objects = hsm.tool("ca-hsm", &["--list-objects", "--type", "privkey"]);
    let block = objects
        .split("Private Key Object")
        .find(|b| b.contains("ukey-ca"))
        .unwrap_or_else(|| panic!("{objects}"));
    let access = block.lines().find(|l| l.contains("Access:")).unwrap();
    assert!(
        access.contains("sensitive") && access.contains("never extractable"),
        "{access}"
    );

    // Without the HSM, a portal whose CA key is there does not start, and says why.
    let text = hsm.serve(&mut hsm.bare_portal(&data), &[]).refusal();
    assert!(
        text.contains("the CA key is in the HSM (pkcs11:token=ca-hsm;object=ukey-ca)")
            && text.contains("--hsm-module"),
        "{text}"
    );
}

#[tokio::test]
async fn an_rsa_2048_ca_key_in_the_hsm_signs_what_openssl_verifies() {
    ca_key_in_the_hsm("rsa:2048", false, false).await;
}

#[tokio::test]
async fn a_p256_ca_key_in_the_hsm_signs_what_openssl_verifies_beside_the_escrow_key() {
    ca_key_in_the_hsm("EC:prime256v1", true, true).await;
}

/// The same on PostgreSQL: the `certificates` table, read raw with `psql` (every column
/// of every row, bytes as hex), holds no escrowed private key in clear when the HSM seals
/// them, and holds them when it does not (so the check can fail).
#[tokio::test]
async fn the_postgresql_table_holds_no_escrowed_key_in_clear() {
    let pg = common::pg::PgServer::start(&[]);
    let hsm = SoftHsm2::new();
    hsm.init_token("portal-hsm");
    let tmp = tempfile::tempdir().unwrap();
    let table = |db: &str| {
        pg.psql(db, "COPY certificates TO STDOUT")
            .unwrap()
            .to_ascii_lowercase()
    };

    let sealed_db = pg.create_db("sealed");
    let data = tmp.path().join("data");
    hsm.ok(hsm
        .portal(&data)
        .args(["--hsm-token", "portal-hsm", "hsm", "init"]));
    let (serving, escrowed) =
        escrow_two_on(&hsm, &data, Some("portal-hsm"), Some(&sealed_db)).await;
    drop(serving);
    let raw = table("sealed");
    assert!(
        raw.contains(&hex::encode(ukey_portal::hsm::SEALED_MAGIC)),
        "sealed blobs are stored in PostgreSQL"
    );
    for e in &escrowed {
        for (what, secret) in secrets_of(&e.pkcs8) {
            assert!(
                !raw.contains(&hex::encode(&secret)),
                "{what} of {}'s escrowed key is in the PostgreSQL table in clear",
                e.encryption_serial
            );
        }
    }
    assert!(
        !data.join("portal.sqlite3").exists(),
        "the store is PostgreSQL, not the data directory's SQLite file"
    );

    let plain_db = pg.create_db("plain");
    let plain = tmp.path().join("plain");
    let (serving, plain_escrowed) = escrow_two_on(&hsm, &plain, None, Some(&plain_db)).await;
    drop(serving);
    let raw = table("plain");
    for e in &plain_escrowed {
        for (what, secret) in secrets_of(&e.pkcs8) {
            assert!(
                raw.contains(&hex::encode(&secret)),
                "{what} found in the table without an HSM"
            );
        }
    }
}

/// A portal that ran without an HSM holds its escrow in clear; `hsm seal` seals it
/// under the key-encryption key and rewrites the database so the clear keys are gone
/// from its files. A rotation: a new key-encryption key, `hsm seal` under it, and the
/// old one deleted from the HSM: the escrow still opens.
#[tokio::test]
async fn hsm_seal_seals_escrow_stored_in_clear_and_moves_it_to_a_new_key_encryption_key() {
    let hsm = SoftHsm2::new();
    hsm.init_token("portal-hsm");
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let (serving, escrowed) = escrow_two(&hsm, &data, None).await;
    drop(serving);
    let secrets_found = |raw: &[u8]| {
        escrowed
            .iter()
            .flat_map(|e| secrets_of(&e.pkcs8))
            .filter(|(_, s)| contains(raw, s))
            .map(|(what, _)| what)
            .collect::<Vec<_>>()
    };
    assert!(
        !secrets_found(&raw_data_dir(&data)).is_empty(),
        "stored in clear first"
    );

    let with = |label: &str| {
        let mut c = hsm.portal(&data);
        c.args(["--hsm-token", "portal-hsm", "--hsm-kek-label", label]);
        c
    };
    hsm.ok(with("kek-2026").args(["hsm", "init"]));
    // Served with the HSM before sealing: the operator is told.
    let serving = hsm.serve(&mut with("kek-2026"), &[]);
    let log = serving.log();
    assert!(
        log.contains("2 escrowed") && log.contains("hsm seal"),
        "{log}"
    );
    drop(serving);

    let out = hsm.ok(with("kek-2026").args(["hsm", "seal"]));
    assert!(
        out.contains("sealed 2 escrowed key(s) stored in clear"),
        "{out}"
    );
    let raw = raw_data_dir(&data);
    assert_eq!(
        secrets_found(&raw),
        Vec::<&str>::new(),
        "clear keys left in the files"
    );
    assert!(contains(&raw, ukey_portal::hsm::SEALED_MAGIC));
    let out = hsm.ok(with("kek-2026").args(["hsm", "seal"]));
    assert!(
        out.contains("sealed 0") && out.contains("2 already"),
        "{out}"
    );

    // Rotation: a new key, everything sealed again under it, the old one deleted.
    hsm.ok(with("kek-2027").args(["hsm", "init"]));
    let out = hsm.ok(with("kek-2027").args(["hsm", "seal"]));
    assert!(out.contains("re-sealed 2"), "{out}");
    hsm.tool(
        "portal-hsm",
        &[
            "--delete-object",
            "--type",
            "secrkey",
            "--label",
            "kek-2026",
        ],
    );
    let objects = hsm.tool("portal-hsm", &["--list-objects", "--type", "secrkey"]);
    assert!(
        !objects.contains("kek-2026") && objects.contains("kek-2027"),
        "{objects}"
    );
    let serving = hsm.serve(&mut with("kek-2027"), &[]);
    assert!(!serving.log().contains("in clear"), "{}", serving.log());
    for e in &escrowed {
        let (status, transport, text) = repeat(&serving.api(), e).await;
        assert!(status.is_success(), "{status} {text}");
        let again: IssueResponse = serde_json::from_str(&text).unwrap();
        assert_eq!(transport.open(&again), e.pkcs8, "the same escrowed key");
    }
    assert_eq!(secrets_found(&raw_data_dir(&data)), Vec::<&str>::new());

    // Without the key-encryption key there is nothing to seal under.
    let text = hsm.refused(hsm.portal(&data).args(["hsm", "seal"]));
    assert!(text.contains("--hsm-token"), "{text}");
}
