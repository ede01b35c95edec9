//! Unfinished renewals: the renewal engine keeps a journal file per token and
//! certificate while it works; one left behind means a renewal was interrupted (crash,
//! key pulled, network gone) and will be resumed or rolled back at the next start.
//!
//! This module reads the journal directory without depending on the engine: each
//! `*.json` file is one renewal; it is finished when its `step` (or `state`) is `done`
//! / `finished` / `completed` / `rolled_back`, or `finished` is `true`.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::report::{Check, Facts, Section, SectionKind, Status, Text};
use crate::text;

/// Environment variable overriding the data directory (as the renewal engine reads it).
pub const DATA_DIR_ENV: &str = "UKEY_DATA_DIR";

/// The journal directory the renewal engine uses by default: `$UKEY_DATA_DIR/journal`,
/// else `journal` in the user's data directory.
pub fn default_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os(DATA_DIR_ENV).filter(|v| !v.is_empty()) {
        return Some(PathBuf::from(d).join("journal"));
    }
    None
}

const DONE: &[&str] = &["done", "finished", "completed", "complete", "rolled_back"];

fn str_field<'a>(v: &'a Value, names: &[&str]) -> Option<&'a str> {
    names.iter().find_map(|n| v.get(*n).and_then(Value::as_str))
}

/// One journal file's gist.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JournalEntry {
    /// The file.
    pub path: PathBuf,
    /// The step the renewal was at.
    pub step: String,
    /// Token serial, if recorded.
    pub token_serial: Option<String>,
    /// Serial of the certificate being renewed, if recorded.
    pub certificate_serial: Option<String>,
    /// Last update, if recorded.
    pub updated_at: Option<String>,
    /// Whether the renewal is over.
    pub finished: bool,
}

/// Reads one journal file.
pub fn read_entry(path: &Path) -> Result<JournalEntry, String> {
    let bytes = std::fs::read(path).map_err(|e| e.to_string())?;
    let v: Value = serde_json::from_slice(&bytes).map_err(|e| e.to_string())?;
    let step = str_field(&v, &["step", "current_step", "state", "phase"])
        .unwrap_or("unknown")
        .to_owned();
    let finished = v.get("finished").and_then(Value::as_bool).unwrap_or(false)
        || v.get("done").and_then(Value::as_bool).unwrap_or(false)
        || DONE.contains(&step.to_ascii_lowercase().as_str());
    Ok(JournalEntry {
        path: path.to_owned(),
        step,
        token_serial: str_field(&v, &["token_serial", "token"]).map(str::to_owned),
        certificate_serial: str_field(&v, &["certificate_serial", "old_serial", "cert_serial"])
            .map(str::to_owned),
        updated_at: str_field(&v, &["updated_at", "updated", "time"]).map(str::to_owned),
        finished,
    })
}

/// The journal section. `dir` `None`: the engine's default directory.
pub(crate) fn diagnose(dir: Option<&Path>) -> Section {
    let mut section = Section::new(
        SectionKind::Journal,
        "journal",
        Text::new("未完成的证书更新", "Unfinished renewals"),
    );
    let dir = dir.map(Path::to_owned).or_else(default_dir);
    let Some(dir) = dir else {
        section.checks.push(Check::new(
            "journal.unfinished",
            Status::Skip,
            Text::new(
                "没有找到更新日志目录。",
                "No renewal journal directory found.",
            ),
        ));
        return section;
    };
    let shown = dir.display().to_string();
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            section.checks.push(
                Check::new(
                    "journal.unfinished",
                    Status::Pass,
                    Text::new("没有进行中的证书更新。", "No renewal in progress."),
                )
                .facts(Facts::new().with("dir", shown)),
            );
            return section;
        }
        Err(e) => {
            let err = e.to_string();
            section.checks.push(
                Check::new(
                    "journal.unfinished",
                    Status::Warn,
                    text!(
                        "无法读取更新日志目录：{err}",
                        "The renewal journal cannot be read: {err}"
                    ),
                )
                .facts(Facts::new().with("dir", shown)),
            );
            return section;
        }
    };
    let mut files: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    let mut unfinished = 0;
    for path in &files {
        match read_entry(path) {
            Ok(e) if e.finished => {}
            Ok(e) => {
                unfinished += 1;
                let step = &e.step;
                let cert = e.certificate_serial.clone().unwrap_or_else(|| "?".into());
                let token = e.token_serial.clone().unwrap_or_else(|| "?".into());
                section.checks.push(
                    Check::new(
                        "journal.unfinished",
                        Status::Warn,
                        text!(
                            "UKey {token} 上证书 {cert} 的更新没有完成，停在“{step}”步骤。",
                            "The renewal of certificate {cert} on token {token} did not finish; it stopped at step \"{step}\"."
                        ),
                    )
                    .action(Text::new(
                        "插入这把 UKey 并运行 ukey renew：程序会接着完成或安全回退；在此之前不要删除 UKey 上的对象。",
                        "Insert this key and run ukey renew: it resumes or rolls back safely. Do not delete objects on the key meanwhile.",
                    ))
                    .facts(
                        Facts::new()
                            .with("file", path.display().to_string())
                            .with("step", e.step.clone())
                            .with("token_serial", e.token_serial.clone())
                            .with("certificate_serial", e.certificate_serial.clone())
                            .with("updated_at", e.updated_at.clone()),
                    ),
                );
            }
            Err(err) => {
                unfinished += 1;
                let file = path.display().to_string();
                section.checks.push(
                    Check::new(
                        "journal.unfinished",
                        Status::Warn,
                        text!(
                            "更新日志 {file} 无法读取：{err}",
                            "The renewal journal {file} cannot be read: {err}"
                        ),
                    )
                    .action(Text::new(
                        "请把这份报告和该文件发给技术支持；不要删除它。",
                        "Send this report and that file to support; do not delete it.",
                    ))
                    .facts(Facts::new().with("file", file)),
                );
            }
        }
    }
    if unfinished == 0 {
        let n = files.len();
        section.checks.push(
            Check::new(
                "journal.unfinished",
                Status::Pass,
                text!(
                    "没有未完成的证书更新（{n} 条已完成的记录）。",
                    "No unfinished renewal ({n} finished record(s))."
                ),
            )
            .facts(Facts::new().with("dir", shown)),
        );
    }
    section
}
