//! The HTTP side of the gateway: GET and HEAD of the two documents, conditional requests, health,
//! and the Prometheus `/metrics`. Built on hyper directly: every answer is prepared bytes, so there
//! is nothing for a framework to do. Each request runs in an `http` span with a request id (echoed
//! in `x-request-id`) and is counted by path and status.

use std::sync::Arc;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use tokio::net::TcpListener;

use super::documents::Document;
use super::refresh::GatewayState;
use crate::logging::{self, REQUEST_ID_HEADER};
use crate::shutdown::Shutdown;

type Body = Full<Bytes>;

fn plain(status: StatusCode, text: &'static str) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .body(Full::new(Bytes::from_static(text.as_bytes())))
        .expect("static response")
}

fn etag_matches(if_none_match: &HeaderValue, etag: &str) -> bool {
    if_none_match.to_str().is_ok_and(|v| {
        v.split(',')
            .map(str::trim)
            .any(|t| t == "*" || t == etag || t.strip_prefix("W/") == Some(etag))
    })
}

fn document(
    req: &Request<Incoming>,
    doc: &Document,
    cache_control: &HeaderValue,
) -> Response<Body> {
    let not_modified = req
        .headers()
        .get(header::IF_NONE_MATCH)
        .is_some_and(|v| etag_matches(v, &doc.etag));
    let builder = Response::builder()
        .header(header::CACHE_CONTROL, cache_control)
        .header(header::ETAG, &doc.etag);
    if not_modified {
        return builder
            .status(StatusCode::NOT_MODIFIED)
            .body(Full::new(Bytes::new()))
            .expect("valid response");
    }
    // HEAD gets the same headers; hyper sends no body for it.
    builder
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, doc.content_type)
        .body(Full::new(doc.body.clone()))
        .expect("valid response")
}

/// What a gRPC client pointed at the gateway instead of the key service gets: a gRPC answer it can
/// show (trailers-only, UNIMPLEMENTED), not an HTTP page it would try to read as messages.
fn not_the_key_service() -> Response<Body> {
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/grpc")
        .header("grpc-status", "12")
        .header(
            "grpc-message",
            "this is oidc-gateway (the public discovery and JWKS endpoints over HTTP), not the key \
             service: point the client at the key service's gRPC port",
        )
        .body(Full::new(Bytes::new()))
        .expect("valid response")
}

/// Answers one request from the current state.
pub fn respond(state: &GatewayState, req: &Request<Incoming>) -> Response<Body> {
    if req
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
    {
        return not_the_key_service();
    }
    let path = req.uri().path();
    let docs = state.documents_and_age();
    // Which paths are ours is known from the last key set, fresh or not (before the first one,
    // nothing is known, and the documents' paths answer 503 like any other).
    let last = state.last_documents();
    let health = matches!(path, "/healthz" | "/readyz" | "/metrics");
    let one_of_ours = last.as_ref().is_some_and(|d| d.at(path).is_some());
    let known = health || one_of_ours;
    if known && req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = plain(
            StatusCode::METHOD_NOT_ALLOWED,
            "method not allowed: use GET or HEAD\n",
        );
        r.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    match path {
        "/healthz" => return plain(StatusCode::OK, "ok\n"),
        "/readyz" if state.is_ready() => return plain(StatusCode::OK, "ready\n"),
        "/readyz" => {
            return plain(
                StatusCode::SERVICE_UNAVAILABLE,
                "not ready: the key set cannot be refreshed from the key service\n",
            );
        }
        "/metrics" => return metrics(state),
        _ if last.is_some() && !one_of_ours => return plain(StatusCode::NOT_FOUND, "not found\n"),
        _ => {}
    }
    let Some((docs, age)) = docs else {
        let why = if state.last_documents().is_some() {
            "no current key set: the last one is older than --max-stale and the key service has \
             not answered since\n"
        } else {
            "no key set yet: the key service has not answered\n"
        };
        return plain(StatusCode::SERVICE_UNAVAILABLE, why);
    };
    match docs.at(path) {
        Some(doc) => document(req, doc, docs.cache_control(age)),
        None => plain(StatusCode::NOT_FOUND, "not found\n"),
    }
}

fn metrics(state: &GatewayState) -> Response<Body> {
    crate::metrics::observe_gateway(state);
    match crate::metrics::render() {
        Some(text) => Response::builder()
            .status(StatusCode::OK)
            .header(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)
            .body(Full::new(Bytes::from(text)))
            .expect("valid response"),
        None => plain(StatusCode::NOT_FOUND, "metrics are not enabled\n"),
    }
}

/// The metric label of a request path: a path we serve (or served, while the set is too stale to
/// serve), or `other` (labels stay bounded).
fn path_label(state: &GatewayState, path: &str) -> String {
    match path {
        "/healthz" | "/readyz" | "/metrics" => path.to_owned(),
        _ => state
            .last_documents()
            .and_then(|d| d.at(path).map(|doc| doc.path.clone()))
            .unwrap_or_else(|| "other".to_owned()),
    }
}

/// Answers one request in an `http` span carrying its request id, and counts the response.
pub fn handle(state: &GatewayState, req: &Request<Incoming>) -> Response<Body> {
    let request_id = logging::request_id(req.headers().get(REQUEST_ID_HEADER));
    let path = path_label(state, req.uri().path());
    let span = tracing::info_span!(
        "http",
        method = %req.method(),
        path = %path,
        request_id = %request_id,
    );
    let _in_span = span.enter();
    let mut response = respond(state, req);
    if let Ok(v) = HeaderValue::from_str(&request_id) {
        response.headers_mut().insert(REQUEST_ID_HEADER, v);
    }
    crate::metrics::record_gateway_response(&path, response.status());
    tracing::debug!(status = response.status().as_u16(), "request served");
    response
}

/// Accepts connections on `listener` until `shutdown`, then lets open requests finish.
pub async fn serve(listener: TcpListener, state: Arc<GatewayState>, shutdown: Shutdown) {
    let handler = move |req: &Request<Incoming>| handle(&state, req);
    crate::net::http::serve(
        listener,
        "gateway",
        Arc::new(handler),
        shutdown,
        std::time::Duration::from_secs(5),
    )
    .await;
}
