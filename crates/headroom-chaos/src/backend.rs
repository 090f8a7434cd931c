//! Wrappers of every backend trait that inject an experiment into the backend's calls, so a
//! service sees what its cache, idempotency and limits do when Redis is slow, failing or
//! stalled, or loses invalidation messages, without touching Redis.
//!
//! Each wrapper honours **latency** (the call is delayed), **fault** (the call fails with a
//! [`BackendError`] of the configured [`FaultKind`](crate::FaultKind) and never reaches the
//! store) and **abort** (the call is held until the experiment stops: the caller's own timeout
//! must end it). [`ChaosBus`] also honours **loss**: each message delivered to a subscription
//! opened through it may be dropped silently, as a subscriber that missed a pub/sub message
//! would see it. Off, a call is the inner store's own future behind one relaxed load.
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
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::Either;
use futures_util::{Stream, StreamExt};
use headroom_core::bus::{BusEvent, InvalidationBus, Subscription};
use headroom_core::jobs::{
    Completed, Completion, Delivery, EnqueueLimits, Enqueued, FetchRequest, JobNumber, JobRecord,
    JobStore, NewJob, PartitionStats,
};
use headroom_core::kv::{KvEntry, KvStore, VersionAt};
use headroom_core::lease::{Begin, BeginId, Fenced, FencingToken, LeaseStore};
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

    /// Whether a call on `keys` is seen: the predicate picks one of them (or there is none).
    #[inline]
    fn picks<'k>(&self, keys: impl IntoIterator<Item = &'k Key>) -> bool {
        self.when
            .as_ref()
            .is_none_or(|when| keys.into_iter().any(|key| when(key)))
    }

    /// Runs the call `make` builds with what the experiment draws for it. Off (one relaxed
    /// load), or when nothing is drawn, the future is the inner store's own, made at once and
    /// not boxed; otherwise the call is made only once the delay or hold is over, and not at
    /// all when the injection fails it.
    #[inline]
    fn call<'k, K, M, F, T>(
        &self,
        keys: K,
        make: M,
    ) -> Either<F, Pin<Box<impl Future<Output = Result<T, BackendError>> + Send + use<K, M, F, T>>>>
    where
        K: IntoIterator<Item = &'k Key>,
        M: FnOnce() -> F + Send,
        F: Future<Output = Result<T, BackendError>> + Send,
    {
        if !self.experiment.is_on() || !self.picks(keys) {
            return Either::Left(make());
        }
        match self.experiment.draw(Strategies::BACKEND) {
            None => Either::Left(make()),
            Some(injection) => Either::Right(injected(injection, make)),
        }
    }
}

/// An injected call: the delay or hold, then the fault instead of the call, or the call.
///
/// The inner call starts in the poll that ends the wait, so a store whose calls complete when
/// first polled still does (what [`LeaseStore::begin_completes_at_once`] promises the
/// idempotency executor: a caller dropped meanwhile has taken no lease).
#[cold]
#[inline(never)]
fn injected<M, F, T>(
    injection: Injection,
    make: M,
) -> Pin<Box<impl Future<Output = Result<T, BackendError>> + Send + use<M, F, T>>>
where
    M: FnOnce() -> F + Send,
    F: Future<Output = Result<T, BackendError>> + Send,
{
    Box::pin(async move {
        injection.wait().await;
        if let Some(kind) = injection.fault().filter(|_| injection.answers()) {
            return Err(BackendError::with_detail(
                kind.backend_kind(),
                format!("injected by chaos experiment `{}`", injection.experiment()),
            ));
        }
        drop(injection);
        make().await
    })
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

            /// Injects only into the calls on a key `when` picks (a call on several keys: if
            /// it picks any of them); the others are not seen by the experiment (they count
            /// neither in its rates nor in its blast radius). Replaces an earlier predicate.
            #[must_use]
            pub fn when(mut self, when: impl Fn(&Key) -> bool + Send + Sync + 'static) -> Self {
                self.point.when = Some(Arc::new(when));
                self
            }

            /// The wrapped store.
            pub fn inner(&self) -> &S {
                &self.inner
            }

            /// The experiment injected.
            pub fn experiment(&self) -> &Experiment {
                &self.point.experiment
            }
        }
    };
}

wrapper!(
    /// A [`KvStore`] (a cache's L2) with an experiment's **latency**, **fault** and **abort**
    /// injected into every call: `get`, `get_many`, `set`, `set_many`, `delete`,
    /// `set_if_newer` and `delete_if_eq` (the last two run the inner store's own
    /// implementation once the injection lets them through).
    ///
    /// A faulted call returns a [`BackendError`] of the experiment's
    /// [`FaultKind`](crate::FaultKind) and never reaches the store: a faulted `set` writes
    /// nothing. A held call waits until the experiment stops, then runs. Off, each call is the
    /// inner store's own future behind one relaxed atomic load, with no allocation.
    ///
    /// ```
    /// use std::time::Duration;
    /// use bytes::Bytes;
    /// use headroom_chaos::{ChaosKvStore, Experiment, ExperimentConfig};
    /// use headroom_core::kv::KvStore;
    /// use headroom_core::memory::MemoryKvStore;
    /// use headroom_core::{Key, Namespace};
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let experiment = Experiment::builder("hot-keys-down").build()?;
    /// // Give this to the cache as its L2 (`Cache::builder().l2(l2, namespace)`).
    /// let l2 = ChaosKvStore::new(MemoryKvStore::new(), experiment.clone())
    ///     .when(|key: &Key| key.local().starts_with(b"hot:"));
    /// let products = Namespace::new("shop")?;
    /// experiment.start(ExperimentConfig::new(Duration::from_secs(60)).fault(1.0))?;
    /// assert!(l2.get(&products.key("hot:7")?).await.is_err());
    /// assert!(l2.get(&products.key("cold:7")?).await.is_ok()); // not picked: not seen
    /// # Ok(()) }
    /// ```
    ChaosKvStore
);
wrapper!(
    /// An [`InvalidationBus`] with an experiment's **latency**, **fault** and **abort**
    /// injected into `publish` and `subscribe`, and **loss** on the subscriptions opened
    /// through it.
    ///
    /// Loss drops a delivered message silently: the subscriber never sees it and gets no
    /// [`BusEvent::Lost`], as when a pub/sub message vanishes on its way. A consumer that
    /// keeps derived state (an L1 cache) must notice such a loss by itself (sequence numbers,
    /// liveness pings); this is how to test that it does. [`BusEvent::Live`] and
    /// [`BusEvent::Lost`] pass through untouched. Each message is drawn as the subscriber
    /// receives it (one call the experiment sees, on the channel's key for the predicate), so
    /// a message still waiting to be read when the experiment stops is delivered. Subscribers
    /// on the inner bus lose nothing.
    ///
    /// ```
    /// use std::time::Duration;
    /// use bytes::Bytes;
    /// use futures_util::FutureExt;
    /// use headroom_chaos::{ChaosBus, Experiment, ExperimentConfig};
    /// use headroom_core::bus::{BusEvent, InvalidationBus};
    /// use headroom_core::memory::MemoryBus;
    /// use headroom_core::Namespace;
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let experiment = Experiment::builder("lossy-pubsub").build()?;
    /// let bus = ChaosBus::new(MemoryBus::new(), experiment.clone());
    /// let channel = Namespace::new("shop")?.key("~invalidation")?;
    /// let mut subscription = bus.subscribe(&channel).await?;
    /// assert_eq!(subscription.next_event().await, Some(BusEvent::Live));
    ///
    /// experiment.start(ExperimentConfig::new(Duration::from_secs(60)).loss(1.0))?;
    /// bus.publish(&channel, Bytes::from_static(b"lost")).await?;
    /// assert_eq!(subscription.next_event().now_or_never(), None); // dropped, silently
    /// experiment.stop();
    /// bus.publish(&channel, Bytes::from_static(b"kept")).await?;
    /// let next = subscription.next_event().await;
    /// assert_eq!(next, Some(BusEvent::Message(Bytes::from_static(b"kept"))));
    /// # Ok(()) }
    /// ```
    ChaosBus
);
wrapper!(
    /// A [`LeaseStore`] (idempotency records) with an experiment's **latency**, **fault** and
    /// **abort** injected into `begin`, `complete`, `extend`, `release` and `release_begun`.
    ///
    /// A faulted call never reaches the store: a faulted `begin` takes no lease, a faulted
    /// `complete` stores no outcome. [`begin_completes_at_once`](LeaseStore::begin_completes_at_once)
    /// is the inner store's answer: a delayed or held `begin` reaches the store only in the
    /// poll that ends its wait, so a caller dropped while it waits has taken no lease.
    ChaosLeaseStore
);
wrapper!(
    /// A [`RateStore`] (distributed rate limits) with an experiment's **latency**, **fault**
    /// and **abort** injected into `apply_all` and `apply` (the latter runs the inner store's
    /// own implementation). A faulted call charges no cell.
    ChaosRateStore
);
wrapper!(
    /// A [`JobStore`] (durable job queues and write-behind) with an experiment's **latency**,
    /// **fault** and **abort** injected into every call, keyed by the partition. A faulted
    /// call changes nothing: a faulted `enqueue` adds no job, a faulted `fetch` delivers none,
    /// a faulted `complete` leaves the job running (another worker takes it over after its
    /// visibility, as when a worker dies).
    ChaosJobStore
);
wrapper!(
    /// A [`MigrationStore`] (resharding state) with an experiment's **latency**, **fault** and
    /// **abort** injected into every call. A faulted call changes nothing.
    ChaosMigrationStore
);

fn entry_keys(entries: &[KvEntry]) -> impl Iterator<Item = &Key> {
    entries.iter().map(|entry| &entry.key)
}

impl<S: KvStore> KvStore for ChaosKvStore<S> {
    fn get(&self, key: &Key) -> impl Future<Output = Result<Option<Bytes>, BackendError>> + Send {
        self.point.call([key], move || self.inner.get(key))
    }

    fn get_many(
        &self,
        keys: &[Key],
    ) -> impl Future<Output = Result<Vec<Option<Bytes>>, BackendError>> + Send {
        self.point.call(keys, move || self.inner.get_many(keys))
    }

    fn set(
        &self,
        key: &Key,
        value: Bytes,
        ttl: Duration,
    ) -> impl Future<Output = Result<(), BackendError>> + Send {
        self.point
            .call([key], move || self.inner.set(key, value, ttl))
    }

    fn set_many(
        &self,
        entries: &[KvEntry],
    ) -> impl Future<Output = Result<(), BackendError>> + Send {
        self.point
            .call(entry_keys(entries), move || self.inner.set_many(entries))
    }

    fn delete(&self, keys: &[Key]) -> impl Future<Output = Result<u64, BackendError>> + Send {
        self.point.call(keys, move || self.inner.delete(keys))
    }

    fn set_if_newer(
        &self,
        entries: &[KvEntry],
        version: VersionAt,
    ) -> impl Future<Output = Result<u64, BackendError>> + Send {
        self.point.call(entry_keys(entries), move || {
            self.inner.set_if_newer(entries, version)
        })
    }

    fn delete_if_eq(
        &self,
        key: &Key,
        expected: &[u8],
    ) -> impl Future<Output = Result<bool, BackendError>> + Send {
        self.point
            .call([key], move || self.inner.delete_if_eq(key, expected))
    }
}

impl<B: InvalidationBus> InvalidationBus for ChaosBus<B> {
    fn publish(
        &self,
        channel: &Key,
        message: Bytes,
    ) -> impl Future<Output = Result<(), BackendError>> + Send {
        self.point
            .call([channel], move || self.inner.publish(channel, message))
    }

    fn subscribe(
        &self,
        channel: &Key,
    ) -> impl Future<Output = Result<Subscription, BackendError>> + Send {
        let subscribed = self
            .point
            .call([channel], move || self.inner.subscribe(channel));
        // The channel is fixed, so the predicate is asked once: a channel it does not pick
        // loses nothing and its messages are not seen.
        let experiment = self
            .point
            .picks([channel])
            .then(|| self.point.experiment.clone());
        async move {
            let events = subscribed.await?;
            Ok(match experiment {
                Some(experiment) => Subscription::new(Lossy { events, experiment }),
                None => events,
            })
        }
    }
}

/// A subscription through [`ChaosBus`]: each delivered message may be dropped by the loss
/// strategy.
struct Lossy {
    events: Subscription,
    experiment: Experiment,
}

impl Stream for Lossy {
    type Item = BusEvent;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<BusEvent>> {
        loop {
            let event = ready!(self.events.poll_next_unpin(cx));
            let lost = matches!(event, Some(BusEvent::Message(_)))
                && self
                    .experiment
                    .draw(Strategies::LOSS)
                    .is_some_and(|injection| injection.loss());
            if !lost {
                return Poll::Ready(event);
            }
        }
    }
}

impl<S: LeaseStore> LeaseStore for ChaosLeaseStore<S> {
    fn begin(
        &self,
        key: &Key,
        fingerprint: &[u8],
        lease: Duration,
        id: BeginId,
    ) -> impl Future<Output = Result<Begin, BackendError>> + Send {
        self.point
            .call([key], move || self.inner.begin(key, fingerprint, lease, id))
    }

    fn complete(
        &self,
        key: &Key,
        token: FencingToken,
        outcome: Bytes,
        retention: Duration,
    ) -> impl Future<Output = Result<Fenced, BackendError>> + Send {
        self.point.call([key], move || {
            self.inner.complete(key, token, outcome, retention)
        })
    }

    fn extend(
        &self,
        key: &Key,
        token: FencingToken,
        lease: Duration,
    ) -> impl Future<Output = Result<Fenced, BackendError>> + Send {
        self.point
            .call([key], move || self.inner.extend(key, token, lease))
    }

    fn release(
        &self,
        key: &Key,
        token: FencingToken,
    ) -> impl Future<Output = Result<Fenced, BackendError>> + Send {
        self.point
            .call([key], move || self.inner.release(key, token))
    }

    fn release_begun(
        &self,
        key: &Key,
        id: BeginId,
    ) -> impl Future<Output = Result<Fenced, BackendError>> + Send {
        self.point
            .call([key], move || self.inner.release_begun(key, id))
    }

    fn begin_completes_at_once(&self) -> bool {
        self.inner.begin_completes_at_once()
    }
}

impl<S: JobStore> JobStore for ChaosJobStore<S> {
    fn enqueue(
        &self,
        partition: &Key,
        job: &NewJob,
        limits: &EnqueueLimits,
    ) -> impl Future<Output = Result<Enqueued, BackendError>> + Send {
        self.point.call([partition], move || {
            self.inner.enqueue(partition, job, limits)
        })
    }

    fn fetch(
        &self,
        partition: &Key,
        request: FetchRequest<'_>,
    ) -> impl Future<Output = Result<Vec<Delivery>, BackendError>> + Send {
        self.point
            .call([partition], move || self.inner.fetch(partition, request))
    }

    fn fetch_marked(
        &self,
        partition: &Key,
        request: FetchRequest<'_>,
        token: u64,
    ) -> impl Future<Output = Result<Vec<Delivery>, BackendError>> + Send {
        self.point.call([partition], move || {
            self.inner.fetch_marked(partition, request, token)
        })
    }

    fn recover(
        &self,
        partition: &Key,
        consumer: &str,
        token: u64,
        max: usize,
    ) -> impl Future<Output = Result<Vec<Delivery>, BackendError>> + Send {
        self.point.call([partition], move || {
            self.inner.recover(partition, consumer, token, max)
        })
    }

    fn extend(
        &self,
        partition: &Key,
        number: JobNumber,
        attempt: u32,
    ) -> impl Future<Output = Result<Fenced, BackendError>> + Send {
        self.point.call([partition], move || {
            self.inner.extend(partition, number, attempt)
        })
    }

    fn complete(
        &self,
        partition: &Key,
        number: JobNumber,
        attempt: u32,
        result: Bytes,
        retention: Duration,
    ) -> impl Future<Output = Result<Fenced, BackendError>> + Send {
        self.point.call([partition], move || {
            self.inner
                .complete(partition, number, attempt, result, retention)
        })
    }

    fn complete_many(
        &self,
        partition: &Key,
        jobs: &[Completion],
        retention: Duration,
    ) -> impl Future<Output = Result<Completed, BackendError>> + Send {
        self.point.call([partition], move || {
            self.inner.complete_many(partition, jobs, retention)
        })
    }

    fn retry(
        &self,
        partition: &Key,
        number: JobNumber,
        attempt: u32,
        delay: Duration,
        error: Bytes,
    ) -> impl Future<Output = Result<Fenced, BackendError>> + Send {
        self.point.call([partition], move || {
            self.inner.retry(partition, number, attempt, delay, error)
        })
    }

    fn release(
        &self,
        partition: &Key,
        number: JobNumber,
        attempt: u32,
        error: Bytes,
    ) -> impl Future<Output = Result<Fenced, BackendError>> + Send {
        self.point.call([partition], move || {
            self.inner.release(partition, number, attempt, error)
        })
    }

    fn leave(
        &self,
        partition: &Key,
        consumer: &str,
    ) -> impl Future<Output = Result<(), BackendError>> + Send {
        self.point
            .call([partition], move || self.inner.leave(partition, consumer))
    }

    fn bury(
        &self,
        partition: &Key,
        number: JobNumber,
        attempt: u32,
        error: Bytes,
        retention: Duration,
    ) -> impl Future<Output = Result<Fenced, BackendError>> + Send {
        self.point.call([partition], move || {
            self.inner
                .bury(partition, number, attempt, error, retention)
        })
    }

    fn status(
        &self,
        partition: &Key,
        number: JobNumber,
    ) -> impl Future<Output = Result<Option<JobRecord>, BackendError>> + Send {
        self.point
            .call([partition], move || self.inner.status(partition, number))
    }

    fn dead_letters(
        &self,
        partition: &Key,
        max: usize,
    ) -> impl Future<Output = Result<Vec<JobNumber>, BackendError>> + Send {
        self.point
            .call([partition], move || self.inner.dead_letters(partition, max))
    }

    fn newest_of(
        &self,
        partition: &Key,
        subject: &[u8],
    ) -> impl Future<Output = Result<Option<(JobNumber, Bytes)>, BackendError>> + Send {
        self.point.call([partition], move || {
            self.inner.newest_of(partition, subject)
        })
    }

    fn stats(
        &self,
        partition: &Key,
    ) -> impl Future<Output = Result<PartitionStats, BackendError>> + Send {
        self.point
            .call([partition], move || self.inner.stats(partition))
    }
}

impl<S: RateStore> RateStore for ChaosRateStore<S> {
    fn apply_all(
        &self,
        cells: &[(Key, Gcra)],
        cost: u32,
    ) -> impl Future<Output = Result<RateDecision, BackendError>> + Send {
        self.point.call(cells.iter().map(|(key, _)| key), move || {
            self.inner.apply_all(cells, cost)
        })
    }

    fn apply(
        &self,
        key: &Key,
        gcra: Gcra,
        cost: u32,
    ) -> impl Future<Output = Result<RateDecision, BackendError>> + Send {
        self.point
            .call([key], move || self.inner.apply(key, gcra, cost))
    }
}

impl<S: MigrationStore> MigrationStore for ChaosMigrationStore<S> {
    fn create(
        &self,
        key: &Key,
        record: MigrationRecord,
    ) -> impl Future<Output = Result<MigrationRecord, BackendError>> + Send {
        self.point
            .call([key], move || self.inner.create(key, record))
    }

    fn load(
        &self,
        key: &Key,
    ) -> impl Future<Output = Result<Option<MigrationRecord>, BackendError>> + Send {
        self.point.call([key], move || self.inner.load(key))
    }

    fn transition(
        &self,
        key: &Key,
        expected: MigrationRecord,
        phase: u8,
    ) -> impl Future<Output = Result<Transition, BackendError>> + Send {
        self.point
            .call([key], move || self.inner.transition(key, expected, phase))
    }

    fn acknowledge(
        &self,
        key: &Key,
        participant: &str,
        phase: u8,
        lease: Duration,
    ) -> impl Future<Output = Result<(), BackendError>> + Send {
        self.point.call([key], move || {
            self.inner.acknowledge(key, participant, phase, lease)
        })
    }

    fn lagging(
        &self,
        key: &Key,
        phase: u8,
    ) -> impl Future<Output = Result<u64, BackendError>> + Send {
        self.point
            .call([key], move || self.inner.lagging(key, phase))
    }

    fn remove(&self, key: &Key) -> impl Future<Output = Result<(), BackendError>> + Send {
        self.point.call([key], move || self.inner.remove(key))
    }
}
