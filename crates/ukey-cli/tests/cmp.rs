//! `ukey renew --cmp`: the real binary renews a SoftHSM2 key over CMP (RFC 9483)
//! against the reference portal's `/.well-known/cmp`; what lands on the token is read
//! back with OpenSC's `pkcs11-tool` and judged by `openssl verify`. A review makes the
//! renewal wait in its journal; a rejection leaves the token as it was; a run killed at
//! every step (or cut off from the network) finishes on the next.

mod common;

use std::io::Write;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Output, Stdio};
use std::sync::Arc;

use serde_json::Value;
use softhsm_fixtures::{SoftHsm, TokenFixture, TokenSpec, softhsm_module};
use ukey_portal::{Portal, PortalConfig, RunningServer};
use ukey_portal_api::{CreateOrderRequest, InitialState, KeyAlgorithm, KeyPolicy};
use ukey_token::Module;

const UKEY: &str = env!("CARGO_BIN_EXE_ukey");

/// A SoftHSM2 lab, its keys used through ukey-sim (which can pull one out mid-call),
/// with the reference portal (the fixtures' issuing CA) on loopback, which can be
/// stopped and started again on the same port (the network goes down).
struct Lab {
    hsm: SoftHsm,
    control: ukey_sim::Control,
    shim: std::path::PathBuf,
    portal: Arc<Portal>,
    server: Option<RunningServer>,
    addr: std::net::SocketAddr,
    rt: tokio::runtime::Runtime,
    data: tempfile::TempDir,
    _dir: tempfile::TempDir,
}

impl Lab {
    fn new() -> Lab {
        let hsm = SoftHsm::new().unwrap();
        let ca = hsm.ca().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let mut config = PortalConfig::new(dir.path().join("data"));
        config.ca_import = Some((ca.issuing_cert_path.clone(), ca.issuing_key_path.clone()));
        config.cmp.cmp_check_after = 1;
        let portal = Arc::new(Portal::open(&config).unwrap());
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let server = rt
            .block_on(ukey_portal::start(
                Arc::clone(&portal),
                "127.0.0.1:0".parse().unwrap(),
                None,
                None,
            ))
            .unwrap();
        let addr = server.addr;
        let control = ukey_sim::Control::new(hsm.dir().join("ukey-sim-state")).unwrap();
        // A private copy: the shared target directory's module may be rebuilt meanwhile.
        let shim = hsm.dir().join(ukey_sim::module_file_name());
        std::fs::copy(common::shim_module(), &shim).unwrap();
        Lab {
            hsm,
            control,
            shim,
            portal,
            server: Some(server),
            addr,
            rt,
            data: tempfile::tempdir().unwrap(),
            _dir: dir,
        }
    }

    fn cmp_url(&self) -> String {
        format!("http://{}/.well-known/cmp/p/renewal", self.addr)
    }

    fn network_down(&mut self) {
        if let Some(s) = self.server.take() {
            self.rt.block_on(s.stop()).unwrap();
        }
    }

    fn network_up(&mut self) {
        let server = self
            .rt
            .block_on(ukey_portal::start(
                Arc::clone(&self.portal),
                self.addr,
                None,
                None,
            ))
            .unwrap();
        self.server = Some(server);
    }

    /// A token with one RSA signing certificate and a ready order for it.
    fn token(&self, label: &str, policy: KeyPolicy) -> (TokenFixture, String) {
        let fx = self.hsm.create_token(&TokenSpec::ukey(label)).unwrap();
        let order = self
            .portal
            .create_order(&CreateOrderRequest {
                serial_hex: fx.certs[0].serial_hex.clone(),
                issuer_der: None,
                issuer_dn: None,
                years: 1,
                state: InitialState::Ready,
                key_policy: policy,
                with_encryption_cert: false,
                target_algorithm: KeyAlgorithm::Rsa2048,
                old_encryption_serial_hex: None,
            })
            .unwrap()
            .order_id;
        (fx, order)
    }

    /// `ukey renew --cmp` at the portal, with the fixtures' root as the anchor.
    fn renew(&self, fx: &TokenFixture, failpoint: Option<&str>, extra: &[&str]) -> Output {
        let root = self.hsm.ca().unwrap().root_cert_path.clone();
        self.renew_with(fx, &self.cmp_url(), &root, failpoint, extra)
    }

    /// `ukey renew --cmp <url> --trust <trust>`, `UKEY_FAILPOINT` set when given.
    fn renew_with(
        &self,
        fx: &TokenFixture,
        url: &str,
        trust: &Path,
        failpoint: Option<&str>,
        extra: &[&str],
    ) -> Output {
        self.renew_over("--cmp", fx, url, trust, failpoint, extra)
    }

    /// `ukey renew` over REST (`--portal`) at the portal.
    fn renew_rest(&self, fx: &TokenFixture, extra: &[&str]) -> Output {
        let root = self.hsm.ca().unwrap().root_cert_path.clone();
        let url = format!("http://{}", self.addr);
        self.renew_over("--portal", fx, &url, &root, None, extra)
    }

    /// `ukey renew <flag> <url> --trust <trust>`: `flag` is `--cmp` or `--portal`.
    fn renew_over(
        &self,
        flag: &str,
        fx: &TokenFixture,
        url: &str,
        trust: &Path,
        failpoint: Option<&str>,
        extra: &[&str],
    ) -> Output {
        let mut cmd = self.ukey();
        cmd.args(["renew", flag, url, "--token", &fx.serial])
            .args(["--pin-stdin", "--yes", "--json", "--trust"])
            .arg(trust)
            .args(extra)
            .env_remove("UKEY_PKCS11_MODULE")
            .env_remove("UKEY_FAILPOINT")
            .env("UKEY_CONFIG", self.hsm.dir().join("no-config.toml"))
            .env("UKEY_DATA_DIR", self.data.path())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(p) = failpoint {
            cmd.env("UKEY_FAILPOINT", p);
        }
        let mut child = cmd.spawn().unwrap();
        let _ = writeln!(child.stdin.take().unwrap(), "{}", fx.user_pin);
        child.wait_with_output().unwrap()
    }

    /// `ukey --module <ukey-sim>`, the keys behind it in SoftHSM2.
    fn ukey(&self) -> std::process::Command {
        let mut cmd = self.hsm.command(UKEY);
        cmd.arg("--module")
            .arg(&self.shim)
            .env(ukey_sim::STATE_ENV, self.control.dir())
            .env(ukey_sim::BACKEND_ENV, softhsm_module().unwrap());
        cmd
    }

    fn state(&self, order: &str) -> String {
        self.portal.show_order(order).unwrap().state
    }
}

fn text(out: &Output) -> String {
    format!(
        "status {:?}\nstdout {}\nstderr {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn json(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(out)))
}

/// The serials of the signing certificates on the token whose key pair works (the
/// private key under the certificate's CKA_ID signs, the certificate verifies it), and
/// every object (kind, id, label, value), read with SoftHSM2 directly.
/// An object as compared before and after: kind, CKA_ID, label, value.
type Object = (String, String, String, String);

fn look(fx: &TokenFixture) -> (Vec<String>, Vec<Object>) {
    let module = Module::load(&softhsm_module().unwrap()).unwrap();
    let (objects, working) = common::working_signing_certs(&module, &fx.serial, &fx.user_pin);
    let all = objects
        .iter()
        .map(|o| {
            (
                format!("{:?}", o.kind),
                o.id_hex.clone(),
                o.label.clone(),
                o.value_hex.clone(),
            )
        })
        .collect();
    (working, all)
}

/// The certificate at the old CKA_ID, exported with OpenSC's pkcs11-tool (DER).
fn exported_by_pkcs11_tool(lab: &Lab, fx: &TokenFixture, dir: &Path) -> Vec<u8> {
    let out = dir.join("exported.der");
    let status = lab
        .hsm
        .command("pkcs11-tool")
        .arg("--module")
        .arg(lab.hsm.module_path())
        .args([
            "--token-label",
            &fx.label,
            "--read-object",
            "--type",
            "cert",
        ])
        .args(["--id", &hex::encode(&fx.certs[0].key_id), "--output-file"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(status.status.success(), "{status:?}");
    std::fs::read(out).unwrap()
}

fn openssl_verify(lab: &Lab, der: &[u8], dir: &Path) -> String {
    let ca = lab.hsm.ca().unwrap();
    let cert = dir.join("cert.der");
    std::fs::write(&cert, der).unwrap();
    let pem = dir.join("cert.pem");
    let conv = std::process::Command::new("openssl")
        .args(["x509", "-inform", "DER", "-in"])
        .arg(&cert)
        .arg("-out")
        .arg(&pem)
        .output()
        .unwrap();
    assert!(conv.status.success(), "{conv:?}");
    let out = std::process::Command::new("openssl")
        .arg("verify")
        .arg("-CAfile")
        .arg(&ca.root_cert_path)
        .arg("-untrusted")
        .arg(&ca.issuing_cert_path)
        .arg(&pem)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

#[test]
fn renews_over_cmp_and_the_token_holds_a_certificate_openssl_verifies() {
    let lab = Lab::new();
    let (fx, order) = lab.token("CMP renew", KeyPolicy::New);
    let out = lab.renew(&fx, None, &[]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let v = json(&out);
    assert_eq!(v["status"], "renewed", "{v}");
    let new_serial = v["new_serial"].as_str().unwrap().to_owned();
    assert_ne!(new_serial, fx.certs[0].serial_hex);

    // What pkcs11-tool reads at the key's id is the new certificate, and OpenSSL
    // verifies it up to the fixtures' root.
    let dir = tempfile::tempdir().unwrap();
    let der = exported_by_pkcs11_tool(&lab, &fx, dir.path());
    let d = ukey_token::CertificateDetails::from_der(&der).unwrap();
    assert_eq!(d.serial, new_serial);
    let verdict = openssl_verify(&lab, &der, dir.path());
    assert!(verdict.contains(": OK"), "{verdict}");
    let (working, _) = look(&fx);
    assert_eq!(
        working,
        vec![new_serial.clone()],
        "only the new certificate"
    );

    // certConf reached the portal: the order is completed, the old certificate revoked.
    assert_eq!(lab.state(&order), "completed");
    let crl = lab.portal.crl().unwrap();
    let crl_text = {
        let p = dir.path().join("crl.der");
        std::fs::write(&p, &crl).unwrap();
        let o = std::process::Command::new("openssl")
            .args(["crl", "-inform", "DER", "-noout", "-text", "-in"])
            .arg(&p)
            .output()
            .unwrap();
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    assert!(
        crl_text.contains(&fx.certs[0].serial_hex),
        "old serial revoked:\n{crl_text}"
    );
}

#[test]
fn a_same_key_reissue_over_cmp_keeps_the_key() {
    let lab = Lab::new();
    let (fx, order) = lab.token("CMP same key", KeyPolicy::Same);
    let (_, before) = look(&fx);
    let out = lab.renew(&fx, None, &["--same-key", "--cmp-request", "cr"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let v = json(&out);
    let (working, after) = look(&fx);
    assert_eq!(working, vec![v["new_serial"].as_str().unwrap().to_owned()]);
    let keys = |objs: &[Object]| {
        objs.iter()
            .filter(|o| o.0.contains("Key"))
            .map(|o| (o.0.clone(), o.1.clone()))
            .collect::<Vec<_>>()
    };
    assert_eq!(keys(&after), keys(&before), "the same key pair, untouched");
    assert_eq!(lab.state(&order), "completed");
}

#[test]
fn a_review_waits_in_the_journal_and_a_rejection_leaves_the_token_as_it_was() {
    let lab = Lab::new();
    let (fx, order) = lab.token("CMP review", KeyPolicy::New);
    lab.portal.review(&order).unwrap();
    let out = lab.renew(&fx, None, &["--cmp-wait", "2"]);
    assert_eq!(out.status.code(), Some(6), "{}", text(&out));
    let v = json(&out);
    assert_eq!(v["error"]["code"], "under_review", "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("under review"),
        "{v}"
    );
    let (working, _) = look(&fx);
    assert_eq!(working, vec![fx.certs[0].serial_hex.clone()]);
    // Approved: the next run resumes the same transaction and finishes.
    lab.portal.approve(&order).unwrap();
    let out = lab.renew(&fx, None, &[]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let v = json(&out);
    assert_eq!(v["resumed"], true, "{v}");
    assert_eq!(lab.state(&order), "completed");

    // Rejected after a review: the reviewer's reason, and the token byte for byte.
    let (fx, order) = lab.token("CMP rejected", KeyPolicy::New);
    lab.portal.review(&order).unwrap();
    lab.portal
        .reject(&order, "营业执照已过期 business licence expired")
        .unwrap();
    let (_, before) = look(&fx);
    let out = lab.renew(&fx, None, &[]);
    assert_eq!(out.status.code(), Some(6), "{}", text(&out));
    let v = json(&out);
    assert_eq!(v["error"]["code"], "rejected", "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("business licence expired"),
        "{v}"
    );
    let (_, after) = look(&fx);
    assert_eq!(after, before, "the token is unchanged");
}

/// A resumed run `out` finished the renewal: renewed, only the new certificate works,
/// no pending objects, the order completed (certConf reached the portal).
fn finished(lab: &Lab, fx: &TokenFixture, order: &str, out: &Output, what: &str) {
    assert_eq!(out.status.code(), Some(0), "{what}: {}", text(out));
    let v = json(out);
    assert_eq!(v["status"], "renewed", "{what}: {v}");
    let (working, objects) = look(fx);
    assert_eq!(
        working,
        vec![v["new_serial"].as_str().unwrap().to_owned()],
        "{what}: only the new certificate works"
    );
    assert!(
        !objects
            .iter()
            .any(|o| o.2.starts_with(ukey_renewal::PENDING_LABEL_PREFIX)),
        "{what}: pending objects left: {objects:?}"
    );
    assert_eq!(lab.state(order), "completed", "{what}");
}

/// Every fail point a CMP renewal passes (the REST protocol's `installed` step is not
/// run: certConf is sent before activation), and inside the transaction.
fn cmp_crash_points() -> Vec<String> {
    let mut points: Vec<String> = common::crash_points()
        .into_iter()
        .filter(|p| !p.starts_with("installed") && !p.starts_with("write.unwrap"))
        .collect();
    points.extend(
        ["request.cmp:answered", "confirm:before", "confirm:after"]
            .into_iter()
            .map(str::to_owned),
    );
    points
}

#[test]
fn killed_at_every_step_of_a_cmp_renewal_then_resumed() {
    let lab = Lab::new();
    let points = cmp_crash_points();
    for (i, point) in points.iter().enumerate() {
        let (fx, order) = lab.token(&format!("CMP crash {i}"), KeyPolicy::New);
        let out = lab.renew(&fx, Some(point), &[]);
        assert_eq!(out.status.signal(), Some(6), "{point}: {}", text(&out));
        let (working, objects) = look(&fx);
        assert!(!working.is_empty(), "{point}: nothing works: {objects:?}");
        finished(&lab, &fx, &order, &lab.renew(&fx, None, &[]), point);
    }
    println!("CMP crash points covered: {}", points.len());
}

#[test]
fn the_network_down_mid_renewal_then_back_finishes_it() {
    let mut lab = Lab::new();
    // Killed before the certConf goes; then the CA is unreachable; then it is back.
    let (fx, order) = lab.token("CMP network", KeyPolicy::New);
    let out = lab.renew(&fx, Some("confirm:before"), &[]);
    assert_eq!(out.status.signal(), Some(6), "{}", text(&out));
    lab.network_down();
    let out = lab.renew(&fx, None, &[]);
    assert_eq!(out.status.code(), Some(7), "{}", text(&out));
    let v = json(&out);
    assert!(
        v["error"]["code"].as_str().unwrap().starts_with("portal"),
        "{v}"
    );
    let (working, _) = look(&fx);
    assert!(
        working.contains(&fx.certs[0].serial_hex),
        "the old one works (the new one waits under its pending id): {working:?}"
    );
    assert_eq!(
        lab.state(&order),
        "issued",
        "not confirmed while unreachable"
    );
    lab.network_up();
    let out = lab.renew(&fx, None, &[]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(lab.state(&order), "completed");
}

/// OpenSSL 3's own CMP server (`openssl cmp -port`, its mock CA) answering every
/// request with `rsp_cert`; its protection certificate is issued by the fixtures'
/// issuing CA. Stopped when dropped.
struct Mock {
    child: std::process::Child,
    url: String,
}

impl Drop for Mock {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = std::process::Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// In `dir`: the mock's key and certificate, the CA bundle it trusts clients by, and
/// `reissue.pem`: the token's certificate issued again by the same CA, same serial and
/// key, a later end (what a 3.0 mock answers a KUR naming that issuer and serial with).
fn mock_pki(lab: &Lab, fx: &TokenFixture, dir: &Path) {
    let ca = lab.hsm.ca().unwrap();
    std::fs::copy(&ca.issuing_cert_path, dir.join("issuing.pem")).unwrap();
    std::fs::copy(&ca.issuing_key_path, dir.join("issuing.key")).unwrap();
    std::fs::write(
        dir.join("trusted.pem"),
        format!("{}{}", ca.root_cert_pem, ca.issuing_cert_pem),
    )
    .unwrap();
    std::fs::write(
        dir.join("leaf.ext"),
        "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,nonRepudiation\n",
    )
    .unwrap();
    std::fs::write(dir.join("old.der"), &fx.certs[0].der).unwrap();
    openssl(
        dir,
        &[
            "x509", "-inform", "DER", "-in", "old.der", "-out", "old.pem",
        ],
    );
    let serial = format!("0x{}", fx.certs[0].serial_hex);
    let out = std::process::Command::new("openssl")
        .args(["x509", "-in", "old.pem", "-noout", "-pubkey"])
        .current_dir(dir)
        .output()
        .unwrap();
    std::fs::write(dir.join("old.pub"), out.stdout).unwrap();
    // The subject as UTF-8 through a throwaway request; the token's key forced in.
    #[rustfmt::skip]
    openssl(dir, &["req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-keyout", "throwaway.key", "-utf8", "-subj", "/C=CN/O=某某建设工程有限公司/CN=张三",
        "-out", "reissue.csr"]);
    #[rustfmt::skip]
    openssl(dir, &["x509", "-req", "-in", "reissue.csr", "-force_pubkey", "old.pub",
        "-CA", "issuing.pem", "-CAkey", "issuing.key",
        "-set_serial", &serial, "-days", "400", "-extfile", "leaf.ext", "-out", "reissue.pem"]);
    openssl(
        dir,
        &[
            "x509",
            "-in",
            "reissue.pem",
            "-outform",
            "DER",
            "-out",
            "reissue.der",
        ],
    );
    #[rustfmt::skip]
    openssl(dir, &["genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", "srv.key"]);
    #[rustfmt::skip]
    openssl(dir, &["req", "-new", "-key", "srv.key", "-subj", "/CN=Mock CMP server", "-out", "srv.csr"]);
    #[rustfmt::skip]
    openssl(dir, &["x509", "-req", "-in", "srv.csr", "-CA", "issuing.pem", "-CAkey", "issuing.key",
        "-set_serial", "0x5151", "-days", "30", "-extfile", "leaf.ext", "-out", "srv.pem"]);
}

fn mock(dir: &Path, extra: &[&str]) -> Mock {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = std::process::Command::new("openssl")
        .args(["cmp", "-port", &port.to_string()])
        .args(["-srv_cert", "srv.pem", "-srv_key", "srv.key"])
        .args(["-srv_trusted", "trusted.pem", "-rsp_cert", "reissue.pem"])
        .args([
            "-rsp_extracerts",
            "issuing.pem",
            "-srv_untrusted",
            "issuing.pem",
        ])
        .args(extra)
        .current_dir(dir)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("mock.log")).unwrap())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "the mock did not start"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    Mock {
        child,
        url: format!("http://127.0.0.1:{port}/"),
    }
}

#[test]
fn against_openssls_mock_a_same_key_kur_and_a_cr_end_with_the_mocks_certificate_on_the_token() {
    let lab = Lab::new();
    let root = lab.hsm.ca().unwrap().root_cert_path.clone();
    for request in ["kur", "cr"] {
        let (fx, _) = lab.token(&format!("Mock {request}"), KeyPolicy::Same);
        let dir = tempfile::tempdir().unwrap();
        mock_pki(&lab, &fx, dir.path());
        let m = mock(dir.path(), &[]);
        let out = lab.renew_with(
            &fx,
            &m.url,
            &root,
            None,
            &["--same-key", "--cmp-request", request],
        );
        assert_eq!(
            out.status.code(),
            Some(0),
            "{request}: {}\nmock: {}",
            text(&out),
            std::fs::read_to_string(dir.path().join("mock.log")).unwrap_or_default()
        );
        // The token holds exactly the mock's certificate, as pkcs11-tool reads it.
        let exported = exported_by_pkcs11_tool(&lab, &fx, dir.path());
        assert_eq!(
            exported,
            std::fs::read(dir.path().join("reissue.der")).unwrap(),
            "{request}"
        );
        let (working, _) = look(&fx);
        assert_eq!(working, vec![fx.certs[0].serial_hex.clone()], "{request}");
        let log = std::fs::read_to_string(dir.path().join("mock.log")).unwrap_or_default();
        // The request and, once the certificate was written and tested, the certConf
        // (the run ends only on the mock's pkiConf).
        assert_eq!(
            log.matches("Received request").count(),
            2,
            "{request}: the mock's log:\n{log}"
        );
    }
}

#[test]
fn against_openssls_mock_refused_answers_leave_the_token_byte_for_byte() {
    let lab = Lab::new();
    let root = lab.hsm.ca().unwrap().root_cert_path.clone();
    let stranger = tempfile::tempdir().unwrap();
    #[rustfmt::skip]
    openssl(stranger.path(), &["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
        "-nodes", "-keyout", "k.pem", "-subj", "/CN=Stranger root", "-days", "30", "-out", "root.pem",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign"]);
    // (case, mock options, ukey options, whether the real root is the anchor, what
    // the refusal says)
    type Case<'a> = (&'a str, Vec<&'a str>, Vec<&'a str>, bool, &'a str);
    let cases: Vec<Case> = vec![
        // A new key was asked for; the mock's certificate carries the old one.
        ("another key", vec![], vec![], true, "for another key"),
        (
            "unprotected",
            vec!["-send_unprotected"],
            vec!["--same-key"],
            true,
            "not protected",
        ),
        (
            "an error message",
            vec!["-send_error"],
            vec!["--same-key"],
            true,
            "answered with an error",
        ),
        (
            "untrusted protection",
            vec![],
            vec!["--same-key"],
            false,
            "do not trust",
        ),
    ];
    for (i, (what, mock_args, args, trusted, said)) in cases.into_iter().enumerate() {
        let (fx, _) = lab.token(&format!("Refused {i}"), KeyPolicy::New);
        let dir = tempfile::tempdir().unwrap();
        mock_pki(&lab, &fx, dir.path());
        let m = mock(dir.path(), &mock_args);
        let (_, before) = look(&fx);
        let anchor = if trusted {
            root.clone()
        } else {
            stranger.path().join("root.pem")
        };
        let out = lab.renew_with(&fx, &m.url, &anchor, None, &args);
        assert_eq!(out.status.code(), Some(7), "{what}: {}", text(&out));
        let v = json(&out);
        assert_eq!(v["error"]["code"], "certificate_refused", "{what}: {v}");
        assert!(
            v["error"]["message"].as_str().unwrap().contains(said),
            "{what}: {v}"
        );
        let (_, after) = look(&fx);
        assert_eq!(after, before, "{what}: the token is unchanged");
    }
}

/// The mock server's key (P-256) signing a test CA's answers.
struct PemKey(rcgen::KeyPair);

impl ukey_cmp::CmpSigner for PemKey {
    fn algorithm(&self) -> ukey_cmp::spki::AlgorithmIdentifierOwned {
        ukey_cmp::signature_algorithm(&rcgen::PublicKeyData::subject_public_key_info(&self.0))
            .unwrap()
    }
    fn sign(&self, data: &[u8]) -> ukey_cmp::Result<Vec<u8>> {
        Ok(rcgen::SigningKey::sign(&self.0, data).unwrap())
    }
}

/// A CA whose answers the test shapes (OpenSSL's mock cannot answer for another
/// transaction or nonce): it reads each request and answers what `shape` makes of it,
/// protected with the mock's certificate (which the client trusts), over plain HTTP/1.1.
fn shaped_ca(
    dir: &Path,
    shape: impl Fn(&ukey_cmp::server::AnswerTo) -> (ukey_cmp::server::AnswerTo, Vec<u8>)
    + Send
    + 'static,
) -> String {
    use std::io::{BufRead, BufReader, Read};
    let key = PemKey(
        rcgen::KeyPair::from_pem(&std::fs::read_to_string(dir.join("srv.key")).unwrap()).unwrap(),
    );
    let pem_der = |f: &str| {
        pem::parse(std::fs::read(dir.join(f)).unwrap())
            .unwrap()
            .into_contents()
    };
    let cert = pem_der("srv.pem");
    let chain = vec![pem_der("issuing.pem")];
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut out = stream;
            loop {
                let mut len = None;
                let mut line = String::new();
                // Request line and headers.
                loop {
                    line.clear();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 {
                        break;
                    }
                    let l = line.trim_end();
                    if l.is_empty() {
                        break;
                    }
                    if let Some(v) = l.to_ascii_lowercase().strip_prefix("content-length:") {
                        len = v.trim().parse::<usize>().ok();
                    }
                }
                let Some(len) = len else { break };
                let mut body = vec![0u8; len];
                if reader.read_exact(&mut body).is_err() {
                    break;
                }
                let to = match ukey_cmp::server::read(&body) {
                    Ok((_, to)) | Err((_, to)) => to,
                };
                let (to, cert_der) = shape(&to);
                let nonce = vec![0x5a; 16];
                let answer = ukey_cmp::server::answer(
                    &to,
                    &nonce,
                    &ukey_cmp::server::Outcome::Issued {
                        kind: ukey_cmp::server::CertReqKind::KeyUpdate,
                        cert_req_id: vec![0],
                        cert_der,
                    },
                    false,
                    &ukey_cmp::server::Protection {
                        signer: &key,
                        cert_der: &cert,
                        chain_der: &chain,
                    },
                )
                .unwrap();
                let head = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/pkixcmp\r\nContent-Length: {}\r\n\r\n",
                    answer.len()
                );
                if out.write_all(head.as_bytes()).is_err() || out.write_all(&answer).is_err() {
                    break;
                }
            }
        }
    });
    url
}

#[test]
fn answers_for_another_transaction_nonce_or_subject_leave_the_token_byte_for_byte() {
    let lab = Lab::new();
    let root = lab.hsm.ca().unwrap().root_cert_path.clone();
    type Shape = fn(&ukey_cmp::server::AnswerTo, &Path) -> (ukey_cmp::server::AnswerTo, Vec<u8>);
    let cases: Vec<(&str, Shape, &str)> = vec![
        (
            "another transaction",
            |to, dir| {
                let mut to = to.clone();
                to.transaction_id = Some(vec![1; 16]);
                (to, std::fs::read(dir.join("reissue.der")).unwrap())
            },
            "transactionID",
        ),
        (
            "another nonce",
            |to, dir| {
                let mut to = to.clone();
                to.recip_nonce = Some(vec![2; 16]);
                (to, std::fs::read(dir.join("reissue.der")).unwrap())
            },
            "recipNonce",
        ),
        (
            "another subject",
            |to, dir| (to.clone(), std::fs::read(dir.join("stranger.der")).unwrap()),
            "another subject",
        ),
    ];
    for (i, (what, shape, said)) in cases.into_iter().enumerate() {
        let (fx, _) = lab.token(&format!("Shaped {i}"), KeyPolicy::Same);
        let dir = tempfile::tempdir().unwrap();
        mock_pki(&lab, &fx, dir.path());
        // The token's key, certified for someone else by the same CA.
        let d = dir.path();
        #[rustfmt::skip]
        openssl(d, &["req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", "t2.key", "-utf8", "-subj", "/C=CN/O=另一家公司/CN=李四", "-out", "stranger.csr"]);
        #[rustfmt::skip]
        openssl(d, &["x509", "-req", "-in", "stranger.csr", "-force_pubkey", "old.pub",
            "-CA", "issuing.pem", "-CAkey", "issuing.key", "-set_serial", "0x7777", "-days", "400",
            "-extfile", "leaf.ext", "-outform", "DER", "-out", "stranger.der"]);
        let owned = d.to_owned();
        let url = shaped_ca(d, move |to| shape(to, &owned));
        let (_, before) = look(&fx);
        let out = lab.renew_with(&fx, &url, &root, None, &["--same-key"]);
        assert_eq!(out.status.code(), Some(7), "{what}: {}", text(&out));
        let v = json(&out);
        assert_eq!(v["error"]["code"], "certificate_refused", "{what}: {v}");
        assert!(
            v["error"]["message"].as_str().unwrap().contains(said),
            "{what}: {v}"
        );
        let (_, after) = look(&fx);
        assert_eq!(after, before, "{what}: the token is unchanged");
    }
}

#[test]
fn the_key_pulled_out_while_it_signs_for_the_cmp_transaction_then_back_finishes_it() {
    let lab = Lab::new();
    // The renewal's signatures, in order: the new key's proof of possession, the old
    // key's protection of the kur, the new key's self-test, the old key's protection of
    // the certConf. The key is pulled out in each.
    for (nth, what) in [
        (1, "proof of possession"),
        (2, "kur protection"),
        (3, "self-test"),
        (4, "certConf protection"),
    ] {
        let (fx, order) = lab.token(&format!("CMP pulled {nth}"), KeyPolicy::New);
        lab.control
            .add_fault(&fx.serial, ukey_sim::Fault::unplug("C_Sign", nth))
            .unwrap();
        let out = lab.renew(&fx, None, &[]);
        assert_eq!(out.status.code(), Some(7), "{what}: {}", text(&out));
        let v = json(&out);
        assert_eq!(v["error"]["code"], "token_removed", "{what}: {v}");
        lab.control.clear_faults(&fx.serial).unwrap();
        lab.control.plug(&fx.serial).unwrap();
        let (working, _) = look(&fx);
        assert!(
            working.contains(&fx.certs[0].serial_hex),
            "{what}: the old certificate works: {working:?}"
        );
        finished(&lab, &fx, &order, &lab.renew(&fx, None, &[]), what);
    }
}

/// Issue 16, "a moment of access must not become a year": malware that holds the PIN
/// and the key for a few seconds runs the renewal without the order's renewal code
/// (shown only on the holder's paid order page). Over REST and over CMP, `ukey renew`
/// without the code, or with a wrong one, leaves the token byte for byte and the order
/// unissued; with the code (as the page shows it) the renewal goes through.
#[test]
fn without_the_orders_renewal_code_nothing_is_issued_over_rest_or_cmp() {
    let lab = Lab::new();
    lab.portal.set_renewal_code_required(true).unwrap();

    // REST.
    let (fx, order) = lab.token("Code REST", KeyPolicy::New);
    let code = lab.portal.show_order(&order).unwrap().renewal_code.unwrap();
    let (_, before) = look(&fx);
    let out = lab.renew_rest(&fx, &[]);
    assert_eq!(out.status.code(), Some(6), "{}", text(&out));
    let v = json(&out);
    assert_eq!(v["error"]["code"], "renewal_code_needed", "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("--renewal-code"),
        "{v}"
    );
    let wrong = if code == "12345678" {
        "8765-4321"
    } else {
        "1234-5678"
    };
    let out = lab.renew_rest(&fx, &["--renewal-code", wrong]);
    assert_eq!(out.status.code(), Some(7), "{}", text(&out));
    assert!(text(&out).contains("wrong renewal code"), "{}", text(&out));
    let (_, after) = look(&fx);
    assert_eq!(after, before, "the token is unchanged");
    assert_eq!(lab.state(&order), "ready");
    let typed = format!("{} {}", &code[..4], &code[4..]);
    let out = lab.renew_rest(&fx, &["--renewal-code", &typed]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(lab.state(&order), "completed");
    let (working, _) = look(&fx);
    assert_eq!(working.len(), 1);
    assert_ne!(
        working[0], fx.certs[0].serial_hex,
        "the new certificate works"
    );

    // CMP: the code travels in generalInfo.
    let (fx, order) = lab.token("Code CMP", KeyPolicy::New);
    let code = lab.portal.show_order(&order).unwrap().renewal_code.unwrap();
    let (_, before) = look(&fx);
    let out = lab.renew(&fx, None, &[]);
    assert_ne!(out.status.code(), Some(0), "{}", text(&out));
    assert!(text(&out).contains("renewal code"), "{}", text(&out));
    let (_, after) = look(&fx);
    assert_eq!(after, before, "the token is unchanged");
    assert_eq!(lab.state(&order), "ready");
    let out = lab.renew(&fx, None, &["--renewal-code", &code]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(lab.state(&order), "completed");
}
