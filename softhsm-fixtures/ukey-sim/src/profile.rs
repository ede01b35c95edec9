//! Latency profiles: how long a real USB key's chip takes for each operation, so that
//! benchmarks and the app can be run against keys as slow as users' keys.
//!
//! A profile sets a token's chip times ([`crate::TokenState::chip_ms`]): a call returns
//! no sooner than its chip time after it started. SoftHSM2's own work (an RSA key pair
//! takes it 50 to 500 ms of host CPU) runs inside that time instead of adding to it,
//! as on a key whose chip does the work: eight keys at once then cost the host what
//! eight chips would, not eight SoftHSM2 key generations on two cores.
//!
//! The figures are public measurements of USB tokens and smart cards; every profile
//! names its sources, and `ukey-sim profile --list` and `cargo xtask bench` print them.

use std::time::Duration;

use crate::{Control, SimError};

/// `CKM_RSA_PKCS_KEY_PAIR_GEN`.
const CKM_RSA_PKCS_KEY_PAIR_GEN: u64 = 0x0000;
/// `CKM_EC_KEY_PAIR_GEN`.
const CKM_EC_KEY_PAIR_GEN: u64 = 0x1040;

/// One operation's time on the chip.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChipTime {
    /// PKCS#11 function.
    pub function: &'static str,
    /// Only for this mechanism (`None`: every call of the function).
    pub mechanism: Option<u64>,
    /// Milliseconds.
    pub ms: u64,
    /// What the figure is, and which source it comes from (`[n]` into `sources`).
    pub note: &'static str,
}

impl ChipTime {
    /// The key of [`crate::TokenState::chip_ms`] for this time.
    pub fn key(&self) -> String {
        match self.mechanism {
            Some(m) => format!("{}/{m}", self.function),
            None => self.function.to_owned(),
        }
    }

    /// The time.
    pub fn duration(&self) -> Duration {
        Duration::from_millis(self.ms)
    }
}

/// A named set of chip times.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Profile {
    /// Name given to `ukey-sim profile`.
    pub name: &'static str,
    /// One line, Chinese and English.
    pub description: &'static str,
    /// Chip times.
    pub times: &'static [ChipTime],
    /// Where the figures come from, numbered from 1 as the notes cite them.
    pub sources: &'static [&'static str],
}

impl Profile {
    /// The chip times as a token's state holds them ([`crate::TokenState::chip_ms`]).
    pub fn chip_ms(&self) -> std::collections::BTreeMap<String, u64> {
        self.times.iter().map(|c| (c.key(), c.ms)).collect()
    }

    /// The profile and its sources as text, for benchmarks and `ukey-sim profile --list`.
    pub fn describe(&self) -> String {
        let mut out = format!("{}: {}\n", self.name, self.description);
        for t in self.times {
            out.push_str(&format!("  {:<40} {:>6} ms  {}\n", t.key(), t.ms, t.note));
        }
        for (i, s) in self.sources.iter().enumerate() {
            out.push_str(&format!("  [{}] {s}\n", i + 1));
        }
        out
    }
}

/// A typical USB key (a smart-card chip behind a USB CCID interface, as Chinese UKeys
/// and PIV/OpenPGP tokens are).
pub const USB_KEY: Profile = Profile {
    name: "usb-key",
    description: "典型 USB Key 芯片 / a typical USB key's chip",
    times: &[
        ChipTime {
            function: "C_GenerateKeyPair",
            mechanism: Some(CKM_RSA_PKCS_KEY_PAIR_GEN),
            ms: 5000,
            note: "RSA-2048 key pair: 3.9 s USB token, 4.7 s JCOP4, 6.9 s Feitian [1]",
        },
        ChipTime {
            function: "C_GenerateKeyPair",
            mechanism: Some(CKM_EC_KEY_PAIR_GEN),
            ms: 250,
            note: "EC P-256 key pair: 207 ms USB token, plus APDUs [1]",
        },
        ChipTime {
            function: "C_Sign",
            mechanism: None,
            ms: 270,
            note: "RSA-2048 signature: 269 ms CryptoCertum, 139 ms YubiKey 5 [2]; a length query is free",
        },
        ChipTime {
            function: "C_Login",
            mechanism: None,
            ms: 33,
            note: "PIN verify: 33 ms CryptoCertum, 9 ms YubiKey 5 [2]",
        },
        ChipTime {
            function: "C_CreateObject",
            mechanism: None,
            ms: 80,
            note: "write a 1-2 KB certificate: NVM writes of 256 B take 0.4-34 ms [1], 6 of them plus APDUs [3]",
        },
        ChipTime {
            function: "C_DestroyObject",
            mechanism: None,
            ms: 50,
            note: "delete an object and rewrite the directory [1] [3]",
        },
        ChipTime {
            function: "C_SetAttributeValue",
            mechanism: None,
            ms: 40,
            note: "rewrite a label or id [1] [3]",
        },
        ChipTime {
            function: "C_OpenSession",
            mechanism: None,
            ms: 5,
            note: "select the application, one APDU [2] [3]",
        },
        ChipTime {
            function: "C_FindObjects",
            mechanism: None,
            ms: 1,
            note: "from the middleware's object cache [3]",
        },
        ChipTime {
            function: "C_GetAttributeValue",
            mechanism: None,
            ms: 1,
            note: "from the middleware's object cache; uncached certificate reads take 7-164 ms [2] [3]",
        },
    ],
    sources: &[
        "JCAlgTest on-card performance profiles (crocs-muni/JCAlgTest, Profiles/performance/fixed/*.csv): KeyPair_genKeyPair RSA-2048 G+D SmartCafe 7.0 USB token 3.9 s (1.3-8.8), NXP JCOP4 P71 4.7 s, Feitian JavaCOS 3.0.4 6.9 s; EC P-256 G+D USB token 207 ms; Util_arrayCopy_RAM2EEPROM 256 B 0.4-34 ms",
        "jsign benchmark (ebourg/jsign, jsign-benchmark/README.md), from the host over PC/SC: RSA-2048 signature YubiKey 5 PIV 138.5 ms, CryptoCertum 3.6 269.2 ms; verify PIN 9.1 / 33.0 ms; read certificate 7.3 / 164.3 ms",
        "estimate from [1] and [2] where no PKCS#11-level measurement is published (object writes and deletes, cached lookups)",
    ],
};

/// Every built-in profile.
pub const PROFILES: &[Profile] = &[USB_KEY];

/// A built-in profile by name.
pub fn profile(name: &str) -> Option<&'static Profile> {
    PROFILES.iter().find(|p| p.name == name)
}

impl Control {
    /// Gives the token a chip that takes the profile's times (`None` removes them).
    pub fn set_profile(&self, serial: &str, profile: Option<&Profile>) -> Result<(), SimError> {
        self.update(serial, |t| {
            t.chip_ms = profile.map(Profile::chip_ms).unwrap_or_default();
            t.profile = profile.map(|p| p.name.to_owned());
        })
        .map(drop)
    }

    /// [`Control::set_profile`] by name; an unknown name lists the known ones.
    pub fn set_profile_by_name(&self, serial: &str, name: &str) -> Result<(), SimError> {
        if name == "none" {
            return self.set_profile(serial, None);
        }
        let p = profile(name).ok_or_else(|| {
            SimError::InvalidArgument(format!(
                "unknown latency profile {name:?} (known: {}, none)",
                PROFILES
                    .iter()
                    .map(|p| p.name)
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        })?;
        self.set_profile(serial, Some(p))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mechanism_figures_come_before_the_function_figure() {
        let token = crate::TokenState {
            chip_ms: USB_KEY.chip_ms(),
            ..Default::default()
        };
        let keygen = |m| token.chip_time("C_GenerateKeyPair", Some(m)).unwrap();
        assert!(keygen(CKM_RSA_PKCS_KEY_PAIR_GEN) > keygen(CKM_EC_KEY_PAIR_GEN));
        assert_eq!(token.chip_time("C_GenerateKeyPair", Some(0x9999)), None);
        assert!(token.chip_time("C_Sign", Some(0x1041)).is_some());
        assert_eq!(token.chip_time("C_Digest", None), None);
    }

    #[test]
    fn every_note_cites_a_source_and_every_function_exists() {
        for p in PROFILES {
            for t in p.times {
                assert!(crate::is_function(t.function), "{}", t.function);
                let cited: Vec<usize> = t
                    .note
                    .split('[')
                    .skip(1)
                    .filter_map(|s| s.split(']').next()?.parse().ok())
                    .collect();
                assert!(!cited.is_empty(), "{}: {} cites nothing", p.name, t.note);
                for n in cited {
                    assert!((1..=p.sources.len()).contains(&n), "{}: [{n}]", t.note);
                }
            }
        }
    }
}
