//! Checks of the [`JobStore`] contract.
//!
//! The store must run on real time (its own clock): some checks wait for short delays,
//! visibility timeouts and retentions, each in a loop bounded by a deadline.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use headroom_core::jobs::{
    Completion, DRAIN_WINDOW, Delivery, EnqueueLimits, Enqueued, FetchRequest, JobNumber, JobState,
    JobStore, MAX_LANES, NewJob,
};
use headroom_core::lease::Fenced;
use headroom_core::{Key, Namespace};

const LONG: Duration = Duration::from_secs(60);
const WAIT_BOUND: Duration = Duration::from_secs(10);

fn partition(ns: &Namespace, name: &str) -> Key {
    ns.key(format!("{{{name}}}")).expect("valid test key")
}

fn limits(max_len: u64) -> EnqueueLimits {
    EnqueueLimits {
        max_len,
        max_per_tenant: None,
        dedup_window: LONG,
    }
}

fn job(payload: &'static str) -> NewJob {
    NewJob::new(Bytes::from_static(payload.as_bytes()))
}

async fn add<S: JobStore>(store: &S, p: &Key, job: &NewJob) -> JobNumber {
    match store
        .enqueue(p, job, &limits(1_000))
        .await
        .expect("enqueue")
    {
        Enqueued::Added(number) => number,
        other => panic!("expected the job to be added, got {other:?}"),
    }
}

async fn fetch<S: JobStore>(
    store: &S,
    p: &Key,
    consumer: &str,
    lanes: &[u8],
    max: usize,
    visibility: Duration,
) -> Vec<Delivery> {
    store
        .fetch(
            p,
            FetchRequest {
                consumer,
                lanes,
                max,
                visibility,
            },
        )
        .await
        .expect("fetch")
}

/// Fetches until something is delivered, bounded in time.
async fn fetch_eventually<S: JobStore>(
    store: &S,
    p: &Key,
    consumer: &str,
    visibility: Duration,
) -> Vec<Delivery> {
    let deadline = Instant::now() + WAIT_BOUND;
    loop {
        let delivered = fetch(store, p, consumer, &[0], 10, visibility).await;
        if !delivered.is_empty() {
            return delivered;
        }
        assert!(Instant::now() < deadline, "nothing delivered within 10 s");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_millis() as u64
}

/// A job goes queued → running → done; its payload, lane and tenant travel with it, its
/// result is kept, and a second completion is rejected.
pub async fn jobs_round_trip_through_their_states<S: JobStore>(store: &S, ns: Namespace) {
    let p = partition(&ns, "q");
    let before = unix_ms();
    let number = add(store, &p, &job("charge 7").lane(2).tenant("acme")).await;
    let queued = store
        .status(&p, number)
        .await
        .expect("status")
        .expect("kept");
    assert_eq!(queued.state, JobState::Queued);
    assert_eq!(queued.attempt, 0);
    assert_eq!(queued.payload.as_deref(), Some(&b"charge 7"[..]));

    let [delivery] = <[Delivery; 1]>::try_from(fetch(store, &p, "a", &[2], 10, LONG).await)
        .expect("one delivery");
    assert_eq!(delivery.number, number);
    assert_eq!(delivery.attempt, 1);
    assert_eq!(delivery.lane, 2);
    assert_eq!(&delivery.payload[..], b"charge 7");
    assert_eq!(delivery.tenant.as_deref(), Some(&b"acme"[..]));
    assert!(!delivery.taken_over);
    // The store's clock (Redis server time) may differ from this process's by a little.
    assert!(
        delivery.enqueued_at_ms + 1_000 >= before && delivery.enqueued_at_ms <= unix_ms() + 1_000,
        "enqueued at {} ms, test clock {before} ms",
        delivery.enqueued_at_ms
    );
    let running = store
        .status(&p, number)
        .await
        .expect("status")
        .expect("kept");
    assert_eq!(running.state, JobState::Running);
    assert_eq!(running.attempt, 1);
    assert_eq!(running.tenant.as_deref(), Some(&b"acme"[..]));

    let done = store
        .complete(&p, number, 1, Bytes::from_static(b"ok"), LONG)
        .await
        .expect("complete");
    assert_eq!(done, Fenced::Applied);
    let record = store
        .status(&p, number)
        .await
        .expect("status")
        .expect("kept");
    assert_eq!(record.state, JobState::Done);
    assert_eq!(record.result.as_deref(), Some(&b"ok"[..]));
    assert_eq!(record.payload, None);
    assert_eq!(store.stats(&p).await.expect("stats").unfinished, 0);
    let again = store
        .complete(&p, number, 1, Bytes::from_static(b"twice"), LONG)
        .await
        .expect("complete");
    assert_eq!(again, Fenced::Rejected);
    assert!(fetch(store, &p, "a", &[2], 10, LONG).await.is_empty());
}

/// Numbers grow within a partition, and partitions share nothing.
pub async fn numbers_grow_and_partitions_are_apart<S: JobStore>(store: &S, ns: Namespace) {
    let p = partition(&ns, "one");
    let other = partition(&ns, "two");
    let first = add(store, &p, &job("a")).await;
    let second = add(store, &p, &job("b")).await;
    assert!(second > first);
    assert!(fetch(store, &other, "a", &[0], 10, LONG).await.is_empty());
    assert_eq!(store.status(&other, first).await.expect("status"), None);
    assert_eq!(store.stats(&other).await.expect("stats").unfinished, 0);
    assert_eq!(store.stats(&p).await.expect("stats").unfinished, 2);
}

/// 50 concurrent enqueues on a bound of 10: exactly 10 are added, the rest refused with the
/// depth; as jobs finish, exactly as many are accepted again.
pub async fn enqueue_never_passes_the_bound_under_concurrency<S: JobStore + Clone>(
    store: &S,
    ns: Namespace,
) {
    let p = Arc::new(partition(&ns, "q"));
    let tasks: Vec<_> = (0..50)
        .map(|i| {
            let (store, p) = (store.clone(), Arc::clone(&p));
            tokio::spawn(async move {
                store
                    .enqueue(&p, &NewJob::new(Bytes::from(format!("{i}"))), &limits(10))
                    .await
                    .expect("enqueue")
            })
        })
        .collect();
    let mut added = 0;
    for task in tasks {
        match task.await.expect("enqueue task") {
            Enqueued::Added(_) => added += 1,
            Enqueued::Full {
                tenant,
                depth,
                unfinished,
                ..
            } => {
                assert!(!tenant);
                assert_eq!((depth, unfinished), (10, 10));
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(added, 10);
    for delivery in fetch(store, &p, "a", &[0], 3, LONG).await {
        let applied = store
            .complete(&p, delivery.number, delivery.attempt, Bytes::new(), LONG)
            .await
            .expect("complete");
        assert_eq!(applied, Fenced::Applied);
    }
    let mut accepted = 0;
    for _ in 0..5 {
        if let Enqueued::Added(_) = store
            .enqueue(&p, &job("again"), &limits(10))
            .await
            .expect("enqueue")
        {
            accepted += 1;
        }
    }
    assert_eq!(accepted, 3);
}

/// A tenant at its bound is refused while other tenants, and jobs without one, are not. The
/// refusal counts the partition's unfinished jobs of every tenant.
pub async fn a_tenant_at_its_bound_is_refused_alone<S: JobStore>(store: &S, ns: Namespace) {
    let p = partition(&ns, "q");
    let bounded = EnqueueLimits {
        max_per_tenant: Some(2),
        ..limits(100)
    };
    for _ in 0..2 {
        let answer = store
            .enqueue(&p, &job("a").tenant("acme"), &bounded)
            .await
            .expect("enqueue");
        assert!(matches!(answer, Enqueued::Added(_)), "{answer:?}");
    }
    for other in [job("b").tenant("initech"), job("none")] {
        let answer = store.enqueue(&p, &other, &bounded).await.expect("enqueue");
        assert!(matches!(answer, Enqueued::Added(_)), "{answer:?}");
    }
    match store
        .enqueue(&p, &job("a").tenant("acme"), &bounded)
        .await
        .expect("enqueue")
    {
        Enqueued::Full {
            tenant,
            depth,
            unfinished,
            ..
        } => assert!(
            tenant && depth == 2 && unfinished == 4,
            "{tenant} {depth} {unfinished}"
        ),
        other => panic!("expected the tenant to be full, got {other:?}"),
    }
    for other in [job("b").tenant("globex"), job("none")] {
        let answer = store.enqueue(&p, &other, &bounded).await.expect("enqueue");
        assert!(matches!(answer, Enqueued::Added(_)), "{answer:?}");
    }
    // A finished job frees its tenant's place.
    let delivered = fetch(store, &p, "a", &[0], 1, LONG).await;
    assert_eq!(delivered[0].tenant.as_deref(), Some(&b"acme"[..]));
    store
        .complete(&p, delivered[0].number, 1, Bytes::new(), LONG)
        .await
        .expect("complete");
    let answer = store
        .enqueue(&p, &job("a").tenant("acme"), &bounded)
        .await
        .expect("enqueue");
    assert!(matches!(answer, Enqueued::Added(_)), "{answer:?}");
}

/// A second enqueue with one dedup key returns the first number, even when the partition is
/// full, and adds nothing.
pub async fn a_duplicate_returns_the_first_number_even_when_full<S: JobStore>(
    store: &S,
    ns: Namespace,
) {
    let p = partition(&ns, "q");
    let first = match store
        .enqueue(&p, &job("pay").dedup_key("order-1"), &limits(1))
        .await
        .expect("enqueue")
    {
        Enqueued::Added(number) => number,
        other => panic!("{other:?}"),
    };
    for _ in 0..3 {
        let answer = store
            .enqueue(&p, &job("pay again").dedup_key("order-1"), &limits(1))
            .await
            .expect("enqueue");
        assert_eq!(answer, Enqueued::Duplicate(first));
    }
    assert!(matches!(
        store
            .enqueue(&p, &job("pay").dedup_key("order-2"), &limits(1))
            .await
            .expect("enqueue"),
        Enqueued::Full { .. }
    ));
    assert_eq!(store.stats(&p).await.expect("stats").unfinished, 1);
    let delivered = fetch(store, &p, "a", &[0], 10, LONG).await;
    assert_eq!(delivered.len(), 1);
    assert_eq!(&delivered[0].payload[..], b"pay");
}

/// A dedup key is forgotten once its window has passed.
pub async fn a_dedup_key_is_forgotten_after_its_window<S: JobStore>(store: &S, ns: Namespace) {
    let p = partition(&ns, "q");
    let short = EnqueueLimits {
        dedup_window: Duration::from_millis(100),
        ..limits(100)
    };
    let first = store
        .enqueue(&p, &job("a").dedup_key("k"), &short)
        .await
        .expect("enqueue");
    let deadline = Instant::now() + WAIT_BOUND;
    loop {
        match store
            .enqueue(&p, &job("a").dedup_key("k"), &short)
            .await
            .expect("enqueue")
        {
            Enqueued::Added(number) => {
                assert_ne!(Enqueued::Added(number), first);
                return;
            }
            Enqueued::Duplicate(_) => {}
            other => panic!("{other:?}"),
        }
        assert!(Instant::now() < deadline, "a 100 ms window held for 10 s");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A refusal carries the partition's drain rate: zero before anything finished, and about the
/// jobs finished over the last window after.
pub async fn a_refusal_carries_the_drain_rate<S: JobStore>(store: &S, ns: Namespace) {
    let p = partition(&ns, "q");
    for _ in 0..5 {
        add(store, &p, &job("a")).await;
    }
    let rate = |answer: Enqueued| match answer {
        Enqueued::Full {
            drained_per_sec, ..
        } => drained_per_sec,
        other => panic!("expected a refusal, got {other:?}"),
    };
    let idle = rate(
        store
            .enqueue(&p, &job("b"), &limits(5))
            .await
            .expect("enqueue"),
    );
    assert_eq!(idle, 0.0);
    for delivery in fetch(store, &p, "a", &[0], 10, LONG).await {
        store
            .complete(&p, delivery.number, delivery.attempt, Bytes::new(), LONG)
            .await
            .expect("complete");
    }
    for _ in 0..5 {
        add(store, &p, &job("a")).await;
    }
    let drained = rate(
        store
            .enqueue(&p, &job("b"), &limits(5))
            .await
            .expect("enqueue"),
    );
    let most = 5.0 / DRAIN_WINDOW.as_secs_f64();
    assert!(
        drained > 0.0 && drained <= most * 1.001,
        "5 jobs finished just now: {drained}/s, expected at most {most}/s"
    );
}

/// Lanes are read in the order asked, each oldest first; lanes not asked for are not read.
pub async fn lanes_are_read_in_the_order_asked<S: JobStore>(store: &S, ns: Namespace) {
    let p = partition(&ns, "q");
    let a = add(store, &p, &job("a").lane(1)).await;
    let b = add(store, &p, &job("b").lane(0)).await;
    let c = add(store, &p, &job("c").lane(1)).await;
    let d = add(store, &p, &job("d").lane(0)).await;
    assert!(fetch(store, &p, "w", &[3], 10, LONG).await.is_empty());
    let numbers = |ds: Vec<Delivery>| ds.iter().map(|d| d.number).collect::<Vec<_>>();
    assert_eq!(
        numbers(fetch(store, &p, "w", &[0, 1], 3, LONG).await),
        [b, d, a]
    );
    assert_eq!(numbers(fetch(store, &p, "w", &[1, 0], 3, LONG).await), [c]);
    let out_of_range = store
        .enqueue(&p, &job("x").lane(MAX_LANES), &limits(100))
        .await;
    assert!(out_of_range.is_err(), "{out_of_range:?}");
}

/// A delayed job is not delivered before its delay and is after it; meanwhile it is queued.
pub async fn a_delayed_job_waits_for_its_delay<S: JobStore>(store: &S, ns: Namespace) {
    let p = partition(&ns, "q");
    let start = Instant::now();
    let number = add(store, &p, &job("later").delay(Duration::from_millis(300))).await;
    assert!(fetch(store, &p, "w", &[0], 10, LONG).await.is_empty());
    let record = store
        .status(&p, number)
        .await
        .expect("status")
        .expect("kept");
    assert_eq!(record.state, JobState::Queued);
    assert_eq!(store.stats(&p).await.expect("stats").delayed, 1);
    let delivered = fetch_eventually(store, &p, "w", LONG).await;
    assert_eq!(delivered[0].number, number);
    // The store's clock and this one both run in real time; allow for their rounding.
    assert!(
        start.elapsed() >= Duration::from_millis(290),
        "delivered after {:?}",
        start.elapsed()
    );
}

/// A delivery whose visibility runs out is taken over by another consumer with the next
/// attempt, and the first holder's steps are rejected.
pub async fn an_expired_visibility_is_taken_over_and_the_old_holder_fenced<S: JobStore>(
    store: &S,
    ns: Namespace,
) {
    let p = partition(&ns, "q");
    let number = add(store, &p, &job("a")).await;
    let visibility = Duration::from_millis(200);
    let first = fetch(store, &p, "dies", &[0], 10, visibility).await;
    assert_eq!(first.len(), 1);
    assert!(
        fetch(store, &p, "lives", &[0], 10, visibility)
            .await
            .is_empty()
    );
    let taken = fetch_eventually(store, &p, "lives", visibility).await;
    assert_eq!(taken.len(), 1);
    assert_eq!(taken[0].number, number);
    assert_eq!(taken[0].attempt, 2);
    assert!(taken[0].taken_over);
    assert_eq!(&taken[0].payload[..], b"a");
    for stale in [
        store.extend(&p, number, 1).await,
        store.complete(&p, number, 1, Bytes::new(), LONG).await,
        store
            .retry(&p, number, 1, Duration::ZERO, Bytes::new())
            .await,
        store.bury(&p, number, 1, Bytes::new(), LONG).await,
    ] {
        assert_eq!(stale.expect("step"), Fenced::Rejected);
    }
    let applied = store
        .complete(&p, number, 2, Bytes::new(), LONG)
        .await
        .expect("complete");
    assert_eq!(applied, Fenced::Applied);
}

/// A delivery is kept for the visibility its holder fetched it with: a worker fetching with a
/// shorter one (another version of a service, during a deploy) does not take it over sooner.
/// Once the holder's visibility lapsed, it does.
pub async fn a_delivery_is_kept_for_its_holders_visibility_whatever_the_fetchers<S: JobStore>(
    store: &S,
    ns: Namespace,
) {
    let p = partition(&ns, "q");
    let number = add(store, &p, &job("a")).await;
    let (holders, short) = (Duration::from_secs(3), Duration::from_millis(20));
    let start = Instant::now();
    assert_eq!(fetch(store, &p, "long", &[0], 10, holders).await.len(), 1);
    // Well past the short visibility, and within the holder's.
    while start.elapsed() < Duration::from_millis(500) {
        assert!(
            fetch(store, &p, "short", &[0], 10, short).await.is_empty(),
            "taken over {:?} into a hold of {holders:?}",
            start.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let taken = fetch_eventually(store, &p, "short", short).await;
    // Stores count idle time in whole milliseconds, so up to one early by this clock.
    assert!(
        start.elapsed() + Duration::from_millis(2) >= holders,
        "taken over after {:?}",
        start.elapsed()
    );
    assert_eq!((taken[0].number, taken[0].attempt), (number, 2));
    assert_eq!(
        store.extend(&p, number, 1).await.expect("extend"),
        Fenced::Rejected
    );
}

/// A lapsed delivery is taken over even behind more deliveries than a fetch asks for, and
/// more than a store looks through at once, that are idle past the fetcher's visibility but
/// within their holders' longer one (a fleet of older workers during a deploy): those are
/// passed over, not counted against the fetch.
pub async fn a_lapsed_delivery_is_taken_over_behind_longer_holds<S: JobStore>(
    store: &S,
    ns: Namespace,
) {
    let p = partition(&ns, "q");
    const HELD: usize = 1_001;
    let mut numbers = Vec::with_capacity(HELD + 1);
    for payload in std::iter::repeat_n("held", HELD).chain(["lapsed"]) {
        match store.enqueue(&p, &job(payload), &limits(2_000)).await {
            Ok(Enqueued::Added(number)) => numbers.push(number),
            other => panic!("expected the job to be added, got {other:?}"),
        }
    }
    let lapsed = numbers[HELD];
    let short = Duration::from_millis(50);
    assert_eq!(fetch(store, &p, "old", &[0], HELD, LONG).await.len(), HELD);
    assert_eq!(fetch(store, &p, "gone", &[0], 1, short).await.len(), 1);
    let start = Instant::now();
    let taken = loop {
        let taken = fetch(store, &p, "new", &[0], 2, short).await;
        if !taken.is_empty() {
            break taken;
        }
        assert!(
            start.elapsed() < WAIT_BOUND,
            "the lapsed delivery was not taken over within {WAIT_BOUND:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(
        taken
            .iter()
            .map(|d| (d.number, d.attempt))
            .collect::<Vec<_>>(),
        [(lapsed, 2)]
    );
}

/// The newest job of a subject is found while it is unfinished (queued, running or
/// retrying), whatever its older ones do; once it is done or dead, nothing is, even while an
/// older one of the subject is still unfinished.
pub async fn the_newest_job_of_a_subject_is_found_while_unfinished<S: JobStore>(
    store: &S,
    ns: Namespace,
) {
    let p = partition(&ns, "q");
    let newest = |subject: &'static str| {
        let p = p.clone();
        async move {
            store
                .newest_of(&p, subject.as_bytes())
                .await
                .expect("newest_of")
        }
    };
    let about = |payload: &'static str, subject: &'static str| job(payload).subject(subject);
    assert_eq!(newest("ada").await, None);
    let first = add(store, &p, &about("ada 1", "ada")).await;
    assert_eq!(
        newest("ada").await,
        Some((first, Bytes::from_static(b"ada 1")))
    );
    let second = add(store, &p, &about("ada 2", "ada")).await;
    let bob = add(store, &p, &about("bob 1", "bob")).await;
    add(store, &p, &job("no subject")).await;
    assert_eq!(
        newest("ada").await,
        Some((second, Bytes::from_static(b"ada 2")))
    );
    assert_eq!(
        newest("bob").await,
        Some((bob, Bytes::from_static(b"bob 1")))
    );
    assert_eq!(newest("carol").await, None);

    assert_eq!(fetch(store, &p, "w", &[0], 10, LONG).await.len(), 4);
    let done = |number| Completion {
        number,
        attempt: 1,
        result: Bytes::new(),
    };
    store
        .complete_many(&p, &[done(first)], LONG)
        .await
        .expect("complete");
    assert_eq!(
        newest("ada").await,
        Some((second, Bytes::from_static(b"ada 2"))),
        "running, after an older one finished"
    );
    let retried = store
        .retry(&p, second, 1, Duration::ZERO, Bytes::from_static(b"boom"))
        .await
        .expect("retry");
    assert_eq!(retried, Fenced::Applied);
    assert_eq!(
        newest("ada").await,
        Some((second, Bytes::from_static(b"ada 2"))),
        "retrying"
    );
    let buried = store
        .bury(&p, bob, 1, Bytes::from_static(b"refused"), LONG)
        .await
        .expect("bury");
    assert_eq!(buried, Fenced::Applied);
    assert_eq!(newest("bob").await, None, "dead");

    let third = add(store, &p, &about("ada 3", "ada")).await;
    let again = fetch_eventually(store, &p, "w", LONG).await;
    let delivered: HashSet<JobNumber> = again.iter().map(|d| d.number).collect();
    assert!(delivered.contains(&third), "{delivered:?}");
    let third_attempt = again
        .iter()
        .find(|d| d.number == third)
        .expect("third")
        .attempt;
    assert_eq!(
        store
            .complete(&p, third, third_attempt, Bytes::new(), LONG)
            .await
            .expect("complete"),
        Fenced::Applied
    );
    assert_eq!(
        newest("ada").await,
        None,
        "done, though an older one of the subject is unfinished"
    );
}

/// A job added with a lower rank than its subject's unfinished newest does not replace it; one
/// of equal or higher rank does; and once the newest finishes, none is, though a lower-ranked
/// job of the subject is unfinished.
pub async fn a_lower_ranked_job_does_not_replace_its_subjects_newest<S: JobStore>(
    store: &S,
    ns: Namespace,
) {
    let p = partition(&ns, "q");
    let ranked = |payload: &'static str, rank| job(payload).subject("s").subject_rank(rank);
    let newest = || async {
        store
            .newest_of(&p, b"s")
            .await
            .expect("newest_of")
            .map(|(number, _)| number)
    };
    let ten = add(store, &p, &ranked("ten", 10)).await;
    add(store, &p, &ranked("five", 5)).await;
    assert_eq!(newest().await, Some(ten), "a lower rank added later");
    let ten_again = add(store, &p, &ranked("ten again", 10)).await;
    assert_eq!(newest().await, Some(ten_again), "an equal rank added later");
    let twelve = add(store, &p, &ranked("twelve", 12)).await;
    assert_eq!(newest().await, Some(twelve), "a higher rank");

    let delivered = fetch(store, &p, "w", &[0], 10, LONG).await;
    assert_eq!(delivered.len(), 4);
    let done = Completion {
        number: twelve,
        attempt: 1,
        result: Bytes::new(),
    };
    store
        .complete_many(&p, &[done], LONG)
        .await
        .expect("complete");
    assert_eq!(newest().await, None, "the newest is done");
    let six = add(store, &p, &ranked("six", 6)).await;
    assert_eq!(
        newest().await,
        Some(six),
        "no unfinished newest to outrank it"
    );
}

/// A holder that extends keeps its job past the visibility timeout.
pub async fn extending_keeps_the_job<S: JobStore>(store: &S, ns: Namespace) {
    let p = partition(&ns, "q");
    let number = add(store, &p, &job("a")).await;
    let visibility = Duration::from_millis(300);
    assert_eq!(fetch(store, &p, "a", &[0], 1, visibility).await.len(), 1);
    let start = Instant::now();
    while start.elapsed() < Duration::from_millis(900) {
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(
            store.extend(&p, number, 1).await.expect("extend"),
            Fenced::Applied
        );
        assert!(fetch(store, &p, "b", &[0], 1, visibility).await.is_empty());
    }
    let taken = fetch_eventually(store, &p, "b", visibility).await;
    assert_eq!(taken[0].attempt, 2);
}

/// The jobs a marked fetch delivered are delivered again by `recover` with its token, as
/// they were (same attempt, so their holder's steps apply), their visibility counted from
/// then; not for another token, and not once finished or taken over.
pub async fn a_lost_fetch_is_recovered_as_it_was<S: JobStore>(store: &S, ns: Namespace) {
    let p = partition(&ns, "q");
    let first = add(store, &p, &job("a")).await;
    let second = add(store, &p, &job("b")).await;
    let visibility = Duration::from_millis(400);
    let request = FetchRequest {
        consumer: "w",
        lanes: &[0],
        max: 10,
        visibility,
    };
    let fetched = store.fetch_marked(&p, request, 7).await.expect("fetch");
    assert_eq!(fetched.len(), 2);
    // Most of the fetch's visibility passes before the recovery.
    tokio::time::sleep(visibility * 3 / 4).await;
    assert!(
        store
            .recover(&p, "w", 8, 10)
            .await
            .expect("recover")
            .is_empty()
    );
    assert!(
        store
            .recover(&p, "w", 0, 10)
            .await
            .expect("recover")
            .is_empty()
    );
    let mut recovered = store.recover(&p, "w", 7, 10).await.expect("recover");
    recovered.sort_by_key(|d| d.number);
    assert_eq!(recovered, fetched, "delivered again as they were");
    assert_eq!(
        store
            .complete(&p, first, 1, Bytes::new(), LONG)
            .await
            .expect("complete"),
        Fenced::Applied,
        "the recovered attempt is the holder's"
    );
    // The visibility counts from the recovery: nobody takes the second job over before it
    // runs out, then a takeover leaves nothing to recover.
    let recovered_at = Instant::now();
    let taken = fetch_eventually(store, &p, "x", visibility).await;
    assert!(recovered_at.elapsed() >= visibility - Duration::from_millis(50));
    assert_eq!((taken[0].number, taken[0].attempt), (second, 2));
    assert!(
        store
            .recover(&p, "w", 7, 10)
            .await
            .expect("recover")
            .is_empty()
    );
}

/// A retried job waits its delay as retrying, keeping its error, then comes back with the
/// next attempt.
pub async fn a_retried_job_comes_back_after_its_delay<S: JobStore>(store: &S, ns: Namespace) {
    let p = partition(&ns, "q");
    let number = add(store, &p, &job("a")).await;
    fetch(store, &p, "w", &[0], 1, LONG).await;
    let start = Instant::now();
    let retried = store
        .retry(
            &p,
            number,
            1,
            Duration::from_millis(200),
            Bytes::from_static(b"boom"),
        )
        .await
        .expect("retry");
    assert_eq!(retried, Fenced::Applied);
    let record = store
        .status(&p, number)
        .await
        .expect("status")
        .expect("kept");
    assert_eq!(record.state, JobState::Retrying);
    assert_eq!(record.error.as_deref(), Some(&b"boom"[..]));
    let stats = store.stats(&p).await.expect("stats");
    assert_eq!((stats.unfinished, stats.delayed, stats.running), (1, 1, 0));
    assert!(fetch(store, &p, "w", &[0], 1, LONG).await.is_empty());
    let again = fetch_eventually(store, &p, "w", LONG).await;
    assert!(start.elapsed() >= Duration::from_millis(190));
    assert_eq!((again[0].number, again[0].attempt), (number, 2));
    assert!(!again[0].taken_over);
}

/// A released job comes back at once, its hand-back counted and not charged: its next
/// delivery has the next attempt (the holder's steps are fenced) and one more handed back. A
/// takeover is charged.
pub async fn a_released_job_comes_back_at_once_uncharged<S: JobStore>(store: &S, ns: Namespace) {
    let p = partition(&ns, "q");
    let number = add(store, &p, &job("a")).await;
    let first = fetch(store, &p, "stopping", &[0], 1, LONG).await;
    assert_eq!((first[0].attempt, first[0].handed_back), (1, 0));
    let released = store
        .release(&p, number, 1, Bytes::from_static(b"shutting down"))
        .await
        .expect("release");
    assert_eq!(released, Fenced::Applied);
    let record = store
        .status(&p, number)
        .await
        .expect("status")
        .expect("kept");
    assert_eq!(record.state, JobState::Retrying);
    let again = fetch_eventually(store, &p, "next", Duration::from_millis(200)).await;
    assert_eq!(
        (again[0].number, again[0].attempt, again[0].handed_back),
        (number, 2, 1)
    );
    for stale in [
        store.release(&p, number, 1, Bytes::new()).await,
        store.complete(&p, number, 1, Bytes::new(), LONG).await,
    ] {
        assert_eq!(stale.expect("step"), Fenced::Rejected);
    }
    // The second holder dies: the takeover is charged, the earlier hand-back still counted.
    let taken = fetch_eventually(store, &p, "last", Duration::from_millis(200)).await;
    assert_eq!(
        (taken[0].attempt, taken[0].handed_back, taken[0].taken_over),
        (3, 1, true)
    );
}

/// A hand-back keeps the error of the job's last failed attempt, which its status goes on
/// answering; a job that never failed answers the hand-back's reason.
pub async fn a_hand_back_keeps_the_error_of_the_last_failed_attempt<S: JobStore>(
    store: &S,
    ns: Namespace,
) {
    let p = &partition(&ns, "q");
    let error_of = |number| async move {
        let record = store.status(p, number).await.expect("status");
        record.expect("kept").error
    };
    let failed = add(store, p, &job("failed")).await;
    fetch(store, p, "w", &[0], 1, LONG).await;
    let retried = store.retry(
        p,
        failed,
        1,
        Duration::ZERO,
        Bytes::from_static(b"provider 503"),
    );
    assert_eq!(retried.await.expect("retry"), Fenced::Applied);
    let again = fetch_eventually(store, p, "w", LONG).await;
    assert_eq!((again[0].number, again[0].attempt), (failed, 2));
    let released = store.release(p, failed, 2, Bytes::from_static(b"shutting down"));
    assert_eq!(released.await.expect("release"), Fenced::Applied);
    assert_eq!(
        error_of(failed).await.as_deref(),
        Some(&b"provider 503"[..])
    );

    let fresh = add(store, p, &job("fresh")).await;
    let taken = fetch_eventually(store, p, "w", LONG).await;
    let numbers: Vec<JobNumber> = taken.iter().map(|d| d.number).collect();
    assert!(numbers.contains(&fresh), "{numbers:?}");
    let released = store.release(p, fresh, 1, Bytes::from_static(b"shutting down"));
    assert_eq!(released.await.expect("release"), Fenced::Applied);
    assert_eq!(
        error_of(fresh).await.as_deref(),
        Some(&b"shutting down"[..])
    );
}

/// A buried job is dead: kept with its payload and error, listed newest first among the dead
/// letters, and no longer counted against the bound.
pub async fn a_buried_job_is_a_dead_letter_and_frees_its_place<S: JobStore>(
    store: &S,
    ns: Namespace,
) {
    let p = partition(&ns, "q");
    let mut buried = Vec::new();
    for payload in ["first", "second"] {
        let number = match store
            .enqueue(&p, &job(payload), &limits(1))
            .await
            .expect("enqueue")
        {
            Enqueued::Added(number) => number,
            other => panic!("the bound of 1 refused a job after a burial: {other:?}"),
        };
        fetch(store, &p, "w", &[0], 1, LONG).await;
        let applied = store
            .bury(&p, number, 1, Bytes::from_static(b"poison"), LONG)
            .await
            .expect("bury");
        assert_eq!(applied, Fenced::Applied);
        buried.push(number);
    }
    let record = store
        .status(&p, buried[0])
        .await
        .expect("status")
        .expect("kept");
    assert_eq!(record.state, JobState::Dead);
    assert_eq!(record.payload.as_deref(), Some(&b"first"[..]));
    assert_eq!(record.error.as_deref(), Some(&b"poison"[..]));
    assert_eq!(
        store.dead_letters(&p, 10).await.expect("dead letters"),
        [buried[1], buried[0]]
    );
    assert_eq!(
        store.dead_letters(&p, 1).await.expect("dead letters"),
        [buried[1]]
    );
    let stats = store.stats(&p).await.expect("stats");
    assert_eq!((stats.unfinished, stats.dead), (0, 2));
}

/// Done and dead records go once their retention has passed.
pub async fn finished_records_go_after_their_retention<S: JobStore>(store: &S, ns: Namespace) {
    let p = partition(&ns, "q");
    let done = add(store, &p, &job("a")).await;
    let dead = add(store, &p, &job("b")).await;
    fetch(store, &p, "w", &[0], 2, LONG).await;
    let short = Duration::from_millis(100);
    store
        .complete(&p, done, 1, Bytes::from_static(b"r"), short)
        .await
        .expect("complete");
    store
        .bury(&p, dead, 1, Bytes::from_static(b"e"), short)
        .await
        .expect("bury");
    let deadline = Instant::now() + WAIT_BOUND;
    loop {
        let done_left = store.status(&p, done).await.expect("status").is_some();
        let dead_left = store.status(&p, dead).await.expect("status").is_some();
        if !done_left && !dead_left {
            break;
        }
        assert!(Instant::now() < deadline, "100 ms retention held for 10 s");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(store.dead_letters(&p, 10).await.expect("dead").is_empty());
}

/// Steps on a job that does not exist change nothing.
pub async fn steps_on_unknown_jobs_are_rejected<S: JobStore>(store: &S, ns: Namespace) {
    let p = partition(&ns, "q");
    assert_eq!(store.status(&p, 999).await.expect("status"), None);
    assert_eq!(
        store.extend(&p, 999, 1).await.expect("extend"),
        Fenced::Rejected
    );
    assert_eq!(
        store
            .complete(&p, 999, 1, Bytes::new(), LONG)
            .await
            .expect("complete"),
        Fenced::Rejected
    );
    assert_eq!(
        store
            .retry(&p, 999, 1, Duration::ZERO, Bytes::new())
            .await
            .expect("retry"),
        Fenced::Rejected
    );
    assert_eq!(
        store
            .bury(&p, 999, 1, Bytes::new(), LONG)
            .await
            .expect("bury"),
        Fenced::Rejected
    );
    // A queued job has no holder yet.
    let number = add(store, &p, &job("a")).await;
    assert_eq!(
        store.extend(&p, number, 0).await.expect("extend"),
        Fenced::Rejected
    );
    assert_eq!(store.stats(&p).await.expect("stats").unfinished, 1);
}

/// The counts follow the jobs: ready in every lane, running, delayed, and the age of the
/// oldest ready job.
pub async fn stats_count_each_state<S: JobStore>(store: &S, ns: Namespace) {
    let p = partition(&ns, "q");
    add(store, &p, &job("run")).await;
    fetch(store, &p, "w", &[0], 1, LONG).await;
    let oldest = add(store, &p, &job("a").lane(1)).await;
    add(store, &p, &job("b").lane(0)).await;
    add(store, &p, &job("later").delay(LONG)).await;
    let stats = store.stats(&p).await.expect("stats");
    assert_eq!(
        (
            stats.unfinished,
            stats.ready,
            stats.running,
            stats.delayed,
            stats.dead
        ),
        (4, 2, 1, 1, 0)
    );
    let record = store
        .status(&p, oldest)
        .await
        .expect("status")
        .expect("kept");
    assert_eq!(stats.oldest_ready_ms, Some(record.enqueued_at_ms));
}

/// Four consumers fetching at once get every job exactly once.
pub async fn concurrent_consumers_get_each_job_once<S: JobStore + Clone>(store: &S, ns: Namespace) {
    let p = Arc::new(partition(&ns, "q"));
    for i in 0..200 {
        add(store, &p, &NewJob::new(Bytes::from(format!("{i}")))).await;
    }
    let tasks: Vec<_> = (0..4)
        .map(|w| {
            let (store, p) = (store.clone(), Arc::clone(&p));
            tokio::spawn(async move {
                let consumer = format!("w{w}");
                let mut got = Vec::new();
                loop {
                    let batch = fetch(&store, &p, &consumer, &[0], 7, LONG).await;
                    if batch.is_empty() {
                        return got;
                    }
                    got.extend(batch.into_iter().map(|d| d.number));
                }
            })
        })
        .collect();
    let mut seen = HashSet::new();
    let mut total = 0;
    for task in tasks {
        for number in task.await.expect("consumer") {
            total += 1;
            seen.insert(number);
        }
    }
    assert_eq!((total, seen.len()), (200, 200));
}

/// `complete_many` finishes each job as `complete` would, in order: held jobs are done with
/// their results, while a stale attempt, an unknown job and a second entry for a job are
/// rejected; the finished jobs stop counting against the bounds (their tenant's too) and count
/// in the drain rate. An empty list answers nothing.
pub async fn complete_many_finishes_each_job_as_complete_would<S: JobStore>(
    store: &S,
    ns: Namespace,
) {
    let p = partition(&ns, "q");
    let a = add(store, &p, &job("a").tenant("acme")).await;
    let b = add(store, &p, &job("b").lane(1)).await;
    let c = add(store, &p, &job("c")).await;
    let delivered = fetch(store, &p, "w", &[0, 1], 10, LONG).await;
    let numbers: Vec<_> = delivered.iter().map(|d| (d.number, d.attempt)).collect();
    assert_eq!(numbers, [(a, 1), (c, 1), (b, 1)]);
    let done = |number, attempt, result: &'static str| Completion {
        number,
        attempt,
        result: Bytes::from_static(result.as_bytes()),
    };
    let answers: Vec<Fenced> = store
        .complete_many(
            &p,
            &[
                done(a, 1, "ra"),
                done(b, 2, "stale"),
                done(b, 1, "rb"),
                done(a, 1, "again"),
                done(999, 1, "unknown"),
            ],
            LONG,
        )
        .await
        .expect("complete_many")
        .into_iter()
        .map(|answer| answer.expect("a step on a sound record"))
        .collect();
    assert_eq!(
        answers,
        [
            Fenced::Applied,
            Fenced::Rejected,
            Fenced::Applied,
            Fenced::Rejected,
            Fenced::Rejected
        ]
    );
    for (number, result) in [(a, "ra"), (b, "rb")] {
        let record = store
            .status(&p, number)
            .await
            .expect("status")
            .expect("kept");
        assert_eq!(record.state, JobState::Done);
        assert_eq!(record.result.as_deref(), Some(result.as_bytes()));
        assert_eq!(record.payload, None);
    }
    let running = store.status(&p, c).await.expect("status").expect("kept");
    assert_eq!((running.state, running.attempt), (JobState::Running, 1));
    let stats = store.stats(&p).await.expect("stats");
    assert_eq!((stats.unfinished, stats.running, stats.ready), (1, 1, 0));
    // The tenant's place is free again, and the partition's bound counts only `c`.
    let one_each = EnqueueLimits {
        max_per_tenant: Some(1),
        ..limits(2)
    };
    let answer = store
        .enqueue(&p, &job("d").tenant("acme"), &one_each)
        .await
        .expect("enqueue");
    assert!(matches!(answer, Enqueued::Added(_)), "{answer:?}");
    match store
        .enqueue(&p, &job("e"), &limits(2))
        .await
        .expect("enqueue")
    {
        Enqueued::Full {
            depth,
            drained_per_sec,
            ..
        } => {
            assert_eq!(depth, 2);
            let most = 2.0 / DRAIN_WINDOW.as_secs_f64();
            assert!(
                drained_per_sec > 0.0 && drained_per_sec <= most * 1.001,
                "2 jobs finished just now: {drained_per_sec}/s, expected at most {most}/s"
            );
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert!(
        store
            .complete_many(&p, &[], LONG)
            .await
            .expect("complete_many")
            .is_empty()
    );
    let last = store
        .complete_many(&p, &[done(c, 1, "rc")], LONG)
        .await
        .expect("complete_many");
    assert!(matches!(last[..], [Ok(Fenced::Applied)]), "{last:?}");
    assert_eq!(store.stats(&p).await.expect("stats").running, 0);
}

/// Random steps of two consumers on three lanes (enqueues, fetches that sometimes let their
/// deliveries lapse at once so that later fetches take them over, completions, retries and
/// hand-backs, by current and by superseded holders), then a drain. What the contract says
/// holds at every step: a delivery's attempt is greater than any earlier one of its job, a
/// finished job is never delivered, a step applies exactly when its attempt is the job's
/// latest delivery and the job is unfinished. And at the end every job is done, completed
/// exactly once, and nothing is left unfinished.
pub async fn random_steps_lose_no_job_and_finish_each_once<S: JobStore>(store: &S, ns: Namespace) {
    for seed in 1..=4 {
        random_steps(store, &partition(&ns, &format!("random-{seed}")), seed).await;
    }
}

async fn random_steps<S: JobStore>(store: &S, p: &Key, seed: u64) {
    let mut rng = fastrand::Rng::with_seed(seed);
    // Per job: its latest delivered attempt (0 before any), and whether it is done.
    let mut latest: HashMap<JobNumber, u32> = HashMap::new();
    let mut done: HashSet<JobNumber> = HashSet::new();
    // Deliveries not stepped on yet, current or superseded.
    let mut held: Vec<(JobNumber, u32)> = Vec::new();
    let mut completions: HashMap<JobNumber, u32> = HashMap::new();
    // Per subject, the job last added with it.
    const SUBJECTS: [&str; 3] = ["s0", "s1", "s2"];
    let mut newest: HashMap<&str, JobNumber> = HashMap::new();
    for step in 0..300 {
        match rng.u8(..100) {
            0..=29 => {
                let subject = SUBJECTS[rng.usize(..SUBJECTS.len())];
                let number = add(store, p, &job("x").lane(rng.u8(..3)).subject(subject)).await;
                latest.insert(number, 0);
                newest.insert(subject, number);
            }
            30..=54 => {
                let mut lanes = [0, 1, 2];
                rng.shuffle(&mut lanes);
                let visibility = if rng.u8(..5) == 0 {
                    Duration::ZERO
                } else {
                    LONG
                };
                let consumer = if rng.bool() { "a" } else { "b" };
                let max = rng.usize(1..=4);
                for d in fetch(store, p, consumer, &lanes, max, visibility).await {
                    assert!(
                        !done.contains(&d.number),
                        "seed {seed} step {step}: done job {} delivered",
                        d.number
                    );
                    let before = latest.insert(d.number, d.attempt).expect("an enqueued job");
                    assert!(
                        d.attempt > before,
                        "seed {seed} step {step}: job {} delivered with attempt {} after {before}",
                        d.number,
                        d.attempt
                    );
                    held.push((d.number, d.attempt));
                }
            }
            _ if held.is_empty() => {}
            kind => {
                let (number, attempt) = held.swap_remove(rng.usize(..held.len()));
                let current = latest[&number] == attempt && !done.contains(&number);
                let answer = match kind {
                    55..=79 => store.complete(p, number, attempt, Bytes::new(), LONG).await,
                    80..=91 => {
                        store
                            .retry(p, number, attempt, Duration::ZERO, Bytes::new())
                            .await
                    }
                    _ => store.release(p, number, attempt, Bytes::new()).await,
                }
                .expect("step");
                let expected = if current {
                    Fenced::Applied
                } else {
                    Fenced::Rejected
                };
                assert_eq!(
                    answer, expected,
                    "seed {seed} step {step}: a step of job {number} by attempt {attempt} (latest {})",
                    latest[&number]
                );
                if current && (55..=79).contains(&kind) {
                    done.insert(number);
                    *completions.entry(number).or_default() += 1;
                }
            }
        }
        // The job last added with a subject is its newest while unfinished; done, none is.
        let subject = SUBJECTS[rng.usize(..SUBJECTS.len())];
        let expected = newest
            .get(subject)
            .copied()
            .filter(|number| !done.contains(number));
        let found = store
            .newest_of(p, subject.as_bytes())
            .await
            .expect("newest_of")
            .map(|(number, _)| number);
        assert_eq!(
            found, expected,
            "seed {seed} step {step}: newest of {subject}"
        );
    }
    // The drain: complete what is held, fetch the rest, until nothing is unfinished.
    let deadline = Instant::now() + WAIT_BOUND;
    loop {
        for (number, attempt) in held.drain(..) {
            if latest[&number] == attempt && !done.contains(&number) {
                let answer = store
                    .complete(p, number, attempt, Bytes::new(), LONG)
                    .await
                    .expect("complete");
                assert_eq!(
                    answer,
                    Fenced::Applied,
                    "seed {seed}: draining job {number}"
                );
                done.insert(number);
                *completions.entry(number).or_default() += 1;
            }
        }
        if done.len() == latest.len() {
            break;
        }
        for d in fetch(store, p, "drain", &[0, 1, 2], 50, LONG).await {
            assert!(
                !done.contains(&d.number),
                "seed {seed}: done job {} delivered",
                d.number
            );
            latest.insert(d.number, d.attempt);
            held.push((d.number, d.attempt));
        }
        if held.is_empty() {
            assert!(
                Instant::now() < deadline,
                "seed {seed}: {} of {} jobs never came back",
                latest.len() - done.len(),
                latest.len()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    assert!(
        completions.values().all(|&n| n == 1),
        "seed {seed}: each job completed once"
    );
    assert_eq!(completions.len(), latest.len());
    for &number in latest.keys() {
        let record = store
            .status(p, number)
            .await
            .expect("status")
            .expect("kept");
        assert_eq!(record.state, JobState::Done, "seed {seed}: job {number}");
    }
    assert_eq!(
        store.stats(p).await.expect("stats").unfinished,
        0,
        "seed {seed}"
    );
}
