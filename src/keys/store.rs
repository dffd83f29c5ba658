//! The key store interface: what any backend (sealed files today; a hardware module or a replicated
//! store later) must do. The key manager above it knows nothing of how keys are held.

use std::path::PathBuf;
use std::sync::Arc;

use crate::lifecycle::Keyring;

use super::seal::SealError;
use super::signer::Signer;
use super::software_key::KeyError;
use super::spec::KeySpec;

/// A keyring as loaded from a store: the lifecycle records and a signer for each key.
#[derive(Debug)]
pub struct LoadedKeys {
    /// The lifecycle records.
    pub keyring: Keyring,
    /// One signer per record.
    pub signers: Vec<Arc<dyn Signer>>,
}

/// A store of private keys that can only be used to sign.
pub trait KeyStore: Send + 'static {
    /// Reads what was last committed; `None` for a store that has never been written.
    fn load(&mut self) -> Result<Option<LoadedKeys>, StoreError>;

    /// Makes a new private key inside the store. It is not durable until a `commit` names it;
    /// a key never committed is forgotten.
    fn generate(&mut self, spec: KeySpec) -> Result<Arc<dyn Signer>, StoreError>;

    /// Durably and atomically records `keyring`: afterwards the store holds exactly the keys it
    /// names, and keys it no longer names are erased. On error nothing changed.
    fn commit(&mut self, keyring: &Keyring) -> Result<(), StoreError>;
}

/// What can go wrong in a key store. Messages name the file and the fault, never key material.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A file operation failed (disk full, read-only, permissions…).
    #[error("cannot {action} {}: {source}", path.display())]
    Io {
        /// What was being done.
        action: &'static str,
        /// On which path.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// Another process has the store open.
    #[error("another oidc-kms process is using the data directory {} (it holds {}/LOCK); stop it or choose another --data-dir", .0.display(), .0.display())]
    Locked(PathBuf),
    /// The store file is truncated or not a keyring at all.
    #[error("{} is damaged ({reason}); refusing to start. Restore it from a backup; it was left as it is", path.display())]
    Damaged {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The store was written by a format this build does not read.
    #[error("{} has format version {found}, but this oidc-kms reads version {supported} only; refusing to start", path.display())]
    UnsupportedVersion {
        /// The file.
        path: PathBuf,
        /// The version found.
        found: u64,
        /// The version this build reads.
        supported: u32,
    },
    /// The KEK given is not the one the store was sealed with.
    #[error("the key-encryption key does not match the one that sealed {}; refusing to start (check --kek-file / OIDC_KMS_KEK)", path.display())]
    WrongKek {
        /// The file.
        path: PathBuf,
    },
    /// A sealed key sits under another record's kid: records were swapped or moved.
    #[error("{} was altered: the sealed key stored under kid {stored_under} belongs to kid {belongs_to} (records swapped or moved); refusing to start. Restore it from a backup; it was left as it is", path.display())]
    Swapped {
        /// The file.
        path: PathBuf,
        /// The record holding a key that is not its own.
        stored_under: String,
        /// The kid that key was sealed for.
        belongs_to: String,
    },
    /// A commit failed after its rename and the previous keyring could not be put back: the file
    /// on disk may be either keyring, so the store accepts no more writes.
    #[error("{} could not be made durable nor put back after a failed fsync; it may hold the old or the new keyring. Signing and rotation are stopped: fix the disk and restart oidc-kms, which reads whichever keyring is there", path.display())]
    Indeterminate {
        /// The file.
        path: PathBuf,
    },
    /// The store's integrity check failed: someone or something changed it.
    #[error("{} was altered ({reason}); refusing to start. Restore it from a backup; it was left as it is", path.display())]
    Altered {
        /// The file.
        path: PathBuf,
        /// What failed.
        reason: String,
    },
    /// Making or loading a key failed.
    #[error(transparent)]
    Key(#[from] KeyError),
    /// Sealing failed.
    #[error(transparent)]
    Seal(#[from] SealError),
}

impl StoreError {
    /// The process exit code for a store that cannot be opened: one per kind of fault, so scripts
    /// and supervisors can tell them apart (sysexits-style, 65 and up).
    pub fn exit_code(&self) -> i32 {
        match self {
            StoreError::Damaged { .. } => 65,
            StoreError::Altered { .. } => 66,
            StoreError::UnsupportedVersion { .. } => 67,
            StoreError::WrongKek { .. } => 68,
            StoreError::Swapped { .. } => 72,
            StoreError::Locked(_) => 75,
            StoreError::Io { .. } | StoreError::Indeterminate { .. } => 74,
            StoreError::Key(_) | StoreError::Seal(_) => 70,
        }
    }
}
