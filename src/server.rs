//! Assembling and running the gateway: directory, verifier, Socket.IO,
//! HTTP routes and the metrics listener.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use socketioxide::{ParserConfig, SocketIo};
use socketioxide_redis::{CustomRedisAdapter, RedisAdapterConfig, RedisAdapterCtr};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// The Socket.IO adapter of cluster mode.
type ClusterAdapter<E> = CustomRedisAdapter<E, PubSubDriver>;

use crate::app::{App, AppConfig, AppParts};
use crate::auth::{Jwks, Verifier};
use crate::cluster::Cluster;
use crate::cluster::driver::{PubSubDriver, broadcast_channel};
use crate::cluster::store::RedisLive;
use crate::config::{Profile, ResolvedSettings, redact_url};
use crate::directory::Directory;
use crate::directory::cache::{CacheTimes, DirectoryCache};
use crate::drain::{Connection, Drain, DrainableListener};
use crate::limits::{GuardedListener, Limits};
use crate::live::Live;
use crate::metrics::Metrics;

/// A gateway that is listening.
pub struct Running {
    /// Shared state, for callers that watch it (the demo).
    pub app: App,
    /// Where Socket.IO and the HTTP API listen.
    pub addr: SocketAddr,
    /// Where `/metrics` is served.
    pub metrics_addr: SocketAddr,
    server: JoinHandle<std::io::Result<()>>,
    metrics_server: JoinHandle<std::io::Result<()>>,
    shutdown: tokio::sync::watch::Sender<bool>,
    directory: Directory,
    cluster: Option<Cluster>,
    drain_window: Duration,
}

/// Opens the directory, applying or checking migrations as configured.
///
/// With `tolerate_unreachable` (the gateway itself), a database that does
/// not answer yet is not fatal: the gateway starts not ready, and pending
/// migrations are retried in the background until they apply.
pub async fn open_directory(
    settings: &ResolvedSettings,
    tolerate_unreachable: bool,
) -> anyhow::Result<Directory> {
    let directory = Directory::connect_lazy(&settings.database_url)?;
    let url = redact_url(&settings.database_url);
    let prepared = if settings.auto_migrate {
        directory.migrate().await.map(|_| ())
    } else {
        match directory.pending_migrations().await {
            Ok(0) => Ok(()),
            Ok(n) => {
                bail!("the directory at {url} lacks {n} migration(s): run `cellgate migrate` first")
            }
            Err(error) => Err(error),
        }
    };
    match prepared {
        Ok(()) => Ok(directory),
        Err(error) if tolerate_unreachable && error.is_transient() => {
            tracing::warn!(%error, database = %url, "directory unreachable at start-up; not ready until it answers");
            if settings.auto_migrate {
                tokio::spawn(migrate_when_reachable(directory.clone()));
            }
            Ok(directory)
        }
        Err(error) => Err(error).with_context(|| format!("cannot prepare the directory at {url}")),
    }
}

async fn migrate_when_reachable(directory: Directory) {
    loop {
        tokio::time::sleep(Duration::from_secs(5)).await;
        match directory.migrate().await {
            Ok(_) => {
                tracing::info!("directory reachable; migrations applied");
                return;
            }
            Err(error) if error.is_transient() => {
                tracing::debug!(%error, "directory still unreachable");
            }
            Err(error) => {
                tracing::error!(%error, "cannot apply migrations; fix the database and restart");
                return;
            }
        }
    }
}

/// Builds everything and starts listening.
pub async fn start(settings: ResolvedSettings) -> anyhow::Result<Running> {
    let s = &settings.settings;
    let metrics = Metrics::new();
    let directory = open_directory(&settings, true).await?;
    let jwks = Jwks::from_settings(s, metrics.clone()).context("unusable JWKS settings")?;
    let verifier = Verifier::new(s, settings.key.as_ref(), jwks.clone())
        .context("unusable JWT key settings")?;
    if let Some(jwks) = jwks {
        load_key_set(jwks).await;
    }
    let times = CacheTimes {
        fresh: Duration::from_secs(s.directory_cache_ttl_secs),
        stale: Duration::from_secs(s.directory_stale_secs),
    };
    let cache = DirectoryCache::new(directory.clone(), times, metrics.clone());
    let config = AppConfig {
        node_id: settings.node_id.clone(),
        max_body_bytes: s.max_body_bytes,
        allow_query_token: s.allow_query_token,
        jwt_leeway_secs: s.jwt_leeway_secs,
    };
    let drain = Drain::new();
    let limits = Limits::new(&settings.limits);
    // One payload limit for both transports: a polling body, a WebSocket
    // message (and frame), and the binary attachments of one packet.
    let payload = s.max_socket_payload_bytes;
    let builder = SocketIo::builder()
        .max_payload(payload as u64)
        .ws_max_message_size(payload)
        .ws_max_frame_size(payload)
        .with_parser(ParserConfig::common().max_incoming_binary_buf_size(payload))
        .max_buffer_size(s.socket_queue_packets)
        // A dashboard sends only small packets (joins, claims, pongs); the
        // buffer grows for a larger one. The default 4 KiB, zeroed, is
        // resident for every idle connection.
        .ws_read_buffer_size(WS_READ_BUFFER_BYTES);

    let Some(redis_url) = &s.redis_url else {
        let (layer, io) = builder.build_layer();
        let live = Live::local();
        let broadcaster = Arc::new(io.clone());
        let parts = AppParts {
            config,
            verifier,
            directory: cache,
            metrics,
            broadcaster,
            live,
            cluster_health: None,
            drain,
            limits,
        };
        let app = App::new(parts);
        crate::realtime::register(&io, app.clone());
        let router = with_socket_io(&app, layer);
        return listen(&settings, app, router, directory, None).await;
    };

    let prefix = s.redis_prefix.as_str();
    let everyone = broadcast_channel(prefix, crate::realtime::NAMESPACE);
    let node_id = &settings.node_id;
    let ca_file = s.redis_ca_file.as_deref();
    let mut cluster =
        Cluster::connect(redis_url, node_id, prefix, everyone, ca_file, &metrics).await?;
    let adapter = RedisAdapterCtr::new_with_driver(
        cluster.driver.clone(),
        RedisAdapterConfig::new().with_prefix(prefix.to_string()),
    );
    let (layer, io) = builder
        .with_adapter::<ClusterAdapter<_>>(adapter)
        .build_layer();
    let session_ttl = Duration::from_secs(s.session_ttl_secs);
    let redis = RedisLive::new(cluster.commands.clone(), session_ttl, prefix);
    let live = Live::Shared(redis);
    let broadcaster = Arc::new(io.clone());
    let cluster_health = Some(cluster.health.clone());
    let parts = AppParts {
        config,
        verifier,
        directory: cache,
        metrics,
        broadcaster,
        live,
        cluster_health,
        drain,
        limits,
    };
    let app = App::new(parts);
    crate::realtime::register(&io, app.clone())
        .await
        .context("cannot subscribe to the cluster's channels")?;
    cluster
        .start_probe()
        .await
        .context("cannot subscribe to the cluster's probe channel")?;
    tokio::spawn(keep_sessions_alive(app.clone(), session_ttl / 3));
    let router = with_socket_io(&app, layer);
    listen(&settings, app, router, directory, Some(cluster)).await
}

/// The HTTP routes behind the Socket.IO layer, behind the drain guard (which
/// must see Socket.IO handshakes, so it wraps the Socket.IO layer) and the
/// rewrite of Engine.IO errors to their standard form.
fn with_socket_io<A: socketioxide::adapter::Adapter>(
    app: &App,
    layer: socketioxide::layer::SocketIoLayer<A>,
) -> axum::Router {
    let guard =
        axum::middleware::from_fn_with_state(app.clone(), crate::http::refuse_while_draining);
    let standard = axum::middleware::from_fn(crate::http::standard_engineio_errors);
    let socket_io = axum::middleware::from_fn_with_state(app.clone(), crate::http::guard_socket_io);
    let router = crate::http::router(app.clone())
        .layer(layer)
        .layer(standard)
        .layer(guard)
        .layer(socket_io);
    // Outermost, so that preflight requests are answered before anything.
    match app.limits().origins().cors() {
        Some(cors) => router.layer(cors),
        None => router,
    }
}

/// Refreshes this pod's sessions and presence in Redis every `period` (a
/// third of their TTL) so that they outlive the TTL only while the pod
/// does, and announces the instructors whose pod did not.
async fn keep_sessions_alive(app: App, period: Duration) {
    let mut every = tokio::time::interval(period);
    loop {
        every.tick().await;
        crate::realtime::tend_presence(&app).await;
    }
}

/// Fetches the JWKS once before the gateway takes connections, then keeps
/// it fresh in the background. A failed first fetch is not fatal: the
/// refresher tries again every cooldown, and tokens wait for a key.
async fn load_key_set(jwks: Arc<Jwks>) {
    match jwks.refresh().await {
        Ok(keys) => tracing::debug!(keys, "key set ready"),
        Err(error) => tracing::error!(%error, "cannot load the JWKS at start-up; retrying"),
    }
    tokio::spawn(jwks.run());
}

/// Initial WebSocket read buffer of each connection (see `start`).
const WS_READ_BUFFER_BYTES: usize = 1024;

/// How often `cellgate_open_help_requests` is read from the directory.
const HELP_GAUGE_EVERY: Duration = Duration::from_secs(10);

/// Keeps `cellgate_open_help_requests` current. The directory is the truth
/// (shared by every pod), so the gauge is read from it, not counted here.
async fn count_open_help_requests(app: App) {
    let mut every = tokio::time::interval(HELP_GAUGE_EVERY);
    loop {
        every.tick().await;
        match app.directory().directory().open_help_count().await {
            Ok(open) => app.metrics().help_requests_open.set(open),
            Err(error) => tracing::debug!(%error, "cannot count open help requests"),
        }
    }
}

async fn listen(
    settings: &ResolvedSettings,
    app: App,
    router: axum::Router,
    directory: Directory,
    cluster: Option<Cluster>,
) -> anyhow::Result<Running> {
    let s = &settings.settings;
    let listener = TcpListener::bind(s.listen_addr)
        .await
        .with_context(|| format!("cannot listen on {} (CELLGATE_LISTEN_ADDR)", s.listen_addr))?;
    let metrics_listener = TcpListener::bind(s.metrics_addr).await.with_context(|| {
        format!(
            "cannot listen on {} (CELLGATE_METRICS_ADDR)",
            s.metrics_addr
        )
    })?;
    let addr = listener.local_addr()?;
    let metrics_addr = metrics_listener.local_addr()?;

    let (shutdown, watch) = tokio::sync::watch::channel(false);
    let listener = GuardedListener::new(
        DrainableListener::new(listener, app.drain().clone()),
        s.max_socket_payload_bytes as u64,
        app.metrics()
            .socket_payloads_too_large
            .with_label_values(&["websocket"]),
        app.limits().connections().clone(),
    );
    let socket_limits = &app.metrics().socket_limits;
    socket_limits
        .with_label_values(&["pod"])
        .set(i64::from(s.max_sockets));
    socket_limits
        .with_label_values(&["instructor"])
        .set(i64::from(s.max_sockets_per_instructor));
    tokio::spawn(app.limits().clone().maintain(app.metrics().clone()));
    let server = tokio::spawn(serve_app_until(listener, router, watch.clone()));
    tokio::spawn(count_open_help_requests(app.clone()));
    let metrics_router = crate::http::metrics_router(app.clone());
    let metrics_server = tokio::spawn(serve_until(metrics_listener, metrics_router, watch));

    announce(settings, addr, metrics_addr);
    Ok(Running {
        app,
        addr,
        metrics_addr,
        server,
        metrics_server,
        shutdown,
        directory,
        cluster,
        drain_window: Duration::from_secs(s.drain_secs),
    })
}

fn announce(settings: &ResolvedSettings, addr: SocketAddr, metrics_addr: SocketAddr) {
    let profile = settings.settings.profile;
    if profile == Profile::Dev {
        tracing::warn!(
            "DEVELOPMENT MODE: embedded defaults in use; not for production \
             (set CELLGATE_PROFILE=production)"
        );
        for note in &settings.notes {
            tracing::warn!("{note}");
        }
    } else {
        for note in &settings.notes {
            tracing::warn!("{note}");
        }
    }
    tracing::info!(
        %addr,
        %metrics_addr,
        node = %settings.node_id,
        %profile,
        database = %redact_url(&settings.database_url),
        "cellgate listening"
    );
}

async fn serve_until<L>(
    listener: L,
    router: axum::Router,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> std::io::Result<()>
where
    L: axum::serve::Listener,
    L::Addr: std::fmt::Debug,
{
    let signal = async move {
        let _ = stop.wait_for(|stopped| *stopped).await;
    };
    axum::serve(listener, router)
        .with_graceful_shutdown(signal)
        .await
}

/// Like [`serve_until`] for the app listener, whose requests know their
/// connection (the drain closes those that carry Socket.IO).
async fn serve_app_until(
    listener: GuardedListener<DrainableListener>,
    router: axum::Router,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> std::io::Result<()> {
    let signal = async move {
        let _ = stop.wait_for(|stopped| *stopped).await;
    };
    let service = router.into_make_service_with_connect_info::<Connection>();
    axum::serve(listener, service)
        .with_graceful_shutdown(signal)
        .await
}

impl Running {
    /// Runs until `signal` completes, then stops gracefully.
    pub async fn run_until(self, signal: impl Future<Output = ()>) -> anyhow::Result<()> {
        signal.await;
        self.drain().await;
        self.stop().await
    }

    /// Turns not ready, refuses new dashboards and closes the open
    /// connections at random moments over the drain window, so that
    /// dashboards reconnect to other pods a few at a time.
    pub async fn drain(&self) {
        let window = self.drain_window;
        let scheduled = self.app.drain().start(window);
        tracing::info!(
            connections = scheduled,
            window_secs = window.as_secs_f64(),
            "draining"
        );
        // Over when the window is, or as soon as no dashboard is left (a
        // pod with none need not wait the window out).
        let ends = tokio::time::Instant::now() + window;
        while tokio::time::Instant::now() < ends && self.app.drain().open_realtime() > 0 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tracing::info!(
            left = self.app.drain().open_connections(),
            "drain over; shutting down"
        );
    }

    /// Stops listening, lets in-flight requests finish, closes the directory.
    pub async fn stop(self) -> anyhow::Result<()> {
        let _ = self.shutdown.send(true);
        // Socket.IO connections would hold the HTTP server open: the ones
        // the drain left are cut now. Requests in flight on the others
        // finish while Socket.IO and its adapter still work, so that an event
        // accepted at the last moment is broadcast and answered 202 (closing
        // Socket.IO first closed the adapter under them: 503).
        self.app.drain().close_realtime();
        let grace = Duration::from_secs(5);
        let _ = tokio::time::timeout(grace, self.server).await;
        // The other pods stop counting on this one before its adapter
        // unsubscribes.
        if let Some(cluster) = &self.cluster {
            cluster.leave().await;
        }
        // Sessions whose transport is gone but not yet timed out, and the
        // adapter.
        self.app.close_sockets().await;
        let _ = tokio::time::timeout(grace, self.metrics_server).await;
        self.directory.close().await;
        if let Some(cluster) = &self.cluster {
            cluster.close().await;
        }
        Ok(())
    }
}

/// Completes on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                term.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}
