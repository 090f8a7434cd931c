//! In-process GCRA: a lock-free direct limiter and a sharded, bounded keyed limiter.

use std::borrow::Borrow;
use std::hash::Hash;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use headroom_core::{Clock, Stopwatch};

use super::table::{Table, default_shards};
use super::{Admitted, Quota, RateError, RateErrorKind, RateLimited, wait};

/// A quota in integer nanoseconds.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Gcra {
    quota: Quota,
    interval: u64,
    tolerance: u64,
}

impl Gcra {
    pub(crate) fn new(quota: Quota) -> Self {
        let interval = nanos(quota.emission_interval());
        Self {
            quota,
            interval,
            tolerance: interval.saturating_mul(u64::from(quota.burst())),
        }
    }

    /// One GCRA step from the theoretical arrival time `tat`: the new one when `cost` units
    /// are admitted at `now`, the nanoseconds to wait when not.
    #[inline]
    pub(crate) fn next(&self, tat: u64, now: u64, cost: u32) -> Result<u64, u64> {
        let new_tat = tat
            .max(now)
            .saturating_add(self.interval.saturating_mul(u64::from(cost)));
        let allow_at = new_tat.saturating_sub(self.tolerance);
        if allow_at > now {
            Err(allow_at - now)
        } else {
            Ok(new_tat)
        }
    }

    /// One GCRA step on `cell`: one compare-and-swap, retried only on contention.
    #[inline]
    fn step(&self, cell: &AtomicU64, now: u64, cost: u32) -> Result<u64, u64> {
        let mut tat = cell.load(Ordering::Relaxed);
        loop {
            let new_tat = self.next(tat, now, cost)?;
            match cell.compare_exchange_weak(tat, new_tat, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return Ok(new_tat),
                Err(actual) => tat = actual,
            }
        }
    }

    #[inline]
    pub(crate) fn limited(&self, wait: u64) -> RateLimited {
        RateLimited::new(self.quota, Duration::from_nanos(wait))
    }

    /// What is left of the quota at `now` once the theoretical arrival time is `new_tat`.
    pub(crate) fn admitted(&self, new_tat: u64, now: u64) -> Admitted {
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

pub(crate) fn nanos(duration: Duration) -> u64 {
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
    time: Stopwatch,
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
            gcra: Gcra::new(self.quota),
            time: self.clock.stopwatch(),
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
        let now = self.time.elapsed_nanos();
        match self.gcra.step(&self.tat, now, 1) {
            Ok(_) => Ok(()),
            Err(wait) => Err(self.gcra.limited(wait)),
        }
    }

    /// Spends `cost` units at once, or none. A cost above the burst is
    /// [`RateErrorKind::CostTooHigh`].
    pub fn check_n(&self, cost: u32) -> Result<Admitted, RateError> {
        let now = self.time.elapsed_nanos();
        self.gcra.check_n(&self.tat, now, cost)
    }

    /// Spends `cost` units, waiting for them if they will be available within `max_wait`;
    /// refuses at once, with the wait it would have needed, if they will not.
    ///
    /// Nothing is reserved while waiting: a caller that checks meanwhile may take the units,
    /// and the wait goes on within `max_wait`. Dropping the future gives up the wait.
    pub async fn acquire_n(&self, cost: u32, max_wait: Duration) -> Result<Admitted, RateError> {
        wait::acquire(self.time.clock(), max_wait, || {
            std::future::ready(self.check_n(cost))
        })
        .await
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
        KeyedLimiter {
            table: Table::new(self.max_keys, self.shards, self.idle_sweep),
            gcra: Gcra::new(self.quota),
            time: self.clock.stopwatch(),
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
/// The cap bounds bytes as well when keys have a fixed size (an address, an id, a `u64`): an
/// entry is the key and an 8-byte cell, and the hash tables keep at most 4× the entries' bytes.
/// Keys are held as given, as `governor` holds them, so a `String` key takes its whole
/// length: bound the length of keys taken from requests (a raw header) before checking
/// them, or use [`LocalRateLimiter`](super::LocalRateLimiter), which holds every key in
/// 48 bytes.
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
    table: Table<K, AtomicU64>,
    gcra: Gcra,
    time: Stopwatch,
}

impl KeyedLimiter<()> {
    /// A builder enforcing `quota` per key.
    pub fn builder(quota: Quota) -> KeyedLimiterBuilder {
        KeyedLimiterBuilder {
            quota,
            clock: Clock::system(),
            max_keys: 1_000_000,
            shards: default_shards(),
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
        let now = self.time.elapsed_nanos();
        match self
            .table
            .apply(key, now, |cell| self.gcra.step(cell, now, 1))
        {
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
        let now = self.time.elapsed_nanos();
        match self
            .table
            .apply(key, now, |cell| self.gcra.step(cell, now, cost))
        {
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
        wait::acquire(self.time.clock(), max_wait, || {
            std::future::ready(self.check_key_n(key, cost))
        })
        .await
    }

    /// The number of keys held.
    pub fn len(&self) -> usize {
        self.table.len()
    }

    /// Whether no key is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The most keys held at once.
    pub fn max_keys(&self) -> usize {
        self.table.max_keys()
    }

    /// Drops every key whose cell is full again (losing nothing) and returns how many
    /// keys remain.
    pub fn sweep(&self) -> usize {
        self.table.sweep(self.time.elapsed_nanos())
    }
}
