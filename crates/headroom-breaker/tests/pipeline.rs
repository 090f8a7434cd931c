//! Composition: the order of the strategies and what each passes to the next.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use headroom_breaker::{
    CircuitBreaker, ErrorKind, Fallback, Hedge, Pipeline, Retry, RetryBudget, State,
};
use headroom_core::Classify;
use metrics_exporter_prometheus::PrometheusBuilder;
use tokio::time::Instant;

#[derive(Debug, PartialEq)]
enum Failure {
    /// Retryable, optionally with the server's retry-after.
    Busy(Option<Duration>),
    /// Not retryable.
    Invalid,
}

impl Classify for Failure {
    fn is_timeout(&self) -> bool {
        false
    }

    fn is_retryable(&self) -> bool {
        matches!(self, Self::Busy(_))
    }
}

fn retry() -> headroom_breaker::RetryBuilder<Failure> {
    Retry::builder()
        .max_attempts(4)
        .base_delay(Duration::from_millis(100))
        .max_delay(Duration::from_secs(1))
        .retry_after(|error| match error {
            Failure::Busy(after) => *after,
            Failure::Invalid => None,
        })
}

#[tokio::test(start_paused = true)]
async fn retries_retryable_errors_up_to_max_attempts_with_capped_backoff() {
    let pipeline = Pipeline::builder()
        .retry(retry().build().expect("retry"))
        .build();
    let calls = AtomicU32::new(0);
    let start = Instant::now();
    let error = pipeline
        .call(|| {
            calls.fetch_add(1, Ordering::SeqCst);
            async { Err::<(), _>(Failure::Busy(None)) }
        })
        .await
        .unwrap_err();
    assert_eq!(calls.load(Ordering::SeqCst), 4);
    assert_eq!(error.into_inner(), Some(Failure::Busy(None)));
    // Full jitter below caps of 100, 200 and 400 ms.
    assert!(start.elapsed() <= Duration::from_millis(700));
}

#[tokio::test(start_paused = true)]
async fn non_retryable_errors_are_returned_at_once() {
    let pipeline = Pipeline::builder()
        .retry(retry().build().expect("retry"))
        .build();
    let calls = AtomicU32::new(0);
    let error = pipeline
        .call(|| {
            calls.fetch_add(1, Ordering::SeqCst);
            async { Err::<(), _>(Failure::Invalid) }
        })
        .await
        .unwrap_err();
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!(error.inner(), Some(&Failure::Invalid));
}

#[tokio::test(start_paused = true)]
async fn a_servers_retry_after_is_honoured_and_too_long_a_wait_is_not_retried() {
    let pipeline = Pipeline::builder()
        .retry(
            retry()
                .max_retry_after(Duration::from_secs(5))
                .build()
                .expect("retry"),
        )
        .build();
    let calls = AtomicU32::new(0);
    let start = Instant::now();
    let value = pipeline
        .call(|| {
            let first = calls.fetch_add(1, Ordering::SeqCst) == 0;
            async move {
                if first {
                    Err(Failure::Busy(Some(Duration::from_secs(3))))
                } else {
                    Ok("served")
                }
            }
        })
        .await
        .expect("second attempt");
    assert_eq!(value, "served");
    assert!(start.elapsed() >= Duration::from_secs(3));

    let calls = AtomicU32::new(0);
    let error = pipeline
        .call(|| {
            calls.fetch_add(1, Ordering::SeqCst);
            async { Err::<(), _>(Failure::Busy(Some(Duration::from_secs(60)))) }
        })
        .await
        .unwrap_err();
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!(error.kind(), ErrorKind::Inner);
}

#[tokio::test(start_paused = true)]
async fn the_breaker_counts_attempts_and_an_open_circuit_is_not_retried() {
    let breaker = CircuitBreaker::builder()
        .count_window(4)
        .minimum_calls(4)
        .failure_ratio(1.0)
        .build()
        .expect("breaker");
    let pipeline = Pipeline::builder()
        .retry(retry().build().expect("retry"))
        .breaker(breaker.clone())
        .build();
    let calls = AtomicU32::new(0);
    let error = pipeline
        .call(|| {
            calls.fetch_add(1, Ordering::SeqCst);
            async { Err::<(), _>(Failure::Busy(None)) }
        })
        .await
        .unwrap_err();
    assert_eq!(calls.load(Ordering::SeqCst), 4, "four attempts");
    assert_eq!(error.kind(), ErrorKind::Inner);
    assert_eq!(breaker.state(), State::Open, "the four attempts tripped it");

    let error = pipeline
        .call(|| {
            calls.fetch_add(1, Ordering::SeqCst);
            async { Ok::<_, Failure>(()) }
        })
        .await
        .unwrap_err();
    assert_eq!(error.kind(), ErrorKind::CircuitOpen);
    assert!(error.is_rejected());
    assert_eq!(calls.load(Ordering::SeqCst), 4, "never called while open");
}

#[tokio::test(start_paused = true)]
async fn a_spent_budget_ends_retries_with_a_typed_error_keeping_the_last_one() {
    let budget = RetryBudget::builder()
        .ratio(0.0)
        .min_per_second(0)
        .build()
        .expect("budget");
    let pipeline = Pipeline::builder()
        .retry(retry().budget(budget).build().expect("retry"))
        .build();
    let error = pipeline
        .call(|| async { Err::<(), _>(Failure::Busy(None)) })
        .await
        .unwrap_err();
    assert_eq!(error.kind(), ErrorKind::BudgetExhausted);
    assert!(error.is_rejected() && !error.is_retryable());
    assert_eq!(error.inner(), Some(&Failure::Busy(None)));
}

/// A retry whose caller goes away while it waits never runs: the budget unit it took goes
/// back, so the next request can still retry, and it does not count as a retry made.
#[tokio::test(start_paused = true)]
async fn a_retry_whose_caller_left_during_its_wait_spends_no_budget() {
    let budget = RetryBudget::builder()
        .ratio(0.0)
        .min_per_second(1)
        .window(Duration::from_secs(1))
        .build()
        .expect("budget");
    let recorder = PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    let pipeline = metrics::with_local_recorder(&recorder, || {
        Pipeline::builder()
            .retry(retry().budget(budget).build().expect("retry"))
            .build()
    });
    let attempts = AtomicU32::new(0);
    let left = tokio::time::timeout(
        Duration::from_millis(10),
        pipeline.call(|| {
            attempts.fetch_add(1, Ordering::SeqCst);
            async { Err::<(), _>(Failure::Busy(Some(Duration::from_secs(5)))) }
        }),
    )
    .await;
    assert!(left.is_err(), "the caller left during the 5 s wait");
    let answered = pipeline
        .call(|| {
            let first = attempts.fetch_add(1, Ordering::SeqCst) == 1;
            async move {
                if first {
                    Err(Failure::Busy(None))
                } else {
                    Ok(())
                }
            }
        })
        .await;
    assert!(answered.is_ok(), "{answered:?}");
    assert_eq!(attempts.load(Ordering::SeqCst), 3);
    let rendered = handle.render();
    let retries = rendered.lines().find_map(|line| {
        line.strip_prefix("headroom_breaker_retries_total{pipeline=\"default\"} ")
    });
    assert_eq!(retries, Some("1"), "{rendered}");
}

#[tokio::test(start_paused = true)]
async fn fallback_answers_when_the_circuit_is_open_or_attempts_are_spent() {
    let breaker = CircuitBreaker::builder().build().expect("breaker");
    let pipeline = Pipeline::builder()
        .retry(retry().max_attempts(2).build().expect("retry"))
        .breaker(breaker.clone())
        .build();
    let fallback = Fallback::with(|error: &headroom_breaker::Error<Failure>| {
        format!("fallback after {:?}", error.kind())
    });
    let spent = pipeline
        .call_with_fallback(&fallback, || async {
            Err::<String, _>(Failure::Busy(None))
        })
        .await;
    assert_eq!(spent.expect("fallback"), "fallback after Inner");
    breaker.isolate();
    let open = pipeline
        .call_with_fallback(&fallback, || async { Ok("live".to_owned()) })
        .await;
    assert_eq!(open.expect("fallback"), "fallback after CircuitOpen");

    let only_when_open = Fallback::value("cached".to_owned())
        .when(|error: &headroom_breaker::Error<Failure>| error.kind() == ErrorKind::CircuitOpen);
    breaker.reset();
    let error = pipeline
        .call_with_fallback(&only_when_open, || async {
            Err::<String, _>(Failure::Invalid)
        })
        .await
        .unwrap_err();
    assert_eq!(error.inner(), Some(&Failure::Invalid));
}

/// The pipeline's name labels the metrics of the retry and hedge it is given, though they
/// were built before it under the default name.
#[tokio::test(start_paused = true)]
async fn the_pipelines_name_labels_its_retry_and_hedge_metrics() {
    let recorder = PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    let pipeline = metrics::with_local_recorder(&recorder, || {
        Pipeline::builder()
            .name("inventory")
            .retry(retry().build().expect("retry"))
            .hedge(
                Hedge::builder()
                    .delay(Duration::from_millis(10))
                    .build()
                    .expect("hedge"),
            )
            .build()
    });
    let calls = AtomicU32::new(0);
    pipeline
        .call(|| {
            let call = calls.fetch_add(1, Ordering::SeqCst);
            async move {
                match call {
                    // The first attempt fails and is retried.
                    0 => Err(Failure::Busy(None)),
                    // The second is slow, so it is hedged; the hedge answers.
                    1 => {
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        Ok(())
                    }
                    _ => Ok(()),
                }
            }
        })
        .await
        .expect("the hedge answers");
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    let rendered = handle.render();
    let count = |series: &str| {
        rendered
            .lines()
            .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
            .map(|value| value.trim().parse::<f64>().expect("a number"))
    };
    assert_eq!(
        count(r#"headroom_breaker_retries_total{pipeline="inventory"}"#),
        Some(1.0),
        "{rendered}"
    );
    assert_eq!(
        count(r#"headroom_breaker_hedges_total{pipeline="inventory"}"#),
        Some(1.0),
        "{rendered}"
    );
}

/// A half-open breaker lets `half_open_probes` calls through, and a hedge under it must not
/// add calls to a probe; a call admitted while closed is hedged as usual.
#[tokio::test(start_paused = true)]
async fn a_half_open_probe_is_one_call_even_with_a_hedge() {
    let breaker = CircuitBreaker::builder()
        .count_window(1)
        .minimum_calls(1)
        .half_open_probes(1)
        .open_duration(Duration::from_secs(1))
        .build()
        .expect("breaker");
    let pipeline = Pipeline::builder()
        .breaker(breaker.clone())
        .hedge(
            Hedge::builder()
                .delay(Duration::from_millis(10))
                .max_hedges(3)
                .build()
                .expect("hedge"),
        )
        .build();
    let error = pipeline
        .call(|| async { Err::<(), _>(Failure::Invalid) })
        .await
        .unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Inner);
    assert_eq!(breaker.state(), State::Open);
    tokio::time::advance(Duration::from_secs(1)).await;

    let calls = AtomicU32::new(0);
    let slow = || {
        calls.fetch_add(1, Ordering::SeqCst);
        async {
            tokio::time::sleep(Duration::from_millis(100)).await;
            Ok::<_, Failure>(())
        }
    };
    pipeline.call(slow).await.expect("the probe succeeds");
    assert_eq!(calls.load(Ordering::SeqCst), 1, "the probe was not hedged");
    assert_eq!(breaker.state(), State::Closed);

    pipeline.call(slow).await.expect("closed");
    assert_eq!(
        calls.load(Ordering::SeqCst),
        5,
        "closed again: the call and three hedges"
    );
}

/// The builder takes a zero timeout as it is (`from_config` refuses one): an attempt ready at
/// its first poll still succeeds, and one that waits fails with `Elapsed`.
#[tokio::test(start_paused = true)]
async fn a_zero_timeout_from_the_builder_fails_every_attempt_that_waits() {
    let pipeline = Pipeline::<Failure>::builder()
        .timeout(Duration::ZERO)
        .build();
    assert_eq!(pipeline.call(|| async { Ok(7) }).await.ok(), Some(7));
    let error = pipeline
        .call(|| async {
            tokio::time::sleep(Duration::from_millis(1)).await;
            Ok(7)
        })
        .await
        .unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Elapsed);
}

#[cfg(feature = "serde")]
#[tokio::test(start_paused = true)]
async fn a_pipeline_loads_from_configuration() {
    let config: headroom_breaker::PipelineConfig = serde_json::from_str(
        r#"{
            "timeout": "100ms",
            "breaker": { "window": { "kind": "count", "size": 10 }, "minimum_calls": 5 },
            "retry": { "max_attempts": 2, "base_delay": "10ms" },
            "budget": { "ratio": 0.5 },
            "hedge": { "delay": "20ms" }
        }"#,
    )
    .expect("config");
    let pipeline =
        Pipeline::<Failure>::from_config(&config, "orders", headroom_core::Clock::system())
            .expect("valid config");
    let calls = AtomicU32::new(0);
    let error = pipeline
        .call(|| {
            calls.fetch_add(1, Ordering::SeqCst);
            async {
                tokio::time::sleep(Duration::from_secs(1)).await;
                Ok::<_, Failure>(())
            }
        })
        .await
        .unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Elapsed);
    assert_eq!(
        calls.load(Ordering::SeqCst),
        4,
        "2 attempts, each hedged once"
    );
    assert_eq!(pipeline.breaker().map(CircuitBreaker::name), Some("orders"));

    let bad: headroom_breaker::PipelineConfig =
        serde_json::from_str(r#"{ "retry": { "max_attempts": 0 } }"#).expect("parses");
    let error = Pipeline::<Failure>::from_config(&bad, "orders", headroom_core::Clock::system())
        .unwrap_err();
    assert_eq!(error.field(), "retry.max_attempts");
}

/// A retry refused by the breaker after its wait never reached the dependency: its budget
/// unit goes back, it is not counted as a retry made, and the caller gets the error of the
/// last attempt made.
#[tokio::test(start_paused = true)]
async fn a_retry_refused_by_the_breaker_after_its_wait_spends_no_budget() {
    let budget = RetryBudget::builder()
        .ratio(0.0)
        .min_per_second(1)
        .window(Duration::from_secs(1))
        .build()
        .expect("budget");
    let breaker = CircuitBreaker::builder().build().expect("breaker");
    let recorder = PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    let pipeline = metrics::with_local_recorder(&recorder, || {
        Pipeline::builder()
            .retry(
                retry()
                    .max_attempts(2)
                    .budget(budget.clone())
                    .build()
                    .expect("retry"),
            )
            .breaker(breaker.clone())
            .build()
    });
    let attempts = AtomicU32::new(0);
    // The server asks for at least 50 ms; the circuit is isolated 10 ms into the wait.
    let busy = Failure::Busy(Some(Duration::from_millis(50)));
    let (answer, ()) = tokio::join!(
        pipeline.call(|| {
            attempts.fetch_add(1, Ordering::SeqCst);
            async { Err::<(), _>(Failure::Busy(Some(Duration::from_millis(50)))) }
        }),
        async {
            tokio::time::sleep(Duration::from_millis(10)).await;
            breaker.isolate();
        },
    );
    assert_eq!(attempts.load(Ordering::SeqCst), 1, "the retry never ran");
    assert!(budget.try_withdraw(), "the retry's unit went back");
    let rendered = handle.render();
    let retries = rendered.lines().find_map(|line| {
        line.strip_prefix("headroom_breaker_retries_total{pipeline=\"default\"} ")
    });
    assert!(matches!(retries, None | Some("0")), "{rendered}");
    let error = answer.unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Inner, "{error:?}");
    assert_eq!(error.into_inner(), Some(busy));
}
