//! The shared state every request and socket handler works with.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use moka::future::Cache;
use serde::Serialize;
use socketioxide::SocketIo;
use socketioxide::adapter::Adapter;

use crate::auth::Verifier;
use crate::classroom::LiveState;
use crate::directory::DirectoryError;
use crate::directory::cache::DirectoryCache;
use crate::metrics::Metrics;
use crate::model::{InstructorRef, Snapshot, classroom_room};

/// How long an event id is remembered for idempotency.
const DEDUPE_TTL: Duration = Duration::from_secs(24 * 60 * 60);

/// How many event ids are remembered at most.
const DEDUPE_CAPACITY: u64 = 2_000_000;

/// Sends an event to every dashboard in a room, on every node.
pub trait Broadcaster: Send + Sync + 'static {
    /// Emits `event` with `payload` to `room`.
    fn emit<'a>(
        &'a self,
        room: String,
        event: &'static str,
        payload: serde_json::Value,
    ) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send + 'a>>;
}

impl<A: Adapter> Broadcaster for SocketIo<A> {
    fn emit<'a>(
        &'a self,
        room: String,
        event: &'static str,
        payload: serde_json::Value,
    ) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send + 'a>> {
        Box::pin(async move {
            self.to(room)
                .emit(event, &payload)
                .await
                .map_err(|e| e.to_string())
        })
    }
}

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
    live: LiveState,
    sessions: Mutex<HashMap<String, Arc<Session>>>,
    seen_events: Cache<String, ()>,
    metrics: Metrics,
    broadcaster: Arc<dyn Broadcaster>,
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
}

impl From<DirectoryError> for SnapshotError {
    fn from(e: DirectoryError) -> Self {
        SnapshotError::Directory(Arc::new(e))
    }
}

impl App {
    /// Assembles the state.
    pub fn new(
        config: AppConfig,
        verifier: Verifier,
        directory: DirectoryCache,
        metrics: Metrics,
        broadcaster: Arc<dyn Broadcaster>,
    ) -> Self {
        let seen_events = Cache::builder()
            .max_capacity(DEDUPE_CAPACITY)
            .time_to_live(DEDUPE_TTL)
            .build();
        App {
            inner: Arc::new(Inner {
                config,
                verifier,
                directory,
                live: LiveState::default(),
                sessions: Mutex::new(HashMap::new()),
                seen_events,
                metrics,
                broadcaster,
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

    /// Live seat map and presence.
    pub fn live(&self) -> &LiveState {
        &self.inner.live
    }

    /// Metric handles.
    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    /// Emits `event` to every dashboard in `classroom`, logging a failure.
    pub async fn broadcast(&self, classroom: &str, event: &'static str, payload: impl Serialize) {
        let payload = serde_json::to_value(payload).expect("wire types serialize");
        let room = classroom_room(classroom);
        if let Err(error) = self.inner.broadcaster.emit(room, event, payload).await {
            tracing::warn!(classroom, event, %error, "broadcast failed");
        }
    }

    /// Remembers an event id; `true` when it was not seen before.
    pub async fn first_sighting(&self, key: String) -> bool {
        self.inner
            .seen_events
            .entry(key)
            .or_insert(())
            .await
            .is_fresh()
    }

    /// Forgets an event id whose application failed, so a retry applies it.
    pub async fn forget_sighting(&self, key: &str) {
        self.inner.seen_events.invalidate(key).await;
    }

    /// Registers an accepted dashboard.
    pub fn add_session(&self, session: Arc<Session>) {
        let mut sessions = self.inner.sessions.lock().expect("sessions lock");
        sessions.insert(session.sid.clone(), session);
    }

    /// Removes a dashboard's session; returns it if it was there.
    pub fn remove_session(&self, sid: &str) -> Option<Arc<Session>> {
        self.inner
            .sessions
            .lock()
            .expect("sessions lock")
            .remove(sid)
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
        let help_queue = self.directory().directory().help_queue(classroom).await?;
        Ok(Snapshot {
            classroom: room.id,
            seats: self.live().seats(classroom, room.seats, &help_queue),
            help_queue,
            instructors: self.live().present(classroom),
        })
    }
}
