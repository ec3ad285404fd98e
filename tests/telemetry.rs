//! Traces and logs of a real gateway process.
//!
//! A real OTLP/gRPC receiver (the collector's own service definition, from
//! `opentelemetry-proto`) listens on loopback; the built `cellgate serve`
//! runs with `OTEL_EXPORTER_OTLP_ENDPOINT` pointing at it, JSON logs, and a
//! SQLite directory. Dashboards handshake over Socket.IO with good and bad
//! tokens, a notebook posts events with a student token, then the gateway is
//! stopped with SIGTERM: the spans must have arrived (flushed at shutdown),
//! with the expected parent links, and neither a span attribute nor a log
//! line may hold a token or the JWT secret. Without the variables, nothing
//! may be sent and no exporter thread may run.

mod common;

use std::collections::HashMap;

use common::gateway::{Gateway, Handshake};
use common::otlp::receiver;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::Span;

fn attr(span: &Span, key: &str) -> Option<String> {
    let value = span.attributes.iter().find(|kv| kv.key == key)?;
    match value.value.as_ref()?.value.as_ref()? {
        Value::StringValue(s) => Some(s.clone()),
        Value::IntValue(i) => Some(i.to_string()),
        Value::BoolValue(b) => Some(b.to_string()),
        Value::DoubleValue(d) => Some(d.to_string()),
        other => Some(format!("{other:?}")),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The spans by name, and a lookup from span id to span.
struct Trace {
    spans: Vec<Span>,
}

impl Trace {
    fn named(&self, name: &str) -> Vec<&Span> {
        self.spans.iter().filter(|s| s.name == name).collect()
    }

    fn children(&self, parent: &Span) -> Vec<&Span> {
        let is_child =
            |s: &&Span| s.parent_span_id == parent.span_id && s.trace_id == parent.trace_id;
        self.spans.iter().filter(is_child).collect()
    }

    fn child(&self, parent: &Span, name: &str) -> &Span {
        self.children(parent)
            .into_iter()
            .find(|s| s.name == name)
            .unwrap_or_else(|| panic!("{} has no child {name}", parent.name))
    }

    fn root(&self, name: &str, key: &str, value: &str) -> &Span {
        let span = self
            .named(name)
            .into_iter()
            .find(|s| attr(s, key).as_deref() == Some(value))
            .unwrap_or_else(|| panic!("no {name} span with {key}={value}: {}", self.summary()));
        assert!(span.parent_span_id.is_empty(), "{name} is a root span");
        span
    }

    fn summary(&self) -> String {
        let names: Vec<_> = self.spans.iter().map(|s| s.name.as_str()).collect();
        format!("{names:?}")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshakes_and_ingest_are_traced_and_nothing_secret_leaks() {
    let (received, addr) = receiver("127.0.0.1:0").await.expect("receiver");
    let endpoint = format!("http://{addr}");
    let env = HashMap::from([
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
        // Only the flush at shutdown can deliver the spans in time.
        ("OTEL_BSP_SCHEDULE_DELAY", "600000"),
        ("OTEL_SERVICE_NAME", "cellgate-test"),
    ]);
    let gw = Gateway::start(&env).await;
    assert!(gw.has_thread("OpenTelemetry.T"), "the exporter thread runs");

    let secrets = traffic(&gw).await;
    let logs = gw.stop().await;

    let spans = received.spans.lock().unwrap().clone();
    let trace = Trace { spans };

    let accepted = trace.root("handshake", "outcome", "accepted");
    let verify = trace.child(accepted, "auth.verify_token");
    assert_eq!(attr(verify, "role").as_deref(), Some("instructor"));
    let lookup = trace.child(accepted, "directory.lookup");
    assert_eq!(attr(lookup, "kind").as_deref(), Some("instructor"));
    assert_eq!(attr(lookup, "cache").as_deref(), Some("miss"));
    trace.child(lookup, "directory.query");
    assert!(attr(accepted, "instructor_id").is_some());

    let refused = trace.root("handshake", "reason", "invalid_token");
    assert_eq!(attr(refused, "outcome").as_deref(), Some("refused"));
    assert!(
        trace
            .children(refused)
            .iter()
            .all(|s| s.name != "directory.lookup"),
        "a bad token never reaches the directory"
    );
    trace.root("handshake", "reason", "instructor_not_found");

    let ingest = trace.root("ingest", "http.response.status_code", "202");
    assert_eq!(attr(ingest, "accepted").as_deref(), Some("2"));
    trace.child(ingest, "auth.verify_token");
    let classroom = trace.child(ingest, "directory.lookup");
    assert_eq!(attr(classroom, "kind").as_deref(), Some("classroom"));
    let broadcasts: Vec<_> = trace
        .children(ingest)
        .into_iter()
        .filter(|s| s.name == "broadcast")
        .collect();
    let events: Vec<_> = broadcasts.iter().filter_map(|s| attr(s, "event")).collect();
    assert!(
        events.iter().filter(|e| *e == "cell_executed").count() == 2,
        "{events:?}"
    );
    assert!(events.iter().any(|e| e == "seat_updated"), "{events:?}");
    let watched = broadcasts
        .iter()
        .any(|s| attr(s, "fanout_sockets").as_deref() == Some("1"));
    assert!(
        watched,
        "the joined dashboard counts in a broadcast's fan-out"
    );
    trace.root("ingest", "http.response.status_code", "401");

    // Log lines inside a span carry its trace id.
    let accepted_line = logs
        .lines()
        .find(|l| l.contains("connection accepted"))
        .expect("an accepted handshake is logged");
    let line: serde_json::Value = serde_json::from_str(accepted_line).expect("a JSON line");
    assert_eq!(line["trace_id"], hex(&accepted.trace_id), "{accepted_line}");
    assert_eq!(line["level"], "INFO");

    let attributes: Vec<String> = trace
        .spans
        .iter()
        .flat_map(|s| {
            s.attributes
                .iter()
                .map(|kv| format!("{}={:?}", kv.key, kv.value))
        })
        .collect();
    assert!(
        logs.contains(r#""level":"TRACE""#),
        "the scan covers every level"
    );
    assert_no_secrets("span attributes", &attributes.join("\n"), &secrets);
    assert_no_secrets("log lines", &logs, &secrets);
    assert_levels(&logs);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_variables_nothing_is_exported() {
    // The OTLP/gRPC default endpoint: a gateway exporting with defaults would
    // reach this receiver. Another process may hold the port; then the
    // thread and log checks still stand.
    let default = receiver("127.0.0.1:4317").await.ok();
    let env = HashMap::from([("OTEL_SERVICE_NAME", "cellgate-test")]);
    let gw = Gateway::start(&env).await;
    assert!(!gw.has_thread("OpenTelemetry.T"), "no exporter thread");

    let secrets = traffic(&gw).await;
    let logs = gw.stop().await;

    if let Some((received, _)) = default {
        assert_eq!(*received.calls.lock().unwrap(), 0, "nothing sent");
    }
    assert!(!logs.contains("trace_id"), "no trace ids without traces");
    assert!(!logs.contains("exporting traces"));
    assert_no_secrets("log lines", &logs, &secrets);
}

/// Handshakes with a good token, a garbage token, a token signed with
/// another secret and a token of an unknown instructor; two events and one
/// refused post. Returns every secret the gateway saw.
async fn traffic(gw: &Gateway) -> Vec<String> {
    gw.cli(&["instructors", "add", "ada@example.edu", "--name", "Ada"]);
    gw.cli(&["classrooms", "add", "cls-1", "--seats", "4"]);
    gw.cli(&["classrooms", "staff", "cls-1", "ada@example.edu"]);
    let good = gw.cli(&["token", "instructor", "ada@example.edu"]);
    let student = gw.cli(&[
        "token",
        "student",
        "s-1",
        "--classroom",
        "cls-1",
        "--seat",
        "1",
    ]);
    let forged = common::gateway::sign_hs256(
        &serde_json::json!({ "sub": "ada@example.edu", "role": "instructor", "exp": 4_000_000_000u64 }),
        "not-the-secret-at-all-not-the-secret-at-all",
    );
    let stranger = common::gateway::sign_hs256(
        &serde_json::json!({ "sub": "eve@example.edu", "role": "instructor", "exp": 4_000_000_000u64 }),
        &gw.secret,
    );

    let mut dashboard = gw.socket().await;
    let Handshake::Accepted = dashboard.connect(&good).await else {
        panic!("the good token is refused");
    };
    assert_eq!(
        dashboard
            .emit_with_ack(
                "join_classroom",
                serde_json::json!({ "classroom": "cls-1" })
            )
            .await["ok"],
        true
    );
    for (token, code) in [
        ("garbage", "invalid_token"),
        (forged.as_str(), "invalid_token"),
        (stranger.as_str(), "instructor_not_found"),
    ] {
        let refused = gw.socket().await.connect(token).await;
        assert_eq!(refused, Handshake::Refused(code.to_string()));
    }

    let events = serde_json::json!([
        { "id": "e-1", "type": "cell_executed", "classroom": "cls-1", "student": "s-1", "status": "ok" },
        { "id": "e-2", "type": "cell_executed", "classroom": "cls-1", "student": "s-1", "status": "error" },
    ]);
    assert_eq!(gw.post_events(&student, &events).await, 202);
    assert_eq!(gw.post_events(&forged, &events).await, 401);
    drop(dashboard);

    vec![good, student, forged, stranger, gw.secret.clone()]
}

fn assert_no_secrets(what: &str, text: &str, secrets: &[String]) {
    assert!(text.len() > 100, "{what}: too little to scan");
    for (n, secret) in secrets.iter().enumerate() {
        // A JWT's signature alone, or its payload, is as bad as all of it.
        let parts = secret.split('.').filter(|p| p.len() >= 16);
        for part in std::iter::once(secret.as_str()).chain(parts) {
            if let Some(line) = text.lines().find(|l| l.contains(part)) {
                // Say where, without printing the secret.
                let target = line.split(r#""target":""#).nth(1).unwrap_or("?");
                let target = target.split('"').next().unwrap_or("?");
                panic!("{what} hold secret #{n} (log target {target})");
            }
        }
    }
}

/// A stranger's bad token is not the operator's problem: refusals are not
/// logged as errors or warnings (only a directory outage is).
fn assert_levels(logs: &str) {
    for line in logs.lines().filter(|l| l.contains("connection refused")) {
        let line: serde_json::Value = serde_json::from_str(line).expect("a JSON line");
        assert_eq!(line["level"], "INFO", "{line}");
    }
    assert!(
        !logs.contains(r#""level":"ERROR""#),
        "no error in a healthy run:\n{logs}"
    );
}
