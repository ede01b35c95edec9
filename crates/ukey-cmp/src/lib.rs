//! CMP (RFC 4210, as profiled by RFC 9483 "lightweight CMP") for renewing a certificate
//! (issue 15), first part: the client's messages. A key update request (`kur`, or a
//! `cr` for CAs without KUR) protected by the old key, with the new key's proof of
//! possession; the checks of every answer (transactionID, recipNonce, the signature
//! protection by a certificate the caller trusts, the PKIStatus); and the `certConf`
//! that follows a written and tested certificate, with the `pkiConf` that ends it.
//!
//! The ASN.1 types are RustCrypto's `cmpv2` and `crmf`; protection, the checks and the
//! state are ours. Keys sign through [`CmpSigner`], so a token's key (PKCS#11, SKF) can
//! protect a message without leaving the token.

use std::time::SystemTime;

use cmpv2::body::PkiBody;
use cmpv2::header::{PkiHeader, Pvno};
use cmpv2::status::{CertStatus, PkiStatus};
use crmf::controls::CertId;
use crmf::pop::{PopoSigningKey, ProofOfPossession};
use crmf::request::{CertReqMsg, CertRequest, CertTemplate};
use der::asn1::{Any, AnyRef, BitString, GeneralizedTime, Int, OctetString};
use der::{Decode, Encode, Sequence, Tag, TagNumber, Tagged};
use spki::{AlgorithmIdentifierOwned, ObjectIdentifier, SubjectPublicKeyInfoOwned};
use x509_cert_02::Certificate;
use x509_cert_02::attr::AttributeTypeAndValue;
use x509_cert_02::ext::pkix::name::GeneralName;

pub mod server;

/// The `der` and `spki` versions of this crate's types (for [`CmpSigner`] implementors).
pub use {der, spki};

/// `ecdsa-with-SHA256`.
pub const ECDSA_WITH_SHA256: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.4.3.2");
/// `sha256WithRSAEncryption`.
pub const SHA256_WITH_RSA: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.11");
/// `SM2-with-SM3` (GM/T 0006), signed with the GM/T 0009 default ID.
pub const SM2_WITH_SM3: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.156.10197.1.501");
/// The SM2 curve (`sm2p256v1`), an EC key's parameters.
const SM2_CURVE: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.156.10197.1.301");
/// `id-ecPublicKey`.
const EC_PUBLIC_KEY: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.2.1");
/// `rsaEncryption`.
const RSA_ENCRYPTION: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.1");
/// `id-regCtrl-oldCertID` (RFC 4211 §6.5): the certificate a KUR updates.
pub const OLD_CERT_ID: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.6.1.5.5.7.5.1.5");

/// What goes wrong with a CMP exchange.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CmpError {
    /// A message or certificate is not the DER it must be.
    #[error("malformed CMP data: {0}")]
    Malformed(String),
    /// The answer belongs to another transaction.
    #[error("the answer's transactionID is not this transaction's")]
    WrongTransaction,
    /// The answer does not answer our message.
    #[error("the answer's recipNonce is not the nonce we sent")]
    WrongNonce,
    /// The answer is unprotected, or its protection does not verify.
    #[error("the answer's protection is missing or does not verify: {0}")]
    Protection(String),
    /// The protecting certificate is not trusted.
    #[error("the answer is protected by a certificate we do not trust: {0}")]
    Untrusted(String),
    /// A key could not sign.
    #[error("signing failed: {0}")]
    Signing(String),
    /// The answer is of a kind not expected here.
    #[error("unexpected CMP answer: {0}")]
    Unexpected(String),
}

/// Result of this crate.
pub type Result<T, E = CmpError> = std::result::Result<T, E>;

pub(crate) fn malformed(e: impl std::fmt::Display) -> CmpError {
    CmpError::Malformed(e.to_string())
}

/// A key that signs CMP data (message protection, proof of possession): on a token or
/// in software.
pub trait CmpSigner {
    /// The signature algorithm (with its parameters) the key signs with.
    fn algorithm(&self) -> AlgorithmIdentifierOwned;
    /// Signs `data`; returns the signature as X.509 carries it (DER for ECDSA).
    fn sign(&self, data: &[u8]) -> Result<Vec<u8>>;
}

/// Whether a SubjectPublicKeyInfo is an SM2 key (id-ecPublicKey on the SM2 curve, or
/// the SM2 OID itself as some writers put it).
fn is_sm2(spki: &SubjectPublicKeyInfoOwned) -> bool {
    spki.algorithm.oid == SM2_CURVE
        || (spki.algorithm.oid == EC_PUBLIC_KEY
            && spki
                .algorithm
                .parameters
                .as_ref()
                .and_then(|p| p.decode_as::<ObjectIdentifier>().ok())
                == Some(SM2_CURVE))
}

/// The signature algorithm for a key, from its SubjectPublicKeyInfo: SM2-with-SM3 for an
/// SM2 key, ECDSA with SHA-256 for another EC key, RSA PKCS#1 v1.5 with SHA-256 for an
/// RSA key.
pub fn signature_algorithm(spki_der: &[u8]) -> Result<AlgorithmIdentifierOwned> {
    let spki = SubjectPublicKeyInfoOwned::from_der(spki_der).map_err(malformed)?;
    if is_sm2(&spki) {
        return Ok(AlgorithmIdentifierOwned {
            oid: SM2_WITH_SM3,
            parameters: None,
        });
    }
    match spki.algorithm.oid {
        EC_PUBLIC_KEY => Ok(AlgorithmIdentifierOwned {
            oid: ECDSA_WITH_SHA256,
            parameters: None,
        }),
        RSA_ENCRYPTION => Ok(AlgorithmIdentifierOwned {
            oid: SHA256_WITH_RSA,
            parameters: Some(Any::from(der::asn1::Null)),
        }),
        other => Err(CmpError::Unexpected(format!("key algorithm {other}"))),
    }
}

/// Verifies `signature` over `data` with the key `spki_der` and the algorithm `alg`
/// (SM2-with-SM3: a DER signature with Z for the GM/T 0009 default ID).
pub fn verify(
    spki_der: &[u8],
    alg: &AlgorithmIdentifierOwned,
    data: &[u8],
    signature: &[u8],
) -> bool {
    use aws_lc_rs::signature::{
        ECDSA_P256_SHA256_ASN1, RSA_PKCS1_2048_8192_SHA256, UnparsedPublicKey,
    };
    let Ok(spki) = SubjectPublicKeyInfoOwned::from_der(spki_der) else {
        return false;
    };
    let key = spki.subject_public_key.raw_bytes();
    match alg.oid {
        ECDSA_WITH_SHA256 => UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, key)
            .verify(data, signature)
            .is_ok(),
        SHA256_WITH_RSA => UnparsedPublicKey::new(&RSA_PKCS1_2048_8192_SHA256, key)
            .verify(data, signature)
            .is_ok(),
        SM2_WITH_SM3 => {
            is_sm2(&spki) && ukey_trust::gm::verify(ukey_trust::gm::GM_DISTID, key, data, signature)
        }
        _ => false,
    }
}

/// The identifiers that tie a CMP transaction together: ours, checked on every answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transaction {
    /// `transactionID`, fresh per transaction (16 random bytes).
    pub id: Vec<u8>,
    /// Our `senderNonce` in the last message we sent.
    pub sender_nonce: Vec<u8>,
    /// The server's `senderNonce` in its last answer: our next `recipNonce`.
    pub recip_nonce: Option<Vec<u8>>,
    /// Seconds added to this computer's clock for messageTime (0, unless the clock's
    /// offset from the CA's is known).
    pub clock_offset_secs: i64,
}

pub(crate) fn random16() -> Result<Vec<u8>> {
    let mut b = vec![0u8; 16];
    aws_lc_rs::rand::SecureRandom::fill(&aws_lc_rs::rand::SystemRandom::new(), &mut b)
        .map_err(|_| CmpError::Signing("no random numbers".into()))?;
    Ok(b)
}

impl Transaction {
    /// A new transaction: a fresh transactionID and nonce.
    pub fn new() -> Result<Transaction> {
        Ok(Transaction {
            id: random16()?,
            sender_nonce: random16()?,
            recip_nonce: None,
            clock_offset_secs: 0,
        })
    }
}

/// Which request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestKind {
    /// `kur`: key update, naming the old certificate (RFC 9483 §4.1.3).
    KeyUpdate,
    /// `cr`: a certificate request protected by the old certificate (RFC 9483 §4.1.2),
    /// for CAs without KUR.
    Certification,
}

fn header(
    old: &Certificate,
    protect: &dyn CmpSigner,
    tx: &Transaction,
) -> Result<PkiHeader<'static>> {
    let since = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_err(malformed)?;
    // Whole seconds: DER GeneralizedTime here carries no fraction.
    let secs = since.as_secs().saturating_add_signed(tx.clock_offset_secs);
    let now = GeneralizedTime::from_unix_duration(std::time::Duration::from_secs(secs))
        .map_err(malformed)?;
    Ok(PkiHeader {
        pvno: Pvno::Cmp2000,
        sender: GeneralName::DirectoryName(old.tbs_certificate.subject.clone()),
        recipient: GeneralName::DirectoryName(old.tbs_certificate.issuer.clone()),
        message_time: Some(now),
        protection_alg: Some(protect.algorithm()),
        sender_kid: None,
        recip_kid: None,
        trans_id: Some(OctetString::new(tx.id.clone()).map_err(malformed)?),
        sender_nonce: Some(OctetString::new(tx.sender_nonce.clone()).map_err(malformed)?),
        recip_nonce: tx
            .recip_nonce
            .clone()
            .map(OctetString::new)
            .transpose()
            .map_err(malformed)?,
        free_text: None,
        general_info: None,
    })
}

/// `PKIMessage` with its body kept as the CHOICE's bytes: `cmpv2` 0.2 types `pollReq`
/// and `pollRep` as one structure where RFC 4210 has a SEQUENCE OF, so bodies are
/// encoded and read here by their tag.
#[derive(Sequence)]
pub(crate) struct RawMessage<'a> {
    pub(crate) header: PkiHeader<'a>,
    pub(crate) body: AnyRef<'a>,
    #[asn1(context_specific = "0", tag_mode = "EXPLICIT", optional = "true")]
    pub(crate) protection: Option<BitString>,
    #[asn1(context_specific = "1", tag_mode = "EXPLICIT", optional = "true")]
    pub(crate) extra_certs: Option<Vec<Certificate>>,
}

/// `ProtectedPart`: what the protection signs.
#[derive(Sequence)]
pub(crate) struct RawProtectedPart<'a> {
    pub(crate) header: PkiHeader<'a>,
    pub(crate) body: AnyRef<'a>,
}

/// Body tags (RFC 4210 §5.1.2).
pub(crate) mod body_tag {
    pub const IR: u8 = 0;
    pub const IP: u8 = 1;
    pub const CR: u8 = 2;
    pub const CP: u8 = 3;
    pub const KUR: u8 = 7;
    pub const KUP: u8 = 8;
    pub const PKI_CONF: u8 = 19;
    pub const ERROR: u8 = 23;
    pub const CERT_CONF: u8 = 24;
    pub const POLL_REQ: u8 = 25;
    pub const POLL_REP: u8 = 26;
}

pub(crate) fn body_tag_number(body: &AnyRef<'_>) -> Option<u8> {
    match body.tag() {
        Tag::ContextSpecific { number, .. } => Some(number.value()),
        _ => None,
    }
}

/// `pollReq` / `pollRep` items as RFC 4210 §5.3.22 has them.
#[derive(Sequence)]
pub(crate) struct PollReqItem {
    pub(crate) cert_req_id: Int,
}

#[derive(Sequence)]
pub(crate) struct PollRepItem<'a> {
    pub(crate) cert_req_id: Int,
    pub(crate) check_after: u64,
    pub(crate) reason: Option<cmpv2::header::PkiFreeText<'a>>,
}

/// `PKIStatusInfo` with the failure bits kept as a BIT STRING: `cmpv2` 0.2 types
/// `failInfo` as a 16-bit flag set whose values are not the RFC's bit numbers.
#[derive(Sequence)]
pub(crate) struct StatusInfo<'a> {
    pub(crate) status: PkiStatus,
    pub(crate) status_string: Option<cmpv2::header::PkiFreeText<'a>>,
    pub(crate) fail_info: Option<BitString>,
}

/// `CertResponse` (RFC 4210 §5.3.4) over [`StatusInfo`].
#[derive(Sequence)]
pub(crate) struct CertResp<'a> {
    pub(crate) cert_req_id: Int,
    pub(crate) status: StatusInfo<'a>,
    pub(crate) certified_key_pair: Option<cmpv2::certified_key_pair::CertifiedKeyPair>,
    pub(crate) rsp_info: Option<OctetString>,
}

/// `CertRepMessage` (ip, cp, kup) over [`CertResp`].
#[derive(Sequence)]
pub(crate) struct CertRep<'a> {
    #[asn1(
        context_specific = "1",
        tag_mode = "EXPLICIT",
        constructed = "true",
        optional = "true"
    )]
    pub(crate) ca_pubs: Option<Vec<Certificate>>,
    pub(crate) response: Vec<CertResp<'a>>,
}

/// Wraps a body's content in its CHOICE tag (`[n]`, explicit).
pub(crate) fn tagged_body(tag: u8, inner: Vec<u8>) -> Result<Vec<u8>> {
    let tag = Tag::ContextSpecific {
        constructed: true,
        number: TagNumber::new(tag),
    };
    Any::new(tag, inner)
        .map_err(malformed)?
        .to_der()
        .map_err(malformed)
}

/// Signs header + body (the body's DER, a tagged CHOICE) and assembles the message with
/// the old certificate in `extraCerts` (the server checks the protection with it).
fn protected(
    header: PkiHeader<'_>,
    body_der: &[u8],
    protect: &dyn CmpSigner,
    old: &Certificate,
) -> Result<Vec<u8>> {
    let body = AnyRef::from_der(body_der).map_err(malformed)?;
    let part = RawProtectedPart {
        header: header.clone(),
        body,
    };
    let signature = protect.sign(&part.to_der().map_err(malformed)?)?;
    RawMessage {
        header,
        body,
        protection: Some(BitString::from_bytes(&signature).map_err(malformed)?),
        extra_certs: Some(vec![old.clone()]),
    }
    .to_der()
    .map_err(malformed)
}

/// A `pollReq` for the request `cert_req_id`, while the CA says "waiting".
pub fn poll_req(
    old_cert_der: &[u8],
    cert_req_id: &[u8],
    protect: &dyn CmpSigner,
    tx: &mut Transaction,
) -> Result<Vec<u8>> {
    let old = Certificate::from_der(old_cert_der).map_err(malformed)?;
    tx.sender_nonce = random16()?;
    let items = vec![PollReqItem {
        cert_req_id: Int::new(cert_req_id).map_err(malformed)?,
    }];
    let body = tagged_body(body_tag::POLL_REQ, items.to_der().map_err(malformed)?)?;
    protected(header(&old, protect, tx)?, &body, protect, &old)
}

/// A key update (or certification) request for the key `new_spki_der`, renewing the
/// certificate `old_cert_der`: protected by `protect` (the old key), with the proof of
/// possession signed by `pop` (the new key; the old one for a same-key renewal).
pub fn request(
    kind: RequestKind,
    old_cert_der: &[u8],
    new_spki_der: &[u8],
    protect: &dyn CmpSigner,
    pop: &dyn CmpSigner,
    tx: &Transaction,
) -> Result<Vec<u8>> {
    request_with_code(kind, old_cert_der, new_spki_der, protect, pop, tx, None)
}

/// [`request`] carrying the order's renewal code in generalInfo
/// ([`server::RENEWAL_CODE`], an INTEGER).
pub fn request_with_code(
    kind: RequestKind,
    old_cert_der: &[u8],
    new_spki_der: &[u8],
    protect: &dyn CmpSigner,
    pop: &dyn CmpSigner,
    tx: &Transaction,
    renewal_code: Option<u64>,
) -> Result<Vec<u8>> {
    let old = Certificate::from_der(old_cert_der).map_err(malformed)?;
    let controls = match kind {
        RequestKind::KeyUpdate => {
            let id = CertId {
                issuer: GeneralName::DirectoryName(old.tbs_certificate.issuer.clone()),
                serial_number: old.tbs_certificate.serial_number.clone(),
            };
            Some(vec![AttributeTypeAndValue {
                oid: OLD_CERT_ID,
                value: Any::encode_from(&id).map_err(malformed)?,
            }])
        }
        RequestKind::Certification => None,
    };
    let cert_req = CertRequest {
        cert_req_id: Int::new(&[0]).map_err(malformed)?,
        cert_template: CertTemplate {
            version: None,
            serial_number: None,
            signature: None,
            issuer: None,
            validity: None,
            subject: Some(old.tbs_certificate.subject.clone()),
            subject_public_key_info: Some(
                SubjectPublicKeyInfoOwned::from_der(new_spki_der).map_err(malformed)?,
            ),
            issuer_unique_id: None,
            subject_unique_id: None,
            extensions: None,
        },
        controls,
    };
    let pop_signature = pop.sign(&cert_req.to_der().map_err(malformed)?)?;
    let msg = CertReqMsg {
        cert_req,
        popo: Some(ProofOfPossession::Signature(Box::new(PopoSigningKey {
            poposk_input: None,
            alg_id: pop.algorithm(),
            signature: BitString::from_bytes(&pop_signature).map_err(malformed)?,
        }))),
        reg_info: None,
    };
    let body = match kind {
        RequestKind::KeyUpdate => PkiBody::KUr(vec![msg]),
        RequestKind::Certification => PkiBody::Cr(vec![msg]),
    };
    let mut header = header(&old, protect, tx)?;
    if let Some(code) = renewal_code {
        header.general_info = Some(vec![cmpv2::r#gen::InfoTypeAndValue {
            oid: server::RENEWAL_CODE,
            value: Some(Any::encode_from(&code).map_err(malformed)?),
        }]);
    }
    protected(header, &body.to_der().map_err(malformed)?, protect, &old)
}

/// What a CA answered a request with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// A certificate (accepted or granted with modifications).
    Issued {
        /// The certificate, DER.
        cert_der: Vec<u8>,
        /// Its request id, for `certConf`.
        cert_req_id: Vec<u8>,
        /// CA certificates the answer carried (`caPubs`), DER.
        ca_certs: Vec<Vec<u8>>,
    },
    /// Not decided yet (a review): poll again after `check_after` seconds (when the CA
    /// says) with [`poll_req`].
    Waiting {
        /// Seconds to wait, from a `pollRep`.
        check_after: Option<u64>,
        /// The CA's text.
        text: String,
    },
    /// The request refused, with the CA's reason (`statusString` of a rejection).
    Rejected {
        /// The CA's text.
        text: String,
    },
    /// An error message: the CA could not process the message (a protocol error, an
    /// unknown transaction, a failure on its side), with its text.
    Error {
        /// The CA's text, details and error code.
        text: String,
    },
}

/// `ErrorMsgContent`, read here because `cmpv2` 0.2 keeps its fields private.
#[derive(Sequence)]
pub(crate) struct ErrorMsg<'a> {
    pub(crate) status: StatusInfo<'a>,
    pub(crate) error_code: Option<u64>,
    pub(crate) error_details: Option<cmpv2::header::PkiFreeText<'a>>,
}

pub(crate) fn free_text(t: &Option<cmpv2::header::PkiFreeText<'_>>) -> String {
    t.as_ref()
        .map(|v| v.iter().map(|s| s.as_str()).collect::<Vec<_>>().join("; "))
        .unwrap_or_default()
}

/// The PKIFailureInfo names (RFC 4210 §5.2.3), by bit.
const FAILURE_NAMES: [&str; 27] = [
    "badAlg",
    "badMessageCheck",
    "badRequest",
    "badTime",
    "badCertId",
    "badDataFormat",
    "wrongAuthority",
    "incorrectData",
    "missingTimeStamp",
    "badPOP",
    "certRevoked",
    "certConfirmed",
    "wrongIntegrity",
    "badRecipientNonce",
    "timeNotAvailable",
    "unacceptedPolicy",
    "unacceptedExtension",
    "addInfoNotAvailable",
    "badSenderNonce",
    "badCertTemplate",
    "signerNotTrusted",
    "transactionIdInUse",
    "unsupportedVersion",
    "notAuthorized",
    "systemUnavail",
    "systemFailure",
    "duplicateCertReq",
];

/// The CA's text with the failure bits it set, named (support staff read both).
fn with_failure(text: String, bits: &Option<BitString>) -> String {
    let Some(bits) = bits else { return text };
    let names: Vec<&str> = bits
        .raw_bytes()
        .iter()
        .enumerate()
        .flat_map(|(i, byte)| {
            (0..8).filter_map(move |b| (byte & (0x80 >> b) != 0).then_some(i * 8 + b))
        })
        .map(|n| FAILURE_NAMES.get(n).copied().unwrap_or("unknown"))
        .collect();
    if names.is_empty() {
        text
    } else {
        format!("{text} [{}]", names.join(", "))
    }
}

/// Decides whether a protecting certificate is trusted: given it and the answer's other
/// extra certificates (DER), `Ok` when it chains to the caller's trust anchors.
pub type TrustCheck<'a> = &'a dyn Fn(&[u8], &[Vec<u8>]) -> Result<()>;

/// An answer whose transaction, nonce and protection [`check_answer`] checked.
#[derive(Debug)]
pub struct Checked<'a> {
    body: AnyRef<'a>,
    implicit_confirm: bool,
}

impl Checked<'_> {
    /// Whether the CA granted implicit confirmation (no certConf is to be sent).
    pub fn implicit_confirm(&self) -> bool {
        self.implicit_confirm
    }
}

/// Checks an answer to `tx` and reads it: the transactionID and recipNonce are ours,
/// the protection is a signature by `extraCerts[0]`, which `trust` accepts (given the
/// certificate and the other extra certificates, DER). Records the server's nonce in
/// `tx` for the next message.
pub fn check_answer<'a>(
    der: &'a [u8],
    tx: &mut Transaction,
    trust: TrustCheck<'_>,
) -> Result<Checked<'a>> {
    let msg = RawMessage::from_der(der).map_err(malformed)?;
    let h = &msg.header;
    if h.trans_id.as_ref().map(|o| o.as_bytes()) != Some(tx.id.as_slice()) {
        return Err(CmpError::WrongTransaction);
    }
    if h.recip_nonce.as_ref().map(|o| o.as_bytes()) != Some(tx.sender_nonce.as_slice()) {
        return Err(CmpError::WrongNonce);
    }
    let (Some(protection), Some(alg)) = (&msg.protection, &h.protection_alg) else {
        return Err(CmpError::Protection("the answer is not protected".into()));
    };
    let extra: Vec<Vec<u8>> = msg
        .extra_certs
        .iter()
        .flatten()
        .map(|c| c.to_der().map_err(malformed))
        .collect::<Result<_>>()?;
    let Some(signer) = extra.first() else {
        return Err(CmpError::Protection(
            "no certificate in extraCerts to check the protection with".into(),
        ));
    };
    let signer_cert = Certificate::from_der(signer).map_err(malformed)?;
    let spki = signer_cert
        .tbs_certificate
        .subject_public_key_info
        .to_der()
        .map_err(malformed)?;
    let part = RawProtectedPart {
        header: msg.header.clone(),
        body: msg.body,
    }
    .to_der()
    .map_err(malformed)?;
    if !verify(&spki, alg, &part, protection.raw_bytes()) {
        return Err(CmpError::Protection("the signature does not verify".into()));
    }
    trust(signer, &extra[1..]).map_err(|e| match e {
        CmpError::Untrusted(_) => e,
        other => CmpError::Untrusted(other.to_string()),
    })?;
    tx.recip_nonce = h.sender_nonce.as_ref().map(|o| o.as_bytes().to_vec());
    let implicit_confirm = h
        .general_info
        .iter()
        .flatten()
        .any(|i| i.oid == server::IMPLICIT_CONFIRM);
    Ok(Checked {
        body: msg.body,
        implicit_confirm,
    })
}

/// Reads the answer to a request or a `pollReq` (after [`check_answer`]).
pub fn answer(msg: &Checked<'_>) -> Result<Answer> {
    let inner = msg.body.value();
    let rep = match body_tag_number(&msg.body) {
        Some(body_tag::IP | body_tag::CP | body_tag::KUP) => {
            CertRep::from_der(inner).map_err(malformed)?
        }
        Some(body_tag::ERROR) => {
            let e = ErrorMsg::from_der(inner).map_err(malformed)?;
            let mut text = with_failure(free_text(&e.status.status_string), &e.status.fail_info);
            let details = free_text(&e.error_details);
            if !details.is_empty() {
                text = format!("{text} ({details})");
            }
            if let Some(code) = e.error_code {
                text = format!("{text} [error code {code}]");
            }
            return Ok(Answer::Error { text });
        }
        Some(body_tag::POLL_REP) => {
            let items = Vec::<PollRepItem<'_>>::from_der(inner).map_err(malformed)?;
            let first = items
                .first()
                .ok_or_else(|| CmpError::Unexpected("an empty pollRep".into()))?;
            return Ok(Answer::Waiting {
                check_after: Some(first.check_after),
                text: free_text(&first.reason),
            });
        }
        other => {
            return Err(CmpError::Unexpected(format!(
                "a body [{}] where a certificate response was expected",
                other.map_or("?".to_owned(), |n| n.to_string())
            )));
        }
    };
    let Some(r) = rep.response.first() else {
        return Err(CmpError::Unexpected(
            "a response with no certificate response".into(),
        ));
    };
    let text = free_text(&r.status.status_string);
    match r.status.status {
        PkiStatus::Accepted | PkiStatus::GrantedWithMods => {
            let Some(pair) = &r.certified_key_pair else {
                return Err(CmpError::Unexpected(
                    "accepted without a certificate".into(),
                ));
            };
            let cmpv2::certified_key_pair::CertOrEncCert::Certificate(cert) =
                &pair.cert_or_enc_cert
            else {
                return Err(CmpError::Unexpected("an encrypted certificate".into()));
            };
            Ok(Answer::Issued {
                cert_der: cert.to_der().map_err(malformed)?,
                cert_req_id: r.cert_req_id.as_bytes().to_vec(),
                ca_certs: rep
                    .ca_pubs
                    .iter()
                    .flatten()
                    .map(|c| c.to_der().map_err(malformed))
                    .collect::<Result<_>>()?,
            })
        }
        PkiStatus::Waiting => Ok(Answer::Waiting {
            check_after: None,
            text,
        }),
        PkiStatus::Rejection => Ok(Answer::Rejected {
            text: with_failure(text, &r.status.fail_info),
        }),
        other => Err(CmpError::Unexpected(format!("PKIStatus {other:?}"))),
    }
}

/// The `certConf` for a certificate written and self-tested: its SHA-256 hash (the
/// hash of the signature algorithms this crate uses), protected by `protect`, with a
/// fresh nonce and the server's as recipNonce.
pub fn cert_conf(
    old_cert_der: &[u8],
    cert_der: &[u8],
    cert_req_id: &[u8],
    protect: &dyn CmpSigner,
    tx: &mut Transaction,
) -> Result<Vec<u8>> {
    let old = Certificate::from_der(old_cert_der).map_err(malformed)?;
    tx.sender_nonce = random16()?;
    let status = CertStatus {
        cert_hash: OctetString::new(server::cert_hash(cert_der)).map_err(malformed)?,
        cert_req_id: Int::new(cert_req_id).map_err(malformed)?,
        status_info: None,
    };
    protected(
        header(&old, protect, tx)?,
        &PkiBody::CertConf(vec![status])
            .to_der()
            .map_err(malformed)?,
        protect,
        &old,
    )
}

/// Is the answer the `pkiConf` that ends a transaction (after [`check_answer`])?
pub fn is_pki_conf(msg: &Checked<'_>) -> bool {
    body_tag_number(&msg.body) == Some(body_tag::PKI_CONF)
}

#[cfg(test)]
mod tests {
    use super::*;
    use server::Failure;

    #[test]
    fn failure_bits_are_named_as_rfc_4210_numbers_them() {
        for (f, name) in [
            (Failure::BadAlg, "badAlg"),
            (Failure::BadTime, "badTime"),
            (Failure::BadPop, "badPOP"),
            (Failure::BadRecipientNonce, "badRecipientNonce"),
            (Failure::TransactionIdInUse, "transactionIdInUse"),
            (Failure::SystemFailure, "systemFailure"),
        ] {
            let bits = f.bits().expect("bits");
            let text = with_failure("refused".into(), &Some(bits));
            assert_eq!(text, format!("refused [{name}]"));
        }
        assert_eq!(with_failure("t".into(), &None), "t");
    }
}
