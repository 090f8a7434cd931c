//! The backend wrappers: off they are the inner store; on, they delay, fail without reaching
//! the store, hold until the experiment stops, and lose bus messages at the rate asked.

use std::time::Duration;

use bytes::Bytes;
use headroom_chaos::{
    ChaosBus, ChaosKvStore, ChaosLeaseStore, ChaosRateStore, Delay, Experiment, ExperimentConfig,
    FaultKind,
};
use headroom_core::bus::{BusEvent, InvalidationBus};
use headroom_core::kv::KvStore;
use headroom_core::lease::{Begin, LeaseStore};
use headroom_core::memory::{MemoryBus, MemoryKvStore, MemoryLeaseStore, MemoryRateStore};
use headroom_core::rate::{Gcra, RateStore};
use headroom_core::{BackendErrorKind, Key, Namespace};
use tokio::time::{Instant, timeout};

const MINUTE: Duration = Duration::from_secs(60);

fn key(name: &str) -> Key {
    Namespace::new("chaos-test").unwrap().key(name).unwrap()
}

fn experiment() -> Experiment {
    Experiment::builder("backend").seed(11).build().unwrap()
}

#[tokio::test(start_paused = true)]
async fn a_kv_store_is_the_inner_one_while_off_and_faults_without_touching_it_while_on() {
    let experiment = experiment();
    let inner = MemoryKvStore::new();
    let store = ChaosKvStore::new(inner.clone(), experiment.clone());
    store
        .set(&key("a"), Bytes::from_static(b"1"), MINUTE)
        .await
        .unwrap();
    assert_eq!(
        store.get(&key("a")).await.unwrap(),
        Some(Bytes::from_static(b"1"))
    );

    experiment
        .start(ExperimentConfig::new(MINUTE).fault_of(1.0, FaultKind::Timeout))
        .unwrap();
    let error = store
        .set(&key("b"), Bytes::from_static(b"2"), MINUTE)
        .await
        .unwrap_err();
    assert_eq!(error.kind(), BackendErrorKind::Timeout);
    assert!(error.detail().unwrap().contains("`backend`"), "{error}");
    assert_eq!(
        store.get_many(&[key("a")]).await.unwrap_err().kind(),
        BackendErrorKind::Timeout
    );
    assert_eq!(
        store.delete(&[key("a")]).await.unwrap_err().kind(),
        BackendErrorKind::Timeout
    );
    experiment.stop();
    assert_eq!(
        inner.get(&key("b")).await.unwrap(),
        None,
        "a failed set wrote nothing"
    );
    assert_eq!(
        store.get(&key("a")).await.unwrap(),
        Some(Bytes::from_static(b"1"))
    );
}

#[tokio::test(start_paused = true)]
async fn every_wrapper_delays_its_calls_by_the_injected_latency() {
    let experiment = experiment();
    experiment
        .start(ExperimentConfig::new(MINUTE).latency(1.0, Delay::Fixed(Duration::from_millis(50))))
        .unwrap();
    let kv = ChaosKvStore::new(MemoryKvStore::new(), experiment.clone());
    let leases = ChaosLeaseStore::new(MemoryLeaseStore::new(), experiment.clone());
    let rates = ChaosRateStore::new(MemoryRateStore::new(), experiment.clone());
    let gcra = Gcra {
        emission_interval: Duration::from_millis(100),
        burst: 10,
    };
    let started = Instant::now();
    kv.get(&key("a")).await.unwrap();
    assert_eq!(started.elapsed(), Duration::from_millis(50));
    let begun = leases
        .begin(&key("op"), b"fingerprint", MINUTE)
        .await
        .unwrap();
    assert!(matches!(begun, Begin::Acquired { .. }), "{begun:?}");
    assert_eq!(started.elapsed(), Duration::from_millis(100));
    assert!(rates.apply(&key("cell"), gcra, 1).await.unwrap().allowed);
    assert_eq!(started.elapsed(), Duration::from_millis(150));
    assert_eq!(
        leases.begin_completes_at_once(),
        MemoryLeaseStore::new().begin_completes_at_once(),
        "the inner store's answer, not the trait's default"
    );
}

/// A stalled backend: calls hang until the caller's timeout; once the experiment stops, a
/// held call reaches the store.
#[tokio::test(start_paused = true)]
async fn an_aborted_call_is_held_until_the_experiment_stops() {
    let experiment = experiment();
    let store = ChaosKvStore::new(MemoryKvStore::new(), experiment.clone());
    experiment
        .start(ExperimentConfig::new(Duration::from_secs(3600)).abort(1.0))
        .unwrap();
    assert!(
        timeout(Duration::from_secs(1), store.get(&key("a")))
            .await
            .is_err()
    );
    let held = tokio::spawn({
        let store = store.clone();
        async move {
            store
                .set(&key("a"), Bytes::from_static(b"late"), MINUTE)
                .await
        }
    });
    tokio::time::sleep(MINUTE).await;
    assert!(!held.is_finished());
    experiment.stop();
    held.await.unwrap().unwrap();
    assert_eq!(
        store.get(&key("a")).await.unwrap(),
        Some(Bytes::from_static(b"late"))
    );
}

/// The messages already delivered to `subscription`: those it yields before the (paused)
/// clock runs idle for a second.
async fn delivered(subscription: &mut headroom_core::bus::Subscription) -> u32 {
    let mut count = 0;
    while let Ok(event) = timeout(Duration::from_secs(1), subscription.next_event()).await {
        match event {
            Some(BusEvent::Message(_)) => count += 1,
            Some(_) => {}
            None => panic!("the subscription ended"),
        }
    }
    count
}

/// Lost messages are lost for the subscribers through the wrapper only, silently, at the rate
/// asked: 0.3 of 10,000, within ±0.02 (about 4.4 standard deviations).
#[tokio::test(start_paused = true)]
async fn a_bus_loses_messages_silently_at_the_rate_asked() {
    let experiment = experiment();
    let bus = MemoryBus::with_capacity(20_000);
    let chaotic = ChaosBus::new(bus.clone(), experiment.clone());
    let channel = key("channel");
    let mut direct = bus.subscribe(&channel).await.unwrap();
    let mut through = chaotic.subscribe(&channel).await.unwrap();
    experiment
        .start(ExperimentConfig::new(MINUTE).loss(0.3))
        .unwrap();
    for n in 0..10_000u32 {
        chaotic
            .publish(&channel, Bytes::from(n.to_le_bytes().to_vec()))
            .await
            .unwrap();
    }
    assert_eq!(delivered(&mut direct).await, 10_000);
    let lost = 10_000 - delivered(&mut through).await;
    let share = f64::from(lost) / 10_000.0;
    assert!((share - 0.3).abs() <= 0.02, "{lost} lost");
    experiment.stop();
    bus.publish(&channel, Bytes::from_static(b"after"))
        .await
        .unwrap();
    assert_eq!(
        delivered(&mut through).await,
        1,
        "nothing is lost once stopped"
    );
}

/// Only the keys picked are affected, and only they are seen.
#[tokio::test]
async fn the_key_predicate_limits_the_experiment_to_the_keys_it_picks() {
    let experiment = experiment();
    let store = ChaosKvStore::new(MemoryKvStore::new(), experiment.clone())
        .when(|key: &Key| key.local().starts_with(b"hot:"));
    experiment
        .start(ExperimentConfig::new(MINUTE).fault(1.0))
        .unwrap();
    for n in 0..10 {
        assert!(store.get(&key(&format!("hot:{n}"))).await.is_err());
        assert!(store.get(&key(&format!("cold:{n}"))).await.is_ok());
        assert!(
            store
                .get_many(&[key("cold:a"), key(&format!("hot:{n}"))])
                .await
                .is_err(),
            "a multi-key call on a picked key is seen"
        );
    }
    assert_eq!(experiment.status().running.unwrap().seen, 20);
}
