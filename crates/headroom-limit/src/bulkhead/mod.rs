//! Bulkheads: named compartments of bounded concurrency with a bounded, timed wait queue.

mod permits;
mod sync;

use std::fmt;
use std::pin::pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures_util::future::{Either, select};
use headroom_core::Clock;
use headroom_core::metrics::{Counter, Gauge};
use tracing::Instrument;

use permits::{Entry, Permits};

use crate::adaptive::{AdaptiveConfig, AdaptiveLimit, Outcome};
use crate::error::admission_outcome;
use crate::limits::MAX_LIMIT;
use crate::metrics::AdmissionMetrics;
use crate::{ConfigError, Overloaded, Priority, Reason};

/// Configuration of a [`Bulkhead`], loadable with serde (feature `serde`).
///
/// ```
/// # #[cfg(feature = "serde")] {
/// use headroom_limit::BulkheadConfig;
///
/// let config: BulkheadConfig = serde_json::from_str(
///     r#"{ "max_concurrent": 32, "max_queued": 64, "max_wait": "50ms" }"#,
/// ).unwrap();
/// assert_eq!(config.max_wait, std::time::Duration::from_millis(50));
/// # }
/// ```
#[derive(Clone, Debug, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(default, deny_unknown_fields))]
pub struct BulkheadConfig {
    /// How many callers may hold a permit at once (ignored when `adaptive` is set); 1 to
    /// 2³¹ − 1.
    pub max_concurrent: usize,
    /// How many callers may wait for a permit; 0 rejects as soon as every permit is taken
    /// (at most 2³² − 1 wait at once, whatever the setting).
    pub max_queued: usize,
    /// How long a caller waits for a permit before it is rejected.
    #[cfg_attr(feature = "serde", serde(with = "humantime_serde"))]
    pub max_wait: Duration,
    /// Learn the concurrency limit from latency and errors instead of fixing it.
    pub adaptive: Option<AdaptiveConfig>,
}

impl Default for BulkheadConfig {
    fn default() -> Self {
        Self {
            max_concurrent: 64,
            max_queued: 0,
            max_wait: Duration::from_millis(100),
            adaptive: None,
        }
    }
}

/// A named compartment that bounds how much work runs at once.
///
/// At most [`limit`](Bulkhead::limit) callers hold a [`Permit`]; up to
/// [`max_queued`](Bulkhead::max_queued) more wait for one, in arrival order, each for at most
/// [`max_wait`](Bulkhead::max_wait). Everyone else is refused at once with [`Overloaded`].
/// A permit is returned when it is dropped: on success, on error, on panic and when the
/// future holding it is cancelled. Waiting callers that are cancelled leave the queue.
///
/// Like tokio's semaphore, permits come in two kinds: [`Permit`] borrows the bulkhead (the
/// cheapest), [`OwnedPermit`] owns a handle to it (for futures and tasks that must be
/// `'static`).
///
/// Cloning is cheap; clones share the compartment. The uncontended acquire and the release
/// of a permit take no lock of their own and do not allocate.
///
/// ```
/// use std::time::Duration;
/// use headroom_limit::{Bulkhead, Reason};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let bulkhead = Bulkhead::builder("payments")
///     .max_concurrent(2)
///     .max_queued(0)
///     .build()?;
/// let a = bulkhead.acquire().await?;
/// let _b = bulkhead.try_acquire_owned()?;
/// assert_eq!(bulkhead.try_acquire().unwrap_err().reason(), Reason::QueueFull);
/// drop(a);
/// assert!(bulkhead.try_acquire().is_ok());
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Bulkhead {
    inner: Arc<Inner>,
}

/// What the clones of a bulkhead share: its permits, settings, signals and metrics.
struct Inner {
    permits: Permits,
    max_queued: AtomicUsize,
    max_wait_nanos: AtomicU64,
    /// Wait of the most recently admitted caller (0 when it did not wait).
    last_wait_nanos: AtomicU64,
    /// When that wait ended, in nanoseconds since `created`.
    last_wait_at_nanos: AtomicU64,
    created: Instant,
    name: Arc<str>,
    clock: Clock,
    adaptive: Option<AdaptiveLimit>,
    metrics: AdmissionMetrics,
    in_flight_gauge: Gauge,
    limit_gauge: Gauge,
    limit_changes: Counter,
}

/// Builds a [`Bulkhead`].
#[must_use]
#[derive(Debug)]
pub struct BulkheadBuilder {
    name: String,
    config: BulkheadConfig,
    clock: Clock,
}

impl Bulkhead {
    /// A builder for a bulkhead named `name` (the `bulkhead` label of its metrics).
    pub fn builder(name: impl Into<String>) -> BulkheadBuilder {
        BulkheadBuilder {
            name: name.into(),
            config: BulkheadConfig::default(),
            clock: Clock::system(),
        }
    }

    /// A bulkhead named `name` from a loaded configuration.
    pub fn from_config(
        name: impl Into<String>,
        config: BulkheadConfig,
    ) -> Result<Self, ConfigError> {
        Self::builder(name).config(config).build()
    }

    /// Takes a permit if one is free right now; never waits.
    ///
    /// Fails with [`Reason::QueueFull`] when every permit is in use.
    #[inline]
    pub fn try_acquire(&self) -> Result<Permit<'_>, Overloaded> {
        match self.inner.try_take() {
            Some(started) => Ok(Permit::new(&self.inner, started)),
            None => Err(self.inner.reject(Reason::QueueFull, Priority::Default)),
        }
    }

    /// Like [`try_acquire`](Self::try_acquire), returning a permit that owns a handle to the
    /// bulkhead.
    #[inline]
    pub fn try_acquire_owned(&self) -> Result<OwnedPermit, Overloaded> {
        self.try_acquire().map(Permit::into_owned)
    }

    /// Takes a permit, waiting in the queue for one if there is room.
    ///
    /// Fails with [`Reason::QueueFull`] when every permit is taken and the queue is full, and
    /// with [`Reason::WaitTimeout`] after waiting [`max_wait`](Bulkhead::max_wait). Dropping
    /// the future gives up the place in the queue.
    pub async fn acquire(&self) -> Result<Permit<'_>, Overloaded> {
        self.acquire_as(Priority::Default).await
    }

    /// Like [`acquire`](Self::acquire), returning a permit that owns a handle to the
    /// bulkhead.
    pub async fn acquire_owned(&self) -> Result<OwnedPermit, Overloaded> {
        self.acquire().await.map(Permit::into_owned)
    }

    pub(crate) async fn acquire_as(&self, priority: Priority) -> Result<Permit<'_>, Overloaded> {
        let started = match self.inner.try_take() {
            Some(started) => started,
            None => self.inner.wait(priority).await?,
        };
        Ok(Permit::new(&self.inner, started))
    }

    /// Takes a free permit without counting a refusal when there is none.
    #[cfg(feature = "tower")]
    #[inline]
    pub(crate) fn try_admit_owned(&self) -> Option<OwnedPermit> {
        let started = self.inner.try_take()?;
        Some(Permit::new(&self.inner, started).into_owned())
    }

    /// Refuses a caller of `priority` that found every permit taken and may not wait.
    #[cfg(feature = "tower")]
    pub(crate) fn reject_full(&self, priority: Priority) -> Overloaded {
        self.inner.reject(Reason::QueueFull, priority)
    }

    /// The bulkhead's name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The current concurrency limit.
    pub fn limit(&self) -> usize {
        self.inner.permits.limit()
    }

    /// How many permits are held right now.
    ///
    /// Derived from the free permits rather than counted, so the hot path pays nothing for
    /// it; under concurrent change it is a snapshot, not a synchronised value.
    pub fn in_use(&self) -> usize {
        self.inner.in_use()
    }

    /// How many callers are waiting for a permit right now.
    pub fn queued(&self) -> usize {
        self.inner.permits.waiting()
    }

    /// How many callers may wait for a permit.
    pub fn max_queued(&self) -> usize {
        self.inner.max_queued.load(Ordering::Relaxed)
    }

    /// How long a caller may wait for a permit.
    pub fn max_wait(&self) -> Duration {
        Duration::from_nanos(self.inner.max_wait_nanos.load(Ordering::Relaxed))
    }

    /// How long the most recently admitted caller waited (zero if it did not wait).
    pub fn queue_delay(&self) -> Duration {
        Duration::from_nanos(self.inner.last_wait_nanos.load(Ordering::Relaxed))
    }

    /// How long ago the wait reported by [`queue_delay`](Self::queue_delay) ended: a signal
    /// that nobody has refreshed for a while says little about the queue now.
    pub fn queue_delay_age(&self) -> Duration {
        let inner = &*self.inner;
        let at = Duration::from_nanos(inner.last_wait_at_nanos.load(Ordering::Relaxed));
        inner
            .clock
            .now()
            .saturating_duration_since(inner.created)
            .saturating_sub(at)
    }

    /// Whether `self` and `other` are handles to one bulkhead (clones of each other), not
    /// merely bulkheads of the same name.
    pub fn is_same(&self, other: &Bulkhead) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }

    /// The adaptive limit steering this bulkhead, if it has one.
    pub fn adaptive(&self) -> Option<&AdaptiveLimit> {
        self.inner.adaptive.as_ref()
    }

    /// How many callers were refused for `reason` (counted since the bulkhead was built).
    pub fn rejected(&self, reason: Reason) -> u64 {
        Priority::ALL
            .iter()
            .map(|&priority| self.inner.metrics.rejections.count(priority, reason))
            .sum()
    }

    /// Changes the concurrency limit at run time.
    ///
    /// Growing takes effect at once and wakes waiters. Shrinking never revokes a held permit:
    /// free permits are retired at once and the rest as their holders release them. With an
    /// adaptive limit, the next sample sets the limit again.
    pub fn set_max_concurrent(&self, limit: usize) -> Result<(), ConfigError> {
        validate_limit(limit)?;
        self.inner.resize(limit);
        Ok(())
    }

    /// Changes how many callers may wait. Callers already waiting keep their place.
    pub fn set_max_queued(&self, max_queued: usize) {
        self.inner.max_queued.store(max_queued, Ordering::Relaxed);
    }

    /// Changes how long callers that start waiting from now on may wait.
    pub fn set_max_wait(&self, max_wait: Duration) {
        let nanos = u64::try_from(max_wait.as_nanos()).unwrap_or(u64::MAX);
        self.inner.max_wait_nanos.store(nanos, Ordering::Relaxed);
    }

    /// Replaces the limits while the bulkhead runs, as [`set_max_concurrent`],
    /// [`set_max_queued`] and [`set_max_wait`] do: no permit is revoked and no waiter loses its
    /// place. An adaptive limit's settings are fixed when the bulkhead is built: a
    /// configuration may leave `adaptive` out or repeat it unchanged (and its
    /// `max_concurrent` is then ignored), and one that changes it is refused, as is an
    /// invalid one; the settings in force stay.
    ///
    /// Neither this nor the setters consult the shedders guarding the bulkhead: a shorter
    /// `max_wait` or no queue can put a shedder's queue-delay target out of reach, and the
    /// shedder then never sheds on queue delay. Check such a change with
    /// [`LoadShedConfig::check_reachable`](crate::LoadShedConfig::check_reachable) first, or
    /// reload the bulkhead and its shedder together through the facade's reloader, which does.
    ///
    /// [`set_max_concurrent`]: Self::set_max_concurrent
    /// [`set_max_queued`]: Self::set_max_queued
    /// [`set_max_wait`]: Self::set_max_wait
    pub fn reconfigure(&self, config: &BulkheadConfig) -> Result<(), ConfigError> {
        self.check_config(config)?;
        if self.inner.adaptive.is_none() {
            self.set_max_concurrent(config.max_concurrent)?;
        }
        self.set_max_queued(config.max_queued);
        self.set_max_wait(config.max_wait);
        Ok(())
    }

    /// Whether [`reconfigure`](Self::reconfigure) would accept `config`.
    pub fn check_config(&self, config: &BulkheadConfig) -> Result<(), ConfigError> {
        match (&config.adaptive, &self.inner.adaptive) {
            (None, None) => validate_limit(config.max_concurrent),
            // Not named: the adaptive limit stays as built.
            (None, Some(_)) => Ok(()),
            (Some(given), Some(built)) if given == built.config() => Ok(()),
            (Some(_), Some(_)) => Err(ConfigError::new(
                "adaptive",
                "settings are fixed when the bulkhead is built; build a new bulkhead to change them",
            )),
            (Some(_), None) => Err(ConfigError::new(
                "adaptive",
                "cannot be switched on at run time; build a new bulkhead",
            )),
        }
    }
}

/// When a permit was taken: only read (and only worth a clock read) with an adaptive limit.
type Started = Option<Instant>;

impl Inner {
    /// Takes a free permit, if any.
    #[inline]
    fn try_take(&self) -> Option<Started> {
        if !self.permits.try_take() {
            return None;
        }
        if self.last_wait_nanos.load(Ordering::Relaxed) != 0 {
            self.last_wait_nanos.store(0, Ordering::Relaxed);
        }
        Some(self.admitted())
    }

    async fn wait(&self, priority: Priority) -> Result<Started, Overloaded> {
        let max_queued = self.max_queued.load(Ordering::Relaxed);
        let waiter = match self.permits.take_or_wait(max_queued) {
            Entry::Taken => return Ok(self.admitted()),
            Entry::Waiting(waiter) => waiter,
            Entry::Full => return Err(self.reject(Reason::QueueFull, priority)),
        };
        // Only a caller that waits opens a span: taking a free permit costs a few nanoseconds.
        let span = tracing::debug_span!("bulkhead.acquire", name = %self.name, outcome = tracing::field::Empty);
        let result = self
            .wait_in_queue(waiter, priority)
            .instrument(span.clone())
            .await;
        span.record("outcome", admission_outcome(&result));
        result
    }

    /// Waits in the queue for a permit handed over, up to the bulkhead's `max_wait`.
    async fn wait_in_queue(
        &self,
        waiter: permits::Waiter<'_>,
        priority: Priority,
    ) -> Result<Started, Overloaded> {
        let _queued = QueuedGauge::enter(&self.metrics);
        let start = self.clock.now();
        let max_wait = Duration::from_nanos(self.max_wait_nanos.load(Ordering::Relaxed));
        let handed_over = pin!(waiter.handed_over());
        let expire = pin!(self.clock.sleep(max_wait));
        match select(handed_over, expire).await {
            Either::Left((true, _)) => {
                let now = self.clock.now();
                let waited = now.saturating_duration_since(start);
                let nanos = u64::try_from(waited.as_nanos()).unwrap_or(u64::MAX);
                let at = now.saturating_duration_since(self.created).as_nanos();
                self.last_wait_at_nanos
                    .store(u64::try_from(at).unwrap_or(u64::MAX), Ordering::Relaxed);
                self.last_wait_nanos.store(nanos.max(1), Ordering::Relaxed);
                self.metrics.queue_delay.record(waited.as_secs_f64());
                Ok(self.admitted())
            }
            // The hand-off semaphore is never closed; a closed one would mean no permit again.
            Either::Left((false, _)) => Err(self.reject(Reason::Closed, priority)),
            Either::Right(_) => Err(self.reject(Reason::WaitTimeout, priority)),
        }
    }

    #[inline]
    fn admitted(&self) -> Started {
        self.in_flight_gauge.set_level(|| self.permits.in_use());
        self.metrics.admitted.increment(1);
        self.adaptive.as_ref().map(|_| self.rtt_start())
    }

    /// The clock read that starts a round trip, out of line like [`sample`](Self::sample).
    #[inline(never)]
    fn rtt_start(&self) -> Instant {
        self.clock.now()
    }

    fn reject(&self, reason: Reason, priority: Priority) -> Overloaded {
        self.metrics.rejections.record(priority, reason);
        tracing::debug!(bulkhead = %self.name, %reason, %priority, "rejected");
        Overloaded::new(reason, priority)
    }

    fn in_use(&self) -> usize {
        self.permits.in_use()
    }

    fn resize(&self, new: usize) {
        if let Some(old) = self.permits.resize(new) {
            self.limit_gauge.set(new as f64);
            self.limit_changes.increment(1);
            tracing::debug!(bulkhead = %self.name, old, new, "concurrency limit changed");
        }
    }

    /// Gives a permit back, first teaching the adaptive limit how the work went.
    #[inline]
    fn release(&self, started: Started, outcome: Outcome) {
        if let Some(started) = started {
            self.sample(started, outcome);
        }
        self.permits.release();
        self.in_flight_gauge.set_level(|| self.permits.in_use());
    }

    /// Teaches the adaptive limit the round trip and outcome of one permit, out of line so
    /// that a fixed limit's release stays small enough to inline.
    #[inline(never)]
    fn sample(&self, started: Instant, outcome: Outcome) {
        let Some(adaptive) = &self.adaptive else {
            return;
        };
        let outcome = if std::thread::panicking() {
            Outcome::Ignored
        } else {
            outcome
        };
        let rtt = self.clock.now().saturating_duration_since(started);
        let limit = adaptive.sample(rtt, self.in_use(), outcome);
        if limit != self.permits.limit() {
            self.resize(limit);
        }
    }
}

fn validate_limit(limit: usize) -> Result<(), ConfigError> {
    if limit == 0 {
        return Err(ConfigError::new("max_concurrent", "must be at least 1"));
    }
    if limit > MAX_LIMIT {
        return Err(ConfigError::new(
            "max_concurrent",
            "must be at most 2147483647 (2^31 - 1)",
        ));
    }
    Ok(())
}

/// Counts a caller in the queued gauge for as long as it waits.
struct QueuedGauge<'a>(&'a AdmissionMetrics);

impl<'a> QueuedGauge<'a> {
    fn enter(metrics: &'a AdmissionMetrics) -> Self {
        metrics.queued.increment(1.0);
        Self(metrics)
    }
}

impl Drop for QueuedGauge<'_> {
    fn drop(&mut self) {
        self.0.queued.decrement(1.0);
    }
}

impl fmt::Debug for Bulkhead {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Bulkhead")
            .field("name", &self.inner.name)
            .field("limit", &self.limit())
            .field("in_use", &self.in_use())
            .field("queued", &self.queued())
            .finish()
    }
}

impl BulkheadBuilder {
    /// How many callers may hold a permit at once (default 64).
    pub fn max_concurrent(mut self, max_concurrent: usize) -> Self {
        self.config.max_concurrent = max_concurrent;
        self
    }

    /// How many callers may wait for a permit (default 0: reject when full).
    pub fn max_queued(mut self, max_queued: usize) -> Self {
        self.config.max_queued = max_queued;
        self
    }

    /// How long a caller may wait for a permit (default 100 ms).
    pub fn max_wait(mut self, max_wait: Duration) -> Self {
        self.config.max_wait = max_wait;
        self
    }

    /// Learn the concurrency limit with `config` instead of fixing it.
    pub fn adaptive(mut self, config: AdaptiveConfig) -> Self {
        self.config.adaptive = Some(config);
        self
    }

    /// Replaces every setting with `config`.
    pub fn config(mut self, config: BulkheadConfig) -> Self {
        self.config = config;
        self
    }

    /// The clock that times waits (default: [`Clock::system`]).
    pub fn clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    /// Builds the bulkhead, or says which setting is out of range.
    pub fn build(self) -> Result<Bulkhead, ConfigError> {
        let adaptive = self
            .config
            .adaptive
            .map(|config| AdaptiveLimit::new(&self.name, config))
            .transpose()?;
        let limit = match &adaptive {
            Some(adaptive) => adaptive.limit(),
            None => self.config.max_concurrent,
        };
        validate_limit(limit)?;
        let max_wait_nanos = u64::try_from(self.config.max_wait.as_nanos()).unwrap_or(u64::MAX);
        let limit_gauge = headroom_core::gauge!("headroom_limit_concurrency_limit_requests", "bulkhead" => self.name.clone());
        limit_gauge.set(limit as f64);
        let in_flight_gauge = headroom_core::gauge!("headroom_limit_in_flight_requests", "bulkhead" => self.name.clone());
        let limit_changes = headroom_core::counter!("headroom_limit_limit_changes_total", "bulkhead" => self.name.clone());
        Ok(Bulkhead {
            inner: Arc::new(Inner {
                metrics: AdmissionMetrics::new("bulkhead", &self.name),
                name: Arc::from(self.name),
                permits: Permits::new(limit),
                max_queued: AtomicUsize::new(self.config.max_queued),
                max_wait_nanos: AtomicU64::new(max_wait_nanos),
                last_wait_nanos: AtomicU64::new(0),
                last_wait_at_nanos: AtomicU64::new(0),
                created: self.clock.now(),
                clock: self.clock,
                adaptive,
                limit_gauge,
                in_flight_gauge,
                limit_changes,
            }),
        })
    }
}

/// The right to run one unit of work in a [`Bulkhead`]; dropping it gives the right back.
///
/// Borrows the bulkhead; [`into_owned`](Permit::into_owned) turns it into an
/// [`OwnedPermit`]. With an adaptive limit, dropping the permit also reports how long it was
/// held and its [`Outcome`]: success unless [`set_outcome`](Permit::set_outcome) says
/// otherwise; a permit dropped while panicking reports [`Outcome::Ignored`].
///
/// A permit cannot tell a cancelled holder from a finished one. When the work under a permit
/// may be cancelled (a timeout around it), mark the permit [`Outcome::Dropped`] before the work
/// and [`Outcome::Success`] after it, as the tower layer does, so that a cancellation counts
/// as a drop:
///
/// ```
/// use headroom_limit::Bulkhead;
/// use headroom_limit::adaptive::Outcome;
///
/// # async fn work() {}
/// # async fn run(bulkhead: &Bulkhead) -> Result<(), headroom_limit::Overloaded> {
/// let mut permit = bulkhead.acquire().await?;
/// permit.set_outcome(Outcome::Dropped);
/// work().await;
/// permit.set_outcome(Outcome::Success);
/// # Ok(()) }
/// ```
#[must_use = "the permit is released as soon as it is dropped"]
pub struct Permit<'a> {
    inner: &'a Arc<Inner>,
    started: Started,
    outcome: Outcome,
}

impl<'a> Permit<'a> {
    #[inline]
    fn new(inner: &'a Arc<Inner>, started: Started) -> Self {
        Self {
            inner,
            started,
            outcome: Outcome::Success,
        }
    }

    /// Records how the work ended, for the adaptive limit (a no-op without one).
    pub fn set_outcome(&mut self, outcome: Outcome) {
        self.outcome = outcome;
    }

    /// The same permit, owning a handle to the bulkhead so it can outlive the borrow.
    #[inline]
    pub fn into_owned(self) -> OwnedPermit {
        let this = std::mem::ManuallyDrop::new(self);
        OwnedPermit {
            inner: Arc::clone(this.inner),
            started: this.started,
            outcome: this.outcome,
        }
    }
}

impl Drop for Permit<'_> {
    #[inline]
    fn drop(&mut self) {
        self.inner.release(self.started, self.outcome);
    }
}

impl fmt::Debug for Permit<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Permit")
            .field("bulkhead", &self.inner.name)
            .field("outcome", &self.outcome)
            .finish()
    }
}

/// A [`Permit`] that owns a handle to its [`Bulkhead`], for `'static` futures and tasks.
#[must_use = "the permit is released as soon as it is dropped"]
pub struct OwnedPermit {
    inner: Arc<Inner>,
    started: Started,
    outcome: Outcome,
}

impl OwnedPermit {
    /// Records how the work ended, for the adaptive limit (a no-op without one).
    pub fn set_outcome(&mut self, outcome: Outcome) {
        self.outcome = outcome;
    }
}

impl Drop for OwnedPermit {
    #[inline]
    fn drop(&mut self) {
        self.inner.release(self.started, self.outcome);
    }
}

impl fmt::Debug for OwnedPermit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OwnedPermit")
            .field("bulkhead", &self.inner.name)
            .field("outcome", &self.outcome)
            .finish()
    }
}
