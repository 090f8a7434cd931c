//! The lease store behind idempotency keys: one record per key, changed only by atomic
//! compare-and-set steps.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use crate::{BackendError, Key};

/// A fencing token: strictly increasing for one key, so a store can tell a current lease
/// holder from one whose lease expired and was taken over.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FencingToken(pub u64);

/// Names one [`LeaseStore::begin`] call, drawn at random for each, so that a caller whose
/// answer was lost (a timeout, a dropped connection) can release the lease that call may have
/// taken ([`LeaseStore::release_begun`]) rather than leave the key held by nobody for a whole
/// lease, and a begin sent twice (a client's retry after a dropped connection) is answered its
/// own token.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BeginId(pub u64);

impl BeginId {
    /// A new id, unpredictable and, for practical purposes, unique: a per-thread wyrand
    /// generator seeded from the standard library's random hasher keys.
    pub fn random() -> Self {
        use std::cell::Cell;
        use std::hash::{BuildHasher, RandomState};
        thread_local! {
            static STATE: Cell<u64> = Cell::new(RandomState::new().hash_one(0_u8));
        }
        STATE.with(|state| {
            let next = state.get().wrapping_add(0xa076_1d64_78bd_642f);
            state.set(next);
            let mixed = u128::from(next) * u128::from(next ^ 0xe703_7ed1_a0b4_28db);
            Self((mixed as u64) ^ ((mixed >> 64) as u64))
        })
    }
}

/// The answer to [`LeaseStore::begin`].
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Begin {
    /// The caller holds the lease and must run the operation.
    Acquired {
        /// The token to present to `complete`, `extend` and `release`.
        token: FencingToken,
        /// The previous holder's lease had expired and was taken over.
        took_over: bool,
    },
    /// Another holder's lease is live; or it ran out, but under another fingerprint
    /// (`lease_remaining` is then zero), so it is not this request's to take over.
    InProgress {
        /// The fingerprint the holder began with.
        fingerprint: Bytes,
        /// Time left on the holder's lease.
        lease_remaining: Duration,
    },
    /// The operation completed; its stored outcome is returned for replay.
    Completed {
        /// The fingerprint of the request that completed it.
        fingerprint: Bytes,
        /// The stored outcome, opaque bytes.
        outcome: Bytes,
    },
}

/// The answer to `complete`, `extend` and `release`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Fenced {
    /// The token was current and the change was made.
    Applied,
    /// The token is no longer current (the lease expired and another holder took over, or the
    /// record is gone); nothing was changed. A holder whose operation ran tells the two apart
    /// with a `begin` of its own fingerprint: only a record that is gone, or whose lease ran
    /// out, is acquired again.
    Rejected,
}

/// Stores idempotency records: in progress under a lease, or completed with an outcome.
///
/// # Contract
///
/// - Every method is one atomic step (one round trip and one Lua script on Redis): no
///   interleaving of two callers can make two of them hold a live lease on one key.
/// - `begin` on a missing key, or on a key whose lease expired and was taken with the same
///   `fingerprint`, creates an in-progress record with `fingerprint` and a lease of `lease`,
///   and returns a token greater than every token issued for that key before (the store keeps
///   the last token at least as long as the longest lease it issued, even after `release`).
///   An expired lease taken with another fingerprint stands for a run that may have taken
///   effect: `begin` answers [`Begin::InProgress`] with that fingerprint and no time left, and
///   changes nothing, for as long as the store keeps the record.
/// - `begin` with the `id` (and fingerprint) of the begin that created a live in-progress
///   record answers [`Begin::Acquired`] with that record's token again, not taken over, and
///   leaves its lease as it is: a begin sent twice takes one lease.
/// - `release_begun` removes the in-progress record the begin named `id` created, if it is
///   still that begin's (not completed, released nor taken over), and never takes a key. On a
///   store whose `begin` can be overtaken (not [`begin_completes_at_once`](Self::begin_completes_at_once)),
///   a begin named `id` that reaches the store after it (a copy a client library sent again,
///   or one held on a slow connection) takes nothing and fails as a
///   [`Command`](crate::BackendErrorKind::Command), unless the record was completed. Such a
///   store may bound what it remembers (Redis: the last eight ids of a key, for a minute).
/// - `complete` stores `outcome` with a retention of `retention` only if `token` is the current
///   one and the record is in progress; a stale token is [`Fenced::Rejected`] and changes nothing.
/// - `extend` moves the lease deadline to `now + lease` for the current token only.
/// - `release` removes an in-progress record held by `token`, so a retry runs again.
/// - Lease deadlines use the store's clock (Redis server time), never the caller's.
/// - Keys of one record live in one Redis Cluster slot.
/// - A key's **scope** (the tenant a bounded store shares memory by) is the first segment of
///   its local part, after a leading `{hash tag}` if it has one: one length byte, then that
///   many bytes. A store may refuse a new key with
///   [`BackendErrorKind::Unavailable`](crate::BackendErrorKind::Unavailable) when its scope holds
///   its share, but never refuses `complete`.
pub trait LeaseStore: Send + Sync + fmt::Debug + 'static {
    /// Begins the operation for `key`, or reports who holds it or what it returned; `id` names
    /// this call (see [`BeginId`]).
    fn begin(
        &self,
        key: &Key,
        fingerprint: &[u8],
        lease: Duration,
        id: BeginId,
    ) -> impl Future<Output = Result<Begin, BackendError>> + Send;

    /// Stores the outcome for the holder of `token`. Repeated by the holder that completed
    /// the record (its first answer lost), it is applied again and changes nothing.
    fn complete(
        &self,
        key: &Key,
        token: FencingToken,
        outcome: Bytes,
        retention: Duration,
    ) -> impl Future<Output = Result<Fenced, BackendError>> + Send;

    /// Extends the lease of the holder of `token`.
    fn extend(
        &self,
        key: &Key,
        token: FencingToken,
        lease: Duration,
    ) -> impl Future<Output = Result<Fenced, BackendError>> + Send;

    /// Releases the lease of the holder of `token` without storing an outcome.
    fn release(
        &self,
        key: &Key,
        token: FencingToken,
    ) -> impl Future<Output = Result<Fenced, BackendError>> + Send;

    /// Releases the lease the begin named `id` took, whose answer (and so whose token) its
    /// caller never had; [`Fenced::Rejected`] when that begin holds nothing (it never ran, or
    /// its record was completed, released or taken over since).
    fn release_begun(
        &self,
        key: &Key,
        id: BeginId,
    ) -> impl Future<Output = Result<Fenced, BackendError>> + Send;

    /// Whether `begin` always completes the first time it is polled (an in-process store).
    /// Otherwise (the default) a caller dropped while `begin` is in flight hands it to a task
    /// that releases the lease it may have taken, which costs an allocation per `begin`.
    fn begin_completes_at_once(&self) -> bool {
        false
    }
}

/// Release tasks alive at once in this process; past it, such a lease simply runs out, as it
/// would without a task.
const MAX_RELEASE_TASKS: usize = 1024;

static RELEASE_TASKS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Releases a lease in a spawned task, so that a key is not left held by nobody until its
/// lease runs out: calls `release` again while the store fails (each call bounded by what is
/// left, pausing 50 ms to 1 s with jitter) for at most `lease`, after which the lease has run
/// out anyway. Two uses: the lease a `begin` may have taken though its caller never learned it
/// (its answer timed out, its connection dropped, its caller went away), with that begin's
/// [`LeaseStore::release_begun`], where a begin that never ran leaves nothing to release; and a
/// [`LeaseStore::release`] the store failed. Without a runtime, or with 1,024 such tasks alive,
/// the lease runs out instead.
pub fn release_in_background<F, Fut>(release: F, lease: Duration, clock: &crate::Clock)
where
    F: Fn() -> Fut + Send + 'static,
    Fut: Future<Output = Result<Fenced, BackendError>> + Send,
{
    use std::sync::atomic::Ordering;
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    if RELEASE_TASKS
        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
            (n < MAX_RELEASE_TASKS).then_some(n + 1)
        })
        .is_err()
    {
        return;
    }
    /// Counts the task out however it ends: done, or dropped with its runtime.
    struct Counted;
    impl Drop for Counted {
        fn drop(&mut self) {
            RELEASE_TASKS.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        }
    }
    let counted = Counted;
    let clock = clock.clone();
    runtime.spawn(async move {
        let _counted = counted;
        let until = clock.now() + lease;
        let mut pause = Duration::from_millis(50);
        loop {
            let left = until.saturating_duration_since(clock.now());
            if left.is_zero() {
                break;
            }
            // An answer ends it, and so does the lease running out while the store hangs.
            let mut ask = std::pin::pin!(release());
            let mut out = std::pin::pin!(clock.sleep(left));
            let answered = std::future::poll_fn(|cx| match ask.as_mut().poll(cx) {
                std::task::Poll::Ready(answer) => std::task::Poll::Ready(answer.is_ok()),
                std::task::Poll::Pending => out.as_mut().poll(cx).map(|()| true),
            })
            .await;
            if answered {
                break;
            }
            let jitter = (BeginId::random().0 >> 11) as f64 / (1_u64 << 53) as f64;
            let jittered = pause / 2 + pause.mul_f64(jitter / 2.0);
            clock.sleep(jittered.min(left)).await;
            pause = (pause * 2).min(Duration::from_secs(1));
        }
    });
}

/// Whether a call that failed with `error` may still have been applied by the store: its
/// answer, not necessarily the call, was lost.
pub fn may_have_applied(error: &BackendError) -> bool {
    matches!(
        error.kind(),
        crate::BackendErrorKind::Timeout | crate::BackendErrorKind::Connection
    )
}

type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Object-safe mirror of [`LeaseStore`], implemented for every store.
trait ErasedLeaseStore: Send + Sync + fmt::Debug + 'static {
    fn begin<'a>(
        &'a self,
        key: &'a Key,
        fingerprint: &'a [u8],
        lease: Duration,
        id: BeginId,
    ) -> BoxFuture<'a, Result<Begin, BackendError>>;
    fn complete<'a>(
        &'a self,
        key: &'a Key,
        token: FencingToken,
        outcome: Bytes,
        retention: Duration,
    ) -> BoxFuture<'a, Result<Fenced, BackendError>>;
    fn extend<'a>(
        &'a self,
        key: &'a Key,
        token: FencingToken,
        lease: Duration,
    ) -> BoxFuture<'a, Result<Fenced, BackendError>>;
    fn release<'a>(
        &'a self,
        key: &'a Key,
        token: FencingToken,
    ) -> BoxFuture<'a, Result<Fenced, BackendError>>;
    fn release_begun<'a>(
        &'a self,
        key: &'a Key,
        id: BeginId,
    ) -> BoxFuture<'a, Result<Fenced, BackendError>>;
    fn begin_completes_at_once(&self) -> bool;
}

impl<S: LeaseStore> ErasedLeaseStore for S {
    fn begin<'a>(
        &'a self,
        key: &'a Key,
        fingerprint: &'a [u8],
        lease: Duration,
        id: BeginId,
    ) -> BoxFuture<'a, Result<Begin, BackendError>> {
        Box::pin(LeaseStore::begin(self, key, fingerprint, lease, id))
    }
    fn complete<'a>(
        &'a self,
        key: &'a Key,
        token: FencingToken,
        outcome: Bytes,
        retention: Duration,
    ) -> BoxFuture<'a, Result<Fenced, BackendError>> {
        Box::pin(LeaseStore::complete(self, key, token, outcome, retention))
    }
    fn extend<'a>(
        &'a self,
        key: &'a Key,
        token: FencingToken,
        lease: Duration,
    ) -> BoxFuture<'a, Result<Fenced, BackendError>> {
        Box::pin(LeaseStore::extend(self, key, token, lease))
    }
    fn release<'a>(
        &'a self,
        key: &'a Key,
        token: FencingToken,
    ) -> BoxFuture<'a, Result<Fenced, BackendError>> {
        Box::pin(LeaseStore::release(self, key, token))
    }
    fn release_begun<'a>(
        &'a self,
        key: &'a Key,
        id: BeginId,
    ) -> BoxFuture<'a, Result<Fenced, BackendError>> {
        Box::pin(LeaseStore::release_begun(self, key, id))
    }
    fn begin_completes_at_once(&self) -> bool {
        LeaseStore::begin_completes_at_once(self)
    }
}

/// A [`LeaseStore`] chosen at run time (memory or Redis), behind one cheap-to-clone type.
///
/// Each call boxes its future; use the concrete store type where that matters.
#[derive(Clone, Debug)]
pub struct DynLeaseStore(Arc<dyn ErasedLeaseStore>);

impl DynLeaseStore {
    /// Erases the type of `store`.
    pub fn new(store: impl LeaseStore) -> Self {
        Self(Arc::new(store))
    }
}

impl LeaseStore for DynLeaseStore {
    async fn begin(
        &self,
        key: &Key,
        fingerprint: &[u8],
        lease: Duration,
        id: BeginId,
    ) -> Result<Begin, BackendError> {
        self.0.begin(key, fingerprint, lease, id).await
    }
    async fn complete(
        &self,
        key: &Key,
        token: FencingToken,
        outcome: Bytes,
        retention: Duration,
    ) -> Result<Fenced, BackendError> {
        self.0.complete(key, token, outcome, retention).await
    }
    async fn extend(
        &self,
        key: &Key,
        token: FencingToken,
        lease: Duration,
    ) -> Result<Fenced, BackendError> {
        self.0.extend(key, token, lease).await
    }
    async fn release(&self, key: &Key, token: FencingToken) -> Result<Fenced, BackendError> {
        self.0.release(key, token).await
    }
    async fn release_begun(&self, key: &Key, id: BeginId) -> Result<Fenced, BackendError> {
        self.0.release_begun(key, id).await
    }
    fn begin_completes_at_once(&self) -> bool {
        self.0.begin_completes_at_once()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use super::*;

    /// The tests below count the process's release tasks: one at a time.
    static COUNTING: std::sync::Mutex<()> = std::sync::Mutex::new(());

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap()
    }

    /// A release task dropped unfinished with its runtime is counted out, so tasks lost that
    /// way never use up the bound.
    #[test]
    fn a_release_task_dropped_with_its_runtime_is_counted_out() {
        let _one_at_a_time = COUNTING.lock().unwrap_or_else(|e| e.into_inner());
        let runtime = runtime();
        runtime.block_on(async {
            let hangs = || std::future::pending::<Result<Fenced, BackendError>>();
            release_in_background(hangs, Duration::from_secs(60), &crate::Clock::system());
            assert_eq!(RELEASE_TASKS.load(Ordering::Relaxed), 1);
            tokio::task::yield_now().await;
        });
        drop(runtime);
        assert_eq!(RELEASE_TASKS.load(Ordering::Relaxed), 0);
    }

    /// Lost begins whose store hangs keep at most 1,024 release tasks alive; a begin lost
    /// past that starts none (its lease runs out instead), and one lost once tasks ended
    /// starts one again.
    #[test]
    fn at_most_1024_release_tasks_are_alive_at_once() {
        let _one_at_a_time = COUNTING.lock().unwrap_or_else(|e| e.into_inner());
        let hangs = || std::future::pending::<Result<Fenced, BackendError>>();
        let clock = crate::Clock::system();
        let first = runtime();
        first.block_on(async {
            let started = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
            for _ in 0..MAX_RELEASE_TASKS {
                let started = std::sync::Arc::clone(&started);
                let counted = move || {
                    started.fetch_add(1, Ordering::Relaxed);
                    std::future::pending::<Result<Fenced, BackendError>>()
                };
                release_in_background(counted, Duration::from_secs(60), &clock);
            }
            let asked = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            let flag = std::sync::Arc::clone(&asked);
            let one_more = move || {
                flag.store(true, Ordering::Relaxed);
                std::future::pending::<Result<Fenced, BackendError>>()
            };
            release_in_background(one_more, Duration::from_secs(60), &clock);
            // Tasks first run in the order they were spawned: once one spawned last has run,
            // so has every task before it, the one past the bound included had it been spawned.
            let (ran, last) = tokio::sync::oneshot::channel();
            tokio::spawn(async move { ran.send(()).unwrap() });
            last.await.unwrap();
            assert_eq!(started.load(Ordering::Relaxed), MAX_RELEASE_TASKS);
            assert_eq!(RELEASE_TASKS.load(Ordering::Relaxed), MAX_RELEASE_TASKS);
            assert!(!asked.load(Ordering::Relaxed), "a task past the bound ran");
        });
        drop(first);
        assert_eq!(RELEASE_TASKS.load(Ordering::Relaxed), 0);
        runtime().block_on(async {
            release_in_background(hangs, Duration::from_secs(60), &clock);
            assert_eq!(RELEASE_TASKS.load(Ordering::Relaxed), 1);
        });
        assert_eq!(RELEASE_TASKS.load(Ordering::Relaxed), 0);
    }
}
