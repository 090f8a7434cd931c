//! The metrics the cache records, read back through a small in-test recorder.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use common::Probe;
use headroom_cache::{Cache, CacheError};
use headroom_core::kv::KvStore;
use headroom_core::memory::MemoryKvStore;
use headroom_core::{ManualClock, Namespace};
use metrics::{Counter, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit};
use parking_lot::Mutex;

/// Counters and gauges by `name{label=value,...}`.
#[derive(Clone, Debug, Default)]
struct Recorded(Arc<Mutex<HashMap<String, Arc<AtomicU64>>>>);

impl Recorded {
    fn cell(&self, key: &Key) -> Arc<AtomicU64> {
        let mut labels: Vec<String> = key
            .labels()
            .map(|l| format!("{}={}", l.key(), l.value()))
            .collect();
        labels.sort();
        let name = format!("{}{{{}}}", key.name(), labels.join(","));
        Arc::clone(self.0.lock().entry(name).or_default())
    }

    fn counter(&self, name: &str) -> u64 {
        self.0
            .lock()
            .get(name)
            .map_or(0, |c| c.load(Ordering::SeqCst))
    }

    fn gauge(&self, name: &str) -> f64 {
        f64::from_bits(self.counter(name))
    }
}

impl Recorder for Recorded {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}

    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        Counter::from_arc(self.cell(key))
    }

    fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::from_arc(self.cell(key))
    }

    fn register_histogram(&self, _: &Key, _: &Metadata<'_>) -> Histogram {
        Histogram::noop()
    }
}

const SEC: Duration = Duration::from_secs(1);

fn ns() -> Namespace {
    Namespace::new("test:metrics").unwrap()
}

fn ok(
    value: &str,
) -> impl FnOnce(String) -> std::future::Ready<Result<Option<String>, CacheError>> + Send + 'static
{
    let value = value.to_owned();
    move |_| std::future::ready(Ok(Some(value)))
}

#[tokio::test]
async fn hits_misses_loads_and_stale_serves_are_counted() {
    let recorded = Recorded::default();
    let clock = ManualClock::new();
    let cache: Cache<String, String> = metrics::with_local_recorder(&recorded, || {
        Cache::builder()
            .name("m")
            .clock(clock.clock())
            .ttl(10 * SEC)
            .fail_safe_max_stale(60 * SEC)
            .l2(MemoryKvStore::builder().clock(clock.clock()).build(), ns())
            .build()
            .unwrap()
    });
    let k = "k".to_owned();
    cache.get_or_load(&k, ok("v")).await.unwrap();
    cache.get_or_load(&k, ok("v")).await.unwrap();
    cache.invalidate_local(&k);
    cache.get(&k).await.unwrap();
    assert_eq!(
        recorded.counter("headroom_cache_hits_total{cache=m,level=l1}"),
        1
    );
    assert_eq!(
        recorded.counter("headroom_cache_misses_total{cache=m,level=l1}"),
        2
    );
    assert_eq!(
        recorded.counter("headroom_cache_misses_total{cache=m,level=l2}"),
        1
    );
    assert_eq!(
        recorded.counter("headroom_cache_hits_total{cache=m,level=l2}"),
        1
    );
    assert_eq!(
        recorded.counter("headroom_cache_loads_total{cache=m,outcome=ok}"),
        1
    );

    clock.advance(20 * SEC);
    let stale = cache
        .get_or_load(&k, |_| async {
            Err::<Option<String>, _>(std::io::Error::other("down"))
        })
        .await
        .unwrap();
    assert_eq!(stale.as_deref(), Some("v"));
    assert_eq!(
        recorded.counter("headroom_cache_loads_total{cache=m,outcome=error}"),
        1
    );
    assert_eq!(
        recorded.counter("headroom_cache_stale_served_total{cache=m}"),
        1
    );
}

/// A cache named `m` recording into `recorded`, over `store`, whose L2 breaker opens after
/// `threshold` failures for 5 s.
fn breaker_cache(
    recorded: &Recorded,
    clock: &ManualClock,
    store: &Probe<MemoryKvStore>,
    threshold: u32,
) -> Cache<String, String> {
    metrics::with_local_recorder(recorded, || {
        Cache::builder()
            .name("m")
            .clock(clock.clock())
            .l2(store.clone(), ns())
            .l2_failure_threshold(threshold)
            .l2_cooldown(5 * SEC)
            .build()
            .unwrap()
    })
}

#[tokio::test]
async fn l2_errors_the_breaker_and_corrupt_values_are_reported() {
    let recorded = Recorded::default();
    let clock = ManualClock::new();
    let store = Probe::new(MemoryKvStore::builder().clock(clock.clock()).build());
    let cache = breaker_cache(&recorded, &clock, &store, 2);
    store
        .inner
        .set(
            &ns().key("bad").unwrap(),
            Bytes::from_static(b"junk"),
            60 * SEC,
        )
        .await
        .unwrap();
    assert_eq!(cache.get(&"bad".to_owned()).await.unwrap(), None);
    assert_eq!(
        recorded.counter("headroom_cache_l2_corrupt_total{cache=m}"),
        1
    );

    store.calls.fail.store(true, Ordering::SeqCst);
    for i in 0..4 {
        cache.get(&format!("k{i}")).await.unwrap();
    }
    assert_eq!(
        recorded.counter("headroom_cache_l2_errors_total{cache=m,kind=error}"),
        2
    );
    assert_eq!(
        recorded.counter("headroom_cache_l2_skipped_total{cache=m}"),
        2
    );
    assert_eq!(
        recorded.gauge("headroom_cache_l2_breaker_open{cache=m}"),
        1.0
    );

    store.calls.fail.store(false, Ordering::SeqCst);
    clock.advance(5 * SEC);
    cache.get(&"k0".to_owned()).await.unwrap();
    assert_eq!(
        recorded.gauge("headroom_cache_l2_breaker_open{cache=m}"),
        0.0
    );
}

/// A batch read counts a hit or a miss per key at each level, as the same reads one at a
/// time do: an L2 key absent, unreadable or not reached (L2 failing, its breaker open) is an
/// L2 miss.
#[tokio::test]
async fn batch_reads_count_a_hit_or_miss_per_key_at_each_level() {
    let recorded = Recorded::default();
    let clock = ManualClock::new();
    let store = Probe::new(MemoryKvStore::builder().clock(clock.clock()).build());
    let cache = breaker_cache(&recorded, &clock, &store, 1);
    let keys = |names: &[&str]| -> Vec<String> { names.iter().map(|&n| n.to_owned()).collect() };
    let load_all = |keys: Vec<String>| async move {
        Ok::<_, CacheError>(
            keys.into_iter()
                .map(|k| (k.clone(), k))
                .collect::<HashMap<_, _>>(),
        )
    };
    let counter = |name: &str, level: &str| {
        recorded.counter(&format!(
            "headroom_cache_{name}_total{{cache=m,level={level}}}"
        ))
    };
    cache.insert("a".to_owned(), "a".to_owned()).await.unwrap();
    cache.invalidate_local(&"a".to_owned());
    cache
        .get_many_or_load(&keys(&["a", "b", "c"]), load_all)
        .await
        .unwrap();
    assert_eq!(counter("misses", "l1"), 3);
    assert_eq!(counter("hits", "l2"), 1);
    assert_eq!(counter("misses", "l2"), 2, "b and c are absent from L2");

    store.calls.fail.store(true, Ordering::SeqCst);
    cache
        .get_many_or_load(&keys(&["d", "e"]), load_all)
        .await
        .unwrap();
    assert_eq!(counter("misses", "l2"), 4, "L2 failed for d and e");
    cache
        .get_many_or_load(&keys(&["f", "g", "h"]), load_all)
        .await
        .unwrap();
    assert_eq!(
        counter("misses", "l2"),
        7,
        "the breaker kept f, g and h from L2"
    );
    assert_eq!(counter("misses", "l1"), 8);
}

#[tokio::test]
async fn l1_evictions_are_counted_unless_disabled() {
    for enabled in [true, false] {
        let recorded = Recorded::default();
        let cache: Cache<u32, u32> = metrics::with_local_recorder(&recorded, || {
            Cache::builder()
                .name("m")
                .l1_max_capacity(10)
                .l1_eviction_metric(enabled)
                .build()
                .unwrap()
        });
        for i in 0..2_000 {
            cache.insert(i, i).await.unwrap();
        }
        let evictions = recorded.counter("headroom_cache_evictions_total{cache=m}");
        assert_eq!(evictions > 0, enabled, "evictions {evictions}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalidation_messages_gaps_and_state_are_reported() {
    use headroom_cache::InvalidationConfig;
    use headroom_core::bus::InvalidationBus;
    use headroom_core::memory::MemoryBus;

    let recorded = Recorded::default();
    let (store, bus) = (MemoryKvStore::new(), MemoryBus::new());
    let ns = Namespace::new("test:metrics-inval").unwrap();
    let build = |name: &str| -> Cache<String, String> {
        metrics::with_local_recorder(&recorded, || {
            Cache::builder()
                .name(name)
                .l2(store.clone(), ns.clone())
                .invalidation(bus.clone(), InvalidationConfig::default())
                .build()
                .unwrap()
        })
    };
    let (a, b) = (build("ia"), build("ib"));
    common::settle(|| a.l1_in_use() && b.l1_in_use()).await;
    assert_eq!(
        recorded.gauge("headroom_cache_invalidation_healthy{cache=ib}"),
        1.0
    );
    a.insert("k".into(), "v".into()).await.unwrap();
    common::settle(|| {
        recorded.counter("headroom_cache_invalidation_received_total{cache=ib}") >= 1
    })
    .await;
    assert!(recorded.counter("headroom_cache_invalidation_sent_total{cache=ia}") >= 1);

    let channel = ns.key("~invalidation").unwrap();
    bus.publish(&channel, Bytes::from_static(b"\x09garbage"))
        .await
        .unwrap();
    // Format 1, origin 5, sequence 9, sent at 0, a ping: an unknown origin past its first
    // message, so earlier ones were missed.
    bus.publish(&channel, Bytes::from_static(&[1, 5, 9, 0, 0]))
        .await
        .unwrap();
    common::settle(|| {
        recorded.counter("headroom_cache_invalidation_invalid_total{cache=ib}") >= 1
            && recorded.counter("headroom_cache_invalidation_gaps_total{cache=ib}") >= 1
            && recorded.counter("headroom_cache_invalidation_flushes_total{cache=ib,reason=gap}")
                >= 1
    })
    .await;
}

/// A bus that refuses every publish while `refusing` is set, as a Redis out of reach for
/// publishing.
#[derive(Clone, Debug, Default)]
struct Refusing {
    inner: headroom_core::memory::MemoryBus,
    refusing: Arc<std::sync::atomic::AtomicBool>,
}

impl headroom_core::bus::InvalidationBus for Refusing {
    async fn publish(
        &self,
        channel: &headroom_core::Key,
        message: Bytes,
    ) -> Result<(), headroom_core::BackendError> {
        if self.refusing.load(Ordering::SeqCst) {
            return Err(headroom_core::BackendError::new(
                headroom_core::BackendErrorKind::Connection,
            ));
        }
        self.inner.publish(channel, message).await
    }

    async fn subscribe(
        &self,
        channel: &headroom_core::Key,
    ) -> Result<headroom_core::bus::Subscription, headroom_core::BackendError> {
        self.inner.subscribe(channel).await
    }
}

/// A clear whose message the bus refused for a while goes out dated by its hide time, not by
/// when it is sent: coming back to its own instance late, it does not read as a subscription
/// that fell behind, so that instance counts no silence and flushes nothing for it.
#[tokio::test(start_paused = true)]
async fn a_clear_sent_late_counts_no_silence_on_its_instance() {
    use headroom_cache::InvalidationConfig;

    let recorded = Recorded::default();
    let store = MemoryKvStore::new();
    let bus = Refusing::default();
    let ns = Namespace::new("test:metrics-late-clear").unwrap();
    let mut config = InvalidationConfig::default();
    config.ping_interval = Duration::from_millis(50);
    config.max_silence = Duration::from_millis(200);
    let build = |name: &str, bus| -> Cache<String, String> {
        metrics::with_local_recorder(&recorded, || {
            Cache::builder()
                .name(name)
                .l2(store.clone(), ns.clone())
                .invalidation(bus, config.clone())
                .build()
                .unwrap()
        })
    };
    let a = build(
        "la",
        headroom_core::bus::DynInvalidationBus::new(bus.clone()),
    );
    let b = build(
        "lb",
        headroom_core::bus::DynInvalidationBus::new(bus.inner.clone()),
    );
    common::settle(|| a.l1_in_use() && b.l1_in_use()).await;
    bus.refusing.store(true, Ordering::SeqCst);
    a.clear().await;
    tokio::time::sleep(2 * config.max_silence).await;
    bus.refusing.store(false, Ordering::SeqCst);
    tokio::time::sleep(4 * config.ping_interval).await;
    assert_eq!(
        recorded.counter("headroom_cache_invalidation_flushes_total{cache=la,reason=silence}"),
        0
    );
}
