//! ukey-sim as a 国密 (GM) key: the vendor SM2/SM4 mechanisms of a profile, done in
//! software (RustCrypto `sm2`, `sm4`) over keys that SoftHSM2 stores.
//!
//! PKCS#11 has no SM2, so every vendor numbers it: a [`GmProfile`] is one vendor's
//! numbers. ukey-sim implements two whose constants differ in every place (TASS and
//! Luna, as published in GM-NOTES), so that a client proves it maps abstract operations
//! to a module's constants instead of hard-coding one vendor. The token's
//! manufacturerID becomes the vendor's, as a vendor module fills it.
//!
//! How keys are kept (see the module's `sm2` calls):
//! - An SM2 key pair is two SoftHSM2 objects of type CKK_EC whose CKA_EC_PARAMS is the
//!   SM2 curve; the shim shows them with the vendor's CKK_SM2.
//! - The private scalar is never stored in clear: the SoftHSM2 private key object holds
//!   `MAGIC ‖ IV ‖ AES-256-GCM(scalar)` in CKA_VALUE, encrypted by SoftHSM2 itself under
//!   the token's *master key* (a sensitive, never extractable, private AES key on the
//!   token, made at the first SM2 key and hidden from the application). The shim
//!   answers CKA_VALUE of such a key with CKR_ATTRIBUTE_SENSITIVE and shows
//!   CKA_SENSITIVE true and CKA_EXTRACTABLE false whatever SoftHSM2 holds; C_WrapKey
//!   refuses it. The scalar exists in clear only inside one shim call, as on a chip.
//! - SM4 keys (unwrapped from an escrow envelope) live in the shim's memory for the
//!   session that unwrapped them, as a chip's session keys do; they are never on disk.

use sm2::elliptic_curve::sec1::ToSec1Point;
use sm4::cipher::{Array, BlockCipherDecrypt, BlockCipherEncrypt, KeyInit};

/// The GM default distinguishing ID (GM/T 0009) the with-SM3 mechanisms use for Z.
pub const GM_DISTID: &str = "1234567812345678";

/// `CKA_EC_PARAMS` of an SM2 key: the named curve 1.2.156.10197.1.301.
pub const SM2_EC_PARAMS: &[u8] = &[0x06, 0x08, 0x2A, 0x81, 0x1C, 0xCF, 0x55, 0x01, 0x82, 0x2D];

/// One vendor's 国密 numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GmProfile {
    /// Short name (`tass`, `luna`).
    pub name: &'static str,
    /// The manufacturerID its tokens report.
    pub manufacturer: &'static str,
    /// CKA_KEY_TYPE of SM2 keys.
    pub ckk_sm2: u64,
    /// SM2 key pair generation.
    pub key_pair_gen: u64,
    /// Sign a 32-byte digest e = SM3(Z ‖ M) the host computed; output raw `r ‖ s`.
    pub sign_prehashed: u64,
    /// Sign a message: the token computes Z with the GM ID, and SM3; output `r ‖ s`.
    pub sign_with_sm3: u64,
    /// SM2 decryption of a GM/T 0009 `SM2Cipher` (C1 C3 C2, DER); also unwraps an SM4
    /// key with C_UnwrapKey.
    pub sm2_decrypt: Option<u64>,
    /// CKA_KEY_TYPE of SM4 keys.
    pub ckk_sm4: Option<u64>,
    /// SM4-ECB decryption; with C_UnwrapKey, an SM2 private key from its SM4-ECB
    /// encrypted scalar (32 bytes, or 64 with 32 leading zeros as GM/T 0016 pads it).
    pub sm4_ecb: Option<u64>,
}

/// The profiles ukey-sim speaks. TASS's and Luna's SM2 numbers are the published ones;
/// their SM4 numbers were not published, so the TASS profile's SM4 pair is ukey-sim's
/// own (a client configures it as it would a vendor's unpublished constants).
pub const PROFILES: &[GmProfile] = &[
    GmProfile {
        name: "tass",
        manufacturer: "TASS",
        ckk_sm2: 0x8000_0004,
        key_pair_gen: 0x8000_8001,
        sign_prehashed: 0x8000_8000,
        sign_with_sm3: 0x8000_8100,
        sm2_decrypt: Some(0x8000_8200),
        ckk_sm4: Some(0x8000_0005),
        sm4_ecb: Some(0x8000_8401),
    },
    GmProfile {
        name: "luna",
        manufacturer: "SafeNet",
        ckk_sm2: 0x8000_0016,
        key_pair_gen: 0x8000_0B20,
        sign_prehashed: 0x8000_0B21,
        sign_with_sm3: 0x8000_0B22,
        sm2_decrypt: None,
        ckk_sm4: None,
        sm4_ecb: None,
    },
];

/// A profile by name.
pub fn profile(name: &str) -> Option<&'static GmProfile> {
    PROFILES.iter().find(|p| p.name == name)
}

/// What a mechanism of a profile does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GmMechanism {
    /// SM2 key pair generation.
    KeyPairGen,
    /// SM2 signature of a host-computed digest.
    SignPrehashed,
    /// SM2 signature of a message (Z and SM3 on the token).
    SignWithSm3,
    /// SM2 decryption / unwrap.
    Sm2Decrypt,
    /// SM4-ECB decryption / unwrap.
    Sm4Ecb,
}

impl GmProfile {
    /// The mechanisms this profile adds, with what each does.
    pub fn mechanisms(&self) -> Vec<(u64, GmMechanism)> {
        let mut v = vec![
            (self.key_pair_gen, GmMechanism::KeyPairGen),
            (self.sign_prehashed, GmMechanism::SignPrehashed),
            (self.sign_with_sm3, GmMechanism::SignWithSm3),
        ];
        v.extend(self.sm2_decrypt.map(|m| (m, GmMechanism::Sm2Decrypt)));
        v.extend(self.sm4_ecb.map(|m| (m, GmMechanism::Sm4Ecb)));
        v
    }

    /// What `mechanism` does in this profile, if it is one of its own.
    pub fn mechanism(&self, mechanism: u64) -> Option<GmMechanism> {
        self.mechanisms()
            .into_iter()
            .find_map(|(m, what)| (m == mechanism).then_some(what))
    }

    /// A human-readable description (`ukey-sim gm --list`).
    pub fn describe(&self) -> String {
        let opt = |v: Option<u64>| v.map_or("-".to_owned(), |v| format!("{v:#010x}"));
        format!(
            "{} (manufacturerID {:?})\n  CKK_SM2 {:#010x}  keygen {:#010x}  sign prehashed {:#010x}  sign with SM3 {:#010x}\n  SM2 decrypt {}  CKK_SM4 {}  SM4-ECB {}\n",
            self.name,
            self.manufacturer,
            self.ckk_sm2,
            self.key_pair_gen,
            self.sign_prehashed,
            self.sign_with_sm3,
            opt(self.sm2_decrypt),
            opt(self.ckk_sm4),
            opt(self.sm4_ecb),
        )
    }
}

/// Why a GM operation failed (mapped to a CKR_ by the module).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GmError {
    /// The input has the wrong size or form.
    DataInvalid,
    /// The ciphertext does not decrypt (wrong key, tampered).
    EncryptedDataInvalid,
    /// A key value is not a valid SM2 scalar or SM4 key.
    KeyInvalid,
    /// No randomness.
    Random,
}

/// A new SM2 private scalar (32 bytes) and its uncompressed public point (65 bytes).
pub fn generate() -> Result<([u8; 32], Vec<u8>), GmError> {
    loop {
        let mut d = [0u8; 32];
        getrandom::fill(&mut d).map_err(|_| GmError::Random)?;
        // A random 256-bit value is a valid scalar unless it is 0 or ≥ n (chance ~2^-32).
        if let Ok(point) = public_point(&d) {
            return Ok((d, point));
        }
    }
}

/// The uncompressed public point of the scalar `d`.
pub fn public_point(d: &[u8]) -> Result<Vec<u8>, GmError> {
    let secret = sm2::SecretKey::from_slice(d).map_err(|_| GmError::KeyInvalid)?;
    Ok(secret.public_key().to_sec1_point(false).as_bytes().to_vec())
}

/// Signs with the scalar `d`: `digest` is e (prehashed) or the message (with SM3, Z
/// from the GM ID). Returns `r ‖ s`.
pub fn sign(d: &[u8], data: &[u8], prehashed: bool) -> Result<[u8; 64], GmError> {
    use sm2::dsa::signature::Signer;
    use sm2::dsa::signature::hazmat::PrehashSigner;
    let key = sm2::dsa::SigningKey::from_slice(GM_DISTID, d).map_err(|_| GmError::KeyInvalid)?;
    let sig: sm2::dsa::Signature = if prehashed {
        if data.len() != 32 {
            return Err(GmError::DataInvalid);
        }
        key.sign_prehash(data).map_err(|_| GmError::DataInvalid)?
    } else {
        key.try_sign(data).map_err(|_| GmError::DataInvalid)?
    };
    Ok(sig.to_bytes().into())
}

/// Decrypts a GM/T 0009 `SM2Cipher` (DER, C1 C3 C2) with the scalar `d`.
pub fn decrypt(d: &[u8], ciphertext: &[u8]) -> Result<Vec<u8>, GmError> {
    let key = sm2::pke::DecryptingKey::from_slice(d).map_err(|_| GmError::KeyInvalid)?;
    key.decrypt_der(ciphertext)
        .map_err(|_| GmError::EncryptedDataInvalid)
}

/// SM4-ECB without padding, one way or the other.
pub fn sm4_ecb(key: &[u8], data: &[u8], decrypt: bool) -> Result<Vec<u8>, GmError> {
    if data.is_empty() || !data.len().is_multiple_of(16) {
        return Err(GmError::DataInvalid);
    }
    let cipher = sm4::Sm4::new_from_slice(key).map_err(|_| GmError::KeyInvalid)?;
    let mut out = Vec::with_capacity(data.len());
    for chunk in data.chunks(16) {
        let mut block = Array::try_from(chunk).map_err(|_| GmError::DataInvalid)?;
        if decrypt {
            cipher.decrypt_block(&mut block);
        } else {
            cipher.encrypt_block(&mut block);
        }
        out.extend_from_slice(&block);
    }
    Ok(out)
}

/// The SM2 scalar in an SM4-ECB decrypted escrow blob: 32 bytes, or 64 bytes whose
/// first 32 are zero (GM/T 0016's 512-bit field).
pub fn scalar_of(plain: &[u8]) -> Result<[u8; 32], GmError> {
    let d = match plain.len() {
        32 => plain,
        64 if plain[..32].iter().all(|b| *b == 0) => &plain[32..],
        _ => return Err(GmError::DataInvalid),
    };
    public_point(d)?;
    let mut out = [0u8; 32];
    out.copy_from_slice(d);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_two_profiles_share_no_constant() {
        let (tass, luna) = (profile("tass").unwrap(), profile("luna").unwrap());
        for (m, _) in tass.mechanisms() {
            assert!(luna.mechanism(m).is_none(), "{m:#x}");
        }
        assert_ne!(tass.ckk_sm2, luna.ckk_sm2);
        assert_eq!(
            tass.mechanism(0x8000_8000),
            Some(GmMechanism::SignPrehashed)
        );
    }

    #[test]
    fn prehashed_and_message_signatures_verify_with_the_gm_id() {
        use sm2::dsa::signature::Verifier;
        let (d, point) = generate().unwrap();
        let vk = sm2::dsa::VerifyingKey::from_sec1_bytes(GM_DISTID, &point).unwrap();
        let sig = sign(&d, b"bid", false).unwrap();
        let sig = sm2::dsa::Signature::from_slice(&sig).unwrap();
        vk.verify(b"bid", &sig).unwrap();
        // A prehashed signature over a wrong-length digest is refused.
        assert_eq!(sign(&d, b"short", true), Err(GmError::DataInvalid));
    }

    #[test]
    fn sm4_ecb_round_trips_and_a_padded_scalar_is_read() {
        let key = [7u8; 16];
        let (d, _) = generate().unwrap();
        let mut padded = vec![0u8; 32];
        padded.extend_from_slice(&d);
        let enc = sm4_ecb(&key, &padded, false).unwrap();
        assert_ne!(enc[32..], d);
        let dec = sm4_ecb(&key, &enc, true).unwrap();
        assert_eq!(scalar_of(&dec).unwrap(), d);
        assert_eq!(scalar_of(&[1u8; 64]), Err(GmError::DataInvalid));
        assert_eq!(sm4_ecb(&key, &[0u8; 15], true), Err(GmError::DataInvalid));
    }
}
