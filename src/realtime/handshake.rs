//! Connect-time authentication of a dashboard.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use socketioxide::adapter::Adapter;
use socketioxide::extract::SocketRef;
use tracing::Instrument;
use tracing::field::Empty;

use crate::app::{App, Session};
use crate::auth::{Refusal, Role, bearer};
use crate::limits::{SocketLimit, SocketSlot};
use crate::model::timestamp;

/// Accepts or refuses a handshake. On success the socket carries its
/// [`Session`]; on refusal the returned code is what the client reads as
/// `err.message`. One log line either way, never with the token.
///
/// Everything runs in one `handshake` span (the root of the connection's
/// trace) with the token check and the directory lookup as children.
pub(super) async fn authenticate<A: Adapter>(
    app: &App,
    s: &SocketRef<A>,
    auth: Option<serde_json::Value>,
) -> Result<(), Refusal> {
    let span = tracing::info_span!(
        "handshake",
        otel.kind = "server",
        sid = %s.id,
        outcome = Empty,
        reason = Empty,
        instructor_id = Empty,
    );
    decide(app, s, auth).instrument(span).await
}

async fn decide<A: Adapter>(
    app: &App,
    s: &SocketRef<A>,
    auth: Option<serde_json::Value>,
) -> Result<(), Refusal> {
    let started = Instant::now();
    let metrics = app.metrics();
    metrics.auth_attempts.inc();
    let outcome = check(app, s, auth).await;
    let elapsed = started.elapsed();
    let auth_duration_ms = elapsed.as_secs_f64() * 1000.0;
    let span = tracing::Span::current();

    match &outcome {
        Ok(session) => {
            span.record("instructor_id", session.instructor_id.as_str());
            metrics
                .auth_duration
                .with_label_values(&["accepted"])
                .observe(elapsed.as_secs_f64());
            tracing::info!(
                sid = %s.id,
                instructor_id = %session.instructor_id,
                auth_duration_ms,
                "connection accepted"
            );
            s.extensions.insert(session.clone());
            let register = tracing::info_span!("session.register");
            if let Err(error) = app.add_session(session.clone()).instrument(register).await {
                // Other pods could not see this dashboard; refuse rather
                // than serve it half-present.
                if let Some(slot) = s.extensions.get::<Arc<SocketSlot>>() {
                    slot.release();
                }
                app.limits().transports().forget(&s.id.to_string());
                tracing::warn!(sid = %s.id, %error, "session not shared; refusing");
                metrics
                    .auth_failures
                    .with_label_values(&["directory_unavailable"])
                    .inc();
                record_outcome(&span, Some(Refusal::DirectoryUnavailable.code()));
                return Err(Refusal::DirectoryUnavailable);
            }
            record_outcome(&span, None);
            Ok(())
        }
        Err((refusal, instructor_id)) => {
            metrics
                .auth_duration
                .with_label_values(&["refused"])
                .observe(elapsed.as_secs_f64());
            metrics
                .auth_failures
                .with_label_values(&[refusal.code()])
                .inc();
            record_outcome(&span, Some(refusal.code()));
            let (sid, reason, detail) = (s.id.to_string(), refusal.code(), refusal.detail());
            let instructor_id = instructor_id.as_deref().unwrap_or("");
            if *refusal == Refusal::DirectoryUnavailable {
                tracing::warn!(
                    sid,
                    reason,
                    detail,
                    instructor_id,
                    auth_duration_ms,
                    "connection refused"
                );
            } else {
                tracing::info!(
                    sid,
                    reason,
                    detail,
                    instructor_id,
                    auth_duration_ms,
                    "connection refused"
                );
            }
            Err(refusal.clone())
        }
    }
}

fn record_outcome(span: &tracing::Span, refused: Option<&'static str>) {
    match refused {
        None => span.record("outcome", "accepted"),
        Some(reason) => span.record("outcome", "refused").record("reason", reason),
    };
}

type Refused = (Refusal, Option<String>);

async fn check<A: Adapter>(
    app: &App,
    s: &SocketRef<A>,
    auth: Option<serde_json::Value>,
) -> Result<Arc<Session>, Refused> {
    // The cheap refusals first: a flood or a full pod costs no signature
    // check and no directory lookup.
    let limits = app.limits();
    if let Some(client) = limits.client_addr(s.req_parts())
        && limits.handshake(client).is_err()
    {
        return Err((Refusal::RateLimited, None));
    }
    if !limits.sockets().pod_has_room() {
        return Err((Refusal::ServerFull, None));
    }
    let token = token_of(app, s, auth.as_ref()).ok_or((Refusal::invalid("no token"), None))?;
    let claims = app
        .verifier()
        .verify(&token, Role::Instructor)
        .instrument(tracing::info_span!(
            "auth.verify_token",
            role = "instructor"
        ))
        .await
        .map_err(|r| (r, None))?;

    let instructor = match app.directory().instructor(&claims.sub).await {
        Ok(Some(instructor)) => instructor,
        Ok(None) => return Err((Refusal::InstructorNotFound, None)),
        Err(error) => {
            tracing::warn!(error = %error, "directory lookup failed during a handshake");
            return Err((Refusal::DirectoryUnavailable, None));
        }
    };
    if !instructor.is_active {
        return Err((Refusal::InstructorInactive, Some(instructor.id)));
    }
    let slot = limits.sockets().open(&instructor.id).map_err(|limit| {
        let refusal = match limit {
            SocketLimit::Instructor => Refusal::TooManyConnections,
            SocketLimit::Pod => Refusal::ServerFull,
        };
        (refusal, Some(instructor.id.clone()))
    })?;
    s.extensions.insert(Arc::new(slot));
    if opened_as_websocket(s.req_parts())
        && let Some(connection) = limits.connection_of(&s.req_parts().extensions)
    {
        // A WebSocket from the start: the handshake's connection is the
        // socket's (an upgraded one is told by the HTTP layer).
        limits.transports().register(&s.id.to_string(), &connection);
    }

    s.extensions
        .insert(super::expiry::TokenLife::new(app, claims.exp));
    Ok(Arc::new(Session {
        sid: s.id.to_string(),
        instructor_id: instructor.id,
        email: instructor.email,
        name: instructor.name,
        connected_at: timestamp(chrono::Utc::now()),
        classrooms: Mutex::new(Vec::new()),
    }))
}

/// Whether the Engine.IO session began as a WebSocket (not a polling
/// session that upgraded later).
fn opened_as_websocket(parts: &http::request::Parts) -> bool {
    let query = parts.uri.query().unwrap_or_default().as_bytes();
    form_urlencoded::parse(query).any(|(key, value)| key == "transport" && value == "websocket")
}

/// The token from `auth.token`, else `Authorization: Bearer`, else (only
/// when the operator allows it) the `token` query parameter.
fn token_of<A: Adapter>(
    app: &App,
    s: &SocketRef<A>,
    auth: Option<&serde_json::Value>,
) -> Option<String> {
    if let Some(token) = auth.and_then(|a| a.get("token")).and_then(|t| t.as_str()) {
        return Some(token.to_string());
    }
    let parts = s.req_parts();
    let header = parts
        .headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    if let Some(token) = bearer(header) {
        return Some(token.to_string());
    }
    if app.config().allow_query_token {
        let query = parts.uri.query().unwrap_or_default().as_bytes();
        return form_urlencoded::parse(query)
            .find(|(key, _)| key == "token")
            .map(|(_, value)| value.into_owned());
    }
    None
}
