//! Logs: the `tracing` subscriber both binaries install (human-readable text, or one JSON object
//! per line with `--log-format json`), and the request ids that name each request's span.
//!
//! Every gRPC call runs in an `rpc` span and every gateway request in an `http` span, each with a
//! `request_id` (the caller's `x-request-id` when it is a short, plain token, otherwise a fresh
//! random one; echoed in the response). Fields are chosen so that nothing secret is ever logged:
//! RPC names, request ids, status codes, durations, kids — never tokens, claims payloads, key
//! material or request metadata such as `authorization`.

use std::io::IsTerminal as _;

use ring::rand::{SecureRandom as _, SystemRandom};
use tracing_subscriber::EnvFilter;

/// How log lines are written (to stderr).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines (coloured when stderr is a terminal).
    #[default]
    Text,
    /// One JSON object per line, with the current span and the span list.
    Json,
}

/// Installs the global subscriber. The level comes from `RUST_LOG` (default `info`).
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // `try_init`: a second call (tests, or a library user who set up their own) keeps the first.
    let _ = match format {
        LogFormat::Text => builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(true)
            .try_init(),
    };
}

/// The request-id header, read from callers and set on every response.
pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// Longest request id taken from a caller.
const MAX_REQUEST_ID: usize = 64;

/// The request id for a request carrying `incoming` in its `x-request-id` header: the caller's
/// when it is 1–64 characters of `[A-Za-z0-9._:-]` (anything else could forge log structure or
/// flood the logs), otherwise a fresh random one.
pub fn request_id(incoming: Option<&http::HeaderValue>) -> String {
    incoming
        .and_then(|v| v.to_str().ok())
        .filter(|v| {
            !v.is_empty()
                && v.len() <= MAX_REQUEST_ID
                && v.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
        })
        .map_or_else(new_request_id, str::to_owned)
}

/// A fresh request id: 16 random bytes as hex.
pub fn new_request_id() -> String {
    let mut bytes = [0u8; 16];
    if SystemRandom::new().fill(&mut bytes).is_err() {
        // Not worth failing a request over: fall back to the time, still unique enough to grep.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        bytes = nanos.to_be_bytes();
    }
    const HEX: &[u8; 16] = b"0123456789abcdef";
    bytes
        .iter()
        .flat_map(|b| [HEX[usize::from(b >> 4)], HEX[usize::from(b & 0x0f)]])
        .map(char::from)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plain_caller_id_is_kept_and_anything_else_replaced() {
        let keep = http::HeaderValue::from_static("req-42.a_b:c");
        assert_eq!(request_id(Some(&keep)), "req-42.a_b:c");
        for bad in ["", "has space", "quote\"", "{\"json\":1}", &"x".repeat(65)] {
            let v = http::HeaderValue::from_str(bad).unwrap();
            let id = request_id(Some(&v));
            assert_eq!(id.len(), 32, "{bad:?} -> {id}");
            assert!(id.bytes().all(|b| b.is_ascii_hexdigit()));
        }
        assert_ne!(request_id(None), request_id(None));
    }
}
