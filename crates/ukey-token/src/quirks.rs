//! Reading the fields of C_GetSlotInfo / C_GetTokenInfo one by one, the way real
//! modules fill them rather than the way PKCS#11 says: text padded with NULs instead of
//! blanks, labels in GBK, bytes that are no text at all, a clock that is not 16 digits,
//! versions out of range, counters that make no sense, a serial every key shares. Each
//! oddity is kept as a [`Quirk`] (field, raw bytes, what was wrong); the field is shown
//! decoded where it can be, as unknown where not, and the token is never dropped for it.

use serde::Serialize;

use crate::error::Lang;

/// What was odd about one field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum QuirkKind {
    /// Padded (or cut) with NUL bytes instead of blanks.
    NulPadded,
    /// Not UTF-8 but GBK (shown decoded).
    Gbk,
    /// Neither UTF-8 nor GBK (shown escaped).
    NotText,
    /// The token says it has a clock, but its time is not 16 digits.
    ClockUnreadable,
    /// A version whose minor number is over 99.
    VersionOutOfRange,
    /// A serial of zeros, blanks or nothing: other keys may report the same.
    SerialNotUnique,
    /// A memory or session counter that cannot be (free above total).
    CounterNonsense,
}

/// One odd field of a slot or token, as the module returned it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Quirk {
    /// The PKCS#11 field, e.g. `label`, `utcTime`, `hardwareVersion`.
    pub field: &'static str,
    /// What was odd.
    pub kind: QuirkKind,
    /// The raw value, hex.
    pub raw: String,
}

impl Quirk {
    pub(crate) fn new(field: &'static str, kind: QuirkKind, raw: &[u8]) -> Quirk {
        Quirk {
            field,
            kind,
            raw: hex::encode(raw),
        }
    }

    /// One sentence for a support engineer, naming the field and the raw value.
    pub fn describe(&self, lang: Lang) -> String {
        let (zh, en) = match self.kind {
            QuirkKind::NulPadded => (
                "用 NUL 字节而不是空格填充",
                "padded with NUL bytes, not blanks",
            ),
            QuirkKind::Gbk => ("是 GBK 编码（已解码显示）", "is GBK text (shown decoded)"),
            QuirkKind::NotText => ("不是文本（已转义显示）", "is not text (shown escaped)"),
            QuirkKind::ClockUnreadable => (
                "声称有时钟，但时间不是 16 位数字（显示为未知）",
                "claims a clock, but its time is not 16 digits (shown as unknown)",
            ),
            QuirkKind::VersionOutOfRange => (
                "版本号超出范围（显示为未知）",
                "version out of range (shown as unknown)",
            ),
            QuirkKind::SerialNotUnique => (
                "序列号全为零或空白，其他 UKey 可能相同",
                "serial is zeros or blanks: other keys may report the same",
            ),
            QuirkKind::CounterNonsense => (
                "计数不合理（显示为未知）",
                "counter makes no sense (shown as unknown)",
            ),
        };
        lang.pick(
            &format!("驱动返回的 {} {zh}：{}", self.field, self.raw),
            &format!("the module's {} {en}: {}", self.field, self.raw),
        )
        .to_owned()
    }
}

/// A blank-padded text field: trailing blanks dropped; NUL padding (or a C string
/// followed by leftovers) cut at the first NUL; UTF-8 as is, else GBK decoded, else
/// escaped. Oddities go to `quirks`.
pub fn text(field: &'static str, raw: &[u8], quirks: &mut Vec<Quirk>) -> String {
    let mut bytes = raw;
    if let Some(nul) = bytes.iter().position(|b| *b == 0) {
        quirks.push(Quirk::new(field, QuirkKind::NulPadded, raw));
        bytes = &bytes[..nul];
    }
    let end = bytes.iter().rposition(|b| *b != b' ').map_or(0, |i| i + 1);
    let bytes = &bytes[..end];
    if let Ok(s) = std::str::from_utf8(bytes) {
        return s.trim().to_owned();
    }
    if let Some(s) = encoding_rs::GBK
        .decode_without_bom_handling_and_without_replacement(bytes)
        .filter(|s| !s.chars().any(char::is_control))
    {
        quirks.push(Quirk::new(field, QuirkKind::Gbk, raw));
        return s.trim().to_owned();
    }
    quirks.push(Quirk::new(field, QuirkKind::NotText, raw));
    bytes
        .iter()
        .map(|b| {
            if b.is_ascii_graphic() || *b == b' ' {
                char::from(*b).to_string()
            } else {
                format!("\\x{b:02x}")
            }
        })
        .collect()
}

/// A serial that cannot tell keys apart (empty, zeros, blanks) adds a quirk.
pub fn check_serial(serial: &str, raw: &[u8], quirks: &mut Vec<Quirk>) {
    if serial.chars().all(|c| c == '0' || c == ' ') {
        quirks.push(Quirk::new("serialNumber", QuirkKind::SerialNotUnique, raw));
    }
}

/// `major.minor`, or `None` (with a quirk) when the minor number is over 99.
pub fn version(
    field: &'static str,
    major: u8,
    minor: u8,
    quirks: &mut Vec<Quirk>,
) -> Option<String> {
    if minor > 99 {
        quirks.push(Quirk::new(
            field,
            QuirkKind::VersionOutOfRange,
            &[major, minor],
        ));
        return None;
    }
    Some(format!("{major}.{minor}"))
}

/// The token's clock (`YYYY-MM-DD hh:mm:ss`, UTC) when it has one; `None` with a quirk
/// when the 16 characters are not digits.
pub fn clock(raw: &[u8; 16], quirks: &mut Vec<Quirk>) -> Option<String> {
    // YYYYMMDDhhmmss00
    if !raw.iter().all(u8::is_ascii_digit) {
        quirks.push(Quirk::new("utcTime", QuirkKind::ClockUnreadable, raw));
        return None;
    }
    let d = |r: std::ops::Range<usize>| String::from_utf8_lossy(&raw[r]).into_owned();
    Some(format!(
        "{}-{}-{} {}:{}:{}",
        d(0..4),
        d(4..6),
        d(6..8),
        d(8..10),
        d(10..12),
        d(12..14)
    ))
}

/// CK_UNAVAILABLE_INFORMATION.
const UNAVAILABLE: u64 = !0;

/// A free/total pair of memory counters: each `None` when the module says
/// CK_UNAVAILABLE_INFORMATION, both `None` with a quirk when free is above total.
pub fn memory(
    field: &'static str,
    free: u64,
    total: u64,
    quirks: &mut Vec<Quirk>,
) -> (Option<usize>, Option<usize>) {
    let value = |v: u64| {
        (v != UNAVAILABLE)
            .then(|| usize::try_from(v).ok())
            .flatten()
    };
    let (free_v, total_v) = (value(free), value(total));
    if let (Some(f), Some(t)) = (free_v, total_v) {
        if f > t {
            let mut raw = free.to_be_bytes().to_vec();
            raw.extend(total.to_be_bytes());
            quirks.push(Quirk::new(field, QuirkKind::CounterNonsense, &raw));
            return (None, None);
        }
    }
    (free_v, total_v)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn padded<const N: usize>(content: &[u8], pad: u8) -> [u8; N] {
        let mut a = [pad; N];
        a[..content.len()].copy_from_slice(content);
        a
    }

    #[test]
    fn text_fields_as_modules_fill_them() {
        let mut q = vec![];
        assert_eq!(
            text(
                "label",
                &padded::<32>("张三的UKey".as_bytes(), b' '),
                &mut q
            ),
            "张三的UKey"
        );
        assert!(q.is_empty());

        // NUL-padded.
        assert_eq!(
            text("label", &padded::<32>(b"ePass3000GM", 0), &mut q),
            "ePass3000GM"
        );
        assert_eq!(q[0].kind, QuirkKind::NulPadded);

        // GBK: 张三 is D5C5 C8FD.
        let mut q = vec![];
        let gbk = padded::<32>(&[0xD5, 0xC5, 0xC8, 0xFD, b'K', b'e', b'y'], b' ');
        assert_eq!(text("label", &gbk, &mut q), "张三Key");
        assert_eq!(q[0].kind, QuirkKind::Gbk);
        assert!(q[0].raw.starts_with("d5c5c8fd"));

        // Not text at all: escaped.
        let mut q = vec![];
        let junk = padded::<16>(&[b'A', 0xFF, 0x80, 0x01], b' ');
        assert_eq!(text("serialNumber", &junk, &mut q), "A\\xff\\x80\\x01");
        assert_eq!(q[0].kind, QuirkKind::NotText);
        let s = q[0].describe(Lang::En);
        assert!(s.contains("serialNumber") && s.contains("41ff8001"), "{s}");
    }

    #[test]
    fn serial_clock_version_and_counters() {
        let mut q = vec![];
        check_serial("0000000000000000", b"0000000000000000", &mut q);
        check_serial("", b"                ", &mut q);
        check_serial("A1B2", b"A1B2            ", &mut q);
        assert_eq!(q.len(), 2);
        assert!(q.iter().all(|q| q.kind == QuirkKind::SerialNotUnique));

        let mut q = vec![];
        assert_eq!(
            clock(b"2026120113450900", &mut q).as_deref(),
            Some("2026-12-01 13:45:09")
        );
        assert_eq!(clock(b"                ", &mut q), None);
        assert_eq!(clock(b"2026-12-01T13:45", &mut q), None);
        assert_eq!(q.len(), 2);
        assert_eq!(q[0].kind, QuirkKind::ClockUnreadable);

        let mut q = vec![];
        assert_eq!(
            version("hardwareVersion", 2, 6, &mut q).as_deref(),
            Some("2.6")
        );
        assert_eq!(version("firmwareVersion", 1, 255, &mut q), None);
        assert_eq!(q[0].raw, "01ff");

        let mut q = vec![];
        assert_eq!(memory("publicMemory", 10, 20, &mut q), (Some(10), Some(20)));
        assert_eq!(memory("publicMemory", !0, !0, &mut q), (None, None));
        assert!(q.is_empty());
        assert_eq!(memory("privateMemory", 30, 20, &mut q), (None, None));
        assert_eq!(q[0].kind, QuirkKind::CounterNonsense);
    }
}
