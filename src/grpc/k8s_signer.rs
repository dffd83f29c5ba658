//! The Kubernetes external JWT signer (KEP-740): kube-apiserver, started with
//! `--service-account-signing-endpoint`, dials this service on a Unix socket to sign every
//! service-account token (`Sign`), to learn the keys it trusts and publishes at its own discovery
//! endpoints (`FetchKeys`), and, once at start, our maximum token lifetime (`Metadata`).
//!
//! Kubernetes 1.32–1.33 call the service under the proto package `v1alpha1`, 1.34 and later under
//! `v1`, with identical messages; [`K8sSigner`] serves both from one implementation. It is a thin
//! adapter: the claim checks and the signing itself are
//! [`KeyManager::sign_encoded_claims_blocking`], which signs `header + "." + claims` exactly as
//! received.
//!
//! The socket ([`SignerSocket::bind`]) is mode 0600 from the moment anyone can connect to it,
//! replaces a stale socket file, refuses one another process still listens on, and is removed when
//! the server stops.

use std::future::Future;
use std::io;
use std::os::unix::fs::{DirBuilderExt as _, FileTypeExt as _, MetadataExt as _, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::net::{UnixListener, UnixStream};
use tonic::transport::Server;
use tonic::{Request, Response, Status};

use super::audit::{self, AuditRecord};
use super::caller::Caller;
use super::deadline::deadline_of;
use super::server::MAX_REQUEST_BYTES;
use super::{k8s_v1, k8s_v1alpha1};
use crate::clock::Timestamp;
use crate::error::Error;
use crate::key_manager::{ExternalSignature, KeyManager};
use crate::lifecycle::Keyring;
use crate::net::accept::Incoming;

/// How long [`SignerSocket::bind`] waits for an existing socket to accept a connection.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// The `ExternalJWTSigner` service, for both package versions.
#[derive(Debug, Clone)]
pub struct K8sSigner {
    manager: KeyManager,
}

/// One public key as `FetchKeys` carries it.
struct PublicKey {
    kid: String,
    spki_der: Vec<u8>,
}

/// The `FetchKeys` answer, independent of the package version.
struct KeySnapshot {
    keys: Vec<PublicKey>,
    data_timestamp: prost_types::Timestamp,
    refresh_hint_seconds: i64,
}

/// When the published set last changed: the snapshot's time (`changed_at`), or a later retirement
/// that took a key out of the published set before the scheduler committed a snapshot without it.
fn published_changed_at(keyring: &Keyring, changed_at: Timestamp, now: Timestamp) -> Timestamp {
    keyring
        .records()
        .iter()
        .filter_map(|r| r.retires_at)
        .filter(|t| *t <= now)
        .fold(changed_at, Timestamp::max)
}

impl K8sSigner {
    /// A signer over `manager`.
    pub fn new(manager: KeyManager) -> Self {
        K8sSigner { manager }
    }

    /// Signs on the signing pool, and writes the audit record.
    async fn sign_claims(
        &self,
        rpc: &str,
        caller: &Caller,
        claims: String,
        deadline: Option<std::time::Instant>,
    ) -> Result<ExternalSignature, Status> {
        let (sub, aud, jti, exp) = audit::claims_facts(&claims);
        let started = std::time::Instant::now();
        let result = self
            .manager
            .sign_encoded_claims(claims, deadline)
            .await
            .map_err(Status::from);
        if let Ok(signed) = &result
            && let Some(key) = self.manager.key_set().keyring.get(&signed.kid)
        {
            crate::metrics::record_signature(
                key.spec.jws_algorithm(),
                &signed.kid,
                started.elapsed(),
            );
        }
        let record = AuditRecord {
            rpc,
            kid: result.as_ref().ok().map(|s| s.kid.as_str()),
            sub: sub.as_deref(),
            aud,
            jti: jti.as_deref(),
            exp,
        };
        audit::record(
            caller,
            &record,
            result.as_ref().map(|_| ()).map_err(Status::code),
        );
        result
    }

    fn key_snapshot(&self) -> Result<KeySnapshot, Error> {
        let set = self.manager.key_set();
        let now = self.manager.now();
        let keys: Vec<PublicKey> = set
            .published(now)
            .into_iter()
            .map(|(record, live)| PublicKey {
                kid: record.kid.clone(),
                spki_der: live.signer.public_key().spki_der().to_vec(),
            })
            .collect();
        // kube-apiserver treats an empty set as an error; say so plainly instead.
        if keys.is_empty() {
            return Err(Error::NoActiveKey);
        }
        let hint = self.manager.published().cache_max_age.as_secs().max(1);
        Ok(KeySnapshot {
            keys,
            data_timestamp: published_changed_at(&set.keyring, set.changed_at, now)
                .to_system_time()
                .into(),
            refresh_hint_seconds: i64::try_from(hint).unwrap_or(i64::MAX),
        })
    }

    fn max_token_expiration_seconds(&self) -> i64 {
        let max = self.manager.settings().policy.max_token_lifetime;
        i64::try_from(max.as_secs()).unwrap_or(i64::MAX)
    }
}

/// Implements one package version's generated service trait over [`K8sSigner`].
macro_rules! external_jwt_signer {
    ($pb:ident, $package:literal) => {
        #[tonic::async_trait]
        impl $pb::external_jwt_signer_server::ExternalJwtSigner for K8sSigner {
            async fn sign(
                &self,
                request: Request<$pb::SignJwtRequest>,
            ) -> Result<Response<$pb::SignJwtResponse>, Status> {
                let caller = Caller::of(&request);
                let deadline = deadline_of(&request);
                let rpc = concat!($package, ".ExternalJWTSigner/Sign");
                let signed = self
                    .sign_claims(rpc, &caller, request.into_inner().claims, deadline)
                    .await?;
                Ok(Response::new($pb::SignJwtResponse {
                    header: signed.header,
                    signature: signed.signature,
                }))
            }

            async fn fetch_keys(
                &self,
                _request: Request<$pb::FetchKeysRequest>,
            ) -> Result<Response<$pb::FetchKeysResponse>, Status> {
                let snapshot = self.key_snapshot()?;
                Ok(Response::new($pb::FetchKeysResponse {
                    keys: snapshot
                        .keys
                        .into_iter()
                        .map(|k| $pb::Key {
                            key_id: k.kid,
                            key: k.spki_der,
                            exclude_from_oidc_discovery: false,
                        })
                        .collect(),
                    data_timestamp: Some(snapshot.data_timestamp),
                    refresh_hint_seconds: snapshot.refresh_hint_seconds,
                }))
            }

            async fn metadata(
                &self,
                _request: Request<$pb::MetadataRequest>,
            ) -> Result<Response<$pb::MetadataResponse>, Status> {
                Ok(Response::new($pb::MetadataResponse {
                    max_token_expiration_seconds: self.max_token_expiration_seconds(),
                }))
            }
        }
    };
}

external_jwt_signer!(k8s_v1alpha1, "v1alpha1");
external_jwt_signer!(k8s_v1, "v1");

/// The signer socket could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    /// Another process accepts connections on the socket.
    #[error("{}: another process is listening on this socket; stop it or choose another path", path.display())]
    InUse {
        /// The socket path.
        path: PathBuf,
    },
    /// Something other than a socket is at the path.
    #[error("{}: exists and is not a socket; refusing to replace it", path.display())]
    NotASocket {
        /// The path.
        path: PathBuf,
    },
    /// The directory the socket goes in is not there.
    #[error("{}: the socket's directory does not exist (or is not a directory); create it first", path.display())]
    NoDirectory {
        /// The directory.
        path: PathBuf,
    },
    /// A file-system or socket call failed.
    #[error("{}: {action}: {source}", path.display())]
    Io {
        /// The path involved.
        path: PathBuf,
        /// What was being done.
        action: &'static str,
        /// The cause.
        source: io::Error,
    },
}

fn io_error(path: &Path, action: &'static str) -> impl FnOnce(io::Error) -> BindError {
    move |source| BindError::Io {
        path: path.to_path_buf(),
        action,
        source,
    }
}

/// The signer's listening Unix socket, mode 0600. Its file is removed when this is dropped (after
/// [`serve`] returns), unless another socket has taken the path since.
#[derive(Debug)]
pub struct SignerSocket {
    listener: UnixListener,
    file: SocketFile,
}

/// The socket file we bound, identified by device and inode.
#[derive(Debug)]
struct SocketFile {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        let ours = std::fs::symlink_metadata(&self.path)
            .is_ok_and(|m| m.dev() == self.dev && m.ino() == self.ino);
        if ours && let Err(e) = std::fs::remove_file(&self.path) {
            tracing::warn!(path = %self.path.display(), error = %e, "could not remove the signer socket file");
        }
    }
}

/// Fails unless nothing is at `path` or only a stale socket file (one nobody listens on) is;
/// says which (`true`: a stale socket).
async fn check_replaceable(path: &Path) -> Result<bool, BindError> {
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(io_error(path, "cannot inspect the existing file")(e)),
        Ok(meta) if !meta.file_type().is_socket() => {
            return Err(BindError::NotASocket {
                path: path.to_path_buf(),
            });
        }
        Ok(_) => {}
    }
    match tokio::time::timeout(PROBE_TIMEOUT, UnixStream::connect(path)).await {
        // Connected, or a listener too busy to accept: either way someone else serves here.
        Ok(Ok(_)) | Err(_) => Err(BindError::InUse {
            path: path.to_path_buf(),
        }),
        Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionRefused => Ok(true),
        Ok(Err(e)) => Err(io_error(path, "cannot probe the existing socket")(e)),
    }
}

impl SignerSocket {
    /// Binds the socket at `path`, mode 0600.
    ///
    /// The socket is bound in a fresh private directory (mode 0700) beside `path`, made 0600, and
    /// only then renamed into place: a socket bound straight at `path` would carry the umask's mode
    /// until a chmod, and a connection accepted in between would outlive the chmod. The rename also
    /// replaces a stale socket file atomically. Must be called within a Tokio runtime.
    pub async fn bind(path: &Path) -> Result<SignerSocket, BindError> {
        let parent = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        if path.file_name().is_none() {
            return Err(io_error(path, "the socket path must name a file")(
                io::ErrorKind::InvalidInput.into(),
            ));
        }
        if !parent.is_dir() {
            return Err(BindError::NoDirectory {
                path: parent.to_path_buf(),
            });
        }
        if check_replaceable(path).await? {
            tracing::info!(path = %path.display(), "replacing a stale signer socket file");
        }
        // A short random name (Unix socket paths are limited to about 107 bytes); creating it
        // fails rather than reuses a directory that is already there.
        let mut tag = [0u8; 4];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut tag)
            .map_err(|_| io_error(path, "no randomness")(io::Error::other("getrandom failed")))?;
        let tag: String = tag.iter().map(|b| format!("{b:02x}")).collect();
        let staging = parent.join(format!(".oks-{tag}"));
        let staged = staging.join("s");
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&staging)
            .map_err(io_error(&staging, "cannot create a private directory"))?;
        let placed = Self::bind_staged(&staged, path).await;
        let _ = std::fs::remove_file(&staged);
        let _ = std::fs::remove_dir(&staging);
        let listener = placed?;
        let meta = std::fs::symlink_metadata(path).map_err(io_error(path, "cannot stat"))?;
        Ok(SignerSocket {
            listener,
            file: SocketFile {
                path: path.to_path_buf(),
                dev: meta.dev(),
                ino: meta.ino(),
            },
        })
    }

    async fn bind_staged(staged: &Path, path: &Path) -> Result<UnixListener, BindError> {
        let listener = UnixListener::bind(staged).map_err(io_error(staged, "cannot bind"))?;
        std::fs::set_permissions(staged, std::fs::Permissions::from_mode(0o600))
            .map_err(io_error(staged, "cannot chmod 600"))?;
        // Again, just before taking the path: another signer may have started meanwhile.
        check_replaceable(path).await?;
        std::fs::rename(staged, path)
            .map_err(io_error(path, "cannot move the socket into place"))?;
        Ok(listener)
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.file.path
    }
}

/// Serves both `ExternalJWTSigner` versions on `socket` until `shutdown` resolves, then removes
/// the socket file.
pub async fn serve(
    manager: KeyManager,
    socket: SignerSocket,
    shutdown: impl Future<Output = ()>,
) -> Result<(), tonic::transport::Error> {
    let SignerSocket { listener, file } = socket;
    let signer = K8sSigner::new(manager);
    let served = Server::builder()
        .http2_keepalive_interval(Some(super::KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(super::KEEPALIVE_INTERVAL))
        .layer(super::instrument::InstrumentLayer)
        .add_service(
            k8s_v1alpha1::external_jwt_signer_server::ExternalJwtSignerServer::new(signer.clone())
                .max_decoding_message_size(MAX_REQUEST_BYTES),
        )
        .add_service(
            k8s_v1::external_jwt_signer_server::ExternalJwtSignerServer::new(signer)
                .max_decoding_message_size(MAX_REQUEST_BYTES),
        )
        .serve_with_incoming_shutdown(
            Incoming::new(listener, "Kubernetes signer socket", super::IDLE_TIMEOUT),
            shutdown,
        )
        .await;
    drop(file);
    served
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::KeySpec;

    #[test]
    fn data_timestamp_moves_when_a_key_leaves_before_the_snapshot_is_renewed() {
        let t = Timestamp::from_secs;
        let hour = Duration::from_secs(3600);
        let mut ring = Keyring::new("k1".into(), KeySpec::P256, t(100), hour);
        ring.add_key("k2".into(), KeySpec::P256, t(200), t(200), hour);
        // k1 signs until 200 and leaves the published set at 200 + 1 h.
        let changed = t(200);
        assert_eq!(published_changed_at(&ring, changed, t(300)), changed);
        assert_eq!(published_changed_at(&ring, changed, t(3799)), changed);
        assert_eq!(published_changed_at(&ring, changed, t(3900)), t(3800));
        assert_eq!(published_changed_at(&ring, t(3850), t(3900)), t(3850));
    }

    #[tokio::test]
    async fn binds_private_replaces_stale_refuses_live_and_cleans_up() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("signer.sock");

        // A stale socket file: bound, then its listener dropped.
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        let socket = SignerSocket::bind(&path).await.unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);

        // Live: a second bind is refused and leaves the first in place.
        let err = SignerSocket::bind(&path).await.unwrap_err();
        assert!(matches!(err, BindError::InUse { .. }), "{err}");
        assert!(path.exists());
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            1,
            "no staging directory left behind"
        );

        drop(socket);
        assert!(!path.exists(), "removed on drop");

        std::fs::write(&path, b"not a socket").unwrap();
        let err = SignerSocket::bind(&path).await.unwrap_err();
        assert!(matches!(err, BindError::NotASocket { .. }), "{err}");
    }

    #[tokio::test]
    async fn drop_leaves_a_socket_that_replaced_ours_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let socket = SignerSocket::bind(&path).await.unwrap();
        std::fs::remove_file(&path).unwrap();
        let _other = std::os::unix::net::UnixListener::bind(&path).unwrap();
        drop(socket);
        assert!(path.exists());
    }
}
