//! Load shedding: refuse work early, least important first, when the service is saturated.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use headroom_core::Signal;

use crate::metrics::Rejections;
use crate::{
    Bulkhead, BulkheadConfig, ConfigError, Overloaded, OwnedPermit, Permit, Priority, Reason,
};

/// Configuration of a [`LoadShedder`], loadable with serde (feature `serde`).
///
/// Each priority has a threshold on the *load*, a number where 1.0 means saturated. The load
/// is the larger of:
///
/// - concurrency: `(in use + queued) / (limit + max queued)` of the guarded bulkhead (whose
///   limit may be adaptive), and
/// - queue delay: the bulkhead's latest queue delay divided by `queue_delay_target`, fading
///   linearly to zero over `queue_delay_decay` after that wait ended. The signal is refreshed
///   only when a caller is admitted; the fade keeps a shedder that refuses everyone from
///   latching shut, so after an overload every priority is admitted again within
///   `queue_delay_decay`.
///
/// Work of a priority is refused once the load reaches its threshold, so with the defaults
/// sheddable work goes at 70 %, default work at 90 %, and critical work only when the
/// compartment is full or the queue delay reaches its target.
#[derive(Clone, Debug, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(default, deny_unknown_fields))]
pub struct LoadShedConfig {
    /// Load at which critical work is refused (default 1.0).
    pub critical_at: f64,
    /// Load at which default work is refused (default 0.9).
    pub default_at: f64,
    /// Load at which sheddable work is refused (default 0.7).
    pub sheddable_at: f64,
    /// Queue delay that counts as a load of 1.0; `None` ignores queue delay.
    #[cfg_attr(feature = "serde", serde(with = "humantime_serde"))]
    pub queue_delay_target: Option<Duration>,
    /// How long the queue-delay signal takes to fade to zero when nobody is admitted after
    /// the wait it reports (default 1 s).
    #[cfg_attr(feature = "serde", serde(with = "humantime_serde"))]
    pub queue_delay_decay: Duration,
}

impl Default for LoadShedConfig {
    fn default() -> Self {
        Self {
            critical_at: 1.0,
            default_at: 0.9,
            sheddable_at: 0.7,
            queue_delay_target: None,
            queue_delay_decay: Duration::from_secs(1),
        }
    }
}

impl LoadShedConfig {
    /// Checks every setting, as [`LoadShedderBuilder::build`] and
    /// [`LoadShedder::reconfigure`] do.
    pub fn validate(&self) -> Result<(), ConfigError> {
        for (field, value) in [
            ("critical_at", self.critical_at),
            ("default_at", self.default_at),
            ("sheddable_at", self.sheddable_at),
        ] {
            if !(value > 0.0 && value <= 1.0) {
                return Err(ConfigError::new(field, "must lie in (0, 1]"));
            }
        }
        if !(self.sheddable_at <= self.default_at && self.default_at <= self.critical_at) {
            return Err(ConfigError::new(
                "default_at",
                "thresholds must not decrease with importance",
            ));
        }
        if self.queue_delay_target == Some(Duration::ZERO) {
            return Err(ConfigError::new("queue_delay_target", "must be positive"));
        }
        if self.queue_delay_decay.is_zero() {
            return Err(ConfigError::new("queue_delay_decay", "must be positive"));
        }
        Ok(())
    }

    /// Checks that waits in a bulkhead configured as `bulkhead` can reach the queue-delay
    /// target, as [`LoadShedderBuilder::build`] and [`LoadShedder::reconfigure`] do against
    /// the bulkhead in force. Only `max_queued` and `max_wait` matter. Use it before changing
    /// a bulkhead that a shedder with a target guards: the bulkhead's own setters do not know
    /// its shedders.
    pub fn check_reachable(&self, bulkhead: &BulkheadConfig) -> Result<(), ConfigError> {
        reachable(self, bulkhead.max_queued, bulkhead.max_wait)
    }
}

/// Refuses work by priority before it reaches a saturated [`Bulkhead`].
///
/// A bulkhead alone treats every caller alike: when it is full, whoever comes next is refused.
/// The shedder looks at how loaded the bulkhead is and refuses the less important classes
/// first, keeping the remaining room for critical work. Refusals are typed
/// ([`Overloaded`] with [`Reason::InFlight`], [`Reason::AdaptiveLimit`],
/// [`Reason::QueueDelay`] or [`Reason::Signal`]) and counted by priority and reason
/// (`headroom_limit_rejected_total{shedder, priority, reason}`).
///
/// ```
/// use headroom_limit::{Bulkhead, LoadShedder, Priority, Reason};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let bulkhead = Bulkhead::builder("api").max_concurrent(10).build()?;
/// let shedder = LoadShedder::builder(bulkhead).build()?;
/// let mut held = Vec::new();
/// for _ in 0..7 {
///     held.push(shedder.acquire(Priority::Default).await?);
/// }
/// // 70 % in use: sheddable work is refused, the rest still gets in.
/// let refused = shedder.check(Priority::Sheddable).unwrap_err();
/// assert_eq!(refused.reason(), Reason::InFlight);
/// assert!(shedder.check(Priority::Critical).is_ok());
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct LoadShedder {
    inner: Arc<Inner>,
}

struct Inner {
    name: Arc<str>,
    bulkhead: Bulkhead,
    config: ArcSwap<LoadShedConfig>,
    rejections: Rejections,
    signals: Vec<(Signal, Priority)>,
}

/// Builds a [`LoadShedder`].
#[must_use]
#[derive(Debug)]
pub struct LoadShedderBuilder {
    bulkhead: Bulkhead,
    config: LoadShedConfig,
    signals: Vec<(Signal, Priority)>,
}

impl LoadShedder {
    /// A builder for a shedder guarding `bulkhead` (its metrics carry the bulkhead's name).
    pub fn builder(bulkhead: Bulkhead) -> LoadShedderBuilder {
        LoadShedderBuilder {
            bulkhead,
            config: LoadShedConfig::default(),
            signals: Vec::new(),
        }
    }

    /// Admits or refuses work of `priority` given the current load; takes no permit.
    pub fn check(&self, priority: Priority) -> Result<(), Overloaded> {
        let inner = &*self.inner;
        let Some(reason) = self.saturation(priority) else {
            return Ok(());
        };
        inner.rejections.record(priority, reason);
        tracing::debug!(shedder = %inner.name, %reason, %priority, "shed");
        Err(Overloaded::new(reason, priority))
    }

    /// Why work of `priority` would be refused now, if it would.
    fn saturation(&self, priority: Priority) -> Option<Reason> {
        let inner = &*self.inner;
        if inner
            .signals
            .iter()
            .any(|(signal, up_to)| priority >= *up_to && signal.is_raised())
        {
            return Some(Reason::Signal);
        }
        let bulkhead = &inner.bulkhead;
        let config = inner.config.load();
        let threshold = match priority {
            Priority::Critical => config.critical_at,
            Priority::Default => config.default_at,
            Priority::Sheddable => config.sheddable_at,
        };
        // Added as floats: a queue configured as long as a `usize` allows must not overflow.
        let capacity = bulkhead.limit() as f64 + bulkhead.max_queued() as f64;
        let concurrency = (bulkhead.in_use() + bulkhead.queued()) as f64 / capacity;
        if concurrency >= threshold {
            return Some(match bulkhead.adaptive() {
                Some(adaptive) => {
                    // Demand the limit did not meet, though it may look idle below the share.
                    adaptive.refused_demand();
                    Reason::AdaptiveLimit
                }
                None => Reason::InFlight,
            });
        }
        let target = config.queue_delay_target?;
        let delay = bulkhead.queue_delay();
        if delay.is_zero() {
            return None;
        }
        // Only admissions refresh the signal, and a shedder refusing everything admits
        // nobody: left as it was, the signal would keep every priority out for good.
        let fade =
            1.0 - bulkhead.queue_delay_age().as_secs_f64() / config.queue_delay_decay.as_secs_f64();
        let load = delay.as_secs_f64() / target.as_secs_f64() * fade.max(0.0);
        (load >= threshold).then_some(Reason::QueueDelay)
    }

    /// Checks the load, then takes a permit from the bulkhead (waiting in its queue if
    /// allowed). Refusals of the bulkhead itself carry `priority` too.
    pub async fn acquire(&self, priority: Priority) -> Result<Permit<'_>, Overloaded> {
        self.check(priority)?;
        self.inner.bulkhead.acquire_as(priority).await
    }

    /// Like [`acquire`](Self::acquire), returning a permit that owns a handle to the
    /// bulkhead.
    pub async fn acquire_owned(&self, priority: Priority) -> Result<OwnedPermit, Overloaded> {
        self.acquire(priority).await.map(Permit::into_owned)
    }

    /// The guarded bulkhead's name (the `shedder` label of its metrics).
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The thresholds in force.
    pub fn config(&self) -> LoadShedConfig {
        LoadShedConfig::clone(&self.inner.config.load())
    }

    /// Replaces the thresholds while the shedder runs: the next check uses them. An invalid
    /// configuration is refused and the one in force stays.
    pub fn reconfigure(&self, config: LoadShedConfig) -> Result<(), ConfigError> {
        config.validate()?;
        let bulkhead = &self.inner.bulkhead;
        reachable(&config, bulkhead.max_queued(), bulkhead.max_wait())?;
        self.inner.config.store(Arc::new(config));
        Ok(())
    }

    /// The guarded bulkhead.
    pub fn bulkhead(&self) -> &Bulkhead {
        &self.inner.bulkhead
    }

    /// How much work of `priority` this shedder refused for `reason` since it was built.
    pub fn rejected(&self, priority: Priority, reason: Reason) -> u64 {
        self.inner.rejections.count(priority, reason)
    }
}

impl fmt::Debug for LoadShedder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LoadShedder")
            .field("bulkhead", &self.inner.bulkhead)
            .field("config", &**self.inner.config.load())
            .field("signals", &self.inner.signals)
            .finish()
    }
}

impl LoadShedderBuilder {
    /// Sets the load at which work of `priority` is refused, in (0, 1].
    pub fn shed_at(mut self, priority: Priority, load: f64) -> Self {
        match priority {
            Priority::Critical => self.config.critical_at = load,
            Priority::Default => self.config.default_at = load,
            Priority::Sheddable => self.config.sheddable_at = load,
        }
        self
    }

    /// Counts a queue delay of `target` as full load (default: queue delay is ignored).
    pub fn queue_delay_target(mut self, target: Duration) -> Self {
        self.config.queue_delay_target = Some(target);
        self
    }

    /// Sets how long the queue-delay signal takes to fade to zero once nobody is admitted
    /// (default 1 s).
    pub fn queue_delay_decay(mut self, decay: Duration) -> Self {
        self.config.queue_delay_decay = decay;
        self
    }

    /// Refuses work of `up_to` and less important priorities while `signal` is raised, with
    /// [`Reason::Signal`], whatever the load: give it an SLO's page signal to keep the error
    /// budget for the work that matters while it burns fast. `up_to` may not be
    /// [`Priority::Critical`], which would refuse everything.
    ///
    /// Record the SLO inside the shedder (its layer after the shedder's), so that what the
    /// shedder refuses is not counted against the budget it protects, and keep the objective
    /// evaluated on a timer (`Objective::evaluate_every`), so that the signal is lowered even
    /// when little traffic reaches it.
    pub fn shed_while(mut self, signal: Signal, up_to: Priority) -> Self {
        self.signals.push((signal, up_to));
        self
    }

    /// Replaces every setting with `config`.
    pub fn config(mut self, config: LoadShedConfig) -> Self {
        self.config = config;
        self
    }

    /// Builds the shedder, or says which setting is out of range (a queue-delay target no
    /// wait in the bulkhead can reach is: see [`queue_delay_target`](Self::queue_delay_target)).
    pub fn build(self) -> Result<LoadShedder, ConfigError> {
        self.config.validate()?;
        reachable(
            &self.config,
            self.bulkhead.max_queued(),
            self.bulkhead.max_wait(),
        )?;
        if self
            .signals
            .iter()
            .any(|(_, up_to)| *up_to == Priority::Critical)
        {
            return Err(ConfigError::new(
                "shed_while",
                "may not shed critical work: that would refuse every request",
            ));
        }
        let name: Arc<str> = Arc::from(self.bulkhead.name());
        Ok(LoadShedder {
            inner: Arc::new(Inner {
                rejections: Rejections::new("shedder", &name),
                name,
                bulkhead: self.bulkhead,
                config: ArcSwap::from_pointee(self.config),
                signals: self.signals,
            }),
        })
    }
}

/// Whether waits in a bulkhead queueing up to `max_queued` callers for up to `max_wait` can
/// reach `config`'s queue-delay target at its lowest threshold: without a queue nobody waits.
fn reachable(
    config: &LoadShedConfig,
    max_queued: usize,
    max_wait: Duration,
) -> Result<(), ConfigError> {
    let Some(target) = config.queue_delay_target else {
        return Ok(());
    };
    if max_queued == 0 {
        return Err(ConfigError::new(
            "queue_delay_target",
            "the bulkhead queues nobody, so no request waits: give it a queue",
        ));
    }
    if max_wait.as_secs_f64() < config.sheddable_at * target.as_secs_f64() {
        return Err(ConfigError::new(
            "queue_delay_target",
            "no wait reaches it: max_wait is below the target times the lowest threshold",
        ));
    }
    Ok(())
}
