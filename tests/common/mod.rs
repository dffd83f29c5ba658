//! Test support: start the real `oidc-kms` and `oidc-gateway` binaries on ephemeral loopback ports
//! with temp data dirs, talk to them as their users do (gRPC client, plain HTTP), and verify tokens
//! with an independent library (`jsonwebtoken`) against the JWKS fetched like a relying party.
#![allow(dead_code)]

use std::io::Read as _;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use oidc_kms::grpc::pb::{self, key_service_client::KeyServiceClient};
use serde_json::Value;
use tonic::transport::Channel;

pub const AUD: &str = "api://AzureADTokenExchange";

pub fn kms_bin() -> &'static str {
    env!("CARGO_BIN_EXE_oidc-kms")
}

pub fn gateway_bin() -> &'static str {
    env!("CARGO_BIN_EXE_oidc-gateway")
}

/// A random number in `range` (tests need no better randomness than this).
pub fn random_in(range: std::ops::Range<u64>) -> u64 {
    let mut b = [0u8; 8];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b).unwrap();
    range.start + u64::from_le_bytes(b) % (range.end - range.start)
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn write_kek(dir: &Path) -> PathBuf {
    let mut bytes = [0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes).unwrap();
    let path = dir.join("kek.b64");
    std::fs::write(
        &path,
        format!(
            "{}\n",
            base64::engine::general_purpose::STANDARD.encode(bytes)
        ),
    )
    .unwrap();
    path
}

/// A running process whose output goes to a log file; killed on drop.
pub struct Proc {
    pub child: Child,
    pub log: PathBuf,
}

impl Proc {
    pub fn spawn(bin: &str, args: &[String], log: PathBuf, cwd: Option<&Path>) -> Proc {
        let out = std::fs::File::create(&log).unwrap();
        let mut cmd = Command::new(bin);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .env_remove("OIDC_KMS_KEK");
        if let Some(dir) = cwd {
            cmd.current_dir(dir);
        }
        Proc {
            child: cmd.spawn().unwrap(),
            log,
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(&mut self) -> ExitStatus {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        wait_exit(&mut self.child, Duration::from_secs(20)).expect("exits after SIGTERM")
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn wait_exit(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

/// Polls `f` until it returns `Some` or the time is up.
pub fn eventually<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let end = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() > end {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A runtime for a client kept across calls. Its own worker keeps the connection answering the
/// server's HTTP/2 pings between calls: a server's graceful shutdown waits for that answer, so a
/// connection on a runtime nobody polls would hold every SIGTERM until the grace period runs out.
pub fn client_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap()
}

/// A plaintext gRPC channel to the key service on loopback `port`.
pub async fn loopback_channel(port: u16) -> Channel {
    tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

/// A key service process with its data dir, KEK and a gRPC client.
pub struct Kms {
    pub proc: Proc,
    pub port: u16,
    pub data_dir: PathBuf,
    pub kek_file: PathBuf,
    pub issuer: String,
    pub extra: Vec<String>,
    rt: tokio::runtime::Runtime,
    client: Option<KeyServiceClient<Channel>>,
}

pub fn kms_args(
    port: u16,
    data_dir: &Path,
    kek: &Path,
    issuer: &str,
    extra: &[String],
) -> Vec<String> {
    let mut args: Vec<String> = vec![
        "--listen".into(),
        format!("127.0.0.1:{port}"),
        "--data-dir".into(),
        data_dir.display().to_string(),
        "--kek-file".into(),
        kek.display().to_string(),
        "--issuer".into(),
        issuer.into(),
    ];
    args.extend(extra.iter().cloned());
    args
}

impl Kms {
    /// Starts a key service and waits until it answers.
    pub fn start(data_dir: &Path, kek_file: &Path, issuer: &str, extra: &[&str]) -> Kms {
        let port = free_port();
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        let log = data_dir.with_extension(format!("kms-{port}.log"));
        let proc = Proc::spawn(
            kms_bin(),
            &kms_args(port, data_dir, kek_file, issuer, &extra),
            log,
            None,
        );
        let mut kms = Kms {
            proc,
            port,
            data_dir: data_dir.to_path_buf(),
            kek_file: kek_file.to_path_buf(),
            issuer: issuer.into(),
            extra,
            rt: client_runtime(),
            client: None,
        };
        kms.connect();
        kms
    }

    fn connect(&mut self) {
        let url = format!("http://127.0.0.1:{}", self.port);
        let proc = &mut self.proc;
        let rt = &self.rt;
        let client = eventually(Duration::from_secs(60), || {
            if let Ok(Some(status)) = proc.child.try_wait() {
                panic!("oidc-kms exited with {status}: {}", proc.log_text());
            }
            rt.block_on(async {
                let mut c = KeyServiceClient::connect(url.clone()).await.ok()?;
                c.get_jwks(pb::GetJwksRequest {}).await.ok()?;
                Some(c)
            })
        });
        self.client = Some(
            client.unwrap_or_else(|| panic!("oidc-kms did not answer: {}", self.proc.log_text())),
        );
    }

    pub fn endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn sign(&self, req: pb::SignTokenRequest) -> Result<pb::SignTokenResponse, tonic::Status> {
        let mut c = self.client.clone().unwrap();
        self.rt
            .block_on(c.sign_token(req))
            .map(tonic::Response::into_inner)
    }

    pub fn sign_simple(&self) -> pb::SignTokenResponse {
        self.sign(sign_request("system:serviceaccount:default:app", &[AUD]))
            .expect("SignToken")
    }

    pub fn rotate(&self, prepublish_seconds: i64) -> Result<pb::RotateKeysResponse, tonic::Status> {
        let mut c = self.client.clone().unwrap();
        self.rt
            .block_on(c.rotate_keys(pb::RotateKeysRequest { prepublish_seconds }))
            .map(tonic::Response::into_inner)
    }

    pub fn jwks(&self) -> pb::GetJwksResponse {
        let mut c = self.client.clone().unwrap();
        self.rt
            .block_on(c.get_jwks(pb::GetJwksRequest {}))
            .unwrap()
            .into_inner()
    }

    pub fn kids(&self) -> Vec<String> {
        let mut kids: Vec<String> = self.jwks().keys.into_iter().map(|k| k.kid).collect();
        kids.sort();
        kids
    }

    pub fn list_keys(&self) -> pb::ListKeysResponse {
        let mut c = self.client.clone().unwrap();
        self.rt
            .block_on(c.list_keys(pb::ListKeysRequest {}))
            .unwrap()
            .into_inner()
    }

    /// SIGTERM, then the same service again on the same port, data and KEK.
    pub fn restart(&mut self) {
        let status = self.proc.terminate();
        assert!(status.success(), "clean exit on SIGTERM: {status}");
        self.restart_after_kill();
    }

    /// Starts the service again on the same port, data and KEK (after it died or was killed).
    pub fn restart_after_kill(&mut self) {
        let extra = self.extra.clone();
        let log = self
            .data_dir
            .with_extension(format!("kms-{}-b.log", self.port));
        self.proc = Proc::spawn(
            kms_bin(),
            &kms_args(
                self.port,
                &self.data_dir,
                &self.kek_file,
                &self.issuer,
                &extra,
            ),
            log,
            None,
        );
        self.connect();
    }
}

pub fn sign_request(subject: &str, audiences: &[&str]) -> pb::SignTokenRequest {
    pb::SignTokenRequest {
        subject: subject.into(),
        audiences: audiences.iter().map(|s| s.to_string()).collect(),
        lifetime_seconds: 0,
        claims: None,
    }
}

/// A gateway process in front of a key service.
pub struct Gateway {
    pub proc: Proc,
    pub port: u16,
}

impl Gateway {
    pub fn start_on(port: u16, kms_port: u16, dir: &Path, extra: &[&str]) -> Gateway {
        let mut args = vec![
            "--kms".to_string(),
            format!("http://127.0.0.1:{kms_port}"),
            "--listen".into(),
            format!("127.0.0.1:{port}"),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let proc = Proc::spawn(
            gateway_bin(),
            &args,
            dir.join(format!("gw-{port}.log")),
            None,
        );
        let gw = Gateway { proc, port };
        eventually(Duration::from_secs(30), || {
            (http_get(&gw.url("/readyz"), &[]).status == 200).then_some(())
        })
        .unwrap_or_else(|| panic!("gateway not ready: {}", gw.proc.log_text()));
        gw
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }
}

/// An issuer, key service and gateway, like a deployment.
pub struct Stack {
    pub dir: tempfile::TempDir,
    pub kms: Kms,
    pub gw: Gateway,
}

impl Stack {
    /// `issuer_path` is the issuer URL's path, e.g. "/" or "/tenant/a".
    pub fn start(issuer_path: &str, kms_extra: &[&str]) -> Stack {
        let dir = tempfile::tempdir().unwrap();
        let kek = write_kek(dir.path());
        let gw_port = free_port();
        let issuer = format!("http://127.0.0.1:{gw_port}{issuer_path}");
        let kms = Kms::start(&dir.path().join("data"), &kek, &issuer, kms_extra);
        let gw = Gateway::start_on(gw_port, kms.port, dir.path(), &["--refresh-interval", "1s"]);
        Stack { dir, kms, gw }
    }

    /// Fetches discovery, then `jwks_uri`, as a relying party does (mapped onto the gateway port).
    pub fn fetch_jwks(&self) -> (Value, Value) {
        let issuer = &self.kms.issuer;
        let discovery_url = format!(
            "{}/.well-known/openid-configuration",
            issuer.trim_end_matches('/')
        );
        let r = http_get(&discovery_url, &[]);
        assert_eq!(r.status, 200, "discovery");
        let discovery: Value = serde_json::from_slice(&r.body).unwrap();
        let jwks_uri = discovery["jwks_uri"].as_str().unwrap().to_owned();
        let r = http_get(&jwks_uri, &[]);
        assert_eq!(r.status, 200, "jwks");
        (discovery, serde_json::from_slice(&r.body).unwrap())
    }

    /// Waits until the gateway's JWKS holds exactly `kids`.
    pub fn wait_for_gateway_kids(&self, kids: &[String]) -> Value {
        let mut want = kids.to_vec();
        want.sort();
        eventually(Duration::from_secs(20), || {
            let (_, jwks) = self.fetch_jwks();
            (jwks_kids(&jwks) == want).then_some(jwks)
        })
        .unwrap_or_else(|| panic!("gateway never showed {want:?}: {:?}", self.fetch_jwks().1))
    }
}

pub fn jwks_kids(jwks: &Value) -> Vec<String> {
    let mut kids: Vec<String> = jwks["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["kid"].as_str().unwrap().to_owned())
        .collect();
    kids.sort();
    kids
}

pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(10)))
        .build()
        .into()
}

pub fn http(method: &str, url: &str, headers: &[(&str, &str)]) -> HttpResponse {
    let mut req = http::Request::builder().method(method).uri(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    match agent().run(req.body(()).unwrap()) {
        Ok(mut resp) => {
            let status = resp.status().as_u16();
            let headers = resp
                .headers()
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_owned()))
                .collect();
            let mut body = Vec::new();
            if method != "HEAD" {
                resp.body_mut().as_reader().read_to_end(&mut body).unwrap();
            }
            HttpResponse {
                status,
                headers,
                body,
            }
        }
        Err(e) => HttpResponse {
            status: 0,
            headers: vec![],
            body: e.to_string().into_bytes(),
        },
    }
}

pub fn http_get(url: &str, headers: &[(&str, &str)]) -> HttpResponse {
    http("GET", url, headers)
}

/// Verifies `token` with the `jsonwebtoken` crate against a JWKS, as a relying party would.
pub fn verify(token: &str, jwks: &Value, issuer: &str, audience: &str) -> Result<Value, String> {
    use jsonwebtoken::{DecodingKey, Validation, decode, decode_header, jwk::JwkSet};
    let header = decode_header(token).map_err(|e| e.to_string())?;
    let set: JwkSet = serde_json::from_value(jwks.clone()).map_err(|e| e.to_string())?;
    let kid = header.kid.ok_or("no kid")?;
    let jwk = set
        .find(&kid)
        .ok_or_else(|| format!("kid {kid} not in JWKS"))?;
    let key = DecodingKey::from_jwk(jwk).map_err(|e| e.to_string())?;
    let mut validation = Validation::new(header.alg);
    validation.set_issuer(&[issuer]);
    validation.set_audience(&[audience]);
    validation.leeway = 0;
    decode::<Value>(token, &key, &validation)
        .map(|d| d.claims)
        .map_err(|e| e.to_string())
}

/// The decoded JSON of a token's header and payload (no verification).
pub fn token_parts(token: &str) -> (Value, Value) {
    let mut parts = token.split('.');
    let dec = |p: &str| -> Value {
        serde_json::from_slice(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(p)
                .unwrap(),
        )
        .unwrap()
    };
    (dec(parts.next().unwrap()), dec(parts.next().unwrap()))
}

/// SHA-256 over every file (name and bytes) below `dir`, except the lock file.
pub fn tree_digest(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let p = entry.unwrap().path();
            let meta = std::fs::symlink_metadata(&p).unwrap();
            if meta.file_type().is_symlink() {
                let target = std::fs::read_link(&p).unwrap();
                out.push((p.display().to_string(), target.display().to_string().into()));
            } else if p.is_dir() {
                stack.push(p);
            } else if p.file_name().unwrap() != "LOCK" {
                out.push((p.display().to_string(), std::fs::read(&p).unwrap()));
            }
        }
    }
    out.sort();
    out
}
