//! Live classroom state shared by every pod through Redis: seats, presence,
//! instructor status, sessions and event ids. Each change that must be
//! decided once is one atomic Redis operation (a Lua script or `SET NX`).
//!
//! Keys, all under the cluster's prefix (`CELLGATE_REDIS_PREFIX`,
//! `cellgate` by default) and a colon:
//! - `seat:{classroom}`: hash, seat number to the seat's JSON state;
//! - `presence:{classroom}`: sorted set of `{instructor id}|{sid}|{name}`
//!   scored by expiry (ms), refreshed while the socket lives;
//! - `session:{sid}`: the socket's session JSON, with a TTL;
//! - `status:{instructor id}`: availability;
//! - `event:{classroom}/{event id}`: idempotency key, 24 h.

use std::time::Duration;

use chrono::{DateTime, Utc};
use fred::clients::Client;
use fred::interfaces::{KeysInterface, LuaInterface, SortedSetsInterface};
use fred::types::{Expiration, SetOptions};
use serde::Serialize;

use crate::classroom::{SeatChange, SeatState};
use crate::model::{HelpRequest, InstructorRef, InstructorStatus, PresentInstructor, Seat};

/// How long an event id is remembered, seconds.
const EVENT_TTL_SECS: i64 = 24 * 3600;
/// How long an instructor's status is kept without change, seconds.
const STATUS_TTL_SECS: i64 = 12 * 3600;
/// Presence sets and seat maps of a classroom nobody touched for this long go.
const ROOM_TTL_MS: i64 = 24 * 3600 * 1000;

const UPDATE_SEAT: &str = r#"
local raw = redis.call('HGET', KEYS[1], ARGV[1])
local s = raw and cjson.decode(raw) or {}
s.errors = s.errors or 0
s.open_help = s.open_help or 0
if ARGV[2] == 'cell' then
  s.student = ARGV[3]; s.last = tonumber(ARGV[4]); s.failed = (ARGV[5] == '1')
  if s.failed then s.errors = s.errors + 1 end
elseif ARGV[2] == 'help_opened' then
  s.student = ARGV[3]; s.last = tonumber(ARGV[4]); s.open_help = s.open_help + 1
else
  s.open_help = math.max(0, s.open_help - 1)
end
local out = cjson.encode(s)
redis.call('HSET', KEYS[1], ARGV[1], out)
redis.call('PEXPIRE', KEYS[1], ARGV[6])
return out
"#;

// Returns 1 when no other live socket of the same instructor is present.
// Expired entries are left for SWEEP, which announces who they took away.
const JOIN: &str = r#"
local others = 0
for _, m in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], ARGV[3], '+inf')) do
  if string.sub(m, 1, #ARGV[4]) == ARGV[4] and m ~= ARGV[1] then others = others + 1 end
end
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[5])
if others == 0 then return 1 else return 0 end
"#;

// Returns 1 when the instructor has no live socket left.
const LEAVE: &str = r#"
local removed = redis.call('ZREM', KEYS[1], ARGV[1])
if removed == 0 then return 0 end
for _, m in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], ARGV[2], '+inf')) do
  if string.sub(m, 1, #ARGV[3]) == ARGV[3] then return 0 end
end
return 1
"#;

// Removes the expired entries (sockets of a pod that stopped refreshing
// them: it crashed) and returns those whose instructor has no live entry
// left, one per instructor. ZREM makes the removal happen once, so one pod
// announces each departure however many sweep.
const SWEEP: &str = r#"
local expired = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. ARGV[1])
if #expired == 0 then return {} end
local live = {}
for _, m in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], ARGV[1], '+inf')) do
  local id = string.match(m, '^([^|]*)|')
  if id then live[id] = true end
end
local gone = {}
for _, m in ipairs(expired) do
  if redis.call('ZREM', KEYS[1], m) == 1 then
    local id = string.match(m, '^([^|]*)|')
    if id and not live[id] then
      live[id] = true
      table.insert(gone, m)
    end
  end
end
return gone
"#;

/// A Redis failure while reading or changing shared state.
pub type StoreError = fred::error::Error;

/// Shared live state; cheap to clone.
#[derive(Clone)]
pub struct RedisLive {
    client: Client,
    presence_ttl: Duration,
    prefix: std::sync::Arc<str>,
}

/// What is stored per connected socket.
#[derive(Debug, Serialize)]
pub struct SharedSession<'a> {
    /// Directory id.
    pub instructor_id: &'a str,
    /// E-mail.
    pub email: &'a str,
    /// Display name.
    pub name: &'a str,
    /// When the handshake was accepted.
    pub connected_at: &'a str,
    /// The pod holding the connection.
    pub pod: &'a str,
}

fn now_ms() -> i64 {
    Utc::now().timestamp_millis()
}

fn member(instructor: &InstructorRef, sid: &str) -> String {
    format!("{}|{sid}|{}", instructor.id, instructor.name)
}

/// The instructor of a presence entry made by [`member`].
fn instructor_of(member: &str) -> Option<InstructorRef> {
    let (id, rest) = member.split_once('|')?;
    let (_sid, name) = rest.split_once('|')?;
    Some(InstructorRef {
        id: id.to_string(),
        name: name.to_string(),
    })
}

impl RedisLive {
    /// Shared state on `client`, in keys under `prefix`; presence entries
    /// live `presence_ttl` unless refreshed.
    pub fn new(client: Client, presence_ttl: Duration, prefix: &str) -> Self {
        RedisLive {
            client,
            presence_ttl,
            prefix: prefix.into(),
        }
    }

    fn key(&self, kind: &str, name: &str) -> String {
        format!("{}:{kind}:{name}", self.prefix)
    }

    fn presence_key(&self, classroom: &str) -> String {
        self.key("presence", classroom)
    }

    fn status_key(&self, instructor_id: &str) -> String {
        self.key("status", instructor_id)
    }

    fn session_key(&self, sid: &str) -> String {
        self.key("session", sid)
    }

    fn expiry_ms(&self) -> i64 {
        now_ms() + self.presence_ttl.as_millis() as i64
    }

    /// Applies `change` to a seat atomically and returns its new view.
    pub async fn update_seat(
        &self,
        classroom: &str,
        seat: u32,
        change: SeatChange<'_>,
        at: DateTime<Utc>,
    ) -> Result<Seat, StoreError> {
        let (kind, student, failed) = match change {
            SeatChange::Cell { student, failed } => ("cell", student, failed),
            SeatChange::HelpOpened { student } => ("help_opened", student, false),
            SeatChange::HelpClosed => ("help_closed", "", false),
        };
        let args = vec![
            seat.to_string(),
            kind.to_string(),
            student.to_string(),
            at.timestamp_millis().to_string(),
            if failed { "1" } else { "0" }.to_string(),
            ROOM_TTL_MS.to_string(),
        ];
        let key = self.key("seat", classroom);
        let raw: String = self.client.eval(UPDATE_SEAT, key, args).await?;
        Ok(SeatState::from_json(&raw).view(seat, at))
    }

    /// Every seat, with the durable help queue deciding who waits for help.
    pub async fn seats(
        &self,
        classroom: &str,
        seats: u32,
        help_queue: &[HelpRequest],
    ) -> Result<Vec<Seat>, StoreError> {
        let stored: std::collections::HashMap<u32, String> =
            fred::interfaces::HashesInterface::hgetall(&self.client, self.key("seat", classroom))
                .await?;
        let states = (1..=seats)
            .map(|n| {
                stored
                    .get(&n)
                    .map(|raw| SeatState::from_json(raw))
                    .unwrap_or_default()
            })
            .collect();
        Ok(SeatState::view_all(states, help_queue, Utc::now()))
    }

    /// Records a socket watching a classroom; `true` for the instructor's
    /// first socket there, across pods.
    pub async fn join(
        &self,
        classroom: &str,
        instructor: &InstructorRef,
        sid: &str,
    ) -> Result<bool, StoreError> {
        let args = vec![
            member(instructor, sid),
            self.expiry_ms().to_string(),
            now_ms().to_string(),
            format!("{}|", instructor.id),
            ROOM_TTL_MS.to_string(),
        ];
        let first: i64 = self
            .client
            .eval(JOIN, self.presence_key(classroom), args)
            .await?;
        Ok(first == 1)
    }

    /// Undoes [`RedisLive::join`]; `true` when the instructor has no socket
    /// left in the classroom on any pod.
    pub async fn leave(
        &self,
        classroom: &str,
        instructor: &InstructorRef,
        sid: &str,
    ) -> Result<bool, StoreError> {
        let args = vec![
            member(instructor, sid),
            now_ms().to_string(),
            format!("{}|", instructor.id),
        ];
        let last: i64 = self
            .client
            .eval(LEAVE, self.presence_key(classroom), args)
            .await?;
        Ok(last == 1)
    }

    /// Keeps this pod's presence entries alive; returns the indexes of the
    /// entries that were no longer there (swept while this pod could not
    /// refresh them). They are not added back: a socket that left the
    /// classroom meanwhile must not reappear; the caller joins again those
    /// still watching.
    pub async fn refresh_presence(
        &self,
        entries: &[(String, InstructorRef, String)],
    ) -> Result<Vec<usize>, StoreError> {
        let expiry = self.expiry_ms() as f64;
        let mut missing = Vec::new();
        for (index, (classroom, instructor, sid)) in entries.iter().enumerate() {
            // XX: update only; CH: count the updated, so 0 means not there.
            let changed: i64 = self
                .client
                .zadd(
                    self.presence_key(classroom),
                    Some(SetOptions::XX),
                    None,
                    true,
                    false,
                    (expiry, member(instructor, sid)),
                )
                .await?;
            if changed == 0 {
                missing.push(index);
            }
        }
        Ok(missing)
    }

    /// Removes a classroom's expired presence entries; returns the
    /// instructors who thereby left it, when this pod removed them.
    pub async fn sweep(&self, classroom: &str) -> Result<Vec<InstructorRef>, StoreError> {
        let gone: Vec<String> = self
            .client
            .eval(SWEEP, self.presence_key(classroom), now_ms().to_string())
            .await?;
        Ok(gone.iter().filter_map(|m| instructor_of(m)).collect())
    }

    /// Instructors watching a classroom on any pod, with their status.
    pub async fn present(&self, classroom: &str) -> Result<Vec<PresentInstructor>, StoreError> {
        let members: Vec<String> = self
            .client
            .zrangebyscore(
                self.presence_key(classroom),
                now_ms() as f64,
                "+inf",
                false,
                None,
            )
            .await?;
        let mut people: Vec<InstructorRef> =
            members.iter().filter_map(|m| instructor_of(m)).collect();
        people.sort_by(|a, b| a.id.cmp(&b.id).then_with(|| a.name.cmp(&b.name)));
        people.dedup_by(|a, b| a.id == b.id);

        let mut out = Vec::with_capacity(people.len());
        for InstructorRef { id, name } in people {
            let status = self.status(&id).await?;
            out.push(PresentInstructor { id, name, status });
        }
        out.sort_by(|a, b| a.name.cmp(&b.name).then_with(|| a.id.cmp(&b.id)));
        Ok(out)
    }

    /// Sets an instructor's availability for every pod.
    pub async fn set_status(
        &self,
        instructor_id: &str,
        status: InstructorStatus,
    ) -> Result<(), StoreError> {
        let value = serde_json::to_string(&status).expect("status serializes");
        let expire = Some(Expiration::EX(STATUS_TTL_SECS));
        let _: () = self
            .client
            .set(self.status_key(instructor_id), value, expire, None, false)
            .await?;
        Ok(())
    }

    /// An instructor's availability.
    pub async fn status(&self, instructor_id: &str) -> Result<InstructorStatus, StoreError> {
        let raw: Option<String> = self.client.get(self.status_key(instructor_id)).await?;
        Ok(raw
            .and_then(|r| serde_json::from_str(&r).ok())
            .unwrap_or_default())
    }

    /// Remembers an event id; `true` the first time across all pods.
    pub async fn first_sighting(&self, key: &str) -> Result<bool, StoreError> {
        let set: Option<String> = self
            .client
            .set(
                self.key("event", key),
                "1",
                Some(Expiration::EX(EVENT_TTL_SECS)),
                Some(SetOptions::NX),
                false,
            )
            .await?;
        Ok(set.is_some())
    }

    /// Forgets an event id whose application failed.
    pub async fn forget_sighting(&self, key: &str) -> Result<(), StoreError> {
        let _: i64 = self.client.del(self.key("event", key)).await?;
        Ok(())
    }

    /// Stores (or refreshes) a socket's session entry.
    pub async fn put_session(
        &self,
        sid: &str,
        session: &SharedSession<'_>,
    ) -> Result<(), StoreError> {
        let value = serde_json::to_string(session).expect("session serializes");
        let ttl = Some(Expiration::PX(self.presence_ttl.as_millis() as i64));
        let _: () = self
            .client
            .set(self.session_key(sid), value, ttl, None, false)
            .await?;
        Ok(())
    }

    /// Deletes a socket's session entry.
    pub async fn remove_session(&self, sid: &str) -> Result<(), StoreError> {
        let _: i64 = self.client.del(self.session_key(sid)).await?;
        Ok(())
    }
}
