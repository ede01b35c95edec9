//! Checks of one certificate on a token: validity, paired key, chain to the configured
//! trust anchors; and the verdict that sums them up.

use serde_json::json;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use ukey_token::{CertificateDetails, CertificateEntry, KeyEvidence};
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::report::{Check, Facts, Section, SectionKind, Status, Text, Verdict};
use crate::text;

/// A certificate trusted as the end of a chain (root or issuing CA), from `--trust`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustAnchor {
    /// The certificate, DER.
    pub der: Vec<u8>,
    /// Where it came from (file name), for the report.
    pub source: String,
}

impl TrustAnchor {
    /// Every certificate of a PEM file (or one DER certificate); each must be a CA
    /// certificate (`ukey_trust::Anchor::load`): a bad file is an error, never a
    /// silently dropped entry.
    pub fn load(path: &std::path::Path) -> Result<Vec<TrustAnchor>, crate::DiagnoseError> {
        Ok(ukey_trust::Anchor::load(path)
            .map_err(|e| crate::DiagnoseError::TrustAnchor {
                path: path.to_owned(),
                reason: e.reason,
            })?
            .into_iter()
            .map(|a| TrustAnchor {
                der: a.der,
                source: a.source,
            })
            .collect())
    }
}

/// Warn this many days before expiry, unless configured otherwise.
pub const DEFAULT_EXPIRY_WARNING_DAYS: i64 = 30;

pub(crate) fn rfc3339(t: OffsetDateTime) -> String {
    // Formatting a UTC time as RFC 3339 fails only for years outside 0..=9999.
    t.to_offset(time::UtcOffset::UTC)
        .format(&Rfc3339)
        .unwrap_or_else(|_| t.to_string())
}

fn usage_text(u: ukey_token::Usage) -> Text {
    match u {
        ukey_token::Usage::Signing => Text::new("签名", "signing"),
        ukey_token::Usage::Encryption => Text::new("加密", "encryption"),
        ukey_token::Usage::Both => Text::new("签名和加密", "signing and encryption"),
    }
}

/// Whether a certificate says it is a CA (basicConstraints cA=TRUE).
pub(crate) fn is_ca(der: &[u8]) -> bool {
    X509Certificate::from_der(der)
        .ok()
        .and_then(|(_, c)| c.basic_constraints().ok().flatten().map(|b| b.value.ca))
        .unwrap_or(false)
}

/// Section title for a certificate.
pub(crate) fn section_for(token_serial: &str, entry: &CertificateEntry) -> Section {
    let (id, title) = match &entry.details {
        Ok(d) => {
            let u = usage_text(d.usage);
            let cn = d.subject_cn.clone().unwrap_or_default();
            let serial = &d.serial;
            let (uz, ue) = (&u.zh_cn, &u.en);
            (
                format!("certificate:{token_serial}:{serial}"),
                text!(
                    "证书 {serial}（{uz}，{cn}）",
                    "Certificate {serial} ({ue}, {cn})"
                ),
            )
        }
        Err(_) => {
            let label = &entry.label;
            let key_id = entry.key_id_hex();
            (
                format!("certificate:{token_serial}:id-{key_id}"),
                text!("证书对象“{label}”", "Certificate object \"{label}\""),
            )
        }
    };
    Section::new(SectionKind::Certificate, id, title)
}

/// The validity check, with the certificate's description as facts.
pub(crate) fn validity_check(
    d: &CertificateDetails,
    entry: &CertificateEntry,
    ca: bool,
    now: OffsetDateTime,
    warn_days: i64,
) -> Check {
    let days = d.days_left(now);
    let facts = Facts::new()
        .with("serial", d.serial.clone())
        .with("subject", d.subject.clone())
        .with("issuer", d.issuer.clone())
        .with("not_before", rfc3339(d.not_before))
        .with("not_after", rfc3339(d.not_after))
        .with("days_left", days)
        .with("key_algorithm", d.key_algorithm.clone())
        .with("usage", d.usage.as_str())
        .with("ca", ca)
        .with("key_id", entry.key_id_hex())
        .with("label", entry.label.clone());
    let not_after = rfc3339(d.not_after);
    let not_before = rfc3339(d.not_before);
    let (status, state, reason, action) = if d.is_expired(now) {
        let ago = -days;
        (
            Status::Fail,
            "expired",
            text!(
                "证书已于 {not_after} 过期（{ago} 天前）。",
                "The certificate expired on {not_after} ({ago} days ago)."
            ),
            Some(Text::new(
                "过期证书无法在线更新时，请联系发证机构（CA）办理新证书。",
                "An expired certificate usually cannot be renewed online: contact the CA for a new one.",
            )),
        )
    } else if now < d.not_before {
        (
            Status::Fail,
            "not_yet_valid",
            text!(
                "证书要到 {not_before} 才生效。",
                "The certificate is not valid before {not_before}."
            ),
            Some(Text::new(
                "请检查电脑的日期和时间；若时间正确，请等到生效日期或联系发证机构。",
                "Check the computer's date and time; if it is right, wait until then or contact the CA.",
            )),
        )
    } else if days <= warn_days {
        (
            Status::Warn,
            "expiring",
            text!(
                "证书将在 {days} 天后过期（{not_after}）。",
                "The certificate expires in {days} days ({not_after})."
            ),
            Some(Text::new(
                "请尽快办理证书更新（ukey renew）。",
                "Renew the certificate soon (ukey renew).",
            )),
        )
    } else {
        (
            Status::Pass,
            "ok",
            text!(
                "证书有效，还有 {days} 天到期（{not_after}）。",
                "The certificate is valid for {days} more days ({not_after})."
            ),
            None,
        )
    };
    let mut check =
        Check::new("certificate.validity", status, reason).facts(facts.with("state", state));
    check.action = action;
    check
}

/// The paired-key check, from what listing (and the self-test's login) saw.
pub(crate) fn key_check(evidence: KeyEvidence, ca: bool) -> Check {
    let id = "certificate.key";
    let facts = Facts::new().with("key_evidence", json!(evidence));
    let check = match evidence {
        _ if ca => Check::new(
            id,
            Status::Skip,
            Text::new(
                "这是证书机构（CA）的证书，UKey 上不需要它的私钥。",
                "This is a certificate authority's certificate: its private key is not expected on the key.",
            ),
        ),
        KeyEvidence::PrivateKey => Check::new(
            id,
            Status::Pass,
            Text::new(
                "UKey 上有与证书配对的私钥。",
                "The certificate's private key is on the key.",
            ),
        ),
        KeyEvidence::PublicKey => Check::new(
            id,
            Status::Pass,
            Text::new(
                "UKey 上有与证书配对的公钥对象（私钥需登录才可见，按密钥对推断存在）。",
                "The key pair's public half is on the key (the private key shows only after login; inferred present).",
            ),
        ),
        KeyEvidence::Absent => Check::new(
            id,
            Status::Fail,
            Text::new(
                "孤立证书：UKey 上没有这张证书的私钥，证书无法用于签名或解密。",
                "Orphan certificate: its private key is not on the key, so it cannot sign or decrypt.",
            ),
        )
        .action(Text::new(
            "请联系发证机构（CA）重新签发证书；不要删除 UKey 上的其他对象。",
            "Contact the CA to have the certificate issued again; do not delete other objects on the key.",
        )),
        KeyEvidence::Unknown => Check::new(
            id,
            Status::Warn,
            Text::new(
                "不登录无法确认 UKey 上是否有这张证书的私钥（没有找到配对的公钥对象）。",
                "Without login it cannot be told whether the certificate's private key is on the key (no matching public key object).",
            ),
        )
        .action(Text::new(
            "使用 --pin-stdin 提供 PIN 码再次诊断，可以确认私钥是否存在。",
            "Run the diagnosis again with --pin-stdin to find out whether the private key is there.",
        )),
    };
    check.facts(facts)
}

/// The outcome of following a certificate's issuers to a trust anchor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Chain {
    /// Signed (through `path`) by an anchor.
    Trusted { path: Vec<String> },
    /// No anchor found; why.
    Untrusted { reason: Text, path: Vec<String> },
}

/// Validates `leaf` through `intermediates` (CA certificates on the token or from the
/// portal, not trusted by themselves) to one of `anchors`, with the one trust path
/// (`ukey_trust::verify`).
pub(crate) fn verify_chain(
    leaf: &[u8],
    anchors: &[TrustAnchor],
    intermediates: &[Vec<u8>],
    now: OffsetDateTime,
) -> Chain {
    let anchors: Vec<Vec<u8>> = anchors.iter().map(|a| a.der.clone()).collect();
    // The validity check speaks of the certificate's own dates: the chain is checked
    // within them, so an expired certificate is not also "untrusted".
    let at = match X509Certificate::from_der(leaf) {
        Ok((_, c)) => now
            .max(c.validity().not_before.to_datetime())
            .min(c.validity().not_after.to_datetime()),
        Err(_) => now,
    };
    match ukey_trust::verify(leaf, intermediates, &anchors, at) {
        Ok(v) => Chain::Trusted { path: v.path },
        Err(e) => Chain::Untrusted {
            reason: Text::new(e.explain(true), e.explain(false)),
            path: vec![],
        },
    }
}

pub(crate) fn chain_check(
    leaf: &[u8],
    anchors: &[TrustAnchor],
    intermediates: &[Vec<u8>],
    now: OffsetDateTime,
) -> Check {
    let id = "certificate.chain";
    if anchors.is_empty() {
        return Check::new(
            id,
            Status::Skip,
            Text::new(
                "没有配置信任锚，未检查证书链。",
                "No trust anchors configured; the chain was not checked.",
            ),
        )
        .action(Text::new(
            "用 --trust CA.pem 指定发证机构的根证书，可检查证书链。",
            "Give the CA's root certificate with --trust CA.pem to check the chain.",
        ));
    }
    match verify_chain(leaf, anchors, intermediates, now) {
        Chain::Trusted { path } => {
            let last = path.last().cloned().unwrap_or_default();
            Check::new(
                id,
                Status::Pass,
                text!(
                    "证书链验证通过，信任锚为“{last}”。",
                    "The certificate chains to the trust anchor \"{last}\"."
                ),
            )
            .facts(Facts::new().with("path", path))
        }
        Chain::Untrusted { reason, path } => Check::new(id, Status::Fail, reason)
            .action(Text::new(
                "这张证书不是配置的发证机构签发的：请确认信任锚（--trust）是否正确，或联系发证机构。",
                "This certificate was not issued by the configured CA: check the trust anchors (--trust), or contact the CA.",
            ))
            .facts(Facts::new().with("path", path)),
    }
}

pub(crate) fn corrupt_check(error: &ukey_token::Error, entry: &CertificateEntry) -> Check {
    Check::new(
        "certificate.parse",
        Status::Fail,
        Text::new(
            error.user_message(ukey_token::Lang::ZhCn),
            error.user_message(ukey_token::Lang::En),
        ),
    )
    .action(Text::new(
        "证书对象已损坏。请联系发证机构（CA）重新写入证书；不要自行删除 UKey 上的对象。",
        "The certificate object is damaged. Contact the CA to write the certificate again; do not delete objects on the key yourself.",
    ))
    .facts(
        Facts::new()
            .with("key_id", entry.key_id_hex())
            .with("label", entry.label.clone())
            .with("size", entry.der.len()),
    )
}

/// The verdict of a certificate section from its checks, most serious first.
pub(crate) fn verdict(section: &Section) -> (Verdict, Text) {
    let status = |id: &str| section.check(id).map(|c| c.status);
    let state = section
        .check("certificate.validity")
        .and_then(|c| c.facts.get("state"))
        .and_then(|v| v.as_str())
        .unwrap_or("");
    let days = section
        .check("certificate.validity")
        .and_then(|c| c.facts.get("days_left"))
        .and_then(|v| v.as_i64())
        .unwrap_or(0);
    let ca = section
        .check("certificate.validity")
        .and_then(|c| c.facts.get("ca"))
        .and_then(|v| v.as_bool())
        .unwrap_or(false);
    if status("certificate.parse") == Some(Status::Fail) {
        return (Verdict::Corrupt, Text::new("证书已损坏", "corrupt"));
    }
    if state == "expired" {
        return (Verdict::Expired, Text::new("已过期", "expired"));
    }
    if state == "not_yet_valid" {
        return (Verdict::NotYetValid, Text::new("尚未生效", "not yet valid"));
    }
    if ca {
        return (
            Verdict::CaCertificate,
            Text::new("CA 证书", "CA certificate"),
        );
    }
    if status("certificate.key") == Some(Status::Fail) {
        return (
            Verdict::Orphan,
            Text::new("孤立证书（无私钥）", "orphan (no private key)"),
        );
    }
    if status("certificate.chain") == Some(Status::Fail) {
        return (Verdict::Untrusted, Text::new("证书链不可信", "untrusted"));
    }
    if status("certificate.self_test") == Some(Status::Fail) {
        return (
            Verdict::SelfTestFailed,
            Text::new("自检失败", "self-test failed"),
        );
    }
    if state == "expiring" {
        return (
            Verdict::Expiring,
            text!("{days} 天后过期", "expiring in {days} days"),
        );
    }
    if status("certificate.key") == Some(Status::Warn) {
        return (
            Verdict::KeyUnknown,
            Text::new("私钥未确认", "private key not confirmed"),
        );
    }
    (Verdict::Ok, Text::new("正常", "ok"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn details(not_before: OffsetDateTime, not_after: OffsetDateTime) -> CertificateDetails {
        CertificateDetails {
            serial: "01".into(),
            subject: "CN=张三".into(),
            subject_cn: Some("张三".into()),
            subject_o: None,
            issuer: "CN=CA".into(),
            not_before,
            not_after,
            key_algorithm: "RSA-2048".into(),
            usage: ukey_token::Usage::Signing,
            public_key_info: vec![],
            is_ca: false,
        }
    }

    fn entry() -> CertificateEntry {
        CertificateEntry {
            key_id: vec![1],
            label: "sig".into(),
            der: vec![],
            details: Err(ukey_token::Error::CertificateMalformed {
                label: String::new(),
                key_id: String::new(),
                reason: String::new(),
            }),
            key: KeyEvidence::PublicKey,
        }
    }

    #[test]
    fn validity_states_at_their_edges() {
        let now = time::macros::datetime!(2026-06-01 00:00 UTC);
        let day = time::Duration::days(1);
        let state = |nb, na| {
            let c = validity_check(&details(nb, na), &entry(), false, now, 30);
            (
                c.status,
                c.facts.get("state").unwrap().as_str().unwrap().to_owned(),
            )
        };
        assert_eq!(
            state(now - day, now + day * 31),
            (Status::Pass, "ok".into())
        );
        assert_eq!(
            state(now - day, now + day * 30),
            (Status::Warn, "expiring".into())
        );
        assert_eq!(
            state(now - day * 10, now - day),
            (Status::Fail, "expired".into())
        );
        assert_eq!(
            state(now + day, now + day * 400),
            (Status::Fail, "not_yet_valid".into())
        );
        let mut s = Section::new(SectionKind::Certificate, "c", Text::same("c"));
        s.checks.push(validity_check(
            &details(now + day, now + day * 400),
            &entry(),
            false,
            now,
            30,
        ));
        assert_eq!(verdict(&s).0, Verdict::NotYetValid);
    }
}
