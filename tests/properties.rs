//! Property tests against the built gateway: arbitrary ingest bodies and
//! arbitrary dashboard payloads. Whatever arrives, the answer is a 4xx with
//! a field error (or a 202), the socket stays connected with an
//! acknowledgement that says what was wrong, and nothing panics.

mod common;

use std::cell::RefCell;
use std::collections::HashMap;

use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use serde_json::{Value, json};

use common::gateway::{Gateway, Handshake, sign_hs256};

fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        (-1e9f64..1e9).prop_map(Value::from),
        "\\PC{0,16}".prop_map(Value::from),
        prop::sample::select(&["cls-1", "s-1", "cell_executed", "help_requested", "ok"][..])
            .prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 32, 6, |inner| {
        let key = prop_oneof![
            prop::sample::select(
                &[
                    "id",
                    "type",
                    "classroom",
                    "seat",
                    "student",
                    "status",
                    "error",
                    "message",
                    "token",
                    "request_id",
                    "__proto__",
                ][..]
            )
            .prop_map(String::from),
            "\\PC{0,6}",
        ];
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
            prop::collection::btree_map(key, inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A body: raw bytes (often not JSON at all) or a JSON value.
fn any_body() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..256),
        any_json().prop_map(|v| serde_json::to_vec(&v).unwrap()),
        any_json().prop_map(|v| {
            // An almost valid event with one field replaced.
            let mut event = json!({ "id": "e", "type": "cell_executed", "classroom": "cls-1",
                                    "seat": 1, "student": "s-1", "status": "ok" });
            event["status"] = v;
            serde_json::to_vec(&event).unwrap()
        }),
    ]
}

async fn seeded_gateway() -> Gateway {
    // Hundreds of requests with one student token in a second or two: the
    // ingest rate limit (tests/e2e/limits.test.mjs) would answer 429.
    let unlimited = HashMap::from([("CELLGATE_INGEST_PER_MINUTE", "0")]);
    let gw = Gateway::start(&unlimited).await;
    gw.cli(&["instructors", "add", "ada@example.edu", "--name", "Ada"]);
    gw.cli(&["classrooms", "add", "cls-1", "--seats", "4"]);
    gw.cli(&["classrooms", "staff", "cls-1", "ada@example.edu"]);
    gw
}

fn token(gw: &Gateway, claims: Value) -> String {
    let mut claims = claims;
    claims["exp"] = json!(jsonwebtoken::get_current_timestamp() + 3600);
    sign_hs256(&claims, &gw.secret)
}

#[test]
fn arbitrary_ingest_bodies_get_a_4xx_with_field_errors_or_a_202() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let gw = rt.block_on(seeded_gateway());
    let student = token(
        &gw,
        json!({ "sub": "s-1", "role": "student", "classroom": "cls-1", "seat": 1 }),
    );
    let client = reqwest::Client::new();
    let url = format!("http://{}/api/v1/events", gw.addr);

    let mut runner = TestRunner::new(Config::with_cases(300));
    let outcome = runner.run(&any_body(), |body| {
        let (status, text) = rt.block_on(async {
            let answer = client
                .post(&url)
                .bearer_auth(&student)
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .expect("the gateway answers");
            (answer.status().as_u16(), answer.text().await.unwrap())
        });
        prop_assert!([202, 400, 403].contains(&status), "status {status}: {text}");
        if status == 400 {
            let errors: Value = serde_json::from_str(&text).expect("a JSON answer");
            let errors = errors["errors"].as_array().expect("errors[]").clone();
            prop_assert!(!errors.is_empty());
            for e in errors {
                prop_assert!(e["index"].is_u64(), "{e}");
                prop_assert!(e["field"].is_string(), "{e}");
                prop_assert!(!e["message"].as_str().unwrap_or("").is_empty(), "{e}");
            }
        }
        Ok(())
    });
    let log = rt.block_on(gw.stop());
    assert!(!log.contains("panicked"), "the gateway panicked");
    outcome.unwrap();
}

#[test]
fn arbitrary_dashboard_payloads_get_an_acknowledgement_and_the_socket_stays() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let gw = rt.block_on(seeded_gateway());
    let instructor = token(
        &gw,
        json!({ "sub": "ada@example.edu", "role": "instructor" }),
    );
    let socket = RefCell::new(rt.block_on(async {
        let mut socket = gw.socket().await;
        assert_eq!(socket.connect(&instructor).await, Handshake::Accepted);
        socket
    }));

    let events = prop::sample::select(
        &[
            "join_classroom",
            "leave_classroom",
            "claim_help",
            "resolve_help",
            "set_status",
            "refresh_token",
        ][..],
    );
    let mut runner = TestRunner::new(Config::with_cases(300));
    let outcome = runner.run(&(events, any_json()), |(event, payload)| {
        let ack = rt.block_on(socket.borrow_mut().emit_with_ack(event, payload));
        let ok = ack["ok"].as_bool();
        prop_assert!(ok.is_some(), "{event}: {ack}");
        if ok == Some(false) {
            let error = ack["error"].as_str().unwrap_or("");
            prop_assert!(!error.is_empty(), "{event}: {ack}");
        }
        Ok(())
    });

    // Still the same socket, still answering.
    let join = rt.block_on(
        socket
            .borrow_mut()
            .emit_with_ack("join_classroom", json!({ "classroom": "cls-1" })),
    );
    assert_eq!(join["ok"], true, "{join}");
    let log = rt.block_on(gw.stop());
    assert!(!log.contains("panicked"), "the gateway panicked");
    outcome.unwrap();
}
