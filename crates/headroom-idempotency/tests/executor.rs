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
}
