//! HTTPS client of the renewal portal protocol (`ukey-portal-api`), over reqwest with
//! rustls. The only crate that speaks HTTP to a portal.
//!
//! Every answer comes with the server's `Date` header ([`Answer::server_date`]) so the
//! renewal engine can measure clock skew before it trusts validity periods. Failures
//! are typed ([`ClientError`]): portal unreachable, TLS, timeout, an HTTP error with the
//! portal's error code, a body that is not what the protocol says, or a body larger
//! than [`PortalClient::max_body`] (read in chunks and cut off, never buffered whole).
//!
//! [`PortalClient`] is async (the desktop app runs on tokio); [`BlockingPortalClient`]
//! wraps it for synchronous callers (the CLI, the renewal engine's worker threads).

use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;
use time::OffsetDateTime;
use ukey_portal_api::{
    ApiError, ChallengeResponse, ErrorCode, InstalledRequest, InstalledResponse, IssueRequest,
    IssueResponse, RenewalStatus, StatusRequest, paths,
};

/// Default cap on a response body: issued certificates, a chain and an envelope fit in
/// a few KiB.
pub const DEFAULT_MAX_BODY: usize = 256 * 1024;

/// An answer and the server's clock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer<T> {
    /// The decoded body.
    pub value: T,
    /// The response's `Date` header, if present and valid.
    pub server_date: Option<OffsetDateTime>,
}

/// What went wrong talking to the portal.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The portal URL is not an http(s) URL.
    #[error("invalid portal URL {url:?}: {reason}")]
    InvalidUrl {
        /// The URL given.
        url: String,
        /// Why.
        reason: String,
    },
    /// No connection (DNS, refused, reset).
    #[error("portal {url} unreachable: {reason}")]
    Unreachable {
        /// The URL tried.
        url: String,
        /// The network error.
        reason: String,
    },
    /// The TLS handshake failed (untrusted or invalid server certificate...).
    #[error("TLS with portal {url} failed: {reason}")]
    Tls {
        /// The URL tried.
        url: String,
        /// The TLS error.
        reason: String,
    },
    /// No answer in time.
    #[error("portal {url} did not answer in time")]
    Timeout {
        /// The URL tried.
        url: String,
    },
    /// The portal answered with an error status and (usually) its error code.
    #[error("portal answered HTTP {status}: {code}: {message}")]
    Api {
        /// HTTP status.
        status: u16,
        /// The protocol's error code ([`ErrorCode::Unknown`] when the body had none).
        code: ErrorCode,
        /// The portal's message.
        message: String,
    },
    /// The body is not what the protocol says (not JSON, wrong shape).
    #[error("portal answer from {url} (HTTP {status}) is not valid: {reason}")]
    Garbage {
        /// The URL.
        url: String,
        /// HTTP status.
        status: u16,
        /// The parse error.
        reason: String,
    },
    /// The body is larger than allowed.
    #[error("portal answer from {url} is larger than {limit} bytes")]
    TooLarge {
        /// The URL.
        url: String,
        /// The cap.
        limit: usize,
    },
    /// Any other transport failure.
    #[error("talking to portal {url}: {reason}")]
    Transport {
        /// The URL.
        url: String,
        /// The error.
        reason: String,
    },
}

impl ClientError {
    /// A stable code for JSON output and front ends.
    pub fn code(&self) -> &'static str {
        match self {
            ClientError::InvalidUrl { .. } => "portal_url_invalid",
            ClientError::Unreachable { .. } => "portal_unreachable",
            ClientError::Tls { .. } => "portal_tls",
            ClientError::Timeout { .. } => "portal_timeout",
            ClientError::Api { .. } => "portal_error",
            ClientError::Garbage { .. } => "portal_garbage",
            ClientError::TooLarge { .. } => "portal_too_large",
            ClientError::Transport { .. } => "portal_transport",
        }
    }

    /// Whether trying again later may succeed without anyone changing anything
    /// (network, timeout, 5xx). A renewal interrupted by such an error is resumed.
    pub fn is_transient(&self) -> bool {
        match self {
            ClientError::Unreachable { .. }
            | ClientError::Timeout { .. }
            | ClientError::Transport { .. } => true,
            ClientError::Api { status, .. } => *status >= 500 || *status == 429,
            _ => false,
        }
    }

    /// The portal's error code, for [`ClientError::Api`].
    pub fn api_code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Api { code, .. } => Some(*code),
            _ => None,
        }
    }
}

/// Async client of one portal.
#[derive(Debug, Clone)]
pub struct PortalClient {
    base: String,
    http: reqwest::Client,
    max_body: usize,
}

impl PortalClient {
    /// A client of the portal at `base_url` (`https://portal.example/` or, for tests
    /// and the demo, `http://127.0.0.1:PORT`), trusting the system's roots.
    pub fn new(base_url: &str) -> Result<PortalClient, ClientError> {
        PortalClient::with_roots(base_url, &[])
    }

    /// Like [`PortalClient::new`], also trusting the given CA certificates (PEM) for TLS.
    pub fn with_roots(
        base_url: &str,
        extra_roots_pem: &[Vec<u8>],
    ) -> Result<PortalClient, ClientError> {
        let invalid = |reason: String| ClientError::InvalidUrl {
            url: base_url.to_owned(),
            reason,
        };
        let base = base_url.trim_end_matches('/').to_owned();
        if !(base.starts_with("https://") || base.starts_with("http://")) {
            return Err(invalid("expected http:// or https://".to_owned()));
        }
        let mut builder = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(60))
            .user_agent(concat!("ukey-renew/", env!("CARGO_PKG_VERSION")));
        for pem in extra_roots_pem {
            let cert = reqwest::Certificate::from_pem(pem)
                .map_err(|e| invalid(format!("TLS root certificate: {e}")))?;
            builder = builder.add_root_certificate(cert);
        }
        let http = builder.build().map_err(|e| invalid(e.to_string()))?;
        Ok(PortalClient {
            base,
            http,
            max_body: DEFAULT_MAX_BODY,
        })
    }

    /// Sets the response body cap.
    pub fn max_body(mut self, bytes: usize) -> PortalClient {
        self.max_body = bytes;
        self
    }

    /// The base URL.
    pub fn base_url(&self) -> &str {
        &self.base
    }

    /// A web page of the portal (payment page...), absolute.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// `POST /api/v1/status`.
    pub async fn status(&self, req: &StatusRequest) -> Result<Answer<RenewalStatus>, ClientError> {
        self.post(paths::STATUS, Some(req)).await
    }

    /// `POST /api/v1/orders/{id}/challenge`.
    pub async fn challenge(
        &self,
        order_id: &str,
    ) -> Result<Answer<ChallengeResponse>, ClientError> {
        self.post::<(), _>(&paths::challenge(order_id), None).await
    }

    /// `POST /api/v1/orders/{id}/issue`.
    pub async fn issue(
        &self,
        order_id: &str,
        req: &IssueRequest,
    ) -> Result<Answer<IssueResponse>, ClientError> {
        self.post(&paths::issue(order_id), Some(req)).await
    }

    /// `POST /api/v1/orders/{id}/installed`.
    pub async fn installed(
        &self,
        order_id: &str,
        req: &InstalledRequest,
    ) -> Result<Answer<InstalledResponse>, ClientError> {
        self.post(&paths::installed(order_id), Some(req)).await
    }

    async fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: Option<&B>,
    ) -> Result<Answer<T>, ClientError> {
        let url = self.url(path);
        let mut request = self.http.post(&url);
        if let Some(body) = body {
            let json = serde_json::to_vec(body).map_err(|e| ClientError::Transport {
                url: url.clone(),
                reason: format!("encoding the request: {e}"),
            })?;
            request = request
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(json);
        }
        tracing::debug!(%url, "portal request");
        let mut response = request
            .send()
            .await
            .map_err(|e| transport_error(&url, &e))?;
        let status = response.status().as_u16();
        let server_date = response
            .headers()
            .get(reqwest::header::DATE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| httpdate::parse_http_date(v).ok())
            .map(OffsetDateTime::from);
        if response
            .content_length()
            .is_some_and(|len| len > self.max_body as u64)
        {
            return Err(ClientError::TooLarge {
                url,
                limit: self.max_body,
            });
        }
        let mut bytes = Vec::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| transport_error(&url, &e))?
        {
            if bytes.len() + chunk.len() > self.max_body {
                return Err(ClientError::TooLarge {
                    url,
                    limit: self.max_body,
                });
            }
            bytes.extend_from_slice(&chunk);
        }
        tracing::debug!(%url, status, bytes = bytes.len(), "portal answer");
        if !(200..300).contains(&status) {
            return Err(match serde_json::from_slice::<ApiError>(&bytes) {
                Ok(e) => ClientError::Api {
                    status,
                    code: e.code,
                    message: e.message,
                },
                Err(_) => ClientError::Api {
                    status,
                    code: ErrorCode::Unknown,
                    message: String::from_utf8_lossy(&bytes[..bytes.len().min(200)]).into_owned(),
                },
            });
        }
        let value = serde_json::from_slice(&bytes).map_err(|e| ClientError::Garbage {
            url,
            status,
            reason: e.to_string(),
        })?;
        Ok(Answer { value, server_date })
    }
}

fn transport_error(url: &str, e: &reqwest::Error) -> ClientError {
    let mut chain = Vec::new();
    let mut source: Option<&dyn std::error::Error> = Some(e);
    while let Some(s) = source {
        chain.push(s.to_string());
        source = s.source();
    }
    let reason = chain.join(": ");
    let lower = reason.to_ascii_lowercase();
    if e.is_timeout() {
        ClientError::Timeout {
            url: url.to_owned(),
        }
    } else if [
        "certificate",
        "tls",
        "handshake",
        "corrupt message",
        "invalidcontenttype",
        "alert",
        "unknownissuer",
    ]
    .iter()
    .any(|k| lower.contains(k))
    {
        ClientError::Tls {
            url: url.to_owned(),
            reason,
        }
    } else if e.is_connect() {
        ClientError::Unreachable {
            url: url.to_owned(),
            reason,
        }
    } else {
        ClientError::Transport {
            url: url.to_owned(),
            reason,
        }
    }
}

/// A [`PortalClient`] for synchronous code: owns a small tokio runtime, or uses the
/// handle of an existing one (call it from a `spawn_blocking` thread, never from async
/// code).
#[derive(Debug)]
pub struct BlockingPortalClient {
    client: PortalClient,
    runtime: RuntimeRef,
}

#[derive(Debug)]
enum RuntimeRef {
    Own(tokio::runtime::Runtime),
    Handle(tokio::runtime::Handle),
}

impl BlockingPortalClient {
    /// Wraps `client` with its own current-thread runtime.
    pub fn new(client: PortalClient) -> Result<BlockingPortalClient, ClientError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| ClientError::Transport {
                url: client.base.clone(),
                reason: format!("starting the network runtime: {e}"),
            })?;
        Ok(BlockingPortalClient {
            client,
            runtime: RuntimeRef::Own(runtime),
        })
    }

    /// Wraps `client`, running requests on an existing runtime.
    pub fn with_handle(
        client: PortalClient,
        handle: tokio::runtime::Handle,
    ) -> BlockingPortalClient {
        BlockingPortalClient {
            client,
            runtime: RuntimeRef::Handle(handle),
        }
    }

    /// The async client.
    pub fn client(&self) -> &PortalClient {
        &self.client
    }

    fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        match &self.runtime {
            RuntimeRef::Own(rt) => rt.block_on(f),
            RuntimeRef::Handle(h) => h.block_on(f),
        }
    }

    /// See [`PortalClient::status`].
    pub fn status(&self, req: &StatusRequest) -> Result<Answer<RenewalStatus>, ClientError> {
        self.block_on(self.client.status(req))
    }

    /// See [`PortalClient::challenge`].
    pub fn challenge(&self, order_id: &str) -> Result<Answer<ChallengeResponse>, ClientError> {
        self.block_on(self.client.challenge(order_id))
    }

    /// See [`PortalClient::issue`].
    pub fn issue(
        &self,
        order_id: &str,
        req: &IssueRequest,
    ) -> Result<Answer<IssueResponse>, ClientError> {
        self.block_on(self.client.issue(order_id, req))
    }

    /// See [`PortalClient::installed`].
    pub fn installed(
        &self,
        order_id: &str,
        req: &InstalledRequest,
    ) -> Result<Answer<InstalledResponse>, ClientError> {
        self.block_on(self.client.installed(order_id, req))
    }
}
