// What each certificate shows and which one action it offers, derived from the
// snapshot. Pure functions: the Vitest suite covers every state here and in the DOM.
import type { Cert, Key, Snapshot, Interrupted } from './api';

/** Days before expiry from which "expiring, no order" is shown. */
export const EXPIRING_DAYS = 30;

export type CertState =
  | 'interrupted'
  | 'pin_locked'
  | 'ready'
  | 'issued'
  | 'awaiting_payment'
  | 'under_review'
  | 'cmp'
  | 'rejected'
  | 'requires_new_key'
  | 'completed'
  | 'expiring'
  | 'expired'
  | 'valid'
  | 'checking'
  | 'unavailable'
  | 'unknown'
  | 'corrupt';

/** The one action a state offers. */
export type Action =
  | { kind: 'renew'; resume: boolean }
  | { kind: 'pay'; url: string }
  | { kind: 'apply'; url: string }
  | { kind: 'fix'; url: string }
  | { kind: 'none' };

export function interruptedFor(snapshot: Snapshot, key: Key): Interrupted | undefined {
  return snapshot.interrupted.find((i) => i.tokenId === key.id);
}

export function certState(snapshot: Snapshot, key: Key, cert: Cert): CertState {
  if (cert.error || !cert.serial) return 'corrupt';
  const interrupted = interruptedFor(snapshot, key);
  if (interrupted && interrupted.certSerial === cert.serial) return 'interrupted';
  const s = cert.status;
  if ((s.state === 'ready' || s.state === 'issued' || s.state === 'cmp') && key.pin.locked) return 'pin_locked';
  switch (s.state) {
    case 'ready':
    case 'issued':
    case 'awaiting_payment':
    case 'under_review':
    case 'cmp':
    case 'rejected':
    case 'requires_new_key':
    case 'completed':
    case 'checking':
      return s.state;
    case 'unavailable':
    case 'unknown':
    case 'none': {
      const days = cert.daysLeft ?? 0;
      if (days <= 0) return 'expired';
      if (days <= EXPIRING_DAYS) return 'expiring';
      return s.state === 'none' ? 'valid' : s.state;
    }
  }
}

function portalPage(snapshot: Snapshot, serial: string): string | null {
  if (!snapshot.portalUrl) return null;
  return `${snapshot.portalUrl.replace(/\/+$/, '')}/pay?serial=${encodeURIComponent(serial)}`;
}

export function certAction(snapshot: Snapshot, key: Key, cert: Cert): Action {
  const state = certState(snapshot, key, cert);
  const s = cert.status;
  switch (state) {
    case 'ready':
    case 'issued':
    case 'cmp':
      return { kind: 'renew', resume: false };
    case 'interrupted':
      return interruptedFor(snapshot, key)?.keyPresent
        ? { kind: 'renew', resume: true }
        : { kind: 'none' };
    case 'awaiting_payment':
      return s.state === 'awaiting_payment' ? { kind: 'pay', url: s.paymentUrl } : { kind: 'none' };
    case 'expiring':
    case 'expired': {
      const url = cert.serial ? portalPage(snapshot, cert.serial) : null;
      return url ? { kind: 'apply', url } : { kind: 'none' };
    }
    case 'rejected': {
      const url = cert.serial ? portalPage(snapshot, cert.serial) : null;
      return url ? { kind: 'fix', url } : { kind: 'none' };
    }
    default:
      return { kind: 'none' };
  }
}

/** Every certificate with a renewal waiting now (for the banner and "renew all"): not
 *  those a CMP CA could renew, which have no order to announce. */
export function renewable(snapshot: Snapshot): { key: Key; cert: Cert }[] {
  const out: { key: Key; cert: Cert }[] = [];
  for (const key of snapshot.keys) {
    for (const cert of key.certificates) {
      const a = certAction(snapshot, key, cert);
      if (a.kind === 'renew' && cert.status.state !== 'cmp') out.push({ key, cert });
    }
  }
  return out;
}

/** An empty snapshot, before the backend answers. */
export function emptySnapshot(): Snapshot {
  return {
    module: { path: null, description: null, error: null },
    keys: [],
    interrupted: [],
    portalConfigured: false,
    portalUrl: null,
  };
}
