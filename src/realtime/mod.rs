//! The dashboards' side: Socket.IO namespace `/`.
//!
//! A handshake runs [`handshake::authenticate`] as connect middleware; a
//! refusal becomes the client's `connect_error` with the stable code as
//! `err.message`. An accepted socket gets `connection_accepted` first, then
//! the handlers in [`events`] answer its requests.

mod events;
mod expiry;
mod handshake;

use std::sync::Arc;

use serde_json::json;
use socketioxide::SocketIo;
use socketioxide::adapter::Adapter;
use socketioxide::extract::{SocketRef, TryData};
use socketioxide::handler::ConnectHandler;
use socketioxide::socket::DisconnectReason;
use socketioxide_core::adapter::DefinedAdapter;

use crate::app::{App, Session};
use crate::auth::Refusal;
use crate::limits::SocketSlot;
use crate::model::{InstructorRef, InstructorStatus, timestamp};

/// The only namespace dashboards use.
pub const NAMESPACE: &str = "/";

/// Registers the `/` namespace on `io`.
pub fn register<A: Adapter + DefinedAdapter>(io: &SocketIo<A>, app: App) -> A::InitRes {
    let auth_app = app.clone();
    let middleware = move |s: SocketRef<A>, TryData(auth): TryData<serde_json::Value>| {
        let app = auth_app.clone();
        async move {
            handshake::authenticate(&app, &s, auth.ok()).await?;
            // Here, before socketioxide sends CONNECT, and not in the
            // connect handler: socket.io-client flushes the requests it
            // buffered as soon as CONNECT arrives, which can be before the
            // handler runs, and socketioxide drops an event that has no
            // handler yet without an answer.
            //
            // The socket's own room lets a broadcast to the cluster leave
            // out the dashboards this node serves itself (`App::broadcast`).
            s.join(s.id.to_string());
            events::register(&app, &s);
            Ok::<(), Refusal>(())
        }
    };
    let on_connect = move |s: SocketRef<A>| {
        let app = app.clone();
        async move { connected(app, s) }
    };
    io.ns(NAMESPACE, on_connect.with(middleware))
}

fn connected<A: Adapter>(app: App, s: SocketRef<A>) {
    let Some(session) = s.extensions.get::<Arc<Session>>() else {
        // The middleware always stores a session before accepting.
        tracing::error!(sid = %s.id, "accepted socket without a session");
        let _ = s.disconnect();
        return;
    };

    let metrics = app.metrics();
    metrics
        .connected_sockets
        .with_label_values(&[NAMESPACE])
        .inc();
    metrics
        .connections_opened
        .with_label_values(&[NAMESPACE])
        .inc();
    let disconnect_app = app.clone();
    s.on_disconnect(move |s: SocketRef<A>, reason: DisconnectReason| {
        let app = disconnect_app.clone();
        async move { disconnected(app, s, reason).await }
    });

    let accepted = json!({
        "sid": s.id.to_string(),
        "instructor": { "id": session.instructor_id, "email": session.email, "name": session.name },
        "node": app.config().node_id,
        "server_time": timestamp(chrono::Utc::now()),
    });
    if let Err(error) = s.emit("connection_accepted", &accepted) {
        tracing::debug!(sid = %s.id, %error, "socket left before connection_accepted");
    }
    // After connection_accepted, which must come first: a token close to
    // its end is warned about at once.
    if let Some(life) = s.extensions.get::<Arc<expiry::TokenLife>>() {
        expiry::watch(&app, &s, life);
    }
}

async fn disconnected<A: Adapter>(app: App, s: SocketRef<A>, reason: DisconnectReason) {
    if let Some(life) = s.extensions.get::<Arc<expiry::TokenLife>>() {
        life.stop();
    }
    if let Some(slot) = s.extensions.get::<Arc<SocketSlot>>() {
        slot.release();
    }
    let metrics = app.metrics();
    metrics
        .connected_sockets
        .with_label_values(&[NAMESPACE])
        .dec();
    let closed = [NAMESPACE, crate::metrics::close_reason(reason)];
    metrics.connections_closed.with_label_values(&closed).inc();
    app.limits().transports().forget(&s.id.to_string());
    let Some(session) = app.remove_session(&s.id.to_string()) else {
        return;
    };
    tracing::info!(sid = %s.id, instructor_id = %session.instructor_id, ?reason, "dashboard disconnected");

    let classrooms = std::mem::take(&mut *session.classrooms.lock().expect("session lock"));
    for classroom in classrooms {
        events::left_classroom(&app, &session, &classroom).await;
    }
    app.live().close_session(&session).await;
}

/// Keeps the cluster's presence true, every third of the session TTL:
/// refreshes this pod's entries, lists again the sockets whose entry
/// another pod swept while this one could not refresh it, and tells the
/// classrooms this pod serves which instructors left with a pod that
/// stopped refreshing theirs (it crashed). Each departure is announced by
/// the one pod whose sweep removed it.
pub(crate) async fn tend_presence(app: &App) {
    let sessions = app.sessions();
    match app.live().refresh(&sessions, &app.config().node_id).await {
        Ok(swept) => {
            for (classroom, session) in swept {
                events::rejoin(app, &session, &classroom).await;
            }
        }
        Err(error) => {
            tracing::warn!(%error, "cannot refresh sessions in Redis");
            return;
        }
    }
    let mut classrooms: Vec<String> = sessions
        .iter()
        .flat_map(|s| s.classrooms.lock().expect("session lock").clone())
        .collect();
    classrooms.sort();
    classrooms.dedup();
    for classroom in classrooms {
        let gone = match app.live().sweep(&classroom).await {
            Ok(gone) => gone,
            Err(error) => {
                tracing::warn!(%error, classroom, "cannot sweep expired presence");
                continue;
            }
        };
        for instructor in gone {
            tracing::info!(
                classroom,
                instructor_id = %instructor.id,
                "instructor left with a pod that stopped refreshing their presence"
            );
            let payload = status_payload(&instructor, InstructorStatus::Offline);
            app.notify(&classroom, "instructor_status", payload).await;
        }
    }
}

/// The payload of `instructor_status`.
fn status_payload(instructor: &InstructorRef, status: InstructorStatus) -> serde_json::Value {
    json!({ "instructor": instructor, "status": status })
}
