//! The real `ukey` binary against SoftHSM2 tokens: fixture tokens, and a token that
//! no code of ours wrote (openssl + OpenSC's pkcs11-tool).

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use serde_json::Value;
use softhsm_fixtures::{CertSpec, KeyAlg, SoftHsm, TokenSpec};

const UKEY: &str = env!("CARGO_BIN_EXE_ukey");

fn ukey(hsm: &SoftHsm, args: &[&str]) -> Output {
    hsm.command(UKEY)
        .arg("--module")
        .arg(hsm.module_path())
        .args(args)
        .env_remove("UKEY_PKCS11_MODULE")
        .env("UKEY_CONFIG", hsm.dir().join("no-config.toml"))
        .output()
        .expect("run ukey")
}

fn list_json(hsm: &SoftHsm) -> Value {
    let out = ukey(hsm, &["list", "--json"]);
    assert!(out.status.success(), "{out:?}");
    serde_json::from_slice(&out.stdout).expect("JSON")
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().expect("spawn");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn openssl_serial(cert_pem: &Path) -> String {
    let out = run(Command::new("openssl")
        .args(["x509", "-noout", "-serial", "-in"])
        .arg(cert_pem));
    out.trim()
        .strip_prefix("serial=")
        .expect("serial=")
        .to_owned()
}

/// Keys and certificates made by openssl, written with `pkcs11-tool --write-object`
/// into a token initialised by softhsm2-util: nothing of ours touched the token.
#[test]
fn lists_a_token_written_by_openssl_and_pkcs11_tool() {
    let hsm = SoftHsm::new().unwrap();
    let dir = hsm.dir().join("foreign");
    std::fs::create_dir_all(&dir).unwrap();
    run(hsm.command("softhsm2-util").args([
        "--init-token",
        "--free",
        "--label",
        "外来UKey",
        "--pin",
        "654321",
        "--so-pin",
        "87654321",
    ]));
    let module = hsm.module_path().to_owned();
    let p11 = |args: &[&str]| {
        run(hsm
            .command("pkcs11-tool")
            .arg("--module")
            .arg(&module)
            .args(["--login", "--pin", "654321"])
            .args(args))
    };
    let openssl = |args: &[&str]| run(Command::new("openssl").current_dir(&dir).args(args));

    // (id, key options, serial, subject, keyUsage, write public key too)
    let certs = [
        (
            "01",
            "rsa:2048",
            "0xB2A1C3D4E5F60718",
            "/C=CN/O=某某建设工程有限公司/CN=张三",
            "critical,digitalSignature,nonRepudiation",
            true,
        ),
        (
            "02",
            "ec",
            "0x0A0B0C",
            "/C=CN/O=某某建设工程有限公司/CN=张三",
            "critical,keyAgreement",
            false,
        ),
        (
            "03",
            "ec",
            "-0x1234",
            "/CN=负数序列号",
            "critical,digitalSignature",
            true,
        ),
    ];
    for (id, newkey, serial, subject, ku, with_pub) in certs {
        let mut args = vec!["req", "-x509", "-nodes", "-newkey", newkey];
        if newkey == "ec" {
            args.extend(["-pkeyopt", "ec_paramgen_curve:P-256"]);
        }
        let key = format!("k{id}.pem");
        let crt = format!("c{id}.pem");
        let ku = format!("keyUsage={ku}");
        args.extend([
            "-keyout",
            &key,
            "-out",
            &crt,
            "-days",
            "30",
            "-utf8",
            "-subj",
            subject,
            "-set_serial",
            serial,
            "-addext",
            &ku,
        ]);
        openssl(&args);
        openssl(&[
            "x509",
            "-in",
            &crt,
            "-outform",
            "DER",
            "-out",
            &format!("c{id}.der"),
        ]);
        openssl(&[
            "pkcs8",
            "-topk8",
            "-nocrypt",
            "-in",
            &key,
            "-outform",
            "DER",
            "-out",
            &format!("k{id}.der"),
        ]);
        let label = format!("openssl-{id}");
        let path = |f: String| dir.join(f).display().to_string();
        p11(&[
            "--write-object",
            &path(format!("c{id}.der")),
            "--type",
            "cert",
            "--id",
            id,
            "--label",
            &label,
        ]);
        p11(&[
            "--write-object",
            &path(format!("k{id}.der")),
            "--type",
            "privkey",
            "--id",
            id,
            "--label",
            &label,
        ]);
        if with_pub {
            openssl(&[
                "pkey",
                "-in",
                &key,
                "-pubout",
                "-outform",
                "DER",
                "-out",
                &format!("p{id}.der"),
            ]);
            p11(&[
                "--write-object",
                &path(format!("p{id}.der")),
                "--type",
                "pubkey",
                "--id",
                id,
                "--label",
                &label,
            ]);
        }
    }
    // A public key with no certificate: an orphan key.
    openssl(&[
        "genpkey",
        "-algorithm",
        "EC",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-out",
        "k04.pem",
    ]);
    openssl(&[
        "pkey", "-in", "k04.pem", "-pubout", "-outform", "DER", "-out", "p04.der",
    ]);
    p11(&[
        "--write-object",
        &dir.join("p04.der").display().to_string(),
        "--type",
        "pubkey",
        "--id",
        "04",
        "--label",
        "orphan",
    ]);

    let doc = list_json(&hsm);
    let tokens = doc["tokens"].as_array().unwrap();
    assert_eq!(tokens.len(), 1, "{doc:#}");
    let t = &tokens[0];
    assert_eq!(t["label"], "外来UKey");
    assert!(t["errors"].as_array().unwrap().is_empty(), "{t:#}");
    let cert = |id: &str| {
        t["certificates"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["key_id"] == id)
            .unwrap_or_else(|| panic!("no certificate {id} in {t:#}"))
            .clone()
    };

    for (id, ..) in certs {
        let c = cert(id);
        let want = openssl_serial(&dir.join(format!("c{id}.pem")));
        assert_eq!(c["serial"], want.as_str(), "certificate {id}: {c:#}");
        assert_eq!(c["label"], format!("openssl-{id}"));
    }
    assert_eq!(cert("01")["serial"], "B2A1C3D4E5F60718");
    assert_eq!(cert("02")["serial"], "0A0B0C");
    assert_eq!(cert("03")["serial"], "-1234");

    let c1 = cert("01");
    assert_eq!(c1["subject_cn"], "张三");
    assert_eq!(c1["subject"], "C=CN, O=某某建设工程有限公司, CN=张三");
    assert_eq!(c1["key_algorithm"], "RSA-2048");
    assert_eq!(c1["usage"], "signing");
    assert_eq!(c1["has_private_key"], true);
    assert_eq!(c1["key_evidence"], "public_key");
    let c2 = cert("02");
    assert_eq!(c2["key_algorithm"], "EC-P256");
    assert_eq!(c2["usage"], "encryption");
    // Private key hidden behind login and no public key object: cannot know.
    assert_eq!(c2["has_private_key"], Value::Null);
    assert_eq!(cert("03")["subject_cn"], "负数序列号");

    let orphans = t["orphan_keys"].as_array().unwrap();
    assert_eq!(orphans.len(), 1, "{t:#}");
    assert_eq!(orphans[0]["key_id"], "04");
    assert_eq!(orphans[0]["class"], "public");
    assert_eq!(orphans[0]["key_type"], "EC");

    // not_after as openssl reads it, in RFC 3339 UTC.
    let end = run(Command::new("openssl")
        .args(["x509", "-noout", "-enddate", "-dateopt", "iso_8601", "-in"])
        .arg(dir.join("c01.pem")));
    let end = end
        .trim()
        .strip_prefix("notAfter=")
        .unwrap()
        .replace(' ', "T");
    assert_eq!(c1["not_after"], end.as_str());
    assert_eq!(c1["days_left"], 30);
}

#[test]
fn list_json_has_the_documented_shape_for_several_tokens() {
    let hsm = SoftHsm::new().unwrap();
    let a = hsm.create_token(&TokenSpec::ukey("张三的UKey")).unwrap();
    let b = hsm
        .create_token(&TokenSpec::dual("双证书", KeyAlg::EcP256))
        .unwrap();
    let mut spec = TokenSpec::ukey("问题UKey");
    spec.certs = vec![
        CertSpec::signing(KeyAlg::Rsa2048, "过期", -2),
        CertSpec {
            corrupt_cert: true,
            key_id: vec![0x05],
            label: "损坏".into(),
            ..CertSpec::signing(KeyAlg::Rsa2048, "坏", 5)
        },
        CertSpec {
            with_cert: false,
            key_id: vec![0x09],
            label: "孤立密钥".into(),
            ..CertSpec::encryption(KeyAlg::Rsa2048, "x", 5)
        },
    ];
    let c = hsm.create_token(&spec).unwrap();

    let doc = list_json(&hsm);
    let tokens = doc["tokens"].as_array().unwrap();
    assert_eq!(tokens.len(), 3, "{doc:#}");
    let token = |serial: &str| tokens.iter().find(|t| t["serial"] == serial).unwrap();

    let ta = token(&a.serial);
    for key in [
        "slot_id",
        "label",
        "serial",
        "manufacturer",
        "model",
        "pin",
        "certificates",
    ] {
        assert!(!ta[key].is_null(), "missing {key} in {ta:#}");
    }
    assert_eq!(ta["label"], "张三的UKey");
    assert_eq!(ta["pin"]["initialized"], true);
    for flag in ["count_low", "final_try", "locked"] {
        assert_eq!(ta["pin"][flag], false);
    }
    let ca = &ta["certificates"][0];
    assert_eq!(ca["serial"], a.certs[0].serial_hex.as_str());
    assert_eq!(ca["subject_cn"], "张三");
    assert_eq!(ca["usage"], "signing");
    assert_eq!(ca["key_algorithm"], "RSA-2048");
    assert_eq!(ca["key_id"], "01");
    assert_eq!(ca["days_left"], 10);
    assert_eq!(ca["has_private_key"], true);
    let nb = ca["not_before"].as_str().unwrap();
    let na = ca["not_after"].as_str().unwrap();
    assert!(nb.ends_with('Z') && na.ends_with('Z'), "{nb} {na}");
    let parsed =
        time::OffsetDateTime::parse(na, &time::format_description::well_known::Rfc3339).unwrap();
    assert_eq!(parsed, a.certs[0].not_after);

    let tb = token(&b.serial);
    let usages: Vec<&str> = tb["certificates"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["usage"].as_str().unwrap())
        .collect();
    assert_eq!(usages.len(), 2);
    assert!(
        usages.contains(&"signing") && usages.contains(&"encryption"),
        "{usages:?}"
    );
    for (cf, c) in b.certs.iter().map(|cf| {
        (
            cf,
            tb["certificates"]
                .as_array()
                .unwrap()
                .iter()
                .find(|c| c["key_id"] == cf.key_id_hex().as_str())
                .unwrap(),
        )
    }) {
        assert_eq!(c["serial"], cf.serial_hex.as_str());
        assert_eq!(c["key_algorithm"], "EC-P256");
    }

    let tc = token(&c.serial);
    let certs = tc["certificates"].as_array().unwrap();
    assert_eq!(certs.len(), 2, "{tc:#}");
    let expired = certs.iter().find(|c| c["key_id"] == "01").unwrap();
    assert_eq!(expired["expired"], true);
    assert_eq!(expired["days_left"], -2);
    let corrupt = certs.iter().find(|c| c["key_id"] == "05").unwrap();
    assert_eq!(corrupt["error"]["code"], "certificate_malformed");
    assert_eq!(corrupt["serial"], Value::Null);
    assert_eq!(corrupt["label"], "损坏");
    assert_eq!(tc["orphan_keys"][0]["key_id"], "09");
    assert_eq!(tc["orphan_keys"][0]["label"], "孤立密钥");
}

#[test]
fn text_table_follows_the_language() {
    let hsm = SoftHsm::new().unwrap();
    let fx = hsm.create_token(&TokenSpec::ukey("张三的UKey")).unwrap();
    let zh = ukey(&hsm, &["--lang", "zh-CN", "list"]);
    assert!(zh.status.success(), "{zh:?}");
    let zh = String::from_utf8(zh.stdout).unwrap();
    assert!(zh.contains("证书序列号") && zh.contains("剩余天数"), "{zh}");
    assert!(zh.contains("张三") && zh.contains("签名"), "{zh}");
    assert!(zh.contains(&fx.certs[0].serial_hex), "{zh}");
    let en = ukey(&hsm, &["--lang", "en", "list"]);
    let en = String::from_utf8(en.stdout).unwrap();
    assert!(
        en.contains("Certificate serial") && en.contains("signing"),
        "{en}"
    );
    assert!(!en.contains("证书序列号"), "{en}");
    // The locale decides when --lang is absent.
    let out = hsm
        .command(UKEY)
        .env("UKEY_CONFIG", hsm.dir().join("no-config.toml"))
        .arg("--module")
        .arg(hsm.module_path())
        .arg("list")
        .env("LC_ALL", "zh_CN.UTF-8")
        .env("LANG", "zh_CN.UTF-8")
        .output()
        .unwrap();
    assert!(
        String::from_utf8(out.stdout)
            .unwrap()
            .contains("证书序列号")
    );
}

#[test]
fn a_module_that_is_not_pkcs11_is_a_clear_error_with_exit_code_3() {
    let hsm = SoftHsm::new().unwrap();
    let fake = hsm.dir().join("libfake-pkcs11.so");
    std::fs::write(&fake, b"\x7fELF but not really").unwrap();
    let out = hsm
        .command(UKEY)
        .env("UKEY_CONFIG", hsm.dir().join("no-config.toml"))
        .args(["--lang", "en", "--module"])
        .arg(&fake)
        .args(["list", "--json"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(
        stderr.contains("libfake-pkcs11.so") && stderr.contains("not a usable PKCS#11 module"),
        "{stderr}"
    );
    let doc: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["error"]["code"], "module_invalid");

    // Through the environment variable, in Chinese, a path that does not exist.
    let out = hsm
        .command(UKEY)
        .env("UKEY_CONFIG", hsm.dir().join("no-config.toml"))
        .args(["--lang", "zh-CN", "list"])
        .env("UKEY_PKCS11_MODULE", hsm.dir().join("absent.so"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(
        stderr.contains("找不到 PKCS#11 驱动模块") && stderr.contains("absent.so"),
        "{stderr}"
    );
}

/// `ukey watch --json` sees a token created and then deleted by other processes.
#[test]
fn watch_prints_one_line_per_insert_and_remove() {
    let hsm = SoftHsm::new().unwrap();
    let first = hsm.create_token(&TokenSpec::ukey("已插入")).unwrap();
    let mut child = hsm
        .command(UKEY)
        .env("UKEY_CONFIG", hsm.dir().join("no-config.toml"))
        .arg("--module")
        .arg(hsm.module_path())
        .args(["watch", "--json", "--interval-ms", "50"])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let next = || -> Value {
        let line = rx
            .recv_timeout(Duration::from_secs(15))
            .expect("a line from ukey watch");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"))
    };

    let ev = next();
    assert_eq!(ev["event"], "inserted");
    assert_eq!(ev["serial"], first.serial.as_str());

    run(hsm.command("softhsm2-util").args([
        "--init-token",
        "--free",
        "--label",
        "新UKey",
        "--pin",
        "123456",
        "--so-pin",
        "12345678",
    ]));
    let ev = next();
    assert_eq!(ev["event"], "inserted", "{ev}");
    assert_eq!(ev["label"], "新UKey");
    let serial = ev["serial"].as_str().unwrap().to_owned();

    run(hsm
        .command("softhsm2-util")
        .args(["--delete-token", "--serial", &serial]));
    let ev = next();
    assert_eq!(ev["event"], "removed", "{ev}");
    assert_eq!(ev["serial"], serial.as_str());
    assert_eq!(ev["label"], "新UKey");

    child.kill().unwrap();
    child.wait().unwrap();
    assert!(rx.try_recv().is_err(), "no further lines expected");
}

/// `ukey list` without `--module`: the config file lists OpenSC's module first and
/// SoftHSM2's second; the key is only in SoftHSM2, so that is the one opened. Without
/// any token, the first module is used and the text output names it.
#[test]
fn list_without_module_opens_the_discovered_module_that_has_the_key() {
    let opensc = ukey_token::discover_all(&ukey_token::Config::default())
        .into_iter()
        .find(|m| m.name == "OpenSC")
        .expect("OpenSC's PKCS#11 module is installed (apt install opensc)")
        .path;
    let hsm = SoftHsm::new().unwrap();
    let config = hsm.dir().join("config.toml");
    std::fs::write(
        &config,
        format!(
            "[[modules]]\nname = \"OpenSC\"\npath = {:?}\n\n[[modules]]\nname = \"SoftHSM2\"\npath = {:?}\n",
            opensc.display().to_string(),
            hsm.module_path().display().to_string()
        ),
    )
    .unwrap();
    let list = |args: &[&str]| {
        hsm.command(UKEY)
            .args(["--lang", "en", "list"])
            .args(args)
            .env_remove("UKEY_PKCS11_MODULE")
            .env("UKEY_CONFIG", &config)
            .output()
            .expect("run ukey")
    };

    let out = list(&[]);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("No token found"), "{text}");
    assert!(text.contains(&opensc.display().to_string()), "{text}");

    let fx = hsm
        .create_token(&TokenSpec::ukey("Only in SoftHSM2"))
        .unwrap();
    let out = list(&["--json"]);
    assert!(out.status.success(), "{out:?}");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        v["module"]["path"],
        hsm.module_path().display().to_string(),
        "{v}"
    );
    assert_eq!(v["tokens"][0]["serial"], fx.serial.as_str(), "{v}");
}

/// SM2 certificates made by openssl (an SM2 CA signing with the GM ID, and one signing
/// with OpenSSL's default empty ID), written with pkcs11-tool: listed as SM2, and
/// `ukey diagnose` checks their chain against the SM2 CA as OpenSSL does.
#[test]
fn sm2_certificates_are_listed_and_chain_checked_as_openssl_checks_them() {
    use softhsm_fixtures::openssl_sm2::{OpenSslSm2, SignedId};
    let hsm = SoftHsm::new().unwrap();
    let dir = hsm.dir().join("sm2");
    std::fs::create_dir_all(&dir).unwrap();
    run(hsm.command("softhsm2-util").args([
        "--init-token",
        "--free",
        "--label",
        "国密UKey",
        "--pin",
        "654321",
        "--so-pin",
        "87654321",
    ]));
    let o = OpenSslSm2::new(&dir);
    o.ca("ca", "/C=CN/O=测试国密CA/CN=SM2 Root").unwrap();
    // c01: signed with the GM ID; c02: with the empty ID.
    for (id, signed) in [("01", SignedId::Gm), ("02", SignedId::Empty)] {
        let name = format!("c{id}");
        o.leaf("ca", &name, "/C=CN/O=某某建设工程有限公司/CN=张三", signed)
            .unwrap();
        run(hsm
            .command("pkcs11-tool")
            .arg("--module")
            .arg(hsm.module_path())
            .args(["--login", "--pin", "654321", "--write-object"])
            .arg(dir.join(format!("{name}.der")))
            .args([
                "--type",
                "cert",
                "--id",
                id,
                "--label",
                &format!("国密-{id}"),
            ]));
    }
    // OpenSSL's own verdicts, which ours must match.
    assert!(o.verifies_with_gm_id("ca", "c01.pem"));
    assert!(!o.verifies_with_gm_id("ca", "c02.pem"));

    let doc = list_json(&hsm);
    let certs = doc["tokens"][0]["certificates"].as_array().unwrap().clone();
    assert_eq!(certs.len(), 2, "{doc:#}");
    for c in &certs {
        assert_eq!(c["key_algorithm"], "SM2", "{c:#}");
        assert_eq!(
            c["label"],
            format!("国密-{}", c["key_id"].as_str().unwrap())
        );
    }

    let out = hsm
        .command(UKEY)
        .arg("--module")
        .arg(hsm.module_path())
        .args(["diagnose", "--json", "--trust"])
        .arg(dir.join("ca.pem"))
        .env_remove("UKEY_PKCS11_MODULE")
        .env("UKEY_CONFIG", hsm.dir().join("no-config.toml"))
        .env("UKEY_DATA_DIR", hsm.dir().join("data"))
        .output()
        .unwrap();
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)));
    let chain = |serial: &str| {
        report["sections"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["kind"] == "certificate" && s["id"].as_str().unwrap().ends_with(serial))
            .unwrap_or_else(|| panic!("no section for {serial}: {report:#}"))["checks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["id"] == "certificate.chain")
            .expect("chain check")["status"]
            .clone()
    };
    let serial = |f: &str| openssl_serial(&dir.join(f));
    assert_eq!(chain(&serial("c01.pem")), "pass", "{report:#}");
    assert_eq!(chain(&serial("c02.pem")), "fail", "{report:#}");
}
