//! The sealed file store: one data directory holding `keyring.json` (every live key's lifecycle
//! record and its sealed private key) and a `LOCK` file held by the running process.
//!
//! Each private key is sealed on its own (AES-256-GCM, key id as associated data); the whole file
//! carries an HMAC under a KEK subkey, so any change to any byte — a time, a state, a record moved
//! — is caught, and a KEK check value tells a wrong KEK apart from an altered file. When the HMAC
//! fails, the records are examined to say what was done: a sealed key that opens only under another
//! record's kid is a swap ([`StoreError::Swapped`]), one that opens under no kid an altered key, and
//! otherwise some other field changed.
//!
//! Every commit is written to a temp file, fsynced, renamed over the old file and the directory
//! fsynced: the store is always either the old keyring or the new one. A failure before the rename
//! leaves the old file untouched. A failure of the directory fsync after it (the new file may or may
//! not survive a crash) puts the previous keyring back the same way; if even that fails, the store
//! cannot say what is on disk and refuses every later commit ([`StoreError::Indeterminate`]).

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use ring::hmac;
use serde::{Deserialize, Serialize};

use crate::clock::Timestamp;
use crate::lifecycle::{KeyRecord, Keyring};
use crate::strict_json::{self, StrictJsonError};
use crate::token::LIFETIME_CEILING;

use super::kek::Kek;
use super::seal::{SealedKey, Sealer};
use super::signer::Signer;
use super::software_key::SoftwareKey;
use super::spec::KeySpec;
use super::store::{KeyStore, LoadedKeys, StoreError};

/// The keyring file's name inside the data directory.
pub const KEYRING_FILE: &str = "keyring.json";
const FILE_NAME: &str = KEYRING_FILE;
const TEMP_NAME: &str = "keyring.json.tmp";
const LOCK_NAME: &str = "LOCK";
const FORMAT: &str = "oidc-kms-keyring";
const VERSION: u32 = 1;

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StoreFile {
    format: String,
    version: u32,
    /// Derived from the KEK; tells "wrong KEK" from "altered file".
    kek_check: String,
    keys: Vec<StoredKey>,
    /// The last few retired keys: their lifecycle records only, no key material.
    #[serde(default)]
    retired: Vec<RetiredKey>,
    /// HMAC-SHA256 over this structure serialized with `mac` empty.
    mac: String,
}

/// What the MAC of a store written before the retired-key history existed covers: the same file
/// without its `retired` member. Such files are still read (same format version).
#[derive(Serialize)]
struct StoreFileBeforeHistory<'a> {
    format: &'a str,
    version: u32,
    kek_check: &'a str,
    keys: &'a [StoredKey],
    mac: &'a str,
}

#[derive(Serialize, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
struct RetiredKey {
    kid: String,
    spec: String,
    created_at_ms: i64,
    activates_at_ms: i64,
    signs_until_ms: Option<i64>,
    retires_at_ms: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    max_lifetime_ms: Option<i64>,
}

#[derive(Serialize, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
struct StoredKey {
    kid: String,
    spec: String,
    created_at_ms: i64,
    activates_at_ms: i64,
    signs_until_ms: Option<i64>,
    retires_at_ms: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    max_lifetime_ms: Option<i64>,
    nonce: String,
    sealed_pkcs8: String,
}

/// A record's longest token lifetime; stores written before records kept it get the 24 h ceiling,
/// the one guess that never unpublishes a key too early.
fn lifetime_of(ms: Option<i64>) -> Duration {
    ms.map_or(LIFETIME_CEILING, |ms| {
        Duration::from_millis(ms.max(0) as u64)
    })
}

/// A key store in a directory on disk, sealed under a KEK.
pub struct FileStore {
    dir: PathBuf,
    /// Held (with an exclusive advisory lock) for as long as the store is open.
    _lock: File,
    sealer: Sealer,
    mac_key: hmac::Key,
    kek_check: String,
    /// Sealed keys by kid: the committed ones plus those generated since the last commit.
    sealed: HashMap<String, (KeySpec, SealedKey)>,
    /// The bytes of the keyring file as last read or durably written, to put back when a commit
    /// cannot be made durable after its rename. `None` before the first load or commit.
    on_disk: Option<Vec<u8>>,
    /// Set when a failed commit could not be undone: what is on disk is then unknown.
    indeterminate: bool,
    /// Test hook: makes steps of the atomic write fail, as a full, read-only or failing disk would.
    #[cfg(test)]
    fault: Arc<std::sync::Mutex<Option<Fault>>>,
}

/// A failure a test injects: the next `times` occurrences of step `at` fail with `kind`.
#[cfg(test)]
#[derive(Debug, Clone, Copy)]
struct Fault {
    at: WriteStep,
    kind: std::io::ErrorKind,
    times: u32,
}

/// The steps of an atomic write, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WriteStep {
    Create,
    Write,
    SyncFile,
    Rename,
    SyncDir,
}

impl std::fmt::Debug for FileStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileStore")
            .field("dir", &self.dir)
            .field("keys", &self.sealed.len())
            .finish_non_exhaustive()
    }
}

fn io_err(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> StoreError {
    let path = path.to_path_buf();
    move |source| StoreError::Io {
        action,
        path,
        source,
    }
}

impl FileStore {
    /// Opens (creating if needed) the data directory and takes its lock. Reads nothing yet.
    pub fn open(dir: impl Into<PathBuf>, kek: &Kek) -> Result<Self, StoreError> {
        let dir = dir.into();
        if !dir.exists() {
            fs::create_dir_all(&dir).map_err(io_err("create the data directory", &dir))?;
            restrict(&dir, 0o700);
        }
        let lock_path = dir.join(LOCK_NAME);
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io_err("open the lock file", &lock_path))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => return Err(StoreError::Locked(dir)),
            Err(fs::TryLockError::Error(e)) => return Err(io_err("lock", &lock_path)(e)),
        }
        Ok(FileStore {
            sealer: Sealer::new(kek),
            mac_key: hmac::Key::new(hmac::HMAC_SHA256, &kek.derive(b"keyring mac")[..]),
            kek_check: B64.encode(&kek.derive(b"kek check value")[..]),
            sealed: HashMap::new(),
            on_disk: None,
            indeterminate: false,
            #[cfg(test)]
            fault: Arc::default(),
            dir,
            _lock: lock,
        })
    }

    /// Fails as the test hook says; nothing in a normal build.
    fn step(&self, _step: WriteStep) -> std::io::Result<()> {
        #[cfg(test)]
        if let Some(fault) = self
            .fault
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .as_mut()
            .filter(|f| f.at == _step && f.times > 0)
        {
            fault.times -= 1;
            return Err(std::io::Error::new(fault.kind, "injected by a test"));
        }
        Ok(())
    }

    /// Temp file, fsync, rename over the keyring, fsync the directory. Returns the error and
    /// whether the rename had happened.
    fn write_atomically(&self, bytes: &[u8]) -> Result<(), (StoreError, bool)> {
        let tmp = self.dir.join(TEMP_NAME);
        let target = self.dir.join(FILE_NAME);
        let before_rename = (|| {
            self.step(WriteStep::Create)
                .and_then(|()| {
                    // A leftover temp file (or a link planted in its place) goes; the new one is
                    // created afresh, owner-only from its first byte, never through a link.
                    match fs::remove_file(&tmp) {
                        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                        _ => {}
                    }
                    OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .mode(0o600)
                        .open(&tmp)
                })
                .map_err(io_err("create", &tmp))
                .and_then(|mut f| {
                    self.step(WriteStep::Write)
                        .and_then(|()| f.write_all(bytes))
                        .map_err(io_err("write", &tmp))?;
                    self.step(WriteStep::SyncFile)
                        .and_then(|()| f.sync_all())
                        .map_err(io_err("fsync", &tmp))
                })?;
            self.step(WriteStep::Rename)
                .and_then(|()| fs::rename(&tmp, &target))
                .map_err(io_err("rename into place", &target))
        })();
        if let Err(e) = before_rename {
            let _ = fs::remove_file(&tmp);
            return Err((e, false));
        }
        self.step(WriteStep::SyncDir)
            .and_then(|()| File::open(&self.dir).and_then(|d| d.sync_all()))
            .map_err(|e| (io_err("fsync the data directory", &self.dir)(e), true))
    }

    /// The path of the keyring file.
    pub fn keyring_path(&self) -> PathBuf {
        self.dir.join(FILE_NAME)
    }

    /// What the MAC covers: the file serialized with its `mac` member empty.
    fn mac_input(file: &mut StoreFile) -> Vec<u8> {
        let saved = std::mem::take(&mut file.mac);
        let bytes = serde_json::to_vec(&*file).expect("store file serializes");
        file.mac = saved;
        bytes
    }

    /// Whether `tag` is the MAC of `file`, as this version writes it or, for a file with no
    /// retired keys, as versions before the retired-key history wrote it.
    fn mac_matches(&self, file: &mut StoreFile, tag: &[u8]) -> bool {
        if hmac::verify(&self.mac_key, &Self::mac_input(file), tag).is_ok() {
            return true;
        }
        let before_history = StoreFileBeforeHistory {
            format: &file.format,
            version: file.version,
            kek_check: &file.kek_check,
            keys: &file.keys,
            mac: "",
        };
        file.retired.is_empty()
            && serde_json::to_vec(&before_history)
                .is_ok_and(|bytes| hmac::verify(&self.mac_key, &bytes, tag).is_ok())
    }

    fn parse(&self, path: &Path, bytes: &[u8]) -> Result<StoreFile, StoreError> {
        let damaged = |reason: String| StoreError::Damaged {
            path: path.to_path_buf(),
            reason,
        };
        if bytes.is_empty() {
            return Err(damaged("the file is empty".into()));
        }
        // A member named twice would be read one way by us and another by the next tool.
        let value: serde_json::Value = strict_json::from_slice(bytes).map_err(|e| match e {
            StrictJsonError::Duplicate(e) => StoreError::Altered {
                path: path.to_path_buf(),
                reason: format!("a JSON {e}"),
            },
            StrictJsonError::Invalid(e) => damaged(format!("truncated or not JSON: {e}")),
        })?;
        if value.get("format").and_then(|f| f.as_str()) != Some(FORMAT) {
            return Err(damaged(format!("not an {FORMAT} file")));
        }
        let version = value.get("version").and_then(|v| v.as_u64());
        match version {
            Some(v) if v == u64::from(VERSION) => {}
            Some(found) => {
                return Err(StoreError::UnsupportedVersion {
                    path: path.to_path_buf(),
                    found,
                    supported: VERSION,
                });
            }
            None => return Err(damaged("no format version".into())),
        }
        serde_json::from_value(value).map_err(|e| damaged(format!("unexpected structure: {e}")))
    }
}

/// Best effort: keep the data directory and the keyring private to the service's user.
fn restrict(path: &Path, mode: u32) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let _ = fs::set_permissions(path, fs::Permissions::from_mode(mode));
    }
}

fn decode(field: &str, text: &str, path: &Path) -> Result<Vec<u8>, StoreError> {
    B64.decode(text).map_err(|_| StoreError::Altered {
        path: path.to_path_buf(),
        reason: format!("{field} is not base64url"),
    })
}

impl FileStore {
    /// The integrity check failed: say what was done to the file, as far as the records tell.
    fn what_was_altered(&self, file: &StoreFile, path: PathBuf) -> StoreError {
        let altered = |reason: String| StoreError::Altered {
            path: path.clone(),
            reason,
        };
        for stored in &file.keys {
            let record = match (B64.decode(&stored.nonce), B64.decode(&stored.sealed_pkcs8)) {
                (Ok(nonce), Ok(ciphertext)) => match <[u8; 12]>::try_from(nonce) {
                    Ok(nonce) => SealedKey { nonce, ciphertext },
                    Err(_) => {
                        return altered(format!("the nonce of key {} was changed", stored.kid));
                    }
                },
                _ => return altered(format!("the sealed key {} is not base64url", stored.kid)),
            };
            if self.sealer.open(&stored.kid, &record).is_ok() {
                continue;
            }
            // Does it open as another record's key, with its own nonce or that record's?
            let opens_as = |other: &StoredKey| {
                let other_nonce = B64
                    .decode(&other.nonce)
                    .ok()
                    .and_then(|n| <[u8; 12]>::try_from(n).ok());
                [Some(record.nonce), other_nonce]
                    .into_iter()
                    .flatten()
                    .any(|nonce| {
                        let moved = SealedKey {
                            nonce,
                            ciphertext: record.ciphertext.clone(),
                        };
                        self.sealer.open(&other.kid, &moved).is_ok()
                    })
            };
            return match file
                .keys
                .iter()
                .find(|other| other.kid != stored.kid && opens_as(other))
            {
                Some(owner) => StoreError::Swapped {
                    path,
                    stored_under: stored.kid.clone(),
                    belongs_to: owner.kid.clone(),
                },
                None => altered(format!("the sealed key {} was changed", stored.kid)),
            };
        }
        altered(
            "integrity check (HMAC) failed: a time, a state or another field was changed".into(),
        )
    }

    /// The directory fsync after a rename failed: the new keyring may or may not survive a crash,
    /// so the previous one is put back the same way, and the commit fails with `cause`. If the
    /// previous keyring cannot be put back, nothing more is written until a restart reads the file.
    fn undo_rename(&mut self, cause: StoreError) -> StoreError {
        let restored = match self.on_disk.take() {
            Some(previous) => {
                let result = self.write_atomically(&previous).is_ok();
                self.on_disk = Some(previous);
                result
            }
            // The first commit of a new store: without it the store is simply empty again.
            None => {
                fs::remove_file(self.keyring_path()).is_ok()
                    && File::open(&self.dir).and_then(|d| d.sync_all()).is_ok()
            }
        };
        if restored {
            return cause;
        }
        self.indeterminate = true;
        tracing::error!(error = %cause, "the key store could not be made durable nor put back; it refuses every write until oidc-kms is restarted");
        self.indeterminate_error()
    }

    fn indeterminate_error(&self) -> StoreError {
        StoreError::Indeterminate {
            path: self.keyring_path(),
        }
    }
}

impl KeyStore for FileStore {
    fn load(&mut self) -> Result<Option<LoadedKeys>, StoreError> {
        let path = self.keyring_path();
        // Commits replace the file by rename, which would replace a link with a file; and a link
        // to a missing file (an unmounted volume) must not look like a new, empty store.
        if fs::symlink_metadata(&path).is_ok_and(|m| m.file_type().is_symlink()) {
            return Err(StoreError::Damaged {
                path,
                reason: "it is a symbolic link; point --data-dir at the directory that holds \
                         the real file"
                    .into(),
            });
        }
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err("read", &path)(e)),
        };
        let mut file = self.parse(&path, &bytes)?;
        if file.kek_check != self.kek_check {
            return Err(StoreError::WrongKek { path });
        }
        let tag = B64.decode(&file.mac).unwrap_or_default();
        if !self.mac_matches(&mut file, &tag) {
            return Err(self.what_was_altered(&file, path));
        }
        let altered = |reason: String| StoreError::Altered {
            path: path.clone(),
            reason,
        };
        let mut records = Vec::with_capacity(file.keys.len());
        let mut signers: Vec<Arc<dyn Signer>> = Vec::with_capacity(file.keys.len());
        let mut sealed = HashMap::new();
        for stored in &file.keys {
            let spec: KeySpec = stored.spec.parse().map_err(&altered)?;
            let nonce: [u8; 12] = decode("nonce", &stored.nonce, &path)?
                .try_into()
                .map_err(|_| altered(format!("nonce of key {} is not 12 bytes", stored.kid)))?;
            let record = SealedKey {
                nonce,
                ciphertext: decode("sealed_pkcs8", &stored.sealed_pkcs8, &path)?,
            };
            let pkcs8 = self
                .sealer
                .open(&stored.kid, &record)
                .map_err(|_| altered(format!("sealed key {} does not open", stored.kid)))?;
            let key = SoftwareKey::from_pkcs8(spec, &pkcs8)?;
            if key.kid() != stored.kid {
                return Err(altered(format!(
                    "record {} holds the key of another kid",
                    stored.kid
                )));
            }
            records.push(KeyRecord {
                kid: stored.kid.clone(),
                spec,
                created_at: Timestamp::from_millis(stored.created_at_ms),
                activates_at: Timestamp::from_millis(stored.activates_at_ms),
                signs_until: stored.signs_until_ms.map(Timestamp::from_millis),
                retires_at: stored.retires_at_ms.map(Timestamp::from_millis),
                max_lifetime: lifetime_of(stored.max_lifetime_ms),
            });
            signers.push(Arc::new(key));
            sealed.insert(stored.kid.clone(), (spec, record));
        }
        let mut retired = Vec::with_capacity(file.retired.len());
        for r in &file.retired {
            retired.push(KeyRecord {
                kid: r.kid.clone(),
                spec: r.spec.parse().map_err(&altered)?,
                created_at: Timestamp::from_millis(r.created_at_ms),
                activates_at: Timestamp::from_millis(r.activates_at_ms),
                signs_until: r.signs_until_ms.map(Timestamp::from_millis),
                retires_at: Some(Timestamp::from_millis(r.retires_at_ms)),
                max_lifetime: lifetime_of(r.max_lifetime_ms),
            });
        }
        let keyring = Keyring::from_records(records)
            .and_then(|k| k.with_retired(retired))
            .map_err(|e| StoreError::Damaged {
                path: path.clone(),
                reason: e.to_string(),
            })?;
        // Signers in keyring order.
        let signers = keyring
            .records()
            .iter()
            .map(|r| {
                signers
                    .iter()
                    .find(|s| s.kid() == r.kid)
                    .cloned()
                    .expect("each record has a signer")
            })
            .collect();
        self.sealed = sealed;
        self.on_disk = Some(bytes);
        Ok(Some(LoadedKeys { keyring, signers }))
    }

    fn generate(&mut self, spec: KeySpec) -> Result<Arc<dyn Signer>, StoreError> {
        if self.indeterminate {
            return Err(self.indeterminate_error());
        }
        let (key, pkcs8) = SoftwareKey::generate(spec)?;
        let sealed = self.sealer.seal(key.kid(), &pkcs8)?;
        self.sealed.insert(key.kid().to_owned(), (spec, sealed));
        Ok(Arc::new(key))
    }

    fn commit(&mut self, keyring: &Keyring) -> Result<(), StoreError> {
        if self.indeterminate {
            return Err(self.indeterminate_error());
        }
        let mut keys = Vec::with_capacity(keyring.records().len());
        for r in keyring.records() {
            let (_, sealed) = self.sealed.get(&r.kid).ok_or_else(|| StoreError::Damaged {
                path: self.keyring_path(),
                reason: format!("key {} is not held by this store", r.kid),
            })?;
            keys.push(StoredKey {
                kid: r.kid.clone(),
                spec: r.spec.to_string(),
                created_at_ms: r.created_at.as_millis(),
                activates_at_ms: r.activates_at.as_millis(),
                signs_until_ms: r.signs_until.map(Timestamp::as_millis),
                retires_at_ms: r.retires_at.map(Timestamp::as_millis),
                max_lifetime_ms: Some(
                    i64::try_from(r.max_lifetime.as_millis()).unwrap_or(i64::MAX),
                ),
                nonce: B64.encode(sealed.nonce),
                sealed_pkcs8: B64.encode(&sealed.ciphertext),
            });
        }
        let retired = keyring
            .retired()
            .iter()
            .map(|r| RetiredKey {
                kid: r.kid.clone(),
                spec: r.spec.to_string(),
                created_at_ms: r.created_at.as_millis(),
                activates_at_ms: r.activates_at.as_millis(),
                signs_until_ms: r.signs_until.map(Timestamp::as_millis),
                retires_at_ms: r.retires_at.map_or(0, Timestamp::as_millis),
                max_lifetime_ms: Some(
                    i64::try_from(r.max_lifetime.as_millis()).unwrap_or(i64::MAX),
                ),
            })
            .collect();
        let mut file = StoreFile {
            format: FORMAT.into(),
            version: VERSION,
            kek_check: self.kek_check.clone(),
            keys,
            retired,
            mac: String::new(),
        };
        file.mac = B64.encode(hmac::sign(&self.mac_key, &Self::mac_input(&mut file)));
        let mut bytes = serde_json::to_vec_pretty(&file).expect("store file serializes");
        bytes.push(b'\n');
        match self.write_atomically(&bytes) {
            Ok(()) => self.on_disk = Some(bytes),
            Err((e, false)) => return Err(e),
            Err((e, true)) => return Err(self.undo_rename(e)),
        }
        // Keys the keyring no longer names are gone from disk now; forget them here too.
        self.sealed
            .retain(|kid, _| keyring.records().iter().any(|r| &r.kid == kid));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> Timestamp {
        Timestamp::from_secs(1_700_000_000)
    }

    fn new_store(dir: &Path, kek: &Kek) -> (FileStore, Keyring) {
        let mut store = FileStore::open(dir, kek).unwrap();
        assert!(store.load().unwrap().is_none());
        let key = store.generate(KeySpec::P256).unwrap();
        let ring = Keyring::new(key.kid().to_owned(), KeySpec::P256, now(), LIFETIME_CEILING);
        store.commit(&ring).unwrap();
        (store, ring)
    }

    #[test]
    fn commit_then_load_gives_the_same_keys() {
        let dir = tempfile::tempdir().unwrap();
        let kek = Kek::generate().unwrap();
        let (store, ring) = new_store(dir.path(), &kek);
        drop(store);
        let mut again = FileStore::open(dir.path(), &kek).unwrap();
        let loaded = again.load().unwrap().unwrap();
        assert_eq!(loaded.keyring, ring);
        assert_eq!(loaded.signers[0].kid(), ring.records()[0].kid);
    }

    #[test]
    fn retired_keys_are_remembered_without_their_key_material() {
        let dir = tempfile::tempdir().unwrap();
        let kek = Kek::generate().unwrap();
        let (mut store, ring) = new_store(dir.path(), &kek);
        let k1 = ring.records()[0].kid.clone();
        // Two immediate rotations retire k1 at once (AKS).
        let mut ring = with_new_key(&mut store, &ring);
        let key = store.generate(KeySpec::P256).unwrap();
        let max = std::time::Duration::from_secs(3600);
        ring.add_key(key.kid().to_owned(), KeySpec::P256, now(), now(), max);
        assert_eq!(ring.prune(now()), std::slice::from_ref(&k1));
        store.commit(&ring).unwrap();
        let file: serde_json::Value =
            serde_json::from_slice(&fs::read(store.keyring_path()).unwrap()).unwrap();
        let kids = |list: &str| -> Vec<String> {
            file[list]
                .as_array()
                .unwrap()
                .iter()
                .map(|k| k["kid"].as_str().unwrap().to_owned())
                .collect()
        };
        assert!(!kids("keys").contains(&k1), "its sealed key is erased");
        assert_eq!(kids("retired"), std::slice::from_ref(&k1));
        assert!(file["retired"][0].get("sealed_pkcs8").is_none());
        drop(store);
        assert_eq!(reload(dir.path(), &kek), ring, "the history reads back");
    }

    #[test]
    fn a_link_planted_at_the_temp_path_is_replaced_not_followed() {
        use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
        let dir = tempfile::tempdir().unwrap();
        let kek = Kek::generate().unwrap();
        let (mut store, ring) = new_store(dir.path(), &kek);
        let outside = dir.path().join("outside");
        fs::write(&outside, b"not yours").unwrap();
        std::os::unix::fs::symlink(&outside, store.dir.join(TEMP_NAME)).unwrap();

        let next = with_new_key(&mut store, &ring);
        store.commit(&next).unwrap();

        assert_eq!(fs::read(&outside).unwrap(), b"not yours");
        let meta = fs::symlink_metadata(store.keyring_path()).unwrap();
        assert!(meta.file_type().is_file(), "keyring.json is a regular file");
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert_eq!(meta.nlink(), 1);
        assert!(!store.dir.join(TEMP_NAME).exists());
        drop(store);
        let loaded = FileStore::open(dir.path(), &kek).unwrap().load().unwrap();
        assert_eq!(loaded.unwrap().keyring.records().len(), 2);
    }

    #[test]
    fn a_second_opener_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let kek = Kek::generate().unwrap();
        let _first = FileStore::open(dir.path(), &kek).unwrap();
        assert!(matches!(
            FileStore::open(dir.path(), &kek),
            Err(StoreError::Locked(_))
        ));
    }

    #[test]
    fn wrong_kek_is_named_and_nothing_changes() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = new_store(dir.path(), &Kek::generate().unwrap());
        let before = fs::read(store.keyring_path()).unwrap();
        drop(store);
        let mut other = FileStore::open(dir.path(), &Kek::generate().unwrap()).unwrap();
        assert!(matches!(other.load(), Err(StoreError::WrongKek { .. })));
        assert_eq!(fs::read(other.keyring_path()).unwrap(), before);
    }

    #[test]
    fn every_kind_of_damage_is_refused_with_its_own_exit_code() {
        let dir = tempfile::tempdir().unwrap();
        let kek = Kek::generate().unwrap();
        let (store, _) = new_store(dir.path(), &kek);
        let path = store.keyring_path();
        drop(store);
        let good = fs::read(&path).unwrap();
        let text = String::from_utf8(good.clone()).unwrap();
        let cases: Vec<(&str, Vec<u8>, i32)> = vec![
            ("truncated", good[..good.len() / 2].to_vec(), 65),
            ("empty", vec![], 65),
            (
                "time changed",
                text.replacen("\"created_at_ms\": 1", "\"created_at_ms\": 2", 1)
                    .into_bytes(),
                66,
            ),
            (
                "future version",
                text.replacen("\"version\": 1", "\"version\": 9", 1)
                    .into_bytes(),
                67,
            ),
        ];
        for (label, bytes, code) in cases {
            assert_ne!(bytes, good, "{label}: the case must change the file");
            fs::write(&path, &bytes).unwrap();
            let mut s = FileStore::open(dir.path(), &kek).unwrap();
            let err = s.load().unwrap_err();
            assert_eq!(err.exit_code(), code, "{label}: {err}");
            assert_eq!(fs::read(&path).unwrap(), bytes, "{label}: file untouched");
        }
        // Flip each byte of the sealed-key region: always refused.
        let start = text.find("sealed_pkcs8").unwrap() + 20;
        for i in (start..start + 40).step_by(3) {
            let mut bytes = good.clone();
            bytes[i] ^= 0x01;
            fs::write(&path, &bytes).unwrap();
            let mut s = FileStore::open(dir.path(), &kek).unwrap();
            assert!(s.load().is_err(), "flip at {i} accepted");
        }
    }

    fn inject(store: &FileStore, at: WriteStep, kind: std::io::ErrorKind, times: u32) {
        *store.fault.lock().unwrap() = Some(Fault { at, kind, times });
    }

    /// `ring` with one more key, active at once, made by `store`.
    fn with_new_key(store: &mut FileStore, ring: &Keyring) -> Keyring {
        let key = store.generate(KeySpec::P256).unwrap();
        let mut next = ring.clone();
        let max = std::time::Duration::from_secs(3600);
        next.add_key(key.kid().to_owned(), KeySpec::P256, now(), now(), max);
        next
    }

    fn reload(dir: &Path, kek: &Kek) -> Keyring {
        FileStore::open(dir, kek)
            .unwrap()
            .load()
            .unwrap()
            .unwrap()
            .keyring
    }

    #[test]
    fn a_failure_before_the_rename_leaves_the_old_keyring_and_no_temp_file() {
        use std::io::ErrorKind;
        let dir = tempfile::tempdir().unwrap();
        let kek = Kek::generate().unwrap();
        let (mut store, ring) = new_store(dir.path(), &kek);
        let before = fs::read(store.keyring_path()).unwrap();
        let next = with_new_key(&mut store, &ring);
        for (at, kind, says) in [
            (
                WriteStep::Create,
                ErrorKind::ReadOnlyFilesystem,
                "cannot create",
            ),
            (WriteStep::Write, ErrorKind::StorageFull, "cannot write"),
            (WriteStep::SyncFile, ErrorKind::Other, "cannot fsync"),
            (
                WriteStep::Rename,
                ErrorKind::PermissionDenied,
                "cannot rename",
            ),
        ] {
            inject(&store, at, kind, 1);
            let err = store.commit(&next).unwrap_err();
            assert!(matches!(err, StoreError::Io { .. }), "{at:?}: {err}");
            let text = err.to_string();
            assert!(
                text.starts_with(says) && text.contains("keyring.json"),
                "{text}"
            );
            assert_eq!(fs::read(store.keyring_path()).unwrap(), before, "{at:?}");
            assert!(
                !dir.path().join(TEMP_NAME).exists(),
                "{at:?}: temp file left"
            );
        }
        // Once the disk works again, the same keyring commits.
        store.commit(&next).unwrap();
        drop(store);
        assert_eq!(reload(dir.path(), &kek), next);
    }

    #[test]
    fn a_failed_directory_fsync_puts_the_previous_keyring_back() {
        let dir = tempfile::tempdir().unwrap();
        let kek = Kek::generate().unwrap();
        let (mut store, ring) = new_store(dir.path(), &kek);
        let before = fs::read(store.keyring_path()).unwrap();
        let next = with_new_key(&mut store, &ring);
        inject(&store, WriteStep::SyncDir, std::io::ErrorKind::Other, 1);
        let err = store.commit(&next).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("cannot fsync the data directory"),
            "{err}"
        );
        assert_eq!(fs::read(store.keyring_path()).unwrap(), before);
        assert!(!dir.path().join(TEMP_NAME).exists());
        drop(store);
        assert_eq!(reload(dir.path(), &kek), ring, "the old keyring, durably");
    }

    #[test]
    fn a_keyring_that_cannot_be_put_back_stops_every_write() {
        let dir = tempfile::tempdir().unwrap();
        let kek = Kek::generate().unwrap();
        let (mut store, ring) = new_store(dir.path(), &kek);
        let next = with_new_key(&mut store, &ring);
        // The commit's directory fsync fails, and so does the one putting the old file back.
        inject(&store, WriteStep::SyncDir, std::io::ErrorKind::Other, 2);
        let err = store.commit(&next).unwrap_err();
        assert!(matches!(err, StoreError::Indeterminate { .. }), "{err}");
        assert_eq!(err.exit_code(), 74);
        assert!(err.to_string().contains("restart oidc-kms"), "{err}");
        assert!(matches!(
            store.commit(&next),
            Err(StoreError::Indeterminate { .. })
        ));
        assert!(matches!(
            store.generate(KeySpec::P256),
            Err(StoreError::Indeterminate { .. })
        ));
        // What a restart finds is one keyring or the other, whole.
        drop(store);
        let found = reload(dir.path(), &kek);
        assert!(found == ring || found == next);
    }

    /// A key manager over a file store whose writes the returned handle can make fail.
    fn manager_over_a_faulty_disk(
        policy: crate::lifecycle::Policy,
    ) -> (
        tempfile::TempDir,
        crate::key_manager::KeyManager,
        Arc<std::sync::Mutex<Option<Fault>>>,
        Arc<crate::clock::ManualClock>,
    ) {
        use crate::key_manager::{KeyManager, Settings};
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path(), &Kek::generate().unwrap()).unwrap();
        let fault = Arc::clone(&store.fault);
        let settings = Settings {
            issuer: crate::issuer::Issuer::parse("https://issuer.example/").unwrap(),
            policy,
            new_key_spec: KeySpec::P256,
        };
        let clock = Arc::new(crate::clock::ManualClock::new(now()));
        let manager = KeyManager::open(Box::new(store), clock.clone(), settings).unwrap();
        (dir, manager, fault, clock)
    }

    #[test]
    fn the_service_keeps_its_key_through_disk_faults_and_stops_when_the_disk_is_unknown() {
        use crate::error::Error;
        use crate::key_manager::KeyManager;
        use crate::lifecycle::Policy;
        use crate::token::TokenRequest;
        use std::time::Duration;

        let (_dir, manager, fault, _clock) = manager_over_a_faulty_disk(Policy {
            rotation_period: None,
            ..Policy::default()
        });
        let request = TokenRequest {
            subject: "s".into(),
            audiences: vec!["a".into()],
            ..TokenRequest::default()
        };
        let published = |m: &KeyManager| -> Vec<String> {
            m.published().keys.into_iter().map(|k| k.kid).collect()
        };
        let first = manager.sign_token_blocking(&request).unwrap().kid;
        let inject = |at, times| {
            *fault.lock().unwrap() = Some(Fault {
                at,
                kind: std::io::ErrorKind::StorageFull,
                times,
            })
        };

        // A full disk: the rotation fails with a clear status, nothing else changes.
        inject(WriteStep::Write, 1);
        let status = tonic::Status::from(manager.rotate_blocking(Duration::ZERO).unwrap_err());
        assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
        assert!(
            status.message().contains("cannot write")
                && status.message().contains("the current key keeps signing"),
            "{status:?}"
        );
        assert_eq!(manager.sign_token_blocking(&request).unwrap().kid, first);
        assert_eq!(published(&manager), std::slice::from_ref(&first));

        // A failed directory fsync, undone: the same.
        inject(WriteStep::SyncDir, 1);
        assert!(manager.rotate_blocking(Duration::ZERO).is_err());
        assert_eq!(manager.sign_token_blocking(&request).unwrap().kid, first);
        assert_eq!(published(&manager), std::slice::from_ref(&first));

        // The disk works again: rotations go through.
        let second = manager.rotate_blocking(Duration::ZERO).unwrap().active_kid;
        assert_ne!(second, first);
        assert_eq!(manager.sign_token_blocking(&request).unwrap().kid, second);

        // Nothing can be put back: signing stops rather than sign with keys the disk may not hold.
        inject(WriteStep::SyncDir, 2);
        let status = tonic::Status::from(manager.rotate_blocking(Duration::ZERO).unwrap_err());
        assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
        let halted = manager.sign_token_blocking(&request).unwrap_err();
        assert!(matches!(halted, Error::Halted), "{halted:?}");
        assert_eq!(tonic::Status::from(halted).code(), tonic::Code::Unavailable);
    }

    #[test]
    fn a_scheduled_rotation_that_cannot_be_written_is_retried() {
        use crate::key_manager::KeyManager;
        use crate::lifecycle::{KeyState, Policy};
        use std::time::Duration;

        let (_dir, manager, fault, clock) = manager_over_a_faulty_disk(Policy {
            max_token_lifetime: Duration::from_secs(600),
            rotation_period: Some(Duration::from_secs(3600)),
            prepublish: Duration::from_secs(300),
        });
        clock.advance(Duration::from_secs(3300)); // the next key is due now
        *fault.lock().unwrap() = Some(Fault {
            at: WriteStep::SyncFile,
            kind: std::io::ErrorKind::Other,
            times: 1,
        });
        assert!(manager.tick().is_err(), "the write fails");
        let states = |m: &KeyManager| -> Vec<KeyState> {
            m.list_keys().0.into_iter().map(|(_, s)| s).collect()
        };
        assert_eq!(states(&manager), [KeyState::Active], "nothing changed");
        // The scheduler's next try goes through.
        manager.tick().unwrap();
        assert_eq!(states(&manager), [KeyState::Active, KeyState::Next]);
    }

    #[test]
    fn debug_shows_no_key_material() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = new_store(dir.path(), &Kek::generate().unwrap());
        let text = format!("{store:?}");
        assert!(
            text.contains("keys: 1") && !text.contains("sealed"),
            "{text}"
        );
    }
}
