//! The job store wrapper, over the memory job store on tokio's paused clock: off it is the
//! inner store; on, every step is delayed, fails without reaching the store, or is held until
//! the experiment stops.

use std::time::Duration;

use bytes::Bytes;
use futures_util::FutureExt;
use headroom_chaos::{ChaosJobStore, Delay, Experiment, ExperimentConfig, FaultKind};
use headroom_core::jobs::{
    Completion, EnqueueLimits, Enqueued, FetchRequest, JobState, JobStore, NewJob,
};
use headroom_core::lease::Fenced;
use headroom_core::memory::MemoryJobStore;
use headroom_core::{BackendErrorKind, Key, Namespace};
use tokio::time::Instant;

const MINUTE: Duration = Duration::from_secs(60);

fn partition() -> Key {
    Namespace::new("chaos-jobs").unwrap().key("{q.0}").unwrap()
}

fn limits() -> EnqueueLimits {
    EnqueueLimits {
        max_len: 100,
        max_per_tenant: None,
        dedup_window: MINUTE,
    }
}

fn request() -> FetchRequest<'static> {
    FetchRequest {
        consumer: "w",
        lanes: &[0],
        max: 10,
        visibility: MINUTE,
    }
}

fn completion(held: &headroom_core::jobs::Delivery) -> Completion {
    Completion {
        number: held.number,
        attempt: held.attempt,
        result: Bytes::from_static(b"r"),
    }
}

fn experiment() -> Experiment {
    Experiment::builder("jobs").seed(7).build().unwrap()
}

#[tokio::test(start_paused = true)]
async fn off_the_wrapper_answers_what_the_store_answers() {
    let inner = MemoryJobStore::new();
    let wrapped = ChaosJobStore::new(inner.clone(), experiment());
    let p = partition();
    let job = NewJob::new(Bytes::from_static(b"x")).tenant("acme");
    let Enqueued::Added(number) = wrapped.enqueue(&p, &job, &limits()).await.unwrap() else {
        panic!("not added");
    };
    let delivered = wrapped.fetch(&p, request()).await.unwrap();
    assert_eq!(delivered.len(), 1);
    assert_eq!(
        wrapped.extend(&p, number, 1).await.unwrap(),
        Fenced::Applied
    );
    assert_eq!(
        wrapped
            .complete(&p, number, 1, Bytes::from_static(b"r"), MINUTE)
            .await
            .unwrap(),
        Fenced::Applied
    );
    let record = wrapped.status(&p, number).await.unwrap().unwrap();
    assert_eq!(record, inner.status(&p, number).await.unwrap().unwrap());
    assert_eq!(record.state, JobState::Done);
    assert_eq!(
        wrapped.stats(&p).await.unwrap(),
        inner.stats(&p).await.unwrap()
    );
    assert_eq!(
        wrapped.dead_letters(&p, 10).await.unwrap(),
        Vec::<u64>::new()
    );
}

#[tokio::test(start_paused = true)]
async fn a_fault_fails_every_step_without_reaching_the_store() {
    let inner = MemoryJobStore::new();
    let experiment = experiment();
    let wrapped = ChaosJobStore::new(inner.clone(), experiment.clone());
    let p = partition();
    let job = NewJob::new(Bytes::from_static(b"x"));
    inner.enqueue(&p, &job, &limits()).await.unwrap();
    let held = inner.fetch(&p, request()).await.unwrap().pop().unwrap();
    experiment
        .start(ExperimentConfig::new(MINUTE).fault_of(1.0, FaultKind::Connection))
        .unwrap();
    let kinds = [
        wrapped.enqueue(&p, &job, &limits()).await.map(|_| ()),
        wrapped.fetch(&p, request()).await.map(|_| ()),
        wrapped.fetch_marked(&p, request(), 42).await.map(|_| ()),
        wrapped.recover(&p, "w", 42, 10).await.map(|_| ()),
        wrapped
            .extend(&p, held.number, held.attempt)
            .await
            .map(|_| ()),
        wrapped
            .complete(&p, held.number, held.attempt, Bytes::new(), MINUTE)
            .await
            .map(|_| ()),
        wrapped
            .complete_many(&p, &[completion(&held)], MINUTE)
            .await
            .map(|_| ()),
        wrapped
            .retry(&p, held.number, held.attempt, Duration::ZERO, Bytes::new())
            .await
            .map(|_| ()),
        wrapped
            .bury(&p, held.number, held.attempt, Bytes::new(), MINUTE)
            .await
            .map(|_| ()),
        wrapped.status(&p, held.number).await.map(|_| ()),
        wrapped.dead_letters(&p, 10).await.map(|_| ()),
        wrapped.stats(&p).await.map(|_| ()),
    ];
    for answer in kinds {
        assert_eq!(answer.unwrap_err().kind(), BackendErrorKind::Connection);
    }
    // Nothing reached the store: one job, still running in its first attempt.
    let stats = inner.stats(&p).await.unwrap();
    assert_eq!((stats.unfinished, stats.running, stats.ready), (1, 1, 0));
    let record = inner.status(&p, held.number).await.unwrap().unwrap();
    assert_eq!((record.state, record.attempt), (JobState::Running, 1));
}

#[tokio::test(start_paused = true)]
async fn latency_delays_each_step_and_an_abort_holds_it_until_the_stop() {
    let experiment = experiment();
    let wrapped = ChaosJobStore::new(MemoryJobStore::new(), experiment.clone());
    let p = partition();
    let job = NewJob::new(Bytes::from_static(b"x"));
    experiment
        .start(ExperimentConfig::new(MINUTE).latency(1.0, Delay::Fixed(Duration::from_millis(50))))
        .unwrap();
    let start = Instant::now();
    wrapped.enqueue(&p, &job, &limits()).await.unwrap();
    wrapped.fetch(&p, request()).await.unwrap();
    assert_eq!(start.elapsed(), Duration::from_millis(100));

    experiment
        .start(ExperimentConfig::new(MINUTE).abort(1.0))
        .unwrap();
    let mut held = Box::pin(wrapped.stats(&p));
    assert!(held.as_mut().now_or_never().is_none());
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert!(
        held.as_mut().now_or_never().is_none(),
        "an aborted step ended by itself"
    );
    experiment.stop();
    let stats = held.await.unwrap();
    assert_eq!((stats.unfinished, stats.running), (1, 1));
}

/// Off, a fetch's mark reaches the store, so the jobs of a fetch whose answer was lost are
/// recovered through the wrapper as through the store itself.
#[tokio::test(start_paused = true)]
async fn off_the_jobs_of_a_lost_fetch_are_recovered_through_the_wrapper() {
    let inner = MemoryJobStore::new();
    let wrapped = ChaosJobStore::new(inner.clone(), experiment());
    let p = partition();
    wrapped
        .enqueue(&p, &NewJob::new(Bytes::from_static(b"x")), &limits())
        .await
        .unwrap();
    let fetched = wrapped.fetch_marked(&p, request(), 42).await.unwrap();
    let recovered = wrapped.recover(&p, "w", 42, 10).await.unwrap();
    assert_eq!(recovered, fetched);
    assert_eq!(inner.recover(&p, "w", 42, 10).await.unwrap(), fetched);
}
