//! The client against real HTTP on loopback: the reference portal, and a small axum
//! server that misbehaves.

use std::sync::Arc;

use axum::Router;
use axum::routing::post;
use ukey_portal::{Portal, PortalConfig};
use ukey_portal_api::{ErrorCode, RenewalStatus, StatusRequest};
use ukey_portal_client::{BlockingPortalClient, ClientError, PortalClient};

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
    let client = BlockingPortalClient::new(PortalClient::new(&server.url).unwrap()).unwrap();
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
    let client =
        BlockingPortalClient::new(PortalClient::new(&url).unwrap().max_body(64 * 1024)).unwrap();
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
    let client =
        BlockingPortalClient::new(PortalClient::new(&format!("http://127.0.0.1:{port}")).unwrap())
            .unwrap();
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
    let client = BlockingPortalClient::new(PortalClient::new(&https).unwrap()).unwrap();
    let e = client.status(&request()).unwrap_err();
    assert!(matches!(e, ClientError::Tls { .. }), "{e:?}");
}
