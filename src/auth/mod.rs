//! Token verification and the refusal codes a client sees.
//!
//! Every token is checked locally by [`Verifier`]; no call leaves the
//! process. Dashboards are then looked up in the directory by
//! [`crate::realtime`]; notebook extensions only need the token.

mod jwks;
mod keys;
mod refusal;
mod token;

use std::sync::Arc;

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, Validation};
use serde::{Deserialize, Serialize};

pub use jwks::{Jwks, JwksError};
pub use keys::KeyError;
use keys::{AllowList, VerifyKey};
pub use refusal::Refusal;
pub use token::{MintError, Minter};

use crate::config::{KeySource, Settings};

/// Longest token accepted, in bytes; anything larger is refused unread.
const MAX_TOKEN_BYTES: usize = 8 * 1024;

/// Who a token says its bearer is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Watches classrooms on a dashboard.
    Instructor,
    /// Posts notebook events.
    Student,
}

/// The claims cellgate reads.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// Instructor e-mail or student id.
    pub sub: String,
    /// Who the bearer is.
    pub role: Role,
    /// Expiry, seconds since the epoch.
    pub exp: i64,
    /// Issued at.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<i64>,
    /// Not before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<i64>,
    /// Issuer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
    /// Audience.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aud: Option<String>,
    /// Student tokens: the one classroom they may post to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub classroom: Option<String>,
    /// Student tokens: the seat, 1-based.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seat: Option<u32>,
}

/// Checks signatures and claims of incoming tokens.
///
/// The keys are the configured ones ([`fixed`](Verifier::new)) and, when a
/// JWKS URL is set, those of the key set. A token that names a key id
/// (`kid`) is checked with that key only; one without is checked with
/// every key that may verify its algorithm (several HMAC secrets during a
/// rotation).
#[derive(Clone)]
pub struct Verifier {
    inner: Arc<Inner>,
}

struct Inner {
    fixed: Vec<VerifyKey>,
    jwks: Option<Arc<Jwks>>,
    /// One validation per algorithm, differing only in the algorithm.
    validations: Vec<(Algorithm, Validation)>,
    leeway_secs: i64,
}

impl Verifier {
    /// Builds a verifier from the configured keys and claim rules. `jwks`
    /// is the key set of `CELLGATE_JWKS_URL`, if any.
    pub fn new(
        settings: &Settings,
        key: Option<&KeySource>,
        jwks: Option<Arc<Jwks>>,
    ) -> Result<Self, KeyError> {
        let allow = AllowList::parse(settings.jwt_algorithms.as_deref())?;
        let fixed = keys::fixed_keys(
            key,
            &settings.jwt_previous_secrets,
            settings.jwt_key_id.as_deref(),
            &allow,
        )?;
        let template = validation(settings);
        let validations = ALL_ALGORITHMS
            .iter()
            .map(|alg| {
                let mut v = template.clone();
                v.algorithms = vec![*alg];
                (*alg, v)
            })
            .collect();
        Ok(Verifier {
            inner: Arc::new(Inner {
                fixed,
                jwks,
                validations,
                leeway_secs: settings.jwt_leeway_secs as i64,
            }),
        })
    }

    /// A verifier for one HMAC secret and default claim rules (tests,
    /// benchmarks).
    pub fn for_secret(secret: &str) -> Result<Self, KeyError> {
        let key = KeySource::Secret(secret.to_string());
        Self::new(&Settings::default(), Some(&key), None)
    }

    /// Verifies `token` and checks that it was issued for `role`.
    pub async fn verify(&self, token: &str, role: Role) -> Result<Claims, Refusal> {
        let claims = self.verify_any_role(token).await?;
        if claims.role != role {
            return Err(Refusal::invalid("wrong role"));
        }
        Ok(claims)
    }

    /// Verifies `token` whatever its role; the caller decides what the role
    /// may do (the ingest API answers 403, not 401, to an instructor).
    pub async fn verify_any_role(&self, token: &str) -> Result<Claims, Refusal> {
        if token.is_empty() {
            return Err(Refusal::invalid("no token"));
        }
        if token.len() > MAX_TOKEN_BYTES {
            return Err(Refusal::invalid("token too large"));
        }
        let header =
            jsonwebtoken::decode_header(token).map_err(|_| Refusal::invalid("malformed token"))?;
        if !header.typ.as_deref().is_none_or(typ_is_jwt) {
            return Err(Refusal::invalid("wrong typ"));
        }

        let keys = self.keys_for(header.kid.as_deref()).await?;
        let claims = self.check_signature(token, header.alg, &keys)?;
        self.check_claims(claims)
    }

    /// The keys a token with this `kid` may be checked with.
    async fn keys_for(&self, kid: Option<&str>) -> Result<Vec<VerifyKey>, Refusal> {
        let Some(kid) = kid else {
            return Ok(self.all_keys());
        };
        let named = |keys: Vec<VerifyKey>| -> Vec<VerifyKey> {
            keys.into_iter()
                .filter(|k| k.kid.as_deref() == Some(kid))
                .collect()
        };
        let found = named(self.all_keys());
        if !found.is_empty() {
            return Ok(found);
        }
        let Some(jwks) = &self.inner.jwks else {
            return Err(Refusal::invalid("unknown key id"));
        };
        jwks.refetch_for_unknown_kid().await;
        let found = named(self.all_keys());
        if found.is_empty() {
            return Err(Refusal::invalid("unknown key id"));
        }
        Ok(found)
    }

    fn all_keys(&self) -> Vec<VerifyKey> {
        let mut keys = self.inner.fixed.clone();
        if let Some(jwks) = &self.inner.jwks {
            keys.extend(jwks.keys().iter().cloned());
        }
        keys
    }

    /// The claims of the first key whose signature matches. Anything but a
    /// signature mismatch (an expired token, say) is the answer at once:
    /// the signature was good.
    fn check_signature(
        &self,
        token: &str,
        alg: Algorithm,
        keys: &[VerifyKey],
    ) -> Result<Claims, Refusal> {
        let validation = self
            .inner
            .validations
            .iter()
            .find(|(a, _)| *a == alg)
            .map(|(_, v)| v)
            .ok_or(Refusal::invalid("algorithm not allowed"))?;
        let mut usable = keys.iter().filter(|k| k.allows(alg)).peekable();
        if usable.peek().is_none() {
            return Err(Refusal::invalid("algorithm not allowed"));
        }
        for key in usable {
            match jsonwebtoken::decode::<Claims>(token, &key.key, validation) {
                Ok(data) => return Ok(data.claims),
                Err(e) if matches!(e.kind(), ErrorKind::InvalidSignature) => continue,
                Err(e) => return Err(refusal_for(e.kind())),
            }
        }
        Err(Refusal::invalid("bad signature"))
    }

    fn check_claims(&self, claims: Claims) -> Result<Claims, Refusal> {
        let now = jsonwebtoken::get_current_timestamp() as i64;
        if claims
            .iat
            .is_some_and(|iat| iat > now + self.inner.leeway_secs)
        {
            return Err(Refusal::invalid("issued in the future"));
        }
        if claims.sub.is_empty() {
            return Err(Refusal::invalid("empty subject"));
        }
        Ok(claims)
    }
}

/// Every algorithm jsonwebtoken implements.
const ALL_ALGORITHMS: [Algorithm; 12] = [
    Algorithm::HS256,
    Algorithm::HS384,
    Algorithm::HS512,
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::EdDSA,
];

/// `typ` values of a signed JWT (RFC 7519) or an OAuth access token in JWT
/// form (RFC 9068); anything else is another kind of object.
fn typ_is_jwt(typ: &str) -> bool {
    let typ = typ.strip_prefix("application/").unwrap_or(typ);
    typ.eq_ignore_ascii_case("jwt") || typ.eq_ignore_ascii_case("at+jwt")
}

/// The claim rules, without the algorithm.
fn validation(settings: &Settings) -> Validation {
    let mut validation = Validation::new(Algorithm::HS256);
    // Set explicitly: the library's own default leeway is different.
    validation.leeway = settings.jwt_leeway_secs;
    validation.validate_nbf = true;
    // A configured issuer or audience must be present, not only match.
    let mut required = vec!["exp"];
    match &settings.jwt_issuer {
        Some(iss) => {
            validation.set_issuer(&[iss]);
            required.push("iss");
        }
        None => validation.iss = None,
    }
    match &settings.jwt_audience {
        Some(aud) => {
            validation.set_audience(&[aud]);
            required.push("aud");
        }
        None => validation.validate_aud = false,
    }
    validation.set_required_spec_claims(&required);
    validation
}

fn refusal_for(kind: &ErrorKind) -> Refusal {
    match kind {
        ErrorKind::ExpiredSignature => Refusal::TokenExpired,
        ErrorKind::InvalidSignature => Refusal::invalid("bad signature"),
        ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName => {
            Refusal::invalid("algorithm not allowed")
        }
        ErrorKind::ImmatureSignature => Refusal::invalid("not yet valid"),
        ErrorKind::InvalidIssuer => Refusal::invalid("wrong issuer"),
        ErrorKind::InvalidAudience => Refusal::invalid("wrong audience"),
        ErrorKind::MissingRequiredClaim(_) => Refusal::invalid("missing required claim"),
        ErrorKind::InvalidClaimFormat(_) | ErrorKind::Json(_) => Refusal::invalid("bad claims"),
        _ => Refusal::invalid("malformed token"),
    }
}

/// Reads a bearer token from an `Authorization` header value.
pub fn bearer(header: Option<&str>) -> Option<&str> {
    let value = header?.trim();
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

#[cfg(test)]
mod tests;
