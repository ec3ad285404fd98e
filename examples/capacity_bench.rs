//! Capacity of one gateway at scales a JavaScript load generator cannot
//! drive from one small machine: handshakes per second, the largest event
//! rate fanned out to 1,000 and 5,000 dashboards with p99 under 50 ms, and
//! memory per idle authenticated connection at 10,000 connections.
//!
//! ```text
//! cargo build --release --locked --bins --examples   # the gateway and the benchmarks
//! target/release/examples/capacity_bench                       # all three phases
//! target/release/examples/capacity_bench handshakes --sockets 2000,5000
//! target/release/examples/capacity_bench fanout --dashboards 1000,5000
//! target/release/examples/capacity_bench fanout --dashboards 1000 --pods 2 --p99-limit-ms 1000
//! target/release/examples/capacity_bench memory --connections 10000
//! target/release/examples/capacity_bench --help
//! ```
//!
//! Needs `psql` and a PostgreSQL at 127.0.0.1:5432 that lets `postgres` in
//! without a password (with a database `test` to run `CREATE DATABASE`
//! from); with `--pods 2`, a Redis 7 at 127.0.0.1:6379, shared: only this
//! run's keys are added, and removed at the end (`redis-cli --scan`,
//! `UNLINK`; never a flush).
//!
//! Set-up, common to every phase: a database `cellgate_bench_<pid>_<millis>`
//! with `cellgate migrate` applied and one instructor per connection the
//! largest phase needs (one `INSERT`); each measurement starts its own
//! `cellgate serve --profile production` (`RUST_LOG=warn`, free loopback
//! ports), waits for `/readyz` and stops it (SIGTERM) afterwards. The
//! database is dropped at the end, also after an error, Ctrl-C or SIGTERM.
//! What is measured is capacity, not the limits: the gateways run with
//! the per-address handshake budget and the per-token ingest budget off
//! and the socket limits (20 per instructor, 10,000 per pod) raised to a
//! million (`CELLGATE_HANDSHAKES_PER_MINUTE=0`, `CELLGATE_INGEST_PER_MINUTE=0`,
//! `CELLGATE_MAX_SOCKETS_PER_INSTRUCTOR`, `CELLGATE_MAX_SOCKETS`).
//!
//! - **handshakes**: `--sockets` WebSocket Socket.IO handshakes with valid
//!   JWTs, `--in-flight` at a time, every socket kept open until the last is
//!   accepted; *cold* (a different instructor each, so every handshake
//!   queries PostgreSQL) and *warm* (one instructor, cached). Rate =
//!   sockets / wall time; latency from before the TCP connect to
//!   `connection_accepted`.
//! - **fanout**: `--dashboards` dashboards (one instructor each, or all
//!   one with `--one-instructor`) join one 200-seat classroom and the
//!   `instructor_status` announcements of their joins are let through; students post `cell_executed` (one per POST) at a
//!   rate that doubles each step of `--step-secs` until a step fails (p99 ≥
//!   `--p99-limit-ms`, a delivery lost, a POST not answered 202, or the
//!   gateway unable to keep up with the schedule), then is bisected
//!   `--refine` times between the last passing and the first failing rate.
//!   A step that failed on latency alone is run once more (`--retries`)
//!   before it counts, so that one slow stretch of a shared machine does
//!   not end the search. The largest passing rate is the figure.
//! - **memory**: `--connections` idle authenticated connections (no
//!   classroom joined), RSS (`VmRSS` of `/proc/<pid>/status`) read at each
//!   `--checkpoints` count after `--settle-secs`; per connection = (RSS −
//!   RSS before the first connection) / connections. Each connection's
//!   instructor is distinct, so the directory cache's entry is counted too
//!   (`--one-instructor`: all the same instructor, one cache entry).
//!
//! The process raises its own open-file limit (soft to hard, `setrlimit`)
//! at start; the gateways it starts inherit it. 10,000 connections need
//! 10,000 descriptors on each side. The dashboards connect from
//! `--source-ips` loopback addresses (`127.0.0.1`, `127.0.0.2`, …) in turn,
//! each with its own ephemeral port range, so neither the ports nor the
//! TIME_WAIT left by an earlier phase run out.
//!
//! The load generator (this process) runs on the same cores as the
//! gateway: every table gives the gateway's CPU (from `/proc/<pid>/stat`)
//! and this process's separately.

#[path = "bench/mod.rs"]
#[allow(dead_code, reason = "each benchmark uses part of the shared module")]
mod bench;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, ensure};
use clap::{Parser, ValueEnum};
use futures_util::StreamExt;

use bench::client::{self, Connector, Minter, Ws, check_accepted};
use bench::fanout::{
    self, Audience, Join, Pod, Poster, StepPlan, StepResult, Tally, connect_audience, load_average,
    progress,
};
use bench::gateway::{
    GatewayEnv, JWT_SECRET, ProcStats, check_binary, clean_redis, interrupted, migrate,
    raise_fd_limit,
};
use bench::pg::{BenchDatabase, Postgres, instructor_email};
use bench::stats::{cell, ms, percentile};

/// Handshakes/s, fan-out capacity and memory per connection of one gateway.
#[derive(Debug, Parser)]
#[command(after_help = "Build first: cargo build --release --locked --bins --examples")]
struct Args {
    /// Phases to run, in this order; all three when none is named.
    #[arg(value_enum)]
    phases: Vec<Phase>,

    /// handshakes: sockets per measurement (a list runs each size).
    #[arg(long, value_delimiter = ',', default_value = "2000")]
    sockets: Vec<usize>,
    /// handshakes: handshakes in flight at once.
    #[arg(long, default_value_t = 100)]
    in_flight: usize,

    /// fanout: dashboards in the classroom (a list runs each size).
    #[arg(long, value_delimiter = ',', default_value = "1000,5000")]
    dashboards: Vec<usize>,
    /// fanout: pods; with 2, cluster mode over `--redis-url`, dashboards
    /// split between the pods and POSTs alternating between them.
    #[arg(long, default_value_t = 1)]
    pods: usize,
    /// fanout: a step passes while its p99 is below this.
    #[arg(long, default_value_t = 50.0)]
    p99_limit_ms: f64,
    /// fanout: first rate, events/s (default: 20,000 deliveries/s worth).
    #[arg(long)]
    start_rate: Option<f64>,
    /// fanout: stop raising the rate here.
    #[arg(long, default_value_t = 20_000.0)]
    max_rate: f64,
    /// fanout: seconds of posting per step.
    #[arg(long, default_value_t = 10.0)]
    step_secs: f64,
    /// fanout: times a step that failed on latency alone is run again
    /// before it counts as failed.
    #[arg(long, default_value_t = 1)]
    retries: usize,
    /// fanout: bisection steps after the first failure.
    #[arg(long, default_value_t = 3)]
    refine: usize,
    /// fanout: seats (posting students) of the classroom.
    #[arg(long, default_value_t = 200)]
    seats: u32,
    /// fanout: most POSTs unanswered at once before a step counts as not
    /// keeping up.
    #[arg(long, default_value_t = 256)]
    max_in_flight: usize,

    /// memory: idle authenticated connections at the end.
    #[arg(long, default_value_t = 10_000)]
    connections: usize,
    /// memory: counts at which RSS is read on the way.
    #[arg(long, value_delimiter = ',', default_value = "1000,5000")]
    checkpoints: Vec<usize>,
    /// memory, fanout: every connection is the same instructor (one
    /// directory cache entry, one presence announcement) instead of a
    /// different one each.
    #[arg(long)]
    one_instructor: bool,
    /// memory: seconds to wait before reading RSS.
    #[arg(long, default_value_t = 3.0)]
    settle_secs: f64,

    /// Loopback source addresses the dashboards connect from (127.0.0.1…).
    #[arg(long, default_value_t = 8)]
    source_ips: u8,
    /// Redis for `--pods 2` (shared; never flushed).
    #[arg(long, default_value = "redis://127.0.0.1:6379")]
    redis_url: String,
    /// The gateway binary to benchmark.
    #[arg(long, default_value = "target/release/cellgate")]
    gateway: PathBuf,
    #[command(flatten)]
    pg: Postgres,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Phase {
    /// Handshakes per second.
    Handshakes,
    /// Largest event rate fanned out with p99 under the limit.
    Fanout,
    /// Memory per idle authenticated connection.
    Memory,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("capacity_bench: error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// Everything printed at the end.
#[derive(Default)]
struct Report {
    handshakes: Vec<HandshakeRun>,
    fanout: Vec<FanoutRun>,
    memory: Option<MemoryRun>,
}

async fn run(args: &Args) -> Result<()> {
    check_binary(&args.gateway)?;
    ensure!(args.pods == 1 || args.pods == 2, "--pods is 1 or 2");
    ensure!(
        args.in_flight > 0 && args.step_secs > 0.0,
        "--in-flight and --step-secs must be positive"
    );
    let fd_limit = raise_fd_limit();
    let phases = if args.phases.is_empty() {
        vec![Phase::Handshakes, Phase::Fanout, Phase::Memory]
    } else {
        args.phases.clone()
    };
    let mut needed = 1;
    for phase in &phases {
        needed = needed.max(match phase {
            Phase::Handshakes => args.sockets.iter().copied().max().unwrap_or(0),
            Phase::Fanout => args.dashboards.iter().copied().max().unwrap_or(0),
            Phase::Memory => args.connections + 100,
        });
    }
    // Each connection: one descriptor here, one in the gateway, and a few spare.
    ensure!(
        fd_limit as usize > needed + 200,
        "{needed} connections need more open files than the limit of {fd_limit} \
         (raise the hard limit: ulimit -Hn)"
    );
    progress(&format!(
        "capacity_bench: phases {phases:?}; open-file limit {fd_limit} (raised to the hard limit); \
         {} CPUs; load average {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        load_average()
    ));

    let mut db = BenchDatabase::create(&args.pg)?;
    let mut report = Report::default();
    let mut redis_patterns = Vec::new();
    let outcome = tokio::select! {
        outcome = bench(args, &db, &phases, needed, &mut report, &mut redis_patterns) => outcome,
        () = interrupted() => Err(anyhow!("interrupted")),
    };
    if !redis_patterns.is_empty() {
        clean_redis(&args.redis_url, &redis_patterns);
    }
    let dropped = db.drop_now();
    print_report(args, &report);
    outcome?;
    dropped?;
    Ok(())
}

async fn bench(
    args: &Args,
    db: &BenchDatabase<'_>,
    phases: &[Phase],
    needed: usize,
    report: &mut Report,
    redis_patterns: &mut Vec<String>,
) -> Result<()> {
    let data_dir = tempfile::tempdir().context("cannot create a data directory")?;
    migrate(&args.gateway, &GatewayEnv::new(db.url(), data_dir.path())?).await?;
    db.insert_instructors(needed)?;
    progress(&format!(
        "database {} ready: {} instructors",
        db.name,
        needed + 1
    ));
    let bench = Bench {
        args,
        db,
        data_dir: data_dir.path(),
        http: reqwest::Client::new(),
        minter: Minter::new(JWT_SECRET)?,
    };
    for phase in phases {
        match phase {
            Phase::Handshakes => {
                for &sockets in &args.sockets {
                    for warm in [false, true] {
                        let run = bench.handshakes(sockets, warm).await?;
                        report.handshakes.push(run);
                    }
                }
            }
            Phase::Fanout => {
                if args.pods == 2 {
                    redis_patterns.push(format!("cellgate:status:ins_{}_*", db.tag));
                }
                for &dashboards in &args.dashboards {
                    let classroom = format!("c{}-{dashboards}", db.tag);
                    if args.pods == 2 {
                        for kind in ["seat", "presence", "event"] {
                            redis_patterns.push(format!("cellgate:{kind}:{classroom}*"));
                        }
                    }
                    let run = bench.fanout(dashboards, &classroom).await?;
                    report.fanout.push(run);
                }
            }
            Phase::Memory => report.memory = Some(bench.memory().await?),
        }
    }
    Ok(())
}

/// What every phase needs.
struct Bench<'a> {
    args: &'a Args,
    db: &'a BenchDatabase<'a>,
    data_dir: &'a Path,
    http: reqwest::Client,
    minter: Minter,
}

impl Bench<'_> {
    async fn start(&self, count: usize) -> Result<Vec<Pod>> {
        let redis = (count > 1).then_some(self.args.redis_url.as_str());
        let url = self.db.url();
        fanout::start_pods(
            &self.args.gateway,
            &url,
            self.data_dir,
            count,
            redis,
            &fanout::CAPACITY_LIMITS,
            &self.http,
        )
        .await
    }

    fn connectors(&self, pods: &[Pod]) -> Vec<Arc<Connector>> {
        pods.iter()
            .map(|p| {
                let c = Connector::new(p.env.listen, p.env.ws_url(), self.args.source_ips);
                Arc::new(c)
            })
            .collect()
    }
}

// ------------------------------------------------------------ handshakes --

struct HandshakeRun {
    sockets: usize,
    in_flight: usize,
    warm: bool,
    wall: Duration,
    latencies: Vec<Duration>,
    gateway_cpu: f64,
    own_cpu: f64,
    load: String,
}

impl Bench<'_> {
    async fn handshakes(&self, sockets: usize, warm: bool) -> Result<HandshakeRun> {
        let name = format!(
            "handshakes {sockets} ({})",
            if warm { "warm" } else { "cold" }
        );
        let pods = self.start(1).await?;
        let outcome = self.handshakes_on(&pods, sockets, warm, &name).await;
        if outcome.is_err() {
            eprintln!(
                "gateway log (last lines):\n{}",
                pods[0].gateway.log_tail(20)
            );
        }
        fanout::stop_pods(pods).await;
        outcome
    }

    async fn handshakes_on(
        &self,
        pods: &[Pod],
        sockets: usize,
        warm: bool,
        name: &str,
    ) -> Result<HandshakeRun> {
        let connector = self.connectors(pods).remove(0);
        // Instructor 0 for every warm handshake (primed once); 1.. when cold.
        let tokens = if warm {
            let token = self.minter.instructor(&instructor_email(0))?;
            let (ws, _, _) = client::handshake(&connector, &token).await?;
            client::close(ws).await;
            vec![(0, token); sockets]
        } else {
            (1..=sockets)
                .map(|i| Ok((i, self.minter.instructor(&instructor_email(i))?)))
                .collect::<Result<Vec<_>>>()?
        };
        let load = load_average();
        let before = pods[0].gateway.stats()?;
        let own_before = ProcStats::own()?;
        let started = Instant::now();
        let mut open: Vec<Ws> = Vec::with_capacity(sockets);
        let mut latencies = Vec::with_capacity(sockets);
        let mut attempts = futures_util::stream::iter(tokens)
            .map(|(i, token)| {
                let connector = connector.clone();
                async move {
                    let (ws, took, accepted) = client::handshake(&connector, &token).await?;
                    check_accepted(&accepted, &instructor_email(i))?;
                    Ok::<_, anyhow::Error>((ws, took))
                }
            })
            .buffer_unordered(self.args.in_flight);
        let mut last = Instant::now();
        while let Some(done) = attempts.next().await {
            let (ws, took) =
                done.with_context(|| format!("{name}: handshake {}", open.len() + 1))?;
            open.push(ws);
            latencies.push(took);
            if last.elapsed() >= Duration::from_secs(1) {
                last = Instant::now();
                let mut sorted = latencies.clone();
                sorted.sort();
                progress(&format!(
                    "{name}: {}/{sockets} open, {:.0}/s, p99 so far {}",
                    open.len(),
                    open.len() as f64 / started.elapsed().as_secs_f64(),
                    ms(percentile(&sorted, 0.99))
                ));
            }
        }
        let wall = started.elapsed();
        let after = pods[0].gateway.stats()?;
        let own_after = ProcStats::own()?;
        progress(&format!(
            "{name}: {sockets} open in {:.2} s ({:.0}/s)",
            wall.as_secs_f64(),
            sockets as f64 / wall.as_secs_f64()
        ));
        drop(open);
        latencies.sort();
        Ok(HandshakeRun {
            sockets,
            in_flight: self.args.in_flight,
            warm,
            wall,
            latencies,
            gateway_cpu: after.cpu_secs - before.cpu_secs,
            own_cpu: own_after.cpu_secs - own_before.cpu_secs,
            load,
        })
    }
}

// ---------------------------------------------------------------- fanout --

struct FanoutRun {
    dashboards: usize,
    pods: usize,
    steps: Vec<(StepResult, Option<String>)>,
    best: Option<StepResult>,
    stopped: String,
    join_secs: f64,
    settle_secs: f64,
    join_retries: u64,
    load_before: String,
    load_after: String,
}

impl Bench<'_> {
    async fn fanout(&self, dashboards: usize, classroom: &str) -> Result<FanoutRun> {
        let args = self.args;
        self.db
            .insert_classroom(classroom, args.seats, dashboards)?;
        let load_before = load_average();
        let pods = self.start(args.pods).await?;
        let outcome = self.fanout_on(&pods, dashboards, classroom).await;
        if outcome.is_err() {
            for pod in &pods {
                eprintln!(
                    "{} log (last lines):\n{}",
                    pod.node,
                    pod.gateway.log_tail(20)
                );
            }
        }
        fanout::stop_pods(pods).await;
        let mut run = outcome?;
        run.load_before = load_before;
        run.load_after = load_average();
        Ok(run)
    }

    async fn fanout_on(
        &self,
        pods: &[Pod],
        dashboards: usize,
        classroom: &str,
    ) -> Result<FanoutRun> {
        let args = self.args;
        let name = format!("fanout {dashboards}");
        let tally = Arc::new(Tally::default());
        let join = Join {
            classroom: Some(classroom),
            first: 0,
            count: dashboards,
            one_instructor: args.one_instructor,
            in_flight: args.in_flight,
        };
        let audience =
            connect_audience(&self.connectors(pods), &self.minter, &join, &tally, &name).await?;
        let urls = pods.iter().map(|p| p.env.events_url()).collect();
        let poster = Poster::new(
            &self.minter,
            urls,
            classroom,
            args.seats,
            args.max_in_flight,
        )?;
        let mut run = FanoutRun {
            dashboards,
            pods: pods.len(),
            steps: Vec::new(),
            best: None,
            stopped: String::new(),
            join_secs: audience.join_secs,
            settle_secs: audience.settle_secs,
            join_retries: audience.join_retries,
            load_before: String::new(),
            load_after: String::new(),
        };
        let outcome = self
            .search(&poster, &audience, &tally, pods, &name, &mut run)
            .await;
        audience.close().await;
        outcome?;
        Ok(run)
    }

    /// Doubles the rate until a step fails, then bisects.
    async fn search(
        &self,
        poster: &Poster,
        audience: &Audience,
        tally: &Arc<Tally>,
        pods: &[Pod],
        name: &str,
        run: &mut FanoutRun,
    ) -> Result<()> {
        let args = self.args;
        let mut rate = args
            .start_rate
            .unwrap_or((20_000.0 / audience.size as f64).max(1.0));
        let mut failed_at: Option<f64> = None;
        let mut refined = 0;
        let mut retried = 0;
        for step in 0..fanout::MAX_STEPS {
            let plan = StepPlan {
                step,
                rate,
                secs: args.step_secs,
                label: format!("{name} @ {rate:.1} ev/s"),
            };
            let result = poster.run_step(&plan, audience, tally, pods).await?;
            let (verdict, slow_only) = match self.verdict(&result, &plan) {
                Some((why, slow_only)) => (Some(why), slow_only),
                None => (None, false),
            };
            // One slow stretch (another tenant's build) should not end the
            // search: a step that failed on latency alone is run again.
            let again = slow_only && retried < args.retries;
            let verdict = match verdict {
                Some(why) if again => Some(format!("{why}; run again")),
                other => other,
            };
            progress(&format!(
                "{name} @ {rate:.1} ev/s: {} | p50 {} p99 {} ms | delivered {}/{} | gateway {:.0}% + generator {:.0}% CPU",
                verdict.as_deref().unwrap_or("pass"),
                cell(result.p50),
                cell(result.p99),
                result.received,
                result.expected,
                result.cpu_percent(),
                result.own_percent(),
            ));
            let passed = verdict.is_none();
            let dropped = result.dropped;
            run.steps.push((result.clone(), verdict));
            if passed {
                if run.best.as_ref().is_none_or(|b| b.rate < rate) {
                    run.best = Some(result);
                }
            } else if !again {
                failed_at = Some(failed_at.map_or(rate, |f| f.min(rate)));
            }
            if dropped > 0 {
                run.stopped = format!("{dropped} dashboards disconnected");
                return Ok(());
            }
            if again {
                retried += 1;
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
            retried = 0;
            let best = run.best.as_ref().map(|b| b.rate);
            rate = match (best, failed_at) {
                (_, None) if rate * 2.0 > args.max_rate => {
                    run.stopped = format!("reached --max-rate {}", args.max_rate);
                    return Ok(());
                }
                (_, None) => rate * 2.0,
                (None, Some(fail)) if refined < args.refine => {
                    refined += 1;
                    fail / 2.0
                }
                (Some(pass), Some(fail)) if refined < args.refine => {
                    refined += 1;
                    (pass * fail).sqrt()
                }
                _ => {
                    run.stopped = "bisection done".into();
                    return Ok(());
                }
            };
            // Let a failed step's backlog go before the next.
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        run.stopped = "out of steps".into();
        Ok(())
    }

    /// `None` when the step passes, else why not and whether latency alone
    /// failed it.
    fn verdict(&self, r: &StepResult, plan: &StepPlan) -> Option<(String, bool)> {
        let limit = self.args.p99_limit_ms;
        if r.rejected > 0 {
            let first = r.first_error.as_deref().unwrap_or("?");
            return Some((
                format!("{} POSTs not accepted ({first})", r.rejected),
                false,
            ));
        }
        if r.lost() > 0 {
            let why = format!(
                "{} deliveries lost ({} cluster messages dropped)",
                r.lost(),
                r.cluster_dropped
            );
            return Some((why, false));
        }
        if r.behind > 0 || r.post_secs > plan.secs * 1.05 + 0.2 {
            let why = format!(
                "posting fell behind ({:.1} s for {} s)",
                r.post_secs, plan.secs
            );
            return Some((why, false));
        }
        match r.p99 {
            Some(p99) if p99 >= limit => Some((format!("p99 {p99:.1} ms ≥ {limit} ms"), true)),
            None => Some(("nothing delivered".into(), false)),
            _ => None,
        }
    }
}

// ---------------------------------------------------------------- memory --

struct MemoryRun {
    baseline: ProcStats,
    own_baseline: ProcStats,
    points: Vec<MemoryPoint>,
    load: String,
}

struct MemoryPoint {
    connections: usize,
    gateway: ProcStats,
    own: ProcStats,
    seconds: f64,
}

impl Bench<'_> {
    async fn memory(&self) -> Result<MemoryRun> {
        let pods = self.start(1).await?;
        let outcome = self.memory_on(&pods).await;
        if outcome.is_err() {
            eprintln!(
                "gateway log (last lines):\n{}",
                pods[0].gateway.log_tail(20)
            );
        }
        fanout::stop_pods(pods).await;
        outcome
    }

    async fn memory_on(&self, pods: &[Pod]) -> Result<MemoryRun> {
        let args = self.args;
        let connectors = self.connectors(pods);
        let tally = Arc::new(Tally::default());
        let settle = Duration::from_secs_f64(args.settle_secs);
        // Warm the code paths and the allocator with connections that go
        // away again: the baseline is a gateway that has served before.
        let scratch = Arc::new(Tally::default());
        let warm_up = Join {
            classroom: None,
            first: 0,
            count: 100,
            one_instructor: args.one_instructor,
            in_flight: 100,
        };
        let warm = connect_audience(
            &connectors,
            &self.minter,
            &warm_up,
            &scratch,
            "memory warm-up",
        )
        .await?;
        warm.close().await;
        tokio::time::sleep(settle).await;
        let baseline = pods[0].gateway.stats()?;
        let own_baseline = ProcStats::own()?;
        let load = load_average();

        let mut targets: Vec<usize> = args
            .checkpoints
            .iter()
            .copied()
            .filter(|&c| c > 0 && c < args.connections)
            .collect();
        targets.push(args.connections);
        targets.sort_unstable();
        targets.dedup();

        let mut held = Vec::new();
        let mut points = Vec::new();
        let mut connected = 0;
        let started = Instant::now();
        // Instructors 100.. so that every connection is a fresh lookup
        // (unless --one-instructor).
        for target in targets {
            let phase = format!("memory → {target}");
            let join = Join {
                classroom: None,
                first: if args.one_instructor {
                    0
                } else {
                    100 + connected
                },
                count: target - connected,
                one_instructor: args.one_instructor,
                in_flight: args.in_flight,
            };
            let batch = connect_audience(&connectors, &self.minter, &join, &tally, &phase).await?;
            connected = target;
            held.push(batch);
            tokio::time::sleep(settle).await;
            let gateway = pods[0].gateway.stats()?;
            let own = ProcStats::own()?;
            let dropped = tally.dropped.load(std::sync::atomic::Ordering::Relaxed);
            ensure!(dropped == 0, "{dropped} connections closed while idle");
            let per = (gateway.rss as f64 - baseline.rss as f64) / connected as f64;
            progress(&format!(
                "memory: {connected} idle connections, gateway RSS {:.1} MB (+{:.1} KB each)",
                gateway.rss as f64 / 1e6,
                per / 1024.0
            ));
            points.push(MemoryPoint {
                connections: connected,
                gateway,
                own,
                seconds: started.elapsed().as_secs_f64(),
            });
        }
        for batch in held {
            batch.close().await;
        }
        Ok(MemoryRun {
            baseline,
            own_baseline,
            points,
            load,
        })
    }
}

// ---------------------------------------------------------------- report --

fn print_report(args: &Args, report: &Report) {
    println!();
    println!(
        "capacity_bench: gateway {}, {} CPUs, source addresses 127.0.0.1-{}",
        args.gateway.display(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        args.source_ips
    );
    if !report.handshakes.is_empty() {
        println!();
        println!(
            "Handshakes with valid JWTs, every socket kept open (latency: TCP connect to connection_accepted)"
        );
        println!(
            "{:>7} {:>9} {:<5} {:>12} {:>9} {:>9} {:>9} {:>9} {:>12} {:>9}  load avg",
            "sockets",
            "in flight",
            "cache",
            "handshakes/s",
            "p50 ms",
            "p95 ms",
            "p99 ms",
            "max ms",
            "gw CPU/hs",
            "gen CPU"
        );
        for r in &report.handshakes {
            let l = &r.latencies;
            let at = |p: f64| format!("{:.2}", percentile(l, p).as_secs_f64() * 1000.0);
            println!(
                "{:>7} {:>9} {:<5} {:>12.0} {:>9} {:>9} {:>9} {:>9} {:>9.0} µs {:>8.0}%  {}",
                r.sockets,
                r.in_flight,
                if r.warm { "warm" } else { "cold" },
                r.sockets as f64 / r.wall.as_secs_f64(),
                at(0.50),
                at(0.95),
                at(0.99),
                at(1.0),
                r.gateway_cpu * 1e6 / r.sockets as f64,
                r.own_cpu / r.wall.as_secs_f64() * 100.0,
                r.load
            );
        }
        println!(
            "gw CPU/hs: gateway CPU per handshake; gen CPU: this load generator, % of one core over the phase"
        );
    }
    for f in &report.fanout {
        println!();
        println!(
            "Fan-out: {} dashboards ({}) on {} pod(s), {} seats posting one cell_executed per POST; pass = p99 < {} ms, nothing lost, every POST 202, on schedule",
            f.dashboards,
            if args.one_instructor {
                "all one instructor"
            } else {
                "one instructor each"
            },
            f.pods,
            args.seats,
            args.p99_limit_ms
        );
        println!(
            "{:>9} {:>12} {:>6} {:>7} {:>7} {:>7} {:>8} {:>8} {:>7} {:>10} {:>8}  verdict",
            "events/s",
            "deliveries/s",
            "lost",
            "p50 ms",
            "p95 ms",
            "p99 ms",
            "max ms",
            "gw CPU",
            "kernel",
            "µs/deliv.",
            "gen CPU"
        );
        for (r, verdict) in &f.steps {
            println!(
                "{:>9.1} {:>12.0} {:>6} {:>7} {:>7} {:>7} {:>8.1} {:>7.0}% {:>6.0}% {:>10} {:>7.0}%  {}",
                r.rate,
                r.received as f64 / r.wall,
                r.lost(),
                cell(r.p50),
                cell(r.p95),
                cell(r.p99),
                r.max,
                r.cpu_percent(),
                r.sys_share(),
                r.cpu_us_per_delivery()
                    .map_or("-".into(), |v| format!("{v:.2}")),
                r.own_percent(),
                verdict.as_deref().unwrap_or("pass")
            );
        }
        println!(
            "   {} dashboards connected and joined in {:.1} s ({} joins answered unavailable and retried), then {:.1} s until the instructor_status announcements stopped",
            f.dashboards, f.join_secs, f.join_retries, f.settle_secs
        );
        match &f.best {
            Some(b) => println!(
                "=> largest passing rate: {:.1} events/s ({:.0} deliveries/s, p99 {} ms, gateway {:.2} µs CPU per delivery); {}; load average {} → {}",
                b.rate,
                b.received as f64 / b.wall,
                cell(b.p99),
                b.cpu_us_per_delivery().unwrap_or(0.0),
                f.stopped,
                f.load_before,
                f.load_after
            ),
            None => println!(
                "=> no rate passed; {}; load average {} → {}",
                f.stopped, f.load_before, f.load_after
            ),
        }
    }
    if let Some(m) = &report.memory {
        println!();
        println!(
            "Memory per idle authenticated connection, {} (baseline RSS {:.1} MB after 100 connections came and went; load average {})",
            if args.one_instructor {
                "all one instructor"
            } else {
                "one instructor each"
            },
            m.baseline.rss as f64 / 1e6,
            m.load
        );
        println!(
            "{:>11} {:>12} {:>12} {:>14} {:>16} {:>16}",
            "connections",
            "gateway RSS",
            "delta",
            "per connection",
            "generator RSS",
            "gen. per conn."
        );
        for p in &m.points {
            let delta = p.gateway.rss as f64 - m.baseline.rss as f64;
            let own = p.own.rss as f64 - m.own_baseline.rss as f64;
            println!(
                "{:>11} {:>9.1} MB {:>9.1} MB {:>11.1} KB {:>13.1} MB {:>13.1} KB   (t={:.0}s)",
                p.connections,
                p.gateway.rss as f64 / 1e6,
                delta / 1e6,
                delta / p.connections as f64 / 1024.0,
                p.own.rss as f64 / 1e6,
                own / p.connections as f64 / 1024.0,
                p.seconds
            );
        }
        println!("KB = 1,024 bytes; RSS = VmRSS of /proc/<pid>/status");
    }
}
