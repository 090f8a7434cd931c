//! Invalidation across instances: several caches in one process, each with its own bus
//! connection, over the memory bus, Redis and Redis Cluster.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use common::{Calls, Probe, settle};
use headroom_cache::{Cache, InvalidationConfig};
use headroom_core::bus::{BusEvent, DynInvalidationBus, InvalidationBus, Subscription};
use headroom_core::kv::{DynKvStore, KvEntry, KvStore, VersionAt};
use headroom_core::memory::{MemoryBus, MemoryKvStore};
use headroom_core::{BackendError, BackendErrorKind, Clock, Key, ManualClock, Namespace};
use headroom_redis::{Redis, RedisBus, RedisConfig, RedisKvStore};
use headroom_testkit::{FaultProxy, RedisServer, shared_cluster, shared_server, unique_namespace};
// Tokio's clock: real time, or the paused clock of the tests that must not depend on how
// promptly a loaded machine schedules them.
use tokio::time::Instant;

/// One instance's connections: its L2 store and its bus.
type Parts = (DynKvStore, DynInvalidationBus);

/// The staleness bound of every test below.
fn config() -> InvalidationConfig {
    let mut config = InvalidationConfig::default();
    config.ping_interval = Duration::from_millis(50);
    config.max_silence = Duration::from_millis(200);
    config
}

fn cache(parts: Parts, ns: &Namespace) -> Cache<String, u64> {
    cache_on(parts, ns, Clock::system())
}

fn cache_on(parts: Parts, ns: &Namespace, clock: Clock) -> Cache<String, u64> {
    cache_with(parts, ns, clock, config())
}

fn cache_with(
    parts: Parts,
    ns: &Namespace,
    clock: Clock,
    config: InvalidationConfig,
) -> Cache<String, u64> {
    Cache::builder()
        .clock(clock)
        .ttl(Duration::from_secs(60))
        .l2_cooldown(Duration::from_millis(100))
        .l2(parts.0, ns.clone())
        .invalidation(parts.1, config)
        .build()
        .expect("build")
}

fn memory_parts(n: usize) -> Vec<Parts> {
    let (store, bus) = (MemoryKvStore::new(), MemoryBus::new());
    (0..n)
        .map(|_| {
            (
                DynKvStore::new(store.clone()),
                DynInvalidationBus::new(bus.clone()),
            )
        })
        .collect()
}

async fn redis_parts(config: RedisConfig) -> Parts {
    let redis = Redis::connect(config).await.expect("connect");
    let bus = RedisBus::connect(redis.clone()).await.expect("bus");
    (
        DynKvStore::new(RedisKvStore::new(redis)),
        DynInvalidationBus::new(bus),
    )
}

async fn standalone_parts(n: usize) -> Vec<Parts> {
    let mut parts = Vec::new();
    for _ in 0..n {
        parts.push(redis_parts(RedisConfig::standalone(shared_server().url())).await);
    }
    parts
}

async fn cluster_parts(n: usize) -> Vec<Parts> {
    let mut parts = Vec::new();
    for _ in 0..n {
        parts.push(redis_parts(RedisConfig::cluster(shared_cluster().urls())).await);
    }
    parts
}

/// Waits until every cache's subscription is live.
async fn live(caches: &[Cache<String, u64>]) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !caches.iter().all(Cache::l1_in_use) {
        let states: Vec<bool> = caches.iter().map(Cache::l1_in_use).collect();
        assert!(Instant::now() < deadline, "not live: {states:?}");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Wraps an instance's store to count its L2 calls.
fn probed(parts: Parts) -> (Parts, Arc<Calls>) {
    let probe = Probe::new(parts.0);
    let calls = Arc::clone(&probe.calls);
    ((DynKvStore::new(probe), parts.1), calls)
}

/// Reads `key` until it is served from L1 with `expected` (a read that makes no L2 call).
async fn settle_in_l1(cache: &Cache<String, u64>, calls: &Calls, key: &str, expected: u64) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let before = calls.reads();
        let served = cache.get(&key.to_owned()).await.unwrap();
        if served == Some(expected) && calls.reads() == before {
            return;
        }
        assert!(Instant::now() < deadline, "{key} never served from L1");
        tokio::time::sleep(Duration::from_micros(100)).await;
    }
}

/// Returns once `reader` has heard every message `writer` sent before the call, so that no
/// message of an earlier write reaches it later. The reader holds a marker in L1 that only a
/// message drops, and one origin's messages arrive in order. Twice: the first message an
/// instance hears from another may show a gap (a ping sent before it subscribed), and the
/// flush that follows drops the marker before the messages ahead of the marker's arrive.
async fn heard_everything_from(
    writer: &Cache<String, u64>,
    reader: &Cache<String, u64>,
    reader_calls: &Calls,
) {
    for _ in 0..2 {
        reader.insert("heard".into(), 0).await.unwrap();
        settle_in_l1(reader, reader_calls, "heard", 0).await;
        writer.insert("heard".into(), 1).await.unwrap();
        settle_value(reader, "heard", Some(1)).await;
    }
}

/// Reads `key` once on `cache` and asserts that it is served `expected` from L1: L1 was not
/// flushed.
async fn still_in_l1(cache: &Cache<String, u64>, calls: &Calls, key: &str, expected: u64) {
    let before = calls.reads();
    assert_eq!(cache.get(&key.to_owned()).await.unwrap(), Some(expected));
    assert_eq!(
        calls.reads(),
        before,
        "{key} read from L2: L1 was flushed rather than the one key dropped"
    );
}

/// An update on A stops being served by B's L1 because its own message drops the key, not
/// because B flushed its whole L1 (on a gap after a message lost or garbled, at A's next ping;
/// or on silence): B serves the new value well within `ping_interval`, and an unrelated key
/// B holds stays in its L1. Returns the lag.
async fn update_reaches_other_l1(
    parts: Vec<Parts>,
    ns: Namespace,
    config: InvalidationConfig,
) -> Duration {
    let mut parts = parts.into_iter();
    let a = cache_with(parts.next().unwrap(), &ns, Clock::system(), config.clone());
    let (b_parts, b_calls) = probed(parts.next().unwrap());
    let b = cache_with(b_parts, &ns, Clock::system(), config.clone());
    live(&[a.clone(), b.clone()]).await;
    a.insert("k".into(), 1).await.unwrap();
    a.insert("other".into(), 7).await.unwrap();
    heard_everything_from(&a, &b, &b_calls).await;
    // From here on B serves its L1 copies: only a message can make it read L2 again.
    settle_in_l1(&b, &b_calls, "k", 1).await;
    settle_in_l1(&b, &b_calls, "other", 7).await;
    let within = config.ping_interval / 5;
    let started = Instant::now();
    a.insert("k".into(), 2).await.unwrap();
    while b.get(&"k".to_owned()).await.unwrap() != Some(2) {
        assert!(
            started.elapsed() < within,
            "B served the old value for {within:?}, a fifth of ping_interval"
        );
        tokio::time::sleep(Duration::from_micros(100)).await;
    }
    let lag = started.elapsed();
    still_in_l1(&b, &b_calls, "other", 7).await;
    lag
}

/// Reads `key` on `cache` until it answers `expected` (bounded by [`settle`]'s 5 s).
async fn settle_value(cache: &Cache<String, u64>, key: &str, expected: Option<u64>) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if cache.get(&key.to_owned()).await.unwrap() == expected {
            return;
        }
        assert!(Instant::now() < deadline, "{key} never became {expected:?}");
        tokio::time::sleep(Duration::from_micros(100)).await;
    }
}

/// Pings and silence far apart, so that on real Redis a flush they could cause comes long
/// after the message it is told from.
fn slow_pings() -> InvalidationConfig {
    let mut config = InvalidationConfig::default();
    config.ping_interval = Duration::from_secs(5);
    config.max_silence = Duration::from_secs(20);
    config
}

/// On tokio's paused clock: the message takes no time, the next ping (which would show a
/// gap) comes `ping_interval` later.
#[tokio::test(start_paused = true)]
async fn update_reaches_other_instance_on_memory_bus() {
    let lag = update_reaches_other_l1(memory_parts(2), unique_namespace("inval"), config()).await;
    println!("memory bus propagation: {lag:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn update_reaches_other_instance_on_redis() {
    let parts = standalone_parts(2).await;
    let lag = update_reaches_other_l1(parts, unique_namespace("inval"), slow_pings()).await;
    println!("redis propagation: {lag:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn update_reaches_other_instance_on_redis_cluster() {
    let parts = cluster_parts(2).await;
    let lag = update_reaches_other_l1(parts, unique_namespace("inval"), slow_pings()).await;
    println!("redis cluster propagation: {lag:?}");
}

/// `remove_many` on one instance removes the keys from every instance (L1 and L2) by its own
/// message, which drops those keys only: an unrelated key stays in every L1. `clear` hides
/// every entry from every instance although the L2 copies stay until their TTL, and entries
/// written after it are served again. The instances share a manual clock, so "after" is a step
/// of that clock (and no ping or silence, which run on it, can flush an L1 meanwhile: a lost
/// message would leave the keys served).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remove_many_and_clear_reach_every_instance_and_l2() {
    let ns = unique_namespace("clear");
    let clock = ManualClock::new();
    let (parts, calls): (Vec<_>, Vec<_>) = memory_parts(3).into_iter().map(probed).unzip();
    let caches: Vec<_> = parts
        .into_iter()
        .map(|parts| cache_on(parts, &ns, clock.clock()))
        .collect();
    live(&caches).await;
    for key in ["a", "b", "c"] {
        caches[0].insert(key.into(), 1).await.unwrap();
    }
    for (cache, calls) in caches.iter().zip(&calls).skip(1) {
        heard_everything_from(&caches[0], cache, calls).await;
    }
    for (cache, calls) in caches.iter().zip(&calls) {
        for key in ["a", "b", "c"] {
            settle_in_l1(cache, calls, key, 1).await;
        }
    }
    caches[1]
        .remove_many(&["a".to_owned(), "b".to_owned()])
        .await
        .unwrap();
    for (cache, calls) in caches.iter().zip(&calls) {
        settle_value(cache, "a", None).await;
        settle_value(cache, "b", None).await;
        still_in_l1(cache, calls, "c", 1).await;
    }
    // `clear` hides "c" everywhere although its L2 copy stays until its TTL.
    caches[2].clear().await;
    for cache in &caches {
        settle_value(cache, "c", None).await;
    }
    // Values written after the clear are served again.
    clock.advance(Duration::from_millis(1));
    caches[0].insert("c".into(), 2).await.unwrap();
    for cache in &caches {
        settle_value(cache, "c", Some(2)).await;
    }
}

/// `invalidate_tag` removes the entries carrying the tag from every instance's L1 and hides
/// their L2 copies (still in L2 until their TTL) from every instance; other entries stay.
/// A tagged write is announced like any other, by its key alone: it drops that key from the
/// other instances' L1 and nothing else (only the tag's invalidation flushes L1).
/// The instances share a manual clock, so "after the invalidation" is a step of that clock
/// (and no ping or silence, which run on it, can flush an L1 meanwhile).
async fn tags_reach_every_instance_and_l2(parts: Vec<Parts>, ns: Namespace) {
    let clock = ManualClock::new();
    let (parts, calls): (Vec<_>, Vec<_>) = parts.into_iter().map(probed).unzip();
    let caches: Vec<_> = parts
        .into_iter()
        .map(|parts| cache_on(parts, &ns, clock.clock()))
        .collect();
    live(&caches).await;
    caches[0]
        .insert_tagged("a".into(), 1, &["team:1"])
        .await
        .unwrap();
    caches[0]
        .insert_tagged("b".into(), 2, &["team:1", "x"])
        .await
        .unwrap();
    caches[0]
        .insert_tagged("c".into(), 3, &["team:2"])
        .await
        .unwrap();
    for cache in &caches {
        settle_value(cache, "a", Some(1)).await;
        settle_value(cache, "b", Some(2)).await;
        settle_value(cache, "c", Some(3)).await;
    }
    caches[1].invalidate_tag("team:1").await;
    for cache in &caches {
        settle_value(cache, "a", None).await;
        settle_value(cache, "b", None).await;
        assert_eq!(cache.get(&"c".to_owned()).await.unwrap(), Some(3));
    }
    // Written after the invalidation: served again.
    clock.advance(Duration::from_millis(1));
    caches[2]
        .insert_tagged("a".into(), 4, &["team:1"])
        .await
        .unwrap();
    for (i, (cache, calls)) in caches.iter().zip(&calls).enumerate() {
        for writer in (0..caches.len()).filter(|&writer| writer != i) {
            heard_everything_from(&caches[writer], cache, calls).await;
        }
        settle_in_l1(cache, calls, "a", 4).await;
        settle_in_l1(cache, calls, "c", 3).await;
    }
    // A tagged update: its message drops "a" from every L1, "c" stays.
    caches[0]
        .insert_tagged("a".into(), 5, &["team:1"])
        .await
        .unwrap();
    for (cache, calls) in caches.iter().zip(&calls) {
        settle_value(cache, "a", Some(5)).await;
        still_in_l1(cache, calls, "c", 3).await;
    }
    let too_many = vec!["t"; headroom_cache::envelope::MAX_TAGS + 1];
    for bad in [&[""][..], &[&*"x".repeat(256)][..], &too_many[..]] {
        let error = caches[0]
            .insert_tagged("d".into(), 5, bad)
            .await
            .unwrap_err();
        assert_eq!(error.kind(), headroom_cache::CacheErrorKind::InvalidTag);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tags_on_memory_bus() {
    tags_reach_every_instance_and_l2(memory_parts(3), unique_namespace("tags")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tags_on_redis() {
    tags_reach_every_instance_and_l2(standalone_parts(3).await, unique_namespace("tags")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tags_on_redis_cluster() {
    tags_reach_every_instance_and_l2(cluster_parts(3).await, unique_namespace("tags")).await;
}

/// `invalidate_tag` and `clear` are kept in L2: an instance started after them never serves
/// the L2 copies they hid, and serves entries written after them. The instances share a
/// manual clock, so "after" is a step of that clock, taken once a witness holding the entries
/// in L1 has dropped them (a message is stamped when it is sent).
async fn hides_reach_instances_started_later(parts: Vec<Parts>, ns: Namespace) {
    let clock = ManualClock::new();
    let mut parts = parts.into_iter();
    let a = cache_on(parts.next().unwrap(), &ns, clock.clock());
    let (witness_parts, witness_calls) = probed(parts.next().unwrap());
    let witness = cache_on(witness_parts, &ns, clock.clock());
    live(&[a.clone(), witness.clone()]).await;
    a.insert_tagged("one".into(), 1, &["team:1"]).await.unwrap();
    a.insert_tagged("two".into(), 2, &["team:2"]).await.unwrap();
    a.insert("plain".into(), 3).await.unwrap();
    for (key, value) in [("one", 1), ("two", 2), ("plain", 3)] {
        settle_in_l1(&witness, &witness_calls, key, value).await;
    }

    a.invalidate_tag("team:1").await;
    settle_value(&witness, "one", None).await;
    clock.advance(Duration::from_millis(1));
    let b = cache_on(parts.next().unwrap(), &ns, clock.clock());
    live(std::slice::from_ref(&b)).await;
    assert_eq!(b.get(&"one".to_owned()).await.unwrap(), None);
    assert_eq!(b.get(&"two".to_owned()).await.unwrap(), Some(2));
    assert_eq!(b.get(&"plain".to_owned()).await.unwrap(), Some(3));

    a.clear().await;
    settle_value(&witness, "plain", None).await;
    clock.advance(Duration::from_millis(1));
    let c = cache_on(parts.next().unwrap(), &ns, clock.clock());
    live(std::slice::from_ref(&c)).await;
    for key in ["one", "two", "plain"] {
        assert_eq!(c.get(&key.to_owned()).await.unwrap(), None, "{key}");
    }
    a.insert_tagged("one".into(), 4, &["team:1"]).await.unwrap();
    assert_eq!(c.get(&"one".to_owned()).await.unwrap(), Some(4));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hides_reach_instances_started_later_on_memory_bus() {
    hides_reach_instances_started_later(memory_parts(4), unique_namespace("later")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hides_reach_instances_started_later_on_redis() {
    hides_reach_instances_started_later(standalone_parts(4).await, unique_namespace("later")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hides_reach_instances_started_later_on_redis_cluster() {
    hides_reach_instances_started_later(cluster_parts(4).await, unique_namespace("later")).await;
}

/// An instance with no bus: it learns hides only from L2.
fn busless(store: DynKvStore, ns: &Namespace) -> Cache<String, u64> {
    Cache::builder()
        .ttl(Duration::from_secs(60))
        .l2(store, ns.clone())
        .build()
        .expect("build")
}

/// Learning from L2 a hide this instance never read before flushes nothing: no entry it
/// covers was let into L1 without a read of it. (No bus, so that no gap flushes L1 either.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn learning_a_hide_for_the_first_time_keeps_l1() {
    let ns = unique_namespace("first-hide");
    let store = MemoryKvStore::new();
    let build = |store: DynKvStore| busless(store, &ns);
    let a = build(DynKvStore::new(store.clone()));
    a.insert_tagged("x".into(), 1, &["t"]).await.unwrap();
    a.invalidate_tag("t").await;
    a.insert("plain".into(), 2).await.unwrap();
    let probe = Probe::new(DynKvStore::new(store));
    let calls = Arc::clone(&probe.calls);
    let c = build(DynKvStore::new(probe));
    settle_in_l1(&c, &calls, "plain", 2).await;
    assert_eq!(c.get(&"x".to_owned()).await.unwrap(), None);
    let before = calls.reads();
    assert_eq!(c.get(&"plain".to_owned()).await.unwrap(), Some(2));
    assert_eq!(calls.reads(), before, "plain is still served from L1");
}

/// An entry whose hides cannot be read (L2 stopped answering between the entry's read and
/// theirs) reads as a miss rather than being served unchecked; once L2 answers, it is a hit.
#[tokio::test]
async fn an_entry_whose_hides_cannot_be_read_is_a_miss() {
    let ns = unique_namespace("unread-hide");
    let store = MemoryKvStore::new();
    let build = |store: DynKvStore| busless(store, &ns);
    let a = build(DynKvStore::new(store.clone()));
    a.insert_tagged("x".into(), 1, &["t"]).await.unwrap();
    let hides = HidesUnread {
        inner: store,
        on: Arc::new(AtomicBool::new(true)),
        refused: Arc::default(),
    };
    let c = build(DynKvStore::new(hides.clone()));
    assert_eq!(c.get(&"x".to_owned()).await.unwrap(), None);
    assert_eq!(
        hides.refused.load(Ordering::SeqCst),
        1,
        "the tag's read failed"
    );
    hides.on.store(false, Ordering::SeqCst);
    assert_eq!(c.get(&"x".to_owned()).await.unwrap(), Some(1));
}

/// A store that, while `on`, fails the reads that ask for hides only (keys under
/// `<namespace>.hidden`), as an L2 that stopped answering just after an entry's read would.
#[derive(Clone, Debug)]
struct HidesUnread {
    inner: MemoryKvStore,
    on: Arc<AtomicBool>,
    refused: Arc<AtomicUsize>,
}

impl HidesUnread {
    fn refuse(&self, keys: &[Key]) -> Result<(), BackendError> {
        let hides_only = keys.iter().all(|key| {
            let bytes = key.as_bytes();
            bytes.windows(8).any(|w| w == b".hidden:")
        });
        if hides_only && self.on.load(Ordering::SeqCst) {
            self.refused.fetch_add(1, Ordering::SeqCst);
            return Err(BackendError::new(BackendErrorKind::Connection));
        }
        Ok(())
    }
}

impl KvStore for HidesUnread {
    async fn get(&self, key: &Key) -> Result<Option<Bytes>, BackendError> {
        self.refuse(std::slice::from_ref(key))?;
        self.inner.get(key).await
    }
    async fn get_many(&self, keys: &[Key]) -> Result<Vec<Option<Bytes>>, BackendError> {
        self.refuse(keys)?;
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

/// A bus in front of another that can drop published messages or silence subscriptions, as
/// a network would, without telling anyone.
#[derive(Clone, Debug)]
struct Faulty {
    inner: MemoryBus,
    drop_next_publish: Arc<AtomicBool>,
    /// Drops every published message.
    muted: Arc<AtomicBool>,
    /// Refuses every publish with a connection error.
    failing: Arc<AtomicBool>,
    /// Refuses this many publishes from now on, as `failing` does.
    refuse_next: Arc<AtomicUsize>,
    /// How many publishes were refused.
    refused: Arc<AtomicUsize>,
    silenced: Arc<AtomicBool>,
    /// The length of the largest message published.
    largest: Arc<AtomicUsize>,
    /// How many published messages were dropped.
    dropped: Arc<AtomicUsize>,
    /// Each send makes the subscriptions report a loss, then live again at once.
    losses: tokio::sync::broadcast::Sender<()>,
}

impl Faulty {
    fn new(inner: MemoryBus) -> Self {
        Self {
            inner,
            drop_next_publish: Arc::default(),
            muted: Arc::default(),
            failing: Arc::default(),
            refuse_next: Arc::default(),
            refused: Arc::default(),
            silenced: Arc::default(),
            largest: Arc::default(),
            dropped: Arc::default(),
            losses: tokio::sync::broadcast::channel(4).0,
        }
    }

    /// The subscriptions report a loss and are live again at once, as a subscriber that fell
    /// behind.
    fn lose(&self) {
        self.losses.send(()).expect("a subscription");
    }
}

impl InvalidationBus for Faulty {
    async fn publish(&self, channel: &Key, message: Bytes) -> Result<(), BackendError> {
        let refuse = self.failing.load(Ordering::SeqCst)
            || self
                .refuse_next
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok();
        if refuse {
            self.refused.fetch_add(1, Ordering::SeqCst);
            return Err(BackendError::with_detail(
                BackendErrorKind::Connection,
                "the bus is out of reach",
            ));
        }
        if self.drop_next_publish.swap(false, Ordering::SeqCst) || self.muted.load(Ordering::SeqCst)
        {
            self.dropped.fetch_add(1, Ordering::SeqCst);
            return Ok(());
        }
        self.largest.fetch_max(message.len(), Ordering::SeqCst);
        self.inner.publish(channel, message).await
    }

    async fn subscribe(&self, channel: &Key) -> Result<Subscription, BackendError> {
        let silenced = Arc::clone(&self.silenced);
        let events = self.inner.subscribe(channel).await?;
        let events = futures_util::StreamExt::filter(events, move |event| {
            let pass = !(matches!(event, BusEvent::Message(_)) && silenced.load(Ordering::SeqCst));
            std::future::ready(pass)
        });
        let losses = futures_util::stream::unfold(self.losses.subscribe(), |mut losses| async {
            losses.recv().await.ok()?;
            let events = [
                BusEvent::Lost(headroom_core::bus::LossReason::Lagged(0)),
                BusEvent::Live,
            ];
            Some((futures_util::stream::iter(events), losses))
        });
        let losses = futures_util::StreamExt::flatten(losses);
        Ok(Subscription::new(futures_util::stream::select(
            events, losses,
        )))
    }
}

/// A writes through a [`Faulty`] bus; B, on the plain bus and with its L2 calls counted, holds
/// `k` = 1 in its L1.
async fn faulty_writer_and_reader(
    ns: &Namespace,
) -> (Cache<String, u64>, Cache<String, u64>, Arc<Calls>, Faulty) {
    let bus = MemoryBus::new();
    let faulty = Faulty::new(bus.clone());
    let (a, b, b_calls) = writer_and_reader(
        DynInvalidationBus::new(faulty.clone()),
        DynInvalidationBus::new(bus),
        ns,
    )
    .await;
    (a, b, b_calls, faulty)
}

/// A writes through `a_bus`; B, through `b_bus` and with its L2 calls counted, holds `k` = 1
/// in its L1. They share one L2.
async fn writer_and_reader(
    a_bus: DynInvalidationBus,
    b_bus: DynInvalidationBus,
    ns: &Namespace,
) -> (Cache<String, u64>, Cache<String, u64>, Arc<Calls>) {
    let store = MemoryKvStore::new();
    let a = cache((DynKvStore::new(store.clone()), a_bus), ns);
    let (b_parts, b_calls) = probed((DynKvStore::new(store), b_bus));
    let b = cache(b_parts, ns);
    live(&[a.clone(), b.clone()]).await;
    a.insert("k".into(), 1).await.unwrap();
    settle_in_l1(&b, &b_calls, "k", 1).await;
    (a, b, b_calls)
}

/// A message lost on its way (the bus said nothing) shows as a gap in A's sequence numbers at
/// A's next message, and B flushes its L1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sequence_gap_flushes_l1() {
    let ns = unique_namespace("gap");
    let (a, b, _, faulty) = faulty_writer_and_reader(&ns).await;
    faulty.drop_next_publish.store(true, Ordering::SeqCst);
    a.insert("k".into(), 2).await.unwrap();
    settle(|| !faulty.drop_next_publish.load(Ordering::SeqCst)).await;
    // A's next ping (at most 50 ms later) reveals the gap.
    settle_value(&b, "k", Some(2)).await;
}

/// A subscriber back from a loss still sees a message lost after it: L1 stays bypassed until
/// each writer it knew is heard again (its next message may skip numbers sent during the loss,
/// which the flush covers), so a gap in a writer's numbers after that still flushes.
#[tokio::test(start_paused = true)]
async fn a_message_lost_after_a_subscriber_recovered_still_flushes() {
    let ns = unique_namespace("gap-after-loss");
    let bus = MemoryBus::new();
    let (a_bus, b_bus) = (Faulty::new(bus.clone()), Faulty::new(bus));
    let (a, b, b_calls) = writer_and_reader(
        DynInvalidationBus::new(a_bus.clone()),
        DynInvalidationBus::new(b_bus.clone()),
        &ns,
    )
    .await;

    // The loss flushed B's L1 (a read goes to L2); then B holds `k` in L1 again.
    b_bus.lose();
    let deadline = Instant::now() + Duration::from_secs(5);
    let before = b_calls.reads();
    while b_calls.reads() == before {
        assert!(Instant::now() < deadline, "the loss never flushed B's L1");
        assert_eq!(b.get(&"k".to_owned()).await.unwrap(), Some(1));
        tokio::time::sleep(Duration::from_micros(100)).await;
    }
    settle_in_l1(&b, &b_calls, "k", 1).await;
    a_bus.drop_next_publish.store(true, Ordering::SeqCst);
    let written = Instant::now();
    a.insert("k".into(), 2).await.unwrap();
    settle(|| !a_bus.drop_next_publish.load(Ordering::SeqCst)).await;
    settle_value(&b, "k", Some(2)).await;
    let stale_for = written.elapsed();
    assert!(
        stale_for <= 2 * config().ping_interval,
        "B served the old value for {stale_for:?}"
    );
}

/// A's `clear` and `invalidate_tag` messages are lost on their way (the bus said nothing, and
/// A's pings are lost too, so the message cannot slip through): B notices A's silence and
/// learns the hides from L2, so it stops serving the hidden L2 copies within the bound, not
/// only its L1 copies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_clear_or_tag_still_hides_l2_entries_within_the_bound() {
    let bound = config().max_silence + Duration::from_millis(100);
    for clear in [false, true] {
        let ns = unique_namespace("lost-hide");
        let (a, b, _, faulty) = faulty_writer_and_reader(&ns).await;
        a.insert_tagged("tagged".into(), 2, &["team:1"])
            .await
            .unwrap();
        settle_value(&b, "tagged", Some(2)).await;
        faulty.muted.store(true, Ordering::SeqCst);
        let hidden = Instant::now();
        if clear {
            a.clear().await;
            settle_value(&b, "k", None).await;
        } else {
            a.invalidate_tag("team:1").await;
            assert_eq!(b.get(&"k".to_owned()).await.unwrap(), Some(1));
        }
        settle_value(&b, "tagged", None).await;
        assert!(
            hidden.elapsed() < bound,
            "served for {:?}",
            hidden.elapsed()
        );
    }
}

/// A clear or tag invalidation the bus refused for a while hides, when it arrives, what was
/// written before the call, not what other instances wrote while it waited to be sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_clear_or_tag_hides_only_what_was_written_before_the_call() {
    for clear in [false, true] {
        let ns = unique_namespace("late-hide");
        let (a, b, _, faulty) = faulty_writer_and_reader(&ns).await;
        a.insert_tagged("old".into(), 1, &["team:1"]).await.unwrap();
        settle_value(&b, "old", Some(1)).await;
        faulty.failing.store(true, Ordering::SeqCst);
        if clear {
            a.clear().await;
        } else {
            a.invalidate_tag("team:1").await;
        }
        // Well within B's patience for A's silence, and in a later millisecond.
        tokio::time::sleep(Duration::from_millis(20)).await;
        b.insert_tagged("fresh".into(), 5, &["team:1"])
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
        faulty.failing.store(false, Ordering::SeqCst);
        settle_value(&b, "old", None).await;
        assert_eq!(
            b.get(&"fresh".to_owned()).await.unwrap(),
            Some(5),
            "B's later write was hidden (clear: {clear})"
        );
    }
}

/// A write whose L2 copy is outdated is announced even while a clear waits to be sent: the
/// clear, dated by its call, does not hide the copy another instance wrote after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outdated_write_queued_behind_a_clear_is_still_announced() {
    let ns = unique_namespace("outdated-behind-clear");
    let (store, bus) = (MemoryKvStore::new(), MemoryBus::new());
    let faulty = Faulty::new(bus.clone());
    let ((a_store, a_bus), a_calls) = probed((
        DynKvStore::new(store.clone()),
        DynInvalidationBus::new(faulty.clone()),
    ));
    let a = cache((a_store, a_bus), &ns);
    let b = cache((DynKvStore::new(store), DynInvalidationBus::new(bus)), &ns);
    live(&[a.clone(), b.clone()]).await;
    faulty.failing.store(true, Ordering::SeqCst);
    a.clear().await;
    tokio::time::sleep(Duration::from_millis(5)).await;
    b.insert("k".into(), 2).await.unwrap();
    a_calls.fail.store(true, Ordering::SeqCst);
    a.insert("k".into(), 3).await.unwrap();
    faulty.failing.store(false, Ordering::SeqCst);
    // A's clear arrives (B's L1 is flushed), then the key: B stops reading 2 from L2.
    settle(|| faulty.refused.load(Ordering::SeqCst) > 0).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let served = b.get(&"k".to_owned()).await.unwrap();
        if served != Some(2) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "B still serves the outdated copy"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Outdated keys heard from other instances do not count against an instance's own backlog
/// of pending deletes: a fleet whose L2 writes all failed for a while (a master failover)
/// does not stop reading L2 for an entry lifetime because together they wrote more keys than
/// one instance tracks. (Their writers delete those copies and announce it.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_instances_outdated_keys_do_not_make_l2_distrusted() {
    let ns = unique_namespace("fleet-backlog");
    let with_backlog_of_four = |parts: Parts| {
        Cache::builder()
            .ttl(Duration::from_secs(60))
            .l2_cooldown(Duration::from_millis(100))
            .l2_max_pending_deletes(4)
            .l2(parts.0, ns.clone())
            .invalidation(parts.1, config())
            .build()
            .expect("build")
    };
    let mut parts = memory_parts(2).into_iter();
    let (a_parts, a_calls) = probed(parts.next().unwrap());
    let (b_parts, b_calls) = probed(parts.next().unwrap());
    let (a, b): (Cache<String, u64>, Cache<String, u64>) =
        (with_backlog_of_four(a_parts), with_backlog_of_four(b_parts));
    live(&[a.clone(), b.clone()]).await;
    a.insert("untouched".into(), 7).await.unwrap();

    for calls in [&a_calls, &b_calls] {
        calls.fail.store(true, Ordering::SeqCst);
    }
    for i in 0..3 {
        b.insert(format!("b{i}"), i).await.unwrap();
        a.insert(format!("a{i}"), i).await.unwrap();
    }
    settle(|| b.pending_l2_deletes() >= 4).await;
    for calls in [&a_calls, &b_calls] {
        calls.fail.store(false, Ordering::SeqCst);
    }
    settle(|| a.pending_l2_deletes() == 0 && b.pending_l2_deletes() == 0).await;
    b.invalidate_local(&"untouched".to_owned());
    assert_eq!(
        b.get(&"untouched".to_owned()).await.unwrap(),
        Some(7),
        "B stopped reading L2"
    );
}

/// A clear that L2 did not take (it failed for the invalidating instance) is written once L2
/// answers again and then published again: an instance that lost the message, and so read
/// L2 again after the gap but found no clear there, stops serving the old entry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hide_that_missed_l2_reaches_instances_that_read_it_absent() {
    let ns = unique_namespace("unkept");
    let (store, bus) = (MemoryKvStore::new(), MemoryBus::new());
    let faulty = Faulty::new(bus.clone());
    let (a_parts, a_calls) = probed((
        DynKvStore::new(store.clone()),
        DynInvalidationBus::new(faulty.clone()),
    ));
    let a = cache(a_parts, &ns);
    let (b_parts, b_calls) = probed((DynKvStore::new(store), DynInvalidationBus::new(bus)));
    let b = cache(b_parts, &ns);
    live(&[a.clone(), b.clone()]).await;
    a.insert("k".into(), 1).await.unwrap();
    settle_in_l1(&b, &b_calls, "k", 1).await;

    a_calls.fail.store(true, Ordering::SeqCst);
    faulty.muted.store(true, Ordering::SeqCst);
    let dropped = faulty.dropped.load(Ordering::SeqCst);
    a.clear().await;
    // The clear goes out first, before A's next ping: two messages dropped include it.
    settle(|| faulty.dropped.load(Ordering::SeqCst) >= dropped + 2).await;
    faulty.muted.store(false, Ordering::SeqCst);
    // A's next message shows B the gap: B flushes and reads L2 again, clear included.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let before = b_calls.reads();
        assert_eq!(
            b.get(&"k".to_owned()).await.unwrap(),
            Some(1),
            "no clear in L2 yet"
        );
        if b_calls.reads() > before {
            break;
        }
        assert!(Instant::now() < deadline, "B never noticed the gap");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    a_calls.fail.store(false, Ordering::SeqCst);
    settle_value(&b, "k", None).await;
}

/// B's subscription goes silent (no loss reported): after `max_silence` B stops using L1, so
/// it never serves a value invalidated longer ago than that; once messages flow, L1 is back.
#[tokio::test(start_paused = true)]
async fn a_silent_subscription_bypasses_l1_until_heard_again() {
    let ns = unique_namespace("silence");
    let (store, bus) = (MemoryKvStore::new(), MemoryBus::new());
    let faulty = Faulty::new(bus.clone());
    let a = cache(
        (DynKvStore::new(store.clone()), DynInvalidationBus::new(bus)),
        &ns,
    );
    let b = cache(
        (
            DynKvStore::new(store),
            DynInvalidationBus::new(faulty.clone()),
        ),
        &ns,
    );
    live(&[a.clone(), b.clone()]).await;
    a.insert("k".into(), 1).await.unwrap();
    settle_value(&b, "k", Some(1)).await;
    faulty.silenced.store(true, Ordering::SeqCst);
    let written = Instant::now();
    a.insert("k".into(), 2).await.unwrap();
    settle_value(&b, "k", Some(2)).await;
    let stale_for = written.elapsed();
    let bound = config().max_silence + Duration::from_millis(100);
    assert!(
        stale_for < bound,
        "B served the old value for {stale_for:?}"
    );
    // A's silence may have flushed B's L1 first; B's own silence follows within the bound.
    settle(|| !b.l1_in_use()).await;
    assert!(
        written.elapsed() < bound,
        "B used L1 for {:?}",
        written.elapsed()
    );
    faulty.silenced.store(false, Ordering::SeqCst);
    settle(|| b.l1_in_use()).await;
}

/// A subscriber that lost messages for a while (here it heard nothing, and noticed) flushes
/// once when it hears again: not once more for each writer, whose next message shows the
/// numbers it missed, all covered by that flush.
#[tokio::test(start_paused = true)]
async fn a_subscriber_back_from_a_loss_flushes_once_not_once_per_writer() {
    let ns = unique_namespace("resync");
    let (store, bus) = (MemoryKvStore::new(), MemoryBus::new());
    let faulty = Faulty::new(bus.clone());
    let writers: Vec<_> = (0..3)
        .map(|_| {
            cache(
                (
                    DynKvStore::new(store.clone()),
                    DynInvalidationBus::new(bus.clone()),
                ),
                &ns,
            )
        })
        .collect();
    let (b_parts, b_calls) = probed((
        DynKvStore::new(store),
        DynInvalidationBus::new(faulty.clone()),
    ));
    let b = cache(b_parts, &ns);
    let mut all = writers.clone();
    all.push(b.clone());
    live(&all).await;
    writers[0].insert("k".into(), 1).await.unwrap();
    settle_in_l1(&b, &b_calls, "k", 1).await;
    faulty.silenced.store(true, Ordering::SeqCst);
    settle(|| !b.l1_in_use()).await;
    faulty.silenced.store(false, Ordering::SeqCst);
    settle(|| b.l1_in_use()).await;
    // Every writer speaks within a ping interval; each L1 flush sends the next read to L2.
    let before = b_calls.reads();
    let until = Instant::now() + 3 * config().ping_interval;
    while Instant::now() < until {
        assert_eq!(b.get(&"k".to_owned()).await.unwrap(), Some(1));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let from_l2 = b_calls.reads() - before;
    assert!(from_l2 <= 1, "L1 flushed {from_l2} times after the loss");
}

/// A bus whose subscriptions deliver every event `delay` after it came (a subscriber whose
/// connection is backed up): messages keep flowing, late.
#[derive(Clone, Debug, Default)]
struct Late {
    inner: MemoryBus,
    /// Nanoseconds.
    delay: Arc<std::sync::atomic::AtomicU64>,
}

impl InvalidationBus for Late {
    async fn publish(&self, channel: &Key, message: Bytes) -> Result<(), BackendError> {
        self.inner.publish(channel, message).await
    }

    async fn subscribe(&self, channel: &Key) -> Result<Subscription, BackendError> {
        let mut events = self.inner.subscribe(channel).await?;
        let (arrived, arrivals) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Some(event) = events.next_event().await {
                if arrived.send((Instant::now(), event)).is_err() {
                    return;
                }
            }
        });
        let delay = Arc::clone(&self.delay);
        Ok(Subscription::new(futures_util::stream::unfold(
            arrivals,
            move |mut arrivals| {
                let delay = Duration::from_nanos(delay.load(Ordering::SeqCst));
                async move {
                    let (at, event) = arrivals.recv().await?;
                    tokio::time::sleep_until(at + delay).await;
                    Some((event, arrivals))
                }
            },
        )))
    }
}

/// A subscription that falls behind for good (messages flow, but a second late) is not taken
/// for a live one once its messages come again: the instance's own messages show how late
/// they are, and L1 stays bypassed while they are later than `max_silence`, so a write on
/// another instance is not served stale from L1 for that second.
#[tokio::test(start_paused = true)]
async fn a_subscription_that_stays_behind_keeps_l1_bypassed() {
    let ns = unique_namespace("late");
    let bus = MemoryBus::new();
    let late = Late {
        inner: bus.clone(),
        ..Late::default()
    };
    let (a, b, _) = writer_and_reader(
        DynInvalidationBus::new(bus),
        DynInvalidationBus::new(late.clone()),
        &ns,
    )
    .await;

    let delay = Duration::from_secs(1);
    late.delay.store(delay.as_nanos() as u64, Ordering::SeqCst);
    // Messages published from now on reach B a second late; by then they flow again.
    tokio::time::sleep(delay + 5 * config().ping_interval).await;
    assert_eq!(b.get(&"k".to_owned()).await.unwrap(), Some(1));
    let written = Instant::now();
    a.insert("k".into(), 2).await.unwrap();
    settle_value(&b, "k", Some(2)).await;
    let stale_for = written.elapsed();
    assert!(
        stale_for < config().max_silence,
        "B served the old value for {stale_for:?}"
    );
}

/// A writes L2 but its messages no longer get out (no error anywhere): B notices A's silence
/// and flushes its L1 within the bound.
#[tokio::test(start_paused = true)]
async fn a_silent_origin_makes_others_flush() {
    let ns = unique_namespace("mute");
    let (a, b, _, faulty) = faulty_writer_and_reader(&ns).await;
    faulty.muted.store(true, Ordering::SeqCst);
    let written = Instant::now();
    a.insert("k".into(), 2).await.unwrap();
    settle_value(&b, "k", Some(2)).await;
    let stale_for = written.elapsed();
    assert!(
        stale_for < config().max_silence + Duration::from_millis(100),
        "B served the old value for {stale_for:?}"
    );
    // B's own subscription is fine: it keeps using L1.
    assert!(b.l1_in_use());
}

/// Garbage on the channel is ignored: B keeps its subscription and keeps invalidating.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_messages_are_ignored() {
    let ns = unique_namespace("garbage");
    let (store, bus) = (MemoryKvStore::new(), MemoryBus::new());
    let a = cache(
        (
            DynKvStore::new(store.clone()),
            DynInvalidationBus::new(bus.clone()),
        ),
        &ns,
    );
    let b = cache(
        (DynKvStore::new(store), DynInvalidationBus::new(bus.clone())),
        &ns,
    );
    live(&[a.clone(), b.clone()]).await;
    let channel = ns.key("~invalidation").unwrap();
    for garbage in [
        &b""[..],
        b"\x01",
        b"\x01\xff\xff\xff\xff",
        b"\x09hello",
        b"\x01\x00\x00\x00\x00\x03",
    ] {
        bus.publish(&channel, Bytes::from_static(garbage))
            .await
            .unwrap();
    }
    a.insert("k".into(), 1).await.unwrap();
    settle_value(&b, "k", Some(1)).await;
    a.insert("k".into(), 2).await.unwrap();
    settle_value(&b, "k", Some(2)).await;
    assert!(b.l1_in_use());
}

/// What happens to B's Redis during a faulty run.
#[derive(Clone, Copy, Debug)]
enum Fault {
    /// B's connections (L2 and bus) are closed and refused: the bus reports the loss.
    Cut,
    /// B's connections stay open but carry nothing: only silence shows it.
    Stall,
    /// The server is killed (for A too) and restarted empty.
    Restart,
}

/// A keeps writing one key while B reads it; B's Redis suffers `fault` from round 10 to
/// round 40. B never serves a value replaced longer than the staleness bound ago, and serves
/// fresh values once Redis is back (from L1 again, except after a restart: see below); then,
/// its pending deletes done, it serves no absence either.
/// (Standalone only: a cluster client learns node addresses from the cluster and would bypass
/// the proxy.)
async fn faulty_run(fault: Fault) {
    let server = RedisServer::start();
    let ns = unique_namespace("fault");
    let config_for = |url: String| {
        RedisConfig::standalone(url)
            .with_command_timeout(Duration::from_millis(100))
            .with_connect_timeout(Duration::from_millis(100))
    };
    let a = cache(redis_parts(config_for(server.url())).await, &ns);
    let proxy = FaultProxy::start(server.addr()).await;
    let b = cache(redis_parts(config_for(proxy.url())).await, &ns);
    live(&[a.clone(), b.clone()]).await;
    let bound = config().max_silence + Duration::from_millis(100);
    let mut writes: History = Vec::new();
    // From the fault until B has caught up, B's L2 may not answer, and an L2 error reads as
    // a miss: an absence then is no stale one.
    let mut misses_excused = false;
    for round in 0u64..60 {
        match (round, fault) {
            (10, Fault::Cut) => proxy.cut(),
            (10, Fault::Stall) => proxy.stall(),
            (10, Fault::Restart) => server.kill(),
            (40, Fault::Cut | Fault::Stall) => proxy.restore(),
            (40, Fault::Restart) => server.restart(),
            _ => {}
        }
        misses_excused |= round == 10;
        a.insert("k".into(), round).await.unwrap();
        writes.push((Some(round), Instant::now()));
        for _ in 0..5 {
            read_within_bound(&b, &writes, bound, misses_excused, fault).await;
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    // Every fault ends with both subscriptions live again, L1 back in use.
    live(&[a.clone(), b.clone()]).await;
    // A's own L2 breaker may still be cooling down (its writes then wait in L1 and as pending
    // deletes): A keeps writing until B serves A's latest value.
    let deadline = Instant::now() + Duration::from_secs(5);
    for version in 60u64.. {
        a.insert("k".into(), version).await.unwrap();
        writes.push((Some(version), Instant::now()));
        tokio::time::sleep(Duration::from_millis(20)).await;
        if b.get(&"k".to_owned()).await.unwrap() == Some(version) {
            break;
        }
        assert!(Instant::now() < deadline, "{fault:?}: B never caught up");
    }
    // The outdated copies the fault left are deleted (each delete a tombstone, which may
    // cover a later write until the next one); then B serves every write, never an absence.
    settle(|| a.pending_l2_deletes() == 0 && b.pending_l2_deletes() == 0).await;
    let first = writes.len() as u64;
    for version in first..first + 20 {
        a.insert("k".into(), version).await.unwrap();
        writes.push((Some(version), Instant::now()));
        for _ in 0..5 {
            read_within_bound(&b, &writes, bound, false, fault).await;
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
}

/// Reads `k` on `b` and asserts that what it serves (a value, or an absence, unless misses
/// are excused) was replaced in `writes` at most `bound` before the read began.
async fn read_within_bound(
    b: &Cache<String, u64>,
    writes: &History,
    bound: Duration,
    misses_excused: bool,
    fault: Fault,
) {
    let started = Instant::now();
    let served = b.get(&"k".to_owned()).await.unwrap();
    if served.is_none() && misses_excused {
        return;
    }
    if let Some(replaced) = last_replaced(writes, served) {
        assert!(
            replaced + bound >= started,
            "{fault:?}: B served {served:?}, replaced {:?} before the read",
            started - replaced
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_subscriber_on_redis_stays_within_bound() {
    faulty_run(Fault::Cut).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_subscriber_on_redis_stays_within_bound() {
    faulty_run(Fault::Stall).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restart_stays_within_bound() {
    faulty_run(Fault::Restart).await;
}

/// Every write of one key in order: the value written (`None` for a remove) and when the
/// write returned.
type History = Vec<(Option<u64>, Instant)>;

/// When what a read served (a value, or an absence) was last replaced in `history`, which
/// starts with the key absent; `None` while it is still current.
fn last_replaced(history: &History, served: Option<u64>) -> Option<Instant> {
    let states = std::iter::once(None).chain(history.iter().map(|(value, _)| *value));
    let at = states
        .enumerate()
        .filter(|(_, state)| *state == served)
        .map(|(at, _)| at)
        .last()
        .unwrap_or_else(|| panic!("served {served:?}, never written"));
    history.get(at).map(|(_, replaced)| *replaced)
}

/// A seeded model of concurrent writers, readers and invalidations on several instances:
/// writes of one key are serialized (so "the latest value" is defined) while reads run
/// freely. During the run, no read returns a value (or an absence) replaced longer than the
/// bound before the read began; after quiescence, within the bound, every instance serves the
/// latest value of every key, and keeps serving it.
async fn randomized_run(parts: Vec<Parts>, ns: Namespace, seed: u64) {
    const KEYS: usize = 6;
    let caches: Vec<_> = parts.into_iter().map(|parts| cache(parts, &ns)).collect();
    live(&caches).await;
    let bound = config().max_silence + Duration::from_millis(100);
    let histories: Arc<Vec<tokio::sync::Mutex<History>>> = Arc::new(
        (0..KEYS)
            .map(|_| tokio::sync::Mutex::new(Vec::new()))
            .collect(),
    );
    let next_value = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut tasks = Vec::new();
    for (i, cache) in caches.iter().enumerate() {
        for worker in 0..2u64 {
            let (cache, histories, next_value) = (
                cache.clone(),
                Arc::clone(&histories),
                Arc::clone(&next_value),
            );
            let mut rng = fastrand::Rng::with_seed(seed ^ ((i as u64) << 8) ^ worker);
            tasks.push(tokio::spawn(async move {
                for _ in 0..150 {
                    let k = rng.usize(0..KEYS);
                    let key = format!("k{k}");
                    match rng.u8(0..10) {
                        0..=2 => {
                            let mut history = histories[k].lock().await;
                            let value = next_value.fetch_add(1, Ordering::SeqCst);
                            cache.insert(key, value).await.unwrap();
                            history.push((Some(value), Instant::now()));
                        }
                        3 => {
                            let mut history = histories[k].lock().await;
                            cache.remove(&key).await.unwrap();
                            history.push((None, Instant::now()));
                        }
                        4 => {
                            // Two keys in one call, locked in key order.
                            let other = (k + 1) % KEYS;
                            let (first, second) = (k.min(other), k.max(other));
                            let mut h1 = histories[first].lock().await;
                            let mut h2 = histories[second].lock().await;
                            cache
                                .remove_many(&[format!("k{first}"), format!("k{second}")])
                                .await
                                .unwrap();
                            h1.push((None, Instant::now()));
                            h2.push((None, Instant::now()));
                        }
                        _ => {
                            let started = Instant::now();
                            let served = cache.get(&key).await.unwrap();
                            let history = histories[k].lock().await;
                            if let Some(replaced) = last_replaced(&history, served) {
                                assert!(
                                    replaced + bound >= started,
                                    "served {served:?} of {key}, replaced {:?} before the read",
                                    started - replaced
                                );
                            }
                        }
                    }
                    tokio::task::yield_now().await;
                }
            }));
        }
    }
    for task in tasks {
        task.await.expect("worker");
    }
    let quiet = Instant::now();
    for (k, history) in histories.iter().enumerate() {
        let latest = history.lock().await.last().and_then(|(v, _)| *v);
        let key = format!("k{k}");
        for cache in &caches {
            while cache.get(&key).await.unwrap() != latest {
                assert!(
                    quiet.elapsed() <= bound,
                    "{key} still stale after {bound:?}"
                );
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
    }
    for (k, history) in histories.iter().enumerate() {
        let latest = history.lock().await.last().and_then(|(v, _)| *v);
        for cache in &caches {
            assert_eq!(cache.get(&format!("k{k}")).await.unwrap(), latest);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn randomized_instances_on_memory_bus() {
    for seed in 0..8 {
        randomized_run(memory_parts(3), unique_namespace("model"), seed).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn randomized_instances_on_redis() {
    for seed in 0..3 {
        randomized_run(standalone_parts(3).await, unique_namespace("model"), seed).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn randomized_instances_on_redis_cluster() {
    for seed in 0..2 {
        randomized_run(cluster_parts(3).await, unique_namespace("model"), seed).await;
    }
}

/// A store whose writes wait for a permit while `held` is set.
#[derive(Clone, Debug)]
struct Gated {
    inner: MemoryKvStore,
    held: Arc<AtomicBool>,
    gate: Arc<tokio::sync::Semaphore>,
}

impl Gated {
    async fn wait(&self) {
        if self.held.load(Ordering::SeqCst) {
            self.gate.acquire().await.expect("gate").forget();
        }
    }
}

impl headroom_core::kv::KvStore for Gated {
    async fn get(&self, key: &Key) -> Result<Option<Bytes>, BackendError> {
        self.inner.get(key).await
    }
    async fn get_many(&self, keys: &[Key]) -> Result<Vec<Option<Bytes>>, BackendError> {
        self.inner.get_many(keys).await
    }
    async fn set(&self, key: &Key, value: Bytes, ttl: Duration) -> Result<(), BackendError> {
        self.wait().await;
        self.inner.set(key, value, ttl).await
    }
    async fn set_many(&self, entries: &[headroom_core::kv::KvEntry]) -> Result<(), BackendError> {
        self.wait().await;
        self.inner.set_many(entries).await
    }
    async fn delete(&self, keys: &[Key]) -> Result<u64, BackendError> {
        self.inner.delete(keys).await
    }
}

/// An `insert` dropped while its L2 write is in flight still announces the write once it
/// lands: B does not keep serving the old value from L1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_insert_still_publishes() {
    use futures_util::FutureExt;

    let ns = unique_namespace("dropped");
    let (store, bus) = (MemoryKvStore::new(), MemoryBus::new());
    let gated = Gated {
        inner: store.clone(),
        held: Arc::default(),
        gate: Arc::new(tokio::sync::Semaphore::new(0)),
    };
    let a = cache(
        (
            DynKvStore::new(gated.clone()),
            DynInvalidationBus::new(bus.clone()),
        ),
        &ns,
    );
    let (b_parts, b_calls) = probed((DynKvStore::new(store), DynInvalidationBus::new(bus)));
    let b = cache(b_parts, &ns);
    live(&[a.clone(), b.clone()]).await;
    a.insert("k".into(), 1).await.unwrap();
    settle_in_l1(&b, &b_calls, "k", 1).await;
    gated.held.store(true, Ordering::SeqCst);
    let mut insert = Box::pin(a.insert("k".into(), 2));
    assert!((&mut insert).now_or_never().is_none(), "the L2 write waits");
    drop(insert);
    gated.gate.add_permits(1);
    settle_value(&b, "k", Some(2)).await;
}

/// A burst of writes larger than the outbox costs the other instances an L1 flush, never
/// their L2: entries nobody wrote stay readable from L2 on every instance.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_overflowing_outbox_flushes_l1_but_hides_no_l2_entry() {
    let ns = unique_namespace("burst");
    let mut small = config();
    small.max_pending_keys = 4;
    let build = |parts: Parts| -> Cache<String, u64> {
        Cache::builder()
            .ttl(Duration::from_secs(60))
            .l2(parts.0, ns.clone())
            .invalidation(parts.1, small.clone())
            .build()
            .expect("build")
    };
    let mut parts = memory_parts(2).into_iter();
    let a = build(parts.next().unwrap());
    let (b_parts, b_calls) = probed(parts.next().unwrap());
    let b = build(b_parts);
    live(&[a.clone(), b.clone()]).await;
    a.insert("untouched".into(), 7).await.unwrap();
    settle_in_l1(&b, &b_calls, "untouched", 7).await;

    let burst: Vec<String> = (0..10).map(|i| format!("burst-{i}")).collect();
    a.remove_many(&burst).await.unwrap();

    // B's L1 is flushed once the message arrives: its next read of the key goes to L2.
    let deadline = Instant::now() + Duration::from_secs(5);
    let served = loop {
        let before = b_calls.reads();
        let served = b.get(&"untouched".to_owned()).await.unwrap();
        if b_calls.reads() > before {
            break served;
        }
        assert!(Instant::now() < deadline, "B's L1 was never flushed");
        tokio::time::sleep(Duration::from_micros(100)).await;
    };
    assert_eq!(served, Some(7), "the L2 entry nobody wrote stays visible");
}

/// A key written again and again while the bus refuses messages is queued once: the writes
/// do not overflow the outbox and flush the other instances' L1 for one key changed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_written_again_while_queued_is_queued_once() {
    let ns = unique_namespace("hot");
    let mut small = config();
    small.max_pending_keys = 4;
    let build = |parts: Parts| cache_with(parts, &ns, Clock::system(), small.clone());
    let (store, bus) = (MemoryKvStore::new(), MemoryBus::new());
    let faulty = Faulty::new(bus.clone());
    let a = build((
        DynKvStore::new(store.clone()),
        DynInvalidationBus::new(faulty.clone()),
    ));
    let (b_parts, b_calls) = probed((DynKvStore::new(store), DynInvalidationBus::new(bus)));
    let b = build(b_parts);
    live(&[a.clone(), b.clone()]).await;
    a.insert("untouched".into(), 7).await.unwrap();
    a.insert("hot".into(), 0).await.unwrap();
    settle_in_l1(&b, &b_calls, "untouched", 7).await;
    settle_in_l1(&b, &b_calls, "hot", 0).await;
    faulty.failing.store(true, Ordering::SeqCst);
    for i in 1..10 {
        a.insert("hot".into(), i).await.unwrap();
    }
    faulty.failing.store(false, Ordering::SeqCst);
    // B drops its copy of "hot" only when A's message arrives.
    settle_value(&b, "hot", Some(9)).await;
    served_from_l1_throughout(&b, &b_calls, "untouched", 7, Duration::from_millis(50)).await;
}

/// Serves `key` on `cache` for `window` and asserts that no read goes to L2: L1 was not
/// flushed meanwhile.
async fn served_from_l1_throughout(
    cache: &Cache<String, u64>,
    calls: &Calls,
    key: &str,
    expected: u64,
    window: Duration,
) {
    let until = Instant::now() + window;
    while Instant::now() < until {
        let before = calls.reads();
        assert_eq!(cache.get(&key.to_owned()).await.unwrap(), Some(expected));
        assert_eq!(calls.reads(), before, "L1 was flushed");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// An instance that dies without a word (its messages simply stop) costs each survivor one
/// L1 flush, not one every `max_silence` for as long as entries live.
#[tokio::test(start_paused = true)]
async fn a_crashed_instance_costs_each_survivor_one_flush() {
    let ns = unique_namespace("crash");
    let (_a, b, b_calls, faulty) = faulty_writer_and_reader(&ns).await;
    // A "crashes": nothing it sends arrives any more.
    faulty.muted.store(true, Ordering::SeqCst);
    // B notices the silence once and flushes (its next read goes to L2)...
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let before = b_calls.reads();
        b.get(&"k".to_owned()).await.unwrap();
        if b_calls.reads() > before {
            break;
        }
        assert!(Instant::now() < deadline, "B never noticed A's silence");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    settle_in_l1(&b, &b_calls, "k", 1).await;
    // ...and then keeps its L1 for several silence periods.
    served_from_l1_throughout(&b, &b_calls, "k", 1, config().max_silence * 4).await;
}

/// A calls `remove_many` with no keys more often than `ping_interval`: it still pings, so B
/// never takes it for silent and keeps its L1.
#[tokio::test(start_paused = true)]
async fn removing_no_keys_does_not_hold_back_the_pings() {
    let ns = unique_namespace("remove-none");
    let mut parts = memory_parts(2).into_iter();
    let a = cache(parts.next().unwrap(), &ns);
    let (b_parts, b_calls) = probed(parts.next().unwrap());
    let b = cache(b_parts, &ns);
    live(&[a.clone(), b.clone()]).await;
    a.insert("k".into(), 1).await.unwrap();
    settle_in_l1(&b, &b_calls, "k", 1).await;
    let until = Instant::now() + config().max_silence * 4;
    while Instant::now() < until {
        a.remove_many(&[]).await.unwrap();
        let before = b_calls.reads();
        assert_eq!(b.get(&"k".to_owned()).await.unwrap(), Some(1));
        assert_eq!(b_calls.reads(), before, "B flushed its L1: A looked silent");
        tokio::time::sleep(config().ping_interval / 2).await;
    }
}

/// A cut from the bus (every publish fails) costs each other instance one flush: when A's
/// messages flow again, what it could not send reaches B, in sequence, and B keeps its L1.
#[tokio::test(start_paused = true)]
async fn an_instance_back_on_the_bus_sends_what_it_missed_and_costs_no_second_flush() {
    let ns = unique_namespace("cut-writer");
    let (a, b, b_calls, faulty) = faulty_writer_and_reader(&ns).await;
    a.insert("other".into(), 1).await.unwrap();
    settle_in_l1(&b, &b_calls, "other", 1).await;

    faulty.failing.store(true, Ordering::SeqCst);
    // B notices A's silence once and flushes (its next read goes to L2).
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let before = b_calls.reads();
        b.get(&"other".to_owned()).await.unwrap();
        if b_calls.reads() > before {
            break;
        }
        assert!(Instant::now() < deadline, "B never noticed A's silence");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    settle_in_l1(&b, &b_calls, "other", 1).await;
    settle_in_l1(&b, &b_calls, "k", 1).await;
    // A writes while none of its messages get out.
    a.insert("k".into(), 2).await.unwrap();

    faulty.failing.store(false, Ordering::SeqCst);
    settle_value(&b, "k", Some(2)).await;
    served_from_l1_throughout(&b, &b_calls, "other", 1, config().max_silence * 4).await;
}

/// A burst of long keys is more than the bus takes in one message: it goes out in several,
/// and the other instance drops each key from its L1 without waiting to notice a silence.
#[tokio::test(start_paused = true)]
async fn a_burst_of_long_keys_reaches_the_others_in_several_messages() {
    let ns = unique_namespace("long-keys");
    let (a, b, b_calls, faulty) = faulty_writer_and_reader(&ns).await;
    let long: Vec<String> = (0..200)
        .map(|i| format!("{i:04}{}", "x".repeat(996)))
        .collect();
    a.insert(long[0].clone(), 1).await.unwrap();
    settle_in_l1(&b, &b_calls, &long[0], 1).await;

    a.remove_many(&long).await.unwrap();
    // Well within the silence that would make B stop trusting its L1.
    let deadline = Instant::now() + config().max_silence / 2;
    while b.get(&long[0]).await.unwrap().is_some() {
        assert!(Instant::now() < deadline, "B still serves the removed key");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert!(faulty.largest.load(Ordering::SeqCst) <= 64 * 1024);
}

/// Tags invalidated while the bus is out of reach wait in a bounded queue: a tag invalidated
/// again is queued once, and past as many tags as an instance hides one by one, a clear
/// stands for all of them. When the bus is back, B hides the tagged entry all the same.
#[tokio::test(start_paused = true)]
async fn tags_queued_while_the_bus_is_down_stay_bounded() {
    let ns = unique_namespace("cut-tags");
    let (a, b, b_calls, faulty) = faulty_writer_and_reader(&ns).await;
    a.insert_tagged("tagged".into(), 1, &["team:0"])
        .await
        .unwrap();
    settle_in_l1(&b, &b_calls, "tagged", 1).await;

    faulty.failing.store(true, Ordering::SeqCst);
    for round in 0..20 {
        for team in 0..1_000 {
            a.invalidate_tag(&format!("team:{}", (round * 1_000 + team) % 12_000))
                .await;
        }
        tokio::task::yield_now().await;
    }
    faulty.failing.store(false, Ordering::SeqCst);
    settle_value(&b, "tagged", None).await;
    let largest = faulty.largest.load(Ordering::SeqCst);
    assert!(
        largest < 64 * 1024,
        "a message of {largest} bytes for 12,000 tags invalidated 20,000 times"
    );
}

/// A graceful shutdown says goodbye: the other instances keep their L1 untouched.
#[tokio::test(start_paused = true)]
async fn a_graceful_shutdown_costs_the_others_no_flush() {
    let ns = unique_namespace("bye");
    let mut parts = memory_parts(2).into_iter();
    let a = cache(parts.next().unwrap(), &ns);
    let (b_parts, b_calls) = probed(parts.next().unwrap());
    let b = cache(b_parts, &ns);
    live(&[a.clone(), b.clone()]).await;
    a.insert("k".into(), 1).await.unwrap();
    settle_in_l1(&b, &b_calls, "k", 1).await;

    a.shutdown().await;
    assert!(
        !a.l1_in_use(),
        "a shut down cache no longer hears invalidations"
    );
    served_from_l1_throughout(&b, &b_calls, "k", 1, config().max_silence * 4).await;
}

/// A rolling restart: B says goodbye and a new instance takes its place and writes. A, which
/// stayed up, keeps its L1: the newcomer's messages start at sequence 0, so no gap shows.
async fn a_restart_costs_the_survivor_no_flush(parts: Vec<Parts>, ns: Namespace) {
    let mut parts = parts.into_iter();
    let (a_parts, a_calls) = probed(parts.next().unwrap());
    let a = cache(a_parts, &ns);
    let b = cache(parts.next().unwrap(), &ns);
    live(&[a.clone(), b.clone()]).await;
    a.insert("k".into(), 1).await.unwrap();
    settle_in_l1(&a, &a_calls, "k", 1).await;
    b.insert("other".into(), 1).await.unwrap();
    b.shutdown().await;
    drop(b);
    let c = cache(parts.next().unwrap(), &ns);
    live(std::slice::from_ref(&c)).await;
    c.insert("other".into(), 2).await.unwrap();
    settle_value(&a, "other", Some(2)).await;
    served_from_l1_throughout(&a, &a_calls, "k", 1, config().max_silence * 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_costs_the_survivor_no_flush_on_memory_bus() {
    a_restart_costs_the_survivor_no_flush(memory_parts(3), unique_namespace("restart")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_costs_the_survivor_no_flush_on_redis_cluster() {
    a_restart_costs_the_survivor_no_flush(cluster_parts(3).await, unique_namespace("restart"))
        .await;
}

/// Dropping a cache releases what it holds in Redis: its invalidation channel is unsubscribed
/// and its tracking connection closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_cache_unsubscribes_and_closes_its_tracking_connection() {
    let server = RedisServer::start();
    let redis = Redis::connect(RedisConfig::standalone(server.url()))
        .await
        .expect("connect");
    let bus = RedisBus::connect(redis.clone()).await.expect("bus");
    let ns = unique_namespace("dropped-cache");
    let writes = headroom_redis::tracked_writes(&redis, format!("{}:", ns.as_str()).as_bytes())
        .await
        .expect("tracking");
    let cache: Cache<String, u64> = Cache::builder()
        .l2(RedisKvStore::new(redis), ns.clone())
        .invalidation(bus.clone(), config())
        .external_writes(writes)
        .build()
        .expect("build");
    live(std::slice::from_ref(&cache)).await;
    let channel = format!("{}:~invalidation", ns.as_str());
    let subscribers = || {
        let out = server.cli(&["PUBSUB", "NUMSUB", &channel]);
        out.lines().nth(1).unwrap_or("").trim().to_owned()
    };
    let tracking = || {
        server
            .cli(&["CLIENT", "LIST"])
            .lines()
            .filter(|line| {
                line.split_whitespace()
                    .any(|field| field.starts_with("flags=") && field.contains('t'))
            })
            .count()
    };
    assert_eq!(subscribers(), "1");
    assert_eq!(tracking(), 1);

    drop(cache);
    let deadline = Instant::now() + Duration::from_secs(5);
    while subscribers() != "0" || tracking() != 0 {
        assert!(
            Instant::now() < deadline,
            "still held after 5 s: {} subscribers, {} tracking connections",
            subscribers(),
            tracking()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// With its subscription silent, an instance stops using L1 `max_silence` after the last
/// message it heard, not on some later beat. On tokio's paused clock the bound is exact, to
/// the timer's millisecond.
#[tokio::test(start_paused = true)]
async fn silence_is_acted_on_exactly_max_silence_after_the_last_message() {
    let ns = unique_namespace("silence-bound");
    let (store, bus) = (MemoryKvStore::new(), MemoryBus::new());
    let faulty = Faulty::new(bus.clone());
    let a = cache(
        (DynKvStore::new(store.clone()), DynInvalidationBus::new(bus)),
        &ns,
    );
    let b = cache(
        (
            DynKvStore::new(store),
            DynInvalidationBus::new(faulty.clone()),
        ),
        &ns,
    );
    live(&[a.clone(), b.clone()]).await;
    a.insert("k".into(), 1).await.unwrap();
    settle_value(&b, "k", Some(1)).await;
    // Off the ping beat: the last message B hears is A's next write.
    tokio::time::sleep(Duration::from_millis(13)).await;
    a.insert("k".into(), 2).await.unwrap();
    settle_value(&b, "k", Some(2)).await;
    faulty.silenced.store(true, Ordering::SeqCst);
    let silenced = Instant::now();
    while b.l1_in_use() {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let noticed = silenced.elapsed();
    // Tokio's timers fire on whole milliseconds.
    assert!(
        noticed <= config().max_silence + Duration::from_millis(1),
        "L1 still used {noticed:?} after the last message"
    );
}

/// A write acknowledged just before a graceful shutdown is announced before the goodbye: the
/// other instances never keep the old value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_just_before_shutdown_is_announced_before_the_goodbye() {
    let (store, bus) = (MemoryKvStore::new(), MemoryBus::new());
    let parts = || {
        (
            DynKvStore::new(store.clone()),
            DynInvalidationBus::new(bus.clone()),
        )
    };
    for round in 0..20_u64 {
        let ns = unique_namespace("last-write");
        let (b_parts, b_calls) = probed(parts());
        let b = cache(b_parts, &ns);
        let a = cache(parts(), &ns);
        live(&[a.clone(), b.clone()]).await;
        a.insert("k".into(), round).await.unwrap();
        settle_in_l1(&b, &b_calls, "k", round).await;
        a.insert("k".into(), round + 100).await.unwrap();
        a.shutdown().await;
        settle_value(&b, "k", Some(round + 100)).await;
    }
}

/// A shutdown gives up on what the bus refuses, after one attempt. A's last keys are refused
/// (once before the shutdown, once during it) and its goodbye goes out: B must not retire A as
/// if nothing were lost, and stops serving the old value at once.
#[tokio::test(start_paused = true)]
async fn a_shutdown_that_could_not_send_its_last_keys_makes_the_others_flush() {
    let ns = unique_namespace("bye-unsent");
    let (a, b, _, faulty) = faulty_writer_and_reader(&ns).await;
    faulty.refuse_next.store(2, Ordering::SeqCst);
    let written = Instant::now();
    a.insert("k".into(), 2).await.unwrap();
    // The first attempt is refused; A waits to send it again.
    settle(|| faulty.refused.load(Ordering::SeqCst) == 1).await;
    a.shutdown().await;
    assert_eq!(faulty.refused.load(Ordering::SeqCst), 2, "refused again");
    settle_value(&b, "k", Some(2)).await;
    let stale_for = written.elapsed();
    assert!(
        stale_for < config().max_silence,
        "B served the old value for {stale_for:?}"
    );
}

/// An insert dropped while its L2 write is in flight, and the instance shut down before the
/// write lands: its keys are queued after the goodbye. They still reach B, which stops
/// serving the old value.
#[tokio::test(start_paused = true)]
async fn a_write_landing_after_the_goodbye_still_reaches_the_others() {
    use futures_util::FutureExt;

    let ns = unique_namespace("after-bye");
    let (store, bus) = (MemoryKvStore::new(), MemoryBus::new());
    let gated = Gated {
        inner: store.clone(),
        held: Arc::default(),
        gate: Arc::new(tokio::sync::Semaphore::new(0)),
    };
    let a = cache(
        (
            DynKvStore::new(gated.clone()),
            DynInvalidationBus::new(bus.clone()),
        ),
        &ns,
    );
    let (b_parts, b_calls) = probed((DynKvStore::new(store), DynInvalidationBus::new(bus)));
    let b = cache(b_parts, &ns);
    live(&[a.clone(), b.clone()]).await;
    a.insert("k".into(), 1).await.unwrap();
    settle_in_l1(&b, &b_calls, "k", 1).await;
    gated.held.store(true, Ordering::SeqCst);
    let mut insert = Box::pin(a.insert("k".into(), 2));
    assert!((&mut insert).now_or_never().is_none(), "the L2 write waits");
    drop(insert);
    a.shutdown().await;
    gated.gate.add_permits(1);
    let landed = Instant::now();
    settle_value(&b, "k", Some(2)).await;
    let stale_for = landed.elapsed();
    assert!(
        stale_for < config().max_silence,
        "B served the old value for {stale_for:?}"
    );
}

/// A (whose L2 calls fail on demand and whose messages can be dropped) and B share L2 and a
/// bus; B holds `k` = 1 in L1.
async fn writer_with_failing_l2_and_reader(
    ns: &Namespace,
) -> (
    Cache<String, u64>,
    Arc<Calls>,
    Faulty,
    Cache<String, u64>,
    Arc<Calls>,
) {
    writer_with_failing_l2_and_reader_on(ns, config()).await
}

/// [`writer_with_failing_l2_and_reader`] with invalidation configured as `config`.
async fn writer_with_failing_l2_and_reader_on(
    ns: &Namespace,
    config: InvalidationConfig,
) -> (
    Cache<String, u64>,
    Arc<Calls>,
    Faulty,
    Cache<String, u64>,
    Arc<Calls>,
) {
    let (store, bus) = (MemoryKvStore::new(), MemoryBus::new());
    let faulty = Faulty::new(bus.clone());
    let (a_parts, a_calls) = probed((
        DynKvStore::new(store.clone()),
        DynInvalidationBus::new(faulty.clone()),
    ));
    let a = cache_with(a_parts, ns, Clock::system(), config.clone());
    let (b_parts, b_calls) = probed((DynKvStore::new(store), DynInvalidationBus::new(bus)));
    let b = cache_with(b_parts, ns, Clock::system(), config);
    live(&[a.clone(), b.clone()]).await;
    a.insert("k".into(), 1).await.unwrap();
    settle_in_l1(&b, &b_calls, "k", 1).await;
    (a, a_calls, faulty, b, b_calls)
}

/// Reads `k` on `cache` until it no longer serves `old`; fails after `within`.
async fn stops_serving(cache: &Cache<String, u64>, old: u64, within: Duration, what: &str) {
    let start = Instant::now();
    while cache.get(&"k".to_owned()).await.unwrap() == Some(old) {
        assert!(
            start.elapsed() < within,
            "{what}: still served after {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// A's L2 fails while B's answers: A's write leaves the old value in L2. Once B hears of the
/// write it never serves the old copy, from L1 or L2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_that_missed_l2_is_not_served_from_the_old_copy_by_others() {
    let ns = unique_namespace("missed");
    let (a, a_calls, _, b, _) = writer_with_failing_l2_and_reader(&ns).await;
    a_calls.fail.store(true, Ordering::SeqCst);
    a.insert("k".into(), 2).await.unwrap();
    assert_eq!(a.pending_l2_deletes(), 1, "A's L2 copy is outdated");
    stops_serving(&b, 1, Duration::from_secs(2), "the message").await;
    for _ in 0..50 {
        assert_ne!(
            b.get(&"k".to_owned()).await.unwrap(),
            Some(1),
            "B serves the L2 copy A's write replaced"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// The same when A's write is one of a burst that overflows A's queue of keys: the others
/// flush L1 for the burst's keys, and still hear which L2 copies are outdated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_that_missed_l2_is_not_served_from_the_old_copies_by_others() {
    let ns = unique_namespace("missed-burst");
    let mut small = config();
    small.max_pending_keys = 4;
    let (a, a_calls, _, b, _) = writer_with_failing_l2_and_reader_on(&ns, small).await;
    a_calls.fail.store(true, Ordering::SeqCst);
    let burst: Vec<String> = std::iter::once("k".to_owned())
        .chain((0..5).map(|i| format!("x{i}")))
        .collect();
    a.remove_many(&burst).await.unwrap();
    stops_serving(&b, 1, Duration::from_secs(2), "the flush").await;
    for _ in 0..50 {
        assert_ne!(
            b.get(&"k".to_owned()).await.unwrap(),
            Some(1),
            "B serves the L2 copy A's removal replaced"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// As above, but A's message is lost too: B learns of it only by the gap and may read the old
/// copy back from L2 meanwhile. Once A's L2 answers again and A deletes the copy, B stops
/// serving it within the staleness bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_that_missed_l2_and_the_bus_ends_when_its_copy_is_deleted() {
    let ns = unique_namespace("missed-lost");
    let (a, a_calls, faulty, b, b_calls) = writer_with_failing_l2_and_reader(&ns).await;
    a_calls.fail.store(true, Ordering::SeqCst);
    faulty.drop_next_publish.store(true, Ordering::SeqCst);
    a.insert("k".into(), 2).await.unwrap();
    settle(|| !faulty.drop_next_publish.load(Ordering::SeqCst)).await;
    // The gap (at A's next ping) flushes B's L1; B reads the old copy back from L2.
    let reads = b_calls.reads();
    let deadline = Instant::now() + Duration::from_secs(2);
    while b_calls.reads() == reads {
        assert!(Instant::now() < deadline, "B never flushed its L1");
        assert_eq!(b.get(&"k".to_owned()).await.unwrap(), Some(1));
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    a_calls.fail.store(false, Ordering::SeqCst);
    settle(|| a.pending_l2_deletes() == 0).await;
    let bound = config().max_silence + Duration::from_millis(100);
    stops_serving(&b, 1, bound, "after A deleted its outdated copy").await;
}

/// A bus whose publishes wait until the gate has a permit.
#[derive(Debug)]
struct Stalling {
    inner: MemoryBus,
    gate: Arc<tokio::sync::Semaphore>,
}

impl InvalidationBus for Stalling {
    async fn publish(&self, channel: &Key, message: Bytes) -> Result<(), BackendError> {
        drop(self.gate.acquire().await);
        self.inner.publish(channel, message).await
    }

    async fn subscribe(&self, channel: &Key) -> Result<Subscription, BackendError> {
        self.inner.subscribe(channel).await
    }
}

/// A group shutdown cut short by its caller's timeout (its first cache cannot publish) has
/// told every cache of the group to stop, and a second shutdown waits for them all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_shutdown_cut_short_still_stops_every_cache() {
    let ns = unique_namespace("group-shutdown");
    let (store, bus) = (MemoryKvStore::new(), MemoryBus::new());
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let group = headroom_cache::ShutdownGroup::new();
    let build = |bus: DynInvalidationBus| -> Cache<String, u64> {
        Cache::builder()
            .ttl(Duration::from_secs(60))
            .l2(DynKvStore::new(store.clone()), ns.clone())
            .invalidation(bus, config())
            .shutdown_group(&group)
            .build()
            .expect("build")
    };
    let stalled = build(DynInvalidationBus::new(Stalling {
        inner: bus.clone(),
        gate: Arc::clone(&gate),
    }));
    let other = build(DynInvalidationBus::new(bus.clone()));
    live(&[stalled.clone(), other.clone()]).await;

    let cut_short = tokio::time::timeout(Duration::from_millis(50), group.shutdown()).await;
    assert!(
        cut_short.is_err(),
        "the stalled cache's publisher cannot finish"
    );
    assert!(!other.l1_in_use(), "told to stop all the same");
    gate.add_permits(1);
    group.shutdown().await;
    assert!(!stalled.l1_in_use() && !other.l1_in_use());
}
