//! A renewal over CMP (RFC 9483): the plan without a portal status (the CA's decision
//! comes with the answer), the Request step as a CMP transaction (kur or cr, polled
//! while the CA answers "waiting"), and the confirmation (certConf) once the
//! certificate is written and self-tested, before activation.
//!
//! Every transaction identifier and answer is in the journal before the next message
//! goes out, so a run stopped anywhere resumes the same transaction: it polls a
//! request whose answer was lost or that waits, reuses an issued certificate, and sends
//! (again) a certConf the CA may not have received. Only a CA that no longer knows the
//! transaction (an error message) gets a new request.

use std::cell::RefCell;
use std::time::Instant;

use time::OffsetDateTime;
use ukey_cmp::{Answer, CmpError, CmpSigner, RequestKind, Transaction};
use ukey_portal_api::{IssueResponse, KeyAlgorithm, OrderTerms};
use ukey_token::{KeyAlg, Module, PublicKey, TokenSummary};

use crate::api::{KeyRef, TokenSide};
use crate::engine::{
    CmpOptions, Options, Plan, Protocol, Requested, Run, alg_of, der_of, failpoint, serial_of,
};
use crate::error::{Refusal, RenewalError};
use crate::journal::{CmpRecord, CmpState, CmpTransactionRecord, Journal};

/// The order id a CMP renewal's journal carries (CMP has no order ids).
pub const CMP_ORDER_ID: &str = "cmp";

/// The plan of a CMP renewal: the one signing certificate (or `--cert`), renewed with
/// its own algorithm (RSA, P-256 or SM2), without an encryption certificate (an
/// escrowed key is the REST protocol's).
pub(crate) fn plan(
    module: &Module,
    token: TokenSummary,
    mut candidates: Vec<crate::engine::Candidate>,
    c: &CmpOptions,
    opts: &Options,
) -> Result<Plan, RenewalError> {
    let cand = match candidates.len() {
        1 => candidates.remove(0),
        _ => {
            let serials: Vec<String> = candidates
                .iter()
                .map(|c| c.details.serial.clone())
                .collect();
            return Err(RenewalError::Selection(format!(
                "several signing certificates on token {} ({}); choose one with --cert",
                token.serial,
                serials.join(", ")
            )));
        }
    };
    let target_algorithm = match alg_of(&cand.details) {
        Some(KeyAlg::Rsa2048) => KeyAlgorithm::Rsa2048,
        Some(KeyAlg::EcP256) => KeyAlgorithm::EcP256,
        Some(KeyAlg::Sm2) => KeyAlgorithm::Sm2,
        None => {
            return Err(RenewalError::InterfaceUnsupported {
                token: token.serial.clone(),
                what: format!(
                    "its {} certificate is not renewed over CMP here (RSA, P-256 and SM2 keys)",
                    cand.details.key_algorithm
                ),
                what_zh: format!(
                    "该证书为 {}，本程序只通过 CMP 更新 RSA、P-256 与 SM2 证书",
                    cand.details.key_algorithm
                ),
            });
        }
    };
    let terms = OrderTerms {
        // The CA decides the validity.
        years: 0,
        key_policy: c.key_policy,
        target_algorithm,
        with_encryption_cert: false,
    };
    let mut plan =
        crate::engine::plan(module, token, cand, Vec::new(), CMP_ORDER_ID, &terms, opts)?;
    plan.journal.cmp = Some(CmpRecord {
        url: c.url.clone(),
        request: match c.request {
            RequestKind::KeyUpdate => "kur",
            RequestKind::Certification => "cr",
        }
        .to_owned(),
        transaction: None,
    });
    Ok(plan)
}

/// An unfinished renewal resumes with the protocol (and CMP endpoint) it began with,
/// until activation has begun (from then on nothing is asked of the CA over CMP).
pub(crate) fn same_protocol(j: &Journal, opts: &Options) -> Result<(), RenewalError> {
    let refuse = |how: String| {
        Err(RenewalError::Selection(format!(
            "the unfinished renewal of certificate {} {how}",
            j.old.serial
        )))
    };
    match (&j.cmp, &opts.protocol) {
        (Some(rec), Protocol::Rest) if !j.activation_begun() => refuse(format!(
            "was begun over CMP at {}: finish it with ukey renew --cmp {}",
            rec.url, rec.url
        )),
        (Some(rec), Protocol::Cmp(c)) if !j.activation_begun() && rec.url != c.url => refuse(
            format!("was begun over CMP at {}: finish it there", rec.url),
        ),
        (None, Protocol::Cmp(_)) => refuse(
            "was begun with the portal's protocol: finish it with ukey renew (without --cmp)"
                .to_owned(),
        ),
        _ => Ok(()),
    }
}

/// A key on the token signing CMP data; a token failure is kept to be reported as
/// itself (a pulled key resumes, it is not a refusal).
struct TokenKey<'a> {
    token: &'a dyn TokenSide,
    key: KeyRef,
    failure: RefCell<Option<ukey_token::Error>>,
}

impl<'a> TokenKey<'a> {
    fn new(token: &'a dyn TokenSide, key: KeyRef) -> TokenKey<'a> {
        TokenKey {
            token,
            key,
            failure: RefCell::new(None),
        }
    }

    /// The error of a message this key signed: the token's own, else the message's.
    fn error(&self, e: CmpError) -> RenewalError {
        match self.failure.borrow_mut().take() {
            Some(t) => RenewalError::Token(t),
            None => RenewalError::Inconsistent(format!("building the CMP message: {e}")),
        }
    }
}

impl CmpSigner for TokenKey<'_> {
    fn algorithm(&self) -> ukey_cmp::spki::AlgorithmIdentifierOwned {
        use ukey_cmp::der::asn1::{Any, Null};
        match self.key.public {
            PublicKey::Rsa { .. } => ukey_cmp::spki::AlgorithmIdentifierOwned {
                oid: ukey_cmp::SHA256_WITH_RSA,
                parameters: Some(Any::from(Null)),
            },
            // The token signs SM2 with Z for the GM ID, as the CA verifies it.
            PublicKey::Sm2 { .. } => ukey_cmp::spki::AlgorithmIdentifierOwned {
                oid: ukey_cmp::SM2_WITH_SM3,
                parameters: None,
            },
            PublicKey::EcP256 { .. } => ukey_cmp::spki::AlgorithmIdentifierOwned {
                oid: ukey_cmp::ECDSA_WITH_SHA256,
                parameters: None,
            },
        }
    }

    fn sign(&self, data: &[u8]) -> ukey_cmp::Result<Vec<u8>> {
        self.token.sign(&self.key, data).map_err(|e| {
            let said = e.to_string();
            *self.failure.borrow_mut() = Some(e);
            CmpError::Signing(said)
        })
    }
}

fn hex_of(b: &[u8]) -> String {
    hex::encode(b)
}

fn bytes_of(h: &str) -> Result<Vec<u8>, RenewalError> {
    hex::decode(h)
        .map_err(|_| RenewalError::Inconsistent("a CMP value in the journal is damaged".into()))
}

impl Run<'_> {
    fn cmp_record(&self) -> Result<&CmpRecord, RenewalError> {
        self.j
            .cmp
            .as_ref()
            .ok_or_else(|| RenewalError::Inconsistent("not a CMP renewal".into()))
    }

    fn cmp_options(&self) -> Option<&CmpOptions> {
        match &self.opts.protocol {
            Protocol::Cmp(c) => Some(c),
            Protocol::Rest => None,
        }
    }

    /// The transaction of the journal, as the CMP layer keeps it.
    fn transaction(rec: &CmpTransactionRecord) -> Result<Transaction, RenewalError> {
        Ok(Transaction {
            id: bytes_of(&rec.id_hex)?,
            sender_nonce: bytes_of(&rec.sender_nonce_hex)?,
            recip_nonce: rec.recip_nonce_hex.as_deref().map(bytes_of).transpose()?,
            clock_offset_secs: 0,
        })
    }

    fn record_transaction(
        &mut self,
        tx: &Transaction,
        cert_req_id: &[u8],
        state: CmpState,
        issued: Option<(&[u8], &[Vec<u8>])>,
    ) -> Result<(), RenewalError> {
        let rec = self
            .j
            .cmp
            .as_mut()
            .ok_or_else(|| RenewalError::Inconsistent("not a CMP renewal".into()))?;
        let keep = rec.transaction.take();
        rec.transaction = Some(CmpTransactionRecord {
            id_hex: hex_of(&tx.id),
            sender_nonce_hex: hex_of(&tx.sender_nonce),
            recip_nonce_hex: tx.recip_nonce.as_deref().map(hex_of),
            cert_req_id_hex: hex_of(cert_req_id),
            state,
            cert_der_hex: issued
                .map(|(c, _)| hex_of(c))
                .or(keep.as_ref().and_then(|k| k.cert_der_hex.clone())),
            chain_der_hex: match issued {
                Some((_, chain)) => chain.iter().map(|c| hex_of(c)).collect(),
                None => keep.map(|k| k.chain_der_hex).unwrap_or_default(),
            },
        });
        // Durable before the next message: a resumed run continues this transaction.
        self.opts.journals.save_with(&self.j, true)
    }

    /// Sends a message and checks the answer (transaction, nonce, protection by a
    /// certificate that chains to the trust anchors); reads it.
    fn exchange(&self, message: &[u8], tx: &mut Transaction) -> Result<Exchanged, RenewalError> {
        let answer = self.portal.cmp(message)?.value;
        let anchors = &self.opts.trust_anchors;
        let chain = RefCell::new(Vec::new());
        let trust = |signer: &[u8], extra: &[Vec<u8>]| -> ukey_cmp::Result<()> {
            let mut c = vec![signer.to_vec()];
            c.extend(extra.iter().cloned());
            *chain.borrow_mut() = c;
            ukey_trust::chain::verify(signer, extra, anchors, OffsetDateTime::now_utc())
                .map(drop)
                .map_err(|e| CmpError::Untrusted(e.explain(false)))
        };
        let refused = |e: CmpError| RenewalError::Refused(Refusal::Answer(e.to_string()));
        let checked = ukey_cmp::check_answer(&answer, tx, &trust).map_err(refused)?;
        let pki_conf = ukey_cmp::is_pki_conf(&checked);
        Ok(Exchanged {
            read: if pki_conf {
                None
            } else {
                Some(ukey_cmp::answer(&checked).map_err(refused)?)
            },
            implicit_confirm: checked.implicit_confirm(),
            chain: chain.into_inner(),
        })
    }

    /// The Request step over CMP: the journal's transaction resumed (its certificate,
    /// or a poll), else a new request.
    pub(crate) fn request_cmp(&mut self, public: &PublicKey) -> Result<Requested, RenewalError> {
        let rec = self.cmp_record()?.clone();
        if let Some(t) = &rec.transaction {
            match t.state {
                CmpState::Issued | CmpState::ConfirmSent | CmpState::Confirmed => {
                    let cert = der_of(t.cert_der_hex.as_deref().unwrap_or_default())?;
                    let chain = t
                        .chain_der_hex
                        .iter()
                        .map(|c| bytes_of(c))
                        .collect::<Result<_, _>>()?;
                    return self.requested(cert, chain);
                }
                CmpState::Sent | CmpState::Waiting => {
                    let tx = Self::transaction(t)?;
                    let cert_req_id = bytes_of(&t.cert_req_id_hex)?;
                    if let Some(r) = self.poll(tx, &cert_req_id, t.state)? {
                        return Ok(r);
                    }
                    // The CA does not know the transaction: a new request.
                }
            }
        }
        self.new_request(public, &rec)
    }

    fn new_request(
        &mut self,
        public: &PublicKey,
        rec: &CmpRecord,
    ) -> Result<Requested, RenewalError> {
        let old_der = self.old_cert()?;
        let old = TokenKey::new(self.token, self.old_key()?);
        let new = TokenKey::new(self.token, self.new_key(public.clone())?);
        let kind = if rec.request == "cr" {
            RequestKind::Certification
        } else {
            RequestKind::KeyUpdate
        };
        let mut tx = Transaction::new()
            .map_err(|e| RenewalError::Inconsistent(format!("CMP transaction: {e}")))?;
        // The order's renewal code, when the holder gave one, in generalInfo.
        let code = self
            .opts
            .renewal_code
            .as_deref()
            .and_then(ukey_portal_api::canonical_renewal_code)
            .and_then(|c| c.parse::<u64>().ok());
        let message =
            ukey_cmp::request_with_code(kind, &old_der, &public.spki(), &old, &new, &tx, code)
                .map_err(|e| {
                    if old.failure.borrow().is_some() {
                        old.error(e)
                    } else {
                        new.error(e)
                    }
                })?;
        // certReqId 0: the one request of the message.
        let cert_req_id = [0u8];
        self.record_transaction(&tx, &cert_req_id, CmpState::Sent, None)?;
        let answer = self.exchange(&message, &mut tx)?;
        failpoint("request.cmp", "answered");
        self.decide(answer, tx, &cert_req_id)
    }

    /// Polls a transaction; `None` when the CA does not know it (an error message to a
    /// request whose answer was lost: the CA never processed it, or its nonce is lost
    /// with the answer).
    fn poll(
        &mut self,
        mut tx: Transaction,
        cert_req_id: &[u8],
        state: CmpState,
    ) -> Result<Option<Requested>, RenewalError> {
        let old_der = self.old_cert()?;
        let old = TokenKey::new(self.token, self.old_key()?);
        let message =
            ukey_cmp::poll_req(&old_der, cert_req_id, &old, &mut tx).map_err(|e| old.error(e))?;
        let answer = match self.exchange(&message, &mut tx) {
            Ok(a) => a,
            Err(RenewalError::Refused(_)) if state == CmpState::Sent => return Ok(None),
            Err(e) => return Err(e),
        };
        if matches!(answer.read, Some(Answer::Error { .. })) {
            tracing::info!("the CA does not continue the CMP transaction; a new request follows");
            return Ok(None);
        }
        self.decide(answer, tx, cert_req_id).map(Some)
    }

    /// Reads an answer: the certificate, "waiting" (polled until the run's wait is
    /// over, then the renewal waits in its journal), or the CA's refusal.
    fn decide(
        &mut self,
        mut answer: Exchanged,
        mut tx: Transaction,
        cert_req_id: &[u8],
    ) -> Result<Requested, RenewalError> {
        let wait = self.cmp_options().map(|c| c.wait).unwrap_or_default();
        let started = Instant::now();
        loop {
            match answer.read.take() {
                Some(Answer::Issued {
                    cert_der, ca_certs, ..
                }) => {
                    let mut chain = std::mem::take(&mut answer.chain);
                    chain.extend(ca_certs);
                    // A CA that grants implicit confirmation (we never ask for it)
                    // wants no certConf.
                    let state = if answer.implicit_confirm {
                        CmpState::Confirmed
                    } else {
                        CmpState::Issued
                    };
                    self.record_transaction(&tx, cert_req_id, state, Some((&cert_der, &chain)))?;
                    return self.requested(cert_der, chain);
                }
                Some(Answer::Rejected { text }) => {
                    return Err(RenewalError::Rejected { reason: text });
                }
                Some(Answer::Error { text }) => {
                    return Err(RenewalError::Refused(Refusal::Answer(format!(
                        "the CA answered with an error: {text}"
                    ))));
                }
                None => {
                    return Err(RenewalError::Refused(Refusal::Answer(
                        "a pkiConf where the certificate was expected".into(),
                    )));
                }
                Some(Answer::Waiting { check_after, text }) => {
                    self.record_transaction(&tx, cert_req_id, CmpState::Waiting, None)?;
                    let pause = std::time::Duration::from_secs(check_after.unwrap_or(5).max(1));
                    if started.elapsed() + pause > wait {
                        return Err(RenewalError::UnderReview {
                            serial: self.j.old.serial.clone(),
                            reason: text,
                        });
                    }
                    std::thread::sleep(pause);
                    let old_der = self.old_cert()?;
                    let old = TokenKey::new(self.token, self.old_key()?);
                    let message = ukey_cmp::poll_req(&old_der, cert_req_id, &old, &mut tx)
                        .map_err(|e| old.error(e))?;
                    answer = self.exchange(&message, &mut tx)?;
                }
            }
        }
    }

    /// The CA's certificate as the Verify step takes it.
    fn requested(&self, cert: Vec<u8>, chain: Vec<Vec<u8>>) -> Result<Requested, RenewalError> {
        Ok(Requested {
            issued: IssueResponse {
                order_id: self.j.order_id.clone(),
                certificate_serial_hex: serial_of(&cert)?,
                certificate_der: cert,
                chain_der: chain,
                encryption: None,
            },
            transport: None,
        })
    }

    /// certConf for the written, self-tested certificate; done when the CA answers
    /// pkiConf (or granted implicit confirmation). Protected by the old key.
    ///
    /// A refusal of the first certConf rolls the renewal back (the CA keeps the old
    /// certificate valid). A certConf sent before an interruption may have reached the
    /// CA, which then no longer answers the resent one (its nonce moved on): the
    /// renewal goes on, its certificate valid either way.
    pub(crate) fn confirm_cmp(&mut self) -> Result<(), RenewalError> {
        let t =
            self.cmp_record()?.transaction.clone().ok_or_else(|| {
                RenewalError::Inconsistent("no CMP transaction to confirm".into())
            })?;
        if t.state == CmpState::Confirmed {
            return Ok(());
        }
        let resent = t.state == CmpState::ConfirmSent;
        let cert = der_of(t.cert_der_hex.as_deref().unwrap_or_default())?;
        let cert_req_id = bytes_of(&t.cert_req_id_hex)?;
        let mut tx = Self::transaction(&t)?;
        let old_der = self.old_cert()?;
        let old = TokenKey::new(self.token, self.old_key()?);
        let message = ukey_cmp::cert_conf(&old_der, &cert, &cert_req_id, &old, &mut tx)
            .map_err(|e| old.error(e))?;
        self.record_transaction(&tx, &cert_req_id, CmpState::ConfirmSent, None)?;
        failpoint("confirm", "before");
        let answer = match self.exchange(&message, &mut tx) {
            Ok(a) => a,
            Err(RenewalError::Refused(r)) if resent => {
                tracing::warn!(
                    "the resent certConf was not answered as expected ({r}); the first one reached the CA"
                );
                return self.record_transaction(&tx, &cert_req_id, CmpState::Confirmed, None);
            }
            Err(e) => return Err(e),
        };
        match answer.read {
            None => {}
            Some(_) if resent => {
                tracing::warn!("the resent certConf was refused; the first one reached the CA");
            }
            Some(Answer::Error { text } | Answer::Rejected { text }) => {
                return Err(RenewalError::Refused(Refusal::Answer(format!(
                    "the CA did not accept the confirmation: {text}"
                ))));
            }
            Some(_) => {
                return Err(RenewalError::Refused(Refusal::Answer(
                    "the CA answered the confirmation with something else than pkiConf".into(),
                )));
            }
        }
        failpoint("confirm", "after");
        self.record_transaction(&tx, &cert_req_id, CmpState::Confirmed, None)
    }
}

/// A checked answer, read.
struct Exchanged {
    /// The answer; `None` for a pkiConf.
    read: Option<Answer>,
    /// Whether the CA granted implicit confirmation.
    implicit_confirm: bool,
    /// The protecting certificate and the answer's other extra certificates.
    chain: Vec<Vec<u8>>,
}
