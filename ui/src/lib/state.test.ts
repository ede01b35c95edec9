import { describe, expect, it } from 'vitest';
import { certAction, certState, renewable } from './state';
import { AWAITING, READY, cert, key, snapshot } from '../test/fixtures';

describe('certificate states', () => {
  it('ready offers renew', () => {
    const k = key('S1', [cert('0A', READY)]);
    const s = snapshot([k]);
    expect(certState(s, k, k.certificates[0])).toBe('ready');
    expect(certAction(s, k, k.certificates[0])).toEqual({ kind: 'renew', resume: false });
    expect(renewable(s)).toHaveLength(1);
  });

  it('awaiting payment offers the payment page', () => {
    const k = key('S1', [cert('0A1B', AWAITING)]);
    const s = snapshot([k]);
    expect(certState(s, k, k.certificates[0])).toBe('awaiting_payment');
    expect(certAction(s, k, k.certificates[0])).toEqual({
      kind: 'pay',
      url: 'http://127.0.0.1:8080/pay?serial=0A1B',
    });
  });

  it('expiring and expired without an order offer the portal with the serial', () => {
    const k = key('S1', [cert('0C', { state: 'none' }, { daysLeft: 12 }), cert('0D', { state: 'none' }, { daysLeft: -2 })]);
    const s = snapshot([k], { portalUrl: 'https://ca.example/' });
    expect(certState(s, k, k.certificates[0])).toBe('expiring');
    expect(certState(s, k, k.certificates[1])).toBe('expired');
    expect(certAction(s, k, k.certificates[0])).toEqual({ kind: 'apply', url: 'https://ca.example/pay?serial=0C' });
  });

  it('far from expiry without an order is just valid', () => {
    const k = key('S1', [cert('0C', { state: 'none' }, { daysLeft: 200 })]);
    expect(certState(snapshot([k]), k, k.certificates[0])).toBe('valid');
  });

  it('a locked PIN blocks renewing', () => {
    const k = key('S1', [cert('0A', READY)], {
      pin: { countLow: true, finalTry: false, locked: true, pinPad: false, wrongEntries: 3, triesLeft: null },
    });
    const s = snapshot([k]);
    expect(certState(s, k, k.certificates[0])).toBe('pin_locked');
    expect(certAction(s, k, k.certificates[0]).kind).toBe('none');
    expect(renewable(s)).toHaveLength(0);
  });

  it('an interrupted renewal resumes only when its key is back', () => {
    const k = key('S1', [cert('0A', READY)]);
    const away = snapshot([k], { interrupted: [{ tokenId: 'S1', tokenLabel: 'x', certSerial: '0A', keyPresent: false }] });
    expect(certState(away, k, k.certificates[0])).toBe('interrupted');
    expect(certAction(away, k, k.certificates[0]).kind).toBe('none');
    const back = snapshot([k], { interrupted: [{ tokenId: 'S1', tokenLabel: 'x', certSerial: '0A', keyPresent: true }] });
    expect(certAction(back, k, k.certificates[0])).toEqual({ kind: 'renew', resume: true });
  });

  it('rejected, mailing, completed, corrupt', () => {
    const k = key('S1', [
      cert('01', { state: 'rejected', orderId: 'o', reason: '营业执照已过期' }),
      cert('02', { state: 'requires_new_key', orderId: 'o', trackingNumber: 'SF123' }),
      cert('03', { state: 'completed', orderId: 'o', newSerial: '04' }),
      cert('05', { state: 'unknown' }, { error: { code: 'certificate_malformed', message: 'bad' }, serial: null }),
    ]);
    const s = snapshot([k]);
    expect(k.certificates.map((c) => certState(s, k, c))).toEqual(['rejected', 'requires_new_key', 'completed', 'corrupt']);
    expect(certAction(s, k, k.certificates[0]).kind).toBe('fix');
  });

  it('a CMP CA: renew offered on the signing certificate, no banner', () => {
    const k = key('S1', [cert('01', { state: 'cmp' })]);
    const s = snapshot([k]);
    expect(certState(s, k, k.certificates[0])).toBe('cmp');
    expect(certAction(s, k, k.certificates[0])).toEqual({ kind: 'renew', resume: false });
    expect(renewable(s)).toEqual([]);
  });

  it('under review offers nothing to click, even when the key would renew', () => {
    const k = key('S1', [cert('01', { state: 'under_review', orderId: 'o' })]);
    const s = snapshot([k]);
    expect(certState(s, k, k.certificates[0])).toBe('under_review');
    expect(certAction(s, k, k.certificates[0]).kind).toBe('none');
    expect(renewable(s)).toEqual([]);
  });
});
