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

use crate::app::App;
use crate::auth::{Claims, Role, bearer};
use crate::classroom::SeatChange;
use crate::directory::NewHelpRequest;
use crate::http::ApiError;
use crate::model::{HelpRequest, HelpStatus, Seat, timestamp, to_millis};
use validate::{Event, EventType, Invalid, validate};

/// The handler of `POST /api/v1/events`.
pub async fn post_events(
    State(app): State<App>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let timer = app.metrics().ingest_duration.start_timer();
    let response = match ingest(&app, &headers, body).await {
        Ok(accepted) => (StatusCode::ACCEPTED, axum::Json(accepted)).into_response(),
        Err(error) => {
            app.metrics()
                .events_rejected
                .with_label_values(&[error.reason()])
                .inc();
            error.into_response()
        }
    };
    timer.observe_duration();
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
        .map_err(ApiError::from_refusal)?;
    if claims.role != Role::Student {
        return Err(ApiError::Forbidden(
            "only student tokens may post events".into(),
        ));
    }
    let classroom_id = claims.classroom.clone().ok_or(ApiError::Forbidden(
        "the student token names no classroom".into(),
    ))?;

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
    let stored = app
        .directory()
        .directory()
        .insert_help_requests(&help)
        .await
        .map_err(|e| ApiError::unavailable(Arc::new(e)))?;
    let fresh_help: HashMap<_, _> = help
        .iter()
        .zip(stored)
        .map(|(h, fresh)| (h.request_id.clone(), fresh))
        .collect();

    // Only the last state of each seat is sent, once per request.
    let mut seats_changed = BTreeMap::new();
    let mut accepted = 0usize;
    for event in events {
        let key = format!("{classroom}/{}", event.id);
        let fresh = match event.kind {
            EventType::HelpRequested => fresh_help.get(&event.id).copied().unwrap_or(false),
            _ => app.first_sighting(key.clone()).await,
        };
        if !fresh {
            duplicate_ids.push(event.id);
            continue;
        }
        match apply_one(app, claims, classroom, seats, &event, received).await {
            Ok(changed) => seats_changed.extend(changed.into_iter().map(|s| (s.seat, s))),
            Err(error) => {
                app.forget_sighting(&key).await;
                broadcast_seats(app, classroom, seats_changed).await;
                return Err(error);
            }
        }
        accepted += 1;
        app.metrics()
            .events_ingested
            .with_label_values(&[event.kind.as_str()])
            .inc();
    }

    broadcast_seats(app, classroom, seats_changed).await;
    app.metrics()
        .events_duplicate
        .inc_by(duplicate_ids.len() as u64);
    tracing::debug!(
        classroom,
        accepted,
        duplicates = duplicate_ids.len(),
        apply_ms = started.elapsed().as_secs_f64() * 1000.0,
        "events applied"
    );
    Ok(
        json!({ "accepted": accepted, "duplicates": duplicate_ids.len(), "duplicate_ids": duplicate_ids }),
    )
}

async fn apply_one(
    app: &App,
    claims: &Claims,
    classroom: &str,
    seats: u32,
    event: &Event,
    received: chrono::DateTime<Utc>,
) -> Result<Vec<Seat>, ApiError> {
    let student = claims.sub.as_str();
    let live = app.live();
    match event.kind {
        EventType::CellExecuted => {
            let mut payload = event.body.clone();
            payload.insert("received_at".into(), Value::from(timestamp(received)));
            app.broadcast(classroom, "cell_executed", payload).await;
            let change = SeatChange::Cell {
                student,
                failed: event.failed,
            };
            Ok(vec![live.update_seat(
                classroom, seats, event.seat, change, received,
            )])
        }
        EventType::HelpRequested => {
            let request = HelpRequest {
                request_id: event.id.clone(),
                classroom: classroom.to_string(),
                seat: event.seat,
                student: student.to_string(),
                message: event.message.clone(),
                created_at: timestamp(received),
                status: HelpStatus::Open,
                claimed_by: None,
            };
            app.broadcast(classroom, "help_requested", request).await;
            let change = SeatChange::HelpOpened { student };
            Ok(vec![live.update_seat(
                classroom, seats, event.seat, change, received,
            )])
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
                app.broadcast(classroom, "help_cancelled", payload).await;
                let seat = request.seat.clamp(1, seats);
                let change = SeatChange::HelpClosed;
                changed.push(live.update_seat(classroom, seats, seat, change, received));
            }
            Ok(changed)
        }
    }
}

async fn broadcast_seats(app: &App, classroom: &str, seats: BTreeMap<u32, Seat>) {
    for seat in seats.into_values() {
        app.broadcast(classroom, "seat_updated", seat).await;
    }
}
