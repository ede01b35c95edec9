//! The renewal engine (ukey-renewal) and the diagnosis (ukey-diagnose), wired for the
//! app: portal client and engine options from the settings, engine events mapped to
//! the progress channel, engine errors to `{code, message}`. Each call runs on a thread
//! of its own with a shared handle on the module (see [`crate::service`]).

use std::path::PathBuf;
use std::sync::Arc;

use secrecy::SecretString;
use serde::Serialize;
use time::format_description::well_known::Rfc3339;
use ukey_portal_client::PortalClient;
use ukey_renewal::{Event, JournalStore, Notice, RenewalError, Step};
use ukey_token::{Lang, Module, TokenSummary};

use crate::error::{IpcError, IpcResult};
use crate::service::StatusSource;
use crate::view::StatusView;

/// What the engine needs from the settings.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Portal base URL.
    pub portal_url: Option<String>,
    /// A CA reached over CMP instead (see [`cmp_options`]).
    pub cmp: Option<ukey_renewal::CmpOptions>,
    /// PEM files of the CA certificates an issued certificate must chain to.
    pub trust_anchors: Vec<PathBuf>,
    /// Data directory; journals are in its `journal/` (shared with `ukey renew`).
    pub data_dir: PathBuf,
    /// Language of messages.
    pub lang: Lang,
}

/// Progress of a renewal, streamed over the `renew` command's channel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "event", content = "data", rename_all = "camelCase")]
pub enum RenewEvent {
    /// A step started (or was skipped: done before an interruption).
    #[serde(rename_all = "camelCase")]
    Step {
        /// `preflight`, `login`, `key`, `request`, `verify`, `write`, `self_test`,
        /// `activate`, `installed`.
        step: &'static str,
        /// 1-based position.
        index: usize,
        /// Number of steps.
        total: usize,
        /// The token is being written: pulling it now interrupts the renewal.
        writing: bool,
    },
    /// An interrupted renewal is being finished.
    #[serde(rename_all = "camelCase")]
    Resuming {
        /// The step it had reached.
        from: &'static str,
    },
}

impl RenewEvent {
    /// The UI's view of an engine event (`None`: nothing to show).
    pub fn from_engine(e: &Event) -> Option<RenewEvent> {
        let step = |s: Step| RenewEvent::Step {
            step: s.as_str(),
            index: Step::ALL.iter().position(|x| *x == s).map_or(0, |i| i + 1),
            total: Step::ALL.len(),
            writing: matches!(s, Step::Write | Step::Activate),
        };
        match e {
            Event::StepStarted { step: s } | Event::StepSkipped { step: s } => Some(step(*s)),
            Event::Resuming { from } => Some(RenewEvent::Resuming {
                from: from.as_str(),
            }),
            _ => None,
        }
    }
}

/// What the user is told before the PIN: the engine's notices.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PlanView {
    /// Notices, tagged by `notice`, each with the engine's own sentence in `text`.
    pub notices: Vec<NoticeView>,
    /// Whether an interrupted renewal will be finished.
    pub resuming: bool,
}

/// One notice.
#[derive(Debug, Clone, Serialize)]
pub struct NoticeView {
    #[serde(flatten)]
    notice: Notice,
    text: String,
}

/// A finished renewal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RenewOutcome {
    /// New certificate serial.
    pub new_serial: String,
    /// New end of validity, RFC 3339.
    pub not_after: String,
    /// New encryption certificate serial.
    pub encryption_serial: Option<String>,
    /// Archived old encryption certificate serial.
    pub archived_serial: Option<String>,
    /// Whether an interrupted renewal was finished.
    pub resumed: bool,
    /// The engine's sign/verify self-test with the new key ran and passed in this run
    /// (`false`: it passed in an earlier, interrupted run, which this one finished; the
    /// engine stops with `self_test_failed` when it fails).
    pub self_test_in_this_run: bool,
}

/// An engine error for the UI.
pub fn ipc_error(e: &RenewalError, lang: Lang) -> IpcError {
    use ukey_portal_api::ErrorCode;
    // The portal's answer to a missing or wrong renewal code is the user's to mend
    // beside the PIN: its own code, so the dialog asks again.
    let code = match e {
        RenewalError::Portal(p) => match p.api_code() {
            Some(ErrorCode::RenewalCodeInvalid) => "renewal_code_invalid",
            Some(ErrorCode::RenewalCodeRequired) => "renewal_code_needed",
            _ => e.code(),
        },
        _ => e.code(),
    };
    IpcError {
        code: code.to_owned(),
        message: e.user_message(lang),
    }
}

fn portal(cfg: &EngineConfig) -> IpcResult<PortalClient> {
    let url = cfg.cmp.as_ref().map(|c| &c.url).or(cfg.portal_url.as_ref());
    let Some(url) = url else {
        return Err(IpcError::new(
            "portal_not_configured",
            cfg.lang.pick(
                "尚未设置 CA 门户地址：请在“设置”中填写，或由 CA 的安装程序写入 /etc/ukey/config.toml",
                "No portal URL is set: enter it in Settings, or have your CA's installer write it to /etc/ukey/config.toml",
            ),
        ));
    };
    // The trust anchors also verify the portal's TLS certificate, as for the diagnosis.
    let roots: Vec<Vec<u8>> = trust_anchors(&cfg.trust_anchors)
        .unwrap_or_default()
        .iter()
        .map(|a| ukey_trust::anchors::to_pem(&a.der).into_bytes())
        .collect();
    PortalClient::with_roots(url, &roots).map_err(|e| IpcError::new(e.code(), e.to_string()))
}

/// Trust anchors (DER) from the PEM files.
pub fn trust_anchors(paths: &[PathBuf]) -> IpcResult<Vec<ukey_diagnose::TrustAnchor>> {
    let mut out = vec![];
    for p in paths {
        out.extend(
            ukey_diagnose::TrustAnchor::load(p)
                .map_err(|e| IpcError::new("trust_anchor", e.to_string()))?,
        );
    }
    Ok(out)
}

fn options(cfg: &EngineConfig, confirm_final_try: bool) -> IpcResult<ukey_renewal::Options> {
    let anchors = trust_anchors(&cfg.trust_anchors)?;
    if anchors.is_empty() {
        return Err(IpcError::new(
            "trust_anchor_missing",
            cfg.lang.pick(
                "尚未设置信任的根证书，无法校验新证书，请在“设置”中添加",
                "No trusted root certificate is set, so the new certificate cannot be checked: add one in Settings",
            ),
        ));
    }
    let mut o = ukey_renewal::Options::new(
        JournalStore::new(&cfg.data_dir),
        anchors.into_iter().map(|a| a.der).collect(),
    );
    o.confirm_final_try = confirm_final_try;
    if let Some(c) = &cfg.cmp {
        o.protocol = ukey_renewal::Protocol::Cmp(c.clone());
    }
    Ok(o)
}

fn find_token(module: &Module, id: &str, lang: Lang) -> IpcResult<TokenSummary> {
    let tokens = module
        .tokens()
        .map_err(|e| IpcError::from_token(&e, lang))?;
    tokens
        .into_iter()
        .find(|t| t.answers_to(id))
        .ok_or_else(|| {
            IpcError::new(
                "token_not_present",
                lang.pick(
                    &format!("没有找到 UKey {id}，请插入后重试"),
                    &format!("UKey {id} is not inserted: insert it and try again"),
                ),
            )
        })
}

/// Preflight (no PIN): what will happen, for the consequences dialog.
pub fn plan(
    module: &Module,
    token_id: &str,
    cert_serial: &str,
    cfg: &EngineConfig,
) -> IpcResult<PlanView> {
    let lang = cfg.lang;
    let token = find_token(module, token_id, lang)?;
    let portal = portal(cfg)?;
    // The last-try confirmation and the renewal code belong to the PIN dialog; the plan
    // is shown either way.
    let mut opts = options(cfg, true)?;
    opts.defer_renewal_code = true;
    let plan = ukey_renewal::preflight(module, &token, Some(cert_serial), &portal, &opts)
        .map_err(|e| ipc_error(&e, lang))?;
    Ok(PlanView {
        resuming: plan.resuming,
        notices: plan
            .notices
            .iter()
            .map(|n| NoticeView {
                text: n.text(lang == Lang::ZhCn),
                notice: n.clone(),
            })
            .collect(),
    })
}

/// What the holder gave in the PIN dialog: the PIN (used once), whether they saw that
/// it is the last try and submitted anyway, and the order's renewal code when the
/// portal asks for one.
pub struct Entered<'a> {
    /// The PIN.
    pub pin: &'a SecretString,
    /// The user saw that this is the PIN's last try.
    pub confirm_final_try: bool,
    /// The renewal code as typed (`1234-5678` or `12345678`).
    pub renewal_code: Option<String>,
}

impl std::fmt::Debug for Entered<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Neither the PIN nor the code is printed.
        f.debug_struct("Entered")
            .field("confirm_final_try", &self.confirm_final_try)
            .field("renewal_code", &self.renewal_code.as_ref().map(|_| "…"))
            .finish_non_exhaustive()
    }
}

/// Preflight and renewal with the PIN, once.
pub fn renew(
    module: &Module,
    token_id: &str,
    cert_serial: &str,
    entered: Entered<'_>,
    cfg: &EngineConfig,
    on_event: &mut dyn FnMut(RenewEvent),
) -> IpcResult<RenewOutcome> {
    let lang = cfg.lang;
    let token = find_token(module, token_id, lang)?;
    let portal = portal(cfg)?;
    let mut opts = options(cfg, entered.confirm_final_try)?;
    opts.renewal_code = entered
        .renewal_code
        .map(|c| c.trim().to_owned())
        .filter(|c| !c.is_empty());
    let pin = entered.pin;
    let plan = ukey_renewal::preflight(module, &token, Some(cert_serial), &portal, &opts)
        .map_err(|e| ipc_error(&e, lang))?;
    let mut forward = |e: Event| {
        if let Some(ev) = RenewEvent::from_engine(&e) {
            on_event(ev);
        }
    };
    let report = ukey_renewal::renew(module, plan, pin, &portal, &opts, &mut forward)
        .map_err(|e| ipc_error(&e, lang))?;
    Ok(RenewOutcome {
        self_test_in_this_run: report
            .steps
            .iter()
            .any(|s| s.step == Step::SelfTest && !s.skipped),
        new_serial: report.new_serial,
        not_after: report.not_after.format(&Rfc3339).unwrap_or_default(),
        encryption_serial: report.encryption_serial,
        archived_serial: report.archived_serial,
        resumed: report.resumed,
    })
}

/// Renewal statuses from the portal, for the listing.
#[derive(Debug)]
pub struct PortalStatus(PortalClient);

impl PortalStatus {
    /// A status source for the configured portal, if any.
    pub fn for_url(url: Option<&str>) -> Option<Arc<dyn StatusSource>> {
        let client = PortalClient::new(url?)
            .map_err(|e| tracing::warn!("portal client: {e}"))
            .ok()?;
        Some(Arc::new(PortalStatus(client)))
    }
}

impl StatusSource for PortalStatus {
    fn status(&self, cert_der: &[u8]) -> IpcResult<StatusView> {
        let req = ukey_renewal::status_request(cert_der)
            .map_err(|e| IpcError::new(e.code(), e.to_string()))?;
        self.0
            .status(&req)
            .map(|a| StatusView::from(a.value))
            .map_err(|e| IpcError::new(e.code(), e.to_string()))
    }
}

/// The statuses where the CA speaks CMP: a signing certificate can be renewed through
/// it (the CA's answer says whether it issues, waits or refuses); an encryption
/// certificate is renewed with its signing one, over the portal's protocol.
#[derive(Debug)]
pub struct CmpStatus;

impl StatusSource for CmpStatus {
    fn status(&self, cert_der: &[u8]) -> IpcResult<StatusView> {
        let d = ukey_token::CertificateDetails::from_der(cert_der)
            .map_err(|e| IpcError::new("certificate_malformed", e))?;
        Ok(match d.usage {
            ukey_token::Usage::Encryption => StatusView::None,
            _ => StatusView::Cmp,
        })
    }
}

/// A CA reached over CMP: `UKEY_CMP_URL`, else `[cmp]` of the configuration files (a
/// CA's installer writes it to /etc/ukey/config.toml). Renewals through the app wait
/// 20 s for a CA that answers "waiting"; the journal keeps the transaction after that.
pub fn cmp_options() -> Option<ukey_renewal::CmpOptions> {
    let config = ukey_token::Config::load_default().unwrap_or_else(|e| {
        tracing::warn!("configuration file: {e}");
        ukey_token::Config::default()
    });
    let url = std::env::var("UKEY_CMP_URL")
        .ok()
        .filter(|v| !v.is_empty())
        .or(config.cmp.url)?;
    Some(ukey_renewal::CmpOptions {
        url,
        request: match config.cmp.request.as_deref() {
            Some("cr") => ukey_cmp::RequestKind::Certification,
            _ => ukey_cmp::RequestKind::KeyUpdate,
        },
        key_policy: match config.cmp.key.as_deref() {
            Some("same") => ukey_portal_api::KeyPolicy::Same,
            _ => ukey_portal_api::KeyPolicy::New,
        },
        wait: std::time::Duration::from_secs(20),
    })
}

/// The diagnosis page's content.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DiagnosticsResult {
    /// The full report (shown on this machine only).
    pub report: ukey_diagnose::Report,
    /// The redacted report as text, Chinese (for "copy").
    pub redacted_text_zh: String,
    /// The redacted report as text, English.
    pub redacted_text_en: String,
}

/// Runs `ukey diagnose` with the app's module (or loads one when the app has none).
pub fn diagnose(
    module: Option<&Module>,
    cfg: &EngineConfig,
    module_path: Option<PathBuf>,
    pin: Option<SecretString>,
    pin_token: Option<String>,
) -> DiagnosticsResult {
    let mut opts = ukey_diagnose::Options::new(env!("CARGO_PKG_VERSION"));
    opts.module = module_path;
    opts.pin = pin;
    opts.pin_token = pin_token;
    opts.config = ukey_token::Config::load_default().unwrap_or_default();
    opts.portal = cfg.portal_url.clone();
    opts.journal_dir = Some(JournalStore::new(&cfg.data_dir).dir().to_owned());
    match trust_anchors(&cfg.trust_anchors) {
        Ok(a) => opts.trust_anchors = a,
        Err(e) => tracing::warn!("{}", e.message),
    }
    let report = match module {
        Some(m) => ukey_diagnose::diagnose_with(m, &opts),
        None => ukey_diagnose::diagnose(&opts),
    };
    // The PIN is not needed any more.
    drop(opts);
    let redacted = report.redacted();
    DiagnosticsResult {
        redacted_text_zh: ukey_diagnose::render_text(&redacted, Lang::ZhCn, true),
        redacted_text_en: ukey_diagnose::render_text(&redacted, Lang::En, true),
        report,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engine_events_become_named_numbered_steps() {
        let ev = RenewEvent::from_engine(&Event::StepStarted { step: Step::Write });
        assert_eq!(
            serde_json::to_value(ev).expect("json"),
            serde_json::json!({"event": "step", "data": {"step": "write", "index": 6, "total": 9, "writing": true}})
        );
        let ev = RenewEvent::from_engine(&Event::StepStarted { step: Step::Login });
        assert_eq!(
            serde_json::to_value(ev).expect("json")["data"]["writing"],
            false
        );
        let ev = RenewEvent::from_engine(&Event::Resuming { from: Step::Write });
        assert_eq!(
            serde_json::to_value(ev).expect("json"),
            serde_json::json!({"event": "resuming", "data": {"from": "write"}})
        );
    }

    #[test]
    fn notices_carry_their_kind_and_text() {
        let n = Notice::OldCertificateRevoked {
            serial: "0A".into(),
        };
        let v = NoticeView {
            text: n.text(true),
            notice: n,
        };
        let json = serde_json::to_value(&v).expect("json");
        assert_eq!(json["notice"], "old_certificate_revoked");
        assert_eq!(json["serial"], "0A");
        assert!(json["text"].as_str().is_some_and(|t| t.contains("吊销")));
    }

    #[test]
    fn no_portal_or_no_trust_anchor_is_a_clear_error() {
        let cfg = EngineConfig {
            portal_url: None,
            cmp: None,
            trust_anchors: vec![],
            data_dir: std::env::temp_dir(),
            lang: Lang::En,
        };
        assert_eq!(portal(&cfg).unwrap_err().code, "portal_not_configured");
        assert_eq!(
            options(&cfg, false).unwrap_err().code,
            "trust_anchor_missing"
        );
        let bad = EngineConfig {
            trust_anchors: vec!["/nonexistent/root.pem".into()],
            ..cfg
        };
        assert_eq!(options(&bad, false).unwrap_err().code, "trust_anchor");
    }
}
