//! Issuance throughput: a portal with an EC P-256 CA on loopback, N concurrent clients,
//! each renewal = challenge + issue (CSR signature, old-certificate chain check,
//! challenge signature, certificate signing, SQLite transaction). Prints issuances per
//! second and p50/p99 latency; asserts nothing.
//!
//! `cargo bench -p ukey-portal --bench issue`
//! Knobs: UKEY_BENCH_CLIENTS (default 16), UKEY_BENCH_ISSUES (default 3000),
//! UKEY_BENCH_ALG (EC-P256, RSA-2048 or SM2 for the renewed keys, default EC-P256),
//! UKEY_BENCH_STORES (comma-separated sittings, run one after the other in this process:
//! `sqlite` (default), `postgres` (one instance), `postgres2` (two portal instances, each
//! with its own HTTP server and connection pool, on one database, the clients
//! alternating between them); PostgreSQL is a real server from Debian's package started
//! in a temp dir, with its default durability (fsync, synchronous commit)).
//! UKEY_BENCH_INSTALLED=1: each renewal also confirms the installation (`installed`,
//! signed by the new key; the old certificate is revoked and the CRL number moves), as
//! the client does; not with SM2.
//! UKEY_BENCH_PG_COMMIT_DELAY_US (default 0): PostgreSQL's `commit_delay`, every commit
//! waiting this long before its WAL flush, as a slow disk or a synchronous standby makes
//! it (a row locked by a transaction stays locked meanwhile).
//! UKEY_BENCH_PG_RTT_US (default 0): the portal reaches PostgreSQL through a loopback
//! relay that holds every chunk for half this many microseconds each way, as a database
//! on another host would (the HTTP clients stay direct).
//!
//! With SM2 the portal runs an SM2 CA (SM2-with-SM3 certificates, GM ID), the old
//! certificates come from an EC CA it accepts (an RSA → SM2 style upgrade), and the
//! SM2 CSR is OpenSSL's (`openssl req -new -sm3 -sigopt distid:…`): the portal checks its
//! SM2 signature on every issuance.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

#[path = "../tests/common/pg.rs"]
mod pg;

use rcgen::{
    CertificateParams, DistinguishedName, DnType, Issuer, KeyPair, SerialNumber, SigningKey as _,
};
use ukey_portal::{Portal, PortalConfig};
use ukey_portal_api::{
    ChallengeResponse, CreateOrderRequest, InitialState, InstalledRequest, IssueRequest,
    IssueResponse, KeyAlgorithm, KeyPolicy, SignatureAlgorithm, challenge_signed_data,
    installed_signed_data, paths,
};

struct Job {
    order_id: String,
    old_key: KeyPair,
    old_cert: Vec<u8>,
    csr: Vec<u8>,
    /// The CSR's key, to confirm the installation with (UKEY_BENCH_INSTALLED).
    new_key: Option<Arc<KeyPair>>,
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn key(alg: KeyAlgorithm) -> KeyPair {
    use aws_lc_rs::encoding::AsDer;
    match alg {
        KeyAlgorithm::EcP256 => {
            KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("EC key")
        }
        KeyAlgorithm::Rsa2048 => {
            let kp = aws_lc_rs::rsa::KeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048)
                .expect("RSA key");
            KeyPair::try_from(kp.as_der().expect("PKCS#8").as_ref()).expect("rcgen key")
        }
        KeyAlgorithm::Sm2 => unreachable!("SM2 CSRs come from OpenSSL (sm2_csr)"),
    }
}

/// An SM2 CSR for `O=某某建设工程有限公司, CN=张三` made by OpenSSL with the GM ID.
fn sm2_csr(dir: &std::path::Path) -> Vec<u8> {
    let openssl = |args: &[&str]| {
        let out = std::process::Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl");
        assert!(out.status.success(), "openssl {args:?}: {out:?}");
    };
    openssl(&["genpkey", "-algorithm", "SM2", "-out", "sm2.key"]);
    openssl(&[
        "req",
        "-new",
        "-key",
        "sm2.key",
        "-sm3",
        "-sigopt",
        "distid:1234567812345678",
        "-utf8",
        "-subj",
        "/O=某某建设工程有限公司/CN=张三",
        "-outform",
        "DER",
        "-out",
        "sm2.csr",
    ]);
    std::fs::read(dir.join("sm2.csr")).expect("CSR")
}

fn main() {
    let clients = env_usize("UKEY_BENCH_CLIENTS", 16).max(1);
    let issues = env_usize("UKEY_BENCH_ISSUES", 3000).max(1);
    let alg = std::env::var("UKEY_BENCH_ALG")
        .ok()
        .and_then(|a| KeyAlgorithm::parse(&a))
        .unwrap_or(KeyAlgorithm::EcP256);
    let stores = std::env::var("UKEY_BENCH_STORES").unwrap_or_else(|_| "sqlite".into());
    let rtt = Duration::from_micros(env_usize("UKEY_BENCH_PG_RTT_US", 0) as u64);
    let mut server: Option<pg::PgServer> = None;
    let mut relay_port = None;
    for (i, store) in stores.split(',').map(str::trim).enumerate() {
        let (database, instances) = match store {
            "sqlite" => (None, 1),
            "postgres" | "postgres2" => {
                let pg = server.get_or_insert_with(|| {
                    let delay = env_usize("UKEY_BENCH_PG_COMMIT_DELAY_US", 0).to_string();
                    let settings = [("commit_delay", delay.as_str()), ("commit_siblings", "0")];
                    pg::PgServer::start(if delay == "0" { &[] } else { &settings })
                });
                let mut url = pg.create_db(&format!("bench{i}"));
                if !rtt.is_zero() {
                    let port = *relay_port.get_or_insert_with(|| relay(pg.port, rtt / 2));
                    url = url.replacen(&format!(":{}/", pg.port), &format!(":{port}/"), 1);
                    println!(
                        "(PostgreSQL behind a relay: {} µs round trip)",
                        rtt.as_micros()
                    );
                }
                let instances = if store == "postgres2" { 2 } else { 1 };
                (Some(url), instances)
            }
            other => {
                panic!("UKEY_BENCH_STORES: unknown store {other:?} (sqlite, postgres, postgres2)")
            }
        };
        sitting(store, database, instances, clients, issues, alg);
    }
}

/// A loopback TCP relay to `127.0.0.1:target` that delivers every chunk `delay` after it
/// arrived, in order, in both directions (a one-way network latency; chunks in flight
/// overlap, as on a wire). Threads, not tokio timers: those tick in milliseconds.
/// Returns the relay's port; it serves until the process ends.
fn relay(target: u16, delay: Duration) -> u16 {
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    fn pump(mut from: TcpStream, mut to: TcpStream, delay: Duration) {
        let (send, recv) = std::sync::mpsc::channel::<(Instant, Vec<u8>)>();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 64 * 1024];
            while let Ok(n @ 1..) = from.read(&mut buf) {
                if send
                    .send((Instant::now() + delay, buf[..n].to_vec()))
                    .is_err()
                {
                    break;
                }
            }
        });
        std::thread::spawn(move || {
            for (due, chunk) in recv {
                std::thread::sleep(due.saturating_duration_since(Instant::now()));
                if to.write_all(&chunk).is_err() {
                    break;
                }
            }
            let _ = to.shutdown(std::net::Shutdown::Write);
        });
    }
    let listener = TcpListener::bind("127.0.0.1:0").expect("relay port");
    let port = listener.local_addr().expect("relay address").port();
    std::thread::spawn(move || {
        for client in listener.incoming().flatten() {
            let server = TcpStream::connect(("127.0.0.1", target)).expect("PostgreSQL");
            for s in [&client, &server] {
                s.set_nodelay(true).expect("nodelay");
            }
            let (c2, s2) = (
                client.try_clone().expect("clone"),
                server.try_clone().expect("clone"),
            );
            pump(client, server, delay);
            pump(s2, c2, delay);
        }
    });
    port
}

/// One sitting: a fresh data dir and store, `issues` paid orders, `clients` clients.
fn sitting(
    store: &str,
    database: Option<String>,
    instances: usize,
    clients: usize,
    issues: usize,
    alg: KeyAlgorithm,
) {
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("data");
    let mut config = PortalConfig::new(&data);
    config.database =
        database.map(|url| ukey_portal::store::Database::Postgres { url, pool: clients });
    let sm2 = alg == KeyAlgorithm::Sm2;
    // Holders with certificates from the portal's (EC P-256) CA, or with SM2 from an EC
    // CA the SM2 portal accepts, each with a paid order and a CSR ready: not timed.
    let old_ca = sm2.then(|| {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("CA key");
        let mut p = CertificateParams::default();
        p.distinguished_name
            .push(DnType::CommonName, "Old RSA-era CA");
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let cert = p.self_signed(&key).expect("old CA");
        ukey_portal::ca::Ca::add_accepted_issuers(&data, &cert.pem()).expect("accept");
        (cert.pem(), key.serialize_pem())
    });
    if sm2 {
        config.ca_alg = ukey_portal::ca::CaAlg::Sm2;
    }
    let portal = Arc::new(Portal::open(&config).expect("portal"));
    // More instances on the same data dir (CA) and database.
    let portals: Vec<Arc<Portal>> = std::iter::once(Arc::clone(&portal))
        .chain((1..instances).map(|_| Arc::new(Portal::open(&config).expect("portal"))))
        .collect();
    // The CA of the old certificates: that EC CA, or the portal's own.
    let (ca_cert_pem, ca_key_pem) = old_ca.unwrap_or_else(|| {
        (
            std::fs::read_to_string(data.join("ca-cert.pem")).expect("ca"),
            std::fs::read_to_string(data.join("ca-key.pem")).expect("ca key"),
        )
    });
    let ca = Issuer::from_ca_cert_pem(
        &ca_cert_pem,
        ukey_portal::ca::load_key(&ca_key_pem).expect("ca key"),
    )
    .expect("issuer");
    let issuer_der = sm2.then(|| {
        use x509_parser::prelude::FromDer as _;
        let der = ukey_portal::ca::parse_cert_bundle(&ca_cert_pem).expect("PEM")[0].clone();
        let (_, c) = x509_parser::prelude::X509Certificate::from_der(&der).expect("CA");
        c.subject().as_raw().to_vec()
    });
    let prep = Instant::now();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "某某建设工程有限公司");
    dn.push(DnType::CommonName, "张三");
    let old_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
    let installed = std::env::var("UKEY_BENCH_INSTALLED").is_ok_and(|v| v == "1");
    assert!(
        !(installed && sm2),
        "UKEY_BENCH_INSTALLED: not with SM2 (its key is OpenSSL's)"
    );
    let (new_csr, new_key) = if sm2 {
        (sm2_csr(dir.path()), None)
    } else {
        let mut csr_params = CertificateParams::default();
        csr_params.distinguished_name = dn.clone();
        let new_key = key(alg);
        let csr = csr_params
            .serialize_request(&new_key)
            .expect("csr")
            .der()
            .to_vec();
        (csr, installed.then(|| Arc::new(new_key)))
    };
    let mut jobs = Vec::with_capacity(issues);
    for i in 0..issues {
        let mut params = CertificateParams::default();
        params.distinguished_name = dn.clone();
        let serial = (0x1000_0000u64 + i as u64).to_be_bytes();
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        let cert = params
            .signed_by(&old_key, &ca)
            .expect("old cert")
            .der()
            .to_vec();
        let order = portal
            .create_order(&CreateOrderRequest {
                serial_hex: hex::encode(serial),
                issuer_der: issuer_der.clone(),
                issuer_dn: None,
                years: 1,
                state: InitialState::Ready,
                key_policy: KeyPolicy::New,
                with_encryption_cert: false,
                target_algorithm: alg,
                old_encryption_serial_hex: None,
            })
            .expect("order");
        let csr = new_csr.clone();
        jobs.push(Job {
            order_id: order.order_id,
            old_key: KeyPair::try_from(old_key.serialize_der()).expect("key copy"),
            old_cert: cert,
            csr,
            new_key: new_key.clone(),
        });
    }
    eprintln!("prepared {issues} orders in {:.1?}", prep.elapsed());

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async move {
        let mut servers = Vec::new();
        for p in &portals {
            servers.push(
                ukey_portal::start(Arc::clone(p), "127.0.0.1:0".parse().expect("addr"), None, None)
                    .await
                    .expect("server"),
            );
        }
        let bases: Vec<String> = servers.iter().map(|s| s.url.clone()).collect();
        let http = reqwest::Client::builder()
            .pool_max_idle_per_host(clients)
            .build()
            .expect("client");
        let jobs = Arc::new(jobs);
        let next = Arc::new(AtomicUsize::new(0));
        let started = Instant::now();
        let mut tasks = Vec::new();
        for c in 0..clients {
            let (http, base, jobs, next) = (
                http.clone(),
                bases[c % bases.len()].clone(),
                Arc::clone(&jobs),
                Arc::clone(&next),
            );
            tasks.push(tokio::spawn(async move {
                let mut latencies = Vec::new();
                let mut failures = 0usize;
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(job) = jobs.get(i) else { break };
                    let t = Instant::now();
                    match renew(&http, &base, job).await {
                        Ok(()) => latencies.push(t.elapsed()),
                        Err(e) => {
                            failures += 1;
                            if failures < 3 {
                                eprintln!("renewal failed: {e}");
                            }
                        }
                    }
                }
                (latencies, failures)
            }));
        }
        let mut latencies: Vec<Duration> = Vec::new();
        let mut failures = 0;
        for t in tasks {
            let (l, f) = t.await.expect("client task");
            latencies.extend(l);
            failures += f;
        }
        let elapsed = started.elapsed();
        latencies.sort();
        let pct = |p: f64| {
            latencies
                .get(((latencies.len() as f64 * p).ceil() as usize).saturating_sub(1))
                .copied()
                .unwrap_or_default()
        };
        println!(
            "issue benchmark [{store}]: {} renewals{} ({} failed), {clients} clients, {} keys, {} CA, {}, {} cores",
            latencies.len(),
            if installed { " with installed" } else { "" },
            failures,
            alg,
            if sm2 { "SM2" } else { "EC P-256" },
            match (store, instances) {
                ("sqlite", _) => "SQLite".to_owned(),
                (_, 1) => "PostgreSQL (1 instance)".to_owned(),
                (_, n) => format!("PostgreSQL ({n} instances)"),
            },
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(0)
        );
        println!(
            "  {:.0} issuances/s over {:.2?}; latency p50 {:.2?}, p99 {:.2?}, max {:.2?}",
            latencies.len() as f64 / elapsed.as_secs_f64(),
            elapsed,
            pct(0.50),
            pct(0.99),
            latencies.last().copied().unwrap_or_default()
        );
        for server in servers {
            let _ = server.stop().await;
        }
    });
}

async fn renew(http: &reqwest::Client, base: &str, job: &Job) -> Result<(), String> {
    let r = http
        .post(format!("{base}{}", paths::challenge(&job.order_id)))
        .send()
        .await
        .map_err(|e| e.to_string())?;
    if !r.status().is_success() {
        return Err(format!("challenge: {}", r.text().await.unwrap_or_default()));
    }
    let ch: ChallengeResponse = r.json().await.map_err(|e| e.to_string())?;
    let signature = job
        .old_key
        .sign(&challenge_signed_data(
            &job.order_id,
            &ch.nonce,
            &job.csr,
            None,
        ))
        .map_err(|e| e.to_string())?;
    let req = IssueRequest {
        challenge_id: ch.challenge_id,
        challenge_signature: signature,
        signature_algorithm: SignatureAlgorithm::EcdsaP256Sha256,
        old_certificate_der: job.old_cert.clone(),
        csr_der: job.csr.clone(),
        // No encryption certificate in these orders: no transport key.
        transport_key_spki: None,
        renewal_code: None,
    };
    let r = http
        .post(format!("{base}{}", paths::issue(&job.order_id)))
        .json(&req)
        .send()
        .await
        .map_err(|e| e.to_string())?;
    if !r.status().is_success() {
        return Err(format!("issue: {}", r.text().await.unwrap_or_default()));
    }
    let Some(new_key) = &job.new_key else {
        let _ = r.bytes().await.map_err(|e| e.to_string())?;
        return Ok(());
    };
    let issued: IssueResponse = r.json().await.map_err(|e| e.to_string())?;
    let serial = issued.certificate_serial_hex;
    let req = InstalledRequest {
        signature: new_key
            .sign(&installed_signed_data(&job.order_id, &serial))
            .map_err(|e| e.to_string())?,
        signature_algorithm: if new_key.algorithm() == &rcgen::PKCS_ECDSA_P256_SHA256 {
            SignatureAlgorithm::EcdsaP256Sha256
        } else {
            SignatureAlgorithm::RsaPkcs1Sha256
        },
        certificate_serial_hex: serial,
    };
    let r = http
        .post(format!("{base}{}", paths::installed(&job.order_id)))
        .json(&req)
        .send()
        .await
        .map_err(|e| e.to_string())?;
    if !r.status().is_success() {
        return Err(format!("installed: {}", r.text().await.unwrap_or_default()));
    }
    Ok(())
}
