//! The renewal engine: preflight (no PIN), then login → key → request → verify →
//! write → self-test → activate → installed, each step journaled before and after.
//!
//! **Invariants**
//! - Nothing is deleted from the token before its replacement is written and
//!   self-tested (activate comes after self-test). An old decryption key is archived
//!   (new CKA_ID and label), never destroyed.
//! - Until activation begins, any refusal or permanent failure rolls back: the pending
//!   objects are destroyed and the token is as before. Interruptions (token removed,
//!   network down, portal 5xx, crash) keep the journal; the next run resumes.
//! - Every step is idempotent on resume: objects are found by class + CKA_ID (pending
//!   ids carry the renewal id), certificates by value, and the portal returns the same
//!   certificate for the same key.
//! - The PIN is only passed to C_Login, once; a failed login is never retried.

use std::time::{Duration as StdDuration, Instant};

use secrecy::SecretString;
use serde::Serialize;
use time::OffsetDateTime;
use ukey_portal_api::{
    EcdhKdf, InstalledRequest, IssueRequest, IssueResponse, KeyAlgorithm, KeyPolicy,
    KeyTransport as WireTransport, OrderTerms, RenewalStatus, SignatureAlgorithm, StatusRequest,
    challenge_signed_data, installed_signed_data, normalize_serial_hex,
};
use ukey_token::cryptoki::mechanism::MechanismType;
use ukey_token::{
    CertificateDetails, KeyAlg, KeyTransport, Module, ObjectKind, PublicKey, TokenSummary, Usage,
};
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::api::{PortalApi, SessionToken, TokenApi};
use crate::checks::{self, DecryptTest, Expectations, Role};
use crate::error::{Refusal, RenewalError};
use crate::events::{Event, Step};
use crate::journal::{
    IssuedCerts, Journal, JournalStore, ObjectNames, OldObjects, Outcome, StepState,
};

/// Label prefix of pending objects (abandoned ones are found by it and removed).
pub const PENDING_LABEL_PREFIX: &str = "ukey-renew pending ";
/// Environment variable of the crash-test fail points: `<point>:<before|after>`, where
/// point is a step name (`key`, `write`, ...) or an activation sub-step `activate.1`..4.
pub const FAILPOINT_ENV: &str = "UKEY_FAILPOINT";

/// How the new objects' CKA_ID is chosen once active (vendor software differs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyIdScheme {
    /// The old certificate's CKA_ID (most vendor middleware looks the container up by it).
    #[default]
    KeepOld,
    /// SHA-1 of the RSA modulus or the EC point (OpenSC / NSS convention).
    Sha1OfPublicKey,
}

/// How the new objects' CKA_LABEL is chosen once active.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LabelScheme {
    /// The old certificate's label.
    #[default]
    KeepOld,
    /// Fixed labels.
    Fixed {
        /// Signing certificate and key.
        signing: String,
        /// Encryption certificate and key.
        encryption: String,
    },
}

/// Which journal records are fsynced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum JournalSync {
    /// Every record (before and after each step, each activation sub-step): fsync of
    /// the file, atomic rename, fsync of the directory.
    #[default]
    EveryStep,
    /// Every record is written atomically (survives a killed process), but only the
    /// checkpoints a power cut must not lose are fsynced: before the first change to
    /// the token (key), before activation, after the old signing objects are removed
    /// (activation sub-step 2: re-running it would hit the new objects), and the
    /// outcome. Losing any other record to a power cut only re-runs idempotent steps.
    Checkpoints,
}

/// Engine settings.
#[derive(Debug, Clone)]
pub struct Options {
    /// Which journal records are fsynced.
    pub journal_sync: JournalSync,
    /// Trust anchors (DER) the issued certificate must chain to.
    pub trust_anchors: Vec<Vec<u8>>,
    /// Final CKA_IDs.
    pub key_ids: KeyIdScheme,
    /// Final labels.
    pub labels: LabelScheme,
    /// Largest clock difference with the portal accepted.
    pub max_clock_skew: time::Duration,
    /// The user explicitly accepted trying the PIN at its last try.
    pub confirm_final_try: bool,
    /// Where journals live.
    pub journals: JournalStore,
    /// KDF asked for an EC envelope (SoftHSM 2.6.1 can only do `Null`).
    pub ecdh_kdf: EcdhKdf,
}

impl Options {
    /// Defaults with the given journal store and anchors.
    pub fn new(journals: JournalStore, trust_anchors: Vec<Vec<u8>>) -> Options {
        Options {
            journal_sync: JournalSync::default(),
            trust_anchors,
            key_ids: KeyIdScheme::default(),
            labels: LabelScheme::default(),
            max_clock_skew: time::Duration::minutes(5),
            confirm_final_try: false,
            journals,
            ecdh_kdf: EcdhKdf::Null,
        }
    }
}

/// Something the user must be told before anything changes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "notice", rename_all = "snake_case")]
pub enum Notice {
    /// The old certificate will be revoked once the new one is installed.
    OldCertificateRevoked {
        /// Its serial.
        serial: String,
    },
    /// The old encryption certificate and its decryption key stay on the token,
    /// archived, so what was encrypted to them can still be opened.
    OldDecryptionKeyArchived {
        /// Its serial.
        serial: String,
    },
    /// The key algorithm changes.
    AlgorithmUpgrade {
        /// From.
        from: String,
        /// To.
        to: String,
    },
    /// An interrupted renewal will be finished.
    Resuming {
        /// The step it reached.
        step: Step,
    },
}

impl Notice {
    /// For the user.
    pub fn text(&self, zh: bool) -> String {
        match (self, zh) {
            (Notice::OldCertificateRevoked { serial }, true) => {
                format!("更新完成后，旧证书（序列号 {serial}）将被 CA 吊销。")
            }
            (Notice::OldCertificateRevoked { serial }, false) => {
                format!(
                    "Once renewed, the old certificate (serial {serial}) will be revoked by the CA."
                )
            }
            (Notice::OldDecryptionKeyArchived { serial }, true) => format!(
                "旧加密证书（序列号 {serial}）及其解密密钥将归档保留在 UKey 上，已加密的投标文件仍可解密。"
            ),
            (Notice::OldDecryptionKeyArchived { serial }, false) => format!(
                "The old encryption certificate (serial {serial}) and its decryption key stay on the token, archived, so bids already encrypted to it can still be opened."
            ),
            (Notice::AlgorithmUpgrade { from, to }, true) => {
                format!("密钥算法将由 {from} 升级为 {to}。")
            }
            (Notice::AlgorithmUpgrade { from, to }, false) => {
                format!("The key algorithm changes from {from} to {to}.")
            }
            (Notice::Resuming { step }, true) => {
                format!(
                    "将继续完成上次中断的续期（中断于“{}”）。",
                    step.describe(true)
                )
            }
            (Notice::Resuming { step }, false) => format!(
                "An interrupted renewal will be finished (it stopped at \"{}\").",
                step.describe(false)
            ),
        }
    }
}

/// The result of preflight: what will be renewed, and what the user must know.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The token.
    pub token: TokenSummary,
    /// The journal to run (new, not saved yet; or the unfinished one).
    pub journal: Journal,
    /// Whether this resumes an interrupted renewal.
    pub resuming: bool,
    /// Tell the user before the PIN.
    pub notices: Vec<Notice>,
    /// Local clock minus portal clock, seconds, when the portal sent a Date.
    pub clock_skew_seconds: Option<i64>,
}

/// Timing of one step.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StepTiming {
    /// The step.
    pub step: Step,
    /// Milliseconds.
    pub ms: f64,
    /// Skipped (done before an interruption).
    pub skipped: bool,
}

/// A finished renewal.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    /// `renewed`.
    pub status: &'static str,
    /// Token serial.
    pub token_serial: String,
    /// Old serial.
    pub old_serial: String,
    /// New serial.
    pub new_serial: String,
    /// New end of validity.
    #[serde(with = "time::serde::rfc3339")]
    pub not_after: OffsetDateTime,
    /// New encryption certificate serial.
    pub encryption_serial: Option<String>,
    /// Archived encryption certificate serial.
    pub archived_serial: Option<String>,
    /// Whether an interrupted renewal was resumed.
    pub resumed: bool,
    /// Steps.
    pub steps: Vec<StepTiming>,
}

fn key_alg(a: KeyAlgorithm) -> KeyAlg {
    match a {
        KeyAlgorithm::Rsa2048 => KeyAlg::Rsa2048,
        KeyAlgorithm::EcP256 => KeyAlg::EcP256,
    }
}

fn alg_of(details: &CertificateDetails) -> Option<KeyAlg> {
    KeyAlg::parse(&details.key_algorithm)
}

/// The status request for a certificate (issuer DER + serial).
pub fn status_request(cert_der: &[u8]) -> Result<StatusRequest, RenewalError> {
    let (_, cert) = X509Certificate::from_der(cert_der)
        .map_err(|e| RenewalError::Inconsistent(format!("certificate on the token: {e}")))?;
    Ok(StatusRequest {
        issuer_der: Some(cert.issuer().as_raw().to_vec()),
        issuer_dn: None,
        serial_hex: ukey_portal_api::serial_hex_from_bytes(cert.raw_serial()),
    })
}

fn random_hex(n: usize) -> String {
    use aws_lc_rs::rand::{SecureRandom, SystemRandom};
    let mut b = vec![0u8; n];
    // The system RNG failing is not recoverable; fall back to the clock so that ids
    // still differ between attempts.
    if SystemRandom::new().fill(&mut b).is_err() {
        let t = OffsetDateTime::now_utc()
            .unix_timestamp_nanos()
            .to_be_bytes();
        b.iter_mut().zip(t.iter().rev()).for_each(|(d, s)| *d = *s);
    }
    hex::encode(b)
}

/// A signing certificate on the token that could be renewed.
#[derive(Debug, Clone)]
struct Candidate {
    der: Vec<u8>,
    details: CertificateDetails,
    key_id: Vec<u8>,
    label: String,
}

/// Checks everything that can be checked without the PIN and decides what to renew.
///
/// `cert_serial` selects a certificate when the token holds several with a ready order.
/// Resumes an unfinished journal of this token first.
pub fn preflight(
    module: &Module,
    token: &TokenSummary,
    cert_serial: Option<&str>,
    portal: &dyn PortalApi,
    opts: &Options,
) -> Result<Plan, RenewalError> {
    let want = match cert_serial {
        Some(s) => {
            Some(normalize_serial_hex(s).map_err(|e| RenewalError::Selection(e.to_string()))?)
        }
        None => None,
    };
    let token = module.refresh(token)?;
    if token.pin.locked {
        return Err(RenewalError::PinLocked {
            token: token.serial.clone(),
        });
    }
    if token.pin.final_try && !opts.confirm_final_try {
        return Err(RenewalError::FinalTryNeedsConfirmation {
            token: token.serial.clone(),
        });
    }

    // An interrupted renewal comes first.
    let unfinished: Vec<Journal> = opts
        .journals
        .for_token(&token.serial)?
        .into_iter()
        .filter(|j| j.is_unfinished())
        .filter(|j| want.as_ref().is_none_or(|w| *w == j.old.serial))
        .collect();
    if let Some(journal) = unfinished.into_iter().next() {
        return Ok(Plan {
            notices: vec![Notice::Resuming { step: journal.step }],
            token,
            journal,
            resuming: true,
            clock_skew_seconds: None,
        });
    }

    let listing = module.list_token(&token, None);
    if let Some(e) = listing.errors.iter().find(|e| {
        matches!(
            e,
            ukey_token::Error::TokenRemoved { .. } | ukey_token::Error::TokenNotPresent { .. }
        )
    }) {
        return Err(RenewalError::Token(e.clone()));
    }
    let mut candidates = Vec::new();
    let mut encryption = Vec::new();
    for c in &listing.certificates {
        let Ok(d) = &c.details else { continue };
        let cand = Candidate {
            der: c.der.clone(),
            details: d.clone(),
            key_id: c.key_id.clone(),
            label: c.label.clone(),
        };
        if d.usage == Usage::Encryption {
            encryption.push(cand);
            continue;
        }
        if want.as_ref().is_some_and(|w| *w != d.serial) {
            continue;
        }
        if c.key.has_private_key() == Some(false) {
            if want.is_some() {
                return Err(RenewalError::KeyMissing {
                    serial: d.serial.clone(),
                });
            }
            continue;
        }
        candidates.push(cand);
    }
    if candidates.is_empty() {
        return Err(match want {
            Some(w) => RenewalError::Selection(format!(
                "no signing certificate with serial {w} and its key on token {}",
                token.serial
            )),
            None => RenewalError::Selection(format!(
                "no signing certificate with its key on token {}",
                token.serial
            )),
        });
    }

    // Ask the portal about each; keep the ready ones.
    let mut ready = Vec::new();
    let mut first_blocker: Option<RenewalError> = None;
    let mut skew = None;
    for cand in candidates {
        let answer = portal.status(&status_request(&cand.der)?)?;
        if let Some(date) = answer.server_date {
            let s = (OffsetDateTime::now_utc() - date).whole_seconds();
            skew = Some(s);
            if s.abs() > opts.max_clock_skew.whole_seconds() {
                return Err(RenewalError::ClockSkew { seconds: s });
            }
        }
        let serial = cand.details.serial.clone();
        match answer.value {
            RenewalStatus::Ready { order_id, terms }
            | RenewalStatus::Issued {
                order_id, terms, ..
            } => {
                ready.push((cand, order_id, terms));
            }
            other => {
                let e = match other {
                    RenewalStatus::None => RenewalError::NoOrder { serial },
                    RenewalStatus::AwaitingPayment { payment_url, .. } => {
                        RenewalError::AwaitingPayment {
                            serial,
                            payment_url,
                        }
                    }
                    RenewalStatus::Completed { .. } => RenewalError::AlreadyCompleted { serial },
                    RenewalStatus::RequiresNewKey {
                        tracking_number, ..
                    } => RenewalError::NewKeyMailed { tracking_number },
                    RenewalStatus::Rejected { reason, .. } => RenewalError::Rejected { reason },
                    RenewalStatus::Ready { .. } | RenewalStatus::Issued { .. } => continue,
                };
                // A user action outranks "nothing to do".
                let replace = match &first_blocker {
                    None => true,
                    Some(prev) => {
                        prev.kind() == crate::error::ErrorKind::NothingToDo
                            && e.kind() != crate::error::ErrorKind::NothingToDo
                    }
                };
                if replace {
                    first_blocker = Some(e);
                }
            }
        }
    }
    let (cand, order_id, terms) = match ready.len() {
        0 => {
            return Err(first_blocker.unwrap_or_else(|| RenewalError::NoOrder {
                serial: String::new(),
            }));
        }
        1 => ready.remove(0),
        _ => {
            let serials: Vec<String> = ready.iter().map(|r| r.0.details.serial.clone()).collect();
            return Err(RenewalError::Selection(format!(
                "several certificates on token {} have a ready renewal ({}); choose one with --cert",
                token.serial,
                serials.join(", ")
            )));
        }
    };

    let old_alg = alg_of(&cand.details).ok_or_else(|| {
        RenewalError::Inconsistent(format!(
            "unsupported key algorithm {} of certificate {}",
            cand.details.key_algorithm, cand.details.serial
        ))
    })?;
    let new_alg = match terms.key_policy {
        KeyPolicy::Same => old_alg,
        KeyPolicy::New => key_alg(terms.target_algorithm),
    };
    check_mechanisms(module, &token, old_alg, new_alg, &terms)?;

    let old_enc = if terms.with_encryption_cert {
        // The holder's current encryption certificate: same subject, encryption usage.
        let subject = &cand.details.subject;
        encryption
            .into_iter()
            .find(|e| &e.details.subject == subject)
    } else {
        None
    };
    let mut notices = vec![Notice::OldCertificateRevoked {
        serial: cand.details.serial.clone(),
    }];
    if let Some(e) = &old_enc {
        notices.push(Notice::OldDecryptionKeyArchived {
            serial: e.details.serial.clone(),
        });
    }
    if new_alg != old_alg {
        notices.push(Notice::AlgorithmUpgrade {
            from: old_alg.as_str().to_owned(),
            to: new_alg.as_str().to_owned(),
        });
    }
    let journal = new_journal(
        &token,
        &cand,
        old_enc.as_ref(),
        &order_id,
        &terms,
        old_alg,
        new_alg,
        opts,
    );
    Ok(Plan {
        token,
        journal,
        resuming: false,
        notices,
        clock_skew_seconds: skew,
    })
}

fn check_mechanisms(
    module: &Module,
    token: &TokenSummary,
    old_alg: KeyAlg,
    new_alg: KeyAlg,
    terms: &OrderTerms,
) -> Result<(), RenewalError> {
    let session = module.open_session(token)?;
    let have = session.mechanisms()?;
    let mut need = vec![old_alg.sign_mechanism(), new_alg.sign_mechanism()];
    if terms.key_policy == KeyPolicy::New {
        need.push(new_alg.keygen_mechanism());
    }
    if terms.with_encryption_cert {
        need.push(MechanismType::AES_KEY_WRAP_PAD);
        need.push(match new_alg {
            KeyAlg::Rsa2048 => MechanismType::RSA_PKCS_OAEP,
            KeyAlg::EcP256 => MechanismType::ECDH1_DERIVE,
        });
    }
    for m in need {
        if !have.contains(&m) {
            return Err(RenewalError::MechanismMissing {
                token: token.serial.clone(),
                mechanism: m.to_string(),
            });
        }
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn new_journal(
    token: &TokenSummary,
    cand: &Candidate,
    old_enc: Option<&Candidate>,
    order_id: &str,
    terms: &OrderTerms,
    old_alg: KeyAlg,
    new_alg: KeyAlg,
    opts: &Options,
) -> Journal {
    let rid = random_hex(6);
    let old = OldObjects {
        serial: cand.details.serial.clone(),
        cert_der_hex: hex::encode(&cand.der),
        id_hex: hex::encode(&cand.key_id),
        label: cand.label.clone(),
        alg: old_alg,
    };
    let old_encryption = old_enc.and_then(|e| {
        Some(OldObjects {
            serial: e.details.serial.clone(),
            cert_der_hex: hex::encode(&e.der),
            id_hex: hex::encode(&e.key_id),
            label: e.label.clone(),
            alg: alg_of(&e.details)?,
        })
    });
    let (sig_label, enc_label) = match &opts.labels {
        LabelScheme::KeepOld => (
            cand.label.clone(),
            old_enc
                .map(|e| e.label.clone())
                .unwrap_or_else(|| format!("{} (encryption)", cand.label)),
        ),
        LabelScheme::Fixed {
            signing,
            encryption,
        } => (signing.clone(), encryption.clone()),
    };
    let signing = ObjectNames {
        pending_id_hex: hex::encode(format!("ukey-renew:{rid}:sig")),
        pending_label: format!("{PENDING_LABEL_PREFIX}{rid} sig"),
        // Filled in at verify for the SHA-1 scheme.
        final_id_hex: hex::encode(&cand.key_id),
        final_label: sig_label,
    };
    let encryption = terms.with_encryption_cert.then(|| ObjectNames {
        pending_id_hex: hex::encode(format!("ukey-renew:{rid}:enc")),
        pending_label: format!("{PENDING_LABEL_PREFIX}{rid} enc"),
        final_id_hex: match old_enc {
            Some(e) => hex::encode(&e.key_id),
            None => hex::encode([cand.key_id.as_slice(), b"-enc"].concat()),
        },
        final_label: enc_label,
    });
    let today = OffsetDateTime::now_utc().date();
    let archive = match (&encryption, &old_encryption) {
        (Some(_), Some(e)) => Some(ObjectNames {
            pending_id_hex: e.id_hex.clone(),
            pending_label: e.label.clone(),
            final_id_hex: hex::encode(format!("archived {}", e.serial)),
            final_label: format!("archived {} {today}", e.serial),
        }),
        _ => None,
    };
    Journal {
        version: crate::journal::JOURNAL_VERSION,
        renewal_id: rid,
        token_serial: token.serial.clone(),
        token_label: token.label.clone(),
        order_id: order_id.to_owned(),
        key_policy: terms.key_policy,
        new_alg,
        with_encryption: terms.with_encryption_cert,
        old,
        old_encryption,
        signing,
        encryption,
        archive,
        issued: None,
        step: Step::Preflight,
        state: StepState::Done,
        activate_done: 0,
        outcome: Outcome::Unfinished,
        history: Vec::new(),
    }
}

/// Aborts the process when `UKEY_FAILPOINT` names this point (crash tests).
pub fn failpoint(point: &str, when: &str) {
    if let Some(v) = std::env::var_os(FAILPOINT_ENV) {
        if v.to_str() == Some(&format!("{point}:{when}")) {
            eprintln!("ukey: fail point {point}:{when} reached, aborting");
            std::process::abort();
        }
    }
}

/// Runs a planned renewal on its own session of `module`.
pub fn renew(
    module: &Module,
    plan: Plan,
    pin: &SecretString,
    portal: &dyn PortalApi,
    opts: &Options,
    on_event: &mut dyn FnMut(Event),
) -> Result<Report, RenewalError> {
    let token = SessionToken::open(module, &plan.token)?;
    run(&token, plan, pin, portal, opts, on_event)
}

/// Runs a planned renewal against any [`TokenApi`].
pub fn run(
    token: &dyn TokenApi,
    plan: Plan,
    pin: &SecretString,
    portal: &dyn PortalApi,
    opts: &Options,
    on_event: &mut dyn FnMut(Event),
) -> Result<Report, RenewalError> {
    let mut r = Run {
        token,
        portal,
        opts,
        j: plan.journal,
        on_event,
        timings: Vec::new(),
        issued: None,
        new_public: None,
    };
    let resumed = plan.resuming;
    if resumed {
        (r.on_event)(Event::Resuming { from: r.j.step });
    }
    r.timings.push(StepTiming {
        step: Step::Preflight,
        ms: 0.0,
        skipped: false,
    });
    r.login(pin, resumed)?;
    if !r.j.activation_begun() {
        match r.before_activation() {
            Ok(()) => {}
            Err(e) if e.is_resumable() => return Err(e),
            Err(e) => {
                if let Err(rb) = r.rollback(e.code()) {
                    tracing::warn!("rollback after {e} failed: {rb}; it will be retried");
                }
                return Err(e);
            }
        }
    } else {
        for s in [
            Step::Key,
            Step::Request,
            Step::Verify,
            Step::Write,
            Step::SelfTest,
        ] {
            r.skip(s);
        }
    }
    if r.j.step < Step::Activate || (r.j.step == Step::Activate && r.j.state == StepState::Started)
    {
        r.step(Step::Activate, |r| r.activate())?;
    } else {
        r.skip(Step::Activate);
    }
    r.step(Step::Installed, |r| r.installed())?;
    r.j.outcome = Outcome::Completed;
    r.opts.journals.save(&r.j)?;
    let issued = r.j.issued.clone().ok_or_else(|| {
        RenewalError::Inconsistent("finished without an issued certificate".into())
    })?;
    Ok(Report {
        status: "renewed",
        token_serial: r.j.token_serial.clone(),
        old_serial: r.j.old.serial.clone(),
        new_serial: issued.serial,
        not_after: issued.not_after,
        encryption_serial: issued.enc_serial,
        archived_serial: r
            .j
            .archive
            .as_ref()
            .and(r.j.old_encryption.as_ref())
            .map(|o| o.serial.clone()),
        resumed,
        steps: r.timings,
    })
}

struct Run<'a> {
    token: &'a dyn TokenApi,
    portal: &'a dyn PortalApi,
    opts: &'a Options,
    j: Journal,
    on_event: &'a mut dyn FnMut(Event),
    timings: Vec<StepTiming>,
    issued: Option<IssueResponse>,
    new_public: Option<PublicKey>,
}

fn unhex(s: &str) -> Vec<u8> {
    // Journal ids are written by this engine as hex; a damaged one gives an empty id,
    // which matches no object.
    hex::decode(s).unwrap_or_default()
}

impl Run<'_> {
    fn save(&self) -> Result<(), RenewalError> {
        let j = &self.j;
        let checkpoint = j.outcome != Outcome::Unfinished
            || (j.step == Step::Key && j.state == StepState::Started)
            || (j.step == Step::Activate && matches!(j.activate_done, 0 | 2));
        let durable = self.opts.journal_sync == JournalSync::EveryStep || checkpoint;
        self.opts.journals.save_with(j, durable)
    }

    fn skip(&mut self, step: Step) {
        (self.on_event)(Event::StepSkipped { step });
        self.timings.push(StepTiming {
            step,
            ms: 0.0,
            skipped: true,
        });
    }

    fn step<R>(
        &mut self,
        step: Step,
        f: impl FnOnce(&mut Self) -> Result<R, RenewalError>,
    ) -> Result<R, RenewalError> {
        self.j.mark(step, StepState::Started);
        self.save()?;
        (self.on_event)(Event::StepStarted { step });
        failpoint(step.as_str(), "before");
        let t0 = Instant::now();
        let out = f(self)?;
        let duration = t0.elapsed();
        failpoint(step.as_str(), "after");
        // "Done" reaches the disk with the next write: the next step's "started" record
        // (nothing happens in between, so one fsync serves as both), a rollback, or the
        // final "completed". A crash before that resumes this step, which is idempotent.
        self.j.mark(step, StepState::Done);
        (self.on_event)(Event::StepFinished { step, duration });
        self.timings.push(StepTiming {
            step,
            ms: duration.as_secs_f64() * 1000.0,
            skipped: false,
        });
        Ok(out)
    }

    fn login(&mut self, pin: &SecretString, resumed: bool) -> Result<(), RenewalError> {
        if resumed {
            // On resume the journal keeps the step it had reached: recording "login"
            // over it would lose, at a crash during login, that activation had begun.
            (self.on_event)(Event::StepStarted { step: Step::Login });
            failpoint("login", "before");
            let t0 = Instant::now();
            self.token.login(pin)?;
            let duration = t0.elapsed();
            failpoint("login", "after");
            (self.on_event)(Event::StepFinished {
                step: Step::Login,
                duration,
            });
            self.timings.push(StepTiming {
                step: Step::Login,
                ms: duration.as_secs_f64() * 1000.0,
                skipped: false,
            });
            return Ok(());
        }
        if let Err(e) = self.step(Step::Login, |r| Ok(r.token.login(pin)?)) {
            // A failed login on a fresh renewal leaves nothing to resume.
            self.j.outcome = Outcome::RolledBack {
                reason: e.code().to_owned(),
            };
            let _ = self.save();
            return Err(e);
        }
        self.cleanup_abandoned()
    }

    /// Removes pending objects no unfinished journal owns (an abandoned renewal whose
    /// journal was lost or rolled back while the token was away).
    fn cleanup_abandoned(&mut self) -> Result<(), RenewalError> {
        let owned: Vec<String> = self
            .opts
            .journals
            .for_token(&self.j.token_serial)?
            .into_iter()
            .filter(|j| j.is_unfinished())
            .map(|j| j.renewal_id)
            .collect();
        let mut n = 0;
        for o in self.token.objects()? {
            let Some(rest) = o.label.strip_prefix(PENDING_LABEL_PREFIX) else {
                continue;
            };
            if owned.iter().any(|id| rest.starts_with(id.as_str())) {
                continue;
            }
            n += self.token.destroy(o.kind, &o.id())?;
        }
        if n > 0 {
            tracing::info!(
                objects = n,
                "removed pending objects of an abandoned renewal"
            );
            (self.on_event)(Event::CleanedUp { objects: n });
        }
        Ok(())
    }

    fn signing_key_id(&self) -> Vec<u8> {
        match self.j.key_policy {
            KeyPolicy::Same => unhex(&self.j.old.id_hex),
            KeyPolicy::New => unhex(&self.j.signing.pending_id_hex),
        }
    }

    fn before_activation(&mut self) -> Result<(), RenewalError> {
        self.step(Step::Key, |r| r.key())?;
        self.step(Step::Request, |r| r.request())?;
        self.step(Step::Verify, |r| r.verify())?;
        self.step(Step::Write, |r| r.write())?;
        self.step(Step::SelfTest, |r| r.self_test())?;
        Ok(())
    }

    fn key(&mut self) -> Result<(), RenewalError> {
        let id = self.signing_key_id();
        if self.j.key_policy == KeyPolicy::New {
            let has_private = self.token.count(ObjectKind::PrivateKey, &id)? > 0;
            let public = self.token.public_key(&id)?;
            match (has_private, public) {
                (true, Some(pk)) => {
                    self.new_public = Some(pk);
                    return Ok(());
                }
                (false, None) => {}
                // Half a key pair from an interrupted generation: start over.
                _ => {
                    self.token.destroy(ObjectKind::PrivateKey, &id)?;
                    self.token.destroy(ObjectKind::PublicKey, &id)?;
                }
            }
            self.token
                .generate_key_pair(self.j.new_alg, &id, &self.j.signing.pending_label)?;
        }
        let pk = self
            .token
            .public_key(&id)?
            .ok_or_else(|| RenewalError::KeyMissing {
                serial: self.j.old.serial.clone(),
            })?;
        self.new_public = Some(pk);
        Ok(())
    }

    fn request(&mut self) -> Result<(), RenewalError> {
        let old_der = unhex(&self.j.old.cert_der_hex);
        let id = self.signing_key_id();
        let public = match &self.new_public {
            Some(p) => p.clone(),
            None => self
                .token
                .public_key(&id)?
                .ok_or_else(|| RenewalError::KeyMissing {
                    serial: self.j.old.serial.clone(),
                })?,
        };
        let mut params = rcgen::CertificateParams::default();
        params.distinguished_name =
            checks::subject_of(&old_der).map_err(RenewalError::Inconsistent)?;
        let csr_der = self.token.csr(&id, &public, &params)?;
        let challenge = self.portal.challenge(&self.j.order_id)?.value;
        let data = challenge_signed_data(&self.j.order_id, &challenge.nonce, &csr_der);
        let old_id = unhex(&self.j.old.id_hex);
        let signature = self.token.sign(&old_id, self.j.old.alg, &data)?;
        let req = IssueRequest {
            challenge_id: challenge.challenge_id,
            challenge_signature: signature,
            signature_algorithm: sig_alg(self.j.old.alg),
            old_certificate_der: old_der,
            csr_der,
            ecdh_kdf: self.opts.ecdh_kdf,
        };
        let issued = self.portal.issue(&self.j.order_id, &req)?.value;
        self.issued = Some(issued);
        self.new_public = Some(public);
        Ok(())
    }

    fn verify(&mut self) -> Result<(), RenewalError> {
        let issued = self.issued.as_ref().ok_or_else(|| {
            RenewalError::Inconsistent("verify without an issued certificate".into())
        })?;
        let public = self.new_public.as_ref().ok_or_else(|| {
            RenewalError::Inconsistent("verify without the new public key".into())
        })?;
        let old_der = unhex(&self.j.old.cert_der_hex);
        let now = OffsetDateTime::now_utc();
        let x = Expectations {
            old_der: &old_der,
            public_key: Some(public),
            anchors: &self.opts.trust_anchors,
            chain: &issued.chain_der,
            now,
            skew: self.opts.max_clock_skew,
            role: Role::Signing,
        };
        let not_after =
            checks::check_issued(&issued.certificate_der, &x).map_err(RenewalError::Refused)?;
        let serial = serial_of(&issued.certificate_der)?;
        let mut enc_serial = None;
        let mut enc_der = None;
        match (&issued.encryption, self.j.with_encryption) {
            (Some(enc), true) => {
                let x = Expectations {
                    public_key: None,
                    role: Role::Encryption,
                    ..x
                };
                checks::check_issued(&enc.certificate_der, &x).map_err(RenewalError::Refused)?;
                let spki_hash =
                    aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &public.spki());
                if enc.envelope.recipient_spki_sha256 != spki_hash.as_ref() {
                    return Err(RenewalError::Refused(Refusal::Encryption(
                        "the key envelope is addressed to another key".into(),
                    )));
                }
                let (_, ec) = X509Certificate::from_der(&enc.certificate_der)
                    .map_err(|e| RenewalError::Refused(Refusal::Malformed(e.to_string())))?;
                let want_alg = matches!(
                    (
                        &enc.envelope.private_key_algorithm,
                        ec.public_key().parsed()
                    ),
                    (
                        KeyAlgorithm::Rsa2048,
                        Ok(x509_parser::public_key::PublicKey::RSA(_))
                    ) | (
                        KeyAlgorithm::EcP256,
                        Ok(x509_parser::public_key::PublicKey::EC(_))
                    )
                );
                if !want_alg {
                    return Err(RenewalError::Refused(Refusal::Encryption(
                        "the escrowed key's algorithm does not match its certificate".into(),
                    )));
                }
                enc_serial = Some(serial_of(&enc.certificate_der)?);
                enc_der = Some(hex::encode(&enc.certificate_der));
            }
            (None, true) => {
                return Err(RenewalError::Refused(Refusal::Encryption(
                    "the order includes an encryption certificate but none came".into(),
                )));
            }
            (_, false) => {}
        }
        if self.opts.key_ids == KeyIdScheme::Sha1OfPublicKey {
            self.j.signing.final_id_hex = hex::encode(sha1_id(public));
            if let (Some(names), Some(enc)) =
                (self.j.encryption.as_mut(), issued.encryption.as_ref())
            {
                if let Some(pk) = public_key_of_cert(&enc.certificate_der) {
                    names.final_id_hex = hex::encode(sha1_id(&pk));
                }
            }
        }
        self.j.issued = Some(IssuedCerts {
            serial,
            cert_der_hex: hex::encode(&issued.certificate_der),
            enc_serial,
            enc_cert_der_hex: enc_der,
            not_after,
        });
        Ok(())
    }

    fn write(&mut self) -> Result<(), RenewalError> {
        let issued = self.issued.clone().ok_or_else(|| {
            RenewalError::Inconsistent("write without an issued certificate".into())
        })?;
        let token = self.token;
        let has_cert = |der: &[u8]| token.has_certificate(der, None);
        let sig_pending = unhex(&self.j.signing.pending_id_hex);
        if !has_cert(&issued.certificate_der)? {
            self.token.write_certificate(
                &issued.certificate_der,
                &sig_pending,
                &self.j.signing.pending_label,
            )?;
        }
        failpoint("write.cert", "after");
        if let (Some(enc), Some(names)) = (&issued.encryption, self.j.encryption.clone()) {
            let enc_id = unhex(&names.pending_id_hex);
            let has_key = self.token.count(ObjectKind::PrivateKey, &enc_id)? > 0;
            if !has_key {
                let transport = match &enc.envelope.key_transport {
                    WireTransport::RsaOaepSha1 { wrapped_key } => {
                        KeyTransport::RsaOaepSha1 { wrapped_key }
                    }
                    WireTransport::EcdhP256 {
                        ephemeral_public_key,
                        kdf: EcdhKdf::Null,
                        ..
                    } => KeyTransport::EcdhP256Null {
                        ephemeral_public_key,
                    },
                    WireTransport::EcdhP256 { kdf, .. } => {
                        return Err(RenewalError::Refused(Refusal::Encryption(format!(
                            "envelope KDF {kdf:?} was not asked for"
                        ))));
                    }
                };
                self.token.unwrap_escrowed_key(
                    &self.signing_key_id(),
                    &transport,
                    &enc.envelope.wrapped_private_key,
                    key_alg(enc.envelope.private_key_algorithm),
                    &enc_id,
                    &names.pending_label,
                )?;
            }
            failpoint("write.unwrap", "after");
            if !has_cert(&enc.certificate_der)? {
                self.token.write_certificate(
                    &enc.certificate_der,
                    &enc_id,
                    &names.pending_label,
                )?;
            }
        }
        Ok(())
    }

    fn self_test(&mut self) -> Result<(), RenewalError> {
        let issued = self.j.issued.clone().ok_or_else(|| {
            RenewalError::Inconsistent("self-test without an issued certificate".into())
        })?;
        let data = format!("ukey-renew self-test {}", random_hex(16)).into_bytes();
        let sig = self
            .token
            .sign(&self.signing_key_id(), self.j.new_alg, &data)?;
        checks::verify_with_certificate(&unhex(&issued.cert_der_hex), &data, &sig)
            .map_err(RenewalError::SelfTest)?;
        if let (Some(enc_hex), Some(names)) = (&issued.enc_cert_der_hex, &self.j.encryption) {
            let enc_id = unhex(&names.pending_id_hex);
            match checks::decrypt_test(&unhex(enc_hex)).map_err(RenewalError::SelfTest)? {
                DecryptTest::Rsa {
                    ciphertext,
                    plaintext,
                } => {
                    let got = self.token.decrypt_rsa_oaep(&enc_id, &ciphertext)?;
                    if got != plaintext {
                        return Err(RenewalError::SelfTest(
                            "the new encryption key does not decrypt what is encrypted to its certificate".into(),
                        ));
                    }
                }
                DecryptTest::Ec { peer_point, shared } => {
                    let got = self.token.ecdh(&enc_id, &peer_point)?;
                    if got != shared {
                        return Err(RenewalError::SelfTest(
                            "the new encryption key does not match its certificate".into(),
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    /// Activation in four sub-steps, each recorded in the journal so that a resumed
    /// run never repeats one whose effect would now hit the new objects.
    fn activate(&mut self) -> Result<(), RenewalError> {
        for n in 1..=4u32 {
            if self.j.activate_done >= n {
                continue;
            }
            let point = format!("activate.{n}");
            failpoint(&point, "before");
            match n {
                1 => self.archive_old_encryption()?,
                2 => self.remove_old_signing()?,
                3 => self.activate_new_signing()?,
                _ => self.activate_new_encryption()?,
            }
            failpoint(&point, "after");
            self.j.activate_done = n;
            self.save()?;
        }
        Ok(())
    }

    fn archive_old_encryption(&mut self) -> Result<(), RenewalError> {
        if let Some(a) = self.j.archive.clone() {
            let from = unhex(&a.pending_id_hex);
            let to = unhex(&a.final_id_hex);
            for kind in [
                ObjectKind::Certificate,
                ObjectKind::PrivateKey,
                ObjectKind::PublicKey,
            ] {
                self.token.relabel(kind, &from, &to, &a.final_label)?;
            }
        }
        Ok(())
    }

    /// New key: the old signing certificate and key pair go (the new pair, still under
    /// its pending id, works meanwhile). Same key: the new certificate takes the key's
    /// id first, so that the key is never without a certificate.
    fn remove_old_signing(&mut self) -> Result<(), RenewalError> {
        match self.j.key_policy {
            KeyPolicy::New => {
                self.token
                    .destroy_certificate(&unhex(&self.j.old.cert_der_hex))?;
                let old_id = unhex(&self.j.old.id_hex);
                self.token.destroy(ObjectKind::PrivateKey, &old_id)?;
                self.token.destroy(ObjectKind::PublicKey, &old_id)?;
            }
            KeyPolicy::Same => {
                let n = self.j.signing.clone();
                let (from, to) = (unhex(&n.pending_id_hex), unhex(&self.j.old.id_hex));
                self.token
                    .relabel(ObjectKind::Certificate, &from, &to, &n.final_label)?;
            }
        }
        Ok(())
    }

    /// New key: a copy of the new certificate under the final id, then the key pair
    /// moves to it, then the pending copy goes: at every moment one certificate and
    /// key pair share an id. Same key: the old certificate goes.
    fn activate_new_signing(&mut self) -> Result<(), RenewalError> {
        let n = self.j.signing.clone();
        let (pending, to) = (unhex(&n.pending_id_hex), unhex(&n.final_id_hex));
        let der = unhex(
            &self
                .j
                .issued
                .as_ref()
                .ok_or_else(|| {
                    RenewalError::Inconsistent("activation without a certificate".into())
                })?
                .cert_der_hex,
        );
        match self.j.key_policy {
            KeyPolicy::New => {
                if !self.token.has_certificate(&der, Some(&to))? {
                    self.token.write_certificate(&der, &to, &n.final_label)?;
                }
                self.token
                    .relabel(ObjectKind::PrivateKey, &pending, &to, &n.final_label)?;
                self.token
                    .relabel(ObjectKind::PublicKey, &pending, &to, &n.final_label)?;
                self.token.destroy(ObjectKind::Certificate, &pending)?;
            }
            KeyPolicy::Same => {
                self.token
                    .destroy_certificate(&unhex(&self.j.old.cert_der_hex))?;
                // The kept key and its certificate follow the id scheme.
                let old = unhex(&self.j.old.id_hex);
                if old != to {
                    for kind in [
                        ObjectKind::Certificate,
                        ObjectKind::PrivateKey,
                        ObjectKind::PublicKey,
                    ] {
                        self.token.relabel(kind, &old, &to, &n.final_label)?;
                    }
                }
            }
        }
        Ok(())
    }

    fn activate_new_encryption(&mut self) -> Result<(), RenewalError> {
        if let Some(n) = self.j.encryption.clone() {
            let (from, to) = (unhex(&n.pending_id_hex), unhex(&n.final_id_hex));
            self.token
                .relabel(ObjectKind::Certificate, &from, &to, &n.final_label)?;
            self.token
                .relabel(ObjectKind::PrivateKey, &from, &to, &n.final_label)?;
        }
        Ok(())
    }

    fn installed(&mut self) -> Result<(), RenewalError> {
        let issued = self.j.issued.clone().ok_or_else(|| {
            RenewalError::Inconsistent("installed without an issued certificate".into())
        })?;
        let id = unhex(&self.j.signing.final_id_hex);
        let data = installed_signed_data(&self.j.order_id, &issued.serial);
        let signature = self.token.sign(&id, self.j.new_alg, &data)?;
        self.portal.installed(
            &self.j.order_id,
            &InstalledRequest {
                certificate_serial_hex: issued.serial.clone(),
                signature,
                signature_algorithm: sig_alg(self.j.new_alg),
            },
        )?;
        Ok(())
    }

    /// Removes every pending object; only before activation.
    fn rollback(&mut self, reason: &str) -> Result<(), RenewalError> {
        if self.j.activation_begun() {
            return Ok(());
        }
        let sig = unhex(&self.j.signing.pending_id_hex);
        self.token.destroy(ObjectKind::Certificate, &sig)?;
        if self.j.key_policy == KeyPolicy::New {
            self.token.destroy(ObjectKind::PrivateKey, &sig)?;
            self.token.destroy(ObjectKind::PublicKey, &sig)?;
        }
        if let Some(n) = &self.j.encryption {
            let enc = unhex(&n.pending_id_hex);
            self.token.destroy(ObjectKind::Certificate, &enc)?;
            self.token.destroy(ObjectKind::PrivateKey, &enc)?;
        }
        self.j.outcome = Outcome::RolledBack {
            reason: reason.to_owned(),
        };
        self.save()?;
        tracing::info!(reason, "renewal rolled back; the token is as before");
        Ok(())
    }
}

/// Rolls back an unfinished journal whose activation has not begun (e.g. the user
/// abandons it): removes its pending objects and closes it.
pub fn abandon(
    module: &Module,
    token: &TokenSummary,
    journal: Journal,
    pin: &SecretString,
    opts: &Options,
) -> Result<(), RenewalError> {
    let t = SessionToken::open(module, token)?;
    t.login(pin)?;
    let mut noop = |_e: Event| {};
    let mut r = Run {
        token: &t,
        portal: &NoPortal,
        opts,
        j: journal,
        on_event: &mut noop,
        timings: Vec::new(),
        issued: None,
        new_public: None,
    };
    if r.j.activation_begun() {
        return Err(RenewalError::Inconsistent(
            "activation has begun; the renewal can only be finished".into(),
        ));
    }
    r.rollback("abandoned")
}

struct NoPortal;
impl PortalApi for NoPortal {
    fn status(
        &self,
        _: &StatusRequest,
    ) -> Result<ukey_portal_client::Answer<RenewalStatus>, ukey_portal_client::ClientError> {
        Err(no_portal())
    }
    fn challenge(
        &self,
        _: &str,
    ) -> Result<
        ukey_portal_client::Answer<ukey_portal_api::ChallengeResponse>,
        ukey_portal_client::ClientError,
    > {
        Err(no_portal())
    }
    fn issue(
        &self,
        _: &str,
        _: &IssueRequest,
    ) -> Result<ukey_portal_client::Answer<IssueResponse>, ukey_portal_client::ClientError> {
        Err(no_portal())
    }
    fn installed(
        &self,
        _: &str,
        _: &InstalledRequest,
    ) -> Result<
        ukey_portal_client::Answer<ukey_portal_api::InstalledResponse>,
        ukey_portal_client::ClientError,
    > {
        Err(no_portal())
    }
}
fn no_portal() -> ukey_portal_client::ClientError {
    ukey_portal_client::ClientError::Transport {
        url: String::new(),
        reason: "no portal during rollback".into(),
    }
}

fn sig_alg(a: KeyAlg) -> SignatureAlgorithm {
    match a {
        KeyAlg::Rsa2048 => SignatureAlgorithm::RsaPkcs1Sha256,
        KeyAlg::EcP256 => SignatureAlgorithm::EcdsaP256Sha256,
    }
}

fn serial_of(der: &[u8]) -> Result<String, RenewalError> {
    let (_, c) = X509Certificate::from_der(der)
        .map_err(|e| RenewalError::Refused(Refusal::Malformed(e.to_string())))?;
    Ok(ukey_portal_api::serial_hex_from_bytes(c.raw_serial()))
}

fn public_key_of_cert(der: &[u8]) -> Option<PublicKey> {
    let (_, c) = X509Certificate::from_der(der).ok()?;
    match c.public_key().parsed().ok()? {
        x509_parser::public_key::PublicKey::RSA(r) => Some(PublicKey::Rsa {
            modulus: r.modulus.to_vec(),
            exponent: r.exponent.to_vec(),
        }),
        x509_parser::public_key::PublicKey::EC(p) => Some(PublicKey::EcP256 {
            point: p.data().to_vec(),
        }),
        _ => None,
    }
}

fn sha1_id(pk: &PublicKey) -> Vec<u8> {
    let material = match pk {
        PublicKey::Rsa { modulus, .. } => {
            let i = modulus.iter().position(|b| *b != 0).unwrap_or(0);
            modulus[i..].to_vec()
        }
        PublicKey::EcP256 { point } => point.clone(),
    };
    aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA1_FOR_LEGACY_USE_ONLY, &material)
        .as_ref()
        .to_vec()
}

/// Total time of a report's steps.
pub fn total(report: &Report) -> StdDuration {
    StdDuration::from_secs_f64(report.steps.iter().map(|s| s.ms).sum::<f64>() / 1000.0)
}
