//! Graceful drain on SIGTERM.
//!
//! A pod that is going away must not drop every dashboard at the same
//! moment: they would all reconnect to the remaining pods at once. So each
//! accepted TCP connection carries its own kill switch ([`DrainableStream`]);
//! on drain the switches fire at random moments spread over the drain
//! window. A killed connection reads as closed, the WebSocket ends, and
//! socket.io-client sees "transport close" and reconnects by itself,
//! through the load balancer, to a pod that is still ready.

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
    connections: Mutex<HashMap<u64, CancellationToken>>,
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

    /// Starts draining: every open connection is closed at a random moment
    /// within `window`. Returns how many connections were scheduled.
    pub fn start(&self, window: Duration) -> usize {
        self.draining.store(true, Ordering::Relaxed);
        let tokens: Vec<_> = self
            .connections
            .lock()
            .expect("drain lock")
            .values()
            .cloned()
            .collect();
        for token in &tokens {
            schedule_close(token.clone(), window);
        }
        tokens.len()
    }

    /// Connections still open.
    pub fn open_connections(&self) -> usize {
        self.connections.lock().expect("drain lock").len()
    }

    fn track(self: &Arc<Self>, stream: TcpStream) -> DrainableStream {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let token = CancellationToken::new();
        self.connections
            .lock()
            .expect("drain lock")
            .insert(id, token.clone());
        if self.is_draining() {
            // Accepted during the drain (a poll of an existing session):
            // served briefly, then closed like the others.
            schedule_close(token.clone(), Duration::from_secs(1));
        }
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

    #[tokio::test]
    async fn a_drain_closes_open_connections_within_the_window() {
        let drain = Drain::new();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut listener = DrainableListener::new(listener, drain.clone());

        let mut client = TcpStream::connect(addr).await.unwrap();
        let (mut server, _) = axum::serve::Listener::accept(&mut listener).await;
        client.write_all(b"hi").await.unwrap();
        let mut buf = [0u8; 2];
        server.read_exact(&mut buf).await.unwrap();
        assert_eq!(drain.open_connections(), 1);

        assert_eq!(drain.start(Duration::from_millis(200)), 1);
        assert!(drain.is_draining());
        let read = tokio::time::timeout(Duration::from_secs(2), server.read(&mut buf)).await;
        assert_eq!(
            read.unwrap().unwrap(),
            0,
            "a drained connection reads as closed"
        );
        drop(server);
        assert_eq!(drain.open_connections(), 0);
    }
}
