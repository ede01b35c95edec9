//! The reference UKey renewal portal: the server side of the protocol defined in
//! `ukey-portal-api`, with a SQLite order store, a CA that issues with rcgen, and a
//! key-management centre that escrows encryption keys and seals them for the token.
//!
//! Layers, top down: [`http`] (axum routes, error mapping) → [`portal`] (behaviour,
//! synchronous) → [`store`] (SQLite) / [`ca`] (certificates, CRL) / [`envelope`]
//! (escrow envelope) / [`hsm`] (PKCS#11: the escrow's key-encryption key, a CA key in an
//! HSM) / [`names`] (issuer matching) / [`crypto`] (signatures).

pub mod ca;
pub mod cmp;
pub mod crypto;
pub mod datadir;
pub mod envelope;
pub mod hsm;
pub mod http;
pub mod names;
pub mod portal;
pub mod sm2ca;
pub mod store;

pub use http::{RunningServer, TlsFiles, router, start};
pub use portal::{Portal, PortalConfig};

use ukey_portal_api::ApiError;

/// Everything that can go wrong in the portal.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A client or operator error, with its protocol code.
    #[error(transparent)]
    Api(#[from] ApiError),
    /// SQLite.
    #[error("database: {0}")]
    Db(#[from] rusqlite::Error),
    /// CA setup or issuing.
    #[error(transparent)]
    Ca(#[from] ca::CaError),
    /// Escrow key generation or sealing.
    #[error(transparent)]
    Envelope(#[from] envelope::EnvelopeError),
    /// The HSM: its key-encryption key, a sealed escrowed key (issue 16).
    #[error(transparent)]
    Hsm(#[from] hsm::HsmError),
    /// A CMP message refused (a replayed nonce or transactionID, a wrong recipNonce)
    /// where the store records it.
    #[error("CMP: {}", .0.text)]
    Cmp(ukey_cmp::server::Refusal),
    /// Data directory, configuration, or an inconsistency found in stored data.
    #[error("{0}")]
    Setup(String),
}
