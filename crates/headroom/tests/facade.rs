//! The facade's own surface: its errors, its prelude and the builders it wires.

use std::time::Duration;

use headroom::Headroom;
use headroom::core::ManualClock;
use headroom::prelude::*;

#[test]
fn build_error_display_names_its_cause() {
    let err = Headroom::builder()
        .namespace("has space")
        .memory()
        .unwrap_err();
    let cause = headroom::core::Namespace::new("has space")
        .unwrap_err()
        .to_string();
    let shown = err.to_string();
    assert!(
        shown.contains(&cause),
        "`{shown}` does not say why: `{cause}`"
    );
}

#[test]
fn prelude_names_the_failure_handling_and_topology_types() {
    // Each name resolves through `headroom::prelude::*` alone.
    let _: fn() -> headroom::breaker::PipelineBuilder<std::io::Error> = Pipeline::builder;
    let _: fn() -> headroom::breaker::RetryBudgetBuilder = RetryBudget::builder;
    let _: fn() -> headroom::breaker::HedgeBuilder = Hedge::builder;
    let _: Option<Fallback<u32, std::io::Error>> = None;
    let _: Option<Topology<String>> = None;
    let _: Option<TopologyHandle<String>> = None;
    let _: Option<(Node<String>, Role, ShardId)> = None;
}

#[tokio::test]
async fn pipelines_from_headroom_run_on_its_clock() {
    let manual = ManualClock::new();
    let headroom = Headroom::builder().clock(manual.clock()).memory().unwrap();
    let pipeline = headroom
        .pipeline::<std::io::Error>("inventory")
        .timeout(Duration::from_secs(5))
        .build();
    let call = tokio::spawn(async move {
        pipeline
            .call(std::future::pending::<Result<(), std::io::Error>>)
            .await
    });
    // The timeout fires when the shared clock says so, not on the wall clock.
    tokio::task::yield_now().await;
    assert!(!call.is_finished());
    while !call.is_finished() {
        manual.advance(Duration::from_secs(5));
        tokio::task::yield_now().await;
    }
    let err = call.await.unwrap().unwrap_err();
    assert_eq!(err.kind(), headroom::breaker::ErrorKind::Elapsed, "{err:?}");
}

#[test]
fn retry_budgets_from_headroom_run_on_its_clock() {
    let manual = ManualClock::new();
    let headroom = Headroom::builder().clock(manual.clock()).memory().unwrap();
    let budget = headroom
        .retry_budget()
        .ratio(1.0)
        .min_per_second(0)
        .window(Duration::from_secs(10))
        .build()
        .unwrap();
    budget.deposit();
    // The deposit leaves the window when the shared clock has moved past it.
    manual.advance(Duration::from_secs(11));
    assert!(!budget.try_withdraw());
}
