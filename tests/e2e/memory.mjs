// Memory of the desktop app after start with one key listed, and in the same run of a
// bare Tauri 2 window (src-tauri/examples/bare_window.rs: same Tauri build, same window
// size, an empty page) as the yardstick: RSS and PSS of the main process plus its
// WebKit processes (every descendant), from /proc/PID/smaps_rollup. For the benchmark
// suite; run through `tests/e2e/run.sh --memory` (Xvfb, D-Bus).
//
// Prints a table per program and, last, one JSON line:
//   {"app":"ukey-desktop","keys":1,"rss_mib":..., "pss_mib":..., "processes":[...],
//    "bare":{"rss_mib":..., "pss_mib":..., "processes":[...]}, "ratio_pss":...}
import { spawn, execFileSync } from 'node:child_process';
import { mkdtempSync, mkdirSync, readFileSync, readdirSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

const need = (n) => {
  if (!process.env[n]) throw new Error(`${n} is not set (run tests/e2e/run.sh --memory)`);
  return process.env[n];
};
const BIN = need('UKEY_DESKTOP_BIN');
const FIXTURES = need('SOFTHSM_FIXTURES_BIN');
const SIM_MODULE = need('UKEY_SIM_MODULE_PATH');
const BARE = need('UKEY_BARE_WINDOW_BIN');
const SETTLE_MS = Number(process.env.MEMORY_SETTLE_MS || 4000);

const work = mkdtempSync(join(process.env.E2E_TMP || tmpdir(), 'ukey-mem-'));
const hsm = join(work, 'hsm');
mkdirSync(join(work, 'home/.config'), { recursive: true });
const env = {
  ...process.env,
  HOME: join(work, 'home'),
  XDG_CONFIG_HOME: join(work, 'home/.config'),
  XDG_DATA_HOME: join(work, 'home/.local/share'),
  SOFTHSM2_CONF: join(hsm, 'softhsm2.conf'),
  UKEY_SIM_STATE: join(work, 'sim'),
  UKEY_PKCS11_MODULE: SIM_MODULE,
  UKEY_CONFIG_DIR: join(work, 'config'),
  UKEY_DATA_DIR: join(work, 'data'),
  UKEY_LOG: 'info',
};
execFileSync(FIXTURES, ['--dir', hsm, 'create', '--label', 'UKey-M', '--cn', '张三', '--json'], { env, stdio: ['ignore', 'pipe', 'inherit'] });

function descendants(root) {
  const parent = new Map();
  for (const d of readdirSync('/proc')) {
    if (!/^\d+$/.test(d)) continue;
    try {
      const stat = readFileSync(`/proc/${d}/stat`, 'utf8');
      const ppid = Number(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[1]);
      parent.set(Number(d), ppid);
    } catch {}
  }
  const out = [root];
  for (let i = 0; i < out.length; i++) for (const [p, pp] of parent) if (pp === out[i]) out.push(p);
  return out;
}

function usage(pid) {
  const comm = readFileSync(`/proc/${pid}/comm`, 'utf8').trim();
  const rollup = readFileSync(`/proc/${pid}/smaps_rollup`, 'utf8');
  const kib = (k) => Number(rollup.match(new RegExp(`^${k}:\\s+(\\d+) kB`, 'm'))?.[1] ?? 0);
  return { pid, comm, rss_kib: kib('Rss'), pss_kib: kib('Pss') };
}

const mib = (k) => Math.round((k / 1024) * 10) / 10;

// Starts `bin`, waits until `ready` appears on its stderr and then SETTLE_MS, and
// measures it and its descendants.
async function measure(bin, ready, label) {
  const child = spawn(bin, [], { env, stdio: ['ignore', 'ignore', 'pipe'] });
  let stderr = '';
  try {
    await new Promise((resolve, reject) => {
      child.stderr.on('data', (d) => {
        stderr += d;
        if (stderr.includes(ready)) resolve();
      });
      child.once('exit', (c) => reject(new Error(`${label} exited with ${c}:\n${stderr}`)));
      setTimeout(() => reject(new Error(`${label}: no "${ready}" in 30 s:\n${stderr}`)), 30000);
    });
    await new Promise((r) => setTimeout(r, SETTLE_MS));
    const procs = descendants(child.pid).map((p) => {
      try {
        return usage(p);
      } catch {
        return null;
      }
    }).filter(Boolean);
    console.log(`${label}:`);
    for (const p of procs) console.log(`${String(p.pid).padStart(8)}  ${p.comm.padEnd(24)} RSS ${mib(p.rss_kib)} MiB  PSS ${mib(p.pss_kib)} MiB`);
    const rss = procs.reduce((a, p) => a + p.rss_kib, 0);
    const pss = procs.reduce((a, p) => a + p.pss_kib, 0);
    console.log(`  total: RSS ${mib(rss)} MiB, PSS ${mib(pss)} MiB over ${procs.length} processes`);
    return { rss_mib: mib(rss), pss_mib: mib(pss), processes: procs };
  } finally {
    child.kill('SIGTERM');
    await new Promise((r) => setTimeout(r, 500));
  }
}

let code = 0;
try {
  const app = await measure(BIN, 'key inserted', 'ukey-desktop, one key listed');
  const bare = await measure(BARE, 'bare window loaded', 'bare Tauri 2 window');
  const ratio = Math.round((app.pss_mib / bare.pss_mib) * 1000) / 1000;
  console.log(`app / bare window: ${ratio} (PSS; goal <= 1.15)`);
  console.log(JSON.stringify({ app: 'ukey-desktop', keys: 1, ...app, bare, ratio_pss: ratio }));
} catch (e) {
  console.error('memory:', e.message);
  code = 1;
} finally {
  rmSync(work, { recursive: true, force: true });
}
process.exit(code);
