//! Rate-limit rejections and errors.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use headroom_core::{BackendError, Classify};

use super::Quota;

/// A request was refused because its key has spent its quota.
///
/// A cheap `Copy` value carrying the exact time until the same cost would be admitted (for a
/// tier of several quotas, the longest wait among the quotas that refuse, and that quota):
///
/// ```
/// use std::time::Duration;
/// use headroom_core::{Classify, ManualClock};
/// use headroom_limit::rate::{DirectLimiter, Quota};
///
/// let clock = ManualClock::new();
/// let limiter = DirectLimiter::builder(Quota::per_second(10).unwrap()).clock(clock.clock()).build();
/// for _ in 0..10 {
///     limiter.check().unwrap();
/// }
/// let limited = limiter.check().unwrap_err();
/// assert_eq!(limited.retry_after(), Duration::from_millis(100));
/// assert!(limited.is_rejected() && limited.is_retryable());
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RateLimited {
    quota: Quota,
    retry_after: Duration,
}

impl RateLimited {
    pub(crate) fn new(quota: Quota, retry_after: Duration) -> Self {
        Self { quota, retry_after }
    }

    /// How long until the same cost would be admitted (the `Retry-After` of an HTTP answer).
    pub fn retry_after(&self) -> Duration {
        self.retry_after
    }

    /// The quota that was exhausted (of several, the one whose wait is given).
    pub fn quota(&self) -> Quota {
        self.quota
    }
}

impl fmt::Display for RateLimited {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "rate limited, retry after {:?}", self.retry_after)
    }
}

impl std::error::Error for RateLimited {}

impl Classify for RateLimited {
    fn is_timeout(&self) -> bool {
        false
    }

    fn is_retryable(&self) -> bool {
        true
    }

    fn is_rejected(&self) -> bool {
        true
    }
}

/// What kind of [`RateError`] occurred.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RateErrorKind {
    /// The key has spent its quota; see [`RateError::limited`].
    Limited,
    /// The cost is larger than the burst, so it could never be admitted.
    CostTooHigh,
    /// The request names a tier that is not configured.
    UnknownTier,
    /// The key does not fit the store (longer than
    /// [`DistributedRateLimiter::MAX_KEY_LEN`](super::DistributedRateLimiter::MAX_KEY_LEN)).
    InvalidKey,
    /// The shared store is unreachable and the limiter fails closed.
    Unavailable,
    /// The shared store cannot hold this quota (for example, a rate finer than its time
    /// resolution); its error is the `source()`.
    StoreConfig,
}

/// The error of a rate-limit check: a rejection or a reason no decision could be made.
#[derive(Debug)]
pub struct RateError {
    kind: RateErrorKind,
    limited: Option<RateLimited>,
    /// Shared: every refusal of an outage carries the failure that started it.
    source: Option<Arc<BackendError>>,
}

impl RateError {
    pub(crate) fn new(kind: RateErrorKind) -> Self {
        Self {
            kind,
            limited: None,
            source: None,
        }
    }

    pub(crate) fn unavailable(source: Option<Arc<BackendError>>) -> Self {
        Self {
            source,
            ..Self::new(RateErrorKind::Unavailable)
        }
    }

    pub(crate) fn with_source(kind: RateErrorKind, source: Arc<BackendError>) -> Self {
        Self {
            source: Some(source),
            ..Self::new(kind)
        }
    }

    /// What went wrong.
    pub fn kind(&self) -> RateErrorKind {
        self.kind
    }

    /// The rejection, when the kind is [`RateErrorKind::Limited`].
    pub fn limited(&self) -> Option<&RateLimited> {
        self.limited.as_ref()
    }
}

impl From<RateLimited> for RateError {
    fn from(limited: RateLimited) -> Self {
        Self {
            limited: Some(limited),
            ..Self::new(RateErrorKind::Limited)
        }
    }
}

impl fmt::Display for RateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.kind, &self.limited) {
            (RateErrorKind::Limited, Some(limited)) => limited.fmt(f),
            (RateErrorKind::CostTooHigh, _) => f.write_str("cost larger than the burst"),
            (RateErrorKind::UnknownTier, _) => f.write_str("unknown rate-limit tier"),
            (RateErrorKind::InvalidKey, _) => f.write_str("rate-limit key too long"),
            (RateErrorKind::StoreConfig, _) => f.write_str("the rate store cannot hold this quota"),
            _ => f.write_str("rate-limit store unavailable"),
        }
    }
}

impl std::error::Error for RateError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|source| source as &(dyn std::error::Error + 'static))
    }
}

impl Classify for RateError {
    fn is_timeout(&self) -> bool {
        false
    }

    /// Rejections and an unreachable store may clear up; a cost or tier that does not fit
    /// the configuration will not.
    fn is_retryable(&self) -> bool {
        matches!(
            self.kind,
            RateErrorKind::Limited | RateErrorKind::Unavailable
        )
    }

    /// Rejections, and refusals while failing closed.
    fn is_rejected(&self) -> bool {
        matches!(
            self.kind,
            RateErrorKind::Limited | RateErrorKind::Unavailable
        )
    }
}
