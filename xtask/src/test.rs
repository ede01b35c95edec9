//! `cargo xtask test`: every check the project has, in one run, ending with a summary.
//!
//! Formatting, clippy (`-D warnings`), every Rust test under nextest (one process a test:
//! SoftHSM2 is configured through a process-wide environment variable), the portal's
//! REST and CMP suites once more on PostgreSQL, doc tests, the
//! frontend tests (Vitest, in ui/), the real-window end-to-end test (tests/e2e/run.sh,
//! Xvfb) and the package: the .deb is built (release) and checked. A failing step does not
//! stop the later ones; any failure makes the exit code non-zero.

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};

use crate::setup::{self, Part};
use crate::util::{self, cargo, check_interrupted, run, workspace_root};

#[derive(Debug)]
enum Outcome {
    Passed,
    Failed(String),
    Skipped(String),
}

#[derive(Debug)]
struct Step {
    name: &'static str,
    outcome: Outcome,
    took: Duration,
}

pub fn test(args: &[String]) -> Result<()> {
    if let Some(a) = args.first() {
        bail!("`test` takes no options (got `{a}`)");
    }
    let started = Instant::now();
    let mut steps: Vec<Step> = Vec::new();
    let mut step = |name: &'static str, f: &dyn Fn() -> Result<Outcome>| {
        eprintln!("\n===== xtask test: {name} =====");
        let t = Instant::now();
        let outcome = if util::interrupted() {
            Outcome::Failed("interrupted".into())
        } else {
            match f() {
                Ok(o) => o,
                Err(e) => Outcome::Failed(format!("{e:#}")),
            }
        };
        if let Outcome::Failed(why) = &outcome {
            eprintln!("xtask test: {name} FAILED: {why}");
        }
        steps.push(Step {
            name,
            outcome,
            took: t.elapsed(),
        });
    };

    step("setup", &|| {
        setup::setup(&Part::ALL).map(|()| Outcome::Passed)
    });
    step("rustfmt --check", &|| {
        run(cargo().args(["fmt", "--all", "--check"])).map(|()| Outcome::Passed)
    });
    step("clippy -D warnings", &|| {
        run(cargo().args([
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]))
        .map(|()| Outcome::Passed)
    });
    step("nextest (Rust tests)", &|| {
        run(cargo().args([
            "nextest",
            "run",
            "--workspace",
            "--no-fail-fast",
            "--failure-output",
            "final",
        ]))
        .map(|()| Outcome::Passed)
    });
    // The portal's REST and CMP suites again, each test's portal on a PostgreSQL
    // database of its own (a server per test process, started by the harness).
    step("portal suites on PostgreSQL", &|| {
        // Selected from the workspace build (not `-p ukey-portal`, whose feature set
        // would rebuild the dependencies).
        run(cargo()
            .args([
                "nextest",
                "run",
                "--workspace",
                "-E",
                "binary_id(ukey-portal::portal) | binary_id(ukey-portal::cmp)",
                "--no-fail-fast",
                "--failure-output",
                "final",
            ])
            .env("UKEY_TEST_STORE", "postgres"))
        .map(|()| Outcome::Passed)
    });
    step("doc tests", &|| {
        run(cargo().args(["test", "--workspace", "--doc"])).map(|()| Outcome::Passed)
    });
    step("frontend tests (Vitest)", &vitest);
    step("real-window E2E (Xvfb)", &e2e);
    // Built anew every time: a .deb left in the target dir by an earlier commit would
    // prove nothing about this one.
    step("package (.deb build + check)", &|| {
        crate::package::package(&[]).map(|()| Outcome::Passed)
    });

    print_summary(&steps, started.elapsed());
    let failed = steps
        .iter()
        .filter(|s| matches!(s.outcome, Outcome::Failed(_)))
        .count();
    if failed > 0 {
        bail!("{failed} step(s) failed");
    }
    Ok(())
}

fn vitest() -> Result<Outcome> {
    let ui = workspace_root().join("ui");
    if !ui.is_dir() {
        loud_skip("ui/ does not exist: NO FRONTEND TESTS RAN");
        return Ok(Outcome::Skipped("ui/ absent".into()));
    }
    check_interrupted()?;
    run(Command::new("npm")
        .args(["test", "--silent"])
        .current_dir(&ui))?;
    Ok(Outcome::Passed)
}

fn e2e() -> Result<Outcome> {
    let dir = workspace_root().join("tests/e2e");
    if !dir.is_dir() {
        loud_skip("tests/e2e/ does not exist: NO REAL-WINDOW END-TO-END TEST RAN");
        return Ok(Outcome::Skipped("tests/e2e absent".into()));
    }
    let script = dir.join("run.sh");
    if !script.is_file() {
        bail!("tests/e2e exists but tests/e2e/run.sh does not");
    }
    check_interrupted()?;
    let mut cmd = Command::new("bash");
    cmd.arg(&script).current_dir(workspace_root());
    if let Some(driver) = setup::tauri_driver() {
        cmd.env("TAURI_DRIVER_BIN", driver);
    }
    run(&mut cmd)?;
    Ok(Outcome::Passed)
}

fn loud_skip(what: &str) {
    let bar = "!".repeat(72);
    eprintln!("{bar}\nxtask test: SKIPPED: {what}\n{bar}");
}

fn print_summary(steps: &[Step], total: Duration) {
    println!("\n===== xtask test summary =====");
    for s in steps {
        let (mark, note) = match &s.outcome {
            Outcome::Passed => ("PASS", String::new()),
            Outcome::Failed(why) => ("FAIL", first_line(why)),
            Outcome::Skipped(why) => ("SKIP", first_line(why)),
        };
        println!(
            "{mark}  {:<26} {:>8.1}s  {note}",
            s.name,
            s.took.as_secs_f64()
        );
    }
    let count = |f: fn(&Outcome) -> bool| steps.iter().filter(|s| f(&s.outcome)).count();
    println!(
        "xtask test steps: {} passed, {} failed, {} skipped, in {:.0}s",
        count(|o| matches!(o, Outcome::Passed)),
        count(|o| matches!(o, Outcome::Failed(_))),
        count(|o| matches!(o, Outcome::Skipped(_))),
        total.as_secs_f64()
    );
}

fn first_line(s: &str) -> String {
    let line = s.lines().next().unwrap_or("");
    if line.chars().count() > 100 {
        format!("{}…", line.chars().take(100).collect::<String>())
    } else {
        line.to_owned()
    }
}
