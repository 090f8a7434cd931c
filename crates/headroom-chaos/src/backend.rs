//! Wrappers of every backend trait that inject an experiment into the backend's calls, so a
//! service sees what its cache, idempotency and limits do when Redis is slow, failing or
//! stalled, or loses invalidation messages, without touching Redis.
//!
//! Each wrapper honours **latency** (the call is delayed), **fault** (the call fails with a
//! [`BackendError`] of the configured [`FaultKind`](crate::FaultKind) and never reaches the
//! store) and **abort** (the call is held until the experiment stops: the caller's own timeout
//! must end it). [`ChaosBus`] also honours **loss**: each message delivered to a subscription
//! opened through it may be dropped silently, as a subscriber that missed a pub/sub message
//! would see it. Off, a call is the inner store's behind one relaxed load.
//!
//! ```
//! use std::time::Duration;
//! use headroom_chaos::{ChaosKvStore, Experiment, ExperimentConfig, FaultKind};
//! use headroom_core::kv::KvStore;
//! use headroom_core::memory::MemoryKvStore;
//! use headroom_core::{Classify, Namespace};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let experiment = Experiment::builder("l2-down").build()?;
//! let l2 = ChaosKvStore::new(MemoryKvStore::builder().build(), experiment.clone());
//! let key = Namespace::new("shop")?.key("product:7")?;
//! experiment.start(ExperimentConfig::new(Duration::from_secs(60)).fault_of(1.0, FaultKind::Timeout))?;
//! let error = l2.get(&key).await.unwrap_err();
//! assert!(error.is_timeout());
//! # Ok(()) }
//! ```

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use headroom_core::bus::{BusEvent, InvalidationBus, Subscription};
use headroom_core::kv::{KvEntry, KvStore};
use headroom_core::lease::{Begin, Fenced, FencingToken, LeaseStore};
use headroom_core::migration::{MigrationRecord, MigrationStore, Transition};
use headroom_core::rate::{Gcra, RateDecision, RateStore};
use headroom_core::{BackendError, Key};

use crate::{Experiment, Injection, Strategies};

type PickKey = Arc<dyn Fn(&Key) -> bool + Send + Sync>;

/// The experiment and key predicate every wrapper shares.
#[derive(Clone)]
struct Point {
    experiment: Experiment,
    when: Option<PickKey>,
}

impl Point {
    fn new(experiment: Experiment) -> Self {
        Self {
            experiment,
            when: None,
        }
    }

    /// Draws for a call on `keys`: seen only if the predicate picks one of them.
    #[inline]
    fn draw<'a>(&self, keys: impl IntoIterator<Item = &'a Key>) -> Option<Injection> {
        self.draw_as(Strategies::BACKEND, keys)
    }

    #[inline]
    fn draw_as<'a>(
        &self,
        strategies: Strategies,
        keys: impl IntoIterator<Item = &'a Key>,
    ) -> Option<Injection> {
        if !self.experiment.is_on() {
            return None;
        }
        if let Some(when) = &self.when
            && !keys.into_iter().any(|key| when(key))
        {
            return None;
        }
        self.experiment.draw(strategies)
    }

    /// Runs `call` unless the injection fails it; delays and holds first.
    async fn run<T>(
        injection: Option<Injection>,
        call: impl Future<Output = Result<T, BackendError>>,
    ) -> Result<T, BackendError> {
        if let Some(injection) = injection {
            injection.wait().await;
            if let Some(kind) = injection.fault() {
                return Err(BackendError::with_detail(
                    kind.backend_kind(),
                    format!("injected by chaos experiment `{}`", injection.experiment()),
                ));
            }
        }
        call.await
    }
}

impl fmt::Debug for Point {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Point")
            .field("experiment", &self.experiment)
            .field("picks_keys", &self.when.is_some())
            .finish()
    }
}

macro_rules! wrapper {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Debug)]
        pub struct $name<S> {
            inner: S,
            point: Point,
        }

        impl<S> $name<S> {
            /// Wraps `inner`, injecting `experiment` into its calls.
            pub fn new(inner: S, experiment: Experiment) -> Self {
                Self {
                    inner,
                    point: Point::new(experiment),
                }
            }

            /// Injects only into calls on a key `when` picks (a multi-key call: if it picks
            /// any of them); the others are not seen by the experiment.
            #[must_use]
            pub fn when(mut self, when: impl Fn(&Key) -> bool + Send + Sync + 'static) -> Self {
                self.point.when = Some(Arc::new(when));
                self
            }

            /// The wrapped store.
            pub fn inner(&self) -> &S {
                &self.inner
            }
        }
    };
}

wrapper!(
    /// A [`KvStore`] (a cache's L2) with an experiment injected into every call.
    ChaosKvStore
);
wrapper!(
    /// An [`InvalidationBus`] with an experiment injected into publishes and subscribes, and
    /// messages lost on the subscriptions opened through it.
    ChaosBus
);
wrapper!(
    /// A [`LeaseStore`] (idempotency records) with an experiment injected into every call.
    ChaosLeaseStore
);
wrapper!(
    /// A [`RateStore`] (distributed rate limits) with an experiment injected into every call.
    ChaosRateStore
);
wrapper!(
    /// A [`MigrationStore`] (resharding state) with an experiment injected into every call.
    ChaosMigrationStore
);

fn entry_keys(entries: &[KvEntry]) -> impl Iterator<Item = &Key> {
    entries.iter().map(|entry| &entry.key)
}

impl<S: KvStore> KvStore for ChaosKvStore<S> {
    async fn get(&self, key: &Key) -> Result<Option<Bytes>, BackendError> {
        Point::run(self.point.draw([key]), self.inner.get(key)).await
    }

    async fn get_many(&self, keys: &[Key]) -> Result<Vec<Option<Bytes>>, BackendError> {
        Point::run(self.point.draw(keys), self.inner.get_many(keys)).await
    }

    async fn set(&self, key: &Key, value: Bytes, ttl: Duration) -> Result<(), BackendError> {
        Point::run(self.point.draw([key]), self.inner.set(key, value, ttl)).await
    }

    async fn set_many(&self, entries: &[KvEntry]) -> Result<(), BackendError> {
        Point::run(
            self.point.draw(entry_keys(entries)),
            self.inner.set_many(entries),
        )
        .await
    }

    async fn delete(&self, keys: &[Key]) -> Result<u64, BackendError> {
        Point::run(self.point.draw(keys), self.inner.delete(keys)).await
    }

    async fn set_if_newer(
        &self,
        entries: &[KvEntry],
        version_at: usize,
    ) -> Result<u64, BackendError> {
        Point::run(
            self.point.draw(entry_keys(entries)),
            self.inner.set_if_newer(entries, version_at),
        )
        .await
    }

    async fn delete_if_eq(&self, key: &Key, expected: &[u8]) -> Result<bool, BackendError> {
        Point::run(
            self.point.draw([key]),
            self.inner.delete_if_eq(key, expected),
        )
        .await
    }
}

impl<B: InvalidationBus> InvalidationBus for ChaosBus<B> {
    async fn publish(&self, channel: &Key, message: Bytes) -> Result<(), BackendError> {
        Point::run(
            self.point.draw([channel]),
            self.inner.publish(channel, message),
        )
        .await
    }

    async fn subscribe(&self, channel: &Key) -> Result<Subscription, BackendError> {
        let subscription =
            Point::run(self.point.draw([channel]), self.inner.subscribe(channel)).await?;
        let point = self.point.clone();
        let channel = channel.clone();
        Ok(Subscription::new(subscription.filter(move |event| {
            let lost = matches!(event, BusEvent::Message(_))
                && point
                    .draw_as(Strategies::LOSS, [&channel])
                    .is_some_and(|injection| injection.loss());
            std::future::ready(!lost)
        })))
    }
}

impl<S: LeaseStore> LeaseStore for ChaosLeaseStore<S> {
    async fn begin(
        &self,
        key: &Key,
        fingerprint: &[u8],
        lease: Duration,
    ) -> Result<Begin, BackendError> {
        Point::run(
            self.point.draw([key]),
            self.inner.begin(key, fingerprint, lease),
        )
        .await
    }

    async fn complete(
        &self,
        key: &Key,
        token: FencingToken,
        outcome: Bytes,
        retention: Duration,
    ) -> Result<Fenced, BackendError> {
        Point::run(
            self.point.draw([key]),
            self.inner.complete(key, token, outcome, retention),
        )
        .await
    }

    async fn extend(
        &self,
        key: &Key,
        token: FencingToken,
        lease: Duration,
    ) -> Result<Fenced, BackendError> {
        Point::run(self.point.draw([key]), self.inner.extend(key, token, lease)).await
    }

    async fn release(&self, key: &Key, token: FencingToken) -> Result<Fenced, BackendError> {
        Point::run(self.point.draw([key]), self.inner.release(key, token)).await
    }

    fn begin_completes_at_once(&self) -> bool {
        self.inner.begin_completes_at_once()
    }
}

impl<S: RateStore> RateStore for ChaosRateStore<S> {
    async fn apply_all(
        &self,
        cells: &[(Key, Gcra)],
        cost: u32,
    ) -> Result<RateDecision, BackendError> {
        Point::run(
            self.point.draw(cells.iter().map(|(key, _)| key)),
            self.inner.apply_all(cells, cost),
        )
        .await
    }

    async fn apply(&self, key: &Key, gcra: Gcra, cost: u32) -> Result<RateDecision, BackendError> {
        Point::run(self.point.draw([key]), self.inner.apply(key, gcra, cost)).await
    }
}

impl<S: MigrationStore> MigrationStore for ChaosMigrationStore<S> {
    async fn create(
        &self,
        key: &Key,
        record: MigrationRecord,
    ) -> Result<MigrationRecord, BackendError> {
        Point::run(self.point.draw([key]), self.inner.create(key, record)).await
    }

    async fn load(&self, key: &Key) -> Result<Option<MigrationRecord>, BackendError> {
        Point::run(self.point.draw([key]), self.inner.load(key)).await
    }

    async fn transition(
        &self,
        key: &Key,
        expected: MigrationRecord,
        phase: u8,
    ) -> Result<Transition, BackendError> {
        Point::run(
            self.point.draw([key]),
            self.inner.transition(key, expected, phase),
        )
        .await
    }

    async fn acknowledge(
        &self,
        key: &Key,
        participant: &str,
        phase: u8,
        lease: Duration,
    ) -> Result<(), BackendError> {
        Point::run(
            self.point.draw([key]),
            self.inner.acknowledge(key, participant, phase, lease),
        )
        .await
    }

    async fn lagging(&self, key: &Key, phase: u8) -> Result<u64, BackendError> {
        Point::run(self.point.draw([key]), self.inner.lagging(key, phase)).await
    }

    async fn remove(&self, key: &Key) -> Result<(), BackendError> {
        Point::run(self.point.draw([key]), self.inner.remove(key)).await
    }
}
