//! The admin CLI of the `oidc-kms` binary, for machines without grpcurl: a gRPC client of a running
//! key service named by `--kms URL` (default `http://127.0.0.1:50051`).
//!
//! ```text
//! oidc-kms keys list                       ListKeys
//! oidc-kms keys rotate [--prepublish D]    RotateKeys
//! oidc-kms token sign --sub S --aud A ...  SignToken
//! oidc-kms kek generate [--out FILE]       (local: a fresh KEK, no service needed)
//! ```
//!
//! Output is for a person by default; `--json` prints one JSON document on stdout for scripts.
//! `token sign` prints the bare token on stdout (so `$(oidc-kms token sign ...)` is the token) and
//! its key id, expiry and id on stderr. A refused call prints the gRPC status code and message on
//! stderr and exits non-zero ([`run`] lists the codes).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand};
use serde_json::{Value, json};
use tonic::transport::Channel;
use zeroize::Zeroizing;

use crate::clock::rfc3339;
use crate::duration::parse_whole_seconds;
use crate::grpc::client::{self as grpc_client, ClientError, SettingNames, TlsFiles};
use crate::grpc::instrument::code_name;
use crate::grpc::pb::{self, key_service_client::KeyServiceClient};
use crate::keys::Kek;

/// Exit code: the key service refused the call (its status is printed).
pub const EXIT_REFUSED: u8 = 1;
/// Exit code: bad arguments (sysexits `EX_USAGE`).
pub const EXIT_USAGE: u8 = 64;
/// Exit code: the key service cannot be reached (`EX_UNAVAILABLE`).
pub const EXIT_UNAVAILABLE: u8 = 69;
/// Exit code: `kek generate --out` would overwrite a file (`EX_CANTCREAT`).
pub const EXIT_CANTCREAT: u8 = 73;
/// Exit code: reading or writing a local file failed (`EX_IOERR`).
pub const EXIT_IOERR: u8 = 74;

/// How long a call may take: a rotation generates a key (RSA-4096: seconds) and fsyncs.
const CALL_TIMEOUT: Duration = Duration::from_secs(60);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Admin commands. Without one, `oidc-kms` runs the key service.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// List or rotate the signing keys of a running key service.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Have a running key service sign a token.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Make key-encryption keys (local; no key service needed).
    #[command(subcommand)]
    Kek(KekCommand),
}

/// `oidc-kms keys ...`
#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Every key with its state (next, active, previous, retired) and times (ListKeys).
    List {
        /// How to reach the key service.
        #[command(flatten)]
        client: Client,
    },
    /// Rotate now (RotateKeys): the new key signs at once, or after --prepublish.
    Rotate {
        /// Publish the new key this long before it signs (0: it signs at once, as on AKS).
        #[arg(long, default_value = "0s", value_parser = parse_whole_seconds)]
        prepublish: Duration,
        /// How to reach the key service.
        #[command(flatten)]
        client: Client,
    },
}

/// `oidc-kms token ...`
#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Sign a token (SignToken). Prints the token on stdout; its key id, expiry and id on stderr.
    Sign {
        /// The subject (`sub`), e.g. system:serviceaccount:default:app.
        #[arg(long)]
        sub: String,
        /// An audience (`aud`); repeat for several.
        #[arg(long = "aud", required = true)]
        aud: Vec<String>,
        /// Lifetime, e.g. 15m or 1h [default: the service's: 1h, or its maximum if shorter].
        #[arg(long, value_parser = parse_whole_seconds)]
        lifetime: Option<Duration>,
        /// Extra private claims, as a JSON object (may not set iss, sub, aud, exp, nbf, iat, jti).
        #[arg(long)]
        claims: Option<String>,
        /// How to reach the key service.
        #[command(flatten)]
        client: Client,
    },
}

/// `oidc-kms kek ...`
#[derive(Debug, Subcommand)]
pub enum KekCommand {
    /// Print a fresh random 32-byte KEK as base64, or write it to --out with mode 0600.
    Generate {
        /// Write the KEK to this new file (mode 0600) instead of stdout; never overwrites.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Print JSON on stdout: {"kek": ...}, or {"path": ...} with --out.
        #[arg(long)]
        json: bool,
    },
}

/// How to reach the key service, and how to print.
#[derive(Debug, Clone, Args)]
pub struct Client {
    /// The key service's gRPC URL (https:// for TLS).
    #[arg(long, env = "OIDC_KMS_URL", default_value = "http://127.0.0.1:50051")]
    pub kms: String,
    /// With an https:// URL (required then): the CA bundle (PEM) that signed the key service's
    /// certificate.
    #[arg(long, env = "OIDC_KMS_CA_CERT")]
    pub ca_cert: Option<PathBuf>,
    /// With https:// under mutual TLS: this client's certificate chain (PEM).
    #[arg(long, env = "OIDC_KMS_CLIENT_CERT", requires = "client_key")]
    pub client_cert: Option<PathBuf>,
    /// With https:// under mutual TLS: this client's private key (PEM).
    #[arg(long, env = "OIDC_KMS_CLIENT_KEY", requires = "client_cert")]
    pub client_key: Option<PathBuf>,
    /// Print one JSON document on stdout, for scripts.
    #[arg(long)]
    pub json: bool,
}

/// Why a command failed.
#[derive(Debug, thiserror::Error)]
enum Failure {
    #[error("{rpc} failed: {}: {}{hint}", code_name(.status.code() as i32), .status.message())]
    Refused {
        rpc: &'static str,
        status: tonic::Status,
        /// What a connection failure most likely means ("" for the key service's own answers).
        hint: String,
    },
    #[error("cannot reach the key service at {url}: {reason}")]
    Unreachable { url: String, reason: String },
    #[error("{0}")]
    Usage(String),
    #[error("{path}: {reason}")]
    Exists { path: String, reason: String },
    #[error("{0}")]
    Io(String),
}

impl Failure {
    fn exit_code(&self) -> u8 {
        match self {
            // A connection that failed on the call itself (the service went away, or the URL
            // names something that is not the key service as configured) is unreachability.
            Failure::Refused { status, .. } if grpc_client::is_connection_failure(status) => {
                EXIT_UNAVAILABLE
            }
            Failure::Refused { .. } => EXIT_REFUSED,
            Failure::Unreachable { .. } => EXIT_UNAVAILABLE,
            Failure::Usage(_) => EXIT_USAGE,
            Failure::Exists { .. } => EXIT_CANTCREAT,
            Failure::Io(_) => EXIT_IOERR,
        }
    }
}

/// What a command prints.
struct Output {
    /// Zeroized on drop: `kek generate` prints a KEK here.
    stdout: Zeroizing<String>,
    stderr: String,
}

/// Runs an admin command, printing to `out` and `err`. Exit codes: 0 done; 1 the key service
/// refused the call (its status code and message are printed); 64 bad arguments; 69 the key
/// service cannot be reached; 73 `--out` exists; 74 a local file could not be read or written.
pub fn run(command: Command, out: &mut dyn Write, err: &mut dyn Write) -> ExitCode {
    let result = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt.block_on(execute(command)),
        Err(e) => Err(Failure::Io(format!("cannot start the runtime: {e}"))),
    };
    match result {
        Ok(output) => {
            let _ = out.write_all(output.stdout.as_bytes());
            let _ = err.write_all(output.stderr.as_bytes());
            let _ = out.flush();
            ExitCode::SUCCESS
        }
        Err(failure) => {
            let _ = writeln!(err, "oidc-kms: {failure}");
            ExitCode::from(failure.exit_code())
        }
    }
}

async fn execute(command: Command) -> Result<Output, Failure> {
    match command {
        Command::Keys(KeysCommand::List { client }) => {
            let mut c = connect(&client).await?;
            let r = c
                .list_keys(pb::ListKeysRequest {})
                .await
                .map_err(refused("ListKeys", &client.kms))?
                .into_inner();
            Ok(print(
                client.json,
                || keys_json(&r.active_key_id, &r.keys, None),
                || keys_text(&r.active_key_id, &r.keys),
            ))
        }
        Command::Keys(KeysCommand::Rotate { prepublish, client }) => {
            let prepublish_seconds = i64::try_from(prepublish.as_secs())
                .map_err(|_| Failure::Usage("--prepublish: too long".into()))?;
            let mut c = connect(&client).await?;
            let r = c
                .rotate_keys(pb::RotateKeysRequest { prepublish_seconds })
                .await
                .map_err(refused("RotateKeys", &client.kms))?
                .into_inner();
            Ok(print(
                client.json,
                || keys_json(&r.active_key_id, &r.keys, Some(&r.new_key_id)),
                || {
                    let when = if prepublish.is_zero() {
                        "signs now".to_owned()
                    } else {
                        format!(
                            "is published now and signs in {}",
                            crate::duration::format_duration(prepublish)
                        )
                    };
                    format!(
                        "rotated: new key {} {when}; active key {}\n\n{}",
                        r.new_key_id,
                        r.active_key_id,
                        keys_text(&r.active_key_id, &r.keys)
                    )
                },
            ))
        }
        Command::Token(TokenCommand::Sign {
            sub,
            aud,
            lifetime,
            claims,
            client,
        }) => {
            let claims = claims.as_deref().map(parse_claims).transpose()?;
            let lifetime_seconds = match lifetime {
                None => 0,
                Some(d) if d.is_zero() => {
                    return Err(Failure::Usage("--lifetime: must be above 0".into()));
                }
                Some(d) => i64::try_from(d.as_secs())
                    .map_err(|_| Failure::Usage("--lifetime: too long".into()))?,
            };
            let mut c = connect(&client).await?;
            let r = c
                .sign_token(pb::SignTokenRequest {
                    subject: sub,
                    audiences: aud,
                    lifetime_seconds,
                    claims,
                })
                .await
                .map_err(refused("SignToken", &client.kms))?
                .into_inner();
            if client.json {
                return Ok(Output {
                    stdout: json_line(&json!({
                        "token": r.token,
                        "key_id": r.key_id,
                        "expires_at": rfc3339(r.expires_at, 0),
                        "token_id": r.token_id,
                    }))
                    .into(),
                    stderr: String::new(),
                });
            }
            Ok(Output {
                stdout: format!("{}\n", r.token).into(),
                stderr: format!(
                    "key id:     {}\nexpires at: {}\ntoken id:   {}\n",
                    r.key_id,
                    rfc3339(r.expires_at, 0),
                    r.token_id
                ),
            })
        }
        Command::Kek(KekCommand::Generate { out, json }) => kek_generate(out.as_deref(), json),
    }
}

fn refused(rpc: &'static str, url: &str) -> impl FnOnce(tonic::Status) -> Failure {
    move |status| Failure::Refused {
        rpc,
        hint: grpc_client::connection_hint(&status, url, TLS_SETTINGS),
        status,
    }
}

fn print(json: bool, as_json: impl FnOnce() -> Value, as_text: impl FnOnce() -> String) -> Output {
    Output {
        stdout: if json {
            json_line(&as_json())
        } else {
            as_text()
        }
        .into(),
        stderr: String::new(),
    }
}

fn json_line(v: &Value) -> String {
    format!(
        "{}\n",
        serde_json::to_string_pretty(v).expect("JSON serializes")
    )
}

/// The CLI's TLS settings, as named in errors.
const TLS_SETTINGS: SettingNames = SettingNames {
    ca_cert: "--ca-cert",
    client_cert: "--client-cert",
    client_key: "--client-key",
};

async fn connect(client: &Client) -> Result<KeyServiceClient<Channel>, Failure> {
    let unreachable = |reason: String| Failure::Unreachable {
        url: client.kms.clone(),
        reason,
    };
    let tls = TlsFiles {
        ca_cert: client.ca_cert.clone(),
        client_cert: client.client_cert.clone(),
        client_key: client.client_key.clone(),
    };
    let endpoint = grpc_client::endpoint(&client.kms, &tls, TLS_SETTINGS)
        .map_err(|e| match e {
            ClientError::Read { .. } => Failure::Io(e.to_string()),
            e => Failure::Usage(e.to_string()),
        })?
        .connect_timeout(CONNECT_TIMEOUT)
        .timeout(CALL_TIMEOUT);
    let channel = endpoint.connect().await.map_err(|e| {
        let mut reason = e.to_string();
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            let text = s.to_string();
            if !reason.ends_with(&text) {
                reason = format!("{reason}: {text}");
            }
            source = s.source();
        }
        unreachable(reason)
    })?;
    Ok(KeyServiceClient::new(channel))
}

/// `--claims` JSON as the protobuf Struct SignToken takes.
fn parse_claims(text: &str) -> Result<prost_types::Struct, Failure> {
    match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(map)) => Ok(prost_types::Struct {
            fields: map.into_iter().map(|(k, v)| (k, to_proto(v))).collect(),
        }),
        Ok(_) => Err(Failure::Usage("--claims: must be a JSON object".into())),
        Err(e) => Err(Failure::Usage(format!("--claims: not valid JSON: {e}"))),
    }
}

fn to_proto(v: Value) -> prost_types::Value {
    use prost_types::value::Kind;
    let kind = match v {
        Value::Null => Kind::NullValue(0),
        Value::Bool(b) => Kind::BoolValue(b),
        Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(f64::NAN)),
        Value::String(s) => Kind::StringValue(s),
        Value::Array(a) => Kind::ListValue(prost_types::ListValue {
            values: a.into_iter().map(to_proto).collect(),
        }),
        Value::Object(m) => Kind::StructValue(prost_types::Struct {
            fields: m.into_iter().map(|(k, v)| (k, to_proto(v))).collect(),
        }),
    };
    prost_types::Value { kind: Some(kind) }
}

fn state_name(state: i32) -> &'static str {
    match pb::KeyState::try_from(state) {
        Ok(pb::KeyState::Next) => "next",
        Ok(pb::KeyState::Active) => "active",
        Ok(pb::KeyState::Previous) => "previous",
        Ok(pb::KeyState::Retired) => "retired",
        _ => "unspecified",
    }
}

fn time(t: Option<&prost_types::Timestamp>) -> Option<String> {
    t.map(|t| rfc3339(t.seconds, t.nanos))
}

fn keys_json(active: &str, keys: &[pb::KeyInfo], new_key: Option<&str>) -> Value {
    let keys: Vec<Value> = keys
        .iter()
        .map(|k| {
            json!({
                "key_id": k.key_id,
                "state": state_name(k.state),
                "algorithm": k.algorithm,
                "bits": k.bits,
                "created_at": time(k.created_at.as_ref()),
                "activated_at": time(k.activated_at.as_ref()),
                "signs_until": time(k.signs_until.as_ref()),
                "retires_at": time(k.retires_at.as_ref()),
            })
        })
        .collect();
    let mut doc = json!({ "active_key_id": active, "keys": keys });
    if let Some(new_key) = new_key {
        doc["new_key_id"] = json!(new_key);
    }
    doc
}

fn keys_text(active: &str, keys: &[pb::KeyInfo]) -> String {
    let header = [
        "KEY ID",
        "STATE",
        "ALG",
        "BITS",
        "CREATED",
        "ACTIVATED",
        "SIGNS UNTIL",
        "RETIRES AT",
    ];
    let dash = || "-".to_owned();
    let rows: Vec<[String; 8]> = keys
        .iter()
        .map(|k| {
            [
                k.key_id.clone(),
                state_name(k.state).to_owned(),
                k.algorithm.clone(),
                k.bits.to_string(),
                time(k.created_at.as_ref()).unwrap_or_else(dash),
                time(k.activated_at.as_ref()).unwrap_or_else(dash),
                time(k.signs_until.as_ref()).unwrap_or_else(dash),
                time(k.retires_at.as_ref()).unwrap_or_else(dash),
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let line = |cells: &[&str]| -> String {
        let mut l = cells
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ");
        l.truncate(l.trim_end().len());
        l.push('\n');
        l
    };
    let mut text = line(&header);
    for row in &rows {
        text.push_str(&line(&row.each_ref().map(String::as_str)));
    }
    let active = if active.is_empty() { "none" } else { active };
    text.push_str(&format!("active key: {active}\n"));
    text
}

fn kek_generate(out: Option<&Path>, json: bool) -> Result<Output, Failure> {
    let kek = Kek::generate().map_err(|e| Failure::Io(e.to_string()))?;
    let text = kek.to_base64();
    let Some(path) = out else {
        // Built by hand, not through a JSON value, so that no unzeroized copy is left behind
        // (base64 needs no JSON escaping).
        let (before, after) = if json {
            ("{\n  \"kek\": \"", "\"\n}\n")
        } else {
            ("", "\n")
        };
        // Sized up front: a buffer that grew would leave the old copy behind unzeroized.
        let mut stdout = Zeroizing::new(String::with_capacity(
            before.len() + text.len() + after.len(),
        ));
        stdout.push_str(before);
        stdout.push_str(&text);
        stdout.push_str(after);
        return Ok(Output {
            stdout,
            stderr: String::new(),
        });
    };
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::AlreadyExists => Failure::Exists {
            path: path.display().to_string(),
            reason: "already exists; refusing to overwrite a KEK (the keys it seals would be lost)"
                .into(),
        },
        _ => Failure::Io(format!("--out {}: {e}", path.display())),
    })?;
    let io = |e: std::io::Error| Failure::Io(format!("--out {}: {e}", path.display()));
    file.write_all(text.as_bytes())
        .and_then(|()| file.write_all(b"\n"))
        .map_err(io)?;
    file.sync_all().map_err(io)?;
    Ok(if json {
        Output {
            stdout: json_line(&json!({ "path": path.display().to_string() })).into(),
            stderr: String::new(),
        }
    } else {
        Output {
            stdout: Zeroizing::default(),
            stderr: format!(
                "wrote a new KEK to {} (mode 0600); keep it like a root credential, apart from the data directory\n",
                path.display()
            ),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claims_must_be_a_json_object() {
        let s = parse_claims(r#"{"a": 1, "b": {"c": [true, null, "x"]}}"#).unwrap();
        assert_eq!(s.fields.len(), 2);
        assert!(matches!(parse_claims("[1]"), Err(Failure::Usage(m)) if m.contains("object")));
        assert!(
            matches!(parse_claims("{"), Err(Failure::Usage(m)) if m.contains("not valid JSON"))
        );
    }

    #[test]
    fn kek_generate_writes_a_private_file_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kek.b64");
        kek_generate(Some(&path), false).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(Kek::from_base64(&text).is_ok());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let again = kek_generate(Some(&path), false).err().unwrap();
        assert_eq!(again.exit_code(), EXIT_CANTCREAT);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), text);
    }
}
