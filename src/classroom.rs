//! Live classroom state kept by this pod: the seat map, who is watching
//! which classroom, and each instructor's availability.
//!
//! Everything here is derived from accepted events and dashboard
//! connections; durable facts (the help queue) live in the directory
//! database and are overlaid when a snapshot is built.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::model::{
    HelpRequest, InstructorRef, InstructorStatus, PresentInstructor, Seat, SeatStatus, timestamp,
};

/// A seat that has been quiet this long shows as idle again.
const IDLE_AFTER: Duration = Duration::from_secs(10 * 60);

/// What is known of one seat. Stored as JSON in cluster mode, so the field
/// names are part of the Redis format (see `cluster::store`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SeatState {
    #[serde(default)]
    student: Option<String>,
    /// Last accepted event, milliseconds since the epoch.
    #[serde(default, rename = "last")]
    last_event_ms: Option<i64>,
    #[serde(default, rename = "failed")]
    last_cell_failed: Option<bool>,
    #[serde(default)]
    errors: u64,
    #[serde(default)]
    open_help: u32,
}

impl SeatState {
    /// Parses the stored form; an unreadable entry reads as an empty seat.
    pub fn from_json(raw: &str) -> Self {
        serde_json::from_str(raw).unwrap_or_default()
    }

    fn apply(&mut self, change: SeatChange<'_>, at: DateTime<Utc>) {
        match change {
            SeatChange::Cell { student, failed } => {
                self.student = Some(student.to_string());
                self.last_event_ms = Some(at.timestamp_millis());
                self.last_cell_failed = Some(failed);
                self.errors += u64::from(failed);
            }
            SeatChange::HelpOpened { student } => {
                self.student = Some(student.to_string());
                self.last_event_ms = Some(at.timestamp_millis());
                self.open_help += 1;
            }
            SeatChange::HelpClosed => self.open_help = self.open_help.saturating_sub(1),
        }
    }

    /// The seat as dashboards see it at `now`.
    pub fn view(&self, seat: u32, now: DateTime<Utc>) -> Seat {
        let last = self.last_event_ms.and_then(DateTime::from_timestamp_millis);
        let quiet = last.is_none_or(|at| (now - at).to_std().unwrap_or_default() > IDLE_AFTER);
        let status = match (self.open_help, self.last_cell_failed) {
            (1.., _) => SeatStatus::Help,
            _ if quiet => SeatStatus::Idle,
            (_, Some(true)) => SeatStatus::Error,
            _ => SeatStatus::Active,
        };
        Seat {
            seat,
            student: self.student.clone(),
            status,
            last_event_at: last.map(timestamp),
            errors: self.errors,
        }
    }

    /// Views seats `1..=states.len()`, with `help_queue` (the durable truth)
    /// deciding which seats wait for help.
    pub fn view_all(
        states: Vec<SeatState>,
        help_queue: &[HelpRequest],
        now: DateTime<Utc>,
    ) -> Vec<Seat> {
        states
            .into_iter()
            .zip(1..)
            .map(|(mut state, n)| {
                state.open_help = help_queue.iter().filter(|h| h.seat == n).count() as u32;
                if let Some(request) = help_queue.iter().find(|h| h.seat == n) {
                    state.student.get_or_insert_with(|| request.student.clone());
                }
                state.view(n, now)
            })
            .collect()
    }
}

#[derive(Debug, Default)]
struct Room {
    seats: Vec<SeatState>,
    /// Instructor id to their name and the sockets they watch with.
    present: HashMap<String, (String, HashSet<String>)>,
}

impl Room {
    fn seat_mut(&mut self, seats: u32, seat: u32) -> &mut SeatState {
        if self.seats.len() < seats as usize {
            self.seats.resize(seats as usize, SeatState::default());
        }
        &mut self.seats[(seat - 1) as usize]
    }
}

#[derive(Debug, Default)]
struct Inner {
    rooms: HashMap<String, Room>,
    statuses: HashMap<String, InstructorStatus>,
}

/// The live state of every classroom this pod has seen.
#[derive(Debug, Default)]
pub struct LiveState {
    inner: Mutex<Inner>,
}

/// What changes when a seat sees an event.
pub enum SeatChange<'a> {
    /// A cell ran; `failed` when it raised.
    Cell {
        /// Student id.
        student: &'a str,
        /// Whether the cell failed.
        failed: bool,
    },
    /// The student asked for help.
    HelpOpened {
        /// Student id.
        student: &'a str,
    },
    /// A help request of this seat was resolved or cancelled.
    HelpClosed,
}

impl LiveState {
    /// Applies `change` to `seat` (1-based, within `seats`) and returns the
    /// seat as dashboards should now see it.
    pub fn update_seat(
        &self,
        classroom: &str,
        seats: u32,
        seat: u32,
        change: SeatChange<'_>,
        at: DateTime<Utc>,
    ) -> Seat {
        let mut inner = self.inner.lock().expect("live state lock");
        let room = inner.rooms.entry(classroom.to_string()).or_default();
        let state = room.seat_mut(seats, seat);
        state.apply(change, at);
        state.view(seat, at)
    }

    /// Every seat of a classroom, with `help_queue` (the durable truth)
    /// deciding which seats wait for help.
    pub fn seats(&self, classroom: &str, seats: u32, help_queue: &[HelpRequest]) -> Vec<Seat> {
        let inner = self.inner.lock().expect("live state lock");
        let room = inner.rooms.get(classroom);
        let states = (1..=seats)
            .map(|n| {
                room.and_then(|r| r.seats.get((n - 1) as usize))
                    .cloned()
                    .unwrap_or_default()
            })
            .collect();
        SeatState::view_all(states, help_queue, Utc::now())
    }

    /// Records that `socket` of `instructor` watches `classroom`. Returns
    /// `true` when it is that instructor's first socket there.
    pub fn join(&self, classroom: &str, instructor: &InstructorRef, socket: &str) -> bool {
        let mut inner = self.inner.lock().expect("live state lock");
        let room = inner.rooms.entry(classroom.to_string()).or_default();
        let (_, sockets) = room
            .present
            .entry(instructor.id.clone())
            .or_insert_with(|| (instructor.name.clone(), HashSet::new()));
        sockets.insert(socket.to_string()) && sockets.len() == 1
    }

    /// Undoes [`LiveState::join`]. Returns `true` when the instructor has no
    /// socket left in the classroom.
    pub fn leave(&self, classroom: &str, instructor_id: &str, socket: &str) -> bool {
        let mut inner = self.inner.lock().expect("live state lock");
        let Some(room) = inner.rooms.get_mut(classroom) else {
            return false;
        };
        let Some((_, sockets)) = room.present.get_mut(instructor_id) else {
            return false;
        };
        if !sockets.remove(socket) || !sockets.is_empty() {
            return false;
        }
        room.present.remove(instructor_id);
        true
    }

    /// Instructors watching `classroom`, by name.
    pub fn present(&self, classroom: &str) -> Vec<PresentInstructor> {
        let inner = self.inner.lock().expect("live state lock");
        let Some(room) = inner.rooms.get(classroom) else {
            return Vec::new();
        };
        let mut out: Vec<_> = room
            .present
            .iter()
            .map(|(id, (name, _))| PresentInstructor {
                id: id.clone(),
                name: name.clone(),
                status: inner.statuses.get(id).copied().unwrap_or_default(),
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name).then_with(|| a.id.cmp(&b.id)));
        out
    }

    /// Sets an instructor's availability.
    pub fn set_status(&self, instructor_id: &str, status: InstructorStatus) {
        let mut inner = self.inner.lock().expect("live state lock");
        inner.statuses.insert(instructor_id.to_string(), status);
    }

    /// An instructor's availability.
    pub fn status(&self, instructor_id: &str) -> InstructorStatus {
        let inner = self.inner.lock().expect("live state lock");
        inner
            .statuses
            .get(instructor_id)
            .copied()
            .unwrap_or_default()
    }

    /// Forgets the status of an instructor who has no socket anywhere.
    pub fn forget_status(&self, instructor_id: &str) {
        let mut inner = self.inner.lock().expect("live state lock");
        let watching = inner
            .rooms
            .values()
            .any(|r| r.present.contains_key(instructor_id));
        if !watching {
            inner.statuses.remove(instructor_id);
        }
    }

    /// Sockets recorded as watching any classroom (for leak checks).
    pub fn watcher_count(&self) -> usize {
        let inner = self.inner.lock().expect("live state lock");
        inner
            .rooms
            .values()
            .flat_map(|r| r.present.values())
            .map(|(_, s)| s.len())
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ada() -> InstructorRef {
        InstructorRef {
            id: "ins_1".into(),
            name: "Ada".into(),
        }
    }

    #[test]
    fn a_failed_cell_marks_the_seat_and_counts_the_error() {
        let live = LiveState::default();
        let change = SeatChange::Cell {
            student: "s-1",
            failed: true,
        };
        let seat = live.update_seat("c", 10, 3, change, Utc::now());
        assert_eq!(
            (seat.seat, seat.status, seat.errors),
            (3, SeatStatus::Error, 1)
        );

        let change = SeatChange::Cell {
            student: "s-1",
            failed: false,
        };
        let seat = live.update_seat("c", 10, 3, change, Utc::now());
        assert_eq!((seat.status, seat.errors), (SeatStatus::Active, 1));
    }

    #[test]
    fn seats_start_idle_and_help_comes_from_the_queue() {
        let live = LiveState::default();
        let request = HelpRequest {
            request_id: "r".into(),
            classroom: "c".into(),
            seat: 2,
            student: "s-2".into(),
            message: None,
            created_at: String::new(),
            status: crate::model::HelpStatus::Open,
            claimed_by: None,
        };
        let seats = live.seats("c", 3, &[request]);
        assert_eq!(seats.len(), 3);
        assert_eq!(seats[0].status, SeatStatus::Idle);
        assert_eq!(seats[1].status, SeatStatus::Help);
        assert_eq!(seats[1].student.as_deref(), Some("s-2"));
    }

    #[test]
    fn presence_counts_sockets_per_instructor() {
        let live = LiveState::default();
        assert!(live.join("c", &ada(), "a"));
        assert!(!live.join("c", &ada(), "b"));
        assert_eq!(live.present("c").len(), 1);
        assert!(!live.leave("c", "ins_1", "a"));
        assert!(live.leave("c", "ins_1", "b"));
        assert!(live.present("c").is_empty());
        assert_eq!(live.watcher_count(), 0);
    }
}
