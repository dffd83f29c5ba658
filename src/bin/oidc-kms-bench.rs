//! `oidc-kms-bench`: how close the service comes to the machine's limits, measured the same way
//! every time. One run, on loopback only, measures for RS256-2048 and ES256:
//!
//! - **raw**: signatures per second of the crypto backend alone, one thread per core, over a
//!   payload the size of a real token's signing input (no gRPC);
//! - **SignToken** over gRPC with 1, 8 and 64 concurrent clients: tokens/s, p50, p99;
//! - **empty RPC** (`grpc.health.v1.Health/Check`) on the same server and client: the transport
//!   ceiling;
//! - **gateway**: JWKS `GET`s per second and p99 over 64 keep-alive connections, and the same
//!   client against nginx serving the same bytes as a static file (when `nginx` is installed);
//! - **peak resident memory** (`VmHWM`) of the key service and the gateway under that load.
//!
//! The key service and the gateway are the release binaries found next to this one
//! (`target/release/oidc-kms`, `oidc-gateway`), started as their own processes on free loopback
//! ports with a throwaway KEK and data directory, so their memory is their own. The load
//! generators run in this process. The last line printed is one JSON object with the ratios the
//! targets in BENCHMARKS.md are stated in. Every load loop stops at a deadline and a count.
//!
//! Figures that are compared are measured in turn, slice by slice (`--rounds`): raw, SignToken
//! at 1, 8 and 64 clients and the empty RPC at 1, 8 and 64 clients, then again; the gateway and
//! nginx likewise. On a shared or virtual machine the speed of a core drifts by tens of percent
//! within a minute; interleaving makes that drift reach both sides of a ratio alike, so the
//! ratios hold from run to run where the absolute figures do not.
//!
//! ```sh
//! cargo build --release && target/release/oidc-kms-bench --quick
//! ```

use std::io::Write as _;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use base64::Engine as _;
use bytes::Bytes;
use clap::Parser;
use oidc_kms::grpc::pb::{
    SignTokenRequest, SignTokenResponse, key_service_client::KeyServiceClient,
};
use oidc_kms::keys::crypto::BACKEND;
use oidc_kms::keys::{KeySpec, Signer as _, SoftwareKey};
use ring::rand::SecureRandom as _;
use serde_json::json;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse, health_client::HealthClient};

/// Benchmarks oidc-kms against the limits of this machine; prints a JSON line last.
#[derive(Debug, Parser)]
#[command(
    name = "oidc-kms-bench",
    version,
    about = "Measures oidc-kms against the machine's limits: raw signatures, SignToken over gRPC, \
             an empty RPC, the gateway against nginx, and peak memory; ends with one JSON line",
    long_about = None
)]
struct Args {
    /// Short runs (the whole benchmark in well under a minute).
    #[arg(long)]
    quick: bool,

    /// Seconds per measurement (default 1.5 with --quick, 5 otherwise), split into `--rounds`
    /// slices.
    #[arg(long)]
    seconds: Option<f64>,

    /// Slices each measurement is split into (default 5 with --quick, 10 otherwise). Figures
    /// that are compared with each other are measured slice by slice in turn, so that a change
    /// in the machine's speed during the run (other tenants, frequency) reaches them alike.
    #[arg(long)]
    rounds: Option<usize>,

    /// The `oidc-kms` binary (default: next to this one).
    #[arg(long)]
    kms_bin: Option<PathBuf>,

    /// The `oidc-gateway` binary (default: next to this one).
    #[arg(long)]
    gateway_bin: Option<PathBuf>,

    /// The `nginx` binary for the static-file baseline (default: found on PATH or in /usr/sbin).
    #[arg(long)]
    nginx_bin: Option<PathBuf>,

    /// Skip the nginx baseline.
    #[arg(long)]
    no_nginx: bool,

    /// gRPC connections the clients share (default: one per client, at most 64).
    #[arg(long)]
    connections: Option<usize>,

    /// Worker threads of this process's load generator (default: one per core).
    #[arg(long)]
    client_threads: Option<usize>,

    /// Extra environment for the key service and the gateway, `NAME=VALUE` (repeatable), for
    /// experiments such as `TOKIO_WORKER_THREADS=1`.
    #[arg(long, value_parser = parse_env)]
    service_env: Vec<(String, String)>,

    /// Measure only these parts (repeatable; default: all). Ratios of parts not measured are null.
    #[arg(long, value_enum)]
    only: Vec<Part>,
}

fn parse_env(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("{s:?} is not NAME=VALUE"))
}

/// The parts of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Part {
    /// Raw RS256 signatures and SignToken with an RSA-2048 key.
    Rs256,
    /// Raw ES256 signatures, SignToken with a P-256 key, and the empty RPC.
    Es256,
    /// The gateway and the nginx baseline.
    Gateway,
}

/// What to measure on a key service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Measure {
    Nothing,
    Sign,
    SignAndEmpty,
}

/// gRPC client counts.
const CLIENTS: [usize; 3] = [1, 8, 64];
/// HTTP keep-alive connections for the gateway and nginx.
const HTTP_CONNECTIONS: usize = 64;
/// An upper bound on requests per client per measurement, whatever the clock says.
const MAX_PER_CLIENT: usize = 2_000_000;
const AUDIENCE: &str = "api://AzureADTokenExchange";

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.client_threads.unwrap_or(cores).max(1))
        .enable_all()
        .build()?;
    let result = runtime.block_on(run(&args));
    runtime.shutdown_timeout(Duration::from_secs(2));
    result
}

/// What one load run measured.
#[derive(Debug, Default)]
struct Load {
    ok: usize,
    errors: usize,
    elapsed: Duration,
    /// Latencies of the successful requests, microseconds, sorted.
    latencies: Vec<u32>,
    first_error: Option<String>,
    /// CPU time the server process (with its direct children) and this process spent.
    cpu: Option<(Duration, Duration)>,
}

impl Load {
    fn rate(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
    fn percentile_ms(&self, p: f64) -> f64 {
        if self.latencies.is_empty() {
            return f64::NAN;
        }
        let i = ((self.latencies.len() as f64 - 1.0) * p).round() as usize;
        f64::from(self.latencies[i]) / 1000.0
    }
    fn merge(parts: Vec<(Vec<u32>, usize, Option<String>)>, elapsed: Duration) -> Load {
        let mut load = Load {
            elapsed,
            ..Load::default()
        };
        for (lat, errors, first_error) in parts {
            load.ok += lat.len();
            load.errors += errors;
            load.latencies.extend(lat);
            if load.first_error.is_none() {
                load.first_error = first_error;
            }
        }
        load.latencies.sort_unstable();
        load
    }
    /// Adds another slice of the same measurement.
    fn absorb(&mut self, other: Load) {
        self.ok += other.ok;
        self.errors += other.errors;
        self.elapsed += other.elapsed;
        self.latencies.extend(other.latencies);
        self.latencies.sort_unstable();
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
        self.cpu = match (self.cpu, other.cpu) {
            (Some((s0, c0)), Some((s1, c1))) => Some((s0 + s1, c0 + c1)),
            (None, cpu) if self.ok == other.ok => cpu, // the first slice
            _ => None,
        };
    }
    /// CPU microseconds per successful request: (server, client).
    fn cpu_per_request_us(&self) -> Option<(f64, f64)> {
        let (server, client) = self.cpu?;
        let n = self.ok.max(1) as f64;
        Some((
            server.as_secs_f64() * 1e6 / n,
            client.as_secs_f64() * 1e6 / n,
        ))
    }
    fn line(&self, what: &str) -> String {
        let errors = match (&self.first_error, self.errors) {
            (_, 0) => String::new(),
            (Some(e), n) => format!("  ({n} errors, first: {e})"),
            (None, n) => format!("  ({n} errors)"),
        };
        let cpu = self
            .cpu_per_request_us()
            .map(|(s, c)| format!("   CPU/req: server {s:>6.1} us, client {c:>5.1} us"))
            .unwrap_or_default();
        format!(
            "  {what:<34} {:>9.0} /s   p50 {:>6.2} ms   p99 {:>6.2} ms{cpu}{errors}",
            self.rate(),
            self.percentile_ms(0.50),
            self.percentile_ms(0.99),
        )
    }
    fn json(&self) -> serde_json::Value {
        let cpu = self.cpu_per_request_us();
        json!({
            "per_s": round(self.rate(), 0),
            "p50_ms": round(self.percentile_ms(0.50), 3),
            "p99_ms": round(self.percentile_ms(0.99), 3),
            "errors": self.errors,
            "server_cpu_us_per_req": cpu.map(|c| round(c.0, 1)),
            "client_cpu_us_per_req": cpu.map(|c| round(c.1, 1)),
        })
    }
}

fn round(x: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    (x * f).round() / f
}

/// `a / b`, when both were measured.
fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    Some(round(a? / b?, 3)).filter(|r| r.is_finite())
}

/// The services run with their default settings (logs at `info`, so one audit line per token, as
/// deployed; `RUST_LOG` is passed on): no `OIDC_*` variable of the caller's may change them.
trait EnvClearOidc {
    fn env_clear_oidc(&mut self) -> &mut Self;
}

impl EnvClearOidc for Command {
    fn env_clear_oidc(&mut self) -> &mut Self {
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("OIDC_") {
                self.env_remove(name);
            }
        }
        self
    }
}

/// The child processes this run started, stopped (SIGTERM, then SIGKILL) however the run ends.
#[derive(Default)]
struct Children(Vec<(String, Child)>);

impl Children {
    fn spawn(&mut self, name: &str, cmd: &mut Command, log: &Path) -> anyhow::Result<u32> {
        let out = std::fs::File::create(log)?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("cannot start {name}"))?;
        let pid = child.id();
        self.0.push((name.to_owned(), child));
        Ok(pid)
    }

    fn stop(&mut self, pid: u32) {
        if let Some(i) = self.0.iter().position(|(_, c)| c.id() == pid) {
            let (_, mut child) = self.0.remove(i);
            terminate(&mut child);
        }
    }

    /// Fails when a child has already exited.
    fn check_alive(&mut self, pid: u32, log: &Path) -> anyhow::Result<()> {
        if let Some((name, child)) = self.0.iter_mut().find(|(_, c)| c.id() == pid)
            && let Some(status) = child.try_wait()?
        {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            bail!("{name} exited ({status}):\n{}", tail(&text, 2000));
        }
        Ok(())
    }
}

impl Drop for Children {
    fn drop(&mut self) {
        for (_, child) in &mut self.0 {
            terminate(child);
        }
    }
}

fn terminate(child: &mut Child) {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let end = Instant::now() + Duration::from_secs(10);
    while Instant::now() < end {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

fn tail(text: &str, n: usize) -> &str {
    let start = text.len().saturating_sub(n);
    let start = (start..text.len())
        .find(|i| text.is_char_boundary(*i))
        .unwrap_or(text.len());
    &text[start..]
}

/// A scratch directory, removed at the end.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> anyhow::Result<Self> {
        let mut nonce = [0u8; 6];
        ring::rand::SystemRandom::new()
            .fill(&mut nonce)
            .map_err(|_| anyhow::anyhow!("no randomness"))?;
        let dir = std::env::temp_dir().join(format!(
            "oidc-kms-bench-{}-{}",
            std::process::id(),
            hex(&nonce)
        ));
        std::fs::create_dir_all(&dir)?;
        Ok(Scratch(dir))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn free_port() -> anyhow::Result<u16> {
    Ok(StdListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Peak resident set (`VmHWM`) of a process, in MiB.
fn peak_rss_mb(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(round(kb / 1024.0, 1))
}

/// User plus system CPU time of a process (all its threads), from `/proc/PID/stat`.
fn cpu_time(pid: &str) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) in parentheses.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // USER_HZ is 100 on Linux for every architecture's /proc interface.
    Some(Duration::from_millis(ticks * 10))
}

/// CPU time of a process and its direct children (nginx's workers).
fn tree_cpu_time(pid: u32) -> Option<Duration> {
    let mut total = cpu_time(&pid.to_string())?;
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let name = entry.file_name();
        let Some(child) = name
            .to_str()
            .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        let parent = std::fs::read_to_string(format!("/proc/{child}/stat"))
            .ok()
            .and_then(|s| {
                s.rsplit_once(')')?
                    .1
                    .split_whitespace()
                    .nth(1)?
                    .parse::<u32>()
                    .ok()
            });
        if parent == Some(pid) {
            total += cpu_time(child).unwrap_or_default();
        }
    }
    Some(total)
}

/// Server and client CPU time now.
fn cpu_now(server: u32) -> Option<(Duration, Duration)> {
    Some((tree_cpu_time(server)?, cpu_time("self")?))
}

fn cpu_since(before: Option<(Duration, Duration)>, server: u32) -> Option<(Duration, Duration)> {
    let (s0, c0) = before?;
    let (s1, c1) = cpu_now(server)?;
    Some((s1.saturating_sub(s0), c1.saturating_sub(c0)))
}

fn sibling(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let path = exe.with_file_name(name);
    if !path.is_file() {
        bail!(
            "{} not found next to {}: run `cargo build --release` first",
            name,
            exe.display()
        );
    }
    Ok(path)
}

fn find_nginx(args: &Args) -> Option<PathBuf> {
    if args.no_nginx {
        return None;
    }
    if let Some(p) = &args.nginx_bin {
        return Some(p.clone());
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/local/sbin")])
        .map(|d| d.join("nginx"))
        .find(|p| p.is_file())
}

struct Setup {
    scratch: Scratch,
    kek_file: PathBuf,
    kms_bin: PathBuf,
    gateway_bin: PathBuf,
    /// One slice of a measurement.
    slice: Duration,
    /// Slices per measurement.
    rounds: usize,
    warmup: Duration,
    connections: Option<usize>,
    cores: usize,
    service_env: Vec<(String, String)>,
}

async fn run(args: &Args) -> anyhow::Result<()> {
    let seconds = args.seconds.unwrap_or(if args.quick { 1.5 } else { 5.0 });
    let rounds = args
        .rounds
        .unwrap_or(if args.quick { 5 } else { 10 })
        .max(1);
    let setup = Setup {
        scratch: Scratch::new()?,
        kek_file: PathBuf::new(),
        kms_bin: args
            .kms_bin
            .clone()
            .map_or_else(|| sibling("oidc-kms"), Ok)?,
        gateway_bin: args
            .gateway_bin
            .clone()
            .map_or_else(|| sibling("oidc-gateway"), Ok)?,
        slice: Duration::from_secs_f64(seconds / rounds as f64),
        rounds,
        warmup: Duration::from_secs_f64((seconds / 5.0).min(1.0)),
        connections: args.connections,
        service_env: args.service_env.clone(),
        cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
    };
    let kek_file = setup.scratch.0.join("kek.b64");
    let mut kek = [0u8; 32];
    ring::rand::SystemRandom::new()
        .fill(&mut kek)
        .map_err(|_| anyhow::anyhow!("no randomness"))?;
    write_private(
        &kek_file,
        base64::engine::general_purpose::STANDARD.encode(kek) + "\n",
    )?;
    let setup = Setup { kek_file, ..setup };
    let mut children = Children::default();

    let loadavg = load_average();
    println!(
        "oidc-kms-bench: {} cores, crypto backend {BACKEND}, {seconds:.1} s per measurement in {rounds} interleaved slices{}, load average {loadavg:.2}",
        setup.cores,
        if args.quick { " (--quick)" } else { "" }
    );
    if loadavg > 0.5 {
        println!(
            "  (the machine is busy: other work competes for the cores, and every figure below is lower for it)"
        );
    }

    let gateway_port = free_port()?;
    let issuer = format!("http://127.0.0.1:{gateway_port}/");
    let want = |part: Part| args.only.is_empty() || args.only.contains(&part);

    let rs = match want(Part::Rs256) {
        true => Some(signing_suite(&setup, &mut children, "RS256", &issuer, Measure::Sign).await?),
        false => None,
    };
    // ES256 with the empty-RPC ceiling; this key service stays up for the gateway.
    let es = match (want(Part::Es256), want(Part::Gateway)) {
        (true, _) => Some(Measure::SignAndEmpty),
        (false, true) => Some(Measure::Nothing),
        (false, false) => None,
    };
    let es = match es {
        Some(measure) => {
            Some(signing_suite(&setup, &mut children, "ES256", &issuer, measure).await?)
        }
        None => None,
    };

    let (mut gateway, mut gateway_peak, mut nginx) = (None, None, None);
    if let Some(es) = es.as_ref().filter(|_| want(Part::Gateway)) {
        println!("gateway: JWKS GET over {HTTP_CONNECTIONS} keep-alive connections");
        let gw_log = setup.scratch.0.join("gateway.log");
        let gw_pid = children.spawn(
            "oidc-gateway",
            Command::new(&setup.gateway_bin)
                .arg("--kms")
                .arg(format!("http://{}", es.addr))
                .arg("--listen")
                .arg(format!("127.0.0.1:{gateway_port}"))
                .env_clear_oidc()
                .envs(setup.service_env.iter().cloned()),
            &gw_log,
        )?;
        let gw_addr: SocketAddr = ([127, 0, 0, 1], gateway_port).into();
        let jwks_path = "/openid/v1/jwks";
        let jwks = wait_for_http(&mut children, gw_pid, &gw_log, gw_addr, jwks_path).await?;
        let nginx_server = match find_nginx(args) {
            Some(bin) => match start_nginx(&bin, &setup, &mut children, &jwks).await {
                Ok(server) => Some(server),
                Err(e) => {
                    println!("  nginx baseline skipped: {e:#}");
                    None
                }
            },
            None => {
                println!(
                    "  nginx baseline skipped: nginx is not installed (apt-get install nginx)"
                );
                None
            }
        };
        // Warm-up, then the gateway and nginx slice by slice in turn.
        let servers: Vec<(u32, SocketAddr)> = [Some((gw_pid, gw_addr)), nginx_server]
            .into_iter()
            .flatten()
            .collect();
        for &(pid, addr) in &servers {
            http_load(addr, jwks_path, jwks.len(), setup.warmup, pid).await;
        }
        let mut loads: Vec<Load> = servers.iter().map(|_| Load::default()).collect();
        for _ in 0..setup.rounds {
            for (&(pid, addr), load) in servers.iter().zip(&mut loads) {
                load.absorb(http_load(addr, jwks_path, jwks.len(), setup.slice, pid).await);
            }
        }
        let mut loads = loads.into_iter();
        let load = loads.next().expect("the gateway was measured");
        println!("{}", load.line("oidc-gateway"));
        gateway = Some(load);
        nginx = loads.next();
        if let Some(load) = &nginx {
            println!("{}", load.line("nginx (static file, same bytes)"));
        }
        gateway_peak = peak_rss_mb(gw_pid);
        // The gateway polls the key service: both must still be up for the figures to count.
        children.check_alive(gw_pid, &gw_log)?;
        for (pid, _) in servers {
            children.stop(pid);
        }
    }
    if let Some(es) = &es {
        children.stop(es.pid);
    }

    let kms_peak = [&rs, &es]
        .into_iter()
        .flatten()
        .filter_map(|s| s.peak_rss_mb)
        .reduce(f64::max);
    println!(
        "peak resident memory: key service {} MiB (RS256 run {}, ES256 run {}), gateway {} MiB",
        mb(kms_peak),
        mb(rs.as_ref().and_then(|s| s.peak_rss_mb)),
        mb(es.as_ref().and_then(|s| s.peak_rss_mb)),
        mb(gateway_peak),
    );

    let best = |loads: &[(usize, Load)]| loads.iter().map(|(_, l)| l.rate()).reduce(f64::max);
    let raw = |s: &Option<SigningSuite>| s.as_ref().and_then(|s| s.raw);
    let sign = |s: &Option<SigningSuite>| s.as_ref().and_then(|s| best(&s.sign));
    let empty = es.as_ref().and_then(|s| best(&s.empty));
    let per_s = |x: Option<f64>| x.map(|x| round(x, 0));
    let summary = json!({
        "backend": BACKEND,
        "cores": setup.cores,
        "seconds_per_measurement": seconds,
        "rounds": rounds,
        "load_average_at_start": loadavg,
        "rs256_raw_per_s": per_s(raw(&rs)),
        "rs256_grpc_per_s": per_s(sign(&rs)),
        "es256_raw_per_s": per_s(raw(&es)),
        "es256_grpc_per_s": per_s(sign(&es)),
        "empty_rpc_per_s": per_s(empty),
        "rs256_grpc": rs.as_ref().map(|s| by_clients(&s.sign)),
        "es256_grpc": es.as_ref().map(|s| by_clients(&s.sign)),
        "empty_rpc": es.as_ref().map(|s| by_clients(&s.empty)),
        "gateway": gateway.as_ref().map(Load::json),
        "nginx": nginx.as_ref().map(Load::json),
        "rs256_grpc_vs_raw": ratio(sign(&rs), raw(&rs)),
        "es256_grpc_vs_raw": ratio(sign(&es), raw(&es)),
        "es256_grpc_vs_empty_rpc": ratio(sign(&es), empty),
        "gateway_vs_nginx": ratio(gateway.as_ref().map(Load::rate), nginx.as_ref().map(Load::rate)),
        "kms_peak_rss_mb": kms_peak,
        "gateway_peak_rss_mb": gateway_peak,
    });
    println!("{summary}");
    Ok(())
}

fn mb(x: Option<f64>) -> String {
    x.map_or_else(|| "-".to_owned(), |x| format!("{x:.1}"))
}

/// The one-minute load average before the run: other work on the machine skews every figure.
fn load_average() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(f64::NAN)
}

fn by_clients(loads: &[(usize, Load)]) -> serde_json::Value {
    loads
        .iter()
        .map(|(c, l)| (c.to_string(), l.json()))
        .collect::<serde_json::Map<_, _>>()
        .into()
}

fn write_private(path: &Path, text: String) -> anyhow::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options.open(path)?.write_all(text.as_bytes())?;
    Ok(())
}

/// What one algorithm's run measured.
struct SigningSuite {
    raw: Option<f64>,
    sign: Vec<(usize, Load)>,
    empty: Vec<(usize, Load)>,
    peak_rss_mb: Option<f64>,
    /// The key service, still running (the gateway uses the last one).
    pid: u32,
    addr: SocketAddr,
}

/// Starts a key service making `alg` keys and measures, as `measure` says, the raw backend rate
/// over a payload the size of its tokens' signing input, then SignToken (and the empty RPC) at
/// each client count. With the empty RPC (or nothing) measured, the key service is left running
/// for the gateway; otherwise it is stopped.
async fn signing_suite(
    setup: &Setup,
    children: &mut Children,
    alg: &str,
    issuer: &str,
    measure: Measure,
) -> anyhow::Result<SigningSuite> {
    let spec = KeySpec::from_algorithm(alg, 2048).map_err(anyhow::Error::msg)?;
    if measure != Measure::Nothing {
        println!("{spec}:");
    }
    let port = free_port()?;
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let data_dir = setup.scratch.0.join(format!("kms-{alg}"));
    let log = setup.scratch.0.join(format!("kms-{alg}.log"));
    let pid = children.spawn(
        "oidc-kms",
        Command::new(&setup.kms_bin)
            .arg("--issuer")
            .arg(issuer)
            .arg("--data-dir")
            .arg(&data_dir)
            .arg("--kek-file")
            .arg(&setup.kek_file)
            .arg("--listen")
            .arg(addr.to_string())
            .arg("--algorithm")
            .arg(alg)
            .arg("--rotation-period")
            .arg("off")
            .env_clear_oidc()
            .envs(setup.service_env.iter().cloned()),
        &log,
    )?;
    let channels = connect(children, pid, &log, addr, setup).await?;
    let mut suite = SigningSuite {
        raw: None,
        sign: Vec::new(),
        empty: Vec::new(),
        peak_rss_mb: None,
        pid,
        addr,
    };
    if measure == Measure::Nothing {
        return Ok(suite);
    }

    // The raw limit, over the same payload size, with the key service idle.
    let sample = sign_once(&channels[0]).await?;
    let signing_input_len = sample.rfind('.').context("a compact JWS")?;
    let raw_signer = RawSigner::new(spec, signing_input_len)?;
    let mut ops = vec![Op::SignToken];
    if measure == Measure::SignAndEmpty {
        ops.push(Op::Empty);
    }
    // Warm-up, not counted: the first calls fill caches, pools and the connections' windows.
    raw_signer.run(setup.cores, setup.warmup);
    for &op in &ops {
        for clients in CLIENTS {
            grpc_load(&channels, clients, op, setup.warmup, pid).await;
        }
    }
    // Slice by slice, in turn: raw, then every op at every client count.
    let (mut raw_count, mut raw_time) = (0usize, Duration::ZERO);
    let mut loads: Vec<(Op, usize, Load)> = ops
        .iter()
        .flat_map(|&op| CLIENTS.map(|c| (op, c, Load::default())))
        .collect();
    for _ in 0..setup.rounds {
        let (n, t) = raw_signer.run(setup.cores, setup.slice);
        raw_count += n;
        raw_time += t;
        for (op, clients, load) in &mut loads {
            load.absorb(grpc_load(&channels, *clients, *op, setup.slice, pid).await);
        }
    }
    let raw = raw_count as f64 / raw_time.as_secs_f64().max(1e-9);
    println!(
        "  {:<34} {raw:>9.0} /s   ({} threads, {signing_input_len}-byte signing input, no gRPC)",
        format!("raw {BACKEND} signatures"),
        setup.cores
    );
    suite.raw = Some(raw);
    for (op, clients, load) in loads {
        let what = match op {
            Op::SignToken => format!("SignToken, {}", clients_label(clients)),
            Op::Empty => format!("empty RPC (Health/Check), {}", clients_label(clients)),
        };
        println!("{}", load.line(&what));
        match op {
            Op::SignToken => suite.sign.push((clients, load)),
            Op::Empty => suite.empty.push((clients, load)),
        }
    }
    children.check_alive(pid, &log)?;
    suite.peak_rss_mb = peak_rss_mb(pid);
    drop(channels);
    if measure == Measure::Sign {
        children.stop(pid);
    }
    Ok(suite)
}

/// Connects the clients' channels once the key service answers health checks.
async fn connect(
    children: &mut Children,
    pid: u32,
    log: &Path,
    addr: SocketAddr,
    setup: &Setup,
) -> anyhow::Result<Vec<Channel>> {
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))?
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(2));
    let end = Instant::now() + Duration::from_secs(60);
    loop {
        children.check_alive(pid, log)?;
        if let Ok(ch) = endpoint.connect().await {
            let serving = HealthClient::new(ch)
                .check(HealthCheckRequest::default())
                .await
                .is_ok_and(|r| r.into_inner().status == 1);
            if serving {
                break;
            }
        }
        if Instant::now() > end {
            bail!("the key service did not become ready within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let n = setup
        .connections
        .unwrap_or(*CLIENTS.iter().max().expect("client counts"))
        .max(1);
    let mut channels = Vec::with_capacity(n);
    for _ in 0..n {
        channels.push(endpoint.connect().await?);
    }
    Ok(channels)
}

fn sign_request(i: usize) -> SignTokenRequest {
    // A service-account token like kube-apiserver asks for.
    let claims = prost_types::Struct {
        fields: [(
            "kubernetes.io".to_owned(),
            pb_struct(&[
                ("namespace", pb_string("bench")),
                (
                    "serviceaccount",
                    pb_struct(&[
                        ("name", pb_string(&format!("client-{i}"))),
                        ("uid", pb_string("5f0c2c5e-8f39-4b4e-9b7c-2f1f6b2b7a11")),
                    ]),
                ),
            ]),
        )]
        .into_iter()
        .collect(),
    };
    SignTokenRequest {
        subject: format!("system:serviceaccount:bench:client-{i}"),
        audiences: vec![AUDIENCE.to_owned()],
        lifetime_seconds: 3600,
        claims: Some(claims),
    }
}

fn pb_string(s: &str) -> prost_types::Value {
    prost_types::Value {
        kind: Some(prost_types::value::Kind::StringValue(s.to_owned())),
    }
}

fn pb_struct(fields: &[(&str, prost_types::Value)]) -> prost_types::Value {
    prost_types::Value {
        kind: Some(prost_types::value::Kind::StructValue(prost_types::Struct {
            fields: fields
                .iter()
                .map(|(k, v)| ((*k).to_owned(), v.clone()))
                .collect(),
        })),
    }
}

async fn sign_once(channel: &Channel) -> anyhow::Result<String> {
    let response = KeyServiceClient::new(channel.clone())
        .sign_token(sign_request(0))
        .await
        .context("SignToken")?;
    Ok(response.into_inner().token)
}

/// The crypto backend alone: one key (made before any clock starts) and a message the size of a
/// token's signing input, signed by threads that share the key, as the signing pool does.
struct RawSigner {
    key: SoftwareKey,
    message: Vec<u8>,
}

impl RawSigner {
    fn new(spec: KeySpec, len: usize) -> anyhow::Result<Self> {
        let (key, _pkcs8) = SoftwareKey::generate(spec)?;
        let message = (0..len).map(|i| b"abcdefghijklmnop"[i % 16]).collect();
        Ok(RawSigner { key, message })
    }

    /// Signs on `threads` threads for `time`; returns the signatures made and the time taken.
    fn run(&self, threads: usize, time: Duration) -> (usize, Duration) {
        let start = Instant::now();
        let end = start + time;
        let count = || {
            let mut n = 0usize;
            while Instant::now() < end && n < MAX_PER_CLIENT {
                self.key.sign(&self.message).expect("signs");
                n += 1;
            }
            n
        };
        let total = std::thread::scope(|s| {
            let handles: Vec<_> = (0..threads).map(|_| s.spawn(count)).collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("signing thread"))
                .sum()
        });
        (total, start.elapsed())
    }
}

#[derive(Debug, Clone, Copy)]
enum Op {
    SignToken,
    Empty,
}

/// `clients` concurrent callers, each one request at a time, for `time`.
async fn grpc_load(
    channels: &[Channel],
    clients: usize,
    op: Op,
    time: Duration,
    server: u32,
) -> Load {
    let n = channels.len().min(clients).max(1);
    let before = cpu_now(server);
    let start = Instant::now();
    let deadline = start + time;
    let tasks: Vec<_> = (0..clients)
        .map(|i| {
            let channel = channels[i % n].clone();
            tokio::spawn(grpc_client(channel, i, op, deadline))
        })
        .collect();
    let mut parts = Vec::with_capacity(tasks.len());
    for t in tasks {
        parts.push(t.await.expect("client task"));
    }
    let mut load = Load::merge(parts, start.elapsed());
    load.cpu = cpu_since(before, server);
    load
}

/// A load generator's codec: the request is encoded once per client and sent as those bytes
/// every time (as wrk and h2load resend one request); every response is decoded in full.
struct PreEncoded<M>(std::marker::PhantomData<M>);

impl<M> PreEncoded<M> {
    fn new() -> Self {
        PreEncoded(std::marker::PhantomData)
    }
}

impl<M: prost::Message + Default + Send + 'static> tonic::codec::Codec for PreEncoded<M> {
    type Encode = Bytes;
    type Decode = M;
    type Encoder = PreEncoded<Bytes>;
    type Decoder = PreEncoded<M>;

    fn encoder(&mut self) -> Self::Encoder {
        PreEncoded::new()
    }

    fn decoder(&mut self) -> Self::Decoder {
        PreEncoded::new()
    }
}

impl tonic::codec::Encoder for PreEncoded<Bytes> {
    type Item = Bytes;
    type Error = tonic::Status;

    fn encode(
        &mut self,
        item: Bytes,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), Self::Error> {
        bytes::BufMut::put_slice(dst, &item);
        Ok(())
    }
}

impl<M: prost::Message + Default> tonic::codec::Decoder for PreEncoded<M> {
    type Item = M;
    type Error = tonic::Status;

    fn decode(&mut self, src: &mut tonic::codec::DecodeBuf<'_>) -> Result<Option<M>, Self::Error> {
        M::decode(src)
            .map(Some)
            .map_err(|e| tonic::Status::internal(e.to_string()))
    }
}

/// One call of `op` with the pre-encoded `request`; checks what came back.
async fn call(
    grpc: &mut tonic::client::Grpc<Channel>,
    op: Op,
    request: &Bytes,
) -> Result<(), tonic::Status> {
    grpc.ready()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let request = tonic::Request::new(request.clone());
    match op {
        Op::SignToken => {
            let path = http::uri::PathAndQuery::from_static("/oidckms.v1.KeyService/SignToken");
            let response = grpc
                .unary::<_, SignTokenResponse, _>(request, path, PreEncoded::new())
                .await?
                .into_inner();
            if response.token.is_empty() || response.key_id.is_empty() {
                return Err(tonic::Status::internal(
                    "SignToken answered without a token",
                ));
            }
        }
        Op::Empty => {
            let path = http::uri::PathAndQuery::from_static("/grpc.health.v1.Health/Check");
            let response = grpc
                .unary::<_, HealthCheckResponse, _>(request, path, PreEncoded::new())
                .await?
                .into_inner();
            if response.status != 1 {
                return Err(tonic::Status::internal("Health/Check: not SERVING"));
            }
        }
    }
    Ok(())
}

async fn grpc_client(
    channel: Channel,
    i: usize,
    op: Op,
    deadline: Instant,
) -> (Vec<u32>, usize, Option<String>) {
    let mut grpc = tonic::client::Grpc::new(channel);
    let request = Bytes::from(match op {
        Op::SignToken => prost::Message::encode_to_vec(&sign_request(i)),
        Op::Empty => prost::Message::encode_to_vec(&HealthCheckRequest::default()),
    });
    let mut latencies = Vec::with_capacity(4096);
    let (mut errors, mut first_error) = (0usize, None);
    while Instant::now() < deadline && latencies.len() < MAX_PER_CLIENT && errors < 10_000 {
        let t = Instant::now();
        let result = call(&mut grpc, op, &request).await;
        match result {
            Ok(()) => latencies.push(t.elapsed().as_micros().min(u32::MAX as u128) as u32),
            Err(status) => {
                errors += 1;
                first_error
                    .get_or_insert_with(|| format!("{:?}: {}", status.code(), status.message()));
            }
        }
    }
    (latencies, errors, first_error)
}

/// Waits until `path` answers 200 and returns its body.
async fn wait_for_http(
    children: &mut Children,
    pid: u32,
    log: &Path,
    addr: SocketAddr,
    path: &str,
) -> anyhow::Result<Vec<u8>> {
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        children.check_alive(pid, log)?;
        if let Ok(mut conn) = HttpConn::connect(addr, path).await
            && let Ok((200, body)) = conn.get().await
        {
            return Ok(body);
        }
        if Instant::now() > end {
            bail!("{addr}{path} did not answer 200 within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A minimal HTTP/1.1 keep-alive client: one `GET` at a time, `Content-Length` bodies. Small on
/// purpose, so that the load generator costs the server under test as little CPU as possible.
struct HttpConn {
    stream: TcpStream,
    request: Vec<u8>,
    buf: Vec<u8>,
}

impl HttpConn {
    async fn connect(addr: SocketAddr, path: &str) -> std::io::Result<Self> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(HttpConn {
            stream,
            request: format!(
                "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: oidc-kms-bench\r\n\r\n"
            )
            .into_bytes(),
            buf: Vec::with_capacity(16 * 1024),
        })
    }

    /// One request; returns the status and the body.
    async fn get(&mut self) -> std::io::Result<(u16, Vec<u8>)> {
        let (status, start, len) = self.exchange().await?;
        Ok((status, self.buf[start..start + len].to_vec()))
    }

    /// One request; returns the status, where the body starts in `buf` and its length.
    async fn exchange(&mut self) -> std::io::Result<(u16, usize, usize)> {
        let bad =
            |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_owned());
        self.stream.write_all(&self.request).await?;
        self.buf.clear();
        let head_end = loop {
            if let Some(i) = find(&self.buf, b"\r\n\r\n") {
                break i + 4;
            }
            self.fill().await?;
        };
        let head =
            std::str::from_utf8(&self.buf[..head_end]).map_err(|_| bad("header not UTF-8"))?;
        let status: u16 = head
            .get(9..12)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| bad("no status"))?;
        let len: usize = head
            .lines()
            .find_map(|l| {
                let (name, value) = l.split_once(':')?;
                name.eq_ignore_ascii_case("content-length")
                    .then(|| value.trim().parse().ok())?
            })
            .ok_or_else(|| bad("no Content-Length"))?;
        while self.buf.len() < head_end + len {
            self.fill().await?;
        }
        Ok((status, head_end, len))
    }

    async fn fill(&mut self) -> std::io::Result<()> {
        let mut chunk = [0u8; 16 * 1024];
        let n = self.stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(())
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// `HTTP_CONNECTIONS` keep-alive connections for `time`, each one `GET` at a time; every answer
/// must be 200 with a body of `body_len` bytes.
async fn http_load(
    addr: SocketAddr,
    path: &str,
    body_len: usize,
    time: Duration,
    server: u32,
) -> Load {
    let before = cpu_now(server);
    let start = Instant::now();
    let deadline = start + time;
    let tasks: Vec<_> = (0..HTTP_CONNECTIONS)
        .map(|_| {
            let path = path.to_owned();
            tokio::spawn(async move { http_client(addr, &path, body_len, deadline).await })
        })
        .collect();
    let mut parts = Vec::with_capacity(tasks.len());
    for t in tasks {
        parts.push(t.await.expect("client task"));
    }
    let mut load = Load::merge(parts, start.elapsed());
    load.cpu = cpu_since(before, server);
    load
}

async fn http_client(
    addr: SocketAddr,
    path: &str,
    body_len: usize,
    deadline: Instant,
) -> (Vec<u32>, usize, Option<String>) {
    let mut latencies = Vec::with_capacity(16 * 1024);
    let (mut errors, mut first_error) = (0usize, None::<String>);
    let mut conn = None;
    while Instant::now() < deadline && latencies.len() < MAX_PER_CLIENT && errors < 10_000 {
        let c = match conn.as_mut() {
            Some(c) => c,
            None => match HttpConn::connect(addr, path).await {
                Ok(c) => conn.insert(c),
                Err(e) => {
                    errors += 1;
                    first_error.get_or_insert_with(|| format!("connect: {e}"));
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        let t = Instant::now();
        match c.exchange().await {
            Ok((200, _, len)) if len == body_len => {
                latencies.push(t.elapsed().as_micros().min(u32::MAX as u128) as u32);
            }
            Ok((status, _, len)) => {
                errors += 1;
                first_error.get_or_insert_with(|| format!("status {status}, {len} bytes"));
            }
            Err(e) => {
                // The server closed the connection (or it broke): reconnect.
                errors += 1;
                first_error.get_or_insert_with(|| e.to_string());
                conn = None;
            }
        }
    }
    (latencies, errors, first_error)
}

/// Starts nginx serving `jwks` as a static file at the same path, with production settings
/// (sendfile, open-file cache, no access log), as many workers as cores. Returns its pid and
/// address once it serves the same bytes.
async fn start_nginx(
    bin: &Path,
    setup: &Setup,
    children: &mut Children,
    jwks: &[u8],
) -> anyhow::Result<(u32, SocketAddr)> {
    let root = setup.scratch.0.join("nginx");
    let www = root.join("www/openid/v1");
    std::fs::create_dir_all(&www)?;
    std::fs::write(www.join("jwks"), jwks)?;
    let port = free_port()?;
    let conf = root.join("nginx.conf");
    std::fs::write(
        &conf,
        format!(
            r#"worker_processes {cores};
daemon off;
master_process on;
pid {root}/nginx.pid;
error_log {root}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    keepalive_timeout 65;
    keepalive_requests 10000000;
    open_file_cache max=16 inactive=60s;
    open_file_cache_valid 60s;
    default_type application/jwk-set+json;
    client_body_temp_path {root}/tmp-body;
    proxy_temp_path {root}/tmp-proxy;
    fastcgi_temp_path {root}/tmp-fastcgi;
    uwsgi_temp_path {root}/tmp-uwsgi;
    scgi_temp_path {root}/tmp-scgi;
    server {{
        listen 127.0.0.1:{port};
        root {root}/www;
        location / {{
            add_header Cache-Control "public, max-age=300";
        }}
    }}
}}
"#,
            cores = setup.cores,
            root = root.display(),
        ),
    )?;
    let log = root.join("stderr.log");
    let pid = children.spawn(
        "nginx",
        Command::new(bin)
            .arg("-p")
            .arg(&root)
            .arg("-e")
            .arg(root.join("error.log"))
            .arg("-c")
            .arg(&conf),
        &log,
    )?;
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let body = wait_for_http(children, pid, &log, addr, "/openid/v1/jwks").await?;
    if body != jwks {
        bail!("nginx serves other bytes than the gateway");
    }
    Ok((pid, addr))
}

fn clients_label(clients: usize) -> String {
    if clients == 1 {
        "1 client".into()
    } else {
        format!("{clients} clients")
    }
}
