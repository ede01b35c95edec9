//! Object management for the renewal engine: what is on a token (with enough detail
//! to compare before and after), writing a certificate object, changing an object's
//! CKA_ID and CKA_LABEL, destroying objects.

use cryptoki::object::{Attribute, AttributeType, CertificateType, ObjectClass, ObjectHandle};
use serde::Serialize;

use crate::error::{Error, Result};
use crate::session::Session;

/// The class of a token object the engine deals with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum ObjectKind {
    /// CKO_CERTIFICATE.
    Certificate,
    /// CKO_PRIVATE_KEY.
    PrivateKey,
    /// CKO_PUBLIC_KEY.
    PublicKey,
    /// CKO_SECRET_KEY.
    SecretKey,
    /// CKO_DATA.
    Data,
}

impl ObjectKind {
    /// The PKCS#11 class.
    pub fn class(self) -> ObjectClass {
        match self {
            ObjectKind::Certificate => ObjectClass::CERTIFICATE,
            ObjectKind::PrivateKey => ObjectClass::PRIVATE_KEY,
            ObjectKind::PublicKey => ObjectClass::PUBLIC_KEY,
            ObjectKind::SecretKey => ObjectClass::SECRET_KEY,
            ObjectKind::Data => ObjectClass::DATA,
        }
    }

    /// Every kind, in listing order.
    pub const ALL: [ObjectKind; 5] = [
        ObjectKind::Certificate,
        ObjectKind::PrivateKey,
        ObjectKind::PublicKey,
        ObjectKind::SecretKey,
        ObjectKind::Data,
    ];
}

/// One object as the engine sees it. For certificates `value` is the DER; for public
/// keys it is the key (modulus || exponent, or the EC point); for private and secret
/// keys it is empty (they are sensitive), but `public` identifies an RSA private key by
/// its modulus.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, PartialOrd, Ord)]
pub struct ObjectInfo {
    /// Class.
    pub kind: ObjectKind,
    /// CKA_ID, hex.
    pub id_hex: String,
    /// CKA_LABEL (lossy UTF-8, not trimmed).
    pub label: String,
    /// CKA_VALUE of a certificate, hex; the public key material of a public key, hex;
    /// CKA_MODULUS of an RSA private key, hex; else empty.
    pub value_hex: String,
    /// Every other readable attribute that matters for use, rendered as text
    /// (sign/decrypt/unwrap/derive flags, key type, token/private/sensitive).
    pub flags: String,
}

impl ObjectInfo {
    /// CKA_ID bytes.
    pub fn id(&self) -> Vec<u8> {
        hex::decode(&self.id_hex).unwrap_or_default()
    }
}

const FLAG_TYPES: &[AttributeType] = &[
    AttributeType::KeyType,
    AttributeType::Token,
    AttributeType::Private,
    AttributeType::Sensitive,
    AttributeType::Extractable,
    AttributeType::Sign,
    AttributeType::Verify,
    AttributeType::Decrypt,
    AttributeType::Encrypt,
    AttributeType::Unwrap,
    AttributeType::Wrap,
    AttributeType::Derive,
    AttributeType::Subject,
    AttributeType::Issuer,
    AttributeType::SerialNumber,
    AttributeType::CertificateType,
];

impl Session<'_> {
    /// Every object visible in this session, sorted, with its id, label, value and
    /// usage flags: compare two snapshots to see whether a token changed.
    pub fn snapshot(&self) -> Result<Vec<ObjectInfo>> {
        let mut out = Vec::new();
        for kind in ObjectKind::ALL {
            for handle in self.find_objects(&[Attribute::Class(kind.class())])? {
                out.push(self.object_info(kind, handle)?);
            }
        }
        out.sort();
        Ok(out)
    }

    /// One object's [`ObjectInfo`].
    pub fn object_info(&self, kind: ObjectKind, handle: ObjectHandle) -> Result<ObjectInfo> {
        let mut types = vec![AttributeType::Id, AttributeType::Label];
        match kind {
            ObjectKind::Certificate => types.push(AttributeType::Value),
            ObjectKind::PublicKey => types.extend([
                AttributeType::Modulus,
                AttributeType::PublicExponent,
                AttributeType::EcPoint,
            ]),
            ObjectKind::PrivateKey => types.push(AttributeType::Modulus),
            _ => {}
        }
        types.extend_from_slice(FLAG_TYPES);
        let mut info = ObjectInfo {
            kind,
            id_hex: String::new(),
            label: String::new(),
            value_hex: String::new(),
            flags: String::new(),
        };
        let mut flags = Vec::new();
        for a in self.attributes(handle, &types)? {
            match a {
                Attribute::Id(v) => info.id_hex = hex::encode(v),
                Attribute::Label(v) => info.label = String::from_utf8_lossy(&v).into_owned(),
                Attribute::Value(v)
                | Attribute::Modulus(v)
                | Attribute::PublicExponent(v)
                | Attribute::EcPoint(v) => info.value_hex.push_str(&hex::encode(v)),
                other => flags.push(format!("{other:?}")),
            }
        }
        info.flags = flags.join(" ");
        Ok(info)
    }

    /// Every object of `kind` with CKA_ID `id`.
    pub fn find_kind_by_id(&self, kind: ObjectKind, id: &[u8]) -> Result<Vec<ObjectHandle>> {
        self.find_objects(&[Attribute::Class(kind.class()), Attribute::Id(id.to_vec())])
    }

    /// Every certificate object whose CKA_VALUE is exactly `der`.
    pub fn find_certificate_by_value(&self, der: &[u8]) -> Result<Vec<ObjectHandle>> {
        self.find_objects(&[
            Attribute::Class(ObjectClass::CERTIFICATE),
            Attribute::Value(der.to_vec()),
        ])
    }

    /// Writes an X.509 certificate as a public token object with CKA_ID `id` and
    /// CKA_LABEL `label` (plus CKA_SUBJECT, CKA_ISSUER and CKA_SERIAL_NUMBER from the
    /// certificate, which vendor software and NSS look for).
    pub fn write_certificate(&self, der: &[u8], id: &[u8], label: &str) -> Result<ObjectHandle> {
        use x509_parser::prelude::FromDer;
        let (_, cert) = x509_parser::certificate::X509Certificate::from_der(der).map_err(|e| {
            Error::ObjectInvalid {
                what: format!("certificate to write is not valid DER: {e}"),
            }
        })?;
        let serial = crate::der::unsigned_integer(cert.raw_serial());
        let template = vec![
            Attribute::Class(ObjectClass::CERTIFICATE),
            Attribute::CertificateType(CertificateType::X_509),
            Attribute::Token(true),
            Attribute::Private(false),
            Attribute::Id(id.to_vec()),
            Attribute::Label(label.as_bytes().to_vec()),
            Attribute::Subject(cert.subject().as_raw().to_vec()),
            Attribute::Issuer(cert.issuer().as_raw().to_vec()),
            Attribute::SerialNumber(serial),
            Attribute::Value(der.to_vec()),
        ];
        let handle = self
            .cryptoki()
            .create_object(&template)
            .map_err(|e| self.map_error(e))?;
        tracing::debug!(label, "certificate object written");
        Ok(handle)
    }

    /// C_SetAttributeValue of CKA_ID and CKA_LABEL.
    pub fn set_id_and_label(&self, handle: ObjectHandle, id: &[u8], label: &str) -> Result<()> {
        self.cryptoki()
            .update_attributes(
                handle,
                &[
                    Attribute::Id(id.to_vec()),
                    Attribute::Label(label.as_bytes().to_vec()),
                ],
            )
            .map_err(|e| self.map_error(e))
    }

    /// C_DestroyObject.
    pub fn destroy(&self, handle: ObjectHandle) -> Result<()> {
        self.cryptoki()
            .destroy_object(handle)
            .map_err(|e| self.map_error(e))
    }

    /// Writes a CKO_DATA token object with CKA_APPLICATION `application`, CKA_LABEL
    /// `label` and CKA_VALUE `value` (markers the engine leaves on the token, which
    /// travels between users and machines): public, or private where the module keeps
    /// no public data objects.
    pub fn write_data_object(
        &self,
        application: &str,
        label: &str,
        value: &[u8],
    ) -> Result<ObjectHandle> {
        let template = |private: bool| {
            [
                Attribute::Class(ObjectClass::DATA),
                Attribute::Token(true),
                Attribute::Private(private),
                Attribute::Application(application.as_bytes().to_vec()),
                Attribute::Label(label.as_bytes().to_vec()),
                Attribute::Value(value.to_vec()),
            ]
        };
        match self.cryptoki().create_object(&template(false)) {
            Ok(h) => Ok(h),
            // Some modules (tpm2-pkcs11) keep only private objects: then it is seen
            // after login, which is when renewals and their clean-up look for it.
            Err(cryptoki::error::Error::Pkcs11(
                cryptoki::error::RvError::AttributeValueInvalid
                | cryptoki::error::RvError::TemplateInconsistent,
                _,
            )) => {
                tracing::debug!("public data objects refused: writing a private one");
                self.cryptoki()
                    .create_object(&template(true))
                    .map_err(|e| self.map_error(e))
            }
            Err(e) => Err(self.map_error(e)),
        }
    }

    /// Every CKO_DATA object of `application`, with its CKA_LABEL.
    pub fn data_objects(&self, application: &str) -> Result<Vec<(ObjectHandle, String)>> {
        let mut out = Vec::new();
        for h in self.find_objects(&[
            Attribute::Class(ObjectClass::DATA),
            Attribute::Application(application.as_bytes().to_vec()),
        ])? {
            let label = self
                .attributes(h, &[AttributeType::Label])?
                .into_iter()
                .find_map(|a| match a {
                    Attribute::Label(v) => Some(String::from_utf8_lossy(&v).into_owned()),
                    _ => None,
                })
                .unwrap_or_default();
            out.push((h, label));
        }
        Ok(out)
    }

    /// C_GenerateRandom.
    pub fn random(&self, len: usize) -> Result<Vec<u8>> {
        let mut buf = vec![0u8; len];
        self.cryptoki()
            .generate_random_slice(&mut buf)
            .map_err(|e| self.map_error(e))?;
        Ok(buf)
    }
}
