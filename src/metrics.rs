//! Prometheus metrics, through the `metrics` facade and `metrics-exporter-prometheus`'s renderer.
//!
//! The core (keys, lifecycle, tokens) records nothing. The adapters record what passes through
//! them (the gRPC layer in [`crate::grpc::instrument`], the signing RPCs, the gateway), the key
//! manager counts rotations by reason, and the state-like numbers — the active key's age, the time
//! to the next rotation, the gateway's key set age — are computed from the current snapshot when
//! Prometheus scrapes ([`observe_keys`], [`observe_gateway`]), so they are never stale.
//!
//! `oidc-kms --metrics-listen ADDR` serves `/metrics` on its own plain-HTTP port ([`serve`]);
//! `oidc-gateway` serves it next to the documents. Recording before [`install`] is a no-op.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use ::metrics::{
    Unit, counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram,
};
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;

use crate::gateway::GatewayState;
use crate::key_manager::{KeyManager, RotationReason};
use crate::lifecycle::KeyState;
use crate::shutdown::Shutdown;

/// Metric names, in one place (the README's list is generated from the same names by hand).
pub mod names {
    /// Counter: gRPC calls finished, by `service`, `method` and `code` (e.g. `INVALID_ARGUMENT`).
    pub const GRPC_REQUESTS: &str = "oidc_kms_grpc_requests_total";
    /// Histogram: gRPC call latency in seconds, by `service` and `method`.
    pub const GRPC_DURATION: &str = "oidc_kms_grpc_request_duration_seconds";
    /// Histogram: time to sign one token (waiting for a signing thread included), by `algorithm`.
    pub const SIGN_DURATION: &str = "oidc_kms_sign_duration_seconds";
    /// Counter: tokens signed, by `kid` (SignToken and the Kubernetes signer's Sign).
    pub const TOKENS_SIGNED: &str = "oidc_kms_tokens_signed_total";
    /// Counter: rotations, by `reason` (`scheduled`, `manual`).
    pub const ROTATIONS: &str = "oidc_kms_rotations_total";
    /// Gauge: seconds since the active key was made.
    pub const ACTIVE_KEY_AGE: &str = "oidc_kms_active_key_age_seconds";
    /// Gauge: seconds until the next scheduled rotation starts (or, while a pre-published key is
    /// pending, until it signs); `+Inf` when nothing is scheduled.
    pub const NEXT_ROTATION: &str = "oidc_kms_next_rotation_seconds";
    /// Gauge: keys in the keyring, by `state`.
    pub const KEYS: &str = "oidc_kms_keys";
    /// Gauge: always 1, with the `version` label.
    pub const BUILD_INFO: &str = "oidc_kms_build_info";
    /// Counter: gateway responses, by `path` (a served path or `other`) and `status`.
    pub const GATEWAY_RESPONSES: &str = "oidc_gateway_http_responses_total";
    /// Gauge: seconds since the gateway last refreshed its key set successfully.
    pub const GATEWAY_JWKS_AGE: &str = "oidc_gateway_jwks_age_seconds";
    /// Gauge: keys in the gateway's JWKS.
    pub const GATEWAY_JWKS_KEYS: &str = "oidc_gateway_jwks_keys";
    /// Counter: failed refreshes from the key service.
    pub const GATEWAY_REFRESH_ERRORS: &str = "oidc_gateway_refresh_errors_total";
    /// Gauge: 1 when `/readyz` answers 200.
    pub const GATEWAY_READY: &str = "oidc_gateway_ready";
}
use names::*;

/// The installed recorder's handle, for rendering. Set once by [`install`].
static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// How often histogram samples are folded into their buckets when nobody scrapes.
const UPKEEP: Duration = Duration::from_secs(5);

/// Latency buckets, in seconds: signing is sub-millisecond (ECDSA) to a few ms (RSA-4096).
const SIGN_BUCKETS: &[f64] = &[
    0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
];
/// Latency buckets for whole calls: a rotation generates a key and fsyncs (RSA-4096: seconds).
const RPC_BUCKETS: &[f64] = &[
    0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// The recorder could not be installed.
#[derive(Debug, thiserror::Error)]
#[error("cannot install the metrics recorder: {0}")]
pub struct InstallError(String);

/// Installs the process-wide Prometheus recorder (once; later calls do nothing) and starts the
/// upkeep thread that keeps histogram memory bounded between scrapes.
pub fn install() -> Result<(), InstallError> {
    if HANDLE.get().is_some() {
        return Ok(());
    }
    let err = |e: metrics_exporter_prometheus::BuildError| InstallError(e.to_string());
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Full(SIGN_DURATION.into()), SIGN_BUCKETS)
        .map_err(err)?
        .set_buckets_for_metric(Matcher::Full(GRPC_DURATION.into()), RPC_BUCKETS)
        .map_err(err)?
        .install_recorder()
        .map_err(err)?;
    let upkeep = handle.clone();
    std::thread::Builder::new()
        .name("metrics-upkeep".into())
        .spawn(move || {
            loop {
                std::thread::sleep(UPKEEP);
                upkeep.run_upkeep();
            }
        })
        .map_err(|e| InstallError(e.to_string()))?;
    let _ = HANDLE.set(handle);
    Ok(())
}

/// The Prometheus text exposition of every metric, or `None` before [`install`].
pub fn render() -> Option<String> {
    HANDLE.get().map(PrometheusHandle::render)
}

/// Describes the key service's metrics and creates its counters (at zero unless already counted:
/// a rotation at start-up may come first), so a dashboard sees
/// `rotations_total{reason="manual"} 0` before the first rotation.
pub fn register_kms() {
    describe_counter!(
        GRPC_REQUESTS,
        "gRPC calls finished, by service, method and status code."
    );
    describe_histogram!(
        GRPC_DURATION,
        Unit::Seconds,
        "gRPC call latency, by service and method."
    );
    describe_histogram!(
        SIGN_DURATION,
        Unit::Seconds,
        "Time to sign one token, waiting for a signing thread included, by algorithm."
    );
    describe_counter!(TOKENS_SIGNED, "Tokens signed, by key id.");
    describe_counter!(ROTATIONS, "Key rotations, by reason (scheduled, manual).");
    describe_gauge!(
        ACTIVE_KEY_AGE,
        Unit::Seconds,
        "Seconds since the active key was made."
    );
    describe_gauge!(
        NEXT_ROTATION,
        Unit::Seconds,
        "Seconds until the next scheduled rotation starts (while a pre-published key is pending: \
         until it signs); +Inf when none is scheduled."
    );
    describe_gauge!(KEYS, "Keys in the keyring, by state.");
    describe_gauge!(
        BUILD_INFO,
        "Always 1; the version label says which build runs."
    );
    for reason in [RotationReason::Scheduled, RotationReason::Manual] {
        counter!(ROTATIONS, "reason" => reason_label(reason)).increment(0);
    }
    gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
}

/// Describes the gateway's metrics and creates its counters at zero.
pub fn register_gateway() {
    describe_counter!(
        GATEWAY_RESPONSES,
        "Gateway HTTP responses, by path and status."
    );
    describe_gauge!(
        GATEWAY_JWKS_AGE,
        Unit::Seconds,
        "Seconds since the key set was last refreshed from the key service."
    );
    describe_gauge!(GATEWAY_JWKS_KEYS, "Keys in the served JWKS.");
    describe_counter!(
        GATEWAY_REFRESH_ERRORS,
        "Failed key set refreshes from the key service."
    );
    describe_gauge!(GATEWAY_READY, "1 when /readyz answers 200, else 0.");
    counter!(GATEWAY_REFRESH_ERRORS).increment(0);
    gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
}

fn reason_label(reason: RotationReason) -> &'static str {
    match reason {
        RotationReason::Manual => "manual",
        RotationReason::Scheduled => "scheduled",
    }
}

/// Records one finished gRPC call. Labels are bounded: the caller maps unknown paths to
/// `unknown` (see [`crate::grpc::instrument`]).
pub fn record_rpc(service: &'static str, method: &'static str, code: &'static str, took: Duration) {
    counter!(GRPC_REQUESTS, "service" => service, "method" => method, "code" => code).increment(1);
    histogram!(GRPC_DURATION, "service" => service, "method" => method).record(took.as_secs_f64());
}

/// Records one signed token: its algorithm's latency and its key's count.
pub fn record_signature(algorithm: &'static str, kid: &str, took: Duration) {
    histogram!(SIGN_DURATION, "algorithm" => algorithm).record(took.as_secs_f64());
    counter!(TOKENS_SIGNED, "kid" => kid.to_owned()).increment(1);
}

/// Records one rotation (called by the key manager, where the reason is known).
pub fn record_rotation(reason: RotationReason) {
    counter!(ROTATIONS, "reason" => reason_label(reason)).increment(1);
}

/// Sets the key gauges from `manager`'s current snapshot; called on every scrape.
pub fn observe_keys(manager: &KeyManager) {
    let set = manager.key_set();
    let now = manager.now();
    let policy = &manager.settings().policy;
    for state in [
        KeyState::Next,
        KeyState::Active,
        KeyState::Previous,
        KeyState::Retired,
    ] {
        let count = set
            .keyring
            .retired()
            .iter()
            .chain(set.keyring.records())
            .filter(|r| r.state(now) == state)
            .count();
        gauge!(KEYS, "state" => state.as_str()).set(count as f64);
    }
    if let Some(active) = set.keyring.active(now) {
        gauge!(ACTIVE_KEY_AGE).set(active.created_at.until(now).as_secs_f64());
    }
    let next = set
        .keyring
        .rotation_due(now, policy)
        .or_else(|| set.keyring.pending_next(now).map(|k| k.activates_at));
    gauge!(NEXT_ROTATION).set(next.map_or(f64::INFINITY, |at| now.until(at).as_secs_f64()));
}

/// Records one gateway response; `path` must come from a bounded set.
pub fn record_gateway_response(path: &str, status: StatusCode) {
    counter!(
        GATEWAY_RESPONSES,
        "path" => path.to_owned(),
        "status" => status.as_str().to_owned()
    )
    .increment(1);
}

/// Records a failed key set refresh.
pub fn record_refresh_error() {
    counter!(GATEWAY_REFRESH_ERRORS).increment(1);
}

/// Sets the gateway gauges from its state; called on every scrape.
pub fn observe_gateway(state: &GatewayState) {
    gauge!(GATEWAY_READY).set(if state.is_ready() { 1.0 } else { 0.0 });
    if let Some((age, keys)) = state.last_refresh() {
        gauge!(GATEWAY_JWKS_AGE).set(age.as_secs_f64());
        gauge!(GATEWAY_JWKS_KEYS).set(keys as f64);
    }
}

/// The media type of the Prometheus text format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// What a scrape returns: refresh the computed gauges, then render.
pub type Scrape = Arc<dyn Fn() -> String + Send + Sync>;

/// The key service's scrape: key gauges from `manager`, then everything recorded.
pub fn kms_scrape(manager: KeyManager) -> Scrape {
    Arc::new(move || {
        observe_keys(&manager);
        render().unwrap_or_default()
    })
}

fn answer(scrape: &Scrape, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let text = |status, body: &'static str| {
        Response::builder()
            .status(status)
            .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
            .body(Full::new(Bytes::from_static(body.as_bytes())))
            .expect("static response")
    };
    if req.uri().path() != "/metrics" {
        return text(
            StatusCode::NOT_FOUND,
            "not found: the metrics are at /metrics\n",
        );
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(
            StatusCode::METHOD_NOT_ALLOWED,
            "method not allowed: use GET\n",
        );
    }
    Response::builder()
        .header(header::CONTENT_TYPE, CONTENT_TYPE)
        .body(Full::new(Bytes::from(scrape())))
        .expect("valid response")
}

/// Serves `GET /metrics` (plain HTTP) on `listener` until `shutdown`.
pub async fn serve(listener: TcpListener, scrape: Scrape, shutdown: Shutdown) {
    let handler = move |req: &Request<Incoming>| answer(&scrape, req);
    crate::net::http::serve(
        listener,
        "metrics",
        Arc::new(handler),
        shutdown,
        Duration::from_secs(2),
    )
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recorded_values_render_with_their_labels() {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Full(SIGN_DURATION.into()), SIGN_BUCKETS)
            .unwrap()
            .build_recorder();
        let handle = recorder.handle();
        ::metrics::with_local_recorder(&recorder, || {
            register_kms();
            record_rotation(RotationReason::Manual);
            record_rpc(
                "oidckms.v1.KeyService",
                "SignToken",
                "INVALID_ARGUMENT",
                Duration::ZERO,
            );
            for _ in 0..3 {
                record_signature("ES256", "kid-1", Duration::from_micros(300));
            }
        });
        let text = handle.render();
        assert!(
            text.contains("oidc_kms_rotations_total{reason=\"manual\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("oidc_kms_rotations_total{reason=\"scheduled\"} 0"),
            "{text}"
        );
        assert!(
            text.contains("oidc_kms_tokens_signed_total{kid=\"kid-1\"} 3"),
            "{text}"
        );
        assert!(
            text.contains(
                "oidc_kms_sign_duration_seconds_bucket{algorithm=\"ES256\",le=\"0.0005\"} 3"
            ),
            "{text}"
        );
        assert!(text.contains("code=\"INVALID_ARGUMENT\""), "{text}");
        assert!(
            text.contains("# TYPE oidc_kms_sign_duration_seconds histogram"),
            "{text}"
        );
    }
}
