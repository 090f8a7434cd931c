//! A cache writing behind: reads see an insert at once, the database gets it at the next
//! flush, and a refused write changes nothing.

mod support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use headroom_cache::Cache;
use headroom_core::Namespace;
use headroom_core::memory::{MemoryJobStore, MemoryKvStore};
use headroom_jobs::{CacheWriteError, QueueConfig, Write, WriteBehind, WriteBehindCache};
use support::SlowStore;

#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
struct Profile {
    name: String,
    visits: u64,
}

/// What the writer was handed: each key and its value (`None` for a delete).
type Written = Arc<Mutex<Vec<(String, Option<Profile>)>>>;

fn cache() -> Cache<String, Profile> {
    Cache::builder()
        .ttl(Duration::from_secs(600))
        .l2(MemoryKvStore::new(), Namespace::new("profiles").unwrap())
        .build()
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn inserts_are_read_at_once_and_reach_the_writer_coalesced() {
    let writes = WriteBehind::builder("profiles", MemoryJobStore::new())
        .flush_interval(Duration::from_secs(5))
        .build()
        .unwrap();
    let profiles = WriteBehindCache::new(cache(), writes);
    let written: Written = Arc::default();
    let seen = written.clone();
    let flusher = profiles.writes().start(move |batch: Vec<Write>| {
        let seen = seen.clone();
        async move {
            for write in batch {
                let key = String::from_utf8(write.key.to_vec()).unwrap();
                let value = write.json::<Profile>().transpose().unwrap();
                seen.lock().unwrap().push((key, value));
            }
            Ok(())
        }
    });
    tokio::time::sleep(Duration::from_millis(10)).await;
    for visits in 1..=3 {
        let ada = Profile {
            name: "Ada".into(),
            visits,
        };
        profiles
            .insert("ada".to_owned(), ada.clone())
            .await
            .unwrap();
        assert_eq!(
            profiles.cache().get(&"ada".to_owned()).await.unwrap(),
            Some(ada)
        );
    }
    profiles
        .insert(
            "bob".to_owned(),
            Profile {
                name: "Bob".into(),
                visits: 1,
            },
        )
        .await
        .unwrap();
    profiles.remove(&"bob".to_owned()).await.unwrap();
    assert_eq!(profiles.cache().get(&"bob".to_owned()).await.unwrap(), None);
    assert!(
        written.lock().unwrap().is_empty(),
        "written before the flush"
    );
    tokio::time::sleep(Duration::from_secs(6)).await;
    let mut written = written.lock().unwrap().clone();
    written.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        written,
        [
            (
                "ada".to_owned(),
                Some(Profile {
                    name: "Ada".into(),
                    visits: 3
                })
            ),
            ("bob".to_owned(), None),
        ]
    );
    flusher.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(start_paused = true)]
async fn a_refused_write_leaves_the_cache_as_it_was() {
    let mut queue = QueueConfig::default();
    queue.max_len = 1;
    let writes = WriteBehind::builder("full", MemoryJobStore::new())
        .queue(queue)
        .build()
        .unwrap();
    let profiles = WriteBehindCache::new(cache(), writes);
    let first = Profile {
        name: "Ada".into(),
        visits: 1,
    };
    profiles
        .insert("ada".to_owned(), first.clone())
        .await
        .unwrap();
    let refused = profiles
        .insert(
            "ada".to_owned(),
            Profile {
                name: "Ada".into(),
                visits: 2,
            },
        )
        .await
        .unwrap_err();
    assert!(
        matches!(refused, CacheWriteError::Enqueue(_)),
        "{refused:?}"
    );
    assert_eq!(
        profiles.cache().get(&"ada".to_owned()).await.unwrap(),
        Some(first)
    );
}

#[tokio::test(start_paused = true)]
async fn of_two_concurrent_inserts_of_a_key_the_cache_keeps_the_later_version() {
    let store = SlowStore::slow_first_enqueue();
    let started = store.first_enqueue_stored.clone();
    let writes = WriteBehind::builder("profiles", store)
        .flush_interval(Duration::from_secs(1))
        .build()
        .unwrap();
    let profiles = Arc::new(WriteBehindCache::new(cache(), writes));
    let visits = |visits| Profile {
        name: "Ada".into(),
        visits,
    };
    let first = tokio::spawn({
        let profiles = profiles.clone();
        async move { profiles.insert("ada".to_owned(), visits(1)).await }
    });
    // The first insert has its version and waits on the store when the second begins.
    started.notified().await;
    let second = profiles.insert("ada".to_owned(), visits(2)).await.unwrap();
    let first = first.await.unwrap().unwrap();
    assert!(first < second, "versions {first} then {second}");
    assert_eq!(
        profiles.cache().get(&"ada".to_owned()).await.unwrap(),
        Some(visits(2)),
        "the cache holds the value of the later version, as the writer will"
    );
}

#[tokio::test(start_paused = true)]
async fn an_insert_whose_caller_stops_waiting_still_reaches_the_cache() {
    let store = SlowStore::slow_first_enqueue();
    let started = store.first_enqueue_stored.clone();
    let writes = WriteBehind::builder("profiles", store).build().unwrap();
    let profiles = Arc::new(WriteBehindCache::new(cache(), writes));
    let ada = Profile {
        name: "Ada".into(),
        visits: 1,
    };
    let caller = tokio::spawn({
        let (profiles, ada) = (profiles.clone(), ada.clone());
        async move { profiles.insert("ada".to_owned(), ada).await }
    });
    // The caller gives up (a request timeout) once its write is in the store, before the
    // store's answer.
    started.notified().await;
    caller.abort();
    assert!(caller.await.unwrap_err().is_cancelled());
    tokio::time::sleep(Duration::from_millis(50)).await;
    let stats = profiles.writes().queue().stats().await.unwrap();
    assert_eq!(stats.unfinished, 1, "the write is durable, for the writer");
    assert_eq!(
        profiles.cache().get(&"ada".to_owned()).await.unwrap(),
        Some(ada),
        "the cache holds what the writer will write"
    );
}
