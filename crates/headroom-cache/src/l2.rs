//! The cache's side of L2: every call bounded by a timeout, guarded by a breaker, and never
//! failing the caller. Writes a user made (insert, remove) that did not reach L2 are remembered
//! as pending deletes: until a tombstone for the key reaches L2, this instance never reads the
//! key's (outdated) L2 copy. A load's write-back that fails is not remembered: L2 then holds
//! nothing older than what the load read. A key that cannot be remembered (the backlog is
//! full) makes all of L2 untrusted for the longest lifetime of an entry, after which any copy
//! it could have missed has expired.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use headroom_core::kv::{DynKvStore, KvEntry, KvStore};
use headroom_core::{BackendError, BackendErrorKind, Classify, Clock, Key, Namespace};
use parking_lot::Mutex;

use headroom_breaker::{CircuitBreaker, State};

use crate::hides::{self, Hide};
use crate::invalidation::KeyPublisher;

use crate::cache::millis;
use crate::envelope::{self, Times};
use crate::metrics::Metrics;
use crate::{CacheConfig, ConfigError};

/// Keys deleted per round trip while clearing pending deletes.
const DRAIN_BATCH: usize = 100;
/// The first wait before a failed pending delete is retried; each failure doubles it.
const DRAIN_RETRY_FIRST: Duration = Duration::from_millis(50);
/// The longest wait between retries of pending deletes.
const DRAIN_RETRY_MAX: Duration = Duration::from_secs(1);

pub(crate) struct L2 {
    store: DynKvStore,
    pub(crate) namespace: Namespace,
    /// Where hides are kept (see `hides`).
    hides: Namespace,
    timeout: Duration,
    clock: Clock,
    breaker: CircuitBreaker<()>,
    cooldown: Duration,
    metrics: Arc<Metrics>,
    /// Keys whose L2 copy may be outdated: only an entry at least as new in L2 settles one.
    pending: Mutex<Pending>,
    pending_len: AtomicUsize,
    max_pending: usize,
    generation: AtomicU64,
    draining: AtomicBool,
    /// The longest an entry written by this cache lives in L2, in nanoseconds (raised when
    /// its TTLs grow at run time, never lowered).
    max_lifetime: AtomicU64,
    origin: Instant,
    /// Nanoseconds after `origin` until which L2 reads are skipped; zero when trusted.
    untrusted_until: AtomicU64,
    deletes_announced_to: OnceLock<KeyPublisher>,
    /// The codec and schema tombstones are written with.
    codec: u8,
    schema: u32,
    loader_hard_timeout: Option<Duration>,
}

impl L2 {
    pub(crate) fn new(
        store: DynKvStore,
        namespace: Namespace,
        config: &CacheConfig,
        codec: u8,
        clock: Clock,
        metrics: Arc<Metrics>,
    ) -> Result<Self, ConfigError> {
        let failure_threshold = config.l2_failure_threshold;
        let cooldown = config.l2_cooldown;
        let breaker = CircuitBreaker::builder()
            .name(format!("cache-l2:{namespace}"))
            .clock(clock.clone())
            .open_after_failures_in_a_row(failure_threshold, cooldown)
            .build()
            .map_err(|_| ConfigError::new("invalid L2 breaker settings"))?;
        let hides = Namespace::new(&format!("{namespace}{}", hides::BESIDE)).map_err(|_| {
            ConfigError::new("the l2 namespace is too long to keep hides beside it")
        })?;
        Ok(Self {
            hides,
            max_lifetime: AtomicU64::new(
                u64::try_from(config.max_entry_lifetime().as_nanos()).unwrap_or(u64::MAX),
            ),
            origin: clock.now(),
            untrusted_until: AtomicU64::new(0),
            deletes_announced_to: OnceLock::new(),
            codec,
            schema: config.schema_version,
            loader_hard_timeout: config.loader_hard_timeout,
            store,
            namespace,
            timeout: config.l2_timeout,
            breaker,
            cooldown,
            clock,
            metrics,
            pending: Mutex::new(Pending::default()),
            pending_len: AtomicUsize::new(0),
            max_pending: config.l2_max_pending_deletes,
            generation: AtomicU64::new(0),
            draining: AtomicBool::new(false),
        })
    }

    /// The L2 entry that records the removal of `key` at `at_unix_us`: a tombstone, read as
    /// absent, which no value loaded before the removal replaces (see `set_if_newer`). It
    /// lives as long as such a load may still write: the loader's hard timeout plus the L2
    /// timeout (without a hard timeout, an entry's whole lifetime).
    pub(crate) fn tombstone(&self, key: Key, at_unix_us: u64) -> KvEntry {
        let ttl = self
            .loader_hard_timeout
            .unwrap_or_else(|| self.max_lifetime())
            .saturating_add(self.timeout)
            .clamp(Duration::from_millis(1), headroom_core::MAX_DURATION);
        let mut times = Times::at(at_unix_us);
        times.expires = times.created.saturating_add(millis(ttl));
        let mut bytes = Vec::with_capacity(40);
        envelope::write_tombstone(&mut bytes, self.codec, times, self.schema);
        KvEntry {
            key,
            value: Bytes::from(bytes),
            ttl,
        }
    }

    /// Runs one L2 call under the breaker and the timeout; `None` when L2 was not reached.
    async fn call<T>(
        &self,
        op: &'static str,
        call: impl Future<Output = Result<T, BackendError>>,
    ) -> Option<T> {
        let Ok(permit) = self.breaker.try_acquire() else {
            self.metrics.l2_skipped.increment(1);
            return None;
        };
        let was_closed = self.breaker.state() == State::Closed;
        // A dropped call drops its permit: a cancelled call, which frees a probe slot.
        // The call first: one that is ready at once never arms the timer.
        let result = tokio::select! {
            biased;
            result = call => result,
            () = self.clock.sleep(self.timeout) => Err(BackendError::new(BackendErrorKind::Timeout)),
        };
        match result {
            Ok(value) => {
                permit.success();
                if !was_closed && self.breaker.state() == State::Closed {
                    self.metrics.breaker_open.set(0.0);
                    tracing::info!(namespace = %self.namespace, "L2 answers again; calls resume");
                }
                Some(value)
            }
            Err(error) => {
                if error.is_timeout() {
                    self.metrics.l2_timeouts.increment(1);
                } else {
                    self.metrics.l2_errors.increment(1);
                }
                tracing::debug!(namespace = %self.namespace, op, %error, "L2 call failed");
                // A refused value or configuration, or foreign data in a key, says nothing
                // about L2's health.
                let health = !matches!(
                    error.kind(),
                    BackendErrorKind::TooLarge
                        | BackendErrorKind::Config
                        | BackendErrorKind::Corrupt
                );
                if !health {
                    permit.ignore();
                    return None;
                }
                permit.failure();
                if was_closed && self.breaker.state() == State::Open {
                    self.metrics.breaker_open.set(1.0);
                    tracing::warn!(
                        namespace = %self.namespace,
                        cooldown = ?self.cooldown,
                        "L2 keeps failing; calls paused",
                    );
                }
                None
            }
        }
    }

    fn readable(&self, key: &Key) -> bool {
        let untrusted_until = self.untrusted_until.load(Ordering::Acquire);
        if untrusted_until != 0 && self.since_origin() < untrusted_until {
            return false;
        }
        self.pending_len.load(Ordering::Acquire) == 0 || !self.pending.lock().keys.contains_key(key)
    }

    /// Whether every key is [`readable`](Self::readable): L2 is trusted and no delete is
    /// pending.
    fn all_readable(&self) -> bool {
        let untrusted_until = self.untrusted_until.load(Ordering::Acquire);
        (untrusted_until == 0 || self.since_origin() >= untrusted_until)
            && self.pending_len.load(Ordering::Acquire) == 0
    }

    fn since_origin(&self) -> u64 {
        let elapsed = self.clock.now().saturating_duration_since(self.origin);
        u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX)
    }

    /// Reads one key; `None` when L2 was not reached or must not be trusted for this key.
    pub(crate) async fn get(&self, key: &Key) -> Option<Option<Bytes>> {
        if !self.readable(key) {
            self.metrics.l2_skipped.increment(1);
            return None;
        }
        self.call("get", self.get_one(key)).await
    }

    /// Reads one key. Bytes the store itself calls corrupt (on Redis, a key of another type:
    /// another program's hash) are a miss counted as corrupt, and a success for the breaker:
    /// L2 answered.
    async fn get_one(&self, key: &Key) -> Result<Option<Bytes>, BackendError> {
        match self.store.get(key).await {
            Err(error) if error.kind() == BackendErrorKind::Corrupt => {
                self.metrics.l2_corrupt.increment(1);
                tracing::warn!(
                    namespace = %self.namespace,
                    ?key,
                    %error,
                    "unreadable L2 key; read as a miss until a write replaces it",
                );
                Ok(None)
            }
            read => read,
        }
    }

    /// Reads many keys in one round trip; keys that must not be trusted read as `None`.
    pub(crate) async fn get_many(&self, keys: &[Key]) -> Option<Vec<Option<Bytes>>> {
        // Mostly all of L2 is trusted: then no key needs a look of its own.
        if !keys.is_empty() && self.all_readable() {
            return self.call("get_many", self.store.get_many(keys)).await;
        }
        let trusted: Vec<bool> = keys.iter().map(|key| self.readable(key)).collect();
        if !trusted.iter().any(|t| *t) {
            self.metrics.l2_skipped.increment(1);
            return None;
        }
        let mut values = self.call("get_many", self.store.get_many(keys)).await?;
        for (value, trusted) in values.iter_mut().zip(trusted) {
            if !trusted {
                *value = None;
            }
        }
        Some(values)
    }

    /// Writes a user's entries (values or tombstones); keys that were not written become
    /// pending deletes, also when the caller is dropped before the write completes.
    ///
    /// Each entry is written only over an older one (by created time to the microsecond, its version), like a
    /// load: when two instances write one key, the later write stays in L2 even if the earlier
    /// one lands last (a slow connection, a redirect during a slot migration).
    ///
    /// Returns how many entries were written (the others met newer ones), or `None` when L2
    /// could not be reached.
    pub(crate) async fn set_many(self: &Arc<Self>, entries: &[KvEntry]) -> Option<u64> {
        if entries.is_empty() {
            return Some(0);
        }
        let mut unsure = Unsure {
            l2: self,
            entries: Some(entries),
        };
        let written = self
            .call(
                "set_if_newer",
                self.store.set_if_newer(entries, envelope::VERSION_AT),
            )
            .await;
        let entries = unsure.entries.take().into_iter().flatten();
        if written.is_some() {
            self.settled(entries);
        } else {
            self.outdated(entries.map(|entry| (&entry.key, version(entry))));
        }
        written
    }

    /// Writes loaded entries. Unlike a user's write, one that fails leaves nothing to track:
    /// whatever L2 holds then is either the value loaded or what a user wrote.
    ///
    /// Each entry is written only over an older one (by created time to the microsecond, its version): a value
    /// loaded before a write or removal made elsewhere never replaces it.
    pub(crate) async fn set_loaded(&self, entries: &[KvEntry]) {
        if entries.is_empty() {
            return;
        }
        self.call(
            "set_if_newer",
            self.store.set_if_newer(entries, envelope::VERSION_AT),
        )
        .await;
    }

    /// The L2 key of a hide; `None` for a tag too long to be part of a key.
    pub(crate) fn hide_key(&self, hide: &Hide) -> Option<Key> {
        hides::key(&self.hides, hide)
    }

    /// Reads hides by their keys; `None` when L2 was not reached.
    pub(crate) async fn read_hides(&self, keys: &[Key]) -> Option<Vec<Option<Bytes>>> {
        self.call("get_many", self.store.get_many(keys)).await
    }

    /// Keeps hides, each made at its Unix millisecond (unless a later one is kept); whether
    /// L2 was reached.
    pub(crate) async fn keep_hides(&self, hides: impl Iterator<Item = (Key, u64)>) -> bool {
        let lifetime = self.max_lifetime();
        let entries: Vec<KvEntry> = hides
            .map(|(key, at)| hides::entry(key, at, lifetime))
            .collect();
        self.call(
            "set_if_newer",
            self.store.set_if_newer(&entries, hides::VERSION_AT),
        )
        .await
        .is_some()
    }

    /// Replaces foreign bytes found where a hide is kept by a hide made at `at_unix_ms`. They
    /// are deleted first, and only while they are still there: bytes that read as a time
    /// later than any hide's would refuse every hide written over them.
    pub(crate) async fn replace_foreign_hide(&self, key: Key, found: &[u8], at_unix_ms: u64) {
        self.metrics.l2_corrupt.increment(1);
        tracing::warn!(namespace = %self.namespace, ?key, "undecodable hide in L2; replacing it");
        self.call("delete_if_eq", self.store.delete_if_eq(&key, found))
            .await;
        self.keep_hides(std::iter::once((key, at_unix_ms))).await;
    }

    /// Deletes a key whose bytes could not be decoded, without making the reader wait; only
    /// while it still holds those bytes, so a value written meanwhile (the load that follows
    /// the miss, say) stays. A delete that fails is not retried: the bytes expire with their TTL.
    pub(crate) fn discard(self: &Arc<Self>, key: Key, bytes: &[u8]) {
        self.metrics.l2_corrupt.increment(1);
        tracing::warn!(namespace = %self.namespace, ?key, "undecodable L2 value; deleting it");
        let (l2, bytes) = (Arc::clone(self), bytes.to_vec());
        tokio::spawn(async move {
            l2.call("delete_if_eq", l2.store.delete_if_eq(&key, &bytes))
                .await
        });
    }

    /// `entries` are in L2, or something newer is: their keys' L2 copies are current again,
    /// unless a write that missed L2 was newer still.
    fn settled<'k>(&self, entries: impl Iterator<Item = &'k KvEntry>) {
        if self.pending_len.load(Ordering::Acquire) == 0 {
            return;
        }
        let mut pending = self.pending.lock();
        for entry in entries {
            if pending
                .keys
                .get(&entry.key)
                .is_some_and(|held| held.missed <= version(entry))
            {
                pending.remove(&entry.key);
            }
        }
        self.pending_changed(pending.keys.len());
    }

    /// Sends the keys of every delete the drain makes to the other instances: one of them may
    /// have read the outdated copy back from L2 after it heard of the write.
    pub(crate) fn announce_deletes_to(&self, publisher: KeyPublisher) {
        let _ = self.deletes_announced_to.set(publisher);
    }

    /// The longest an entry written by this cache lives in L2.
    pub(crate) fn max_lifetime(&self) -> Duration {
        Duration::from_nanos(self.max_lifetime.load(Ordering::Relaxed))
    }

    /// Entries written from now on may live `lifetime` in L2.
    pub(crate) fn outlive(&self, lifetime: Duration) {
        let nanos = u64::try_from(lifetime.as_nanos()).unwrap_or(u64::MAX);
        self.max_lifetime.fetch_max(nanos, Ordering::Relaxed);
    }

    /// The keys' L2 copies may be outdated: remember them and make sure a drain runs.
    pub(crate) fn outdated<'k>(self: &Arc<Self>, keys: impl Iterator<Item = (&'k Key, Version)>) {
        self.remember_outdated(keys, Origin::Here);
    }

    /// Another instance's write of the keys missed L2: remember them as far as there is room.
    /// Past it, a key is served as by an instance that missed the message (its writer deletes
    /// the copy and announces it): the backlog bounds this instance's own writes, whatever
    /// the whole fleet wrote meanwhile.
    pub(crate) fn outdated_elsewhere<'k>(
        self: &Arc<Self>,
        keys: impl Iterator<Item = (&'k Key, Version)>,
    ) {
        self.remember_outdated(keys, Origin::Elsewhere);
    }

    fn remember_outdated<'k>(
        self: &Arc<Self>,
        keys: impl Iterator<Item = (&'k Key, Version)>,
        origin: Origin,
    ) {
        let generation = self.generation.fetch_add(1, Ordering::AcqRel);
        {
            let mut pending = self.pending.lock();
            for (key, missed) in keys {
                let held = pending.keys.get(key).copied();
                let elsewhere = origin == Origin::Elsewhere;
                // Each origin has its own room: keys heard from the fleet never crowd out
                // this instance's own.
                let fits = match held {
                    Some(held) => !held.elsewhere || elsewhere || pending.here() < self.max_pending,
                    None if elsewhere => pending.elsewhere < self.max_pending,
                    None => pending.here() < self.max_pending,
                };
                if !fits {
                    if elsewhere {
                        self.metrics.l2_pending_untracked.increment(1);
                        continue;
                    }
                    // This key's outdated copy cannot be tracked: distrust all of L2 until any
                    // copy written before now has expired.
                    let lifetime = self.max_lifetime.load(Ordering::Relaxed);
                    let until = self.since_origin().saturating_add(lifetime).max(1);
                    self.untrusted_until.fetch_max(until, Ordering::AcqRel);
                    tracing::warn!(
                        namespace = %self.namespace,
                        for_ = ?Duration::from_nanos(lifetime),
                        "too many pending L2 deletes; L2 reads paused",
                    );
                    break;
                }
                pending.insert(
                    key.clone(),
                    Held {
                        generation,
                        missed: held.map_or(missed, |held| missed.max(held.missed)),
                        // A key this instance wrote stays its own to track.
                        elsewhere: elsewhere && held.is_none_or(|held| held.elsewhere),
                    },
                );
            }
            self.pending_changed(pending.keys.len());
        }
        if !self.draining.swap(true, Ordering::AcqRel) {
            match tokio::runtime::Handle::try_current() {
                Ok(runtime) => drop(runtime.spawn(drain(Draining {
                    l2: Arc::downgrade(self),
                    ended: false,
                }))),
                // No runtime (a write dropped while it shuts down): the next failure retries.
                Err(_) => self.draining.store(false, Ordering::Release),
            }
        }
    }

    fn pending_changed(&self, len: usize) {
        self.pending_len.store(len, Ordering::Release);
        self.metrics.l2_pending_deletes.set(len as f64);
    }

    pub(crate) fn pending_deletes(&self) -> usize {
        self.pending_len.load(Ordering::Acquire)
    }
}

/// The pending deletes, each origin's counted against its own room.
#[derive(Default)]
struct Pending {
    keys: HashMap<Key, Held>,
    /// How many of the keys were heard from other instances.
    elsewhere: usize,
}

/// A pending delete: the generation of the write that failed and its version.
#[derive(Clone, Copy)]
struct Held {
    generation: u64,
    missed: Version,
    /// Heard from another instance, not written here.
    elsewhere: bool,
}

impl Pending {
    /// How many of the keys were written here.
    fn here(&self) -> usize {
        self.keys.len() - self.elsewhere
    }

    fn insert(&mut self, key: Key, held: Held) {
        if self.keys.insert(key, held).is_some_and(|old| old.elsewhere) {
            self.elsewhere -= 1;
        }
        if held.elsewhere {
            self.elsewhere += 1;
        }
    }

    fn remove(&mut self, key: &Key) {
        if self.keys.remove(key).is_some_and(|old| old.elsewhere) {
            self.elsewhere -= 1;
        }
    }
}

/// Where the write that missed L2 was made.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Origin {
    Here,
    Elsewhere,
}

/// Entries of a write in progress: if the write is dropped before it ends, L2 may or may not
/// hold the new state, so their keys become pending deletes.
struct Unsure<'a> {
    l2: &'a Arc<L2>,
    entries: Option<&'a [KvEntry]>,
}

impl Drop for Unsure<'_> {
    fn drop(&mut self) {
        if let Some(entries) = self.entries.take() {
            self.l2
                .outdated(entries.iter().map(|entry| (&entry.key, version(entry))));
        }
    }
}

/// A drain task, from its spawn: one dropped before its end (its runtime shut down, even before
/// it first ran) lets the next write that misses L2 start another.
struct Draining {
    l2: Weak<L2>,
    /// Ended by finding nothing left, having cleared the flag itself.
    ended: bool,
}

impl Drop for Draining {
    fn drop(&mut self) {
        if !self.ended
            && let Some(l2) = self.l2.upgrade()
        {
            l2.draining.store(false, Ordering::Release);
        }
    }
}

/// Writes a tombstone over each pending key's L2 copy, until none is left. While a key is pending, another instance
/// that missed its message may be reading the outdated copy, so a failed delete is retried
/// soon: from `DRAIN_RETRY_FIRST`, doubling up to `DRAIN_RETRY_MAX` (or the cool-down if
/// shorter), rather than a whole cool-down after each failure. Retries go through the breaker:
/// while it is open they do not reach L2, and the first once it lets calls through lands the
/// deletes.
async fn drain(mut running: Draining) {
    let mut retry = DRAIN_RETRY_FIRST;
    loop {
        let Some(this) = running.l2.upgrade() else {
            return;
        };
        let batch: Vec<(Key, u64)> = this
            .pending
            .lock()
            .keys
            .iter()
            .take(DRAIN_BATCH)
            .map(|(key, held)| (key.clone(), held.generation))
            .collect();
        if batch.is_empty() {
            this.draining.store(false, Ordering::Release);
            // A key added between the snapshot and the flag reset needs a drain: keep this one.
            if this.pending_len.load(Ordering::Acquire) == 0
                || this.draining.swap(true, Ordering::AcqRel)
            {
                running.ended = true;
                return;
            }
            continue;
        }
        // A tombstone rather than a delete: a delete would also erase a newer tombstone (a
        // removal made since, elsewhere), after which a value loaded before that removal
        // could be written back. A newer entry keeps its place.
        let at = this.clock.unix_micros();
        let tombstones: Vec<KvEntry> = batch
            .iter()
            .map(|(key, _)| this.tombstone(key.clone(), at))
            .collect();
        if this
            .call(
                "tombstone",
                this.store.set_if_newer(&tombstones, envelope::VERSION_AT),
            )
            .await
            .is_some()
        {
            retry = DRAIN_RETRY_FIRST;
            let mut pending = this.pending.lock();
            for (key, generation) in &batch {
                // A write that failed after this batch was taken keeps its key pending.
                if pending
                    .keys
                    .get(key)
                    .is_some_and(|held| held.generation == *generation)
                {
                    pending.remove(key);
                }
            }
            this.pending_changed(pending.keys.len());
            drop(pending);
            if let Some(publisher) = this.deletes_announced_to.get() {
                publisher.publish_keys(batch.iter().map(|(key, _)| key.local()));
            }
        } else {
            let clock = this.clock.clone();
            let wait = retry.min(this.cooldown);
            retry = retry.saturating_mul(2).min(DRAIN_RETRY_MAX);
            drop(this);
            clock.sleep(wait).await;
        }
    }
}

/// An entry's version in L2 (see [`envelope::VERSION_AT`]): its created-at millisecond, then
/// the microseconds within it; the oldest for bytes without one.
pub(crate) type Version = (u64, u16);

fn version(entry: &KvEntry) -> Version {
    headroom_core::kv::version_of(&entry.value, envelope::VERSION_AT).unwrap_or((0, 0))
}
