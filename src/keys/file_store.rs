//! The sealed file store: one data directory holding `keyring.json` (every live key's lifecycle
//! record and its sealed private key) and a `LOCK` file held by the running process.
//!
//! Each private key is sealed on its own (AES-256-GCM, key id as associated data); the whole file
//! carries an HMAC under a KEK subkey, so any change to any byte — a time, a state, a record moved
//! — is caught, and a KEK check value tells a wrong KEK apart from an altered file. Every commit is
//! written to a temp file, fsynced, renamed over the old file and the directory fsynced: the store
//! is always either the old keyring or the new one.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use ring::hmac;
use serde::{Deserialize, Serialize};

use crate::clock::Timestamp;
use crate::lifecycle::{KeyRecord, Keyring};

use super::kek::Kek;
use super::seal::{SealedKey, Sealer};
use super::signer::Signer;
use super::software_key::SoftwareKey;
use super::spec::KeySpec;
use super::store::{KeyStore, LoadedKeys, StoreError};

const FILE_NAME: &str = "keyring.json";
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
    /// HMAC-SHA256 over this structure serialized with `mac` empty.
    mac: String,
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
    nonce: String,
    sealed_pkcs8: String,
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
            dir,
            _lock: lock,
        })
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

    fn parse(&self, path: &Path, bytes: &[u8]) -> Result<StoreFile, StoreError> {
        let damaged = |reason: String| StoreError::Damaged {
            path: path.to_path_buf(),
            reason,
        };
        if bytes.is_empty() {
            return Err(damaged("the file is empty".into()));
        }
        let value: serde_json::Value = serde_json::from_slice(bytes)
            .map_err(|e| damaged(format!("truncated or not JSON: {e}")))?;
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

impl KeyStore for FileStore {
    fn load(&mut self) -> Result<Option<LoadedKeys>, StoreError> {
        let path = self.keyring_path();
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
        if hmac::verify(&self.mac_key, &Self::mac_input(&mut file), &tag).is_err() {
            return Err(StoreError::Altered {
                path,
                reason: "integrity check (HMAC) failed".into(),
            });
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
            });
            signers.push(Arc::new(key));
            sealed.insert(stored.kid.clone(), (spec, record));
        }
        let keyring = Keyring::from_records(records).map_err(|e| StoreError::Damaged {
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
        Ok(Some(LoadedKeys { keyring, signers }))
    }

    fn generate(&mut self, spec: KeySpec) -> Result<Arc<dyn Signer>, StoreError> {
        let (key, pkcs8) = SoftwareKey::generate(spec)?;
        let sealed = self.sealer.seal(key.kid(), &pkcs8)?;
        self.sealed.insert(key.kid().to_owned(), (spec, sealed));
        Ok(Arc::new(key))
    }

    fn commit(&mut self, keyring: &Keyring) -> Result<(), StoreError> {
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
                nonce: B64.encode(sealed.nonce),
                sealed_pkcs8: B64.encode(&sealed.ciphertext),
            });
        }
        let mut file = StoreFile {
            format: FORMAT.into(),
            version: VERSION,
            kek_check: self.kek_check.clone(),
            keys,
            mac: String::new(),
        };
        file.mac = B64.encode(hmac::sign(&self.mac_key, &Self::mac_input(&mut file)));
        let mut bytes = serde_json::to_vec_pretty(&file).expect("store file serializes");
        bytes.push(b'\n');
        write_atomically(&self.dir, &bytes)?;
        // Keys the keyring no longer names are gone from disk now; forget them here too.
        self.sealed
            .retain(|kid, _| keyring.records().iter().any(|r| &r.kid == kid));
        Ok(())
    }
}

/// Temp file, fsync, rename over the keyring, fsync the directory.
fn write_atomically(dir: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    let tmp = dir.join(TEMP_NAME);
    let target = dir.join(FILE_NAME);
    let result = (|| {
        let mut f = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .open(&tmp)
            .map_err(io_err("create", &tmp))?;
        restrict(&tmp, 0o600);
        f.write_all(bytes).map_err(io_err("write", &tmp))?;
        f.sync_all().map_err(io_err("fsync", &tmp))?;
        drop(f);
        fs::rename(&tmp, &target).map_err(io_err("rename into place", &target))?;
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err("fsync the data directory", dir))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
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
        let ring = Keyring::new(key.kid().to_owned(), KeySpec::P256, now());
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
