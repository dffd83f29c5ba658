//! Serving a hyper handler on a TCP listener, for the gateway and the key service's `/metrics`.
//!
//! Every answer these servers give is prepared bytes, so the handler is a plain function from a
//! request to a response. What the loop adds: accepting through [`super::accept::Incoming`],
//! HTTP/1.1 and h2c on one port, [`IDLE_TIMEOUT`] so a client that sends nothing (in any protocol
//! state, before the first byte included) cannot hold a connection, [`HEADER_READ_TIMEOUT`] so
//! one that trickles an HTTP/1 request cannot either (hyper has no such bound for HTTP/2: an h2c
//! client that sends a byte every few seconds keeps its connection), and a graceful shutdown
//! bounded by a grace period.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming as Body;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;

use super::accept::Incoming;
use crate::shutdown::Shutdown;

/// How long a connection may take to send a request's headers, and how long a kept-alive
/// connection may sit idle before its next request (hyper starts the same timer for both).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a connection may go without a byte moving either way before it is closed: a client
/// that connects and says nothing, or stops reading its answer.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves `handler` on `listener` until `shutdown`, then gives open requests `grace` to finish.
/// `name` names the listener in warnings.
pub async fn serve<H>(
    listener: TcpListener,
    name: &'static str,
    handler: Arc<H>,
    shutdown: Shutdown,
    grace: Duration,
) where
    H: Fn(&Request<Body>) -> Response<Full<Bytes>> + Send + Sync + 'static,
{
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(Duration::from_secs(30)));
    let graceful = GracefulShutdown::new();
    let mut incoming = Incoming::new(listener, name, IDLE_TIMEOUT);
    let stop = shutdown.wait();
    tokio::pin!(stop);
    loop {
        let stream = tokio::select! {
            stream = incoming.next() => stream,
            _ = &mut stop => break,
        };
        let handler = Arc::clone(&handler);
        let service = service_fn(move |req: Request<Body>| {
            let response = handler(&req);
            async move { Ok::<_, Infallible>(response) }
        });
        let conn = builder
            .serve_connection(TokioIo::new(stream), service)
            .into_owned();
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            let _ = conn.await;
        });
    }
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = tokio::time::sleep(grace) => {}
    }
}
