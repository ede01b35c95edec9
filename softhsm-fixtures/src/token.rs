//! Building one token through the real PKCS#11 path: C_InitToken on SoftHSM2's free
//! slot, C_InitPIN, C_GenerateKeyPair on the token, and the certificate issued for the
//! public key read back from it.

use std::path::Path;

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, CertificateType, KeyType, ObjectClass};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::FixtureError;
use crate::ca::{SubjectPublicKey, TestCa, serial_number_der};
use crate::spec::{CertFixture, CertSpec, KeyAlg, TokenFixture, TokenSpec};

/// DER of the OID prime256v1 (1.2.840.10045.3.1.7), the CKA_EC_PARAMS of P-256 keys.
const P256_EC_PARAMS: &[u8] = &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];

/// Checks a spec before anything touches the token.
pub(crate) fn validate(spec: &TokenSpec) -> Result<(), FixtureError> {
    let bad = |msg: String| Err(FixtureError::InvalidSpec(msg));
    if spec.label.trim().is_empty() || spec.label.len() > 32 {
        return bad(format!(
            "token label {:?} must be 1 to 32 bytes of UTF-8 (PKCS#11 CK_TOKEN_INFO.label)",
            spec.label
        ));
    }
    for (what, pin) in [("user PIN", &spec.user_pin), ("SO PIN", &spec.so_pin)] {
        if !(4..=255).contains(&pin.len()) {
            return bad(format!(
                "the {what} must be 4 to 255 bytes long (SoftHSM2's limits)"
            ));
        }
    }
    for (i, cert) in spec.certs.iter().enumerate() {
        if cert.key_id.is_empty() {
            return bad(format!(
                "certificate {i} ({}) has an empty key_id",
                cert.label
            ));
        }
        if cert.subject_cn.trim().is_empty() {
            return bad(format!(
                "certificate {i} ({}) has an empty subject CN",
                cert.label
            ));
        }
        if !cert.with_cert && !cert.with_key {
            return bad(format!(
                "certificate {i} ({}) has neither certificate nor key: nothing to write",
                cert.label
            ));
        }
        if spec.certs[..i]
            .iter()
            .any(|other| other.key_id == cert.key_id)
        {
            return bad(format!(
                "key_id {} is used twice on one token",
                hex::encode(&cert.key_id)
            ));
        }
        if !(-36_500..=36_500).contains(&cert.days_left) {
            return bad(format!("days_left {} is out of range", cert.days_left));
        }
    }
    Ok(())
}

/// Why `create` failed, and the serial of the token it had initialised by then (the
/// caller deletes it, so no half-built token is left behind).
#[derive(Debug)]
pub(crate) struct CreateFailed {
    pub(crate) error: FixtureError,
    pub(crate) half_built: Option<String>,
}

impl From<FixtureError> for CreateFailed {
    fn from(error: FixtureError) -> Self {
        CreateFailed {
            error,
            half_built: None,
        }
    }
}

/// Initialises the module, builds the token, and always finalizes what it initialised.
pub(crate) fn create(
    module: &Path,
    conf: &Path,
    ca: &TestCa,
    spec: &TokenSpec,
) -> Result<TokenFixture, CreateFailed> {
    let pkcs11 = Pkcs11::new(module).map_err(FixtureError::pkcs11(format!(
        "loading the SoftHSM2 module {}",
        module.display()
    )))?;
    match pkcs11.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) => {}
        Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {
            return Err(FixtureError::ModuleInUse.into());
        }
        Err(e) => return Err(FixtureError::pkcs11("initialising the SoftHSM2 module")(e).into()),
    }
    let mut half_built = None;
    let built = build(&pkcs11, conf, ca, spec, &mut half_built);
    let finalized = pkcs11
        .finalize()
        .map_err(FixtureError::pkcs11("finalizing the SoftHSM2 module"));
    match (built, finalized) {
        (Ok(fixture), Ok(())) => Ok(fixture),
        (Err(error), _) | (Ok(_), Err(error)) => Err(CreateFailed { error, half_built }),
    }
}

fn build(
    pkcs11: &Pkcs11,
    conf: &Path,
    ca: &TestCa,
    spec: &TokenSpec,
    half_built: &mut Option<String>,
) -> Result<TokenFixture, FixtureError> {
    let slot = free_slot(pkcs11, conf)?;
    let so_pin = AuthPin::from(spec.so_pin.clone());
    let user_pin = AuthPin::from(spec.user_pin.clone());
    pkcs11
        .init_token(slot, &so_pin, &spec.label)
        .map_err(FixtureError::pkcs11("initialising the token (C_InitToken)"))?;
    let serial = pkcs11
        .get_token_info(slot)
        .map_err(FixtureError::pkcs11("reading the new token's info"))?
        .serial_number()
        .trim()
        .to_owned();
    *half_built = Some(serial.clone());

    let session = pkcs11
        .open_rw_session(slot)
        .map_err(FixtureError::pkcs11("opening a session on the new token"))?;
    session
        .login(UserType::So, Some(&so_pin))
        .map_err(FixtureError::pkcs11("logging in as security officer"))?;
    session
        .init_pin(&user_pin)
        .map_err(FixtureError::pkcs11("setting the user PIN (C_InitPIN)"))?;
    session
        .logout()
        .map_err(FixtureError::pkcs11("logging out the security officer"))?;
    session
        .login(UserType::User, Some(&user_pin))
        .map_err(FixtureError::pkcs11("logging in as user"))?;

    let mut certs = Vec::with_capacity(spec.certs.len());
    for cert_spec in &spec.certs {
        certs.push(write_cert(&session, ca, cert_spec)?);
    }
    session
        .logout()
        .map_err(FixtureError::pkcs11("logging out the user"))?;
    drop(session);

    let info = pkcs11
        .get_token_info(slot)
        .map_err(FixtureError::pkcs11("reading the new token's info"))?;
    Ok(TokenFixture {
        serial,
        label: info.label().trim().to_owned(),
        user_pin: spec.user_pin.clone(),
        so_pin: spec.so_pin.clone(),
        certs,
    })
}

/// SoftHSM2 always offers one slot holding an uninitialised token.
fn free_slot(pkcs11: &Pkcs11, conf: &Path) -> Result<Slot, FixtureError> {
    let slots = pkcs11
        .get_slots_with_token()
        .map_err(FixtureError::pkcs11("listing slots"))?;
    for slot in slots {
        let info = pkcs11
            .get_token_info(slot)
            .map_err(FixtureError::pkcs11("reading token info"))?;
        if !info.token_initialized() {
            return Ok(slot);
        }
    }
    Err(FixtureError::NoFreeSlot {
        conf: conf.to_owned(),
    })
}

/// Generates the key pair on the token, certifies it, writes the certificate object.
fn write_cert(
    session: &Session,
    ca: &TestCa,
    spec: &CertSpec,
) -> Result<CertFixture, FixtureError> {
    let label = spec.label.as_bytes().to_vec();
    let common = |private: bool| {
        vec![
            Attribute::Token(true),
            Attribute::Private(private),
            Attribute::Id(spec.key_id.clone()),
            Attribute::Label(label.clone()),
        ]
    };
    let mut public_template = common(false);
    let mut private_template = common(true);
    private_template.extend([
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Sign(true),
    ]);
    public_template.push(Attribute::Verify(true));
    let mechanism = match spec.alg {
        KeyAlg::Rsa2048 => {
            public_template.extend([
                Attribute::ModulusBits(2048.into()),
                Attribute::PublicExponent(vec![0x01, 0x00, 0x01]),
                Attribute::Encrypt(true),
                Attribute::Wrap(true),
            ]);
            private_template.extend([
                Attribute::Decrypt(true),
                Attribute::Unwrap(true),
                Attribute::Derive(false),
            ]);
            Mechanism::RsaPkcsKeyPairGen
        }
        KeyAlg::EcP256 => {
            // SoftHSM2 would default encrypt/decrypt/wrap/unwrap to true; an EC key on a
            // real UKey signs and derives only.
            public_template.extend([
                Attribute::EcParams(P256_EC_PARAMS.to_vec()),
                Attribute::Encrypt(false),
                Attribute::Wrap(false),
            ]);
            private_template.extend([
                Attribute::Derive(true),
                Attribute::Decrypt(false),
                Attribute::Unwrap(false),
            ]);
            Mechanism::EccKeyPairGen
        }
    };
    let (public, private) = session
        .generate_key_pair(&mechanism, &public_template, &private_template)
        .map_err(FixtureError::pkcs11(format!(
            "generating the {} key pair {:?} on the token",
            spec.alg, spec.label
        )))?;

    let public_key = read_public_key(session, public, spec.alg)?;
    let issued = ca.issue(&public_key, spec)?;

    let mut value_on_token = Vec::new();
    if spec.with_cert {
        value_on_token = if spec.corrupt_cert {
            corrupt(&issued.der)
        } else {
            issued.der.clone()
        };
        let (subject, issuer, serial) = name_attributes(&issued.der)?;
        session
            .create_object(&[
                Attribute::Class(ObjectClass::CERTIFICATE),
                Attribute::CertificateType(CertificateType::X_509),
                Attribute::Token(true),
                Attribute::Private(false),
                Attribute::Id(spec.key_id.clone()),
                Attribute::Label(label.clone()),
                Attribute::Subject(subject),
                Attribute::Issuer(issuer),
                Attribute::SerialNumber(serial),
                Attribute::Value(value_on_token.clone()),
            ])
            .map_err(FixtureError::pkcs11(format!(
                "writing the certificate object {:?}",
                spec.label
            )))?;
    }
    if !spec.with_key {
        for handle in [private, public] {
            session
                .destroy_object(handle)
                .map_err(FixtureError::pkcs11(format!(
                    "removing the key pair {:?} (orphan certificate)",
                    spec.label
                )))?;
        }
    }
    Ok(CertFixture {
        serial_hex: issued.serial_hex,
        der: issued.der,
        key_id: spec.key_id.clone(),
        label: spec.label.clone(),
        subject_cn: spec.subject_cn.clone(),
        alg: spec.alg,
        usage: spec.usage,
        not_before: issued.not_before,
        not_after: issued.not_after,
        has_cert_object: spec.with_cert,
        has_private_key: spec.with_key,
        value_on_token,
    })
}

/// Reads a public key object back: RSA modulus and exponent, or the EC point.
fn read_public_key(
    session: &Session,
    handle: cryptoki::object::ObjectHandle,
    alg: KeyAlg,
) -> Result<SubjectPublicKey, FixtureError> {
    let wanted: &[AttributeType] = match alg {
        KeyAlg::Rsa2048 => &[
            AttributeType::KeyType,
            AttributeType::Modulus,
            AttributeType::PublicExponent,
        ],
        KeyAlg::EcP256 => &[AttributeType::KeyType, AttributeType::EcPoint],
    };
    let attributes = session
        .get_attributes(handle, wanted)
        .map_err(FixtureError::pkcs11(
            "reading the public key back from the token",
        ))?;
    let (mut key_type, mut modulus, mut exponent, mut point) = (None, None, None, None);
    for attribute in attributes {
        match attribute {
            Attribute::KeyType(t) => key_type = Some(t),
            Attribute::Modulus(m) => modulus = Some(m),
            Attribute::PublicExponent(e) => exponent = Some(e),
            Attribute::EcPoint(p) => point = Some(p),
            _ => {}
        }
    }
    let missing = |what: &str| FixtureError::PublicKey(format!("the token returned no {what}"));
    match alg {
        KeyAlg::Rsa2048 => {
            if key_type != Some(KeyType::RSA) {
                return Err(FixtureError::PublicKey(format!(
                    "key type {key_type:?}, expected RSA"
                )));
            }
            SubjectPublicKey::from_rsa(
                &modulus.ok_or_else(|| missing("CKA_MODULUS"))?,
                &exponent.ok_or_else(|| missing("CKA_PUBLIC_EXPONENT"))?,
            )
        }
        KeyAlg::EcP256 => {
            if key_type != Some(KeyType::EC) {
                return Err(FixtureError::PublicKey(format!(
                    "key type {key_type:?}, expected EC"
                )));
            }
            SubjectPublicKey::from_ec_point(&point.ok_or_else(|| missing("CKA_EC_POINT"))?)
        }
    }
}

/// CKA_SUBJECT, CKA_ISSUER (DER names) and CKA_SERIAL_NUMBER (DER INTEGER), in order.
type NameAttributes = (Vec<u8>, Vec<u8>, Vec<u8>);

fn name_attributes(der: &[u8]) -> Result<NameAttributes, FixtureError> {
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| {
        FixtureError::PublicKey(format!("the issued certificate does not parse: {e}"))
    })?;
    let tbs = &cert.tbs_certificate;
    Ok((
        tbs.subject.as_raw().to_vec(),
        tbs.issuer.as_raw().to_vec(),
        serial_number_der(tbs.raw_serial())?,
    ))
}

/// Bytes that look like the start of a certificate but are not DER: the outer
/// SEQUENCE claims more content than follows, and the content is cut short.
fn corrupt(der: &[u8]) -> Vec<u8> {
    let mut bytes = der[..der.len().min(48)].to_vec();
    bytes.extend_from_slice(b"\xde\xad\xbe\xef not a certificate");
    bytes
}
