//! Removing personal data from a report meant to be sent to support.
//!
//! What is personal here: the names in certificate subjects (CN, given name, surname,
//! e-mail, the subject's serialNumber attribute, which Chinese CAs often fill with an
//! ID-card number), wherever they appear (token labels such as "张三的UKey" included);
//! Chinese resident ID-card numbers (18 characters, valid checksum and birth date) and
//! mainland mobile numbers (11 digits, 1[3-9]…, optionally +86) in any text. Company
//! names (O), issuers, serials and dates stay: support needs them and they identify no
//! person.

use crate::report::Report;

/// Replaces a personal name.
pub const NAME_MARK: &str = "[redacted-name]";
/// Replaces an ID-card number.
pub const ID_MARK: &str = "[redacted-id]";
/// Replaces a mobile phone number.
pub const PHONE_MARK: &str = "[redacted-phone]";

/// Subject attributes that name or identify a person.
const PERSONAL_ATTRIBUTES: &[&str] = &[
    "CN",
    "GN",
    "SN",
    "emailAddress",
    "serialNumber",
    "x500UniqueIdentifier",
    "2.5.4.65", // pseudonym
];

/// The personal values in a subject formatted as `C=CN, O=..., CN=张三` (see
/// `ukey_token::certificate::format_name`).
pub fn personal_values(subject: &str) -> Vec<String> {
    let mut out = Vec::new();
    // Split at ", " or "+" that starts a new `KEY=`; a value containing ", " stays whole
    // unless what follows looks like an attribute.
    let mut parts: Vec<String> = Vec::new();
    for piece in subject.split(", ") {
        for (i, sub) in piece.split('+').enumerate() {
            let starts_attr = sub.split_once('=').is_some_and(|(k, _)| {
                !k.is_empty() && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '.')
            });
            match parts.last_mut() {
                Some(last) if !starts_attr => {
                    last.push_str(if i == 0 { ", " } else { "+" });
                    last.push_str(sub);
                }
                _ => parts.push(sub.to_owned()),
            }
        }
    }
    for part in parts {
        if let Some((k, v)) = part.split_once('=')
            && PERSONAL_ATTRIBUTES.contains(&k)
            && v.chars().count() >= 2
        {
            out.push(v.to_owned());
            // "张三(110105…)" or "张三11010519491231002X": the name alone also appears
            // elsewhere (token labels such as "张三的UKey").
            let name_attr = matches!(k, "CN" | "GN" | "SN");
            let pieces = v.split(|c: char| c.is_ascii_digit() || "()[]（）【】".contains(c));
            for piece in pieces.filter(|_| name_attr) {
                let piece = piece.trim();
                if piece.chars().count() >= 2 && piece != v && !out.iter().any(|o| o == piece) {
                    out.push(piece.to_owned());
                }
            }
        }
    }
    out
}

/// Whether 18 characters are a valid resident ID number: 17 digits + check digit or X,
/// a plausible birth date, and the ISO 7064 MOD 11-2 checksum.
pub fn is_id_number(s: &str) -> bool {
    let b = s.as_bytes();
    if b.len() != 18 || !b[..17].iter().all(u8::is_ascii_digit) {
        return false;
    }
    let last = b[17].to_ascii_uppercase();
    if !(last.is_ascii_digit() || last == b'X') {
        return false;
    }
    let num = |r: std::ops::Range<usize>| s[r].parse::<u32>().unwrap_or(0);
    let (year, month, day) = (num(6..10), num(10..12), num(12..14));
    if !(1900..=2099).contains(&year) || !(1..=12).contains(&month) || !(1..=31).contains(&day) {
        return false;
    }
    const WEIGHTS: [u32; 17] = [7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2];
    const CHECK: &[u8; 11] = b"10X98765432";
    let sum: u32 = b[..17]
        .iter()
        .zip(WEIGHTS)
        .map(|(d, w)| u32::from(d - b'0') * w)
        .sum();
    CHECK[(sum % 11) as usize] == last
}

fn is_mobile(digits: &str) -> bool {
    let b = digits.as_bytes();
    b.len() == 11 && b[0] == b'1' && (b'3'..=b'9').contains(&b[1])
}

/// Replaces ID-card and mobile numbers in `text`. Numbers are maximal runs of ASCII
/// digits (an ID may end in X) not touching other ASCII letters or digits, so hex
/// strings such as key ids are left alone.
pub fn redact_numbers(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let prev_alnum = i > 0 && chars[i - 1].is_ascii_alphanumeric();
        if !c.is_ascii_digit() || prev_alnum {
            out.push(c);
            i += 1;
            continue;
        }
        let mut j = i;
        while j < chars.len() && chars[j].is_ascii_digit() {
            j += 1;
        }
        // An ID number may end in X.
        let mut end = j;
        if j - i == 17 && j < chars.len() && (chars[j] == 'X' || chars[j] == 'x') {
            end = j + 1;
        }
        let next_alnum = end < chars.len() && chars[end].is_ascii_alphanumeric();
        let run: String = chars[i..end].iter().collect();
        // A run glued to letters on the right (hex) is not a number; keep it whole.
        if next_alnum {
            let mut k = end;
            while k < chars.len() && chars[k].is_ascii_alphanumeric() {
                k += 1;
            }
            out.extend(&chars[i..k]);
            i = k;
            continue;
        }
        let replacement = if is_id_number(&run) {
            Some(ID_MARK)
        } else if is_mobile(&run)
            || (run.len() == 13 && run.starts_with("86") && is_mobile(&run[2..]))
        {
            Some(PHONE_MARK)
        } else {
            None
        };
        match replacement {
            Some(mark) => out.push_str(mark),
            None => out.push_str(&run),
        }
        i = end;
    }
    out
}

/// Redacts one string: the known personal values (also as the hex of their UTF-8 and
/// GBK bytes, as raw token fields show them), then numbers.
pub fn redact_text(text: &str, personal: &[String]) -> String {
    let mut s = text.to_owned();
    for p in personal {
        if p.is_empty() {
            continue;
        }
        let (gbk, _, unmappable) = encoding_rs::GBK.encode(p);
        let mut forms = vec![p.clone(), hex::encode(p.as_bytes())];
        if !unmappable {
            forms.push(hex::encode(&gbk));
        }
        for form in forms {
            if s.contains(form.as_str()) {
                s = s.replace(form.as_str(), NAME_MARK);
            }
        }
    }
    redact_numbers(&s)
}

fn redact_value(v: &mut serde_json::Value, personal: &[String]) {
    match v {
        serde_json::Value::String(s) => *s = redact_text(s, personal),
        serde_json::Value::Array(items) => items.iter_mut().for_each(|i| redact_value(i, personal)),
        serde_json::Value::Object(map) => map.values_mut().for_each(|i| redact_value(i, personal)),
        _ => {}
    }
}

impl Report {
    /// A copy with personal data replaced by markers ([`NAME_MARK`], [`ID_MARK`],
    /// [`PHONE_MARK`]) in every text, title and fact; `redacted` is set.
    pub fn redacted(&self) -> Report {
        let mut r = self.clone();
        // Longest first, so "张三丰" is replaced before "张三".
        let mut personal = r.personal.clone();
        personal.sort_by_key(|p| std::cmp::Reverse(p.chars().count()));
        personal.dedup();
        for section in &mut r.sections {
            section.id = redact_text(&section.id, &personal);
            for s in section.title.strings_mut() {
                *s = redact_text(s, &personal);
            }
            if let Some(summary) = &mut section.summary {
                for s in summary.strings_mut() {
                    *s = redact_text(s, &personal);
                }
            }
            for check in &mut section.checks {
                for s in check.reason.strings_mut() {
                    *s = redact_text(s, &personal);
                }
                if let Some(action) = &mut check.action {
                    for s in action.strings_mut() {
                        *s = redact_text(s, &personal);
                    }
                }
                for (_, v) in &mut check.facts.0 {
                    redact_value(v, &personal);
                }
            }
        }
        r.redacted = true;
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // A checksum-valid number made up for tests (GB 11643 example form).
    const ID: &str = "11010519491231002X";

    #[test]
    fn id_numbers_need_their_checksum_and_date() {
        assert!(is_id_number(ID));
        assert!(is_id_number("110101199003074514"));
        assert!(!is_id_number("110101199003074515"), "wrong checksum");
        assert!(!is_id_number("110101199013074512"), "month 13");
        assert!(!is_id_number("11010119900307451"), "17 chars");
    }

    #[test]
    fn numbers_are_redacted_where_they_stand_alone() {
        let t = format!("姓名张三，身份证{ID}，电话13800138000，+8613912345678。");
        let r = redact_numbers(&t);
        assert!(
            !r.contains(ID) && !r.contains("13800138000") && !r.contains("13912345678"),
            "{r}"
        );
        assert_eq!(r.matches(ID_MARK).count(), 1, "{r}");
        assert_eq!(r.matches(PHONE_MARK).count(), 2, "{r}");
        // Hex key ids and serials are not numbers.
        let hex = "key 13800138000ab 0a13800138000 serial 110101199003074514ff";
        assert_eq!(redact_numbers(hex), hex);
        // Short numbers, dates and counts stay.
        assert_eq!(redact_numbers("10 days, 2026-12-01"), "10 days, 2026-12-01");
    }

    #[test]
    fn personal_attributes_are_found_in_a_subject() {
        let subject = format!("C=CN, O=某某建设工程有限公司, CN=张三, serialNumber={ID}");
        assert_eq!(
            personal_values(&subject),
            vec!["张三".to_owned(), ID.to_owned()]
        );
        assert_eq!(
            personal_values("CN=Zhang, San+emailAddress=z@example.com, O=X"),
            vec!["Zhang, San".to_owned(), "z@example.com".to_owned()]
        );
    }

    #[test]
    fn a_name_in_raw_token_bytes_is_redacted_too() {
        let personal = vec!["张三".to_owned()];
        // GBK 张三 = d5c5 c8fd; UTF-8 = e5bca0 e4b889.
        let raw = "label d5c5c8fd4b6579202020 / e5bca0e4b8894b6579";
        let r = redact_text(raw, &personal);
        assert!(
            !r.contains("d5c5c8fd") && !r.contains("e5bca0e4b889"),
            "{r}"
        );
        assert_eq!(r.matches(NAME_MARK).count(), 2, "{r}");
    }
}
