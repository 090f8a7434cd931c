//! A holder whose record vanished, a takeover by another request, how errors classify, and the
//! token of a run without a record: on the memory store (manual clock) and on real Redis.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures_util::FutureExt;
use headroom_core::lease::{Begin, BeginId, Fenced, FencingToken, LeaseStore};
use headroom_core::memory::MemoryLeaseStore;
use headroom_core::{BackendError, BackendErrorKind, Classify, Key, ManualClock};
use headroom_idempotency::{
    Idempotency, IdempotencyError, IdempotencyKey, InProgressPolicy, Scope, StoreFailure,
};
use headroom_redis::{Redis, RedisConfig, RedisLeaseStore};
use headroom_testkit::RedisServer;
use tokio::sync::{Notify, oneshot};

type Result<T> = std::result::Result<T, String>;

const LEASE: Duration = Duration::from_secs(30);

fn scope() -> Scope {
    Scope::new("tenant-1", "charge").unwrap()
}

fn key() -> IdempotencyKey {
    IdempotencyKey::new("order-7").unwrap()
}

/// Lets spawned tasks run until they wait again.
async fn settle() {
    for _ in 0..5 {
        tokio::task::yield_now().await;
    }
}

fn memory_executor(clock: &ManualClock) -> Idempotency<MemoryLeaseStore> {
    Idempotency::builder(MemoryLeaseStore::with_limits(clock.clock(), 1_000))
        .clock(clock.clock())
        .lease(LEASE)
        .in_progress(InProgressPolicy::Reject)
        .build()
        .unwrap()
}

/// Asks for `body` with the test's key and expects a replay of `value` with nothing run.
async fn replays<S: LeaseStore>(idem: &Idempotency<S>, body: &[u8], value: &str) {
    let ran = AtomicUsize::new(0);
    let retry = idem
        .execute(&scope(), &key(), body, || async {
            ran.fetch_add(1, Ordering::SeqCst);
            Result::Ok("charged again".to_owned())
        })
        .await
        .map(|out| (out.value, out.replayed))
        .map_err(|e| format!("{e:?}"));
    assert_eq!(retry, Ok((value.to_owned(), true)), "the retry replays");
    assert_eq!(ran.into_inner(), 0, "the retry ran the operation again");
}

/// The holder stalled (not polled) for three leases: the store dropped its record and nobody
/// took the key over. Its operation ran, so its outcome goes back to it and is stored: a
/// retry replays it rather than charging again.
#[tokio::test]
async fn a_holder_whose_record_was_dropped_while_nobody_took_over_keeps_its_outcome() {
    let clock = ManualClock::new();
    let idem = memory_executor(&clock);
    let (finish, finished) = oneshot::channel::<String>();
    let (s, k) = (scope(), key());
    let mut holder = Box::pin(idem.execute(&s, &k, b"amount=100", || async {
        Result::Ok(finished.await.unwrap())
    }));
    assert!(holder.as_mut().now_or_never().is_none());

    clock.advance(3 * LEASE);
    finish.send("ch_1".to_owned()).unwrap();
    let out = holder
        .await
        .map(|out| (out.value, out.replayed))
        .map_err(|e| format!("{e:?}"));
    assert_eq!(out, Ok(("ch_1".to_owned(), false)));
    replays(&idem, b"amount=100", "ch_1").await;
}

/// As above, but the holder's lease keeper wakes first: the extension is refused since the
/// record is gone, and with nobody else holding the key the holder takes it again and runs on.
#[tokio::test]
async fn a_stalled_holder_whose_record_was_dropped_extends_again_and_runs_on() {
    let clock = ManualClock::new();
    let idem = memory_executor(&clock);
    let (finish, finished) = oneshot::channel::<String>();
    let runs = Arc::new(AtomicUsize::new(0));
    let holder = {
        let (idem, runs) = (idem.clone(), Arc::clone(&runs));
        tokio::spawn(async move {
            idem.execute(&scope(), &key(), b"amount=100", || async move {
                runs.fetch_add(1, Ordering::SeqCst);
                Result::Ok(finished.await.unwrap())
            })
            .await
            .map(|out| (out.value, out.replayed))
            .map_err(|e| format!("{e:?}"))
        })
    };
    settle().await;
    clock.advance(3 * LEASE);
    settle().await;
    if holder.is_finished() {
        panic!("the holder stopped: {:?}", holder.await.unwrap());
    }
    // Held again: a duplicate is told it is in progress rather than running beside it.
    let duplicate = idem
        .execute(&scope(), &key(), b"amount=100", || async {
            runs.fetch_add(1, Ordering::SeqCst);
            Result::Ok("duplicate".to_owned())
        })
        .await;
    assert!(
        matches!(duplicate, Err(IdempotencyError::InProgress { .. })),
        "{duplicate:?}"
    );
    let _ = finish.send("ch_1".to_owned());
    assert_eq!(holder.await.unwrap(), Ok(("ch_1".to_owned(), false)));
    replays(&idem, b"amount=100", "ch_1").await;
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

/// A call dropped after its operation took effect keeps that outcome through a task; the
/// store having dropped the record meanwhile (nobody took over), the task takes the key again
/// and stores it, so a retry replays it.
#[tokio::test]
async fn a_call_dropped_after_its_effect_keeps_its_outcome_once_the_record_was_dropped() {
    let clock = ManualClock::new();
    let idem = memory_executor(&clock);
    let (s, k) = (scope(), key());
    let mut call = Box::pin(
        idem.execute_leased(&s, &k, b"amount=100", |lease| async move {
            lease.took_effect(&"ch_1".to_owned());
            std::future::pending::<Result<String>>().await
        }),
    );
    assert!(call.as_mut().now_or_never().is_none());
    clock.advance(3 * LEASE);
    drop(call);
    settle().await;
    replays(&idem, b"amount=100", "ch_1").await;
}

/// Once the record is gone, a holder is fenced only when another request holds the key: here
/// a newcomer began after the record was dropped and is still running.
#[tokio::test]
async fn a_holder_whose_record_was_dropped_is_fenced_when_another_request_holds_the_key() {
    let clock = ManualClock::new();
    let idem = memory_executor(&clock);
    let (finish_old, old_finished) = oneshot::channel::<String>();
    let (s, k) = (scope(), key());
    let mut old = Box::pin(idem.execute(&s, &k, b"amount=100", || async {
        Result::Ok(old_finished.await.unwrap())
    }));
    assert!(old.as_mut().now_or_never().is_none());
    clock.advance(3 * LEASE);

    let (finish_new, new_finished) = oneshot::channel::<String>();
    let mut new = Box::pin(idem.execute(&s, &k, b"amount=100", || async {
        Result::Ok(new_finished.await.unwrap())
    }));
    assert!(new.as_mut().now_or_never().is_none(), "the newcomer runs");

    finish_old.send("old".to_owned()).unwrap();
    let err = old.await.unwrap_err();
    assert!(matches!(err, IdempotencyError::Fenced), "{err:?}");
    finish_new.send("new".to_owned()).unwrap();
    assert_eq!(new.await.unwrap().value, "new");
    replays(&idem, b"amount=100", "new").await;
}

/// Request A took the key, ran (it may have charged) and crashed; after its lease ran out,
/// request B with another body and the same key must not run: the key was used with another
/// request. A's own retry takes it over.
#[tokio::test]
async fn an_expired_lease_is_not_taken_over_by_another_request() {
    let clock = ManualClock::new();
    let idem = memory_executor(&clock);
    let (s, k) = (scope(), key());
    let mut crashed = Box::pin(idem.execute(&s, &k, b"amount=100", || async {
        std::future::pending::<Result<String>>().await
    }));
    assert!(crashed.as_mut().now_or_never().is_none());
    // A crash: nothing of it runs or is dropped any more.
    std::mem::forget(crashed);
    clock.advance(LEASE + Duration::from_secs(1));

    let ran = AtomicUsize::new(0);
    let other = idem
        .execute(&scope(), &key(), b"amount=999", || async {
            ran.fetch_add(1, Ordering::SeqCst);
            Result::Ok("ch_other".to_owned())
        })
        .await
        .map(|out| out.value);
    assert!(
        matches!(other, Err(IdempotencyError::KeyReused)),
        "another request with the key: {other:?}"
    );
    assert_eq!(ran.into_inner(), 0, "another request ran under the key");

    let retry = idem
        .execute(&scope(), &key(), b"amount=100", || async {
            Result::Ok("ch_1".to_owned())
        })
        .await
        .unwrap();
    assert_eq!((retry.value.as_str(), retry.replayed), ("ch_1", false));
    let other = idem
        .execute(&scope(), &key(), b"amount=999", || async {
            Result::Ok("ch_other".to_owned())
        })
        .await;
    assert!(
        matches!(other, Err(IdempotencyError::KeyReused)),
        "{other:?}"
    );
}

/// How the begin that takes a vanished key again answers, once the store has run it.
#[derive(Clone, Copy, Debug)]
enum RetakeAnswer {
    /// A lease later: the lease keeper gives up on it first.
    Late,
    /// Never: it times out.
    Lost,
}

/// A memory store whose first extension finds the record gone (as after a flush) and is
/// refused; the begin that then takes the key again is run, but its answer comes as `answer`
/// says.
#[derive(Clone, Debug)]
struct VanishingRecord {
    store: MemoryLeaseStore,
    answer: RetakeAnswer,
    vanished: Arc<AtomicBool>,
    retaking: Arc<AtomicBool>,
    /// Told once the retaking begin has run.
    retook: Arc<Notify>,
}

const SHORT_LEASE: Duration = Duration::from_secs(3);

impl VanishingRecord {
    fn new(answer: RetakeAnswer) -> Self {
        Self {
            store: MemoryLeaseStore::new(),
            answer,
            vanished: Arc::default(),
            retaking: Arc::default(),
            retook: Arc::default(),
        }
    }
}

impl LeaseStore for VanishingRecord {
    async fn begin(
        &self,
        key: &Key,
        fingerprint: &[u8],
        lease: Duration,
        id: BeginId,
    ) -> std::result::Result<Begin, BackendError> {
        let begin = self.store.begin(key, fingerprint, lease, id).await;
        if self.retaking.swap(false, Ordering::SeqCst) {
            self.retook.notify_one();
            match self.answer {
                RetakeAnswer::Late => tokio::time::sleep(SHORT_LEASE).await,
                RetakeAnswer::Lost => {
                    return Err(BackendError::with_detail(
                        BackendErrorKind::Timeout,
                        "the answer was lost",
                    ));
                }
            }
        }
        begin
    }

    async fn complete(
        &self,
        key: &Key,
        token: FencingToken,
        outcome: Bytes,
        retention: Duration,
    ) -> std::result::Result<Fenced, BackendError> {
        self.store.complete(key, token, outcome, retention).await
    }

    async fn extend(
        &self,
        key: &Key,
        token: FencingToken,
        lease: Duration,
    ) -> std::result::Result<Fenced, BackendError> {
        if self.vanished.swap(true, Ordering::SeqCst) {
            return self.store.extend(key, token, lease).await;
        }
        self.store.release(key, token).await?;
        self.retaking.store(true, Ordering::SeqCst);
        Ok(Fenced::Rejected)
    }

    async fn release(
        &self,
        key: &Key,
        token: FencingToken,
    ) -> std::result::Result<Fenced, BackendError> {
        self.store.release(key, token).await
    }

    async fn release_begun(
        &self,
        key: &Key,
        id: BeginId,
    ) -> std::result::Result<Fenced, BackendError> {
        self.store.release_begun(key, id).await
    }
}

fn vanishing_executor(store: &VanishingRecord) -> Idempotency<VanishingRecord> {
    Idempotency::builder(store.clone())
        .lease(SHORT_LEASE)
        .in_progress(InProgressPolicy::Reject)
        .build()
        .unwrap()
}

/// The record vanished and the begin taking the key back was still unanswered when the lease
/// ran out: the holder stops with `LeaseLost`, and the lease that begin took is released with
/// it, so a retry with the key runs at once rather than being told it is in progress.
#[tokio::test(start_paused = true)]
async fn a_lease_lost_while_taking_the_key_back_leaves_the_key_free() {
    let store = VanishingRecord::new(RetakeAnswer::Late);
    let idem = vanishing_executor(&store);
    let runs = AtomicUsize::new(0);
    let lost = idem
        .execute(&scope(), &key(), b"amount=100", || async {
            runs.fetch_add(1, Ordering::SeqCst);
            std::future::pending::<Result<String>>().await
        })
        .await;
    assert!(matches!(lost, Err(IdempotencyError::LeaseLost)), "{lost:?}");
    let retry = run_once(&idem, b"amount=100", &runs).await;
    assert_eq!(retry, Ok(("ran".to_owned(), false)), "the retry runs");
    assert_eq!(runs.into_inner(), 2);
}

/// A call dropped while the begin taking its vanished key back is unanswered releases the
/// lease that begin took, so a retry runs at once.
#[tokio::test(start_paused = true)]
async fn a_call_dropped_while_taking_the_key_back_leaves_the_key_free() {
    let store = VanishingRecord::new(RetakeAnswer::Late);
    let idem = vanishing_executor(&store);
    let runs = AtomicUsize::new(0);
    let (s, k) = (scope(), key());
    let mut call = Box::pin(idem.execute(&s, &k, b"amount=100", || async {
        runs.fetch_add(1, Ordering::SeqCst);
        std::future::pending::<Result<String>>().await
    }));
    tokio::select! {
        out = &mut call => panic!("the call ended: {out:?}"),
        () = store.retook.notified() => {}
    }
    drop(call);
    settle().await;
    let retry = run_once(&idem, b"amount=100", &runs).await;
    assert_eq!(retry, Ok(("ran".to_owned(), false)), "the retry runs");
    assert_eq!(runs.into_inner(), 2);
}

/// The begin taking the vanished key back ran but its answer was lost, and then the operation
/// failed: the error releases the lease that begin took, so a retry runs at once.
#[tokio::test(start_paused = true)]
async fn an_error_after_taking_the_key_back_unanswered_leaves_the_key_free() {
    let store = VanishingRecord::new(RetakeAnswer::Lost);
    let idem = vanishing_executor(&store);
    let runs = AtomicUsize::new(0);
    let (fail, failed) = oneshot::channel::<String>();
    let (s, k) = (scope(), key());
    let mut call = Box::pin(idem.execute(&s, &k, b"amount=100", || async {
        runs.fetch_add(1, Ordering::SeqCst);
        Result::<String>::Err(failed.await.unwrap())
    }));
    tokio::select! {
        out = &mut call => panic!("the call ended: {out:?}"),
        () = store.retook.notified() => {}
    }
    fail.send("declined".to_owned()).unwrap();
    let err = call.await.unwrap_err();
    assert!(
        matches!(&err, IdempotencyError::Operation(e) if e == "declined"),
        "{err:?}"
    );
    let retry = run_once(&idem, b"amount=100", &runs).await;
    assert_eq!(retry, Ok(("ran".to_owned(), false)), "the retry runs");
    assert_eq!(runs.into_inner(), 2);
}

#[test]
fn fenced_and_lease_lost_are_retryable() {
    let fenced = IdempotencyError::<BackendError>::Fenced;
    let lost = IdempotencyError::<BackendError>::LeaseLost;
    assert!(fenced.is_retryable(), "a retry replays the other outcome");
    assert!(lost.is_retryable(), "a retry runs again or replays");
    assert!(!fenced.is_timeout() && !fenced.is_rejected());
    assert!(!lost.is_timeout() && !lost.is_rejected());
}

#[test]
fn unavailable_is_retryable_as_its_store_error_is() {
    for (kind, retryable) in [
        (BackendErrorKind::Timeout, true),
        (BackendErrorKind::Connection, true),
        (BackendErrorKind::Unavailable, true),
        (BackendErrorKind::Config, false),
        (BackendErrorKind::Command, false),
        (BackendErrorKind::Protocol, false),
        (BackendErrorKind::TooLarge, false),
    ] {
        let err = IdempotencyError::<BackendError>::Unavailable(BackendError::new(kind));
        assert_eq!(err.is_retryable(), retryable, "{kind:?}");
        assert_eq!(
            err.is_timeout(),
            kind == BackendErrorKind::Timeout,
            "{kind:?}"
        );
    }
}

/// A store that cannot be reached.
#[derive(Debug)]
struct Down;

fn down() -> BackendError {
    BackendError::with_detail(BackendErrorKind::Connection, "the store is down")
}

impl LeaseStore for Down {
    async fn begin(
        &self,
        _: &Key,
        _: &[u8],
        _: Duration,
        _: BeginId,
    ) -> std::result::Result<Begin, BackendError> {
        Err(down())
    }

    async fn complete(
        &self,
        _: &Key,
        _: FencingToken,
        _: Bytes,
        _: Duration,
    ) -> std::result::Result<Fenced, BackendError> {
        Err(down())
    }

    async fn extend(
        &self,
        _: &Key,
        _: FencingToken,
        _: Duration,
    ) -> std::result::Result<Fenced, BackendError> {
        Err(down())
    }

    async fn release(&self, _: &Key, _: FencingToken) -> std::result::Result<Fenced, BackendError> {
        Err(down())
    }

    async fn release_begun(
        &self,
        _: &Key,
        _: BeginId,
    ) -> std::result::Result<Fenced, BackendError> {
        Err(down())
    }

    fn begin_completes_at_once(&self) -> bool {
        true
    }
}

/// Failing open, the operation runs without a record: its lease is not held and its token is
/// 0, which fences nothing (every token a store issues is greater).
#[tokio::test]
async fn failing_open_hands_the_operation_token_zero_and_a_lease_not_held() {
    let idem = Idempotency::builder(Down)
        .store_failure(StoreFailure::FailOpen)
        .build()
        .unwrap();
    let out = idem
        .execute_leased(&scope(), &key(), b"x", |lease| async move {
            Result::Ok((lease.token().0, lease.is_held()))
        })
        .await
        .unwrap();
    assert_eq!(out.value, (0, false));
    assert!(!out.replayed);
}

/// A server of its own (the test flushes it), and an executor over it.
async fn redis_executor(lease: Duration) -> (RedisServer, Idempotency<RedisLeaseStore>) {
    let server = RedisServer::start();
    let redis = Redis::connect(RedisConfig::standalone(server.url()))
        .await
        .unwrap();
    let idem = Idempotency::builder(RedisLeaseStore::new(redis))
        .lease(lease)
        .in_progress(InProgressPolicy::Reject)
        .build()
        .unwrap();
    (server, idem)
}

/// A request running on a task: `started` once its operation runs, which then returns what
/// `finish` is sent.
struct Started {
    started: oneshot::Receiver<()>,
    finish: oneshot::Sender<String>,
    holder: tokio::task::JoinHandle<Result<(String, bool)>>,
}

/// Starts the test's request with `body` on a task; its operation counts itself in `runs`.
fn start<S: LeaseStore>(
    idem: &Idempotency<S>,
    body: &'static [u8],
    runs: &Arc<AtomicUsize>,
) -> Started {
    let (started, has_started) = oneshot::channel::<()>();
    let (finish, finished) = oneshot::channel::<String>();
    let (idem, runs) = (idem.clone(), Arc::clone(runs));
    let holder = tokio::spawn(async move {
        idem.execute(&scope(), &key(), body, || async move {
            runs.fetch_add(1, Ordering::SeqCst);
            let _ = started.send(());
            Result::Ok(finished.await.unwrap_or_default())
        })
        .await
        .map(|out| (out.value, out.replayed))
        .map_err(|e| format!("{e:?}"))
    });
    Started {
        started: has_started,
        finish,
        holder,
    }
}

/// Waits, for at most 10 s, until `done` says so, checking every 10 ms.
async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    for _ in 0..1000 {
        if done() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("waited 10 s for {what}");
}

fn records(server: &RedisServer) -> Vec<String> {
    server
        .cli(&["--raw", "KEYS", "headroom:idempotency:*"])
        .lines()
        .filter(|name| !name.is_empty())
        .map(str::to_owned)
        .collect()
}

/// Redis lost the record while the operation ran (a restart without it, a flush): the holder's
/// outcome goes back to it and is stored, and a retry replays it without running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_a_record_flushed_while_the_operation_ran_keeps_its_outcome() {
    let (server, idem) = redis_executor(LEASE).await;
    let runs = Arc::new(AtomicUsize::new(0));
    let Started {
        started,
        finish,
        holder,
    } = start(&idem, b"amount=100", &runs);
    started.await.unwrap();
    server.cli(&["FLUSHALL"]);
    finish.send("ch_1".to_owned()).unwrap();
    assert_eq!(holder.await.unwrap(), Ok(("ch_1".to_owned(), false)));
    replays(&idem, b"amount=100", "ch_1").await;
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

/// Redis lost the record while the operation ran, and the lease keeper's next extension finds
/// it gone: nobody holds the key, so the holder takes it again and runs on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_a_holder_whose_record_was_flushed_extends_again_and_runs_on() {
    let (server, idem) = redis_executor(Duration::from_millis(600)).await;
    let runs = Arc::new(AtomicUsize::new(0));
    let Started {
        started,
        finish,
        holder,
    } = start(&idem, b"amount=100", &runs);
    started.await.unwrap();
    server.cli(&["FLUSHALL"]);
    // The next extension (a third of the lease on) finds the record gone.
    wait_until(
        "the record to be written again or the holder to end",
        || !records(&server).is_empty() || holder.is_finished(),
    )
    .await;
    let _ = finish.send("ch_1".to_owned());
    assert_eq!(holder.await.unwrap(), Ok(("ch_1".to_owned(), false)));
    replays(&idem, b"amount=100", "ch_1").await;
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

/// On Redis too, a lease that ran out (its deadline moved into the past, as the server's clock
/// would) is not taken over by a request with another body: that one is refused, and the
/// holder, still holding the record, stores its outcome.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_an_expired_lease_is_not_taken_over_by_another_request() {
    let (server, idem) = redis_executor(LEASE).await;
    let runs = Arc::new(AtomicUsize::new(0));
    let Started {
        started,
        finish,
        holder,
    } = start(&idem, b"amount=100", &runs);
    started.await.unwrap();
    let [record] = <[String; 1]>::try_from(records(&server)).unwrap();
    server.cli(&["HSET", &record, "exp", "1"]);

    let other = run_once(&idem, b"amount=999", &runs).await;
    assert_eq!(
        other,
        Err("KeyReused".to_owned()),
        "another request with the key"
    );
    assert_eq!(
        runs.load(Ordering::SeqCst),
        1,
        "another request ran under the key"
    );

    finish.send("ch_1".to_owned()).unwrap();
    assert_eq!(holder.await.unwrap(), Ok(("ch_1".to_owned(), false)));
    replays(&idem, b"amount=100", "ch_1").await;
}

async fn run_once<S: LeaseStore>(
    idem: &Idempotency<S>,
    body: &[u8],
    runs: &AtomicUsize,
) -> Result<(String, bool)> {
    idem.execute(&scope(), &key(), body, || async {
        runs.fetch_add(1, Ordering::SeqCst);
        Result::Ok("ran".to_owned())
    })
    .await
    .map(|out| (out.value, out.replayed))
    .map_err(|e| format!("{e:?}"))
}
