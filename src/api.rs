//! The HTTP API: `POST /v1/collect` and the operations endpoints.
//!
//! [`app`] builds the router from an [`AppState`], so tests drive it without a socket. Every
//! error leaves through [`ApiError`] and its one mapping to a status and a JSON body.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use axum::extract::{ConnectInfo, MatchedPath, Request, State};
use axum::http::{self, HeaderName, HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::future::Either;
use serde::Serialize;
use serde_json::json;
use tower::{Layer, Service, ServiceBuilder};
use tower_http::cors::{self, AllowOrigin, Cors, CorsLayer};
use tower_http::trace::TraceLayer;
use tracing::{Level, debug, warn};
use uuid::Uuid;

use crate::batch::{Batch, BatchError, BatchErrorKind, DeviceIdSources};
use crate::clock::Clock;
use crate::config::CorsOrigins;
use crate::intake::{Intake, WRITE_KEY_HEADER, query_params};
use crate::log_limit::LogLimiter;
use crate::metrics::{Metrics, Route};
use crate::session::{ClientInfo, RecordError, Recorded, SessionStore};

/// Header a client can send its device id in, so a load balancer can route without the body.
pub const DEVICE_ID_HEADER: HeaderName = HeaderName::from_static("x-device-id");
/// Seconds a client is asked to wait before retrying while the server shuts down.
const RETRY_AFTER_SECONDS: u32 = 5;
/// Time a browser may cache a preflight response.
const CORS_MAX_AGE: Duration = Duration::from_secs(24 * 3600);

/// State shared by the handlers.
#[derive(Clone)]
pub struct AppState {
    pub sessions: Arc<SessionStore>,
    pub clock: Arc<dyn Clock>,
    pub intake: Arc<Intake>,
    pub metrics: Arc<Metrics>,
    /// Set when shutdown begins; readiness then reports 503.
    pub draining: Arc<AtomicBool>,
    /// Limits the warning about batches rejected during shutdown.
    pub rejected_log: Arc<LogLimiter>,
}

/// Every way a request can fail, each with one status.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{}", .0.message)]
    Batch(BatchError),
    #[error("{message}")]
    InvalidHeader {
        field: &'static str,
        message: &'static str,
    },
    #[error(
        "missing write key: send it as Authorization: Bearer, the X-Write-Key header or the writeKey query parameter"
    )]
    MissingWriteKey,
    #[error("invalid write key")]
    InvalidWriteKey,
    #[error("request body is larger than {limit_bytes} bytes")]
    BodyTooLarge { limit_bytes: usize },
    #[error("request body is larger than {limit_bytes} bytes after gzip decompression")]
    DecompressedTooLarge { limit_bytes: usize },
    #[error(
        "unsupported Content-Encoding {encoding:?}; send one layer of gzip or an uncompressed body"
    )]
    UnsupportedEncoding { encoding: String },
    #[error("invalid gzip body")]
    InvalidGzip,
    #[error("failed to read the request body")]
    BodyRead,
    #[error("the request body did not arrive in time")]
    BodyReadTimeout,
    #[error("the server is shutting down; retry in a few seconds")]
    ShuttingDown,
    #[error("not found")]
    NotFound,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct CollectResponse {
    /// Serialized in its hyphenated form from a buffer on the stack.
    session_id: Uuid,
    accepted: Accepted,
    duplicates: usize,
}

#[derive(Debug, Serialize)]
struct Accepted {
    impressions: usize,
    events: usize,
}

/// Builds the router with its middleware.
pub fn app(state: AppState) -> Router {
    // One shared pointer, so each request clones and drops a single reference count.
    let state = Arc::new(state);
    let allowed_origins = match &state.intake.cors_origins {
        CorsOrigins::Any => AllowOrigin::mirror_request(),
        CorsOrigins::List(origins) => AllowOrigin::list(
            origins
                .iter()
                .filter_map(|origin| HeaderValue::from_str(origin).ok()),
        ),
    };
    let cors = CorsLayer::new()
        .allow_origin(allowed_origins)
        .allow_methods([Method::POST, Method::GET])
        .allow_headers([
            header::CONTENT_TYPE,
            header::AUTHORIZATION,
            DEVICE_ID_HEADER,
            WRITE_KEY_HEADER,
        ])
        // A page must read Retry-After to honour it when the server sheds load.
        .expose_headers([header::RETRY_AFTER])
        .max_age(CORS_MAX_AGE);
    let router = Router::new()
        .route("/v1/collect", post(collect))
        .route("/v1/sessions/count", get(sessions_count))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .fallback(|| async { ApiError::NotFound })
        // One `layer` call: each call boxes every route again, which costs an allocation, a clone
        // and a move of the response per request. There is no request timeout layer because a
        // request waits only on its head and body reads, and both have their own timeouts.
        .layer(
            ServiceBuilder::new()
                .layer(BrowserCorsLayer(cors))
                .layer(middleware::from_fn_with_state(state.clone(), count_request)),
        )
        .with_state(state);
    // Requests are traced only when this module logs at debug level at start, because the layer
    // cost 2.5 % of a request in the router benchmark even with nothing logged.
    if !tracing::enabled!(Level::DEBUG) {
        return router;
    }
    // The span names the path only, because the query may carry a write key.
    router.layer(TraceLayer::new_for_http().make_span_with(|request: &Request| {
        tracing::debug_span!("request", method = %request.method(), path = %request.uri().path())
    }))
}

/// Applies CORS only to requests with an `Origin` header, which a browser sends with every
/// request to another origin. Other clients get no CORS headers, and their requests skip the
/// header map that the CORS layer builds for every request. Their responses also lack
/// `Vary: Origin`, which matters only to a shared cache, and no route sets caching headers.
#[derive(Clone)]
struct BrowserCorsLayer(CorsLayer);

/// The service of [`BrowserCorsLayer`]: the same inner service with and without CORS.
#[derive(Clone)]
struct BrowserCors<S> {
    cors: Cors<S>,
    plain: S,
}

impl<S: Clone> Layer<S> for BrowserCorsLayer {
    type Service = BrowserCors<S>;

    fn layer(&self, inner: S) -> Self::Service {
        BrowserCors {
            cors: self.0.layer(inner.clone()),
            plain: inner,
        }
    }
}

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for BrowserCors<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    ResBody: Default,
{
    type Response = http::Response<ResBody>;
    type Error = S::Error;
    type Future = Either<cors::ResponseFuture<S::Future>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Either may take the request, so both must be ready. Both are clones of one router
        // service, which is always ready.
        ready!(self.cors.poll_ready(cx))?;
        self.plain.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        if request.headers().contains_key(header::ORIGIN) {
            Either::Left(self.cors.call(request))
        } else {
            Either::Right(self.plain.call(request))
        }
    }
}

async fn collect(State(state): State<Arc<AppState>>, request: Request) -> Response {
    match record_batch(&state, request).await {
        Ok(recorded) => {
            state.metrics.items_recorded(&recorded);
            Json(CollectResponse {
                session_id: recorded.session_id,
                accepted: Accepted {
                    impressions: recorded.impressions,
                    events: recorded.events,
                },
                duplicates: recorded.duplicates(),
            })
            .into_response()
        }
        Err(err) => {
            let (status, code, field) = err.classify();
            state.metrics.batch_rejected(code);
            if status == StatusCode::SERVICE_UNAVAILABLE {
                if let Some(suppressed) = state.rejected_log.allow(state.clock.now_ms()) {
                    warn!(
                        suppressed,
                        "rejected a batch during shutdown; the client should retry"
                    );
                }
            } else {
                debug!(
                    status = status.as_u16(),
                    code,
                    field = field.as_deref(),
                    "rejected a batch"
                );
            }
            err.into_response()
        }
    }
}

/// Checks, reads, parses and records one batch.
async fn record_batch(state: &AppState, request: Request) -> Result<Recorded, ApiError> {
    let (parts, body) = request.into_parts();
    let intake = &state.intake;
    let query = query_params(parts.uri.query());
    intake.check_write_key(&parts.headers, &query)?;
    let body = intake.read_body(body, &parts.headers).await?;
    let received_ms = state.clock.now_ms();

    let header = match parts.headers.get(&DEVICE_ID_HEADER) {
        None => None,
        Some(value) => Some(value.to_str().map_err(|_| ApiError::InvalidHeader {
            field: "X-Device-Id header",
            message: "must be visible ASCII",
        })?),
    };
    let sources = DeviceIdSources {
        header,
        query: query.device_id.as_deref(),
    };
    let batch =
        Batch::parse_with(&body, sources, received_ms, &intake.limits).map_err(ApiError::Batch)?;

    let peer = parts
        .extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(peer)| peer.ip());
    let client = ClientInfo {
        ip_address: intake.client_address(peer, &parts.headers),
        user_agent: parts
            .headers
            .get(header::USER_AGENT)
            .and_then(|value| value.to_str().ok()),
    };
    state
        .sessions
        .record(batch, client)
        .map_err(|err| match err {
            RecordError::ShuttingDown => ApiError::ShuttingDown,
        })
}

/// Counts every request by route template and status class, with its duration.
async fn count_request(
    State(state): State<Arc<AppState>>,
    request: Request,
    next: Next,
) -> Response {
    let route = match request
        .extensions()
        .get::<MatchedPath>()
        .map(MatchedPath::as_str)
    {
        Some("/v1/collect") => Route::Collect,
        Some("/v1/sessions/count") => Route::SessionsCount,
        Some("/healthz") => Route::Healthz,
        Some("/readyz") => Route::Readyz,
        Some("/metrics") => Route::Metrics,
        _ => Route::Other,
    };
    let started = tokio::time::Instant::now();
    let response = next.run(request).await;
    let seconds = started.elapsed().as_secs_f64();
    state
        .metrics
        .request_finished(route, response.status().as_u16(), seconds);
    response
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    let metrics = &state.metrics;
    metrics
        .sessions_active
        .set(i64::try_from(state.sessions.len()).unwrap_or(i64::MAX));
    metrics.session_bytes.set(state.sessions.resident_bytes());
    metrics
        .ready
        .set(i64::from(!state.draining.load(Ordering::SeqCst)));
    metrics.update_pending_age(state.clock.now_ms());
    // The encoder writes OpenMetrics text, which Prometheus parses when the content type names it.
    let headers = [(
        header::CONTENT_TYPE,
        "application/openmetrics-text; version=1.0.0; charset=utf-8",
    )];
    (headers, metrics.render()).into_response()
}

async fn sessions_count(State(state): State<Arc<AppState>>) -> Json<serde_json::Value> {
    Json(json!({ "activeSessions": state.sessions.len() }))
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    if state.draining.load(Ordering::SeqCst) {
        return (StatusCode::SERVICE_UNAVAILABLE, "draining\n").into_response();
    }
    "ready\n".into_response()
}

// === impl ApiError ===

impl ApiError {
    /// Returns the status, the error code of the JSON body and the field it concerns.
    pub fn classify(&self) -> (StatusCode, &'static str, Option<String>) {
        match self {
            ApiError::Batch(err) => {
                let code = match err.kind {
                    BatchErrorKind::InvalidJson => "invalid_json",
                    BatchErrorKind::InvalidField => "invalid_field",
                };
                (StatusCode::BAD_REQUEST, code, Some(err.field.clone()))
            }
            ApiError::InvalidHeader { field, .. } => (
                StatusCode::BAD_REQUEST,
                "invalid_field",
                Some((*field).to_owned()),
            ),
            ApiError::MissingWriteKey => (StatusCode::UNAUTHORIZED, "missing_write_key", None),
            ApiError::InvalidWriteKey => (StatusCode::UNAUTHORIZED, "invalid_write_key", None),
            ApiError::BodyTooLarge { .. } => {
                (StatusCode::PAYLOAD_TOO_LARGE, "body_too_large", None)
            }
            ApiError::DecompressedTooLarge { .. } => {
                (StatusCode::PAYLOAD_TOO_LARGE, "body_too_large", None)
            }
            ApiError::UnsupportedEncoding { .. } => (
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_encoding",
                None,
            ),
            ApiError::InvalidGzip => (
                StatusCode::BAD_REQUEST,
                "invalid_gzip",
                Some("body".to_owned()),
            ),
            ApiError::BodyRead => (StatusCode::BAD_REQUEST, "body_read_failed", None),
            ApiError::BodyReadTimeout => (StatusCode::REQUEST_TIMEOUT, "body_read_timeout", None),
            ApiError::ShuttingDown => (StatusCode::SERVICE_UNAVAILABLE, "shutting_down", None),
            ApiError::NotFound => (StatusCode::NOT_FOUND, "not_found", None),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code, field) = self.classify();
        let mut body = json!({ "error": code, "message": self.to_string() });
        if let Some(field) = field {
            body["field"] = field.into();
        }
        let mut response = (status, Json(body)).into_response();
        let headers = response.headers_mut();
        match status {
            StatusCode::SERVICE_UNAVAILABLE => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECONDS));
            }
            StatusCode::UNAUTHORIZED => {
                headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            // The rest of the body may be unread, so the connection cannot carry another
            // request; saying so keeps clients from reusing it.
            StatusCode::PAYLOAD_TOO_LARGE | StatusCode::REQUEST_TIMEOUT => {
                headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            _ => {}
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use axum::body::{Body, to_bytes};
    use axum::http::{HeaderMap, Request as HttpRequest};
    use serde_json::Value;
    use tower::ServiceExt;

    use super::*;
    use crate::clock::ManualClock;
    use crate::session::{CloseReason, ClosedSession, SessionLimits};

    const MAX_BODY_BYTES: usize = 1024;

    struct Harness {
        state: AppState,
        closed: Arc<Mutex<Vec<ClosedSession>>>,
    }

    impl Harness {
        fn new() -> Self {
            Self::with_cors_origins(CorsOrigins::Any)
        }

        fn with_cors_origins(cors_origins: CorsOrigins) -> Self {
            let closed = Arc::new(Mutex::new(Vec::new()));
            let limits = SessionLimits {
                timeout: Duration::from_secs(1800),
                max_duration: Duration::from_secs(86_400),
                max_items: crate::session::DEFAULT_MAX_SESSION_ITEMS,
            };
            let intake = Intake {
                max_body_bytes: MAX_BODY_BYTES,
                max_decompressed_bytes: 4 * MAX_BODY_BYTES,
                body_read_timeout: Duration::from_secs(5),
                limits: crate::limits::BatchLimits::default(),
                write_keys: Vec::new(),
                cors_origins,
                trusted_proxies: Vec::new(),
                ip_mode: crate::config::IpMode::Full,
            };
            let metrics = Arc::new(Metrics::new());
            let store =
                SessionStore::new(limits, Box::new(closed.clone())).with_metrics(metrics.clone());
            let state = AppState {
                sessions: Arc::new(store),
                clock: Arc::new(ManualClock::at("2026-12-04T10:00:00Z")),
                intake: Arc::new(intake),
                metrics,
                draining: Arc::new(AtomicBool::new(false)),
                rejected_log: Arc::new(LogLimiter::new(Duration::from_secs(10))),
            };
            Self { state, closed }
        }

        async fn send(&self, request: HttpRequest<Body>) -> (StatusCode, HeaderMap, Value) {
            let response = app(self.state.clone()).oneshot(request).await.unwrap();
            let status = response.status();
            let headers = response.headers().clone();
            let bytes = to_bytes(response.into_body(), usize::MAX).await.unwrap();
            let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            (status, headers, body)
        }

        /// Posts the valid batch with one more header and returns the status and headers.
        async fn collect_valid_with(
            &self,
            name: HeaderName,
            value: &str,
        ) -> (StatusCode, HeaderMap) {
            let request = HttpRequest::post("/v1/collect")
                .header(name, value)
                .body(Body::from(VALID))
                .unwrap();
            let (status, headers, _) = self.send(request).await;
            (status, headers)
        }

        async fn collect(&self, body: impl Into<Body>) -> (StatusCode, Value) {
            let request = HttpRequest::post("/v1/collect").body(body.into()).unwrap();
            let (status, _, body) = self.send(request).await;
            (status, body)
        }

        /// Closes every session and returns the stored items, to show what a request stored.
        fn stored_items(&self) -> usize {
            self.state.sessions.close_all(CloseReason::Shutdown, 0);
            let closed = self.closed.lock().unwrap();
            closed
                .iter()
                .map(|s| s.impressions.len() + s.events.len())
                .sum()
        }
    }

    const VALID: &str = r#"{"deviceId": "d-1", "impressions": [{"impressionId": "i-1", "feature": "f"}],
                            "events": [{"eventId": "e-1", "name": "click", "impressionId": "i-1"}]}"#;

    #[tokio::test]
    async fn collect_accepts_valid_batch() {
        let harness = Harness::new();
        let (status, body) = harness.collect(VALID).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body["accepted"]["impressions"], 1);
        assert_eq!(body["accepted"]["events"], 1);
        assert_eq!(body["duplicates"], 0);
        assert!(uuid::Uuid::parse_str(body["sessionId"].as_str().unwrap()).is_ok());
        assert_eq!(harness.stored_items(), 2);
    }

    /// Returns the CORS headers of `headers` and `Vary`, as name and value.
    fn cors_headers(headers: &HeaderMap) -> Vec<(String, String)> {
        let cors = headers.iter().filter(|(name, _)| {
            name.as_str().starts_with("access-control-") || *name == header::VARY
        });
        cors.map(|(name, value)| (name.to_string(), value.to_str().unwrap().to_owned()))
            .collect()
    }

    #[tokio::test]
    async fn requests_without_origin_get_no_cors_headers() {
        let harness = Harness::new();
        let request = HttpRequest::post("/v1/collect")
            .body(Body::from(VALID))
            .unwrap();
        let (status, headers, _) = harness.send(request).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(cors_headers(&headers), []);
    }

    #[tokio::test]
    async fn origins_not_listed_are_not_allowed() {
        let origins = CorsOrigins::List(vec!["https://shop.example".to_owned()]);
        let harness = Harness::with_cors_origins(origins);
        for (origin, allowed) in [
            ("https://shop.example", true),
            ("https://other.example", false),
        ] {
            let (status, headers) = harness.collect_valid_with(header::ORIGIN, origin).await;
            assert_eq!(status, StatusCode::OK, "{origin}");
            let allow_origin = headers.get(header::ACCESS_CONTROL_ALLOW_ORIGIN);
            assert_eq!(allow_origin.is_some(), allowed, "{origin}");
        }
    }

    #[tokio::test]
    async fn collect_ignores_content_type() {
        let harness = Harness::new();
        for content_type in [
            "application/json",
            "text/plain;charset=UTF-8",
            "application/x-www-form-urlencoded",
        ] {
            let (status, _) = harness
                .collect_valid_with(header::CONTENT_TYPE, content_type)
                .await;
            assert_eq!(status, StatusCode::OK, "{content_type}");
        }
    }

    #[tokio::test]
    async fn malformed_bodies_get_400_and_store_nothing() {
        let cases: [(&[u8], &str, &str); 7] = [
            (b"{", "invalid_json", "body"),
            (b"[]", "invalid_json", "body"),
            (br#"{"deviceId": 5}"#, "invalid_field", "deviceId"),
            (
                br#"{"deviceId": "d", "impressions": {}}"#,
                "invalid_field",
                "impressions",
            ),
            (
                br#"{"deviceId": "d", "impressions": [{"feature": "f"}]}"#,
                "invalid_field",
                "impressions[0].impressionId",
            ),
            (br#"{"impressions": []}"#, "invalid_field", "deviceId"),
            (b"{\"deviceId\": \"\xc3\x28\"}", "invalid_json", "deviceId"),
        ];
        let harness = Harness::new();
        for (body, code, field) in cases {
            let (status, error) = harness.collect(body.to_vec()).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{error}");
            assert_eq!(error["error"], code, "{error}");
            assert_eq!(error["field"], field, "{error}");
        }
        assert_eq!(harness.stored_items(), 0);
    }

    #[tokio::test]
    async fn batch_with_one_bad_item_stores_nothing() {
        let harness = Harness::new();
        let body = r#"{"deviceId": "d", "impressions": [{"impressionId": "ok", "feature": "f"},
                                                        {"impressionId": "bad", "feature": ""}]}"#;
        let (status, error) = harness.collect(body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(error["field"], "impressions[1].feature");
        assert_eq!(harness.state.sessions.len(), 0);
    }

    #[tokio::test]
    async fn oversized_body_gets_413() {
        let harness = Harness::new();
        let big = vec![b' '; MAX_BODY_BYTES + 1];

        // With a Content-Length header, rejected before reading.
        let request = HttpRequest::post("/v1/collect")
            .header(header::CONTENT_LENGTH, big.len())
            .body(Body::from(big.clone()))
            .unwrap();
        let (status, headers, error) = harness.send(request).await;
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(error["error"], "body_too_large");
        assert_eq!(headers[header::CONNECTION], "close");

        // Streamed without a length, rejected while reading.
        let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
            vec![Ok(vec![b' '; 800]), Ok(vec![b' '; 800])];
        let request = HttpRequest::post("/v1/collect")
            .body(Body::from_stream(futures_stream(chunks)))
            .unwrap();
        let (status, _, _) = harness.send(request).await;
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    }

    fn futures_stream(
        chunks: Vec<Result<Vec<u8>, std::io::Error>>,
    ) -> impl futures_core::Stream<Item = Result<Vec<u8>, std::io::Error>> {
        tokio_stream::iter(chunks)
    }

    #[tokio::test]
    async fn unknown_encoding_gets_415() {
        let harness = Harness::new();
        let request = HttpRequest::post("/v1/collect")
            .header(header::CONTENT_ENCODING, "br")
            .body(Body::from(VALID))
            .unwrap();
        let (status, _, error) = harness.send(request).await;
        assert_eq!(status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
        assert_eq!(error["error"], "unsupported_encoding");
    }

    #[tokio::test]
    async fn device_id_header_and_query_must_agree() {
        let harness = Harness::new();
        let request = HttpRequest::post("/v1/collect?deviceId=d-2")
            .header("x-device-id", "d-1")
            .body(Body::from("{}"))
            .unwrap();
        let (status, _, error) = harness.send(request).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(error["field"], "deviceId");

        let request = HttpRequest::post("/v1/collect?deviceId=d%201")
            .body(Body::from("{}"))
            .unwrap();
        let (status, _, _) = harness.send(request).await;
        assert_eq!(
            status,
            StatusCode::OK,
            "a keep-alive with the id in the query"
        );
        assert_eq!(harness.state.sessions.len(), 1);
    }

    #[tokio::test]
    async fn shutdown_answers_503_with_retry_after() {
        let harness = Harness::new();
        harness.state.draining.store(true, Ordering::SeqCst);
        let (status, _, _) = harness
            .send(HttpRequest::get("/readyz").body(Body::empty()).unwrap())
            .await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);

        harness.state.sessions.close_all(CloseReason::Shutdown, 0);
        let request = HttpRequest::post("/v1/collect")
            .body(Body::from(VALID))
            .unwrap();
        let (status, headers, error) = harness.send(request).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(headers[header::RETRY_AFTER], "5");
        assert_eq!(error["error"], "shutting_down");
    }

    #[tokio::test]
    async fn preflight_echoes_origin() {
        let harness = Harness::new();
        let request = HttpRequest::options("/v1/collect")
            .header(header::ORIGIN, "https://shop.example")
            .header(header::ACCESS_CONTROL_REQUEST_METHOD, "POST")
            .header(
                header::ACCESS_CONTROL_REQUEST_HEADERS,
                "content-type,x-device-id",
            )
            .body(Body::empty())
            .unwrap();
        let (status, headers, _) = harness.send(request).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            headers[header::ACCESS_CONTROL_ALLOW_ORIGIN],
            "https://shop.example"
        );
        let allowed = headers[header::ACCESS_CONTROL_ALLOW_HEADERS]
            .to_str()
            .unwrap();
        assert!(allowed.contains("x-device-id"), "{allowed}");
        assert!(
            headers[header::ACCESS_CONTROL_ALLOW_METHODS]
                .to_str()
                .unwrap()
                .contains("POST")
        );
    }

    #[tokio::test]
    async fn response_exposes_retry_after() {
        let harness = Harness::new();
        let (status, headers) = harness
            .collect_valid_with(header::ORIGIN, "https://shop.example")
            .await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            headers[header::ACCESS_CONTROL_ALLOW_ORIGIN],
            "https://shop.example"
        );
        assert_eq!(
            headers[header::ACCESS_CONTROL_EXPOSE_HEADERS],
            "retry-after"
        );
        assert!(headers.contains_key(header::VARY));
    }

    /// Returns the value of the sample `series` (name and labels as rendered) in `text`.
    fn sample(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }

    #[tokio::test]
    async fn metrics_count_known_traffic() {
        let harness = Harness::new();
        harness.collect(VALID).await;
        harness.collect(VALID).await;
        harness
            .collect(r#"{"deviceId": "d-2", "events": [{"eventId": "e", "name": "n"}]}"#)
            .await;
        harness.collect("{").await;
        harness.collect(r#"{"deviceId": 1}"#).await;
        let get = |path: &str| HttpRequest::get(path).body(Body::empty()).unwrap();
        harness.send(get("/healthz")).await;
        harness.send(get("/nowhere")).await;

        let response = app(harness.state.clone())
            .oneshot(get("/metrics"))
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let text = String::from_utf8(
            to_bytes(response.into_body(), usize::MAX)
                .await
                .unwrap()
                .to_vec(),
        )
        .unwrap();

        let expect = |series: &str, value: f64| {
            assert_eq!(sample(&text, series), Some(value), "{series} in:\n{text}");
        };
        expect(
            r#"impression_server_items_accepted_total{kind="impression"}"#,
            1.0,
        );
        expect(
            r#"impression_server_items_accepted_total{kind="event"}"#,
            2.0,
        );
        expect(
            r#"impression_server_items_duplicate_total{kind="impression"}"#,
            1.0,
        );
        expect(
            r#"impression_server_items_duplicate_total{kind="event"}"#,
            1.0,
        );
        expect(
            r#"impression_server_batches_rejected_total{reason="invalid_json"}"#,
            1.0,
        );
        expect(
            r#"impression_server_batches_rejected_total{reason="invalid_field"}"#,
            1.0,
        );
        expect(
            r#"impression_server_http_requests_total{route="/v1/collect",status_class="2xx"}"#,
            3.0,
        );
        expect(
            r#"impression_server_http_requests_total{route="/v1/collect",status_class="4xx"}"#,
            2.0,
        );
        expect(
            r#"impression_server_http_requests_total{route="/healthz",status_class="2xx"}"#,
            1.0,
        );
        expect(
            r#"impression_server_http_requests_total{route="other",status_class="4xx"}"#,
            1.0,
        );
        expect(
            r#"impression_server_http_request_duration_seconds_count{route="/v1/collect"}"#,
            5.0,
        );
        expect("impression_server_sessions_opened_total", 2.0);
        expect("impression_server_sessions_active", 2.0);
        expect("impression_server_ready", 1.0);
        assert!(sample(&text, "impression_server_session_bytes").is_some_and(|bytes| bytes > 0.0));

        harness.state.sessions.close_all(CloseReason::Shutdown, 0);
        let response = app(harness.state.clone())
            .oneshot(get("/metrics"))
            .await
            .unwrap();
        let text = String::from_utf8(
            to_bytes(response.into_body(), usize::MAX)
                .await
                .unwrap()
                .to_vec(),
        )
        .unwrap();
        assert_eq!(
            sample(
                &text,
                r#"impression_server_sessions_closed_total{reason="shutdown"}"#
            ),
            Some(2.0)
        );
        assert_eq!(
            sample(&text, "impression_server_session_items_count"),
            Some(2.0)
        );
        assert_eq!(
            sample(&text, "impression_server_session_items_sum"),
            Some(3.0)
        );
        assert_eq!(
            sample(&text, "impression_server_sessions_active"),
            Some(0.0)
        );
        assert_eq!(
            sample(&text, "impression_server_session_bytes"),
            Some(0.0),
            "closing frees every byte"
        );
    }

    #[test]
    fn every_error_code_is_a_metric_label() {
        let errors = [
            ApiError::Batch(BatchError {
                kind: BatchErrorKind::InvalidJson,
                field: String::new(),
                message: String::new(),
            }),
            ApiError::Batch(BatchError {
                kind: BatchErrorKind::InvalidField,
                field: String::new(),
                message: String::new(),
            }),
            ApiError::InvalidHeader {
                field: "f",
                message: "m",
            },
            ApiError::MissingWriteKey,
            ApiError::InvalidWriteKey,
            ApiError::BodyTooLarge { limit_bytes: 1 },
            ApiError::DecompressedTooLarge { limit_bytes: 1 },
            ApiError::UnsupportedEncoding {
                encoding: String::new(),
            },
            ApiError::InvalidGzip,
            ApiError::BodyRead,
            ApiError::BodyReadTimeout,
            ApiError::ShuttingDown,
            ApiError::NotFound,
        ];
        for error in errors {
            let code = error.classify().1;
            assert!(crate::metrics::REJECTION_REASONS.contains(&code), "{code}");
        }
    }

    #[tokio::test]
    async fn operations_endpoints_answer() {
        let harness = Harness::new();
        harness.collect(VALID).await;
        let get = |path: &str| HttpRequest::get(path).body(Body::empty()).unwrap();
        assert_eq!(harness.send(get("/healthz")).await.0, StatusCode::OK);
        assert_eq!(harness.send(get("/readyz")).await.0, StatusCode::OK);
        let (status, _, count) = harness.send(get("/v1/sessions/count")).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(count["activeSessions"], 1);
        let (status, _, error) = harness.send(get("/v1/unknown")).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_eq!(error["error"], "not_found");
    }
}
