//! Deaf-pod detection and the roll call of pods.
//!
//! A pod can be connected to Redis and still receive nothing (its
//! subscriptions were lost in a restart or failover). So every second each
//! pod publishes a probe on one channel every pod subscribes to, through the
//! very pub/sub path the adapter uses: hearing its own probe come back
//! tells the pod it hears the cluster; hearing the others' tells it which
//! pods a broadcast must reach ([`super::peers`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use fred::interfaces::ClientLike;
use futures_util::StreamExt;
use socketioxide_redis::drivers::{Driver, MessageStream};
use tokio::task::JoinHandle;

use super::driver::{DriverError, PubSubDriver};
use super::peers::Peers;
use crate::metrics::Metrics;

/// The channel every pod of the cluster named `prefix` probes on.
pub fn probe_channel(prefix: &str) -> String {
    format!("{prefix}-probe#")
}
/// Time between probes.
const PROBE_EVERY: Duration = Duration::from_secs(1);
/// How long publishing a probe may take.
const PUBLISH_WAIT: Duration = Duration::from_millis(800);
/// Missed probes in a row before the pod declares itself unhealthy.
const MISSES_TO_FAIL: u32 = 2;
/// Probe messages buffered before the prober reads them.
const PROBE_BUFFER: usize = 256;
/// What a pod that shuts down sends instead of a nonce.
const GOODBYE: &str = "bye";

/// Whether this pod both reaches Redis and hears the cluster.
pub struct ClusterHealth {
    healthy: AtomicBool,
    metrics: Metrics,
}

impl ClusterHealth {
    /// Starts healthy (the start-up subscription just succeeded).
    pub fn new(metrics: Metrics) -> Arc<Self> {
        metrics.cluster_healthy.set(1);
        Arc::new(ClusterHealth {
            healthy: AtomicBool::new(true),
            metrics,
        })
    }

    /// The last verdict.
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    fn set(&self, healthy: bool) {
        let was = self.healthy.swap(healthy, Ordering::Relaxed);
        self.metrics.cluster_healthy.set(i64::from(healthy));
        match (was, healthy) {
            (true, false) => {
                tracing::error!("cluster unhealthy: this pod no longer hears Redis pub/sub")
            }
            (false, true) => tracing::info!("cluster healthy again: pub/sub round trips work"),
            _ => {}
        }
    }
}

/// The running probe; [`Prober::goodbye`] stops it and tells the others.
pub struct Prober {
    task: JoinHandle<()>,
    probe: Probe,
}

/// What probing needs: where, who this pod is, and who the others are.
#[derive(Clone)]
struct Probe {
    driver: PubSubDriver,
    channel: Arc<str>,
    peers: Arc<Peers>,
}

impl Prober {
    /// Subscribes to `channel` (see [`probe_channel`]) and starts probing.
    pub async fn start(
        driver: PubSubDriver,
        channel: String,
        health: Arc<ClusterHealth>,
        peers: Arc<Peers>,
    ) -> Result<Self, DriverError> {
        let stream = driver.subscribe(channel.clone(), PROBE_BUFFER).await?;
        let probe = Probe {
            driver,
            channel: channel.into(),
            peers,
        };
        let task = tokio::spawn(run(probe.clone(), health, stream));
        Ok(Prober { task, probe })
    }

    /// Stops probing and tells the other pods this one is gone, so that
    /// they stop waiting for it at once.
    pub async fn goodbye(&self) {
        self.task.abort();
        let message = format!("{} {GOODBYE}", self.probe.peers.me());
        if let Err(error) = self.probe.publish(message).await {
            tracing::warn!(%error, "cannot say goodbye to the cluster; the others forget this pod on their own");
        }
    }
}

/// What one message on the probe channel says.
#[derive(Debug, PartialEq, Eq)]
enum Heard<'a> {
    /// A probe, from `pod`.
    Probe { pod: &'a str, nonce: &'a str },
    /// `pod` is shutting down.
    Goodbye { pod: &'a str },
}

fn parse(message: &[u8]) -> Option<Heard<'_>> {
    let (pod, rest) = std::str::from_utf8(message).ok()?.split_once(' ')?;
    Some(match rest {
        GOODBYE => Heard::Goodbye { pod },
        nonce => Heard::Probe { pod, nonce },
    })
}

/// Probes forever: each period, a probe not heard back (or a client not
/// connected) is a miss; a probe heard back makes the pod healthy at once.
async fn run(
    probe: Probe,
    health: Arc<ClusterHealth>,
    mut stream: MessageStream<(String, Vec<u8>)>,
) {
    let Probe { driver, peers, .. } = probe.clone();
    let mut every = tokio::time::interval(PROBE_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut pending: Option<String> = None;
    let mut misses = 0u32;
    loop {
        tokio::select! {
            _ = every.tick() => {
                // A disconnected client hears nothing: a miss at once, rather
                // than a probe that waits in fred's queue for the reconnection.
                let heard_last = pending.is_none() && driver.client().is_connected();
                if heard_last {
                    misses = 0;
                    peers.tick();
                } else {
                    misses += 1;
                    if misses >= MISSES_TO_FAIL {
                        health.set(false);
                    }
                }
                pending = probe.send().await;
            }
            message = stream.next() => {
                let Some((_, data)) = message else { return };
                match parse(&data) {
                    Some(Heard::Probe { pod, nonce }) if pod == peers.me() => {
                        if pending.as_deref() == Some(nonce) {
                            pending = None;
                            health.set(true);
                        }
                    }
                    Some(Heard::Probe { pod, .. }) => peers.heard(pod),
                    Some(Heard::Goodbye { pod }) => peers.left(pod),
                    None => tracing::debug!("unreadable probe message"),
                }
            }
        }
    }
}

impl Probe {
    /// Publishes a fresh nonce; returns it, to be heard back before the
    /// next period. A probe that cannot be sent is still pending: a miss.
    async fn send(&self) -> Option<String> {
        let nonce = uuid::Uuid::new_v4().simple().to_string();
        if self.driver.client().is_connected()
            && let Err(error) = self.publish(format!("{} {nonce}", self.peers.me())).await
        {
            tracing::debug!(%error, "probe not sent");
        }
        Some(nonce)
    }

    async fn publish(&self, message: String) -> Result<(), DriverError> {
        let sent = self
            .driver
            .publish_uncounted(self.channel.to_string(), message.into_bytes());
        tokio::time::timeout(PUBLISH_WAIT, sent)
            .await
            .map_err(|_| DriverError::Timeout(PUBLISH_WAIT))?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_messages_are_read() {
        assert_eq!(
            parse(b"pod-a#1f2e 9c8d"),
            Some(Heard::Probe {
                pod: "pod-a#1f2e",
                nonce: "9c8d"
            })
        );
        assert_eq!(
            parse(b"pod-a#1f2e bye"),
            Some(Heard::Goodbye { pod: "pod-a#1f2e" })
        );
        assert_eq!(parse(b"no-space"), None);
        assert_eq!(parse(&[0xff, b' ', b'x']), None);
    }
}
