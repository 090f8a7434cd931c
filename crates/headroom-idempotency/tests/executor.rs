//! The executor on the in-memory store: replay, reuse, duplicates, release on every path,
//! fencing after a lease expiry.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures_util::FutureExt;
use headroom_core::ManualClock;
use headroom_core::memory::MemoryLeaseStore;
use headroom_idempotency::{
    Idempotency, IdempotencyError, IdempotencyKey, InProgressPolicy, Scope,
};
use tokio::sync::oneshot;

type Result<T> = std::result::Result<T, String>;

fn scope() -> Scope {
    Scope::new("tenant-1", "charge").unwrap()
}

fn key(k: &str) -> IdempotencyKey {
    IdempotencyKey::new(k).unwrap()
}

/// Lets spawned tasks run until they wait again.
async fn settle() {
    for _ in 0..5 {
        tokio::task::yield_now().await;
    }
}

/// Advances `clock` by `seconds`, one second at a time, letting tasks run after each.
async fn advance_seconds(clock: &ManualClock, seconds: u32) {
    for _ in 0..seconds {
        clock.advance(Duration::from_secs(1));
        settle().await;
    }
}

fn executor(clock: &ManualClock, policy: InProgressPolicy) -> Idempotency<MemoryLeaseStore> {
    Idempotency::builder(MemoryLeaseStore::with_limits(clock.clock(), 10_000))
        .clock(clock.clock())
        .lease(Duration::from_secs(30))
        .in_progress(policy)
        .build()
        .unwrap()
}

#[tokio::test]
async fn a_retry_replays_the_first_outcome_without_running() {
    let clock = ManualClock::new();
    let idem = executor(&clock, InProgressPolicy::Reject);
    let runs = AtomicUsize::new(0);
    for attempt in 0..3 {
        let out = idem
            .execute(&scope(), &key("k"), b"body", || async {
                runs.fetch_add(1, Ordering::SeqCst);
                Result::Ok(format!("receipt-{attempt}"))
            })
            .await
            .unwrap();
        assert_eq!(out.value, "receipt-0");
        assert_eq!(out.replayed, attempt > 0);
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn the_same_key_with_another_request_is_refused() {
    let clock = ManualClock::new();
    let idem = executor(&clock, InProgressPolicy::Reject);
    idem.execute(&scope(), &key("k"), b"amount=1", || async {
        Result::Ok(1u32)
    })
    .await
    .unwrap();
    let err = idem
        .execute(&scope(), &key("k"), b"amount=2", || async {
            Result::Ok(2u32)
        })
        .await
        .unwrap_err();
    assert!(matches!(err, IdempotencyError::KeyReused), "{err:?}");
}

#[tokio::test]
async fn scopes_never_share_records() {
    let clock = ManualClock::new();
    let idem = executor(&clock, InProgressPolicy::Reject);
    let alice = Scope::new("alice", "charge").unwrap();
    let mallory = Scope::new("mallory", "charge").unwrap();
    idem.execute(&alice, &key("k"), b"x", || async {
        Result::Ok("alice's receipt".to_owned())
    })
    .await
    .unwrap();
    let out = idem
        .execute(&mallory, &key("k"), b"x", || async {
            Result::Ok("mallory's receipt".to_owned())
        })
        .await
        .unwrap();
    assert_eq!(out.value, "mallory's receipt");
    assert!(!out.replayed);
}

#[tokio::test]
async fn a_duplicate_during_the_run_is_told_in_progress_with_a_retry_after() {
    let clock = ManualClock::new();
    let idem = executor(&clock, InProgressPolicy::Reject);
    let (finish, finished) = oneshot::channel::<u32>();
    let first = {
        let idem = idem.clone();
        tokio::spawn(async move {
            idem.execute(&scope(), &key("k"), b"x", || async {
                Result::Ok(finished.await.unwrap())
            })
            .await
        })
    };
    tokio::task::yield_now().await;
    let err = idem
        .execute(&scope(), &key("k"), b"x", || async { Result::Ok(0u32) })
        .await
        .unwrap_err();
    match err {
        IdempotencyError::InProgress { retry_after } => {
            assert!(retry_after > Duration::ZERO && retry_after <= Duration::from_secs(1));
        }
        other => panic!("expected InProgress, got {other:?}"),
    }
    finish.send(7).unwrap();
    assert_eq!(first.await.unwrap().unwrap().value, 7);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_duplicates_run_once_and_share_the_outcome() {
    let idem = Idempotency::builder(MemoryLeaseStore::new())
        .in_progress(InProgressPolicy::Wait {
            max_wait: Duration::from_secs(10),
        })
        .build()
        .unwrap();
    let runs = Arc::new(AtomicUsize::new(0));
    let calls = (0..200).map(|_| {
        let idem = idem.clone();
        let runs = Arc::clone(&runs);
        tokio::spawn(async move {
            idem.execute(&scope(), &key("k"), b"x", || async move {
                let n = runs.fetch_add(1, Ordering::SeqCst);
                tokio::task::yield_now().await;
                Result::Ok(format!("run-{n}"))
            })
            .await
            .unwrap()
            .value
        })
    });
    let outcomes: Vec<String> = futures_util::future::try_join_all(calls).await.unwrap();
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    assert!(outcomes.iter().all(|o| o == "run-0"), "{outcomes:?}");
}

#[tokio::test]
async fn an_error_releases_the_key_so_a_retry_runs_again() {
    let clock = ManualClock::new();
    let idem = executor(&clock, InProgressPolicy::Reject);
    let err = idem
        .execute(&scope(), &key("k"), b"x", || async {
            Result::<u32>::Err("timeout".into())
        })
        .await
        .unwrap_err();
    assert_eq!(err.into_operation_error().as_deref(), Some("timeout"));
    let out = idem
        .execute(&scope(), &key("k"), b"x", || async { Result::Ok(2u32) })
        .await
        .unwrap();
    assert_eq!((out.value, out.replayed), (2, false));
}

#[tokio::test]
async fn outcomes_the_policy_declines_are_returned_but_not_stored() {
    let clock = ManualClock::new();
    let idem = executor(&clock, InProgressPolicy::Reject);
    let transient = idem
        .execute_with_policy(
            &scope(),
            &key("k"),
            b"x",
            |status: &u16| *status < 500,
            || async { Result::Ok(503u16) },
        )
        .await
        .unwrap();
    assert_eq!(transient.value, 503);
    let stored = idem
        .execute_with_policy(
            &scope(),
            &key("k"),
            b"x",
            |status: &u16| *status < 500,
            || async { Result::Ok(201u16) },
        )
        .await
        .unwrap();
    assert_eq!((stored.value, stored.replayed), (201, false));
    let replay = idem
        .execute(&scope(), &key("k"), b"x", || async { Result::Ok(999u16) })
        .await
        .unwrap();
    assert_eq!((replay.value, replay.replayed), (201, true));
}

#[tokio::test]
async fn a_panicking_operation_releases_the_key() {
    let clock = ManualClock::new();
    let idem = executor(&clock, InProgressPolicy::Reject);
    let panicked = {
        let idem = idem.clone();
        tokio::spawn(async move {
            idem.execute(&scope(), &key("k"), b"x", || async {
                panic!("bug in the handler")
            })
            .await
            .map(|out: headroom_idempotency::Executed<u32>| out.value)
            .map_err(|e: IdempotencyError<String>| e.to_string())
        })
        .await
    };
    assert!(panicked.unwrap_err().is_panic());
    tokio::task::yield_now().await; // the spawned release runs
    let out = idem
        .execute(&scope(), &key("k"), b"x", || async { Result::Ok(3u32) })
        .await
        .unwrap();
    assert_eq!((out.value, out.replayed), (3, false));
}

#[tokio::test]
async fn a_cancelled_call_releases_the_key() {
    let clock = ManualClock::new();
    let idem = executor(&clock, InProgressPolicy::Reject);
    let (_never_sent, never) = oneshot::channel::<u32>();
    let (call_scope, call_key) = (scope(), key("k"));
    let call = idem.execute(&call_scope, &call_key, b"x", || async {
        Result::Ok(never.await.unwrap_or(0))
    });
    // Poll once so the lease is taken and the operation started, then drop the call.
    let mut call = Box::pin(call);
    assert!(call.as_mut().now_or_never().is_none());
    drop(call);
    tokio::task::yield_now().await; // the spawned release runs
    let out = idem
        .execute(&scope(), &key("k"), b"x", || async { Result::Ok(4u32) })
        .await
        .unwrap();
    assert_eq!((out.value, out.replayed), (4, false));
}

#[tokio::test]
async fn a_holder_whose_lease_expired_is_fenced_and_the_new_outcome_stands() {
    let clock = ManualClock::new();
    let idem = executor(&clock, InProgressPolicy::Reject);
    let (finish_old, old_finished) = oneshot::channel::<&'static str>();
    let (old_scope, old_key) = (scope(), key("k"));
    let mut old = Box::pin(idem.execute(&old_scope, &old_key, b"x", || async {
        Result::Ok(old_finished.await.unwrap().to_owned())
    }));
    assert!(old.as_mut().now_or_never().is_none());

    // The old holder stalls (it is not polled) past its whole lease: a newcomer takes over.
    clock.advance(Duration::from_secs(31));
    let new = idem
        .execute(&scope(), &key("k"), b"x", || async {
            Result::Ok("new".to_owned())
        })
        .await
        .unwrap();
    assert_eq!((new.value.as_str(), new.replayed), ("new", false));

    finish_old.send("old").unwrap();
    let err = old.await.unwrap_err();
    assert!(matches!(err, IdempotencyError::Fenced), "{err:?}");
    let replay = idem
        .execute(&scope(), &key("k"), b"x", || async {
            Result::Ok("third".to_owned())
        })
        .await
        .unwrap();
    assert_eq!((replay.value.as_str(), replay.replayed), ("new", true));
}

#[tokio::test]
async fn a_running_holder_keeps_its_lease_by_extending_it() {
    let clock = ManualClock::new();
    let idem = executor(&clock, InProgressPolicy::Reject);
    let (finish, finished) = oneshot::channel::<u32>();
    let holder = {
        let idem = idem.clone();
        tokio::spawn(async move {
            idem.execute(&scope(), &key("k"), b"x", || async {
                Result::Ok(finished.await.unwrap())
            })
            .await
        })
    };
    tokio::task::yield_now().await;
    // Two minutes pass in steps of 5 s; the holder extends its 30 s lease as it goes.
    for _ in 0..24 {
        clock.advance(Duration::from_secs(5));
        tokio::task::yield_now().await;
        tokio::task::yield_now().await;
    }
    let err = idem
        .execute(&scope(), &key("k"), b"x", || async { Result::Ok(0u32) })
        .await
        .unwrap_err();
    assert!(
        matches!(err, IdempotencyError::InProgress { .. }),
        "{err:?}"
    );
    finish.send(1).unwrap();
    assert_eq!(holder.await.unwrap().unwrap().value, 1);
}

/// The operation ran, so its key must not be released even though its outcome cannot be
/// stored: the caller gets its value, later requests `NotReplayable`, and nothing runs again.
#[tokio::test]
async fn an_outcome_over_the_size_limit_runs_once_and_is_not_replayable() {
    let idem = Idempotency::builder(MemoryLeaseStore::new())
        .max_outcome_len(64)
        .build()
        .unwrap();
    let runs = Arc::new(AtomicUsize::new(0));
    let op = || {
        let runs = Arc::clone(&runs);
        move || async move {
            runs.fetch_add(1, Ordering::SeqCst);
            Result::Ok(vec![7u8; 1000])
        }
    };
    let first = idem.execute(&scope(), &key("k"), b"x", op()).await.unwrap();
    assert_eq!((first.value.len(), first.replayed), (1000, false));
    for _ in 0..3 {
        let err = idem
            .execute(&scope(), &key("k"), b"x", op())
            .await
            .unwrap_err();
        assert!(matches!(err, IdempotencyError::NotReplayable), "{err:?}");
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

/// Same for an outcome whose `Serialize` impl fails.
#[tokio::test]
async fn an_unencodable_outcome_runs_once_and_is_not_replayable() {
    #[derive(Debug, serde::Deserialize)]
    struct Unencodable;
    impl serde::Serialize for Unencodable {
        fn serialize<S: serde::Serializer>(&self, _: S) -> std::result::Result<S::Ok, S::Error> {
            Err(serde::ser::Error::custom("not today"))
        }
    }
    let idem = Idempotency::builder(MemoryLeaseStore::new())
        .build()
        .unwrap();
    let runs = Arc::new(AtomicUsize::new(0));
    for attempt in 0..3 {
        let runs = Arc::clone(&runs);
        let result = idem
            .execute(&scope(), &key("u"), b"x", || async move {
                runs.fetch_add(1, Ordering::SeqCst);
                Result::Ok(Unencodable)
            })
            .await;
        match attempt {
            0 => assert!(result.is_ok()),
            _ => assert!(matches!(result, Err(IdempotencyError::NotReplayable))),
        }
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

#[test]
fn invalid_configuration_is_refused() {
    let err = Idempotency::builder(MemoryLeaseStore::new())
        .lease(Duration::from_millis(1))
        .build()
        .unwrap_err();
    assert!(err.to_string().contains("lease"));
    assert!(
        Idempotency::builder(MemoryLeaseStore::new())
            .max_outcome_len(0)
            .build()
            .is_err()
    );
    // Times past what a store can count are refused, not left to panic or be cut short later.
    let too_long = Duration::MAX;
    for (builder, field) in [
        (
            Idempotency::builder(MemoryLeaseStore::new()).lease(too_long),
            "lease",
        ),
        (
            Idempotency::builder(MemoryLeaseStore::new()).retention(too_long),
            "retention",
        ),
        (
            Idempotency::builder(MemoryLeaseStore::new())
                .in_progress(InProgressPolicy::Wait { max_wait: too_long }),
            "max_wait",
        ),
    ] {
        let err = builder.build().unwrap_err();
        assert!(err.to_string().contains(field), "{err}");
    }
}

/// A holder that learns its lease was taken over stops its operation (the future is dropped,
/// so its lease-dependent work ends) instead of running on beside the new holder.
#[tokio::test(start_paused = true)]
async fn a_holder_that_loses_its_lease_stops_its_operation() {
    let clock = ManualClock::new();
    let idem = executor(&clock, InProgressPolicy::Reject);
    let dropped = Arc::new(AtomicUsize::new(0));
    let holder = {
        let (idem, dropped) = (idem.clone(), Arc::clone(&dropped));
        tokio::spawn(async move {
            idem.execute(&scope(), &key("k"), b"x", || async move {
                let _guard = DropCounter(dropped);
                std::future::pending::<Result<u32>>().await
            })
            .await
        })
    };
    tokio::task::yield_now().await;
    // The holder is not scheduled for a whole lease (a stalled VM); a newcomer takes over.
    clock.advance(Duration::from_secs(31));
    let new = idem
        .execute(&scope(), &key("k"), b"x", || async { Result::Ok(7u32) })
        .await
        .unwrap();
    assert_eq!(new.value, 7);
    let err = tokio::time::timeout(Duration::from_secs(3600), holder)
        .await
        .expect("the holder stops once its extension is refused")
        .unwrap()
        .unwrap_err();
    assert!(matches!(err, IdempotencyError::LeaseLost), "{err:?}");
    assert_eq!(
        dropped.load(Ordering::SeqCst),
        1,
        "the operation was dropped"
    );
}

struct DropCounter(Arc<AtomicUsize>);

impl Drop for DropCounter {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

/// The operation gets its fencing token, greater than every earlier holder's, and can ask
/// whether its lease is still held.
#[tokio::test]
async fn the_operation_gets_its_fencing_token_and_lease_state() {
    let clock = ManualClock::new();
    let idem = executor(&clock, InProgressPolicy::Reject);
    let kept = std::sync::Mutex::new(None);
    let first = idem
        .execute_leased(&scope(), &key("a"), b"x", |lease| async {
            assert!(lease.is_held());
            let token = lease.token().0;
            *kept.lock().unwrap() = Some(lease);
            Result::Ok(token)
        })
        .await
        .unwrap();
    let first_lease = kept.lock().unwrap().take().unwrap();
    assert!(!first_lease.is_held(), "the lease ends with the operation");
    first_lease.lost().await;
    let first_token = first.value;
    let second = idem
        .execute_leased(&scope(), &key("b"), b"x", |lease| async move {
            Result::Ok(lease.token().0)
        })
        .await
        .unwrap();
    assert!(second.value > first_token);
}

/// A memory store whose `extend` answers only when the test lets it: a store slow to answer.
#[derive(Clone, Debug)]
struct SlowExtend {
    store: MemoryLeaseStore,
    answer: Arc<tokio::sync::Semaphore>,
    asked: Arc<tokio::sync::Notify>,
}

impl headroom_core::lease::LeaseStore for SlowExtend {
    async fn begin(
        &self,
        key: &headroom_core::Key,
        fingerprint: &[u8],
        lease: Duration,
        id: headroom_core::lease::BeginId,
    ) -> std::result::Result<headroom_core::lease::Begin, headroom_core::BackendError> {
        self.store.begin(key, fingerprint, lease, id).await
    }
    async fn complete(
        &self,
        key: &headroom_core::Key,
        token: headroom_core::lease::FencingToken,
        outcome: bytes::Bytes,
        retention: Duration,
    ) -> std::result::Result<headroom_core::lease::Fenced, headroom_core::BackendError> {
        self.store.complete(key, token, outcome, retention).await
    }
    async fn extend(
        &self,
        key: &headroom_core::Key,
        token: headroom_core::lease::FencingToken,
        lease: Duration,
    ) -> std::result::Result<headroom_core::lease::Fenced, headroom_core::BackendError> {
        self.asked.notify_one();
        let _permit = self.answer.acquire().await.unwrap();
        self.store.extend(key, token, lease).await
    }
    async fn release(
        &self,
        key: &headroom_core::Key,
        token: headroom_core::lease::FencingToken,
    ) -> std::result::Result<headroom_core::lease::Fenced, headroom_core::BackendError> {
        self.store.release(key, token).await
    }
    async fn release_begun(
        &self,
        key: &headroom_core::Key,
        id: headroom_core::lease::BeginId,
    ) -> std::result::Result<headroom_core::lease::Fenced, headroom_core::BackendError> {
        self.store.release_begun(key, id).await
    }
}

/// An extension waiting on a slow store does not stop the operation from running and finishing.
#[tokio::test(start_paused = true)]
async fn a_slow_extension_does_not_stall_the_operation() {
    let clock = ManualClock::new();
    let store = SlowExtend {
        store: MemoryLeaseStore::with_limits(clock.clock(), 100),
        answer: Arc::new(tokio::sync::Semaphore::new(0)),
        asked: Arc::new(tokio::sync::Notify::new()),
    };
    let idem = Idempotency::builder(store.clone())
        .clock(clock.clock())
        .lease(Duration::from_secs(30))
        .build()
        .unwrap();
    let (go, went) = oneshot::channel::<u32>();
    let holder = {
        let idem = idem.clone();
        tokio::spawn(async move {
            idem.execute(&scope(), &key("k"), b"x", || async {
                Result::Ok(went.await.unwrap())
            })
            .await
        })
    };
    tokio::task::yield_now().await;
    clock.advance(Duration::from_secs(10));
    store.asked.notified().await;
    // The extension is in flight and unanswered; the operation's input arrives.
    go.send(5).unwrap();
    let out = tokio::time::timeout(Duration::from_secs(3600), holder)
        .await
        .expect("the operation finishes while the extension waits")
        .unwrap()
        .unwrap();
    assert_eq!((out.value, out.replayed), (5, false));
}

/// A tenant that holds its share of the memory store is refused new keys; other tenants run.
#[tokio::test]
async fn one_tenant_cannot_fill_the_memory_store_for_all() {
    let store = MemoryLeaseStore::builder()
        .max_records(1000)
        .max_records_per_scope(20)
        .build();
    let idem = Idempotency::builder(store).build().unwrap();
    let mallory = Scope::new("mallory", "charge").unwrap();
    let mut refused = 0;
    for i in 0..50 {
        let out = idem
            .execute(&mallory, &key(&format!("k{i}")), b"x", || async {
                Result::Ok(i)
            })
            .await;
        refused += usize::from(matches!(out, Err(IdempotencyError::Unavailable(_))));
    }
    assert_eq!(refused, 30, "mallory keeps 20 records");
    let alice = Scope::new("alice", "charge").unwrap();
    let out = idem
        .execute(&alice, &key("k0"), b"x", || async { Result::Ok(1) })
        .await
        .unwrap();
    assert!(!out.replayed);
}

/// A memory store whose first `failures` completions fail, as a store that is briefly down;
/// with `applied`, each failing one is applied first and only its answer lost (a timeout).
#[derive(Clone, Debug)]
struct FlakyComplete {
    store: MemoryLeaseStore,
    failures: Arc<AtomicUsize>,
    calls: Arc<AtomicUsize>,
    applied: bool,
}

impl headroom_core::lease::LeaseStore for FlakyComplete {
    async fn begin(
        &self,
        key: &headroom_core::Key,
        fingerprint: &[u8],
        lease: Duration,
        id: headroom_core::lease::BeginId,
    ) -> std::result::Result<headroom_core::lease::Begin, headroom_core::BackendError> {
        self.store.begin(key, fingerprint, lease, id).await
    }
    async fn complete(
        &self,
        key: &headroom_core::Key,
        token: headroom_core::lease::FencingToken,
        outcome: bytes::Bytes,
        retention: Duration,
    ) -> std::result::Result<headroom_core::lease::Fenced, headroom_core::BackendError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let failing = self
            .failures
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if failing {
            if self.applied {
                self.store.complete(key, token, outcome, retention).await?;
            }
            return Err(headroom_core::BackendError::with_detail(
                headroom_core::BackendErrorKind::Unavailable,
                "store briefly down",
            ));
        }
        self.store.complete(key, token, outcome, retention).await
    }
    async fn extend(
        &self,
        key: &headroom_core::Key,
        token: headroom_core::lease::FencingToken,
        lease: Duration,
    ) -> std::result::Result<headroom_core::lease::Fenced, headroom_core::BackendError> {
        self.store.extend(key, token, lease).await
    }
    async fn release(
        &self,
        key: &headroom_core::Key,
        token: headroom_core::lease::FencingToken,
    ) -> std::result::Result<headroom_core::lease::Fenced, headroom_core::BackendError> {
        self.store.release(key, token).await
    }
    async fn release_begun(
        &self,
        key: &headroom_core::Key,
        id: headroom_core::lease::BeginId,
    ) -> std::result::Result<headroom_core::lease::Fenced, headroom_core::BackendError> {
        self.store.release_begun(key, id).await
    }
}

impl FlakyComplete {
    /// A memory store on `clock` whose first `failures` completions fail (applied first when
    /// `applied`), and an executor on it answering duplicates by `policy`.
    fn with_executor(
        clock: &ManualClock,
        failures: usize,
        applied: bool,
        policy: InProgressPolicy,
    ) -> (Self, Idempotency<Self>) {
        let store = Self {
            store: MemoryLeaseStore::with_limits(clock.clock(), 100),
            failures: Arc::new(AtomicUsize::new(failures)),
            calls: Arc::new(AtomicUsize::new(0)),
            applied,
        };
        let idem = Idempotency::builder(store.clone())
            .clock(clock.clock())
            .lease(Duration::from_secs(30))
            .in_progress(policy)
            .build()
            .unwrap();
        (store, idem)
    }
}

/// A value too large to keep counts once as not replayable when its marker is kept: once,
/// even when the call is dropped while the marker is being stored and it is stored again in
/// the background; not at all when the store never takes it (a retry then runs again).
#[tokio::test]
async fn a_marker_counts_once_when_kept_and_not_when_never_kept() {
    for never_kept in [false, true] {
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        let clock = ManualClock::new();
        let store = FlakyComplete {
            store: MemoryLeaseStore::with_limits(clock.clock(), 100),
            failures: Arc::new(AtomicUsize::new(if never_kept { 100 } else { 1 })),
            calls: Arc::new(AtomicUsize::new(0)),
            applied: false,
        };
        let idem = metrics::with_local_recorder(&recorder, || {
            Idempotency::builder(store.clone())
                .clock(clock.clock())
                .max_outcome_len(64)
                .build()
                .unwrap()
        });
        let (scope, key) = (scope(), key("k"));
        let mut call = Box::pin(idem.execute(&scope, &key, b"x", || async {
            Ok::<String, ()>("x".repeat(1024))
        }));
        // The first store of the marker fails: the call waits before trying again.
        assert!((&mut call).now_or_never().is_none());
        if never_kept {
            while (&mut call).now_or_never().is_none() {
                clock.advance(Duration::from_millis(10));
                settle().await;
            }
        } else {
            // Dropped: the marker is stored again in the background.
            drop(call);
            settle().await;
            assert_eq!(store.calls.load(Ordering::SeqCst), 2);
        }
        let counted = handle
            .render()
            .lines()
            .find_map(|line| line.strip_prefix("headroom_idempotency_not_replayable_total "))
            .map(str::to_owned);
        let expected = if never_kept { "0" } else { "1" };
        assert_eq!(
            counted.as_deref(),
            Some(expected),
            "never kept: {never_kept}"
        );
    }
}

/// Storing an outcome is retried after a pause that grows, not at once, so a store that is
/// briefly down gets time to come back and the outcome is kept.
#[tokio::test]
async fn storing_an_outcome_is_retried_with_backoff() {
    let clock = ManualClock::new();
    let (store, idem) = FlakyComplete::with_executor(
        &clock,
        2,
        false,
        InProgressPolicy::Wait {
            max_wait: Duration::from_secs(5),
        },
    );
    let holder = {
        let idem = idem.clone();
        tokio::spawn(async move {
            idem.execute(&scope(), &key("k"), b"x", || async { Result::Ok(9u32) })
                .await
        })
    };
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    assert_eq!(
        store.calls.load(Ordering::SeqCst),
        1,
        "no retry before a pause"
    );
    let mut waited = Duration::ZERO;
    while !holder.is_finished() && waited < Duration::from_secs(5) {
        clock.advance(Duration::from_millis(10));
        waited += Duration::from_millis(10);
        settle().await;
    }
    assert_eq!(holder.await.unwrap().unwrap().value, 9);
    assert_eq!(store.calls.load(Ordering::SeqCst), 3);
    assert!(
        waited >= Duration::from_millis(100),
        "paused {waited:?} in all"
    );
    let replay = idem
        .execute(&scope(), &key("k"), b"x", || async { Result::Ok(0u32) })
        .await
        .unwrap();
    assert_eq!((replay.value, replay.replayed), (9, true));
}

/// The operation ran: a caller that goes away while its outcome is being stored (here in the
/// pause before a second attempt) leaves the storing to a task, so a retry after the lease
/// replays the outcome instead of running the operation again.
#[tokio::test]
async fn a_call_dropped_while_its_outcome_is_stored_still_stores_it() {
    let clock = ManualClock::new();
    let (store, idem) = FlakyComplete::with_executor(&clock, 1, false, InProgressPolicy::Reject);
    let runs = AtomicUsize::new(0);
    let (call_scope, call_key) = (scope(), key("k"));
    let mut call = Box::pin(idem.execute(&call_scope, &call_key, b"x", || async {
        runs.fetch_add(1, Ordering::SeqCst);
        Result::Ok(9u32)
    }));
    assert!(call.as_mut().now_or_never().is_none());
    assert_eq!(
        store.calls.load(Ordering::SeqCst),
        1,
        "the first store failed"
    );
    drop(call);
    for _ in 0..100 {
        clock.advance(Duration::from_millis(10));
        settle().await;
    }
    clock.advance(Duration::from_secs(31));
    let retry = idem
        .execute(&scope(), &key("k"), b"x", || async {
            runs.fetch_add(1, Ordering::SeqCst);
            Result::Ok(0u32)
        })
        .await
        .unwrap();
    assert_eq!((retry.value, retry.replayed), (9, true));
    assert_eq!(runs.load(Ordering::SeqCst), 1, "the operation ran once");
}

/// A storing policy that panics after the operation ran fails that call only, and the key is
/// kept (not replayable), so a retry neither waits out the lease nor runs the operation again.
#[tokio::test]
async fn a_storing_policy_that_panics_after_the_run_keeps_the_key() {
    let clock = ManualClock::new();
    let idem = executor(&clock, InProgressPolicy::Reject);
    let runs = Arc::new(AtomicUsize::new(0));
    let panicked = {
        let (idem, runs) = (idem.clone(), Arc::clone(&runs));
        tokio::spawn(async move {
            idem.execute_with_policy(
                &scope(),
                &key("k"),
                b"x",
                |_: &u32| panic!("bug in the policy"),
                || async {
                    runs.fetch_add(1, Ordering::SeqCst);
                    Result::Ok(1u32)
                },
            )
            .await
            .map(|out| out.value)
            .map_err(|e| e.to_string())
        })
        .await
    };
    assert!(panicked.unwrap_err().is_panic());
    a_retry_is_not_replayable_and_runs_nothing(&idem, &runs).await;
}

/// After an operation of key "k" ran once (`runs`) and its call panicked: a retry of the key
/// is refused as not replayable, without running the operation again.
async fn a_retry_is_not_replayable_and_runs_nothing(
    idem: &Idempotency<MemoryLeaseStore>,
    runs: &AtomicUsize,
) {
    tokio::task::yield_now().await; // the spawned store runs
    let retry = idem
        .execute(&scope(), &key("k"), b"x", || async {
            runs.fetch_add(1, Ordering::SeqCst);
            Result::Ok(2u32)
        })
        .await;
    assert!(
        matches!(retry, Err(IdempotencyError::NotReplayable)),
        "{retry:?}"
    );
    assert_eq!(runs.load(Ordering::SeqCst), 1, "the operation ran once");
}

/// An outcome whose `Serialize` panics, handed to `took_effect` once the operation took
/// effect: the panic fails that call, but the effect is recorded, so a retry does not run the
/// operation again (the outcome itself could not be kept: not replayable).
#[tokio::test]
async fn a_took_effect_outcome_whose_serialize_panics_still_keeps_the_key() {
    struct PanicsOnSerialize;
    impl serde::Serialize for PanicsOnSerialize {
        fn serialize<S: serde::Serializer>(&self, _: S) -> std::result::Result<S::Ok, S::Error> {
            panic!("a bug in Serialize");
        }
    }
    let clock = ManualClock::new();
    let idem = executor(&clock, InProgressPolicy::Reject);
    let runs = Arc::new(AtomicUsize::new(0));
    let panicked = {
        let (idem, runs) = (idem.clone(), Arc::clone(&runs));
        tokio::spawn(async move {
            idem.execute_leased(&scope(), &key("k"), b"x", |lease| async move {
                runs.fetch_add(1, Ordering::SeqCst);
                lease.took_effect(&PanicsOnSerialize);
                Result::Ok(1u32)
            })
            .await
            .map(|out| out.value)
            .map_err(|e| e.to_string())
        })
        .await
    };
    assert!(panicked.unwrap_err().is_panic());
    a_retry_is_not_replayable_and_runs_nothing(&idem, &runs).await;
}

/// A completion that landed but whose answer was lost is retried, and the retry's answer is
/// the success it was: the caller gets its value, not `Fenced`, and the outcome is replayed.
#[tokio::test]
async fn a_completion_whose_answer_was_lost_is_not_taken_for_a_takeover() {
    let clock = ManualClock::new();
    let (store, idem) = FlakyComplete::with_executor(
        &clock,
        1,
        true,
        InProgressPolicy::Wait {
            max_wait: Duration::from_secs(5),
        },
    );
    let holder = {
        let idem = idem.clone();
        tokio::spawn(async move {
            idem.execute(&scope(), &key("k"), b"x", || async { Result::Ok(5u32) })
                .await
        })
    };
    for _ in 0..100 {
        if holder.is_finished() {
            break;
        }
        clock.advance(Duration::from_millis(10));
        settle().await;
    }
    let out = holder.await.unwrap();
    assert_eq!(out.map(|out| out.value).map_err(|e| e.to_string()), Ok(5));
    assert_eq!(store.calls.load(Ordering::SeqCst), 2);
    let replay = idem
        .execute(&scope(), &key("k"), b"x", || async { Result::Ok(0u32) })
        .await
        .unwrap();
    assert_eq!((replay.value, replay.replayed), (5, true));
}

/// An operation that took effect and then lost its lease (its extensions unanswered until the
/// lease ran out) is stopped, but its key keeps the outcome it recorded: a retry replays it
/// rather than running the operation again.
#[tokio::test]
async fn an_operation_that_took_effect_keeps_its_outcome_when_its_lease_is_lost() {
    let clock = ManualClock::new();
    let store = SlowExtend {
        store: MemoryLeaseStore::with_limits(clock.clock(), 100),
        answer: Arc::new(tokio::sync::Semaphore::new(0)),
        asked: Arc::new(tokio::sync::Notify::new()),
    };
    let idem = rejecting(store, &clock);
    let runs = Arc::new(AtomicUsize::new(0));
    let holder = {
        let (idem, runs) = (idem.clone(), Arc::clone(&runs));
        tokio::spawn(async move {
            idem.execute_leased(&scope(), &key("k"), b"x", |lease| async move {
                runs.fetch_add(1, Ordering::SeqCst);
                lease.took_effect(&7u32);
                std::future::pending::<Result<u32>>().await
            })
            .await
            .map(|out| out.value)
            .map_err(|e| e.to_string())
        })
    };
    for _ in 0..60 {
        if holder.is_finished() {
            break;
        }
        clock.advance(Duration::from_secs(1));
        settle().await;
    }
    assert!(holder.is_finished(), "the lease ran out");
    let lost = holder.await.unwrap().unwrap_err();
    assert!(lost.contains("lease"), "{lost}");
    let retry = idem
        .execute(&scope(), &key("k"), b"x", || async {
            runs.fetch_add(1, Ordering::SeqCst);
            Result::Ok(0u32)
        })
        .await
        .unwrap();
    assert_eq!((retry.value, retry.replayed), (7, true));
    assert_eq!(runs.load(Ordering::SeqCst), 1, "the operation ran once");
}

/// A memory store with faults: `begin` fails on the calls numbered in `failing_begins` (from
/// 1), as a store with a moment's outage; the first `failing_extends` extensions fail at once
/// and, with `extends_hang`, later ones never answer (a store this instance lost for good).
#[derive(Clone, Debug, Default)]
struct Faulty {
    store: MemoryLeaseStore,
    failing_begins: &'static [usize],
    /// Begins the store applies but whose answers are lost (they time out).
    lost_begins: &'static [usize],
    /// The first `failing_releases` releases fail, as while the store flaps.
    failing_releases: Arc<AtomicUsize>,
    begins: Arc<AtomicUsize>,
    failing_extends: Arc<AtomicUsize>,
    /// How long a failing extension takes to fail, on this clock (at once when `None`).
    failures_take: Option<(headroom_core::Clock, Duration)>,
    extends_hang: bool,
}

/// An executor on `store` with a 30 s lease that rejects duplicates of a running request.
fn rejecting<S: headroom_core::lease::LeaseStore>(store: S, clock: &ManualClock) -> Idempotency<S> {
    Idempotency::builder(store)
        .clock(clock.clock())
        .lease(Duration::from_secs(30))
        .in_progress(InProgressPolicy::Reject)
        .build()
        .unwrap()
}

impl headroom_core::lease::LeaseStore for Faulty {
    async fn begin(
        &self,
        key: &headroom_core::Key,
        fingerprint: &[u8],
        lease: Duration,
        id: headroom_core::lease::BeginId,
    ) -> std::result::Result<headroom_core::lease::Begin, headroom_core::BackendError> {
        let call = self.begins.fetch_add(1, Ordering::SeqCst) + 1;
        if self.failing_begins.contains(&call) {
            return Err(headroom_core::BackendError::new(
                headroom_core::BackendErrorKind::Timeout,
            ));
        }
        let begun = self.store.begin(key, fingerprint, lease, id).await;
        if self.lost_begins.contains(&call) {
            return Err(headroom_core::BackendError::new(
                headroom_core::BackendErrorKind::Timeout,
            ));
        }
        begun
    }
    async fn complete(
        &self,
        key: &headroom_core::Key,
        token: headroom_core::lease::FencingToken,
        outcome: bytes::Bytes,
        retention: Duration,
    ) -> std::result::Result<headroom_core::lease::Fenced, headroom_core::BackendError> {
        self.store.complete(key, token, outcome, retention).await
    }
    async fn extend(
        &self,
        key: &headroom_core::Key,
        token: headroom_core::lease::FencingToken,
        lease: Duration,
    ) -> std::result::Result<headroom_core::lease::Fenced, headroom_core::BackendError> {
        if self
            .failing_extends
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |left| {
                left.checked_sub(1)
            })
            .is_ok()
        {
            if let Some((clock, takes)) = &self.failures_take {
                clock.sleep(*takes).await;
            }
            return Err(headroom_core::BackendError::new(
                headroom_core::BackendErrorKind::Unavailable,
            ));
        }
        if self.extends_hang {
            std::future::pending::<()>().await;
        }
        self.store.extend(key, token, lease).await
    }
    async fn release(
        &self,
        key: &headroom_core::Key,
        token: headroom_core::lease::FencingToken,
    ) -> std::result::Result<headroom_core::lease::Fenced, headroom_core::BackendError> {
        if self
            .failing_releases
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |left| {
                left.checked_sub(1)
            })
            .is_ok()
        {
            return Err(headroom_core::BackendError::new(
                headroom_core::BackendErrorKind::Connection,
            ));
        }
        self.store.release(key, token).await
    }
    async fn release_begun(
        &self,
        key: &headroom_core::Key,
        id: headroom_core::lease::BeginId,
    ) -> std::result::Result<headroom_core::lease::Fenced, headroom_core::BackendError> {
        self.store.release_begun(key, id).await
    }
}

/// An operation that fails releases its key so that a retry runs again; a release the store
/// fails once is tried again, so the retry does not wait out the lease on a key nobody holds.
#[tokio::test(start_paused = true)]
async fn a_release_the_store_fails_once_is_tried_again() {
    let clock = ManualClock::new();
    let store = Faulty {
        store: MemoryLeaseStore::with_limits(clock.clock(), 100),
        failing_releases: Arc::new(AtomicUsize::new(1)),
        ..Faulty::default()
    };
    let idem = rejecting(store, &clock);
    let failed = idem
        .execute(&scope(), &key("k"), b"x", || async {
            Err::<u32, _>("declined")
        })
        .await
        .unwrap_err();
    assert!(matches!(failed, IdempotencyError::Operation("declined")));
    advance_seconds(&clock, 2).await;
    let retry = idem
        .execute(&scope(), &key("k"), b"x", || async { Ok::<u32, &str>(7) })
        .await
        .unwrap();
    assert_eq!((retry.value, retry.replayed), (7, false));
}

/// Extensions that fail until the lease runs out lose it when it runs out: the operation is
/// stopped then, not once a last extension, sent at the deadline, answers.
#[tokio::test(start_paused = true)]
async fn a_lease_whose_extensions_fail_is_lost_when_it_runs_out() {
    let clock = ManualClock::new();
    let store = Faulty {
        store: MemoryLeaseStore::with_limits(clock.clock(), 100),
        failing_extends: Arc::new(AtomicUsize::new(2)),
        extends_hang: true,
        ..Faulty::default()
    };
    let idem = Idempotency::builder(store)
        .clock(clock.clock())
        .lease(Duration::from_secs(30))
        .build()
        .unwrap();
    let holder = {
        let idem = idem.clone();
        tokio::spawn(async move {
            idem.execute(&scope(), &key("k"), b"x", || {
                std::future::pending::<Result<u32>>()
            })
            .await
            .map(|out| out.value)
            .map_err(|e| e.to_string())
        })
    };
    // The lease is taken at 0 s.
    settle().await;
    advance_seconds(&clock, 30).await;
    assert!(holder.is_finished(), "the lease ran out at 30 s");
    let lost = holder.await.unwrap().unwrap_err();
    assert!(lost.contains("lease"), "{lost}");
}

/// A call on `store` whose first begin fails fails closed; a retry right after it runs the
/// operation, which runs once in all.
async fn fails_closed_then_a_retry_runs_once(store: Faulty, clock: &ManualClock) {
    let idem = rejecting(store, clock);
    let runs = Arc::new(AtomicUsize::new(0));
    let run = |value: u32| {
        let runs = runs.clone();
        move || async move {
            runs.fetch_add(1, Ordering::SeqCst);
            Result::<u32>::Ok(value)
        }
    };
    let failed = idem.execute(&scope(), &key("k"), b"x", run(0)).await;
    assert!(
        matches!(failed, Err(IdempotencyError::Unavailable(_))),
        "fails closed: {failed:?}"
    );
    settle().await;
    let retried = idem.execute(&scope(), &key("k"), b"x", run(1)).await;
    assert_eq!(
        retried.map(|out| out.value).map_err(|e| e.to_string()),
        Ok(1)
    );
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

/// A begin the store applied but whose answer was lost (a timeout) does not leave the key held
/// by nobody for a whole lease: the lease it took is released by its id, so the
/// retry runs at once.
#[tokio::test(start_paused = true)]
async fn a_begin_whose_answer_was_lost_does_not_strand_its_key() {
    let clock = ManualClock::new();
    let store = Faulty {
        store: MemoryLeaseStore::with_limits(clock.clock(), 100),
        lost_begins: &[1],
        ..Faulty::default()
    };
    fails_closed_then_a_retry_runs_once(store, &clock).await;
}

/// A begin that failed without running (the connection refused) leaves nothing behind that
/// could hold the key, even while releases fail: the retry runs at once.
#[tokio::test(start_paused = true)]
async fn a_begin_that_never_ran_leaves_the_key_free() {
    let clock = ManualClock::new();
    let store = Faulty {
        store: MemoryLeaseStore::with_limits(clock.clock(), 100),
        failing_begins: &[1],
        failing_releases: Arc::new(AtomicUsize::new(usize::MAX)),
        ..Faulty::default()
    };
    fails_closed_then_a_retry_runs_once(store, &clock).await;
}

/// A lease whose extensions fail for a while is kept once they land again before it runs
/// out: a failed extension is tried again within the lease, not a whole third of it later.
#[tokio::test(start_paused = true)]
async fn a_lease_is_kept_when_extensions_land_again_before_it_runs_out() {
    let clock = ManualClock::new();
    // The extensions at 10 s and the next one fail; the store answers again from then on.
    let store = Faulty {
        store: MemoryLeaseStore::with_limits(clock.clock(), 100),
        failing_extends: Arc::new(AtomicUsize::new(2)),
        ..Faulty::default()
    };
    keeps_its_lease_past_its_first_end(store, &clock).await;
}

/// Runs an operation on `store` with a 30 s lease for 35 s, past the lease's first end, and
/// checks that it kept the lease and answered.
async fn keeps_its_lease_past_its_first_end(store: Faulty, clock: &ManualClock) {
    let idem = Idempotency::builder(store)
        .clock(clock.clock())
        .lease(Duration::from_secs(30))
        .build()
        .unwrap();
    let (finish, finished) = oneshot::channel::<()>();
    let holder = tokio::spawn(async move {
        idem.execute(&scope(), &key("k"), b"x", || async move {
            finished.await.ok();
            Result::<u32>::Ok(7)
        })
        .await
        .map(|out| out.value)
        .map_err(|e| e.to_string())
    });
    settle().await;
    advance_seconds(clock, 35).await;
    assert!(!holder.is_finished(), "the lease was kept");
    finish.send(()).unwrap();
    assert_eq!(holder.await.unwrap(), Ok(7));
}

/// The same, with extensions that fail only 4 s after they were sent: the next try goes out
/// as the failure comes back (a tenth of the lease after the send has passed), not a tenth of
/// the lease after the failure, so one still lands before the lease runs out.
#[tokio::test(start_paused = true)]
async fn a_lease_is_kept_through_extensions_that_fail_slowly() {
    let clock = ManualClock::new();
    // Four extensions fail, each 4 s after it was sent.
    let store = Faulty {
        store: MemoryLeaseStore::with_limits(clock.clock(), 100),
        failing_extends: Arc::new(AtomicUsize::new(4)),
        failures_take: Some((clock.clock(), Duration::from_secs(4))),
        ..Faulty::default()
    };
    keeps_its_lease_past_its_first_end(store, &clock).await;
}

/// Failing open covers duplicates that arrive while the store is down, not one already told
/// that the first request runs: a store error while it waits for that request does not run
/// the operation beside it.
#[tokio::test(start_paused = true)]
async fn a_duplicate_waiting_on_a_running_request_does_not_fail_open_on_a_store_error() {
    let clock = ManualClock::new();
    let store = Faulty {
        store: MemoryLeaseStore::with_limits(clock.clock(), 100),
        // The duplicate's first poll after being told the key is in progress.
        failing_begins: &[3],
        ..Faulty::default()
    };
    let idem = Idempotency::builder(store)
        .clock(clock.clock())
        .lease(Duration::from_secs(30))
        .in_progress(InProgressPolicy::Wait {
            max_wait: Duration::from_secs(5),
        })
        .store_failure(headroom_idempotency::StoreFailure::FailOpen)
        .build()
        .unwrap();
    let runs = Arc::new(AtomicUsize::new(0));
    let (go, went) = oneshot::channel::<u32>();
    let first = {
        let (idem, runs) = (idem.clone(), Arc::clone(&runs));
        tokio::spawn(async move {
            idem.execute(&scope(), &key("k"), b"x", || async move {
                runs.fetch_add(1, Ordering::SeqCst);
                Result::Ok(went.await.unwrap())
            })
            .await
        })
    };
    tokio::task::yield_now().await;
    let duplicate = {
        let (idem, runs) = (idem.clone(), Arc::clone(&runs));
        tokio::spawn(async move {
            idem.execute(&scope(), &key("k"), b"x", || async move {
                runs.fetch_add(1, Ordering::SeqCst);
                Result::Ok(0u32)
            })
            .await
        })
    };
    // The duplicate polls every few milliseconds of the manual clock.
    for _ in 0..20 {
        clock.advance(Duration::from_millis(5));
        settle().await;
    }
    go.send(7).unwrap();
    for _ in 0..100 {
        if duplicate.is_finished() {
            break;
        }
        clock.advance(Duration::from_millis(5));
        settle().await;
    }
    let first = first.await.unwrap().unwrap();
    let duplicate = duplicate.await.unwrap().unwrap();
    assert_eq!(runs.load(Ordering::SeqCst), 1, "the operation ran once");
    assert_eq!((first.value, first.replayed), (7, false));
    assert_eq!((duplicate.value, duplicate.replayed), (7, true));
}

/// `headroom_idempotency_replays_total` counts outcomes replayed to a retry, and only those: a
/// retry refused because the outcome could not be kept is not a replay.
#[tokio::test]
async fn only_outcomes_replayed_count_as_replays() {
    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    // The counters are registered when the executor is built.
    let idem = metrics::with_local_recorder(&recorder, || {
        Idempotency::builder(MemoryLeaseStore::new())
            .max_outcome_len(64)
            .build()
            .unwrap()
    });
    let replays = || {
        handle
            .render()
            .lines()
            .find_map(|line| line.strip_prefix("headroom_idempotency_replays_total "))
            .map(str::to_owned)
    };
    let small = || async { Ok::<u32, ()>(7) };
    let large = || async { Ok::<String, ()>("x".repeat(1024)) };
    idem.execute(&scope(), &key("small"), b"x", small)
        .await
        .unwrap();
    idem.execute(&scope(), &key("large"), b"x", large)
        .await
        .unwrap();
    let refused = idem.execute(&scope(), &key("large"), b"x", large).await;
    assert!(matches!(refused, Err(IdempotencyError::NotReplayable)));
    assert_eq!(replays().as_deref(), Some("0"));
    let replayed = idem
        .execute(&scope(), &key("small"), b"x", small)
        .await
        .unwrap();
    assert!(replayed.replayed);
    assert_eq!(replays().as_deref(), Some("1"));
}
