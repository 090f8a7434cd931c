//! Error classification: the convention every headroom error follows.
//!
//! Each operation family has one error type with a `#[non_exhaustive]` kind enum, and every
//! error answers the questions a resilience library's caller asks through [`Classify`]: did it
//! time out, may the same call succeed if retried, was it a deliberate rejection (load shedding,
//! an open circuit, a rate limit) rather than a fault. Rejections are cheap typed values, never
//! strings. A backend's own error is kept as [`std::error::Error::source`] so a caller can act on it.

use std::error::Error as StdError;
use std::fmt;

/// Questions every headroom error answers.
pub trait Classify {
    /// The operation did not finish within its time limit.
    fn is_timeout(&self) -> bool;

    /// The same call may succeed if made again later (timeouts, lost connections, overload).
    fn is_retryable(&self) -> bool;

    /// headroom refused the call on purpose (shed, rate-limited, circuit open) without a fault.
    fn is_rejected(&self) -> bool {
        false
    }
}

/// What went wrong in a backend call.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum BackendErrorKind {
    /// The call did not complete within its timeout.
    Timeout,
    /// The connection to the backend failed or was lost.
    Connection,
    /// The backend is known to be unavailable (for example, shut down or cooling down after
    /// repeated failures), so the call was not attempted.
    Unavailable,
    /// A key or value is larger than the backend accepts.
    TooLarge,
    /// Stored bytes are not in the expected format (corrupt, truncated or foreign data).
    Corrupt,
    /// The backend answered with something the client did not expect.
    Protocol,
    /// The backend rejected the command (wrong type, script error, out of memory, read-only).
    Command,
    /// The backend is misconfigured or the configuration given is invalid.
    Config,
}

impl BackendErrorKind {
    fn as_str(self) -> &'static str {
        match self {
            Self::Timeout => "timed out",
            Self::Connection => "connection failed",
            Self::Unavailable => "backend unavailable",
            Self::TooLarge => "too large",
            Self::Corrupt => "corrupt data",
            Self::Protocol => "unexpected reply",
            Self::Command => "command rejected",
            Self::Config => "invalid configuration",
        }
    }
}

/// The error of every backend call (KV store, invalidation bus, lease store, rate store).
pub struct BackendError {
    kind: BackendErrorKind,
    detail: Option<Box<str>>,
    source: Option<Box<dyn StdError + Send + Sync + 'static>>,
}

impl BackendError {
    /// An error of `kind` with no further detail.
    pub fn new(kind: BackendErrorKind) -> Self {
        Self {
            kind,
            detail: None,
            source: None,
        }
    }

    /// An error of `kind` with a human-readable detail.
    pub fn with_detail(kind: BackendErrorKind, detail: impl Into<Box<str>>) -> Self {
        Self {
            kind,
            detail: Some(detail.into()),
            source: None,
        }
    }

    /// Attaches the backend's own error as the source.
    #[must_use]
    pub fn with_source(mut self, source: impl StdError + Send + Sync + 'static) -> Self {
        self.source = Some(Box::new(source));
        self
    }

    /// What went wrong.
    pub fn kind(&self) -> BackendErrorKind {
        self.kind
    }

    /// The detail given when the error was made, if any.
    pub fn detail(&self) -> Option<&str> {
        self.detail.as_deref()
    }
}

impl Classify for BackendError {
    fn is_timeout(&self) -> bool {
        self.kind == BackendErrorKind::Timeout
    }

    fn is_retryable(&self) -> bool {
        matches!(
            self.kind,
            BackendErrorKind::Timeout
                | BackendErrorKind::Connection
                | BackendErrorKind::Unavailable
        )
    }
}

impl fmt::Debug for BackendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("BackendError");
        d.field("kind", &self.kind);
        if let Some(detail) = &self.detail {
            d.field("detail", detail);
        }
        if let Some(source) = &self.source {
            d.field("source", source);
        }
        d.finish()
    }
}

impl fmt::Display for BackendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.kind.as_str())?;
        if let Some(detail) = &self.detail {
            write!(f, ": {detail}")?;
        }
        Ok(())
    }
}

impl StdError for BackendError {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        self.source
            .as_deref()
            .map(|source| source as &(dyn StdError + 'static))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classification_follows_kind() {
        let timeout = BackendError::new(BackendErrorKind::Timeout);
        assert!(timeout.is_timeout() && timeout.is_retryable() && !timeout.is_rejected());
        let corrupt = BackendError::with_detail(BackendErrorKind::Corrupt, "bad envelope");
        assert!(!corrupt.is_timeout() && !corrupt.is_retryable());
        assert_eq!(corrupt.to_string(), "corrupt data: bad envelope");
    }

    #[test]
    fn source_is_kept() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset");
        let err = BackendError::new(BackendErrorKind::Connection).with_source(io);
        assert_eq!(
            err.source().map(ToString::to_string).as_deref(),
            Some("reset")
        );
    }
}
