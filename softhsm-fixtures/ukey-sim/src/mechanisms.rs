//! Hiding mechanisms: a real key's chip often lacks what SoftHSM2 has (no EC, no
//! RSA-OAEP, no AES key wrap). A hidden mechanism is left out of C_GetMechanismList and
//! C_GetMechanismInfo returns CKR_MECHANISM_INVALID for it. Using it anyway still
//! reaches SoftHSM2: to make a call fail too, arm a [`crate::Fault`] on it (e.g.
//! `C_GenerateKeyPair` with `CKR_MECHANISM_INVALID`).
//!
//! Kept in its own file of the state directory, `hidden-mechanisms.json`
//! (`{"tokens": {"<serial>": [<CKM value>, ...]}}`), read at each of those two calls.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use cryptoki_sys::{CK_MECHANISM_TYPE, CK_RV, CK_ULONG, CKR_BUFFER_TOO_SMALL, CKR_OK};
use serde::{Deserialize, Serialize};

use crate::{Control, SimError};

/// File name in the state directory.
pub const HIDDEN_FILE: &str = "hidden-mechanisms.json";

/// Mechanisms hidden per token serial.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct HiddenMechanisms {
    /// CKM_ values by token serial.
    pub tokens: BTreeMap<String, Vec<u64>>,
}

fn path(dir: &Path) -> PathBuf {
    dir.join(HIDDEN_FILE)
}

/// The hidden mechanisms recorded in a state directory (none if the file is missing).
pub fn read(dir: &Path) -> Result<HiddenMechanisms, SimError> {
    let p = path(dir);
    match std::fs::read(&p) {
        Ok(bytes) => {
            serde_json::from_slice(&bytes).map_err(|source| SimError::Corrupt { path: p, source })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(HiddenMechanisms::default()),
        Err(source) => Err(SimError::Io { path: p, source }),
    }
}

fn write(dir: &Path, hidden: &HiddenMechanisms) -> Result<(), SimError> {
    let p = path(dir);
    let temp = dir.join(format!(".{HIDDEN_FILE}.{}.tmp", std::process::id()));
    let io = |source| SimError::Io {
        path: temp.clone(),
        source,
    };
    let json = serde_json::to_vec_pretty(hidden).map_err(|source| SimError::Corrupt {
        path: p.clone(),
        source,
    })?;
    std::fs::create_dir_all(dir).map_err(io)?;
    std::fs::write(&temp, json).map_err(io)?;
    std::fs::rename(&temp, &p).map_err(|source| SimError::Io { path: p, source })
}

/// The CKM_ values hidden on one token, for the module. A damaged file hides nothing
/// (and says so once on stderr through the caller's warning).
pub(crate) fn hidden_for(dir: &Path, serial: &str) -> Vec<CK_MECHANISM_TYPE> {
    read(dir)
        .ok()
        .and_then(|h| h.tokens.get(serial).cloned())
        .unwrap_or_default()
        .into_iter()
        .map(|m| m as CK_MECHANISM_TYPE)
        .collect()
}

/// Writes `all` minus `hidden` to the caller's list with PKCS#11's two-call convention.
///
/// # Safety
/// `count` must be valid for reads and writes; `list` null or valid for writing
/// `*count` items.
pub(crate) unsafe fn write_filtered(
    all: &[CK_MECHANISM_TYPE],
    hidden: &[CK_MECHANISM_TYPE],
    list: *mut CK_MECHANISM_TYPE,
    count: *mut CK_ULONG,
) -> CK_RV {
    let shown: Vec<CK_MECHANISM_TYPE> = all
        .iter()
        .copied()
        .filter(|m| !hidden.contains(m))
        .collect();
    let n = shown.len() as CK_ULONG;
    // SAFETY: the caller guarantees `count` and `list` per this function's contract,
    // and at most `*count` items are written to `list`.
    unsafe {
        if list.is_null() {
            *count = n;
            return CKR_OK;
        }
        if *count < n {
            *count = n;
            return CKR_BUFFER_TOO_SMALL;
        }
        std::ptr::copy_nonoverlapping(shown.as_ptr(), list, shown.len());
        *count = n;
    }
    CKR_OK
}

impl Control {
    /// Hides a mechanism (a CKM_ value such as `CKM_EC_KEY_PAIR_GEN`, 0x1040) on a token.
    pub fn hide_mechanism(&self, serial: &str, mechanism: u64) -> Result<(), SimError> {
        // Validates the serial like the other controls.
        self.token(serial)?;
        let mut hidden = read(self.dir())?;
        let list = hidden.tokens.entry(serial.to_owned()).or_default();
        if !list.contains(&mechanism) {
            list.push(mechanism);
        }
        write(self.dir(), &hidden)
    }

    /// Shows every mechanism of a token again.
    pub fn show_all_mechanisms(&self, serial: &str) -> Result<(), SimError> {
        self.token(serial)?;
        let mut hidden = read(self.dir())?;
        if hidden.tokens.remove(serial).is_some() {
            write(self.dir(), &hidden)?;
        }
        Ok(())
    }

    /// The mechanisms hidden on a token.
    pub fn hidden_mechanisms(&self, serial: &str) -> Result<Vec<u64>, SimError> {
        Ok(read(self.dir())?
            .tokens
            .get(serial)
            .cloned()
            .unwrap_or_default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hidden_mechanisms_are_left_out_of_the_two_call_list() {
        let all = [0x0000, 0x0001, 0x0040, 0x1040];
        let hidden = [0x1040];
        let mut count: CK_ULONG = 0;
        // SAFETY: `count` is a valid local; a null list asks for the size.
        let rv = unsafe { write_filtered(&all, &hidden, std::ptr::null_mut(), &mut count) };
        assert_eq!((rv, count), (CKR_OK, 3));
        let mut small = [0 as CK_MECHANISM_TYPE; 2];
        count = 2;
        // SAFETY: `small` holds `count` items.
        let rv = unsafe { write_filtered(&all, &hidden, small.as_mut_ptr(), &mut count) };
        assert_eq!((rv, count), (CKR_BUFFER_TOO_SMALL, 3));
        let mut list = [0 as CK_MECHANISM_TYPE; 3];
        // SAFETY: `list` holds `count` (3) items.
        let rv = unsafe { write_filtered(&all, &hidden, list.as_mut_ptr(), &mut count) };
        assert_eq!(rv, CKR_OK);
        assert_eq!(list, [0x0000, 0x0001, 0x0040]);
    }

    #[test]
    fn control_hides_and_shows_per_token() {
        let dir = tempfile::tempdir().expect("temp dir");
        let control = Control::new(dir.path()).expect("control");
        control.hide_mechanism("abc", 0x1040).expect("hide");
        control.hide_mechanism("abc", 0x1040).expect("hide twice");
        assert_eq!(
            control.hidden_mechanisms("abc").expect("read"),
            vec![0x1040]
        );
        assert_eq!(hidden_for(dir.path(), "abc"), vec![0x1040]);
        assert!(hidden_for(dir.path(), "other").is_empty());
        control.show_all_mechanisms("abc").expect("show");
        assert!(hidden_for(dir.path(), "abc").is_empty());
        assert!(control.hide_mechanism("", 1).is_err(), "bad serial");
    }
}
