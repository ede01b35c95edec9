//! The report as text for a terminal: one line per check with a mark, the reason, and
//! what to do next indented below; facts only when asked for.

use std::fmt::Write as _;

use ukey_token::Lang;

use crate::report::{Report, Status};

fn mark(s: Status) -> &'static str {
    match s {
        Status::Pass => "[ OK ]",
        Status::Warn => "[WARN]",
        Status::Fail => "[FAIL]",
        Status::Skip => "[SKIP]",
    }
}

fn fact_text(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => "-".to_owned(),
        other => other.to_string(),
    }
}

/// Renders the report in `lang`. With `facts`, every check's facts follow it.
pub fn render_text(report: &Report, lang: Lang, facts: bool) -> String {
    let mut out = String::new();
    let (title, made) = match lang {
        Lang::ZhCn => ("UKey 诊断报告", "生成于"),
        Lang::En => ("UKey diagnosis", "made at"),
    };
    let _ = writeln!(
        out,
        "{title} — UKey Renew {} — {made} {} ({} ms)",
        report.app_version, report.generated_at, report.duration_ms
    );
    if report.redacted {
        let _ = writeln!(
            out,
            "{}",
            lang.pick(
                "（已隐去姓名、身份证号和手机号）",
                "(names, ID-card and phone numbers redacted)"
            )
        );
    }
    for section in &report.sections {
        let _ = writeln!(out);
        let mut heading = section.title.get(lang).to_owned();
        if let Some(summary) = &section.summary {
            heading.push_str(" — ");
            heading.push_str(summary.get(lang));
        }
        let _ = writeln!(out, "{} {heading}", mark(section.status()));
        for check in &section.checks {
            let _ = writeln!(out, "  {} {}", mark(check.status), check.reason.get(lang));
            if let Some(action) = &check.action
                && check.status != Status::Pass
            {
                let arrow = lang.pick("→ 建议：", "→ Next: ");
                let _ = writeln!(out, "         {arrow}{}", action.get(lang));
            }
            if facts {
                for (k, v) in &check.facts.0 {
                    let _ = writeln!(out, "         · {k}: {}", fact_text(v));
                }
            }
        }
    }
    let c = report.counts;
    let _ = writeln!(out);
    let summary = match lang {
        Lang::ZhCn => format!(
            "结论：{}（通过 {}，警告 {}，失败 {}，跳过 {}）",
            match report.overall {
                Status::Pass | Status::Skip => "正常",
                Status::Warn => "需要注意",
                Status::Fail => "有问题",
            },
            c.pass,
            c.warn,
            c.fail,
            c.skip
        ),
        Lang::En => format!(
            "Result: {} ({} passed, {} warnings, {} failed, {} skipped)",
            match report.overall {
                Status::Pass | Status::Skip => "all good",
                Status::Warn => "needs attention",
                Status::Fail => "problems found",
            },
            c.pass,
            c.warn,
            c.fail,
            c.skip
        ),
    };
    let _ = writeln!(out, "{summary}");
    out
}
