//! The renewal engine: steps as a journaled sequence, the durable journal, checks of
//! issued certificates, and the progress events front ends render.
//!
//! ```text
//! preflight (no PIN) -> login -> key -> request -> verify -> write -> self-test
//!   -> activate -> installed
//! ```
//!
//! The engine talks to the token through [`api::SessionToken`] (over `ukey-token`),
//! which names objects by identity, and to the portal through [`api::PortalApi`]
//! (`ukey-portal-client`). The CLI and the
//! desktop app only wire these pieces together: [`preflight`], then [`renew`].

pub mod api;
pub mod checks;
pub mod cmp;
pub mod engine;
pub mod error;
pub mod events;
pub mod journal;
pub mod skf;

pub use api::{Activation, KeyRef, KeyUse, PortalApi, SessionToken, TokenSide};
pub use engine::{
    ActivationStep, CmpOptions, FAILPOINT_ENV, JournalSync, KeyIdScheme, LabelScheme, Notice,
    Options, PENDING_LABEL_PREFIX, Plan, Protocol, Report, StepTiming, abandon, preflight, renew,
    run, status_request,
};
pub use error::{ErrorKind, Refusal, RenewalError};
pub use events::{Event, Step};
pub use journal::{
    DATA_DIR_ENV, Journal, JournalStore, KeyId, Outcome, PendingId, default_data_dir,
};
