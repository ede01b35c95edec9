//! Turning slot changes into [`TokenEvent::Inserted`] / [`TokenEvent::Removed`].
//!
//! The watcher holds the [`Module`] in an [`Arc`], which it shares with whoever works
//! with the keys meanwhile ([`Watcher::shared_module`]: a renewal on another thread).
//! Each [`Watcher::poll`]:
//!
//! 1. in [`WatchMode::Reinitialize`], calls C_Finalize + C_Initialize, because SoftHSM2
//!    (and some vendor modules) never show a token created or deleted after
//!    C_Initialize. It needs the module to itself: `poll` takes `&mut self`, sessions
//!    borrow the module (see [`crate::module`]), and while any other handle of the
//!    `Arc` lives the re-scan is skipped ([`Arc::get_mut`]). So it never happens while
//!    a session is open, on this thread or another; the live slot list still runs;
//! 2. in [`WatchMode::SlotEvents`], drains C_WaitForSlotEvent(CKF_DONT_BLOCK) so that
//!    modules which queue events do not fill up, and logs them;
//! 3. lists the tokens (C_GetSlotList + C_GetTokenInfo) and compares them with the
//!    previous poll by id + label ([`TokenSummary::id`]: the serial, or serial and
//!    slot when the serial is shared), not by slot id alone, which may change on
//!    re-scan.
//!
//! Listing on every poll instead of trusting events alone costs one C_GetSlotList and a
//! C_GetTokenInfo per token, and catches modules that report events unreliably.
//! A blocking C_WaitForSlotEvent in a thread is not used: waking it needs C_Finalize
//! from another thread, which would kill the caller's sessions.

use std::sync::Arc;
use std::time::{Duration, Instant};

use cryptoki::error::{Error as CkError, RvError};

use crate::error::{Error, Result};
use crate::module::{Module, TokenSummary};

/// How the watcher learns about changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WatchMode {
    /// [`WatchMode::Reinitialize`] for SoftHSM2 and for modules without
    /// C_WaitForSlotEvent, else [`WatchMode::SlotEvents`].
    Auto,
    /// Live slot list plus C_WaitForSlotEvent (non-blocking).
    SlotEvents,
    /// C_Finalize + C_Initialize before each look.
    Reinitialize,
}

/// A change seen by the watcher.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenEvent {
    /// A token appeared (or was present when watching started).
    Inserted {
        /// The token as it is now.
        token: Box<TokenSummary>,
    },
    /// A token disappeared.
    Removed {
        /// The slot it was last seen in.
        slot_id: u64,
        /// Its id ([`TokenSummary::id`]).
        id: String,
        /// Its serial.
        serial: String,
        /// Its label.
        label: String,
    },
}

/// Watches a module's slots.
#[derive(Debug)]
pub struct Watcher {
    module: Arc<Module>,
    mode: WatchMode,
    known: Option<Vec<TokenSummary>>,
}

impl Watcher {
    /// Starts watching. The first [`Watcher::poll`] reports the tokens already present
    /// as [`TokenEvent::Inserted`].
    pub fn new(module: Module, mode: WatchMode) -> Watcher {
        Watcher::with_shared(Arc::new(module), mode)
    }

    /// Starts watching a module that others may hold too (re-scans wait until they
    /// let go).
    pub fn with_shared(module: Arc<Module>, mode: WatchMode) -> Watcher {
        let mode = match mode {
            WatchMode::Auto => auto_mode(&module),
            m => m,
        };
        tracing::debug!(?mode, "watching slots");
        Watcher {
            module,
            mode,
            known: None,
        }
    }

    /// The mode in use (never [`WatchMode::Auto`]).
    pub fn mode(&self) -> WatchMode {
        self.mode
    }

    /// The module, for listing and sessions between polls.
    pub fn module(&self) -> &Module {
        &self.module
    }

    /// A handle on the module for work on another thread (a renewal, a diagnosis).
    /// While it lives, [`Watcher::poll`] does not re-initialise the module; it goes on
    /// listing slots.
    pub fn shared_module(&self) -> Arc<Module> {
        Arc::clone(&self.module)
    }

    /// The tokens present at the last poll.
    pub fn tokens(&self) -> &[TokenSummary] {
        self.known.as_deref().unwrap_or(&[])
    }

    /// Looks once and returns what changed since the last look.
    pub fn poll(&mut self) -> Result<Vec<TokenEvent>> {
        match self.mode {
            WatchMode::Reinitialize => self.reinitialize()?,
            _ => self.drain_slot_events()?,
        }
        let mut now = self.module.tokens()?;
        let before = self.known.take().unwrap_or_default();
        // A key whose id carried its slot (another key shared its serial) keeps that id
        // while it stays in its slot, even once the other key has gone.
        for t in &mut now {
            let was_shared = before.iter().any(|b| {
                b.serial_is_shared()
                    && b.slot_id == t.slot_id
                    && b.serial == t.serial
                    && b.label == t.label
            });
            if was_shared && !t.serial_is_shared() {
                t.qualify();
            }
        }
        let mut events = vec![];
        for old in &before {
            if !now.iter().any(|t| t.same_token(old)) {
                events.push(TokenEvent::Removed {
                    slot_id: old.slot_id,
                    id: old.id.clone(),
                    serial: old.serial.clone(),
                    label: old.label.clone(),
                });
            }
        }
        for new in &now {
            if !before.iter().any(|t| t.same_token(new)) {
                events.push(TokenEvent::Inserted {
                    token: Box::new(new.clone()),
                });
            }
        }
        self.known = Some(now);
        Ok(events)
    }

    /// Polls every `interval` until something changes or `timeout` passes (then returns
    /// an empty list).
    pub fn wait(&mut self, interval: Duration, timeout: Duration) -> Result<Vec<TokenEvent>> {
        let deadline = Instant::now() + timeout;
        loop {
            let events = self.poll()?;
            if !events.is_empty() {
                return Ok(events);
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(events);
            }
            std::thread::sleep(interval.min(deadline - now));
        }
    }

    fn drain_slot_events(&mut self) -> Result<()> {
        // An SKF library's devices are listed as they come and go; nothing to drain.
        let Ok(pkcs11) = self.module.pkcs11() else {
            return Ok(());
        };
        // Bounded: a module that always reports an event must not hang us.
        for _ in 0..64 {
            match pkcs11.get_slot_event() {
                Ok(Some(slot)) => tracing::debug!(slot = slot.id(), "slot event"),
                Ok(None) => return Ok(()),
                Err(CkError::Pkcs11(RvError::FunctionNotSupported, _)) => {
                    tracing::debug!("C_WaitForSlotEvent not supported; re-initialising instead");
                    self.mode = WatchMode::Reinitialize;
                    return self.reinitialize();
                }
                Err(e) => return Err(Error::from_cryptoki(e, None)),
            }
        }
        Ok(())
    }
}

impl Watcher {
    /// C_Finalize + C_Initialize, only when nobody else holds the module (a session
    /// open on another thread would die); otherwise the re-scan waits for a later poll.
    fn reinitialize(&mut self) -> Result<()> {
        match Arc::get_mut(&mut self.module) {
            Some(module) => module.reinitialize(),
            None => {
                tracing::trace!("module in use elsewhere: re-scan postponed");
                Ok(())
            }
        }
    }
}

fn auto_mode(module: &Module) -> WatchMode {
    // SoftHSM2 answers the non-blocking call with "no event" forever, and never sees
    // other processes' tokens without re-initialising.
    if module.library_info().manufacturer.contains("SoftHSM") {
        return WatchMode::Reinitialize;
    }
    // An SKF library lists present devices without re-initialising.
    let Ok(pkcs11) = module.pkcs11() else {
        return WatchMode::SlotEvents;
    };
    match pkcs11.get_slot_event() {
        Err(CkError::Pkcs11(RvError::FunctionNotSupported, _)) => WatchMode::Reinitialize,
        _ => WatchMode::SlotEvents,
    }
}
