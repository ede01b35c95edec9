//! The portal's HSM (issue 16, secrets at rest), over PKCS#11 (`cryptoki`). The only code
//! of the portal that touches PKCS#11: the product client's own PKCS#11 code is
//! `ukey-token`'s, and the two never share a module, a session or a key (the portal is
//! the CA side; the client's tokens are the holders' keys).
//!
//! Two jobs:
//! - **The escrow's key-encryption key (KEK).** An AES-256 secret key on one token
//!   (`--hsm-token`), made once by `ukey-portal hsm init` ([`Hsm::init_kek`]): token
//!   object, private, sensitive, never extractable, encrypt/decrypt only, labelled
//!   `ukey-portal-kek` with a random CKA_ID. Every escrowed private key is encrypted by
//!   the HSM under it (CKM_AES_GCM, a fresh 12-byte IV, the certificate's serial in the
//!   additional data) before it reaches the database, and decrypted by the HSM when the
//!   portal seals it into a holder's envelope. What the database holds is a
//!   [sealed blob](seal_escrow): `UKEK1`, the mechanism, the KEK's label and CKA_ID, the
//!   IV, the ciphertext and tag. A portal started with a KEK that the token does not hold
//!   refuses to start ([`Hsm::kek`]); a blob sealed under a KEK the portal cannot reach,
//!   or read by a portal without an HSM, is a clear error ([`open_escrow`]).
//! - **The CA key** (`--ca-key 'pkcs11:token=…;object=…'`, [`Hsm::ca_key`]): an RSA
//!   (2048 bits or more) or EC P-256 private key on a token signs certificates, CRLs and
//!   the CMP protection certificate through [`HsmKey`], rcgen's [`rcgen::SigningKey`].
//!   SM2 keys are refused: SoftHSM2 has no SM2, and HSM vendors' SM2 mechanisms are
//!   vendor-defined numbers the portal does not map.
//!
//! The PIN is a [`SecretString`] from the PIN file or `UKEY_PORTAL_HSM_PIN` to `C_Login`,
//! once per token: never on the command line, never logged, never retried.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use der::Encode as _;
use secrecy::SecretString;
use zeroize::Zeroizing;

/// The KEK's label unless `--hsm-kek-label` says otherwise.
pub const DEFAULT_KEK_LABEL: &str = "ukey-portal-kek";
/// The environment variable holding the HSM PIN (when no `--hsm-pin-file` is given).
pub const PIN_ENV: &str = "UKEY_PORTAL_HSM_PIN";
/// The first bytes of a sealed escrow blob (format version 1). A PKCS#8 key in clear,
/// as portals without an HSM store it, starts with a DER SEQUENCE (0x30) instead.
pub const SEALED_MAGIC: &[u8] = b"UKEK1";
/// Mechanism byte of a sealed blob: CKM_AES_GCM, 12-byte IV, 128-bit tag.
const MECH_AES_GCM: u8 = 1;
const IV_LEN: usize = 12;
const TAG_LEN: usize = 16;
/// DER of the P-256 and SM2 curve OIDs (CKA_EC_PARAMS).
const P256_PARAMS: &[u8] = &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
const SM2_PARAMS: &[u8] = &[0x06, 0x08, 0x2a, 0x81, 0x1c, 0xcf, 0x55, 0x01, 0x82, 0x2d];
/// Why an SM2 CA key in the HSM is refused.
pub const SM2_REFUSAL: &str = "SM2 CA 私钥不能放在 HSM 中：SoftHSM2 没有 SM2，各厂商的 SM2 机制编号互不相同，门户未对接 / an SM2 CA key cannot be in the HSM: SoftHSM2 has no SM2 and vendors' SM2 mechanisms are vendor-defined numbers the portal does not map; keep an SM2 CA's key in the data directory (--ca-alg sm2, or an OpenSSL-made SM2 --ca-key FILE) or use an RSA-2048 or P-256 key in the HSM";

/// What went wrong with the HSM. Every message is in Simplified Chinese and English, and
/// none holds the PIN.
#[derive(Debug, thiserror::Error)]
pub enum HsmError {
    /// `--hsm-module` without a PIN.
    #[error(
        "未提供 HSM 的 PIN：请用 --hsm-pin-file 指定 PIN 文件（权限 0600），或设置环境变量 {PIN_ENV}；PIN 不能写在命令行上 / \
         no HSM PIN: name a file holding it with --hsm-pin-file (mode 0600) or set {PIN_ENV}; a PIN is never taken on the command line"
    )]
    NoPin,
    /// The PIN file cannot be read, is empty, or others can read it.
    #[error("HSM PIN 文件 {path} 不可用 / the HSM PIN file {path} cannot be used: {detail}")]
    PinFile {
        /// The file.
        path: PathBuf,
        /// Why.
        detail: String,
    },
    /// The PKCS#11 module does not load or initialise.
    #[error(
        "无法加载 HSM 的 PKCS#11 模块 {module} / cannot load the HSM's PKCS#11 module {module}: {detail}"
    )]
    Module {
        /// Its path.
        module: PathBuf,
        /// What the loader or C_Initialize said.
        detail: String,
    },
    /// No token of that label.
    #[error(
        "HSM 中没有标签为「{token}」的令牌，门户拒绝启动 / the HSM has no token labelled {token:?}, so the portal does not start (tokens present: {present})"
    )]
    TokenNotFound {
        /// The label asked for.
        token: String,
        /// The labels present.
        present: String,
    },
    /// C_Login refused the PIN.
    #[error(
        "HSM 令牌「{token}」拒绝了 PIN（PIN 不正确；未重试，门户拒绝启动）/ HSM token {token:?} refused the PIN (incorrect; not retried), so the portal does not start"
    )]
    PinIncorrect {
        /// The token.
        token: String,
    },
    /// The user PIN is locked.
    #[error(
        "HSM 令牌「{token}」的 PIN 已锁定，须由 HSM 安全管理员解锁 / the PIN of HSM token {token:?} is locked: the HSM's security officer must unlock it"
    )]
    PinLocked {
        /// The token.
        token: String,
    },
    /// The token holds no KEK of that label.
    #[error(
        "HSM 令牌「{token}」中没有密钥加密密钥「{label}」，门户拒绝启动；请先执行一次 `ukey-portal hsm init`（相同的 --hsm-module、--hsm-token 与 PIN）/ \
         HSM token {token:?} holds no key-encryption key labelled {label:?}, so the portal does not start: make it once with `ukey-portal hsm init` (same --hsm-module, --hsm-token and PIN)"
    )]
    KekMissing {
        /// The token.
        token: String,
        /// The label.
        label: String,
    },
    /// Several secret keys share the KEK's label.
    #[error(
        "HSM 令牌「{token}」中有 {count} 个标签为「{label}」的密钥，无法确定密钥加密密钥 / HSM token {token:?} holds {count} keys labelled {label:?}: the key-encryption key is ambiguous"
    )]
    KekAmbiguous {
        /// The token.
        token: String,
        /// The label.
        label: String,
        /// How many.
        count: usize,
    },
    /// A sealed escrow blob read by a portal without an HSM.
    #[error(
        "证书 {serial} 的托管私钥已由 HSM 密钥加密密钥「{label}」（id {id}）加密，但本门户未配置 HSM / \
         the escrowed key of certificate {serial} is sealed under the HSM key-encryption key {label:?} (id {id}), and this portal runs without an HSM: \
         start it with --hsm-module, --hsm-token and the PIN (--hsm-pin-file or {PIN_ENV})"
    )]
    SealedWithoutHsm {
        /// The certificate.
        serial: String,
        /// The KEK's label, from the blob.
        label: String,
        /// The KEK's CKA_ID (hex), from the blob.
        id: String,
    },
    /// A sealed escrow blob whose KEK the configured token does not hold.
    #[error(
        "证书 {serial} 的托管私钥由密钥加密密钥「{label}」（id {id}）加密，HSM 令牌「{token}」中没有该密钥 / \
         the escrowed key of certificate {serial} is sealed under the key-encryption key {label:?} (id {id}), which HSM token {token:?} does not hold \
         (its key-encryption key is {have_label:?}, id {have_id}): start the portal with the HSM token that holds it",
        serial = .0.serial, label = .0.label, id = .0.id, token = .0.token,
        have_label = .0.have_label, have_id = .0.have_id
    )]
    KekUnreachable(Box<Unreachable>),
    /// A sealed blob that does not parse or whose tag does not verify.
    #[error(
        "证书 {serial} 的托管私钥记录无法解密（已被改动，或属于另一张证书）/ the escrowed key record of certificate {serial} does not open (altered, or another certificate's): {detail}"
    )]
    SealedCorrupt {
        /// The certificate.
        serial: String,
        /// Why.
        detail: String,
    },
    /// The data directory's CA key is in the HSM, and no HSM is configured.
    #[error(
        "CA 私钥在 HSM 中（{uri}），但未配置 HSM / the CA key is in the HSM ({uri}): give --hsm-module and the PIN (--hsm-pin-file or {PIN_ENV})"
    )]
    CaKeyNeedsHsm {
        /// The key's URI.
        uri: String,
    },
    /// A PKCS#11 URI the portal does not take.
    #[error("PKCS#11 URI {uri:?} 无效 / PKCS#11 URI {uri:?} is not usable: {detail}")]
    BadUri {
        /// The URI.
        uri: String,
        /// Why.
        detail: String,
    },
    /// No private key matches the URI.
    #[error("HSM 中找不到 CA 私钥 / no private key in the HSM matches {uri}: {detail}")]
    KeyNotFound {
        /// The URI.
        uri: String,
        /// What is there instead.
        detail: String,
    },
    /// The key is of a kind the portal does not sign with.
    #[error("HSM 中的 CA 私钥 {uri} 不受支持 / the CA key {uri} is not supported: {detail}")]
    KeyUnsupported {
        /// The URI.
        uri: String,
        /// Why.
        detail: String,
    },
    /// Any other PKCS#11 failure.
    #[error("HSM 操作失败 / HSM operation failed ({what}): {detail}")]
    Pkcs11 {
        /// What the portal was doing.
        what: String,
        /// The function and CKR_ value.
        detail: String,
    },
}

/// What [`HsmError::KekUnreachable`] says.
#[derive(Debug)]
pub struct Unreachable {
    /// The certificate.
    pub serial: String,
    /// The KEK's label, from the blob.
    pub label: String,
    /// The KEK's CKA_ID (hex), from the blob.
    pub id: String,
    /// The configured token.
    pub token: String,
    /// The configured KEK's label.
    pub have_label: String,
    /// The configured KEK's CKA_ID (hex).
    pub have_id: String,
}

fn describe(e: &CkError) -> String {
    match e {
        CkError::Pkcs11(rv, f) => format!("C_{f:?}: CKR {rv:?}"),
        other => other.to_string(),
    }
}

fn p11(what: impl Into<String>) -> impl FnOnce(CkError) -> HsmError {
    let what = what.into();
    move |e| HsmError::Pkcs11 {
        what,
        detail: describe(&e),
    }
}

/// Reads the HSM PIN: from `pin_file` (its first line; the file must be its owner's
/// alone), else from [`PIN_ENV`].
pub fn read_pin(pin_file: Option<&Path>) -> Result<SecretString, HsmError> {
    let Some(path) = pin_file else {
        return match std::env::var(PIN_ENV) {
            Ok(v) if !v.is_empty() => Ok(SecretString::from(v)),
            _ => Err(HsmError::NoPin),
        };
    };
    let refuse = |detail: String| HsmError::PinFile {
        path: path.to_owned(),
        detail,
    };
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(path)
            .map_err(|e| refuse(e.to_string()))?
            .permissions()
            .mode();
        if mode & 0o077 != 0 {
            return Err(refuse(format!(
                "其他用户可读取（{:o}）/ other users can read it ({:o}): chmod 600 {}",
                mode & 0o777,
                mode & 0o777,
                path.display()
            )));
        }
    }
    let text = Zeroizing::new(std::fs::read_to_string(path).map_err(|e| refuse(e.to_string()))?);
    let pin = text.lines().next().unwrap_or("").trim_end_matches('\r');
    if pin.is_empty() {
        return Err(refuse("文件为空 / the file is empty".into()));
    }
    Ok(SecretString::from(pin))
}

/// How the portal reaches its HSM (`--hsm-module`, `--hsm-token`, `--hsm-kek-label`,
/// the PIN).
#[derive(Clone)]
pub struct HsmSettings {
    /// The PKCS#11 module.
    pub module: PathBuf,
    /// The token holding the escrow's KEK; `None`: the escrow is not sealed (the HSM
    /// then only holds the CA key).
    pub token: Option<String>,
    /// The KEK's label.
    pub kek_label: String,
    /// The user PIN.
    pub pin: SecretString,
}

impl std::fmt::Debug for HsmSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HsmSettings")
            .field("module", &self.module)
            .field("token", &self.token)
            .field("kek_label", &self.kek_label)
            .finish_non_exhaustive()
    }
}

/// One token, logged in, with the session all the portal's calls on it share.
struct Token {
    label: String,
    slot: Slot,
    session: Mutex<Session>,
}

impl Token {
    fn session(&self) -> std::sync::MutexGuard<'_, Session> {
        self.session.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A loaded PKCS#11 module and the tokens the portal logged in to.
pub struct Hsm {
    ctx: Pkcs11,
    module: PathBuf,
    pin: SecretString,
    tokens: Mutex<Vec<Arc<Token>>>,
}

impl std::fmt::Debug for Hsm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hsm")
            .field("module", &self.module)
            .finish_non_exhaustive()
    }
}

impl Hsm {
    /// Loads and initialises `module`; tokens are logged in to when first used.
    pub fn open(module: &Path, pin: SecretString) -> Result<Arc<Hsm>, HsmError> {
        let failed = |detail: String| HsmError::Module {
            module: module.to_owned(),
            detail,
        };
        let ctx = Pkcs11::new(module).map_err(|e| failed(describe(&e)))?;
        match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
            Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
            Err(e) => return Err(failed(describe(&e))),
        }
        Ok(Arc::new(Hsm {
            ctx,
            module: module.to_owned(),
            pin,
            tokens: Mutex::new(Vec::new()),
        }))
    }

    /// The token labelled `label`, logged in (once: a wrong PIN is never retried).
    fn token(&self, label: &str) -> Result<Arc<Token>, HsmError> {
        let mut tokens = self.tokens.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(t) = tokens.iter().find(|t| t.label == label) {
            return Ok(t.clone());
        }
        let slots = self
            .ctx
            .get_slots_with_initialized_token()
            .map_err(p11("listing the HSM's tokens"))?;
        let mut present = Vec::new();
        let mut found = None;
        for slot in slots {
            let Ok(info) = self.ctx.get_token_info(slot) else {
                continue;
            };
            let l = info.label().trim_end_matches([' ', '\0']).to_owned();
            if l == label && found.is_none() {
                found = Some(slot);
            }
            present.push(format!("{l:?}"));
        }
        let Some(slot) = found else {
            return Err(HsmError::TokenNotFound {
                token: label.to_owned(),
                present: if present.is_empty() {
                    "none".into()
                } else {
                    present.join(", ")
                },
            });
        };
        let session = self
            .ctx
            .open_rw_session(slot)
            .map_err(p11(format!("opening a session on token {label:?}")))?;
        match session.login(UserType::User, Some(&self.pin)) {
            Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => {}
            Err(CkError::Pkcs11(RvError::PinIncorrect | RvError::PinLenRange, _)) => {
                return Err(HsmError::PinIncorrect {
                    token: label.to_owned(),
                });
            }
            Err(CkError::Pkcs11(RvError::PinLocked, _)) => {
                return Err(HsmError::PinLocked {
                    token: label.to_owned(),
                });
            }
            Err(e) => return Err(p11(format!("logging in to token {label:?}"))(e)),
        }
        let token = Arc::new(Token {
            label: label.to_owned(),
            slot,
            session: Mutex::new(session),
        });
        tokens.push(token.clone());
        Ok(token)
    }

    /// The KEK labelled `label` on token `token`: it must be there (the portal refuses
    /// to start without it; [`Hsm::init_kek`] makes it).
    pub fn kek(&self, token: &str, label: &str) -> Result<Kek, HsmError> {
        let t = self.token(token)?;
        let found = {
            let s = t.session();
            let handles = s
                .find_objects(&[
                    Attribute::Class(ObjectClass::SECRET_KEY),
                    Attribute::Label(label.as_bytes().to_vec()),
                ])
                .map_err(p11("looking for the key-encryption key"))?;
            match handles.as_slice() {
                [] => None,
                [h] => Some((*h, object_id(&s, *h)?)),
                more => {
                    return Err(HsmError::KekAmbiguous {
                        token: token.to_owned(),
                        label: label.to_owned(),
                        count: more.len(),
                    });
                }
            }
        };
        let Some((handle, id)) = found else {
            return Err(HsmError::KekMissing {
                token: token.to_owned(),
                label: label.to_owned(),
            });
        };
        Ok(Kek {
            token: t,
            label: label.to_owned(),
            id,
            handle,
        })
    }

    /// Makes the KEK on `token` unless it is there: AES-256 (CKM_AES_KEY_GEN), a token
    /// object, private, sensitive, never extractable, that only encrypts and decrypts,
    /// with a random 16-byte CKA_ID. Returns it and whether it was made now.
    pub fn init_kek(&self, token: &str, label: &str) -> Result<(Kek, bool), HsmError> {
        match self.kek(token, label) {
            Ok(k) => return Ok((k, false)),
            Err(HsmError::KekMissing { .. }) => {}
            Err(e) => return Err(e),
        }
        let t = self.token(token)?;
        let id = crate::crypto::random_bytes(16).map_err(|_| HsmError::Pkcs11 {
            what: "making the key-encryption key's id".into(),
            detail: "random number generator failure".into(),
        })?;
        let handle = t
            .session()
            .generate_key(
                &Mechanism::AesKeyGen,
                &[
                    Attribute::Class(ObjectClass::SECRET_KEY),
                    Attribute::KeyType(KeyType::AES),
                    Attribute::ValueLen(32.into()),
                    Attribute::Token(true),
                    Attribute::Private(true),
                    Attribute::Sensitive(true),
                    Attribute::Extractable(false),
                    Attribute::Encrypt(true),
                    Attribute::Decrypt(true),
                    Attribute::Wrap(false),
                    Attribute::Unwrap(false),
                    Attribute::Sign(false),
                    Attribute::Derive(false),
                    Attribute::Label(label.as_bytes().to_vec()),
                    Attribute::Id(id.clone()),
                ],
            )
            .map_err(p11("making the key-encryption key (CKM_AES_KEY_GEN)"))?;
        Ok((
            Kek {
                token: t,
                label: label.to_owned(),
                id,
                handle,
            },
            true,
        ))
    }

    /// The CA's private key that `uri` names, with its public key: RSA (2048 bits or
    /// more) or EC P-256; SM2 and other curves are refused.
    pub fn ca_key(&self, uri: &Pkcs11Uri) -> Result<HsmKey, HsmError> {
        let t = self.token(&uri.token)?;
        let not_found = |detail: String| HsmError::KeyNotFound {
            uri: uri.raw.clone(),
            detail,
        };
        let unsupported = |detail: String| HsmError::KeyUnsupported {
            uri: uri.raw.clone(),
            detail,
        };
        let s = t.session();
        let mut template = vec![Attribute::Class(ObjectClass::PRIVATE_KEY)];
        if let Some(o) = &uri.object {
            template.push(Attribute::Label(o.as_bytes().to_vec()));
        }
        if let Some(id) = &uri.id {
            template.push(Attribute::Id(id.clone()));
        }
        let handles = s
            .find_objects(&template)
            .map_err(p11("looking for the CA key"))?;
        let handle = match handles.as_slice() {
            [h] => *h,
            [] => {
                let all = s
                    .find_objects(&[Attribute::Class(ObjectClass::PRIVATE_KEY)])
                    .map_err(p11("listing private keys"))?;
                let mut labels = Vec::new();
                for h in all {
                    labels.push(format!("{:?}", object_label(&s, h)?));
                }
                return Err(not_found(format!(
                    "令牌「{}」中的私钥 / private keys on token {:?}: {}",
                    uri.token,
                    uri.token,
                    if labels.is_empty() {
                        "none".into()
                    } else {
                        labels.join(", ")
                    }
                )));
            }
            more => {
                return Err(not_found(format!(
                    "{} 个私钥匹配，请在 URI 中加上 id= / {} private keys match: add id= to the URI",
                    more.len(),
                    more.len()
                )));
            }
        };
        let attrs = s
            .get_attributes(
                handle,
                &[
                    AttributeType::KeyType,
                    AttributeType::Id,
                    AttributeType::Sign,
                    AttributeType::Sensitive,
                    AttributeType::Extractable,
                    AttributeType::Modulus,
                    AttributeType::PublicExponent,
                    AttributeType::EcParams,
                ],
            )
            .map_err(p11("reading the CA key's attributes"))?;
        let mut key_type = None;
        let (mut id, mut modulus, mut exponent, mut params) = (Vec::new(), None, None, None);
        let (mut sign, mut sensitive, mut extractable) = (true, true, false);
        for a in attrs {
            match a {
                Attribute::KeyType(k) => key_type = Some(k),
                Attribute::Id(v) => id = v,
                Attribute::Sign(v) => sign = v,
                Attribute::Sensitive(v) => sensitive = v,
                Attribute::Extractable(v) => extractable = v,
                Attribute::Modulus(v) => modulus = Some(v),
                Attribute::PublicExponent(v) => exponent = Some(v),
                Attribute::EcParams(v) => params = Some(v),
                _ => {}
            }
        }
        if !sign {
            return Err(unsupported(
                "它不能签名（CKA_SIGN 为 false）/ it may not sign (CKA_SIGN false)".into(),
            ));
        }
        if !sensitive || extractable {
            tracing::warn!(
                uri = %uri.raw,
                "the CA key in the HSM is extractable or not sensitive: it can leave the HSM"
            );
        }
        // The public half, for what the private key does not show.
        let public = |attr: AttributeType| -> Result<Option<Vec<u8>>, HsmError> {
            let mut tpl = vec![Attribute::Class(ObjectClass::PUBLIC_KEY)];
            if !id.is_empty() {
                tpl.push(Attribute::Id(id.clone()));
            } else if let Some(o) = &uri.object {
                tpl.push(Attribute::Label(o.as_bytes().to_vec()));
            }
            let hs = s
                .find_objects(&tpl)
                .map_err(p11("looking for the CA key's public key"))?;
            let [h] = hs.as_slice() else {
                return Ok(None);
            };
            let got = s
                .get_attributes(*h, &[attr])
                .map_err(p11("reading the CA key's public key"))?;
            Ok(got.into_iter().find_map(|a| match a {
                Attribute::Modulus(v) | Attribute::PublicExponent(v) | Attribute::EcPoint(v) => {
                    Some(v)
                }
                Attribute::EcParams(v) => Some(v),
                _ => None,
            }))
        };
        let (kind, public_der) = match key_type {
            Some(KeyType::RSA) => {
                let n = match modulus {
                    Some(n) => n,
                    None => public(AttributeType::Modulus)?
                        .ok_or_else(|| unsupported("no RSA modulus readable".into()))?,
                };
                let e = match exponent {
                    Some(e) => e,
                    None => public(AttributeType::PublicExponent)?
                        .ok_or_else(|| unsupported("no RSA public exponent readable".into()))?,
                };
                let bits = n.iter().skip_while(|b| **b == 0).count() * 8;
                if bits < 2048 {
                    return Err(unsupported(format!(
                        "RSA-{bits}：CA 密钥至少 2048 位 / RSA-{bits}: a CA key needs 2048 bits or more"
                    )));
                }
                (KeyKind::Rsa, rsa_public_key_der(&n, &e)?)
            }
            Some(KeyType::EC) => {
                let params = match params {
                    Some(p) => p,
                    None => public(AttributeType::EcParams)?
                        .ok_or_else(|| unsupported("no EC parameters readable".into()))?,
                };
                if params == SM2_PARAMS {
                    return Err(unsupported(SM2_REFUSAL.into()));
                }
                if params != P256_PARAMS {
                    return Err(unsupported(format!(
                        "EC 曲线不是 P-256 / the EC curve is not P-256 (CKA_EC_PARAMS {})",
                        hex::encode(&params)
                    )));
                }
                let point = public(AttributeType::EcPoint)?.ok_or_else(|| {
                    not_found(
                        "没有对应的公钥对象（同一 CKA_ID），读不到 EC 公钥点 / no public key object with its CKA_ID: the EC point cannot be read"
                            .into(),
                    )
                })?;
                (
                    KeyKind::EcP256,
                    ec_point(&point)
                        .ok_or_else(|| unsupported("CKA_EC_POINT is not a P-256 point".into()))?,
                )
            }
            Some(other) if *other >= 0x8000_0000 => {
                return Err(unsupported(format!(
                    "厂商自定义的密钥类型 0x{:x}（国密 SM2？）/ a vendor-defined key type 0x{:x} (an SM2 key?): {SM2_REFUSAL}",
                    *other, *other
                )));
            }
            other => {
                return Err(unsupported(format!(
                    "密钥类型 / key type {other:?}: RSA or EC P-256 only"
                )));
            }
        };
        // Asked for this one mechanism: cryptoki logs every vendor mechanism of a whole
        // list it does not know.
        let ecdsa_sha256 = kind == KeyKind::EcP256
            && self
                .ctx
                .get_mechanism_info(t.slot, MechanismType::ECDSA_SHA256)
                .is_ok();
        drop(s);
        Ok(HsmKey {
            token: t.clone(),
            handle,
            uri: uri.raw.clone(),
            kind,
            public: public_der,
            ecdsa_sha256,
        })
    }
}

fn object_id(s: &Session, h: ObjectHandle) -> Result<Vec<u8>, HsmError> {
    let attrs = s
        .get_attributes(h, &[AttributeType::Id])
        .map_err(p11("reading an object's CKA_ID"))?;
    Ok(attrs
        .into_iter()
        .find_map(|a| match a {
            Attribute::Id(v) => Some(v),
            _ => None,
        })
        .unwrap_or_default())
}

fn object_label(s: &Session, h: ObjectHandle) -> Result<String, HsmError> {
    let attrs = s
        .get_attributes(h, &[AttributeType::Label])
        .map_err(p11("reading an object's label"))?;
    Ok(attrs
        .into_iter()
        .find_map(|a| match a {
            Attribute::Label(v) => Some(String::from_utf8_lossy(&v).into_owned()),
            _ => None,
        })
        .unwrap_or_default())
}

/// The uncompressed P-256 point of a CKA_EC_POINT: bare, or wrapped in a DER OCTET
/// STRING (as SoftHSM2 and the standard give it).
fn ec_point(v: &[u8]) -> Option<Vec<u8>> {
    use der::Decode as _;
    let point = match der::asn1::OctetString::from_der(v) {
        Ok(os) => os.as_bytes().to_vec(),
        Err(_) => v.to_vec(),
    };
    (point.len() == 65 && point[0] == 0x04).then_some(point)
}

/// RFC 8017's RSAPublicKey.
#[derive(der::Sequence)]
struct RsaPublicKey<'a> {
    modulus: der::asn1::UintRef<'a>,
    public_exponent: der::asn1::UintRef<'a>,
}

/// RFC 3279's Ecdsa-Sig-Value.
#[derive(der::Sequence)]
struct EcdsaSigValue<'a> {
    r: der::asn1::UintRef<'a>,
    s: der::asn1::UintRef<'a>,
}

fn der_failed(what: &str) -> impl FnOnce(der::Error) -> HsmError + '_ {
    move |e| HsmError::Pkcs11 {
        what: what.to_owned(),
        detail: e.to_string(),
    }
}

fn rsa_public_key_der(n: &[u8], e: &[u8]) -> Result<Vec<u8>, HsmError> {
    RsaPublicKey {
        modulus: der::asn1::UintRef::new(n).map_err(der_failed("RSA modulus"))?,
        public_exponent: der::asn1::UintRef::new(e).map_err(der_failed("RSA exponent"))?,
    }
    .to_der()
    .map_err(der_failed("RSA public key"))
}

/// A raw `r ‖ s` (CKM_ECDSA's answer) as DER.
fn ecdsa_der(rs: &[u8]) -> Result<Vec<u8>, HsmError> {
    if rs.len() != 64 {
        return Err(HsmError::Pkcs11 {
            what: "ECDSA signature".into(),
            detail: format!("{} bytes where a P-256 r ‖ s has 64", rs.len()),
        });
    }
    let (r, s) = rs.split_at(32);
    EcdsaSigValue {
        r: der::asn1::UintRef::new(r).map_err(der_failed("ECDSA r"))?,
        s: der::asn1::UintRef::new(s).map_err(der_failed("ECDSA s"))?,
    }
    .to_der()
    .map_err(der_failed("ECDSA signature"))
}

/// The escrow's key-encryption key: an AES-256 key on a token that never leaves it.
pub struct Kek {
    token: Arc<Token>,
    label: String,
    id: Vec<u8>,
    handle: ObjectHandle,
}

impl std::fmt::Debug for Kek {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kek")
            .field("token", &self.token.label)
            .field("label", &self.label)
            .field("id", &hex::encode(&self.id))
            .finish_non_exhaustive()
    }
}

impl Kek {
    /// The label of the token holding it.
    pub fn token_label(&self) -> &str {
        &self.token.label
    }
    /// Its CKA_LABEL.
    pub fn label(&self) -> &str {
        &self.label
    }
    /// Its CKA_ID, hex.
    pub fn id_hex(&self) -> String {
        hex::encode(&self.id)
    }

    /// Encrypts `plaintext` in the HSM (CKM_AES_GCM, a fresh random 12-byte IV) into a
    /// sealed blob bound to the certificate `serial_hex`.
    pub fn seal(&self, serial_hex: &str, plaintext: &[u8]) -> Result<Vec<u8>, HsmError> {
        let mut iv = crate::crypto::random_bytes(IV_LEN).map_err(|_| HsmError::Pkcs11 {
            what: "sealing an escrowed key".into(),
            detail: "random number generator failure".into(),
        })?;
        let header = header(&self.label, &self.id, &iv)?;
        let aad = aad(&header, serial_hex);
        let params = GcmParams::new(&mut iv, &aad, 128.into()).map_err(p11("GCM parameters"))?;
        let sealed = self
            .token
            .session()
            .encrypt(&Mechanism::AesGcm(params), self.handle, plaintext)
            .map_err(p11(format!(
                "sealing the escrowed key of certificate {serial_hex} (CKM_AES_GCM)"
            )))?;
        let mut out = header;
        out.extend_from_slice(&sealed);
        Ok(out)
    }

    /// Whether `blob` (stored for `serial_hex`) is sealed under this very key.
    pub fn sealed_here(&self, serial_hex: &str, blob: &[u8]) -> bool {
        is_sealed(blob) && Sealed::parse(serial_hex, blob).is_ok_and(|s| s.id == self.id.as_slice())
    }

    /// Decrypts a blob [`Kek::seal`] made for `serial_hex`, under this KEK or another
    /// one on the same token (found by its CKA_ID: a KEK made after a rotation).
    pub fn open(&self, serial_hex: &str, blob: &[u8]) -> Result<Zeroizing<Vec<u8>>, HsmError> {
        let parsed = Sealed::parse(serial_hex, blob)?;
        let s = self.token.session();
        let handle = if parsed.id == self.id.as_slice() {
            self.handle
        } else {
            let found = if parsed.id.is_empty() {
                Vec::new()
            } else {
                s.find_objects(&[
                    Attribute::Class(ObjectClass::SECRET_KEY),
                    Attribute::Id(parsed.id.to_vec()),
                ])
                .map_err(p11("looking for the key-encryption key"))?
            };
            match found.as_slice() {
                [h] => *h,
                _ => {
                    return Err(HsmError::KekUnreachable(Box::new(Unreachable {
                        serial: serial_hex.to_owned(),
                        label: parsed.label,
                        id: hex::encode(parsed.id),
                        token: self.token.label.clone(),
                        have_label: self.label.clone(),
                        have_id: self.id_hex(),
                    })));
                }
            }
        };
        let aad = aad(parsed.header, serial_hex);
        let mut iv = parsed.iv.to_vec();
        let params = GcmParams::new(&mut iv, &aad, 128.into()).map_err(p11("GCM parameters"))?;
        s.decrypt(&Mechanism::AesGcm(params), handle, parsed.ciphertext)
            .map(Zeroizing::new)
            .map_err(|e| HsmError::SealedCorrupt {
                serial: serial_hex.to_owned(),
                detail: describe(&e),
            })
    }
}

/// The header of a sealed blob: magic, mechanism, KEK label and CKA_ID, IV.
fn header(label: &str, id: &[u8], iv: &[u8]) -> Result<Vec<u8>, HsmError> {
    let (Ok(label_len), Ok(id_len)) = (u8::try_from(label.len()), u8::try_from(id.len())) else {
        return Err(HsmError::Pkcs11 {
            what: "sealing an escrowed key".into(),
            detail: "the key-encryption key's label or CKA_ID is longer than 255 bytes".into(),
        });
    };
    let mut h = Vec::with_capacity(8 + label.len() + id.len() + iv.len());
    h.extend_from_slice(SEALED_MAGIC);
    h.push(MECH_AES_GCM);
    h.push(label_len);
    h.extend_from_slice(label.as_bytes());
    h.push(id_len);
    h.extend_from_slice(id);
    h.extend_from_slice(iv);
    Ok(h)
}

/// GCM's additional data: the header, then the certificate's serial, so that a blob
/// moved to another certificate's row does not open.
fn aad(header: &[u8], serial_hex: &str) -> Vec<u8> {
    let mut a = header.to_vec();
    a.extend_from_slice(b"|serial=");
    a.extend_from_slice(serial_hex.as_bytes());
    a
}

/// A sealed blob, parsed.
struct Sealed<'a> {
    header: &'a [u8],
    label: String,
    id: &'a [u8],
    iv: &'a [u8],
    ciphertext: &'a [u8],
}

impl<'a> Sealed<'a> {
    fn parse(serial_hex: &str, blob: &'a [u8]) -> Result<Sealed<'a>, HsmError> {
        let corrupt = |detail: &str| HsmError::SealedCorrupt {
            serial: serial_hex.to_owned(),
            detail: detail.to_owned(),
        };
        let rest = blob
            .strip_prefix(SEALED_MAGIC)
            .ok_or_else(|| corrupt("not a sealed blob"))?;
        let (&mech, rest) = rest.split_first().ok_or_else(|| corrupt("truncated"))?;
        if mech != MECH_AES_GCM {
            return Err(corrupt(&format!("unknown mechanism {mech}")));
        }
        let (&label_len, rest) = rest.split_first().ok_or_else(|| corrupt("truncated"))?;
        let (label, rest) = rest
            .split_at_checked(usize::from(label_len))
            .ok_or_else(|| corrupt("truncated label"))?;
        let (&id_len, rest) = rest.split_first().ok_or_else(|| corrupt("truncated"))?;
        let (id, rest) = rest
            .split_at_checked(usize::from(id_len))
            .ok_or_else(|| corrupt("truncated id"))?;
        let (iv, ciphertext) = rest
            .split_at_checked(IV_LEN)
            .ok_or_else(|| corrupt("truncated IV"))?;
        if ciphertext.len() < TAG_LEN {
            return Err(corrupt("truncated ciphertext"));
        }
        Ok(Sealed {
            header: &blob[..blob.len() - ciphertext.len()],
            label: String::from_utf8_lossy(label).into_owned(),
            id,
            iv,
            ciphertext,
        })
    }
}

/// Whether a stored escrow value is a sealed blob (else a PKCS#8 key in clear).
pub fn is_sealed(stored: &[u8]) -> bool {
    stored.starts_with(SEALED_MAGIC)
}

/// What the database keeps of a new escrowed key: sealed under `kek`, or (no HSM) the
/// PKCS#8 itself, protected by the data directory's permissions only.
pub fn seal_escrow(kek: Option<&Kek>, serial_hex: &str, pkcs8: &[u8]) -> Result<Vec<u8>, HsmError> {
    match kek {
        Some(k) => k.seal(serial_hex, pkcs8),
        None => Ok(pkcs8.to_vec()),
    }
}

/// The PKCS#8 of an escrowed key as the database keeps it: opened by the HSM when it is
/// sealed (an error without an HSM, or when its KEK is not on the token), as it is when
/// it was stored in clear (a portal that ran without an HSM).
pub fn open_escrow(
    kek: Option<&Kek>,
    serial_hex: &str,
    stored: &[u8],
) -> Result<Zeroizing<Vec<u8>>, HsmError> {
    if !is_sealed(stored) {
        return Ok(Zeroizing::new(stored.to_vec()));
    }
    match kek {
        Some(k) => k.open(serial_hex, stored),
        None => {
            let parsed = Sealed::parse(serial_hex, stored)?;
            Err(HsmError::SealedWithoutHsm {
                serial: serial_hex.to_owned(),
                label: parsed.label,
                id: hex::encode(parsed.id),
            })
        }
    }
}

/// A `pkcs11:` URI (RFC 7512), the subset that names a key: `token` (required),
/// `object` and/or `id` (percent-encoded bytes), `type=private`. A PIN is never taken
/// from a URI (`pin-value`, `pin-source` are refused).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pkcs11Uri {
    /// CKA_LABEL of the token.
    pub token: String,
    /// CKA_LABEL of the key.
    pub object: Option<String>,
    /// CKA_ID of the key.
    pub id: Option<Vec<u8>>,
    raw: String,
}

impl std::fmt::Display for Pkcs11Uri {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.raw)
    }
}

impl Pkcs11Uri {
    /// Whether `s` is meant as a PKCS#11 URI rather than a file name.
    pub fn is_uri(s: &str) -> bool {
        s.starts_with("pkcs11:")
    }

    /// Parses `s`.
    pub fn parse(s: &str) -> Result<Pkcs11Uri, HsmError> {
        // Shown without its query, where a PIN could have been put.
        let shown = s.split('?').next().unwrap_or_default().to_owned();
        let bad = |detail: String| HsmError::BadUri {
            uri: shown.clone(),
            detail,
        };
        let body = s
            .strip_prefix("pkcs11:")
            .ok_or_else(|| bad("it does not start with pkcs11:".into()))?;
        let (path, query) = body.split_once('?').unwrap_or((body, ""));
        let (mut token, mut object, mut id) = (None, None, None);
        for attr in path.split(';').filter(|a| !a.is_empty()) {
            let (k, v) = attr
                .split_once('=')
                .ok_or_else(|| bad(format!("{attr:?} is not name=value")))?;
            let v = percent_decode(v).ok_or_else(|| bad(format!("bad %-escape in {attr:?}")))?;
            let text =
                || String::from_utf8(v.clone()).map_err(|_| bad(format!("{k} is not UTF-8")));
            match k {
                "token" => token = Some(text()?),
                "object" => object = Some(text()?),
                "id" => id = Some(v),
                "type" if v == b"private" => {}
                "type" => return Err(bad("type must be private (the CA's private key)".into())),
                "manufacturer"
                | "model"
                | "serial"
                | "library-manufacturer"
                | "library-description"
                | "library-version"
                | "slot-description"
                | "slot-manufacturer"
                | "slot-id" => {
                    return Err(bad(format!(
                        "{k} is not supported here: name the key by token, object and id"
                    )));
                }
                other => return Err(bad(format!("unknown attribute {other:?}"))),
            }
        }
        // No query attribute is taken; a PIN least of all.
        if let Some(q) = query.split('&').find(|q| !q.is_empty()) {
            let k = q.split_once('=').map_or(q, |(k, _)| k);
            return Err(bad(if k.starts_with("pin-") {
                "a PIN is never taken from a URI: use --hsm-pin-file or UKEY_PORTAL_HSM_PIN".into()
            } else {
                format!("query attribute {k:?} is not supported")
            }));
        }
        let token = token.ok_or_else(|| bad("token= is missing".into()))?;
        if object.is_none() && id.is_none() {
            return Err(bad("name the key with object= or id=".into()));
        }
        Ok(Pkcs11Uri {
            token,
            object,
            id,
            raw: s.to_owned(),
        })
    }
}

fn percent_decode(s: &str) -> Option<Vec<u8>> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let h = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(h, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    Some(out)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KeyKind {
    Rsa,
    EcP256,
}

/// The CA's private key in the HSM, signing through PKCS#11: CKM_SHA256_RSA_PKCS, or
/// ECDSA with SHA-256 (CKM_ECDSA_SHA256 where the token has it; else SHA-256 on the
/// host and CKM_ECDSA, as SoftHSM2 needs). rcgen signs certificates and CRLs with it.
pub struct HsmKey {
    token: Arc<Token>,
    handle: ObjectHandle,
    uri: String,
    kind: KeyKind,
    /// rcgen's raw public key: PKCS#1 RSAPublicKey, or the SEC1 point.
    public: Vec<u8>,
    ecdsa_sha256: bool,
}

impl std::fmt::Debug for HsmKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HsmKey")
            .field("uri", &self.uri)
            .field("kind", &self.kind)
            .finish_non_exhaustive()
    }
}

impl HsmKey {
    /// The URI it was opened with.
    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// Signs `msg` in the HSM: a PKCS#1 v1.5 SHA-256 signature, or a DER ECDSA one.
    pub fn sign_bytes(&self, msg: &[u8]) -> Result<Vec<u8>, HsmError> {
        let s = self.token.session();
        let what = || format!("signing with the CA key {}", self.uri);
        match self.kind {
            KeyKind::Rsa => s
                .sign(&Mechanism::Sha256RsaPkcs, self.handle, msg)
                .map_err(p11(what())),
            KeyKind::EcP256 if self.ecdsa_sha256 => {
                let rs = s
                    .sign(&Mechanism::EcdsaSha256, self.handle, msg)
                    .map_err(p11(what()))?;
                ecdsa_der(&rs)
            }
            KeyKind::EcP256 => {
                let digest = crate::crypto::sha256(msg);
                let rs = s
                    .sign(&Mechanism::Ecdsa, self.handle, &digest)
                    .map_err(p11(what()))?;
                ecdsa_der(&rs)
            }
        }
    }
}

impl rcgen::PublicKeyData for HsmKey {
    fn der_bytes(&self) -> &[u8] {
        &self.public
    }

    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        match self.kind {
            KeyKind::Rsa => &rcgen::PKCS_RSA_SHA256,
            KeyKind::EcP256 => &rcgen::PKCS_ECDSA_P256_SHA256,
        }
    }
}

impl rcgen::SigningKey for HsmKey {
    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
        self.sign_bytes(msg).map_err(|e| {
            tracing::error!(error = %e, "HSM signature failed");
            rcgen::Error::RemoteKeyError
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_name_a_key_by_token_object_and_id_and_never_carry_a_pin() {
        let u = Pkcs11Uri::parse("pkcs11:token=Portal%20HSM;object=ukey-ca;id=%01%02;type=private")
            .unwrap();
        assert_eq!(u.token, "Portal HSM");
        assert_eq!(u.object.as_deref(), Some("ukey-ca"));
        assert_eq!(u.id.as_deref(), Some(&[1u8, 2][..]));
        assert_eq!(
            u.to_string(),
            "pkcs11:token=Portal%20HSM;object=ukey-ca;id=%01%02;type=private"
        );
        for (bad, says) in [
            ("pkcs11:object=ca", "token= is missing"),
            ("pkcs11:token=t", "object= or id="),
            (
                "pkcs11:token=t;object=ca?pin-value=1234",
                "never taken from a URI",
            ),
            (
                "pkcs11:token=t;object=ca;type=public",
                "type must be private",
            ),
            ("pkcs11:token=t;object=%zz", "%-escape"),
            ("pkcs11:token=t;colour=red", "unknown attribute"),
        ] {
            let e = Pkcs11Uri::parse(bad).unwrap_err().to_string();
            assert!(e.contains(says), "{bad}: {e}");
            assert!(!e.contains("1234"), "a PIN put in a URI is not shown: {e}");
        }
        assert!(Pkcs11Uri::is_uri("pkcs11:token=t;object=o"));
        assert!(!Pkcs11Uri::is_uri("/etc/ca.key"));
    }

    #[test]
    fn a_sealed_blob_says_what_sealed_it_and_a_portal_without_the_hsm_says_so() {
        let header = header(DEFAULT_KEK_LABEL, &[0xab; 16], &[7; IV_LEN]).unwrap();
        let mut blob = header.clone();
        blob.extend_from_slice(&[0u8; 40]);
        assert!(is_sealed(&blob));
        let parsed = Sealed::parse("4A01", &blob).unwrap();
        assert_eq!(parsed.label, DEFAULT_KEK_LABEL);
        assert_eq!(parsed.id, &[0xab; 16]);
        assert_eq!(parsed.iv, &[7; IV_LEN]);
        assert_eq!(parsed.header, header.as_slice());
        assert_eq!(parsed.ciphertext.len(), 40);
        let e = open_escrow(None, "4A01", &blob).unwrap_err().to_string();
        assert!(
            e.contains("4A01")
                && e.contains(DEFAULT_KEK_LABEL)
                && e.contains("--hsm-module")
                && e.contains("未配置 HSM"),
            "{e}"
        );
        // A truncated blob is corrupt, not a panic; a key stored in clear passes as is.
        let e = open_escrow(None, "4A01", &blob[..header.len() + 3]).unwrap_err();
        assert!(matches!(e, HsmError::SealedCorrupt { .. }), "{e}");
        assert_eq!(
            *open_escrow(None, "4A01", b"\x30\x03abc").unwrap(),
            b"\x30\x03abc"
        );
        // The serial is bound: another certificate's row gives other additional data.
        assert_ne!(aad(&header, "4A01"), aad(&header, "4A02"));
    }

    #[test]
    fn ecdsa_and_rsa_public_keys_are_der_as_x509_carries_them() {
        let mut rs = [0u8; 64];
        rs[0] = 0x80; // r needs a leading zero
        rs[32] = 0x00;
        rs[33] = 0x01; // s has one to strip
        let der = ecdsa_der(&rs).unwrap();
        assert_eq!(&der[..5], &[0x30, 0x44, 0x02, 0x21, 0x00]);
        assert!(ecdsa_der(&rs[..63]).is_err());
        let n = [0xc0u8; 256];
        let der = rsa_public_key_der(&n, &[1, 0, 1]).unwrap();
        assert_eq!(&der[..4], &[0x30, 0x82, 0x01, 0x0a]);
        assert!(der.ends_with(&[0x02, 0x03, 1, 0, 1]));
        assert_eq!(
            ec_point(&[&[0x04, 0x41][..], &[0x04; 65]].concat()).unwrap(),
            vec![0x04; 65]
        );
        assert_eq!(ec_point(&[0x04; 65]).unwrap(), vec![0x04; 65]);
        assert!(ec_point(&[0x04; 33]).is_none());
    }
}
