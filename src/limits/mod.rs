//! The gateway's limits, each a `CELLGATE_*` setting with a metric:
//!
//! | limit | answer |
//! |---|---|
//! | handshakes per client address | `connect_error` `rate_limited` |
//! | ingest requests per student token | `429` with `Retry-After` |
//! | Socket.IO payload (polling body, WebSocket message) | polling `413`, the connection closed either way |
//! | dashboards per instructor, per pod | `connect_error` `too_many_connections`, `server_full` |
//! | outgoing queue per dashboard | the slow dashboard is disconnected |
//!
//! and the browser origins allowed ([`origin`]). The client address is the
//! TCP peer unless the peer is a trusted proxy ([`client_addr`]).

pub mod client_addr;
pub mod conn;
pub mod origin;
pub mod rate;
pub mod sockets;

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use axum::extract::ConnectInfo;

pub use client_addr::TrustedProxies;
pub use conn::{ConnState, Connections, GuardedListener};
pub use origin::AllowedOrigins;
pub use rate::RetryAfter;
pub use sockets::{SocketCounts, SocketLimit, SocketSlot};

use crate::drain::Connection;
use crate::metrics::Metrics;
use rate::KeyedRate;

/// How often rate-limit keys with a full budget again are dropped.
const PRUNE_EVERY: Duration = Duration::from_secs(10);

/// How long a dashboard found too slow stays marked: past its disconnect,
/// since broadcasts already under way may still find its queue full (sids
/// are never reused, so a late mark harms nobody).
const SLOW_MARK_TTL: Duration = Duration::from_secs(60);

/// The limit settings, as resolved from `CELLGATE_*`.
#[derive(Debug, Clone)]
pub struct LimitSettings {
    /// Handshakes per minute per client address (0: off).
    pub handshakes_per_minute: u32,
    /// Handshakes one address may start at once.
    pub handshake_burst: u32,
    /// Ingest requests per minute per student token (0: off).
    pub ingest_per_minute: u32,
    /// Ingest requests one token may send at once.
    pub ingest_burst: u32,
    /// Dashboards one instructor may have on this pod.
    pub max_sockets_per_instructor: usize,
    /// Dashboards this pod holds at most.
    pub max_sockets: usize,
    /// Proxies whose `X-Forwarded-For` is believed.
    pub trusted_proxies: TrustedProxies,
    /// Browser origins allowed.
    pub origins: AllowedOrigins,
}

/// Every limit's state; one per gateway.
pub struct Limits {
    handshakes: KeyedRate<IpAddr>,
    ingest: KeyedRate<u64>,
    sockets: Arc<SocketCounts>,
    trusted: TrustedProxies,
    origins: AllowedOrigins,
    transports: Transports,
    connections: Arc<Connections>,
    /// Keys ingest budgets by a hash of the token, not the token itself.
    token_hasher: RandomState,
}

impl Limits {
    /// Fresh limits.
    pub fn new(settings: &LimitSettings) -> Arc<Self> {
        Arc::new(Limits {
            handshakes: KeyedRate::new(settings.handshakes_per_minute, settings.handshake_burst),
            ingest: KeyedRate::new(settings.ingest_per_minute, settings.ingest_burst),
            sockets: SocketCounts::new(settings.max_sockets_per_instructor, settings.max_sockets),
            trusted: settings.trusted_proxies.clone(),
            origins: settings.origins.clone(),
            transports: Transports::default(),
            connections: Arc::new(Connections::default()),
            token_hasher: RandomState::new(),
        })
    }

    /// The client address of a request: its peer, or what trusted proxies
    /// say in `X-Forwarded-For`. `None` when the request did not come
    /// through the gateway's listener (tests that call the router alone).
    pub fn client_addr(&self, parts: &http::request::Parts) -> Option<IpAddr> {
        let connection = parts.extensions.get::<ConnectInfo<Connection>>()?;
        Some(
            self.trusted
                .client(connection.0.remote.ip(), &parts.headers),
        )
    }

    /// The connection a request arrived on, from its extensions.
    pub fn connection_of(&self, extensions: &http::Extensions) -> Option<Arc<ConnState>> {
        let connection = extensions.get::<ConnectInfo<Connection>>()?;
        self.connections.get(connection.0.remote)
    }

    /// The open connections of the app listener ([`GuardedListener`]).
    pub fn connections(&self) -> &Arc<Connections> {
        &self.connections
    }

    /// Spends one handshake of `client`'s budget.
    pub fn handshake(&self, client: IpAddr) -> Result<(), RetryAfter> {
        self.handshakes.check(&client_addr::rate_key(client))
    }

    /// Spends one ingest request of `token`'s budget.
    pub fn ingest(&self, token: &str) -> Result<(), RetryAfter> {
        self.ingest.check(&self.token_hasher.hash_one(token))
    }

    /// Dashboards on this pod.
    pub fn sockets(&self) -> &Arc<SocketCounts> {
        &self.sockets
    }

    /// Browser origins allowed.
    pub fn origins(&self) -> &AllowedOrigins {
        &self.origins
    }

    /// Which connection carries each WebSocket dashboard.
    pub fn transports(&self) -> &Transports {
        &self.transports
    }

    /// Drops what the limits no longer need, every few seconds, and keeps
    /// the key gauges current.
    pub async fn maintain(self: Arc<Self>, metrics: Metrics) {
        let mut every = tokio::time::interval(PRUNE_EVERY);
        loop {
            every.tick().await;
            let handshake_keys = self.handshakes.prune();
            let ingest_keys = self.ingest.prune();
            self.transports.prune();
            let keys = &metrics.rate_limit_keys;
            keys.with_label_values(&["handshake"])
                .set(handshake_keys as i64);
            keys.with_label_values(&["ingest"]).set(ingest_keys as i64);
        }
    }
}

/// Which connection carries each WebSocket dashboard (so that a dashboard
/// too slow to take a disconnect can still be closed), and which were
/// found too slow already (counted once each).
#[derive(Default)]
pub struct Transports {
    by_sid: Mutex<HashMap<String, Weak<ConnState>>>,
    slow: Mutex<HashMap<String, Instant>>,
}

impl Transports {
    /// Socket `sid` speaks WebSocket on `conn`, unless another open
    /// connection already claimed it (an upgrade is sent once per socket;
    /// an upgrade request naming someone else's sid is refused by
    /// Engine.IO and must not take the entry).
    pub fn register(&self, sid: &str, conn: &Arc<ConnState>) {
        let mut by_sid = self.by_sid.lock().expect("transports lock");
        let taken = by_sid
            .get(sid)
            .is_some_and(|held| held.strong_count() > 0 && !held.ptr_eq(&Arc::downgrade(conn)));
        if !taken {
            by_sid.insert(sid.to_string(), Arc::downgrade(conn));
        }
    }

    /// Socket `sid` is gone.
    pub fn forget(&self, sid: &str) {
        self.by_sid.lock().expect("transports lock").remove(sid);
    }

    /// Marks `sid` too slow; `true` the first time.
    pub fn mark_slow(&self, sid: &str) -> bool {
        let mut slow = self.slow.lock().expect("transports lock");
        if slow.contains_key(sid) {
            return false;
        }
        slow.insert(sid.to_string(), Instant::now());
        true
    }

    /// Closes the connection of socket `sid`; `false` when it has none
    /// known (polling) or it is gone.
    pub fn kill(&self, sid: &str) -> bool {
        let conn = self
            .by_sid
            .lock()
            .expect("transports lock")
            .get(sid)
            .and_then(Weak::upgrade);
        match conn {
            Some(conn) => {
                conn.kill();
                true
            }
            None => false,
        }
    }

    /// Forgets connections that are closed (upgrades with a made-up sid
    /// leave such entries).
    pub fn prune(&self) {
        self.by_sid
            .lock()
            .expect("transports lock")
            .retain(|_, conn| conn.strong_count() > 0);
        self.slow
            .lock()
            .expect("transports lock")
            .retain(|_, at| at.elapsed() < SLOW_MARK_TTL);
    }

    /// Entries held now.
    pub fn len(&self) -> usize {
        self.by_sid.lock().expect("transports lock").len()
    }

    /// Whether no entry is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slow_dashboard_is_counted_once_even_after_it_left() {
        let transports = Transports::default();
        assert!(transports.mark_slow("sid-1"));
        transports.forget("sid-1");
        assert!(
            !transports.mark_slow("sid-1"),
            "a broadcast under way at its disconnect finds it full again"
        );
        assert!(transports.mark_slow("sid-2"));
    }

    #[test]
    fn an_unknown_or_closed_connection_cannot_be_killed() {
        let transports = Transports::default();
        assert!(!transports.kill("nobody"));
        assert!(transports.is_empty());
    }
}
