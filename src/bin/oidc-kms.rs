//! `oidc-kms`: the key service. Parses and checks its configuration first (exit 64 when invalid),
//! opens the sealed store (a distinct exit code per store fault), then serves gRPC — and, with
//! `--dev`, the HTTP gateway in the same process — until SIGTERM or SIGINT.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use oidc_kms::clock::SystemClock;
use oidc_kms::duration::parse_duration;
use oidc_kms::gateway::{self, GatewayConfig};
use oidc_kms::grpc::k8s_signer::{self, SignerSocket};
use oidc_kms::issuer::Issuer;
use oidc_kms::key_manager::{KeyManager, Settings};
use oidc_kms::keys::{FileStore, Kek, KeySpec};
use oidc_kms::lifecycle::Policy;
use oidc_kms::shutdown::{self, Shutdown};
use oidc_kms::token::LIFETIME_CEILING;
use tokio::net::TcpListener;

/// Exit code for invalid configuration (sysexits EX_USAGE).
const EXIT_CONFIG: u8 = 64;
/// Exit code when a listener cannot be bound (EX_UNAVAILABLE).
const EXIT_LISTEN: u8 = 69;

const DEV_DATA_DIR: &str = "oidc-kms-data";
const DEV_KEK_FILE: &str = "dev-kek.b64";
const DEV_ISSUER: &str = "http://127.0.0.1:8080/";
/// kube-apiserver refuses an external signer whose maximum token lifetime is shorter.
const K8S_MIN_TOKEN_LIFETIME: Duration = Duration::from_secs(600);

/// The oidc-kms key service: signs tokens with sealed keys, rotates them, publishes the public keys.
#[derive(Debug, Parser)]
#[command(name = "oidc-kms", version, about, long_about = None)]
struct Cli {
    /// gRPC listen address.
    #[arg(long, env = "OIDC_KMS_LISTEN", default_value = "127.0.0.1:50051")]
    listen: SocketAddr,

    /// Directory of the sealed key store (created if missing). Default with --dev: ./oidc-kms-data.
    #[arg(long, env = "OIDC_KMS_DATA_DIR")]
    data_dir: Option<PathBuf>,

    /// File holding the 32-byte key-encryption key as base64. Alternatively set OIDC_KMS_KEK to the
    /// base64 value itself.
    #[arg(long, env = "OIDC_KMS_KEK_FILE")]
    kek_file: Option<PathBuf>,

    /// Issuer URL written into every token, verbatim: https, or http on a loopback host; no query
    /// or fragment. Required unless --dev.
    #[arg(long, env = "OIDC_KMS_ISSUER")]
    issuer: Option<String>,

    /// Longest token lifetime a caller may ask for (at most 24h). A key that stops signing stays
    /// published this long afterwards.
    #[arg(long, env = "OIDC_KMS_MAX_TOKEN_LIFETIME", default_value = "24h", value_parser = parse_duration)]
    max_token_lifetime: Duration,

    /// Algorithm of newly made keys: RS256, ES256 or ES384. A change applies from the next rotation.
    #[arg(long, env = "OIDC_KMS_ALGORITHM", default_value = "RS256")]
    algorithm: String,

    /// RSA key size for RS256: 2048, 3072 or 4096.
    #[arg(long, env = "OIDC_KMS_RSA_BITS", default_value_t = 2048)]
    rsa_bits: u32,

    /// How often keys rotate on their own ("off" to rotate only on request).
    #[arg(long, env = "OIDC_KMS_ROTATION_PERIOD", default_value = "7d")]
    rotation_period: String,

    /// How long a scheduled key is published before it signs, so verifiers have cached it.
    #[arg(long, env = "OIDC_KMS_PREPUBLISH", default_value = "1h", value_parser = parse_duration)]
    prepublish: Duration,

    /// Development mode: data in ./oidc-kms-data, a generated KEK stored beside it, issuer
    /// http://127.0.0.1:8080/, and the HTTP gateway served in this process. Not for production.
    #[arg(long, env = "OIDC_KMS_DEV")]
    dev: bool,

    /// With --dev: where the in-process gateway listens.
    #[arg(
        long,
        env = "OIDC_KMS_DEV_GATEWAY_LISTEN",
        default_value = "127.0.0.1:8080"
    )]
    dev_gateway_listen: SocketAddr,

    /// Also serve the Kubernetes external JWT signer on this Unix socket (mode 0600), for
    /// kube-apiserver's --service-account-signing-endpoint.
    #[arg(long, env = "OIDC_KMS_K8S_SIGNER_SOCKET")]
    k8s_signer_socket: Option<PathBuf>,
}

/// The checked configuration.
struct Config {
    listen: SocketAddr,
    data_dir: PathBuf,
    kek: KekSource,
    settings: Settings,
    dev_gateway: Option<SocketAddr>,
    k8s_signer_socket: Option<PathBuf>,
}

enum KekSource {
    File(PathBuf),
    Env(String),
    /// --dev without a KEK: generated on first start, kept in this file.
    DevGenerated(PathBuf),
}

fn check(cli: Cli) -> Result<Config, String> {
    let issuer_text = match (&cli.issuer, cli.dev) {
        (Some(i), _) => i.clone(),
        (None, true) => DEV_ISSUER.to_owned(),
        (None, false) => {
            return Err(
                "--issuer is required (e.g. --issuer https://issuer.example/), or use --dev".into(),
            );
        }
    };
    let issuer = Issuer::parse(&issuer_text).map_err(|e| format!("--issuer: {e}"))?;
    if cli.max_token_lifetime.is_zero() || cli.max_token_lifetime > LIFETIME_CEILING {
        return Err(format!(
            "--max-token-lifetime: must be above 0 and at most 24h, not {}",
            oidc_kms::duration::format_duration(cli.max_token_lifetime)
        ));
    }
    if cli.k8s_signer_socket.is_some() && cli.max_token_lifetime < K8S_MIN_TOKEN_LIFETIME {
        return Err(
            "--max-token-lifetime must be at least 10m with --k8s-signer-socket: kube-apiserver \
             refuses a signer whose maximum token lifetime is below 600 s"
                .into(),
        );
    }
    let spec = KeySpec::from_algorithm(&cli.algorithm, cli.rsa_bits)
        .map_err(|e| format!("--algorithm/--rsa-bits: {e}"))?;
    let rotation_period = match cli.rotation_period.as_str() {
        "off" | "0" | "never" => None,
        text => Some(parse_duration(text).map_err(|e| format!("--rotation-period: {e}"))?),
    };
    if let Some(period) = rotation_period
        && cli.prepublish >= period
    {
        return Err("--prepublish must be shorter than --rotation-period".into());
    }
    let data_dir = match (&cli.data_dir, cli.dev) {
        (Some(d), _) => d.clone(),
        (None, true) => PathBuf::from(DEV_DATA_DIR),
        (None, false) => return Err("--data-dir is required (or use --dev)".into()),
    };
    let kek = match (&cli.kek_file, std::env::var("OIDC_KMS_KEK")) {
        (Some(f), _) => KekSource::File(f.clone()),
        (None, Ok(value)) => KekSource::Env(value),
        (None, Err(_)) if cli.dev => KekSource::DevGenerated(data_dir.join(DEV_KEK_FILE)),
        (None, Err(_)) => {
            return Err("no key-encryption key: give --kek-file PATH or set OIDC_KMS_KEK (make one with: head -c 32 /dev/urandom | base64)".into());
        }
    };
    Ok(Config {
        listen: cli.listen,
        data_dir,
        kek,
        settings: Settings {
            issuer,
            policy: Policy {
                max_token_lifetime: cli.max_token_lifetime,
                rotation_period,
                prepublish: cli.prepublish,
            },
            new_key_spec: spec,
        },
        dev_gateway: cli.dev.then_some(cli.dev_gateway_listen),
        k8s_signer_socket: cli.k8s_signer_socket,
    })
}

fn read_kek(source: &KekSource) -> Result<Kek, String> {
    match source {
        KekSource::File(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("--kek-file {}: {e}", path.display()))?;
            warn_if_readable_by_others(path);
            Kek::from_base64(&text).map_err(|e| format!("--kek-file {}: {e}", path.display()))
        }
        KekSource::Env(text) => Kek::from_base64(text).map_err(|e| format!("OIDC_KMS_KEK: {e}")),
        KekSource::DevGenerated(path) => dev_kek(path),
    }
}

fn warn_if_readable_by_others(path: &Path) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        if let Ok(meta) = std::fs::metadata(path)
            && meta.permissions().mode() & 0o077 != 0
        {
            tracing::warn!(path = %path.display(), "the KEK file is readable by group or others; chmod 600 it");
        }
    }
}

fn dev_kek(path: &Path) -> Result<Kek, String> {
    if path.exists() {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        return Kek::from_base64(&text).map_err(|e| format!("{}: {e}", path.display()));
    }
    let kek = Kek::generate().map_err(|e| e.to_string())?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options
        .open(path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    std::io::Write::write_all(
        &mut file,
        format!("{}\n", kek.to_base64().as_str()).as_bytes(),
    )
    .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(kek)
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if e.use_stderr() => {
            let _ = e.print();
            return ExitCode::from(EXIT_CONFIG);
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
    let config = match check(cli) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("oidc-kms: invalid configuration: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("oidc-kms: cannot start the runtime: {e}");
            return ExitCode::from(71);
        }
    };
    match runtime.block_on(run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            eprintln!("oidc-kms: {:#}", failure.error);
            ExitCode::from(failure.code)
        }
    }
}

struct Failure {
    code: u8,
    error: anyhow::Error,
}

fn failure(code: u8) -> impl FnOnce(anyhow::Error) -> Failure {
    move |error| Failure { code, error }
}

async fn run(config: Config) -> Result<(), Failure> {
    if matches!(config.kek, KekSource::DevGenerated(_)) {
        tracing::warn!(
            "DEVELOPMENT MODE: the key-encryption key is stored next to the keys it seals ({}); \
             anyone who can read that directory can read the keys. Never use --dev in production.",
            config.data_dir.display()
        );
    }
    let kek = read_kek(&config.kek)
        .map_err(|e| anyhow::anyhow!("invalid configuration: {e}"))
        .map_err(failure(EXIT_CONFIG))?;
    let data_dir = config.data_dir.clone();
    let settings = config.settings.clone();
    let manager = tokio::task::spawn_blocking(move || -> Result<KeyManager, Failure> {
        let store = FileStore::open(&data_dir, &kek).map_err(|e| Failure {
            code: e.exit_code() as u8,
            error: e.into(),
        })?;
        KeyManager::open(Box::new(store), Arc::new(SystemClock), settings).map_err(|e| {
            let code = match &e {
                oidc_kms::Error::Store(s) => s.exit_code() as u8,
                _ => 70,
            };
            Failure {
                code,
                error: e.into(),
            }
        })
    })
    .await
    .map_err(|e| Failure {
        code: 70,
        error: e.into(),
    })??;

    let listener = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {} (--listen)", config.listen))
        .map_err(failure(EXIT_LISTEN))?;
    let gateway_listener = match config.dev_gateway {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen on {addr} (--dev-gateway-listen)"))
                .map_err(failure(EXIT_LISTEN))?,
        ),
        None => None,
    };
    let k8s_socket = match &config.k8s_signer_socket {
        Some(path) => Some(
            SignerSocket::bind(path)
                .await
                .context("cannot serve the Kubernetes signer socket (--k8s-signer-socket)")
                .map_err(failure(EXIT_LISTEN))?,
        ),
        None => None,
    };

    let (trigger, shutdown) = Shutdown::new();
    let (_, active) = manager.list_keys();
    tracing::info!(
        listen = %config.listen,
        issuer = manager.settings().issuer.as_str(),
        active_kid = active.as_deref().unwrap_or("-"),
        "key service ready"
    );
    let scheduler = tokio::spawn(manager.clone().run_scheduler(shutdown.clone().wait()));
    let gateway_task = gateway_listener.map(|l| {
        let issuer = &manager.settings().issuer;
        let grpc_host = if config.listen.ip().is_unspecified() {
            SocketAddr::from(([127, 0, 0, 1], config.listen.port()))
        } else {
            config.listen
        };
        println!("oidc-kms --dev is running. Try:");
        println!("  curl {}", issuer.discovery_url());
        println!("  curl {}", issuer.jwks_url());
        println!(
            "  grpcurl -plaintext -d '{{\"subject\":\"system:serviceaccount:default:app\",\"audiences\":[\"api://AzureADTokenExchange\"]}}' {grpc_host} oidckms.v1.KeyService/SignToken"
        );
        let config = GatewayConfig {
            kms_url: format!("http://{grpc_host}"),
            refresh_interval: Duration::from_secs(5),
            max_stale: Duration::from_secs(3600),
        };
        tokio::spawn(gateway::serve(l, config, shutdown.clone()))
    });
    let mut k8s_task = k8s_socket.map(|socket| {
        tracing::info!(socket = %socket.path().display(), "Kubernetes external JWT signer ready");
        tokio::spawn(k8s_signer::serve(
            manager.clone(),
            socket,
            shutdown.clone().wait(),
        ))
    });
    let grpc = tokio::spawn(oidc_kms::grpc::server::serve(
        manager,
        listener,
        shutdown.clone().wait(),
    ));
    tokio::select! {
        _ = shutdown::signal() => tracing::info!("shutting down"),
        result = grpc => {
            trigger.trigger();
            return match result {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(failure(70)(e.into())),
                Err(e) => Err(failure(70)(e.into())),
            };
        }
        Some(result) = async {
            match k8s_task.as_mut() {
                Some(task) => Some(task.await),
                None => None,
            }
        } => {
            trigger.trigger();
            return match result {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(failure(70)(anyhow::Error::new(e).context("Kubernetes signer socket"))),
                Err(e) => Err(failure(70)(e.into())),
            };
        }
    }
    trigger.trigger();
    let _ = scheduler.await;
    if let Some(task) = gateway_task {
        let _ = task.await;
    }
    if let Some(task) = k8s_task {
        // Removes the socket file once in-flight calls are answered.
        let _ = task.await;
    }
    Ok(())
}
