//! Delivery latency of a 200-seat classroom on one pod and on two pods.
//!
//! ```text
//! cargo build --release --locked --bins --examples   # the gateway and the benchmarks
//! target/release/examples/delivery_bench                   # one pod, then two pods
//! target/release/examples/delivery_bench --pods two --secs 60 --repeat 2
//! target/release/examples/delivery_bench --help
//! ```
//!
//! Needs `psql` and a PostgreSQL at 127.0.0.1:5432 that lets `postgres` in
//! without a password (with a database `test` to run `CREATE DATABASE`
//! from), and for two pods a Redis 7 at 127.0.0.1:6379 (`--redis-url`),
//! which it shares with whoever else uses it: it only adds keys under this
//! run's classroom and instructor ids, and removes them at the end with
//! `redis-cli --scan` / `UNLINK` (it never flushes).
//!
//! What it does:
//! 1. creates the database `cellgate_bench_<pid>_<millis>`, runs
//!    `cellgate migrate`, inserts the instructors and, per run, a classroom
//!    of `--seats` seats they all staff (SQL through `psql`);
//! 2. **one pod**: one `cellgate serve --profile production` without Redis;
//!    **two pods**: two of them with `CELLGATE_REDIS_URL` and their own
//!    `CELLGATE_NODE_ID`, on the same database. Each on free loopback ports,
//!    `RUST_LOG=warn`, default settings except the per-address handshake
//!    budget, which is off (every dashboard comes from 127.0.0.1); it waits
//!    for `/readyz`;
//! 3. connects `--dashboards` dashboards (WebSocket Socket.IO, one
//!    instructor each), which join the classroom: on one pod to that pod,
//!    on two pods all to the second pod;
//! 4. posts `cell_executed` events, one per `POST /api/v1/events`, from
//!    every seat in turn with that seat's student token, at `--rate` events
//!    per second on an open-loop schedule, to the first pod: on two pods
//!    every delivery crosses Redis. A warm-up of `--warmup-secs` is run and
//!    left out of the figures, then `--secs` are measured;
//! 5. prints, per run: deliveries (a `cell_executed` reaching a dashboard),
//!    lost deliveries (accepted with 202 but never received), latency from
//!    just before the POST to the frame's arrival (p50/p95/p99/max), the
//!    gateways' CPU per 1,000 deliveries and their peak RSS (`/proc/<pid>`),
//!    and this process's own CPU (the load generator shares the machine);
//! 6. stops the gateways (SIGTERM) and drops the database, also when a step
//!    fails, on Ctrl-C or on SIGTERM.

#[path = "bench/mod.rs"]
#[allow(dead_code, reason = "each benchmark uses part of the shared module")]
mod bench;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result, anyhow, ensure};
use clap::{Parser, ValueEnum};

use bench::client::{Connector, Minter};
use bench::fanout::{
    self, Join, Pod, Poster, StepPlan, StepResult, Tally, connect_audience, load_average, progress,
};
use bench::gateway::{GatewayEnv, JWT_SECRET, check_binary, clean_redis, interrupted, migrate};
use bench::pg::{BenchDatabase, Postgres};
use bench::stats::cell;

/// End-to-end delivery latency (POST to dashboard) of a live classroom, one
/// pod versus two pods in cluster mode; lost events, gateway CPU and RSS.
#[derive(Debug, Parser)]
#[command(after_help = "Build first: cargo build --release --locked --bins --examples")]
struct Args {
    /// Which set-up to measure.
    #[arg(long, value_enum, default_value_t = Pods::Both)]
    pods: Pods,
    /// Seats (students posting) in the classroom.
    #[arg(long, default_value_t = 200)]
    seats: u32,
    /// Dashboards watching the classroom.
    #[arg(long, default_value_t = 20)]
    dashboards: usize,
    /// Events posted per second.
    #[arg(long, default_value_t = 200.0)]
    rate: f64,
    /// Seconds measured per run.
    #[arg(long, default_value_t = 30.0)]
    secs: f64,
    /// Seconds posted before the measurement, left out of the figures.
    #[arg(long, default_value_t = 5.0)]
    warmup_secs: f64,
    /// Runs per set-up; with `both`, set-ups alternate (one, two, one, two…).
    #[arg(long, default_value_t = 1)]
    repeat: usize,
    /// Most POSTs unanswered at once.
    #[arg(long, default_value_t = 256)]
    max_in_flight: usize,
    /// Redis for cluster mode (shared; never flushed).
    #[arg(long, default_value = "redis://127.0.0.1:6379")]
    redis_url: String,
    /// The gateway binary to benchmark.
    #[arg(long, default_value = "target/release/cellgate")]
    gateway: PathBuf,
    #[command(flatten)]
    pg: Postgres,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Pods {
    /// One pod, no Redis.
    One,
    /// Two pods and Redis: POSTed to one, received on the other.
    Two,
    /// One, then two.
    Both,
}

/// One run's figures.
struct Run {
    label: String,
    result: StepResult,
    peak_rss: Vec<u64>,
    load_before: String,
    load_after: String,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("delivery_bench: error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: &Args) -> Result<()> {
    ensure!(
        args.rate > 0.0 && args.secs > 0.0,
        "--rate and --secs must be positive"
    );
    ensure!(
        args.dashboards > 0 && args.seats > 0,
        "--dashboards and --seats must be positive"
    );
    check_binary(&args.gateway)?;
    let mut db = BenchDatabase::create(&args.pg)?;
    let mut redis_patterns = Vec::new();
    let outcome = tokio::select! {
        outcome = bench(args, &db, &mut redis_patterns) => outcome,
        () = interrupted() => Err(anyhow!("interrupted")),
    };
    if !redis_patterns.is_empty() {
        clean_redis(&args.redis_url, &redis_patterns);
    }
    let dropped = db.drop_now();
    let runs = outcome?;
    dropped?;
    print_report(args, &runs);
    Ok(())
}

async fn bench(
    args: &Args,
    db: &BenchDatabase<'_>,
    redis_patterns: &mut Vec<String>,
) -> Result<Vec<Run>> {
    let data_dir = tempfile::tempdir().context("cannot create a data directory")?;
    migrate(&args.gateway, &GatewayEnv::new(db.url(), data_dir.path())?).await?;
    db.insert_instructors(args.dashboards)?;
    // Instructor status keys are named by instructor id: all are this run's.
    redis_patterns.push(format!("cellgate:status:ins_{}_*", db.tag));
    let modes: Vec<Pods> = match args.pods {
        Pods::Both => vec![Pods::One, Pods::Two],
        one_or_two => vec![one_or_two],
    };
    let mut runs = Vec::new();
    for round in 0..args.repeat {
        for &mode in &modes {
            let classroom = format!(
                "d{}-{}-{round}",
                db.tag,
                if mode == Pods::One { "one" } else { "two" }
            );
            db.insert_classroom(&classroom, args.seats, args.dashboards)?;
            if mode == Pods::Two {
                for kind in ["seat", "presence", "event"] {
                    redis_patterns.push(format!("cellgate:{kind}:{classroom}*"));
                }
            }
            runs.push(one_run(args, db, data_dir.path(), mode, &classroom, round).await?);
        }
    }
    Ok(runs)
}

async fn one_run(
    args: &Args,
    db: &BenchDatabase<'_>,
    data_dir: &Path,
    mode: Pods,
    classroom: &str,
    round: usize,
) -> Result<Run> {
    let label = match mode {
        Pods::One => format!("one pod #{}", round + 1),
        _ => format!("two pods #{}", round + 1),
    };
    let http = reqwest::Client::new();
    let (count, redis) = match mode {
        Pods::One => (1, None),
        _ => (2, Some(args.redis_url.as_str())),
    };
    let load_before = load_average();
    progress(&format!(
        "{label}: starting {count} gateway(s); load average {load_before}"
    ));
    let limits = [fanout::NO_HANDSHAKE_LIMIT];
    let pods = fanout::start_pods(
        &args.gateway,
        &db.url(),
        data_dir,
        count,
        redis,
        &limits,
        &http,
    )
    .await?;
    let outcome = measure(args, &pods, classroom, &label).await;
    let peak_rss = pods
        .iter()
        .map(|p| p.gateway.stats().map(|s| s.peak_rss).unwrap_or(0))
        .collect();
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
    Ok(Run {
        label,
        result: outcome?,
        peak_rss,
        load_before,
        load_after: load_average(),
    })
}

/// Dashboards on the last pod, POSTs to the first.
async fn measure(args: &Args, pods: &[Pod], classroom: &str, label: &str) -> Result<StepResult> {
    let minter = Minter::new(JWT_SECRET)?;
    let watched = pods.last().expect("at least one pod");
    let connector = Arc::new(Connector::new(watched.env.listen, watched.env.ws_url(), 1));
    let tally = Arc::new(Tally::default());
    let join = Join {
        classroom: Some(classroom),
        first: 0,
        count: args.dashboards,
        one_instructor: false,
        in_flight: 100,
    };
    let audience = connect_audience(&[connector], &minter, &join, &tally, label).await?;
    let poster = Poster::new(
        &minter,
        vec![pods[0].env.events_url()],
        classroom,
        args.seats,
        args.max_in_flight,
    )?;
    let warmup = StepPlan {
        step: 0,
        rate: args.rate,
        secs: args.warmup_secs.max(0.5),
        label: format!("{label} warm-up"),
    };
    let warm = poster.run_step(&warmup, &audience, &tally, pods).await?;
    ensure!(
        warm.lost() == 0 && warm.rejected == 0,
        "warm-up lost {} deliveries, {} POSTs not accepted (first: {:?})",
        warm.lost(),
        warm.rejected,
        warm.first_error
    );
    let plan = StepPlan {
        step: 1,
        rate: args.rate,
        secs: args.secs,
        label: label.to_string(),
    };
    let result = poster.run_step(&plan, &audience, &tally, pods).await?;
    audience.close().await;
    Ok(result)
}

fn print_report(args: &Args, runs: &[Run]) {
    println!();
    println!(
        "{} seats, {} dashboards, {} events/s for {} s (after {} s warm-up), one cell_executed \
         per POST; machine: {} CPUs",
        args.seats,
        args.dashboards,
        args.rate,
        args.secs,
        args.warmup_secs,
        std::thread::available_parallelism().map_or(0, |n| n.get()),
    );
    println!(
        "{:<12} {:>7} {:>9} {:>5} {:>7} {:>7} {:>7} {:>8} {:>11} {:>8} {:>13} {:>8}  load avg before / after",
        "run",
        "events",
        "delivered",
        "lost",
        "p50 ms",
        "p95 ms",
        "p99 ms",
        "max ms",
        "cpu/1k del",
        "gw cpu",
        "peak RSS MB",
        "gen cpu"
    );
    for run in runs {
        let r = &run.result;
        let per_1k = r
            .cpu_us_per_delivery()
            .map_or("-".into(), |us| format!("{:.1} ms", us));
        let rss = run
            .peak_rss
            .iter()
            .map(|b| format!("{:.1}", *b as f64 / 1e6))
            .collect::<Vec<_>>()
            .join(" / ");
        println!(
            "{:<12} {:>7} {:>9} {:>5} {:>7} {:>7} {:>7} {:>8.2} {:>11} {:>7.1}% {:>13} {:>7.1}%  {} / {}",
            run.label,
            r.accepted,
            r.received,
            r.lost(),
            cell(r.p50),
            cell(r.p95),
            cell(r.p99),
            r.max,
            per_1k,
            r.cpu_percent(),
            rss,
            r.own_percent(),
            run.load_before,
            run.load_after,
        );
        let pods: Vec<String> = r.pod_cpu.iter().map(|c| format!("{:.2} s", c)).collect();
        println!(
            "{:<12} posted {} (not 202: {}{}), behind schedule {}, posting took {:.1} s; \
             gateway CPU per pod {} ({:.0}% in the kernel); unmatched frames {}; dashboards dropped {}; \
             cluster messages dropped {}, publish errors {}",
            "",
            r.posted,
            r.rejected,
            r.first_error
                .as_deref()
                .map(|e| format!(", first: {e}"))
                .unwrap_or_default(),
            r.behind,
            r.post_secs,
            pods.join(" + "),
            r.sys_share(),
            r.unmatched,
            r.dropped,
            r.cluster_dropped,
            r.publish_errors,
        );
        let (i, d) = (&r.server_ingest, &r.server_delivery);
        println!(
            "{:<12} server side (first pod's histograms, interpolated in buckets of 0.1/0.25/0.5/1/2.5/5 ms): \
             POST p50 {} / p99 {} / mean {} ms; acceptance to broadcast handed over p50 {} / p99 {} / mean {} ms",
            "",
            cell(i.quantile_ms(0.5)),
            cell(i.quantile_ms(0.99)),
            cell(i.mean_ms()),
            cell(d.quantile_ms(0.5)),
            cell(d.quantile_ms(0.99)),
            cell(d.mean_ms()),
        );
    }
    println!(
        "latency: from just before the POST to the cell_executed frame at the dashboard \
         (histogram, <1.6 % error); cpu/1k del: user+system CPU of all gateways \
         (/proc/<pid>/stat) per 1,000 cell_executed deliveries (each event also sends one \
         seat_updated to every dashboard); gw cpu / gen cpu: gateways' / this load \
         generator's CPU in % of one core; peak RSS: VmHWM of each pod"
    );
}
