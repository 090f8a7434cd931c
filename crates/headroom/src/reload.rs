//! Configuration replaced while the service runs: from code, or from a watched file.
//!
//! Register the parts whose settings may change with a [`Reloader`], then hand it a
//! [`RuntimeConfig`] (built in code or loaded with serde, feature `serde`): the settings of
//! each part it names, by the part's name. A reload is all or nothing: every named part must
//! be registered and every setting valid, or nothing changes and the error says which part
//! and which setting. What a part does with its new settings:
//!
//! | part | settings | in flight |
//! |---|---|---|
//! | bulkhead | `max_concurrent`, `max_queued`, `max_wait` | no permit is revoked; shrinking retires permits as they are released; waiters keep their place |
//! | work queue | capacity, overflow, CoDel, adaptive LIFO | queued items stay; growing lets waiting pushes in |
//! | load shedder | thresholds, queue-delay target and decay | the next check uses them |
//! | rate limiter | tiers and quotas | unchanged tiers keep their keys' state |
//! | circuit breaker | ratios, slow-call duration, minimum calls, open durations, probes | the state and the window's calls are kept |
//! | cache | TTL, soft TTL, jitter, negative TTL | entries keep the deadlines they were written with |
//!
//! Each entry is the part's whole configuration: a field it leaves out takes its default, not
//! the value in force, and a rate limiter's entry lists all its tiers. Settings fixed at build
//! time (a bulkhead's adaptive limit, a breaker's window, the lifetime of a cache without L2)
//! are refused if a reload changes them. A part a configuration no longer names keeps the
//! settings it has.
//!
//! When a reload names a registered shedder or its bulkhead, the shedder's queue-delay target
//! is checked against the bulkhead as the reload leaves it (the bulkhead's new entry, or the
//! settings in force): a reload that gives a bulkhead no queue, or a `max_wait` too short for
//! its shedder's target, is refused, since the shedder would never shed on queue delay again.
//!
//! ```
//! # #[cfg(all(feature = "limit", feature = "breaker"))] {
//! use headroom::limit::{Bulkhead, BulkheadConfig};
//! use headroom::reload::{Reloader, RuntimeConfig};
//!
//! let bulkhead = Bulkhead::builder("catalogue-db").max_concurrent(16).build()?;
//! let reloader = Reloader::new().bulkhead(&bulkhead);
//!
//! let mut config = RuntimeConfig::default();
//! config.bulkheads.insert("catalogue-db".into(), BulkheadConfig { max_concurrent: 32, ..Default::default() });
//! reloader.apply(&config)?;
//! assert_eq!(bulkhead.limit(), 32);
//!
//! // A zero limit is refused, and the limit in force stays.
//! config.bulkheads.insert("catalogue-db".into(), BulkheadConfig { max_concurrent: 0, ..Default::default() });
//! let refused = reloader.apply(&config).unwrap_err();
//! assert_eq!(refused.part(), "bulkhead `catalogue-db`");
//! assert_eq!(bulkhead.limit(), 32);
//! # }
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use headroom_core::Clock;
use headroom_core::metrics::Counter;
use parking_lot::Mutex;

/// The settings that may change while the service runs, by part name. Parts not named keep
/// their settings.
#[derive(Clone, Debug, Default, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(default, deny_unknown_fields))]
#[non_exhaustive]
pub struct RuntimeConfig {
    /// Bulkheads' limits.
    #[cfg(feature = "limit")]
    #[cfg_attr(docsrs, doc(cfg(feature = "limit")))]
    pub bulkheads: std::collections::BTreeMap<String, headroom_limit::BulkheadConfig>,
    /// Work queues' settings.
    #[cfg(feature = "limit")]
    #[cfg_attr(docsrs, doc(cfg(feature = "limit")))]
    pub queues: std::collections::BTreeMap<String, headroom_limit::QueueConfig>,
    /// Load shedders' thresholds, by the name of the bulkhead they guard.
    #[cfg(feature = "limit")]
    #[cfg_attr(docsrs, doc(cfg(feature = "limit")))]
    pub shedders: std::collections::BTreeMap<String, headroom_limit::LoadShedConfig>,
    /// Rate limiters' tiers and quotas.
    #[cfg(feature = "limit")]
    #[cfg_attr(docsrs, doc(cfg(feature = "limit")))]
    pub rate_limits: std::collections::BTreeMap<String, headroom_limit::rate::TierConfig>,
    /// Circuit breakers' thresholds.
    #[cfg(feature = "breaker")]
    #[cfg_attr(docsrs, doc(cfg(feature = "breaker")))]
    pub breakers: std::collections::BTreeMap<String, headroom_breaker::config::BreakerConfig>,
    /// Caches' lifetimes.
    #[cfg(feature = "cache")]
    #[cfg_attr(docsrs, doc(cfg(feature = "cache")))]
    pub caches: std::collections::BTreeMap<String, headroom_cache::TtlConfig>,
}

/// A reload refused: the part and what is wrong. Nothing was changed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReloadError {
    kind: &'static str,
    name: String,
    reason: String,
}

impl ReloadError {
    fn new(kind: &'static str, name: &str, reason: impl fmt::Display) -> Self {
        Self {
            kind,
            name: name.to_owned(),
            reason: reason.to_string(),
        }
    }

    /// The kind of part: `bulkhead`, `queue`, `shedder`, `rate limiter`, `breaker`, `cache`.
    pub fn kind(&self) -> &'static str {
        self.kind
    }

    /// The part's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The part, as its kind and its name: ``bulkhead `db` ``.
    pub fn part(&self) -> String {
        format!("{} `{}`", self.kind, self.name)
    }

    /// What is wrong with its settings.
    pub fn reason(&self) -> &str {
        &self.reason
    }
}

impl fmt::Display for ReloadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} `{}`: {}", self.kind, self.name, self.reason)
    }
}

impl std::error::Error for ReloadError {}

/// One registered part: checks, then applies, its entry of a configuration.
trait Part: Send + Sync {
    fn kind(&self) -> &'static str;
    fn name(&self) -> &str;
    /// Checks the part's entry in `config`, if it has one.
    fn check(&self, config: &RuntimeConfig) -> Result<(), String>;
    fn apply(&self, config: &RuntimeConfig) -> Result<(), String>;
}

/// A part `P` of some kind, whose settings `C` a configuration holds by name.
#[cfg(any(feature = "limit", feature = "breaker", feature = "cache"))]
struct Registered<P, C> {
    kind: &'static str,
    name: String,
    part: P,
    /// The configuration's settings of this kind.
    entries: fn(&RuntimeConfig) -> &std::collections::BTreeMap<String, C>,
    check: fn(&P, &C) -> Result<(), String>,
    apply: fn(&P, &C) -> Result<(), String>,
}

#[cfg(any(feature = "limit", feature = "breaker", feature = "cache"))]
impl<P: Send + Sync, C> Part for Registered<P, C> {
    fn kind(&self) -> &'static str {
        self.kind
    }

    fn name(&self) -> &str {
        &self.name
    }

    fn check(&self, config: &RuntimeConfig) -> Result<(), String> {
        (self.entries)(config)
            .get(&self.name)
            .map_or(Ok(()), |entry| (self.check)(&self.part, entry))
    }

    fn apply(&self, config: &RuntimeConfig) -> Result<(), String> {
        (self.entries)(config)
            .get(&self.name)
            .map_or(Ok(()), |entry| (self.apply)(&self.part, entry))
    }
}

/// The names `config` gives settings for, by kind.
// Without the part features there is nothing to add.
#[cfg_attr(
    not(any(feature = "limit", feature = "breaker", feature = "cache")),
    allow(unused_mut)
)]
fn named(config: &RuntimeConfig) -> Vec<(&'static str, &str)> {
    let mut names: Vec<(&'static str, &str)> = Vec::new();
    #[cfg(feature = "limit")]
    {
        names.extend(config.bulkheads.keys().map(|n| ("bulkhead", n.as_str())));
        names.extend(config.queues.keys().map(|n| ("queue", n.as_str())));
        names.extend(config.shedders.keys().map(|n| ("shedder", n.as_str())));
        names.extend(
            config
                .rate_limits
                .keys()
                .map(|n| ("rate limiter", n.as_str())),
        );
    }
    #[cfg(feature = "breaker")]
    names.extend(config.breakers.keys().map(|n| ("breaker", n.as_str())));
    #[cfg(feature = "cache")]
    names.extend(config.caches.keys().map(|n| ("cache", n.as_str())));
    let _ = config;
    names
}

/// Applies [`RuntimeConfig`]s to the parts registered with it. Cloning is cheap; clones share
/// the registrations made before they were cloned.
///
/// Each reload counts in `headroom_reload_total{outcome}` (`applied` or `refused`).
#[derive(Clone)]
#[must_use]
pub struct Reloader {
    parts: Vec<Arc<dyn Part>>,
    /// The bulkheads and shedders among `parts`, whose settings are checked together.
    #[cfg(feature = "limit")]
    guarded: limit_parts::Guarded,
    /// One reload at a time, so that two never interleave their checks and changes.
    reloading: Arc<Mutex<()>>,
    applied: Counter,
    refused: Counter,
}

impl Default for Reloader {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for Reloader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.parts.iter().map(|part| (part.kind(), part.name())))
            .finish()
    }
}

impl Reloader {
    /// A reloader with no part registered.
    pub fn new() -> Self {
        Self {
            parts: Vec::new(),
            #[cfg(feature = "limit")]
            guarded: limit_parts::Guarded::default(),
            reloading: Arc::default(),
            applied: headroom_core::counter!("headroom_reload_total", "outcome" => "applied"),
            refused: headroom_core::counter!("headroom_reload_total", "outcome" => "refused"),
        }
    }

    #[cfg(any(feature = "limit", feature = "breaker", feature = "cache"))]
    fn with(mut self, part: impl Part + 'static) -> Self {
        self.parts.push(Arc::new(part));
        self
    }

    /// Checks every setting `config` names, then applies them all, or, if one part is
    /// missing or one setting invalid, none.
    pub fn apply(&self, config: &RuntimeConfig) -> Result<(), ReloadError> {
        let result = {
            let _one_at_a_time = self.reloading.lock();
            self.check_and_apply(config)
        };
        match &result {
            Ok(()) => {
                self.applied.increment(1);
                tracing::info!("configuration reloaded");
            }
            Err(error) => {
                self.refused.increment(1);
                tracing::warn!(%error, "configuration refused; the settings in force stay");
            }
        }
        result
    }

    fn check_and_apply(&self, config: &RuntimeConfig) -> Result<(), ReloadError> {
        for (index, part) in self.parts.iter().enumerate() {
            let twice = self.parts[..index]
                .iter()
                .any(|other| other.kind() == part.kind() && other.name() == part.name());
            if twice {
                return Err(ReloadError::new(
                    part.kind(),
                    part.name(),
                    "two parts are registered under this name: give them distinct names",
                ));
            }
        }
        for (kind, name) in named(config) {
            if !self
                .parts
                .iter()
                .any(|part| part.kind() == kind && part.name() == name)
            {
                return Err(ReloadError::new(kind, name, "no such part is registered"));
            }
        }
        for part in &self.parts {
            part.check(config)
                .map_err(|reason| ReloadError::new(part.kind(), part.name(), reason))?;
        }
        #[cfg(feature = "limit")]
        self.guarded.check(config)?;
        // Bulkheads first: a shedder's reconfigure judges its target against the bulkhead in
        // force, which must by then be the one checked above.
        let (bulkheads, others): (Vec<_>, Vec<_>) = self
            .parts
            .iter()
            .partition(|part| part.kind() == "bulkhead");
        for part in bulkheads.into_iter().chain(others) {
            part.apply(config)
                .map_err(|reason| ReloadError::new(part.kind(), part.name(), reason))?;
        }
        Ok(())
    }

    /// Reads the file at `path` every `every` (at least 1 ms) on `clock`, and applies it (read
    /// with `parse`) whenever its bytes change, starting with the first read. A file that
    /// cannot be read, parsed or applied is logged and counted as refused once (not at every
    /// look), and the settings in force stay until a later version is valid. Write the file
    /// by renaming a complete one over it, so that a half-written file is never read. Runs
    /// until dropped: spawn it.
    ///
    /// ```no_run
    /// # #[cfg(all(feature = "limit", feature = "serde"))] async fn run(bulkhead: headroom::limit::Bulkhead) {
    /// use std::time::Duration;
    /// use headroom::core::Clock;
    /// use headroom::reload::{Reloader, RuntimeConfig};
    ///
    /// let reloader = Reloader::new().bulkhead(&bulkhead);
    /// tokio::spawn(reloader.watch(
    ///     "/etc/shop/runtime.json",
    ///     Duration::from_secs(5),
    ///     Clock::system(),
    ///     |bytes| serde_json::from_slice::<RuntimeConfig>(bytes),
    /// ));
    /// # }
    /// ```
    pub fn watch<E: fmt::Display>(
        self,
        path: impl Into<PathBuf>,
        every: Duration,
        clock: Clock,
        parse: impl Fn(&[u8]) -> Result<RuntimeConfig, E> + Send + 'static,
    ) -> impl Future<Output = ()> + Send + 'static {
        let path = path.into();
        let every = every.max(Duration::from_millis(1));
        async move {
            let mut seen: Option<Vec<u8>> = None;
            // The read error last reported, so that a lasting one is reported once.
            let mut failing: Option<std::io::ErrorKind> = None;
            loop {
                match std::fs::read(&path) {
                    Ok(bytes) if seen.as_ref() != Some(&bytes) => {
                        failing = None;
                        match parse(&bytes) {
                            Ok(config) => {
                                let _ = self.apply(&config);
                            }
                            Err(error) => {
                                self.refused.increment(1);
                                tracing::warn!(path = %path.display(), %error, "configuration file cannot be parsed; the settings in force stay");
                            }
                        }
                        seen = Some(bytes);
                    }
                    Ok(_) => failing = None,
                    Err(error) if failing != Some(error.kind()) => {
                        failing = Some(error.kind());
                        self.refused.increment(1);
                        tracing::warn!(path = %path.display(), %error, "configuration file cannot be read; the settings in force stay");
                    }
                    Err(_) => {}
                }
                clock.sleep(every).await;
            }
        }
    }
}

#[cfg(feature = "limit")]
mod limit_parts {
    use headroom_core::rate::RateStore;
    use headroom_limit::rate::{DistributedRateLimiter, LocalRateLimiter};
    use headroom_limit::{Bulkhead, BulkheadConfig, LoadShedder, WorkQueue};

    use super::{Registered, ReloadError, Reloader, RuntimeConfig};

    /// The registered bulkheads and shedders: a shedder's queue-delay target depends on its
    /// bulkhead's queue and wait, which another entry of the same reload may change.
    #[derive(Clone, Default)]
    pub(super) struct Guarded {
        bulkheads: Vec<Bulkhead>,
        shedders: Vec<LoadShedder>,
    }

    impl Guarded {
        /// Whether every registered shedder's target can be reached in its bulkhead, both as
        /// `config` leaves them.
        pub(super) fn check(&self, config: &RuntimeConfig) -> Result<(), ReloadError> {
            for shedder in &self.shedders {
                let guarded = shedder.bulkhead();
                // An entry reaches the shedder's bulkhead only if that very bulkhead is
                // registered: another of the same name does not change it.
                let entry = self
                    .bulkheads
                    .iter()
                    .find(|bulkhead| bulkhead.is_same(guarded))
                    .and_then(|bulkhead| config.bulkheads.get(bulkhead.name()));
                let in_force;
                let settings = match (config.shedders.get(shedder.name()), entry) {
                    (Some(settings), _) => settings,
                    // A pair the reload leaves alone stays as it is, whatever else it changes.
                    (None, None) => continue,
                    (None, Some(_)) => {
                        in_force = shedder.config();
                        &in_force
                    }
                };
                if settings.queue_delay_target.is_none() {
                    continue;
                }
                let bulkhead = entry.cloned().unwrap_or_else(|| BulkheadConfig {
                    max_queued: guarded.max_queued(),
                    max_wait: guarded.max_wait(),
                    ..BulkheadConfig::default()
                });
                settings.check_reachable(&bulkhead).map_err(|error| {
                    let reason = match entry {
                        Some(_) => format!(
                            "{error} (bulkhead `{}` as this reload leaves it)",
                            guarded.name()
                        ),
                        None => error.to_string(),
                    };
                    ReloadError::new("shedder", shedder.name(), reason)
                })?;
            }
            Ok(())
        }
    }

    impl Reloader {
        /// Registers a bulkhead, under its name.
        pub fn bulkhead(mut self, bulkhead: &Bulkhead) -> Self {
            self.guarded.bulkheads.push(bulkhead.clone());
            self.with(Registered {
                kind: "bulkhead",
                name: bulkhead.name().to_owned(),
                part: bulkhead.clone(),
                entries: |config| &config.bulkheads,
                check: |part, entry| part.check_config(entry).map_err(|e| e.to_string()),
                apply: |part, entry| part.reconfigure(entry).map_err(|e| e.to_string()),
            })
        }

        /// Registers a work queue, under its name.
        pub fn queue<T: Send + 'static>(self, queue: &WorkQueue<T>) -> Self {
            self.with(Registered {
                kind: "queue",
                name: queue.name().to_owned(),
                part: queue.clone(),
                entries: |config| &config.queues,
                check: |_, entry| entry.validate().map_err(|e| e.to_string()),
                apply: |part, entry| part.reconfigure(entry.clone()).map_err(|e| e.to_string()),
            })
        }

        /// Registers a load shedder, under the name of the bulkhead it guards. Register that
        /// bulkhead too, so that a reload changing it is checked against the shedder's
        /// queue-delay target.
        pub fn shedder(mut self, shedder: &LoadShedder) -> Self {
            self.guarded.shedders.push(shedder.clone());
            self.with(Registered {
                kind: "shedder",
                name: shedder.name().to_owned(),
                part: shedder.clone(),
                entries: |config| &config.shedders,
                check: |_, entry| entry.validate().map_err(|e| e.to_string()),
                apply: |part, entry| part.reconfigure(entry.clone()).map_err(|e| e.to_string()),
            })
        }

        /// Registers a distributed rate limiter (as [`Headroom::rate_limiter`] builds), under
        /// its name.
        ///
        /// [`Headroom::rate_limiter`]: crate::Headroom::rate_limiter
        pub fn rate_limiter<S: RateStore + Send + Sync + 'static>(
            self,
            limiter: &DistributedRateLimiter<S>,
        ) -> Self {
            self.with(Registered {
                kind: "rate limiter",
                name: limiter.name().to_owned(),
                part: limiter.clone(),
                entries: |config| &config.rate_limits,
                check: |part, entry| part.check_tiers(entry).map_err(|e| e.to_string()),
                apply: |part, entry| part.replace(entry).map_err(|e| e.to_string()),
            })
        }

        /// Registers an in-process rate limiter, under its name.
        pub fn local_rate_limiter(self, limiter: &LocalRateLimiter) -> Self {
            self.with(Registered {
                kind: "rate limiter",
                name: limiter.name().to_owned(),
                part: limiter.clone(),
                entries: |config| &config.rate_limits,
                check: |part, entry| part.check_tiers(entry).map_err(|e| e.to_string()),
                apply: |part, entry| part.replace(entry).map_err(|e| e.to_string()),
            })
        }
    }
}

#[cfg(feature = "breaker")]
impl Reloader {
    /// Registers a circuit breaker, under its name.
    pub fn breaker<E: 'static>(self, breaker: &headroom_breaker::CircuitBreaker<E>) -> Self {
        self.with(Registered {
            kind: "breaker",
            name: breaker.name().to_owned(),
            part: breaker.clone(),
            entries: |config| &config.breakers,
            check: |part, entry| part.check_config(entry).map_err(|e| e.to_string()),
            apply: |part, entry| part.reconfigure(entry.clone()).map_err(|e| e.to_string()),
        })
    }
}

#[cfg(feature = "cache")]
impl Reloader {
    /// Registers a cache, under its name.
    pub fn cache<K, V>(self, cache: &headroom_cache::Cache<K, V>) -> Self
    where
        K: headroom_cache::CacheKey,
        V: Clone + serde::Serialize + serde::de::DeserializeOwned + Send + Sync + 'static,
    {
        self.with(Registered {
            kind: "cache",
            name: cache.config().name.clone(),
            part: cache.clone(),
            entries: |config| &config.caches,
            check: |part, entry| part.check_ttls(entry).map(drop).map_err(|e| e.to_string()),
            apply: |part, entry| {
                part.reconfigure_ttls(entry.clone())
                    .map_err(|e| e.to_string())
            },
        })
    }
}
