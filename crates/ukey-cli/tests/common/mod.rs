//! What the `ukey renew` test binaries share: a reference portal on loopback whose
//! issuing CA is the fixtures' test CA, so certificates on fixture keys can be renewed;
//! and the ukey-sim module. Not every test binary uses every item.
#![allow(dead_code)]

use std::sync::Arc;

use softhsm_fixtures::SoftHsm;
use ukey_portal::{Portal, PortalConfig, RunningServer};

/// A running portal; dropping it stops the server and removes its data.
pub struct LoopbackPortal {
    pub server: RunningServer,
    /// Held for the server's lifetime.
    _rt: tokio::runtime::Runtime,
    /// Held for the server's lifetime.
    _dir: tempfile::TempDir,
}

/// Starts the reference portal on 127.0.0.1:0 with `hsm`'s test CA as its issuing CA.
pub fn start_portal(hsm: &SoftHsm) -> LoopbackPortal {
    let ca = hsm.ca().unwrap();
    start_portal_with_ca(&ca.issuing_cert_path, &ca.issuing_key_path, None)
}

/// Starts the reference portal with the CA `cert`/`key` (PEM files; an SM2 key makes
/// an SM2 CA), also accepting for renewal certificates of the CA `accepted` (PEM).
pub fn start_portal_with_ca(
    cert: &std::path::Path,
    key: &std::path::Path,
    accepted: Option<&str>,
) -> LoopbackPortal {
    let dir = tempfile::tempdir().unwrap();
    let mut config = PortalConfig::new(dir.path().join("data"));
    if let Some(pem) = accepted {
        ukey_portal::ca::Ca::add_accepted_issuers(&config.data_dir, pem).unwrap();
    }
    config.ca_import = Some((cert.to_owned(), key.to_owned()));
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
    LoopbackPortal {
        server,
        _rt: rt,
        _dir: dir,
    }
}

/// The ukey-sim PKCS#11 module. Cargo builds a dependency's cdylib only when that
/// package itself is built, so when this test runs alone (`-p ukey-cli`) build it into
/// the same target directory first.
pub fn shim_module() -> std::path::PathBuf {
    if let Ok(p) = ukey_sim::module_path() {
        if p.is_file() {
            return p;
        }
    }
    let exe = std::env::current_exe().unwrap();
    // <target>/<profile>/deps/<test binary>
    let target = exe.ancestors().nth(3).unwrap().to_owned();
    let status = std::process::Command::new(env!("CARGO"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["build", "-p", "ukey-sim", "--lib"])
        .env("CARGO_TARGET_DIR", &target)
        .status()
        .unwrap();
    assert!(status.success(), "building the ukey-sim module");
    let p = ukey_sim::module_path().unwrap();
    assert!(p.is_file(), "{}", p.display());
    p
}

/// Every engine fail point (`UKEY_FAILPOINT`): each step's boundaries, each activation
/// sub-step's, and inside `write`.
pub fn crash_points() -> Vec<String> {
    let mut points = Vec::new();
    for step in [
        "login",
        "key",
        "request",
        "verify",
        "write",
        "self_test",
        "activate",
        "installed",
    ] {
        for when in ["before", "after"] {
            points.push(format!("{step}:{when}"));
        }
    }
    for n in 1..=4 {
        for when in ["before", "after"] {
            points.push(format!("activate.{n}:{when}"));
        }
    }
    points.push("write.cert:after".to_owned());
    points.push("write.unwrap:after".to_owned());
    points
}

/// What is on token `serial` now, read logged in through `module`: every object, and
/// the serials of the signing certificates whose key pair works (a private key with the
/// certificate's CKA_ID signs, and the certificate verifies the signature).
pub fn working_signing_certs(
    module: &ukey_token::Module,
    serial: &str,
    pin: &str,
) -> (Vec<ukey_token::ObjectInfo>, Vec<String>) {
    use ukey_token::cryptoki::object::{Attribute, ObjectClass};
    let token = module
        .tokens()
        .unwrap()
        .into_iter()
        .find(|t| t.serial == serial)
        .expect("token");
    let s = module.open_session(&token).unwrap();
    s.login(&secrecy::SecretString::from(pin.to_owned()))
        .unwrap();
    let objects = s.snapshot().unwrap();
    let mut working = Vec::new();
    for o in objects
        .iter()
        .filter(|o| o.kind == ukey_token::ObjectKind::Certificate)
    {
        let der = hex::decode(&o.value_hex).unwrap();
        let Ok(d) = ukey_token::CertificateDetails::from_der(&der) else {
            continue;
        };
        if d.usage == ukey_token::Usage::Encryption {
            continue;
        }
        let public = ukey_token::PublicKey::from_certificate(&der).unwrap();
        let keys = s
            .find_objects(&[
                Attribute::Class(ObjectClass::PRIVATE_KEY),
                Attribute::Id(o.id()),
            ])
            .unwrap();
        for k in keys {
            let data = b"still works?";
            if let Ok(sig) = s.sign_data(&public, k, data) {
                if ukey_renewal::checks::verify_with_certificate(&der, data, &sig).is_ok() {
                    working.push(d.serial.clone());
                }
            }
        }
    }
    (objects, working)
}
