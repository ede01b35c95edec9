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

/// Which configuration file each setting came from (the CA's system-wide file, the
/// user's own), and where a missing portal would come from.
pub(crate) fn config_sources_check(config: &Config) -> Check {
    let mut facts = Facts::new();
    for (what, path) in &config.sources {
        facts.push(what, path.display().to_string());
    }
    let system = Config::system_path().display().to_string();
    let user = Config::default_path()
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    facts.push("system_file", system.clone());
    facts.push("user_file", user.clone());
    if config.sources.is_empty() {
        return Check::new(
            "environment.config_sources",
            Status::Pass,
            text!(
                "没有配置文件（CA 的 {system}、本人的 {user}）：使用默认设置。",
                "No configuration file (the CA's {system}, your own {user}): defaults are used."
            ),
        )
        .facts(facts);
    }
    let list = config
        .sources
        .iter()
        .map(|(w, p)| format!("{w} ← {}", p.display()))
        .collect::<Vec<_>>()
        .join("; ");
    let mut check = Check::new(
        "environment.config_sources",
        Status::Pass,
        text!("设置来源：{list}", "Settings from: {list}"),
    )
    .facts(facts);
    if config.portal_url.is_none() {
        check = check.action(text!(
            "未设置 CA 门户：CA 的安装程序会写入 {system} 的 portal_url，也可写入本人的 {user}。",
            "No CA portal is set: your CA's installer writes portal_url to {system}; you can also set it in {user}."
        ));
    }
    check
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

/// Which SM2 mechanism profile the module is used through ([`ukey_token::gm`]): from
/// the configuration, else a built-in one matched by file name or manufacturer.
pub(crate) fn sm2_profile_check(module: &Module, config: &Config) -> Check {
    let maker = &module.library_info().manufacturer;
    // A built-in may also be claimed by a key's manufacturerID (one module, keys of
    // several makers): the first key that has one names it.
    let by_key = || {
        module.tokens().ok().and_then(|tokens| {
            tokens.iter().find_map(|t| {
                ukey_token::gm::profile_for(config, module.path(), &t.manufacturer)
                    .ok()
                    .flatten()
            })
        })
    };
    let found = match ukey_token::gm::profile_for(config, module.path(), maker) {
        Ok(None) => Ok(by_key()),
        other => other,
    };
    match found {
        Ok(Some(p)) => {
            let (tried_zh, tried_en) = if p.tried_on_hardware {
                ("已在硬件上验证", "tried on hardware")
            } else {
                ("尚未在硬件上验证", "not yet tried on hardware")
            };
            let name = &p.name;
            Check::new(
                "environment.sm2_profile",
                Status::Pass,
                text!(
                    "国密 SM2 通过厂商机制配置 {name} 使用（{tried_zh}）",
                    "SM2 is used through the vendor mechanism profile {name} ({tried_en})"
                ),
            )
            .facts(
                Facts::new()
                    .with("profile", p.name.clone())
                    .with("key_pair_gen", format!("0x{:08X}", p.key_pair_gen))
                    .with("host_computes_digest", p.host_computes_digest())
                    .with("tried_on_hardware", p.tried_on_hardware),
            )
        }
        Ok(None) => Check::new(
            "environment.sm2_profile",
            Status::Skip,
            text!(
                "此模块没有已知的国密 SM2 机制配置：RSA 与 ECC 证书照常更新，SM2 密钥无法通过它生成",
                "This module has no known SM2 mechanism profile: RSA and ECC certificates renew as usual, SM2 keys cannot be made through it"
            ),
        )
        .action(Text::new(
            "如厂商提供 SM2 机制常量，可在 config.toml 的 [[modules]] 中加入 sm2_profile 或 [modules.sm2]。",
            "If the vendor documents its SM2 mechanism constants, add sm2_profile or [modules.sm2] to its [[modules]] entry in config.toml.",
        )),
        Err(reason) => Check::new(
            "environment.sm2_profile",
            Status::Fail,
            text!("国密机制配置有误：{reason}", "The SM2 mechanism profile is wrong: {reason}"),
        ),
    }
}

/// Modules that are software tokens: they never compete for a card reader.
fn is_software(name: &str, path: &Path) -> bool {
    let file = path
        .file_name()
        .map(|f| f.to_string_lossy().to_lowercase())
        .unwrap_or_default();
    name.contains("SoftHSM") || file.contains("softhsm") || file.contains("ukey_sim")
}

/// What an installed module is, for the conflict check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ModuleKind {
    /// A UKey maker's middleware: two of them may fight over one reader.
    Vendor,
    /// A generic smart-card driver (OpenSC): installed on most Linux desktops, shares
    /// the reader through pcscd and does not conflict with a vendor driver.
    Generic,
    /// A software token (SoftHSM2, ukey-sim): no reader at all.
    Software,
}

impl ModuleKind {
    fn of(name: &str, path: &Path) -> ModuleKind {
        let file = path
            .file_name()
            .map(|f| f.to_string_lossy().to_lowercase())
            .unwrap_or_default();
        if is_software(name, path) {
            ModuleKind::Software
        } else if name.to_lowercase().contains("opensc") || file.contains("opensc-pkcs11") {
            ModuleKind::Generic
        } else {
            ModuleKind::Vendor
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            ModuleKind::Vendor => "vendor",
            ModuleKind::Generic => "generic",
            ModuleKind::Software => "software",
        }
    }
}

/// Other UKey drivers installed besides the one in use. Several vendor middlewares on
/// one machine is a classic source of "the key is not found": each may claim the
/// reader, or the browser plug-in loads the wrong one. So the check warns when two or
/// more vendor modules are installed (the one in use counted), naming those not in use.
/// Generic drivers (OpenSC, on most Linux desktops) and software tokens (SoftHSM2) do
/// not conflict: they, and a lone vendor module not in use, are listed, not warned about.
pub(crate) fn other_modules_check(in_use: Option<&Path>, config: &Config) -> Check {
    let canon = |p: &Path| p.canonicalize().unwrap_or_else(|_| p.to_owned());
    let in_use = in_use.map(canon);
    let found = ukey_token::discover_all(config);
    let others: Vec<(&FoundModule, ModuleKind)> = found
        .iter()
        .filter(|m| Some(canon(&m.path)) != in_use)
        .map(|m| (m, ModuleKind::of(&m.name, &m.path)))
        .collect();
    let list = |kind: ModuleKind| {
        others
            .iter()
            .filter(|(_, k)| *k == kind)
            .map(|(m, _)| format!("{} ({})", m.name, m.path.display()))
            .collect::<Vec<_>>()
    };
    let in_use_kind = in_use.as_deref().map(|p| {
        let name = found
            .iter()
            .find(|m| canon(&m.path) == p)
            .map_or("", |m| m.name.as_str());
        ModuleKind::of(name, p)
    });
    let vendors = list(ModuleKind::Vendor);
    let conflict = vendors.len() + usize::from(in_use_kind == Some(ModuleKind::Vendor)) >= 2;
    let harmless: Vec<String> = list(ModuleKind::Generic)
        .into_iter()
        .chain(list(ModuleKind::Software))
        .chain(if conflict {
            Vec::new()
        } else {
            vendors.clone()
        })
        .collect();
    let facts = Facts::new().with(
        "installed",
        found
            .iter()
            .map(|m| {
                serde_json::json!({
                    "name": m.name,
                    "path": m.path.display().to_string(),
                    "kind": ModuleKind::of(&m.name, &m.path).as_str(),
                    "in_use": Some(canon(&m.path)) == in_use,
                })
            })
            .collect::<Vec<_>>(),
    );
    if !conflict {
        let n = found.len();
        let reason = if harmless.is_empty() {
            text!(
                "没有发现可能冲突的其他 UKey 驱动（共找到 {n} 个已知模块）。",
                "No other UKey driver that could conflict was found ({n} known modules installed)."
            )
        } else {
            let names = harmless.join("; ");
            text!(
                "没有发现可能冲突的其他 UKey 驱动。另外安装了：{names}，它们不会与当前驱动冲突。",
                "No other UKey driver that could conflict was found. Also installed, without conflict: {names}."
            )
        };
        return Check::new("environment.other_modules", Status::Pass, reason).facts(facts);
    }
    let names = vendors.join("; ");
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

#[cfg(test)]
mod tests {
    use super::*;
    use ukey_token::ModuleEntry;

    /// Files standing in for installed modules (discovery only looks for the file),
    /// listed in the configuration like a user's `[[modules]]`.
    fn installed(dir: &Path, modules: &[(&str, &str)]) -> Config {
        let mut config = Config::default();
        for (name, file) in modules {
            let path = dir.join(file);
            std::fs::write(&path, b"not loaded").unwrap();
            config.modules.push(ModuleEntry::new(*name, path));
        }
        config
    }

    fn installed_facts(check: &Check) -> Vec<serde_json::Value> {
        check
            .facts
            .get("installed")
            .and_then(|v| v.as_array())
            .cloned()
            .unwrap_or_default()
    }

    /// These tests assume this machine has no real vendor UKey driver installed (OpenSC
    /// and SoftHSM2 may be).
    #[test]
    fn opensc_and_softhsm_are_facts_not_conflicts() {
        let dir = tempfile::tempdir().unwrap();
        let config = installed(
            dir.path(),
            &[
                ("Longmai mToken (龙脉)", "libgm3000_pkcs11.so"),
                ("OpenSC", "opensc-pkcs11.so"),
                ("SoftHSM2", "libsofthsm2.so"),
            ],
        );
        let vendor = dir.path().join("libgm3000_pkcs11.so");
        let check = other_modules_check(Some(&vendor), &config);
        assert_eq!(check.status, Status::Pass, "{check:?}");
        assert!(check.action.is_none());
        let opensc = dir.path().join("opensc-pkcs11.so").display().to_string();
        assert!(check.reason.en.contains(&opensc), "{}", check.reason.en);
        assert!(
            check.reason.zh_cn.contains(&opensc),
            "{}",
            check.reason.zh_cn
        );
        let kinds: Vec<(String, String, bool)> = installed_facts(&check)
            .iter()
            .filter(|m| {
                m["path"]
                    .as_str()
                    .unwrap()
                    .starts_with(&*dir.path().to_string_lossy())
            })
            .map(|m| {
                (
                    m["name"].as_str().unwrap().to_owned(),
                    m["kind"].as_str().unwrap().to_owned(),
                    m["in_use"].as_bool().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            kinds,
            [
                (
                    "Longmai mToken (龙脉)".to_owned(),
                    "vendor".to_owned(),
                    true
                ),
                ("OpenSC".to_owned(), "generic".to_owned(), false),
                ("SoftHSM2".to_owned(), "software".to_owned(), false),
            ]
        );

        // SoftHSM2 in use (tests, the demo) with OpenSC and one vendor driver: no two
        // vendor middlewares, no conflict; the vendor driver is listed.
        let softhsm = dir.path().join("libsofthsm2.so");
        let check = other_modules_check(Some(&softhsm), &config);
        assert_eq!(check.status, Status::Pass, "{check:?}");
        assert!(check.reason.en.contains("Longmai"), "{}", check.reason.en);
    }

    #[test]
    fn another_vendor_driver_is_a_conflict_and_opensc_is_not_named() {
        let dir = tempfile::tempdir().unwrap();
        let config = installed(
            dir.path(),
            &[
                ("Longmai mToken (龙脉)", "libgm3000_pkcs11.so"),
                ("Haitai (海泰方圆)", "libhtpkcs11.so"),
                ("OpenSC", "opensc-pkcs11.so"),
            ],
        );
        let vendor = dir.path().join("libgm3000_pkcs11.so");
        let check = other_modules_check(Some(&vendor), &config);
        assert_eq!(check.status, Status::Warn, "{check:?}");
        assert!(check.action.is_some());
        assert!(check.reason.en.contains("Haitai"), "{}", check.reason.en);
        assert!(
            check.reason.zh_cn.contains("海泰方圆"),
            "{}",
            check.reason.zh_cn
        );
        assert!(!check.reason.en.contains("OpenSC"), "{}", check.reason.en);
        assert!(
            !check.reason.en.contains("Longmai"),
            "in use: {}",
            check.reason.en
        );

        // With OpenSC in use, the two vendor drivers still fight over the reader.
        let opensc = dir.path().join("opensc-pkcs11.so");
        let check = other_modules_check(Some(&opensc), &config);
        assert_eq!(check.status, Status::Warn, "{check:?}");
        assert!(check.reason.en.contains("Longmai") && check.reason.en.contains("Haitai"));
    }
}
