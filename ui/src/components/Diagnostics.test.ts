import { describe, expect, it } from 'vitest';
import { render, screen, fireEvent, waitFor } from '@testing-library/svelte';
import { mockIPC } from '@tauri-apps/api/mocks';
import Diagnostics from './Diagnostics.svelte';
import type { DiagnosticsResult } from '../lib/api';

const text = (zh: string, en: string) => ({ 'zh-CN': zh, en });

const RESULT: DiagnosticsResult = {
  report: {
    format: 1,
    app_version: '0.1.0',
    generated_at: '2026-11-21T20:00:00Z',
    duration_ms: 40,
    overall: 'fail',
    counts: { pass: 1, warn: 1, fail: 1, skip: 0 },
    redacted: false,
    sections: [
      {
        kind: 'environment',
        id: 'env',
        title: text('环境', 'Environment'),
        checks: [{ id: 'module', status: 'pass', reason: text('驱动已加载', 'module loaded') }],
      },
      {
        kind: 'certificate',
        id: '0A',
        title: text('证书 0A', 'Certificate 0A'),
        checks: [
          { id: 'validity', status: 'warn', reason: text('10 天后过期', 'expires in 10 days'), action: text('请续期', 'renew it') },
          { id: 'chain', status: 'fail', reason: text('不能链到根证书', 'does not chain') },
        ],
      },
    ],
  },
  redactedTextZh: 'UKey 诊断报告 (redacted)',
  redactedTextEn: 'UKey diagnosis (redacted)',
};

describe('diagnostics page', () => {
  it('shows each check with its pass/warn/fail icon, copies and saves the redacted report', async () => {
    const calls: { cmd: string; args: Record<string, unknown> }[] = [];
    mockIPC((cmd, args) => {
      calls.push({ cmd, args: (args ?? {}) as Record<string, unknown> });
      switch (cmd) {
        case 'diagnose':
          return RESULT;
        case 'plugin:clipboard-manager|write_text':
          return null;
        case 'save_report':
          return '/tmp/report.json';
      }
      throw new Error(`unmocked ${cmd}`);
    });
    render(Diagnostics);
    await waitFor(() => expect(screen.getAllByTestId('diag-check')).toHaveLength(3));
    const checks = screen.getAllByTestId('diag-check');
    expect(checks.map((c) => c.dataset.status)).toEqual(['pass', 'warn', 'fail']);
    expect(checks.map((c) => c.querySelector('.icon')?.textContent)).toEqual(['✓', '⚠', '✗']);
    expect(checks[1].textContent).toContain('请续期');
    expect(screen.getByTestId('diag-counts').textContent).toContain('✗ 1');

    await fireEvent.click(screen.getByTestId('diag-copy'));
    await waitFor(() => expect(calls.some((c) => c.cmd === 'plugin:clipboard-manager|write_text')).toBe(true));
    expect(calls.find((c) => c.cmd === 'plugin:clipboard-manager|write_text')?.args.text).toBe('UKey 诊断报告 (redacted)');

    await fireEvent.click(screen.getByTestId('diag-save'));
    await waitFor(() => expect(calls.some((c) => c.cmd === 'save_report')).toBe(true));
    // The path comes from the dialog Rust opens, never from the page.
    expect(calls.find((c) => c.cmd === 'save_report')?.args).toEqual({});
    expect((await screen.findByTestId('diag-note')).textContent).toContain('/tmp/report.json');
  });

  it('shows a translated error when diagnosing fails', async () => {
    mockIPC((cmd) => {
      if (cmd === 'diagnose') throw { code: 'module_not_found', message: 'x' };
      throw new Error(cmd);
    });
    render(Diagnostics);
    expect((await screen.findByTestId('diag-error')).textContent).toContain('没有找到 UKey 驱动');
  });

  it('proves the keys sign with a PIN given once, then forgets it', async () => {
    const calls: { cmd: string; args: Record<string, unknown> }[] = [];
    mockIPC((cmd, args) => {
      calls.push({ cmd, args: (args ?? {}) as Record<string, unknown> });
      if (cmd === 'diagnose') return RESULT;
      throw new Error(`unmocked ${cmd}`);
    });
    render(Diagnostics);
    await waitFor(() => expect(calls.filter((c) => c.cmd === 'diagnose')).toHaveLength(1));
    // The first, automatic run has no PIN.
    expect(calls[0].args.pin).toBeNull();
    const input = screen.getByTestId('diag-pin') as HTMLInputElement;
    expect(input.type).toBe('password');
    await fireEvent.input(input, { target: { value: '123456' } });
    await fireEvent.submit(screen.getByTestId('diag-pin-form'));
    await waitFor(() => expect(calls.filter((c) => c.cmd === 'diagnose')).toHaveLength(2));
    expect(calls[1].args.pin).toBe('123456');
    expect(input.value).toBe('');
    // Running again does not send it again.
    await fireEvent.click(screen.getByTestId('diag-run'));
    await waitFor(() => expect(calls.filter((c) => c.cmd === 'diagnose')).toHaveLength(3));
    expect(calls[2].args.pin).toBeNull();
  });
});
