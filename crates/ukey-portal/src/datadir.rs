//! The data directory's permissions (issue 16, secrets at rest): it holds the CA key,
//! the admin token and, in the database, every holder's escrowed decryption key. It is
//! created 0700 and every file in it is written 0600; a directory or file that group or
//! others may read or write stops the portal, with the command that fixes it.

use std::path::{Path, PathBuf};

/// Mode bits nobody but the owner may have on the directory and its files.
const OPEN_TO_OTHERS: u32 = 0o077;

/// Creates `dir` (0700) when missing, then checks it and everything in it.
pub fn prepare(dir: &Path) -> Result<(), String> {
    let setup = |e: std::io::Error| format!("{}: {e}", dir.display());
    if !dir.exists() {
        let mut b = std::fs::DirBuilder::new();
        b.recursive(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::DirBuilderExt as _;
            b.mode(0o700);
        }
        b.create(dir).map_err(setup)?;
    }
    check(dir)
}

/// Refuses a data directory that group or others may read, write or enter, or that
/// holds such a file (or directory).
pub fn check(dir: &Path) -> Result<(), String> {
    let open = open_entries(dir)?;
    if open.is_empty() {
        return Ok(());
    }
    let list: Vec<String> = open
        .iter()
        .map(|(p, mode)| format!("{} ({:o})", p.display(), mode & 0o777))
        .collect();
    let d = dir.display();
    Err(format!(
        "数据目录中的 CA 密钥与托管的解密密钥可被其他用户读取，门户拒绝启动 / the data directory holds the CA key and \
         escrowed decryption keys, and other users can reach it: {}. Fix: chmod 700 {d} && chmod 600 {d}/* \
         (check who else could have read them)",
        list.join(", ")
    ))
}

#[cfg(unix)]
fn open_entries(dir: &Path) -> Result<Vec<(PathBuf, u32)>, String> {
    use std::os::unix::fs::PermissionsExt as _;
    let setup = |p: &Path, e: std::io::Error| format!("{}: {e}", p.display());
    let mut out = Vec::new();
    let mode = std::fs::metadata(dir)
        .map_err(|e| setup(dir, e))?
        .permissions()
        .mode();
    if mode & OPEN_TO_OTHERS != 0 {
        out.push((dir.to_owned(), mode));
    }
    for entry in std::fs::read_dir(dir).map_err(|e| setup(dir, e))? {
        let entry = entry.map_err(|e| setup(dir, e))?;
        let meta = entry.metadata().map_err(|e| setup(&entry.path(), e))?;
        if meta.is_dir() {
            out.extend(open_entries(&entry.path())?);
        } else if meta.permissions().mode() & OPEN_TO_OTHERS != 0 {
            out.push((entry.path(), meta.permissions().mode()));
        }
    }
    Ok(out)
}

#[cfg(not(unix))]
fn open_entries(_dir: &Path) -> Result<Vec<(PathBuf, u32)>, String> {
    // Windows: the user profile's ACLs; not checked here.
    Ok(Vec::new())
}

/// Creates an empty file readable by the owner only, unless it exists (SQLite then
/// opens it, and gives its journal files the same mode).
pub fn create_private(path: &Path) -> Result<(), String> {
    if path.exists() {
        return Ok(());
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(0o600);
    }
    options
        .open(path)
        .map(drop)
        .map_err(|e| format!("{}: {e}", path.display()))
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    fn chmod(p: &Path, mode: u32) {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn a_directory_or_file_others_can_read_is_refused_with_the_fix() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("data");
        prepare(&dir).unwrap();
        let mode = std::fs::metadata(&dir).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        create_private(&dir.join("db")).unwrap();
        check(&dir).unwrap();

        chmod(&dir.join("db"), 0o644);
        let e = check(&dir).unwrap_err();
        assert!(e.contains("db (644)") && e.contains("chmod 600"), "{e}");
        chmod(&dir.join("db"), 0o600);

        chmod(&dir, 0o755);
        let e = prepare(&dir).unwrap_err();
        assert!(e.contains("(755)") && e.contains("chmod 700"), "{e}");
    }
}
