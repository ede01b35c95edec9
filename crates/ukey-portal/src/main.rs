//! `ukey-portal`: run the reference renewal portal, or manage its orders.

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand, ValueEnum};
use ukey_portal::{Portal, PortalConfig, TlsFiles};
use ukey_portal_api::{CreateOrderRequest, InitialState, KeyAlgorithm, KeyPolicy, OrderView};

#[derive(Parser, Debug)]
#[command(
    name = "ukey-portal",
    version,
    about = "UKey Renew reference portal / 证书续费参考门户"
)]
struct Cli {
    /// Data directory: database, CA, admin token (created if missing).
    #[arg(
        long,
        global = true,
        env = "UKEY_PORTAL_DATA",
        default_value = "./portal-data"
    )]
    data: PathBuf,
    /// Where orders are stored: a PostgreSQL URL (`postgres://user@host:port/db`; several
    /// portal instances may share it); default: `portal.sqlite3` (SQLite) in the data directory.
    #[arg(
        long,
        global = true,
        env = "UKEY_PORTAL_DATABASE",
        hide_env_values = true
    )]
    database: Option<String>,
    /// Most PostgreSQL connections this process opens.
    #[arg(long, global = true, default_value_t = 16)]
    database_pool: usize,
    #[command(flatten)]
    hsm: HsmArgs,
    #[command(subcommand)]
    command: Command,
}

impl Cli {
    /// The data directory and the database, for every command.
    fn config(&self) -> PortalConfig {
        let mut config = PortalConfig::new(&self.data);
        config.database = self
            .database
            .as_deref()
            .map(|d| ukey_portal::store::Database::parse(d, self.database_pool));
        config
    }
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Serve the protocol and admin API. The first line printed is the URL.
    Serve {
        /// Address to listen on (port 0: any free port).
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: SocketAddr,
        /// Serve the admin API on this address only (e.g. 127.0.0.1:9443), not on
        /// --listen; its URL is the second line printed.
        #[arg(long)]
        admin_listen: Option<SocketAddr>,
        /// Challenges per order and pay-page views per serial a minute, per instance
        /// (0: no limit).
        #[arg(long, default_value_t = 20)]
        rate_per_order: u32,
        /// The same per client IP address (behind a reverse proxy: the proxy's).
        #[arg(long, default_value_t = 120)]
        rate_per_address: u32,
        /// How long a connection may take to send a request's headers, seconds (a
        /// whole request, body included, may take 30).
        #[arg(long, default_value_t = 10)]
        header_timeout_secs: u64,
        /// Issuing CA certificate (PEM; parents may follow) to import into the data dir.
        #[arg(long, requires = "ca_key")]
        ca_cert: Option<PathBuf>,
        /// Private key of --ca-cert (PEM: PKCS#8, SEC1 or PKCS#1; an SM2 key as
        /// `openssl genpkey -algorithm SM2` writes it makes an SM2 CA), or a key in the
        /// HSM: 'pkcs11:token=LABEL;object=LABEL' (RSA-2048 or P-256; --ca-cert then
        /// optional: without it a self-signed root is made through the HSM key).
        #[arg(long)]
        ca_key: Option<PathBuf>,
        /// The key of the CA the portal makes when none is imported or in the data dir
        /// yet: ec (P-256; issues RSA-2048 and EC-P256) or sm2 (issues SM2, 国密).
        #[arg(long, value_enum, default_value = "ec", conflicts_with = "ca_cert")]
        ca_alg: CaAlgArg,
        /// TLS certificate chain (PEM) for HTTPS.
        #[arg(long, requires = "tls_key")]
        tls_cert: Option<PathBuf>,
        /// TLS private key (PEM).
        #[arg(long, requires = "tls_cert")]
        tls_key: Option<PathBuf>,
        /// Base URL clients reach the portal at (payment links, CRL distribution point);
        /// default: the listening URL.
        #[arg(long)]
        public_url: Option<String>,
        /// Lifetime of a challenge, in seconds.
        #[arg(long, default_value_t = 300)]
        challenge_ttl_secs: u32,
        /// CMP: largest difference between a request's messageTime and this clock,
        /// seconds.
        #[arg(long, default_value_t = 300)]
        cmp_message_window_secs: u32,
        /// CMP: how long after issuance a certConf is accepted, seconds (7 days).
        #[arg(long, default_value_t = 604_800)]
        cmp_confirm_window_secs: u32,
        /// CMP: the checkAfter of a pollRep while an order waits, seconds.
        #[arg(long, default_value_t = 60)]
        cmp_check_after_secs: u32,
    },
    /// Business side: renewal orders.
    #[command(subcommand)]
    Order(OrderCommand),
    /// The portal's CA.
    #[command(subcommand)]
    Ca(CaCommand),
    /// Portal-wide policy, kept in the database (every instance follows it). Without an
    /// option: print it.
    Policy {
        /// Renewal codes: `on` gives every order made from now on an 8-digit code that
        /// the holder is shown on the paid order page and that every issue request must
        /// carry (REST `renewal_code`, CMP generalInfo 1.3.6.1.4.1.32473.1.16); `off`.
        #[arg(long, value_enum)]
        renewal_codes: Option<OnOff>,
    },
    /// The HSM (PKCS#11): the escrow's key-encryption key.
    #[command(subcommand)]
    Hsm(HsmCommand),
    /// Sweep renewals left half-way: orders issued at least --older-than-days ago whose
    /// installation was never confirmed go back to ready (still paid), and the
    /// certificates they issued are revoked (cessationOfOperation). Run it daily.
    Sweep {
        #[arg(long, default_value_t = 30)]
        older_than_days: u32,
    },
    /// Revoke a certificate this portal issued; the next CRL lists it with the reason.
    Revoke {
        /// Its serial, hex.
        #[arg(long)]
        serial: String,
        /// keyCompromise, affiliationChanged, superseded, cessationOfOperation,
        /// privilegeWithdrawn or unspecified.
        #[arg(long, value_parser = parse_reason)]
        reason: ukey_portal::ca::Reason,
    },
}

#[derive(Subcommand, Debug)]
enum OrderCommand {
    /// Create an order for a certificate; prints the order id (or the order with --json).
    Create {
        /// Serial of the certificate to renew (hex).
        #[arg(long)]
        serial: String,
        /// Issuer DN, e.g. "CN=UKey Test CA, O=Example" (default: the portal's CA).
        #[arg(long, conflicts_with = "issuer_cert")]
        issuer: Option<String>,
        /// Issuer given as its CA certificate (PEM): its subject is matched exactly.
        #[arg(long)]
        issuer_cert: Option<PathBuf>,
        /// Validity of the renewed certificate, in years (1-10).
        #[arg(long, default_value_t = 1)]
        years: u32,
        /// Initial state.
        #[arg(long, value_enum, default_value = "awaiting-payment")]
        state: StateArg,
        /// Whether the renewed certificate gets a new key.
        #[arg(long, value_enum, default_value = "new")]
        key_policy: PolicyArg,
        /// Include an escrowed encryption certificate.
        #[arg(long)]
        encryption_cert: bool,
        /// Target key algorithm: RSA-2048, EC-P256 (an EC CA) or SM2 (an SM2 CA).
        #[arg(long, default_value = "RSA-2048", value_parser = parse_alg)]
        algorithm: KeyAlgorithm,
        /// The holder's current encryption certificate serial, revoked on completion.
        #[arg(long)]
        old_encryption_serial: Option<String>,
        /// Print the order as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Mark an order paid (awaiting payment → ready).
    Pay { id: String },
    /// Hold a paid order for review (ready → under review): nothing is issued until
    /// it is approved or rejected; CMP clients are answered "waiting".
    Review { id: String },
    /// Approve a reviewed order (under review → ready).
    Approve { id: String },
    /// Cancel an open order: it is rejected with the reason, and the certificates it
    /// issued (never confirmed installed) are revoked (cessationOfOperation).
    Cancel {
        id: String,
        #[arg(long)]
        reason: String,
    },
    /// Reject an order with the reviewer's reason.
    Reject {
        id: String,
        #[arg(long)]
        reason: String,
    },
    /// A new token is mailed (algorithm upgrade the old key cannot do).
    Ship {
        id: String,
        #[arg(long)]
        tracking: String,
    },
    /// Show one order.
    Show {
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// List all orders, newest first.
    List {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
enum CaCommand {
    /// Print the CA's subject, key and certificate file (making the CA if there is none).
    Show {
        /// The key of a CA made now: ec or sm2 (an existing CA stays what it is).
        #[arg(long, value_enum, default_value = "ec")]
        alg: CaAlgArg,
    },
    /// Also renew certificates issued by these CA certificates (PEM bundle).
    AcceptIssuer { pem: PathBuf },
    /// Make the data directory's CA with a key in the HSM (RSA-2048 or P-256, made
    /// beforehand, e.g. with pkcs11-tool --keypairgen): its certificate given, or a
    /// self-signed root signed in the HSM.
    Init {
        /// The key: 'pkcs11:token=LABEL;object=LABEL' (RFC 7512; id=%01 also names it).
        #[arg(long)]
        ca_key: String,
        /// That key's CA certificate (PEM; parents may follow).
        #[arg(long)]
        ca_cert: Option<PathBuf>,
        /// The subject of a new self-signed root, e.g. "C=CN, O=Example CA, CN=Example
        /// Issuing CA" (default: the reference CA's).
        #[arg(long, conflicts_with = "ca_cert")]
        subject: Option<String>,
    },
}

// ---- the HSM (issue 16): options of every command, and `hsm init` ------------------

/// Where the HSM is. The PIN comes from --hsm-pin-file or UKEY_PORTAL_HSM_PIN, never
/// from the command line.
#[derive(clap::Args, Debug)]
struct HsmArgs {
    /// PKCS#11 module of the HSM (e.g. /usr/lib/softhsm/libsofthsm2.so).
    #[arg(long, global = true, env = "UKEY_PORTAL_HSM_MODULE")]
    hsm_module: Option<PathBuf>,
    /// Token holding the key-encryption key that seals escrowed keys (see `hsm init`).
    #[arg(long, global = true, env = "UKEY_PORTAL_HSM_TOKEN")]
    hsm_token: Option<String>,
    /// Label of the key-encryption key.
    #[arg(long, global = true, env = "UKEY_PORTAL_HSM_KEK_LABEL", default_value = ukey_portal::hsm::DEFAULT_KEK_LABEL)]
    hsm_kek_label: String,
    /// File holding the HSM user PIN (mode 0600); else the environment variable
    /// UKEY_PORTAL_HSM_PIN.
    #[arg(long, global = true, env = "UKEY_PORTAL_HSM_PIN_FILE")]
    hsm_pin_file: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
enum HsmCommand {
    /// Make the key-encryption key (AES-256: sensitive, never extractable) on
    /// --hsm-token, unless it is there. Once, before the first serve with --hsm-token.
    Init,
    /// Seal what the database holds of the escrow under the key-encryption key: the
    /// keys stored in clear before the portal had an HSM, and (after `hsm init` with a
    /// new --hsm-kek-label, a rotation) those sealed under another key of the token.
    /// The storage is then rewritten so the old values are gone from its files.
    Seal,
}

/// The HSM settings of `args` (none without --hsm-module); the PIN is read here.
fn hsm_settings(args: &HsmArgs) -> Result<Option<ukey_portal::hsm::HsmSettings>> {
    let Some(module) = &args.hsm_module else {
        if args.hsm_token.is_some() || args.hsm_pin_file.is_some() {
            bail!("--hsm-token and --hsm-pin-file need --hsm-module (the HSM's PKCS#11 module)");
        }
        return Ok(None);
    };
    Ok(Some(ukey_portal::hsm::HsmSettings {
        module: module.clone(),
        token: args.hsm_token.clone(),
        kek_label: args.hsm_kek_label.clone(),
        pin: ukey_portal::hsm::read_pin(args.hsm_pin_file.as_deref())?,
    }))
}

fn hsm(base: &PortalConfig, cmd: HsmCommand) -> Result<()> {
    match cmd {
        HsmCommand::Init => {
            let Some(settings) = &base.hsm else {
                bail!("hsm init needs --hsm-module, --hsm-token and the PIN");
            };
            let Some(token) = &settings.token else {
                bail!("hsm init needs --hsm-token: the token to hold the key-encryption key");
            };
            let h = ukey_portal::hsm::Hsm::open(&settings.module, settings.pin.clone())?;
            let (kek, made) = h.init_kek(token, &settings.kek_label)?;
            println!(
                "{} key-encryption key {:?} (id {}) on HSM token {:?}: AES-256, sensitive, never extractable",
                if made {
                    "已创建 / made:"
                } else {
                    "已存在 / already there:"
                },
                kek.label(),
                kek.id_hex(),
                kek.token_label()
            );
        }
        HsmCommand::Seal => {
            if base.hsm.as_ref().and_then(|s| s.token.as_ref()).is_none() {
                bail!("hsm seal needs --hsm-module, --hsm-token and the PIN");
            }
            let portal = open(base)?;
            let r = portal.seal_escrow_at_rest()?;
            println!(
                "已加密 {} 个明文托管密钥，{} 个改用当前密钥加密密钥，{} 个原已加密 / \
                 sealed {} escrowed key(s) stored in clear, re-sealed {} under the current key-encryption key, {} already sealed under it",
                r.sealed, r.resealed, r.already, r.sealed, r.resealed, r.already
            );
        }
    }
    Ok(())
}

/// What protects the escrow and where the CA key is, said when `serve` starts.
fn say_protection(portal: &Portal, data_dir: &std::path::Path) {
    if let Some(uri) = portal.ca().hsm_uri() {
        eprintln!("ukey-portal: CA 私钥在 HSM 中 / the CA key is in the HSM: {uri}");
    }
    if portal.escrow_kek().is_some() {
        match portal.escrow_in_clear() {
            Ok(0) => {}
            Ok(n) => eprintln!(
                "ukey-portal: 警告：数据库中仍有 {n} 个托管的解密密钥以明文保存（配置 HSM 之前所存），请运行 `ukey-portal hsm seal` / \
                 warning: the database still holds {n} escrowed decryption key(s) in clear, stored before the HSM: run `ukey-portal hsm seal`"
            ),
            Err(e) => tracing::warn!("counting escrowed keys in clear: {e}"),
        }
    }
    match portal.escrow_kek() {
        Some(kek) => eprintln!(
            "ukey-portal: 托管的解密密钥由 HSM 令牌「{}」中的密钥加密密钥「{}」(id {}) 加密保存 / \
             escrowed decryption keys are sealed under the key-encryption key {:?} (id {}) in HSM token {:?}",
            kek.token_label(),
            kek.label(),
            kek.id_hex(),
            kek.label(),
            kek.id_hex(),
            kek.token_label()
        ),
        None => {
            eprintln!(
                "ukey-portal: 注意：托管的解密密钥仅受数据目录 {} 的文件权限（0700/0600）保护，未使用 HSM / \
                 note: escrowed decryption keys are protected only by the file permissions of {} (0700/0600); no HSM holds them \
                 (--hsm-module, --hsm-token: see `ukey-portal hsm init`)",
                data_dir.display(),
                data_dir.display()
            );
            tracing::warn!(
                "escrowed decryption keys are protected only by file permissions (no HSM)"
            );
        }
    }
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum OnOff {
    On,
    Off,
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum StateArg {
    AwaitingPayment,
    Ready,
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum CaAlgArg {
    Ec,
    Sm2,
}

impl From<CaAlgArg> for ukey_portal::ca::CaAlg {
    fn from(a: CaAlgArg) -> Self {
        match a {
            CaAlgArg::Ec => ukey_portal::ca::CaAlg::EcP256,
            CaAlgArg::Sm2 => ukey_portal::ca::CaAlg::Sm2,
        }
    }
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum PolicyArg {
    New,
    Same,
}

fn parse_reason(s: &str) -> Result<ukey_portal::ca::Reason, String> {
    ukey_portal::ca::Reason::parse(s).ok_or_else(|| {
        let all: Vec<&str> = ukey_portal::ca::Reason::ALL
            .iter()
            .map(|r| r.as_str())
            .collect();
        format!("{s:?}: one of {}", all.join(", "))
    })
}

fn parse_alg(s: &str) -> Result<KeyAlgorithm, String> {
    KeyAlgorithm::parse(s)
        .ok_or_else(|| format!("unknown algorithm {s:?}: use RSA-2048, EC-P256 or SM2"))
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let cli = Cli::parse();
    let mut base = cli.config();
    base.hsm = hsm_settings(&cli.hsm)?;
    match cli.command {
        Command::Serve {
            listen,
            admin_listen,
            rate_per_order,
            rate_per_address,
            header_timeout_secs,
            ca_cert,
            ca_key,
            ca_alg,
            tls_cert,
            tls_key,
            public_url,
            challenge_ttl_secs,
            cmp_message_window_secs,
            cmp_confirm_window_secs,
            cmp_check_after_secs,
        } => {
            let mut config = base;
            config.rate_per_subject = rate_per_order;
            config.rate_per_address = rate_per_address;
            config.header_read_timeout = std::time::Duration::from_secs(header_timeout_secs.max(1));
            match ca_key {
                Some(k) if ukey_portal::hsm::Pkcs11Uri::is_uri(&k.to_string_lossy()) => {
                    config.ca_hsm_import = Some(ukey_portal::ca::HsmCaImport {
                        uri: k.to_string_lossy().into_owned(),
                        cert: ca_cert,
                        subject: None,
                    });
                }
                Some(k) => {
                    let cert =
                        ca_cert.context("--ca-key FILE needs --ca-cert (its certificate)")?;
                    config.ca_import = Some((cert, k));
                }
                None => {}
            }
            config.ca_alg = ca_alg.into();
            config.challenge_ttl = time::Duration::seconds(i64::from(challenge_ttl_secs));
            config.cmp = ukey_portal::portal::CmpSettings {
                cmp_message_window: time::Duration::seconds(i64::from(cmp_message_window_secs)),
                cmp_confirm_window: time::Duration::seconds(i64::from(cmp_confirm_window_secs)),
                cmp_check_after: u64::from(cmp_check_after_secs),
            };
            let tls = tls_cert
                .zip(tls_key)
                .map(|(cert, key)| TlsFiles { cert, key });
            serve(config, listen, admin_listen, tls, public_url)
        }
        Command::Order(cmd) => order(&base, cmd),
        Command::Ca(cmd) => ca(&base, cmd),
        Command::Policy { renewal_codes } => {
            let portal = open(&base)?;
            if let Some(v) = renewal_codes {
                portal.set_renewal_code_required(matches!(v, OnOff::On))?;
            }
            println!(
                "续期码 renewal codes: {}",
                if portal.renewal_code_required()? {
                    "on (新订单带续期码 / new orders carry a code)"
                } else {
                    "off"
                }
            );
            Ok(())
        }
        Command::Hsm(cmd) => hsm(&base, cmd),
        Command::Sweep { older_than_days } => {
            let portal = open(&base)?;
            let swept =
                portal.sweep_unconfirmed(time::Duration::days(i64::from(older_than_days)))?;
            for (order, revoked) in &swept {
                println!("{order}  ready  吊销 revoked: {}", revoked.join(", "));
            }
            println!(
                "清理 swept: {} order(s) issued {older_than_days}+ days ago, never confirmed installed",
                swept.len()
            );
            Ok(())
        }
        Command::Revoke { serial, reason } => {
            let portal = open(&base)?;
            portal.revoke(&serial, reason)?;
            println!("revoked {serial} ({})", reason.as_str());
            Ok(())
        }
    }
}

fn serve(
    config: PortalConfig,
    listen: SocketAddr,
    admin_listen: Option<SocketAddr>,
    tls: Option<TlsFiles>,
    public_url: Option<String>,
) -> Result<()> {
    let portal = Arc::new(
        Portal::open(&config).with_context(|| format!("opening {}", config.data_dir.display()))?,
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let (server, admin) = match admin_listen {
            Some(a) => {
                let (s, a) = ukey_portal::start_split(portal, listen, a, tls, public_url)
                    .await
                    .context("starting the servers")?;
                (s, Some(a))
            }
            None => (
                ukey_portal::start(portal, listen, tls, public_url)
                    .await
                    .context("starting the server")?,
                None,
            ),
        };
        // Said before the URL, which tells whoever started the portal that it is up.
        say_protection(&server.portal, &config.data_dir);
        let mut out = std::io::stdout().lock();
        writeln!(out, "{}", server.url)?;
        if let Some(a) = &admin {
            writeln!(out, "{}", a.url)?;
        }
        out.flush()?;
        drop(out);
        tracing::info!(url = %server.url, data = %config.data_dir.display(), "portal listening");
        let admin_wait = async {
            match admin {
                Some(a) => a.wait().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            r = tokio::signal::ctrl_c() => {
                r?;
                tracing::info!("stopping");
                Ok(())
            }
            r = server.wait() => r.context("server stopped"),
            r = admin_wait => r.context("admin server stopped"),
        }
    })
}

fn open(base: &PortalConfig) -> Result<Portal> {
    Portal::open(base).with_context(|| format!("opening {}", base.data_dir.display()))
}

fn order(base: &PortalConfig, cmd: OrderCommand) -> Result<()> {
    let portal = open(base)?;
    match cmd {
        OrderCommand::Create {
            serial,
            issuer,
            issuer_cert,
            years,
            state,
            key_policy,
            encryption_cert,
            algorithm,
            old_encryption_serial,
            json,
        } => {
            let issuer_der = match issuer_cert {
                Some(path) => Some(issuer_der_from_cert(&path)?),
                None => None,
            };
            let req = CreateOrderRequest {
                serial_hex: serial,
                issuer_der,
                issuer_dn: issuer,
                years,
                state: match state {
                    StateArg::AwaitingPayment => InitialState::AwaitingPayment,
                    StateArg::Ready => InitialState::Ready,
                },
                key_policy: match key_policy {
                    PolicyArg::New => KeyPolicy::New,
                    PolicyArg::Same => KeyPolicy::Same,
                },
                with_encryption_cert: encryption_cert,
                target_algorithm: algorithm,
                old_encryption_serial_hex: old_encryption_serial,
            };
            let view = portal.create_order(&req)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&view)?);
            } else {
                println!("{}", view.order_id);
            }
        }
        OrderCommand::Pay { id } => print_view(&portal.pay(&id)?, false)?,
        OrderCommand::Review { id } => print_view(&portal.review(&id)?, false)?,
        OrderCommand::Cancel { id, reason } => {
            let (view, revoked) = portal.cancel(&id, &reason)?;
            print_view(&view, false)?;
            println!(
                "吊销 revoked:          {}",
                if revoked.is_empty() {
                    "-".to_owned()
                } else {
                    revoked.join(", ")
                }
            );
        }
        OrderCommand::Approve { id } => print_view(&portal.approve(&id)?, false)?,
        OrderCommand::Reject { id, reason } => print_view(&portal.reject(&id, &reason)?, false)?,
        OrderCommand::Ship { id, tracking } => print_view(&portal.ship(&id, &tracking)?, false)?,
        OrderCommand::Show { id, json } => print_view(&portal.show_order(&id)?, json)?,
        OrderCommand::List { json } => {
            let orders = portal.list_orders()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&orders)?);
            } else {
                for o in &orders {
                    println!(
                        "{}  {:<16}  {}  {}y {} {}{}",
                        o.order_id,
                        o.state,
                        o.serial_hex,
                        o.terms.years,
                        o.terms.target_algorithm,
                        o.terms.key_policy.as_str(),
                        if o.terms.with_encryption_cert {
                            " +enc"
                        } else {
                            ""
                        }
                    );
                }
            }
        }
    }
    Ok(())
}

fn issuer_der_from_cert(path: &std::path::Path) -> Result<Vec<u8>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let certs = ukey_portal::ca::parse_cert_bundle(&text)?;
    let (_, cert) =
        x509_parser::parse_x509_certificate(&certs[0]).context("parsing the issuer certificate")?;
    Ok(cert.subject().as_raw().to_vec())
}

fn print_view(v: &OrderView, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(v)?);
        return Ok(());
    }
    let opt = |o: &Option<String>| o.clone().unwrap_or_else(|| "-".into());
    println!("订单 order:            {}", v.order_id);
    println!("状态 state:            {}", v.state);
    println!("颁发者 issuer:         {}", v.issuer_dn);
    println!("证书序列号 serial:     {}", v.serial_hex);
    println!(
        "条款 terms:            {} year(s), {}, key {}, encryption certificate {}",
        v.terms.years,
        v.terms.target_algorithm,
        v.terms.key_policy.as_str(),
        if v.terms.with_encryption_cert {
            "yes"
        } else {
            "no"
        }
    );
    println!("驳回原因 reason:       {}", opt(&v.reject_reason));
    println!("运单号 tracking:       {}", opt(&v.tracking_number));
    println!(
        "续期码 renewal code:   {}",
        v.renewal_code
            .as_deref()
            .map(|c| format!("{}-{}", &c[..4], &c[4..]))
            .unwrap_or_else(|| "-".into())
    );
    println!("新证书 issued:         {}", opt(&v.issued_serial_hex));
    println!(
        "新加密证书 encryption: {}",
        opt(&v.issued_encryption_serial_hex)
    );
    println!("主题 subject:          {}", opt(&v.subject));
    Ok(())
}

fn ca(base: &PortalConfig, cmd: CaCommand) -> Result<()> {
    let data = base.data_dir.as_path();
    match cmd {
        CaCommand::Show { alg } => {
            let mut config = base.clone();
            config.ca_alg = alg.into();
            let portal = open(&config)?;
            println!("subject: {}", portal.ca().display_name());
            println!(
                "key: {} {}",
                portal.ca().key_description(),
                match portal.ca().alg() {
                    ukey_portal::ca::CaAlg::EcP256 => "(issues RSA-2048 and EC-P256)",
                    ukey_portal::ca::CaAlg::Sm2 => "(issues SM2, 国密)",
                }
            );
            if let Some(uri) = portal.ca().hsm_uri() {
                println!("key in the HSM: {uri}");
            }
            println!("key identifier: {}", portal.ca().ski());
            println!("certificate: {}", data.join("ca-cert.pem").display());
            println!(
                "CRL: {}",
                ukey_portal_api::paths::crl_of_key(portal.ca().ski())
            );
            for old in portal.ca().retired() {
                println!(
                    "retired CA (signs its CRL only) / 已停用的 CA（仅签发其 CRL）: {}",
                    old.display_name()
                );
                println!("  key identifier: {}", old.ski());
                if let Some(uri) = old.hsm_uri() {
                    println!("  key in the HSM: {uri}");
                }
                if let Some(end) = old.not_after() {
                    println!("  valid until: {end}");
                }
                println!(
                    "  directory: {}",
                    data.join(ukey_portal::ca::RETIRED_DIR)
                        .join(old.ski())
                        .display()
                );
                println!("  CRL: {}", ukey_portal_api::paths::crl_of_key(old.ski()));
            }
        }
        CaCommand::Init {
            ca_key,
            ca_cert,
            subject,
        } => {
            if !ukey_portal::hsm::Pkcs11Uri::is_uri(&ca_key) {
                bail!(
                    "ca init takes a key in the HSM (pkcs11:token=…;object=…); a PEM CA is imported by serve --ca-cert FILE --ca-key FILE"
                );
            }
            let mut config = base.clone();
            config.ca_hsm_import = Some(ukey_portal::ca::HsmCaImport {
                uri: ca_key,
                cert: ca_cert,
                subject,
            });
            let portal = open(&config)?;
            let fingerprint = hex::encode_upper(aws_lc_rs::digest::digest(
                &aws_lc_rs::digest::SHA256,
                portal.ca().cert_der(),
            ));
            println!("subject: {}", portal.ca().display_name());
            println!("key in the HSM: {}", portal.ca().hsm_uri().unwrap_or("-"));
            println!("certificate: {}", data.join("ca-cert.pem").display());
            println!("SHA-256 fingerprint: {fingerprint}");
        }
        CaCommand::AcceptIssuer { pem } => {
            let text = std::fs::read_to_string(&pem)
                .with_context(|| format!("reading {}", pem.display()))?;
            let n = ukey_portal::ca::Ca::add_accepted_issuers(data, &text)?;
            if n == 0 {
                bail!("no certificate in {}", pem.display());
            }
            println!("accepted {n} issuer certificate(s)");
        }
    }
    Ok(())
}
