use std::time::Duration;

/// What a duplicate does while the first request with its key is still running.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Deserialize, serde::Serialize))]
#[cfg_attr(
    feature = "serde",
    serde(rename_all = "snake_case", tag = "policy", from = "InProgressFields")
)]
pub enum InProgressPolicy {
    /// Fail at once with [`IdempotencyError::InProgress`](crate::IdempotencyError::InProgress)
    /// and a retry-after (HTTP 409).
    Reject,
    /// Wait up to `max_wait` for the outcome and replay it; then fail as with `Reject`.
    Wait {
        /// The longest a duplicate waits.
        #[cfg_attr(feature = "serde", serde(with = "humantime_serde"))]
        max_wait: Duration,
    },
}

/// [`InProgressPolicy`] as loaded: serde lets a unit variant of a tagged enum take any field,
/// so each policy is a struct variant here, and a field it does not take is refused.
#[cfg(feature = "serde")]
#[derive(serde::Deserialize)]
#[serde(rename_all = "snake_case", tag = "policy", deny_unknown_fields)]
enum InProgressFields {
    Reject {},
    Wait {
        #[serde(with = "humantime_serde")]
        max_wait: Duration,
    },
}

#[cfg(feature = "serde")]
impl From<InProgressFields> for InProgressPolicy {
    fn from(fields: InProgressFields) -> Self {
        match fields {
            InProgressFields::Reject {} => InProgressPolicy::Reject,
            InProgressFields::Wait { max_wait } => InProgressPolicy::Wait { max_wait },
        }
    }
}

/// What happens when the record store cannot be reached.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Deserialize, serde::Serialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
pub enum StoreFailure {
    /// Refuse the request with [`IdempotencyError::Unavailable`](crate::IdempotencyError::Unavailable)
    /// (HTTP 503): nothing runs without its record, so nothing runs twice.
    #[default]
    FailClosed,
    /// Run the operation without a record. Duplicates that arrive while the store is down run
    /// again: choose this only where availability matters more than at-most-once. A store that
    /// refuses a new record for want of room (the memory store at its bound, or a tenant at
    /// its share) counts as down too. A duplicate
    /// already told that another request holds its key never runs beside it: while it waits
    /// (see [`InProgressPolicy::Wait`]) a store error counts as one more wait, and once the
    /// wait is over it fails with `Unavailable`.
    FailOpen,
}

/// How an [`Idempotency`](crate::Idempotency) executor behaves.
///
/// Loadable with serde (feature `serde`), with human-readable durations:
///
/// ```
/// # #[cfg(feature = "serde")] {
/// let config: headroom_idempotency::IdempotencyConfig = serde_json::from_str(r#"{
///     "lease": "10s",
///     "retention": "48h",
///     "in_progress": { "policy": "wait", "max_wait": "2s" }
/// }"#).unwrap();
/// assert_eq!(config.retention, std::time::Duration::from_secs(48 * 3600));
///
/// // A field a policy does not take is an error, not ignored.
/// assert!(serde_json::from_str::<headroom_idempotency::IdempotencyConfig>(
///     r#"{ "in_progress": { "policy": "reject", "max_wait": "2s" } }"#
/// ).is_err());
/// # }
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Deserialize, serde::Serialize))]
#[cfg_attr(feature = "serde", serde(default, deny_unknown_fields))]
#[non_exhaustive]
pub struct IdempotencyConfig {
    /// How long a running operation holds its key before another request may take over (if
    /// its holder died). The executor extends the lease every third of it while the operation
    /// runs, so only a stalled or dead holder loses it. Default 30 s.
    #[cfg_attr(feature = "serde", serde(with = "humantime_serde"))]
    pub lease: Duration,
    /// How long a completed outcome is kept for replay. Default 24 h.
    #[cfg_attr(feature = "serde", serde(with = "humantime_serde"))]
    pub retention: Duration,
    /// What a duplicate does while the first request runs. Default: wait up to 5 s.
    pub in_progress: InProgressPolicy,
    /// What happens when the store is down. Default: fail closed.
    pub store_failure: StoreFailure,
    /// The largest encoded outcome stored, in bytes. Default 1 MiB.
    pub max_outcome_len: usize,
}

impl Default for IdempotencyConfig {
    fn default() -> Self {
        Self {
            lease: Duration::from_secs(30),
            retention: Duration::from_secs(24 * 3600),
            in_progress: InProgressPolicy::Wait {
                max_wait: Duration::from_secs(5),
            },
            store_failure: StoreFailure::FailClosed,
            max_outcome_len: 1024 * 1024,
        }
    }
}

/// The longest lease, retention or wait: what every store keeps.
const MAX_TIME: Duration = headroom_core::MAX_DURATION;

impl IdempotencyConfig {
    pub(crate) fn validate(&self) -> Result<(), &'static str> {
        if self.lease < Duration::from_millis(10) {
            return Err("lease must be at least 10 ms");
        }
        if self.retention < Duration::from_millis(1) {
            return Err("retention must be at least 1 ms");
        }
        if self.lease > MAX_TIME {
            return Err("lease must be at most ten years");
        }
        if self.retention > MAX_TIME {
            return Err("retention must be at most ten years");
        }
        if let InProgressPolicy::Wait { max_wait } = self.in_progress
            && max_wait > MAX_TIME
        {
            return Err("max_wait must be at most ten years");
        }
        if self.max_outcome_len == 0 {
            return Err("max_outcome_len must be greater than zero");
        }
        Ok(())
    }
}
