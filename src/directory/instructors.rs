//! Instructors: who may watch, and which classrooms they staff.

use serde::Serialize;
use sqlx::Row;

use super::{Directory, DirectoryError, now_millis};

/// An instructor as the directory knows them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Instructor {
    /// Directory id.
    pub id: String,
    /// Lower-case e-mail, the `sub` of their tokens.
    pub email: String,
    /// Display name.
    pub name: String,
    /// Whether they may still connect.
    pub is_active: bool,
    /// Ids of the classrooms they staff.
    pub classrooms: Vec<String>,
}

impl Instructor {
    /// Whether they staff `classroom`.
    pub fn staffs(&self, classroom: &str) -> bool {
        self.classrooms.iter().any(|c| c == classroom)
    }
}

/// E-mails compare without regard to case or surrounding blanks.
pub fn normalize_email(email: &str) -> String {
    email.trim().to_lowercase()
}

impl Directory {
    /// Looks an instructor up by e-mail, with the classrooms they staff.
    pub async fn instructor_by_email(
        &self,
        email: &str,
    ) -> Result<Option<Instructor>, DirectoryError> {
        let row =
            sqlx::query("SELECT id, email, name, is_active FROM instructors WHERE email = $1")
                .bind(normalize_email(email))
                .fetch_optional(&self.pool)
                .await?;
        let Some(row) = row else { return Ok(None) };

        let id: String = row.try_get("id")?;
        let classrooms = sqlx::query_scalar(
            "SELECT classroom_id FROM classroom_staff WHERE instructor_id = $1 ORDER BY classroom_id",
        )
        .bind(&id)
        .fetch_all(&self.pool)
        .await?;
        Ok(Some(Instructor {
            id,
            email: row.try_get("email")?,
            name: row.try_get("name")?,
            is_active: row.try_get::<i64, _>("is_active")? != 0,
            classrooms,
        }))
    }

    /// Adds an active instructor.
    pub async fn add_instructor(
        &self,
        email: &str,
        name: &str,
    ) -> Result<Instructor, DirectoryError> {
        let email = normalize_email(email);
        if !email.contains('@') || email.len() > 320 {
            return Err(DirectoryError::Invalid(format!(
                "{email:?} is not an e-mail address"
            )));
        }
        let name = name.trim();
        if name.is_empty() || name.chars().count() > 200 {
            return Err(DirectoryError::Invalid(
                "the name must have 1 to 200 characters".into(),
            ));
        }

        let id = format!("ins_{}", uuid::Uuid::new_v4().simple());
        let inserted = sqlx::query(
            "INSERT INTO instructors (id, email, name, is_active, created_at) \
             VALUES ($1, $2, $3, 1, $4) ON CONFLICT (email) DO NOTHING",
        )
        .bind(&id)
        .bind(&email)
        .bind(name)
        .bind(now_millis())
        .execute(&self.pool)
        .await?;
        if inserted.rows_affected() == 0 {
            return Err(DirectoryError::Conflict(format!(
                "instructor {email} exists already"
            )));
        }
        Ok(Instructor {
            id,
            email,
            name: name.to_string(),
            is_active: true,
            classrooms: vec![],
        })
    }

    /// Every instructor, by e-mail.
    pub async fn list_instructors(&self) -> Result<Vec<Instructor>, DirectoryError> {
        let rows = sqlx::query("SELECT email FROM instructors ORDER BY email")
            .fetch_all(&self.pool)
            .await?;
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            let email: String = row.try_get("email")?;
            out.extend(self.instructor_by_email(&email).await?);
        }
        Ok(out)
    }

    /// Turns an instructor's access on or off.
    pub async fn set_active(&self, email: &str, active: bool) -> Result<(), DirectoryError> {
        let email = normalize_email(email);
        let updated = sqlx::query("UPDATE instructors SET is_active = $1 WHERE email = $2")
            .bind(i64::from(active))
            .bind(&email)
            .execute(&self.pool)
            .await?;
        if updated.rows_affected() == 0 {
            return Err(DirectoryError::NotFound(format!("no instructor {email}")));
        }
        Ok(())
    }
}
