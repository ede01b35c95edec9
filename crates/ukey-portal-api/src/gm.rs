//! The escrowed SM2 encryption key in the GM format: GM/T 0009 §7.4
//!
//! ```text
//! SM2EnvelopedKey ::= SEQUENCE {
//!     symAlgID               AlgorithmIdentifier,  -- SM4-ECB, 1.2.156.10197.1.104.1
//!     symEncryptedKey        SM2Cipher,            -- the SM4 key, SM2-encrypted (C1 C3 C2)
//!     sm2PublicKey           SM2PublicKey,         -- BIT STRING, 04 ‖ x ‖ y
//!     sm2EncryptedPrivateKey BIT STRING            -- the 32-byte private key, SM4-ECB
//! }
//! ```
//!
//! As in GM/T 0092's answer to a CSR, the SM4 key is encrypted to the holder's new
//! *signing* public key (the CSR's), so the key opens it with its signing key on the
//! token (an unwrap: the key never reaches the host). The portal makes it
//! ([`crate::EncryptionIssue::gm_enveloped_key`]); the client checks it and has the token
//! open it.

use der::asn1::{AnyRef, BitStringRef, ObjectIdentifier};
use der::{Decode, Encode, Sequence};
use spki::AlgorithmIdentifier;

/// SM4 in ECB mode (1.2.156.10197.1.104.1, as OpenSSL names it `SM4-ECB`).
pub const SM4_ECB: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.156.10197.1.104.1");

#[derive(Sequence)]
struct Sm2EnvelopedKeyRef<'a> {
    sym_alg_id: AlgorithmIdentifier<AnyRef<'a>>,
    sym_encrypted_key: AnyRef<'a>,
    sm2_public_key: BitStringRef<'a>,
    sm2_encrypted_private_key: BitStringRef<'a>,
}

/// A GM/T 0009 `SM2EnvelopedKey`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sm2EnvelopedKey {
    /// The symmetric algorithm (SM4-ECB is the one the client accepts).
    pub sym_alg: ObjectIdentifier,
    /// The `SM2Cipher` DER of the SM4 key (C1 C3 C2).
    pub sym_encrypted_key: Vec<u8>,
    /// The escrowed key's public point, `04 ‖ x ‖ y`.
    pub public_key: Vec<u8>,
    /// The private key, SM4-ECB encrypted (32 bytes; 64 when padded as GM/T 0016 does).
    pub encrypted_private_key: Vec<u8>,
}

impl Sm2EnvelopedKey {
    /// DER.
    pub fn to_der(&self) -> Result<Vec<u8>, der::Error> {
        Sm2EnvelopedKeyRef {
            sym_alg_id: AlgorithmIdentifier {
                oid: self.sym_alg,
                parameters: None,
            },
            sym_encrypted_key: AnyRef::from_der(&self.sym_encrypted_key)?,
            sm2_public_key: BitStringRef::from_bytes(&self.public_key)?,
            sm2_encrypted_private_key: BitStringRef::from_bytes(&self.encrypted_private_key)?,
        }
        .to_der()
    }

    /// Parses DER (exactly one value).
    pub fn from_der(der: &[u8]) -> Result<Sm2EnvelopedKey, der::Error> {
        let r = Sm2EnvelopedKeyRef::from_der(der)?;
        let bits = |b: BitStringRef<'_>| {
            b.as_bytes().map(<[u8]>::to_vec).ok_or_else(|| {
                der::Error::from(der::ErrorKind::Length {
                    tag: der::Tag::BitString,
                })
            })
        };
        Ok(Sm2EnvelopedKey {
            sym_alg: r.sym_alg_id.oid,
            sym_encrypted_key: r.sym_encrypted_key.to_der()?,
            public_key: bits(r.sm2_public_key)?,
            encrypted_private_key: bits(r.sm2_encrypted_private_key)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_refuses_trailing_bytes() {
        let e = Sm2EnvelopedKey {
            sym_alg: SM4_ECB,
            // A SEQUENCE of two INTEGERs stands in for the SM2Cipher.
            sym_encrypted_key: vec![0x30, 0x06, 0x02, 0x01, 0x01, 0x02, 0x01, 0x02],
            public_key: [vec![4u8], vec![7u8; 64]].concat(),
            encrypted_private_key: vec![9u8; 32],
        };
        let der = e.to_der().unwrap();
        assert_eq!(Sm2EnvelopedKey::from_der(&der).unwrap(), e);
        let mut long = der.clone();
        long.push(0);
        assert!(Sm2EnvelopedKey::from_der(&long).is_err());
        assert!(Sm2EnvelopedKey::from_der(&der[..der.len() - 1]).is_err());
    }
}
