//! The cache over real Redis (standalone and cluster) started by the testkit.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::{Probe, settle};
use headroom_cache::{Cache, CacheError, CacheKey};
use headroom_core::kv::KvStore;
use headroom_core::{ManualClock, Namespace};
use headroom_redis::{Redis, RedisConfig, RedisKvStore};
use headroom_testkit::{RedisServer, shared_cluster, shared_server, unique_namespace};

async fn standalone() -> RedisKvStore {
    let redis = Redis::connect(RedisConfig::standalone(shared_server().url()))
        .await
        .expect("connect");
    RedisKvStore::new(redis)
}

async fn cluster() -> RedisKvStore {
    let redis = Redis::connect(RedisConfig::cluster(shared_cluster().urls()))
        .await
        .expect("connect");
    RedisKvStore::new(redis)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stampede_on_redis() {
    common::stampede_runs_one_load_and_survives_cancellation(
        standalone().await,
        unique_namespace("stampede"),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stampede_on_redis_cluster() {
    common::stampede_runs_one_load_and_survives_cancellation(
        cluster().await,
        unique_namespace("stampede"),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_on_redis() {
    common::batch_reads_l2_once_and_loads_once(
        Probe::new(standalone().await),
        unique_namespace("batch"),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_on_redis_cluster() {
    common::batch_reads_l2_once_and_loads_once(
        Probe::new(cluster().await),
        unique_namespace("batch"),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_redis() {
    common::garbage_in_l2_is_a_miss(standalone().await, unique_namespace("garbage")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_redis_cluster() {
    common::garbage_in_l2_is_a_miss(cluster().await, unique_namespace("garbage")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_bytes_on_redis() {
    common::writes_replace_bytes_another_program_wrote(
        standalone().await,
        unique_namespace("foreign"),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_bytes_on_redis_cluster() {
    common::writes_replace_bytes_another_program_wrote(
        cluster().await,
        unique_namespace("foreign"),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn format_2_entries_on_redis() {
    common::format_2_entries_keep_their_place_by_their_millisecond(
        standalone().await,
        unique_namespace("format-2"),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn format_2_entries_on_redis_cluster() {
    common::format_2_entries_keep_their_place_by_their_millisecond(
        cluster().await,
        unique_namespace("format-2"),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_written_by_redis_cli_is_a_miss() {
    let ns = unique_namespace("cli");
    let cache: Cache<String, String> = Cache::builder()
        .l2(standalone().await, ns.clone())
        .build()
        .unwrap();
    shared_server().cli(&["SET", &format!("{ns}:k"), "\u{1}not an envelope"]);
    assert_eq!(cache.get(&"k".to_owned()).await.unwrap(), None);
    let value = cache
        .get_or_load(&"k".to_owned(), |_| async {
            Ok::<_, CacheError>(Some("loaded".to_owned()))
        })
        .await
        .unwrap();
    assert_eq!(value.as_deref(), Some("loaded"));
}

/// Redis is killed mid-run: every read still answers (from L1 or the loader) without an
/// error; once Redis is back, reads reach L2 again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_survive_redis_being_killed_and_return_to_l2_after_restart() {
    let server = RedisServer::start();
    let config = RedisConfig::standalone(server.url())
        .with_command_timeout(Duration::from_millis(200))
        .with_connect_timeout(Duration::from_millis(200));
    let store = Probe::new(RedisKvStore::new(Redis::connect(config).await.unwrap()));
    let calls = Arc::clone(&store.calls);
    let clock = ManualClock::new();
    let cooldown = Duration::from_secs(5);
    let cache: Cache<u32, String> = Cache::builder()
        .clock(clock.clock())
        .l2(store, unique_namespace("kill"))
        .l2_failure_threshold(3)
        .l2_cooldown(cooldown)
        .build()
        .unwrap();
    let loads = Arc::new(AtomicUsize::new(0));
    let loader = |loads: &Arc<AtomicUsize>| {
        let loads = Arc::clone(loads);
        move |k: u32| async move {
            loads.fetch_add(1, Ordering::SeqCst);
            Ok::<_, CacheError>(Some(format!("value {k}")))
        }
    };
    for k in 0..20 {
        cache.get_or_load(&k, loader(&loads)).await.unwrap();
    }
    assert!(
        calls.ok.load(Ordering::SeqCst) >= 20,
        "values reached Redis"
    );

    server.kill();
    for round in 0..3 {
        for k in 0..20 {
            // Half the keys leave L1, so their reads need L2 or the loader.
            if k % 2 == 0 {
                cache.invalidate_local(&k);
            }
            let value = cache.get_or_load(&k, loader(&loads)).await;
            assert_eq!(
                value.unwrap().as_deref(),
                Some(format!("value {k}").as_str()),
                "round {round}, key {k}"
            );
        }
    }
    assert!(
        loads.load(Ordering::SeqCst) > 20,
        "the loader stood in for Redis"
    );

    server.restart();
    let ok_before = calls.ok.load(Ordering::SeqCst);
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut k = 100;
    while calls.ok.load(Ordering::SeqCst) == ok_before {
        assert!(Instant::now() < deadline, "reads did not return to Redis");
        // Past the cool-down the cache probes L2; the client reconnects on its own.
        clock.advance(cooldown);
        k += 1;
        let value = cache.get_or_load(&k, loader(&loads)).await.unwrap();
        assert_eq!(value, Some(format!("value {k}")));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // L2 serves reads again: a value written now is read back from Redis, not loaded.
    cache.insert(1_000, "from l2".into()).await.unwrap();
    cache.invalidate_local(&1_000);
    let loads_before = loads.load(Ordering::SeqCst);
    let value = cache.get_or_load(&1_000, loader(&loads)).await.unwrap();
    assert_eq!(value.as_deref(), Some("from l2"));
    assert_eq!(loads.load(Ordering::SeqCst), loads_before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn l1_learns_of_writes_made_outside_headroom() {
    let server = shared_server();
    let redis = Redis::connect(RedisConfig::standalone(server.url()))
        .await
        .expect("connect");
    let ns = unique_namespace("external");
    let prefix = format!("{ns}:");
    let cache: Cache<String, u64> =
        tracking_cache(&redis, &ns, RedisKvStore::new(redis.clone())).await;
    cache.insert("k".into(), 1).await.expect("insert");
    assert_eq!(cache.get(&"k".to_owned()).await.expect("get"), Some(1));

    // Another program overwrites the key in Redis (with bytes that are not an envelope).
    server.cli(&["SET", &format!("{prefix}k"), "written by another program"]);
    let deadline = Instant::now() + Duration::from_secs(5);
    while cache.get(&"k".to_owned()).await.expect("get") == Some(1) {
        assert!(
            Instant::now() < deadline,
            "L1 still serves the value replaced in Redis"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert_eq!(cache.get(&"k".to_owned()).await.expect("get"), None);
}

/// A cache over `store` told of the writes made under `ns` (tracked on `redis`), once its
/// tracking is live.
async fn tracking_cache<K: CacheKey>(
    redis: &Redis,
    ns: &Namespace,
    store: impl KvStore,
) -> Cache<K, u64> {
    let writes = headroom_redis::tracked_writes(redis, format!("{ns}:").as_bytes())
        .await
        .expect("tracking");
    let cache = Cache::builder()
        .ttl(Duration::from_secs(3_600))
        .l2(store, ns.clone())
        .external_writes(writes)
        .build()
        .expect("cache");
    settle(|| cache.l1_in_use()).await;
    cache
}

/// Another program writing a key under the tracked prefix that is not a key of this cache (an
/// index beside `u64` keys) drops nothing from L1: no entry can have that key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outside_writes_to_keys_the_cache_cannot_hold_leave_l1_alone() {
    let server = shared_server();
    let redis = Redis::connect(RedisConfig::standalone(server.url()))
        .await
        .expect("connect");
    let ns = unique_namespace("external-foreign");
    let prefix = format!("{ns}:");
    // Written before tracking starts, so that the only writes reported are the test's own.
    let writer: Cache<u64, u64> = Cache::builder()
        .l2(RedisKvStore::new(redis.clone()), ns.clone())
        .build()
        .expect("cache");
    writer.insert(7, 70).await.expect("insert");
    writer.insert(8, 80).await.expect("insert");
    let store = Probe::new(RedisKvStore::new(redis.clone()));
    let calls = Arc::clone(&store.calls);
    let cache: Cache<u64, u64> = tracking_cache(&redis, &ns, store).await;
    // Read until both are served from L1 (it is filled after the first read answers).
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let reads = calls.reads();
        assert_eq!(cache.get(&7).await.expect("get"), Some(70));
        assert_eq!(cache.get(&8).await.expect("get"), Some(80));
        if calls.reads() == reads {
            break;
        }
        assert!(Instant::now() < deadline, "L1 never filled");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }

    server.cli(&["SET", &format!("{prefix}index"), "another program's"]);
    // Tracking reports writes in order: once the write to key 8 is applied, so is the index's.
    server.cli(&["SET", &format!("{prefix}8"), "written by another program"]);
    let deadline = Instant::now() + Duration::from_secs(5);
    while cache.get(&8).await.expect("get") == Some(80) {
        assert!(
            Instant::now() < deadline,
            "the write to key 8 never arrived"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let reads = calls.reads();
    assert_eq!(cache.get(&7).await.expect("get"), Some(70));
    assert_eq!(calls.reads(), reads, "key 7 is still in L1");
}

/// Two instances over a Redis Cluster with a fleet lock in Redis: one loader call for a cold
/// key; the other instance waits for the value in L2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_lock_on_redis_cluster_runs_one_load() {
    let redis = Redis::connect(RedisConfig::cluster(shared_cluster().urls()))
        .await
        .expect("connect");
    let ns = unique_namespace("fleet");
    let b_store = Probe::new(RedisKvStore::new(redis.clone()));
    let b_calls = Arc::clone(&b_store.calls);
    let build = |store: Probe<RedisKvStore>| -> Cache<String, String> {
        Cache::builder()
            .l2(store, ns.clone())
            .fleet_lock(
                headroom_redis::RedisLeaseStore::new(redis.clone()),
                Duration::from_secs(10),
            )
            .build()
            .expect("cache")
    };
    let (a, b) = (
        build(Probe::new(RedisKvStore::new(redis.clone()))),
        build(b_store),
    );
    let calls = Arc::new(AtomicUsize::new(0));
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let loader = {
        let (calls, gate) = (Arc::clone(&calls), Arc::clone(&gate));
        move |k: String| async move {
            calls.fetch_add(1, Ordering::SeqCst);
            let _permit = gate.acquire().await.expect("gate");
            Ok::<_, CacheError>(Some(format!("{k} loaded")))
        }
    };
    let first = tokio::spawn({
        let (a, loader) = (a.clone(), loader.clone());
        async move { a.get_or_load(&"k".to_owned(), loader).await }
    });
    common::settle(|| calls.load(Ordering::SeqCst) == 1).await;
    let second = tokio::spawn({
        let (b, loader) = (b.clone(), loader.clone());
        async move { b.get_or_load(&"k".to_owned(), loader).await }
    });
    // B read L2 once, found the lock taken, and polls L2.
    common::settle(|| b_calls.get.load(Ordering::SeqCst) >= 2).await;
    gate.add_permits(10);
    assert_eq!(first.await.unwrap().unwrap().as_deref(), Some("k loaded"));
    assert_eq!(second.await.unwrap().unwrap().as_deref(), Some("k loaded"));
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "one loader call in the fleet"
    );
}
