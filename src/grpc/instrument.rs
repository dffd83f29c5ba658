//! Per-call instrumentation of the gRPC servers, as one tower layer ([`InstrumentLayer`]): each
//! call runs in an `rpc` span carrying the RPC name and a request id (the caller's `x-request-id`
//! or a fresh one, echoed in the response headers and put in the request's extensions as a
//! [`RequestId`]); when the call ends, its status code is counted and its latency recorded
//! ([`crate::metrics::record_rpc`]) and one log line says how it ended.
//!
//! The status of a unary call is in the response headers when it failed before answering
//! ("trailers-only") and in the trailers otherwise, so the response body is wrapped to read the
//! trailers as they go by. A body dropped before its trailers is a call the client cancelled.
//!
//! Labels are bounded: RPCs outside the services we serve are counted as `unknown/unknown`, so a
//! client cannot make up metric series by calling made-up paths.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response};
use hyper::body::{Body, Frame, SizeHint};
use tower::{Layer, Service};
use tracing::Instrument as _;

use crate::logging::{self, REQUEST_ID_HEADER};
use crate::metrics;

/// The services we serve and their methods; anything else is labelled `unknown`.
const KNOWN: &[(&str, &[&str])] = &[
    (
        "oidckms.v1.KeyService",
        &["SignToken", "RotateKeys", "GetJwks", "ListKeys"],
    ),
    ("grpc.health.v1.Health", &["Check", "Watch"]),
    (
        "grpc.reflection.v1.ServerReflection",
        &["ServerReflectionInfo"],
    ),
    (
        "grpc.reflection.v1alpha.ServerReflection",
        &["ServerReflectionInfo"],
    ),
    ("v1.ExternalJWTSigner", &["Sign", "FetchKeys", "Metadata"]),
    (
        "v1alpha1.ExternalJWTSigner",
        &["Sign", "FetchKeys", "Metadata"],
    ),
];

/// Calls logged at debug level when they succeed: probes, tooling, and the reads that gateways
/// and kube-apiserver poll (`*` for every method). They are counted all the same.
const QUIET: &[(&str, &str)] = &[
    ("grpc.health.v1.Health", "*"),
    ("grpc.reflection.v1.ServerReflection", "*"),
    ("grpc.reflection.v1alpha.ServerReflection", "*"),
    ("oidckms.v1.KeyService", "GetJwks"),
    ("v1.ExternalJWTSigner", "FetchKeys"),
    ("v1.ExternalJWTSigner", "Metadata"),
    ("v1alpha1.ExternalJWTSigner", "FetchKeys"),
    ("v1alpha1.ExternalJWTSigner", "Metadata"),
];

/// Calls that write an audit record ([`crate::grpc::audit`]) in their span, naming the caller,
/// the key, the token and the outcome: when they succeed, that record is their line, and the
/// `rpc finished` line goes to debug level with the quiet calls. Failures are logged as usual.
const AUDITED: &[(&str, &str)] = &[
    ("oidckms.v1.KeyService", "SignToken"),
    ("v1.ExternalJWTSigner", "Sign"),
    ("v1alpha1.ExternalJWTSigner", "Sign"),
];

fn is_quiet(service: &str, method: &str) -> bool {
    QUIET
        .iter()
        .any(|(s, m)| *s == service && (*m == "*" || *m == method))
}

fn is_audited(service: &str, method: &str) -> bool {
    AUDITED.contains(&(service, method))
}

/// The (service, method) labels of a request path such as `/oidckms.v1.KeyService/SignToken`.
pub fn rpc_labels(path: &str) -> (&'static str, &'static str) {
    let mut parts = path.trim_start_matches('/').splitn(2, '/');
    let (service, method) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    KNOWN
        .iter()
        .find(|(s, _)| *s == service)
        .and_then(|(s, methods)| methods.iter().find(|m| **m == method).map(|m| (*s, *m)))
        .unwrap_or(("unknown", "unknown"))
}

/// The canonical name of a gRPC status code, as the gRPC spec spells it (`INVALID_ARGUMENT`).
pub fn code_name(code: i32) -> &'static str {
    match code {
        0 => "OK",
        1 => "CANCELLED",
        3 => "INVALID_ARGUMENT",
        4 => "DEADLINE_EXCEEDED",
        5 => "NOT_FOUND",
        6 => "ALREADY_EXISTS",
        7 => "PERMISSION_DENIED",
        8 => "RESOURCE_EXHAUSTED",
        9 => "FAILED_PRECONDITION",
        10 => "ABORTED",
        11 => "OUT_OF_RANGE",
        12 => "UNIMPLEMENTED",
        13 => "INTERNAL",
        14 => "UNAVAILABLE",
        15 => "DATA_LOSS",
        16 => "UNAUTHENTICATED",
        _ => "UNKNOWN",
    }
}

fn status_in(headers: &HeaderMap) -> Option<&'static str> {
    let value = headers.get("grpc-status")?;
    Some(code_name(
        value
            .to_str()
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(2),
    ))
}

/// The request id of a call, in its extensions for handlers that want it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestId(pub String);

/// The layer: wrap a server's routes with it (outermost, so refusals are counted too).
#[derive(Debug, Clone, Copy, Default)]
pub struct InstrumentLayer;

impl<S> Layer<S> for InstrumentLayer {
    type Service = Instrumented<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Instrumented { inner }
    }
}

/// A service wrapped by [`InstrumentLayer`].
#[derive(Debug, Clone)]
pub struct Instrumented<S> {
    inner: S,
}

/// What is recorded when a call ends.
#[derive(Debug)]
struct Finish {
    service: &'static str,
    method: &'static str,
    started: Instant,
    span: tracing::Span,
}

impl Finish {
    fn record(self, code: &'static str) {
        let took = self.started.elapsed();
        metrics::record_rpc(self.service, self.method, code, took);
        let _in_span = self.span.enter();
        let elapsed_ms = took.as_secs_f64() * 1000.0;
        if matches!(code, "INTERNAL" | "UNKNOWN" | "DATA_LOSS" | "UNAVAILABLE") {
            tracing::warn!(code, elapsed_ms, "rpc failed");
        } else if is_quiet(self.service, self.method)
            || (code == "OK" && is_audited(self.service, self.method))
        {
            tracing::debug!(code, elapsed_ms, "rpc finished");
        } else {
            tracing::info!(code, elapsed_ms, "rpc finished");
        }
    }
}

type BoxFuture<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send>>;

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for Instrumented<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ReqBody: Send + 'static,
    ResBody: Body<Data = Bytes> + Send + 'static,
{
    type Response = Response<InstrumentedBody<ResBody>>;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<ReqBody>) -> Self::Future {
        // The service that was polled ready handles this call; a clone takes its place.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let (service, method) = rpc_labels(request.uri().path());
        let request_id = logging::request_id(request.headers().get(REQUEST_ID_HEADER));
        let span = tracing::info_span!(
            "rpc",
            rpc = %format_args!("{service}/{method}"),
            request_id = %request_id,
        );
        request
            .extensions_mut()
            .insert(RequestId(request_id.clone()));
        let finish = Finish {
            service,
            method,
            started: Instant::now(),
            span: span.clone(),
        };
        let call = {
            let _in_span = span.enter();
            inner.call(request)
        };
        Box::pin(
            async move {
                let mut response = match call.await {
                    Ok(r) => r,
                    Err(e) => {
                        finish.record("INTERNAL");
                        return Err(e);
                    }
                };
                if let Ok(v) = HeaderValue::from_str(&request_id) {
                    response.headers_mut().insert(REQUEST_ID_HEADER, v);
                }
                let finish = match status_in(response.headers()) {
                    Some(code) => {
                        finish.record(code);
                        None
                    }
                    None => Some(finish),
                };
                Ok(response.map(|body| InstrumentedBody {
                    inner: Box::pin(body),
                    finish,
                }))
            }
            .instrument(span),
        )
    }
}

/// A response body that records the call's status when its trailers pass.
#[derive(Debug)]
pub struct InstrumentedBody<B> {
    inner: Pin<Box<B>>,
    finish: Option<Finish>,
}

impl<B> Body for InstrumentedBody<B>
where
    B: Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let polled = self.inner.as_mut().poll_frame(cx);
        let code = match &polled {
            Poll::Ready(Some(Ok(frame))) => frame
                .trailers_ref()
                .map(|t| status_in(t).unwrap_or("UNKNOWN")),
            Poll::Ready(Some(Err(_))) => Some("INTERNAL"),
            // A gRPC response that ends without a status is an error by the spec.
            Poll::Ready(None) => Some("UNKNOWN"),
            Poll::Pending => None,
        };
        if let Some(code) = code
            && let Some(finish) = self.finish.take()
        {
            finish.record(code);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<B> Drop for InstrumentedBody<B> {
    fn drop(&mut self) {
        if let Some(finish) = self.finish.take() {
            finish.record("CANCELLED");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_bounded_to_the_served_rpcs() {
        assert_eq!(
            rpc_labels("/oidckms.v1.KeyService/SignToken"),
            ("oidckms.v1.KeyService", "SignToken")
        );
        assert_eq!(
            rpc_labels("/v1alpha1.ExternalJWTSigner/FetchKeys"),
            ("v1alpha1.ExternalJWTSigner", "FetchKeys")
        );
        for junk in [
            "/",
            "",
            "/oidckms.v1.KeyService/Nope",
            "/made.up.Service/SignToken",
            "/oidckms.v1.KeyService/SignToken/extra",
        ] {
            assert_eq!(rpc_labels(junk), ("unknown", "unknown"), "{junk}");
        }
    }

    #[test]
    fn polled_reads_and_probes_are_quiet_work_is_not() {
        assert!(is_quiet("grpc.health.v1.Health", "Check"));
        assert!(is_quiet("oidckms.v1.KeyService", "GetJwks"));
        assert!(is_quiet("v1.ExternalJWTSigner", "FetchKeys"));
        assert!(!is_quiet("oidckms.v1.KeyService", "SignToken"));
        assert!(!is_quiet("v1alpha1.ExternalJWTSigner", "Sign"));
        assert!(!is_quiet("unknown", "unknown"));
        assert!(is_audited("oidckms.v1.KeyService", "SignToken"));
        assert!(is_audited("v1.ExternalJWTSigner", "Sign"));
        assert!(!is_audited("oidckms.v1.KeyService", "RotateKeys"));
    }

    #[test]
    fn codes_have_their_canonical_names() {
        assert_eq!(code_name(0), "OK");
        assert_eq!(code_name(3), "INVALID_ARGUMENT");
        assert_eq!(code_name(16), "UNAUTHENTICATED");
        assert_eq!(code_name(99), "UNKNOWN");
        let mut headers = HeaderMap::new();
        assert_eq!(status_in(&headers), None);
        headers.insert("grpc-status", HeaderValue::from_static("9"));
        assert_eq!(status_in(&headers), Some("FAILED_PRECONDITION"));
        headers.insert("grpc-status", HeaderValue::from_static("junk"));
        assert_eq!(status_in(&headers), Some("UNKNOWN"));
    }
}
