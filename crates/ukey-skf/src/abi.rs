//! GM/T 0016-2012's constants and packed structures as exact byte layouts.
//!
//! Layouts (packed, 1-byte alignment; `ULONG` is a little-endian u32 on the x86 and ARM
//! hosts SKF libraries ship for):
//!
//! | structure | layout | bytes |
//! |---|---|---|
//! | `ECCPUBLICKEYBLOB` | `ULONG BitLen; BYTE X[64]; BYTE Y[64]` | 132 |
//! | `ECCSIGNATUREBLOB` | `BYTE r[64]; BYTE s[64]` | 128 |
//! | `ECCCIPHERBLOB` | `BYTE X[64]; BYTE Y[64]; BYTE HASH[32]; ULONG CipherLen; BYTE Cipher[CipherLen]` | 164 + n |
//! | `ENVELOPEDKEYBLOB` | `ULONG Version; ULONG ulSymmAlgID; ULONG ulBits; BYTE cbEncryptedPriKey[64]; ECCPUBLICKEYBLOB PubKey; ECCCIPHERBLOB ECCCipherBlob` | 208 + 164 + n |
//!
//! 256-bit values sit right-aligned in their 64-byte fields (the first 32 bytes zero).

use der::asn1::{OctetStringRef, UintRef};
use der::{Decode, Encode, Sequence};

/// An SKF return code (`ULONG`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Sar(pub u32);

impl Sar {
    /// Success.
    pub const OK: Sar = Sar(0);
    /// Failure.
    pub const FAIL: Sar = Sar(0x0A00_0001);
    /// Unknown error.
    pub const UNKNOWN: Sar = Sar(0x0A00_0002);
    /// Not supported.
    pub const NOT_SUPPORTED: Sar = Sar(0x0A00_0003);
    /// Invalid handle.
    pub const INVALID_HANDLE: Sar = Sar(0x0A00_0005);
    /// Invalid parameter.
    pub const INVALID_PARAM: Sar = Sar(0x0A00_0006);
    /// Key usage not allowed.
    pub const KEY_USAGE: Sar = Sar(0x0A00_000A);
    /// Input data length wrong.
    pub const IN_DATA_LEN: Sar = Sar(0x0A00_0010);
    /// Input data wrong.
    pub const IN_DATA: Sar = Sar(0x0A00_0011);
    /// Key not found.
    pub const KEY_NOT_FOUND: Sar = Sar(0x0A00_001B);
    /// Certificate not found.
    pub const CERT_NOT_FOUND: Sar = Sar(0x0A00_001C);
    /// Not exportable.
    pub const NOT_EXPORTABLE: Sar = Sar(0x0A00_001D);
    /// Buffer too small.
    pub const BUFFER_TOO_SMALL: Sar = Sar(0x0A00_0020);
    /// No event (`SKF_WaitForDevEvent` cancelled).
    pub const NO_EVENT: Sar = Sar(0x0A00_0022);
    /// The device was removed.
    pub const DEVICE_REMOVED: Sar = Sar(0x0A00_0023);
    /// Wrong PIN (the retry count says how many tries are left).
    pub const PIN_INCORRECT: Sar = Sar(0x0A00_0024);
    /// PIN locked.
    pub const PIN_LOCKED: Sar = Sar(0x0A00_0025);
    /// PIN invalid (characters).
    pub const PIN_INVALID: Sar = Sar(0x0A00_0026);
    /// PIN length out of range.
    pub const PIN_LEN_RANGE: Sar = Sar(0x0A00_0027);
    /// The user is not logged in.
    pub const USER_NOT_LOGGED_IN: Sar = Sar(0x0A00_002D);
    /// No such application.
    pub const APPLICATION_NOT_EXISTS: Sar = Sar(0x0A00_002E);
    /// No room on the device.
    pub const NO_ROOM: Sar = Sar(0x0A00_0030);
    /// A name is too long.
    pub const NAME_LEN: Sar = Sar(0x0A00_0009);
    /// Not initialised.
    pub const NOT_INITIALIZED: Sar = Sar(0x0A00_000C);
    /// Out of memory.
    pub const MEMORY: Sar = Sar(0x0A00_000E);
    /// Timed out.
    pub const TIMEOUT: Sar = Sar(0x0A00_000F);
    /// The user is already logged in.
    pub const USER_ALREADY_LOGGED_IN: Sar = Sar(0x0A00_0028);
    /// The PIN type is neither admin nor user.
    pub const USER_TYPE_INVALID: Sar = Sar(0x0A00_002A);
    /// The application exists already.
    pub const APPLICATION_EXISTS: Sar = Sar(0x0A00_002C);
    /// The file (or container) exists already.
    pub const FILE_ALREADY_EXIST: Sar = Sar(0x0A00_002F);
    /// No such file (the sim also answers this for a container that does not exist).
    pub const FILE_NOT_EXIST: Sar = Sar(0x0A00_0031);
    /// The device holds as many containers as it can.
    pub const REACH_MAX_CONTAINER_COUNT: Sar = Sar(0x0A00_0032);

    /// Every code this crate names, with the standard's name.
    pub const KNOWN: &'static [(Sar, &'static str)] = &[
        (Sar::OK, "SAR_OK"),
        (Sar::FAIL, "SAR_FAIL"),
        (Sar::UNKNOWN, "SAR_UNKNOWNERR"),
        (Sar::NOT_SUPPORTED, "SAR_NOTSUPPORTYETERR"),
        (Sar::INVALID_HANDLE, "SAR_INVALIDHANDLEERR"),
        (Sar::INVALID_PARAM, "SAR_INVALIDPARAMERR"),
        (Sar::NAME_LEN, "SAR_NAMELENERR"),
        (Sar::KEY_USAGE, "SAR_KEYUSAGEERR"),
        (Sar::NOT_INITIALIZED, "SAR_NOTINITIALIZEERR"),
        (Sar::MEMORY, "SAR_MEMORYERR"),
        (Sar::TIMEOUT, "SAR_TIMEOUTERR"),
        (Sar::IN_DATA_LEN, "SAR_INDATALENERR"),
        (Sar::IN_DATA, "SAR_INDATAERR"),
        (Sar::KEY_NOT_FOUND, "SAR_KEYNOTFOUNTERR"),
        (Sar::CERT_NOT_FOUND, "SAR_CERTNOTFOUNTERR"),
        (Sar::NOT_EXPORTABLE, "SAR_NOTEXPORTERR"),
        (Sar::BUFFER_TOO_SMALL, "SAR_BUFFER_TOO_SMALL"),
        (Sar::NO_EVENT, "SAR_NOT_EVENTERR"),
        (Sar::DEVICE_REMOVED, "SAR_DEVICE_REMOVED"),
        (Sar::PIN_INCORRECT, "SAR_PIN_INCORRECT"),
        (Sar::PIN_LOCKED, "SAR_PIN_LOCKED"),
        (Sar::PIN_INVALID, "SAR_PIN_INVALID"),
        (Sar::PIN_LEN_RANGE, "SAR_PIN_LEN_RANGE"),
        (Sar::USER_ALREADY_LOGGED_IN, "SAR_USER_ALREADY_LOGGED_IN"),
        (Sar::USER_TYPE_INVALID, "SAR_USER_TYPE_INVALID"),
        (Sar::APPLICATION_EXISTS, "SAR_APPLICATION_EXISTS"),
        (Sar::USER_NOT_LOGGED_IN, "SAR_USER_NOT_LOGGED_IN"),
        (Sar::APPLICATION_NOT_EXISTS, "SAR_APPLICATION_NOT_EXISTS"),
        (Sar::FILE_ALREADY_EXIST, "SAR_FILE_ALREADY_EXIST"),
        (Sar::NO_ROOM, "SAR_NO_ROOM"),
        (Sar::FILE_NOT_EXIST, "SAR_FILE_NOT_EXIST"),
        (
            Sar::REACH_MAX_CONTAINER_COUNT,
            "SAR_REACH_MAX_CONTAINER_COUNT",
        ),
    ];

    /// The code of a standard name (`SAR_PIN_INCORRECT`) or a number (`0x0A000024`).
    pub fn from_name(name: &str) -> Option<Sar> {
        if let Some((s, _)) = Sar::KNOWN.iter().find(|(_, n)| *n == name) {
            return Some(*s);
        }
        let hex = name
            .strip_prefix("0x")
            .or_else(|| name.strip_prefix("0X"))?;
        u32::from_str_radix(hex, 16).ok().map(Sar)
    }

    /// The standard's name of the code (`SAR_PIN_INCORRECT`), or its hex value.
    pub fn name(self) -> String {
        Sar::KNOWN
            .iter()
            .find(|(s, _)| *s == self)
            .map(|(_, n)| (*n).to_owned())
            .unwrap_or_else(|| format!("{:#010X}", self.0))
    }
}

impl std::fmt::Display for Sar {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name())
    }
}

/// `SGD_SM2_1`: SM2 signing (GM/T 0006).
pub const SGD_SM2_1: u32 = 0x0002_0100;
/// `SGD_SM2_3`: SM2 encryption.
pub const SGD_SM2_3: u32 = 0x0002_0400;
/// `SGD_SM3`.
pub const SGD_SM3: u32 = 0x0000_0001;
/// `SGD_SMS4_CBC`.
pub const SGD_SMS4_CBC: u32 = 0x0000_0402;
/// `SGD_SMS4_ECB` (SM4 in ECB mode).
pub const SGD_SMS4_ECB: u32 = 0x0000_0401;
/// `ulPINType` of the administrator (SO) PIN.
pub const ADMIN_TYPE: u32 = 0;
/// `ulPINType` of the user PIN.
pub const USER_TYPE: u32 = 1;
/// `ulEvent` of `SKF_WaitForDevEvent`: a device was inserted.
pub const DEV_INSERTED: u32 = 1;
/// `ulEvent` of `SKF_WaitForDevEvent`: a device was removed.
pub const DEV_REMOVED: u32 = 2;
/// `SKF_GetContainerType`: an RSA container.
pub const CONTAINER_RSA: u32 = 1;
/// `SKF_GetContainerType`: an ECC (SM2) container.
pub const CONTAINER_ECC: u32 = 2;

/// Size of an `ECCPUBLICKEYBLOB`.
pub const ECC_PUBLIC_KEY_BLOB_LEN: usize = 4 + 64 + 64;
/// Size of an `ECCSIGNATUREBLOB`.
pub const ECC_SIGNATURE_BLOB_LEN: usize = 64 + 64;
/// Size of an `ECCCIPHERBLOB` before its ciphertext.
pub const ECC_CIPHER_BLOB_HEADER_LEN: usize = 64 + 64 + 32 + 4;
/// Size of an `ENVELOPEDKEYBLOB` before its `ECCCIPHERBLOB`.
pub const ENVELOPED_KEY_BLOB_HEADER_LEN: usize = 4 + 4 + 4 + 64 + ECC_PUBLIC_KEY_BLOB_LEN;

/// A blob that does not hold what its layout says.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BlobError {
    /// Shorter or longer than its layout.
    #[error("{what}: {got} bytes, the layout needs {want}")]
    Length {
        /// The structure.
        what: &'static str,
        /// Bytes given.
        got: usize,
        /// Bytes the layout needs.
        want: usize,
    },
    /// A 256-bit value with non-zero bytes in the unused left half of its field.
    #[error("{0}: a 256-bit value overflows its field")]
    Overflow(&'static str),
    /// A field with a value the standard does not allow here.
    #[error("{0}")]
    Field(String),
    /// A DER form that does not parse.
    #[error("DER: {0}")]
    Der(String),
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// A 256-bit value right-aligned in a 64-byte field.
fn field64(v: &[u8; 32]) -> [u8; 64] {
    let mut f = [0u8; 64];
    f[32..].copy_from_slice(v);
    f
}

fn value256(field: &[u8], what: &'static str) -> Result<[u8; 32], BlobError> {
    if field[..32].iter().any(|b| *b != 0) {
        return Err(BlobError::Overflow(what));
    }
    let mut v = [0u8; 32];
    v.copy_from_slice(&field[32..64]);
    Ok(v)
}

fn exact(b: &[u8], want: usize, what: &'static str) -> Result<(), BlobError> {
    if b.len() == want {
        Ok(())
    } else {
        Err(BlobError::Length {
            what,
            got: b.len(),
            want,
        })
    }
}

/// `ECCPUBLICKEYBLOB`: an SM2 public key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EccPublicKeyBlob {
    /// `BitLen` (256 for SM2).
    pub bits: u32,
    /// x.
    pub x: [u8; 32],
    /// y.
    pub y: [u8; 32],
}

impl EccPublicKeyBlob {
    /// From an uncompressed SEC1 point (`04 ‖ x ‖ y`).
    pub fn from_point(point: &[u8]) -> Result<EccPublicKeyBlob, BlobError> {
        if point.len() != 65 || point[0] != 0x04 {
            return Err(BlobError::Field(format!(
                "not an uncompressed 256-bit point ({} bytes)",
                point.len()
            )));
        }
        let mut x = [0u8; 32];
        let mut y = [0u8; 32];
        x.copy_from_slice(&point[1..33]);
        y.copy_from_slice(&point[33..]);
        Ok(EccPublicKeyBlob { bits: 256, x, y })
    }

    /// The uncompressed SEC1 point.
    pub fn point(&self) -> Vec<u8> {
        [&[0x04][..], &self.x, &self.y].concat()
    }

    /// The 132 bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        [
            &self.bits.to_le_bytes()[..],
            &field64(&self.x),
            &field64(&self.y),
        ]
        .concat()
    }

    /// From exactly 132 bytes; `BitLen` must be 256.
    pub fn from_bytes(b: &[u8]) -> Result<EccPublicKeyBlob, BlobError> {
        exact(b, ECC_PUBLIC_KEY_BLOB_LEN, "ECCPUBLICKEYBLOB")?;
        let bits = u32_at(b, 0);
        if bits != 256 {
            return Err(BlobError::Field(format!(
                "ECCPUBLICKEYBLOB: BitLen {bits}, SM2 keys are 256"
            )));
        }
        Ok(EccPublicKeyBlob {
            bits,
            x: value256(&b[4..68], "ECCPUBLICKEYBLOB.X")?,
            y: value256(&b[68..132], "ECCPUBLICKEYBLOB.Y")?,
        })
    }
}

/// `ECCSIGNATUREBLOB`: an SM2 signature.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EccSignatureBlob {
    /// r.
    pub r: [u8; 32],
    /// s.
    pub s: [u8; 32],
}

/// `SEQUENCE { r INTEGER, s INTEGER }`.
#[derive(Sequence)]
struct SigValue<'a> {
    r: UintRef<'a>,
    s: UintRef<'a>,
}

fn left_pad32(v: &[u8], what: &'static str) -> Result<[u8; 32], BlobError> {
    if v.len() > 32 {
        return Err(BlobError::Overflow(what));
    }
    let mut out = [0u8; 32];
    out[32 - v.len()..].copy_from_slice(v);
    Ok(out)
}

impl EccSignatureBlob {
    /// The 128 bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        [field64(&self.r), field64(&self.s)].concat()
    }

    /// From exactly 128 bytes.
    pub fn from_bytes(b: &[u8]) -> Result<EccSignatureBlob, BlobError> {
        exact(b, ECC_SIGNATURE_BLOB_LEN, "ECCSIGNATUREBLOB")?;
        Ok(EccSignatureBlob {
            r: value256(&b[..64], "ECCSIGNATUREBLOB.r")?,
            s: value256(&b[64..], "ECCSIGNATUREBLOB.s")?,
        })
    }

    /// The DER `SEQUENCE { r, s }` X.509 and OpenSSL use.
    pub fn to_der(&self) -> Result<Vec<u8>, BlobError> {
        let der_err = |e: der::Error| BlobError::Der(e.to_string());
        SigValue {
            r: UintRef::new(&self.r).map_err(der_err)?,
            s: UintRef::new(&self.s).map_err(der_err)?,
        }
        .to_der()
        .map_err(der_err)
    }

    /// From the DER `SEQUENCE { r, s }`.
    pub fn from_der(der: &[u8]) -> Result<EccSignatureBlob, BlobError> {
        let v = SigValue::from_der(der).map_err(|e| BlobError::Der(e.to_string()))?;
        Ok(EccSignatureBlob {
            r: left_pad32(v.r.as_bytes(), "signature r")?,
            s: left_pad32(v.s.as_bytes(), "signature s")?,
        })
    }
}

/// GM/T 0009 `SM2Cipher ::= SEQUENCE { XCoordinate INTEGER, YCoordinate INTEGER,
/// HASH OCTET STRING (32), CipherText OCTET STRING }` (C1 C3 C2).
#[derive(Sequence)]
struct Sm2Cipher<'a> {
    x: UintRef<'a>,
    y: UintRef<'a>,
    hash: OctetStringRef<'a>,
    cipher: OctetStringRef<'a>,
}

/// `ECCCIPHERBLOB`: an SM2 ciphertext (C1 = (x, y), C3 = HASH, C2 = Cipher).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EccCipherBlob {
    /// C1's x.
    pub x: [u8; 32],
    /// C1's y.
    pub y: [u8; 32],
    /// C3, the SM3 hash.
    pub hash: [u8; 32],
    /// C2, as long as the plaintext.
    pub cipher: Vec<u8>,
}

impl EccCipherBlob {
    /// The 164 + n bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let len = u32::try_from(self.cipher.len()).unwrap_or(u32::MAX);
        [
            &field64(&self.x)[..],
            &field64(&self.y),
            &self.hash,
            &len.to_le_bytes(),
            &self.cipher,
        ]
        .concat()
    }

    /// From its bytes: the header and exactly `CipherLen` bytes after it.
    pub fn from_bytes(b: &[u8]) -> Result<EccCipherBlob, BlobError> {
        if b.len() < ECC_CIPHER_BLOB_HEADER_LEN {
            return Err(BlobError::Length {
                what: "ECCCIPHERBLOB",
                got: b.len(),
                want: ECC_CIPHER_BLOB_HEADER_LEN,
            });
        }
        let n = u32_at(b, 160) as usize;
        exact(
            b,
            ECC_CIPHER_BLOB_HEADER_LEN + n,
            "ECCCIPHERBLOB with its CipherLen",
        )?;
        let mut hash = [0u8; 32];
        hash.copy_from_slice(&b[128..160]);
        Ok(EccCipherBlob {
            x: value256(&b[..64], "ECCCIPHERBLOB.X")?,
            y: value256(&b[64..128], "ECCCIPHERBLOB.Y")?,
            hash,
            cipher: b[164..].to_vec(),
        })
    }

    /// The GM/T 0009 `SM2Cipher` DER (what `openssl pkeyutl -encrypt` writes).
    pub fn to_der(&self) -> Result<Vec<u8>, BlobError> {
        let der_err = |e: der::Error| BlobError::Der(e.to_string());
        Sm2Cipher {
            x: UintRef::new(&self.x).map_err(der_err)?,
            y: UintRef::new(&self.y).map_err(der_err)?,
            hash: OctetStringRef::new(&self.hash).map_err(der_err)?,
            cipher: OctetStringRef::new(&self.cipher).map_err(der_err)?,
        }
        .to_der()
        .map_err(der_err)
    }

    /// From a GM/T 0009 `SM2Cipher` DER.
    pub fn from_der(der: &[u8]) -> Result<EccCipherBlob, BlobError> {
        let c = Sm2Cipher::from_der(der).map_err(|e| BlobError::Der(e.to_string()))?;
        let hash: [u8; 32] = c.hash.as_bytes().try_into().map_err(|_| {
            BlobError::Field(format!(
                "SM2Cipher: HASH is {} bytes, SM3 gives 32",
                c.hash.as_bytes().len()
            ))
        })?;
        Ok(EccCipherBlob {
            x: left_pad32(c.x.as_bytes(), "SM2Cipher x")?,
            y: left_pad32(c.y.as_bytes(), "SM2Cipher y")?,
            hash,
            cipher: c.cipher.as_bytes().to_vec(),
        })
    }
}

/// `ENVELOPEDKEYBLOB`: an escrowed SM2 key for `SKF_ImportECCKeyPair`, its SM4 key
/// encrypted to the container's signing key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvelopedKeyBlob {
    /// `Version` (1).
    pub version: u32,
    /// `ulSymmAlgID` ([`SGD_SMS4_ECB`]).
    pub symm_alg_id: u32,
    /// `ulBits` (256).
    pub bits: u32,
    /// `cbEncryptedPriKey`: the SM4-ECB encrypted private key, 64 bytes (the 32-byte key
    /// right-aligned before encryption).
    pub encrypted_private_key: [u8; 64],
    /// `PubKey`: the escrowed key's public key.
    pub public_key: EccPublicKeyBlob,
    /// `ECCCipherBlob`: the SM4 key, SM2-encrypted to the signing key.
    pub cipher: EccCipherBlob,
}

impl EnvelopedKeyBlob {
    /// The bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        [
            &self.version.to_le_bytes()[..],
            &self.symm_alg_id.to_le_bytes(),
            &self.bits.to_le_bytes(),
            &self.encrypted_private_key,
            &self.public_key.to_bytes(),
            &self.cipher.to_bytes(),
        ]
        .concat()
    }

    /// From its bytes.
    pub fn from_bytes(b: &[u8]) -> Result<EnvelopedKeyBlob, BlobError> {
        if b.len() < ENVELOPED_KEY_BLOB_HEADER_LEN {
            return Err(BlobError::Length {
                what: "ENVELOPEDKEYBLOB",
                got: b.len(),
                want: ENVELOPED_KEY_BLOB_HEADER_LEN + ECC_CIPHER_BLOB_HEADER_LEN,
            });
        }
        let mut encrypted_private_key = [0u8; 64];
        encrypted_private_key.copy_from_slice(&b[12..76]);
        Ok(EnvelopedKeyBlob {
            version: u32_at(b, 0),
            symm_alg_id: u32_at(b, 4),
            bits: u32_at(b, 8),
            encrypted_private_key,
            public_key: EccPublicKeyBlob::from_bytes(&b[76..ENVELOPED_KEY_BLOB_HEADER_LEN])?,
            cipher: EccCipherBlob::from_bytes(&b[ENVELOPED_KEY_BLOB_HEADER_LEN..])?,
        })
    }

    /// The blob of a GM/T 0009 `SM2EnvelopedKey` (SM4-ECB, its private key encrypted in
    /// the 64-byte form GM/T 0016 uses: the 32-byte key right-aligned, then encrypted).
    /// A 32-byte encrypted key cannot be placed: ECB's first two blocks would be the
    /// encryption of zeros under a key only the device learns.
    pub fn from_gm_t_0009(
        e: &ukey_portal_api::gm::Sm2EnvelopedKey,
    ) -> Result<EnvelopedKeyBlob, BlobError> {
        if e.sym_alg != ukey_portal_api::gm::SM4_ECB {
            return Err(BlobError::Field(format!(
                "SM2EnvelopedKey: {} is not SM4-ECB",
                e.sym_alg
            )));
        }
        let encrypted_private_key: [u8; 64] =
            e.encrypted_private_key.as_slice().try_into().map_err(|_| {
                BlobError::Field(format!(
                    "SM2EnvelopedKey: a {}-byte encrypted private key, SKF takes the 64-byte form",
                    e.encrypted_private_key.len()
                ))
            })?;
        Ok(EnvelopedKeyBlob {
            version: 1,
            symm_alg_id: SGD_SMS4_ECB,
            bits: 256,
            encrypted_private_key,
            public_key: EccPublicKeyBlob::from_point(&e.public_key)?,
            cipher: EccCipherBlob::from_der(&e.sym_encrypted_key)?,
        })
    }
}

/// `DEVINFO` (GM/T 0016 §5.2, packed): the fields a client reads.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DevInfo {
    /// `Manufacturer` (64 bytes, NUL-terminated).
    pub manufacturer: String,
    /// `Issuer` (64).
    pub issuer: String,
    /// `Label` (32).
    pub label: String,
    /// `SerialNumber` (32).
    pub serial: String,
    /// `TotalSpace`.
    pub total_space: u32,
    /// `FreeSpace`.
    pub free_space: u32,
    /// `Label`'s bytes up to its NUL, as the device gave them (Chinese keys often write
    /// GBK); when set, [`DevInfo::to_bytes`] writes these instead of `label`.
    pub label_raw: Vec<u8>,
    /// `Manufacturer`'s bytes up to its NUL, likewise.
    pub manufacturer_raw: Vec<u8>,
}

/// Size of `DEVINFO`: `VERSION Version(2); CHAR Manufacturer[64]; CHAR Issuer[64]; CHAR
/// Label[32]; CHAR SerialNumber[32]; VERSION HWVersion(2); VERSION FirmwareVersion(2);
/// ULONG AlgSymCap; ULONG AlgAsymCap; ULONG AlgHashCap; ULONG DevAuthAlgId; ULONG
/// TotalSpace; ULONG FreeSpace; ULONG MaxECCBufferSize; ULONG MaxBufferSize; BYTE
/// Reserved[64]`.
pub const DEV_INFO_LEN: usize = 2 + 64 + 64 + 32 + 32 + 2 + 2 + 4 * 8 + 64;

fn text(field: &[u8]) -> String {
    let end = field.iter().position(|b| *b == 0).unwrap_or(field.len());
    String::from_utf8_lossy(&field[..end]).trim_end().to_owned()
}

fn up_to_nul(field: &[u8]) -> Vec<u8> {
    let end = field.iter().position(|b| *b == 0).unwrap_or(field.len());
    field[..end].to_vec()
}

fn put_raw(out: &mut [u8], raw: &[u8], s: &str) {
    if raw.is_empty() {
        put_text(out, s);
    } else {
        let n = raw.len().min(out.len().saturating_sub(1));
        out[..n].copy_from_slice(&raw[..n]);
    }
}

fn put_text(out: &mut [u8], s: &str) {
    let n = s.len().min(out.len().saturating_sub(1));
    out[..n].copy_from_slice(&s.as_bytes()[..n]);
}

impl DevInfo {
    /// From exactly [`DEV_INFO_LEN`] bytes.
    pub fn from_bytes(b: &[u8]) -> Result<DevInfo, BlobError> {
        exact(b, DEV_INFO_LEN, "DEVINFO")?;
        Ok(DevInfo {
            manufacturer: text(&b[2..66]),
            issuer: text(&b[66..130]),
            label: text(&b[130..162]),
            serial: text(&b[162..194]),
            total_space: u32_at(b, 198 + 16),
            free_space: u32_at(b, 198 + 20),
            label_raw: up_to_nul(&b[130..162]),
            manufacturer_raw: up_to_nul(&b[2..66]),
        })
    }

    /// The bytes (version 1.0, the capabilities of an SM2/SM3/SM4 key).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = vec![0u8; DEV_INFO_LEN];
        b[0] = 1;
        put_raw(&mut b[2..66], &self.manufacturer_raw, &self.manufacturer);
        put_text(&mut b[66..130], &self.issuer);
        put_raw(&mut b[130..162], &self.label_raw, &self.label);
        put_text(&mut b[162..194], &self.serial);
        let caps = [SGD_SMS4_ECB, SGD_SM2_1 | SGD_SM2_3, SGD_SM3, SGD_SMS4_ECB];
        for (i, c) in caps.iter().enumerate() {
            b[198 + 4 * i..202 + 4 * i].copy_from_slice(&c.to_le_bytes());
        }
        b[214..218].copy_from_slice(&self.total_space.to_le_bytes());
        b[218..222].copy_from_slice(&self.free_space.to_le_bytes());
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_have_the_standards_sizes() {
        assert_eq!(ECC_PUBLIC_KEY_BLOB_LEN, 132);
        assert_eq!(ECC_SIGNATURE_BLOB_LEN, 128);
        assert_eq!(ECC_CIPHER_BLOB_HEADER_LEN, 164);
        assert_eq!(ENVELOPED_KEY_BLOB_HEADER_LEN, 208);
        assert_eq!(DEV_INFO_LEN, 294);
    }

    #[test]
    fn a_public_key_blob_round_trips_and_refuses_bad_input() {
        let point = [vec![4u8], (1..=64).collect::<Vec<u8>>()].concat();
        let blob = EccPublicKeyBlob::from_point(&point).unwrap();
        let bytes = blob.to_bytes();
        assert_eq!(bytes.len(), 132);
        assert_eq!(&bytes[..4], &256u32.to_le_bytes());
        assert!(bytes[4..36].iter().all(|b| *b == 0), "right-aligned x");
        assert_eq!(bytes[36], 1);
        assert_eq!(EccPublicKeyBlob::from_bytes(&bytes).unwrap().point(), point);
        let mut overflow = bytes.clone();
        overflow[4] = 1;
        assert_eq!(
            EccPublicKeyBlob::from_bytes(&overflow),
            Err(BlobError::Overflow("ECCPUBLICKEYBLOB.X"))
        );
        assert!(EccPublicKeyBlob::from_bytes(&bytes[..131]).is_err());
        let mut bits = bytes;
        bits[..4].copy_from_slice(&255u32.to_le_bytes());
        assert!(EccPublicKeyBlob::from_bytes(&bits).is_err());
        assert!(EccPublicKeyBlob::from_point(&point[1..]).is_err());
    }

    #[test]
    fn a_signature_blob_converts_to_and_from_der() {
        let mut r = [0u8; 32];
        r[0] = 0x80; // needs a leading zero in DER
        r[31] = 1;
        let mut s = [0u8; 32];
        s[5] = 7; // leading zeros dropped in DER
        let blob = EccSignatureBlob { r, s };
        let der = blob.to_der().unwrap();
        assert_eq!(EccSignatureBlob::from_der(&der).unwrap(), blob);
        assert_eq!(
            EccSignatureBlob::from_bytes(&blob.to_bytes()).unwrap(),
            blob
        );
    }

    #[test]
    fn a_cipher_blob_checks_its_length_field() {
        let blob = EccCipherBlob {
            x: [1; 32],
            y: [2; 32],
            hash: [3; 32],
            cipher: b"sealed".to_vec(),
        };
        let bytes = blob.to_bytes();
        assert_eq!(bytes.len(), 164 + 6);
        assert_eq!(EccCipherBlob::from_bytes(&bytes).unwrap(), blob);
        assert!(
            EccCipherBlob::from_bytes(&bytes[..169]).is_err(),
            "short by one"
        );
        let mut long = bytes.clone();
        long.push(0);
        assert!(EccCipherBlob::from_bytes(&long).is_err());
        assert_eq!(
            EccCipherBlob::from_der(&blob.to_der().unwrap()).unwrap(),
            blob
        );
    }

    #[test]
    fn dev_info_round_trips_its_text_fields() {
        let info = DevInfo {
            manufacturer: "ukey-sim".into(),
            issuer: "某某数字认证".into(),
            label: "张三的UKey".into(),
            serial: "0123456789ABCDEF".into(),
            total_space: 65536,
            free_space: 1024,
            label_raw: Vec::new(),
            manufacturer_raw: Vec::new(),
        };
        let bytes = info.to_bytes();
        let back = DevInfo::from_bytes(&bytes).unwrap();
        assert_eq!(back.label, info.label);
        assert_eq!(back.issuer, info.issuer);
        assert_eq!(back.serial, info.serial);
        assert_eq!(back.label_raw, "张三的UKey".as_bytes());
        assert!(DevInfo::from_bytes(&bytes[1..]).is_err());
        // Raw bytes (GBK "张三") are written as they are and read back before the NUL.
        let gbk = DevInfo {
            label_raw: vec![0xd5, 0xc5, 0xc8, 0xfd],
            ..info
        };
        assert_eq!(
            DevInfo::from_bytes(&gbk.to_bytes()).unwrap().label_raw,
            [0xd5, 0xc5, 0xc8, 0xfd]
        );
    }

    #[test]
    fn sar_codes_are_named_as_the_standard_names_them() {
        assert_eq!(Sar::PIN_INCORRECT.name(), "SAR_PIN_INCORRECT");
        assert_eq!(Sar(0x0A00_0024), Sar::PIN_INCORRECT);
        assert_eq!(Sar(0x0A00_0099).to_string(), "0x0A000099");
    }
}
