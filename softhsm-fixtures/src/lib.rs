//! Builds SoftHSM2 tokens that look like real UKeys: a private SoftHSM2 installation
//! ([`SoftHsm`]) with a test CA ([`TestCa`]: root + issuing CA, Chinese subjects),
//! and tokens holding key pairs generated on the token with certificates issued for
//! them (signing and encryption, RSA-2048 or EC P-256, any validity, orphan keys and
//! certificates, corrupt certificate objects), all through the real PKCS#11 path.
//!
//! ```no_run
//! use softhsm_fixtures::{SoftHsm, TokenSpec};
//! let hsm = SoftHsm::new()?;
//! let token = hsm.create_token(&TokenSpec::ukey("UKey-1"))?;
//! // hsm.activate() was done by create_token: the code under test may now
//! // C_Initialize SoftHSM2 in this process and will see the token.
//! println!("{} holds {}", token.serial, token.certs[0].serial_hex);
//! # Ok::<(), softhsm_fixtures::FixtureError>(())
//! ```

mod ca;
mod error;
mod hsm;
mod module;
mod spec;
mod token;

pub mod openssl_sm2;

pub use ca::{CA_ORG, ISSUING_CN, IssuedCert, ROOT_CN, SubjectPublicKey, TestCa};
pub use error::FixtureError;
pub use hsm::{SOFTHSM2_CONF, SoftHsm, fixtures_cli};
pub use module::softhsm_module;
pub use spec::{
    CertFixture, CertSpec, CertUsage, DEFAULT_ORG, DEFAULT_SO_PIN, DEFAULT_USER_PIN, KeyAlg,
    TokenFixture, TokenSpec,
};
