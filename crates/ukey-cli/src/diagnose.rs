//! `ukey diagnose`: the support report (see the `ukey-diagnose` crate). This file only
//! turns arguments into [`ukey_diagnose::Options`] and writes the report out.

use std::io::{BufRead, Write};
use std::path::PathBuf;

use anyhow::Context;
use secrecy::SecretString;
use ukey_diagnose::{Options, Report, Status, TrustAnchor};
use ukey_token::{Config, Lang};
use zeroize::Zeroize;

/// Exit code when the report was made and at least one check failed.
pub const EXIT_PROBLEMS: u8 = 8;

const DIAGNOSE_HELP: &str = "\
The report goes to the terminal (or JSON with --json) unredacted: it is the user's own data.
The file written with --out is meant to be sent to support: names in certificate subjects,
ID-card numbers and mobile numbers are replaced by markers unless --no-redact is given.
A FILE ending in .txt gets the text report, any other name the JSON report.
报告输出到终端时不隐去个人信息；用 --out 保存给技术支持的文件默认隐去姓名、身份证号和手机号（--no-redact 保留）。

Nothing is written to the token. The network is used only with a portal (--portal, or
portal_url in the configuration files).
诊断不会写入 UKey；只有给出门户（--portal 或配置文件中的 portal_url）时才访问网络。

Exit codes / 退出码:
  0    no check failed (warnings possible) / 没有失败项（可能有警告）
  8    the report shows at least one failed check / 报告中有失败项
  1    the report could not be made or saved / 无法生成或保存报告";

/// Arguments of `ukey diagnose`.
#[derive(Debug, clap::Args)]
#[command(after_help = DIAGNOSE_HELP)]
pub struct DiagnoseArgs {
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    /// Save a report for support to FILE (personal data redacted unless --no-redact).
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
    /// Keep names, ID-card and phone numbers in the file written with --out.
    #[arg(long, requires = "out")]
    pub no_redact: bool,
    /// Read the PIN from the first line of standard input and sign-and-verify each key
    /// with its certificate. The PIN is used once per token and never retried; a token
    /// on its final try or locked is not tried at all.
    #[arg(long)]
    pub pin_stdin: bool,
    /// The token (serial) the PIN is for, when several are inserted.
    #[arg(long, value_name = "SERIAL", requires = "pin_stdin")]
    pub token: Option<String>,
    /// The CA portal's URL: check reachability, TLS, the clock, each certificate's
    /// renewal status.
    #[arg(long, value_name = "URL")]
    pub portal: Option<String>,
    /// Trust anchor (PEM, one or more certificates) the certificates must chain to;
    /// repeatable; added to `trust_anchors` of the config file's [renewal] table.
    #[arg(long, value_name = "PEM")]
    pub trust: Vec<PathBuf>,
    /// Directory of renewal journals (default: the renewal engine's, under
    /// $UKEY_DATA_DIR or the user's data directory).
    #[arg(long, value_name = "DIR")]
    pub journal_dir: Option<PathBuf>,
    /// Warn when a certificate expires within this many days.
    #[arg(long, default_value_t = ukey_diagnose::DEFAULT_EXPIRY_WARNING_DAYS, value_name = "DAYS")]
    pub warn_days: i64,
    /// Show every check's facts in the text report.
    #[arg(long)]
    pub facts: bool,
}

fn read_pin() -> anyhow::Result<SecretString> {
    let mut line = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut line)
        .context("reading the PIN from standard input")?;
    let pin = line.trim_end_matches(['\r', '\n']).to_owned();
    line.zeroize();
    if pin.is_empty() {
        anyhow::bail!("--pin-stdin: no PIN on standard input / 标准输入中没有 PIN 码");
    }
    Ok(SecretString::from(pin))
}

/// Builds the options, runs the diagnosis, prints and saves the report.
pub fn run(args: &DiagnoseArgs, module: Option<PathBuf>, lang: Lang) -> anyhow::Result<u8> {
    let mut options = Options::new(env!("CARGO_PKG_VERSION"));
    options.module = module;
    match Config::load_default() {
        Ok(c) => options.config = c,
        Err(e) => options.config_error = Some(e),
    }
    for path in options
        .config
        .renewal
        .trust_anchors
        .iter()
        .chain(&args.trust)
    {
        let anchors = TrustAnchor::load(path).context("--trust")?;
        options.trust_anchors.extend(anchors);
    }
    options.portal = args.portal.clone().or(options.config.portal_url.clone());
    options.journal_dir = args.journal_dir.clone();
    options.expiry_warning_days = args.warn_days;
    options.pin_token = args.token.clone();
    if args.pin_stdin {
        options.pin = Some(read_pin()?);
    }

    let report = ukey_diagnose::diagnose(&options);
    // The PIN is not needed any more.
    drop(options);

    let mut out = std::io::stdout().lock();
    if args.json {
        serde_json::to_writer_pretty(&mut out, &report)?;
        writeln!(out)?;
    } else {
        write!(
            out,
            "{}",
            ukey_diagnose::render_text(&report, lang, args.facts)
        )?;
    }
    out.flush()?;

    if let Some(path) = &args.out {
        save(&report, path, args.no_redact, lang)?;
        eprintln!(
            "{}",
            match lang {
                Lang::ZhCn => format!("报告已保存到 {}", path.display()),
                Lang::En => format!("Report saved to {}", path.display()),
            }
        );
    }
    Ok(if report.overall == Status::Fail {
        EXIT_PROBLEMS
    } else {
        0
    })
}

/// Writes the support report: redacted unless asked not to; text for `.txt`, else JSON.
fn save(
    report: &Report,
    path: &std::path::Path,
    no_redact: bool,
    lang: Lang,
) -> anyhow::Result<()> {
    let report = if no_redact {
        report.clone()
    } else {
        report.redacted()
    };
    let text = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("txt"));
    let body = if text {
        ukey_diagnose::render_text(&report, lang, true)
    } else {
        let mut s = serde_json::to_string_pretty(&report)?;
        s.push('\n');
        s
    };
    std::fs::write(path, body).with_context(|| format!("writing {}", path.display()))
}
