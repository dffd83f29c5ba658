//! `oidc-gateway`: serves the issuer's discovery document and JWKS over HTTP from the key service's
//! `GetJwks`, with `/healthz`, `/readyz` and Prometheus `/metrics`. It holds no keys. Settings come
//! from flags > env > the `--config` TOML file > defaults; invalid ones exit 64.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use oidc_kms::config;
use oidc_kms::duration::{format_duration, parse_duration};
use oidc_kms::gateway::documents::MAX_CACHE_AGE;
use oidc_kms::gateway::{self, GatewayConfig};
use oidc_kms::grpc::client::{self, TlsFiles};
use oidc_kms::logging::LogFormat;
use oidc_kms::shutdown::{self, Shutdown};
use tokio::net::TcpListener;

/// How --help explains the config file.
const CONFIG_HELP: &str = "\
Every option can also be set by its environment variable or, under its long name, in the TOML \
file given by --config, e.g.:

    kms = \"http://127.0.0.1:50051\"
    listen = \"0.0.0.0:8080\"
    max-stale = \"1h\"

Precedence: flag > environment > config file > default. Invalid configuration exits with code 64, \
naming the setting.";

/// The oidc-kms HTTP gateway: public OpenID Connect discovery and JWKS for relying parties.
#[derive(Debug, clap::Parser)]
#[command(
    name = "oidc-gateway",
    version,
    about = "The oidc-kms HTTP gateway: public OpenID Connect discovery and JWKS for relying parties, \
             from a key service's GetJwks. It holds no keys.",
    long_about = None,
    after_help = CONFIG_HELP
)]
struct Cli {
    /// TOML file of settings, keyed by the long option names.
    #[arg(long, env = "OIDC_GATEWAY_CONFIG")]
    config: Option<std::path::PathBuf>,

    /// The key service's gRPC URL: http:// for a key service on loopback, https:// for one
    /// serving TLS (give --kms-ca-cert, and under mutual TLS --kms-client-cert and
    /// --kms-client-key).
    #[arg(
        long,
        env = "OIDC_GATEWAY_KMS",
        default_value = "http://127.0.0.1:50051"
    )]
    kms: String,

    /// With an https:// --kms: the CA bundle (PEM) that signed the key service's certificate.
    #[arg(long, env = "OIDC_GATEWAY_KMS_CA_CERT")]
    kms_ca_cert: Option<PathBuf>,

    /// With an https:// --kms under mutual TLS: the gateway's client certificate chain (PEM).
    /// The access policy must grant its identity GetJwks (the `reader` role).
    #[arg(long, env = "OIDC_GATEWAY_KMS_CLIENT_CERT")]
    kms_client_cert: Option<PathBuf>,

    /// With an https:// --kms under mutual TLS: the gateway's client private key (PEM).
    #[arg(long, env = "OIDC_GATEWAY_KMS_CLIENT_KEY")]
    kms_client_key: Option<PathBuf>,

    /// HTTP listen address.
    #[arg(long, env = "OIDC_GATEWAY_LISTEN", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,

    /// Longest time between two refreshes of the key set (the key service may ask for shorter).
    #[arg(long, env = "OIDC_GATEWAY_REFRESH_INTERVAL", default_value = "5s", value_parser = parse_duration)]
    refresh_interval: Duration,

    /// How long the last good key set is served while the key service is unreachable; 503 after.
    #[arg(long, env = "OIDC_GATEWAY_MAX_STALE", default_value = "1h", value_parser = parse_duration)]
    max_stale: Duration,

    /// Log lines as human-readable text or as JSON objects, on stderr. RUST_LOG sets the level
    /// (default info; each request is logged at debug).
    #[arg(long, env = "OIDC_GATEWAY_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

/// The refresh interval and the staleness bound must leave the gateway serving while the key
/// service is up: a refresh at least every second at most, and room for several refreshes (the
/// effective interval is at most the key service's cache hint, 300 s) before the set counts as stale.
fn check_timing(refresh_interval: Duration, max_stale: Duration) -> Result<(), String> {
    if refresh_interval < Duration::from_secs(1) {
        return Err(format!(
            "--refresh-interval: must be at least 1s, not {}",
            format_duration(refresh_interval)
        ));
    }
    let effective = refresh_interval.min(MAX_CACHE_AGE);
    if max_stale < 2 * effective {
        return Err(format!(
            "--max-stale: must be at least {}, twice the refresh interval ({}), not {}: the set \
             would go stale between refreshes while the key service is up",
            format_duration(2 * effective),
            format_duration(effective),
            format_duration(max_stale)
        ));
    }
    Ok(())
}

fn main() -> ExitCode {
    let (cli, provenance) = match config::parse::<Cli>(std::env::args_os().collect(), "config") {
        Ok(layered) => (layered.value, layered.provenance),
        Err(e) => return e.report("oidc-gateway"),
    };
    oidc_kms::logging::init(cli.log_format);
    if let Err(e) = oidc_kms::metrics::install() {
        tracing::warn!(error = %e, "metrics are disabled");
    }
    oidc_kms::metrics::register_gateway();
    if let Err(e) = check_timing(cli.refresh_interval, cli.max_stale) {
        eprintln!(
            "oidc-gateway: invalid configuration: {}",
            provenance.explain(&e)
        );
        return ExitCode::from(64);
    }
    let tls = TlsFiles {
        ca_cert: cli.kms_ca_cert.clone(),
        client_cert: cli.kms_client_cert.clone(),
        client_key: cli.kms_client_key.clone(),
    };
    let kms = match client::endpoint(&cli.kms, &tls, gateway::KMS_TLS_SETTINGS) {
        Ok(endpoint) => endpoint,
        Err(e) => {
            eprintln!(
                "oidc-gateway: invalid configuration: {}",
                provenance.explain(&e.to_string())
            );
            return ExitCode::from(64);
        }
    };
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
            kms,
            refresh_interval: cli.refresh_interval,
            max_stale: cli.max_stale,
        };
        tracing::info!(listen = %cli.listen, kms = %cli.kms, "gateway starting");
        let server = tokio::spawn(gateway::serve(listener, config, shutdown));
        shutdown::signal().await;
        tracing::info!("shutting down");
        trigger.trigger();
        match server.await {
            Ok(()) => ExitCode::SUCCESS,
            Err(_) => ExitCode::from(70),
        }
    })
}
