//! Token verification and the refusal codes a client sees.
//!
//! Every token is checked locally by [`Verifier`]; no call leaves the
//! process. Dashboards are then looked up in the directory by
//! [`crate::realtime`]; notebook extensions only need the token.

mod keys;
mod refusal;
mod token;

use std::time::Duration;

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{DecodingKey, Validation};
use serde::{Deserialize, Serialize};

pub use keys::KeyError;
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
#[derive(Clone)]
pub struct Verifier {
    key: DecodingKey,
    validation: Validation,
    leeway: Duration,
}

impl Verifier {
    /// Builds a verifier from the configured key and claim rules.
    pub fn new(settings: &Settings, key: &KeySource) -> Result<Self, KeyError> {
        let (key, algorithms) = keys::decoding_key(key, settings.jwt_algorithms.as_deref())?;

        let mut validation = Validation::new(algorithms[0]);
        validation.algorithms = algorithms;
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

        let leeway = Duration::from_secs(settings.jwt_leeway_secs);
        Ok(Verifier {
            key,
            validation,
            leeway,
        })
    }

    /// Verifies `token` and checks that it was issued for `role`.
    pub fn verify(&self, token: &str, role: Role) -> Result<Claims, Refusal> {
        let claims = self.verify_any_role(token)?;
        if claims.role != role {
            return Err(Refusal::invalid("wrong role"));
        }
        Ok(claims)
    }

    /// Verifies `token` whatever its role; the caller decides what the role
    /// may do (the ingest API answers 403, not 401, to an instructor).
    pub fn verify_any_role(&self, token: &str) -> Result<Claims, Refusal> {
        if token.is_empty() {
            return Err(Refusal::invalid("no token"));
        }
        if token.len() > MAX_TOKEN_BYTES {
            return Err(Refusal::invalid("token too large"));
        }

        let data = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation)
            .map_err(|e| refusal_for(e.kind()))?;
        let claims = data.claims;

        let now = jsonwebtoken::get_current_timestamp() as i64;
        if claims
            .iat
            .is_some_and(|iat| iat > now + self.leeway.as_secs() as i64)
        {
            return Err(Refusal::invalid("issued in the future"));
        }
        if claims.sub.is_empty() {
            return Err(Refusal::invalid("empty subject"));
        }
        Ok(claims)
    }
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
