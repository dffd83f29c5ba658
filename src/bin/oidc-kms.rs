//! `oidc-kms`: the key service. Parses and checks its configuration first (flags > env > the
//! `--config` TOML file > defaults; exit 64 when invalid), opens the sealed store (a distinct exit
//! code per store fault), then serves gRPC — and, with `--metrics-listen`, Prometheus metrics; with
//! `--dev`, the HTTP gateway in the same process — until SIGTERM or SIGINT.
//!
//! With a subcommand (`keys list`, `keys rotate`, `token sign`, `kek generate`) it is instead the
//! admin CLI, a gRPC client of a running key service ([`oidc_kms::cli`]).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use oidc_kms::clock::SystemClock;
use oidc_kms::config::{self, Source};
use oidc_kms::duration::parse_duration;
use oidc_kms::gateway::{self, GatewayConfig};
use oidc_kms::grpc::k8s_signer::{self, SignerSocket};
use oidc_kms::issuer::Issuer;
use oidc_kms::key_manager::{KeyManager, Settings};
use oidc_kms::keys::{FileStore, Kek, KeySpec, SpecError};
use oidc_kms::lifecycle::Policy;
use oidc_kms::logging::LogFormat;
use oidc_kms::shutdown::{self, Shutdown};
use oidc_kms::token::LIFETIME_CEILING;
use tokio::net::TcpListener;
use zeroize::Zeroizing;

/// Exit code for invalid configuration (sysexits EX_USAGE).
const EXIT_CONFIG: u8 = 64;
/// Exit code when a listener cannot be bound (EX_UNAVAILABLE).
const EXIT_LISTEN: u8 = 69;

const DEV_DATA_DIR: &str = "oidc-kms-data";
const DEV_KEK_FILE: &str = "dev-kek.b64";
/// How long open calls get to finish once shutdown begins.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// kube-apiserver refuses an external signer whose maximum token lifetime is shorter.
const K8S_MIN_TOKEN_LIFETIME: Duration = Duration::from_secs(600);

/// How --help explains the config file.
const CONFIG_HELP: &str = "\
Every option can also be set by its environment variable or, under its long name, in the TOML \
file given by --config, e.g.:

    issuer = \"https://issuer.example.com/\"
    data-dir = \"/var/lib/oidc-kms\"
    kek-file = \"/etc/oidc-kms/kek.b64\"
    max-token-lifetime = \"24h\"
    metrics-listen = \"127.0.0.1:9090\"

Precedence: flag > environment > config file > default. OIDC_KMS_KEK (the KEK's base64 value) is \
read only from the environment. Invalid configuration exits with code 64, naming the setting.";

/// The oidc-kms key service: signs tokens with sealed keys, rotates them, publishes the public keys.
#[derive(Debug, Parser)]
#[command(
    name = "oidc-kms",
    version,
    about,
    long_about = None,
    args_conflicts_with_subcommands = true,
    after_help = CONFIG_HELP
)]
struct Cli {
    /// Admin commands (a gRPC client of a running service); without one, serve.
    #[command(subcommand)]
    command: Option<oidc_kms::cli::Command>,

    /// TOML file of settings, keyed by the long option names.
    #[arg(long, env = "OIDC_KMS_CONFIG")]
    config: Option<PathBuf>,

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

    /// How long a scheduled key is published before it signs, so verifiers have cached it (at
    /// least 2s; relying parties are told to cache the JWKS for half of it, at most 300s).
    #[arg(long, env = "OIDC_KMS_PREPUBLISH", default_value = "1h", value_parser = parse_duration)]
    prepublish: Duration,

    /// Development mode: data in ./oidc-kms-data, a generated KEK stored beside it, the HTTP
    /// gateway served in this process, and that gateway's address as the issuer
    /// (http://127.0.0.1:8080/ by default). Not for production.
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

    /// Serve Prometheus metrics at http://ADDR/metrics (plain HTTP). [default: off]
    #[arg(long, env = "OIDC_KMS_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,

    /// Log lines as human-readable text or as JSON objects, on stderr. RUST_LOG sets the level
    /// (default info).
    #[arg(long, env = "OIDC_KMS_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,

    /// Serve gRPC over TLS with this PEM certificate chain (leaf first). Needs --tls-key and
    /// --tls-client-ca.
    #[arg(long, env = "OIDC_KMS_TLS_CERT")]
    tls_cert: Option<PathBuf>,

    /// The PEM private key of --tls-cert (unencrypted).
    #[arg(long, env = "OIDC_KMS_TLS_KEY")]
    tls_key: Option<PathBuf>,

    /// PEM CA bundle: every caller must present a client certificate issued by one of these CAs.
    #[arg(long, env = "OIDC_KMS_TLS_CLIENT_CA")]
    tls_client_ca: Option<PathBuf>,

    /// JSON access policy: which client identities (certificate DNS or URI SANs) may call which
    /// RPCs. Without it, every verified client may call SignToken and GetJwks only.
    #[arg(long, env = "OIDC_KMS_ACCESS_POLICY")]
    access_policy: Option<PathBuf>,

    /// Allow plaintext gRPC on a --listen address that is not loopback. Anyone who can reach it
    /// can then sign tokens and rotate keys.
    #[arg(long, env = "OIDC_KMS_INSECURE_PLAINTEXT")]
    insecure_plaintext: bool,
}

/// The checked configuration.
struct Config {
    listen: SocketAddr,
    data_dir: PathBuf,
    kek: KekSource,
    settings: Settings,
    dev_gateway: Option<SocketAddr>,
    k8s_signer_socket: Option<PathBuf>,
    metrics_listen: Option<SocketAddr>,
    /// Plaintext (loopback) or mutual TLS with the access policy.
    transport: oidc_kms::grpc::tls::Transport,
}

enum KekSource {
    File(PathBuf),
    /// The KEK's text from OIDC_KMS_KEK (the environment itself keeps its own copy).
    Env(Zeroizing<String>),
    /// --dev without a KEK: generated on first start, kept in this file.
    DevGenerated(PathBuf),
}

/// The issuer of `--dev` without `--issuer`: the in-process gateway's own address, so the URLs in
/// tokens and discovery are the ones that answer.
fn dev_issuer(gateway: SocketAddr) -> String {
    format!("http://{}/", reachable(gateway))
}

/// `addr`, with an unspecified IP (`0.0.0.0`, `::`) replaced by loopback: where a local client
/// reaches a listener bound to it.
fn reachable(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => (Ipv4Addr::LOCALHOST, addr.port()).into(),
        IpAddr::V6(ip) if ip.is_unspecified() => (Ipv6Addr::LOCALHOST, addr.port()).into(),
        _ => addr,
    }
}

fn check(cli: Cli) -> Result<Config, String> {
    let issuer_text = match (&cli.issuer, cli.dev) {
        (Some(i), _) => i.clone(),
        (None, true) => dev_issuer(cli.dev_gateway_listen),
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
    let spec = KeySpec::from_algorithm(&cli.algorithm, cli.rsa_bits).map_err(|e| match e {
        SpecError::Algorithm(_) => format!("--algorithm: {e}"),
        SpecError::RsaBits(_) => format!("--rsa-bits: {e}"),
    })?;
    let rotation_period = match cli.rotation_period.as_str() {
        "off" | "0" | "never" => None,
        text => Some(parse_duration(text).map_err(|e| format!("--rotation-period: {e}"))?),
    };
    if cli.max_token_lifetime.subsec_nanos() != 0 {
        return Err(
            "--max-token-lifetime: must be whole seconds (tokens carry times in seconds)".into(),
        );
    }
    if cli.prepublish < Duration::from_secs(2) || cli.prepublish.subsec_nanos() != 0 {
        return Err(format!(
            "--prepublish: must be whole seconds and at least 2s, not {}: a scheduled key is \
             published before it signs, so that verifiers caching the JWKS hold it in time \
             (RotateKeys with prepublish_seconds 0 rotates at once)",
            oidc_kms::duration::format_duration(cli.prepublish)
        ));
    }
    if let Some(period) = rotation_period {
        if period.subsec_nanos() != 0 {
            return Err("--rotation-period: must be whole seconds".into());
        }
        if cli.prepublish >= period {
            return Err("--prepublish must be shorter than --rotation-period".into());
        }
    }
    let data_dir = match (&cli.data_dir, cli.dev) {
        (Some(d), _) => d.clone(),
        (None, true) => PathBuf::from(DEV_DATA_DIR),
        (None, false) => return Err("--data-dir is required (or use --dev)".into()),
    };
    let kek = match (&cli.kek_file, std::env::var("OIDC_KMS_KEK")) {
        (Some(f), _) => KekSource::File(f.clone()),
        (None, Ok(value)) => KekSource::Env(Zeroizing::new(value)),
        (None, Err(_)) if cli.dev => KekSource::DevGenerated(data_dir.join(DEV_KEK_FILE)),
        (None, Err(_)) => {
            return Err("no key-encryption key: give --kek-file PATH or set OIDC_KMS_KEK (make one with: oidc-kms kek generate --out FILE)".into());
        }
    };
    let transport = transport(&cli)?;
    Ok(Config {
        transport,
        metrics_listen: cli.metrics_listen,
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

/// How the gRPC listener is secured: mutual TLS from --tls-cert, --tls-key and --tls-client-ca
/// (all three) with --access-policy; else plaintext, which only a loopback --listen address gets
/// unless --insecure-plaintext says otherwise.
fn transport(cli: &Cli) -> Result<oidc_kms::grpc::tls::Transport, String> {
    use oidc_kms::grpc::access::AccessPolicy;
    use oidc_kms::grpc::tls::{TlsFiles, Transport, load_mutual_tls};
    match (&cli.tls_cert, &cli.tls_key, &cli.tls_client_ca) {
        (None, None, None) => {
            if cli.access_policy.is_some() {
                return Err(
                    "--access-policy needs --tls-cert, --tls-key and --tls-client-ca: \
                            the policy names client certificates"
                        .into(),
                );
            }
            if cli.listen.ip().to_canonical().is_loopback() {
                return Ok(Transport::Plaintext);
            }
            if !cli.insecure_plaintext {
                return Err(format!(
                    "--listen {}: plaintext gRPC is served only on a loopback address, since \
                     anyone who reaches it could sign tokens and rotate keys; secure it with \
                     --tls-cert, --tls-key and --tls-client-ca, or accept the risk with \
                     --insecure-plaintext",
                    cli.listen
                ));
            }
            tracing::warn!(
                "INSECURE: plaintext gRPC on {} (--insecure-plaintext): anyone who can reach this \
                 address can sign tokens for any subject and rotate the keys. Use TLS with client \
                 certificates (--tls-cert, --tls-key, --tls-client-ca) instead.",
                cli.listen
            );
            Ok(Transport::Plaintext)
        }
        (Some(cert), Some(key), Some(client_ca)) => {
            if cli.insecure_plaintext {
                return Err("--insecure-plaintext contradicts --tls-cert; remove one".into());
            }
            if cli.dev {
                return Err(
                    "--tls-cert: --dev serves its in-process gateway over plaintext \
                            gRPC; use TLS without --dev (and run oidc-gateway on its own)"
                        .into(),
                );
            }
            let files = TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
                client_ca: client_ca.clone(),
            };
            let config = load_mutual_tls(&files).map_err(|e| e.to_string())?;
            let policy = match &cli.access_policy {
                Some(path) => {
                    AccessPolicy::load(path).map_err(|e| format!("--access-policy {e}"))?
                }
                None => {
                    tracing::info!(
                        "no --access-policy: every client with a verified certificate may call \
                         SignToken and GetJwks; nobody may call RotateKeys or ListKeys"
                    );
                    AccessPolicy::verified_clients_sign()
                }
            };
            Ok(Transport::MutualTls {
                config,
                policy: Arc::new(policy),
            })
        }
        (cert, key, client_ca) => {
            let missing: Vec<&str> = [
                ("--tls-cert", cert.is_none()),
                ("--tls-key", key.is_none()),
                ("--tls-client-ca", client_ca.is_none()),
            ]
            .into_iter()
            .filter_map(|(flag, absent)| absent.then_some(flag))
            .collect();
            Err(format!(
                "{} missing: TLS needs --tls-cert, --tls-key and --tls-client-ca together \
                 (callers are authorized by their client certificates)",
                missing.join(" and ")
            ))
        }
    }
}

fn read_kek(source: &KekSource) -> Result<Kek, String> {
    match source {
        KekSource::File(path) => {
            let text = std::fs::read_to_string(path)
                .map(Zeroizing::new)
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
        let text = std::fs::read_to_string(path)
            .map(Zeroizing::new)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        return Kek::from_base64(&text).map_err(|e| format!("{}: {e}", path.display()));
    }
    // A store without its dev KEK was sealed with another KEK: say so, and write nothing.
    if let Some(dir) = path.parent()
        && dir.join(oidc_kms::keys::KEYRING_FILE).exists()
    {
        return Err(format!(
            "{} holds a key store but not its development KEK ({}); give the KEK that sealed it \
             with --kek-file or OIDC_KMS_KEK, or move the directory away to start afresh",
            dir.display(),
            path.display()
        ));
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
    std::io::Write::write_all(&mut file, kek.to_base64().as_bytes())
        .and_then(|()| std::io::Write::write_all(&mut file, b"\n"))
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(kek)
}

fn main() -> ExitCode {
    let (mut cli, provenance) = match config::parse::<Cli>(std::env::args_os().collect(), "config")
    {
        Ok(layered) => (layered.value, layered.provenance),
        Err(e) => return e.report("oidc-kms"),
    };
    if let Some(command) = cli.command.take() {
        return oidc_kms::cli::run(
            command,
            &mut std::io::stdout().lock(),
            &mut std::io::stderr().lock(),
        );
    }
    // The environment outranks the file: OIDC_KMS_KEK beats a kek-file named in --config.
    if matches!(provenance.source("kek-file"), Source::File(_))
        && std::env::var_os("OIDC_KMS_KEK").is_some()
    {
        cli.kek_file = None;
    }
    oidc_kms::logging::init(cli.log_format);
    if let Err(e) = oidc_kms::metrics::install() {
        tracing::warn!(error = %e, "metrics are disabled");
    }
    let config = match check(cli) {
        Ok(c) => c,
        Err(e) => {
            eprintln!(
                "oidc-kms: invalid configuration: {}",
                provenance.explain(&e)
            );
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
            eprintln!("oidc-kms: {}", one_line(&failure.error));
            ExitCode::from(failure.code)
        }
    }
}

/// An error and its causes on one line, each cause once: library errors already show their
/// source in their own message, and repeating it would double the line.
fn one_line(error: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in error.chain() {
        let text = cause.to_string();
        if !line.contains(&text) {
            if !line.is_empty() {
                line.push_str(": ");
            }
            line.push_str(&text);
        }
    }
    line
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
    // The store's lock first (a second process on the same data directory is told so), then every
    // listening socket, and only then the keys: a busy port never leaves a fresh key store behind.
    let data_dir = config.data_dir.clone();
    let store = tokio::task::spawn_blocking(move || FileStore::open(&data_dir, &kek))
        .await
        .map_err(|e| failure(70)(e.into()))?
        .map_err(|e| Failure {
            code: e.exit_code() as u8,
            error: e.into(),
        })?;

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
    let metrics_listener = match config.metrics_listen {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen on {addr} (--metrics-listen)"))
                .map_err(failure(EXIT_LISTEN))?,
        ),
        None => None,
    };

    let settings = config.settings.clone();
    let manager = tokio::task::spawn_blocking(move || {
        KeyManager::open(Box::new(store), Arc::new(SystemClock), settings)
    })
    .await
    .map_err(|e| failure(70)(e.into()))?
    .map_err(|e| Failure {
        code: match &e {
            oidc_kms::Error::Store(s) => s.exit_code() as u8,
            _ => 70,
        },
        error: e.into(),
    })?;

    let (trigger, shutdown) = Shutdown::new();
    let (_, active) = manager.list_keys();
    tracing::info!(
        listen = %config.listen,
        issuer = manager.settings().issuer.as_str(),
        active_kid = active.as_deref().unwrap_or("-"),
        "key service ready"
    );
    let scheduler = tokio::spawn(manager.clone().run_scheduler(shutdown.clone().wait()));
    oidc_kms::metrics::register_kms();
    let metrics_task = metrics_listener.map(|l| {
        if let Ok(addr) = l.local_addr() {
            tracing::info!(listen = %addr, "metrics at http://{addr}/metrics");
        }
        let scrape = oidc_kms::metrics::kms_scrape(manager.clone());
        tokio::spawn(oidc_kms::metrics::serve(l, scrape, shutdown.clone()))
    });
    let gateway_task = gateway_listener.map(|l| {
        let issuer = &manager.settings().issuer;
        let grpc_host = reachable(config.listen);
        // The local gateway, whatever public URL --issuer names.
        let http_host = match l.local_addr() {
            Ok(addr) => reachable(addr),
            Err(_) => reachable(config.dev_gateway.unwrap_or(config.listen)),
        };
        println!("oidc-kms --dev is running. Try:");
        println!("  curl http://{http_host}{}", issuer.discovery_path());
        println!("  curl http://{http_host}{}", issuer.jwks_path());
        println!(
            "  grpcurl -plaintext -d '{{\"subject\":\"system:serviceaccount:default:app\",\"audiences\":[\"api://AzureADTokenExchange\"]}}' {grpc_host} oidckms.v1.KeyService/SignToken"
        );
        let config = GatewayConfig {
            kms: tonic::transport::Endpoint::from_shared(format!("http://{grpc_host}"))
                .expect("a socket address makes a URL"),
            refresh_interval: Duration::from_secs(5),
            max_stale: Duration::from_secs(3600),
        };
        oidc_kms::metrics::register_gateway();
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
    let mut grpc = tokio::spawn(oidc_kms::grpc::server::serve(
        manager,
        listener,
        config.transport.clone(),
        shutdown.clone().wait(),
    ));
    tokio::select! {
        _ = shutdown::signal() => tracing::info!("shutting down"),
        result = &mut grpc => {
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
    let drained = async {
        let _ = scheduler.await;
        let _ = grpc.await;
        if let Some(task) = gateway_task {
            let _ = task.await;
        }
        if let Some(task) = k8s_task {
            // Removes the socket file once in-flight calls are answered.
            let _ = task.await;
        }
        if let Some(task) = metrics_task {
            let _ = task.await;
        }
    };
    // A connection that never finishes (a client that opened one and sent nothing) must not hold
    // the process: after the grace period it exits anyway.
    if tokio::time::timeout(SHUTDOWN_GRACE, drained).await.is_err() {
        tracing::warn!(
            "connections still open {} s after shutdown began; exiting",
            SHUTDOWN_GRACE.as_secs()
        );
    }
    Ok(())
}
