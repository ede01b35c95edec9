//! The renewal engine: steps as a journaled sequence, the durable journal, checks of
//! issued certificates, and the progress events front ends render.
//!
//! ```text
//! preflight (no PIN) -> login -> key -> request -> verify -> write -> self-test
//!   -> activate -> installed
//! ```
//!
//! The engine talks to two traits ([`api::TokenApi`], [`api::PortalApi`]); their real
//! implementations are over `ukey-token` and `ukey-portal-client`. The CLI and the
//! desktop app only wire these pieces together: [`preflight`], then [`renew`].

pub mod api;
pub mod checks;
pub mod engine;
pub mod error;
pub mod events;
pub mod journal;

pub use api::{PortalApi, SessionToken, TokenApi};
pub use engine::{
    FAILPOINT_ENV, JournalSync, KeyIdScheme, LabelScheme, Notice, Options, PENDING_LABEL_PREFIX,
    Plan, Report, StepTiming, abandon, preflight, renew, run, status_request,
};
pub use error::{ErrorKind, Refusal, RenewalError};
pub use events::{Event, Step};
pub use journal::{DATA_DIR_ENV, Journal, JournalStore, Outcome, default_data_dir};
