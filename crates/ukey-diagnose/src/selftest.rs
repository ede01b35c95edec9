//! The sign-and-verify self-test: with the PIN, each certificate's private key signs a
//! random challenge on the token and the signature is verified in software with the
//! certificate's public key. It proves the pair works, which no listing can.
//!
//! **Invariant:** the PIN is given to C_Login once per diagnosis, never retried, never
//! logged or kept; a token whose PIN is on its final try or locked is not logged into
//! at all (a wrong PIN there would lock it, or prove nothing).

use aws_lc_rs::signature::{self, UnparsedPublicKey};
use secrecy::SecretString;
use ukey_token::cryptoki::mechanism::Mechanism;
use ukey_token::cryptoki::object::{Attribute, AttributeType, ObjectClass};
use ukey_token::{CertificateEntry, Error, Module, TokenSummary};
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::report::{Check, Facts, Status, Text};
use crate::text;

/// What the self-test found for one certificate.
#[derive(Debug)]
pub(crate) struct KeyTest {
    /// Whether the private key with the certificate's CKA_ID is on the token (definite,
    /// the session being logged in).
    pub(crate) key_present: bool,
    /// The `certificate.self_test` check.
    pub(crate) check: Check,
}

/// The outcome for the token.
#[derive(Debug)]
pub(crate) struct TokenTest {
    /// `token.self_test`: login and overall.
    pub(crate) check: Check,
    /// One per certificate in the order given; `None` where not tested (corrupt, CA).
    pub(crate) keys: Vec<Option<KeyTest>>,
    /// CKA_IDs (hex) of private keys matching no certificate, seen after login.
    pub(crate) private_key_ids: Vec<String>,
    /// The token was removed during the test.
    pub(crate) removed: bool,
}

fn skip(reason: Text, action: Option<Text>) -> TokenTest {
    let mut check = Check::new("token.self_test", Status::Skip, reason);
    check.action = action;
    TokenTest {
        check,
        keys: vec![],
        private_key_ids: vec![],
        removed: false,
    }
}

/// Runs the self-test on one token (see the module invariant).
pub(crate) fn run(
    module: &Module,
    token: &TokenSummary,
    certs: &[CertificateEntry],
    pin: &SecretString,
) -> TokenTest {
    // The flags may have changed since the listing: read them again before deciding.
    let token = match module.refresh(token) {
        Ok(t) => t,
        Err(e) => return failed_on(e, "C_GetTokenInfo"),
    };
    if token.pin.locked {
        return skip(
            Text::new(
                "PIN 码已锁定：没有尝试登录。",
                "The PIN is locked: login was not attempted.",
            ),
            Some(Text::new(
                "请联系发证机构（CA）解锁；不要再尝试输入 PIN。",
                "Contact the CA to unlock it; do not try again.",
            )),
        );
    }
    if token.pin.final_try {
        return skip(
            Text::new(
                "PIN 码只剩最后一次机会：为免锁定，没有尝试登录。",
                "The PIN has one try left: login was not attempted, so as not to lock the key.",
            ),
            Some(Text::new(
                "确认 PIN 码正确后再使用；不确定时请先联系发证机构（CA）。",
                "Use the PIN only when sure it is right; if unsure, contact the CA first.",
            )),
        );
    }
    if token.pin.protected_authentication_path {
        return skip(
            Text::new(
                "此 UKey 在设备上输入 PIN，诊断不做登录自检。",
                "This key takes its PIN on the device; the diagnosis does not log in.",
            ),
            None,
        );
    }
    if let Some(skf) = module.skf() {
        return run_skf(module, skf, &token, certs, pin);
    }
    let session = match module.open_session(&token) {
        Ok(s) => s,
        Err(e) => return failed_on(e, "C_OpenSession"),
    };
    // Once: a failure is reported, never retried.
    if let Err(e) = session.login(pin) {
        drop(session);
        return login_failed(module, &token, e);
    }
    let mut out = logged_in(certs.len());
    let mut tested = 0;
    let mut failed = 0;
    for cert in certs {
        let Ok(details) = &cert.details else {
            out.keys.push(None);
            continue;
        };
        if crate::certificate::is_ca(&cert.der) {
            out.keys.push(None);
            continue;
        }
        let key = match session.find_private_key(&cert.key_id) {
            Ok(k) => k,
            Err(e) => {
                out.removed |= matches!(e, Error::TokenRemoved { .. });
                out.keys.push(Some(KeyTest {
                    key_present: false,
                    check: error_check(&e),
                }));
                failed += 1;
                continue;
            }
        };
        let Some(key) = key else {
            out.keys.push(Some(KeyTest {
                key_present: false,
                check: Check::new(
                    "certificate.self_test",
                    Status::Fail,
                    Text::new(
                        "登录后也找不到这张证书的私钥，无法自检。",
                        "Even logged in, the certificate's private key is not on the key: nothing to test.",
                    ),
                ),
            }));
            failed += 1;
            continue;
        };
        tested += 1;
        let check = sign_and_verify(&session, key, &cert.der, &details.key_algorithm);
        if check.status == Status::Fail {
            failed += 1;
        }
        out.removed |=
            check.facts.get("error_code").and_then(|v| v.as_str()) == Some("token_removed");
        out.keys.push(Some(KeyTest {
            key_present: true,
            check,
        }));
    }
    // Private keys are visible now: those matching no certificate are orphans.
    if let Ok(handles) = session.find_objects(&[Attribute::Class(ObjectClass::PRIVATE_KEY)]) {
        for h in handles {
            if let Ok(attrs) = session.attributes(h, &[AttributeType::Id]) {
                for a in attrs {
                    if let Attribute::Id(id) = a
                        && !certs.iter().any(|c| c.key_id == id)
                    {
                        out.private_key_ids.push(hex::encode(id));
                    }
                }
            }
        }
    }
    let _ = session.logout();
    out.check = summary(tested, failed);
    out
}

/// The outcome once the PIN was right, before any key is tested.
fn logged_in(certs: usize) -> TokenTest {
    TokenTest {
        check: Check::new(
            "token.self_test",
            Status::Pass,
            Text::new("PIN 码正确，已登录。", "The PIN is right; logged in."),
        ),
        keys: Vec::with_capacity(certs),
        private_key_ids: vec![],
        removed: false,
    }
}

/// `token.self_test` after the keys: how many were tested, how many failed.
fn summary(tested: usize, failed: usize) -> Check {
    let check = if failed > 0 {
        Check::new(
            "token.self_test",
            Status::Fail,
            text!(
                "PIN 码正确；{failed} 个密钥自检失败（共 {tested} 个完成自检）。",
                "The PIN is right; {failed} key(s) failed the self-test ({tested} tested)."
            ),
        )
    } else {
        Check::new(
            "token.self_test",
            Status::Pass,
            text!(
                "PIN 码正确；{tested} 个密钥自检成功。",
                "The PIN is right; {tested} key(s) passed the self-test."
            ),
        )
    };
    check.facts(
        Facts::new()
            .with("keys_tested", tested)
            .with("keys_failed", failed),
    )
}

/// The self-test on an SKF key: the PIN verified once, then each certificate's key in
/// its container proves itself: a signing key signs a challenge (e computed by the host,
/// verified with the certificate's key and the GM ID), an encryption key imports a
/// session key sealed to its certificate and decrypts with it.
fn run_skf(
    module: &Module,
    skf: &ukey_token::skf::SkfBackend,
    token: &TokenSummary,
    certs: &[CertificateEntry],
    pin: &SecretString,
) -> TokenTest {
    let session = match skf.open(token) {
        Ok(s) => s,
        Err(e) => return failed_on(e, "SKF_ConnectDev"),
    };
    if let Err(e) = session.login(pin) {
        drop(session);
        return login_failed(module, token, e);
    }
    let mut out = logged_in(certs.len());
    let (mut tested, mut failed) = (0, 0);
    for cert in certs {
        if cert.details.is_err() || crate::certificate::is_ca(&cert.der) {
            out.keys.push(None);
            continue;
        }
        let name = String::from_utf8_lossy(&cert.key_id).into_owned();
        let Ok(ukey_token::PublicKey::Sm2 { point }) =
            ukey_token::PublicKey::from_certificate(&cert.der)
        else {
            out.keys.push(Some(KeyTest {
                key_present: true,
                check: Check::new(
                    "certificate.self_test",
                    Status::Skip,
                    Text::new(
                        "SKF 接口只自检 SM2 密钥。",
                        "Through SKF only SM2 keys are self-tested.",
                    ),
                ),
            }));
            continue;
        };
        let container = match session.container(&name) {
            Ok(c) => c,
            Err(e) => {
                out.removed |= matches!(e, Error::TokenRemoved { .. });
                out.keys.push(Some(KeyTest {
                    key_present: false,
                    check: error_check(&e),
                }));
                failed += 1;
                continue;
            }
        };
        let facts = Facts::new().with("container", name.clone());
        let result = if container.sign_key.as_deref() == Some(point.as_slice()) {
            let challenge = format!("ukey diagnose {}", hex::encode(rand16())).into_bytes();
            session.sign_sm2(&name, &point, &challenge).map(|sig| {
                ukey_trust::gm::verify(ukey_trust::gm::GM_DISTID, &point, &challenge, &sig)
            })
        } else if container.enc_key.as_deref() == Some(point.as_slice()) {
            session.sm2_decrypts(&name, &point)
        } else {
            out.keys.push(Some(KeyTest {
                key_present: false,
                check: Check::new(
                    "certificate.self_test",
                    Status::Fail,
                    Text::new(
                        "证书所在容器中没有与它匹配的密钥，无法自检。",
                        "The certificate's container holds no key matching it: nothing to test.",
                    ),
                )
                .facts(facts),
            }));
            failed += 1;
            continue;
        };
        tested += 1;
        let check = match result {
            Ok(ok) => verdict(
                "certificate.self_test",
                ok,
                facts.with("mechanism", "SKF, SM2 (GM ID)"),
            ),
            Err(e) => {
                out.removed |= matches!(e, Error::TokenRemoved { .. });
                error_check(&e)
            }
        };
        if check.status == Status::Fail {
            failed += 1;
        }
        out.keys.push(Some(KeyTest {
            key_present: true,
            check,
        }));
    }
    let _ = session.application().logout();
    out.check = summary(tested, failed);
    out
}

fn rand16() -> [u8; 16] {
    let mut b = [0u8; 16];
    let _ = aws_lc_rs::rand::SecureRandom::fill(&aws_lc_rs::rand::SystemRandom::new(), &mut b);
    b
}

fn error_check(e: &Error) -> Check {
    Check::new(
        "certificate.self_test",
        Status::Fail,
        Text::new(
            e.user_message(ukey_token::Lang::ZhCn),
            e.user_message(ukey_token::Lang::En),
        ),
    )
    .facts(Facts::new().with("error_code", e.code()))
}

fn failed_on(e: Error, _call: &str) -> TokenTest {
    let removed = matches!(
        e,
        Error::TokenRemoved { .. } | Error::TokenNotPresent { .. }
    );
    let mut check = error_check(&e);
    check.id = "token.self_test".to_owned();
    TokenTest {
        check,
        keys: vec![],
        private_key_ids: vec![],
        removed,
    }
}

fn login_failed(module: &Module, token: &TokenSummary, e: Error) -> TokenTest {
    let after = module.refresh(token).ok();
    let pin = after.as_ref().map(|t| t.pin).unwrap_or(token.pin);
    let facts = Facts::new()
        .with("error_code", e.code())
        .with("pin_count_low", pin.count_low)
        .with("pin_final_try", pin.final_try)
        .with("pin_locked", pin.locked)
        .with("pin_tries_left", serde_json::json!(pin.tries_left));
    let (reason, action) = match &e {
        Error::PinIncorrect { .. } if pin.locked => (
            Text::new(
                "PIN 码不正确，UKey 现已锁定。诊断没有重试。",
                "Wrong PIN; the key is now locked. The diagnosis did not retry.",
            ),
            Text::new(
                "请联系发证机构（CA）解锁；不要再尝试输入 PIN。",
                "Contact the CA to unlock it; do not try again.",
            ),
        ),
        Error::PinIncorrect { .. } if pin.final_try => (
            Text::new(
                "PIN 码不正确，只剩最后一次机会。诊断没有重试。",
                "Wrong PIN; one try is left. The diagnosis did not retry.",
            ),
            Text::new(
                "不确定 PIN 码时不要再试，请联系发证机构（CA）。",
                "Do not try again unless sure of the PIN; contact the CA.",
            ),
        ),
        Error::PinIncorrect {
            tries_left: Some(n),
            ..
        } => (
            text!(
                "PIN 码不正确，还可尝试 {n} 次。诊断没有重试。",
                "Wrong PIN: {n} tries left. The diagnosis did not retry."
            ),
            Text::new(
                "请确认 PIN 码后再试；次数用完 UKey 将被锁定。",
                "Check the PIN before trying again; when no try is left the key locks.",
            ),
        ),
        Error::PinIncorrect { .. } => (
            Text::new(
                "PIN 码不正确。诊断没有重试。",
                "Wrong PIN. The diagnosis did not retry.",
            ),
            Text::new(
                "请确认 PIN 码后再试；多次输错会锁定 UKey。",
                "Check the PIN before trying again; too many wrong PINs lock the key.",
            ),
        ),
        Error::PinLocked { .. } => (
            Text::new("PIN 码已锁定。", "The PIN is locked."),
            Text::new(
                "请联系发证机构（CA）解锁；不要再尝试输入 PIN。",
                "Contact the CA to unlock it; do not try again.",
            ),
        ),
        other => (
            Text::new(
                other.user_message(ukey_token::Lang::ZhCn),
                other.user_message(ukey_token::Lang::En),
            ),
            Text::new("请重新插入 UKey 后再试。", "Re-insert the key and retry."),
        ),
    };
    let removed = matches!(
        e,
        Error::TokenRemoved { .. } | Error::TokenNotPresent { .. }
    );
    TokenTest {
        check: Check::new("token.self_test", Status::Fail, reason)
            .action(action)
            .facts(facts),
        keys: vec![],
        private_key_ids: vec![],
        removed,
    }
}

/// The verdict of a self-test signature.
fn verdict(id: &'static str, verified: bool, facts: Facts) -> Check {
    if verified {
        Check::new(
            id,
            Status::Pass,
            Text::new(
                "私钥签名、证书公钥验证成功：密钥对完好。",
                "The private key signed and the certificate's public key verified it: the pair works.",
            ),
        )
        .facts(facts)
    } else {
        Check::new(
            id,
            Status::Fail,
            Text::new(
                "签名无法用证书的公钥验证：UKey 上的私钥与证书不匹配。",
                "The signature does not verify with the certificate's public key: the key on the token does not match the certificate.",
            ),
        )
        .action(Text::new(
            "请联系发证机构（CA）：证书需要为 UKey 上的密钥重新签发。",
            "Contact the CA: the certificate must be issued again for the key on the token.",
        ))
        .facts(facts)
    }
}

/// The self-test of an SM2 key: a signature made through the module's SM2 profile
/// (SM2-with-SM3, GM ID), verified with the certificate's key.
fn sm2_sign_and_verify(
    session: &ukey_token::Session<'_>,
    key: ukey_token::cryptoki::object::ObjectHandle,
    der: &[u8],
    challenge: &[u8],
) -> Check {
    let id = "certificate.self_test";
    let Ok(public) = ukey_token::PublicKey::from_certificate(der) else {
        return Check::new(
            id,
            Status::Skip,
            Text::new(
                "证书的 SM2 公钥无法读取。",
                "The certificate's SM2 key cannot be read.",
            ),
        );
    };
    let profile = session
        .sm2_profile()
        .map(|p| p.name)
        .unwrap_or_else(|| "none".into());
    let facts = Facts::new()
        .with(
            "mechanism",
            format!("SM2-with-SM3, GM ID (profile {profile})"),
        )
        .with("challenge_bytes", challenge.len());
    let sig = match session.sign_data(&public, key, challenge) {
        Ok(s) => s,
        Err(e) => {
            let mut c = error_check(&e);
            c.facts = facts.with("error_code", e.code());
            return c;
        }
    };
    let point = public.raw();
    let verified = ukey_trust::gm::verify(ukey_trust::gm::GM_DISTID, &point, challenge, &sig);
    verdict(id, verified, facts.with("signature_bytes", sig.len()))
}

/// Signs a fresh random challenge with `key` on the token and verifies it with the
/// public key of the certificate `der`.
fn sign_and_verify(
    session: &ukey_token::Session<'_>,
    key: ukey_token::cryptoki::object::ObjectHandle,
    der: &[u8],
    algorithm: &str,
) -> Check {
    let id = "certificate.self_test";
    let mut challenge = [0u8; 32];
    if aws_lc_rs::rand::SecureRandom::fill(&aws_lc_rs::rand::SystemRandom::new(), &mut challenge)
        .is_err()
    {
        return Check::new(
            id,
            Status::Skip,
            Text::new("无法生成随机数。", "No random numbers available."),
        );
    }
    let Ok((_, cert)) = X509Certificate::from_der(der) else {
        return Check::new(
            id,
            Status::Skip,
            Text::new("证书无法解析。", "Unparseable certificate."),
        );
    };
    let public_key = cert.public_key().subject_public_key.data.to_vec();
    if algorithm == "SM2" {
        return sm2_sign_and_verify(session, key, der, &challenge);
    }
    let (mechanism, data, verify_alg, name): (
        Mechanism<'_>,
        Vec<u8>,
        &'static dyn signature::VerificationAlgorithm,
        &str,
    ) = if algorithm.starts_with("RSA") {
        (
            Mechanism::Sha256RsaPkcs,
            challenge.to_vec(),
            &signature::RSA_PKCS1_1024_8192_SHA256_FOR_LEGACY_USE_ONLY,
            "CKM_SHA256_RSA_PKCS",
        )
    } else if algorithm == "EC-P256" {
        // No CKM_ECDSA_SHA256 on SoftHSM2 (and on many keys): hash here, sign the hash.
        let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &challenge);
        (
            Mechanism::Ecdsa,
            digest.as_ref().to_vec(),
            &signature::ECDSA_P256_SHA256_FIXED,
            "CKM_ECDSA",
        )
    } else {
        return Check::new(
            id,
            Status::Skip,
            text!(
                "自检暂不支持 {algorithm} 算法。",
                "The self-test does not support {algorithm} keys yet."
            ),
        );
    };
    let facts = Facts::new()
        .with("mechanism", name)
        .with("challenge_bytes", challenge.len());
    let sig = match session.sign(&mechanism, key, &data) {
        Ok(s) => s,
        Err(e) => {
            let mut c = error_check(&e);
            c.facts = facts.with("error_code", e.code());
            return c;
        }
    };
    let verified = UnparsedPublicKey::new(verify_alg, &public_key)
        .verify(&challenge, &sig)
        .is_ok();
    verdict(id, verified, facts.with("signature_bytes", sig.len()))
}
