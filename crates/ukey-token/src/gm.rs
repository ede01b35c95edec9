//! 国密 over PKCS#11: which vendor-defined constants a module uses for SM2 and SM4.
//!
//! PKCS#11 up to 3.1 defines no SM2, SM3 or SM4, so every vendor numbers them itself, and
//! the differences go beyond numbers: whether the module computes Z = SM3(ENTL ‖ ID ‖ a ‖
//! b ‖ xG ‖ yG ‖ xA ‖ yA) and the message digest itself or wants the digest e, whether a
//! signature comes back as raw `r ‖ s` or DER. A [`MechanismProfile`] maps the abstract
//! operations the client needs to one module's constants and behaviour.
//!
//! Profiles come from two places:
//! - built in ([`BUILT_IN`]): the sets published for HSM vendors (Luna, TASS, Sansec,
//!   IBM), matched by library file name or token manufacturer. **None has been tried on
//!   hardware** (`tried_on_hardware: false`); UKey vendors' PKCS#11 SM2 constants are
//!   unpublished (their integrations use SKF);
//! - the configuration file, on a `[[modules]]` entry, either naming a built-in profile
//!   or giving the constants (TOML takes hex integers as they are):
//!
//! ```toml
//! [[modules]]
//! name = "My CA's GM key"
//! path = "/opt/myca/lib/libmyca_p11.so"
//! sm2_profile = "tass"              # a built-in one, or:
//!
//! [modules.sm2]
//! name = "myca"
//! ckk_sm2 = 0x80000004
//! key_pair_gen = 0x80008001
//! sign_prehashed = 0x80008000       # the host computes e = SM3(Z ‖ M)
//! signature = "raw"                 # r ‖ s, 64 bytes
//! ```
//!
//! A configured profile wins over a built-in one; among built-ins the library file name
//! is matched first, then the token's manufacturerID.

use std::path::Path;

use serde::{Deserialize, Serialize};

/// `CKA_EC_PARAMS` of an SM2 key: the named curve 1.2.156.10197.1.301.
pub const SM2_EC_PARAMS: &[u8] = &[0x06, 0x08, 0x2A, 0x81, 0x1C, 0xCF, 0x55, 0x01, 0x82, 0x2D];

/// How a module returns an SM2 signature.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SignatureFormat {
    /// `r ‖ s`, 32 bytes each (what PKCS#11 does for ECDSA).
    Raw,
    /// DER `SEQUENCE { r INTEGER, s INTEGER }`.
    Der,
}

/// One module's SM2/SM4 constants and behaviour.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MechanismProfile {
    /// Short name, e.g. `tass`.
    pub name: String,
    /// Library file names this profile is for (built-ins; matched on the file name).
    #[serde(default)]
    pub libraries: Vec<String>,
    /// Token manufacturerID prefixes this profile is for (built-ins).
    #[serde(default)]
    pub manufacturers: Vec<String>,
    /// `CKA_KEY_TYPE` of SM2 keys.
    pub ckk_sm2: u64,
    /// SM2 key pair generation mechanism.
    pub key_pair_gen: u64,
    /// Sign a digest e = SM3(Z ‖ M) the host computed (Z with the GM ID).
    #[serde(default)]
    pub sign_prehashed: Option<u64>,
    /// Sign a message: the module computes Z (with the GM ID) and SM3 itself.
    #[serde(default)]
    pub sign_with_sm3: Option<u64>,
    /// SM2 decryption (GM/T 0009 ciphertext).
    #[serde(default)]
    pub sm2_decrypt: Option<u64>,
    /// `CKA_KEY_TYPE` of SM4 keys.
    #[serde(default)]
    pub ckk_sm4: Option<u64>,
    /// SM4-ECB decryption (the escrowed private key in a GM/T 0009 envelope).
    #[serde(default)]
    pub sm4_ecb: Option<u64>,
    /// How signatures come back.
    #[serde(default = "raw")]
    pub signature: SignatureFormat,
    /// Whether it has been tried on hardware by us (never true for a built-in yet).
    #[serde(default)]
    pub tried_on_hardware: bool,
}

fn raw() -> SignatureFormat {
    SignatureFormat::Raw
}

impl MechanismProfile {
    /// Who computes Z and the digest when the client signs: the host when the module
    /// signs prehashed digests, else the module.
    pub fn host_computes_digest(&self) -> bool {
        self.sign_prehashed.is_some()
    }

    /// Whether the profile can do what a renewal needs: generate an SM2 key pair and
    /// sign with it one way or the other.
    pub fn can_renew(&self) -> bool {
        self.sign_prehashed.is_some() || self.sign_with_sm3.is_some()
    }

    /// Whether it can take an escrowed encryption key (GM/T 0009 envelope).
    pub fn can_import_envelope(&self) -> bool {
        self.sm2_decrypt.is_some() && self.sm4_ecb.is_some() && self.ckk_sm4.is_some()
    }
}

/// A built-in profile: the published constants, no file or manufacturer claimed unless
/// the vendor's product is known by them.
fn built_in(
    name: &str,
    libraries: &[&str],
    manufacturers: &[&str],
    [ckk_sm2, key_pair_gen, prehashed, with_sm3]: [u64; 4],
    sm2_decrypt: Option<u64>,
) -> MechanismProfile {
    MechanismProfile {
        name: name.to_owned(),
        libraries: libraries.iter().map(|s| (*s).to_owned()).collect(),
        manufacturers: manufacturers.iter().map(|s| (*s).to_owned()).collect(),
        ckk_sm2,
        key_pair_gen,
        sign_prehashed: Some(prehashed),
        sign_with_sm3: Some(with_sm3),
        sm2_decrypt,
        ckk_sm4: None,
        sm4_ecb: None,
        signature: SignatureFormat::Raw,
        tried_on_hardware: false,
    }
}

/// The built-in profiles: the vendor sets published in a Java PKCS#11 wrapper's vendor
/// table (see `GM-NOTES.md`), none tried on hardware. SM4 constants were not published
/// with them, so none of these imports an escrowed key until a configuration adds them.
pub fn built_ins() -> Vec<MechanismProfile> {
    vec![
        built_in(
            "luna",
            &["libCryptoki2_64.so", "libCryptoki2.so"],
            &["SafeNet", "Thales"],
            [0x8000_0016, 0x8000_0B20, 0x8000_0B21, 0x8000_0B22],
            None,
        ),
        built_in(
            "tass",
            &[],
            &["TASS"],
            [0x8000_0004, 0x8000_8001, 0x8000_8000, 0x8000_8100],
            Some(0x8000_8200),
        ),
        built_in(
            "sansec",
            &["libswsds.so"],
            &["Sansec", "SANSEC"],
            [0x8000_0004, 0x8000_8001, 0x8000_8104, 0x8000_8100],
            Some(0x8000_8200),
        ),
        built_in(
            "ibm",
            &[],
            &["IBM"],
            [0x8005_0002, 0x8005_000A, 0x8005_000B, 0x8005_000C],
            Some(0x8005_000D),
        ),
    ]
}

/// A built-in profile by name.
pub fn built_in_named(name: &str) -> Option<MechanismProfile> {
    built_ins().into_iter().find(|p| p.name == name)
}

/// The profile for a module: the configuration's entry for this library (its `sm2`
/// table, or the built-in its `sm2_profile` names), else a built-in claiming the
/// library's file name, else one claiming the token's manufacturer.
pub fn profile_for(
    config: &crate::Config,
    library: &Path,
    manufacturer: &str,
) -> Result<Option<MechanismProfile>, String> {
    Ok(configured_for(config, library)?.or_else(|| built_in_for(library, manufacturer)))
}

/// The profile the configuration gives `library`, if it gives one.
pub fn configured_for(
    config: &crate::Config,
    library: &Path,
) -> Result<Option<MechanismProfile>, String> {
    let Some(entry) = config.modules.iter().find(|m| m.path == library) else {
        return Ok(None);
    };
    if let Some(p) = &entry.sm2 {
        return Ok(Some(p.clone()));
    }
    let Some(name) = &entry.sm2_profile else {
        return Ok(None);
    };
    built_in_named(name).map(Some).ok_or_else(|| {
        format!(
            "[[modules]] {}: unknown sm2_profile {name:?} (built in: {})",
            entry.name,
            built_ins()
                .iter()
                .map(|p| p.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )
    })
}

/// The built-in profile claiming the library's file name, else the token's
/// manufacturer.
pub fn built_in_for(library: &Path, manufacturer: &str) -> Option<MechanismProfile> {
    let file = library
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default();
    let all = built_ins();
    if let Some(p) = all.iter().find(|p| p.libraries.contains(&file)) {
        return Some(p.clone());
    }
    let manufacturer = manufacturer.trim();
    all.into_iter().find(|p| {
        !manufacturer.is_empty()
            && p.manufacturers
                .iter()
                .any(|m| manufacturer.starts_with(m.as_str()))
    })
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::Config;

    fn config(toml: &str) -> Config {
        toml::from_str(toml).expect("config")
    }

    #[test]
    fn built_ins_are_distinct_untried_and_can_renew() {
        let all = built_ins();
        assert_eq!(all.len(), 4);
        for p in &all {
            assert!(!p.tried_on_hardware, "{}", p.name);
            assert!(p.can_renew(), "{}", p.name);
            assert!(p.host_computes_digest());
            assert!(
                !p.can_import_envelope(),
                "{}: no SM4 constants were published",
                p.name
            );
        }
        // TASS and Sansec share a key type but not the prehashed signature.
        let (tass, sansec) = (
            built_in_named("tass").unwrap(),
            built_in_named("sansec").unwrap(),
        );
        assert_eq!(tass.ckk_sm2, sansec.ckk_sm2);
        assert_ne!(tass.sign_prehashed, sansec.sign_prehashed);
        assert_eq!(built_in_named("luna").unwrap().key_pair_gen, 0x8000_0B20);
    }

    #[test]
    fn a_configured_profile_wins_then_file_name_then_manufacturer() {
        let c = config(
            "[[modules]]\nname = \"GM key\"\npath = \"/opt/gm/libgm.so\"\n\
             [modules.sm2]\nname = \"gm\"\nckk_sm2 = 0x80000004\nkey_pair_gen = 0x80008001\n\
             sign_with_sm3 = 0x80008100\nsignature = \"der\"\n\n\
             [[modules]]\nname = \"Luna by name\"\npath = \"/opt/x/libp11.so\"\nsm2_profile = \"luna\"\n",
        );
        let gm = profile_for(&c, Path::new("/opt/gm/libgm.so"), "TASS")
            .unwrap()
            .unwrap();
        assert_eq!(gm.name, "gm");
        assert_eq!(gm.signature, SignatureFormat::Der);
        assert!(!gm.host_computes_digest());
        assert_eq!(gm.sign_with_sm3, Some(0x8000_8100));

        let by_name = profile_for(&c, Path::new("/opt/x/libp11.so"), "")
            .unwrap()
            .unwrap();
        assert_eq!(by_name.name, "luna");

        let by_file = profile_for(&c, &PathBuf::from("/usr/lib/libCryptoki2_64.so"), "TASS")
            .unwrap()
            .unwrap();
        assert_eq!(
            by_file.name, "luna",
            "the file name comes before the manufacturer"
        );

        let by_maker = profile_for(&c, Path::new("/usr/lib/libother.so"), "TASS Co. Ltd ")
            .unwrap()
            .unwrap();
        assert_eq!(by_maker.name, "tass");

        assert_eq!(
            profile_for(&c, Path::new("/usr/lib/libsofthsm2.so"), "SoftHSM project").unwrap(),
            None
        );
        assert_eq!(
            profile_for(&c, Path::new("/usr/lib/libother.so"), "").unwrap(),
            None
        );
    }

    #[test]
    fn a_bad_profile_in_the_configuration_is_a_clear_error() {
        let c = config(
            "[[modules]]\nname = \"Mine\"\npath = \"/opt/m.so\"\nsm2_profile = \"nosuch\"\n",
        );
        let e = profile_for(&c, Path::new("/opt/m.so"), "").unwrap_err();
        assert!(e.contains("nosuch") && e.contains("tass"), "{e}");
        // A profile table missing a required constant, or with an unknown key, is
        // refused when the file is read.
        for bad in [
            "[[modules]]\nname = \"M\"\npath = \"/m.so\"\n[modules.sm2]\nname = \"x\"\nckk_sm2 = 1\n",
            "[[modules]]\nname = \"M\"\npath = \"/m.so\"\n[modules.sm2]\nname = \"x\"\nckk_sm2 = 1\nkey_pair_gen = 2\nsign = 3\n",
        ] {
            assert!(toml::from_str::<Config>(bad).is_err(), "{bad}");
        }
    }
}
