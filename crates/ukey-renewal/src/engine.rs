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
    InstalledRequest, IssueRequest, IssueResponse, KeyAlgorithm, KeyPolicy,
    KeyTransport as WireTransport, OrderTerms, RenewalStatus, SignatureAlgorithm, StatusRequest,
    challenge_signed_data, installed_signed_data, normalize_serial_hex,
};
use ukey_token::cryptoki::mechanism::MechanismType;
use ukey_token::{
    CertificateDetails, KeyAlg, KeyTransport, Module, ObjectKind, PublicKey, TokenSummary, Usage,
};
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::api::{Activation, KeyRef, PortalApi, SessionToken, TokenSide, TransportKey};
use crate::checks::{self, DecryptTest, Expectations, Role};
use crate::error::{Refusal, RenewalError};
use crate::events::{Event, Step};
use crate::journal::{
    ArchiveNames, IssuedCerts, Journal, JournalStore, KeyId, ObjectNames, OldObjects, Outcome,
    PendingId, StepState,
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

/// Which protocol the CA speaks.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Protocol {
    /// The portal's REST protocol: status, challenge, issue, installed.
    #[default]
    Rest,
    /// CMP (RFC 9483) at a URL, through [`PortalApi::cmp`].
    Cmp(CmpOptions),
}

/// A CMP renewal: what to ask the CA for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CmpOptions {
    /// The CA's CMP endpoint (recorded in the journal: a renewal resumes there).
    pub url: String,
    /// `kur`, or a `cr` for CAs without key update.
    pub request: ukey_cmp::RequestKind,
    /// A new key pair on the token, or the same key (a reissue).
    pub key_policy: KeyPolicy,
    /// How long one run polls a CA that answers "waiting" before it stops; the
    /// transaction waits in the journal and the next run asks again.
    pub wait: StdDuration,
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
    /// The CA's protocol.
    pub protocol: Protocol,
    /// The order's renewal code, as the holder typed it (when the portal asks for one).
    pub renewal_code: Option<String>,
    /// A preflight whose plan is shown before the holder is asked for the renewal code
    /// (the app asks for it beside the PIN): an order that needs a code is not refused
    /// for the lack of one here. The renewal itself still is.
    pub defer_renewal_code: bool,
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
            protocol: Protocol::Rest,
            renewal_code: None,
            defer_renewal_code: false,
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
        KeyAlgorithm::Sm2 => KeyAlg::Sm2,
    }
}

pub(crate) fn alg_of(details: &CertificateDetails) -> Option<KeyAlg> {
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
pub(crate) struct Candidate {
    pub(crate) der: Vec<u8>,
    pub(crate) details: CertificateDetails,
    pub(crate) key_id: Vec<u8>,
    pub(crate) label: String,
}

/// Checks everything that can be checked without the PIN and decides what to renew.
///
/// `cert_serial` selects a certificate when the token holds several with a ready order.
/// Resumes an unfinished journal of this token first. The concerns, in order: the PIN
/// state, an unfinished renewal, the certificates that could be renewed, what the
/// portal says of each, the one to renew, and the plan (algorithms, mechanisms,
/// notices, journal).
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
    check_pin_state(&token, opts)?;
    if let Some(plan) = unfinished(module, &token, want.as_deref(), opts)? {
        return Ok(plan);
    }
    let (candidates, encryption) = candidates(module, &token, want.as_deref())?;
    if let Protocol::Cmp(c) = &opts.protocol {
        return crate::cmp::plan(module, token, candidates, c, opts);
    }
    let answers = ask_portal(candidates, portal, opts)?;
    let (cand, order_id, terms) = choose(answers.ready, answers.blocker, &token, opts)?;
    let mut plan = plan(module, token, cand, encryption, &order_id, &terms, opts)?;
    plan.clock_skew_seconds = answers.skew;
    Ok(plan)
}

/// A locked PIN stops here; a last try only with the user's explicit consent.
fn check_pin_state(token: &TokenSummary, opts: &Options) -> Result<(), RenewalError> {
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
    Ok(())
}

/// An interrupted renewal of this token (of the wanted certificate) comes first. When
/// other keys report the same serial, a journal is this key's only if a certificate it
/// names (the old one, or the issued one) is on this key.
fn unfinished(
    module: &Module,
    token: &TokenSummary,
    want: Option<&str>,
    opts: &Options,
) -> Result<Option<Plan>, RenewalError> {
    let here: Option<Vec<Vec<u8>>> = token.serial_is_shared().then(|| {
        module
            .list_token(token, None)
            .certificates
            .into_iter()
            .map(|c| c.der)
            .collect()
    });
    let journal = opts
        .journals
        .for_token(&token.serial)?
        .into_iter()
        .filter(|j| j.is_unfinished())
        .filter(|j| {
            here.as_deref()
                .is_none_or(|ders| j.names_a_certificate_in(ders))
        })
        .find(|j| want.is_none_or(|w| w == j.old.serial));
    if let Some(j) = &journal {
        crate::cmp::same_protocol(j, opts)?;
    }
    Ok(journal.map(|journal| Plan {
        notices: vec![Notice::Resuming { step: journal.step }],
        token: token.clone(),
        journal,
        resuming: true,
        clock_skew_seconds: None,
    }))
}

/// The signing certificates that could be renewed (with their key, not a CA's, not
/// another renewal's pending objects), and the encryption certificates.
fn candidates(
    module: &Module,
    token: &TokenSummary,
    want: Option<&str>,
) -> Result<(Vec<Candidate>, Vec<Candidate>), RenewalError> {
    let listing = module.list_token(token, None);
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
        // A CA's certificate kept on the key is never the holder's; objects of another
        // renewal still pending are that renewal's.
        if d.is_ca || PendingId::parse(&c.key_id).is_some() {
            continue;
        }
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
        if want.is_some_and(|w| w != d.serial) {
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
    Ok((candidates, encryption))
}

/// What the portal said of the candidates.
struct Answers {
    /// Those with a ready (or issued) order.
    ready: Vec<(Candidate, String, OrderTerms)>,
    /// The most actionable reason the others cannot be renewed.
    blocker: Option<RenewalError>,
    /// Local clock minus the portal's, seconds.
    skew: Option<i64>,
}

/// Asks the portal about each candidate (and checks the clock against its Date).
fn ask_portal(
    candidates: Vec<Candidate>,
    portal: &dyn PortalApi,
    opts: &Options,
) -> Result<Answers, RenewalError> {
    let mut out = Answers {
        ready: Vec::new(),
        blocker: None,
        skew: None,
    };
    for cand in candidates {
        let answer = portal.status(&status_request(&cand.der)?)?;
        if let Some(date) = answer.server_date {
            let s = (OffsetDateTime::now_utc() - date).whole_seconds();
            out.skew = Some(s);
            if s.abs() > opts.max_clock_skew.whole_seconds() {
                return Err(RenewalError::ClockSkew { seconds: s });
            }
        }
        let serial = cand.details.serial.clone();
        let e = match answer.value {
            RenewalStatus::Ready {
                renewal_code_required: true,
                ..
            }
            | RenewalStatus::Issued {
                renewal_code_required: true,
                ..
            } if opts.renewal_code.is_none() && !opts.defer_renewal_code => {
                RenewalError::RenewalCodeNeeded { serial }
            }
            RenewalStatus::Ready {
                order_id, terms, ..
            }
            | RenewalStatus::Issued {
                order_id, terms, ..
            } => {
                out.ready.push((cand, order_id, terms));
                continue;
            }
            RenewalStatus::None => RenewalError::NoOrder { serial },
            RenewalStatus::AwaitingPayment { payment_url, .. } => RenewalError::AwaitingPayment {
                serial,
                payment_url,
            },
            RenewalStatus::Completed { .. } => RenewalError::AlreadyCompleted { serial },
            RenewalStatus::RequiresNewKey {
                tracking_number, ..
            } => RenewalError::NewKeyMailed { tracking_number },
            RenewalStatus::Rejected { reason, .. } => RenewalError::Rejected { reason },
            RenewalStatus::UnderReview { .. } => RenewalError::UnderReview {
                serial,
                reason: String::new(),
            },
        };
        // A user action outranks "nothing to do".
        let replace = match &out.blocker {
            None => true,
            Some(prev) => {
                prev.kind() == crate::error::ErrorKind::NothingToDo
                    && e.kind() != crate::error::ErrorKind::NothingToDo
            }
        };
        if replace {
            out.blocker = Some(e);
        }
    }
    Ok(out)
}

/// The one certificate to renew: exactly one ready; none is the blocker (said as
/// "already renewed" for a certificate a finished renewal wrote); several need
/// `--cert`.
fn choose(
    mut ready: Vec<(Candidate, String, OrderTerms)>,
    blocker: Option<RenewalError>,
    token: &TokenSummary,
    opts: &Options,
) -> Result<(Candidate, String, OrderTerms), RenewalError> {
    match ready.len() {
        0 => {
            if let Some(RenewalError::NoOrder { serial }) = &blocker {
                let renewed = opts
                    .journals
                    .for_token(&token.serial)?
                    .into_iter()
                    .filter(|j| j.outcome == Outcome::Completed)
                    .filter_map(|j| j.issued)
                    .find(|i| &i.serial == serial);
                if let Some(i) = renewed {
                    return Err(RenewalError::AlreadyRenewed {
                        serial: i.serial,
                        not_after: i.not_after,
                    });
                }
            }
            Err(blocker.unwrap_or_else(|| RenewalError::NoOrder {
                serial: String::new(),
            }))
        }
        1 => Ok(ready.remove(0)),
        _ => {
            let serials: Vec<String> = ready.iter().map(|r| r.0.details.serial.clone()).collect();
            Err(RenewalError::Selection(format!(
                "several certificates on token {} have a ready renewal ({}); choose one with --cert",
                token.serial,
                serials.join(", ")
            )))
        }
    }
}

/// The plan for the chosen certificate: algorithms, the mechanisms the token must
/// offer, the encryption certificate to archive, the notices, the journal.
pub(crate) fn plan(
    module: &Module,
    token: TokenSummary,
    cand: Candidate,
    encryption: Vec<Candidate>,
    order_id: &str,
    terms: &OrderTerms,
    opts: &Options,
) -> Result<Plan, RenewalError> {
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
    if token.is_skf() {
        check_skf(module, &token, old_alg, new_alg, terms)?;
    } else {
        check_mechanisms(module, &token, old_alg, new_alg, terms)?;
    }

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
        order_id,
        terms,
        old_alg,
        new_alg,
        opts,
    )?;
    Ok(Plan {
        token,
        journal,
        resuming: false,
        notices,
        clock_skew_seconds: None,
    })
}

/// What an SKF key can renew: SM2 to SM2, with a new key pair in a new container (an
/// SKF container cannot take a new certificate for its key without a window in which
/// the old certificate is gone and the new one not yet tested, nor an escrowed key
/// without overwriting the old one), and an escrowed key only where the library
/// imports envelopes.
fn check_skf(
    module: &Module,
    token: &TokenSummary,
    old_alg: KeyAlg,
    new_alg: KeyAlg,
    terms: &OrderTerms,
) -> Result<(), RenewalError> {
    let refuse = |what: &str, what_zh: &str| RenewalError::InterfaceUnsupported {
        token: token.serial.clone(),
        what: what.to_owned(),
        what_zh: what_zh.to_owned(),
    };
    if old_alg != KeyAlg::Sm2 {
        return Err(refuse(
            &format!(
                "its {} certificate's key is not used through SKF here (SM2 only)",
                old_alg.as_str()
            ),
            &format!(
                "该证书为 {}，本程序只通过 SKF 使用 SM2 密钥",
                old_alg.as_str()
            ),
        ));
    }
    if new_alg != KeyAlg::Sm2 {
        return Err(refuse(
            &format!(
                "the order asks for an {} key; SKF keys are renewed with SM2",
                new_alg.as_str()
            ),
            &format!("订单要求 {} 密钥，SKF 接口只支持 SM2", new_alg.as_str()),
        ));
    }
    if terms.key_policy == KeyPolicy::Same {
        return Err(refuse(
            "the order keeps the key pair; an SKF key is renewed with a new key pair in a new container",
            "订单要求保留原密钥对，SKF 接口的续期须在新容器中生成新密钥对",
        ));
    }
    let missing = module
        .skf()
        .map(|b| b.missing_for_renewal(terms.with_encryption_cert))
        .unwrap_or_default();
    if let Some(missing) = missing.first() {
        return Err(RenewalError::MechanismMissing {
            token: token.serial.clone(),
            mechanism: (*missing).to_owned(),
        });
    }
    Ok(())
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
    let sm2 = session.sm2_profile();
    // SM2 goes through a vendor profile; without one the module's SM2 is unknown.
    let mechanism = |m: Option<MechanismType>| {
        m.ok_or_else(|| RenewalError::MechanismMissing {
            token: token.serial.clone(),
            mechanism: "SM2 (no mechanism profile for this module: see README, 国密)".into(),
        })
    };
    let mut need = vec![
        mechanism(old_alg.sign_mechanism(sm2.as_ref()))?,
        mechanism(new_alg.sign_mechanism(sm2.as_ref()))?,
    ];
    let keygen = mechanism(new_alg.keygen_mechanism(sm2.as_ref()))?;
    if terms.key_policy == KeyPolicy::New {
        need.push(keygen);
    }
    let generates = terms.key_policy == KeyPolicy::New || terms.with_encryption_cert;
    if generates && have.contains(&keygen) {
        // Chips generate keys of a few sizes only: 2048-bit RSA (or a 256-bit curve)
        // must be among them, else say which sizes the key offers.
        let bits = match new_alg {
            KeyAlg::Rsa2048 => 2048,
            KeyAlg::EcP256 | KeyAlg::Sm2 => 256,
        };
        if let Some((min, max)) = session.key_sizes(keygen)? {
            let max = if max == 0 { usize::MAX } else { max };
            if !(min..=max).contains(&bits) {
                return Err(RenewalError::KeySizeUnsupported {
                    token: token.serial.clone(),
                    algorithm: new_alg.as_str().to_owned(),
                    bits,
                    min,
                    max,
                });
            }
        }
    }
    if terms.with_encryption_cert {
        match new_alg {
            KeyAlg::Rsa2048 => need.extend([
                MechanismType::AES_KEY_WRAP_PAD,
                MechanismType::RSA_PKCS_OAEP,
            ]),
            KeyAlg::EcP256 => {
                need.extend([MechanismType::AES_KEY_WRAP_PAD, MechanismType::ECDH1_DERIVE])
            }
            // A GM/T 0009 envelope: SM2 decryption of the SM4 key, SM4-ECB of the
            // private key.
            KeyAlg::Sm2 => {
                let p = sm2.as_ref().filter(|p| p.can_import_envelope());
                need.push(mechanism(
                    p.and_then(|p| p.sm2_decrypt)
                        .and_then(ukey_token::keys::vendor),
                )?);
                need.push(mechanism(
                    p.and_then(|p| p.sm4_ecb).and_then(ukey_token::keys::vendor),
                )?);
            }
        }
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
) -> Result<Journal, RenewalError> {
    let rid = random_hex(6);
    let id_of = |c: &Candidate| {
        KeyId::new(c.key_id.clone()).ok_or_else(|| {
            RenewalError::Inconsistent(format!(
                "certificate {} has no CKA_ID, so its key cannot be told apart",
                c.details.serial
            ))
        })
    };
    let old = OldObjects {
        serial: cand.details.serial.clone(),
        cert_der_hex: hex::encode(&cand.der),
        id: id_of(cand)?,
        label: cand.label.clone(),
        alg: old_alg,
    };
    let old_encryption = match old_enc {
        Some(e) => alg_of(&e.details)
            .map(|alg| {
                Ok::<_, RenewalError>(OldObjects {
                    serial: e.details.serial.clone(),
                    cert_der_hex: hex::encode(&e.der),
                    id: id_of(e)?,
                    label: e.label.clone(),
                    alg,
                })
            })
            .transpose()?,
        None => None,
    };
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
    // SKF: the new pairs' container is final from the start (containers cannot be
    // renamed); the old one is retired at activation.
    let skf_container = token
        .is_skf()
        .then(|| KeyId::new(crate::skf::container_name(&rid).into_bytes()))
        .flatten();
    let signing = ObjectNames {
        pending_id: PendingId::new(&rid, "sig"),
        pending_label: format!("{PENDING_LABEL_PREFIX}{rid} sig"),
        // Filled in at verify for the SHA-1 scheme.
        final_id: skf_container.clone().unwrap_or_else(|| old.id.clone()),
        final_label: sig_label,
    };
    let encryption = terms.with_encryption_cert.then(|| ObjectNames {
        pending_id: PendingId::new(&rid, "enc"),
        pending_label: format!("{PENDING_LABEL_PREFIX}{rid} enc"),
        final_id: match (&skf_container, &old_encryption) {
            (Some(c), _) => c.clone(),
            (None, Some(e)) => e.id.clone(),
            (None, None) => KeyId::new([cand.key_id.as_slice(), b"-enc"].concat())
                .unwrap_or_else(|| old.id.clone()),
        },
        final_label: enc_label,
    });
    let today = OffsetDateTime::now_utc().date();
    let archive = match (&encryption, &old_encryption) {
        // SKF: the old container, which holds the old encryption pair, is the archive.
        (Some(_), Some(e)) if token.is_skf() => Some(ArchiveNames {
            id: e.id.clone(),
            label: format!("archived {} {today}", e.serial),
        }),
        (Some(_), Some(e)) => {
            KeyId::new(format!("archived {}", e.serial).into_bytes()).map(|id| ArchiveNames {
                id,
                label: format!("archived {} {today}", e.serial),
            })
        }
        _ => None,
    };
    Ok(Journal {
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
        cmp: None,
    })
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
    if let Some(skf) = module.skf() {
        let token = crate::skf::SkfToken::open(skf, &plan.token)?;
        return run(&token, plan, pin, portal, opts, on_event);
    }
    let token = SessionToken::open(module, &plan.token)?;
    run(&token, plan, pin, portal, opts, on_event)
}

/// Runs a planned renewal on an open session.
pub fn run(
    token: &dyn TokenSide,
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
    // From here on the journal holds the verified certificates: activation and the
    // confirmation work from them alone.
    let issued = r.issued()?;
    if r.j.step < Step::Activate || (r.j.step == Step::Activate && r.j.state == StepState::Started)
    {
        r.step(Step::Activate, |r| r.activate(&issued))?;
    } else {
        r.skip(Step::Activate);
    }
    if r.j.cmp.is_some() {
        // Confirmed to the CA (certConf) before activation.
        r.skip(Step::Installed);
    } else {
        r.step(Step::Installed, |r| r.installed(&issued))?;
    }
    r.j.outcome = Outcome::Completed;
    r.opts.journals.save(&r.j)?;
    Ok(Report {
        status: "renewed",
        token_serial: r.j.token_serial.clone(),
        old_serial: r.j.old.serial.clone(),
        new_serial: issued.record.serial.clone(),
        not_after: issued.record.not_after,
        encryption_serial: issued.record.enc_serial.clone(),
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

/// The activation sub-steps, in order. Each is recorded in the journal when done
/// (`activate_done` holds the number of the last), so that a resumed run never
/// repeats one whose effect would now hit the new objects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum ActivationStep {
    /// The old encryption certificate and its decryption key move to the archive id.
    ArchiveOldEncryption = 1,
    /// New key: the old signing certificate and key pair go. Same key: the new
    /// certificate takes the key's id.
    RemoveOldSigning = 2,
    /// New key: the new certificate and key pair take the final id. Same key: the old
    /// certificate goes.
    ActivateNewSigning = 3,
    /// The new encryption certificate and key take their final id.
    ActivateNewEncryption = 4,
}

impl ActivationStep {
    /// Every sub-step, in order.
    pub const ALL: [ActivationStep; 4] = [
        ActivationStep::ArchiveOldEncryption,
        ActivationStep::RemoveOldSigning,
        ActivationStep::ActivateNewSigning,
        ActivationStep::ActivateNewEncryption,
    ];

    /// Its number in the journal and in fail points (`activate.<n>`).
    pub fn number(self) -> u32 {
        self as u32
    }
}

/// The portal's answer to the issue request, with the transport key the request named
/// (when an encryption certificate comes: its envelope is addressed to that key).
pub(crate) struct Requested {
    pub(crate) issued: IssueResponse,
    pub(crate) transport: Option<TransportKey>,
}

/// A certificate the portal issued that passed every check, with the keys it names.
struct Verified {
    issued: IssueResponse,
    /// The new signing key (pending, or the old key for a same-key renewal).
    key: KeyRef,
    /// The escrowed encryption key, under its pending id, and the transport key its
    /// envelope is addressed to (taken and destroyed once the key is on the token).
    encryption: Option<(KeyRef, Option<TransportKey>)>,
}

/// What activation and the confirmation work from: the journal's verified record.
struct Issued {
    record: IssuedCerts,
    cert_der: Vec<u8>,
    public: PublicKey,
}

pub(crate) struct Run<'a> {
    pub(crate) token: &'a dyn TokenSide,
    pub(crate) portal: &'a dyn PortalApi,
    pub(crate) opts: &'a Options,
    pub(crate) j: Journal,
    pub(crate) on_event: &'a mut dyn FnMut(Event),
    pub(crate) timings: Vec<StepTiming>,
}

/// The DER of a certificate the journal holds as hex. The engine wrote it; a damaged
/// value is an error, never an empty certificate.
pub(crate) fn der_of(hex_der: &str) -> Result<Vec<u8>, RenewalError> {
    hex::decode(hex_der)
        .ok()
        .filter(|d| !d.is_empty())
        .ok_or_else(|| RenewalError::Inconsistent("a certificate in the journal is damaged".into()))
}

impl Run<'_> {
    pub(crate) fn save(&self) -> Result<(), RenewalError> {
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

    /// Removes the pending objects of renewals nobody will finish: no unfinished
    /// journal of this user owns them, the token carries no activation marker for
    /// them (the key may have travelled from another user or machine mid-activation),
    /// and they do not hold a complete certificate + key pair (which may be the only
    /// working key of a renewal run elsewhere). Only pending ids are used.
    fn cleanup_abandoned(&mut self) -> Result<(), RenewalError> {
        let mut keep: Vec<String> = self
            .opts
            .journals
            .for_token(&self.j.token_serial)?
            .into_iter()
            .filter(|j| j.is_unfinished())
            .map(|j| j.renewal_id)
            .collect();
        keep.extend(self.token.activations()?);
        let mut groups: std::collections::BTreeMap<String, Vec<(ObjectKind, PendingId)>> =
            std::collections::BTreeMap::new();
        for o in self.token.objects()? {
            let Some(id) = hex::decode(&o.id_hex)
                .ok()
                .and_then(|b| PendingId::parse(&b))
            else {
                continue;
            };
            if matches!(o.kind, ObjectKind::Data | ObjectKind::SecretKey) {
                continue;
            }
            groups
                .entry(id.renewal_id().to_owned())
                .or_default()
                .push((o.kind, id));
        }
        let mut n = 0;
        for (rid, objects) in groups {
            if keep.contains(&rid) {
                continue;
            }
            let complete = objects.iter().any(|(k, id)| {
                *k == ObjectKind::Certificate
                    && objects
                        .iter()
                        .any(|(k2, id2)| *k2 == ObjectKind::PrivateKey && id2 == id)
            });
            if complete {
                tracing::info!(
                    renewal = rid,
                    "pending objects hold a complete certificate and key: kept"
                );
                continue;
            }
            let mut seen = std::collections::BTreeSet::new();
            for (kind, id) in objects {
                if seen.insert((kind, id.as_bytes().to_vec())) {
                    n += self.token.destroy_pending(kind, &id)?;
                }
            }
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

    pub(crate) fn old_cert(&self) -> Result<Vec<u8>, RenewalError> {
        der_of(&self.j.old.cert_der_hex)
    }

    /// The key of the certificate being renewed.
    pub(crate) fn old_key(&self) -> Result<KeyRef, RenewalError> {
        Ok(KeyRef::of_certificate(
            self.j.old.id.as_bytes(),
            &self.old_cert()?,
        )?)
    }

    /// The new signing key before activation: the pending pair, or the old key.
    pub(crate) fn new_key(&self, public: PublicKey) -> Result<KeyRef, RenewalError> {
        Ok(match self.j.key_policy {
            KeyPolicy::New => KeyRef {
                id: self.j.signing.pending_id.as_bytes().to_vec(),
                public,
            },
            KeyPolicy::Same => self.old_key()?,
        })
    }

    fn before_activation(&mut self) -> Result<(), RenewalError> {
        let public = self.step(Step::Key, |r| r.key())?;
        let requested = self.step(Step::Request, |r| r.request(&public))?;
        let mut verified = self.step(Step::Verify, |r| r.verify(requested, public))?;
        self.step(Step::Write, |r| r.write(&mut verified))?;
        self.step(Step::SelfTest, |r| r.self_test(&verified))?;
        self.probe_activation(&verified)?;
        // CMP: the certificate is confirmed (certConf) once written and tested, and
        // before activation: protected by the old key, which activation may remove.
        if self.j.cmp.is_some() {
            self.confirm_cmp()?;
        }
        Ok(())
    }

    /// The new signing key's public key: generated on the token (new key) or the old
    /// certificate's (same key; a token may keep no public key object).
    fn key(&mut self) -> Result<PublicKey, RenewalError> {
        let old = self.old_key()?;
        if !self.token.has_private_key(&old)? {
            return Err(RenewalError::KeyMissing {
                serial: self.j.old.serial.clone(),
            });
        }
        if self.j.key_policy == KeyPolicy::Same {
            return Ok(old.public);
        }
        let id = self.j.signing.pending_id.clone();
        let has_private = self.token.pending_count(ObjectKind::PrivateKey, &id)? > 0;
        match (has_private, self.token.pending_public_key(&id)?) {
            (true, Some(pk)) => return Ok(pk),
            (false, None) => {}
            // Half a key pair from an interrupted generation: start over.
            _ => {
                self.token.destroy_pending(ObjectKind::PrivateKey, &id)?;
                self.token.destroy_pending(ObjectKind::PublicKey, &id)?;
            }
        }
        self.token
            .generate_key_pair(self.j.new_alg, &id, &self.j.signing.pending_label)?;
        self.token
            .pending_public_key(&id)?
            .ok_or_else(|| RenewalError::KeyMissing {
                serial: self.j.old.serial.clone(),
            })
    }

    fn request(&mut self, public: &PublicKey) -> Result<Requested, RenewalError> {
        if self.j.cmp.is_some() {
            return self.request_cmp(public);
        }
        let old_der = self.old_cert()?;
        let new_key = self.new_key(public.clone())?;
        let mut params = rcgen::CertificateParams::default();
        params.distinguished_name =
            checks::subject_of(&old_der).map_err(RenewalError::Inconsistent)?;
        let csr_der = self.token.csr(&new_key, &params)?;
        // The escrowed encryption key goes to a key made for it in this run, never to
        // the signing key (which only signs); except an SM2 one, which GM/T 0092
        // envelopes to the new signing key (which may unwrap, never decrypt data).
        let transport = match self.j.encryption {
            Some(_) if self.j.new_alg != KeyAlg::Sm2 => {
                Some(self.token.generate_transport_key(self.j.new_alg)?)
            }
            _ => None,
        };
        let transport_spki = transport.as_ref().map(|t| t.public.spki());
        let challenge = self.portal.challenge(&self.j.order_id)?.value;
        let data = challenge_signed_data(
            &self.j.order_id,
            &challenge.nonce,
            &csr_der,
            transport_spki.as_deref(),
        );
        let signature = self.token.sign(&self.old_key()?, &data)?;
        let req = IssueRequest {
            challenge_id: challenge.challenge_id,
            challenge_signature: signature,
            signature_algorithm: sig_alg(self.j.old.alg),
            old_certificate_der: old_der,
            csr_der,
            transport_key_spki: transport_spki,
            renewal_code: self.opts.renewal_code.clone(),
        };
        Ok(Requested {
            issued: self.portal.issue(&self.j.order_id, &req)?.value,
            transport,
        })
    }

    fn verify(
        &mut self,
        requested: Requested,
        public: PublicKey,
    ) -> Result<Verified, RenewalError> {
        let Requested { issued, transport } = requested;
        let old_der = self.old_cert()?;
        let now = OffsetDateTime::now_utc();
        let x = Expectations {
            old_der: &old_der,
            public_key: Some(&public),
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
        let mut encryption = None;
        match (&issued.encryption, &self.j.encryption) {
            (Some(enc), Some(names)) => {
                let x = Expectations {
                    public_key: None,
                    role: Role::Encryption,
                    ..x
                };
                checks::check_issued(&enc.certificate_der, &x).map_err(RenewalError::Refused)?;
                let enc_public =
                    PublicKey::from_certificate(&enc.certificate_der).map_err(|e| {
                        RenewalError::Refused(Refusal::Encryption(format!(
                            "the encryption certificate's key: {e}"
                        )))
                    })?;
                let transport = if let PublicKey::Sm2 { point } = &enc_public {
                    check_gm_envelope(enc.gm_enveloped_key.as_deref(), point)?;
                    None
                } else {
                    let Some(transport) = transport else {
                        return Err(RenewalError::Inconsistent(
                            "an encryption certificate came without a transport key asked for"
                                .into(),
                        ));
                    };
                    let envelope = enc.envelope.as_ref().ok_or_else(|| {
                        RenewalError::Refused(Refusal::Encryption(
                            "the encryption certificate came without its key envelope".into(),
                        ))
                    })?;
                    let spki_hash = aws_lc_rs::digest::digest(
                        &aws_lc_rs::digest::SHA256,
                        &transport.public.spki(),
                    );
                    if envelope.recipient_spki_sha256 != spki_hash.as_ref() {
                        return Err(RenewalError::Refused(Refusal::Encryption(
                            "the key envelope is addressed to another key".into(),
                        )));
                    }
                    let want_alg = matches!(
                        (&envelope.private_key_algorithm, &enc_public),
                        (KeyAlgorithm::Rsa2048, PublicKey::Rsa { .. })
                            | (KeyAlgorithm::EcP256, PublicKey::EcP256 { .. })
                    );
                    if !want_alg {
                        return Err(RenewalError::Refused(Refusal::Encryption(
                            "the escrowed key's algorithm does not match its certificate".into(),
                        )));
                    }
                    check_envelope(envelope, &transport.public)?;
                    Some(transport)
                };
                enc_serial = Some(serial_of(&enc.certificate_der)?);
                enc_der = Some(hex::encode(&enc.certificate_der));
                encryption = Some((
                    KeyRef {
                        id: names.pending_id.as_bytes().to_vec(),
                        public: enc_public,
                    },
                    transport,
                ));
            }
            (None, Some(_)) => {
                return Err(RenewalError::Refused(Refusal::Encryption(
                    "the order includes an encryption certificate but none came".into(),
                )));
            }
            (_, None) => {}
        }
        if self.opts.key_ids == KeyIdScheme::Sha1OfPublicKey
            && self.token.activation() == Activation::Objects
        {
            if let Some(id) = KeyId::new(sha1_id(&public)) {
                self.j.signing.final_id = id;
            }
            if let (Some(names), Some((enc, _))) = (self.j.encryption.as_mut(), &encryption) {
                if let Some(id) = KeyId::new(sha1_id(&enc.public)) {
                    names.final_id = id;
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
        Ok(Verified {
            key: self.new_key(public)?,
            issued,
            encryption,
        })
    }

    fn write(&mut self, v: &mut Verified) -> Result<(), RenewalError> {
        let issued = &v.issued;
        let sig_pending = self.j.signing.pending_id.clone();
        if !self.token.has_certificate(&issued.certificate_der, None)? {
            self.token.write_certificate(
                &issued.certificate_der,
                sig_pending.as_bytes(),
                &self.j.signing.pending_label,
            )?;
        }
        failpoint("write.cert", "after");
        if let (Some(enc), Some(names), Some((enc_key, transport_key))) = (
            &issued.encryption,
            self.j.encryption.clone(),
            &mut v.encryption,
        ) {
            let has_key = self
                .token
                .pending_count(ObjectKind::PrivateKey, &names.pending_id)?
                > 0;
            if has_key && !self.token.has_private_key(enc_key)? {
                // Something else sits under our pending id: not the escrowed key.
                return Err(RenewalError::Inconsistent(
                    "a pending encryption key on the token is not the escrowed key".into(),
                ));
            }
            if !has_key && matches!(enc_key.public, PublicKey::Sm2 { .. }) {
                let der = enc
                    .gm_enveloped_key
                    .as_deref()
                    .ok_or_else(|| RenewalError::Inconsistent("the SM2 envelope is gone".into()))?;
                let envelope = ukey_portal_api::gm::Sm2EnvelopedKey::from_der(der)
                    .map_err(|e| RenewalError::Inconsistent(format!("the SM2 envelope: {e}")))?;
                self.token.unwrap_sm2_envelope(
                    &v.key,
                    &envelope,
                    &names.pending_id,
                    &names.pending_label,
                )?;
            } else if !has_key {
                let envelope = enc
                    .envelope
                    .as_ref()
                    .ok_or_else(|| RenewalError::Inconsistent("the key envelope is gone".into()))?;
                let transport = match &envelope.key_transport {
                    WireTransport::RsaOaepSha1 { wrapped_key } => {
                        KeyTransport::RsaOaepSha1 { wrapped_key }
                    }
                    WireTransport::EcdhP256 {
                        ephemeral_public_key,
                    } => KeyTransport::EcdhP256 {
                        ephemeral_public_key,
                    },
                };
                let recipient = transport_key.as_ref().ok_or_else(|| {
                    RenewalError::Inconsistent("the transport key was used already".into())
                })?;
                self.token.unwrap_escrowed_key(
                    recipient,
                    &transport,
                    &envelope.wrapped_private_key,
                    key_alg(envelope.private_key_algorithm),
                    &names.pending_id,
                    &names.pending_label,
                )?;
            }
            // Its job is done (it also goes with the session).
            if let Some(t) = transport_key.take() {
                if let Err(e) = self.token.destroy_transport_key(t) {
                    tracing::debug!("destroying the transport key: {e}");
                }
            }
            failpoint("write.unwrap", "after");
            if !self.token.has_certificate(&enc.certificate_der, None)? {
                self.token.write_certificate(
                    &enc.certificate_der,
                    names.pending_id.as_bytes(),
                    &names.pending_label,
                )?;
            }
        }
        Ok(())
    }

    fn self_test(&mut self, v: &Verified) -> Result<(), RenewalError> {
        let data = format!("ukey-renew self-test {}", random_hex(16)).into_bytes();
        let sig = self.token.sign(&v.key, &data)?;
        checks::verify_with_certificate(&v.issued.certificate_der, &data, &sig)
            .map_err(RenewalError::SelfTest)?;
        if let (Some(enc), Some((enc_key, _))) = (&v.issued.encryption, &v.encryption) {
            match checks::decrypt_test(&enc.certificate_der).map_err(RenewalError::SelfTest)? {
                DecryptTest::Rsa {
                    ciphertext,
                    plaintext,
                } => {
                    let got = self.token.decrypt_rsa_oaep(enc_key, &ciphertext)?;
                    if got != plaintext {
                        return Err(RenewalError::SelfTest(
                            "the new encryption key does not decrypt what is encrypted to its certificate".into(),
                        ));
                    }
                }
                // The token side proves it: PKCS#11 decrypts a test message, an SKF
                // key (which decrypts only session keys) imports one.
                DecryptTest::Sm2 { .. } => {
                    if !self.token.sm2_decrypts(enc_key)? {
                        return Err(RenewalError::SelfTest(
                            "the new SM2 encryption key does not decrypt what is encrypted to its certificate".into(),
                        ));
                    }
                }
                DecryptTest::Ec { peer_point, shared } => {
                    let got = self.token.ecdh(enc_key, &peer_point)?;
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

    /// Before the first change activation makes: every object whose CKA_ID or label it
    /// changes must be modifiable, else refuse now (the renewal rolls back) rather than
    /// stop half-way through.
    fn probe_activation(&mut self, v: &Verified) -> Result<(), RenewalError> {
        let old = self.old_key()?;
        let old_der = self.old_cert()?;
        let mut keys: Vec<&KeyRef> = vec![&v.key];
        let mut certs: Vec<&[u8]> = vec![&v.issued.certificate_der];
        let old_enc = match (&self.j.archive, &self.j.old_encryption) {
            (Some(_), Some(e)) => {
                let der = der_of(&e.cert_der_hex)?;
                Some((KeyRef::of_certificate(e.id.as_bytes(), &der)?, der))
            }
            _ => None,
        };
        if let Some((k, der)) = &old_enc {
            keys.push(k);
            certs.push(der);
        }
        if self.j.key_policy == KeyPolicy::Same && old.id != self.j.signing.final_id.as_bytes() {
            certs.push(&old_der);
        }
        if let (Some((k, _)), Some(enc)) = (&v.encryption, &v.issued.encryption) {
            keys.push(k);
            certs.push(&enc.certificate_der);
        }
        let stuck = self.token.unmodifiable(&keys, &certs)?;
        if stuck.is_empty() {
            Ok(())
        } else {
            Err(RenewalError::ReadOnlyObjects { objects: stuck })
        }
    }

    /// The journal's verified certificates, for activation and the confirmation.
    fn issued(&self) -> Result<Issued, RenewalError> {
        let record = self.j.issued.clone().ok_or_else(|| {
            RenewalError::Inconsistent("the journal holds no verified certificate".into())
        })?;
        let cert_der = der_of(&record.cert_der_hex)?;
        let public = PublicKey::from_certificate(&cert_der)?;
        // A damaged encryption certificate in the journal stops here, before activation
        // moves anything.
        record.enc_cert_der_hex.as_deref().map(der_of).transpose()?;
        Ok(Issued {
            record,
            cert_der,
            public,
        })
    }

    /// Activation: marked on the token, then the four sub-steps, then unmarked.
    fn activate(&mut self, issued: &Issued) -> Result<(), RenewalError> {
        self.token.mark_activation(&self.j.renewal_id)?;
        for a in ActivationStep::ALL {
            if self.j.activate_done >= a.number() {
                continue;
            }
            let point = format!("activate.{}", a.number());
            failpoint(&point, "before");
            match (self.token.activation(), a) {
                (Activation::Objects, ActivationStep::ArchiveOldEncryption) => {
                    self.archive_old_encryption()?
                }
                (Activation::Objects, ActivationStep::RemoveOldSigning) => {
                    self.remove_old_signing()?
                }
                (Activation::Objects, ActivationStep::ActivateNewSigning) => {
                    self.activate_new_signing(issued)?
                }
                (Activation::Objects, ActivationStep::ActivateNewEncryption) => {
                    self.activate_new_encryption()?
                }
                // SKF: the new container is complete since `write`; the old one goes
                // unless it keeps the old encryption key (it is then the archive).
                (Activation::Containers, ActivationStep::RemoveOldSigning) => {
                    let old = self.old_key()?;
                    self.token.retire_old(&old)?;
                }
                (Activation::Containers, _) => {}
            }
            failpoint(&point, "after");
            self.j.activate_done = a.number();
            self.save()?;
        }
        self.token.unmark_activation(&self.j.renewal_id)?;
        Ok(())
    }

    fn archive_old_encryption(&mut self) -> Result<(), RenewalError> {
        if let (Some(a), Some(e)) = (self.j.archive.clone(), self.j.old_encryption.clone()) {
            let der = der_of(&e.cert_der_hex)?;
            let key = KeyRef::of_certificate(e.id.as_bytes(), &der)?;
            self.token
                .relabel_key_pair(&key, a.id.as_bytes(), &a.label)?;
            self.token
                .relabel_certificate(&der, a.id.as_bytes(), &a.label)?;
        }
        Ok(())
    }

    /// New key: the old signing certificate and key pair go (the new pair, still under
    /// its pending id, works meanwhile). Same key: the new certificate takes the key's
    /// id first, so that the key is never without a certificate.
    fn remove_old_signing(&mut self) -> Result<(), RenewalError> {
        match self.j.key_policy {
            KeyPolicy::New => {
                let old = self.old_key()?;
                self.token.destroy_certificate(&self.old_cert()?, None)?;
                self.token.destroy_key_pair(&old)?;
            }
            KeyPolicy::Same => {
                let n = self.j.signing.clone();
                self.token.relabel_pending(
                    ObjectKind::Certificate,
                    &n.pending_id,
                    self.j.old.id.as_bytes(),
                    &n.final_label,
                )?;
            }
        }
        Ok(())
    }

    /// New key: a copy of the new certificate under the final id, then the key pair
    /// moves to it, then the pending copy goes: at every moment one certificate and
    /// key pair share an id. Same key: the old certificate goes.
    fn activate_new_signing(&mut self, issued: &Issued) -> Result<(), RenewalError> {
        let n = self.j.signing.clone();
        let to = n.final_id.as_bytes();
        match self.j.key_policy {
            KeyPolicy::New => {
                if !self.token.has_certificate(&issued.cert_der, Some(to))? {
                    self.token
                        .write_certificate(&issued.cert_der, to, &n.final_label)?;
                }
                for kind in [ObjectKind::PrivateKey, ObjectKind::PublicKey] {
                    self.token
                        .relabel_pending(kind, &n.pending_id, to, &n.final_label)?;
                }
                self.token
                    .destroy_certificate(&issued.cert_der, Some(n.pending_id.as_bytes()))?;
            }
            KeyPolicy::Same => {
                self.token.destroy_certificate(&self.old_cert()?, None)?;
                // The kept key and its certificate follow the id scheme.
                if self.j.old.id != n.final_id {
                    let old = self.old_key()?;
                    self.token.relabel_key_pair(&old, to, &n.final_label)?;
                    self.token
                        .relabel_certificate(&issued.cert_der, to, &n.final_label)?;
                }
            }
        }
        Ok(())
    }

    fn activate_new_encryption(&mut self) -> Result<(), RenewalError> {
        if let Some(n) = self.j.encryption.clone() {
            let to = n.final_id.as_bytes();
            for kind in [ObjectKind::Certificate, ObjectKind::PrivateKey] {
                self.token
                    .relabel_pending(kind, &n.pending_id, to, &n.final_label)?;
            }
        }
        Ok(())
    }

    fn installed(&mut self, issued: &Issued) -> Result<(), RenewalError> {
        let key = KeyRef {
            id: self.j.signing.final_id.as_bytes().to_vec(),
            public: issued.public.clone(),
        };
        let data = installed_signed_data(&self.j.order_id, &issued.record.serial);
        let signature = self.token.sign(&key, &data)?;
        self.portal.installed(
            &self.j.order_id,
            &InstalledRequest {
                certificate_serial_hex: issued.record.serial.clone(),
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
        let sig = self.j.signing.pending_id.clone();
        self.token.destroy_pending(ObjectKind::Certificate, &sig)?;
        if self.j.key_policy == KeyPolicy::New {
            self.token.destroy_pending(ObjectKind::PrivateKey, &sig)?;
            self.token.destroy_pending(ObjectKind::PublicKey, &sig)?;
        }
        if let Some(n) = &self.j.encryption {
            self.token
                .destroy_pending(ObjectKind::Certificate, &n.pending_id)?;
            self.token
                .destroy_pending(ObjectKind::PrivateKey, &n.pending_id)?;
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
    if journal.activation_begun() {
        return Err(RenewalError::Inconsistent(
            "activation has begun; the renewal can only be finished".into(),
        ));
    }
    let skf;
    let p11;
    let t: &dyn TokenSide = match module.skf() {
        Some(b) => {
            skf = crate::skf::SkfToken::open(b, token)?;
            &skf
        }
        None => {
            p11 = SessionToken::open(module, token)?;
            &p11
        }
    };
    t.login(pin)?;
    let mut noop = |_e: Event| {};
    let mut r = Run {
        token: t,
        portal: &NoPortal,
        opts,
        j: journal,
        on_event: &mut noop,
        timings: Vec::new(),
    };
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
    fn cmp(
        &self,
        _: &[u8],
    ) -> Result<ukey_portal_client::Answer<Vec<u8>>, ukey_portal_client::ClientError> {
        Err(no_portal())
    }
}
fn no_portal() -> ukey_portal_client::ClientError {
    ukey_portal_client::ClientError::Transport {
        url: String::new(),
        reason: "no portal during rollback".into(),
    }
}

/// The envelope's fields are the ones this client opens: version 1, AES-256 key wrap
/// with padding around a PKCS#8 key, and a key transport that fits the recipient (the
/// transport key) — RSA-OAEP to an RSA key, or ECDH on P-256 to an EC key with an
/// ephemeral point that is on the curve (checked here, before it reaches the token).
fn check_envelope(
    envelope: &ukey_portal_api::KeyEnvelope,
    recipient: &PublicKey,
) -> Result<(), RenewalError> {
    let refuse = |why: String| Err(RenewalError::Refused(Refusal::Encryption(why)));
    if envelope.version != 1 {
        return refuse(format!("envelope version {} is not 1", envelope.version));
    }
    if envelope.content_wrap != ukey_portal_api::CONTENT_WRAP_AES256_KWP {
        return refuse(format!("content wrap {:?}", envelope.content_wrap));
    }
    if envelope.private_key_format != ukey_portal_api::PRIVATE_KEY_FORMAT_PKCS8 {
        return refuse(format!(
            "private key format {:?}",
            envelope.private_key_format
        ));
    }
    match (&envelope.key_transport, recipient) {
        (WireTransport::RsaOaepSha1 { .. }, PublicKey::Rsa { .. }) => Ok(()),
        (
            WireTransport::EcdhP256 {
                ephemeral_public_key,
            },
            PublicKey::EcP256 { .. },
        ) => {
            if checks::ecdh_test(ephemeral_public_key).is_err() {
                return refuse("the ephemeral ECDH point is not on P-256".into());
            }
            Ok(())
        }
        (t, _) => refuse(format!(
            "key transport {} does not fit the recipient key",
            match t {
                WireTransport::RsaOaepSha1 { .. } => "rsa_oaep_sha1",
                WireTransport::EcdhP256 { .. } => "ecdh_p256",
            }
        )),
    }
}

/// An SM2 encryption certificate's GM/T 0009 envelope, checked before anything is
/// written: present, well-formed, SM4-ECB, holding the certificate's key, with an
/// `SM2Cipher` and a 32- or 64-byte encrypted private key. (Whom it is encrypted to
/// shows only on the token: a wrong recipient fails the unwrap, nothing written.)
fn check_gm_envelope(der: Option<&[u8]>, cert_point: &[u8]) -> Result<(), RenewalError> {
    let refuse = |m: String| RenewalError::Refused(Refusal::Encryption(m));
    let der = der.ok_or_else(|| {
        refuse("the SM2 encryption certificate came without its GM/T 0009 envelope".into())
    })?;
    let e = ukey_portal_api::gm::Sm2EnvelopedKey::from_der(der).map_err(|e| {
        refuse(format!(
            "the SM2 envelope is not a GM/T 0009 SM2EnvelopedKey: {e}"
        ))
    })?;
    if e.sym_alg != ukey_portal_api::gm::SM4_ECB {
        return Err(refuse(format!(
            "the SM2 envelope uses {}, not SM4-ECB",
            e.sym_alg
        )));
    }
    if e.public_key != cert_point {
        return Err(refuse(
            "the SM2 envelope holds another key than the encryption certificate's".into(),
        ));
    }
    if !matches!(e.encrypted_private_key.len(), 32 | 64) {
        return Err(refuse(format!(
            "the SM2 envelope's private key is {} bytes, not 32 or 64",
            e.encrypted_private_key.len()
        )));
    }
    Ok(())
}

fn sig_alg(a: KeyAlg) -> SignatureAlgorithm {
    match a {
        KeyAlg::Rsa2048 => SignatureAlgorithm::RsaPkcs1Sha256,
        KeyAlg::EcP256 => SignatureAlgorithm::EcdsaP256Sha256,
        KeyAlg::Sm2 => SignatureAlgorithm::Sm2Sm3,
    }
}

pub(crate) fn serial_of(der: &[u8]) -> Result<String, RenewalError> {
    let (_, c) = X509Certificate::from_der(der)
        .map_err(|e| RenewalError::Refused(Refusal::Malformed(e.to_string())))?;
    Ok(ukey_portal_api::serial_hex_from_bytes(c.raw_serial()))
}

fn sha1_id(pk: &PublicKey) -> Vec<u8> {
    let material = match pk {
        PublicKey::Rsa { modulus, .. } => {
            let i = modulus.iter().position(|b| *b != 0).unwrap_or(0);
            modulus[i..].to_vec()
        }
        PublicKey::EcP256 { point } | PublicKey::Sm2 { point } => point.clone(),
    };
    aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA1_FOR_LEGACY_USE_ONLY, &material)
        .as_ref()
        .to_vec()
}

/// Total time of a report's steps.
pub fn total(report: &Report) -> StdDuration {
    StdDuration::from_secs_f64(report.steps.iter().map(|s| s.ms).sum::<f64>() / 1000.0)
}

#[cfg(test)]
mod envelope_tests {
    use super::*;

    fn envelope(point: Vec<u8>) -> ukey_portal_api::KeyEnvelope {
        ukey_portal_api::KeyEnvelope {
            version: 1,
            recipient_spki_sha256: vec![0; 32],
            key_transport: WireTransport::EcdhP256 {
                ephemeral_public_key: point,
            },
            content_wrap: ukey_portal_api::CONTENT_WRAP_AES256_KWP.into(),
            private_key_algorithm: KeyAlgorithm::EcP256,
            private_key_format: ukey_portal_api::PRIVATE_KEY_FORMAT_PKCS8.into(),
            wrapped_private_key: vec![1; 40],
        }
    }

    #[test]
    fn the_ephemeral_point_must_be_on_the_curve_and_the_transport_fit_the_key() {
        // A real point: the public key of a fresh P-256 key.
        let rng = aws_lc_rs::rand::SystemRandom::new();
        let key = aws_lc_rs::agreement::EphemeralPrivateKey::generate(
            &aws_lc_rs::agreement::ECDH_P256,
            &rng,
        )
        .unwrap();
        let good = key.compute_public_key().unwrap().as_ref().to_vec();
        let recipient = PublicKey::EcP256 {
            point: good.clone(),
        };
        check_envelope(&envelope(good.clone()), &recipient).unwrap();
        let mut off = good.clone();
        off[64] ^= 1;
        let e = check_envelope(&envelope(off), &recipient).unwrap_err();
        assert!(e.to_string().contains("not on P-256"), "{e}");
        let rsa = PublicKey::Rsa {
            modulus: vec![0xC1; 256],
            exponent: vec![1, 0, 1],
        };
        let e = check_envelope(&envelope(good), &rsa).unwrap_err();
        assert!(e.to_string().contains("does not fit"), "{e}");
    }
}
