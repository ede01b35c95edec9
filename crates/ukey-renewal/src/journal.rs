//! The durable journal of one renewal: one JSON file per token serial and certificate
//! serial, rewritten before and after every step with write + fsync of a temporary
//! file, atomic rename, fsync of the directory.
//!
//! **Invariant:** the journal holds no secret. No PIN (the engine never has it outside
//! the login call), no private key material (there is none on the client: the escrowed
//! key travels wrapped and is unwrapped on the token). Certificates, serials, object
//! ids and labels, and the order id are public.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use ukey_portal_api::KeyPolicy;
use ukey_token::KeyAlg;

use crate::error::RenewalError;
use crate::events::Step;

/// Environment variable overriding the data directory (tests, portable installs).
pub const DATA_DIR_ENV: &str = "UKEY_DATA_DIR";
/// Format version of journal files.
pub const JOURNAL_VERSION: u32 = 1;

/// The user's data directory for journals: `$UKEY_DATA_DIR`, else the platform's data
/// dir (`~/.local/share/ukey` on Linux).
pub fn default_data_dir() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os(DATA_DIR_ENV) {
        return Some(PathBuf::from(p));
    }
    directories::ProjectDirs::from("", "", "ukey").map(|d| d.data_dir().to_owned())
}

/// A CKA_ID as the journal keeps it: bytes, written as hex, never empty. A damaged
/// file cannot turn into an empty id (which would match every object in a template):
/// an empty or unparsable id makes the whole journal unreadable.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct KeyId(Vec<u8>);

impl KeyId {
    /// An id from bytes; `None` for an empty one.
    pub fn new(bytes: Vec<u8>) -> Option<KeyId> {
        (!bytes.is_empty()).then_some(KeyId(bytes))
    }

    /// The bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// Lower-case hex.
    pub fn hex(&self) -> String {
        hex::encode(&self.0)
    }
}

impl Serialize for KeyId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.hex())
    }
}

impl<'de> Deserialize<'de> for KeyId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<KeyId, D::Error> {
        let s = String::deserialize(d)?;
        let bytes = hex::decode(&s)
            .map_err(|e| serde::de::Error::custom(format!("CKA_ID {s:?} is not hex: {e}")))?;
        KeyId::new(bytes).ok_or_else(|| serde::de::Error::custom("empty CKA_ID"))
    }
}

/// Prefix of the CKA_ID of every object the engine creates while a renewal is pending.
pub const PENDING_ID_PREFIX: &[u8] = b"ukey-renew:";

/// The CKA_ID of objects a pending renewal created and owns: `ukey-renew:<renewal
/// id>:<role>`. Only such ids are ever used to find objects by id alone; everything
/// else is found by identity (certificate value, key material).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PendingId(KeyId);

impl PendingId {
    /// `ukey-renew:<renewal_id>:<role>`.
    pub fn new(renewal_id: &str, role: &str) -> PendingId {
        PendingId(KeyId(
            format!("ukey-renew:{renewal_id}:{role}").into_bytes(),
        ))
    }

    /// Parses an id read from the token or a journal; `None` unless it is a pending id
    /// with a renewal id and a role.
    pub fn parse(bytes: &[u8]) -> Option<PendingId> {
        let rest = bytes.strip_prefix(PENDING_ID_PREFIX)?;
        let text = std::str::from_utf8(rest).ok()?;
        let (rid, role) = text.split_once(':')?;
        (!rid.is_empty() && !role.is_empty()).then(|| PendingId(KeyId(bytes.to_vec())))
    }

    /// The renewal id it carries.
    pub fn renewal_id(&self) -> &str {
        std::str::from_utf8(&self.0.0[PENDING_ID_PREFIX.len()..])
            .ok()
            .and_then(|t| t.split_once(':'))
            .map(|(rid, _)| rid)
            .unwrap_or_default()
    }

    /// The bytes.
    pub fn as_bytes(&self) -> &[u8] {
        self.0.as_bytes()
    }

    /// As a plain id.
    pub fn key_id(&self) -> &KeyId {
        &self.0
    }
}

impl Serialize for PendingId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(s)
    }
}

impl<'de> Deserialize<'de> for PendingId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<PendingId, D::Error> {
        let id = KeyId::deserialize(d)?;
        PendingId::parse(id.as_bytes())
            .ok_or_else(|| serde::de::Error::custom("not a pending object id (ukey-renew:…)"))
    }
}

/// A certificate and its key pair's CKA_ID and label on the token, as they were.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OldObjects {
    /// Serial, canonical hex.
    pub serial: String,
    /// The certificate DER, hex (public).
    pub cert_der_hex: String,
    /// CKA_ID.
    #[serde(rename = "id_hex")]
    pub id: KeyId,
    /// CKA_LABEL of the certificate.
    pub label: String,
    /// Key algorithm.
    pub alg: KeyAlg,
}

/// Where the new objects live while pending and once active.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectNames {
    /// CKA_ID while pending.
    #[serde(rename = "pending_id_hex")]
    pub pending_id: PendingId,
    /// CKA_LABEL while pending.
    pub pending_label: String,
    /// CKA_ID once active.
    #[serde(rename = "final_id_hex")]
    pub final_id: KeyId,
    /// CKA_LABEL once active.
    pub final_label: String,
}

/// Where the old encryption certificate and key are archived.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArchiveNames {
    /// CKA_ID once archived.
    #[serde(rename = "final_id_hex")]
    pub id: KeyId,
    /// CKA_LABEL once archived.
    #[serde(rename = "final_label")]
    pub label: String,
}

/// What the portal issued (public data only).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IssuedCerts {
    /// Signing certificate serial.
    pub serial: String,
    /// Signing certificate DER, hex.
    pub cert_der_hex: String,
    /// Encryption certificate serial.
    pub enc_serial: Option<String>,
    /// Encryption certificate DER, hex.
    pub enc_cert_der_hex: Option<String>,
    /// End of validity of the signing certificate.
    #[serde(with = "time::serde::rfc3339")]
    pub not_after: OffsetDateTime,
}

/// Where a CMP renewal's transaction stands (RFC 9483): the identifiers it is checked
/// by, and what the CA answered. Public data only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CmpRecord {
    /// The CA's CMP endpoint.
    pub url: String,
    /// `kur` or `cr`.
    pub request: String,
    /// The transaction, once a request was sent.
    pub transaction: Option<CmpTransactionRecord>,
}

/// A CMP transaction in the journal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CmpTransactionRecord {
    /// transactionID, hex.
    pub id_hex: String,
    /// Our last senderNonce, hex.
    pub sender_nonce_hex: String,
    /// The CA's last senderNonce, hex.
    pub recip_nonce_hex: Option<String>,
    /// certReqId, hex.
    pub cert_req_id_hex: String,
    /// Where it stands.
    pub state: CmpState,
    /// The certificate the CA issued, DER hex (from `issued`).
    pub cert_der_hex: Option<String>,
    /// The certificates the answer carried (the CA's chain), DER hex.
    pub chain_der_hex: Vec<String>,
}

/// Where a CMP transaction stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CmpState {
    /// The request is being sent; its answer is not recorded.
    Sent,
    /// The CA answered "waiting": poll.
    Waiting,
    /// The CA issued the certificate.
    Issued,
    /// certConf sent; its answer not recorded (the CA may have it).
    ConfirmSent,
    /// certConf sent and pkiConf received (or implicit confirmation granted).
    Confirmed,
}

/// Whether a step has started or is done.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepState {
    /// Recorded before the step runs.
    Started,
    /// Recorded after it succeeded.
    Done,
}

/// How a journal ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Outcome {
    /// Still running, or interrupted: reconcile and resume.
    Unfinished,
    /// Renewed and confirmed to the portal.
    Completed,
    /// Stopped before anything was activated; pending objects removed.
    RolledBack {
        /// Why (error code).
        reason: String,
    },
}

/// One line of history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryEntry {
    /// The step.
    pub step: Step,
    /// Started or done.
    pub state: StepState,
    /// When.
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
}

/// The journal of one renewal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Journal {
    /// [`JOURNAL_VERSION`].
    pub version: u32,
    /// Random id of this renewal attempt (hex); part of the pending objects' ids.
    pub renewal_id: String,
    /// Token serial.
    pub token_serial: String,
    /// Token label.
    pub token_label: String,
    /// The portal order.
    pub order_id: String,
    /// New key or same key.
    pub key_policy: KeyPolicy,
    /// Algorithm of the new signing key.
    pub new_alg: KeyAlg,
    /// Whether an escrowed encryption certificate comes with the renewal.
    pub with_encryption: bool,
    /// The certificate being renewed.
    pub old: OldObjects,
    /// The encryption certificate being archived, if any.
    pub old_encryption: Option<OldObjects>,
    /// The new signing certificate (and key, for the new-key policy).
    pub signing: ObjectNames,
    /// The new encryption certificate and key.
    pub encryption: Option<ObjectNames>,
    /// CKA_ID and label the old encryption objects are archived under.
    pub archive: Option<ArchiveNames>,
    /// What the portal issued, once verified.
    pub issued: Option<IssuedCerts>,
    /// The current step.
    pub step: Step,
    /// Its state.
    pub state: StepState,
    /// Activation sub-steps done (see the engine's activate step).
    pub activate_done: u32,
    /// How it ended.
    pub outcome: Outcome,
    /// Every step transition.
    pub history: Vec<HistoryEntry>,
    /// A renewal over CMP: its transaction (none for the portal's REST protocol).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmp: Option<CmpRecord>,
}

impl Journal {
    /// File name for a token and certificate serial (characters outside `[A-Za-z0-9-]`
    /// replaced).
    pub fn file_name(token_serial: &str, cert_serial: &str) -> String {
        let clean = |s: &str| -> String {
            s.chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() || c == '-' {
                        c
                    } else {
                        '_'
                    }
                })
                .collect()
        };
        format!("{}_{}.json", clean(token_serial), clean(cert_serial))
    }

    /// Whether the renewal still has to be finished or rolled back.
    pub fn is_unfinished(&self) -> bool {
        self.outcome == Outcome::Unfinished
    }

    /// Whether one of `certificates` (DER) is the certificate this renewal renews or the
    /// one it was issued: at every step of a renewal one of them is on the key, so this
    /// tells which of several keys with one serial the journal is about.
    pub fn names_a_certificate_in(&self, certificates: &[Vec<u8>]) -> bool {
        let mine = [
            Some(self.old.cert_der_hex.as_str()),
            self.issued.as_ref().map(|i| i.cert_der_hex.as_str()),
        ];
        certificates.iter().any(|der| {
            let h = hex::encode(der);
            mine.iter().flatten().any(|m| m.eq_ignore_ascii_case(&h))
        })
    }

    /// Whether activation has begun: from then on only forward.
    pub fn activation_begun(&self) -> bool {
        self.step >= Step::Activate
    }

    /// Records a transition in memory (call [`JournalStore::save`] to make it durable).
    pub fn mark(&mut self, step: Step, state: StepState) {
        self.step = step;
        self.state = state;
        self.history.push(HistoryEntry {
            step,
            state,
            at: OffsetDateTime::now_utc(),
        });
    }
}

/// The directory of journal files.
#[derive(Debug, Clone)]
pub struct JournalStore {
    dir: PathBuf,
}

impl JournalStore {
    /// Journals in `<data_dir>/journal`.
    pub fn new(data_dir: &Path) -> JournalStore {
        JournalStore {
            dir: data_dir.join("journal"),
        }
    }

    /// In [`default_data_dir`].
    pub fn open_default() -> Result<JournalStore, RenewalError> {
        let dir = default_data_dir().ok_or_else(|| RenewalError::Journal {
            path: PathBuf::new(),
            reason: "no data directory (set UKEY_DATA_DIR)".to_owned(),
        })?;
        Ok(JournalStore::new(&dir))
    }

    /// The journal directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Path of a journal.
    pub fn path_of(&self, token_serial: &str, cert_serial: &str) -> PathBuf {
        self.dir.join(Journal::file_name(token_serial, cert_serial))
    }

    /// Durably writes `journal`: temp file, fsync, rename over the old one, fsync dir.
    pub fn save(&self, journal: &Journal) -> Result<(), RenewalError> {
        self.save_with(journal, true)
    }

    /// Writes `journal` atomically (temp file + rename: a killed process leaves the old
    /// or the new record, whole); with `durable`, also fsyncs the file and the
    /// directory so the record survives a power cut.
    pub fn save_with(&self, journal: &Journal, durable: bool) -> Result<(), RenewalError> {
        let path = self.path_of(&journal.token_serial, &journal.old.serial);
        let err = |reason: String| RenewalError::Journal {
            path: path.clone(),
            reason,
        };
        fs::create_dir_all(&self.dir).map_err(|e| err(e.to_string()))?;
        let json = serde_json::to_vec_pretty(journal).map_err(|e| err(e.to_string()))?;
        let tmp = path.with_extension("json.tmp");
        {
            let mut f = OpenOptions::new()
                .create(true)
                .write(true)
                .truncate(true)
                .open(&tmp)
                .map_err(|e| err(e.to_string()))?;
            f.write_all(&json).map_err(|e| err(e.to_string()))?;
            if durable {
                f.sync_all().map_err(|e| err(e.to_string()))?;
            }
        }
        fs::rename(&tmp, &path).map_err(|e| err(e.to_string()))?;
        if !durable {
            return Ok(());
        }
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| err(format!("fsync of the directory: {e}")))?;
        Ok(())
    }

    /// Reads one journal; `None` if there is none.
    pub fn load(
        &self,
        token_serial: &str,
        cert_serial: &str,
    ) -> Result<Option<Journal>, RenewalError> {
        read(&self.path_of(token_serial, cert_serial))
    }

    /// Every journal of a token.
    pub fn for_token(&self, token_serial: &str) -> Result<Vec<Journal>, RenewalError> {
        let mut out = Vec::new();
        let entries = match fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
            Err(e) => {
                return Err(RenewalError::Journal {
                    path: self.dir.clone(),
                    reason: e.to_string(),
                });
            }
        };
        let own_prefix = Journal::file_name(token_serial, "");
        let own_prefix = own_prefix.trim_end_matches(".json");
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().and_then(|e| e.to_str()) != Some("json") {
                continue;
            }
            // `<token>_<certificate serial>.json`: serials hold no `_`.
            let own = path
                .file_stem()
                .and_then(|s| s.to_str())
                .and_then(|s| s.rsplit_once('_'))
                .is_some_and(|(token, _)| format!("{token}_") == own_prefix);
            match read(&path) {
                Ok(Some(j)) if j.token_serial == token_serial => out.push(j),
                Ok(_) => {}
                // A damaged or newer journal blocks only its own token.
                Err(e) if own => return Err(e),
                Err(e) => tracing::debug!("journal of another token skipped: {e}"),
            }
        }
        out.sort_by(|a, b| a.old.serial.cmp(&b.old.serial));
        Ok(out)
    }
}

fn read(path: &Path) -> Result<Option<Journal>, RenewalError> {
    let bytes = match fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(RenewalError::Journal {
                path: path.to_owned(),
                reason: e.to_string(),
            });
        }
    };
    // The version first: a newer format may not parse as this one.
    let version = serde_json::from_slice::<serde_json::Value>(&bytes)
        .ok()
        .and_then(|v| v.get("version").and_then(|v| v.as_u64()));
    if let Some(v) = version.filter(|v| *v > u64::from(JOURNAL_VERSION)) {
        return Err(RenewalError::Journal {
            path: path.to_owned(),
            reason: format!(
                "written by a newer version of this program (format {v}); update it to finish this key's renewal"
            ),
        });
    }
    let damaged = |e: String| RenewalError::Journal {
        path: path.to_owned(),
        reason: format!(
            "damaged journal, so this key's renewal cannot go on (not deleted: support can \
             read it; moving it away starts over, and may leave objects of an interrupted \
             renewal on the key): {e}"
        ),
    };
    let j: Journal = serde_json::from_slice(&bytes).map_err(|e| damaged(e.to_string()))?;
    j.check().map_err(damaged)?;
    Ok(Some(j))
}

impl Journal {
    /// What the engine relies on when it resumes, beyond the JSON's shape: from
    /// activation on, the verified certificates are recorded (activation works from
    /// them alone), and an encryption certificate is recorded whole or not at all.
    fn check(&self) -> Result<(), String> {
        if self.is_unfinished() && self.activation_begun() && self.issued.is_none() {
            return Err("activation has begun but no verified certificate is recorded".into());
        }
        if let Some(i) = &self.issued {
            if i.enc_serial.is_some() != i.enc_cert_der_hex.is_some() {
                return Err("half an encryption certificate is recorded".into());
            }
            if i.enc_serial.is_some() != self.encryption.is_some() {
                return Err(
                    "the recorded encryption certificate does not match the renewal's plan".into(),
                );
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn journal(token: &str, step: Step) -> Journal {
        let names = |id: &[u8]| ObjectNames {
            pending_id: PendingId::new("00aa", "sig"),
            pending_label: "pending".into(),
            final_id: KeyId::new(id.to_vec()).expect("id"),
            final_label: "张三 签名".into(),
        };
        Journal {
            version: JOURNAL_VERSION,
            renewal_id: "00aa".into(),
            token_serial: token.into(),
            token_label: "UKey".into(),
            order_id: "order-1".into(),
            key_policy: KeyPolicy::New,
            new_alg: KeyAlg::Rsa2048,
            with_encryption: false,
            old: OldObjects {
                serial: "52".into(),
                cert_der_hex: "3000".into(),
                id: KeyId::new(vec![1]).expect("id"),
                label: "张三 签名".into(),
                alg: KeyAlg::Rsa2048,
            },
            old_encryption: None,
            signing: names(&[1]),
            encryption: None,
            archive: None,
            issued: None,
            step,
            state: StepState::Started,
            activate_done: 0,
            outcome: Outcome::Unfinished,
            history: vec![],
            cmp: None,
        }
    }

    fn issued(with_encryption: bool) -> IssuedCerts {
        IssuedCerts {
            serial: "53".into(),
            cert_der_hex: "3000".into(),
            enc_serial: with_encryption.then(|| "54".into()),
            enc_cert_der_hex: with_encryption.then(|| "3000".into()),
            not_after: OffsetDateTime::now_utc(),
        }
    }

    #[test]
    fn a_journal_the_engine_could_not_resume_from_is_damaged_and_blocks_only_its_token() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = JournalStore::new(dir.path());
        // Written by the engine: fine before and after verification.
        let mut fine = journal("AAAA", Step::Write);
        store.save(&fine).expect("save");
        assert_eq!(store.for_token("AAAA").expect("read").len(), 1);
        fine.step = Step::Activate;
        fine.issued = Some(issued(false));
        store.save(&fine).expect("save");
        assert!(store.for_token("AAAA").is_ok());

        // Activation begun with no verified certificate: nothing to activate from.
        let mut broken = journal("BBBB", Step::Activate);
        store.save(&broken).expect("save");
        let e = store.for_token("BBBB").unwrap_err();
        assert!(e.to_string().contains("damaged"), "{e}");
        assert!(e.to_string().contains("no verified certificate"), "{e}");
        // An encryption certificate the plan did not have.
        broken.issued = Some(issued(true));
        store.save(&broken).expect("save");
        let e = store.for_token("BBBB").unwrap_err();
        assert!(e.to_string().contains("does not match"), "{e}");
        // Half an encryption certificate.
        let mut half = issued(true);
        half.enc_cert_der_hex = None;
        broken.issued = Some(half);
        store.save(&broken).expect("save");
        assert!(store.for_token("BBBB").is_err());

        // The other token's journals still read.
        assert_eq!(store.for_token("AAAA").expect("read").len(), 1);
    }
}
