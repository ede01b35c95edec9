//! The CA side of the same messages: reading a client's request (kur, cr, ir, certConf,
//! pollReq) with its protection and proof of possession checked, and writing the
//! protected answers (ip/cp/kup, pollRep, pkiConf, error). What to answer (orders,
//! freshness, issuance) is the caller's: this module knows the messages only.

use cmpv2::header::{PkiHeader, Pvno};
use cmpv2::status::PkiStatus;
use crmf::pop::ProofOfPossession;
use crmf::request::CertReqMsg;
use der::asn1::{BitString, GeneralizedTime, Int, Null, OctetString, Utf8StringRef};
use der::{Decode, Encode};
use spki::ObjectIdentifier;
use x509_cert_02::Certificate;
use x509_cert_02::ext::pkix::name::GeneralName;

use crate::{
    CertRep, CertResp, CmpError, CmpSigner, ErrorMsg, OLD_CERT_ID, PollRepItem, PollReqItem,
    RawMessage, RawProtectedPart, Result, StatusInfo, body_tag, body_tag_number, malformed,
    tagged_body, verify,
};

/// `id-it-implicitConfirm` (RFC 4210 §5.1.1.1).
pub const IMPLICIT_CONFIRM: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.6.1.5.5.7.4.13");

/// The generalInfo entry that carries an order's renewal code, an INTEGER (8 digits):
/// `openssl cmp -geninfo 1.3.6.1.4.1.32473.1.16:int:12345678` sends it. The arc is RFC
/// 5612's enterprise number for documentation (32473): a CA deploying this uses an OID
/// of its own arc.
pub const RENEWAL_CODE: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.6.1.4.1.32473.1.16");

/// PKIFailureInfo bits (RFC 4210 §5.2.3) a CA answers with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Failure {
    /// `badAlg`: an unsupported protection or proof-of-possession algorithm.
    BadAlg = 0,
    /// `badMessageCheck`: the protection is missing or does not verify.
    BadMessageCheck = 1,
    /// `badRequest`: the request is not one this CA serves.
    BadRequest = 2,
    /// `badTime`: messageTime missing or too far from the CA's clock.
    BadTime = 3,
    /// `badCertId`: oldCertID does not name the protecting certificate.
    BadCertId = 4,
    /// `badDataFormat`: not a DER PKIMessage.
    BadDataFormat = 5,
    /// `incorrectData`: the request's data contradicts the order.
    IncorrectData = 7,
    /// `badPOP`: the proof of possession does not verify.
    BadPop = 9,
    /// `certRevoked`: the protecting certificate is revoked.
    CertRevoked = 10,
    /// `badRecipientNonce`: recipNonce is not the CA's last nonce.
    BadRecipientNonce = 13,
    /// `badSenderNonce`: senderNonce missing or seen before.
    BadSenderNonce = 18,
    /// `badCertTemplate`: subject or key not acceptable.
    BadCertTemplate = 19,
    /// `signerNotTrusted`: the protecting certificate is not this CA's.
    SignerNotTrusted = 20,
    /// `transactionIdInUse`: a new request reuses a transactionID.
    TransactionIdInUse = 21,
    /// `unsupportedVersion`: pvno is not 2.
    UnsupportedVersion = 22,
    /// `notAuthorized`: no order allows this request.
    NotAuthorized = 23,
    /// `systemFailure`.
    SystemFailure = 25,
}

impl Failure {
    /// The BIT STRING of this one named bit (DER: trailing zero bits dropped).
    pub(crate) fn bits(self) -> Result<BitString> {
        let n = self as usize;
        let mut bytes = vec![0u8; n / 8 + 1];
        bytes[n / 8] = 0x80 >> (n % 8);
        BitString::new((7 - n % 8) as u8, bytes).map_err(malformed)
    }
}

/// A CA's refusal: the failure bit and the text shown to the holder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// PKIFailureInfo.
    pub failure: Failure,
    /// statusString.
    pub text: String,
}

impl Refusal {
    /// A refusal.
    pub fn new(failure: Failure, text: impl Into<String>) -> Refusal {
        Refusal {
            failure,
            text: text.into(),
        }
    }
}

/// A certificate request body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CertReqKind {
    /// `ir`, answered with `ip`.
    Initialization,
    /// `cr`, answered with `cp`.
    Certification,
    /// `kur`, answered with `kup`.
    KeyUpdate,
}

impl CertReqKind {
    fn answer_tag(self) -> u8 {
        match self {
            CertReqKind::Initialization => body_tag::IP,
            CertReqKind::Certification => body_tag::CP,
            CertReqKind::KeyUpdate => body_tag::KUP,
        }
    }

    /// `ir`, `cr`, `kur`.
    pub fn as_str(self) -> &'static str {
        match self {
            CertReqKind::Initialization => "ir",
            CertReqKind::Certification => "cr",
            CertReqKind::KeyUpdate => "kur",
        }
    }

    /// From [`CertReqKind::as_str`].
    pub fn parse(s: &str) -> Option<CertReqKind> {
        [
            CertReqKind::Initialization,
            CertReqKind::Certification,
            CertReqKind::KeyUpdate,
        ]
        .into_iter()
        .find(|k| k.as_str() == s)
    }
}

/// What a request asks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Body {
    /// ir / cr / kur with one certificate request whose proof of possession verified.
    CertReq {
        /// Which.
        kind: CertReqKind,
        /// certReqId.
        cert_req_id: Vec<u8>,
        /// The template's subject (Name DER), when given.
        subject_der: Option<Vec<u8>>,
        /// The template's key (SubjectPublicKeyInfo DER).
        spki_der: Vec<u8>,
        /// oldCertID: issuer Name DER and serial number bytes.
        old_cert_id: Option<(Vec<u8>, Vec<u8>)>,
    },
    /// certConf for one certificate.
    CertConf {
        /// certReqId.
        cert_req_id: Vec<u8>,
        /// certHash.
        cert_hash: Vec<u8>,
        /// False when the client rejects the certificate (statusInfo rejection).
        accepted: bool,
    },
    /// pollReq for one request.
    PollReq {
        /// certReqId.
        cert_req_id: Vec<u8>,
    },
}

/// A request whose protection verified with `signer_cert_der`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// transactionID.
    pub transaction_id: Vec<u8>,
    /// senderNonce.
    pub sender_nonce: Vec<u8>,
    /// recipNonce.
    pub recip_nonce: Option<Vec<u8>>,
    /// messageTime, Unix seconds.
    pub message_time: Option<i64>,
    /// The certificate whose key protects the message (extraCerts' first).
    pub signer_cert_der: Vec<u8>,
    /// Whether the client asks for implicit confirmation.
    pub implicit_confirm: bool,
    /// The renewal code in generalInfo ([`RENEWAL_CODE`]), as its decimal digits; an
    /// entry that is not a non-negative INTEGER reads as `Some("")` (a wrong code).
    pub renewal_code: Option<String>,
    /// The body.
    pub body: Body,
}

/// Where an answer goes: the transaction and the nonce it answers (what [`read`]
/// could read of a request, even a refused one).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AnswerTo {
    /// transactionID.
    pub transaction_id: Option<Vec<u8>>,
    /// The request's senderNonce, our recipNonce.
    pub recip_nonce: Option<Vec<u8>>,
    /// The request's sender.
    pub recipient_name_der: Option<Vec<u8>>,
}

/// Reads a request: its header, its body, the signature protection checked with the
/// first extra certificate, and the proof of possession of a certificate request.
/// A refusal comes with what is known of the request, to answer it.
pub fn read(der: &[u8]) -> std::result::Result<(Request, AnswerTo), (Refusal, AnswerTo)> {
    let refuse = |f: Failure, t: String, to: &AnswerTo| Err((Refusal::new(f, t), to.clone()));
    let msg = match RawMessage::from_der(der) {
        Ok(m) => m,
        Err(e) => {
            return refuse(
                Failure::BadDataFormat,
                format!("not a DER PKIMessage: {e}"),
                &AnswerTo::default(),
            );
        }
    };
    let h = &msg.header;
    let to = AnswerTo {
        transaction_id: h.trans_id.as_ref().map(|o| o.as_bytes().to_vec()),
        recip_nonce: h.sender_nonce.as_ref().map(|o| o.as_bytes().to_vec()),
        recipient_name_der: match &h.sender {
            GeneralName::DirectoryName(n) => n.to_der().ok(),
            _ => None,
        },
    };
    if h.pvno != Pvno::Cmp2000 {
        return refuse(Failure::UnsupportedVersion, "pvno must be 2".into(), &to);
    }
    let Some(transaction_id) = to.transaction_id.clone().filter(|t| t.len() >= 16) else {
        return refuse(
            Failure::BadRequest,
            "the request has no transactionID of 16 bytes or more".into(),
            &to,
        );
    };
    let Some(sender_nonce) = to.recip_nonce.clone().filter(|n| n.len() >= 16) else {
        return refuse(
            Failure::BadSenderNonce,
            "the request has no senderNonce of 16 bytes or more".into(),
            &to,
        );
    };
    let (Some(protection), Some(alg)) = (&msg.protection, &h.protection_alg) else {
        return refuse(
            Failure::BadMessageCheck,
            "the request is not protected: sign it with the key of the certificate being renewed"
                .into(),
            &to,
        );
    };
    let Some(signer) = msg.extra_certs.as_ref().and_then(|c| c.first()) else {
        return refuse(
            Failure::BadMessageCheck,
            "the request carries no certificate in extraCerts to check its protection with".into(),
            &to,
        );
    };
    let (signer_der, spki) = match (
        signer.to_der(),
        signer.tbs_certificate.subject_public_key_info.to_der(),
    ) {
        (Ok(c), Ok(s)) => (c, s),
        _ => return refuse(Failure::BadDataFormat, "extraCerts".into(), &to),
    };
    let part = RawProtectedPart {
        header: msg.header.clone(),
        body: msg.body,
    }
    .to_der();
    let verified = part.is_ok_and(|p| verify(&spki, alg, &p, protection.raw_bytes()));
    if !verified {
        return refuse(
            Failure::BadMessageCheck,
            format!(
                "the protection ({}) does not verify with the first certificate in extraCerts",
                alg.oid
            ),
            &to,
        );
    }
    let message_time = h
        .message_time
        .map(|t| t.to_unix_duration().as_secs() as i64);
    let implicit_confirm = h
        .general_info
        .iter()
        .flatten()
        .any(|i| i.oid == IMPLICIT_CONFIRM);
    let renewal_code = h
        .general_info
        .iter()
        .flatten()
        .find(|i| i.oid == RENEWAL_CODE)
        .map(|i| {
            i.value
                .as_ref()
                .and_then(|v| v.decode_as::<u64>().ok())
                .map(|n| n.to_string())
                .unwrap_or_default()
        });
    let body = match read_body(&msg) {
        Ok(b) => b,
        Err(r) => return Err((r, to)),
    };
    Ok((
        Request {
            transaction_id,
            sender_nonce,
            recip_nonce: h.recip_nonce.as_ref().map(|o| o.as_bytes().to_vec()),
            message_time,
            signer_cert_der: signer_der,
            implicit_confirm,
            renewal_code,
            body,
        },
        to,
    ))
}

/// `CertStatus` read with [`StatusInfo`].
#[derive(der::Sequence)]
struct CertStatusIn<'a> {
    cert_hash: OctetString,
    cert_req_id: Int,
    status_info: Option<StatusInfo<'a>>,
}

fn read_body(msg: &RawMessage<'_>) -> std::result::Result<Body, Refusal> {
    let bad = |what: &str, e: &dyn std::fmt::Display| {
        Refusal::new(Failure::BadDataFormat, format!("{what}: {e}"))
    };
    let inner = msg.body.value();
    let kind = match body_tag_number(&msg.body) {
        Some(body_tag::IR) => CertReqKind::Initialization,
        Some(body_tag::CR) => CertReqKind::Certification,
        Some(body_tag::KUR) => CertReqKind::KeyUpdate,
        Some(body_tag::CERT_CONF) => {
            let items =
                Vec::<CertStatusIn<'_>>::from_der(inner).map_err(|e| bad("certConf", &e))?;
            let [item] = items.as_slice() else {
                return Err(Refusal::new(
                    Failure::BadRequest,
                    "certConf must confirm exactly one certificate",
                ));
            };
            return Ok(Body::CertConf {
                cert_req_id: item.cert_req_id.as_bytes().to_vec(),
                cert_hash: item.cert_hash.as_bytes().to_vec(),
                accepted: item
                    .status_info
                    .as_ref()
                    .is_none_or(|s| matches!(s.status, PkiStatus::Accepted)),
            });
        }
        Some(body_tag::POLL_REQ) => {
            let items = Vec::<PollReqItem>::from_der(inner).map_err(|e| bad("pollReq", &e))?;
            let [item] = items.as_slice() else {
                return Err(Refusal::new(
                    Failure::BadRequest,
                    "pollReq must name exactly one request",
                ));
            };
            return Ok(Body::PollReq {
                cert_req_id: item.cert_req_id.as_bytes().to_vec(),
            });
        }
        other => {
            return Err(Refusal::new(
                Failure::BadRequest,
                format!(
                    "body [{}] is not served here (ir, cr, kur, certConf, pollReq)",
                    other.map_or("?".to_owned(), |n| n.to_string())
                ),
            ));
        }
    };
    let msgs = Vec::<CertReqMsg>::from_der(inner).map_err(|e| bad(kind.as_str(), &e))?;
    let [m] = msgs.as_slice() else {
        return Err(Refusal::new(
            Failure::BadRequest,
            "exactly one certificate request per message",
        ));
    };
    let t = &m.cert_req.cert_template;
    let spki_der = t
        .subject_public_key_info
        .as_ref()
        .ok_or_else(|| {
            Refusal::new(
                Failure::BadCertTemplate,
                "the template has no public key (central key generation is not offered)",
            )
        })?
        .to_der()
        .map_err(|e| bad("publicKey", &e))?;
    let Some(ProofOfPossession::Signature(popo)) = &m.popo else {
        return Err(Refusal::new(
            Failure::BadPop,
            "a signature proof of possession of the new key is required",
        ));
    };
    if popo.poposk_input.is_some() {
        return Err(Refusal::new(
            Failure::BadPop,
            "poposkInput is not accepted: sign the certReq itself",
        ));
    }
    let signed = m.cert_req.to_der().map_err(|e| bad("certReq", &e))?;
    if !verify(&spki_der, &popo.alg_id, &signed, popo.signature.raw_bytes()) {
        return Err(Refusal::new(
            Failure::BadPop,
            format!(
                "the proof of possession ({}) does not verify with the requested key",
                popo.alg_id.oid
            ),
        ));
    }
    let mut old_cert_id = None;
    for c in m.cert_req.controls.iter().flatten() {
        if c.oid == OLD_CERT_ID {
            let id: crmf::controls::CertId =
                c.value.decode_as().map_err(|e| bad("oldCertID", &e))?;
            let GeneralName::DirectoryName(issuer) = &id.issuer else {
                return Err(Refusal::new(
                    Failure::BadCertId,
                    "oldCertID's issuer must be a directory name",
                ));
            };
            old_cert_id = Some((
                issuer.to_der().map_err(|e| bad("oldCertID", &e))?,
                id.serial_number.as_bytes().to_vec(),
            ));
        }
    }
    Ok(Body::CertReq {
        kind,
        cert_req_id: m.cert_req.cert_req_id.as_bytes().to_vec(),
        subject_der: t
            .subject
            .as_ref()
            .map(|s| s.to_der())
            .transpose()
            .map_err(|e| bad("subject", &e))?,
        spki_der,
        old_cert_id,
    })
}

/// The CA's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// ip/cp/kup (by `kind`) with a certificate.
    Issued {
        /// The request answered.
        kind: CertReqKind,
        /// certReqId.
        cert_req_id: Vec<u8>,
        /// The certificate, DER.
        cert_der: Vec<u8>,
    },
    /// ip/cp/kup with status waiting: poll.
    Waiting {
        /// The request answered.
        kind: CertReqKind,
        /// certReqId.
        cert_req_id: Vec<u8>,
        /// Why.
        text: String,
    },
    /// ip/cp/kup with status rejection.
    Rejected {
        /// The request answered.
        kind: CertReqKind,
        /// certReqId.
        cert_req_id: Vec<u8>,
        /// Why.
        refusal: Refusal,
    },
    /// pollRep: still waiting.
    PollRep {
        /// certReqId.
        cert_req_id: Vec<u8>,
        /// Seconds before the next pollReq.
        check_after: u64,
        /// Why.
        text: String,
    },
    /// pkiConf: the confirmation is received.
    PkiConf,
    /// error: the message is refused.
    Error(Refusal),
}

/// The CA's credentials for protecting answers.
pub struct Protection<'a> {
    /// The CA's key.
    pub signer: &'a dyn CmpSigner,
    /// Its certificate, DER (first in extraCerts; the header's sender).
    pub cert_der: &'a [u8],
    /// Further certificates for extraCerts (the CA's chain).
    pub chain_der: &'a [Vec<u8>],
}

impl std::fmt::Debug for Protection<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Protection")
            .field("chain_len", &self.chain_der.len())
            .finish_non_exhaustive()
    }
}

fn text(s: &str) -> Result<Vec<Utf8StringRef<'_>>> {
    Ok(vec![Utf8StringRef::new(s).map_err(malformed)?])
}

fn status<'a>(s: PkiStatus, t: Option<&'a str>, fail: Option<Failure>) -> Result<StatusInfo<'a>> {
    Ok(StatusInfo {
        status: s,
        status_string: t.map(text).transpose()?,
        fail_info: fail.map(Failure::bits).transpose()?,
    })
}

/// Writes the protected answer `outcome` to `to`, with `sender_nonce` (fresh, kept by
/// the caller as the nonce the client's next message must carry) and, when the CA
/// grants it, implicit confirmation.
pub fn answer(
    to: &AnswerTo,
    sender_nonce: &[u8],
    outcome: &Outcome,
    implicit_confirm: bool,
    p: &Protection<'_>,
) -> Result<Vec<u8>> {
    let ca = Certificate::from_der(p.cert_der).map_err(malformed)?;
    let int = |b: &[u8]| Int::new(b).map_err(malformed);
    let body = match outcome {
        Outcome::Issued {
            kind,
            cert_req_id,
            cert_der,
        } => {
            let cert = Certificate::from_der(cert_der).map_err(malformed)?;
            let rep = CertRep {
                ca_pubs: None,
                response: vec![CertResp {
                    cert_req_id: int(cert_req_id)?,
                    status: status(PkiStatus::Accepted, None, None)?,
                    certified_key_pair: Some(cmpv2::certified_key_pair::CertifiedKeyPair {
                        cert_or_enc_cert: cmpv2::certified_key_pair::CertOrEncCert::Certificate(
                            Box::new(cert),
                        ),
                        priv_key: None,
                        publication_info: None,
                    }),
                    rsp_info: None,
                }],
            };
            tagged_body(kind.answer_tag(), rep.to_der().map_err(malformed)?)?
        }
        Outcome::Waiting {
            kind,
            cert_req_id,
            text: t,
        } => {
            let rep = CertRep {
                ca_pubs: None,
                response: vec![CertResp {
                    cert_req_id: int(cert_req_id)?,
                    status: status(PkiStatus::Waiting, Some(t), None)?,
                    certified_key_pair: None,
                    rsp_info: None,
                }],
            };
            tagged_body(kind.answer_tag(), rep.to_der().map_err(malformed)?)?
        }
        Outcome::Rejected {
            kind,
            cert_req_id,
            refusal,
        } => {
            let rep = CertRep {
                ca_pubs: None,
                response: vec![CertResp {
                    cert_req_id: int(cert_req_id)?,
                    status: status(
                        PkiStatus::Rejection,
                        Some(&refusal.text),
                        Some(refusal.failure),
                    )?,
                    certified_key_pair: None,
                    rsp_info: None,
                }],
            };
            tagged_body(kind.answer_tag(), rep.to_der().map_err(malformed)?)?
        }
        Outcome::PollRep {
            cert_req_id,
            check_after,
            text: t,
        } => {
            let items = vec![PollRepItem {
                cert_req_id: int(cert_req_id)?,
                check_after: *check_after,
                reason: Some(text(t)?),
            }];
            tagged_body(body_tag::POLL_REP, items.to_der().map_err(malformed)?)?
        }
        Outcome::PkiConf => tagged_body(body_tag::PKI_CONF, Null.to_der().map_err(malformed)?)?,
        Outcome::Error(refusal) => {
            let e = ErrorMsg {
                status: status(
                    PkiStatus::Rejection,
                    Some(&refusal.text),
                    Some(refusal.failure),
                )?,
                error_code: None,
                error_details: None,
            };
            tagged_body(body_tag::ERROR, e.to_der().map_err(malformed)?)?
        }
    };
    let recipient = match &to.recipient_name_der {
        Some(n) => {
            GeneralName::DirectoryName(x509_cert_02::name::Name::from_der(n).map_err(malformed)?)
        }
        // RFC 4210: the NULL-DN when the sender is unknown.
        None => GeneralName::DirectoryName(Default::default()),
    };
    let since = std::time::SystemTime::now()
        .duration_since(std::time::SystemTime::UNIX_EPOCH)
        .map_err(malformed)?;
    let octets = |b: &Option<Vec<u8>>| {
        b.clone()
            .map(OctetString::new)
            .transpose()
            .map_err(malformed)
    };
    let header = PkiHeader {
        pvno: Pvno::Cmp2000,
        sender: GeneralName::DirectoryName(ca.tbs_certificate.subject.clone()),
        recipient,
        message_time: Some(
            GeneralizedTime::from_unix_duration(std::time::Duration::from_secs(since.as_secs()))
                .map_err(malformed)?,
        ),
        protection_alg: Some(p.signer.algorithm()),
        sender_kid: None,
        recip_kid: None,
        trans_id: octets(&to.transaction_id)?,
        sender_nonce: Some(OctetString::new(sender_nonce).map_err(malformed)?),
        recip_nonce: octets(&to.recip_nonce)?,
        free_text: None,
        general_info: implicit_confirm.then(|| {
            vec![cmpv2::r#gen::InfoTypeAndValue {
                oid: IMPLICIT_CONFIRM,
                value: Some(der::asn1::Any::from(Null)),
            }]
        }),
    };
    let body = der::asn1::AnyRef::from_der(&body).map_err(malformed)?;
    let part = RawProtectedPart {
        header: header.clone(),
        body,
    };
    let signature = p.signer.sign(&part.to_der().map_err(malformed)?)?;
    let mut extra = vec![ca];
    for c in p.chain_der {
        let c = Certificate::from_der(c).map_err(malformed)?;
        if !extra.contains(&c) {
            extra.push(c);
        }
    }
    RawMessage {
        header,
        body,
        protection: Some(BitString::from_bytes(&signature).map_err(malformed)?),
        extra_certs: Some(extra),
    }
    .to_der()
    .map_err(malformed)
}

/// The SHA-256 certHash a certConf carries for `cert_der` (the hash of the signature
/// algorithms this crate uses and OpenSSL's for SHA-256 signatures).
pub fn cert_hash(cert_der: &[u8]) -> Vec<u8> {
    aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, cert_der)
        .as_ref()
        .to_vec()
}

impl From<CmpError> for Refusal {
    fn from(e: CmpError) -> Refusal {
        Refusal::new(Failure::SystemFailure, e.to_string())
    }
}
