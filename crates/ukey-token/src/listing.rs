//! Reading a token's certificates and keys and pairing them by CKA_ID.
//!
//! # Does this certificate have its private key?
//!
//! A UKey's private keys are CKA_PRIVATE: most tokens (SoftHSM2 included) show them
//! only after C_Login, and listing must work without a PIN. What we can see without
//! login are certificates and public key objects. So the answer is graded
//! ([`KeyEvidence`]):
//!
//! * a private key object with the certificate's CKA_ID is visible: **yes**;
//! * only a public key object with that CKA_ID is visible while private objects are
//!   hidden: **yes, inferred**. On a UKey the key pair is generated on the device
//!   (C_GenerateKeyPair creates both objects with one CKA_ID), which is also what
//!   vendor tools and PKCS#11 consumers such as Firefox/NSS rely on when they show a
//!   certificate as usable without logging in;
//! * nothing with that CKA_ID is visible: **no** when private objects were visible
//!   (logged in, or the token shows private keys without login), else **unknown**.
//!
//! [`Module::list_token`] with a PIN logs in and makes every answer definite.
//! A key (private or public) whose CKA_ID matches no certificate is an orphan key.

use cryptoki::object::{Attribute, AttributeType, CertificateType, KeyType, ObjectClass};
use secrecy::SecretString;
use serde::Serialize;
use time::OffsetDateTime;

use crate::certificate::CertificateDetails;
use crate::error::{Error, Result};
use crate::module::{Module, TokenSummary};
use crate::session::Session;

/// How we know whether a certificate's private key is on the token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyEvidence {
    /// A private key object with the certificate's CKA_ID is visible.
    PrivateKey,
    /// Only a public key object with that CKA_ID is visible; private keys are hidden.
    PublicKey,
    /// No key object with that CKA_ID, and private keys were visible: there is none.
    Absent,
    /// No key object with that CKA_ID, and private keys are hidden: cannot tell.
    Unknown,
}

impl KeyEvidence {
    /// `Some(true)`, `Some(false)` or `None` (unknown).
    pub fn has_private_key(self) -> Option<bool> {
        match self {
            KeyEvidence::PrivateKey | KeyEvidence::PublicKey => Some(true),
            KeyEvidence::Absent => Some(false),
            KeyEvidence::Unknown => None,
        }
    }
}

/// A certificate object on a token.
#[derive(Debug, Clone)]
pub struct CertificateEntry {
    /// CKA_ID.
    pub key_id: Vec<u8>,
    /// CKA_LABEL (lossy UTF-8).
    pub label: String,
    /// CKA_VALUE, the DER.
    pub der: Vec<u8>,
    /// The parsed certificate, or [`Error::CertificateMalformed`] for a corrupt object.
    pub details: std::result::Result<CertificateDetails, Error>,
    /// Whether its private key is there.
    pub key: KeyEvidence,
}

impl CertificateEntry {
    /// CKA_ID as lower-case hex.
    pub fn key_id_hex(&self) -> String {
        hex::encode(&self.key_id)
    }

    /// Days until expiry (rounded up), if the certificate parsed.
    pub fn days_left(&self, now: OffsetDateTime) -> Option<i64> {
        self.details.as_ref().ok().map(|d| d.days_left(now))
    }
}

/// A key object on a token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KeyEntry {
    /// `private` or `public`.
    pub class: &'static str,
    /// CKA_ID, hex.
    pub key_id: String,
    /// CKA_LABEL.
    pub label: String,
    /// CKA_KEY_TYPE without `CKK_`: `RSA`, `EC`, ...
    pub key_type: String,
}

/// Everything listed for one token. `errors` holds what could not be read; whatever
/// could be read is still there.
#[derive(Debug)]
pub struct TokenListing {
    /// The token.
    pub token: TokenSummary,
    /// Every certificate object, corrupt ones included.
    pub certificates: Vec<CertificateEntry>,
    /// Key objects whose CKA_ID matches no certificate.
    pub orphan_keys: Vec<KeyEntry>,
    /// Whether private objects were visible (logged in, or shown without login).
    pub private_objects_visible: bool,
    /// Errors met while reading this token.
    pub errors: Vec<Error>,
}

impl Module {
    /// Lists every token with its certificates and keys, without login. A token that
    /// cannot be read (removed meanwhile, device error) still appears, with the error in
    /// its `errors`; the others are listed normally.
    pub fn list(&self) -> Result<Vec<TokenListing>> {
        Ok(self
            .tokens()?
            .into_iter()
            .map(|t| self.list_token(&t, None))
            .collect())
    }

    /// Lists one token. With a PIN, logs in first so private keys are visible and
    /// [`KeyEvidence`] is definite; a login failure (wrong PIN...) is returned as an
    /// error, not retried.
    pub fn list_token(&self, token: &TokenSummary, pin: Option<&SecretString>) -> TokenListing {
        if let Some(skf) = self.skf() {
            return skf.list_token(token, pin);
        }
        let mut listing = TokenListing {
            token: token.clone(),
            certificates: vec![],
            orphan_keys: vec![],
            private_objects_visible: false,
            errors: vec![],
        };
        let session = match self.open_session(token) {
            Ok(s) => s,
            Err(e) => {
                listing.errors.push(e);
                return listing;
            }
        };
        if let Some(pin) = pin {
            if let Err(e) = session.login(pin) {
                listing.errors.push(e);
                return listing;
            }
        }
        if let Err(e) = read_objects(&session, &mut listing) {
            listing.errors.push(e);
        }
        drop(session);
        // SoftHSM2 answers C_FindObjects on a deleted token with "no objects", not an
        // error: only C_GetTokenInfo (CKR_GENERAL_ERROR) tells. So check the token is
        // still there (and still the same one) after reading, and drop what was read
        // if it is not.
        match self.refresh(token) {
            Ok(now) => listing.token = now,
            Err(e) => {
                listing.certificates.clear();
                listing.orphan_keys.clear();
                listing
                    .errors
                    .retain(|e| !matches!(e, Error::TokenRemoved { .. }));
                listing.errors.push(e);
            }
        }
        listing
    }
}

struct RawObject {
    id: Vec<u8>,
    label: String,
    value: Vec<u8>,
    key_type: Option<KeyType>,
    cert_type: Option<CertificateType>,
}

fn read_all(
    session: &Session<'_>,
    class: ObjectClass,
    errors: &mut Vec<Error>,
) -> Result<Vec<RawObject>> {
    let types: &[AttributeType] = if class == ObjectClass::CERTIFICATE {
        &[
            AttributeType::Id,
            AttributeType::Label,
            AttributeType::Value,
            AttributeType::CertificateType,
        ]
    } else {
        &[
            AttributeType::Id,
            AttributeType::Label,
            AttributeType::KeyType,
        ]
    };
    let mut out = vec![];
    for handle in session.find_objects(&[Attribute::Class(class)])? {
        let attrs = match session.attributes(handle, types) {
            Ok(a) => a,
            // One unreadable object must not hide the others, unless the token is gone.
            Err(e @ Error::TokenRemoved { .. }) => return Err(e),
            Err(e) => {
                errors.push(e);
                continue;
            }
        };
        let mut obj = RawObject {
            id: vec![],
            label: String::new(),
            value: vec![],
            key_type: None,
            cert_type: None,
        };
        for a in attrs {
            match a {
                Attribute::Id(v) => obj.id = v,
                // Decoded as token fields are: vendors write GBK labels too.
                Attribute::Label(v) => {
                    obj.label = crate::quirks::text("CKA_LABEL", &v, &mut vec![])
                }
                Attribute::Value(v) => obj.value = v,
                Attribute::KeyType(k) => obj.key_type = Some(k),
                Attribute::CertificateType(c) => obj.cert_type = Some(c),
                _ => {}
            }
        }
        out.push(obj);
    }
    Ok(out)
}

fn key_entry(class: &'static str, o: &RawObject) -> KeyEntry {
    KeyEntry {
        class,
        key_id: hex::encode(&o.id),
        label: o.label.clone(),
        key_type: o
            .key_type
            .map(|k| k.to_string().trim_start_matches("CKK_").to_owned())
            .unwrap_or_default(),
    }
}

fn read_objects(session: &Session<'_>, listing: &mut TokenListing) -> Result<()> {
    let certs = read_all(session, ObjectClass::CERTIFICATE, &mut listing.errors)?;
    let privs = read_all(session, ObjectClass::PRIVATE_KEY, &mut listing.errors)?;
    let pubs = read_all(session, ObjectClass::PUBLIC_KEY, &mut listing.errors)?;
    listing.private_objects_visible = session.is_logged_in() || !privs.is_empty();

    for c in &certs {
        // Only X.509 certificates are parsed; other kinds (WTLS, attribute) are skipped.
        if c.cert_type.is_some_and(|t| t != CertificateType::X_509) {
            continue;
        }
        let details =
            CertificateDetails::from_der(&c.value).map_err(|reason| Error::CertificateMalformed {
                label: c.label.clone(),
                key_id: hex::encode(&c.id),
                reason,
            });
        let has = |set: &[RawObject]| !c.id.is_empty() && set.iter().any(|k| k.id == c.id);
        let key = if has(&privs) {
            KeyEvidence::PrivateKey
        } else if listing.private_objects_visible {
            KeyEvidence::Absent
        } else if has(&pubs) {
            KeyEvidence::PublicKey
        } else {
            KeyEvidence::Unknown
        };
        listing.certificates.push(CertificateEntry {
            key_id: c.id.clone(),
            label: c.label.clone(),
            der: c.value.clone(),
            details,
            key,
        });
    }

    let cert_ids: Vec<&[u8]> = certs.iter().map(|c| c.id.as_slice()).collect();
    let orphan = |k: &&RawObject| !cert_ids.contains(&k.id.as_slice());
    listing
        .orphan_keys
        .extend(privs.iter().filter(orphan).map(|k| key_entry("private", k)));
    // A public key whose private half is listed as orphan already is the same key pair.
    let orphan_priv_ids: Vec<Vec<u8>> = privs.iter().filter(orphan).map(|k| k.id.clone()).collect();
    listing.orphan_keys.extend(
        pubs.iter()
            .filter(orphan)
            .filter(|k| !orphan_priv_ids.contains(&k.id))
            .map(|k| key_entry("public", k)),
    );
    Ok(())
}
