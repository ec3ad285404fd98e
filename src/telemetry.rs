//! Log set-up: text for people in development, JSON lines in production.
//! Logs go to standard error so that commands such as `cellgate token`
//! keep standard output for their result.

use tracing_subscriber::EnvFilter;

use crate::config::{LogFormat, Profile};

/// Default filter when `RUST_LOG` is not set.
const DEFAULT_FILTER: &str = "info,sqlx=warn,socketioxide=warn,engineioxide=warn";

/// Installs the global subscriber. Safe to call once per process.
pub fn init(format: LogFormat, profile: Profile) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    let json = match format {
        LogFormat::Json => true,
        LogFormat::Text => false,
        LogFormat::Auto => profile == Profile::Production,
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let result = if json {
        builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .try_init()
    } else {
        builder.with_target(false).try_init()
    };
    // A second call (tests, the demo) keeps the first subscriber.
    let _ = result;
}
