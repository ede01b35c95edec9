// Snapshots for the tests, shaped like the backend's (src-tauri/src/view.rs).
import type { Cert, Key, Snapshot, Status } from '../lib/api';

export function cert(serial: string, status: Status, over: Partial<Cert> = {}): Cert {
  return {
    keyId: '01',
    label: 'sign',
    serial,
    holder: '张三',
    organisation: '某某建设工程有限公司',
    subject: 'C=CN, O=某某建设工程有限公司, CN=张三',
    issuer: 'C=CN, O=UKey Test CA, CN=UKey Test Issuing CA',
    notBefore: '2025-12-01T00:00:00Z',
    notAfter: '2026-12-01T00:00:00Z',
    daysLeft: 10,
    algorithm: 'RSA-2048',
    usage: 'signing',
    hasKey: true,
    error: null,
    status,
    ...over,
  };
}

export function key(serial: string, certs: Cert[], over: Partial<Key> = {}): Key {
  return {
    id: serial,
    serial,
    label: `UKey ${serial}`,
    manufacturer: 'ukey-sim',
    model: 'SoftHSM v2',
    interface: 'pkcs11',
    pin: { countLow: false, finalTry: false, locked: false, pinPad: false, wrongEntries: 0, triesLeft: null },
    certificates: certs,
    errors: [],
    ...over,
  };
}

export function snapshot(keys: Key[], over: Partial<Snapshot> = {}): Snapshot {
  return {
    module: { path: '/usr/lib/libukey_sim.so', description: 'ukey-sim', error: null },
    keys,
    interrupted: [],
    portalConfigured: true,
    portalUrl: 'http://127.0.0.1:8080',
    ...over,
  };
}

export const READY: Status = {
  state: 'ready',
  orderId: 'o1',
  years: 2,
  withEncryption: false,
  newKey: true,
  renewalCodeRequired: false,
};
export const AWAITING: Status = {
  state: 'awaiting_payment',
  orderId: 'o2',
  paymentUrl: 'http://127.0.0.1:8080/pay?serial=0A1B',
};
