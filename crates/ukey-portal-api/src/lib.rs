//! Wire types of the UKey renewal portal protocol, and its OpenAPI document.
//!
//! The portal is where a certificate holder pays for a renewal; this protocol is what
//! the desktop client needs from it: "what renewal is waiting for this certificate"
//! ([`StatusRequest`] → [`RenewalStatus`]), "issue the renewed certificate"
//! ([`ChallengeResponse`], [`IssueRequest`] → [`IssueResponse`]) and "it is installed"
//! ([`InstalledRequest`] → [`InstalledResponse`]). The normative description is the
//! OpenAPI 3.1 document [`OPENAPI_YAML`] (`crates/ukey-portal-api/openapi.yaml`),
//! served by the reference portal at `/openapi.yaml`; this module mirrors it in Rust.
//!
//! # Encoding conventions
//! - JSON, UTF-8. Binary values (DER, signatures, nonces, wrapped keys) are **base64,
//!   standard alphabet, with padding** (RFC 4648 §4).
//! - Certificate serial numbers are upper-case hex of the serial's magnitude, without
//!   separators or leading zero bytes, with an even number of digits: exactly what
//!   `openssl x509 -noout -serial` prints. [`normalize_serial_hex`] turns any common
//!   spelling (`3a:5f`, `0x3A5F`, `003A5F`) into this form.
//! - Times are RFC 3339 strings in UTC.
//! - Every response carries an HTTP `Date` header; clients use it to detect clock skew.
//! - Errors are [`ApiError`] (`{"code": "...", "message": "..."}`) with a 4xx/5xx status;
//!   codes are stable snake_case identifiers ([`ErrorCode`]), messages are for humans.
//!
//! # Proof of possession
//! Issuing needs a fresh, single-use [challenge](ChallengeResponse) signed by the private
//! key of the certificate being renewed over [`challenge_signed_data`], plus a PKCS#10
//! CSR signed by the new key (which is the old key when the order's [`KeyPolicy`] is
//! `same`). Confirming installation needs a signature by the NEW key over
//! [`installed_signed_data`]. Both use a [`SignatureAlgorithm`] a token can produce.
//!
//! # No personal data without proof
//! A status answer is given to anyone who knows an issuer and a serial (both are public:
//! they are in every signature the holder ever made), so it carries no subject names,
//! only the order's commercial terms. The reviewer's rejection reason is kept: it is
//! about the application, not the holder's identity, and the holder needs it to act.
//!
//! # Encryption-key escrow envelope
//! See [`KeyEnvelope`]: the portal (acting as key-management centre) generates the
//! encryption key pair, and returns the PKCS#8 private key wrapped with AES-256 key wrap
//! with padding (RFC 5649) under a content-encryption key that only a *transport key*
//! can recover: a key pair the token generated for this one renewal, whose public key
//! the issue request carries ([`IssueRequest::transport_key_spki`], covered by the old
//! key's challenge signature). So `C_UnwrapKey` puts the escrowed key on the token
//! without it ever being in the clear on the client's machine, and the new signing key
//! only signs.

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

pub mod gm;

/// The OpenAPI 3.1 document describing this protocol (normative).
pub const OPENAPI_YAML: &str = include_str!("../openapi.yaml");

/// Routes of the public API and the admin API, as axum path templates. A server test
/// checks each of them appears in [`OPENAPI_YAML`].
pub mod paths {
    /// Base path of version 1 of the client-facing protocol.
    pub const API_V1: &str = "/api/v1";
    /// `POST` [`StatusRequest`](super::StatusRequest) → [`RenewalStatus`](super::RenewalStatus).
    pub const STATUS: &str = "/api/v1/status";
    /// `POST` (empty body) → [`ChallengeResponse`](super::ChallengeResponse).
    pub const CHALLENGE: &str = "/api/v1/orders/{order_id}/challenge";
    /// `POST` [`IssueRequest`](super::IssueRequest) → [`IssueResponse`](super::IssueResponse).
    pub const ISSUE: &str = "/api/v1/orders/{order_id}/issue";
    /// `POST` [`InstalledRequest`](super::InstalledRequest) → [`InstalledResponse`](super::InstalledResponse).
    pub const INSTALLED: &str = "/api/v1/orders/{order_id}/installed";
    /// `GET` → the CA's CRL, DER (`application/pkix-crl`).
    pub const CRL: &str = "/api/v1/crl";
    /// `GET` → the CRL of the CA key whose SKI (lower-case hex) is `{ski}`: the issuing
    /// CA's or a retired one's (a CA rollover), DER.
    pub const CRL_OF_KEY: &str = "/api/v1/crl/{ski}";
    /// `GET` → the issuing CA certificate, DER (`application/pkix-cert`).
    pub const CA_CERT: &str = "/api/v1/ca";
    /// `GET` → this document.
    pub const OPENAPI: &str = "/openapi.yaml";
    /// `GET` → a human payment page for a serial (`?serial=HEX`), HTML.
    pub const PAY_PAGE: &str = "/pay";
    /// Admin: `GET` list, `POST` [`CreateOrderRequest`](super::CreateOrderRequest).
    pub const ADMIN_ORDERS: &str = "/admin/v1/orders";
    /// Admin: `GET` one order.
    pub const ADMIN_ORDER: &str = "/admin/v1/orders/{order_id}";
    /// Admin: `POST` mark paid (awaiting_payment → ready).
    pub const ADMIN_PAY: &str = "/admin/v1/orders/{order_id}/pay";
    /// Admin: `POST` [`RejectRequest`](super::RejectRequest).
    pub const ADMIN_REJECT: &str = "/admin/v1/orders/{order_id}/reject";
    /// Admin: `POST` [`ShipRequest`](super::ShipRequest) (a new key is mailed).
    pub const ADMIN_SHIP: &str = "/admin/v1/orders/{order_id}/ship";
    /// Admin: `POST` hold for review (awaiting_payment | ready → under_review).
    pub const ADMIN_REVIEW: &str = "/admin/v1/orders/{order_id}/review";
    /// Admin: `POST` approve after review (under_review → ready).
    pub const ADMIN_APPROVE: &str = "/admin/v1/orders/{order_id}/approve";
    /// CMP over HTTP (RFC 6712, RFC 9483 §6): `POST` a DER `PKIMessage`
    /// (`application/pkixcmp`) → the DER answer. Not JSON, so not in the OpenAPI document.
    pub const CMP: &str = "/.well-known/cmp";
    /// The same for a named certificate profile (RFC 9483 §3.3 `p/<name>`).
    pub const CMP_PROFILE: &str = "/.well-known/cmp/p/{name}";

    /// Every route a conforming server mounts.
    pub const ALL: &[&str] = &[
        STATUS,
        CHALLENGE,
        ISSUE,
        INSTALLED,
        CRL,
        CRL_OF_KEY,
        CA_CERT,
        OPENAPI,
        PAY_PAGE,
        ADMIN_ORDERS,
        ADMIN_ORDER,
        ADMIN_PAY,
        ADMIN_REJECT,
        ADMIN_SHIP,
        ADMIN_REVIEW,
        ADMIN_APPROVE,
    ];

    /// `/api/v1/orders/{order_id}/challenge` for a concrete order.
    pub fn challenge(order_id: &str) -> String {
        CHALLENGE.replace("{order_id}", order_id)
    }
    /// `/api/v1/orders/{order_id}/issue` for a concrete order.
    pub fn issue(order_id: &str) -> String {
        ISSUE.replace("{order_id}", order_id)
    }
    /// `/api/v1/orders/{order_id}/installed` for a concrete order.
    pub fn installed(order_id: &str) -> String {
        INSTALLED.replace("{order_id}", order_id)
    }
    /// `/api/v1/crl/{ski}` for a concrete CA key.
    pub fn crl_of_key(ski_hex: &str) -> String {
        CRL_OF_KEY.replace("{ski}", ski_hex)
    }
}

/// Domain-separation prefix of the challenge signature ([`challenge_signed_data`]).
pub const CHALLENGE_CONTEXT: &[u8] = b"ukey-renew-v1\0";
/// Domain-separation prefix of the installed signature ([`installed_signed_data`]).
pub const INSTALLED_CONTEXT: &[u8] = b"ukey-renew-installed-v1\0";
/// Length in bytes of a challenge nonce.
pub const NONCE_LEN: usize = 32;
/// Largest request body a server must accept; larger bodies get `body_too_large` (413).
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// The bytes the OLD certificate's key signs to answer a challenge:
///
/// `"ukey-renew-v1\0" || order_id (ASCII) || "\0" || nonce (32 bytes) || SHA-256(csr_der)
/// [|| SHA-256(transport_key_spki)]`
///
/// Binding the CSR's hash means a captured challenge answer cannot be replayed with
/// another CSR; binding the order id means it cannot be used on another order; binding
/// the transport key (present exactly when the request carries one) means the escrowed
/// key cannot be redirected to another key.
pub fn challenge_signed_data(
    order_id: &str,
    nonce: &[u8],
    csr_der: &[u8],
    transport_key_spki: Option<&[u8]>,
) -> Vec<u8> {
    let sha256 = |b: &[u8]| aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, b);
    let mut out = Vec::with_capacity(CHALLENGE_CONTEXT.len() + order_id.len() + 1 + 96);
    out.extend_from_slice(CHALLENGE_CONTEXT);
    out.extend_from_slice(order_id.as_bytes());
    out.push(0);
    out.extend_from_slice(nonce);
    out.extend_from_slice(sha256(csr_der).as_ref());
    if let Some(spki) = transport_key_spki {
        out.extend_from_slice(sha256(spki).as_ref());
    }
    out
}

/// The bytes the NEW key signs to confirm installation:
///
/// `"ukey-renew-installed-v1\0" || order_id (ASCII) || "\0" || serial (canonical hex, ASCII)`
///
/// `serial_hex` is normalised with [`normalize_serial_hex`] first (an invalid serial is
/// used as given, so the signature will simply not verify).
pub fn installed_signed_data(order_id: &str, serial_hex: &str) -> Vec<u8> {
    let serial = normalize_serial_hex(serial_hex).unwrap_or_else(|_| serial_hex.to_owned());
    let mut out = Vec::with_capacity(INSTALLED_CONTEXT.len() + order_id.len() + 1 + serial.len());
    out.extend_from_slice(INSTALLED_CONTEXT);
    out.extend_from_slice(order_id.as_bytes());
    out.push(0);
    out.extend_from_slice(serial.as_bytes());
    out
}

/// A serial number that is not hex.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid certificate serial number {0:?}: expected hexadecimal digits")]
pub struct InvalidSerial(pub String);

/// Canonical serial spelling: upper-case hex of the magnitude, even number of digits,
/// no leading zero bytes (`openssl x509 -serial` style). Accepts `:`/space separators
/// and a `0x` prefix. Zero is `"00"`.
pub fn normalize_serial_hex(input: &str) -> Result<String, InvalidSerial> {
    let trimmed = input.trim();
    let body = trimmed
        .strip_prefix("0x")
        .or_else(|| trimmed.strip_prefix("0X"))
        .unwrap_or(trimmed);
    let mut digits: String = body.chars().filter(|c| *c != ':' && *c != ' ').collect();
    if digits.is_empty() || digits.len() > 128 || !digits.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(InvalidSerial(input.to_owned()));
    }
    digits.make_ascii_uppercase();
    let significant = digits.trim_start_matches('0');
    let mut out = String::with_capacity(significant.len() + 1);
    if significant.is_empty() {
        return Ok("00".to_owned());
    }
    if significant.len() % 2 == 1 {
        out.push('0');
    }
    out.push_str(significant);
    Ok(out)
}

/// Canonical serial hex of a DER INTEGER's content bytes (as in a certificate).
pub fn serial_hex_from_bytes(bytes: &[u8]) -> String {
    let hex: String = bytes.iter().map(|b| format!("{b:02X}")).collect();
    // Hex digits only, so normalisation cannot fail; fall back to the raw form anyway.
    normalize_serial_hex(&hex).unwrap_or(hex)
}

/// Key algorithm and size of a renewed key (the order's target) or an escrowed key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum KeyAlgorithm {
    /// RSA with a 2048-bit modulus.
    #[serde(rename = "RSA-2048")]
    Rsa2048,
    /// ECDSA/ECDH on NIST P-256 (secp256r1).
    #[serde(rename = "EC-P256")]
    EcP256,
    /// SM2 (GM/T 0003): id-ecPublicKey on the curve 1.2.156.10197.1.301. Certificates
    /// from an SM2 CA, signed SM2-with-SM3 with the GM ID `1234567812345678`.
    #[serde(rename = "SM2")]
    Sm2,
}

impl KeyAlgorithm {
    /// The wire name, e.g. `"RSA-2048"`.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyAlgorithm::Rsa2048 => "RSA-2048",
            KeyAlgorithm::EcP256 => "EC-P256",
            KeyAlgorithm::Sm2 => "SM2",
        }
    }
    /// Parses a wire name (case-insensitive; `rsa2048`, `p256` accepted too).
    pub fn parse(s: &str) -> Option<KeyAlgorithm> {
        match s.to_ascii_uppercase().replace(['-', '_'], "").as_str() {
            "RSA2048" => Some(KeyAlgorithm::Rsa2048),
            "ECP256" | "P256" | "SECP256R1" | "PRIME256V1" => Some(KeyAlgorithm::EcP256),
            "SM2" => Some(KeyAlgorithm::Sm2),
            _ => None,
        }
    }
}

impl std::fmt::Display for KeyAlgorithm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Whether the renewed certificate must certify a new key or the old one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyPolicy {
    /// The token generates a new key pair; the CSR must carry a key different from the
    /// old certificate's.
    New,
    /// The CSR must carry the old certificate's public key (signed by the old key).
    Same,
}

impl KeyPolicy {
    /// The wire name, `"new"` or `"same"`.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyPolicy::New => "new",
            KeyPolicy::Same => "same",
        }
    }
}

/// Signature algorithms a token can produce for challenges and installed confirmations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SignatureAlgorithm {
    /// RSASSA-PKCS1-v1_5 with SHA-256 (`CKM_SHA256_RSA_PKCS`, or `CKM_RSA_PKCS` over a
    /// DigestInfo). Signature: the raw modulus-length octet string.
    RsaPkcs1Sha256,
    /// ECDSA on P-256 over SHA-256 of the data (hash in software, sign with
    /// `CKM_ECDSA`). Signature: DER `ECDSA-Sig-Value ::= SEQUENCE { r INTEGER, s INTEGER }`,
    /// NOT the raw `r || s` PKCS#11 returns.
    EcdsaP256Sha256,
    /// SM2 with SM3 (GM/T 0003.2): e = SM3(Z ‖ data), Z with the GM ID
    /// `1234567812345678`. Signature: DER `SEQUENCE { r INTEGER, s INTEGER }`.
    Sm2Sm3,
}

/// The renewal terms the holder paid for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderTerms {
    /// Validity of the renewed certificate, in years.
    pub years: u32,
    /// New key or same key.
    pub key_policy: KeyPolicy,
    /// Algorithm of the renewed key (an upgrade, e.g. RSA-2048 → EC-P256, may require a
    /// new token: see [`RenewalStatus::RequiresNewKey`]).
    pub target_algorithm: KeyAlgorithm,
    /// Whether an escrowed encryption certificate and key come with the renewal.
    pub with_encryption_cert: bool,
}

/// `POST /api/v1/status`: which renewal is waiting for this certificate. Give the
/// issuer as the DER of the certificate's `issuer` Name (preferred: exact) or as a DN
/// string (`CN=…, O=…`; attribute order does not matter). At least one is required.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusRequest {
    /// DER of the certificate's issuer `Name`, base64.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "b64_opt")]
    pub issuer_der: Option<Vec<u8>>,
    /// Issuer DN as text, e.g. `"CN=UKey Test CA, O=UKey Renew Test"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issuer_dn: Option<String>,
    /// The certificate's serial number, hex (normalised by the server).
    pub serial_hex: String,
}

/// Answer to [`StatusRequest`]: the state of the newest renewal order for the
/// certificate, tagged by `"state"`. Carries no personal data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum RenewalStatus {
    /// No renewal order exists for this certificate.
    None,
    /// An order exists but is not paid: send the holder to `payment_url` (the portal's
    /// page with the serial prefilled).
    AwaitingPayment {
        /// Opaque order id.
        order_id: String,
        /// Portal page to pay at.
        payment_url: String,
        /// What is being paid for.
        terms: OrderTerms,
    },
    /// Paid: the client may renew now (challenge → issue → installed).
    Ready {
        /// Opaque order id.
        order_id: String,
        /// What was paid for.
        terms: OrderTerms,
        /// The issue request must carry the order's renewal code (shown to the holder on
        /// the paid order page): ask the holder for it.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        renewal_code_required: bool,
    },
    /// A certificate was issued but its installation is not confirmed yet. Asking
    /// `issue` again with the same key returns the same certificate.
    Issued {
        /// Opaque order id.
        order_id: String,
        /// What was paid for.
        terms: OrderTerms,
        /// Serial of the issued, not yet confirmed certificate.
        certificate_serial_hex: String,
        /// As in `ready`: a repeat needs the renewal code too.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        renewal_code_required: bool,
    },
    /// Installation confirmed; the old certificate is revoked (superseded).
    Completed {
        /// Opaque order id.
        order_id: String,
        /// Serial of the renewed certificate.
        certificate_serial_hex: String,
    },
    /// The target algorithm cannot be done by this token: a new token is being mailed.
    RequiresNewKey {
        /// Opaque order id.
        order_id: String,
        /// What was paid for.
        terms: OrderTerms,
        /// Parcel tracking number of the new token.
        tracking_number: String,
    },
    /// Paid, and held for a reviewer's decision (an algorithm upgrade is reviewed
    /// before anything is issued): nothing to do but wait.
    UnderReview {
        /// Opaque order id.
        order_id: String,
        /// What was paid for.
        terms: OrderTerms,
    },
    /// The reviewer rejected the application.
    Rejected {
        /// Opaque order id.
        order_id: String,
        /// The reviewer's reason, as written by the reviewer.
        reason: String,
    },
}

impl RenewalStatus {
    /// The order id, unless the state is `none`.
    pub fn order_id(&self) -> Option<&str> {
        match self {
            RenewalStatus::None => None,
            RenewalStatus::AwaitingPayment { order_id, .. }
            | RenewalStatus::Ready { order_id, .. }
            | RenewalStatus::Issued { order_id, .. }
            | RenewalStatus::Completed { order_id, .. }
            | RenewalStatus::RequiresNewKey { order_id, .. }
            | RenewalStatus::UnderReview { order_id, .. }
            | RenewalStatus::Rejected { order_id, .. } => Some(order_id),
        }
    }
    /// The wire name of the state, e.g. `"awaiting_payment"`.
    pub fn state_name(&self) -> &'static str {
        match self {
            RenewalStatus::None => "none",
            RenewalStatus::AwaitingPayment { .. } => "awaiting_payment",
            RenewalStatus::Ready { .. } => "ready",
            RenewalStatus::Issued { .. } => "issued",
            RenewalStatus::Completed { .. } => "completed",
            RenewalStatus::RequiresNewKey { .. } => "requires_new_key",
            RenewalStatus::UnderReview { .. } => "under_review",
            RenewalStatus::Rejected { .. } => "rejected",
        }
    }
}

/// `POST /api/v1/orders/{order_id}/challenge` (empty body): a fresh single-use nonce.
/// Only orders in state `ready` or `issued` hand out challenges.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChallengeResponse {
    /// Identifies the challenge in [`IssueRequest::challenge_id`].
    pub challenge_id: String,
    /// 32 random bytes, base64.
    #[serde(with = "b64")]
    pub nonce: Vec<u8>,
    /// After this instant the challenge is refused (`challenge_expired`).
    #[serde(with = "time::serde::rfc3339")]
    pub expires_at: OffsetDateTime,
}

/// `POST /api/v1/orders/{order_id}/issue`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IssueRequest {
    /// From [`ChallengeResponse::challenge_id`]; consumed by a successful issue.
    pub challenge_id: String,
    /// Signature by the OLD certificate's key over [`challenge_signed_data`], base64.
    #[serde(with = "b64")]
    pub challenge_signature: Vec<u8>,
    /// Algorithm of `challenge_signature`; must fit the old certificate's key.
    pub signature_algorithm: SignatureAlgorithm,
    /// The certificate being renewed (DER, base64). Must be the order's certificate
    /// (issuer + serial) and chain to the portal's CA.
    #[serde(with = "b64")]
    pub old_certificate_der: Vec<u8>,
    /// PKCS#10 CSR signed by the new key (DER, base64). Its subject must equal the old
    /// certificate's; its key must fit the order's key policy and target algorithm.
    #[serde(with = "b64")]
    pub csr_der: Vec<u8>,
    /// The transport key: SubjectPublicKeyInfo DER (base64) of a key pair the token
    /// generated for this renewal only, RSA-2048 (unwraps with OAEP) or EC P-256
    /// (derives with ECDH), different from the CSR's and the old certificate's key. The
    /// escrowed encryption key's envelope is addressed to it. Required when the order
    /// includes an encryption certificate (`transport_key_invalid` otherwise), ignored
    /// when it does not. Covered by `challenge_signature`.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "b64_opt")]
    pub transport_key_spki: Option<Vec<u8>>,
    /// The order's renewal code, 8 digits (see [`RenewalStatus::Ready`]): required when
    /// the order has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub renewal_code: Option<String>,
}

/// A renewal code as the holder may type it ("1234 5678", "1234-5678") in its canonical
/// form, 8 digits not starting with 0 (so that it is also a CMP INTEGER); `None` when it
/// is not one.
pub fn canonical_renewal_code(typed: &str) -> Option<String> {
    let digits: String = typed
        .chars()
        .filter(|c| !c.is_whitespace() && *c != '-')
        .collect();
    (digits.len() == 8 && digits.bytes().all(|b| b.is_ascii_digit()) && !digits.starts_with('0'))
        .then_some(digits)
}

/// Answer to [`IssueRequest`]. Asking again with the same public key before completion
/// returns the same certificates (the envelope is made anew but holds the same key).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IssueResponse {
    /// The order.
    pub order_id: String,
    /// Canonical serial of `certificate_der`.
    pub certificate_serial_hex: String,
    /// The renewed signing certificate, DER.
    #[serde(with = "b64")]
    pub certificate_der: Vec<u8>,
    /// The issuing CA first, then any further CA certificates up to (not necessarily
    /// including) the root, DER.
    #[serde(with = "b64_vec")]
    pub chain_der: Vec<Vec<u8>>,
    /// Present when the order includes an encryption certificate.
    pub encryption: Option<EncryptionIssue>,
}

/// The escrowed encryption certificate and its private key, sealed for the token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EncryptionIssue {
    /// Canonical serial of `certificate_der`.
    pub certificate_serial_hex: String,
    /// The encryption certificate, DER.
    #[serde(with = "b64")]
    pub certificate_der: Vec<u8>,
    /// The encryption private key sealed to the request's transport key (RSA-2048 and
    /// EC-P256 orders).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub envelope: Option<KeyEnvelope>,
    /// The encryption private key as a GM/T 0009 `SM2EnvelopedKey` DER, encrypted to the
    /// new signing key (SM2 orders; see [`gm`]), base64.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "b64_opt")]
    pub gm_enveloped_key: Option<Vec<u8>>,
}

/// Envelope version 1: a PKCS#8 private key that only the token can open.
///
/// Addressed to the transport key of the issue request
/// ([`IssueRequest::transport_key_spki`]): a key pair the token generated for this
/// renewal only, so the signing key never decrypts or unwraps.
///
/// Opening on a token, RSA recipient (`key_transport.alg = "rsa_oaep_sha1"`):
/// 1. `C_UnwrapKey(CKM_RSA_PKCS_OAEP{hashAlg=SHA-1, mgf=MGF1-SHA1, source=data
///    specified, empty label}, transport private key, wrapped_key)` → a session
///    `CKK_AES` key of 32 bytes (`CKA_UNWRAP` true).
/// 2. `C_UnwrapKey(CKM_AES_KEY_WRAP_PAD, that AES key, wrapped_private_key)` →
///    `CKO_PRIVATE_KEY` of `private_key_algorithm` (token object, sensitive,
///    `CKA_DECRYPT`/`CKA_UNWRAP` for RSA, `CKA_DERIVE` for EC).
///
/// EC recipient (`"ecdh_p256"`): `C_DeriveKey(CKM_ECDH1_DERIVE{kdf = CKD_NULL, no
/// shared data, public data = ephemeral_public_key}, transport private key)` → session
/// `CKK_AES` key, `CKA_VALUE_LEN` 32; then step 2. (`CKD_NULL` because it is the one KDF
/// every token with ECDH has, SoftHSM2 2.6 included; both ends of the agreement are
/// keys made for this one envelope.)
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyEnvelope {
    /// Always 1.
    pub version: u32,
    /// SHA-256 of the recipient's SubjectPublicKeyInfo DER (the transport key), base64:
    /// lets the client check it opens the envelope with the right key.
    #[serde(with = "b64")]
    pub recipient_spki_sha256: Vec<u8>,
    /// How the AES-256 content-encryption key reaches the token.
    pub key_transport: KeyTransport,
    /// Always `"aes256_kwp"`: AES-256 key wrap with padding, RFC 5649
    /// (`CKM_AES_KEY_WRAP_PAD`, default IV `A65959A6`).
    pub content_wrap: String,
    /// Algorithm of the escrowed private key.
    pub private_key_algorithm: KeyAlgorithm,
    /// Always `"pkcs8"`: the wrapped plaintext is a PKCS#8 `PrivateKeyInfo` DER.
    pub private_key_format: String,
    /// RFC 5649 wrap of the PKCS#8 DER under the content-encryption key, base64.
    #[serde(with = "b64")]
    pub wrapped_private_key: Vec<u8>,
}

/// Content wrap identifier used in [`KeyEnvelope::content_wrap`].
pub const CONTENT_WRAP_AES256_KWP: &str = "aes256_kwp";
/// Private key format identifier used in [`KeyEnvelope::private_key_format`].
pub const PRIVATE_KEY_FORMAT_PKCS8: &str = "pkcs8";

/// Transport of the envelope's AES-256 key to the recipient key, tagged by `"alg"`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "alg", rename_all = "snake_case")]
pub enum KeyTransport {
    /// RSAES-OAEP, SHA-1, MGF1-SHA-1, empty label (the only OAEP SoftHSM 2.6.1 unwraps).
    RsaOaepSha1 {
        /// The 32-byte AES key encrypted to the recipient, base64.
        #[serde(with = "b64")]
        wrapped_key: Vec<u8>,
    },
    /// Ephemeral-static ECDH on P-256 without KDF (`CKD_NULL`): the 32-byte
    /// x-coordinate of the shared point IS the AES-256 key.
    EcdhP256 {
        /// Ephemeral public key, uncompressed SEC1 point (65 bytes, `04 || X || Y`),
        /// base64 (pass as `pPublicData` of `CK_ECDH1_DERIVE_PARAMS`).
        #[serde(with = "b64")]
        ephemeral_public_key: Vec<u8>,
    },
}

/// `POST /api/v1/orders/{order_id}/installed`: the renewed certificate is on the token
/// and works. Signed by the NEW key over [`installed_signed_data`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstalledRequest {
    /// Serial of the issued signing certificate now installed.
    pub certificate_serial_hex: String,
    /// Signature over [`installed_signed_data`], base64.
    #[serde(with = "b64")]
    pub signature: Vec<u8>,
    /// Algorithm of `signature`.
    pub signature_algorithm: SignatureAlgorithm,
}

/// Answer to [`InstalledRequest`] (also to a repeated, identical one).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstalledResponse {
    /// The order, now `completed`.
    pub order_id: String,
    /// Serials revoked (reason superseded) because of this renewal: the old signing
    /// certificate and, if the order named one, the old encryption certificate.
    pub revoked_serials_hex: Vec<String>,
}

/// Error body of every non-2xx answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{code}: {message}")]
pub struct ApiError {
    /// Stable, machine-readable.
    pub code: ErrorCode,
    /// Human-readable detail (English); do not parse.
    pub message: String,
}

impl ApiError {
    /// An error with the given code and message.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> ApiError {
        ApiError {
            code,
            message: message.into(),
        }
    }
}

macro_rules! error_codes {
    ($( $(#[$doc:meta])* $variant:ident = ($name:literal, $status:literal), )*) => {
        /// Stable error codes. Unknown codes from a newer server deserialise as
        /// [`ErrorCode::Unknown`].
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
        #[serde(rename_all = "snake_case")]
        pub enum ErrorCode {
            $( $(#[$doc])* #[serde(rename = $name)] $variant, )*
            /// A code this version does not know.
            #[serde(other)]
            Unknown,
        }
        impl ErrorCode {
            /// Every known code (not `Unknown`).
            pub const ALL: &'static [ErrorCode] = &[ $( ErrorCode::$variant, )* ];
            /// The wire name.
            pub fn as_str(self) -> &'static str {
                match self { $( ErrorCode::$variant => $name, )* ErrorCode::Unknown => "unknown" }
            }
            /// The HTTP status a server answers with.
            pub fn http_status(self) -> u16 {
                match self { $( ErrorCode::$variant => $status, )* ErrorCode::Unknown => 500 }
            }
        }
    };
}

error_codes! {
    /// The body is not valid JSON or does not match the schema.
    MalformedJson = ("malformed_json", 400),
    /// The body exceeds [`MAX_BODY_BYTES`].
    BodyTooLarge = ("body_too_large", 413),
    /// The body is not `application/json`.
    UnsupportedMediaType = ("unsupported_media_type", 415),
    /// A binary field is not valid base64.
    InvalidBase64 = ("invalid_base64", 400),
    /// A serial number is not hex.
    InvalidSerial = ("invalid_serial", 400),
    /// Neither `issuer_der` nor `issuer_dn`, or either is unparsable.
    InvalidIssuer = ("invalid_issuer", 400),
    /// `old_certificate_der` (or another certificate) is not a DER X.509 certificate.
    MalformedCertificate = ("malformed_certificate", 400),
    /// `csr_der` is not a DER PKCS#10 request.
    MalformedCsr = ("malformed_csr", 400),
    /// The CSR's self-signature does not verify.
    CsrSignatureInvalid = ("csr_signature_invalid", 400),
    /// The order includes an encryption certificate and the request carries no usable
    /// transport key (missing, unparsable, not RSA-2048+ or P-256, or the CSR's or the
    /// old certificate's key).
    TransportKeyInvalid = ("transport_key_invalid", 422),
    /// The CSR's subject differs from the old certificate's.
    SubjectMismatch = ("subject_mismatch", 422),
    /// A key or signature algorithm the portal does not support.
    UnsupportedAlgorithm = ("unsupported_algorithm", 422),
    /// The CSR's key is not the order's target algorithm.
    AlgorithmMismatch = ("algorithm_mismatch", 422),
    /// Key policy `new` with the old key, or `same` with another key.
    KeyPolicyViolation = ("key_policy_violation", 422),
    /// The old certificate is not the one the order renews (issuer/serial).
    CertificateMismatch = ("certificate_mismatch", 422),
    /// The old certificate does not chain to the portal's CA.
    CertificateNotTrusted = ("certificate_not_trusted", 422),
    /// The old certificate is revoked.
    CertificateRevoked = ("certificate_revoked", 422),
    /// No such order.
    OrderNotFound = ("order_not_found", 404),
    /// The order is not in a state that allows this (unpaid, rejected, new key
    /// mailed...). The message names the state.
    OrderNotReady = ("order_not_ready", 409),
    /// The order is completed; nothing more can be issued.
    OrderCompleted = ("order_completed", 409),
    /// No such challenge for this order.
    ChallengeNotFound = ("challenge_not_found", 404),
    /// The challenge expired; ask for a new one.
    ChallengeExpired = ("challenge_expired", 410),
    /// The challenge was already used.
    ChallengeUsed = ("challenge_used", 409),
    /// The challenge signature does not verify with the old certificate's key.
    ChallengeSignatureInvalid = ("challenge_signature_invalid", 403),
    /// `installed` names a certificate this order did not issue last.
    CertificateNotIssued = ("certificate_not_issued", 409),
    /// The installed signature does not verify with the issued certificate's key.
    InstalledSignatureInvalid = ("installed_signature_invalid", 403),
    /// The order was already completed with another certificate/key.
    AlreadyInstalled = ("already_installed", 409),
    /// Admin API: missing or wrong bearer token.
    Unauthorized = ("unauthorized", 401),
    /// Admin API: the order's state does not allow this change.
    InvalidTransition = ("invalid_transition", 409),
    /// The order needs its renewal code (shown on the paid order page) and the request
    /// carries none.
    RenewalCodeRequired = ("renewal_code_required", 403),
    /// The renewal code is wrong, or too many wrong codes were tried for this order
    /// (then only the CA's support can help).
    RenewalCodeInvalid = ("renewal_code_invalid", 403),
    /// Too many requests for this order or from this address: wait (`Retry-After`).
    RateLimited = ("rate_limited", 429),
    /// The request took longer than the portal allows (a slow body): nothing changed.
    RequestTimeout = ("request_timeout", 408),
    /// The portal holds no CA key of that key identifier (a CRL of another CA).
    CaKeyNotFound = ("ca_key_not_found", 404),
    /// Admin API: a field is out of range or missing.
    InvalidArgument = ("invalid_argument", 400),
    /// No such route.
    NotFound = ("not_found", 404),
    /// The route exists but not with this method.
    MethodNotAllowed = ("method_not_allowed", 405),
    /// A server-side failure; nothing was changed.
    Internal = ("internal", 500),
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

// ---- Admin API (bearer token from DATA/admin-token) ---------------------------------

/// State of a new order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InitialState {
    /// Not paid yet.
    #[default]
    AwaitingPayment,
    /// Already paid.
    Ready,
}

/// Admin: `POST /admin/v1/orders`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateOrderRequest {
    /// Serial of the certificate to renew, hex.
    pub serial_hex: String,
    /// Issuer Name DER, base64. Default: the portal CA's subject.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "b64_opt")]
    pub issuer_der: Option<Vec<u8>>,
    /// Issuer DN text. Default: the portal CA's subject.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issuer_dn: Option<String>,
    /// Validity years of the renewed certificate, 1..=10 (default 1).
    #[serde(default = "default_years")]
    pub years: u32,
    /// Default `awaiting_payment`.
    #[serde(default)]
    pub state: InitialState,
    /// Default `new`.
    #[serde(default = "default_key_policy")]
    pub key_policy: KeyPolicy,
    /// Default `false`.
    #[serde(default)]
    pub with_encryption_cert: bool,
    /// Default `RSA-2048`.
    #[serde(default = "default_algorithm")]
    pub target_algorithm: KeyAlgorithm,
    /// Serial of the holder's current encryption certificate, revoked on completion.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub old_encryption_serial_hex: Option<String>,
}

fn default_years() -> u32 {
    1
}
fn default_key_policy() -> KeyPolicy {
    KeyPolicy::New
}
fn default_algorithm() -> KeyAlgorithm {
    KeyAlgorithm::Rsa2048
}

/// Admin: `POST /admin/v1/orders/{order_id}/reject`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RejectRequest {
    /// Shown to the holder as written.
    pub reason: String,
}

/// Admin: `POST /admin/v1/orders/{order_id}/ship`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShipRequest {
    /// Parcel tracking number of the new token.
    pub tracking_number: String,
}

/// Admin view of an order (full detail; the admin has authenticated).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderView {
    /// Opaque order id.
    pub order_id: String,
    /// `awaiting_payment`, `ready`, `issued`, `completed`, `requires_new_key`, `rejected`.
    pub state: String,
    /// Issuer DN (display form).
    pub issuer_dn: String,
    /// Serial of the certificate being renewed.
    pub serial_hex: String,
    /// Commercial terms.
    pub terms: OrderTerms,
    /// Old encryption certificate revoked on completion, if any.
    pub old_encryption_serial_hex: Option<String>,
    /// Rejection reason.
    pub reject_reason: Option<String>,
    /// Tracking number of a mailed token.
    pub tracking_number: Option<String>,
    /// The renewal code the holder is shown on the paid order page (orders made while
    /// the portal requires codes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub renewal_code: Option<String>,
    /// Serial of the current issued signing certificate.
    pub issued_serial_hex: Option<String>,
    /// Serial of the current issued encryption certificate.
    pub issued_encryption_serial_hex: Option<String>,
    /// Subject of the issued certificate (known once issued).
    pub subject: Option<String>,
    /// Creation time.
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    /// Last change.
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: OffsetDateTime,
}

// ---- base64 serde helpers -------------------------------------------------------------

/// Serde adapter: `Vec<u8>` as standard padded base64.
pub mod b64 {
    use base64::Engine as _;
    use base64::engine::general_purpose::STANDARD;
    use serde::{Deserialize, Deserializer, Serializer};

    /// Serialises bytes as base64.
    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(bytes))
    }
    /// Deserialises base64 into bytes; an invalid string is a serde error naming it.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        STANDARD
            .decode(s.as_bytes())
            .map_err(|e| serde::de::Error::custom(format!("invalid base64: {e}")))
    }
}

/// Serde adapter: `Option<Vec<u8>>` as base64 or absent/null.
pub mod b64_opt {
    use base64::Engine as _;
    use base64::engine::general_purpose::STANDARD;
    use serde::{Deserialize, Deserializer, Serializer};

    /// Serialises optional bytes as base64 or null.
    pub fn serialize<S: Serializer>(bytes: &Option<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
        match bytes {
            Some(b) => s.serialize_str(&STANDARD.encode(b)),
            None => s.serialize_none(),
        }
    }
    /// Deserialises optional base64.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<u8>>, D::Error> {
        let s = <Option<std::borrow::Cow<'de, str>>>::deserialize(d)?;
        s.map(|s| {
            STANDARD
                .decode(s.as_bytes())
                .map_err(|e| serde::de::Error::custom(format!("invalid base64: {e}")))
        })
        .transpose()
    }
}

/// Serde adapter: `Vec<Vec<u8>>` as an array of base64 strings.
pub mod b64_vec {
    use base64::Engine as _;
    use base64::engine::general_purpose::STANDARD;
    use serde::ser::SerializeSeq;
    use serde::{Deserialize, Deserializer, Serializer};

    /// Serialises a list of byte strings.
    pub fn serialize<S: Serializer>(items: &[Vec<u8>], s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(items.len()))?;
        for item in items {
            seq.serialize_element(&STANDARD.encode(item))?;
        }
        seq.end()
    }
    /// Deserialises a list of base64 strings.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Vec<u8>>, D::Error> {
        let items = <Vec<String>>::deserialize(d)?;
        items
            .iter()
            .map(|s| {
                STANDARD
                    .decode(s.as_bytes())
                    .map_err(|e| serde::de::Error::custom(format!("invalid base64: {e}")))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serial_normalisation_matches_openssl_spelling() {
        assert_eq!(normalize_serial_hex("3a:5f").unwrap(), "3A5F");
        assert_eq!(normalize_serial_hex("0x00A1").unwrap(), "A1");
        assert_eq!(normalize_serial_hex("a12").unwrap(), "0A12");
        assert_eq!(normalize_serial_hex("0000").unwrap(), "00");
        assert!(normalize_serial_hex("xyz").is_err());
        assert!(normalize_serial_hex("").is_err());
        assert_eq!(serial_hex_from_bytes(&[0x00, 0x8f, 0x01]), "8F01");
    }

    #[test]
    fn status_json_shape_is_pinned() {
        let s = RenewalStatus::Ready {
            order_id: "ord_1".into(),
            terms: OrderTerms {
                years: 2,
                key_policy: KeyPolicy::Same,
                target_algorithm: KeyAlgorithm::EcP256,
                with_encryption_cert: true,
            },
            renewal_code_required: false,
        };
        let json = serde_json::to_value(&s).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"state": "ready", "order_id": "ord_1", "terms": {
                "years": 2, "key_policy": "same", "target_algorithm": "EC-P256",
                "with_encryption_cert": true}})
        );
        let none: RenewalStatus = serde_json::from_str(r#"{"state":"none"}"#).unwrap();
        assert_eq!(none, RenewalStatus::None);
    }

    #[test]
    fn error_codes_round_trip_and_unknown_is_tolerated() {
        for code in ErrorCode::ALL {
            let json = serde_json::to_string(code).unwrap();
            assert_eq!(json, format!("\"{}\"", code.as_str()));
            let back: ErrorCode = serde_json::from_str(&json).unwrap();
            assert_eq!(back, *code);
            assert!((400..600).contains(&code.http_status()));
        }
        let e: ApiError =
            serde_json::from_str(r#"{"code":"brand_new_code","message":"m"}"#).unwrap();
        assert_eq!(e.code, ErrorCode::Unknown);
    }

    #[test]
    fn signed_data_layout() {
        let sha = |b: &[u8]| aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, b);
        let d = challenge_signed_data("ord_x", &[7u8; 32], b"csr", None);
        assert!(d.starts_with(b"ukey-renew-v1\0ord_x\0"));
        assert_eq!(d.len(), 14 + 5 + 1 + 32 + 32);
        assert_eq!(&d[20..52], &[7u8; 32]);
        assert_eq!(&d[52..], sha(b"csr").as_ref());
        // A transport key is covered too, after the CSR.
        let t = challenge_signed_data("ord_x", &[7u8; 32], b"csr", Some(b"spki"));
        assert_eq!(&t[..d.len()], &d[..]);
        assert_eq!(&t[d.len()..], sha(b"spki").as_ref());
        assert_eq!(
            installed_signed_data("o", "0a:12"),
            b"ukey-renew-installed-v1\0o\x000A12".to_vec()
        );
    }

    #[test]
    fn base64_fields_reject_garbage() {
        let r: Result<ChallengeResponse, _> = serde_json::from_str(
            r#"{"challenge_id":"c","nonce":"!!!","expires_at":"2026-01-01T00:00:00Z"}"#,
        );
        assert!(r.unwrap_err().to_string().contains("invalid base64"));
    }

    #[test]
    fn every_error_code_is_in_the_openapi_document() {
        for code in ErrorCode::ALL {
            assert!(
                OPENAPI_YAML.contains(&format!("            - {}\n", code.as_str())),
                "{code} missing from openapi.yaml"
            );
        }
    }

    #[test]
    fn every_route_is_in_the_openapi_document() {
        for p in paths::ALL {
            assert!(
                OPENAPI_YAML.contains(&format!("\n  {p}:")),
                "{p} missing from openapi.yaml"
            );
        }
    }
}
