//! What a stranger can make the portal do without proving anything is bounded (issue
//! 16, §4), judged through the `ukey-portal serve` binary over real HTTP: challenge
//! creation and the pay page are rate-limited per order / serial and per client
//! address, an order's outstanding challenges are capped in the database (across
//! instances), a connection that trickles its headers is dropped, and the admin API
//! can live on its own address.

mod common;

use std::io::{BufRead as _, Read as _, Write as _};
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;
use ukey_portal_api::{ErrorCode, KeyAlgorithm, paths};

/// `ukey-portal serve` on a fresh data dir with `args`; its printed URLs.
fn serve(data: &std::path::Path, args: &[&str], lines: usize) -> (Server, Vec<String>) {
    let mut child = portal_bin()
        .arg("--data")
        .arg(data)
        .args(["serve", "--listen", "127.0.0.1:0"])
        .args(args)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut urls = Vec::new();
    for _ in 0..lines {
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        assert!(line.starts_with("http://"), "serve printed {line:?}");
        urls.push(line.trim().to_owned());
    }
    (Server(child), urls)
}

/// A ready order made with the admin CLI (the CA made by `ca show`); its id.
fn ready_order(data: &std::path::Path, serial: &str) -> String {
    let (ok, out) = run(portal_bin()
        .arg("--data")
        .arg(data)
        .args(["order", "create", "--serial", serial, "--state", "ready"])
        .args(["--algorithm", "EC-P256"]));
    assert!(ok, "{out}");
    out.trim().to_owned()
}

async fn challenge_status(base: &str, order: &str) -> reqwest::Response {
    reqwest::Client::new()
        .post(format!("{base}{}", paths::challenge(order)))
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn challenges_and_the_pay_page_are_rate_limited_per_order_and_per_address() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let (a, b) = (ready_order(&data, "0A01"), ready_order(&data, "0A02"));
    let (_server, urls) = serve(&data, &["--rate-per-order", "3"], 1);
    let base = &urls[0];
    for _ in 0..3 {
        assert!(challenge_status(base, &a).await.status().is_success());
    }
    let r = challenge_status(base, &a).await;
    assert_eq!(r.status().as_u16(), 429);
    let wait: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&wait), "{wait}");
    let e = expect_error(r, 429, ErrorCode::RateLimited).await;
    assert!(e.message.contains("too many requests"), "{}", e.message);
    // Another order is not held back by the first one's limit.
    assert!(challenge_status(base, &b).await.status().is_success());
    // The pay page, per serial.
    let pay = |serial: &str| {
        reqwest::Client::new()
            .get(format!("{base}{}?serial={serial}", paths::PAY_PAGE))
            .send()
    };
    for _ in 0..3 {
        assert!(pay("0A01").await.unwrap().status().is_success());
    }
    assert_eq!(pay("0A01").await.unwrap().status().as_u16(), 429);
    assert!(pay("0A02").await.unwrap().status().is_success());

    // Per address: many orders from one client.
    let data2 = tmp.path().join("data2");
    let orders: Vec<String> = (0..4)
        .map(|i| ready_order(&data2, &format!("0B0{i}")))
        .collect();
    let (_server2, urls) = serve(
        &data2,
        &["--rate-per-order", "100", "--rate-per-address", "3"],
        1,
    );
    for o in &orders[..3] {
        assert!(challenge_status(&urls[0], o).await.status().is_success());
    }
    expect_error(
        challenge_status(&urls[0], &orders[3]).await,
        429,
        ErrorCode::RateLimited,
    )
    .await;
}

/// However many instances and whatever their limits, an order has at most ten unused,
/// unexpired challenges; using one makes room.
#[tokio::test]
async fn an_orders_outstanding_challenges_are_capped_in_the_database() {
    let h = Harness::start().await;
    let holder = h.holder(KeyAlgorithm::EcP256);
    let order = h.ready_order(&holder, KeyAlgorithm::EcP256);
    for _ in 0..ukey_portal::store::OUTSTANDING_CHALLENGES {
        h.challenge(&order.order_id).await;
    }
    let r = challenge_status(&h.base, &order.order_id).await;
    let e = expect_error(r, 429, ErrorCode::RateLimited).await;
    assert!(e.message.contains("unused challenges"), "{}", e.message);
}

/// Expired challenges are purged ten minutes after their expiry, by an instance at most
/// once a minute and outside the requests' transactions: a challenge expired long
/// enough is gone after the next challenge made a minute later, a fresh one stays.
#[test]
fn expired_challenges_are_purged_at_most_once_a_minute() {
    use ukey_portal::store::{Challenge, NewOrder, OrderState, Store};
    use ukey_portal_api::{KeyPolicy, OrderTerms};
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(&tmp.path().join("p.sqlite3")).unwrap();
    let t0 = 2_000_000_000;
    let order = store
        .create_order(
            &NewOrder {
                issuer_key: ukey_portal::names::key_of_dn_string("CN=Purge CA").unwrap(),
                issuer_display: "CN=Purge CA".into(),
                serial_hex: "0A".into(),
                terms: OrderTerms {
                    years: 1,
                    key_policy: KeyPolicy::New,
                    target_algorithm: KeyAlgorithm::EcP256,
                    with_encryption_cert: false,
                },
                old_encryption_serial_hex: None,
                state: OrderState::Ready,
                renewal_code: None,
            },
            "ord_purge",
            t0,
        )
        .unwrap();
    let add = |id: &str, expires_at: i64, now: i64| {
        store
            .insert_challenge(
                &Challenge {
                    id: id.into(),
                    order_id: order.id.clone(),
                    nonce: vec![7; 32],
                    expires_at,
                    used_at: None,
                },
                now,
                &|_| Ok(()),
            )
            .unwrap();
    };
    let there = |id: &str| store.challenge(id).unwrap().is_some();
    add("ch_a", t0 + 300, t0);
    // A purge: ch_a expired 601 s ago.
    let l = t0 + 901;
    add("ch_b", l + 10, l);
    assert!(!there("ch_a"), "purged: expired over ten minutes ago");
    add("ch_c", l + 20, l);
    // ch_b expired 601 s ago, ch_c 591 s ago: ch_b goes, ch_c stays (an expired
    // challenge is kept ten minutes, to say "expired" rather than "unknown").
    let m = l + 10 + 601;
    add("ch_d", m + 300, m);
    assert!(!there("ch_b") && there("ch_c"));
    // ch_c expired 621 s ago, but the last purge was 30 s ago: not yet.
    add("ch_e", m + 300, m + 30);
    assert!(there("ch_c"));
    add("ch_f", m + 300, m + 61);
    assert!(!there("ch_c"));
    assert!(there("ch_d") && there("ch_e") && there("ch_f"));
}

/// A client that sends half its headers and goes silent is cut off after
/// `--header-timeout-secs`; one that sends a request normally is answered.
#[test]
fn a_connection_trickling_its_headers_is_dropped() {
    let tmp = tempfile::tempdir().unwrap();
    let (_server, urls) = serve(&tmp.path().join("data"), &["--header-timeout-secs", "1"], 1);
    let addr = urls[0].trim_start_matches("http://");
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(b"GET /api/v1/ca HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    let started = Instant::now();
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(10),
        "the server closed the connection after the header timeout, not the client's: {took:?}"
    );
    assert!(
        took >= Duration::from_millis(900),
        "not before the timeout: {took:?}"
    );
    // A whole request on a new connection is answered.
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.write_all(b"GET /api/v1/ca HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut answer = Vec::new();
    s.read_to_end(&mut answer).unwrap();
    assert!(
        answer.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
}

/// With `--admin-listen`, the admin API answers there only; the public address has no
/// admin route.
#[tokio::test]
async fn the_admin_api_can_listen_on_its_own_address() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let (_server, urls) = serve(&data, &["--admin-listen", "127.0.0.1:0"], 2);
    let (public, admin) = (&urls[0], &urls[1]);
    assert_ne!(public, admin);
    let token = std::fs::read_to_string(data.join("admin-token")).unwrap();
    let list = |base: &str| {
        reqwest::Client::new()
            .get(format!("{base}{}", paths::ADMIN_ORDERS))
            .bearer_auth(token.trim())
            .send()
    };
    assert_eq!(list(admin).await.unwrap().status().as_u16(), 200);
    expect_error(list(public).await.unwrap(), 404, ErrorCode::NotFound).await;
    // The protocol is on the public address only.
    let ca = |base: &str| reqwest::get(format!("{base}{}", paths::CA_CERT));
    assert_eq!(ca(public).await.unwrap().status().as_u16(), 200);
    assert_eq!(ca(admin).await.unwrap().status().as_u16(), 404);
}
