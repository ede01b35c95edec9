//! Steps of a renewal and the progress events front ends render.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The steps, in order. The journal records each before and after it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Step {
    /// Checks before the PIN is asked for.
    Preflight,
    /// C_Login with the PIN.
    Login,
    /// New key pair on the token, or the old one reused.
    Key,
    /// CSR signed on the token, challenge signed by the old key, issue.
    Request,
    /// Checks of what the portal issued.
    Verify,
    /// New certificate (and escrowed encryption key + certificate) written, pending.
    Write,
    /// Sign/verify and decrypt with the new objects.
    SelfTest,
    /// Final labels and ids; old signing objects removed, old encryption ones archived.
    Activate,
    /// The portal is told; the journal is closed.
    Installed,
}

impl Step {
    /// Every step, in order.
    pub const ALL: [Step; 9] = [
        Step::Preflight,
        Step::Login,
        Step::Key,
        Step::Request,
        Step::Verify,
        Step::Write,
        Step::SelfTest,
        Step::Activate,
        Step::Installed,
    ];

    /// `preflight`, `login`, ... (as in `UKEY_FAILPOINT` and JSON).
    pub fn as_str(self) -> &'static str {
        match self {
            Step::Preflight => "preflight",
            Step::Login => "login",
            Step::Key => "key",
            Step::Request => "request",
            Step::Verify => "verify",
            Step::Write => "write",
            Step::SelfTest => "self_test",
            Step::Activate => "activate",
            Step::Installed => "installed",
        }
    }

    /// What the step does, for a progress line.
    pub fn describe(self, zh: bool) -> &'static str {
        match (self, zh) {
            (Step::Preflight, true) => "检查 UKey、证书与订单",
            (Step::Preflight, false) => "Checking token, certificate and order",
            (Step::Login, true) => "验证 PIN 码",
            (Step::Login, false) => "Logging in",
            (Step::Key, true) => "在 UKey 上生成新密钥",
            (Step::Key, false) => "Preparing the key on the token",
            (Step::Request, true) => "向 CA 申请新证书",
            (Step::Request, false) => "Requesting the renewed certificate",
            (Step::Verify, true) => "校验新证书",
            (Step::Verify, false) => "Verifying the issued certificate",
            (Step::Write, true) => "写入新证书",
            (Step::Write, false) => "Writing to the token",
            // Neutral wording: a key without an encryption certificate has nothing to
            // decrypt or archive; the preflight notices say when there is.
            (Step::SelfTest, true) => "自检新密钥",
            (Step::SelfTest, false) => "Self-test of the new key",
            (Step::Activate, true) => "启用新证书",
            (Step::Activate, false) => "Activating the new certificate",
            (Step::Installed, true) => "通知 CA 安装完成",
            (Step::Installed, false) => "Confirming installation to the portal",
        }
    }
}

/// A progress event.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// A step starts.
    StepStarted {
        /// The step.
        step: Step,
    },
    /// A step finished.
    StepFinished {
        /// The step.
        step: Step,
        /// How long it took.
        #[serde(with = "duration_ms")]
        duration: Duration,
    },
    /// A step was skipped (already done before an interruption, or not needed).
    StepSkipped {
        /// The step.
        step: Step,
    },
    /// An interrupted renewal is being resumed.
    Resuming {
        /// The step it had reached.
        from: Step,
    },
    /// Pending objects of an abandoned renewal were removed.
    CleanedUp {
        /// How many objects.
        objects: usize,
    },
}

mod duration_ms {
    use serde::Serializer;
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64() * 1000.0)
    }
}
