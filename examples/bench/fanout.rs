//! A live classroom under load: dashboards that joined one classroom, and
//! notebook extensions posting `cell_executed` at a fixed rate. Measures
//! each delivery from just before its POST to its arrival at a dashboard,
//! counts what never arrived, and reads the gateways' CPU from `/proc`.
//!
//! Every event's id is `ev-<step>-<seq>`: a dashboard finds the step and
//! the sequence number in the frame without parsing its JSON, and looks up
//! when that event was posted in the step's table. A step's figures are
//! taken once every POST has been answered and every accepted event has
//! reached every dashboard (or a drain timeout has passed: what is missing
//! then is lost).

use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use chrono::{SecondsFormat, Utc};
use futures_util::{SinkExt, StreamExt};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_tungstenite::tungstenite::Message;

use super::client::{Connector, Minter, Ws, check_accepted, handshake, join_classroom};
use super::gateway::{Gateway, GatewayEnv, ProcStats, metric};
use super::pg::instructor_email;
use super::stats::{Histogram, PromHistogram};

/// Steps one run may have.
pub const MAX_STEPS: usize = 64;
/// Longest wait, after the last POST, for deliveries still on their way.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// A step is over when no frame arrived for this long after the drain.
const QUIET: Duration = Duration::from_millis(300);

const CELL: &[u8] = b"42[\"cell_executed\"";
const SEAT: &[u8] = b"42[\"seat_updated\"";
const ID: &[u8] = b"\"id\":\"ev-";

// ------------------------------------------------------------------ pods --

/// One running gateway and its settings.
pub struct Pod {
    /// Its settings (ports).
    pub env: GatewayEnv,
    /// The process.
    pub gateway: Gateway,
    /// `CELLGATE_NODE_ID`.
    pub node: String,
}

/// The per-address handshake budget (120 a minute by default) is meant for
/// browsers each on its own address; a load generator opens thousands of
/// dashboards from a handful of loopback addresses, so every benchmark
/// turns it off.
pub const NO_HANDSHAKE_LIMIT: (&str, &str) = ("CELLGATE_HANDSHAKES_PER_MINUTE", "0");

/// Limits a capacity measurement turns off or raises beyond what it opens:
/// the handshake budget, the ingest budget per student token (600 a
/// minute), dashboards per instructor (20 per pod) and per pod (10,000).
pub const CAPACITY_LIMITS: [(&str, &str); 4] = [
    NO_HANDSHAKE_LIMIT,
    ("CELLGATE_INGEST_PER_MINUTE", "0"),
    ("CELLGATE_MAX_SOCKETS_PER_INSTRUCTOR", "1000000"),
    ("CELLGATE_MAX_SOCKETS", "1000000"),
];

/// Starts `count` production-profile gateways on one database, in cluster
/// mode when `redis` is given, with the settings `vars` on top; waits until
/// each answers `/readyz`.
pub async fn start_pods(
    binary: &Path,
    database_url: &str,
    data_dir: &Path,
    count: usize,
    redis: Option<&str>,
    vars: &[(&str, &str)],
    http: &reqwest::Client,
) -> Result<Vec<Pod>> {
    let mut pods = Vec::with_capacity(count);
    for i in 0..count {
        let node = format!("bench-pod-{}", (b'a' + i as u8) as char);
        let mut env = GatewayEnv::new(database_url.to_string(), data_dir)?
            .production()
            .var("CELLGATE_NODE_ID", &node);
        for (key, value) in vars {
            env = env.var(key, value);
        }
        if let Some(url) = redis {
            env = env.var("CELLGATE_REDIS_URL", url);
        }
        let mut gateway = Gateway::spawn(binary, &env)?;
        gateway
            .wait_ready(http, &env)
            .await
            .with_context(|| format!("{node} did not become ready"))?;
        pods.push(Pod { env, gateway, node });
    }
    Ok(pods)
}

/// Stops every pod.
pub async fn stop_pods(pods: Vec<Pod>) {
    for pod in pods {
        pod.gateway.stop().await;
    }
}

/// `/proc` figures of every pod, in order.
pub fn pod_stats(pods: &[Pod]) -> Result<Vec<ProcStats>> {
    pods.iter().map(|p| p.gateway.stats()).collect()
}

// ----------------------------------------------------------------- tally --

/// What the dashboards record, shared by all of them.
pub struct Tally {
    base: Instant,
    steps: Box<[StepTally]>,
    /// Dashboards connected and joined right now.
    pub connected: AtomicUsize,
    /// Dashboards whose socket ended while the run was on.
    pub dropped: AtomicUsize,
    /// `seat_updated` frames received.
    pub seat_updates: AtomicU64,
    /// Other frames (pings excluded).
    pub other: AtomicU64,
    last_frame: AtomicU64,
}

/// One step's deliveries.
#[derive(Default)]
pub struct StepTally {
    /// When each event was posted: nanoseconds since `base`, plus one
    /// (0: not posted).
    sent: OnceLock<Box<[AtomicU64]>>,
    /// Delivery latency, microseconds.
    pub hist: Histogram,
    /// `cell_executed` frames of this step received.
    pub received: AtomicU64,
    /// Frames naming an event that was never posted (a bug if not 0).
    pub unmatched: AtomicU64,
}

impl Default for Tally {
    fn default() -> Self {
        Tally {
            base: Instant::now(),
            steps: (0..MAX_STEPS).map(|_| StepTally::default()).collect(),
            connected: AtomicUsize::new(0),
            dropped: AtomicUsize::new(0),
            seat_updates: AtomicU64::new(0),
            other: AtomicU64::new(0),
            last_frame: AtomicU64::new(0),
        }
    }
}

impl Tally {
    fn now(&self) -> u64 {
        self.base.elapsed().as_nanos() as u64
    }

    /// Step `i`'s figures.
    pub fn step(&self, i: usize) -> &StepTally {
        &self.steps[i]
    }

    fn on_cell(&self, frame: &[u8], now: u64) {
        let Some((step, seq)) = event_index(frame) else {
            self.other.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let Some(tally) = self.steps.get(step) else {
            return;
        };
        tally.received.fetch_add(1, Ordering::Relaxed);
        let sent = tally
            .sent
            .get()
            .and_then(|s| s.get(seq))
            .map_or(0, |t| t.load(Ordering::Acquire));
        if sent == 0 {
            tally.unmatched.fetch_add(1, Ordering::Relaxed);
        } else {
            tally.hist.record(now.saturating_sub(sent - 1) / 1000);
        }
    }
}

/// `(step, seq)` from the `"id":"ev-<step>-<seq>"` of a frame.
fn event_index(frame: &[u8]) -> Option<(usize, usize)> {
    let at = frame.windows(ID.len()).position(|w| w == ID)? + ID.len();
    let rest = &frame[at..];
    let dash = rest.iter().position(|&b| b == b'-')?;
    let quote = rest.iter().position(|&b| b == b'"')?;
    let number = |digits: &[u8]| std::str::from_utf8(digits).ok()?.parse().ok();
    Some((number(&rest[..dash])?, number(rest.get(dash + 1..quote)?)?))
}

// ------------------------------------------------------------ dashboards --

/// Connected dashboards; dropping this closes them.
pub struct Audience {
    tasks: JoinSet<()>,
    /// How many joined.
    pub size: usize,
    /// Seconds from the first handshake to the last join's answer.
    pub join_secs: f64,
    /// Seconds after that until no frame had arrived for a while.
    pub settle_secs: f64,
    /// Joins answered `unavailable` and tried again.
    pub join_retries: u64,
}

/// Which dashboards to connect, and what they do once connected.
pub struct Join<'a> {
    /// The classroom each joins; `None`: they stay idle (answering pings).
    pub classroom: Option<&'a str>,
    /// Dashboard `i` is instructor `i` (`first..first + count`)…
    pub first: usize,
    /// … this many of them …
    pub count: usize,
    /// … unless all are instructor `first`.
    pub one_instructor: bool,
    /// Handshakes at once.
    pub in_flight: usize,
}

/// Connects the dashboards of `join` to the pods `connectors[i % len]`.
pub async fn connect_audience(
    connectors: &[Arc<Connector>],
    minter: &Minter,
    join: &Join<'_>,
    tally: &Arc<Tally>,
    phase: &str,
) -> Result<Audience> {
    let (classroom, count) = (join.classroom, join.count);
    let tokens = (join.first..join.first + count)
        .map(|i| {
            let who = if join.one_instructor { join.first } else { i };
            Ok((i, who, minter.instructor(&instructor_email(who))?))
        })
        .collect::<Result<Vec<_>>>()?;
    let started = Instant::now();
    let mut last = Instant::now();
    let mut tasks = JoinSet::new();
    let mut joining = futures_util::stream::iter(tokens)
        .map(|(i, who, token)| {
            let connector = connectors[i % connectors.len()].clone();
            let classroom = classroom.map(str::to_string);
            async move {
                let (mut ws, _, accepted) = handshake(&connector, &token).await?;
                check_accepted(&accepted, &instructor_email(who))?;
                let retries = match classroom {
                    Some(classroom) => join_classroom(&mut ws, &classroom).await?,
                    None => 0,
                };
                Ok::<_, anyhow::Error>((ws, retries))
            }
        })
        .buffer_unordered(join.in_flight.max(1));
    let mut joined = 0;
    let mut join_retries = 0;
    while let Some(done) = joining.next().await {
        let (ws, retries) = done.with_context(|| format!("dashboard {} of {count}", joined + 1))?;
        join_retries += u64::from(retries);
        tally.connected.fetch_add(1, Ordering::Relaxed);
        tasks.spawn(watch(ws, tally.clone()));
        joined += 1;
        if last.elapsed() >= Duration::from_secs(1) {
            last = Instant::now();
            progress(&format!(
                "{phase}: connecting {joined}/{count} ({:.0}/s), {join_retries} joins retried",
                joined as f64 / started.elapsed().as_secs_f64()
            ));
        }
    }
    let join_secs = started.elapsed().as_secs_f64();
    // Each first join is announced to the room (`instructor_status`): let
    // those frames arrive before anything is measured.
    let quiet_from = Instant::now();
    while classroom.is_some() && quiet_from.elapsed() < Duration::from_secs(300) {
        let idle = tally
            .now()
            .saturating_sub(tally.last_frame.load(Ordering::Relaxed));
        if Duration::from_nanos(idle) >= QUIET {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let settle_secs = quiet_from.elapsed().as_secs_f64();
    progress(&format!(
        "{phase}: {joined} connected{} in {join_secs:.1} s, quiet {settle_secs:.1} s later; \
         {join_retries} joins answered unavailable and retried",
        if classroom.is_some() {
            " and joined"
        } else {
            ""
        },
    ));
    Ok(Audience {
        tasks,
        size: joined,
        join_secs,
        settle_secs,
        join_retries,
    })
}

impl Audience {
    /// Closes every dashboard at once (no close handshake).
    pub async fn close(mut self) {
        self.tasks.abort_all();
        while self.tasks.join_next().await.is_some() {}
    }
}

/// One dashboard: answers pings, times `cell_executed`, counts the rest.
async fn watch(mut ws: Ws, tally: Arc<Tally>) {
    while let Some(Ok(message)) = ws.next().await {
        let Message::Text(text) = message else {
            if matches!(message, Message::Close(_)) {
                break;
            }
            continue;
        };
        let now = tally.now();
        let frame = text.as_bytes();
        if frame == b"2" {
            if ws.send(Message::text("3")).await.is_err() {
                break;
            }
            continue;
        }
        if frame.starts_with(CELL) {
            tally.on_cell(frame, now);
        } else if frame.starts_with(SEAT) {
            tally.seat_updates.fetch_add(1, Ordering::Relaxed);
        } else {
            tally.other.fetch_add(1, Ordering::Relaxed);
        }
        tally.last_frame.store(now, Ordering::Relaxed);
    }
    tally.connected.fetch_sub(1, Ordering::Relaxed);
    tally.dropped.fetch_add(1, Ordering::Relaxed);
}

// ---------------------------------------------------------------- poster --

/// Notebook extensions: one student per seat, each with its token.
pub struct Poster {
    http: reqwest::Client,
    urls: Vec<String>,
    classroom: String,
    seats: Vec<(String, String)>,
    max_in_flight: usize,
}

/// What one step is to do.
pub struct StepPlan {
    /// Index into the tally (`< MAX_STEPS`).
    pub step: usize,
    /// Events per second.
    pub rate: f64,
    /// How long to post.
    pub secs: f64,
    /// For the progress line.
    pub label: String,
}

/// What one step measured.
#[derive(Debug, Clone, Default)]
pub struct StepResult {
    /// Target rate, events/s.
    pub rate: f64,
    /// Events posted / answered 202 / answered otherwise or failed.
    pub posted: u64,
    /// Answered 202.
    pub accepted: u64,
    /// Not answered 202.
    pub rejected: u64,
    /// The first non-202 answer or error.
    pub first_error: Option<String>,
    /// POSTs that had to wait for a free slot (more than `max_in_flight`
    /// unanswered): the gateway did not keep up with the rate.
    pub behind: u64,
    /// Seconds the posting took (target: the plan's).
    pub post_secs: f64,
    /// Dashboards in the classroom.
    pub audience: usize,
    /// `accepted × audience`.
    pub expected: u64,
    /// `cell_executed` frames that arrived.
    pub received: u64,
    /// Frames of unknown events.
    pub unmatched: u64,
    /// Latency quantiles, ms.
    pub p50: Option<f64>,
    /// p95, ms.
    pub p95: Option<f64>,
    /// p99, ms.
    pub p99: Option<f64>,
    /// Max, ms.
    pub max: f64,
    /// Mean, ms.
    pub mean: Option<f64>,
    /// CPU seconds of each pod during the step (posting and drain).
    pub pod_cpu: Vec<f64>,
    /// Of which in the kernel (system time), all pods.
    pub pod_sys: f64,
    /// CPU seconds of this process (the load generator).
    pub own_cpu: f64,
    /// Wall seconds from the first POST to the end of the drain.
    pub wall: f64,
    /// Dashboards that disconnected during the step.
    pub dropped: usize,
    /// `cellgate_cluster_messages_dropped_total` increase, all pods.
    pub cluster_dropped: f64,
    /// `cellgate_cluster_publish_errors_total` increase, all pods.
    pub publish_errors: f64,
    /// The first pod's `cellgate_ingest_request_duration_seconds` over
    /// the step: the server's share of each POST.
    pub server_ingest: PromHistogram,
    /// The first pod's `cellgate_event_delivery_duration_seconds`: from
    /// an event's acceptance to its broadcast leaving the pod.
    pub server_delivery: PromHistogram,
}

impl StepResult {
    /// Deliveries expected but not received.
    pub fn lost(&self) -> u64 {
        self.expected.saturating_sub(self.received)
    }

    /// Gateway CPU (all pods) per delivery, microseconds.
    pub fn cpu_us_per_delivery(&self) -> Option<f64> {
        let cpu: f64 = self.pod_cpu.iter().sum();
        (self.received > 0).then(|| cpu * 1e6 / self.received as f64)
    }

    /// Gateway CPU (all pods), percent of one core, over the step.
    pub fn cpu_percent(&self) -> f64 {
        self.pod_cpu.iter().sum::<f64>() / self.wall.max(1e-9) * 100.0
    }

    /// Share of the gateways' CPU spent in the kernel, percent.
    pub fn sys_share(&self) -> f64 {
        let cpu: f64 = self.pod_cpu.iter().sum();
        if cpu > 0.0 {
            self.pod_sys / cpu * 100.0
        } else {
            0.0
        }
    }

    /// This process's CPU, percent of one core.
    pub fn own_percent(&self) -> f64 {
        self.own_cpu / self.wall.max(1e-9) * 100.0
    }
}

impl Poster {
    /// Students `s-0001` … for every seat of `classroom`, posting to `urls`
    /// in turn.
    pub fn new(
        minter: &Minter,
        urls: Vec<String>,
        classroom: &str,
        seats: u32,
        max_in_flight: usize,
    ) -> Result<Self> {
        let seats = (1..=seats)
            .map(|seat| {
                let student = format!("s-{seat:04}");
                let token = minter.student(&student, classroom, seat)?;
                Ok((student, token))
            })
            .collect::<Result<Vec<_>>>()?;
        let http = reqwest::Client::builder()
            .pool_max_idle_per_host(max_in_flight)
            .tcp_nodelay(true)
            .build()?;
        Ok(Poster {
            http,
            urls,
            classroom: classroom.to_string(),
            seats,
            max_in_flight,
        })
    }

    fn body(&self, step: usize, seq: usize) -> (usize, String) {
        let seat = seq % self.seats.len();
        let student = &self.seats[seat].0;
        let now = Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true);
        let body = format!(
            r#"{{"id":"ev-{step}-{seq}","type":"cell_executed","classroom":"{}","seat":{},"student":"{student}","notebook":"week1/lab.ipynb","cell_id":"c{}","execution_count":{seq},"status":"ok","duration_ms":12,"occurred_at":"{now}"}}"#,
            self.classroom,
            seat + 1,
            seq % 40,
        );
        (seat, body)
    }

    /// Posts `plan.rate × plan.secs` events on an open-loop schedule (event
    /// `k` is due `k / rate` seconds after the start, whenever earlier ones
    /// are answered), then waits for the deliveries.
    pub async fn run_step(
        &self,
        plan: &StepPlan,
        audience: &Audience,
        tally: &Arc<Tally>,
        pods: &[Pod],
    ) -> Result<StepResult> {
        let n = (plan.rate * plan.secs).round().max(1.0) as usize;
        let step = tally.step(plan.step);
        if step
            .sent
            .set((0..n).map(|_| AtomicU64::new(0)).collect())
            .is_err()
        {
            bail!("step {} was run already", plan.step);
        }
        let dropped_before = tally.dropped.load(Ordering::Relaxed);
        let (cluster_before, ingest_before, delivery_before) = self.counters(pods).await;
        let cpu_before = pod_stats(pods)?;
        let own_before = ProcStats::own()?;

        let accepted = Arc::new(AtomicU64::new(0));
        let rejected = Arc::new(AtomicU64::new(0));
        let first_error = Arc::new(Mutex::new(None::<String>));
        let slots = Arc::new(Semaphore::new(self.max_in_flight));
        let mut behind = 0;
        let mut ticker = Ticker::new(tally, pods, &cpu_before);
        let started = Instant::now();
        let tally_sent = SentTable {
            tally: tally.clone(),
            step: plan.step,
        };
        for seq in 0..n {
            let due = started + Duration::from_secs_f64(seq as f64 / plan.rate);
            tokio::time::sleep_until(due.into()).await;
            let permit = match slots.clone().try_acquire_owned() {
                Ok(permit) => permit,
                Err(_) => {
                    behind += 1;
                    slots.clone().acquire_owned().await?
                }
            };
            let (seat, body) = self.body(plan.step, seq);
            let request = self
                .http
                .post(&self.urls[seq % self.urls.len()])
                .bearer_auth(&self.seats[seat].1)
                .header("content-type", "application/json")
                .body(body);
            let (ok, rejected) = (accepted.clone(), rejected.clone());
            let (first_error, sent) = (first_error.clone(), tally_sent.clone());
            tokio::spawn(async move {
                sent.mark(seq);
                let answer = request.send().await;
                let error = match answer {
                    Ok(r) if r.status() == reqwest::StatusCode::ACCEPTED => None,
                    Ok(r) => Some(format!(
                        "{}: {}",
                        r.status(),
                        r.text().await.unwrap_or_default()
                    )),
                    Err(e) => Some(format!("{e:#}")),
                };
                match error {
                    None => ok.fetch_add(1, Ordering::Relaxed),
                    Some(error) => {
                        first_error.lock().expect("lock").get_or_insert(error);
                        rejected.fetch_add(1, Ordering::Relaxed)
                    }
                };
                drop(permit);
            });
            ticker.tick(&plan.label, seq + 1, &accepted, plan.step, audience.size)?;
        }
        let post_secs = started.elapsed().as_secs_f64();
        let _all = slots.acquire_many(self.max_in_flight as u32).await?;

        let expected = accepted.load(Ordering::Relaxed) * audience.size as u64;
        let drain_until = Instant::now() + DRAIN_TIMEOUT;
        while step.received.load(Ordering::Relaxed) < expected && Instant::now() < drain_until {
            tokio::time::sleep(Duration::from_millis(10)).await;
            ticker.tick(&plan.label, n, &accepted, plan.step, audience.size)?;
        }
        while Duration::from_nanos(
            tally
                .now()
                .saturating_sub(tally.last_frame.load(Ordering::Relaxed)),
        ) < QUIET
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let wall = started.elapsed().as_secs_f64();
        let cpu_after = pod_stats(pods)?;
        let own_after = ProcStats::own()?;
        let (cluster_after, ingest_after, delivery_after) = self.counters(pods).await;
        let first_error = first_error.lock().expect("lock").clone();
        let result = StepResult {
            rate: plan.rate,
            posted: n as u64,
            accepted: accepted.load(Ordering::Relaxed),
            rejected: rejected.load(Ordering::Relaxed),
            first_error,
            behind,
            post_secs,
            audience: audience.size,
            expected,
            received: step.received.load(Ordering::Relaxed),
            unmatched: step.unmatched.load(Ordering::Relaxed),
            p50: step.hist.quantile_ms(0.50),
            p95: step.hist.quantile_ms(0.95),
            p99: step.hist.quantile_ms(0.99),
            max: step.hist.max_ms(),
            mean: step.hist.mean_ms(),
            pod_cpu: cpu_after
                .iter()
                .zip(&cpu_before)
                .map(|(a, b)| a.cpu_secs - b.cpu_secs)
                .collect(),
            pod_sys: cpu_after
                .iter()
                .zip(&cpu_before)
                .map(|(a, b)| a.sys_secs - b.sys_secs)
                .sum(),
            own_cpu: own_after.cpu_secs - own_before.cpu_secs,
            wall,
            dropped: tally.dropped.load(Ordering::Relaxed) - dropped_before,
            cluster_dropped: cluster_after.0 - cluster_before.0,
            publish_errors: cluster_after.1 - cluster_before.1,
            server_ingest: ingest_after.since(&ingest_before),
            server_delivery: delivery_after.since(&delivery_before),
        };
        if result.lost() > 0 || result.cluster_dropped > 0.0 || result.publish_errors > 0.0 {
            report_losses(&result, pods);
        }
        Ok(result)
    }

    /// `(messages dropped, publish errors)` summed over the pods, and the
    /// first pod's ingest and delivery histograms.
    async fn counters(&self, pods: &[Pod]) -> ((f64, f64), PromHistogram, PromHistogram) {
        let mut sums = (0.0, 0.0);
        let mut histograms = (PromHistogram::default(), PromHistogram::default());
        for (i, pod) in pods.iter().enumerate() {
            let scraped = self.http.get(pod.env.metrics_url()).send().await;
            let Ok(text) = (match scraped {
                Ok(r) => r.text().await,
                Err(e) => Err(e),
            }) else {
                continue;
            };
            sums.0 += metric(&text, "cellgate_cluster_messages_dropped_total").unwrap_or(0.0);
            sums.1 += metric(&text, "cellgate_cluster_publish_errors_total").unwrap_or(0.0);
            if i == 0 {
                histograms = (
                    PromHistogram::parse(&text, "cellgate_ingest_request_duration_seconds"),
                    PromHistogram::parse(&text, "cellgate_event_delivery_duration_seconds"),
                );
            }
        }
        (sums, histograms.0, histograms.1)
    }
}

/// Says what the gateways counted and logged about deliveries that did not
/// arrive.
fn report_losses(r: &StepResult, pods: &[Pod]) {
    progress(&format!(
        "LOSS: {} deliveries expected but not received; gateways counted {} cluster messages \
         dropped and {} publish errors",
        r.lost(),
        r.cluster_dropped,
        r.publish_errors
    ));
    for pod in pods {
        for needle in ["dropped", "not forwarded", "publish failed", "missed"] {
            let (lines, count) = pod.gateway.log_matching(needle, 3);
            if count > 0 {
                progress(&format!(
                    "  {} log, {count} line(s) with {needle:?}:",
                    pod.node
                ));
                for line in lines {
                    progress(&format!("    {line}"));
                }
            }
        }
    }
}

/// Marks events of one step as posted.
#[derive(Clone)]
struct SentTable {
    tally: Arc<Tally>,
    step: usize,
}

impl SentTable {
    fn mark(&self, seq: usize) {
        let now = self.tally.now() + 1;
        if let Some(slot) = self.tally.steps[self.step]
            .sent
            .get()
            .and_then(|t| t.get(seq))
        {
            slot.store(now, Ordering::Release);
        }
    }
}

/// The once-a-second progress line of a step.
struct Ticker<'a> {
    tally: &'a Tally,
    pods: &'a [Pod],
    started: Instant,
    last: Instant,
    cpu_last: Vec<ProcStats>,
}

impl<'a> Ticker<'a> {
    fn new(tally: &'a Tally, pods: &'a [Pod], cpu: &[ProcStats]) -> Self {
        Ticker {
            tally,
            pods,
            started: Instant::now(),
            last: Instant::now(),
            cpu_last: cpu.to_vec(),
        }
    }

    fn tick(
        &mut self,
        label: &str,
        posted: usize,
        accepted: &AtomicU64,
        step: usize,
        audience: usize,
    ) -> Result<()> {
        let since = self.last.elapsed();
        if since < Duration::from_secs(1) {
            return Ok(());
        }
        self.last = Instant::now();
        let cpu = pod_stats(self.pods)?;
        let busy: f64 = cpu
            .iter()
            .zip(&self.cpu_last)
            .map(|(a, b)| a.cpu_secs - b.cpu_secs)
            .sum();
        self.cpu_last = cpu;
        let s = self.tally.step(step);
        let accepted = accepted.load(Ordering::Relaxed);
        progress(&format!(
            "{label}: t={:>3.0}s dashboards {}/{audience} | posted {posted} (202: {accepted}) | \
             delivered {}/{} | p99 so far {} ms | gateway cpu {:.0}%",
            self.started.elapsed().as_secs_f64(),
            self.tally.connected.load(Ordering::Relaxed),
            s.received.load(Ordering::Relaxed),
            accepted * audience as u64,
            super::stats::cell(s.hist.quantile_ms(0.99)),
            busy / since.as_secs_f64() * 100.0,
        ));
        Ok(())
    }
}

/// One progress line on stderr.
pub fn progress(line: &str) {
    let mut err = std::io::stderr().lock();
    let _ = writeln!(err, "{line}");
    let _ = err.flush();
}

/// The 1-minute load average now (`/proc/loadavg`).
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|| "?".into())
}
