//! The reference UKey renewal portal: the server side of the protocol defined in
//! `ukey-portal-api`, with an order store on SQLite or PostgreSQL, a CA that issues with rcgen, and a
//! key-management centre that escrows encryption keys and seals them for the token.
//!
//! Layers, top down: [`http`] (axum routes, error mapping) → [`portal`] (behaviour,
//! synchronous) → [`store`] (orders; [`db`]: SQLite or PostgreSQL) / [`ca`] (certificates, CRL) / [`envelope`]
//! (escrow envelope) / [`hsm`] (PKCS#11: the escrow's key-encryption key, a CA key in an
//! HSM) / [`names`] (issuer matching) / [`crypto`] (signatures).

pub mod ca;
pub mod cmp;
pub mod crypto;
pub mod datadir;
pub mod db;
pub mod envelope;
pub mod hsm;
pub mod http;
pub mod limit;
pub mod names;
pub mod portal;
pub mod sm2ca;
pub mod store;

pub use http::{RunningServer, TlsFiles, router, start, start_split};
pub use portal::{Portal, PortalConfig};

use ukey_portal_api::ApiError;

impl db::AsDbError for Error {
    fn as_db_error(&self) -> Option<&db::DbError> {
        match self {
            Error::Db(e) => Some(e),
            _ => None,
        }
    }
}

/// Everything that can go wrong in the portal.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A client or operator error, with its protocol code.
    #[error(transparent)]
    Api(#[from] ApiError),
    /// SQLite or PostgreSQL.
    #[error("database: {0}")]
    Db(#[from] db::DbError),
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
