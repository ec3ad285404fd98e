//! `cellgate demo`: the gateway on its embedded default plus a simulated
//! classroom whose students post realistic notebook events through the
//! real HTTP API, so that a newcomer sees dashboards light up.

use std::io::IsTerminal;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rand::Rng;
use rand::seq::IndexedRandom;
use serde_json::{Value, json};
use tokio::sync::broadcast;

use crate::auth::Minter;
use crate::config::ResolvedSettings;
use crate::directory::{Directory, DirectoryError};
use crate::server::Running;

/// The simulated classroom.
const CLASSROOM: &str = "demo-101";
/// The instructor the printed token belongs to.
const INSTRUCTOR: (&str, &str) = ("demo@cellgate.local", "Demo Instructor");
/// A colleague, to try claiming from a second dashboard.
const COLLEAGUE: (&str, &str) = ("colleague@cellgate.local", "Second Instructor");

const NOTEBOOKS: [&str; 3] = [
    "week1/lab.ipynb",
    "week1/exercises.ipynb",
    "week2/pandas.ipynb",
];
const ERRORS: [(&str, &str); 4] = [
    ("NameError", "name 'x' is not defined"),
    (
        "TypeError",
        "unsupported operand type(s) for +: 'int' and 'str'",
    ),
    ("KeyError", "'price'"),
    ("ModuleNotFoundError", "No module named 'panda'"),
];
const HELP_MESSAGES: [&str; 3] = [
    "My plot is empty",
    "I keep getting a NameError",
    "What does the KeyError mean?",
];

#[derive(Default)]
struct Counters {
    accepted: AtomicU64,
    refused: AtomicU64,
}

/// Runs the demo until Ctrl-C (or for `duration_secs`).
pub async fn run(
    settings: ResolvedSettings,
    students: u32,
    duration_secs: Option<u64>,
) -> anyhow::Result<()> {
    let running = crate::server::start(settings.clone()).await?;
    let directory = running.app.directory().directory().clone();
    let students = prepare_directory(&directory, students.max(1)).await?;

    let minter = Minter::new(&settings.settings, settings.key.as_ref())?;
    let token = minter.instructor(INSTRUCTOR.0, Duration::from_secs(12 * 3600))?;
    print_instructions(&running, &token);

    let counters = Arc::new(Counters::default());
    let (run_all, _) = broadcast::channel(4);
    let base = format!("http://{}", running.addr);
    let client = reqwest::Client::new();
    for n in 1..=students {
        let token = minter.student(
            &format!("s-{n:04}"),
            CLASSROOM,
            Some(n),
            Duration::from_secs(12 * 3600),
        )?;
        let student = Student {
            seat: n,
            token,
            client: client.clone(),
            url: format!("{base}/api/v1/events"),
        };
        tokio::spawn(student.run(run_all.subscribe(), counters.clone()));
    }
    tokio::spawn(instructor_says_run_all(run_all));

    let stop = async {
        match duration_secs {
            Some(secs) => tokio::time::sleep(Duration::from_secs(secs)).await,
            None => crate::server::shutdown_signal().await,
        }
    };
    tokio::select! {
        () = stop => {}
        () = summary(&running, &directory, &counters) => {}
    }
    eprintln!();
    running.stop().await
}

/// Makes the demo's instructors and classroom (kept from an earlier run
/// when there is one) and returns how many students can sit in it.
async fn prepare_directory(directory: &Directory, seats: u32) -> anyhow::Result<u32> {
    for (email, name) in [INSTRUCTOR, COLLEAGUE] {
        ignore_existing(directory.add_instructor(email, name).await.map(drop))?;
        directory.set_active(email, true).await?;
    }
    ignore_existing(
        directory
            .add_classroom(CLASSROOM, seats.max(200))
            .await
            .map(drop),
    )?;
    for (email, _) in [INSTRUCTOR, COLLEAGUE] {
        directory.add_staff(CLASSROOM, email).await?;
    }
    // Help requests an earlier demo left open would pile up run after run.
    for request in directory.help_queue(CLASSROOM).await? {
        let id = Some(request.request_id.as_str());
        directory
            .cancel_help(CLASSROOM, &request.student, id)
            .await?;
    }
    let room = directory.classroom(CLASSROOM).await?;
    let capacity = room.map_or(seats, |r| r.seats);
    if capacity < seats {
        tracing::warn!(
            students = seats,
            seats = capacity,
            "the demo classroom of an earlier run has fewer seats; simulating that many students"
        );
    }
    Ok(seats.min(capacity))
}

fn ignore_existing(result: Result<(), DirectoryError>) -> Result<(), DirectoryError> {
    match result {
        Err(DirectoryError::Conflict(_)) => Ok(()),
        other => other,
    }
}

fn print_instructions(running: &Running, token: &str) {
    let addr = running.addr;
    println!(
        "\ncellgate demo: a simulated classroom `{CLASSROOM}` is posting notebook events.\n\
         \n  gateway   http://{addr}\n  metrics   http://{metrics}/metrics\n\
         \nInstructor token for {email} (valid 12 h):\n\n{token}\n\
         \nConnect a dashboard (Node 20 with `npm install socket.io-client`):\n\
         \n  node -e 'const {{ io }} = require(\"socket.io-client\");\n\
         \x20   const s = io(\"http://{addr}\", {{ auth: {{ token: process.env.TOKEN }} }});\n\
         \x20   s.on(\"connect_error\", (e) => console.log(\"refused:\", e.message));\n\
         \x20   s.on(\"connection_accepted\", async (m) => {{ console.log(\"accepted\", m);\n\
         \x20     const a = await s.emitWithAck(\"join_classroom\", {{ classroom: \"{CLASSROOM}\" }});\n\
         \x20     console.log(\"seats:\", a.snapshot.seats.length, \"help queue:\", a.snapshot.help_queue.length); }});\n\
         \x20   s.onAny((event, data) => console.log(event, JSON.stringify(data)));'\n\
         \n  (run it with TOKEN=<the token above> in its environment)\n\
         \nOr fetch the seat map over HTTP:\n\
         \n  curl -H \"Authorization: Bearer $TOKEN\" http://{addr}/api/v1/classrooms/{CLASSROOM}/snapshot\n\
         \nA second instructor, {colleague}, staffs the room too:\n\
         \x20 {me} token instructor {colleague}\n\
         \nPress Ctrl-C to stop.\n",
        metrics = running.metrics_addr,
        email = INSTRUCTOR.0,
        colleague = COLLEAGUE.0,
        me = this_command(),
    );
}

/// How to run this binary again from here: `target/release/cellgate` under
/// `cargo run`, the bare name when it is elsewhere (installed on the PATH).
fn this_command() -> String {
    let relative = std::env::current_exe().ok().and_then(|exe| {
        let here = std::env::current_dir().ok()?;
        exe.strip_prefix(here).ok().map(|p| p.display().to_string())
    });
    relative.unwrap_or_else(|| "cellgate".to_string())
}

/// Every 45 s the instructor says "run all cells": every student posts a burst.
async fn instructor_says_run_all(run_all: broadcast::Sender<()>) {
    let mut every = tokio::time::interval(Duration::from_secs(45));
    every.tick().await;
    loop {
        every.tick().await;
        let _ = run_all.send(());
    }
}

/// One line, refreshed every two seconds: dashboards, events/s, open help.
async fn summary(running: &Running, directory: &Directory, counters: &Counters) {
    let tty = std::io::stderr().is_terminal();
    let mut every = tokio::time::interval(Duration::from_secs(2));
    let mut last = 0u64;
    let mut ticks = 0u64;
    loop {
        every.tick().await;
        ticks += 1;
        let accepted = counters.accepted.load(Ordering::Relaxed);
        let rate = (accepted - last) as f64 / 2.0;
        last = accepted;
        let dashboards = running.app.metrics().dashboards();
        let open_help = directory
            .help_queue(CLASSROOM)
            .await
            .map(|q| q.len())
            .unwrap_or(0);
        let refused = counters.refused.load(Ordering::Relaxed);
        let line = format!(
            "dashboards {dashboards} | events/s {rate:.1} | open help requests {open_help} | \
             events accepted {accepted} | refused {refused}"
        );
        if tty {
            eprint!("\r{line}   ");
        } else if ticks % 5 == 1 {
            eprintln!("{line}");
        }
    }
}

struct Student {
    seat: u32,
    token: String,
    client: reqwest::Client,
    url: String,
}

impl Student {
    async fn run(self, mut run_all: broadcast::Receiver<()>, counters: Arc<Counters>) {
        let id = format!("s-{:04}", self.seat);
        let notebook = NOTEBOOKS[self.seat as usize % NOTEBOOKS.len()];
        let mut execution_count = 0u64;
        let mut failures_in_a_row = 0u32;
        let mut waiting_for_help: Option<(String, tokio::time::Instant)> = None;
        // Spread the first events so the room wakes up gradually.
        let warm_up = Duration::from_millis(rand::rng().random_range(0..8000));
        tokio::time::sleep(warm_up).await;

        loop {
            let pause = Duration::from_millis(rand::rng().random_range(2_000..15_000));
            let everyone = tokio::select! {
                () = tokio::time::sleep(pause) => false,
                Ok(()) = run_all.recv() => true,
            };
            let burst = if everyone {
                rand::rng().random_range(4..10)
            } else {
                1
            };

            let mut batch = Vec::new();
            for _ in 0..burst {
                execution_count += 1;
                let failed = rand::rng().random_bool(0.12);
                failures_in_a_row = if failed { failures_in_a_row + 1 } else { 0 };
                batch.push(self.cell(&id, notebook, execution_count, failed));
            }
            // About one student in twenty asks for help after a failure.
            let asks = rand::rng().random_bool(0.05);
            if waiting_for_help.is_none() && failures_in_a_row >= 1 && asks {
                let request = uuid::Uuid::new_v4().to_string();
                batch.push(self.help(&id, &request));
                waiting_for_help = Some((request, tokio::time::Instant::now()));
            } else if let Some((request, since)) = &waiting_for_help
                && since.elapsed() > Duration::from_secs(120)
            {
                batch.push(self.cancel(&id, request));
                waiting_for_help = None;
            }
            self.post(Value::Array(batch), &counters).await;
        }
    }

    fn base(&self, id: &str, kind: &str) -> Value {
        json!({
            "id": uuid::Uuid::new_v4().to_string(), "type": kind, "classroom": CLASSROOM,
            "seat": self.seat, "student": id,
            "occurred_at": crate::model::timestamp(chrono::Utc::now()),
        })
    }

    fn cell(&self, id: &str, notebook: &str, execution_count: u64, failed: bool) -> Value {
        let mut event = self.base(id, "cell_executed");
        let fields = event.as_object_mut().expect("object");
        fields.insert("notebook".into(), json!(notebook));
        fields.insert(
            "cell_id".into(),
            json!(format!("cell-{}", execution_count % 24)),
        );
        fields.insert("execution_count".into(), json!(execution_count));
        fields.insert(
            "duration_ms".into(),
            json!(rand::rng().random_range(5..2_000)),
        );
        fields.insert("status".into(), json!(if failed { "error" } else { "ok" }));
        if failed {
            let (ename, evalue) = *ERRORS.choose(&mut rand::rng()).unwrap_or(&ERRORS[0]);
            fields.insert("error".into(), json!({ "ename": ename, "evalue": evalue }));
        }
        event
    }

    fn help(&self, id: &str, request: &str) -> Value {
        let mut event = self.base(id, "help_requested");
        let message = *HELP_MESSAGES
            .choose(&mut rand::rng())
            .unwrap_or(&HELP_MESSAGES[0]);
        event["id"] = json!(request);
        event["message"] = json!(message);
        event
    }

    fn cancel(&self, id: &str, request: &str) -> Value {
        let mut event = self.base(id, "help_cancelled");
        event["request_id"] = json!(request);
        event
    }

    async fn post(&self, batch: Value, counters: &Counters) {
        let events = batch.as_array().map_or(0, Vec::len) as u64;
        let sent = self
            .client
            .post(&self.url)
            .bearer_auth(&self.token)
            .json(&batch)
            .send()
            .await;
        match sent {
            Ok(response) if response.status().is_success() => {
                counters.accepted.fetch_add(events, Ordering::Relaxed);
            }
            Ok(response) => {
                counters.refused.fetch_add(events, Ordering::Relaxed);
                tracing::warn!(status = %response.status(), seat = self.seat, "demo event refused");
            }
            Err(error) => {
                counters.refused.fetch_add(events, Ordering::Relaxed);
                tracing::debug!(%error, "demo student could not post");
            }
        }
    }
}
