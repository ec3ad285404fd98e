//! Shared helpers for integration tests: a private PostgreSQL database per
//! test (dropped afterwards, even when the test panics) and a private
//! SQLite file.

#![allow(dead_code, reason = "each test binary uses a different subset")]

pub mod gateway;
pub mod otlp;

use cellgate::directory::Directory;

/// The server the tests use; `CELLGATE_TEST_POSTGRES` overrides it.
pub fn postgres_server() -> String {
    std::env::var("CELLGATE_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".to_string())
}

/// A database that exists for one test.
pub struct TestDb {
    pub url: String,
    name: Option<String>,
    _dir: Option<tempfile::TempDir>,
}

impl TestDb {
    /// A fresh, migrated PostgreSQL database.
    pub async fn postgres() -> (Self, Directory) {
        let name = format!("cellgate_test_{}", uuid::Uuid::new_v4().simple());
        psql(&format!("CREATE DATABASE {name}"));
        let db = TestDb {
            url: format!("{}/{name}", postgres_server()),
            name: Some(name),
            _dir: None,
        };
        let directory = Directory::connect_lazy(&db.url).expect("pool");
        directory.migrate().await.expect("migrate");
        (db, directory)
    }

    /// A fresh, migrated SQLite file.
    pub async fn sqlite() -> (Self, Directory) {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!("sqlite://{}/directory.db?mode=rwc", dir.path().display());
        let db = TestDb {
            url,
            name: None,
            _dir: Some(dir),
        };
        let directory = Directory::connect_lazy(&db.url).expect("pool");
        directory.migrate().await.expect("migrate");
        (db, directory)
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if let Some(name) = self.name.take() {
            psql(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"));
        }
    }
}

fn psql(sql: &str) {
    let server = postgres_server();
    let status = std::process::Command::new("psql")
        .args([
            &format!("{server}/test"),
            "-v",
            "ON_ERROR_STOP=1",
            "-qc",
            sql,
        ])
        .status()
        .expect("psql must be installed to run the PostgreSQL tests");
    assert!(status.success(), "psql failed: {sql}");
}
