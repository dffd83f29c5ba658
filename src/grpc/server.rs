//! The gRPC server: `KeyService` with grpc.health.v1 and server reflection (v1 and v1alpha, since
//! grpcurl 1.8 speaks only v1alpha) registered beside it. Under mutual TLS, every call first passes
//! the access layer ([`super::access`]). Outermost, [`super::instrument`] gives every call its span
//! and request id and counts it, refusals included.
//!
//! Health reports each service by name (`oidckms.v1.KeyService`, both reflection services) and the
//! server as a whole (`""`), all `SERVING` until shutdown begins, then `NOT_SERVING`; then the
//! statuses are cleared, which ends open `Watch` streams so they do not hold up the shutdown.

use std::future::Future;

use tokio::net::TcpListener;
use tonic::transport::Server;
use tonic_health::ServingStatus;

use super::access::AccessLayer;
use super::instrument::InstrumentLayer;
use super::key_service::KeyServiceApi;
use super::pb::{self, key_service_server::KeyServiceServer};
use super::tls::Transport;
use crate::key_manager::KeyManager;
use crate::net::accept::Incoming;

/// The largest request the key service decodes (claims are capped at 16 KiB; this leaves room
/// for the rest of a request; anything larger is refused unread, with OUT_OF_RANGE naming the limit).
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// The reflection services, reported in health by name.
const REFLECTION_SERVICES: [&str; 2] = [
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
];

/// Serving failed.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The reflection descriptors could not be loaded.
    #[error("gRPC reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// The transport failed.
    #[error("gRPC transport: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// Serves the key service on `listener`, secured as `transport` says, until `shutdown` resolves.
pub async fn serve(
    manager: KeyManager,
    listener: TcpListener,
    transport: Transport,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    let (tls, access) = match transport {
        Transport::Plaintext => (None, None),
        Transport::MutualTls { config, policy } => (Some(config), Some(AccessLayer::new(policy))),
    };
    let mut builder = Server::builder()
        .http2_keepalive_interval(Some(super::KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(super::KEEPALIVE_INTERVAL));
    if let Some(config) = tls {
        builder = builder.tls_config(config)?;
    }
    let (mut health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<KeyServiceServer<KeyServiceApi>>()
        .await;
    for service in REFLECTION_SERVICES {
        health
            .set_service_status(service, ServingStatus::Serving)
            .await;
    }
    let shutdown = async move {
        shutdown.await;
        // Clients watching health learn of the shutdown before their connections close.
        health
            .set_not_serving::<KeyServiceServer<KeyServiceApi>>()
            .await;
        for service in REFLECTION_SERVICES.into_iter().chain([""]) {
            health
                .set_service_status(service, ServingStatus::NotServing)
                .await;
        }
        // Then end every Watch stream (each delivers NOT_SERVING first): an open stream would
        // otherwise hold the graceful shutdown until its grace period runs out.
        let key_service = <KeyServiceServer<KeyServiceApi> as tonic::server::NamedService>::NAME;
        for service in REFLECTION_SERVICES.into_iter().chain(["", key_service]) {
            health.clear_service_status(service).await;
        }
    };
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;
    builder
        .layer(InstrumentLayer)
        .layer(tower::util::option_layer(access))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(
            KeyServiceServer::new(KeyServiceApi::new(manager))
                .max_decoding_message_size(MAX_REQUEST_BYTES),
        )
        // TCP_NODELAY is set per connection by `Incoming`, which also pauses on accept failures.
        .serve_with_incoming_shutdown(
            Incoming::new(listener, "gRPC", super::IDLE_TIMEOUT),
            shutdown,
        )
        .await?;
    Ok(())
}
