//! `softhsm-fixtures`: builds SoftHSM2 tokens that look like real UKeys, for the demo,
//! CI scripts and support staff.
//!
//! ```text
//! softhsm-fixtures --dir DIR create [--label L] [--pin P] [--so-pin S] [--alg rsa2048|p256]
//!                  [--cn 张三] [--org ...] [--days N] [--dual] [--json]
//! softhsm-fixtures --dir DIR delete --serial S
//! softhsm-fixtures --dir DIR env
//! softhsm-fixtures --dir DIR ca
//! ```

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use softhsm_fixtures::{CertSpec, KeyAlg, SoftHsm, TokenFixture, TokenSpec};

#[derive(Debug, Parser)]
#[command(
    name = "softhsm-fixtures",
    version,
    about = "Create SoftHSM2 tokens that look like real UKeys / 创建模拟 UKey 的 SoftHSM2 令牌"
)]
struct Cli {
    /// SoftHSM directory (softhsm2.conf, tokens/, test CA); created when missing.
    /// SoftHSM 目录（配置、令牌、测试 CA），不存在时自动创建。
    #[arg(long, env = "SOFTHSM_FIXTURES_DIR", global = true)]
    dir: Option<PathBuf>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create a token with a key pair generated on it and a certificate / 创建令牌
    Create(CreateArgs),
    /// Delete the token with this serial / 删除令牌
    Delete {
        /// Token serial, as `create` printed it / 令牌序列号
        #[arg(long)]
        serial: String,
    },
    /// Print `export SOFTHSM2_CONF=...` for a shell / 输出环境变量设置
    Env,
    /// Print the test CA's PEM file paths / 输出测试 CA 证书路径
    Ca,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum AlgArg {
    Rsa2048,
    P256,
}

#[derive(Debug, clap::Args)]
struct CreateArgs {
    /// The whole token as JSON (a `TokenSpec`; `-` reads stdin); the other options
    /// then do not apply / 以 JSON 描述整个令牌
    #[arg(long, value_name = "FILE", conflicts_with_all = [
        "label", "pin", "so_pin", "alg", "cn", "org", "days", "dual", "no_cert", "no_key",
        "corrupt_cert", "high_bit_serial",
    ])]
    spec: Option<PathBuf>,
    /// Token label (at most 32 bytes) / 令牌标签
    #[arg(long, default_value = "UKey")]
    label: String,
    /// User PIN / 用户 PIN
    #[arg(long = "pin", default_value = softhsm_fixtures::DEFAULT_USER_PIN)]
    pin: String,
    /// Security officer PIN / 管理员 PIN
    #[arg(long = "so-pin", default_value = softhsm_fixtures::DEFAULT_SO_PIN)]
    so_pin: String,
    /// Key algorithm / 密钥算法
    #[arg(long, value_enum, default_value = "rsa2048")]
    alg: AlgArg,
    /// Subject common name / 证书主题 CN
    #[arg(long, default_value = "张三")]
    cn: String,
    /// Subject organisation / 证书主题 O
    #[arg(long, default_value = softhsm_fixtures::DEFAULT_ORG)]
    org: String,
    /// Days until the certificate expires; negative: already expired / 剩余有效天数
    #[arg(long, default_value_t = 10, allow_negative_numbers = true)]
    days: i64,
    /// Add an encryption certificate and key pair (dual-certificate UKey) / 双证书
    #[arg(long)]
    dual: bool,
    /// Key pair only, no certificate object (orphan key) / 只有密钥，没有证书
    #[arg(long, conflicts_with = "no_key")]
    no_cert: bool,
    /// Certificate only, key pair removed (orphan certificate) / 只有证书，没有私钥
    #[arg(long)]
    no_key: bool,
    /// Write garbage instead of the certificate's DER / 写入损坏的证书
    #[arg(long)]
    corrupt_cert: bool,
    /// Give the (first) certificate a serial whose DER has a leading 0x00 / 高位序列号
    #[arg(long)]
    high_bit_serial: bool,
    /// Print the token as JSON / 以 JSON 输出
    #[arg(long)]
    json: bool,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let dir = cli.dir.context(
        "--dir (or SOFTHSM_FIXTURES_DIR) is required / 需要指定 --dir 或 SOFTHSM_FIXTURES_DIR",
    )?;
    let hsm = SoftHsm::at(&dir)?;
    match cli.command {
        Command::Create(args) => create(&hsm, args),
        Command::Delete { serial } => {
            hsm.delete_token(&serial)?;
            println!("deleted token {serial} / 已删除令牌 {serial}");
            Ok(())
        }
        Command::Env => {
            println!(
                "export SOFTHSM2_CONF={}",
                shell_quote(&hsm.conf_path().display().to_string())
            );
            Ok(())
        }
        Command::Ca => {
            let ca = hsm.ca()?;
            println!("root_cert={}", ca.root_cert_path.display());
            println!("issuing_cert={}", ca.issuing_cert_path.display());
            println!("issuing_key={}", ca.issuing_key_path.display());
            Ok(())
        }
    }
}

fn create(hsm: &SoftHsm, args: CreateArgs) -> Result<()> {
    let spec = match &args.spec {
        Some(path) => read_spec(path)?,
        None => spec_from_args(&args),
    };
    let token = hsm.create_token(&spec)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&token)?);
    } else {
        print_token(hsm, &token);
    }
    Ok(())
}

fn read_spec(path: &std::path::Path) -> Result<TokenSpec> {
    let text = if path.as_os_str() == "-" {
        std::io::read_to_string(std::io::stdin()).context("reading the spec from stdin")?
    } else {
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?
    };
    serde_json::from_str(&text)
        .context("the token spec is not valid JSON for a TokenSpec / 令牌规格 JSON 无效")
}

fn spec_from_args(args: &CreateArgs) -> TokenSpec {
    let alg = match args.alg {
        AlgArg::Rsa2048 => KeyAlg::Rsa2048,
        AlgArg::P256 => KeyAlg::EcP256,
    };
    let mut spec = if args.dual {
        TokenSpec::dual(&args.label, alg)
    } else {
        let mut spec = TokenSpec::ukey(&args.label);
        spec.certs = vec![CertSpec::signing(alg, &args.cn, args.days)];
        spec
    };
    spec.user_pin.clone_from(&args.pin);
    spec.so_pin.clone_from(&args.so_pin);
    for cert in &mut spec.certs {
        cert.days_left = args.days;
        cert.subject_cn.clone_from(&args.cn);
        cert.subject_o = (!args.org.is_empty()).then(|| args.org.clone());
        let suffix = cert.label.rsplit(' ').next().unwrap_or_default().to_owned();
        cert.label = format!("{} {suffix}", args.cn);
        cert.with_cert = !args.no_cert;
        cert.with_key = !args.no_key;
        cert.corrupt_cert = args.corrupt_cert;
    }
    if args.high_bit_serial {
        if let Some(first) = spec.certs.first_mut() {
            first.high_bit_serial = true;
        }
    }
    spec
}

fn print_token(hsm: &SoftHsm, token: &TokenFixture) {
    println!(
        "token / 令牌: {} (serial / 序列号 {})",
        token.label, token.serial
    );
    for cert in &token.certs {
        println!(
            "  {} {} {} CN={} serial={} not_after={} key_id={}{}{}",
            cert.usage,
            cert.alg,
            cert.label,
            cert.subject_cn,
            cert.serial_hex,
            cert.not_after,
            cert.key_id_hex(),
            if cert.has_cert_object {
                ""
            } else {
                " (no certificate / 无证书)"
            },
            if cert.has_private_key {
                ""
            } else {
                " (no private key / 无私钥)"
            },
        );
    }
    println!(
        "export SOFTHSM2_CONF={}",
        shell_quote(&hsm.conf_path().display().to_string())
    );
}

/// Single-quotes a path for POSIX shells.
fn shell_quote(text: &str) -> String {
    if text
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "/._-+=:,".contains(c))
    {
        text.to_owned()
    } else {
        format!("'{}'", text.replace('\'', r"'\''"))
    }
}
