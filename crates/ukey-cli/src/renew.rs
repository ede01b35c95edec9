//! `ukey renew`: preflight, the user's go-ahead, the PIN, then the renewal engine with
//! a progress bar (or one line per step when not on a terminal), and a final JSON
//! object with `--json`.

use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};

use secrecy::SecretString;
use ukey_portal_api::KeyPolicy;
use ukey_portal_client::PortalClient;
use ukey_renewal::{
    CmpOptions, ErrorKind, Event, JournalStore, KeyIdScheme, LabelScheme, Options, Plan, Protocol,
    RenewalError, Report, Step, preflight, renew,
};
use ukey_token::{Config, Lang, Module};
use zeroize::Zeroize;

/// Exit code: nothing to renew.
pub const EXIT_NOTHING: u8 = 5;
/// Exit code: the user must act first.
pub const EXIT_ACTION: u8 = 6;
/// Exit code: the renewal failed.
pub const EXIT_FAILED: u8 = 7;

/// Arguments of `ukey renew`.
#[derive(Debug, clap::Args)]
pub struct RenewArgs {
    /// The CA portal, e.g. https://portal.example.cn (default: `portal_url` of the
    /// configuration files).
    #[arg(long, value_name = "URL", conflicts_with = "cmp")]
    pub portal: Option<String>,
    /// Renew over CMP (RFC 9483) at the CA's endpoint, e.g.
    /// https://ca.example.cn/.well-known/cmp (default: `url` of the config's [cmp]).
    #[arg(long, value_name = "URL")]
    pub cmp: Option<String>,
    /// CMP: the request, `kur` (key update) or `cr` (for CAs without key update).
    #[arg(long, value_name = "kur|cr")]
    pub cmp_request: Option<String>,
    /// CMP: keep the key pair (a reissue) instead of a new one on the token.
    #[arg(long)]
    pub same_key: bool,
    /// CMP: how long to poll a CA that answers "waiting" (a review) before stopping;
    /// the renewal then waits in its journal and the next run asks again.
    #[arg(long, value_name = "SECONDS", default_value_t = 30)]
    pub cmp_wait: u64,
    /// Token serial, or the id `ukey list` shows (`serial@slot`) for keys whose module
    /// gives several keys one serial (needed only when several tokens have a ready
    /// renewal).
    #[arg(long, value_name = "SERIAL|ID")]
    pub token: Option<String>,
    /// Certificate serial, hex (needed only when several certificates are ready).
    #[arg(long, value_name = "SERIAL")]
    pub cert: Option<String>,
    /// Read the PIN from the first line of standard input instead of the terminal.
    #[arg(long)]
    pub pin_stdin: bool,
    /// Do not ask before renewing (the notices are still printed).
    #[arg(long)]
    pub yes: bool,
    /// Try the PIN even though the token says one more wrong PIN locks it.
    #[arg(long)]
    pub confirm_final_try: bool,
    /// Print a JSON object at the end.
    #[arg(long)]
    pub json: bool,
    /// PEM file of a CA certificate the renewed certificate must chain to (repeatable;
    /// added to `trust_anchors` of the config file's [renewal] table).
    #[arg(long, value_name = "PEM")]
    pub trust: Vec<PathBuf>,
    /// The order's renewal code (8 digits, shown on the paid order page of the CA's
    /// portal), when the CA asks for one; `1234-5678` or `1234 5678` are read too.
    #[arg(
        long,
        value_name = "CODE",
        env = "UKEY_RENEWAL_CODE",
        hide_env_values = true
    )]
    pub renewal_code: Option<String>,
    /// Give up the unfinished renewal of the token (only while its activation has not
    /// begun): remove what it put on the key and close its journal. Needs the PIN.
    #[arg(long)]
    pub abandon: bool,
}

/// The trust anchors of a PEM or DER file (each must be a CA certificate; see
/// `ukey_trust::Anchor::load`), as DER.
pub fn read_pem_certs(path: &Path) -> anyhow::Result<Vec<Vec<u8>>> {
    Ok(ukey_trust::Anchor::load(path)?
        .into_iter()
        .map(|a| a.der)
        .collect())
}

/// Engine options from the config file and the command line.
pub fn options(
    config: &Config,
    trust: &[PathBuf],
    confirm_final_try: bool,
) -> anyhow::Result<Options> {
    let mut anchors = Vec::new();
    for p in config.renewal.trust_anchors.iter().chain(trust) {
        anchors.extend(read_pem_certs(p)?);
    }
    let mut opts = Options::new(JournalStore::open_default()?, anchors);
    opts.confirm_final_try = confirm_final_try;
    opts.key_ids = match config.renewal.key_id.as_deref() {
        None | Some("keep") => KeyIdScheme::KeepOld,
        Some("sha1") => KeyIdScheme::Sha1OfPublicKey,
        Some(other) => anyhow::bail!("[renewal] key_id = {other:?}: expected \"keep\" or \"sha1\""),
    };
    if let (Some(s), Some(e)) = (
        &config.renewal.signing_label,
        &config.renewal.encryption_label,
    ) {
        opts.labels = LabelScheme::Fixed {
            signing: s.clone(),
            encryption: e.clone(),
        };
    }
    Ok(opts)
}

/// The CMP settings from the command line over the config's [cmp] table.
fn cmp_protocol(url: &str, args: &RenewArgs, config: &Config) -> Result<Protocol, RenewalError> {
    let bad = |what: String| RenewalError::Selection(what);
    let request = match args
        .cmp_request
        .as_deref()
        .or(config.cmp.request.as_deref())
        .unwrap_or("kur")
    {
        "kur" => ukey_cmp::RequestKind::KeyUpdate,
        "cr" => ukey_cmp::RequestKind::Certification,
        other => return Err(bad(format!("CMP request {other:?}: expected kur or cr"))),
    };
    let key_policy = match (args.same_key, config.cmp.key.as_deref()) {
        (true, _) | (false, Some("same")) => KeyPolicy::Same,
        (false, None | Some("new")) => KeyPolicy::New,
        (false, Some(other)) => {
            return Err(bad(format!(
                "[cmp] key = {other:?}: expected \"new\" or \"same\""
            )));
        }
    };
    Ok(Protocol::Cmp(CmpOptions {
        url: url.trim_end_matches('/').to_owned(),
        request,
        key_policy,
        wait: std::time::Duration::from_secs(args.cmp_wait),
    }))
}

/// Exit code for an engine error.
pub fn exit_code(e: &RenewalError) -> u8 {
    match e.kind() {
        ErrorKind::NothingToDo => EXIT_NOTHING,
        ErrorKind::UserAction => EXIT_ACTION,
        ErrorKind::Failure => EXIT_FAILED,
    }
}

fn status_word(e: &RenewalError) -> &'static str {
    match e.kind() {
        ErrorKind::NothingToDo => "nothing_to_do",
        ErrorKind::UserAction => "action_needed",
        ErrorKind::Failure => "failed",
    }
}

fn fail(e: &RenewalError, json: bool, lang: Lang) -> u8 {
    if json {
        let mut v = serde_json::json!({
            "status": status_word(e),
            "error": {"code": e.code(), "message": e.user_message(lang)},
        });
        if let Some(n) = e.pin_tries_left() {
            v["error"]["tries_left"] = n.into();
        }
        println!("{v}");
    }
    eprintln!("ukey: {}", e.user_message(lang));
    exit_code(e)
}

/// Runs `ukey renew`.
pub fn run(args: &RenewArgs, module: &Module, config: &Config, lang: Lang) -> anyhow::Result<u8> {
    let zh = lang == Lang::ZhCn;
    let opts = options(config, &args.trust, args.confirm_final_try)?;
    if args.abandon {
        return abandon_unfinished(args, module, &opts, lang);
    }
    // Refuse before the PIN: without an anchor no issued certificate can be checked.
    if opts.trust_anchors.is_empty() {
        return Ok(fail(&RenewalError::NoTrustAnchor, args.json, lang));
    }
    let cmp_url = match (&args.cmp, &args.portal) {
        (Some(u), _) => Some(u.clone()),
        (None, Some(_)) => None,
        (None, None) => config.cmp.url.clone(),
    };
    let mut opts = opts;
    if let Some(typed) = &args.renewal_code {
        match ukey_portal_api::canonical_renewal_code(typed) {
            Some(code) => opts.renewal_code = Some(code),
            None => {
                return Ok(fail(
                    &RenewalError::Selection(
                        "续期码应为 8 位数字 / a renewal code is 8 digits, e.g. 1234-5678".into(),
                    ),
                    args.json,
                    lang,
                ));
            }
        }
    }
    if let Some(url) = &cmp_url {
        opts.protocol = match cmp_protocol(url, args, config) {
            Ok(p) => p,
            Err(e) => return Ok(fail(&e, args.json, lang)),
        };
    }
    let Some(portal) = cmp_url
        .as_deref()
        .or(args.portal.as_deref())
        .or(config.portal_url.as_deref())
    else {
        return Ok(fail(&RenewalError::NoPortal, args.json, lang));
    };
    // The trust anchors also verify the portal's TLS certificate (a CA's portal may use
    // one of its own CA's certificates), as they do for `ukey diagnose`.
    let tls_roots: Vec<Vec<u8>> = opts
        .trust_anchors
        .iter()
        .map(|der| ukey_trust::anchors::to_pem(der).into_bytes())
        .collect();
    let client = match PortalClient::with_roots(portal, &tls_roots) {
        Ok(c) => c,
        Err(e) => return Ok(fail(&RenewalError::Portal(e), args.json, lang)),
    };

    // Which token: the one named, else every token, keeping those with a plan.
    let tokens = match select_tokens(module, args.token.as_deref()) {
        Ok(t) => t,
        Err(e) => return Ok(fail(&e, args.json, lang)),
    };
    let mut plans: Vec<Plan> = Vec::new();
    let mut errors: Vec<RenewalError> = Vec::new();
    for t in &tokens {
        match preflight(module, t, args.cert.as_deref(), &client, &opts) {
            Ok(p) => plans.push(p),
            Err(e) => errors.push(e),
        }
    }
    let plan = match plans.len() {
        1 => plans.remove(0),
        0 => {
            // Most actionable first: failure, then user action, then nothing to do.
            errors.sort_by_key(|e| match e.kind() {
                ErrorKind::Failure => 0,
                ErrorKind::UserAction => 1,
                ErrorKind::NothingToDo => 2,
            });
            return Ok(fail(&errors.remove(0), args.json, lang));
        }
        _ => {
            let ids: Vec<String> = plans.iter().map(|p| p.token.id.clone()).collect();
            let e = RenewalError::Selection(format!(
                "several tokens have a ready renewal ({}); choose one with --token",
                ids.join(", ")
            ));
            return Ok(fail(&e, args.json, lang));
        }
    };

    // Tell the user before anything changes.
    let j = &plan.journal;
    eprintln!(
        "{}",
        if zh {
            format!(
                "续期 UKey {}（{}）上的证书 {}",
                plan.token.label, plan.token.serial, j.old.serial
            )
        } else {
            format!(
                "Renewing certificate {} on token {} ({})",
                j.old.serial, plan.token.label, plan.token.serial
            )
        }
    );
    for n in &plan.notices {
        eprintln!("  * {}", n.text(zh));
    }
    if !args.yes {
        if !std::io::stdin().is_terminal() || args.pin_stdin {
            let e = RenewalError::Selection(
                if zh {
                    "非交互方式运行时，请加 --yes 确认续期。"
                } else {
                    "Not on a terminal: confirm the renewal with --yes."
                }
                .to_owned(),
            );
            return Ok(fail(&e, args.json, lang));
        }
        eprint!(
            "{}",
            if zh {
                "继续？[y/N] "
            } else {
                "Continue? [y/N] "
            }
        );
        std::io::stderr().flush()?;
        let mut answer = String::new();
        std::io::stdin().lock().read_line(&mut answer)?;
        if !matches!(answer.trim(), "y" | "Y" | "yes" | "是") {
            eprintln!(
                "{}",
                if zh {
                    "已取消，未做任何改动。"
                } else {
                    "Cancelled; nothing was changed."
                }
            );
            return Ok(EXIT_ACTION);
        }
    }

    let notices: Vec<String> = plan.notices.iter().map(|n| n.text(zh)).collect();
    let pin = read_pin(args.pin_stdin, zh)?;
    let bar = (!args.json && std::io::stderr().is_terminal()).then(|| {
        let bar = indicatif::ProgressBar::new(Step::ALL.len() as u64);
        bar.set_style(
            indicatif::ProgressStyle::with_template("{bar:30.cyan/blue} {pos}/{len} {msg}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar.inc(1);
        bar
    });
    let mut on_event = |e: Event| match (&bar, e) {
        (Some(bar), Event::StepStarted { step }) => bar.set_message(step.describe(zh)),
        (Some(bar), Event::StepFinished { .. } | Event::StepSkipped { .. }) => bar.inc(1),
        (None, Event::StepFinished { step, duration }) if !args.json => {
            eprintln!("  ✓ {} ({} ms)", step.describe(zh), duration.as_millis());
        }
        (_, Event::Resuming { from }) => {
            tracing::info!(step = from.as_str(), "resuming an interrupted renewal");
        }
        _ => {}
    };
    let result = renew(module, plan, &pin, &client, &opts, &mut on_event);
    drop(pin);
    if let Some(bar) = &bar {
        bar.finish_and_clear();
    }
    match result {
        Ok(report) => {
            print_report(&report, &notices, args.json, zh);
            Ok(0)
        }
        Err(e) => {
            if e.is_resumable() {
                eprintln!(
                    "{}",
                    if zh {
                        "续期进度已保存：UKey 上的旧证书仍可用，重新插入 UKey 或再次运行 ukey renew 将继续完成。"
                    } else {
                        "The renewal's progress is saved: the old certificate still works (or the new one does); reinsert the token or run ukey renew again to finish."
                    }
                );
            }
            Ok(fail(&e, args.json, lang))
        }
    }
}

/// `ukey renew --abandon`: rolls back the one unfinished renewal of the chosen token
/// (and certificate) whose activation has not begun.
fn abandon_unfinished(
    args: &RenewArgs,
    module: &Module,
    opts: &Options,
    lang: Lang,
) -> anyhow::Result<u8> {
    let zh = lang == Lang::ZhCn;
    let mut found = Vec::new();
    let tokens = match select_tokens(module, args.token.as_deref()) {
        Ok(t) => t,
        Err(e) => return Ok(fail(&e, args.json, lang)),
    };
    for t in tokens {
        for j in opts.journals.for_token(&t.serial)? {
            if j.is_unfinished() && args.cert.as_ref().is_none_or(|c| *c == j.old.serial) {
                found.push((t.clone(), j));
            }
        }
    }
    let (token, journal) = match found.len() {
        1 => found.remove(0),
        0 => {
            let e = RenewalError::Selection(
                if zh {
                    "没有可放弃的未完成续期（UKey 需已插入）。"
                } else {
                    "No unfinished renewal to abandon on an inserted token."
                }
                .to_owned(),
            );
            return Ok(fail(&e, args.json, lang));
        }
        _ => {
            let e = RenewalError::Selection(
                "several unfinished renewals; choose one with --token and --cert".to_owned(),
            );
            return Ok(fail(&e, args.json, lang));
        }
    };
    if journal.activation_begun() {
        let e = RenewalError::Selection(
            if zh {
                "此续期已开始启用新证书，只能继续完成：请运行 ukey renew。"
            } else {
                "This renewal has begun activating the new certificate and can only be finished: run ukey renew."
            }
            .to_owned(),
        );
        return Ok(fail(&e, args.json, lang));
    }
    let serial = journal.old.serial.clone();
    let pin = read_pin(args.pin_stdin, zh)?;
    if let Err(e) = ukey_renewal::abandon(module, &token, journal, &pin, opts) {
        return Ok(fail(&e, args.json, lang));
    }
    if args.json {
        println!(
            "{}",
            serde_json::json!({"status": "abandoned", "token_serial": token.serial, "old_serial": serial})
        );
    }
    eprintln!(
        "{}",
        if zh {
            format!("已放弃证书 {serial} 的续期，UKey 已恢复原状。")
        } else {
            format!("The renewal of certificate {serial} was abandoned; the token is as before.")
        }
    );
    Ok(0)
}

fn read_pin(from_stdin: bool, zh: bool) -> anyhow::Result<SecretString> {
    let mut text = if from_stdin {
        let mut line = String::new();
        std::io::stdin().lock().read_line(&mut line)?;
        line
    } else {
        rpassword::prompt_password(if zh { "UKey PIN 码：" } else { "Token PIN: " })?
    };
    let pin = SecretString::from(text.trim_end_matches(['\r', '\n']).to_owned());
    text.zeroize();
    Ok(pin)
}

fn print_report(r: &Report, notices: &[String], json: bool, zh: bool) {
    if json {
        let steps: Vec<serde_json::Value> = r
            .steps
            .iter()
            .map(|s| serde_json::json!({"step": s.step.as_str(), "ms": s.ms, "skipped": s.skipped}))
            .collect();
        let v = serde_json::json!({
            "status": r.status,
            "token_serial": r.token_serial,
            "old_serial": r.old_serial,
            "new_serial": r.new_serial,
            "not_after": r.not_after.format(&time::format_description::well_known::Rfc3339).unwrap_or_default(),
            "encryption_serial": r.encryption_serial,
            "archived_serial": r.archived_serial,
            "resumed": r.resumed,
            "notices": notices,
            "steps": steps,
        });
        println!("{v}");
    } else if zh {
        println!(
            "续期完成：新证书序列号 {}，有效期至 {}。旧证书 {} 将被吊销。",
            r.new_serial,
            r.not_after.date(),
            r.old_serial
        );
    } else {
        println!(
            "Renewed: new certificate {} valid until {}. The old certificate {} will be revoked.",
            r.new_serial,
            r.not_after.date(),
            r.old_serial
        );
    }
}

/// The inserted tokens `--token` names: by id (`serial`, or `serial@slot` for keys whose
/// serial is shared) or by serial; every token without `--token`. A serial that several
/// keys report names none of them: the message lists their ids.
fn select_tokens(
    module: &Module,
    wanted: Option<&str>,
) -> Result<Vec<ukey_token::TokenSummary>, RenewalError> {
    let all = module.tokens().map_err(RenewalError::Token)?;
    let Some(w) = wanted else {
        if all.is_empty() {
            return Err(RenewalError::Selection("no token is inserted".to_owned()));
        }
        return Ok(all);
    };
    if let Some(t) = all.iter().find(|t| t.answers_to(w)) {
        return Ok(vec![t.clone()]);
    }
    let by_serial: Vec<_> = all.into_iter().filter(|t| t.serial == w).collect();
    match by_serial.len() {
        0 => Err(RenewalError::Selection(format!(
            "no token with serial {w} is inserted"
        ))),
        1 => Ok(by_serial),
        _ => {
            let ids: Vec<&str> = by_serial.iter().map(|t| t.id.as_str()).collect();
            Err(RenewalError::Selection(format!(
                "several inserted keys report serial {w} (their module does not number keys uniquely); choose one with --token {}",
                ids.join(" or --token ")
            )))
        }
    }
}
