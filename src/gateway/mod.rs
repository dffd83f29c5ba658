//! The HTTP gateway: serves the issuer's OpenID Connect discovery document and JWKS to relying
//! parties. It holds no keys: it polls the key service's `GetJwks` ([`refresh`]), renders the two
//! documents once per key set ([`documents`]), and answers requests from that snapshot ([`http`]).

pub mod documents;
pub mod http;
pub mod refresh;

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tonic::transport::Endpoint;

use crate::shutdown::Shutdown;

pub use documents::Documents;

/// The gateway's names for its key-service client settings, for error messages.
pub const KMS_TLS_SETTINGS: crate::grpc::client::SettingNames = crate::grpc::client::SettingNames {
    ca_cert: "--kms-ca-cert",
    client_cert: "--kms-client-cert",
    client_key: "--kms-client-key",
};
pub use refresh::GatewayState;

/// How the gateway keeps its key set current.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// The key service: its URL, with TLS for `https://` (made by [`crate::grpc::client`]).
    pub kms: Endpoint,
    /// The longest time between two refreshes (the key service may ask for shorter).
    pub refresh_interval: Duration,
    /// How long the last good key set is served while the key service cannot be reached.
    pub max_stale: Duration,
}

/// Serves the gateway on `listener` until `shutdown`: starts the refresher, then answers requests.
pub async fn serve(listener: TcpListener, config: GatewayConfig, shutdown: Shutdown) {
    let state = Arc::new(GatewayState::new(config.max_stale));
    let refresher = refresh::Refresher::new(&config, Arc::clone(&state));
    let refresh_task = tokio::spawn(refresher.run(shutdown.clone()));
    http::serve(listener, state, shutdown).await;
    refresh_task.abort();
}
