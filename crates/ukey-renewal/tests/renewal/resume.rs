//! Interruptions without a crash: the network goes down or the portal answers 5xx at
//! a step; the journal is kept, the old certificate still works, and the next run
//! resumes and finishes. Pending objects nobody owns are cleaned up.

use std::cell::Cell;

use secrecy::SecretString;
use softhsm_fixtures::{KeyAlg as FxAlg, TokenSpec};
use ukey_portal_api::{
    ChallengeResponse, ErrorCode, InstalledRequest, InstalledResponse, IssueRequest, IssueResponse,
    KeyAlgorithm, KeyPolicy, RenewalStatus, StatusRequest,
};
use ukey_portal_client::{Answer, ClientError};
use ukey_renewal::{Event, Outcome, PortalApi, Step, preflight, renew};

use super::common::*;

/// The real client, except that one call fails once the way a network or a portal
/// does.
struct Flaky<'a> {
    inner: &'a dyn PortalApi,
    fail_at: &'static str,
    failed: Cell<bool>,
}

impl Flaky<'_> {
    fn maybe(&self, call: &str) -> Result<(), ClientError> {
        if call == self.fail_at && !self.failed.get() {
            self.failed.set(true);
            return Err(if call == "issue" {
                ClientError::Api {
                    status: 503,
                    code: ErrorCode::Internal,
                    message: "maintenance".into(),
                }
            } else {
                ClientError::Unreachable {
                    url: "http://portal".into(),
                    reason: "network is down".into(),
                }
            });
        }
        Ok(())
    }
}

impl PortalApi for Flaky<'_> {
    fn status(&self, req: &StatusRequest) -> Result<Answer<RenewalStatus>, ClientError> {
        self.maybe("status")?;
        self.inner.status(req)
    }
    fn challenge(&self, order_id: &str) -> Result<Answer<ChallengeResponse>, ClientError> {
        self.maybe("challenge")?;
        self.inner.challenge(order_id)
    }
    fn issue(
        &self,
        order_id: &str,
        req: &IssueRequest,
    ) -> Result<Answer<IssueResponse>, ClientError> {
        self.maybe("issue")?;
        self.inner.issue(order_id, req)
    }
    fn installed(
        &self,
        order_id: &str,
        req: &InstalledRequest,
    ) -> Result<Answer<InstalledResponse>, ClientError> {
        self.maybe("installed")?;
        self.inner.installed(order_id, req)
    }
    fn cmp(&self, message: &[u8]) -> Result<Answer<Vec<u8>>, ClientError> {
        self.maybe("cmp")?;
        self.inner.cmp(message)
    }
}

fn interrupted_then_resumed(fail_at: &'static str, stopped_at: Step) {
    let env = Env::new(&[TokenSpec::dual("Flaky", FxAlg::Rsa2048)]);
    let fx = &env.tokens[0];
    env.order(
        &fx.certs[0],
        KeyPolicy::New,
        KeyAlgorithm::Rsa2048,
        fx.certs.get(1),
        true,
    );
    let module = env.module();
    let token = summary(&module, &fx.serial);
    let real = env.client();
    let flaky = Flaky {
        inner: &real,
        fail_at,
        failed: Cell::new(false),
    };
    let mut opts = env.options();
    if fail_at == "issue" {
        // Records between checkpoints are written atomically without fsync: a killed
        // process (or this interruption) still finds them.
        opts.journal_sync = ukey_renewal::JournalSync::Checkpoints;
    }
    let pin = SecretString::from(fx.user_pin.clone());
    let plan = preflight(&module, &token, None, &flaky, &opts).unwrap();
    let err = renew(&module, plan, &pin, &flaky, &opts, &mut |_| {}).unwrap_err();
    assert!(err.is_resumable(), "{fail_at}: {err}");
    let j = opts
        .journals
        .load(&fx.serial, &fx.certs[0].serial_hex)
        .unwrap()
        .unwrap();
    assert_eq!(j.outcome, Outcome::Unfinished);
    assert_eq!(j.step, stopped_at, "{fail_at}");

    let plan = preflight(&module, &token, None, &real, &opts).unwrap();
    assert!(plan.resuming);
    let mut events = Vec::new();
    let report = renew(&module, plan, &pin, &real, &opts, &mut |e| events.push(e)).unwrap();
    assert!(report.resumed);
    assert!(events.iter().any(|e| matches!(e, Event::Resuming { .. })));
    let j = opts
        .journals
        .load(&fx.serial, &fx.certs[0].serial_hex)
        .unwrap()
        .unwrap();
    assert_eq!(j.outcome, Outcome::Completed);
    // Resumed with the same key: the portal returned the certificate it had issued.
    if fail_at == "installed" {
        assert_eq!(Some(report.new_serial.clone()), j.issued.map(|i| i.serial));
    }
    let s = module.open_session(&token).unwrap();
    s.login(&pin).unwrap();
    let objects = s.snapshot().unwrap();
    assert!(
        !objects
            .iter()
            .any(|o| o.label.starts_with(ukey_renewal::PENDING_LABEL_PREFIX)),
        "{objects:?}"
    );
    let serials: Vec<String> = objects
        .iter()
        .filter(|o| o.kind == ukey_token::ObjectKind::Certificate)
        .map(|o| {
            ukey_token::CertificateDetails::from_der(&hex::decode(&o.value_hex).unwrap())
                .unwrap()
                .serial
        })
        .collect();
    assert!(serials.contains(&report.new_serial));
    assert!(!serials.contains(&fx.certs[0].serial_hex));
}

#[test]
fn portal_503_at_issue_then_resumed() {
    interrupted_then_resumed("issue", Step::Request);
}

#[test]
fn network_down_at_installed_then_resumed() {
    interrupted_then_resumed("installed", Step::Installed);
}

#[test]
fn pending_objects_of_an_abandoned_renewal_are_removed() {
    let env = Env::new(&[TokenSpec::ukey("Abandoned")]);
    let fx = &env.tokens[0];
    env.order(
        &fx.certs[0],
        KeyPolicy::New,
        KeyAlgorithm::Rsa2048,
        None,
        false,
    );
    let module = env.module();
    let token = summary(&module, &fx.serial);
    let pin = SecretString::from(fx.user_pin.clone());
    {
        // Left over by a renewal whose journal is gone.
        let s = module.open_rw_session(&token).unwrap();
        s.login(&pin).unwrap();
        let label = format!("{}0badc0ffee00 sig", ukey_renewal::PENDING_LABEL_PREFIX);
        s.generate_key_pair(
            ukey_token::KeyAlg::EcP256,
            b"ukey-renew:0badc0ffee00:sig",
            &label,
        )
        .unwrap();
    }
    let client = env.client();
    let opts = env.options();
    let plan = preflight(&module, &token, None, &client, &opts).unwrap();
    let mut cleaned = 0;
    renew(&module, plan, &pin, &client, &opts, &mut |e| {
        if let Event::CleanedUp { objects } = e {
            cleaned = objects;
        }
    })
    .unwrap();
    assert_eq!(cleaned, 2, "the abandoned key pair (private + public)");
    let s = module.open_session(&token).unwrap();
    s.login(&pin).unwrap();
    assert!(
        !s.snapshot()
            .unwrap()
            .iter()
            .any(|o| o.label.starts_with(ukey_renewal::PENDING_LABEL_PREFIX))
    );
}
