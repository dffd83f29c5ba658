//! oidc-kms: a sealed key service for OpenID Connect issuers.
//!
//! API servers ask it to sign service-account tokens; relying parties fetch the issuer's discovery
//! document and JWKS from its HTTP gateway. A tour of the modules, core first:
//!
//! - [`keys`]: key material. [`keys::KeySpec`] says what a key is, [`keys::Signer`] is the only
//!   thing a private key can do, [`keys::Kek`] and [`keys::seal`] seal keys at rest, and
//!   [`keys::KeyStore`] is the backend interface ([`keys::FileStore`] today).
//! - [`lifecycle`]: pure rotation rules over a [`lifecycle::Keyring`]; every method takes `now`.
//! - [`token`], [`jwk`], [`issuer`]: claims and the JWS layout, JWK encoding, the issuer URL.
//! - [`key_manager`]: ties store, lifecycle and clock together; what the adapters call.
//! - [`signing_pool`]: the bounded pool of signing threads, with load shedding and deadlines.
//! - [`grpc`]: the tonic `KeyService` adapter, health and reflection, error-to-status mapping,
//!   mutual TLS and the access policy.
//! - [`gateway`]: the HTTP adapter serving discovery and JWKS from `GetJwks`.
//! - [`metrics`], [`logging`]: Prometheus metrics and the `/metrics` endpoint; the log subscriber
//!   (text or JSON) and request ids.
//! - [`config`], [`cli`]: the binaries' layered configuration (flag > env > TOML file > default) and
//!   the admin CLI, a gRPC client of a running key service.
//! - [`net`]: accepting connections without spinning when descriptors run out; the hyper serve
//!   loop with request timeouts that the gateway and `/metrics` share.
//! - [`clock`], [`duration`], [`error`], [`strict_json`], [`shutdown`]: injected time, human
//!   durations, the error type, JSON that names each member once, one shutdown signal for every
//!   task.
#![forbid(unsafe_code)]

pub mod cli;
pub mod clock;
pub mod config;
pub mod duration;
pub mod error;
pub mod gateway;
pub mod grpc;
pub mod issuer;
pub mod jwk;
pub mod key_manager;
pub mod keys;
pub mod lifecycle;
pub mod logging;
pub mod metrics;
pub mod net;
pub mod shutdown;
pub mod signing_pool;
pub mod strict_json;
pub mod token;

pub use error::Error;
