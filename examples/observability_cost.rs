//! What observability costs: handshake and event throughput of the built
//! gateway with trace export off, on for every trace, and on for 10 % of
//! traces, the other settings equal (production profile, JSON logs at
//! `info` to a file, SQLite directory). With export on, a real OTLP/gRPC
//! receiver in this process, on loopback, takes the spans: it shares the
//! machine with the gateway, so the cost shown is an upper bound.
//!
//! ```sh
//! cargo build --release --locked
//! cargo run --release --locked --example observability_cost
//! cargo run --release --locked --example observability_cost -- --help
//! ```
//!
//! Rounds alternate the modes so that a machine busy with other work
//! weighs on each; the figures printed are the median of the rounds.

#[path = "../tests/common/gateway.rs"]
#[allow(dead_code, reason = "shared with the tests, which use all of it")]
mod gateway;
#[path = "../tests/common/otlp.rs"]
#[allow(dead_code, reason = "shared with the tests")]
mod otlp;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use gateway::{Gateway, Handshake};

/// Measures handshake and event throughput with trace export off and on.
#[derive(Parser)]
struct Args {
    /// The gateway binary.
    #[arg(long, default_value = "target/release/cellgate")]
    bin: String,
    /// Handshakes per measurement.
    #[arg(long, default_value_t = 5000)]
    handshakes: usize,
    /// Ingest requests per measurement.
    #[arg(long, default_value_t = 5000)]
    requests: usize,
    /// Events per ingest request.
    #[arg(long, default_value_t = 10)]
    batch: usize,
    /// Clients working at once.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Rounds of (off, on, sampled).
    #[arg(long, default_value_t = 5)]
    rounds: usize,
}

/// One measurement of one gateway.
struct Figures {
    handshakes_per_sec: f64,
    events_per_sec: f64,
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let (received, addr) = otlp::receiver("127.0.0.1:0").await.expect("receiver");
    let endpoint = format!("http://{addr}");

    // Each mode is a set of variables on top of the same settings.
    let modes: [(&str, Vec<(&str, &str)>); 3] = [
        ("off", vec![]),
        (
            "on, every trace",
            vec![("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str())],
        ),
        (
            "on, 10 % of traces",
            vec![
                ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
                ("OTEL_TRACES_SAMPLER", "traceidratio"),
                ("OTEL_TRACES_SAMPLER_ARG", "0.1"),
            ],
        ),
    ];
    let mut figures: Vec<Vec<Figures>> = modes.iter().map(|_| Vec::new()).collect();
    for round in 1..=args.rounds {
        for ((name, vars), measured) in modes.iter().zip(&mut figures) {
            let mut env = HashMap::from([("RUST_LOG", "info")]);
            env.extend(vars.iter().copied());
            let before = received.spans.lock().expect("spans").len();
            let f = measure(&args, &env, round).await;
            let got = received.spans.lock().expect("spans").len() - before;
            println!(
                "round {round} export {name:<18}: {:>6.0} handshakes/s {:>7.0} events/s \
                 {got:>7} spans received",
                f.handshakes_per_sec, f.events_per_sec
            );
            measured.push(f);
        }
    }

    let spans = received.spans.lock().expect("spans").len();
    println!();
    println!("median of {} rounds ({} cores):", args.rounds, cores());
    println!("| trace export | handshakes/s | events/s |");
    println!("|---|---|---|");
    let (h_off, e_off) = medians(&figures[0]);
    for ((name, _), measured) in modes.iter().zip(&figures) {
        let (h, e) = medians(measured);
        let change = |now: f64, base: f64| (now / base - 1.0) * 100.0;
        println!(
            "| {name} | {h:.0} ({:+.0} %) | {e:.0} ({:+.0} %) |",
            change(h, h_off),
            change(e, e_off)
        );
    }
    println!("spans received in all: {spans}");
    println!(
        "spans one run makes, all traces sampled: about {}",
        spans_per_run(&args)
    );
}

/// Starts a gateway with `env`, measures both throughputs, stops it.
async fn measure(args: &Args, env: &HashMap<&str, &str>, round: usize) -> Figures {
    let gw = Arc::new(Gateway::start_bin(&args.bin, env).await);
    gw.cli(&["instructors", "add", "ada@example.edu", "--name", "Ada"]);
    gw.cli(&["classrooms", "add", "cls-1", "--seats", "200"]);
    gw.cli(&["classrooms", "staff", "cls-1", "ada@example.edu"]);
    let instructor = gw.cli(&["token", "instructor", "ada@example.edu"]);
    let student = gw.cli(&[
        "token",
        "student",
        "s-1",
        "--classroom",
        "cls-1",
        "--seat",
        "1",
    ]);

    // Warm-up: the directory cache and the allocator.
    handshakes(&gw, &instructor, args.concurrency * 4, args.concurrency).await;
    let handshakes_per_sec = handshakes(&gw, &instructor, args.handshakes, args.concurrency).await;

    // One dashboard watches the classroom, so every broadcast reaches someone.
    let mut watcher = gw.socket().await;
    assert_eq!(watcher.connect(&instructor).await, Handshake::Accepted);
    let join = serde_json::json!({ "classroom": "cls-1" });
    assert_eq!(
        watcher.emit_with_ack("join_classroom", join).await["ok"],
        true
    );
    let events_per_sec = events(&gw, &student, args, round).await;

    drop(watcher);
    let gw = Arc::into_inner(gw).expect("no client left");
    gw.stop().await;
    Figures {
        handshakes_per_sec,
        events_per_sec,
    }
}

/// `total` accepted handshakes over `concurrency` clients; handshakes/s.
async fn handshakes(gw: &Arc<Gateway>, token: &str, total: usize, concurrency: usize) -> f64 {
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let workers: Vec<_> = (0..concurrency)
        .map(|_| {
            let (gw, token, next) = (gw.clone(), token.to_string(), next.clone());
            tokio::spawn(async move {
                while next.fetch_add(1, Ordering::Relaxed) < total {
                    let mut socket = gw.socket().await;
                    assert_eq!(socket.connect(&token).await, Handshake::Accepted);
                }
            })
        })
        .collect();
    for worker in workers {
        worker.await.expect("a handshake worker");
    }
    total as f64 / started.elapsed().as_secs_f64()
}

/// `args.requests` posts of `args.batch` events; events/s.
async fn events(gw: &Arc<Gateway>, token: &str, args: &Args, round: usize) -> f64 {
    let client = reqwest::Client::new();
    let url = format!("http://{}/api/v1/events", gw.addr);
    let next = Arc::new(AtomicUsize::new(0));
    let (total, batch) = (args.requests, args.batch);
    let started = Instant::now();
    let workers: Vec<_> = (0..args.concurrency)
        .map(|_| {
            let (client, url, token, next) =
                (client.clone(), url.clone(), token.to_string(), next.clone());
            tokio::spawn(async move {
                loop {
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    if n >= total {
                        return;
                    }
                    let body: Vec<_> = (0..batch)
                        .map(|i| {
                            serde_json::json!({
                                "id": format!("r{round}-{n}-{i}"), "type": "cell_executed",
                                "classroom": "cls-1", "student": "s-1", "status": "ok",
                            })
                        })
                        .collect();
                    let response = client
                        .post(&url)
                        .bearer_auth(&token)
                        .json(&body)
                        .timeout(Duration::from_secs(30))
                        .send()
                        .await
                        .expect("the gateway answers");
                    assert_eq!(response.status().as_u16(), 202);
                }
            })
        })
        .collect();
    for worker in workers {
        worker.await.expect("an ingest worker");
    }
    (total * batch) as f64 / started.elapsed().as_secs_f64()
}

/// Spans one run creates: a handshake makes 4 (`handshake`,
/// `auth.verify_token`, `directory.lookup`, `session.register`), a post 4
/// plus one `broadcast` per event and one for the seat.
fn spans_per_run(args: &Args) -> usize {
    let handshakes = args.handshakes + args.concurrency * 4 + 1;
    handshakes * 4 + args.requests * (4 + args.batch + 1)
}

fn medians(figures: &[Figures]) -> (f64, f64) {
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    (
        median(figures.iter().map(|f| f.handshakes_per_sec).collect()),
        median(figures.iter().map(|f| f.events_per_sec).collect()),
    )
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}
