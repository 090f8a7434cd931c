//! One switch for a whole fleet: the experiment is written to the shared KV store, with its
//! end time and a TTL to match, and every instance following the switch starts and stops
//! with it.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use headroom_core::kv::KvStore;
use headroom_core::metrics::Counter;
use headroom_core::{BackendError, Clock, Key, KeyError, Namespace, counter};

use crate::{ConfigError, Experiment, ExperimentConfig, StopReason};

/// The switch's format; a record of another version is refused, not guessed at.
const VERSION: u32 = 1;

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
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FleetError {
    /// The experiment's configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The experiment's name does not make a valid key.
    #[error("the switch's key: {0}")]
    Key(#[from] KeyError),
    /// The shared store failed.
    #[error("the shared store: {0}")]
    Backend(#[from] BackendError),
    /// The switch holds something that is not a switch of this version.
    #[error("the switch holds an unreadable record: {0}")]
    Corrupt(String),
}

/// The switch of one experiment, shared by every instance through a [`KvStore`] (Redis in
/// production; the memory store within one process).
///
/// Every instance runs [`follow`](Self::follow) with its own [`Experiment`] of the same name;
/// any one of them, or an admin tool, calls [`start`](Self::start) and [`stop`](Self::stop).
/// A follower starts each new start once, ends it at the end time written in the switch, stops
/// when the switch is cleared or expires, and stops, failing safe, when it cannot read the
/// switch or cannot understand what it reads (a run stopped that way resumes when the switch
/// reads again). A run started locally with [`Experiment::start`] is left alone.
///
/// ```
/// use std::time::Duration;
/// use headroom_chaos::{Experiment, ExperimentConfig, FleetSwitch};
/// use headroom_core::Namespace;
/// use headroom_core::memory::MemoryKvStore;
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let store = MemoryKvStore::new();
/// let switch = FleetSwitch::new(store, &Namespace::new("shop")?, "inventory-degraded")?;
/// let experiment = Experiment::builder("inventory-degraded").build()?;
/// tokio::spawn(switch.follow(experiment.clone(), Duration::from_secs(1)));
///
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
    pub fn new(store: S, namespace: &Namespace, experiment: &str) -> Result<Self, FleetError> {
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

    /// The clock of end times and polling (the system clock by default).
    #[must_use]
    pub fn clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    /// Starts the experiment on every follower, for `config.duration` from now; replaces a
    /// running one. The record expires from the store at the end time.
    pub async fn start(&self, config: &ExperimentConfig) -> Result<(), FleetError> {
        config.validate()?;
        let duration_ms = u64::try_from(config.duration.as_millis()).unwrap_or(u64::MAX);
        let record = Record {
            version: VERSION,
            generation: fastrand::u64(..),
            ends_at_unix_ms: self.clock.unix_millis().saturating_add(duration_ms),
            config: config.clone(),
        };
        let bytes =
            serde_json::to_vec(&record).map_err(|error| FleetError::Corrupt(error.to_string()))?;
        self.store
            .set(&self.key, Bytes::from(bytes), config.duration)
            .await?;
        Ok(())
    }

    /// Stops the experiment on every follower.
    pub async fn stop(&self) -> Result<(), FleetError> {
        self.store.delete(std::slice::from_ref(&self.key)).await?;
        Ok(())
    }

    /// What the switch holds now: `None` when it is off.
    async fn read(&self) -> Result<Option<Record>, FleetError> {
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
        Ok(Some(record))
    }

    /// Reads the switch every `every` and makes `experiment` follow it. Spawn it on each
    /// instance; it runs until dropped.
    pub fn follow(
        &self,
        experiment: Experiment,
        every: Duration,
    ) -> impl Future<Output = ()> + Send + 'static {
        let switch = self.clone();
        async move {
            let mut follower = Follower::default();
            loop {
                let read = switch.read().await;
                follower.apply(&switch, &experiment, read);
                switch.clock.sleep(every).await;
            }
        }
    }
}

/// What a follower started, so it starts each generation once and stops only its own run.
#[derive(Default)]
struct Follower {
    /// The generation last acted on, and the run started for it.
    generation: Option<u64>,
    run: Option<u64>,
    /// The run was stopped because the switch could not be read: resume it once it can.
    stopped_unconfirmed: bool,
}

impl Follower {
    fn apply<S>(
        &mut self,
        switch: &FleetSwitch<S>,
        experiment: &Experiment,
        read: Result<Option<Record>, FleetError>,
    ) {
        match read {
            Ok(Some(record)) => {
                let new = self.generation != Some(record.generation);
                if new || self.stopped_unconfirmed {
                    self.generation = Some(record.generation);
                    self.stopped_unconfirmed = false;
                    let remaining = record
                        .ends_at_unix_ms
                        .saturating_sub(switch.clock.unix_millis());
                    if remaining > 0 {
                        let ends_at = switch.clock.now() + Duration::from_millis(remaining);
                        self.run = Some(experiment.start_until(record.config, ends_at));
                    }
                }
            }
            Ok(None) => {
                self.generation = None;
                self.stopped_unconfirmed = false;
                self.stop(experiment);
            }
            Err(error) => {
                switch.errors.increment(1);
                tracing::warn!(
                    target: "headroom_chaos",
                    experiment = %switch.name,
                    error = %error,
                    "chaos fleet switch unreadable: experiment stopped"
                );
                if self.run.is_some() && experiment.running_sequence() == self.run {
                    self.stopped_unconfirmed = true;
                }
                self.stop(experiment);
            }
        }
    }

    fn stop(&mut self, experiment: &Experiment) {
        if let Some(run) = self.run.take() {
            experiment.stop_started(run, StopReason::Fleet);
        }
    }
}
