//! The shared state every request and socket handler works with.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use serde::Serialize;
use socketioxide::SocketIo;
use socketioxide::adapter::Adapter;
use tracing::Instrument;
use tracing::field::Empty;

use crate::auth::Verifier;
use crate::cluster::health::ClusterHealth;
use crate::directory::DirectoryError;
use crate::directory::cache::{DirectoryCache, with_retries};
use crate::drain::Drain;
use crate::live::{Live, LiveError};
use crate::metrics::Metrics;
use crate::model::{InstructorRef, Snapshot, classroom_room};

type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Why a broadcast did not reach every dashboard.
#[derive(Debug)]
pub enum EmitError {
    /// Some of this node's dashboards missed it (closing, or their queue is
    /// full); the cluster and every other dashboard got it.
    LocalSockets(String),
    /// The cluster did not take it, and the adapter did not emit it here
    /// either.
    Cluster(String),
}

impl From<socketioxide::BroadcastError> for EmitError {
    fn from(error: socketioxide::BroadcastError) -> Self {
        match error {
            socketioxide::BroadcastError::Socket(_) => EmitError::LocalSockets(error.to_string()),
            _ => EmitError::Cluster(error.to_string()),
        }
    }
}

impl std::fmt::Display for EmitError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EmitError::LocalSockets(error) | EmitError::Cluster(error) => f.write_str(error),
        }
    }
}

/// Sends an event to every dashboard in a room.
pub trait Broadcaster: Send + Sync + 'static {
    /// Emits `event` with `payload` to `room` on every node.
    fn emit<'a>(
        &'a self,
        room: String,
        event: &'static str,
        payload: &'a serde_json::Value,
    ) -> BoxFuture<'a, Result<(), EmitError>>;

    /// Emits only to this node's dashboards (when the cluster is away).
    fn emit_local<'a>(
        &'a self,
        room: String,
        event: &'static str,
        payload: &'a serde_json::Value,
    ) -> BoxFuture<'a, Result<(), String>>;

    /// Disconnects every dashboard of this node.
    fn close(&self) -> BoxFuture<'_, ()>;

    /// How many of this node's dashboards are in `room`.
    fn local_audience(&self, room: &str) -> usize;
}

impl<A: Adapter> Broadcaster for SocketIo<A> {
    fn emit<'a>(
        &'a self,
        room: String,
        event: &'static str,
        payload: &'a serde_json::Value,
    ) -> BoxFuture<'a, Result<(), EmitError>> {
        Box::pin(async move { Ok(self.to(room).emit(event, payload).await?) })
    }

    fn emit_local<'a>(
        &'a self,
        room: String,
        event: &'static str,
        payload: &'a serde_json::Value,
    ) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            self.local()
                .to(room)
                .emit(event, payload)
                .await
                .map_err(|e| e.to_string())
        })
    }

    fn close(&self) -> BoxFuture<'_, ()> {
        Box::pin(SocketIo::close(self))
    }

    fn local_audience(&self, room: &str) -> usize {
        self.local().to(room.to_string()).sockets().len()
    }
}

/// A broadcast reached this node's dashboards only: the cluster did not
/// take it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NotForwarded;

/// One authenticated dashboard connection. Nothing secret is kept.
#[derive(Debug)]
pub struct Session {
    /// Socket id.
    pub sid: String,
    /// Directory id of the instructor.
    pub instructor_id: String,
    /// Their e-mail.
    pub email: String,
    /// Their display name.
    pub name: String,
    /// When the handshake was accepted (RFC 3339).
    pub connected_at: String,
    /// Classrooms this socket has joined.
    pub classrooms: Mutex<Vec<String>>,
}

impl Session {
    /// The instructor as others see them.
    pub fn instructor(&self) -> InstructorRef {
        InstructorRef {
            id: self.instructor_id.clone(),
            name: self.name.clone(),
        }
    }
}

/// Static facts the handlers need.
#[derive(Debug, Clone)]
pub struct AppConfig {
    /// This pod's name.
    pub node_id: String,
    /// Largest ingest body, bytes.
    pub max_body_bytes: usize,
    /// Whether `?token=` is read on the handshake.
    pub allow_query_token: bool,
    /// Clock leeway of token checks, seconds: a connected dashboard is
    /// disconnected this long after its token's `exp`.
    pub jwt_leeway_secs: u64,
}

/// What an [`App`] is made of.
pub struct AppParts {
    /// Static settings.
    pub config: AppConfig,
    /// Token verification.
    pub verifier: Verifier,
    /// Cached directory lookups.
    pub directory: DirectoryCache,
    /// Metric handles.
    pub metrics: Metrics,
    /// Where broadcasts go (the Socket.IO server).
    pub broadcaster: Arc<dyn Broadcaster>,
    /// Live state, local or shared.
    pub live: Live,
    /// The cluster probe's verdict, in cluster mode.
    pub cluster_health: Option<Arc<ClusterHealth>>,
    /// Connection tracking for the drain.
    pub drain: Arc<Drain>,
}

/// Shared state; cheap to clone.
#[derive(Clone)]
pub struct App {
    inner: Arc<Inner>,
}

struct Inner {
    config: AppConfig,
    verifier: Verifier,
    directory: DirectoryCache,
    live: Live,
    sessions: Mutex<HashMap<String, Arc<Session>>>,
    metrics: Metrics,
    broadcaster: Arc<dyn Broadcaster>,
    cluster_health: Option<Arc<ClusterHealth>>,
    drain: Arc<Drain>,
}

/// A snapshot could not be built.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// No such classroom.
    #[error("no such classroom")]
    NotFound,
    /// The directory failed.
    #[error(transparent)]
    Directory(#[from] Arc<DirectoryError>),
    /// Shared live state failed.
    #[error(transparent)]
    Live(#[from] LiveError),
}

impl From<DirectoryError> for SnapshotError {
    fn from(e: DirectoryError) -> Self {
        SnapshotError::Directory(Arc::new(e))
    }
}

impl App {
    /// Assembles the state.
    pub fn new(parts: AppParts) -> Self {
        App {
            inner: Arc::new(Inner {
                config: parts.config,
                verifier: parts.verifier,
                directory: parts.directory,
                live: parts.live,
                sessions: Mutex::new(HashMap::new()),
                metrics: parts.metrics,
                broadcaster: parts.broadcaster,
                cluster_health: parts.cluster_health,
                drain: parts.drain,
            }),
        }
    }

    /// Static settings.
    pub fn config(&self) -> &AppConfig {
        &self.inner.config
    }

    /// The token verifier.
    pub fn verifier(&self) -> &Verifier {
        &self.inner.verifier
    }

    /// Cached directory lookups (and the directory behind them).
    pub fn directory(&self) -> &DirectoryCache {
        &self.inner.directory
    }

    /// Live seat map, presence, status and event ids.
    pub fn live(&self) -> &Live {
        &self.inner.live
    }

    /// `false` in cluster mode while this pod cannot hear the cluster.
    pub fn cluster_healthy(&self) -> bool {
        self.inner
            .cluster_health
            .as_ref()
            .is_none_or(|h| h.is_healthy())
    }

    /// Connection tracking for the graceful drain.
    pub fn drain(&self) -> &Arc<Drain> {
        &self.inner.drain
    }

    /// Whether this pod runs in cluster mode.
    pub fn clustered(&self) -> bool {
        self.inner.cluster_health.is_some()
    }

    /// Disconnects this pod's dashboards.
    pub async fn close_sockets(&self) {
        self.inner.broadcaster.close().await;
    }

    /// Metric handles.
    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    /// Emits `event` to every dashboard in `classroom`. When the cluster does
    /// not take it, this node's dashboards still get it, and the caller
    /// learns it was [`NotForwarded`]. One `broadcast` span each.
    pub async fn broadcast(
        &self,
        classroom: &str,
        event: &'static str,
        payload: impl Serialize,
    ) -> Result<(), NotForwarded> {
        let payload = serde_json::to_value(payload).expect("wire types serialize");
        let span = tracing::info_span!(
            "broadcast",
            event,
            classroom,
            fanout_sockets = Empty,
            forwarded = Empty,
        );
        let sent = self
            .send(classroom, event, &payload)
            .instrument(span.clone());
        let result = sent.await;
        span.record("forwarded", result.is_ok());
        result
    }

    async fn send(
        &self,
        classroom: &str,
        event: &'static str,
        payload: &serde_json::Value,
    ) -> Result<(), NotForwarded> {
        let room = classroom_room(classroom);
        let broadcaster = &self.inner.broadcaster;
        let fanout = broadcaster.local_audience(&room);
        self.inner.metrics.broadcast_fanout.observe(fanout as f64);
        tracing::Span::current().record("fanout_sockets", fanout as u64);
        let error = match broadcaster.emit(room.clone(), event, payload).await {
            Ok(()) => return Ok(()),
            // A dashboard that is closing (a drain) or too slow; the cluster
            // and the others got the event.
            Err(EmitError::LocalSockets(error)) => {
                tracing::debug!(classroom, event, %error, "a dashboard missed a broadcast");
                return Ok(());
            }
            Err(EmitError::Cluster(error)) => error,
        };
        if !self.clustered() {
            tracing::debug!(classroom, event, %error, "a broadcast failed on a single node");
            return Ok(());
        }
        tracing::warn!(classroom, event, %error, "broadcast not forwarded to the cluster; local only");
        if let Err(error) = broadcaster.emit_local(room, event, payload).await {
            tracing::debug!(classroom, event, %error, "a local dashboard missed a broadcast");
        }
        Err(NotForwarded)
    }

    /// Like [`App::broadcast`], for callers that have nobody to tell when the
    /// cluster did not take it (it is logged and counted already).
    pub async fn notify(&self, classroom: &str, event: &'static str, payload: impl Serialize) {
        let _ = self.broadcast(classroom, event, payload).await;
    }

    /// Registers an accepted dashboard, here and in shared storage.
    pub async fn add_session(&self, session: Arc<Session>) -> Result<(), LiveError> {
        self.live()
            .open_session(&session, &self.config().node_id)
            .await?;
        let mut sessions = self.inner.sessions.lock().expect("sessions lock");
        sessions.insert(session.sid.clone(), session);
        Ok(())
    }

    /// Removes a dashboard's session from this pod; the caller closes it in
    /// shared storage once the socket has left its classrooms.
    pub fn remove_session(&self, sid: &str) -> Option<Arc<Session>> {
        self.inner
            .sessions
            .lock()
            .expect("sessions lock")
            .remove(sid)
    }

    /// This pod's sessions.
    pub fn sessions(&self) -> Vec<Arc<Session>> {
        self.inner
            .sessions
            .lock()
            .expect("sessions lock")
            .values()
            .cloned()
            .collect()
    }

    /// Number of live sessions.
    pub fn session_count(&self) -> usize {
        self.inner.sessions.lock().expect("sessions lock").len()
    }

    /// The full picture of a classroom.
    pub async fn snapshot(&self, classroom: &str) -> Result<Snapshot, SnapshotError> {
        let Some(room) = self.directory().classroom(classroom).await? else {
            return Err(SnapshotError::NotFound);
        };
        let directory = self.directory().directory();
        let help_queue = with_retries(self.metrics(), || directory.help_queue(classroom)).await?;
        Ok(Snapshot {
            classroom: room.id,
            seats: self
                .live()
                .seats(classroom, room.seats, &help_queue)
                .await?,
            help_queue,
            instructors: self.live().present(classroom).await?,
        })
    }
}

#[cfg(test)]
mod tests {
    use socketioxide::{AdapterError, BroadcastError, SocketError};

    use super::EmitError;

    /// Regression: a dashboard closing during a drain made the adapter's
    /// broadcast fail, and ingest answered 503 for an event the cluster had
    /// taken (and sent it a second time to this pod's dashboards).
    #[test]
    fn a_closed_dashboard_is_not_a_cluster_failure() {
        let closed = BroadcastError::Socket(vec![SocketError::Closed]);
        assert!(matches!(
            EmitError::from(closed),
            EmitError::LocalSockets(_)
        ));
        let full = BroadcastError::Socket(vec![SocketError::InternalChannelFull]);
        assert!(matches!(EmitError::from(full), EmitError::LocalSockets(_)));

        let redis = AdapterError(Box::new(std::io::Error::other("redis did not answer")));
        let error = EmitError::from(BroadcastError::Adapter(redis));
        assert!(matches!(error, EmitError::Cluster(_)));
        assert_eq!(error.to_string(), "Adapter error: redis did not answer");
    }
}
