//! `POST /api/v1/events`: what notebook extensions send.
//!
//! A request is authenticated, read within the body limit, validated as a
//! whole, then applied: help requests are stored in the database before
//! anything is broadcast, so a 202 means the event will not be lost.

pub mod validate;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use chrono::Utc;
use serde_json::{Value, json};
use tracing::Instrument;
use tracing::field::Empty;

use crate::app::{App, NotForwarded};
use crate::auth::{Claims, Role, bearer};
use crate::classroom::SeatChange;
use crate::directory::NewHelpRequest;
use crate::http::ApiError;
use crate::model::{HelpRequest, HelpStatus, Seat, timestamp, to_millis};
use validate::{Event, EventType, Invalid, validate};

/// The handler of `POST /api/v1/events`: one `ingest` span per request,
/// the root of its trace.
pub async fn post_events(
    State(app): State<App>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let span = tracing::info_span!(
        "ingest",
        otel.kind = "server",
        http.request.method = "POST",
        http.route = "/api/v1/events",
        http.response.status_code = Empty,
        reason = Empty,
        classroom = Empty,
        events = Empty,
        accepted = Empty,
        duplicates = Empty,
    );
    let timer = app.metrics().ingest_duration.start_timer();
    let response = match ingest(&app, &headers, body).instrument(span.clone()).await {
        Ok(accepted) => (StatusCode::ACCEPTED, axum::Json(accepted)).into_response(),
        Err(error) => {
            let reason = error.reason();
            app.metrics()
                .events_rejected
                .with_label_values(&[reason])
                .inc();
            span.record("reason", reason);
            span.in_scope(|| error.into_response())
        }
    };
    timer.observe_duration();
    span.record("http.response.status_code", response.status().as_u16());
    response
}

async fn ingest(
    app: &App,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Value, ApiError> {
    let header = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let token = bearer(header).ok_or(ApiError::Unauthorized("no bearer token"))?;
    let claims = app
        .verifier()
        .verify_any_role(token)
        .instrument(tracing::info_span!("auth.verify_token", role = "student"))
        .await
        .map_err(ApiError::from_refusal)?;
    if claims.role != Role::Student {
        return Err(ApiError::Forbidden(
            "only student tokens may post events".into(),
        ));
    }
    let classroom_id = claims.classroom.clone().ok_or(ApiError::Forbidden(
        "the student token names no classroom".into(),
    ))?;
    if let Err(wait) = app.limits().ingest(token) {
        return Err(ApiError::RateLimited(wait.seconds()));
    }

    let span = tracing::Span::current();
    span.record("classroom", classroom_id.as_str());
    if !app.cluster_healthy() {
        return Err(ApiError::NotForwarded);
    }

    let body = body.map_err(|rejection| match rejection.status() {
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::TooLarge(app.config().max_body_bytes),
        _ => ApiError::BadBody(rejection.body_text()),
    })?;
    let body: Value = serde_json::from_slice(&body)
        .map_err(|e| ApiError::BadBody(format!("the body is not JSON: {e}")))?;

    let classroom = match app.directory().classroom(&classroom_id).await {
        Ok(Some(classroom)) => classroom,
        Ok(None) => return Err(ApiError::Forbidden(format!("no classroom {classroom_id}"))),
        Err(error) => return Err(ApiError::unavailable(error)),
    };
    let events = validate(body, &claims, classroom.seats).map_err(|invalid| match invalid {
        Invalid::Fields(errors) => ApiError::Invalid(errors),
        Invalid::Forbidden(detail) => ApiError::Forbidden(detail),
    })?;
    span.record("events", events.len() as u64);

    apply(app, &claims, &classroom_id, classroom.seats, events).await
}

/// Applies valid events in order; see the module documentation.
async fn apply(
    app: &App,
    claims: &Claims,
    classroom: &str,
    seats: u32,
    events: Vec<Event>,
) -> Result<Value, ApiError> {
    let started = Instant::now();
    let received = Utc::now();
    let mut duplicate_ids = Vec::new();

    // Repeats inside one batch count as duplicates of the first.
    let mut in_batch = HashSet::new();
    let (events, repeats): (Vec<_>, Vec<_>) = events
        .into_iter()
        .partition(|e| in_batch.insert(e.id.clone()));
    duplicate_ids.extend(repeats.into_iter().map(|e| e.id));

    let store = tracing::info_span!("help.store");
    let fresh_help = store_help_requests(app, claims, classroom, &events, received)
        .instrument(store)
        .await?;

    // Only the last state of each seat is sent, once per request.
    let mut seats_changed = BTreeMap::new();
    let mut accepted = 0usize;
    let step = Step {
        app,
        claims,
        classroom,
        seats,
        received,
        accepted_at: started,
    };
    for event in events {
        let key = format!("{classroom}/{}", event.id);
        let mut fresh = app
            .live()
            .first_sighting(&key)
            .await
            .map_err(ApiError::shared)?;
        let mut stored = None;
        if fresh
            && event.kind == EventType::HelpRequested
            && !fresh_help.get(&event.id).copied().unwrap_or(true)
        {
            // Stored by an earlier attempt whose broadcast failed (it
            // answered 503): send it now if it is still open, as stored.
            stored = still_open(app, claims, classroom, &event.id).await?;
            if stored.is_none() {
                fresh = false;
            }
        }
        if !fresh {
            duplicate_ids.push(event.id);
            continue;
        }
        match step.apply(&event, stored).await {
            Ok(changed) => seats_changed.extend(changed.into_iter().map(|s| (s.seat, s))),
            Err(error) => {
                app.live().forget_sighting(&key).await;
                // What was applied before stays applied; a retry sees duplicates.
                let _ = broadcast_seats(app, classroom, seats_changed).await;
                return Err(error);
            }
        }
        accepted += 1;
        let kind = event.kind.as_str();
        app.metrics()
            .events_ingested
            .with_label_values(&[kind])
            .inc();
    }
    broadcast_seats(app, classroom, seats_changed).await?;

    let duplicates = duplicate_ids.len();
    app.metrics().events_duplicate.inc_by(duplicates as u64);
    let span = tracing::Span::current();
    span.record("accepted", accepted as u64);
    span.record("duplicates", duplicates as u64);
    let apply_ms = started.elapsed().as_secs_f64() * 1000.0;
    tracing::debug!(classroom, accepted, duplicates, apply_ms, "events applied");
    Ok(json!({ "accepted": accepted, "duplicates": duplicates, "duplicate_ids": duplicate_ids }))
}

/// Stores every `help_requested` of the batch in one transaction; returns,
/// by event id, whether it was new.
async fn store_help_requests(
    app: &App,
    claims: &Claims,
    classroom: &str,
    events: &[Event],
    received: chrono::DateTime<Utc>,
) -> Result<HashMap<String, bool>, ApiError> {
    let help: Vec<_> = events
        .iter()
        .filter(|e| e.kind == EventType::HelpRequested)
        .map(|e| NewHelpRequest {
            request_id: e.id.clone(),
            classroom: classroom.to_string(),
            seat: e.seat,
            student: claims.sub.clone(),
            message: e.message.clone(),
            created_at_ms: to_millis(received),
        })
        .collect();
    let directory = app.directory().directory();
    let stored = directory
        .insert_help_requests(&help)
        .await
        .map_err(|e| ApiError::unavailable(Arc::new(e)))?;
    Ok(help
        .into_iter()
        .zip(stored)
        .map(|(h, fresh)| (h.request_id, fresh))
        .collect())
}

/// What every event of one request shares.
struct Step<'a> {
    app: &'a App,
    claims: &'a Claims,
    classroom: &'a str,
    seats: u32,
    received: chrono::DateTime<Utc>,
    /// When the request's events were accepted (valid, about to apply).
    accepted_at: Instant,
}

impl Step<'_> {
    /// Broadcasts one new event and returns the seats it changed. `stored`
    /// is a help request an earlier attempt stored, to be sent as it is.
    async fn apply(
        &self,
        event: &Event,
        stored: Option<HelpRequest>,
    ) -> Result<Vec<Seat>, ApiError> {
        let (app, classroom) = (self.app, self.classroom);
        let student = self.claims.sub.as_str();
        match event.kind {
            EventType::CellExecuted => {
                let mut payload = event.body.clone();
                let received_at = Value::from(timestamp(self.received));
                payload.insert("received_at".into(), received_at);
                forwarded(app.broadcast(classroom, "cell_executed", payload).await)?;
                self.delivered();
                let change = SeatChange::Cell {
                    student,
                    failed: event.failed,
                };
                Ok(vec![self.seat(event.seat, change).await?])
            }
            EventType::HelpRequested => {
                let request = stored.unwrap_or_else(|| HelpRequest {
                    request_id: event.id.clone(),
                    classroom: classroom.to_string(),
                    seat: event.seat,
                    student: student.to_string(),
                    message: event.message.clone(),
                    created_at: timestamp(self.received),
                    status: HelpStatus::Open,
                    claimed_by: None,
                });
                forwarded(app.broadcast(classroom, "help_requested", request).await)?;
                self.delivered();
                Ok(vec![
                    self.seat(event.seat, SeatChange::HelpOpened { student })
                        .await?,
                ])
            }
            EventType::HelpCancelled => {
                let cancelled = app
                    .directory()
                    .directory()
                    .cancel_help(classroom, student, event.request_id.as_deref())
                    .await
                    .map_err(|e| ApiError::unavailable(Arc::new(e)))?;
                let mut changed = Vec::with_capacity(cancelled.len());
                for request in cancelled {
                    let payload = json!({ "request_id": request.request_id });
                    forwarded(app.broadcast(classroom, "help_cancelled", payload).await)?;
                    self.delivered();
                    let seat = request.seat.clamp(1, self.seats);
                    changed.push(self.seat(seat, SeatChange::HelpClosed).await?);
                }
                Ok(changed)
            }
        }
    }

    /// The event's broadcast has left this pod.
    fn delivered(&self) {
        let metrics = self.app.metrics();
        let elapsed = self.accepted_at.elapsed().as_secs_f64();
        metrics.delivery_duration.observe(elapsed);
    }

    async fn seat(&self, seat: u32, change: SeatChange<'_>) -> Result<Seat, ApiError> {
        let live = self.app.live();
        live.update_seat(self.classroom, self.seats, seat, change, self.received)
            .await
            .map_err(ApiError::shared)
    }
}

/// The stored help request `request_id` when it belongs to this student and
/// classroom and nobody has taken it up yet.
async fn still_open(
    app: &App,
    claims: &Claims,
    classroom: &str,
    request_id: &str,
) -> Result<Option<HelpRequest>, ApiError> {
    let request = app
        .directory()
        .directory()
        .help_request(request_id)
        .await
        .map_err(|e| ApiError::unavailable(Arc::new(e)))?;
    Ok(request.filter(|r| {
        r.status == HelpStatus::Open && r.classroom == classroom && r.student == claims.sub
    }))
}

fn forwarded(result: Result<(), NotForwarded>) -> Result<(), ApiError> {
    result.map_err(|NotForwarded| ApiError::NotForwarded)
}

async fn broadcast_seats(
    app: &App,
    classroom: &str,
    seats: BTreeMap<u32, Seat>,
) -> Result<(), ApiError> {
    let mut result = Ok(());
    for seat in seats.into_values() {
        if app
            .broadcast(classroom, "seat_updated", seat)
            .await
            .is_err()
        {
            result = Err(ApiError::NotForwarded);
        }
    }
    result
}
