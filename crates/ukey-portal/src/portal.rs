//! The portal's behaviour, independent of HTTP: status lookups, challenges, issuing,
//! installation, CRLs and the business-side order operations. Every method is
//! synchronous (SQLite and CPU-bound crypto); the HTTP layer calls them on blocking
//! threads, the admin CLI calls them directly.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, RwLock};

use time::{Duration, OffsetDateTime};
use ukey_portal_api::{
    ApiError, ChallengeResponse, CreateOrderRequest, EncryptionIssue, ErrorCode, InitialState,
    InstalledRequest, InstalledResponse, IssueRequest, IssueResponse, KeyAlgorithm, KeyPolicy,
    NONCE_LEN, OrderView, RenewalStatus, StatusRequest, challenge_signed_data,
    installed_signed_data, normalize_serial_hex, paths,
};
use x509_parser::certificate::X509Certificate;
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::prelude::FromDer;

use crate::Error;
use crate::ca::{Ca, Revoked, Usage};
use crate::crypto::{self, KeyKind, sha256};
use crate::envelope;
use crate::names::{self, NameKey};
use crate::store::{
    Freshness, IssueCommit, NewIssuance, NewOrder, Order, OrderState, RENEWAL_CODE_TRIES, Store,
    StoredCert,
};

/// How to open a portal.
#[derive(Debug, Clone)]
pub struct PortalConfig {
    /// Data directory (database, CA, admin token).
    pub data_dir: PathBuf,
    /// CA certificate (PEM bundle) and key to import into the data directory.
    pub ca_import: Option<(PathBuf, PathBuf)>,
    /// Lifetime of a challenge.
    pub challenge_ttl: Duration,
    /// The key of a CA the portal makes (no CA imported and none in the data dir yet).
    pub ca_alg: crate::ca::CaAlg,
    /// CMP settings.
    pub cmp: CmpSettings,
    /// Where the store lives; `None`: [`DB_FILE`] (SQLite) in the data directory.
    pub database: Option<crate::store::Database>,
    /// Challenges per order and pay-page views per serial, a minute (0: no limit).
    pub rate_per_subject: u32,
    /// The same per client address (0: no limit).
    pub rate_per_address: u32,
    /// How long a connection may take to send a request's headers.
    pub header_read_timeout: std::time::Duration,
    /// A CA key in the HSM to make the data directory's CA (`--ca-key pkcs11:…`).
    pub ca_hsm_import: Option<crate::ca::HsmCaImport>,
    /// The HSM (`--hsm-module` …): the escrow's key-encryption key on `token`, and a CA
    /// key in it.
    pub hsm: Option<crate::hsm::HsmSettings>,
}

/// How the CMP server judges time.
#[derive(Debug, Clone, Copy)]
pub struct CmpSettings {
    /// Largest difference between a request's messageTime and the portal's clock.
    pub cmp_message_window: Duration,
    /// How long after issuance a certConf is accepted (a client may resume late).
    pub cmp_confirm_window: Duration,
    /// The checkAfter of a pollRep, seconds.
    pub cmp_check_after: u64,
}

impl Default for CmpSettings {
    /// 5 minutes, 7 days, 60 seconds.
    fn default() -> CmpSettings {
        CmpSettings {
            cmp_message_window: Duration::minutes(5),
            cmp_confirm_window: Duration::days(7),
            cmp_check_after: 60,
        }
    }
}

impl PortalConfig {
    /// Defaults: no import, 5-minute challenges.
    pub fn new(data_dir: impl Into<PathBuf>) -> PortalConfig {
        PortalConfig {
            data_dir: data_dir.into(),
            ca_import: None,
            challenge_ttl: Duration::minutes(5),
            ca_alg: crate::ca::CaAlg::default(),
            cmp: CmpSettings::default(),
            database: None,
            rate_per_subject: 0,
            rate_per_address: 0,
            header_read_timeout: crate::http::HEADER_READ_TIMEOUT,
            ca_hsm_import: None,
            hsm: None,
        }
    }
}

/// Name of the database file in the data directory.
pub const DB_FILE: &str = "portal.sqlite3";
/// Name of the admin bearer token file in the data directory.
pub const ADMIN_TOKEN_FILE: &str = "admin-token";

/// What [`Portal::issue_checked`] is asked: the order, the certificate being renewed
/// (its key's possession proven by the protocol), the requested subject and key.
#[derive(Debug)]
pub(crate) struct IssueAsk<'a> {
    pub order: &'a Order,
    pub old: &'a X509Certificate<'a>,
    /// The requested subject's normal form (`None`: the old certificate's).
    pub subject: Option<NameKey>,
    /// The requested key, SubjectPublicKeyInfo DER.
    pub spki_der: &'a [u8],
    /// The REST request's transport key.
    pub transport_key_spki: Option<&'a [u8]>,
    /// The renewal code the request carries.
    pub renewal_code: Option<&'a str>,
    /// The SKI of the issuer key the old certificate chains to ([`Portal::check_renewed`]).
    pub issuer_ski: &'a str,
    pub freshness: Freshness,
    pub t: OffsetDateTime,
}

/// What [`Portal::issue_checked`] issued (or had issued for the same key).
#[derive(Debug)]
pub(crate) struct Issuance<'a> {
    pub signing: StoredCert,
    pub encryption: Option<StoredCert>,
    /// The key the escrowed key is sealed to.
    pub transport: Option<&'a [u8]>,
}

/// A reference renewal portal over one data directory.
#[derive(Debug)]
pub struct Portal {
    store: Store,
    ca: Ca,
    admin_token: String,
    public_url: RwLock<Option<String>>,
    challenge_ttl: Duration,
    cmp: CmpSettings,
    cmp_identity: crate::ca::CmpIdentity,
    /// Per CA key (SKI): the CRL last made.
    crl_cache: Mutex<std::collections::HashMap<String, CachedCrl>>,
    limits: crate::limit::Limits,
    header_read_timeout: std::time::Duration,
    /// The HSM key-encryption key sealing escrowed keys (`None`: stored in clear).
    kek: Option<crate::hsm::Kek>,
}

/// What [`Portal::seal_escrow_at_rest`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SealReport {
    /// Escrowed keys that were stored in clear, now sealed.
    pub sealed: usize,
    /// Escrowed keys sealed under another key-encryption key, now under this one.
    pub resealed: usize,
    /// Escrowed keys already sealed under this one.
    pub already: usize,
}

/// A CRL as made: its number, when (Unix seconds), its DER.
type CachedCrl = (u64, i64, Vec<u8>);

fn api(code: ErrorCode, message: impl Into<String>) -> Error {
    Error::Api(ApiError::new(code, message))
}

fn now() -> OffsetDateTime {
    OffsetDateTime::now_utc()
}

impl Portal {
    /// Opens (creating if needed) the data directory: database, CA, admin token.
    pub fn open(config: &PortalConfig) -> Result<Portal, Error> {
        let dir = &config.data_dir;
        crate::datadir::prepare(dir).map_err(Error::Setup)?;
        let import = config
            .ca_import
            .as_ref()
            .map(|(c, k)| (c.as_path(), k.as_path()));
        // The HSM first: a wrong PIN, a missing token or key-encryption key stops the
        // portal before anything is written.
        let hsm = match &config.hsm {
            Some(s) => Some(crate::hsm::Hsm::open(&s.module, s.pin.clone())?),
            None => None,
        };
        let kek = match (&hsm, &config.hsm) {
            (Some(h), Some(s)) => match &s.token {
                Some(token) => Some(h.kek(token, &s.kek_label)?),
                None => None,
            },
            _ => None,
        };
        let ca = Ca::open_with(
            dir,
            import,
            config.ca_hsm_import.as_ref(),
            config.ca_alg,
            hsm.as_deref(),
        )?;
        if hsm.is_some() && kek.is_none() && ca.hsm_uri().is_none() {
            return Err(Error::Setup(
                "给出了 --hsm-module，但既没有 --hsm-token（托管密钥的密钥加密密钥）也没有 HSM 中的 CA 私钥 / \
                 --hsm-module is given, but neither --hsm-token (the escrow's key-encryption key) nor a pkcs11: CA key uses the HSM"
                    .into(),
            ));
        }
        let store = match &config.database {
            Some(database) => Store::connect(database)?,
            None => {
                crate::datadir::create_private(&dir.join(DB_FILE)).map_err(Error::Setup)?;
                Store::open(&dir.join(DB_FILE))?
            }
        };
        resolve_issuers(&store, &ca)?;
        let admin_token = load_or_create_token(dir)?;
        let cmp_identity = ca.cmp_identity(dir, now())?;
        // What this start wrote is the owner's alone too.
        crate::datadir::check(dir).map_err(Error::Setup)?;
        Ok(Portal {
            store,
            ca,
            admin_token,
            public_url: RwLock::new(None),
            challenge_ttl: config.challenge_ttl,
            cmp: config.cmp,
            cmp_identity,
            crl_cache: Mutex::new(std::collections::HashMap::new()),
            limits: crate::limit::Limits::new(config.rate_per_subject, config.rate_per_address),
            header_read_timeout: config.header_read_timeout,
            kek,
        })
    }

    /// The HSM key-encryption key sealing escrowed keys, if the portal has one.
    pub fn escrow_kek(&self) -> Option<&crate::hsm::Kek> {
        self.kek.as_ref()
    }

    /// How many escrowed keys the database holds in clear (stored before the HSM).
    pub fn escrow_in_clear(&self) -> Result<i64, Error> {
        self.store.escrow_in_clear()
    }

    /// `ukey-portal hsm seal`: every escrowed key the database holds in clear (stored
    /// before the portal had an HSM) is sealed under the key-encryption key, and every
    /// one sealed under another key of the token (before a rotation) is sealed again
    /// under this one; then the storage is rewritten so that the old values are gone
    /// from its files. Each key is replaced only if its row still holds what was read.
    pub fn seal_escrow_at_rest(&self) -> Result<SealReport, Error> {
        let Some(kek) = self.kek.as_ref() else {
            return Err(Error::Setup(
                "hsm seal 需要 --hsm-module 与 --hsm-token / hsm seal needs --hsm-module and --hsm-token (the key-encryption key)"
                    .into(),
            ));
        };
        let mut report = SealReport::default();
        for serial in self.store.escrow_serials()? {
            let Some(stored) = self
                .store
                .certificate(&serial)?
                .and_then(|c| c.escrow_pkcs8)
            else {
                continue;
            };
            if kek.sealed_here(&serial, &stored) {
                report.already += 1;
                continue;
            }
            let was_clear = !crate::hsm::is_sealed(&stored);
            let pkcs8 = crate::hsm::open_escrow(Some(kek), &serial, &stored)?;
            let sealed = kek.seal(&serial, &pkcs8)?;
            if self.store.replace_escrow(&serial, &stored, &sealed)? {
                if was_clear {
                    report.sealed += 1;
                } else {
                    report.resealed += 1;
                }
            }
        }
        if report.sealed + report.resealed > 0 {
            self.store.compact_certificates()?;
        }
        Ok(report)
    }

    /// Sets the externally visible base URL (payment links, CRL distribution point).
    pub fn set_public_url(&self, url: &str) {
        let mut guard = self.public_url.write().unwrap_or_else(|p| p.into_inner());
        *guard = Some(url.trim_end_matches('/').to_owned());
    }

    fn public_url(&self) -> Option<String> {
        self.public_url
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The CMP settings.
    pub fn cmp_settings(&self) -> &CmpSettings {
        &self.cmp
    }

    /// What protects CMP answers.
    pub fn cmp_identity(&self) -> &crate::ca::CmpIdentity {
        &self.cmp_identity
    }

    /// The CA.
    pub fn ca(&self) -> &Ca {
        &self.ca
    }

    /// How long a connection may take to send a request's headers.
    pub fn header_read_timeout(&self) -> std::time::Duration {
        self.header_read_timeout
    }

    /// This instance's rate limits.
    pub fn limits(&self) -> &crate::limit::Limits {
        &self.limits
    }

    /// The orders for certificates with this serial (any issuer), newest first.
    pub fn orders_for_serial(&self, serial_hex: &str) -> Result<Vec<OrderView>, Error> {
        self.store
            .orders_for_serial(serial_hex)?
            .iter()
            .map(|o| self.view(o))
            .collect()
    }

    /// The store (tests dump it).
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Constant-time check of an admin bearer token.
    pub fn admin_token_matches(&self, presented: &str) -> bool {
        aws_lc_rs::constant_time::verify_slices_are_equal(
            presented.as_bytes(),
            self.admin_token.as_bytes(),
        )
        .is_ok()
    }

    fn issuer_key(&self, der: Option<&[u8]>, dn: Option<&str>) -> Result<(NameKey, String), Error> {
        match (der, dn) {
            (Some(der), _) => {
                let key = names::key_of_name_der(der)
                    .map_err(|e| api(ErrorCode::InvalidIssuer, e.to_string()))?;
                let (_, name) = x509_parser::x509::X509Name::from_der(der)
                    .map_err(|e| api(ErrorCode::InvalidIssuer, e.to_string()))?;
                Ok((key, names::display_name(&name)))
            }
            (None, Some(dn)) => {
                let key = names::key_of_dn_string(dn)
                    .map_err(|e| api(ErrorCode::InvalidIssuer, e.to_string()))?;
                let display = if key == *self.ca.name_key() {
                    self.ca.display_name().to_owned()
                } else {
                    dn.trim().to_owned()
                };
                Ok((key, display))
            }
            (None, None) => Err(api(
                ErrorCode::InvalidIssuer,
                "give issuer_der or issuer_dn",
            )),
        }
    }

    // ---- client-facing protocol ---------------------------------------------------------

    /// `POST /api/v1/status`.
    pub fn status(&self, req: &StatusRequest) -> Result<RenewalStatus, Error> {
        let (issuer, _) = self.issuer_key(req.issuer_der.as_deref(), req.issuer_dn.as_deref())?;
        let serial = normalize_serial_hex(&req.serial_hex)
            .map_err(|e| api(ErrorCode::InvalidSerial, e.to_string()))?;
        let Some(order) = self.store.latest_order_for(&issuer, &serial)? else {
            return Ok(RenewalStatus::None);
        };
        let order_id = order.id.clone();
        let terms = order.terms.clone();
        Ok(match order.state {
            OrderState::AwaitingPayment => RenewalStatus::AwaitingPayment {
                order_id,
                payment_url: self.payment_url(&serial),
                terms,
            },
            OrderState::Ready => RenewalStatus::Ready {
                order_id,
                terms,
                renewal_code_required: order.renewal_code.is_some(),
            },
            OrderState::Issued => RenewalStatus::Issued {
                order_id,
                terms,
                certificate_serial_hex: order.current_signing_serial.unwrap_or_default(),
                renewal_code_required: order.renewal_code.is_some(),
            },
            OrderState::Completed => RenewalStatus::Completed {
                order_id,
                certificate_serial_hex: order.current_signing_serial.unwrap_or_default(),
            },
            OrderState::RequiresNewKey => RenewalStatus::RequiresNewKey {
                order_id,
                terms,
                tracking_number: order.tracking_number.unwrap_or_default(),
            },
            OrderState::UnderReview => RenewalStatus::UnderReview { order_id, terms },
            OrderState::Rejected => RenewalStatus::Rejected {
                order_id,
                reason: order.reject_reason.unwrap_or_default(),
            },
        })
    }

    fn payment_url(&self, serial: &str) -> String {
        let base = self.public_url().unwrap_or_default();
        format!("{base}{}?serial={serial}", paths::PAY_PAGE)
    }

    fn order_or_404(&self, order_id: &str) -> Result<Order, Error> {
        self.store
            .order(order_id)?
            .ok_or_else(|| api(ErrorCode::OrderNotFound, format!("no order {order_id}")))
    }

    fn require_issuable(order: &Order) -> Result<(), Error> {
        match order.state {
            OrderState::Ready | OrderState::Issued => Ok(()),
            OrderState::Completed => Err(api(
                ErrorCode::OrderCompleted,
                "the order is already completed",
            )),
            other => Err(api(
                ErrorCode::OrderNotReady,
                format!("the order is {}", other.as_str()),
            )),
        }
    }

    /// `POST /api/v1/orders/{id}/challenge`.
    pub fn challenge(&self, order_id: &str) -> Result<ChallengeResponse, Error> {
        let nonce =
            crypto::random_bytes(NONCE_LEN).map_err(|_| Error::Setup("RNG failure".into()))?;
        let id = crypto::random_id("ch").map_err(|_| Error::Setup("RNG failure".into()))?;
        let t = now();
        let expires_at = t + self.challenge_ttl;
        let expires_unix = expires_at.unix_timestamp();
        self.store.insert_challenge(
            &crate::store::Challenge {
                id: id.clone(),
                order_id: order_id.to_owned(),
                nonce: nonce.clone(),
                expires_at: expires_unix,
                used_at: None,
            },
            t.unix_timestamp(),
            &Self::require_issuable,
        )?;
        Ok(ChallengeResponse {
            challenge_id: id,
            nonce,
            expires_at: OffsetDateTime::from_unix_timestamp(expires_unix).unwrap_or(expires_at),
        })
    }

    /// `POST /api/v1/orders/{id}/issue`: the REST protocol's proof (the single-use
    /// challenge signed by the old key, the CSR's self-signature), then the checks and
    /// issuance shared with CMP.
    pub fn issue(&self, order_id: &str, req: &IssueRequest) -> Result<IssueResponse, Error> {
        let t = now();
        // The old certificate's issuer key and serial first (no I/O), so that the order,
        // the challenge and the certificate's revocation are read in one round trip;
        // the checks then run in their order.
        let parsed = parse_certificate(&req.old_certificate_der);
        let ask_revoked = match &parsed {
            Ok(old) => (
                self.ca
                    .issuer_of(old)
                    .map(|t| t.ski.clone())
                    .unwrap_or_default(),
                ukey_portal_api::serial_hex_from_bytes(old.raw_serial()),
            ),
            Err(_) => Default::default(),
        };
        let read = self
            .store
            .order_with_challenge(
                order_id,
                &req.challenge_id,
                (&ask_revoked.0, &ask_revoked.1),
            )?
            .ok_or_else(|| api(ErrorCode::OrderNotFound, format!("no order {order_id}")))?;
        let (order, challenge) = (read.order, read.challenge);
        Self::require_issuable(&order)?;

        let challenge = challenge.ok_or_else(|| {
            api(
                ErrorCode::ChallengeNotFound,
                format!("no challenge {} for this order", req.challenge_id),
            )
        })?;
        if challenge.used_at.is_some() {
            return Err(api(
                ErrorCode::ChallengeUsed,
                "the challenge was already used",
            ));
        }
        if challenge.expires_at <= t.unix_timestamp() {
            return Err(api(
                ErrorCode::ChallengeExpired,
                "the challenge expired; ask for a new one",
            ));
        }

        let old = parsed?;
        let issuer_ski = self.check_renewed_known(&order, &old, true, Some(read.revoked))?;
        let signed = challenge_signed_data(
            &order.id,
            &challenge.nonce,
            &req.csr_der,
            req.transport_key_spki.as_deref(),
        );
        if !crypto::verify(
            old.public_key(),
            req.signature_algorithm,
            &signed,
            &req.challenge_signature,
        ) {
            return Err(api(
                ErrorCode::ChallengeSignatureInvalid,
                "the challenge signature does not verify with the certificate's key",
            ));
        }

        let csr = parse_csr(&req.csr_der)?;
        let info = &csr.certification_request_info;
        if !crypto::csr_signature_ok(&csr) {
            return Err(api(
                ErrorCode::CsrSignatureInvalid,
                "the CSR's signature does not verify",
            ));
        }
        let issued = self.issue_checked(&IssueAsk {
            order: &order,
            old: &old,
            subject: Some(names::key_of_name(&info.subject)),
            spki_der: info.subject_pki.raw,
            transport_key_spki: req.transport_key_spki.as_deref(),
            renewal_code: req.renewal_code.as_deref(),
            issuer_ski: &issuer_ski,
            freshness: Freshness::Challenge(challenge.id.clone()),
            t,
        })?;
        self.response(
            &order,
            &issued.signing,
            issued.encryption.as_ref(),
            issued.transport,
        )
    }

    /// The certificate being renewed (its holder proved possession of its key): the
    /// one the order renews, issued by this portal's CA (or a retired or accepted
    /// one), and (for a new request) not revoked. Returns its issuer key's SKI.
    pub(crate) fn check_renewed(
        &self,
        order: &Order,
        old: &X509Certificate<'_>,
        not_revoked: bool,
    ) -> Result<String, Error> {
        self.check_renewed_known(order, old, not_revoked, None)
    }

    /// [`Portal::check_renewed`], with the certificate's revocation already read
    /// (`known`), else asked here.
    fn check_renewed_known(
        &self,
        order: &Order,
        old: &X509Certificate<'_>,
        not_revoked: bool,
        known: Option<bool>,
    ) -> Result<String, Error> {
        let old_serial = ukey_portal_api::serial_hex_from_bytes(old.raw_serial());
        if names::key_of_name(old.issuer()) != order.issuer_key || old_serial != order.serial_hex {
            return Err(api(
                ErrorCode::CertificateMismatch,
                format!(
                    "this order renews certificate {} of {}, not {old_serial}",
                    order.serial_hex, order.issuer_display
                ),
            ));
        }
        let Some(issuer) = self.ca.issuer_of(old) else {
            return Err(api(
                ErrorCode::CertificateNotTrusted,
                "the certificate was not issued by this portal's CA",
            ));
        };
        let revoked = match known {
            Some(r) => r,
            None => not_revoked && self.store.is_revoked(&issuer.ski, &old_serial)?,
        };
        if not_revoked && revoked {
            return Err(api(
                ErrorCode::CertificateRevoked,
                "the certificate is revoked",
            ));
        }
        Ok(issuer.ski.clone())
    }

    /// The issuer key of the certificate `order` renews when no request recorded it
    /// (an order issued before keys were recorded): the first trusted issuer of its name.
    pub(crate) fn renewed_issuer_fallback(&self, order: &Order) -> String {
        self.ca
            .ski_for_name(&order.issuer_key)
            .unwrap_or(crate::store::UNKNOWN_ISSUER)
            .to_owned()
    }

    /// The order's renewal code, when it has one: the request must carry it. A wrong
    /// code counts against the order (only requests that proved possession of the old
    /// key get here, so a stranger cannot use up the tries); after
    /// [`RENEWAL_CODE_TRIES`] wrong codes every code is refused. The comparison takes the
    /// same time whatever the code.
    pub(crate) fn check_renewal_code(
        &self,
        order: &Order,
        given: Option<&str>,
        t: OffsetDateTime,
    ) -> Result<(), Error> {
        let Some(expected) = order.renewal_code.as_deref() else {
            return Ok(());
        };
        let exhausted = || {
            api(
                ErrorCode::RenewalCodeInvalid,
                format!(
                    "续期码错误次数过多，请联系 CA 客服 / too many wrong renewal codes for order {}: contact the CA's support",
                    order.id
                ),
            )
        };
        if order.renewal_code_failures >= RENEWAL_CODE_TRIES {
            return Err(exhausted());
        }
        let Some(given) = given else {
            return Err(api(
                ErrorCode::RenewalCodeRequired,
                "此次续期需要续期码（见已付款的订单页面）/ this renewal needs the renewal code shown on the paid order page",
            ));
        };
        let given = ukey_portal_api::canonical_renewal_code(given).unwrap_or_default();
        if crypto::constant_time_eq(given.as_bytes(), expected.as_bytes()) {
            return Ok(());
        }
        let failures = self
            .store
            .renewal_code_failed(&order.id, t.unix_timestamp())?;
        if failures >= RENEWAL_CODE_TRIES {
            return Err(exhausted());
        }
        Err(api(
            ErrorCode::RenewalCodeInvalid,
            format!(
                "续期码不正确，还可尝试 {} 次 / wrong renewal code: {} tries left",
                RENEWAL_CODE_TRIES - failures,
                RENEWAL_CODE_TRIES - failures
            ),
        ))
    }

    /// The checks every protocol shares, then issuance: subject, algorithm and key
    /// policy against the order, the escrowed key's recipient, an idempotent repeat
    /// for the same key, and the commit that consumes the request's freshness. The
    /// caller has checked the proof of possession of the old key and of the new one.
    pub(crate) fn issue_checked<'a>(&self, ask: &IssueAsk<'a>) -> Result<Issuance<'a>, Error> {
        let (order, old, t) = (ask.order, ask.old, ask.t);
        Self::require_issuable(order)?;
        self.check_renewal_code(order, ask.renewal_code, t)?;
        if ask
            .subject
            .as_ref()
            .is_some_and(|s| *s != names::key_of_name(old.subject()))
        {
            return Err(api(
                ErrorCode::SubjectMismatch,
                "the requested subject differs from the certificate being renewed",
            ));
        }
        let (rest, new_spki) = x509_parser::x509::SubjectPublicKeyInfo::from_der(ask.spki_der)
            .map_err(|e| api(ErrorCode::MalformedCsr, format!("the requested key: {e}")))?;
        if !rest.is_empty() {
            return Err(api(
                ErrorCode::MalformedCsr,
                "trailing bytes after the requested key",
            ));
        }
        let csr_kind = KeyKind::of(&new_spki);
        let csr_alg = csr_kind.algorithm().ok_or_else(|| {
            api(
                ErrorCode::UnsupportedAlgorithm,
                format!("unsupported key {}", csr_kind.describe()),
            )
        })?;
        if csr_alg != order.terms.target_algorithm {
            return Err(api(
                ErrorCode::AlgorithmMismatch,
                format!(
                    "the order is for {}, the request carries {csr_alg}",
                    order.terms.target_algorithm
                ),
            ));
        }
        let same_key = new_spki.algorithm.algorithm == old.public_key().algorithm.algorithm
            && new_spki.subject_public_key.as_ref() == old.public_key().subject_public_key.as_ref();
        match (order.terms.key_policy, same_key) {
            (KeyPolicy::New, true) => {
                return Err(api(
                    ErrorCode::KeyPolicyViolation,
                    "the order requires a new key; the request reuses the old one",
                ));
            }
            (KeyPolicy::Same, false) => {
                return Err(api(
                    ErrorCode::KeyPolicyViolation,
                    "the order keeps the old key; the request carries another one",
                ));
            }
            _ => {}
        }
        let csr_spki = ask.spki_der;
        let spki_hash = sha256(csr_spki);
        // The escrowed key goes to a key made for that purpose, never to a signing key;
        // except an SM2 one, which GM/T 0092 envelopes to the new signing key (the CSR's,
        // covered by the challenge signature through the CSR's hash).
        let transport = match (
            order.terms.with_encryption_cert,
            order.terms.target_algorithm,
        ) {
            (false, _) => None,
            (true, KeyAlgorithm::Sm2) => {
                if ask.transport_key_spki.is_some() {
                    return Err(api(
                        ErrorCode::TransportKeyInvalid,
                        "an SM2 order's escrowed key is enveloped to the new signing key (GM/T 0092): the request must carry no transport key",
                    ));
                }
                Some(csr_spki)
            }
            (true, _) => Some(transport_key(
                ask.transport_key_spki,
                csr_spki,
                old.public_key().raw,
            )?),
        };

        if order.state == OrderState::Issued
            && order.current_spki_sha256.as_deref() == Some(spki_hash.as_slice())
        {
            let (signing, encryption) = self.current_certs(order)?;
            self.store.commit_repeat(
                &ask.freshness.with_serial(&signing.serial_hex),
                &order.id,
                &spki_hash,
                t.unix_timestamp(),
            )?;
            return Ok(Issuance {
                signing,
                encryption,
                transport,
            });
        }

        // The CRL of the key that signs, not "the CA's": after a rollover that is
        // another CRL.
        let crl_url = self
            .public_url()
            .map(|u| format!("{u}{}", paths::crl_of_key(self.ca.ski())));
        let years = order.terms.years;
        let issued = self
            .ca
            .issue(
                old.subject(),
                csr_spki,
                Usage::Signing,
                years,
                crl_url.as_deref(),
                t,
            )
            .map_err(|e| match e {
                crate::ca::CaError::UnsupportedSubject(m) => api(
                    ErrorCode::SubjectMismatch,
                    format!("the subject cannot be reproduced: {m}"),
                ),
                other => Error::Ca(other),
            })?;
        let signing = StoredCert {
            serial_hex: issued.serial_hex,
            order_id: order.id.clone(),
            kind: "signing".into(),
            spki_sha256: spki_hash.clone(),
            der: issued.der,
            subject: issued.subject,
            escrow_pkcs8: None,
            issuer_ski: Some(self.ca.ski().to_owned()),
        };
        let encryption = if order.terms.with_encryption_cert {
            let alg = order.terms.target_algorithm;
            let escrow = envelope::generate_escrow_key(alg)?;
            let pkcs8 = zeroize::Zeroizing::new(escrow.pkcs8);
            let usage = Usage::Encryption {
                ec: alg == KeyAlgorithm::EcP256,
            };
            let enc = self.ca.issue(
                old.subject(),
                &escrow.spki,
                usage,
                years,
                crl_url.as_deref(),
                t,
            )?;
            // Sealed under the HSM's key-encryption key before it reaches the database.
            let stored = crate::hsm::seal_escrow(self.kek.as_ref(), &enc.serial_hex, &pkcs8)?;
            Some(StoredCert {
                serial_hex: enc.serial_hex,
                order_id: order.id.clone(),
                kind: "encryption".into(),
                spki_sha256: sha256(&escrow.spki),
                der: enc.der,
                subject: enc.subject,
                escrow_pkcs8: Some(stored),
                issuer_ski: Some(self.ca.ski().to_owned()),
            })
        } else {
            None
        };
        let new = NewIssuance {
            order_id: order.id.clone(),
            freshness: ask.freshness.with_serial(&signing.serial_hex),
            spki_sha256: spki_hash,
            renewed_issuer_ski: ask.issuer_ski.to_owned(),
            signing,
            encryption,
        };
        match self.store.commit_issue(&new, t.unix_timestamp())? {
            IssueCommit::Issued => Ok(Issuance {
                signing: new.signing,
                encryption: new.encryption,
                transport,
            }),
            // A concurrent identical request won: its certificates. (Over CMP the
            // transaction records this request's serial; the other is the same key's.)
            IssueCommit::Existing {
                signing,
                encryption,
            } => Ok(Issuance {
                signing: *signing,
                encryption: encryption.map(|e| *e),
                transport,
            }),
        }
    }

    fn current_certs(&self, order: &Order) -> Result<(StoredCert, Option<StoredCert>), Error> {
        let signing = order
            .current_signing_serial
            .as_deref()
            .map(|s| self.store.certificate(s))
            .transpose()?
            .flatten()
            .ok_or_else(|| {
                Error::Setup(format!(
                    "order {} is issued but has no certificate",
                    order.id
                ))
            })?;
        let encryption = match order.current_encryption_serial.as_deref() {
            Some(s) => self.store.certificate(s)?,
            None => None,
        };
        Ok((signing, encryption))
    }

    fn response(
        &self,
        order: &Order,
        signing: &StoredCert,
        encryption: Option<&StoredCert>,
        transport: Option<&[u8]>,
    ) -> Result<IssueResponse, Error> {
        let encryption = match (encryption, transport) {
            (None, _) => None,
            (Some(enc), None) => {
                return Err(Error::Setup(format!(
                    "order {} has encryption certificate {} but no transport key was checked",
                    order.id, enc.serial_hex
                )));
            }
            (Some(enc), Some(recipient_spki)) => {
                let stored = enc.escrow_pkcs8.as_deref().ok_or_else(|| {
                    Error::Setup(format!(
                        "encryption certificate {} has no escrow key",
                        enc.serial_hex
                    ))
                })?;
                let pkcs8 = crate::hsm::open_escrow(self.kek.as_ref(), &enc.serial_hex, stored)?;
                let pkcs8 = pkcs8.as_slice();
                let (envelope, gm_enveloped_key) = match order.terms.target_algorithm {
                    KeyAlgorithm::Sm2 => (None, Some(envelope::seal_gm(recipient_spki, pkcs8)?)),
                    alg => (Some(envelope::seal(recipient_spki, pkcs8, alg)?), None),
                };
                Some(EncryptionIssue {
                    certificate_serial_hex: enc.serial_hex.clone(),
                    certificate_der: enc.der.clone(),
                    envelope,
                    gm_enveloped_key,
                })
            }
        };
        Ok(IssueResponse {
            order_id: order.id.clone(),
            certificate_serial_hex: signing.serial_hex.clone(),
            certificate_der: signing.der.clone(),
            chain_der: self.ca.chain_der().to_vec(),
            encryption,
        })
    }

    /// `POST /api/v1/orders/{id}/installed`.
    pub fn installed(
        &self,
        order_id: &str,
        req: &InstalledRequest,
    ) -> Result<InstalledResponse, Error> {
        let order = self.order_or_404(order_id)?;
        let serial = normalize_serial_hex(&req.certificate_serial_hex)
            .map_err(|e| api(ErrorCode::InvalidSerial, e.to_string()))?;
        let cert = self
            .store
            .certificate(&serial)?
            .filter(|c| c.order_id == order.id && c.kind == "signing")
            .ok_or_else(|| match order.state {
                OrderState::Completed => api(
                    ErrorCode::AlreadyInstalled,
                    "the order was completed with another certificate",
                ),
                _ => api(
                    ErrorCode::CertificateNotIssued,
                    format!("this order did not issue certificate {serial}"),
                ),
            })?;
        let parsed = parse_certificate(&cert.der)?;
        let data = installed_signed_data(&order.id, &serial);
        if !crypto::verify(
            parsed.public_key(),
            req.signature_algorithm,
            &data,
            &req.signature,
        ) {
            return Err(api(
                ErrorCode::InstalledSignatureInvalid,
                "the signature does not verify with the issued certificate's key",
            ));
        }
        let revoked = self.store.commit_installed(
            &order.id,
            &serial,
            None,
            &self.renewed_issuer_fallback(&order),
            now().unix_timestamp(),
        )?;
        Ok(InstalledResponse {
            order_id: order.id,
            revoked_serials_hex: revoked,
        })
    }

    /// The issuing CA's current CRL, DER (cached until a revocation or for an hour).
    pub fn crl(&self) -> Result<Vec<u8>, Error> {
        self.crl_of_key(self.ca.ski())
    }

    /// The current CRL of the CA key `ski` (lower-case hex): the issuing CA's or a
    /// retired one's, signed by that key; `not_found` for a key the portal does not hold.
    pub fn crl_of_key(&self, ski: &str) -> Result<Vec<u8>, Error> {
        let Some(ca) = self.ca.by_ski(&ski.to_ascii_lowercase()) else {
            return Err(api(
                ErrorCode::CaKeyNotFound,
                format!(
                    "门户没有密钥标识为 {ski} 的 CA 密钥 / this portal holds no CA key with the key identifier {ski}"
                ),
            ));
        };
        let (number, entries) = self.store.crl_entries(ca.ski())?;
        let t = now();
        let mut cache = self.crl_cache.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((n, at, der)) = cache.get(ca.ski()) {
            if *n == number && t.unix_timestamp() - at < 3600 {
                return Ok(der.clone());
            }
        }
        let revoked: Vec<Revoked> = entries
            .into_iter()
            .map(|(serial_hex, at, reason)| Revoked {
                serial_hex,
                revoked_at: OffsetDateTime::from_unix_timestamp(at).unwrap_or(t),
                reason: crate::ca::Reason::parse(&reason).unwrap_or(crate::ca::Reason::Superseded),
            })
            .collect();
        let der = ca.crl(&revoked, number, t)?;
        cache.insert(
            ca.ski().to_owned(),
            (number, t.unix_timestamp(), der.clone()),
        );
        Ok(der)
    }

    // ---- business side ------------------------------------------------------------------

    /// Creates an order.
    pub fn create_order(&self, req: &CreateOrderRequest) -> Result<OrderView, Error> {
        if !(1..=10).contains(&req.years) {
            return Err(api(
                ErrorCode::InvalidArgument,
                format!("years must be 1 to 10, not {}", req.years),
            ));
        }
        if !self.ca.issues(req.target_algorithm) {
            return Err(api(
                ErrorCode::UnsupportedAlgorithm,
                format!(
                    "this portal's CA ({}) cannot issue {} certificates: SM2 needs an SM2 CA (--ca-alg sm2 or an SM2 --ca-key), RSA-2048 and EC-P256 an RSA or EC CA",
                    self.ca.display_name(),
                    req.target_algorithm
                ),
            ));
        }
        let serial = normalize_serial_hex(&req.serial_hex)
            .map_err(|e| api(ErrorCode::InvalidSerial, e.to_string()))?;
        let (issuer_key, issuer_display) = if req.issuer_der.is_none() && req.issuer_dn.is_none() {
            (
                self.ca.name_key().clone(),
                self.ca.display_name().to_owned(),
            )
        } else {
            self.issuer_key(req.issuer_der.as_deref(), req.issuer_dn.as_deref())?
        };
        let old_enc = req
            .old_encryption_serial_hex
            .as_deref()
            .map(normalize_serial_hex)
            .transpose()
            .map_err(|e| api(ErrorCode::InvalidSerial, e.to_string()))?;
        let new = NewOrder {
            issuer_key,
            issuer_display,
            serial_hex: serial,
            terms: ukey_portal_api::OrderTerms {
                years: req.years,
                key_policy: req.key_policy,
                target_algorithm: req.target_algorithm,
                with_encryption_cert: req.with_encryption_cert,
            },
            old_encryption_serial_hex: old_enc,
            state: match req.state {
                InitialState::AwaitingPayment => OrderState::AwaitingPayment,
                InitialState::Ready => OrderState::Ready,
            },
            renewal_code: if self.store.renewal_code_required()? {
                Some(crypto::renewal_code().map_err(|_| Error::Setup("RNG failure".into()))?)
            } else {
                None
            },
        };
        let id = crypto::random_id("ord").map_err(|_| Error::Setup("RNG failure".into()))?;
        let order = self.store.create_order(&new, &id, now().unix_timestamp())?;
        self.view(&order)
    }

    /// One order, admin view.
    pub fn show_order(&self, order_id: &str) -> Result<OrderView, Error> {
        let order = self.order_or_404(order_id)?;
        self.view(&order)
    }

    /// Whether orders made from now on carry a renewal code (a portal-wide policy kept in
    /// the database, so that every instance follows it).
    pub fn set_renewal_code_required(&self, on: bool) -> Result<(), Error> {
        self.store.set_renewal_code_required(on)
    }

    /// The renewal-code policy.
    pub fn renewal_code_required(&self) -> Result<bool, Error> {
        self.store.renewal_code_required()
    }

    /// Every order, newest first.
    pub fn list_orders(&self) -> Result<Vec<OrderView>, Error> {
        self.store
            .list_orders()?
            .iter()
            .map(|o| self.view(o))
            .collect()
    }

    /// An operator's change of an order's state (`from` must hold the current one),
    /// with a rejection's reason or a shipment's tracking number.
    fn move_order(
        &self,
        order_id: &str,
        from: &[OrderState],
        to: OrderState,
        reason: Option<&str>,
        tracking: Option<&str>,
    ) -> Result<OrderView, Error> {
        let o =
            self.store
                .transition(order_id, from, to, reason, tracking, now().unix_timestamp())?;
        self.view(&o)
    }

    /// awaiting_payment → ready.
    pub fn pay(&self, order_id: &str) -> Result<OrderView, Error> {
        use OrderState::*;
        self.move_order(order_id, &[AwaitingPayment], Ready, None, None)
    }

    /// ready → under_review: a paid order is held for a reviewer (an algorithm upgrade
    /// is reviewed before anything is issued).
    pub fn review(&self, order_id: &str) -> Result<OrderView, Error> {
        use OrderState::*;
        self.move_order(order_id, &[Ready], UnderReview, None, None)
    }

    /// under_review → ready: the reviewer approves.
    pub fn approve(&self, order_id: &str) -> Result<OrderView, Error> {
        use OrderState::*;
        self.move_order(order_id, &[UnderReview], Ready, None, None)
    }

    /// awaiting_payment | ready | under_review | requires_new_key → rejected.
    pub fn reject(&self, order_id: &str, reason: &str) -> Result<OrderView, Error> {
        use OrderState::*;
        let reason = reason.trim();
        if reason.is_empty() {
            return Err(api(
                ErrorCode::InvalidArgument,
                "a rejection needs a reason",
            ));
        }
        let from = [AwaitingPayment, Ready, UnderReview, RequiresNewKey];
        self.move_order(order_id, &from, Rejected, Some(reason), None)
    }

    /// awaiting_payment | ready | under_review → requires_new_key.
    pub fn ship(&self, order_id: &str, tracking_number: &str) -> Result<OrderView, Error> {
        use OrderState::*;
        let tracking = tracking_number.trim();
        if tracking.is_empty() {
            return Err(api(
                ErrorCode::InvalidArgument,
                "a shipment needs a tracking number",
            ));
        }
        let from = [AwaitingPayment, Ready, UnderReview];
        self.move_order(order_id, &from, RequiresNewKey, None, Some(tracking))
    }

    /// An operator revokes a certificate this portal issued (`--reason keyCompromise`,
    /// …); the next CRL lists it with that reason.
    pub fn revoke(&self, serial_hex: &str, reason: crate::ca::Reason) -> Result<(), Error> {
        let serial = normalize_serial_hex(serial_hex)
            .map_err(|e| api(ErrorCode::InvalidSerial, e.to_string()))?;
        self.store
            .revoke_issued(&serial, reason.as_str(), now().unix_timestamp())
    }

    /// An operator cancels an open order: rejected with `reason`, and what it issued
    /// (never confirmed installed) revoked (cessationOfOperation). Returns the order
    /// and the serials revoked.
    pub fn cancel(&self, order_id: &str, reason: &str) -> Result<(OrderView, Vec<String>), Error> {
        let reason = reason.trim();
        if reason.is_empty() {
            return Err(api(
                ErrorCode::InvalidArgument,
                "a cancellation needs a reason",
            ));
        }
        let (order, revoked) = self.store.cancel_order(
            order_id,
            &format!("已取消 / cancelled: {reason}"),
            crate::ca::Reason::CessationOfOperation.as_str(),
            now().unix_timestamp(),
        )?;
        Ok((self.view(&order)?, revoked))
    }

    /// Sweeps renewals issued `older_than` ago or more whose installation was never
    /// confirmed: back to `ready`, their certificates revoked (cessationOfOperation).
    /// Each order swept, with the serials revoked.
    pub fn sweep_unconfirmed(
        &self,
        older_than: Duration,
    ) -> Result<Vec<(String, Vec<String>)>, Error> {
        let t = now();
        self.store.sweep_unconfirmed(
            (t - older_than).unix_timestamp(),
            crate::ca::Reason::CessationOfOperation.as_str(),
            t.unix_timestamp(),
        )
    }

    fn view(&self, o: &Order) -> Result<OrderView, Error> {
        let subject = match o.current_signing_serial.as_deref() {
            Some(s) => self.store.certificate(s)?.map(|c| c.subject),
            None => None,
        };
        let ts =
            |t: i64| OffsetDateTime::from_unix_timestamp(t).unwrap_or(OffsetDateTime::UNIX_EPOCH);
        Ok(OrderView {
            order_id: o.id.clone(),
            state: o.state.as_str().to_owned(),
            issuer_dn: o.issuer_display.clone(),
            serial_hex: o.serial_hex.clone(),
            terms: o.terms.clone(),
            old_encryption_serial_hex: o.old_encryption_serial_hex.clone(),
            reject_reason: o.reject_reason.clone(),
            tracking_number: o.tracking_number.clone(),
            renewal_code: o.renewal_code.clone(),
            issued_serial_hex: o.current_signing_serial.clone(),
            issued_encryption_serial_hex: o.current_encryption_serial.clone(),
            subject,
            created_at: ts(o.created_at),
            updated_at: ts(o.updated_at),
        })
    }
}

fn parse_certificate(der: &[u8]) -> Result<X509Certificate<'_>, Error> {
    match X509Certificate::from_der(der) {
        Ok(([], cert)) => Ok(cert),
        Ok(_) => Err(api(
            ErrorCode::MalformedCertificate,
            "trailing bytes after the certificate",
        )),
        Err(e) => Err(api(
            ErrorCode::MalformedCertificate,
            format!("not a DER X.509 certificate: {e}"),
        )),
    }
}

/// The request's transport key, checked: present, a key the envelope can be sealed to
/// (RSA-2048 or larger, EC P-256), and neither the CSR's key nor the old certificate's
/// (a signing key must not become a decryption key).
fn transport_key<'a>(
    transport_key_spki: Option<&'a [u8]>,
    csr_spki: &[u8],
    old_spki: &[u8],
) -> Result<&'a [u8], Error> {
    let refuse = |why: String| api(ErrorCode::TransportKeyInvalid, why);
    let der = transport_key_spki.ok_or_else(|| {
        refuse(
            "the order includes an encryption certificate: the request needs a transport key"
                .into(),
        )
    })?;
    let (rest, spki) = x509_parser::x509::SubjectPublicKeyInfo::from_der(der).map_err(|e| {
        refuse(format!(
            "the transport key is not a SubjectPublicKeyInfo: {e}"
        ))
    })?;
    if !rest.is_empty() {
        return Err(refuse("trailing bytes after the transport key".into()));
    }
    match KeyKind::of(&spki) {
        KeyKind::Rsa { bits } if (2048..=8192).contains(&bits) => {}
        KeyKind::EcP256 => {}
        other => {
            return Err(refuse(format!(
                "a {} transport key cannot receive the envelope (RSA-2048 or EC P-256)",
                other.describe()
            )));
        }
    }
    let same = |other: &[u8]| {
        x509_parser::x509::SubjectPublicKeyInfo::from_der(other)
            .is_ok_and(|(_, o)| o.subject_public_key.data == spki.subject_public_key.data)
    };
    if same(csr_spki) || same(old_spki) {
        return Err(refuse(
            "the transport key is a signing key (the CSR's or the old certificate's): it must be a key made for this envelope".into(),
        ));
    }
    Ok(der)
}

fn parse_csr(der: &[u8]) -> Result<X509CertificationRequest<'_>, Error> {
    match X509CertificationRequest::from_der(der) {
        Ok(([], csr)) => Ok(csr),
        Ok(_) => Err(api(ErrorCode::MalformedCsr, "trailing bytes after the CSR")),
        Err(e) => Err(api(
            ErrorCode::MalformedCsr,
            format!("not a DER PKCS#10 request: {e}"),
        )),
    }
}

fn load_or_create_token(dir: &Path) -> Result<String, Error> {
    let path = dir.join(ADMIN_TOKEN_FILE);
    if path.exists() {
        let token = std::fs::read_to_string(&path)
            .map_err(|e| Error::Setup(format!("{}: {e}", path.display())))?;
        let token = token.trim().to_owned();
        if token.len() < 16 {
            return Err(Error::Setup(format!(
                "{} holds a token shorter than 16 characters",
                path.display()
            )));
        }
        return Ok(token);
    }
    let token =
        hex::encode(crypto::random_bytes(32).map_err(|_| Error::Setup("RNG failure".into()))?);
    crate::ca::write_secret_file(&path, format!("{token}\n").as_bytes())?;
    Ok(token)
}

/// What was recorded before revocations were kept by CA key (migration 6) gets its
/// key: named revocations by the trusted issuer of that name, issued certificates by
/// the keyring CA whose signature they carry. Certificates of a CA key the portal no
/// longer holds are said at start: they can be revoked but no CRL can list them.
fn resolve_issuers(store: &Store, ca: &Ca) -> Result<(), Error> {
    let issuers: Vec<(NameKey, String)> = ca
        .trusted()
        .iter()
        .map(|t| (t.name_key.clone(), t.ski.clone()))
        .collect();
    let unknown = store.resolve_issuers(&issuers, &|der| {
        ca.signer_of(der).map(|c| c.ski().to_owned())
    })?;
    if unknown > 0 {
        eprintln!(
            "ukey-portal: 有 {unknown} 张证书的签发 CA 密钥已不在门户中，它们无法列入任何 CRL / \
             {unknown} issued certificate(s) were signed by a CA key this portal no longer holds: \
             no CRL can list them"
        );
    }
    Ok(())
}
