//! The portal's store: orders, challenges, issued certificates (with the escrow copy of
//! encryption keys) and revocations, on SQLite (the default: a file in the data
//! directory, WAL journal) or PostgreSQL (several portal instances on one database);
//! [`crate::db`] runs the same SQL and the same numbered migrations on both. Every
//! multi-row change is one transaction; one that decides on an order locks the order
//! first (`lock_order`: `SELECT … FOR UPDATE` on PostgreSQL).
//!
//! **Invariant:** a request that fails changes no row. Checks that can fail run before
//! the write transaction; conditions that may have changed meanwhile (challenge used,
//! order state) are checked again inside it, and a failure there rolls back.

use std::path::{Path, PathBuf};

use ukey_portal_api::{ApiError, ErrorCode, KeyAlgorithm, KeyPolicy, OrderTerms};

use crate::Error;
use crate::db::{
    self, Db, DbError, Kind, Migration, MigrationError, Outcome, Param, Row, Stmt, Tx, params,
};
use crate::names::NameKey;

/// Schema migrations; index + 1 is the schema version after applying it (SQLite's
/// `user_version`, PostgreSQL's `schema_version` table).
const MIGRATIONS: &[Migration] = &[
    // 1: initial schema
    Migration {
        sql: "CREATE TABLE orders (
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
        // SQLite's rowid keeps the insertion order of orders made in one second.
        postgres: "ALTER TABLE orders ADD COLUMN rowid BIGSERIAL;",
    },
    // 2: CMP transactions (RFC 9483) and the nonces seen, for freshness
    Migration {
        sql: "CREATE TABLE cmp_transactions (
        id BLOB PRIMARY KEY,
        order_id TEXT NOT NULL REFERENCES orders(id),
        kind TEXT NOT NULL,
        cert_req_id BLOB NOT NULL,
        request_der BLOB NOT NULL,
        state TEXT NOT NULL CHECK (state IN ('waiting', 'issued', 'confirmed', 'rejected')),
        certificate_serial TEXT,
        server_nonce BLOB NOT NULL,
        created_at INTEGER NOT NULL,
        updated_at INTEGER NOT NULL
    );
    CREATE INDEX cmp_transactions_by_order ON cmp_transactions(order_id);
    CREATE TABLE cmp_nonces (nonce BLOB PRIMARY KEY, seen_at INTEGER NOT NULL);
    CREATE INDEX cmp_nonces_by_time ON cmp_nonces(seen_at);",
        postgres: "",
    },
    // 3: one open order per certificate, held by the database (several instances),
    // and the lookups that abuse would make slow without an index
    Migration {
        sql: "CREATE UNIQUE INDEX orders_one_open ON orders(issuer_key, serial_hex)
        WHERE state NOT IN ('completed', 'rejected');
    CREATE INDEX challenges_by_expiry ON challenges(expires_at);",
        postgres: "",
    },
    // 4: renewal codes (a moment of access to a key must not become a year): the code
    // an order was made with, the wrong codes tried, and the portal's policy
    Migration {
        sql: "ALTER TABLE orders ADD COLUMN renewal_code TEXT;
    ALTER TABLE orders ADD COLUMN renewal_code_failures INTEGER NOT NULL DEFAULT 0;
    INSERT INTO meta (key, value) VALUES ('renewal_code_required', 0);",
        postgres: "",
    },
    // 5: the pay page looks orders up by serial; outstanding challenges are counted per order
    Migration {
        sql: "CREATE INDEX orders_by_serial ON orders(serial_hex, created_at);
    CREATE INDEX challenges_by_order ON challenges(order_id, used_at);",
        postgres: "",
    },
    // 6: CA rollover. Revocations are kept by the issuer's key (its SKI), not its name:
    // a new CA key under the same name has its own CRL. Rows from before name their
    // issuer 'name:<name key>' until the portal, at start, resolves the name to a key
    // it knows. Each issued certificate records the CA key that signed it, each order
    // the key its renewed certificate chains to.
    Migration {
        sql: "CREATE TABLE revocations_by_key (
        issuer_ski TEXT NOT NULL,
        serial_hex TEXT NOT NULL,
        revoked_at INTEGER NOT NULL,
        reason TEXT NOT NULL,
        order_id TEXT,
        PRIMARY KEY (issuer_ski, serial_hex)
    );
    INSERT INTO revocations_by_key (issuer_ski, serial_hex, revoked_at, reason, order_id)
        SELECT 'name:' || issuer_key, serial_hex, revoked_at, reason, order_id FROM revocations;
    DROP TABLE revocations;
    ALTER TABLE revocations_by_key RENAME TO revocations;
    ALTER TABLE certificates ADD COLUMN issuer_ski TEXT;
    ALTER TABLE orders ADD COLUMN issuer_ski TEXT;
    CREATE INDEX certificates_issuer_unknown ON certificates(serial_hex) WHERE issuer_ski IS NULL;
    INSERT INTO meta (key, value) VALUES ('revocations_by_name', 1);",
        postgres: "",
    },
    // 7: the CRL number is the sum of CRL_NUMBER_SHARDS counters, and a transaction that
    // revokes adds one to one of them: with one counter, every revocation held its row
    // until its commit, so on PostgreSQL all instances' revocations waited for each
    // other's commits one at a time.
    Migration {
        sql: "CREATE TABLE crl_number_shards (shard INTEGER PRIMARY KEY, n INTEGER NOT NULL);
    INSERT INTO crl_number_shards (shard, n) SELECT 0, value FROM meta WHERE key = 'crl_number';
    INSERT INTO crl_number_shards (shard, n) VALUES (1, 0), (2, 0), (3, 0), (4, 0), (5, 0),
        (6, 0), (7, 0), (8, 0), (9, 0), (10, 0), (11, 0), (12, 0), (13, 0), (14, 0), (15, 0);
    DELETE FROM meta WHERE key = 'crl_number';",
        postgres: "",
    },
];

/// The counters whose sum is the CRL number (migration 7).
const CRL_NUMBER_SHARDS: u64 = 16;

/// The issuer recorded for a certificate whose CA key the portal does not hold (issued
/// before CA keys were recorded, by a key since thrown away): revocable, never on a CRL.
pub const UNKNOWN_ISSUER: &str = "?";

/// Challenges an order may have outstanding (unused, unexpired) at once: a bound that
/// holds across instances, whatever each one's rate limit.
pub const OUTSTANDING_CHALLENGES: i64 = 10;

/// How long an expired challenge is kept (to say "expired" rather than "unknown").
const EXPIRED_CHALLENGE_KEPT_SECONDS: i64 = 600;

/// Wrong renewal codes an order takes before it refuses every code (the CA's support
/// then cancels it and makes a new one).
pub const RENEWAL_CODE_TRIES: i64 = 5;

/// Lifecycle state of an order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OrderState {
    /// Not paid.
    AwaitingPayment,
    /// Paid.
    Ready,
    /// Held for a reviewer (an algorithm upgrade): nothing is issued until approved.
    UnderReview,
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
            OrderState::UnderReview => "under_review",
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
            OrderState::UnderReview,
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
    /// The renewal code every issue request for it must carry (8 digits), if any.
    pub renewal_code: Option<String>,
    /// Wrong renewal codes tried.
    pub renewal_code_failures: i64,
    /// The SKI (hex) of the issuer key the renewed certificate chains to, once a
    /// request proved it.
    pub issuer_ski: Option<String>,
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
    /// Its renewal code, when the portal requires codes.
    pub renewal_code: Option<String>,
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
    /// The SKI (hex) of the CA key that signed it (`None`: not known, see
    /// [`UNKNOWN_ISSUER`]).
    pub issuer_ski: Option<String>,
}

impl StoredCert {
    /// What its revocation is kept under.
    pub fn issuer(&self) -> &str {
        self.issuer_ski.as_deref().unwrap_or(UNKNOWN_ISSUER)
    }
}

/// A new issuance to record.
#[derive(Debug, Clone)]
pub struct NewIssuance {
    /// The order.
    pub order_id: String,
    /// What makes the request fresh, consumed with the issuance.
    pub freshness: Freshness,
    /// SHA-256 of the CSR's SPKI.
    pub spki_sha256: Vec<u8>,
    /// The SKI (hex) of the issuer key the renewed certificate chains to.
    pub renewed_issuer_ski: String,
    /// The signing certificate.
    pub signing: StoredCert,
    /// The encryption certificate, if the order has one.
    pub encryption: Option<StoredCert>,
}

/// What makes an issue request fresh, consumed in the transaction that records its
/// outcome: the REST protocol's single-use challenge, or a CMP message (its
/// transactionID and senderNonce, never seen before, or the recipNonce of the
/// transaction's last answer).
#[derive(Debug, Clone)]
pub enum Freshness {
    /// A challenge id.
    Challenge(String),
    /// A CMP message.
    Cmp(Box<CmpStep>),
}

impl Freshness {
    /// The same, recording `serial` as what a CMP transaction issued.
    pub fn with_serial(&self, serial: &str) -> Freshness {
        match self {
            Freshness::Cmp(step) => Freshness::Cmp(Box::new(CmpStep {
                certificate_serial: Some(serial.to_owned()),
                ..(**step).clone()
            })),
            other => other.clone(),
        }
    }
}

/// What [`Store::order_with_challenge`] reads.
#[derive(Debug, Clone)]
pub struct OrderWithChallenge {
    /// The order.
    pub order: Order,
    /// The challenge, when it is that order's.
    pub challenge: Option<Challenge>,
    /// Whether the certificate asked about is revoked.
    pub revoked: bool,
}

/// A revocation as the CRL lists it: serial, Unix time, RFC 5280 reason name.
pub type RevocationRow = (String, i64, String);

/// A CMP transaction row.
#[derive(Debug, Clone)]
pub struct CmpTransaction {
    /// transactionID.
    pub id: Vec<u8>,
    /// The order it renews.
    pub order_id: String,
    /// `kur`, `cr` or `ir`.
    pub kind: String,
    /// certReqId.
    pub cert_req_id: Vec<u8>,
    /// The request, DER, kept to issue when a waiting order becomes ready.
    pub request_der: Vec<u8>,
    /// `waiting`, `issued`, `confirmed`, `rejected`.
    pub state: String,
    /// The certificate issued in it.
    pub certificate_serial: Option<String>,
    /// The portal's senderNonce in its last answer: the client's next recipNonce.
    pub server_nonce: Vec<u8>,
    /// Unix seconds.
    pub created_at: i64,
    /// Unix seconds.
    pub updated_at: i64,
}

/// One CMP message's effect on its transaction, applied with the change it causes.
#[derive(Debug, Clone)]
pub struct CmpStep {
    /// transactionID.
    pub transaction_id: Vec<u8>,
    /// The message's senderNonce (recorded; a second use is a replay).
    pub client_nonce: Vec<u8>,
    /// A new transaction (a request), or the recipNonce an existing one must answer.
    pub begins: Option<NewCmpTransaction>,
    /// The recipNonce of a message in an existing transaction.
    pub recip_nonce: Option<Vec<u8>>,
    /// The nonce of the portal's answer.
    pub server_nonce: Vec<u8>,
    /// The transaction's state after the message.
    pub state: &'static str,
    /// The certificate issued in it, once issued.
    pub certificate_serial: Option<String>,
}

/// What a CMP request records when it begins a transaction.
#[derive(Debug, Clone)]
pub struct NewCmpTransaction {
    /// The order.
    pub order_id: String,
    /// `kur`, `cr`, `ir`.
    pub kind: String,
    /// certReqId.
    pub cert_req_id: Vec<u8>,
    /// The request, DER.
    pub request_der: Vec<u8>,
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

/// The order store, on SQLite or PostgreSQL ([`crate::db`]).
#[derive(Debug)]
pub struct Store {
    db: Db,
    /// When this instance last purged expired challenges (Unix seconds): at most once
    /// a minute, outside the transactions of the requests.
    last_purge: std::sync::atomic::AtomicI64,
}

/// How often an instance purges expired challenges, seconds.
const PURGE_EVERY_SECONDS: i64 = 60;

/// Where the store lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Database {
    /// A SQLite file.
    Sqlite(PathBuf),
    /// A PostgreSQL connection string (`postgres://…` or `host=… dbname=…`), and the
    /// most connections this process opens.
    Postgres {
        /// The connection string.
        url: String,
        /// Pool size.
        pool: usize,
    },
}

impl Database {
    /// Reads `--database`: a `postgres://` / `postgresql://` URL, or a SQLite file path.
    pub fn parse(s: &str, pool: usize) -> Database {
        if s.starts_with("postgres://") || s.starts_with("postgresql://") {
            Database::Postgres {
                url: s.to_owned(),
                pool,
            }
        } else {
            Database::Sqlite(PathBuf::from(s))
        }
    }
}

fn api(code: ErrorCode, message: impl Into<String>) -> Error {
    Error::Api(ApiError::new(code, message))
}

fn order_from_row(row: &Row) -> Result<Order, Error> {
    let key_policy: String = row.get("key_policy")?;
    let alg: String = row.get("target_algorithm")?;
    let state: String = row.get("state")?;
    let bad = |what: &str, v: &str| Error::Setup(format!("invalid stored {what} {v:?}"));
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
        renewal_code: row.get("renewal_code")?,
        renewal_code_failures: row.get("renewal_code_failures")?,
        issuer_ski: row.get("issuer_ski")?,
        created_at: row.get("created_at")?,
        updated_at: row.get("updated_at")?,
    })
}

fn cert_from_row(row: &Row) -> Result<StoredCert, Error> {
    Ok(StoredCert {
        serial_hex: row.get("serial_hex")?,
        order_id: row.get("order_id")?,
        kind: row.get("kind")?,
        spki_sha256: row.get("spki_sha256")?,
        der: row.get("der")?,
        subject: row.get("subject")?,
        escrow_pkcs8: row.get("escrow_pkcs8")?,
        issuer_ski: row.get("issuer_ski")?,
    })
}

/// `SELECT` of the columns of `orders` (not `*`: PostgreSQL's table has a `rowid` more),
/// followed by the rest of the statement.
macro_rules! select_orders {
    ($rest:literal) => {
        concat!(
            "SELECT id, issuer_key, issuer_display, serial_hex, years, key_policy,
               target_algorithm, with_encryption_cert, old_encryption_serial_hex, state,
               reject_reason, tracking_number, current_spki_sha256, current_signing_serial,
               current_encryption_serial, renewal_code, renewal_code_failures, issuer_ski,
               created_at, updated_at FROM orders ",
            $rest
        )
    };
}

fn get_order(tx: &mut dyn Tx, id: &str) -> Result<Option<Order>, Error> {
    tx.query_opt(select_orders!("WHERE id = ?1"), params![id])?
        .as_ref()
        .map(order_from_row)
        .transpose()
}

/// An order, locked until the transaction ends: on PostgreSQL read with `FOR UPDATE`
/// (one round trip); SQLite's `BEGIN IMMEDIATE` already holds the only writer lock.
fn lock_order(tx: &mut dyn Tx, id: &str) -> Result<Order, Error> {
    let rows = tx.query(lock_order_sql(tx.kind()), params![id])?;
    order_locked(id, Ok(Outcome::Rows(rows)))
}

/// [`lock_order`]'s statement, to run in a [`Tx::pipeline`] (its one parameter: the
/// order's id).
fn lock_order_sql(kind: Kind) -> &'static str {
    match kind {
        Kind::Postgres => select_orders!("WHERE id = ?1 FOR UPDATE"),
        Kind::Sqlite => select_orders!("WHERE id = ?1"),
    }
}

/// The order that [`lock_order_sql`] read in a pipeline.
fn order_locked(id: &str, read: Result<Outcome, DbError>) -> Result<Order, Error> {
    read?
        .rows()
        .first()
        .map(order_from_row)
        .transpose()?
        .ok_or_else(|| api(ErrorCode::OrderNotFound, format!("no order {id}")))
}

fn get_cert(tx: &mut dyn Tx, serial: &str) -> Result<Option<StoredCert>, Error> {
    tx.query_opt(
        "SELECT serial_hex, order_id, kind, spki_sha256, der, subject, escrow_pkcs8, issuer_ski
         FROM certificates WHERE serial_hex = ?1",
        params![serial],
    )?
    .as_ref()
    .map(cert_from_row)
    .transpose()
}

/// Records a revocation of `serial` under the issuer key `issuer_ski`; false when the
/// certificate was revoked before.
fn revoke(
    tx: &mut dyn Tx,
    issuer_ski: &str,
    serial: &str,
    reason: &str,
    now: i64,
    order_id: &str,
) -> Result<bool, Error> {
    let n = tx.execute(REVOKE, params![issuer_ski, serial, now, reason, order_id])?;
    Ok(n == 1)
}

/// [`revoke`]'s statement: `issuer_ski, serial_hex, revoked_at, reason, order_id`.
const REVOKE: &str =
    "INSERT INTO revocations (issuer_ski, serial_hex, revoked_at, reason, order_id)
     VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT DO NOTHING";

/// A new CRL number: one of its counters plus one (parameter: [`crl_number_shard`]).
/// Every transaction that revokes runs it, and the row stays locked until the commit:
/// transactions that pick different counters do not wait for each other.
const BUMP_CRL_NUMBER: &str = "UPDATE crl_number_shards SET n = n + 1 WHERE shard = ?1";

/// The counter the next revoking transaction of this process adds to: each in turn.
fn crl_number_shard() -> i64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    (NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % CRL_NUMBER_SHARDS) as i64
}

/// The issuer key of a certificate this portal issued, as its revocation is kept.
fn issuer_of_issued(tx: &mut dyn Tx, serial: &str) -> Result<String, Error> {
    Ok(get_cert(tx, serial)?
        .map(|c| c.issuer().to_owned())
        .unwrap_or_else(|| UNKNOWN_ISSUER.to_owned()))
}

fn bump_crl_number(tx: &mut dyn Tx) -> Result<(), Error> {
    tx.execute(BUMP_CRL_NUMBER, params![crl_number_shard()])?;
    Ok(())
}

impl Store {
    /// Opens (creating if needed) the SQLite database and applies pending migrations.
    pub fn open(path: &Path) -> Result<Store, Error> {
        Store::connect(&Database::Sqlite(path.to_owned()))
    }

    /// Opens the database and applies pending migrations.
    pub fn connect(database: &Database) -> Result<Store, Error> {
        let db = match database {
            Database::Sqlite(path) => {
                Db::sqlite(rusqlite::Connection::open(path).map_err(DbError::from)?)?
            }
            Database::Postgres { url, pool } => Db::postgres(url, *pool).map_err(|e| {
                Error::Setup(format!(
                    "无法连接 PostgreSQL 数据库 / cannot connect to the PostgreSQL database: {e}"
                ))
            })?,
        };
        db.migrate(MIGRATIONS).map_err(|e| match e {
            MigrationError::Db(e) => Error::Db(e),
            newer => Error::Setup(newer.to_string()),
        })?;
        Ok(Store {
            db,
            last_purge: std::sync::atomic::AtomicI64::new(0),
        })
    }

    /// Which database.
    pub fn kind(&self) -> Kind {
        self.db.kind()
    }

    /// Creates an order; refuses if an open order exists for the same certificate.
    pub fn create_order(&self, new: &NewOrder, id: &str, now: i64) -> Result<Order, Error> {
        let open_elsewhere = |tx: &mut dyn Tx| -> Result<Error, Error> {
            let open = tx.query_opt(
                "SELECT id, state FROM orders WHERE issuer_key = ?1 AND serial_hex = ?2
                 AND state NOT IN ('completed', 'rejected') LIMIT 1",
                params![new.issuer_key.as_str(), &new.serial_hex],
            )?;
            Ok(match open {
                Some(r) => api(
                    ErrorCode::InvalidTransition,
                    format!(
                        "order {} for this certificate is still open ({})",
                        r.at::<String>(0)?,
                        r.at::<String>(1)?
                    ),
                ),
                None => Error::Setup("an order for this certificate was created meanwhile".into()),
            })
        };
        let result = self.db.write(|tx| {
            if tx
                .query_opt(
                    "SELECT id FROM orders WHERE issuer_key = ?1 AND serial_hex = ?2
                     AND state NOT IN ('completed', 'rejected') LIMIT 1",
                    params![new.issuer_key.as_str(), &new.serial_hex],
                )?
                .is_some()
            {
                return Err(open_elsewhere(tx)?);
            }
            tx.execute(
                "INSERT INTO orders (id, issuer_key, issuer_display, serial_hex, years, key_policy,
                   target_algorithm, with_encryption_cert, old_encryption_serial_hex, state,
                   renewal_code, created_at, updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?12, ?11, ?11)",
                params![
                    id,
                    new.issuer_key.as_str(),
                    &new.issuer_display,
                    &new.serial_hex,
                    new.terms.years,
                    new.terms.key_policy.as_str(),
                    new.terms.target_algorithm.as_str(),
                    new.terms.with_encryption_cert,
                    &new.old_encryption_serial_hex,
                    new.state.as_str(),
                    now,
                    &new.renewal_code,
                ],
            )?;
            get_order(tx, id)?.ok_or_else(|| Error::Setup("inserted order vanished".into()))
        });
        match result {
            // Another instance created an open order for the same certificate between
            // the check and the insert: the unique index refused ours.
            Err(Error::Db(e)) if e.is_unique_violation() => {
                Err(self.db.read(|tx| open_elsewhere(tx))?)
            }
            other => other,
        }
    }

    /// Whether new orders get a renewal code.
    pub fn renewal_code_required(&self) -> Result<bool, Error> {
        self.db.read(|tx| {
            Ok(tx
                .query_opt(
                    "SELECT value FROM meta WHERE key = 'renewal_code_required'",
                    &[],
                )?
                .map(|r| r.at::<bool>(0))
                .transpose()?
                .unwrap_or(false))
        })
    }

    /// Sets whether new orders get a renewal code (every instance reads it).
    pub fn set_renewal_code_required(&self, on: bool) -> Result<(), Error> {
        self.db.write(|tx| {
            tx.execute(
                "UPDATE meta SET value = ?1 WHERE key = 'renewal_code_required'",
                params![on],
            )?;
            Ok(())
        })
    }

    /// Counts a wrong renewal code against an order; the failures so far.
    pub fn renewal_code_failed(&self, order_id: &str, now: i64) -> Result<i64, Error> {
        self.db.write(|tx| {
            let failures = lock_order(tx, order_id)?.renewal_code_failures + 1;
            tx.execute(
                "UPDATE orders SET renewal_code_failures = ?2, updated_at = ?3 WHERE id = ?1",
                params![order_id, failures, now],
            )?;
            Ok(failures)
        })
    }

    /// One order.
    pub fn order(&self, id: &str) -> Result<Option<Order>, Error> {
        self.db.read(|tx| get_order(tx, id))
    }

    /// The newest order for a certificate.
    pub fn latest_order_for(
        &self,
        issuer_key: &NameKey,
        serial_hex: &str,
    ) -> Result<Option<Order>, Error> {
        self.db.read(|tx| {
            tx.query_opt(
                select_orders!(
                    "WHERE issuer_key = ?1 AND serial_hex = ?2
                     ORDER BY created_at DESC, rowid DESC LIMIT 1"
                ),
                params![issuer_key.as_str(), serial_hex],
            )?
            .as_ref()
            .map(order_from_row)
            .transpose()
        })
    }

    /// The orders for a serial (any issuer), newest first (indexed).
    pub fn orders_for_serial(&self, serial_hex: &str) -> Result<Vec<Order>, Error> {
        self.db.read(|tx| {
            tx.query(
                select_orders!("WHERE serial_hex = ?1 ORDER BY created_at DESC, rowid DESC"),
                params![serial_hex],
            )?
            .iter()
            .map(order_from_row)
            .collect()
        })
    }

    /// Every order, newest first.
    pub fn list_orders(&self) -> Result<Vec<Order>, Error> {
        self.db.read(|tx| {
            tx.query(select_orders!("ORDER BY created_at DESC, rowid DESC"), &[])?
                .iter()
                .map(order_from_row)
                .collect()
        })
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
        self.db.write(|tx| {
            let order = lock_order(tx, id)?;
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
            get_order(tx, id)?.ok_or_else(|| Error::Setup("order vanished".into()))
        })
    }

    /// Records a new challenge, unless its order has [`OUTSTANDING_CHALLENGES`] unused
    /// ones that have not expired (`rate_limited`); forgets challenges expired over ten
    /// minutes ago.
    /// `check` decides on the order, locked, before the challenge is written (its state:
    /// one read less than looking it up first).
    pub fn insert_challenge(
        &self,
        ch: &Challenge,
        now: i64,
        check: &dyn Fn(&Order) -> Result<(), Error>,
    ) -> Result<(), Error> {
        self.purge_expired_challenges(now)?;
        self.db.write(|tx| {
            // The order locked, the challenge written and the outstanding ones counted
            // (this one too) in one round trip; a refusal rolls the insert back.
            let lock = lock_order_sql(tx.kind());
            let [locked, inserted, counted] = db::pipeline(
                tx,
                [
                    Stmt::Query(lock, params![&ch.order_id]),
                    Stmt::Execute(
                        "INSERT INTO challenges (id, order_id, nonce, expires_at) VALUES (?1, ?2, ?3, ?4)",
                        params![&ch.id, &ch.order_id, &ch.nonce, ch.expires_at],
                    ),
                    Stmt::Query(
                        "SELECT count(*) FROM challenges
                         WHERE order_id = ?1 AND used_at IS NULL AND expires_at > ?2",
                        params![&ch.order_id, now],
                    ),
                ],
            );
            check(&order_locked(&ch.order_id, locked)?)?;
            inserted?;
            let outstanding: i64 = counted?
                .rows()
                .first()
                .map(|r| r.at(0))
                .transpose()?
                .unwrap_or(0)
                - 1;
            if outstanding >= OUTSTANDING_CHALLENGES {
                return Err(api(
                    ErrorCode::RateLimited,
                    format!(
                        "该订单未使用的挑战过多，请稍后再试 / order {} has {outstanding} unused challenges: use one or wait for them to expire",
                        ch.order_id
                    ),
                ));
            }
            Ok(())
        })
    }

    /// Deletes challenges expired [`EXPIRED_CHALLENGE_KEPT_SECONDS`] ago, at most once a
    /// minute per instance (a challenge lives minutes; the index on the expiry makes it
    /// one short statement), in a transaction of its own.
    fn purge_expired_challenges(&self, now: i64) -> Result<(), Error> {
        use std::sync::atomic::Ordering;
        let last = self.last_purge.load(Ordering::Relaxed);
        if now - last < PURGE_EVERY_SECONDS
            || self
                .last_purge
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            return Ok(());
        }
        self.db.write(|tx| {
            tx.execute(
                "DELETE FROM challenges WHERE expires_at < ?1",
                params![now - EXPIRED_CHALLENGE_KEPT_SECONDS],
            )?;
            Ok::<_, Error>(())
        })
    }

    /// An order, one challenge, and whether a certificate is revoked, in one read:
    /// `None` without the order; the challenge only when it is that order's; the
    /// revocation of `revoked.1` (serial) under the issuer key `revoked.0`.
    pub fn order_with_challenge(
        &self,
        order_id: &str,
        challenge_id: &str,
        revoked: (&str, &str),
    ) -> Result<Option<OrderWithChallenge>, Error> {
        self.db.read(|tx| {
            let Some(r) = tx.query_opt(
                "SELECT o.id, o.issuer_key, o.issuer_display, o.serial_hex, o.years, o.key_policy,
                       o.target_algorithm, o.with_encryption_cert, o.old_encryption_serial_hex, o.state,
                       o.reject_reason, o.tracking_number, o.current_spki_sha256, o.current_signing_serial,
                       o.current_encryption_serial, o.renewal_code, o.renewal_code_failures, o.issuer_ski,
                       o.created_at, o.updated_at,
                       c.id AS challenge_id, c.nonce AS challenge_nonce,
                       c.expires_at AS challenge_expires_at, c.used_at AS challenge_used_at,
                       EXISTS (SELECT 1 FROM revocations r
                               WHERE r.issuer_ski = ?3 AND r.serial_hex = ?4) AS revoked
                     FROM orders o LEFT JOIN challenges c ON c.id = ?2 AND c.order_id = o.id
                     WHERE o.id = ?1",
                params![order_id, challenge_id, revoked.0, revoked.1],
            )?
            else {
                return Ok(None);
            };
            let order = order_from_row(&r)?;
            let challenge = match r.get::<Option<String>>("challenge_id")? {
                Some(id) => Some(Challenge {
                    id,
                    order_id: order.id.clone(),
                    nonce: r.get("challenge_nonce")?,
                    expires_at: r.get("challenge_expires_at")?,
                    used_at: r.get("challenge_used_at")?,
                }),
                None => None,
            };
            Ok(Some(OrderWithChallenge {
                revoked: r.get::<i64>("revoked")? != 0,
                order,
                challenge,
            }))
        })
    }

    /// One challenge.
    pub fn challenge(&self, id: &str) -> Result<Option<Challenge>, Error> {
        self.db.read(|tx| {
            let Some(r) = tx.query_opt(
                "SELECT id, order_id, nonce, expires_at, used_at FROM challenges WHERE id = ?1",
                params![id],
            )?
            else {
                return Ok(None);
            };
            Ok(Some(Challenge {
                id: r.at(0)?,
                order_id: r.at(1)?,
                nonce: r.at(2)?,
                expires_at: r.at(3)?,
                used_at: r.at(4)?,
            }))
        })
    }

    /// Whether the certificate `serial_hex` of the issuer key `issuer_ski` is revoked.
    pub fn is_revoked(&self, issuer_ski: &str, serial_hex: &str) -> Result<bool, Error> {
        self.db.read(|tx| {
            Ok(tx
                .query_opt(
                    "SELECT 1 FROM revocations WHERE issuer_ski = ?1 AND serial_hex = ?2",
                    params![issuer_ski, serial_hex],
                )?
                .is_some())
        })
    }

    /// Resolves what was recorded before CA keys were (migration 6): revocations kept
    /// under an issuer's name get the key of the first of `issuers` (name, SKI) with
    /// that name; issued certificates without a CA key get the SKI `signer_of` finds
    /// for their DER. Returns the certificates left whose CA key is not known.
    pub fn resolve_issuers(
        &self,
        issuers: &[(NameKey, String)],
        signer_of: &dyn Fn(&[u8]) -> Option<String>,
    ) -> Result<usize, Error> {
        let unresolved: Vec<(String, Vec<u8>)> = self.db.read(|tx| {
            tx.query(
                "SELECT serial_hex, der FROM certificates WHERE issuer_ski IS NULL",
                &[],
            )?
            .iter()
            .map(|r| Ok((r.at(0)?, r.at(1)?)))
            .collect::<Result<_, Error>>()
        })?;
        let found: Vec<(String, String)> = unresolved
            .iter()
            .filter_map(|(serial, der)| signer_of(der).map(|ski| (serial.clone(), ski)))
            .collect();
        // Set by migration 6 while revocations named by issuer may remain: a key lookup
        // at every start, not a scan of every revocation.
        let named = self.db.read(|tx| {
            Ok::<_, Error>(
                tx.query_opt(
                    "SELECT 1 FROM meta WHERE key = 'revocations_by_name' AND value = 1",
                    &[],
                )?
                .is_some(),
            )
        })?;
        if named || !found.is_empty() {
            self.db.write(|tx| {
                let mut seen = std::collections::HashSet::new();
                for (name, ski) in issuers {
                    if seen.insert(name.as_str()) {
                        let named = format!("name:{}", name.as_str());
                        tx.execute(
                            "UPDATE revocations SET issuer_ski = ?1 WHERE issuer_ski = ?2",
                            params![ski, &named],
                        )?;
                    }
                }
                for (serial, ski) in &found {
                    tx.execute(
                        "UPDATE certificates SET issuer_ski = ?2 WHERE serial_hex = ?1",
                        params![serial, ski],
                    )?;
                }
                // Rows of an issuer the portal does not know stay named (and the flag
                // set, for a start that knows it).
                let left = tx
                    .query_opt(
                        "SELECT 1 FROM revocations WHERE issuer_ski LIKE 'name:%' LIMIT 1",
                        &[],
                    )?
                    .is_some();
                if named && !left {
                    tx.execute(
                        "UPDATE meta SET value = 0 WHERE key = 'revocations_by_name'",
                        &[],
                    )?;
                }
                Ok::<_, Error>(())
            })?;
        }
        Ok(unresolved.len() - found.len())
    }

    /// An issued certificate.
    pub fn certificate(&self, serial_hex: &str) -> Result<Option<StoredCert>, Error> {
        self.db.read(|tx| get_cert(tx, serial_hex))
    }

    /// Consumes the challenge and records the issuance; earlier, never-installed
    /// certificates of the order are revoked. Re-checks challenge and order state.
    pub fn commit_issue(&self, new: &NewIssuance, now: i64) -> Result<IssueCommit, Error> {
        self.db.write(|tx| {
            let order = match &new.freshness {
                Freshness::Challenge(id) => {
                    // The order locked and the challenge used in one round trip.
                    let lock = lock_order_sql(tx.kind());
                    let [locked, used] = db::pipeline(
                        tx,
                        [
                            Stmt::Query(lock, params![&new.order_id]),
                            Stmt::Execute(USE_CHALLENGE, params![id, &new.order_id, now]),
                        ],
                    );
                    let order = order_locked(&new.order_id, locked)?;
                    if used?.count() != 1 {
                        return Err(challenge_refused(tx, id, &new.order_id, now));
                    }
                    order
                }
                Freshness::Cmp(step) => {
                    let order = lock_order(tx, &new.order_id)?;
                    apply_cmp(tx, step, now)?;
                    order
                }
            };
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
                let signing = match order.current_signing_serial.as_deref() {
                    Some(s) => get_cert(tx, s)?,
                    None => None,
                }
                .ok_or_else(|| Error::Setup("issued order without certificate".into()))?;
                let encryption = match order.current_encryption_serial.as_deref() {
                    Some(s) => get_cert(tx, s)?,
                    None => None,
                };
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
                let issuer = issuer_of_issued(tx, serial)?;
                revoked_any |= revoke(tx, &issuer, serial, "superseded", now, &order.id)?;
            }
            if revoked_any {
                bump_crl_number(tx)?;
            }
            // The certificates and the order's new state leave with the commit.
            let certs: Vec<Vec<Param<'_>>> = std::iter::once(&new.signing)
                .chain(new.encryption.as_ref())
                .map(|cert| {
                    params![
                        &cert.serial_hex,
                        &cert.order_id,
                        &cert.kind,
                        &cert.spki_sha256,
                        &cert.der,
                        &cert.subject,
                        &cert.escrow_pkcs8,
                        now,
                        &cert.issuer_ski
                    ]
                    .to_vec()
                })
                .collect();
            let mut writes: Vec<Stmt<'_>> = certs
                .iter()
                .map(|p| {
                    Stmt::Execute(
                        "INSERT INTO certificates (serial_hex, order_id, kind, spki_sha256, der, subject,
                           escrow_pkcs8, issued_at, issuer_ski) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                        p,
                    )
                })
                .collect();
            let order_params = params![
                &order.id,
                &new.spki_sha256,
                &new.signing.serial_hex,
                new.encryption.as_ref().map(|c| c.serial_hex.as_str()),
                now,
                &new.renewed_issuer_ski
            ];
            writes.push(Stmt::Execute(
                "UPDATE orders SET state = 'issued', current_spki_sha256 = ?2, current_signing_serial = ?3,
                   current_encryption_serial = ?4, updated_at = ?5, issuer_ski = ?6 WHERE id = ?1",
                order_params,
            ));
            tx.finish(&writes)?;
            Ok(IssueCommit::Issued)
        })
    }

    /// Consumes the freshness of an idempotent repeat (same key, same certificates).
    pub fn commit_repeat(
        &self,
        freshness: &Freshness,
        order_id: &str,
        spki_sha256: &[u8],
        now: i64,
    ) -> Result<(), Error> {
        self.db.write(|tx| {
            let order = lock_order(tx, order_id)?;
            consume(tx, freshness, order_id, now)?;
            if order.state != OrderState::Issued
                || order.current_spki_sha256.as_deref() != Some(spki_sha256)
            {
                return Err(api(
                    ErrorCode::OrderNotReady,
                    format!("the order changed meanwhile (now {})", order.state.as_str()),
                ));
            }
            Ok(())
        })
    }

    /// Completes the order: revokes the certificate it renews (and the old encryption
    /// certificate it names). Returns the serials revoked by this order. Idempotent for
    /// the same certificate.
    /// Over CMP the certConf `confirm` is recorded with it. The renewed certificate's
    /// issuer key is the one its issue request proved, else `renewed_issuer_ski` (an
    /// order issued before keys were recorded).
    pub fn commit_installed(
        &self,
        order_id: &str,
        serial_hex: &str,
        confirm: Option<&CmpStep>,
        renewed_issuer_ski: &str,
        now: i64,
    ) -> Result<Vec<String>, Error> {
        self.db.write(|tx| {
            let order = lock_order(tx, order_id)?;
            if let Some(step) = confirm {
                apply_cmp(tx, step, now)?;
            }
            let is_current = order.current_signing_serial.as_deref() == Some(serial_hex);
            match order.state {
                OrderState::Issued if is_current => {
                    let issuer = order.issuer_ski.as_deref().unwrap_or(renewed_issuer_ski);
                    // The old encryption certificate: this portal's (its CA key
                    // recorded), else the renewed certificate's issuer's.
                    let enc_issuer = match &order.old_encryption_serial_hex {
                        Some(enc) => get_cert(tx, enc)?.map(|c| c.issuer().to_owned()),
                        None => None,
                    };
                    let mut revocations = vec![
                        params![issuer, &order.serial_hex, now, "superseded", order_id].to_vec(),
                    ];
                    if let Some(enc) = &order.old_encryption_serial_hex {
                        let enc_issuer = enc_issuer.as_deref().unwrap_or(issuer);
                        revocations
                            .push(params![enc_issuer, enc, now, "superseded", order_id].to_vec());
                    }
                    // The revocations, a new CRL number and the order's new state leave
                    // with the commit, so the CRL number's counter is locked for that
                    // one round trip. The number moves even when an operator revoked the old
                    // certificate first (the CRL is then unchanged): numbers only need to
                    // increase (RFC 5280, 5.2.3), and a conditional bump would cost a
                    // round trip under the lock.
                    let completed = params![order_id, now];
                    let shard = params![crl_number_shard()];
                    let mut writes: Vec<Stmt<'_>> = revocations
                        .iter()
                        .map(|p| Stmt::Execute(REVOKE, p))
                        .collect();
                    writes.push(Stmt::Execute(BUMP_CRL_NUMBER, shard));
                    writes.push(Stmt::Execute(
                        "UPDATE orders SET state = 'completed', updated_at = ?2 WHERE id = ?1",
                        completed,
                    ));
                    tx.finish(&writes)?;
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
            Ok(revoked)
        })
    }

    /// An operator's revocation of a certificate this portal issued, with its reason.
    /// Refused when it is already revoked (the CRL keeps the first reason).
    pub fn revoke_issued(&self, serial_hex: &str, reason: &str, now: i64) -> Result<(), Error> {
        self.db.write(|tx| {
            let cert = get_cert(tx, serial_hex)?.ok_or_else(|| {
                api(
                    ErrorCode::CertificateNotIssued,
                    format!("this portal issued no certificate {serial_hex}"),
                )
            })?;
            if !revoke(tx, cert.issuer(), serial_hex, reason, now, &cert.order_id)? {
                let earlier: String = tx
                    .query_opt(
                        "SELECT reason FROM revocations WHERE issuer_ski = ?1 AND serial_hex = ?2",
                        params![cert.issuer(), serial_hex],
                    )?
                    .map(|r| r.at(0))
                    .transpose()?
                    .unwrap_or_default();
                return Err(api(
                    ErrorCode::InvalidTransition,
                    format!("certificate {serial_hex} is already revoked ({earlier})"),
                ));
            }
            bump_crl_number(tx)?;
            Ok(())
        })
    }

    /// An operator cancels an order that is not completed: it becomes rejected with the
    /// operator's reason, and the certificates it issued (never confirmed installed) are
    /// revoked with `revoke_reason`. Returns the order and the serials revoked.
    pub fn cancel_order(
        &self,
        id: &str,
        reason: &str,
        revoke_reason: &str,
        now: i64,
    ) -> Result<(Order, Vec<String>), Error> {
        self.db.write(|tx| {
            let order = lock_order(tx, id)?;
            if !order.state.is_open() {
                return Err(api(
                    ErrorCode::InvalidTransition,
                    format!(
                        "order {id} is {}: a completed renewal is undone by revoking its certificate",
                        order.state.as_str()
                    ),
                ));
            }
            let serials = tx
                .query(
                    "SELECT serial_hex, issuer_ski FROM certificates WHERE order_id = ?1
                     ORDER BY serial_hex",
                    params![id],
                )?
                .iter()
                .map(|r| Ok((r.at::<String>(0)?, r.at::<Option<String>>(1)?)))
                .collect::<Result<Vec<_>, Error>>()?;
            let mut revoked = Vec::new();
            for (serial, issuer) in serials {
                let issuer = issuer.as_deref().unwrap_or(UNKNOWN_ISSUER);
                if revoke(tx, issuer, &serial, revoke_reason, now, id)? {
                    revoked.push(serial);
                }
            }
            if !revoked.is_empty() {
                bump_crl_number(tx)?;
            }
            tx.execute(
                "UPDATE orders SET state = 'rejected', reject_reason = ?2, updated_at = ?3 WHERE id = ?1",
                params![id, reason, now],
            )?;
            let order = get_order(tx, id)?.ok_or_else(|| Error::Setup("order vanished".into()))?;
            Ok((order, revoked))
        })
    }

    /// The sweep of renewals left half-way: every order issued at or before `before`
    /// (Unix seconds) whose installation was never confirmed goes back to `ready` (it is
    /// still paid), and the certificates it issued are revoked with `revoke_reason`.
    /// Returns each order swept with the serials revoked.
    pub fn sweep_unconfirmed(
        &self,
        before: i64,
        revoke_reason: &str,
        now: i64,
    ) -> Result<Vec<(String, Vec<String>)>, Error> {
        self.db.write(|tx| {
            let ids = tx
                .query(
                    "SELECT id FROM orders WHERE state = 'issued' AND updated_at <= ?1 ORDER BY id",
                    params![before],
                )?
                .iter()
                .map(|r| r.at::<String>(0))
                .collect::<Result<Vec<_>, _>>()?;
            let mut swept = Vec::new();
            for id in ids {
                let order = lock_order(tx, &id)?;
                if order.state != OrderState::Issued || order.updated_at > before {
                    continue; // changed meanwhile
                }
                let mut revoked = Vec::new();
                for serial in [
                    &order.current_signing_serial,
                    &order.current_encryption_serial,
                ]
                .into_iter()
                .flatten()
                {
                    let issuer = issuer_of_issued(tx, serial)?;
                    if revoke(tx, &issuer, serial, revoke_reason, now, &id)? {
                        revoked.push(serial.clone());
                    }
                }
                tx.execute(
                    "UPDATE orders SET state = 'ready', current_spki_sha256 = NULL,
                       current_signing_serial = NULL, current_encryption_serial = NULL,
                       updated_at = ?2 WHERE id = ?1",
                    params![&id, now],
                )?;
                swept.push((id, revoked));
            }
            if swept.iter().any(|(_, r)| !r.is_empty()) {
                bump_crl_number(tx)?;
            }
            Ok(swept)
        })
    }

    /// A CMP transaction.
    pub fn cmp_transaction(&self, id: &[u8]) -> Result<Option<CmpTransaction>, Error> {
        self.db.read(|tx| {
            let Some(r) = tx.query_opt(
                "SELECT id, order_id, kind, cert_req_id, request_der, state, certificate_serial,
                   server_nonce, created_at, updated_at FROM cmp_transactions WHERE id = ?1",
                params![id],
            )?
            else {
                return Ok(None);
            };
            Ok(Some(CmpTransaction {
                id: r.at(0)?,
                order_id: r.at(1)?,
                kind: r.at(2)?,
                cert_req_id: r.at(3)?,
                request_der: r.at(4)?,
                state: r.at(5)?,
                certificate_serial: r.at(6)?,
                server_nonce: r.at(7)?,
                created_at: r.at(8)?,
                updated_at: r.at(9)?,
            }))
        })
    }

    /// Records a CMP message that changes nothing else (waiting, polled, rejected).
    pub fn cmp_record(&self, step: &CmpStep, now: i64) -> Result<(), Error> {
        self.db.write(|tx| apply_cmp(tx, step, now))
    }

    /// The serials of the certificates with an escrowed key, oldest first.
    pub fn escrow_serials(&self) -> Result<Vec<String>, Error> {
        self.db.read(|tx| {
            tx.query(
                "SELECT serial_hex FROM certificates WHERE escrow_pkcs8 IS NOT NULL
                 ORDER BY issued_at, serial_hex",
                &[],
            )?
            .iter()
            .map(|r| Ok(r.at(0)?))
            .collect::<Result<Vec<_>, Error>>()
        })
    }

    /// How many escrowed keys are stored in clear (not a sealed blob).
    pub fn escrow_in_clear(&self) -> Result<i64, Error> {
        self.db.read(|tx| {
            let head = match tx.kind() {
                Kind::Sqlite => "substr(escrow_pkcs8, 1, 5)",
                Kind::Postgres => "substring(escrow_pkcs8 from 1 for 5)",
            };
            let magic = crate::hsm::SEALED_MAGIC.to_vec();
            let sql = format!(
                "SELECT count(*) FROM certificates WHERE escrow_pkcs8 IS NOT NULL AND {head} <> ?1"
            );
            Ok::<_, Error>(
                tx.query_opt(&sql, params![&magic])?
                    .map(|r| r.at(0))
                    .transpose()?
                    .unwrap_or(0),
            )
        })
    }

    /// Replaces the stored escrow of `serial_hex` by `new`, if it is still `old` (a
    /// portal running meanwhile changes nothing here: escrow is written once); false
    /// when it was not.
    pub fn replace_escrow(&self, serial_hex: &str, old: &[u8], new: &[u8]) -> Result<bool, Error> {
        let (old, new) = (old.to_vec(), new.to_vec());
        self.db.write(|tx| {
            Ok::<_, Error>(
                tx.execute(
                    "UPDATE certificates SET escrow_pkcs8 = ?3
                     WHERE serial_hex = ?1 AND escrow_pkcs8 = ?2",
                    params![serial_hex, &old, &new],
                )? == 1,
            )
        })
    }

    /// Rewrites the certificates' storage so that replaced values are gone from it
    /// (see [`Db::compact`]).
    pub fn compact_certificates(&self) -> Result<(), Error> {
        Ok(self.db.compact("certificates")?)
    }

    /// CRL number and the revocations of certificates issued by the key `issuer_ski`.
    pub fn crl_entries(&self, issuer_ski: &str) -> Result<(u64, Vec<RevocationRow>), Error> {
        self.db.read(|tx| {
            // One statement, so one snapshot on PostgreSQL too: a revocation committed
            // between two reads would give one number to two different CRLs.
            let found = tx.query(
                "SELECT c.number, r.serial_hex, r.revoked_at, r.reason
                 FROM (SELECT CAST(sum(n) AS BIGINT) AS number FROM crl_number_shards) c
                 LEFT JOIN revocations r ON r.issuer_ski = ?1
                 ORDER BY r.revoked_at, r.serial_hex",
                params![issuer_ski],
            )?;
            let number: Option<i64> = match found.first() {
                Some(row) => row.at(0)?,
                None => None,
            };
            let number =
                number.ok_or_else(|| Error::Setup("no CRL number in the database".into()))?;
            let mut rows = Vec::with_capacity(found.len());
            for r in &found {
                let (serial, at, reason): (Option<String>, Option<i64>, Option<String>) =
                    (r.at(1)?, r.at(2)?, r.at(3)?);
                if let (Some(serial), Some(at), Some(reason)) = (serial, at, reason) {
                    rows.push((serial, at, reason));
                }
            }
            Ok((u64::try_from(number).unwrap_or(0), rows))
        })
    }

    /// Every row of every table as text, for tests that prove a failed request changed
    /// nothing.
    pub fn dump(&self) -> Result<String, Error> {
        let order = match self.db.kind() {
            Kind::Sqlite => "rowid",
            Kind::Postgres => "1, 2",
        };
        self.db.read(|tx| {
            let mut out = String::new();
            for table in [
                "orders",
                "challenges",
                "certificates",
                "revocations",
                "meta",
                "crl_number_shards",
                "cmp_transactions",
                "cmp_nonces",
            ] {
                let order = if table == "orders" { "rowid" } else { order };
                out.push_str(&format!("== {table}\n"));
                for row in tx.query(&format!("SELECT * FROM {table} ORDER BY {order}"), &[])? {
                    let fields: Vec<String> =
                        row.values().iter().map(|v| format!("{v:?}")).collect();
                    out.push_str(&fields.join("|"));
                    out.push('\n');
                }
            }
            Ok(out)
        })
    }
}

fn consume(tx: &mut dyn Tx, f: &Freshness, order_id: &str, now: i64) -> Result<(), Error> {
    match f {
        Freshness::Challenge(id) => consume_challenge(tx, id, order_id, now),
        Freshness::Cmp(step) => apply_cmp(tx, step, now),
    }
}

/// How long a CMP senderNonce is remembered: well beyond the messageTime window, so
/// that a replay is refused by one check or the other.
const CMP_NONCE_MEMORY_SECONDS: i64 = 86_400;

/// Records a CMP message: its senderNonce (refused when seen before), and its
/// transaction: a new one (refused when the transactionID exists) or the next step of
/// an existing one (refused unless its recipNonce is the portal's last nonce).
fn apply_cmp(tx: &mut dyn Tx, step: &CmpStep, now: i64) -> Result<(), Error> {
    use ukey_cmp::server::{Failure, Refusal};
    let refuse = |f: Failure, t: &str| Err(Error::Cmp(Refusal::new(f, t)));
    tx.execute(
        "DELETE FROM cmp_nonces WHERE seen_at < ?1",
        params![now - CMP_NONCE_MEMORY_SECONDS],
    )?;
    let fresh = tx.execute(
        "INSERT INTO cmp_nonces (nonce, seen_at) VALUES (?1, ?2) ON CONFLICT DO NOTHING",
        params![&step.client_nonce, now],
    )?;
    if fresh == 0 {
        return refuse(
            Failure::BadSenderNonce,
            "this senderNonce was seen before: a replayed message",
        );
    }
    match &step.begins {
        Some(n) => {
            let inserted = tx.execute(
                "INSERT INTO cmp_transactions (id, order_id, kind, cert_req_id,
                   request_der, state, certificate_serial, server_nonce, created_at, updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?9) ON CONFLICT DO NOTHING",
                params![
                    &step.transaction_id,
                    &n.order_id,
                    &n.kind,
                    &n.cert_req_id,
                    &n.request_der,
                    step.state,
                    &step.certificate_serial,
                    &step.server_nonce,
                    now
                ],
            )?;
            if inserted == 0 {
                return refuse(
                    Failure::TransactionIdInUse,
                    "this transactionID was used before: start a new transaction",
                );
            }
        }
        None => {
            let updated = tx.execute(
                "UPDATE cmp_transactions SET state = ?3,
                   certificate_serial = COALESCE(?4, certificate_serial), server_nonce = ?5,
                   updated_at = ?6
                 WHERE id = ?1 AND server_nonce = ?2",
                params![
                    &step.transaction_id,
                    &step.recip_nonce,
                    step.state,
                    &step.certificate_serial,
                    &step.server_nonce,
                    now
                ],
            )?;
            if updated == 0 {
                return refuse(
                    Failure::BadRecipientNonce,
                    "the recipNonce is not the nonce of the portal's last answer in this transaction",
                );
            }
        }
    }
    Ok(())
}

/// Marks the challenge used: refused when it is unknown, another order's, used or
/// expired. The update is conditional, so two requests racing for one challenge
/// (two instances) cannot both use it.
fn consume_challenge(tx: &mut dyn Tx, id: &str, order_id: &str, now: i64) -> Result<(), Error> {
    if tx.execute(USE_CHALLENGE, params![id, order_id, now])? == 1 {
        return Ok(());
    }
    Err(challenge_refused(tx, id, order_id, now))
}

/// [`consume_challenge`]'s update (`?1` the challenge, `?2` its order, `?3` now): one
/// row changed when the challenge could be used.
const USE_CHALLENGE: &str = "UPDATE challenges SET used_at = ?3
     WHERE id = ?1 AND order_id = ?2 AND used_at IS NULL AND expires_at > ?3";

/// Why [`USE_CHALLENGE`] changed no row.
fn challenge_refused(tx: &mut dyn Tx, id: &str, order_id: &str, now: i64) -> Error {
    let read = tx
        .query_opt(
            "SELECT order_id, expires_at, used_at FROM challenges WHERE id = ?1",
            params![id],
        )
        .and_then(|row| {
            row.map(|r| Ok::<(String, i64, Option<i64>), DbError>((r.at(0)?, r.at(1)?, r.at(2)?)))
                .transpose()
        });
    match read {
        Err(e) => e.into(),
        Ok(None) => api(ErrorCode::ChallengeNotFound, format!("no challenge {id}")),
        Ok(Some((o, _, _))) if o != order_id => api(
            ErrorCode::ChallengeNotFound,
            format!("challenge {id} belongs to another order"),
        ),
        Ok(Some((_, _, Some(_)))) => {
            api(ErrorCode::ChallengeUsed, "the challenge was already used")
        }
        Ok(Some((_, exp, None))) if exp <= now => {
            api(ErrorCode::ChallengeExpired, "the challenge expired")
        }
        Ok(Some(_)) => Error::Setup(format!("challenge {id} could not be used")),
    }
}
