//! Keys from a JWKS URL: fetched at start-up, refreshed in the background,
//! fetched again when a token names a key id nobody knows (at most once per
//! cooldown, however many such tokens arrive), and kept as they were when
//! the endpoint fails.

use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use jsonwebtoken::jwk::Jwk;
use serde::Deserialize;

use super::keys::{AllowList, VerifyKey, from_jwk};
use crate::config::redact_url;
use crate::metrics::Metrics;

/// Longest a fetch may take, connection included.
const FETCH_TIMEOUT: Duration = Duration::from_secs(3);

/// Largest key set read; a bigger answer is refused.
const MAX_BODY_BYTES: usize = 1024 * 1024;

/// Why a key set could not be fetched. The previous keys stay in use.
#[derive(Debug, thiserror::Error)]
pub enum JwksError {
    /// The endpoint did not answer, or not in time.
    #[error("cannot fetch the key set: {0}")]
    Fetch(#[from] reqwest::Error),
    /// The endpoint answered with an error status.
    #[error("the key set endpoint answered {0}")]
    Status(reqwest::StatusCode),
    /// The answer is larger than cellgate reads.
    #[error("the key set is larger than {MAX_BODY_BYTES} bytes")]
    TooLarge,
    /// The answer is not a JWK set.
    #[error("the answer is not a JWK set: {0}")]
    Parse(#[from] serde_json::Error),
    /// The set holds no key cellgate may verify with.
    #[error("the key set holds no usable signing key")]
    NoUsableKey,
}

/// A key set kept fresh from a JWKS endpoint.
pub struct Jwks {
    url: String,
    client: reqwest::Client,
    allow: AllowList,
    refresh_every: Duration,
    cooldown: Duration,
    keys: RwLock<Arc<Vec<VerifyKey>>>,
    /// When the last fetch started, successful or not.
    last_attempt: Mutex<Option<Instant>>,
    /// Held while a fetch runs, so that concurrent callers share it.
    fetching: tokio::sync::Mutex<()>,
    metrics: Metrics,
}

impl Jwks {
    /// A key set for `url`, empty until the first fetch.
    pub(crate) fn new(
        url: String,
        allow: AllowList,
        refresh_every: Duration,
        cooldown: Duration,
        metrics: Metrics,
    ) -> Self {
        let client = reqwest::Client::builder()
            .timeout(FETCH_TIMEOUT)
            .build()
            .expect("the HTTP client builds with default TLS");
        Jwks {
            url,
            client,
            allow,
            refresh_every,
            cooldown,
            keys: RwLock::new(Arc::new(Vec::new())),
            last_attempt: Mutex::new(None),
            fetching: tokio::sync::Mutex::new(()),
            metrics,
        }
    }

    /// The keys in use now.
    pub(crate) fn keys(&self) -> Arc<Vec<VerifyKey>> {
        self.keys
            .read()
            .expect("the key set lock is never poisoned")
            .clone()
    }

    /// Fetches the key set now and replaces the keys in use when it is good.
    pub async fn refresh(&self) -> Result<usize, JwksError> {
        let _running = self.fetching.lock().await;
        self.fetch().await
    }

    /// A token named a key id that no key has: fetch again, unless a fetch
    /// started within the cooldown. Callers that arrive while a fetch runs
    /// wait for it instead of starting their own.
    pub(crate) async fn refetch_for_unknown_kid(&self) {
        let _running = self.fetching.lock().await;
        if self.fetched_within(self.cooldown) {
            return;
        }
        if let Err(error) = self.fetch().await {
            tracing::warn!(url = %redact_url(&self.url), %error, "key set refetch failed; keeping the last keys");
        }
    }

    /// Refreshes forever: every `refresh_every`, or every cooldown while
    /// the last fetch failed.
    pub async fn run(self: Arc<Self>) {
        let mut healthy = !self.keys().is_empty();
        loop {
            let wait = if healthy {
                self.refresh_every
            } else {
                self.cooldown
            };
            tokio::time::sleep(wait).await;
            healthy = match self.refresh().await {
                Ok(_) => true,
                Err(error) => {
                    tracing::warn!(url = %redact_url(&self.url), %error, "key set refresh failed; keeping the last keys");
                    false
                }
            };
        }
    }

    fn fetched_within(&self, window: Duration) -> bool {
        let last = self.last_attempt.lock().expect("never poisoned");
        last.is_some_and(|at| at.elapsed() < window)
    }

    async fn fetch(&self) -> Result<usize, JwksError> {
        *self.last_attempt.lock().expect("never poisoned") = Some(Instant::now());
        let result = self.download().await;
        let outcome = if result.is_ok() { "ok" } else { "error" };
        self.metrics
            .jwks_fetches
            .with_label_values(&[outcome])
            .inc();
        let keys = result?;
        let count = keys.len();
        *self.keys.write().expect("never poisoned") = Arc::new(keys);
        self.metrics.jwks_keys.set(count as i64);
        tracing::info!(url = %redact_url(&self.url), keys = count, "key set loaded");
        Ok(count)
    }

    async fn download(&self) -> Result<Vec<VerifyKey>, JwksError> {
        let mut response = self.client.get(&self.url).send().await?;
        if !response.status().is_success() {
            return Err(JwksError::Status(response.status()));
        }
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await? {
            if body.len() + chunk.len() > MAX_BODY_BYTES {
                return Err(JwksError::TooLarge);
            }
            body.extend_from_slice(&chunk);
        }
        // Keys are read one by one: one key of a kind this library does not
        // know must not make the whole set unusable.
        let set: RawSet = serde_json::from_slice(&body)?;
        let keys: Vec<VerifyKey> = set
            .keys
            .into_iter()
            .filter_map(|raw| serde_json::from_value::<Jwk>(raw).ok())
            .filter_map(|jwk| from_jwk(&jwk, &self.allow))
            .collect();
        if keys.is_empty() {
            return Err(JwksError::NoUsableKey);
        }
        Ok(keys)
    }
}

/// A JWK set before its keys are read.
#[derive(Deserialize)]
struct RawSet {
    keys: Vec<serde_json::Value>,
}

impl Jwks {
    /// The key set of `CELLGATE_JWKS_URL`, or `None` when it is not set.
    /// Empty until [`Jwks::refresh`] or [`Jwks::run`] fetches it.
    pub fn from_settings(
        settings: &crate::config::Settings,
        metrics: Metrics,
    ) -> Result<Option<Arc<Self>>, super::KeyError> {
        let Some(url) = &settings.jwks_url else {
            return Ok(None);
        };
        let allow = AllowList::parse(settings.jwt_algorithms.as_deref())?;
        Ok(Some(Arc::new(Jwks::new(
            url.clone(),
            allow,
            Duration::from_secs(settings.jwks_refresh_secs),
            Duration::from_secs(settings.jwks_cooldown_secs),
            metrics,
        ))))
    }
}
