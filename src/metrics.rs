//! Every Prometheus metric cellgate exports, declared in one place.
//!
//! Rules every metric here follows (and a test checks): the name starts
//! with `cellgate_` and ends with its unit (`_seconds`, `_sockets`,
//! `_total` for counts); every metric has help text; labels come from the
//! small fixed sets declared below (refusal codes, event types, rejection
//! reasons, close reasons), never from user data. Series of every known
//! label value exist from the start, so that a rate reads 0, not "no data".
//!
//! The process collector adds `process_cpu_seconds_total`,
//! `process_resident_memory_bytes`, `process_open_fds` and friends.
//! Everything is served by the metrics listener only (`server.rs`).

use prometheus::core::Collector;
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::auth::Refusal;

/// Buckets from 100 µs to 5 s, fine enough to read a p95 anywhere between.
const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

/// Dashboards reached by one broadcast on this pod.
const FANOUT_BUCKETS: &[f64] = &[0.0, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0];

/// The event types of the ingest API.
pub const EVENT_TYPES: [&str; 3] = ["cell_executed", "help_requested", "help_cancelled"];

/// Why an ingest request was refused (`ApiError::reason`).
pub const REJECT_REASONS: [&str; 8] = [
    "unauthorized",
    "forbidden",
    "not_found",
    "invalid",
    "too_large",
    "rate_limited",
    "unavailable",
    "cluster_unavailable",
];

/// The keyed rate limits (`cellgate_rate_limit_keys`).
pub const RATE_LIMITS: [&str; 2] = ["handshake", "ingest"];

/// The transports of a Socket.IO payload.
pub const TRANSPORTS: [&str; 2] = ["polling", "websocket"];

/// The scopes of the dashboard limits (`cellgate_socket_limit_sockets`).
pub const SOCKET_LIMIT_SCOPES: [&str; 2] = ["pod", "instructor"];

/// Why a dashboard connection ended (see [`close_reason`]).
pub const CLOSE_REASONS: [&str; 8] = [
    "transport_close",
    "transport_error",
    "heartbeat_timeout",
    "client_disconnect",
    "server_disconnect",
    "server_closing",
    "packet_parsing_error",
    "multiple_polling",
];

/// Answers to `refresh_token`: `ok` or the error code of the acknowledgement.
pub const REFRESH_OUTCOMES: [&str; 7] = [
    "ok",
    "invalid_token",
    "token_expired",
    "different_instructor",
    "instructor_inactive",
    "instructor_not_found",
    "directory_unavailable",
];

/// The Socket.IO namespaces cellgate serves.
pub const NAMESPACES: [&str; 1] = ["/"];

/// Handles on every metric; cheap to clone.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// Connect-time authentication duration, by `outcome` (`accepted`, `refused`).
    pub auth_duration: HistogramVec,
    /// Handshakes that asked to be authenticated.
    pub auth_attempts: IntCounter,
    /// Refused handshakes, by `reason` (the refusal code).
    pub auth_failures: IntCounterVec,
    /// Dashboards connected to this pod now, by `namespace`.
    pub connected_sockets: IntGaugeVec,
    /// Sessions this pod holds: one per authenticated dashboard socket, from
    /// the handshake until its disconnect clean-up.
    pub sessions: IntGauge,
    /// Dashboard connections accepted, by `namespace`.
    pub connections_opened: IntCounterVec,
    /// Dashboard connections ended, by `namespace` and close `reason`.
    pub connections_closed: IntCounterVec,
    /// Events accepted by the ingest API, by `type`.
    pub events_ingested: IntCounterVec,
    /// Ingest requests refused, by `reason`.
    pub events_rejected: IntCounterVec,
    /// Duplicate events (same id) answered without applying them.
    pub events_duplicate: IntCounter,
    /// Ingest request duration.
    pub ingest_duration: Histogram,
    /// From an event's acceptance to its broadcast leaving this pod.
    pub delivery_duration: Histogram,
    /// Dashboards of this pod one broadcast was handed to.
    pub broadcast_fanout: Histogram,
    /// Help requests waiting for an instructor (open, not yet claimed),
    /// read from the directory, so the same on every pod.
    pub help_requests_open: IntGauge,
    /// Directory query duration.
    pub directory_query_duration: Histogram,
    /// Directory queries that failed.
    pub directory_errors: IntCounter,
    /// Directory lookups answered from the cache.
    pub directory_cache_hits: IntCounter,
    /// Directory lookups that went to the database.
    pub directory_cache_misses: IntCounter,
    /// Lookups answered from the stale cache because the database failed.
    pub directory_stale_answers: IntCounter,
    /// 1 while this pod hears the cluster's pub/sub (always 1 on a single node).
    pub cluster_healthy: IntGauge,
    /// Cluster messages received but not handed to the adapter.
    pub cluster_messages_dropped: IntCounter,
    /// Broadcasts the cluster did not take (Redis failed or timed out, or
    /// fewer pods than expected got it).
    pub cluster_publish_errors: IntCounter,
    /// `refresh_token` requests, by `outcome` ([`REFRESH_OUTCOMES`]).
    pub token_refreshes: IntCounterVec,
    /// Dashboards disconnected because their token expired.
    pub token_expired_disconnects: IntCounter,
    /// JWKS fetches, by `outcome` (`ok`, `error`).
    pub jwks_fetches: IntCounterVec,
    /// Signing keys of the JWKS in use.
    pub jwks_keys: IntGauge,
    /// Keys a rate limit holds now, by `limit` ([`RATE_LIMITS`]).
    pub rate_limit_keys: IntGaugeVec,
    /// Socket.IO payloads over `CELLGATE_MAX_SOCKET_PAYLOAD_BYTES`, by
    /// `transport` ([`TRANSPORTS`]); each closed its connection.
    pub socket_payloads_too_large: IntCounterVec,
    /// Dashboards disconnected because their outgoing queue was full.
    pub slow_consumer_disconnects: IntCounter,
    /// Socket.IO requests refused for their `Origin`.
    pub origin_refusals: IntCounter,
    /// The configured dashboard limits, by `scope` ([`SOCKET_LIMIT_SCOPES`]).
    pub socket_limits: IntGaugeVec,
}

impl Metrics {
    /// Creates and registers every metric, with the process collector.
    pub fn new() -> Self {
        let r = Registry::new();
        let m = Metrics {
            auth_duration: register(
                &r,
                HistogramVec::new(
                    histogram_opts(
                        "cellgate_auth_duration_seconds",
                        "Time from handshake to accept or refuse, including the directory lookup.",
                        LATENCY_BUCKETS,
                    ),
                    &["outcome"],
                ),
            ),
            auth_attempts: register(
                &r,
                IntCounter::new(
                    "cellgate_auth_attempts_total",
                    "Dashboard handshakes that were authenticated (accepted or refused).",
                ),
            ),
            auth_failures: register(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "cellgate_auth_failures_total",
                        "Refused handshakes by refusal code.",
                    ),
                    &["reason"],
                ),
            ),
            connected_sockets: register(
                &r,
                IntGaugeVec::new(
                    Opts::new(
                        "cellgate_connected_sockets",
                        "Dashboards connected to this pod, by Socket.IO namespace.",
                    ),
                    &["namespace"],
                ),
            ),
            sessions: register(
                &r,
                IntGauge::new(
                    "cellgate_sessions_sockets",
                    "Dashboard sessions this pod holds (one per authenticated socket).",
                ),
            ),
            connections_opened: register(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "cellgate_connections_opened_total",
                        "Dashboard connections accepted, by Socket.IO namespace.",
                    ),
                    &["namespace"],
                ),
            ),
            connections_closed: register(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "cellgate_connections_closed_total",
                        "Dashboard connections ended, by namespace and close reason.",
                    ),
                    &["namespace", "reason"],
                ),
            ),
            events_ingested: register(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "cellgate_events_ingested_total",
                        "Accepted notebook events by type.",
                    ),
                    &["type"],
                ),
            ),
            events_rejected: register(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "cellgate_events_rejected_total",
                        "Ingest requests refused, by reason.",
                    ),
                    &["reason"],
                ),
            ),
            events_duplicate: register(
                &r,
                IntCounter::new(
                    "cellgate_events_duplicate_total",
                    "Events posted again with an id already applied.",
                ),
            ),
            ingest_duration: register(
                &r,
                Histogram::with_opts(histogram_opts(
                    "cellgate_ingest_request_duration_seconds",
                    "POST /api/v1/events duration, from body read to answer.",
                    LATENCY_BUCKETS,
                )),
            ),
            delivery_duration: register(
                &r,
                Histogram::with_opts(histogram_opts(
                    "cellgate_event_delivery_duration_seconds",
                    "From an event's acceptance to its broadcast leaving this pod.",
                    LATENCY_BUCKETS,
                )),
            ),
            broadcast_fanout: register(
                &r,
                Histogram::with_opts(histogram_opts(
                    "cellgate_broadcast_fanout_sockets",
                    "Dashboards of this pod a broadcast was handed to.",
                    FANOUT_BUCKETS,
                )),
            ),
            help_requests_open: register(
                &r,
                IntGauge::new(
                    "cellgate_open_help_requests",
                    "Help requests waiting for an instructor, from the directory (same on every pod).",
                ),
            ),
            directory_query_duration: register(
                &r,
                Histogram::with_opts(histogram_opts(
                    "cellgate_directory_query_duration_seconds",
                    "Instructor and classroom lookups that reached the database.",
                    LATENCY_BUCKETS,
                )),
            ),
            directory_errors: register(
                &r,
                IntCounter::new(
                    "cellgate_directory_errors_total",
                    "Directory queries that failed.",
                ),
            ),
            directory_cache_hits: register(
                &r,
                IntCounter::new(
                    "cellgate_directory_cache_hits_total",
                    "Directory lookups answered from the cache.",
                ),
            ),
            directory_cache_misses: register(
                &r,
                IntCounter::new(
                    "cellgate_directory_cache_misses_total",
                    "Directory lookups that went to the database.",
                ),
            ),
            directory_stale_answers: register(
                &r,
                IntCounter::new(
                    "cellgate_directory_stale_answers_total",
                    "Lookups answered from the stale cache while the database did not answer.",
                ),
            ),
            cluster_healthy: register(
                &r,
                IntGauge::new(
                    "cellgate_cluster_healthy",
                    "1 while this pod hears the cluster's pub/sub round trip; 1 on a single node.",
                ),
            ),
            cluster_messages_dropped: register(
                &r,
                IntCounter::new(
                    "cellgate_cluster_messages_dropped_total",
                    "Cluster messages received but not handed to the Socket.IO adapter.",
                ),
            ),
            cluster_publish_errors: register(
                &r,
                IntCounter::new(
                    "cellgate_cluster_publish_errors_total",
                    "Broadcasts the cluster did not take (Redis error or timeout, or a pod missed it).",
                ),
            ),
            token_refreshes: register(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "cellgate_token_refreshes_total",
                        "refresh_token requests from connected dashboards, by outcome.",
                    ),
                    &["outcome"],
                ),
            ),
            token_expired_disconnects: register(
                &r,
                IntCounter::new(
                    "cellgate_token_expired_disconnects_total",
                    "Dashboards disconnected because their token expired while connected.",
                ),
            ),
            jwks_fetches: register(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "cellgate_jwks_fetches_total",
                        "JWKS fetches (start-up, background refresh, unknown key id), by outcome.",
                    ),
                    &["outcome"],
                ),
            ),
            jwks_keys: register(
                &r,
                IntGauge::new(
                    "cellgate_jwks_keys",
                    "Signing keys of the JWKS in use (0 without CELLGATE_JWKS_URL).",
                ),
            ),
            rate_limit_keys: register(
                &r,
                IntGaugeVec::new(
                    Opts::new(
                        "cellgate_rate_limit_keys",
                        "Client addresses or student tokens a rate limit holds a budget for, by limit.",
                    ),
                    &["limit"],
                ),
            ),
            socket_payloads_too_large: register(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "cellgate_socket_payloads_too_large_total",
                        "Socket.IO payloads over CELLGATE_MAX_SOCKET_PAYLOAD_BYTES (each closed its connection), by transport.",
                    ),
                    &["transport"],
                ),
            ),
            slow_consumer_disconnects: register(
                &r,
                IntCounter::new(
                    "cellgate_slow_consumer_disconnects_total",
                    "Dashboards disconnected because their outgoing queue (CELLGATE_SOCKET_QUEUE_PACKETS) was full.",
                ),
            ),
            origin_refusals: register(
                &r,
                IntCounter::new(
                    "cellgate_origin_refusals_total",
                    "Socket.IO requests refused with 403 because their Origin is not allowed.",
                ),
            ),
            socket_limits: register(
                &r,
                IntGaugeVec::new(
                    Opts::new(
                        "cellgate_socket_limit_sockets",
                        "The dashboard limits in force: per pod (CELLGATE_MAX_SOCKETS) and per instructor.",
                    ),
                    &["scope"],
                ),
            ),
            registry: r,
        };
        let process = prometheus::process_collector::ProcessCollector::for_self();
        m.registry
            .register(Box::new(process))
            .expect("process metric names are free");
        m.cluster_healthy.set(1);
        m.pre_register_labels();
        m
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
        for reason in REJECT_REASONS {
            self.events_rejected.with_label_values(&[reason]);
        }
        for outcome in ["ok", "error"] {
            self.jwks_fetches.with_label_values(&[outcome]);
        }
        for outcome in REFRESH_OUTCOMES {
            self.token_refreshes.with_label_values(&[outcome]);
        }
        for limit in RATE_LIMITS {
            self.rate_limit_keys.with_label_values(&[limit]);
        }
        for transport in TRANSPORTS {
            self.socket_payloads_too_large
                .with_label_values(&[transport]);
        }
        for scope in SOCKET_LIMIT_SCOPES {
            self.socket_limits.with_label_values(&[scope]);
        }
        for namespace in NAMESPACES {
            self.connected_sockets.with_label_values(&[namespace]);
            self.connections_opened.with_label_values(&[namespace]);
            for reason in CLOSE_REASONS {
                self.connections_closed
                    .with_label_values(&[namespace, reason]);
            }
        }
    }

    /// Dashboards connected to this pod, all namespaces together.
    pub fn dashboards(&self) -> i64 {
        NAMESPACES
            .iter()
            .map(|ns| self.connected_sockets.with_label_values(&[ns]).get())
            .sum()
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

/// The `reason` label of `cellgate_connections_closed_total`.
pub fn close_reason(reason: socketioxide::socket::DisconnectReason) -> &'static str {
    use socketioxide::socket::DisconnectReason as R;
    match reason {
        R::TransportClose => "transport_close",
        R::TransportError => "transport_error",
        R::HeartbeatTimeout => "heartbeat_timeout",
        R::ClientNSDisconnect => "client_disconnect",
        R::ServerNSDisconnect => "server_disconnect",
        R::ClosingServer => "server_closing",
        R::PacketParsingError => "packet_parsing_error",
        R::MultipleHttpPollingError => "multiple_polling",
    }
}

fn histogram_opts(name: &str, help: &str, buckets: &[f64]) -> HistogramOpts {
    HistogramOpts::new(name, help).buckets(buckets.to_vec())
}

/// Registers a freshly built collector and hands it back. The names are
/// constants of this file, so a failure is a programming error.
fn register<C: Collector + Clone + 'static>(
    registry: &Registry,
    built: prometheus::Result<C>,
) -> C {
    let collector = built.expect("valid metric definition");
    registry
        .register(Box::new(collector.clone()))
        .expect("metric names are unique");
    collector
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Unit suffixes a metric name may end with.
    const UNITS: [&str; 5] = ["_seconds", "_sockets", "_total", "_requests", "_keys"];

    #[test]
    fn every_metric_follows_the_naming_rules() {
        let metrics = Metrics::new();
        let families = metrics.registry.gather();
        let ours: Vec<_> = families
            .iter()
            .filter(|f| !f.name().starts_with("process_"))
            .collect();
        assert!(ours.len() >= 20, "only {} cellgate metrics", ours.len());
        for family in ours {
            let name = family.name();
            assert!(name.starts_with("cellgate_"), "{name} lacks the prefix");
            let unit =
                UNITS.iter().any(|u| name.ends_with(u)) || name == "cellgate_cluster_healthy";
            assert!(unit, "{name} does not end with a unit");
            assert!(!family.help().is_empty(), "{name} has no help text");
        }
    }

    #[test]
    fn process_metrics_are_exported() {
        let text = Metrics::new().render();
        for name in [
            "process_cpu_seconds_total",
            "process_resident_memory_bytes",
            "process_open_fds",
        ] {
            assert!(text.contains(name), "{name} missing");
        }
    }

    #[test]
    fn labelled_series_exist_before_anything_happens() {
        let text = Metrics::new().render();
        assert!(text.contains(r#"cellgate_events_rejected_total{reason="too_large"} 0"#));
        assert!(text.contains(
            r#"cellgate_connections_closed_total{namespace="/",reason="transport_close"} 0"#
        ));
        assert!(text.contains(r#"cellgate_connected_sockets{namespace="/"} 0"#));
    }
}
