//! Fail-safe over the in-memory L2, on tokio's paused clock: the throttle after a failed load,
//! and values fail-safe must no longer serve.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use headroom_cache::{Cache, CacheError, CacheErrorKind, InvalidationConfig};
use headroom_core::Namespace;
use headroom_core::bus::DynInvalidationBus;
use headroom_core::memory::{MemoryBus, MemoryKvStore};
use tokio::sync::{mpsc, oneshot};

const SEC: Duration = Duration::from_secs(1);

fn ns() -> Namespace {
    Namespace::new("test:fail-safe").unwrap()
}

fn key(name: &str) -> String {
    name.to_owned()
}

/// A cache with a 10 s TTL, an hour of fail-safe and a 30 s throttle.
fn failing_safe(l2: &MemoryKvStore) -> Cache<String, String> {
    Cache::builder()
        .ttl(10 * SEC)
        .fail_safe_max_stale(3_600 * SEC)
        .fail_safe_throttle(30 * SEC)
        .l2(l2.clone(), ns())
        .build()
        .unwrap()
}

/// A loader that fails, counting its calls.
#[derive(Clone, Default)]
struct Failing(Arc<AtomicUsize>);

impl Failing {
    fn calls(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }

    fn loader(
        &self,
    ) -> impl FnOnce(String) -> std::future::Ready<Result<Option<String>, std::io::Error>> + Send + 'static
    {
        let calls = Arc::clone(&self.0);
        move |_| {
            calls.fetch_add(1, Ordering::SeqCst);
            std::future::ready(Err(std::io::Error::other("database down")))
        }
    }

    /// Reads `k` through this loader, alone or in a batch.
    async fn read(
        &self,
        cache: &Cache<String, String>,
        k: &String,
        batch: bool,
    ) -> Result<Option<String>, CacheError> {
        if !batch {
            return cache.get_or_load(k, self.loader()).await;
        }
        let calls = Arc::clone(&self.0);
        cache
            .get_many_or_load(std::slice::from_ref(k), move |_| async move {
                calls.fetch_add(1, Ordering::SeqCst);
                Err::<HashMap<String, String>, _>(std::io::Error::other("database down"))
            })
            .await
            .map(|mut found| found.pop().flatten())
    }
}

/// Starts a read of `k` whose loader fails once the returned sender is used (or dropped);
/// returns when the loader runs.
async fn slow_failing_read(
    cache: &Cache<String, String>,
    k: &str,
) -> (
    oneshot::Sender<()>,
    tokio::task::JoinHandle<Result<Option<String>, CacheError>>,
) {
    let (started, mut on_started) = mpsc::unbounded_channel();
    let (fail, on_fail) = oneshot::channel::<()>();
    let (cache, k) = (cache.clone(), key(k));
    let read = tokio::spawn(async move {
        cache
            .get_or_load(&k, move |_| async move {
                let _ = started.send(());
                let _ = on_fail.await;
                Err::<Option<String>, _>(std::io::Error::other("database down"))
            })
            .await
    });
    on_started.recv().await.expect("the loader runs");
    (fail, read)
}

/// Writes to other keys while a load of `k` fails, as a fleet with steady writes makes
/// (thousands of keys: every write stripe of the instance is written), do not cancel the
/// rest of the stale value the failed load served: the failing source is not called again
/// within the throttle.
#[tokio::test(start_paused = true)]
async fn a_resting_stale_value_outlasts_writes_of_other_keys() {
    let cache = failing_safe(&MemoryKvStore::new());
    let k = key("k");
    cache.insert(k.clone(), "v1".into()).await.unwrap();
    tokio::time::advance(11 * SEC).await;
    let (fail, read) = slow_failing_read(&cache, &k).await;
    for i in 0..8_192 {
        cache.invalidate_local(&format!("other-{i}"));
    }
    for i in 0..64 {
        cache
            .insert(format!("written-{i}"), "x".into())
            .await
            .unwrap();
    }
    tokio::time::advance(5 * SEC).await;
    fail.send(()).unwrap();
    let served = read.await.unwrap().unwrap();
    assert_eq!(served.as_deref(), Some("v1"), "the stale value");
    common::idle().await;
    let failing = Failing::default();
    let served = failing.read(&cache, &k, false).await.unwrap();
    assert_eq!(served.as_deref(), Some("v1"));
    assert_eq!(
        failing.calls(),
        0,
        "the failing source was called again within the throttle"
    );
    assert_eq!(
        cache.get(&k).await.unwrap().as_deref(),
        Some("v1"),
        "by get too"
    );
}

/// A write, removal or invalidation of the key itself while its load fails ends the rest:
/// the next read asks the source again, and a removed value is not served.
#[tokio::test(start_paused = true)]
async fn a_change_of_the_key_during_a_failing_load_ends_the_rest() {
    for change in ["insert", "remove", "invalidate_local"] {
        let cache = failing_safe(&MemoryKvStore::new());
        let k = key("k");
        cache.insert(k.clone(), "v1".into()).await.unwrap();
        tokio::time::advance(11 * SEC).await;
        let (fail, read) = slow_failing_read(&cache, &k).await;
        match change {
            "insert" => cache.insert(k.clone(), "v2".into()).await.unwrap(),
            "remove" => cache.remove(&k).await.unwrap(),
            _ => cache.invalidate_local(&k),
        }
        fail.send(()).unwrap();
        let _ = read.await.unwrap();
        common::idle().await;
        let failing = Failing::default();
        let served = failing.read(&cache, &k, false).await;
        match change {
            "insert" => assert_eq!(served.unwrap().as_deref(), Some("v2"), "the write"),
            "remove" => {
                assert!(served.is_err(), "a removed value was served: {served:?}");
                assert_eq!(failing.calls(), 1, "the source is asked (after {change})");
            }
            _ => {
                assert_eq!(served.unwrap().as_deref(), Some("v1"), "fail-safe, from L2");
                assert_eq!(failing.calls(), 1, "the source is asked (after {change})");
            }
        }
    }
}

/// While L1 is bypassed (here: after a shutdown of invalidation; a lost or silent bus is
/// the same), a failing source is still tried once per throttle and key, for single reads
/// and batches. The throttle serves only what fail-safe would: a removal or a write made
/// elsewhere ends it, as does an invalidation of the key.
#[tokio::test(start_paused = true)]
async fn a_failing_source_rests_while_l1_is_bypassed() {
    for batch in [false, true] {
        let l2 = MemoryKvStore::new();
        let cache: Cache<String, String> = Cache::builder()
            .ttl(10 * SEC)
            .fail_safe_max_stale(3_600 * SEC)
            .fail_safe_throttle(30 * SEC)
            .l2(l2.clone(), ns())
            .invalidation(
                DynInvalidationBus::new(MemoryBus::new()),
                InvalidationConfig::default(),
            )
            .build()
            .unwrap();
        cache.shutdown().await;
        assert!(!cache.l1_in_use());
        let other = failing_safe(&l2);
        let k = key("k");
        cache.insert(k.clone(), "v1".into()).await.unwrap();
        tokio::time::advance(11 * SEC).await;
        let failing = Failing::default();
        for _ in 0..3 {
            let served = failing.read(&cache, &k, batch).await.unwrap();
            assert_eq!(served.as_deref(), Some("v1"), "stale (batch: {batch})");
            common::idle().await;
        }
        assert_eq!(
            failing.calls(),
            1,
            "the failing source was called on every request (batch: {batch})"
        );
        cache.invalidate_local(&k);
        let served = failing.read(&cache, &k, batch).await.unwrap();
        assert_eq!(served.as_deref(), Some("v1"), "stale (batch: {batch})");
        assert_eq!(
            failing.calls(),
            2,
            "invalidated: asked again (batch: {batch})"
        );
        common::idle().await;
        other.remove(&k).await.unwrap();
        let served = failing.read(&cache, &k, batch).await;
        assert!(
            served.is_err(),
            "a value removed elsewhere was served (batch: {batch}): {served:?}"
        );
        other.insert(k.clone(), "v2".into()).await.unwrap();
        tokio::time::advance(11 * SEC).await;
        let served = failing.read(&cache, &k, batch).await.unwrap();
        assert_eq!(
            served.as_deref(),
            Some("v2"),
            "written elsewhere (batch: {batch})"
        );
        let before = failing.calls();
        let served = failing.read(&cache, &k, batch).await.unwrap();
        assert_eq!(served.as_deref(), Some("v2"));
        assert_eq!(failing.calls(), before, "resting again (batch: {batch})");
        tokio::time::advance(31 * SEC).await;
        failing.read(&cache, &k, batch).await.unwrap();
        assert_eq!(
            failing.calls(),
            before + 1,
            "past the throttle (batch: {batch})"
        );
    }
}

/// A refresh whose value is over `max_value_len` is served but cached nowhere, and the older
/// copy it replaces is not served again: not from L2 by the next reads (which load the new
/// value), nor through fail-safe once the source fails.
#[tokio::test(start_paused = true)]
async fn a_refreshed_value_over_the_size_limit_is_not_replaced_by_the_older_copy() {
    let cache: Cache<String, Vec<u8>> = Cache::builder()
        .ttl(300 * SEC)
        .soft_ttl(60 * SEC)
        .fail_safe_max_stale(3_600 * SEC)
        .max_value_len(1_000)
        .l2(MemoryKvStore::new(), ns())
        .build()
        .unwrap();
    let k = key("k");
    let small = |_: String| async { Ok::<_, CacheError>(Some(vec![1u8; 10])) };
    cache.get_or_load(&k, small).await.unwrap();
    tokio::time::advance(61 * SEC).await;
    let loads = Arc::new(AtomicUsize::new(0));
    let big = || {
        let loads = Arc::clone(&loads);
        move |_: String| async move {
            loads.fetch_add(1, Ordering::SeqCst);
            Ok::<_, CacheError>(Some(vec![2u8; 2_000]))
        }
    };
    let mut served = Vec::new();
    for _ in 0..3 {
        let value = cache.get_or_load(&k, big()).await.unwrap().unwrap();
        served.push(value.len());
        common::idle().await;
    }
    assert_eq!(
        served,
        [10, 2_000, 2_000],
        "the old value, then the refreshed one ({} loads)",
        loads.load(Ordering::SeqCst)
    );
    assert_eq!(cache.get(&k).await.unwrap(), None, "cached nowhere");
    tokio::time::advance(300 * SEC).await;
    let served = cache
        .get_or_load(&k, |_| async {
            Err::<Option<Vec<u8>>, _>(std::io::Error::other("database down"))
        })
        .await;
    assert!(
        served.is_err(),
        "the replaced value was served through fail-safe: {served:?}"
    );
}

/// During a rolling deploy that bumps the schema version, a removal made by an instance of
/// the old schema counts for the new one too: its older copy is not served through
/// fail-safe. A tombstone carries no value, so its meaning does not depend on the schema.
#[tokio::test(start_paused = true)]
async fn fail_safe_serves_no_value_removed_by_another_schema_version() {
    let l2 = MemoryKvStore::new();
    let build = |schema: u32| -> Cache<String, String> {
        Cache::builder()
            .ttl(10 * SEC)
            .fail_safe_max_stale(3_600 * SEC)
            .schema_version(schema)
            .l2(l2.clone(), ns())
            .build()
            .unwrap()
    };
    let (old, new) = (build(1), build(2));
    let k = key("k");
    new.get_or_load(&k, |_| async { Ok::<_, CacheError>(Some("v".to_owned())) })
        .await
        .unwrap();
    tokio::time::advance(11 * SEC).await;
    old.remove(&k).await.unwrap();
    let served = Failing::default().read(&new, &k, false).await;
    assert!(
        served.is_err(),
        "a value removed since was served: {served:?}"
    );
    assert_eq!(
        served.unwrap_err().kind(),
        CacheErrorKind::Loader,
        "the loader's error"
    );
}
