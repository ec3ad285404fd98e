//! The instructor directory, classrooms and the help queue, stored in
//! PostgreSQL (production) or SQLite (the embedded default).
//!
//! One set of SQL runs on both through sqlx's `Any` driver: ids are text,
//! flags and timestamps are integers (milliseconds since the epoch).
//! [`cache::DirectoryCache`] sits in front of the lookups made per
//! connection.

pub mod cache;
mod classrooms;
mod help;
mod instructors;

use std::path::Path;
use std::sync::{Arc, Once};
use std::time::Duration;

use sqlx::AnyPool;
use sqlx::any::AnyPoolOptions;

pub use classrooms::Classroom;
pub use help::{ClaimOutcome, NewHelpRequest, ResolveOutcome};
pub use instructors::{Instructor, normalize_email};

use crate::config::redact_url;

/// The embedded schema migrations (`migrations/`).
static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// A directory failure. The URL in it has its password hidden.
///
/// The message holds the cause, which is therefore not also given as a
/// `source`: a report that walks the chain would print it twice.
#[derive(Debug, thiserror::Error)]
pub enum DirectoryError {
    /// The database could not be reached or failed the query.
    #[error("directory database error: {0}")]
    Database(sqlx::Error),
    /// Migrations could not be applied.
    #[error("cannot apply migrations: {}", migrate_cause(.0))]
    Migrate(sqlx::migrate::MigrateError),
    /// The row asked for does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The row to create exists already.
    #[error("{0}")]
    Conflict(String),
    /// The input is not acceptable.
    #[error("{0}")]
    Invalid(String),
}

impl From<sqlx::Error> for DirectoryError {
    fn from(error: sqlx::Error) -> Self {
        DirectoryError::Database(error)
    }
}

impl From<sqlx::migrate::MigrateError> for DirectoryError {
    fn from(error: sqlx::migrate::MigrateError) -> Self {
        DirectoryError::Migrate(error)
    }
}

/// sqlx says "while executing migrations" before the database's own error;
/// the database's error is what the operator needs.
fn migrate_cause(error: &sqlx::migrate::MigrateError) -> String {
    match error {
        sqlx::migrate::MigrateError::Execute(e) => e.to_string(),
        other => other.to_string(),
    }
}

impl DirectoryError {
    /// Whether retrying could help (the database was unreachable or busy).
    pub fn is_transient(&self) -> bool {
        match self {
            DirectoryError::Database(e) => transient_sqlx(e),
            DirectoryError::Migrate(sqlx::migrate::MigrateError::Execute(e)) => transient_sqlx(e),
            _ => false,
        }
    }
}

fn transient_sqlx(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Io(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::WorkerCrashed => true,
        // Connection exceptions (08…) and operator intervention such as a
        // shutdown in progress (57P…).
        sqlx::Error::Database(e) => e
            .code()
            .is_some_and(|c| c.starts_with("08") || c.starts_with("57P")),
        _ => false,
    }
}

/// Handle on the directory database; cheap to clone.
#[derive(Clone)]
pub struct Directory {
    pool: AnyPool,
    /// For one direct connection when the pool only says it timed out.
    url: Arc<str>,
}

impl Directory {
    /// Opens a pool for `url` without connecting yet, so that the gateway
    /// starts (and reports not ready) while the database is away.
    pub fn connect_lazy(url: &str) -> Result<Self, DirectoryError> {
        static DRIVERS: Once = Once::new();
        DRIVERS.call_once(sqlx::any::install_default_drivers);

        if let Some(path) = sqlite_path(url)
            && let Some(parent) = Path::new(path).parent()
            && !parent.as_os_str().is_empty()
        {
            std::fs::create_dir_all(parent).map_err(|e| {
                DirectoryError::Invalid(format!("cannot create {}: {e}", parent.display()))
            })?;
        }

        let url = &*sqlite_creating(url);
        let pool = AnyPoolOptions::new()
            .max_connections(10)
            .min_connections(0)
            .acquire_timeout(Duration::from_secs(2))
            .connect_lazy(url)
            .map_err(|e| {
                DirectoryError::Invalid(format!("bad database URL {}: {e}", redact_url(url)))
            })?;
        Ok(Directory {
            pool,
            url: url.into(),
        })
    }

    /// Applies every pending migration; returns how many were pending
    /// just before (0: the schema was up to date already).
    pub async fn migrate(&self) -> Result<usize, DirectoryError> {
        let pending = match self.pending_migrations().await {
            Ok(pending) => pending,
            Err(DirectoryError::Database(sqlx::Error::PoolTimedOut)) => {
                return Err(self.why_unreachable().await);
            }
            Err(error) => return Err(error),
        };
        match MIGRATOR.run(&self.pool).await {
            Ok(()) => Ok(pending),
            Err(sqlx::migrate::MigrateError::Execute(sqlx::Error::PoolTimedOut)) => {
                Err(self.why_unreachable().await)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// The pool only says "timed out" when it cannot connect; one direct
    /// connection tells why (refused, unknown host, TLS, password…).
    pub async fn why_unreachable(&self) -> DirectoryError {
        use sqlx::Connection;
        let attempt = sqlx::AnyConnection::connect(&self.url);
        match tokio::time::timeout(Duration::from_secs(5), attempt).await {
            Ok(Err(e)) => DirectoryError::Database(e),
            Ok(Ok(_)) | Err(_) => DirectoryError::Database(sqlx::Error::PoolTimedOut),
        }
    }

    /// Whether the schema lacks migrations this binary knows.
    pub async fn pending_migrations(&self) -> Result<usize, DirectoryError> {
        let applied: Vec<(i64,)> =
            match sqlx::query_as("SELECT version FROM _sqlx_migrations WHERE success = TRUE")
                .fetch_all(&self.pool)
                .await
            {
                Ok(rows) => rows,
                Err(sqlx::Error::Database(_)) => Vec::new(),
                Err(e) => return Err(e.into()),
            };
        let known = MIGRATOR
            .iter()
            .filter(|m| m.migration_type.is_up_migration());
        Ok(known
            .filter(|m| !applied.iter().any(|(v,)| *v == m.version))
            .count())
    }

    /// One round trip, for readiness.
    pub async fn ping(&self) -> Result<(), DirectoryError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    /// Closes the pool.
    pub async fn close(&self) {
        self.pool.close().await;
    }
}

/// A SQLite file URL that creates its file when missing, as
/// `postgres://` users would expect: sqlx opens read-write only unless told
/// `mode=rwc`. A `mode` the URL names is kept.
fn sqlite_creating(url: &str) -> std::borrow::Cow<'_, str> {
    let names_mode = url
        .split_once('?')
        .is_some_and(|(_, query)| query.split('&').any(|p| p.starts_with("mode=")));
    if sqlite_path(url).is_none() || names_mode {
        return url.into();
    }
    let joiner = if url.contains('?') { '&' } else { '?' };
    format!("{url}{joiner}mode=rwc").into()
}

fn sqlite_path(url: &str) -> Option<&str> {
    let rest = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))?;
    let path = rest.split('?').next().unwrap_or(rest);
    (!path.is_empty() && path != ":memory:").then_some(path)
}

fn now_millis() -> i64 {
    crate::model::to_millis(chrono::Utc::now())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlite_paths_are_found_in_urls() {
        assert_eq!(
            sqlite_path("sqlite://.cellgate/x.db?mode=rwc"),
            Some(".cellgate/x.db")
        );
        assert_eq!(sqlite_path("sqlite::memory:"), None);
        assert_eq!(
            sqlite_creating("sqlite://mine.db"),
            "sqlite://mine.db?mode=rwc"
        );
        assert_eq!(
            sqlite_creating("sqlite://a.db?cache=shared"),
            "sqlite://a.db?cache=shared&mode=rwc"
        );
        assert_eq!(
            sqlite_creating("sqlite://a.db?mode=ro"),
            "sqlite://a.db?mode=ro"
        );
        assert_eq!(sqlite_creating("postgres://h/db"), "postgres://h/db");
        assert_eq!(sqlite_path("postgres://h/db"), None);
    }
}
