//! SKF, GM/T 0016-2012: the C interface most Chinese UKeys ship (issue 14), in safe
//! Rust. This crate holds what both sides of that interface need and no FFI:
//!
//! - [`abi`]: the return codes (`SAR_*`), algorithm ids (`SGD_*`), PIN types, and the
//!   packed structures (`ECCPUBLICKEYBLOB`, `ECCSIGNATUREBLOB`, `ECCCIPHERBLOB`,
//!   `ENVELOPEDKEYBLOB`, `DEVINFO`) as byte layouts with checked codecs. SKF's `ULONG`
//!   and `BOOL` are 32-bit and its structures are packed to 1 byte, unlike PKCS#11's, so
//!   nothing here is `#[repr(C)]`: each blob is read from and written to its exact bytes.
//! - conversions to the forms the rest of the product speaks: SEC1 points, DER
//!   signatures, GM/T 0009 `SM2Cipher`, and the GM/T 0009 `SM2EnvelopedKey` the portal
//!   sends (`ukey_portal_api::gm`) as the `ENVELOPEDKEYBLOB` `SKF_ImportECCKeyPair` takes.
//!
//! - [`library`]: the backend's FFI, a vendor's SKF library loaded at run time behind
//!   safe types (devices, applications, PINs with tries left, containers, SM2 keys,
//!   certificates, envelopes, session keys, files).

pub mod abi;
// The SKF FFI: a vendor's library through `libloading`. Every unsafe block says why
// it holds (ARCHITECTURE.md lists the places unsafe is allowed).
#[allow(unsafe_code)]
pub mod library;

pub use library::{
    Application, Container, ContainerKind, DevEvent, Device, Half, PinInfo, SessionKey, SkfError,
    SkfLibrary,
};

pub use abi::{
    BlobError, DevInfo, EccCipherBlob, EccPublicKeyBlob, EccSignatureBlob, EnvelopedKeyBlob, Sar,
};
