//! The two databases the store runs on: SQLite (one file in the data directory, the
//! embedded default) and PostgreSQL (`--database postgres://…`, several portal instances
//! on one database). [`crate::store`] writes its SQL once against [`Tx`]; this module
//! runs it on either.
//!
//! The SQL dialect is the common subset: `?N` placeholders (turned into `$N` for
//! PostgreSQL), `INSERT … ON CONFLICT DO NOTHING`, no `rowid` except on `orders` (a
//! `BIGSERIAL rowid` column on PostgreSQL keeps insertion order there).
//!
//! **Writers.** SQLite: one connection, every write transaction `BEGIN IMMEDIATE` (the
//! database's one writer lock). PostgreSQL: a small pool, `READ COMMITTED`, and every
//! write transaction that decides on an order's state first locks that order's row
//! (`SELECT … FOR UPDATE`, the store's `lock_order`): two instances deciding on one order
//! take turns, exactly as two threads do on SQLite. Uniqueness the store relies on
//! (one open order per certificate, a challenge used once, a CMP nonce seen once) is
//! held by the database's own constraints or by conditional updates whose row counts
//! are checked. A transaction that PostgreSQL aborts for a deadlock or a serialization
//! failure is run again (it changed nothing).

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use rusqlite::TransactionBehavior;
use tokio_postgres::types::{FromSql, IsNull, ToSql, Type, to_sql_checked};

/// A database error.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// SQLite.
    #[error("SQLite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// PostgreSQL.
    #[error("PostgreSQL: {0}")]
    Postgres(#[from] tokio_postgres::Error),
    /// A stored value of another type than the program expects.
    #[error("stored value: {0}")]
    Value(String),
}

impl DbError {
    /// A PostgreSQL transaction aborted by a deadlock or a serialization failure:
    /// it changed nothing and may run again.
    fn retryable(&self) -> bool {
        use tokio_postgres::error::SqlState;
        match self {
            DbError::Postgres(e) => matches!(
                e.code(),
                Some(c) if *c == SqlState::T_R_SERIALIZATION_FAILURE || *c == SqlState::T_R_DEADLOCK_DETECTED
            ),
            _ => false,
        }
    }

    /// A unique constraint refused a row.
    pub fn is_unique_violation(&self) -> bool {
        match self {
            DbError::Sqlite(rusqlite::Error::SqliteFailure(e, _)) => {
                e.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE
                    || e.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_PRIMARYKEY
            }
            DbError::Postgres(e) => {
                e.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION)
            }
            _ => false,
        }
    }
}

/// Which database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// SQLite.
    Sqlite,
    /// PostgreSQL.
    Postgres,
}

/// A value read from a row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    /// NULL.
    Null,
    /// An integer (booleans are 0/1).
    Int(i64),
    /// Text.
    Text(String),
    /// Bytes.
    Blob(Vec<u8>),
}

/// A statement parameter.
#[derive(Debug, Clone, Copy)]
pub enum Param<'a> {
    /// NULL.
    Null,
    /// An integer.
    Int(i64),
    /// Text.
    Text(&'a str),
    /// Bytes.
    Blob(&'a [u8]),
}

/// Conversion into a [`Param`].
pub trait IntoParam<'a> {
    /// The parameter.
    fn param(self) -> Param<'a>;
}

impl<'a> IntoParam<'a> for &'a str {
    fn param(self) -> Param<'a> {
        Param::Text(self)
    }
}
impl<'a> IntoParam<'a> for &'a String {
    fn param(self) -> Param<'a> {
        Param::Text(self)
    }
}
impl<'a> IntoParam<'a> for &'a [u8] {
    fn param(self) -> Param<'a> {
        Param::Blob(self)
    }
}
impl<'a> IntoParam<'a> for &'a Vec<u8> {
    fn param(self) -> Param<'a> {
        Param::Blob(self)
    }
}
impl<'a> IntoParam<'a> for i64 {
    fn param(self) -> Param<'a> {
        Param::Int(self)
    }
}
impl<'a> IntoParam<'a> for u32 {
    fn param(self) -> Param<'a> {
        Param::Int(i64::from(self))
    }
}
impl<'a> IntoParam<'a> for bool {
    fn param(self) -> Param<'a> {
        Param::Int(i64::from(self))
    }
}
impl<'a, T: IntoParam<'a>> IntoParam<'a> for Option<T> {
    fn param(self) -> Param<'a> {
        self.map_or(Param::Null, IntoParam::param)
    }
}
impl<'a> IntoParam<'a> for &'a Option<String> {
    fn param(self) -> Param<'a> {
        self.as_deref().map_or(Param::Null, Param::Text)
    }
}
impl<'a> IntoParam<'a> for &'a Option<Vec<u8>> {
    fn param(self) -> Param<'a> {
        self.as_deref().map_or(Param::Null, Param::Blob)
    }
}

/// `params![a, b, …]`: a slice of [`Param`].
#[macro_export]
#[doc(hidden)]
macro_rules! db_params {
    ($($p:expr),* $(,)?) => {
        &[$($crate::db::IntoParam::param($p)),*] as &[$crate::db::Param<'_>]
    };
}
pub use crate::db_params as params;

/// Conversion from a [`Value`].
pub trait FromValue: Sized {
    /// The Rust value, or why the stored one does not fit.
    fn from_value(v: &Value) -> Result<Self, String>;
}

impl FromValue for i64 {
    fn from_value(v: &Value) -> Result<i64, String> {
        match v {
            Value::Int(i) => Ok(*i),
            other => Err(format!("an integer expected, found {other:?}")),
        }
    }
}
impl FromValue for u32 {
    fn from_value(v: &Value) -> Result<u32, String> {
        let i = i64::from_value(v)?;
        u32::try_from(i).map_err(|_| format!("{i} out of range"))
    }
}
impl FromValue for bool {
    fn from_value(v: &Value) -> Result<bool, String> {
        Ok(i64::from_value(v)? != 0)
    }
}
impl FromValue for String {
    fn from_value(v: &Value) -> Result<String, String> {
        match v {
            Value::Text(s) => Ok(s.clone()),
            other => Err(format!("text expected, found {other:?}")),
        }
    }
}
impl FromValue for Vec<u8> {
    fn from_value(v: &Value) -> Result<Vec<u8>, String> {
        match v {
            Value::Blob(b) => Ok(b.clone()),
            other => Err(format!("bytes expected, found {other:?}")),
        }
    }
}
impl<T: FromValue> FromValue for Option<T> {
    fn from_value(v: &Value) -> Result<Option<T>, String> {
        match v {
            Value::Null => Ok(None),
            other => T::from_value(other).map(Some),
        }
    }
}

/// One row of a result.
#[derive(Debug, Clone)]
pub struct Row {
    names: Arc<[String]>,
    values: Vec<Value>,
}

impl Row {
    /// The column named `name`.
    pub fn get<T: FromValue>(&self, name: &str) -> Result<T, DbError> {
        let i = self
            .names
            .iter()
            .position(|n| n == name)
            .ok_or_else(|| DbError::Value(format!("no column {name}")))?;
        T::from_value(&self.values[i]).map_err(|e| DbError::Value(format!("{name}: {e}")))
    }

    /// The `i`th column.
    pub fn at<T: FromValue>(&self, i: usize) -> Result<T, DbError> {
        let v = self
            .values
            .get(i)
            .ok_or_else(|| DbError::Value(format!("no column {i}")))?;
        T::from_value(v).map_err(|e| DbError::Value(format!("column {i}: {e}")))
    }

    /// Every value, in column order.
    pub fn values(&self) -> &[Value] {
        &self.values
    }
}

/// One statement of a [`Tx::pipeline`] or [`Tx::finish`].
#[derive(Debug, Clone, Copy)]
pub enum Stmt<'s> {
    /// A query: its rows.
    Query(&'s str, &'s [Param<'s>]),
    /// A write: the number of rows it changed.
    Execute(&'s str, &'s [Param<'s>]),
}

/// What one statement of a pipeline gave.
#[derive(Debug)]
pub enum Outcome {
    /// A query's rows.
    Rows(Vec<Row>),
    /// A write's row count.
    Count(u64),
}

impl Outcome {
    /// A query's rows (none for a write).
    pub fn rows(self) -> Vec<Row> {
        match self {
            Outcome::Rows(r) => r,
            Outcome::Count(_) => Vec::new(),
        }
    }

    /// A write's row count (the number of rows for a query).
    pub fn count(&self) -> u64 {
        match self {
            Outcome::Rows(r) => r.len() as u64,
            Outcome::Count(n) => *n,
        }
    }
}

/// The error of a statement that did not run because an earlier one of its pipeline
/// failed.
fn not_run() -> DbError {
    DbError::Value("not run: an earlier statement of the pipeline failed".into())
}

/// [`Tx::pipeline`] for a fixed number of statements: one result for each.
pub fn pipeline<const N: usize>(
    tx: &mut dyn Tx,
    stmts: [Stmt<'_>; N],
) -> [Result<Outcome, DbError>; N] {
    let mut outs = tx.pipeline(&stmts).into_iter();
    std::array::from_fn(|_| outs.next().unwrap_or_else(|| Err(not_run())))
}

/// Statements inside one transaction (or, for reads, one connection).
pub trait Tx {
    /// Which database.
    fn kind(&self) -> Kind;
    /// Runs a statement; the number of rows it changed.
    fn execute(&mut self, sql: &str, params: &[Param<'_>]) -> Result<u64, DbError>;
    /// Runs a query; its rows.
    fn query(&mut self, sql: &str, params: &[Param<'_>]) -> Result<Vec<Row>, DbError>;

    /// The first row, if any.
    fn query_opt(&mut self, sql: &str, params: &[Param<'_>]) -> Result<Option<Row>, DbError> {
        Ok(self.query(sql, params)?.into_iter().next())
    }

    /// Runs `stmts` in order, each as [`Tx::query`] or [`Tx::execute`] would, each with
    /// its own result; on PostgreSQL all of them leave together and cost one round
    /// trip. After an error the later statements do not run (their result is an
    /// error too): the caller then ends the transaction with an error, which rolls
    /// it back.
    fn pipeline(&mut self, stmts: &[Stmt<'_>]) -> Vec<Result<Outcome, DbError>> {
        let mut failed = false;
        stmts
            .iter()
            .map(|s| {
                if failed {
                    return Err(not_run());
                }
                let out = match *s {
                    Stmt::Query(sql, p) => self.query(sql, p).map(Outcome::Rows),
                    Stmt::Execute(sql, p) => self.execute(sql, p).map(Outcome::Count),
                };
                failed = out.is_err();
                out
            })
            .collect()
    }

    /// The write transaction's last statements, and its commit: on PostgreSQL they
    /// leave with `COMMIT`, in one round trip. `Ok` means they ran and the transaction
    /// is committed (on SQLite, it is when the transaction's closure returns `Ok`,
    /// which it must then do); an error means nothing was written. The transaction
    /// runs no statement after this.
    fn finish(&mut self, stmts: &[Stmt<'_>]) -> Result<Vec<Outcome>, DbError> {
        self.pipeline(stmts).into_iter().collect()
    }
}

// ---------------------------------------------------------------------------------
// SQLite

struct SqliteTx<'c>(&'c rusqlite::Connection);

impl rusqlite::ToSql for Param<'_> {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        use rusqlite::types::{ToSqlOutput, ValueRef};
        Ok(ToSqlOutput::Borrowed(match *self {
            Param::Null => ValueRef::Null,
            Param::Int(i) => ValueRef::Integer(i),
            Param::Text(s) => ValueRef::Text(s.as_bytes()),
            Param::Blob(b) => ValueRef::Blob(b),
        }))
    }
}

impl Tx for SqliteTx<'_> {
    fn kind(&self) -> Kind {
        Kind::Sqlite
    }

    fn execute(&mut self, sql: &str, params: &[Param<'_>]) -> Result<u64, DbError> {
        let mut stmt = self.0.prepare_cached(sql)?;
        let n = stmt.execute(rusqlite::params_from_iter(params.iter()))?;
        Ok(n as u64)
    }

    fn query(&mut self, sql: &str, params: &[Param<'_>]) -> Result<Vec<Row>, DbError> {
        let mut stmt = self.0.prepare_cached(sql)?;
        let names: Arc<[String]> = stmt.column_names().iter().map(|s| s.to_string()).collect();
        let cols = names.len();
        let mut rows = stmt.query(rusqlite::params_from_iter(params.iter()))?;
        let mut out = Vec::new();
        while let Some(r) = rows.next()? {
            let mut values = Vec::with_capacity(cols);
            for i in 0..cols {
                values.push(match r.get_ref(i)? {
                    rusqlite::types::ValueRef::Null => Value::Null,
                    rusqlite::types::ValueRef::Integer(i) => Value::Int(i),
                    rusqlite::types::ValueRef::Real(f) => {
                        return Err(DbError::Value(format!("unexpected real {f}")));
                    }
                    rusqlite::types::ValueRef::Text(t) => {
                        Value::Text(String::from_utf8_lossy(t).into_owned())
                    }
                    rusqlite::types::ValueRef::Blob(b) => Value::Blob(b.to_vec()),
                });
            }
            out.push(Row {
                names: names.clone(),
                values,
            });
        }
        Ok(out)
    }
}

// ---------------------------------------------------------------------------------
// PostgreSQL

impl ToSql for Param<'_> {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut bytes::BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        match *self {
            Param::Null => Ok(IsNull::Yes),
            Param::Int(i) => match *ty {
                Type::INT8 => i.to_sql(ty, out),
                Type::INT4 => i32::try_from(i)?.to_sql(ty, out),
                Type::INT2 => i16::try_from(i)?.to_sql(ty, out),
                Type::BOOL => (i != 0).to_sql(ty, out),
                _ => Err(format!("an integer for a {ty} parameter").into()),
            },
            Param::Text(s) => s.to_sql(ty, out),
            Param::Blob(b) => b.to_sql(ty, out),
        }
    }

    fn accepts(_: &Type) -> bool {
        true
    }

    to_sql_checked!();
}

impl<'a> FromSql<'a> for Value {
    fn from_sql(
        ty: &Type,
        raw: &'a [u8],
    ) -> Result<Value, Box<dyn std::error::Error + Sync + Send>> {
        Ok(match *ty {
            Type::INT8 => Value::Int(i64::from_sql(ty, raw)?),
            Type::INT4 => Value::Int(i32::from_sql(ty, raw)?.into()),
            Type::INT2 => Value::Int(i16::from_sql(ty, raw)?.into()),
            Type::BOOL => Value::Int(bool::from_sql(ty, raw)?.into()),
            Type::BYTEA => Value::Blob(Vec::<u8>::from_sql(ty, raw)?),
            _ => Value::Text(String::from_sql(ty, raw)?),
        })
    }

    fn from_sql_null(_: &Type) -> Result<Value, Box<dyn std::error::Error + Sync + Send>> {
        Ok(Value::Null)
    }

    fn accepts(ty: &Type) -> bool {
        matches!(
            *ty,
            Type::INT8
                | Type::INT4
                | Type::INT2
                | Type::BOOL
                | Type::BYTEA
                | Type::TEXT
                | Type::VARCHAR
                | Type::NAME
                | Type::BPCHAR
        )
    }
}

/// `?N` → `$N`.
fn pg_sql(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len());
    let mut chars = sql.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '?' && chars.peek().is_some_and(|d| d.is_ascii_digit()) {
            out.push('$');
        } else {
            out.push(c);
        }
    }
    out
}

/// One pooled connection with its prepared statements and its own one-thread tokio
/// runtime, on which its socket is a task: whoever holds the connection drives that
/// runtime while it waits ([`drive`]), so a round trip costs no hop to another thread.
struct PgConn {
    client: tokio_postgres::Client,
    statements: HashMap<String, tokio_postgres::Statement>,
    /// A transaction was begun and not yet committed or rolled back (a panic in the
    /// middle): the connection is not given to anyone else.
    in_tx: bool,
    rt: Option<tokio::runtime::Runtime>,
}

impl Drop for PgConn {
    fn drop(&mut self) {
        // Dropping a runtime blocks, which async code may not do: it ends in the
        // background (the socket closes with it).
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

thread_local! {
    /// Set on the portal's blocking threads ([`blocking_section`]): the store may block
    /// on a connection's runtime here.
    static MAY_BLOCK: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` (the portal's work on a blocking thread, `spawn_blocking`) where the store
/// may drive its PostgreSQL connections on this very thread.
pub fn blocking_section<T>(f: impl FnOnce() -> T) -> T {
    struct Reset(bool);
    impl Drop for Reset {
        fn drop(&mut self) {
            MAY_BLOCK.with(|m| m.set(self.0));
        }
    }
    let _reset = Reset(MAY_BLOCK.with(|m| m.replace(true)));
    f()
}

/// Awaits `f` on the connection's runtime `rt`, on this thread when it may block (no
/// tokio runtime here, as in the CLI, or a [`blocking_section`], as the portal's
/// requests are), else (async code, as tests are) on a short-lived thread of its own:
/// a runtime cannot be blocked on from inside another's task.
fn drive<F>(rt: &tokio::runtime::Runtime, f: F) -> F::Output
where
    F: std::future::Future + Send,
    F::Output: Send,
{
    if MAY_BLOCK.with(|m| m.get()) || tokio::runtime::Handle::try_current().is_err() {
        return rt.block_on(f);
    }
    std::thread::scope(|s| {
        s.spawn(|| rt.block_on(f))
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))
    })
}

/// Where a write transaction's `BEGIN` is.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Begin {
    /// A read: no transaction.
    None,
    /// Not sent yet: it goes with the first statement, in the same round trip.
    Pending,
    /// Sent.
    Sent,
    /// Committed with the transaction's last statements ([`Tx::finish`]).
    Ended,
}

/// A statement's answer before its rows are turned into [`Row`]s.
enum Raw {
    Rows(Vec<tokio_postgres::Row>),
    Count(u64),
}

type RawFuture<'f> = std::pin::Pin<
    Box<dyn std::future::Future<Output = Result<Raw, tokio_postgres::Error>> + Send + 'f>,
>;

fn ended() -> DbError {
    DbError::Value("the transaction is already committed".into())
}

/// A PostgreSQL row as a [`Row`], its columns named after `stmt`'s.
fn pg_rows(
    stmt: &tokio_postgres::Statement,
    rows: &[tokio_postgres::Row],
) -> Result<Vec<Row>, DbError> {
    let names: Arc<[String]> = stmt.columns().iter().map(|c| c.name().to_owned()).collect();
    rows.iter()
        .map(|r| {
            let values = (0..names.len())
                .map(|i| r.try_get::<_, Value>(i))
                .collect::<Result<Vec<_>, _>>()?;
            Ok(Row {
                names: names.clone(),
                values,
            })
        })
        .collect()
}

/// What [`PgTx::send_all`] brings back: each statement's result, and `COMMIT`'s when
/// it was sent.
type Sent = (Vec<Result<Outcome, DbError>>, Option<Result<(), DbError>>);

struct PgTx<'a> {
    client: &'a tokio_postgres::Client,
    rt: &'a tokio::runtime::Runtime,
    statements: &'a mut HashMap<String, tokio_postgres::Statement>,
    begin: Begin,
}

impl PgTx<'_> {
    fn statement(&mut self, sql: &str) -> Result<tokio_postgres::Statement, DbError> {
        if let Some(s) = self.statements.get(sql) {
            return Ok(s.clone());
        }
        let text = pg_sql(sql);
        let stmt = drive(self.rt, self.client.prepare(&text))?;
        self.statements.insert(sql.to_owned(), stmt.clone());
        Ok(stmt)
    }

    /// Awaits `run` (a statement's future), with the transaction's `BEGIN` sent just
    /// before it when it is still pending: both requests leave together (tokio-postgres
    /// sends a request when its future is first polled, and `join!` polls in order), so
    /// a write transaction costs no round trip of its own to begin.
    fn run<T: Send>(
        &mut self,
        run: impl std::future::Future<Output = Result<T, tokio_postgres::Error>> + Send,
    ) -> Result<T, DbError> {
        match self.begin {
            Begin::Ended => return Err(ended()),
            Begin::None | Begin::Sent => return Ok(drive(self.rt, run)?),
            Begin::Pending => {}
        }
        self.begin = Begin::Sent;
        let begin = self.client.batch_execute("BEGIN");
        let (began, out) = drive(self.rt, async { futures_util::join!(begin, run) });
        began?;
        Ok(out?)
    }

    /// Sends `stmts` at once, after a pending `BEGIN` and, when `commit` (in a write
    /// transaction), before `COMMIT`, and awaits every answer: one round trip. The
    /// server runs them in order; after an error the later ones fail (the transaction
    /// is aborted) and a `COMMIT` rolls back.
    fn send_all(&mut self, stmts: &[Stmt<'_>], commit: bool) -> Sent {
        let fail_all = |e: DbError| {
            let mut e = Some(e);
            let outs = stmts
                .iter()
                .map(|_| Err(e.take().unwrap_or_else(not_run)))
                .collect();
            (outs, None)
        };
        if self.begin == Begin::Ended {
            return fail_all(ended());
        }
        let mut prepared = Vec::with_capacity(stmts.len());
        for s in stmts {
            let (Stmt::Query(sql, _) | Stmt::Execute(sql, _)) = *s;
            match self.statement(sql) {
                Ok(p) => prepared.push(p),
                Err(e) => return fail_all(e),
            }
        }
        let refs: Vec<Vec<&(dyn ToSql + Sync)>> = stmts
            .iter()
            .map(|s| {
                let (Stmt::Query(_, p) | Stmt::Execute(_, p)) = *s;
                p.iter().map(|p| p as _).collect()
            })
            .collect();
        let client = self.client;
        let begin = self.begin == Begin::Pending;
        let commit = commit && self.begin != Begin::None;
        let mut futures: Vec<RawFuture<'_>> = Vec::with_capacity(stmts.len() + 2);
        if begin {
            futures.push(Box::pin(async move {
                client.batch_execute("BEGIN").await.map(|()| Raw::Count(0))
            }));
        }
        for ((s, stmt), refs) in stmts.iter().zip(&prepared).zip(&refs) {
            futures.push(match s {
                Stmt::Query(..) => {
                    Box::pin(async move { client.query(stmt, refs).await.map(Raw::Rows) })
                }
                Stmt::Execute(..) => {
                    Box::pin(async move { client.execute(stmt, refs).await.map(Raw::Count) })
                }
            });
        }
        if commit {
            futures.push(Box::pin(async move {
                client.batch_execute("COMMIT").await.map(|()| Raw::Count(0))
            }));
        }
        // `join_all` polls its futures in order the first time (each sends its request
        // then), and the server answers in order.
        let mut answers = drive(self.rt, futures_util::future::join_all(futures)).into_iter();
        if begin {
            self.begin = Begin::Sent;
            if let Some(Err(e)) = answers.next() {
                return fail_all(e.into());
            }
        }
        let outs: Vec<Result<Outcome, DbError>> = stmts
            .iter()
            .zip(&prepared)
            .zip(answers.by_ref())
            .map(|((_, stmt), answer)| match answer? {
                Raw::Rows(rows) => pg_rows(stmt, &rows).map(Outcome::Rows),
                Raw::Count(n) => Ok(Outcome::Count(n)),
            })
            .collect();
        let committed = commit.then(|| {
            self.begin = Begin::Ended;
            match answers.next() {
                Some(Err(e)) => Err(DbError::from(e)),
                _ => Ok(()),
            }
        });
        (outs, committed)
    }
}

impl Tx for PgTx<'_> {
    fn kind(&self) -> Kind {
        Kind::Postgres
    }

    fn execute(&mut self, sql: &str, params: &[Param<'_>]) -> Result<u64, DbError> {
        let stmt = self.statement(sql)?;
        let refs: Vec<&(dyn ToSql + Sync)> = params.iter().map(|p| p as _).collect();
        let client = self.client;
        self.run(client.execute(&stmt, &refs))
    }

    fn query(&mut self, sql: &str, params: &[Param<'_>]) -> Result<Vec<Row>, DbError> {
        let stmt = self.statement(sql)?;
        let refs: Vec<&(dyn ToSql + Sync)> = params.iter().map(|p| p as _).collect();
        let client = self.client;
        let rows = self.run(client.query(&stmt, &refs))?;
        pg_rows(&stmt, &rows)
    }

    fn pipeline(&mut self, stmts: &[Stmt<'_>]) -> Vec<Result<Outcome, DbError>> {
        self.send_all(stmts, false).0
    }

    fn finish(&mut self, stmts: &[Stmt<'_>]) -> Result<Vec<Outcome>, DbError> {
        let (outs, committed) = self.send_all(stmts, true);
        let outs = outs.into_iter().collect::<Result<Vec<_>, _>>()?;
        committed.unwrap_or(Ok(()))?;
        Ok(outs)
    }
}

struct PoolState {
    idle: Vec<PgConn>,
    open: usize,
}

/// A small pool of PostgreSQL connections.
struct PgPool {
    config: tokio_postgres::Config,
    max: usize,
    state: Mutex<PoolState>,
    freed: Condvar,
}

struct Pooled<'p> {
    pool: &'p PgPool,
    conn: Option<PgConn>,
}

impl Pooled<'_> {
    /// The connection's client and the runtime it is driven on.
    fn client_and_runtime(&mut self) -> (&mut tokio_postgres::Client, &tokio::runtime::Runtime) {
        match self.conn.as_mut() {
            Some(PgConn {
                client,
                rt: Some(rt),
                ..
            }) => (client, rt),
            _ => unreachable!("a pooled connection and its runtime are present until dropped"),
        }
    }
}

impl Drop for Pooled<'_> {
    fn drop(&mut self) {
        let mut st = self.pool.lock();
        match self.conn.take() {
            Some(c) if !c.client.is_closed() && !c.in_tx => st.idle.push(c),
            _ => st.open -= 1,
        }
        self.pool.freed.notify_one();
    }
}

impl PgPool {
    fn lock(&self) -> MutexGuard<'_, PoolState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn connect(&self) -> Result<PgConn, DbError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| {
                DbError::Value(format!("starting a PostgreSQL connection's runtime: {e}"))
            })?;
        let config = &self.config;
        // The connection's socket is a task of its runtime, driven whenever a statement
        // is awaited on it.
        let client = drive(&rt, async move {
            let (client, connection) = config.connect(tokio_postgres::NoTls).await?;
            tokio::spawn(async move {
                if let Err(e) = connection.await {
                    tracing::warn!("PostgreSQL connection ended: {e}");
                }
            });
            Ok::<_, tokio_postgres::Error>(client)
        });
        let client = match client {
            Ok(c) => c,
            Err(e) => {
                rt.shutdown_background();
                return Err(e.into());
            }
        };
        Ok(PgConn {
            client,
            statements: HashMap::new(),
            in_tx: false,
            rt: Some(rt),
        })
    }

    fn get(&self) -> Result<Pooled<'_>, DbError> {
        let mut st = self.lock();
        loop {
            if let Some(conn) = st.idle.pop() {
                return Ok(Pooled {
                    pool: self,
                    conn: Some(conn),
                });
            }
            if st.open < self.max {
                st.open += 1;
                drop(st);
                return match self.connect() {
                    Ok(conn) => Ok(Pooled {
                        pool: self,
                        conn: Some(conn),
                    }),
                    Err(e) => {
                        self.lock().open -= 1;
                        self.freed.notify_one();
                        Err(e)
                    }
                };
            }
            st = self.freed.wait(st).unwrap_or_else(|p| p.into_inner());
        }
    }
}

// ---------------------------------------------------------------------------------

enum Backend {
    Sqlite(Mutex<rusqlite::Connection>),
    Postgres(Box<PgPool>),
}

/// A database: SQLite or PostgreSQL.
pub struct Db {
    backend: Backend,
}

impl std::fmt::Debug for Db {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Db").field("kind", &self.kind()).finish()
    }
}

/// How many times a transaction PostgreSQL aborted (deadlock, serialization) runs.
const ATTEMPTS: usize = 5;

impl Db {
    /// A SQLite connection made ready (WAL, foreign keys).
    pub fn sqlite(conn: rusqlite::Connection) -> Result<Db, DbError> {
        conn.busy_timeout(std::time::Duration::from_secs(10))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        // What a write replaces or deletes (an escrowed key sealed after the fact, a
        // purged challenge) is overwritten with zeros, not left in a free page.
        conn.pragma_update(None, "secure_delete", "ON")?;
        conn.set_prepared_statement_cache_capacity(64);
        Ok(Db {
            backend: Backend::Sqlite(Mutex::new(conn)),
        })
    }

    /// A pool of up to `max` connections to the PostgreSQL database at `url`
    /// (`postgres://user@host:port/db` or `host=… dbname=…`); one is opened now, so
    /// that a wrong address fails at start.
    pub fn postgres(url: &str, max: usize) -> Result<Db, DbError> {
        let mut config: tokio_postgres::Config = url.parse()?;
        if config.get_application_name().is_none() {
            config.application_name("ukey-portal");
        }
        config.connect_timeout(std::time::Duration::from_secs(10));
        let pool = PgPool {
            config,
            max: max.max(1),
            state: Mutex::new(PoolState {
                idle: Vec::new(),
                open: 0,
            }),
            freed: Condvar::new(),
        };
        drop(pool.get()?);
        Ok(Db {
            backend: Backend::Postgres(Box::new(pool)),
        })
    }

    /// Which database.
    pub fn kind(&self) -> Kind {
        match self.backend {
            Backend::Sqlite(_) => Kind::Sqlite,
            Backend::Postgres(_) => Kind::Postgres,
        }
    }

    fn sqlite_lock(m: &Mutex<rusqlite::Connection>) -> MutexGuard<'_, rusqlite::Connection> {
        // A panic while holding the lock cannot leave a half-done transaction behind
        // (rusqlite rolls back on drop), so a poisoned mutex is still safe to use.
        m.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `f` in a write transaction: committed when it returns `Ok`, rolled back
    /// when it returns `Err`.
    pub fn write<T, E: From<DbError> + AsDbError>(
        &self,
        mut f: impl FnMut(&mut dyn Tx) -> Result<T, E>,
    ) -> Result<T, E> {
        match &self.backend {
            Backend::Sqlite(m) => {
                let mut conn = Self::sqlite_lock(m);
                let tx = conn
                    .transaction_with_behavior(TransactionBehavior::Immediate)
                    .map_err(DbError::from)?;
                let out = f(&mut SqliteTx(&tx))?;
                tx.commit().map_err(DbError::from)?;
                Ok(out)
            }
            Backend::Postgres(pool) => {
                let mut attempt = 0;
                loop {
                    attempt += 1;
                    let result = Self::pg_write(pool, &mut f);
                    match result {
                        Err(e)
                            if attempt < ATTEMPTS
                                && e.as_db_error().is_some_and(DbError::retryable) => {}
                        other => return other,
                    }
                }
            }
        }
    }

    fn pg_write<T, E: From<DbError>>(
        pool: &PgPool,
        f: &mut impl FnMut(&mut dyn Tx) -> Result<T, E>,
    ) -> Result<T, E> {
        let mut pooled = pool.get()?;
        let Some(PgConn {
            client,
            statements,
            in_tx,
            rt: Some(rt),
        }) = pooled.conn.as_mut()
        else {
            unreachable!("a pooled connection and its runtime are present until dropped")
        };
        // Until COMMIT or ROLLBACK is answered, the connection is not reused (a panic
        // in `f` drops it, and the server rolls back).
        *in_tx = true;
        let mut t = PgTx {
            client: &*client,
            rt: &*rt,
            statements,
            begin: Begin::Pending,
        };
        let out = f(&mut t);
        let began = t.begin == Begin::Sent;
        let end = match (&out, began) {
            (_, false) => Ok(()),
            (Ok(_), true) => drive(rt, client.batch_execute("COMMIT")),
            (Err(_), true) => drive(rt, client.batch_execute("ROLLBACK")),
        };
        match (out, end) {
            (Ok(v), Ok(())) => {
                *in_tx = false;
                Ok(v)
            }
            (Ok(_), Err(e)) => Err(DbError::from(e).into()),
            (Err(e), Ok(())) => {
                *in_tx = false;
                Err(e)
            }
            (Err(e), Err(_)) => Err(e),
        }
    }

    /// Runs reads outside a transaction (each statement sees committed data).
    pub fn read<T, E: From<DbError>>(
        &self,
        f: impl FnOnce(&mut dyn Tx) -> Result<T, E>,
    ) -> Result<T, E> {
        match &self.backend {
            Backend::Sqlite(m) => {
                let conn = Self::sqlite_lock(m);
                f(&mut SqliteTx(&conn))
            }
            Backend::Postgres(pool) => {
                let mut pooled = pool.get()?;
                let Some(PgConn {
                    client,
                    statements,
                    rt: Some(rt),
                    ..
                }) = pooled.conn.as_mut()
                else {
                    unreachable!("a pooled connection and its runtime are present until dropped")
                };
                f(&mut PgTx {
                    client: &*client,
                    rt: &*rt,
                    statements,
                    begin: Begin::None,
                })
            }
        }
    }

    /// Rewrites the storage so that values replaced or deleted are gone from the files:
    /// SQLite folds its write-ahead log into the database and truncates it, then
    /// `VACUUM`s (the free pages were zeroed by `secure_delete`); PostgreSQL rewrites
    /// `table` (`VACUUM FULL`; old row versions may remain in WAL segments until they
    /// are recycled, and on disk blocks the file system freed).
    pub fn compact(&self, table: &str) -> Result<(), DbError> {
        match &self.backend {
            Backend::Sqlite(m) => {
                let conn = Self::sqlite_lock(m);
                conn.execute_batch(
                    "PRAGMA wal_checkpoint(TRUNCATE); VACUUM; PRAGMA wal_checkpoint(TRUNCATE);",
                )?;
                Ok(())
            }
            Backend::Postgres(pool) => {
                let mut pooled = pool.get()?;
                let (client, rt) = pooled.client_and_runtime();
                drive(rt, client.batch_execute(&format!("VACUUM FULL {table}")))?;
                Ok(())
            }
        }
    }

    /// Runs a batch of statements (migrations), in one transaction, with PostgreSQL's
    /// session-wide advisory lock held so that instances starting together migrate once.
    pub fn migrate(&self, migrations: &[Migration]) -> Result<(), MigrationError> {
        match &self.backend {
            Backend::Sqlite(m) => {
                let mut conn = Self::sqlite_lock(m);
                let version: i64 = conn
                    .pragma_query_value(None, "user_version", |r| r.get(0))
                    .map_err(DbError::from)?;
                let version = check_version(version, migrations.len())?;
                for (i, mig) in migrations.iter().enumerate().skip(version) {
                    let tx = conn
                        .transaction_with_behavior(TransactionBehavior::Exclusive)
                        .map_err(DbError::from)?;
                    tx.execute_batch(mig.sql).map_err(DbError::from)?;
                    tx.pragma_update(None, "user_version", i as i64 + 1)
                        .map_err(DbError::from)?;
                    tx.commit().map_err(DbError::from)?;
                }
                Ok(())
            }
            Backend::Postgres(pool) => {
                let mut pooled = pool.get()?;
                let (client, rt) = pooled.client_and_runtime();
                drive(rt, async {
                    let tx = client.transaction().await?;
                    // One lock id for "ukey-portal schema": held until commit.
                    tx.batch_execute(
                        "SELECT pg_advisory_xact_lock(7527351716);
                         CREATE TABLE IF NOT EXISTS schema_version (version BIGINT NOT NULL);",
                    )
                    .await?;
                    let row = tx
                        .query_opt("SELECT version FROM schema_version", &[])
                        .await?;
                    let version: i64 = match row {
                        Some(r) => r.get(0),
                        None => {
                            tx.execute("INSERT INTO schema_version (version) VALUES (0)", &[])
                                .await?;
                            0
                        }
                    };
                    let version = check_version(version, migrations.len())?;
                    for (i, mig) in migrations.iter().enumerate().skip(version) {
                        tx.batch_execute(&pg_ddl(mig.sql)).await?;
                        tx.batch_execute(mig.postgres).await?;
                        tx.execute("UPDATE schema_version SET version = $1", &[&(i as i64 + 1)])
                            .await?;
                    }
                    tx.commit().await?;
                    Ok(())
                })
            }
        }
    }
}

/// Lets [`Db::write`] see the database error inside the caller's error type.
pub trait AsDbError {
    /// The database error, if this is one.
    fn as_db_error(&self) -> Option<&DbError>;
}

impl AsDbError for DbError {
    fn as_db_error(&self) -> Option<&DbError> {
        Some(self)
    }
}

/// One schema migration: SQL for both databases (SQLite's types; `BLOB` and
/// `INTEGER` become `BYTEA` and `BIGINT` on PostgreSQL), then PostgreSQL-only SQL.
#[derive(Debug, Clone, Copy)]
pub struct Migration {
    /// Both databases.
    pub sql: &'static str,
    /// PostgreSQL only, after `sql`.
    pub postgres: &'static str,
}

/// A migration that could not run.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    /// The database is newer than this program.
    #[error(
        "database schema version {found} is newer than this program ({known}); upgrade ukey-portal"
    )]
    Newer {
        /// In the database.
        found: i64,
        /// This program's.
        known: usize,
    },
    /// The database refused.
    #[error(transparent)]
    Db(#[from] DbError),
}

impl From<tokio_postgres::Error> for MigrationError {
    fn from(e: tokio_postgres::Error) -> MigrationError {
        MigrationError::Db(e.into())
    }
}

fn check_version(found: i64, known: usize) -> Result<usize, MigrationError> {
    match usize::try_from(found) {
        Ok(v) if v <= known => Ok(v),
        _ => Err(MigrationError::Newer { found, known }),
    }
}

/// SQLite's column types as PostgreSQL's.
fn pg_ddl(sql: &str) -> String {
    sql.replace(" BLOB", " BYTEA")
        .replace(" INTEGER", " BIGINT")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_and_types_become_postgres() {
        assert_eq!(
            pg_sql("UPDATE t SET a = ?2 WHERE id = ?1 AND b = '?'"),
            "UPDATE t SET a = $2 WHERE id = $1 AND b = '?'"
        );
        assert_eq!(
            pg_ddl("CREATE TABLE t (a INTEGER NOT NULL, b BLOB)"),
            "CREATE TABLE t (a BIGINT NOT NULL, b BYTEA)"
        );
    }

    #[test]
    fn sqlite_round_trips_values_and_rolls_back_on_error() {
        let db = Db::sqlite(rusqlite::Connection::open_in_memory().unwrap()).unwrap();
        db.migrate(&[Migration {
            sql: "CREATE TABLE t (id TEXT PRIMARY KEY, n INTEGER, b BLOB)",
            postgres: "",
        }])
        .unwrap();
        db.write(|tx| {
            tx.execute(
                "INSERT INTO t (id, n, b) VALUES (?1, ?2, ?3)",
                params!["a", 7i64, &b"\x00\x01"[..]],
            )
        })
        .unwrap();
        let failed: Result<(), DbError> = db.write(|tx| {
            tx.execute("INSERT INTO t (id) VALUES ('b')", &[])?;
            Err(DbError::Value("stop".into()))
        });
        assert!(failed.is_err());
        let rows = db
            .read(|tx| tx.query("SELECT id, n, b FROM t ORDER BY id", &[]))
            .unwrap();
        assert_eq!(rows.len(), 1, "the failed transaction left no row");
        assert_eq!(rows[0].get::<String>("id").unwrap(), "a");
        assert_eq!(rows[0].get::<i64>("n").unwrap(), 7);
        assert_eq!(rows[0].get::<Vec<u8>>("b").unwrap(), vec![0, 1]);
        assert!(rows[0].get::<String>("n").is_err());
        let dup = db.write(|tx| tx.execute("INSERT INTO t (id) VALUES ('a')", &[]));
        assert!(dup.unwrap_err().is_unique_violation());
    }
}
