//! The only crate that touches PKCS#11 (through `cryptoki`) and SKF (through
//! `ukey-skf`): finding and loading a module, the tokens in its slots and their PIN state, the certificates and keys on a
//! token, a watcher for insertion and removal, and sessions for login and signing.
//!
//! ```no_run
//! use ukey_token::{Config, Module, resolve_module_path};
//! let path = resolve_module_path(None, &Config::load_default()?)?;
//! let module = Module::load(&path)?;
//! for listing in module.list()? {
//!     for cert in &listing.certificates {
//!         if let Ok(d) = &cert.details {
//!             println!("{} {} {}", listing.token.label, d.serial, d.subject);
//!         }
//!     }
//! }
//! # Ok::<(), ukey_token::Error>(())
//! ```

pub mod certificate;
pub mod config;
pub mod der;
pub mod error;
pub mod gm;
pub mod keys;
pub mod listing;
pub mod module;
pub mod objects;
pub mod quirks;
mod raw;
pub mod session;
pub mod signer;
pub mod skf;
pub mod unwrap;
pub mod watcher;

pub use certificate::{CertificateDetails, Usage};
pub use config::{
    CmpConfig, Config, FoundModule, Interface, ModuleEntry, RenewalConfig, UserSettings,
    discover_all, resolve_module, resolve_module_path,
};
pub use error::{Error, Lang, Pkcs11Call, Result, TokenName};
pub use keys::{KeyAlg, KeyMatch, KeyObject, KeyPairHandles, PublicKey};
pub use listing::{CertificateEntry, KeyEntry, KeyEvidence, TokenListing};
pub use module::{LibraryInfo, Module, PinState, TokenFlags, TokenSummary};
pub use objects::{ObjectInfo, ObjectKind};
pub use quirks::{Quirk, QuirkKind};
pub use session::Session;
pub use signer::TokenSigner;
pub use unwrap::KeyTransport;
pub use watcher::{TokenEvent, WatchMode, Watcher};

/// The cryptoki version this crate is built on, for the mechanism and attribute types
/// that [`Session`] takes.
pub use cryptoki;
/// `SecretString`, the PIN type of [`Session::login`].
pub use secrecy::SecretString;
