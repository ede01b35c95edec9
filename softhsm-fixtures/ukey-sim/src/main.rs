//! `ukey-sim`: plug and pull simulated USB keys, arm faults, set latency and PIN tries,
//! for every program using the ukey-sim PKCS#11 module with the same state directory.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use ukey_sim::{Control, Fault, FaultAction, FaultTiming, SimState};

#[derive(Debug, Parser)]
#[command(
    name = "ukey-sim",
    version,
    about = "控制模拟 USB Key（ukey-sim PKCS#11 模块）/ Control simulated USB keys (the ukey-sim PKCS#11 module)"
)]
struct Cli {
    /// 状态目录 / State directory (default: $UKEY_SIM_STATE, else ukey-sim-state next to $SOFTHSM2_CONF)
    #[arg(long, global = true, value_name = "DIR")]
    state: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// 显示所有令牌的模拟状态 / Show the simulated state of every token
    Status {
        /// JSON output
        #[arg(long)]
        json: bool,
    },
    /// 拔出令牌 / Pull the token out
    Unplug { serial: String },
    /// 插入令牌 / Plug the token back in
    Plug { serial: String },
    /// 在第 N 次调用时注入故障 / Inject a fault at the Nth call of a function
    Fault {
        serial: String,
        /// PKCS#11 function, e.g. C_CreateObject
        #[arg(long)]
        function: String,
        /// Which call fires, counting from 1 from now
        #[arg(long, default_value_t = 1)]
        nth: u64,
        /// Return value, e.g. CKR_DEVICE_REMOVED, CKR_DEVICE_MEMORY, CKR_DEVICE_ERROR, CKR_GENERAL_ERROR
        #[arg(long, conflicts_with = "unplug", required_unless_present = "unplug")]
        rv: Option<String>,
        /// Pull the token out at that call instead
        #[arg(long)]
        unplug: bool,
        /// Also fire on every later call
        #[arg(long)]
        repeat: bool,
        /// Forward the call first (it takes effect), then report the fault
        #[arg(long)]
        after: bool,
    },
    /// 清除令牌的所有故障 / Disarm every fault of the token
    ClearFaults { serial: String },
    /// 设置函数延迟 / Delay every call of a function (0 removes the delay)
    Latency {
        serial: String,
        #[arg(long)]
        function: String,
        #[arg(long)]
        ms: u64,
    },
    /// 让令牌像真实 USB Key 芯片一样慢 / Make the token as slow as a real key's chip
    Profile {
        /// Token serial (omit with --list)
        #[arg(required_unless_present = "list")]
        serial: Option<String>,
        /// Profile name (usb-key), or `none` to remove it
        #[arg(required_unless_present = "list")]
        name: Option<String>,
        /// Print every built-in profile with its figures and sources
        #[arg(long)]
        list: bool,
    },
    /// 让令牌成为国密 Key（厂商 SM2 机制）/ Make the token a GM key speaking a vendor's SM2 mechanisms
    Gm {
        /// Token serial (omit with --list)
        #[arg(required_unless_present = "list")]
        serial: Option<String>,
        /// Vendor profile (tass, luna), or `none` for a plain key
        #[arg(required_unless_present = "list")]
        name: Option<String>,
        /// Print every vendor profile with its constants
        #[arg(long)]
        list: bool,
    },
    /// 设置 PIN 重试次数 / Set how many wrong PINs lock the token
    PinTries {
        serial: String,
        #[arg(long)]
        max: u32,
    },
    /// 解锁 PIN（清零错误计数）/ Unlock: reset the wrong-PIN count
    PinReset { serial: String },
    /// 让 C_GetTokenInfo 像厂商驱动那样填写字段 / Make C_GetTokenInfo fill fields as a vendor's module does
    TokenInfo {
        serial: String,
        /// label, raw bytes as hex (e.g. GBK text)
        #[arg(long, value_name = "HEX")]
        label_hex: Option<String>,
        /// manufacturerID, raw bytes as hex
        #[arg(long, value_name = "HEX")]
        manufacturer_hex: Option<String>,
        /// model, raw bytes as hex
        #[arg(long, value_name = "HEX")]
        model_hex: Option<String>,
        /// serialNumber, raw bytes as hex (the simulated key keeps its own identity)
        #[arg(long, value_name = "HEX")]
        serial_hex: Option<String>,
        /// Pad the text fields with NUL bytes instead of blanks
        #[arg(long)]
        pad_nul: bool,
        /// utcTime as raw text (sets CKF_CLOCK_ON_TOKEN), e.g. "" or "2026-12-01"
        #[arg(long, value_name = "TEXT")]
        utc_time: Option<String>,
        /// hardwareVersion MAJOR.MINOR (minor may exceed 99)
        #[arg(long, value_name = "M.m", value_parser = parse_version)]
        hardware_version: Option<(u8, u8)>,
        /// firmwareVersion MAJOR.MINOR
        #[arg(long, value_name = "M.m", value_parser = parse_version)]
        firmware_version: Option<(u8, u8)>,
        /// Every counter CK_UNAVAILABLE_INFORMATION
        #[arg(long)]
        counters_unavailable: bool,
        /// Free memory above total memory
        #[arg(long)]
        counters_nonsense: bool,
    },
    /// 限制可生成的密钥长度 / Limit the key sizes a mechanism offers (C_GetMechanismInfo)
    KeySizes {
        serial: String,
        /// CKM_RSA_PKCS_KEY_PAIR_GEN, CKM_EC_KEY_PAIR_GEN, or a CKM_ value (0x1040)
        #[arg(long)]
        mechanism: String,
        /// Smallest size, bits
        #[arg(long, requires = "max")]
        min: Option<u64>,
        /// Largest size, bits
        #[arg(long, requires = "min")]
        max: Option<u64>,
        /// Report SoftHSM2's own range again
        #[arg(long, conflicts_with_all = ["min", "max"])]
        reset: bool,
    },
    /// 打印 ukey-sim 模块路径 / Print the path of the ukey-sim PKCS#11 module
    ModulePath,
    /// 软件 SKF Key（GM/T 0016）/ Software SKF keys (GM/T 0016), served by the same library
    #[command(subcommand)]
    Skf(SkfCommand),
}

#[derive(Debug, Subcommand)]
enum SkfCommand {
    /// 新建一个 SKF 设备（一个应用，无容器）/ Create an SKF device (one application, no container)
    Create {
        /// Device serial (also its name in `ukey-sim unplug/fault/pin-tries …`)
        serial: String,
        /// DEVINFO label
        #[arg(long, default_value = "UKEY")]
        label: String,
        /// DEVINFO label as raw bytes, hex (e.g. GBK text, as vendors' libraries write it)
        #[arg(long, value_name = "HEX")]
        label_hex: Option<String>,
        /// Application name
        #[arg(long, default_value = ukey_sim::skf::DEFAULT_APP)]
        app: String,
        /// The simulated device's initial user PIN (a test PIN: it is visible to `ps`)
        #[arg(long, default_value = "12345678")]
        pin: String,
        /// Its admin (SO) PIN
        #[arg(long, default_value = "admin123")]
        admin_pin: String,
    },
    /// 列出 SKF 设备 / List the SKF devices with their containers
    List {
        /// JSON output (without private keys)
        #[arg(long)]
        json: bool,
    },
    /// 删除 SKF 设备 / Delete an SKF device
    Delete { serial: String },
    /// 写入容器（如 CA 发卡）/ Write a container as a CA's personalisation does
    Provision {
        serial: String,
        /// Container name
        #[arg(long, default_value = "SM2_CONTAINER")]
        container: String,
        /// Application name
        #[arg(long, default_value = ukey_sim::skf::DEFAULT_APP)]
        app: String,
        /// Signing key: SM2 PKCS#8 PEM (`openssl genpkey -algorithm SM2`)
        #[arg(long, value_name = "FILE")]
        sign_key: PathBuf,
        /// Signing certificate (PEM or DER)
        #[arg(long, value_name = "FILE")]
        sign_cert: PathBuf,
        /// Encryption key (SM2 PKCS#8 PEM)
        #[arg(long, value_name = "FILE", requires = "enc_cert")]
        enc_key: Option<PathBuf>,
        /// Encryption certificate (PEM or DER)
        #[arg(long, value_name = "FILE", requires = "enc_key")]
        enc_cert: Option<PathBuf>,
    },
    /// 打印 SKF 库路径 / Print the path of the SKF library (the same file as the PKCS#11 module)
    LibraryPath,
}

fn parse_mechanism(s: &str) -> Result<u64> {
    Ok(match s {
        "CKM_RSA_PKCS_KEY_PAIR_GEN" => 0x0000,
        "CKM_EC_KEY_PAIR_GEN" | "CKM_ECDSA_KEY_PAIR_GEN" => 0x1040,
        hex if hex.starts_with("0x") => {
            u64::from_str_radix(&hex[2..], 16).with_context(|| format!("mechanism {hex:?}"))?
        }
        dec => dec
            .parse()
            .with_context(|| format!("mechanism {dec:?}: a CKM_ name or number"))?,
    })
}

fn parse_version(s: &str) -> Result<(u8, u8), String> {
    let (major, minor) = s.split_once('.').ok_or("expected MAJOR.MINOR")?;
    Ok((
        major.parse().map_err(|e| format!("major: {e}"))?,
        minor.parse().map_err(|e| format!("minor: {e}"))?,
    ))
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ukey-sim: 错误 / error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run_skf(dir: &std::path::Path, cmd: SkfCommand) -> Result<()> {
    use ukey_sim::skf::{SkfDevice, SkfStore};
    let store = SkfStore::new(dir);
    match cmd {
        SkfCommand::Create {
            serial,
            label,
            label_hex,
            app,
            pin,
            admin_pin,
        } => {
            if serial.is_empty()
                || serial.len() > 31
                || !serial
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
            {
                bail!("serial: 1 to 31 letters, digits or '-'");
            }
            let mut device = SkfDevice::new(&serial, &label, &app, &pin, &admin_pin)?;
            if let Some(h) = label_hex {
                let bytes = hex::decode(&h).context("--label-hex: not hex")?;
                if bytes.len() > 31 {
                    bail!(
                        "--label-hex: {} bytes, DEVINFO.Label holds 31 and a NUL",
                        bytes.len()
                    );
                }
                device.label_hex = Some(h);
            }
            store.create(&device)?;
            println!("SKF 设备 {serial} 已创建 / SKF device {serial} created");
        }
        SkfCommand::List { json } => {
            let state = Control::new(dir)?.status()?;
            let mut out = Vec::new();
            for serial in store.serials()? {
                let Some(d) = store.get(&serial)? else {
                    continue;
                };
                let t = state.token(&serial).cloned().unwrap_or_default();
                let apps: Vec<serde_json::Value> = d
                    .apps
                    .iter()
                    .map(|a| {
                        serde_json::json!({
                            "name": a.name,
                            "containers": a.containers.iter().map(|c| serde_json::json!({
                                "name": c.name,
                                "type": c.container_type(),
                                "sign_key": c.sign.public.is_some(),
                                "sign_cert": c.sign.cert.is_some(),
                                "enc_key": c.enc.public.is_some(),
                                "enc_cert": c.enc.cert.is_some(),
                            })).collect::<Vec<_>>(),
                            "files": a.files.keys().collect::<Vec<_>>(),
                        })
                    })
                    .collect();
                out.push(serde_json::json!({
                    "serial": d.serial,
                    "name": d.name,
                    "label": d.label,
                    "plugged": t.plugged,
                    "pin_tries_left": t.pin.remaining(),
                    "pin_max_tries": t.pin.max_tries,
                    "apps": apps,
                }));
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&out)?);
            } else if out.is_empty() {
                println!("无 SKF 设备 / no SKF device in {}", dir.display());
            } else {
                for d in &out {
                    println!(
                        "{} {} {} PIN {}/{}",
                        d["serial"].as_str().unwrap_or(""),
                        d["label"].as_str().unwrap_or(""),
                        if d["plugged"].as_bool() == Some(true) {
                            "plugged"
                        } else {
                            "unplugged"
                        },
                        d["pin_tries_left"],
                        d["pin_max_tries"],
                    );
                    for a in d["apps"].as_array().into_iter().flatten() {
                        for c in a["containers"].as_array().into_iter().flatten() {
                            println!(
                                "  {}/{} {}",
                                a["name"].as_str().unwrap_or(""),
                                c["name"].as_str().unwrap_or(""),
                                c
                            );
                        }
                    }
                }
            }
        }
        SkfCommand::Delete { serial } => {
            if store.delete(&serial)? {
                println!("SKF 设备 {serial} 已删除 / SKF device {serial} deleted");
            } else {
                bail!("no SKF device {serial}");
            }
        }
        SkfCommand::LibraryPath => println!("{}", ukey_sim::module_path()?.display()),
        SkfCommand::Provision {
            serial,
            container,
            app,
            sign_key,
            sign_cert,
            enc_key,
            enc_cert,
        } => {
            let half = |key: &std::path::Path,
                        cert: &std::path::Path|
             -> Result<ukey_sim::skf::ProvisionHalf> {
                let (scalar, point) = ukey_sim::skf::read_sm2_key(
                    &std::fs::read_to_string(key)
                        .with_context(|| format!("reading {}", key.display()))?,
                )?;
                let cert =
                    std::fs::read(cert).with_context(|| format!("reading {}", cert.display()))?;
                let cert = match pem::parse(&cert) {
                    Ok(p) => p.into_contents(),
                    Err(_) => cert,
                };
                Ok(ukey_sim::skf::ProvisionHalf {
                    scalar: Some(scalar),
                    public: Some(point),
                    cert: Some(cert),
                })
            };
            let sign = half(&sign_key, &sign_cert)?;
            let enc = match (enc_key, enc_cert) {
                (Some(k), Some(c)) => half(&k, &c)?,
                _ => ukey_sim::skf::ProvisionHalf::default(),
            };
            ukey_sim::skf::provision(&store, &serial, &app, &container, false, sign, enc)?;
            println!("SKF 设备 {serial}: 容器 {container} 已写入 / container {container} written");
        }
    }
    Ok(())
}

fn run(cli: Cli) -> Result<()> {
    let dir = cli.state.unwrap_or_else(ukey_sim::default_state_dir);
    let control = || Control::new(&dir).context("opening the state directory");
    match cli.command {
        Command::Status { json } => {
            let state = control()?.status()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&state)?);
            } else {
                print_status(&dir, &state);
            }
        }
        Command::Skf(cmd) => run_skf(&dir, cmd)?,
        Command::Unplug { serial } => {
            control()?.unplug(&serial)?;
            println!("令牌 {serial} 已拔出 / token {serial} unplugged");
        }
        Command::Plug { serial } => {
            control()?.plug(&serial)?;
            println!("令牌 {serial} 已插入 / token {serial} plugged in");
        }
        Command::Fault {
            serial,
            function,
            nth,
            rv,
            unplug,
            repeat,
            after,
        } => {
            let mut fault = match (rv, unplug) {
                (_, true) => Fault::unplug(&function, nth),
                (Some(rv), false) => Fault::fail(&function, nth, &rv),
                (None, false) => bail!("give --rv CKR_... or --unplug"),
            };
            fault.repeat = repeat;
            if after {
                fault.timing = FaultTiming::After;
            }
            let what = describe(&fault);
            control()?.add_fault(&serial, fault)?;
            println!("令牌 {serial} 已设置故障 / fault armed on token {serial}: {what}");
        }
        Command::ClearFaults { serial } => {
            control()?.clear_faults(&serial)?;
            println!("令牌 {serial} 的故障已清除 / faults of token {serial} cleared");
        }
        Command::Latency {
            serial,
            function,
            ms,
        } => {
            control()?.set_latency(&serial, &function, Duration::from_millis(ms))?;
            println!("令牌 {serial}: {function} 延迟 / delay {ms} ms");
        }
        Command::Profile { list: true, .. } => {
            for p in ukey_sim::PROFILES {
                print!("{}", p.describe());
            }
        }
        Command::Profile {
            serial: Some(serial),
            name: Some(name),
            ..
        } => {
            control()?.set_profile_by_name(&serial, &name)?;
            println!("令牌 {serial}: 延迟档案 / latency profile {name}");
        }
        Command::Profile { .. } => bail!("give SERIAL and a profile name, or --list"),
        Command::Gm { list: true, .. } => {
            for p in ukey_sim::gm::PROFILES {
                print!("{}", p.describe());
            }
        }
        Command::Gm {
            serial: Some(serial),
            name: Some(name),
            ..
        } => {
            let gm = (name != "none").then_some(name.as_str());
            control()?.set_gm(&serial, gm)?;
            println!("令牌 {serial}: 国密档案 / GM profile {name}");
        }
        Command::Gm { .. } => bail!("give SERIAL and a GM profile name, or --list"),
        Command::PinTries { serial, max } => {
            control()?.set_pin_tries(&serial, max)?;
            println!("令牌 {serial}: PIN 最多重试 {max} 次 / PIN locks after {max} wrong tries");
        }
        Command::PinReset { serial } => {
            control()?.reset_pin_counter(&serial)?;
            println!("令牌 {serial}: PIN 已解锁 / PIN unlocked");
        }
        Command::TokenInfo {
            serial,
            label_hex,
            manufacturer_hex,
            model_hex,
            serial_hex,
            pad_nul,
            utc_time,
            hardware_version,
            firmware_version,
            counters_unavailable,
            counters_nonsense,
        } => {
            let info = ukey_sim::TokenInfoOverride {
                label_hex,
                manufacturer_hex,
                model_hex,
                serial_hex,
                pad: pad_nul.then_some(0),
                utc_time,
                hardware_version,
                firmware_version,
                counters_unavailable,
                counters_nonsense,
            };
            let reset = info.is_empty();
            control()?.set_token_info(&serial, info)?;
            if reset {
                println!("令牌 {serial}: 令牌信息恢复原样 / token info as SoftHSM2 reports it");
            } else {
                println!("令牌 {serial}: 令牌信息已改写 / token info overridden");
            }
        }
        Command::KeySizes {
            serial,
            mechanism,
            min,
            max,
            reset,
        } => {
            let m = parse_mechanism(&mechanism)?;
            let range = match (min, max, reset) {
                (Some(min), Some(max), false) => Some((min, max)),
                (None, None, true) => None,
                _ => bail!("give --min and --max, or --reset"),
            };
            control()?.set_key_sizes(&serial, m, range)?;
            match range {
                Some((min, max)) => println!(
                    "令牌 {serial}: {mechanism} 密钥长度 {min}–{max} 位 / key sizes {min}-{max} bits"
                ),
                None => println!(
                    "令牌 {serial}: {mechanism} 密钥长度恢复原样 / key sizes as SoftHSM2 reports them"
                ),
            }
        }
        Command::ModulePath => println!("{}", ukey_sim::module_path()?.display()),
    }
    Ok(())
}

fn describe(fault: &Fault) -> String {
    let action = match &fault.action {
        FaultAction::Fail { rv } => rv.clone(),
        FaultAction::Unplug => "unplug".to_owned(),
    };
    let when = match fault.timing {
        FaultTiming::Before => "",
        FaultTiming::After => " after the call",
    };
    let repeat = if fault.repeat {
        " and every later call"
    } else {
        ""
    };
    format!(
        "{} call #{}{repeat}: {action}{when} ({} counted, fired {}x)",
        fault.function, fault.nth, fault.calls, fault.fired
    )
}

fn print_status(dir: &std::path::Path, state: &SimState) {
    println!("状态目录 / state: {}", dir.display());
    if state.tokens.is_empty() {
        println!("（尚无令牌 / no tokens yet: the module records them at C_Initialize）");
        return;
    }
    for (serial, token) in &state.tokens {
        let plugged = if token.plugged {
            "已插入 plugged"
        } else {
            "已拔出 unplugged"
        };
        let pin = if token.pin.locked() {
            "PIN 已锁定 locked".to_owned()
        } else {
            format!(
                "PIN {} 次错误 / {} wrong",
                token.pin.failures, token.pin.failures
            )
        };
        println!(
            "{serial}  {:<16}  {plugged}  {pin} (max {})  events {}",
            token.label.as_deref().unwrap_or("-"),
            token.pin.max_tries,
            token.events
        );
        for fault in &token.faults {
            println!("    故障 fault: {}", describe(fault));
        }
        for (function, ms) in &token.latency_ms {
            println!("    延迟 latency: {function} {ms} ms");
        }
        if let Some(profile) = &token.profile {
            println!("    芯片耗时 chip times ({profile}):");
        }
        for (function, ms) in &token.chip_ms {
            println!("      {function} {ms} ms");
        }
        if let Some(gm) = &token.gm {
            println!("    国密 GM key: {gm}");
        }
    }
}
