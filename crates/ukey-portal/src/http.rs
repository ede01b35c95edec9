//! HTTP binding of the portal (axum): routes, JSON extraction with protocol error
//! codes, admin bearer-token guard, plain HTTP or HTTPS (rustls) listeners.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use axum::Router;
use axum::extract::{FromRequest, Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use serde::de::DeserializeOwned;
use ukey_portal_api::{
    ApiError, CreateOrderRequest, ErrorCode, InstalledRequest, IssueRequest, MAX_BODY_BYTES,
    OPENAPI_YAML, RejectRequest, ShipRequest, StatusRequest, paths,
};

use crate::Error;
use crate::portal::Portal;

/// An error answer: status from the code, JSON body.
#[derive(Debug)]
pub struct HttpError(pub ApiError);

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.0.code.http_status())
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (status, axum::Json(self.0)).into_response()
    }
}

impl From<Error> for HttpError {
    fn from(e: Error) -> HttpError {
        match e {
            Error::Api(api) => HttpError(api),
            other => {
                tracing::error!(error = %other, "request failed");
                HttpError(ApiError::new(
                    ErrorCode::Internal,
                    "internal error; see the portal log",
                ))
            }
        }
    }
}

fn err(code: ErrorCode, message: impl Into<String>) -> HttpError {
    HttpError(ApiError::new(code, message))
}

/// JSON body extractor that answers with protocol error codes (size limit, media type,
/// base64, schema) instead of axum's plain-text rejections.
#[derive(Debug)]
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = HttpError;

    async fn from_request(req: Request, _state: &S) -> Result<Self, Self::Rejection> {
        let is_json = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .is_some_and(|mime| {
                let mime = mime.trim().to_ascii_lowercase();
                mime == "application/json"
                    || (mime.starts_with("application/") && mime.ends_with("+json"))
            });
        if !is_json {
            return Err(err(
                ErrorCode::UnsupportedMediaType,
                "send the body as application/json",
            ));
        }
        let declared_too_large = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok())
            .is_some_and(|n| n > MAX_BODY_BYTES);
        if declared_too_large {
            return Err(err(
                ErrorCode::BodyTooLarge,
                format!("the body exceeds {MAX_BODY_BYTES} bytes"),
            ));
        }
        let bytes = axum::body::to_bytes(req.into_body(), MAX_BODY_BYTES)
            .await
            .map_err(|_| {
                err(
                    ErrorCode::BodyTooLarge,
                    format!("the body exceeds {MAX_BODY_BYTES} bytes"),
                )
            })?;
        serde_json::from_slice(&bytes).map(ApiJson).map_err(|e| {
            let text = e.to_string();
            if text.contains("invalid base64") {
                err(ErrorCode::InvalidBase64, text)
            } else {
                err(ErrorCode::MalformedJson, text)
            }
        })
    }
}

type AppState = Arc<Portal>;
type ApiResult<T> = Result<axum::Json<T>, HttpError>;

async fn blocking<T: Send + 'static>(
    portal: &AppState,
    f: impl FnOnce(&Portal) -> Result<T, Error> + Send + 'static,
) -> Result<T, HttpError> {
    let portal = Arc::clone(portal);
    match tokio::task::spawn_blocking(move || crate::db::blocking_section(|| f(&portal))).await {
        Ok(r) => r.map_err(HttpError::from),
        Err(e) => {
            tracing::error!(error = %e, "worker panicked");
            Err(err(ErrorCode::Internal, "internal error"))
        }
    }
}

/// How long one request may take, body included, before it is answered
/// `request_timeout` (a client trickling its body cannot hold a worker).
pub const REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);
/// How long a connection may take to send a request's headers (slowloris), by default.
pub const HEADER_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Routes of the public and admin APIs.
pub fn router(portal: Arc<Portal>) -> Router {
    finish(public_routes(&portal).merge(admin_routes(&portal)), portal)
}

/// The admin API alone (`--admin-listen`: on its own, loopback, address).
pub fn admin_router(portal: Arc<Portal>) -> Router {
    finish(admin_routes(&portal), portal)
}

/// The client-facing protocol, CMP, the CRL and the pay page.
pub fn public_router(portal: Arc<Portal>) -> Router {
    finish(public_routes(&portal), portal)
}

/// Fallbacks, the request timeout and the state.
fn finish(routes: Router<AppState>, portal: Arc<Portal>) -> Router {
    routes
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn(request_timeout))
        .with_state(portal)
}

fn admin_routes(portal: &Arc<Portal>) -> Router<AppState> {
    Router::new()
        .route(paths::ADMIN_ORDERS, get(admin_list).post(admin_create))
        .route(paths::ADMIN_ORDER, get(admin_show))
        .route(paths::ADMIN_PAY, post(admin_pay))
        .route(paths::ADMIN_REJECT, post(admin_reject))
        .route(paths::ADMIN_SHIP, post(admin_ship))
        .route(paths::ADMIN_REVIEW, post(admin_review))
        .route(paths::ADMIN_APPROVE, post(admin_approve))
        .route_layer(axum::middleware::from_fn_with_state(
            Arc::clone(portal),
            admin_guard,
        ))
}

fn public_routes(portal: &Arc<Portal>) -> Router<AppState> {
    // What a stranger can make the portal do without proving anything is rate-limited.
    let limited = Router::new()
        .route(paths::CHALLENGE, post(challenge))
        .route(paths::PAY_PAGE, get(pay_page))
        .route_layer(axum::middleware::from_fn_with_state(
            Arc::clone(portal),
            rate_limit,
        ));
    Router::new()
        .route(paths::STATUS, post(status))
        .route(paths::ISSUE, post(issue))
        .route(paths::INSTALLED, post(installed))
        .route(paths::CRL, get(crl))
        .route(paths::CRL_OF_KEY, get(crl_of_key))
        .route(paths::CA_CERT, get(ca_cert))
        .route(paths::OPENAPI, get(openapi))
        .route(paths::CMP, post(cmp))
        .route(paths::CMP_PROFILE, post(cmp_profile))
        .merge(limited)
}

async fn request_timeout(req: Request, next: axum::middleware::Next) -> Response {
    match tokio::time::timeout(REQUEST_TIMEOUT, next.run(req)).await {
        Ok(r) => r,
        Err(_) => err(
            ErrorCode::RequestTimeout,
            "the request took too long / 请求超时",
        )
        .into_response(),
    }
}

/// Challenges per order and pay-page views per serial, and both per client address:
/// over the limit, `rate_limited` (429) with `Retry-After`.
async fn rate_limit(
    State(p): State<AppState>,
    req: Request,
    next: axum::middleware::Next,
) -> Response {
    let path = req.uri().path().to_owned();
    let (route, subject) = if path == paths::PAY_PAGE {
        let serial = req
            .uri()
            .query()
            .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("serial=")))
            .unwrap_or("")
            .to_owned();
        ("pay", serial)
    } else {
        ("challenge", path)
    };
    let address = req
        .extensions()
        .get::<axum::extract::ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip().to_string());
    match p.limits().check(route, &subject, address.as_deref()) {
        Ok(()) => next.run(req).await,
        Err(wait) => {
            let mut r = err(
                ErrorCode::RateLimited,
                format!(
                    "请求过于频繁，请 {wait} 秒后再试 / too many requests: try again in {wait} s"
                ),
            )
            .into_response();
            if let Ok(v) = HeaderValue::from_str(&wait.to_string()) {
                r.headers_mut().insert(header::RETRY_AFTER, v);
            }
            r
        }
    }
}

async fn not_found() -> HttpError {
    err(ErrorCode::NotFound, "no such route")
}

async fn method_not_allowed() -> HttpError {
    err(
        ErrorCode::MethodNotAllowed,
        "method not allowed on this route",
    )
}

async fn status(
    State(p): State<AppState>,
    ApiJson(req): ApiJson<StatusRequest>,
) -> ApiResult<ukey_portal_api::RenewalStatus> {
    blocking(&p, move |p| p.status(&req)).await.map(axum::Json)
}

async fn challenge(
    State(p): State<AppState>,
    Path(order_id): Path<String>,
) -> ApiResult<ukey_portal_api::ChallengeResponse> {
    blocking(&p, move |p| p.challenge(&order_id))
        .await
        .map(axum::Json)
}

async fn issue(
    State(p): State<AppState>,
    Path(order_id): Path<String>,
    ApiJson(req): ApiJson<IssueRequest>,
) -> ApiResult<ukey_portal_api::IssueResponse> {
    blocking(&p, move |p| p.issue(&order_id, &req))
        .await
        .map(axum::Json)
}

async fn installed(
    State(p): State<AppState>,
    Path(order_id): Path<String>,
    ApiJson(req): ApiJson<InstalledRequest>,
) -> ApiResult<ukey_portal_api::InstalledResponse> {
    blocking(&p, move |p| p.installed(&order_id, &req))
        .await
        .map(axum::Json)
}

/// RFC 6712: a DER PKIMessage as `application/pkixcmp`, answered the same way (also
/// refusals: they are protected CMP error messages, with HTTP 200).
async fn cmp(State(p): State<AppState>, headers: HeaderMap, body: axum::body::Bytes) -> Response {
    const CMP_TYPE: &str = "application/pkixcmp";
    let media = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        });
    if media.as_deref() != Some(CMP_TYPE) {
        return err(
            ErrorCode::UnsupportedMediaType,
            "a CMP request is a DER PKIMessage sent as application/pkixcmp (RFC 6712)",
        )
        .into_response();
    }
    if body.len() > MAX_BODY_BYTES {
        return err(ErrorCode::BodyTooLarge, "the CMP message is too large").into_response();
    }
    match blocking(&p, move |p| p.cmp_message(&body)).await {
        Ok(der) => (
            [(header::CONTENT_TYPE, HeaderValue::from_static(CMP_TYPE))],
            der,
        )
            .into_response(),
        Err(e) => e.into_response(),
    }
}

async fn cmp_profile(
    state: State<AppState>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    if !crate::cmp::PROFILES.contains(&name.as_str()) {
        return err(
            ErrorCode::NotFound,
            format!(
                "no CMP profile {name:?} (profiles: {})",
                crate::cmp::PROFILES.join(", ")
            ),
        )
        .into_response();
    }
    cmp(state, headers, body).await
}

async fn crl(State(p): State<AppState>) -> Result<Response, HttpError> {
    let der = blocking(&p, |p| p.crl()).await?;
    Ok((
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/pkix-crl"),
        )],
        der,
    )
        .into_response())
}

async fn crl_of_key(
    State(p): State<AppState>,
    Path(ski): Path<String>,
) -> Result<Response, HttpError> {
    let der = blocking(&p, move |p| p.crl_of_key(&ski)).await?;
    Ok((
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/pkix-crl"),
        )],
        der,
    )
        .into_response())
}

async fn ca_cert(State(p): State<AppState>) -> Response {
    let der = p.ca().cert_der().to_vec();
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/pkix-cert"),
        )],
        der,
    )
        .into_response()
}

async fn openapi() -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/yaml"),
        )],
        OPENAPI_YAML,
    )
        .into_response()
}

fn escape_html(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// The payment page a `payment_url` points at: the order's terms for a serial, in
/// Chinese and English. Payment itself is the business side's (`order pay`).
async fn pay_page(
    State(p): State<AppState>,
    Query(q): Query<std::collections::HashMap<String, String>>,
) -> Result<Html<String>, HttpError> {
    let raw = q.get("serial").cloned().unwrap_or_default();
    let serial = ukey_portal_api::normalize_serial_hex(&raw)
        .map_err(|e| err(ErrorCode::InvalidSerial, e.to_string()))?;
    let orders = {
        let serial = serial.clone();
        blocking(&p, move |p| p.orders_for_serial(&serial)).await?
    };
    let mut rows = String::new();
    for o in &orders {
        let state_zh = match o.state.as_str() {
            "awaiting_payment" => "待支付",
            "ready" => "已支付，可更新",
            "issued" => "已签发，待安装",
            "completed" => "已完成",
            "requires_new_key" => "新介质寄送中",
            "rejected" => "已驳回",
            _ => "",
        };
        // Never the code itself: this page is reached by serial, without a login, and
        // the code is what a moment of access to the key must not have.
        let code_note = if o.renewal_code.is_some() {
            "<br>更新时需输入续期码（见贵单位已付款的订单页面）/ renewing asks for the renewal code on your paid order page"
        } else {
            ""
        };
        rows.push_str(&format!(
            "<tr><td>{}</td><td>{} / {}{code_note}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            escape_html(&o.order_id),
            state_zh,
            escape_html(&o.state),
            o.terms.years,
            o.terms.target_algorithm,
            if o.terms.with_encryption_cert {
                "是 / yes"
            } else {
                "否 / no"
            },
        ));
    }
    if rows.is_empty() {
        rows = "<tr><td colspan=5>没有续费订单 / No renewal order for this certificate</td></tr>"
            .into();
    }
    Ok(Html(format!(
        "<!doctype html><html lang=\"zh-CN\"><head><meta charset=\"utf-8\"><title>证书续费 / Certificate renewal</title></head>\
         <body><h1>证书续费 / Certificate renewal</h1><p>证书序列号 / Serial: <code>{serial}</code></p>\
         <table border=1><tr><th>订单 / Order</th><th>状态 / State</th><th>年限 / Years</th><th>算法 / Algorithm</th><th>加密证书 / Encryption cert</th></tr>{rows}</table>\
         <p>请按贵单位流程付款，付款确认后即可在 UKey 客户端中更新。<br>Pay as arranged with your CA; once payment is confirmed, renew in the UKey client.</p></body></html>"
    )))
}

async fn admin_guard(
    State(p): State<AppState>,
    headers: HeaderMap,
    req: Request,
    next: axum::middleware::Next,
) -> Response {
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match token {
        Some(t) if p.admin_token_matches(t) => next.run(req).await,
        _ => err(
            ErrorCode::Unauthorized,
            "missing or wrong admin bearer token",
        )
        .into_response(),
    }
}

async fn admin_list(State(p): State<AppState>) -> ApiResult<Vec<ukey_portal_api::OrderView>> {
    blocking(&p, |p| p.list_orders()).await.map(axum::Json)
}

async fn admin_create(
    State(p): State<AppState>,
    ApiJson(req): ApiJson<CreateOrderRequest>,
) -> Result<(StatusCode, axum::Json<ukey_portal_api::OrderView>), HttpError> {
    blocking(&p, move |p| p.create_order(&req))
        .await
        .map(|v| (StatusCode::CREATED, axum::Json(v)))
}

async fn admin_show(
    State(p): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<ukey_portal_api::OrderView> {
    blocking(&p, move |p| p.show_order(&id))
        .await
        .map(axum::Json)
}

async fn admin_pay(
    State(p): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<ukey_portal_api::OrderView> {
    blocking(&p, move |p| p.pay(&id)).await.map(axum::Json)
}

async fn admin_review(
    State(p): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<ukey_portal_api::OrderView> {
    blocking(&p, move |p| p.review(&id)).await.map(axum::Json)
}

async fn admin_approve(
    State(p): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<ukey_portal_api::OrderView> {
    blocking(&p, move |p| p.approve(&id)).await.map(axum::Json)
}

async fn admin_reject(
    State(p): State<AppState>,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<RejectRequest>,
) -> ApiResult<ukey_portal_api::OrderView> {
    blocking(&p, move |p| p.reject(&id, &req.reason))
        .await
        .map(axum::Json)
}

async fn admin_ship(
    State(p): State<AppState>,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<ShipRequest>,
) -> ApiResult<ukey_portal_api::OrderView> {
    blocking(&p, move |p| p.ship(&id, &req.tracking_number))
        .await
        .map(axum::Json)
}

/// TLS certificate and key (PEM files) for HTTPS.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// Certificate chain PEM.
    pub cert: PathBuf,
    /// Private key PEM.
    pub key: PathBuf,
}

/// A server started by [`start`].
#[derive(Debug)]
pub struct RunningServer {
    /// Base URL, e.g. `http://127.0.0.1:43123`.
    pub url: String,
    /// Bound address.
    pub addr: SocketAddr,
    /// The portal it serves.
    pub portal: Arc<Portal>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
    handle: axum_server::Handle<SocketAddr>,
}

impl RunningServer {
    /// Waits until the server stops (it runs until the process ends or [`Self::stop`]).
    pub async fn wait(self) -> std::io::Result<()> {
        match self.task.await {
            Ok(r) => r,
            Err(e) => Err(std::io::Error::other(e)),
        }
    }
    /// Stops accepting connections and lets running requests finish (5 s at most).
    pub async fn stop(self) -> std::io::Result<()> {
        self.handle
            .graceful_shutdown(Some(std::time::Duration::from_secs(5)));
        self.wait().await
    }
}

/// Binds `addr` (port 0 allowed), sets the portal's public URL to the bound address
/// unless `public_url` is given, and serves the public and admin APIs in a background
/// task.
pub async fn start(
    portal: Arc<Portal>,
    addr: SocketAddr,
    tls: Option<TlsFiles>,
    public_url: Option<String>,
) -> std::io::Result<RunningServer> {
    let app = router(Arc::clone(&portal));
    serve_on(portal, app, addr, tls, public_url, true)
}

/// [`start`] with the admin API on its own address (`--admin-listen`, e.g. loopback
/// while the public API faces the network): the public server has no admin route.
/// The public server first, then the admin one.
pub async fn start_split(
    portal: Arc<Portal>,
    addr: SocketAddr,
    admin_addr: SocketAddr,
    tls: Option<TlsFiles>,
    public_url: Option<String>,
) -> std::io::Result<(RunningServer, RunningServer)> {
    let public = serve_on(
        Arc::clone(&portal),
        public_router(Arc::clone(&portal)),
        addr,
        tls,
        public_url,
        true,
    )?;
    let admin = serve_on(
        Arc::clone(&portal),
        admin_router(Arc::clone(&portal)),
        admin_addr,
        None,
        None,
        false,
    )?;
    Ok((public, admin))
}

fn serve_on(
    portal: Arc<Portal>,
    app: Router,
    addr: SocketAddr,
    tls: Option<TlsFiles>,
    public_url: Option<String>,
    sets_public_url: bool,
) -> std::io::Result<RunningServer> {
    let listener = std::net::TcpListener::bind(addr)?;
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    let scheme = if tls.is_some() { "https" } else { "http" };
    let host = if addr.ip().is_unspecified() {
        "127.0.0.1".to_owned()
    } else {
        addr.ip().to_string()
    };
    let host = if addr.is_ipv6() && !addr.ip().is_unspecified() {
        format!("[{host}]")
    } else {
        host
    };
    let url = format!("{scheme}://{host}:{}", addr.port());
    if sets_public_url {
        portal.set_public_url(public_url.as_deref().unwrap_or(&url));
    }
    // The client's address reaches the rate limits.
    let app = app.into_make_service_with_connect_info::<SocketAddr>();
    let handle = axum_server::Handle::new();
    let task = match tls {
        Some(files) => {
            // Several rustls providers may be compiled in; pick aws-lc-rs explicitly.
            let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
            let config = rustls_config(&files, provider)?;
            let mut server = axum_server::from_tcp_rustls(
                listener,
                axum_server::tls_rustls::RustlsConfig::from_config(config),
            )?
            .handle(handle.clone());
            header_timeout(server.http_builder(), portal.header_read_timeout());
            tokio::spawn(async move { server.serve(app).await })
        }
        None => {
            let mut server = axum_server::from_tcp(listener)?.handle(handle.clone());
            header_timeout(server.http_builder(), portal.header_read_timeout());
            tokio::spawn(async move { server.serve(app).await })
        }
    };
    Ok(RunningServer {
        url,
        addr,
        portal,
        task,
        handle,
    })
}

/// hyper reads request headers without a time limit unless it has a timer.
fn header_timeout(
    b: &mut hyper_util::server::conn::auto::Builder<hyper_util::rt::TokioExecutor>,
    timeout: std::time::Duration,
) {
    b.http1()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(timeout);
}

fn rustls_config(
    files: &TlsFiles,
    provider: Arc<rustls::crypto::CryptoProvider>,
) -> std::io::Result<Arc<rustls::ServerConfig>> {
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let bad = |what: &str, e: &dyn std::fmt::Display| {
        std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{what}: {e}"))
    };
    let certs = CertificateDer::pem_file_iter(&files.cert)
        .map_err(|e| bad(&files.cert.display().to_string(), &e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(&files.cert.display().to_string(), &e))?;
    let key = PrivateKeyDer::from_pem_file(&files.key)
        .map_err(|e| bad(&files.key.display().to_string(), &e))?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| bad("TLS versions", &e))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| bad("TLS certificate/key", &e))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}
