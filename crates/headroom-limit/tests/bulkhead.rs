//! Bulkhead behaviour: admission, waiting, resizing, and release on every path.

use std::time::Duration;

use futures_util::FutureExt;
use headroom_core::{Classify, ManualClock};
use headroom_limit::{Bulkhead, OwnedPermit, Reason};
use proptest::prelude::*;

fn bulkhead(max_concurrent: usize, max_queued: usize, max_wait: Duration) -> Bulkhead {
    Bulkhead::builder("test")
        .max_concurrent(max_concurrent)
        .max_queued(max_queued)
        .max_wait(max_wait)
        .build()
        .expect("valid bulkhead")
}

/// Takes permits until refused; returns how many were free.
fn drain(bulkhead: &Bulkhead) -> usize {
    let mut held = Vec::new();
    while let Ok(permit) = bulkhead.try_acquire() {
        held.push(permit);
        assert!(held.len() <= 1_000, "bulkhead handed out unbounded permits");
    }
    held.len()
}

#[tokio::test]
async fn refuses_beyond_limit_with_typed_counted_rejection() {
    let b = bulkhead(2, 0, Duration::from_millis(10));
    let _a = b.try_acquire().expect("first");
    let _c = b.acquire().await.expect("second");
    let refused = b.acquire().await.expect_err("third is refused");
    assert_eq!(refused.reason(), Reason::QueueFull);
    assert!(refused.is_rejected() && refused.is_retryable());
    assert_eq!(b.try_acquire().unwrap_err().reason(), Reason::QueueFull);
    assert_eq!(b.rejected(Reason::QueueFull), 2);
    assert_eq!(b.in_use(), 2);
}

#[tokio::test(start_paused = true)]
async fn waiter_gets_released_permit_and_records_queue_delay() {
    let b = bulkhead(1, 1, Duration::from_secs(1));
    let held = b.acquire().await.expect("first");
    let waiter = tokio::spawn({
        let b = b.clone();
        async move { b.acquire().await.map(drop) }
    });
    tokio::time::sleep(Duration::from_millis(30)).await;
    assert_eq!(b.queued(), 1);
    // The queue is full: a third caller is refused at once.
    assert_eq!(b.acquire().await.unwrap_err().reason(), Reason::QueueFull);
    drop(held);
    waiter.await.expect("task").expect("waiter admitted");
    assert!(b.queue_delay() >= Duration::from_millis(30));
    assert_eq!((b.in_use(), b.queued()), (0, 0));
}

#[tokio::test]
async fn wait_is_bounded_by_max_wait_on_the_manual_clock() {
    let manual = ManualClock::new();
    let b = Bulkhead::builder("manual")
        .max_concurrent(1)
        .max_queued(4)
        .max_wait(Duration::from_millis(50))
        .clock(manual.clock())
        .build()
        .expect("valid");
    let _held = b.acquire().await.expect("first");
    let waiter = tokio::spawn({
        let b = b.clone();
        async move { b.acquire().await.map(drop) }
    });
    tokio::task::yield_now().await;
    manual.advance(Duration::from_millis(49));
    tokio::task::yield_now().await;
    assert!(!waiter.is_finished());
    manual.advance(Duration::from_millis(1));
    let refused = waiter.await.expect("task").expect_err("timed out");
    assert_eq!(refused.reason(), Reason::WaitTimeout);
    assert!(
        !refused.is_timeout(),
        "a wait timeout is a rejection, not the caller's timeout"
    );
    assert_eq!(b.queued(), 0);
    assert_eq!(b.rejected(Reason::WaitTimeout), 1);
}

#[tokio::test]
async fn permit_is_released_when_the_holder_panics() {
    let b = bulkhead(1, 0, Duration::ZERO);
    let task = tokio::spawn({
        let b = b.clone();
        async move {
            let _permit = b.acquire().await.expect("admitted");
            panic!("user code fails");
        }
    });
    assert!(task.await.expect_err("panicked").is_panic());
    assert_eq!(b.in_use(), 0);
    assert_eq!(drain(&b), 1);
}

#[tokio::test]
async fn growing_wakes_waiters_and_shrinking_retires_permits_as_they_return() {
    let b = bulkhead(2, 8, Duration::from_secs(60));
    let first = b.try_acquire().expect("1");
    let second = b.try_acquire().expect("2");
    let waiter = tokio::spawn({
        let b = b.clone();
        async move { b.acquire().await.map(drop) }
    });
    tokio::task::yield_now().await;
    b.set_max_concurrent(3).expect("grow");
    waiter.await.expect("task").expect("woken by growth");

    b.set_max_concurrent(1).expect("shrink");
    assert_eq!(b.limit(), 1);
    drop(first);
    assert!(
        b.try_acquire().is_err(),
        "a returned permit pays the shrink first"
    );
    drop(second);
    assert_eq!(drain(&b), 1);
    assert!(b.set_max_concurrent(0).is_err());
}

/// A permit handed to a waiter that then gives up comes back to the bulkhead; after a shrink
/// it pays what the shrink still owes before anyone can take it.
#[tokio::test]
async fn a_permit_left_by_a_cancelled_waiter_pays_a_shrink_first() {
    let b = bulkhead(2, 1, Duration::from_secs(60));
    let a = b.try_acquire_owned().expect("1");
    let _b = b.try_acquire_owned().expect("2");
    let mut waiter = Box::pin(b.acquire_owned());
    assert!(
        (&mut waiter).now_or_never().is_none(),
        "no permit free: waits"
    );
    drop(a); // handed over to the waiter, which has not run since
    b.set_max_concurrent(1).expect("shrink");
    drop(waiter);
    assert_eq!(b.in_use(), 1);
    assert_eq!(
        b.try_acquire().map(drop).unwrap_err().reason(),
        Reason::QueueFull,
        "one permit held under a limit of one"
    );
    assert_eq!(b.in_use(), 1);
}

#[tokio::test]
async fn growth_beyond_the_waiters_is_free_at_once() {
    let b = bulkhead(1, 8, Duration::from_secs(60));
    let _held = b.try_acquire().expect("the only permit");
    let waiter = tokio::spawn({
        let b = b.clone();
        async move { b.acquire().await.map(drop) }
    });
    tokio::task::yield_now().await;
    assert_eq!(b.queued(), 1);
    b.set_max_concurrent(4).expect("grow");
    assert_eq!(
        drain(&b),
        2,
        "of three new permits, one goes to the waiter and two are free"
    );
    waiter
        .await
        .expect("task")
        .expect("the waiter gets its permit");
    assert_eq!(drain(&b), 3);
}

#[test]
fn bad_configuration_is_a_typed_error() {
    let err = Bulkhead::builder("zero")
        .max_concurrent(0)
        .build()
        .unwrap_err();
    assert_eq!(err.field(), "max_concurrent");
    assert!(!err.is_retryable());
    assert!(
        Bulkhead::builder("huge")
            .max_concurrent(usize::MAX)
            .build()
            .is_err()
    );
}

/// Cancels callers at random moments: while waiting for a permit, while holding one across
/// an await, and right at admission. Afterwards nothing is held or queued and every permit
/// can be taken again.
#[tokio::test(start_paused = true)]
async fn cancellation_at_random_await_points_leaks_nothing() {
    for seed in 0..20_u64 {
        let mut rng = fastrand::Rng::with_seed(seed);
        let limit = rng.usize(1..6);
        let b = bulkhead(
            limit,
            rng.usize(0..8),
            Duration::from_millis(rng.u64(1..40)),
        );
        let mut tasks = Vec::new();
        for _ in 0..60 {
            let b = b.clone();
            let work = Duration::from_millis(rng.u64(0..20));
            let cancel_after = Duration::from_millis(rng.u64(0..30));
            let start = Duration::from_millis(rng.u64(0..40));
            tasks.push(tokio::spawn(async move {
                tokio::time::sleep(start).await;
                let _ = tokio::time::timeout(cancel_after, async {
                    if let Ok(permit) = b.acquire().await {
                        tokio::time::sleep(work).await;
                        drop(permit);
                    }
                })
                .await;
            }));
        }
        // Abort some tasks from outside as well, wherever they are.
        for task in tasks.iter().step_by(7) {
            tokio::time::sleep(Duration::from_millis(rng.u64(0..5))).await;
            task.abort();
        }
        for task in tasks {
            let _ = task.await;
        }
        assert_eq!((b.in_use(), b.queued()), (0, 0), "seed {seed}");
        assert_eq!(drain(&b), limit, "seed {seed}");
    }
}

#[derive(Clone, Debug)]
enum Op {
    TryAcquire,
    Release(usize),
    Resize(usize),
    StartWaiter,
    PollWaiters,
    CancelWaiter(usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => Just(Op::TryAcquire),
        3 => (0..16_usize).prop_map(Op::Release),
        2 => (1..8_usize).prop_map(Op::Resize),
        2 => Just(Op::StartWaiter),
        2 => Just(Op::PollWaiters),
        1 => (0..16_usize).prop_map(Op::CancelWaiter),
    ]
}

type Waiter = std::pin::Pin<
    Box<dyn std::future::Future<Output = Result<OwnedPermit, headroom_limit::Overloaded>>>,
>;

proptest! {
    /// Against a model: never more permits out than the limit allows (a shrink cannot revoke
    /// held permits, so held permits may exceed a new, smaller limit until returned), no
    /// caller is admitted at once while the permits held reach the limit (a shrink retires
    /// free permits at once and the rest as they are released, however they come back), and
    /// after everything is returned exactly `limit` permits are free. Waiters run only when
    /// polled, so a permit can be handed to one that gives up before it runs.
    #[test]
    fn permits_follow_the_model(ops in proptest::collection::vec(op(), 1..80)) {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async {
            let b = bulkhead(3, 16, Duration::from_secs(3_600));
            let mut held: Vec<OwnedPermit> = Vec::new();
            let mut waiters: Vec<Waiter> = Vec::new();
            let mut max_limit_since_last_idle = b.limit();
            for op in ops {
                let polled = matches!(op, Op::PollWaiters);
                match op {
                    Op::TryAcquire => if let Ok(p) = b.try_acquire_owned() {
                        prop_assert!(held.len() < b.limit(), "taken with {} held under limit {}", held.len(), b.limit());
                        held.push(p);
                    },
                    Op::Release(i) => if !held.is_empty() { drop(held.swap_remove(i % held.len())); },
                    Op::Resize(n) => {
                        b.set_max_concurrent(n).unwrap();
                        max_limit_since_last_idle = max_limit_since_last_idle.max(n);
                    }
                    Op::StartWaiter => {
                        let mut w: Waiter = Box::pin({
                            let b = b.clone();
                            async move { b.acquire_owned().await }
                        });
                        // The first poll takes a free permit or starts waiting.
                        match w.as_mut().now_or_never() {
                            Some(Ok(p)) => {
                                prop_assert!(held.len() < b.limit(), "admitted with {} held under limit {}", held.len(), b.limit());
                                held.push(p);
                            }
                            Some(Err(_)) => {}
                            None => waiters.push(w),
                        }
                    }
                    Op::PollWaiters => {
                        // Admitted waiters join the holders.
                        let mut still = Vec::new();
                        for mut w in waiters.drain(..) {
                            match w.as_mut().now_or_never() {
                                Some(Ok(p)) => held.push(p),
                                Some(Err(_)) => {}
                                None => still.push(w),
                            }
                        }
                        waiters = still;
                    }
                    Op::CancelWaiter(i) => if !waiters.is_empty() { drop(waiters.swap_remove(i % waiters.len())); },
                }
                prop_assert!(held.len() <= max_limit_since_last_idle);
                // A permit handed to a waiter that has not run yet is in use too.
                if polled || waiters.is_empty() {
                    prop_assert_eq!(b.in_use(), held.len());
                } else {
                    prop_assert!(b.in_use() >= held.len());
                }
                if held.is_empty() && waiters.is_empty() { max_limit_since_last_idle = b.limit(); }
            }
            drop(waiters);
            drop(held);
            prop_assert_eq!((b.in_use(), b.queued()), (0, 0));
            prop_assert_eq!(drain(&b), b.limit());
            Ok(())
        })?;
    }
}

/// The lock-free fast path and the hand-off to waiters, on two threads at once: the limit
/// is never exceeded, no waiter sleeps past a free permit (the run would stall for the
/// minute-long `max_wait`), and nothing leaks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn threads_racing_on_fast_path_and_queue_keep_the_invariants() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    let limit = 3;
    let b = bulkhead(limit, 64, Duration::from_secs(60));
    let holding = Arc::new(AtomicUsize::new(0));
    let most = Arc::new(AtomicUsize::new(0));
    let waited = Arc::new(AtomicUsize::new(0));
    let run = async {
        let tasks: Vec<_> = (0..32_u64)
            .map(|task| {
                let (b, holding, most) = (b.clone(), Arc::clone(&holding), Arc::clone(&most));
                let waited = Arc::clone(&waited);
                tokio::spawn(async move {
                    let mut rng = fastrand::Rng::with_seed(task);
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
                                if let Ok(permit) = b.try_acquire() {
                                    hold(permit).await;
                                }
                            }
                            1 => hold(b.acquire().await.expect("admitted within a minute")).await,
                            _ => {
                                // Gives up after a random number of polls.
                                let give_up = rng.u32(0..3);
                                let attempt = std::pin::pin!(b.acquire());
                                let mut attempt = attempt;
                                for _ in 0..=give_up {
                                    if let Some(result) = (&mut attempt).now_or_never() {
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
    assert!(most.load(Ordering::SeqCst) <= limit);
    assert!(
        waited.load(Ordering::SeqCst) > 0,
        "the queue path was exercised"
    );
    assert_eq!((b.in_use(), b.queued()), (0, 0));
    assert_eq!(drain(&b), limit);
}

/// An adaptive bulkhead's settings are fixed at build: a reconfiguration may leave them out
/// or repeat them, and one that changes them is refused.
#[test]
fn an_adaptive_bulkhead_refuses_other_adaptive_settings() {
    use headroom_limit::BulkheadConfig;
    use headroom_limit::adaptive::{AdaptiveConfig, AimdConfig, GradientConfig};
    let built = AdaptiveConfig::Aimd(AimdConfig::default());
    let bulkhead = Bulkhead::builder("adaptive")
        .adaptive(built.clone())
        .build()
        .unwrap();
    let mut config = BulkheadConfig {
        max_wait: Duration::from_millis(5),
        ..BulkheadConfig::default()
    };
    bulkhead.reconfigure(&config).unwrap();
    assert_eq!(bulkhead.max_wait(), Duration::from_millis(5));
    config.adaptive = Some(built);
    bulkhead.reconfigure(&config).unwrap();
    config.adaptive = Some(AdaptiveConfig::Gradient(GradientConfig::default()));
    assert_eq!(
        bulkhead.reconfigure(&config).unwrap_err().field(),
        "adaptive"
    );
}

/// The largest limit is 2³¹ − 1, as documented: past it, building or resizing is refused
/// with an error naming the setting.
#[test]
fn limits_past_two_to_the_thirty_one_are_refused() {
    let largest = (1usize << 31) - 1;
    let bulkhead = Bulkhead::builder("b")
        .max_concurrent(largest)
        .build()
        .unwrap();
    let refused = Bulkhead::builder("b")
        .max_concurrent(largest + 1)
        .build()
        .unwrap_err();
    assert_eq!(refused.field(), "max_concurrent");
    assert_eq!(
        bulkhead
            .set_max_concurrent(largest + 1)
            .unwrap_err()
            .field(),
        "max_concurrent"
    );
    assert!(bulkhead.try_acquire().is_ok());
}
