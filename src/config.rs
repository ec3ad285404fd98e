//! Typed settings: defaults, then an optional TOML file, then `CELLGATE_*`
//! environment variables, then command-line flags (the last one wins).
//!
//! [`Settings::resolve`] turns what the operator wrote into a
//! [`ResolvedSettings`]: in development it fills the gaps with the embedded
//! default (a SQLite directory and a signing secret kept under the data
//! directory); in production it refuses to start and names every missing
//! setting at once.

use std::fmt;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use crate::limits::{AllowedOrigins, LimitSettings, TrustedProxies};
use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

/// The environment variable prefix shared by every setting.
pub const ENV_PREFIX: &str = "CELLGATE_";

/// `CELLGATE_*` variables that the command line reads itself (`--config`),
/// not settings.
const COMMAND_LINE_ONLY: [&str; 1] = ["config"];

/// File name of the development signing secret inside the data directory.
const DEV_SECRET_FILE: &str = "dev-jwt-secret";

/// File name of the development SQLite directory inside the data directory.
const DEV_DATABASE_FILE: &str = "cellgate.db";

/// Shortest session TTL: entries are refreshed every third of it, and a
/// refresh needs a moment of its own.
const MIN_SESSION_TTL_SECS: u64 = 3;

/// Smallest Socket.IO payload limit: the CONNECT packet carries the token.
const MIN_SOCKET_PAYLOAD_BYTES: usize = 4096;

/// Smallest outgoing queue: a join answer and a burst of events must fit.
const MIN_SOCKET_QUEUE_PACKETS: usize = 16;

/// Which safety rules apply at start-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Profile {
    /// Missing settings are filled with the embedded default.
    #[default]
    Dev,
    /// Every required setting must be given; nothing is invented.
    Production,
}

impl fmt::Display for Profile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Profile::Dev => "dev",
            Profile::Production => "production",
        })
    }
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Text in development, JSON lines in production.
    #[default]
    Auto,
    /// Human-readable text.
    Text,
    /// One JSON object per line.
    Json,
}

/// Every setting, as the operator gave it.
///
/// Field names are the TOML keys; the environment variable is the field
/// name in upper case behind [`ENV_PREFIX`] (`listen_addr` is
/// `CELLGATE_LISTEN_ADDR`).
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// `dev` (embedded defaults) or `production` (strict).
    pub profile: Profile,
    /// Address of the Socket.IO and HTTP API listener.
    pub listen_addr: SocketAddr,
    /// Address of the Prometheus `/metrics` listener.
    pub metrics_addr: SocketAddr,
    /// Where development files live (SQLite directory, dev signing secret).
    pub data_dir: PathBuf,
    /// `postgres://…` or `sqlite://…`; the instructor directory and help queue.
    pub database_url: Option<String>,
    /// Shared secret for HS256/HS384/HS512 tokens; `cellgate token` signs with it.
    pub jwt_secret: Option<String>,
    /// Older HMAC secrets still accepted while tokens they signed are in use
    /// (rotation). Never used to sign.
    pub jwt_previous_secrets: Vec<String>,
    /// Key id of `jwt_secret` or of the public key: tokens that carry a `kid`
    /// are checked with the key of that id only.
    pub jwt_key_id: Option<String>,
    /// JWKS URL whose signing keys are accepted, refreshed in the background.
    pub jwks_url: Option<String>,
    /// How often the JWKS is fetched again, in seconds.
    pub jwks_refresh_secs: u64,
    /// Shortest time between two fetches caused by unknown key ids, in seconds.
    pub jwks_cooldown_secs: u64,
    /// PEM public key for RS*, PS256, ES256/384 or EdDSA tokens.
    pub jwt_public_key_file: Option<PathBuf>,
    /// Accepted algorithms, e.g. `["RS256"]`; by default every algorithm of the key's kind.
    pub jwt_algorithms: Option<Vec<String>>,
    /// Expected `iss` claim, checked when set.
    pub jwt_issuer: Option<String>,
    /// Expected `aud` claim, checked when set.
    pub jwt_audience: Option<String>,
    /// Clock leeway for `exp`, `nbf` and `iat`, in seconds.
    pub jwt_leeway_secs: u64,
    /// Accept `?token=` on the dashboard handshake (off: URLs end up in access logs).
    pub allow_query_token: bool,
    /// How long a directory lookup is reused, in seconds.
    pub directory_cache_ttl_secs: u64,
    /// While the database does not answer, lookups it answered this many
    /// seconds ago or less still stand (0: refuse at once).
    pub directory_stale_secs: u64,
    /// Seats in a classroom created without `--seats`.
    pub default_seats: u32,
    /// Largest accepted `POST /api/v1/events` body, in bytes.
    pub max_body_bytes: usize,
    /// Redis URL; turns on cluster mode (several pods).
    pub redis_url: Option<String>,
    /// PEM file of certificate authorities trusted for `rediss://`, besides
    /// the system's (a managed Redis with a private CA).
    pub redis_ca_file: Option<PathBuf>,
    /// This pod's name in `connection_accepted.node`; defaults to the host name.
    pub node_id: Option<String>,
    /// `auto`, `text` or `json`.
    pub log_format: LogFormat,
    /// Apply pending migrations at start-up (default: on in dev, off in production).
    pub auto_migrate: Option<bool>,
    /// On SIGTERM, connections are closed at random moments within this many seconds.
    pub drain_secs: u64,
    /// Cluster mode: how long a dashboard's session and presence entries
    /// outlive their pod in Redis, in seconds (refreshed every third of it).
    pub session_ttl_secs: u64,
    /// Cluster mode: prefix of every Redis key and pub/sub channel; the pods
    /// with the same prefix on one Redis form one cluster.
    pub redis_prefix: String,
    /// Dashboard handshakes one client address may start per minute
    /// (0: no limit); beyond it, `rate_limited`.
    pub handshakes_per_minute: u32,
    /// Handshakes one client address may start at once, within that rate.
    pub handshake_burst: u32,
    /// `POST /api/v1/events` requests one student token may send per
    /// minute (0: no limit); beyond it, 429 with `Retry-After`.
    pub ingest_per_minute: u32,
    /// Ingest requests one student token may send at once, within that rate.
    pub ingest_burst: u32,
    /// Largest Socket.IO payload a dashboard may send, in bytes: a polling
    /// request body and a WebSocket message alike.
    pub max_socket_payload_bytes: usize,
    /// Dashboards one instructor may have connected to this pod.
    pub max_sockets_per_instructor: u32,
    /// Dashboards this pod holds at most.
    pub max_sockets: u32,
    /// Packets queued for one dashboard at most; a dashboard too slow to
    /// take them is disconnected.
    pub socket_queue_packets: usize,
    /// Browser origins allowed (CORS and the Socket.IO `Origin` check):
    /// `["*"]`, a list of `scheme://host[:port]`, or `[]` for the gateway's
    /// own origin only. Default: `["*"]` in dev, `[]` in production.
    #[serde(default, deserialize_with = "list_or_commas")]
    pub allowed_origins: Option<Vec<String>>,
    /// Proxies (addresses or networks) whose `X-Forwarded-For` is believed
    /// for the client address; nobody's by default.
    #[serde(deserialize_with = "list_or_commas_required")]
    pub trusted_proxies: Vec<String>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            profile: Profile::Dev,
            listen_addr: SocketAddr::from(([127, 0, 0, 1], 3000)),
            metrics_addr: SocketAddr::from(([127, 0, 0, 1], 9091)),
            data_dir: PathBuf::from(".cellgate"),
            database_url: None,
            jwt_secret: None,
            jwt_previous_secrets: Vec::new(),
            jwt_key_id: None,
            jwks_url: None,
            jwks_refresh_secs: 300,
            jwks_cooldown_secs: 30,
            jwt_public_key_file: None,
            jwt_algorithms: None,
            jwt_issuer: None,
            jwt_audience: None,
            jwt_leeway_secs: 30,
            allow_query_token: false,
            directory_cache_ttl_secs: 30,
            directory_stale_secs: 300,
            default_seats: 200,
            max_body_bytes: 512 * 1024,
            redis_url: None,
            redis_ca_file: None,
            node_id: None,
            log_format: LogFormat::Auto,
            auto_migrate: None,
            drain_secs: 10,
            session_ttl_secs: 30,
            redis_prefix: "cellgate".to_string(),
            handshakes_per_minute: 120,
            handshake_burst: 60,
            ingest_per_minute: 600,
            ingest_burst: 120,
            max_socket_payload_bytes: 64 * 1024,
            max_sockets_per_instructor: 20,
            max_sockets: 10_000,
            socket_queue_packets: 4096,
            allowed_origins: None,
            trusted_proxies: Vec::new(),
        }
    }
}

impl fmt::Debug for Settings {
    // Written by hand so that the secret can never reach a log line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Settings")
            .field("profile", &self.profile)
            .field("listen_addr", &self.listen_addr)
            .field("metrics_addr", &self.metrics_addr)
            .field("data_dir", &self.data_dir)
            .field(
                "database_url",
                &self.database_url.as_deref().map(redact_url),
            )
            .field(
                "jwt_secret",
                &self.jwt_secret.as_ref().map(|_| "<redacted>"),
            )
            .field(
                "jwt_previous_secrets",
                &format_args!("<{} redacted>", self.jwt_previous_secrets.len()),
            )
            .field("jwt_key_id", &self.jwt_key_id)
            .field("jwks_url", &self.jwks_url.as_deref().map(redact_url))
            .field("jwt_public_key_file", &self.jwt_public_key_file)
            .field("jwt_issuer", &self.jwt_issuer)
            .field("jwt_audience", &self.jwt_audience)
            .field("jwt_leeway_secs", &self.jwt_leeway_secs)
            .field("redis_url", &self.redis_url.as_deref().map(redact_url))
            .field("allowed_origins", &self.allowed_origins)
            .field("trusted_proxies", &self.trusted_proxies)
            .finish_non_exhaustive()
    }
}

/// Start-up problems, all of them, so the operator fixes them in one go.
#[derive(Debug, thiserror::Error)]
#[error("cellgate cannot start:\n{}", .problems.iter().map(|p| format!("  - {p}")).collect::<Vec<_>>().join("\n"))]
pub struct ConfigError {
    /// One line per problem.
    pub problems: Vec<String>,
}

impl ConfigError {
    fn single(problem: impl Into<String>) -> Self {
        ConfigError {
            problems: vec![problem.into()],
        }
    }
}

/// Where the JWT verification key comes from.
#[derive(Clone, PartialEq, Eq)]
pub enum KeySource {
    /// An HMAC secret.
    Secret(String),
    /// A PEM public key file.
    PublicKeyFile(PathBuf),
}

impl fmt::Debug for KeySource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeySource::Secret(_) => f.write_str("Secret(<redacted>)"),
            KeySource::PublicKeyFile(path) => f.debug_tuple("PublicKeyFile").field(path).finish(),
        }
    }
}

/// Settings after defaults and profile rules were applied: what the
/// gateway actually runs with.
#[derive(Clone, Debug)]
pub struct ResolvedSettings {
    /// The settings as given.
    pub settings: Settings,
    /// The directory database URL.
    pub database_url: String,
    /// The configured verification key (none when only a JWKS URL is set).
    pub key: Option<KeySource>,
    /// Whether to apply migrations at start-up.
    pub auto_migrate: bool,
    /// This pod's name.
    pub node_id: String,
    /// Notes for the start-up log (development defaults that were used).
    pub notes: Vec<String>,
    /// The limits, parsed.
    pub limits: LimitSettings,
}

impl Settings {
    /// Loads settings: defaults, then `config_file`, then the process
    /// environment, then `overrides` (command-line flags).
    pub fn load(config_file: Option<&Path>, overrides: &Overrides) -> Result<Self, ConfigError> {
        Self::from_figment(
            Self::figment(config_file).merge(Env::prefixed(ENV_PREFIX).ignore(&COMMAND_LINE_ONLY)),
            overrides,
        )
    }

    /// Like [`Settings::load`], but environment variables come from `env`
    /// instead of the process (for tests).
    pub fn load_from_map<'a>(
        config_file: Option<&Path>,
        env: impl IntoIterator<Item = (&'a str, &'a str)>,
        overrides: &Overrides,
    ) -> Result<Self, ConfigError> {
        let mut values = figment::value::Dict::new();
        for (key, value) in env {
            if let Some(name) = key.strip_prefix(ENV_PREFIX)
                && !COMMAND_LINE_ONLY.contains(&name.to_lowercase().as_str())
            {
                // Parsed the way the `Env` provider parses the real environment.
                let parsed = value.parse().unwrap_or_else(|_| value.into());
                values.insert(name.to_lowercase(), parsed);
            }
        }
        let figment = Self::figment(config_file).merge(Serialized::defaults(values));
        Self::from_figment(figment, overrides)
    }

    fn figment(config_file: Option<&Path>) -> Figment {
        let figment = Figment::from(Serialized::defaults(Settings::default()));
        match config_file {
            Some(path) => figment.merge(Toml::file_exact(path)),
            None => figment,
        }
    }

    fn from_figment(figment: Figment, overrides: &Overrides) -> Result<Self, ConfigError> {
        figment
            .merge(Serialized::defaults(overrides))
            .extract()
            .map_err(|e| ConfigError {
                problems: e.into_iter().map(|e| e.to_string()).collect(),
            })
    }

    /// Applies the profile rules; see the module documentation.
    pub fn resolve(self) -> Result<ResolvedSettings, ConfigError> {
        let mut problems = Vec::new();
        let mut notes = Vec::new();
        let production = self.profile == Profile::Production;

        if self.jwt_secret.is_some() && self.jwt_public_key_file.is_some() {
            problems.push(
                "CELLGATE_JWT_SECRET and CELLGATE_JWT_PUBLIC_KEY_FILE are both set: choose one"
                    .to_string(),
            );
        }
        if self.jwt_secret.as_deref().is_some_and(str::is_empty) {
            problems.push("CELLGATE_JWT_SECRET is empty".to_string());
        } else if let Some(secret) = &self.jwt_secret
            && secret.len() < 32
        {
            notes.push(format!(
                "CELLGATE_JWT_SECRET is {} bytes long; use at least 32 random bytes",
                secret.len()
            ));
        }
        if self.default_seats == 0 {
            problems.push("CELLGATE_DEFAULT_SEATS must be at least 1".to_string());
        }
        let prefix_chars = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_';
        if self.redis_prefix.is_empty() || !self.redis_prefix.chars().all(prefix_chars) {
            problems.push(
                "CELLGATE_REDIS_PREFIX must be letters, digits, '-' or '_', at least one"
                    .to_string(),
            );
        }
        if self.session_ttl_secs < MIN_SESSION_TTL_SECS {
            problems.push(format!(
                "CELLGATE_SESSION_TTL_SECS must be at least {MIN_SESSION_TTL_SECS} \
                 (entries are refreshed every third of it)"
            ));
        }

        let database_url = match (&self.database_url, production) {
            (Some(url), _) => Some(url.clone()),
            (None, true) => {
                problems.push(
                    "CELLGATE_DATABASE_URL is required in production (postgres://…)".to_string(),
                );
                None
            }
            (None, false) => {
                let path = self.data_dir.join(DEV_DATABASE_FILE);
                notes.push(format!(
                    "using the embedded SQLite directory at {}",
                    path.display()
                ));
                Some(format!("sqlite://{}?mode=rwc", path.display()))
            }
        };
        if let Some(url) = &database_url
            && !url.starts_with("postgres://")
            && !url.starts_with("postgresql://")
            && !url.starts_with("sqlite:")
        {
            problems.push(format!(
                "CELLGATE_DATABASE_URL must start with postgres:// or sqlite:, got {}",
                redact_url(url)
            ));
        }
        if let Some(root) = database_url.as_deref().and_then(ssl_root_cert)
            && !root.is_file()
        {
            problems.push(format!(
                "the sslrootcert of CELLGATE_DATABASE_URL, {}, is not a readable file",
                root.display()
            ));
        }

        self.check_rotation_and_jwks(&mut problems, &mut notes);
        let limits = self.check_limits(production, &mut problems);
        let has_jwks = self.jwks_url.is_some();
        let key = match (&self.jwt_secret, &self.jwt_public_key_file) {
            (Some(secret), _) => Ok(Some(KeySource::Secret(secret.clone()))),
            (None, Some(file)) => Ok(Some(KeySource::PublicKeyFile(file.clone()))),
            (None, None) if has_jwks => Ok(None),
            (None, None) if production => {
                problems.push(
                    "CELLGATE_JWT_SECRET, CELLGATE_JWT_PUBLIC_KEY_FILE or CELLGATE_JWKS_URL is \
                     required in production"
                        .to_string(),
                );
                Err(())
            }
            (None, None) => match dev_secret(&self.data_dir) {
                Ok(secret) => {
                    notes.push(format!(
                        "using the development signing secret in {}",
                        self.data_dir.join(DEV_SECRET_FILE).display()
                    ));
                    Ok(Some(KeySource::Secret(secret)))
                }
                Err(e) => {
                    problems.push(format!("cannot prepare the development secret: {e}"));
                    Err(())
                }
            },
        };

        match (database_url, key) {
            (Some(database_url), Ok(key)) if problems.is_empty() => {
                let auto_migrate = self.auto_migrate.unwrap_or(!production);
                let node_id = self.node_id.clone().unwrap_or_else(default_node_id);
                Ok(ResolvedSettings {
                    settings: self,
                    database_url,
                    key,
                    auto_migrate,
                    node_id,
                    notes,
                    limits,
                })
            }
            _ => Err(ConfigError { problems }),
        }
    }

    fn check_limits(&self, production: bool, problems: &mut Vec<String>) -> LimitSettings {
        for (name, rate, burst) in [
            (
                "CELLGATE_HANDSHAKE_BURST",
                self.handshakes_per_minute,
                self.handshake_burst,
            ),
            (
                "CELLGATE_INGEST_BURST",
                self.ingest_per_minute,
                self.ingest_burst,
            ),
        ] {
            if rate > 0 && burst == 0 {
                problems.push(format!("{name} must be at least 1 while its rate is on"));
            }
        }
        if self.max_socket_payload_bytes < MIN_SOCKET_PAYLOAD_BYTES {
            problems.push(format!(
                "CELLGATE_MAX_SOCKET_PAYLOAD_BYTES must be at least {MIN_SOCKET_PAYLOAD_BYTES} \
                 (the handshake carries the token)"
            ));
        }
        if self.max_sockets_per_instructor == 0 {
            problems.push("CELLGATE_MAX_SOCKETS_PER_INSTRUCTOR must be at least 1".to_string());
        }
        if self.max_sockets == 0 {
            problems.push("CELLGATE_MAX_SOCKETS must be at least 1".to_string());
        }
        if self.socket_queue_packets < MIN_SOCKET_QUEUE_PACKETS {
            problems.push(format!(
                "CELLGATE_SOCKET_QUEUE_PACKETS must be at least {MIN_SOCKET_QUEUE_PACKETS}"
            ));
        }
        let default_origins = if production {
            vec![]
        } else {
            vec!["*".to_string()]
        };
        let origins = self.allowed_origins.as_ref().unwrap_or(&default_origins);
        let origins = AllowedOrigins::parse(origins).unwrap_or_else(|bad| {
            for problem in bad {
                problems.push(format!("CELLGATE_ALLOWED_ORIGINS: {problem}"));
            }
            AllowedOrigins::Listed(Vec::new())
        });
        let trusted_proxies = TrustedProxies::parse(&self.trusted_proxies).unwrap_or_else(|bad| {
            problems.push(format!(
                "CELLGATE_TRUSTED_PROXIES: not an address or network: {}",
                bad.join(", ")
            ));
            TrustedProxies::none()
        });
        LimitSettings {
            handshakes_per_minute: self.handshakes_per_minute,
            handshake_burst: self.handshake_burst,
            ingest_per_minute: self.ingest_per_minute,
            ingest_burst: self.ingest_burst,
            max_sockets_per_instructor: self.max_sockets_per_instructor as usize,
            max_sockets: self.max_sockets as usize,
            trusted_proxies,
            origins,
        }
    }

    fn check_rotation_and_jwks(&self, problems: &mut Vec<String>, notes: &mut Vec<String>) {
        for (i, secret) in self.jwt_previous_secrets.iter().enumerate() {
            if secret.is_empty() {
                problems.push(format!("CELLGATE_JWT_PREVIOUS_SECRETS[{i}] is empty"));
            } else if secret.len() < 32 {
                notes.push(format!(
                    "CELLGATE_JWT_PREVIOUS_SECRETS[{i}] is {} bytes long; use at least 32 random \
                     bytes",
                    secret.len()
                ));
            }
        }
        if self.jwt_key_id.as_deref().is_some_and(str::is_empty) {
            problems.push("CELLGATE_JWT_KEY_ID is empty".to_string());
        }
        if let Some(url) = &self.jwks_url
            && !url.starts_with("https://")
            && !url.starts_with("http://")
        {
            problems.push(format!(
                "CELLGATE_JWKS_URL must start with https:// or http://, got {}",
                redact_url(url)
            ));
        }
        if self.jwks_refresh_secs == 0 {
            problems.push("CELLGATE_JWKS_REFRESH_SECS must be at least 1".to_string());
        }
        if self.jwks_cooldown_secs == 0 {
            problems.push("CELLGATE_JWKS_COOLDOWN_SECS must be at least 1".to_string());
        }
    }
}

/// Values given on the command line; `None` leaves the lower layers alone.
#[derive(Debug, Default, Clone, Serialize, clap::Args)]
pub struct Overrides {
    /// Set from the global `--profile` flag.
    #[arg(skip)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub profile: Option<Profile>,
    /// Socket.IO and HTTP API address [env: CELLGATE_LISTEN_ADDR] [default: 127.0.0.1:3000]
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen_addr: Option<SocketAddr>,
    /// Prometheus /metrics address [env: CELLGATE_METRICS_ADDR] [default: 127.0.0.1:9091]
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics_addr: Option<SocketAddr>,
    /// Directory for development files [env: CELLGATE_DATA_DIR] [default: .cellgate]
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_dir: Option<PathBuf>,
    /// Directory database, postgres://… or sqlite://… [env: CELLGATE_DATABASE_URL]
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub database_url: Option<String>,
    /// PEM public key for RS*, PS256, ES256/384 or EdDSA tokens
    /// [env: CELLGATE_JWT_PUBLIC_KEY_FILE]
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jwt_public_key_file: Option<PathBuf>,
    /// Expected `iss` claim [env: CELLGATE_JWT_ISSUER]
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jwt_issuer: Option<String>,
    /// Expected `aud` claim [env: CELLGATE_JWT_AUDIENCE]
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jwt_audience: Option<String>,
    /// Clock leeway in seconds [env: CELLGATE_JWT_LEEWAY_SECS] [default: 30]
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jwt_leeway_secs: Option<u64>,
    /// Log format: auto, text or json [env: CELLGATE_LOG_FORMAT] [default: auto]
    #[arg(long, value_enum)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_format: Option<LogFormat>,
}

/// A list setting given as a list (`["a", "b"]`) or as one string of
/// comma-separated entries (`a, b`; empty: no entry).
fn list_or_commas<'de, D>(deserializer: D) -> Result<Option<Vec<String>>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        Many(Vec<String>),
        One(String),
    }
    Ok(match Option::<OneOrMany>::deserialize(deserializer)? {
        None => None,
        Some(OneOrMany::Many(list)) => Some(list),
        Some(OneOrMany::One(text)) => Some(
            text.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(String::from)
                .collect(),
        ),
    })
}

fn list_or_commas_required<'de, D>(deserializer: D) -> Result<Vec<String>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    Ok(list_or_commas(deserializer)?.unwrap_or_default())
}

/// The `sslrootcert` file a PostgreSQL URL names, if any.
fn ssl_root_cert(url: &str) -> Option<PathBuf> {
    let (_, query) = url.split_once('?')?;
    form_urlencoded::parse(query.as_bytes())
        .find(|(key, _)| key == "sslrootcert")
        .map(|(_, value)| PathBuf::from(value.into_owned()))
}

/// Hides the password of a connection URL.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    match rest.split_once('@') {
        Some((credentials, host)) => {
            let user = credentials.split(':').next().unwrap_or_default();
            format!("{scheme}://{user}:***@{host}")
        }
        None => url.to_string(),
    }
}

fn default_node_id() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|h| h.trim().to_string())
        })
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "cellgate".to_string())
}

/// Reads the development secret, creating it (owner-only) on first use.
fn dev_secret(data_dir: &Path) -> std::io::Result<String> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};

    let path = data_dir.join(DEV_SECRET_FILE);
    if let Ok(existing) = std::fs::read_to_string(&path) {
        let mode = std::fs::metadata(&path)?.permissions().mode();
        if mode & 0o077 != 0 {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
        }
        return Ok(existing.trim().to_string());
    }

    std::fs::create_dir_all(data_dir)?;
    let secret = random_secret();
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)?;
    file.write_all(secret.as_bytes())?;
    Ok(secret)
}

fn random_secret() -> String {
    use rand::Rng;
    use rand::distr::Alphanumeric;

    rand::rng()
        .sample_iter(Alphanumeric)
        .take(64)
        .map(char::from)
        .collect()
}

impl ConfigError {
    /// A problem found outside the settings themselves (an unreadable file).
    pub fn other(problem: impl Into<String>) -> Self {
        Self::single(problem)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(env: &[(&str, &str)]) -> Result<Settings, ConfigError> {
        Settings::load_from_map(None, env.iter().copied(), &Overrides::default())
    }

    #[test]
    fn defaults_match_the_documentation() {
        let s = load(&[]).unwrap();
        assert_eq!(s.listen_addr.to_string(), "127.0.0.1:3000");
        assert_eq!(s.metrics_addr.to_string(), "127.0.0.1:9091");
        assert_eq!(s.jwt_leeway_secs, 30);
        assert_eq!(s.profile, Profile::Dev);
    }

    #[test]
    fn environment_overrides_file_and_flags_override_environment() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("cellgate.toml");
        std::fs::write(
            &file,
            "listen_addr = \"127.0.0.1:4000\"\njwt_leeway_secs = 5\n",
        )
        .unwrap();

        let env = [("CELLGATE_JWT_LEEWAY_SECS", "7")];
        let s = Settings::load_from_map(Some(&file), env, &Overrides::default()).unwrap();
        assert_eq!(s.listen_addr.to_string(), "127.0.0.1:4000");
        assert_eq!(s.jwt_leeway_secs, 7);

        let flags = Overrides {
            jwt_leeway_secs: Some(9),
            ..Overrides::default()
        };
        let s = Settings::load_from_map(Some(&file), env, &flags).unwrap();
        assert_eq!(s.jwt_leeway_secs, 9);
    }

    #[test]
    fn production_lists_every_missing_setting() {
        let err = load(&[("CELLGATE_PROFILE", "production")])
            .unwrap()
            .resolve()
            .unwrap_err();
        let text = err.to_string();
        assert!(text.contains("CELLGATE_DATABASE_URL"), "{text}");
        assert!(text.contains("CELLGATE_JWT_SECRET"), "{text}");
        assert_eq!(err.problems.len(), 2);
    }

    #[test]
    fn dev_profile_creates_an_owner_only_secret_once() {
        use std::os::unix::fs::PermissionsExt;

        let dir = tempfile::tempdir().unwrap();
        let data_dir = dir.path().to_str().unwrap();
        let env = [("CELLGATE_DATA_DIR", data_dir)];
        let first = load(&env).unwrap().resolve().unwrap();
        let second = load(&env).unwrap().resolve().unwrap();

        let (KeySource::Secret(a), KeySource::Secret(b)) =
            (first.key.unwrap(), second.key.unwrap())
        else {
            panic!("expected a secret");
        };
        assert_eq!(a, b);
        assert!(a.len() >= 32);
        let mode = std::fs::metadata(dir.path().join(DEV_SECRET_FILE))
            .unwrap()
            .permissions();
        assert_eq!(mode.mode() & 0o777, 0o600);
        assert!(first.database_url.starts_with("sqlite://"));
    }

    #[test]
    fn a_session_ttl_too_short_to_refresh_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let data_dir = dir.path().to_str().unwrap();
        let short = [
            ("CELLGATE_DATA_DIR", data_dir),
            ("CELLGATE_SESSION_TTL_SECS", "2"),
        ];
        let err = load(&short).unwrap().resolve().unwrap_err();
        assert!(
            err.to_string().contains("CELLGATE_SESSION_TTL_SECS"),
            "{err}"
        );

        let fine = [
            ("CELLGATE_DATA_DIR", data_dir),
            ("CELLGATE_SESSION_TTL_SECS", "6"),
        ];
        let resolved = load(&fine).unwrap().resolve().unwrap();
        assert_eq!(resolved.settings.session_ttl_secs, 6);
        assert_eq!(load(&[]).unwrap().session_ttl_secs, 30);
    }

    #[test]
    fn a_redis_prefix_that_would_break_key_names_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let data_dir = dir.path().to_str().unwrap();
        assert_eq!(load(&[]).unwrap().redis_prefix, "cellgate");
        for bad in ["", "a:b", "a#b", "a b"] {
            let env = [
                ("CELLGATE_DATA_DIR", data_dir),
                ("CELLGATE_REDIS_PREFIX", bad),
            ];
            let err = load(&env).unwrap().resolve().unwrap_err();
            assert!(
                err.to_string().contains("CELLGATE_REDIS_PREFIX"),
                "{bad:?}: {err}"
            );
        }
        let env = [
            ("CELLGATE_DATA_DIR", data_dir),
            ("CELLGATE_REDIS_PREFIX", "cg-blue_2"),
        ];
        assert!(load(&env).unwrap().resolve().is_ok());
    }

    #[test]
    fn the_config_file_variable_is_not_taken_for_a_setting() {
        // Regression: `CELLGATE_CONFIG` (read by clap for --config) made
        // every command fail with "unknown field: found `config`".
        let s = load(&[("CELLGATE_CONFIG", "/etc/cellgate.toml")]).unwrap();
        assert_eq!(s.listen_addr, Settings::default().listen_addr);
    }

    #[test]
    fn a_missing_ssl_root_certificate_is_named_at_start_up() {
        let url = "postgres://db.internal/cellgate?sslmode=verify-full&sslrootcert=/nowhere/ca.pem";
        let err = load(&[("CELLGATE_DATABASE_URL", url)])
            .unwrap()
            .resolve()
            .unwrap_err();
        assert!(err.to_string().contains("/nowhere/ca.pem"), "{err}");
        assert_eq!(ssl_root_cert("postgres://h/db"), None);
    }

    #[test]
    fn unknown_file_keys_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("cellgate.toml");
        std::fs::write(&file, "listen_adr = \"127.0.0.1:4000\"\n").unwrap();
        let err = Settings::load_from_map(Some(&file), [], &Overrides::default()).unwrap_err();
        assert!(err.to_string().contains("listen_adr"), "{err}");
    }

    #[test]
    fn limits_have_documented_defaults_and_dev_allows_any_origin() {
        let dir = tempfile::tempdir().unwrap();
        let data_dir = dir.path().to_str().unwrap();
        let resolved = load(&[("CELLGATE_DATA_DIR", data_dir)])
            .unwrap()
            .resolve()
            .unwrap();
        let s = &resolved.settings;
        assert_eq!((s.handshakes_per_minute, s.handshake_burst), (120, 60));
        assert_eq!((s.ingest_per_minute, s.ingest_burst), (600, 120));
        assert_eq!(s.max_socket_payload_bytes, 65_536);
        assert_eq!((s.max_sockets_per_instructor, s.max_sockets), (20, 10_000));
        assert_eq!(s.socket_queue_packets, 4096);
        assert_eq!(resolved.limits.origins, AllowedOrigins::Any);
        assert!(resolved.limits.trusted_proxies.is_empty());
    }

    #[test]
    fn production_allows_only_its_own_origin_unless_told() {
        let production = [
            ("CELLGATE_PROFILE", "production"),
            ("CELLGATE_DATABASE_URL", "postgres://db/cellgate"),
            ("CELLGATE_JWT_SECRET", "0123456789abcdef0123456789abcdef"),
        ];
        let resolved = load(&production).unwrap().resolve().unwrap();
        assert_eq!(resolved.limits.origins, AllowedOrigins::Listed(vec![]));

        for given in [
            "https://dash.example.edu, http://localhost:5173",
            r#"["https://dash.example.edu", "http://localhost:5173"]"#,
        ] {
            let mut env = production.to_vec();
            env.push(("CELLGATE_ALLOWED_ORIGINS", given));
            env.push(("CELLGATE_TRUSTED_PROXIES", "10.0.0.0/8,192.168.1.5"));
            let resolved = load(&env).unwrap().resolve().unwrap();
            assert_eq!(
                resolved.limits.origins,
                AllowedOrigins::Listed(vec![
                    "https://dash.example.edu".into(),
                    "http://localhost:5173".into()
                ]),
                "{given}"
            );
            assert!(!resolved.limits.trusted_proxies.is_empty());
        }
    }

    #[test]
    fn unusable_limits_are_all_named() {
        let dir = tempfile::tempdir().unwrap();
        let data_dir = dir.path().to_str().unwrap();
        let env = [
            ("CELLGATE_DATA_DIR", data_dir),
            ("CELLGATE_HANDSHAKE_BURST", "0"),
            ("CELLGATE_MAX_SOCKET_PAYLOAD_BYTES", "100"),
            ("CELLGATE_MAX_SOCKETS", "0"),
            ("CELLGATE_SOCKET_QUEUE_PACKETS", "2"),
            ("CELLGATE_ALLOWED_ORIGINS", "*, https://a.test"),
            ("CELLGATE_TRUSTED_PROXIES", "lb.internal"),
        ];
        let err = load(&env).unwrap().resolve().unwrap_err();
        let text = err.to_string();
        for name in [
            "CELLGATE_HANDSHAKE_BURST",
            "CELLGATE_MAX_SOCKET_PAYLOAD_BYTES",
            "CELLGATE_MAX_SOCKETS ",
            "CELLGATE_SOCKET_QUEUE_PACKETS",
            "CELLGATE_ALLOWED_ORIGINS",
            "CELLGATE_TRUSTED_PROXIES: not an address or network: lb.internal",
        ] {
            assert!(text.contains(name), "{name} missing from {text}");
        }
        assert_eq!(err.problems.len(), 6, "{text}");

        let off = [
            ("CELLGATE_DATA_DIR", data_dir),
            ("CELLGATE_HANDSHAKES_PER_MINUTE", "0"),
            ("CELLGATE_HANDSHAKE_BURST", "0"),
        ];
        assert!(
            load(&off).unwrap().resolve().is_ok(),
            "a rate of 0 needs no burst"
        );
    }

    #[test]
    fn redaction_hides_passwords() {
        assert_eq!(redact_url("postgres://u:pw@h/db"), "postgres://u:***@h/db");
        assert_eq!(redact_url("sqlite://x.db"), "sqlite://x.db");
    }
}
