//! A PostgreSQL database made for one benchmark run, reached with `psql`,
//! and dropped at the end whatever happens.

use std::process::Stdio;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, ensure};

/// Where PostgreSQL is (trust auth: no password is ever passed).
#[derive(Debug, Clone, clap::Args)]
pub struct Postgres {
    /// PostgreSQL host (trust auth).
    #[arg(long = "pg-host", value_name = "PG_HOST", default_value = "127.0.0.1")]
    pub host: String,
    /// PostgreSQL port.
    #[arg(long = "pg-port", value_name = "PG_PORT", default_value_t = 5432)]
    pub port: u16,
    /// PostgreSQL user.
    #[arg(long = "pg-user", value_name = "PG_USER", default_value = "postgres")]
    pub user: String,
    /// Existing database that psql connects to for CREATE/DROP DATABASE.
    #[arg(
        long = "pg-admin-db",
        value_name = "PG_ADMIN_DB",
        default_value = "test"
    )]
    pub admin_db: String,
}

impl Postgres {
    /// The URL the gateway is given for `db`.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://{}@{}:{}/{db}", self.user, self.host, self.port)
    }

    /// Runs SQL with psql, failing on any SQL error.
    pub fn psql(&self, db: &str, sql: &str) -> Result<()> {
        let output = std::process::Command::new("psql")
            .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", &self.host])
            .args(["-p", &self.port.to_string(), "-U", &self.user, "-d", db])
            .args(["-c", sql])
            .stdin(Stdio::null())
            .output()
            .context("cannot run psql (is it installed?)")?;
        ensure!(
            output.status.success(),
            "psql failed on {:?}: {}",
            abbreviate(sql),
            String::from_utf8_lossy(&output.stderr).trim()
        );
        Ok(())
    }
}

fn abbreviate(sql: &str) -> String {
    match sql.char_indices().nth(200) {
        Some((at, _)) => format!("{}…", &sql[..at]),
        None => sql.to_string(),
    }
}

/// A database made for one run; dropped by [`BenchDatabase::drop_now`] or,
/// failing that (an error, a panic), when this value is dropped.
pub struct BenchDatabase<'a> {
    pg: &'a Postgres,
    /// `cellgate_bench_<pid>_<millis>`.
    pub name: String,
    /// `<pid>_<millis>`: unique to this run, used in instructor and
    /// classroom ids so that nothing collides in the shared Redis.
    pub tag: String,
    dropped: bool,
}

impl<'a> BenchDatabase<'a> {
    /// `CREATE DATABASE cellgate_bench_<pid>_<millis>`.
    pub fn create(pg: &'a Postgres) -> Result<Self> {
        let millis = SystemTime::now().duration_since(UNIX_EPOCH)?.as_millis();
        let tag = format!("{}_{millis}", std::process::id());
        let name = format!("cellgate_bench_{tag}");
        pg.psql(&pg.admin_db, &format!("CREATE DATABASE {name}"))?;
        Ok(BenchDatabase {
            pg,
            name,
            tag,
            dropped: false,
        })
    }

    /// The gateway's `CELLGATE_DATABASE_URL`.
    pub fn url(&self) -> String {
        self.pg.url(&self.name)
    }

    /// Runs SQL in this database.
    pub fn psql(&self, sql: &str) -> Result<()> {
        self.pg.psql(&self.name, sql)
    }

    /// Instructors `user0@bench.local` to `user{n}@bench.local` (n + 1 of
    /// them), with ids `ins_<tag>_<i>`, in one `INSERT`.
    pub fn insert_instructors(&self, n: usize) -> Result<()> {
        let tag = &self.tag;
        self.psql(&format!(
            "INSERT INTO instructors (id, email, name, is_active, created_at) \
             SELECT 'ins_{tag}_' || g, 'user' || g || '@bench.local', 'User ' || g, 1, 0 \
             FROM generate_series(0, {n}) g"
        ))
    }

    /// A classroom of `seats` seats staffed by instructors `0..=last`.
    pub fn insert_classroom(&self, id: &str, seats: u32, last: usize) -> Result<()> {
        let tag = &self.tag;
        self.psql(&format!(
            "INSERT INTO classrooms (id, seats, created_at) VALUES ('{id}', {seats}, 0); \
             INSERT INTO classroom_staff (classroom_id, instructor_id) \
             SELECT '{id}', 'ins_{tag}_' || g FROM generate_series(0, {last}) g"
        ))
    }

    /// `DROP DATABASE … WITH (FORCE)`: also when a gateway still holds it.
    pub fn drop_now(&mut self) -> Result<()> {
        self.dropped = true;
        let sql = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name);
        self.pg.psql(&self.pg.admin_db, &sql)
    }
}

impl Drop for BenchDatabase<'_> {
    fn drop(&mut self) {
        if !self.dropped
            && let Err(error) = self.drop_now()
        {
            eprintln!("bench: cannot drop {}: {error:#}", self.name);
        }
    }
}

/// The e-mail of instructor `i`.
pub fn instructor_email(i: usize) -> String {
    format!("user{i}@bench.local")
}
