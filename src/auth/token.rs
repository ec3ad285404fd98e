//! Minting tokens with the configured secret, for development and tests.

use std::time::Duration;

use jsonwebtoken::{EncodingKey, Header};

use super::{Claims, Role};
use crate::config::{KeySource, Settings};

/// Why a token could not be minted.
#[derive(Debug, thiserror::Error)]
pub enum MintError {
    /// Only an HMAC secret can sign; a public key cannot.
    #[error(
        "cellgate only verifies tokens with a public key; mint them with the private key's owner \
         (set CELLGATE_JWT_SECRET to mint here)"
    )]
    NoSecret,
    /// The signing library failed.
    #[error("cannot sign the token: {0}")]
    Sign(#[from] jsonwebtoken::errors::Error),
}

/// Signs tokens with the configured HMAC secret.
pub struct Minter {
    key: EncodingKey,
    header: Header,
    issuer: Option<String>,
    audience: Option<String>,
}

impl Minter {
    /// A minter for the configured secret, with the configured `iss`/`aud`.
    pub fn new(settings: &Settings, key: Option<&KeySource>) -> Result<Self, MintError> {
        let Some(KeySource::Secret(secret)) = key else {
            return Err(MintError::NoSecret);
        };
        let header = Header {
            kid: settings.jwt_key_id.clone(),
            ..Header::default()
        };
        Ok(Minter {
            key: EncodingKey::from_secret(secret.as_bytes())?,
            header,
            issuer: settings.jwt_issuer.clone(),
            audience: settings.jwt_audience.clone(),
        })
    }

    /// An instructor token for `email`, valid for `ttl`.
    pub fn instructor(&self, email: &str, ttl: Duration) -> Result<String, MintError> {
        self.sign(self.claims(email, Role::Instructor, ttl))
    }

    /// A student token for `student` in `classroom`, optionally at `seat`.
    pub fn student(
        &self,
        student: &str,
        classroom: &str,
        seat: Option<u32>,
        ttl: Duration,
    ) -> Result<String, MintError> {
        let mut claims = self.claims(student, Role::Student, ttl);
        claims.classroom = Some(classroom.to_string());
        claims.seat = seat;
        self.sign(claims)
    }

    fn claims(&self, sub: &str, role: Role, ttl: Duration) -> Claims {
        let now = jsonwebtoken::get_current_timestamp() as i64;
        Claims {
            sub: sub.to_string(),
            role,
            exp: now + ttl.as_secs() as i64,
            iat: Some(now),
            nbf: None,
            iss: self.issuer.clone(),
            aud: self.audience.clone(),
            classroom: None,
            seat: None,
        }
    }

    fn sign(&self, claims: Claims) -> Result<String, MintError> {
        Ok(jsonwebtoken::encode(&self.header, &claims, &self.key)?)
    }
}
