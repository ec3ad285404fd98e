//! The built `cellgate` binary as a process: production profile, JSON logs,
//! a SQLite directory in a temporary folder, free loopback ports. Speaks
//! just enough Socket.IO (Engine.IO v4 over WebSocket) to handshake, and
//! plain HTTP to post events.

use std::collections::HashMap;
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

/// The binary Cargo built for integration tests (not set for examples,
/// which pass their own to [`Gateway::start_bin`]).
const BIN: Option<&str> = option_env!("CARGO_BIN_EXE_cellgate");

/// A running gateway.
pub struct Gateway {
    /// The HMAC secret it verifies tokens with.
    pub secret: String,
    /// Socket.IO and HTTP API.
    pub addr: String,
    child: Child,
    bin: String,
    env: Vec<(String, String)>,
    log: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

/// How a handshake ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Handshake {
    /// `connection_accepted` arrived.
    Accepted,
    /// `connect_error` with this message.
    Refused(String),
}

fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("a free port");
    listener.local_addr().expect("bound").port()
}

impl Gateway {
    /// Starts `cellgate serve` with `extra` on top of the test settings and
    /// waits until `/healthz` answers.
    pub async fn start(extra: &HashMap<&str, &str>) -> Gateway {
        Gateway::start_bin(BIN.expect("an integration test"), extra).await
    }

    /// [`Gateway::start`] with the binary at `bin`.
    pub async fn start_bin(bin: &str, extra: &HashMap<&str, &str>) -> Gateway {
        let dir = tempfile::tempdir().expect("tempdir");
        let secret = format!("test-secret-{}", uuid::Uuid::new_v4().simple());
        let addr = format!("127.0.0.1:{}", free_port());
        let metrics = format!("127.0.0.1:{}", free_port());
        let db = format!("sqlite://{}/dir.db?mode=rwc", dir.path().display());
        let mut env: Vec<(String, String)> = [
            ("CELLGATE_PROFILE", "production"),
            ("CELLGATE_DATABASE_URL", db.as_str()),
            ("CELLGATE_AUTO_MIGRATE", "true"),
            ("CELLGATE_JWT_SECRET", secret.as_str()),
            ("CELLGATE_LISTEN_ADDR", addr.as_str()),
            ("CELLGATE_METRICS_ADDR", metrics.as_str()),
            ("CELLGATE_DATA_DIR", &dir.path().display().to_string()),
            ("CELLGATE_LOG_FORMAT", "json"),
            ("CELLGATE_DRAIN_SECS", "0"),
            ("CELLGATE_NODE_ID", "test-pod"),
            // Everything, so that the scan for secrets sees every line.
            ("RUST_LOG", "trace"),
            ("NO_COLOR", "1"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));

        // A file, not a pipe: nobody reads while it runs, and a full pipe
        // would stall the gateway.
        let log = dir.path().join("serve.log");
        let file = std::fs::File::create(&log).expect("log file");
        let mut command = Command::new(bin);
        command
            .arg("serve")
            .env_clear()
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::from(file.try_clone().expect("log file")))
            .stderr(Stdio::from(file));
        let child = command.spawn().expect("cellgate serve starts");
        let mut gw = Gateway {
            secret,
            addr,
            child,
            bin: bin.to_string(),
            env,
            log,
            _dir: dir,
        };
        gw.wait_healthy().await;
        gw
    }

    async fn wait_healthy(&mut self) {
        let url = format!("http://{}/healthz", self.addr);
        for _ in 0..200 {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("cellgate serve exited early: {status}\n{}", self.output());
            }
            if let Ok(response) = reqwest::get(&url).await
                && response.status().is_success()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("cellgate serve did not answer /healthz");
    }

    /// Runs a command of the binary with the same settings; its stdout.
    pub fn cli(&self, args: &[&str]) -> String {
        let out = Command::new(&self.bin)
            .args(args)
            .env_clear()
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .output()
            .expect("cellgate runs");
        assert!(
            out.status.success(),
            "cellgate {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout)
            .expect("UTF-8")
            .trim()
            .to_string()
    }

    /// Whether the process has a thread whose name starts with `prefix`
    /// (Linux shows the first 15 bytes).
    pub fn has_thread(&self, prefix: &str) -> bool {
        let tasks = format!("/proc/{}/task", self.child.id());
        std::fs::read_dir(tasks)
            .expect("/proc")
            .filter_map(Result::ok)
            .filter_map(|t| std::fs::read_to_string(t.path().join("comm")).ok())
            .any(|name| name.trim_end().starts_with(prefix))
    }

    /// A Socket.IO client, not yet connected to the namespace.
    pub async fn socket(&self) -> SioClient {
        let url = format!("ws://{}/socket.io/?EIO=4&transport=websocket", self.addr);
        // No Nagle delay: a client's small frames go out at once.
        let (ws, _) = tokio_tungstenite::connect_async_with_config(url, None, true)
            .await
            .expect("websocket");
        let mut client = SioClient { ws };
        let open = client.next_text().await;
        assert!(open.starts_with('0'), "Engine.IO open packet, got {open}");
        client
    }

    /// `POST /api/v1/events`; the status code.
    pub async fn post_events(&self, token: &str, body: &serde_json::Value) -> u16 {
        reqwest::Client::new()
            .post(format!("http://{}/api/v1/events", self.addr))
            .bearer_auth(token)
            .json(body)
            .send()
            .await
            .expect("the gateway answers")
            .status()
            .as_u16()
    }

    /// Sends SIGTERM, waits for the process to exit, returns all it wrote.
    pub async fn stop(mut self) -> String {
        let pid = self.child.id().to_string();
        let signalled = Command::new("kill").args(["-TERM", &pid]).status();
        assert!(signalled.is_ok_and(|s| s.success()), "kill -TERM");
        for _ in 0..200 {
            if let Ok(Some(status)) = self.child.try_wait() {
                assert!(status.success(), "exit status {status}");
                return self.output();
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let _ = self.child.kill();
        panic!("cellgate did not stop within 20 s\n{}", self.output());
    }

    fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A minimal Socket.IO v5 client for namespace `/`.
pub struct SioClient {
    ws: Ws,
}

impl SioClient {
    /// The next text frame; answers Engine.IO pings on the way.
    async fn next_text(&mut self) -> String {
        loop {
            let frame = tokio::time::timeout(Duration::from_secs(10), self.ws.next())
                .await
                .expect("a frame within 10 s")
                .expect("the socket stays open")
                .expect("a valid frame");
            let Message::Text(text) = frame else { continue };
            if text.as_str() == "2" {
                self.send("3").await;
                continue;
            }
            return text.to_string();
        }
    }

    async fn send(&mut self, text: &str) {
        self.ws
            .send(Message::text(text.to_string()))
            .await
            .expect("send");
    }

    /// Connects to `/` with `auth: { token }`.
    pub async fn connect(&mut self, token: &str) -> Handshake {
        let auth = serde_json::json!({ "token": token });
        self.send(&format!("40{auth}")).await;
        let answer = self.next_text().await;
        if let Some(error) = answer.strip_prefix("44") {
            let error: serde_json::Value = serde_json::from_str(error).expect("connect_error");
            return Handshake::Refused(error["message"].as_str().unwrap_or("").to_string());
        }
        assert!(answer.starts_with("40"), "CONNECT answer, got {answer}");
        let first = self.next_text().await;
        assert!(
            first.starts_with(r#"42["connection_accepted""#),
            "got {first}"
        );
        Handshake::Accepted
    }

    /// Emits `event` with `payload` and waits for its acknowledgement.
    pub async fn emit_with_ack(
        &mut self,
        event: &str,
        payload: serde_json::Value,
    ) -> serde_json::Value {
        let packet = serde_json::json!([event, payload]);
        self.send(&format!("421{packet}")).await;
        loop {
            let text = self.next_text().await;
            if let Some(ack) = text.strip_prefix("431") {
                let mut args: Vec<serde_json::Value> = serde_json::from_str(ack).expect("ack");
                return args.swap_remove(0);
            }
        }
    }
}

/// An HS256 JWT signed with `secret`.
pub fn sign_hs256(claims: &serde_json::Value, secret: &str) -> String {
    let key = jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()).expect("an HMAC key");
    jsonwebtoken::encode(&jsonwebtoken::Header::default(), claims, &key)
        .expect("signable")
        .to_string()
}
