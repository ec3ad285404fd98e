//! Graceful drain on SIGTERM.
//!
//! A pod that is going away must not drop every dashboard at the same
//! moment: they would all reconnect to the remaining pods at once. So each
//! accepted TCP connection carries its own kill switch ([`DrainableStream`]);
//! on drain the switches fire at random moments spread over the drain
//! window. A killed connection reads as closed, the WebSocket ends, and
//! socket.io-client sees "transport close" and reconnects by itself,
//! through the load balancer, to a pod that is still ready.
//!
//! Only connections that carried Socket.IO traffic are killed
//! ([`Drain::realtime`], told by the HTTP layer through [`Connection`]):
//! cutting a connection in the middle of `POST /api/v1/events` would lose
//! the answer (a load balancer turns it into a 502). Plain HTTP
//! connections finish their requests and are closed by the server's
//! graceful shutdown after the window.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use rand::Rng;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

/// Tracks open connections and whether the pod is draining.
#[derive(Default)]
pub struct Drain {
    draining: AtomicBool,
    next_id: AtomicU64,
    connections: Mutex<HashMap<u64, Tracked>>,
}

/// An open connection's kill switch, and whether a drain fires it.
struct Tracked {
    kill: CancellationToken,
    /// It carried Socket.IO traffic.
    realtime: bool,
}

/// Which accepted connection a request arrived on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionId(u64);

/// What a request on the app listener knows of its connection: axum's
/// `ConnectInfo<Connection>`.
#[derive(Debug, Clone, Copy)]
pub struct Connection {
    /// The connection, for [`Drain::realtime`].
    pub id: ConnectionId,
    /// The peer's address.
    pub remote: SocketAddr,
}

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, DrainableListener>>
    for Connection
{
    fn connect_info(stream: axum::serve::IncomingStream<'_, DrainableListener>) -> Self {
        Connection {
            id: ConnectionId(stream.io().id),
            remote: *stream.remote_addr(),
        }
    }
}

impl Drain {
    /// A fresh tracker, not draining.
    pub fn new() -> Arc<Self> {
        Arc::new(Drain::default())
    }

    /// Whether a drain has started.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Starts draining: every open Socket.IO connection is closed at a
    /// random moment within `window`. Returns how many were scheduled.
    pub fn start(&self, window: Duration) -> usize {
        self.draining.store(true, Ordering::Relaxed);
        let kills: Vec<_> = self
            .connections
            .lock()
            .expect("drain lock")
            .values()
            .filter(|c| c.realtime)
            .map(|c| c.kill.clone())
            .collect();
        for kill in &kills {
            schedule_close(kill.clone(), window);
        }
        kills.len()
    }

    /// A Socket.IO request arrived on connection `id`: a drain closes it.
    /// During a drain (a poll of an existing session), within a second.
    pub fn realtime(&self, id: ConnectionId) {
        let mut connections = self.connections.lock().expect("drain lock");
        let Some(tracked) = connections.get_mut(&id.0) else {
            return;
        };
        let newly = !std::mem::replace(&mut tracked.realtime, true);
        if newly && self.is_draining() {
            schedule_close(tracked.kill.clone(), Duration::from_secs(1));
        }
    }

    /// Closes every Socket.IO connection still open, now (what the drain
    /// window left); plain HTTP connections finish their requests.
    pub fn close_realtime(&self) {
        let connections = self.connections.lock().expect("drain lock");
        for tracked in connections.values().filter(|c| c.realtime) {
            tracked.kill.cancel();
        }
    }

    /// Connections still open.
    pub fn open_connections(&self) -> usize {
        self.connections.lock().expect("drain lock").len()
    }

    /// Socket.IO connections still open.
    pub fn open_realtime(&self) -> usize {
        let connections = self.connections.lock().expect("drain lock");
        connections.values().filter(|c| c.realtime).count()
    }

    fn track(self: &Arc<Self>, stream: TcpStream) -> DrainableStream {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let token = CancellationToken::new();
        let tracked = Tracked {
            kill: token.clone(),
            realtime: false,
        };
        self.connections
            .lock()
            .expect("drain lock")
            .insert(id, tracked);
        DrainableStream {
            inner: stream,
            killed: Box::pin(token.cancelled_owned()),
            dead: false,
            id,
            drain: self.clone(),
        }
    }
}

fn schedule_close(token: CancellationToken, window: Duration) {
    let max = window.as_millis().max(1) as u64;
    let delay = Duration::from_millis(rand::rng().random_range(0..max));
    tokio::spawn(async move {
        tokio::time::sleep(delay).await;
        token.cancel();
    });
}

/// A listener whose connections can be closed one by one by a drain.
pub struct DrainableListener {
    listener: TcpListener,
    drain: Arc<Drain>,
}

impl DrainableListener {
    /// Wraps `listener`; its connections are tracked by `drain`.
    pub fn new(listener: TcpListener, drain: Arc<Drain>) -> Self {
        DrainableListener { listener, drain }
    }
}

impl axum::serve::Listener for DrainableListener {
    type Io = DrainableStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.listener.accept().await {
                Ok((stream, addr)) => {
                    // Socket.IO frames are small and latency is the product:
                    // without this, Nagle's algorithm and the peer's delayed
                    // ACK hold a reply back for about 40 ms.
                    if let Err(error) = stream.set_nodelay(true) {
                        tracing::debug!(%error, "cannot set TCP_NODELAY");
                    }
                    return (self.drain.track(stream), addr);
                }
                Err(error) => {
                    // Out of file descriptors and the like: wait, do not spin.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.listener.local_addr()
    }
}

/// A TCP connection that reads as closed once its kill switch fires.
pub struct DrainableStream {
    inner: TcpStream,
    killed: Pin<Box<WaitForCancellationFutureOwned>>,
    dead: bool,
    id: u64,
    drain: Arc<Drain>,
}

impl DrainableStream {
    /// The connection's id, as requests on it see it.
    pub fn id(&self) -> ConnectionId {
        ConnectionId(self.id)
    }

    fn check(&mut self, cx: &mut Context<'_>) -> bool {
        if !self.dead && self.killed.as_mut().poll(cx).is_ready() {
            self.dead = true;
        }
        self.dead
    }
}

impl Drop for DrainableStream {
    fn drop(&mut self) {
        self.drain
            .connections
            .lock()
            .expect("drain lock")
            .remove(&self.id);
    }
}

impl AsyncRead for DrainableStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.check(cx) {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for DrainableStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.check(cx) {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// A connection accepted by `listener`, with a client that said "hi".
    async fn connection(
        listener: &mut DrainableListener,
        addr: SocketAddr,
    ) -> (TcpStream, DrainableStream) {
        let mut client = TcpStream::connect(addr).await.unwrap();
        let (mut server, _) = axum::serve::Listener::accept(listener).await;
        client.write_all(b"hi").await.unwrap();
        let mut buf = [0u8; 2];
        server.read_exact(&mut buf).await.unwrap();
        (client, server)
    }

    async fn listener(drain: &Arc<Drain>) -> (DrainableListener, SocketAddr) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        (DrainableListener::new(listener, drain.clone()), addr)
    }

    #[tokio::test]
    async fn a_drain_closes_socket_io_connections_within_the_window() {
        let drain = Drain::new();
        let (mut listener, addr) = listener(&drain).await;
        let (_client, mut server) = connection(&mut listener, addr).await;
        drain.realtime(server.id());
        assert_eq!(drain.open_connections(), 1);

        assert_eq!(drain.start(Duration::from_millis(200)), 1);
        assert!(drain.is_draining());
        let mut buf = [0u8; 2];
        let read = tokio::time::timeout(Duration::from_secs(2), server.read(&mut buf)).await;
        assert_eq!(
            read.unwrap().unwrap(),
            0,
            "a drained connection reads as closed"
        );
        drop(server);
        assert_eq!(drain.open_connections(), 0);
    }

    /// Regression: the drain cut connections in the middle of an ingest
    /// request, which nginx answered with a 502 (drain.test.mjs).
    #[tokio::test]
    async fn a_drain_leaves_plain_http_connections_to_finish() {
        let drain = Drain::new();
        let (mut listener, addr) = listener(&drain).await;
        let (mut before, mut old) = connection(&mut listener, addr).await;
        assert_eq!(drain.start(Duration::from_millis(50)), 0);
        let (mut during, mut new) = connection(&mut listener, addr).await;

        tokio::time::sleep(Duration::from_millis(1200)).await;
        for (client, server) in [(&mut before, &mut old), (&mut during, &mut new)] {
            client.write_all(b"ok").await.unwrap();
            let mut buf = [0u8; 2];
            server.read_exact(&mut buf).await.unwrap();
            server.write_all(b"ok").await.unwrap();
        }
    }

    #[tokio::test]
    async fn a_poll_during_the_drain_is_closed_within_a_second() {
        let drain = Drain::new();
        let (mut listener, addr) = listener(&drain).await;
        drain.start(Duration::from_secs(30));
        let (_client, mut server) = connection(&mut listener, addr).await;
        drain.realtime(server.id());
        let mut buf = [0u8; 2];
        let read = tokio::time::timeout(Duration::from_millis(1500), server.read(&mut buf)).await;
        assert_eq!(read.unwrap().unwrap(), 0);
    }
}
