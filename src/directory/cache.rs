//! A short-lived cache in front of the directory, so that a reconnect storm
//! of a whole classroom costs a handful of queries, and a bounded retry so
//! that a database hiccup does not refuse anyone.
//!
//! Concurrent lookups of the same key wait for one query (moka's
//! `try_get_with` coalesces them).
//!
//! Every answer is also kept for a longer *stale window*: while the
//! database does not answer, a lookup it already answered is served from
//! there, so instructors who were recently in keep connecting through an
//! outage; everyone else gets the error.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use moka::future::Cache;
use tracing::Instrument;
use tracing::field::Empty;

use super::{Classroom, Directory, DirectoryError, Instructor, normalize_email};
use crate::metrics::Metrics;

/// The longest a lookup may spend on a failing database, attempts and
/// pauses together.
const RETRY_BUDGET: Duration = Duration::from_millis(1200);

/// Pauses between attempts.
const RETRY_DELAYS: [Duration; 4] = [
    Duration::from_millis(100),
    Duration::from_millis(200),
    Duration::from_millis(300),
    Duration::from_millis(400),
];

/// Most entries kept per cache.
const MAX_ENTRIES: u64 = 100_000;

/// Cached, retried directory lookups.
#[derive(Clone)]
pub struct DirectoryCache {
    directory: Directory,
    instructors: Layers<Option<Instructor>>,
    classrooms: Layers<Option<Classroom>>,
    /// When a query last failed for a transient reason; cleared by a success.
    failed_at: Arc<Mutex<Option<Instant>>>,
    metrics: Metrics,
}

/// After a transient failure, lookups with a stale answer use it at once
/// for this long instead of paying the retry budget again: one dashboard's
/// join makes several lookups, and each would wait.
const SKIP_QUERIES_AFTER_FAILURE: Duration = Duration::from_secs(2);

/// How long answers are reused, and how long they may stand in for a
/// database that does not answer.
#[derive(Clone, Copy, Debug)]
pub struct CacheTimes {
    /// A lookup younger than this is answered without a query.
    pub fresh: Duration,
    /// A lookup younger than this answers while the database is down
    /// (zero: never).
    pub stale: Duration,
}

/// The fresh answers and the stale ones of one kind of lookup.
#[derive(Clone)]
struct Layers<V: Clone + Send + Sync + 'static> {
    fresh: Cache<String, V>,
    stale: Option<Cache<String, V>>,
}

impl<V: Clone + Send + Sync + 'static> Layers<V> {
    fn new(times: CacheTimes) -> Self {
        let stale = (!times.stale.is_zero()).then(|| new_cache(times.fresh + times.stale));
        Layers {
            fresh: new_cache(times.fresh),
            stale,
        }
    }

    fn invalidate_all(&self) {
        self.fresh.invalidate_all();
        if let Some(stale) = &self.stale {
            stale.invalidate_all();
        }
    }
}

impl DirectoryCache {
    /// Wraps `directory` with caches of `times`.
    pub fn new(directory: Directory, times: CacheTimes, metrics: Metrics) -> Self {
        DirectoryCache {
            directory,
            instructors: Layers::new(times),
            classrooms: Layers::new(times),
            failed_at: Arc::new(Mutex::new(None)),
            metrics,
        }
    }

    /// The underlying directory, for writes and uncached reads.
    pub fn directory(&self) -> &Directory {
        &self.directory
    }

    /// The instructor with `email`, or `None` when there is none.
    pub async fn instructor(&self, email: &str) -> Result<Option<Instructor>, Arc<DirectoryError>> {
        let email = normalize_email(email);
        let (directory, metrics) = (self.directory.clone(), self.metrics.clone());
        let key = email.clone();
        let query =
            async move { with_retries(&metrics, || directory.instructor_by_email(&email)).await };
        let span = lookup_span("instructor");
        self.lookup(&self.instructors, key, query)
            .instrument(span)
            .await
    }

    /// The classroom `id`, or `None` when there is none.
    pub async fn classroom(&self, id: &str) -> Result<Option<Classroom>, Arc<DirectoryError>> {
        let (directory, metrics) = (self.directory.clone(), self.metrics.clone());
        let id = id.to_string();
        let key = id.clone();
        let query = async move { with_retries(&metrics, || directory.classroom(&id)).await };
        let span = lookup_span("classroom");
        self.lookup(&self.classrooms, key, query)
            .instrument(span)
            .await
    }

    /// Forgets everything (after a write through the CLI in the same process).
    pub fn invalidate_all(&self) {
        self.instructors.invalidate_all();
        self.classrooms.invalidate_all();
    }

    async fn lookup<V, F>(
        &self,
        layers: &Layers<V>,
        key: String,
        query: F,
    ) -> Result<V, Arc<DirectoryError>>
    where
        V: Clone + Send + Sync + 'static,
        F: Future<Output = Result<V, DirectoryError>>,
    {
        let span = tracing::Span::current();
        if let Some(hit) = layers.fresh.get(&key).await {
            self.metrics.directory_cache_hits.inc();
            span.record("cache", "hit");
            return Ok(hit);
        }
        self.metrics.directory_cache_misses.inc();
        span.record("cache", "miss");
        let Some(stale) = &layers.stale else {
            return layers.fresh.try_get_with(key, query).await;
        };
        if self.failed_recently()
            && let Some(value) = stale.get(&key).await
        {
            return Ok(self.stale_answer(&span, value));
        }
        let remembered = async {
            let value = query.await?;
            stale.insert(key.clone(), value.clone()).await;
            Ok::<V, DirectoryError>(value)
        };
        let result = layers.fresh.try_get_with(key.clone(), remembered).await;
        self.note(&result);
        match result {
            Err(error) if error.is_transient() => match stale.get(&key).await {
                Some(value) => {
                    tracing::debug!(%error, "directory down; answering from the stale cache");
                    Ok(self.stale_answer(&span, value))
                }
                None => Err(error),
            },
            result => result,
        }
    }

    fn stale_answer<V>(&self, span: &tracing::Span, value: V) -> V {
        self.metrics.directory_stale_answers.inc();
        span.record("cache", "stale");
        value
    }

    fn failed_recently(&self) -> bool {
        let failed_at = self.failed_at.lock().expect("never poisoned");
        failed_at.is_some_and(|at| at.elapsed() < SKIP_QUERIES_AFTER_FAILURE)
    }

    fn note<V>(&self, result: &Result<V, Arc<DirectoryError>>) {
        let mut failed_at = self.failed_at.lock().expect("never poisoned");
        match result {
            Ok(_) => *failed_at = None,
            Err(error) if error.is_transient() => *failed_at = Some(Instant::now()),
            Err(_) => {}
        }
    }
}

/// One span per lookup; the key (an e-mail, a classroom id) is not recorded.
fn lookup_span(kind: &'static str) -> tracing::Span {
    tracing::info_span!("directory.lookup", kind, cache = Empty)
}

fn new_cache<V: Clone + Send + Sync + 'static>(ttl: Duration) -> Cache<String, V> {
    Cache::builder()
        .max_capacity(MAX_ENTRIES)
        .time_to_live(ttl)
        .build()
}

/// Runs `attempt` until it succeeds, fails for good, or the retry budget
/// ([`RETRY_BUDGET`]) is spent. An attempt is cut off when the budget runs
/// out: the pool alone would wait its whole acquire timeout for a server
/// that refuses connections.
pub async fn with_retries<V, F, Fut>(metrics: &Metrics, mut attempt: F) -> Result<V, DirectoryError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<V, DirectoryError>>,
{
    let deadline = tokio::time::Instant::now() + RETRY_BUDGET;
    let mut delays = RETRY_DELAYS.iter();
    let mut try_number = 0u32;
    loop {
        try_number += 1;
        let timer = metrics.directory_query_duration.start_timer();
        let span = tracing::info_span!("directory.query", attempt = try_number);
        let result = tokio::time::timeout_at(deadline, attempt().instrument(span))
            .await
            .unwrap_or(Err(DirectoryError::Database(sqlx::Error::PoolTimedOut)));
        timer.observe_duration();
        let error = match result {
            Ok(v) => return Ok(v),
            Err(e) => e,
        };
        metrics.directory_errors.inc();
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match delays.next() {
            Some(delay) if error.is_transient() && left > *delay => {
                tracing::debug!(%error, "directory query failed; retrying");
                tokio::time::sleep(*delay).await;
            }
            _ => return Err(error),
        }
    }
}
