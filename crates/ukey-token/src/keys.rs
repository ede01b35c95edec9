//! Key pairs for the renewal engine: generation on the token, reading a public key
//! back, and its DER forms (PKCS#1 / SEC1 point for rcgen, SubjectPublicKeyInfo to
//! compare with a certificate).
//!
//! Keys are generated like a UKey's own: token objects, private and sensitive, never
//! extractable, and each for one job: a signing key only signs; the escrow envelope
//! goes to a transport key (a session object that only unwraps or derives).

use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use serde::{Deserialize, Serialize};

use crate::gm::MechanismProfile;

use crate::der;
use crate::error::{Error, Result};
use crate::session::Session;

/// DER of the P-256 curve OID (prime256v1), the value of CKA_EC_PARAMS.
pub const P256_EC_PARAMS: &[u8] = &[0x06, 0x08, 0x2A, 0x86, 0x48, 0xCE, 0x3D, 0x03, 0x01, 0x07];

/// Algorithms the engine generates and signs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum KeyAlg {
    /// RSA, 2048-bit modulus, e = 65537.
    #[serde(rename = "RSA-2048")]
    Rsa2048,
    /// ECDSA/ECDH on NIST P-256.
    #[serde(rename = "EC-P256")]
    EcP256,
    /// SM2 (GM/T 0003), through the module's vendor mechanisms ([`crate::gm`]).
    #[serde(rename = "SM2")]
    Sm2,
}

impl KeyAlg {
    /// `RSA-2048` or `EC-P256` (the names [`crate::CertificateDetails::key_algorithm`] uses).
    pub fn as_str(self) -> &'static str {
        match self {
            KeyAlg::Rsa2048 => "RSA-2048",
            KeyAlg::EcP256 => "EC-P256",
            KeyAlg::Sm2 => "SM2",
        }
    }

    /// Parses [`KeyAlg::as_str`] names.
    pub fn parse(s: &str) -> Option<KeyAlg> {
        match s {
            "RSA-2048" => Some(KeyAlg::Rsa2048),
            "EC-P256" => Some(KeyAlg::EcP256),
            "SM2" => Some(KeyAlg::Sm2),
            _ => None,
        }
    }

    /// The key-generation mechanism; for SM2 the profile's (`None` without one).
    pub fn keygen_mechanism(self, sm2: Option<&MechanismProfile>) -> Option<MechanismType> {
        match self {
            KeyAlg::Rsa2048 => Some(MechanismType::RSA_PKCS_KEY_PAIR_GEN),
            KeyAlg::EcP256 => Some(MechanismType::ECC_KEY_PAIR_GEN),
            KeyAlg::Sm2 => sm2.and_then(|p| vendor(p.key_pair_gen)),
        }
    }

    /// The signing mechanism [`Session::sign_data`] uses; for SM2 the profile's
    /// prehashed one if it has it, else its with-SM3 one.
    pub fn sign_mechanism(self, sm2: Option<&MechanismProfile>) -> Option<MechanismType> {
        match self {
            KeyAlg::Rsa2048 => Some(MechanismType::SHA256_RSA_PKCS),
            KeyAlg::EcP256 => Some(MechanismType::ECDSA),
            KeyAlg::Sm2 => sm2
                .and_then(|p| p.sign_prehashed.or(p.sign_with_sm3))
                .and_then(vendor),
        }
    }
}

/// A vendor-defined mechanism type (`None` below CKM_VENDOR_DEFINED).
pub fn vendor(value: u64) -> Option<MechanismType> {
    MechanismType::new_vendor_defined(value).ok()
}

/// A vendor-defined mechanism without parameters.
pub(crate) fn vendor_mechanism(value: u64) -> Result<Mechanism<'static>> {
    let m = vendor(value).ok_or_else(|| Error::ObjectInvalid {
        what: format!("{value:#x} is not a vendor-defined mechanism"),
    })?;
    Ok(Mechanism::VendorDefined(
        cryptoki::mechanism::vendor_defined::VendorDefinedMechanism::new::<()>(m, None),
    ))
}

impl KeyAlg {
    /// Whether keys of this algorithm are EC points (P-256 or SM2).
    pub fn is_ec(self) -> bool {
        matches!(self, KeyAlg::EcP256 | KeyAlg::Sm2)
    }
}

/// A public key read from the token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PublicKey {
    /// RSA modulus and public exponent, big-endian.
    Rsa {
        /// n.
        modulus: Vec<u8>,
        /// e.
        exponent: Vec<u8>,
    },
    /// Uncompressed SEC1 point on P-256 (`04 || X || Y`).
    EcP256 {
        /// The point.
        point: Vec<u8>,
    },
    /// Uncompressed point on the SM2 curve (`04 || X || Y`).
    Sm2 {
        /// The point.
        point: Vec<u8>,
    },
}

impl PublicKey {
    /// The algorithm.
    pub fn alg(&self) -> KeyAlg {
        match self {
            PublicKey::Rsa { .. } => KeyAlg::Rsa2048,
            PublicKey::EcP256 { .. } => KeyAlg::EcP256,
            PublicKey::Sm2 { .. } => KeyAlg::Sm2,
        }
    }

    /// rcgen's raw form: PKCS#1 `RSAPublicKey` DER for RSA, the SEC1 point for EC.
    pub fn raw(&self) -> Vec<u8> {
        match self {
            PublicKey::Rsa { modulus, exponent } => der::rsa_public_key(modulus, exponent),
            PublicKey::EcP256 { point } | PublicKey::Sm2 { point } => point.clone(),
        }
    }

    /// The SubjectPublicKeyInfo DER, as in a certificate issued for this key.
    pub fn spki(&self) -> Vec<u8> {
        der::spki(self.alg(), &self.raw())
    }
}

/// A key pair just generated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyPairHandles {
    /// The public key object.
    pub public: ObjectHandle,
    /// The private key object.
    pub private: ObjectHandle,
}

impl Session<'_> {
    /// C_GenerateKeyPair: a token key pair of `alg` whose two objects carry `id` and
    /// `label`. Needs a read-write session and login.
    pub fn generate_key_pair(&self, alg: KeyAlg, id: &[u8], label: &str) -> Result<KeyPairHandles> {
        let sm2 = self.sm2_profile();
        let common = |private: bool| {
            vec![
                Attribute::Token(true),
                Attribute::Private(private),
                Attribute::Id(id.to_vec()),
                Attribute::Label(label.as_bytes().to_vec()),
            ]
        };
        // The private key only signs. The public key's usage flags grant nothing secret
        // and are left to the module: tpm2-pkcs11 refuses a key pair whose public flags
        // differ from what the TPM object carries (a sign-only TPM key shows "encrypt").
        let mut public = common(false);
        let mut private = common(true);
        private.extend([
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Sign(true),
        ]);
        let mechanism = match alg {
            KeyAlg::Rsa2048 => {
                public.extend([
                    Attribute::ModulusBits(2048.into()),
                    Attribute::PublicExponent(vec![0x01, 0x00, 0x01]),
                ]);
                private.extend([Attribute::Decrypt(false), Attribute::Unwrap(false)]);
                Mechanism::RsaPkcsKeyPairGen
            }
            KeyAlg::EcP256 => {
                public.push(Attribute::EcParams(P256_EC_PARAMS.to_vec()));
                private.extend([
                    Attribute::Derive(false),
                    Attribute::Decrypt(false),
                    Attribute::Unwrap(false),
                ]);
                Mechanism::EccKeyPairGen
            }
            KeyAlg::Sm2 => {
                // A GM key's signing key also opens the escrow envelope addressed to it
                // (GM/T 0092 encrypts it to the new signing key): it may unwrap, and
                // never decrypts data or derives.
                let p = sm2.as_ref().ok_or_else(|| no_sm2_profile(self))?;
                let key_type = KeyType::new_vendor_defined(p.ckk_sm2).unwrap_or(KeyType::EC);
                for t in [&mut public, &mut private] {
                    t.push(Attribute::KeyType(key_type));
                }
                public.push(Attribute::EcParams(crate::gm::SM2_EC_PARAMS.to_vec()));
                private.extend([
                    Attribute::Derive(false),
                    Attribute::Decrypt(false),
                    Attribute::Unwrap(p.can_import_envelope()),
                ]);
                vendor_mechanism(p.key_pair_gen)?
            }
        };
        let (public, private) = self
            .cryptoki()
            .generate_key_pair(&mechanism, &public, &private)
            .map_err(|e| self.map_error(e))?;
        tracing::debug!(alg = alg.as_str(), label, "key pair generated on the token");
        Ok(KeyPairHandles { public, private })
    }

    /// Generates a *transport key*: a key pair that lives in this session only
    /// (CKA_TOKEN false, gone when the session ends or the key is pulled), whose
    /// private half can only receive a key (RSA: CKA_UNWRAP; EC: CKA_DERIVE) and never
    /// signs or decrypts data. The escrowed encryption key's envelope is addressed to
    /// it, so that the signing key only signs. Returns the private key and the public
    /// key as read back from the token.
    pub fn generate_transport_key(&self, alg: KeyAlg) -> Result<(ObjectHandle, PublicKey)> {
        let label = b"ukey-renew transport key".to_vec();
        let mut public = vec![
            Attribute::Token(false),
            Attribute::Private(false),
            Attribute::Label(label.clone()),
            Attribute::Verify(false),
            Attribute::Encrypt(false),
        ];
        let mut private = vec![
            Attribute::Token(false),
            Attribute::Private(true),
            Attribute::Label(label),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Sign(false),
            Attribute::Decrypt(false),
        ];
        let mechanism = match alg {
            KeyAlg::Rsa2048 => {
                public.extend([
                    Attribute::ModulusBits(2048.into()),
                    Attribute::PublicExponent(vec![0x01, 0x00, 0x01]),
                    Attribute::Wrap(true),
                ]);
                private.extend([Attribute::Unwrap(true), Attribute::Derive(false)]);
                Mechanism::RsaPkcsKeyPairGen
            }
            KeyAlg::EcP256 => {
                public.push(Attribute::EcParams(P256_EC_PARAMS.to_vec()));
                private.extend([Attribute::Derive(true), Attribute::Unwrap(false)]);
                Mechanism::EccKeyPairGen
            }
            // An SM2 envelope goes to the new signing key (GM/T 0092), not to a
            // transport key.
            KeyAlg::Sm2 => {
                return Err(Error::ObjectInvalid {
                    what: "SM2 keys take their escrowed key through the signing key, not a transport key".into(),
                });
            }
        };
        let (public, private) = self
            .cryptoki()
            .generate_key_pair(&mechanism, &public, &private)
            .map_err(|e| self.map_error(e))?;
        let key = self.public_key(public);
        // The public half is not needed on the token once read.
        if let Err(e) = self.cryptoki().destroy_object(public) {
            tracing::debug!("destroying the transport key's public object: {e}");
        }
        tracing::debug!(
            alg = alg.as_str(),
            "transport key generated for this session"
        );
        Ok((private, key?))
    }

    /// Reads the public key of a public key object (RSA or EC P-256).
    pub fn public_key(&self, public: ObjectHandle) -> Result<PublicKey> {
        let attrs = self.attributes(
            public,
            &[
                AttributeType::KeyType,
                AttributeType::Modulus,
                AttributeType::PublicExponent,
                AttributeType::EcPoint,
                AttributeType::EcParams,
            ],
        )?;
        let mut key_type = None;
        let (mut n, mut e, mut point, mut params) = (None, None, None, None);
        for a in attrs {
            match a {
                Attribute::KeyType(k) => key_type = Some(k),
                Attribute::Modulus(v) => n = Some(v),
                Attribute::PublicExponent(v) => e = Some(v),
                Attribute::EcPoint(v) => point = Some(v),
                Attribute::EcParams(v) => params = Some(v),
                _ => {}
            }
        }
        // An SM2 key: the SM2 curve, or the profile's key type (whatever CKK_EC or
        // vendor type the module shows).
        let sm2_type = self
            .sm2_profile()
            .and_then(|p| KeyType::new_vendor_defined(p.ckk_sm2).ok());
        if let Some(p) = &point
            && (params.as_deref() == Some(crate::gm::SM2_EC_PARAMS)
                || (key_type.is_some() && key_type == sm2_type))
        {
            let point = der::unwrap_octet_string(p).unwrap_or_else(|| p.clone());
            if point.len() != 65 || point[0] != 0x04 {
                return Err(Error::ObjectInvalid {
                    what: format!(
                        "SM2 public key is not an uncompressed point ({} bytes)",
                        point.len()
                    ),
                });
            }
            return Ok(PublicKey::Sm2 { point });
        }
        match (key_type, n, e, point) {
            (Some(KeyType::RSA), Some(modulus), Some(exponent), _) => {
                Ok(PublicKey::Rsa { modulus, exponent })
            }
            (Some(KeyType::EC), _, _, Some(p)) => {
                // CKA_EC_POINT arrives DER-wrapped in an OCTET STRING on SoftHSM2 (and most
                // tokens); some hand back the bare point.
                let point = der::unwrap_octet_string(&p).unwrap_or(p);
                if point.len() != 65 || point[0] != 0x04 {
                    return Err(Error::ObjectInvalid {
                        what: format!(
                            "EC public key is not an uncompressed P-256 point ({} bytes)",
                            point.len()
                        ),
                    });
                }
                Ok(PublicKey::EcP256 { point })
            }
            (k, ..) => Err(Error::ObjectInvalid {
                what: format!("unsupported public key object (key type {k:?})"),
            }),
        }
    }

    /// Every object of `class` whose CKA_ID is `id`.
    pub fn find_by_id(&self, class: ObjectClass, id: &[u8]) -> Result<Vec<ObjectHandle>> {
        self.find_objects(&[Attribute::Class(class), Attribute::Id(id.to_vec())])
    }

    /// The public key of the key pair with CKA_ID `id`, from its public key object
    /// (`None` when the token keeps no public key object with that id).
    pub fn public_key_by_id(&self, id: &[u8]) -> Result<Option<PublicKey>> {
        match self.find_by_id(ObjectClass::PUBLIC_KEY, id)?.first() {
            Some(h) => Ok(Some(self.public_key(*h)?)),
            None => Ok(None),
        }
    }
}

/// What a key object says about itself: enough to tell which key it is and what it may
/// do. Attributes the token does not give (sensitive, unsupported) are `None`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyObject {
    /// The object, valid in the session that found it.
    pub handle: ObjectHandle,
    /// CKA_LABEL (lossy UTF-8).
    pub label: String,
    /// CKA_KEY_TYPE.
    pub key_type: Option<KeyType>,
    /// CKA_MODULUS (RSA private and public keys).
    pub modulus: Option<Vec<u8>>,
    /// CKA_PUBLIC_EXPONENT.
    pub exponent: Option<Vec<u8>>,
    /// CKA_EC_POINT, without its OCTET STRING wrapping (public keys; a few tokens give
    /// it on private keys too).
    pub ec_point: Option<Vec<u8>>,
    /// CKA_SIGN.
    pub sign: Option<bool>,
    /// CKA_DECRYPT.
    pub decrypt: Option<bool>,
    /// CKA_DERIVE.
    pub derive: Option<bool>,
    /// CKA_UNWRAP.
    pub unwrap: Option<bool>,
    /// CKA_MODIFIABLE (PKCS#11 default: true).
    pub modifiable: Option<bool>,
}

/// Whether a key object holds a given public key, as far as its attributes tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyMatch {
    /// Its key material is the key.
    Same,
    /// Another key (other type or other material).
    Different,
    /// Same type, but the token shows no material to compare (an EC private key): only
    /// an operation with the key can tell.
    Unknown,
}

fn strip_zeros(v: &[u8]) -> &[u8] {
    let i = v.iter().position(|b| *b != 0).unwrap_or(v.len());
    &v[i..]
}

impl PublicKey {
    /// The public key of an X.509 certificate (RSA, or EC on P-256).
    pub fn from_certificate(der: &[u8]) -> Result<PublicKey> {
        use x509_parser::asn1_rs::ToDer;
        use x509_parser::prelude::{FromDer, X509Certificate};
        use x509_parser::public_key::PublicKey as X509Key;
        let bad = |what: String| Error::ObjectInvalid { what };
        let (_, cert) = X509Certificate::from_der(der)
            .map_err(|e| bad(format!("certificate is not valid DER: {e}")))?;
        let spki = cert.public_key();
        match spki.parsed() {
            Ok(X509Key::RSA(r)) => Ok(PublicKey::Rsa {
                modulus: strip_zeros(r.modulus).to_vec(),
                exponent: strip_zeros(r.exponent).to_vec(),
            }),
            Ok(X509Key::EC(p)) => {
                let curve = spki
                    .algorithm
                    .parameters
                    .as_ref()
                    .map(|a| a.to_der_vec().unwrap_or_default());
                if curve.as_deref() == Some(crate::gm::SM2_EC_PARAMS) {
                    if p.data().len() != 65 || p.data()[0] != 0x04 {
                        return Err(bad(
                            "SM2 certificate key is not an uncompressed point".into()
                        ));
                    }
                    return Ok(PublicKey::Sm2 {
                        point: p.data().to_vec(),
                    });
                }
                if curve.as_deref() != Some(P256_EC_PARAMS) || p.data().len() != 65 {
                    return Err(bad(
                        "EC certificate key is not an uncompressed P-256 point".into()
                    ));
                }
                Ok(PublicKey::EcP256 {
                    point: p.data().to_vec(),
                })
            }
            _ => Err(bad(format!(
                "unsupported certificate key algorithm {}",
                spki.algorithm.algorithm
            ))),
        }
    }

    /// Compares this key with a key object's material.
    pub fn compare(&self, obj: &KeyObject) -> KeyMatch {
        match self {
            PublicKey::Rsa { modulus, exponent } => {
                if obj.key_type.is_some_and(|t| t != KeyType::RSA) {
                    return KeyMatch::Different;
                }
                match &obj.modulus {
                    Some(n) if strip_zeros(n) != strip_zeros(modulus) => KeyMatch::Different,
                    Some(_) => match &obj.exponent {
                        Some(e) if strip_zeros(e) != strip_zeros(exponent) => KeyMatch::Different,
                        _ => KeyMatch::Same,
                    },
                    None => KeyMatch::Unknown,
                }
            }
            PublicKey::EcP256 { point } | PublicKey::Sm2 { point } => {
                // An SM2 key's type is CKK_EC or a vendor's CKK_SM2.
                let sm2 = matches!(self, PublicKey::Sm2 { .. });
                if obj.key_type.is_some_and(|t| {
                    t != KeyType::EC && !(sm2 && *t >= cryptoki_sys::CKK_VENDOR_DEFINED)
                }) {
                    return KeyMatch::Different;
                }
                match &obj.ec_point {
                    Some(p) if p == point => KeyMatch::Same,
                    Some(_) => KeyMatch::Different,
                    None => KeyMatch::Unknown,
                }
            }
        }
    }
}

impl Session<'_> {
    /// Every private or public key object with CKA_ID `id`, with what it says about
    /// itself. An attribute the token refuses to give is left `None`.
    pub fn key_objects(&self, class: ObjectClass, id: &[u8]) -> Result<Vec<KeyObject>> {
        let mut out = Vec::new();
        for handle in self.find_by_id(class, id)? {
            out.push(self.key_object(handle)?);
        }
        Ok(out)
    }

    /// One key object's [`KeyObject`].
    pub fn key_object(&self, handle: ObjectHandle) -> Result<KeyObject> {
        let attrs = self.attributes(
            handle,
            &[
                AttributeType::Label,
                AttributeType::KeyType,
                AttributeType::Modulus,
                AttributeType::PublicExponent,
                AttributeType::EcPoint,
                AttributeType::Sign,
                AttributeType::Decrypt,
                AttributeType::Derive,
                AttributeType::Unwrap,
                AttributeType::Modifiable,
            ],
        )?;
        let mut k = KeyObject {
            handle,
            label: String::new(),
            key_type: None,
            modulus: None,
            exponent: None,
            ec_point: None,
            sign: None,
            decrypt: None,
            derive: None,
            unwrap: None,
            modifiable: None,
        };
        for a in attrs {
            match a {
                Attribute::Label(v) => k.label = String::from_utf8_lossy(&v).into_owned(),
                Attribute::KeyType(t) => k.key_type = Some(t),
                Attribute::Modulus(v) if !v.is_empty() => k.modulus = Some(v),
                Attribute::PublicExponent(v) if !v.is_empty() => k.exponent = Some(v),
                Attribute::EcPoint(v) if !v.is_empty() => {
                    k.ec_point = Some(der::unwrap_octet_string(&v).unwrap_or(v))
                }
                Attribute::Sign(b) => k.sign = Some(b),
                Attribute::Decrypt(b) => k.decrypt = Some(b),
                Attribute::Derive(b) => k.derive = Some(b),
                Attribute::Unwrap(b) => k.unwrap = Some(b),
                Attribute::Modifiable(b) => k.modifiable = Some(b),
                _ => {}
            }
        }
        Ok(k)
    }

    /// CKA_MODIFIABLE of any object (`None`: the token does not say; PKCS#11's default
    /// is true).
    pub fn modifiable(&self, handle: ObjectHandle) -> Result<Option<bool>> {
        Ok(self
            .attributes(handle, &[AttributeType::Modifiable])?
            .into_iter()
            .find_map(|a| match a {
                Attribute::Modifiable(b) => Some(b),
                _ => None,
            }))
    }
}

/// The error for an SM2 operation on a module without an SM2 mechanism profile.
pub(crate) fn no_sm2_profile(session: &Session<'_>) -> Error {
    Error::ObjectInvalid {
        what: format!(
            "token {} has no SM2 mechanism profile: its module's vendor constants are unknown (add sm2_profile or [modules.sm2] to its [[modules]] entry in config.toml)",
            session.token().name()
        ),
    }
}
