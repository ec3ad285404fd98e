//! The pub/sub driver under socketioxide-redis, on fred's subscriber client.
//!
//! It differs from the driver shipped with socketioxide-redis in three
//! ways, each found on this machine (see the issue on cluster mode):
//!
//! - every publish has a timeout, so a broadcast fails fast during an
//!   outage instead of hanging until Redis returns;
//! - a message that cannot be handed to the adapter is counted in
//!   `cellgate_cluster_messages_dropped_total` and logged, never dropped
//!   silently;
//! - after fred reconnects, the shard channels are subscribed again here.
//!   fred's own `resubscribe_all` first sends a SUBSCRIBE with no channel,
//!   which Redis refuses, so it never reaches the SSUBSCRIBE and the pod
//!   would stay deaf. (Upstream fix: skip empty channel lists there.)
//!
//! And a broadcast to every pod fails unless Redis handed it to as many
//! subscribers as there are pods ([`Peers::expected`]): a pod that lost its
//! subscriptions is not counted by Redis, and the event must not be
//! acknowledged while its dashboards cannot get it (the cluster suite's
//! `redis-outage.test.mjs` cuts one pod off to check this).

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use fred::clients::SubscriberClient;
use fred::interfaces::{EventInterface, PubsubInterface};
use socketioxide_redis::drivers::{ChanItem, Driver, MessageStream};
use tokio::sync::mpsc;

use super::peers::Peers;
use crate::metrics::Metrics;

/// How long a publish may take before it counts as failed.
pub const PUBLISH_TIMEOUT: Duration = Duration::from_millis(1500);

/// A pub/sub failure.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    /// Redis refused or the connection failed.
    #[error("redis: {0}")]
    Redis(#[from] fred::error::Error),
    /// Redis did not answer in time.
    #[error("redis did not answer within {0:?}")]
    Timeout(Duration),
    /// Fewer pods got a broadcast than are in the cluster.
    #[error("{receivers} of {expected} pods got the broadcast")]
    Unheard {
        /// Subscribers Redis handed it to.
        receivers: usize,
        /// Pods in the cluster, this one included.
        expected: usize,
    },
}

type Handlers = RwLock<HashMap<String, mpsc::Sender<ChanItem>>>;

/// The adapter's channel for broadcasts to every pod of namespace `ns`
/// (socketioxide-redis names it `{prefix}-request#{namespace}#`; every
/// pod's adapter subscribes to it).
pub fn broadcast_channel(prefix: &str, ns: &str) -> String {
    format!("{prefix}-request#{ns}#")
}

/// Sharded pub/sub for the Socket.IO adapter and the health probe.
#[derive(Clone)]
pub struct PubSubDriver {
    client: SubscriberClient,
    handlers: Arc<Handlers>,
    metrics: Metrics,
    peers: Arc<Peers>,
    /// Publishes here must reach every pod.
    everyone: Arc<str>,
}

impl PubSubDriver {
    /// Starts delivering messages and re-subscribing after reconnects.
    /// Publishes on `everyone` must reach every pod in `peers`.
    pub fn new(
        client: SubscriberClient,
        metrics: Metrics,
        peers: Arc<Peers>,
        everyone: String,
    ) -> Self {
        let handlers = Arc::new(Handlers::default());
        tokio::spawn(dispatch(client.clone(), handlers.clone(), metrics.clone()));
        tokio::spawn(resubscribe_on_reconnect(client.clone()));
        PubSubDriver {
            client,
            handlers,
            metrics,
            peers,
            everyone: everyone.into(),
        }
    }

    /// Publishes with the timeout but without counting a failure (the
    /// health probe has its own verdict).
    pub async fn publish_uncounted(&self, chan: String, val: Vec<u8>) -> Result<(), DriverError> {
        self.publish_to(chan, val).await.map(|_receivers| ())
    }

    /// Publishes with the timeout; returns how many subscribers got it.
    async fn publish_to(&self, chan: String, val: Vec<u8>) -> Result<usize, DriverError> {
        let sent = self.client.spublish::<i64, _, _>(chan, val);
        match tokio::time::timeout(PUBLISH_TIMEOUT, sent).await {
            Ok(Ok(receivers)) => Ok(usize::try_from(receivers).unwrap_or(0)),
            Ok(Err(e)) => Err(DriverError::Redis(e)),
            Err(_) => Err(DriverError::Timeout(PUBLISH_TIMEOUT)),
        }
    }

    /// The underlying client, for shutdown.
    pub fn client(&self) -> &SubscriberClient {
        &self.client
    }
}

impl Driver for PubSubDriver {
    type Error = DriverError;

    async fn publish(&self, chan: String, val: Vec<u8>) -> Result<(), Self::Error> {
        let to_everyone = *chan == *self.everyone;
        let result = match self.publish_to(chan, val).await {
            Ok(receivers) if to_everyone && receivers < self.peers.expected() => {
                Err(DriverError::Unheard {
                    receivers,
                    expected: self.peers.expected(),
                })
            }
            Ok(_) => Ok(()),
            Err(error) => Err(error),
        };
        if let Err(error) = &result {
            self.metrics.cluster_publish_errors.inc();
            tracing::warn!(%error, "cluster publish failed");
        }
        result
    }

    async fn subscribe(
        &self,
        chan: String,
        size: usize,
    ) -> Result<MessageStream<ChanItem>, Self::Error> {
        let (tx, rx) = mpsc::channel(size);
        self.handlers
            .write()
            .expect("handlers lock")
            .insert(chan.clone(), tx);
        self.client.ssubscribe(chan).await?;
        Ok(MessageStream::new(rx))
    }

    async fn unsubscribe(&self, chan: String) -> Result<(), Self::Error> {
        self.handlers.write().expect("handlers lock").remove(&chan);
        self.client.sunsubscribe(chan).await?;
        Ok(())
    }

    async fn num_serv(&self, chan: &str) -> Result<u16, Self::Error> {
        let (_, count): (String, u16) = self.client.pubsub_shardnumsub(chan).await?;
        Ok(count)
    }
}

/// Hands each incoming message to the handler of its channel.
async fn dispatch(client: SubscriberClient, handlers: Arc<Handlers>, metrics: Metrics) {
    let mut messages = client.message_rx();
    loop {
        let message = match messages.recv().await {
            Ok(message) => message,
            Err(tokio::sync::broadcast::error::RecvError::Lagged(missed)) => {
                metrics.cluster_messages_dropped.inc_by(missed);
                tracing::warn!(
                    missed,
                    "cluster messages dropped: the dispatcher fell behind"
                );
                continue;
            }
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
        };
        let channel = message.channel.to_string();
        let Some(data) = message.value.into_owned_bytes() else {
            continue;
        };
        let handler = handlers
            .read()
            .expect("handlers lock")
            .get(&channel)
            .cloned();
        let Some(handler) = handler else { continue };
        if let Err(error) = handler.try_send((channel.clone(), data)) {
            metrics.cluster_messages_dropped.inc();
            tracing::warn!(channel, %error, "cluster message dropped: its handler is full or gone");
        }
    }
}

/// Subscribes every tracked shard channel again after each reconnect.
async fn resubscribe_on_reconnect(client: SubscriberClient) {
    let mut reconnects = client.reconnect_rx();
    while reconnects.recv().await.is_ok() {
        let channels: Vec<String> = client
            .tracked_shard_channels()
            .into_iter()
            .map(|c| c.to_string())
            .collect();
        let mut failed = 0;
        for channel in &channels {
            if let Err(error) = client.ssubscribe(channel.as_str()).await {
                failed += 1;
                tracing::warn!(channel, %error, "cannot subscribe again after reconnect");
            }
        }
        tracing::info!(
            channels = channels.len(),
            failed,
            "redis reconnected; shard channels subscribed again"
        );
    }
}
