//! `ukey`: list the certificates on UKeys and watch keys come and go.
//!
//! Exit codes (also in `ukey --help`):
//! * 0: done;
//! * 1: unexpected error;
//! * 2: bad command line;
//! * 3: no usable PKCS#11 module (not found, not a PKCS#11 library, bad config file);
//! * 4: listed, but at least one token could not be read completely (its errors are
//!   printed, and in `--json` are in that token's `errors`);
//! * 130: `ukey watch` interrupted with Ctrl-C (the shell's SIGINT status).

mod diagnose;
mod output;
mod renew;
mod status;

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use ukey_token::{Config, Lang, Module, WatchMode, Watcher};

const EXIT_CODES: &str = "\
Exit codes / 退出码:
  0    done / 成功
  1    unexpected error / 意外错误
  2    bad command line / 命令行参数错误
  3    no usable PKCS#11 module / 没有可用的 PKCS#11 驱动模块
  4    some token could not be read completely / 有 UKey 未能完整读取
  5    renew: nothing to renew (no order, already renewed) / 无需续期
  6    renew: user action needed (payment, PIN locked or last try, new key mailed,
       rejected, key lacks what the order needs (ask the CA), choose --token/--cert,
       clock) / 需要用户处理
  7    renew: failed; the old certificate still works, or the renewal resumes on the
       next run / 续期失败（旧证书仍可用，或下次运行继续）
  8    ukey diagnose: a check failed / 诊断报告中有失败项
  130  interrupted (Ctrl-C) / 被中断";

/// UKey Renew command line: list the certificates on USB keys (UKeys) and watch them.
#[derive(Debug, Parser)]
#[command(name = "ukey", version, after_help = EXIT_CODES)]
struct Cli {
    /// PKCS#11 module (driver library) to use; default: the config file's
    /// `pkcs11_module`, else the first known module installed.
    #[arg(long, global = true, env = ukey_token::config::MODULE_ENV, value_name = "PATH")]
    module: Option<PathBuf>,

    /// Language of messages and tables (default: from the locale).
    #[arg(long, global = true, value_enum)]
    lang: Option<LangArg>,

    /// More logging on stderr (-v, -vv, -vvv).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LangArg {
    #[value(name = "zh-CN", alias = "zh")]
    ZhCn,
    #[value(name = "en")]
    En,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// List tokens, their certificates and keys.
    List {
        /// Print JSON (`{"tokens": [...]}`) instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Print one line per token inserted or removed, until interrupted (Ctrl-C).
    /// Tokens present at start are reported as inserted.
    Watch {
        /// Print one JSON object per line.
        #[arg(long)]
        json: bool,
        /// How often to look, in milliseconds.
        #[arg(long, default_value_t = 500, value_name = "MS")]
        interval_ms: u64,
    },
    /// Renew a certificate on the token against the CA portal (`ukey renew --portal URL`).
    Renew(renew::RenewArgs),
    /// Show each certificate's renewal status at the portal.
    Status(status::StatusArgs),
    /// Diagnose the tokens, certificates, environment (and portal) for support staff.
    Diagnose(diagnose::DiagnoseArgs),
}

/// Exit codes, see the crate documentation.
const EXIT_ERROR: u8 = 1;
const EXIT_MODULE: u8 = 3;
const EXIT_INCOMPLETE: u8 = 4;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let lang = match cli.lang {
        Some(LangArg::ZhCn) => Lang::ZhCn,
        Some(LangArg::En) => Lang::En,
        None => sys_locale::get_locale()
            .map(|l| Lang::from_locale(&l))
            .unwrap_or_default(),
    };
    init_tracing(cli.verbose);
    let json = match cli.command {
        Command::List { json } | Command::Watch { json, .. } => json,
        Command::Renew(ref a) => a.json,
        Command::Status(ref a) => a.json,
        Command::Diagnose(ref a) => a.json,
    };
    match run(&cli, lang) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            let (code, message, machine) = match e.downcast_ref::<ukey_token::Error>() {
                Some(te) => {
                    let exit = match te {
                        ukey_token::Error::ModuleNotFound { .. }
                        | ukey_token::Error::ModuleInvalid { .. }
                        | ukey_token::Error::ModuleServiceDown { .. }
                        | ukey_token::Error::Config { .. } => EXIT_MODULE,
                        _ => EXIT_ERROR,
                    };
                    (exit, te.user_message(lang), te.code())
                }
                None => (EXIT_ERROR, format!("{e:#}"), "error"),
            };
            if json {
                let v = serde_json::json!({"error": {"code": machine, "message": message}});
                println!("{v}");
            }
            eprintln!("ukey: {message}");
            ExitCode::from(code)
        }
    }
}

fn init_tracing(verbose: u8) {
    let level = match verbose {
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("UKEY_LOG")
        // cryptoki logs every mechanism it has no name for as an ERROR while listing
        // mechanisms (`ukey diagnose`); that is noise below -vv.
        .unwrap_or_else(|_| {
            tracing_subscriber::EnvFilter::new(if verbose < 2 {
                format!("{level},cryptoki::mechanism=off")
            } else {
                level.to_owned()
            })
        });
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

fn load_module(cli: &Cli) -> anyhow::Result<Module> {
    let config = Config::load_default()?;
    let found = ukey_token::resolve_module(cli.module.as_deref(), &config)?;
    tracing::info!(module = %found.path.display(), kind = ?found.kind, "loading the key's library");
    let mut module = Module::load_found(&found)?;
    module.use_config(&config)?;
    Ok(module)
}

fn run(cli: &Cli, lang: Lang) -> anyhow::Result<u8> {
    match cli.command {
        Command::List { json } => {
            let module = load_module(cli)?;
            let listings = module.list()?;
            let now = time::OffsetDateTime::now_utc();
            let mut out = std::io::stdout().lock();
            if json {
                let doc = output::list_json(&module, &listings, now);
                serde_json::to_writer_pretty(&mut out, &doc)?;
                writeln!(out)?;
            } else {
                output::list_text(&mut out, lang, &module, &listings, now)?;
            }
            out.flush()?;
            let mut incomplete = false;
            for l in &listings {
                for e in &l.errors {
                    incomplete = true;
                    eprintln!("ukey: {}", e.user_message(lang));
                }
            }
            Ok(if incomplete { EXIT_INCOMPLETE } else { 0 })
        }
        Command::Renew(ref args) => {
            let config = Config::load_default()?;
            let module = load_module(cli)?;
            renew::run(args, &module, &config, lang)
        }
        Command::Diagnose(ref args) => diagnose::run(args, cli.module.clone(), lang),
        Command::Status(ref args) => {
            let config = Config::load_default()?;
            let module = load_module(cli)?;
            status::run(args, &module, &config, lang)
        }
        Command::Watch { json, interval_ms } => {
            let module = load_module(cli)?;
            let mut watcher = Watcher::new(module, WatchMode::Auto);
            let interval = Duration::from_millis(interval_ms.max(10));
            let mut failing = false;
            loop {
                match watcher.poll() {
                    Ok(events) => {
                        failing = false;
                        let mut out = std::io::stdout().lock();
                        for ev in &events {
                            let now = time::OffsetDateTime::now_utc();
                            if json {
                                writeln!(out, "{}", output::event_json(ev, now))?;
                            } else {
                                writeln!(out, "{}", output::event_text(ev, lang, now))?;
                            }
                        }
                        out.flush()?;
                    }
                    // Keep watching through transient failures, saying so once.
                    Err(e) if !failing => {
                        failing = true;
                        eprintln!("ukey: {}", e.user_message(lang));
                    }
                    Err(_) => {}
                }
                std::thread::sleep(interval);
            }
        }
    }
}
