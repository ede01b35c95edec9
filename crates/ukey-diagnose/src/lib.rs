//! Diagnostics for support staff: everything a support desk would otherwise gather by
//! hand (`pkcs11-tool -L -M -O`, `certutil -scinfo`, a phone call) in one [`Report`].
//!
//! Written once, used by `ukey diagnose` and by the desktop app:
//!
//! ```no_run
//! use ukey_diagnose::{Options, diagnose};
//! let report = diagnose(&Options::new(env!("CARGO_PKG_VERSION")));
//! println!("{}", ukey_diagnose::render_text(&report, ukey_token::Lang::En, false));
//! let for_support = serde_json::to_string_pretty(&report.redacted()).unwrap();
//! # let _ = for_support;
//! ```
//!
//! Sections, in order: the environment (system, app version, PKCS#11 module, other UKey
//! drivers, pcscd), then each token (what it is, PIN state, memory, mechanisms renewal
//! needs, whether it could be read, the PIN self-test) followed by its certificates
//! (validity, paired key, chain to the trust anchors, self-test) and keys without a
//! certificate, then the portal (if given) and unfinished renewals.
//!
//! **Invariants:** the diagnosis never writes to a token (read-only sessions only;
//! C_Login with the PIN is the one state change, and only when a PIN is given, once,
//! never on a token whose PIN is on its final try or locked); it needs no network unless
//! a portal is given; a failure anywhere becomes a failing check, never an error of the
//! whole diagnosis.

pub mod certificate;
pub mod environment;
pub mod journal;
pub mod portal;
pub mod redact;
pub mod render;
pub mod report;
mod selftest;
mod token;

use std::path::PathBuf;
use std::time::Instant;

use secrecy::SecretString;
use ukey_token::{Config, Module};

pub use certificate::{DEFAULT_EXPIRY_WARNING_DAYS, TrustAnchor};
pub use render::render_text;
pub use report::{Check, Counts, Facts, Report, Section, SectionKind, Status, Text, Verdict};

/// Errors of the few things done before a diagnosis (reading trust anchors).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DiagnoseError {
    /// A file could not be read.
    #[error("cannot read {}", .path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A trust anchor file holds no usable certificate.
    #[error("trust anchor {}: {reason}", .path.display())]
    TrustAnchor {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

/// What to diagnose and how.
#[derive(Debug)]
pub struct Options {
    /// Version of the application, for the report.
    pub app_version: String,
    /// The PKCS#11 module: explicit path (else the configuration, else discovery).
    pub module: Option<PathBuf>,
    /// The configuration (module, extra known modules).
    pub config: Config,
    /// Certificates the chain must end at (`--trust`).
    pub trust_anchors: Vec<TrustAnchor>,
    /// The user PIN for the self-test; used once, never retried, only on one token:
    /// the one named by `pin_token`, or the only one inserted.
    pub pin: Option<SecretString>,
    /// Serial of the token the PIN is for (needed when several are inserted).
    pub pin_token: Option<String>,
    /// Portal base URL; no network is used without it.
    pub portal: Option<String>,
    /// Directory of renewal journals; `None` uses the renewal engine's default.
    pub journal_dir: Option<PathBuf>,
    /// Warn when a certificate expires within this many days.
    pub expiry_warning_days: i64,
    /// The configuration file could not be read: reported as a failing check (the
    /// diagnosis goes on with `config`, the defaults).
    pub config_error: Option<ukey_token::Error>,
}

impl Options {
    /// Defaults: discovered module, no trust anchors, no PIN, no portal.
    pub fn new(app_version: &str) -> Options {
        Options {
            app_version: app_version.to_owned(),
            module: None,
            config: Config::default(),
            trust_anchors: Vec::new(),
            pin: None,
            pin_token: None,
            portal: None,
            journal_dir: None,
            expiry_warning_days: DEFAULT_EXPIRY_WARNING_DAYS,
            config_error: None,
        }
    }
}

/// Loads the module (as `options` says) and diagnoses. A module that cannot be found or
/// loaded is a failing check in the report.
///
/// A process may initialise a PKCS#11 module once: an application that already holds a
/// [`Module`] (the desktop app's watcher) calls [`diagnose_with`] instead.
pub fn diagnose(options: &Options) -> Report {
    let started = Instant::now();
    let found = ukey_token::resolve_module(options.module.as_deref(), &options.config);
    let loaded = found.as_ref().map_err(Clone::clone).and_then(|f| {
        let mut module = Module::load_found(f)?;
        // A bad SM2 profile in the configuration is a finding of the environment check
        // (`sm2_profile`), not a reason to diagnose nothing.
        if let Err(e) = module.use_config(&options.config) {
            tracing::debug!("SM2 profile from the configuration: {e}");
        }
        Ok(module)
    });
    match loaded {
        Ok(module) => {
            let mut r = diagnose_with(&module, options);
            r.duration_ms = elapsed_ms(started);
            r
        }
        Err(e) => {
            let path = found.as_ref().map(|f| f.path.clone());
            let mut report = Report::new(&options.app_version);
            let mut env = environment::section();
            env.checks.push(environment::os_check(&options.app_version));
            env.checks
                .extend(environment::config_check(options.config_error.as_ref()));
            env.checks
                .push(environment::config_sources_check(&options.config));
            env.checks
                .push(environment::module_failed(path.as_deref().ok(), &e));
            env.checks.push(environment::other_modules_check(
                path.as_deref().ok(),
                &options.config,
            ));
            env.checks.push(environment::pcscd_check(None));
            report.sections.push(env);
            tail(&mut report, options, &[]);
            report.generated_at = certificate::rfc3339(time::OffsetDateTime::now_utc());
            report.duration_ms = elapsed_ms(started);
            report.finish();
            report
        }
    }
}

fn elapsed_ms(started: Instant) -> u64 {
    u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// Diagnoses with a module already loaded.
pub fn diagnose_with(module: &Module, options: &Options) -> Report {
    let started = Instant::now();
    let now = time::OffsetDateTime::now_utc();
    let mut report = Report::new(&options.app_version);
    report.generated_at = certificate::rfc3339(now);

    let mut env = environment::section();
    env.checks.push(environment::os_check(&options.app_version));
    env.checks
        .extend(environment::config_check(options.config_error.as_ref()));
    env.checks
        .push(environment::config_sources_check(&options.config));
    env.checks.push(environment::module_loaded(module));
    env.checks
        .push(environment::sm2_profile_check(module, &options.config));
    env.checks.push(environment::other_modules_check(
        Some(module.path()),
        &options.config,
    ));
    env.checks.push(environment::pcscd_check(Some((
        &module.library_info().manufacturer,
        module.path(),
    ))));

    // With a portal, its issuing CA completes chains the user's root alone cannot.
    let portal_ca: Vec<Vec<u8>> = match &options.portal {
        Some(url) if !options.trust_anchors.is_empty() => {
            portal::fetch_ca(url, &options.trust_anchors)
        }
        _ => Vec::new(),
    };
    let mut certificates = Vec::new();
    let mut token_sections = Vec::new();
    match module.tokens() {
        Ok(tokens) if tokens.is_empty() => env.checks.push(Check::new(
            "environment.tokens",
            Status::Fail,
            Text::new(
                "没有找到 UKey。请插入 UKey；如已插入，请换一个 USB 口或重新安装驱动。",
                "No token found. Insert the key; if it is in, try another USB port or reinstall the driver.",
            ),
        )),
        Ok(tokens) => {
            let n = tokens.len();
            env.checks.push(
                Check::new(
                    "environment.tokens",
                    Status::Pass,
                    crate::text!("找到 {n} 个 UKey。", "{n} token(s) found."),
                )
                .facts(Facts::new().with("count", n)),
            );
            for t in &tokens {
                let result = token::diagnose(module, t, options, &portal_ca, n > 1, now);
                token_sections.extend(result.sections);
                certificates.extend(result.certificates);
                report.personal.extend(result.personal);
            }
        }
        Err(e) => env.checks.push(
            Check::new(
                "environment.tokens",
                Status::Fail,
                Text::new(
                    e.user_message(ukey_token::Lang::ZhCn),
                    e.user_message(ukey_token::Lang::En),
                ),
            )
            .facts(Facts::new().with("error_code", e.code())),
        ),
    }
    report.sections.push(env);
    report.sections.extend(token_sections);
    tail(&mut report, options, &certificates);
    report.duration_ms = elapsed_ms(started);
    report.finish();
    report
}

/// Portal and journal sections.
fn tail(report: &mut Report, options: &Options, certificates: &[(String, Vec<u8>)]) {
    if let Some(url) = &options.portal {
        report
            .sections
            .push(portal::diagnose(url, &options.trust_anchors, certificates));
    }
    report
        .sections
        .push(journal::diagnose(options.journal_dir.as_deref()));
}
