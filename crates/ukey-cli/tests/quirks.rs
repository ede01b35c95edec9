//! A key whose module fills C_GetTokenInfo in its own way (ukey-sim told to, through
//! its state directory): `ukey list` still lists it, with the odd fields decoded or
//! unknown, and `ukey diagnose` names each quirk with its raw value.

mod common;

use std::path::Path;
use std::process::Output;

use serde_json::Value;
use softhsm_fixtures::{CertSpec, KeyAlg, SoftHsm, TokenSpec, softhsm_module};
use ukey_sim::{Control, TokenInfoOverride};

const UKEY: &str = env!("CARGO_BIN_EXE_ukey");

fn ukey(hsm: &SoftHsm, shim: &Path, state: &Path, args: &[&str]) -> Output {
    hsm.command(UKEY)
        .arg("--module")
        .arg(shim)
        .args(args)
        .env_remove("UKEY_PKCS11_MODULE")
        .env("UKEY_CONFIG", hsm.dir().join("no-config.toml"))
        .env(
            "UKEY_SYSTEM_CONFIG",
            hsm.dir().join("no-system-config.toml"),
        )
        .env("UKEY_DATA_DIR", hsm.dir().join("data"))
        .env(ukey_sim::STATE_ENV, state)
        .env(ukey_sim::BACKEND_ENV, softhsm_module().unwrap())
        .output()
        .expect("run ukey")
}

#[test]
fn a_key_with_odd_token_info_is_listed_and_its_quirks_diagnosed() {
    let hsm = SoftHsm::new().unwrap();
    let fx = hsm
        .create_token(&TokenSpec {
            certs: vec![CertSpec::signing(KeyAlg::Rsa2048, "张三", 200)],
            ..TokenSpec::ukey("UKey")
        })
        .unwrap();
    let state = hsm.dir().join("ukey-sim-state");
    let shim = hsm.dir().join(ukey_sim::module_file_name());
    std::fs::copy(common::shim_module(), &shim).unwrap();
    // A GBK label, NUL padding, a clock that is not 16 digits and a firmware version
    // out of range, all at once: what a vendor's module may well return.
    Control::new(&state)
        .unwrap()
        .set_token_info(
            &fx.serial,
            TokenInfoOverride {
                label_hex: Some("d5c5c8fdb5c4554b6579".into()), // 张三的UKey
                pad: Some(0),
                utc_time: Some("".into()),
                firmware_version: Some((2, 180)),
                ..Default::default()
            },
        )
        .unwrap();

    let out = ukey(&hsm, &shim, &state, &["list", "--json"]);
    assert!(out.status.success(), "{out:?}");
    let list: Value = serde_json::from_slice(&out.stdout).unwrap();
    let tokens = list["tokens"].as_array().unwrap();
    assert_eq!(tokens.len(), 1, "{list:#}");
    let token = &tokens[0];
    assert_eq!(token["label"], "张三的UKey", "{token:#}");
    assert_eq!(token["serial"], fx.serial.as_str());
    assert_eq!(token["firmware_version"], "unknown");
    assert_eq!(token["clock"], Value::Null);
    let kinds: Vec<&str> = token["quirks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|q| q["kind"].as_str().unwrap())
        .collect();
    for want in [
        "gbk",
        "nul_padded",
        "clock_unreadable",
        "version_out_of_range",
    ] {
        assert!(kinds.contains(&want), "{want} in {kinds:?}");
    }
    // The certificate is still read and listed.
    let certs = tokens[0]["certificates"].as_array().unwrap();
    assert_eq!(certs.len(), 1, "{list:#}");

    // Plain text (Chinese): the label as the user knows it.
    let out = ukey(&hsm, &shim, &state, &["--lang", "zh-CN", "list"]);
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("张三的UKey"),
        "{out:?}"
    );

    // The diagnosis names each quirk, with the raw value, as a warning.
    let full = hsm.dir().join("full.json");
    let out = ukey(
        &hsm,
        &shim,
        &state,
        &[
            "diagnose",
            "--out",
            full.to_str().unwrap(),
            "--no-redact",
            "--lang",
            "en",
        ],
    );
    assert!(full.is_file(), "{out:?}");
    let r: Value = serde_json::from_slice(&std::fs::read(&full).unwrap()).unwrap();
    let section = r["sections"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["kind"] == "token")
        .expect("a token section");
    let quirks: Vec<&Value> = section["checks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["id"] == "token.quirk")
        .collect();
    assert!(quirks.len() >= 4, "{section:#}");
    assert!(quirks.iter().all(|c| c["status"] == "warn"));
    let utc = quirks
        .iter()
        .find(|c| c.to_string().contains("utcTime"))
        .expect("the clock quirk");
    assert!(
        utc.to_string().contains(&hex::encode([b' '; 16])),
        "the raw value: {utc}"
    );
    // The report for support (redacted): the raw GBK bytes of the holder's name are
    // gone too.
    let redacted = hsm.dir().join("redacted.json");
    let out = ukey(
        &hsm,
        &shim,
        &state,
        &["diagnose", "--out", redacted.to_str().unwrap()],
    );
    assert!(redacted.is_file(), "{out:?}");
    let text = std::fs::read_to_string(&redacted).unwrap();
    assert!(text.contains("\"redacted\": true"), "{text}");
    assert!(!text.contains("d5c5c8fd"), "{text}");
    assert!(!text.contains("张三"), "{text}");
}
