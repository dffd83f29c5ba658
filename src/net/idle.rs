//! Closing connections on which nothing moves.
//!
//! hyper's header timeout starts only once it has an HTTP/1 request to wait for: a client that
//! connects and sends nothing (so the server cannot yet tell HTTP/1 from HTTP/2), or sends only
//! the HTTP/2 preface, would hold its connection, and its file descriptor, for ever. A few
//! thousand such clients would starve the public gateway. [`IdleTimeout`] wraps a connection and
//! fails its next read or write once no byte has moved either way for its limit, which makes the
//! server drop the connection whatever protocol state it is in.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};
use tonic::transport::server::Connected;

/// A connection that fails with [`io::ErrorKind::TimedOut`] after `limit` without traffic.
pub struct IdleTimeout<T> {
    inner: T,
    limit: Duration,
    /// When a byte last moved.
    last: Instant,
    /// Fires no earlier than `last + limit`; re-armed lazily when it fires early.
    timer: Pin<Box<Sleep>>,
}

impl<T> IdleTimeout<T> {
    /// Wraps `inner`; the clock starts now.
    pub fn new(inner: T, limit: Duration) -> Self {
        let last = Instant::now();
        IdleTimeout {
            inner,
            limit,
            last,
            timer: Box::pin(tokio::time::sleep_until(last + limit)),
        }
    }

    /// The wrapped connection.
    pub fn get_ref(&self) -> &T {
        &self.inner
    }

    fn moved(&mut self, bytes: usize) {
        if bytes > 0 {
            self.last = Instant::now();
        }
    }

    /// What a write returns: its result, counted as traffic, or the idle check while it waits.
    fn written(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<io::Result<usize>>,
    ) -> Poll<io::Result<usize>> {
        match polled {
            Poll::Ready(result) => {
                self.moved(*result.as_ref().unwrap_or(&0));
                Poll::Ready(result)
            }
            Poll::Pending => self.check(cx).map(Err),
        }
    }

    /// Called when the inner connection is not ready: an error once the limit has passed,
    /// otherwise pending, with the timer set to wake the task when it will have.
    fn check(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        loop {
            let deadline = self.last + self.limit;
            if self.timer.deadline() < deadline {
                self.timer.as_mut().reset(deadline);
            }
            match self.timer.as_mut().poll(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(()) if Instant::now() >= self.last + self.limit => {
                    return Poll::Ready(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("no traffic for {} s", self.limit.as_secs()),
                    ));
                }
                Poll::Ready(()) => {}
            }
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for IdleTimeout<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(result) => {
                this.moved(buf.filled().len() - before);
                Poll::Ready(result)
            }
            Poll::Pending => this.check(cx).map(Err),
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for IdleTimeout<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.written(cx, polled)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.written(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_flush(cx) {
            Poll::Ready(result) => Poll::Ready(result),
            Poll::Pending => this.check(cx).map(Err),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// tonic reads the peer's address (and, under TLS, its certificates) through this.
impl<T: Connected> Connected for IdleTimeout<T> {
    type ConnectInfo = T::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test(start_paused = true)]
    async fn a_silent_peer_times_out_and_traffic_keeps_it_open() {
        let (ours, mut theirs) = tokio::io::duplex(64);
        let mut conn = IdleTimeout::new(ours, Duration::from_secs(10));
        let mut buf = [0u8; 8];

        // Bytes every 6 s keep it open past the limit.
        for _ in 0..3 {
            tokio::time::advance(Duration::from_secs(6)).await;
            theirs.write_all(b"x").await.unwrap();
            assert_eq!(conn.read(&mut buf).await.unwrap(), 1);
        }
        // Then silence: the read fails once 10 s have passed without traffic.
        let started = Instant::now();
        let err = conn.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(started.elapsed(), Duration::from_secs(10));
    }

    #[tokio::test(start_paused = true)]
    async fn a_peer_that_stops_reading_times_out_the_write() {
        let (ours, _theirs) = tokio::io::duplex(4);
        let mut conn = IdleTimeout::new(ours, Duration::from_secs(10));
        // The pipe holds 4 bytes; the rest waits for a reader that never comes.
        let err = conn.write_all(b"more than four bytes").await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
    }
}
