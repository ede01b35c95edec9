//! One trust path for the engine, the diagnosis and the app:
//! - [`anchors`]: trust anchors from PEM or DER files, each block checked to be a CA
//!   certificate (a bad file is an error, never a silently dropped entry);
//! - [`chain`]: a certificate chain validated by `rustls-webpki` (basicConstraints,
//!   pathLen, validity of every certificate, signatures with the algorithms given —
//!   SHA-1 is not among them — plus keyCertSign on every CA in the path);
//! - [`gm`]: SM2-with-SM3 (with the GM distinguishing ID) for the chain check;
//! - [`names`]: distinguished names compared as sequences of (attribute type, decoded
//!   value), never as formatted strings.

pub mod anchors;
pub mod chain;
pub mod gm;
pub mod names;

pub use anchors::{Anchor, AnchorError};
pub use chain::{ChainError, DEFAULT_ALGORITHMS, Verified, verify, verify_with};
pub use names::{attribute_text, same_name};
