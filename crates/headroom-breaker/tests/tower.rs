//! The tower layers (feature `tower`).
#![cfg(feature = "tower")]

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use headroom_breaker::tower::{CircuitBreakerLayer, PipelineLayer};
use headroom_breaker::{CircuitBreaker, ErrorKind, Pipeline, Retry, State};
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
    use futures_util::FutureExt;

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
    let mut waiting = service.clone();
    let ready = waiting
        .ready()
        .now_or_never()
        .expect("an open circuit is ready at once, whatever the inner service's backpressure")
        .expect("ready");
    let error = ready
        .call(2)
        .now_or_never()
        .expect("the rejection needs no wait")
        .unwrap_err();
    assert_eq!(error.kind(), ErrorKind::CircuitOpen);
    assert!(
        matches!(error, headroom_breaker::Error::CircuitOpen(open) if open.retry_after().is_some())
    );
    drop(in_flight);
}
