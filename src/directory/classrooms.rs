//! Classrooms and who staffs them.

use serde::Serialize;
use sqlx::Row;

use super::instructors::normalize_email;
use super::{Directory, DirectoryError, now_millis};

/// Longest classroom id accepted.
const MAX_ID_LEN: usize = 64;

/// A classroom as the directory knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Classroom {
    /// Its id, e.g. `cls-101`.
    pub id: String,
    /// Number of seats.
    pub seats: u32,
}

impl Directory {
    /// Creates a classroom.
    pub async fn add_classroom(&self, id: &str, seats: u32) -> Result<Classroom, DirectoryError> {
        validate_id(id)?;
        if seats == 0 || seats > 10_000 {
            return Err(DirectoryError::Invalid(
                "seats must be between 1 and 10000".into(),
            ));
        }
        let inserted = sqlx::query(
            "INSERT INTO classrooms (id, seats, created_at) VALUES ($1, $2, $3) \
             ON CONFLICT (id) DO NOTHING",
        )
        .bind(id)
        .bind(i64::from(seats))
        .bind(now_millis())
        .execute(&self.pool)
        .await?;
        if inserted.rows_affected() == 0 {
            return Err(DirectoryError::Conflict(format!(
                "classroom {id} exists already"
            )));
        }
        Ok(Classroom {
            id: id.to_string(),
            seats,
        })
    }

    /// Looks a classroom up.
    pub async fn classroom(&self, id: &str) -> Result<Option<Classroom>, DirectoryError> {
        let row = sqlx::query("SELECT id, seats FROM classrooms WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|row| {
            let seats: i64 = row.try_get("seats")?;
            Ok(Classroom {
                id: row.try_get("id")?,
                seats: seats.clamp(1, 10_000) as u32,
            })
        })
        .transpose()
    }

    /// Every classroom, by id.
    pub async fn list_classrooms(&self) -> Result<Vec<Classroom>, DirectoryError> {
        let rows = sqlx::query("SELECT id, seats FROM classrooms ORDER BY id")
            .fetch_all(&self.pool)
            .await?;
        rows.into_iter()
            .map(|row| {
                let seats: i64 = row.try_get("seats")?;
                Ok(Classroom {
                    id: row.try_get("id")?,
                    seats: seats as u32,
                })
            })
            .collect()
    }

    /// Makes the instructor with `email` staff of `classroom`.
    pub async fn add_staff(&self, classroom: &str, email: &str) -> Result<(), DirectoryError> {
        let email = normalize_email(email);
        if self.classroom(classroom).await?.is_none() {
            return Err(DirectoryError::NotFound(format!(
                "no classroom {classroom}"
            )));
        }
        let Some(instructor) = self.instructor_by_email(&email).await? else {
            return Err(DirectoryError::NotFound(format!("no instructor {email}")));
        };
        sqlx::query(
            "INSERT INTO classroom_staff (classroom_id, instructor_id) VALUES ($1, $2) \
             ON CONFLICT DO NOTHING",
        )
        .bind(classroom)
        .bind(&instructor.id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }
}

fn validate_id(id: &str) -> Result<(), DirectoryError> {
    let fine = !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if fine {
        Ok(())
    } else {
        Err(DirectoryError::Invalid(format!(
            "classroom ids are 1 to {MAX_ID_LEN} letters, digits, '-', '_' or '.'; got {id:?}"
        )))
    }
}
