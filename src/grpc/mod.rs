//! The gRPC adapter: the generated `oidckms.v1` code, the `KeyService` implementation over the
//! [`KeyManager`](crate::key_manager::KeyManager), the one place errors become statuses, and the
//! server that registers health and reflection next to it.

pub mod key_service;
pub mod server;
pub mod status;

/// Generated protobuf and gRPC code for `oidckms.v1`.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod pb {
    tonic::include_proto!("oidckms.v1");

    /// The encoded file descriptor set, for server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/oidckms_descriptor.bin"));
}
