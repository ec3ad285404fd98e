//! Just enough of a Socket.IO v5 / Engine.IO v4 client, WebSocket only, to
//! connect dashboards by the thousand from one process; and the tokens
//! they and the notebook extensions carry.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow, bail, ensure};
use futures_util::{SinkExt, StreamExt};
use jsonwebtoken::{EncodingKey, Header};
use serde_json::{Value, json};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

/// Longest wait for one handshake (connect to `connection_accepted`).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest wait for the server to acknowledge a close.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// A dashboard's WebSocket.
pub type Ws = WebSocketStream<TcpStream>;

/// Opens WebSockets to one gateway, spreading them over several loopback
/// source addresses (`127.0.0.1`, `127.0.0.2`, …). Each source address has
/// its own ~28,000 ephemeral ports (`net.ipv4.ip_local_port_range`), so
/// tens of thousands of sockets, and the TIME_WAIT left by earlier phases,
/// do not run one address out of ports.
pub struct Connector {
    addr: SocketAddr,
    url: String,
    sources: Vec<IpAddr>,
    next: AtomicUsize,
}

impl Connector {
    /// Connects to `addr` (whose Engine.IO URL is `url`) from `sources`
    /// loopback addresses, `127.0.0.1` upwards.
    pub fn new(addr: SocketAddr, url: String, sources: u8) -> Self {
        let sources = (1..=sources.max(1))
            .map(|i| IpAddr::V4(Ipv4Addr::new(127, 0, 0, i)))
            .collect();
        Connector {
            addr,
            url,
            sources,
            next: AtomicUsize::new(0),
        }
    }

    /// TCP connect (from the next source address, `TCP_NODELAY`) and the
    /// WebSocket upgrade. Small read buffers: an idle dashboard costs this
    /// process little.
    pub async fn connect(&self) -> Result<Ws> {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.sources.len();
        let socket = TcpSocket::new_v4().context("socket")?;
        socket
            .bind(SocketAddr::new(self.sources[i], 0))
            .with_context(|| format!("bind {}", self.sources[i]))?;
        let stream = socket.connect(self.addr).await.context("TCP connect")?;
        stream.set_nodelay(true)?;
        let config = WebSocketConfig::default()
            .read_buffer_size(4096)
            .write_buffer_size(0);
        let (ws, _) = tokio_tungstenite::client_async_with_config(&self.url, stream, Some(config))
            .await
            .context("WebSocket upgrade")?;
        Ok(ws)
    }
}

/// Connects and authenticates; returns the socket, the time from before the
/// TCP connect to `connection_accepted`, and that packet.
pub async fn handshake(connector: &Connector, token: &str) -> Result<(Ws, Duration, String)> {
    tokio::time::timeout(HANDSHAKE_TIMEOUT, timed_handshake(connector, token))
        .await
        .map_err(|_| anyhow!("no connection_accepted within {HANDSHAKE_TIMEOUT:?}"))?
}

async fn timed_handshake(connector: &Connector, token: &str) -> Result<(Ws, Duration, String)> {
    let started = Instant::now();
    let mut ws = connector.connect().await?;
    let open = next_text(&mut ws).await?;
    ensure!(
        open.starts_with('0'),
        "expected an Engine.IO open packet, got {open:?}"
    );
    let connect = format!("40{}", json!({ "token": token }));
    ws.send(Message::text(connect)).await?;
    loop {
        let packet = next_text(&mut ws).await?;
        match packet.as_bytes() {
            [b'4', b'2', ..] => return Ok((ws, started.elapsed(), packet)),
            [b'4', b'0', ..] => {}
            [b'4', b'4', ..] => bail!("refused: {}", refusal_message(&packet[2..])),
            [b'2'] => ws.send(Message::text("3")).await?,
            _ => bail!("unexpected packet {packet:?}"),
        }
    }
}

/// Emits `event` with `payload` as ack request `id` and returns the
/// acknowledgement's first argument. Pings met on the way are answered;
/// broadcasts are skipped.
pub async fn emit_with_ack(ws: &mut Ws, id: u32, event: &str, payload: Value) -> Result<Value> {
    ws.send(Message::text(format!("42{id}{}", json!([event, payload]))))
        .await?;
    let prefix = format!("43{id}[");
    loop {
        let packet = next_text(ws).await?;
        if packet == "2" {
            ws.send(Message::text("3")).await?;
        } else if packet.starts_with(&prefix) {
            let args: Value = serde_json::from_str(&packet[prefix.len() - 1..])
                .with_context(|| format!("bad acknowledgement of {event}"))?;
            return Ok(args[0].clone());
        }
    }
}

/// `join_classroom`, retried (with a growing pause) while the gateway
/// answers `unavailable`, as a dashboard would; returns how many retries it
/// took.
pub async fn join_classroom(ws: &mut Ws, classroom: &str) -> Result<u32> {
    const RETRIES: u32 = 10;
    for attempt in 0..=RETRIES {
        let payload = json!({ "classroom": classroom });
        let answer = emit_with_ack(ws, attempt + 1, "join_classroom", payload).await?;
        if answer["ok"] == true {
            return Ok(attempt);
        }
        ensure!(
            answer["error"] == "unavailable" && attempt < RETRIES,
            "join_classroom refused: {}",
            answer.get("error").unwrap_or(&answer)
        );
        tokio::time::sleep(Duration::from_millis(100 * u64::from(attempt + 1))).await;
    }
    unreachable!("the last attempt returns or fails")
}

/// The next text frame; control frames are skipped.
pub async fn next_text(ws: &mut Ws) -> Result<String> {
    while let Some(message) = ws.next().await {
        match message.context("WebSocket read")? {
            Message::Text(text) => return Ok(text.as_str().to_owned()),
            Message::Close(frame) => bail!("server closed the socket: {frame:?}"),
            Message::Binary(_) => bail!("unexpected binary frame"),
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {}
        }
    }
    bail!("server closed the connection")
}

/// Closes and waits (briefly) for the server's close. Errors here do not
/// matter to any measurement.
pub async fn close(mut ws: Ws) {
    let drain = async {
        let _ = ws.close(None).await;
        while let Some(Ok(_)) = ws.next().await {}
    };
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, drain).await;
}

/// The `message` of a CONNECT_ERROR payload.
pub fn refusal_message(payload: &str) -> String {
    serde_json::from_str::<Value>(payload)
        .ok()
        .and_then(|v| v.get("message")?.as_str().map(str::to_owned))
        .unwrap_or_else(|| payload.to_owned())
}

/// Checks that `packet` is `42["connection_accepted",{...}]` for `email`.
pub fn check_accepted(packet: &str, email: &str) -> Result<()> {
    let event: Value = serde_json::from_str(&packet[2..]).context("bad event packet")?;
    ensure!(
        event[0] == "connection_accepted",
        "expected connection_accepted first, got {packet:?}"
    );
    let got = &event[1]["instructor"]["email"];
    ensure!(got == email, "accepted as {got}, expected {email}");
    Ok(())
}

/// Mints tokens as `cellgate token …` does (HS256, one hour).
pub struct Minter {
    key: EncodingKey,
    header: Header,
}

impl Minter {
    /// A minter with `secret`.
    pub fn new(secret: &str) -> Result<Self> {
        Ok(Minter {
            key: EncodingKey::from_secret(secret.as_bytes()).context("JWT secret")?,
            header: Header::default(),
        })
    }

    fn sign(&self, mut claims: Value) -> Result<String> {
        let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
        claims["exp"] = json!(now + 3600);
        claims["iat"] = json!(now);
        jsonwebtoken::encode(&self.header, &claims, &self.key).context("cannot mint a token")
    }

    /// An instructor's token.
    pub fn instructor(&self, email: &str) -> Result<String> {
        self.sign(json!({ "sub": email, "role": "instructor" }))
    }

    /// A student's token for one seat of one classroom.
    pub fn student(&self, student: &str, classroom: &str, seat: u32) -> Result<String> {
        self.sign(
            json!({ "sub": student, "role": "student", "classroom": classroom, "seat": seat }),
        )
    }
}
