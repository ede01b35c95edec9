//! The report: sections (environment, each token, each certificate, portal, journal),
//! each holding checks with a status, a reason and what to do next in zh-CN and en, and
//! the facts the check saw.
//!
//! The JSON shape (`ukey diagnose --json`, the desktop app's IPC) is the serde form of
//! [`Report`]; `format` is bumped when a field changes meaning or disappears:
//!
//! ```json
//! {"format": 1, "app_version": "0.1.0", "generated_at": "2026-11-21T20:48:17Z",
//!  "duration_ms": 4, "overall": "warn", "redacted": false,
//!  "counts": {"pass": 19, "warn": 1, "fail": 0, "skip": 3},
//!  "sections": [
//!   {"kind": "token", "id": "token:74c8fb55f14e83c3",
//!    "title": {"zh-CN": "UKey “张三的UKey”（序列号 74c8…）", "en": "Token \"张三的UKey\" (serial 74c8…)"},
//!    "verdict": "pin_count_low", "summary": {"zh-CN": "输错过 PIN", "en": "a wrong PIN was entered"},
//!    "checks": [
//!     {"id": "token.pin", "status": "warn",
//!      "reason": {"zh-CN": "…", "en": "A wrong PIN was entered since the last correct one; …"},
//!      "action": {"zh-CN": "…", "en": "Type the PIN carefully next time; …"},
//!      "facts": {"count_low": true, "final_try": false, "locked": false, "tries_remaining": null}}]}]}
//! ```
//!
//! Check ids: `environment.{system,config,module,other_modules,pcscd,tokens}`,
//! `token.{info,pin,memory,mechanisms,self_test,read}`,
//! `certificate.{parse,validity,key,chain,self_test}`, `key.orphan`,
//! `portal.{reach,tls,clock,status}`, `journal.unfinished`. Front ends may translate
//! by id and verdict, or show `reason`/`action` as they are.

use std::fmt;

use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use ukey_token::Lang;

/// Version of the report's JSON shape.
pub const REPORT_FORMAT: u32 = 1;

/// Outcome of one check, worst last (so `max` gives the worst).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Not run (nothing to check, or a precondition is missing); says why.
    Skip,
    /// Fine.
    Pass,
    /// Works, but needs attention soon or may cause trouble.
    Warn,
    /// Broken: renewal or use of the key will fail until fixed.
    Fail,
}

impl Status {
    /// `pass`, `warn`, `fail`, `skip`.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Skip => "skip",
            Status::Pass => "pass",
            Status::Warn => "warn",
            Status::Fail => "fail",
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A user-facing text in both languages. JSON: `{"zh-CN": "...", "en": "..."}`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Text {
    /// Simplified Chinese.
    #[serde(rename = "zh-CN")]
    pub zh_cn: String,
    /// English.
    pub en: String,
}

impl Text {
    /// A text in both languages.
    pub fn new(zh_cn: impl Into<String>, en: impl Into<String>) -> Text {
        Text {
            zh_cn: zh_cn.into(),
            en: en.into(),
        }
    }

    /// The text in `lang`.
    pub fn get(&self, lang: Lang) -> &str {
        match lang {
            Lang::ZhCn => &self.zh_cn,
            Lang::En => &self.en,
        }
    }

    /// The same text for both languages (names, paths, serials).
    pub fn same(s: impl Into<String>) -> Text {
        let s = s.into();
        Text {
            zh_cn: s.clone(),
            en: s,
        }
    }

    pub(crate) fn strings_mut(&mut self) -> [&mut String; 2] {
        [&mut self.zh_cn, &mut self.en]
    }
}

/// Builds a [`Text`] from two `format!` argument lists: `text!(("{n} 天", n), ("{n} days", n))`.
#[macro_export]
#[doc(hidden)]
macro_rules! text {
    ($zh:literal, $en:literal) => {
        $crate::report::Text::new(format!($zh), format!($en))
    };
}

/// A fact value: what a check saw.
pub type FactValue = serde_json::Value;

/// The facts a check saw, in the order it saw them. JSON: an object.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Facts(pub Vec<(String, FactValue)>);

impl Facts {
    /// No facts.
    pub fn new() -> Facts {
        Facts(Vec::new())
    }

    /// Adds a fact (builder style).
    pub fn with(mut self, key: &str, value: impl Into<FactValue>) -> Facts {
        self.push(key, value);
        self
    }

    /// Adds a fact.
    pub fn push(&mut self, key: &str, value: impl Into<FactValue>) {
        self.0.push((key.to_owned(), value.into()));
    }

    /// The value of a fact.
    pub fn get(&self, key: &str) -> Option<&FactValue> {
        self.0.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl Serialize for Facts {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in &self.0 {
            map.serialize_entry(k, v)?;
        }
        map.end()
    }
}

impl<'de> Deserialize<'de> for Facts {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Facts, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Facts;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an object of facts")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut m: A) -> Result<Facts, A::Error> {
                let mut out = Vec::new();
                while let Some((k, v)) = m.next_entry::<String, FactValue>()? {
                    out.push((k, v));
                }
                Ok(Facts(out))
            }
        }
        d.deserialize_map(V)
    }
}

/// One check.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Check {
    /// Stable identifier, e.g. `token.pin`, `certificate.validity`.
    pub id: String,
    /// Outcome.
    pub status: Status,
    /// Short reason.
    pub reason: Text,
    /// What to do next; absent when nothing is to be done.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<Text>,
    /// What the check saw.
    #[serde(default, skip_serializing_if = "Facts::is_empty")]
    pub facts: Facts,
}

impl Check {
    /// A check with no action and no facts.
    pub fn new(id: &str, status: Status, reason: Text) -> Check {
        Check {
            id: id.to_owned(),
            status,
            reason,
            action: None,
            facts: Facts::new(),
        }
    }

    /// Sets what to do next.
    pub fn action(mut self, action: Text) -> Check {
        self.action = Some(action);
        self
    }

    /// Sets the facts.
    pub fn facts(mut self, facts: Facts) -> Check {
        self.facts = facts;
        self
    }
}

/// What a section is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SectionKind {
    /// The computer, the app and the PKCS#11 module.
    Environment,
    /// One token.
    Token,
    /// One certificate on a token.
    Certificate,
    /// A key with no certificate on a token.
    OrphanKey,
    /// The CA's portal.
    Portal,
    /// Unfinished renewals.
    Journal,
}

/// The one-word verdict on a token, certificate or key, for lists and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Everything checked is fine.
    Ok,
    /// The certificate expires within the warning period (`days_left` fact).
    Expiring,
    /// The certificate has expired.
    Expired,
    /// The certificate's validity starts in the future.
    NotYetValid,
    /// A certificate without its private key, or a key without its certificate.
    Orphan,
    /// A certificate object that cannot be parsed.
    Corrupt,
    /// Whether the certificate's private key is on the token cannot be told without the PIN.
    KeyUnknown,
    /// The certificate does not chain to the configured trust anchors.
    Untrusted,
    /// The key failed the sign-and-verify self-test.
    SelfTestFailed,
    /// A certificate authority's certificate stored on the token (no key expected).
    CaCertificate,
    /// Token: the user PIN is locked.
    PinLocked,
    /// Token: one more wrong PIN locks it.
    PinFinalTry,
    /// Token: a wrong PIN was entered since the last good one.
    PinCountLow,
    /// Token: a mechanism renewal needs is missing.
    MissingMechanism,
    /// Token: removed (or unreadable) during the diagnosis.
    Removed,
    /// Token: other trouble (see its checks).
    Trouble,
}

impl Verdict {
    /// The snake_case name, as in JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Ok => "ok",
            Verdict::Expiring => "expiring",
            Verdict::Expired => "expired",
            Verdict::NotYetValid => "not_yet_valid",
            Verdict::Orphan => "orphan",
            Verdict::Corrupt => "corrupt",
            Verdict::KeyUnknown => "key_unknown",
            Verdict::Untrusted => "untrusted",
            Verdict::SelfTestFailed => "self_test_failed",
            Verdict::CaCertificate => "ca_certificate",
            Verdict::PinLocked => "pin_locked",
            Verdict::PinFinalTry => "pin_final_try",
            Verdict::PinCountLow => "pin_count_low",
            Verdict::MissingMechanism => "missing_mechanism",
            Verdict::Removed => "removed",
            Verdict::Trouble => "trouble",
        }
    }
}

/// A group of checks about one thing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Section {
    /// What the section is about.
    pub kind: SectionKind,
    /// Stable id: `environment`, `token:<serial>`, `certificate:<token serial>:<cert serial>`,
    /// `key:<token serial>:<CKA_ID hex>`, `portal`, `journal`.
    pub id: String,
    /// Heading.
    pub title: Text,
    /// One-word verdict (tokens, certificates, keys).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verdict: Option<Verdict>,
    /// Verdict in words, e.g. "expiring in 10 days".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub summary: Option<Text>,
    /// The checks.
    pub checks: Vec<Check>,
}

impl Section {
    /// An empty section.
    pub fn new(kind: SectionKind, id: impl Into<String>, title: Text) -> Section {
        Section {
            kind,
            id: id.into(),
            title,
            verdict: None,
            summary: None,
            checks: Vec::new(),
        }
    }

    /// The worst status of its checks (`skip` when it has none).
    pub fn status(&self) -> Status {
        self.checks
            .iter()
            .map(|c| c.status)
            .max()
            .unwrap_or(Status::Skip)
    }

    /// The check with this id.
    pub fn check(&self, id: &str) -> Option<&Check> {
        self.checks.iter().find(|c| c.id == id)
    }
}

/// Counts of check outcomes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Counts {
    /// Passed.
    pub pass: usize,
    /// Warnings.
    pub warn: usize,
    /// Failures.
    pub fail: usize,
    /// Skipped.
    pub skip: usize,
}

/// The whole diagnosis.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// [`REPORT_FORMAT`].
    pub format: u32,
    /// Version of the application that made it.
    pub app_version: String,
    /// When it was made, RFC 3339 UTC.
    pub generated_at: String,
    /// How long the diagnosis took, in milliseconds.
    pub duration_ms: u64,
    /// Worst status of every check.
    pub overall: Status,
    /// Counts of outcomes.
    pub counts: Counts,
    /// Whether personal data was removed (see [`crate::redact`]).
    pub redacted: bool,
    /// Environment, tokens (each followed by its certificates and orphan keys),
    /// portal, journal.
    pub sections: Vec<Section>,
    /// Personal values seen (names in subjects), for redaction. Never serialised.
    #[serde(skip)]
    pub(crate) personal: Vec<String>,
}

impl Report {
    /// An empty report.
    pub(crate) fn new(app_version: &str) -> Report {
        Report {
            format: REPORT_FORMAT,
            app_version: app_version.to_owned(),
            generated_at: String::new(),
            duration_ms: 0,
            overall: Status::Skip,
            counts: Counts::default(),
            redacted: false,
            sections: Vec::new(),
            personal: Vec::new(),
        }
    }

    /// Recomputes `overall` and `counts` from the checks.
    pub(crate) fn finish(&mut self) {
        let mut counts = Counts::default();
        for c in self.sections.iter().flat_map(|s| &s.checks) {
            match c.status {
                Status::Pass => counts.pass += 1,
                Status::Warn => counts.warn += 1,
                Status::Fail => counts.fail += 1,
                Status::Skip => counts.skip += 1,
            }
        }
        self.counts = counts;
        self.overall = self
            .sections
            .iter()
            .map(Section::status)
            .max()
            .unwrap_or(Status::Skip);
    }

    /// The section with this id.
    pub fn section(&self, id: &str) -> Option<&Section> {
        self.sections.iter().find(|s| s.id == id)
    }

    /// Sections of one kind.
    pub fn sections_of(&self, kind: SectionKind) -> impl Iterator<Item = &Section> {
        self.sections.iter().filter(move |s| s.kind == kind)
    }

    /// The first check with this id in any section.
    pub fn find_check(&self, id: &str) -> Option<&Check> {
        self.sections.iter().find_map(|s| s.check(id))
    }
}
