//! Typed errors: the rejections this crate makes and the error of a protected call.

use std::error::Error as StdError;
use std::fmt;
use std::time::Duration;

use headroom_core::Classify;

use crate::State;

/// A user's classifier of errors (which count as failures, which are retryable).
pub(crate) type Predicate<E> = Box<dyn Fn(&E) -> bool + Send + Sync>;

/// The circuit refused the call without attempting it: it is open, half-open with every probe
/// slot taken, or isolated by hand.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CircuitOpen {
    pub(crate) state: State,
    pub(crate) retry_after: Option<Duration>,
}

impl CircuitOpen {
    /// The state that refused the call: [`State::Open`], [`State::HalfOpen`] or
    /// [`State::Isolated`].
    pub fn state(&self) -> State {
        self.state
    }

    /// How long until the breaker lets probe calls through again; `None` when that is not
    /// known: while it is isolated, or half-open with every probe slot taken.
    pub fn retry_after(&self) -> Option<Duration> {
        self.retry_after
    }
}

impl fmt::Display for CircuitOpen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.state, self.retry_after) {
            (State::HalfOpen, _) => f.write_str("circuit half-open, every probe slot taken"),
            (State::Isolated, _) => f.write_str("circuit isolated"),
            (_, Some(after)) => write!(f, "circuit open, retry after {after:?}"),
            (_, None) => f.write_str("circuit open"),
        }
    }
}

impl StdError for CircuitOpen {}

impl Classify for CircuitOpen {
    fn is_timeout(&self) -> bool {
        false
    }

    /// An open circuit means the dependency is failing: retrying right away only adds load.
    fn is_retryable(&self) -> bool {
        false
    }

    fn is_rejected(&self) -> bool {
        true
    }
}

/// The call did not finish in time; its future was dropped, which cancels the work.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Elapsed {
    pub(crate) after: Duration,
}

impl Elapsed {
    /// The time limit that was reached.
    pub fn after(&self) -> Duration {
        self.after
    }
}

impl fmt::Display for Elapsed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "timed out after {:?}", self.after)
    }
}

impl StdError for Elapsed {}

impl Classify for Elapsed {
    fn is_timeout(&self) -> bool {
        true
    }

    fn is_retryable(&self) -> bool {
        true
    }
}

/// What kind of failure an [`Error`] is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The protected operation itself failed.
    Inner,
    /// The circuit breaker refused the call.
    CircuitOpen,
    /// An attempt ran out of time.
    Elapsed,
    /// A retry was needed but the retry budget was spent.
    BudgetExhausted,
}

impl ErrorKind {
    /// The kind in snake case: `inner`, `circuit_open`, `elapsed`, `budget_exhausted` (the
    /// `outcome` of a failed `pipeline.call` span).
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Inner => "inner",
            Self::CircuitOpen => "circuit_open",
            Self::Elapsed => "elapsed",
            Self::BudgetExhausted => "budget_exhausted",
        }
    }
}

/// The error of a call made through a [`Pipeline`](crate::Pipeline) or one of its strategies.
///
/// Every variant but [`Error::Inner`] is a cheap typed value made by this crate.
#[derive(Debug)]
#[non_exhaustive]
pub enum Error<E> {
    /// The operation's own error, after the last attempt.
    Inner(E),
    /// The circuit breaker refused the call.
    CircuitOpen(CircuitOpen),
    /// The last attempt ran out of time.
    Elapsed(Elapsed),
    /// The last attempt failed with a retryable error, but the retry budget was spent, so no
    /// further attempt was made. `last` is that attempt's error.
    BudgetExhausted {
        /// The error of the last attempt made.
        last: Box<Error<E>>,
    },
}

impl<E> Error<E> {
    /// What kind of failure this is.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::Inner(_) => ErrorKind::Inner,
            Self::CircuitOpen(_) => ErrorKind::CircuitOpen,
            Self::Elapsed(_) => ErrorKind::Elapsed,
            Self::BudgetExhausted { .. } => ErrorKind::BudgetExhausted,
        }
    }

    /// The operation's own error, also when it is the last error behind a spent budget.
    pub fn inner(&self) -> Option<&E> {
        match self {
            Self::Inner(inner) => Some(inner),
            Self::BudgetExhausted { last } => last.inner(),
            _ => None,
        }
    }

    /// Takes the operation's own error out, also from behind a spent budget.
    pub fn into_inner(self) -> Option<E> {
        match self {
            Self::Inner(inner) => Some(inner),
            Self::BudgetExhausted { last } => last.into_inner(),
            _ => None,
        }
    }
}

impl<E: fmt::Display> fmt::Display for Error<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Inner(inner) => inner.fmt(f),
            Self::CircuitOpen(open) => open.fmt(f),
            Self::Elapsed(elapsed) => elapsed.fmt(f),
            Self::BudgetExhausted { last } => {
                write!(f, "retry budget exhausted; last error: {last}")
            }
        }
    }
}

impl<E: StdError + 'static> StdError for Error<E> {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        match self {
            Self::Inner(inner) => Some(inner),
            Self::CircuitOpen(open) => Some(open),
            Self::Elapsed(elapsed) => Some(elapsed),
            Self::BudgetExhausted { last } => Some(last.as_ref()),
        }
    }
}

impl<E: Classify> Classify for Error<E> {
    fn is_timeout(&self) -> bool {
        match self {
            Self::Inner(inner) => inner.is_timeout(),
            Self::CircuitOpen(open) => open.is_timeout(),
            Self::Elapsed(elapsed) => elapsed.is_timeout(),
            Self::BudgetExhausted { last } => last.is_timeout(),
        }
    }

    fn is_retryable(&self) -> bool {
        match self {
            Self::Inner(inner) => inner.is_retryable(),
            Self::CircuitOpen(open) => open.is_retryable(),
            Self::Elapsed(elapsed) => elapsed.is_retryable(),
            // Retrying past a spent budget is what the budget exists to prevent.
            Self::BudgetExhausted { .. } => false,
        }
    }

    fn is_rejected(&self) -> bool {
        match self {
            Self::Inner(inner) => inner.is_rejected(),
            Self::CircuitOpen(_) | Self::BudgetExhausted { .. } => true,
            Self::Elapsed(_) => false,
        }
    }
}

/// A configuration value is out of its valid range.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    field: &'static str,
    expected: &'static str,
}

impl ConfigError {
    pub(crate) fn new(field: &'static str, expected: &'static str) -> Self {
        Self { field, expected }
    }

    /// The name of the offending setting; from a [`PipelineConfig`](crate::PipelineConfig),
    /// its path, section first (`budget.window`, `breaker.window.size`).
    pub fn field(&self) -> &'static str {
        self.field
    }

    /// What the setting must be.
    pub fn expected(&self) -> &'static str {
        self.expected
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid `{}`: must be {}", self.field, self.expected)
    }
}

impl StdError for ConfigError {}

/// A setting that is out of range stays so however often it is tried: not retryable. Nor is
/// it a rejection, which is a deliberate refusal of a valid call.
impl Classify for ConfigError {
    fn is_timeout(&self) -> bool {
        false
    }

    fn is_retryable(&self) -> bool {
        false
    }
}

pub(crate) fn check(
    ok: bool,
    field: &'static str,
    expected: &'static str,
) -> Result<(), ConfigError> {
    if ok {
        Ok(())
    } else {
        Err(ConfigError::new(field, expected))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use headroom_core::{BackendError, BackendErrorKind};

    #[test]
    fn classification_of_each_kind() {
        let open: Error<BackendError> = Error::CircuitOpen(CircuitOpen {
            state: State::Isolated,
            retry_after: None,
        });
        assert!(open.is_rejected() && !open.is_retryable() && !open.is_timeout());
        let elapsed: Error<BackendError> = Error::Elapsed(Elapsed {
            after: Duration::from_millis(5),
        });
        assert!(elapsed.is_timeout() && elapsed.is_retryable() && !elapsed.is_rejected());
        let inner = Error::Inner(BackendError::new(BackendErrorKind::Connection));
        assert!(inner.is_retryable() && !inner.is_rejected());
        let spent = Error::BudgetExhausted {
            last: Box::new(inner),
        };
        assert!(spent.is_rejected() && !spent.is_retryable());
        assert_eq!(spent.kind(), ErrorKind::BudgetExhausted);
        assert_eq!(
            spent.inner().map(BackendError::kind),
            Some(BackendErrorKind::Connection)
        );
    }

    #[test]
    fn rejections_are_downcastable_from_a_boxed_error() {
        let boxed: Box<dyn StdError + Send + Sync> = Box::new(CircuitOpen {
            state: State::Open,
            retry_after: Some(Duration::from_secs(1)),
        });
        assert!(boxed.downcast_ref::<CircuitOpen>().is_some());
        let err: Box<dyn StdError + Send + Sync> =
            Box::new(Error::<BackendError>::Elapsed(Elapsed {
                after: Duration::from_secs(1),
            }));
        let typed = err.downcast_ref::<Error<BackendError>>().expect("typed");
        assert_eq!(typed.kind(), ErrorKind::Elapsed);
    }
}
