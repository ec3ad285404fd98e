//! Deaf-pod detection: a pod can be connected to Redis and still receive
//! nothing (its subscriptions were lost in a restart or failover). A probe
//! message sent through the very pub/sub path the adapter uses tells.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use socketioxide_redis::drivers::Driver;

use super::driver::PubSubDriver;
use crate::metrics::Metrics;

/// Time between probes.
const PROBE_EVERY: Duration = Duration::from_secs(1);
/// How long a probe may take to come back.
const PROBE_WAIT: Duration = Duration::from_millis(800);
/// Missed probes in a row before the pod declares itself unhealthy.
const MISSES_TO_FAIL: u32 = 2;

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

/// Probes forever: publish a nonce on this pod's probe channel and wait for
/// it to come back through the subscription.
pub async fn probe(driver: PubSubDriver, health: Arc<ClusterHealth>, node_id: String) {
    let channel = format!("cellgate-probe#{node_id}#{}", uuid::Uuid::new_v4().simple());
    let mut misses = 0u32;
    let mut stream = None;
    let mut every = tokio::time::interval(PROBE_EVERY);
    loop {
        every.tick().await;
        if stream.is_none() {
            stream = driver.subscribe(channel.clone(), 16).await.ok();
        }
        let heard = match stream.as_mut() {
            Some(stream) => round_trip(&driver, &channel, stream).await,
            None => false,
        };
        misses = if heard { 0 } else { misses + 1 };
        if heard {
            health.set(true);
        } else if misses >= MISSES_TO_FAIL {
            health.set(false);
        }
    }
}

async fn round_trip<S>(driver: &PubSubDriver, channel: &str, stream: &mut S) -> bool
where
    S: futures_util::Stream<Item = (String, Vec<u8>)> + Unpin,
{
    let nonce = uuid::Uuid::new_v4().simple().to_string();
    let sent = driver.publish_uncounted(channel.to_string(), nonce.clone().into_bytes());
    if sent.await.is_err() {
        return false;
    }
    let wait = async {
        while let Some((_, data)) = stream.next().await {
            if data == nonce.as_bytes() {
                return true;
            }
        }
        false
    };
    tokio::time::timeout(PROBE_WAIT, wait)
        .await
        .unwrap_or(false)
}
