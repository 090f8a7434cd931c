//! The tower layers (feature `tower`).
#![cfg(feature = "tower")]

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use headroom_breaker::tower::{
    CircuitBreakerLayer, FallbackLayer, HedgeLayer, PipelineLayer, RetryLayer, TimeoutLayer,
};
use headroom_breaker::{
    CircuitBreaker, Error, ErrorKind, Fallback, Hedge, Pipeline, Retry, RetryBudget, State, Timeout,
};
use headroom_core::{BackendError, BackendErrorKind};
use tower::{Layer, Service, ServiceBuilder, ServiceExt, service_fn};

fn flaky(
    calls: Arc<AtomicU32>,
    fail_first: u32,
) -> impl tower::Service<
    u32,
    Response = u32,
    Error = BackendError,
    Future = impl Future<Output = Result<u32, BackendError>> + Send,
> + Clone
+ Send
+ 'static {
    service_fn(move |request: u32| {
        let call = calls.fetch_add(1, Ordering::SeqCst);
        async move {
            if call < fail_first {
                Err(BackendError::new(BackendErrorKind::Connection))
            } else {
                Ok(request * 2)
            }
        }
    })
}

#[tokio::test]
async fn the_breaker_layer_records_responses_and_rejects_when_open() {
    let breaker = CircuitBreaker::builder()
        .count_window(3)
        .minimum_calls(3)
        .build()
        .expect("breaker");
    let calls = Arc::new(AtomicU32::new(0));
    let service = ServiceBuilder::new()
        .layer(CircuitBreakerLayer::new(breaker.clone()))
        .service(flaky(calls.clone(), 3));
    for _ in 0..3 {
        let error = service.clone().oneshot(1).await.unwrap_err();
        assert_eq!(error.kind(), ErrorKind::Inner);
    }
    assert_eq!(breaker.state(), State::Open);
    let error = service.clone().oneshot(1).await.unwrap_err();
    assert_eq!(error.kind(), ErrorKind::CircuitOpen);
    assert_eq!(
        calls.load(Ordering::SeqCst),
        3,
        "the open circuit kept the call away"
    );
}

#[tokio::test]
async fn a_dropped_response_future_frees_a_half_open_probe() {
    let manual = headroom_core::ManualClock::new();
    let breaker = CircuitBreaker::<BackendError>::builder()
        .clock(manual.clock())
        .half_open_probes(1)
        .build()
        .expect("breaker");
    let pending = service_fn(|_: u32| std::future::pending::<Result<u32, BackendError>>());
    let mut service = CircuitBreakerLayer::new(breaker.clone()).layer(pending);
    for _ in 0..20 {
        breaker.try_acquire().expect("closed").failure();
    }
    assert_eq!(breaker.state(), State::Open);
    manual.advance(Duration::from_secs(5));
    let probe = tower::Service::call(&mut service, 1);
    assert_eq!(breaker.state(), State::HalfOpen);
    assert!(
        breaker.try_acquire().is_err(),
        "the only probe slot is taken"
    );
    drop(probe);
    breaker.try_acquire().expect("slot freed").success();
    assert_eq!(breaker.state(), State::Closed);
}

/// A breaker on `manual` time with one half-open probe slot, tripped and past its open
/// duration: the next call admitted is the only probe.
fn awaiting_its_only_probe(manual: &headroom_core::ManualClock) -> CircuitBreaker<BackendError> {
    awaiting_its_only_probe_with(manual, |_| true)
}

fn awaiting_its_only_probe_with(
    manual: &headroom_core::ManualClock,
    failure_if: impl Fn(&BackendError) -> bool + Send + Sync + 'static,
) -> CircuitBreaker<BackendError> {
    let breaker = CircuitBreaker::<BackendError>::builder()
        .clock(manual.clock())
        .half_open_probes(1)
        .failure_if(failure_if)
        .build()
        .expect("breaker");
    trip(&breaker);
    assert_eq!(breaker.state(), State::Open);
    manual.advance(Duration::from_secs(5));
    breaker
}

/// An inner service whose `call` panics does not keep the half-open probe slot it was
/// admitted to.
#[test]
fn a_panicking_inner_call_frees_its_half_open_probe() {
    use std::panic::{AssertUnwindSafe, catch_unwind};

    let manual = headroom_core::ManualClock::new();
    let breaker = awaiting_its_only_probe(&manual);
    let panicking =
        service_fn(|_: u32| -> std::future::Ready<Result<u32, BackendError>> { panic!("inner") });
    let mut service = CircuitBreakerLayer::new(breaker.clone()).layer(panicking);
    let panicked = catch_unwind(AssertUnwindSafe(|| {
        drop(tower::Service::call(&mut service, 1));
    }));
    assert!(panicked.is_err());
    breaker.try_acquire().expect("probe slot freed").success();
    assert_eq!(breaker.state(), State::Closed);
}

/// A `failure_if` that panics on the probe's error does not keep its half-open probe slot.
#[test]
fn a_panicking_failure_classifier_frees_the_half_open_probe() {
    use futures_util::FutureExt;
    use std::panic::{AssertUnwindSafe, catch_unwind};

    let manual = headroom_core::ManualClock::new();
    let breaker = awaiting_its_only_probe_with(&manual, |_| panic!("classifier"));
    let calls = Arc::new(AtomicU32::new(0));
    let mut service = CircuitBreakerLayer::new(breaker.clone()).layer(flaky(calls, 1));
    let mut probe = std::pin::pin!(tower::Service::call(&mut service, 1));
    assert_eq!(breaker.state(), State::HalfOpen);
    let panicked = catch_unwind(AssertUnwindSafe(|| probe.as_mut().now_or_never()));
    assert!(panicked.is_err());
    // The future, pinned here, is still alive: the slot was freed while unwinding.
    breaker.try_acquire().expect("probe slot freed").success();
    assert_eq!(breaker.state(), State::Closed);
}

#[tokio::test(start_paused = true)]
async fn the_pipeline_layer_retries_with_a_clone_of_the_request() {
    let calls = Arc::new(AtomicU32::new(0));
    let pipeline = Pipeline::builder()
        .retry(
            Retry::builder()
                .max_attempts(3)
                .base_delay(Duration::from_millis(5))
                .build()
                .expect("retry"),
        )
        .timeout(Duration::from_secs(1))
        .build();
    let service = ServiceBuilder::new()
        .layer(PipelineLayer::new(pipeline))
        .service(flaky(calls.clone(), 2));
    assert_eq!(service.oneshot(21).await.expect("third attempt"), 42);
    assert_eq!(calls.load(Ordering::SeqCst), 3);
}

/// A service that never answers, so the calls made to it hold their concurrency permits.
fn hanging() -> impl tower::Service<
    u32,
    Response = u32,
    Error = BackendError,
    Future = std::future::Pending<Result<u32, BackendError>>,
> + Clone {
    service_fn(|_: u32| std::future::pending::<Result<u32, BackendError>>())
}

#[tokio::test]
async fn an_open_breaker_fails_fast_in_front_of_a_saturated_concurrency_limit() {
    let breaker = CircuitBreaker::<BackendError>::builder()
        .build()
        .expect("breaker");
    let mut service = ServiceBuilder::new()
        .layer(CircuitBreakerLayer::new(breaker.clone()))
        .concurrency_limit(1)
        .service(hanging());
    // The one concurrency permit is taken by a call that never ends.
    let in_flight = service.ready().await.expect("ready").call(1);
    for _ in 0..20 {
        breaker.try_acquire().expect("closed").failure();
    }
    assert_eq!(breaker.state(), State::Open);
    let error = refused_at_once(&service);
    assert_eq!(error.kind(), ErrorKind::CircuitOpen);
    assert!(
        matches!(error, headroom_breaker::Error::CircuitOpen(open) if open.retry_after().is_some())
    );
    drop(in_flight);
}

/// Once the open duration has passed, a caller is not left waiting on a concurrency limit
/// held by calls admitted before the circuit opened, which never end: the circuit stays
/// open and refuses it until a probe can run.
#[tokio::test]
async fn an_open_breaker_past_its_open_duration_fails_fast_in_front_of_a_saturated_limit() {
    use futures_util::FutureExt;

    let manual = headroom_core::ManualClock::new();
    let breaker = CircuitBreaker::<BackendError>::builder()
        .clock(manual.clock())
        .build()
        .expect("breaker");
    let mut service = ServiceBuilder::new()
        .layer(CircuitBreakerLayer::new(breaker.clone()))
        .concurrency_limit(1)
        .service(hanging());
    let in_flight = service.ready().await.expect("ready").call(1);
    trip(&breaker);
    assert_eq!(breaker.state(), State::Open);
    manual.advance(Duration::from_secs(5));
    assert!(
        service.clone().ready().now_or_never().is_some(),
        "ready at once, whatever the inner service's backpressure"
    );
    let error = refused_at_once(&service);
    assert!(
        matches!(&error, Error::CircuitOpen(open) if open.state() == State::Open),
        "{error:?}"
    );
    assert_eq!(breaker.state(), State::Open);
    // Once the capacity is free, the next call is the probe.
    drop(in_flight);
    let probe = service
        .ready()
        .now_or_never()
        .expect("ready")
        .expect("ready")
        .call(3);
    assert_eq!(breaker.state(), State::HalfOpen);
    drop(probe);
}

/// Calls a clone of `service`, which must be ready at once whatever the backpressure below
/// it, and whose refusal needs no wait.
fn refused_at_once<S>(service: &S) -> Error<BackendError>
where
    S: Service<u32, Error = Error<BackendError>> + Clone,
{
    use futures_util::FutureExt;

    let mut waiting = service.clone();
    let ready = waiting
        .ready()
        .now_or_never()
        .expect("ready at once, whatever the inner service's backpressure")
        .expect("ready");
    ready
        .call(2)
        .now_or_never()
        .expect("the rejection needs no wait")
        .err()
        .expect("refused")
}

#[tokio::test]
async fn a_stalled_half_open_breaker_reopens_in_front_of_a_saturated_concurrency_limit() {
    use headroom_core::ManualClock;

    let manual = ManualClock::new();
    // Defaults otherwise: open 5 s, half-open max wait 30 s.
    let breaker = CircuitBreaker::<BackendError>::builder()
        .clock(manual.clock())
        .half_open_probes(1)
        .build()
        .expect("breaker");
    let mut service = ServiceBuilder::new()
        .layer(CircuitBreakerLayer::new(breaker.clone()))
        .concurrency_limit(1)
        .service(hanging());
    for _ in 0..20 {
        breaker.try_acquire().expect("closed").failure();
    }
    assert_eq!(breaker.state(), State::Open);
    manual.advance(Duration::from_secs(5));
    // The only probe never ends and holds the one concurrency permit.
    let probe = service.ready().await.expect("ready").call(1);
    assert_eq!(breaker.state(), State::HalfOpen);
    manual.advance(Duration::from_secs(31));
    // A stalled half-open phase reopens instead of waiting on the inner service.
    let error = refused_at_once(&service);
    assert!(
        matches!(&error, Error::CircuitOpen(open) if open.state() == State::Open && open.retry_after().is_some()),
        "{error:?}"
    );
    assert_eq!(breaker.state(), State::Open);
    drop(probe);
}

#[tokio::test(start_paused = true)]
async fn the_retry_layer_retries_failed_requests_with_a_clone_of_each() {
    let calls = Arc::new(AtomicU32::new(0));
    let retry = Retry::builder()
        .max_attempts(3)
        .base_delay(Duration::from_millis(5))
        .build()
        .expect("retry");
    let service = ServiceBuilder::new()
        .layer(RetryLayer::new(retry.clone()))
        .service(flaky(calls.clone(), 2));
    assert_eq!(service.oneshot(21).await.expect("third attempt"), 42);
    assert_eq!(calls.load(Ordering::SeqCst), 3);

    let calls = Arc::new(AtomicU32::new(0));
    let service = RetryLayer::new(retry).layer(flaky(calls.clone(), 5));
    let error = service.oneshot(21).await.unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Inner, "the last attempt's error");
    assert_eq!(calls.load(Ordering::SeqCst), 3, "no more than max_attempts");
}

/// The retry and the hedge of the two tests below, sharing one budget of 0.5 retries per
/// request.
fn retry_and_hedge_sharing_a_budget() -> (Retry<BackendError>, Hedge) {
    let budget = RetryBudget::builder()
        .ratio(0.5)
        .min_per_second(0)
        .build()
        .expect("budget");
    let retry = Retry::builder()
        .max_attempts(10)
        .base_delay(Duration::from_millis(1))
        .budget(budget.clone())
        .build()
        .expect("retry");
    let hedge = Hedge::builder()
        .delay(Duration::from_secs(1))
        .budget(budget)
        .build()
        .expect("hedge");
    (retry, hedge)
}

/// Sends 100 requests that always fail through `service`, and checks the calls stay within
/// the budget's bound: a request deposits once, so the retries stay within the budget's ratio
/// of requests.
async fn stays_within_the_shared_budget<S>(service: S, calls: &AtomicU32)
where
    S: Service<u32, Response = u32> + Clone,
    S::Error: std::fmt::Debug,
{
    const REQUESTS: u32 = 100;
    for request in 0..REQUESTS {
        assert!(service.clone().oneshot(request).await.is_err());
    }
    let calls = calls.load(Ordering::SeqCst);
    assert!(
        calls <= REQUESTS * 3 / 2,
        "{calls} calls for {REQUESTS} requests with a budget of 0.5 retries per request"
    );
}

/// A retry layer over a hedge layer sharing its budget, as in a pipeline.
#[tokio::test(start_paused = true)]
async fn a_retry_over_a_hedge_sharing_its_budget_deposits_once_per_request() {
    let (retry, hedge) = retry_and_hedge_sharing_a_budget();
    let calls = Arc::new(AtomicU32::new(0));
    let service = ServiceBuilder::new()
        .layer(RetryLayer::new(retry))
        .layer(HedgeLayer::new(hedge))
        .service(flaky(calls.clone(), u32::MAX));
    stays_within_the_shared_budget(service, &calls).await;
}

/// A pipeline layer, whose retry has the budget, over a hedge layer sharing it.
#[tokio::test(start_paused = true)]
async fn a_pipeline_over_a_hedge_sharing_its_budget_deposits_once_per_request() {
    let (retry, hedge) = retry_and_hedge_sharing_a_budget();
    let calls = Arc::new(AtomicU32::new(0));
    let service = ServiceBuilder::new()
        .layer(PipelineLayer::new(Pipeline::builder().retry(retry).build()))
        .layer(HedgeLayer::new(hedge))
        .service(flaky(calls.clone(), u32::MAX));
    stays_within_the_shared_budget(service, &calls).await;
}

/// A hedge layer over a retry layer sharing its budget: the request is recorded once, by the
/// hedge, not again by the retry of each hedged copy, so the hedges stay within the budget's
/// ratio of requests.
#[tokio::test(start_paused = true)]
async fn a_hedge_over_a_retry_sharing_its_budget_deposits_once_per_request() {
    let budget = RetryBudget::builder()
        .ratio(0.5)
        .min_per_second(0)
        .build()
        .expect("budget");
    let retry = Retry::<BackendError>::builder()
        .max_attempts(1)
        .budget(budget.clone())
        .build()
        .expect("retry");
    let hedge = Hedge::builder()
        .delay(Duration::from_millis(10))
        .budget(budget)
        .build()
        .expect("hedge");
    let calls = Arc::new(AtomicU32::new(0));
    let slow = {
        let calls = calls.clone();
        service_fn(move |request: u32| {
            calls.fetch_add(1, Ordering::SeqCst);
            async move {
                tokio::time::sleep(Duration::from_secs(1)).await;
                Ok::<_, BackendError>(request)
            }
        })
    };
    let service = ServiceBuilder::new()
        .layer(HedgeLayer::new(hedge))
        .layer(RetryLayer::new(retry))
        .service(slow);
    const REQUESTS: u32 = 100;
    for request in 0..REQUESTS {
        assert_eq!(service.clone().oneshot(request).await.unwrap(), request);
    }
    let calls = calls.load(Ordering::SeqCst);
    assert!(
        calls <= REQUESTS * 3 / 2,
        "{calls} calls for {REQUESTS} requests with a budget of 0.5 hedges per request"
    );
}

/// A budget of one retry per request and no reserve, on a clock that stands still: the
/// retries it grants are exactly the requests recorded in it (see [`deposits`]).
fn one_retry_per_request(manual: &headroom_core::ManualClock) -> RetryBudget {
    RetryBudget::builder()
        .ratio(1.0)
        .min_per_second(0)
        .clock(manual.clock())
        .build()
        .expect("budget")
}

/// How many requests are recorded in a budget from [`one_retry_per_request`] and not yet
/// retried; spends them.
fn deposits(budget: &RetryBudget) -> usize {
    (0..1_000).take_while(|_| budget.try_withdraw()).count()
}

/// A retry of up to two attempts, with `budget`.
fn retry_with<E: headroom_core::Classify + 'static>(budget: &RetryBudget) -> Retry<E> {
    Retry::builder()
        .max_attempts(2)
        .base_delay(Duration::from_millis(1))
        .budget(budget.clone())
        .build()
        .expect("retry")
}

/// Sends requests that succeed at once through `service` and checks each was recorded in
/// `budget` exactly once.
async fn deposits_once_per_request<S>(service: S, budget: &RetryBudget)
where
    S: Service<u32, Response = u32> + Clone,
    S::Error: std::fmt::Debug,
{
    const REQUESTS: usize = 10;
    for request in 0..REQUESTS {
        let request = u32::try_from(request).expect("small");
        assert_eq!(
            service.clone().oneshot(request).await.expect("answered"),
            request * 2
        );
    }
    assert_eq!(deposits(budget), REQUESTS, "one deposit per request");
}

/// A pipeline layer records each request in its retry's budget, so that its retries are paid
/// for by its own traffic, not only by the budget's reserve.
#[tokio::test(start_paused = true)]
async fn the_pipeline_layer_records_each_request_in_its_budget() {
    let manual = headroom_core::ManualClock::new();
    let budget = one_retry_per_request(&manual);
    let calls = Arc::new(AtomicU32::new(0));
    let service = ServiceBuilder::new()
        .layer(PipelineLayer::new(
            Pipeline::builder().retry(retry_with(&budget)).build(),
        ))
        .service(flaky(calls.clone(), 1));
    assert_eq!(service.clone().oneshot(21).await.expect("retried"), 42);
    assert_eq!(calls.load(Ordering::SeqCst), 2, "retried once");
    assert_eq!(deposits(&budget), 0, "the request paid for its retry");
    deposits_once_per_request(service, &budget).await;
}

/// Each nesting of the layers sharing one budget records a request in it exactly once.
#[tokio::test(start_paused = true)]
async fn layers_sharing_a_budget_deposit_exactly_once_per_request() {
    let manual = headroom_core::ManualClock::new();
    let calls = Arc::new(AtomicU32::new(0));
    let hedge = |budget: &RetryBudget| {
        Hedge::builder()
            .delay(Duration::from_secs(1))
            .budget(budget.clone())
            .build()
            .expect("hedge")
    };

    let budget = one_retry_per_request(&manual);
    let service = ServiceBuilder::new()
        .layer(RetryLayer::new(retry_with(&budget)))
        .layer(PipelineLayer::new(
            Pipeline::builder().retry(retry_with(&budget)).build(),
        ))
        .service(flaky(calls.clone(), 0));
    deposits_once_per_request(service, &budget).await;

    let budget = one_retry_per_request(&manual);
    let service = ServiceBuilder::new()
        .layer(PipelineLayer::new(
            Pipeline::builder().retry(retry_with(&budget)).build(),
        ))
        .layer(HedgeLayer::new(hedge(&budget)))
        .service(flaky(calls.clone(), 0));
    deposits_once_per_request(service, &budget).await;

    let budget = one_retry_per_request(&manual);
    let service = ServiceBuilder::new()
        .layer(PipelineLayer::new(
            Pipeline::builder()
                .retry(retry_with(&budget))
                .hedge(hedge(&budget))
                .build(),
        ))
        .service(flaky(calls.clone(), 0));
    deposits_once_per_request(service, &budget).await;

    let budget = one_retry_per_request(&manual);
    let service = ServiceBuilder::new()
        .layer(RetryLayer::new(retry_with(&budget)))
        .layer(HedgeLayer::new(hedge(&budget)))
        .service(flaky(calls.clone(), 0));
    deposits_once_per_request(service, &budget).await;

    let budget = one_retry_per_request(&manual);
    let service = ServiceBuilder::new()
        .layer(HedgeLayer::new(hedge(&budget)))
        .layer(RetryLayer::new(retry_with(&budget)))
        .service(flaky(calls.clone(), 0));
    deposits_once_per_request(service, &budget).await;
}

/// `Pipeline::call` made directly records each request once.
#[tokio::test(start_paused = true)]
async fn a_direct_pipeline_call_deposits_exactly_once_per_request() {
    let manual = headroom_core::ManualClock::new();
    let budget = one_retry_per_request(&manual);
    let pipeline = Pipeline::<BackendError>::builder()
        .retry(retry_with(&budget))
        .build();
    for _ in 0..10 {
        assert_eq!(pipeline.call(|| async { Ok(1) }).await.expect("ok"), 1);
    }
    assert_eq!(deposits(&budget), 10, "one deposit per request");
}

/// Counts response futures dropped before they finished.
struct DropCounter(Arc<AtomicU32>);

impl Drop for DropCounter {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

#[tokio::test(start_paused = true)]
async fn the_timeout_layer_cancels_a_slow_response() {
    let dropped = Arc::new(AtomicU32::new(0));
    let counter = dropped.clone();
    let slow = service_fn(move |request: u32| {
        let guard = DropCounter(counter.clone());
        async move {
            tokio::time::sleep(Duration::from_secs(10)).await;
            std::mem::forget(guard);
            Ok::<_, BackendError>(request)
        }
    });
    let service = ServiceBuilder::new()
        .layer(TimeoutLayer::new(Timeout::new(Duration::from_millis(100))))
        .service(slow);
    let start = tokio::time::Instant::now();
    let error = service.clone().oneshot(1).await.unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Elapsed);
    assert_eq!(start.elapsed(), Duration::from_millis(100));
    assert_eq!(
        dropped.load(Ordering::SeqCst),
        1,
        "the response was dropped"
    );

    let fast = TimeoutLayer::new(Timeout::new(Duration::from_millis(100)))
        .layer(flaky(Arc::new(AtomicU32::new(0)), 0));
    assert_eq!(fast.oneshot(4).await.expect("in time"), 8);
}

#[tokio::test(start_paused = true)]
async fn the_hedge_layer_answers_with_the_first_success() {
    let calls = Arc::new(AtomicU32::new(0));
    let counter = calls.clone();
    let first_is_slow = service_fn(move |request: u32| {
        let slow = counter.fetch_add(1, Ordering::SeqCst) == 0;
        async move {
            let takes: u32 = if slow { 1_000 } else { 20 };
            tokio::time::sleep(Duration::from_millis(u64::from(takes))).await;
            Ok::<_, BackendError>(request + takes)
        }
    });
    let hedge = Hedge::builder()
        .delay(Duration::from_millis(50))
        .build()
        .expect("hedge");
    let service = ServiceBuilder::new()
        .layer(HedgeLayer::new(hedge))
        .service(first_is_slow);
    let start = tokio::time::Instant::now();
    assert_eq!(service.oneshot(1).await.expect("hedged"), 21);
    assert_eq!(start.elapsed(), Duration::from_millis(70));
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

#[tokio::test(start_paused = true)]
async fn the_fallback_layer_replaces_the_errors_it_applies_to() {
    let hanging_for = |d: u64| {
        service_fn(move |_: u32| async move {
            tokio::time::sleep(Duration::from_millis(d)).await;
            Err::<u32, _>(BackendError::new(BackendErrorKind::Connection))
        })
    };
    let fallback = || {
        Fallback::value(0).when(|error: &Error<BackendError>| error.kind() == ErrorKind::Elapsed)
    };
    let timed_out = ServiceBuilder::new()
        .layer(FallbackLayer::new(fallback()))
        .layer(TimeoutLayer::new(Timeout::new(Duration::from_millis(100))))
        .service(hanging_for(1_000));
    assert_eq!(timed_out.oneshot(1).await.expect("fallback"), 0);

    let failed = ServiceBuilder::new()
        .layer(FallbackLayer::new(fallback()))
        .layer(TimeoutLayer::new(Timeout::new(Duration::from_millis(100))))
        .service(hanging_for(10));
    let error = failed.oneshot(1).await.unwrap_err();
    assert_eq!(
        error.kind(),
        ErrorKind::Inner,
        "not an error the fallback applies to"
    );
}

/// As above with the default three probes: the one probe the concurrency limit lets through
/// stalls, the others never get in, and the phase still reopens once its probe outlives the
/// wait, also for a caller already waiting on the limit.
#[tokio::test]
async fn a_stalled_half_open_breaker_reopens_though_its_probes_never_fill() {
    use headroom_core::ManualClock;

    let manual = ManualClock::new();
    let breaker = CircuitBreaker::<BackendError>::builder()
        .clock(manual.clock())
        .build()
        .expect("breaker");
    let mut service = ServiceBuilder::new()
        .layer(CircuitBreakerLayer::new(breaker.clone()))
        .concurrency_limit(1)
        .service(hanging());
    for _ in 0..20 {
        breaker.try_acquire().expect("closed").failure();
    }
    manual.advance(Duration::from_secs(5));
    let probe = service.ready().await.expect("ready").call(1);
    assert_eq!(breaker.state(), State::HalfOpen);
    // A caller waiting on the limit, which the probe holds.
    let mut parked = service.clone();
    let waiting = tokio::spawn(async move {
        parked.ready().await.expect("ready");
        parked.call(2).await
    });
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    assert!(!waiting.is_finished(), "waits on the limit");
    manual.advance(Duration::from_secs(31));
    let error = refused_at_once(&service);
    assert!(
        matches!(&error, Error::CircuitOpen(open) if open.state() == State::Open),
        "{error:?}"
    );
    let waited = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("the waiting caller is refused, not left waiting")
        .expect("no panic");
    assert!(matches!(waited, Err(Error::CircuitOpen(_))), "{waited:?}");
    drop(probe);
}

/// A breaker on `manual` time that lets 3 probes through when half-open, a second after
/// opening, and waits a second on running probes.
fn three_probes_waited_on_for_a_second(
    manual: &headroom_core::ManualClock,
) -> CircuitBreaker<BackendError> {
    CircuitBreaker::builder()
        .clock(manual.clock())
        .half_open_probes(3)
        .half_open_max_wait(Duration::from_secs(1))
        .open_duration(Duration::from_secs(1))
        .build()
        .expect("breaker")
}

/// Opens `breaker` with failures.
fn trip(breaker: &CircuitBreaker<BackendError>) {
    for _ in 0..20 {
        breaker.try_acquire().expect("closed").failure();
    }
}

/// Asserts no transition received reopened the circuit.
fn never_reopened(
    transitions: &mut tokio::sync::broadcast::Receiver<headroom_breaker::Transition>,
) {
    while let Ok(transition) = transitions.try_recv() {
        assert_ne!(transition.to, State::Open, "{transition:?}");
    }
}

/// Probes that succeeded are finished, not running: a half-open phase whose probes all
/// succeeded so far is not stalled, however slowly the next requests come, so a recovered
/// dependency behind the layer closes the circuit under light traffic too.
#[tokio::test]
async fn half_open_probes_that_succeeded_do_not_stall_the_phase() {
    let manual = headroom_core::ManualClock::new();
    let breaker = three_probes_waited_on_for_a_second(&manual);
    let service = ServiceBuilder::new()
        .layer(CircuitBreakerLayer::new(breaker.clone()))
        .service(flaky(Arc::new(AtomicU32::new(0)), 0));
    trip(&breaker);
    let mut transitions = breaker.subscribe();
    manual.advance(Duration::from_secs(1));
    for _ in 0..3 {
        assert_eq!(service.clone().oneshot(1).await.expect("a probe"), 2);
        manual.advance(Duration::from_secs(2));
    }
    assert_eq!(breaker.state(), State::Closed);
    never_reopened(&mut transitions);
}

/// A probe that has just started is not stalled, though the half-open phase began long ago:
/// probes count as stalled only after running `half_open_max_wait` with none finishing, so
/// overlapping requests under light traffic still close the circuit.
#[tokio::test]
async fn a_probe_admitted_late_in_the_phase_is_not_stalled_at_once() {
    let manual = headroom_core::ManualClock::new();
    let breaker = three_probes_waited_on_for_a_second(&manual);
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let service = ServiceBuilder::new()
        .layer(CircuitBreakerLayer::new(breaker.clone()))
        .service(service_fn({
            let gate = gate.clone();
            move |request: u32| {
                let gate = gate.clone();
                async move {
                    if request == 0 {
                        gate.acquire().await.expect("open").forget();
                    }
                    Ok::<_, BackendError>(request)
                }
            }
        }));
    trip(&breaker);
    let mut transitions = breaker.subscribe();
    manual.advance(Duration::from_secs(1));
    assert_eq!(service.clone().oneshot(1).await.expect("probe 1"), 1);
    manual.advance(Duration::from_secs(2));
    let slow = tokio::spawn(service.clone().oneshot(0));
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    assert_eq!(service.clone().oneshot(2).await.expect("probe 3"), 2);
    gate.add_permits(1);
    assert_eq!(slow.await.expect("no panic").expect("probe 2"), 0);
    assert_eq!(breaker.state(), State::Closed);
    never_reopened(&mut transitions);
}

/// The layers' services can be shared across threads (axum asks `Send + Sync` of a layered
/// service) when what they wrap can.
#[test]
fn the_breaker_service_is_send_and_sync() {
    fn shared<T: Send + Sync>(_: &T) {}
    let breaker = CircuitBreaker::<BackendError>::builder()
        .build()
        .expect("breaker");
    let service = ServiceBuilder::new()
        .layer(CircuitBreakerLayer::new(breaker))
        .service(hanging());
    shared(&service);
}

/// A retry over a timeout layer honours `retry_timeouts(false)`: an attempt that timed out
/// below (an `Elapsed` inside the service's error) is not made again.
#[tokio::test(start_paused = true)]
async fn a_retry_over_a_timeout_layer_does_not_retry_timeouts_when_told_not_to() {
    let calls = Arc::new(AtomicU32::new(0));
    let counted = calls.clone();
    let slow = service_fn(move |request: u32| {
        counted.fetch_add(1, Ordering::SeqCst);
        async move {
            tokio::time::sleep(Duration::from_secs(10)).await;
            Ok::<_, BackendError>(request)
        }
    });
    let service = ServiceBuilder::new()
        .layer(RetryLayer::new(
            Retry::<Error<BackendError>>::builder()
                .max_attempts(3)
                .retry_timeouts(false)
                .build()
                .expect("retry"),
        ))
        .layer(TimeoutLayer::new(Timeout::new(Duration::from_millis(100))))
        .service(slow);
    let error = service.oneshot(1).await.unwrap_err();
    assert!(
        matches!(&error, Error::Inner(Error::Elapsed(_))),
        "{error:?}"
    );
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "the timed-out attempt ran again"
    );
}
