//! What the gateway knows about each accepted connection, and the two
//! things it can do to one: close it at once, and measure the messages a
//! WebSocket client sends on it.
//!
//! Every request carries its connection's [`Connection`] (axum's
//! `ConnectInfo`, shared with the drain), whose peer address finds the
//! connection's [`ConnState`] in [`Connections`]: the kill switch, which
//! closes a dashboard whose outgoing queue is full (a Socket.IO disconnect
//! needs room in that very queue, so it cannot).
//!
//! Once a connection has switched to WebSocket (the HTTP layer calls
//! [`ConnState::websocket_started`] on the `101` answer), [`FrameMeter`]
//! follows the frames the client sends. A message larger than
//! `CELLGATE_MAX_SOCKET_PAYLOAD_BYTES` closes that connection, and only
//! that one, and is counted: engineioxide enforces the same limit too, but
//! closes silently, so without the meter no metric could tell.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll, ready};

use axum::extract::connect_info::Connected;
use axum::serve::{IncomingStream, Listener};
use prometheus::IntCounter;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use crate::drain::{Connection, DrainableListener};

/// One accepted connection, shared by its stream and its requests.
#[derive(Debug)]
pub struct ConnState {
    peer: SocketAddr,
    kill: CancellationToken,
    websocket: AtomicBool,
}

impl ConnState {
    /// The TCP peer.
    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    /// Closes the connection now: reads end, writes fail.
    pub fn kill(&self) {
        self.kill.cancel();
    }

    /// Whether [`ConnState::kill`] was called (or the meter closed it).
    pub fn is_killed(&self) -> bool {
        self.kill.is_cancelled()
    }

    /// The connection now carries WebSocket frames.
    pub fn websocket_started(&self) {
        self.websocket.store(true, Ordering::Release);
    }
}

impl Connected<IncomingStream<'_, GuardedListener<DrainableListener>>> for Connection {
    fn connect_info(stream: IncomingStream<'_, GuardedListener<DrainableListener>>) -> Self {
        Connection {
            id: stream.io().inner().id(),
            remote: *stream.remote_addr(),
        }
    }
}

/// The open connections, by peer address (unique among the connections
/// open on one listener).
#[derive(Debug, Default)]
pub struct Connections(Mutex<HashMap<SocketAddr, Weak<ConnState>>>);

impl Connections {
    /// The open connection from `peer`.
    pub fn get(&self, peer: SocketAddr) -> Option<Arc<ConnState>> {
        self.0
            .lock()
            .expect("connections lock")
            .get(&peer)
            .and_then(Weak::upgrade)
    }

    /// Connections open now.
    pub fn len(&self) -> usize {
        self.0.lock().expect("connections lock").len()
    }

    /// Whether none is open.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn insert(&self, state: &Arc<ConnState>) {
        self.0
            .lock()
            .expect("connections lock")
            .insert(state.peer, Arc::downgrade(state));
    }

    fn remove(&self, state: &Arc<ConnState>) {
        let mut map = self.0.lock().expect("connections lock");
        if map
            .get(&state.peer)
            .is_some_and(|w| std::ptr::eq(w.as_ptr(), Arc::as_ptr(state)))
        {
            map.remove(&state.peer);
        }
    }
}

/// Wraps a listener so that its connections are [`GuardedStream`]s.
pub struct GuardedListener<L> {
    inner: L,
    payload_limit: u64,
    oversized: IntCounter,
    connections: Arc<Connections>,
}

impl<L> GuardedListener<L> {
    /// WebSocket messages over `payload_limit` bytes close their
    /// connection and count in `oversized`; open connections are listed
    /// in `connections`.
    pub fn new(
        inner: L,
        payload_limit: u64,
        oversized: IntCounter,
        connections: Arc<Connections>,
    ) -> Self {
        GuardedListener {
            inner,
            payload_limit,
            oversized,
            connections,
        }
    }
}

impl<L> Listener for GuardedListener<L>
where
    L: Listener<Addr = SocketAddr>,
{
    type Io = GuardedStream<L::Io>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        let (io, peer) = self.inner.accept().await;
        let kill = CancellationToken::new();
        let state = Arc::new(ConnState {
            peer,
            kill: kill.clone(),
            websocket: AtomicBool::new(false),
        });
        self.connections.insert(&state);
        let stream = GuardedStream {
            inner: io,
            state,
            killed: Box::pin(kill.cancelled_owned()),
            dead: false,
            meter: FrameMeter::new(self.payload_limit),
            oversized: self.oversized.clone(),
            connections: self.connections.clone(),
        };
        (stream, peer)
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

/// A connection that can be closed from outside and meters WebSocket
/// messages once it carries them.
pub struct GuardedStream<S> {
    inner: S,
    state: Arc<ConnState>,
    killed: Pin<Box<WaitForCancellationFutureOwned>>,
    dead: bool,
    meter: FrameMeter,
    oversized: IntCounter,
    connections: Arc<Connections>,
}

impl<S> Drop for GuardedStream<S> {
    fn drop(&mut self) {
        self.connections.remove(&self.state);
    }
}

impl<S> GuardedStream<S> {
    /// The wrapped stream.
    pub fn inner(&self) -> &S {
        &self.inner
    }

    fn check(&mut self, cx: &mut Context<'_>) -> bool {
        if !self.dead && self.killed.as_mut().poll(cx).is_ready() {
            self.dead = true;
        }
        self.dead
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for GuardedStream<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.check(cx) {
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
        if this.state.websocket.load(Ordering::Acquire) && this.meter.feed(&buf.filled()[before..])
        {
            this.oversized.inc();
            tracing::info!(
                peer = %this.state.peer,
                limit = this.meter.limit,
                "WebSocket message over CELLGATE_MAX_SOCKET_PAYLOAD_BYTES; closing its connection"
            );
            this.state.kill();
            this.dead = true;
            // Nothing of the oversized message reaches the WebSocket.
            buf.set_filled(before);
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for GuardedStream<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.check(cx) {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        Pin::new(&mut this.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.check(cx) {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        Pin::new(&mut this.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// Follows the frames a WebSocket client sends (RFC 6455 §5.2) and adds
/// up the payload of each message, its fragments included; control frames
/// (ping, pong, close) do not count.
#[derive(Debug)]
pub struct FrameMeter {
    limit: u64,
    header: [u8; 14],
    have: usize,
    /// Payload bytes of the current frame still to skip.
    left: u64,
    /// Payload of the current message so far.
    message: u64,
}

impl FrameMeter {
    /// Messages may carry at most `limit` bytes.
    pub fn new(limit: u64) -> Self {
        FrameMeter {
            limit,
            header: [0; 14],
            have: 0,
            left: 0,
            message: 0,
        }
    }

    /// Reads the next bytes from the client; `true` once a message is over
    /// the limit (from its frame header, before its payload arrives).
    pub fn feed(&mut self, mut bytes: &[u8]) -> bool {
        while !bytes.is_empty() {
            if self.left > 0 {
                let skip = self.left.min(bytes.len() as u64);
                self.left -= skip;
                bytes = &bytes[skip as usize..];
                continue;
            }
            self.header[self.have] = bytes[0];
            self.have += 1;
            bytes = &bytes[1..];
            if self.have < 2 || self.have < header_len(self.header[1]) {
                continue;
            }
            let (opcode, len) = self.parse_header();
            self.have = 0;
            match opcode {
                0x0 => self.message = self.message.saturating_add(len),
                0x1 | 0x2 => self.message = len,
                _ => {}
            }
            if opcode < 0x8 && self.message > self.limit {
                return true;
            }
            self.left = len;
        }
        false
    }

    fn parse_header(&self) -> (u8, u64) {
        let h = &self.header;
        let opcode = h[0] & 0x0f;
        let len = match h[1] & 0x7f {
            126 => u64::from(u16::from_be_bytes([h[2], h[3]])),
            127 => u64::from_be_bytes([h[2], h[3], h[4], h[5], h[6], h[7], h[8], h[9]]),
            short => u64::from(short),
        };
        (opcode, len)
    }
}

/// Bytes of a frame header whose second byte is `b1`.
fn header_len(b1: u8) -> usize {
    let extended = match b1 & 0x7f {
        126 => 2,
        127 => 8,
        _ => 0,
    };
    let mask = if b1 & 0x80 != 0 { 4 } else { 0 };
    2 + extended + mask
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// A masked client frame.
    fn frame(fin: bool, opcode: u8, payload_len: usize) -> Vec<u8> {
        let mut out = vec![(u8::from(fin) << 7) | opcode];
        match payload_len {
            0..=125 => out.push(0x80 | payload_len as u8),
            126..=0xffff => {
                out.push(0x80 | 126);
                out.extend_from_slice(&(payload_len as u16).to_be_bytes());
            }
            _ => {
                out.push(0x80 | 127);
                out.extend_from_slice(&(payload_len as u64).to_be_bytes());
            }
        }
        out.extend_from_slice(&[1, 2, 3, 4]);
        out.extend(std::iter::repeat_n(b'x', payload_len));
        out
    }

    fn feed_in_chunks(meter: &mut FrameMeter, bytes: &[u8], chunk: usize) -> bool {
        bytes.chunks(chunk).any(|c| meter.feed(c))
    }

    #[test]
    fn messages_up_to_the_limit_pass_in_any_chunking() {
        let mut stream = Vec::new();
        for len in [0, 5, 125, 126, 1000, 65_535, 65_536] {
            stream.extend(frame(true, 0x1, len));
        }
        stream.extend(frame(true, 0x9, 10)); // ping
        for chunk in [1, 3, 7, 512, 100_000] {
            let mut meter = FrameMeter::new(65_536);
            assert!(!feed_in_chunks(&mut meter, &stream, chunk), "chunk {chunk}");
        }
    }

    #[test]
    fn one_byte_over_is_caught_at_its_header() {
        let mut meter = FrameMeter::new(1_000);
        assert!(!meter.feed(&frame(true, 0x1, 1_000)));
        let over = frame(true, 0x2, 1_001);
        assert!(meter.feed(&over[..8]), "known from the header alone");
        let mut big = FrameMeter::new(1 << 20);
        assert!(big.feed(&frame(true, 0x1, (1 << 20) + 1)[..14]));
    }

    #[test]
    fn fragments_add_up_and_control_frames_in_between_do_not() {
        let mut stream = frame(false, 0x1, 400);
        stream.extend(frame(true, 0xA, 100)); // pong between fragments
        stream.extend(frame(false, 0x0, 400));
        let mut meter = FrameMeter::new(1_000);
        assert!(!feed_in_chunks(&mut meter, &stream, 13));
        assert!(meter.feed(&frame(true, 0x0, 201)), "400 + 400 + 201 > 1000");

        let mut fresh = FrameMeter::new(1_000);
        let mut again = frame(true, 0x1, 900);
        again.extend(frame(true, 0x1, 900));
        assert!(!fresh.feed(&again), "a new message starts from zero");
    }

    async fn guarded_pair(
        limit: u64,
    ) -> (
        tokio::net::TcpStream,
        GuardedStream<tokio::net::TcpStream>,
        IntCounter,
    ) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let oversized = IntCounter::new("oversized_total", "test").unwrap();
        let connections = Arc::new(Connections::default());
        let mut guarded =
            GuardedListener::new(listener, limit, oversized.clone(), connections.clone());
        let client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (server, peer) = Listener::accept(&mut guarded).await;
        assert_eq!(peer, client.local_addr().unwrap());
        assert!(Arc::ptr_eq(&connections.get(peer).unwrap(), &server.state));
        (client, server, oversized)
    }

    #[tokio::test]
    async fn a_killed_connection_reads_as_closed_and_refuses_writes() {
        let (mut client, mut server, _) = guarded_pair(100).await;
        client.write_all(b"hi").await.unwrap();
        let mut buf = [0u8; 2];
        server.read_exact(&mut buf).await.unwrap();
        let state = server.state.clone();
        let reader = tokio::spawn(async move {
            let mut buf = [0u8; 8];
            let n = server.read(&mut buf).await.unwrap();
            (n, server.write_all(b"late").await.is_err())
        });
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        state.kill();
        let (n, write_failed) = reader.await.unwrap();
        assert_eq!(n, 0, "a pending read wakes up as end of stream");
        assert!(write_failed);
        assert!(state.is_killed());
    }

    #[tokio::test]
    async fn a_closed_connection_leaves_the_list() {
        let (client, server, _) = guarded_pair(100).await;
        let peer = client.local_addr().unwrap();
        let connections = server.connections.clone();
        assert_eq!(connections.len(), 1);
        drop(server);
        assert!(connections.get(peer).is_none());
        assert!(connections.is_empty());
    }

    #[tokio::test]
    async fn an_oversized_websocket_message_closes_only_its_connection() {
        let (mut client, mut server, oversized) = guarded_pair(100).await;
        // HTTP before the switch is not metered.
        client.write_all(&[0xff; 300]).await.unwrap();
        let mut http = [0u8; 300];
        server.read_exact(&mut http).await.unwrap();
        server.state.websocket_started();

        client.write_all(&frame(true, 0x1, 100)).await.unwrap();
        let mut fine = vec![0u8; frame(true, 0x1, 100).len()];
        server.read_exact(&mut fine).await.unwrap();
        assert_eq!(oversized.get(), 0);

        client.write_all(&frame(true, 0x1, 101)).await.unwrap();
        let mut rest = Vec::new();
        server.read_to_end(&mut rest).await.unwrap();
        assert!(
            rest.is_empty(),
            "none of the oversized message is handed on"
        );
        assert_eq!(oversized.get(), 1);
        assert!(server.state.is_killed());
    }
}
