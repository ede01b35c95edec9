//! What the `ukey renew` test binaries share: a reference portal on loopback whose
//! issuing CA is the fixtures' test CA, so certificates on fixture keys can be renewed.

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
    let dir = tempfile::tempdir().unwrap();
    let mut config = PortalConfig::new(dir.path().join("data"));
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
    LoopbackPortal {
        server,
        _rt: rt,
        _dir: dir,
    }
}
