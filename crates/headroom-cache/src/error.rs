use std::error::Error as StdError;
use std::fmt;
use std::sync::Arc;

use headroom_core::Classify;

/// What went wrong in a cache call.
///
/// L2 failures are not among them: a slow or failed L2 never fails a cache call.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum CacheErrorKind {
    /// The key cannot be stored: empty or longer than [`headroom_core::Key::MAX_LEN`] bytes.
    InvalidKey,
    /// The encoded value is larger than the cache's `max_value_len`.
    ValueTooLarge,
    /// A tag is empty or longer than 255 bytes, or an entry has more than
    /// [`MAX_TAGS`](crate::envelope::MAX_TAGS) tags.
    InvalidTag,
    /// The codec could not encode the value.
    Encode,
    /// The loader returned an error and no stale value could be served instead.
    Loader,
    /// The loader did not finish within the hard timeout and no stale value could be served.
    LoaderTimeout,
    /// The loader panicked.
    LoaderPanicked,
}

impl CacheErrorKind {
    fn as_str(self) -> &'static str {
        match self {
            Self::InvalidKey => "invalid key",
            Self::ValueTooLarge => "value too large",
            Self::InvalidTag => "invalid tag",
            Self::Encode => "value could not be encoded",
            Self::Loader => "loader failed",
            Self::LoaderTimeout => "loader timed out",
            Self::LoaderPanicked => "loader panicked",
        }
    }
}

/// The error of every cache call. Cheap to clone: the loader's error is shared by every caller
/// that waited on the same load.
#[derive(Clone)]
pub struct CacheError {
    kind: CacheErrorKind,
    source: Option<Arc<dyn StdError + Send + Sync + 'static>>,
}

impl CacheError {
    pub(crate) fn new(kind: CacheErrorKind) -> Self {
        Self { kind, source: None }
    }

    pub(crate) fn with_source(
        kind: CacheErrorKind,
        source: impl Into<Box<dyn StdError + Send + Sync + 'static>>,
    ) -> Self {
        Self {
            kind,
            source: Some(Arc::from(source.into())),
        }
    }

    /// What went wrong.
    pub fn kind(&self) -> CacheErrorKind {
        self.kind
    }
}

impl Classify for CacheError {
    fn is_timeout(&self) -> bool {
        self.kind == CacheErrorKind::LoaderTimeout
    }

    fn is_retryable(&self) -> bool {
        self.kind == CacheErrorKind::LoaderTimeout
    }
}

impl fmt::Debug for CacheError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("CacheError");
        d.field("kind", &self.kind);
        if let Some(source) = &self.source {
            d.field("source", source);
        }
        d.finish()
    }
}

impl fmt::Display for CacheError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.kind.as_str())
    }
}

impl StdError for CacheError {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        self.source
            .as_deref()
            .map(|source| source as &(dyn StdError + 'static))
    }
}

/// A cache configuration that cannot work (a zero TTL or timeout, for example).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid cache configuration: {reason}")]
pub struct ConfigError {
    reason: &'static str,
}

impl ConfigError {
    pub(crate) fn new(reason: &'static str) -> Self {
        Self { reason }
    }

    /// What is wrong with the configuration.
    pub fn reason(&self) -> &'static str {
        self.reason
    }
}

impl Classify for ConfigError {
    fn is_timeout(&self) -> bool {
        false
    }

    fn is_retryable(&self) -> bool {
        false
    }
}
