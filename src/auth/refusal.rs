//! The stable refusal codes of the wire contract.

use std::fmt;

/// Why a client was refused. [`fmt::Display`] writes the stable code, which
/// is what reaches the client as `err.message`; [`Refusal::detail`] is for
/// logs and never holds the token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// Missing, malformed, bad signature, wrong algorithm, wrong `iss`/`aud`,
    /// not yet valid, wrong role.
    InvalidToken(&'static str),
    /// `exp` passed, beyond the leeway.
    TokenExpired,
    /// The token is valid but no such instructor exists.
    InstructorNotFound,
    /// The instructor was deactivated.
    InstructorInactive,
    /// The directory did not answer after retries.
    DirectoryUnavailable,
    /// Too many handshakes from one address.
    RateLimited,
    /// The instructor has `CELLGATE_MAX_SOCKETS_PER_INSTRUCTOR` dashboards
    /// on this pod already.
    TooManyConnections,
    /// This pod holds `CELLGATE_MAX_SOCKETS` dashboards.
    ServerFull,
}

impl Refusal {
    /// An `invalid_token` refusal with the reason kept for the log.
    pub fn invalid(detail: &'static str) -> Self {
        Refusal::InvalidToken(detail)
    }

    /// The stable code.
    pub fn code(&self) -> &'static str {
        match self {
            Refusal::InvalidToken(_) => "invalid_token",
            Refusal::TokenExpired => "token_expired",
            Refusal::InstructorNotFound => "instructor_not_found",
            Refusal::InstructorInactive => "instructor_inactive",
            Refusal::DirectoryUnavailable => "directory_unavailable",
            Refusal::RateLimited => "rate_limited",
            Refusal::TooManyConnections => "too_many_connections",
            Refusal::ServerFull => "server_full",
        }
    }

    /// A short human explanation.
    pub fn detail(&self) -> &'static str {
        match self {
            Refusal::InvalidToken(detail) => detail,
            Refusal::TokenExpired => "the token has expired",
            Refusal::InstructorNotFound => "no instructor with this e-mail in the directory",
            Refusal::InstructorInactive => "the instructor is deactivated",
            Refusal::DirectoryUnavailable => "the instructor directory did not answer",
            Refusal::RateLimited => "too many handshakes from this address",
            Refusal::TooManyConnections => "the instructor has too many dashboards open",
            Refusal::ServerFull => "this gateway holds as many dashboards as it may",
        }
    }

    /// Every code, for metrics that must exist before the first refusal.
    pub const CODES: [&'static str; 8] = [
        "invalid_token",
        "token_expired",
        "instructor_not_found",
        "instructor_inactive",
        "directory_unavailable",
        "rate_limited",
        "too_many_connections",
        "server_full",
    ];
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

impl std::error::Error for Refusal {}
