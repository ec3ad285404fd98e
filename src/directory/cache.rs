//! A short-lived cache in front of the directory, so that a reconnect storm
//! of a whole classroom costs a handful of queries, and a bounded retry so
//! that a database hiccup does not refuse anyone.
//!
//! Concurrent lookups of the same key wait for one query (moka's
//! `try_get_with` coalesces them).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use moka::future::Cache;
use tracing::Instrument;
use tracing::field::Empty;

use super::{Classroom, Directory, DirectoryError, Instructor, normalize_email};
use crate::metrics::Metrics;

/// Pauses between attempts; about one second in all.
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
    instructors: Cache<String, Option<Instructor>>,
    classrooms: Cache<String, Option<Classroom>>,
    metrics: Metrics,
}

impl DirectoryCache {
    /// Wraps `directory`; entries live for `ttl`.
    pub fn new(directory: Directory, ttl: Duration, metrics: Metrics) -> Self {
        DirectoryCache {
            directory,
            instructors: new_cache(ttl),
            classrooms: new_cache(ttl),
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
        cache: &Cache<String, V>,
        key: String,
        query: F,
    ) -> Result<V, Arc<DirectoryError>>
    where
        V: Clone + Send + Sync + 'static,
        F: Future<Output = Result<V, DirectoryError>>,
    {
        let span = tracing::Span::current();
        if let Some(hit) = cache.get(&key).await {
            self.metrics.directory_cache_hits.inc();
            span.record("cache", "hit");
            return Ok(hit);
        }
        self.metrics.directory_cache_misses.inc();
        span.record("cache", "miss");
        cache.try_get_with(key, query).await
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
/// (about one second) is spent.
pub async fn with_retries<V, F, Fut>(metrics: &Metrics, mut attempt: F) -> Result<V, DirectoryError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<V, DirectoryError>>,
{
    let mut delays = RETRY_DELAYS.iter();
    let mut try_number = 0u32;
    loop {
        try_number += 1;
        let timer = metrics.directory_query_duration.start_timer();
        let span = tracing::info_span!("directory.query", attempt = try_number);
        let result = attempt().instrument(span).await;
        timer.observe_duration();
        match result {
            Ok(v) => return Ok(v),
            Err(e) => {
                metrics.directory_errors.inc();
                match delays.next() {
                    Some(delay) if e.is_transient() => {
                        tracing::debug!(error = %e, "directory query failed; retrying");
                        tokio::time::sleep(*delay).await;
                    }
                    _ => return Err(e),
                }
            }
        }
    }
}
