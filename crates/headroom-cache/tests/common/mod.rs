//! Shared test support: a KV store wrapper that counts calls and fails on demand, and the
//! backend-independent scenarios run against memory, Redis and Redis Cluster.
#![allow(dead_code, unreachable_pub)]

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use headroom_cache::{Cache, CacheError};
use headroom_core::kv::{KvEntry, KvStore, VersionAt};
use headroom_core::{BackendError, BackendErrorKind, Key, Namespace};
use tokio::sync::{Semaphore, mpsc};

/// Calls made to a [`Probe`], by method.
#[derive(Debug, Default)]
pub struct Calls {
    pub get: AtomicUsize,
    pub get_many: AtomicUsize,
    pub set: AtomicUsize,
    pub set_many: AtomicUsize,
    pub delete: AtomicUsize,
    pub set_if_newer: AtomicUsize,
    pub delete_if_eq: AtomicUsize,
    /// Calls that reached the store and succeeded.
    pub ok: AtomicUsize,
    pub fail: AtomicBool,
}

impl Calls {
    pub fn l2_round_trips(&self) -> usize {
        [
            &self.get,
            &self.get_many,
            &self.set,
            &self.set_many,
            &self.delete,
            &self.set_if_newer,
            &self.delete_if_eq,
        ]
        .iter()
        .map(|c| c.load(Ordering::SeqCst))
        .sum()
    }

    pub fn reads(&self) -> usize {
        self.get.load(Ordering::SeqCst) + self.get_many.load(Ordering::SeqCst)
    }
}

/// A store that counts every call and fails all of them while `fail` is set.
#[derive(Clone, Debug)]
pub struct Probe<S> {
    pub inner: S,
    pub calls: Arc<Calls>,
}

impl<S: KvStore> Probe<S> {
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            calls: Arc::default(),
        }
    }

    async fn run<T>(
        &self,
        counter: &AtomicUsize,
        call: impl Future<Output = Result<T, BackendError>>,
    ) -> Result<T, BackendError> {
        counter.fetch_add(1, Ordering::SeqCst);
        if self.calls.fail.load(Ordering::SeqCst) {
            return Err(BackendError::new(BackendErrorKind::Connection));
        }
        let result = call.await;
        if result.is_ok() {
            self.calls.ok.fetch_add(1, Ordering::SeqCst);
        }
        result
    }
}

impl<S: KvStore> KvStore for Probe<S> {
    async fn get(&self, key: &Key) -> Result<Option<Bytes>, BackendError> {
        self.run(&self.calls.get, self.inner.get(key)).await
    }
    async fn get_many(&self, keys: &[Key]) -> Result<Vec<Option<Bytes>>, BackendError> {
        self.run(&self.calls.get_many, self.inner.get_many(keys))
            .await
    }
    async fn set(&self, key: &Key, value: Bytes, ttl: Duration) -> Result<(), BackendError> {
        self.run(&self.calls.set, self.inner.set(key, value, ttl))
            .await
    }
    async fn set_many(&self, entries: &[KvEntry]) -> Result<(), BackendError> {
        self.run(&self.calls.set_many, self.inner.set_many(entries))
            .await
    }
    async fn delete(&self, keys: &[Key]) -> Result<u64, BackendError> {
        self.run(&self.calls.delete, self.inner.delete(keys)).await
    }
    async fn set_if_newer(
        &self,
        entries: &[KvEntry],
        version: VersionAt,
    ) -> Result<u64, BackendError> {
        self.run(
            &self.calls.set_if_newer,
            self.inner.set_if_newer(entries, version),
        )
        .await
    }
    async fn delete_if_eq(&self, key: &Key, expected: &[u8]) -> Result<bool, BackendError> {
        self.run(
            &self.calls.delete_if_eq,
            self.inner.delete_if_eq(key, expected),
        )
        .await
    }
}

/// Lets spawned tasks run until `done` holds. Background work on a real server needs real
/// time for its round trip, so after many yields this also waits, bounded to five seconds.
pub async fn settle(mut done: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    for i in 0u32.. {
        if done() {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "condition not reached in 5 s"
        );
        if i < 10_000 {
            tokio::task::yield_now().await;
        } else {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
}

/// 1,000 concurrent callers of one cold key run the loader once; cancelling the first caller
/// (while the load is running) does not cancel the load for the others.
pub async fn stampede_runs_one_load_and_survives_cancellation<S: KvStore + Clone>(
    store: S,
    ns: Namespace,
) {
    let cache: Cache<String, String> = Cache::builder().l2(store, ns).build().expect("cache");
    let loads = Arc::new(AtomicUsize::new(0));
    let gate = Arc::new(Semaphore::new(0));
    let (started_tx, mut started) = mpsc::unbounded_channel();
    let loader = {
        let loads = Arc::clone(&loads);
        let gate = Arc::clone(&gate);
        move |key: String| async move {
            loads.fetch_add(1, Ordering::SeqCst);
            let _ = started_tx.send(());
            let _permit = gate.acquire().await.expect("gate");
            Ok::<_, CacheError>(Some(format!("value of {key}")))
        }
    };
    let key = "cold".to_owned();

    let first = {
        let (cache, key, loader) = (cache.clone(), key.clone(), loader.clone());
        tokio::spawn(async move { cache.get_or_load(&key, loader).await })
    };
    started
        .recv()
        .await
        .expect("the first caller starts the load");
    first.abort();
    assert!(
        first.await.expect_err("aborted").is_cancelled(),
        "the first caller was cancelled mid-load"
    );

    let callers: Vec<_> = (0..1_000)
        .map(|_| {
            let (cache, key, loader) = (cache.clone(), key.clone(), loader.clone());
            tokio::spawn(async move { cache.get_or_load(&key, loader).await })
        })
        .collect();
    // Let the callers reach the load in flight before it may finish (on a current-thread
    // runtime all of them do; elsewhere a late one hits L1: either way one loader call).
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    gate.add_permits(1_000);
    for caller in callers {
        let value = caller.await.expect("caller task").expect("value");
        assert_eq!(value.as_deref(), Some("value of cold"));
    }
    assert_eq!(loads.load(Ordering::SeqCst), 1, "one loader call in all");
}

/// `get_many_or_load` of 100 cold keys (50 of them in L2) makes one L2 read and one batch
/// loader call.
pub async fn batch_reads_l2_once_and_loads_once<S: KvStore + Clone>(
    store: Probe<S>,
    ns: Namespace,
) {
    let writer: Cache<u32, String> = Cache::builder()
        .l2(store.inner.clone(), ns.clone())
        .build()
        .expect("writer");
    for i in (0..100).step_by(2) {
        writer.insert(i, format!("l2 {i}")).await.expect("insert");
    }
    let calls = Arc::clone(&store.calls);
    let cache: Cache<u32, String> = Cache::builder().l2(store, ns).build().expect("cache");
    let keys: Vec<u32> = (0..100).collect();
    let batches = Arc::new(AtomicUsize::new(0));
    let loader = {
        let batches = Arc::clone(&batches);
        move |keys: Vec<u32>| async move {
            batches.fetch_add(1, Ordering::SeqCst);
            assert_eq!(keys.len(), 50, "only the keys L2 lacks are loaded");
            Ok::<_, CacheError>(
                keys.into_iter()
                    .map(|k| (k, format!("loaded {k}")))
                    .collect::<HashMap<_, _>>(),
            )
        }
    };
    let values = cache
        .get_many_or_load(&keys, loader.clone())
        .await
        .expect("values");
    for (i, value) in values.iter().enumerate() {
        let expected = if i % 2 == 0 {
            format!("l2 {i}")
        } else {
            format!("loaded {i}")
        };
        assert_eq!(value.as_deref(), Some(expected.as_str()));
    }
    assert_eq!(batches.load(Ordering::SeqCst), 1, "one batch-loader call");
    assert_eq!(calls.reads(), 1, "one L2 read round trip");
    assert_eq!(calls.get_many.load(Ordering::SeqCst), 1);
    // The loaded values are written back in one round trip too; then L1 answers everything.
    settle(|| calls.set_if_newer.load(Ordering::SeqCst) == 1).await;
    let again = cache.get_many_or_load(&keys, loader).await.expect("values");
    assert_eq!(again, values);
    assert_eq!(batches.load(Ordering::SeqCst), 1);
    assert_eq!(calls.reads(), 1, "the second batch is all L1 hits");
}

/// Bytes that are not an envelope, under the cache's own key, read as a miss and are deleted.
pub async fn garbage_in_l2_is_a_miss<S: KvStore + Clone>(store: S, ns: Namespace) {
    let cache: Cache<String, String> = Cache::builder()
        .l2(store.clone(), ns.clone())
        .build()
        .expect("cache");
    let garbage: [&[u8]; 4] = [b"garbage", b"", b"hc\x01\x13", &[0xFF; 64]];
    for (i, bytes) in garbage.iter().enumerate() {
        let name = format!("g{i}");
        let key = ns.key(&name).expect("key");
        store
            .set(&key, Bytes::copy_from_slice(bytes), Duration::from_secs(60))
            .await
            .expect("write garbage");
        assert_eq!(cache.get(&name).await.expect("get"), None, "garbage {i}");
        // The delete runs in the background: wait for it, bounded.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while store.get(&key).await.expect("read back").is_some() {
            assert!(
                std::time::Instant::now() < deadline,
                "garbage {i} is deleted from L2"
            );
            tokio::task::yield_now().await;
        }

        store
            .set(&key, Bytes::copy_from_slice(bytes), Duration::from_secs(60))
            .await
            .expect("write garbage");
        let loaded = cache
            .get_or_load(&name, |k| async move {
                Ok::<_, CacheError>(Some(format!("fresh {k}")))
            })
            .await
            .expect("load");
        assert_eq!(loaded, Some(format!("fresh {name}")));
        cache.invalidate_local(&name);
    }
}

/// Bytes another program wrote under a key are older than any write of the cache: an
/// `insert` replaces them (and is read back from L2), and so does a `remove`'s tombstone,
/// whatever the bytes hold where an entry keeps its version.
pub async fn writes_replace_bytes_another_program_wrote<S: KvStore + Clone>(
    store: S,
    ns: Namespace,
) {
    let cache: Cache<String, String> = Cache::builder()
        .l2(store.clone(), ns.clone())
        .build()
        .expect("cache");
    let foreign: [&[u8]; 2] = [b"written by another program", &[0xFF; 64]];
    for (i, bytes) in foreign.iter().enumerate() {
        let name = format!("f{i}");
        let key = ns.key(&name).expect("key");
        store
            .set(&key, Bytes::copy_from_slice(bytes), Duration::from_secs(60))
            .await
            .expect("write foreign bytes");
        cache
            .insert(name.clone(), format!("new {i}"))
            .await
            .expect("insert");
        cache.invalidate_local(&name);
        assert_eq!(
            cache.get(&name).await.expect("get"),
            Some(format!("new {i}")),
            "foreign bytes {i} are replaced by an insert"
        );

        store
            .set(&key, Bytes::copy_from_slice(bytes), Duration::from_secs(60))
            .await
            .expect("write foreign bytes");
        cache.remove(&name).await.expect("remove");
        let held = store.get(&key).await.expect("read back");
        assert!(
            held.as_deref() != Some(*bytes),
            "foreign bytes {i} are replaced by a remove's tombstone"
        );
    }
}

/// An L2 entry as an instance of the previous version writes it: format 2, versioned to the
/// millisecond `created`, alive for a minute; the postcard encoding of `value`, or a tombstone.
pub fn format_2_entry(created: u64, value: Option<&str>) -> Vec<u8> {
    let mut entry = b"hc\x02".to_vec();
    // The header after its length: flags, codec, three times, schema.
    entry.extend_from_slice(&30u16.to_le_bytes());
    // Flags ("not found" and "tombstone" for a tombstone), then the postcard codec's id.
    entry.extend_from_slice(&[if value.is_some() { 0 } else { 3 }, 1]);
    for time in [created, created, created + 60_000] {
        entry.extend_from_slice(&time.to_le_bytes());
    }
    entry.extend_from_slice(&0u32.to_le_bytes());
    // No tags.
    entry.push(0);
    if let Some(value) = value {
        entry.extend_from_slice(&postcard::to_allocvec(value).expect("postcard"));
    }
    entry
}

/// During a rolling deploy, L2 entries of format 2 (versioned to the millisecond, without the
/// microseconds) keep their place by their millisecond, as between two format 2 entries: a
/// tombstone is not replaced by an older write of this version, and a write in an entry's
/// millisecond replaces it, whatever that entry holds where format 3 keeps the microseconds.
pub async fn format_2_entries_keep_their_place_by_their_millisecond<S: KvStore + Clone>(
    store: S,
    ns: Namespace,
) {
    let cache: Cache<String, String> = Cache::builder()
        .ttl(Duration::from_secs(60))
        .l2(store.clone(), ns.clone())
        .build()
        .expect("cache");
    // A second ago: a write time in the past counts as given.
    let now = SystemTime::now().duration_since(UNIX_EPOCH).expect("clock");
    let written = u64::try_from(now.as_millis()).expect("millis") - 1_000;
    let at = |micros| UNIX_EPOCH + Duration::from_millis(written) + Duration::from_micros(micros);
    // Its payload's first byte, the string's length (31), sits where format 3 keeps the
    // microseconds' high byte: read as microseconds, 7936.
    let old = "written by the previous version";
    let held = [
        ("tombstone", format_2_entry(written, None)),
        ("removed", format_2_entry(written, Some(old))),
        ("replaced", format_2_entry(written, Some(old))),
    ];
    for (name, entry) in &held {
        let decoded = headroom_cache::envelope::decode(entry).expect("a format 2 envelope");
        assert_eq!(decoded.tombstone, *name == "tombstone");
        let key = ns.key(name).expect("key");
        store
            .set(&key, Bytes::from(entry.clone()), Duration::from_secs(60))
            .await
            .expect("set");
    }

    let names = held.each_ref().map(|(name, _)| (*name).to_owned());
    let [tombstone, removed, replaced] = &names;
    cache
        .insert_at(
            tombstone.clone(),
            "older".into(),
            at(0) - Duration::from_millis(1),
        )
        .await
        .expect("insert_at");
    cache.remove_at(removed, at(500)).await.expect("remove_at");
    cache
        .insert_at(replaced.clone(), "new".into(), at(0))
        .await
        .expect("insert_at");
    let in_l2 = store.get(&ns.key(tombstone).expect("key")).await;
    assert_eq!(
        in_l2.expect("get").as_deref(),
        Some(&held[0].1[..]),
        "the tombstone stays in L2"
    );
    for name in &names {
        cache.invalidate_local(name);
    }
    assert_eq!(
        cache.get(tombstone).await.expect("get"),
        None,
        "the removal stays"
    );
    assert_eq!(
        cache.get(removed).await.expect("get"),
        None,
        "a removal in its millisecond"
    );
    assert_eq!(
        cache.get(replaced).await.expect("get").as_deref(),
        Some("new"),
        "a write in its millisecond"
    );
}

/// A store whose writes (`set`, `set_many`, `delete`) wait at a gate while `hold` is on.
#[derive(Clone, Debug)]
pub struct HoldWrites<S> {
    pub inner: S,
    pub hold: Arc<AtomicBool>,
    pub gate: Arc<Semaphore>,
    /// Writes that reached the gate.
    pub held: Arc<AtomicUsize>,
}

impl<S: KvStore> HoldWrites<S> {
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            hold: Arc::default(),
            gate: Arc::new(Semaphore::new(0)),
            held: Arc::default(),
        }
    }

    pub fn held(&self) -> usize {
        self.held.load(Ordering::SeqCst)
    }

    /// Lets every held write (and all later ones) through.
    pub fn release(&self) {
        self.hold.store(false, Ordering::SeqCst);
        self.gate.add_permits(1_000);
    }

    async fn wait(&self) {
        if self.hold.load(Ordering::SeqCst) {
            self.held.fetch_add(1, Ordering::SeqCst);
            self.gate.acquire().await.expect("gate").forget();
        }
    }
}

impl<S: KvStore> KvStore for HoldWrites<S> {
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
    async fn set_many(&self, entries: &[KvEntry]) -> Result<(), BackendError> {
        self.wait().await;
        self.inner.set_many(entries).await
    }
    async fn delete(&self, keys: &[Key]) -> Result<u64, BackendError> {
        self.wait().await;
        self.inner.delete(keys).await
    }
    async fn set_if_newer(
        &self,
        entries: &[KvEntry],
        version: VersionAt,
    ) -> Result<u64, BackendError> {
        self.wait().await;
        self.inner.set_if_newer(entries, version).await
    }
    async fn delete_if_eq(&self, key: &Key, expected: &[u8]) -> Result<bool, BackendError> {
        self.wait().await;
        self.inner.delete_if_eq(key, expected).await
    }
}

/// Returns once every task of a runtime with paused time has nothing left to do: tokio
/// advances paused time only when all tasks are idle.
pub async fn idle() {
    tokio::time::sleep(Duration::from_millis(1)).await;
}
