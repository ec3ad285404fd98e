//! The HTTP side: routes, the error type every handler answers with, and
//! the operational endpoints.

use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, OriginalUri, Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;

use crate::app::{App, SnapshotError};
use crate::auth::{Refusal, Role, bearer};
use crate::directory::DirectoryError;
use crate::drain::Connection;
use crate::ingest::validate::FieldError;
use crate::live::LiveError;

/// Seconds a client should wait before retrying a 503.
const RETRY_AFTER_SECS: &str = "2";

/// Every way an HTTP request can fail. The cause is logged once here; the
/// client sees a stable code and a short detail, never internals.
#[derive(Debug)]
pub enum ApiError {
    /// 401: no usable token.
    Unauthorized(&'static str),
    /// 401 with the refusal code of a bad token.
    Token(Refusal),
    /// 403: the token may not do this.
    Forbidden(String),
    /// 404: no such thing.
    NotFound(String),
    /// 400: the body is not JSON or could not be read.
    BadBody(String),
    /// 400: some fields are wrong.
    Invalid(Vec<FieldError>),
    /// 413: the body is larger than this many bytes.
    TooLarge(usize),
    /// 429: the token's request budget is spent; retry after this many
    /// seconds.
    RateLimited(u64),
    /// 503: storage or the directory did not answer.
    Unavailable(Arc<DirectoryError>),
    /// 503: shared live state (Redis) did not answer.
    Shared(LiveError),
    /// 503: the event could not be forwarded to the other pods.
    NotForwarded,
}

impl ApiError {
    /// Maps a token refusal to 401.
    pub fn from_refusal(refusal: Refusal) -> Self {
        ApiError::Token(refusal)
    }

    /// A 503 for a directory failure.
    pub fn unavailable(error: Arc<DirectoryError>) -> Self {
        ApiError::Unavailable(error)
    }

    /// A 503 for a shared-state failure.
    pub fn shared(error: LiveError) -> Self {
        ApiError::Shared(error)
    }

    /// A short label for the rejection metric.
    pub fn reason(&self) -> &'static str {
        match self {
            ApiError::Unauthorized(_) | ApiError::Token(_) => "unauthorized",
            ApiError::Forbidden(_) => "forbidden",
            ApiError::NotFound(_) => "not_found",
            ApiError::BadBody(_) | ApiError::Invalid(_) => "invalid",
            ApiError::TooLarge(_) => "too_large",
            ApiError::RateLimited(_) => "rate_limited",
            ApiError::Unavailable(_) | ApiError::Shared(_) => "unavailable",
            ApiError::NotForwarded => "cluster_unavailable",
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, body) = match self {
            ApiError::Unauthorized(detail) => (
                StatusCode::UNAUTHORIZED,
                json!({ "error": "invalid_token", "detail": detail }),
            ),
            ApiError::Token(refusal) => (
                StatusCode::UNAUTHORIZED,
                json!({ "error": refusal.code(), "detail": refusal.detail() }),
            ),
            ApiError::Forbidden(detail) => (
                StatusCode::FORBIDDEN,
                json!({ "error": "forbidden", "detail": detail }),
            ),
            ApiError::NotFound(detail) => (
                StatusCode::NOT_FOUND,
                json!({ "error": "not_found", "detail": detail }),
            ),
            ApiError::BadBody(message) => (
                StatusCode::BAD_REQUEST,
                json!({ "errors": [{ "index": 0, "field": "", "message": message }] }),
            ),
            ApiError::Invalid(errors) => (StatusCode::BAD_REQUEST, json!({ "errors": errors })),
            ApiError::TooLarge(limit) => (
                StatusCode::PAYLOAD_TOO_LARGE,
                json!({ "error": "payload_too_large",
                        "detail": format!("the body must not exceed {limit} bytes") }),
            ),
            ApiError::RateLimited(seconds) => {
                let body = json!({ "error": "rate_limited",
                                   "detail": "too many requests with this token; retry later" });
                let mut response = (StatusCode::TOO_MANY_REQUESTS, Json(body)).into_response();
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
                return response;
            }
            ApiError::Unavailable(_) | ApiError::Shared(_) | ApiError::NotForwarded => {
                let detail = match &self {
                    ApiError::Unavailable(error) => error.to_string(),
                    ApiError::Shared(error) => error.to_string(),
                    _ => "this pod cannot reach the cluster".to_string(),
                };
                tracing::warn!(error = %detail, "request answered 503");
                let body = json!({ "error": "unavailable",
                                   "detail": "the gateway cannot store or forward this now; retry later" });
                let mut response = (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response();
                response.headers_mut().insert(
                    header::RETRY_AFTER,
                    HeaderValue::from_static(RETRY_AFTER_SECS),
                );
                return response;
            }
        };
        (status, Json(body)).into_response()
    }
}

/// The application routes (the Socket.IO layer is added by the server).
pub fn router(app: App) -> Router {
    let limit = app.config().max_body_bytes;
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route(
            "/api/v1/events",
            post(crate::ingest::post_events).layer(DefaultBodyLimit::max(limit)),
        )
        .route("/api/v1/classrooms/{id}/snapshot", get(snapshot))
        .with_state(app)
}

/// The metrics listener's routes.
pub fn metrics_router(app: App) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .with_state(app)
}

async fn healthz() -> Json<serde_json::Value> {
    Json(json!({ "status": "ok" }))
}

/// While draining, new Socket.IO sessions are refused with 503 so that the
/// load balancer sends them to another pod; requests of existing sessions
/// (with a `sid`) and the HTTP API go on. Every Socket.IO request marks its
/// connection as one the drain closes.
pub async fn refuse_while_draining(
    State(app): State<App>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let socket_io = request.uri().path().starts_with("/socket.io");
    let connection = request
        .extensions()
        .get::<axum::extract::ConnectInfo<Connection>>();
    if let (true, Some(connection)) = (socket_io, connection) {
        // A drain closes this connection; plain HTTP ones finish.
        app.drain().realtime(connection.0.id);
    }
    let handshake = socket_io
        && !request
            .uri()
            .query()
            .unwrap_or_default()
            .split('&')
            .any(|p| p.starts_with("sid="));
    if handshake && app.drain().is_draining() {
        let body = json!({ "error": "draining", "detail": "this pod is shutting down" });
        let mut response = (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response();
        let retry = HeaderValue::from_static("1");
        response.headers_mut().insert(header::RETRY_AFTER, retry);
        return response;
    }
    next.run(request).await
}

/// Longest `Origin` written to the log of a refusal.
const ORIGIN_LOG_CHARS: usize = 200;

/// What the gateway checks and learns on every Socket.IO request:
///
/// - a browser `Origin` that `CELLGATE_ALLOWED_ORIGINS` does not allow is
///   refused with 403, polling and the WebSocket upgrade alike (WebSockets
///   are not subject to CORS, so only the server can refuse them);
/// - a WebSocket upgrade answered `101` starts the payload meter of its
///   connection and, for an upgrade of a polling session, tells which
///   connection carries that socket (to close a dashboard too slow for its
///   queue);
/// - a polling body over `CELLGATE_MAX_SOCKET_PAYLOAD_BYTES` (Engine.IO
///   answers 413 and closes the session) is counted.
pub async fn guard_socket_io(
    State(app): State<App>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if !request.uri().path().starts_with("/socket.io") {
        return next.run(request).await;
    }
    let limits = app.limits();
    if let Some(origin) = request.headers().get(header::ORIGIN) {
        let host = request
            .headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok());
        let allowed = origin
            .to_str()
            .is_ok_and(|origin| limits.origins().allows(origin, host));
        if !allowed {
            app.metrics().origin_refusals.inc();
            let shown: String = String::from_utf8_lossy(origin.as_bytes())
                .chars()
                .take(ORIGIN_LOG_CHARS)
                .collect();
            tracing::info!(
                origin = shown,
                "Socket.IO request refused: origin not in CELLGATE_ALLOWED_ORIGINS"
            );
            let body = json!({ "error": "origin_not_allowed",
                               "detail": "this origin may not use the gateway" });
            return (StatusCode::FORBIDDEN, Json(body)).into_response();
        }
    }
    let query = request.uri().query().unwrap_or_default().to_string();
    let param = |name: &str| {
        form_urlencoded::parse(query.as_bytes())
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.into_owned())
    };
    let websocket = param("transport").as_deref() == Some("websocket");
    let polling_post = !websocket && request.method() == axum::http::Method::POST;
    let connection = websocket
        .then(|| limits.connection_of(request.extensions()))
        .flatten();
    let sid = param("sid");

    let response = next.run(own_head(request)).await;
    match response.status() {
        StatusCode::SWITCHING_PROTOCOLS if websocket => {
            if let Some(connection) = connection {
                // Set before the 101 is written: the client's frames follow it.
                connection.websocket_started();
                if let Some(sid) = sid {
                    limits.transports().register(&sid, &connection);
                }
            }
        }
        StatusCode::PAYLOAD_TOO_LARGE if polling_post => {
            app.metrics()
                .socket_payloads_too_large
                .with_label_values(&["polling"])
                .inc();
            tracing::info!(
                sid = sid.as_deref().unwrap_or(""),
                "polling body over CELLGATE_MAX_SOCKET_PAYLOAD_BYTES; the session is closed"
            );
        }
        _ => {}
    }
    response
}

/// The request with its URI and headers copied into allocations of their
/// own. Engine.IO keeps the head of the request that opened a session for
/// as long as the session lives, and hyper hands out header values and the
/// URI as slices of the connection's read buffer (8 to 16 KiB): a single
/// kept header would hold that whole buffer, twice what the rest of an
/// idle dashboard costs. Copying the head (a few hundred bytes) lets the
/// buffer go as soon as the request is parsed.
fn own_head(request: axum::extract::Request) -> axum::extract::Request {
    let (mut parts, body) = request.into_parts();
    let mut headers = HeaderMap::with_capacity(parts.headers.len());
    for (name, value) in &parts.headers {
        let name = header::HeaderName::from_bytes(name.as_str().as_bytes())
            .expect("a parsed header name is valid");
        let mut owned =
            HeaderValue::from_bytes(value.as_bytes()).expect("a parsed header value is valid");
        owned.set_sensitive(value.is_sensitive());
        headers.append(name, owned);
    }
    parts.headers = headers;
    let owned_uri = |uri: &axum::http::Uri| uri.to_string().parse().ok();
    if let Some(uri) = owned_uri(&parts.uri) {
        parts.uri = uri;
    }
    // The router records the URI as it arrived, a slice of the same buffer.
    if let Some(OriginalUri(original)) = parts.extensions.get_mut::<OriginalUri>()
        && let Some(uri) = owned_uri(original)
    {
        *original = uri;
    }
    axum::extract::Request::from_parts(parts, body)
}

/// Largest Engine.IO error body rewritten by [`standard_engineio_errors`].
const ENGINEIO_ERROR_MAX_BYTES: usize = 256;

/// Engine.IO refusals (`400 {"code":1,"message":"Session ID unknown"}` and
/// the like) with the numeric `code` of the Engine.IO reference server:
/// engineioxide writes the code as a string (`"1"`), which load balancer
/// checks and clients written against the standard do not match.
pub async fn standard_engineio_errors(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let engineio = request.uri().path().starts_with("/socket.io");
    let response = next.run(request).await;
    let json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if !engineio || response.status() != StatusCode::BAD_REQUEST || !json {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, ENGINEIO_ERROR_MAX_BYTES).await else {
        return (StatusCode::BAD_REQUEST, parts.headers).into_response();
    };
    let fixed = serde_json::from_slice::<serde_json::Value>(&bytes)
        .ok()
        .and_then(|mut v| {
            let code: u64 = v.get("code")?.as_str()?.parse().ok()?;
            v["code"] = code.into();
            serde_json::to_vec(&v).ok()
        });
    let body = fixed.map_or(bytes, Into::into);
    parts.headers.remove(header::CONTENT_LENGTH);
    Response::from_parts(parts, axum::body::Body::from(body))
}

async fn readyz(State(app): State<App>) -> Response {
    if app.drain().is_draining() {
        let body = Json(json!({ "status": "draining" }));
        return (StatusCode::SERVICE_UNAVAILABLE, body).into_response();
    }
    let directory = app.directory().directory().ping().await;
    if let Err(error) = &directory {
        tracing::debug!(%error, "not ready: directory");
    }
    let cluster = match (app.clustered(), app.cluster_healthy()) {
        (false, _) => "single-node",
        (true, true) => "ok",
        (true, false) => "unavailable",
    };
    let directory = if directory.is_ok() {
        "ok"
    } else {
        "unavailable"
    };
    let ready = directory == "ok" && cluster != "unavailable";
    let status = if ready { "ready" } else { "not_ready" };
    let body = Json(json!({ "status": status, "directory": directory, "cluster": cluster }));
    let code = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, body).into_response()
}

async fn metrics(State(app): State<App>) -> impl IntoResponse {
    let content_type = [(
        header::CONTENT_TYPE,
        "text/plain; version=0.0.4; charset=utf-8",
    )];
    (content_type, app.metrics().render())
}

async fn snapshot(
    State(app): State<App>,
    Path(classroom): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let header = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let token = bearer(header).ok_or(ApiError::Unauthorized("no bearer token"))?;
    let claims = app
        .verifier()
        .verify(token, Role::Instructor)
        .await
        .map_err(ApiError::from_refusal)?;

    let me = match app.directory().instructor(&claims.sub).await {
        Ok(Some(me)) if me.is_active => me,
        Ok(Some(_)) => return Err(ApiError::Forbidden("the instructor is deactivated".into())),
        Ok(None) => return Err(ApiError::Forbidden("no such instructor".into())),
        Err(error) => return Err(ApiError::unavailable(error)),
    };
    match app.snapshot(&classroom).await {
        Ok(_) if !me.staffs(&classroom) => {
            Err(ApiError::Forbidden(format!("not staff of {classroom}")))
        }
        Ok(snapshot) => Ok(Json(snapshot).into_response()),
        Err(SnapshotError::NotFound) => {
            Err(ApiError::NotFound(format!("no classroom {classroom}")))
        }
        Err(SnapshotError::Directory(error)) => Err(ApiError::unavailable(error)),
        Err(SnapshotError::Live(error)) => Err(ApiError::shared(error)),
    }
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use tower::ServiceExt;

    use super::*;

    /// The gateway's answer to a polling request with a made-up sid.
    async fn unknown_sid(method: &str) -> (StatusCode, serde_json::Value) {
        let (layer, _io) = socketioxide::SocketIo::new_layer();
        let app = Router::new()
            .layer(layer)
            .layer(axum::middleware::from_fn(standard_engineio_errors));
        let request = axum::extract::Request::builder()
            .method(method)
            .uri("/socket.io/?EIO=4&transport=polling&sid=AAAAAAAAAAAAAAAA")
            .body(Body::from("4hello"))
            .unwrap();
        let response = app.oneshot(request).await.unwrap();
        let status = response.status();
        let body = axum::body::to_bytes(response.into_body(), 1024)
            .await
            .unwrap();
        (status, serde_json::from_slice(&body).unwrap())
    }

    #[test]
    fn a_kept_request_head_does_not_hold_the_buffer_it_was_parsed_from() {
        let buffer = axum::body::Bytes::from(
            "/socket.io/?EIO=4&transport=websocket\r\nBearer abc\r\nX-Custom-Seat: 7".to_string(),
        );
        let uri = axum::http::Uri::from_maybe_shared(buffer.slice(0..37)).unwrap();
        let bearer = HeaderValue::from_maybe_shared(buffer.slice(39..49)).unwrap();
        let mut request = axum::extract::Request::builder()
            .uri(uri.clone())
            .extension(OriginalUri(uri))
            .body(Body::empty())
            .unwrap();
        request.headers_mut().insert(header::AUTHORIZATION, bearer);
        request
            .headers_mut()
            .append("x-custom-seat", HeaderValue::from_static("7"));
        request
            .headers_mut()
            .append("x-custom-seat", HeaderValue::from_static("8"));
        let weak = buffer.clone();
        drop(buffer);
        assert!(!weak.is_unique(), "the request shares the buffer before");

        let owned = own_head(request);
        assert!(
            weak.is_unique(),
            "nothing but this test holds the buffer after"
        );
        assert_eq!(owned.uri(), "/socket.io/?EIO=4&transport=websocket");
        let OriginalUri(original) = owned.extensions().get().unwrap();
        assert_eq!(original, owned.uri());
        assert_eq!(owned.headers()[header::AUTHORIZATION], "Bearer abc");
        let seats: Vec<_> = owned.headers().get_all("x-custom-seat").iter().collect();
        assert_eq!(seats, ["7", "8"]);
    }

    #[tokio::test]
    async fn an_unknown_session_gets_the_standard_engineio_answer() {
        for method in ["GET", "POST"] {
            let (status, body) = unknown_sid(method).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{method}");
            assert_eq!(
                body,
                json!({ "code": 1, "message": "Session ID unknown" }),
                "{method}"
            );
        }
    }
}
