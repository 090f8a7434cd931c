//! One switch for a whole fleet: the experiment is written to the shared KV store, with its
//! end time and a TTL to match, and every instance following the switch starts and stops
//! with it.
//!
//! The switch is one key, `<namespace>:chaos:<experiment>`, holding a versioned JSON record:
//! the configuration, the end time in milliseconds since the Unix epoch, and a generation that
//! tells one start from the next. The key's TTL is the experiment's duration, so a switch
//! nobody stops disappears by itself at the end time. The key part is the experiment's name,
//! which may not contain braces: the switch never picks its Redis Cluster slot.
//!
//! A follower ([`FleetSwitch::follow`]) polls the key and acts only on what it started:
//!
//! | it reads | it does |
//! |---|---|
//! | a new generation | starts the run, ending at the record's end time but never later than its duration from now (nothing if already past); while a run started locally is going on, it waits for that run to end |
//! | the generation it started | nothing |
//! | nothing (stopped or expired) | stops the run it started, with [`StopReason::Fleet`] |
//! | an error, no answer within the polling interval, or bytes it cannot understand | stops the run it started (fail safe), warns, counts `headroom_chaos_fleet_errors_total`; resumes it once the switch reads again |
//!
//! A run started locally with [`Experiment::start`] is never stopped or replaced by a follower.
//! When a stop signal ends the run a follower started (an SLO paging on one instance), that
//! follower clears the switch, so the experiment stops on every instance. It clears it only
//! while the switch holds the start of that run (a newer start stays), and tries again at each
//! poll while the store fails, counting each failure in `headroom_chaos_fleet_errors_total`.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use headroom_core::kv::KvStore;
use headroom_core::metrics::Counter;
use headroom_core::{
    BackendError, BackendErrorKind, Classify, Clock, Key, KeyError, Namespace, counter,
};

use crate::{ConfigError, Experiment, ExperimentConfig, StopReason};

/// The switch's format; a record of another version is refused, not guessed at.
const VERSION: u32 = 1;

/// The shortest polling interval a follower uses: a zero interval would spin.
const SHORTEST_POLL: Duration = Duration::from_millis(1);

/// What the switch holds.
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Record {
    version: u32,
    /// Tells one start from the next, so a follower starts each once.
    generation: u64,
    /// When the run ends, in milliseconds since the Unix epoch: every instance ends it at the
    /// same time, however late it read the switch.
    ends_at_unix_ms: u64,
    config: ExperimentConfig,
}

/// Why the switch could not be written or read.
///
/// ```
/// use std::time::Duration;
/// use headroom_chaos::{ExperimentConfig, FleetError, FleetSwitch};
/// use headroom_core::Namespace;
/// use headroom_core::memory::MemoryKvStore;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let switch = FleetSwitch::new(MemoryKvStore::new(), &Namespace::new("shop")?, "slow-l2")?;
/// let too_long = ExperimentConfig::new(Duration::from_secs(7 * 24 * 3600));
/// assert!(matches!(switch.start(&too_long).await, Err(FleetError::Config(_))));
/// # Ok(()) }
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FleetError {
    /// The experiment's configuration, or its name, is invalid: nothing was written.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The namespace and the experiment's name do not make a valid key.
    #[error("the switch's key: {0}")]
    Key(#[from] KeyError),
    /// The shared store failed; the store's error is also the
    /// [`source`](std::error::Error::source), and [`Classify`] answers from it.
    #[error("the shared store: {0}")]
    Backend(#[from] BackendError),
    /// The switch holds something that is not a switch of this version: corrupt or foreign
    /// bytes, or a record another version wrote.
    #[error("the switch holds an unreadable record: {0}")]
    Corrupt(String),
}

impl Classify for FleetError {
    /// The store timed out.
    fn is_timeout(&self) -> bool {
        matches!(self, Self::Backend(error) if error.is_timeout())
    }

    /// The store failed in a way that may pass; an invalid configuration or an unreadable
    /// record stays so until someone rewrites it.
    fn is_retryable(&self) -> bool {
        matches!(self, Self::Backend(error) if error.is_retryable())
    }
}

/// The switch of one experiment, shared by every instance through a [`KvStore`] (Redis in
/// production; the memory store within one process).
///
/// Every instance runs [`follow`](Self::follow) with its own [`Experiment`] of the same name;
/// any one of them, or an admin tool, calls [`start`](Self::start) and [`stop`](Self::stop).
/// A follower starts each new start once, ends it at the end time written in the switch, stops
/// when the switch is cleared or expires, and stops, failing safe, when it cannot read the
/// switch or cannot understand what it reads (a run stopped that way resumes, with the time it
/// has left, when the switch reads again). A run started locally with [`Experiment::start`] is
/// left alone.
///
/// ```
/// use std::time::Duration;
/// use headroom_chaos::{Experiment, ExperimentConfig, FleetSwitch};
/// use headroom_core::Namespace;
/// use headroom_core::memory::MemoryKvStore;
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let store = MemoryKvStore::new(); // Redis: headroom_redis::RedisKvStore
/// let switch = FleetSwitch::new(store, &Namespace::new("shop")?, "inventory-degraded")?;
///
/// // On every instance: follow the switch.
/// let experiment = Experiment::builder("inventory-degraded").build()?;
/// tokio::spawn(switch.follow(experiment.clone(), Duration::from_secs(1)));
///
/// // From any one of them, or an admin tool:
/// switch.start(&ExperimentConfig::new(Duration::from_secs(600)).fault(0.02)).await?;
/// tokio::time::sleep(Duration::from_secs(2)).await;
/// assert!(experiment.is_running());
/// switch.stop().await?;
/// tokio::time::sleep(Duration::from_secs(2)).await;
/// assert!(!experiment.is_running());
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct FleetSwitch<S> {
    store: S,
    key: Key,
    name: Arc<str>,
    clock: Clock,
    errors: Counter,
}

impl<S: KvStore + Clone> FleetSwitch<S> {
    /// The switch of the experiment named `experiment`, at `<namespace>:chaos:<experiment>`
    /// in `store`.
    ///
    /// The name follows [`Experiment::builder`]'s rules (1 to 128 letters, digits, `-`, `_`
    /// or `.`); another is refused with [`FleetError::Config`].
    ///
    /// ```
    /// use headroom_chaos::{FleetError, FleetSwitch};
    /// use headroom_core::Namespace;
    /// use headroom_core::memory::MemoryKvStore;
    ///
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let shop = Namespace::new("shop")?;
    /// assert!(FleetSwitch::new(MemoryKvStore::new(), &shop, "slow-l2").is_ok());
    /// // A hash tag would pick the key's Redis Cluster slot: refused.
    /// assert!(matches!(
    ///     FleetSwitch::new(MemoryKvStore::new(), &shop, "{slot}"),
    ///     Err(FleetError::Config(_))
    /// ));
    /// # Ok(()) }
    /// ```
    pub fn new(store: S, namespace: &Namespace, experiment: &str) -> Result<Self, FleetError> {
        if !crate::experiment::valid_name(experiment) {
            return Err(ConfigError::new(
                "name",
                "must be 1 to 128 letters, digits, `-`, `_` or `.`",
            )
            .into());
        }
        let key = namespace.child("chaos")?.key(experiment)?;
        let name: Arc<str> = experiment.into();
        Ok(Self {
            store,
            key,
            errors: counter!("headroom_chaos_fleet_errors_total", "experiment" => name.clone()),
            name,
            clock: Clock::default(),
        })
    }

    /// The clock of the end times written and read, and of polling (the system clock by
    /// default). A follower ends its run at the record's end time on its experiment's own
    /// clock.
    ///
    /// ```
    /// use headroom_chaos::FleetSwitch;
    /// use headroom_core::{ManualClock, Namespace};
    /// use headroom_core::memory::MemoryKvStore;
    ///
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let manual = ManualClock::new();
    /// let store = MemoryKvStore::builder().clock(manual.clock()).build();
    /// let switch = FleetSwitch::new(store, &Namespace::new("shop")?, "slow-l2")?
    ///     .clock(manual.clock());
    /// # drop(switch);
    /// # Ok(()) }
    /// ```
    #[must_use]
    pub fn clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    /// The key the switch is written at.
    pub fn key(&self) -> &Key {
        &self.key
    }

    /// Starts the experiment on every follower, for `config.duration` from now; replaces a
    /// running one. The record expires from the store at the end time.
    ///
    /// Fails with [`FleetError::Config`] (nothing written) if `config` is invalid or shorter
    /// than a millisecond (the store's TTL precision), and [`FleetError::Backend`] if the store
    /// fails.
    ///
    /// ```
    /// use std::time::Duration;
    /// use headroom_chaos::{ExperimentConfig, FleetSwitch};
    /// use headroom_core::Namespace;
    /// use headroom_core::kv::KvStore;
    /// use headroom_core::memory::MemoryKvStore;
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let store = MemoryKvStore::new();
    /// let switch = FleetSwitch::new(store.clone(), &Namespace::new("shop")?, "slow-l2")?;
    /// switch.start(&ExperimentConfig::new(Duration::from_secs(60)).fault(0.1)).await?;
    /// assert!(store.get(switch.key()).await?.is_some());
    /// # Ok(()) }
    /// ```
    pub async fn start(&self, config: &ExperimentConfig) -> Result<(), FleetError> {
        config.validate()?;
        let duration_ms = u64::try_from(config.duration.as_millis()).unwrap_or(u64::MAX);
        if duration_ms == 0 {
            return Err(ConfigError::new(
                "duration",
                "must be at least a millisecond to be shared through the fleet switch",
            )
            .into());
        }
        let record = Record {
            version: VERSION,
            generation: fastrand::u64(..),
            ends_at_unix_ms: self.clock.unix_millis().saturating_add(duration_ms),
            config: config.clone(),
        };
        // Serializing plain data with string keys cannot fail; report it rather than panic.
        let bytes =
            serde_json::to_vec(&record).map_err(|error| FleetError::Corrupt(error.to_string()))?;
        self.store
            .set(
                &self.key,
                Bytes::from(bytes),
                Duration::from_millis(duration_ms),
            )
            .await?;
        Ok(())
    }

    /// Stops the experiment on every follower: clears the switch. Clearing a switch that is
    /// already off succeeds.
    ///
    /// ```
    /// use std::time::Duration;
    /// use headroom_chaos::{ExperimentConfig, FleetSwitch};
    /// use headroom_core::Namespace;
    /// use headroom_core::kv::KvStore;
    /// use headroom_core::memory::MemoryKvStore;
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let store = MemoryKvStore::new();
    /// let switch = FleetSwitch::new(store.clone(), &Namespace::new("shop")?, "slow-l2")?;
    /// switch.start(&ExperimentConfig::new(Duration::from_secs(60)).fault(0.1)).await?;
    /// switch.stop().await?;
    /// assert!(store.get(switch.key()).await?.is_none());
    /// # Ok(()) }
    /// ```
    pub async fn stop(&self) -> Result<(), FleetError> {
        self.store.delete(std::slice::from_ref(&self.key)).await?;
        Ok(())
    }

    /// What the switch holds now, with its bytes: `None` when it is off.
    async fn read(&self) -> Result<Option<(Record, Bytes)>, FleetError> {
        let Some(bytes) = self.store.get(&self.key).await? else {
            return Ok(None);
        };
        let record: Record = serde_json::from_slice(&bytes)
            .map_err(|error| FleetError::Corrupt(error.to_string()))?;
        if record.version != VERSION {
            return Err(FleetError::Corrupt(format!(
                "version {} (this build reads {VERSION})",
                record.version
            )));
        }
        record.config.validate()?;
        Ok(Some((record, bytes)))
    }

    /// `call`'s answer, or a timeout once the polling interval has passed: a store that hangs
    /// must not keep the follower from failing safe.
    async fn within<T>(
        &self,
        every: Duration,
        call: impl Future<Output = Result<T, FleetError>>,
    ) -> Result<T, FleetError> {
        let call = std::pin::pin!(call);
        let waited = std::pin::pin!(self.clock.sleep(every));
        match futures_util::future::select(call, waited).await {
            futures_util::future::Either::Left((answer, _)) => answer,
            futures_util::future::Either::Right(_) => {
                Err(FleetError::Backend(BackendError::with_detail(
                    BackendErrorKind::Timeout,
                    "no answer within the polling interval",
                )))
            }
        }
    }

    /// Reads the switch every `every` (at least a millisecond), from the first poll on, and
    /// makes `experiment` follow it. Spawn it on each instance; it runs until dropped, and
    /// dropping it stops the run it started, as a switch it can no longer read would.
    ///
    /// Reads and unreadable records are never a panic: each failure stops the run the follower
    /// started, is counted in `headroom_chaos_fleet_errors_total{experiment}`, and is logged
    /// (a warning when a streak of failures begins, debug while it lasts). A failed clear of
    /// the switch after a stop signal is counted and logged the same way, and retried at the
    /// next poll.
    ///
    /// ```
    /// use std::time::Duration;
    /// use headroom_chaos::{Experiment, ExperimentConfig, FleetSwitch, StopReason};
    /// use headroom_core::Namespace;
    /// use headroom_core::memory::MemoryKvStore;
    ///
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let switch = FleetSwitch::new(MemoryKvStore::new(), &Namespace::new("shop")?, "slow-l2")?;
    /// let experiment = Experiment::builder("slow-l2").build()?;
    /// let follower = tokio::spawn(switch.follow(experiment.clone(), Duration::from_millis(500)));
    ///
    /// switch.start(&ExperimentConfig::new(Duration::from_secs(60)).fault(0.1)).await?;
    /// tokio::time::sleep(Duration::from_secs(1)).await;
    /// assert!(experiment.is_running());
    ///
    /// follower.abort();
    /// let _ = follower.await;
    /// assert_eq!(experiment.status().last_stop, Some(StopReason::Fleet));
    /// # Ok(()) }
    /// ```
    pub fn follow(
        &self,
        experiment: Experiment,
        every: Duration,
    ) -> impl Future<Output = ()> + Send + 'static {
        let switch = self.clone();
        let every = every.max(SHORTEST_POLL);
        async move {
            let mut follower = Follower::new(experiment);
            loop {
                let read = switch.within(every, switch.read()).await;
                follower.apply(&switch, read);
                follower.note_signal_stop();
                if let Some(record) = follower.to_clear.clone() {
                    // The signal that stopped this instance's run stops the fleet's: the
                    // switch is cleared while it holds the start of that run, and retried at
                    // each poll until the store answers.
                    let cleared = switch.within(every, async {
                        Ok(switch.store.delete_if_eq(&switch.key, &record).await?)
                    });
                    match cleared.await {
                        Ok(_) => follower.to_clear = None,
                        Err(error) => follower.failed(&switch, &error),
                    }
                }
                switch.clock.sleep(every).await;
            }
        }
    }
}

/// What a follower started, so it starts each generation once and stops only its own run.
/// Dropped, it stops that run.
struct Follower {
    experiment: Experiment,
    /// The generation last acted on.
    generation: Option<u64>,
    /// The sequence number of the run started for it, until stopped.
    run: Option<u64>,
    /// The switch's bytes when it started that run.
    run_record: Option<Bytes>,
    /// The switch's bytes of a run a stop signal ended: cleared from the store while the
    /// switch still holds them.
    to_clear: Option<Bytes>,
    /// The run was stopped because the switch could not be read: resume it once it can.
    stopped_unconfirmed: bool,
    /// Reads are failing: the streak's first failure was logged as a warning.
    failing: bool,
}

impl Follower {
    fn new(experiment: Experiment) -> Self {
        Self {
            experiment,
            generation: None,
            run: None,
            run_record: None,
            to_clear: None,
            stopped_unconfirmed: false,
            failing: false,
        }
    }

    fn apply<S>(
        &mut self,
        switch: &FleetSwitch<S>,
        read: Result<Option<(Record, Bytes)>, FleetError>,
    ) {
        let record = match read {
            Ok(record) => record,
            Err(error) => return self.failed(switch, &error),
        };
        if std::mem::take(&mut self.failing) {
            tracing::info!(
                target: "headroom_chaos",
                experiment = %switch.name,
                "chaos fleet switch readable again"
            );
        }
        let Some((record, bytes)) = record else {
            self.generation = None;
            self.stopped_unconfirmed = false;
            self.stop();
            // Already off: nothing left to clear.
            self.to_clear = None;
            return;
        };
        let new = self.generation != Some(record.generation);
        if !new && !self.stopped_unconfirmed {
            return;
        }
        if self
            .experiment
            .running_sequence()
            .is_some_and(|current| Some(current) != self.run)
        {
            // A run started locally is the operator's: the fleet's starts once it is over.
            return;
        }
        self.stopped_unconfirmed = false;
        self.generation = Some(record.generation);
        // Never longer than the configuration's own duration, whatever the record says.
        let remaining = Duration::from_millis(
            record
                .ends_at_unix_ms
                .saturating_sub(switch.clock.unix_millis()),
        )
        .min(record.config.duration);
        if remaining.is_zero() {
            // A start already over (read late, or written by a clock ahead of ours): the
            // switch no longer holds the generation this follower ran, so that run stops too.
            self.stop();
            return;
        }
        let ends_at = self.experiment.clock().now() + remaining;
        self.run = Some(self.experiment.start_until(record.config, ends_at));
        self.run_record = Some(bytes);
    }

    /// Fail safe: a run the switch can no longer confirm stops.
    fn failed<S>(&mut self, switch: &FleetSwitch<S>, error: &FleetError) {
        switch.errors.increment(1);
        if std::mem::replace(&mut self.failing, true) {
            tracing::debug!(
                target: "headroom_chaos",
                experiment = %switch.name,
                error = %error,
                "chaos fleet switch still unreadable"
            );
        } else {
            tracing::warn!(
                target: "headroom_chaos",
                experiment = %switch.name,
                error = %error,
                "chaos fleet switch unreadable: the run it started is stopped"
            );
        }
        if self.run.is_some() && self.experiment.running_sequence() == self.run {
            self.stopped_unconfirmed = true;
        }
        self.stop();
    }

    /// When a stop signal ended the run this follower started, forgets the run and keeps the
    /// switch's record of it to clear.
    fn note_signal_stop(&mut self) {
        let Some(run) = self.run else {
            return;
        };
        if !matches!(
            self.experiment.stop_reason_of(run),
            Some(StopReason::Signal(_))
        ) {
            return;
        }
        tracing::warn!(
            target: "headroom_chaos",
            experiment = %self.experiment.name(),
            "a stop signal ended the run: clearing the fleet switch"
        );
        self.run = None;
        self.to_clear = self.run_record.take();
    }

    fn stop(&mut self) {
        // A run a signal ended before the switch failed or changed still clears the switch.
        self.note_signal_stop();
        if let Some(run) = self.run.take() {
            self.run_record = None;
            self.experiment.stop_started(run, StopReason::Fleet);
        }
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        self.stop();
    }
}
