//! The client's messages against OpenSSL 3's own CMP server (`openssl cmp -port`, its
//! mock CA): a same-key `kur` for a reissue of the old certificate, a `cr` protected by
//! the old certificate, the `certConf` / `pkiConf` that end each, and the answers
//! refused: unprotected, protected by a certificate nobody trusts, for another
//! transaction or nonce, an error message, a rejection with its reason.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use spki::AlgorithmIdentifierOwned;
use ukey_cmp::{Answer, CmpError, CmpSigner, RequestKind, Transaction};

struct Dir(tempfile::TempDir);

impl Dir {
    fn path(&self, f: &str) -> PathBuf {
        self.0.path().join(f)
    }

    fn openssl(&self, args: &[&str]) {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(self.0.path())
            .output()
            .expect("openssl");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn read(&self, f: &str) -> Vec<u8> {
        std::fs::read(self.path(f)).expect("read")
    }
}

/// An EC P-256 CA, the holder's old certificate (serial 0x1234) and key, a reissue of it
/// (same serial and key, a later end), a certificate for another key, and the mock
/// server's own certificate.
fn pki() -> Dir {
    let d = Dir(tempfile::tempdir().expect("temp dir"));
    std::fs::write(
        d.path("ca.ext"),
        "basicConstraints=critical,CA:TRUE\nkeyUsage=critical,keyCertSign,cRLSign\n",
    )
    .expect("ext");
    std::fs::write(
        d.path("leaf.ext"),
        "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n",
    )
    .expect("ext");
    for ca in ["ca", "otherca"] {
        d.openssl(&[
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-out",
            &format!("{ca}.key"),
        ]);
        d.openssl(&[
            "req",
            "-x509",
            "-new",
            "-key",
            &format!("{ca}.key"),
            "-subj",
            &format!("/CN=Test {ca}"),
            "-days",
            "30",
            "-out",
            &format!("{ca}.pem"),
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ]);
    }
    for (name, ca) in [
        ("old", "ca"),
        ("other", "ca"),
        ("srv", "ca"),
        ("rogue", "otherca"),
    ] {
        d.openssl(&[
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-out",
            &format!("{name}.key"),
        ]);
        d.openssl(&[
            "req",
            "-new",
            "-key",
            &format!("{name}.key"),
            "-utf8",
            "-subj",
            &format!("/O=某某公司/CN={name}"),
            "-out",
            &format!("{name}.csr"),
        ]);
        let serial = if name == "old" { "0x1234" } else { "0x2222" };
        d.openssl(&[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            &format!("{ca}.pem"),
            "-CAkey",
            &format!("{ca}.key"),
            "-set_serial",
            serial,
            "-days",
            "10",
            "-extfile",
            "leaf.ext",
            "-out",
            &format!("{name}.pem"),
        ]);
    }
    // The reissue the mock returns for a KUR: same issuer, serial and key, later end.
    d.openssl(&[
        "x509",
        "-req",
        "-in",
        "old.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-set_serial",
        "0x1234",
        "-days",
        "400",
        "-extfile",
        "leaf.ext",
        "-out",
        "reissue.pem",
    ]);
    for name in ["old", "reissue", "other", "srv", "ca", "otherca", "rogue"] {
        d.openssl(&[
            "x509",
            "-in",
            &format!("{name}.pem"),
            "-outform",
            "DER",
            "-out",
            &format!("{name}.der"),
        ]);
    }
    d.openssl(&[
        "pkcs8", "-topk8", "-nocrypt", "-in", "old.key", "-outform", "DER", "-out", "old.p8",
    ]);
    d.openssl(&[
        "pkey", "-in", "old.key", "-pubout", "-outform", "DER", "-out", "old.spki",
    ]);
    d
}

/// A software P-256 key signing CMP data.
struct SoftKey(aws_lc_rs::signature::EcdsaKeyPair);

impl SoftKey {
    fn load(p8: &[u8]) -> SoftKey {
        SoftKey(
            aws_lc_rs::signature::EcdsaKeyPair::from_pkcs8(
                &aws_lc_rs::signature::ECDSA_P256_SHA256_ASN1_SIGNING,
                p8,
            )
            .expect("key"),
        )
    }
}

impl CmpSigner for SoftKey {
    fn algorithm(&self) -> AlgorithmIdentifierOwned {
        AlgorithmIdentifierOwned {
            oid: ukey_cmp::ECDSA_WITH_SHA256,
            parameters: None,
        }
    }
    fn sign(&self, data: &[u8]) -> ukey_cmp::Result<Vec<u8>> {
        let rng = aws_lc_rs::rand::SystemRandom::new();
        self.0
            .sign(&rng, data)
            .map(|s| s.as_ref().to_vec())
            .map_err(|e| CmpError::Signing(e.to_string()))
    }
}

/// `openssl cmp -port` serving `rsp_cert`, with `extra` options; stopped on drop. One
/// HTTP client per server, as a CMP client keeps its connection for a transaction
/// (OpenSSL's server ends a transaction whose persistent connection closes).
struct Mock {
    child: Child,
    client: ukey_portal_client::PortalClient,
}

impl Drop for Mock {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn mock(d: &Dir, rsp_cert: &str, extra: &[&str]) -> Mock {
    let port = TcpListener::bind("127.0.0.1:0")
        .expect("port")
        .local_addr()
        .expect("addr")
        .port();
    let child = Command::new("openssl")
        .args([
            "cmp",
            "-port",
            &port.to_string(),
            "-srv_cert",
            "srv.pem",
            "-srv_key",
            "srv.key",
        ])
        .args(["-srv_trusted", "ca.pem", "-rsp_cert", rsp_cert])
        .args(extra)
        .current_dir(d.0.path())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(d.path("mock.log")).expect("log"))
        .spawn()
        .expect("openssl cmp -port");
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "the mock CMP server did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    Mock {
        child,
        client: ukey_portal_client::PortalClient::new(&format!("http://127.0.0.1:{port}"))
            .expect("client"),
    }
}

fn trust_in(d: &Dir, anchor: &str) -> impl Fn(&[u8], &[Vec<u8>]) -> ukey_cmp::Result<()> {
    let anchor = d.read(anchor);
    move |cert, extra| {
        ukey_trust::chain::verify(
            cert,
            extra,
            std::slice::from_ref(&anchor),
            time::OffsetDateTime::now_utc(),
        )
        .map(drop)
        .map_err(|e| CmpError::Untrusted(e.explain(false)))
    }
}

fn exchange(m: &Mock, msg: &[u8]) -> Vec<u8> {
    m.client.cmp("/", msg).expect("CMP answer").value
}

#[test]
fn a_same_key_kur_is_answered_with_the_reissue_then_confirmed() {
    let d = pki();
    let m = mock(&d, "reissue.pem", &[]);
    let key = SoftKey::load(&d.read("old.p8"));
    let mut tx = Transaction::new().expect("tx");
    let req = ukey_cmp::request(
        RequestKind::KeyUpdate,
        &d.read("old.der"),
        &d.read("old.spki"),
        &key,
        &key,
        &tx,
    )
    .expect("kur");
    let rsp = exchange(&m, &req);
    let msg =
        ukey_cmp::check_answer(&rsp, &mut tx, &trust_in(&d, "ca.der")).expect("a checked answer");
    let Answer::Issued {
        cert_der,
        cert_req_id,
        ..
    } = ukey_cmp::answer(&msg).expect("answer")
    else {
        panic!("not issued: {:?}", ukey_cmp::answer(&msg));
    };
    assert_eq!(cert_der, d.read("reissue.der"));
    let conf = ukey_cmp::cert_conf(&d.read("old.der"), &cert_der, &cert_req_id, &key, &mut tx)
        .expect("certConf");
    let rsp = exchange(&m, &conf);
    let msg =
        ukey_cmp::check_answer(&rsp, &mut tx, &trust_in(&d, "ca.der")).expect("pkiConf checked");
    assert!(
        ukey_cmp::is_pki_conf(&msg),
        "{:?}\n{}",
        ukey_cmp::answer(&msg),
        String::from_utf8_lossy(&d.read("mock.log"))
    );
}

#[test]
fn a_cr_protected_by_the_old_certificate_gets_any_certificate_for_the_key() {
    let d = pki();
    let m = mock(&d, "other.pem", &[]);
    let key = SoftKey::load(&d.read("old.p8"));
    let mut tx = Transaction::new().expect("tx");
    let req = ukey_cmp::request(
        RequestKind::Certification,
        &d.read("old.der"),
        &d.read("old.spki"),
        &key,
        &key,
        &tx,
    )
    .expect("cr");
    let msg_der = exchange(&m, &req);
    let msg = ukey_cmp::check_answer(&msg_der, &mut tx, &trust_in(&d, "ca.der")).expect("checked");
    assert!(
        matches!(ukey_cmp::answer(&msg), Ok(Answer::Issued { cert_der, .. }) if cert_der == d.read("other.der"))
    );
}

#[test]
fn answers_that_are_not_ours_or_not_trusted_are_refused() {
    let d = pki();
    let key = SoftKey::load(&d.read("old.p8"));
    let old = d.read("old.der");
    let spki = d.read("old.spki");
    let m = mock(&d, "reissue.pem", &[]);
    let send = |tx: &Transaction| {
        let req =
            ukey_cmp::request(RequestKind::KeyUpdate, &old, &spki, &key, &key, tx).expect("kur");
        exchange(&m, &req)
    };

    // Another transaction's, another nonce's.
    let tx = Transaction::new().expect("tx");
    let rsp = send(&tx);
    let mut other = Transaction::new().expect("tx");
    assert!(matches!(
        ukey_cmp::check_answer(&rsp, &mut other, &trust_in(&d, "ca.der")),
        Err(CmpError::WrongTransaction)
    ));
    let mut stale = Transaction {
        sender_nonce: vec![7; 16],
        ..tx.clone()
    };
    assert!(matches!(
        ukey_cmp::check_answer(&rsp, &mut stale, &trust_in(&d, "ca.der")),
        Err(CmpError::WrongNonce)
    ));
    // Protected by a certificate that does not chain to what we trust.
    let mut t = tx.clone();
    assert!(matches!(
        ukey_cmp::check_answer(&rsp, &mut t, &trust_in(&d, "otherca.der")),
        Err(CmpError::Untrusted(_))
    ));
    // A byte of the protected part changed.
    let mut bad = rsp.clone();
    let at = bad.len() / 3;
    bad[at] ^= 0x01;
    let mut t = tx.clone();
    assert!(ukey_cmp::check_answer(&bad, &mut t, &trust_in(&d, "ca.der")).is_err());
    drop(m);

    // No protection at all.
    let m = mock(&d, "reissue.pem", &["-send_unprotected"]);
    let mut tx = Transaction::new().expect("tx");
    let req = ukey_cmp::request(RequestKind::KeyUpdate, &old, &spki, &key, &key, &tx).expect("kur");
    let rsp = exchange(&m, &req);
    assert!(matches!(
        ukey_cmp::check_answer(&rsp, &mut tx, &trust_in(&d, "ca.der")),
        Err(CmpError::Protection(_))
    ));
    drop(m);

    // A rejection with its reason, and an error message.
    let m = mock(
        &d,
        "reissue.pem",
        &[
            "-pkistatus",
            "2",
            "-failure",
            "0",
            "-statusstring",
            "营业执照已过期",
        ],
    );
    let mut tx = Transaction::new().expect("tx");
    let req = ukey_cmp::request(RequestKind::KeyUpdate, &old, &spki, &key, &key, &tx).expect("kur");
    let rsp = exchange(&m, &req);
    let msg = ukey_cmp::check_answer(&rsp, &mut tx, &trust_in(&d, "ca.der")).expect("checked");
    match ukey_cmp::answer(&msg) {
        Ok(Answer::Rejected { text }) => assert!(text.contains("营业执照已过期"), "{text}"),
        other => panic!("not a rejection: {other:?}"),
    }
    drop(m);
    let m = mock(
        &d,
        "reissue.pem",
        &["-send_error", "-statusstring", "system failure"],
    );
    let mut tx = Transaction::new().expect("tx");
    let req = ukey_cmp::request(RequestKind::KeyUpdate, &old, &spki, &key, &key, &tx).expect("kur");
    let rsp = exchange(&m, &req);
    let msg = ukey_cmp::check_answer(&rsp, &mut tx, &trust_in(&d, "ca.der")).expect("checked");
    assert!(
        matches!(ukey_cmp::answer(&msg), Ok(Answer::Error { ref text }) if text.contains("error processing message")),
        "{:?}",
        ukey_cmp::answer(&msg)
    );
}

/// A CA that answers "waiting" (a review): the client polls (`pollReq`), told how long
/// to wait (`pollRep` checkAfter), until the certificate comes; then confirms it.
#[test]
fn a_waiting_answer_is_polled_until_the_certificate_comes() {
    let d = pki();
    let m = mock(
        &d,
        "reissue.pem",
        &["-poll_count", "2", "-check_after", "1"],
    );
    let key = SoftKey::load(&d.read("old.p8"));
    let old = d.read("old.der");
    let trust = trust_in(&d, "ca.der");
    let mut tx = Transaction::new().expect("tx");
    let req = ukey_cmp::request(
        RequestKind::KeyUpdate,
        &old,
        &d.read("old.spki"),
        &key,
        &key,
        &tx,
    )
    .expect("kur");
    let rsp = exchange(&m, &req);
    let first = ukey_cmp::answer(&ukey_cmp::check_answer(&rsp, &mut tx, &trust).expect("checked"))
        .expect("answer");
    assert!(matches!(first, Answer::Waiting { .. }), "{first:?}");
    let mut polls = 0;
    let (cert_der, cert_req_id) = loop {
        polls += 1;
        assert!(polls <= 5, "still waiting after {polls} polls");
        let poll = ukey_cmp::poll_req(&old, &[0], &key, &mut tx).expect("pollReq");
        let rsp = exchange(&m, &poll);
        match ukey_cmp::answer(&ukey_cmp::check_answer(&rsp, &mut tx, &trust).expect("checked"))
            .expect("answer")
        {
            Answer::Waiting { check_after, .. } => {
                assert_eq!(check_after, Some(1), "the CA's checkAfter");
            }
            Answer::Issued {
                cert_der,
                cert_req_id,
                ..
            } => break (cert_der, cert_req_id),
            other => panic!("{other:?}"),
        }
    };
    assert_eq!(cert_der, d.read("reissue.der"));
    assert!(polls >= 2, "the CA made the client poll ({polls})");
    let conf = ukey_cmp::cert_conf(&old, &cert_der, &cert_req_id, &key, &mut tx).expect("certConf");
    let rsp = exchange(&m, &conf);
    assert!(ukey_cmp::is_pki_conf(
        &ukey_cmp::check_answer(&rsp, &mut tx, &trust).expect("checked")
    ));
}
