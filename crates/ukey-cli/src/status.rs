//! `ukey status`: each certificate on each token, with its renewal status at the portal
//! and any unfinished renewal in the journal.

use std::io::Write;

use ukey_portal_client::PortalClient;
use ukey_renewal::{JournalStore, status_request};
use ukey_token::{Lang, Module, Usage};

/// Arguments of `ukey status`.
#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// The CA portal (default: `portal_url` of the configuration files).
    #[arg(long, value_name = "URL")]
    pub portal: Option<String>,
    /// Print JSON (`{"certificates": [...]}`).
    #[arg(long)]
    pub json: bool,
}

/// Runs `ukey status`.
pub fn run(
    args: &StatusArgs,
    module: &Module,
    config: &ukey_token::Config,
    lang: Lang,
) -> anyhow::Result<u8> {
    let zh = lang == Lang::ZhCn;
    let Some(portal) = args.portal.as_deref().or(config.portal_url.as_deref()) else {
        eprintln!(
            "ukey: {}",
            ukey_renewal::RenewalError::NoPortal.user_message(lang)
        );
        return Ok(crate::renew::EXIT_ACTION);
    };
    let client = PortalClient::new(portal)?;
    let journals = JournalStore::open_default()?;
    let now = time::OffsetDateTime::now_utc();
    let mut rows = Vec::new();
    let mut failed = false;
    for listing in module.list()? {
        let t = &listing.token;
        let unfinished: Vec<_> = journals
            .for_token(&t.serial)?
            .into_iter()
            .filter(|j| j.is_unfinished())
            .collect();
        for c in &listing.certificates {
            let Ok(d) = &c.details else { continue };
            let (state, detail) = if d.is_ca {
                // A CA's certificate kept on the key: not the holder's, never renewed.
                ("ca".to_owned(), serde_json::Value::Null)
            } else if d.usage == Usage::Encryption {
                ("encryption".to_owned(), serde_json::Value::Null)
            } else {
                match client.status(&status_request(&c.der)?) {
                    Ok(a) => {
                        let v = serde_json::to_value(&a.value)?;
                        (a.value.state_name().to_owned(), v)
                    }
                    Err(e) => {
                        failed = true;
                        (
                            "error".to_owned(),
                            serde_json::json!({"code": e.code(), "message": e.to_string()}),
                        )
                    }
                }
            };
            let journal = unfinished
                .iter()
                .find(|j| j.old.serial == d.serial)
                .map(|j| serde_json::json!({"step": j.step.as_str(), "renewal_id": j.renewal_id}));
            rows.push(serde_json::json!({
                "token_serial": t.serial,
                "token_label": t.label,
                "serial": d.serial,
                "subject": d.subject,
                "usage": d.usage.as_str(),
                "not_after": d.not_after.format(&time::format_description::well_known::Rfc3339).unwrap_or_default(),
                "days_left": d.days_left(now),
                "state": state,
                "portal": detail,
                "unfinished_renewal": journal,
            }));
        }
    }
    let mut out = std::io::stdout().lock();
    if args.json {
        serde_json::to_writer_pretty(&mut out, &serde_json::json!({"certificates": rows}))?;
        writeln!(out)?;
    } else {
        for r in &rows {
            let state = r["state"].as_str().unwrap_or("");
            let text = state_text(state, &r["portal"], zh);
            writeln!(
                out,
                "{}  {}  {}  {}  {}{}",
                r["token_label"].as_str().unwrap_or(""),
                r["serial"].as_str().unwrap_or(""),
                r["subject"].as_str().unwrap_or(""),
                r["days_left"],
                text,
                if r["unfinished_renewal"].is_null() {
                    String::new()
                } else if zh {
                    "（有未完成的续期，运行 ukey renew 继续）".to_owned()
                } else {
                    " (an interrupted renewal: run ukey renew to finish)".to_owned()
                }
            )?;
        }
    }
    out.flush()?;
    Ok(if failed { 4 } else { 0 })
}

fn state_text(state: &str, v: &serde_json::Value, zh: bool) -> String {
    let s = |k: &str| v[k].as_str().unwrap_or("").to_owned();
    match (state, zh) {
        ("none", true) => "无续期订单".into(),
        ("none", false) => "no renewal order".into(),
        ("awaiting_payment", true) => format!("待付款：{}", s("payment_url")),
        ("awaiting_payment", false) => format!("awaiting payment: {}", s("payment_url")),
        ("ready", true) => "已付款，可立即更新（ukey renew）".into(),
        ("ready", false) => "paid, ready to renew (ukey renew)".into(),
        ("issued", true) => "新证书已签发，待安装（ukey renew）".into(),
        ("issued", false) => "issued, not installed yet (ukey renew)".into(),
        ("completed", true) => "续期已完成".into(),
        ("completed", false) => "renewal completed".into(),
        ("requires_new_key", true) => {
            format!("需更换新 UKey，已寄出（运单号 {}）", s("tracking_number"))
        }
        ("requires_new_key", false) => format!(
            "a new token is being mailed (tracking {})",
            s("tracking_number")
        ),
        ("rejected", true) => format!("已驳回：{}", s("reason")),
        ("rejected", false) => format!("rejected: {}", s("reason")),
        ("ca", true) => "CA 证书（不续期）".into(),
        ("ca", false) => "CA certificate (not renewed)".into(),
        ("encryption", true) => "加密证书（随签名证书续期）".into(),
        ("encryption", false) => "encryption certificate (renewed with the signing one)".into(),
        (_, true) => format!("查询失败：{}", s("message")),
        (_, false) => format!("status unavailable: {}", s("message")),
    }
}
