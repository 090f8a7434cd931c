//! The tower layers: readiness, where permits are held, refusals and cancellation.
#![cfg(feature = "tower")]

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::FutureExt;
use headroom_limit::adaptive::{AdaptiveConfig, AimdConfig};
use headroom_limit::tower::{
    BoxError, BulkheadLayer, Identify, KeyedBulkheadLayer, LoadShedLayer, QueueLayer,
};
use headroom_limit::{
    Bulkhead, KeyedBulkhead, LoadShedder, Overflow, Overloaded, Priority, QueueConfig, Reason,
    TenantClass,
};
use tokio::sync::Semaphore;
use tower::{Layer, Service, ServiceExt, service_fn};

fn reason(error: &BoxError) -> Reason {
    error
        .downcast_ref::<Overloaded>()
        .expect("an Overloaded rejection")
        .reason()
}

/// A service that completes each request when the test adds a permit to `gate`.
fn gated(
    gate: Arc<Semaphore>,
    runs: Arc<AtomicUsize>,
) -> impl Service<
    u32,
    Response = u32,
    Error = Infallible,
    Future = impl std::future::Future<Output = Result<u32, Infallible>> + Send,
> + Clone
+ Send
+ 'static {
    service_fn(move |n: u32| {
        let (gate, runs) = (Arc::clone(&gate), Arc::clone(&runs));
        async move {
            runs.fetch_add(1, Ordering::SeqCst);
            gate.acquire().await.expect("open").forget();
            Ok::<_, Infallible>(n)
        }
    })
}

#[tokio::test]
async fn bulkhead_permits_are_held_by_requests_not_by_ready_connections() {
    let bulkhead = Bulkhead::builder("b").max_concurrent(1).build().unwrap();
    let layer = BulkheadLayer::new(bulkhead.clone());
    let gate = Arc::new(Semaphore::new(0));
    let runs = Arc::new(AtomicUsize::new(0));
    // Many idle "connections" that polled ready hold nothing.
    let mut connections: Vec<_> = (0..8)
        .map(|_| layer.layer(gated(Arc::clone(&gate), Arc::clone(&runs))))
        .collect();
    for connection in &mut connections {
        connection.ready().await.unwrap();
    }
    assert_eq!(bulkhead.in_use(), 0);

    let first = connections[0].call(1);
    assert_eq!(bulkhead.in_use(), 1);
    let refused = connections[1].call(2).await.unwrap_err();
    assert_eq!(reason(&refused), Reason::QueueFull);
    gate.add_permits(1);
    assert_eq!(first.await.unwrap(), 1);
    assert_eq!(bulkhead.in_use(), 0);
}

#[tokio::test(start_paused = true)]
async fn waiting_and_running_requests_release_everything_when_dropped() {
    let bulkhead = Bulkhead::builder("b")
        .max_concurrent(1)
        .max_queued(4)
        .max_wait(Duration::from_secs(1))
        .build()
        .unwrap();
    let gate = Arc::new(Semaphore::new(0));
    let runs = Arc::new(AtomicUsize::new(0));
    let mut service =
        BulkheadLayer::new(bulkhead.clone()).layer(gated(Arc::clone(&gate), Arc::clone(&runs)));
    let mut running = Box::pin(service.ready().await.unwrap().call(1));
    assert!(running.as_mut().now_or_never().is_none());
    let mut waiting = Box::pin(service.ready().await.unwrap().call(2));
    assert!(waiting.as_mut().now_or_never().is_none());
    assert_eq!((bulkhead.in_use(), bulkhead.queued()), (1, 1));
    drop(waiting);
    assert_eq!(bulkhead.queued(), 0);
    drop(running);
    assert_eq!(bulkhead.in_use(), 0);
    assert_eq!(
        runs.load(Ordering::SeqCst),
        1,
        "the waiting request never ran"
    );

    // A waiting request runs once a permit frees up.
    let running = tokio::spawn(service.ready().await.unwrap().call(3));
    tokio::task::yield_now().await;
    let waiting = tokio::spawn(service.ready().await.unwrap().call(4));
    tokio::task::yield_now().await;
    gate.add_permits(2);
    assert_eq!(running.await.unwrap().unwrap(), 3);
    assert_eq!(waiting.await.unwrap().unwrap(), 4);
    assert_eq!(bulkhead.in_use(), 0);
}

/// A service that is not ready until told so.
#[derive(Clone)]
struct NotReady;

impl Service<u32> for NotReady {
    type Response = u32;
    type Error = Infallible;
    type Future = std::future::Ready<Result<u32, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Pending
    }

    fn call(&mut self, n: u32) -> Self::Future {
        std::future::ready(Ok(n))
    }
}

#[tokio::test]
async fn inner_backpressure_passes_through_bulkhead_and_shedder() {
    let bulkhead = Bulkhead::builder("b").build().unwrap();
    let shedder = LoadShedder::builder(bulkhead.clone()).build().unwrap();
    let mut service = LoadShedLayer::new(shedder, |_: &u32| Priority::Sheddable)
        .layer(BulkheadLayer::new(bulkhead.clone()).layer(NotReady));
    assert!(service.ready().now_or_never().is_none());
    assert_eq!(bulkhead.in_use(), 0);
}

#[tokio::test]
async fn shed_layer_refuses_low_priority_requests_under_load() {
    let bulkhead = Bulkhead::builder("b").max_concurrent(4).build().unwrap();
    let shedder = LoadShedder::builder(bulkhead.clone()).build().unwrap();
    let mut service = LoadShedLayer::new(shedder.clone(), |n: &u32| {
        if *n == 0 {
            Priority::Critical
        } else {
            Priority::Sheddable
        }
    })
    .layer(
        BulkheadLayer::new(bulkhead.clone())
            .layer(service_fn(|n: u32| async move { Ok::<_, Infallible>(n) })),
    );
    let _held: Vec<_> = (0..3).map(|_| bulkhead.try_acquire().unwrap()).collect();
    let refused = service.ready().await.unwrap().call(7).await.unwrap_err();
    assert_eq!(reason(&refused), Reason::InFlight);
    assert_eq!(service.ready().await.unwrap().call(0).await.unwrap(), 0);
    assert_eq!(shedder.rejected(Priority::Sheddable, Reason::InFlight), 1);
}

/// Behind a `LoadShedLayer`, the bulkhead's own refusals carry the priority the shedder gave
/// the request, as `LoadShedder::acquire`'s do: a critical request the shedder let through
/// and the bulkhead then refused (its wait over) is counted as critical.
#[tokio::test(start_paused = true)]
async fn bulkhead_refusals_behind_the_shedder_carry_the_requests_priority() {
    let bulkhead = Bulkhead::builder("b")
        .max_concurrent(1)
        .max_queued(1)
        .max_wait(Duration::from_millis(10))
        .build()
        .unwrap();
    let shedder = LoadShedder::builder(bulkhead.clone()).build().unwrap();
    let mut service = LoadShedLayer::new(shedder, |_: &u32| Priority::Critical).layer(
        BulkheadLayer::new(bulkhead.clone())
            .layer(service_fn(|n: u32| async move { Ok::<_, Infallible>(n) })),
    );
    let held = bulkhead.try_acquire().unwrap();
    let refused = service.ready().await.unwrap().call(1).await.unwrap_err();
    let refused = refused.downcast_ref::<Overloaded>().expect("a refusal");
    assert_eq!(
        (refused.reason(), refused.priority()),
        (Reason::WaitTimeout, Priority::Critical)
    );
    drop(held);
    // A bulkhead layer alone refuses as the default priority.
    let bulkhead = Bulkhead::builder("b").max_concurrent(1).build().unwrap();
    let mut service = BulkheadLayer::new(bulkhead.clone())
        .layer(service_fn(|n: u32| async move { Ok::<_, Infallible>(n) }));
    let _held = bulkhead.try_acquire().unwrap();
    let refused = service.ready().await.unwrap().call(1).await.unwrap_err();
    let refused = refused.downcast_ref::<Overloaded>().expect("a refusal");
    assert_eq!(refused.priority(), Priority::Default);
}

/// A bulkhead with an AIMD limit starting at `initial_limit`.
fn aimd(initial_limit: usize) -> Bulkhead {
    Bulkhead::builder("b")
        .adaptive(AdaptiveConfig::Aimd(AimdConfig {
            initial_limit,
            ..AimdConfig::default()
        }))
        .build()
        .unwrap()
}

#[tokio::test]
async fn errors_teach_the_adaptive_limit_through_the_layer() {
    let bulkhead = aimd(10);
    let mut service =
        BulkheadLayer::new(bulkhead.clone()).layer(service_fn(|fail: bool| async move {
            if fail {
                Err(std::io::Error::other("downstream timed out"))
            } else {
                Ok(())
            }
        }));
    let error = service.ready().await.unwrap().call(true).await.unwrap_err();
    assert!(
        error.downcast_ref::<std::io::Error>().is_some(),
        "inner errors pass through"
    );
    assert_eq!(bulkhead.limit(), 9);
}

/// A panicking service teaches the limit nothing, also when the panic is caught around the
/// request (a catch-panic layer above) and its future dropped only after the unwinding.
#[tokio::test]
async fn a_caught_panic_teaches_the_adaptive_limit_nothing() {
    let bulkhead = aimd(10);
    let mut service =
        BulkheadLayer::new(bulkhead.clone()).layer(service_fn(|poison: bool| async move {
            tokio::task::yield_now().await;
            assert!(!poison, "a poison request");
            Ok::<_, Infallible>(())
        }));
    for _ in 0..3 {
        let call = service.ready().await.unwrap().call(true);
        let caught = std::panic::AssertUnwindSafe(call).catch_unwind().await;
        assert!(caught.is_err(), "the service panicked");
    }
    assert_eq!(bulkhead.in_use(), 0, "every permit came back");
    assert_eq!(bulkhead.limit(), 10, "panics are ignored, not drops");
}

#[tokio::test(start_paused = true)]
async fn a_request_cancelled_while_running_counts_as_a_drop() {
    // AIMD from 2: a success with both permits in use would grow the limit to 3, a drop
    // backs it off to 1.
    let bulkhead = aimd(2);
    let mut service = BulkheadLayer::new(bulkhead.clone()).layer(service_fn(|()| {
        std::future::pending::<Result<(), Infallible>>()
    }));
    let _other = bulkhead.try_acquire().unwrap();
    let call = service.ready().await.unwrap().call(());
    // The caller's timeout fires while the request runs, and drops its future.
    let timed_out = tokio::time::timeout(Duration::from_millis(50), call).await;
    assert!(timed_out.is_err());
    assert_eq!(
        bulkhead.in_use(),
        1,
        "the cancelled request returned its permit"
    );
    assert_eq!(bulkhead.limit(), 1, "cancellation taught the limit a drop");
}

#[tokio::test]
async fn queue_layer_serves_by_priority_and_refuses_when_full() {
    let gate = Arc::new(Semaphore::new(0));
    let runs = Arc::new(AtomicUsize::new(0));
    let config = QueueConfig {
        capacity: 2,
        ..QueueConfig::default()
    };
    let layer = QueueLayer::new("q", config, 1, |n: &u32| {
        if *n >= 100 {
            Priority::Critical
        } else {
            Priority::Default
        }
    })
    .unwrap();
    let mut service = layer.layer(gated(Arc::clone(&gate), Arc::clone(&runs)));
    let first = tokio::spawn(service.ready().await.unwrap().call(1));
    // Let the worker take the first request.
    while runs.load(Ordering::SeqCst) == 0 {
        tokio::task::yield_now().await;
    }
    let low = tokio::spawn(service.ready().await.unwrap().call(2));
    let high = tokio::spawn(service.ready().await.unwrap().call(100));
    tokio::task::yield_now().await;
    let refused = service.ready().await.unwrap().call(3).await.unwrap_err();
    assert_eq!(reason(&refused), Reason::QueueFull);
    gate.add_permits(1);
    assert_eq!(first.await.unwrap().unwrap(), 1);
    gate.add_permits(1);
    assert_eq!(high.await.unwrap().unwrap(), 100);
    assert!(!low.is_finished(), "the critical request went first");
    gate.add_permits(1);
    assert_eq!(low.await.unwrap().unwrap(), 2);
}

#[tokio::test]
async fn queue_layer_skips_requests_whose_caller_left_and_stops_with_the_service() {
    let gate = Arc::new(Semaphore::new(0));
    let runs = Arc::new(AtomicUsize::new(0));
    let layer =
        QueueLayer::new("q", QueueConfig::default(), 1, |_: &u32| Priority::Default).unwrap();
    let mut service = layer.layer(gated(Arc::clone(&gate), Arc::clone(&runs)));
    let first = tokio::spawn(service.ready().await.unwrap().call(1));
    while runs.load(Ordering::SeqCst) == 0 {
        tokio::task::yield_now().await;
    }
    let abandoned = service.ready().await.unwrap().call(2);
    drop(abandoned);
    let kept = tokio::spawn(service.ready().await.unwrap().call(3));
    tokio::task::yield_now().await;
    gate.add_permits(2);
    assert_eq!(first.await.unwrap().unwrap(), 1);
    assert_eq!(kept.await.unwrap().unwrap(), 3);
    assert_eq!(
        runs.load(Ordering::SeqCst),
        2,
        "the abandoned request never ran"
    );
    // The worker owns a clone of the inner service (and so of `runs`); it lets go once the
    // last handle to the queue service is dropped.
    assert!(Arc::strong_count(&runs) > 1);
    drop(service);
    for _ in 0..100 {
        if Arc::strong_count(&runs) == 1 {
            break;
        }
        tokio::task::yield_now().await;
    }
    assert_eq!(Arc::strong_count(&runs), 1, "the worker stopped");
}

#[tokio::test(start_paused = true)]
async fn queue_layer_wait_policy_waits_for_room_inside_the_future() {
    let gate = Arc::new(Semaphore::new(0));
    let runs = Arc::new(AtomicUsize::new(0));
    let config = QueueConfig {
        capacity: 1,
        overflow: Overflow::Wait {
            timeout: Duration::from_millis(50),
        },
        ..QueueConfig::default()
    };
    let layer = QueueLayer::new("q", config, 1, |_: &u32| Priority::Default).unwrap();
    let mut service = layer.layer(gated(Arc::clone(&gate), Arc::clone(&runs)));
    let first = tokio::spawn(service.ready().await.unwrap().call(1));
    while runs.load(Ordering::SeqCst) == 0 {
        tokio::task::yield_now().await;
    }
    let queued = tokio::spawn(service.ready().await.unwrap().call(2));
    tokio::task::yield_now().await;
    let refused = service.ready().await.unwrap().call(3).await.unwrap_err();
    assert_eq!(reason(&refused), Reason::WaitTimeout);
    let waiting = tokio::spawn(service.ready().await.unwrap().call(4));
    tokio::task::yield_now().await;
    gate.add_permits(3);
    assert_eq!(first.await.unwrap().unwrap(), 1);
    assert_eq!(queued.await.unwrap().unwrap(), 2);
    assert_eq!(waiting.await.unwrap().unwrap(), 4, "it waited and got in");
    // Only the request that never got in counts as refused.
    assert_eq!(service.rejected(Priority::Default, Reason::WaitTimeout), 1);
    assert_eq!(service.rejected(Priority::Default, Reason::QueueFull), 0);
}

#[test]
fn queue_layer_rejects_bad_configuration() {
    assert_eq!(
        QueueLayer::<u32, _>::new("q", QueueConfig::default(), 0, |_: &u32| Priority::Default)
            .unwrap_err()
            .field(),
        "workers"
    );
}

/// A panic in the inner service fails that request only: the worker lives on and serves the
/// next one, however many requests panicked before.
#[tokio::test(start_paused = true)]
async fn a_panicking_request_fails_alone_and_the_workers_live_on() {
    let layer = QueueLayer::new("q", QueueConfig::default(), 2, |_: &u32| Priority::Default)
        .expect("valid layer");
    let mut service = layer.layer(service_fn(|n: u32| async move {
        assert!(n != 0, "the handler panics on 0");
        Ok::<_, Infallible>(n * 10)
    }));
    for _ in 0..5 {
        let failed = tokio::time::timeout(
            Duration::from_secs(1),
            service.ready().await.expect("ready").call(0),
        )
        .await
        .expect("a panicking request is answered, not left hanging");
        let error = failed.expect_err("the panicking request fails");
        assert!(error.is::<headroom_limit::tower::Panicked>(), "{error}");
    }
    let answer = tokio::time::timeout(
        Duration::from_secs(1),
        service.ready().await.expect("ready").call(4),
    )
    .await
    .expect("the workers still serve");
    assert_eq!(answer.expect("served"), 40);
}

/// A service whose first readiness check fails; the instance that failed stays failed, as
/// tower allows, while fresh clones work.
#[derive(Clone)]
struct FailsOnce {
    failed: Arc<std::sync::atomic::AtomicBool>,
    broken: bool,
}

impl Service<u32> for FailsOnce {
    type Response = u32;
    type Error = BoxError;
    type Future = std::future::Ready<Result<u32, BoxError>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        if self.broken || !self.failed.swap(true, Ordering::SeqCst) {
            self.broken = true;
            return Poll::Ready(Err("not ready".into()));
        }
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, n: u32) -> Self::Future {
        std::future::ready(Ok(n))
    }
}

/// A service whose `poll_ready` failed is discarded, as tower requires: the request fails
/// with that error and the worker serves the next one with a fresh clone.
#[tokio::test]
async fn a_queue_worker_replaces_a_service_that_failed_readiness() {
    let layer = QueueLayer::new("q", QueueConfig::default(), 1, |_: &u32| Priority::Default)
        .expect("valid layer");
    let mut service = layer.layer(FailsOnce {
        failed: Arc::default(),
        broken: false,
    });
    let first = service.ready().await.expect("ready").call(1).await;
    assert_eq!(
        first.expect_err("readiness failed").to_string(),
        "not ready"
    );
    let second = service.ready().await.expect("ready").call(2).await;
    assert_eq!(second.expect("served by a fresh clone"), 2);
}

/// A service that records which requests started, then completes each request when the
/// test adds a permit to `gate` (in the order the requests started).
fn recorded(
    gate: Arc<Semaphore>,
    started: Arc<std::sync::Mutex<Vec<u32>>>,
) -> impl Service<
    u32,
    Response = u32,
    Error = Infallible,
    Future = impl std::future::Future<Output = Result<u32, Infallible>> + Send,
> + Clone
+ Send
+ 'static {
    service_fn(move |n: u32| {
        started.lock().unwrap().push(n);
        let gate = Arc::clone(&gate);
        async move {
            gate.acquire().await.expect("open").forget();
            Ok::<_, Infallible>(n)
        }
    })
}

type Call = std::pin::Pin<Box<dyn std::future::Future<Output = Result<u32, BoxError>> + Send>>;

/// Calls `service` with `n` and polls the response once.
async fn start<S>(service: &mut S, n: u32) -> Call
where
    S: Service<u32, Response = u32, Error = BoxError>,
    S::Future: Send + 'static,
{
    let mut call: Call = Box::pin(service.ready().await.unwrap().call(n));
    assert!(call.as_mut().now_or_never().is_none());
    call
}

#[tokio::test]
async fn keyed_bulkhead_layer_serves_a_quiet_tenant_before_a_busy_one() {
    let bulkhead = KeyedBulkhead::builder("k")
        .max_concurrent(2)
        .max_queued(4)
        .max_wait(Duration::from_secs(3_600))
        .build()
        .unwrap();
    let gate = Arc::new(Semaphore::new(0));
    let started = Arc::new(std::sync::Mutex::new(Vec::new()));
    // Requests 0..100 belong to tenant 0, 100..200 to tenant 1.
    let mut service = KeyedBulkheadLayer::new(bulkhead.clone(), |n: &u32| n / 100)
        .layer(recorded(Arc::clone(&gate), Arc::clone(&started)));
    let mut first = start(&mut service, 1).await;
    let _second = start(&mut service, 2).await;
    let _third = start(&mut service, 3).await;
    let mut quiet = start(&mut service, 101).await;
    assert_eq!((bulkhead.in_use(), bulkhead.queued()), (2, 2));
    gate.add_permits(1);
    assert_eq!(first.as_mut().now_or_never().unwrap().unwrap(), 1);
    // The permit request 1 returned went to tenant 1, which asked after request 3.
    assert_eq!(bulkhead.queued(), 1);
    assert!(quiet.as_mut().now_or_never().is_none());
    assert_eq!(*started.lock().unwrap(), [1, 2, 101]);

    // Dropping requests, waiting or running, gives everything back.
    drop((quiet, _second, _third));
    assert_eq!(
        (
            bulkhead.in_use(),
            bulkhead.queued(),
            bulkhead.tracked_tenants()
        ),
        (0, 0, 0)
    );
}

/// Tenant `n / 100`; tenant 1 is of the `gold` class.
#[derive(Clone)]
struct ByTenant {
    gold: TenantClass,
}

impl Identify<u32> for ByTenant {
    type Tenant = u32;

    fn tenant(&self, n: &u32) -> u32 {
        n / 100
    }

    fn class(&self, n: &u32) -> TenantClass {
        if n / 100 == 1 {
            self.gold
        } else {
            TenantClass::DEFAULT
        }
    }
}

#[tokio::test]
async fn keyed_bulkhead_layer_takes_the_class_from_identify() {
    let bulkhead = KeyedBulkhead::builder("k")
        .max_concurrent(4)
        .max_queued(4)
        .max_wait(Duration::from_secs(3_600))
        .class("gold", 3)
        .build()
        .unwrap();
    let gold = bulkhead.class("gold").unwrap();
    let gate = Arc::new(Semaphore::new(0));
    let started = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut service = KeyedBulkheadLayer::new(bulkhead.clone(), ByTenant { gold })
        .layer(recorded(Arc::clone(&gate), Arc::clone(&started)));
    let mut plain = start(&mut service, 1).await;
    let mut calls = Vec::new();
    for n in [2, 101, 102, 3, 103] {
        calls.push(start(&mut service, n).await);
    }
    assert_eq!((bulkhead.in_use(), bulkhead.queued()), (4, 2));
    gate.add_permits(1);
    assert_eq!(plain.as_mut().now_or_never().unwrap().unwrap(), 1);
    // Each holds 2 now; gold's share is 3 of 4, so its request (asked after request 3) runs.
    for call in &mut calls {
        assert!(call.as_mut().now_or_never().is_none());
    }
    assert_eq!(*started.lock().unwrap(), [1, 2, 101, 102, 103]);
}
