//! The library's error type. The gRPC edge maps it to a status in one place (`grpc::status`).

use crate::keys::{SignError, StoreError};
use crate::lifecycle::LifecycleError;

/// What can go wrong serving a request.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request is malformed; `field` names the part to fix.
    #[error("{field}: {reason}")]
    InvalidArgument {
        /// The request field at fault.
        field: String,
        /// What is wrong and what is allowed.
        reason: String,
    },
    /// The request is valid but the key lifecycle does not allow it now.
    #[error(transparent)]
    Lifecycle(#[from] LifecycleError),
    /// No key is active (only possible with a broken store).
    #[error(
        "no signing key is active: every key activates later than the clock reads (has the system clock stepped back?); an immediate RotateKeys (prepublish_seconds 0) makes the waiting key active now"
    )]
    NoActiveKey,
    /// The key store failed; for a rotation, nothing changed and the current key keeps signing.
    #[error("key store: {0}")]
    Store(#[from] StoreError),
    /// The key backend failed to sign.
    #[error(transparent)]
    Sign(#[from] SignError),
    /// The signing queue is full: the caller should back off and retry.
    #[error("the key service is at capacity ({capacity} signatures queued); retry with backoff")]
    Overloaded {
        /// The queue's size.
        capacity: usize,
    },
    /// The caller's deadline passed before the request was worked on; nothing was signed.
    #[error("the request's deadline passed before it could be signed; nothing was signed")]
    DeadlineExceeded,
    /// Signing stopped because the key store could not say what is on disk after a failed write
    /// (see [`StoreError::Indeterminate`]); a restart reads the store again.
    #[error(
        "signing is stopped: the key store could not be made durable nor put back after a failed write; fix the disk and restart oidc-kms"
    )]
    Halted,
    /// The service is shutting down or a worker failed.
    #[error("the key service is shutting down")]
    ShuttingDown,
}

impl Error {
    /// An invalid-argument error for `field`.
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::InvalidArgument {
            field: field.into(),
            reason: reason.into(),
        }
    }
}
