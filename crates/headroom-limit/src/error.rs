//! Rejections and configuration errors.

use std::fmt;

use headroom_core::Classify;

use crate::Priority;

/// Why work was turned away.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Reason {
    /// Every permit was in use and the wait queue was full (or has no room at all).
    QueueFull,
    /// The caller waited for a permit longer than the bulkhead's maximum wait time.
    WaitTimeout,
    /// The item's own deadline passed while it was queued; it was dropped without running.
    DeadlineExpired,
    /// Queue delay stayed above its target for a whole interval (CoDel) and this item had
    /// already waited too long to be worth running.
    QueueDelay,
    /// Evicted from a full queue to make room for newer or more important work.
    Evicted,
    /// A load shedder found too much work in flight for this priority.
    InFlight,
    /// A load shedder found the adaptive concurrency limit reached for this priority.
    AdaptiveLimit,
    /// The queue is closed: its consumers are gone or the service is shutting down.
    Closed,
    /// A load shedder refused this priority while a signal given to it was raised (an SLO
    /// burning its error budget fast, say).
    Signal,
}

impl Reason {
    /// Every reason, in a stable order (used to pre-register one counter per reason).
    pub const ALL: [Reason; 9] = [
        Reason::QueueFull,
        Reason::WaitTimeout,
        Reason::DeadlineExpired,
        Reason::QueueDelay,
        Reason::Evicted,
        Reason::InFlight,
        Reason::AdaptiveLimit,
        Reason::Closed,
        Reason::Signal,
    ];

    /// A short snake_case name, used as the `reason` label of metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::QueueFull => "queue_full",
            Reason::WaitTimeout => "wait_timeout",
            Reason::DeadlineExpired => "deadline_expired",
            Reason::QueueDelay => "queue_delay",
            Reason::Evicted => "evicted",
            Reason::InFlight => "in_flight",
            Reason::AdaptiveLimit => "adaptive_limit",
            Reason::Closed => "closed",
            Reason::Signal => "signal",
        }
    }

    pub(crate) fn index(self) -> usize {
        match self {
            Reason::QueueFull => 0,
            Reason::WaitTimeout => 1,
            Reason::DeadlineExpired => 2,
            Reason::QueueDelay => 3,
            Reason::Evicted => 4,
            Reason::InFlight => 5,
            Reason::AdaptiveLimit => 6,
            Reason::Closed => 7,
            Reason::Signal => 8,
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Work was refused on purpose because the service is saturated.
///
/// A cheap `Copy` value: the [`Reason`] and the [`Priority`] of the refused work. It is
/// retryable (later, or on another instance) and a rejection, never a fault:
///
/// ```
/// use headroom_core::Classify;
/// use headroom_limit::{Overloaded, Priority, Reason};
///
/// let err = Overloaded::new(Reason::QueueFull, Priority::Sheddable);
/// assert!(err.is_rejected() && err.is_retryable() && !err.is_timeout());
/// assert_eq!(err.to_string(), "overloaded (queue_full), sheddable work refused");
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Overloaded {
    reason: Reason,
    priority: Priority,
}

/// The `outcome` of an admission span: `admitted`, or the refusal's reason.
pub(crate) fn admission_outcome<T>(result: &Result<T, Overloaded>) -> &'static str {
    match result {
        Ok(_) => "admitted",
        Err(overloaded) => overloaded.reason().as_str(),
    }
}

impl Overloaded {
    /// A rejection of work of `priority` for `reason`.
    pub fn new(reason: Reason, priority: Priority) -> Self {
        Self { reason, priority }
    }

    /// Why the work was refused.
    pub fn reason(&self) -> Reason {
        self.reason
    }

    /// The priority of the refused work.
    pub fn priority(&self) -> Priority {
        self.priority
    }
}

impl fmt::Display for Overloaded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "overloaded ({}), {} work refused",
            self.reason, self.priority
        )
    }
}

impl std::error::Error for Overloaded {}

impl Classify for Overloaded {
    /// `false` even for [`Reason::WaitTimeout`]: the caller's own time limit did not run out,
    /// the bulkhead gave up on its behalf.
    fn is_timeout(&self) -> bool {
        false
    }

    /// `false` only for [`Reason::Signal`]: a retry soon after meets the same raised signal.
    fn is_retryable(&self) -> bool {
        self.reason != Reason::Signal
    }

    fn is_rejected(&self) -> bool {
        true
    }
}

/// A configuration value is out of range.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    field: &'static str,
    problem: &'static str,
}

impl ConfigError {
    pub(crate) fn new(field: &'static str, problem: &'static str) -> Self {
        Self { field, problem }
    }

    /// The name of the offending field.
    pub fn field(&self) -> &'static str {
        self.field
    }

    /// What is wrong with it.
    pub fn problem(&self) -> &'static str {
        self.problem
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid configuration: `{}` {}",
            self.field, self.problem
        )
    }
}

impl std::error::Error for ConfigError {}

impl Classify for ConfigError {
    fn is_timeout(&self) -> bool {
        false
    }

    fn is_retryable(&self) -> bool {
        false
    }
}
