//! The portal's CMP server (RFC 4210 as profiled by RFC 9483, over HTTP per RFC 6712):
//! the same orders and rules as the REST protocol, reached by a key update request
//! (`kur`, or a `cr`) protected by the key of the certificate being renewed.
//!
//! - **Authentication:** the request's signature protection by the certificate it
//!   renews (first in extraCerts), issued by this CA, not revoked; a `kur`'s
//!   oldCertID must name that certificate. The new key's proof of possession is the
//!   CertReqMsg's signature.
//! - **Freshness** (the REST protocol's single-use challenge): messageTime within the
//!   configured window of the portal's clock, a transactionID never used before for a
//!   new request, a senderNonce never seen before, and in an existing transaction a
//!   recipNonce equal to the portal's last senderNonce. They are recorded in the same
//!   database transaction as the change they cause.
//! - **Orders:** ready (or issued, for the same key: the same certificate) → the
//!   certificate; unpaid or under review → "waiting", answered with pollRep until
//!   decided; rejected → the reviewer's reason. Orders with an escrowed encryption key
//!   are served by the REST protocol only.
//! - **Confirmation:** the old certificate is revoked on certConf (never on issuance,
//!   never by implicit confirmation, which is not granted), within the confirmation
//!   window; a repeated certConf is answered with pkiConf again.

use time::OffsetDateTime;
use ukey_cmp::server::{self, Body, CertReqKind, Failure, Outcome, Protection, Refusal, Request};
use ukey_portal_api::{ErrorCode, serial_hex_from_bytes};
use x509_parser::certificate::X509Certificate;
use x509_parser::prelude::FromDer;

use crate::Error;
use crate::crypto;
use crate::names;
use crate::portal::{IssueAsk, Portal};
use crate::store::{CmpStep, CmpTransaction, Freshness, NewCmpTransaction, Order, OrderState};

/// The profile names served at `/.well-known/cmp/p/<name>` (besides the bare path).
pub const PROFILES: &[&str] = &["renewal"];

/// Why a CMP request is refused, from the shared checks' protocol code.
fn failure_of(code: ErrorCode) -> Failure {
    match code {
        ErrorCode::SubjectMismatch
        | ErrorCode::AlgorithmMismatch
        | ErrorCode::KeyPolicyViolation
        | ErrorCode::MalformedCsr => Failure::BadCertTemplate,
        ErrorCode::UnsupportedAlgorithm => Failure::BadAlg,
        ErrorCode::CertificateMismatch => Failure::BadCertId,
        ErrorCode::CertificateNotTrusted => Failure::SignerNotTrusted,
        ErrorCode::CertificateRevoked => Failure::CertRevoked,
        ErrorCode::MalformedCertificate => Failure::BadDataFormat,
        ErrorCode::OrderNotFound
        | ErrorCode::OrderNotReady
        | ErrorCode::OrderCompleted
        | ErrorCode::RenewalCodeRequired
        | ErrorCode::RenewalCodeInvalid => Failure::NotAuthorized,
        _ => Failure::BadRequest,
    }
}

/// A refusal from an error of the shared layers; an internal failure is logged and
/// said without detail.
fn refusal_of(e: Error) -> Refusal {
    match e {
        Error::Cmp(r) => r,
        Error::Api(a) => Refusal::new(failure_of(a.code), a.message),
        other => {
            tracing::error!(error = %other, "CMP request failed");
            Refusal::new(
                Failure::SystemFailure,
                "internal error; see the portal log / 内部错误",
            )
        }
    }
}

fn refuse<T>(f: Failure, text: impl Into<String>) -> Result<T, Error> {
    Err(Error::Cmp(Refusal::new(f, text)))
}

fn parse_cert(der: &[u8]) -> Result<X509Certificate<'_>, Error> {
    match X509Certificate::from_der(der) {
        Ok(([], c)) => Ok(c),
        _ => refuse(
            Failure::BadDataFormat,
            "the protecting certificate is not a DER X.509 certificate",
        ),
    }
}

impl Portal {
    /// `POST /.well-known/cmp`: one DER PKIMessage in, the protected DER answer out.
    /// `Err` only when the answer cannot be written.
    pub fn cmp_message(&self, der: &[u8]) -> Result<Vec<u8>, Error> {
        let identity = self.cmp_identity();
        let signer = identity.signer();
        let nonce = crypto::random_bytes(16).map_err(|_| Error::Setup("RNG failure".into()))?;
        let (outcome, to) = match server::read(der) {
            Err((refusal, to)) => (Outcome::Error(refusal), to),
            Ok((req, to)) => {
                let outcome = self
                    .cmp_request(&req, der, &nonce, OffsetDateTime::now_utc())
                    .unwrap_or_else(|e| Outcome::Error(refusal_of(e)));
                (outcome, to)
            }
        };
        if let Outcome::Error(r) = &outcome {
            tracing::info!(failure = ?r.failure, text = %r.text, "CMP request refused");
        }
        let protection = Protection {
            signer: &signer,
            cert_der: identity.cert_der(),
            chain_der: self.ca().chain_der(),
        };
        server::answer(&to, &nonce, &outcome, false, &protection)
            .map_err(|e| Error::Setup(format!("CMP answer: {e}")))
    }

    fn cmp_request(
        &self,
        req: &Request,
        der: &[u8],
        nonce: &[u8],
        t: OffsetDateTime,
    ) -> Result<Outcome, Error> {
        let Some(sent) = req.message_time else {
            return refuse(Failure::BadTime, "the request has no messageTime");
        };
        let window = self.cmp_settings().cmp_message_window.whole_seconds();
        if (t.unix_timestamp() - sent).abs() > window {
            return refuse(
                Failure::BadTime,
                format!(
                    "messageTime is {}s from the portal's clock (at most {window}s): check the computer's clock / 请校准电脑时间",
                    t.unix_timestamp() - sent
                ),
            );
        }
        let signer = parse_cert(&req.signer_cert_der)?;
        let step = |begins: Option<NewCmpTransaction>, state: &'static str| CmpStep {
            transaction_id: req.transaction_id.clone(),
            client_nonce: req.sender_nonce.clone(),
            recip_nonce: req.recip_nonce.clone(),
            begins,
            server_nonce: nonce.to_vec(),
            state,
            certificate_serial: None,
        };
        match &req.body {
            Body::CertReq {
                kind,
                cert_req_id,
                old_cert_id,
                ..
            } => {
                if self.store().cmp_transaction(&req.transaction_id)?.is_some() {
                    return refuse(
                        Failure::TransactionIdInUse,
                        "this transactionID was used before: start a new transaction",
                    );
                }
                if *kind == CertReqKind::Initialization {
                    return refuse(
                        Failure::BadRequest,
                        "this portal renews certificates: send a kur (or a cr) protected by the certificate being renewed",
                    );
                }
                if let Some((issuer, serial)) = old_cert_id {
                    let names_signer = names::key_of_name_der(issuer)
                        .is_ok_and(|k| k == names::key_of_name(signer.issuer()))
                        && serial_hex_from_bytes(serial)
                            == serial_hex_from_bytes(signer.raw_serial());
                    if !names_signer {
                        return refuse(
                            Failure::BadCertId,
                            "oldCertID does not name the certificate that protects the request",
                        );
                    }
                }
                let order = self.order_of(&signer)?;
                let begins = NewCmpTransaction {
                    order_id: order.id.clone(),
                    kind: kind.as_str().to_owned(),
                    cert_req_id: cert_req_id.clone(),
                    request_der: der.to_vec(),
                };
                self.cmp_decide(req, &signer, &order, step(Some(begins), "waiting"), t)
            }
            Body::PollReq { cert_req_id } => {
                let (tx, order) = self.cmp_existing(req, &signer, cert_req_id)?;
                match tx.state.as_str() {
                    "waiting" => {
                        // The request as first sent: its protection verified then and
                        // verifies still; its key and template are what is issued.
                        let (first, _) =
                            server::read(&tx.request_der).map_err(|(r, _)| Error::Cmp(r))?;
                        let first = Request {
                            body: first.body,
                            ..req.clone()
                        };
                        match self.cmp_decide(&first, &signer, &order, step(None, "waiting"), t)? {
                            // Still undecided: pollRep, not the request's answer.
                            Outcome::Waiting {
                                cert_req_id, text, ..
                            } => Ok(Outcome::PollRep {
                                cert_req_id,
                                check_after: self.cmp_settings().cmp_check_after,
                                text,
                            }),
                            other => Ok(other),
                        }
                    }
                    // The answer was lost: the certificate again.
                    "issued" => {
                        let serial = tx.certificate_serial.clone().unwrap_or_default();
                        let cert = self.store().certificate(&serial)?.ok_or_else(|| {
                            Error::Setup(format!("CMP transaction without certificate {serial}"))
                        })?;
                        self.store()
                            .cmp_record(&step(None, "issued"), t.unix_timestamp())?;
                        Ok(Outcome::Issued {
                            kind: kind_of(&tx),
                            cert_req_id: tx.cert_req_id.clone(),
                            cert_der: cert.der,
                        })
                    }
                    other => refuse(
                        Failure::BadRequest,
                        format!("the transaction is {other}: nothing to poll"),
                    ),
                }
            }
            Body::CertConf {
                cert_req_id,
                cert_hash,
                accepted,
            } => {
                let (tx, order) = self.cmp_existing(req, &signer, cert_req_id)?;
                let serial = match (tx.state.as_str(), &tx.certificate_serial) {
                    ("issued" | "confirmed", Some(s)) => s.clone(),
                    (state, _) => {
                        return refuse(
                            Failure::BadRequest,
                            format!("the transaction is {state}: no certificate to confirm"),
                        );
                    }
                };
                let cert = self.store().certificate(&serial)?.ok_or_else(|| {
                    Error::Setup(format!("CMP transaction without certificate {serial}"))
                })?;
                if *cert_hash != server::cert_hash(&cert.der) {
                    return refuse(
                        Failure::BadRequest,
                        "certHash is not the hash of the certificate issued in this transaction",
                    );
                }
                let window = self.cmp_settings().cmp_confirm_window.whole_seconds();
                if tx.state == "issued" && t.unix_timestamp() - tx.updated_at > window {
                    return refuse(
                        Failure::NotAuthorized,
                        format!(
                            "the confirmation window ({window}s) has closed; the order stays issued without installation"
                        ),
                    );
                }
                if !accepted {
                    // The holder refuses it: the transaction ends; the order stays
                    // issued (a later request replaces and revokes this certificate).
                    self.store()
                        .cmp_record(&step(None, "rejected"), t.unix_timestamp())?;
                    return Ok(Outcome::PkiConf);
                }
                self.store().commit_installed(
                    &order.id,
                    &serial,
                    Some(&step(None, "confirmed")),
                    &self.renewed_issuer_fallback(&order),
                    t.unix_timestamp(),
                )?;
                Ok(Outcome::PkiConf)
            }
        }
    }

    /// The open order for the certificate that protects a request.
    fn order_of(&self, signer: &X509Certificate<'_>) -> Result<Order, Error> {
        let serial = serial_hex_from_bytes(signer.raw_serial());
        match self
            .store()
            .latest_order_for(&names::key_of_name(signer.issuer()), &serial)?
        {
            Some(o) => Ok(o),
            None => refuse(
                Failure::NotAuthorized,
                format!(
                    "no renewal order for certificate {serial}: order the renewal at the portal first / 门户上没有该证书的续期订单"
                ),
            ),
        }
    }

    /// A message in an existing transaction: the transaction, its certReqId, and the
    /// certificate that protects it (the one its order renews, issued by this CA).
    fn cmp_existing(
        &self,
        req: &Request,
        signer: &X509Certificate<'_>,
        cert_req_id: &[u8],
    ) -> Result<(CmpTransaction, Order), Error> {
        let Some(tx) = self.store().cmp_transaction(&req.transaction_id)? else {
            return refuse(
                Failure::BadRequest,
                "no such transaction: send the request first",
            );
        };
        if tx.cert_req_id != cert_req_id {
            return refuse(
                Failure::BadRequest,
                "the certReqId is not this transaction's request",
            );
        }
        let order = self
            .store()
            .order(&tx.order_id)?
            .ok_or_else(|| Error::Setup(format!("CMP transaction for no order {}", tx.order_id)))?;
        // The old certificate may be revoked by now (its renewal confirmed): it still
        // speaks for its own transaction.
        self.check_renewed(&order, signer, false)
            .map_err(|e| Error::Cmp(refusal_of(e)))?;
        Ok((tx, order))
    }

    /// What a certificate request gets now, given its order: the certificate, waiting,
    /// or a rejection; recorded with `step` (a new or a polled transaction).
    fn cmp_decide(
        &self,
        req: &Request,
        signer: &X509Certificate<'_>,
        order: &Order,
        step: CmpStep,
        t: OffsetDateTime,
    ) -> Result<Outcome, Error> {
        let Body::CertReq {
            kind,
            cert_req_id,
            subject_der,
            spki_der,
            ..
        } = &req.body
        else {
            return refuse(Failure::BadRequest, "not a certificate request");
        };
        let rejected = |failure: Failure, text: String| -> Result<Outcome, Error> {
            // A refusal of a polled request ends its transaction; a new request that
            // is refused leaves no row.
            if step.begins.is_none() {
                self.store().cmp_record(
                    &CmpStep {
                        state: "rejected",
                        ..step.clone()
                    },
                    t.unix_timestamp(),
                )?;
            }
            Ok(Outcome::Rejected {
                kind: *kind,
                cert_req_id: cert_req_id.clone(),
                refusal: Refusal::new(failure, text),
            })
        };
        let waiting = |text: String| -> Result<Outcome, Error> {
            self.store().cmp_record(&step, t.unix_timestamp())?;
            Ok(Outcome::Waiting {
                kind: *kind,
                cert_req_id: cert_req_id.clone(),
                text,
            })
        };
        match order.state {
            OrderState::AwaitingPayment => {
                return waiting(format!(
                    "awaiting payment: pay for order {} at the portal / 订单尚未付款，请在门户付款",
                    order.id
                ));
            }
            OrderState::UnderReview => {
                return waiting(format!(
                    "under review: order {} is being reviewed / 续期申请审核中",
                    order.id
                ));
            }
            OrderState::Rejected => {
                return rejected(
                    Failure::NotAuthorized,
                    format!(
                        "审核驳回 / rejected by the reviewer: {}",
                        order.reject_reason.as_deref().unwrap_or_default()
                    ),
                );
            }
            OrderState::RequiresNewKey => {
                return rejected(
                    Failure::NotAuthorized,
                    format!(
                        "this key cannot be renewed; a new key is mailed (tracking {}) / 新 UKey 寄送中",
                        order.tracking_number.as_deref().unwrap_or_default()
                    ),
                );
            }
            OrderState::Completed => {
                return rejected(
                    Failure::NotAuthorized,
                    "the renewal is completed already / 续期已完成".to_owned(),
                );
            }
            OrderState::Ready | OrderState::Issued => {}
        }
        if order.terms.with_encryption_cert {
            return rejected(
                Failure::BadRequest,
                "this order includes an encryption certificate with an escrowed key, delivered by the portal's REST protocol only".to_owned(),
            );
        }
        let subject = subject_der
            .as_deref()
            .map(names::key_of_name_der)
            .transpose()
            .map_err(|e| Error::Cmp(Refusal::new(Failure::BadCertTemplate, e.to_string())))?;
        let issuer_ski = match self.check_renewed(order, signer, true) {
            Ok(ski) => ski,
            Err(e) => {
                let r = refusal_of(e);
                return rejected(r.failure, r.text);
            }
        };
        let ask = IssueAsk {
            order,
            old: signer,
            subject,
            spki_der,
            transport_key_spki: None,
            renewal_code: req.renewal_code.as_deref(),
            issuer_ski: &issuer_ski,
            freshness: Freshness::Cmp(Box::new(CmpStep {
                state: "issued",
                ..step.clone()
            })),
            t,
        };
        match self.issue_checked(&ask) {
            Ok(issued) => Ok(Outcome::Issued {
                kind: *kind,
                cert_req_id: cert_req_id.clone(),
                cert_der: issued.signing.der,
            }),
            // Freshness refused in the commit: an error message, nothing recorded.
            Err(Error::Cmp(r)) => Err(Error::Cmp(r)),
            Err(Error::Api(a)) => rejected(failure_of(a.code), a.message),
            Err(other) => Err(other),
        }
    }
}

fn kind_of(tx: &CmpTransaction) -> CertReqKind {
    CertReqKind::parse(&tx.kind).unwrap_or(CertReqKind::KeyUpdate)
}
