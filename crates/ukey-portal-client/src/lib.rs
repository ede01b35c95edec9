//! HTTPS client of the renewal portal protocol (`ukey-portal-api`), over reqwest's
//! blocking client with rustls. The only crate that speaks HTTP to a portal.
//!
//! Every answer comes with the server's `Date` header ([`Answer::server_date`]) so the
//! renewal engine can measure clock skew before it trusts validity periods. Failures
//! are typed ([`ClientError`]): portal unreachable, TLS, timeout, an HTTP error with the
//! portal's error code, a body that is not what the protocol says, or a body larger
//! than [`PortalClient::max_body`] (read in chunks and cut off, never buffered whole).
//!
//! Besides the protocol's calls, [`PortalClient::probe`] looks at the portal the way a
//! support desk does (any HTTP answer, its status, round trip, `Date` and whether TLS
//! verified) and [`PortalClient::ca_certificates`] fetches the issuing CA
//! (`GET /api/v1/ca`), so that diagnostics need no HTTP client of their own.
//!
//! [`PortalClient`] is synchronous: its callers (the CLI, the renewal engine, the
//! diagnosis, the desktop app's worker threads) are. Do not create or drop one inside
//! an async task (reqwest's blocking client runs its own runtime).

use std::time::{Duration, Instant, SystemTime};

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

/// Timeout of a [`PortalClient::probe`]: a diagnosis should not hang for a minute.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// What [`PortalClient::probe`] saw: the portal answered over HTTP (any status).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    /// The URL probed.
    pub url: String,
    /// HTTP status of the answer (an error status is still an answer).
    pub http_status: u16,
    /// From sending the request to the answer's headers.
    pub round_trip: Duration,
    /// Local time when the request was sent.
    pub sent_at: SystemTime,
    /// The `Date` header as sent, if any (kept raw: a support desk wants to see a bad one).
    pub date_header: Option<String>,
    /// The `Date` header, if present and valid.
    pub server_date: Option<OffsetDateTime>,
    /// HTTPS, and the TLS handshake verified the portal's certificate. `false` for plain
    /// HTTP. (A failed handshake is [`ClientError::Tls`], not a probe.)
    pub tls_verified: bool,
}

impl Probe {
    /// The local time the server's `Date` should be compared with: the middle of the
    /// round trip.
    pub fn local_midpoint(&self) -> SystemTime {
        self.sent_at + self.round_trip / 2
    }

    /// Local clock minus the portal's, in whole seconds (positive: the local clock is
    /// ahead); `None` without a valid `Date`.
    pub fn clock_skew_seconds(&self) -> Option<i64> {
        let server = SystemTime::from(self.server_date?);
        Some(match self.local_midpoint().duration_since(server) {
            Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
            Err(e) => -i64::try_from(e.duration().as_secs()).unwrap_or(i64::MAX),
        })
    }
}

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

/// Client of one portal.
#[derive(Debug, Clone)]
pub struct PortalClient {
    base: String,
    https: bool,
    host: String,
    http: reqwest::blocking::Client,
    max_body: usize,
    timeout: Option<Duration>,
}

/// Whether the URL's host is this computer: `localhost`, 127.0.0.0/8 or ::1.
pub fn is_loopback(url: &reqwest::Url) -> bool {
    match url.host_str() {
        Some(h) if h.eq_ignore_ascii_case("localhost") => true,
        Some(h) => h
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback()),
        None => false,
    }
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
        let parsed = reqwest::Url::parse(&base).map_err(|e| invalid(e.to_string()))?;
        let host = match parsed.host_str() {
            Some(h) if !h.is_empty() => h.to_owned(),
            _ => return Err(invalid("no host name".to_owned())),
        };
        if parsed.scheme() == "http" && !is_loopback(&parsed) {
            return Err(invalid(
                "plain http:// is refused except on this computer (loopback): the portal \
                 must be https://"
                    .to_owned(),
            ));
        }
        let mut builder = reqwest::blocking::Client::builder()
            // A redirect would take the holder's requests to another origin.
            .redirect(reqwest::redirect::Policy::none())
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
            https: parsed.scheme() == "https",
            host,
            base,
            http,
            max_body: DEFAULT_MAX_BODY,
            timeout: None,
        })
    }

    /// Sets the response body cap.
    pub fn max_body(mut self, bytes: usize) -> PortalClient {
        self.max_body = bytes;
        self
    }

    /// Sets the time each request may take, connecting included (default: 60 s; a
    /// diagnosis wants less). [`PortalClient::probe`] never waits longer than
    /// [`PROBE_TIMEOUT`].
    pub fn timeout(mut self, timeout: Duration) -> PortalClient {
        self.timeout = Some(timeout);
        self
    }

    /// The base URL.
    pub fn base_url(&self) -> &str {
        &self.base
    }

    /// Whether the portal is reached over HTTPS.
    pub fn is_https(&self) -> bool {
        self.https
    }

    /// The portal's host name or address (IPv6 in brackets), as in the URL.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// Whether the portal is on this computer (`localhost`, 127.0.0.0/8, `[::1]`): a
    /// test or demo portal, for which plain HTTP is fine.
    pub fn is_loopback(&self) -> bool {
        self.host == "localhost"
            || self
                .host
                .trim_matches(|c| c == '[' || c == ']')
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback())
    }

    /// A web page of the portal (payment page...), absolute.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// `POST /api/v1/status`.
    pub fn status(&self, req: &StatusRequest) -> Result<Answer<RenewalStatus>, ClientError> {
        self.post(paths::STATUS, Some(req))
    }

    /// `POST /api/v1/orders/{id}/challenge`.
    pub fn challenge(&self, order_id: &str) -> Result<Answer<ChallengeResponse>, ClientError> {
        self.post::<(), _>(&paths::challenge(order_id), None)
    }

    /// `POST /api/v1/orders/{id}/issue`.
    pub fn issue(
        &self,
        order_id: &str,
        req: &IssueRequest,
    ) -> Result<Answer<IssueResponse>, ClientError> {
        self.post(&paths::issue(order_id), Some(req))
    }

    /// `POST /api/v1/orders/{id}/installed`.
    pub fn installed(
        &self,
        order_id: &str,
        req: &InstalledRequest,
    ) -> Result<Answer<InstalledResponse>, ClientError> {
        self.post(&paths::installed(order_id), Some(req))
    }

    /// Looks at the portal: `GET /openapi.yaml`, and any HTTP answer, error statuses
    /// included, is a [`Probe`] (status, round trip, `Date`, TLS verified). Fails only
    /// when there is no HTTP answer: [`ClientError::Unreachable`], [`ClientError::Tls`]
    /// (the handshake failed: untrusted certificate, not TLS at all...),
    /// [`ClientError::Timeout`] (after [`PROBE_TIMEOUT`]). The body is not read.
    pub fn probe(&self) -> Result<Probe, ClientError> {
        let url = self.url(paths::OPENAPI);
        tracing::debug!(%url, "portal probe");
        let sent_at = SystemTime::now();
        let started = Instant::now();
        let response = self
            .http
            .get(&url)
            .timeout(self.timeout.map_or(PROBE_TIMEOUT, |t| t.min(PROBE_TIMEOUT)))
            .send()
            .map_err(|e| transport_error(&url, &e))?;
        let round_trip = started.elapsed();
        let date_header = response
            .headers()
            .get(reqwest::header::DATE)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
        let server_date = server_date(response.headers());
        Ok(Probe {
            http_status: response.status().as_u16(),
            round_trip,
            sent_at,
            date_header,
            server_date,
            tls_verified: self.https,
            url,
        })
    }

    /// `GET /api/v1/ca`: the portal's issuing CA certificate, as DER. The protocol
    /// serves one DER certificate (`application/pkix-cert`); a PEM bundle or
    /// concatenated DER certificates (a chain) are accepted too, in the order served.
    /// Anything else is [`ClientError::Garbage`]. These certificates complete chains;
    /// they are not trust anchors (the portal could say anything).
    pub fn ca_certificates(&self) -> Result<Answer<Vec<Vec<u8>>>, ClientError> {
        let url = self.url(paths::CA_CERT);
        let (status, server_date, bytes) = self.send(self.http.get(&url), &url)?;
        check_status(status, &bytes)?;
        let certificates = parse_certificates(&bytes).map_err(|reason| ClientError::Garbage {
            url,
            status,
            reason,
        })?;
        Ok(Answer {
            value: certificates,
            server_date,
        })
    }

    /// One CMP exchange over HTTP (RFC 6712): POSTs a DER `PKIMessage` to `path` as
    /// `application/pkixcmp` and returns the answer's DER (any HTTP status: a CMP
    /// server answers errors with an error message). The body is capped as any
    /// answer is; `ukey-cmp` checks what it holds.
    pub fn cmp(&self, path: &str, message: &[u8]) -> Result<Answer<Vec<u8>>, ClientError> {
        let url = self.url(path);
        let request = self
            .http
            .post(&url)
            .header(reqwest::header::CONTENT_TYPE, "application/pkixcmp")
            .body(message.to_vec());
        let (status, server_date, bytes) = self.send(request, &url)?;
        if bytes.is_empty() {
            check_status(status, &bytes)?;
            return Err(ClientError::Garbage {
                url,
                status,
                reason: "an empty CMP answer".into(),
            });
        }
        Ok(Answer {
            value: bytes,
            server_date,
        })
    }

    fn post<B: Serialize, T: DeserializeOwned>(
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
        let (status, server_date, bytes) = self.send(request, &url)?;
        check_status(status, &bytes)?;
        let value = serde_json::from_slice(&bytes).map_err(|e| ClientError::Garbage {
            url,
            status,
            reason: e.to_string(),
        })?;
        Ok(Answer { value, server_date })
    }

    /// Sends `request` and reads the body up to [`PortalClient::max_body`]: (status,
    /// `Date`, body).
    fn send(
        &self,
        request: reqwest::blocking::RequestBuilder,
        url: &str,
    ) -> Result<(u16, Option<OffsetDateTime>, Vec<u8>), ClientError> {
        tracing::debug!(%url, "portal request");
        let request = match self.timeout {
            Some(t) => request.timeout(t),
            None => request,
        };
        let mut response = request.send().map_err(|e| transport_error(url, &e))?;
        let status = response.status().as_u16();
        let server_date = server_date(response.headers());
        let too_large = || ClientError::TooLarge {
            url: url.to_owned(),
            limit: self.max_body,
        };
        if response
            .content_length()
            .is_some_and(|len| len > self.max_body as u64)
        {
            return Err(too_large());
        }
        // Read in chunks and cut off at the cap, never buffered whole.
        let mut bytes = Vec::new();
        let mut chunk = [0u8; 16 * 1024];
        loop {
            let n = std::io::Read::read(&mut response, &mut chunk).map_err(|e| {
                if e.kind() == std::io::ErrorKind::TimedOut {
                    ClientError::Timeout {
                        url: url.to_owned(),
                    }
                } else {
                    ClientError::Transport {
                        url: url.to_owned(),
                        reason: e.to_string(),
                    }
                }
            })?;
            if n == 0 {
                break;
            }
            if bytes.len() + n > self.max_body {
                return Err(too_large());
            }
            bytes.extend_from_slice(&chunk[..n]);
        }
        tracing::debug!(%url, status, bytes = bytes.len(), "portal answer");
        Ok((status, server_date, bytes))
    }
}

fn server_date(headers: &reqwest::header::HeaderMap) -> Option<OffsetDateTime> {
    headers
        .get(reqwest::header::DATE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| httpdate::parse_http_date(v).ok())
        .map(OffsetDateTime::from)
}

/// An error status becomes [`ClientError::Api`], with the portal's error code if the
/// body carries one.
fn check_status(status: u16, bytes: &[u8]) -> Result<(), ClientError> {
    if (200..300).contains(&status) {
        return Ok(());
    }
    Err(match serde_json::from_slice::<ApiError>(bytes) {
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
    })
}

/// Certificates from a PEM bundle or from one or more concatenated DER certificates.
/// Checks only the DER framing (each one a SEQUENCE, nothing left over): the caller
/// parses them.
fn parse_certificates(bytes: &[u8]) -> Result<Vec<Vec<u8>>, String> {
    let text_start = bytes.iter().position(|b| !b.is_ascii_whitespace());
    if text_start.is_some_and(|i| bytes[i..].starts_with(b"-----BEGIN")) {
        let blocks = pem::parse_many(bytes).map_err(|e| format!("bad PEM: {e}"))?;
        let certs: Vec<Vec<u8>> = blocks
            .into_iter()
            .filter(|p| p.tag() == "CERTIFICATE")
            .map(pem::Pem::into_contents)
            .collect();
        if certs.is_empty() {
            return Err("no CERTIFICATE in the PEM answer".to_owned());
        }
        for der in &certs {
            if der_sequence_len(der) != Some(der.len()) {
                return Err("a PEM CERTIFICATE is not one DER SEQUENCE".to_owned());
            }
        }
        return Ok(certs);
    }
    let mut out = Vec::new();
    let mut rest = bytes;
    while !rest.is_empty() {
        let Some(len) = der_sequence_len(rest).filter(|&l| l <= rest.len()) else {
            return Err(format!(
                "not a DER certificate (at byte {})",
                bytes.len() - rest.len()
            ));
        };
        out.push(rest[..len].to_vec());
        rest = &rest[len..];
    }
    if out.is_empty() {
        return Err("empty answer".to_owned());
    }
    Ok(out)
}

/// Total length (header + content) of the DER SEQUENCE at the start of `der`, if it
/// starts with one (read with the `der` crate).
fn der_sequence_len(der: &[u8]) -> Option<usize> {
    use der::{Decode as _, Encode as _};
    let mut reader = der::SliceReader::new(der).ok()?;
    let header = der::Header::decode(&mut reader).ok()?;
    if header.tag != der::Tag::Sequence {
        return None;
    }
    let total = (header.encoded_len().ok()? + header.length).ok()?;
    usize::try_from(total).ok()
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
