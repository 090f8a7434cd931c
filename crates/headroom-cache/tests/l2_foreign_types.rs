//! Keys under the cache's namespace that another program filled with a Redis type other than a
//! string (a hash here): reads take them for foreign data, writes replace them, and neither
//! counts as L2 failing. On real Redis, standalone and cluster.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use common::{Probe, settle};
use headroom_cache::{Cache, CacheError, envelope};
use headroom_core::kv::{KvEntry, KvStore, VersionAt};
use headroom_core::memory::MemoryKvStore;
use headroom_core::{BackendError, BackendErrorKind, Key, Namespace};
use headroom_redis::{Redis, RedisConfig, RedisKvStore};
use headroom_testkit::{shared_cluster, shared_server, unique_namespace};
use metrics::{Counter, Gauge, Histogram, KeyName, Metadata, Recorder, SharedString, Unit};
use parking_lot::Mutex;

/// Counters and gauges by `name{label=value,...}`.
#[derive(Clone, Debug, Default)]
struct Recorded(Arc<Mutex<HashMap<String, Arc<AtomicU64>>>>);

impl Recorded {
    fn cell(&self, key: &metrics::Key) -> Arc<AtomicU64> {
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

    fn register_counter(&self, key: &metrics::Key, _: &Metadata<'_>) -> Counter {
        Counter::from_arc(self.cell(key))
    }

    fn register_gauge(&self, key: &metrics::Key, _: &Metadata<'_>) -> Gauge {
        Gauge::from_arc(self.cell(key))
    }

    fn register_histogram(&self, _: &metrics::Key, _: &Metadata<'_>) -> Histogram {
        Histogram::noop()
    }
}

#[derive(Clone, Copy, Debug)]
enum Backend {
    Standalone,
    Cluster,
}

impl Backend {
    async fn store(self) -> RedisKvStore {
        let config = match self {
            Self::Standalone => RedisConfig::standalone(shared_server().url()),
            Self::Cluster => RedisConfig::cluster(shared_cluster().urls()),
        };
        RedisKvStore::new(Redis::connect(config).await.expect("connect"))
    }

    /// Another program writes a hash at `key`.
    fn write_hash(self, key: &Key) {
        let key = std::str::from_utf8(key.as_bytes()).expect("test keys are UTF-8");
        let args = ["HSET", key, "field", "value"];
        match self {
            Self::Standalone => shared_server().cli(&args),
            Self::Cluster => {
                let cluster = shared_cluster();
                cluster.nodes()[cluster.slot_owner(cluster.keyslot(key))].cli(&args)
            }
        };
    }
}

fn cache<S: KvStore>(recorded: &Recorded, store: S, ns: &Namespace) -> Cache<String, String> {
    metrics::with_local_recorder(recorded, || {
        Cache::builder()
            .name("foreign")
            .l2(store, ns.clone())
            .build()
            .expect("cache")
    })
}

/// Whether `key` holds a tombstone in L2.
async fn holds_tombstone(store: &RedisKvStore, key: &Key) -> bool {
    let bytes = store
        .get(key)
        .await
        .expect("a string in L2")
        .expect("present");
    envelope::decode(&bytes).expect("an envelope").tombstone
}

/// More reads of the hash than the breaker's failures in a row (5 by default): each is a miss
/// counted as corrupt, and L2 keeps serving other keys.
async fn a_key_of_another_type_is_a_corrupt_miss(backend: Backend) {
    let recorded = Recorded::default();
    let ns = unique_namespace("foreign-type");
    let store = backend.store().await;
    let cache = cache(&recorded, store, &ns);
    let present = "present".to_owned();
    cache.insert(present.clone(), "v".to_owned()).await.unwrap();
    // The first read also learns the clear; the reads of the hash then go one key at a time.
    cache.invalidate_local(&present);
    assert_eq!(cache.get(&present).await.unwrap().as_deref(), Some("v"));

    let k = "k".to_owned();
    backend.write_hash(&ns.key(&k).unwrap());
    for _ in 0..6 {
        assert_eq!(cache.get(&k).await.unwrap(), None);
    }

    cache.invalidate_local(&present);
    assert_eq!(
        cache.get(&present).await.unwrap().as_deref(),
        Some("v"),
        "a present key is still served from L2: the breaker stayed closed"
    );
    assert_eq!(
        recorded.counter("headroom_cache_hits_total{cache=foreign,level=l2}"),
        2
    );
    assert_eq!(
        recorded.counter("headroom_cache_l2_corrupt_total{cache=foreign}"),
        6
    );
    assert_eq!(
        recorded.counter("headroom_cache_l2_errors_total{cache=foreign,kind=error}"),
        0
    );
    assert_eq!(
        recorded.counter("headroom_cache_l2_skipped_total{cache=foreign}"),
        0
    );
    assert_eq!(
        recorded.gauge("headroom_cache_l2_breaker_open{cache=foreign}"),
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_of_another_type_is_a_corrupt_miss_on_redis() {
    a_key_of_another_type_is_a_corrupt_miss(Backend::Standalone).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_of_another_type_is_a_corrupt_miss_on_redis_cluster() {
    a_key_of_another_type_is_a_corrupt_miss(Backend::Cluster).await;
}

/// An insert and a load's write-back replace the hash; the next reads are L2 hits.
async fn writes_replace_a_key_of_another_type(backend: Backend) {
    let recorded = Recorded::default();
    let ns = unique_namespace("foreign-type");
    let store = backend.store().await;
    let cache = cache(&recorded, store.clone(), &ns);

    let k = "k".to_owned();
    backend.write_hash(&ns.key(&k).unwrap());
    cache.insert(k.clone(), "v".to_owned()).await.unwrap();
    assert_eq!(cache.pending_l2_deletes(), 0, "the insert reached L2");
    cache.invalidate_local(&k);
    assert_eq!(cache.get(&k).await.unwrap().as_deref(), Some("v"));

    let j = "j".to_owned();
    backend.write_hash(&ns.key(&j).unwrap());
    let loaded = cache
        .get_or_load(&j, |_| async {
            Ok::<_, CacheError>(Some("loaded".to_owned()))
        })
        .await
        .unwrap();
    assert_eq!(loaded.as_deref(), Some("loaded"));
    // The load answers before its write-back; its task ends with it.
    settle(|| cache.loads_in_flight() == 0).await;
    cache.invalidate_local(&j);
    assert_eq!(cache.get(&j).await.unwrap().as_deref(), Some("loaded"));

    assert_eq!(
        recorded.counter("headroom_cache_hits_total{cache=foreign,level=l2}"),
        2,
        "both reads were served from L2"
    );
    assert!(store.get(&ns.key(&k).unwrap()).await.unwrap().is_some());
    assert!(store.get(&ns.key(&j).unwrap()).await.unwrap().is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_replace_a_key_of_another_type_on_redis() {
    writes_replace_a_key_of_another_type(Backend::Standalone).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_replace_a_key_of_another_type_on_redis_cluster() {
    writes_replace_a_key_of_another_type(Backend::Cluster).await;
}

/// Removing the hash along with another key settles both at once: tombstones replace both,
/// and no delete is left pending.
async fn removing_a_key_of_another_type_settles_its_batch(backend: Backend) {
    let recorded = Recorded::default();
    let ns = unique_namespace("foreign-type");
    let store = backend.store().await;
    let cache = cache(&recorded, store.clone(), &ns);
    let (k, k2) = ("k".to_owned(), "k2".to_owned());
    cache.insert(k2.clone(), "v2".to_owned()).await.unwrap();
    backend.write_hash(&ns.key(&k).unwrap());

    cache.remove_many(&[k.clone(), k2.clone()]).await.unwrap();
    assert_eq!(cache.pending_l2_deletes(), 0, "the removal reached L2");
    assert!(holds_tombstone(&store, &ns.key(&k2).unwrap()).await);
    assert!(holds_tombstone(&store, &ns.key(&k).unwrap()).await);
    assert_eq!(cache.get(&k2).await.unwrap(), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_a_key_of_another_type_settles_its_batch_on_redis() {
    removing_a_key_of_another_type_settles_its_batch(Backend::Standalone).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_a_key_of_another_type_settles_its_batch_on_redis_cluster() {
    removing_a_key_of_another_type_settles_its_batch(Backend::Cluster).await;
}

/// A removal that missed L2 leaves its keys pending; another program then writes a hash at one
/// of them. Once L2 answers again, the drain's tombstones replace the hash and settle both keys.
async fn pending_deletes_drain_over_a_key_of_another_type(backend: Backend) {
    let recorded = Recorded::default();
    let ns = unique_namespace("foreign-type");
    let store = backend.store().await;
    let probe = Probe::new(store.clone());
    let cache = metrics::with_local_recorder(&recorded, || {
        Cache::builder()
            .name("foreign")
            .l2(probe.clone(), ns.clone())
            // The drain's failed retries while L2 is down must not open the breaker here:
            // this is about what happens once L2 answers.
            .l2_failure_threshold(1_000)
            .build()
            .expect("cache")
    });
    let (k, k2) = ("k".to_owned(), "k2".to_owned());
    cache.insert(k2.clone(), "v2".to_owned()).await.unwrap();

    probe.calls.fail.store(true, Ordering::SeqCst);
    cache.remove_many(&[k.clone(), k2.clone()]).await.unwrap();
    assert_eq!(cache.pending_l2_deletes(), 2);
    backend.write_hash(&ns.key(&k).unwrap());
    probe.calls.fail.store(false, Ordering::SeqCst);

    settle(|| cache.pending_l2_deletes() == 0).await;
    assert!(holds_tombstone(&store, &ns.key(&k).unwrap()).await);
    assert!(holds_tombstone(&store, &ns.key(&k2).unwrap()).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_deletes_drain_over_a_key_of_another_type_on_redis() {
    pending_deletes_drain_over_a_key_of_another_type(Backend::Standalone).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_deletes_drain_over_a_key_of_another_type_on_redis_cluster() {
    pending_deletes_drain_over_a_key_of_another_type(Backend::Cluster).await;
}

/// A memory store whose `get` of one key fails with `Corrupt`, as a store that checks what it
/// holds may.
#[derive(Clone, Debug)]
struct CorruptAt {
    inner: MemoryKvStore,
    key: Key,
}

impl KvStore for CorruptAt {
    async fn get(&self, key: &Key) -> Result<Option<Bytes>, BackendError> {
        if *key == self.key {
            return Err(BackendError::with_detail(
                BackendErrorKind::Corrupt,
                "not what the store wrote",
            ));
        }
        self.inner.get(key).await
    }
    async fn get_many(&self, keys: &[Key]) -> Result<Vec<Option<Bytes>>, BackendError> {
        self.inner.get_many(keys).await
    }
    async fn set(&self, key: &Key, value: Bytes, ttl: Duration) -> Result<(), BackendError> {
        self.inner.set(key, value, ttl).await
    }
    async fn set_many(&self, entries: &[KvEntry]) -> Result<(), BackendError> {
        self.inner.set_many(entries).await
    }
    async fn delete(&self, keys: &[Key]) -> Result<u64, BackendError> {
        self.inner.delete(keys).await
    }
    async fn set_if_newer(
        &self,
        entries: &[KvEntry],
        version: VersionAt,
    ) -> Result<u64, BackendError> {
        self.inner.set_if_newer(entries, version).await
    }
    async fn delete_if_eq(&self, key: &Key, expected: &[u8]) -> Result<bool, BackendError> {
        self.inner.delete_if_eq(key, expected).await
    }
}

/// A store's own `Corrupt` answer to a read is a miss counted as corrupt, never an L2 failure.
#[tokio::test]
async fn a_corrupt_answer_is_a_miss_not_an_l2_failure() {
    let recorded = Recorded::default();
    let ns = Namespace::new("test:foreign").unwrap();
    let store = CorruptAt {
        inner: MemoryKvStore::new(),
        key: ns.key("k").unwrap(),
    };
    let cache = cache(&recorded, store, &ns);
    let present = "present".to_owned();
    cache.insert(present.clone(), "v".to_owned()).await.unwrap();
    cache.invalidate_local(&present);
    assert_eq!(cache.get(&present).await.unwrap().as_deref(), Some("v"));

    for _ in 0..6 {
        assert_eq!(cache.get(&"k".to_owned()).await.unwrap(), None);
    }
    cache.invalidate_local(&present);
    assert_eq!(
        cache.get(&present).await.unwrap().as_deref(),
        Some("v"),
        "a present key is still served from L2: the breaker stayed closed"
    );
    assert_eq!(
        recorded.counter("headroom_cache_l2_corrupt_total{cache=foreign}"),
        6
    );
    assert_eq!(
        recorded.counter("headroom_cache_l2_errors_total{cache=foreign,kind=error}"),
        0
    );
}
