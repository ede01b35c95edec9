// The window's states, rendered in jsdom with the Tauri IPC mocked (mockIPC): what
// the user sees and which backend calls each click makes.
import { describe, expect, it, beforeEach } from 'vitest';
import { render, screen, fireEvent, waitFor, cleanup } from '@testing-library/svelte';
import { mockIPC } from '@tauri-apps/api/mocks';
import { emit } from '@tauri-apps/api/event';
import type { Channel } from '@tauri-apps/api/core';
import App from './App.svelte';
import type { RenewEvent, Snapshot } from './lib/api';
import { setLang } from './lib/i18n.svelte';
import { AWAITING, READY, cert, key, snapshot } from './test/fixtures';

const OUTCOME = {
  newSerial: '02',
  notAfter: '2027-01-01T00:00:00Z',
  encryptionSerial: null,
  archivedSerial: null,
  resumed: false,
  selfTestInThisRun: true,
};

type Call = { cmd: string; args: Record<string, unknown> };

function settingsView(language: 'zh-CN' | 'en' = 'zh-CN', supportContact: string | null = null) {
  const s = { pkcs11Module: null, portalUrl: null, trustAnchors: [], language, autostart: true, supportContact };
  return {
    file: s,
    effective: s,
    system: { ...s, portalUrl: null, trustAnchors: [], supportContact: null },
    envOverrides: [],
    language,
    detectedModules: [{ name: 'SoftHSM2', path: '/usr/lib/softhsm/libsofthsm2.so' }],
    settingsPath: '/tmp/settings.json',
    configPath: '/tmp/config.toml',
    systemConfigPath: '/etc/ukey/config.toml',
    autostartRegistered: true,
    version: '0.1.0',
  };
}

function backend(
  snap: Snapshot,
  renew?: (args: Record<string, unknown>) => unknown,
  opts: { language?: 'zh-CN' | 'en'; supportContact?: string; notices?: unknown[] } = {},
) {
  const calls: Call[] = [];
  mockIPC(
    (cmd, args) => {
      calls.push({ cmd, args: (args ?? {}) as Record<string, unknown> });
      switch (cmd) {
        case 'get_snapshot':
          return snap;
        case 'get_settings':
          return settingsView(opts.language, opts.supportContact ?? null);
        case 'save_settings':
          return settingsView();
        case 'refresh':
          return null;
        case 'plan_renewal':
          return {
            resuming: false,
            notices: opts.notices ?? [
              { notice: 'old_certificate_revoked', serial: (args as { certSerial: string }).certSerial, text: 'x' },
            ],
          };
        case 'renew':
          if (!renew) throw new Error('unexpected renew');
          return renew(args as Record<string, unknown>);
        case 'open_portal_page':
        case 'plugin:clipboard-manager|write_text':
          return null;
      }
      throw new Error(`unmocked command ${cmd}`);
    },
    { shouldMockEvents: true },
  );
  return calls;
}

function sendStep(args: Record<string, unknown>, step: string, index: number, total: number, writing = false) {
  const ch = args.onEvent as Channel<RenewEvent>;
  ch.onmessage({ event: 'step', data: { step, index, total, writing } });
}

beforeEach(() => {
  cleanup();
  setLang('zh-CN');
});

describe('main window', () => {
  it('asks for a key when none is inserted', async () => {
    backend(snapshot([]));
    render(App);
    expect(await screen.findByText('请插入 UKey')).toBeTruthy();
    expect(screen.queryByTestId('banner')).toBeNull();
  });

  it('lists holder, organisation, serial, issuer, validity with days left, algorithm', async () => {
    backend(snapshot([key('S1', [cert('0A1B', { state: 'none' }, { daysLeft: 200 })])]));
    render(App);
    const row = await screen.findByTestId('cert');
    expect(row.textContent).toContain('张三');
    expect(row.textContent).toContain('某某建设工程有限公司');
    expect(row.textContent).toContain('0A1B');
    expect(row.textContent).toContain('UKey Test Issuing CA');
    expect(row.textContent).toContain('剩余 200 天');
    expect(row.textContent).toContain('RSA-2048');
    expect(screen.getByTestId('status-text').textContent).toBe('证书有效，暂无更新订单');
  });

  it('copies the serial with one click', async () => {
    const calls = backend(snapshot([key('S1', [cert('0A1B', { state: 'none' })])]));
    render(App);
    await fireEvent.click(await screen.findByTestId('serial'));
    await waitFor(() => expect(calls.some((c) => c.cmd === 'plugin:clipboard-manager|write_text')).toBe(true));
    const c = calls.find((c) => c.cmd === 'plugin:clipboard-manager|write_text');
    expect(c?.args.text).toBe('0A1B');
    expect(await screen.findByText('已复制')).toBeTruthy();
  });

  it('shows the banner when a key with a ready renewal is inserted (snapshot event)', async () => {
    backend(snapshot([]));
    render(App);
    await screen.findByText('请插入 UKey');
    await emit('snapshot', snapshot([key('S1', [cert('0A', READY)])]));
    const banner = await screen.findByTestId('banner');
    expect(banner.textContent).toContain('证书有可用更新 — 立即更新');
  });

  it('renews: consequences, PIN, named steps with a bar, do-not-pull, result', async () => {
    let release: () => void = () => {};
    const gate = new Promise<void>((r) => (release = r));
    const calls = backend(
      snapshot([key('S1', [cert('0A', { ...READY, withEncryption: true })])]),
      async (args) => {
        sendStep(args, 'login', 2, 9);
        sendStep(args, 'write', 6, 9, true);
        await gate;
        return { ...OUTCOME, newSerial: '7F01', notAfter: '2028-11-21T00:00:00Z' };
      },
      {
        notices: [
          { notice: 'old_certificate_revoked', serial: '0A', text: 'engine text' },
          { notice: 'old_decryption_key_archived', serial: '0E', text: 'engine text' },
        ],
      },
    );
    render(App);
    await fireEvent.click(await screen.findByTestId('banner-renew'));
    const consequences = await screen.findByTestId('consequences');
    expect(consequences.textContent).toContain('旧证书（序列号 0A）将被 CA 吊销');
    expect(consequences.textContent).toContain('解密密钥会保留在 UKey 中');
    expect(consequences.textContent).toContain('有效期 2 年');
    expect(consequences.textContent).toContain('请不要拔出');
    await fireEvent.click(screen.getByTestId('continue'));
    const input = (await screen.findByTestId('pin-input')) as HTMLInputElement;
    expect(input.type).toBe('password');
    await fireEvent.input(input, { target: { value: '123456' } });
    await fireEvent.submit(input.closest('form') as HTMLFormElement);
    expect(await screen.findByTestId('do-not-pull')).toBeTruthy();
    const steps = screen.getByTestId('steps');
    expect(steps.textContent).toContain('验证 PIN');
    expect(steps.textContent).toContain('写入新证书');
    expect(screen.getByRole('progressbar').getAttribute('aria-valuenow')).toBe('6');
    release();
    expect((await screen.findByTestId('result-title')).textContent).toContain('证书已更新');
    expect(screen.getByTestId('result-validity').textContent).toMatch(/2028年11月/);
    expect(screen.getByTestId('self-test').textContent).toContain('测试签名成功');
    const renewCall = calls.find((c) => c.cmd === 'renew');
    expect(renewCall?.args).toMatchObject({ tokenId: 'S1', certSerial: '0A', pin: '123456', confirmFinalTry: false });
  });

  it('tells apart two keys whose module gives them one serial, and renews the one clicked', async () => {
    const a = key('0000000000000000', [cert('0A', READY)], { id: '0000000000000000@1' });
    const b = key('0000000000000000', [cert('0B', READY, { holder: '李四' })], { id: '0000000000000000@2' });
    const calls = backend(snapshot([a, b]), () => ({ ...OUTCOME }));
    render(App);
    const cards = await screen.findAllByTestId('key');
    expect(cards.map((c) => c.getAttribute('data-key-id'))).toEqual(['0000000000000000@1', '0000000000000000@2']);
    expect(cards[1].textContent).toContain('0000000000000000@2');
    const second = cards[1].querySelector('[data-testid="renew"]') as HTMLElement;
    await fireEvent.click(second);
    await fireEvent.click(await screen.findByTestId('continue'));
    const input = (await screen.findByTestId('pin-input')) as HTMLInputElement;
    await fireEvent.input(input, { target: { value: '123456' } });
    await fireEvent.submit(input.closest('form') as HTMLFormElement);
    await screen.findByTestId('result-title');
    const plan = calls.find((c) => c.cmd === 'plan_renewal');
    expect(plan?.args).toMatchObject({ tokenId: '0000000000000000@2', certSerial: '0B' });
    const renewCall = calls.find((c) => c.cmd === 'renew');
    expect(renewCall?.args).toMatchObject({ tokenId: '0000000000000000@2', certSerial: '0B' });
  });

  it('Enter submits the PIN; the Caps Lock hint shows', async () => {
    const calls = backend(snapshot([key('S1', [cert('0A', READY)])]), () => (({ ...OUTCOME, newSerial: '02', notAfter: '2027-01-01T00:00:00Z' })));
    render(App);
    await fireEvent.click(await screen.findByTestId('renew'));
    await fireEvent.click(await screen.findByTestId('continue'));
    const input = (await screen.findByTestId('pin-input')) as HTMLInputElement;
    await fireEvent.keyDown(input, { key: 'A', getModifierState: () => true });
    // jsdom's KeyboardEvent takes modifierCapsLock for getModifierState('CapsLock')
    await fireEvent.keyUp(input, { key: 'A', modifierCapsLock: true });
    expect(await screen.findByTestId('caps-lock')).toBeTruthy();
    await fireEvent.input(input, { target: { value: '1234' } });
    // Pressing Enter in a form's only text field submits it (implicit submission).
    await fireEvent.submit(input.form as HTMLFormElement);
    await screen.findByTestId('result-title');
    expect(calls.filter((c) => c.cmd === 'renew')).toHaveLength(1);
  });

  it('the self-test mark says when the test signature ran', async () => {
    // A renewal finished after an interruption whose self-test had already passed.
    backend(snapshot([key('S1', [cert('0A', READY)])]), () => ({ ...OUTCOME, resumed: true, selfTestInThisRun: false }));
    render(App);
    await fireEvent.click(await screen.findByTestId('renew'));
    await fireEvent.click(await screen.findByTestId('continue'));
    const input = (await screen.findByTestId('pin-input')) as HTMLInputElement;
    await fireEvent.input(input, { target: { value: '1234' } });
    await fireEvent.submit(input.form as HTMLFormElement);
    await screen.findByTestId('result-title');
    const mark = screen.getByTestId('self-test').textContent ?? '';
    expect(mark).toContain('测试签名已在中断前完成');
    expect(mark).not.toContain('测试签名成功');
  });

  it('a wrong PIN returns to the PIN dialog with the count, and is not retried', async () => {
    let snap = snapshot([key('S1', [cert('0A', READY)])]);
    const calls = backend(snap, async () => {
      snap = snapshot([key('S1', [cert('0A', READY)], {
        pin: { countLow: true, finalTry: true, locked: false, pinPad: false, wrongEntries: 1, triesLeft: null },
      })]);
      await emit('snapshot', snap);
      throw { code: 'pin_incorrect', message: 'wrong PIN' };
    });
    render(App);
    await fireEvent.click(await screen.findByTestId('renew'));
    await fireEvent.click(await screen.findByTestId('continue'));
    const input = (await screen.findByTestId('pin-input')) as HTMLInputElement;
    await fireEvent.input(input, { target: { value: '000000' } });
    await fireEvent.submit(input.form as HTMLFormElement);
    expect((await screen.findByTestId('pin-error')).textContent).toBe('PIN 不正确。');
    expect((await screen.findByTestId('pin-wrong-count')).textContent).toContain('1 次');
    expect(screen.getByTestId('pin-final-try').textContent).toContain('最后一次机会');
    expect(((await screen.findByTestId('pin-input')) as HTMLInputElement).value).toBe('');
    await new Promise((r) => setTimeout(r, 50));
    expect(calls.filter((c) => c.cmd === 'renew')).toHaveLength(1);
    // Submitting again while "last try" is shown confirms the last try.
    const again = (await screen.findByTestId('pin-input')) as HTMLInputElement;
    await fireEvent.input(again, { target: { value: '123456' } });
    await fireEvent.submit(again.form as HTMLFormElement);
    await waitFor(() => expect(calls.filter((c) => c.cmd === 'renew')).toHaveLength(2));
    expect(calls.filter((c) => c.cmd === 'renew')[1].args.confirmFinalTry).toBe(true);
  });

  it('asks for the renewal code beside the PIN when the portal wants one, and sends both once', async () => {
    const calls = backend(snapshot([key('S1', [cert('0A', { ...READY, renewalCodeRequired: true })])]), async (args) => {
      if (args.renewalCode !== '12345678') throw { code: 'renewal_code_invalid', message: 'wrong renewal code' };
      return { ...OUTCOME };
    });
    render(App);
    await fireEvent.click(await screen.findByTestId('renew'));
    await fireEvent.click(await screen.findByTestId('continue'));
    const pin = (await screen.findByTestId('pin-input')) as HTMLInputElement;
    const code = screen.getByTestId('renewal-code-input') as HTMLInputElement;
    // Nothing is sent without a well-formed code; the PIN stays typed.
    await fireEvent.input(pin, { target: { value: '123456' } });
    await fireEvent.submit(pin.form as HTMLFormElement);
    expect((await screen.findByTestId('renewal-code-error')).textContent).toBe('请输入续期码');
    await fireEvent.input(code, { target: { value: '1234-567' } });
    await fireEvent.submit(pin.form as HTMLFormElement);
    expect((await screen.findByTestId('renewal-code-error')).textContent).toContain('8 位数字');
    expect(calls.filter((c) => c.cmd === 'renew')).toHaveLength(0);
    expect(pin.value).toBe('123456');
    // A wrong code: back to the dialog, the PIN to be typed again, nothing retried.
    await fireEvent.input(code, { target: { value: '8765 4321' } });
    await fireEvent.submit(pin.form as HTMLFormElement);
    const err = await screen.findByTestId('renewal-code-error');
    expect(err.getAttribute('data-code')).toBe('renewal_code_invalid');
    expect(err.textContent).toContain('续期码不正确');
    expect(((await screen.findByTestId('pin-input')) as HTMLInputElement).value).toBe('');
    expect(calls.filter((c) => c.cmd === 'renew')).toHaveLength(1);
    expect(calls.filter((c) => c.cmd === 'renew')[0].args).toMatchObject({ pin: '123456', renewalCode: '87654321' });
    // The right one, typed as printed.
    const again = (await screen.findByTestId('pin-input')) as HTMLInputElement;
    await fireEvent.input(again, { target: { value: '123456' } });
    await fireEvent.input(screen.getByTestId('renewal-code-input'), { target: { value: '1234-5678' } });
    await fireEvent.submit(again.form as HTMLFormElement);
    await screen.findByTestId('result-title');
    expect(calls.filter((c) => c.cmd === 'renew')[1].args).toMatchObject({ renewalCode: '12345678' });
  });

  it('does not ask for a renewal code the portal does not want', async () => {
    const calls = backend(snapshot([key('S1', [cert('0A', READY)])]), () => ({ ...OUTCOME }));
    render(App);
    await fireEvent.click(await screen.findByTestId('renew'));
    await fireEvent.click(await screen.findByTestId('continue'));
    const pin = (await screen.findByTestId('pin-input')) as HTMLInputElement;
    expect(screen.queryByTestId('renewal-code-input')).toBeNull();
    await fireEvent.input(pin, { target: { value: '123456' } });
    await fireEvent.submit(pin.form as HTMLFormElement);
    await screen.findByTestId('result-title');
    expect(calls.find((c) => c.cmd === 'renew')?.args.renewalCode).toBeNull();
  });

  it('an SKF key shows its tries left on the key and in the PIN dialog, counting down', async () => {
    const skf = (left: number) =>
      snapshot([key('S1', [cert('0A', READY)], {
        interface: 'skf',
        pin: { countLow: left < 6, finalTry: left === 1, locked: false, pinPad: false, wrongEntries: 0, triesLeft: left },
      })]);
    let snap = skf(6);
    backend(snap, async () => {
      snap = skf(5);
      await emit('snapshot', snap);
      throw { code: 'pin_incorrect', message: 'UKey 的 PIN 码不正确，还可尝试 5 次。' };
    });
    render(App);
    expect((await screen.findByTestId('key-pin-tries')).textContent).toBe('PIN 剩余 6 次尝试');
    expect(screen.getByTestId('key').textContent).toContain('SKF 接口');
    await fireEvent.click(await screen.findByTestId('renew'));
    await fireEvent.click(await screen.findByTestId('continue'));
    expect((await screen.findByTestId('pin-tries-left')).textContent).toBe('PIN 剩余 6 次尝试');
    const input = (await screen.findByTestId('pin-input')) as HTMLInputElement;
    await fireEvent.input(input, { target: { value: '000000' } });
    await fireEvent.submit(input.form as HTMLFormElement);
    await waitFor(() => expect(screen.getByTestId('pin-tries-left').textContent).toBe('PIN 剩余 5 次尝试'));
    // The count the key gives replaces the app's own tally.
    expect(screen.queryByTestId('pin-wrong-count')).toBeNull();
  });

  it('a locked PIN says who to call and offers no renewal', async () => {
    backend(
      snapshot([key('S1', [cert('0A', READY), cert('0B', READY)], { pin: { countLow: true, finalTry: false, locked: true, pinPad: false, wrongEntries: 0, triesLeft: null } })]),
      undefined,
      { supportContact: '400-800-0000' },
    );
    render(App);
    await waitFor(() => expect(screen.getByTestId('pin-locked').textContent).toContain('400-800-0000'));
    // Said once for the key, not again on each of its certificates.
    expect(document.body.textContent?.split('PIN 已锁定').length).toBe(2);
    expect(screen.queryByTestId('renew')).toBeNull();
    expect(screen.queryByTestId('banner')).toBeNull();
  });

  it('awaiting payment opens the portal payment page with the serial', async () => {
    const calls = backend(snapshot([key('S1', [cert('0A1B', AWAITING)])]));
    render(App);
    expect((await screen.findByTestId('status-text')).textContent).toBe('续期订单待付款');
    await fireEvent.click(screen.getByTestId('pay'));
    await waitFor(() => expect(calls.some((c) => c.cmd === 'open_portal_page')).toBe(true));
    expect(calls.find((c) => c.cmd === 'open_portal_page')?.args.url).toBe(
      'http://127.0.0.1:8080/pay?serial=0A1B',
    );
  });

  it('expiring without an order offers to apply on the portal', async () => {
    const calls = backend(snapshot([key('S1', [cert('0C', { state: 'none' }, { daysLeft: 9 })])]));
    render(App);
    expect((await screen.findByTestId('status-text')).textContent).toBe('证书即将过期，尚未申请续期');
    await fireEvent.click(screen.getByTestId('apply'));
    await waitFor(() =>
      expect(calls.find((c) => c.cmd === 'open_portal_page')?.args.url).toBe('http://127.0.0.1:8080/pay?serial=0C'),
    );
  });

  it('rejected shows the reason; a new key in the mail shows the tracking number', async () => {
    backend(snapshot([key('S1', [
      cert('01', { state: 'rejected', orderId: 'o', reason: '营业执照已过期' }),
      cert('02', { state: 'requires_new_key', orderId: 'o', trackingNumber: 'SF1234567890' }),
    ])]));
    render(App);
    await waitFor(() => expect(screen.getAllByTestId('status-text')).toHaveLength(2));
    const texts = screen.getAllByTestId('status-text').map((e) => e.textContent);
    expect(texts[0]).toBe('续期申请被驳回：营业执照已过期');
    expect(texts[1]).toBe('新 UKey 正在邮寄中，快递单号 SF1234567890');
    expect(screen.getByTestId('fix')).toBeTruthy();
  });

  it('key pulled mid-renewal: "plug it back in", then the PIN dialog when it is back', async () => {
    let first = true;
    backend(snapshot([key('S1', [cert('0A', READY)])]), async (args) => {
      if (first) {
        first = false;
        sendStep(args, 'write', 8, 10, true);
        await emit('snapshot', snapshot([], { interrupted: [{ tokenId: 'S1', tokenLabel: 'UKey S1', certSerial: '0A', keyPresent: false }] }));
        throw { code: 'token_removed', message: 'removed' };
      }
      return ({ ...OUTCOME, newSerial: '02', notAfter: '2027-01-01T00:00:00Z' });
    });
    render(App);
    await fireEvent.click(await screen.findByTestId('renew'));
    await fireEvent.click(await screen.findByTestId('continue'));
    const input = (await screen.findByTestId('pin-input')) as HTMLInputElement;
    await fireEvent.input(input, { target: { value: '123456' } });
    await fireEvent.submit(input.form as HTMLFormElement);
    expect((await screen.findByTestId('plug-back')).textContent).toContain('请重新插入 UKey');
    await emit('snapshot', snapshot([key('S1', [cert('0A', READY)])], {
      interrupted: [{ tokenId: 'S1', tokenLabel: 'UKey S1', certSerial: '0A', keyPresent: true }],
    }));
    const again = (await screen.findByTestId('pin-input')) as HTMLInputElement;
    await fireEvent.input(again, { target: { value: '123456' } });
    await fireEvent.submit(again.form as HTMLFormElement);
    expect(await screen.findByTestId('result-title')).toBeTruthy();
  });

  it('two keys: both listed, "renew all" goes through each', async () => {
    const renewed: string[] = [];
    backend(snapshot([key('S1', [cert('0A', READY)]), key('S2', [cert('0B', READY, { holder: '李四' })])]), (args) => {
      renewed.push(`${args.tokenId}/${args.certSerial}`);
      return ({ ...OUTCOME, newSerial: 'FF', notAfter: '2027-01-01T00:00:00Z' });
    });
    render(App);
    await waitFor(() => expect(screen.getAllByTestId('key')).toHaveLength(2));
    expect(screen.getByTestId('banner').textContent).toContain('2 张证书有可用更新');
    await fireEvent.click(screen.getByTestId('renew-all'));
    for (let i = 0; i < 2; i++) {
      await fireEvent.click(await screen.findByTestId('continue'));
      const input = (await screen.findByTestId('pin-input')) as HTMLInputElement;
      await fireEvent.input(input, { target: { value: '123456' } });
      await fireEvent.submit(input.form as HTMLFormElement);
      await fireEvent.click(await screen.findByTestId('close'));
    }
    expect(renewed).toEqual(['S1/0A', 'S2/0B']);
  });

  it('switches to English from the settings', async () => {
    backend(snapshot([key('S1', [cert('0A', READY)])]), undefined, { language: 'en' });
    render(App);
    expect((await screen.findByTestId('banner')).textContent).toContain('Certificate update available — renew now');
  });
});
