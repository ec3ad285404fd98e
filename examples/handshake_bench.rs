//! Connect-time authentication benchmark: sequential Socket.IO handshakes
//! against the real gateway binary and a real PostgreSQL directory.
//!
//! ```text
//! cargo build --release --locked --bins --examples
//! target/release/examples/handshake_bench --handshakes 2000
//! target/release/examples/handshake_bench --help
//! ```
//!
//! Needs `psql` on `PATH` and a PostgreSQL that lets `postgres` in without a
//! password (trust auth) at 127.0.0.1:5432, with an existing database `test`
//! to connect to for `CREATE DATABASE` / `DROP DATABASE`. The database,
//! gateway and client pieces live in `examples/bench/`, shared with
//! `delivery_bench` and `capacity_bench`.
//!
//! What it does, in order:
//! 1. creates a fresh database `cellgate_bench_<pid>_<millis>`, runs
//!    `cellgate migrate` on it and inserts N+1 instructors with one `INSERT`;
//! 2. starts `cellgate serve` on two free loopback ports (`RUST_LOG=warn`,
//!    directory cache TTL of one hour so that no entry expires mid-phase) and
//!    waits for `/healthz`;
//! 3. **warm**: one priming handshake, then N handshakes by that same
//!    instructor (every lookup is a cache hit);
//! 4. **cold**: N handshakes, each by a different instructor (every lookup
//!    misses the cache and queries PostgreSQL over an already open pool);
//! 5. prints a table, stops the gateway (SIGTERM) and drops the database,
//!    also when a step fails, on Ctrl-C or on SIGTERM.
//!
//! A handshake is WebSocket-only Engine.IO v4 / Socket.IO v5: TCP connect and
//! upgrade, the `0{...}` open packet, `40{"token":...}`, `40{"sid":...}`, then
//! `42["connection_accepted",...]`. The client-side time runs from before the
//! TCP connect to the arrival of `connection_accepted`; the socket is closed
//! (and the close acknowledged) before the next handshake starts, outside the
//! measured time. The server-side figures come from the
//! `cellgate_auth_duration_seconds{outcome="accepted"}` histogram scraped
//! before and after each phase: its percentiles are estimated from the
//! bucket bounds (linear interpolation, as Prometheus' `histogram_quantile`),
//! its mean is exact (`_sum / _count`).

#[path = "bench/mod.rs"]
#[allow(dead_code, reason = "each benchmark uses part of the shared module")]
mod bench;

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, ensure};
use clap::Parser;

use bench::client::{self, Connector, Minter, check_accepted};
use bench::fanout::NO_HANDSHAKE_LIMIT;
use bench::gateway::{Gateway, GatewayEnv, JWT_SECRET, check_binary, interrupted, migrate};
use bench::pg::{BenchDatabase, Postgres, instructor_email};
use bench::stats::{Ms, ms, ms_opt, percentile};

/// Sequential Socket.IO handshakes against a real PostgreSQL directory, with
/// a warm and a cold directory cache; prints p50/p95/p99.
#[derive(Debug, Parser)]
#[command(
    after_help = "Build the gateway first: cargo build --release --locked --bins --examples (and run from the repository root, or pass --gateway)"
)]
struct Args {
    /// Handshakes per phase.
    #[arg(long, short = 'n', default_value_t = 2000)]
    handshakes: usize,
    /// The gateway binary to benchmark.
    #[arg(long, default_value = "target/release/cellgate")]
    gateway: PathBuf,
    #[command(flatten)]
    pg: Postgres,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("handshake_bench: error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: &Args) -> Result<()> {
    ensure!(args.handshakes > 0, "--handshakes must be at least 1");
    check_binary(&args.gateway)?;
    let mut db = BenchDatabase::create(&args.pg)?;
    let outcome = tokio::select! {
        outcome = bench(args, &db) => outcome,
        () = interrupted() => Err(anyhow!("interrupted")),
    };
    let dropped = db.drop_now();
    let results = outcome?;
    dropped?;
    print_report(args, &results);
    Ok(())
}

/// Everything between creating and dropping the database.
async fn bench(args: &Args, db: &BenchDatabase<'_>) -> Result<Vec<PhaseResult>> {
    let data_dir = tempfile::tempdir().context("cannot create a data directory")?;
    // One client opens every connection from 127.0.0.1: the per-address
    // handshake budget (a burst of 60) would refuse all but the first.
    let (key, value) = NO_HANDSHAKE_LIMIT;
    let env = GatewayEnv::new(db.url(), data_dir.path())?.var(key, value);
    migrate(&args.gateway, &env).await?;
    db.insert_instructors(args.handshakes)?;
    eprintln!(
        "database {} ready: {} instructors; starting {}",
        db.name,
        args.handshakes + 1,
        args.gateway.display()
    );

    let mut gateway = Gateway::spawn(&args.gateway, &env)?;
    let http = reqwest::Client::new();
    let outcome = match gateway.wait_healthy(&http, &env).await {
        Ok(()) => run_phases(&http, &env, args.handshakes).await,
        Err(error) => Err(error),
    };
    if outcome.is_err() {
        eprintln!("gateway log (last lines):\n{}", gateway.log_tail(20));
    }
    gateway.stop().await;
    outcome
}

// ---------------------------------------------------------------- phases --

async fn run_phases(
    http: &reqwest::Client,
    env: &GatewayEnv,
    n: usize,
) -> Result<Vec<PhaseResult>> {
    let minter = Minter::new(JWT_SECRET)?;
    let connector = Connector::new(env.listen, env.ws_url(), 1);

    let warm_email = instructor_email(0);
    let warm_token = minter.instructor(&warm_email)?;
    handshake(&connector, &warm_token, &warm_email)
        .await
        .context("priming handshake")?;
    let warm: Vec<Attempt> = (0..n)
        .map(|_| Attempt::new(warm_email.clone(), warm_token.clone()))
        .collect();
    let warm = run_phase(http, env, &connector, "warm", &warm).await?;

    let cold = (1..=n)
        .map(|i| {
            let email = instructor_email(i);
            let token = minter.instructor(&email)?;
            Ok(Attempt::new(email, token))
        })
        .collect::<Result<Vec<_>>>()?;
    let cold = run_phase(http, env, &connector, "cold", &cold).await?;
    Ok(vec![warm, cold])
}

/// One handshake to make: who, and with which token.
struct Attempt {
    email: String,
    token: String,
}

impl Attempt {
    fn new(email: String, token: String) -> Self {
        Attempt { email, token }
    }
}

/// What one phase measured.
struct PhaseResult {
    name: &'static str,
    client: Vec<Duration>,
    wall: Duration,
    server: Counters,
}

async fn run_phase(
    http: &reqwest::Client,
    env: &GatewayEnv,
    connector: &Connector,
    name: &'static str,
    attempts: &[Attempt],
) -> Result<PhaseResult> {
    let before = scrape(http, env).await?;
    let mut progress = Progress::new(name, attempts.len());
    let mut client = Vec::with_capacity(attempts.len());
    let started = Instant::now();
    for (i, attempt) in attempts.iter().enumerate() {
        let took = handshake(connector, &attempt.token, &attempt.email)
            .await
            .with_context(|| format!("{name} handshake {} of {}", i + 1, attempts.len()))?;
        client.push(took);
        progress.tick(&client);
    }
    let wall = started.elapsed();
    progress.finish(&client);
    let after = scrape(http, env).await?;
    Ok(PhaseResult {
        name,
        client,
        wall,
        server: after.since(&before)?,
    })
}

// ------------------------------------------------------------- handshake --

/// One full handshake for `email`; returns the client-observed time. The
/// socket is closed (and the close acknowledged) outside the measured time.
async fn handshake(connector: &Connector, token: &str, email: &str) -> Result<Duration> {
    let (ws, took, accepted) = client::handshake(connector, token).await?;
    client::close(ws).await;
    check_accepted(&accepted, email)?;
    Ok(took)
}

// --------------------------------------------------------------- metrics --

/// The counters read from one `/metrics` scrape, or the difference of two
/// (the server's view of one phase).
#[derive(Debug, Default)]
struct Counters {
    /// `(le, cumulative count)` of the accepted auth histogram, `+Inf` last.
    auth_buckets: Vec<(f64, f64)>,
    auth_sum: f64,
    auth_count: f64,
    cache_hits: f64,
    cache_misses: f64,
    query_sum: f64,
    query_count: f64,
}

async fn scrape(http: &reqwest::Client, env: &GatewayEnv) -> Result<Counters> {
    let text = http
        .get(env.metrics_url())
        .send()
        .await
        .and_then(reqwest::Response::error_for_status)
        .context("GET /metrics")?
        .text()
        .await?;
    Counters::parse(&text)
}

impl Counters {
    fn parse(text: &str) -> Result<Counters> {
        let mut s = Counters::default();
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let Some((series, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let value: f64 = value
                .parse()
                .with_context(|| format!("bad sample {line:?}"))?;
            s.record(series, value)?;
        }
        ensure!(
            !s.auth_buckets.is_empty(),
            "no cellgate_auth_duration_seconds in /metrics"
        );
        s.auth_buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        Ok(s)
    }

    fn record(&mut self, series: &str, value: f64) -> Result<()> {
        let name = series.split_once('{').map_or(series, |(name, _)| name);
        if let Some(part) = name.strip_prefix("cellgate_auth_duration_seconds_") {
            if series.contains("outcome=\"accepted\"") {
                match part {
                    "bucket" => self.auth_buckets.push((bucket_bound(series)?, value)),
                    "sum" => self.auth_sum = value,
                    "count" => self.auth_count = value,
                    _ => {}
                }
            }
            return Ok(());
        }
        match name {
            "cellgate_directory_cache_hits_total" => self.cache_hits = value,
            "cellgate_directory_cache_misses_total" => self.cache_misses = value,
            "cellgate_directory_query_duration_seconds_sum" => self.query_sum = value,
            "cellgate_directory_query_duration_seconds_count" => self.query_count = value,
            _ => {}
        }
        Ok(())
    }

    fn since(&self, before: &Counters) -> Result<Counters> {
        ensure!(
            self.auth_buckets.len() == before.auth_buckets.len(),
            "the histogram's buckets changed between scrapes"
        );
        let auth_buckets = self
            .auth_buckets
            .iter()
            .zip(&before.auth_buckets)
            .map(|(&(le, after), &(_, before))| (le, after - before))
            .collect();
        Ok(Counters {
            auth_buckets,
            auth_sum: self.auth_sum - before.auth_sum,
            auth_count: self.auth_count - before.auth_count,
            cache_hits: self.cache_hits - before.cache_hits,
            cache_misses: self.cache_misses - before.cache_misses,
            query_sum: self.query_sum - before.query_sum,
            query_count: self.query_count - before.query_count,
        })
    }
}

/// The `le` label of a bucket series, `+Inf` included.
fn bucket_bound(series: &str) -> Result<f64> {
    let le = series
        .split("le=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .ok_or_else(|| anyhow!("bucket without le: {series}"))?;
    match le {
        "+Inf" => Ok(f64::INFINITY),
        other => other.parse().with_context(|| format!("bad le in {series}")),
    }
}

impl Counters {
    /// Estimated `q` quantile in seconds, interpolating linearly inside the
    /// bucket that holds it (as `histogram_quantile`). A quantile in the
    /// `+Inf` bucket is reported as the largest finite bound.
    fn quantile(&self, q: f64) -> Option<f64> {
        let rank = q * self.auth_count;
        let mut lower = (0.0, 0.0);
        for &(le, count) in &self.auth_buckets {
            if count >= rank && count > 0.0 {
                if le.is_infinite() {
                    return Some(lower.0);
                }
                let share = (rank - lower.1) / (count - lower.1);
                return Some(lower.0 + (le - lower.0) * share);
            }
            lower = (le, count);
        }
        None
    }

    /// Upper bound of the highest non-empty bucket, in seconds.
    fn max_bound(&self) -> Option<f64> {
        let total = self.auth_buckets.last()?.1;
        self.auth_buckets
            .iter()
            .find(|&&(_, count)| count >= total && total > 0.0)
            .map(|&(le, _)| le)
    }

    fn mean(&self) -> Option<f64> {
        (self.auth_count > 0.0).then(|| self.auth_sum / self.auth_count)
    }
}

// ----------------------------------------------------------------- report --

fn print_report(args: &Args, results: &[PhaseResult]) {
    println!();
    println!(
        "{} sequential handshakes per phase; gateway {}; PostgreSQL {}:{}",
        args.handshakes,
        args.gateway.display(),
        args.pg.host,
        args.pg.port
    );
    println!(
        "{:<5} {:<7} {:>11} {:>11} {:>11} {:>12} {:>11} {:>13}",
        "phase", "view", "p50", "p95", "p99", "max", "mean", "handshakes/s"
    );
    for result in results {
        print_client_row(result);
        print_server_row(result);
    }
    println!();
    for result in results {
        print_directory_line(result);
    }
    println!(
        "client: from before TCP connect to connection_accepted (nearest-rank percentiles); \
         server: cellgate_auth_duration_seconds{{outcome=\"accepted\"}}, percentiles \
         estimated from buckets, mean exact, max = upper bound of the highest bucket used"
    );
}

fn print_client_row(result: &PhaseResult) {
    let mut sorted = result.client.clone();
    sorted.sort();
    let mean = sorted.iter().sum::<Duration>() / sorted.len() as u32;
    let rate = sorted.len() as f64 / result.wall.as_secs_f64();
    println!(
        "{:<5} {:<7} {:>11} {:>11} {:>11} {:>12} {:>11} {:>13.0}",
        result.name,
        "client",
        ms(percentile(&sorted, 0.50)),
        ms(percentile(&sorted, 0.95)),
        ms(percentile(&sorted, 0.99)),
        ms(*sorted.last().expect("at least one handshake")),
        ms(mean),
        rate
    );
}

fn print_server_row(result: &PhaseResult) {
    let s = &result.server;
    let max = s
        .max_bound()
        .map_or_else(|| "n/a".into(), |b| format!("<= {}", Ms(b * 1000.0)));
    println!(
        "{:<5} {:<7} {:>11} {:>11} {:>11} {:>12} {:>11} {:>13}",
        result.name,
        "server",
        ms_opt(s.quantile(0.50)),
        ms_opt(s.quantile(0.95)),
        ms_opt(s.quantile(0.99)),
        max,
        ms_opt(s.mean()),
        "-"
    );
}

fn print_directory_line(result: &PhaseResult) {
    let s = &result.server;
    let query_mean = (s.query_count > 0.0).then(|| s.query_sum / s.query_count);
    println!(
        "{}: {} auth observations, directory cache {} hits / {} misses, \
         {} directory lookups reached PostgreSQL (mean {} each), wall {:.2} s",
        result.name,
        s.auth_count,
        s.cache_hits,
        s.cache_misses,
        s.query_count,
        ms_opt(query_mean),
        result.wall.as_secs_f64()
    );
}

/// A progress line on stderr: rewritten in place on a terminal, every 10%
/// otherwise.
struct Progress {
    phase: &'static str,
    total: usize,
    tty: bool,
    last: Instant,
    last_decile: usize,
}

impl Progress {
    fn new(phase: &'static str, total: usize) -> Self {
        Progress {
            phase,
            total,
            tty: std::io::stderr().is_terminal(),
            last: Instant::now(),
            last_decile: 0,
        }
    }

    fn tick(&mut self, done: &[Duration]) {
        let decile = done.len() * 10 / self.total;
        let due = if self.tty {
            self.last.elapsed() >= Duration::from_millis(200)
        } else {
            decile > self.last_decile
        };
        if due && done.len() < self.total {
            self.print(done, false);
            self.last = Instant::now();
            self.last_decile = decile;
        }
    }

    fn finish(&mut self, done: &[Duration]) {
        self.print(done, true);
    }

    fn print(&self, done: &[Duration], last: bool) {
        let latest = done.last().copied().unwrap_or_default();
        let line = format!(
            "{:<5} {:>6}/{} handshakes, last {}",
            self.phase,
            done.len(),
            self.total,
            ms(latest)
        );
        let mut err = std::io::stderr().lock();
        let _ = match (self.tty, last) {
            (true, false) => write!(err, "\r{line}\x1b[K"),
            (true, true) => writeln!(err, "\r{line}\x1b[K"),
            (false, _) => writeln!(err, "{line}"),
        };
        let _ = err.flush();
    }
}
