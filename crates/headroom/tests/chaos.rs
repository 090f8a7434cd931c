//! Parts built from `Headroom::with_chaos` meet the injected backend faults, and keep their
//! promises: a cache whose backend (L2 and bus) fails, crawls or stalls still answers every
//! caller, through its loader, and a cache whose instance loses every
//! invalidation message serves nothing older than its staleness bound.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use headroom::Headroom;
use headroom::cache::Cache;
use headroom::chaos::{Delay, Experiment, ExperimentConfig, FaultKind};

const HOUR: Duration = Duration::from_secs(3600);
/// The cache every instance of these tests shares through the backend.
fn prices(headroom: &Headroom) -> Cache<u64, u64> {
    headroom
        .cache::<u64, u64>("prices")
        .unwrap()
        .ttl(HOUR)
        .build()
        .unwrap()
}

/// The cache's default L2 timeout, and a tick for the loader's own answer.
const L2_TIMEOUT: Duration = Duration::from_millis(251);

#[tokio::test(start_paused = true)]
async fn a_cache_whose_backend_fails_crawls_or_stalls_still_answers_every_caller() {
    let headroom = Headroom::builder().namespace("chaos-l2").memory().unwrap();
    let experiment = Experiment::builder("l2-down").build().unwrap();
    let cache = prices(&headroom.with_chaos(&experiment));
    let loads = Arc::new(AtomicU32::new(0));
    let load = |key: u64| {
        let loads = Arc::clone(&loads);
        move |_: u64| async move {
            loads.fetch_add(1, Ordering::Relaxed);
            Ok::<_, std::io::Error>(Some(key * 10))
        }
    };
    for config in [
        ExperimentConfig::new(HOUR).fault_of(1.0, FaultKind::Connection),
        ExperimentConfig::new(HOUR).latency(1.0, Delay::Fixed(Duration::from_secs(5))),
        ExperimentConfig::new(HOUR).abort(1.0),
    ] {
        experiment.start(config.clone()).unwrap();
        cache.clear().await;
        let before = loads.load(Ordering::Relaxed);
        for key in 0..20 {
            // No caller waits on L2 longer than the cache's L2 timeout (250 ms by default).
            let value = tokio::time::timeout(L2_TIMEOUT, cache.get_or_load(&key, load(key)))
                .await
                .unwrap_or_else(|_| panic!("{config:?}: the caller waited on L2"));
            assert_eq!(value.unwrap(), Some(key * 10), "{config:?}");
        }
        assert!(loads.load(Ordering::Relaxed) - before >= 20, "{config:?}");
        experiment.stop();
    }
}

/// Two instances share a cache; one loses every invalidation message (and every ping). After
/// the other updates a value, the deaf instance serves the old value for at most `max_silence`
/// (2 s by default): then it notices the silence and stops trusting its L1.
#[tokio::test(start_paused = true)]
async fn an_instance_losing_every_invalidation_serves_nothing_staler_than_the_bound() {
    let headroom = Headroom::builder().namespace("chaos-bus").memory().unwrap();
    let experiment = Experiment::builder("bus-loss").build().unwrap();
    let writer = prices(&headroom);
    let deaf = prices(&headroom.with_chaos(&experiment));
    writer.insert(7, 100).await.unwrap();
    assert_eq!(deaf.get(&7).await.unwrap(), Some(100));
    tokio::time::sleep(Duration::from_secs(1)).await;

    experiment
        .start(ExperimentConfig::new(HOUR).loss(1.0))
        .unwrap();
    writer.insert(7, 200).await.unwrap();
    let updated = tokio::time::Instant::now();
    loop {
        let seen = deaf.get(&7).await.unwrap();
        if seen == Some(200) {
            break;
        }
        assert_eq!(seen, Some(100));
        assert!(
            updated.elapsed() <= Duration::from_secs(2) + Duration::from_millis(50),
            "still the old value {:?} after the update",
            updated.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        experiment.status().running.unwrap().affected > 0,
        "messages were lost"
    );
}

/// A remove whose L2 delete fails leaves an outdated L2 copy; if the others also miss its
/// message, they read that copy until the delete lands. Once L2 answers the writer again, the
/// delete lands within a second, not a whole breaker cool-down: an instance that lost every
/// message serves the new value within its staleness bound (2 s) of the remove.
#[tokio::test(start_paused = true)]
async fn an_outdated_l2_copy_goes_soon_after_l2_answers_again() {
    let headroom = Headroom::builder()
        .namespace("chaos-outdated")
        .memory()
        .unwrap();
    let writer_cut = Experiment::builder("writer-cut").build().unwrap();
    let deaf = Experiment::builder("deaf").build().unwrap();
    let writer = prices(&headroom.with_chaos(&writer_cut));
    let reader = prices(&headroom.with_chaos(&deaf));
    let load = |value: u64| move |_: u64| async move { Ok::<_, std::io::Error>(Some(value)) };
    assert_eq!(reader.get_or_load(&7, load(100)).await.unwrap(), Some(100));
    tokio::time::sleep(Duration::from_secs(1)).await;

    deaf.start(ExperimentConfig::new(HOUR).loss(1.0)).unwrap();
    writer_cut
        .start(ExperimentConfig::new(HOUR).fault_of(1.0, FaultKind::Connection))
        .unwrap();
    writer.remove(&7).await.unwrap();
    let removed = tokio::time::Instant::now();
    assert_eq!(writer.pending_l2_deletes(), 1);
    tokio::time::sleep(Duration::from_millis(100)).await;
    writer_cut.stop();

    loop {
        let seen = reader.get_or_load(&7, load(200)).await.unwrap();
        if seen == Some(200) {
            break;
        }
        assert_eq!(seen, Some(100));
        assert!(
            removed.elapsed() <= Duration::from_millis(2_050),
            "the old value is still served {:?} after the remove",
            removed.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(writer.pending_l2_deletes(), 0);
}
