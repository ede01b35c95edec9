//! Test harness: a real portal on loopback (port 0) over a SQLite file in a temp dir
//! (or, with `UKEY_TEST_STORE=postgres`, a PostgreSQL database: see [`pg`]), a reqwest
//! client ([`Api`], also for a portal run as a `ukey-portal serve` child), and software
//! "holders" (key + certificate issued by the portal's CA) that answer challenges the
//! way a token would.
#![allow(dead_code)]

pub mod pg;

use std::io::BufRead as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;

use rcgen::PublicKeyData as _;
use rcgen::{
    CertificateParams, DistinguishedName, DnType, DnValue, Issuer, KeyPair, SerialNumber,
    SigningKey,
};
use serde::Serialize;
use serde::de::DeserializeOwned;
use ukey_portal::{Portal, PortalConfig, RunningServer};
use ukey_portal_api::{
    ApiError, ChallengeResponse, CreateOrderRequest, ErrorCode, InitialState, InstalledRequest,
    IssueRequest, IssueResponse, KeyAlgorithm, KeyPolicy, OrderView, SignatureAlgorithm,
    StatusRequest, challenge_signed_data, installed_signed_data, paths,
};

pub const CN: &str = "张三";
pub const ORG: &str = "某某建设工程有限公司";

pub struct Harness {
    pub dir: tempfile::TempDir,
    pub server: RunningServer,
    /// The protocol's HTTP side (the harness dereferences to it).
    pub api: Api,
    pub ca_issuer: Issuer<'static, KeyPair>,
    /// The PostgreSQL server the store is on, if started for this test (last: it
    /// stops after the portal).
    pub pg: Option<pg::PgServer>,
}

/// Whether this run puts the harness's store on PostgreSQL (`UKEY_TEST_STORE=postgres`,
/// set by `cargo xtask test` for a second run of the portal's suites).
pub fn store_on_postgres() -> bool {
    std::env::var("UKEY_TEST_STORE").is_ok_and(|v| v == "postgres")
}

impl std::ops::Deref for Harness {
    type Target = Api;
    fn deref(&self) -> &Api {
        &self.api
    }
}

/// The protocol over HTTP, for a portal at `base`.
pub struct Api {
    pub base: String,
    pub client: reqwest::Client,
}

impl Harness {
    pub async fn start() -> Harness {
        Harness::start_with(|_| {}).await
    }

    pub async fn start_with(tweak: impl FnOnce(&mut PortalConfig)) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let mut config = PortalConfig::new(dir.path().join("data"));
        let mut pg = None;
        if store_on_postgres() {
            config.database = Some(ukey_portal::store::Database::Postgres {
                url: pg::fresh_database(&mut pg),
                pool: 4,
            });
        }
        tweak(&mut config);
        // Off the async thread: the store may talk to PostgreSQL while it opens.
        let portal = Arc::new(
            tokio::task::spawn_blocking(move || Portal::open(&config))
                .await
                .unwrap()
                .unwrap(),
        );
        if store_on_postgres() {
            assert_eq!(portal.store().kind(), ukey_portal::db::Kind::Postgres);
        }
        let server = ukey_portal::start(portal, "127.0.0.1:0".parse().unwrap(), None, None)
            .await
            .unwrap();
        let data = dir.path().join("data");
        let ca_issuer = Issuer::from_ca_cert_pem(
            &std::fs::read_to_string(data.join("ca-cert.pem")).unwrap(),
            KeyPair::from_pem(&std::fs::read_to_string(data.join("ca-key.pem")).unwrap())
                .unwrap_or_else(|_| {
                    ukey_portal::ca::load_key(
                        &std::fs::read_to_string(data.join("ca-key.pem")).unwrap(),
                    )
                    .unwrap()
                }),
        )
        .unwrap();
        let api = Api::new(&server.url);
        Harness {
            dir,
            server,
            api,
            ca_issuer,
            pg,
        }
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn portal(&self) -> &Portal {
        &self.server.portal
    }

    pub fn dump(&self) -> String {
        self.portal().store().dump().unwrap()
    }

    pub fn admin_token(&self) -> String {
        std::fs::read_to_string(self.data_dir().join("admin-token"))
            .unwrap()
            .trim()
            .to_owned()
    }

    /// A holder whose certificate the portal's CA issued.
    pub fn holder(&self, alg: KeyAlgorithm) -> Holder {
        Holder::issued_by(&self.ca_issuer, alg, CN, ORG)
    }

    /// A paid order for a new key of `alg`, without an encryption certificate.
    pub fn ready_order(&self, holder: &Holder, alg: KeyAlgorithm) -> OrderView {
        self.order(holder, InitialState::Ready, KeyPolicy::New, alg, false)
    }

    pub fn order(
        &self,
        holder: &Holder,
        state: InitialState,
        policy: KeyPolicy,
        alg: KeyAlgorithm,
        enc: bool,
    ) -> OrderView {
        self.portal()
            .create_order(&CreateOrderRequest {
                serial_hex: holder.serial_hex.clone(),
                issuer_der: None,
                issuer_dn: None,
                years: 2,
                state,
                key_policy: policy,
                with_encryption_cert: enc,
                target_algorithm: alg,
                old_encryption_serial_hex: None,
            })
            .unwrap()
    }
}

impl Api {
    pub fn new(base: &str) -> Api {
        Api {
            base: base.trim_end_matches('/').to_owned(),
            client: reqwest::Client::new(),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub async fn post<B: Serialize>(&self, path: &str, body: &B) -> reqwest::Response {
        self.client
            .post(self.url(path))
            .json(body)
            .send()
            .await
            .unwrap()
    }

    pub async fn post_ok<B: Serialize, T: DeserializeOwned>(&self, path: &str, body: &B) -> T {
        let r = self.post(path, body).await;
        let status = r.status();
        let text = r.text().await.unwrap();
        assert!(status.is_success(), "{path}: {status} {text}");
        serde_json::from_str(&text).unwrap()
    }

    pub async fn status(&self, holder: &Holder) -> ukey_portal_api::RenewalStatus {
        self.post_ok(
            paths::STATUS,
            &StatusRequest {
                issuer_der: Some(holder.issuer_der()),
                issuer_dn: None,
                serial_hex: holder.serial_hex.clone(),
            },
        )
        .await
    }

    pub async fn challenge(&self, order_id: &str) -> ChallengeResponse {
        self.challenge_at(&self.base, order_id).await
    }

    /// A challenge from the portal instance at `base`.
    pub async fn challenge_at(&self, base: &str, order_id: &str) -> ChallengeResponse {
        let r = self
            .client
            .post(format!("{base}{}", paths::challenge(order_id)))
            .send()
            .await
            .unwrap();
        let status = r.status();
        let text = r.text().await.unwrap();
        assert!(status.is_success(), "challenge: {status} {text}");
        serde_json::from_str(&text).unwrap()
    }

    /// A well-formed issue request: fresh challenge, CSR for `new_key` with the holder's
    /// subject, a fresh P-256 transport key, challenge signed by the holder's key.
    pub async fn issue_request(
        &self,
        order_id: &str,
        holder: &Holder,
        new_key: &KeyPair,
    ) -> IssueRequest {
        let transport = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        self.issue_request_with(
            order_id,
            holder,
            new_key,
            Some(transport.subject_public_key_info()),
        )
        .await
    }

    /// [`Harness::issue_request`] with the given transport key (SPKI DER), or none.
    pub async fn issue_request_with(
        &self,
        order_id: &str,
        holder: &Holder,
        new_key: &KeyPair,
        transport_key_spki: Option<Vec<u8>>,
    ) -> IssueRequest {
        self.issue_request_at(&self.base, order_id, holder, new_key, transport_key_spki)
            .await
    }

    /// [`Harness::issue_request_with`] with a challenge from the instance at `base`.
    pub async fn issue_request_at(
        &self,
        base: &str,
        order_id: &str,
        holder: &Holder,
        new_key: &KeyPair,
        transport_key_spki: Option<Vec<u8>>,
    ) -> IssueRequest {
        let ch = self.challenge_at(base, order_id).await;
        let csr_der = csr(new_key, CN, ORG);
        let sig = holder
            .key
            .sign(&challenge_signed_data(
                order_id,
                &ch.nonce,
                &csr_der,
                transport_key_spki.as_deref(),
            ))
            .unwrap();
        IssueRequest {
            challenge_id: ch.challenge_id,
            challenge_signature: sig,
            signature_algorithm: holder.sig_alg(),
            old_certificate_der: holder.cert_der.clone(),
            csr_der,
            transport_key_spki,
            renewal_code: None,
        }
    }

    pub async fn issue(&self, order_id: &str, holder: &Holder, new_key: &KeyPair) -> IssueResponse {
        let req = self.issue_request(order_id, holder, new_key).await;
        self.post_ok(&paths::issue(order_id), &req).await
    }

    pub async fn installed(
        &self,
        order_id: &str,
        serial: &str,
        key: &KeyPair,
    ) -> reqwest::Response {
        let req = InstalledRequest {
            certificate_serial_hex: serial.to_owned(),
            signature: key.sign(&installed_signed_data(order_id, serial)).unwrap(),
            signature_algorithm: sig_alg_of(key),
        };
        self.post(&paths::installed(order_id), &req).await
    }

    pub async fn crl_der(&self) -> Vec<u8> {
        let r = self.client.get(self.url(paths::CRL)).send().await.unwrap();
        assert_eq!(r.headers()["content-type"], "application/pkix-crl");
        r.bytes().await.unwrap().to_vec()
    }
}

/// Asserts an error answer: HTTP status, code, and a Date header.
pub async fn expect_error(r: reqwest::Response, status: u16, code: ErrorCode) -> ApiError {
    assert_eq!(r.status().as_u16(), status, "status for expected {code}");
    assert!(
        r.headers().contains_key("date"),
        "every answer carries a Date header"
    );
    let text = r.text().await.unwrap();
    let e: ApiError =
        serde_json::from_str(&text).unwrap_or_else(|_| panic!("not an ApiError: {text}"));
    assert_eq!(e.code, code, "{text}");
    assert!(!e.message.is_empty());
    e
}

pub struct Holder {
    pub key: KeyPair,
    pub cert_der: Vec<u8>,
    pub serial_hex: String,
}

impl Holder {
    pub fn issued_by(
        ca: &Issuer<'static, KeyPair>,
        alg: KeyAlgorithm,
        cn: &str,
        org: &str,
    ) -> Holder {
        let key = new_key(alg);
        let mut params = CertificateParams::default();
        params.distinguished_name = subject(cn, org);
        let mut serial = rand_bytes(12);
        serial[0] = (serial[0] & 0x7f) | 0x10;
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&key, ca).unwrap();
        Holder {
            key,
            cert_der: cert.der().to_vec(),
            serial_hex: hex::encode_upper(&serial),
        }
    }

    pub fn issuer_der(&self) -> Vec<u8> {
        let (_, c) = x509_parser::parse_x509_certificate(&self.cert_der).unwrap();
        c.issuer().as_raw().to_vec()
    }

    pub fn sig_alg(&self) -> SignatureAlgorithm {
        sig_alg_of(&self.key)
    }
}

pub fn sig_alg_of(key: &KeyPair) -> SignatureAlgorithm {
    if key.algorithm() == &rcgen::PKCS_ECDSA_P256_SHA256 {
        SignatureAlgorithm::EcdsaP256Sha256
    } else {
        SignatureAlgorithm::RsaPkcs1Sha256
    }
}

pub fn subject(cn: &str, org: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(
        DnType::CountryName,
        DnValue::PrintableString("CN".try_into().unwrap()),
    );
    dn.push(DnType::OrganizationName, org);
    dn.push(DnType::CommonName, cn);
    dn
}

pub fn csr(key: &KeyPair, cn: &str, org: &str) -> Vec<u8> {
    let mut params = CertificateParams::default();
    params.distinguished_name = subject(cn, org);
    params.serialize_request(key).unwrap().der().to_vec()
}

pub fn new_key(alg: KeyAlgorithm) -> KeyPair {
    use aws_lc_rs::encoding::AsDer;
    match alg {
        KeyAlgorithm::EcP256 => KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap(),
        KeyAlgorithm::Rsa2048 => {
            let kp = aws_lc_rs::rsa::KeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048).unwrap();
            KeyPair::try_from(kp.as_der().unwrap().as_ref()).unwrap()
        }
        KeyAlgorithm::Sm2 => panic!("rcgen has no SM2 keys: SM2 tests make theirs with OpenSSL"),
    }
}

pub fn rand_bytes(n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    aws_lc_rs::rand::fill(&mut v).unwrap();
    v
}

pub fn write_pem(path: &Path, tag: &str, der: &[u8]) {
    std::fs::write(path, pem::encode(&pem::Pem::new(tag, der.to_vec()))).unwrap();
}

/// The `ukey-portal` binary.
pub fn portal_bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_ukey-portal"))
}

/// A `ukey-portal serve` child process, killed when dropped.
pub struct Server(pub Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Spawns `cmd` (a `ukey-portal … serve`) and reads the URL it prints first; `None`
/// when it ends without printing one (it refused to start).
pub fn spawn_serve(cmd: &mut Command) -> (Server, Option<String>) {
    let mut child = cmd.stdout(Stdio::piped()).spawn().unwrap();
    let mut first_line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut first_line)
        .unwrap();
    let url = first_line.trim();
    let url = (!url.is_empty()).then(|| url.to_owned());
    (Server(child), url)
}

/// `openssl ARGS` in `dir`, which must succeed.
pub fn openssl_ok(dir: &Path, args: &[&str]) {
    let (ok, text) = run(Command::new("openssl").current_dir(dir).args(args));
    assert!(ok, "openssl {args:?}: {text}");
}

/// `ukey-portal --data DATA ARGS`, which must succeed; its output.
pub fn portal_cli(data: &Path, args: &[&str]) -> String {
    let (ok, text) = run(portal_bin()
        .arg("--data")
        .arg(data)
        .args(args)
        .env("RUST_LOG", "warn"));
    assert!(ok, "ukey-portal {args:?}: {text}");
    text
}

/// Runs a command, returns (success, stdout + stderr).
pub fn run(cmd: &mut std::process::Command) -> (bool, String) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

/// `openssl verify` of `cert_der` against the CA bundle file; true when it says OK.
pub fn openssl_verify(
    ca_file: &Path,
    untrusted: Option<&Path>,
    cert_der: &[u8],
    dir: &Path,
) -> (bool, String) {
    let cert = dir.join(format!("verify-{}.pem", hex::encode(rand_bytes(4))));
    write_pem(&cert, "CERTIFICATE", cert_der);
    let mut cmd = std::process::Command::new("openssl");
    cmd.arg("verify").arg("-CAfile").arg(ca_file);
    if let Some(u) = untrusted {
        cmd.arg("-untrusted").arg(u);
    }
    cmd.arg(&cert);
    let (ok, text) = run(&mut cmd);
    (ok && text.contains(": OK"), text)
}

/// `openssl crl -verify` of a DER CRL; returns (verified, text dump).
pub fn openssl_crl(ca_file: &Path, crl_der: &[u8], dir: &Path) -> (bool, String) {
    let crl = dir.join(format!("crl-{}.der", hex::encode(rand_bytes(4))));
    std::fs::write(&crl, crl_der).unwrap();
    let (ok, text) = run(std::process::Command::new("openssl")
        .args([
            "crl", "-inform", "DER", "-noout", "-text", "-verify", "-CAfile",
        ])
        .arg(ca_file)
        .arg("-in")
        .arg(&crl));
    (ok && text.contains("verify OK"), text)
}

/// The CRL's number.
pub fn crl_number(der: &[u8]) -> u64 {
    use x509_parser::prelude::{CertificateRevocationList, FromDer as _};
    let (_, crl) = CertificateRevocationList::from_der(der).expect("CRL");
    crl.crl_number()
        .expect("a CRL number")
        .try_into()
        .expect("a small CRL number")
}
