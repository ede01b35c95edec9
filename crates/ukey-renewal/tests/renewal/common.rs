//! Harness: SoftHSM2 tokens from softhsm-fixtures, the reference portal (its CA is the
//! fixtures' issuing CA) over HTTP on loopback, and the engine with a private data dir.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use secrecy::SecretString;
use softhsm_fixtures::{CertFixture, SoftHsm, TokenFixture, TokenSpec, softhsm_module};
use ukey_portal::{Portal, PortalConfig, RunningServer};
use ukey_portal_api::{CreateOrderRequest, InitialState, KeyAlgorithm, KeyPolicy};
use ukey_portal_client::PortalClient;
use ukey_renewal::{JournalStore, Options};
use ukey_token::{Module, TokenSummary};

pub struct Env {
    pub hsm: SoftHsm,
    pub tokens: Vec<TokenFixture>,
    pub server: RunningServer,
    pub _rt: tokio::runtime::Runtime,
    pub _portal_dir: tempfile::TempDir,
    pub data_dir: tempfile::TempDir,
}

pub fn pem_to_der(pem: &str) -> Vec<u8> {
    use base64::Engine as _;
    let b64: String = pem
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect::<Vec<_>>()
        .join("");
    base64::engine::general_purpose::STANDARD
        .decode(b64)
        .unwrap()
}

impl Env {
    pub fn new(specs: &[TokenSpec]) -> Env {
        let hsm = SoftHsm::new().unwrap();
        let tokens: Vec<TokenFixture> =
            specs.iter().map(|s| hsm.create_token(s).unwrap()).collect();
        Env::with_hsm(hsm, tokens)
    }

    pub fn with_hsm(hsm: SoftHsm, tokens: Vec<TokenFixture>) -> Env {
        let ca = hsm.ca().unwrap();
        let portal_dir = tempfile::tempdir().unwrap();
        let mut config = PortalConfig::new(portal_dir.path().join("data"));
        config.ca_import = Some((ca.issuing_cert_path.clone(), ca.issuing_key_path.clone()));
        let portal = Arc::new(Portal::open(&config).unwrap());
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let server = rt
            .block_on(ukey_portal::start(
                portal,
                "127.0.0.1:0".parse().unwrap(),
                None,
                None,
            ))
            .unwrap();
        hsm.activate();
        Env {
            hsm,
            tokens,
            server,
            _rt: rt,
            _portal_dir: portal_dir,
            data_dir: tempfile::tempdir().unwrap(),
        }
    }

    pub fn url(&self) -> String {
        self.server.url.clone()
    }

    pub fn order(
        &self,
        cert: &CertFixture,
        policy: KeyPolicy,
        alg: KeyAlgorithm,
        old_enc: Option<&CertFixture>,
        with_enc: bool,
    ) -> String {
        self.server
            .portal
            .create_order(&CreateOrderRequest {
                serial_hex: cert.serial_hex.clone(),
                issuer_der: None,
                issuer_dn: None,
                years: 1,
                state: InitialState::Ready,
                key_policy: policy,
                with_encryption_cert: with_enc,
                target_algorithm: alg,
                old_encryption_serial_hex: old_enc.map(|c| c.serial_hex.clone()),
            })
            .unwrap()
            .order_id
    }

    pub fn options(&self) -> Options {
        let root = pem_to_der(&self.hsm.ca().unwrap().root_cert_pem);
        Options::new(JournalStore::new(self.data_dir.path()), vec![root])
    }

    pub fn client(&self) -> PortalClient {
        PortalClient::new(&self.url()).unwrap()
    }

    pub fn module(&self) -> Module {
        Module::load(&softhsm_module().unwrap()).unwrap()
    }

    pub fn pin(&self) -> SecretString {
        SecretString::from(self.tokens[0].user_pin.clone())
    }
}

pub fn summary(module: &Module, serial: &str) -> TokenSummary {
    module
        .tokens()
        .unwrap()
        .into_iter()
        .find(|t| t.serial == serial)
        .expect("token present")
}

/// Runs a command (with SOFTHSM2_CONF), asserting success; returns stdout.
pub fn run(hsm: &SoftHsm, program: &str, args: &[&str]) -> String {
    let out: std::process::Output = hsm.command(program).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn module_path() -> String {
    softhsm_module().unwrap().display().to_string()
}

/// `pkcs11-tool` on the token with label `label`, logged in.
pub fn p11(hsm: &SoftHsm, label: &str, pin: &str, args: &[&str]) -> String {
    let m = module_path();
    let mut all = vec![
        "--module",
        &m,
        "--token-label",
        label,
        "--login",
        "--pin",
        pin,
    ];
    all.extend_from_slice(args);
    run(hsm, "pkcs11-tool", &all)
}

pub fn openssl(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "openssl {args:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
