//! The portal's SQLite store: orders, challenges, issued certificates (with the escrow
//! copy of encryption keys) and revocations. WAL journal, numbered migrations kept in
//! `PRAGMA user_version`, every multi-row change in one `BEGIN IMMEDIATE` transaction.
//!
//! **Invariant:** a request that fails changes no row. Checks that can fail run before
//! the write transaction; conditions that may have changed meanwhile (challenge used,
//! order state) are checked again inside it, and a failure there rolls back.

use std::path::Path;
use std::sync::Mutex;

use rusqlite::{Connection, OptionalExtension, Row, TransactionBehavior, params};
use ukey_portal_api::{ApiError, ErrorCode, KeyAlgorithm, KeyPolicy, OrderTerms};

use crate::Error;
use crate::names::NameKey;

/// Schema migrations; index + 1 is the `user_version` after applying it.
const MIGRATIONS: &[&str] = &[
    // 1: initial schema
    "CREATE TABLE orders (
        id TEXT PRIMARY KEY,
        issuer_key TEXT NOT NULL,
        issuer_display TEXT NOT NULL,
        serial_hex TEXT NOT NULL,
        years INTEGER NOT NULL,
        key_policy TEXT NOT NULL,
        target_algorithm TEXT NOT NULL,
        with_encryption_cert INTEGER NOT NULL,
        old_encryption_serial_hex TEXT,
        state TEXT NOT NULL,
        reject_reason TEXT,
        tracking_number TEXT,
        current_spki_sha256 BLOB,
        current_signing_serial TEXT,
        current_encryption_serial TEXT,
        created_at INTEGER NOT NULL,
        updated_at INTEGER NOT NULL
    );
    CREATE INDEX orders_by_certificate ON orders(issuer_key, serial_hex, created_at);
    CREATE TABLE challenges (
        id TEXT PRIMARY KEY,
        order_id TEXT NOT NULL REFERENCES orders(id),
        nonce BLOB NOT NULL,
        expires_at INTEGER NOT NULL,
        used_at INTEGER
    );
    CREATE TABLE certificates (
        serial_hex TEXT PRIMARY KEY,
        order_id TEXT NOT NULL REFERENCES orders(id),
        kind TEXT NOT NULL CHECK (kind IN ('signing', 'encryption')),
        spki_sha256 BLOB NOT NULL,
        der BLOB NOT NULL,
        subject TEXT NOT NULL,
        escrow_pkcs8 BLOB,
        issued_at INTEGER NOT NULL
    );
    CREATE INDEX certificates_by_order ON certificates(order_id);
    CREATE TABLE revocations (
        issuer_key TEXT NOT NULL,
        serial_hex TEXT NOT NULL,
        revoked_at INTEGER NOT NULL,
        reason TEXT NOT NULL,
        order_id TEXT,
        PRIMARY KEY (issuer_key, serial_hex)
    );
    CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
    INSERT INTO meta (key, value) VALUES ('crl_number', 1);",
];

/// Lifecycle state of an order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OrderState {
    /// Not paid.
    AwaitingPayment,
    /// Paid.
    Ready,
    /// Certificate issued, installation not confirmed.
    Issued,
    /// Installation confirmed.
    Completed,
    /// A new token is being mailed.
    RequiresNewKey,
    /// Rejected by a reviewer.
    Rejected,
}

impl OrderState {
    /// Stored/wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            OrderState::AwaitingPayment => "awaiting_payment",
            OrderState::Ready => "ready",
            OrderState::Issued => "issued",
            OrderState::Completed => "completed",
            OrderState::RequiresNewKey => "requires_new_key",
            OrderState::Rejected => "rejected",
        }
    }
    fn parse(s: &str) -> Option<OrderState> {
        [
            OrderState::AwaitingPayment,
            OrderState::Ready,
            OrderState::Issued,
            OrderState::Completed,
            OrderState::RequiresNewKey,
            OrderState::Rejected,
        ]
        .into_iter()
        .find(|st| st.as_str() == s)
    }
    /// Open orders block a new order for the same certificate.
    pub fn is_open(self) -> bool {
        !matches!(self, OrderState::Completed | OrderState::Rejected)
    }
}

/// A renewal order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Order {
    /// Opaque id.
    pub id: String,
    /// Normal form of the issuer of the certificate being renewed.
    pub issuer_key: NameKey,
    /// Display form of that issuer.
    pub issuer_display: String,
    /// Canonical serial of the certificate being renewed.
    pub serial_hex: String,
    /// Commercial terms.
    pub terms: OrderTerms,
    /// The holder's current encryption certificate (revoked on completion).
    pub old_encryption_serial_hex: Option<String>,
    /// Lifecycle state.
    pub state: OrderState,
    /// Reviewer's reason (rejected).
    pub reject_reason: Option<String>,
    /// Parcel tracking number (requires_new_key).
    pub tracking_number: Option<String>,
    /// SHA-256 of the SPKI the current certificate was issued for.
    pub current_spki_sha256: Option<Vec<u8>>,
    /// Serial of the current issued signing certificate.
    pub current_signing_serial: Option<String>,
    /// Serial of the current issued encryption certificate.
    pub current_encryption_serial: Option<String>,
    /// Unix seconds.
    pub created_at: i64,
    /// Unix seconds.
    pub updated_at: i64,
}

/// Input of [`Store::create_order`].
#[derive(Debug, Clone)]
pub struct NewOrder {
    /// Normal form of the issuer.
    pub issuer_key: NameKey,
    /// Display form of the issuer.
    pub issuer_display: String,
    /// Canonical serial.
    pub serial_hex: String,
    /// Terms.
    pub terms: OrderTerms,
    /// Canonical serial of the old encryption certificate.
    pub old_encryption_serial_hex: Option<String>,
    /// `AwaitingPayment` or `Ready`.
    pub state: OrderState,
}

/// A challenge row.
#[derive(Debug, Clone)]
pub struct Challenge {
    /// Id.
    pub id: String,
    /// Its order.
    pub order_id: String,
    /// 32 bytes.
    pub nonce: Vec<u8>,
    /// Unix seconds.
    pub expires_at: i64,
    /// Unix seconds, once used.
    pub used_at: Option<i64>,
}

/// An issued certificate row.
#[derive(Debug, Clone)]
pub struct StoredCert {
    /// Canonical serial.
    pub serial_hex: String,
    /// Its order.
    pub order_id: String,
    /// `signing` or `encryption`.
    pub kind: String,
    /// SHA-256 of its SPKI.
    pub spki_sha256: Vec<u8>,
    /// DER.
    pub der: Vec<u8>,
    /// Display subject.
    pub subject: String,
    /// Escrowed PKCS#8 (encryption certificates).
    pub escrow_pkcs8: Option<Vec<u8>>,
}

/// A new issuance to record.
#[derive(Debug, Clone)]
pub struct NewIssuance {
    /// The order.
    pub order_id: String,
    /// The challenge to consume.
    pub challenge_id: String,
    /// SHA-256 of the CSR's SPKI.
    pub spki_sha256: Vec<u8>,
    /// The signing certificate.
    pub signing: StoredCert,
    /// The encryption certificate, if the order has one.
    pub encryption: Option<StoredCert>,
}

/// Result of [`Store::commit_issue`].
#[derive(Debug, Clone)]
pub enum IssueCommit {
    /// The new certificates were recorded.
    Issued,
    /// Meanwhile the same key got certificates: return these instead.
    Existing {
        /// Signing certificate.
        signing: Box<StoredCert>,
        /// Encryption certificate.
        encryption: Option<Box<StoredCert>>,
    },
}

/// The SQLite store. One connection; SQLite serialises writers anyway and every
/// statement here is short, so a mutex is the simplest correct pool.
#[derive(Debug)]
pub struct Store {
    conn: Mutex<Connection>,
}

fn api(code: ErrorCode, message: impl Into<String>) -> Error {
    Error::Api(ApiError::new(code, message))
}

fn order_from_row(row: &Row<'_>) -> rusqlite::Result<Order> {
    let key_policy: String = row.get("key_policy")?;
    let alg: String = row.get("target_algorithm")?;
    let state: String = row.get("state")?;
    let bad = |what: &str, v: &str| {
        rusqlite::Error::FromSqlConversionFailure(
            0,
            rusqlite::types::Type::Text,
            format!("invalid stored {what} {v:?}").into(),
        )
    };
    Ok(Order {
        id: row.get("id")?,
        issuer_key: NameKey::from_stored(row.get("issuer_key")?),
        issuer_display: row.get("issuer_display")?,
        serial_hex: row.get("serial_hex")?,
        terms: OrderTerms {
            years: row.get("years")?,
            key_policy: match key_policy.as_str() {
                "new" => KeyPolicy::New,
                "same" => KeyPolicy::Same,
                other => return Err(bad("key policy", other)),
            },
            target_algorithm: KeyAlgorithm::parse(&alg).ok_or_else(|| bad("algorithm", &alg))?,
            with_encryption_cert: row.get("with_encryption_cert")?,
        },
        old_encryption_serial_hex: row.get("old_encryption_serial_hex")?,
        state: OrderState::parse(&state).ok_or_else(|| bad("state", &state))?,
        reject_reason: row.get("reject_reason")?,
        tracking_number: row.get("tracking_number")?,
        current_spki_sha256: row.get("current_spki_sha256")?,
        current_signing_serial: row.get("current_signing_serial")?,
        current_encryption_serial: row.get("current_encryption_serial")?,
        created_at: row.get("created_at")?,
        updated_at: row.get("updated_at")?,
    })
}

fn cert_from_row(row: &Row<'_>) -> rusqlite::Result<StoredCert> {
    Ok(StoredCert {
        serial_hex: row.get("serial_hex")?,
        order_id: row.get("order_id")?,
        kind: row.get("kind")?,
        spki_sha256: row.get("spki_sha256")?,
        der: row.get("der")?,
        subject: row.get("subject")?,
        escrow_pkcs8: row.get("escrow_pkcs8")?,
    })
}

fn get_order(conn: &Connection, id: &str) -> rusqlite::Result<Option<Order>> {
    conn.query_row("SELECT * FROM orders WHERE id = ?1", [id], order_from_row)
        .optional()
}

fn get_cert(conn: &Connection, serial: &str) -> rusqlite::Result<Option<StoredCert>> {
    conn.query_row(
        "SELECT * FROM certificates WHERE serial_hex = ?1",
        [serial],
        cert_from_row,
    )
    .optional()
}

fn revoke(
    conn: &Connection,
    issuer_key: &str,
    serial: &str,
    now: i64,
    order_id: &str,
) -> rusqlite::Result<bool> {
    let n = conn.execute(
        "INSERT OR IGNORE INTO revocations (issuer_key, serial_hex, revoked_at, reason, order_id)
         VALUES (?1, ?2, ?3, 'superseded', ?4)",
        params![issuer_key, serial, now, order_id],
    )?;
    Ok(n == 1)
}

fn bump_crl_number(conn: &Connection) -> rusqlite::Result<()> {
    conn.execute(
        "UPDATE meta SET value = value + 1 WHERE key = 'crl_number'",
        [],
    )?;
    Ok(())
}

impl Store {
    /// Opens (creating if needed) the database and applies pending migrations.
    pub fn open(path: &Path) -> Result<Store, Error> {
        let mut conn = Connection::open(path)?;
        conn.busy_timeout(std::time::Duration::from_secs(10))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        let version = usize::try_from(version).unwrap_or(usize::MAX);
        if version > MIGRATIONS.len() {
            return Err(Error::Setup(format!(
                "database schema version {version} is newer than this program ({}); upgrade ukey-portal",
                MIGRATIONS.len()
            )));
        }
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(version) {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Exclusive)?;
            tx.execute_batch(sql)?;
            tx.pragma_update(None, "user_version", i as i64 + 1)?;
            tx.commit()?;
        }
        Ok(Store {
            conn: Mutex::new(conn),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave a half-done transaction behind
        // (rusqlite rolls back on drop), so a poisoned mutex is still safe to use.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Creates an order; refuses if an open order exists for the same certificate.
    pub fn create_order(&self, new: &NewOrder, id: &str, now: i64) -> Result<Order, Error> {
        let mut conn = self.lock();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let open: Option<(String, String)> = tx
            .query_row(
                "SELECT id, state FROM orders WHERE issuer_key = ?1 AND serial_hex = ?2
                 AND state NOT IN ('completed', 'rejected') LIMIT 1",
                params![new.issuer_key.as_str(), new.serial_hex],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        if let Some((other, state)) = open {
            return Err(api(
                ErrorCode::InvalidTransition,
                format!("order {other} for this certificate is still open ({state})"),
            ));
        }
        tx.execute(
            "INSERT INTO orders (id, issuer_key, issuer_display, serial_hex, years, key_policy,
               target_algorithm, with_encryption_cert, old_encryption_serial_hex, state,
               created_at, updated_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?11)",
            params![
                id,
                new.issuer_key.as_str(),
                new.issuer_display,
                new.serial_hex,
                new.terms.years,
                new.terms.key_policy.as_str(),
                new.terms.target_algorithm.as_str(),
                new.terms.with_encryption_cert,
                new.old_encryption_serial_hex,
                new.state.as_str(),
                now,
            ],
        )?;
        let order =
            get_order(&tx, id)?.ok_or_else(|| Error::Setup("inserted order vanished".into()))?;
        tx.commit()?;
        Ok(order)
    }

    /// One order.
    pub fn order(&self, id: &str) -> Result<Option<Order>, Error> {
        Ok(get_order(&self.lock(), id)?)
    }

    /// The newest order for a certificate.
    pub fn latest_order_for(
        &self,
        issuer_key: &NameKey,
        serial_hex: &str,
    ) -> Result<Option<Order>, Error> {
        Ok(self
            .lock()
            .query_row(
                "SELECT * FROM orders WHERE issuer_key = ?1 AND serial_hex = ?2
                 ORDER BY created_at DESC, rowid DESC LIMIT 1",
                params![issuer_key.as_str(), serial_hex],
                order_from_row,
            )
            .optional()?)
    }

    /// Every order, newest first.
    pub fn list_orders(&self) -> Result<Vec<Order>, Error> {
        let conn = self.lock();
        let mut stmt = conn.prepare("SELECT * FROM orders ORDER BY created_at DESC, rowid DESC")?;
        let rows = stmt.query_map([], order_from_row)?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    }

    /// Admin state change: `from` must contain the current state.
    pub fn transition(
        &self,
        id: &str,
        from: &[OrderState],
        to: OrderState,
        reject_reason: Option<&str>,
        tracking_number: Option<&str>,
        now: i64,
    ) -> Result<Order, Error> {
        let mut conn = self.lock();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let order = get_order(&tx, id)?
            .ok_or_else(|| api(ErrorCode::OrderNotFound, format!("no order {id}")))?;
        if !from.contains(&order.state) {
            return Err(api(
                ErrorCode::InvalidTransition,
                format!(
                    "order {id} is {}; cannot become {}",
                    order.state.as_str(),
                    to.as_str()
                ),
            ));
        }
        tx.execute(
            "UPDATE orders SET state = ?2, reject_reason = COALESCE(?3, reject_reason),
               tracking_number = COALESCE(?4, tracking_number), updated_at = ?5 WHERE id = ?1",
            params![id, to.as_str(), reject_reason, tracking_number, now],
        )?;
        let order = get_order(&tx, id)?.ok_or_else(|| Error::Setup("order vanished".into()))?;
        tx.commit()?;
        Ok(order)
    }

    /// Records a new challenge (and forgets challenges expired over a day ago).
    pub fn insert_challenge(&self, ch: &Challenge, now: i64) -> Result<(), Error> {
        let mut conn = self.lock();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        tx.execute(
            "DELETE FROM challenges WHERE expires_at < ?1",
            [now - 86_400],
        )?;
        tx.execute(
            "INSERT INTO challenges (id, order_id, nonce, expires_at) VALUES (?1, ?2, ?3, ?4)",
            params![ch.id, ch.order_id, ch.nonce, ch.expires_at],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// One challenge.
    pub fn challenge(&self, id: &str) -> Result<Option<Challenge>, Error> {
        Ok(self
            .lock()
            .query_row(
                "SELECT id, order_id, nonce, expires_at, used_at FROM challenges WHERE id = ?1",
                [id],
                |r| {
                    Ok(Challenge {
                        id: r.get(0)?,
                        order_id: r.get(1)?,
                        nonce: r.get(2)?,
                        expires_at: r.get(3)?,
                        used_at: r.get(4)?,
                    })
                },
            )
            .optional()?)
    }

    /// Whether a certificate is revoked.
    pub fn is_revoked(&self, issuer_key: &NameKey, serial_hex: &str) -> Result<bool, Error> {
        Ok(self
            .lock()
            .query_row(
                "SELECT 1 FROM revocations WHERE issuer_key = ?1 AND serial_hex = ?2",
                params![issuer_key.as_str(), serial_hex],
                |_| Ok(()),
            )
            .optional()?
            .is_some())
    }

    /// An issued certificate.
    pub fn certificate(&self, serial_hex: &str) -> Result<Option<StoredCert>, Error> {
        Ok(get_cert(&self.lock(), serial_hex)?)
    }

    /// Consumes the challenge and records the issuance; earlier, never-installed
    /// certificates of the order are revoked. Re-checks challenge and order state.
    pub fn commit_issue(
        &self,
        new: &NewIssuance,
        ca_key: &NameKey,
        now: i64,
    ) -> Result<IssueCommit, Error> {
        let mut conn = self.lock();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        consume_challenge(&tx, &new.challenge_id, &new.order_id, now)?;
        let order = get_order(&tx, &new.order_id)?.ok_or_else(|| {
            api(
                ErrorCode::OrderNotFound,
                format!("no order {}", new.order_id),
            )
        })?;
        match order.state {
            OrderState::Ready | OrderState::Issued => {}
            OrderState::Completed => {
                return Err(api(
                    ErrorCode::OrderCompleted,
                    "the order is already completed",
                ));
            }
            other => {
                return Err(api(
                    ErrorCode::OrderNotReady,
                    format!("the order is {}", other.as_str()),
                ));
            }
        }
        if order.current_spki_sha256.as_deref() == Some(new.spki_sha256.as_slice()) {
            // A concurrent identical request won the race: answer with its result.
            let signing = order
                .current_signing_serial
                .as_deref()
                .and_then(|s| get_cert(&tx, s).transpose())
                .transpose()?
                .ok_or_else(|| Error::Setup("issued order without certificate".into()))?;
            let encryption = match order.current_encryption_serial.as_deref() {
                Some(s) => get_cert(&tx, s)?,
                None => None,
            };
            tx.commit()?;
            return Ok(IssueCommit::Existing {
                signing: Box::new(signing),
                encryption: encryption.map(Box::new),
            });
        }
        let mut revoked_any = false;
        for serial in [
            &order.current_signing_serial,
            &order.current_encryption_serial,
        ]
        .into_iter()
        .flatten()
        {
            revoked_any |= revoke(&tx, ca_key.as_str(), serial, now, &order.id)?;
        }
        if revoked_any {
            bump_crl_number(&tx)?;
        }
        for cert in std::iter::once(&new.signing).chain(new.encryption.as_ref()) {
            tx.execute(
                "INSERT INTO certificates (serial_hex, order_id, kind, spki_sha256, der, subject,
                   escrow_pkcs8, issued_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                params![
                    cert.serial_hex,
                    cert.order_id,
                    cert.kind,
                    cert.spki_sha256,
                    cert.der,
                    cert.subject,
                    cert.escrow_pkcs8,
                    now
                ],
            )?;
        }
        tx.execute(
            "UPDATE orders SET state = 'issued', current_spki_sha256 = ?2, current_signing_serial = ?3,
               current_encryption_serial = ?4, updated_at = ?5 WHERE id = ?1",
            params![
                order.id,
                new.spki_sha256,
                new.signing.serial_hex,
                new.encryption.as_ref().map(|c| c.serial_hex.clone()),
                now
            ],
        )?;
        tx.commit()?;
        Ok(IssueCommit::Issued)
    }

    /// Consumes the challenge of an idempotent repeat (same key, same certificates).
    pub fn commit_repeat(
        &self,
        challenge_id: &str,
        order_id: &str,
        spki_sha256: &[u8],
        now: i64,
    ) -> Result<(), Error> {
        let mut conn = self.lock();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        consume_challenge(&tx, challenge_id, order_id, now)?;
        let order = get_order(&tx, order_id)?
            .ok_or_else(|| api(ErrorCode::OrderNotFound, format!("no order {order_id}")))?;
        if order.state != OrderState::Issued
            || order.current_spki_sha256.as_deref() != Some(spki_sha256)
        {
            return Err(api(
                ErrorCode::OrderNotReady,
                format!("the order changed meanwhile (now {})", order.state.as_str()),
            ));
        }
        tx.commit()?;
        Ok(())
    }

    /// Completes the order: revokes the certificate it renews (and the old encryption
    /// certificate it names). Returns the serials revoked by this order. Idempotent for
    /// the same certificate.
    pub fn commit_installed(
        &self,
        order_id: &str,
        serial_hex: &str,
        now: i64,
    ) -> Result<Vec<String>, Error> {
        let mut conn = self.lock();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let order = get_order(&tx, order_id)?
            .ok_or_else(|| api(ErrorCode::OrderNotFound, format!("no order {order_id}")))?;
        let is_current = order.current_signing_serial.as_deref() == Some(serial_hex);
        match order.state {
            OrderState::Issued if is_current => {
                let mut revoked_any = revoke(
                    &tx,
                    order.issuer_key.as_str(),
                    &order.serial_hex,
                    now,
                    order_id,
                )?;
                if let Some(enc) = &order.old_encryption_serial_hex {
                    revoked_any |= revoke(&tx, order.issuer_key.as_str(), enc, now, order_id)?;
                }
                if revoked_any {
                    bump_crl_number(&tx)?;
                }
                tx.execute(
                    "UPDATE orders SET state = 'completed', updated_at = ?2 WHERE id = ?1",
                    params![order_id, now],
                )?;
            }
            OrderState::Completed if is_current => {}
            OrderState::Completed => {
                return Err(api(
                    ErrorCode::AlreadyInstalled,
                    format!(
                        "the order was completed with certificate {}",
                        order.current_signing_serial.as_deref().unwrap_or("?")
                    ),
                ));
            }
            OrderState::Issued => {
                return Err(api(
                    ErrorCode::CertificateNotIssued,
                    format!("certificate {serial_hex} is not the one this order issued last"),
                ));
            }
            other => {
                return Err(api(
                    ErrorCode::OrderNotReady,
                    format!("the order is {}", other.as_str()),
                ));
            }
        }
        let mut revoked = vec![order.serial_hex.clone()];
        if let Some(enc) = &order.old_encryption_serial_hex {
            revoked.push(enc.clone());
        }
        tx.commit()?;
        Ok(revoked)
    }

    /// CRL number and the revocations of certificates issued under `issuer_key`.
    pub fn crl_entries(&self, issuer_key: &NameKey) -> Result<(u64, Vec<(String, i64)>), Error> {
        let conn = self.lock();
        let number: i64 =
            conn.query_row("SELECT value FROM meta WHERE key = 'crl_number'", [], |r| {
                r.get(0)
            })?;
        let mut stmt = conn.prepare(
            "SELECT serial_hex, revoked_at FROM revocations WHERE issuer_key = ?1 ORDER BY revoked_at, serial_hex",
        )?;
        let rows = stmt.query_map([issuer_key.as_str()], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok((
            u64::try_from(number).unwrap_or(0),
            rows.collect::<rusqlite::Result<Vec<_>>>()?,
        ))
    }

    /// Every row of every table as text, for tests that prove a failed request changed
    /// nothing.
    pub fn dump(&self) -> Result<String, Error> {
        let conn = self.lock();
        let mut out = String::new();
        for table in [
            "orders",
            "challenges",
            "certificates",
            "revocations",
            "meta",
        ] {
            let mut stmt = conn.prepare(&format!("SELECT * FROM {table} ORDER BY rowid"))?;
            let cols = stmt.column_count();
            let mut rows = stmt.query([])?;
            out.push_str(&format!("== {table}\n"));
            while let Some(row) = rows.next()? {
                let mut fields = Vec::with_capacity(cols);
                for i in 0..cols {
                    let v: rusqlite::types::Value = row.get(i)?;
                    fields.push(format!("{v:?}"));
                }
                out.push_str(&fields.join("|"));
                out.push('\n');
            }
        }
        Ok(out)
    }
}

fn consume_challenge(conn: &Connection, id: &str, order_id: &str, now: i64) -> Result<(), Error> {
    let row: Option<(String, i64, Option<i64>)> = conn
        .query_row(
            "SELECT order_id, expires_at, used_at FROM challenges WHERE id = ?1",
            [id],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .optional()?;
    match row {
        None => Err(api(
            ErrorCode::ChallengeNotFound,
            format!("no challenge {id}"),
        )),
        Some((o, _, _)) if o != order_id => Err(api(
            ErrorCode::ChallengeNotFound,
            format!("challenge {id} belongs to another order"),
        )),
        Some((_, _, Some(_))) => Err(api(
            ErrorCode::ChallengeUsed,
            "the challenge was already used",
        )),
        Some((_, exp, None)) if exp <= now => {
            Err(api(ErrorCode::ChallengeExpired, "the challenge expired"))
        }
        Some(_) => {
            conn.execute(
                "UPDATE challenges SET used_at = ?2 WHERE id = ?1",
                params![id, now],
            )?;
            Ok(())
        }
    }
}
