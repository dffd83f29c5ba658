//! The gRPC adapter: the generated `oidckms.v1` code, the `KeyService` implementation over the
//! [`KeyManager`](crate::key_manager::KeyManager), the one place errors become statuses, and the
//! server that registers health and reflection next to it. [`k8s_signer`] serves the Kubernetes
//! external JWT signer (generated code in [`k8s_v1alpha1`] and [`k8s_v1`]) on a Unix socket.
//! [`tls`] secures the listener with mutual TLS and [`access`] decides who may call what.
//! [`instrument`] gives every call a span with a request id, and counts and times it.

pub mod access;
pub mod audit;
pub mod caller;
pub mod client;
pub mod codec;
pub mod deadline;
pub mod instrument;
pub mod k8s_signer;
pub mod key_service;
pub mod server;
pub mod status;
pub mod tls;

use std::time::Duration;

/// How long a gRPC connection may go without a byte moving before it is closed: a peer that
/// connects and never speaks, or stops answering. Idle clients are not affected: the server
/// pings every [`KEEPALIVE_INTERVAL`], and a live client's answer is traffic.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// How often the server pings a quiet HTTP/2 connection, and how long it waits for the answer.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);

/// Generated protobuf and gRPC code for `oidckms.v1`.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod pb {
    tonic::include_proto!("oidckms.v1");

    /// The encoded file descriptor set, for server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/oidckms_descriptor.bin"));
}

/// Generated code for the Kubernetes external JWT signer, package `v1alpha1` (Kubernetes 1.32–1.33).
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod k8s_v1alpha1 {
    tonic::include_proto!("v1alpha1");
}

/// Generated code for the Kubernetes external JWT signer, package `v1` (Kubernetes 1.34 and later).
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod k8s_v1 {
    tonic::include_proto!("v1");
}
