//! `oidc-gateway`: serves the issuer's discovery document and JWKS over HTTP from the key service's
//! `GetJwks`. It holds no keys.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use oidc_kms::duration::parse_duration;
use oidc_kms::gateway::{self, GatewayConfig};
use oidc_kms::shutdown::{self, Shutdown};
use tokio::net::TcpListener;

/// The oidc-kms HTTP gateway: public OpenID Connect discovery and JWKS for relying parties.
#[derive(Debug, Parser)]
#[command(name = "oidc-gateway", version, about, long_about = None)]
struct Cli {
    /// The key service's gRPC URL.
    #[arg(
        long,
        env = "OIDC_GATEWAY_KMS",
        default_value = "http://127.0.0.1:50051"
    )]
    kms: String,

    /// HTTP listen address.
    #[arg(long, env = "OIDC_GATEWAY_LISTEN", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,

    /// Longest time between two refreshes of the key set (the key service may ask for shorter).
    #[arg(long, env = "OIDC_GATEWAY_REFRESH_INTERVAL", default_value = "30s", value_parser = parse_duration)]
    refresh_interval: Duration,

    /// How long the last good key set is served while the key service is unreachable; 503 after.
    #[arg(long, env = "OIDC_GATEWAY_MAX_STALE", default_value = "1h", value_parser = parse_duration)]
    max_stale: Duration,
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if e.use_stderr() => {
            let _ = e.print();
            return ExitCode::from(64);
        }
        Err(e) => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    if cli.refresh_interval.is_zero() {
        eprintln!("oidc-gateway: invalid configuration: --refresh-interval must be above 0");
        return ExitCode::from(64);
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("oidc-gateway: cannot start the runtime: {e}");
            return ExitCode::from(71);
        }
    };
    runtime.block_on(async {
        let listener = match TcpListener::bind(cli.listen).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!(
                    "oidc-gateway: cannot listen on {} (--listen): {e}",
                    cli.listen
                );
                return ExitCode::from(69);
            }
        };
        let (trigger, shutdown) = Shutdown::new();
        let config = GatewayConfig {
            kms_url: cli.kms,
            refresh_interval: cli.refresh_interval,
            max_stale: cli.max_stale,
        };
        tracing::info!(listen = %cli.listen, kms = %config.kms_url, "gateway starting");
        let server = tokio::spawn(gateway::serve(listener, config, shutdown));
        shutdown::signal().await;
        tracing::info!("shutting down");
        trigger.trigger();
        match server.await {
            Ok(Ok(())) => ExitCode::SUCCESS,
            Ok(Err(e)) => {
                eprintln!("oidc-gateway: invalid configuration: {e}");
                ExitCode::from(64)
            }
            Err(_) => ExitCode::from(70),
        }
    })
}
