//! Time of `ukey diagnose` (the real binary, a new process each run: module load,
//! C_Initialize, listing, mechanisms, chain) on a healthy fixture token.
//! Goal: under 300 ms. Run: `cargo bench -p ukey-cli --bench diagnose`.

use std::process::Command;
use std::time::{Duration, Instant};

use softhsm_fixtures::{CertSpec, KeyAlg, SoftHsm, TokenSpec};

const GOAL: Duration = Duration::from_millis(300);
const RUNS: usize = 15;

fn main() {
    let hsm = SoftHsm::new().expect("SoftHSM2 installation");
    let spec = TokenSpec {
        certs: vec![CertSpec::signing(KeyAlg::Rsa2048, "张三", 200)],
        ..TokenSpec::ukey("张三的UKey")
    };
    hsm.create_token(&spec).expect("fixture token");
    let ca = hsm.ca().expect("test CA");
    let data = hsm.dir().join("data");
    let run = || {
        let started = Instant::now();
        let out = hsm
            .command(env!("CARGO_BIN_EXE_ukey"))
            .arg("--module")
            .arg(hsm.module_path())
            .args(["diagnose", "--json", "--trust"])
            .arg(&ca.root_cert_path)
            .arg("--trust")
            .arg(&ca.issuing_cert_path)
            .env("UKEY_CONFIG", hsm.dir().join("no-config.toml"))
            .env("UKEY_DATA_DIR", &data)
            .env_remove("UKEY_PKCS11_MODULE")
            .output()
            .expect("run ukey diagnose");
        let took = started.elapsed();
        assert_eq!(out.status.code(), Some(0), "{out:?}");
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON report");
        (took, report["duration_ms"].as_u64().unwrap_or(0))
    };
    // Warm the page cache (binary, SoftHSM2, token files) once.
    run();
    let mut wall: Vec<Duration> = Vec::with_capacity(RUNS);
    let mut inner: Vec<u64> = Vec::with_capacity(RUNS);
    for _ in 0..RUNS {
        let (w, i) = run();
        wall.push(w);
        inner.push(i);
    }
    wall.sort();
    inner.sort_unstable();
    let median = wall[RUNS / 2];
    println!(
        "ukey diagnose on a healthy token ({RUNS} runs, whole process): min {:.1} ms, median {:.1} ms, max {:.1} ms",
        ms(wall[0]),
        ms(median),
        ms(wall[RUNS - 1])
    );
    println!(
        "  of which the diagnosis itself (report.duration_ms): median {} ms",
        inner[RUNS / 2]
    );
    println!(
        "  goal < {} ms: {}",
        GOAL.as_millis(),
        if median < GOAL { "met" } else { "NOT met" }
    );
    // Also time the same command without the trust anchors nor JSON, as a user types it.
    let started = Instant::now();
    let status = Command::new(env!("CARGO_BIN_EXE_ukey"))
        .arg("--module")
        .arg(hsm.module_path())
        .arg("diagnose")
        .env("SOFTHSM2_CONF", hsm.conf_path())
        .env("UKEY_CONFIG", hsm.dir().join("no-config.toml"))
        .env("UKEY_DATA_DIR", &data)
        .output()
        .expect("run ukey diagnose");
    println!(
        "  plain `ukey diagnose` (text): {:.1} ms, exit {:?}",
        ms(started.elapsed()),
        status.status.code()
    );
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
