//! Every part a `Headroom` builds shares its one backend and namespace.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use headroom::Headroom;
use headroom::core::kv::KvStore;
use headroom::idempotency::{IdempotencyKey, Scope};
use headroom::limit::rate::{Quota, RateLimit, TierConfig};

#[tokio::test]
async fn caches_of_two_instances_share_l2() {
    let headroom = Headroom::builder().namespace("shop").memory().unwrap();
    let a = headroom
        .cache::<u64, String>("products")
        .unwrap()
        .build()
        .unwrap();
    let b = headroom
        .cache::<u64, String>("products")
        .unwrap()
        .build()
        .unwrap();
    // `insert` writes through to L2 before it returns.
    a.insert(7, String::from("teapot")).await.unwrap();
    let loads = Arc::new(AtomicU32::new(0));
    let counted = loads.clone();
    let value = b
        .get_or_load(&7, move |_| async move {
            counted.fetch_add(1, Ordering::Relaxed);
            Ok::<_, std::io::Error>(Some(String::from("other")))
        })
        .await
        .unwrap();
    // The second cache found the first one's value in the shared L2, without loading.
    assert_eq!(value.as_deref(), Some("teapot"));
    assert_eq!(loads.load(Ordering::Relaxed), 0);
}

#[tokio::test]
async fn cache_entries_live_under_the_namespace() {
    let headroom = Headroom::builder().namespace("shop").memory().unwrap();
    let cache = headroom
        .cache::<u64, u32>("prices")
        .unwrap()
        .build()
        .unwrap();
    cache.insert(1, 99).await.unwrap();
    let key = headroom
        .child_namespace("cache")
        .unwrap()
        .child("prices")
        .unwrap()
        .key("1")
        .unwrap();
    assert!(headroom.kv_store().get(&key).await.unwrap().is_some());
}

#[tokio::test]
async fn idempotency_executors_share_records() {
    let headroom = Headroom::builder().namespace("shop").memory().unwrap();
    let first = headroom.idempotency().build().unwrap();
    let second = headroom.idempotency().build().unwrap();
    let scope = Scope::new("customer-1", "checkout").unwrap();
    let key = IdempotencyKey::new("k-1").unwrap();
    let ran = first
        .execute(&scope, &key, b"sku=1", || async {
            Ok::<_, std::io::Error>(1_u32)
        })
        .await
        .unwrap();
    let replayed = second
        .execute(&scope, &key, b"sku=1", || async {
            Ok::<_, std::io::Error>(2_u32)
        })
        .await
        .unwrap();
    assert_eq!(
        (ran.replayed, replayed.replayed, replayed.value),
        (false, true, 1)
    );
}

#[tokio::test]
async fn rate_limiters_share_cells() {
    let headroom = Headroom::builder().namespace("shop").memory().unwrap();
    let tiers = || TierConfig::new().tier("free", Quota::per_minute(2).unwrap());
    let a = headroom
        .rate_limiter("api", tiers())
        .unwrap()
        .build()
        .unwrap();
    let b = headroom
        .rate_limiter("api", tiers())
        .unwrap()
        .build()
        .unwrap();
    assert!(a.check("free", "c1", 1).await.is_ok());
    assert!(b.check("free", "c1", 1).await.is_ok());
    // Both units of the quota are spent, whichever limiter spent them.
    assert!(a.check("free", "c1", 1).await.is_err());
}

#[tokio::test]
async fn invalid_component_names_are_typed_errors() {
    let headroom = Headroom::builder().namespace("shop").memory().unwrap();
    assert!(headroom.cache::<u64, u32>("has space").is_err());
    assert!(headroom.rate_limiter("{tag}", TierConfig::new()).is_err());
}

#[cfg(feature = "cache")]
#[tokio::test]
async fn shutdown_stops_every_cache_it_built() {
    let headroom = Headroom::builder().namespace("shop").memory().unwrap();
    let cache = headroom
        .cache::<u64, String>("products")
        .unwrap()
        .build()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !cache.l1_in_use() {
        assert!(std::time::Instant::now() < deadline, "never live");
        tokio::task::yield_now().await;
    }
    headroom.shutdown().await;
    assert!(
        !cache.l1_in_use(),
        "the cache said goodbye and stopped using L1"
    );
    // L2 keeps working after a shutdown.
    cache.insert(1, String::from("kettle")).await.unwrap();
    assert_eq!(cache.get(&1).await.unwrap().as_deref(), Some("kettle"));
}

/// A cache given a configuration loaded from a file keeps the name it was built under: its
/// metrics label and the name a reload finds it by.
#[tokio::test]
async fn a_cache_configured_from_a_file_keeps_its_name() {
    let headroom = Headroom::builder().namespace("shop").memory().unwrap();
    let cache = headroom
        .cache::<u64, String>("products")
        .unwrap()
        .config(headroom::cache::CacheConfig::default())
        .build()
        .unwrap();
    assert_eq!(cache.config().name, "products");
}

/// A part's name is one segment of its keys: a name holding the separator is refused, or
/// `products` reading key `v2:7` and `products:v2` reading key `7` would share one entry.
#[tokio::test]
async fn part_names_holding_the_key_separator_are_refused() {
    let headroom = Headroom::builder().namespace("shop").memory().unwrap();
    assert_eq!(
        headroom.cache::<u64, String>("products:v2").unwrap_err(),
        headroom::core::KeyError::Separator { offset: 8 }
    );
    let tiers = TierConfig::new().tier("free", Quota::per_minute(1).unwrap());
    assert!(headroom.rate_limiter("api:v2", tiers.clone()).is_err());
    assert!(headroom.rate_limiter("api", tiers).is_ok());
}

/// A job queue and a write-behind of the same name keep their jobs apart: the write-behind's
/// flusher never takes the queue's jobs (it would bury them as foreign records).
#[cfg(feature = "jobs")]
#[tokio::test]
async fn a_job_queue_and_a_write_behind_of_one_name_share_nothing() {
    use headroom::jobs::{Job, JobState, Write};

    let headroom = Headroom::builder().namespace("shop").memory().unwrap();
    let queue = headroom.job_queue("orders").unwrap().build().unwrap();
    let id = queue.enqueue(Job::new("order 7")).await.unwrap().id;
    let writes = headroom.write_behind("orders").unwrap().build().unwrap();
    let flusher = writes.start(|_: Vec<Write>| async { Ok(()) });
    let report = flusher.shutdown(std::time::Duration::from_secs(5)).await;
    assert_eq!(report.writes, 0);
    let status = queue.status(id).await.unwrap().unwrap();
    assert_eq!(status.state, JobState::Queued);
}

/// On the memory backends, one tenant filling the idempotency records with large outcomes is
/// refused at its own share; another tenant's new key still runs.
#[tokio::test]
async fn one_tenant_cannot_fill_the_memory_idempotency_records_for_all() {
    let headroom = Headroom::builder().namespace("shop").memory().unwrap();
    let idempotency = headroom.idempotency().build().unwrap();
    let mallory = Scope::new("mallory", "export").unwrap();
    let stored = store_megabyte_outcomes(&idempotency, &mallory, 300).await;
    assert!(stored < 300, "mallory was never refused");
    let alice = Scope::new("alice", "checkout").unwrap();
    let ran = idempotency
        .execute(
            &alice,
            &IdempotencyKey::new("k-1").unwrap(),
            b"",
            || async { Ok::<_, std::io::Error>(1_u32) },
        )
        .await;
    assert_eq!(ran.map(|executed| executed.value).ok(), Some(1));
}

/// A service whose requests all run under one principal gives it the whole memory store.
#[tokio::test]
async fn one_tenant_may_be_given_the_whole_memory_store() {
    let headroom = Headroom::builder()
        .namespace("shop")
        .memory_tenant_share(std::num::NonZeroUsize::MIN)
        .memory()
        .unwrap();
    let idempotency = headroom.idempotency().build().unwrap();
    let only = Scope::new("service", "export").unwrap();
    // More than an eighth of the 256 MiB.
    assert_eq!(store_megabyte_outcomes(&idempotency, &only, 40).await, 40);
}

/// Runs up to `count` keys of `scope`, each storing a 1 MB outcome, until one is refused;
/// answers how many were stored.
async fn store_megabyte_outcomes<S: headroom::core::lease::LeaseStore>(
    idempotency: &headroom::idempotency::Idempotency<S>,
    scope: &Scope,
    count: usize,
) -> usize {
    let outcome = "x".repeat(1_000_000);
    for i in 0..count {
        let key = IdempotencyKey::new(&format!("k-{i}")).unwrap();
        let ran = idempotency
            .execute(scope, &key, b"", || async {
                Ok::<_, std::io::Error>(outcome.clone())
            })
            .await;
        if ran.is_err() {
            return i;
        }
    }
    count
}
