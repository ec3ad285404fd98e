//! Leak benchmark: tens of thousands of dashboard lifecycles, the ordinary
//! and the broken ones, against the release gateway; afterwards nothing of
//! them may remain: no session, no connected socket, no presence in the
//! classroom, no open descriptor, and resident memory back within 10 % of
//! its baseline.
//!
//! ```text
//! cargo build --release --locked --bins --examples
//! target/release/examples/leak_bench                   # 20,000 cycles
//! target/release/examples/leak_bench --cycles 5000 --settle-secs 60
//! target/release/examples/leak_bench --help
//! ```
//!
//! Needs `psql` and a PostgreSQL at 127.0.0.1:5432 that lets `postgres` in
//! without a password (a database `test` to run `CREATE DATABASE` from).
//! The database it creates is dropped at the end, also after an error or
//! Ctrl-C.
//!
//! Every twenty cycles hold:
//! - 12 **watch**: handshake, `join_classroom`, close;
//! - 2 **leave mid-join**: handshake, `join_classroom` sent, the TCP
//!   connection dropped before the acknowledgement;
//! - 2 **refused**: a token signed with another secret (`invalid_token`);
//! - 2 **abandoned handshake**: WebSocket opened, the Engine.IO open packet
//!   read, then the connection dropped without a Socket.IO CONNECT;
//! - 1 **abandoned polling**: an Engine.IO polling session opened and never
//!   polled again (the gateway closes it after its ping timeout);
//! - 1 **stalled upgrade**: a polling session whose WebSocket upgrade is
//!   probed and never completed.
//!
//! A warm-up of `--warmup` cycles (as many as measured, by default) runs
//! first; then the gateway is left alone for `--settle-secs` (longer than
//! Engine.IO's ping interval plus timeout, 45 s, after which abandoned
//! sessions are closed) and its RSS is the baseline. The warm-up is as
//! large as the measured run because the allocator keeps the memory it
//! needed at the peak (thousands of abandoned sessions alive at once): a
//! baseline below that peak would read as a leak. After the measured
//! cycles and the same settling, the figures are read again; a leak grows
//! with every cycle, so it shows as growth over a baseline of the same
//! size.

#[path = "bench/mod.rs"]
#[allow(dead_code, reason = "each benchmark uses part of the shared module")]
mod bench;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, ensure};
use clap::Parser;
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

use bench::client::{self, Connector, Minter};
use bench::fanout::{self, CAPACITY_LIMITS, Pod, load_average, progress};
use bench::gateway::{ProcStats, check_binary, interrupted, metric, migrate, raise_fd_limit};
use bench::pg::{BenchDatabase, Postgres, instructor_email};

/// Connect, join and disconnect, over and over, and check nothing stays.
#[derive(Debug, Parser)]
#[command(after_help = "Build first: cargo build --release --locked --bins --examples")]
struct Args {
    /// Measured cycles.
    #[arg(long, default_value_t = 20_000)]
    cycles: usize,
    /// Cycles before the baseline is taken (default: as many as measured,
    /// so that the baseline has seen the same peak: the allocator keeps
    /// memory it once needed, and abandoned sessions pile up for 45 s).
    #[arg(long)]
    warmup: Option<usize>,
    /// Cycles in flight at once.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Seconds the gateway is left alone before each reading.
    #[arg(long, default_value_t = 60.0)]
    settle_secs: f64,
    /// Instructors the dashboards sign in as, in turn.
    #[arg(long, default_value_t = 200)]
    instructors: usize,
    /// Largest RSS growth over the baseline that passes, in percent.
    #[arg(long, default_value_t = 10.0)]
    max_growth_percent: f64,
    /// Loopback source addresses the clients connect from (127.0.0.1…).
    #[arg(long, default_value_t = 4)]
    source_ips: u8,
    /// The gateway binary.
    #[arg(long, default_value = "target/release/cellgate")]
    gateway: PathBuf,
    #[command(flatten)]
    pg: Postgres,
}

const CLASSROOM: &str = "leak-room";

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(error) => {
            eprintln!("leak_bench: error: {error:#}");
            ExitCode::from(2)
        }
    }
}

async fn run(args: &Args) -> Result<bool> {
    check_binary(&args.gateway)?;
    ensure!(args.concurrency > 0, "--concurrency must be positive");
    let _fd_limit = raise_fd_limit();
    let mut db = BenchDatabase::create(&args.pg)?;
    let outcome = tokio::select! {
        outcome = bench(args, &db) => outcome,
        () = interrupted() => Err(anyhow!("interrupted")),
    };
    let dropped = db.drop_now();
    let passed = outcome?;
    dropped?;
    Ok(passed)
}

/// One reading of what the gateway holds.
#[derive(Debug, Clone, Copy)]
struct Reading {
    rss: u64,
    sessions: f64,
    connected: f64,
    present: usize,
    fds: usize,
}

async fn bench(args: &Args, db: &BenchDatabase<'_>) -> Result<bool> {
    let data_dir = tempfile::tempdir().context("cannot create a data directory")?;
    migrate(
        &args.gateway,
        &bench::gateway::GatewayEnv::new(db.url(), data_dir.path())?,
    )
    .await?;
    db.insert_instructors(args.instructors)?;
    db.insert_classroom(CLASSROOM, 200, args.instructors)?;
    let http = reqwest::Client::new();
    let mut pods = fanout::start_pods(
        &args.gateway,
        &db.url(),
        data_dir.path(),
        1,
        None,
        &CAPACITY_LIMITS,
        &http,
    )
    .await?;
    let pod = pods.remove(0);
    let outcome = measure(args, &pod, &http).await;
    fanout::stop_pods(vec![pod]).await;
    outcome
}

async fn measure(args: &Args, pod: &Pod, http: &reqwest::Client) -> Result<bool> {
    let minter = Minter::new(bench::gateway::JWT_SECRET)?;
    let stranger = Minter::new("a-secret-the-gateway-has-never-heard-of-0123")?;
    let cycler = Arc::new(Cycler {
        connector: Connector::new(pod.env.listen, pod.env.ws_url(), args.source_ips),
        addr: pod.env.listen.to_string(),
        tokens: (0..=args.instructors)
            .map(|i| minter.instructor(&instructor_email(i)))
            .collect::<Result<_>>()?,
        forged: stranger.instructor(&instructor_email(0))?,
        http: http.clone(),
        failures: AtomicUsize::new(0),
    });

    let warmup = args.warmup.unwrap_or(args.cycles);
    progress(&format!(
        "leak_bench: warm-up of {warmup} cycles, {} at a time; load average {}",
        args.concurrency,
        load_average()
    ));
    cycler
        .clone()
        .run("warm-up", warmup, args.concurrency, pod)
        .await?;
    let baseline = settle_and_read(args, pod, http, &cycler.tokens[0]).await?;

    let started = Instant::now();
    cycler
        .clone()
        .run("measured", args.cycles, args.concurrency, pod)
        .await?;
    let elapsed = started.elapsed();
    let end = settle_and_read(args, pod, http, &cycler.tokens[0]).await?;

    let growth = (end.rss as f64 - baseline.rss as f64) / baseline.rss as f64 * 100.0;
    let failures = cycler.failures.load(Ordering::Relaxed);
    let passed = end.sessions == 0.0
        && end.connected == 0.0
        && end.present == 0
        && growth <= args.max_growth_percent
        && end.fds <= baseline.fds + 2;
    print_report(
        args, warmup, &baseline, &end, growth, elapsed, failures, passed,
    );
    Ok(passed)
}

async fn settle_and_read(
    args: &Args,
    pod: &Pod,
    http: &reqwest::Client,
    token: &str,
) -> Result<Reading> {
    let settle = Duration::from_secs_f64(args.settle_secs);
    let until = Instant::now() + settle;
    while Instant::now() < until {
        let left = until.saturating_duration_since(Instant::now());
        progress(&format!("settling: {:.0} s left", left.as_secs_f64()));
        tokio::time::sleep(left.min(Duration::from_secs(5))).await;
    }
    read(pod, http, token).await
}

async fn read(pod: &Pod, http: &reqwest::Client, token: &str) -> Result<Reading> {
    let text = http.get(pod.env.metrics_url()).send().await?.text().await?;
    let snapshot: serde_json::Value = http
        .get(format!(
            "http://{}/api/v1/classrooms/{CLASSROOM}/snapshot",
            pod.env.listen
        ))
        .bearer_auth(token)
        .send()
        .await?
        .json()
        .await
        .context("the snapshot")?;
    let present = snapshot["instructors"].as_array().map_or(0, Vec::len);
    let fds = std::fs::read_dir(format!("/proc/{}/fd", pod.gateway.pid))?.count();
    Ok(Reading {
        rss: ProcStats::read(pod.gateway.pid)?.rss,
        sessions: metric(&text, "cellgate_sessions_sockets").unwrap_or(f64::NAN),
        connected: metric(&text, "cellgate_connected_sockets{namespace=\"/\"}").unwrap_or(f64::NAN),
        present,
        fds,
    })
}

/// What the cycles share.
struct Cycler {
    connector: Connector,
    addr: String,
    tokens: Vec<String>,
    forged: String,
    http: reqwest::Client,
    /// Cycles whose client side went wrong (the gateway answered something
    /// unexpected); they do not stop the run, and are reported.
    failures: AtomicUsize,
}

impl Cycler {
    async fn run(
        self: Arc<Self>,
        phase: &str,
        cycles: usize,
        concurrency: usize,
        pod: &Pod,
    ) -> Result<()> {
        let done = Arc::new(AtomicUsize::new(0));
        let started = Instant::now();
        let work = futures_util::stream::iter(0..cycles)
            .map(|i| {
                let (me, done) = (self.clone(), done.clone());
                async move {
                    if let Err(error) = me.cycle(i).await
                        && me.failures.fetch_add(1, Ordering::Relaxed) < 5
                    {
                        eprintln!("leak_bench: cycle {i}: {error:#}");
                    }
                    done.fetch_add(1, Ordering::Relaxed);
                }
            })
            .buffer_unordered(concurrency)
            .collect::<()>();
        tokio::pin!(work);
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                () = &mut work => break,
                _ = tick.tick() => {
                    let n = done.load(Ordering::Relaxed);
                    let rss = ProcStats::read(pod.gateway.pid).map_or(0, |s| s.rss);
                    progress(&format!(
                        "{phase}: {n}/{cycles} cycles, {:.0}/s, gateway RSS {:.1} MB",
                        n as f64 / started.elapsed().as_secs_f64().max(0.001),
                        rss as f64 / 1e6
                    ));
                }
            }
        }
        Ok(())
    }

    async fn cycle(&self, i: usize) -> Result<()> {
        let token = &self.tokens[i % self.tokens.len()];
        match i % 20 {
            0..=11 => self.watch(token).await,
            12 | 13 => self.leave_mid_join(token).await,
            14 | 15 => self.refused().await,
            16 | 17 => self.abandoned_handshake().await,
            18 => self.abandoned_polling().await.map(drop),
            _ => self.stalled_upgrade().await,
        }
    }

    async fn watch(&self, token: &str) -> Result<()> {
        let (mut ws, _, _) = client::handshake(&self.connector, token).await?;
        client::join_classroom(&mut ws, CLASSROOM).await?;
        client::close(ws).await;
        Ok(())
    }

    async fn leave_mid_join(&self, token: &str) -> Result<()> {
        let (mut ws, _, _) = client::handshake(&self.connector, token).await?;
        let join = json!(["join_classroom", { "classroom": CLASSROOM }]);
        ws.send(Message::text(format!("421{join}"))).await?;
        // Dropped, not closed: the TCP connection ends under the join.
        drop(ws);
        Ok(())
    }

    async fn refused(&self) -> Result<()> {
        match client::handshake(&self.connector, &self.forged).await {
            Err(error) if error.to_string().contains("invalid_token") => Ok(()),
            Err(error) => Err(error),
            Ok(_) => Err(anyhow!("a forged token was accepted")),
        }
    }

    async fn abandoned_handshake(&self) -> Result<()> {
        let mut ws = self.connector.connect().await?;
        let open = client::next_text(&mut ws).await?;
        ensure!(
            open.starts_with('0'),
            "expected an open packet, got {open:?}"
        );
        drop(ws);
        Ok(())
    }

    /// Opens a polling session and returns its sid.
    async fn abandoned_polling(&self) -> Result<String> {
        let url = format!("http://{}/socket.io/?EIO=4&transport=polling", self.addr);
        let body = self.http.get(url).send().await?.text().await?;
        let open: serde_json::Value = serde_json::from_str(
            body.strip_prefix('0')
                .ok_or_else(|| anyhow!("expected an open packet, got {body:?}"))?,
        )?;
        open["sid"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| anyhow!("no sid in {body:?}"))
    }

    async fn stalled_upgrade(&self) -> Result<()> {
        let sid = self.abandoned_polling().await?;
        let url = format!(
            "ws://{}/socket.io/?EIO=4&transport=websocket&sid={sid}",
            self.addr
        );
        let (mut ws, _) = tokio_tungstenite::connect_async(url).await?;
        ws.send(Message::text("2probe")).await?;
        let answer = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .map_err(|_| anyhow!("no 3probe"))?;
        ensure!(
            matches!(&answer, Some(Ok(Message::Text(t))) if t.as_str() == "3probe"),
            "expected 3probe, got {answer:?}"
        );
        // The upgrade is never completed (no "5"): dropped here.
        drop(ws);
        Ok(())
    }
}

#[allow(
    clippy::too_many_arguments,
    reason = "one table of everything measured"
)]
fn print_report(
    args: &Args,
    warmup: usize,
    baseline: &Reading,
    end: &Reading,
    growth: f64,
    elapsed: Duration,
    failures: usize,
    passed: bool,
) {
    let mb = |b: u64| format!("{:.1} MB", b as f64 / 1e6);
    println!();
    println!(
        "leak_bench: {} cycles in {:.1} s ({:.0}/s), {} at a time, after {} warm-up cycles; \
         load average {}",
        args.cycles,
        elapsed.as_secs_f64(),
        args.cycles as f64 / elapsed.as_secs_f64(),
        args.concurrency,
        warmup,
        load_average()
    );
    println!();
    println!("| reading | baseline | after | must be |");
    println!("|---|---|---|---|");
    println!(
        "| gateway RSS | {} | {} ({growth:+.1} %) | within {:.0} % |",
        mb(baseline.rss),
        mb(end.rss),
        args.max_growth_percent
    );
    println!(
        "| sessions (`cellgate_sessions_sockets`) | {} | {} | 0 |",
        baseline.sessions, end.sessions
    );
    println!(
        "| connected sockets (`cellgate_connected_sockets`) | {} | {} | 0 |",
        baseline.connected, end.connected
    );
    println!(
        "| instructors present in the classroom | {} | {} | 0 |",
        baseline.present, end.present
    );
    println!(
        "| open file descriptors | {} | {} | baseline |",
        baseline.fds, end.fds
    );
    println!();
    println!("client-side failures: {failures} (unexpected answers; see the first ones above)");
    println!("{}", if passed { "PASSED" } else { "FAILED" });
}
