//! The software SKF key (GM/T 0016): `libukey_sim.so` also exports the SKF C ABI
//! ([`exports`]), serving software devices kept in the state directory ([`store`]),
//! with the same simulated hardware as the PKCS#11 tokens: a device's serial names its
//! entry in `state.json`, so `ukey-sim unplug/plug/fault/latency/pin-tries/pin-reset
//! SERIAL` steer it as they steer a token (faults name `SKF_*` functions and `SAR_*`
//! codes). SM2, SM3 and SM4 are done in software (RustCrypto, as the GM key of
//! [`crate::gm`]); no SKF function gives a private key out.
//!
//! What it implements: devices (enumerate, connect, info, state, insert/remove
//! events), applications, PINs (info with tries left, verify with a retry counter that
//! locks, change, clear), containers (create, delete, enumerate, type, certificates),
//! SM2 signing key generation, signing a 32-byte e, public key export, the import of
//! an escrowed key pair from an `ENVELOPEDKEYBLOB`, session keys SM2-encrypted to the
//! encryption key (SM4 ECB/CBC encrypt and decrypt), and files. RSA containers can be
//! put on a device by [`provision`] to be listed; the sim does no RSA.

mod exports;
pub mod store;

pub use exports::BlockCipherParam;
pub use store::{KeyHalf, PinRecord, SkfApp, SkfContainer, SkfDevice, SkfStore};

use crate::SimError;

/// Every function the software SKF key exports (faults and latency can be set on any).
pub const SKF_FUNCTIONS: &[&str] = &[
    "SKF_EnumDev",
    "SKF_ConnectDev",
    "SKF_DisConnectDev",
    "SKF_GetDevState",
    "SKF_GetDevInfo",
    "SKF_LockDev",
    "SKF_UnlockDev",
    "SKF_WaitForDevEvent",
    "SKF_CancelWaitForDevEvent",
    "SKF_EnumApplication",
    "SKF_OpenApplication",
    "SKF_CloseApplication",
    "SKF_GetPINInfo",
    "SKF_VerifyPIN",
    "SKF_ChangePIN",
    "SKF_ClearSecureState",
    "SKF_EnumContainer",
    "SKF_CreateContainer",
    "SKF_DeleteContainer",
    "SKF_OpenContainer",
    "SKF_CloseContainer",
    "SKF_GetContainerType",
    "SKF_ImportCertificate",
    "SKF_ExportCertificate",
    "SKF_GenRandom",
    "SKF_GenECCKeyPair",
    "SKF_ImportECCKeyPair",
    "SKF_ECCSignData",
    "SKF_ExportPublicKey",
    "SKF_ImportSessionKey",
    "SKF_EncryptInit",
    "SKF_Encrypt",
    "SKF_DecryptInit",
    "SKF_Decrypt",
    "SKF_CloseHandle",
    "SKF_EnumFiles",
    "SKF_CreateFile",
    "SKF_DeleteFile",
    "SKF_ReadFile",
    "SKF_WriteFile",
];

/// Default application name of a new device.
pub const DEFAULT_APP: &str = "ukey-sim";

/// Is `name` a function the software SKF key exports?
pub fn is_skf_function(name: &str) -> bool {
    SKF_FUNCTIONS.contains(&name)
}

/// What [`provision`] puts in a container: an SM2 key pair as a CA's personalisation
/// would (scalar and point), with its certificate, for either half.
#[derive(Debug, Clone, Default)]
pub struct ProvisionHalf {
    /// The SM2 private scalar (32 bytes); `None` for a listed-only RSA key.
    pub scalar: Option<Vec<u8>>,
    /// The public key: an SM2 point, or an RSA SubjectPublicKeyInfo.
    pub public: Option<Vec<u8>>,
    /// The certificate (DER).
    pub cert: Option<Vec<u8>>,
}

impl From<ProvisionHalf> for KeyHalf {
    fn from(p: ProvisionHalf) -> KeyHalf {
        KeyHalf {
            scalar: p.scalar.map(hex::encode),
            public: p.public.map(hex::encode),
            cert: p.cert.map(hex::encode),
        }
    }
}

/// The scalar (32 bytes) and uncompressed point of an SM2 private key in PKCS#8 PEM, as
/// `openssl genpkey -algorithm SM2` writes it.
pub fn read_sm2_key(pem_text: &str) -> Result<(Vec<u8>, Vec<u8>), SimError> {
    use sm2::pkcs8::DecodePrivateKey;
    let bad = |what: String| SimError::InvalidArgument(format!("not an SM2 private key: {what}"));
    let p = pem::parse(pem_text).map_err(|e| bad(e.to_string()))?;
    let key = sm2::SecretKey::from_pkcs8_der(p.contents()).map_err(|e| bad(e.to_string()))?;
    let scalar = key.to_bytes().to_vec();
    let point = crate::gm::public_point(&scalar).map_err(|_| bad("its scalar".into()))?;
    Ok((scalar, point))
}

/// Writes a container directly into a device's file (the CA's personalisation, for
/// tests and the demo; an application uses the C ABI). An SM2 scalar must match its
/// point. Replaces a container of the same name.
pub fn provision(
    store: &SkfStore,
    serial: &str,
    app: &str,
    container: &str,
    rsa: bool,
    sign: ProvisionHalf,
    enc: ProvisionHalf,
) -> Result<(), SimError> {
    for half in [&sign, &enc] {
        if let (Some(d), Some(point)) = (&half.scalar, &half.public)
            && crate::gm::public_point(d).ok().as_ref() != Some(point)
        {
            return Err(SimError::InvalidArgument(
                "an SM2 scalar that does not match its public point".into(),
            ));
        }
    }
    let c = SkfContainer {
        name: container.to_owned(),
        rsa,
        sign: sign.into(),
        enc: enc.into(),
    };
    store.update(serial, |d| {
        let a = d.app_mut(app).ok_or_else(|| {
            SimError::InvalidArgument(format!("no application {app:?} on device {serial}"))
        })?;
        a.containers.retain(|x| x.name != c.name);
        a.containers.push(c);
        Ok(())
    })?
}
