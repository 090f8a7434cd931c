//! Checks of the [`LeaseStore`] contract.

use std::time::{Duration, Instant};

use bytes::Bytes;
use headroom_core::lease::{Begin, BeginId, Fenced, FencingToken, LeaseStore};
use headroom_core::{BackendErrorKind, Key, MAX_DURATION, Namespace};

const LONG: Duration = Duration::from_secs(60);
const SHORT: Duration = Duration::from_millis(20);

fn key(ns: &Namespace) -> Key {
    ns.key("op").expect("valid test key")
}

async fn acquire<S: LeaseStore>(
    store: &S,
    key: &Key,
    fingerprint: &[u8],
    lease: Duration,
) -> (FencingToken, bool) {
    match store
        .begin(key, fingerprint, lease, BeginId::random())
        .await
        .expect("begin")
    {
        Begin::Acquired { token, took_over } => (token, took_over),
        other => panic!("expected the lease, got {other:?}"),
    }
}

/// Calls `begin` until the lease is acquired (the previous one expired on the store's clock),
/// bounded in time.
async fn acquire_after_expiry<S: LeaseStore>(
    store: &S,
    key: &Key,
    fingerprint: &[u8],
) -> (FencingToken, bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Begin::Acquired { token, took_over } = store
            .begin(key, fingerprint, LONG, BeginId::random())
            .await
            .expect("begin")
        {
            return (token, took_over);
        }
        assert!(
            Instant::now() < deadline,
            "a 20 ms lease or retention still held after 5 s"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A `begin` sent again by its id answers the token it took; any other begin, of the same
/// fingerprint too, sees the lease in progress; once released, the id takes a new lease like
/// any other begin.
pub async fn a_begin_sent_again_by_its_id_answers_its_token<S: LeaseStore>(
    store: &S,
    ns: Namespace,
) {
    let k = key(&ns);
    let id = BeginId::random();
    let Begin::Acquired { token, .. } = store.begin(&k, b"fp", LONG, id).await.expect("begin")
    else {
        panic!("a fresh key is acquired");
    };
    match store.begin(&k, b"fp", LONG, id).await.expect("begin") {
        Begin::Acquired {
            token: again,
            took_over,
        } => assert_eq!((again, took_over), (token, false)),
        other => panic!("expected the same lease, got {other:?}"),
    }
    assert!(
        matches!(
            store
                .begin(&k, b"fp", LONG, BeginId::random())
                .await
                .expect("begin"),
            Begin::InProgress { .. }
        ),
        "another begin sees the lease"
    );
    assert_eq!(
        store.release(&k, token).await.expect("release"),
        Fenced::Applied
    );
    match store.begin(&k, b"fp", LONG, id).await.expect("begin") {
        Begin::Acquired {
            token: next,
            took_over,
        } => assert!(next > token && !took_over, "{next:?} after {token:?}"),
        other => panic!("expected a new lease, got {other:?}"),
    }
}

/// `release_begun` releases the lease the begin named by its id took, and nothing else: not a
/// key that begin never took, another begin's lease, nor a completed record.
pub async fn release_begun_releases_only_that_begins_lease<S: LeaseStore>(
    store: &S,
    ns: Namespace,
) {
    let (k, id) = (key(&ns), BeginId::random());
    // A begin that never ran: nothing to release, and nothing taken.
    assert_eq!(
        store.release_begun(&k, id).await.expect("release_begun"),
        Fenced::Rejected
    );
    let (other, _) = acquire(store, &k, b"fp", LONG).await;
    assert_eq!(
        store.release_begun(&k, id).await.expect("release_begun"),
        Fenced::Rejected,
        "another begin's lease stays"
    );
    assert_eq!(
        store.release(&k, other).await.expect("release"),
        Fenced::Applied
    );
    let id = BeginId::random();
    let Begin::Acquired { token, .. } = store.begin(&k, b"fp", LONG, id).await.expect("begin")
    else {
        panic!("the released key is acquired");
    };
    assert_eq!(
        store.release_begun(&k, id).await.expect("release_begun"),
        Fenced::Applied
    );
    assert_eq!(
        store.extend(&k, token, LONG).await.expect("extend"),
        Fenced::Rejected,
        "the holder of a released lease is fenced"
    );
    let (next, took_over) = acquire(store, &k, b"fp", LONG).await;
    assert!(next > token && !took_over, "{next:?} after {token:?}");
    let completed = Bytes::from_static(b"done");
    assert_eq!(
        store
            .complete(&k, next, completed, LONG)
            .await
            .expect("complete"),
        Fenced::Applied
    );
    let id = BeginId::random();
    assert!(matches!(
        store.begin(&k, b"fp", LONG, id).await.expect("begin"),
        Begin::Completed { .. }
    ));
    assert_eq!(
        store.release_begun(&k, id).await.expect("release_begun"),
        Fenced::Rejected,
        "a completed record stays"
    );
}

/// On a store whose `begin` can be overtaken (its answer comes over a wire), a begin that
/// reaches the store after `release_begun` of its id (a copy the client library sent again,
/// or one held on a slow connection while the release went on another) takes nothing and is
/// refused as a command: whether the key was free, held by that begin, or held by another that
/// let it go since. A store whose `begin` completes at once cannot be overtaken.
pub async fn a_begin_that_reaches_the_store_after_its_release_takes_nothing<S: LeaseStore>(
    store: &S,
    ns: Namespace,
) {
    if store.begin_completes_at_once() {
        return;
    }
    let overtaken = |what: &str, begin: Result<Begin, headroom_core::BackendError>| match begin {
        Err(error) => assert_eq!(error.kind(), BackendErrorKind::Command, "{what}: {error}"),
        Ok(other) => panic!("{what}: a begin after its release took {other:?}"),
    };
    let free = |k: Key| async move {
        let (_, took_over) = acquire(store, &k, b"fp", LONG).await;
        assert!(!took_over, "the key was free");
    };

    let (k, id) = (
        ns.key("never-ran").expect("valid test key"),
        BeginId::random(),
    );
    assert_eq!(
        store.release_begun(&k, id).await.expect("release_begun"),
        Fenced::Rejected
    );
    overtaken("a free key", store.begin(&k, b"fp", LONG, id).await);
    free(k).await;

    let (k, id) = (
        ns.key("sent-twice").expect("valid test key"),
        BeginId::random(),
    );
    assert!(matches!(
        store.begin(&k, b"fp", LONG, id).await.expect("begin"),
        Begin::Acquired { .. }
    ));
    assert_eq!(
        store.release_begun(&k, id).await.expect("release_begun"),
        Fenced::Applied
    );
    overtaken(
        "its own lease released",
        store.begin(&k, b"fp", LONG, id).await,
    );
    free(k).await;

    // Two begins released in turn: the first one's copy takes nothing either.
    let (k, first, second) = (
        ns.key("released-twice").expect("valid test key"),
        BeginId::random(),
        BeginId::random(),
    );
    for id in [first, second] {
        assert_eq!(
            store.release_begun(&k, id).await.expect("release_begun"),
            Fenced::Rejected
        );
    }
    overtaken(
        "the first of two released",
        store.begin(&k, b"fp", LONG, first).await,
    );
    free(k).await;

    let (k, id) = (
        ns.key("other-holder").expect("valid test key"),
        BeginId::random(),
    );
    let (other, _) = acquire(store, &k, b"fp", LONG).await;
    assert_eq!(
        store.release_begun(&k, id).await.expect("release_begun"),
        Fenced::Rejected
    );
    assert_eq!(
        store.release(&k, other).await.expect("release"),
        Fenced::Applied
    );
    overtaken(
        "another's lease released",
        store.begin(&k, b"fp", LONG, id).await,
    );
    free(k).await;
}

/// The first `begin` acquires; a second one sees the live lease and its fingerprint.
pub async fn first_begin_acquires_and_the_next_sees_it_in_progress<S: LeaseStore>(
    store: &S,
    ns: Namespace,
) {
    let k = key(&ns);
    let (_, took_over) = acquire(store, &k, b"fp-1", LONG).await;
    assert!(!took_over);
    match store
        .begin(&k, b"fp-2", LONG, BeginId::random())
        .await
        .expect("begin")
    {
        Begin::InProgress {
            fingerprint,
            lease_remaining,
        } => {
            assert_eq!(fingerprint, Bytes::from_static(b"fp-1"));
            assert!(
                lease_remaining > Duration::ZERO && lease_remaining <= LONG,
                "{lease_remaining:?}"
            );
        }
        other => panic!("expected in progress, got {other:?}"),
    }
}

/// A completed record replays its outcome and the fingerprint that produced it.
pub async fn completed_outcome_is_replayed<S: LeaseStore>(store: &S, ns: Namespace) {
    let k = key(&ns);
    let (token, _) = acquire(store, &k, b"fp", LONG).await;
    let outcome = Bytes::from_static(b"\x00receipt\xff");
    assert_eq!(
        store
            .complete(&k, token, outcome.clone(), LONG)
            .await
            .expect("complete"),
        Fenced::Applied
    );
    for _ in 0..2 {
        assert_eq!(
            store
                .begin(&k, b"other", LONG, BeginId::random())
                .await
                .expect("begin"),
            Begin::Completed {
                fingerprint: Bytes::from_static(b"fp"),
                outcome: outcome.clone()
            }
        );
    }
}

/// A completion repeated by its holder (its first answer lost on the way, say to a timeout)
/// is applied again and keeps the outcome, so the holder is not told it was taken over; any
/// other token is still refused.
pub async fn a_completion_repeated_by_its_holder_is_applied<S: LeaseStore>(
    store: &S,
    ns: Namespace,
) {
    let k = key(&ns);
    let (token, _) = acquire(store, &k, b"fp", LONG).await;
    let outcome = Bytes::from_static(b"receipt");
    for _ in 0..2 {
        assert_eq!(
            store
                .complete(&k, token, outcome.clone(), LONG)
                .await
                .expect("complete"),
            Fenced::Applied
        );
    }
    let wrong = FencingToken(token.0.wrapping_add(1_000_000));
    assert_eq!(
        store
            .complete(&k, wrong, "x".into(), LONG)
            .await
            .expect("complete"),
        Fenced::Rejected
    );
    assert_eq!(
        store
            .begin(&k, b"fp", LONG, BeginId::random())
            .await
            .expect("begin"),
        Begin::Completed {
            fingerprint: Bytes::from_static(b"fp"),
            outcome
        }
    );
}

/// A token that does not hold the lease changes nothing.
pub async fn foreign_tokens_are_rejected<S: LeaseStore>(store: &S, ns: Namespace) {
    let k = key(&ns);
    let (token, _) = acquire(store, &k, b"fp", LONG).await;
    let wrong = FencingToken(token.0.wrapping_add(1_000_000));
    assert_eq!(
        store
            .complete(&k, wrong, "x".into(), LONG)
            .await
            .expect("complete"),
        Fenced::Rejected
    );
    assert_eq!(
        store.extend(&k, wrong, LONG).await.expect("extend"),
        Fenced::Rejected
    );
    assert_eq!(
        store.release(&k, wrong).await.expect("release"),
        Fenced::Rejected
    );
    assert!(matches!(
        store
            .begin(&k, b"fp", LONG, BeginId::random())
            .await
            .expect("begin"),
        Begin::InProgress { .. }
    ));
    let missing = ns.key("missing").expect("key");
    assert_eq!(
        store
            .complete(&missing, token, "x".into(), LONG)
            .await
            .expect("complete"),
        Fenced::Rejected
    );
}

/// A released lease lets the next `begin` run again, with a greater token.
pub async fn released_lease_can_be_taken_again_with_a_greater_token<S: LeaseStore>(
    store: &S,
    ns: Namespace,
) {
    let k = key(&ns);
    let (first, _) = acquire(store, &k, b"fp", LONG).await;
    assert_eq!(
        store.release(&k, first).await.expect("release"),
        Fenced::Applied
    );
    let (second, took_over) = acquire(store, &k, b"fp", LONG).await;
    assert!(second > first, "{second:?} after {first:?}");
    assert!(!took_over);
    assert_eq!(
        store
            .complete(&k, first, "late".into(), LONG)
            .await
            .expect("complete"),
        Fenced::Rejected
    );
}

/// An expired lease is taken over with a greater token; the old holder is fenced and the new
/// holder's outcome stands.
pub async fn expired_lease_is_taken_over_and_the_old_holder_fenced<S: LeaseStore>(
    store: &S,
    ns: Namespace,
) {
    let k = key(&ns);
    let (old, _) = acquire(store, &k, b"fp", SHORT).await;
    let (new, _) = acquire_after_expiry(store, &k, b"fp").await;
    assert!(new > old, "{new:?} after {old:?}");
    assert_eq!(
        store
            .complete(&k, old, "old".into(), LONG)
            .await
            .expect("complete"),
        Fenced::Rejected
    );
    assert_eq!(
        store.extend(&k, old, LONG).await.expect("extend"),
        Fenced::Rejected
    );
    assert_eq!(
        store
            .complete(&k, new, "new".into(), LONG)
            .await
            .expect("complete"),
        Fenced::Applied
    );
    assert_eq!(
        store
            .begin(&k, b"fp", LONG, BeginId::random())
            .await
            .expect("begin"),
        Begin::Completed {
            fingerprint: Bytes::from_static(b"fp"),
            outcome: Bytes::from_static(b"new")
        }
    );
}

/// An expired lease is taken over only by a begin with its fingerprint: the run it stood for
/// may have taken effect, so a begin with another fingerprint is answered the record's (in
/// progress, no time left) and changes nothing; one with the same fingerprint takes it over.
pub async fn an_expired_lease_is_taken_over_only_with_its_fingerprint<S: LeaseStore>(
    store: &S,
    ns: Namespace,
) {
    let k = key(&ns);
    let (old, _) = acquire(store, &k, b"fp-1", SHORT).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match store
            .begin(&k, b"fp-2", LONG, BeginId::random())
            .await
            .expect("begin")
        {
            Begin::InProgress {
                fingerprint,
                lease_remaining,
            } => {
                assert_eq!(fingerprint, Bytes::from_static(b"fp-1"));
                if lease_remaining.is_zero() {
                    break;
                }
            }
            other => panic!("a begin with another fingerprint took {other:?}"),
        }
        assert!(
            Instant::now() < deadline,
            "a 20 ms lease still held after 5 s"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let (new, _) = acquire(store, &k, b"fp-1", LONG).await;
    assert!(new > old, "{new:?} after {old:?}");
    assert_eq!(
        store
            .complete(&k, old, "old".into(), LONG)
            .await
            .expect("complete"),
        Fenced::Rejected
    );
}

/// A holder that stalled past its lease while nobody took over extends it again and
/// completes: the store keeps its record past the lease (for the lease again, at least a
/// second), whatever other keys begin meanwhile.
pub async fn a_holder_past_its_lease_runs_on_while_nobody_took_over<S: LeaseStore>(
    store: &S,
    ns: Namespace,
) {
    let (k, probe) = (key(&ns), ns.key("probe").expect("valid test key"));
    let (token, _) = acquire(store, &k, b"fp", SHORT).await;
    acquire(store, &probe, b"fp", SHORT).await;
    // The probe's lease began later: once it is taken again, the holder's lease has passed.
    acquire_after_expiry(store, &probe, b"fp").await;
    // A new key begins meanwhile (a busy store).
    acquire(
        store,
        &ns.key("other").expect("valid test key"),
        b"fp",
        LONG,
    )
    .await;
    assert_eq!(
        store.extend(&k, token, LONG).await.expect("extend"),
        Fenced::Applied
    );
    assert_eq!(
        store
            .complete(&k, token, "done".into(), LONG)
            .await
            .expect("complete"),
        Fenced::Applied
    );
}

/// `extend` by the holder keeps the lease; a completed record cannot be extended or released.
pub async fn holder_extends_its_lease<S: LeaseStore>(store: &S, ns: Namespace) {
    let k = key(&ns);
    let (token, _) = acquire(store, &k, b"fp", LONG).await;
    assert_eq!(
        store.extend(&k, token, LONG).await.expect("extend"),
        Fenced::Applied
    );
    match store
        .begin(&k, b"fp", LONG, BeginId::random())
        .await
        .expect("begin")
    {
        Begin::InProgress {
            lease_remaining, ..
        } => assert!(lease_remaining > LONG / 2),
        other => panic!("expected in progress, got {other:?}"),
    }
    assert_eq!(
        store
            .complete(&k, token, "done".into(), LONG)
            .await
            .expect("complete"),
        Fenced::Applied
    );
    assert_eq!(
        store.extend(&k, token, LONG).await.expect("extend"),
        Fenced::Rejected
    );
    assert_eq!(
        store.release(&k, token).await.expect("release"),
        Fenced::Rejected
    );
}

/// A completed record is forgotten after its retention.
pub async fn completed_record_expires_after_retention<S: LeaseStore>(store: &S, ns: Namespace) {
    let k = key(&ns);
    let (token, _) = acquire(store, &k, b"fp", LONG).await;
    assert_eq!(
        store
            .complete(&k, token, "done".into(), SHORT)
            .await
            .expect("complete"),
        Fenced::Applied
    );
    let (next, _) = acquire_after_expiry(store, &k, b"fp").await;
    assert!(next > token);
}

/// Of many concurrent `begin`s on one key, exactly one acquires the lease.
pub async fn concurrent_begins_acquire_exactly_once<S: LeaseStore>(store: &S, ns: Namespace) {
    let k = key(&ns);
    let attempts = (0..64).map(|_| store.begin(&k, b"fp", LONG, BeginId::random()));
    let answers = futures_util::future::join_all(attempts).await;
    let acquired = answers
        .iter()
        .filter(|a| matches!(a, Ok(Begin::Acquired { .. })))
        .count();
    assert_eq!(acquired, 1, "{answers:?}");
    assert!(
        answers
            .iter()
            .all(|a| matches!(a, Ok(Begin::Acquired { .. } | Begin::InProgress { .. })))
    );
}

/// Records of different keys are independent.
pub async fn keys_are_independent<S: LeaseStore>(store: &S, ns: Namespace) {
    let a = ns.key("a").expect("key");
    let b = ns.key("b").expect("key");
    let (token_a, _) = acquire(store, &a, b"fp", LONG).await;
    acquire(store, &b, b"fp", LONG).await;
    assert_eq!(
        store
            .complete(&b, token_a, "x".into(), LONG)
            .await
            .expect("complete"),
        Fenced::Rejected
    );
}

/// A lease or retention under a millisecond or over [`MAX_DURATION`] is a configuration error,
/// and changes nothing: the key stays free, and a holder still holds its lease. The longest
/// durations accepted are kept.
pub async fn durations_outside_what_the_store_keeps_are_refused<S: LeaseStore>(
    store: &S,
    ns: Namespace,
) {
    let key = key(&ns);
    let too_long = [
        MAX_DURATION + Duration::from_millis(1),
        Duration::from_millis(u64::MAX),
        Duration::MAX,
    ];
    for lease in [Duration::ZERO, Duration::from_micros(999)]
        .into_iter()
        .chain(too_long)
    {
        let err = store
            .begin(&key, b"fp", lease, BeginId::random())
            .await
            .expect_err("refused");
        assert_eq!(err.kind(), BackendErrorKind::Config, "{lease:?}");
    }
    let (token, _) = acquire(store, &key, b"fp", MAX_DURATION).await;
    for long in too_long {
        let err = store.extend(&key, token, long).await.expect_err("refused");
        assert_eq!(err.kind(), BackendErrorKind::Config, "{long:?}");
        let err = store
            .complete(&key, token, Bytes::from_static(b"out"), long)
            .await
            .expect_err("refused");
        assert_eq!(err.kind(), BackendErrorKind::Config, "{long:?}");
    }
    assert_eq!(
        store
            .extend(&key, token, MAX_DURATION)
            .await
            .expect("extend"),
        Fenced::Applied
    );
    assert_eq!(
        store
            .complete(&key, token, Bytes::from_static(b"out"), MAX_DURATION)
            .await
            .expect("complete"),
        Fenced::Applied
    );
}
