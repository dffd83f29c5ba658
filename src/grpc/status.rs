//! Errors to gRPC statuses, in one place. Messages say what to do; none carries key material.

use tonic::{Code, Status};

use crate::error::Error;
use crate::keys::StoreError;
use crate::lifecycle::LifecycleError;

impl From<Error> for Status {
    fn from(err: Error) -> Status {
        let code = match &err {
            Error::InvalidArgument { .. } => Code::InvalidArgument,
            Error::Lifecycle(
                LifecycleError::RotationPending { .. }
                | LifecycleError::PreviousStillPublished { .. },
            ) => Code::FailedPrecondition,
            Error::Lifecycle(LifecycleError::Inconsistent(_)) => Code::Internal,
            Error::NoActiveKey | Error::ShuttingDown | Error::Halted => Code::Unavailable,
            Error::Store(StoreError::Indeterminate { .. }) => Code::Unavailable,
            Error::Overloaded { .. } => Code::ResourceExhausted,
            Error::DeadlineExceeded => Code::DeadlineExceeded,
            Error::Store(StoreError::Io { .. }) => {
                return Status::unavailable(format!(
                    "{err}; nothing was changed and the current key keeps signing"
                ));
            }
            Error::Store(_) | Error::Sign(_) => Code::Internal,
        };
        Status::new(code, err.to_string())
    }
}
