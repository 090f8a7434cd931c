use std::time::Duration;

use headroom_core::{BackendError, Classify};

/// Why a job was not enqueued.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EnqueueError {
    /// The queue (or the job's tenant in it) holds its maximum of unfinished jobs.
    #[error("queue {queue} is full ({depth} unfinished{}); retry after {retry_after:?}", if *.tenant { " for this tenant" } else { "" })]
    Full {
        /// The queue's name.
        queue: String,
        /// Whether the tenant's bound refused it.
        tenant: bool,
        /// The unfinished jobs counted against that bound.
        depth: u64,
        /// When to try again: the time the queue's recent drain rate takes to make room (for
        /// a tenant's bound, to drain the other tenants' unfinished jobs, which are ahead of
        /// the tenant's newest), within the queue's configured bounds. Suitable for a
        /// `Retry-After` header.
        retry_after: Duration,
    },
    /// The payload is larger than the queue accepts.
    #[error("job payload is {len} bytes, more than the limit of {max}")]
    TooLarge {
        /// The payload's length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The job asks for something the queue does not have or cannot carry.
    #[error("invalid job: {0}")]
    Invalid(String),
    /// The job store failed. After a timeout or a dropped connection the job may have been
    /// added with only its answer lost: an enqueue tried again with the same idempotency key
    /// answers that job's id instead of adding another.
    #[error("job store failed")]
    Backend(#[from] BackendError),
}

impl Classify for EnqueueError {
    fn is_timeout(&self) -> bool {
        matches!(self, Self::Backend(error) if error.is_timeout())
    }

    fn is_retryable(&self) -> bool {
        match self {
            Self::Full { .. } => true,
            Self::Backend(error) => error.is_retryable(),
            Self::TooLarge { .. } | Self::Invalid(_) => false,
        }
    }

    fn is_rejected(&self) -> bool {
        matches!(self, Self::Full { .. })
    }
}

impl EnqueueError {
    /// The retry-after of a refusal.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Full { retry_after, .. } => Some(*retry_after),
            _ => None,
        }
    }
}

/// How a handler's attempt failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct JobError {
    message: String,
    retry: bool,
}

impl JobError {
    /// A failure worth another attempt (after the backoff), while attempts remain.
    pub fn retry(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            retry: true,
        }
    }

    /// A failure no attempt will mend: the job is dead at once.
    pub fn fatal(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            retry: false,
        }
    }

    /// Whether another attempt may succeed.
    pub fn is_retryable(&self) -> bool {
        self.retry
    }

    /// The message kept with the job.
    pub fn message(&self) -> &str {
        &self.message
    }
}
