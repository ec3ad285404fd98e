//! Where live classroom state is kept: in this process on a single node,
//! in Redis in cluster mode. Handlers call [`Live`] and do not care which.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use moka::future::Cache;

use crate::app::Session;
use crate::classroom::{LiveState, SeatChange};
use crate::cluster::store::{RedisLive, SharedSession};
use crate::model::{HelpRequest, InstructorRef, InstructorStatus, PresentInstructor, Seat};

/// How long an event id is remembered on a single node.
const LOCAL_EVENT_TTL: Duration = Duration::from_secs(24 * 60 * 60);
/// How many event ids a single node remembers at most.
const LOCAL_EVENT_CAPACITY: u64 = 2_000_000;

/// Shared state could not be read or changed (Redis failed).
#[derive(Debug, thiserror::Error)]
#[error("shared state unavailable: {0}")]
pub struct LiveError(#[from] fred::error::Error);

/// Live state, local or shared.
pub enum Live {
    /// One node: everything in memory.
    Local {
        /// Seats, presence, status.
        state: LiveState,
        /// Event ids seen.
        seen: Cache<String, ()>,
    },
    /// Cluster mode: everything in Redis.
    Shared(RedisLive),
}

impl Live {
    /// In-memory state for a single node.
    pub fn local() -> Self {
        let seen = Cache::builder()
            .max_capacity(LOCAL_EVENT_CAPACITY)
            .time_to_live(LOCAL_EVENT_TTL)
            .build();
        Live::Local {
            state: LiveState::default(),
            seen,
        }
    }

    /// Applies `change` to a seat and returns its new view.
    pub async fn update_seat(
        &self,
        classroom: &str,
        seats: u32,
        seat: u32,
        change: SeatChange<'_>,
        at: DateTime<Utc>,
    ) -> Result<Seat, LiveError> {
        match self {
            Live::Local { state, .. } => Ok(state.update_seat(classroom, seats, seat, change, at)),
            Live::Shared(redis) => Ok(redis.update_seat(classroom, seat, change, at).await?),
        }
    }

    /// Every seat of a classroom.
    pub async fn seats(
        &self,
        classroom: &str,
        seats: u32,
        help_queue: &[HelpRequest],
    ) -> Result<Vec<Seat>, LiveError> {
        match self {
            Live::Local { state, .. } => Ok(state.seats(classroom, seats, help_queue)),
            Live::Shared(redis) => Ok(redis.seats(classroom, seats, help_queue).await?),
        }
    }

    /// A socket starts watching a classroom; `true` for the instructor's first.
    pub async fn join(
        &self,
        classroom: &str,
        instructor: &InstructorRef,
        sid: &str,
    ) -> Result<bool, LiveError> {
        match self {
            Live::Local { state, .. } => Ok(state.join(classroom, instructor, sid)),
            Live::Shared(redis) => Ok(redis.join(classroom, instructor, sid).await?),
        }
    }

    /// A socket stops watching; `true` when the instructor has none left there.
    pub async fn leave(
        &self,
        classroom: &str,
        instructor: &InstructorRef,
        sid: &str,
    ) -> Result<bool, LiveError> {
        match self {
            Live::Local { state, .. } => Ok(state.leave(classroom, &instructor.id, sid)),
            Live::Shared(redis) => Ok(redis.leave(classroom, instructor, sid).await?),
        }
    }

    /// Instructors watching a classroom.
    pub async fn present(&self, classroom: &str) -> Result<Vec<PresentInstructor>, LiveError> {
        match self {
            Live::Local { state, .. } => Ok(state.present(classroom)),
            Live::Shared(redis) => Ok(redis.present(classroom).await?),
        }
    }

    /// Sets an instructor's availability.
    pub async fn set_status(&self, id: &str, status: InstructorStatus) -> Result<(), LiveError> {
        match self {
            Live::Local { state, .. } => {
                state.set_status(id, status);
                Ok(())
            }
            Live::Shared(redis) => Ok(redis.set_status(id, status).await?),
        }
    }

    /// An instructor's availability.
    pub async fn status(&self, id: &str) -> Result<InstructorStatus, LiveError> {
        match self {
            Live::Local { state, .. } => Ok(state.status(id)),
            Live::Shared(redis) => Ok(redis.status(id).await?),
        }
    }

    /// Remembers an event id; `true` the first time.
    pub async fn first_sighting(&self, key: &str) -> Result<bool, LiveError> {
        match self {
            Live::Local { seen, .. } => {
                Ok(seen.entry(key.to_string()).or_insert(()).await.is_fresh())
            }
            Live::Shared(redis) => Ok(redis.first_sighting(key).await?),
        }
    }

    /// Forgets an event id whose application failed, so a retry applies it.
    pub async fn forget_sighting(&self, key: &str) {
        let result = match self {
            Live::Local { seen, .. } => {
                seen.invalidate(key).await;
                Ok(())
            }
            Live::Shared(redis) => redis.forget_sighting(key).await,
        };
        if let Err(error) = result {
            tracing::warn!(%error, "cannot forget an event id; a retry will be seen as a duplicate");
        }
    }

    /// Records a new dashboard session where other pods can see it.
    pub async fn open_session(&self, session: &Session, pod: &str) -> Result<(), LiveError> {
        match self {
            Live::Local { .. } => Ok(()),
            Live::Shared(redis) => Ok(redis
                .put_session(&session.sid, &shared(session, pod))
                .await?),
        }
    }

    /// Removes a session and, for a socket that vanished, its status.
    pub async fn close_session(&self, session: &Session) {
        match self {
            Live::Local { state, .. } => state.forget_status(&session.instructor_id),
            Live::Shared(redis) => {
                if let Err(error) = redis.remove_session(&session.sid).await {
                    tracing::warn!(%error, "cannot delete a session entry; it expires on its own");
                }
            }
        }
    }

    /// Keeps this pod's sessions and presence alive in shared storage.
    /// Returns the (classroom, session) pairs whose presence entry was
    /// gone: another pod swept it as expired, so the others were told the
    /// instructor left.
    pub async fn refresh(
        &self,
        sessions: &[Arc<Session>],
        pod: &str,
    ) -> Result<Vec<(String, Arc<Session>)>, LiveError> {
        let Live::Shared(redis) = self else {
            return Ok(Vec::new());
        };
        let mut presence = Vec::new();
        let mut owners = Vec::new();
        for session in sessions {
            redis
                .put_session(&session.sid, &shared(session, pod))
                .await?;
            let classrooms = session.classrooms.lock().expect("session lock").clone();
            for classroom in classrooms {
                presence.push((classroom, session.instructor(), session.sid.clone()));
                owners.push(session.clone());
            }
        }
        let missing = redis.refresh_presence(&presence).await?;
        Ok(missing
            .into_iter()
            .map(|i| (presence[i].0.clone(), owners[i].clone()))
            .collect())
    }

    /// Clears a classroom's presence entries that outlived their pod;
    /// returns the instructors who left with them (shared storage only:
    /// one node has no other pod to outlive).
    pub async fn sweep(&self, classroom: &str) -> Result<Vec<InstructorRef>, LiveError> {
        match self {
            Live::Local { .. } => Ok(Vec::new()),
            Live::Shared(redis) => Ok(redis.sweep(classroom).await?),
        }
    }

    /// Sockets recorded as watching (single node only; for leak checks).
    pub fn local_watchers(&self) -> Option<usize> {
        match self {
            Live::Local { state, .. } => Some(state.watcher_count()),
            Live::Shared(_) => None,
        }
    }
}

fn shared<'a>(session: &'a Session, pod: &'a str) -> SharedSession<'a> {
    SharedSession {
        instructor_id: &session.instructor_id,
        email: &session.email,
        name: &session.name,
        connected_at: &session.connected_at,
        pod,
    }
}
