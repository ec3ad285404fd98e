//! The shapes that cross the wire, named as in the wire contract
//! (`PROTOCOL.md`). Only plain data lives here; behaviour is elsewhere.

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};

/// The Socket.IO room every dashboard of a classroom joins.
pub fn classroom_room(classroom: &str) -> String {
    format!("classroom:{classroom}")
}

/// RFC 3339 with milliseconds and a `Z`, the form used on the wire.
pub fn timestamp(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// Milliseconds since the Unix epoch, the form kept in the database.
pub fn to_millis(at: DateTime<Utc>) -> i64 {
    at.timestamp_millis()
}

/// The inverse of [`to_millis`].
pub fn from_millis(ms: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(ms).unwrap_or_default()
}

/// An instructor as other people see them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstructorRef {
    /// Directory id.
    pub id: String,
    /// Display name.
    pub name: String,
}

/// What a seat on the classroom map shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SeatStatus {
    /// Nothing heard recently.
    Idle,
    /// The last cell ran fine.
    Active,
    /// The last cell failed.
    Error,
    /// The student asked for help and is waiting.
    Help,
}

/// One seat of the map.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Seat {
    /// Seat number, 1-based.
    pub seat: u32,
    /// Student id last seen at this seat.
    pub student: Option<String>,
    /// What the seat shows.
    pub status: SeatStatus,
    /// When the last event from this seat was accepted.
    pub last_event_at: Option<String>,
    /// Failed cells so far.
    pub errors: u64,
}

/// Where a help request stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HelpStatus {
    /// Waiting for an instructor.
    Open,
    /// An instructor is on it.
    Claimed,
    /// Done.
    Resolved,
    /// The student withdrew it.
    Cancelled,
}

impl HelpStatus {
    /// The database spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            HelpStatus::Open => "open",
            HelpStatus::Claimed => "claimed",
            HelpStatus::Resolved => "resolved",
            HelpStatus::Cancelled => "cancelled",
        }
    }

    /// Parses the database spelling.
    pub fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "open" => HelpStatus::Open,
            "claimed" => HelpStatus::Claimed,
            "resolved" => HelpStatus::Resolved,
            "cancelled" => HelpStatus::Cancelled,
            _ => return None,
        })
    }
}

/// A student's request for help.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HelpRequest {
    /// The id of the `help_requested` event that created it.
    pub request_id: String,
    /// Classroom id.
    pub classroom: String,
    /// Seat number.
    pub seat: u32,
    /// Student id.
    pub student: String,
    /// What the student wrote, if anything.
    pub message: Option<String>,
    /// When it was accepted.
    pub created_at: String,
    /// Where it stands.
    pub status: HelpStatus,
    /// Who claimed it, once claimed (absent while open).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claimed_by: Option<InstructorRef>,
}

/// An instructor's availability.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InstructorStatus {
    /// Free to help.
    #[default]
    Available,
    /// Busy with a student.
    Helping,
    /// Not at the desk.
    Away,
    /// No longer watching this classroom (sent on leave and disconnect).
    Offline,
}

/// An instructor online in a classroom.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PresentInstructor {
    /// Directory id.
    pub id: String,
    /// Display name.
    pub name: String,
    /// Availability.
    pub status: InstructorStatus,
}

/// Everything a dashboard needs to draw a classroom.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    /// Classroom id.
    pub classroom: String,
    /// Every seat, in order.
    pub seats: Vec<Seat>,
    /// Open and claimed help requests, oldest first.
    pub help_queue: Vec<HelpRequest>,
    /// Instructors online in this classroom.
    pub instructors: Vec<PresentInstructor>,
}
