//! Accepting connections without spinning.
//!
//! `accept(2)` fails while the process is out of file descriptors (EMFILE) or memory, and keeps
//! failing at once until a connection closes. A loop that just tries again burns a core and floods
//! the log. [`Incoming`] pauses [`PAUSE`] after a failure, warns once per [`WARN_EVERY`] with the
//! count of failures since, and yields only good connections, each wrapped in an
//! [`IdleTimeout`]: to a hyper loop through [`Incoming::next`], to tonic as a `Stream`.

use std::convert::Infallible;
use std::future::{Future, poll_fn};
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::time::{Instant, Sleep};

use super::idle::IdleTimeout;

/// How long accepting pauses after a failure (what hyper's old `AddrIncoming` did, shorter).
pub const PAUSE: Duration = Duration::from_millis(100);
/// At most one warning per this long while accepting keeps failing.
pub const WARN_EVERY: Duration = Duration::from_secs(10);

/// A listening socket.
pub trait Listener {
    /// An accepted connection.
    type Conn;
    /// Polls for the next connection.
    fn poll_accept(&self, cx: &mut Context<'_>) -> Poll<io::Result<Self::Conn>>;
}

impl Listener for TcpListener {
    type Conn = TcpStream;
    fn poll_accept(&self, cx: &mut Context<'_>) -> Poll<io::Result<TcpStream>> {
        let (stream, _) = ready!(TcpListener::poll_accept(self, cx))?;
        // A response written while the peer's ACK of an earlier small frame is pending would
        // otherwise wait for the delayed ACK (~40 ms per call on Linux).
        let _ = stream.set_nodelay(true);
        Poll::Ready(Ok(stream))
    }
}

impl Listener for UnixListener {
    type Conn = UnixStream;
    fn poll_accept(&self, cx: &mut Context<'_>) -> Poll<io::Result<UnixStream>> {
        let (stream, _) = ready!(UnixListener::poll_accept(self, cx))?;
        Poll::Ready(Ok(stream))
    }
}

/// The good connections of a listener; failures pause it instead of ending it.
pub struct Incoming<L> {
    listener: L,
    /// Names the listener in warnings ("gateway", "gRPC", …).
    name: &'static str,
    /// How long an accepted connection may go without traffic.
    idle: Duration,
    pause: Option<Pin<Box<Sleep>>>,
    /// Failures not yet reported, and when the last warning went out.
    unreported: u64,
    warned_at: Option<Instant>,
}

impl<L: Listener> Incoming<L> {
    /// Wraps `listener`; `name` says which one it is in warnings, and each connection is closed
    /// after `idle` without traffic.
    pub fn new(listener: L, name: &'static str, idle: Duration) -> Self {
        Incoming {
            listener,
            name,
            idle,
            pause: None,
            unreported: 0,
            warned_at: None,
        }
    }

    /// The next good connection.
    pub async fn next(&mut self) -> IdleTimeout<L::Conn> {
        poll_fn(|cx| self.poll_conn(cx)).await
    }

    fn poll_conn(&mut self, cx: &mut Context<'_>) -> Poll<IdleTimeout<L::Conn>> {
        loop {
            if let Some(pause) = self.pause.as_mut() {
                ready!(pause.as_mut().poll(cx));
                self.pause = None;
            }
            match ready!(self.listener.poll_accept(cx)) {
                Ok(conn) => return Poll::Ready(IdleTimeout::new(conn, self.idle)),
                Err(e) => {
                    self.failed(&e);
                    self.pause = Some(Box::pin(tokio::time::sleep(PAUSE)));
                }
            }
        }
    }

    fn failed(&mut self, e: &io::Error) {
        self.unreported += 1;
        let now = Instant::now();
        if self.warned_at.is_none_or(|at| now >= at + WARN_EVERY) {
            tracing::warn!(
                listener = self.name,
                error = %e,
                failures = self.unreported,
                "cannot accept connections; retrying every {} ms",
                PAUSE.as_millis()
            );
            self.unreported = 0;
            self.warned_at = Some(now);
        }
    }
}

impl<L: Listener + Unpin> tokio_stream::Stream for Incoming<L> {
    type Item = Result<IdleTimeout<L::Conn>, Infallible>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.get_mut().poll_conn(cx).map(|conn| Some(Ok(conn)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Fails `failures` times, then yields a connection.
    struct Flaky {
        failures: usize,
        calls: AtomicUsize,
    }

    impl Listener for Flaky {
        type Conn = usize;
        fn poll_accept(&self, _: &mut Context<'_>) -> Poll<io::Result<usize>> {
            let call = self.calls.fetch_add(1, Ordering::SeqCst);
            if call < self.failures {
                Poll::Ready(Err(io::Error::from_raw_os_error(24))) // EMFILE
            } else {
                Poll::Ready(Ok(call))
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn failures_pause_instead_of_spinning() {
        let mut incoming = Incoming::new(
            Flaky {
                failures: 3,
                calls: AtomicUsize::new(0),
            },
            "test",
            Duration::from_secs(10),
        );
        let started = Instant::now();
        let conn = incoming.next().await;
        assert_eq!(
            *conn.get_ref(),
            3,
            "the first good connection, after three failures"
        );
        // Three failures, each followed by a pause: the loop tried four times, not thousands.
        assert_eq!(incoming.listener.calls.load(Ordering::SeqCst), 4);
        assert_eq!(started.elapsed(), PAUSE * 3);
        // One warning went out for the first failure; the next two wait for WARN_EVERY.
        assert_eq!(incoming.unreported, 2);
    }
}
