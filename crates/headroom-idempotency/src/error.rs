use std::time::Duration;

use headroom_core::{BackendError, Classify};

use crate::InvalidKey;

/// Why [`Idempotency::execute`](crate::Idempotency::execute) did not return an outcome.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IdempotencyError<E> {
    /// The key or scope is invalid (HTTP 400).
    #[error(transparent)]
    InvalidKey(#[from] InvalidKey),
    /// The key was used before with a different request (HTTP 422).
    #[error("the idempotency key was used with a different request")]
    KeyReused,
    /// A request with this key is still running (HTTP 409).
    #[error("a request with this idempotency key is in progress; retry after {retry_after:?}")]
    InProgress {
        /// When a retry may find the outcome.
        retry_after: Duration,
    },
    /// The record store is unavailable and the executor fails closed (HTTP 503). Retryable
    /// as its store error is (a timeout, a lost connection or a store known to be down, not a
    /// configuration or a command the store refused).
    #[error("the idempotency store is unavailable")]
    Unavailable(#[source] BackendError),
    /// The operation ran for this key before, but its outcome could not be stored (larger
    /// than `max_outcome_len`, or its `Serialize` impl failed), so there is nothing to
    /// replay. The key stays taken: the operation never runs again for it while the record
    /// lives.
    #[error(
        "the operation ran for this key, but its outcome was not stored and cannot be replayed"
    )]
    NotReplayable,
    /// The stored outcome could not be decoded (written by another program or format).
    #[error("the stored outcome is corrupt")]
    Corrupt,
    /// This request's lease expired and another request took the key over (it holds it, or
    /// completed it): this request's outcome was not stored, and the other's stands (HTTP
    /// 409). Retryable: a retry with the same key replays it, or waits for it. A holder whose
    /// record the store lost while nobody took over is not fenced: it takes the key again and
    /// stores its outcome.
    #[error("the lease expired and another request took over the key")]
    Fenced,
    /// The lease was lost while the operation ran: its extension was refused (another request
    /// took over after a stall) or the store could not be reached before the lease ran out.
    /// The operation was stopped (its future dropped) (HTTP 409). Nothing was stored, unless
    /// the operation had said it [took effect](crate::Lease::took_effect): that outcome is then
    /// stored (unless another request took over), and a retry replays it. Retryable: a retry
    /// with the same key runs again, or replays.
    #[error("the idempotency lease was lost while the operation ran; it was stopped")]
    LeaseLost,
    /// The operation itself failed (its key was released so a retry runs again).
    #[error("the operation failed")]
    Operation(#[source] E),
}

impl<E> IdempotencyError<E> {
    /// The operation's own error, if that is what this is.
    pub fn into_operation_error(self) -> Option<E> {
        match self {
            Self::Operation(err) => Some(err),
            _ => None,
        }
    }
}

impl<E: Classify> Classify for IdempotencyError<E> {
    fn is_timeout(&self) -> bool {
        match self {
            Self::Unavailable(err) => err.is_timeout(),
            Self::Operation(err) => err.is_timeout(),
            _ => false,
        }
    }

    fn is_retryable(&self) -> bool {
        match self {
            // A retry with the same key replays the other holder's outcome, or runs again (or
            // replays the kept outcome) once the lost lease is free.
            Self::InProgress { .. } | Self::Fenced | Self::LeaseLost => true,
            // A store that is down may come back; one misconfigured or refusing the command
            // will not.
            Self::Unavailable(err) => err.is_retryable(),
            Self::Operation(err) => err.is_retryable(),
            _ => false,
        }
    }

    fn is_rejected(&self) -> bool {
        matches!(
            self,
            Self::InProgress { .. } | Self::KeyReused | Self::InvalidKey(_)
        )
    }
}
