use std::time::Duration;

use headroom_core::jobs::MAX_LANES;

/// A queue's configuration, loadable with serde (feature `serde`; durations in humantime
/// form such as `"30s"`; unknown fields are refused).
#[derive(Clone, Debug, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(default, deny_unknown_fields))]
#[non_exhaustive]
pub struct QueueConfig {
    /// How many partitions the queue is spread over (default 1). On Redis Cluster each is its
    /// own slot, so several spread one queue over the cluster's nodes.
    pub partitions: u16,
    /// The most unfinished jobs (waiting, delayed, running or retrying) in the queue (default
    /// 10,000). Each partition holds at most its share, `max_len / partitions` rounded up, so
    /// the queue may hold up to `partitions - 1` more.
    pub max_len: u64,
    /// The most unfinished jobs of one tenant (default: no bound beyond `max_len`). A tenant's
    /// jobs all go to one partition, so this bound is exact.
    pub max_per_tenant: Option<u64>,
    /// The weight of each priority lane, lane 0 first (default one lane, `[1]`). Workers
    /// serve lanes in proportion to their weights, so no lane starves.
    pub lane_weights: Vec<u32>,
    /// How long an idempotency key given on enqueue is remembered (default 24 h).
    #[cfg_attr(feature = "serde", serde(with = "humantime_serde"))]
    pub dedup_window: Duration,
    /// How long a done job's result is kept for `status` (default 24 h).
    #[cfg_attr(feature = "serde", serde(with = "humantime_serde"))]
    pub result_retention: Duration,
    /// How long a dead job is kept (default 7 days).
    #[cfg_attr(feature = "serde", serde(with = "humantime_serde"))]
    pub dead_retention: Duration,
    /// The largest payload accepted, in bytes (default 512 KiB).
    pub max_payload_len: usize,
    /// The largest result kept, in bytes (default 64 KiB); a larger one is dropped (the job is
    /// done, with an empty result) and a warning logged.
    pub max_result_len: usize,
    /// The shortest retry-after a refusal carries (default 100 ms).
    #[cfg_attr(feature = "serde", serde(with = "humantime_serde"))]
    pub min_retry_after: Duration,
    /// The longest retry-after a refusal carries, and the one given when nothing has drained
    /// lately (default 30 s).
    #[cfg_attr(feature = "serde", serde(with = "humantime_serde"))]
    pub max_retry_after: Duration,
    /// Whether each job keeps a 64-bit number drawn at random on enqueue, which makes
    /// [`JobContext::idempotency_key`](crate::JobContext::idempotency_key) unique across
    /// stores too (default off). Workers of versions before this field cannot read jobs
    /// stored with it and bury them as corrupt: turn it on once every worker of the queue
    /// runs this version or a later one.
    pub job_nonces: bool,
}

impl Default for QueueConfig {
    fn default() -> Self {
        Self {
            partitions: 1,
            max_len: 10_000,
            max_per_tenant: None,
            lane_weights: vec![1],
            dedup_window: Duration::from_secs(24 * 3600),
            result_retention: Duration::from_secs(24 * 3600),
            dead_retention: Duration::from_secs(7 * 24 * 3600),
            max_payload_len: 512 * 1024,
            max_result_len: 64 * 1024,
            min_retry_after: Duration::from_millis(100),
            max_retry_after: Duration::from_secs(30),
            job_nonces: false,
        }
    }
}

/// A configuration that cannot work, with the field at fault.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid job configuration: {field} {problem}")]
pub struct InvalidConfig {
    field: &'static str,
    problem: String,
}

impl InvalidConfig {
    pub(crate) fn new(field: &'static str, problem: impl Into<String>) -> Self {
        Self {
            field,
            problem: problem.into(),
        }
    }

    /// The field at fault.
    pub fn field(&self) -> &'static str {
        self.field
    }
}

fn at_least_1ms(field: &'static str, value: Duration) -> Result<(), InvalidConfig> {
    if value < Duration::from_millis(1) {
        return Err(InvalidConfig::new(field, "must be at least 1 ms"));
    }
    Ok(())
}

impl QueueConfig {
    /// Checks every setting, as the queue's builder does.
    pub fn validate(&self) -> Result<(), InvalidConfig> {
        if self.partitions == 0 {
            return Err(InvalidConfig::new("partitions", "must be at least 1"));
        }
        if self.max_len == 0 {
            return Err(InvalidConfig::new("max_len", "must be at least 1"));
        }
        if self.max_per_tenant == Some(0) {
            return Err(InvalidConfig::new("max_per_tenant", "must be at least 1"));
        }
        if self.lane_weights.is_empty() || self.lane_weights.len() > usize::from(MAX_LANES) {
            return Err(InvalidConfig::new(
                "lane_weights",
                format!("must name 1 to {MAX_LANES} lanes"),
            ));
        }
        if self.lane_weights.contains(&0) {
            return Err(InvalidConfig::new("lane_weights", "must all be at least 1"));
        }
        at_least_1ms("dedup_window", self.dedup_window)?;
        at_least_1ms("result_retention", self.result_retention)?;
        at_least_1ms("dead_retention", self.dead_retention)?;
        at_least_1ms("min_retry_after", self.min_retry_after)?;
        if self.max_retry_after < self.min_retry_after {
            return Err(InvalidConfig::new(
                "max_retry_after",
                "must not be below min_retry_after",
            ));
        }
        if self.max_payload_len == 0 {
            return Err(InvalidConfig::new("max_payload_len", "must be at least 1"));
        }
        Ok(())
    }
}

/// A worker's configuration, loadable with serde (feature `serde`).
#[derive(Clone, Debug, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(default, deny_unknown_fields))]
#[non_exhaustive]
pub struct WorkerConfig {
    /// How many jobs run at once (default 8, at most 1,048,576).
    pub concurrency: usize,
    /// Jobs fetched ahead of free handlers (default 8, at most 1,048,576), so one fetch takes
    /// several jobs while handlers are busy. A job fetched ahead is kept (extended) while it
    /// waits, and handed back at once when the worker shuts down. Jobs whose handler answered
    /// while their answer is being stored do not count here; up to `concurrency + prefetch`
    /// of them more are held besides.
    pub prefetch: usize,
    /// How long a job may run without its worker extending it before another worker may
    /// take it over (default 30 s). A live worker extends every third of it, and again a tenth
    /// of it after sending an extension that failed, so it loses its jobs only when it dies,
    /// stalls, or cannot reach the store for over half of it (when the store's calls fail
    /// within a tenth of it).
    #[cfg_attr(feature = "serde", serde(with = "humantime_serde"))]
    pub visibility: Duration,
    /// Deliveries of a job before it is dead (default 5), counting those that ended with
    /// the worker's death.
    pub max_attempts: u32,
    /// The wait before the second attempt (default 1 s).
    #[cfg_attr(feature = "serde", serde(with = "humantime_serde"))]
    pub backoff_initial: Duration,
    /// The factor each later wait grows by (default 2).
    pub backoff_multiplier: f64,
    /// The longest wait between attempts (default 10 min).
    #[cfg_attr(feature = "serde", serde(with = "humantime_serde"))]
    pub backoff_max: Duration,
    /// The share of each wait drawn at random, 0 to 1 (default 0.5: a wait is between half
    /// and all of its exponential value).
    pub backoff_jitter: f64,
    /// The longest pause between fetches when every partition is empty (default 100 ms).
    #[cfg_attr(feature = "serde", serde(with = "humantime_serde"))]
    pub poll_interval: Duration,
    /// How often the queue's depth, ready count and oldest ready age are published as
    /// metrics (default 5 s).
    #[cfg_attr(feature = "serde", serde(with = "humantime_serde"))]
    pub stats_interval: Duration,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            concurrency: 8,
            prefetch: 8,
            visibility: Duration::from_secs(30),
            max_attempts: 5,
            backoff_initial: Duration::from_secs(1),
            backoff_multiplier: 2.0,
            backoff_max: Duration::from_secs(600),
            backoff_jitter: 0.5,
            poll_interval: Duration::from_millis(100),
            stats_interval: Duration::from_secs(5),
        }
    }
}

/// The most handlers, and the most jobs fetched ahead, of one worker: far past what a process
/// runs, and within what a worker's semaphores count.
const MAX_HANDLERS: usize = 1 << 20;

impl WorkerConfig {
    /// Checks every setting, as the worker's builder does.
    pub fn validate(&self) -> Result<(), InvalidConfig> {
        if !(1..=MAX_HANDLERS).contains(&self.concurrency) {
            return Err(InvalidConfig::new(
                "concurrency",
                "must be at least 1 and at most 1,048,576",
            ));
        }
        if self.prefetch > MAX_HANDLERS {
            return Err(InvalidConfig::new("prefetch", "must be at most 1,048,576"));
        }
        if self.visibility < Duration::from_millis(30) {
            return Err(InvalidConfig::new("visibility", "must be at least 30 ms"));
        }
        if self.max_attempts == 0 {
            return Err(InvalidConfig::new("max_attempts", "must be at least 1"));
        }
        if !(self.backoff_multiplier >= 1.0 && self.backoff_multiplier.is_finite()) {
            return Err(InvalidConfig::new(
                "backoff_multiplier",
                "must be a finite number of at least 1",
            ));
        }
        if !(0.0..=1.0).contains(&self.backoff_jitter) {
            return Err(InvalidConfig::new(
                "backoff_jitter",
                "must be between 0 and 1",
            ));
        }
        if self.backoff_max < self.backoff_initial {
            return Err(InvalidConfig::new(
                "backoff_max",
                "must not be below backoff_initial",
            ));
        }
        at_least_1ms("poll_interval", self.poll_interval)?;
        at_least_1ms("stats_interval", self.stats_interval)?;
        Ok(())
    }

    /// The wait after failed attempt `attempt` (1 for the first): `backoff_initial ×
    /// multiplier^(attempt-1)`, at most `backoff_max`, of which the jitter share is drawn
    /// uniformly (`draw` in 0..1).
    pub(crate) fn backoff(&self, attempt: u32, draw: f64) -> Duration {
        let exponent = attempt.saturating_sub(1).min(64) as i32;
        let full = (self.backoff_initial.as_secs_f64() * self.backoff_multiplier.powi(exponent))
            .min(self.backoff_max.as_secs_f64());
        // `backoff_max` may be past what seconds in an `f64` convert back exactly.
        Duration::try_from_secs_f64(full * (1.0 - self.backoff_jitter * draw))
            .unwrap_or(self.backoff_max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_longest_backoff_is_the_maximum_without_a_panic() {
        let config = WorkerConfig {
            backoff_initial: Duration::from_secs(1),
            backoff_multiplier: 1e300,
            backoff_max: Duration::MAX,
            ..WorkerConfig::default()
        };
        config.validate().unwrap();
        for attempt in [2, 100, u32::MAX] {
            assert_eq!(config.backoff(attempt, 0.0), Duration::MAX);
            assert!(config.backoff(attempt, 1.0) < Duration::MAX);
        }
    }

    #[test]
    fn backoff_grows_by_the_multiplier_up_to_the_maximum_and_jitters_down() {
        let config = WorkerConfig {
            backoff_initial: Duration::from_secs(1),
            backoff_multiplier: 3.0,
            backoff_max: Duration::from_secs(20),
            backoff_jitter: 0.5,
            ..WorkerConfig::default()
        };
        assert_eq!(config.backoff(1, 0.0), Duration::from_secs(1));
        assert_eq!(config.backoff(2, 0.0), Duration::from_secs(3));
        assert_eq!(config.backoff(3, 0.0), Duration::from_secs(9));
        assert_eq!(config.backoff(4, 0.0), Duration::from_secs(20));
        assert_eq!(config.backoff(u32::MAX, 0.0), Duration::from_secs(20));
        assert_eq!(config.backoff(2, 1.0), Duration::from_millis(1500));
    }

    #[test]
    fn invalid_settings_name_their_field() {
        let queue = |f: fn(&mut QueueConfig)| {
            let mut config = QueueConfig::default();
            f(&mut config);
            config.validate().unwrap_err().field()
        };
        assert_eq!(queue(|c| c.partitions = 0), "partitions");
        assert_eq!(queue(|c| c.max_len = 0), "max_len");
        assert_eq!(queue(|c| c.lane_weights = vec![]), "lane_weights");
        assert_eq!(queue(|c| c.lane_weights = vec![1; 9]), "lane_weights");
        assert_eq!(queue(|c| c.lane_weights = vec![2, 0]), "lane_weights");
        assert_eq!(queue(|c| c.dedup_window = Duration::ZERO), "dedup_window");
        assert_eq!(
            queue(|c| c.max_retry_after = Duration::ZERO),
            "max_retry_after"
        );
        let worker = |f: fn(&mut WorkerConfig)| {
            let mut config = WorkerConfig::default();
            f(&mut config);
            config.validate().unwrap_err().field()
        };
        assert_eq!(worker(|c| c.concurrency = 0), "concurrency");
        // Past what a worker can count, a typed error rather than a panic at start.
        assert_eq!(worker(|c| c.concurrency = 1 << 62), "concurrency");
        assert_eq!(worker(|c| c.prefetch = usize::MAX), "prefetch");
        assert_eq!(worker(|c| c.visibility = Duration::ZERO), "visibility");
        assert_eq!(worker(|c| c.max_attempts = 0), "max_attempts");
        assert_eq!(
            worker(|c| c.backoff_multiplier = f64::NAN),
            "backoff_multiplier"
        );
        assert_eq!(worker(|c| c.backoff_jitter = 1.5), "backoff_jitter");
        assert_eq!(worker(|c| c.backoff_max = Duration::ZERO), "backoff_max");
    }
}
