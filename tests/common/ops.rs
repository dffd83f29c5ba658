//! Operability test support: processes started with chosen environment variables, runs of the
//! admin CLI, Prometheus scrapes parsed into samples, and gRPC calls with a request id or to the
//! health service.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use oidc_kms::grpc::pb::{self, key_service_client::KeyServiceClient};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

use super::{Proc, eventually, http_get, wait_exit};

/// A command with the test runner's own `OIDC_*` variables removed, so only `env` applies.
fn command(bin: &str, args: &[String], env: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(bin);
    cmd.args(args).stdin(Stdio::null());
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("OIDC_") {
            cmd.env_remove(key);
        }
    }
    cmd.envs(env.iter().copied());
    cmd
}

/// Starts `bin` with `args` and `env`, output to `log`.
pub fn spawn(bin: &str, args: &[String], env: &[(&str, &str)], log: PathBuf) -> Proc {
    let out = std::fs::File::create(&log).unwrap();
    let child = command(bin, args, env)
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .unwrap();
    Proc { child, log }
}

/// Runs `bin` until it exits (at most 20 s): the exit code and everything it printed.
pub fn run_to_exit(bin: &str, args: &[String], env: &[(&str, &str)], dir: &Path) -> (i32, String) {
    let log = dir.join(format!("run-{}.log", super::free_port()));
    let mut p = spawn(bin, args, env, log);
    let status = wait_exit(&mut p.child, Duration::from_secs(20))
        .unwrap_or_else(|| panic!("{bin} {args:?} kept running: {}", p.log_text()));
    (status.code().unwrap_or(-1), p.log_text())
}

/// What one CLI run printed.
pub struct CliRun {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `oidc-kms` with `args` (an admin command) and collects its output.
pub fn cli(args: &[&str]) -> CliRun {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    let out = command(super::kms_bin(), &args, &[]).output().unwrap();
    CliRun {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8(out.stdout).unwrap(),
        stderr: String::from_utf8(out.stderr).unwrap(),
    }
}

/// One scrape: every sample, keyed by `name{labels}` exactly as exposed.
pub struct Scrape {
    pub text: String,
    pub content_type: String,
    samples: HashMap<String, f64>,
}

impl Scrape {
    /// The sample `name` with exactly `labels` (in any order), if exposed.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let mut want: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
        want.sort();
        self.samples.iter().find_map(|(key, value)| {
            let (n, l) = split_key(key);
            let mut have: Vec<String> = l.into_iter().map(str::to_owned).collect();
            have.sort();
            (n == name && have == want).then_some(*value)
        })
    }

    /// The sum of every sample named `name` whose labels include `labels`.
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let want: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
        self.samples
            .iter()
            .filter(|(key, _)| {
                let (n, l) = split_key(key);
                n == name && want.iter().all(|w| l.contains(&w.as_str()))
            })
            .map(|(_, v)| v)
            .sum()
    }

    /// Every label set of `name`.
    pub fn series(&self, name: &str) -> Vec<String> {
        self.samples
            .keys()
            .filter(|k| split_key(k).0 == name)
            .cloned()
            .collect()
    }
}

fn split_key(key: &str) -> (&str, Vec<&str>) {
    match key.split_once('{') {
        Some((name, rest)) => (
            name,
            rest.trim_end_matches('}')
                .split(',')
                .filter(|s| !s.is_empty())
                .collect(),
        ),
        None => (key, vec![]),
    }
}

/// GETs a Prometheus endpoint and parses the text format.
pub fn scrape(url: &str) -> Scrape {
    let r = http_get(url, &[]);
    assert_eq!(r.status, 200, "{url}: {}", String::from_utf8_lossy(&r.body));
    let text = String::from_utf8(r.body.clone()).unwrap();
    let mut samples = HashMap::new();
    for line in text.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let (key, value) = line.rsplit_once(' ').unwrap();
        let value = match value {
            "+Inf" | "inf" => f64::INFINITY,
            v => v.parse().unwrap_or_else(|_| panic!("bad sample: {line}")),
        };
        samples.insert(key.to_owned(), value);
    }
    Scrape {
        text,
        content_type: r.header("content-type").unwrap_or("").to_owned(),
        samples,
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Watches the health of `service` on `port` while `during` runs (it is started once the first
/// status has arrived), and returns every status the stream delivered until it ended.
pub fn watch_health_while(port: u16, service: &str, during: impl FnOnce()) -> Vec<ServingStatus> {
    runtime().block_on(async {
        let channel = super::loopback_channel(port).await;
        let mut stream = HealthClient::new(channel)
            .watch(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        let status =
            |m: tonic_health::pb::HealthCheckResponse| ServingStatus::try_from(m.status).unwrap();
        let first = stream.message().await.unwrap().expect("a first status");
        let mut seen = vec![status(first)];
        during();
        // The stream ends with the connection (an error once the server has gone, not a panic).
        while let Ok(Ok(Some(m))) =
            tokio::time::timeout(Duration::from_secs(20), stream.message()).await
        {
            seen.push(status(m));
        }
        seen
    })
}

/// Waits until the key service on `port` answers GetJwks, and returns the answer.
pub fn wait_for_jwks(port: u16, proc: &mut Proc) -> pb::GetJwksResponse {
    let rt = runtime();
    let url = format!("http://127.0.0.1:{port}");
    eventually(Duration::from_secs(60), || {
        if let Ok(Some(status)) = proc.child.try_wait() {
            panic!("oidc-kms exited with {status}: {}", proc.log_text());
        }
        rt.block_on(async {
            let mut c = KeyServiceClient::connect(url.clone()).await.ok()?;
            Some(c.get_jwks(pb::GetJwksRequest {}).await.ok()?.into_inner())
        })
    })
    .unwrap_or_else(|| panic!("oidc-kms did not answer: {}", proc.log_text()))
}

/// SignToken with an `x-request-id`; the answer and the request id the response echoed.
pub fn sign_with_request_id(
    port: u16,
    request_id: &str,
    req: pb::SignTokenRequest,
) -> (Result<pb::SignTokenResponse, tonic::Status>, Option<String>) {
    runtime().block_on(async {
        let mut c = KeyServiceClient::connect(format!("http://127.0.0.1:{port}"))
            .await
            .unwrap();
        let mut request = tonic::Request::new(req);
        request
            .metadata_mut()
            .insert("x-request-id", request_id.parse().unwrap());
        match c.sign_token(request).await {
            Ok(r) => {
                let echoed = r
                    .metadata()
                    .get("x-request-id")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned);
                (Ok(r.into_inner()), echoed)
            }
            Err(status) => {
                let echoed = status
                    .metadata()
                    .get("x-request-id")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned);
                (Err(status), echoed)
            }
        }
    })
}

/// grpc.health.v1 Check of `service` on the key service at `port`.
pub fn health(port: u16, service: &str) -> Result<ServingStatus, tonic::Status> {
    runtime().block_on(async {
        let channel = super::loopback_channel(port).await;
        let mut c = HealthClient::new(channel);
        let r = c
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await?;
        Ok(ServingStatus::try_from(r.into_inner().status).unwrap())
    })
}
