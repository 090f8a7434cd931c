//! The cache over the in-memory L2, on a manual clock.

mod common;

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use common::{Probe, settle};
use headroom_cache::{Cache, CacheError, CacheErrorKind, envelope};
use headroom_core::kv::KvStore;
use headroom_core::memory::MemoryKvStore;
use headroom_core::{Classify, Clock, ManualClock, Namespace};
use parking_lot::Mutex;
use tokio::sync::{Semaphore, mpsc};

const SEC: Duration = Duration::from_secs(1);

fn ns() -> Namespace {
    Namespace::new("test:cache").unwrap()
}

fn store(clock: &ManualClock) -> Probe<MemoryKvStore> {
    Probe::new(MemoryKvStore::builder().clock(clock.clock()).build())
}

/// A loader that counts its calls and answers `"{key}#{call}"`.
#[derive(Clone, Default)]
struct Counter(Arc<AtomicUsize>);

impl Counter {
    fn calls(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }

    fn loader(
        &self,
    ) -> impl FnOnce(String) -> std::future::Ready<Result<Option<String>, CacheError>> + Send + 'static
    {
        let calls = Arc::clone(&self.0);
        move |key| {
            let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
            std::future::ready(Ok(Some(format!("{key}#{n}"))))
        }
    }

    fn failing(
        &self,
    ) -> impl FnOnce(String) -> std::future::Ready<Result<Option<String>, std::io::Error>> + Send + 'static
    {
        let calls = Arc::clone(&self.0);
        move |_| {
            calls.fetch_add(1, Ordering::SeqCst);
            std::future::ready(Err(std::io::Error::other("database down")))
        }
    }
}

/// A store whose calls never answer.
#[derive(Debug, Clone)]
struct Hung;
impl KvStore for Hung {
    async fn get(
        &self,
        _: &headroom_core::Key,
    ) -> Result<Option<Bytes>, headroom_core::BackendError> {
        std::future::pending().await
    }
    async fn get_many(
        &self,
        _: &[headroom_core::Key],
    ) -> Result<Vec<Option<Bytes>>, headroom_core::BackendError> {
        std::future::pending().await
    }
    async fn set(
        &self,
        _: &headroom_core::Key,
        _: Bytes,
        _: Duration,
    ) -> Result<(), headroom_core::BackendError> {
        std::future::pending().await
    }
    async fn set_many(
        &self,
        _: &[headroom_core::kv::KvEntry],
    ) -> Result<(), headroom_core::BackendError> {
        std::future::pending().await
    }
    async fn delete(&self, _: &[headroom_core::Key]) -> Result<u64, headroom_core::BackendError> {
        std::future::pending().await
    }
}

fn key(name: &str) -> String {
    name.to_owned()
}

#[tokio::test]
async fn stampede_on_memory_l2() {
    common::stampede_runs_one_load_and_survives_cancellation(MemoryKvStore::new(), ns()).await;
}

#[tokio::test]
async fn batch_on_memory_l2() {
    common::batch_reads_l2_once_and_loads_once(Probe::new(MemoryKvStore::new()), ns()).await;
}

/// Keys are checked the same without L2 as with it: an empty one, or one over 1,024 bytes, is
/// refused with `InvalidKey` before anything is loaded or held, so L1's entry bound also
/// bounds the bytes its keys take, whatever keys callers send.
#[tokio::test]
async fn keys_l2_could_not_hold_are_refused_without_l2_too() {
    let cache: Cache<String, String> = Cache::builder()
        .negative_ttl(Duration::from_secs(60))
        .build()
        .unwrap();
    let loads = Arc::new(AtomicUsize::new(0));
    let loader = |loads: &Arc<AtomicUsize>| {
        let loads = Arc::clone(loads);
        move |_: String| async move {
            loads.fetch_add(1, Ordering::SeqCst);
            Ok::<_, CacheError>(None)
        }
    };
    for key in ["k".repeat(1_025), String::new()] {
        let error = cache.get_or_load(&key, loader(&loads)).await.unwrap_err();
        assert_eq!(error.kind(), CacheErrorKind::InvalidKey);
        let error = cache.insert(key.clone(), "v".into()).await.unwrap_err();
        assert_eq!(error.kind(), CacheErrorKind::InvalidKey);
        let error = cache
            .get_many_or_load(std::slice::from_ref(&key), |_| async {
                Ok::<_, CacheError>(HashMap::new())
            })
            .await
            .unwrap_err();
        assert_eq!(error.kind(), CacheErrorKind::InvalidKey);
        let error = cache.get(&key).await.unwrap_err();
        assert_eq!(error.kind(), CacheErrorKind::InvalidKey);
    }
    assert_eq!(loads.load(Ordering::SeqCst), 0, "nothing was loaded");
    let longest = "k".repeat(1_024);
    cache.insert(longest.clone(), "v".into()).await.unwrap();
    assert_eq!(cache.get(&longest).await.unwrap().as_deref(), Some("v"));
    // A removal with an invalid key fails and removes nothing, as with L2.
    let error = cache
        .remove_many(&[longest.clone(), String::new()])
        .await
        .unwrap_err();
    assert_eq!(error.kind(), CacheErrorKind::InvalidKey);
    assert_eq!(cache.get(&longest).await.unwrap().as_deref(), Some("v"));
}

#[tokio::test]
async fn garbage_on_memory_l2() {
    common::garbage_in_l2_is_a_miss(MemoryKvStore::new(), ns()).await;
}

#[tokio::test]
async fn foreign_bytes_on_memory_l2() {
    common::writes_replace_bytes_another_program_wrote(MemoryKvStore::new(), ns()).await;
}

#[tokio::test]
async fn values_expire_after_their_ttl_in_l1_and_l2() {
    let clock = ManualClock::new();
    let l2 = store(&clock);
    let cache: Cache<String, String> = Cache::builder()
        .clock(clock.clock())
        .ttl(10 * SEC)
        .l2(l2.clone(), ns())
        .build()
        .unwrap();
    let loads = Counter::default();
    let k = key("k");
    assert_eq!(
        cache
            .get_or_load(&k, loads.loader())
            .await
            .unwrap()
            .unwrap(),
        "k#1"
    );
    clock.advance(9 * SEC);
    assert_eq!(
        cache
            .get_or_load(&k, loads.loader())
            .await
            .unwrap()
            .unwrap(),
        "k#1"
    );
    cache.invalidate_local(&k);
    assert_eq!(
        cache.get(&k).await.unwrap().unwrap(),
        "k#1",
        "L2 still holds it"
    );
    clock.advance(SEC);
    assert_eq!(cache.get(&k).await.unwrap(), None, "expired in L1 and L2");
    assert_eq!(
        cache
            .get_or_load(&k, loads.loader())
            .await
            .unwrap()
            .unwrap(),
        "k#2"
    );
    assert_eq!(loads.calls(), 2);
}

#[tokio::test]
async fn per_entry_ttl_is_chosen_from_the_value() {
    let clock = ManualClock::new();
    let cache: Cache<String, String> = Cache::builder()
        .clock(clock.clock())
        .ttl(100 * SEC)
        .ttl_by(|value: &String| {
            if value.starts_with("short") {
                SEC
            } else {
                100 * SEC
            }
        })
        .build()
        .unwrap();
    cache.insert(key("a"), "short lived".into()).await.unwrap();
    cache.insert(key("b"), "long lived".into()).await.unwrap();
    clock.advance(2 * SEC);
    assert_eq!(cache.get(&key("a")).await.unwrap(), None);
    assert_eq!(
        cache.get(&key("b")).await.unwrap().as_deref(),
        Some("long lived")
    );
}

#[tokio::test]
async fn l1_never_outlives_the_remaining_l2_ttl() {
    let clock = ManualClock::new();
    let l2 = store(&clock);
    let options = |cache: &str| {
        Cache::<String, String>::builder()
            .name(cache)
            .clock(clock.clock())
            .ttl(60 * SEC)
            .l2(l2.clone(), ns())
    };
    let writer = options("writer").build().unwrap();
    writer.insert(key("k"), "v".into()).await.unwrap();
    clock.advance(50 * SEC);
    // A second instance reads the entry with 10 s left: its L1 copy must not live 60 s.
    let reader = options("reader").build().unwrap();
    assert_eq!(reader.get(&key("k")).await.unwrap().as_deref(), Some("v"));
    // An L2 hit fills L1 in a spawned task, after the caller has its value.
    tokio::task::yield_now().await;
    let reads = l2.calls.reads();
    clock.advance(9 * SEC);
    assert_eq!(reader.get(&key("k")).await.unwrap().as_deref(), Some("v"));
    assert_eq!(l2.calls.reads(), reads, "served by L1");
    clock.advance(SEC);
    assert_eq!(reader.get(&key("k")).await.unwrap(), None);
}

#[tokio::test]
async fn l1_max_ttl_sends_reads_back_to_l2() {
    let clock = ManualClock::new();
    let l2 = store(&clock);
    let cache: Cache<String, String> = Cache::builder()
        .clock(clock.clock())
        .ttl(60 * SEC)
        .l1_max_ttl(5 * SEC)
        .l2(l2.clone(), ns())
        .build()
        .unwrap();
    cache.insert(key("k"), "v".into()).await.unwrap();
    clock.advance(5 * SEC);
    let reads = l2.calls.reads();
    assert_eq!(cache.get(&key("k")).await.unwrap().as_deref(), Some("v"));
    assert_eq!(
        l2.calls.reads(),
        reads + 1,
        "L1 copy expired, L2 asked again"
    );
}

#[tokio::test]
async fn jitter_spreads_expiry_of_entries_loaded_together() {
    let clock = ManualClock::new();
    let cache: Cache<u32, u32> = Cache::builder()
        .clock(clock.clock())
        .ttl(10 * SEC)
        .ttl_jitter(10 * SEC)
        .build()
        .unwrap();
    let keys: Vec<u32> = (0..200).collect();
    cache
        .get_many_or_load(&keys, |keys| async move {
            Ok::<_, CacheError>(keys.into_iter().map(|k| (k, k)).collect::<HashMap<_, _>>())
        })
        .await
        .unwrap();
    let mut alive_after = Vec::new();
    let ms = Duration::from_millis(1);
    // Just before the TTL, at TTL + half the jitter, and at TTL + the whole jitter.
    for step in [SEC * 10 - ms, SEC * 5 + ms, SEC * 5] {
        clock.advance(step);
        let mut alive = 0;
        for k in &keys {
            alive += usize::from(cache.get(k).await.unwrap().is_some());
        }
        alive_after.push(alive);
    }
    assert_eq!(alive_after[0], 200, "nothing expires before the TTL");
    assert!(
        alive_after[1] > 20 && alive_after[1] < 180,
        "about half expire within the jitter: {alive_after:?}"
    );
    assert_eq!(alive_after[2], 0, "all expire by TTL + jitter");
}

#[tokio::test]
async fn not_found_is_cached_for_the_negative_ttl() {
    let clock = ManualClock::new();
    let l2 = store(&clock);
    let cache: Cache<String, String> = Cache::builder()
        .clock(clock.clock())
        .ttl(60 * SEC)
        .negative_ttl(5 * SEC)
        .l2(l2.clone(), ns())
        .build()
        .unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let missing = || {
        let calls = Arc::clone(&calls);
        move |_: String| async move {
            calls.fetch_add(1, Ordering::SeqCst);
            Ok::<Option<String>, CacheError>(None)
        }
    };
    assert_eq!(
        cache.get_or_load(&key("ghost"), missing()).await.unwrap(),
        None
    );
    assert_eq!(
        cache.get_or_load(&key("ghost"), missing()).await.unwrap(),
        None
    );
    assert_eq!(calls.load(Ordering::SeqCst), 1, "the miss is cached");
    // The negative entry is in L2 too, for other instances.
    let stored = l2
        .inner
        .get(&ns().key("ghost").unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(envelope::decode(&stored).unwrap().payload, None);
    clock.advance(5 * SEC);
    assert_eq!(
        cache.get_or_load(&key("ghost"), missing()).await.unwrap(),
        None
    );
    assert_eq!(
        calls.load(Ordering::SeqCst),
        2,
        "the negative TTL is shorter"
    );

    let uncached: Cache<String, String> = Cache::builder().build().unwrap();
    uncached
        .get_or_load(&key("ghost"), missing())
        .await
        .unwrap();
    uncached
        .get_or_load(&key("ghost"), missing())
        .await
        .unwrap();
    assert_eq!(
        calls.load(Ordering::SeqCst),
        4,
        "no negative TTL, no negative caching"
    );
}

/// A refresh that hangs answered its first callers with the old value while it was within
/// its TTL; a caller that comes after the TTL does not get that value (no fail-safe here),
/// even though the refresh is still in flight.
#[tokio::test(start_paused = true)]
async fn a_caller_joining_a_hung_refresh_after_the_ttl_gets_no_expired_value() {
    let clock = ManualClock::new();
    let cache: Cache<String, String> = Cache::builder()
        .clock(clock.clock())
        .ttl(10 * SEC)
        .soft_ttl(5 * SEC)
        .l2(store(&clock), ns())
        .build()
        .unwrap();
    let k = key("k");
    cache
        .get_or_load(&k, |_| async { Ok::<_, Infallible>(Some("v1".to_owned())) })
        .await
        .unwrap();
    clock.advance(6 * SEC);
    let hung = cache
        .get_or_load(&k, |_| {
            std::future::pending::<Result<Option<String>, Infallible>>()
        })
        .await
        .unwrap();
    assert_eq!(hung.as_deref(), Some("v1"), "within the TTL, the old value");
    // The refresh starts, answers its callers with the old value, and hangs in the loader.
    common::idle().await;
    clock.advance(5 * SEC);
    assert_eq!(cache.get(&k).await.unwrap(), None, "past the TTL");
    let served = cache
        .get_or_load(&k, |_| async { Ok::<_, Infallible>(Some("v2".to_owned())) })
        .await
        .unwrap();
    assert_ne!(served.as_deref(), Some("v1"), "an expired value was served");
}

/// The hung refresh that a later caller did not join ends after that caller's own load: its
/// older value does not replace the newer one in L1, and, with fail-safe, its failure does
/// not put the old value back.
#[tokio::test(start_paused = true)]
async fn a_refresh_overtaken_by_a_later_load_does_not_replace_its_value() {
    for fails in [false, true] {
        let clock = ManualClock::new();
        let cache: Cache<String, String> = Cache::builder()
            .clock(clock.clock())
            .ttl(10 * SEC)
            .soft_ttl(5 * SEC)
            .fail_safe_max_stale(if fails { 60 * SEC } else { Duration::ZERO })
            .fail_safe_throttle(30 * SEC)
            .l2(store(&clock), ns())
            .build()
            .unwrap();
        let k = key("k");
        cache
            .get_or_load(&k, |_| async {
                Ok::<_, std::io::Error>(Some("v1".to_owned()))
            })
            .await
            .unwrap();
        clock.advance(6 * SEC);
        let (release, released) = tokio::sync::oneshot::channel::<()>();
        cache
            .get_or_load(&k, move |_| async move {
                let _ = released.await;
                if fails {
                    return Err(std::io::Error::other("database down"));
                }
                Ok(Some("old".to_owned()))
            })
            .await
            .unwrap();
        common::idle().await;
        clock.advance(5 * SEC);
        let loaded = cache
            .get_or_load(&k, |_| async {
                Ok::<_, std::io::Error>(Some("v2".to_owned()))
            })
            .await
            .unwrap();
        assert_eq!(loaded.as_deref(), Some("v2"));
        release.send(()).unwrap();
        common::idle().await;
        assert_eq!(
            cache.get(&k).await.unwrap().as_deref(),
            Some("v2"),
            "the overtaken refresh replaced the newer value (failing: {fails})"
        );
    }
}

#[tokio::test]
async fn past_the_soft_ttl_a_hit_is_served_and_refreshed_in_the_background() {
    let clock = ManualClock::new();
    let cache: Cache<String, String> = Cache::builder()
        .clock(clock.clock())
        .ttl(10 * SEC)
        .soft_ttl(6 * SEC)
        .l2(store(&clock), ns())
        .build()
        .unwrap();
    let loads = Counter::default();
    let k = key("k");
    cache.get_or_load(&k, loads.loader()).await.unwrap();
    clock.advance(5 * SEC);
    assert_eq!(
        cache
            .get_or_load(&k, loads.loader())
            .await
            .unwrap()
            .unwrap(),
        "k#1"
    );
    assert_eq!(loads.calls(), 1, "fresh: no refresh");
    clock.advance(SEC);
    assert_eq!(
        cache
            .get_or_load(&k, loads.loader())
            .await
            .unwrap()
            .unwrap(),
        "k#1",
        "past the soft TTL the old value is served at once"
    );
    settle(|| loads.calls() == 2).await;
    let mut refreshed = None;
    for _ in 0..10_000 {
        refreshed = cache.get(&k).await.unwrap();
        if refreshed.as_deref() == Some("k#2") {
            break;
        }
        tokio::task::yield_now().await;
    }
    assert_eq!(refreshed.as_deref(), Some("k#2"), "the refresh replaced it");
    // The refreshed value has a full TTL again.
    clock.advance(9 * SEC);
    assert_eq!(cache.get(&k).await.unwrap().as_deref(), Some("k#2"));
}

#[tokio::test]
async fn past_the_hard_ttl_a_value_is_not_served() {
    let clock = ManualClock::new();
    let cache: Cache<String, String> = Cache::builder()
        .clock(clock.clock())
        .ttl(10 * SEC)
        .soft_ttl(5 * SEC)
        .build()
        .unwrap();
    let loads = Counter::default();
    let k = key("k");
    cache.get_or_load(&k, loads.loader()).await.unwrap();
    clock.advance(10 * SEC);
    assert_eq!(
        cache
            .get_or_load(&k, loads.loader())
            .await
            .unwrap()
            .unwrap(),
        "k#2"
    );
}

#[tokio::test]
async fn fail_safe_serves_a_stale_value_when_the_loader_fails() {
    let clock = ManualClock::new();
    let cache: Cache<String, String> = Cache::builder()
        .clock(clock.clock())
        .ttl(10 * SEC)
        .fail_safe_max_stale(60 * SEC)
        .l2(store(&clock), ns())
        .build()
        .unwrap();
    let loads = Counter::default();
    let k = key("k");
    cache.get_or_load(&k, loads.loader()).await.unwrap();
    clock.advance(30 * SEC);
    assert_eq!(
        cache.get(&k).await.unwrap(),
        None,
        "expired: not served by a plain read"
    );
    assert_eq!(
        cache
            .get_or_load(&k, loads.failing())
            .await
            .unwrap()
            .as_deref(),
        Some("k#1"),
        "the loader failed: stale value served"
    );
    // Only from L2 (another instance's view) the stale value is found too.
    cache.invalidate_local(&k);
    assert_eq!(
        cache
            .get_or_load(&k, loads.failing())
            .await
            .unwrap()
            .as_deref(),
        Some("k#1")
    );
    clock.advance(40 * SEC);
    let error = cache.get_or_load(&k, loads.failing()).await.unwrap_err();
    assert_eq!(
        error.kind(),
        CacheErrorKind::Loader,
        "beyond max staleness: the error"
    );
    assert_eq!(loads.calls(), 4);
}

/// Instance A, with fail-safe and a short L1 cap, and instance B, on one L2; loads of both
/// time out after a second, so a tombstone lives only a little longer.
fn fail_safe_and_other(clock: &ManualClock) -> (Cache<String, String>, Cache<String, String>) {
    let l2 = store(clock);
    fail_safe_and_other_on(clock, l2.clone(), l2)
}

/// [`fail_safe_and_other`], A reading L2 through `a_l2` and B through `b_l2`.
fn fail_safe_and_other_on(
    clock: &ManualClock,
    a_l2: impl KvStore,
    b_l2: impl KvStore,
) -> (Cache<String, String>, Cache<String, String>) {
    let a = Cache::builder()
        .clock(clock.clock())
        .ttl(60 * SEC)
        .l1_max_ttl(2 * SEC)
        .fail_safe_max_stale(60 * SEC)
        .loader_hard_timeout(SEC)
        .l2(a_l2, ns())
        .build()
        .unwrap();
    let b = Cache::builder()
        .clock(clock.clock())
        .ttl(60 * SEC)
        .loader_hard_timeout(SEC)
        .l2(b_l2, ns())
        .build()
        .unwrap();
    (a, b)
}

/// Reads `k` through a loader that fails, alone or in a batch.
async fn read_failing(
    cache: &Cache<String, String>,
    k: &String,
    batch: bool,
) -> Result<Option<String>, CacheError> {
    if batch {
        cache
            .get_many_or_load(std::slice::from_ref(k), |_keys: Vec<String>| async {
                Err::<HashMap<String, String>, _>(std::io::Error::other("database down"))
            })
            .await
            .map(|mut found| found.pop().flatten())
    } else {
        cache.get_or_load(k, Counter::default().failing()).await
    }
}

/// Instance B removes a key that A holds in L1. Past A's L1 cap, A's load reads B's tombstone
/// from L2: the key was removed after A's copy was made, so when the loader fails, A serves
/// no stale copy, and keeps none, so that none comes back once the tombstone is gone; for a
/// single read and for a batch alike.
#[tokio::test]
async fn fail_safe_serves_no_value_removed_after_it() {
    for batch in [false, true] {
        let clock = ManualClock::new();
        let (a, b) = fail_safe_and_other(&clock);
        let k = key("k");
        a.get_or_load(&k, Counter::default().loader())
            .await
            .unwrap();
        clock.advance(SEC);
        b.remove(&k).await.unwrap();
        // Past A's L1 cap, within the tombstone's life.
        clock.advance(Duration::from_millis(1_100));
        let served = read_failing(&a, &k, batch).await;
        assert!(
            served.is_err(),
            "a value removed after A's copy was served (batch: {batch}): {served:?}"
        );
        assert_eq!(a.get(&k).await.unwrap(), None, "and kept (batch: {batch})");
        clock.advance(5 * SEC);
        let served = read_failing(&a, &k, batch).await;
        assert!(
            served.is_err(),
            "served again past the tombstone (batch: {batch}): {served:?}"
        );
    }
}

/// The same after a clear or a tag invalidation made on B: A learns it from L2 in its load,
/// and its older L1 copy, hidden by it, is no fail-safe candidate either.
#[tokio::test]
async fn fail_safe_serves_no_value_hidden_after_it() {
    for (clear, batch) in [(false, false), (true, false), (false, true), (true, true)] {
        let clock = ManualClock::new();
        let (a, b) = fail_safe_and_other(&clock);
        let k = key("k");
        a.get_or_load_tagged(&k, &["team"], |k| async move {
            Ok::<_, Infallible>(Some(format!("{k}#1")))
        })
        .await
        .unwrap();
        clock.advance(SEC);
        if clear {
            b.clear().await;
        } else {
            b.invalidate_tag("team").await;
        }
        clock.advance(2 * SEC);
        let served = read_failing(&a, &k, batch).await;
        assert!(
            served.is_err(),
            "a value hidden after A's copy was served (clear: {clear}, batch: {batch}): {served:?}"
        );
        assert_eq!(
            a.get(&k).await.unwrap(),
            None,
            "and kept (clear: {clear}, batch: {batch})"
        );
    }
}

#[tokio::test]
async fn without_fail_safe_the_loader_error_is_returned() {
    let clock = ManualClock::new();
    let cache: Cache<String, String> = Cache::builder()
        .clock(clock.clock())
        .ttl(10 * SEC)
        .build()
        .unwrap();
    let loads = Counter::default();
    cache.get_or_load(&key("k"), loads.loader()).await.unwrap();
    clock.advance(10 * SEC);
    let error = cache
        .get_or_load(&key("k"), loads.failing())
        .await
        .unwrap_err();
    assert_eq!(error.kind(), CacheErrorKind::Loader);
    assert_eq!(
        std::error::Error::source(&error).unwrap().to_string(),
        "database down"
    );
}

/// A loader that blocks until released, telling when it starts.
fn gated(
    gate: &Arc<Semaphore>,
    started: &mpsc::UnboundedSender<()>,
    value: &str,
) -> impl FnOnce(String) -> futures_util::future::BoxFuture<'static, Result<Option<String>, CacheError>>
+ Send
+ 'static {
    let (gate, started, value) = (Arc::clone(gate), started.clone(), value.to_owned());
    move |_| {
        Box::pin(async move {
            let _ = started.send(());
            let _permit = gate.acquire().await.expect("gate");
            Ok(Some(value))
        })
    }
}

/// A load writes its value to L2 even when other keys were written meanwhile, as a burst of
/// writes does (thousands of keys: every write stripe of the instance is written), with
/// `get_or_load` and in a batch: only a change of the loaded key itself may keep it out.
/// Another instance then finds it in L2.
#[tokio::test]
async fn a_load_reaches_l2_while_other_keys_are_written() {
    for batch in [false, true] {
        let clock = ManualClock::new();
        let store = store(&clock);
        let (a, b) = two_instances(&store, &clock);
        let gate = Arc::new(Semaphore::new(0));
        let (started_tx, mut started) = mpsc::unbounded_channel();
        let k = key("k");
        let loader = gated(&gate, &started_tx, "loaded");
        let caller = {
            let (a, k) = (a.clone(), k.clone());
            tokio::spawn(async move {
                if batch {
                    let loader = |keys: Vec<String>| async move {
                        let value = loader(keys[0].clone()).await?;
                        Ok::<_, CacheError>(keys.into_iter().zip(value).collect())
                    };
                    let mut found = a.get_many_or_load(&[k], loader).await?;
                    Ok(found.pop().flatten())
                } else {
                    a.get_or_load(&k, loader).await
                }
            })
        };
        started.recv().await.unwrap();
        for n in 0..5_000 {
            a.insert(key(&format!("other-{n}")), "x".into())
                .await
                .unwrap();
        }
        gate.add_permits(1);
        assert_eq!(caller.await.unwrap().unwrap().as_deref(), Some("loaded"));
        let_loads_finish().await;
        let found = b.get(&k).await.unwrap();
        assert_eq!(found.as_deref(), Some("loaded"), "batch: {batch}");
    }
}

#[tokio::test]
async fn a_slow_loader_past_the_soft_timeout_serves_stale_and_updates_later() {
    let clock = ManualClock::new();
    let cache: Cache<String, String> = Cache::builder()
        .clock(clock.clock())
        .ttl(10 * SEC)
        .fail_safe_max_stale(60 * SEC)
        .loader_soft_timeout(Duration::from_millis(100))
        .build()
        .unwrap();
    let k = key("k");
    cache.insert(k.clone(), "old".into()).await.unwrap();
    clock.advance(20 * SEC);
    let gate = Arc::new(Semaphore::new(0));
    let (started_tx, mut started) = mpsc::unbounded_channel();
    let caller = {
        let (cache, k, loader) = (cache.clone(), k.clone(), gated(&gate, &started_tx, "new"));
        tokio::spawn(async move { cache.get_or_load(&k, loader).await })
    };
    started.recv().await.unwrap();
    clock.advance(Duration::from_millis(100));
    assert_eq!(
        caller.await.unwrap().unwrap().as_deref(),
        Some("old"),
        "stale after the soft timeout"
    );
    gate.add_permits(1);
    let mut value = None;
    for _ in 0..10_000 {
        value = cache.get(&k).await.unwrap();
        if value.is_some() {
            break;
        }
        tokio::task::yield_now().await;
    }
    assert_eq!(
        value.as_deref(),
        Some("new"),
        "the load finished in the background"
    );
}

#[tokio::test]
async fn a_loader_past_the_hard_timeout_fails_with_a_timeout() {
    let clock = ManualClock::new();
    let cache: Cache<String, String> = Cache::builder()
        .clock(clock.clock())
        .loader_hard_timeout(SEC)
        .build()
        .unwrap();
    let gate = Arc::new(Semaphore::new(0));
    let (started_tx, mut started) = mpsc::unbounded_channel();
    let caller = {
        let (cache, loader) = (cache.clone(), gated(&gate, &started_tx, "late"));
        tokio::spawn(async move { cache.get_or_load(&key("k"), loader).await })
    };
    started.recv().await.unwrap();
    clock.advance(SEC);
    let error = caller.await.unwrap().unwrap_err();
    assert_eq!(error.kind(), CacheErrorKind::LoaderTimeout);
    assert!(error.is_timeout());
    // The abandoned load left nothing behind: the next call loads again.
    let loads = Counter::default();
    assert_eq!(
        cache
            .get_or_load(&key("k"), loads.loader())
            .await
            .unwrap()
            .unwrap(),
        "k#1"
    );
}

#[tokio::test]
async fn a_panicking_loader_fails_its_callers_and_the_next_call_loads_again() {
    let cache: Cache<String, String> = Cache::builder().build().unwrap();
    let error = cache
        .get_or_load(&key("k"), |_| async {
            panic!("loader bug") as Result<Option<String>, CacheError>
        })
        .await
        .unwrap_err();
    assert_eq!(error.kind(), CacheErrorKind::LoaderPanicked);
    let loads = Counter::default();
    assert_eq!(
        cache
            .get_or_load(&key("k"), loads.loader())
            .await
            .unwrap()
            .unwrap(),
        "k#1"
    );
}

#[tokio::test]
async fn a_value_loaded_before_a_remove_is_not_cached_after_it() {
    let clock = ManualClock::new();
    let l2 = store(&clock);
    let cache: Cache<String, String> = Cache::builder()
        .clock(clock.clock())
        .l2(l2.clone(), ns())
        .build()
        .unwrap();
    let gate = Arc::new(Semaphore::new(0));
    let (started_tx, mut started) = mpsc::unbounded_channel();
    let k = key("k");
    let caller = {
        let (cache, k, loader) = (
            cache.clone(),
            k.clone(),
            gated(&gate, &started_tx, "before"),
        );
        tokio::spawn(async move { cache.get_or_load(&k, loader).await })
    };
    started.recv().await.unwrap();
    cache.remove(&k).await.unwrap();
    let removed = l2.calls.set_if_newer.load(Ordering::SeqCst);
    gate.add_permits(1);
    assert_eq!(caller.await.unwrap().unwrap().as_deref(), Some("before"));
    // Let the load task run to its end.
    for _ in 0..100 {
        tokio::task::yield_now().await;
    }
    let writes = l2.calls.set_if_newer.load(Ordering::SeqCst) - removed;
    assert_eq!(
        cache.get(&k).await.unwrap(),
        None,
        "neither L1 nor L2 was filled"
    );
    assert_eq!(writes, 0);
    let loads = Counter::default();
    assert_eq!(
        cache
            .get_or_load(&k, loads.loader())
            .await
            .unwrap()
            .unwrap(),
        "k#1"
    );
}

#[tokio::test]
async fn inserts_and_removes_write_through_to_l2() {
    let clock = ManualClock::new();
    let l2 = store(&clock);
    let cache: Cache<String, String> = Cache::builder()
        .clock(clock.clock())
        .l2(l2.clone(), ns())
        .build()
        .unwrap();
    let other: Cache<String, String> = Cache::builder()
        .clock(clock.clock())
        .l2(l2.clone(), ns())
        .build()
        .unwrap();
    cache.insert(key("k"), "v".into()).await.unwrap();
    assert_eq!(other.get(&key("k")).await.unwrap().as_deref(), Some("v"));
    cache.remove(&key("k")).await.unwrap();
    other.invalidate_local(&key("k"));
    assert_eq!(other.get(&key("k")).await.unwrap(), None);
    assert_eq!(cache.get(&key("k")).await.unwrap(), None);
}

#[tokio::test]
async fn l2_failures_never_reach_the_caller_and_the_breaker_pauses_l2() {
    let clock = ManualClock::new();
    let l2 = store(&clock);
    let cache: Cache<String, String> = Cache::builder()
        .clock(clock.clock())
        .l2(l2.clone(), ns())
        .l2_failure_threshold(3)
        .l2_cooldown(5 * SEC)
        .build()
        .unwrap();
    l2.calls.fail.store(true, Ordering::SeqCst);
    let loads = Counter::default();
    for i in 0..10 {
        let k = format!("k{i}");
        let value = cache.get_or_load(&k, loads.loader()).await.unwrap();
        assert_eq!(value, Some(format!("k{i}#{}", i + 1)));
        cache.insert(format!("w{i}"), "v".into()).await.unwrap();
        assert_eq!(
            cache.get(&format!("w{i}")).await.unwrap().as_deref(),
            Some("v")
        );
    }
    assert_eq!(
        l2.calls.l2_round_trips(),
        3,
        "after 3 failures L2 is left alone"
    );
    // L2 comes back; after the cool-down a probe finds it and calls resume.
    l2.calls.fail.store(false, Ordering::SeqCst);
    clock.advance(5 * SEC);
    let ok = l2.calls.ok.load(Ordering::SeqCst);
    cache
        .get_or_load(&key("after"), loads.loader())
        .await
        .unwrap();
    assert!(
        l2.calls.ok.load(Ordering::SeqCst) > ok,
        "reads reach L2 again"
    );
    cache.insert(key("x"), "y".into()).await.unwrap();
    assert!(
        l2.inner
            .get(&ns().key("x").unwrap())
            .await
            .unwrap()
            .is_some(),
        "writes reach L2 again"
    );
}

#[tokio::test]
async fn a_write_that_missed_l2_never_lets_the_old_l2_copy_be_served() {
    let clock = ManualClock::new();
    let l2 = store(&clock);
    let cache: Cache<String, String> = Cache::builder()
        .clock(clock.clock())
        .ttl(60 * SEC)
        .l1_max_ttl(SEC)
        .l2(l2.clone(), ns())
        .l2_failure_threshold(100)
        .l2_cooldown(5 * SEC)
        .build()
        .unwrap();
    let k = key("k");
    cache.insert(k.clone(), "old".into()).await.unwrap();
    l2.calls.fail.store(true, Ordering::SeqCst);
    cache.insert(k.clone(), "new".into()).await.unwrap();
    assert_eq!(cache.pending_l2_deletes(), 1);
    l2.calls.fail.store(false, Ordering::SeqCst);
    // L1's copy expires; the old L2 copy is still there but must not be served.
    clock.advance(SEC);
    assert_eq!(
        cache.get(&k).await.unwrap(),
        None,
        "the outdated L2 copy is skipped"
    );
    let loads = Counter::default();
    assert_eq!(
        cache
            .get_or_load(&k, loads.loader())
            .await
            .unwrap()
            .unwrap(),
        "k#1"
    );
    // The background delete runs after the cool-down and clears the backlog.
    clock.advance(5 * SEC);
    settle(|| cache.pending_l2_deletes() == 0).await;
}

#[tokio::test]
async fn pending_deletes_are_cleared_once_l2_answers() {
    let clock = ManualClock::new();
    let l2 = store(&clock);
    let cache: Cache<String, String> = Cache::builder()
        .clock(clock.clock())
        .l2(l2.clone(), ns())
        .l2_cooldown(5 * SEC)
        .build()
        .unwrap();
    cache.insert(key("k"), "old".into()).await.unwrap();
    l2.calls.fail.store(true, Ordering::SeqCst);
    let writes = l2.calls.set_if_newer.load(Ordering::SeqCst);
    cache.remove(&key("k")).await.unwrap();
    assert_eq!(cache.pending_l2_deletes(), 1);
    // The remove's write failed; the background delete fails too.
    settle(|| l2.calls.set_if_newer.load(Ordering::SeqCst) >= writes + 2).await;
    assert_eq!(cache.pending_l2_deletes(), 1, "still failing");
    l2.calls.fail.store(false, Ordering::SeqCst);
    clock.advance(5 * SEC);
    settle(|| cache.pending_l2_deletes() == 0).await;
    let other: Cache<String, String> = Cache::builder()
        .clock(clock.clock())
        .l2(l2.inner.clone(), ns())
        .build()
        .unwrap();
    assert_eq!(
        other.get(&key("k")).await.unwrap(),
        None,
        "L2 holds no value"
    );
}

#[tokio::test]
async fn a_pending_delete_cleared_late_keeps_a_later_removal_in_force() {
    // A's write misses L2, so its delete stays pending. Meanwhile B starts a load that reads
    // the database before C removes the key, and C's removal reaches L2. A's delete then lands,
    // and only after it does B's load write back. The value B read is older than the removal:
    // L2 must not take it.
    let clock = ManualClock::new();
    let shared = MemoryKvStore::builder().clock(clock.clock()).build();
    let instance = |l2: &Probe<MemoryKvStore>| -> Cache<String, String> {
        Cache::builder()
            .clock(clock.clock())
            .ttl(60 * SEC)
            .l1_max_ttl(SEC)
            .l2(l2.clone(), ns())
            .l2_cooldown(SEC)
            .build()
            .unwrap()
    };
    let (a_l2, b_l2) = (Probe::new(shared.clone()), Probe::new(shared.clone()));
    let (a, b, c) = (
        instance(&a_l2),
        instance(&b_l2),
        instance(&Probe::new(shared.clone())),
    );
    let k = key("k");
    a_l2.calls.fail.store(true, Ordering::SeqCst);
    a.insert(k.clone(), "a".into()).await.unwrap();
    assert_eq!(a.pending_l2_deletes(), 1);

    let gate = Arc::new(Semaphore::new(0));
    let (started_tx, mut started) = mpsc::unbounded_channel();
    let load = {
        let (b, k, loader) = (b.clone(), k.clone(), gated(&gate, &started_tx, "before"));
        tokio::spawn(async move { b.get_or_load(&k, loader).await })
    };
    started.recv().await.unwrap();
    clock.advance(Duration::from_millis(10));
    c.remove(&k).await.unwrap();

    a_l2.calls.fail.store(false, Ordering::SeqCst);
    clock.advance(SEC);
    settle(|| a.pending_l2_deletes() == 0).await;

    let writes = b_l2.calls.set_if_newer.load(Ordering::SeqCst);
    gate.add_permits(1);
    assert_eq!(load.await.unwrap().unwrap().as_deref(), Some("before"));
    settle(|| b_l2.calls.set_if_newer.load(Ordering::SeqCst) > writes).await;

    clock.advance(SEC);
    assert_eq!(
        instance(&Probe::new(shared)).get(&k).await.unwrap(),
        None,
        "the value loaded before the removal is not in L2"
    );
}

#[tokio::test]
async fn a_hung_l2_times_out() {
    let cache: Cache<String, String> = Cache::builder()
        .clock(Clock::system())
        .l2(Hung, ns())
        .l2_timeout(Duration::from_millis(50))
        .build()
        .unwrap();
    tokio::time::pause();
    let loads = Counter::default();
    assert_eq!(
        cache
            .get_or_load(&key("k"), loads.loader())
            .await
            .unwrap()
            .unwrap(),
        "k#1"
    );
    assert_eq!(cache.get(&key("other")).await.unwrap(), None);
}

#[tokio::test]
async fn bad_keys_and_oversized_values_get_typed_errors() {
    let cache: Cache<Vec<u8>, Vec<u8>> = Cache::builder()
        .l2(MemoryKvStore::new(), ns())
        .max_value_len(1_000)
        .build()
        .unwrap();
    let error = cache.insert(vec![b'k'; 2_000], vec![1]).await.unwrap_err();
    assert_eq!(error.kind(), CacheErrorKind::InvalidKey);
    assert_eq!(
        cache.get(&vec![]).await.unwrap_err().kind(),
        CacheErrorKind::InvalidKey
    );
    let error = cache
        .insert(b"k".to_vec(), vec![0; 2_000])
        .await
        .unwrap_err();
    assert_eq!(error.kind(), CacheErrorKind::ValueTooLarge);
    assert_eq!(
        cache.get(&b"k".to_vec()).await.unwrap(),
        None,
        "nothing was written"
    );
    assert!(!error.is_retryable());

    let bad = Cache::<String, String>::builder()
        .ttl(Duration::ZERO)
        .build();
    assert_eq!(bad.unwrap_err().reason(), "ttl must be greater than zero");
}

/// A cache keeps its hides and its fleet lock in namespaces beside its own
/// (`<namespace>.hidden`, `<namespace>.fleet-lock`): an L2 namespace ending like one of them
/// could be another cache's, whose entries would then overwrite that cache's hides or locks,
/// so it is refused at build.
#[tokio::test]
async fn l2_namespaces_beside_another_caches_are_refused() {
    let clock = ManualClock::new();
    for name in ["test:cache.hidden", "test:cache.fleet-lock"] {
        let built = Cache::<String, String>::builder()
            .l2(store(&clock), Namespace::new(name).unwrap())
            .build();
        let error = built.expect_err(name);
        assert!(
            error.reason().contains("reserved"),
            "{name}: {}",
            error.reason()
        );
    }
    let beside = Cache::<String, String>::builder()
        .l2(
            store(&clock),
            Namespace::new("test:cache.hidden-v2").unwrap(),
        )
        .build();
    assert!(beside.is_ok(), "only the exact endings are reserved");
}

/// Times past what the cache's clocks and L2's expiries count are refused at build (and by
/// `reconfigure_ttls`), rather than panicking or failing every write later.
#[tokio::test]
async fn times_too_long_to_count_are_configuration_errors() {
    type Builder = headroom_cache::CacheBuilder<String, String>;
    type Setter = fn(Builder, Duration) -> Builder;
    let too_long = Duration::MAX;
    let setters: [(&str, Setter); 7] = [
        ("ttl", |b, d| b.ttl(d)),
        ("soft_ttl", |b, d| b.soft_ttl(d)),
        ("ttl_jitter", |b, d| b.ttl_jitter(d)),
        ("fail_safe_max_stale", |b, d| b.fail_safe_max_stale(d)),
        ("fail_safe_throttle", |b, d| b.fail_safe_throttle(d)),
        ("l1_max_ttl", |b, d| b.l1_max_ttl(d)),
        ("fleet lock wait", |b, d| {
            b.l2(MemoryKvStore::new(), ns())
                .fleet_lock(headroom_core::memory::MemoryLeaseStore::new(), d)
        }),
    ];
    for (field, set) in setters {
        let built = set(Cache::builder(), too_long).build();
        let reason = built.err().map(|e| e.reason().to_owned());
        assert!(
            reason.as_deref().is_some_and(|r| r.contains(field)),
            "{field}: {reason:?}"
        );
    }
    let cache: Cache<String, String> = Cache::builder()
        .l2(MemoryKvStore::new(), ns())
        .build()
        .unwrap();
    let mut ttls = cache.ttls();
    ttls.ttl = too_long;
    assert!(cache.reconfigure_ttls(ttls).is_err());
}

#[cfg(feature = "json")]
#[tokio::test]
async fn a_value_written_with_another_codec_is_a_miss() {
    let l2 = MemoryKvStore::new();
    let json: Cache<String, String> = Cache::builder()
        .codec(headroom_cache::codec::Json)
        .l2(l2.clone(), ns())
        .build()
        .unwrap();
    let postcard: Cache<String, String> = Cache::builder().l2(l2.clone(), ns()).build().unwrap();
    json.insert(key("k"), "v".into()).await.unwrap();
    let stored = l2.get(&ns().key("k").unwrap()).await.unwrap().unwrap();
    assert_eq!(
        envelope::decode(&stored).unwrap().payload,
        Some(&b"\"v\""[..])
    );
    assert_eq!(postcard.get(&key("k")).await.unwrap(), None);
}

/// A codec change shipped with a new schema version, as the docs ask: during the rolling
/// deploy, each side reads the other's entries as misses and leaves them in L2.
#[cfg(feature = "json")]
#[tokio::test(start_paused = true)]
async fn a_codec_change_under_a_new_schema_version_leaves_the_other_sides_entries() {
    let l2 = MemoryKvStore::new();
    let old: Cache<String, String> = Cache::builder()
        .schema_version(1)
        .l2(l2.clone(), ns())
        .build()
        .unwrap();
    let new: Cache<String, String> = Cache::builder()
        .codec(headroom_cache::codec::Json)
        .schema_version(2)
        .l2(l2.clone(), ns())
        .build()
        .unwrap();
    old.insert(key("k"), "v".into()).await.unwrap();
    assert_eq!(new.get(&key("k")).await.unwrap(), None);
    // A delete of the other side's entry would run in the background: let it.
    common::idle().await;
    assert!(l2.get(&ns().key("k").unwrap()).await.unwrap().is_some());
    old.invalidate_local(&key("k"));
    assert_eq!(old.get(&key("k")).await.unwrap(), Some("v".into()));
}

#[tokio::test]
async fn a_write_dropped_while_l2_is_hung_leaves_the_key_pending() {
    let clock = ManualClock::new();
    let cache: Cache<String, String> = Cache::builder()
        .clock(clock.clock())
        .l2(Hung, ns())
        .build()
        .unwrap();
    tokio::select! {
        biased;
        _ = cache.insert(key("k"), "v".into()) => panic!("a hung L2 cannot complete the write"),
        () = tokio::task::yield_now() => {}
    }
    assert_eq!(
        cache.pending_l2_deletes(),
        1,
        "the dropped write left L2 unsure"
    );
    assert_eq!(
        cache.get(&key("k")).await.unwrap().as_deref(),
        Some("v"),
        "L1 has the value"
    );
}

#[tokio::test]
async fn single_reads_and_batches_join_each_other() {
    let cache: Cache<String, String> = Cache::builder().build().unwrap();
    let gate = Arc::new(Semaphore::new(0));
    let (started_tx, mut started) = mpsc::unbounded_channel();
    let batch_keys = Arc::new(Mutex::new(Vec::new()));
    let batch = {
        let (cache, gate, started_tx, batch_keys) = (
            cache.clone(),
            Arc::clone(&gate),
            started_tx.clone(),
            Arc::clone(&batch_keys),
        );
        tokio::spawn(async move {
            let keys = [key("a"), key("b")];
            cache
                .get_many_or_load(&keys, move |keys: Vec<String>| async move {
                    batch_keys.lock().extend(keys.iter().cloned());
                    let _ = started_tx.send(());
                    let _permit = gate.acquire().await.expect("gate");
                    Ok::<_, CacheError>(
                        keys.into_iter()
                            .map(|k| (k.clone(), format!("{k} from batch")))
                            .collect::<HashMap<_, _>>(),
                    )
                })
                .await
        })
    };
    started.recv().await.unwrap();
    // A single read of a key the batch is loading joins it.
    let loads = Counter::default();
    let single = {
        let (cache, loader) = (cache.clone(), loads.loader());
        tokio::spawn(async move { cache.get_or_load(&key("a"), loader).await })
    };
    // A single load in flight is joined by a later batch.
    let c_single = {
        let (cache, loader) = (cache.clone(), gated(&gate, &started_tx, "c from single"));
        tokio::spawn(async move { cache.get_or_load(&key("c"), loader).await })
    };
    started.recv().await.unwrap();
    let second_batch = {
        let cache = cache.clone();
        tokio::spawn(async move {
            cache
                .get_many_or_load(&[key("c"), key("d")], |keys: Vec<String>| async move {
                    assert_eq!(keys, [key("d")], "c is joined, not loaded again");
                    Ok::<_, CacheError>(
                        keys.into_iter()
                            .map(|k| (k, "d from batch".to_owned()))
                            .collect::<HashMap<_, _>>(),
                    )
                })
                .await
        })
    };
    gate.add_permits(2);
    let values = batch.await.unwrap().unwrap();
    assert_eq!(
        values,
        [
            Some("a from batch".to_owned()),
            Some("b from batch".to_owned())
        ]
    );
    assert_eq!(
        single.await.unwrap().unwrap().as_deref(),
        Some("a from batch")
    );
    assert_eq!(loads.calls(), 0, "the single read joined the batch");
    assert_eq!(
        c_single.await.unwrap().unwrap().as_deref(),
        Some("c from single")
    );
    let values = second_batch.await.unwrap().unwrap();
    assert_eq!(
        values,
        [
            Some("c from single".to_owned()),
            Some("d from batch".to_owned())
        ]
    );
    assert_eq!(*batch_keys.lock(), [key("a"), key("b")]);
}

#[tokio::test]
async fn each_caller_of_a_batch_gets_its_own_keys_values_in_order() {
    let cache: Cache<String, String> = Cache::builder().ttl(60 * SEC).build().unwrap();
    let gate = Arc::new(Semaphore::new(0));
    let (started_tx, mut started) = mpsc::unbounded_channel();
    let loaded = Arc::new(Mutex::new(Vec::new()));
    let batch = {
        let (cache, gate, loaded) = (cache.clone(), Arc::clone(&gate), Arc::clone(&loaded));
        tokio::spawn(async move {
            let keys = [key("a"), key("b"), key("a"), key("c"), key("d")];
            cache
                .get_many_or_load(&keys, move |keys: Vec<String>| async move {
                    loaded.lock().extend(keys.iter().cloned());
                    let _ = started_tx.send(());
                    let _permit = gate.acquire().await.expect("gate");
                    // "d" is not found.
                    Ok::<_, CacheError>(
                        keys.into_iter()
                            .filter(|k| k != "d")
                            .map(|k| (k.clone(), format!("{k}!")))
                            .collect::<HashMap<_, _>>(),
                    )
                })
                .await
        })
    };
    started.recv().await.unwrap();
    // Later callers join the batch for keys in the middle and at the end of it.
    let single = {
        let cache = cache.clone();
        tokio::spawn(async move {
            cache
                .get_or_load(&key("c"), Counter::default().loader())
                .await
        })
    };
    let joining = {
        let cache = cache.clone();
        tokio::spawn(async move {
            cache
                .get_many_or_load(&[key("d"), key("b"), key("c")], |_: Vec<String>| async {
                    Ok::<_, CacheError>(HashMap::new())
                })
                .await
        })
    };
    tokio::task::yield_now().await;
    gate.add_permits(1);
    let some = |v: &str| Some(v.to_owned());
    assert_eq!(
        batch.await.unwrap().unwrap(),
        [some("a!"), some("b!"), some("a!"), some("c!"), None]
    );
    assert_eq!(single.await.unwrap().unwrap(), some("c!"));
    assert_eq!(
        joining.await.unwrap().unwrap(),
        [None, some("b!"), some("c!")]
    );
    assert_eq!(
        *loaded.lock(),
        [key("a"), key("b"), key("c"), key("d")],
        "one load, each key once"
    );
}

#[tokio::test]
async fn a_full_pending_delete_backlog_distrusts_l2_for_one_entry_lifetime() {
    let clock = ManualClock::new();
    let l2 = store(&clock);
    let cache: Cache<String, String> = Cache::builder()
        .clock(clock.clock())
        .ttl(60 * SEC)
        .l1_max_ttl(SEC)
        .l2(l2.clone(), ns())
        .l2_failure_threshold(100)
        .l2_cooldown(5 * SEC)
        .l2_max_pending_deletes(1)
        .build()
        .unwrap();
    for k in ["a", "b"] {
        cache.insert(key(k), "old".into()).await.unwrap();
    }
    l2.calls.fail.store(true, Ordering::SeqCst);
    for k in ["a", "b"] {
        cache.insert(key(k), "new".into()).await.unwrap();
    }
    assert_eq!(
        cache.pending_l2_deletes(),
        1,
        "only one key fits the backlog"
    );
    l2.calls.fail.store(false, Ordering::SeqCst);
    clock.advance(5 * SEC);
    settle(|| cache.pending_l2_deletes() == 0).await;
    // "b" was never remembered and its old copy is still in L2: it must not be served.
    assert!(
        l2.inner
            .get(&ns().key("b").unwrap())
            .await
            .unwrap()
            .is_some()
    );
    assert_eq!(
        cache.get(&key("b")).await.unwrap(),
        None,
        "L2 is distrusted"
    );
    // Once every copy written before the failure has expired, L2 is read again.
    clock.advance(60 * SEC);
    cache.insert(key("c"), "fresh".into()).await.unwrap();
    cache.invalidate_local(&key("c"));
    assert_eq!(
        cache.get(&key("c")).await.unwrap().as_deref(),
        Some("fresh")
    );
}

#[tokio::test]
async fn a_dropped_batch_caller_does_not_cancel_its_load() {
    let cache: Cache<String, String> = Cache::builder().build().unwrap();
    let gate = Arc::new(Semaphore::new(0));
    let (started_tx, mut started) = mpsc::unbounded_channel();
    let caller = {
        let (cache, gate) = (cache.clone(), Arc::clone(&gate));
        tokio::spawn(async move {
            cache
                .get_many_or_load(&[key("a"), key("b")], move |keys: Vec<String>| async move {
                    let _ = started_tx.send(());
                    let _permit = gate.acquire().await.expect("gate");
                    Ok::<_, CacheError>(
                        keys.into_iter()
                            .map(|k| (k.clone(), k))
                            .collect::<HashMap<_, _>>(),
                    )
                })
                .await
        })
    };
    started.recv().await.unwrap();
    caller.abort();
    assert!(caller.await.unwrap_err().is_cancelled());
    // A reader arriving now joins the load that is still running.
    let loads = Counter::default();
    let joiner = {
        let (cache, loader) = (cache.clone(), loads.loader());
        tokio::spawn(async move { cache.get_or_load(&key("b"), loader).await })
    };
    tokio::task::yield_now().await;
    gate.add_permits(1);
    assert_eq!(joiner.await.unwrap().unwrap().as_deref(), Some("b"));
    assert_eq!(
        cache.get(&key("a")).await.unwrap().as_deref(),
        Some("a"),
        "the load filled L1"
    );
    assert_eq!(loads.calls(), 0);
}

/// A store that fails every call, or hangs on every call, as told.
#[derive(Clone, Debug, Default)]
struct Flaky {
    hang: Arc<std::sync::atomic::AtomicBool>,
}

impl Flaky {
    async fn answer<T>(&self) -> Result<T, headroom_core::BackendError> {
        if self.hang.load(Ordering::SeqCst) {
            std::future::pending().await
        } else {
            Err(headroom_core::BackendError::new(
                headroom_core::BackendErrorKind::Connection,
            ))
        }
    }
}

impl KvStore for Flaky {
    async fn get(
        &self,
        _: &headroom_core::Key,
    ) -> Result<Option<Bytes>, headroom_core::BackendError> {
        self.answer().await
    }
    async fn get_many(
        &self,
        _: &[headroom_core::Key],
    ) -> Result<Vec<Option<Bytes>>, headroom_core::BackendError> {
        self.answer().await
    }
    async fn set(
        &self,
        _: &headroom_core::Key,
        _: Bytes,
        _: Duration,
    ) -> Result<(), headroom_core::BackendError> {
        self.answer().await
    }
    async fn set_many(
        &self,
        _: &[headroom_core::kv::KvEntry],
    ) -> Result<(), headroom_core::BackendError> {
        self.answer().await
    }
    async fn delete(&self, _: &[headroom_core::Key]) -> Result<u64, headroom_core::BackendError> {
        self.answer().await
    }
}

#[tokio::test]
async fn a_probe_dropped_mid_call_lets_the_next_call_probe() {
    let clock = ManualClock::new();
    let store = Flaky::default();
    let probe = Probe::new(store.clone());
    let calls = Arc::clone(&probe.calls);
    let cache: Cache<String, String> = Cache::builder()
        .clock(clock.clock())
        .l2(probe, ns())
        .l2_failure_threshold(1)
        .l2_cooldown(5 * SEC)
        .build()
        .unwrap();
    // One failure opens the breaker; after the cool-down the next read is the probe.
    cache.get(&key("k")).await.unwrap();
    cache.get(&key("k")).await.unwrap();
    assert_eq!(calls.reads(), 1, "open: not called");
    clock.advance(5 * SEC);
    store.hang.store(true, Ordering::SeqCst);
    let k = key("k");
    tokio::select! {
        biased;
        _ = cache.get(&k) => panic!("a hung L2 cannot answer"),
        () = tokio::task::yield_now() => {}
    }
    assert_eq!(calls.reads(), 2, "the probe was sent, then dropped");
    store.hang.store(false, Ordering::SeqCst);
    cache.get(&key("k")).await.unwrap();
    assert_eq!(calls.reads(), 3, "the abandoned probe freed its slot");
}

#[test]
fn every_future_of_the_cache_is_send() {
    fn send<T: Send>(_: T) {}
    let cache: Cache<String, String> = Cache::builder().build().unwrap();
    let k = key("k");
    send(cache.get(&k));
    send(cache.get_or_load(&k, Counter::default().loader()));
    send(cache.get_many_or_load(&[], |_: Vec<String>| async {
        Ok::<_, CacheError>(HashMap::new())
    }));
    send(cache.insert(key("k"), "v".into()));
    send(cache.remove(&k));
}

#[tokio::test(start_paused = true)]
async fn a_read_while_a_remove_reaches_l2_does_not_bring_the_value_back() {
    let store = common::HoldWrites::new(MemoryKvStore::new());
    let cache: Cache<String, String> = Cache::builder().l2(store.clone(), ns()).build().unwrap();
    let k = key("k");
    cache.insert(k.clone(), "old".into()).await.unwrap();
    store.hold.store(true, Ordering::SeqCst);
    let remove = {
        let (cache, k) = (cache.clone(), k.clone());
        tokio::spawn(async move { cache.remove(&k).await })
    };
    settle(|| store.held() == 1).await;
    // The delete has not reached L2 yet: this read may still see the old copy.
    let _ = cache.get(&k).await.unwrap();
    store.release();
    remove.await.unwrap().unwrap();
    common::idle().await;
    assert_eq!(
        cache.get(&k).await.unwrap(),
        None,
        "the removed value stays removed"
    );
}

#[tokio::test]
async fn a_load_whose_l2_write_fails_leaves_no_pending_delete() {
    let clock = ManualClock::new();
    let l2 = store(&clock);
    let cache: Cache<String, String> = Cache::builder()
        .clock(clock.clock())
        .l2(l2.clone(), ns())
        .l2_failure_threshold(100)
        .build()
        .unwrap();
    let loads = Counter::default();
    l2.calls.fail.store(true, Ordering::SeqCst);
    cache
        .get_or_load(&key("one"), loads.loader())
        .await
        .unwrap();
    cache
        .get_many_or_load(&[key("a"), key("b")], |keys: Vec<String>| async move {
            Ok::<_, CacheError>(
                keys.into_iter()
                    .map(|k| (k.clone(), k))
                    .collect::<HashMap<_, _>>(),
            )
        })
        .await
        .unwrap();
    settle(|| l2.calls.set_if_newer.load(Ordering::SeqCst) == 2).await;
    l2.calls.fail.store(false, Ordering::SeqCst);
    assert_eq!(
        cache.pending_l2_deletes(),
        0,
        "only the user's own writes are tracked as pending"
    );
}

#[tokio::test(start_paused = true)]
async fn the_delete_of_corrupt_bytes_spares_the_value_loaded_over_them() {
    let store = MemoryKvStore::new();
    let cache: Cache<String, String> = Cache::builder().l2(store.clone(), ns()).build().unwrap();
    let full = ns().key("k").unwrap();
    store
        .set(&full, Bytes::from_static(b"garbage"), 60 * SEC)
        .await
        .unwrap();
    let loads = Counter::default();
    let value = cache.get_or_load(&key("k"), loads.loader()).await.unwrap();
    assert_eq!(value.as_deref(), Some("k#1"));
    common::idle().await;
    let stored = store
        .get(&full)
        .await
        .unwrap()
        .expect("the loaded value stays in L2");
    assert!(envelope::decode(&stored).unwrap().payload.is_some());
}

/// Instance A loads a key while instance B writes it: A's value, read from the source before
/// B's write, must not replace B's write (or delete) in L2.
#[tokio::test(start_paused = true)]
async fn a_value_loaded_before_a_write_elsewhere_never_replaces_it_in_l2() {
    let clock = ManualClock::new();
    let l2 = MemoryKvStore::builder().clock(clock.clock()).build();
    let instance = || -> Cache<String, String> {
        Cache::builder()
            .clock(clock.clock())
            .l2(l2.clone(), ns())
            .build()
            .unwrap()
    };
    let (a, b) = (instance(), instance());
    for (name, write_elsewhere, expected) in
        [("inserted", true, Some("new")), ("removed", false, None)]
    {
        let k = key(name);
        let gate = Arc::new(Semaphore::new(0));
        let (started_tx, mut started) = mpsc::unbounded_channel();
        let load = {
            let (a, k, loader) = (a.clone(), k.clone(), gated(&gate, &started_tx, "old"));
            tokio::spawn(async move { a.get_or_load(&k, loader).await })
        };
        started.recv().await.unwrap();
        clock.advance(Duration::from_millis(5));
        if write_elsewhere {
            b.insert(k.clone(), "new".into()).await.unwrap();
        } else {
            b.remove(&k).await.unwrap();
        }
        clock.advance(Duration::from_millis(5));
        gate.add_permits(1);
        assert_eq!(load.await.unwrap().unwrap().as_deref(), Some("old"));
        common::idle().await;
        assert_eq!(
            instance().get(&k).await.unwrap().as_deref(),
            expected,
            "{name}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn a_refresh_that_finds_nothing_removes_the_old_value() {
    let clock = ManualClock::new();
    let cache: Cache<String, String> = Cache::builder()
        .clock(clock.clock())
        .ttl(10 * SEC)
        .soft_ttl(5 * SEC)
        .fail_safe_max_stale(60 * SEC)
        .l2(MemoryKvStore::builder().clock(clock.clock()).build(), ns())
        .build()
        .unwrap();
    let k = key("k");
    let loads = Counter::default();
    cache.get_or_load(&k, loads.loader()).await.unwrap();
    clock.advance(6 * SEC);
    let gone = |_: String| async { Ok::<Option<String>, CacheError>(None) };
    // Past the soft TTL: served, and refreshed in the background; the source has no value now.
    assert_eq!(
        cache.get_or_load(&k, gone).await.unwrap().as_deref(),
        Some("k#1")
    );
    common::idle().await;
    assert_eq!(cache.get(&k).await.unwrap(), None, "the refresh removed it");
    clock.advance(10 * SEC);
    let error = cache.get_or_load(&k, loads.failing()).await;
    assert!(
        error.is_err(),
        "fail-safe never serves a value the source deleted: {error:?}"
    );
}

/// A load that finds nothing drops the old value from L1 also when other keys are written
/// while it runs: a write to another key says nothing of this key's copy, which fail-safe must
/// not serve once the tombstone has left L2.
#[tokio::test(start_paused = true)]
async fn a_load_that_finds_nothing_removes_the_old_value_while_other_keys_change() {
    let clock = ManualClock::new();
    let cache: Cache<String, String> = Cache::builder()
        .clock(clock.clock())
        .ttl(10 * SEC)
        .fail_safe_max_stale(60 * SEC)
        .l2(MemoryKvStore::builder().clock(clock.clock()).build(), ns())
        .build()
        .unwrap();
    let k = key("k");
    let loads = Counter::default();
    cache.get_or_load(&k, loads.loader()).await.unwrap();
    clock.advance(11 * SEC);
    let answer = Arc::new(tokio::sync::Notify::new());
    let gone = {
        let answer = Arc::clone(&answer);
        move |_: String| async move {
            answer.notified().await;
            Ok::<Option<String>, CacheError>(None)
        }
    };
    let load = {
        let (cache, k) = (cache.clone(), k.clone());
        tokio::spawn(async move { cache.get_or_load(&k, gone).await })
    };
    common::idle().await;
    // While the load waits for the source, other keys change on this instance.
    for i in 0..2_000 {
        cache.invalidate_local(&key(&format!("other-{i}")));
    }
    answer.notify_one();
    assert_eq!(load.await.unwrap().unwrap(), None);
    // Past the tombstone's life in L2: only L1 could still hold the old value.
    clock.advance(31 * SEC);
    let error = cache.get_or_load(&k, loads.failing()).await;
    assert!(
        error.is_err(),
        "fail-safe never serves a value the source deleted: {error:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_refreshed_entry_keeps_its_tags() {
    let clock = ManualClock::new();
    let cache: Cache<String, String> = Cache::builder()
        .clock(clock.clock())
        .ttl(10 * SEC)
        .soft_ttl(5 * SEC)
        .l2(MemoryKvStore::builder().clock(clock.clock()).build(), ns())
        .build()
        .unwrap();
    let k = key("k");
    cache
        .insert_tagged(k.clone(), "v".into(), &["t"])
        .await
        .unwrap();
    clock.advance(6 * SEC);
    let loads = Counter::default();
    cache.get_or_load(&k, loads.loader()).await.unwrap();
    common::idle().await;
    assert_eq!(loads.calls(), 1, "refreshed");
    clock.advance(Duration::from_millis(1));
    cache.invalidate_tag("t").await;
    assert_eq!(
        cache.get(&k).await.unwrap(),
        None,
        "the refreshed entry still carries its tag"
    );
}

#[tokio::test(start_paused = true)]
async fn a_loaded_entry_carries_the_tags_it_was_loaded_with() {
    let clock = ManualClock::new();
    let cache: Cache<String, String> = Cache::builder()
        .clock(clock.clock())
        .l2(MemoryKvStore::builder().clock(clock.clock()).build(), ns())
        .build()
        .unwrap();
    let loads = Counter::default();
    let value = cache
        .get_or_load_tagged(&key("k"), &["t"], loads.loader())
        .await
        .unwrap();
    assert_eq!(value.as_deref(), Some("k#1"));
    common::idle().await;
    clock.advance(Duration::from_millis(1));
    cache.invalidate_tag("t").await;
    assert_eq!(cache.get(&key("k")).await.unwrap(), None);
    let error = cache
        .get_or_load_tagged(&key("k"), &[""], loads.loader())
        .await
        .unwrap_err();
    assert_eq!(error.kind(), CacheErrorKind::InvalidTag);
}

#[tokio::test(start_paused = true)]
async fn after_serving_a_stale_value_the_failing_loader_rests_for_the_throttle() {
    let clock = ManualClock::new();
    let cache: Cache<String, String> = Cache::builder()
        .clock(clock.clock())
        .ttl(10 * SEC)
        .fail_safe_max_stale(600 * SEC)
        .fail_safe_throttle(30 * SEC)
        .l2(MemoryKvStore::builder().clock(clock.clock()).build(), ns())
        .build()
        .unwrap();
    let loads = Counter::default();
    let k = key("k");
    cache.get_or_load(&k, loads.loader()).await.unwrap();
    clock.advance(20 * SEC);
    for _ in 0..3 {
        let value = cache.get_or_load(&k, loads.failing()).await.unwrap();
        assert_eq!(value.as_deref(), Some("k#1"), "stale value served");
        common::idle().await;
    }
    assert_eq!(
        loads.calls(),
        2,
        "one failing call, then the stale value rests in L1"
    );
    clock.advance(30 * SEC);
    let value = cache.get_or_load(&k, loads.failing()).await.unwrap();
    assert_eq!(value.as_deref(), Some("k#1"));
    assert_eq!(
        loads.calls(),
        3,
        "after the throttle the loader is tried again"
    );
}

/// `l1_max_ttl` bounds how long an instance serves a value from L1 behind L2, a value resting
/// after a failed load too: past it, a value written elsewhere meanwhile is served.
#[tokio::test(start_paused = true)]
async fn a_resting_stale_value_is_served_from_l1_no_longer_than_l1_max_ttl() {
    let clock = ManualClock::new();
    let l2 = MemoryKvStore::builder().clock(clock.clock()).build();
    let instance = |l1_max_ttl: Option<Duration>| -> Cache<String, String> {
        let builder = Cache::builder()
            .clock(clock.clock())
            .ttl(10 * SEC)
            .fail_safe_max_stale(600 * SEC)
            .fail_safe_throttle(30 * SEC)
            .l2(l2.clone(), ns());
        match l1_max_ttl {
            Some(cap) => builder.l1_max_ttl(cap),
            None => builder,
        }
        .build()
        .unwrap()
    };
    let (a, b) = (instance(Some(SEC)), instance(None));
    let loads = Counter::default();
    let k = key("k");
    a.get_or_load(&k, loads.loader()).await.unwrap();
    clock.advance(20 * SEC);
    let value = a.get_or_load(&k, loads.failing()).await.unwrap();
    assert_eq!(value.as_deref(), Some("k#1"), "stale value served");
    common::idle().await;
    b.insert(k.clone(), "new".into()).await.unwrap();
    clock.advance(2 * SEC);
    assert_eq!(
        a.get(&k).await.unwrap().as_deref(),
        Some("new"),
        "the value written elsewhere, past l1_max_ttl"
    );
}

/// The same for a batch refreshing a value past its soft TTL: a failing source is tried once
/// per throttle, not on every batch request.
#[tokio::test(start_paused = true)]
async fn a_batch_refresh_whose_loader_fails_rests_for_the_throttle() {
    let clock = ManualClock::new();
    let cache: Cache<String, String> = Cache::builder()
        .clock(clock.clock())
        .ttl(10 * SEC)
        .soft_ttl(5 * SEC)
        .fail_safe_max_stale(60 * SEC)
        .fail_safe_throttle(30 * SEC)
        .l2(MemoryKvStore::builder().clock(clock.clock()).build(), ns())
        .build()
        .unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let k = key("k");
    cache
        .get_many_or_load(std::slice::from_ref(&k), |keys| async move {
            Ok::<_, CacheError>(keys.into_iter().map(|k| (k, "v1".to_owned())).collect())
        })
        .await
        .unwrap();
    clock.advance(6 * SEC);
    for _ in 0..3 {
        let calls = Arc::clone(&calls);
        let values = cache
            .get_many_or_load(std::slice::from_ref(&k), move |_| async move {
                calls.fetch_add(1, Ordering::SeqCst);
                Err::<HashMap<String, String>, _>(std::io::Error::other("database down"))
            })
            .await
            .unwrap();
        assert_eq!(values, vec![Some("v1".to_owned())]);
        common::idle().await;
    }
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "the failing source was tried again"
    );
}

#[tokio::test(start_paused = true)]
async fn a_hung_loader_is_abandoned_by_default() {
    let cache: Cache<String, String> = Cache::builder().build().unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let hang = {
        let calls = Arc::clone(&calls);
        move |_: String| async move {
            calls.fetch_add(1, Ordering::SeqCst);
            std::future::pending::<Result<Option<String>, CacheError>>().await
        }
    };
    for round in 1..=2 {
        let outcome = tokio::time::timeout(
            Duration::from_secs(3_600),
            cache.get_or_load(&key("k"), hang.clone()),
        )
        .await
        .expect("the load ends by itself");
        assert_eq!(outcome.unwrap_err().kind(), CacheErrorKind::LoaderTimeout);
        assert_eq!(
            calls.load(Ordering::SeqCst),
            round,
            "the abandoned load left no entry behind"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn an_entry_of_another_schema_version_is_a_miss_and_stays() {
    let l2 = MemoryKvStore::new();
    let old: Cache<String, String> = Cache::builder()
        .schema_version(1)
        .l2(l2.clone(), ns())
        .build()
        .unwrap();
    let new: Cache<String, (String, u32)> = Cache::builder()
        .schema_version(2)
        .l2(l2.clone(), ns())
        .build()
        .unwrap();
    old.insert(key("k"), "v".into()).await.unwrap();
    assert_eq!(new.get(&key("k")).await.unwrap(), None);
    common::idle().await;
    old.invalidate_local(&key("k"));
    assert_eq!(
        old.get(&key("k")).await.unwrap().as_deref(),
        Some("v"),
        "the other schema's entry was left in place"
    );
}

#[tokio::test(start_paused = true)]
async fn a_loaded_value_over_the_size_limit_is_served_but_not_kept() {
    let cache: Cache<String, Vec<u8>> = Cache::builder()
        .l2(MemoryKvStore::new(), ns())
        .max_value_len(1_000)
        .build()
        .unwrap();
    let big = |_: String| async { Ok::<_, CacheError>(Some(vec![7u8; 2_000])) };
    let value = cache.get_or_load(&key("k"), big).await.unwrap();
    assert_eq!(value.map(|v| v.len()), Some(2_000), "served");
    common::idle().await;
    assert!(
        cache.get(&key("k")).await.unwrap().is_none(),
        "kept neither in L1 nor L2"
    );
}

#[tokio::test]
async fn l1_is_bounded_by_bytes() {
    let cache: Cache<u32, Vec<u8>> = Cache::builder()
        .l1_max_bytes(64 * 1024)
        .l1_max_capacity(1_000_000)
        .build()
        .unwrap();
    for i in 0..1_000u32 {
        cache.insert(i, vec![1u8; 1_024]).await.unwrap();
    }
    let mut held = 0;
    for i in 0..1_000u32 {
        if cache.get(&i).await.unwrap().is_some() {
            held += 1;
        }
    }
    // Each entry weighs over 1 KiB: at most 64 fit.
    assert!(held <= 64, "{held} entries of 1 KiB held in 64 KiB");
    assert!(held > 0);
}

/// Two instances sharing an in-memory L2 and the fleet lock on `leases`, waiting `wait`.
fn two_with_a_fleet_lock(
    leases: impl headroom_core::lease::LeaseStore + Clone,
    wait: Duration,
) -> (Cache<String, String>, Cache<String, String>) {
    let l2 = MemoryKvStore::new();
    let instance = || -> Cache<String, String> {
        Cache::builder()
            .l2(l2.clone(), ns())
            .fleet_lock(leases.clone(), wait)
            .build()
            .unwrap()
    };
    (instance(), instance())
}

/// Two instances sharing a lease store: one loads a cold key, the other waits for its value
/// in L2 instead of calling the loader too.
#[tokio::test(start_paused = true)]
async fn a_fleet_lock_makes_one_instance_load_and_the_others_wait() {
    let (a, b) = two_with_a_fleet_lock(headroom_core::memory::MemoryLeaseStore::new(), 10 * SEC);
    let calls = Arc::new(AtomicUsize::new(0));
    let gate = Arc::new(Semaphore::new(0));
    let loader = {
        let (calls, gate) = (Arc::clone(&calls), Arc::clone(&gate));
        move |k: String| async move {
            calls.fetch_add(1, Ordering::SeqCst);
            let _permit = gate.acquire().await.expect("gate");
            Ok::<_, CacheError>(Some(format!("{k} loaded")))
        }
    };
    let first = {
        let (a, loader) = (a.clone(), loader.clone());
        tokio::spawn(async move { a.get_or_load(&key("k"), loader).await })
    };
    settle(|| calls.load(Ordering::SeqCst) == 1).await;
    let second = {
        let (b, loader) = (b.clone(), loader.clone());
        tokio::spawn(async move { b.get_or_load(&key("k"), loader).await })
    };
    // B finds the lock taken and waits; 2 s later A's load finishes.
    tokio::time::sleep(2 * SEC).await;
    gate.add_permits(10);
    assert_eq!(first.await.unwrap().unwrap().as_deref(), Some("k loaded"));
    assert_eq!(second.await.unwrap().unwrap().as_deref(), Some("k loaded"));
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "one loader call in the fleet"
    );
}

/// The wait for another instance's load is bounded: past it, the instance loads anyway.
#[tokio::test(start_paused = true)]
async fn a_fleet_lock_held_too_long_does_not_block_reads() {
    let (a, b) = two_with_a_fleet_lock(headroom_core::memory::MemoryLeaseStore::new(), 3 * SEC);
    let hung = tokio::spawn({
        let a = a.clone();
        async move {
            a.get_or_load(&key("k"), |_| {
                std::future::pending::<Result<Option<String>, CacheError>>()
            })
            .await
        }
    });
    common::idle().await;
    let started = tokio::time::Instant::now();
    let loads = Counter::default();
    assert_eq!(
        b.get_or_load(&key("k"), loads.loader())
            .await
            .unwrap()
            .as_deref(),
        Some("k#1")
    );
    let waited = started.elapsed();
    assert!(waited >= 3 * SEC && waited < 4 * SEC, "waited {waited:?}");
    hung.abort();
}

/// The soft timeout covers the wait for another instance's load as well as this instance's
/// own: with a stale value at hand, callers waiting on a fleet lock held by a hung load get it
/// after the soft timeout, not after the lock's whole wait.
#[tokio::test(start_paused = true)]
async fn the_soft_timeout_covers_the_wait_for_a_fleet_lock() {
    let (l2, leases) = (
        MemoryKvStore::new(),
        headroom_core::memory::MemoryLeaseStore::new(),
    );
    let instance = || -> Cache<String, String> {
        Cache::builder()
            .ttl(10 * SEC)
            .fail_safe_max_stale(60 * SEC)
            .loader_soft_timeout(Duration::from_millis(100))
            .l2(l2.clone(), ns())
            .fleet_lock(leases.clone(), 10 * SEC)
            .build()
            .unwrap()
    };
    let (a, b) = (instance(), instance());
    a.insert(key("k"), "v".into()).await.unwrap();
    b.get(&key("k")).await.unwrap();
    tokio::time::sleep(11 * SEC).await;
    let hung = tokio::spawn({
        let a = a.clone();
        async move {
            a.get_or_load(&key("k"), |_| {
                std::future::pending::<Result<Option<String>, CacheError>>()
            })
            .await
        }
    });
    common::idle().await;
    let started = tokio::time::Instant::now();
    let loads = Counter::default();
    assert_eq!(
        b.get_or_load(&key("k"), loads.loader())
            .await
            .unwrap()
            .as_deref(),
        Some("v")
    );
    let waited = started.elapsed();
    assert!(waited < SEC, "waited {waited:?} for the stale value");
    hung.abort();
}

/// With a fleet lock, a caller that does not join a hung refresh (its early answer expired)
/// does not wait for the lock that refresh holds: it loads at once.
#[tokio::test(start_paused = true)]
async fn a_caller_overtaking_a_hung_refresh_does_not_wait_for_its_fleet_lock() {
    let cache: Cache<String, String> = Cache::builder()
        .ttl(10 * SEC)
        .soft_ttl(5 * SEC)
        .l2(MemoryKvStore::new(), ns())
        .fleet_lock(headroom_core::memory::MemoryLeaseStore::new(), 10 * SEC)
        .build()
        .unwrap();
    let k = key("k");
    cache.insert(k.clone(), "v1".into()).await.unwrap();
    tokio::time::sleep(6 * SEC).await;
    cache
        .get_or_load(&k, |_| {
            std::future::pending::<Result<Option<String>, CacheError>>()
        })
        .await
        .unwrap();
    common::idle().await;
    tokio::time::sleep(5 * SEC).await;
    let started = tokio::time::Instant::now();
    let loads = Counter::default();
    let loaded = cache.get_or_load(&k, loads.loader()).await.unwrap();
    assert_eq!(loaded.as_deref(), Some("k#1"));
    assert!(started.elapsed() < SEC, "waited {:?}", started.elapsed());
}

/// A holder whose load finds nothing frees the lock: a waiting instance loads at once rather
/// than waiting out the whole bound.
#[tokio::test(start_paused = true)]
async fn a_fleet_lock_freed_without_a_value_ends_the_wait() {
    let (a, b) = two_with_a_fleet_lock(headroom_core::memory::MemoryLeaseStore::new(), 60 * SEC);
    let gate = Arc::new(Semaphore::new(0));
    let (started_tx, mut started) = mpsc::unbounded_channel();
    let first = tokio::spawn({
        let (a, gate) = (a.clone(), Arc::clone(&gate));
        async move {
            a.get_or_load(&key("k"), move |_| async move {
                let _ = started_tx.send(());
                let _permit = gate.acquire().await.expect("gate");
                Ok::<Option<String>, CacheError>(None)
            })
            .await
        }
    });
    started.recv().await.unwrap();
    let clock = tokio::time::Instant::now();
    let second = tokio::spawn({
        let b = b.clone();
        async move {
            b.get_or_load(&key("k"), |_| async {
                Ok::<_, CacheError>(Some("b".to_owned()))
            })
            .await
        }
    });
    tokio::time::sleep(SEC).await;
    gate.add_permits(1);
    assert_eq!(first.await.unwrap().unwrap(), None);
    assert_eq!(second.await.unwrap().unwrap().as_deref(), Some("b"));
    assert!(clock.elapsed() < 2 * SEC, "waited {:?}", clock.elapsed());
}

/// A lease store whose first `begin` takes the lease but answers only after an hour.
#[derive(Clone, Debug, Default)]
struct LateFirstBegin {
    store: headroom_core::memory::MemoryLeaseStore,
    begins: Arc<AtomicUsize>,
}

impl headroom_core::lease::LeaseStore for LateFirstBegin {
    async fn begin(
        &self,
        key: &headroom_core::Key,
        fingerprint: &[u8],
        lease: Duration,
        id: headroom_core::lease::BeginId,
    ) -> Result<headroom_core::lease::Begin, headroom_core::BackendError> {
        let begun = self.store.begin(key, fingerprint, lease, id).await;
        if self.begins.fetch_add(1, Ordering::SeqCst) == 0 {
            tokio::time::sleep(Duration::from_secs(3600)).await;
        }
        begun
    }
    async fn complete(
        &self,
        key: &headroom_core::Key,
        token: headroom_core::lease::FencingToken,
        outcome: Bytes,
        retention: Duration,
    ) -> Result<headroom_core::lease::Fenced, headroom_core::BackendError> {
        self.store.complete(key, token, outcome, retention).await
    }
    async fn extend(
        &self,
        key: &headroom_core::Key,
        token: headroom_core::lease::FencingToken,
        lease: Duration,
    ) -> Result<headroom_core::lease::Fenced, headroom_core::BackendError> {
        self.store.extend(key, token, lease).await
    }
    async fn release(
        &self,
        key: &headroom_core::Key,
        token: headroom_core::lease::FencingToken,
    ) -> Result<headroom_core::lease::Fenced, headroom_core::BackendError> {
        self.store.release(key, token).await
    }
    async fn release_begun(
        &self,
        key: &headroom_core::Key,
        id: headroom_core::lease::BeginId,
    ) -> Result<headroom_core::lease::Fenced, headroom_core::BackendError> {
        self.store.release_begun(key, id).await
    }
}

/// A fleet lock claim that timed out though the store took the lock does not hold the lock
/// for its lease: the lease it took is released, and another instance claims it at once.
#[tokio::test(start_paused = true)]
async fn a_fleet_lock_claim_that_timed_out_does_not_hold_the_lock() {
    let (a, b) = two_with_a_fleet_lock(LateFirstBegin::default(), 60 * SEC);
    // The claim times out; the instance loads without the lock and finds nothing.
    let found = a
        .get_or_load(&key("k"), |_| async {
            Ok::<Option<String>, CacheError>(None)
        })
        .await;
    assert_eq!(found.unwrap(), None);
    common::idle().await;
    let started = tokio::time::Instant::now();
    let found = b
        .get_or_load(&key("k"), |_| async {
            Ok::<_, CacheError>(Some("b".to_owned()))
        })
        .await;
    assert_eq!(found.unwrap().as_deref(), Some("b"));
    assert!(
        started.elapsed() < SEC,
        "waited {:?} for a lock nobody held",
        started.elapsed()
    );
}

#[tokio::test(start_paused = true)]
async fn a_batch_refresh_that_finds_nothing_removes_the_old_value() {
    let clock = ManualClock::new();
    let cache: Cache<String, String> = Cache::builder()
        .clock(clock.clock())
        .ttl(10 * SEC)
        .soft_ttl(5 * SEC)
        .fail_safe_max_stale(60 * SEC)
        .l2(MemoryKvStore::builder().clock(clock.clock()).build(), ns())
        .build()
        .unwrap();
    let k = key("k");
    cache.insert(k.clone(), "old".into()).await.unwrap();
    clock.advance(6 * SEC);
    let nothing = |_: Vec<String>| async { Ok::<_, CacheError>(HashMap::new()) };
    let values = cache
        .get_many_or_load(std::slice::from_ref(&k), nothing)
        .await
        .unwrap();
    assert_eq!(
        values,
        vec![Some("old".to_owned())],
        "served, refreshed in the background"
    );
    common::idle().await;
    assert_eq!(cache.get(&k).await.unwrap(), None, "the refresh removed it");
}

#[tokio::test(start_paused = true)]
async fn a_batch_refresh_keeps_the_entry_tags() {
    let clock = ManualClock::new();
    let cache: Cache<String, String> = Cache::builder()
        .clock(clock.clock())
        .ttl(10 * SEC)
        .soft_ttl(5 * SEC)
        .l2(MemoryKvStore::builder().clock(clock.clock()).build(), ns())
        .build()
        .unwrap();
    let k = key("k");
    cache
        .insert_tagged(k.clone(), "old".into(), &["t"])
        .await
        .unwrap();
    clock.advance(6 * SEC);
    let fresh = |keys: Vec<String>| async move {
        Ok::<_, CacheError>(
            keys.into_iter()
                .map(|k| (k, "new".to_owned()))
                .collect::<HashMap<_, _>>(),
        )
    };
    cache
        .get_many_or_load(std::slice::from_ref(&k), fresh)
        .await
        .unwrap();
    common::idle().await;
    clock.advance(Duration::from_millis(1));
    cache.invalidate_tag("t").await;
    assert_eq!(
        cache.get(&k).await.unwrap(),
        None,
        "the refreshed entry still carries its tag"
    );
}

/// Two instances write one key one after the other; the first one's L2 write is slow and lands
/// last. Every instance must end up reading the later write, not whichever landed last.
async fn later_write_wins_although_the_earlier_lands_last(later_is_remove: bool) {
    let clock = ManualClock::new();
    let shared = MemoryKvStore::builder().clock(clock.clock()).build();
    let slow = common::HoldWrites::new(shared.clone());
    let first: Cache<String, String> = Cache::builder()
        .clock(clock.clock())
        .l2(slow.clone(), ns())
        .build()
        .unwrap();
    let second: Cache<String, String> = Cache::builder()
        .clock(clock.clock())
        .l2(shared.clone(), ns())
        .build()
        .unwrap();
    let k = key("k");
    slow.hold.store(true, Ordering::SeqCst);
    let earlier = {
        let (first, k) = (first.clone(), k.clone());
        tokio::spawn(async move { first.insert(k, "earlier".into()).await })
    };
    settle(|| slow.held() == 1).await;
    clock.advance(Duration::from_millis(5));
    if later_is_remove {
        second.remove(&k).await.unwrap();
    } else {
        second.insert(k.clone(), "later".into()).await.unwrap();
    }
    slow.release();
    earlier.await.unwrap().unwrap();

    let reader: Cache<String, String> = Cache::builder()
        .clock(clock.clock())
        .l2(shared, ns())
        .build()
        .unwrap();
    let expected = (!later_is_remove).then(|| "later".to_owned());
    assert_eq!(
        reader.get(&k).await.unwrap(),
        expected,
        "a fresh instance reads the later write"
    );
}

#[tokio::test]
async fn an_earlier_insert_landing_last_in_l2_does_not_replace_a_later_one() {
    later_write_wins_although_the_earlier_lands_last(false).await;
}

#[tokio::test]
async fn an_earlier_insert_landing_last_in_l2_does_not_undo_a_later_remove() {
    later_write_wins_although_the_earlier_lands_last(true).await;
}

/// Writes ordered elsewhere (a database, a write-behind) pass the time they were made: L2
/// keeps the latest made, whatever the order of the calls, on any instance, to the
/// microsecond (every write here is made in one millisecond).
#[tokio::test]
async fn writes_at_a_given_time_are_ordered_in_l2_by_that_time() {
    let clock = ManualClock::new();
    let shared = MemoryKvStore::builder().clock(clock.clock()).build();
    let instance = || -> Cache<String, String> {
        Cache::builder()
            .clock(clock.clock())
            .ttl(60 * SEC)
            .l2(shared.clone(), ns())
            .build()
            .unwrap()
    };
    let (first, second, reader) = (instance(), instance(), instance());
    let k = key("k");
    let made = UNIX_EPOCH + Duration::from_millis(clock.clock().unix_millis());
    let at = |micros: u64| made + Duration::from_micros(micros);
    clock.advance(Duration::from_millis(10));
    let read = || {
        reader.invalidate_local(&k);
        reader.get(&k)
    };

    first
        .insert_at(k.clone(), "made at +300 µs".into(), at(300))
        .await
        .unwrap();
    second
        .insert_at(k.clone(), "made at +100 µs".into(), at(100))
        .await
        .unwrap();
    assert_eq!(
        read().await.unwrap().as_deref(),
        Some("made at +300 µs"),
        "an earlier write lands last"
    );
    second.remove_at(&k, at(200)).await.unwrap();
    assert_eq!(
        read().await.unwrap().as_deref(),
        Some("made at +300 µs"),
        "an earlier removal lands last"
    );
    second.remove_at(&k, at(400)).await.unwrap();
    assert_eq!(read().await.unwrap(), None, "a later removal");
    first
        .insert_at(k.clone(), "made at +500 µs".into(), at(500))
        .await
        .unwrap();
    assert_eq!(
        read().await.unwrap().as_deref(),
        Some("made at +500 µs"),
        "a later write"
    );
}

/// The writing instance's own L1 keeps the write L2 keeps: an earlier-made write that reaches
/// the cache last replaces neither a later one nor a later removal there either.
#[tokio::test]
async fn the_writers_l1_keeps_the_latest_made_write_as_l2_does() {
    let clock = ManualClock::new();
    let cache: Cache<String, String> = Cache::builder()
        .clock(clock.clock())
        .ttl(60 * SEC)
        .l2(MemoryKvStore::builder().clock(clock.clock()).build(), ns())
        .build()
        .unwrap();
    let k = key("k");
    let made = UNIX_EPOCH + Duration::from_millis(clock.clock().unix_millis());
    let at = |micros: u64| made + Duration::from_micros(micros);
    clock.advance(Duration::from_millis(10));

    cache
        .insert_at(k.clone(), "made at +300 µs".into(), at(300))
        .await
        .unwrap();
    cache
        .insert_at(k.clone(), "made at +100 µs".into(), at(100))
        .await
        .unwrap();
    assert_eq!(
        cache.get(&k).await.unwrap().as_deref(),
        Some("made at +300 µs"),
        "an earlier write lands last"
    );
    cache.remove_at(&k, at(400)).await.unwrap();
    cache
        .insert_at(k.clone(), "made at +350 µs".into(), at(350))
        .await
        .unwrap();
    assert_eq!(
        cache.get(&k).await.unwrap(),
        None,
        "an earlier write after a later removal"
    );
    cache
        .insert_at(k.clone(), "made at +500 µs".into(), at(500))
        .await
        .unwrap();
    cache.insert(k.clone(), "made now".into()).await.unwrap();
    assert_eq!(
        cache.get(&k).await.unwrap().as_deref(),
        Some("made now"),
        "later writes"
    );
}

/// A load takes L2's copy only when it is at least as new as the one this instance holds, to
/// the microsecond as in L2: an older copy written after L2 lost the newer one (a restart
/// without persistence) is loaded over, whether it is older by a millisecond or by a few
/// microseconds of the same one.
#[tokio::test]
async fn a_load_does_not_take_an_l2_copy_older_than_its_own() {
    for older_by in [Duration::from_millis(1), Duration::from_micros(400)] {
        let clock = ManualClock::new();
        let shared = MemoryKvStore::builder().clock(clock.clock()).build();
        let instance = || -> Cache<String, String> {
            Cache::builder()
                .clock(clock.clock())
                .ttl(60 * SEC)
                .fail_safe_max_stale(60 * SEC)
                .l2(shared.clone(), ns())
                .build()
                .unwrap()
        };
        let (holder, other) = (instance(), instance());
        let k = key("k");
        let made = UNIX_EPOCH + Duration::from_millis(clock.clock().unix_millis());
        let newer = made + Duration::from_micros(500);
        // Both writes' times in the past, where they count as given.
        clock.advance(Duration::from_millis(10));
        holder
            .insert_at(k.clone(), "newer".into(), newer)
            .await
            .unwrap();
        // L2 restarts empty; another instance then writes an older value.
        shared.delete(&[ns().key("k").unwrap()]).await.unwrap();
        clock.advance(30 * SEC);
        other
            .insert_at(k.clone(), "older".into(), newer - older_by)
            .await
            .unwrap();
        // The holder's copy has expired; L2's is fresh.
        clock.advance(31 * SEC);
        let loads = Counter::default();
        assert_eq!(
            holder
                .get_or_load(&k, loads.loader())
                .await
                .unwrap()
                .as_deref(),
            Some("k#1"),
            "older by {older_by:?}: loaded, not taken from L2"
        );
    }
}

#[tokio::test]
async fn format_2_entries_on_memory_l2() {
    common::format_2_entries_keep_their_place_by_their_millisecond(MemoryKvStore::new(), ns())
        .await;
}

/// A time past the cache's clock counts as now, and one from long ago as one TTL ago: the
/// entry's deadlines and its L2 lifetime still count from the call.
#[tokio::test]
async fn a_write_time_in_the_future_counts_as_now_and_one_long_ago_still_lives_its_ttl() {
    let clock = ManualClock::new();
    let l2 = store(&clock);
    let cache: Cache<String, String> = Cache::builder()
        .clock(clock.clock())
        .ttl(60 * SEC)
        .l2(l2.clone(), ns())
        .build()
        .unwrap();
    let (k, old) = (key("k"), key("old"));
    cache
        .insert_at(
            k.clone(),
            "future".into(),
            SystemTime::now() + Duration::from_secs(86_400),
        )
        .await
        .unwrap();
    cache.insert(k.clone(), "now".into()).await.unwrap();
    cache
        .insert_at(old.clone(), "ancient".into(), UNIX_EPOCH)
        .await
        .unwrap();
    cache.invalidate_local(&k);
    cache.invalidate_local(&old);
    assert_eq!(
        cache.get(&k).await.unwrap().as_deref(),
        Some("now"),
        "a write at the same microsecond replaces the one dated in the future"
    );
    clock.advance(59 * SEC);
    assert_eq!(cache.get(&old).await.unwrap().as_deref(), Some("ancient"));
    let stored = l2
        .inner
        .get(&ns().key("old").unwrap())
        .await
        .unwrap()
        .unwrap();
    let envelope = envelope::decode(&stored).unwrap();
    let now = clock.clock().unix_millis();
    assert_eq!(
        envelope.created_unix_ms,
        now - 119_000,
        "counted as made one TTL before the call"
    );
}

/// The pattern docs/cache.md gives for rows that several instances write: write the database,
/// then `remove`. Whatever order the two instances' cache calls take, every instance then
/// loads the row the database holds last.
#[tokio::test]
async fn writers_that_remove_after_the_database_write_leave_the_last_row_in_any_order() {
    let clock = ManualClock::new();
    let shared = MemoryKvStore::builder().clock(clock.clock()).build();
    let instance = || -> Cache<String, String> {
        Cache::builder()
            .clock(clock.clock())
            .l2(shared.clone(), ns())
            .build()
            .unwrap()
    };
    let (first, second, reader) = (instance(), instance(), instance());
    let database = Arc::new(parking_lot::Mutex::new("v0".to_owned()));
    let load = |database: Arc<parking_lot::Mutex<String>>| {
        move |_: String| async move { Ok::<_, CacheError>(Some(database.lock().clone())) }
    };
    let k = key("k");
    assert_eq!(
        reader
            .get_or_load(&k, load(Arc::clone(&database)))
            .await
            .unwrap()
            .as_deref(),
        Some("v0")
    );
    // The first instance writes the database, the second one after it; their cache calls
    // come in the other order.
    *database.lock() = "v1".to_owned();
    clock.advance(Duration::from_millis(1));
    *database.lock() = "v2".to_owned();
    second.remove(&k).await.unwrap();
    clock.advance(Duration::from_millis(1));
    first.remove(&k).await.unwrap();
    clock.advance(Duration::from_millis(1));
    reader.invalidate_local(&k);
    for cache in [&first, &second, &reader] {
        assert_eq!(
            cache
                .get_or_load(&k, load(Arc::clone(&database)))
                .await
                .unwrap()
                .as_deref(),
            Some("v2")
        );
    }
}

/// New lifetimes apply to what is written from then on; entries already cached keep their
/// deadlines, and an invalid configuration changes nothing.
#[tokio::test]
async fn reconfigured_ttls_apply_to_new_entries_only() {
    let clock = ManualClock::new();
    let cache: Cache<String, String> = Cache::builder()
        .clock(clock.clock())
        .ttl(10 * SEC)
        .l2(store(&clock), ns())
        .build()
        .unwrap();
    let loads = Counter::default();
    let (old, new) = (key("old"), key("new"));
    cache.get_or_load(&old, loads.loader()).await.unwrap();
    let mut longer = cache.ttls();
    longer.ttl = 30 * SEC;
    cache.reconfigure_ttls(longer.clone()).unwrap();
    cache.get_or_load(&new, loads.loader()).await.unwrap();
    clock.advance(10 * SEC);
    assert_eq!(cache.get(&old).await.unwrap(), None, "kept its 10 s");
    clock.advance(19 * SEC);
    assert_eq!(
        cache.get(&new).await.unwrap().unwrap(),
        "new#2",
        "lives 30 s"
    );
    clock.advance(SEC);
    assert_eq!(cache.get(&new).await.unwrap(), None);

    let mut invalid = longer.clone();
    invalid.ttl = Duration::ZERO;
    assert!(cache.reconfigure_ttls(invalid).is_err());
    assert_eq!(cache.ttls(), longer, "the lifetimes in force stay");
}

/// A cache without L2 keeps entries only in L1, whose lifetime is fixed when it is built: a
/// longer TTL is refused rather than cut short in silence. A shorter one is taken.
#[tokio::test]
async fn a_cache_without_l2_refuses_a_longer_ttl() {
    let cache: Cache<String, String> = Cache::builder().ttl(10 * SEC).build().unwrap();
    let mut ttls = cache.ttls();
    ttls.ttl = 20 * SEC;
    assert!(cache.reconfigure_ttls(ttls.clone()).is_err());
    assert_eq!(cache.ttls().ttl, 10 * SEC);
    ttls.ttl = 5 * SEC;
    cache.reconfigure_ttls(ttls).unwrap();
    assert_eq!(cache.ttls().ttl, 5 * SEC);
}

/// With L2, a longer TTL keeps entries there that long: another instance sharing the store
/// reads them.
#[tokio::test]
async fn a_longer_ttl_keeps_entries_in_l2_that_long() {
    let clock = ManualClock::new();
    let l2 = store(&clock);
    let build = || -> Cache<String, String> {
        Cache::builder()
            .clock(clock.clock())
            .ttl(10 * SEC)
            .l2(l2.clone(), ns())
            .build()
            .unwrap()
    };
    let (writer, reader) = (build(), build());
    let mut longer = writer.ttls();
    longer.ttl = 30 * SEC;
    writer.reconfigure_ttls(longer).unwrap();
    writer.insert(key("k"), "v".to_owned()).await.unwrap();
    clock.advance(29 * SEC);
    assert_eq!(reader.get(&key("k")).await.unwrap().as_deref(), Some("v"));
    clock.advance(SEC);
    assert_eq!(reader.get(&key("k")).await.unwrap(), None);
}

/// A store whose reads (`get`, `get_many`), while `hold` is set, read the values and then
/// wait for a permit before answering them: a read whose answer is slow to arrive.
#[derive(Clone, Debug)]
struct HeldRead {
    inner: MemoryKvStore,
    hold: Arc<std::sync::atomic::AtomicBool>,
    held: Arc<tokio::sync::Notify>,
    gate: Arc<Semaphore>,
}

impl HeldRead {
    fn new(inner: MemoryKvStore) -> Self {
        Self {
            inner,
            hold: Arc::default(),
            held: Arc::default(),
            gate: Arc::new(Semaphore::new(0)),
        }
    }

    async fn slow(&self) {
        if self.hold.load(Ordering::SeqCst) {
            self.held.notify_one();
            self.gate.acquire().await.expect("gate").forget();
        }
    }
}

impl KvStore for HeldRead {
    async fn get(
        &self,
        key: &headroom_core::Key,
    ) -> Result<Option<Bytes>, headroom_core::BackendError> {
        let read = self.inner.get(key).await;
        self.slow().await;
        read
    }
    async fn get_many(
        &self,
        keys: &[headroom_core::Key],
    ) -> Result<Vec<Option<Bytes>>, headroom_core::BackendError> {
        let read = self.inner.get_many(keys).await;
        self.slow().await;
        read
    }
    async fn set(
        &self,
        key: &headroom_core::Key,
        value: Bytes,
        ttl: Duration,
    ) -> Result<(), headroom_core::BackendError> {
        self.inner.set(key, value, ttl).await
    }
    async fn set_many(
        &self,
        entries: &[headroom_core::kv::KvEntry],
    ) -> Result<(), headroom_core::BackendError> {
        self.inner.set_many(entries).await
    }
    async fn delete(
        &self,
        keys: &[headroom_core::Key],
    ) -> Result<u64, headroom_core::BackendError> {
        self.inner.delete(keys).await
    }
    async fn set_if_newer(
        &self,
        entries: &[headroom_core::kv::KvEntry],
        version: headroom_core::kv::VersionAt,
    ) -> Result<u64, headroom_core::BackendError> {
        self.inner.set_if_newer(entries, version).await
    }
}

/// A read of A whose L2 answer (the value) arrives after A's load found the key removed on B
/// and dropped A's copy does not put the copy back into L1, where it would be served through
/// fail-safe once the tombstone is gone.
#[tokio::test]
async fn a_slow_read_does_not_bring_back_a_copy_a_load_found_removed() {
    let clock = ManualClock::new();
    let shared = MemoryKvStore::builder().clock(clock.clock()).build();
    let held = HeldRead::new(shared.clone());
    let (a, b) = fail_safe_and_other_on(&clock, held.clone(), shared);
    let k = key("k");
    a.get_or_load(&k, Counter::default().loader())
        .await
        .unwrap();
    clock.advance(Duration::from_millis(2_500));
    held.hold.store(true, Ordering::SeqCst);
    let slow = tokio::spawn({
        let (a, k) = (a.clone(), k.clone());
        async move { a.get(&k).await }
    });
    held.held.notified().await;
    held.hold.store(false, Ordering::SeqCst);
    b.remove(&k).await.unwrap();
    assert!(
        read_failing(&a, &k, false).await.is_err(),
        "the tombstone seen"
    );
    held.gate.add_permits(1);
    assert_eq!(slow.await.unwrap().unwrap().as_deref(), Some("k#1"));
    let_loads_finish().await;
    clock.advance(5 * SEC);
    let served = read_failing(&a, &k, false).await;
    assert!(served.is_err(), "the removed copy came back: {served:?}");
}

/// A read whose L2 answer arrives after a refresh found the key gone does not put the old
/// value back into L1: the removal holds for reads that began before it.
#[tokio::test]
async fn a_slow_read_does_not_bring_back_a_value_a_refresh_removed() {
    let clock = ManualClock::new();
    let store = HeldRead::new(MemoryKvStore::builder().clock(clock.clock()).build());
    let cache: Cache<String, String> = Cache::builder()
        .ttl(10 * SEC)
        .soft_ttl(5 * SEC)
        .l2(store.clone(), ns())
        .clock(clock.clock())
        .build()
        .unwrap();
    cache.insert(key("k"), "v1".into()).await.unwrap();
    cache.invalidate_local(&key("k"));
    clock.advance(6 * SEC);
    store.hold.store(true, Ordering::SeqCst);
    let slow = tokio::spawn({
        let cache = cache.clone();
        async move { cache.get(&key("k")).await }
    });
    store.held.notified().await;
    store.hold.store(false, Ordering::SeqCst);
    // The source no longer has the key: the refresh removes it.
    let served = cache
        .get_or_load(&key("k"), |_| async { Ok::<_, CacheError>(None) })
        .await
        .unwrap();
    assert_eq!(
        served.as_deref(),
        Some("v1"),
        "served stale while refreshing"
    );
    settle(|| cache.loads_in_flight() == 0).await;
    store.gate.add_permits(1);
    assert_eq!(slow.await.unwrap().unwrap().as_deref(), Some("v1"));
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    assert_eq!(cache.get(&key("k")).await.unwrap(), None);
}

/// A write that missed L2 keeps its key pending until L2 holds something at least as new: an
/// older write landing meanwhile does not settle it, so the older value is never read back
/// once L1's copy of the newer one expires.
#[tokio::test]
async fn an_older_write_landing_does_not_settle_a_newer_one_that_missed_l2() {
    let clock = ManualClock::new();
    let l2 = store(&clock);
    let cache: Cache<String, String> = Cache::builder()
        .clock(clock.clock())
        .ttl(60 * SEC)
        .l1_max_ttl(SEC)
        .l2(l2.clone(), ns())
        .l2_failure_threshold(100)
        .l2_cooldown(5 * SEC)
        .build()
        .unwrap();
    let k = key("k");
    let made = UNIX_EPOCH + Duration::from_millis(clock.clock().unix_millis());
    let at = |micros: u64| made + Duration::from_micros(micros);
    clock.advance(Duration::from_millis(10));
    cache
        .insert_at(k.clone(), "v0".into(), at(50))
        .await
        .unwrap();
    l2.calls.fail.store(true, Ordering::SeqCst);
    cache
        .insert_at(k.clone(), "v2".into(), at(200))
        .await
        .unwrap();
    assert_eq!(cache.pending_l2_deletes(), 1);
    // The write, then the drain's first try, both failed.
    settle(|| l2.calls.set_if_newer.load(Ordering::SeqCst) >= 3).await;
    l2.calls.fail.store(false, Ordering::SeqCst);
    cache
        .insert_at(k.clone(), "v1".into(), at(100))
        .await
        .unwrap();
    assert_eq!(cache.pending_l2_deletes(), 1, "v2 still missed L2");
    clock.advance(2 * SEC);
    settle(|| cache.pending_l2_deletes() == 0).await;
    assert_ne!(
        cache.get(&k).await.unwrap().as_deref(),
        Some("v1"),
        "a value older than this instance's own write"
    );
}

/// The soft timeout serves a stale value only while it is within its fail-safe window: one
/// whose window ends while the loader runs is not served, and the caller gets the loader's
/// timeout.
#[tokio::test]
async fn the_soft_timeout_serves_no_value_past_its_fail_safe_window() {
    let clock = ManualClock::new();
    let cache: Cache<String, String> = Cache::builder()
        .clock(clock.clock())
        .ttl(10 * SEC)
        .fail_safe_max_stale(10 * SEC)
        .loader_soft_timeout(Duration::from_millis(100))
        .loader_hard_timeout(2 * SEC)
        .build()
        .unwrap();
    let k = key("k");
    cache.insert(k.clone(), "old".into()).await.unwrap();
    // 50 ms before the value's window (TTL + max stale) ends.
    clock.advance(20 * SEC - Duration::from_millis(50));
    let gate = Arc::new(Semaphore::new(0));
    let (started_tx, mut started) = mpsc::unbounded_channel();
    let caller = {
        let (cache, k, loader) = (cache.clone(), k.clone(), gated(&gate, &started_tx, "new"));
        tokio::spawn(async move { cache.get_or_load(&k, loader).await })
    };
    started.recv().await.unwrap();
    clock.advance(Duration::from_millis(100));
    for _ in 0..100 {
        tokio::task::yield_now().await;
    }
    assert!(!caller.is_finished(), "served past its fail-safe window");
    clock.advance(2 * SEC);
    let error = caller.await.unwrap().unwrap_err();
    assert_eq!(error.kind(), CacheErrorKind::LoaderTimeout, "{error}");
}

/// A refresh started on a runtime that shuts down before running it leaves nothing in flight:
/// a cache shared by runtimes (a test's, a `block_on` call's) still loads the key later.
#[test]
fn a_load_whose_runtime_shut_down_leaves_nothing_in_flight() {
    let clock = ManualClock::new();
    let cache: Cache<String, String> = Cache::builder()
        .clock(clock.clock())
        .ttl(10 * SEC)
        .soft_ttl(5 * SEC)
        .build()
        .unwrap();
    let k = key("k");
    let runtime = || {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap()
    };
    let first = runtime();
    first
        .block_on(cache.insert(k.clone(), "old".into()))
        .unwrap();
    clock.advance(6 * SEC);
    // Served at once, past its soft TTL: the refresh is spawned, not run.
    let served = first
        .block_on(cache.get_or_load(&k, |_| async {
            Ok::<_, CacheError>(Some("new".to_owned()))
        }))
        .unwrap();
    assert_eq!(served.as_deref(), Some("old"));
    drop(first);
    assert_eq!(
        cache.loads_in_flight(),
        0,
        "a refresh that never ran is in flight"
    );
    clock.advance(10 * SEC);
    let loaded = runtime()
        .block_on(cache.get_or_load(&k, |_| async {
            Ok::<_, CacheError>(Some("again".to_owned()))
        }))
        .unwrap();
    assert_eq!(loaded.as_deref(), Some("again"));
}

/// A drain of pending L2 deletes started on a runtime that shuts down before running it does
/// not stop later drains: the next write that misses L2 starts one, which clears them all.
#[test]
fn a_drain_whose_runtime_shut_down_does_not_stop_later_drains() {
    let clock = ManualClock::new();
    let l2 = store(&clock);
    let cache: Cache<String, String> = Cache::builder()
        .clock(clock.clock())
        .ttl(60 * SEC)
        .l2(l2.clone(), ns())
        .l2_failure_threshold(100)
        .build()
        .unwrap();
    let runtime = || {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap()
    };
    l2.calls.fail.store(true, Ordering::SeqCst);
    let first = runtime();
    first.block_on(cache.insert(key("a"), "1".into())).unwrap();
    drop(first);
    assert_eq!(cache.pending_l2_deletes(), 1);
    runtime().block_on(async {
        cache.insert(key("b"), "2".into()).await.unwrap();
        assert_eq!(cache.pending_l2_deletes(), 2);
        l2.calls.fail.store(false, Ordering::SeqCst);
        for _ in 0..100 {
            if cache.pending_l2_deletes() == 0 {
                break;
            }
            clock.advance(SEC);
            for _ in 0..10 {
                tokio::task::yield_now().await;
            }
        }
        assert_eq!(cache.pending_l2_deletes(), 0, "no drain ran");
    });
}

/// The longest times a cache accepts still reach L2, whose stores keep at most
/// `MAX_DURATION`: an entry whose lifetime and fail-safe window add up past it, and the
/// tombstone of a removal from a cache whose entries live that long.
#[tokio::test]
async fn the_longest_times_a_cache_accepts_still_write_l2() {
    let long = headroom_core::MAX_DURATION;
    let l2 = MemoryKvStore::new();
    let stale: Cache<String, u64> = Cache::builder()
        .ttl(Duration::from_secs(60))
        .fail_safe_max_stale(long)
        .l2(l2.clone(), ns())
        .build()
        .unwrap();
    stale.insert("k".into(), 1).await.unwrap();
    assert!(l2.get(&ns().key("k").unwrap()).await.unwrap().is_some());

    let lasting: Cache<String, u64> = Cache::builder()
        .ttl(long)
        .l2(l2.clone(), ns())
        .build()
        .unwrap();
    lasting.insert("t".into(), 1).await.unwrap();
    lasting.remove(&"t".to_owned()).await.unwrap();
    let tombstone = l2.get(&ns().key("t").unwrap()).await.unwrap();
    assert!(tombstone.is_some(), "the removal is recorded in L2");
    assert_eq!(lasting.pending_l2_deletes(), 0);
}

/// A load whose source lags the cache (a write-behind: the cache has a write the database
/// does not yet) must not put the source's older value over a write of its key made while
/// the load read L2 (or while it loaded): neither in the writer's L1 nor in L2.
#[tokio::test]
async fn a_write_made_while_a_load_reads_l2_keeps_the_load_out() {
    let clock = ManualClock::new();
    let store = HeldRead::new(MemoryKvStore::builder().clock(clock.clock()).build());
    let (a, b) = two_instances(&store, &clock);
    store.hold.store(true, Ordering::SeqCst);
    let load = tokio::spawn({
        let a = a.clone();
        async move {
            let loader = |_| async { Ok::<_, CacheError>(Some("db-old".to_owned())) };
            a.get_or_load(&key("k"), loader).await
        }
    });
    store.held.notified().await;
    store.hold.store(false, Ordering::SeqCst);
    a.insert(key("k"), "new".into()).await.unwrap();
    store.gate.add_permits(1);
    load.await.unwrap().unwrap();
    let_loads_finish().await;
    assert_eq!(a.get(&key("k")).await.unwrap().as_deref(), Some("new"));
    assert_eq!(b.get(&key("k")).await.unwrap().as_deref(), Some("new"));
}

/// Likewise for a write already on its way to L2 when the load began (the writer's L1 had
/// lost the key), which lands while the loader runs.
#[tokio::test]
async fn a_write_landing_while_a_load_runs_keeps_the_load_out() {
    let clock = ManualClock::new();
    let store = common::HoldWrites::new(MemoryKvStore::builder().clock(clock.clock()).build());
    let (a, b) = two_instances(&store, &clock);
    store.hold.store(true, Ordering::SeqCst);
    let write = tokio::spawn({
        let a = a.clone();
        async move { a.insert(key("k"), "new".into()).await }
    });
    settle(|| store.held() == 1).await;
    // The writer's L1 would answer; as if it had evicted the key.
    a.invalidate_local(&key("k"));
    let gate = Arc::new(Semaphore::new(0));
    let (started_tx, mut started) = mpsc::unbounded_channel();
    let load = tokio::spawn({
        let (a, loader) = (a.clone(), gated(&gate, &started_tx, "db-old"));
        async move { a.get_or_load(&key("k"), loader).await }
    });
    started.recv().await.unwrap();
    store.release();
    write.await.unwrap().unwrap();
    gate.add_permits(1);
    load.await.unwrap().unwrap();
    let_loads_finish().await;
    assert_eq!(b.get(&key("k")).await.unwrap().as_deref(), Some("new"));
}

/// Two instances of a cache on one L2 store and clock.
fn two_instances<S: KvStore + Clone>(
    store: &S,
    clock: &ManualClock,
) -> (Cache<String, String>, Cache<String, String>) {
    let build = || {
        Cache::builder()
            .ttl(60 * SEC)
            .l2(store.clone(), ns())
            .clock(clock.clock())
            .build()
            .unwrap()
    };
    (build(), build())
}

/// Lets a load that answered finish writing L2 (in its own task, on this thread).
async fn let_loads_finish() {
    for _ in 0..100 {
        tokio::task::yield_now().await;
    }
}

/// Foreign bytes where a hide is kept in L2 (`<namespace>.hidden`: too short to hold a time,
/// or a time far ahead of every clock) are corrupt like any other L2 value. What they
/// replaced could have hidden anything written before they were found, so those entries stay
/// hidden; they are replaced by a hide of the time they were found, so that entries written
/// after are served from L2 again, to every instance.
#[tokio::test(start_paused = true)]
async fn corrupt_bytes_where_a_hide_is_kept_are_replaced_by_a_hide_of_when_they_were_found() {
    let hidden = Namespace::new("test:cache.hidden").unwrap();
    let far_ahead = u64::MAX / 2;
    let garbage: [(&str, Vec<u8>); 3] = [
        ("too short", b"junk".to_vec()),
        ("too long", b"garbage!!".to_vec()),
        ("far ahead", far_ahead.to_le_bytes().to_vec()),
    ];
    let hides: [(&str, &[&str]); 2] = [("c", &[]), ("t:team", &["team"])];
    for ((what, garbage), (hide, tags)) in garbage
        .iter()
        .flat_map(|bytes| hides.iter().map(move |hide| (bytes, hide)))
    {
        let case = format!("{what} at {hide}");
        let hide = hidden.key(hide.as_bytes()).unwrap();
        let clock = ManualClock::new();
        let store = MemoryKvStore::builder().clock(clock.clock()).build();
        let instance = || -> Cache<String, String> {
            Cache::builder()
                .clock(clock.clock())
                .l2(store.clone(), ns())
                .build()
                .unwrap()
        };
        let writer = instance();
        writer
            .insert_tagged(key("before"), "old".into(), tags)
            .await
            .unwrap();
        clock.advance(Duration::from_millis(5));
        store
            .set(&hide, Bytes::from(garbage.clone()), 60 * SEC)
            .await
            .unwrap();
        let found_at = clock.clock().unix_millis();

        let reader = instance();
        assert_eq!(
            reader.get(&key("before")).await.unwrap(),
            None,
            "{case}: an entry the lost hide could have covered is not served"
        );
        common::idle().await;
        let repaired = store.get(&hide).await.unwrap().expect("a hide is kept");
        let at = u64::from_le_bytes(
            repaired[..]
                .try_into()
                .unwrap_or_else(|_| panic!("{case}: the hide holds a time: {repaired:?}")),
        );
        assert!(
            at >= found_at && at < found_at + 1_000,
            "{case}: the hide is of when the bytes were found ({at} against {found_at})"
        );

        clock.advance(Duration::from_millis(5));
        reader
            .insert_tagged(key("after"), "new".into(), tags)
            .await
            .unwrap();
        for (who, cache) in [("another instance", instance()), ("the reader", reader)] {
            cache.invalidate_local(&key("after"));
            assert_eq!(
                cache.get(&key("after")).await.unwrap().as_deref(),
                Some("new"),
                "{case}: {who} serves an entry written after the repair from L2"
            );
        }
    }
}

/// A hide from an instance whose clock runs ahead, by less than an entry lives, is a hide,
/// not foreign bytes: it is honoured and kept.
#[tokio::test(start_paused = true)]
async fn a_hide_from_a_clock_ahead_is_honoured() {
    let hide = Namespace::new("test:cache.hidden")
        .unwrap()
        .key("c")
        .unwrap();
    let clock = ManualClock::new();
    let store = MemoryKvStore::builder().clock(clock.clock()).build();
    let cache: Cache<String, String> = Cache::builder()
        .clock(clock.clock())
        .ttl(600 * SEC)
        .l2(store.clone(), ns())
        .build()
        .unwrap();
    cache.insert(key("k"), "v".into()).await.unwrap();
    let ahead = (clock.clock().unix_millis() + 90_000).to_le_bytes();
    store
        .set(&hide, Bytes::copy_from_slice(&ahead), 60 * SEC)
        .await
        .unwrap();
    let reader: Cache<String, String> = Cache::builder()
        .clock(clock.clock())
        .ttl(600 * SEC)
        .l2(store.clone(), ns())
        .build()
        .unwrap();
    assert_eq!(reader.get(&key("k")).await.unwrap(), None, "hidden");
    common::idle().await;
    assert_eq!(
        store.get(&hide).await.unwrap().as_deref(),
        Some(&ahead[..]),
        "kept as it was"
    );
}
