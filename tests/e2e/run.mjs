// Real-window end-to-end test of ukey-desktop: the built app under Xvfb, driven by
// WebdriverIO through tauri-driver + WebKitWebDriver, with SoftHSM2 tokens behind
// ukey-sim (hot-plug, faults, PIN lockout) and the reference portal on loopback.
//
// Started by run.sh (which builds everything and wraps this in xvfb-run and
// dbus-run-session). Prints "N passed, N failed" and exits non-zero on any failure.
//
//   node run.mjs [scenario ...]     (default: all, in order)
//
// Environment from run.sh: UKEY_DESKTOP_BIN, UKEY_SIM_BIN, UKEY_SIM_MODULE_PATH,
// UKEY_PORTAL_BIN, SOFTHSM_FIXTURES_BIN, TAURI_DRIVER_BIN.
import { spawn, execFileSync } from 'node:child_process';
import { mkdtempSync, mkdirSync, writeFileSync, readFileSync, readdirSync, existsSync, statSync, chmodSync, rmSync, openSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';
import { inflateSync } from 'node:zlib';
import { createInterface } from 'node:readline';
import { remote } from 'webdriverio';

const HERE = dirname(fileURLToPath(import.meta.url));
const SHOTS = join(HERE, 'screenshots');
const need = (name) => {
  const v = process.env[name];
  if (!v) throw new Error(`${name} is not set (run tests/e2e/run.sh)`);
  return v;
};
const BIN = need('UKEY_DESKTOP_BIN');
const SIM = need('UKEY_SIM_BIN');
const SIM_MODULE = need('UKEY_SIM_MODULE_PATH');
const PORTAL = need('UKEY_PORTAL_BIN');
const FIXTURES = need('SOFTHSM_FIXTURES_BIN');
const DRIVER = need('TAURI_DRIVER_BIN');
const UKEY = need('UKEY_CLI_BIN');
const PIN = '123456';

const work = mkdtempSync(join(process.env.E2E_TMP || tmpdir(), 'ukey-e2e-'));
const hsmDir = join(work, 'hsm');
const simState = join(work, 'sim');
const portalData = join(work, 'portal');
const home = join(work, 'home');
const binDir = join(work, 'bin');
const openedFile = join(work, 'opened-urls.txt');
// A home like a real user's: ~/.config exists (the autostart entry goes below it).
for (const d of [join(home, '.config'), binDir, simState, SHOTS]) mkdirSync(d, { recursive: true });

const log = (...a) => console.log('[e2e]', ...a);
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

function run(cmd, args, env = {}) {
  return execFileSync(cmd, args, { env: { ...process.env, ...env }, encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
}

// ---- the world: tokens, portal -------------------------------------------------

const hsmEnv = () => ({ SOFTHSM2_CONF: join(hsmDir, 'softhsm2.conf') });
const sim = (...args) => run(SIM, ['--state', simState, ...args], hsmEnv());

/** Creates a token (unplugged) with one signing certificate. */
function createToken(label, cn, days = 10) {
  const out = run(FIXTURES, ['--dir', hsmDir, 'create', '--label', label, '--pin', PIN, '--cn', cn, '--days', String(days), '--json']);
  const t = JSON.parse(out);
  sim('unplug', t.serial);
  return { serial: t.serial, label, cn, certSerial: t.certs[0].serial_hex };
}

function ca() {
  const out = run(FIXTURES, ['--dir', hsmDir, 'ca']);
  const kv = Object.fromEntries(out.trim().split('\n').map((l) => l.split('=')));
  return kv;
}

let portal;
let portalUrl;
function portalCli(...args) {
  return run(PORTAL, ['--data', portalData, ...args]).trim();
}
/** Starts `ukey-portal serve` with `args`; resolves to [process, URL]. */
async function servePortal(args) {
  const p = spawn(PORTAL, args, { stdio: ['ignore', 'pipe', 'inherit'] });
  const rl = createInterface({ input: p.stdout });
  const url = await new Promise((resolve, reject) => {
    rl.once('line', (l) => resolve(l.trim()));
    p.once('exit', (c) => reject(new Error(`portal exited ${c}`)));
    setTimeout(() => reject(new Error('portal did not print its URL')), 20000);
  });
  rl.on('line', () => {});
  return [p, url];
}
async function startPortal(caFiles) {
  [portal, portalUrl] = await servePortal(['--data', portalData, 'serve', '--listen', '127.0.0.1:0', '--ca-cert', caFiles.issuing_cert, '--ca-key', caFiles.issuing_key]);
  log('portal at', portalUrl);
}
let sm2Portal;
const order = (token, state, extra = []) =>
  portalCli('order', 'create', '--serial', token.certSerial, '--state', state, ...extra);

// ---- the app, through tauri-driver ----------------------------------------------

let driver;
/** Ends the app's WebDriver session and tauri-driver (if any), then starts both with `env`. */
async function restartApp(env) {
  await browser?.deleteSession().catch(() => {});
  driver?.kill('SIGTERM');
  await new Promise((r) => (driver ? driver.once('exit', r) : r()));
  // An app whose page crashed outlives its session; being single-instance, it would
  // take the next start's place. None of ours may be left.
  try {
    execFileSync('pkill', ['-TERM', '-f', `^${BIN}( |$)`]);
    await sleep(500);
  } catch {}
  await startDriver(env);
  browser = await remote({
    hostname: '127.0.0.1',
    port: 4444,
    logLevel: 'warn',
    capabilities: { 'tauri:options': { application: BIN } },
  });
  await browser.setWindowSize?.(1000, 760).catch(() => {});
}
async function startDriver(env) {
  driver = spawn(DRIVER, ['--port', '4444', '--native-port', '4445'], { env, stdio: ['ignore', 'inherit', 'inherit'] });
  for (let i = 0; i < 100; i++) {
    try {
      const r = await fetch('http://127.0.0.1:4444/status');
      if (r.ok || r.status < 500) return;
    } catch {}
    await sleep(100);
  }
  throw new Error('tauri-driver did not start');
}

let browser;
let notifyMonitor;
let appEnvForSecond;
let caRoot;
const notifyLog = join(work, 'notifications.txt');
const $t = (id) => browser.$(`[data-testid="${id}"]`);

async function waitFor(fn, what, timeout = 15000) {
  const start = Date.now();
  let last;
  while (Date.now() - start < timeout) {
    try {
      const v = await fn();
      if (v) return v;
    } catch (e) {
      last = e;
    }
    await sleep(50);
  }
  throw new Error(`timed out waiting for ${what}${last ? `: ${last.message}` : ''}`);
}

const textOf = async (id) => (await $t(id)).getText();
async function visible(id) {
  const el = await $t(id);
  return (await el.isExisting()) && (await el.isDisplayed());
}
async function waitText(id, needle, timeout) {
  return waitFor(async () => (await visible(id)) && (await textOf(id)).includes(needle), `${id} to contain ${JSON.stringify(needle)}`, timeout);
}
async function click(id) {
  await waitFor(() => visible(id), `${id} to show`);
  await (await $t(id)).click();
}

// ---- screenshots, checked not blank ---------------------------------------------

function pngLooksReal(path) {
  const buf = readFileSync(path);
  if (buf.length < 8000) return `only ${buf.length} bytes`;
  if (buf.readUInt32BE(0) !== 0x89504e47) return 'not a PNG';
  const width = buf.readUInt32BE(16);
  const height = buf.readUInt32BE(20);
  const idat = [];
  for (let off = 8; off < buf.length; ) {
    const len = buf.readUInt32BE(off);
    const type = buf.toString('ascii', off + 4, off + 8);
    if (type === 'IDAT') idat.push(buf.subarray(off + 8, off + 8 + len));
    off += 12 + len;
  }
  const raw = inflateSync(Buffer.concat(idat));
  // Distinct byte values over the (filtered) scanlines: a single-colour image has a
  // handful, a window with text has hundreds.
  const seen = new Set();
  for (let i = 0; i < raw.length; i += 7) seen.add(raw[i]);
  if (seen.size < 40) return `looks blank (${seen.size} distinct byte values, ${width}x${height})`;
  return null;
}

const shots = [];
async function shot(name) {
  const path = join(SHOTS, `${name}.png`);
  // The window may not have painted yet (a loaded machine): try again for a while
  // before calling it blank.
  let bad = null;
  for (let i = 0; i < 20; i++) {
    rmSync(path, { force: true });
    await browser.saveScreenshot(path);
    bad = pngLooksReal(path);
    if (!bad) break;
    await new Promise((r) => setTimeout(r, 250));
  }
  if (bad) throw new Error(`screenshot ${name}: ${bad}`);
  shots.push(path);
  log('screenshot', path, statSync(path).size, 'bytes');
}

// ---- scenarios ------------------------------------------------------------------

const tokens = {};
function plugged(...which) {
  // Only these tokens in; every other one out.
  for (const [name, t] of Object.entries(tokens)) {
    if (!which.includes(name)) sim('unplug', t.serial);
  }
  for (const name of which) sim('plug', tokens[name].serial);
}

async function keyCount() {
  return (await browser.$$('[data-testid="key"]')).length;
}

async function enterPinAndSubmit(pin) {
  const input = await waitFor(async () => ((await visible('pin-input')) ? $t('pin-input') : null), 'PIN input');
  await input.setValue(pin);
  await browser.keys('Enter');
}

async function renewFromButton(buttonId, pin = PIN) {
  await click(buttonId);
  await click('continue');
  await enterPinAndSubmit(pin);
}

const scenarios = {
  async empty() {
    await waitFor(() => visible('no-keys'), 'the "insert your UKey" screen');
    if (!(await textOf('no-keys')).includes('请插入 UKey')) throw new Error('no "请插入 UKey"');
    // Autostart is opt-out: the first start registered it with the desktop.
    const autostart = join(home, '.config', 'autostart');
    await waitFor(() => existsSync(autostart) && readdirSync(autostart).some((f) => f.endsWith('.desktop')), 'the autostart entry');
    await shot('01-no-key');
  },

  async banner() {
    const t0 = Date.now();
    plugged('a');
    await waitText('banner', '证书有可用更新 — 立即更新', 5000);
    // A figure, not a timed test (the machine is shared): `cargo xtask bench` measures
    // insert-to-notification latency over many inserts.
    const ms = Date.now() - t0;
    log(`banner ${ms} ms after ukey-sim plug`);
    const row = await textOf('cert');
    for (const want of ['张三', tokens.a.certSerial, '剩余', 'RSA-2048']) {
      if (!row.includes(want)) throw new Error(`listing lacks ${want}: ${row}`);
    }
    await shot('02-key-listed-banner');
  },

  async renew() {
    plugged('a');
    await waitText('banner', '证书有可用更新');
    await click('banner-renew');
    await waitText('consequences', '将被 CA 吊销');
    await shot('03-consequences');
    await click('continue');
    await waitFor(() => visible('pin-input'), 'PIN dialog');
    await shot('04-pin');
    // Slow the certificate write down so the progress view can be seen and checked.
    sim('latency', tokens.a.serial, '--function', 'C_CreateObject', '--ms', '1500');
    await enterPinAndSubmit(PIN);
    await waitText('do-not-pull', '请勿拔出', 30000);
    const steps = await textOf('steps');
    for (const want of ['验证 PIN', '向 CA 申请新证书', '校验新证书', '写入新证书']) {
      if (!steps.includes(want)) throw new Error(`progress lacks step ${want}: ${steps}`);
    }
    await sleep(300);
    await shot('05-progress');
    sim('latency', tokens.a.serial, '--function', 'C_CreateObject', '--ms', '0');
    await waitText('result-title', '证书已更新', 60000);
    if (!(await textOf('self-test')).includes('测试签名成功')) throw new Error('no test signature success');
    await shot('06-renewed');
    await click('close');
    await waitFor(async () => !(await visible('banner')), 'banner to go');
  },

  async 'wrong-pin'() {
    sim('pin-tries', tokens.b.serial, '--max', '3');
    plugged('b');
    await waitText('banner', '证书有可用更新');
    await renewFromButton('banner-renew', '000000');
    await waitText('pin-error', 'PIN 不正确', 30000);
    await waitText('pin-wrong-count', '1 次');
    await shot('07-wrong-pin');
    // The app does not retry: the field is empty and waits for the user.
    const value = await (await $t('pin-input')).getValue();
    if (value !== '') throw new Error('PIN field not cleared');
    await enterPinAndSubmit('000001');
    await waitText('pin-wrong-count', '2 次', 30000);
    await waitText('pin-final-try', '最后一次机会');
    await shot('08-last-try');
    await enterPinAndSubmit(PIN);
    await waitText('result-title', '证书已更新', 60000);
    await click('close');
  },

  async pulled() {
    plugged('c');
    await waitText('banner', '证书有可用更新');
    sim('fault', tokens.c.serial, '--function', 'C_CreateObject', '--unplug');
    await renewFromButton('banner-renew');
    await waitText('plug-back', '请重新插入 UKey', 60000);
    await shot('09-pulled-mid-renewal');
    sim('plug', tokens.c.serial);
    await waitFor(() => visible('pin-input'), 'PIN dialog after the key is back', 10000);
    await enterPinAndSubmit(PIN);
    await waitText('result-title', '证书已更新', 60000);
    await shot('10-resumed');
    await click('close');
  },

  async 'awaiting-payment'() {
    plugged('d');
    await waitFor(async () => (await keyCount()) === 1 && (await textOf('status-text')) === '续期订单待付款', 'awaiting payment state');
    await shot('11-awaiting-payment');
    await click('pay');
    const url = await waitFor(() => existsSync(openedFile) && readFileSync(openedFile, 'utf8').trim(), 'the payment page to be opened');
    if (!url.includes(`serial=${tokens.d.certSerial}`) || !url.startsWith(portalUrl)) {
      throw new Error(`opened ${url}, expected ${portalUrl}/pay?serial=${tokens.d.certSerial}`);
    }
    log('opened', url);
  },

  async 'two-keys'() {
    plugged('e', 'f');
    await waitFor(async () => (await keyCount()) === 2, 'two keys listed');
    await waitText('banner', '2 张证书有可用更新');
    await shot('12-two-keys');
    await click('renew-all');
    for (let i = 0; i < 2; i++) {
      await click('continue');
      await enterPinAndSubmit(PIN);
      await waitText('result-title', '证书已更新', 60000);
      await click('close');
    }
    await waitFor(async () => !(await visible('banner')), 'banner to go after renewing both');
  },

  async 'shared-serial'() {
    // A module that numbers every key alike: keys E and F both report 0000000000000000.
    for (const n of ['e', 'f']) sim('token-info', tokens[n].serial, '--serial-hex', '30'.repeat(16));
    plugged('e', 'f');
    const ids = async () => browser.$$('[data-testid="key"]').map((e) => e.getAttribute('data-key-id'));
    await waitFor(async () => {
      const now = await ids();
      return now.length === 2 && now[0] !== now[1] && now.every((i) => i.startsWith('0000000000000000@'));
    }, 'two keys with one serial, told apart');
    await sleep(200);
    await shot('12b-shared-serial');
    for (const n of ['e', 'f']) sim('token-info', tokens[n].serial);
    await waitFor(async () => (await ids()).every((i) => !i.includes('@')), 'the keys report their own serials again');
  },

  async 'slow-key'() {
    // Key K is as slow as a real one (ukey-sim's usb-key profile: about 5 s for an RSA
    // key pair, 270 ms a signature, tens of ms an object write). While its chip works,
    // the app still shows a key plugged in and pulled out, and the progress moves.
    sim('profile', tokens.k.serial, 'usb-key');
    plugged('k');
    await waitText('banner', '证书有可用更新');
    await renewFromButton('banner-renew');
    await waitFor(() => visible('steps'), 'the progress view');
    const done = async () => Number(await (await browser.$('[role="progressbar"]')).getAttribute('aria-valuenow'));
    const first = await done();
    sim('plug', tokens.l.serial);
    await waitFor(async () => (await keyCount()) === 2, 'key L listed while key K renews', 10000);
    if (await visible('result-title')) throw new Error('key K finished before key L was listed: nothing shown about a busy app');
    // Listing again (for L) finds K's journal unfinished: a renewal running here is
    // not an interrupted one.
    const cardK = await (await browser.$(`[data-testid="key"][data-token-serial="${tokens.k.serial}"]`)).getText();
    if (cardK.includes('完成更新')) throw new Error(`the running renewal is shown as interrupted: ${cardK}`);
    await shot('16-slow-key-insert-during-renewal');
    sim('unplug', tokens.l.serial);
    await waitFor(async () => (await keyCount()) === 1, 'key L gone while key K renews', 10000);
    if (await visible('result-title')) throw new Error('key K finished before key L was gone');
    await waitFor(async () => (await visible('result-title')) || (await done()) > first, 'the progress to move on', 30000);
    await waitText('result-title', '证书已更新', 60000);
    await click('close');
    sim('profile', tokens.k.serial, 'none');
  },

  async 'cli-then-app'() {
    // `ukey renew` loses its key while writing; the app finds the unfinished journal
    // when the key comes back and finishes the renewal (the same engine, one journal).
    plugged('j');
    await waitFor(async () => (await keyCount()) === 1, 'key J listed');
    sim('fault', tokens.j.serial, '--function', 'C_CreateObject', '--unplug');
    let failed = false;
    try {
      execFileSync(UKEY, ['renew', '--portal', portalUrl, '--token', tokens.j.serial, '--pin-stdin', '--yes', '--trust', caRoot, '--lang', 'zh-CN'], {
        env: { ...appEnvForSecond },
        input: `${PIN}\n`,
        encoding: 'utf8',
        stdio: ['pipe', 'pipe', 'pipe'],
      });
    } catch (e) {
      failed = true;
      log('ukey renew stopped as expected:', String(e.stderr || '').trim().split('\n').pop());
    }
    if (!failed) throw new Error('ukey renew did not stop when the key was pulled');
    await waitFor(async () => (await keyCount()) === 0, 'key J gone');
    sim('plug', tokens.j.serial);
    await waitFor(() => visible('pin-input'), 'the app offering to finish the renewal', 10000);
    await enterPinAndSubmit(PIN);
    await waitText('result-title', '证书已更新', 60000);
    await click('close');
  },

  async 'other-states'() {
    // Rejected (with the reviewer's reason), new key in the mail (tracking number),
    // PIN locked (who to call): each with its one action or none.
    plugged('g', 'h', 'i');
    await waitFor(async () => (await keyCount()) === 3, 'three keys listed');
    const byToken = async (t) => {
      const card = await browser.$(`[data-testid="key"][data-token-serial="${t.serial}"]`);
      return card.getText();
    };
    await waitFor(async () => (await byToken(tokens.g)).includes('续期申请被驳回：营业执照已过期'), 'rejected with reason');
    await waitFor(async () => (await byToken(tokens.h)).includes('快递单号 SF1234567890'), 'tracking number');
    // Lock key I's PIN: one try allowed, one wrong PIN.
    sim('pin-tries', tokens.i.serial, '--max', '1');
    await click('nav-settings');
    await (await $t('support')).setValue('400-800-1234');
    await click('settings-save');
    await waitFor(() => visible('settings-saved'), 'settings saved');
    // The CA's hotline is engine configuration: it goes to the config.toml the CLI
    // reads too, not to the app's settings.json.
    const toml = readFileSync(join(work, 'ukey-config.toml'), 'utf8');
    if (!/^support_contact = "400-800-1234"$/m.test(toml)) throw new Error(`config.toml: ${toml}`);
    const appFile = readFileSync(join(work, 'config', 'settings.json'), 'utf8');
    if (appFile.includes('400-800-1234')) throw new Error(`settings.json: ${appFile}`);
    await click('nav-keys');
    const renewI = await browser.$(`[data-testid="key"][data-token-serial="${tokens.i.serial}"] [data-testid="renew"]`);
    await waitFor(() => renewI.isDisplayed(), 'renew button of key I');
    await renewI.click();
    await click('continue');
    await waitText('pin-final-try', '最后一次机会');
    await enterPinAndSubmit('999999');
    await waitFor(async () => (await visible('pin-locked')) && (await textOf('pin-locked')).includes('400-800-1234'), 'PIN locked with the support phone', 30000);
    await browser.keys('Escape');
    await waitFor(async () => (await byToken(tokens.i)).includes('PIN 已锁定'), 'key card says locked');
    await sleep(200);
    await shot('15-other-states');
  },

  async 'single-instance'() {
    // A second start hands over to the running app (which shows its window) and exits.
    const second = spawn(BIN, [], { env: appEnvForSecond, stdio: 'ignore' });
    const code = await new Promise((resolve) => {
      const timer = setTimeout(() => resolve('still running'), 15000);
      second.once('exit', (c) => {
        clearTimeout(timer);
        resolve(c);
      });
    });
    if (code !== 0) {
      if (code === 'still running') second.kill('SIGTERM');
      throw new Error(`second instance: ${code}`);
    }
    // The first one still answers.
    await click('nav-keys');
  },

  async notification() {
    // The desktop notification is a D-Bus call to org.freedesktop.Notifications (no
    // daemon runs here, so the call itself is what we check, with dbus-monitor).
    const seen = readFileSync(notifyLog, 'utf8');
    if (!seen.includes('member=Notify') || !seen.includes('证书有可用更新 — 立即更新')) {
      throw new Error(`no Notify call with the title on the session bus:\n${seen.slice(0, 2000)}`);
    }
  },

  async diagnostics() {
    plugged('a');
    await waitFor(async () => (await keyCount()) === 1, 'key A listed');
    await click('nav-diagnostics');
    await waitFor(async () => (await browser.$$('[data-testid="diag-check"]')).length > 5, 'diagnosis checks', 60000);
    const kinds = await browser.$$('[data-testid="diag-section"]').map((e) => e.getAttribute('data-kind'));
    for (const want of ['environment', 'token', 'certificate', 'portal']) {
      if (!kinds.includes(want)) throw new Error(`no ${want} section in the diagnosis: ${kinds}`);
    }
    const statuses = await browser.$$('[data-testid="diag-check"]').map((e) => e.getAttribute('data-status'));
    if (!statuses.includes('pass')) throw new Error(`no passing check: ${statuses}`);
    const counts = await textOf('diag-counts');
    if (!/✓ \d+/.test(counts)) throw new Error(`counts: ${counts}`);
    await sleep(200);
    await shot('13-diagnostics');
    await click('nav-keys');
  },

  async settings() {
    await click('nav-settings');
    await waitFor(() => visible('settings-save'), 'settings page');
    const page = await textOf('settings');
    if (!page.includes('由环境变量设定')) throw new Error('environment overrides not shown');
    await (await $t('language')).selectByAttribute('value', 'en');
    await click('settings-save');
    await waitText('settings-saved', 'Settings saved');
    await waitText('nav-keys', 'Certificates');
    await sleep(200);
    await shot('14-settings-en');
    const saved = JSON.parse(readFileSync(join(work, 'config', 'settings.json'), 'utf8'));
    if (saved.language !== 'en') throw new Error(`settings.json: ${JSON.stringify(saved)}`);
    if ('portalUrl' in saved && saved.portalUrl) throw new Error('an environment value was written to the file');
    await (await $t('language')).selectByAttribute('value', 'zh-CN');
    await click('settings-save');
    await waitText('nav-keys', '证书');
    await click('nav-keys');
  },

  async 'sm2-upgrade'() {
    // 国密: a CA whose portal runs an SM2 CA; a GM key (ukey-sim speaking TASS's SM2
    // mechanisms) holding an RSA certificate; a paid 续期+算法升级 order. The app, started
    // against that portal, says the algorithm becomes SM2 before the PIN, and leaves an
    // SM2 certificate on the same key. (Last: the app is restarted for it.)
    const t = tokens.m;
    sim('gm', t.serial, 'tass');
    const data = join(work, 'portal-sm2');
    run(PORTAL, ['--data', data, 'ca', 'show', '--alg', 'sm2']);
    run(PORTAL, ['--data', data, 'ca', 'accept-issuer', caFilesForSm2.issuing_cert]);
    run(PORTAL, ['--data', data, 'order', 'create', '--serial', t.certSerial, '--state', 'ready', '--algorithm', 'SM2', '--issuer-cert', caFilesForSm2.issuing_cert]);
    let url;
    [sm2Portal, url] = await servePortal(['--data', data, 'serve', '--listen', '127.0.0.1:0']);
    await restartApp({ ...appEnvForSecond, UKEY_PORTAL_URL: url, UKEY_TRUST: join(data, 'ca-cert.pem') });
    plugged('m');
    await waitText('banner', '证书有可用更新', 15000);
    await click('banner-renew');
    await waitText('consequences', '升级为 SM2');
    const said = await textOf('consequences');
    if (!said.includes('RSA')) throw new Error(`the upgrade notice does not name RSA: ${said}`);
    await shot('17-sm2-upgrade-notice');
    await click('continue');
    await enterPinAndSubmit(PIN);
    await waitText('result-title', '证书已更新', 60000);
    await shot('18-sm2-renewed');
    await click('close');
    await waitFor(async () => (await textOf('cert')).includes('SM2'), 'the key listed with its SM2 certificate');
  },

  async 'renewal-code'() {
    // A portal that gives each order a renewal code (against malware that holds an
    // unlocked key for a moment, issue 16): the app asks for it beside the PIN. A wrong
    // code is refused by the portal with nothing changed (the order stays ready) and
    // the dialog asks again, PIN included; the code from `order show` renews.
    portalCli('policy', '--renewal-codes', 'on');
    let orderId;
    try {
      orderId = order(tokens.o, 'ready');
    } finally {
      portalCli('policy', '--renewal-codes', 'off');
    }
    const show = () => JSON.parse(portalCli('order', 'show', orderId, '--json'));
    const code = show().renewal_code;
    if (!/^[0-9]{8}$/.test(code || '')) throw new Error(`order show gives no renewal code: ${code}`);
    // The app as the user starts it, on the main portal (an earlier scenario may have
    // pointed it at another).
    await restartApp(appEnvForSecond);
    plugged('o');
    await waitText('banner', '证书有可用更新');
    await click('banner-renew');
    // The plan is shown without the code (it is asked with the PIN).
    await waitText('consequences', '吊销');
    await click('continue');
    await waitFor(() => visible('renewal-code-input'), 'the renewal code field beside the PIN');
    const wrong = code === '12345678' ? '87654321' : '12345678';
    await (await $t('renewal-code-input')).setValue(`${wrong.slice(0, 4)}-${wrong.slice(4)}`);
    await enterPinAndSubmit(PIN);
    await waitText('renewal-code-error', '续期码不正确', 30000);
    await shot('23-renewal-code-wrong');
    if (show().state !== 'ready') throw new Error(`a wrong code changed the order: ${show().state}`);
    if ((await (await $t('pin-input')).getValue()) !== '') throw new Error('the PIN was kept after a wrong code');
    await (await $t('renewal-code-input')).setValue(`${code.slice(0, 4)} ${code.slice(4)}`);
    await enterPinAndSubmit(PIN);
    await waitText('result-title', '证书已更新', 60000);
    await click('close');
    if (show().state !== 'completed') throw new Error(`the order is ${show().state}, not completed`);
  },

  async cmp() {
    // A CA that speaks CMP (RFC 9483): the app, restarted with the portal's CMP endpoint
    // (UKEY_CMP_URL, as [cmp] url in the CA's config), offers to renew the signing
    // certificate (CMP has no order status to ask), sends a key update request signed
    // on the key, and confirms it (certConf): the portal's order ends completed.
    const orderId = JSON.parse(portalCli('order', 'list', '--json')).find((o) => o.serial_hex === tokens.n.certSerial).order_id;
    await restartApp({ ...appEnvForSecond, UKEY_CMP_URL: `${portalUrl}/.well-known/cmp` });
    plugged('n');
    await waitFor(async () => (await keyCount()) === 1 && (await textOf('status-text')).includes('CMP'), 'the CMP state on the certificate');
    if (await visible('banner')) throw new Error('a banner for a CMP certificate: there is no order to announce');
    await shot('21-cmp-offered');
    await click('renew');
    await waitText('consequences', '吊销');
    await click('continue');
    await enterPinAndSubmit(PIN);
    await waitText('result-title', '证书已更新', 60000);
    await shot('22-cmp-renewed');
    await click('close');
    const state = JSON.parse(portalCli('order', 'show', orderId, '--json')).state;
    if (state !== 'completed') throw new Error(`the order is ${state}: no certConf reached the portal`);
  },

  async 'skf-tries-left'() {
    // SKF (GM/T 0016): a software SKF key (libukey_sim.so's SKF face) holding an SM2
    // certificate from an SM2 portal's CA, 5 PIN tries. The app, restarted with the
    // library configured as SKF, says "PIN 剩余 5 次尝试" on the key; a wrong PIN in the
    // renewal dialog says 4 remain; the right one renews it. (Last: the app is restarted
    // for it, and sees only SKF keys.)
    const dir = join(work, 'skf');
    mkdirSync(dir, { recursive: true });
    const data = join(work, 'portal-skf');
    run(PORTAL, ['--data', data, 'ca', 'show', '--alg', 'sm2']);
    const ssl = (...args) => run('openssl', args, {}).trim();
    const f = (n) => join(dir, n);
    ssl('genpkey', '-algorithm', 'SM2', '-out', f('sig.key'));
    ssl('req', '-new', '-key', f('sig.key'), '-sm3', '-sigopt', 'distid:1234567812345678', '-utf8', '-subj', '/C=CN/O=某某建设工程有限公司/CN=钱十六', '-out', f('sig.csr'));
    writeFileSync(f('leaf.ext'), 'basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,nonRepudiation\n');
    ssl('x509', '-req', '-in', f('sig.csr'), '-CA', join(data, 'ca-cert.pem'), '-CAkey', join(data, 'ca-key.pem'), '-sm3', '-sigopt', 'distid:1234567812345678', '-vfyopt', 'distid:1234567812345678', '-days', '20', '-extfile', f('leaf.ext'), '-out', f('sig.pem'));
    const serial = ssl('x509', '-in', f('sig.pem'), '-noout', '-serial').replace('serial=', '');
    run(PORTAL, ['--data', data, 'order', 'create', '--serial', serial, '--state', 'ready', '--algorithm', 'SM2', '--years', '2']);
    const key = 'SKFE2E01';
    sim('skf', 'create', key, '--label', '钱十六的UKey', '--pin', PIN);
    sim('skf', 'provision', key, '--sign-key', f('sig.key'), '--sign-cert', f('sig.pem'));
    sim('pin-tries', key, '--max', '5');
    // The user's config names the library as SKF (it also exports PKCS#11).
    const config = join(work, 'ukey-config.toml');
    const before = existsSync(config) ? readFileSync(config, 'utf8') : '';
    writeFileSync(config, `${before}\n[[modules]]\nname = "ukey-sim SKF"\npath = "${SIM_MODULE}"\nkind = "skf"\n`);
    let url;
    [skfPortal, url] = await servePortal(['--data', data, 'serve', '--listen', '127.0.0.1:0']);
    await restartApp({ ...appEnvForSecond, UKEY_PORTAL_URL: url, UKEY_TRUST: join(data, 'ca-cert.pem') });
    await waitText('key-pin-tries', 'PIN 剩余 5 次尝试', 15000);
    if (!(await textOf('key')).includes('SKF')) throw new Error('the key does not say it is used through SKF');
    await waitText('banner', '证书有可用更新', 15000);
    await click('banner-renew');
    await waitText('consequences', '吊销');
    await click('continue');
    await waitText('pin-tries-left', 'PIN 剩余 5 次尝试');
    await enterPinAndSubmit('000000');
    await waitText('pin-error', 'PIN');
    await waitText('pin-tries-left', 'PIN 剩余 4 次尝试');
    await shot('19-skf-wrong-pin-tries-left');
    const counted = JSON.parse(sim('status', '--json')).tokens[key].pin.failures;
    if (counted !== 1) throw new Error(`the key counted ${counted} wrong PINs, not 1: a PIN was retried`);
    await enterPinAndSubmit(PIN);
    await waitText('result-title', '证书已更新', 60000);
    await shot('20-skf-renewed');
    await click('close');
    await waitText('key-pin-tries', 'PIN 剩余 5 次尝试');
    await waitFor(async () => (await textOf('cert')).includes('SM2'), 'the SKF key listed with its new SM2 certificate');
  },
};
let caFilesForSm2;
let skfPortal;

// ---- main -----------------------------------------------------------------------

async function main() {
  const wanted = process.argv.slice(2);
  const names = wanted.length ? wanted : Object.keys(scenarios);
  for (const n of names) if (!scenarios[n]) throw new Error(`unknown scenario ${n}`);

  log('work dir', work);
  tokens.a = createToken('UKey-A', '张三');
  const caFiles = ca();
  tokens.b = createToken('UKey-B', '李四');
  tokens.c = createToken('UKey-C', '王五');
  tokens.d = createToken('UKey-D', '赵六', 20);
  tokens.e = createToken('UKey-E', '孙七');
  tokens.f = createToken('UKey-F', '周八');
  tokens.g = createToken('UKey-G', '吴九');
  tokens.h = createToken('UKey-H', '郑十');
  tokens.i = createToken('UKey-I', '冯十一');
  tokens.j = createToken('UKey-J', '陈十二');
  tokens.k = createToken('UKey-K', '褚十三');
  tokens.l = createToken('UKey-L', '卫十四');
  tokens.m = createToken('UKey-M', '蒋十五');
  tokens.n = createToken('UKey-N', '沈十七');
  tokens.o = createToken('UKey-O', '韩十八');
  caFilesForSm2 = caFiles;
  await startPortal(caFiles);
  for (const n of ['a', 'b', 'c', 'e', 'f']) order(tokens[n], 'ready', ['--years', '2']);
  order(tokens.d, 'awaiting-payment');
  portalCli('order', 'reject', order(tokens.g, 'awaiting-payment'), '--reason', '营业执照已过期，请上传新的营业执照');
  portalCli('order', 'ship', order(tokens.h, 'ready'), '--tracking', 'SF1234567890');
  order(tokens.i, 'ready');
  order(tokens.j, 'ready');
  order(tokens.k, 'ready');
  order(tokens.n, 'ready');
  caRoot = caFiles.root_cert;
  // Record what the app sends to the notification service.
  notifyMonitor = spawn('dbus-monitor', ['--session', "interface='org.freedesktop.Notifications'"], {
    stdio: ['ignore', openSync(notifyLog, 'w'), 'ignore'],
  });

  // A stand-in for the desktop's URL opener that records what the app asked to open.
  const opener = join(binDir, 'xdg-open');
  writeFileSync(opener, `#!/bin/sh\nprintf '%s\\n' "$1" >> '${openedFile}'\n`);
  chmodSync(opener, 0o755);

  const appEnv = {
    ...process.env,
    PATH: `${binDir}:${process.env.PATH}`,
    HOME: home,
    XDG_CONFIG_HOME: join(home, '.config'),
    XDG_DATA_HOME: join(home, '.local/share'),
    XDG_CURRENT_DESKTOP: '',
    // A Chinese user's locale (the language setting is left on "auto"), whatever the
    // machine's own.
    LANG: 'zh_CN.UTF-8',
    LC_ALL: 'zh_CN.UTF-8',
    SOFTHSM2_CONF: join(hsmDir, 'softhsm2.conf'),
    UKEY_SIM_STATE: simState,
    UKEY_PKCS11_MODULE: SIM_MODULE,
    UKEY_PORTAL_URL: portalUrl,
    UKEY_TRUST: caFiles.root_cert,
    UKEY_CONFIG_DIR: join(work, 'config'),
    UKEY_CONFIG: join(work, 'ukey-config.toml'),
    UKEY_SYSTEM_CONFIG: join(work, 'ukey-system-config.toml'),
    UKEY_DATA_DIR: join(work, 'data'),
    UKEY_EXIT_ON_CLOSE: '1',
    UKEY_LOG: process.env.UKEY_LOG || 'info,cryptoki=off',
  };
  appEnvForSecond = appEnv;
  await restartApp(appEnv);

  let passed = 0;
  let failed = 0;
  for (const name of names) {
    const t0 = Date.now();
    try {
      await scenarios[name]();
      passed++;
      log(`PASS ${name} (${Date.now() - t0} ms)`);
    } catch (e) {
      failed++;
      log(`FAIL ${name}: ${e.stack || e}`);
      await shot(`fail-${name}`).catch(() => {});
      // Leave no dialog open for the next scenario (Escape closes it unless writing).
      await browser.keys('Escape').catch(() => {});
    }
  }
  return { passed, failed };
}

let result = { passed: 0, failed: 1 };
try {
  result = await main();
} catch (e) {
  log('setup failed:', e.stack || e);
} finally {
  await browser?.deleteSession().catch(() => {});
  // SIGTERM: tauri-driver then stops WebKitWebDriver; after SIGKILL it would live on.
  driver?.kill('SIGTERM');
  portal?.kill('SIGTERM');
  sm2Portal?.kill('SIGTERM');
  skfPortal?.kill('SIGTERM');
  notifyMonitor?.kill('SIGTERM');
  await sleep(500);
  if (!process.env.E2E_KEEP) rmSync(work, { recursive: true, force: true });
}
console.log(`e2e: ${result.passed} passed, ${result.failed} failed`);
process.exit(result.failed === 0 ? 0 : 1);
