//! Every Prometheus metric cellgate exports, declared in one place.
//!
//! Names carry the `cellgate_` prefix and their unit; labels come from
//! small fixed sets (refusal codes, event types), never from user data.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts,
    Registry, TextEncoder,
};

use crate::auth::Refusal;

/// Buckets from 100 µs to 5 s, fine enough to read a p95 anywhere between.
const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

/// The event types of the ingest API, for label pre-registration.
pub const EVENT_TYPES: [&str; 3] = ["cell_executed", "help_requested", "help_cancelled"];

/// Handles on every metric; cheap to clone.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// Connect-time authentication duration, by `outcome` (`accepted`, `refused`).
    pub auth_duration: HistogramVec,
    /// Refused handshakes, by `reason` (the refusal code).
    pub auth_failures: IntCounterVec,
    /// Dashboards connected to this pod now.
    pub connected_sockets: IntGauge,
    /// Events accepted by the ingest API, by `type`.
    pub events_ingested: IntCounterVec,
    /// Ingest requests refused, by `reason`.
    pub events_rejected: IntCounterVec,
    /// Duplicate events (same id) answered without applying them.
    pub events_duplicate: IntCounter,
    /// Ingest request duration.
    pub ingest_duration: Histogram,
    /// Directory query duration.
    pub directory_query_duration: Histogram,
    /// Directory queries that failed.
    pub directory_errors: IntCounter,
    /// Directory lookups answered from the cache.
    pub directory_cache_hits: IntCounter,
    /// Directory lookups that went to the database.
    pub directory_cache_misses: IntCounter,
    /// 1 while this pod hears the cluster's pub/sub (always 1 on a single node).
    pub cluster_healthy: IntGauge,
    /// Cluster messages received but not handed to the adapter.
    pub cluster_messages_dropped: IntCounter,
    /// Broadcasts the cluster did not take (Redis failed or timed out).
    pub cluster_publish_errors: IntCounter,
}

impl Metrics {
    /// Creates and registers every metric, with the process collector.
    pub fn new() -> Self {
        let registry = Registry::new();
        let m = Metrics {
            auth_duration: HistogramVec::new(
                HistogramOpts::new(
                    "cellgate_auth_duration_seconds",
                    "Time from handshake to accept or refuse, including the directory lookup.",
                )
                .buckets(LATENCY_BUCKETS.to_vec()),
                &["outcome"],
            )
            .expect("valid metric"),
            auth_failures: IntCounterVec::new(
                Opts::new(
                    "cellgate_auth_failures_total",
                    "Refused handshakes by refusal code.",
                ),
                &["reason"],
            )
            .expect("valid metric"),
            connected_sockets: IntGauge::new(
                "cellgate_connected_sockets",
                "Dashboards connected to this pod.",
            )
            .expect("valid metric"),
            events_ingested: IntCounterVec::new(
                Opts::new(
                    "cellgate_events_ingested_total",
                    "Accepted notebook events by type.",
                ),
                &["type"],
            )
            .expect("valid metric"),
            events_rejected: IntCounterVec::new(
                Opts::new(
                    "cellgate_events_rejected_total",
                    "Ingest requests refused, by reason.",
                ),
                &["reason"],
            )
            .expect("valid metric"),
            events_duplicate: IntCounter::new(
                "cellgate_events_duplicate_total",
                "Events posted again with an id already applied.",
            )
            .expect("valid metric"),
            ingest_duration: Histogram::with_opts(
                HistogramOpts::new(
                    "cellgate_ingest_request_duration_seconds",
                    "POST /api/v1/events duration, from body read to answer.",
                )
                .buckets(LATENCY_BUCKETS.to_vec()),
            )
            .expect("valid metric"),
            directory_query_duration: Histogram::with_opts(
                HistogramOpts::new(
                    "cellgate_directory_query_duration_seconds",
                    "Instructor and classroom lookups that reached the database.",
                )
                .buckets(LATENCY_BUCKETS.to_vec()),
            )
            .expect("valid metric"),
            directory_errors: IntCounter::new(
                "cellgate_directory_errors_total",
                "Directory queries that failed.",
            )
            .expect("valid metric"),
            directory_cache_hits: IntCounter::new(
                "cellgate_directory_cache_hits_total",
                "Directory lookups answered from the cache.",
            )
            .expect("valid metric"),
            directory_cache_misses: IntCounter::new(
                "cellgate_directory_cache_misses_total",
                "Directory lookups that went to the database.",
            )
            .expect("valid metric"),
            cluster_healthy: IntGauge::new(
                "cellgate_cluster_healthy",
                "1 while this pod hears the cluster's pub/sub round trip; 1 on a single node.",
            )
            .expect("valid metric"),
            cluster_messages_dropped: IntCounter::new(
                "cellgate_cluster_messages_dropped_total",
                "Cluster messages received but not handed to the Socket.IO adapter.",
            )
            .expect("valid metric"),
            cluster_publish_errors: IntCounter::new(
                "cellgate_cluster_publish_errors_total",
                "Broadcasts the cluster did not take (Redis error or timeout).",
            )
            .expect("valid metric"),
            registry,
        };
        m.cluster_healthy.set(1);
        m.register_all();
        m.pre_register_labels();
        m
    }

    fn register_all(&self) {
        let collectors: Vec<Box<dyn prometheus::core::Collector>> = vec![
            Box::new(self.auth_duration.clone()),
            Box::new(self.auth_failures.clone()),
            Box::new(self.connected_sockets.clone()),
            Box::new(self.events_ingested.clone()),
            Box::new(self.events_rejected.clone()),
            Box::new(self.events_duplicate.clone()),
            Box::new(self.ingest_duration.clone()),
            Box::new(self.directory_query_duration.clone()),
            Box::new(self.directory_errors.clone()),
            Box::new(self.directory_cache_hits.clone()),
            Box::new(self.directory_cache_misses.clone()),
            Box::new(self.cluster_healthy.clone()),
            Box::new(self.cluster_messages_dropped.clone()),
            Box::new(self.cluster_publish_errors.clone()),
            Box::new(prometheus::process_collector::ProcessCollector::for_self()),
        ];
        for collector in collectors {
            self.registry
                .register(collector)
                .expect("metric names are unique");
        }
    }

    // Series that exist from the start read as 0 instead of "no data".
    fn pre_register_labels(&self) {
        for outcome in ["accepted", "refused"] {
            self.auth_duration.with_label_values(&[outcome]);
        }
        for code in Refusal::CODES {
            self.auth_failures.with_label_values(&[code]);
        }
        for kind in EVENT_TYPES {
            self.events_ingested.with_label_values(&[kind]);
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding cannot fail");
        String::from_utf8(out).expect("the text format is UTF-8")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
