//! Keys from a JWKS endpoint, served by a real HTTP server on loopback:
//! rotation without a restart, a flood of unknown key ids costing at most
//! one fetch per cooldown, and the last good keys kept while the endpoint
//! is down.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use cellgate::auth::{Jwks, Refusal, Role, Verifier};
use cellgate::config::Settings;
use cellgate::metrics::Metrics;
use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::json;

/// What the fake identity provider serves, and how often it was asked.
#[derive(Default)]
struct Provider {
    set: Mutex<JwkSet>,
    up: AtomicBool,
    fetches: AtomicUsize,
}

async fn serve_jwks(State(provider): State<Arc<Provider>>) -> Response {
    provider.fetches.fetch_add(1, Ordering::SeqCst);
    if !provider.up.load(Ordering::SeqCst) {
        return StatusCode::SERVICE_UNAVAILABLE.into_response();
    }
    let set = provider.set.lock().unwrap().clone();
    axum::Json(set).into_response()
}

async fn start_provider(keys: Vec<Jwk>) -> (Arc<Provider>, String) {
    let provider = Arc::new(Provider::default());
    *provider.set.lock().unwrap() = JwkSet { keys };
    provider.up.store(true, Ordering::SeqCst);
    let app = Router::new()
        .route("/.well-known/jwks.json", get(serve_jwks))
        .with_state(provider.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!(
        "http://{}/.well-known/jwks.json",
        listener.local_addr().unwrap()
    );
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (provider, url)
}

/// A signing key of the provider's and its public half as a JWK.
struct SigningKey {
    kid: String,
    alg: Algorithm,
    key: EncodingKey,
}

impl SigningKey {
    fn load(kid: &str, file: &str, alg: Algorithm) -> Self {
        let pem = std::fs::read(fixture(file)).unwrap();
        let key = match alg {
            Algorithm::ES256 => EncodingKey::from_ec_pem(&pem),
            Algorithm::EdDSA => EncodingKey::from_ed_pem(&pem),
            _ => EncodingKey::from_rsa_pem(&pem),
        }
        .unwrap();
        SigningKey {
            kid: kid.into(),
            alg,
            key,
        }
    }

    fn jwk(&self) -> Jwk {
        let mut jwk = Jwk::from_encoding_key(&self.key, self.alg).unwrap();
        jwk.common.key_id = Some(self.kid.clone());
        jwk
    }

    fn token(&self, kid: &str) -> String {
        let mut header = Header::new(self.alg);
        header.kid = Some(kid.into());
        let exp = jsonwebtoken::get_current_timestamp() + 600;
        let claims = json!({ "sub": "ada@example.edu", "role": "instructor", "exp": exp });
        jsonwebtoken::encode(&header, &claims, &self.key).unwrap()
    }
}

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// A verifier that knows only the key set at `url`, already fetched once.
async fn verifier(url: &str, refresh_secs: u64, cooldown_secs: u64) -> (Verifier, Metrics) {
    let settings = Settings {
        jwks_url: Some(url.into()),
        jwks_refresh_secs: refresh_secs,
        jwks_cooldown_secs: cooldown_secs,
        ..Settings::default()
    };
    let metrics = Metrics::new();
    let jwks = Jwks::from_settings(&settings, metrics.clone())
        .unwrap()
        .unwrap();
    jwks.refresh().await.expect("first fetch");
    tokio::spawn(jwks.clone().run());
    let verifier = Verifier::new(&settings, None, Some(jwks)).unwrap();
    (verifier, metrics)
}

fn fetches(metrics: &Metrics, outcome: &str) -> u64 {
    metrics.jwks_fetches.with_label_values(&[outcome]).get()
}

#[tokio::test]
async fn a_rotated_key_is_picked_up_without_a_restart() {
    let old = SigningKey::load("2026-11", "rsa-private.pem", Algorithm::RS256);
    let new = SigningKey::load("2026-12", "ec-private.pem", Algorithm::ES256);
    let (provider, url) = start_provider(vec![old.jwk()]).await;
    let (verifier, metrics) = verifier(&url, 3600, 1).await;

    let claims = verifier
        .verify(&old.token("2026-11"), Role::Instructor)
        .await;
    assert_eq!(claims.unwrap().sub, "ada@example.edu");
    let early = verifier
        .verify(&new.token("2026-12"), Role::Instructor)
        .await;
    assert_eq!(early.unwrap_err(), Refusal::invalid("unknown key id"));

    // The provider rotates: the new key in, the old one out. Once the
    // cooldown since the last fetch has passed, the first token naming the
    // new key makes the gateway fetch again.
    *provider.set.lock().unwrap() = JwkSet {
        keys: vec![new.jwk()],
    };
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let claims = verifier
        .verify(&new.token("2026-12"), Role::Instructor)
        .await;
    assert_eq!(claims.unwrap().sub, "ada@example.edu");

    let retired = verifier
        .verify(&old.token("2026-11"), Role::Instructor)
        .await;
    assert_eq!(retired.unwrap_err(), Refusal::invalid("unknown key id"));
    assert_eq!(metrics.jwks_keys.get(), 1);
    assert!(fetches(&metrics, "ok") >= 2);
}

#[tokio::test]
async fn a_thousand_unknown_key_ids_cost_at_most_one_fetch_per_cooldown() {
    let key = SigningKey::load("only", "ed-private.pem", Algorithm::EdDSA);
    let (provider, url) = start_provider(vec![key.jwk()]).await;
    let (verifier, _metrics) = verifier(&url, 3600, 2).await;
    // Let the cooldown of the first fetch pass: the flood may cost one.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let before = provider.fetches.load(Ordering::SeqCst);

    let flood = (0..1000).map(|i| {
        let verifier = verifier.clone();
        let token = key.token(&format!("random-{i}-{}", uuid::Uuid::new_v4()));
        tokio::spawn(async move { verifier.verify(&token, Role::Instructor).await })
    });
    for outcome in futures_util::future::join_all(flood).await {
        assert_eq!(
            outcome.unwrap().unwrap_err(),
            Refusal::invalid("unknown key id")
        );
    }

    let caused = provider.fetches.load(Ordering::SeqCst) - before;
    assert!(caused <= 1, "1000 unknown key ids caused {caused} fetches");
    // The real key still works.
    assert!(
        verifier
            .verify(&key.token("only"), Role::Instructor)
            .await
            .is_ok()
    );
}

#[tokio::test]
async fn the_last_good_keys_are_kept_while_the_endpoint_is_down() {
    let key = SigningKey::load("steady", "rsa-private.pem", Algorithm::RS256);
    let (provider, url) = start_provider(vec![key.jwk()]).await;
    let (verifier, metrics) = verifier(&url, 1, 1).await;

    provider.up.store(false, Ordering::SeqCst);
    let failed_before = fetches(&metrics, "error");
    // Background refreshes every second fail while the endpoint is down.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(fetches(&metrics, "error") > failed_before);
    let claims = verifier
        .verify(&key.token("steady"), Role::Instructor)
        .await;
    assert!(claims.is_ok(), "{claims:?}");
    assert_eq!(metrics.jwks_keys.get(), 1);

    // Back up: refreshes succeed again and nothing was lost on the way.
    provider.up.store(true, Ordering::SeqCst);
    let ok_before = fetches(&metrics, "ok");
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(fetches(&metrics, "ok") > ok_before);
    assert!(
        verifier
            .verify(&key.token("steady"), Role::Instructor)
            .await
            .is_ok()
    );
}

#[tokio::test]
async fn a_key_set_of_another_kind_cannot_sign_hmac_tokens() {
    // The confusion attack through a key set: an HS256 token "signed" with
    // the RSA modulus must not verify, and a published symmetric key is
    // never used.
    let key = SigningKey::load("rsa", "rsa-private.pem", Algorithm::RS256);
    let oct = json!({ "kty": "oct", "kid": "shared", "k": "c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0LXNlY3JldA" });
    let (provider, url) = start_provider(vec![key.jwk()]).await;
    provider
        .set
        .lock()
        .unwrap()
        .keys
        .push(serde_json::from_value(oct).unwrap());
    let (verifier, metrics) = verifier(&url, 3600, 30).await;
    assert_eq!(metrics.jwks_keys.get(), 1, "the oct key must be skipped");

    let secret = EncodingKey::from_secret(b"secret-secret-secret-secret-secret").unwrap();
    let mut header = Header::new(Algorithm::HS256);
    header.kid = Some("shared".into());
    let exp = jsonwebtoken::get_current_timestamp() + 600;
    let claims = json!({ "sub": "ada@example.edu", "role": "instructor", "exp": exp });
    let token = jsonwebtoken::encode(&header, &claims, &secret).unwrap();
    let got = verifier.verify(&token, Role::Instructor).await.unwrap_err();
    assert_eq!(got.code(), "invalid_token");

    header.kid = Some("rsa".into());
    let token = jsonwebtoken::encode(&header, &claims, &secret).unwrap();
    let got = verifier.verify(&token, Role::Instructor).await.unwrap_err();
    assert_eq!(got, Refusal::invalid("algorithm not allowed"));
}
