//! What `ukey list` and `ukey watch` print: the JSON shapes (pinned by the CLI tests)
//! and the tables in the user's language.
//!
//! `ukey list --json` prints `{"module": {...}, "tokens": [...]}`. Each token has
//! `id` (the serial, or `serial@slot` when other keys report the same serial: what
//! `--token` takes), `slot_id`, `label`, `serial`, `manufacturer`, `model`, `hardware_version`,
//! `firmware_version` (`unknown` when the module's is out of range), `clock` (the
//! token's UTC clock, or `null`), `quirks` (fields the module filled in its own way,
//! each {`field`, `kind`, `raw` (hex)}: see `ukey_token::quirks`), `pin` {`initialized`,
//! `count_low`, `final_try`, `locked`, `protected_authentication_path`, `tries_left` and
//! `max_tries` (numbers for SKF keys, which report them; `null` for PKCS#11)},
//! `interface` (`pkcs11` or `skf`: how the key is used), `application` (the SKF
//! application, else `null`),
//! `certificates`, and two extra fields:
//! * `orphan_keys`: key objects whose CKA_ID matches no certificate, each
//!   {`class` (`private`/`public`), `key_id`, `label`, `key_type`};
//! * `errors`: what could not be read on this token, each {`code`, `message`}
//!   (codes as `ukey_token::Error::code`).
//!
//! Each certificate has `serial`, `subject`, `subject_cn`, `issuer`, `not_before`,
//! `not_after` (RFC 3339 UTC), `days_left`, `expired`, `key_algorithm`, `usage`,
//! `key_id`, `label`, `has_private_key` (`true`, `false` or `null` when it cannot be
//! known without login) and `key_evidence` (`private_key`, `public_key`, `absent`,
//! `unknown`: how `has_private_key` was decided, see `ukey_token::listing`), plus
//! `error` {`code`, `message`} for a corrupt certificate object, whose parsed fields
//! are then `null`.

use std::io::{self, Write};

use serde::Serialize;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use ukey_token::{
    CertificateEntry, KeyEntry, Lang, Module, PinState, TokenEvent, TokenListing, Usage,
};

#[derive(Debug, Serialize)]
pub struct ListDoc {
    module: ModuleDoc,
    tokens: Vec<TokenDoc>,
}

#[derive(Debug, Serialize)]
struct ModuleDoc {
    path: String,
    interface: ukey_token::Interface,
    manufacturer: String,
    description: String,
    version: String,
}

#[derive(Debug, Serialize)]
struct TokenDoc {
    id: String,
    slot_id: u64,
    label: String,
    serial: String,
    manufacturer: String,
    model: String,
    hardware_version: String,
    firmware_version: String,
    clock: Option<String>,
    quirks: Vec<ukey_token::Quirk>,
    interface: ukey_token::Interface,
    application: Option<String>,
    pin: PinDoc,
    certificates: Vec<CertDoc>,
    orphan_keys: Vec<KeyEntry>,
    errors: Vec<ErrorDoc>,
}

#[derive(Debug, Serialize)]
struct PinDoc {
    initialized: bool,
    count_low: bool,
    final_try: bool,
    locked: bool,
    protected_authentication_path: bool,
    tries_left: Option<u32>,
    max_tries: Option<u32>,
}

impl From<PinState> for PinDoc {
    fn from(p: PinState) -> PinDoc {
        PinDoc {
            initialized: p.initialized,
            count_low: p.count_low,
            final_try: p.final_try,
            locked: p.locked,
            protected_authentication_path: p.protected_authentication_path,
            tries_left: p.tries_left,
            max_tries: p.max_tries,
        }
    }
}

#[derive(Debug, Serialize)]
struct ErrorDoc {
    code: &'static str,
    message: String,
}

impl From<&ukey_token::Error> for ErrorDoc {
    fn from(e: &ukey_token::Error) -> ErrorDoc {
        ErrorDoc {
            code: e.code(),
            message: e.to_string(),
        }
    }
}

#[derive(Debug, Serialize)]
struct CertDoc {
    serial: Option<String>,
    subject: Option<String>,
    subject_cn: Option<String>,
    issuer: Option<String>,
    not_before: Option<String>,
    not_after: Option<String>,
    days_left: Option<i64>,
    expired: Option<bool>,
    key_algorithm: Option<String>,
    usage: Option<Usage>,
    key_id: String,
    label: String,
    has_private_key: Option<bool>,
    key_evidence: ukey_token::KeyEvidence,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<ErrorDoc>,
}

fn rfc3339(t: OffsetDateTime) -> String {
    // Formatting a UTC OffsetDateTime as RFC 3339 fails only for years outside 0..=9999.
    t.to_offset(time::UtcOffset::UTC)
        .format(&Rfc3339)
        .unwrap_or_else(|_| t.to_string())
}

fn cert_doc(c: &CertificateEntry, now: OffsetDateTime) -> CertDoc {
    let d = c.details.as_ref().ok();
    CertDoc {
        serial: d.map(|d| d.serial.clone()),
        subject: d.map(|d| d.subject.clone()),
        subject_cn: d.and_then(|d| d.subject_cn.clone()),
        issuer: d.map(|d| d.issuer.clone()),
        not_before: d.map(|d| rfc3339(d.not_before)),
        not_after: d.map(|d| rfc3339(d.not_after)),
        days_left: d.map(|d| d.days_left(now)),
        expired: d.map(|d| d.is_expired(now)),
        key_algorithm: d.map(|d| d.key_algorithm.clone()),
        usage: d.map(|d| d.usage),
        key_id: c.key_id_hex(),
        label: c.label.clone(),
        has_private_key: c.key.has_private_key(),
        key_evidence: c.key,
        error: c.details.as_ref().err().map(ErrorDoc::from),
    }
}

pub fn list_json(module: &Module, listings: &[TokenListing], now: OffsetDateTime) -> ListDoc {
    let info = module.library_info();
    ListDoc {
        module: ModuleDoc {
            path: module.path().display().to_string(),
            interface: module.interface(),
            manufacturer: info.manufacturer.clone(),
            description: info.description.clone(),
            version: info.version.clone(),
        },
        tokens: listings
            .iter()
            .map(|l| TokenDoc {
                id: l.token.id.clone(),
                slot_id: l.token.slot_id,
                label: l.token.label.clone(),
                serial: l.token.serial.clone(),
                manufacturer: l.token.manufacturer.clone(),
                model: l.token.model.clone(),
                hardware_version: l.token.hardware_version.clone(),
                firmware_version: l.token.firmware_version.clone(),
                clock: l.token.clock.clone(),
                quirks: l.token.quirks.clone(),
                interface: l.token.interface,
                application: l.token.application.clone(),
                pin: l.token.pin.into(),
                certificates: l.certificates.iter().map(|c| cert_doc(c, now)).collect(),
                orphan_keys: l.orphan_keys.clone(),
                errors: l.errors.iter().map(ErrorDoc::from).collect(),
            })
            .collect(),
    }
}

/// Terminal columns taken by `s`: East Asian wide characters take two.
fn display_width(s: &str) -> usize {
    s.chars()
        .map(|c| {
            let u = c as u32;
            let wide = matches!(u,
                0x1100..=0x115F | 0x2E80..=0x303E | 0x3041..=0x33FF | 0x3400..=0x4DBF
                | 0x4E00..=0x9FFF | 0xA000..=0xA4CF | 0xAC00..=0xD7A3 | 0xF900..=0xFAFF
                | 0xFE30..=0xFE4F | 0xFF00..=0xFF60 | 0xFFE0..=0xFFE6 | 0x20000..=0x3FFFD);
            if wide { 2 } else { 1 }
        })
        .sum()
}

fn pad(s: &str, width: usize) -> String {
    let w = display_width(s);
    format!("{s}{}", " ".repeat(width.saturating_sub(w)))
}

fn usage_text(u: Usage, lang: Lang) -> &'static str {
    match u {
        Usage::Signing => lang.pick("签名", "signing"),
        Usage::Encryption => lang.pick("加密", "encryption"),
        Usage::Both => lang.pick("签名+加密", "both"),
    }
}

fn pin_text(p: PinState, lang: Lang) -> String {
    // SKF says how many tries are left: say it, whatever the state.
    if let (Some(left), false) = (p.tries_left, p.locked) {
        return match lang {
            Lang::ZhCn => format!("PIN 剩余 {left} 次尝试"),
            Lang::En => format!(
                "PIN: {left} {} left",
                if left == 1 { "try" } else { "tries" }
            ),
        };
    }
    let mut parts = vec![];
    if !p.initialized {
        parts.push(lang.pick("PIN 未设置", "PIN not set"));
    }
    if p.locked {
        parts.push(lang.pick("PIN 已锁定", "PIN LOCKED"));
    } else if p.final_try {
        parts.push(lang.pick("PIN 仅剩最后一次尝试", "PIN: last try left"));
    } else if p.count_low {
        parts.push(lang.pick("PIN 曾输错", "PIN: wrong PIN entered before"));
    }
    if p.protected_authentication_path {
        parts.push(lang.pick("在设备上输入 PIN", "PIN entered on the device"));
    }
    if parts.is_empty() {
        lang.pick("PIN 正常", "PIN OK").to_owned()
    } else {
        parts.join(lang.pick("，", ", "))
    }
}

pub fn list_text(
    out: &mut impl Write,
    lang: Lang,
    module: &Module,
    listings: &[TokenListing],
    now: OffsetDateTime,
) -> io::Result<()> {
    if listings.is_empty() {
        writeln!(
            out,
            "{} ({} {})",
            lang.pick(
                "没有找到 UKey。请插入 UKey。",
                "No token found. Insert a token."
            ),
            lang.pick("驱动模块", "module"),
            module.path().display()
        )?;
        return Ok(());
    }
    for (i, l) in listings.iter().enumerate() {
        if i > 0 {
            writeln!(out)?;
        }
        let t = &l.token;
        let place = match t.interface {
            ukey_token::Interface::Pkcs11 => format!("{} {}", lang.pick("槽位", "Slot"), t.slot_id),
            ukey_token::Interface::Skf => format!("SKF {}", t.slot_description),
        };
        writeln!(
            out,
            "{place} \"{}\"  {} {}  {} {}  [{}]",
            t.label,
            lang.pick("序列号", "serial"),
            t.id,
            t.manufacturer,
            t.model,
            pin_text(t.pin, lang),
        )?;
        let header = [
            lang.pick("证书序列号", "Certificate serial"),
            lang.pick("持有者", "Holder"),
            lang.pick("用途", "Usage"),
            lang.pick("算法", "Algorithm"),
            lang.pick("有效期至", "Valid until"),
            lang.pick("剩余天数", "Days left"),
            lang.pick("私钥", "Private key"),
        ];
        let mut rows: Vec<Vec<String>> = vec![header.iter().map(|s| (*s).to_owned()).collect()];
        for c in &l.certificates {
            let key = match c.key.has_private_key() {
                Some(true) => lang.pick("有", "yes"),
                Some(false) => lang.pick("无（孤立证书）", "none (orphan certificate)"),
                None => lang.pick("未知（需登录）", "unknown (login needed)"),
            };
            match &c.details {
                Ok(d) => {
                    let days = d.days_left(now);
                    let days = if d.is_expired(now) {
                        format!("{days} ({})", lang.pick("已过期", "expired"))
                    } else {
                        days.to_string()
                    };
                    rows.push(vec![
                        d.serial.clone(),
                        d.subject_cn.clone().unwrap_or_else(|| d.subject.clone()),
                        usage_text(d.usage, lang).to_owned(),
                        d.key_algorithm.clone(),
                        d.not_after.date().to_string(),
                        days,
                        key.to_owned(),
                    ]);
                }
                Err(_) => rows.push(vec![
                    lang.pick("（损坏）", "(corrupt)").to_owned(),
                    format!("{} {}", lang.pick("标签", "label"), c.label),
                    "-".into(),
                    "-".into(),
                    "-".into(),
                    "-".into(),
                    key.to_owned(),
                ]),
            }
        }
        if l.certificates.is_empty() {
            writeln!(out, "  {}", lang.pick("（没有证书）", "(no certificates)"))?;
        } else {
            let widths: Vec<usize> = (0..rows[0].len())
                .map(|col| {
                    rows.iter()
                        .map(|r| display_width(&r[col]))
                        .max()
                        .unwrap_or(0)
                })
                .collect();
            for r in &rows {
                let line: Vec<String> = r.iter().zip(&widths).map(|(s, w)| pad(s, *w)).collect();
                writeln!(out, "  {}", line.join("  ").trim_end())?;
            }
        }
        for c in &l.certificates {
            if let Err(e) = &c.details {
                writeln!(out, "  ! {}", e.user_message(lang))?;
            }
        }
        for k in &l.orphan_keys {
            writeln!(
                out,
                "  ! {} CKA_ID {} \"{}\" ({})",
                lang.pick(
                    "有密钥但没有对应证书（孤立密钥）：",
                    "key without a certificate (orphan key):"
                ),
                k.key_id,
                k.label,
                k.key_type
            )?;
        }
        for e in &l.errors {
            writeln!(out, "  ! {}", e.user_message(lang))?;
        }
    }
    Ok(())
}

/// Event times to the second: sub-second digits only clutter a line read by people.
fn event_time(now: OffsetDateTime) -> String {
    rfc3339(now.replace_nanosecond(0).unwrap_or(now))
}

pub fn event_json(ev: &TokenEvent, now: OffsetDateTime) -> serde_json::Value {
    match ev {
        TokenEvent::Inserted { token } => serde_json::json!({
            "event": "inserted",
            "time": event_time(now),
            "id": token.id,
            "slot_id": token.slot_id,
            "interface": token.interface,
            "label": token.label,
            "serial": token.serial,
            "manufacturer": token.manufacturer,
            "model": token.model,
        }),
        TokenEvent::Removed {
            slot_id,
            id,
            serial,
            label,
        } => serde_json::json!({
            "event": "removed",
            "time": event_time(now),
            "id": id,
            "slot_id": slot_id,
            "label": label,
            "serial": serial,
        }),
    }
}

pub fn event_text(ev: &TokenEvent, lang: Lang, now: OffsetDateTime) -> String {
    let when = event_time(now);
    match ev {
        TokenEvent::Inserted { token } => format!(
            "{when}  {}  {}  \"{}\"  {} {}",
            lang.pick("插入", "inserted"),
            match token.interface {
                ukey_token::Interface::Pkcs11 =>
                    format!("{} {}", lang.pick("槽位", "slot"), token.slot_id),
                ukey_token::Interface::Skf => format!("SKF {}", token.slot_description),
            },
            token.label,
            lang.pick("序列号", "serial"),
            token.id
        ),
        TokenEvent::Removed {
            slot_id, id, label, ..
        } => format!(
            "{when}  {}  {} {slot_id}  \"{label}\"  {} {id}",
            lang.pick("拔出", "removed"),
            lang.pick("槽位", "slot"),
            lang.pick("序列号", "serial"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chinese_characters_take_two_columns() {
        assert_eq!(display_width("张三"), 4);
        assert_eq!(display_width("abc"), 3);
        assert_eq!(pad("张三", 6), "张三  ");
    }
}
