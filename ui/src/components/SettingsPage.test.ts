import { describe, expect, it, afterEach } from 'vitest';
import { render, screen, fireEvent, waitFor } from '@testing-library/svelte';
import { mockIPC } from '@tauri-apps/api/mocks';
import SettingsPage from './SettingsPage.svelte';
import { locale, setLang } from '../lib/i18n.svelte';

function view(over: Record<string, unknown> = {}, envOverrides: string[] = [], system: Record<string, unknown> = {}) {
  const file = { pkcs11Module: null, portalUrl: null, trustAnchors: [], language: null, autostart: true, supportContact: null, ...over };
  return {
    file,
    effective: file,
    system: { ...file, pkcs11Module: null, portalUrl: null, trustAnchors: [], supportContact: null, ...system },
    envOverrides,
    language: (file.language ?? 'zh-CN') as string,
    detectedModules: [{ name: 'SoftHSM2', path: '/usr/lib/softhsm/libsofthsm2.so' }],
    settingsPath: '/home/u/.config/ukey-desktop/settings.json',
    configPath: '/home/u/.config/ukey/config.toml',
    systemConfigPath: '/etc/ukey/config.toml',
    autostartRegistered: true,
    version: '0.1.0',
  };
}

describe('settings page', () => {
  afterEach(() => setLang('zh-CN'));

  it('saves module, portal URL, language and autostart; applies the language', async () => {
    let saved: Record<string, unknown> | null = null;
    mockIPC((cmd, args) => {
      if (cmd === 'get_settings') return view();
      if (cmd === 'save_settings') {
        saved = (args as { settings: Record<string, unknown> }).settings;
        return view(saved);
      }
      throw new Error(cmd);
    });
    render(SettingsPage);
    const url = (await screen.findByTestId('portal-url')) as HTMLInputElement;
    await fireEvent.input(url, { target: { value: ' https://ca.example ' } });
    await fireEvent.change(screen.getByTestId('module-select'), { target: { value: '/usr/lib/softhsm/libsofthsm2.so' } });
    await fireEvent.change(screen.getByTestId('language'), { target: { value: 'en' } });
    await fireEvent.click(screen.getByTestId('autostart'));
    await fireEvent.click(screen.getByTestId('settings-save'));
    await waitFor(() => expect(saved).not.toBeNull());
    expect(saved).toMatchObject({
      portalUrl: 'https://ca.example',
      pkcs11Module: '/usr/lib/softhsm/libsofthsm2.so',
      language: 'en',
      autostart: false,
    });
    expect(await screen.findByTestId('settings-saved')).toBeTruthy();
    expect(locale.lang).toBe('en');
  });

  it('shows the translated refusal of bad input', async () => {
    mockIPC((cmd) => {
      if (cmd === 'get_settings') return view({}, ['portalUrl']);
      if (cmd === 'save_settings') throw { code: 'settings_portal_url', message: 'bad url' };
      throw new Error(cmd);
    });
    render(SettingsPage);
    await fireEvent.input(await screen.findByTestId('portal-url'), { target: { value: 'ftp://x' } });
    await fireEvent.click(screen.getByTestId('settings-save'));
    expect((await screen.findByTestId('settings-error')).textContent).toBe('门户地址必须以 https:// 开头。');
    expect(screen.getByTestId('settings').textContent).toContain('由环境变量设定');
  });

  it("shows the CA's defaults where the user's file is silent, and where each file is", async () => {
    mockIPC((cmd) => {
      if (cmd === 'get_settings')
        return view({ supportContact: '400-1' }, [], {
          portalUrl: 'https://portal.ca.example',
          trustAnchors: ['/etc/ukey/ca-root.pem'],
          supportContact: '95105',
        });
      throw new Error(cmd);
    });
    render(SettingsPage);
    const url = (await screen.findByTestId('portal-url')) as HTMLInputElement;
    expect(url.placeholder).toBe('https://portal.ca.example');
    const hints = screen.getAllByTestId('from-ca').map((e) => e.textContent);
    expect(hints).toContain('(CA 预设: https://portal.ca.example)');
    expect(hints).toContain('(CA 预设)');
    // The user's own support phone wins, so the CA's is not offered.
    expect(hints.some((h) => h?.includes('95105'))).toBe(false);
    const paths = screen.getByTestId('settings-paths').textContent ?? '';
    expect(paths).toContain('/home/u/.config/ukey/config.toml');
    expect(paths).toContain('/etc/ukey/config.toml');
  });
});
