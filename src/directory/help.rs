//! The help queue. Every state change is one conditional UPDATE, so the
//! database decides races: of two instructors claiming at once, exactly
//! one changes the row.

use sqlx::any::AnyRow;
use sqlx::{AssertSqlSafe, Row};

use super::{Directory, DirectoryError, now_millis};
use crate::model::{HelpRequest, HelpStatus, InstructorRef, from_millis, timestamp};

/// A help request to store, from an accepted `help_requested` event.
#[derive(Debug, Clone)]
pub struct NewHelpRequest {
    /// The event id, which becomes the request id.
    pub request_id: String,
    /// Classroom id.
    pub classroom: String,
    /// Seat number.
    pub seat: u32,
    /// Student id.
    pub student: String,
    /// Optional message.
    pub message: Option<String>,
    /// Acceptance time, milliseconds since the epoch.
    pub created_at_ms: i64,
}

/// What a claim came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClaimOutcome {
    /// This instructor has it now.
    Claimed {
        /// The request.
        request: HelpRequest,
        /// When it was claimed, milliseconds.
        claimed_at_ms: i64,
    },
    /// Someone else was first.
    AlreadyClaimed(InstructorRef),
    /// Resolved or cancelled before the claim.
    Closed(HelpStatus),
    /// No such request.
    NotFound,
}

/// What a resolve came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResolveOutcome {
    /// Resolved now.
    Resolved {
        /// The request.
        request: HelpRequest,
        /// When, milliseconds.
        resolved_at_ms: i64,
    },
    /// It was resolved or cancelled already.
    Closed(HelpStatus),
    /// No such request.
    NotFound,
}

const SELECT_REQUEST: &str = "SELECT h.request_id, h.classroom_id, h.seat, h.student, h.message, \
     h.status, h.created_at, h.claimed_by, i.name AS claimed_by_name \
     FROM help_requests h LEFT JOIN instructors i ON i.id = h.claimed_by";

impl Directory {
    /// Stores new help requests in one transaction. Returns, for each, whether
    /// it was new (`false`: a request with that id exists, a duplicate).
    pub async fn insert_help_requests(
        &self,
        requests: &[NewHelpRequest],
    ) -> Result<Vec<bool>, DirectoryError> {
        if requests.is_empty() {
            return Ok(Vec::new());
        }
        let mut tx = self.pool.begin().await?;
        let mut fresh = Vec::with_capacity(requests.len());
        for r in requests {
            let done = sqlx::query(
                "INSERT INTO help_requests \
                 (request_id, classroom_id, seat, student, message, status, created_at) \
                 VALUES ($1, $2, $3, $4, $5, 'open', $6) ON CONFLICT (request_id) DO NOTHING",
            )
            .bind(&r.request_id)
            .bind(&r.classroom)
            .bind(i64::from(r.seat))
            .bind(&r.student)
            .bind(r.message.as_deref())
            .bind(r.created_at_ms)
            .execute(&mut *tx)
            .await?;
            fresh.push(done.rows_affected() == 1);
        }
        tx.commit().await?;
        Ok(fresh)
    }

    /// One request by id.
    pub async fn help_request(
        &self,
        request_id: &str,
    ) -> Result<Option<HelpRequest>, DirectoryError> {
        let sql = format!("{SELECT_REQUEST} WHERE h.request_id = $1");
        let row = sqlx::query(AssertSqlSafe(sql))
            .bind(request_id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(help_from_row).transpose()
    }

    /// Open and claimed requests of a classroom, oldest first.
    pub async fn help_queue(&self, classroom: &str) -> Result<Vec<HelpRequest>, DirectoryError> {
        let sql = format!(
            "{SELECT_REQUEST} WHERE h.classroom_id = $1 AND h.status IN ('open', 'claimed') \
             ORDER BY h.created_at, h.request_id"
        );
        let rows = sqlx::query(AssertSqlSafe(sql))
            .bind(classroom)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(help_from_row).collect()
    }

    /// Claims an open request for `by`; exactly one concurrent claim wins.
    pub async fn claim_help(
        &self,
        request_id: &str,
        by: &InstructorRef,
    ) -> Result<ClaimOutcome, DirectoryError> {
        let at = now_millis();
        let updated = sqlx::query(
            "UPDATE help_requests SET status = 'claimed', claimed_by = $1, claimed_at = $2 \
             WHERE request_id = $3 AND status = 'open'",
        )
        .bind(&by.id)
        .bind(at)
        .bind(request_id)
        .execute(&self.pool)
        .await?;

        let Some(request) = self.help_request(request_id).await? else {
            return Ok(ClaimOutcome::NotFound);
        };
        if updated.rows_affected() == 1 {
            return Ok(ClaimOutcome::Claimed {
                request,
                claimed_at_ms: at,
            });
        }
        Ok(match (request.status, request.claimed_by) {
            (HelpStatus::Claimed, Some(holder)) => ClaimOutcome::AlreadyClaimed(holder),
            (status, _) => ClaimOutcome::Closed(status),
        })
    }

    /// Resolves an open or claimed request.
    pub async fn resolve_help(
        &self,
        request_id: &str,
        by: &InstructorRef,
    ) -> Result<ResolveOutcome, DirectoryError> {
        let at = now_millis();
        let updated = sqlx::query(
            "UPDATE help_requests SET status = 'resolved', resolved_by = $1, resolved_at = $2 \
             WHERE request_id = $3 AND status IN ('open', 'claimed')",
        )
        .bind(&by.id)
        .bind(at)
        .bind(request_id)
        .execute(&self.pool)
        .await?;

        let Some(request) = self.help_request(request_id).await? else {
            return Ok(ResolveOutcome::NotFound);
        };
        if updated.rows_affected() == 1 {
            Ok(ResolveOutcome::Resolved {
                request,
                resolved_at_ms: at,
            })
        } else {
            Ok(ResolveOutcome::Closed(request.status))
        }
    }

    /// How many requests wait for an instructor (open, not yet claimed), in
    /// every classroom.
    pub async fn open_help_count(&self) -> Result<i64, DirectoryError> {
        let row = sqlx::query("SELECT COUNT(*) AS n FROM help_requests WHERE status = 'open'")
            .fetch_one(&self.pool)
            .await?;
        Ok(row.try_get("n")?)
    }

    /// Cancels a student's open or claimed requests (only `request_id` when
    /// given) and returns those it cancelled.
    pub async fn cancel_help(
        &self,
        classroom: &str,
        student: &str,
        request_id: Option<&str>,
    ) -> Result<Vec<HelpRequest>, DirectoryError> {
        let sql = format!(
            "{SELECT_REQUEST} WHERE h.classroom_id = $1 AND h.student = $2 \
             AND h.status IN ('open', 'claimed') AND ($3 = '' OR h.request_id = $3)"
        );
        let rows = sqlx::query(AssertSqlSafe(sql))
            .bind(classroom)
            .bind(student)
            .bind(request_id.unwrap_or_default())
            .fetch_all(&self.pool)
            .await?;

        let mut cancelled = Vec::with_capacity(rows.len());
        for row in &rows {
            let request = help_from_row(row)?;
            let updated = sqlx::query(
                "UPDATE help_requests SET status = 'cancelled', resolved_at = $1 \
                 WHERE request_id = $2 AND status IN ('open', 'claimed')",
            )
            .bind(now_millis())
            .bind(&request.request_id)
            .execute(&self.pool)
            .await?;
            if updated.rows_affected() == 1 {
                cancelled.push(HelpRequest {
                    status: HelpStatus::Cancelled,
                    ..request
                });
            }
        }
        Ok(cancelled)
    }
}

fn help_from_row(row: &AnyRow) -> Result<HelpRequest, DirectoryError> {
    let status: String = row.try_get("status")?;
    let claimed_by: Option<String> = row.try_get("claimed_by")?;
    let claimed_by_name: Option<String> = row.try_get("claimed_by_name")?;
    let seat: i64 = row.try_get("seat")?;
    Ok(HelpRequest {
        request_id: row.try_get("request_id")?,
        classroom: row.try_get("classroom_id")?,
        seat: seat as u32,
        student: row.try_get("student")?,
        message: row.try_get("message")?,
        created_at: timestamp(from_millis(row.try_get("created_at")?)),
        status: HelpStatus::parse(&status)
            .ok_or_else(|| DirectoryError::Invalid(format!("unknown help status {status:?}")))?,
        claimed_by: claimed_by.map(|id| InstructorRef {
            id,
            name: claimed_by_name.unwrap_or_default(),
        }),
    })
}
