// The one module that talks to the backend: every `invoke`, event and plugin call of
// the UI goes through here, typed. Types mirror src-tauri/src/view.rs and commands.rs.
import { invoke, Channel } from '@tauri-apps/api/core';
import { listen, type UnlistenFn } from '@tauri-apps/api/event';
import { writeText } from '@tauri-apps/plugin-clipboard-manager';

/** An error from the backend: the UI translates `code`, `message` is the fallback. */
export interface IpcError {
  code: string;
  message: string;
}

export type Status =
  | { state: 'checking' }
  | { state: 'unknown' }
  | { state: 'unavailable'; error: IpcError }
  | { state: 'none' }
  | { state: 'awaiting_payment'; orderId: string; paymentUrl: string }
  | {
      state: 'ready';
      orderId: string;
      years: number;
      withEncryption: boolean;
      newKey: boolean;
      /** The portal asks for the order's renewal code (shown on the paid order page). */
      renewalCodeRequired: boolean;
    }
  | { state: 'issued'; orderId: string; renewalCodeRequired: boolean }
  | { state: 'completed'; orderId: string; newSerial: string }
  | { state: 'requires_new_key'; orderId: string; trackingNumber: string }
  | { state: 'cmp' }
  | { state: 'under_review'; orderId: string }
  | { state: 'rejected'; orderId: string; reason: string };

export interface Cert {
  keyId: string;
  label: string;
  serial: string | null;
  holder: string | null;
  organisation: string | null;
  subject: string | null;
  issuer: string | null;
  notBefore: string | null;
  notAfter: string | null;
  daysLeft: number | null;
  algorithm: string | null;
  usage: 'signing' | 'encryption' | 'both' | 'ca' | null;
  hasKey: boolean | null;
  error: IpcError | null;
  status: Status;
}

export interface PinView {
  countLow: boolean;
  finalTry: boolean;
  locked: boolean;
  pinPad: boolean;
  wrongEntries: number;
  /** Tries left before the PIN locks, when the key says (SKF keys); else null. */
  triesLeft: number | null;
}

export interface Key {
  /** Identifies the key in commands: its serial, or serial@slot when keys share one. */
  id: string;
  serial: string;
  label: string;
  manufacturer: string;
  model: string;
  /** How the key is used: PKCS#11 or SKF (GM/T 0016). */
  interface: 'pkcs11' | 'skf';
  pin: PinView;
  certificates: Cert[];
  errors: IpcError[];
}

export interface Interrupted {
  tokenId: string;
  tokenLabel: string;
  certSerial: string;
  keyPresent: boolean;
}

export interface Snapshot {
  module: { path: string | null; description: string | null; error: IpcError | null };
  keys: Key[];
  interrupted: Interrupted[];
  portalConfigured: boolean;
  portalUrl: string | null;
}

export interface Settings {
  pkcs11Module: string | null;
  portalUrl: string | null;
  trustAnchors: string[];
  language: 'zh-CN' | 'en' | null;
  autostart: boolean;
  supportContact: string | null;
}

export interface SettingsView {
  /** As in the user's files: config.toml (shared with the CLI) and settings.json. */
  file: Settings;
  effective: Settings;
  /** What the CA's system-wide config.toml sets. */
  system: Settings;
  envOverrides: string[];
  language: 'zh-CN' | 'en';
  detectedModules: { name: string; path: string }[];
  settingsPath: string;
  configPath: string | null;
  systemConfigPath: string;
  autostartRegistered: boolean | null;
  version: string;
}

/** Renewal progress, as sent over the `renew` channel (src-tauri/src/renewal.rs). */
export type RenewEvent =
  | { event: 'step'; data: { step: string; index: number; total: number; writing: boolean } }
  | { event: 'resuming'; data: { from: string } };

/** What the engine says before the PIN (ukey_renewal::Notice), with its own text. */
export type Notice =
  | { notice: 'old_certificate_revoked'; serial: string; text: string }
  | { notice: 'old_decryption_key_archived'; serial: string; text: string }
  | { notice: 'algorithm_upgrade'; from: string; to: string; text: string }
  | { notice: 'resuming'; step: string; text: string };

export interface PlanView {
  notices: Notice[];
  resuming: boolean;
}

/** What a finished renewal reports. */
export interface RenewOutcome {
  newSerial: string;
  notAfter: string;
  encryptionSerial: string | null;
  archivedSerial: string | null;
  resumed: boolean;
  selfTestInThisRun: boolean;
}

/** A bilingual text of the diagnosis report. */
export interface Text {
  'zh-CN': string;
  en: string;
}

/** The diagnosis report (serde form of ukey_diagnose::Report). */
export interface Report {
  format: number;
  app_version: string;
  generated_at: string;
  duration_ms: number;
  overall: 'pass' | 'warn' | 'fail' | 'skip';
  counts: { pass: number; warn: number; fail: number; skip: number };
  redacted: boolean;
  sections: {
    kind: string;
    id: string;
    title: Text;
    verdict?: string;
    summary?: Text;
    checks: { id: string; status: 'pass' | 'warn' | 'fail' | 'skip'; reason: Text; action?: Text; facts?: Record<string, unknown> }[];
  }[];
}

/** What the `diagnose` command returns: the report, and its redacted text to copy. */
export interface DiagnosticsResult {
  report: Report;
  redactedTextZh: string;
  redactedTextEn: string;
}

/** Turns whatever a rejected promise carries into an IpcError. */
export function toIpcError(e: unknown): IpcError {
  if (e && typeof e === 'object' && 'code' in e && 'message' in e) {
    return { code: String((e as IpcError).code), message: String((e as IpcError).message) };
  }
  return { code: 'internal', message: String(e) };
}

async function call<T>(cmd: string, args?: Record<string, unknown>): Promise<T> {
  try {
    return await invoke<T>(cmd, args);
  } catch (e) {
    throw toIpcError(e);
  }
}

export const getSnapshot = () => call<Snapshot>('get_snapshot');
export const refresh = () => call<void>('refresh');
export const getSettings = () => call<SettingsView>('get_settings');
export const saveSettings = (settings: Settings) => call<SettingsView>('save_settings', { settings });

/** Runs the diagnosis; with a PIN it also proves each key signs (the PIN is used once, never kept). */
export const diagnose = (pin?: string) =>
  call<DiagnosticsResult>('diagnose', { pin: pin ?? null, tokenId: null });
/** Writes the last report, redacted, as JSON to a path the user chose. */
/** Asks where to save the last diagnosis (a dialog Rust opens) and saves it: the path, or null. */
export const saveReport = () => call<string | null>('save_report');

/** What renewing will do, before the PIN (engine preflight). */
export const planRenewal = (tokenId: string, certSerial: string) =>
  call<PlanView>('plan_renewal', { tokenId, certSerial });

/**
 * Renews one certificate. The PIN is passed once and not kept here.
 * `confirmFinalTry`: the user was shown that this is the PIN's last try.
 * `renewalCode`: the order's renewal code, when the portal asks for one.
 */
export function renew(
  tokenId: string,
  certSerial: string,
  pin: string,
  confirmFinalTry: boolean,
  renewalCode: string | null,
  onEvent: (e: RenewEvent) => void,
): Promise<RenewOutcome> {
  const channel = new Channel<RenewEvent>();
  channel.onmessage = onEvent;
  return call<RenewOutcome>('renew', {
    tokenId,
    certSerial,
    pin,
    confirmFinalTry,
    renewalCode,
    onEvent: channel,
  });
}

/** A renewal code as typed ("1234-5678", "1234 5678"): its 8 digits, or null. */
export function canonicalRenewalCode(typed: string): string | null {
  const digits = typed.replace(/[\s-]/g, '');
  return /^[0-9]{8}$/.test(digits) ? digits : null;
}

/** Snapshot events: keys inserted or removed, statuses answered. */
export function onSnapshot(cb: (s: Snapshot) => void): Promise<UnlistenFn> {
  return listen<Snapshot>('snapshot', (e) => cb(e.payload));
}

/** Opens a page of the configured portal; Rust refuses any other origin. */
export async function openUrl(url: string): Promise<void> {
  try {
    await invoke('open_portal_page', { url });
  } catch (e) {
    throw toIpcError(e);
  }
}

export async function copyText(text: string): Promise<void> {
  try {
    await writeText(text);
  } catch (e) {
    throw toIpcError(e);
  }
}

/** A file chosen by the user in a dialog Rust opens (the module or a trust anchor), or null. */
export const chooseFile = (kind: 'module' | 'trust') => call<string | null>('choose_file', { kind });
