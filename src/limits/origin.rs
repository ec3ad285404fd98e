//! Which browser origins may use the gateway: one list
//! (`CELLGATE_ALLOWED_ORIGINS`) drives both the CORS answers (what a page
//! of another origin may read, polling included) and the `Origin` check of
//! Socket.IO requests, the WebSocket upgrade among them (WebSockets are not
//! subject to CORS, so the server must check).
//!
//! - `["*"]`: any origin, and CORS answers `Access-Control-Allow-Origin: *`
//!   without credentials (never both: a browser would refuse, and it would
//!   let any site ride a user's cookies).
//! - a list of origins: those, echoed one at a time with
//!   `Access-Control-Allow-Credentials: true` (socket.io-client's
//!   `withCredentials`, needed for a load balancer's affinity cookie).
//! - an empty list: same origin only.
//!
//! A request whose `Origin` names the host it was sent to (its `Host`
//! header) is same-origin and always allowed. A request without `Origin`
//! (not a browser: the notebook extension, curl, Node's socket.io-client)
//! is not affected.

use std::time::Duration;

use http::{HeaderValue, Method, header};
use tower_http::cors::{AllowOrigin, CorsLayer};

/// How long a browser may reuse a preflight answer.
const PREFLIGHT_MAX_AGE: Duration = Duration::from_secs(600);

/// The parsed `CELLGATE_ALLOWED_ORIGINS`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AllowedOrigins {
    /// `["*"]`: any origin, no credentials.
    Any,
    /// These origins (normalized `scheme://host[:port]`); empty: same
    /// origin only.
    Listed(Vec<String>),
}

impl AllowedOrigins {
    /// Parses the setting; every unusable entry is named in the error.
    pub fn parse(entries: &[String]) -> Result<Self, Vec<String>> {
        if entries.iter().any(|e| e.trim() == "*") {
            if entries.len() == 1 {
                return Ok(AllowedOrigins::Any);
            }
            return Err(vec![
                "\"*\" allows every origin and cannot be combined with named origins".to_string(),
            ]);
        }
        let mut origins = Vec::new();
        let mut problems = Vec::new();
        for entry in entries {
            match normalize(entry.trim()) {
                Some(origin) => origins.push(origin),
                None => problems.push(format!(
                    "{entry:?} is not an origin (scheme://host[:port], no path)"
                )),
            }
        }
        if problems.is_empty() {
            Ok(AllowedOrigins::Listed(origins))
        } else {
            Err(problems)
        }
    }

    /// Whether a request with `Origin: origin`, sent to `host`, may go on.
    pub fn allows(&self, origin: &str, host: Option<&str>) -> bool {
        if matches!(self, AllowedOrigins::Any) {
            return true;
        }
        let Some(origin) = normalize(origin) else {
            // "null" (sandboxed frames, file:) and garbage.
            return false;
        };
        if host.is_some_and(|host| same_origin(&origin, host)) {
            return true;
        }
        match self {
            AllowedOrigins::Any => true,
            AllowedOrigins::Listed(list) => list.contains(&origin),
        }
    }

    /// The CORS layer for this policy, none for same-origin only.
    pub fn cors(&self) -> Option<CorsLayer> {
        let base = CorsLayer::new()
            .allow_methods([Method::GET, Method::POST])
            .allow_headers([header::AUTHORIZATION, header::CONTENT_TYPE])
            .expose_headers([header::RETRY_AFTER])
            .max_age(PREFLIGHT_MAX_AGE);
        match self {
            AllowedOrigins::Any => Some(base.allow_origin(AllowOrigin::any())),
            AllowedOrigins::Listed(list) if list.is_empty() => None,
            AllowedOrigins::Listed(list) => {
                let values = list
                    .iter()
                    .map(|o| HeaderValue::from_str(o).expect("normalized origins are ASCII"));
                Some(
                    base.allow_origin(AllowOrigin::list(values))
                        .allow_credentials(true),
                )
            }
        }
    }
}

impl std::fmt::Display for AllowedOrigins {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AllowedOrigins::Any => f.write_str("any origin, without credentials"),
            AllowedOrigins::Listed(list) if list.is_empty() => f.write_str("same origin only"),
            AllowedOrigins::Listed(list) => write!(f, "{}", list.join(", ")),
        }
    }
}

/// `scheme://host[:port]` as a browser writes it in `Origin`: lower case,
/// no default port, no trailing slash. `None` for anything else.
fn normalize(origin: &str) -> Option<String> {
    let (scheme, rest) = origin.split_once("://")?;
    let scheme = scheme.to_ascii_lowercase();
    let default_port = match scheme.as_str() {
        "http" => 80,
        "https" => 443,
        _ => return None,
    };
    let authority = rest.strip_suffix('/').unwrap_or(rest);
    if authority.is_empty() || authority.contains(['/', '?', '#', '@', ' ']) {
        return None;
    }
    let (host, port) = split_port(authority)?;
    let host = host.to_ascii_lowercase();
    Some(match port {
        Some(port) if port != default_port => format!("{scheme}://{host}:{port}"),
        _ => format!("{scheme}://{host}"),
    })
}

/// `host[:port]`, the host possibly a bracketed IPv6 address.
fn split_port(authority: &str) -> Option<(&str, Option<u16>)> {
    let (host, port) = match authority.rfind(':') {
        Some(i) if !authority[i..].contains(']') => (&authority[..i], Some(&authority[i + 1..])),
        _ => (authority, None),
    };
    if host.is_empty() {
        return None;
    }
    let port = match port {
        Some(p) => Some(p.parse::<u16>().ok()?),
        None => None,
    };
    Some((host, port))
}

/// Whether the normalized `origin` names `host` (a `Host` header): same
/// host, and the same port when `Host` gives one (a proxy that ends TLS
/// forwards `Host` without the port).
fn same_origin(origin: &str, host: &str) -> bool {
    let Some((scheme, authority)) = origin.split_once("://") else {
        return false;
    };
    let Some((origin_host, origin_port)) = split_port(authority) else {
        return false;
    };
    let Some((host, host_port)) = split_port(host.trim()) else {
        return false;
    };
    if !origin_host.eq_ignore_ascii_case(host) {
        return false;
    }
    let default = if scheme == "https" { 443 } else { 80 };
    match host_port {
        None => origin_port.is_none(),
        Some(port) => origin_port.unwrap_or(default) == port,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listed(entries: &[&str]) -> AllowedOrigins {
        let entries: Vec<String> = entries.iter().map(|s| s.to_string()).collect();
        AllowedOrigins::parse(&entries).unwrap()
    }

    #[test]
    fn origins_are_compared_as_browsers_write_them() {
        let policy = listed(&["https://Dash.Example.edu/", "http://localhost:5173"]);
        assert_eq!(
            policy,
            AllowedOrigins::Listed(vec![
                "https://dash.example.edu".into(),
                "http://localhost:5173".into()
            ])
        );
        assert!(policy.allows("https://dash.example.edu", None));
        assert!(policy.allows("https://dash.example.edu:443", None));
        assert!(policy.allows("http://localhost:5173", None));
        assert!(!policy.allows("http://localhost:5174", None));
        assert!(!policy.allows("https://dash.example.edu.evil.test", None));
        assert!(!policy.allows("null", None));
    }

    #[test]
    fn the_gateways_own_origin_is_always_allowed() {
        let same_only = listed(&[]);
        assert!(same_only.allows("https://gw.example.edu", Some("gw.example.edu")));
        assert!(same_only.allows("http://127.0.0.1:3000", Some("127.0.0.1:3000")));
        assert!(same_only.allows("https://gw.example.edu", Some("gw.example.edu:443")));
        assert!(!same_only.allows("http://127.0.0.1:3001", Some("127.0.0.1:3000")));
        assert!(!same_only.allows("https://evil.test", Some("gw.example.edu")));
        assert!(same_only.cors().is_none());
    }

    #[test]
    fn a_wildcard_stands_alone() {
        assert_eq!(listed(&["*"]), AllowedOrigins::Any);
        assert!(listed(&["*"]).allows("https://anything.test", None));
        let mixed = ["*".to_string(), "https://a.test".to_string()];
        assert!(AllowedOrigins::parse(&mixed).is_err());
    }

    #[test]
    fn every_unusable_entry_is_named() {
        let entries = [
            "https://ok.test",
            "ok.test",
            "ftp://x.test",
            "https://x.test/app",
        ]
        .map(String::from);
        let problems = AllowedOrigins::parse(&entries).unwrap_err();
        assert_eq!(problems.len(), 3, "{problems:?}");
        assert!(problems[0].contains("ok.test"));
    }

    #[test]
    fn ipv6_hosts_keep_their_brackets() {
        let policy = listed(&["http://[::1]:8080"]);
        assert!(policy.allows("http://[::1]:8080", None));
        assert!(!policy.allows("http://[::1]", None));
        assert!(listed(&[]).allows("http://[::1]:3000", Some("[::1]:3000")));
    }
}
