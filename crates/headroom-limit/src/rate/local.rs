//! In-process GCRA: a lock-free direct limiter and a sharded, bounded keyed limiter.

use std::borrow::Borrow;
use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hash};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hashbrown::HashTable;
use headroom_core::Clock;
use parking_lot::RwLock;

use super::{Admitted, Quota, RateError, RateErrorKind, RateLimited};

/// A quota in integer nanoseconds, with the clock it is measured on.
#[derive(Clone, Debug)]
struct Gcra {
    quota: Quota,
    interval: u64,
    tolerance: u64,
    clock: Clock,
    origin: Instant,
}

impl Gcra {
    fn new(quota: Quota, clock: Clock) -> Self {
        let interval = nanos(quota.emission_interval());
        Self {
            quota,
            interval,
            tolerance: interval.saturating_mul(u64::from(quota.burst())),
            origin: clock.now(),
            clock,
        }
    }

    /// Runs `attempt` until it is admitted, sleeping between attempts while the wait it is
    /// told stays within `max_wait` of the first; refuses at once otherwise.
    async fn acquire(
        &self,
        max_wait: Duration,
        mut attempt: impl FnMut() -> Result<Admitted, RateError>,
    ) -> Result<Admitted, RateError> {
        let deadline = self.clock.now() + max_wait;
        loop {
            let error = match attempt() {
                Ok(admitted) => return Ok(admitted),
                Err(error) => error,
            };
            match error.limited() {
                Some(limited) if self.clock.now() + limited.retry_after() <= deadline => {
                    self.clock.sleep(limited.retry_after()).await;
                }
                _ => return Err(error),
            }
        }
    }

    /// Nanoseconds since the limiter was built.
    #[inline]
    fn now(&self) -> u64 {
        let elapsed = self.clock.now().saturating_duration_since(self.origin);
        // u64 arithmetic: cheaper than `as_nanos` (u128), and 584 years before it saturates.
        elapsed
            .as_secs()
            .saturating_mul(1_000_000_000)
            .saturating_add(u64::from(elapsed.subsec_nanos()))
    }

    /// One GCRA step on `cell` (the theoretical arrival time): the new `tat` when admitted,
    /// the nanoseconds to wait when not. One compare-and-swap, retried only on contention.
    #[inline]
    fn step(&self, cell: &AtomicU64, now: u64, cost: u32) -> Result<u64, u64> {
        let increment = self.interval.saturating_mul(u64::from(cost));
        let mut tat = cell.load(Ordering::Relaxed);
        loop {
            let new_tat = tat.max(now).saturating_add(increment);
            let allow_at = new_tat.saturating_sub(self.tolerance);
            if allow_at > now {
                return Err(allow_at - now);
            }
            match cell.compare_exchange_weak(tat, new_tat, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return Ok(new_tat),
                Err(actual) => tat = actual,
            }
        }
    }

    #[inline]
    fn limited(&self, wait: u64) -> RateLimited {
        RateLimited::new(self.quota, Duration::from_nanos(wait))
    }

    fn admitted(&self, new_tat: u64, now: u64) -> Admitted {
        let headroom = now.saturating_add(self.tolerance).saturating_sub(new_tat);
        Admitted {
            quota: self.quota,
            remaining: u32::try_from(headroom / self.interval).unwrap_or(u32::MAX),
            reset_after: Duration::from_nanos(new_tat.saturating_sub(now)),
        }
    }

    fn check_n(&self, cell: &AtomicU64, now: u64, cost: u32) -> Result<Admitted, RateError> {
        if cost > self.quota.burst() {
            return Err(RateError::new(RateErrorKind::CostTooHigh));
        }
        match self.step(cell, now, cost) {
            Ok(new_tat) => Ok(self.admitted(new_tat, now)),
            Err(wait) => Err(self.limited(wait).into()),
        }
    }
}

fn nanos(duration: Duration) -> u64 {
    u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX)
}

/// One GCRA cell for a whole service or resource: `check` is a load and one
/// compare-and-swap on an `AtomicU64`, with no lock and no allocation.
///
/// Share it behind an `Arc`. Time comes from the [`Clock`] (the system clock by default).
///
/// ```
/// use std::time::Duration;
/// use headroom_core::ManualClock;
/// use headroom_limit::rate::{DirectLimiter, Quota};
///
/// let clock = ManualClock::new();
/// let quota = Quota::per_second(5).unwrap().with_burst(2).unwrap();
/// let limiter = DirectLimiter::builder(quota).clock(clock.clock()).build();
/// assert!(limiter.check().is_ok() && limiter.check().is_ok());
/// assert_eq!(limiter.check().unwrap_err().retry_after(), Duration::from_millis(200));
/// clock.advance(Duration::from_millis(200));
/// assert_eq!(limiter.check_n(1).unwrap().remaining(), 0);
/// ```
#[derive(Debug)]
pub struct DirectLimiter {
    gcra: Gcra,
    tat: AtomicU64,
}

/// Builds a [`DirectLimiter`].
#[derive(Debug)]
#[must_use]
pub struct DirectLimiterBuilder {
    quota: Quota,
    clock: Clock,
}

impl DirectLimiterBuilder {
    /// The clock time is read from (default: the system clock).
    pub fn clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    /// Builds the limiter with its full burst available.
    pub fn build(self) -> DirectLimiter {
        DirectLimiter {
            gcra: Gcra::new(self.quota, self.clock),
            tat: AtomicU64::new(0),
        }
    }
}

impl DirectLimiter {
    /// A builder enforcing `quota`.
    pub fn builder(quota: Quota) -> DirectLimiterBuilder {
        DirectLimiterBuilder {
            quota,
            clock: Clock::system(),
        }
    }

    /// The quota enforced.
    pub fn quota(&self) -> Quota {
        self.gcra.quota
    }

    /// Spends one unit, or says how long until one is available.
    #[inline]
    pub fn check(&self) -> Result<(), RateLimited> {
        let now = self.gcra.now();
        match self.gcra.step(&self.tat, now, 1) {
            Ok(_) => Ok(()),
            Err(wait) => Err(self.gcra.limited(wait)),
        }
    }

    /// Spends `cost` units at once, or none. A cost above the burst is
    /// [`RateErrorKind::CostTooHigh`].
    pub fn check_n(&self, cost: u32) -> Result<Admitted, RateError> {
        let now = self.gcra.now();
        self.gcra.check_n(&self.tat, now, cost)
    }

    /// Spends `cost` units, waiting for them if they will be available within `max_wait`;
    /// refuses at once, with the wait it would have needed, if they will not.
    ///
    /// Nothing is reserved while waiting: a caller that checks meanwhile may take the units,
    /// and the wait goes on within `max_wait`. Dropping the future gives up the wait.
    pub async fn acquire_n(&self, cost: u32, max_wait: Duration) -> Result<Admitted, RateError> {
        self.gcra.acquire(max_wait, || self.check_n(cost)).await
    }
}

/// Builds a [`KeyedLimiter`].
#[derive(Debug)]
#[must_use]
pub struct KeyedLimiterBuilder {
    quota: Quota,
    clock: Clock,
    max_keys: usize,
    shards: usize,
    idle_sweep: Duration,
}

impl KeyedLimiterBuilder {
    /// The clock time is read from (default: the system clock).
    pub fn clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    /// The most keys held at once (default 1,000,000), rounded up to a multiple of the
    /// number of shards. The cap holds under any number of distinct keys; see
    /// [`KeyedLimiter`] for what happens when it is reached.
    pub fn max_keys(mut self, max_keys: usize) -> Self {
        self.max_keys = max_keys;
        self
    }

    /// The number of independently locked shards, rounded up to a power of two
    /// (default: 4 per available core, at least 16).
    pub fn shards(mut self, shards: usize) -> Self {
        self.shards = shards;
        self
    }

    /// How often each shard drops the keys that are full again (default 10 s). They are also
    /// dropped whenever a shard reaches its share of the cap.
    pub fn idle_sweep(mut self, every: Duration) -> Self {
        self.idle_sweep = every;
        self
    }

    /// Builds the limiter.
    pub fn build<K>(self) -> KeyedLimiter<K> {
        let shards = self.shards.clamp(1, 1 << 16).next_power_of_two();
        let shard_cap = self.max_keys.div_ceil(shards).max(1);
        KeyedLimiter {
            shards: (0..shards)
                .map(|_| {
                    RwLock::new(Shard {
                        cells: HashTable::new(),
                        next_sweep: 0,
                    })
                })
                .collect(),
            mask: shards - 1,
            shard_cap,
            sweep_every: nanos(self.idle_sweep),
            hasher: RandomState::new(),
            gcra: Gcra::new(self.quota, self.clock),
        }
    }
}

/// One GCRA cell per key (a user, a client IP, an API token), with memory bounded under
/// any number of attacker-chosen keys.
///
/// Keys are spread over independently locked shards by a randomly seeded hash. Checking a
/// key that is present takes a shard's read lock, a compare-and-swap, and no allocation.
///
/// # Memory
///
/// Each shard holds at most `max_keys / shards` keys. A key whose cell is full again (its
/// theoretical arrival time has passed) is the same as an absent key, so shards drop such
/// keys every [`idle_sweep`](KeyedLimiterBuilder::idle_sweep) and whenever they fill up,
/// losing nothing. Only when a shard is still full of keys that are draining does it evict
/// the eighth of them nearest to full again: those keys get their burst back early, which is
/// the price of a hard cap.
///
/// ```
/// use headroom_core::ManualClock;
/// use headroom_limit::rate::{KeyedLimiter, Quota};
///
/// let clock = ManualClock::new();
/// let limiter: KeyedLimiter<String> = KeyedLimiter::builder(Quota::per_minute(2).unwrap())
///     .clock(clock.clock())
///     .max_keys(10_000)
///     .build();
/// assert!(limiter.check_key("alice").is_ok() && limiter.check_key("alice").is_ok());
/// assert!(limiter.check_key("alice").is_err());
/// assert!(limiter.check_key("bob").is_ok());
/// ```
#[derive(Debug)]
pub struct KeyedLimiter<K> {
    shards: Box<[RwLock<Shard<K>>]>,
    mask: usize,
    shard_cap: usize,
    sweep_every: u64,
    hasher: RandomState,
    gcra: Gcra,
}

#[derive(Debug)]
struct Shard<K> {
    cells: HashTable<(K, AtomicU64)>,
    next_sweep: u64,
}

impl KeyedLimiter<()> {
    /// A builder enforcing `quota` per key.
    pub fn builder(quota: Quota) -> KeyedLimiterBuilder {
        let cores = std::thread::available_parallelism().map_or(4, usize::from);
        KeyedLimiterBuilder {
            quota,
            clock: Clock::system(),
            max_keys: 1_000_000,
            shards: (cores * 4).max(16),
            idle_sweep: Duration::from_secs(10),
        }
    }
}

impl<K: Hash + Eq> KeyedLimiter<K> {
    /// The quota enforced per key.
    pub fn quota(&self) -> Quota {
        self.gcra.quota
    }

    /// Spends one unit of `key`'s quota, or says how long until one is available.
    #[inline]
    pub fn check_key<Q>(&self, key: &Q) -> Result<(), RateLimited>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ToOwned<Owned = K> + ?Sized,
    {
        let now = self.gcra.now();
        match self.apply(key, now, 1) {
            Ok(_) => Ok(()),
            Err(wait) => Err(self.gcra.limited(wait)),
        }
    }

    /// Spends `cost` units of `key`'s quota at once, or none. A cost above the burst is
    /// [`RateErrorKind::CostTooHigh`].
    pub fn check_key_n<Q>(&self, key: &Q, cost: u32) -> Result<Admitted, RateError>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ToOwned<Owned = K> + ?Sized,
    {
        if cost > self.gcra.quota.burst() {
            return Err(RateError::new(RateErrorKind::CostTooHigh));
        }
        let now = self.gcra.now();
        match self.apply(key, now, cost) {
            Ok(new_tat) => Ok(self.gcra.admitted(new_tat, now)),
            Err(wait) => Err(self.gcra.limited(wait).into()),
        }
    }

    /// Spends `cost` units of `key`'s quota, waiting for them if they will be available
    /// within `max_wait`; refuses at once, with the wait it would have needed, if they will
    /// not. As for [`DirectLimiter::acquire_n`], nothing is reserved while waiting.
    pub async fn acquire_key_n<Q>(
        &self,
        key: &Q,
        cost: u32,
        max_wait: Duration,
    ) -> Result<Admitted, RateError>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ToOwned<Owned = K> + ?Sized,
    {
        self.gcra
            .acquire(max_wait, || self.check_key_n(key, cost))
            .await
    }

    /// The number of keys held.
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|shard| shard.read().cells.len())
            .sum()
    }

    /// Whether no key is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The most keys held at once.
    pub fn max_keys(&self) -> usize {
        self.shard_cap * self.shards.len()
    }

    /// Drops every key whose cell is full again (losing nothing) and returns how many
    /// keys remain.
    pub fn sweep(&self) -> usize {
        let now = self.gcra.now();
        self.shards
            .iter()
            .map(|shard| {
                let mut shard = shard.write();
                shard.sweep(now, self.sweep_every, &self.hasher);
                shard.cells.len()
            })
            .sum()
    }

    #[inline]
    fn apply<Q>(&self, key: &Q, now: u64, cost: u32) -> Result<u64, u64>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ToOwned<Owned = K> + ?Sized,
    {
        let hash = self.hasher.hash_one(key);
        // The table uses the low bits to place entries and the top seven as tags; pick
        // the shard from bits in between.
        let shard = &self.shards[(hash >> 32) as usize & self.mask];
        let eq = |(k, _): &(K, AtomicU64)| k.borrow() == key;
        if let Some((_, cell)) = shard.read().cells.find(hash, eq) {
            return self.gcra.step(cell, now, cost);
        }
        let mut shard = shard.write();
        if let Some((_, cell)) = shard.cells.find(hash, eq) {
            return self.gcra.step(cell, now, cost);
        }
        // A new key starts full: check it on a fresh cell before making room for it, so
        // refused keys take no memory.
        let cell = AtomicU64::new(0);
        let new_tat = self.gcra.step(&cell, now, cost)?;
        if now >= shard.next_sweep || shard.cells.len() >= self.shard_cap {
            shard.sweep(now, self.sweep_every, &self.hasher);
        }
        if shard.cells.len() >= self.shard_cap {
            shard.evict_nearest_full(self.shard_cap - self.shard_cap / 8 - 1);
        }
        shard
            .cells
            .insert_unique(hash, (key.to_owned(), AtomicU64::new(new_tat)), |(k, _)| {
                self.hasher.hash_one(k)
            });
        Ok(new_tat)
    }
}

impl<K: Hash> Shard<K> {
    /// Drops the cells that are full again: they hold nothing an absent key does not.
    /// Gives memory back once the shard is mostly empty.
    fn sweep(&mut self, now: u64, every: u64, hasher: &RandomState) {
        self.cells.retain(|(_, tat)| *tat.get_mut() > now);
        self.next_sweep = now.saturating_add(every);
        if self.cells.capacity() > 4 * self.cells.len().max(16) {
            self.cells
                .shrink_to(self.cells.len(), |(k, _)| hasher.hash_one(k));
        }
    }

    /// Evicts the cells nearest to full until at most `keep` remain.
    fn evict_nearest_full(&mut self, keep: usize) {
        let excess = self.cells.len().saturating_sub(keep);
        if excess == 0 {
            return;
        }
        let mut tats: Vec<u64> = self
            .cells
            .iter_mut()
            .map(|(_, tat)| *tat.get_mut())
            .collect();
        let (_, &mut threshold, _) = tats.select_nth_unstable(excess - 1);
        self.cells.retain(|(_, tat)| *tat.get_mut() > threshold);
    }
}
