//! The store on a real PostgreSQL server (Debian's package, started in a temp dir):
//! several portal instances on one database. The portal's whole REST and CMP suites
//! also run on PostgreSQL (`UKEY_TEST_STORE=postgres`, a second run in `cargo xtask
//! test`); these tests are what only several instances can show.

mod common;

use std::io::BufRead as _;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;

use common::pg::PgServer;
use common::*;
use ukey_portal::store::{Database, Store};
use ukey_portal_api::{ErrorCode, IssueResponse, KeyAlgorithm, KeyPolicy, paths};

/// A `ukey-portal serve` process; killed on drop.
struct Instance {
    child: Child,
    url: String,
}

impl Drop for Instance {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Another portal process on the same data directory (the CA) and database.
fn second_instance(data: &std::path::Path, database: &str) -> Instance {
    let mut child = Command::new(env!("CARGO_BIN_EXE_ukey-portal"))
        .arg("--data")
        .arg(data)
        .args(["--database", database, "serve", "--listen", "127.0.0.1:0"])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(line.starts_with("http://"), "serve printed {line:?}");
    Instance {
        child,
        url: line.trim().to_owned(),
    }
}

fn postgres_config(url: &str) -> impl FnOnce(&mut ukey_portal::PortalConfig) + use<> {
    let url = url.to_owned();
    move |c| {
        c.database = Some(Database::Postgres { url, pool: 8 });
    }
}

/// Two portal processes (this test's and a `ukey-portal serve`) on one PostgreSQL
/// database, and many clients asking both, at once, to issue for the same orders: some
/// with one new key (the same certificate comes back), some each with a key of their
/// own (each issuance supersedes the one before). Every order ends with exactly one
/// certificate that is not revoked, the one the order names; every other certificate
/// handed out is on the CRL either instance serves (read by `openssl crl`).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_instances_racing_to_issue_leave_one_valid_certificate_per_order() {
    let pg = PgServer::start(&[]);
    let db = pg.create_db("race");
    let h = Arc::new(Harness::start_with(postgres_config(&db)).await);
    let other = second_instance(&h.data_dir(), &db);
    let bases = [h.server.url.clone(), other.url.clone()];

    const ORDERS: usize = 12;
    const CLIENTS: usize = 8;
    let mut orders = Vec::new();
    for _ in 0..ORDERS {
        let holder = Arc::new(h.holder(KeyAlgorithm::EcP256));
        let order = h.ready_order(&holder, KeyAlgorithm::EcP256);
        orders.push((order.order_id, holder));
    }

    let mut tasks = Vec::new();
    for (order_id, holder) in &orders {
        let shared_key = Arc::new(new_key(KeyAlgorithm::EcP256));
        for c in 0..CLIENTS {
            let (h, holder, order_id) = (h.clone(), holder.clone(), order_id.clone());
            // Clients 0 and 1 ask one instance, 2 and 3 the other, …; even clients share
            // one new key, odd ones bring their own.
            let base = bases[(c / 2) % 2].clone();
            let key = if c % 2 == 0 {
                shared_key.clone()
            } else {
                Arc::new(new_key(KeyAlgorithm::EcP256))
            };
            tasks.push(tokio::spawn(async move {
                let req = h
                    .issue_request_at(&base, &order_id, &holder, &key, None)
                    .await;
                let r = h
                    .client
                    .post(format!("{base}{}", paths::issue(&order_id)))
                    .json(&req)
                    .send()
                    .await
                    .unwrap();
                let status = r.status();
                let text = r.text().await.unwrap();
                if status.is_success() {
                    let resp: IssueResponse = serde_json::from_str(&text).unwrap();
                    return (order_id, Some(resp.certificate_serial_hex));
                }
                // A repeat of a key the order was issued for, overtaken by another key
                // between its check and its commit, is refused (and changes nothing).
                assert_eq!(status.as_u16(), 409, "{text}");
                let e: ukey_portal_api::ApiError = serde_json::from_str(&text).unwrap();
                assert_eq!(e.code, ErrorCode::OrderNotReady, "{text}");
                assert!(e.message.contains("changed meanwhile"), "{text}");
                (order_id, None)
            }));
        }
    }
    let mut handed_out: std::collections::HashMap<String, Vec<String>> = Default::default();
    let mut overtaken = 0;
    for t in tasks {
        let (order_id, serial) = t.await.unwrap();
        match serial {
            Some(serial) => handed_out.entry(order_id).or_default().push(serial),
            None => overtaken += 1,
        }
    }
    eprintln!("{overtaken} repeats overtaken by another key");

    // The CRL from the other instance, read by OpenSSL.
    let crl = reqwest::get(format!("{}{}", other.url, paths::CRL))
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let (ok, crl_text) = openssl_crl(&h.data_dir().join("ca-cert.pem"), &crl, tmp.path());
    assert!(ok, "{crl_text}");
    let on_crl = |serial: &str| {
        crl_text
            .to_ascii_uppercase()
            .contains(&format!("SERIAL NUMBER: {}", serial.to_ascii_uppercase()))
    };

    let store = h.portal().store();
    for (order_id, _) in &orders {
        let order = store.order(order_id).unwrap().unwrap();
        let current = order.current_signing_serial.clone().unwrap();
        let serials = &handed_out[order_id];
        let mut valid: Vec<&String> = serials.iter().filter(|s| !on_crl(s)).collect();
        valid.sort();
        valid.dedup();
        assert_eq!(
            valid,
            vec![&current],
            "order {order_id}: one valid certificate, the current one (handed out {serials:?})"
        );
        for s in serials {
            assert!(
                store.certificate(s).unwrap().is_some(),
                "every certificate handed out is recorded"
            );
        }
    }
    // Only certificates of these orders were revoked, and each once.
    let revoked = crl_text.matches("Serial Number:").count();
    let distinct: std::collections::HashSet<&String> = handed_out.values().flatten().collect();
    assert_eq!(revoked, distinct.len() - ORDERS);
}

/// Two instances creating an order for the same certificate at once: the database's
/// unique index lets one through; the other is told which order is open.
#[test]
fn two_instances_creating_one_order_make_one() {
    let pg = PgServer::start(&[]);
    let db = pg.create_db("orders");
    let database = Database::Postgres {
        url: db.clone(),
        pool: 2,
    };
    let a = Store::connect(&database).unwrap();
    let b = Store::connect(&database).unwrap();
    let new = ukey_portal::store::NewOrder {
        issuer_key: ukey_portal::names::NameKey::from_stored("cn=race ca".into()),
        issuer_display: "CN=Race CA".into(),
        serial_hex: "0A0B".into(),
        terms: ukey_portal_api::OrderTerms {
            years: 1,
            key_policy: KeyPolicy::New,
            target_algorithm: KeyAlgorithm::EcP256,
            with_encryption_cert: false,
        },
        old_encryption_serial_hex: None,
        state: ukey_portal::store::OrderState::Ready,
        renewal_code: None,
    };
    for round in 0..20 {
        let barrier = std::sync::Barrier::new(2);
        let (ra, rb) = std::thread::scope(|s| {
            let ta = s.spawn(|| {
                barrier.wait();
                a.create_order(&new, &format!("a{round}"), 1)
            });
            let tb = s.spawn(|| {
                barrier.wait();
                b.create_order(&new, &format!("b{round}"), 1)
            });
            (ta.join().unwrap(), tb.join().unwrap())
        });
        let (won, lost) = match (ra, rb) {
            (Ok(o), Err(e)) | (Err(e), Ok(o)) => (o, e),
            other => panic!("round {round}: exactly one order is created: {other:?}"),
        };
        match lost {
            ukey_portal::Error::Api(e) => {
                assert_eq!(e.code, ErrorCode::InvalidTransition);
                assert!(
                    e.message.contains(&won.id),
                    "the refusal names the open order: {}",
                    e.message
                );
            }
            other => panic!("round {round}: {other:?}"),
        }
        a.transition(
            &won.id,
            &[ukey_portal::store::OrderState::Ready],
            ukey_portal::store::OrderState::Rejected,
            Some("next round"),
            None,
            2,
        )
        .unwrap();
    }
    assert_eq!(a.list_orders().unwrap().len(), 20);
}

/// Instances starting together on an empty database migrate it once; the schema is the
/// SQLite one's, version for version; a database newer than the program is refused.
#[test]
fn instances_starting_together_migrate_once() {
    let pg = PgServer::start(&[]);
    let db = pg.create_db("migrate");
    let database = Database::Postgres {
        url: db.clone(),
        pool: 1,
    };
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|_| s.spawn(|| Store::connect(&database)))
            .collect();
        for h in handles {
            h.join().unwrap().unwrap();
        }
    });
    let version: i64 = pg
        .psql("migrate", "SELECT version FROM schema_version")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let rows = pg
        .psql("migrate", "SELECT count(*) FROM schema_version")
        .unwrap();
    assert_eq!(rows.trim(), "1", "one version row");
    let tmp = tempfile::tempdir().unwrap();
    let sqlite = tmp.path().join("s.sqlite3");
    Store::open(&sqlite).unwrap();
    let sqlite_version: i64 = rusqlite_version(&sqlite);
    assert_eq!(version, sqlite_version);

    pg.psql("migrate", "UPDATE schema_version SET version = version + 1")
        .unwrap();
    let err = Store::connect(&database).unwrap_err().to_string();
    assert!(err.contains("newer than this program"), "{err}");
}

fn rusqlite_version(path: &std::path::Path) -> i64 {
    let out = Command::new("python3")
        .args([
            "-c",
            "import sqlite3,sys; print(sqlite3.connect(sys.argv[1]).execute('PRAGMA user_version').fetchone()[0])",
        ])
        .arg(path)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

/// A wrong address stops the portal at start with a message in both languages.
#[test]
fn an_unreachable_database_is_a_clear_error() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let tmp = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_ukey-portal"))
        .arg("--data")
        .arg(tmp.path().join("data"))
        .args([
            "--database",
            &format!("postgres://ukey:s3cret@127.0.0.1:{port}/none"),
            "order",
            "list",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(
        text.contains("无法连接 PostgreSQL 数据库") && text.contains("cannot connect"),
        "{text}"
    );
    assert!(
        !text.contains("s3cret"),
        "the password is not shown: {text}"
    );
}

/// The store's pipelines (statements sent at once, one round trip on PostgreSQL) and
/// `finish` (the last statements sent with COMMIT) keep a transaction's meaning on both
/// databases: each statement has its own result in order, an error stops the later
/// ones and rolls back everything the transaction wrote (the statements before it in
/// the pipeline, and earlier ones), and a connection whose transaction failed in
/// `finish` serves the next transaction (a pool of one, so it is the same connection).
#[test]
fn pipelines_and_finish_keep_transactions_whole_on_both_databases() {
    use ukey_portal::db::{Db, Migration, Outcome, Stmt, params};
    let pg = PgServer::start(&[]);
    let tmp = tempfile::tempdir().unwrap();
    let databases = [
        (
            "sqlite",
            Db::sqlite(rusqlite::Connection::open(tmp.path().join("t.sqlite")).unwrap()).unwrap(),
        ),
        (
            "postgres",
            Db::postgres(&pg.create_db("pipelines"), 1).unwrap(),
        ),
    ];
    for (name, db) in &databases {
        db.migrate(&[Migration {
            sql: "CREATE TABLE t (id TEXT PRIMARY KEY, n INTEGER NOT NULL)",
            postgres: "",
        }])
        .unwrap();
        let ids = |db: &Db| -> Vec<String> {
            db.read(|tx| tx.query("SELECT id FROM t ORDER BY id", &[]))
                .unwrap()
                .iter()
                .map(|r| r.get::<String>("id").unwrap())
                .collect()
        };
        const INSERT: &str = "INSERT INTO t (id, n) VALUES (?1, ?2)";

        // In order, each with its result; the duplicate fails, the statement after it
        // does not run, and the transaction (ended with that error) wrote nothing.
        let failed = db.write(|tx| {
            tx.execute(INSERT, params!["before", 0i64])?;
            let outs = tx.pipeline(&[
                Stmt::Execute(INSERT, params!["a", 1i64]),
                Stmt::Query("SELECT count(*) FROM t", &[]),
                Stmt::Execute(INSERT, params!["a", 2i64]),
                Stmt::Execute(INSERT, params!["b", 3i64]),
            ]);
            assert_eq!(outs.len(), 4, "{name}");
            assert_eq!(outs[0].as_ref().unwrap().count(), 1, "{name}");
            let Ok(Outcome::Rows(rows)) = &outs[1] else {
                panic!("{name}: {:?}", outs[1])
            };
            assert_eq!(
                rows[0].at::<i64>(0).unwrap(),
                2,
                "{name}: sees its own writes"
            );
            assert!(
                outs[2].as_ref().unwrap_err().is_unique_violation(),
                "{name}: {:?}",
                outs[2]
            );
            assert!(outs[3].is_err(), "{name}: {:?}", outs[3]);
            outs.into_iter().try_for_each(|o| o.map(|_| ()))
        });
        assert!(failed.unwrap_err().is_unique_violation(), "{name}");
        assert!(ids(db).is_empty(), "{name}: {:?}", ids(db));

        // `finish` commits what came before it and its own statements.
        let counts = db
            .write(|tx| {
                tx.execute(INSERT, params!["a", 1i64])?;
                tx.finish(&[
                    Stmt::Execute(INSERT, params!["b", 2i64]),
                    Stmt::Execute("UPDATE t SET n = n + 10 WHERE id <> ?1", params!["zz"]),
                ])
            })
            .unwrap();
        assert_eq!(
            counts.iter().map(Outcome::count).collect::<Vec<_>>(),
            [1, 2],
            "{name}"
        );
        assert_eq!(ids(db), ["a", "b"], "{name}");

        // A failure in `finish` undoes the whole transaction, and the connection
        // goes on serving.
        let failed = db.write(|tx| {
            tx.execute(INSERT, params!["c", 1i64])?;
            tx.finish(&[
                Stmt::Execute(INSERT, params!["d", 2i64]),
                Stmt::Execute(INSERT, params!["a", 3i64]),
            ])
        });
        assert!(failed.unwrap_err().is_unique_violation(), "{name}");
        assert_eq!(ids(db), ["a", "b"], "{name}: c and d rolled back");
        db.write(|tx| tx.finish(&[Stmt::Execute(INSERT, params!["e", 1i64])]))
            .unwrap();
        assert_eq!(ids(db), ["a", "b", "e"], "{name}");
        let n: i64 = db
            .read(|tx| tx.query("SELECT n FROM t WHERE id = 'a'", &[]))
            .unwrap()[0]
            .at(0)
            .unwrap();
        assert_eq!(n, 11, "{name}");
    }
}
