//! Unfinished renewals: the renewal engine keeps a journal file per token and
//! certificate while it works; one left behind means a renewal was interrupted (crash,
//! key pulled, network gone) and will be resumed or rolled back at the next start.
//!
//! The journals are read with the engine's own types ([`ukey_renewal::Journal`]), never
//! written: reconciling them is the engine's job at the next `ukey renew` or insert.

use std::path::{Path, PathBuf};

use ukey_renewal::Journal;

use crate::report::{Check, Facts, Section, SectionKind, Status, Text};
use crate::text;

/// The journal directory the renewal engine uses: `journal` in its data directory
/// (`$UKEY_DATA_DIR`, else the platform's data directory).
pub fn default_dir() -> Option<PathBuf> {
    ukey_renewal::default_data_dir().map(|d| d.join("journal"))
}

/// Reads one journal file.
pub fn read_entry(path: &Path) -> Result<Journal, String> {
    let bytes = std::fs::read(path).map_err(|e| e.to_string())?;
    serde_json::from_slice(&bytes).map_err(|e| e.to_string())
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
            Ok(j) if !j.is_unfinished() => {}
            Ok(j) => {
                unfinished += 1;
                let step = j.step.as_str();
                let state = match j.state {
                    ukey_renewal::journal::StepState::Started => ("开始", "started"),
                    ukey_renewal::journal::StepState::Done => ("完成", "done"),
                };
                let (state_zh, state_en) = state;
                let cert = &j.old.serial;
                let token = &j.token_serial;
                let (action_zh, action_en) = if j.activation_begun() {
                    (
                        "插入这把 UKey 并运行 ukey renew：新证书已开始启用，程序会把更新做完。在此之前不要删除 UKey 上的对象。",
                        "Insert this key and run ukey renew: activation of the new certificate has begun and will be finished. Do not delete objects on the key meanwhile.",
                    )
                } else {
                    (
                        "插入这把 UKey 并运行 ukey renew：程序会接着完成或安全回退，旧证书仍然可用。在此之前不要删除 UKey 上的对象。",
                        "Insert this key and run ukey renew: it resumes or rolls back safely, and the old certificate still works. Do not delete objects on the key meanwhile.",
                    )
                };
                let updated = j.history.last().map(|h| crate::certificate::rfc3339(h.at));
                section.checks.push(
                    Check::new(
                        "journal.unfinished",
                        Status::Warn,
                        text!(
                            "UKey {token} 上证书 {cert} 的更新没有完成，停在“{step}”步骤（{state_zh}）。",
                            "The renewal of certificate {cert} on token {token} did not finish; it stopped at step \"{step}\" ({state_en})."
                        ),
                    )
                    .action(Text::new(action_zh, action_en))
                    .facts(
                        Facts::new()
                            .with("file", path.display().to_string())
                            .with("token_serial", j.token_serial.clone())
                            .with("certificate_serial", j.old.serial.clone())
                            .with("order_id", j.order_id.clone())
                            .with("step", step)
                            .with("state", state_en)
                            .with("activation_begun", j.activation_begun())
                            .with("updated_at", updated),
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
