//! `ukey diagnose`, the real binary, against SoftHSM2 fixture tokens.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use serde_json::Value;
use softhsm_fixtures::{CertSpec, KeyAlg, SoftHsm, TokenSpec};

const UKEY: &str = env!("CARGO_BIN_EXE_ukey");

fn command(hsm: &SoftHsm, args: &[&str]) -> Command {
    let mut c = hsm.command(UKEY);
    c.arg("--module")
        .arg(hsm.module_path())
        .args(args)
        .env_remove("UKEY_PKCS11_MODULE")
        .env("UKEY_CONFIG", hsm.dir().join("no-config.toml"))
        .env("UKEY_DATA_DIR", hsm.dir().join("data"));
    c
}

fn ukey(hsm: &SoftHsm, args: &[&str]) -> Output {
    command(hsm, args).output().expect("run ukey")
}

fn ukey_with_stdin(hsm: &SoftHsm, args: &[&str], stdin: &str) -> Output {
    let mut child = command(hsm, args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ukey");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
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

fn section<'v>(report: &'v Value, kind: &str) -> Vec<&'v Value> {
    report["sections"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["kind"] == kind)
        .collect()
}

fn env_check<'v>(report: &'v Value, id: &str) -> &'v Value {
    section(report, "environment")[0]["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["id"] == id)
        .unwrap_or_else(|| panic!("no {id} in {report:#}"))
}

fn healthy(hsm: &SoftHsm) -> softhsm_fixtures::TokenFixture {
    let spec = TokenSpec {
        certs: vec![CertSpec::signing(KeyAlg::Rsa2048, "张三", 200)],
        ..TokenSpec::ukey("张三的UKey")
    };
    hsm.create_token(&spec).unwrap()
}

#[test]
fn healthy_token_with_pin_and_trust_anchor_exits_zero() {
    let hsm = SoftHsm::new().unwrap();
    let fx = healthy(&hsm);
    let ca = hsm.ca().unwrap();
    let root = ca.root_cert_path.to_str().unwrap();
    let issuing = ca.issuing_cert_path.to_str().unwrap();
    let out = ukey_with_stdin(
        &hsm,
        &[
            "diagnose",
            "--json",
            "--pin-stdin",
            "--trust",
            root,
            "--trust",
            issuing,
        ],
        "123456\n",
    );
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let r = json(&out);
    let token = section(&r, "token")[0];
    assert_eq!(token["verdict"], "ok", "{token:#}");
    assert_eq!(token["id"], format!("token:{}", fx.serial));
    let cert = section(&r, "certificate")[0];
    assert_eq!(cert["verdict"], "ok", "{cert:#}");
    let checks = cert["checks"].as_array().unwrap();
    let status = |id: &str| {
        checks
            .iter()
            .find(|c| c["id"] == id)
            .unwrap_or_else(|| panic!("{id} in {cert:#}"))["status"]
            .clone()
    };
    assert_eq!(status("certificate.chain"), "pass");
    assert_eq!(status("certificate.self_test"), "pass");
    // SoftHSM2 has no SM2 mechanisms: said, not failed.
    assert_eq!(env_check(&r, "environment.sm2_profile")["status"], "skip");
    // The terminal JSON is the user's own: not redacted.
    assert_eq!(r["redacted"], false);
    assert!(
        out.stdout
            .windows("张三".len())
            .any(|w| w == "张三".as_bytes())
    );
    // The PIN appears nowhere.
    assert!(!String::from_utf8_lossy(&out.stdout).contains("123456"));
    assert!(!String::from_utf8_lossy(&out.stderr).contains("123456"));
}

#[test]
fn saved_report_is_redacted_unless_no_redact() {
    let hsm = SoftHsm::new().unwrap();
    let id = "11010519491231002X";
    let spec = TokenSpec {
        certs: vec![CertSpec::signing(
            KeyAlg::Rsa2048,
            &format!("张三({id})"),
            200,
        )],
        ..TokenSpec::ukey("张三的UKey")
    };
    let fx = hsm.create_token(&spec).unwrap();
    let dir = hsm.dir().join("reports");
    std::fs::create_dir_all(&dir).unwrap();
    let read = |p: &Path| std::fs::read_to_string(p).unwrap();

    let redacted = dir.join("support.json");
    let out = ukey(&hsm, &["diagnose", "--out", redacted.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let text = read(&redacted);
    assert!(!text.contains("张三"), "{text}");
    assert!(!text.contains(id) && !text.contains(&id[..17]), "{text}");
    let r: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(r["redacted"], true);
    // What support needs stays: serials, company, issuer.
    assert!(text.contains(&fx.serial));
    assert!(text.contains(&fx.certs[0].serial_hex));
    assert!(text.contains("某某建设工程有限公司"));
    assert!(text.contains("[redacted-name]"));

    let txt = dir.join("support.txt");
    let out = ukey(
        &hsm,
        &[
            "diagnose",
            "--lang",
            "zh-CN",
            "--out",
            txt.to_str().unwrap(),
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let t = read(&txt);
    assert!(
        t.contains("UKey 诊断报告") && !t.contains("张三") && !t.contains(id),
        "{t}"
    );

    let full = dir.join("full.json");
    let out = ukey(
        &hsm,
        &["diagnose", "--out", full.to_str().unwrap(), "--no-redact"],
    );
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let text = read(&full);
    assert!(text.contains("张三") && text.contains(id), "{text}");
}

#[test]
fn expired_certificate_exits_with_problems_and_text_says_why() {
    let hsm = SoftHsm::new().unwrap();
    let spec = TokenSpec {
        certs: vec![CertSpec::signing(KeyAlg::EcP256, "李四", -3)],
        ..TokenSpec::ukey("UKey")
    };
    hsm.create_token(&spec).unwrap();
    let out = ukey(&hsm, &["diagnose", "--lang", "en"]);
    assert_eq!(out.status.code(), Some(8), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("[FAIL]"), "{text}");
    assert!(text.contains("expired"), "{text}");
    assert!(text.contains("→ Next:"), "{text}");
    let out = ukey(&hsm, &["diagnose", "--lang", "zh-CN"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("已过期") && text.contains("结论"), "{text}");
}

#[test]
fn bad_input_is_a_clear_error() {
    let hsm = SoftHsm::new().unwrap();
    healthy(&hsm);
    // A trust anchor that is not a certificate.
    let junk = hsm.dir().join("junk.pem");
    std::fs::write(&junk, "not a certificate").unwrap();
    let out = ukey(&hsm, &["diagnose", "--trust", junk.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("junk.pem"));
    // --pin-stdin with nothing on stdin.
    let out = ukey_with_stdin(&hsm, &["diagnose", "--pin-stdin"], "");
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("PIN"));
    // --no-redact alone makes no sense.
    let out = ukey(&hsm, &["diagnose", "--no-redact"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    // A module that is not there is a failing check in the report, not a crash.
    let out = hsm
        .command(UKEY)
        .args([
            "--module",
            "/nonexistent/libvendor.so",
            "diagnose",
            "--json",
        ])
        .env("UKEY_CONFIG", hsm.dir().join("no-config.toml"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(8), "{out:?}");
    let r = json(&out);
    assert_eq!(r["overall"], "fail");
}

#[test]
fn the_sm2_mechanism_profile_of_the_module_is_named_or_its_error_shown() {
    let hsm = SoftHsm::new().unwrap();
    healthy(&hsm);
    let config = hsm.dir().join("sm2-config.toml");
    let module = hsm.module_path().display().to_string();
    let write = |profile: &str| {
        std::fs::write(
            &config,
            format!(
                "[[modules]]\nname = \"GM\"\npath = \"{module}\"\nsm2_profile = \"{profile}\"\n"
            ),
        )
        .unwrap();
    };
    let diagnose = || {
        let out = command(&hsm, &["diagnose", "--json"])
            .env("UKEY_CONFIG", &config)
            .output()
            .unwrap();
        json(&out)
    };
    write("tass");
    let r = diagnose();
    let check = env_check(&r, "environment.sm2_profile");
    assert_eq!(check["status"], "pass", "{check:#}");
    assert_eq!(check["facts"]["profile"], "tass");
    assert_eq!(check["facts"]["key_pair_gen"], "0x80008001");
    assert_eq!(check["facts"]["tried_on_hardware"], false);

    write("no-such-vendor");
    let r = diagnose();
    let check = env_check(&r, "environment.sm2_profile");
    assert_eq!(check["status"], "fail", "{check:#}");
    assert!(check.to_string().contains("no-such-vendor"), "{check:#}");
}
