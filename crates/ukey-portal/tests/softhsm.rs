//! The escrow envelope made by the portal, opened by `C_UnwrapKey` on a SoftHSM2 token
//! (a private SOFTHSM2_CONF per test process), into a private key that decrypts what
//! was encrypted to the issued encryption certificate. The CSR and the challenge answer
//! are signed on the token too, as the renewal engine will do.

mod common;

use std::sync::Arc;

use aws_lc_rs::rsa::{OAEP_SHA1_MGF1SHA1, OaepPublicEncryptingKey, PublicEncryptingKey};
use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::mechanism::elliptic_curve::{EcKdf, Ecdh1DeriveParams};
use cryptoki::mechanism::rsa::{PkcsMgfType, PkcsOaepParams, PkcsOaepSource};
use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::types::AuthPin;
use softhsm_fixtures::{CertSpec, KeyAlg, SoftHsm, TokenFixture, TokenSpec, softhsm_module};
use ukey_portal::{Portal, PortalConfig};
use ukey_portal_api::{
    CreateOrderRequest, InitialState, IssueRequest, IssueResponse, KeyAlgorithm, KeyPolicy,
    KeyTransport, SignatureAlgorithm, challenge_signed_data, paths,
};

/// A key on the token, usable by rcgen to sign a CSR.
struct TokenKey<'a> {
    session: &'a Session,
    key: ObjectHandle,
    /// rcgen's raw public key form: PKCS#1 for RSA, the SEC1 point for EC.
    public: Vec<u8>,
    ec: bool,
}

impl TokenKey<'_> {
    fn sign_bytes(&self, data: &[u8]) -> Vec<u8> {
        if self.ec {
            // No CKM_ECDSA_SHA256 in SoftHSM 2.6.1: hash here, sign with CKM_ECDSA,
            // and DER-encode r || s.
            let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, data);
            let rs = self
                .session
                .sign(&Mechanism::Ecdsa, self.key, digest.as_ref())
                .unwrap();
            der_ecdsa(&rs)
        } else {
            self.session
                .sign(&Mechanism::Sha256RsaPkcs, self.key, data)
                .unwrap()
        }
    }
}

impl rcgen::PublicKeyData for TokenKey<'_> {
    fn der_bytes(&self) -> &[u8] {
        &self.public
    }
    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        if self.ec {
            &rcgen::PKCS_ECDSA_P256_SHA256
        } else {
            &rcgen::PKCS_RSA_SHA256
        }
    }
}

impl rcgen::SigningKey for TokenKey<'_> {
    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
        Ok(self.sign_bytes(msg))
    }
}

fn der_int(v: &[u8]) -> Vec<u8> {
    let mut v: Vec<u8> = v.iter().copied().skip_while(|b| *b == 0).collect();
    if v.is_empty() || v[0] & 0x80 != 0 {
        v.insert(0, 0);
    }
    let mut out = vec![0x02, v.len() as u8];
    out.extend(v);
    out
}

fn der_ecdsa(rs: &[u8]) -> Vec<u8> {
    let (r, s) = rs.split_at(rs.len() / 2);
    let body: Vec<u8> = [der_int(r), der_int(s)].concat();
    let mut out = vec![0x30, body.len() as u8];
    out.extend(body);
    out
}

struct Setup {
    _hsm: SoftHsm,
    _dir: tempfile::TempDir,
    token: TokenFixture,
    server: ukey_portal::RunningServer,
    pkcs11: Pkcs11,
}

async fn setup(spec: TokenSpec, alg: KeyAlgorithm) -> (Setup, String) {
    let hsm = SoftHsm::new().unwrap();
    let token = hsm.create_token(&spec).unwrap();
    let ca = hsm.ca().unwrap();
    // The portal is the CA that issued the token's certificate.
    let dir = tempfile::tempdir().unwrap();
    let mut config = PortalConfig::new(dir.path().join("data"));
    config.ca_import = Some((ca.issuing_cert_path.clone(), ca.issuing_key_path.clone()));
    let portal = Arc::new(Portal::open(&config).unwrap());
    let order = portal
        .create_order(&CreateOrderRequest {
            serial_hex: token.certs[0].serial_hex.clone(),
            issuer_der: None,
            issuer_dn: None,
            years: 1,
            state: InitialState::Ready,
            key_policy: KeyPolicy::Same,
            with_encryption_cert: true,
            target_algorithm: alg,
            old_encryption_serial_hex: None,
        })
        .unwrap();
    let server = ukey_portal::start(portal, "127.0.0.1:0".parse().unwrap(), None, None)
        .await
        .unwrap();
    let pkcs11 = Pkcs11::new(softhsm_module().unwrap()).unwrap();
    pkcs11
        .initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
        .unwrap();
    (
        Setup {
            _hsm: hsm,
            _dir: dir,
            token,
            server,
            pkcs11,
        },
        order.order_id,
    )
}

fn login(s: &Setup) -> Session {
    let slot = s
        .pkcs11
        .get_slots_with_token()
        .unwrap()
        .into_iter()
        .find(|slot| {
            s.pkcs11
                .get_token_info(*slot)
                .unwrap()
                .serial_number()
                .trim()
                == s.token.serial
        })
        .expect("the fixture token");
    let session = s.pkcs11.open_rw_session(slot).unwrap();
    session
        .login(
            UserType::User,
            Some(&AuthPin::from(s.token.user_pin.clone())),
        )
        .unwrap();
    session
}

fn private_key(session: &Session, id: &[u8]) -> ObjectHandle {
    let found = session
        .find_objects(&[
            Attribute::Class(ObjectClass::PRIVATE_KEY),
            Attribute::Id(id.to_vec()),
        ])
        .unwrap();
    assert_eq!(found.len(), 1);
    found[0]
}

/// A transport key in the session, as the renewal engine makes one: its private half
/// only unwraps (RSA) or derives (EC). Returns it and its SubjectPublicKeyInfo DER.
fn transport_key(session: &Session, ec: bool) -> (ObjectHandle, Vec<u8>) {
    let (mechanism, mut public, mut private) = if ec {
        (
            Mechanism::EccKeyPairGen,
            vec![Attribute::EcParams(vec![
                0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07,
            ])],
            vec![Attribute::Derive(true)],
        )
    } else {
        (
            Mechanism::RsaPkcsKeyPairGen,
            vec![
                Attribute::ModulusBits(2048.into()),
                Attribute::PublicExponent(vec![1, 0, 1]),
                Attribute::Wrap(true),
            ],
            vec![Attribute::Unwrap(true), Attribute::Decrypt(false)],
        )
    };
    public.push(Attribute::Token(false));
    private.extend([
        Attribute::Token(false),
        Attribute::Sign(false),
        Attribute::Sensitive(true),
    ]);
    let (pub_h, priv_h) = session
        .generate_key_pair(&mechanism, &public, &private)
        .unwrap();
    let key = if ec {
        let attrs = session
            .get_attributes(pub_h, &[AttributeType::EcPoint])
            .unwrap();
        let Some(Attribute::EcPoint(p)) = attrs.into_iter().next() else {
            panic!("no CKA_EC_POINT")
        };
        // SoftHSM2 wraps the point in an OCTET STRING (04 41 …).
        ukey_token::PublicKey::EcP256 {
            point: p[p.len() - 65..].to_vec(),
        }
    } else {
        let attrs = session
            .get_attributes(
                pub_h,
                &[AttributeType::Modulus, AttributeType::PublicExponent],
            )
            .unwrap();
        let (mut modulus, mut exponent) = (vec![], vec![]);
        for a in attrs {
            match a {
                Attribute::Modulus(m) => modulus = m,
                Attribute::PublicExponent(e) => exponent = e,
                _ => {}
            }
        }
        ukey_token::PublicKey::Rsa { modulus, exponent }
    };
    (priv_h, key.spki())
}

/// Challenge → issue, with the CSR and the challenge answer signed on the token by the
/// existing key (order policy `same`); the envelope is addressed to `transport_spki`.
async fn issue_on_token(
    s: &Setup,
    order_id: &str,
    key: &TokenKey<'_>,
    transport_spki: &[u8],
) -> IssueResponse {
    let http = reqwest::Client::new();
    let ch: ukey_portal_api::ChallengeResponse = http
        .post(format!("{}{}", s.server.url, paths::challenge(order_id)))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let (_, old) = x509_parser::parse_x509_certificate(&s.token.certs[0].der).unwrap();
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = ukey_portal::ca::dn_from_name(old.subject()).unwrap();
    let csr_der = params.serialize_request(key).unwrap().der().to_vec();
    let req = IssueRequest {
        challenge_signature: key.sign_bytes(&challenge_signed_data(
            order_id,
            &ch.nonce,
            &csr_der,
            Some(transport_spki),
        )),
        challenge_id: ch.challenge_id,
        signature_algorithm: if key.ec {
            SignatureAlgorithm::EcdsaP256Sha256
        } else {
            SignatureAlgorithm::RsaPkcs1Sha256
        },
        old_certificate_der: s.token.certs[0].der.clone(),
        csr_der,
        transport_key_spki: Some(transport_spki.to_vec()),
        renewal_code: None,
    };
    let r = http
        .post(format!("{}{}", s.server.url, paths::issue(order_id)))
        .json(&req)
        .send()
        .await
        .unwrap();
    let status = r.status();
    let text = r.text().await.unwrap();
    assert!(status.is_success(), "{status} {text}");
    serde_json::from_str(&text).unwrap()
}

fn aes_template() -> Vec<Attribute> {
    vec![
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::AES),
        Attribute::Token(false),
        Attribute::Unwrap(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
    ]
}

fn assert_not_extractable(session: &Session, key: ObjectHandle) {
    let attrs = session
        .get_attributes(key, &[AttributeType::Sensitive, AttributeType::Extractable])
        .unwrap();
    assert!(attrs.contains(&Attribute::Sensitive(true)), "{attrs:?}");
    assert!(attrs.contains(&Attribute::Extractable(false)), "{attrs:?}");
}

#[tokio::test]
async fn rsa_envelope_unwraps_on_softhsm_into_a_key_that_decrypts() {
    let (s, order_id) = setup(TokenSpec::ukey("T"), KeyAlgorithm::Rsa2048).await;
    let session = login(&s);
    let cert = &s.token.certs[0];
    let (_, old) = x509_parser::parse_x509_certificate(&cert.der).unwrap();
    let key = TokenKey {
        session: &session,
        key: private_key(&session, &cert.key_id),
        public: old.public_key().subject_public_key.as_ref().to_vec(),
        ec: false,
    };
    let (transport, transport_spki) = transport_key(&session, false);
    let issued = issue_on_token(&s, &order_id, &key, &transport_spki).await;
    let enc = issued.encryption.expect("an encryption certificate");
    let KeyTransport::RsaOaepSha1 { wrapped_key } = &enc.envelope.as_ref().unwrap().key_transport
    else {
        panic!(
            "RSA recipient expects RSA-OAEP: {:?}",
            enc.envelope.as_ref().unwrap().key_transport
        )
    };

    // 1. the AES key, unwrapped with the transport key (RSA-OAEP SHA-1)
    let oaep = PkcsOaepParams::new(
        MechanismType::SHA1,
        PkcsMgfType::MGF1_SHA1,
        PkcsOaepSource::empty(),
    );
    let aes = session
        .unwrap_key(
            &Mechanism::RsaPkcsOaep(oaep),
            transport,
            wrapped_key,
            &aes_template(),
        )
        .unwrap();
    // 2. the escrowed private key, unwrapped onto the token (RFC 5649)
    let enc_key = session
        .unwrap_key(
            &Mechanism::AesKeyWrapPad,
            aes,
            &enc.envelope.as_ref().unwrap().wrapped_private_key,
            &[
                Attribute::Class(ObjectClass::PRIVATE_KEY),
                Attribute::KeyType(KeyType::RSA),
                Attribute::Token(true),
                Attribute::Private(true),
                Attribute::Sensitive(true),
                Attribute::Extractable(false),
                Attribute::Decrypt(true),
                Attribute::Unwrap(true),
                Attribute::Id(vec![0xE1]),
                Attribute::Label("encryption".into()),
            ],
        )
        .unwrap();
    assert_not_extractable(&session, enc_key);

    // 3. what a bidder encrypts to the encryption certificate, the token decrypts
    let (_, enc_cert) = x509_parser::parse_x509_certificate(&enc.certificate_der).unwrap();
    let public = OaepPublicEncryptingKey::new(
        PublicEncryptingKey::from_der(enc_cert.public_key().raw).unwrap(),
    )
    .unwrap();
    let secret = "投标文件密钥 / bid file key".as_bytes();
    let mut ct = vec![0u8; public.ciphertext_size()];
    let ct = public
        .encrypt(&OAEP_SHA1_MGF1SHA1, secret, &mut ct, None)
        .unwrap()
        .to_vec();
    let oaep = PkcsOaepParams::new(
        MechanismType::SHA1,
        PkcsMgfType::MGF1_SHA1,
        PkcsOaepSource::empty(),
    );
    let plain = session
        .decrypt(&Mechanism::RsaPkcsOaep(oaep), enc_key, &ct)
        .unwrap();
    assert_eq!(plain, secret);

    // and a tampered envelope is refused by the token
    let mut bad = enc.envelope.as_ref().unwrap().wrapped_private_key.clone();
    bad[10] ^= 1;
    let oaep = PkcsOaepParams::new(
        MechanismType::SHA1,
        PkcsMgfType::MGF1_SHA1,
        PkcsOaepSource::empty(),
    );
    let aes = session
        .unwrap_key(
            &Mechanism::RsaPkcsOaep(oaep),
            transport,
            wrapped_key,
            &aes_template(),
        )
        .unwrap();
    let tmpl = [
        Attribute::Class(ObjectClass::PRIVATE_KEY),
        Attribute::KeyType(KeyType::RSA),
        Attribute::Token(false),
        Attribute::Decrypt(true),
    ];
    assert!(
        session
            .unwrap_key(&Mechanism::AesKeyWrapPad, aes, &bad, &tmpl)
            .is_err()
    );
}

#[tokio::test]
async fn ec_envelope_derives_and_unwraps_on_softhsm() {
    let spec = TokenSpec {
        certs: vec![CertSpec::signing(KeyAlg::EcP256, common::CN, 10)],
        ..TokenSpec::ukey("T")
    };
    let (s, order_id) = setup(spec, KeyAlgorithm::EcP256).await;
    let session = login(&s);
    let cert = &s.token.certs[0];
    let (_, old) = x509_parser::parse_x509_certificate(&cert.der).unwrap();
    let key = TokenKey {
        session: &session,
        key: private_key(&session, &cert.key_id),
        public: old.public_key().subject_public_key.as_ref().to_vec(),
        ec: true,
    };
    let (transport, transport_spki) = transport_key(&session, true);
    let issued = issue_on_token(&s, &order_id, &key, &transport_spki).await;
    let enc = issued.encryption.expect("an encryption certificate");
    let KeyTransport::EcdhP256 {
        ephemeral_public_key,
    } = &enc.envelope.as_ref().unwrap().key_transport
    else {
        panic!(
            "EC recipient expects ECDH: {:?}",
            enc.envelope.as_ref().unwrap().key_transport
        )
    };

    let mut aes_tmpl = aes_template();
    aes_tmpl.push(Attribute::ValueLen(32.into()));
    let params = Ecdh1DeriveParams::new(EcKdf::null(), ephemeral_public_key);
    let aes = session
        .derive_key(&Mechanism::Ecdh1Derive(params), transport, &aes_tmpl)
        .unwrap();
    let enc_key = session
        .unwrap_key(
            &Mechanism::AesKeyWrapPad,
            aes,
            &enc.envelope.as_ref().unwrap().wrapped_private_key,
            &[
                Attribute::Class(ObjectClass::PRIVATE_KEY),
                Attribute::KeyType(KeyType::EC),
                Attribute::Token(true),
                Attribute::Private(true),
                Attribute::Sensitive(true),
                Attribute::Extractable(false),
                Attribute::Derive(true),
                Attribute::Id(vec![0xE2]),
            ],
        )
        .unwrap();
    assert_not_extractable(&session, enc_key);

    // "decrypt" for EC = key agreement: a sender's ephemeral ECDH with the encryption
    // certificate's key gives the same secret the token derives with the unwrapped key
    let (_, enc_cert) = x509_parser::parse_x509_certificate(&enc.certificate_der).unwrap();
    let sender =
        aws_lc_rs::agreement::PrivateKey::generate(&aws_lc_rs::agreement::ECDH_P256).unwrap();
    let sender_pub = sender.compute_public_key().unwrap().as_ref().to_vec();
    let peer = aws_lc_rs::agreement::UnparsedPublicKey::new(
        &aws_lc_rs::agreement::ECDH_P256,
        enc_cert.public_key().subject_public_key.as_ref(),
    );
    let z = aws_lc_rs::agreement::agree(&sender, peer, (), |z| Ok(z.to_vec())).unwrap();
    let params = Ecdh1DeriveParams::new(EcKdf::null(), &sender_pub);
    let shared = session
        .derive_key(
            &Mechanism::Ecdh1Derive(params),
            enc_key,
            &[
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::KeyType(KeyType::GENERIC_SECRET),
                Attribute::ValueLen(32.into()),
                Attribute::Token(false),
                Attribute::Sensitive(false),
                Attribute::Extractable(true),
            ],
        )
        .unwrap();
    let value = session
        .get_attributes(shared, &[AttributeType::Value])
        .unwrap();
    assert_eq!(value, vec![Attribute::Value(z)]);
}
