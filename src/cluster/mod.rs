//! Cluster mode: several pods share rooms, broadcasts and live state
//! through Redis (7 or later, for sharded pub/sub).
//!
//! - [`driver`]: the pub/sub driver under the Socket.IO Redis adapter;
//! - [`health`]: the probe that notices a pod that no longer hears Redis;
//! - [`peers`]: the pods a broadcast must reach, learnt from the probes;
//! - [`store`]: seats, presence, sessions and event ids in Redis.

pub mod driver;
pub mod health;
pub mod peers;
pub mod store;
mod tls;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use fred::clients::{Client, SubscriberClient};
use fred::interfaces::ClientLike;
use fred::types::config::TlsConnector;
use fred::types::config::{Config, ReconnectPolicy};
use fred::types::{InfoKind, RespVersion};

use crate::config::redact_url;
use crate::metrics::Metrics;
use driver::{DriverError, PubSubDriver};
use health::{ClusterHealth, Prober};
use peers::Peers;

/// Oldest Redis major version with sharded pub/sub.
const MIN_REDIS_MAJOR: u32 = 7;

/// Pub/sub messages fred keeps for the dispatcher before the oldest are
/// lost. fred's default of 32 overflowed under CPU pressure (a 200-seat
/// burst with the pod short of CPU): events answered 202 never reached
/// this pod's dashboards. The adapter's own streams hold 1,024.
const MESSAGE_BACKLOG: usize = 4096;

/// How long one Redis command may take before it fails.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(2);

/// Longest wait between two reconnection attempts, in milliseconds: a pod
/// back within a second of Redis is heard by the others long before they
/// stop waiting for it ([`peers::FORGET_AFTER_TICKS`]).
const RECONNECT_MAX_DELAY_MS: u32 = 1_000;

/// Why cluster mode could not start.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// The URL is not a Redis URL fred understands.
    #[error("CELLGATE_REDIS_URL {url} is not usable")]
    BadUrl {
        /// The redacted URL.
        url: String,
        /// fred's reason.
        source: fred::error::Error,
    },
    /// Redis did not answer.
    #[error("cannot reach Redis at {url}")]
    Unreachable {
        /// The redacted URL.
        url: String,
        /// fred's reason.
        source: fred::error::Error,
    },
    /// The TLS settings of a `rediss://` URL cannot be used.
    #[error("cannot set up TLS for Redis at {url}: {reason}")]
    Tls {
        /// The redacted URL.
        url: String,
        /// What is wrong (the CA file, the system store).
        reason: String,
    },
    /// Redis is too old for sharded pub/sub.
    #[error(
        "Redis at {url} runs {version}; cluster mode needs Redis {MIN_REDIS_MAJOR} or later \
         (sharded pub/sub)"
    )]
    TooOld {
        /// The redacted URL.
        url: String,
        /// The version Redis reported.
        version: String,
    },
}

/// The Redis connections of a pod in cluster mode.
pub struct Cluster {
    /// Commands for shared state.
    pub commands: Client,
    /// Pub/sub for the Socket.IO adapter and the probe.
    pub driver: PubSubDriver,
    /// The probe's verdict.
    pub health: Arc<ClusterHealth>,
    peers: Arc<Peers>,
    probe_channel: String,
    prober: Option<Prober>,
}

impl Cluster {
    /// Connects both clients and checks the server version. `prefix`
    /// names the cluster's channels; publishes on `everyone` (the adapter's
    /// broadcast channel) must reach every pod.
    pub async fn connect(
        url: &str,
        node_id: &str,
        prefix: &str,
        everyone: String,
        tls_ca_file: Option<&Path>,
        metrics: &Metrics,
    ) -> Result<Self, ClusterError> {
        let shown = redact_url(url);
        let mut config = Config::from_url(url).map_err(|source| ClusterError::BadUrl {
            url: shown.clone(),
            source,
        })?;
        // fred ignores a protocol hint in the URL; RESP3 lets one connection
        // both subscribe and publish.
        config.version = RespVersion::RESP3;
        if config.uses_tls() {
            let tls = tls::client_config(tls_ca_file).map_err(|reason| ClusterError::Tls {
                url: shown.clone(),
                reason,
            })?;
            config.tls = Some(TlsConnector::from(tls).into());
        } else if tls_ca_file.is_some() {
            tracing::warn!(redis = %shown, "CELLGATE_REDIS_CA_FILE is set but the URL is not rediss://; it is not used");
        }

        let builder = || {
            let mut builder = fred::types::Builder::from_config(config.clone());
            builder
                .with_performance_config(|p| {
                    p.default_command_timeout = COMMAND_TIMEOUT;
                    p.broadcast_channel_capacity = MESSAGE_BACKLOG;
                })
                .with_connection_config(|c| c.connection_timeout = COMMAND_TIMEOUT)
                .set_policy(ReconnectPolicy::new_exponential(
                    0,
                    100,
                    RECONNECT_MAX_DELAY_MS,
                    2,
                ));
            builder
        };
        let unreachable = |source: fred::error::Error| {
            // rustls names a refused server certificate InvalidCertificate.
            if config.uses_tls() && source.details().contains("Certificate") {
                return ClusterError::Tls {
                    url: shown.clone(),
                    reason: certificate_advice(source.details()),
                };
            }
            ClusterError::Unreachable {
                url: shown.clone(),
                source,
            }
        };
        let commands = builder().build().map_err(unreachable)?;
        commands.init().await.map_err(unreachable)?;
        check_version(&commands, &shown).await?;

        let subscriber: SubscriberClient =
            builder().build_subscriber_client().map_err(unreachable)?;
        subscriber.init().await.map_err(unreachable)?;
        // The node id need not be unique; the key on the probe channel must.
        let me = format!("{node_id}#{}", uuid::Uuid::new_v4().simple());
        let peers = Arc::new(Peers::new(me));
        let driver = PubSubDriver::new(subscriber, metrics.clone(), peers.clone(), everyone);
        let health = ClusterHealth::new(metrics.clone());

        tracing::info!(redis = %shown, "cluster mode: connected to Redis");
        Ok(Cluster {
            commands,
            driver,
            health,
            peers,
            probe_channel: health::probe_channel(prefix),
            prober: None,
        })
    }

    /// Starts the probe, once the adapter listens: from then on the other
    /// pods count this one in.
    pub async fn start_probe(&mut self) -> Result<(), DriverError> {
        let prober = Prober::start(
            self.driver.clone(),
            self.probe_channel.clone(),
            self.health.clone(),
            self.peers.clone(),
        )
        .await?;
        self.prober = Some(prober);
        Ok(())
    }

    /// Whether Redis answers a command right now.
    pub async fn ping(&self) -> bool {
        self.commands.ping::<String>(None).await.is_ok()
    }

    /// Stops probing and tells the other pods this one is gone: from now on
    /// they no longer count on it to receive their broadcasts. Must come
    /// before the Socket.IO adapter unsubscribes, or their broadcasts reach
    /// a pod fewer than they expect and are answered 503 meanwhile.
    pub async fn leave(&self) {
        if let Some(prober) = &self.prober {
            prober.goodbye().await;
        }
    }

    /// Closes both connections (after [`Cluster::leave`]).
    pub async fn close(&self) {
        let _ = self.driver.client().quit().await;
        let _ = self.commands.quit().await;
    }
}

/// What to tell an operator about a server certificate rustls refused:
/// trusting another CA does not help with a certificate issued for another
/// host name.
fn certificate_advice(details: &str) -> String {
    if details.contains("NotValidForName") {
        format!(
            "the server's certificate is not issued for the host in CELLGATE_REDIS_URL \
             ({details}); use a host name or address the certificate names"
        )
    } else {
        format!(
            "the server's certificate is not trusted ({details}); if a private CA signed \
             it, give its certificate in CELLGATE_REDIS_CA_FILE"
        )
    }
}

async fn check_version(client: &Client, url: &str) -> Result<(), ClusterError> {
    let info: String = client
        .info(Some(InfoKind::Server))
        .await
        .map_err(|source| ClusterError::Unreachable {
            url: url.to_string(),
            source,
        })?;
    let version = info
        .lines()
        .find_map(|line| line.strip_prefix("redis_version:"))
        .unwrap_or("unknown")
        .trim()
        .to_string();
    if major(&version).is_some_and(|m| m >= MIN_REDIS_MAJOR) {
        Ok(())
    } else {
        Err(ClusterError::TooOld {
            url: url.to_string(),
            version,
        })
    }
}

fn major(version: &str) -> Option<u32> {
    version.split('.').next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::major;

    #[test]
    fn major_versions_are_read() {
        assert_eq!(major("7.0.15"), Some(7));
        assert_eq!(major("6.2.14"), Some(6));
        assert_eq!(major("unknown"), None);
    }
}
