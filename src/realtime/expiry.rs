//! Tokens that expire while their dashboard is connected.
//!
//! Every accepted socket carries a [`TokenLife`]: when its token stops
//! being accepted (`exp` plus the clock leeway, the moment a reconnect with
//! the same token would be refused). [`watch`] warns the dashboard with
//! `token_expiring` [`WARN_AHEAD`] before that, and at that moment emits
//! `token_expired` and disconnects it from the server side, which
//! socket.io-client reports as `"io server disconnect"` and does not retry
//! on its own: the client gets a fresh token first instead of looping on
//! reconnect with a stale one. `refresh_token` moves the moment with a
//! fresh token of the same instructor.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::{Value, json};
use socketioxide::adapter::Adapter;
use socketioxide::extract::SocketRef;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::app::{App, Session};
use crate::auth::{Refusal, Role};
use crate::directory::normalize_email;
use crate::model::timestamp;

/// How long before the disconnect `token_expiring` is sent (the contract
/// asks for at least 60 s).
pub const WARN_AHEAD: Duration = Duration::from_secs(120);

/// When a socket's token stops being accepted, and the switch that ends
/// the watch when the socket goes.
pub(super) struct TokenLife {
    ends_at: watch::Sender<i64>,
    stop: CancellationToken,
}

impl TokenLife {
    /// The life of a token whose `exp` is `exp` (seconds since the epoch).
    pub(super) fn new(app: &App, exp: i64) -> Arc<Self> {
        Arc::new(TokenLife {
            ends_at: watch::channel(exp + leeway(app)).0,
            stop: CancellationToken::new(),
        })
    }

    /// Ends the watch (the socket disconnected).
    pub(super) fn stop(&self) {
        self.stop.cancel();
    }
}

/// How long after `exp` a token is still accepted: the leeway, plus the
/// second of `exp` itself (a token is valid while `now <= exp + leeway`,
/// in whole seconds).
fn leeway(app: &App) -> i64 {
    app.config().jwt_leeway_secs as i64 + 1
}

/// Watches the token of `s` until the socket disconnects.
pub(super) fn watch<A: Adapter>(app: &App, s: &SocketRef<A>, life: Arc<TokenLife>) {
    let (app, s) = (app.clone(), s.clone());
    tokio::spawn(async move {
        let mut ends_at = life.ends_at.subscribe();
        let mut warned_for = None;
        loop {
            let end = *ends_at.borrow_and_update();
            let warn = warned_for != Some(end);
            tokio::select! {
                _ = life.stop.cancelled() => return,
                changed = ends_at.changed() => {
                    if changed.is_err() { return; }
                }
                _ = sleep_until(end - WARN_AHEAD.as_secs() as i64), if warn => {
                    warned_for = Some(end);
                    let payload = json!({ "expires_at": rfc3339(end) });
                    if s.emit("token_expiring", &payload).is_err() { return; }
                }
                _ = sleep_until(end) => {
                    expire(&app, &s, end);
                    return;
                }
            }
        }
    });
}

fn expire<A: Adapter>(app: &App, s: &SocketRef<A>, end: i64) {
    app.metrics().token_expired_disconnects.inc();
    tracing::info!(sid = %s.id, "token expired; disconnecting the dashboard");
    let _ = s.emit("token_expired", &json!({ "expired_at": rfc3339(end) }));
    let _ = s.clone().disconnect();
}

/// Sleeps until `at`, seconds since the epoch (at once when it is past).
async fn sleep_until(at: i64) {
    let now = Utc::now().timestamp_millis();
    let wait = (at * 1000 - now).max(0) as u64;
    tokio::time::sleep(Duration::from_millis(wait)).await;
}

fn rfc3339(seconds: i64) -> String {
    let at = DateTime::<Utc>::from_timestamp(seconds, 0).unwrap_or_default();
    timestamp(at)
}

/// The payload of `refresh_token`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RefreshRequest {
    token: String,
}

/// `refresh_token`: a fresh token of the same, still active instructor
/// keeps the socket connected until that token expires.
pub(super) async fn refresh_token<A: Adapter>(
    app: App,
    s: SocketRef<A>,
    session: Arc<Session>,
    request: RefreshRequest,
) -> Value {
    let outcome = check_refresh(&app, &session, &request.token).await;
    let label = match &outcome {
        Ok(_) => "ok",
        Err(code) => code,
    };
    app.metrics()
        .token_refreshes
        .with_label_values(&[label])
        .inc();
    match outcome {
        Ok(exp) => {
            let Some(life) = s.extensions.get::<Arc<TokenLife>>() else {
                return json!({ "ok": false, "error": "not_connected" });
            };
            let end = exp + leeway(&app);
            life.ends_at.send_replace(end);
            tracing::info!(sid = %s.id, instructor_id = %session.instructor_id, "token refreshed");
            json!({ "ok": true, "expires_at": rfc3339(end) })
        }
        Err(code) => json!({ "ok": false, "error": code }),
    }
}

/// The new token's `exp`, or the error code of the acknowledgement.
async fn check_refresh(app: &App, session: &Session, token: &str) -> Result<i64, &'static str> {
    let claims = app
        .verifier()
        .verify(token, Role::Instructor)
        .await
        .map_err(|r| r.code())?;
    if normalize_email(&claims.sub) != normalize_email(&session.email) {
        return Err("different_instructor");
    }
    match app.directory().instructor(&claims.sub).await {
        Ok(Some(instructor)) if instructor.is_active => Ok(claims.exp),
        Ok(Some(_)) => Err(Refusal::InstructorInactive.code()),
        Ok(None) => Err(Refusal::InstructorNotFound.code()),
        Err(_) => Err(Refusal::DirectoryUnavailable.code()),
    }
}
