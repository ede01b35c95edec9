//! The client against real HTTP on loopback: the reference portal, and a small axum
//! server that misbehaves.

use std::sync::Arc;

use axum::Router;
use axum::routing::post;
use ukey_portal::{Portal, PortalConfig};
use ukey_portal_api::{ErrorCode, RenewalStatus, StatusRequest};
use ukey_portal_client::{ClientError, PortalClient};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap()
}

fn request() -> StatusRequest {
    StatusRequest {
        issuer_der: None,
        issuer_dn: Some("CN=Nobody".into()),
        serial_hex: "0A12".into(),
    }
}

fn serve(rt: &tokio::runtime::Runtime, app: Router) -> String {
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    rt.spawn(async move { axum::serve(listener, app).await });
    url
}

#[test]
fn reference_portal_answers_with_its_date() {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let portal = Arc::new(Portal::open(&PortalConfig::new(dir.path().join("data"))).unwrap());
    let server = rt
        .block_on(ukey_portal::start(
            portal,
            "127.0.0.1:0".parse().unwrap(),
            None,
            None,
        ))
        .unwrap();
    let client = PortalClient::new(&server.url).unwrap();
    let answer = client.status(&request()).unwrap();
    assert_eq!(answer.value, RenewalStatus::None);
    let date = answer.server_date.expect("Date header");
    assert!(
        (time::OffsetDateTime::now_utc() - date)
            .whole_seconds()
            .abs()
            < 5
    );

    // An unknown order: the portal's error code comes through.
    let e = client.challenge("ord_missing").unwrap_err();
    assert_eq!(e.api_code(), Some(ErrorCode::OrderNotFound), "{e}");
    assert!(!e.is_transient());
}

#[test]
fn misbehaving_servers_give_typed_errors() {
    let rt = runtime();
    let app = Router::new()
        .route("/api/v1/status", post(|| async { "not json at all" }))
        .route(
            "/api/v1/orders/{id}/challenge",
            post(|| async { (axum::http::StatusCode::BAD_GATEWAY, "<html>proxy</html>") }),
        )
        .route(
            "/api/v1/orders/{id}/issue",
            post(|| async { "x".repeat(1024 * 1024) }),
        );
    let url = serve(&rt, app);
    let client = PortalClient::new(&url).unwrap().max_body(64 * 1024);
    assert!(matches!(
        client.status(&request()),
        Err(ClientError::Garbage { .. })
    ));
    let e = client.challenge("o").unwrap_err();
    assert!(
        matches!(
            e,
            ClientError::Api {
                status: 502,
                code: ErrorCode::Unknown,
                ..
            }
        ),
        "{e}"
    );
    assert!(e.is_transient());
    let req: ukey_portal_api::IssueRequest = serde_json::from_value(serde_json::json!({
        "challenge_id": "c", "challenge_signature": "", "signature_algorithm": "rsa_pkcs1_sha256",
        "old_certificate_der": "", "csr_der": ""
    }))
    .unwrap();
    assert!(matches!(
        client.issue("o", &req),
        Err(ClientError::TooLarge { limit: 65536, .. })
    ));
}

#[test]
fn unreachable_and_invalid_urls() {
    // A port nothing listens on (bound, then closed).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let client = PortalClient::new(&format!("http://127.0.0.1:{port}")).unwrap();
    let e = client.status(&request()).unwrap_err();
    assert!(matches!(e, ClientError::Unreachable { .. }), "{e}");
    assert!(e.is_transient());
    assert!(matches!(
        PortalClient::new("ftp://x"),
        Err(ClientError::InvalidUrl { .. })
    ));
}

#[test]
fn tls_to_a_plain_http_server_is_a_tls_error() {
    let rt = runtime();
    let url = serve(
        &rt,
        Router::new().route("/api/v1/status", post(|| async { "{}" })),
    );
    let https = url.replace("http://", "https://");
    let client = PortalClient::new(&https).unwrap();
    let e = client.status(&request()).unwrap_err();
    assert!(matches!(e, ClientError::Tls { .. }), "{e:?}");
}

fn reference_portal(
    rt: &tokio::runtime::Runtime,
    dir: &std::path::Path,
    tls: Option<ukey_portal::TlsFiles>,
) -> ukey_portal::RunningServer {
    let portal = Arc::new(Portal::open(&PortalConfig::new(dir.join("data"))).unwrap());
    rt.block_on(ukey_portal::start(
        portal,
        "127.0.0.1:0".parse().unwrap(),
        tls,
        None,
    ))
    .unwrap()
}

/// A TLS CA and a server certificate for 127.0.0.1 signed by it, as PEM files in `dir`:
/// (CA certificate PEM, TLS files).
fn tls_files(dir: &std::path::Path) -> (Vec<u8>, ukey_portal::TlsFiles) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "Portal TLS Test CA");
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate().unwrap();
    let params = CertificateParams::new(vec!["127.0.0.1".to_owned()]).unwrap();
    let cert = params.signed_by(&key, &issuer).unwrap();
    let files = ukey_portal::TlsFiles {
        cert: dir.join("tls-cert.pem"),
        key: dir.join("tls-key.pem"),
    };
    std::fs::write(&files.cert, cert.pem()).unwrap();
    std::fs::write(&files.key, key.serialize_pem()).unwrap();
    (ca_cert.pem().into_bytes(), files)
}

#[test]
fn probe_of_the_reference_portal_gives_status_round_trip_and_date() {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let server = reference_portal(&rt, dir.path(), None);
    let client = PortalClient::new(&server.url).unwrap();
    assert!(!client.is_https());
    assert!(client.is_loopback());
    assert_eq!(client.host(), "127.0.0.1");
    let before = std::time::SystemTime::now();
    let probe = client.probe().unwrap();
    assert_eq!(probe.http_status, 200);
    assert_eq!(probe.url, format!("{}/openapi.yaml", server.url));
    assert!(!probe.tls_verified, "plain HTTP");
    assert!(probe.round_trip < std::time::Duration::from_secs(5));
    assert!(probe.sent_at >= before);
    assert!(probe.date_header.is_some());
    assert!(probe.clock_skew_seconds().unwrap().abs() <= 2);
}

/// An error answer is still an answer: its status and `Date` come through (a proxy's
/// 404 tells the support desk the network works and what the clock is).
#[test]
fn probe_reports_an_error_status_and_a_skewed_date() {
    let rt = runtime();
    let an_hour_ago = httpdate::fmt_http_date(
        std::time::SystemTime::now() - std::time::Duration::from_secs(3600),
    );
    let date = an_hour_ago.clone();
    let app = Router::new().fallback(move || {
        let date = date.clone();
        async move {
            (
                axum::http::StatusCode::NOT_FOUND,
                [(axum::http::header::DATE, date)],
                "no such page",
            )
        }
    });
    let url = serve(&rt, app);
    let client = PortalClient::new(&url).unwrap();
    let probe = client.probe().unwrap();
    assert_eq!(probe.http_status, 404);
    assert_eq!(probe.date_header.as_deref(), Some(an_hour_ago.as_str()));
    let skew = probe.clock_skew_seconds().unwrap();
    assert!((3595..=3605).contains(&skew), "{skew}");

    // A Date that is not a date: kept raw, no skew.
    let app =
        Router::new().fallback(|| async { ([(axum::http::header::DATE, "yesterday")], "ok") });
    let url = serve(&rt, app);
    let client = PortalClient::new(&url).unwrap();
    let probe = client.probe().unwrap();
    assert_eq!(probe.http_status, 200);
    assert_eq!(probe.date_header.as_deref(), Some("yesterday"));
    assert_eq!(probe.server_date, None);
    assert_eq!(probe.clock_skew_seconds(), None);
}

#[test]
fn probe_failures_are_classified() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let client = PortalClient::new(&format!("http://127.0.0.1:{port}")).unwrap();
    let e = client.probe().unwrap_err();
    assert!(matches!(e, ClientError::Unreachable { .. }), "{e:?}");

    let rt = runtime();
    let url = serve(&rt, Router::new().fallback(|| async { "plain" }));
    let https = url.replace("http://", "https://");
    let client = PortalClient::new(&https).unwrap();
    let e = client.probe().unwrap_err();
    assert!(matches!(e, ClientError::Tls { .. }), "{e:?}");

    assert!(matches!(
        PortalClient::new("https://"),
        Err(ClientError::InvalidUrl { .. })
    ));
}

/// HTTPS: untrusted certificate is a TLS error; with the portal's TLS CA it verifies.
#[test]
fn probe_over_https_verifies_the_portal_certificate() {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let (ca_pem, files) = tls_files(dir.path());
    let server = reference_portal(&rt, dir.path(), Some(files));
    assert!(server.url.starts_with("https://"), "{}", server.url);

    let client = PortalClient::new(&server.url).unwrap();
    let e = client.probe().unwrap_err();
    assert!(matches!(e, ClientError::Tls { .. }), "{e:?}");
    assert!(matches!(
        client.ca_certificates(),
        Err(ClientError::Tls { .. })
    ));

    let client = PortalClient::with_roots(&server.url, &[ca_pem]).unwrap();
    assert!(client.is_https());
    let probe = client.probe().unwrap();
    assert_eq!(probe.http_status, 200);
    assert!(probe.tls_verified);
    let ca = client.ca_certificates().unwrap();
    assert_eq!(ca.value, vec![server.portal.ca().cert_der().to_vec()]);
}

#[test]
fn ca_certificates_of_the_reference_portal_and_other_shapes() {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let server = reference_portal(&rt, dir.path(), None);
    let client = PortalClient::new(&server.url).unwrap();
    let answer = client.ca_certificates().unwrap();
    assert_eq!(answer.value, vec![server.portal.ca().cert_der().to_vec()]);
    assert!(answer.server_date.is_some());

    // A PEM chain and concatenated DER: every certificate, in order.
    let make = |cn: &str| {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        params.self_signed(&key).unwrap()
    };
    let (a, b) = (make("A"), make("B"));
    let pem_chain = format!("{}{}", a.pem(), b.pem());
    let der_chain = [a.der().to_vec(), b.der().to_vec()].concat();
    let expect = vec![a.der().to_vec(), b.der().to_vec()];
    for (name, body) in [("pem", pem_chain.into_bytes()), ("der", der_chain)] {
        let app = Router::new().route(
            "/api/v1/ca",
            axum::routing::get(move || {
                let body = body.clone();
                async move { body }
            }),
        );
        let url = serve(&rt, app);
        let client = PortalClient::new(&url).unwrap();
        assert_eq!(client.ca_certificates().unwrap().value, expect, "{name}");
    }

    // Garbage, a truncated certificate, a PEM without certificates, an error answer.
    let truncated = a.der()[..a.der().len() - 1].to_vec();
    let app = Router::new()
        .route(
            "/x/api/v1/ca",
            axum::routing::get(|| async { "<html>hello</html>" }),
        )
        .route(
            "/y/api/v1/ca",
            axum::routing::get(move || {
                let t = truncated.clone();
                async move { t }
            }),
        )
        .route(
            "/z/api/v1/ca",
            axum::routing::get(|| async {
                "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n"
            }),
        );
    let url = serve(&rt, app);
    for prefix in ["x", "y", "z"] {
        let client = PortalClient::new(&format!("{url}/{prefix}")).unwrap();
        let e = client.ca_certificates().unwrap_err();
        assert!(
            matches!(e, ClientError::Garbage { status: 200, .. }),
            "{prefix}: {e:?}"
        );
    }
    let client = PortalClient::new(&format!("{url}/none")).unwrap();
    let e = client.ca_certificates().unwrap_err();
    assert!(matches!(e, ClientError::Api { status: 404, .. }), "{e:?}");
}

#[test]
fn a_slow_portal_times_out_after_the_timeout_set() {
    let rt = runtime();
    let app = Router::new().fallback(|| async {
        tokio::time::sleep(std::time::Duration::from_secs(5)).await;
        "late"
    });
    let url = serve(&rt, app);
    let client = PortalClient::new(&url)
        .unwrap()
        .timeout(std::time::Duration::from_millis(300));
    let started = std::time::Instant::now();
    let e = client.ca_certificates().unwrap_err();
    assert!(matches!(e, ClientError::Timeout { .. }), "{e:?}");
    assert!(e.is_transient());
    let e = client.probe().unwrap_err();
    assert!(matches!(e, ClientError::Timeout { .. }), "{e:?}");
    assert!(started.elapsed() < std::time::Duration::from_secs(3));
}

/// Plain HTTP only to this computer; no redirect is followed (a portal that answers
/// 307 to another origin does not get the request replayed there).
#[test]
fn plain_http_only_on_loopback_and_no_redirects() {
    for url in [
        "http://portal.example",
        "http://10.0.0.1:8443",
        "http://[2001:db8::1]",
    ] {
        let e = PortalClient::new(url).unwrap_err();
        assert!(
            matches!(&e, ClientError::InvalidUrl { reason, .. } if reason.contains("https://")),
            "{url}: {e}"
        );
    }
    for url in ["http://127.0.0.1:1", "http://localhost:1", "http://[::1]:1"] {
        PortalClient::new(url).unwrap_or_else(|e| panic!("{url}: {e}"));
    }
    PortalClient::new("https://portal.example").unwrap();

    let rt = runtime();
    let hits = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let target = {
        let hits = hits.clone();
        serve(
            &rt,
            Router::new().route(
                "/api/v1/status",
                post(move || {
                    hits.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    async { r#"{"state":"none"}"# }
                }),
            ),
        )
    };
    let location = format!("{target}/api/v1/status");
    let redirecting = serve(
        &rt,
        Router::new().route(
            "/api/v1/status",
            post(move || {
                let location = location.clone();
                async move {
                    (
                        axum::http::StatusCode::TEMPORARY_REDIRECT,
                        [(axum::http::header::LOCATION, location)],
                    )
                }
            }),
        ),
    );
    let client = PortalClient::new(&redirecting).unwrap();
    assert!(client.status(&request()).is_err());
    assert_eq!(hits.load(std::sync::atomic::Ordering::SeqCst), 0);
}
