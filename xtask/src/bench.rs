//! `cargo xtask bench [--quick] [--out FILE]`: every benchmark in one run, side by side,
//! so that a noisy machine still gives honest ratios. Prints a table (figure, goal, met)
//! and writes the same rows as JSON (default `$CARGO_TARGET_DIR/bench.json`).
//! Benchmarks print figures; they never fail on a goal (only when they cannot measure).
//!
//! All binaries are release builds; processes are timed whole (start-up included), the
//! way a user meets them:
//! - renewal end to end: `ukey renew --json` on a fresh SoftHSM2 key with a ready order
//!   at the reference portal on loopback (RSA-2048 new key, P-256 new key, same key),
//!   median of several runs; with the raw-operation sum and ratio from the renewal
//!   engine's own benchmark (`crates/ukey-renewal/examples/renewal_bench.rs`), on
//!   SoftHSM2 and on ukey-sim with a real USB key's latency profile (`usb-key`, whose
//!   figures and public sources it prints);
//! - eight keys renewed at once against one alone: eight `ukey renew` processes on
//!   SoftHSM2, and eight engine threads in one process on keys with the `usb-key`
//!   latency profile;
//! - insert-to-notification latency: `ukey watch` on the ukey-sim module, polling every
//!   200 ms as the desktop app does, against `ukey-sim plug`/`unplug`;
//! - the same watcher's CPU while idle (utime + stime from /proc/PID/stat), and in the
//!   same window the CPU of a watcher on SoftHSM2 directly (the re-scan path);
//! - `ukey diagnose` on one healthy key;
//! - the reference portal's issuances/s and p50/p99 (`cargo bench -p ukey-portal`);
//! - the desktop app's memory after start with one key against a bare Tauri 2 window
//!   measured in the same run (tests/e2e/run.sh --memory).

use std::io::Write as _;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use crate::demo::{self, World};
use crate::setup::{self, Part};
use crate::util::{
    self, ChildGuard, Lines, cargo, check_interrupted, median, output, percentile, run, target_dir,
    workspace_root,
};

const PROFILE: &str = "release";
/// The ukey-sim latency profile of the slow-key rows (figures and their sources are
/// printed with them: `ukey-sim profile --list`).
const SIM_PROFILE: &str = "usb-key";

/// One line of the table.
#[derive(Debug, Clone)]
struct Row {
    name: String,
    /// The main figure, in `unit`; None when it could not be measured.
    value: Option<f64>,
    unit: &'static str,
    /// Everything else worth printing (spread, counts).
    detail: String,
    goal: String,
    /// Whether the goal is met; None when there is no goal or no figure.
    met: Option<bool>,
}

impl Row {
    fn measured(
        name: &str,
        value: f64,
        unit: &'static str,
        detail: String,
        goal: &str,
        met: Option<bool>,
    ) -> Row {
        Row {
            name: name.into(),
            value: Some(value),
            unit,
            detail,
            goal: goal.into(),
            met,
        }
    }

    fn missing(name: &str, goal: &str, why: String) -> Row {
        // The first line only: the rest (a command's output) is in the log above.
        let mut why = why.lines().next().unwrap_or("").to_owned();
        if why.chars().count() > 160 {
            why = format!("{}…", why.chars().take(160).collect::<String>());
        }
        Row {
            name: name.into(),
            value: None,
            unit: "",
            detail: why,
            goal: goal.into(),
            met: None,
        }
    }

    fn json(&self) -> Value {
        json!({
            "name": self.name,
            "value": self.value,
            "unit": self.unit,
            "detail": self.detail,
            "goal": self.goal,
            "met": self.met,
        })
    }
}

#[derive(Debug)]
struct Opts {
    quick: bool,
    out: PathBuf,
    only: Vec<String>,
}

const SECTIONS: &[&str] = &[
    "renewal", "parallel", "latency", "idle", "diagnose", "portal", "memory",
];

fn parse(args: &[String]) -> Result<Opts> {
    let mut o = Opts {
        quick: false,
        out: target_dir().join("bench.json"),
        only: Vec::new(),
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--quick" => o.quick = true,
            "--out" => o.out = it.next().context("--out needs a file")?.into(),
            "--only" => {
                for s in it.next().context("--only needs a list")?.split(',') {
                    if !SECTIONS.contains(&s) {
                        bail!("unknown section `{s}` ({})", SECTIONS.join(", "));
                    }
                    o.only.push(s.to_owned());
                }
            }
            other => bail!("unknown bench option `{other}` (--quick, --out FILE, --only LIST)"),
        }
    }
    Ok(o)
}

pub fn bench(args: &[String]) -> Result<()> {
    let opts = parse(args)?;
    let wants = |s: &str| opts.only.is_empty() || opts.only.iter().any(|o| o == s);
    setup::setup(&[Part::Rust])?;
    eprintln!("xtask bench: building release binaries");
    demo::build_binaries(true)?;
    let started = Instant::now();
    let mut rows: Vec<Row> = Vec::new();
    let mut section = |name: &str, f: &mut dyn FnMut() -> Result<Vec<Row>>| {
        if !wants(name) {
            return;
        }
        eprintln!("\n===== xtask bench: {name} =====");
        match f() {
            Ok(r) => rows.extend(r),
            Err(e) => {
                eprintln!("xtask bench: {name}: could not measure: {e:#}");
                rows.push(Row::missing(name, "", format!("not measured: {e:#}")));
            }
        }
    };
    section("renewal", &mut || renewal(&opts));
    section("parallel", &mut || parallel(&opts));
    section("latency", &mut || {
        latency_and_idle(&opts, true, wants("idle"))
    });
    if !wants("latency") {
        section("idle", &mut || latency_and_idle(&opts, false, true));
    }
    section("diagnose", &mut || diagnose(&opts));
    section("portal", &mut || portal(&opts));
    section("memory", &mut || memory());
    check_interrupted()?;

    let report = json!({
        "date": date(),
        "machine": machine(),
        "quick": opts.quick,
        "profile": PROFILE,
        "seconds": started.elapsed().as_secs(),
        "rows": rows.iter().map(Row::json).collect::<Vec<_>>(),
    });
    if let Some(parent) = opts.out.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(&opts.out, serde_json::to_vec_pretty(&report)?)
        .with_context(|| format!("writing {}", opts.out.display()))?;
    print_table(&rows, &report);
    println!("figures written to {}", opts.out.display());
    Ok(())
}

fn print_table(rows: &[Row], report: &Value) {
    println!(
        "\nUKey Renew benchmarks, {} on {}\n",
        report["date"].as_str().unwrap_or(""),
        report["machine"]["summary"].as_str().unwrap_or("")
    );
    println!("| benchmark | figure | goal | met |");
    println!("| --- | --- | --- | --- |");
    for r in rows {
        let figure = match r.value {
            Some(v) => format!("{} {}{}", fmt_num(v), r.unit, paren(&r.detail)),
            None => r.detail.clone(),
        };
        let met = match r.met {
            Some(true) => "yes",
            Some(false) => "NO",
            None => "-",
        };
        println!("| {} | {figure} | {} | {met} |", r.name, r.goal);
    }
}

fn paren(s: &str) -> String {
    if s.is_empty() {
        String::new()
    } else {
        format!(" ({s})")
    }
}

fn fmt_num(v: f64) -> String {
    if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn date() -> String {
    Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

fn machine() -> Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|l| l.trim_start_matches([' ', '\t', ':']).trim().to_owned())
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let mem_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse::<f64>().ok())
        })
        .map(|kib| kib / 1024.0 / 1024.0)
        .unwrap_or(0.0);
    let os = std::fs::read_to_string("/etc/os-release")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("PRETTY_NAME="))
                .map(|v| v.trim_matches('"').to_owned())
        })
        .unwrap_or_default();
    let kernel = Command::new("uname")
        .arg("-r")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    json!({
        "cpu": cpu,
        "cores": cores,
        "memory_gib": (mem_gib * 10.0).round() / 10.0,
        "os": os,
        "kernel": kernel,
        "summary": format!("{cpu}, {cores} cores, {mem_gib:.0} GiB, {os}"),
    })
}

// ---------------------------------------------------------------- renewal

/// A scenario of the renewal rows: the key's algorithm, the order's options.
struct Scenario {
    name: &'static str,
    key_alg: &'static str,
    order: &'static [&'static str],
}

const SCENARIOS: &[Scenario] = &[
    Scenario {
        name: "renewal, RSA-2048, new key",
        key_alg: "rsa2048",
        order: &["--key-policy", "new", "--algorithm", "RSA-2048"],
    },
    Scenario {
        name: "renewal, P-256, new key",
        key_alg: "p256",
        order: &["--key-policy", "new", "--algorithm", "EC-P256"],
    },
    Scenario {
        name: "renewal, RSA-2048, same key",
        key_alg: "rsa2048",
        order: &["--key-policy", "same", "--algorithm", "RSA-2048"],
    },
];

fn need_renew() -> Result<()> {
    if !demo::has_command(PROFILE, "renew") {
        bail!("this build of `ukey` has no `renew` command");
    }
    Ok(())
}

fn renewal(opts: &Opts) -> Result<Vec<Row>> {
    need_renew()?;
    let runs = if opts.quick { 3 } else { 7 };
    let world = demo::make_world(PROFILE, "BENCH-0", "张三", 10)?;
    let (_portal, url) = demo::start_portal(&world)?;
    let mut rows = Vec::new();
    let mut medians = Vec::new();
    for s in SCENARIOS {
        let mut times = Vec::new();
        for i in 0..runs {
            check_interrupted()?;
            let (token, cert) = demo::add_key(&world, &format!("B{i}"), "张三", 10, s.key_alg)?;
            demo::order(&world, &cert, s.order)?;
            let took = renew_once(&world, &["--portal", url.as_str()], &token)?;
            times.push(took.as_secs_f64() * 1e3);
            eprintln!("  {}: run {} {:.0} ms", s.name, i + 1, times[i]);
            // Each key lives in its own token dir; drop it so later runs list one key.
            delete_key(&world, &token)?;
        }
        let m = median(&times);
        medians.push((s.name, m));
        rows.push(Row::measured(
            s.name,
            m,
            "ms",
            format!(
                "median of {runs} `ukey renew` processes, min {:.0}, max {:.0}",
                percentile(&times, 0.0),
                percentile(&times, 1.0)
            ),
            "",
            None,
        ));
    }
    rows.push(cmp_vs_rest(&world, &url, runs)?);
    rows.extend(raw_ops_ratio(opts.quick));
    Ok(rows)
}

/// The same renewal (a P-256 key, new key, the same portal) over CMP and over the REST
/// protocol, interleaved run by run: the ratio of the medians.
fn cmp_vs_rest(world: &World, url: &str, runs: usize) -> Result<Row> {
    let cmp_url = format!("{url}/.well-known/cmp");
    let mut rest = Vec::new();
    let mut cmp = Vec::new();
    for i in 0..runs {
        for (protocol, times) in [("rest", &mut rest), ("cmp", &mut cmp)] {
            check_interrupted()?;
            let (token, cert) =
                demo::add_key(world, &format!("P{i}{protocol}"), "张三", 10, "p256")?;
            demo::order(
                world,
                &cert,
                &["--key-policy", "new", "--algorithm", "EC-P256"],
            )?;
            let how = if protocol == "cmp" {
                ["--cmp", cmp_url.as_str()]
            } else {
                ["--portal", url]
            };
            let took = renew_once(world, &how, &token)?;
            times.push(took.as_secs_f64() * 1e3);
            eprintln!(
                "  {protocol} renewal, P-256: run {} {:.0} ms",
                i + 1,
                times[i]
            );
            delete_key(world, &token)?;
        }
    }
    let ratio = median(&cmp) / median(&rest);
    Ok(Row::measured(
        "CMP renewal vs REST renewal, P-256, new key",
        ratio,
        "×",
        format!(
            "medians of {runs} interleaved `ukey renew` processes each: CMP {:.0} ms, REST {:.0} ms",
            median(&cmp),
            median(&rest)
        ),
        "≤ 1.1×",
        Some(ratio <= 1.1),
    ))
}

/// One `ukey renew --json` for a token (`how`: `--portal URL` or `--cmp URL`), timed
/// whole; fails unless it renewed.
fn renew_once(world: &World, how: &[&str], token: &str) -> Result<Duration> {
    let mut c = world.cmd("ukey");
    c.arg("renew")
        .args(how)
        .args([
            "--token",
            token,
            "--pin-stdin",
            "--yes",
            "--json",
            "--trust",
        ])
        .arg(&world.portal_ca)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let started = Instant::now();
    let mut child = c.spawn().context("starting ukey renew")?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(format!("{}\n", demo::DEMO_PIN).as_bytes())?;
    }
    let out = child.wait_with_output()?;
    let took = started.elapsed();
    if !out.status.success() {
        bail!(
            "`ukey renew --token {token}` failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(took)
}

fn delete_key(world: &World, token: &str) -> Result<()> {
    output(
        world
            .cmd("softhsm-fixtures")
            .arg("--dir")
            .arg(world.hsm_dir())
            .args(["delete", "--serial", token]),
    )?;
    Ok(())
}

/// The renewal engine's own benchmark, `crates/ukey-renewal/examples/renewal_bench.rs`,
/// run with `args` in release: its output, echoed, and its last JSON line.
fn renewal_example(args: &[&str]) -> Result<(String, Value)> {
    let mut c = cargo();
    c.args([
        "run",
        "--quiet",
        "--release",
        "-p",
        "ukey-renewal",
        "--example",
        "renewal_bench",
        "--",
    ])
    .args(args);
    let out = output(&mut c)?;
    print!("{out}");
    let last = json_lines(&out)
        .pop()
        .context("the renewal benchmark printed no JSON line")?;
    Ok((out, last))
}

/// One row of [`raw_ops_ratio`]: its name, rounds, the example's arguments, the goal
/// (text and limit), and whether key generation is left out of the figure.
type RatioRun = (
    &'static str,
    &'static str,
    Vec<&'static str>,
    &'static str,
    f64,
    bool,
);

/// End-to-end time against the sum of the raw PKCS#11 and portal operations a renewal
/// needs, measured in the same run: on SoftHSM2 directly (the engine's CPU cost; RSA
/// key generation varies a lot, so many rounds and the standard error), and on
/// ukey-sim with a real USB key's latency profile (the engine's cost where users meet
/// it).
fn raw_ops_ratio(quick: bool) -> Vec<Row> {
    let rounds = if quick { "12" } else { "30" };
    let sim_rounds = if quick { "2" } else { "5" };
    let runs: [RatioRun; 4] = [
        (
            "renewal engine vs sum of raw operations, RSA-2048 new key, SoftHSM2, key generation left out",
            rounds,
            vec!["rsa", "every-step"],
            "ratio <= 1.25",
            1.25,
            true,
        ),
        (
            "renewal engine vs sum of raw operations, P-256 new key, SoftHSM2, key generation left out",
            rounds,
            vec!["p256", "every-step"],
            "ratio <= 1.25",
            1.25,
            true,
        ),
        (
            "renewal engine vs sum of raw operations, RSA-2048 new key, USB key latency (ukey-sim usb-key)",
            sim_rounds,
            vec!["rsa", "every-step", "--sim", SIM_PROFILE],
            "ratio <= 1.05",
            1.05,
            false,
        ),
        (
            "国密 renewal engine vs sum of raw operations, RSA-2048 → SM2 on a GM key (ukey-sim TASS, usb-key latency), SM2 portal CA",
            sim_rounds,
            vec!["sm2", "every-step", "--sim", SIM_PROFILE],
            "ratio <= 1.25",
            1.25,
            false,
        ),
    ];
    let mut rows = Vec::new();
    for (name, rounds, rest, goal, limit, keygen_out) in runs {
        let mut args = vec![rounds];
        args.extend(rest);
        let parsed = renewal_example(&args).and_then(|(_, v)| {
            let f = |v: &Value, k: &str| v[k].as_f64().with_context(|| format!("no {k} in {v}"));
            let all = (
                f(&v, "end_to_end_ms")?,
                f(&v, "raw_ops_ms")?,
                f(&v, "ratio")?,
                f(&v, "ratio_se")?,
            );
            let w = &v["without_keygen"];
            let nk = (
                f(w, "end_to_end_ms")?,
                f(w, "raw_ops_ms")?,
                f(w, "ratio")?,
                f(w, "ratio_se")?,
            );
            Ok((all, nk))
        });
        match parsed {
            Ok((all, nk)) => {
                let (main, other, other_name) = if keygen_out {
                    (nk, all, "with key generation")
                } else {
                    (all, nk, "without key generation")
                };
                let (e2e, raw, ratio, se) = main;
                rows.push(Row::measured(
                    name,
                    ratio,
                    "×",
                    format!(
                        "± {se:.3} standard error; engine {e2e:.0} ms, raw PKCS#11 + portal operations {raw:.0} ms, mean of {rounds} rounds each, same run; {other_name} {:.3} ± {:.3} ({:.0} vs {:.0} ms)",
                        other.2, other.3, other.0, other.1
                    ),
                    goal,
                    Some(ratio <= limit),
                ))
            }
            Err(e) => rows.push(Row::missing(name, goal, format!("not measured: {e:#}"))),
        }
    }
    rows
}

fn json_lines(out: &str) -> Vec<Value> {
    out.lines()
        .filter(|l| l.trim_start().starts_with('{'))
        .filter_map(|l| serde_json::from_str(l.trim()).ok())
        .collect()
}

// ---------------------------------------------------------------- parallel

fn parallel(opts: &Opts) -> Result<Vec<Row>> {
    need_renew()?;
    let singles = if opts.quick { 3 } else { 5 };
    let world = demo::make_world(PROFILE, "PAR-0", "张三", 10)?;
    let (_portal, url) = demo::start_portal(&world)?;
    let order: &[&str] = &["--key-policy", "new", "--algorithm", "RSA-2048"];
    // One alone (median of a few), each on a fresh key, the others deleted.
    delete_key(&world, &world.token_serial)?;
    let mut one = Vec::new();
    for i in 0..singles {
        let (token, cert) = demo::add_key(&world, &format!("ONE{i}"), "张三", 10, "rsa2048")?;
        demo::order(&world, &cert, order)?;
        one.push(renew_once(&world, &["--portal", url.as_str()], &token)?.as_secs_f64() * 1e3);
        delete_key(&world, &token)?;
    }
    // Eight at once: eight keys with ready orders, eight processes started together.
    let mut tokens = Vec::new();
    for i in 0..8 {
        let (token, cert) = demo::add_key(&world, &format!("EIGHT{i}"), "张三", 10, "rsa2048")?;
        demo::order(&world, &cert, order)?;
        tokens.push(token);
    }
    check_interrupted()?;
    let started = Instant::now();
    let handles: Vec<_> = tokens
        .iter()
        .map(|t| {
            let (u, t) = (url.clone(), t.clone());
            let env = world.env.clone();
            let ca = world.portal_ca.clone();
            std::thread::spawn(move || -> Result<f64> {
                let mut c = Command::new(util::bin(PROFILE, "ukey"));
                c.envs(&env)
                    .args([
                        "renew",
                        "--portal",
                        &u,
                        "--token",
                        &t,
                        "--pin-stdin",
                        "--yes",
                        "--json",
                        "--trust",
                    ])
                    .arg(&ca)
                    .stdin(Stdio::piped())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped());
                let s = Instant::now();
                let mut child = c.spawn()?;
                if let Some(mut stdin) = child.stdin.take() {
                    stdin.write_all(format!("{}\n", demo::DEMO_PIN).as_bytes())?;
                }
                let out = child.wait_with_output()?;
                if !out.status.success() {
                    bail!(
                        "`ukey renew --token {t}` failed: {}",
                        String::from_utf8_lossy(&out.stderr)
                    );
                }
                Ok(s.elapsed().as_secs_f64() * 1e3)
            })
        })
        .collect();
    let mut each = Vec::new();
    for h in handles {
        each.push(
            h.join()
                .map_err(|_| anyhow::anyhow!("a renewal thread panicked"))??,
        );
    }
    let all = started.elapsed().as_secs_f64() * 1e3;
    let single = median(&one);
    let ratio = all / single;
    let mut rows = vec![Row::measured(
        "8 keys renewed at once vs 1, 8 `ukey renew` processes on SoftHSM2 (the host's CPU does the keys' work)",
        ratio,
        "×",
        format!(
            "all 8 done in {all:.0} ms (slowest process {:.0} ms); one alone {single:.0} ms (median of {singles}); RSA-2048 new key, {} cores",
            percentile(&each, 1.0),
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(0)
        ),
        "<= 2×",
        Some(ratio <= 2.0),
    )];
    rows.push(slow_keys_at_once(opts.quick));
    Ok(rows)
}

/// Eight keys with a real key's latency renewed at once in one process, each on its
/// own thread over one shared module as the desktop app does, against one alone: the
/// host must not serialise work that happens on eight chips.
fn slow_keys_at_once(quick: bool) -> Row {
    let name =
        "8 keys renewed at once vs 1, USB key latency (ukey-sim usb-key), one process, 8 threads";
    let goal = "<= 1.2×";
    let singles = if quick { "2" } else { "3" };
    let measured = renewal_example(&[
        singles,
        "rsa",
        "every-step",
        "--sim",
        SIM_PROFILE,
        "--parallel",
        "8",
    ])
    .and_then(|(_, v)| {
        let f = |k: &str| v[k].as_f64().with_context(|| format!("no {k} in {v}"));
        Ok((f("ratio")?, f("all_ms")?, f("one_ms")?, f("slowest_ms")?))
    });
    match measured {
        Ok((ratio, all, one, slowest)) => Row::measured(
            name,
            ratio,
            "×",
            format!(
                "all 8 done in {all:.0} ms (slowest thread {slowest:.0} ms); one alone {one:.0} ms (median of {singles}); RSA-2048 new key"
            ),
            goal,
            Some(ratio <= 1.2),
        ),
        Err(e) => Row::missing(name, goal, format!("not measured: {e:#}")),
    }
}

// ---------------------------------------------------------------- watcher

/// Plugs the key in and out `rounds` times each, at varying points of the watcher's
/// 200 ms interval, and times each change until `ukey watch` reports it: (inserts,
/// removals), ms.
fn plug_rounds(
    world: &demo::World,
    lines: &Lines,
    key: &str,
    rounds: usize,
) -> Result<(Vec<f64>, Vec<f64>)> {
    let mut plug_ms = Vec::new();
    let mut unplug_ms = Vec::new();
    for round in 0..rounds * 2 {
        check_interrupted()?;
        std::thread::sleep(Duration::from_millis(150 + (round as u64 * 37) % 200));
        let plug = round % 2 == 0;
        let changed = Instant::now();
        run_quiet(
            world
                .cmd("ukey-sim")
                .args([if plug { "plug" } else { "unplug" }, key]),
        )?;
        let (seen, line) = lines.next(Duration::from_secs(5)).with_context(|| {
            format!(
                "`ukey watch` did not report the key {} within 5 s",
                if plug { "inserted" } else { "removed" }
            )
        })?;
        let ms = seen.duration_since(changed).as_secs_f64() * 1e3;
        if plug {
            if !line.contains(key) {
                bail!("unexpected watch line: {line}");
            }
            plug_ms.push(ms);
        } else {
            unplug_ms.push(ms);
        }
    }
    Ok((plug_ms, unplug_ms))
}

/// The same for an SKF key: the software SKF key (the ukey-sim library's SKF face,
/// configured `kind = "skf"`), watched by `ukey watch` as the app watches it.
fn skf_insert_latency(world: &demo::World, rounds: usize) -> Row {
    let name = "insert to notification (SKF key, ukey-sim)";
    let goal = "p95 <= 500 ms";
    let measured = (|| -> Result<(Vec<f64>, Vec<f64>)> {
        let key = "BENCHSKF01";
        run_quiet(world.cmd("ukey-sim").args(["skf", "create", key]))?;
        run_quiet(world.cmd("ukey-sim").args(["unplug", key]))?;
        let module = world
            .env
            .get("UKEY_PKCS11_MODULE")
            .context("the demo world names no module")?;
        let config = world.dir.path().join("skf-config.toml");
        std::fs::write(
            &config,
            format!(
                "[[modules]]\nname = \"ukey-sim SKF\"\npath = \"{}\"\nkind = \"skf\"\n",
                std::path::Path::new(module).display()
            ),
        )?;
        let mut watch = ChildGuard::spawn(
            "ukey watch (SKF)",
            world
                .cmd("ukey")
                .env("UKEY_CONFIG", &config)
                .args(["watch", "--json", "--interval-ms", "200"])
                .stdout(Stdio::piped()),
        )?;
        let lines = Lines::new(watch.take_stdout().context("watch stdout")?);
        std::thread::sleep(Duration::from_millis(800));
        plug_rounds(world, &lines, key, rounds)
    })();
    match measured {
        Ok((plug_ms, unplug_ms)) => {
            let p95 = percentile(&plug_ms, 0.95);
            Row::measured(
                name,
                p95,
                "ms p95",
                format!(
                    "{} inserts: median {:.0} ms, max {:.0} ms; removals p95 {:.0} ms; SKF devices listed every 200 ms",
                    plug_ms.len(),
                    median(&plug_ms),
                    percentile(&plug_ms, 1.0),
                    percentile(&unplug_ms, 0.95)
                ),
                goal,
                Some(p95 <= 500.0),
            )
        }
        Err(e) => Row::missing(name, goal, format!("not measured: {e:#}")),
    }
}

/// Insert-to-notification latency and idle CPU of one `ukey watch` process on the
/// ukey-sim module, polling every 200 ms like the desktop app.
fn latency_and_idle(opts: &Opts, latency: bool, idle: bool) -> Result<Vec<Row>> {
    let rounds = if opts.quick { 10 } else { 25 };
    let idle_secs = if opts.quick { 10 } else { 60 };
    let world = demo::make_world(PROFILE, "WATCH", "张三", 200)?;
    let key = world.token_serial.clone();
    run(world.cmd("ukey-sim").args(["unplug", &key]))?;
    let mut watch = ChildGuard::spawn(
        "ukey watch",
        world
            .cmd("ukey")
            .args(["watch", "--json", "--interval-ms", "200"])
            .stdout(Stdio::piped()),
    )?;
    let lines = Lines::new(watch.take_stdout().context("watch stdout")?);
    std::thread::sleep(Duration::from_millis(800));
    let mut rows = Vec::new();
    if latency {
        let (plug_ms, unplug_ms) = plug_rounds(&world, &lines, &key, rounds)?;
        let p95 = percentile(&plug_ms, 0.95);
        rows.push(Row::measured(
            "insert to notification (ukey-sim)",
            p95,
            "ms p95",
            format!(
                "{} inserts: median {:.0} ms, max {:.0} ms; removals p95 {:.0} ms; `ukey watch` polling every 200 ms like the app",
                plug_ms.len(),
                median(&plug_ms),
                percentile(&plug_ms, 1.0),
                percentile(&unplug_ms, 0.95)
            ),
            "p95 <= 500 ms",
            Some(p95 <= 500.0),
        ));
        rows.push(skf_insert_latency(&world, rounds));
    }
    // The rounds end unplugged: plug the key in for the idle measurement, a user's
    // normal state.
    run_quiet(world.cmd("ukey-sim").args(["plug", &key]))?;
    let _ = lines.next(Duration::from_secs(5));
    if idle {
        // The same key watched through SoftHSM2 directly, in the same window: a module
        // without slot events, so every poll re-initialises it (C_Finalize +
        // C_Initialize), the path the desktop app takes with such modules.
        let mut rescan = ChildGuard::spawn(
            "ukey watch (SoftHSM2 re-scan)",
            world
                .cmd("ukey")
                .args(["--module"])
                .arg(softhsm_module()?)
                .args(["watch", "--json", "--interval-ms", "200"])
                .stdout(Stdio::null()),
        )?;
        std::thread::sleep(Duration::from_millis(800));
        let tick = clock_ticks()?;
        let pids = [watch.id(), rescan.id()];
        let before = [cpu_ticks(pids[0])?, cpu_ticks(pids[1])?];
        let t0 = Instant::now();
        let deadline = t0 + Duration::from_secs(idle_secs);
        while Instant::now() < deadline {
            check_interrupted()?;
            std::thread::sleep(Duration::from_millis(200));
        }
        let after = [cpu_ticks(pids[0])?, cpu_ticks(pids[1])?];
        let wall = t0.elapsed().as_secs_f64();
        let cpu_s = |i: usize| (after[i] - before[i]) as f64 / tick;
        let pct = |i: usize| cpu_s(i) / wall * 100.0;
        rows.push(Row::measured(
            "watcher CPU while idle",
            pct(0),
            "% of a core",
            format!(
                "{:.2} s CPU over {wall:.0} s, `ukey watch` on ukey-sim (slot events) polling every 200 ms, one key inserted",
                cpu_s(0)
            ),
            "<= 0.5%",
            Some(pct(0) <= 0.5),
        ));
        rows.push(Row::measured(
            "watcher CPU while idle, re-scan path",
            pct(1),
            "% of a core",
            format!(
                "{:.2} s CPU over the same {wall:.0} s, `ukey watch` on SoftHSM2 directly (C_Finalize + C_Initialize every 200 ms); {:.1}x the slot-event path",
                cpu_s(1),
                pct(1) / pct(0).max(f64::EPSILON)
            ),
            "<= 2%",
            Some(pct(1) <= 2.0),
        ));
        rescan.stop();
    }
    watch.stop();
    Ok(rows)
}

/// SoftHSM2's PKCS#11 module: `$SOFTHSM2_MODULE`, else Debian's and Fedora's paths.
fn softhsm_module() -> Result<std::path::PathBuf> {
    if let Some(p) = std::env::var_os("SOFTHSM2_MODULE").filter(|p| !p.is_empty()) {
        return Ok(p.into());
    }
    [
        "/usr/lib/softhsm/libsofthsm2.so",
        "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
        "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
        "/usr/lib64/pkcs11/libsofthsm2.so",
    ]
    .iter()
    .map(std::path::PathBuf::from)
    .find(|p| p.is_file())
    .context("SoftHSM2's libsofthsm2.so not found (set SOFTHSM2_MODULE)")
}

fn run_quiet(cmd: &mut Command) -> Result<()> {
    let out = cmd.stdout(Stdio::null()).stderr(Stdio::piped()).output()?;
    if !out.status.success() {
        bail!(
            "{} failed: {}",
            util::describe(cmd),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

fn clock_ticks() -> Result<f64> {
    let out = output(Command::new("getconf").arg("CLK_TCK"))?;
    out.trim().parse().context("getconf CLK_TCK")
}

/// utime + stime of a process, in clock ticks (/proc/PID/stat fields 14 and 15).
fn cpu_ticks(pid: u32) -> Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name (field 2) may hold spaces: count from its closing parenthesis.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("odd /proc/PID/stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state): field N is fields[N - 3].
    let utime: u64 = fields.get(11).context("no utime")?.parse()?;
    let stime: u64 = fields.get(12).context("no stime")?.parse()?;
    Ok(utime + stime)
}

// ---------------------------------------------------------------- diagnose

fn diagnose(opts: &Opts) -> Result<Vec<Row>> {
    if !demo::has_command(PROFILE, "diagnose") {
        bail!("this build of `ukey` has no `diagnose` command");
    }
    let runs = if opts.quick { 7 } else { 21 };
    let world = demo::make_world(PROFILE, "DIAG", "张三", 200)?;
    let hsm = world.hsm_dir();
    let cmd = || {
        let mut c = world.cmd("ukey");
        c.args(["diagnose", "--json", "--trust"])
            .arg(hsm.join("root-ca.pem"))
            .arg("--trust")
            .arg(&world.fixtures_ca)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        c
    };
    // Once untimed: page cache (binary, modules, token files).
    let first = cmd().output()?;
    let report = String::from_utf8_lossy(&first.stdout);
    if !report.starts_with('{') || !report.contains(&world.token_serial) {
        bail!(
            "`ukey diagnose --json` printed no report ({}): {}",
            first.status,
            String::from_utf8_lossy(&first.stderr)
        );
    }
    let mut times = Vec::new();
    for _ in 0..runs {
        check_interrupted()?;
        let s = Instant::now();
        let _ = cmd().output()?;
        times.push(s.elapsed().as_secs_f64() * 1e3);
    }
    let m = median(&times);
    Ok(vec![Row::measured(
        "`ukey diagnose`, one key",
        m,
        "ms",
        format!(
            "median of {runs} whole processes on the ukey-sim module, max {:.0} ms",
            percentile(&times, 1.0)
        ),
        "<= 300 ms",
        Some(m <= 300.0),
    )])
}

// ---------------------------------------------------------------- portal

fn portal(opts: &Opts) -> Result<Vec<Row>> {
    let issues = if opts.quick { "1000" } else { "3000" };
    let mut rows = Vec::new();
    // EC: the store on SQLite, on PostgreSQL with one instance and with two, in one
    // process one after the other (same machine load, comparable figures).
    for (name, alg, stores) in [
        ("portal issuances/s", "EC-P256", "sqlite,postgres,postgres2"),
        ("portal SM2 issuances/s (SM2 CA, SM2 CSRs)", "SM2", "sqlite"),
    ] {
        let out = output(
            cargo()
                .args(["bench", "-p", "ukey-portal", "--bench", "issue"])
                .env("UKEY_BENCH_ISSUES", issues)
                .env("UKEY_BENCH_ALG", alg)
                .env("UKEY_BENCH_STORES", stores),
        )?;
        print!("{out}");
        let sittings = portal_sittings(&out);
        if sittings.len() != stores.split(',').count() {
            bail!("unexpected output of the portal benchmark:\n{out}");
        }
        for (header, rate, p50, p99) in sittings {
            let store = header.split(", ").nth(4).unwrap_or("?").to_owned();
            rows.push(Row::measured(
                &format!("{name}, {store}"),
                rate,
                "/s",
                format!("p50 {p50:.1} ms, p99 {p99:.1} ms; {header}"),
                ">= 500/s",
                Some(rate >= 500.0),
            ));
        }
    }
    Ok(rows)
}

/// Each sitting of the portal benchmark: (its header, rate, p50 ms, p99 ms).
fn portal_sittings(out: &str) -> Vec<(String, f64, f64, f64)> {
    out.split("issue benchmark [")
        .skip(1)
        .filter_map(|block| {
            let header = block.lines().next()?.split_once("]: ")?.1.to_owned();
            let (rate, p50, p99) = parse_portal(block)?;
            Some((header, rate, p50, p99))
        })
        .collect()
}

/// From "  1221 issuances/s over 2.46s; latency p50 12.34ms, p99 30.01ms, max ...":
/// (rate, p50 ms, p99 ms).
fn parse_portal(out: &str) -> Option<(f64, f64, f64)> {
    let line = out.lines().find(|l| l.contains("issuances/s"))?;
    let rate: f64 = line.split_whitespace().next()?.parse().ok()?;
    let after = |key: &str| -> Option<f64> {
        let rest = &line[line.find(key)? + key.len()..];
        let tok = rest.split([',', ';']).next()?.trim();
        duration_ms(tok)
    };
    Some((rate, after("p50 ")?, after("p99 ")?))
}

/// A `Debug`-formatted Duration ("12.34ms", "1.20s", "850.00µs", "3ns") in ms.
fn duration_ms(s: &str) -> Option<f64> {
    let s = s.trim();
    let (num, scale) = if let Some(n) = s.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix("µs").or_else(|| s.strip_suffix("us")) {
        (n, 1e-3)
    } else if let Some(n) = s.strip_suffix("ns") {
        (n, 1e-6)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1e3)
    } else {
        return None;
    };
    num.trim().parse::<f64>().ok().map(|v| v * scale)
}

// ---------------------------------------------------------------- memory

fn memory() -> Result<Vec<Row>> {
    let script = workspace_root().join("tests/e2e/run.sh");
    if !script.is_file() {
        bail!("tests/e2e/run.sh does not exist yet");
    }
    setup::setup(&[Part::App, Part::E2e])?;
    let mut c = Command::new("bash");
    c.arg(&script)
        .arg("--memory")
        .current_dir(workspace_root())
        .env("UKEY_E2E_PROFILE", PROFILE);
    if let Some(d) = setup::tauri_driver() {
        c.env("TAURI_DRIVER_BIN", d);
    }
    let out = output(&mut c)?;
    print!("{out}");
    let v = json_lines(&out)
        .into_iter()
        .rev()
        .find(|v| v["pss_mib"].is_number())
        .context("tests/e2e/run.sh --memory printed no JSON line with pss_mib")?;
    let pss = v["pss_mib"].as_f64().unwrap_or(f64::NAN);
    let rss = v["rss_mib"].as_f64().unwrap_or(f64::NAN);
    let n = v["processes"].as_array().map(Vec::len).unwrap_or(0);
    let bare_pss = v["bare"]["pss_mib"]
        .as_f64()
        .context("tests/e2e/run.sh --memory printed no bare window figure")?;
    let bare_rss = v["bare"]["rss_mib"].as_f64().unwrap_or(f64::NAN);
    let ratio = pss / bare_pss;
    Ok(vec![Row::measured(
        "desktop app memory after start vs a bare Tauri 2 window",
        ratio,
        "×",
        format!(
            "app {pss:.0} MiB PSS ({rss:.0} MiB RSS) over {n} processes (main + WebKit), one key listed; bare window {bare_pss:.0} MiB PSS ({bare_rss:.0} MiB RSS); same run, {PROFILE} builds"
        ),
        "<= 1.15×",
        Some(ratio <= 1.15),
    )])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn portal_sittings_parse() {
        let out = "prepared 10 orders\nissue benchmark [sqlite]: 10 renewals (0 failed), 16 clients, EC-P256 keys, EC P-256 CA, SQLite, 2 cores\n  \
                   900 issuances/s over 1.00s; latency p50 2.00ms, p99 9.00ms, max 9.50ms\n\
                   issue benchmark [postgres2]: 10 renewals (0 failed), 16 clients, EC-P256 keys, EC P-256 CA, PostgreSQL (2 instances), 2 cores\n  \
                   600 issuances/s over 1.00s; latency p50 3.00ms, p99 12.00ms, max 20ms\n";
        let s = portal_sittings(out);
        assert_eq!(s.len(), 2);
        assert_eq!((s[0].1, s[0].2, s[0].3), (900.0, 2.0, 9.0));
        assert!(s[1].0.contains("PostgreSQL (2 instances)"), "{}", s[1].0);
        assert_eq!(s[1].1, 600.0);
        assert!(portal_sittings("issue benchmark [x]: no figures\n").is_empty());
    }

    #[test]
    fn portal_output_parses() {
        let out = "issue benchmark: 3000 renewals (0 failed), 16 clients, EC-P256 keys, EC P-256 CA, 2 cores\n  \
                   1221 issuances/s over 2.46s; latency p50 12.34ms, p99 1.20s, max 1.50s\n";
        let (rate, p50, p99) = parse_portal(out).expect("parses");
        assert_eq!(rate, 1221.0);
        assert!((p50 - 12.34).abs() < 1e-9);
        assert!((p99 - 1200.0).abs() < 1e-9);
        assert_eq!(parse_portal("nothing here"), None);
    }

    #[test]
    fn debug_durations_in_ms() {
        assert_eq!(duration_ms("850.00µs"), Some(0.85));
        assert_eq!(duration_ms("2s"), Some(2000.0));
        assert_eq!(duration_ms("3.5ms"), Some(3.5));
        assert_eq!(duration_ms("fast"), None);
    }

    #[test]
    fn cpu_ticks_of_this_process() {
        // Burn a little CPU: the counter must not go backwards and must be readable.
        let a = cpu_ticks(std::process::id()).expect("stat");
        let mut x = 0u64;
        for i in 0..20_000_000u64 {
            x = x.wrapping_add(i ^ (x >> 3));
        }
        assert!(x != 1);
        let b = cpu_ticks(std::process::id()).expect("stat");
        assert!(b >= a);
    }
}
