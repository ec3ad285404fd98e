//! All-or-nothing validation of an ingest body, with one error per bad
//! field so that an extension author sees everything wrong at once.

use serde::Serialize;
use serde_json::{Map, Value};

use crate::auth::Claims;

/// Most events in one request.
pub const MAX_BATCH: usize = 500;

/// Longest help message, in characters.
pub const MAX_MESSAGE_CHARS: usize = 500;

/// The kinds of event a notebook extension posts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    /// A cell ran.
    CellExecuted,
    /// The student asks for help.
    HelpRequested,
    /// The student withdraws their request.
    HelpCancelled,
}

impl EventType {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::CellExecuted => "cell_executed",
            EventType::HelpRequested => "help_requested",
            EventType::HelpCancelled => "help_cancelled",
        }
    }

    fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "cell_executed" => EventType::CellExecuted,
            "help_requested" => EventType::HelpRequested,
            "help_cancelled" => EventType::HelpCancelled,
            _ => return None,
        })
    }
}

/// One field of one item that is wrong.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FieldError {
    /// Position in the batch (0 for a single object).
    pub index: usize,
    /// The field's name (empty for the item itself).
    pub field: String,
    /// What is wrong.
    pub message: String,
}

/// A valid event, ready to apply.
#[derive(Debug, Clone)]
pub struct Event {
    /// The client's idempotency key.
    pub id: String,
    /// Its kind.
    pub kind: EventType,
    /// Seat number (from the body or, failing that, the token).
    pub seat: u32,
    /// `cell_executed`: whether the cell failed.
    pub failed: bool,
    /// `help_requested`: the student's message.
    pub message: Option<String>,
    /// `help_cancelled`: the request to cancel, if named.
    pub request_id: Option<String>,
    /// The object as posted (with `seat` filled in), for the broadcast.
    pub body: Map<String, Value>,
}

/// Why a body was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum Invalid {
    /// 400: these fields are wrong.
    Fields(Vec<FieldError>),
    /// 403: the token may not post this.
    Forbidden(String),
}

/// Validates every item of `body` against the token's `claims` and the
/// classroom's seat count. Nothing is applied unless all items pass.
pub fn validate(body: Value, claims: &Claims, seats: u32) -> Result<Vec<Event>, Invalid> {
    let items = match body {
        Value::Array(items) if items.is_empty() => {
            return Err(fields(0, "", "the batch is empty"));
        }
        Value::Array(items) if items.len() > MAX_BATCH => {
            return Err(fields(
                0,
                "",
                &format!("at most {MAX_BATCH} events per request"),
            ));
        }
        Value::Array(items) => items,
        single => vec![single],
    };

    let mut errors = Vec::new();
    let mut events = Vec::with_capacity(items.len());
    for (index, item) in items.into_iter().enumerate() {
        let mut check = Check {
            index,
            errors: &mut errors,
        };
        if let Some(event) = check.item(item, claims, seats)? {
            events.push(event);
        }
    }
    if errors.is_empty() {
        Ok(events)
    } else {
        Err(Invalid::Fields(errors))
    }
}

fn fields(index: usize, field: &str, message: &str) -> Invalid {
    Invalid::Fields(vec![FieldError {
        index,
        field: field.into(),
        message: message.into(),
    }])
}

struct Check<'a> {
    index: usize,
    errors: &'a mut Vec<FieldError>,
}

impl Check<'_> {
    fn fail(&mut self, field: &str, message: impl Into<String>) {
        self.errors.push(FieldError {
            index: self.index,
            field: field.to_string(),
            message: message.into(),
        });
    }

    fn item(&mut self, item: Value, claims: &Claims, seats: u32) -> Result<Option<Event>, Invalid> {
        let Value::Object(mut body) = item else {
            self.fail("", "each event must be a JSON object");
            return Ok(None);
        };

        let classroom = self.text(&body, "classroom", 1, 64, true);
        let student = self.text(&body, "student", 1, 128, true);
        if classroom
            .as_deref()
            .is_some_and(|c| Some(c) != claims.classroom.as_deref())
        {
            return Err(Invalid::Forbidden(
                "the token may not post to this classroom".into(),
            ));
        }
        if student.as_deref().is_some_and(|s| s != claims.sub) {
            return Err(Invalid::Forbidden(
                "the token belongs to another student".into(),
            ));
        }

        let id = self.text(&body, "id", 1, 128, true);
        let kind = match body.get("type") {
            None => {
                self.fail("type", "required");
                None
            }
            Some(Value::String(t)) => EventType::parse(t).or_else(|| {
                self.fail(
                    "type",
                    "must be cell_executed, help_requested or help_cancelled",
                );
                None
            }),
            Some(_) => {
                self.fail("type", "must be a string");
                None
            }
        };
        let seat = self.seat(&body, claims, seats)?;
        self.timestamp(&body, "occurred_at");

        let mut failed = false;
        let mut message = None;
        let mut request_id = None;
        match kind {
            Some(EventType::CellExecuted) => failed = self.cell(&body),
            Some(EventType::HelpRequested) => {
                message = self.text(&body, "message", 0, usize::MAX, false);
                if message
                    .as_ref()
                    .is_some_and(|m| m.chars().count() > MAX_MESSAGE_CHARS)
                {
                    self.fail("message", format!("at most {MAX_MESSAGE_CHARS} characters"));
                }
            }
            Some(EventType::HelpCancelled) => {
                request_id = self.text(&body, "request_id", 1, 128, false);
            }
            None => {}
        }

        let (Some(id), Some(kind), Some(seat)) = (id, kind, seat) else {
            return Ok(None);
        };
        body.insert("seat".into(), Value::from(seat));
        Ok(Some(Event {
            id,
            kind,
            seat,
            failed,
            message,
            request_id,
            body,
        }))
    }

    /// A string field of `min..=max` characters; `None` when absent or bad.
    fn text(
        &mut self,
        body: &Map<String, Value>,
        field: &str,
        min: usize,
        max: usize,
        required: bool,
    ) -> Option<String> {
        match body.get(field) {
            None | Some(Value::Null) if required => {
                self.fail(field, "required");
                None
            }
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => {
                let len = s.chars().count();
                if len < min || len > max {
                    let message = if max == usize::MAX {
                        format!("must have at least {min} characters")
                    } else {
                        format!("must have {min} to {max} characters")
                    };
                    self.fail(field, message);
                }
                Some(s.clone())
            }
            Some(_) => {
                self.fail(field, "must be a string");
                None
            }
        }
    }

    fn seat(
        &mut self,
        body: &Map<String, Value>,
        claims: &Claims,
        seats: u32,
    ) -> Result<Option<u32>, Invalid> {
        let seat = match body.get("seat") {
            None | Some(Value::Null) => match claims.seat {
                Some(seat) => seat,
                None => {
                    self.fail("seat", "required (the token names no seat)");
                    return Ok(None);
                }
            },
            Some(value) => match value.as_u64() {
                Some(seat) => u32::try_from(seat).unwrap_or(u32::MAX),
                None => {
                    self.fail("seat", "must be a positive whole number");
                    return Ok(None);
                }
            },
        };
        if claims.seat.is_some_and(|own| own != seat) {
            return Err(Invalid::Forbidden(
                "the token belongs to another seat".into(),
            ));
        }
        if seat == 0 || seat > seats {
            self.fail("seat", format!("must be between 1 and {seats}"));
            return Ok(None);
        }
        Ok(Some(seat))
    }

    fn timestamp(&mut self, body: &Map<String, Value>, field: &str) {
        match body.get(field) {
            None | Some(Value::Null) => {}
            Some(Value::String(s)) if chrono::DateTime::parse_from_rfc3339(s).is_ok() => {}
            Some(_) => self.fail(field, "must be an RFC 3339 timestamp"),
        }
    }

    /// Checks the fields of a `cell_executed`; returns whether the cell failed.
    fn cell(&mut self, body: &Map<String, Value>) -> bool {
        let failed = match body.get("status").and_then(Value::as_str) {
            Some("ok") => false,
            Some("error") => true,
            _ => {
                self.fail("status", "must be \"ok\" or \"error\"");
                false
            }
        };
        self.text(body, "notebook", 1, 1024, false);
        self.text(body, "cell_id", 1, 256, false);
        for field in ["execution_count", "duration_ms"] {
            match body.get(field) {
                None | Some(Value::Null) => {}
                Some(v) if v.as_u64().is_some() => {}
                Some(_) => self.fail(field, "must be a whole number, 0 or more"),
            }
        }
        match body.get("error") {
            None | Some(Value::Null) => {}
            Some(Value::Object(error)) => {
                for key in ["ename", "evalue"] {
                    if error.get(key).is_some_and(|v| !v.is_string()) {
                        self.fail(&format!("error.{key}"), "must be a string");
                    }
                }
            }
            Some(_) => self.fail("error", "must be an object with ename and evalue"),
        }
        failed
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::auth::Role;

    fn claims(seat: Option<u32>) -> Claims {
        Claims {
            sub: "s-0042".into(),
            role: Role::Student,
            exp: i64::MAX,
            iat: None,
            nbf: None,
            iss: None,
            aud: None,
            classroom: Some("cls-101".into()),
            seat,
        }
    }

    fn cell(id: &str) -> Value {
        json!({ "id": id, "type": "cell_executed", "classroom": "cls-101", "seat": 42,
                "student": "s-0042", "status": "error",
                "error": { "ename": "NameError", "evalue": "x" },
                "occurred_at": "2026-12-03T10:00:00.123Z" })
    }

    #[test]
    fn a_valid_event_passes_and_keeps_its_fields() {
        let events = validate(cell("e1"), &claims(None), 200).unwrap();
        assert_eq!(events.len(), 1);
        assert!(events[0].failed);
        assert_eq!(events[0].body["error"]["ename"], "NameError");
    }

    #[test]
    fn every_bad_field_is_reported_with_its_index() {
        let mut bad = cell("e2");
        bad["seat"] = json!(500);
        bad["occurred_at"] = json!("yesterday");
        bad.as_object_mut().unwrap().remove("type");
        let body = json!([cell("e1"), bad]);
        let Err(Invalid::Fields(errors)) = validate(body, &claims(None), 200) else {
            panic!("expected field errors");
        };
        let got: Vec<_> = errors.iter().map(|e| (e.index, e.field.as_str())).collect();
        assert_eq!(got, [(1, "type"), (1, "seat"), (1, "occurred_at")]);
    }

    #[test]
    fn another_classroom_or_student_is_forbidden() {
        let mut other = cell("e1");
        other["classroom"] = json!("cls-999");
        assert!(matches!(
            validate(other, &claims(None), 200),
            Err(Invalid::Forbidden(_))
        ));
        let mut other = cell("e1");
        other["student"] = json!("s-0001");
        assert!(matches!(
            validate(other, &claims(None), 200),
            Err(Invalid::Forbidden(_))
        ));
        assert!(matches!(
            validate(cell("e1"), &claims(Some(7)), 200),
            Err(Invalid::Forbidden(_))
        ));
    }

    #[test]
    fn the_seat_comes_from_the_token_when_the_body_has_none() {
        let mut event = cell("e1");
        event.as_object_mut().unwrap().remove("seat");
        let events = validate(event.clone(), &claims(Some(7)), 200).unwrap();
        assert_eq!(events[0].seat, 7);
        assert!(validate(event, &claims(None), 200).is_err());
    }

    #[test]
    fn long_help_messages_and_oversized_batches_are_refused() {
        let help = json!({ "id": "h", "type": "help_requested", "classroom": "cls-101",
                           "seat": 1, "student": "s-0042", "message": "x".repeat(501) });
        assert!(matches!(
            validate(help, &claims(None), 200),
            Err(Invalid::Fields(_))
        ));
        let batch = Value::Array((0..501).map(|i| cell(&i.to_string())).collect());
        assert!(matches!(
            validate(batch, &claims(None), 200),
            Err(Invalid::Fields(_))
        ));
        assert!(matches!(
            validate(json!([]), &claims(None), 200),
            Err(Invalid::Fields(_))
        ));
    }

    /// Properties over arbitrary and almost-valid bodies: no panic, and
    /// every refusal names what is wrong.
    mod properties {
        use proptest::prelude::*;
        use serde_json::{Map, Value, json};

        use super::super::*;
        use super::claims;

        /// Names a notebook extension uses, and some it does not.
        const FIELDS: [&str; 16] = [
            "id",
            "type",
            "classroom",
            "seat",
            "student",
            "notebook",
            "cell_id",
            "execution_count",
            "status",
            "error",
            "duration_ms",
            "occurred_at",
            "message",
            "request_id",
            "ename",
            "extra",
        ];

        fn any_json() -> impl Strategy<Value = Value> {
            let leaf = prop_oneof![
                Just(Value::Null),
                any::<bool>().prop_map(Value::from),
                any::<i64>().prop_map(Value::from),
                any::<u64>().prop_map(Value::from),
                (-1e12f64..1e12).prop_map(Value::from),
                "\\PC{0,12}".prop_map(Value::from),
                prop::sample::select(
                    &[
                        "cell_executed",
                        "help_requested",
                        "ok",
                        "error",
                        "cls-101",
                        "s-0042"
                    ][..]
                )
                .prop_map(Value::from),
            ];
            leaf.prop_recursive(3, 48, 8, |inner| {
                let key = prop_oneof![
                    prop::sample::select(&FIELDS[..]).prop_map(String::from),
                    "\\PC{0,8}"
                ];
                prop_oneof![
                    prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                    prop::collection::btree_map(key, inner, 0..8)
                        .prop_map(|m| Value::Object(m.into_iter().collect())),
                ]
            })
        }

        /// A valid event of each type for the token of `claims(None)`.
        fn valid_events() -> Vec<Value> {
            vec![
                json!({ "id": "e1", "type": "cell_executed", "classroom": "cls-101", "seat": 42,
                        "student": "s-0042", "notebook": "week1/lab.ipynb", "cell_id": "c1",
                        "execution_count": 3, "status": "error", "duration_ms": 12,
                        "error": { "ename": "NameError", "evalue": "x" },
                        "occurred_at": "2026-12-03T10:00:00.123Z" }),
                json!({ "id": "h1", "type": "help_requested", "classroom": "cls-101", "seat": 7,
                        "student": "s-0042", "message": "stuck on 3b" }),
                json!({ "id": "x1", "type": "help_cancelled", "classroom": "cls-101", "seat": 7,
                        "student": "s-0042", "request_id": "r-1" }),
            ]
        }

        /// Fields whose change may make the token's owner the wrong one.
        const OWNERSHIP: [&str; 3] = ["classroom", "student", "seat"];

        fn names_only(errors: &[FieldError], field: &str) -> bool {
            errors
                .iter()
                .all(|e| e.field == field || e.field.starts_with(&format!("{field}.")))
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(512))]

            #[test]
            fn any_body_is_answered_without_a_panic(body in any_json()) {
                let batch = match &body { Value::Array(items) => items.len().max(1), _ => 1 };
                match validate(body, &claims(None), 200) {
                    Ok(events) => {
                        for e in events {
                            prop_assert!((1..=200).contains(&e.seat));
                            prop_assert_eq!(&e.body["classroom"], "cls-101");
                            prop_assert_eq!(&e.body["student"], "s-0042");
                            prop_assert!(!e.id.is_empty());
                        }
                    }
                    Err(Invalid::Fields(errors)) => {
                        prop_assert!(!errors.is_empty());
                        for e in &errors {
                            prop_assert!(!e.message.is_empty());
                            prop_assert!(e.index < batch, "index {} of {}", e.index, batch);
                        }
                    }
                    Err(Invalid::Forbidden(detail)) => prop_assert!(!detail.is_empty()),
                }
            }

            #[test]
            fn a_changed_field_is_the_one_reported(
                which in 0usize..3,
                field in prop::sample::select(&FIELDS[..]),
                value in prop::option::of(any_json()),
            ) {
                let mut event = valid_events()[which].clone();
                let object = event.as_object_mut().unwrap();
                match value {
                    Some(v) => { object.insert(field.to_string(), v); }
                    None => { object.remove(field); }
                }
                match validate(event, &claims(None), 200) {
                    Ok(_) => {}
                    Err(Invalid::Forbidden(_)) => prop_assert!(OWNERSHIP.contains(&field)),
                    // Another type asks for other fields; any field may be named.
                    Err(Invalid::Fields(errors)) if field == "type" => {
                        prop_assert!(!errors.is_empty());
                    }
                    Err(Invalid::Fields(errors)) => {
                        prop_assert!(names_only(&errors, field), "{field}: {errors:?}");
                    }
                }
            }

            #[test]
            fn in_a_batch_only_the_broken_item_is_named(
                len in 1usize..20,
                broken in 0usize..20,
                field in prop::sample::select(&["id", "type", "seat", "occurred_at", "status"][..]),
                value in any_json(),
            ) {
                let broken = broken % len;
                let mut items: Vec<Value> = (0..len)
                    .map(|i| {
                        let mut e = valid_events()[i % 3].clone();
                        e["id"] = json!(format!("e{i}"));
                        e
                    })
                    .collect();
                let object: &mut Map<String, Value> = items[broken].as_object_mut().unwrap();
                object.insert(field.to_string(), value);
                if let Err(Invalid::Fields(errors)) = validate(Value::Array(items), &claims(None), 200) {
                    prop_assert!(errors.iter().all(|e| e.index == broken), "{errors:?}");
                }
            }
        }
    }
}
