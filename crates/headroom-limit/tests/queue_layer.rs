//! The queue layer under callers that give up: a request whose caller has gone holds no place
//! a live request needs.
#![cfg(feature = "tower")]

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures_util::FutureExt;
use headroom_limit::tower::{BoxError, QueueLayer};
use headroom_limit::{Overflow, Overloaded, Priority, QueueConfig, Reason};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::sync::Semaphore;
use tower::{Layer, Service, ServiceExt, service_fn};

/// How long a caller waits before it gives up and drops its response future.
const CALLER_TIMEOUT: Duration = Duration::from_millis(100);

fn reason(error: &BoxError) -> Reason {
    let Some(overloaded) = error.downcast_ref::<Overloaded>() else {
        panic!("not an Overloaded rejection: {error}");
    };
    overloaded.reason()
}

/// A response as the tests compare it: the answer, or why the request was turned away.
fn outcome(response: Result<u32, BoxError>) -> Result<u32, Reason> {
    response.map_err(|error| reason(&error))
}

/// A service that counts the requests it starts and completes each one when the test adds a
/// permit to `gate`.
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

/// Lets the runtime go on until the service has started `count` requests.
async fn started(runs: &AtomicUsize, count: usize) {
    while runs.load(Ordering::SeqCst) < count {
        tokio::task::yield_now().await;
    }
}

/// The `headroom_limit_queued_requests` gauge as `handle` renders it.
fn queued_gauge(handle: &PrometheusHandle) -> Option<f64> {
    handle
        .render()
        .lines()
        .find(|line| line.starts_with("headroom_limit_queued_requests"))
        .and_then(|line| line.rsplit(' ').next()?.parse().ok())
}

/// Requests 100 and above are critical.
fn by_number(n: &u32) -> Priority {
    if *n >= 100 {
        Priority::Critical
    } else {
        Priority::Default
    }
}

fn config(capacity: usize, overflow: Overflow) -> QueueConfig {
    QueueConfig {
        capacity,
        overflow,
        ..QueueConfig::default()
    }
}

/// The only worker is busy and the queue is full of requests whose callers timed out: a new
/// request takes one of their places rather than being refused, and the gauge counts only it.
#[tokio::test(start_paused = true)]
async fn requests_whose_callers_timed_out_leave_their_places_to_live_ones() {
    let recorder = PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    let gate = Arc::new(Semaphore::new(0));
    let runs = Arc::new(AtomicUsize::new(0));
    let layer = QueueLayer::new("timed_out", config(2, Overflow::RejectNew), 1, by_number)
        .expect("valid layer");
    let mut service = metrics::with_local_recorder(&recorder, || {
        layer.layer(gated(Arc::clone(&gate), Arc::clone(&runs)))
    });
    let running = tokio::spawn(service.ready().await.expect("ready").call(0));
    started(&runs, 1).await;
    let mut gave_up = Vec::new();
    for n in [1, 2] {
        let call = service.ready().await.expect("ready").call(n);
        gave_up.push(tokio::time::timeout(CALLER_TIMEOUT, call));
    }
    for call in gave_up {
        assert!(call.await.is_err(), "the caller timed out");
    }

    let mut live = service.ready().await.expect("ready").call(3);
    let at_once = (&mut live).now_or_never().map(outcome);
    assert_eq!(at_once, None, "the live request is queued, not refused");
    assert_eq!(queued_gauge(&handle), Some(1.0), "only the live request");

    gate.add_permits(2);
    assert_eq!(outcome(running.await.expect("no panic")), Ok(0));
    assert_eq!(outcome(live.await), Ok(3));
    assert_eq!(
        runs.load(Ordering::SeqCst),
        2,
        "abandoned requests never ran"
    );
    assert_eq!(queued_gauge(&handle), Some(0.0));
    // The queue refused and shed nothing: the callers that left are not its refusals.
    for reason in [Reason::QueueFull, Reason::Evicted] {
        assert_eq!(service.rejected(Priority::Default, reason), 0, "{reason:?}");
    }
}

/// A full queue makes room by eviction, for a more important request or (`DropOldest`) by
/// dropping the oldest of the class. A request whose caller left gives up its place first, so
/// no live request is evicted while it holds one.
#[tokio::test(start_paused = true)]
async fn a_live_request_is_not_evicted_while_one_whose_caller_left_holds_a_place() {
    // (policy, the incoming request): critical under `RejectNew`, which evicts only less
    // important work; of the live request's class under `DropOldest`.
    for (overflow, incoming) in [(Overflow::RejectNew, 101), (Overflow::DropOldest, 3)] {
        let gate = Arc::new(Semaphore::new(0));
        let runs = Arc::new(AtomicUsize::new(0));
        let layer =
            QueueLayer::new("evicting", config(2, overflow), 1, by_number).expect("valid layer");
        let mut service = layer.layer(gated(Arc::clone(&gate), Arc::clone(&runs)));
        let running = tokio::spawn(service.ready().await.expect("ready").call(0));
        started(&runs, 1).await;
        // A critical request whose caller gives up, then a live one of default priority.
        let call = service.ready().await.expect("ready").call(100);
        assert!(
            tokio::time::timeout(CALLER_TIMEOUT, call).await.is_err(),
            "the caller timed out"
        );
        let low = tokio::spawn(service.ready().await.expect("ready").call(2));
        let mut new = service.ready().await.expect("ready").call(incoming);
        assert_eq!((&mut new).now_or_never().map(outcome), None, "{overflow:?}");

        gate.add_permits(3);
        assert_eq!(outcome(running.await.expect("no panic")), Ok(0));
        assert_eq!(outcome(new.await), Ok(incoming), "{overflow:?}");
        assert_eq!(
            outcome(low.await.expect("no panic")),
            Ok(2),
            "{overflow:?}: the live request was served, not evicted"
        );
        assert_eq!(runs.load(Ordering::SeqCst), 3, "{overflow:?}");
        for priority in [Priority::Critical, Priority::Default] {
            assert_eq!(
                service.rejected(priority, Reason::Evicted),
                0,
                "{overflow:?}"
            );
        }
    }
}

/// A request abandoned behind a live one of its class cannot be found at once, without a scan;
/// it gives up its place once the live one has gone to a worker and it is at the head.
#[tokio::test(start_paused = true)]
async fn a_request_abandoned_behind_a_live_one_gives_up_its_place_at_the_head() {
    let gate = Arc::new(Semaphore::new(0));
    let runs = Arc::new(AtomicUsize::new(0));
    let layer = QueueLayer::new("behind", config(2, Overflow::RejectNew), 1, by_number)
        .expect("valid layer");
    let mut service = layer.layer(gated(Arc::clone(&gate), Arc::clone(&runs)));
    let running = tokio::spawn(service.ready().await.expect("ready").call(0));
    started(&runs, 1).await;
    let ahead = tokio::spawn(service.ready().await.expect("ready").call(1));
    let call = service.ready().await.expect("ready").call(2);
    assert!(
        tokio::time::timeout(CALLER_TIMEOUT, call).await.is_err(),
        "the caller timed out"
    );
    // The worker takes request 1: the abandoned request 2 is at the head now.
    gate.add_permits(1);
    assert_eq!(outcome(running.await.expect("no panic")), Ok(0));
    started(&runs, 2).await;
    let third = tokio::spawn(service.ready().await.expect("ready").call(3));
    tokio::task::yield_now().await;
    // The queue holds request 2 (abandoned) and request 3: full.
    let mut fourth = service.ready().await.expect("ready").call(4);
    assert_eq!(
        (&mut fourth).now_or_never().map(outcome),
        None,
        "request 4 takes the place of request 2"
    );

    gate.add_permits(3);
    assert_eq!(outcome(ahead.await.expect("no panic")), Ok(1));
    assert_eq!(outcome(third.await.expect("no panic")), Ok(3));
    assert_eq!(outcome(fourth.await), Ok(4));
    assert_eq!(runs.load(Ordering::SeqCst), 4, "request 2 never ran");
    assert_eq!(service.rejected(Priority::Default, Reason::QueueFull), 0);
}

/// Under `Wait`, a request waiting for room gets in as soon as a queued caller leaves, not
/// when a worker next takes a request or its own timeout ends.
#[tokio::test(start_paused = true)]
async fn a_waiting_request_gets_the_place_of_a_caller_that_left() {
    let gate = Arc::new(Semaphore::new(0));
    let runs = Arc::new(AtomicUsize::new(0));
    let wait = Overflow::Wait {
        timeout: Duration::from_secs(1),
    };
    let layer = QueueLayer::new("waiting", config(1, wait), 1, by_number).expect("valid layer");
    let mut service = layer.layer(gated(Arc::clone(&gate), Arc::clone(&runs)));
    let running = tokio::spawn(service.ready().await.expect("ready").call(0));
    started(&runs, 1).await;
    let leaving = service.ready().await.expect("ready").call(1);
    let waiting = tokio::spawn(service.ready().await.expect("ready").call(2));
    assert!(
        tokio::time::timeout(CALLER_TIMEOUT, leaving).await.is_err(),
        "the caller timed out"
    );
    // Well past the waiting request's timeout, with the worker still busy.
    tokio::time::sleep(Duration::from_secs(2)).await;

    gate.add_permits(2);
    assert_eq!(outcome(running.await.expect("no panic")), Ok(0));
    assert_eq!(
        outcome(waiting.await.expect("no panic")),
        Ok(2),
        "it got in when the caller left"
    );
    assert_eq!(runs.load(Ordering::SeqCst), 2, "request 1 never ran");
    assert_eq!(service.rejected(Priority::Default, Reason::WaitTimeout), 0);
}

/// A caller that leaves while its request waits for room leaves nothing behind: no item, no
/// refusal, and not the wake-up it was given, which passes to the next waiting request.
#[tokio::test(start_paused = true)]
async fn a_caller_that_leaves_while_waiting_for_room_leaves_nothing_behind() {
    let recorder = PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    let gate = Arc::new(Semaphore::new(0));
    let runs = Arc::new(AtomicUsize::new(0));
    let wait = Overflow::Wait {
        timeout: Duration::from_secs(1),
    };
    let layer =
        QueueLayer::new("left_waiting", config(1, wait), 1, by_number).expect("valid layer");
    let mut service = metrics::with_local_recorder(&recorder, || {
        layer.layer(gated(Arc::clone(&gate), Arc::clone(&runs)))
    });
    let running = tokio::spawn(service.ready().await.expect("ready").call(0));
    started(&runs, 1).await;
    let queued = tokio::spawn(service.ready().await.expect("ready").call(1));
    tokio::task::yield_now().await;
    // Both wait for room, request 2 first.
    let mut leaving = service.ready().await.expect("ready").call(2);
    assert_eq!((&mut leaving).now_or_never().map(outcome), None);
    let mut next = service.ready().await.expect("ready").call(3);
    assert_eq!((&mut next).now_or_never().map(outcome), None);
    // The worker takes request 1 and wakes request 2, which leaves without looking.
    gate.add_permits(1);
    assert_eq!(outcome(running.await.expect("no panic")), Ok(0));
    started(&runs, 2).await;
    drop(leaving);
    assert_eq!(queued_gauge(&handle), Some(0.0), "request 2 left no item");
    assert_eq!((&mut next).now_or_never().map(outcome), None);
    assert_eq!(queued_gauge(&handle), Some(1.0), "request 3 got the place");
    // Past its timeout it is still queued, not refused.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!((&mut next).now_or_never().map(outcome), None);

    gate.add_permits(2);
    assert_eq!(outcome(queued.await.expect("no panic")), Ok(1));
    assert_eq!(outcome(next.await), Ok(3));
    assert_eq!(runs.load(Ordering::SeqCst), 3, "request 2 never ran");
    assert_eq!(service.rejected(Priority::Default, Reason::WaitTimeout), 0);
    assert_eq!(queued_gauge(&handle), Some(0.0));
}
