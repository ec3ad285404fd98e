//! Logs and traces.
//!
//! Logs: text for people in development, JSON lines in production, on
//! standard error (so that commands such as `cellgate token` keep standard
//! output for their result). `RUST_LOG` filters them, except that the
//! libraries that log whole packets never log below `info`.
//!
//! Traces: the gateway's own spans (`handshake`, `ingest`, `broadcast` and
//! their children) are exported by OTLP/gRPC when the standard
//! `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`)
//! variable is set; the other `OTEL_*` variables of the specification
//! (headers, timeout, sampler, service name, resource attributes) are read
//! by the OpenTelemetry SDK. With no endpoint the OpenTelemetry layer is not
//! installed at all, so spans cost what the log layer costs and nothing more.
//! While exporting, every log line inside a span carries `trace_id` and
//! `span_id`, so that a log line leads to its trace.

use std::fmt;

use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::filter::{FilterExt, Targets};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::config::{LogFormat, Profile};

/// Default filter when `RUST_LOG` is not set.
const DEFAULT_FILTER: &str = "info,sqlx=warn,socketioxide=warn,engineioxide=warn";

/// The instrumentation scope of cellgate's spans.
const TRACER_NAME: &str = "cellgate";

/// Whether traces are exported, and what to flush at the end.
#[must_use = "call shutdown() before exiting, or the last spans are lost"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Whether spans are exported by OTLP.
    pub fn exporting(&self) -> bool {
        self.provider.is_some()
    }

    /// Sends the spans still buffered and stops the exporter. The SDK blocks
    /// while it flushes, so this runs off the async workers.
    pub async fn shutdown(self) {
        let Some(provider) = self.provider else {
            return;
        };
        let flushed = tokio::task::spawn_blocking(move || provider.shutdown()).await;
        match flushed {
            Ok(Ok(())) => {}
            Ok(Err(error)) => tracing::warn!(%error, "traces not flushed at shutdown"),
            Err(error) => tracing::warn!(%error, "traces not flushed at shutdown"),
        }
    }
}

/// Installs the global subscriber; with `traces`, also the OTLP exporter
/// when the environment asks for it. Must run inside the Tokio runtime
/// (the gRPC channel lives there). A second call (tests, the demo) keeps
/// the first subscriber and exports nothing.
pub fn init(format: LogFormat, profile: Profile, traces: bool) -> Telemetry {
    let json = match format {
        LogFormat::Json => true,
        LogFormat::Text => false,
        LogFormat::Auto => profile == Profile::Production,
    };
    let exporter = traces.then(|| OtlpSettings::from_env(env_var)).flatten();
    let built = exporter.as_ref().map(OtlpSettings::provider);
    let (provider, problem) = match built {
        Some(Ok(provider)) => (Some(provider), None),
        Some(Err(problem)) => (None, Some(problem)),
        None => (None, None),
    };

    let otel = provider.as_ref().map(|provider| {
        let tracer = provider.tracer(TRACER_NAME);
        let own_spans = Targets::new().with_target(env!("CARGO_CRATE_NAME"), Level::INFO);
        tracing_opentelemetry::layer()
            .with_tracer(tracer)
            .with_filter(own_spans)
    });
    let installed = tracing_subscriber::registry()
        .with(otel)
        .with(log_layer(json))
        .try_init()
        .is_ok();

    if let Some(settings) = &exporter {
        settings.announce(problem);
    }
    if !installed {
        if let Some(provider) = provider {
            let _ = provider.shutdown();
        }
        return Telemetry { provider: None };
    }
    Telemetry { provider }
}

/// Libraries that write whole packets (a handshake's `auth.token`, an
/// `Authorization` header) to their logs below `info`. Whatever `RUST_LOG`
/// says, their lines stop at `info`: no token reaches a log line.
const PACKET_LOGGERS: [&str; 3] = ["socketioxide", "engineioxide", "tungstenite"];

/// The log layer: text or JSON lines, filtered by `RUST_LOG` within the
/// [`PACKET_LOGGERS`] cap.
fn log_layer<S>(json: bool) -> Box<dyn Layer<S> + Send + Sync>
where
    S: Subscriber + for<'a> LookupSpan<'a> + Send + Sync,
{
    let wanted =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    let capped = PACKET_LOGGERS
        .iter()
        .fold(Targets::new().with_default(Level::TRACE), |caps, target| {
            caps.with_target(*target, Level::INFO)
        });
    let filter = wanted.and(capped);
    // Colours only for a terminal: a log file or a collector gets plain text.
    let layer = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    if json {
        let format = tracing_subscriber::fmt::format()
            .json()
            .flatten_event(true)
            .with_current_span(true);
        let format = WithTraceIds {
            inner: format,
            json,
        };
        layer
            .json()
            .event_format(format)
            .with_filter(filter)
            .boxed()
    } else {
        let format = tracing_subscriber::fmt::format().with_target(false);
        let format = WithTraceIds {
            inner: format,
            json,
        };
        layer.event_format(format).with_filter(filter).boxed()
    }
}

/// What the `OTEL_*` environment asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OtlpSettings {
    /// The collector, as given.
    pub endpoint: String,
    /// A protocol other than gRPC, which this build does not speak.
    pub unsupported_protocol: Option<String>,
}

impl OtlpSettings {
    /// `None` when no endpoint is set, or when the SDK or the trace exporter
    /// is switched off (`OTEL_SDK_DISABLED=true`, `OTEL_TRACES_EXPORTER=none`).
    pub fn from_env(var: impl Fn(&str) -> Option<String>) -> Option<Self> {
        let set = |name: &str| var(name).filter(|v| !v.trim().is_empty());
        if set("OTEL_SDK_DISABLED").is_some_and(|v| v.trim().eq_ignore_ascii_case("true")) {
            return None;
        }
        if set("OTEL_TRACES_EXPORTER").is_some_and(|v| v.trim().eq_ignore_ascii_case("none")) {
            return None;
        }
        let endpoint = set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
            .or_else(|| set("OTEL_EXPORTER_OTLP_ENDPOINT"))?;
        let protocol = set("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
            .or_else(|| set("OTEL_EXPORTER_OTLP_PROTOCOL"))
            .filter(|p| p.trim() != "grpc");
        Some(OtlpSettings {
            endpoint,
            unsupported_protocol: protocol,
        })
    }

    /// The tracer provider with a batching OTLP/gRPC exporter, or why there
    /// is none.
    fn provider(&self) -> Result<SdkTracerProvider, String> {
        if let Some(protocol) = &self.unsupported_protocol {
            return Err(format!(
                "OTEL_EXPORTER_OTLP_PROTOCOL={protocol}: only grpc is supported"
            ));
        }
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .build()
            .map_err(|error| error.to_string())?;
        Ok(SdkTracerProvider::builder()
            .with_resource(resource())
            .with_batch_exporter(exporter)
            .build())
    }

    /// One log line saying where traces go, or why they do not (the
    /// endpoint is not secret; headers, which may hold credentials, are not
    /// logged).
    fn announce(&self, problem: Option<String>) {
        match problem {
            None => tracing::info!(endpoint = %self.endpoint, "exporting traces by OTLP/gRPC"),
            Some(error) => tracing::warn!(
                endpoint = %self.endpoint,
                %error,
                "traces are not exported"
            ),
        }
    }
}

fn env_var(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

/// `service.name` is `cellgate` unless `OTEL_SERVICE_NAME` or
/// `OTEL_RESOURCE_ATTRIBUTES` names it; the SDK reads both.
fn resource() -> Resource {
    let named = env_var("OTEL_SERVICE_NAME").is_some()
        || env_var("OTEL_RESOURCE_ATTRIBUTES").is_some_and(|a| a.contains("service.name="));
    let builder = Resource::builder().with_attribute(opentelemetry::KeyValue::new(
        "service.version",
        env!("CARGO_PKG_VERSION"),
    ));
    if named {
        builder.build()
    } else {
        builder.with_service_name("cellgate").build()
    }
}

/// Adds `trace_id` and `span_id` of the innermost exported span to a log
/// line: first keys of a JSON line, last fields of a text line.
struct WithTraceIds<F> {
    inner: F,
    json: bool,
}

impl<S, N, F> FormatEvent<S, N> for WithTraceIds<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let Some((trace_id, span_id)) = trace_ids(ctx) else {
            return self.inner.format_event(ctx, writer, event);
        };
        let mut line = String::new();
        self.inner
            .format_event(ctx, Writer::new(&mut line), event)?;
        let ids = if self.json {
            format!(r#""trace_id":"{trace_id}","span_id":"{span_id}","#)
        } else {
            format!(" trace_id={trace_id} span_id={span_id}")
        };
        writer.write_str(&splice(&line, &ids, self.json))
    }
}

/// Puts `ids` after the opening brace of a JSON object, or before the
/// newline of a text line.
fn splice(line: &str, ids: &str, json: bool) -> String {
    if json {
        match line.strip_prefix('{') {
            Some(rest) => format!("{{{ids}{rest}"),
            None => line.to_string(),
        }
    } else {
        let body = line.strip_suffix('\n').unwrap_or(line);
        format!("{body}{ids}\n")
    }
}

/// The trace and span id of the innermost span of the event that the
/// OpenTelemetry layer exports, if any.
fn trace_ids<S, N>(ctx: &FmtContext<'_, S, N>) -> Option<(String, String)>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    let scope = ctx.event_scope()?;
    let dispatch = tracing::dispatcher::get_default(Clone::clone);
    scope.into_iter().find_map(|span| {
        let cx = tracing_opentelemetry::get_otel_context(&span.id(), &dispatch)?;
        let otel_span = cx.span();
        let span_context = otel_span.span_context();
        span_context.is_valid().then(|| {
            let trace_id = span_context.trace_id().to_string();
            (trace_id, span_context.span_id().to_string())
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |name| {
            pairs
                .iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn no_endpoint_means_no_export() {
        assert_eq!(OtlpSettings::from_env(env(&[])), None);
        let blank = [("OTEL_EXPORTER_OTLP_ENDPOINT", " ")];
        assert_eq!(OtlpSettings::from_env(env(&blank)), None);
    }

    #[test]
    fn the_traces_endpoint_wins_and_switches_turn_it_off() {
        let both = [
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://a:4317"),
            ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://b:4317"),
        ];
        let settings = OtlpSettings::from_env(env(&both)).expect("exporting");
        assert_eq!(settings.endpoint, "http://b:4317");
        assert_eq!(settings.unsupported_protocol, None);

        let disabled = [
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://a:4317"),
            ("OTEL_SDK_DISABLED", "true"),
        ];
        assert_eq!(OtlpSettings::from_env(env(&disabled)), None);
        let none = [
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://a:4317"),
            ("OTEL_TRACES_EXPORTER", "none"),
        ];
        assert_eq!(OtlpSettings::from_env(env(&none)), None);
    }

    #[test]
    fn an_http_protocol_is_reported_not_silently_ignored() {
        let http = [
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://a:4318"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
        ];
        let settings = OtlpSettings::from_env(env(&http)).expect("asked for");
        assert_eq!(
            settings.unsupported_protocol.as_deref(),
            Some("http/protobuf")
        );
        assert!(settings.provider().is_err());
    }

    #[test]
    fn trace_ids_go_first_in_json_and_last_in_text() {
        let ids = r#""trace_id":"t","span_id":"s","#;
        assert_eq!(
            splice(r#"{"level":"INFO"}"#, ids, true),
            r#"{"trace_id":"t","span_id":"s","level":"INFO"}"#
        );
        assert_eq!(
            splice("INFO hello\n", " trace_id=t span_id=s", false),
            "INFO hello trace_id=t span_id=s\n"
        );
    }
}
