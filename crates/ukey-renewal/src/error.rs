//! Errors of the renewal engine, grouped by what the user has to do.

use std::path::PathBuf;

use ukey_portal_client::ClientError;
use ukey_token::Lang;

/// What kind of situation an error is, for exit codes and front ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Nothing to renew (no order, already completed).
    NothingToDo,
    /// The user must act (pay, unlock the PIN, wait for a new key, read a rejection,
    /// confirm a last PIN try, choose among several).
    UserAction,
    /// Failed; the token is as before or the renewal will resume.
    Failure,
}

/// A check of the issued certificate that failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Refusal {
    /// Not DER, or trailing bytes.
    #[error("the issued certificate cannot be parsed: {0}")]
    Malformed(String),
    /// Does not chain to a configured trust anchor.
    #[error("the issued certificate does not chain to a trusted CA: {0}")]
    Untrusted(String),
    /// Another subject.
    #[error("the issued certificate names another subject ({got}) than the old one ({want})")]
    Subject {
        /// In the issued certificate.
        got: String,
        /// In the old one.
        want: String,
    },
    /// Another public key.
    #[error("the issued certificate is for another key than the one on the token")]
    PublicKey,
    /// Not valid now.
    #[error("the issued certificate is not valid now ({0})")]
    NotValidNow(String),
    /// Does not end later than the old one.
    #[error("the issued certificate ends no later than the old one")]
    NotLater,
    /// Wrong key usage.
    #[error("the issued certificate has the wrong key usage: {0}")]
    KeyUsage(String),
    /// The encryption part is missing or wrong.
    #[error("the encryption certificate or key is not acceptable: {0}")]
    Encryption(String),
    /// A CMP answer failed the checks (transactionID, recipNonce, protection by a
    /// trusted certificate, its form).
    #[error("the CA's answer is not acceptable: {0}")]
    Answer(String),
}

/// Everything the engine can fail with.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RenewalError {
    /// From the token.
    #[error(transparent)]
    Token(#[from] ukey_token::Error),
    /// From the portal.
    #[error(transparent)]
    Portal(#[from] ClientError),
    /// The issued certificate was refused; the token is unchanged.
    #[error("refused: {0}")]
    Refused(Refusal),
    /// The journal could not be read or written.
    #[error("journal {}: {reason}", .path.display())]
    Journal {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// No renewal order for the certificate.
    #[error("no renewal order for certificate {serial}")]
    NoOrder {
        /// Its serial.
        serial: String,
    },
    /// Already renewed.
    #[error("the renewal of certificate {serial} is already completed")]
    AlreadyCompleted {
        /// Its serial.
        serial: String,
    },
    /// Nothing to do: this certificate is the one a finished renewal put on the key.
    #[error("certificate {serial} was already renewed; it is valid until {}", .not_after.date())]
    AlreadyRenewed {
        /// Its serial.
        serial: String,
        /// End of its validity.
        not_after: time::OffsetDateTime,
    },
    /// The order needs its renewal code and none was given.
    #[error(
        "the renewal of certificate {serial} needs the renewal code shown on the paid order page"
    )]
    RenewalCodeNeeded {
        /// Its serial.
        serial: String,
    },
    /// Not paid yet.
    #[error("the renewal of certificate {serial} is not paid yet: pay at {payment_url}")]
    AwaitingPayment {
        /// Its serial.
        serial: String,
        /// Where to pay.
        payment_url: String,
    },
    /// A reviewer has not decided yet. Over CMP the renewal waits in its journal,
    /// its new key on the token, and the next run asks again.
    #[error("the renewal of certificate {serial} is under review{}", if .reason.is_empty() { String::new() } else { format!(": {}", .reason) })]
    UnderReview {
        /// Certificate serial.
        serial: String,
        /// The CA's words, when it gave some.
        reason: String,
    },
    /// The reviewer rejected it.
    #[error("the renewal was rejected: {reason}")]
    Rejected {
        /// The reviewer's reason.
        reason: String,
    },
    /// A new token is being mailed.
    #[error(
        "this token cannot do the renewal; a new key is being mailed (tracking {tracking_number})"
    )]
    NewKeyMailed {
        /// Tracking number.
        tracking_number: String,
    },
    /// The PIN is locked.
    #[error("the PIN of token {token} is locked")]
    PinLocked {
        /// Token serial.
        token: String,
    },
    /// One more wrong PIN locks the token: needs explicit confirmation.
    #[error("the PIN of token {token} has one try left; confirm to try it")]
    FinalTryNeedsConfirmation {
        /// Token serial.
        token: String,
    },
    /// The token lacks a mechanism the order needs (e.g. EC key generation for an
    /// algorithm upgrade): user action, since only the CA can help (a new key by mail).
    #[error("token {token} does not support {mechanism}")]
    MechanismMissing {
        /// Token serial.
        token: String,
        /// The mechanism.
        mechanism: String,
    },
    /// The key is used through an interface that cannot do what the order asks (an
    /// SKF key: SM2 only, a new key pair for every renewal): user action, as for a
    /// missing mechanism.
    #[error("token {token} (SKF) cannot do this renewal: {what}")]
    InterfaceUnsupported {
        /// Token serial.
        token: String,
        /// What it cannot do, in English.
        what: String,
        /// The same, in Chinese.
        what_zh: String,
    },
    /// The token generates keys of the needed algorithm, but not of the needed size
    /// (its C_GetMechanismInfo range leaves it out): user action, like a missing
    /// mechanism.
    #[error("token {token} generates {algorithm} keys of {min} to {max} bits, not {bits}")]
    KeySizeUnsupported {
        /// Token serial.
        token: String,
        /// The algorithm, e.g. `RSA-2048`.
        algorithm: String,
        /// The size needed, bits.
        bits: usize,
        /// The smallest size the token offers.
        min: usize,
        /// The largest size the token offers.
        max: usize,
    },
    /// The computer's clock differs too much from the portal's.
    #[error("the computer's clock is {seconds} s off the portal's")]
    ClockSkew {
        /// Local minus portal, seconds.
        seconds: i64,
    },
    /// Which certificate or token: several candidates, or none.
    #[error("{0}")]
    Selection(String),
    /// The certificate's key is not on the token.
    #[error("the private key of certificate {serial} is not on the token")]
    KeyMissing {
        /// Serial.
        serial: String,
    },
    /// Objects activation must change are read-only on this token (CKA_MODIFIABLE
    /// false): refused before the first change; the pending objects were removed.
    #[error("the token does not allow changing {}; nothing was changed", .objects.join(", "))]
    ReadOnlyObjects {
        /// What could not be changed.
        objects: Vec<String>,
    },
    /// No portal is given or configured.
    #[error("no CA portal is configured")]
    NoPortal,
    /// No trust anchor is configured: no issued certificate could be checked.
    #[error("no trusted root certificate is configured")]
    NoTrustAnchor,
    /// The self-test failed; the pending objects were removed.
    #[error("self-test failed: {0}")]
    SelfTest(String),
    /// Something inconsistent between journal, token and portal.
    #[error("{0}")]
    Inconsistent(String),
}

impl RenewalError {
    /// The kind, for exit codes.
    pub fn kind(&self) -> ErrorKind {
        match self {
            RenewalError::NoOrder { .. }
            | RenewalError::AlreadyCompleted { .. }
            | RenewalError::AlreadyRenewed { .. } => ErrorKind::NothingToDo,
            RenewalError::AwaitingPayment { .. }
            | RenewalError::RenewalCodeNeeded { .. }
            | RenewalError::Rejected { .. }
            | RenewalError::UnderReview { .. }
            | RenewalError::NewKeyMailed { .. }
            | RenewalError::PinLocked { .. }
            | RenewalError::FinalTryNeedsConfirmation { .. }
            | RenewalError::Selection(_)
            | RenewalError::MechanismMissing { .. }
            | RenewalError::InterfaceUnsupported { .. }
            | RenewalError::KeySizeUnsupported { .. }
            | RenewalError::ClockSkew { .. }
            | RenewalError::NoTrustAnchor
            | RenewalError::NoPortal => ErrorKind::UserAction,
            RenewalError::Token(ukey_token::Error::PinLocked { .. }) => ErrorKind::UserAction,
            _ => ErrorKind::Failure,
        }
    }

    /// Tries left on the PIN after a wrong one, when the key says (SKF keys do).
    pub fn pin_tries_left(&self) -> Option<u32> {
        match self {
            RenewalError::Token(ukey_token::Error::PinIncorrect { tries_left, .. }) => *tries_left,
            RenewalError::Token(ukey_token::Error::PinLocked { .. }) => Some(0),
            _ => None,
        }
    }

    /// A stable code.
    pub fn code(&self) -> &'static str {
        match self {
            RenewalError::Token(e) => e.code(),
            RenewalError::Portal(e) => e.code(),
            RenewalError::Refused(_) => "certificate_refused",
            RenewalError::Journal { .. } => "journal",
            RenewalError::NoOrder { .. } => "no_order",
            RenewalError::AlreadyCompleted { .. } => "already_completed",
            RenewalError::AlreadyRenewed { .. } => "already_renewed",
            RenewalError::AwaitingPayment { .. } => "awaiting_payment",
            RenewalError::RenewalCodeNeeded { .. } => "renewal_code_needed",
            RenewalError::Rejected { .. } => "rejected",
            RenewalError::UnderReview { .. } => "under_review",
            RenewalError::NewKeyMailed { .. } => "new_key_mailed",
            RenewalError::PinLocked { .. } => "pin_locked",
            RenewalError::FinalTryNeedsConfirmation { .. } => "pin_final_try",
            RenewalError::MechanismMissing { .. } => "mechanism_missing",
            RenewalError::InterfaceUnsupported { .. } => "interface_unsupported",
            RenewalError::KeySizeUnsupported { .. } => "key_size_unsupported",
            RenewalError::ClockSkew { .. } => "clock_skew",
            RenewalError::Selection(_) => "selection",
            RenewalError::KeyMissing { .. } => "key_missing",
            RenewalError::SelfTest(_) => "self_test_failed",
            RenewalError::ReadOnlyObjects { .. } => "read_only_objects",
            RenewalError::NoTrustAnchor => "trust_anchor_missing",
            RenewalError::NoPortal => "portal_not_configured",
            RenewalError::Inconsistent(_) => "inconsistent",
        }
    }

    /// Whether the renewal can be resumed later as it is (token removed, network down,
    /// portal 5xx): the journal is kept, nothing is rolled back.
    pub fn is_resumable(&self) -> bool {
        match self {
            RenewalError::Token(e) => matches!(
                e,
                ukey_token::Error::TokenRemoved { .. }
                    | ukey_token::Error::TokenNotPresent { .. }
                    | ukey_token::Error::DeviceError { .. }
            ),
            RenewalError::Portal(e) => e.is_transient(),
            RenewalError::Journal { .. } => true,
            // A CMP renewal waiting for the CA's decision keeps its transaction.
            RenewalError::UnderReview { .. } => true,
            _ => false,
        }
    }

    /// For the user, in `lang`, with what to do.
    pub fn user_message(&self, lang: Lang) -> String {
        let zh = lang == Lang::ZhCn;
        match self {
            RenewalError::Token(e) => e.user_message(lang),
            RenewalError::Portal(e) if e.is_transient() => {
                if zh {
                    format!("暂时无法连接 CA 门户，续期已保存进度，稍后重试会继续完成（{e}）")
                } else {
                    format!(
                        "The portal cannot be reached right now; the renewal is saved and will resume when you retry ({e})"
                    )
                }
            }
            RenewalError::Portal(e) => {
                if zh {
                    format!("CA 门户返回错误：{e}")
                } else {
                    format!("The portal returned an error: {e}")
                }
            }
            RenewalError::Refused(r) => {
                if zh {
                    format!("已拒绝 CA 返回的证书，UKey 未做任何改动：{r}")
                } else {
                    format!(
                        "The certificate from the portal was refused and the token left unchanged: {r}"
                    )
                }
            }
            RenewalError::AlreadyRenewed { serial, not_after } => {
                let day = not_after.date();
                if zh {
                    format!("证书（序列号 {serial}）已完成更新，有效期至 {day}，无需操作。")
                } else {
                    format!(
                        "Certificate {serial} is already renewed and valid until {day}; nothing to do."
                    )
                }
            }
            RenewalError::RenewalCodeNeeded { .. } => {
                if zh {
                    "此次续期需要续期码：请在 CA 门户已付款的订单页面查看 8 位续期码，更新时输入（ukey renew --renewal-code）。".to_owned()
                } else {
                    "This renewal needs its renewal code: find the 8-digit code on the paid order page of the CA's portal and give it when renewing (ukey renew --renewal-code).".to_owned()
                }
            }
            RenewalError::AwaitingPayment { payment_url, .. } => {
                if zh {
                    format!("续期订单尚未付款。请在此付款：{payment_url}")
                } else {
                    format!("The renewal is not paid yet. Pay here: {payment_url}")
                }
            }
            RenewalError::UnderReview { reason, .. } => {
                let said = if reason.is_empty() {
                    String::new()
                } else {
                    format!(" ({reason})")
                };
                if zh {
                    format!("续期申请正在审核中{said}，审核通过后即可更新；请稍后再试。")
                } else {
                    format!(
                        "The renewal is under review{said}; it can be installed once approved. Try again later."
                    )
                }
            }
            RenewalError::Rejected { reason } => {
                if zh {
                    format!("续期申请被审核驳回：{reason}")
                } else {
                    format!("The renewal was rejected by the reviewer: {reason}")
                }
            }
            RenewalError::NewKeyMailed { tracking_number } => {
                if zh {
                    format!(
                        "此 UKey 无法完成升级，新的 UKey 正在寄送中（运单号 {tracking_number}）"
                    )
                } else {
                    format!(
                        "This token cannot do the upgrade; a new token is being mailed (tracking number {tracking_number})"
                    )
                }
            }
            RenewalError::PinLocked { token } => {
                if zh {
                    format!(
                        "UKey {token} 的 PIN 码已锁定，未做任何改动。请联系发证机构（CA）解锁后再续期。"
                    )
                } else {
                    format!(
                        "The PIN of token {token} is locked; nothing was changed. Have your CA unlock it, then renew."
                    )
                }
            }
            RenewalError::FinalTryNeedsConfirmation { token } => {
                if zh {
                    format!(
                        "UKey {token} 的 PIN 码只剩最后一次尝试机会，再输错将锁定。确认无误后请加 --confirm-final-try 重试。"
                    )
                } else {
                    format!(
                        "The PIN of token {token} has one try left; a wrong PIN locks it. If you are sure, retry with --confirm-final-try."
                    )
                }
            }
            RenewalError::MechanismMissing { token, mechanism } => {
                if zh {
                    format!(
                        "UKey {token} 不支持此续期订单所需的算法（{mechanism}），无法完成续期，未做任何改动。请联系发证机构（CA），他们可以为您寄送新的 UKey。"
                    )
                } else {
                    format!(
                        "Token {token} cannot do what this renewal order asks (it lacks {mechanism}); nothing was changed. Contact your CA: they can mail you a new key."
                    )
                }
            }
            RenewalError::InterfaceUnsupported {
                token,
                what,
                what_zh,
            } => {
                if zh {
                    format!(
                        "UKey {token} 通过 SKF（GM/T 0016）接口使用，无法完成此续期：{what_zh}。未做任何改动。请联系发证机构（CA）。"
                    )
                } else {
                    format!(
                        "Token {token} is used through SKF (GM/T 0016) and cannot do this renewal: {what}. Nothing was changed. Contact your CA."
                    )
                }
            }
            RenewalError::KeySizeUnsupported {
                token,
                algorithm,
                bits,
                min,
                max,
            } => {
                let range = if *max == usize::MAX {
                    format!("{min}+")
                } else if min == max {
                    format!("{min}")
                } else {
                    format!("{min}–{max}")
                };
                if zh {
                    format!(
                        "UKey {token} 只能生成 {range} 位的密钥，此续期需要 {bits} 位的 {algorithm} 密钥，无法完成续期，未做任何改动。请联系发证机构（CA），他们可以为您寄送新的 UKey。"
                    )
                } else {
                    format!(
                        "Token {token} generates keys of {range} bits only; this renewal needs a {bits}-bit {algorithm} key, so nothing was changed. Contact your CA: they can mail you a new key."
                    )
                }
            }
            RenewalError::ClockSkew { seconds } => {
                if zh {
                    format!("本机时钟与 CA 门户相差 {seconds} 秒。请校准系统时间后重试。")
                } else {
                    format!(
                        "This computer's clock is {seconds} s off the portal's. Set the system time and retry."
                    )
                }
            }
            RenewalError::NoPortal => {
                if zh {
                    "未设置 CA 门户地址。请用 --portal 指定，或在配置文件中设置 portal_url（本人的 ~/.config/ukey/config.toml，或 CA 安装程序写入的 /etc/ukey/config.toml）。".to_owned()
                } else {
                    "No CA portal is set. Give it with --portal, or set portal_url in a configuration file (your ~/.config/ukey/config.toml, or /etc/ukey/config.toml, which your CA's installer writes).".to_owned()
                }
            }
            RenewalError::NoTrustAnchor => {
                if zh {
                    "未配置受信任的根证书，无法校验新证书，未做任何改动。请用 --trust 指定 CA 根证书，或写入配置文件 [renewal] trust_anchors。".to_owned()
                } else {
                    "No trusted root certificate is configured, so the new certificate cannot be checked; nothing was changed. Give the CA's root with --trust, or set [renewal] trust_anchors in the config file.".to_owned()
                }
            }
            RenewalError::ReadOnlyObjects { objects } => {
                let list = objects.join(", ");
                if zh {
                    format!(
                        "此 UKey 不允许修改续期所需改动的对象（{list}），续期未进行，UKey 未做任何改动。请联系发证机构（CA）。"
                    )
                } else {
                    format!(
                        "This token does not allow changing what the renewal must change ({list}); nothing was changed. Contact your CA."
                    )
                }
            }
            other => {
                let text = other.to_string();
                if zh {
                    format!("续期失败：{text}")
                } else {
                    format!("Renewal failed: {text}")
                }
            }
        }
    }
}
