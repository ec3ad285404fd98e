//! Connect-time authentication benchmark: sequential Socket.IO handshakes
//! against the real gateway binary and a real PostgreSQL directory.
//!
//! ```text
//! cargo build --release
//! cargo run --release --example handshake_bench -- --handshakes 2000
//! cargo run --release --example handshake_bench -- --help
//! ```
//!
//! Needs `psql` on `PATH` and a PostgreSQL that lets `postgres` in without a
//! password (trust auth) at 127.0.0.1:5432, with an existing database `test`
//! to connect to for `CREATE DATABASE` / `DROP DATABASE`.
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
//!    also when a step fails or on Ctrl-C.
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

use std::fmt;
use std::fs::File;
use std::io::{IsTerminal, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow, bail, ensure};
use clap::Parser;
use futures_util::{SinkExt, StreamExt};
use jsonwebtoken::{EncodingKey, Header};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream, connect_async_with_config};

/// HS256 secret shared by the gateway and the token minter (32+ bytes).
const JWT_SECRET: &str = "handshake-bench-secret-not-for-production-use";
/// Directory cache lifetime given to the gateway: longer than any phase.
const CACHE_TTL_SECS: u64 = 3600;
/// Longest wait for one handshake, and for the gateway to become healthy.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest wait for the server to acknowledge a close.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// Sequential Socket.IO handshakes against a real PostgreSQL directory, with
/// a warm and a cold directory cache; prints p50/p95/p99.
#[derive(Debug, Parser)]
#[command(after_help = "Build the gateway first: cargo build --release")]
struct Args {
    /// Handshakes per phase.
    #[arg(long, short = 'n', default_value_t = 2000)]
    handshakes: usize,
    /// The gateway binary to benchmark.
    #[arg(long, default_value = "target/release/cellgate")]
    gateway: PathBuf,
    /// PostgreSQL host (trust auth).
    #[arg(long, default_value = "127.0.0.1")]
    pg_host: String,
    /// PostgreSQL port.
    #[arg(long, default_value_t = 5432)]
    pg_port: u16,
    /// PostgreSQL user.
    #[arg(long, default_value = "postgres")]
    pg_user: String,
    /// Existing database that psql connects to for CREATE/DROP DATABASE.
    #[arg(long, default_value = "test")]
    pg_admin_db: String,
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
    ensure!(
        args.gateway.is_file(),
        "no gateway binary at {} (run `cargo build --release` first, or pass --gateway)",
        args.gateway.display()
    );
    let pg = Postgres::from_args(args);
    let mut db = BenchDatabase::create(&pg)?;
    let outcome = tokio::select! {
        outcome = bench(args, &db) => outcome,
        _ = tokio::signal::ctrl_c() => Err(anyhow!("interrupted")),
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
    let env = GatewayEnv::new(db.url(), data_dir.path())?;
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

    let warm_email = instructor_email(0);
    let warm_token = minter.token(&warm_email)?;
    handshake(&env.ws_url(), &warm_token, &warm_email)
        .await
        .context("priming handshake")?;
    let warm: Vec<Attempt> = (0..n)
        .map(|_| Attempt::new(warm_email.clone(), warm_token.clone()))
        .collect();
    let warm = run_phase(http, env, "warm", &warm).await?;

    let cold = (1..=n)
        .map(|i| {
            let email = instructor_email(i);
            let token = minter.token(&email)?;
            Ok(Attempt::new(email, token))
        })
        .collect::<Result<Vec<_>>>()?;
    let cold = run_phase(http, env, "cold", &cold).await?;
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
    name: &'static str,
    attempts: &[Attempt],
) -> Result<PhaseResult> {
    let url = env.ws_url();
    let before = scrape(http, env).await?;
    let mut progress = Progress::new(name, attempts.len());
    let mut client = Vec::with_capacity(attempts.len());
    let started = Instant::now();
    for (i, attempt) in attempts.iter().enumerate() {
        let took = handshake(&url, &attempt.token, &attempt.email)
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

fn instructor_email(i: usize) -> String {
    format!("user{i}@bench.local")
}

// ------------------------------------------------------------- handshake --

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// One full handshake for `email`; returns the client-observed time.
async fn handshake(url: &str, token: &str, email: &str) -> Result<Duration> {
    let (took, accepted, ws) = tokio::time::timeout(HANDSHAKE_TIMEOUT, timed_handshake(url, token))
        .await
        .map_err(|_| anyhow!("no connection_accepted within {HANDSHAKE_TIMEOUT:?}"))??;
    close(ws).await;
    check_accepted(&accepted, email)?;
    Ok(took)
}

/// The measured part: connect, open, CONNECT, up to `connection_accepted`.
async fn timed_handshake(url: &str, token: &str) -> Result<(Duration, String, Ws)> {
    let started = Instant::now();
    let (mut ws, _) = connect_async_with_config(url, None, true)
        .await
        .context("WebSocket connect")?;
    let open = next_text(&mut ws).await?;
    ensure!(
        open.starts_with('0'),
        "expected an Engine.IO open packet, got {open:?}"
    );
    let connect = format!("40{}", json!({ "token": token }));
    ws.send(Message::text(connect)).await?;
    loop {
        let packet = next_text(&mut ws).await?;
        match packet.as_bytes() {
            [b'4', b'2', ..] => return Ok((started.elapsed(), packet, ws)),
            [b'4', b'0', ..] => {}
            [b'4', b'4', ..] => bail!("refused: {}", refusal_message(&packet[2..])),
            [b'2'] => ws.send(Message::text("3")).await?,
            _ => bail!("unexpected packet {packet:?}"),
        }
    }
}

/// The next text frame; control frames are skipped.
async fn next_text(ws: &mut Ws) -> Result<String> {
    while let Some(message) = ws.next().await {
        match message.context("WebSocket read")? {
            Message::Text(text) => return Ok(text.as_str().to_owned()),
            Message::Close(frame) => bail!("server closed the socket: {frame:?}"),
            Message::Binary(_) => bail!("unexpected binary frame"),
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {}
        }
    }
    bail!("server closed the connection")
}

/// Closes and waits (briefly) for the server's close, so that handshakes do
/// not overlap. Errors here do not matter to the measurement.
async fn close(mut ws: Ws) {
    let drain = async {
        let _ = ws.close(None).await;
        while let Some(Ok(_)) = ws.next().await {}
    };
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, drain).await;
}

fn refusal_message(payload: &str) -> String {
    serde_json::from_str::<Value>(payload)
        .ok()
        .and_then(|v| v.get("message")?.as_str().map(str::to_owned))
        .unwrap_or_else(|| payload.to_owned())
}

/// Checks that `packet` is `42["connection_accepted",{...}]` for `email`.
fn check_accepted(packet: &str, email: &str) -> Result<()> {
    let event: Value = serde_json::from_str(&packet[2..]).context("bad event packet")?;
    ensure!(
        event[0] == "connection_accepted",
        "expected connection_accepted first, got {packet:?}"
    );
    let got = &event[1]["instructor"]["email"];
    ensure!(got == email, "accepted as {got}, expected {email}");
    Ok(())
}

// ---------------------------------------------------------------- tokens --

/// Mints instructor tokens as `cellgate token instructor` does.
struct Minter {
    key: EncodingKey,
    header: Header,
}

impl Minter {
    fn new(secret: &str) -> Result<Self> {
        Ok(Minter {
            key: EncodingKey::from_secret(secret.as_bytes()).context("JWT secret")?,
            header: Header::default(),
        })
    }

    fn token(&self, email: &str) -> Result<String> {
        let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
        let claims = json!({ "sub": email, "role": "instructor", "exp": now + 3600, "iat": now });
        jsonwebtoken::encode(&self.header, &claims, &self.key).context("cannot mint a token")
    }
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

/// Nearest-rank percentile of sorted samples.
fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let rank = (p * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

struct Ms(f64);

impl fmt::Display for Ms {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_infinite() {
            return f.pad("> 5000 ms");
        }
        f.pad(&format!("{:.3} ms", self.0))
    }
}

fn ms(d: Duration) -> Ms {
    Ms(d.as_secs_f64() * 1000.0)
}

fn ms_opt(seconds: Option<f64>) -> String {
    seconds.map_or_else(|| "n/a".into(), |s| Ms(s * 1000.0).to_string())
}

fn print_report(args: &Args, results: &[PhaseResult]) {
    println!();
    println!(
        "{} sequential handshakes per phase; gateway {}; PostgreSQL {}:{}",
        args.handshakes,
        args.gateway.display(),
        args.pg_host,
        args.pg_port
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

// --------------------------------------------------------------- gateway --

/// The settings handed to every `cellgate` command.
struct GatewayEnv {
    database_url: String,
    data_dir: PathBuf,
    listen: SocketAddr,
    metrics: SocketAddr,
}

impl GatewayEnv {
    fn new(database_url: String, data_dir: &Path) -> Result<Self> {
        let [listen, metrics] = free_ports()?;
        Ok(GatewayEnv {
            database_url,
            data_dir: data_dir.to_owned(),
            listen,
            metrics,
        })
    }

    fn command(&self, binary: &Path) -> Command {
        let mut command = Command::new(binary);
        // Settings from the caller's shell would change what is measured.
        for (key, _) in std::env::vars().filter(|(k, _)| k.starts_with("CELLGATE_")) {
            command.env_remove(key);
        }
        command
            .env("CELLGATE_LISTEN_ADDR", self.listen.to_string())
            .env("CELLGATE_METRICS_ADDR", self.metrics.to_string())
            .env("CELLGATE_DATABASE_URL", &self.database_url)
            .env("CELLGATE_JWT_SECRET", JWT_SECRET)
            .env("CELLGATE_DATA_DIR", &self.data_dir)
            .env(
                "CELLGATE_DIRECTORY_CACHE_TTL_SECS",
                CACHE_TTL_SECS.to_string(),
            )
            // Nothing is connected at the end: no need to wait out a drain.
            .env("CELLGATE_DRAIN_SECS", "1")
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .kill_on_drop(true);
        command
    }

    fn ws_url(&self) -> String {
        format!("ws://{}/socket.io/?EIO=4&transport=websocket", self.listen)
    }

    fn healthz_url(&self) -> String {
        format!("http://{}/healthz", self.listen)
    }

    fn metrics_url(&self) -> String {
        format!("http://{}/metrics", self.metrics)
    }
}

/// Two distinct free loopback ports (free when asked; the gateway binds
/// them a moment later).
fn free_ports() -> Result<[SocketAddr; 2]> {
    let a = TcpListener::bind("127.0.0.1:0").context("no free port")?;
    let b = TcpListener::bind("127.0.0.1:0").context("no free port")?;
    Ok([a.local_addr()?, b.local_addr()?])
}

async fn migrate(binary: &Path, env: &GatewayEnv) -> Result<()> {
    let output = env
        .command(binary)
        .arg("migrate")
        .output()
        .await
        .with_context(|| format!("cannot run {}", binary.display()))?;
    ensure!(
        output.status.success(),
        "cellgate migrate failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr).trim()
    );
    Ok(())
}

/// A running `cellgate serve`; killed if dropped without [`Gateway::stop`].
struct Gateway {
    child: Child,
    log: PathBuf,
}

impl Gateway {
    fn spawn(binary: &Path, env: &GatewayEnv) -> Result<Self> {
        let log = env.data_dir.join("gateway.log");
        let file = File::create(&log).context("cannot create the gateway log")?;
        let child = env
            .command(binary)
            .arg("serve")
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()
            .with_context(|| format!("cannot start {}", binary.display()))?;
        Ok(Gateway { child, log })
    }

    async fn wait_healthy(&mut self, http: &reqwest::Client, env: &GatewayEnv) -> Result<()> {
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait()? {
                bail!("the gateway exited during start-up ({status})");
            }
            let healthy = http.get(env.healthz_url()).send().await;
            if healthy.is_ok_and(|r| r.status().is_success()) {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        bail!("the gateway was not healthy within {STARTUP_TIMEOUT:?}")
    }

    /// SIGTERM (graceful), then SIGKILL after ten seconds.
    async fn stop(mut self) {
        if let Some(pid) = self.child.id() {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
        }
        let graceful = tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await;
        if !matches!(graceful, Ok(Ok(status)) if status.success()) {
            eprintln!("the gateway did not stop cleanly on SIGTERM: {graceful:?}");
            let _ = self.child.kill().await;
        }
    }

    fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

// -------------------------------------------------------------- database --

/// Where PostgreSQL is, and how to reach it with psql.
struct Postgres {
    host: String,
    port: u16,
    user: String,
    admin_db: String,
}

impl Postgres {
    fn from_args(args: &Args) -> Self {
        Postgres {
            host: args.pg_host.clone(),
            port: args.pg_port,
            user: args.pg_user.clone(),
            admin_db: args.pg_admin_db.clone(),
        }
    }

    fn url(&self, db: &str) -> String {
        format!("postgres://{}@{}:{}/{db}", self.user, self.host, self.port)
    }

    /// Runs one SQL statement with psql, failing on any SQL error.
    fn psql(&self, db: &str, sql: &str) -> Result<()> {
        let output = std::process::Command::new("psql")
            .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", &self.host])
            .args(["-p", &self.port.to_string(), "-U", &self.user, "-d", db])
            .args(["-c", sql])
            .stdin(Stdio::null())
            .output()
            .context("cannot run psql (is it installed?)")?;
        ensure!(
            output.status.success(),
            "psql failed on {sql:?}: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
        Ok(())
    }
}

/// A database made for one run; dropped by [`BenchDatabase::drop_now`] or,
/// failing that, when this value is dropped.
struct BenchDatabase<'a> {
    pg: &'a Postgres,
    name: String,
    dropped: bool,
}

impl<'a> BenchDatabase<'a> {
    fn create(pg: &'a Postgres) -> Result<Self> {
        let millis = SystemTime::now().duration_since(UNIX_EPOCH)?.as_millis();
        let name = format!("cellgate_bench_{}_{millis}", std::process::id());
        pg.psql(&pg.admin_db, &format!("CREATE DATABASE {name}"))?;
        Ok(BenchDatabase {
            pg,
            name,
            dropped: false,
        })
    }

    fn url(&self) -> String {
        self.pg.url(&self.name)
    }

    /// `user0@bench.local` (the warm phase) to `user{n}@bench.local`.
    fn insert_instructors(&self, n: usize) -> Result<()> {
        let sql = format!(
            "INSERT INTO instructors (id, email, name, is_active, created_at) \
             SELECT 'ins_' || g, 'user' || g || '@bench.local', 'User ' || g, 1, 0 \
             FROM generate_series(0, {n}) g"
        );
        self.pg.psql(&self.name, &sql)
    }

    fn drop_now(&mut self) -> Result<()> {
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
            eprintln!("handshake_bench: cannot drop {}: {error:#}", self.name);
        }
    }
}
