//! The computer, the application and the PKCS#11 module: what a support desk asks first.

use std::path::{Path, PathBuf};

use ukey_token::{Config, FoundModule, Module};

use crate::report::{Check, Facts, Section, SectionKind, Status, Text};
use crate::text;

/// The operating system as a person would name it: `Ubuntu 24.04.1 LTS (linux x86_64,
/// kernel 6.8.0)`.
pub fn os_description() -> String {
    let arch = std::env::consts::ARCH;
    let os = std::env::consts::OS;
    let pretty = std::fs::read_to_string("/etc/os-release")
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|l| l.strip_prefix("PRETTY_NAME="))
                .map(|v| v.trim().trim_matches('"').to_owned())
        });
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .ok()
        .map(|k| k.trim().to_owned());
    match (pretty, kernel) {
        (Some(p), Some(k)) => format!("{p} ({os} {arch}, kernel {k})"),
        (Some(p), None) => format!("{p} ({os} {arch})"),
        (None, Some(k)) => format!("{os} {arch}, kernel {k}"),
        (None, None) => format!("{os} {arch}"),
    }
}

pub(crate) fn os_check(app_version: &str) -> Check {
    let os = os_description();
    Check::new(
        "environment.system",
        Status::Pass,
        text!(
            "{os}；UKey Renew {app_version}",
            "{os}; UKey Renew {app_version}"
        ),
    )
    .facts(
        Facts::new()
            .with("os", os.clone())
            .with("os_family", std::env::consts::OS)
            .with("arch", std::env::consts::ARCH)
            .with("app_version", app_version),
    )
}

/// A configuration file that could not be read, if any.
pub(crate) fn config_check(error: Option<&ukey_token::Error>) -> Option<Check> {
    let e = error?;
    Some(
        Check::new(
            "environment.config",
            Status::Fail,
            Text::new(
                e.user_message(ukey_token::Lang::ZhCn),
                e.user_message(ukey_token::Lang::En),
            ),
        )
        .action(Text::new(
            "请修正或移走配置文件；诊断暂按默认设置进行。",
            "Fix or move the configuration file away; the diagnosis used the defaults.",
        ))
        .facts(Facts::new().with("error_code", e.code())),
    )
}

/// The module check when the module could not be found or loaded.
pub(crate) fn module_failed(path: Option<&Path>, error: &ukey_token::Error) -> Check {
    let mut facts = Facts::new().with("error_code", error.code());
    if let Some(p) = path {
        facts.push("path", p.display().to_string());
    }
    Check::new(
        "environment.module",
        Status::Fail,
        Text::new(
            error.user_message(ukey_token::Lang::ZhCn),
            error.user_message(ukey_token::Lang::En),
        ),
    )
    .action(Text::new(
        "安装 UKey 厂商提供的驱动（PKCS#11 模块），或用 --module 指定其路径。",
        "Install the UKey vendor's driver (PKCS#11 module), or give its path with --module.",
    ))
    .facts(facts)
}

pub(crate) fn module_loaded(module: &Module) -> Check {
    let info = module.library_info();
    let path = module.path().display().to_string();
    let (maker, version) = (&info.manufacturer, &info.version);
    Check::new(
        "environment.module",
        Status::Pass,
        text!(
            "已加载 PKCS#11 模块 {path}（{maker}，版本 {version}）",
            "Loaded the PKCS#11 module {path} ({maker}, version {version})"
        ),
    )
    .facts(
        Facts::new()
            .with("path", path.clone())
            .with("manufacturer", info.manufacturer.clone())
            .with("description", info.description.clone())
            .with("version", info.version.clone())
            .with("cryptoki_version", info.cryptoki_version.clone()),
    )
}

/// Modules that are software tokens: they never compete for a card reader.
fn is_software(name: &str, path: &Path) -> bool {
    let file = path
        .file_name()
        .map(|f| f.to_string_lossy().to_lowercase())
        .unwrap_or_default();
    name.contains("SoftHSM") || file.contains("softhsm") || file.contains("ukey_sim")
}

/// Other UKey drivers installed besides the one in use. Several vendor middlewares on
/// one machine is a classic source of "the key is not found": each may claim the
/// reader, or the browser plug-in loads the wrong one.
pub(crate) fn other_modules_check(in_use: Option<&Path>, config: &Config) -> Check {
    let canon = |p: &Path| p.canonicalize().unwrap_or_else(|_| p.to_owned());
    let in_use = in_use.map(canon);
    let found = ukey_token::discover_all(config);
    let others: Vec<&FoundModule> = found
        .iter()
        .filter(|m| Some(canon(&m.path)) != in_use)
        .collect();
    let vendors: Vec<&&FoundModule> = others
        .iter()
        .filter(|m| !is_software(&m.name, &m.path))
        .collect();
    let list = |ms: &[&&FoundModule]| {
        ms.iter()
            .map(|m| format!("{} ({})", m.name, m.path.display()))
            .collect::<Vec<_>>()
    };
    let facts = Facts::new().with(
        "installed",
        found
            .iter()
            .map(|m| {
                serde_json::json!({
                    "name": m.name,
                    "path": m.path.display().to_string(),
                    "in_use": Some(canon(&m.path)) == in_use,
                })
            })
            .collect::<Vec<_>>(),
    );
    if vendors.is_empty() {
        let n = found.len();
        return Check::new(
            "environment.other_modules",
            Status::Pass,
            text!(
                "没有发现可能冲突的其他 UKey 驱动（共找到 {n} 个已知模块）。",
                "No other UKey driver that could conflict was found ({n} known modules installed)."
            ),
        )
        .facts(facts);
    }
    let names = list(&vendors).join("; ");
    Check::new(
        "environment.other_modules",
        Status::Warn,
        text!(
            "还安装了其他 UKey 驱动：{names}。多个厂商驱动可能争用读卡器或被浏览器插件误用。",
            "Other UKey drivers are installed too: {names}. Several vendor drivers may compete for the reader, or a browser plug-in may load the wrong one."
        ),
    )
    .action(Text::new(
        "如果 UKey 时有时无，请卸载不再使用的 UKey 驱动后重试。",
        "If the key comes and goes, uninstall the UKey drivers no longer used and retry.",
    ))
    .facts(facts)
}

/// Whether a process named `pcscd` runs (Linux: /proc), and whether its socket exists.
fn pcscd_running() -> (bool, bool) {
    let mut running = false;
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for e in entries.flatten() {
            let name = e.file_name();
            if !name.to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
                continue;
            }
            if let Ok(comm) = std::fs::read_to_string(e.path().join("comm"))
                && comm.trim() == "pcscd"
            {
                running = true;
                break;
            }
        }
    }
    let socket = ["/run/pcscd/pcscd.comm", "/var/run/pcscd/pcscd.comm"]
        .iter()
        .any(|p| PathBuf::from(p).exists());
    (running, socket)
}

/// The smart card service. Only relevant on Linux (Windows and macOS have theirs built
/// in) and for modules that talk to a card reader (not software tokens).
pub(crate) fn pcscd_check(module: Option<(&str, &Path)>) -> Check {
    let id = "environment.pcscd";
    if std::env::consts::OS != "linux" {
        return Check::new(
            id,
            Status::Skip,
            Text::new(
                "本系统的智能卡服务由操作系统提供，无需检查 pcscd。",
                "This system's smart card service is built in; pcscd does not apply.",
            ),
        );
    }
    if let Some((manufacturer, path)) = module
        && (is_software(manufacturer, path) || manufacturer.contains("ukey-sim"))
    {
        return Check::new(
            id,
            Status::Skip,
            text!(
                "当前模块（{manufacturer}）是软件令牌，不使用读卡器，无需 pcscd。",
                "The module in use ({manufacturer}) is a software token without a card reader; pcscd does not apply."
            ),
        );
    }
    let (running, socket) = pcscd_running();
    let facts = Facts::new()
        .with("pcscd_running", running)
        .with("pcscd_socket", socket);
    if running || socket {
        Check::new(
            id,
            Status::Pass,
            Text::new(
                "智能卡服务 pcscd 正在运行（或可按需启动）。",
                "The smart card service pcscd is running (or socket-activated).",
            ),
        )
        .facts(facts)
    } else {
        // Some vendor keys are HID devices their driver reaches directly: a warning,
        // not a failure.
        Check::new(
            id,
            Status::Warn,
            Text::new(
                "智能卡服务 pcscd 没有运行。大多数 UKey 驱动需要它才能找到 UKey。",
                "The smart card service pcscd is not running. Most UKey drivers need it to find the key.",
            ),
        )
        .action(Text::new(
            "安装并启动 pcscd：sudo apt install pcscd && sudo systemctl enable --now pcscd.socket",
            "Install and start pcscd: sudo apt install pcscd && sudo systemctl enable --now pcscd.socket",
        ))
        .facts(facts)
    }
}

pub(crate) fn section() -> Section {
    Section::new(
        SectionKind::Environment,
        "environment",
        Text::new("运行环境", "Environment"),
    )
}
