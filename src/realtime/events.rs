//! What a connected dashboard may ask: join and leave classrooms, claim and
//! resolve help requests, set its status. Every request gets an
//! acknowledgement; a malformed payload gets `bad_request` and the socket
//! stays connected.

use std::sync::Arc;

use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use socketioxide::adapter::Adapter;
use socketioxide::extract::{AckSender, SocketRef, TryData};

use super::status_payload;
use crate::app::{App, Session};
use crate::classroom::SeatChange;
use crate::directory::{ClaimOutcome, ResolveOutcome};
use crate::model::{HelpStatus, InstructorStatus, classroom_room, from_millis, timestamp};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ClassroomRequest {
    classroom: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HelpAction {
    request_id: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StatusRequest {
    status: InstructorStatus,
}

/// Registers every client-to-server event on a freshly accepted socket.
pub(super) fn register<A: Adapter>(app: &App, s: &SocketRef<A>) {
    on(app, s, "join_classroom", join_classroom);
    on(app, s, "leave_classroom", leave_classroom);
    on(app, s, "claim_help", claim_help);
    on(app, s, "resolve_help", resolve_help);
    on(app, s, "set_status", set_status);
    on(app, s, "refresh_token", super::expiry::refresh_token);
}

/// Wires `handler` to `event`: parses the payload as `T`, answers
/// `bad_request` when it does not fit, and sends the handler's answer as
/// the acknowledgement.
fn on<A, T, F, Fut>(app: &App, s: &SocketRef<A>, event: &'static str, handler: F)
where
    A: Adapter,
    T: DeserializeOwned + Send + 'static,
    F: Fn(App, SocketRef<A>, Arc<Session>, T) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Value> + Send + 'static,
{
    let app = app.clone();
    s.on(
        event,
        move |s: SocketRef<A>, TryData(data): TryData<Value>, ack: AckSender<A>| {
            let (app, handler) = (app.clone(), handler.clone());
            async move {
                let Some(session) = s.extensions.get::<Arc<Session>>() else {
                    return;
                };
                let answer = match data.map(serde_json::from_value::<T>) {
                    Ok(Ok(request)) => handler(app, s.clone(), session, request).await,
                    Ok(Err(e)) => bad_request(e.to_string()),
                    Err(e) => bad_request(e.to_string()),
                };
                if let Err(error) = ack.send(&answer) {
                    tracing::debug!(sid = %s.id, event, %error, "acknowledgement not sent");
                }
            }
        },
    );
}

fn bad_request(detail: String) -> Value {
    json!({ "ok": false, "error": "bad_request", "detail": detail })
}

fn failure(error: &str) -> Value {
    json!({ "ok": false, "error": error })
}

fn unavailable(error: impl std::fmt::Display) -> Value {
    tracing::warn!(%error, "directory failed while answering a dashboard");
    json!({ "ok": false, "error": "unavailable", "detail": "the directory did not answer; retry" })
}

async fn join_classroom<A: Adapter>(
    app: App,
    s: SocketRef<A>,
    session: Arc<Session>,
    request: ClassroomRequest,
) -> Value {
    let classroom = request.classroom;
    match app.directory().classroom(&classroom).await {
        Ok(Some(_)) => {}
        Ok(None) => return failure("not_found"),
        Err(e) => return unavailable(e),
    }
    match app.directory().instructor(&session.email).await {
        Ok(Some(me)) if me.is_active && me.staffs(&classroom) => {}
        Ok(_) => return failure("forbidden"),
        Err(e) => return unavailable(e),
    }

    s.join(classroom_room(&classroom));
    let first = match app
        .live()
        .join(&classroom, &session.instructor(), &session.sid)
        .await
    {
        Ok(first) => first,
        Err(e) => return unavailable(e),
    };
    {
        let mut joined = session.classrooms.lock().expect("session lock");
        if !joined.contains(&classroom) {
            joined.push(classroom.clone());
        }
    }
    // A socket that left while the lookups ran must not stay listed, nor
    // in the room: socketioxide adds a closed socket to a room all the
    // same, and its disconnect clean-up has already run.
    if !s.connected() {
        s.leave(classroom_room(&classroom));
        left_classroom(&app, &session, &classroom).await;
        return failure("disconnected");
    }
    if first {
        announce_arrival(&app, &session, &classroom).await;
    }

    match app.snapshot(&classroom).await {
        Ok(snapshot) => json!({ "ok": true, "snapshot": snapshot }),
        Err(e) => unavailable(e),
    }
}

async fn leave_classroom<A: Adapter>(
    _app: App,
    s: SocketRef<A>,
    session: Arc<Session>,
    request: ClassroomRequest,
) -> Value {
    let classroom = request.classroom;
    s.leave(classroom_room(&classroom));
    let was_joined = {
        let mut joined = session.classrooms.lock().expect("session lock");
        let before = joined.len();
        joined.retain(|c| c != &classroom);
        before != joined.len()
    };
    if was_joined {
        left_classroom(&_app, &session, &classroom).await;
    }
    json!({ "ok": true })
}

/// Tells a classroom that an instructor is there, with their status.
async fn announce_arrival(app: &App, session: &Session, classroom: &str) {
    let status = app
        .live()
        .status(&session.instructor_id)
        .await
        .unwrap_or_default();
    app.notify(
        classroom,
        "instructor_status",
        status_payload(&session.instructor(), status),
    )
    .await;
}

/// Lists a socket in a classroom's presence again after another pod swept
/// its entry (this pod could not refresh it in time), and tells the
/// classroom the instructor is back if that pod announced them gone.
pub(super) async fn rejoin(app: &App, session: &Session, classroom: &str) {
    let watching = session
        .classrooms
        .lock()
        .expect("session lock")
        .iter()
        .any(|c| c == classroom);
    if !watching {
        return;
    }
    match app
        .live()
        .join(classroom, &session.instructor(), &session.sid)
        .await
    {
        Ok(true) => announce_arrival(app, session, classroom).await,
        Ok(false) => {}
        Err(error) => {
            tracing::warn!(%error, classroom, "cannot list a dashboard in presence again")
        }
    }
}

/// Drops the socket from a classroom's presence and tells the others when
/// it was the instructor's last socket there.
pub(super) async fn left_classroom(app: &App, session: &Session, classroom: &str) {
    match app
        .live()
        .leave(classroom, &session.instructor(), &session.sid)
        .await
    {
        Ok(true) => {
            let payload = status_payload(&session.instructor(), InstructorStatus::Offline);
            app.notify(classroom, "instructor_status", payload).await;
        }
        Ok(false) => {}
        // The presence entry expires on its own.
        Err(error) => tracing::warn!(%error, classroom, "cannot record leaving a classroom"),
    }
}

async fn claim_help<A: Adapter>(
    app: App,
    _s: SocketRef<A>,
    session: Arc<Session>,
    request: HelpAction,
) -> Value {
    let classroom = match check_staff_of_request(&app, &session, &request.request_id).await {
        Ok(classroom) => classroom,
        Err(answer) => return answer,
    };
    // A claim that other pods' dashboards would not hear of is not made.
    if !app.cluster_healthy() {
        return failure("unavailable");
    }
    let me = session.instructor();
    match app
        .directory()
        .directory()
        .claim_help(&request.request_id, &me)
        .await
    {
        Ok(ClaimOutcome::Claimed { claimed_at_ms, .. }) => {
            announce_claim(&app, &classroom, &request.request_id, &me, claimed_at_ms).await
        }
        // The holder asks again, perhaps because the announcement failed:
        // announce it again, so that every dashboard ends up knowing.
        Ok(ClaimOutcome::AlreadyClaimed(holder)) if holder.id == me.id => {
            let now = crate::model::to_millis(chrono::Utc::now());
            announce_claim(&app, &classroom, &request.request_id, &me, now).await
        }
        Ok(ClaimOutcome::AlreadyClaimed(holder)) => {
            json!({ "ok": false, "error": "already_claimed", "by": holder })
        }
        Ok(ClaimOutcome::Closed(status)) => closed(status),
        Ok(ClaimOutcome::NotFound) => failure("not_found"),
        Err(e) => unavailable(e),
    }
}

/// Sends `help_claimed`; the answer is `unavailable` when the cluster did
/// not take it (the claim stands: asking again announces it again).
async fn announce_claim(
    app: &App,
    classroom: &str,
    request_id: &str,
    me: &crate::model::InstructorRef,
    claimed_at_ms: i64,
) -> Value {
    let payload = json!({
        "request_id": request_id,
        "by": me,
        "claimed_at": timestamp(from_millis(claimed_at_ms)),
    });
    match app.broadcast(classroom, "help_claimed", payload).await {
        Ok(()) => json!({ "ok": true }),
        Err(_) => failure("unavailable"),
    }
}

async fn resolve_help<A: Adapter>(
    app: App,
    _s: SocketRef<A>,
    session: Arc<Session>,
    request: HelpAction,
) -> Value {
    if let Err(answer) = check_staff_of_request(&app, &session, &request.request_id).await {
        return answer;
    }
    // As for a claim: decide nothing other pods' dashboards would miss.
    if !app.cluster_healthy() {
        return failure("unavailable");
    }
    let me = session.instructor();
    match app
        .directory()
        .directory()
        .resolve_help(&request.request_id, &me)
        .await
    {
        Ok(ResolveOutcome::Resolved {
            request,
            resolved_at_ms,
        }) => {
            let payload = json!({
                "request_id": request.request_id,
                "by": me,
                "resolved_at": timestamp(from_millis(resolved_at_ms)),
            });
            app.notify(&request.classroom, "help_resolved", payload)
                .await;
            if let Ok(Some(room)) = app.directory().classroom(&request.classroom).await {
                let seat = request.seat.clamp(1, room.seats);
                let now = chrono::Utc::now();
                let change = SeatChange::HelpClosed;
                let live = app.live();
                match live
                    .update_seat(&request.classroom, room.seats, seat, change, now)
                    .await
                {
                    Ok(seat) => app.notify(&request.classroom, "seat_updated", seat).await,
                    Err(error) => tracing::warn!(%error, "seat not updated after a resolve"),
                }
            }
            json!({ "ok": true })
        }
        Ok(ResolveOutcome::Closed(status)) => closed(status),
        Ok(ResolveOutcome::NotFound) => failure("not_found"),
        Err(e) => unavailable(e),
    }
}

fn closed(status: HelpStatus) -> Value {
    match status {
        HelpStatus::Cancelled => failure("cancelled"),
        _ => failure("already_resolved"),
    }
}

/// `Err` with the answer to send when the request does not exist or the
/// instructor does not staff its classroom.
/// The classroom of the request, when `session`'s instructor staffs it.
async fn check_staff_of_request(
    app: &App,
    session: &Session,
    request_id: &str,
) -> Result<String, Value> {
    let request = match app.directory().directory().help_request(request_id).await {
        Ok(Some(request)) => request,
        Ok(None) => return Err(failure("not_found")),
        Err(e) => return Err(unavailable(e)),
    };
    match app.directory().instructor(&session.email).await {
        Ok(Some(me)) if me.is_active && me.staffs(&request.classroom) => Ok(request.classroom),
        Ok(_) => Err(failure("forbidden")),
        Err(e) => Err(unavailable(e)),
    }
}

async fn set_status<A: Adapter>(
    app: App,
    _s: SocketRef<A>,
    session: Arc<Session>,
    request: StatusRequest,
) -> Value {
    if request.status == InstructorStatus::Offline {
        return bad_request("status must be available, helping or away".into());
    }
    if let Err(e) = app
        .live()
        .set_status(&session.instructor_id, request.status)
        .await
    {
        return unavailable(e);
    }
    let classrooms = session.classrooms.lock().expect("session lock").clone();
    for classroom in classrooms {
        let payload = status_payload(&session.instructor(), request.status);
        app.notify(&classroom, "instructor_status", payload).await;
    }
    json!({ "ok": true })
}
