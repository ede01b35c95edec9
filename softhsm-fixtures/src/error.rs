//! The one error type of the crate: each variant says what went wrong and, where
//! there is one, what to do about it, in English and Simplified Chinese.

use std::path::PathBuf;

/// Everything that can go wrong while building fixtures.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FixtureError {
    /// No SoftHSM2 PKCS#11 module in any known place.
    #[error(
        "SoftHSM2 is not installed: no PKCS#11 module at {searched}; install it with \
         `apt-get install softhsm2` or set SOFTHSM2_MODULE / \
         未安装 SoftHSM2，请运行 `apt-get install softhsm2` 或设置 SOFTHSM2_MODULE"
    )]
    SoftHsmNotInstalled {
        /// The paths that were tried, comma separated.
        searched: String,
    },

    /// A file or directory operation failed.
    #[error("cannot {action} {path}: {source} / 文件操作失败")]
    Io {
        /// What we were doing, e.g. "write".
        action: &'static str,
        /// The path concerned.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },

    /// A PKCS#11 call failed. `cryptoki`'s error names the function and return value.
    #[error("PKCS#11 error while {step}: {source} / PKCS#11 调用失败")]
    Pkcs11 {
        /// What the fixture was doing, e.g. "generating the key pair".
        step: String,
        /// The cryptoki error (function and CKR_ value).
        #[source]
        source: cryptoki::error::Error,
    },

    /// The SoftHSM2 module is already initialised in this process by someone else.
    #[error(
        "the SoftHSM2 module is already initialised in this process: create fixture tokens \
         before your code calls C_Initialize (or after C_Finalize), or run the \
         `softhsm-fixtures` CLI in a child process / SoftHSM2 模块已在本进程中初始化"
    )]
    ModuleInUse,

    /// SoftHSM2 offered no uninitialised token to initialise.
    #[error("SoftHSM2 offers no free slot (is {conf} the active SOFTHSM2_CONF?) / 没有空闲槽位")]
    NoFreeSlot {
        /// The configuration file that was active.
        conf: PathBuf,
    },

    /// The token or certificate specification cannot be built.
    #[error("invalid fixture specification: {0} / 规格无效")]
    InvalidSpec(String),

    /// rcgen could not build or sign a certificate.
    #[error("certificate generation failed: {0} / 证书生成失败")]
    Certificate(#[from] rcgen::Error),

    /// The CA files in the SoftHsm directory exist but cannot be used.
    #[error("test CA files in {dir} are unusable: {reason} / 测试 CA 文件不可用")]
    CaFiles {
        /// The SoftHsm directory.
        dir: PathBuf,
        /// Why.
        reason: String,
    },

    /// A public key read from the token has an unexpected shape.
    #[error("unexpected public key from the token: {0} / 令牌公钥格式异常")]
    PublicKey(String),

    /// The operating system random generator failed.
    #[error("random generator failed: {0}")]
    Random(String),

    /// An `openssl` command of the SM2 fixtures failed.
    #[error("openssl {args} failed: {stderr} / openssl 命令失败")]
    OpenSsl {
        /// The arguments.
        args: String,
        /// What it printed on stderr.
        stderr: String,
    },

    /// No token with this serial in the SoftHsm directory.
    #[error("no token with serial {serial} in {dir} / 找不到该序列号的令牌")]
    TokenNotFound {
        /// Serial as given.
        serial: String,
        /// The SoftHsm directory.
        dir: PathBuf,
    },

    /// The `softhsm-fixtures` CLI binary is not built.
    #[error(
        "the softhsm-fixtures binary is not built (looked at {searched}): run \
         `cargo build -p softhsm-fixtures` or set SOFTHSM_FIXTURES_BIN / \
         找不到 softhsm-fixtures 程序"
    )]
    CliNotFound {
        /// The paths that were tried.
        searched: String,
    },

    /// An external SoftHSM2 tool failed.
    #[error("{program} failed ({status}): {stderr}")]
    Tool {
        /// The program run.
        program: String,
        /// Its exit status.
        status: String,
        /// What it printed on stderr.
        stderr: String,
    },
}

impl FixtureError {
    pub(crate) fn io(
        action: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| FixtureError::Io {
            action,
            path,
            source,
        }
    }

    pub(crate) fn pkcs11(step: impl Into<String>) -> impl FnOnce(cryptoki::error::Error) -> Self {
        let step = step.into();
        move |source| FixtureError::Pkcs11 { step, source }
    }
}
