import { describe, expect, it, afterEach } from 'vitest';
import { messages, t, setLang, formatDate, daysLeftText, errorText, locale } from './i18n.svelte';

const placeholders = (s: string) => [...s.matchAll(/\{(\w+)\}/g)].map((m) => m[1]).sort();

describe('i18n', () => {
  afterEach(() => setLang('zh-CN'));

  it('has every key in both languages, none empty, same placeholders', () => {
    const zh = messages['zh-CN'];
    const en = messages.en;
    expect(Object.keys(zh).sort()).toEqual(Object.keys(en).sort());
    for (const k of Object.keys(zh)) {
      expect(zh[k].trim(), k).not.toBe('');
      expect(en[k].trim(), k).not.toBe('');
      expect(placeholders(zh[k]), k).toEqual(placeholders(en[k]));
    }
  });

  it('Chinese is the default and the key texts are the ones the issue names', () => {
    expect(locale.lang).toBe('zh-CN');
    expect(t('banner.ready')).toBe('证书有可用更新 — 立即更新');
    expect(t('action.renewNow')).toBe('立即更新');
    setLang('en');
    expect(t('banner.ready')).toBe('Certificate update available — renew now');
  });

  it('every key the components use exists', async () => {
    const { readFileSync, readdirSync } = await import('node:fs');
    const { join } = await import('node:path');
    const dirs = ['src', 'src/components', 'src/lib'];
    const used = new Set<string>();
    for (const d of dirs) {
      for (const f of readdirSync(d)) {
        if (!/\.(svelte|ts)$/.test(f) || f.endsWith('.test.ts')) continue;
        const text = readFileSync(join(d, f), 'utf8');
        for (const m of text.matchAll(/\bt\('([\w.]+)'/g)) used.add(m[1]);
      }
    }
    expect(used.size).toBeGreaterThan(40);
    for (const k of used) expect(messages['zh-CN'], k).toHaveProperty([k]);
  });

  it('formats dates and counts in the locale', () => {
    expect(formatDate('2026-12-01T00:00:00Z')).toMatch(/2026年12月/);
    expect(daysLeftText(10)).toBe('剩余 10 天');
    expect(daysLeftText(-3)).toBe('已过期 3 天');
    setLang('en');
    expect(formatDate('2026-12-01T00:00:00Z')).toMatch(/Dec.*2026/);
    expect(daysLeftText(1234)).toBe('1,234 days left');
    expect(daysLeftText(0)).toBe('expires today');
  });

  it('translates error codes and falls back to the backend message', () => {
    expect(errorText({ code: 'pin_incorrect', message: 'x' })).toBe('PIN 不正确。');
    expect(errorText({ code: 'something_new', message: '后端的话' })).toBe('后端的话');
  });
});
