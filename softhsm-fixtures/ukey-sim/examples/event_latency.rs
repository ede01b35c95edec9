//! Benchmark: how long from pulling out (or plugging in) a simulated key until the
//! application hears of it, through a blocking C_WaitForSlotEvent and through
//! ukey-token's watcher polling every 10 ms.
//!
//! `cargo run -p ukey-sim --example event_latency [-- ROUNDS]` (build the module first:
//! `cargo build -p ukey-sim`). Prints min / median / max per path.

use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use softhsm_fixtures::{SoftHsm, TokenSpec};
use ukey_sim::Control;
use ukey_token::{WatchMode, Watcher};

fn main() -> Result<()> {
    let rounds: usize = match std::env::args().nth(1) {
        Some(n) => n.parse().context("ROUNDS must be a number")?,
        None => 20,
    };
    let hsm = SoftHsm::new()?;
    let token = hsm.create_token(&TokenSpec::empty("BENCH"))?;
    // With UKEY_SIM_STATE unset, the module and Control both use the directory next to
    // SOFTHSM2_CONF, which activate() has just set.
    hsm.activate();
    let control = Control::from_env()?;
    let module = ukey_sim::module_path()?;
    println!("module {}", module.display());
    println!("state  {}", control.dir().display());

    let blocking = blocking_wait(&module, &control, &token.serial, rounds)?;
    report("C_WaitForSlotEvent (blocking)", &blocking);
    let watcher = watcher(&module, &control, &token.serial, rounds)?;
    report("ukey-token Watcher (10 ms poll)", &watcher);
    Ok(())
}

fn blocking_wait(
    module: &std::path::Path,
    control: &Control,
    serial: &str,
    rounds: usize,
) -> Result<Vec<Duration>> {
    let pkcs11 = Pkcs11::new(module)?;
    pkcs11.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))?;
    let mut times = Vec::new();
    for round in 0..rounds * 2 {
        let (tx, rx) = mpsc::channel();
        let waiter = pkcs11.clone();
        let thread = std::thread::spawn(move || {
            let result = waiter.wait_for_slot_event();
            let _ = tx.send((result.is_ok(), Instant::now()));
        });
        // Let the waiter block first, at a random point of its 20 ms poll.
        std::thread::sleep(Duration::from_millis(30 + (round as u64 * 7) % 20));
        let changed = Instant::now();
        if round % 2 == 0 {
            control.unplug(serial)?;
        } else {
            control.plug(serial)?;
        }
        let (ok, woke) = rx.recv_timeout(Duration::from_secs(5))?;
        if !ok {
            bail!("C_WaitForSlotEvent failed");
        }
        times.push(woke - changed);
        let _ = thread.join();
    }
    pkcs11.finalize()?;
    Ok(times)
}

fn watcher(
    module: &std::path::Path,
    control: &Control,
    serial: &str,
    rounds: usize,
) -> Result<Vec<Duration>> {
    let mut watcher = Watcher::new(ukey_token::Module::load(module)?, WatchMode::Auto);
    if watcher.mode() != WatchMode::SlotEvents {
        bail!("watcher chose {:?}, not slot events", watcher.mode());
    }
    watcher.poll()?;
    let mut times = Vec::new();
    for round in 0..rounds * 2 {
        // The key changes while the watcher is already waiting, at a varying point
        // of its poll interval.
        let control = control.clone();
        let serial = serial.to_owned();
        let changer = std::thread::spawn(move || -> Result<Instant> {
            std::thread::sleep(Duration::from_millis(15 + (round as u64 * 3) % 10));
            let changed = Instant::now();
            if round % 2 == 0 {
                control.unplug(&serial)?;
            } else {
                control.plug(&serial)?;
            }
            Ok(changed)
        });
        let events = watcher.wait(Duration::from_millis(10), Duration::from_secs(5))?;
        let seen = Instant::now();
        let changed = changer
            .join()
            .map_err(|_| anyhow::anyhow!("changer thread panicked"))??;
        if events.is_empty() {
            bail!("no event within 5 s");
        }
        times.push(seen - changed);
    }
    Ok(times)
}

fn report(what: &str, times: &[Duration]) {
    let mut sorted = times.to_vec();
    sorted.sort();
    let (Some(min), Some(max)) = (sorted.first(), sorted.last()) else {
        return;
    };
    let median = sorted[sorted.len() / 2];
    println!(
        "{what}: {} events, min {min:.1?}, median {median:.1?}, max {max:.1?}",
        sorted.len()
    );
}
