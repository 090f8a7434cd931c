//! Keyed bulkhead behaviour: shares under a flood, borrowing, giving back, the queue, the
//! memory bound under attacker-chosen tenants, and release on every path.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use futures_util::FutureExt;
use headroom_core::Classify;
use headroom_limit::{
    KeyedBulkhead, KeyedPermit, Overloaded, OwnedKeyedPermit, Reason, TenantClass,
};
use proptest::prelude::*;
use tokio::time::Instant;

fn keyed(max_concurrent: usize, max_queued: usize) -> KeyedBulkhead {
    KeyedBulkhead::builder("test")
        .max_concurrent(max_concurrent)
        .max_queued(max_queued)
        .max_wait(Duration::from_secs(3_600))
        .build()
        .expect("valid keyed bulkhead")
}

type Waiter = Pin<Box<dyn Future<Output = Result<OwnedKeyedPermit, Overloaded>> + Send>>;

/// A caller of `tenant`, not yet polled (it takes its place in the queue when first polled).
fn caller(b: &KeyedBulkhead, tenant: &'static str) -> Waiter {
    let b = b.clone();
    Box::pin(async move { b.acquire(tenant).await.map(KeyedPermit::into_owned) })
}

/// Polls a caller once: `None` while it waits.
fn poll(waiter: &mut Waiter) -> Option<Result<OwnedKeyedPermit, Overloaded>> {
    waiter.as_mut().now_or_never()
}

/// Polls every caller once; returns the outcomes of those that finished and keeps the rest.
fn poll_all(waiters: &mut Vec<Waiter>) -> Vec<Result<OwnedKeyedPermit, Overloaded>> {
    let mut finished = Vec::new();
    waiters.retain_mut(|w| match poll(w) {
        Some(outcome) => {
            finished.push(outcome);
            false
        }
        None => true,
    });
    finished
}

fn take(b: &KeyedBulkhead, tenant: &str, n: usize) -> Vec<OwnedKeyedPermit> {
    (0..n)
        .map(|_| b.try_acquire(tenant).expect("a free permit").into_owned())
        .collect()
}

#[tokio::test(start_paused = true)]
async fn a_flooding_tenant_cannot_starve_a_quiet_one_beyond_its_share() {
    const WORK: Duration = Duration::from_millis(10);
    let b = KeyedBulkhead::builder("flood")
        .max_concurrent(8)
        .max_queued(16)
        .max_wait(Duration::from_secs(1))
        .build()
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let flood_done = Arc::new(AtomicUsize::new(0));
    // 64 closed-loop callers of one tenant, eight times the capacity; a refused one retries
    // after a millisecond.
    let flood: Vec<_> = (0..64)
        .map(|_| {
            let (b, stop, done) = (b.clone(), Arc::clone(&stop), Arc::clone(&flood_done));
            tokio::spawn(async move {
                for _ in 0..5_000 {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    match b.acquire("flood").await {
                        Ok(permit) => {
                            tokio::time::sleep(WORK).await;
                            drop(permit);
                            done.fetch_add(1, Ordering::SeqCst);
                        }
                        Err(_) => tokio::time::sleep(Duration::from_millis(1)).await,
                    }
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Alone, the flood borrows everything and fills the queue.
    assert_eq!((b.in_use(), b.queued()), (8, 16));

    // The quiet tenant: four callers (its share, 8 / 2), ten requests each.
    let holding = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let longest_wait = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let flood_before = flood_done.load(Ordering::SeqCst);
    let quiet: Vec<_> = (0..4)
        .map(|_| {
            let (b, holding, peak) = (b.clone(), Arc::clone(&holding), Arc::clone(&peak));
            let longest_wait = Arc::clone(&longest_wait);
            tokio::spawn(async move {
                for _ in 0..10 {
                    let asked = Instant::now();
                    let permit = b
                        .acquire("quiet")
                        .await
                        .expect("the quiet tenant is served");
                    let waited = u64::try_from(asked.elapsed().as_micros()).unwrap();
                    longest_wait.fetch_max(waited, Ordering::SeqCst);
                    peak.fetch_max(holding.fetch_add(1, Ordering::SeqCst) + 1, Ordering::SeqCst);
                    tokio::time::sleep(WORK).await;
                    holding.fetch_sub(1, Ordering::SeqCst);
                    drop(permit);
                }
            })
        })
        .collect();
    for task in quiet {
        task.await.expect("quiet caller");
    }
    let quiet_phase = started.elapsed();
    let flood_during = flood_done.load(Ordering::SeqCst) - flood_before;
    stop.store(true, Ordering::SeqCst);
    for task in flood {
        task.await.expect("flood caller");
    }

    // Every flood permit is held for WORK, so within WORK one comes back, and a tenant below
    // its share is served first: the quiet tenant never waits longer than that.
    let longest_wait = Duration::from_micros(longest_wait.load(Ordering::SeqCst));
    assert!(longest_wait <= WORK, "quiet tenant waited {longest_wait:?}");
    assert_eq!(
        peak.load(Ordering::SeqCst),
        4,
        "the quiet tenant reaches its share"
    );
    // Meanwhile the flood keeps the other half: at least 4 permits' worth of work per WORK.
    let floor = 4 * (quiet_phase.as_millis() / WORK.as_millis()) as usize;
    assert!(
        flood_during + 4 >= floor,
        "flood completed {flood_during} in {quiet_phase:?}, expected about {floor}"
    );
    assert_eq!((b.in_use(), b.queued(), b.tracked_tenants()), (0, 0, 0));
}

#[test]
fn tenants_borrow_capacity_the_others_leave_idle() {
    let b = keyed(4, 0);
    let quiet = b.try_acquire("quiet").expect("a free permit");
    // Two tenants active: each is guaranteed 2, and the busy one borrows the idle third.
    let busy = take(&b, "busy", 3);
    assert_eq!(b.in_use(), 4);
    assert_eq!(
        b.try_acquire("quiet").unwrap_err().reason(),
        Reason::QueueFull,
        "borrowed permits are not taken back from running work"
    );
    drop(quiet);
    // Alone now, the busy tenant may take the whole capacity.
    let last = b.try_acquire("busy").expect("idle capacity is lent");
    assert_eq!(b.in_use(), 4);
    drop((busy, last));
    assert_eq!((b.in_use(), b.tracked_tenants()), (0, 0));
}

#[tokio::test]
async fn returned_permits_go_first_to_a_waiting_tenant_below_its_share() {
    let b = keyed(4, 8);
    let mut busy = take(&b, "busy", 4);
    let mut busy_1 = caller(&b, "busy");
    let mut busy_2 = caller(&b, "busy");
    assert!(poll(&mut busy_1).is_none() && poll(&mut busy_2).is_none());
    // The quiet tenant asks after the busy one's callers; its share is 2, it holds 0.
    let mut quiet_1 = caller(&b, "quiet");
    let mut quiet_2 = caller(&b, "quiet");
    assert!(poll(&mut quiet_1).is_none() && poll(&mut quiet_2).is_none());

    drop(busy.pop());
    let q1 = poll(&mut quiet_1).expect("served first").expect("admitted");
    assert!(poll(&mut busy_1).is_none());
    drop(busy.pop());
    let q2 = poll(&mut quiet_2)
        .expect("still below its share")
        .expect("admitted");
    assert!(poll(&mut busy_1).is_none());
    // The quiet tenant holds its share; the busy one, at 2 as well, is served again.
    drop(busy.pop());
    let b1 = poll(&mut busy_1)
        .expect("nobody below share waits")
        .expect("ok");

    // The quiet tenant asks again, at its share: the busy one, now below its share, is
    // served first.
    let mut quiet_3 = caller(&b, "quiet");
    assert!(poll(&mut quiet_3).is_none());
    drop(busy.pop());
    let b2 = poll(&mut busy_2)
        .expect("below its share")
        .expect("admitted");
    assert!(poll(&mut quiet_3).is_none());
    // A permit the quiet tenant returns takes it below its share: it comes back to it.
    drop(q1);
    let q3 = poll(&mut quiet_3).expect("served").expect("admitted");
    assert_eq!(b.in_use(), 4);
    drop((q2, q3, b1, b2, busy));
    assert_eq!((b.in_use(), b.queued(), b.tracked_tenants()), (0, 0, 0));
}

#[tokio::test]
async fn heavier_classes_get_larger_shares() {
    let b = KeyedBulkhead::builder("classes")
        .max_concurrent(8)
        .max_queued(16)
        .max_wait(Duration::from_secs(3_600))
        .class("gold", 3)
        .build()
        .unwrap();
    let gold = b.class("gold").expect("configured");
    assert_eq!(gold.weight(), 3);
    assert!(b.class("platinum").is_none());
    // Shares: gold 8 × 3/4 = 6, the default tenant 8 × 1/4 = 2.
    let mut plain = take(&b, "plain", 6);
    let mut golden: Vec<_> = (0..2)
        .map(|_| b.try_acquire_in(gold, "g").unwrap().into_owned())
        .collect();
    let mut waiting_plain = caller(&b, "plain");
    assert!(poll(&mut waiting_plain).is_none());
    let bb = b.clone();
    let mut waiting_gold: Vec<Waiter> = (0..5)
        .map(|_| {
            let b = bb.clone();
            Box::pin(async move { b.acquire_in(gold, "g").await.map(KeyedPermit::into_owned) })
                as Waiter
        })
        .collect();
    assert!(poll_all(&mut waiting_gold).is_empty());
    // Each permit the plain tenant returns goes to gold until gold holds its share of 6.
    for _ in 0..4 {
        drop(plain.pop());
        let served = poll_all(&mut waiting_gold);
        assert_eq!(served.len(), 1);
        golden.extend(served.into_iter().map(|p| p.unwrap()));
        assert!(poll(&mut waiting_plain).is_none());
    }
    assert_eq!((golden.len(), plain.len()), (6, 2));
    // Back below its share of 2, the plain tenant is served before gold at its share.
    drop(plain.pop());
    let _p = poll(&mut waiting_plain).expect("served").expect("admitted");
    assert_eq!(poll_all(&mut waiting_gold).len(), 0);
    // Both at their shares: gold has fewer for its weight ((6 + 1) / 3 < (2 + 1) / 1).
    drop(plain.pop());
    assert_eq!(poll_all(&mut waiting_gold).len(), 1);
}

#[tokio::test]
async fn a_full_queue_makes_room_for_a_tenant_within_its_share() {
    let b = keyed(2, 3);
    let _busy = take(&b, "busy", 2);
    let mut queue: Vec<_> = (0..3).map(|_| caller(&b, "busy")).collect();
    for w in &mut queue {
        assert!(poll(w).is_none());
    }
    // The busy tenant, over its share, cannot queue a fourth.
    let mut more = caller(&b, "busy");
    assert_eq!(
        poll(&mut more).unwrap().unwrap_err().reason(),
        Reason::QueueFull
    );
    // A quiet tenant within its share (1 of 2) takes the newest busy caller's place.
    let mut quiet = caller(&b, "quiet");
    assert!(poll(&mut quiet).is_none());
    let evicted = poll(&mut queue[2]).expect("evicted").unwrap_err();
    assert_eq!(evicted.reason(), Reason::Evicted);
    assert!(evicted.is_rejected() && evicted.is_retryable());
    assert!(poll(&mut queue[0]).is_none() && poll(&mut queue[1]).is_none());
    // A second quiet caller would exceed the quiet tenant's share of 1: refused.
    let mut quiet_2 = caller(&b, "quiet");
    assert_eq!(
        poll(&mut quiet_2).unwrap().unwrap_err().reason(),
        Reason::QueueFull
    );
    assert_eq!(b.rejected(Reason::Evicted), 1);
    assert_eq!(b.rejected(Reason::QueueFull), 2);
    assert_eq!(b.queued(), 3);
}

#[tokio::test(start_paused = true)]
async fn waiting_is_bounded_by_max_wait() {
    let b = KeyedBulkhead::builder("wait")
        .max_concurrent(1)
        .max_queued(4)
        .max_wait(Duration::from_millis(50))
        .build()
        .unwrap();
    let _held = b.acquire("a").await.unwrap();
    let asked = Instant::now();
    let refused = b.acquire("b").await.unwrap_err();
    assert_eq!(refused.reason(), Reason::WaitTimeout);
    assert!(
        !refused.is_timeout(),
        "a rejection, not the caller's timeout"
    );
    let waited = asked.elapsed();
    assert!(waited >= Duration::from_millis(50) && waited < Duration::from_millis(52));
    assert_eq!((b.queued(), b.tracked_tenants()), (0, 1));
    assert_eq!(b.rejected(Reason::WaitTimeout), 1);
}

#[tokio::test]
async fn permit_is_released_when_the_holder_panics() {
    let b = keyed(1, 0);
    let task = tokio::spawn({
        let b = b.clone();
        async move {
            let _permit = b.acquire("t").await.expect("admitted");
            panic!("user code fails");
        }
    });
    assert!(task.await.expect_err("panicked").is_panic());
    assert_eq!((b.in_use(), b.tracked_tenants()), (0, 0));
    assert!(b.try_acquire("t").is_ok());
}

#[tokio::test]
async fn a_caller_dropped_after_being_handed_a_permit_passes_it_on() {
    let b = keyed(1, 4);
    let held = b.try_acquire("a").unwrap();
    let mut first = caller(&b, "b");
    let mut second = caller(&b, "c");
    assert!(poll(&mut first).is_none() && poll(&mut second).is_none());
    drop(held);
    // `first` was handed the permit but is dropped before it sees it.
    drop(first);
    let permit = poll(&mut second).expect("passed on").expect("admitted");
    assert_eq!((b.in_use(), b.queued()), (1, 0));
    drop(permit);
    assert_eq!((b.in_use(), b.tracked_tenants()), (0, 0));
}

#[tokio::test]
async fn new_tenants_beyond_max_tenants_share_one_overflow_tenant() {
    let b = KeyedBulkhead::builder("overflow")
        .max_concurrent(8)
        .max_queued(8)
        .max_tenants(1)
        .max_wait(Duration::from_secs(3_600))
        .build()
        .unwrap();
    let mut tracked = take(&b, "tracked", 3);
    // No room for another tenant's state: these two count as one, the overflow tenant.
    let _x = take(&b, "x", 3);
    let _y = take(&b, "y", 2);
    assert_eq!(b.tracked_tenants(), 1);
    // `z` (also in the overflow) asks before the tracked tenant does. Were it a tenant of
    // its own, holding nothing, it would be served first; as part of the overflow tenant,
    // which holds 5, it comes after the tracked tenant once that one holds 2.
    let mut z = caller(&b, "z");
    assert!(poll(&mut z).is_none());
    let mut again = caller(&b, "tracked");
    assert!(poll(&mut again).is_none());
    drop(tracked.pop());
    let _t = poll(&mut again).expect("served first").expect("admitted");
    assert!(poll(&mut z).is_none());
    // The next permit returned goes to the overflow tenant's caller.
    drop(tracked);
    let z = poll(&mut z).expect("served").expect("admitted");
    assert_eq!(b.tracked_tenants(), 1, "`tracked` still holds a permit");
    drop((_t, z, _x, _y));
    assert_eq!((b.in_use(), b.tracked_tenants()), (0, 0));
}

/// An overflow is an acquire charged to the overflow tenant: a caller refused because the
/// queue is full is charged nothing, so it is no overflow.
#[tokio::test]
async fn a_caller_refused_for_a_full_queue_counts_no_overflow() {
    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    let overflows = || {
        handle
            .render()
            .lines()
            .find(|line| line.starts_with("headroom_limit_tenant_overflows_total"))
            .and_then(|line| line.rsplit(' ').next()?.parse::<u64>().ok())
    };
    let b = metrics::with_local_recorder(&recorder, || {
        KeyedBulkhead::builder("overflow")
            .max_concurrent(1)
            .max_queued(1)
            .max_tenants(1)
            .max_wait(Duration::from_secs(3_600))
            .build()
            .unwrap()
    });
    let _held = b.try_acquire("a").expect("a free permit");
    let mut queued = caller(&b, "b");
    assert!(
        poll(&mut queued).is_none(),
        "`b` waits as the overflow tenant"
    );
    assert_eq!(overflows(), Some(1));
    let mut refused = caller(&b, "c");
    let refused = poll(&mut refused).expect("answered at once").unwrap_err();
    assert_eq!(refused.reason(), Reason::QueueFull);
    assert_eq!(overflows(), Some(1), "the refused caller is no overflow");
}

/// 100,000 distinct tenant names of a kilobyte each, chosen by an attacker, take permits,
/// wait and leave. The tenants with state never exceed the cap and drop to none once idle,
/// and the bulkhead allocates nothing for them: its memory is what it allocated when built.
#[test]
fn memory_stays_bounded_under_100k_attacker_tenants() {
    const MAX_TENANTS: usize = 100;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    runtime.block_on(async {
        let b = KeyedBulkhead::builder("attacked")
            .max_concurrent(64)
            .max_queued(128)
            .max_tenants(MAX_TENANTS)
            .max_wait(Duration::from_secs(3_600))
            .build()
            .unwrap();
        let name = |i: u64| {
            let mut name = [b'x'; 1024];
            name[..8].copy_from_slice(&i.to_le_bytes());
            name
        };
        let mut holding: VecDeque<OwnedKeyedPermit> = VecDeque::with_capacity(64);
        let mut waiting: VecDeque<Waiter> = VecDeque::with_capacity(128);
        let mut allocations = 0;
        let mut most_tracked = 0;
        for i in 0..100_000_u64 {
            let tenant = name(i);
            if i % 3 == 2 {
                // A waiting caller (its box is the test's allocation, made outside the count).
                let b = b.clone();
                let mut waiter: Waiter =
                    Box::pin(
                        async move { b.acquire(&tenant[..]).await.map(KeyedPermit::into_owned) },
                    );
                allocations += allocation_counter::measure(|| {
                    if waiting.len() == waiting.capacity() {
                        drop(waiting.pop_front());
                    }
                    match poll(&mut waiter) {
                        None => waiting.push_back(waiter),
                        Some(Ok(permit)) => drop(permit),
                        Some(Err(_)) => {}
                    }
                })
                .count_total;
            } else {
                allocations += allocation_counter::measure(|| {
                    // A permit returned goes to a waiting caller, seen or not.
                    if holding.len() == holding.capacity() {
                        drop(holding.pop_front());
                    }
                    if let Ok(permit) = b.try_acquire(&tenant[..]) {
                        holding.push_back(permit.into_owned());
                    }
                })
                .count_total;
            }
            most_tracked = most_tracked.max(b.tracked_tenants());
        }
        assert_eq!(allocations, 0, "the bulkhead allocated for new tenants");
        assert!(
            most_tracked <= MAX_TENANTS,
            "{most_tracked} tenants tracked"
        );
        assert_eq!(most_tracked, MAX_TENANTS, "the attack reached the cap");
        drop(holding);
        drop(waiting);
        assert_eq!((b.in_use(), b.queued(), b.tracked_tenants()), (0, 0, 0));
    });
}

/// Cancels callers of a few tenants at random moments: while waiting, while holding a permit
/// across an await, and right at admission. Afterwards nothing is held, queued or tracked,
/// and one tenant can take the whole capacity again.
#[tokio::test(start_paused = true)]
async fn cancellation_at_random_await_points_leaks_nothing() {
    const TENANTS: [&str; 4] = ["a", "b", "c", "d"];
    for seed in 0..20_u64 {
        let mut rng = fastrand::Rng::with_seed(seed);
        let capacity = rng.usize(1..6);
        let b = KeyedBulkhead::builder("cancel")
            .max_concurrent(capacity)
            .max_queued(rng.usize(0..8))
            .max_wait(Duration::from_millis(rng.u64(1..40)))
            .max_tenants(rng.usize(1..5))
            .build()
            .unwrap();
        let mut tasks = Vec::new();
        for _ in 0..60 {
            let b = b.clone();
            let tenant = TENANTS[rng.usize(0..TENANTS.len())];
            let work = Duration::from_millis(rng.u64(0..20));
            let cancel_after = Duration::from_millis(rng.u64(0..30));
            let start = Duration::from_millis(rng.u64(0..40));
            tasks.push(tokio::spawn(async move {
                tokio::time::sleep(start).await;
                let _ = tokio::time::timeout(cancel_after, async {
                    if let Ok(permit) = b.acquire(tenant).await {
                        tokio::time::sleep(work).await;
                        drop(permit);
                    }
                })
                .await;
            }));
        }
        for task in tasks.iter().step_by(7) {
            tokio::time::sleep(Duration::from_millis(rng.u64(0..5))).await;
            task.abort();
        }
        for task in tasks {
            let _ = task.await;
        }
        assert_eq!(
            (b.in_use(), b.queued(), b.tracked_tenants()),
            (0, 0, 0),
            "seed {seed}"
        );
        let all = take(&b, "a", capacity);
        assert!(b.try_acquire("a").is_err(), "seed {seed}");
        drop(all);
    }
}

/// Acquires, waits, give-ups and releases of three tenants on two threads at once: never
/// more permits held than the capacity, no waiter sleeps past a permit handed to it (the run
/// would stall for the minute-long `max_wait`), and nothing leaks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn threads_racing_keep_the_invariants() {
    const CAPACITY: usize = 3;
    let b = KeyedBulkhead::builder("race")
        .max_concurrent(CAPACITY)
        .max_queued(64)
        .max_wait(Duration::from_secs(60))
        .build()
        .unwrap();
    let holding = Arc::new(AtomicUsize::new(0));
    let most = Arc::new(AtomicUsize::new(0));
    let waited = Arc::new(AtomicUsize::new(0));
    let run = async {
        let tasks: Vec<_> = (0..24_u64)
            .map(|task| {
                let (b, holding, most) = (b.clone(), Arc::clone(&holding), Arc::clone(&most));
                let waited = Arc::clone(&waited);
                tokio::spawn(async move {
                    let mut rng = fastrand::Rng::with_seed(task);
                    let tenant = ["a", "b", "c"][task as usize % 3];
                    for _ in 0..300 {
                        let hold = async |permit| {
                            waited.fetch_max(b.queued(), Ordering::SeqCst);
                            let now = holding.fetch_add(1, Ordering::SeqCst) + 1;
                            most.fetch_max(now, Ordering::SeqCst);
                            tokio::task::yield_now().await;
                            holding.fetch_sub(1, Ordering::SeqCst);
                            drop(permit);
                        };
                        match rng.u8(0..3) {
                            0 => {
                                if let Ok(permit) = b.try_acquire(tenant) {
                                    hold(permit).await;
                                }
                            }
                            1 => match b.acquire(tenant).await {
                                Ok(permit) => hold(permit).await,
                                // Made room for a tenant below its share.
                                Err(refused) => assert_eq!(refused.reason(), Reason::Evicted),
                            },
                            _ => {
                                // Gives up after a random number of polls.
                                let mut attempt = std::pin::pin!(b.acquire(tenant));
                                for _ in 0..=rng.u32(0..3) {
                                    if let Some(result) = attempt.as_mut().now_or_never() {
                                        if let Ok(permit) = result {
                                            hold(permit).await;
                                        }
                                        break;
                                    }
                                    tokio::task::yield_now().await;
                                }
                            }
                        }
                        tokio::task::yield_now().await;
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.expect("task");
        }
    };
    tokio::time::timeout(Duration::from_secs(30), run)
        .await
        .expect("no waiter stalls while permits are free");
    assert!(most.load(Ordering::SeqCst) <= CAPACITY);
    assert!(waited.load(Ordering::SeqCst) > 0, "the queue was used");
    assert_eq!((b.in_use(), b.queued(), b.tracked_tenants()), (0, 0, 0));
    assert_eq!(take(&b, "a", CAPACITY).len(), CAPACITY);
}

#[test]
fn bad_configuration_is_a_typed_error() {
    let zero = KeyedBulkhead::builder("zero")
        .max_concurrent(0)
        .build()
        .unwrap_err();
    assert_eq!(zero.field(), "max_concurrent");
    assert!(!zero.is_retryable());
    let weight = KeyedBulkhead::builder("w")
        .class("free", 0)
        .build()
        .unwrap_err();
    assert_eq!(weight.field(), "classes");
    for build in [
        KeyedBulkhead::builder("huge").max_concurrent(usize::MAX),
        KeyedBulkhead::builder("huge").max_queued(usize::MAX),
        KeyedBulkhead::builder("huge").max_tenants(usize::MAX),
        KeyedBulkhead::builder("huge").max_tenants((1 << 20) + 1),
        KeyedBulkhead::builder("huge").class("x", u32::MAX),
    ] {
        assert!(build.build().is_err());
    }
}

/// With no room for any tenant's own state every tenant would share the overflow tenant, and
/// the bulkhead would share nothing fairly: refused like the other zero sizes.
#[test]
fn zero_max_tenants_is_a_typed_error() {
    let err = KeyedBulkhead::builder("zero")
        .max_tenants(0)
        .build()
        .expect_err("max_tenants(0) is refused");
    assert_eq!(err.field(), "max_tenants");
    assert!(!err.is_retryable());
}

/// The model test's tenants: `t0` is of class `heavy` (weight 2), the others weigh 1.
const NAMES: [&str; 5] = ["t0", "t1", "t2", "t3", "t4"];

fn weight(tenant: usize) -> u64 {
    if tenant == 0 { 2 } else { 1 }
}

#[derive(Clone, Debug)]
enum Op {
    TryAcquire(usize),
    Wait(usize),
    Release(usize),
    Cancel(usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        2 => (0..NAMES.len()).prop_map(Op::TryAcquire),
        4 => (0..NAMES.len()).prop_map(Op::Wait),
        4 => (0..64_usize).prop_map(Op::Release),
        1 => (0..64_usize).prop_map(Op::Cancel),
    ]
}

/// What the test sees: the permits it holds and the callers it keeps waiting, by tenant.
struct Seen {
    capacity: u64,
    held: Vec<(usize, OwnedKeyedPermit)>,
    /// Tenant, arrival order, caller.
    waiting: Vec<(usize, u64, Waiter)>,
}

impl Seen {
    fn held_by(&self, tenant: usize) -> u64 {
        self.held.iter().filter(|(t, _)| *t == tenant).count() as u64
    }

    fn queued_for(&self, tenant: usize) -> u64 {
        self.waiting.iter().filter(|(t, ..)| *t == tenant).count() as u64
    }

    /// The documented share: ⌊capacity × weight / sum of the active tenants' weights⌋, a
    /// tenant being active while it holds a permit or waits (`also` counts as active).
    fn share(&self, tenant: usize, also: Option<usize>) -> u64 {
        let active_weight: u64 = (0..NAMES.len())
            .filter(|&t| Some(t) == also || self.held_by(t) > 0 || self.queued_for(t) > 0)
            .map(weight)
            .sum();
        self.capacity * weight(tenant) / active_weight
    }

    fn waiting_tenants(&self) -> Vec<usize> {
        (0..NAMES.len())
            .filter(|&t| self.queued_for(t) > 0)
            .collect()
    }
}

proptest! {
    /// Random acquires, waits, releases and cancellations across tenants, each checked
    /// against the documented rules: a free permit is taken at once; never more held than the
    /// capacity; nobody waits while a permit is free; a returned permit goes to the waiting
    /// tenant with the fewest held for its weight (ties: oldest caller first), so a waiting
    /// tenant below its share is never passed over for one at or over its share; a full
    /// queue makes room only for a tenant within its share, at the expense of the newest
    /// caller of a tenant over its share. With fewer tracked tenants than names (the overflow
    /// tenant in play) the capacity, queue and tenant bounds are checked.
    #[test]
    fn shares_follow_the_documented_rules(
        ops in proptest::collection::vec(op(), 1..120),
        capacity in 1..6_usize,
        max_queued in 0..6_usize,
        max_tenants in prop_oneof![Just(NAMES.len()), 1..NAMES.len()],
    ) {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(check_shares(ops, capacity, max_queued, max_tenants))?;
    }
}

/// The model test of one sequence of operations.
async fn check_shares(
    ops: Vec<Op>,
    capacity: usize,
    max_queued: usize,
    max_tenants: usize,
) -> Result<(), TestCaseError> {
    let b = KeyedBulkhead::builder("model")
        .max_concurrent(capacity)
        .max_queued(max_queued)
        .max_tenants(max_tenants)
        .max_wait(Duration::from_secs(3_600))
        .class("heavy", 2)
        .build()
        .unwrap();
    let heavy = b.class("heavy").unwrap();
    let exact = max_tenants >= NAMES.len();
    let caller = |tenant: usize| -> Waiter {
        let b = b.clone();
        let class = if tenant == 0 {
            heavy
        } else {
            TenantClass::DEFAULT
        };
        Box::pin(async move {
            b.acquire_in(class, NAMES[tenant])
                .await
                .map(KeyedPermit::into_owned)
        })
    };
    let mut seen = Seen {
        capacity: capacity as u64,
        held: Vec::new(),
        waiting: Vec::new(),
    };
    for (arrival, op) in ops.into_iter().enumerate() {
        let arrival = arrival as u64;
        match op {
            Op::TryAcquire(t) => {
                let class = if t == 0 { heavy } else { TenantClass::DEFAULT };
                let free = seen.held.len() < capacity;
                match b.try_acquire_in(class, NAMES[t]) {
                    Ok(permit) => {
                        prop_assert!(free, "a permit taken beyond the capacity");
                        seen.held.push((t, permit.into_owned()));
                    }
                    Err(refused) => {
                        prop_assert!(!free, "refused with a permit free");
                        prop_assert_eq!(refused.reason(), Reason::QueueFull);
                    }
                }
            }
            Op::Wait(t) => {
                let free = seen.held.len() < capacity;
                let full = seen.waiting.len() >= max_queued;
                // Its permits and waiters, this caller included, within its share.
                let within = seen.held_by(t) + seen.queued_for(t) < seen.share(t, Some(t));
                // Tenants whose permits and waiters exceed their share, most per weight first.
                let claims: Vec<f64> = (0..NAMES.len())
                    .map(|u| (seen.held_by(u) + seen.queued_for(u)) as f64 / weight(u) as f64)
                    .collect();
                let over: Vec<usize> = seen
                    .waiting_tenants()
                    .into_iter()
                    .filter(|&u| seen.held_by(u) + seen.queued_for(u) > seen.share(u, Some(t)))
                    .collect();
                let most = over.iter().map(|&u| claims[u]).fold(f64::MIN, f64::max);
                let mut waiter = caller(t);
                match poll(&mut waiter) {
                    Some(Ok(permit)) => {
                        prop_assert!(free, "admitted at once with no permit free");
                        seen.held.push((t, permit));
                    }
                    Some(Err(refused)) => {
                        prop_assert_eq!(refused.reason(), Reason::QueueFull);
                        prop_assert!(!free && full, "refused with room");
                        if exact {
                            prop_assert!(
                                !within || over.is_empty(),
                                "a tenant within its share was refused while another was over"
                            );
                        }
                    }
                    None => {
                        prop_assert!(!free, "waits with a permit free");
                        if full {
                            // Someone made room: the newest caller of the tenant most over its share.
                            let evicted: Vec<usize> = seen
                                .waiting
                                .iter_mut()
                                .enumerate()
                                .filter_map(|(i, (_, _, w))| poll(w).map(|outcome| (i, outcome)))
                                .map(|(i, outcome)| {
                                    assert_eq!(outcome.unwrap_err().reason(), Reason::Evicted);
                                    i
                                })
                                .collect();
                            prop_assert_eq!(evicted.len(), 1);
                            let (victim, seq, _) = seen.waiting.remove(evicted[0]);
                            if exact {
                                prop_assert!(within, "made room for a tenant beyond its share");
                                prop_assert!(
                                    over.contains(&victim),
                                    "evicted a tenant within its share"
                                );
                                prop_assert!(
                                    claims[victim] >= most,
                                    "evicted a tenant less over its share"
                                );
                                prop_assert!(
                                    seen.waiting
                                        .iter()
                                        .all(|(u, s, _)| *u != victim || *s < seq),
                                    "evicted a caller that was not the tenant's newest"
                                );
                            }
                        }
                        seen.waiting.push((t, arrival, waiter));
                    }
                }
            }
            Op::Release(i) => {
                if seen.held.is_empty() {
                    continue;
                }
                let (_, permit) = seen.held.swap_remove(i % seen.held.len());
                // The line as it stands once the permit is back, before it is handed on.
                let candidates = seen.waiting_tenants();
                let fewest = |u: usize| (seen.held_by(u) + 1) as f64 / weight(u) as f64;
                let oldest: Vec<Option<u64>> = (0..NAMES.len())
                    .map(|u| {
                        seen.waiting
                            .iter()
                            .filter(|(v, ..)| *v == u)
                            .map(|(_, s, _)| *s)
                            .min()
                    })
                    .collect();
                let expected = candidates.iter().copied().min_by(|&a, &c| {
                    fewest(a)
                        .partial_cmp(&fewest(c))
                        .unwrap()
                        .then(oldest[a].cmp(&oldest[c]))
                });
                let below: Vec<usize> = candidates
                    .iter()
                    .copied()
                    .filter(|&u| seen.held_by(u) < seen.share(u, None))
                    .collect();
                drop(permit);
                let mut served = Vec::new();
                let mut still = Vec::new();
                for (u, s, mut w) in seen.waiting.drain(..) {
                    match poll(&mut w) {
                        Some(outcome) => served.push((u, s, outcome.expect("admitted"))),
                        None => still.push((u, s, w)),
                    }
                }
                seen.waiting = still;
                prop_assert_eq!(
                    served.len(),
                    usize::from(expected.is_some()),
                    "one permit returned, one caller served"
                );
                if let Some((u, s, permit)) = served.pop() {
                    if exact {
                        prop_assert_eq!(Some(u), expected, "served out of turn");
                        prop_assert_eq!(
                            Some(s),
                            oldest[u],
                            "a tenant's callers are served in order"
                        );
                        prop_assert!(
                            below.is_empty() || below.contains(&u),
                            "a tenant below its share waited while another was served"
                        );
                    }
                    seen.held.push((u, permit));
                }
            }
            Op::Cancel(i) => {
                if !seen.waiting.is_empty() {
                    let at = i % seen.waiting.len();
                    drop(seen.waiting.remove(at));
                }
            }
        }
        // Nothing else changed: the other callers still wait.
        for (_, _, w) in &mut seen.waiting {
            prop_assert!(poll(w).is_none(), "a caller settled out of turn");
        }
        prop_assert_eq!(b.in_use(), seen.held.len());
        prop_assert!(seen.held.len() <= capacity);
        prop_assert_eq!(b.queued(), seen.waiting.len());
        prop_assert!(seen.waiting.len() <= max_queued);
        prop_assert!(
            seen.waiting.is_empty() || seen.held.len() == capacity,
            "a caller waits while a permit is free"
        );
        prop_assert!(b.tracked_tenants() <= max_tenants);
        if exact {
            let active = (0..NAMES.len())
                .filter(|&t| seen.held_by(t) + seen.queued_for(t) > 0)
                .count();
            prop_assert_eq!(b.tracked_tenants(), active);
        }
    }
    drop(seen);
    prop_assert_eq!((b.in_use(), b.queued(), b.tracked_tenants()), (0, 0, 0));
    Ok(())
}
