//! Benchmark: end-to-end renewal time (engine: journal, checks, self-test, activation)
//! against, in the same run, the sum of the raw PKCS#11 and portal operations a
//! renewal needs, done directly without the engine, and their ratio (goal <= 1.25).
//!
//! `cargo run -p ukey-renewal --example renewal_bench [-- ROUNDS [rsa|p256] [every-step|checkpoints]]`
//!
//! SoftHSM2 in a private temp dir (tmpfs when available) + the reference portal on
//! loopback; the journal goes to a temp dir. Rounds alternate engine and raw runs on
//! fresh tokens so that both see the same conditions; key generation time varies a lot
//! (RSA primes), so means over several rounds are reported.

use std::sync::Arc;
use std::time::{Duration, Instant};

use secrecy::SecretString;
use softhsm_fixtures::{KeyAlg as FxAlg, SoftHsm, TokenFixture, TokenSpec, softhsm_module};
use ukey_portal::{Portal, PortalConfig};
use ukey_portal_api::{
    CreateOrderRequest, InitialState, InstalledRequest, IssueRequest, KeyAlgorithm, KeyPolicy,
    SignatureAlgorithm, challenge_signed_data, installed_signed_data,
};
use ukey_portal_client::PortalClient;
use ukey_renewal::{JournalStore, Options, preflight, renew, status_request};
use ukey_token::cryptoki::object::{Attribute, ObjectClass};
use ukey_token::{KeyAlg, Module, TokenSigner};

fn pem_to_der(pem: &str) -> Vec<u8> {
    use base64::Engine as _;
    let b64: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    base64::engine::general_purpose::STANDARD
        .decode(b64)
        .expect("PEM")
}

struct Timer(Duration);
impl Timer {
    fn time<T>(&mut self, f: impl FnOnce() -> T) -> T {
        let t0 = Instant::now();
        let out = f();
        self.0 += t0.elapsed();
        out
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let rounds: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(5);
    let sync = match args.get(3).map(String::as_str) {
        Some("checkpoints") => ukey_renewal::JournalSync::Checkpoints,
        _ => ukey_renewal::JournalSync::EveryStep,
    };
    let (fx_alg, alg, wire_alg) = match args.get(2).map(String::as_str) {
        Some("p256") => (FxAlg::EcP256, KeyAlg::EcP256, KeyAlgorithm::EcP256),
        _ => (FxAlg::Rsa2048, KeyAlg::Rsa2048, KeyAlgorithm::Rsa2048),
    };

    let hsm = SoftHsm::new().expect("SoftHSM2");
    let tokens: Vec<TokenFixture> = (0..2 * rounds)
        .map(|i| {
            let mut spec = TokenSpec::ukey(&format!("Bench {i}"));
            spec.certs[0].alg = fx_alg;
            hsm.create_token(&spec).expect("token")
        })
        .collect();
    let ca = hsm.ca().unwrap();
    let portal_dir = tempfile::tempdir().unwrap();
    let mut config = PortalConfig::new(portal_dir.path().join("data"));
    config.ca_import = Some((ca.issuing_cert_path.clone(), ca.issuing_key_path.clone()));
    let portal = Arc::new(Portal::open(&config).unwrap());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let server = rt
        .block_on(ukey_portal::start(
            portal,
            "127.0.0.1:0".parse().unwrap(),
            None,
            None,
        ))
        .unwrap();
    for fx in &tokens {
        server
            .portal
            .create_order(&CreateOrderRequest {
                serial_hex: fx.certs[0].serial_hex.clone(),
                issuer_der: None,
                issuer_dn: None,
                years: 1,
                state: InitialState::Ready,
                key_policy: KeyPolicy::New,
                with_encryption_cert: false,
                target_algorithm: wire_alg,
                old_encryption_serial_hex: None,
            })
            .unwrap();
    }
    hsm.activate();
    let data = tempfile::tempdir().unwrap();
    let mut opts = Options::new(
        JournalStore::new(data.path()),
        vec![pem_to_der(&ca.root_cert_pem)],
    );
    opts.journal_sync = sync;
    let client = PortalClient::new(&server.url).unwrap();
    let module = Module::load(&softhsm_module().unwrap()).unwrap();

    let mut engine_total = Duration::ZERO;
    let mut raw_total = Duration::ZERO;
    for round in 0..rounds {
        // Engine, end to end.
        let fx = &tokens[2 * round];
        let token = module
            .tokens()
            .unwrap()
            .into_iter()
            .find(|t| t.serial == fx.serial)
            .unwrap();
        let t0 = Instant::now();
        let plan = preflight(&module, &token, None, &client, &opts).expect("preflight");
        let pre = t0.elapsed();
        let report = renew(
            &module,
            plan,
            &SecretString::from(fx.user_pin.clone()),
            &client,
            &opts,
            &mut |_| {},
        )
        .expect("renewal");
        let e = t0.elapsed();
        if std::env::var_os("BENCH_STEPS").is_some() {
            let steps: Vec<String> = report
                .steps
                .iter()
                .map(|s| format!("{}={:.1}", s.step.as_str(), s.ms))
                .collect();
            println!(
                "  preflight {:.1} ms; {}",
                pre.as_secs_f64() * 1000.0,
                steps.join(" ")
            );
        }
        engine_total += e;

        // The same work as raw operations, no engine.
        let fx = &tokens[2 * round + 1];
        let token = module
            .tokens()
            .unwrap()
            .into_iter()
            .find(|t| t.serial == fx.serial)
            .unwrap();
        let old = &fx.certs[0];
        let mut t = Timer(Duration::ZERO);
        let status = t.time(|| {
            client
                .status(&status_request(&old.der).unwrap())
                .unwrap()
                .value
        });
        let order_id = status.order_id().unwrap().to_owned();
        let s = t.time(|| module.open_rw_session(&token).unwrap());
        t.time(|| s.login(&SecretString::from(fx.user_pin.clone())).unwrap());
        let new_id = b"new".to_vec();
        let pair = t.time(|| s.generate_key_pair(alg, &new_id, "new").unwrap());
        let public = t.time(|| s.public_key(pair.public).unwrap());
        let mut params = rcgen::CertificateParams::default();
        params.distinguished_name = ukey_renewal::checks::subject_of(&old.der).unwrap();
        let csr = t.time(|| {
            params
                .serialize_request(&TokenSigner::new(&s, pair.private, public.clone()))
                .unwrap()
                .der()
                .to_vec()
        });
        let ch = t.time(|| client.challenge(&order_id).unwrap().value);
        let old_key = t.time(|| {
            s.find_objects(&[
                Attribute::Class(ObjectClass::PRIVATE_KEY),
                Attribute::Id(old.key_id.clone()),
            ])
            .unwrap()[0]
        });
        let sig = t.time(|| {
            s.sign_data(
                alg,
                old_key,
                &challenge_signed_data(&order_id, &ch.nonce, &csr, None),
            )
            .unwrap()
        });
        let sig_alg = match alg {
            KeyAlg::Rsa2048 => SignatureAlgorithm::RsaPkcs1Sha256,
            KeyAlg::EcP256 => SignatureAlgorithm::EcdsaP256Sha256,
        };
        let issued = t.time(|| {
            client
                .issue(
                    &order_id,
                    &IssueRequest {
                        challenge_id: ch.challenge_id.clone(),
                        challenge_signature: sig,
                        signature_algorithm: sig_alg,
                        old_certificate_der: old.der.clone(),
                        csr_der: csr.clone(),
                        transport_key_spki: None,
                    },
                )
                .unwrap()
                .value
        });
        let cert = t.time(|| {
            s.write_certificate(&issued.certificate_der, &new_id, "new")
                .unwrap()
        });
        t.time(|| s.sign_data(alg, pair.private, b"self-test").unwrap());
        for h in s
            .find_objects(&[Attribute::Id(old.key_id.clone())])
            .unwrap()
        {
            t.time(|| s.destroy(h).unwrap());
        }
        for h in [cert, pair.private, pair.public] {
            t.time(|| s.set_id_and_label(h, &old.key_id, &old.label).unwrap());
        }
        let inst = t.time(|| {
            s.sign_data(
                alg,
                pair.private,
                &installed_signed_data(&order_id, &issued.certificate_serial_hex),
            )
            .unwrap()
        });
        t.time(|| {
            client
                .installed(
                    &order_id,
                    &InstalledRequest {
                        certificate_serial_hex: issued.certificate_serial_hex.clone(),
                        signature: inst,
                        signature_algorithm: sig_alg,
                    },
                )
                .unwrap()
        });
        drop(s);
        raw_total += t.0;
        println!(
            "round {}: engine {:>8.1} ms   raw operations {:>8.1} ms",
            round + 1,
            e.as_secs_f64() * 1000.0,
            t.0.as_secs_f64() * 1000.0
        );
    }
    // The engine's own cost is mostly its durable journal: one fsynced write (file,
    // rename, directory) per step boundary and activation sub-step. Measure one here.
    let last = &tokens[2 * (rounds - 1)];
    let journal = opts
        .journals
        .load(&last.serial, &last.certs[0].serial_hex)
        .unwrap()
        .unwrap();
    let scratch = tempfile::tempdir_in(data.path()).unwrap();
    let store = JournalStore::new(scratch.path());
    let t0 = Instant::now();
    for _ in 0..20 {
        store.save(&journal).unwrap();
    }
    let save_ms = t0.elapsed().as_secs_f64() * 1000.0 / 20.0;
    // Steps login..installed (8) + activation sub-steps (4) + the final record, or the
    // four checkpoints.
    let saves = match sync {
        ukey_renewal::JournalSync::EveryStep => 8 + 4 + 1,
        ukey_renewal::JournalSync::Checkpoints => 4,
    };
    let n = rounds as f64;
    let engine_ms = engine_total.as_secs_f64() * 1000.0 / n;
    let raw_ms = raw_total.as_secs_f64() * 1000.0 / n;
    println!("key algorithm: {}; journal sync: {sync:?}", alg.as_str());
    println!("end-to-end renewal (mean of {rounds}): {engine_ms:.1} ms");
    println!("sum of raw PKCS#11 + portal operations (mean of {rounds}): {raw_ms:.1} ms");
    println!("ratio: {:.3} (goal <= 1.25)", engine_ms / raw_ms);
    println!(
        "of which fsynced journal writes: {saves} x {save_ms:.2} ms = {:.1} ms per renewal",
        saves as f64 * save_ms
    );
}
