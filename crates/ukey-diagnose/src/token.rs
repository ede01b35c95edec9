//! Checks of one token: what it is, its PIN state, memory, the mechanisms renewal needs,
//! whether it could be read to the end; then its certificates and orphan keys.

use serde_json::json;
use time::OffsetDateTime;
use ukey_token::cryptoki::mechanism::MechanismType;
use ukey_token::{CertificateEntry, Error, KeyEvidence, Module, TokenListing, TokenSummary};

use crate::Options;
use crate::certificate;
use crate::redact;
use crate::report::{Check, Facts, Section, SectionKind, Status, Text, Verdict};
use crate::selftest;
use crate::text;

/// Below this many free bytes, a new key pair and certificate may not fit.
const LOW_MEMORY_BYTES: usize = 8 * 1024;

/// What the diagnosis of one token produced.
pub(crate) struct TokenResult {
    /// The token's section, then its certificates' and orphan keys' sections.
    pub(crate) sections: Vec<Section>,
    /// Parsed certificates (DER) for the portal's status check, with the token serial.
    pub(crate) certificates: Vec<(String, Vec<u8>)>,
    /// Personal values seen in subjects.
    pub(crate) personal: Vec<String>,
}

fn token_title(t: &TokenSummary) -> Text {
    let (label, serial) = (&t.label, &t.serial);
    text!(
        "UKey “{label}”（序列号 {serial}）",
        "Token \"{label}\" (serial {serial})"
    )
}

fn info_check(t: &TokenSummary) -> Check {
    let facts = Facts::new()
        .with("label", t.label.clone())
        .with("serial", t.serial.clone())
        .with("manufacturer", t.manufacturer.clone())
        .with("model", t.model.clone())
        .with("hardware_version", t.hardware_version.clone())
        .with("firmware_version", t.firmware_version.clone())
        .with("slot_id", t.slot_id)
        .with("slot_description", t.slot_description.clone())
        .with("interface", json!(t.interface))
        .with("flags", json!(t.flags));
    let (maker, model, fw) = (&t.manufacturer, &t.model, &t.firmware_version);
    if t.flags.write_protected {
        return Check::new(
            "token.info",
            Status::Warn,
            text!(
                "{maker} {model}，固件 {fw}；UKey 处于写保护状态，无法写入新证书。",
                "{maker} {model}, firmware {fw}; the token is write-protected: a new certificate cannot be written."
            ),
        )
        .action(Text::new(
            "请联系 UKey 厂商或发证机构解除写保护。",
            "Ask the vendor or the CA to lift the write protection.",
        ))
        .facts(facts);
    }
    Check::new(
        "token.info",
        Status::Pass,
        text!(
            "{maker} {model}，固件 {fw}",
            "{maker} {model}, firmware {fw}"
        ),
    )
    .facts(facts)
}

/// One warning per field the module filled in its own way, with the raw value: the key
/// still works (the field is shown decoded or as unknown), but support should know.
fn quirk_checks(t: &TokenSummary) -> Vec<Check> {
    t.quirks
        .iter()
        .map(|q| {
            let serial_shared = q.kind == ukey_token::QuirkKind::SerialNotUnique;
            Check::new(
                "token.quirk",
                Status::Warn,
                Text::new(
                    q.describe(ukey_token::Lang::ZhCn),
                    q.describe(ukey_token::Lang::En),
                ),
            )
            .action(if serial_shared {
                Text::new(
                    "一次只插一把 UKey；若同时插入多把，请按标签区分。",
                    "Plug in one key at a time; with several, tell them apart by their labels.",
                )
            } else {
                Text::new(
                    "不影响使用；可将此报告发给 UKey 厂商。",
                    "The key still works; you may send this report to the key's vendor.",
                )
            })
            .facts(
                Facts::new()
                    .with("field", q.field)
                    .with("kind", json!(q.kind))
                    .with("raw", q.raw.clone()),
            )
        })
        .collect()
}

/// Plain-language PIN state. The standard flags do not carry the number of tries left;
/// `tries_remaining` is `null` unless a module tells it some other way.
fn pin_check(t: &TokenSummary) -> (Check, Option<Verdict>) {
    let p = t.pin;
    let facts = Facts::new()
        .with("initialized", p.initialized)
        .with("count_low", p.count_low)
        .with("final_try", p.final_try)
        .with("locked", p.locked)
        .with("to_be_changed", p.to_be_changed)
        .with(
            "protected_authentication_path",
            p.protected_authentication_path,
        )
        .with("tries_remaining", json!(p.tries_left))
        .with("max_tries", json!(p.max_tries));
    let id = "token.pin";
    // An SKF key says how many tries are left.
    let left = p.tries_left.filter(|_| !p.locked);
    let (check, verdict) = if p.locked {
        (
            Check::new(
                id,
                Status::Fail,
                Text::new("PIN 码已锁定。", "The PIN is locked."),
            )
            .action(Text::new(
                "请联系发证机构（CA）解锁；不要再尝试输入 PIN。",
                "Contact the CA to unlock it; do not try again.",
            )),
            Some(Verdict::PinLocked),
        )
    } else if p.final_try {
        (
            Check::new(
                id,
                Status::Warn,
                Text::new(
                    "PIN 码只剩最后一次机会：再输错一次 UKey 就会锁定。",
                    "One try left: one more wrong PIN locks the key.",
                ),
            )
            .action(Text::new(
                "只在确定 PIN 码正确时输入；不确定时请先联系发证机构（CA）。",
                "Enter the PIN only when sure it is right; if unsure, contact the CA first.",
            )),
            Some(Verdict::PinFinalTry),
        )
    } else if p.count_low {
        (
            Check::new(
                id,
                Status::Warn,
                match left {
                    Some(n) => text!(
                        "上次正确登录后输错过 PIN 码：还剩 {n} 次尝试。",
                        "A wrong PIN was entered since the last correct one: PIN: {n} tries left."
                    ),
                    None => Text::new(
                        "上次正确登录后输错过 PIN 码，剩余尝试次数已减少（UKey 未报告具体次数）。",
                        "A wrong PIN was entered since the last correct one; fewer tries remain (the key does not say how many).",
                    ),
                },
            )
            .action(Text::new(
                "下次输入 PIN 码时请仔细核对；输对一次后计数会恢复。",
                "Type the PIN carefully next time; one correct entry resets the count.",
            )),
            Some(Verdict::PinCountLow),
        )
    } else if !p.initialized {
        (
            Check::new(
                id,
                Status::Fail,
                Text::new("UKey 还没有设置用户 PIN 码。", "The user PIN is not set."),
            )
            .action(Text::new(
                "请联系发证机构（CA）初始化 UKey。",
                "Contact the CA to initialise the key.",
            )),
            Some(Verdict::Trouble),
        )
    } else if p.to_be_changed {
        (
            Check::new(
                id,
                Status::Warn,
                Text::new(
                    "UKey 要求先修改 PIN 码。",
                    "The key requires the PIN to be changed first.",
                ),
            )
            .action(Text::new(
                "请用 UKey 厂商的管理工具修改 PIN 码。",
                "Change the PIN with the vendor's key manager.",
            )),
            None,
        )
    } else {
        (
            Check::new(
                id,
                Status::Pass,
                match left {
                    Some(n) => text!(
                        "PIN 码状态正常：剩余 {n} 次尝试。",
                        "The PIN is in good standing: PIN: {n} tries left."
                    ),
                    None => Text::new("PIN 码状态正常。", "The PIN is in good standing."),
                },
            ),
            None,
        )
    };
    (check.facts(facts), verdict)
}

fn memory_check(t: &TokenSummary) -> Check {
    let id = "token.memory";
    let facts = Facts::new()
        .with("free_public_memory", t.free_public_memory)
        .with("free_private_memory", t.free_private_memory);
    let free = [t.free_public_memory, t.free_private_memory]
        .into_iter()
        .flatten()
        .min();
    match free {
        None => Check::new(
            id,
            Status::Skip,
            Text::new(
                "UKey 没有报告剩余存储空间。",
                "The key does not report its free memory.",
            ),
        )
        .facts(facts),
        Some(n) if n < LOW_MEMORY_BYTES => Check::new(
            id,
            Status::Warn,
            text!(
                "UKey 剩余存储空间只有 {n} 字节，可能放不下新的密钥和证书。",
                "Only {n} bytes free on the key: a new key pair and certificate may not fit."
            ),
        )
        .action(Text::new(
            "请联系发证机构（CA），由其清理旧对象；不要自行删除。",
            "Contact the CA to clean up old objects; do not delete them yourself.",
        ))
        .facts(facts),
        Some(n) => Check::new(
            id,
            Status::Pass,
            text!("剩余存储空间 {n} 字节。", "{n} bytes free."),
        )
        .facts(facts),
    }
}

/// The mechanisms renewal needs for the key algorithms and usages on the token.
fn required_mechanisms(certs: &[CertificateEntry]) -> Vec<(MechanismType, &'static str)> {
    let parsed: Vec<_> = certs
        .iter()
        .filter_map(|c| c.details.as_ref().ok())
        .filter(|_| true)
        .collect();
    let rsa = parsed.iter().any(|d| d.key_algorithm.starts_with("RSA"));
    let ec = parsed.iter().any(|d| d.key_algorithm.starts_with("EC-"));
    let encryption = |want_rsa: bool| {
        parsed.iter().any(|d| {
            d.key_algorithm.starts_with("RSA") == want_rsa && d.usage != ukey_token::Usage::Signing
        })
    };
    let mut out = Vec::new();
    // A token with no (parsed) certificate: renewal of an RSA key is the common case.
    if rsa || !ec {
        out.push((MechanismType::RSA_PKCS_KEY_PAIR_GEN, "keygen"));
        out.push((MechanismType::SHA256_RSA_PKCS, "sign"));
        if encryption(true) {
            out.push((MechanismType::RSA_PKCS_OAEP, "unwrap"));
            out.push((MechanismType::AES_KEY_WRAP_PAD, "unwrap"));
        }
    }
    if ec {
        out.push((MechanismType::ECC_KEY_PAIR_GEN, "keygen"));
        out.push((MechanismType::ECDSA, "sign"));
        if encryption(false) {
            out.push((MechanismType::ECDH1_DERIVE, "unwrap"));
            out.push((MechanismType::AES_KEY_WRAP_PAD, "unwrap"));
        }
    }
    out.dedup_by_key(|(m, _)| *m);
    out
}

/// Alternatives that do the same job: a token with RSA_PKCS signs with a software hash.
fn satisfied(have: &[MechanismType], need: MechanismType) -> bool {
    have.contains(&need)
        || (need == MechanismType::SHA256_RSA_PKCS && have.contains(&MechanismType::RSA_PKCS))
        || (need == MechanismType::ECDSA && have.contains(&MechanismType::ECDSA_SHA256))
}

/// An SKF key: the interface, and the library functions a renewal needs (SM2 only).
fn skf_functions_check(skf: &ukey_token::skf::SkfBackend, certs: &[CertificateEntry]) -> Check {
    let lib = skf.library();
    let has_encryption = certs.iter().any(|c| {
        c.details
            .as_ref()
            .is_ok_and(|d| d.usage == ukey_token::Usage::Encryption)
    });
    let missing = skf.missing_for_renewal(has_encryption);
    let rsa = certs.iter().any(|c| {
        c.details
            .as_ref()
            .is_ok_and(|d| d.key_algorithm.starts_with("RSA"))
    });
    let facts = Facts::new()
        .with("interface", "skf")
        .with("library", lib.path().display().to_string())
        .with("missing_functions", json!(missing))
        .with("device_events", lib.has_events());
    let path = lib.path().display().to_string();
    if !missing.is_empty() {
        let list = missing.join(", ");
        return Check::new(
            "token.mechanisms",
            Status::Fail,
            text!(
                "通过 SKF（GM/T 0016）接口使用（{path}）；驱动缺少续期所需的函数：{list}。",
                "Used through SKF (GM/T 0016) ({path}); the library lacks what a renewal needs: {list}."
            ),
        )
        .action(Text::new(
            "请安装 UKey 厂商最新的 SKF 驱动，或联系发证机构（CA）。",
            "Install the vendor's latest SKF library, or contact the CA.",
        ))
        .facts(facts);
    }
    if rsa {
        return Check::new(
            "token.mechanisms",
            Status::Warn,
            text!(
                "通过 SKF（GM/T 0016）接口使用（{path}）；RSA 容器只能列出，续期只支持 SM2。",
                "Used through SKF (GM/T 0016) ({path}); RSA containers are listed only: renewals are SM2."
            ),
        )
        .action(Text::new(
            "RSA 证书的续期请联系发证机构（CA），或使用 UKey 的 PKCS#11 驱动。",
            "For an RSA certificate, contact the CA, or use the key's PKCS#11 module.",
        ))
        .facts(facts);
    }
    Check::new(
        "token.mechanisms",
        Status::Pass,
        text!(
            "通过 SKF（GM/T 0016）接口使用（{path}）；SM2 续期所需的函数齐全。",
            "Used through SKF (GM/T 0016) ({path}); it has what an SM2 renewal needs."
        ),
    )
    .facts(facts)
}

fn mechanism_check(have: &[MechanismType], certs: &[CertificateEntry]) -> Check {
    let id = "token.mechanisms";
    let need = required_mechanisms(certs);
    let missing: Vec<String> = need
        .iter()
        .filter(|(m, _)| !satisfied(have, *m))
        .map(|(m, purpose)| format!("{m} ({purpose})"))
        .collect();
    let facts = Facts::new()
        .with(
            "required",
            need.iter()
                .map(|(m, p)| json!({"mechanism": m.to_string(), "purpose": p}))
                .collect::<Vec<_>>(),
        )
        .with("missing", missing.clone())
        .with("count", have.len())
        .with(
            "all",
            have.iter().map(|m| m.to_string()).collect::<Vec<_>>(),
        );
    if missing.is_empty() {
        let n = need.len();
        let mut zh = vec![];
        let mut en = vec![];
        for (purpose, z, e) in [
            ("keygen", "生成密钥", "key generation"),
            ("sign", "签名", "signing"),
            ("unwrap", "解包加密密钥", "unwrapping the encryption key"),
        ] {
            if need.iter().any(|(_, p)| *p == purpose) {
                zh.push(z);
                en.push(e);
            }
        }
        let (zh, en) = (zh.join("、"), en.join(", "));
        Check::new(
            id,
            Status::Pass,
            text!(
                "UKey 支持更新所需的 {n} 种算法机制（{zh}）。",
                "The key supports the {n} mechanisms renewal needs ({en})."
            ),
        )
        .facts(facts)
    } else {
        let list = missing.join(", ");
        Check::new(
            id,
            Status::Fail,
            text!(
                "UKey 缺少更新所需的算法机制：{list}。",
                "The key lacks mechanisms renewal needs: {list}."
            ),
        )
        .action(Text::new(
            "这把 UKey 无法在线更新证书：请联系发证机构（CA）更换 UKey，或更新厂商驱动后再试。",
            "This key cannot renew online: contact the CA for a new key, or update the vendor driver and retry.",
        ))
        .facts(facts)
    }
}

fn is_removal(e: &Error) -> bool {
    matches!(
        e,
        Error::TokenRemoved { .. } | Error::TokenNotPresent { .. }
    )
}

fn read_check(listing: &TokenListing, extra: &[Error]) -> Check {
    let id = "token.read";
    let errors: Vec<&Error> = listing.errors.iter().chain(extra.iter()).collect();
    let facts = Facts::new()
        .with("certificates", listing.certificates.len())
        .with("orphan_keys", listing.orphan_keys.len())
        .with("private_objects_visible", listing.private_objects_visible)
        .with(
            "errors",
            errors
                .iter()
                .map(|e| json!({"code": e.code(), "message": e.to_string()}))
                .collect::<Vec<_>>(),
        );
    if let Some(e) = errors.iter().find(|e| is_removal(e)) {
        let zh = e.user_message(ukey_token::Lang::ZhCn);
        let en = e.user_message(ukey_token::Lang::En);
        return Check::new(
            id,
            Status::Fail,
            text!(
                "诊断过程中 UKey 被拔出或无法访问：{zh}",
                "The key was removed or became unreachable during the diagnosis: {en}"
            ),
        )
        .action(Text::new(
            "请把 UKey 插牢（必要时换一个 USB 口），再重新诊断。",
            "Insert the key firmly (try another USB port if needed) and run the diagnosis again.",
        ))
        .facts(facts);
    }
    if let Some(e) = errors.first() {
        let zh = e.user_message(ukey_token::Lang::ZhCn);
        let en = e.user_message(ukey_token::Lang::En);
        return Check::new(
            id,
            Status::Warn,
            text!(
                "部分对象无法读取：{zh}",
                "Some objects could not be read: {en}"
            ),
        )
        .action(Text::new(
            "请重新插入 UKey 后再诊断；如仍失败，请把报告发给技术支持。",
            "Re-insert the key and run again; if it persists, send this report to support.",
        ))
        .facts(facts);
    }
    let n = listing.certificates.len();
    let k = listing.orphan_keys.len();
    Check::new(
        id,
        Status::Pass,
        text!(
            "已读取 UKey：{n} 张证书，{k} 个无证书的密钥。",
            "The key was read: {n} certificate(s), {k} key(s) without a certificate."
        ),
    )
    .facts(facts)
}

fn orphan_key_section(
    token_serial: &str,
    key_id: &str,
    class: &str,
    label: &str,
    key_type: &str,
) -> Section {
    let mut s = Section::new(
        SectionKind::OrphanKey,
        format!("key:{token_serial}:{key_id}"),
        text!(
            "无证书的密钥 {key_id}",
            "Key {key_id} without a certificate"
        ),
    );
    s.verdict = Some(Verdict::Orphan);
    s.summary = Some(Text::new("孤立密钥", "orphan key"));
    s.checks.push(
        Check::new(
            "key.orphan",
            Status::Warn,
            Text::new(
                "孤立密钥：UKey 上有一个没有对应证书的密钥，可能是中断的证书更新留下的，或旧证书已被删除。",
                "Orphan key: a key on the token has no certificate. An interrupted renewal may have left it, or its certificate was removed.",
            ),
        )
        .action(Text::new(
            "不要自行删除（它可能还能解密旧文件）；如有未完成的证书更新，请先完成；否则请联系技术支持。",
            "Do not delete it yourself (it may still decrypt old files). Finish any unfinished renewal first; otherwise contact support.",
        ))
        .facts(
            Facts::new()
                .with("key_id", key_id)
                .with("class", class)
                .with("label", label)
                .with("key_type", key_type),
        ),
    );
    s
}

/// Diagnoses one token. Never writes to it.
pub(crate) fn diagnose(
    module: &Module,
    token: &TokenSummary,
    options: &Options,
    extra_intermediates: &[Vec<u8>],
    several: bool,
    now: OffsetDateTime,
) -> TokenResult {
    let mut section = Section::new(
        SectionKind::Token,
        format!("token:{}", token.serial),
        token_title(token),
    );
    section.checks.push(info_check(token));
    section.checks.extend(quirk_checks(token));
    let (pin, pin_verdict) = pin_check(token);
    section.checks.push(pin);
    section.checks.push(memory_check(token));

    let mut listing = module.list_token(token, None);
    let mut extra_errors = Vec::new();
    let mut removed = listing.errors.iter().any(is_removal);

    if let Some(skf) = module.skf() {
        section
            .checks
            .push(skf_functions_check(skf, &listing.certificates));
    } else if !removed {
        let mechs = module
            .open_session(&listing.token)
            .and_then(|s| s.mechanisms());
        match mechs {
            Ok(have) => section
                .checks
                .push(mechanism_check(&have, &listing.certificates)),
            Err(e) => {
                removed |= is_removal(&e);
                section.checks.push(
                    Check::new(
                        "token.mechanisms",
                        Status::Skip,
                        Text::new(
                            "无法读取算法机制列表。",
                            "The mechanism list could not be read.",
                        ),
                    )
                    .facts(Facts::new().with("error_code", e.code())),
                );
                extra_errors.push(e);
            }
        }
    } else {
        section.checks.push(Check::new(
            "token.mechanisms",
            Status::Skip,
            Text::new("UKey 已不在，未检查。", "The key is gone; not checked."),
        ));
    }

    let mut test = None;
    // A PIN belongs to one token: with several inserted, it is tried only on the one
    // named in `pin_token` (a wrong try on another token would count against it).
    let pin_for_this = match (&options.pin_token, several) {
        (Some(serial), _) => serial == &token.serial,
        (None, several) => !several,
    };
    match (&options.pin, removed) {
        (Some(_), false) if !pin_for_this => section.checks.push(
            Check::new(
                "token.self_test",
                Status::Skip,
                Text::new(
                    "插着多把 UKey：PIN 码没有用在这把上。",
                    "Several keys are inserted: the PIN was not used on this one.",
                ),
            )
            .action(Text::new(
                "用 --token 序列号 指定要自检的 UKey。",
                "Name the key to self-test with --token SERIAL.",
            )),
        ),
        (Some(pin), false) => {
            let t = selftest::run(module, &listing.token, &listing.certificates, pin);
            removed |= t.removed;
            test = Some(t);
        }
        (Some(_), true) => section.checks.push(Check::new(
            "token.self_test",
            Status::Skip,
            Text::new("UKey 已不在，未自检。", "The key is gone; no self-test."),
        )),
        (None, _) => section.checks.push(
            Check::new(
                "token.self_test",
                Status::Skip,
                Text::new(
                    "没有提供 PIN 码，未做签名自检。",
                    "No PIN given: the sign-and-verify self-test was not run.",
                ),
            )
            .action(Text::new(
                "需要确认密钥可用时，用 --pin-stdin 提供 PIN 码再诊断。",
                "To prove the keys work, run again with --pin-stdin.",
            )),
        ),
    }
    // A removal seen by the self-test is checked against the token itself.
    if removed && !listing.errors.iter().any(is_removal) {
        if let Err(e) = module.refresh(token) {
            extra_errors.push(e);
        } else {
            removed = false;
        }
    }
    section.checks.push(read_check(&listing, &extra_errors));

    // Update key evidence from the logged-in session, which makes it definite.
    if let Some(t) = &test {
        section.checks.push(t.check.clone());
        for (entry, key) in listing.certificates.iter_mut().zip(&t.keys) {
            if let Some(k) = key {
                entry.key = if k.key_present {
                    KeyEvidence::PrivateKey
                } else if k.check.facts.get("error_code").is_none() {
                    KeyEvidence::Absent
                } else {
                    entry.key
                };
            }
        }
    }

    // Certificates.
    let intermediates: Vec<Vec<u8>> = listing
        .certificates
        .iter()
        .filter(|c| c.details.as_ref().is_ok_and(|d| d.is_ca))
        .map(|c| c.der.clone())
        .chain(extra_intermediates.iter().cloned())
        .collect();
    let mut sections = vec![];
    let mut certificates = vec![];
    let mut personal = vec![];
    for (i, entry) in listing.certificates.iter().enumerate() {
        let mut s = certificate::section_for(&token.serial, entry);
        match &entry.details {
            Err(e) => s.checks.push(certificate::corrupt_check(e, entry)),
            Ok(d) => {
                let ca = d.is_ca;
                if !ca {
                    personal.extend(redact::personal_values(&d.subject));
                    if let Some(cn) = &d.subject_cn
                        && cn.chars().count() >= 2
                    {
                        personal.push(cn.clone());
                    }
                    certificates.push((token.serial.clone(), entry.der.clone()));
                }
                s.checks.push(certificate::validity_check(
                    d,
                    entry,
                    ca,
                    now,
                    options.expiry_warning_days,
                ));
                s.checks.push(certificate::key_check(entry.key, ca));
                if !ca {
                    s.checks.push(certificate::chain_check(
                        &entry.der,
                        &options.trust_anchors,
                        &intermediates,
                        now,
                    ));
                    if let Some(Some(k)) = test.as_ref().and_then(|t| t.keys.get(i)) {
                        s.checks.push(k.check.clone());
                    }
                }
            }
        }
        let (v, summary) = certificate::verdict(&s);
        s.verdict = Some(v);
        s.summary = Some(summary);
        sections.push(s);
    }
    // Orphan keys: seen without login, plus private keys seen by the self-test.
    for k in &listing.orphan_keys {
        sections.push(orphan_key_section(
            &token.serial,
            &k.key_id,
            k.class,
            &k.label,
            &k.key_type,
        ));
    }
    if let Some(t) = &test {
        for id in &t.private_key_ids {
            if !listing.orphan_keys.iter().any(|k| &k.key_id == id) {
                sections.push(orphan_key_section(&token.serial, id, "private", "", ""));
            }
        }
    }

    // Token verdict: the most serious of what was found on it.
    let mech_fail = section
        .check("token.mechanisms")
        .is_some_and(|c| c.status == Status::Fail);
    let (verdict, summary) = if removed {
        (
            Verdict::Removed,
            Text::new("诊断中被拔出", "removed during the diagnosis"),
        )
    } else if let Some(v @ Verdict::PinLocked) = pin_verdict {
        (v, Text::new("PIN 已锁定", "PIN locked"))
    } else if let Some(v @ Verdict::PinFinalTry) = pin_verdict {
        (v, Text::new("PIN 仅剩最后一次机会", "PIN on its final try"))
    } else if mech_fail {
        (
            Verdict::MissingMechanism,
            Text::new("缺少算法机制", "missing mechanism"),
        )
    } else if let Some(v @ Verdict::PinCountLow) = pin_verdict {
        (v, Text::new("输错过 PIN", "a wrong PIN was entered"))
    } else if section.status() == Status::Fail || pin_verdict == Some(Verdict::Trouble) {
        (Verdict::Trouble, Text::new("有问题", "trouble"))
    } else {
        (Verdict::Ok, Text::new("正常", "ok"))
    };
    section.verdict = Some(verdict);
    section.summary = Some(summary);
    // The token's own label may carry the holder's name; the personal values found on
    // it are redacted there too.
    let mut out = vec![section];
    out.extend(sections);
    TokenResult {
        sections: out,
        certificates,
        personal,
    }
}
