//! Where the PKCS#11 module comes from: an explicit path, the configuration file, or
//! discovery among known install paths.
//!
//! The vendor table is **best effort**: it lists library file names that the drivers of
//! common Chinese UKey makers (and OpenSC, SoftHSM2) install, gathered from vendor
//! packages and public forum posts, not verified against every driver version. A user
//! whose driver is elsewhere adds it to the configuration file:
//!
//! ```toml
//! # ~/.config/ukey/config.toml (Linux; see `Config::default_path`)
//! pkcs11_module = "/opt/vendor/lib/libvendor_p11.so"   # always use this one
//! portal_url = "https://portal.example-ca.cn"            # the CA's renewal portal
//!
//! [[modules]]                                            # or extend discovery
//! name = "My CA's UKey"
//! path = "/opt/myca/lib/libmyca_pkcs11.so"
//! ```
//!
//! # Two layers
//!
//! A CA ships the client preconfigured: a system-wide file (`/etc/ukey/config.toml`, or
//! `$UKEY_SYSTEM_CONFIG`) holds its portal, trust anchors and module table; the user's
//! own file is read over it. A setting the user's file gives wins; lists add up (the
//! user's modules are tried first, both files' trust anchors are trusted). The CLI and
//! the desktop app read the same layers; [`Config::sources`] says which file each
//! setting came from.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::{Error, Result};

/// Environment variable naming the configuration file (overrides the default path).
pub const CONFIG_ENV: &str = "UKEY_CONFIG";
/// Environment variable naming the PKCS#11 module (the CLI reads it through clap).
pub const MODULE_ENV: &str = "UKEY_PKCS11_MODULE";
/// Environment variable naming the system-wide configuration file.
pub const SYSTEM_CONFIG_ENV: &str = "UKEY_SYSTEM_CONFIG";
/// The system-wide configuration file a CA's installer writes.
pub const SYSTEM_CONFIG_PATH: &str = "/etc/ukey/config.toml";

/// A known module: a human name and a path, and how it speaks SM2 if it does.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModuleEntry {
    /// Name shown to the user, e.g. `Longmai mToken GM3000`.
    pub name: String,
    /// Absolute path of the PKCS#11 library.
    pub path: PathBuf,
    /// `sm2_profile = "tass"`: the module speaks SM2 as this built-in profile says
    /// ([`crate::gm`]).
    #[serde(default)]
    pub sm2_profile: Option<String>,
    /// `[modules.sm2]`: the module's own SM2 constants ([`crate::gm::MechanismProfile`]).
    #[serde(default)]
    pub sm2: Option<crate::gm::MechanismProfile>,
    /// `kind = "skf"`: the library is an SKF (GM/T 0016) library; `"pkcs11"`: a
    /// PKCS#11 module. Unset: told by what it exports (PKCS#11 first, for a library
    /// that exports both).
    #[serde(default)]
    pub kind: Option<Interface>,
}

impl ModuleEntry {
    /// A module with a name and a path, nothing said about SM2.
    pub fn new(name: impl Into<String>, path: impl Into<PathBuf>) -> ModuleEntry {
        ModuleEntry {
            name: name.into(),
            path: path.into(),
            sm2_profile: None,
            sm2: None,
            kind: None,
        }
    }
}

/// The interface a key is used through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Interface {
    /// PKCS#11 (Cryptoki).
    Pkcs11,
    /// SKF, GM/T 0016.
    Skf,
}

impl Interface {
    /// `PKCS#11` or `SKF`, as shown to users.
    pub fn display_name(self) -> &'static str {
        match self {
            Interface::Pkcs11 => "PKCS#11",
            Interface::Skf => "SKF (GM/T 0016)",
        }
    }
}

/// The configuration file's content.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Use this module, skipping discovery.
    #[serde(default)]
    pub pkcs11_module: Option<PathBuf>,
    /// Extra modules to try first during discovery.
    #[serde(default)]
    pub modules: Vec<ModuleEntry>,
    /// The CA's renewal portal (`https://…`).
    #[serde(default)]
    pub portal_url: Option<String>,
    /// Who to call when a PIN is locked (the CA's hotline), shown as it is.
    #[serde(default)]
    pub support_contact: Option<String>,
    /// `[renewal]`: trust anchors and naming of renewed objects.
    #[serde(default)]
    pub renewal: RenewalConfig,
    /// `[cmp]`: renew over CMP (RFC 9483) instead of the portal's protocol.
    #[serde(default)]
    pub cmp: CmpConfig,
    /// Which file each setting came from (`setting`, file), filled by
    /// [`Config::load_default`]; not part of the file.
    #[serde(skip)]
    pub sources: Vec<(String, PathBuf)>,
}

/// The `[renewal]` table:
///
/// ```toml
/// [renewal]
/// trust_anchors = ["/etc/ukey/ca-root.pem"]   # issued certificates must chain to one
/// key_id = "keep"                             # or "sha1" (SHA-1 of the public key)
/// signing_label = "Sign"                      # default: the old certificate's label
/// encryption_label = "Encrypt"
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RenewalConfig {
    /// PEM files of the CA certificates renewed certificates must chain to.
    #[serde(default)]
    pub trust_anchors: Vec<PathBuf>,
    /// `keep` (default) or `sha1`.
    #[serde(default)]
    pub key_id: Option<String>,
    /// Label of the new signing objects.
    #[serde(default)]
    pub signing_label: Option<String>,
    /// Label of the new encryption objects.
    #[serde(default)]
    pub encryption_label: Option<String>,
}

/// The `[cmp]` table: a CA that renews over CMP (RFC 9483).
///
/// ```toml
/// [cmp]
/// url = "https://ca.example.cn/.well-known/cmp/p/renewal"
/// request = "kur"     # or "cr", for CAs without key update
/// key = "new"         # or "same": a reissue for the key on the token
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CmpConfig {
    /// The CA's CMP endpoint.
    #[serde(default)]
    pub url: Option<String>,
    /// `kur` (default) or `cr`.
    #[serde(default)]
    pub request: Option<String>,
    /// `new` (default) or `same`.
    #[serde(default)]
    pub key: Option<String>,
}

impl Config {
    /// `$UKEY_CONFIG`, else `config.toml` in the user's configuration directory
    /// (`~/.config/ukey/` on Linux, `~/Library/Application Support/ukey/` on macOS,
    /// `%APPDATA%\ukey\config\` on Windows).
    pub fn default_path() -> Option<PathBuf> {
        if let Some(p) = std::env::var_os(CONFIG_ENV) {
            return Some(PathBuf::from(p));
        }
        directories::ProjectDirs::from("", "", "ukey").map(|d| d.config_dir().join("config.toml"))
    }

    /// `$UKEY_SYSTEM_CONFIG`, else `/etc/ukey/config.toml`.
    pub fn system_path() -> PathBuf {
        std::env::var_os(SYSTEM_CONFIG_ENV)
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(SYSTEM_CONFIG_PATH))
    }

    /// The system-wide file, then the user's ([`Config::default_path`]) over it; a
    /// missing file is an empty layer, a malformed one an error naming it.
    pub fn load_default() -> Result<Config> {
        let system = Config::system_path();
        let mut layers = vec![(Config::load(&system)?, system)];
        if let Some(user) = Config::default_path() {
            layers.push((Config::load(&user)?, user));
        }
        Ok(Config::layered(layers))
    }

    /// Merges layers, lowest first: a later layer's setting wins, lists add up (later
    /// layers' modules first, every layer's trust anchors), and `sources` records
    /// where each setting came from.
    pub fn layered(layers: Vec<(Config, PathBuf)>) -> Config {
        let mut out = Config::default();
        for (layer, path) in layers {
            let mut from = |what: &str| out_sources_push(&mut out.sources, what, &path);
            if let Some(m) = layer.pkcs11_module {
                from("pkcs11_module");
                out.pkcs11_module = Some(m);
            }
            if let Some(u) = layer.portal_url {
                from("portal_url");
                out.portal_url = Some(u);
            }
            if let Some(c) = layer.support_contact {
                from("support_contact");
                out.support_contact = Some(c);
            }
            if !layer.modules.is_empty() {
                from("modules");
                let mut modules = layer.modules;
                modules.extend(std::mem::take(&mut out.modules));
                out.modules = modules;
            }
            let r = layer.renewal;
            if !r.trust_anchors.is_empty() {
                from("renewal.trust_anchors");
                out.renewal.trust_anchors.extend(r.trust_anchors);
            }
            if let Some(k) = r.key_id {
                from("renewal.key_id");
                out.renewal.key_id = Some(k);
            }
            if let Some(l) = r.signing_label {
                from("renewal.signing_label");
                out.renewal.signing_label = Some(l);
            }
            if let Some(l) = r.encryption_label {
                from("renewal.encryption_label");
                out.renewal.encryption_label = Some(l);
            }
            let c = layer.cmp;
            if let Some(u) = c.url {
                from("cmp.url");
                out.cmp.url = Some(u);
            }
            if let Some(r) = c.request {
                from("cmp.request");
                out.cmp.request = Some(r);
            }
            if let Some(k) = c.key {
                from("cmp.key");
                out.cmp.key = Some(k);
            }
        }
        out
    }

    /// Reads a configuration file; a missing file is an empty configuration.
    pub fn load(path: &Path) -> Result<Config> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Config::default()),
            Err(e) => {
                return Err(Error::Config {
                    path: path.to_owned(),
                    reason: e.to_string(),
                });
            }
        };
        toml::from_str(&text).map_err(|e| Error::Config {
            path: path.to_owned(),
            reason: e.to_string(),
        })
    }
}

/// The settings a front end edits in the user's own file ([`Config::default_path`]):
/// the desktop app's settings page writes these, the CLI reads them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UserSettings {
    /// `pkcs11_module`.
    pub pkcs11_module: Option<PathBuf>,
    /// `portal_url`.
    pub portal_url: Option<String>,
    /// `support_contact`.
    pub support_contact: Option<String>,
    /// `[renewal] trust_anchors`.
    pub trust_anchors: Vec<PathBuf>,
}

impl UserSettings {
    /// What a configuration file (one layer, not merged) says.
    pub fn of(config: &Config) -> UserSettings {
        UserSettings {
            pkcs11_module: config.pkcs11_module.clone(),
            portal_url: config.portal_url.clone(),
            support_contact: config.support_contact.clone(),
            trust_anchors: config.renewal.trust_anchors.clone(),
        }
    }

    /// Writes these settings into the configuration file at `path`, keeping
    /// everything else in it (other settings, `[[modules]]`, comments) as it is. An
    /// unset value removes its key. A file that does not parse is an error and is
    /// left alone; the new file is written whole (temporary file + rename).
    pub fn save(&self, path: &Path) -> Result<()> {
        let err = |reason: String| Error::Config {
            path: path.to_owned(),
            reason,
        };
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(err(e.to_string())),
        };
        // The file must be one we could read, before anything is changed in it.
        toml::from_str::<Config>(&text).map_err(|e| err(e.to_string()))?;
        let mut doc: toml_edit::DocumentMut = text.parse().map_err(|e| err(format!("{e}")))?;
        let path_str = |p: &Path| p.to_string_lossy().into_owned();
        set_or_remove(
            doc.as_table_mut(),
            "pkcs11_module",
            self.pkcs11_module.as_deref().map(path_str),
        );
        set_or_remove(doc.as_table_mut(), "portal_url", self.portal_url.clone());
        set_or_remove(
            doc.as_table_mut(),
            "support_contact",
            self.support_contact.clone(),
        );
        let anchors: toml_edit::Array = self.trust_anchors.iter().map(|p| path_str(p)).collect();
        match doc.get_mut("renewal").and_then(|r| r.as_table_like_mut()) {
            Some(renewal) if anchors.is_empty() => {
                renewal.remove("trust_anchors");
            }
            Some(renewal) => {
                renewal.insert("trust_anchors", toml_edit::value(anchors));
            }
            None if anchors.is_empty() => {}
            None => {
                let mut renewal = toml_edit::Table::new();
                renewal.insert("trust_anchors", toml_edit::value(anchors));
                doc.insert("renewal", toml_edit::Item::Table(renewal));
            }
        }
        let new = doc.to_string();
        // Never write what the next read would refuse.
        toml::from_str::<Config>(&new).map_err(|e| err(format!("internal: {e}")))?;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| err(e.to_string()))?;
        }
        let tmp = path.with_extension("toml.tmp");
        std::fs::write(&tmp, new).map_err(|e| err(e.to_string()))?;
        std::fs::rename(&tmp, path).map_err(|e| err(e.to_string()))
    }
}

/// Sets a top-level string key (rendered before the tables, so it stays top-level),
/// or removes it when `value` is `None`. The comment lines above a removed key are
/// kept: they move to the next key, else to the first table (when nothing else is left
/// in the file, they go with the key).
fn set_or_remove(table: &mut toml_edit::Table, key: &str, value: Option<String>) {
    let Some(v) = value else {
        let comment = table
            .key(key)
            .and_then(|k| k.leaf_decor().prefix())
            .and_then(|p| p.as_str())
            .filter(|p| p.contains('#'))
            .map(str::to_owned);
        let at = table.iter().position(|(k, _)| k == key);
        table.remove(key);
        if let (Some(comment), Some(at)) = (comment, at) {
            keep_comment(table, at, &comment);
        }
        return;
    };
    table.insert(key, toml_edit::value(v));
}

/// Puts `comment` before the key-value now at position `at` or after it, else before
/// the first table.
fn keep_comment(table: &mut toml_edit::Table, at: usize, comment: &str) {
    let prepend = |decor: &mut toml_edit::Decor| {
        let old = decor
            .prefix()
            .and_then(|p| p.as_str())
            .unwrap_or("")
            .to_owned();
        decor.set_prefix(format!("{comment}{old}"));
    };
    let next_value = table
        .iter()
        .enumerate()
        .find(|(i, (_, item))| *i >= at && item.is_value())
        .map(|(_, (k, _))| k.to_owned());
    if let Some(k) = next_value {
        if let Some(mut key) = table.key_mut(&k) {
            prepend(key.leaf_decor_mut());
            return;
        }
    }
    if let Some(t) = table.iter_mut().find_map(|(_, item)| item.as_table_mut()) {
        prepend(t.decor_mut());
    }
}

/// Records that `what` came from `path` (a later layer replaces an earlier one for a
/// single setting; lists keep every file).
fn out_sources_push(sources: &mut Vec<(String, PathBuf)>, what: &str, path: &Path) {
    let list = matches!(what, "modules" | "renewal.trust_anchors");
    if !list {
        sources.retain(|(w, _)| w != what);
    }
    sources.push((what.to_owned(), path.to_owned()));
}

/// Directories searched for the library names in [`VENDOR_MODULES`].
const LIB_DIRS: &[&str] = &[
    "/usr/lib",
    "/usr/lib64",
    "/usr/lib/x86_64-linux-gnu",
    "/usr/lib/aarch64-linux-gnu",
    "/usr/lib/loongarch64-linux-gnu",
    "/usr/lib/mips64el-linux-gnuabi64",
    "/usr/local/lib",
    "/usr/lib/pkcs11",
    "/usr/lib/x86_64-linux-gnu/pkcs11",
    "/usr/lib/aarch64-linux-gnu/pkcs11",
    "/usr/lib64/pkcs11",
    "/opt/homebrew/lib",
    "/usr/local/lib/softhsm",
    "/usr/lib/softhsm",
    "/usr/lib64/softhsm",
];

/// Best-effort table of UKey vendor PKCS#11 libraries, in discovery order: (vendor,
/// file names). File names are looked up in the usual library directories
/// (`LIB_DIRS`); absolute paths are used as they are. Real UKeys first, then OpenSC,
/// then SoftHSM2 (the test stand-in) last.
pub const VENDOR_MODULES: &[(&str, &[&str])] = &[
    (
        "Longmai mToken (龙脉)",
        &[
            "libgm3000_pkcs11.so",
            "libmtoken_gm3000_pkcs11.so",
            "/opt/LongmaiSoft/lib/libgm3000_pkcs11.so",
            "libk3gm_pkcs11.so",
        ],
    ),
    (
        "Feitian ePass (飞天诚信)",
        &[
            // Seen in OpenSC issues #2424 and #1670 (ePass2003 Linux driver).
            "libcastle.so.1.0.0",
            "libcastle_v2.so.1.0.0",
            "/usr/lib/ePass2003-Linux-x64/x86_64/redist/libcastle.so.1.0.0",
            "/usr/lib/ePass2003-Linux-x64/x86_64/redist/libcastle_v2.so.1.0.0",
            "libcastle.so",
            "libshuttle_p11v220.so",
            "libepsng_p11.so",
            "libes_3000gm.so",
            "/opt/ftsafe/lib/libcastle.so",
        ],
    ),
    (
        "Watchdata (握奇)",
        &[
            "libwdpkcs.so",
            "libWDPKCS.so",
            "/usr/lib/WatchData/ProxKey/lib/libwdpkcs_SignatureP11.so",
            "/opt/watchdata/lib/libwdpkcs.so",
        ],
    ),
    (
        "Haitai (海泰方圆)",
        &[
            "libhtpkcs11.so",
            "libhtp11.so",
            "/opt/haitai/lib/libhtpkcs11.so",
        ],
    ),
    (
        "Jit / GDCA / CFCA style drivers",
        &["libjitpkcs11.so", "libgdcapkcs11.so", "libcfcapkcs11.so"],
    ),
    (
        "SafeNet / Thales eToken",
        &["libeTPkcs11.so", "libIDPrimePKCS11.so"],
    ),
    ("YubiKey PIV", &["libykcs11.so"]),
    ("OpenSC", &["opensc-pkcs11.so", "onepin-opensc-pkcs11.so"]),
    ("SoftHSM2", &["libsofthsm2.so"]),
];

/// Best-effort table of UKey vendor SKF libraries (GM/T 0016), in discovery order after
/// the PKCS#11 ones: (vendor, file names), looked up as [`VENDOR_MODULES`]' are. None of
/// them has been tried on hardware here; the names come from public integrations.
pub const VENDOR_SKF_LIBRARIES: &[(&str, &[&str])] = &[
    (
        "Feitian ePass3000GM (飞天诚信) SKF",
        &[
            "libes_3000gm.so",
            "libes_3000gm.so.1.0.0",
            "/opt/ftsafe/lib/libes_3000gm.so",
        ],
    ),
    (
        "Longmai mToken GM3000 (龙脉) SKF",
        &[
            "libgm3000.1.0.so",
            "libgm3000.so",
            "/opt/LongmaiSoft/lib/libgm3000.1.0.so",
        ],
    ),
    (
        "Haitai (海泰方圆) SKF",
        &["libhtskf.so", "/opt/haitai/lib/libhtskf.so"],
    ),
    (
        "Watchdata (握奇) SKF",
        &["libwdskf.so", "/opt/watchdata/lib/libwdskf.so"],
    ),
];

/// A module found on disk by discovery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FoundModule {
    /// Vendor or user-given name.
    pub name: String,
    /// Path of the library.
    pub path: PathBuf,
    /// Its interface, when the configuration or the discovery table says; `None`: told
    /// by what the library exports.
    pub kind: Option<Interface>,
}

/// Every candidate path discovery tries, in order: the configuration's `[[modules]]`,
/// then [`VENDOR_MODULES`].
pub fn candidates(config: &Config) -> Vec<FoundModule> {
    let mut out: Vec<FoundModule> = config
        .modules
        .iter()
        .map(|m| FoundModule {
            name: m.name.clone(),
            path: m.path.clone(),
            kind: m.kind,
        })
        .collect();
    let tables = [
        (VENDOR_MODULES, Interface::Pkcs11),
        (VENDOR_SKF_LIBRARIES, Interface::Skf),
    ];
    for (table, kind) in tables {
        for (vendor, files) in table {
            for file in *files {
                let paths: Vec<PathBuf> = if file.starts_with('/') {
                    vec![PathBuf::from(file)]
                } else {
                    LIB_DIRS
                        .iter()
                        .map(|dir| Path::new(dir).join(file))
                        .collect()
                };
                out.extend(paths.into_iter().map(|path| FoundModule {
                    name: (*vendor).to_owned(),
                    path,
                    kind: Some(kind),
                }));
            }
        }
    }
    out
}

/// The interface the configuration gives the library at `path`, if any.
pub fn configured_kind(config: &Config, path: &Path) -> Option<Interface> {
    config
        .modules
        .iter()
        .find(|m| m.path == path)
        .and_then(|m| m.kind)
}

/// The candidates that exist on this machine, in discovery order.
pub fn discover_all(config: &Config) -> Vec<FoundModule> {
    let mut seen = Vec::<PathBuf>::new();
    candidates(config)
        .into_iter()
        .filter(|m| m.path.is_file())
        .filter(|m| {
            // /usr/lib/softhsm is often a symlink target of another entry: keep one.
            let canon = m.path.canonicalize().unwrap_or_else(|_| m.path.clone());
            if seen.contains(&canon) {
                false
            } else {
                seen.push(canon);
                true
            }
        })
        .collect()
}

/// Chooses the module path: `explicit` (CLI `--module` / `UKEY_PKCS11_MODULE`), else the
/// configuration's `pkcs11_module`, else discovery: the first module found that has a
/// token present, else the first found that loads, else the first found.
///
/// Preferring a module with a token matters on a machine with OpenSC (most Linux
/// desktops) or SoftHSM2 next to the vendor driver: the first one found may see no token
/// while the user's key is in another. Each candidate is loaded, asked for its tokens and
/// finalised again (a few ms each) before this returns, so the caller's own load is the
/// only one alive; a candidate that fails to load is skipped (debug log). A library some
/// other code of this process already initialised is only looked at, never finalised.
pub fn resolve_module_path(explicit: Option<&Path>, config: &Config) -> Result<PathBuf> {
    resolve_module(explicit, config).map(|m| m.path)
}

/// Like [`resolve_module_path`], with the library's interface as far as the
/// configuration or the discovery table says.
pub fn resolve_module(explicit: Option<&Path>, config: &Config) -> Result<FoundModule> {
    if let Some(p) = explicit.or(config.pkcs11_module.as_deref()) {
        return Ok(FoundModule {
            name: p.display().to_string(),
            path: p.to_owned(),
            kind: configured_kind(config, p),
        });
    }
    let found = discover_all(config);
    let Some(first) = found.first() else {
        return Err(Error::ModuleNotFound {
            path: None,
            searched: candidates(config).into_iter().map(|m| m.path).collect(),
        });
    };
    let mut first_loadable: Option<&FoundModule> = None;
    if found.len() > 1 {
        for m in &found {
            let probe = has_token(m);
            if probe.is_ok() && first_loadable.is_none() {
                first_loadable = Some(m);
            }
            match probe {
                Ok(true) => {
                    tracing::debug!(module = %m.path.display(), name = %m.name, "discovered module with a token");
                    return Ok(m.clone());
                }
                Ok(false) => {
                    tracing::debug!(module = %m.path.display(), name = %m.name, "discovered module has no token");
                }
                Err(e) => {
                    tracing::debug!(module = %m.path.display(), name = %m.name, "discovered module skipped: {e}");
                }
            }
        }
    }
    // The first that loads; if none does, the first, whose load error the caller shows.
    let chosen = first_loadable.unwrap_or(first);
    tracing::debug!(module = %chosen.path.display(), "no discovered module has a token; using the first that loads");
    Ok(chosen.clone())
}

/// Loads the module, looks for a token, and finalises it again (on drop) before returning.
fn has_token(m: &FoundModule) -> Result<bool> {
    let module = crate::module::Module::load_as(&m.path, m.kind)?;
    let present = !module.tokens()?.is_empty();
    drop(module);
    Ok(present)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_file_extends_discovery_and_rejects_typos() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        std::fs::write(
            &path,
            "[[modules]]\nname = \"测试厂商\"\npath = \"/opt/x/libx.so\"\n",
        )
        .unwrap();
        let config = Config::load(&path).unwrap();
        assert_eq!(config.modules[0].name, "测试厂商");
        assert_eq!(candidates(&config)[0].path, PathBuf::from("/opt/x/libx.so"));

        std::fs::write(&path, "pkcs11_modul = \"/x.so\"\n").unwrap();
        let err = Config::load(&path).unwrap_err();
        assert_eq!(err.code(), "config_invalid");

        // Missing file: empty configuration.
        let none = Config::load(&dir.path().join("absent.toml")).unwrap();
        assert_eq!(none, Config::default());
    }

    /// A CA's system-wide file under the user's: the user's settings win, lists add
    /// up, and each setting names the file it came from.
    #[test]
    fn the_users_file_is_read_over_the_system_file() {
        let dir = tempfile::tempdir().unwrap();
        let system = dir.path().join("system.toml");
        let user = dir.path().join("user.toml");
        std::fs::write(
            &system,
            "portal_url = \"https://portal.ca.example\"\npkcs11_module = \"/opt/ca/libca.so\"\n\
             [[modules]]\nname = \"CA key\"\npath = \"/opt/ca/libca.so\"\n\
             [renewal]\ntrust_anchors = [\"/etc/ukey/ca-root.pem\"]\nkey_id = \"sha1\"\n",
        )
        .unwrap();
        std::fs::write(
            &user,
            "pkcs11_module = \"/home/u/libmine.so\"\n\
             [[modules]]\nname = \"Mine\"\npath = \"/home/u/libmine.so\"\n\
             [renewal]\ntrust_anchors = [\"/home/u/extra.pem\"]\n",
        )
        .unwrap();
        let c = Config::layered(vec![
            (Config::load(&system).unwrap(), system.clone()),
            (Config::load(&user).unwrap(), user.clone()),
        ]);
        assert_eq!(c.portal_url.as_deref(), Some("https://portal.ca.example"));
        assert_eq!(c.pkcs11_module, Some(PathBuf::from("/home/u/libmine.so")));
        let names: Vec<&str> = c.modules.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(names, ["Mine", "CA key"]);
        assert_eq!(
            c.renewal.trust_anchors,
            [
                PathBuf::from("/etc/ukey/ca-root.pem"),
                PathBuf::from("/home/u/extra.pem")
            ]
        );
        assert_eq!(c.renewal.key_id.as_deref(), Some("sha1"));
        let from = |what: &str| -> Vec<&PathBuf> {
            c.sources
                .iter()
                .filter(|(w, _)| w == what)
                .map(|(_, p)| p)
                .collect()
        };
        assert_eq!(from("portal_url"), [&system]);
        assert_eq!(from("pkcs11_module"), [&user]);
        assert_eq!(from("renewal.trust_anchors"), [&system, &user]);
        assert_eq!(from("renewal.key_id"), [&system]);
    }

    #[test]
    fn saving_user_settings_keeps_the_rest_of_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub").join("config.toml");
        // A fresh account: the file and its directory are made.
        let first = UserSettings {
            portal_url: Some("https://portal.ca.example".into()),
            trust_anchors: vec!["/etc/ukey/root.pem".into()],
            ..UserSettings::default()
        };
        first.save(&path).unwrap();
        assert_eq!(UserSettings::of(&Config::load(&path).unwrap()), first);

        // A file the user wrote: comments, [[modules]] and renewal.key_id survive.
        std::fs::write(
            &path,
            "# my UKey settings\nportal_url = \"https://old.example\"\n\n[[modules]]\nname = \"Mine\"\npath = \"/opt/mine.so\"\n\n[renewal]\nkey_id = \"sha1\"  # keep ids short\n",
        )
        .unwrap();
        let second = UserSettings {
            pkcs11_module: Some("/opt/vendor/libp11.so".into()),
            portal_url: None,
            support_contact: Some("400-800-1234".into()),
            trust_anchors: vec!["/etc/ukey/a.pem".into(), "/home/u/b.pem".into()],
        };
        second.save(&path).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains("# my UKey settings"), "{text}");
        assert!(text.contains("# keep ids short"), "{text}");
        assert!(!text.contains("old.example"), "{text}");
        let cfg = Config::load(&path).unwrap();
        assert_eq!(UserSettings::of(&cfg), second);
        assert_eq!(cfg.modules.len(), 1);
        assert_eq!(cfg.renewal.key_id.as_deref(), Some("sha1"));

        // A damaged file is an error and stays as it was.
        std::fs::write(&path, "portal_url = [unclosed").unwrap();
        assert!(matches!(first.save(&path), Err(Error::Config { .. })));
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "portal_url = [unclosed"
        );
    }

    #[test]
    fn explicit_path_wins_over_configuration() {
        let config = Config {
            pkcs11_module: Some(PathBuf::from("/from/config.so")),
            modules: vec![],
            ..Config::default()
        };
        assert_eq!(
            resolve_module_path(Some(Path::new("/explicit.so")), &config).unwrap(),
            PathBuf::from("/explicit.so")
        );
        assert_eq!(
            resolve_module_path(None, &config).unwrap(),
            PathBuf::from("/from/config.so")
        );
    }
}
