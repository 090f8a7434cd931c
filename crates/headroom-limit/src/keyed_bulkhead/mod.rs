//! Keyed bulkheads: one compartment of bounded concurrency shared among tenants, each
//! guaranteed a share of it.

mod shares;

use std::collections::BTreeMap;
use std::collections::hash_map::RandomState;
use std::fmt;
use std::hash::{BuildHasher, Hash};
use std::pin::pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use futures_util::future::{Either, select};
use headroom_core::Clock;
use headroom_core::metrics::Gauge;
use parking_lot::Mutex;
use tracing::Instrument;

use self::shares::{Settled, Shares};
use crate::error::admission_outcome;
use crate::metrics::AdmissionMetrics;
use crate::{ConfigError, Overloaded, Priority, Reason};

/// The largest capacity and queue a keyed bulkhead supports.
const MAX_SIZE: usize = 1 << 30;
/// The most tenants with state of their own: their state is allocated at build time.
const MAX_TENANTS: usize = 1 << 20;
/// The largest weight of a tenant class.
const MAX_WEIGHT: u32 = 1_000_000;

/// Configuration of a [`KeyedBulkhead`], loadable with serde (feature `serde`).
///
/// ```
/// # #[cfg(feature = "serde")] {
/// use headroom_limit::KeyedBulkheadConfig;
///
/// let config: KeyedBulkheadConfig = serde_json::from_str(r#"{
///     "max_concurrent": 64,
///     "max_queued": 32,
///     "max_wait": "50ms",
///     "max_tenants": 1000,
///     "classes": { "enterprise": 4, "pro": 2 }
/// }"#).unwrap();
/// assert_eq!(config.classes["enterprise"], 4);
/// # }
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(default, deny_unknown_fields))]
pub struct KeyedBulkheadConfig {
    /// How many callers of all tenants together may hold a permit at once.
    pub max_concurrent: usize,
    /// How many callers of all tenants together may wait for a permit; 0 refuses as soon as
    /// every permit is taken (and so gives no guarantee to a tenant that arrives then).
    pub max_queued: usize,
    /// How long a caller waits for a permit before it is refused.
    #[cfg_attr(feature = "serde", serde(with = "humantime_serde"))]
    pub max_wait: Duration,
    /// How many tenants have state of their own at once (1 to 2^20); beyond it, new tenants
    /// share one overflow tenant.
    pub max_tenants: usize,
    /// Tenant classes by name, with their weight (1 to 1,000,000). Tenants acquired without
    /// a class, and the overflow tenant, weigh 1.
    pub classes: BTreeMap<String, u32>,
}

impl Default for KeyedBulkheadConfig {
    fn default() -> Self {
        Self {
            max_concurrent: 64,
            max_queued: 64,
            max_wait: Duration::from_millis(100),
            max_tenants: 1024,
            classes: BTreeMap::new(),
        }
    }
}

/// A class of tenants and its weight: a tenant's guaranteed share grows with its weight.
///
/// Get one by name from [`KeyedBulkhead::class`]; [`TenantClass::DEFAULT`] weighs 1.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TenantClass {
    weight: u32,
}

impl TenantClass {
    /// The class of tenants acquired without one: weight 1.
    pub const DEFAULT: TenantClass = TenantClass { weight: 1 };

    /// The weight of the class.
    pub fn weight(&self) -> u32 {
        self.weight
    }
}

impl Default for TenantClass {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// A compartment of bounded concurrency shared among tenants, each guaranteed a share of it
/// and free to borrow what the others leave idle.
///
/// A [`Bulkhead`](crate::Bulkhead) treats every caller alike, so one tenant sending a flood
/// takes every permit and every place in the queue. Here each caller names its tenant (a
/// customer, an API token, a client address: any `Hash` value) and the capacity is shared
/// by these rules:
///
/// - **Shares.** A tenant is *active* while it holds a permit or waits for one. Its
///   guaranteed share is `⌊capacity × weight / sum of the weights of active tenants⌋`
///   permits: with one class (every weight 1), an equal part of the capacity. Named classes
///   ([`class`](Self::class), [`acquire_in`](Self::acquire_in)) weigh more. A tenant's
///   weight is that of the acquire that made it active, until it is idle again.
/// - **Borrowing.** A caller takes a free permit at once, whatever its tenant already
///   holds: capacity the other tenants leave idle is not wasted. No permit is free while
///   anyone waits.
/// - **Giving back.** When every permit is taken, callers wait (at most
///   [`max_queued`](Self::max_queued) of them, each for at most
///   [`max_wait`](Self::max_wait)). A returned permit goes to the waiting tenant that holds
///   the fewest permits for its weight (the smallest `(held + 1) / weight`), ties to the
///   tenant whose oldest caller came first; a tenant's own callers are served in arrival
///   order. So a waiting tenant below its share is served before every tenant at or over
///   its share: borrowed permits come back to it as their holders finish. Running work is
///   never preempted.
/// - **A full queue.** A caller that finds the queue full takes the place of the newest
///   waiter of another tenant when its own tenant's permits and waiters, itself included,
///   stay within its share, and the other tenant's exceed theirs (of such tenants, the one
///   with the most permits and waiters for its weight). That waiter is refused with
///   [`Reason::Evicted`]; otherwise the caller is refused with [`Reason::QueueFull`]. A
///   flooding tenant cannot keep a quiet one out of the queue.
///
/// Every refusal is an [`Overloaded`] ([`QueueFull`](Reason::QueueFull),
/// [`WaitTimeout`](Reason::WaitTimeout), [`Evicted`](Reason::Evicted)). A permit is given
/// back when it is dropped: on success, on error, on panic and when the future holding it is
/// cancelled; a caller whose wait is cancelled leaves the queue, and one cancelled just after
/// being handed a permit passes it on.
///
/// # Memory
///
/// Tenants are told apart by a 64-bit hash of their name (SipHash, keyed at random for each
/// bulkhead); names are never stored, so long names cost nothing and an outsider cannot aim
/// for a collision (two names would then share one tenant's state). A tenant has state only
/// while it is active, and at most [`max_tenants`](Self::max_tenants) have it at once; a
/// new tenant arriving beyond that shares one *overflow* tenant, of weight 1, with the
/// others that found no room, until a tracked tenant goes idle. A tenant's state is dropped,
/// in O(1), as soon as it is idle.
///
/// The state for `min(max_tenants, max_concurrent + max_queued + 1)` tenants (about 50
/// bytes each) is allocated when the bulkhead is built, so neither a new tenant nor a
/// returning one allocates; the wait queue grows to its high-water mark, at most
/// `max_queued` entries.
///
/// # Cost
///
/// Each acquire and release hashes the name and takes one short lock: the decision needs a
/// consistent view of every tenant. A release with callers waiting also looks at each
/// waiting tenant once, as does a caller finding the queue full.
///
/// ```
/// use futures_util::FutureExt;
/// use headroom_limit::{KeyedBulkhead, Reason};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let bulkhead = KeyedBulkhead::builder("api")
///     .max_concurrent(4)
///     .max_queued(4)
///     .build()?;
/// // Alone, a tenant borrows the whole capacity.
/// let mut busy = Vec::new();
/// for _ in 0..4 {
///     busy.push(bulkhead.acquire("acme").await?);
/// }
/// // A quiet tenant waits for the next permit given back, ahead of the busy one.
/// let mut quiet = std::pin::pin!(bulkhead.acquire("initech"));
/// assert!(quiet.as_mut().now_or_never().is_none());
/// let mut more = std::pin::pin!(bulkhead.acquire("acme"));
/// assert!(more.as_mut().now_or_never().is_none());
/// drop(busy.pop());
/// let _permit = quiet.await?;
/// assert_eq!(bulkhead.try_acquire("acme").unwrap_err().reason(), Reason::QueueFull);
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct KeyedBulkhead {
    inner: Arc<Inner>,
}

struct Inner {
    shares: Mutex<Shares>,
    hasher: RandomState,
    name: Arc<str>,
    capacity: usize,
    max_queued: usize,
    max_wait: Duration,
    max_tenants: usize,
    classes: BTreeMap<String, TenantClass>,
    clock: Clock,
    metrics: AdmissionMetrics,
    in_flight_gauge: Gauge,
    /// Set once; kept so that a recorder installed later still gets its value.
    _limit_gauge: Gauge,
}

/// Builds a [`KeyedBulkhead`].
#[must_use]
#[derive(Debug)]
pub struct KeyedBulkheadBuilder {
    name: String,
    config: KeyedBulkheadConfig,
    clock: Clock,
}

impl KeyedBulkhead {
    /// A builder for a keyed bulkhead named `name` (the `bulkhead` label of its metrics).
    pub fn builder(name: impl Into<String>) -> KeyedBulkheadBuilder {
        KeyedBulkheadBuilder {
            name: name.into(),
            config: KeyedBulkheadConfig::default(),
            clock: Clock::system(),
        }
    }

    /// A keyed bulkhead named `name` from a loaded configuration.
    pub fn from_config(
        name: impl Into<String>,
        config: KeyedBulkheadConfig,
    ) -> Result<Self, ConfigError> {
        Self::builder(name).config(config).build()
    }

    /// The class named `name` in the configuration, if there is one.
    pub fn class(&self, name: &str) -> Option<TenantClass> {
        self.inner.classes.get(name).copied()
    }

    /// Takes a permit for `tenant` (of the default class) if one is free right now; never
    /// waits.
    ///
    /// Fails with [`Reason::QueueFull`] when every permit is in use.
    pub fn try_acquire<Q: Hash + ?Sized>(&self, tenant: &Q) -> Result<KeyedPermit<'_>, Overloaded> {
        self.try_acquire_in(TenantClass::DEFAULT, tenant)
    }

    /// Like [`try_acquire`](Self::try_acquire), for a tenant of `class`.
    pub fn try_acquire_in<Q: Hash + ?Sized>(
        &self,
        class: TenantClass,
        tenant: &Q,
    ) -> Result<KeyedPermit<'_>, Overloaded> {
        let hash = self.inner.hasher.hash_one(tenant);
        match self.inner.try_take(hash, class) {
            Some(slot) => Ok(KeyedPermit::new(&self.inner, slot)),
            None => Err(self.inner.reject(Reason::QueueFull)),
        }
    }

    /// Takes a permit for `tenant` (of the default class), waiting for one if every permit
    /// is taken and there is room in the queue.
    ///
    /// Fails with [`Reason::QueueFull`] when there is no room, with [`Reason::WaitTimeout`]
    /// after waiting [`max_wait`](Self::max_wait), and with [`Reason::Evicted`] when a tenant
    /// within its share took the place. Dropping the future gives up the place in the queue.
    pub async fn acquire<Q: Hash + ?Sized>(
        &self,
        tenant: &Q,
    ) -> Result<KeyedPermit<'_>, Overloaded> {
        self.acquire_in(TenantClass::DEFAULT, tenant).await
    }

    /// Like [`acquire`](Self::acquire), for a tenant of `class`.
    pub async fn acquire_in<Q: Hash + ?Sized>(
        &self,
        class: TenantClass,
        tenant: &Q,
    ) -> Result<KeyedPermit<'_>, Overloaded> {
        let hash = self.inner.hasher.hash_one(tenant);
        self.acquire_hashed(hash, class).await
    }

    #[cfg(feature = "tower")]
    pub(crate) fn tenant_hash<Q: Hash + ?Sized>(&self, tenant: &Q) -> u64 {
        self.inner.hasher.hash_one(tenant)
    }

    pub(crate) async fn acquire_hashed(
        &self,
        hash: u64,
        class: TenantClass,
    ) -> Result<KeyedPermit<'_>, Overloaded> {
        let slot = match self.inner.try_take(hash, class) {
            Some(slot) => slot,
            None => self.inner.wait(hash, class).await?,
        };
        Ok(KeyedPermit::new(&self.inner, slot))
    }

    /// Takes a free permit without counting a refusal when there is none.
    #[cfg(feature = "tower")]
    pub(crate) fn try_admit_owned(
        &self,
        hash: u64,
        class: TenantClass,
    ) -> Option<OwnedKeyedPermit> {
        let slot = self.inner.try_take(hash, class)?;
        Some(KeyedPermit::new(&self.inner, slot).into_owned())
    }

    /// Refuses a caller that found every permit taken and may not wait.
    #[cfg(feature = "tower")]
    pub(crate) fn reject_full(&self) -> Overloaded {
        self.inner.reject(Reason::QueueFull)
    }

    /// The bulkhead's name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// How many permits there are, for all tenants together.
    pub fn capacity(&self) -> usize {
        self.inner.capacity
    }

    /// How many permits are held right now.
    pub fn in_use(&self) -> usize {
        self.inner.shares.lock().in_use()
    }

    /// How many callers are waiting for a permit right now.
    pub fn queued(&self) -> usize {
        self.inner.shares.lock().queued()
    }

    /// How many tenants have state of their own right now (holding a permit or waiting),
    /// not counting the overflow tenant: at most [`max_tenants`](Self::max_tenants).
    pub fn tracked_tenants(&self) -> usize {
        self.inner.shares.lock().tracked()
    }

    /// How many callers may wait for a permit.
    pub fn max_queued(&self) -> usize {
        self.inner.max_queued
    }

    /// How long a caller may wait for a permit.
    pub fn max_wait(&self) -> Duration {
        self.inner.max_wait
    }

    /// How many tenants may have state of their own at once.
    pub fn max_tenants(&self) -> usize {
        self.inner.max_tenants
    }

    /// How many callers were refused for `reason` (counted since the bulkhead was built).
    pub fn rejected(&self, reason: Reason) -> u64 {
        self.inner
            .metrics
            .rejections
            .count(Priority::Default, reason)
    }
}

impl Inner {
    fn try_take(&self, hash: u64, class: TenantClass) -> Option<u32> {
        let slot = self.shares.lock().try_take(hash, class.weight)?;
        self.admitted();
        Some(slot)
    }

    async fn wait(&self, hash: u64, class: TenantClass) -> Result<u32, Overloaded> {
        let queued = {
            let mut shares = self.shares.lock();
            // A permit may have come back since the first look.
            if let Some(slot) = shares.try_take(hash, class.weight) {
                drop(shares);
                self.admitted();
                return Ok(slot);
            }
            shares.enqueue(hash, class.weight)
        };
        let Some(queued) = queued else {
            return Err(self.reject(Reason::QueueFull));
        };
        if queued.evicted {
            self.reject(Reason::Evicted);
            if let Some(waker) = queued.wake {
                waker.wake();
            }
        }
        // From here on the place in the queue is given up however the wait ends.
        let mut place = Place::enter(self, queued.waiter);
        // Only a caller that waits opens a span: taking a free permit costs little.
        let span = tracing::debug_span!("keyed_bulkhead.acquire", name = %self.name, outcome = tracing::field::Empty);
        let result = async {
            let start = self.clock.now();
            let settled = {
                let granted = std::future::poll_fn(|cx| match place.poll(cx.waker()) {
                    Some(settled) => Poll::Ready(settled),
                    None => Poll::Pending,
                });
                match select(pin!(granted), pin!(self.clock.sleep(self.max_wait))).await {
                    Either::Left((settled, _)) => Some(settled),
                    Either::Right(_) => place.give_up(),
                }
            };
            match settled {
                Some(Settled::Granted(slot)) => {
                    self.metrics.queue_delay.record(
                        self.clock
                            .now()
                            .saturating_duration_since(start)
                            .as_secs_f64(),
                    );
                    self.admitted();
                    Ok(slot)
                }
                // Counted when the place was taken.
                Some(Settled::Evicted) => Err(Overloaded::new(Reason::Evicted, Priority::Default)),
                None => Err(self.reject(Reason::WaitTimeout)),
            }
        }
        .instrument(span.clone())
        .await;
        span.record("outcome", admission_outcome(&result));
        result
    }

    fn admitted(&self) {
        self.in_flight_gauge.increment(1.0);
        self.metrics.admitted.increment(1);
    }

    fn reject(&self, reason: Reason) -> Overloaded {
        self.metrics.rejections.record(Priority::Default, reason);
        tracing::debug!(bulkhead = %self.name, %reason, "rejected");
        Overloaded::new(reason, Priority::Default)
    }

    fn release(&self, slot: u32) {
        self.in_flight_gauge.decrement(1.0);
        let wake = self.shares.lock().release(slot);
        if let Some(waker) = wake {
            waker.wake();
        }
    }
}

/// A caller's place in the queue, given up however its wait ends.
struct Place<'a> {
    inner: &'a Inner,
    /// `None` once the wait has settled and the place is freed.
    waiter: Option<u32>,
}

impl<'a> Place<'a> {
    fn enter(inner: &'a Inner, waiter: u32) -> Self {
        inner.metrics.queued.increment(1.0);
        Self {
            inner,
            waiter: Some(waiter),
        }
    }

    fn poll(&mut self, waker: &std::task::Waker) -> Option<Settled> {
        let waiter = self.waiter?;
        let settled = self.inner.shares.lock().poll_wait(waiter, waker);
        if settled.is_some() {
            self.settle();
        }
        settled
    }

    /// Stops waiting: a permit granted meanwhile is still taken, otherwise the place is left.
    fn give_up(&mut self) -> Option<Settled> {
        let waiter = self.waiter?;
        let settled = {
            let mut shares = self.inner.shares.lock();
            let settled = shares.settled(waiter);
            if settled.is_none() {
                shares.leave(waiter);
            }
            settled
        };
        self.settle();
        settled
    }

    fn settle(&mut self) {
        self.waiter = None;
        self.inner.metrics.queued.decrement(1.0);
    }
}

impl Drop for Place<'_> {
    fn drop(&mut self) {
        if let Some(waiter) = self.waiter.take() {
            self.inner.metrics.queued.decrement(1.0);
            let wake = self.inner.shares.lock().leave(waiter);
            if let Some(waker) = wake {
                waker.wake();
            }
        }
    }
}

impl fmt::Debug for KeyedBulkhead {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (in_use, queued, tracked) = {
            let shares = self.inner.shares.lock();
            (shares.in_use(), shares.queued(), shares.tracked())
        };
        f.debug_struct("KeyedBulkhead")
            .field("name", &self.inner.name)
            .field("capacity", &self.inner.capacity)
            .field("in_use", &in_use)
            .field("queued", &queued)
            .field("tracked_tenants", &tracked)
            .finish()
    }
}

impl KeyedBulkheadBuilder {
    /// How many callers of all tenants together may hold a permit at once (default 64).
    pub fn max_concurrent(mut self, max_concurrent: usize) -> Self {
        self.config.max_concurrent = max_concurrent;
        self
    }

    /// How many callers of all tenants together may wait for a permit (default 64).
    pub fn max_queued(mut self, max_queued: usize) -> Self {
        self.config.max_queued = max_queued;
        self
    }

    /// How long a caller may wait for a permit (default 100 ms).
    pub fn max_wait(mut self, max_wait: Duration) -> Self {
        self.config.max_wait = max_wait;
        self
    }

    /// How many tenants may have state of their own at once (default 1024, 1 to 2^20);
    /// beyond it, new tenants share one overflow tenant.
    pub fn max_tenants(mut self, max_tenants: usize) -> Self {
        self.config.max_tenants = max_tenants;
        self
    }

    /// Adds (or replaces) the tenant class `name`, of `weight`.
    pub fn class(mut self, name: impl Into<String>, weight: u32) -> Self {
        self.config.classes.insert(name.into(), weight);
        self
    }

    /// Replaces every setting with `config`.
    pub fn config(mut self, config: KeyedBulkheadConfig) -> Self {
        self.config = config;
        self
    }

    /// The clock that times waits (default: [`Clock::system`]).
    pub fn clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    /// Builds the bulkhead, or says which setting is out of range.
    pub fn build(self) -> Result<KeyedBulkhead, ConfigError> {
        let config = self.config;
        if config.max_concurrent == 0 {
            return Err(ConfigError::new("max_concurrent", "must be at least 1"));
        }
        if config.max_tenants == 0 {
            // Every tenant would be the overflow tenant: nothing shared fairly.
            return Err(ConfigError::new("max_tenants", "must be at least 1"));
        }
        for (field, value, max) in [
            ("max_concurrent", config.max_concurrent, MAX_SIZE),
            ("max_queued", config.max_queued, MAX_SIZE),
            ("max_tenants", config.max_tenants, MAX_TENANTS),
        ] {
            if value > max {
                return Err(ConfigError::new(
                    field,
                    "exceeds the largest supported size",
                ));
            }
        }
        let mut classes = BTreeMap::new();
        for (name, weight) in config.classes {
            if !(1..=MAX_WEIGHT).contains(&weight) {
                return Err(ConfigError::new(
                    "classes",
                    "weights must lie in 1..=1000000",
                ));
            }
            classes.insert(name, TenantClass { weight });
        }
        let name = self.name;
        let gauge =
            |metric: &'static str| headroom_core::gauge!(metric, "bulkhead" => name.clone());
        let limit_gauge = gauge("headroom_limit_concurrency_limit_requests");
        limit_gauge.set(config.max_concurrent as f64);
        let shares = Shares::new(
            config.max_concurrent as u32,
            config.max_queued as u32,
            config.max_tenants,
            gauge("headroom_limit_tracked_tenants"),
            headroom_core::counter!("headroom_limit_tenant_overflows_total", "bulkhead" => name.clone()),
        );
        Ok(KeyedBulkhead {
            inner: Arc::new(Inner {
                shares: Mutex::new(shares),
                hasher: RandomState::new(),
                metrics: AdmissionMetrics::new("bulkhead", &name),
                in_flight_gauge: gauge("headroom_limit_in_flight_requests"),
                _limit_gauge: limit_gauge,
                name: Arc::from(name),
                capacity: config.max_concurrent,
                max_queued: config.max_queued,
                max_wait: config.max_wait,
                max_tenants: config.max_tenants,
                classes,
                clock: self.clock,
            }),
        })
    }
}

/// The right to run one unit of work in a [`KeyedBulkhead`] for one tenant; dropping it
/// gives the right back.
///
/// Borrows the bulkhead; [`into_owned`](KeyedPermit::into_owned) turns it into an
/// [`OwnedKeyedPermit`].
#[must_use = "the permit is released as soon as it is dropped"]
pub struct KeyedPermit<'a> {
    inner: &'a Arc<Inner>,
    slot: u32,
}

impl<'a> KeyedPermit<'a> {
    fn new(inner: &'a Arc<Inner>, slot: u32) -> Self {
        Self { inner, slot }
    }

    /// The same permit, owning a handle to the bulkhead so it can outlive the borrow.
    pub fn into_owned(self) -> OwnedKeyedPermit {
        let this = std::mem::ManuallyDrop::new(self);
        OwnedKeyedPermit {
            inner: Arc::clone(this.inner),
            slot: this.slot,
        }
    }
}

impl Drop for KeyedPermit<'_> {
    fn drop(&mut self) {
        self.inner.release(self.slot);
    }
}

impl fmt::Debug for KeyedPermit<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyedPermit")
            .field("bulkhead", &self.inner.name)
            .finish()
    }
}

/// A [`KeyedPermit`] that owns a handle to its [`KeyedBulkhead`], for `'static` futures and
/// tasks.
#[must_use = "the permit is released as soon as it is dropped"]
pub struct OwnedKeyedPermit {
    inner: Arc<Inner>,
    slot: u32,
}

impl Drop for OwnedKeyedPermit {
    fn drop(&mut self) {
        self.inner.release(self.slot);
    }
}

impl fmt::Debug for OwnedKeyedPermit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OwnedKeyedPermit")
            .field("bulkhead", &self.inner.name)
            .finish()
    }
}
