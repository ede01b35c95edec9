//! The CA's portal, only when one is given: reachable, TLS, the computer's clock against
//! the portal's `Date` header, and the renewal status of each certificate.
//!
//! Everything goes through `ukey-portal-client` (the only crate that speaks HTTP to a
//! portal): its `probe()` gives the raw HTTP status, round trip and `Date` even of an
//! error answer, `status()` the renewal status, as renewal sees it.
//!
//! Requests carry no personal data: a status request is the certificate's issuer and
//! serial (public in every signature the holder makes).

use std::time::{Duration, SystemTime};

use ukey_portal_api::{RenewalStatus, StatusRequest};
use ukey_portal_client::{ClientError, PortalClient};
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::certificate::TrustAnchor;
use crate::report::{Check, Facts, Section, SectionKind, Status, Text};
use crate::text;

/// Clock skew above which renewal is at risk (a new certificate may look not yet valid).
pub const SKEW_WARN: Duration = Duration::from_secs(60);
/// Clock skew above which renewal refuses to start.
pub const SKEW_FAIL: Duration = Duration::from_secs(300);

/// Timeout of each request to the portal.
const TIMEOUT: Duration = Duration::from_secs(10);

/// The portal client: system roots plus the trust anchors (a CA's own portal may use a
/// certificate from its own CA).
fn client(url: &str, anchors: &[TrustAnchor]) -> Result<PortalClient, ClientError> {
    let roots: Vec<Vec<u8>> = anchors
        .iter()
        .map(|a| pem::encode(&pem::Pem::new("CERTIFICATE", a.der.clone())).into_bytes())
        .collect();
    PortalClient::with_roots(url, &roots).map(|c| c.timeout(TIMEOUT))
}

/// The portal's issuing CA certificates (`GET /api/v1/ca`), used as intermediates
/// (never as trust anchors) when checking chains: users are given the root. Empty if
/// the portal cannot be asked; what is not a CA certificate is left out.
pub(crate) fn fetch_ca(url: &str, anchors: &[TrustAnchor]) -> Vec<Vec<u8>> {
    let answer = client(url, anchors).and_then(|c| c.ca_certificates());
    match answer {
        Ok(answer) => answer
            .value
            .into_iter()
            .filter(|der| crate::certificate::is_ca(der))
            .collect(),
        Err(e) => {
            tracing::debug!("portal CA certificate not fetched: {e}");
            Vec::new()
        }
    }
}

/// Runs the portal checks. `certificates` are (token serial, DER) of the certificates
/// found on tokens.
pub(crate) fn diagnose(
    url: &str,
    anchors: &[TrustAnchor],
    certificates: &[(String, Vec<u8>)],
) -> Section {
    let mut section = Section::new(
        SectionKind::Portal,
        "portal",
        text!("发证机构门户 {url}", "CA portal {url}"),
    );
    let base = url.trim_end_matches('/').to_owned();
    let portal = match client(&base, anchors) {
        Ok(p) => p,
        Err(ClientError::InvalidUrl { reason, .. }) => {
            section.checks.push(
                Check::new(
                    "portal.reach",
                    Status::Fail,
                    text!(
                        "“{url}”不是可用的网址：{reason}",
                        "\"{url}\" is not a usable URL: {reason}"
                    ),
                )
                .action(Text::new(
                    "请给出门户的完整网址，例如 https://portal.example.cn",
                    "Give the portal's full URL, e.g. https://portal.example.cn",
                )),
            );
            return section;
        }
        Err(e) => {
            let detail = e.to_string();
            section.checks.push(Check::new(
                "portal.reach",
                Status::Fail,
                text!(
                    "无法创建 HTTPS 客户端：{detail}",
                    "Cannot set up the HTTPS client: {detail}"
                ),
            ));
            return section;
        }
    };
    let https = portal.is_https();

    // Reachability and Date: any HTTP answer will do.
    let probe = match portal.probe() {
        Ok(p) => p,
        Err(e) => {
            let detail = e.to_string();
            let facts = Facts::new()
                .with("url", base.clone())
                .with("error_code", e.code())
                .with("error", detail.clone());
            match &e {
                ClientError::Tls { reason, .. } if https => {
                    section.checks.push(
                        Check::new(
                            "portal.reach",
                            Status::Pass,
                            Text::new("门户可以连接（TCP）。", "The portal answers (TCP)."),
                        )
                        .facts(Facts::new().with("url", base.clone())),
                    );
                    section.checks.push(
                        Check::new(
                            "portal.tls",
                            Status::Fail,
                            text!(
                                "与门户的安全连接（TLS）失败：{reason}",
                                "The secure connection (TLS) to the portal failed: {reason}"
                            ),
                        )
                        .action(Text::new(
                            "请检查电脑时间是否正确、是否有代理或安全软件拦截 HTTPS；必要时用 --trust 指定门户的 CA 证书。",
                            "Check the computer's clock and for a proxy or security software intercepting HTTPS; give the portal's CA with --trust if it has its own.",
                        ))
                        .facts(facts),
                    );
                }
                _ => {
                    let (zh, en) = if matches!(e, ClientError::Timeout { .. }) {
                        ("连接门户超时", "Connecting to the portal timed out")
                    } else {
                        ("无法连接门户", "Cannot reach the portal")
                    };
                    section.checks.push(
                        Check::new(
                            "portal.reach",
                            Status::Fail,
                            text!("{zh}：{detail}", "{en}: {detail}"),
                        )
                        .action(Text::new(
                            "请检查网络连接、代理设置和门户网址；在浏览器中打开门户网址试试。",
                            "Check the network, the proxy settings and the portal URL; try opening it in a browser.",
                        ))
                        .facts(facts),
                    );
                }
            }
            section.checks.push(Check::new(
                "portal.clock",
                Status::Skip,
                Text::new(
                    "门户无法访问，未检查时钟。",
                    "Portal unreachable; clock not checked.",
                ),
            ));
            return section;
        }
    };
    let http_status = probe.http_status;
    let rtt_ms = u64::try_from(probe.round_trip.as_millis()).unwrap_or(u64::MAX);
    section.checks.push(
        Check::new(
            "portal.reach",
            Status::Pass,
            text!(
                "门户可以访问（HTTP {http_status}，{rtt_ms} 毫秒）。",
                "The portal answers (HTTP {http_status}, {rtt_ms} ms)."
            ),
        )
        .facts(
            Facts::new()
                .with("url", base.clone())
                .with("http_status", http_status)
                .with("round_trip_ms", rtt_ms),
        ),
    );
    section.checks.push(if probe.tls_verified {
        Check::new(
            "portal.tls",
            Status::Pass,
            Text::new(
                "与门户的 HTTPS 连接已建立，证书验证通过。",
                "HTTPS to the portal works and its certificate was verified.",
            ),
        )
    } else if portal.is_loopback() {
        Check::new(
            "portal.tls",
            Status::Skip,
            Text::new(
                "本机测试门户使用明文 HTTP。",
                "A local test portal over plain HTTP.",
            ),
        )
    } else {
        Check::new(
            "portal.tls",
            Status::Warn,
            Text::new(
                "门户网址不是 HTTPS：通信没有加密。",
                "The portal URL is not HTTPS: traffic is not encrypted.",
            ),
        )
        .action(Text::new(
            "请使用发证机构提供的 https:// 网址。",
            "Use the https:// URL the CA gives.",
        ))
    });
    section.checks.push(clock_check(
        probe.date_header.as_deref(),
        probe.local_midpoint(),
    ));

    // The renewal status, through the same client as renewal uses.
    for (token_serial, der) in certificates {
        section
            .checks
            .push(status_check(&portal, token_serial, der));
    }
    section
}

/// Compares the portal's `Date` with the local time at the middle of the request.
pub(crate) fn clock_check(date: Option<&str>, local: SystemTime) -> Check {
    let id = "portal.clock";
    let Some(date) = date else {
        return Check::new(
            id,
            Status::Warn,
            Text::new(
                "门户的回应没有 Date 头，无法检查电脑时钟。",
                "The portal sent no Date header: the clock cannot be checked.",
            ),
        );
    };
    let Ok(server) = httpdate::parse_http_date(date) else {
        return Check::new(
            id,
            Status::Warn,
            text!(
                "门户的 Date 头“{date}”无法解析。",
                "The portal's Date header \"{date}\" cannot be parsed."
            ),
        );
    };
    // Positive: the local clock is ahead of the portal's.
    let skew: i64 = match local.duration_since(server) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_secs()).unwrap_or(i64::MAX),
    };
    let abs = skew.unsigned_abs();
    let facts = Facts::new()
        .with("portal_date", date)
        .with("skew_seconds", skew)
        .with("warn_above_seconds", SKEW_WARN.as_secs())
        .with("fail_above_seconds", SKEW_FAIL.as_secs());
    let (zh_dir, en_dir) = if skew > 0 {
        ("快", "ahead")
    } else {
        ("慢", "behind")
    };
    if abs > SKEW_FAIL.as_secs() {
        Check::new(
            id,
            Status::Fail,
            text!(
                "电脑时钟比门户{zh_dir}了 {abs} 秒：证书更新会失败（新证书可能显示为尚未生效）。",
                "The computer's clock is {abs} s {en_dir} of the portal's: renewal will fail (the new certificate may look not yet valid)."
            ),
        )
        .action(Text::new(
            "请把电脑的日期、时间和时区设为正确（开启自动网络对时），再重试。",
            "Set the computer's date, time and time zone right (turn on network time), then retry.",
        ))
        .facts(facts)
    } else if abs > SKEW_WARN.as_secs() {
        Check::new(
            id,
            Status::Warn,
            text!(
                "电脑时钟比门户{zh_dir}了 {abs} 秒。",
                "The computer's clock is {abs} s {en_dir} of the portal's."
            ),
        )
        .action(Text::new("建议开启自动网络对时。", "Turn on network time."))
        .facts(facts)
    } else {
        Check::new(
            id,
            Status::Pass,
            text!(
                "电脑时钟与门户一致（相差 {abs} 秒）。",
                "The computer's clock agrees with the portal's ({abs} s apart)."
            ),
        )
        .facts(facts)
    }
}

fn status_check(portal: &PortalClient, token_serial: &str, der: &[u8]) -> Check {
    let id = "portal.status";
    let Ok((_, cert)) = X509Certificate::from_der(der) else {
        return Check::new(
            id,
            Status::Skip,
            Text::new("证书无法解析。", "Unparseable certificate."),
        );
    };
    let serial = ukey_token::certificate::openssl_serial(cert.raw_serial());
    let request = StatusRequest {
        issuer_der: Some(cert.issuer().as_raw().to_vec()),
        issuer_dn: Some(ukey_token::certificate::format_name(cert.issuer())),
        serial_hex: serial.clone(),
    };
    let facts = Facts::new()
        .with("token_serial", token_serial)
        .with("certificate_serial", serial.clone());
    let status = match portal.status(&request) {
        Ok(answer) => answer.value,
        Err(e) => {
            let detail = e.to_string();
            return Check::new(
                id,
                Status::Warn,
                text!(
                    "无法查询证书 {serial} 的更新状态：{detail}",
                    "Cannot look up the renewal status of certificate {serial}: {detail}"
                ),
            )
            .facts(facts.with("error_code", e.code()).with("error", detail));
        }
    };
    let state = serde_json::to_value(&status)
        .ok()
        .and_then(|v| v.get("state").and_then(|s| s.as_str()).map(str::to_owned))
        .unwrap_or_default();
    let facts = facts
        .with("state", state.clone())
        .with("status", serde_json::to_value(&status).unwrap_or_default());
    let (st, reason, action): (Status, Text, Option<Text>) = match &status {
        RenewalStatus::None => (
            Status::Pass,
            text!(
                "证书 {serial}：门户上没有更新订单。",
                "Certificate {serial}: no renewal order at the portal."
            ),
            None,
        ),
        RenewalStatus::AwaitingPayment { payment_url, .. } => (
            Status::Warn,
            text!(
                "证书 {serial}：更新订单等待付款。",
                "Certificate {serial}: the renewal order awaits payment."
            ),
            Some(text!(
                "请在门户付款：{payment_url}",
                "Pay at the portal: {payment_url}"
            )),
        ),
        RenewalStatus::Ready { .. } => (
            Status::Pass,
            text!(
                "证书 {serial}：已付款，可以立即更新。",
                "Certificate {serial}: paid, ready to renew now."
            ),
            Some(Text::new(
                "运行 ukey renew 更新证书。",
                "Run ukey renew to renew it.",
            )),
        ),
        RenewalStatus::Issued { .. } => (
            Status::Warn,
            text!(
                "证书 {serial}：新证书已签发，但还没有确认写入 UKey。",
                "Certificate {serial}: the new certificate was issued but its installation is not confirmed."
            ),
            Some(Text::new(
                "插入 UKey 并运行 ukey renew 完成更新。",
                "Insert the key and run ukey renew to finish.",
            )),
        ),
        RenewalStatus::UnderReview { .. } => (
            Status::Warn,
            text!(
                "证书 {serial}：更新申请正在审核中，尚未签发。",
                "Certificate {serial}: the renewal is under review; nothing is issued yet."
            ),
            Some(Text::new(
                "等待审核结果；审核通过后运行 ukey renew。",
                "Wait for the review; once approved, run ukey renew.",
            )),
        ),
        RenewalStatus::Completed { .. } => (
            Status::Pass,
            text!(
                "证书 {serial}：更新已完成。",
                "Certificate {serial}: renewal completed."
            ),
            None,
        ),
        _ => (
            Status::Warn,
            text!(
                "证书 {serial}：订单状态为 {state}。",
                "Certificate {serial}: the order's state is {state}."
            ),
            Some(Text::new(
                "请查看门户上的订单详情，或联系发证机构。",
                "See the order at the portal, or contact the CA.",
            )),
        ),
    };
    let mut c = Check::new(id, st, reason).facts(facts);
    c.action = action;
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unusable_url_fails_reach_without_any_request() {
        for url in ["portal.example.cn", "ftp://portal.example.cn", "https://"] {
            let section = diagnose(url, &[], &[]);
            let reach = section.check("portal.reach").unwrap();
            assert_eq!(reach.status, Status::Fail, "{url}: {reach:?}");
            assert!(
                reach.reason.en.contains("not a usable URL"),
                "{url}: {reach:?}"
            );
            assert!(reach.action.is_some());
            assert_eq!(section.checks.len(), 1, "{url}: nothing else was tried");
        }
    }

    #[test]
    fn clock_skew_thresholds() {
        let now = SystemTime::now();
        let date = |t: SystemTime| httpdate::fmt_http_date(t);
        let status = |offset: i64| {
            let portal = if offset >= 0 {
                now - Duration::from_secs(offset.unsigned_abs())
            } else {
                now + Duration::from_secs(offset.unsigned_abs())
            };
            clock_check(Some(&date(portal)), now).status
        };
        assert_eq!(status(0), Status::Pass);
        assert_eq!(status(30), Status::Pass);
        assert_eq!(status(-120), Status::Warn);
        assert_eq!(status(600), Status::Fail);
        assert_eq!(status(-3600), Status::Fail);
        assert_eq!(clock_check(None, now).status, Status::Warn);
        assert_eq!(clock_check(Some("yesterday"), now).status, Status::Warn);
    }
}
