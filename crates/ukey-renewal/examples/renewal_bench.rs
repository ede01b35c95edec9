//! Benchmark: end-to-end renewal time (engine: journal, checks, self-test, activation)
//! against, in the same run, the sum of the raw PKCS#11 and portal operations a
//! renewal needs, done directly without the engine, and their ratio (goal <= 1.25).
//!
//! `cargo run -p ukey-renewal --example renewal_bench [-- ROUNDS [rsa|p256|sm2] [every-step|checkpoints] [--sim PROFILE] [--parallel N]]`
//!
//! `sm2`: the 国密 upgrade, an RSA-2048 certificate renewed to SM2 on a GM key (ukey-sim's
//! TASS profile, so always through ukey-sim) against a portal with an SM2 CA.
//!
//! SoftHSM2 in a private temp dir (tmpfs when available) + the reference portal on
//! loopback; the journal goes to a temp dir. Rounds alternate engine and raw runs on
//! fresh tokens so that both see the same conditions; key generation time varies a lot
//! (RSA primes), so means over several rounds are reported, with the standard error
//! of the ratio.
//!
//! `--sim PROFILE`: the tokens are reached through ukey-sim with a real key's latency
//! profile (`usb-key`: seconds for an RSA key pair, hundreds of ms per signature, tens
//! per object write), so the engine's own cost is weighed against a key's, not
//! SoftHSM2's.
//!
//! `--parallel N`: instead of engine against raw, N keys renewed at once by the
//! engine, each on its own thread over one shared module as the desktop app does,
//! against one key alone (median of ROUNDS): the host must not serialise what happens
//! on N chips.

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
use ukey_token::cryptoki::object::{Attribute, AttributeType, ObjectClass};
use ukey_token::{KeyAlg, Module, PublicKey, TokenSigner};

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

struct Args {
    rounds: usize,
    fx_alg: FxAlg,
    alg: KeyAlg,
    wire_alg: KeyAlgorithm,
    sync: ukey_renewal::JournalSync,
    sim: Option<&'static ukey_sim::Profile>,
    parallel: Option<usize>,
}

fn args() -> Args {
    let mut positional = Vec::new();
    let mut sim = None;
    let mut parallel = None;
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--sim" => {
                let name = it.next().expect("--sim needs a profile name");
                sim = Some(
                    ukey_sim::profile::profile(&name)
                        .unwrap_or_else(|| panic!("unknown ukey-sim profile {name:?}")),
                );
            }
            "--parallel" => {
                parallel = Some(
                    it.next()
                        .and_then(|n| n.parse().ok())
                        .expect("--parallel needs a number"),
                )
            }
            _ => positional.push(a),
        }
    }
    let (fx_alg, alg, wire_alg) = match positional.get(1).map(String::as_str) {
        Some("p256") => (FxAlg::EcP256, KeyAlg::EcP256, KeyAlgorithm::EcP256),
        Some("sm2") => (FxAlg::Rsa2048, KeyAlg::Sm2, KeyAlgorithm::Sm2),
        _ => (FxAlg::Rsa2048, KeyAlg::Rsa2048, KeyAlgorithm::Rsa2048),
    };
    Args {
        rounds: positional.first().and_then(|a| a.parse().ok()).unwrap_or(5),
        fx_alg,
        alg,
        wire_alg,
        sync: match positional.get(2).map(String::as_str) {
            Some("checkpoints") => ukey_renewal::JournalSync::Checkpoints,
            _ => ukey_renewal::JournalSync::EveryStep,
        },
        sim,
        parallel,
    }
}

fn main() {
    let Args {
        rounds,
        fx_alg,
        alg,
        wire_alg,
        sync,
        sim,
        parallel,
    } = args();
    let token_count = match parallel {
        Some(n) => rounds + n,
        None => 2 * rounds,
    };
    let hsm = SoftHsm::new().expect("SoftHSM2");
    let tokens: Vec<TokenFixture> = (0..token_count)
        .map(|i| {
            let mut spec = TokenSpec::ukey(&format!("Bench {i}"));
            spec.certs[0].alg = fx_alg;
            hsm.create_token(&spec).expect("token")
        })
        .collect();
    let ca = hsm.ca().unwrap();
    let portal_dir = tempfile::tempdir().unwrap();
    let mut config = PortalConfig::new(portal_dir.path().join("data"));
    let sm2 = alg == KeyAlg::Sm2;
    if sm2 {
        // An SM2 CA of the portal's own, which also renews the fixtures' certificates.
        config.ca_alg = ukey_portal::ca::CaAlg::Sm2;
        ukey_portal::ca::Ca::add_accepted_issuers(&config.data_dir, &ca.issuing_cert_pem).unwrap();
    } else {
        config.ca_import = Some((ca.issuing_cert_path.clone(), ca.issuing_key_path.clone()));
    }
    let portal = Arc::new(Portal::open(&config).unwrap());
    let portal_ca = portal.ca().cert_der().to_vec();
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
                issuer_der: status_request(&fx.certs[0].der).unwrap().issuer_der,
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
    let anchor = if sm2 {
        portal_ca
    } else {
        pem_to_der(&ca.root_cert_pem)
    };
    let mut opts = Options::new(JournalStore::new(data.path()), vec![anchor]);
    opts.journal_sync = sync;
    let client = PortalClient::new(&server.url).unwrap();
    let module = match (sim, sm2) {
        (None, false) => Module::load(&softhsm_module().unwrap()).unwrap(),
        (sim, _) => {
            // The module's state directory by default: next to SOFTHSM2_CONF.
            let control = ukey_sim::Control::new(hsm.dir().join("ukey-sim-state")).unwrap();
            for fx in &tokens {
                if let Some(profile) = sim {
                    control.set_profile(&fx.serial, Some(profile)).unwrap();
                }
                if sm2 {
                    control.set_gm(&fx.serial, Some("tass")).unwrap();
                }
            }
            if let Some(profile) = sim {
                println!("latency profile (ukey-sim):\n{}", profile.describe());
            }
            Module::load(
                &ukey_sim::module_path().expect("libukey_sim.so (cargo build -p ukey-sim)"),
            )
            .unwrap()
        }
    };
    let find = |serial: &str| {
        module
            .tokens()
            .unwrap()
            .into_iter()
            .find(|t| t.serial == serial)
            .unwrap()
    };
    // The engine's end-to-end time, and the time of its key step (key generation).
    let engine = |fx: &TokenFixture, client: &PortalClient| -> (Duration, f64) {
        let token = find(&fx.serial);
        let t0 = Instant::now();
        let plan = preflight(&module, &token, None, client, &opts).expect("preflight");
        let pre = t0.elapsed();
        let report = renew(
            &module,
            plan,
            &SecretString::from(fx.user_pin.clone()),
            client,
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
        let key_ms = report
            .steps
            .iter()
            .filter(|s| s.step == ukey_renewal::Step::Key)
            .map(|s| s.ms)
            .sum();
        (e, key_ms)
    };
    if let Some(n) = parallel {
        // One alone, each on a fresh key.
        let mut one: Vec<f64> = tokens[..rounds]
            .iter()
            .map(|fx| engine(fx, &client).0.as_secs_f64() * 1000.0)
            .collect();
        one.sort_by(f64::total_cmp);
        let single = one[one.len() / 2];
        // N at once, on N threads over the one module, each with its own HTTP client
        // (as each of the app's renewal threads has).
        let group = &tokens[rounds..];
        let barrier = std::sync::Barrier::new(n);
        let t0 = Instant::now();
        let each: Vec<f64> = std::thread::scope(|scope| {
            let handles: Vec<_> = group
                .iter()
                .map(|fx| {
                    let barrier = &barrier;
                    let engine = &engine;
                    let url = server.url.clone();
                    scope.spawn(move || {
                        let client = PortalClient::new(&url).unwrap();
                        barrier.wait();
                        engine(fx, &client).0.as_secs_f64() * 1000.0
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let all = t0.elapsed().as_secs_f64() * 1000.0;
        let slowest = each.iter().copied().fold(0.0, f64::max);
        println!(
            "one key alone (median of {rounds}): {single:.1} ms; {n} keys at once: all done in {all:.1} ms (slowest {slowest:.1} ms)"
        );
        println!(
            "{}",
            serde_json::json!({
                "parallel": n,
                "one_ms": single,
                "all_ms": all,
                "slowest_ms": slowest,
                "ratio": all / single,
                "profile": sim.map(|p| p.name),
                "key_algorithm": alg.as_str(),
            })
        );
        return;
    }

    let mut engine_ms = Vec::with_capacity(rounds);
    let mut raw_ms = Vec::with_capacity(rounds);
    // The same without key generation on either side: RSA key generation on SoftHSM2
    // takes 50 ms to 1 s at random, more noise than the engine's whole cost.
    let mut engine_no_key = Vec::with_capacity(rounds);
    let mut raw_no_key = Vec::with_capacity(rounds);
    for round in 0..rounds {
        // Engine, end to end.
        let (e, engine_key_ms) = engine(&tokens[2 * round], &client);

        // The same work as raw operations, no engine.
        let fx = &tokens[2 * round + 1];
        let token = find(&fx.serial);
        let old = &fx.certs[0];
        let mut t = Timer(Duration::ZERO);
        // Read the certificate to renew off the key, ask the portal about it.
        let s = t.time(|| module.open_rw_session(&token).unwrap());
        let old_der = t.time(|| {
            let cert = s
                .find_objects(&[
                    Attribute::Class(ObjectClass::CERTIFICATE),
                    Attribute::Id(old.key_id.clone()),
                ])
                .unwrap()[0];
            match &s.attributes(cert, &[AttributeType::Value]).unwrap()[..] {
                [Attribute::Value(v)] => v.clone(),
                other => panic!("certificate value: {other:?}"),
            }
        });
        assert_eq!(old_der, old.der);
        let status = t.time(|| {
            client
                .status(&status_request(&old_der).unwrap())
                .unwrap()
                .value
        });
        let order_id = status.order_id().unwrap().to_owned();
        t.time(|| s.login(&SecretString::from(fx.user_pin.clone())).unwrap());
        let new_id = b"new".to_vec();
        let before_key = t.0;
        let pair = t.time(|| s.generate_key_pair(alg, &new_id, "new").unwrap());
        let public = t.time(|| s.public_key(pair.public).unwrap());
        let raw_key_ms = (t.0 - before_key).as_secs_f64() * 1000.0;
        let mut params = rcgen::CertificateParams::default();
        params.distinguished_name = ukey_renewal::checks::subject_of(&old.der).unwrap();
        let csr = t.time(|| {
            TokenSigner::new(&s, pair.private, public.clone())
                .csr(&params)
                .unwrap()
        });
        let old_public = PublicKey::from_certificate(&old.der).unwrap();
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
                &old_public,
                old_key,
                &challenge_signed_data(&order_id, &ch.nonce, &csr, None),
            )
            .unwrap()
        });
        let sig_alg = |a: KeyAlg| match a {
            KeyAlg::Rsa2048 => SignatureAlgorithm::RsaPkcs1Sha256,
            KeyAlg::EcP256 => SignatureAlgorithm::EcdsaP256Sha256,
            KeyAlg::Sm2 => SignatureAlgorithm::Sm2Sm3,
        };
        let issued = t.time(|| {
            client
                .issue(
                    &order_id,
                    &IssueRequest {
                        challenge_id: ch.challenge_id.clone(),
                        challenge_signature: sig,
                        signature_algorithm: sig_alg(old_public.alg()),
                        old_certificate_der: old.der.clone(),
                        csr_der: csr.clone(),
                        transport_key_spki: None,
                        renewal_code: None,
                    },
                )
                .unwrap()
                .value
        });
        let cert = t.time(|| {
            s.write_certificate(&issued.certificate_der, &new_id, "new")
                .unwrap()
        });
        t.time(|| s.sign_data(&public, pair.private, b"self-test").unwrap());
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
                &public,
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
                        signature_algorithm: sig_alg(alg),
                    },
                )
                .unwrap()
        });
        drop(s);
        engine_ms.push(e.as_secs_f64() * 1000.0);
        raw_ms.push(t.0.as_secs_f64() * 1000.0);
        engine_no_key.push(e.as_secs_f64() * 1000.0 - engine_key_ms);
        raw_no_key.push(t.0.as_secs_f64() * 1000.0 - raw_key_ms);
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
    let (engine_mean, engine_se) = mean_and_standard_error(&engine_ms);
    let (raw_mean, raw_se) = mean_and_standard_error(&raw_ms);
    let ratio = engine_mean / raw_mean;
    // First-order propagation of both means' standard errors into the ratio.
    let ratio_se = ratio * ((engine_se / engine_mean).powi(2) + (raw_se / raw_mean).powi(2)).sqrt();
    let (engine_nk, engine_nk_se) = mean_and_standard_error(&engine_no_key);
    let (raw_nk, raw_nk_se) = mean_and_standard_error(&raw_no_key);
    let ratio_nk = engine_nk / raw_nk;
    let ratio_nk_se =
        ratio_nk * ((engine_nk_se / engine_nk).powi(2) + (raw_nk_se / raw_nk).powi(2)).sqrt();
    let profile = sim.map_or("SoftHSM2 directly", |p| p.name);
    println!(
        "key algorithm: {}; journal sync: {sync:?}; tokens: {profile}",
        alg.as_str()
    );
    println!("end-to-end renewal (mean of {rounds}): {engine_mean:.1} ms");
    println!("sum of raw PKCS#11 + portal operations (mean of {rounds}): {raw_mean:.1} ms");
    println!("ratio: {ratio:.3} ± {ratio_se:.3} (standard error)");
    println!(
        "without key generation: engine {engine_nk:.1} ms, raw {raw_nk:.1} ms, ratio {ratio_nk:.3} ± {ratio_nk_se:.3}"
    );
    println!(
        "of which fsynced journal writes: {saves} x {save_ms:.2} ms = {:.1} ms per renewal",
        saves as f64 * save_ms
    );
    println!(
        "{}",
        serde_json::json!({
            "end_to_end_ms": engine_mean,
            "raw_ops_ms": raw_mean,
            "ratio": ratio,
            "ratio_se": ratio_se,
            "without_keygen": {
                "end_to_end_ms": engine_nk,
                "raw_ops_ms": raw_nk,
                "ratio": ratio_nk,
                "ratio_se": ratio_nk_se,
            },
            "rounds": rounds,
            "profile": sim.map(|p| p.name),
            "key_algorithm": alg.as_str(),
        })
    );
}

/// Mean and standard error of the mean.
fn mean_and_standard_error(xs: &[f64]) -> (f64, f64) {
    let n = xs.len() as f64;
    let mean = xs.iter().sum::<f64>() / n;
    if xs.len() < 2 {
        return (mean, 0.0);
    }
    let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0);
    (mean, (var / n).sqrt())
}
