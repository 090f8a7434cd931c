use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use headroom_core::lease::{
    Begin, BeginId, Fenced, FencingToken, LeaseStore, may_have_applied, release_in_background,
};
use headroom_core::metrics::Counter;
use headroom_core::{BackendError, BackendErrorKind, Clock, Key, Namespace};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::watch;
use tracing::Instrument;
use xxhash_rust::xxh3::xxh3_128;

use crate::{
    IdempotencyConfig, IdempotencyError, IdempotencyKey, InProgressPolicy, Scope, StoreFailure,
};

/// The first byte of every stored outcome: the encoding's version.
const FORMAT_V1: u8 = 1;
/// The outcome stored for an operation that ran but whose outcome could not be stored: the
/// key stays taken and later requests get [`IdempotencyError::NotReplayable`].
const NOT_REPLAYABLE: u8 = 0xFF;
/// The longest pause between two looks at a running duplicate.
const MAX_POLL: Duration = Duration::from_millis(200);
/// Attempts to store an outcome before giving up on a failing store.
const COMPLETE_ATTEMPTS: usize = 3;
/// The pause before the second attempt to store an outcome; it doubles before each next one.
const COMPLETE_BACKOFF: Duration = Duration::from_millis(50);

/// An outcome, and whether it was replayed from the store rather than produced now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Executed<T> {
    /// The operation's outcome.
    pub value: T,
    /// `true` when a previous request produced it and this one replayed it.
    pub replayed: bool,
}

/// An outcome recorded when the operation took effect, encoded (`None`: it failed to
/// serialize), and whether a retry gets it whole.
type Effect = (Option<Bytes>, bool);

/// The lease an operation runs under, handed to it by
/// [`Idempotency::execute_leased`]: its fencing token, and whether the lease is still held.
///
/// Pass the token to the writes the operation makes (a conditional update, a version column)
/// so a store of your own can refuse a holder whose lease was taken over. Once the executor
/// learns the lease is lost (its extension refused, or the store unreachable until the lease
/// ran out), it stops the operation by dropping its future; work the operation spawned
/// elsewhere can watch [`lost`](Self::lost) to stop too.
#[derive(Clone, Debug)]
pub struct Lease {
    token: FencingToken,
    held: watch::Receiver<bool>,
    /// The encoded outcome kept should the operation end early after taking effect, and
    /// whether a retry gets it whole.
    took_effect: Arc<Mutex<Option<Effect>>>,
}

impl Lease {
    /// The fencing token: greater than that of every earlier holder of this key. It stays
    /// the same for the whole run.
    ///
    /// An operation that runs without a record (the store down and
    /// [`StoreFailure::FailOpen`]) gets `FencingToken(0)`, which no store issued: it is below
    /// every holder's, so it fences nothing out, and a write compared with it (`fence <
    /// $token`) never passes. Tell such a run by [`is_held`](Self::is_held), `false` from the
    /// start (the HTTP layer leaves the token out of the request then).
    pub fn token(&self) -> FencingToken {
        self.token
    }

    /// Whether the lease is held, as far as the executor knows: `false` once an extension was
    /// refused, once the lease ran out without one, and once the operation has ended. Without
    /// a record (the store down and [`StoreFailure::FailOpen`]) it is never held.
    pub fn is_held(&self) -> bool {
        *self.held.borrow() && self.held.has_changed().is_ok()
    }

    /// Completes when the lease is no longer held (see [`is_held`](Self::is_held)).
    pub async fn lost(&self) {
        let mut held = self.held.clone();
        // An error means the executor is gone, and the lease with it.
        let _ = held.wait_for(|held| !*held).await;
    }

    /// Records that the operation has taken effect, and the outcome to keep should it not
    /// finish: from here on, if its future is dropped (its caller went away, or its lease was
    /// lost) or it panics, the key keeps `outcome` instead of being released, so that a retry replays it rather than
    /// running the operation again. `outcome` is of the type the operation returns; one that
    /// cannot be stored keeps the key as not replayable. A later call replaces it; an error
    /// the operation returns still releases the key.
    ///
    /// For an operation that does more after its effect: the HTTP layer calls it once the
    /// handler has answered, before reading the response body.
    pub fn took_effect<T: Serialize>(&self, outcome: &T) {
        self.took_effect_as(outcome, true);
    }

    /// [`took_effect`](Self::took_effect) with an outcome a retry does not get whole (a
    /// response without its body), counted as not replayable once kept.
    pub(crate) fn took_effect_as<T: Serialize>(&self, outcome: &T, whole: bool) {
        // The effect first, with no outcome to keep: a `Serialize` that panics still leaves
        // the key kept (as not replayable), not released for a retry to run again.
        self.keep(None, whole);
        self.keep(encode(outcome), whole);
    }

    fn keep(&self, encoded: Option<Bytes>, whole: bool) {
        *self
            .took_effect
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some((encoded, whole));
    }

    fn new(token: FencingToken, held: watch::Receiver<bool>) -> Self {
        Self {
            token,
            held,
            took_effect: Arc::default(),
        }
    }

    /// The outcome recorded by [`took_effect`](Self::took_effect), if any.
    fn kept(&self) -> Option<Effect> {
        self.took_effect
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
    }

    /// The lease of an operation that runs without a record.
    fn none() -> Self {
        let (_, held) = watch::channel(false);
        Self::new(FencingToken(0), held)
    }
}

/// The configuration was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid idempotency configuration: {0}")]
pub struct InvalidConfig(&'static str);

/// Runs operations at most once per (scope, key) while their record lives, and replays their
/// outcome to every later request with the same key.
///
/// 1. The first request takes a lease on its key and runs the operation. While it runs, the
///    lease is extended every third of its length; if the holder dies, the lease expires and a
///    later request takes over with a greater fencing token. A holder that learns its lease
///    was lost stops the operation (drops its future) and gets [`IdempotencyError::LeaseLost`];
///    [`execute_leased`](Self::execute_leased) hands the operation its token and lease state.
/// 2. Its outcome is stored for the retention period; later requests with the same key and
///    fingerprint replay it without running anything, and a different fingerprint is
///    [`IdempotencyError::KeyReused`].
/// 3. A duplicate that arrives while the operation runs waits for the outcome or is told
///    [`IdempotencyError::InProgress`], as [`InProgressPolicy`] says.
/// 4. An error, an outcome the policy does not store, a panic or a cancelled (dropped) call
///    releases the key, so a retry runs again; except once the operation has run (or said it
///    [took effect](Lease::took_effect)): a call dropped or panicking after that keeps its
///    outcome, stored by a task, and a retry replays it. So an operation that may panic after
///    its effect calls `took_effect` before the risky part, or a retry runs it again.
/// 5. An outcome that cannot be stored (over `max_outcome_len`, or failing to serialize) goes
///    back to its caller, but the key stays taken: later requests get
///    [`IdempotencyError::NotReplayable`] and the operation never runs again.
/// 6. A holder whose lease was taken over cannot store its outcome: it gets
///    [`IdempotencyError::Fenced`] and the new holder's outcome stands. A holder whose record
///    the store lost (a restart without it, a flush, an expiry) while nobody took the key over
///    takes it again, with a `begin` of its own fingerprint, and runs on or stores its outcome.
/// 7. A lease that ran out is taken over only by a request with the same fingerprint (its
///    retry); another request with the key gets [`IdempotencyError::KeyReused`], since the
///    first run may have taken effect.
///
/// ```
/// # tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap().block_on(async {
/// use headroom_core::memory::MemoryLeaseStore;
/// use headroom_idempotency::{Idempotency, IdempotencyKey, Scope};
///
/// let idempotency = Idempotency::builder(MemoryLeaseStore::new()).build()?;
/// let scope = Scope::new("customer-42", "create-payment")?;
/// let key = IdempotencyKey::new("8e03978e-40d5-43e8-bc93-6894a57f9324")?;
///
/// let first = idempotency
///     .execute(&scope, &key, b"amount=100", || async { Ok::<_, std::io::Error>(String::from("pay_1")) })
///     .await?;
/// let retry = idempotency
///     .execute(&scope, &key, b"amount=100", || async { Ok::<_, std::io::Error>(String::from("pay_2")) })
///     .await?;
/// assert_eq!(retry.value, "pay_1");
/// assert!(retry.replayed && !first.replayed);
/// # Ok::<_, Box<dyn std::error::Error>>(())
/// # }).unwrap();
/// ```
#[derive(Debug)]
pub struct Idempotency<S> {
    inner: Arc<Inner<S>>,
}

impl<S> Clone for Idempotency<S> {
    fn clone(&self) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
        }
    }
}

#[derive(Debug)]
struct Inner<S> {
    store: S,
    config: IdempotencyConfig,
    clock: Clock,
    namespace: Namespace,
    metrics: Metrics,
}

/// The `outcome` of an `idempotency.execute` span.
fn outcome<T, E>(result: &Result<Executed<T>, IdempotencyError<E>>) -> &'static str {
    match result {
        Ok(executed) if executed.replayed => "replayed",
        Ok(_) => "executed",
        Err(IdempotencyError::InvalidKey(_)) => "invalid_key",
        Err(IdempotencyError::KeyReused) => "key_reused",
        Err(IdempotencyError::InProgress { .. }) => "in_progress",
        Err(IdempotencyError::Unavailable(_)) => "unavailable",
        Err(IdempotencyError::NotReplayable) => "not_replayable",
        Err(IdempotencyError::Corrupt) => "corrupt",
        Err(IdempotencyError::Fenced) => "fenced",
        Err(IdempotencyError::LeaseLost) => "lease_lost",
        Err(IdempotencyError::Operation(_)) => "operation_error",
    }
}

/// The executor's counters, registered when it is built.
#[derive(Debug)]
struct Metrics {
    executions: Counter,
    fenced: Counter,
    in_progress: Counter,
    key_reused: Counter,
    leases_lost: Counter,
    not_replayable: Counter,
    released: Counter,
    replays: Counter,
    store_errors: Counter,
    takeovers: Counter,
}

impl Metrics {
    fn new() -> Self {
        Self {
            executions: headroom_core::counter!("headroom_idempotency_executions_total"),
            fenced: headroom_core::counter!("headroom_idempotency_fenced_total"),
            in_progress: headroom_core::counter!("headroom_idempotency_in_progress_total"),
            key_reused: headroom_core::counter!("headroom_idempotency_key_reused_total"),
            leases_lost: headroom_core::counter!("headroom_idempotency_leases_lost_total"),
            not_replayable: headroom_core::counter!("headroom_idempotency_not_replayable_total"),
            released: headroom_core::counter!("headroom_idempotency_released_total"),
            replays: headroom_core::counter!("headroom_idempotency_replays_total"),
            store_errors: headroom_core::counter!("headroom_idempotency_store_errors_total"),
            takeovers: headroom_core::counter!("headroom_idempotency_takeovers_total"),
        }
    }
}

/// Builds an [`Idempotency`] executor.
#[derive(Debug)]
#[must_use]
pub struct IdempotencyBuilder<S> {
    store: S,
    config: IdempotencyConfig,
    clock: Clock,
    namespace: Option<Namespace>,
}

impl<S: LeaseStore> IdempotencyBuilder<S> {
    /// Replaces the whole configuration.
    pub fn config(mut self, config: IdempotencyConfig) -> Self {
        self.config = config;
        self
    }

    /// How long a running operation holds its key (default 30 s).
    pub fn lease(mut self, lease: Duration) -> Self {
        self.config.lease = lease;
        self
    }

    /// How long outcomes are kept for replay (default 24 h).
    pub fn retention(mut self, retention: Duration) -> Self {
        self.config.retention = retention;
        self
    }

    /// What duplicates do while the first request runs (default: wait up to 5 s).
    pub fn in_progress(mut self, policy: InProgressPolicy) -> Self {
        self.config.in_progress = policy;
        self
    }

    /// What happens when the store is down (default: fail closed).
    pub fn store_failure(mut self, policy: StoreFailure) -> Self {
        self.config.store_failure = policy;
        self
    }

    /// The largest encoded outcome stored, in bytes (default 1 MiB).
    pub fn max_outcome_len(mut self, max: usize) -> Self {
        self.config.max_outcome_len = max;
        self
    }

    /// The clock for lease extension and waiting (default: the system clock). Lease deadlines
    /// themselves are kept by the store's clock.
    pub fn clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    /// The namespace of the records in the store (default `headroom:idempotency`).
    pub fn namespace(mut self, namespace: Namespace) -> Self {
        self.namespace = Some(namespace);
        self
    }

    /// Builds the executor.
    pub fn build(self) -> Result<Idempotency<S>, InvalidConfig> {
        self.config.validate().map_err(InvalidConfig)?;
        let namespace = match self.namespace {
            Some(namespace) => namespace,
            None => Namespace::new("headroom:idempotency")
                .map_err(|_| InvalidConfig("default namespace"))?,
        };
        Ok(Idempotency {
            inner: Arc::new(Inner {
                store: self.store,
                config: self.config,
                clock: self.clock,
                namespace,
                metrics: Metrics::new(),
            }),
        })
    }
}

impl<S: LeaseStore> Idempotency<S> {
    /// Starts building an executor over `store`.
    pub fn builder(store: S) -> IdempotencyBuilder<S> {
        IdempotencyBuilder {
            store,
            config: IdempotencyConfig::default(),
            clock: Clock::system(),
            namespace: None,
        }
    }

    /// The configuration in force.
    pub fn config(&self) -> &IdempotencyConfig {
        &self.inner.config
    }

    /// Runs `operation` at most once for (`scope`, `key`) and stores every successful outcome.
    ///
    /// `fingerprint` identifies the request (its method, path and body, say): a later request
    /// with the same key and another fingerprint is refused with
    /// [`IdempotencyError::KeyReused`]. Only its 128-bit XXH3 hash is stored: a fast,
    /// stable hash, not a cryptographic one, which is enough because records are scoped per
    /// tenant (a crafted collision could only replay the crafter's own earlier response).
    ///
    /// An error from `operation` releases the key so a retry runs again; to store chosen
    /// errors (a declined card, a validation failure), return them inside `T`.
    pub async fn execute<T, E, F, Fut>(
        &self,
        scope: &Scope,
        key: &IdempotencyKey,
        fingerprint: &[u8],
        operation: F,
    ) -> Result<Executed<T>, IdempotencyError<E>>
    where
        T: Serialize + DeserializeOwned,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        self.execute_with_policy(scope, key, fingerprint, |_: &T| true, operation)
            .await
    }

    /// Like [`execute`](Self::execute), but stores an outcome only when `store_if` says so;
    /// other outcomes are returned and release the key (for transient results such as an
    /// HTTP 503 produced without an error).
    pub async fn execute_with_policy<T, E, F, Fut, P>(
        &self,
        scope: &Scope,
        key: &IdempotencyKey,
        fingerprint: &[u8],
        store_if: P,
        operation: F,
    ) -> Result<Executed<T>, IdempotencyError<E>>
    where
        T: Serialize + DeserializeOwned,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, E>>,
        P: FnOnce(&T) -> bool,
    {
        self.execute_leased_with_policy(scope, key, fingerprint, store_if, |_| operation())
            .await
    }

    /// Like [`execute`](Self::execute), but hands the operation its [`Lease`]: the fencing
    /// token for its own writes, and a way to see that the lease is still held.
    ///
    /// ```
    /// # tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap().block_on(async {
    /// use headroom_core::memory::MemoryLeaseStore;
    /// use headroom_idempotency::{Idempotency, IdempotencyKey, Scope};
    ///
    /// let idempotency = Idempotency::builder(MemoryLeaseStore::new()).build()?;
    /// let scope = Scope::new("customer-42", "create-payment")?;
    /// let key = IdempotencyKey::new("8e03978e-40d5-43e8-bc93-6894a57f9324")?;
    /// let out = idempotency
    ///     .execute_leased(&scope, &key, b"amount=100", |lease| async move {
    ///         // e.g. UPDATE payments SET .., fence = $token WHERE id = $id AND fence < $token
    ///         let fence = lease.token().0;
    ///         Ok::<_, std::io::Error>(format!("pay_1 written under fence {fence}"))
    ///     })
    ///     .await?;
    /// assert!(!out.replayed);
    /// # Ok::<_, Box<dyn std::error::Error>>(())
    /// # }).unwrap();
    /// ```
    pub async fn execute_leased<T, E, F, Fut>(
        &self,
        scope: &Scope,
        key: &IdempotencyKey,
        fingerprint: &[u8],
        operation: F,
    ) -> Result<Executed<T>, IdempotencyError<E>>
    where
        T: Serialize + DeserializeOwned,
        F: FnOnce(Lease) -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        self.execute_leased_with_policy(scope, key, fingerprint, |_: &T| true, operation)
            .await
    }

    /// [`execute_leased`](Self::execute_leased) with the storing policy of
    /// [`execute_with_policy`](Self::execute_with_policy).
    pub async fn execute_leased_with_policy<T, E, F, Fut, P>(
        &self,
        scope: &Scope,
        key: &IdempotencyKey,
        fingerprint: &[u8],
        store_if: P,
        operation: F,
    ) -> Result<Executed<T>, IdempotencyError<E>>
    where
        T: Serialize + DeserializeOwned,
        F: FnOnce(Lease) -> Fut,
        Fut: Future<Output = Result<T, E>>,
        P: FnOnce(&T) -> bool,
    {
        let keeping = move |value: &T| {
            if store_if(value) {
                Keeping::Whole
            } else {
                Keeping::Not
            }
        };
        self.execute_keeping(scope, key, fingerprint, keeping, operation)
            .await
    }

    /// [`execute_leased_with_policy`](Self::execute_leased_with_policy) whose policy also
    /// says whether a retry gets the value whole.
    pub(crate) async fn execute_keeping<T, E, F, Fut, P>(
        &self,
        scope: &Scope,
        key: &IdempotencyKey,
        fingerprint: &[u8],
        store_if: P,
        operation: F,
    ) -> Result<Executed<T>, IdempotencyError<E>>
    where
        T: Serialize + DeserializeOwned,
        F: FnOnce(Lease) -> Fut,
        Fut: Future<Output = Result<T, E>>,
        P: FnOnce(&T) -> Keeping,
    {
        if !tracing::enabled!(tracing::Level::DEBUG) {
            // Without a span the execution's future is not wrapped, so not moved.
            return self
                .execute_untraced(scope, key, fingerprint, store_if, operation)
                .await;
        }
        let span = tracing::debug_span!(
            "idempotency.execute",
            name = %scope.operation(),
            outcome = tracing::field::Empty
        );
        let result = self
            .execute_untraced(scope, key, fingerprint, store_if, operation)
            .instrument(span.clone())
            .await;
        span.record("outcome", outcome(&result));
        result
    }

    async fn execute_untraced<T, E, F, Fut, P>(
        &self,
        scope: &Scope,
        key: &IdempotencyKey,
        fingerprint: &[u8],
        store_if: P,
        operation: F,
    ) -> Result<Executed<T>, IdempotencyError<E>>
    where
        T: Serialize + DeserializeOwned,
        F: FnOnce(Lease) -> Fut,
        Fut: Future<Output = Result<T, E>>,
        P: FnOnce(&T) -> Keeping,
    {
        let inner = &self.inner;
        let record = scope.record_key(&inner.namespace, key);
        let fingerprint = xxh3_128(fingerprint).to_be_bytes();
        let wait_until = match inner.config.in_progress {
            InProgressPolicy::Wait { max_wait } => Some(inner.clock.now() + max_wait),
            InProgressPolicy::Reject => None,
        };
        let mut poll = Duration::from_millis(5);
        // Whether the store said another request holds the key: failing open is then no
        // longer an option, since the operation would run beside that request.
        let mut held_elsewhere = false;
        loop {
            let asked_at = inner.clock.now();
            let begin = if inner.store.begin_completes_at_once() {
                let id = BeginId::random();
                inner
                    .store
                    .begin(&record, &fingerprint, inner.config.lease, id)
                    .await
            } else {
                self.begin_handed_over_on_drop(&record, fingerprint).await
            };
            let begin = match begin {
                Ok(begin) => begin,
                // The store answered, about a record it did not write: no outage, so neither
                // running without a record nor failing closed until it expires.
                Err(err) if err.kind() == BackendErrorKind::Corrupt => {
                    tracing::error!(record = ?record, error = %err, "the idempotency record is corrupt");
                    return Err(IdempotencyError::Corrupt);
                }
                Err(err) if !held_elsewhere => return self.store_down(err, operation).await,
                // Waiting on that request: a failed poll is one more wait, while the wait lasts.
                Err(err) => {
                    inner.metrics.store_errors.increment(1);
                    let now = inner.clock.now();
                    match wait_until {
                        Some(deadline) if now < deadline => {
                            inner.clock.sleep(poll.min(deadline - now)).await;
                            poll = (poll * 2).min(MAX_POLL);
                            continue;
                        }
                        _ => return Err(IdempotencyError::Unavailable(err)),
                    }
                }
            };
            match begin {
                Begin::Acquired { token, took_over } => {
                    self.inner.metrics.executions.increment(1);
                    if took_over {
                        self.inner.metrics.takeovers.increment(1);
                        tracing::info!(record = ?record, "idempotency lease taken over from an expired holder");
                    }
                    let held_until = asked_at + inner.config.lease;
                    let holding = Holding::new(token, fingerprint);
                    return self
                        .run(record, holding, held_until, store_if, operation)
                        .await;
                }
                Begin::Completed {
                    fingerprint: stored,
                    ..
                }
                | Begin::InProgress {
                    fingerprint: stored,
                    ..
                } if stored.as_ref() != fingerprint.as_slice() => {
                    self.inner.metrics.key_reused.increment(1);
                    return Err(IdempotencyError::KeyReused);
                }
                Begin::Completed { outcome, .. } => {
                    if outcome.as_ref() == [NOT_REPLAYABLE] {
                        return Err(IdempotencyError::NotReplayable);
                    }
                    let value = decode(&outcome).ok_or(IdempotencyError::Corrupt)?;
                    self.inner.metrics.replays.increment(1);
                    return Ok(Executed {
                        value,
                        replayed: true,
                    });
                }
                Begin::InProgress {
                    lease_remaining, ..
                } => {
                    held_elsewhere = true;
                    let now = inner.clock.now();
                    match wait_until {
                        Some(deadline) if now < deadline => {
                            inner
                                .clock
                                .sleep(poll.min(lease_remaining).min(deadline - now))
                                .await;
                            poll = (poll * 2).min(MAX_POLL);
                        }
                        _ => {
                            self.inner.metrics.in_progress.increment(1);
                            return Err(IdempotencyError::InProgress {
                                retry_after: lease_remaining.min(Duration::from_secs(1)),
                            });
                        }
                    }
                }
                _ => return Err(IdempotencyError::Corrupt),
            }
        }
    }

    /// `begin` on a store that answers over the wire: if this call is dropped while the answer
    /// is on its way, a task takes the answer over and releases a lease it took, so the key is
    /// not held for a whole lease by nobody. An answer lost on the way (a timeout, a dropped
    /// connection) is asked for again by a task, which releases the lease it names.
    async fn begin_handed_over_on_drop(
        &self,
        record: &Key,
        fingerprint: [u8; 16],
    ) -> Result<Begin, BackendError> {
        let inner = Arc::clone(&self.inner);
        let record = record.clone();
        let begin: PendingBegin<S> = Box::pin(async move {
            let (id, lease) = (BeginId::random(), inner.config.lease);
            let begin = inner.store.begin(&record, &fingerprint, lease, id).await;
            if let Err(error) = &begin
                && may_have_applied(error)
            {
                let (store, record) = (Arc::clone(&inner), record.clone());
                let release = move || {
                    let (store, record) = (Arc::clone(&store), record.clone());
                    async move { store.store.release_begun(&record, id).await }
                };
                release_in_background(release, lease, &inner.clock);
            }
            (Idempotency { inner }, record, begin)
        });
        let mut handover = HandOver(Some(begin));
        let (_, _, begin) = std::future::poll_fn(|cx| match handover.0.as_mut() {
            Some(begin) => begin.as_mut().poll(cx),
            None => std::task::Poll::Pending,
        })
        .await;
        handover.0 = None;
        begin
    }

    async fn store_down<T, E, F, Fut>(
        &self,
        err: BackendError,
        operation: F,
    ) -> Result<Executed<T>, IdempotencyError<E>>
    where
        F: FnOnce(Lease) -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        self.inner.metrics.store_errors.increment(1);
        match self.inner.config.store_failure {
            StoreFailure::FailClosed => {
                tracing::warn!(error = %err, "idempotency store unavailable; failing closed");
                Err(IdempotencyError::Unavailable(err))
            }
            StoreFailure::FailOpen => {
                tracing::warn!(error = %err, "idempotency store unavailable; running without a record");
                let value = operation(Lease::none())
                    .await
                    .map_err(IdempotencyError::Operation)?;
                Ok(Executed {
                    value,
                    replayed: false,
                })
            }
        }
    }

    async fn run<T, E, F, Fut, P>(
        &self,
        record: Key,
        holding: Holding,
        held_until: Instant,
        store_if: P,
        operation: F,
    ) -> Result<Executed<T>, IdempotencyError<E>>
    where
        T: Serialize,
        F: FnOnce(Lease) -> Fut,
        Fut: Future<Output = Result<T, E>>,
        P: FnOnce(&T) -> Keeping,
    {
        // Until the operation has run, a panic or a drop releases the key.
        let mut guard = EndGuard {
            executor: self,
            record: &record,
            holding: &holding,
            then: OnEnd::Release,
            lease: None,
        };
        let (held, lease) = watch::channel(true);
        // The operation keeps the token it began with, even should the key be taken again
        // under a newer one: that one is never another holder's.
        let lease = Lease::new(holding.token(), lease);
        guard.lease = Some(lease.clone());
        let outcome = {
            let operation = operation(lease);
            tokio::pin!(operation);
            // Both are polled together, so a slow extension never stalls the operation.
            let keep = self.keep_lease(&record, &holding, held_until);
            tokio::pin!(keep);
            tokio::select! {
                biased;
                outcome = &mut operation => Some(outcome),
                () = &mut keep => None,
            }
            // The operation's future is dropped here when the lease was lost.
        };
        held.send_replace(false);
        // The outcome the operation recorded when it took effect, if it did.
        let took_effect = guard.lease.take().and_then(|lease| lease.kept());
        let Some(outcome) = outcome else {
            self.inner.metrics.leases_lost.increment(1);
            tracing::warn!(record = ?record, "idempotency lease lost while the operation ran; the operation was stopped");
            match took_effect {
                // It took effect: its outcome is kept (fenced if another holder took over).
                Some((encoded, whole)) => {
                    let kept = self.storable(encoded, whole);
                    guard.then = OnEnd::Keep(kept.clone());
                    self.keep_outcome(&record, &holding, kept).await;
                }
                // A no-op if another holder took over; otherwise a retry need not wait out the
                // lease.
                None => self.release_held(&record, &holding).await,
            }
            guard.then = OnEnd::Nothing;
            return Err(IdempotencyError::LeaseLost);
        };
        let value = match outcome {
            Ok(value) => value,
            Err(err) => {
                self.release_held(&record, &holding).await;
                guard.then = OnEnd::Nothing;
                return Err(IdempotencyError::Operation(err));
            }
        };
        // The operation ran: from here the key keeps an outcome (the one it recorded, or a
        // marker), even should the policy or the encoding panic, or this call be dropped.
        guard.then = OnEnd::Keep(match took_effect {
            Some((encoded, whole)) => self.storable(encoded, whole),
            None => self.storable(None, false),
        });
        let keeping = store_if(&value);
        if keeping == Keeping::Not {
            guard.then = OnEnd::Release;
            self.release_held(&record, &holding).await;
            guard.then = OnEnd::Nothing;
            return Ok(Executed {
                value,
                replayed: false,
            });
        }
        let outcome = self.storable(encode(&value), keeping == Keeping::Whole);
        guard.then = OnEnd::Keep(outcome.clone());
        let stored = self.keep_outcome(&record, &holding, outcome).await;
        guard.then = OnEnd::Nothing;
        match stored {
            Some(Fenced::Applied) => Ok(Executed {
                value,
                replayed: false,
            }),
            Some(_) => Err(IdempotencyError::Fenced),
            // The operation ran; its result goes back to the caller. The record stays in
            // progress until its lease expires, then a retry with this key runs again.
            None => Ok(Executed {
                value,
                replayed: false,
            }),
        }
    }

    /// What to store for an encoded outcome (`None`: it failed to serialize), `whole` or not
    /// for a retry: itself, or the not-replayable marker when it cannot be stored.
    ///
    /// The operation ran: releasing the key would let a retry run it again, so an outcome
    /// that cannot be stored keeps the key with a marker instead (this caller still gets its
    /// value). Counted once stored ([`keep_outcome`](Self::keep_outcome)), since an outcome
    /// recorded when the operation took effect is often replaced by its final one.
    fn storable(&self, encoded: Option<Bytes>, whole: bool) -> ToKeep {
        match encoded {
            Some(bytes) if bytes.len() <= self.inner.config.max_outcome_len => {
                ToKeep { bytes, whole }
            }
            _ => ToKeep {
                bytes: Bytes::from_static(&[NOT_REPLAYABLE]),
                whole: false,
            },
        }
    }

    /// [`store_outcome`](Self::store_outcome), counting an outcome a retry cannot get whole
    /// once the store took it. A call dropped meanwhile leaves the store to its guard, which
    /// counts the same way.
    async fn keep_outcome(
        &self,
        record: &Key,
        holding: &Holding,
        outcome: ToKeep,
    ) -> Option<Fenced> {
        let marker = outcome.bytes.as_ref() == [NOT_REPLAYABLE];
        let stored = self.store_outcome(record, holding, outcome.bytes).await;
        if stored == Some(Fenced::Applied) && !outcome.whole {
            self.inner.metrics.not_replayable.increment(1);
        }
        if marker && stored == Some(Fenced::Applied) {
            tracing::warn!(
                record = ?record,
                max = self.inner.config.max_outcome_len,
                "the outcome cannot be stored; later requests with this key get NotReplayable"
            );
        }
        stored
    }

    /// Stores an outcome, retrying a failing store with a growing pause. `None` when every
    /// attempt failed.
    async fn store_outcome(
        &self,
        record: &Key,
        holding: &Holding,
        outcome: Bytes,
    ) -> Option<Fenced> {
        let inner = &self.inner;
        // Short enough that the pauses together stay well inside the lease.
        let mut backoff = COMPLETE_BACKOFF.min(inner.config.lease / 16);
        for attempt in 1..=COMPLETE_ATTEMPTS {
            if attempt > 1 {
                inner.clock.sleep(backoff).await;
                backoff *= 2;
            }
            match self.complete(record, holding, outcome.clone()).await {
                Ok(Fenced::Applied) => return Some(Fenced::Applied),
                Ok(fenced) => {
                    inner.metrics.fenced.increment(1);
                    tracing::warn!(record = ?record, "outcome fenced: another request took the key over");
                    return Some(fenced);
                }
                Err(err) => {
                    inner.metrics.store_errors.increment(1);
                    tracing::warn!(error = %err, attempt, "storing the idempotent outcome failed");
                }
            }
        }
        tracing::error!(record = ?record, "the outcome could not be stored; a retry after the lease may run again");
        None
    }

    /// Stores `outcome` under the holder's token. Refused, the key is taken again if nobody
    /// holds it (see [`retake`](Self::retake)) and the outcome stored under the new token;
    /// [`Fenced::Rejected`] only when another request holds the key or completed it.
    async fn complete(
        &self,
        record: &Key,
        holding: &Holding,
        outcome: Bytes,
    ) -> Result<Fenced, BackendError> {
        let (store, retention) = (&self.inner.store, self.inner.config.retention);
        match store
            .complete(record, holding.token(), outcome.clone(), retention)
            .await?
        {
            Fenced::Applied => Ok(Fenced::Applied),
            refused => match self.retake(record, holding).await? {
                Some(token) => store.complete(record, token, outcome, retention).await,
                None => Ok(refused),
            },
        }
    }

    /// Extends the holder's lease: `true` while it holds the key, having taken it again if
    /// the store refused the extension with nobody else holding it.
    async fn extend(&self, record: &Key, holding: &Holding) -> Result<bool, BackendError> {
        let lease = self.inner.config.lease;
        match self
            .inner
            .store
            .extend(record, holding.token(), lease)
            .await?
        {
            Fenced::Applied => Ok(true),
            _ => Ok(self.retake(record, holding).await?.is_some()),
        }
    }

    /// After the store refused the holder's token: a refusal means another request took the
    /// key over, or that the record is gone (Redis restarted without it, it was flushed, or
    /// it expired with nobody taking over). A `begin` with the holder's fingerprint tells them
    /// apart: it acquires the key only when nobody holds it, and the holder goes on under the
    /// new token (`Some`); another holder's lease or outcome is `None`. The operation ran or
    /// runs, so at most once holds for later requests only if the key stays taken.
    async fn retake(
        &self,
        record: &Key,
        holding: &Holding,
    ) -> Result<Option<FencingToken>, BackendError> {
        let inner = &self.inner;
        // Before it is sent: dropped or unanswered, it may still take the key.
        holding.retaken.store(true, Ordering::Relaxed);
        let begin = inner
            .store
            .begin(
                record,
                &holding.fingerprint,
                inner.config.lease,
                holding.retake,
            )
            .await?;
        match begin {
            Begin::Acquired { token, .. } => {
                holding.set_token(token);
                tracing::warn!(record = ?record, "nobody held the idempotency key (its record gone, or its lease run out); its holder took it again");
                Ok(Some(token))
            }
            _ => Ok(None),
        }
    }

    /// Extends the lease every third of its length, and a tenth of it after sending an
    /// extension that failed (at once when the failure took longer to come), so that a store
    /// back before the lease's end keeps it; completes only when the lease is lost: an
    /// extension refused, or none applied before the lease ran out.
    async fn keep_lease(&self, record: &Key, holding: &Holding, mut held_until: Instant) {
        let inner = &self.inner;
        let lease = inner.config.lease;
        // Whether the last extension failed: the next wait then ends at the lease's end at
        // the latest, where the lease is lost.
        let mut failed = false;
        let mut due = inner.clock.now() + lease / 3;
        loop {
            let now = inner.clock.now();
            let wait = due.min(held_until).saturating_duration_since(now);
            inner.clock.sleep(wait).await;
            let sent = inner.clock.now();
            let answer = match held_until.checked_duration_since(sent) {
                // Still held: the extension must land before the lease runs out.
                Some(left) if !left.is_zero() => tokio::select! {
                    answer = self.extend(record, holding) => Some(answer),
                    () = inner.clock.sleep(left) => None,
                },
                // Ran out while extensions failed: lost, whatever a late one would answer.
                _ if failed => None,
                // Ran out here (a stalled process): the store says whether anyone took over.
                _ => Some(self.extend(record, holding).await),
            };
            match answer {
                Some(Ok(true)) => {
                    held_until = sent + lease;
                    due = sent + lease / 3;
                    failed = false;
                }
                Some(Ok(false)) => {
                    tracing::warn!(record = ?record, "the idempotency lease was taken over");
                    return;
                }
                Some(Err(err)) => {
                    inner.metrics.store_errors.increment(1);
                    tracing::warn!(error = %err, "extending the idempotency lease failed");
                    if inner.clock.now() >= held_until {
                        return;
                    }
                    due = sent + lease / 10;
                    failed = true;
                }
                None => return,
            }
        }
    }

    /// Releases the key a run holds: by its token, and, should that be refused after a
    /// begin went out to take the key again, by that begin's id, since that begin may have
    /// taken the key under a token the run never learned (its answer lost, or not awaited
    /// once dropped or once the lease ran out).
    async fn release_held(&self, record: &Key, holding: &Holding) {
        let retake = holding
            .retaken
            .load(Ordering::Relaxed)
            .then_some(holding.retake);
        self.release_by(record, holding.token(), retake).await;
    }

    async fn release(&self, record: &Key, token: FencingToken) {
        self.release_by(record, token, None).await;
    }

    async fn release_by(&self, record: &Key, token: FencingToken, retake: Option<BeginId>) {
        self.inner.metrics.released.increment(1);
        if let Err(err) = release_once(&self.inner, record, token, retake).await {
            self.inner.metrics.store_errors.increment(1);
            tracing::warn!(error = %err, "releasing the idempotency lease failed; trying again");
            let (inner, record) = (Arc::clone(&self.inner), record.clone());
            let (lease, clock) = (inner.config.lease, inner.clock.clone());
            let release = move || {
                let (inner, record) = (Arc::clone(&inner), record.clone());
                async move { release_once(&inner, &record, token, retake).await }
            };
            release_in_background(release, lease, &clock);
        }
    }
}

/// One attempt of [`Idempotency::release_by`]: the release by `token`, then, refused, the
/// release of what the begin named `retake` took, if it was sent.
async fn release_once<S: LeaseStore>(
    inner: &Inner<S>,
    record: &Key,
    token: FencingToken,
    retake: Option<BeginId>,
) -> Result<Fenced, BackendError> {
    match (inner.store.release(record, token).await?, retake) {
        (Fenced::Applied, _) => Ok(Fenced::Applied),
        (_, Some(id)) => inner.store.release_begun(record, id).await,
        (refused, None) => Ok(refused),
    }
}

/// What a running operation holds its key by: the current token, and what the key is taken
/// again with should the store lose the record while nobody else holds the key.
#[derive(Debug)]
struct Holding {
    /// The current token: the one the key was taken with, or the last it was taken again with.
    token: AtomicU64,
    fingerprint: [u8; 16],
    /// Names every begin that takes the key again, so that one whose answer was lost, asked
    /// again (by a later attempt, or by the task of a dropped call), is answered its token.
    retake: BeginId,
    /// Whether such a begin was sent: releasing the key then releases what it took too.
    retaken: AtomicBool,
}

impl Holding {
    fn new(token: FencingToken, fingerprint: [u8; 16]) -> Self {
        Self {
            token: AtomicU64::new(token.0),
            fingerprint,
            retake: BeginId::random(),
            retaken: AtomicBool::new(false),
        }
    }

    fn token(&self) -> FencingToken {
        FencingToken(self.token.load(Ordering::Relaxed))
    }

    fn set_token(&self, token: FencingToken) {
        self.token.store(token.0, Ordering::Relaxed);
    }

    /// A copy, for a task that finishes the run.
    fn snapshot(&self) -> Self {
        Self {
            token: AtomicU64::new(self.token().0),
            fingerprint: self.fingerprint,
            retake: self.retake,
            retaken: AtomicBool::new(self.retaken.load(Ordering::Relaxed)),
        }
    }
}

type PendingBegin<S> = std::pin::Pin<
    Box<dyn Future<Output = (Idempotency<S>, Key, Result<Begin, BackendError>)> + Send>,
>;

/// A `begin` in flight; dropped before it answered, it finishes on a task and releases.
struct HandOver<S: LeaseStore>(Option<PendingBegin<S>>);

impl<S: LeaseStore> Drop for HandOver<S> {
    fn drop(&mut self) {
        let Some(begin) = self.0.take() else {
            return;
        };
        // Without a runtime the lease simply expires.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                if let (executor, record, Ok(Begin::Acquired { token, .. })) = begin.await {
                    executor.release(&record, token).await;
                }
            });
        }
    }
}

/// Whether a value is kept for its key, and whether a retry gets it whole.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Keeping {
    Not,
    Whole,
    /// Kept, though a retry does not get all of it (a response without its body): only the
    /// HTTP layer keeps a value so.
    #[cfg_attr(not(feature = "tower"), allow(dead_code))]
    Partly,
}

/// An outcome to store for a key, and whether a retry gets it whole.
#[derive(Clone, Debug)]
struct ToKeep {
    bytes: Bytes,
    whole: bool,
}

/// What becomes of a held key should its call end early (dropped, or a panic).
enum OnEnd {
    /// Release it, unless the operation said it [took effect](Lease::took_effect).
    Release,
    /// Store this outcome: the operation ran.
    Keep(ToKeep),
    Nothing,
}

struct EndGuard<'a, S: LeaseStore> {
    executor: &'a Idempotency<S>,
    record: &'a Key,
    holding: &'a Holding,
    then: OnEnd,
    /// The running operation's lease, to see whether it took effect.
    lease: Option<Lease>,
}

impl<S: LeaseStore> Drop for EndGuard<'_, S> {
    fn drop(&mut self) {
        let then = match std::mem::replace(&mut self.then, OnEnd::Nothing) {
            OnEnd::Nothing => return,
            OnEnd::Release => match self.lease.as_ref().and_then(Lease::kept) {
                Some((encoded, whole)) => OnEnd::Keep(self.executor.storable(encoded, whole)),
                None => OnEnd::Release,
            },
            keep => keep,
        };
        // Nothing can be awaited here: the runtime finishes the work. Without a runtime the
        // lease simply expires.
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (executor, record) = (self.executor.clone(), self.record.clone());
        let holding = self.holding.snapshot();
        runtime.spawn(async move {
            match then {
                OnEnd::Keep(outcome) => {
                    executor.keep_outcome(&record, &holding, outcome).await;
                }
                _ => executor.release_held(&record, &holding).await,
            }
        });
    }
}

fn encode<T: Serialize>(value: &T) -> Option<Bytes> {
    let mut out = BytesMut::new().writer();
    out.get_mut().put_u8(FORMAT_V1);
    let out = postcard::to_io(value, out).ok()?.into_inner();
    Some(out.freeze())
}

fn decode<T: DeserializeOwned>(stored: &[u8]) -> Option<T> {
    match stored.split_first() {
        Some((&FORMAT_V1, body)) => postcard::from_bytes(body).ok(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use headroom_core::memory::MemoryLeaseStore;

    use super::*;

    #[tokio::test]
    async fn a_corrupt_stored_outcome_is_a_typed_error_not_a_panic() {
        let store = MemoryLeaseStore::new();
        let idem = Idempotency::builder(store.clone()).build().unwrap();
        let scope = Scope::new("t", "op").unwrap();
        let fingerprint = xxh3_128(b"request").to_be_bytes();
        let garbage: [&[u8]; 4] = [
            b"",
            b"\x01",
            b"\x01\xff\xff\xff\xff\xff",
            b"\x09future-format",
        ];
        for (i, garbage) in garbage.into_iter().enumerate() {
            // Another program (or a future format) wrote this record.
            let key = IdempotencyKey::new(&format!("k{i}")).unwrap();
            let record = scope.record_key(&idem.inner.namespace, &key);
            let Ok(Begin::Acquired { token, .. }) = store
                .begin(
                    &record,
                    &fingerprint,
                    Duration::from_secs(5),
                    BeginId::random(),
                )
                .await
            else {
                panic!("a fresh key is acquired");
            };
            let stored = Bytes::copy_from_slice(garbage);
            store
                .complete(&record, token, stored, Duration::from_secs(60))
                .await
                .unwrap();

            let err = idem
                .execute(&scope, &key, b"request", || async {
                    Ok::<String, ()>("fresh".into())
                })
                .await
                .unwrap_err();
            assert!(
                matches!(err, IdempotencyError::Corrupt),
                "{garbage:?}: {err:?}"
            );
        }
    }

    /// A store whose every record is corrupt (another program wrote it).
    #[derive(Debug)]
    struct CorruptStore;

    impl LeaseStore for CorruptStore {
        async fn begin(
            &self,
            _: &Key,
            _: &[u8],
            _: Duration,
            _: BeginId,
        ) -> Result<Begin, BackendError> {
            Err(BackendError::with_detail(
                BackendErrorKind::Corrupt,
                "a foreign record",
            ))
        }

        async fn complete(
            &self,
            _: &Key,
            _: FencingToken,
            _: Bytes,
            _: Duration,
        ) -> Result<Fenced, BackendError> {
            unreachable!("nothing is acquired")
        }

        async fn extend(
            &self,
            _: &Key,
            _: FencingToken,
            _: Duration,
        ) -> Result<Fenced, BackendError> {
            unreachable!("nothing is acquired")
        }

        async fn release(&self, _: &Key, _: FencingToken) -> Result<Fenced, BackendError> {
            unreachable!("nothing is acquired")
        }

        async fn release_begun(&self, _: &Key, _: BeginId) -> Result<Fenced, BackendError> {
            Ok(Fenced::Rejected)
        }
    }

    /// A corrupt record is no store outage: failing open must not run the operation beside
    /// it on every retry, nor failing closed answer 503 until it expires (maybe never).
    #[tokio::test]
    async fn a_corrupt_record_is_corrupt_and_runs_nothing_under_either_store_failure_policy() {
        for policy in [StoreFailure::FailOpen, StoreFailure::FailClosed] {
            let idem = Idempotency::builder(CorruptStore)
                .store_failure(policy)
                .build()
                .unwrap();
            let scope = Scope::new("t", "op").unwrap();
            let key = IdempotencyKey::new("k").unwrap();
            let runs = std::sync::atomic::AtomicUsize::new(0);
            let err = idem
                .execute(&scope, &key, b"request", || async {
                    runs.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    Ok::<String, ()>("ran".into())
                })
                .await
                .unwrap_err();
            assert!(
                matches!(err, IdempotencyError::Corrupt),
                "{policy:?}: {err:?}"
            );
            assert_eq!(runs.into_inner(), 0, "{policy:?}: the operation ran");
        }
    }

    #[test]
    fn outcomes_round_trip_through_the_versioned_encoding() {
        let encoded = encode(&("receipt", 42u32)).unwrap();
        assert_eq!(encoded[0], FORMAT_V1);
        assert_eq!(
            decode::<(String, u32)>(&encoded),
            Some(("receipt".to_owned(), 42))
        );
        assert_eq!(decode::<(String, u32)>(&encoded[..encoded.len() - 1]), None);
        assert_eq!(decode::<u32>(b""), None);
    }
}
