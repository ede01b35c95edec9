//! Finding SoftHSM2's PKCS#11 module on this machine.

use std::path::PathBuf;

use crate::FixtureError;

/// Where distributions put SoftHSM2's module, most common first.
const KNOWN_PATHS: &[&str] = &[
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib64/pkcs11/libsofthsm2.so",
    "/usr/lib/pkcs11/libsofthsm2.so",
    "/usr/lib64/softhsm/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
    "/opt/homebrew/lib/softhsm/libsofthsm2.so",
    "/usr/local/opt/softhsm/lib/softhsm/libsofthsm2.so",
];

/// Path of SoftHSM2's PKCS#11 module: env `SOFTHSM2_MODULE` when set, else the first
/// of the usual Debian, Fedora and macOS paths that exists.
pub fn softhsm_module() -> Result<PathBuf, FixtureError> {
    if let Some(path) = std::env::var_os("SOFTHSM2_MODULE").filter(|p| !p.is_empty()) {
        let path = PathBuf::from(path);
        return if path.is_file() {
            Ok(path)
        } else {
            Err(FixtureError::SoftHsmNotInstalled {
                searched: format!("{} (from SOFTHSM2_MODULE)", path.display()),
            })
        };
    }
    KNOWN_PATHS
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .ok_or_else(|| FixtureError::SoftHsmNotInstalled {
            searched: KNOWN_PATHS.join(", "),
        })
}
