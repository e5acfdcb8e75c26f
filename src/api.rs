//! The HTTP API: `POST /v1/collect` and the operations endpoints.
//!
//! [`app`] builds the router from an [`AppState`], so tests drive it without a socket. Every
//! error leaves through [`ApiError`] and its one mapping to a status and a JSON body.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use serde::Serialize;
use serde_json::json;
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;
use tracing::warn;

use crate::batch::{Batch, BatchError, BatchErrorKind, DeviceIdSources};
use crate::clock::Clock;
use crate::session::{ClientInfo, RecordError, SessionStore};

/// Header a client can send its device id in, so a load balancer can route without the body.
pub const DEVICE_ID_HEADER: HeaderName = HeaderName::from_static("x-device-id");
/// Query parameter a client can send its device id in; beacons cannot set headers.
pub const DEVICE_ID_PARAM: &str = "deviceId";
/// Seconds a client is asked to wait before retrying while the server shuts down.
const RETRY_AFTER_SECONDS: u32 = 5;
/// Longest time one request may take, body read included.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a browser may cache a preflight answer.
const CORS_MAX_AGE: Duration = Duration::from_secs(24 * 3600);

/// What the handlers share.
#[derive(Clone)]
pub struct AppState {
    pub sessions: Arc<SessionStore>,
    pub clock: Arc<dyn Clock>,
    pub max_body_bytes: usize,
    /// Set when shutdown begins; readiness then reports 503.
    pub draining: Arc<AtomicBool>,
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
    #[error("request body is larger than {limit_bytes} bytes")]
    BodyTooLarge { limit_bytes: usize },
    #[error("unsupported Content-Encoding {encoding:?}; send the body uncompressed")]
    UnsupportedEncoding { encoding: String },
    #[error("failed to read the request body")]
    BodyRead,
    #[error("the server is shutting down; retry in a few seconds")]
    ShuttingDown,
    #[error("not found")]
    NotFound,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct CollectResponse {
    session_id: String,
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
    let cors = CorsLayer::new()
        .allow_origin(AllowOrigin::mirror_request())
        .allow_methods([Method::POST, Method::GET])
        .allow_headers([header::CONTENT_TYPE, DEVICE_ID_HEADER])
        .max_age(CORS_MAX_AGE);

    Router::new()
        .route("/v1/collect", post(collect))
        .route("/v1/sessions/count", get(sessions_count))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .fallback(|| async { ApiError::NotFound })
        .layer(cors)
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            REQUEST_TIMEOUT,
        ))
        .layer(TraceLayer::new_for_http())
        .with_state(state)
}

async fn collect(
    State(state): State<AppState>,
    request: Request,
) -> Result<Json<CollectResponse>, ApiError> {
    let (parts, body) = request.into_parts();
    check_encoding(&parts.headers)?;
    let body = read_body(body, &parts.headers, state.max_body_bytes).await?;
    let received_ms = state.clock.now_ms();

    let header = match parts.headers.get(&DEVICE_ID_HEADER) {
        None => None,
        Some(value) => Some(value.to_str().map_err(|_| ApiError::InvalidHeader {
            field: "X-Device-Id header",
            message: "must be visible ASCII",
        })?),
    };
    let query = parts.uri.query().and_then(device_id_param);
    let sources = DeviceIdSources {
        header,
        query: query.as_deref(),
    };
    let batch = Batch::parse(&body, sources, received_ms).map_err(ApiError::Batch)?;

    let client = ClientInfo {
        ip_address: parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map(|ConnectInfo(peer)| peer.ip().to_string().into()),
        user_agent: parts
            .headers
            .get(header::USER_AGENT)
            .and_then(|value| value.to_str().ok())
            .map(Into::into),
    };
    let recorded = state
        .sessions
        .record(batch, client)
        .map_err(|err| match err {
            RecordError::ShuttingDown => ApiError::ShuttingDown,
        })?;

    Ok(Json(CollectResponse {
        session_id: recorded.session_id.hyphenated().to_string(),
        accepted: Accepted {
            impressions: recorded.impressions,
            events: recorded.events,
        },
        duplicates: recorded.duplicates,
    }))
}

async fn sessions_count(State(state): State<AppState>) -> Json<serde_json::Value> {
    Json(json!({ "activeSessions": state.sessions.len() }))
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(state): State<AppState>) -> Response {
    if state.draining.load(Ordering::SeqCst) {
        return (StatusCode::SERVICE_UNAVAILABLE, "draining\n").into_response();
    }
    "ready\n".into_response()
}

/// Rejects bodies in an encoding the server does not decode.
fn check_encoding(headers: &HeaderMap) -> Result<(), ApiError> {
    for value in headers.get_all(header::CONTENT_ENCODING) {
        let encoding = String::from_utf8_lossy(value.as_bytes())
            .trim()
            .to_ascii_lowercase();
        if !encoding.is_empty() && encoding != "identity" {
            return Err(ApiError::UnsupportedEncoding { encoding });
        }
    }
    Ok(())
}

/// Reads the whole body, refusing more than `limit_bytes`, before or while it arrives.
async fn read_body(body: Body, headers: &HeaderMap, limit_bytes: usize) -> Result<Bytes, ApiError> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<u64>().ok());
    if declared.is_some_and(|length| length > limit_bytes as u64) {
        return Err(ApiError::BodyTooLarge { limit_bytes });
    }

    match Limited::new(body, limit_bytes).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(err) if err.is::<LengthLimitError>() => Err(ApiError::BodyTooLarge { limit_bytes }),
        Err(_) => Err(ApiError::BodyRead),
    }
}

/// Returns the `deviceId` query parameter, if the query has one.
fn device_id_param(query: &str) -> Option<String> {
    form_urlencoded::parse(query.as_bytes())
        .find(|(name, _)| name == DEVICE_ID_PARAM)
        .map(|(_, value)| value.into_owned())
}

// === impl ApiError ===

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let message = self.to_string();
        let (status, code, field) = match &self {
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
            ApiError::BodyTooLarge { .. } => {
                (StatusCode::PAYLOAD_TOO_LARGE, "body_too_large", None)
            }
            ApiError::UnsupportedEncoding { .. } => (
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_encoding",
                None,
            ),
            ApiError::BodyRead => (StatusCode::BAD_REQUEST, "body_read_failed", None),
            ApiError::ShuttingDown => (StatusCode::SERVICE_UNAVAILABLE, "shutting_down", None),
            ApiError::NotFound => (StatusCode::NOT_FOUND, "not_found", None),
        };
        if status == StatusCode::SERVICE_UNAVAILABLE {
            warn!("rejected a batch during shutdown");
        }

        let mut body = json!({ "error": code, "message": message });
        if let Some(field) = field {
            body["field"] = field.into();
        }
        let mut response = (status, Json(body)).into_response();
        if status == StatusCode::SERVICE_UNAVAILABLE {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECONDS));
        }
        response
    }
}
