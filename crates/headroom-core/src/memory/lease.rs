use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::Mutex;

use crate::lease::{Begin, BeginId, Fenced, FencingToken, LeaseStore};
use crate::{BackendError, BackendErrorKind, Clock, Key};

/// What a record costs beyond its key, fingerprint and outcome bytes: map entry, expiry entry
/// and bookkeeping, rounded up.
const RECORD_OVERHEAD: usize = 128;

/// An in-memory [`LeaseStore`] for services that run one process.
///
/// Records live in a map behind one mutex per store (every step is a few map operations).
///
/// Memory is bounded by record count and by bytes (key, fingerprint and outcome, plus a fixed
/// overhead per record), in total and per scope, so one tenant cannot fill the store for all.
/// A key's scope is the first segment of its local part, as the [`LeaseStore`] contract
/// describes (the idempotency executor puts its tenant there). Expired records are dropped in
/// deadline order as keys begin, each in O(log n), never by a scan. When a new key would pass a
/// bound with every record still live, the store refuses it with
/// [`BackendErrorKind::Unavailable`] rather than forget a live record (which could let an
/// operation run twice).
///
/// The bounds are checked when a key begins. A completion is never refused, since that would
/// let the operation run again; so a scope can pass its byte bound by the outcomes of the
/// operations it has in flight.
#[derive(Clone, Debug)]
pub struct MemoryLeaseStore {
    inner: Arc<Inner>,
}

/// Builds a [`MemoryLeaseStore`].
#[derive(Debug)]
#[must_use]
pub struct MemoryLeaseStoreBuilder {
    clock: Clock,
    limits: Limits,
}

#[derive(Clone, Copy, Debug)]
struct Limits {
    max_records: usize,
    max_bytes: usize,
    max_records_per_scope: usize,
    max_bytes_per_scope: usize,
}

impl MemoryLeaseStoreBuilder {
    /// The clock for lease deadlines and retention (default: the system clock).
    pub fn clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    /// The most records held (default 1,000,000).
    pub fn max_records(mut self, max: usize) -> Self {
        self.limits.max_records = max.max(1);
        self
    }

    /// The most bytes held (default 256 MiB).
    pub fn max_bytes(mut self, max: usize) -> Self {
        self.limits.max_bytes = max.max(1);
        self
    }

    /// The most records one scope holds (default: no bound beyond `max_records`).
    pub fn max_records_per_scope(mut self, max: usize) -> Self {
        self.limits.max_records_per_scope = max.max(1);
        self
    }

    /// The most bytes one scope holds (default: no bound beyond `max_bytes`).
    pub fn max_bytes_per_scope(mut self, max: usize) -> Self {
        self.limits.max_bytes_per_scope = max.max(1);
        self
    }

    /// Builds the store.
    pub fn build(self) -> MemoryLeaseStore {
        MemoryLeaseStore {
            inner: Arc::new(Inner {
                state: Mutex::new(State::default()),
                last_token: AtomicU64::new(0),
                clock: self.clock,
                limits: self.limits,
            }),
        }
    }
}

#[derive(Debug)]
struct Inner {
    state: Mutex<State>,
    /// The last token issued. The next is greater, and at least the wall clock in µs, so
    /// tokens keep growing across restarts, as on Redis.
    last_token: AtomicU64,
    clock: Clock,
    limits: Limits,
}

#[derive(Debug, Default)]
struct State {
    records: HashMap<Key, Entry>,
    /// Deadlines in order, with the generation of the record they were pushed for; an entry
    /// whose record has moved on (extended, completed, removed) is skipped when popped.
    deadlines: BinaryHeap<Reverse<(Instant, u64, Key)>>,
    scopes: HashMap<Bytes, Usage>,
    total: Usage,
    next_generation: u64,
}

#[derive(Clone, Copy, Debug, Default)]
struct Usage {
    records: usize,
    bytes: usize,
}

#[derive(Debug)]
struct Entry {
    record: Record,
    generation: u64,
    bytes: usize,
}

#[derive(Debug)]
enum Record {
    InProgress {
        fingerprint: Bytes,
        token: FencingToken,
        /// The begin that took the lease, which may ask again.
        begun_by: BeginId,
        lease_until: Instant,
        /// When the record is dropped: the lease again past its end, at least a second, as on
        /// Redis, so that a holder that stalled past its lease while nobody took over can
        /// extend it and run on.
        kept_until: Instant,
    },
    Completed {
        fingerprint: Bytes,
        /// The holder that completed it, whose repeated completion is applied.
        token: FencingToken,
        outcome: Bytes,
        expires_at: Instant,
    },
}

impl Record {
    fn deadline(&self) -> Instant {
        match self {
            Self::InProgress { kept_until, .. } => *kept_until,
            Self::Completed { expires_at, .. } => *expires_at,
        }
    }

    fn bytes(&self, key: &Key) -> usize {
        let payload = match self {
            Self::InProgress { fingerprint, .. } => fingerprint.len(),
            Self::Completed {
                fingerprint,
                outcome,
                ..
            } => fingerprint.len() + outcome.len(),
        };
        RECORD_OVERHEAD + key.as_bytes().len() + payload
    }
}

/// When an in-progress record whose lease ends at `lease_until` is dropped.
fn kept_until(lease_until: Instant, lease: Duration) -> Instant {
    super::after(lease_until, lease.max(Duration::from_secs(1)))
}

/// The scope of `key`: the first segment of its local part (a length byte, then that many
/// bytes) after a leading `{hash tag}`, or the whole local part when it does not hold one.
fn scope_of(key: &Key) -> &[u8] {
    let local = key.local();
    let segments = match local.strip_prefix(b"{") {
        Some(tagged) => match tagged.iter().position(|&b| b == b'}') {
            Some(end) => &tagged[end + 1..],
            None => local,
        },
        None => local,
    };
    match segments.split_first() {
        Some((&len, rest)) if usize::from(len) <= rest.len() => &rest[..usize::from(len)],
        _ => local,
    }
}

impl State {
    /// Puts `record` under `key`, replacing any record there, and keeps the books.
    fn put(&mut self, key: &Key, record: Record) {
        self.remove(key);
        let generation = self.next_generation;
        self.next_generation += 1;
        let bytes = record.bytes(key);
        self.deadlines
            .push(Reverse((record.deadline(), generation, key.clone())));
        let scope = self
            .scopes
            .entry(Bytes::copy_from_slice(scope_of(key)))
            .or_default();
        scope.records += 1;
        scope.bytes += bytes;
        self.total.records += 1;
        self.total.bytes += bytes;
        self.records.insert(
            key.clone(),
            Entry {
                record,
                generation,
                bytes,
            },
        );
        // Skipped entries of extended or completed records pile up; rebuilding once they
        // outnumber the records costs O(1) amortized per push.
        if self.deadlines.len() > 2 * self.records.len() + 64 {
            let records = &self.records;
            self.deadlines.retain(|Reverse((_, generation, key))| {
                records
                    .get(key)
                    .is_some_and(|e| e.generation == *generation)
            });
        }
    }

    fn remove(&mut self, key: &Key) {
        let Some(entry) = self.records.remove(key) else {
            return;
        };
        self.total.records -= 1;
        self.total.bytes -= entry.bytes;
        let scope = scope_of(key);
        if let Some(usage) = self.scopes.get_mut(scope) {
            usage.records -= 1;
            usage.bytes -= entry.bytes;
            if usage.records == 0 {
                self.scopes.remove(scope);
            }
        }
    }

    /// Drops the records whose deadline passed, earliest first, stopping at the first live one.
    fn drop_expired(&mut self, now: Instant) {
        while let Some(Reverse((deadline, generation, _))) = self.deadlines.peek() {
            if *deadline > now {
                return;
            }
            let generation = *generation;
            let Some(Reverse((_, _, key))) = self.deadlines.pop() else {
                return;
            };
            if self
                .records
                .get(&key)
                .is_some_and(|e| e.generation == generation)
            {
                self.remove(&key);
            }
        }
    }

    /// Why a new record of `bytes` under `key` would pass a bound, if it would.
    fn refusal(&self, key: &Key, bytes: usize, limits: &Limits) -> Option<String> {
        let scope = self.scopes.get(scope_of(key)).copied().unwrap_or_default();
        if self.total.records >= limits.max_records {
            Some(format!(
                "the lease store holds its maximum of {} live records",
                limits.max_records
            ))
        } else if self.total.bytes + bytes > limits.max_bytes {
            Some(format!(
                "the lease store holds its maximum of {} bytes of live records",
                limits.max_bytes
            ))
        } else if scope.records >= limits.max_records_per_scope {
            Some(format!(
                "this scope holds its maximum of {} live records",
                limits.max_records_per_scope
            ))
        } else if scope.bytes + bytes > limits.max_bytes_per_scope {
            Some(format!(
                "this scope holds its maximum of {} bytes of live records",
                limits.max_bytes_per_scope
            ))
        } else {
            None
        }
    }
}

impl MemoryLeaseStore {
    /// A store on the system clock holding up to 1,000,000 records and 256 MiB.
    pub fn new() -> Self {
        Self::builder().build()
    }

    /// A store on `clock` holding up to `max_records` records (and the default byte bound).
    pub fn with_limits(clock: Clock, max_records: usize) -> Self {
        Self::builder()
            .clock(clock)
            .max_records(max_records)
            .build()
    }

    /// Starts building a store with bounds per scope or in bytes.
    pub fn builder() -> MemoryLeaseStoreBuilder {
        MemoryLeaseStoreBuilder {
            clock: Clock::system(),
            limits: Limits {
                max_records: 1_000_000,
                max_bytes: 256 * 1024 * 1024,
                max_records_per_scope: usize::MAX,
                max_bytes_per_scope: usize::MAX,
            },
        }
    }

    /// The number of records held, expired ones not yet dropped included.
    pub fn len(&self) -> usize {
        self.inner.state.lock().records.len()
    }

    /// The bytes the records held are counted for, expired ones not yet dropped included.
    pub fn bytes(&self) -> usize {
        self.inner.state.lock().total.bytes
    }

    /// Whether the store holds no record.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Runs `change` on the in-progress record of `key` if `token` holds it.
    fn with_holder(
        &self,
        key: &Key,
        token: FencingToken,
        change: impl FnOnce(&mut State, Instant, Bytes, BeginId),
    ) -> Fenced {
        self.with_in_progress(key, |current, _| current == token, change)
    }

    /// Runs `change` on the in-progress record of `key` if `holds` says so of its token and
    /// the begin that took it.
    fn with_in_progress(
        &self,
        key: &Key,
        holds: impl FnOnce(FencingToken, BeginId) -> bool,
        change: impl FnOnce(&mut State, Instant, Bytes, BeginId),
    ) -> Fenced {
        let now = self.inner.clock.now();
        let mut state = self.inner.state.lock();
        match state.records.get(key).map(|e| &e.record) {
            // Past the time it is kept, the record is as good as gone (on Redis, expired).
            Some(Record::InProgress {
                token,
                fingerprint,
                begun_by,
                kept_until,
                ..
            }) if *kept_until > now && holds(*token, *begun_by) => {
                let (fingerprint, begun_by) = (fingerprint.clone(), *begun_by);
                change(&mut state, now, fingerprint, begun_by);
                Fenced::Applied
            }
            _ => Fenced::Rejected,
        }
    }
}

impl Default for MemoryLeaseStore {
    fn default() -> Self {
        Self::new()
    }
}

impl LeaseStore for MemoryLeaseStore {
    async fn begin(
        &self,
        key: &Key,
        fingerprint: &[u8],
        lease: Duration,
        id: BeginId,
    ) -> Result<Begin, BackendError> {
        let now = self.inner.clock.now();
        let lease = crate::lasting(lease)?;
        let lease_until = super::after(now, lease);
        let mut state = self.inner.state.lock();
        let took_over = match state.records.get(key).map(|e| &e.record) {
            Some(Record::Completed {
                fingerprint,
                outcome,
                expires_at,
                ..
            }) if *expires_at > now => {
                return Ok(Begin::Completed {
                    fingerprint: fingerprint.clone(),
                    outcome: outcome.clone(),
                });
            }
            Some(Record::InProgress {
                fingerprint: held,
                token,
                begun_by,
                lease_until: until,
                ..
            }) if *until > now && *begun_by == id && held.as_ref() == fingerprint => {
                // Sent again by the begin that took it: its token.
                return Ok(Begin::Acquired {
                    token: *token,
                    took_over: false,
                });
            }
            Some(Record::InProgress {
                fingerprint: held,
                lease_until,
                kept_until,
                ..
            }) => {
                if *lease_until > now {
                    return Ok(Begin::InProgress {
                        fingerprint: held.clone(),
                        lease_remaining: *lease_until - now,
                    });
                }
                // The run under this lease may have taken effect: only its own request takes
                // it over, while the record is kept (past that, as on Redis, it is gone).
                if *kept_until > now && held.as_ref() != fingerprint {
                    return Ok(Begin::InProgress {
                        fingerprint: held.clone(),
                        lease_remaining: Duration::ZERO,
                    });
                }
                true
            }
            Some(Record::Completed { .. }) => false,
            None => {
                state.drop_expired(now);
                let bytes = RECORD_OVERHEAD + key.as_bytes().len() + fingerprint.len();
                if let Some(reason) = state.refusal(key, bytes, &self.inner.limits) {
                    return Err(BackendError::with_detail(
                        BackendErrorKind::Unavailable,
                        reason,
                    ));
                }
                false
            }
        };
        let now_us = self.inner.clock.unix_micros();
        let next = |last: u64| last.saturating_add(1).max(now_us);
        let last =
            self.inner
                .last_token
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |last| {
                    Some(next(last))
                });
        let token = FencingToken(next(last.unwrap_or_else(|last| last)));
        state.put(
            key,
            Record::InProgress {
                fingerprint: Bytes::copy_from_slice(fingerprint),
                token,
                begun_by: id,
                lease_until,
                kept_until: kept_until(lease_until, lease),
            },
        );
        Ok(Begin::Acquired { token, took_over })
    }

    async fn complete(
        &self,
        key: &Key,
        token: FencingToken,
        outcome: Bytes,
        retention: Duration,
    ) -> Result<Fenced, BackendError> {
        let retention = crate::lasting(retention)?;
        if let Some(Record::Completed { token: holder, .. }) =
            self.inner.state.lock().records.get(key).map(|e| &e.record)
            && *holder == token
        {
            // Repeated by its holder (the first answer lost): it stands.
            return Ok(Fenced::Applied);
        }
        Ok(self.with_holder(key, token, |state, now, fingerprint, _| {
            let completed = Record::Completed {
                fingerprint,
                token,
                outcome,
                expires_at: super::after(now, retention),
            };
            state.put(key, completed);
        }))
    }

    async fn extend(
        &self,
        key: &Key,
        token: FencingToken,
        lease: Duration,
    ) -> Result<Fenced, BackendError> {
        let lease = crate::lasting(lease)?;
        Ok(
            self.with_holder(key, token, |state, now, fingerprint, begun_by| {
                let lease_until = super::after(now, lease);
                let extended = Record::InProgress {
                    fingerprint,
                    token,
                    begun_by,
                    lease_until,
                    kept_until: kept_until(lease_until, lease),
                };
                state.put(key, extended);
            }),
        )
    }

    async fn release(&self, key: &Key, token: FencingToken) -> Result<Fenced, BackendError> {
        Ok(self.with_holder(key, token, |state, _, _, _| state.remove(key)))
    }

    async fn release_begun(&self, key: &Key, id: BeginId) -> Result<Fenced, BackendError> {
        let begun = |_, begun_by| begun_by == id;
        Ok(self.with_in_progress(key, begun, |state, _, _, _| state.remove(key)))
    }

    fn begin_completes_at_once(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ManualClock, Namespace};

    /// A lease key in `scope`, laid out as the contract says: a length byte, the scope, the rest.
    fn key(scope: &str, rest: &str) -> Key {
        let len = [u8::try_from(scope.len()).unwrap()];
        Namespace::new("leases")
            .unwrap()
            .key_from_parts(&[&len, scope.as_bytes(), rest.as_bytes()])
            .unwrap()
    }

    async fn begin(
        store: &MemoryLeaseStore,
        key: &Key,
        lease: Duration,
    ) -> Result<FencingToken, BackendError> {
        match store.begin(key, b"fp", lease, BeginId::random()).await? {
            Begin::Acquired { token, .. } => Ok(token),
            other => panic!("{other:?}"),
        }
    }

    /// Past the time its record is kept (the lease again, at least a second), a holder is
    /// fenced whether or not another key began meanwhile, as on Redis, where the key expired.
    #[tokio::test]
    async fn a_holder_is_fenced_once_its_record_is_no_longer_kept() {
        let time = ManualClock::new();
        let store = MemoryLeaseStore::builder().clock(time.clock()).build();
        let k = key("acme", "k");
        let token = begin(&store, &k, Duration::from_secs(1)).await.unwrap();
        time.advance(Duration::from_secs(3));
        assert_eq!(
            store
                .extend(&k, token, Duration::from_secs(1))
                .await
                .unwrap(),
            Fenced::Rejected
        );
        assert_eq!(
            store
                .complete(&k, token, Bytes::new(), Duration::from_secs(1))
                .await
                .unwrap(),
            Fenced::Rejected
        );
    }

    /// An expired lease stands for a run that may have taken effect: a begin with another
    /// fingerprint is answered the holder's and takes nothing while the record is kept, and
    /// one with the same fingerprint takes it over. Once the record is no longer kept (on
    /// Redis, it expired), the key is free for any request.
    #[tokio::test]
    async fn an_expired_lease_is_taken_over_only_with_its_fingerprint() {
        let time = ManualClock::new();
        let store = MemoryLeaseStore::builder().clock(time.clock()).build();
        let (k, lease) = (key("acme", "k"), Duration::from_secs(30));
        let Begin::Acquired { token: first, .. } = store
            .begin(&k, b"x", lease, BeginId::random())
            .await
            .unwrap()
        else {
            panic!("a fresh key is acquired");
        };
        time.advance(lease + Duration::from_secs(1));
        assert_eq!(
            store
                .begin(&k, b"y", lease, BeginId::random())
                .await
                .unwrap(),
            Begin::InProgress {
                fingerprint: Bytes::from_static(b"x"),
                lease_remaining: Duration::ZERO,
            }
        );
        let Begin::Acquired {
            token: second,
            took_over,
        } = store
            .begin(&k, b"x", lease, BeginId::random())
            .await
            .unwrap()
        else {
            panic!("the same request takes the expired lease over");
        };
        assert!(second > first && took_over);

        time.advance(3 * lease);
        assert!(matches!(
            store
                .begin(&k, b"y", lease, BeginId::random())
                .await
                .unwrap(),
            Begin::Acquired { .. }
        ));
    }

    /// Tokens keep growing across stores, as they do across restarts of a process (and on
    /// Redis): a token stored as a fence by an earlier process stays below every later one.
    #[tokio::test]
    async fn a_later_store_issues_greater_tokens_than_an_earlier_one() {
        let k = key("acme", "k");
        let earlier = MemoryLeaseStore::new();
        let first = begin(&earlier, &k, Duration::from_secs(30)).await.unwrap();
        let second = begin(&earlier, &key("acme", "k2"), Duration::from_secs(30))
            .await
            .unwrap();
        assert!(second > first);
        let later = MemoryLeaseStore::new();
        let third = begin(&later, &k, Duration::from_secs(30)).await.unwrap();
        assert!(third > second, "{third:?} after {second:?}");
    }

    #[tokio::test]
    async fn outcomes_are_bounded_by_bytes_not_only_by_record_count() {
        let store = MemoryLeaseStore::with_limits(ManualClock::new().clock(), 1_000_000);
        // One shared buffer: the store counts 1 MiB per outcome, the test holds 1 MiB.
        let outcome = Bytes::from(vec![7u8; 1024 * 1024]);
        let mut refused = None;
        for i in 0..1000 {
            let key = key("tenant", &format!("k{i}"));
            match begin(&store, &key, Duration::from_secs(30)).await {
                Ok(token) => {
                    let done = store
                        .complete(&key, token, outcome.clone(), Duration::from_secs(60))
                        .await
                        .unwrap();
                    assert_eq!(done, Fenced::Applied, "a completion is never refused");
                }
                Err(err) => {
                    assert_eq!(err.kind(), BackendErrorKind::Unavailable);
                    refused = Some(i);
                    break;
                }
            }
        }
        let refused = refused.expect("a thousand 1 MiB outcomes pass the default 256 MiB bound");
        assert!((250..=256).contains(&refused), "refused at {refused}");
    }

    #[tokio::test]
    async fn one_scope_at_its_bound_leaves_room_for_the_others() {
        let store = MemoryLeaseStore::builder()
            .clock(ManualClock::new().clock())
            .max_records(1000)
            .max_records_per_scope(10)
            .max_bytes_per_scope(64 * 1024)
            .build();
        for i in 0..10 {
            begin(
                &store,
                &key("mallory", &format!("k{i}")),
                Duration::from_secs(30),
            )
            .await
            .unwrap();
        }
        let err = begin(&store, &key("mallory", "k10"), Duration::from_secs(30))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), BackendErrorKind::Unavailable);
        begin(&store, &key("alice", "k0"), Duration::from_secs(30))
            .await
            .expect("another scope still begins");

        // Bytes per scope: one large outcome fills alice's share, bob is untouched.
        let big = key("alice", "k1");
        let token = begin(&store, &big, Duration::from_secs(30)).await.unwrap();
        let outcome = Bytes::from(vec![0u8; 64 * 1024]);
        let done = store
            .complete(&big, token, outcome, Duration::from_secs(60))
            .await
            .unwrap();
        assert_eq!(done, Fenced::Applied);
        let err = begin(&store, &key("alice", "k2"), Duration::from_secs(30))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), BackendErrorKind::Unavailable);
        begin(&store, &key("bob", "k0"), Duration::from_secs(30))
            .await
            .expect("another scope still begins");
    }

    #[tokio::test]
    async fn expired_records_make_room_and_their_bytes_are_returned() {
        let clock = ManualClock::new();
        let store = MemoryLeaseStore::builder()
            .clock(clock.clock())
            .max_records(3)
            .build();
        for i in 0..3 {
            let key = key("t", &format!("k{i}"));
            let token = begin(&store, &key, Duration::from_secs(30)).await.unwrap();
            // Extensions and completions leave skipped deadlines behind; they are not records.
            for _ in 0..100 {
                store
                    .extend(&key, token, Duration::from_secs(1))
                    .await
                    .unwrap();
            }
        }
        assert!(
            begin(&store, &key("t", "k3"), Duration::from_secs(30))
                .await
                .is_err()
        );
        clock.advance(Duration::from_secs(2));
        begin(&store, &key("t", "k3"), Duration::from_secs(30))
            .await
            .expect("expired leases make room");
        assert_eq!(store.len(), 1);
        assert_eq!(
            store.bytes(),
            RECORD_OVERHEAD + key("t", "k3").as_bytes().len() + 2
        );
        let state = store.inner.state.lock();
        assert!(state.deadlines.len() <= 2 * state.records.len() + 64);
    }
}
