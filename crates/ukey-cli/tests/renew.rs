//! The real `ukey renew` / `ukey status` binaries against SoftHSM2 tokens and the
//! reference portal on loopback (in this test process).

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};

use serde_json::Value;
use softhsm_fixtures::{SoftHsm, TokenFixture, TokenSpec};
use ukey_portal_api::{CreateOrderRequest, InitialState, KeyAlgorithm, KeyPolicy};

const UKEY: &str = env!("CARGO_BIN_EXE_ukey");

struct Env {
    hsm: SoftHsm,
    token: TokenFixture,
    portal: common::LoopbackPortal,
    data: tempfile::TempDir,
}

impl Env {
    fn new(spec: TokenSpec) -> Env {
        let hsm = SoftHsm::new().unwrap();
        let token = hsm.create_token(&spec).unwrap();
        let portal = common::start_portal(&hsm);
        Env {
            hsm,
            token,
            portal,
            data: tempfile::tempdir().unwrap(),
        }
    }

    fn order(&self, state: InitialState) -> String {
        self.portal
            .server
            .portal
            .create_order(&CreateOrderRequest {
                serial_hex: self.token.certs[0].serial_hex.clone(),
                issuer_der: None,
                issuer_dn: None,
                years: 1,
                state,
                key_policy: KeyPolicy::New,
                with_encryption_cert: self.token.certs.len() > 1,
                target_algorithm: KeyAlgorithm::Rsa2048,
                old_encryption_serial_hex: self.token.certs.get(1).map(|c| c.serial_hex.clone()),
            })
            .unwrap()
            .order_id
    }

    fn root(&self) -> PathBuf {
        self.hsm.ca().unwrap().root_cert_path.clone()
    }

    fn ukey(&self, args: &[&str], stdin: &str, extra_env: &[(&str, &str)]) -> Output {
        let mut cmd = self.hsm.command(UKEY);
        cmd.arg("--module")
            .arg(self.hsm.module_path())
            .args(args)
            .env_remove("UKEY_PKCS11_MODULE")
            .env("UKEY_CONFIG", self.hsm.dir().join("config.toml"))
            .env("UKEY_DATA_DIR", self.data.path())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in extra_env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(stdin.as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    }

    fn renew(&self, pin: &str, extra: &[&str], env: &[(&str, &str)]) -> Output {
        let root = self.root();
        let url = self.portal.server.url.clone();
        let mut args = vec![
            "renew",
            "--portal",
            &url,
            "--pin-stdin",
            "--yes",
            "--json",
            "--trust",
            root.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        self.ukey(&args, &format!("{pin}\n"), env)
    }
}

fn json(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}): {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(files_under(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[test]
fn renew_json_then_status_completed_and_nothing_left_to_do() {
    let env = Env::new(TokenSpec::dual(
        "CLI dual",
        softhsm_fixtures::KeyAlg::Rsa2048,
    ));
    env.order(InitialState::Ready);
    let out = env.renew(&env.token.user_pin, &[], &[]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v = json(&out);
    assert_eq!(v["status"], "renewed");
    assert_eq!(v["old_serial"], env.token.certs[0].serial_hex.as_str());
    assert_ne!(v["new_serial"], v["old_serial"]);
    assert!(
        v["not_after"]
            .as_str()
            .unwrap()
            .starts_with(&(time::OffsetDateTime::now_utc().year() + 1).to_string())
    );
    assert_eq!(v["archived_serial"], env.token.certs[1].serial_hex.as_str());
    let steps: Vec<&str> = v["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["step"].as_str().unwrap())
        .collect();
    assert_eq!(
        steps,
        [
            "preflight",
            "login",
            "key",
            "request",
            "verify",
            "write",
            "self_test",
            "activate",
            "installed"
        ]
    );
    assert!(v["steps"][2]["ms"].as_f64().unwrap() > 0.0);

    // The portal now says completed for the new certificate.
    let url = env.portal.server.url.clone();
    let out = env.ukey(&["status", "--portal", &url, "--json"], "", &[]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s = json(&out);
    let certs = s["certificates"].as_array().unwrap();
    let new = certs
        .iter()
        .find(|c| c["serial"] == v["new_serial"])
        .expect("new cert listed");
    assert_eq!(new["state"], "none", "{new}");
    assert!(
        certs
            .iter()
            .any(|c| c["serial"] == v["archived_serial"] && c["state"] == "encryption")
    );

    // A second run has nothing to do: exit 5.
    let out = env.renew(&env.token.user_pin, &[], &[]);
    assert_eq!(
        out.status.code(),
        Some(5),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v = json(&out);
    assert_eq!(v["status"], "nothing_to_do");
    assert_eq!(v["error"]["code"], "already_renewed", "{v}");
}

#[test]
fn unpaid_order_needs_user_action_with_the_payment_url() {
    let env = Env::new(TokenSpec::ukey("CLI unpaid"));
    env.order(InitialState::AwaitingPayment);
    let out = env.renew(&env.token.user_pin, &[], &[]);
    assert_eq!(
        out.status.code(),
        Some(6),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v = json(&out);
    assert_eq!(v["status"], "action_needed");
    assert_eq!(v["error"]["code"], "awaiting_payment");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("/pay"),
        "{v}"
    );
    let url = env.portal.server.url.clone();
    let out = env.ukey(&["--lang", "zh-CN", "status", "--portal", &url], "", &[]);
    assert_eq!(out.status.code(), Some(0));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("待付款"),
        "{out:?}"
    );
}

#[test]
fn without_yes_off_a_terminal_nothing_happens() {
    let env = Env::new(TokenSpec::ukey("CLI noyes"));
    env.order(InitialState::Ready);
    let root = env.root();
    let url = env.portal.server.url.clone();
    let out = env.ukey(
        &[
            "renew",
            "--portal",
            &url,
            "--pin-stdin",
            "--trust",
            root.to_str().unwrap(),
        ],
        &format!("{}\n", env.token.user_pin),
        &[],
    );
    assert_eq!(out.status.code(), Some(6));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--yes"));
    // The notices were shown before asking.
    assert!(String::from_utf8_lossy(&out.stderr).contains("revoked"));
}

/// The PIN appears nowhere: not in stdout/stderr at maximum verbosity, not in the
/// journal or any other file of the data dir, whether the PIN is right or wrong.
#[test]
fn pin_never_appears_in_logs_output_or_journal() {
    let pin = "739182604";
    let mut spec = TokenSpec::ukey("CLI pin");
    spec.user_pin = pin.to_owned();
    let env = Env::new(spec);
    env.order(InitialState::Ready);
    let trace = [("UKEY_LOG", "trace"), ("RUST_LOG", "trace")];

    // Wrong PIN first: fails, token unchanged, nothing retried.
    let wrong = "111111999";
    let out = env.renew(wrong, &["-vvv"], &trace);
    assert_eq!(
        out.status.code(),
        Some(7),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(json(&out)["error"]["code"], "pin_incorrect");
    for text in [&out.stdout, &out.stderr] {
        let t = String::from_utf8_lossy(text);
        assert!(!t.contains(wrong), "wrong PIN leaked: {t}");
    }

    let out = env.renew(pin, &["-vvv"], &trace);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("TRACE") || stderr.contains("DEBUG"),
        "max verbosity produced logs: {stderr}"
    );
    for text in [&out.stdout, &out.stderr] {
        assert!(!String::from_utf8_lossy(text).contains(pin));
    }
    let files = files_under(env.data.path());
    assert!(!files.is_empty(), "the journal was written");
    for f in files {
        let bytes = std::fs::read(&f).unwrap();
        let text = String::from_utf8_lossy(&bytes);
        assert!(!text.contains(pin), "PIN in {}", f.display());
        assert!(!text.contains(wrong), "wrong PIN in {}", f.display());
    }
}

#[test]
fn help_documents_the_exit_codes() {
    let out = std::process::Command::new(UKEY)
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for needle in [
        "5    renew: nothing to renew",
        "6    renew: user action needed",
        "7    renew: failed",
    ] {
        assert!(help.contains(needle), "{help}");
    }
    let out = std::process::Command::new(UKEY)
        .args(["renew", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--portal",
        "--token",
        "--cert",
        "--pin-stdin",
        "--yes",
        "--json",
        "--trust",
        "--confirm-final-try",
    ] {
        assert!(help.contains(flag), "{flag}: {help}");
    }
}

/// Trust anchors come from the config file's [renewal] table too; with none at all the
/// issued certificate is refused and the token left as it was.
#[test]
fn trust_anchors_from_the_config_file_or_refusal_without_any() {
    let env = Env::new(TokenSpec::ukey("CLI trust"));
    env.order(InitialState::Ready);
    let url = env.portal.server.url.clone();
    let args = [
        "renew",
        "--portal",
        url.as_str(),
        "--pin-stdin",
        "--yes",
        "--json",
    ];
    let pin = format!("{}\n", env.token.user_pin);

    // No anchor: refused before the PIN (user action), nothing journalled.
    let out = env.ukey(&args, &pin, &[]);
    assert_eq!(
        out.status.code(),
        Some(6),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v = json(&out);
    assert_eq!(v["error"]["code"], "trust_anchor_missing");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("--trust"),
        "{v}"
    );
    assert!(files_under(env.data.path()).is_empty());

    std::fs::write(
        env.hsm.dir().join("config.toml"),
        format!(
            "[renewal]\ntrust_anchors = [{:?}]\n",
            env.root().display().to_string()
        ),
    )
    .unwrap();
    let out = env.ukey(&args, &pin, &[]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v = json(&out);
    assert_eq!(v["status"], "renewed");
    assert!(v["notices"][0].as_str().unwrap().contains("revoked"), "{v}");
}

/// A CA ships the client preconfigured: its system-wide file gives the portal and the
/// trust anchor, so `ukey renew` needs neither `--portal` nor `--trust`; without any,
/// it refuses before the PIN and says where a portal comes from; `ukey diagnose` names
/// the file each setting came from.
#[test]
fn the_portal_and_anchor_come_from_the_cas_system_file() {
    let env = Env::new(TokenSpec::ukey("CLI system"));
    env.order(InitialState::Ready);
    let root = env.root();
    let root = root.to_str().unwrap();
    let pin = format!("{}\n", env.token.user_pin);
    let absent = env.hsm.dir().join("no-system.toml");
    let absent = absent.to_str().unwrap();
    let args = ["renew", "--pin-stdin", "--yes", "--json", "--trust", root];
    let out = env.ukey(&args, &pin, &[("UKEY_SYSTEM_CONFIG", absent)]);
    assert_eq!(
        out.status.code(),
        Some(6),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v = json(&out);
    assert_eq!(v["error"]["code"], "portal_not_configured");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("/etc/ukey/config.toml"),
        "{v}"
    );
    assert!(
        files_under(env.data.path()).is_empty(),
        "nothing journalled"
    );

    let system = env.hsm.dir().join("system.toml");
    std::fs::write(
        &system,
        format!(
            "portal_url = {:?}\n[renewal]\ntrust_anchors = [{root:?}]\n",
            env.portal.server.url
        ),
    )
    .unwrap();
    let system = system.to_str().unwrap();
    let out = env.ukey(
        &["renew", "--pin-stdin", "--yes", "--json"],
        &pin,
        &[("UKEY_SYSTEM_CONFIG", system)],
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(json(&out)["status"], "renewed");

    let out = env.ukey(
        &["diagnose", "--json"],
        "",
        &[("UKEY_SYSTEM_CONFIG", system)],
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    let text = report.to_string();
    assert!(text.contains("environment.config_sources"), "{text}");
    assert!(text.contains(system), "the system file is named: {text}");
}
