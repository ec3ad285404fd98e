//! The shared state every request and socket handler works with.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

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
use crate::limits::Limits;
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

/// What an emit to this node's dashboards in a room did.
#[derive(Debug, Default)]
pub struct LocalFanout {
    /// Every dashboard of the room on this node (left out of the emit to
    /// the other nodes, which would send them the event a second time).
    pub sids: Vec<String>,
    /// Those whose outgoing queue was full: they missed the event.
    pub full: Vec<String>,
}

/// What became of a request to disconnect one dashboard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disconnected {
    /// The disconnect is on its way.
    Done,
    /// Its queue is full: the disconnect packet does not fit either.
    QueueFull,
    /// No such dashboard here (any more).
    Gone,
}

/// Sends an event to every dashboard in a room.
pub trait Broadcaster: Send + Sync + 'static {
    /// Emits `event` to each of this node's dashboards in `room`, one at a
    /// time, so that a dashboard whose queue is full is known by its id.
    /// `payload` is serialized once, by the caller.
    fn emit_local(
        &self,
        room: &str,
        event: &'static str,
        payload: &serde_json::value::RawValue,
    ) -> LocalFanout;

    /// Emits `event` to `room` through the adapter, leaving out the sockets
    /// `except` (this node's, served by [`Broadcaster::emit_local`]): in
    /// cluster mode, the other nodes' dashboards.
    fn emit_remote<'a>(
        &'a self,
        room: String,
        except: Vec<String>,
        event: &'static str,
        payload: &'a serde_json::Value,
    ) -> BoxFuture<'a, Result<(), EmitError>>;

    /// Disconnects one of this node's dashboards.
    fn disconnect(&self, sid: &str) -> Disconnected;

    /// Disconnects every dashboard of this node.
    fn close(&self) -> BoxFuture<'_, ()>;
}

impl<A: Adapter> Broadcaster for SocketIo<A> {
    fn emit_local(
        &self,
        room: &str,
        event: &'static str,
        payload: &serde_json::value::RawValue,
    ) -> LocalFanout {
        use socketioxide::SendError;
        use socketioxide::SocketError;

        let mut fanout = LocalFanout::default();
        for socket in self.local().to(room.to_string()).sockets() {
            if !socket.connected() {
                // Leaving (its disconnect handler is running): it would
                // only count as full again.
                continue;
            }
            let sid = socket.id.to_string();
            // Anything else was sent, or the socket is closing.
            if let Err(SendError::Socket(SocketError::InternalChannelFull)) =
                socket.emit(event, payload)
            {
                fanout.full.push(sid.clone());
            }
            fanout.sids.push(sid);
        }
        fanout
    }

    fn emit_remote<'a>(
        &'a self,
        room: String,
        except: Vec<String>,
        event: &'static str,
        payload: &'a serde_json::Value,
    ) -> BoxFuture<'a, Result<(), EmitError>> {
        Box::pin(async move { Ok(self.to(room).except(except).emit(event, payload).await?) })
    }

    fn disconnect(&self, sid: &str) -> Disconnected {
        use socketioxide::SocketError;
        use socketioxide::socket::Sid;

        let Some(socket) = sid.parse::<Sid>().ok().and_then(|sid| self.get_socket(sid)) else {
            return Disconnected::Gone;
        };
        match socket.disconnect() {
            Ok(()) => Disconnected::Done,
            Err(SocketError::InternalChannelFull) => Disconnected::QueueFull,
            Err(SocketError::Closed) => Disconnected::Gone,
        }
    }

    fn close(&self) -> BoxFuture<'_, ()> {
        Box::pin(SocketIo::close(self))
    }
}

/// How often, and how many times, a polling dashboard too slow for its
/// queue is asked to disconnect (it must take some packets for the
/// disconnect to fit; the Engine.IO heartbeat closes it otherwise).
const SLOW_POLL_RETRY: Duration = Duration::from_millis(200);
const SLOW_POLL_TRIES: u32 = 300;

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
    /// The limits' state.
    pub limits: Arc<Limits>,
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
    limits: Arc<Limits>,
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
                limits: parts.limits,
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

    /// The limits' state.
    pub fn limits(&self) -> &Arc<Limits> {
        &self.inner.limits
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
        let raw = serde_json::value::to_raw_value(payload).expect("wire types serialize");
        // This node's dashboards first, one by one, so that one whose queue
        // is full is known and disconnected; the others get it regardless.
        let local = broadcaster.emit_local(&room, event, &raw);
        let fanout = local.sids.len();
        self.inner.metrics.broadcast_fanout.observe(fanout as f64);
        tracing::Span::current().record("fanout_sockets", fanout as u64);
        for sid in &local.full {
            self.too_slow(sid);
        }
        if !self.clustered() {
            return Ok(());
        }
        let error = match broadcaster
            .emit_remote(room, local.sids, event, payload)
            .await
        {
            Ok(()) => return Ok(()),
            // A dashboard that joined here meanwhile is closing or too
            // slow; the cluster and the others got the event.
            Err(EmitError::LocalSockets(error)) => {
                tracing::debug!(classroom, event, %error, "a dashboard missed a broadcast");
                return Ok(());
            }
            Err(EmitError::Cluster(error)) => error,
        };
        tracing::warn!(classroom, event, %error, "broadcast not forwarded to the cluster; local only");
        Err(NotForwarded)
    }

    /// A dashboard's outgoing queue is full: it misses events, and a
    /// queue without bound would hold this pod's memory hostage. It is
    /// disconnected and counted once. Over WebSocket its connection is
    /// closed at once (socket.io-client reconnects by itself and gets a
    /// fresh snapshot); a polling one is sent a disconnect as soon as it
    /// takes some packets, or the Engine.IO heartbeat closes it.
    fn too_slow(&self, sid: &str) {
        let transports = self.limits().transports();
        if !transports.mark_slow(sid) {
            return;
        }
        self.metrics().slow_consumer_disconnects.inc();
        tracing::warn!(
            sid,
            "a dashboard's outgoing queue is full (CELLGATE_SOCKET_QUEUE_PACKETS); disconnecting it"
        );
        if transports.kill(sid) {
            return;
        }
        let (app, sid) = (self.clone(), sid.to_string());
        tokio::spawn(async move {
            for _ in 0..SLOW_POLL_TRIES {
                if app.inner.broadcaster.disconnect(&sid) != Disconnected::QueueFull {
                    return;
                }
                tokio::time::sleep(SLOW_POLL_RETRY).await;
            }
        });
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
        self.inner.metrics.sessions.set(sessions.len() as i64);
        Ok(())
    }

    /// Removes a dashboard's session from this pod; the caller closes it in
    /// shared storage once the socket has left its classrooms.
    pub fn remove_session(&self, sid: &str) -> Option<Arc<Session>> {
        let mut sessions = self.inner.sessions.lock().expect("sessions lock");
        let removed = sessions.remove(sid);
        self.inner.metrics.sessions.set(sessions.len() as i64);
        removed
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
