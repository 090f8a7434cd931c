//! A cache writing behind: reads see an insert at once, the database gets it at the next
//! flush, and a refused write changes nothing (one of unknown outcome leaves the key out of the
//! cache).

mod support;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use headroom_cache::{Cache, CacheError, CacheErrorKind};
use headroom_core::jobs::JobStore;
use headroom_core::memory::{MemoryJobStore, MemoryKvStore};
use headroom_core::{Clock, ManualClock, Namespace};
use headroom_jobs::{CacheWriteError, JobError, QueueConfig, Write, WriteBehind, WriteBehindCache};
use headroom_redis::{Redis, RedisConfig, RedisJobStore, RedisKvStore};
use headroom_testkit::{shared_server, unique_namespace};
use support::SlowStore;

#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
struct Profile {
    name: String,
    visits: u64,
}

/// What the writer was handed: each key and its value (`None` for a delete).
type Written = Arc<Mutex<Vec<(String, Option<Profile>)>>>;

/// A database table by key: the version of the write applied last and its value (`None` for
/// a delete).
type Rows = HashMap<String, (u64, Option<Profile>)>;

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

/// An enqueue whose answer was lost may have recorded the write, which then reaches the
/// writer: the cache does not go on answering the value it replaces.
#[tokio::test(start_paused = true)]
async fn a_write_whose_enqueue_answer_was_lost_leaves_no_old_value_in_the_cache() {
    let writes = WriteBehind::builder("lost", SlowStore::first_enqueue_reply_lost())
        .flush_interval(Duration::from_secs(1))
        .build()
        .unwrap();
    let profiles = WriteBehindCache::new(cache(), writes);
    let ada = |visits| Profile {
        name: "Ada".into(),
        visits,
    };
    profiles
        .cache()
        .insert("ada".to_owned(), ada(1))
        .await
        .unwrap();
    let lost = profiles.insert("ada".to_owned(), ada(2)).await.unwrap_err();
    assert!(matches!(lost, CacheWriteError::Enqueue(_)), "{lost:?}");
    let source = Source::with("ada", ada(1));
    assert_eq!(
        source.read(&profiles, "ada").await,
        Some(ada(2)),
        "a read before the flush answers the recorded write, not the source's older value"
    );
    assert_eq!(source.loads(), 0);
    let written: Written = Arc::default();
    let seen = written.clone();
    let flusher = profiles.writes().start(move |batch: Vec<Write>| {
        let seen = seen.clone();
        async move {
            for write in batch {
                let key = String::from_utf8(write.key.to_vec()).unwrap();
                seen.lock()
                    .unwrap()
                    .push((key, write.json::<Profile>().transpose().unwrap()));
            }
            Ok(())
        }
    });
    flusher.shutdown(Duration::from_secs(5)).await;
    assert_eq!(
        *written.lock().unwrap(),
        [("ada".to_owned(), Some(ada(2)))],
        "the write reached the writer"
    );
    assert_ne!(
        profiles.cache().get(&"ada".to_owned()).await.unwrap(),
        Some(ada(1)),
        "the cache answers the value the write replaced"
    );
}

/// How many dead letters the write-behind keeps (up to 10).
async fn dead_letters<S: JobStore>(profiles: &WriteBehindCache<String, Profile, S>) -> usize {
    profiles
        .writes()
        .queue()
        .dead_letters(10)
        .await
        .unwrap()
        .len()
}

/// A write the writer refuses for good never reaches the database: the cache stops answering
/// it, on this instance's L1 and in L2, while a later write of the key, recorded while the
/// writer was refusing, stays.
#[tokio::test(start_paused = true)]
async fn a_write_the_writer_refuses_for_good_leaves_the_cache_and_a_later_one_stays() {
    let kv = MemoryKvStore::new();
    let l2 = |kv: &MemoryKvStore| {
        Cache::<String, Profile>::builder()
            .ttl(Duration::from_secs(600))
            .l2(kv.clone(), Namespace::new("profiles").unwrap())
            .build()
            .unwrap()
    };
    let writes = WriteBehind::builder("profiles", MemoryJobStore::new())
        .flush_interval(Duration::from_secs(1))
        .build()
        .unwrap();
    let profiles = Arc::new(WriteBehindCache::new(l2(&kv), writes));
    let ada = |visits| Profile {
        name: "Ada".into(),
        visits,
    };
    let (called, answer) = (
        Arc::new(tokio::sync::Notify::new()),
        Arc::new(tokio::sync::Notify::new()),
    );
    let flusher = profiles.start({
        let (called, answer) = (called.clone(), answer.clone());
        move |batch: Vec<Write>| {
            let (called, answer) = (called.clone(), answer.clone());
            async move {
                let write = &batch[0];
                if write.json::<Profile>().unwrap().unwrap().visits > 1 {
                    return Ok(());
                }
                if write.key == "ada" {
                    called.notify_one();
                    answer.notified().await;
                }
                Err(JobError::fatal("a constraint is violated"))
            }
        }
    });
    profiles.insert("bob".to_owned(), ada(1)).await.unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    profiles.insert("ada".to_owned(), ada(1)).await.unwrap();
    called.notified().await;
    // A later write of the key is recorded while the writer refuses the first.
    profiles.insert("ada".to_owned(), ada(2)).await.unwrap();
    // The refusal comes later than that write.
    tokio::time::sleep(Duration::from_millis(10)).await;
    answer.notify_one();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(dead_letters(&profiles).await, 2);
    let elsewhere = l2(&kv);
    for cache in [profiles.cache(), &elsewhere] {
        assert_eq!(
            cache.get(&"bob".to_owned()).await.unwrap(),
            None,
            "the cache answers a write the database never got"
        );
        assert_eq!(
            cache.get(&"ada".to_owned()).await.unwrap(),
            Some(ada(2)),
            "the later write left the cache"
        );
    }
    flusher.shutdown(Duration::from_secs(1)).await;
}

/// Taking refused writes out of a cache whose L2 hangs holds back no write of the flusher's
/// pass: its shutdown reports none abandoned, since every one was finished.
#[tokio::test(start_paused = true)]
async fn a_hung_cache_holds_back_no_write_of_a_pass_with_refused_writes() {
    let experiment = headroom_chaos::Experiment::builder("hung-l2")
        .build()
        .unwrap();
    let cache = Cache::<String, Profile>::builder()
        .ttl(Duration::from_secs(600))
        .l2(
            headroom_chaos::ChaosKvStore::new(MemoryKvStore::new(), experiment.clone()),
            Namespace::new("profiles").unwrap(),
        )
        .l2_timeout(Duration::from_secs(60))
        .build()
        .unwrap();
    let writes = WriteBehind::builder("profiles", MemoryJobStore::new())
        .flush_interval(Duration::from_secs(1))
        .build()
        .unwrap();
    let profiles = WriteBehindCache::new(cache, writes);
    let flusher = profiles.start(|_: Vec<Write>| async { Err(JobError::fatal("refused")) });
    profiles
        .insert(
            "ada".to_owned(),
            Profile {
                name: "Ada".into(),
                visits: 1,
            },
        )
        .await
        .unwrap();
    experiment
        .start(headroom_chaos::ExperimentConfig::new(Duration::from_secs(3600)).abort(1.0))
        .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(dead_letters(&profiles).await, 1);
    let report = flusher.shutdown(Duration::from_millis(100)).await;
    assert_eq!(report.abandoned, 0, "{report:?}");
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

/// Writes whose callers gave up still run, in their key's turn; while the store is stuck,
/// writes of one key pile up only to a bound, past which they are refused at once, so that
/// impatient callers cannot fill memory with writes waiting their turn.
#[tokio::test(start_paused = true)]
async fn writes_waiting_for_a_stuck_store_are_bounded() {
    let store = SlowStore::holding_first_enqueue(MemoryJobStore::new());
    let (held, release) = (
        store.first_enqueue_held.clone(),
        store.release_first_enqueue.clone(),
    );
    let writes = WriteBehind::builder("profiles", store).build().unwrap();
    let profiles = Arc::new(WriteBehindCache::new(cache(), writes));
    let write = |visits| {
        let profiles = profiles.clone();
        let profile = Profile {
            name: "Ada".into(),
            visits,
        };
        async move {
            tokio::time::timeout(
                Duration::from_millis(1),
                profiles.insert("ada".to_owned(), profile),
            )
            .await
        }
    };
    let first = tokio::spawn(write(0));
    held.notified().await;
    let mut refused = 0;
    for visits in 1..=1_000 {
        match write(visits).await {
            Ok(Err(CacheWriteError::Busy { .. })) => refused += 1,
            Err(_elapsed) => {}
            other => panic!("write {visits}: {other:?}"),
        }
    }
    assert!(first.await.unwrap().is_err(), "the first caller gave up");
    release.notify_one();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let stored = profiles.writes().queue().stats().await.unwrap().unfinished;
    assert_eq!(stored, 1_001 - refused, "every write not refused is stored");
    assert!(
        stored <= 100,
        "{stored} writes were kept waiting their turn"
    );
}

/// One instance of a service writing profiles behind its cache: its own cache (L1) and
/// write-behind, on the Redis L2 and job queue that every instance shares.
async fn instance<S: JobStore>(
    store: S,
    redis: &Redis,
    ns: &Namespace,
    clock: &Clock,
) -> WriteBehindCache<String, Profile, S> {
    let cache = Cache::builder()
        .ttl(Duration::from_secs(600))
        .l2(RedisKvStore::new(redis.clone()), ns.child("cache").unwrap())
        .clock(clock.clone())
        .build()
        .unwrap();
    let writes = WriteBehind::builder("profiles", store)
        .namespace(ns.child("jobs").unwrap())
        .clock(clock.clone())
        .build()
        .unwrap();
    WriteBehindCache::new(cache, writes)
}

/// What a third instance reads for `key`: L2, since its L1 is empty.
async fn read_elsewhere(
    redis: &Redis,
    ns: &Namespace,
    clock: &Clock,
    key: &str,
) -> Option<Profile> {
    let reader: Cache<String, Profile> = Cache::builder()
        .ttl(Duration::from_secs(600))
        .l2(RedisKvStore::new(redis.clone()), ns.child("cache").unwrap())
        .clock(clock.clone())
        .build()
        .unwrap();
    reader.get(&key.to_owned()).await.unwrap()
}

/// Hands every pending write to a writer that applies a write only over an older version
/// (`UPDATE .. WHERE version < $1`), and answers the rows it keeps.
async fn flush_to_rows<S: JobStore>(profiles: &WriteBehindCache<String, Profile, S>) -> Rows {
    let rows: Arc<Mutex<Rows>> = Arc::default();
    let table = rows.clone();
    let flusher = profiles.writes().start(move |batch: Vec<Write>| {
        let table = table.clone();
        async move {
            let mut table = table.lock().unwrap();
            for write in batch {
                let key = String::from_utf8(write.key.to_vec()).unwrap();
                let value = write.json::<Profile>().transpose().unwrap();
                let row = table.entry(key).or_insert((0, None));
                if row.0 < write.version {
                    *row = (write.version, value);
                }
            }
            Ok(())
        }
    });
    flusher.shutdown(Duration::from_secs(30)).await;
    rows.lock().unwrap().clone()
}

async fn standalone() -> Redis {
    Redis::connect(RedisConfig::standalone(shared_server().url()))
        .await
        .unwrap()
}

fn visits(visits: u64) -> Profile {
    Profile {
        name: "Ada".into(),
        visits,
    }
}

/// What instance A does to "ada" while instance B inserts it.
#[derive(Clone, Copy)]
enum RaceOf {
    Insert,
    Remove,
}

/// Instance A records its write of "ada", and its enqueue is still on its way when instance
/// B, `gap` later, records and caches an insert of its own; A's enqueue answers after that,
/// so A's cache write comes last. The writer keeps B's insert (the later version): so must
/// the cache.
async fn a_later_insert_reaches_the_cache_first(name: &str, a_does: RaceOf, gap: Duration) {
    let (redis, ns) = (standalone().await, unique_namespace(name));
    // 100 µs into a millisecond: a gap under 900 µs keeps both writes in that millisecond.
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    let manual = ManualClock::starting_at(
        Duration::from_millis(now.as_millis() as u64) + Duration::from_micros(100),
    );
    let clock = manual.clock();
    let held = SlowStore::holding_first_enqueue(RedisJobStore::new(redis.clone()));
    let (a_held, a_release) = (
        held.first_enqueue_held.clone(),
        held.release_first_enqueue.clone(),
    );
    let a = Arc::new(instance(held, &redis, &ns, &clock).await);
    let b = instance(RedisJobStore::new(redis.clone()), &redis, &ns, &clock).await;

    let a_write = tokio::spawn({
        let a = a.clone();
        async move {
            match a_does {
                RaceOf::Insert => a.insert("ada".to_owned(), visits(1)).await,
                RaceOf::Remove => a.remove(&"ada".to_owned()).await,
            }
        }
    });
    a_held.notified().await;
    manual.advance(gap);
    let b_version = b.insert("ada".to_owned(), visits(2)).await.unwrap();
    manual.advance(gap);
    a_release.notify_one();
    let a_version = a_write.await.unwrap().unwrap();

    assert!(
        a_version < b_version,
        "versions: A {a_version}, B {b_version}"
    );
    let rows = flush_to_rows(&b).await;
    assert_eq!(
        rows["ada"],
        (b_version, Some(visits(2))),
        "the writer keeps B's insert"
    );
    assert_eq!(
        read_elsewhere(&redis, &ns, &clock, "ada").await,
        Some(visits(2)),
        "the cache holds the value the writer keeps"
    );
}

#[tokio::test]
async fn of_two_instances_inserting_a_key_the_cache_keeps_the_value_the_writer_keeps() {
    a_later_insert_reaches_the_cache_first(
        "wb-cache-two",
        RaceOf::Insert,
        Duration::from_millis(2),
    )
    .await;
}

#[tokio::test]
async fn of_two_instances_inserting_a_key_within_a_millisecond_the_cache_keeps_the_value_the_writer_keeps()
 {
    a_later_insert_reaches_the_cache_first(
        "wb-cache-two-us",
        RaceOf::Insert,
        Duration::from_micros(300),
    )
    .await;
}

#[tokio::test]
async fn of_an_instance_removing_a_key_and_another_inserting_it_the_cache_keeps_what_the_writer_keeps()
 {
    a_later_insert_reaches_the_cache_first(
        "wb-cache-remove",
        RaceOf::Remove,
        Duration::from_millis(2),
    )
    .await;
}

#[tokio::test]
async fn of_an_instance_removing_a_key_and_another_inserting_it_within_a_millisecond_the_cache_keeps_what_the_writer_keeps()
 {
    a_later_insert_reaches_the_cache_first(
        "wb-cache-remove-us",
        RaceOf::Remove,
        Duration::from_micros(300),
    )
    .await;
}

/// A write-behind cache on `store`, its cache's entries living `ttl`, every part on one
/// manual clock (returned, to move time).
fn on_manual_time<S: JobStore>(
    store: S,
    ttl: Duration,
) -> (ManualClock, WriteBehindCache<String, Profile, S>) {
    let manual = ManualClock::starting_at(Duration::from_secs(1_700_000_000));
    let clock = manual.clock();
    let cache = Cache::builder()
        .ttl(ttl)
        .l2(
            MemoryKvStore::builder().clock(clock.clone()).build(),
            Namespace::new("profiles").unwrap(),
        )
        .clock(clock.clone())
        .build()
        .unwrap();
    let writes = WriteBehind::builder("profiles", store)
        .clock(clock)
        .build()
        .unwrap();
    (manual, WriteBehindCache::new(cache, writes))
}

/// The database a writer writes to and a loader reads from, counting the loads.
#[derive(Clone, Default)]
struct Source {
    rows: Arc<Mutex<Rows>>,
    loads: Arc<std::sync::atomic::AtomicUsize>,
}

impl Source {
    fn with(key: &str, profile: Profile) -> Self {
        let source = Self::default();
        source
            .rows
            .lock()
            .unwrap()
            .insert(key.to_owned(), (0, Some(profile)));
        source
    }

    fn loads(&self) -> usize {
        self.loads.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Reads `key` through `profiles`, loading from this source on a miss.
    async fn read<S: JobStore>(
        &self,
        profiles: &WriteBehindCache<String, Profile, S>,
        key: &str,
    ) -> Option<Profile> {
        self.try_read(profiles, key).await.unwrap()
    }

    async fn try_read<S: JobStore>(
        &self,
        profiles: &WriteBehindCache<String, Profile, S>,
        key: &str,
    ) -> Result<Option<Profile>, CacheError> {
        let source = self.clone();
        profiles
            .get_or_load(&key.to_owned(), move |key: String| async move {
                source
                    .loads
                    .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let rows = source.rows.lock().unwrap();
                Ok::<_, std::convert::Infallible>(rows.get(&key).and_then(|row| row.1.clone()))
            })
            .await
    }

    /// Reads `keys` through `profiles` in one batch, loading the misses from this source;
    /// answers the values and the keys the loader was asked for.
    async fn read_many<S: JobStore>(
        &self,
        profiles: &WriteBehindCache<String, Profile, S>,
        keys: &[&str],
    ) -> (Vec<Option<Profile>>, Vec<String>) {
        let source = self.clone();
        let asked: Arc<Mutex<Vec<String>>> = Arc::default();
        let asked_for = asked.clone();
        let keys: Vec<String> = keys.iter().map(|&key| key.to_owned()).collect();
        let values = profiles
            .get_many_or_load(&keys, move |keys: Vec<String>| async move {
                asked_for.lock().unwrap().extend(keys.iter().cloned());
                let rows = source.rows.lock().unwrap();
                let found: HashMap<String, Profile> = keys
                    .into_iter()
                    .filter_map(|key| {
                        let value = rows.get(&key)?.1.clone()?;
                        Some((key, value))
                    })
                    .collect();
                Ok::<_, std::convert::Infallible>(found)
            })
            .await
            .unwrap();
        let mut asked = asked.lock().unwrap().clone();
        asked.sort();
        (values, asked)
    }

    /// Hands every write waiting in `profiles` to this source, applying each only over an
    /// older version.
    async fn flush<S: JobStore>(&self, profiles: &WriteBehindCache<String, Profile, S>) {
        for (key, row) in flush_to_rows(profiles).await {
            let mut rows = self.rows.lock().unwrap();
            let kept = rows.entry(key).or_insert((0, None));
            if kept.0 < row.0 {
                *kept = row;
            }
        }
    }
}

/// A read that misses both levels before the flush (here the entries' TTL ran out while the
/// writer was behind) answers the write still waiting for the writer, not the older value the
/// source holds; a delete waiting answers nothing. Once the writer has them, reads load from
/// the source again.
#[tokio::test(start_paused = true)]
async fn a_read_missing_the_cache_before_the_flush_answers_the_unwritten_write() {
    let (manual, profiles) = on_manual_time(MemoryJobStore::new(), Duration::from_secs(1));
    let source = Source::with("ada", visits(1));
    source
        .rows
        .lock()
        .unwrap()
        .insert("bob".to_owned(), (0, Some(visits(7))));

    profiles.insert("ada".to_owned(), visits(2)).await.unwrap();
    profiles.remove(&"bob".to_owned()).await.unwrap();
    manual.advance(Duration::from_secs(2));
    assert_eq!(source.read(&profiles, "ada").await, Some(visits(2)));
    assert_eq!(source.read(&profiles, "bob").await, None);
    assert_eq!(
        source.loads(),
        0,
        "the source was read for a key it is behind on"
    );

    source.flush(&profiles).await;
    manual.advance(Duration::from_secs(2));
    assert_eq!(source.read(&profiles, "ada").await, Some(visits(2)));
    assert_eq!(source.read(&profiles, "bob").await, None);
    assert_eq!(source.loads(), 2, "written, the keys load from the source");
}

/// A write the writer refuses for good leaves the cache also when a read cached it while it
/// waited for the writer (its own entry had run out, so the read answered the unwritten
/// write): the next read loads the database's value.
#[tokio::test(start_paused = true)]
async fn a_refused_write_a_read_cached_while_it_waited_leaves_the_cache() {
    let (manual, profiles) = on_manual_time(MemoryJobStore::new(), Duration::from_secs(1));
    let source = Source::with("ada", visits(1));
    profiles.insert("ada".to_owned(), visits(9)).await.unwrap();
    manual.advance(Duration::from_secs(2));
    assert_eq!(source.read(&profiles, "ada").await, Some(visits(9)));
    manual.advance(Duration::from_millis(10));
    let flusher =
        profiles.start(|_: Vec<Write>| async { Err(JobError::fatal("a constraint is violated")) });
    flusher.shutdown(Duration::from_secs(30)).await;
    assert_eq!(dead_letters(&profiles).await, 1);
    assert_eq!(
        source.read(&profiles, "ada").await,
        Some(visits(1)),
        "the cache answers a write the database never got"
    );
}

/// A write whose cache write failed (the cache's Redis out of reach at that moment) is still
/// what another instance reads before the flush, and not the source's older value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_that_missed_the_cache_is_read_elsewhere_before_the_flush() {
    let server = shared_server();
    let redis = standalone().await;
    let ns = unique_namespace("wb-missed-l2");
    let proxy = headroom_testkit::FaultProxy::start(server.addr()).await;
    let through_proxy = Redis::connect(
        RedisConfig::standalone(proxy.url()).with_command_timeout(Duration::from_millis(200)),
    )
    .await
    .unwrap();
    let clock = Clock::system();
    let a = {
        let cache = Cache::builder()
            .ttl(Duration::from_secs(600))
            .l2(RedisKvStore::new(through_proxy), ns.child("cache").unwrap())
            .build()
            .unwrap();
        let writes = WriteBehind::builder("profiles", RedisJobStore::new(redis.clone()))
            .namespace(ns.child("jobs").unwrap())
            .build()
            .unwrap();
        WriteBehindCache::new(cache, writes)
    };
    let b = instance(RedisJobStore::new(redis.clone()), &redis, &ns, &clock).await;
    let source = Source::with("ada", visits(1));

    proxy.cut();
    a.insert("ada".to_owned(), visits(2)).await.unwrap();
    proxy.restore();
    assert_eq!(read_elsewhere(&redis, &ns, &clock, "ada").await, None);
    assert_eq!(source.read(&b, "ada").await, Some(visits(2)));
    assert_eq!(
        source.loads(),
        0,
        "the source was read for a key it is behind on"
    );

    source.flush(&b).await;
    assert_eq!(source.rows.lock().unwrap()["ada"].1, Some(visits(2)));
}

/// While the job store cannot say whether a key has a write the source lacks, a read that
/// misses the cache fails rather than load a value such a write may have replaced.
#[tokio::test(start_paused = true)]
async fn a_read_missing_the_cache_while_the_job_store_is_out_of_reach_loads_nothing() {
    let store: SlowStore = SlowStore::default();
    let out_of_reach = store.out_of_reach.clone();
    let writes = WriteBehind::builder("out", store).build().unwrap();
    let profiles = WriteBehindCache::new(cache(), writes);
    let source = Source::with("ada", visits(1));

    out_of_reach.store(true, std::sync::atomic::Ordering::Relaxed);
    let failed = source.try_read(&profiles, "ada").await.unwrap_err();
    assert_eq!(failed.kind(), CacheErrorKind::Loader, "{failed}");
    assert_eq!(source.loads(), 0);

    out_of_reach.store(false, std::sync::atomic::Ordering::Relaxed);
    assert_eq!(source.read(&profiles, "ada").await, Some(visits(1)));
    assert_eq!(source.loads(), 1);
}

/// A batch read answers the misses that have an unwritten write from it, and asks the source
/// only for the others; once the writer has the writes, the source for all.
#[tokio::test(start_paused = true)]
async fn a_batch_read_missing_the_cache_before_the_flush_answers_the_unwritten_writes() {
    let (manual, profiles) = on_manual_time(MemoryJobStore::new(), Duration::from_secs(1));
    let source = Source::with("ada", visits(1));
    for (key, profile) in [("bob", visits(7)), ("cy", visits(3))] {
        source
            .rows
            .lock()
            .unwrap()
            .insert(key.to_owned(), (0, Some(profile)));
    }

    profiles.insert("ada".to_owned(), visits(2)).await.unwrap();
    profiles.remove(&"bob".to_owned()).await.unwrap();
    manual.advance(Duration::from_secs(2));
    let (values, asked) = source.read_many(&profiles, &["ada", "bob", "cy"]).await;
    assert_eq!(values, [Some(visits(2)), None, Some(visits(3))]);
    assert_eq!(
        asked,
        ["cy"],
        "the source was asked for keys it is behind on"
    );

    source.flush(&profiles).await;
    manual.advance(Duration::from_secs(2));
    let (values, asked) = source.read_many(&profiles, &["ada", "bob", "cy"]).await;
    assert_eq!(values, [Some(visits(2)), None, Some(visits(3))]);
    assert_eq!(
        asked,
        ["ada", "bob", "cy"],
        "written, the keys load from the source"
    );
}

/// A read that misses the cache while this instance's write of the key is on its way to the
/// job store answers that write once it lands, and the cache keeps the write's value: the
/// read does not fill the value the write replaces over it.
#[tokio::test(start_paused = true)]
async fn a_read_overlapping_a_write_on_its_way_answers_the_write() {
    a_read_overlaps_a_write_on_its_way(Read::One, None).await;
}

/// As [`a_read_overlapping_a_write_on_its_way_answers_the_write`], for a batch read.
#[tokio::test(start_paused = true)]
async fn a_batch_read_overlapping_a_write_on_its_way_answers_the_write() {
    a_read_overlaps_a_write_on_its_way(Read::Batch, None).await;
}

/// As [`a_read_overlapping_a_write_on_its_way_answers_the_write`], when an older write of the
/// key is still unwritten: the read answers the newer write, not the older.
#[tokio::test(start_paused = true)]
async fn a_read_overlapping_a_write_on_its_way_answers_it_over_an_older_unwritten_one() {
    a_read_overlaps_a_write_on_its_way(Read::One, Some(visits(2))).await;
}

/// As [`a_read_overlapping_a_write_on_its_way_answers_it_over_an_older_unwritten_one`], for a
/// batch read.
#[tokio::test(start_paused = true)]
async fn a_batch_read_overlapping_a_write_on_its_way_answers_it_over_an_older_unwritten_one() {
    a_read_overlaps_a_write_on_its_way(Read::Batch, Some(visits(2))).await;
}

#[derive(Clone, Copy)]
enum Read {
    One,
    Batch,
}

/// Another process records `older` (if any) of "ada"; then this instance's write of
/// `visits(3)` is held on its way to the store while a read of "ada" misses the cache.
async fn a_read_overlaps_a_write_on_its_way(read: Read, older: Option<Profile>) {
    let inner = MemoryJobStore::new();
    let store = SlowStore::holding_first_enqueue(inner.clone());
    let (held, release) = (
        store.first_enqueue_held.clone(),
        store.release_first_enqueue.clone(),
    );
    let (manual, profiles) = on_manual_time(store, Duration::from_secs(600));
    let profiles = Arc::new(profiles);
    let source = Source::with("ada", visits(1));
    if let Some(older) = older {
        let elsewhere = WriteBehind::builder("profiles", inner)
            .clock(manual.clock())
            .build()
            .unwrap();
        let encoded = serde_json::to_vec(&older).unwrap();
        elsewhere.put(&b"ada"[..], encoded).await.unwrap();
        manual.advance(Duration::from_millis(1));
    }

    let write = tokio::spawn({
        let profiles = profiles.clone();
        async move { profiles.insert("ada".to_owned(), visits(3)).await }
    });
    held.notified().await;
    manual.advance(Duration::from_millis(1));
    let reading = tokio::spawn({
        let (profiles, source) = (profiles.clone(), source.clone());
        async move {
            match read {
                Read::One => source.try_read(&profiles, "ada").await,
                Read::Batch => Ok(source.read_many(&profiles, &["ada"]).await.0.remove(0)),
            }
        }
    });
    // The read's load has begun (or the read is over) before the write goes on.
    while profiles.cache().loads_in_flight() == 0 && !reading.is_finished() {
        tokio::task::yield_now().await;
    }
    release.notify_one();
    write.await.unwrap().unwrap();
    assert_eq!(reading.await.unwrap().unwrap(), Some(visits(3)));
    assert_eq!(
        profiles.cache().get(&"ada".to_owned()).await.unwrap(),
        Some(visits(3)),
        "the cache keeps the write's value"
    );
}

/// While the job store is out of reach, loads stop paying its timeout after the cache's
/// `l2_failure_threshold` failures in a row: they fail at once, until a look after the
/// cache's `l2_cooldown` finds the store back.
#[tokio::test(start_paused = true)]
async fn loads_stop_waiting_for_a_job_store_out_of_reach() {
    let store = SlowStore::default().failing_after(Duration::from_secs(1));
    let out_of_reach = store.out_of_reach.clone();
    let (manual, profiles) = on_manual_time(store, Duration::from_secs(600));
    let config = profiles.cache().config();
    let (threshold, cooldown) = (config.l2_failure_threshold, config.l2_cooldown);
    let source = Source::with("k0", visits(1));

    out_of_reach.store(true, std::sync::atomic::Ordering::Relaxed);
    for i in 0..threshold {
        let started = tokio::time::Instant::now();
        source
            .try_read(&profiles, &format!("k{i}"))
            .await
            .unwrap_err();
        assert_eq!(started.elapsed(), Duration::from_secs(1), "load {i}");
    }
    for i in threshold..2 * threshold {
        let started = tokio::time::Instant::now();
        source
            .try_read(&profiles, &format!("k{i}"))
            .await
            .unwrap_err();
        assert_eq!(started.elapsed(), Duration::ZERO, "load {i} waited");
    }
    assert_eq!(source.loads(), 0);

    out_of_reach.store(false, std::sync::atomic::Ordering::Relaxed);
    manual.advance(cooldown);
    assert_eq!(source.read(&profiles, "k0").await, Some(visits(1)));
}

/// A load cut off by the cache's loader timeout while it looked at the unwritten writes
/// counts as a failed look: with a loader timeout shorter than the store's, loads still stop
/// waiting for a store out of reach.
#[tokio::test(start_paused = true)]
async fn looks_cut_off_by_the_loader_timeout_count_as_failed() {
    let store = SlowStore::default().failing_after(Duration::from_secs(1));
    let out_of_reach = store.out_of_reach.clone();
    // On tokio's paused time, which the loader timeout's timer follows.
    let cache = Cache::builder()
        .ttl(Duration::from_secs(600))
        .loader_hard_timeout(Duration::from_millis(500))
        .l2(MemoryKvStore::new(), Namespace::new("profiles").unwrap())
        .build()
        .unwrap();
    let writes = WriteBehind::builder("profiles", store).build().unwrap();
    let profiles = WriteBehindCache::new(cache, writes);
    let threshold = profiles.cache().config().l2_failure_threshold;
    let source = Source::default();

    out_of_reach.store(true, std::sync::atomic::Ordering::Relaxed);
    for i in 0..threshold {
        let started = tokio::time::Instant::now();
        source
            .try_read(&profiles, &format!("k{i}"))
            .await
            .unwrap_err();
        assert_eq!(started.elapsed(), Duration::from_millis(500), "load {i}");
    }
    let started = tokio::time::Instant::now();
    source.try_read(&profiles, "last").await.unwrap_err();
    assert_eq!(started.elapsed(), Duration::ZERO, "the last load waited");
}

/// A batch read's looks count as one toward the breaker: after the store came back and the
/// cool-down passed, one batch closes the breaker rather than fail all but one of its keys.
#[tokio::test(start_paused = true)]
async fn a_batch_read_after_the_cooldown_finds_the_store_back() {
    let store: SlowStore = SlowStore::default();
    let out_of_reach = store.out_of_reach.clone();
    let (manual, profiles) = on_manual_time(store, Duration::from_secs(600));
    let config = profiles.cache().config();
    let (threshold, cooldown) = (config.l2_failure_threshold, config.l2_cooldown);
    let source = Source::with("a", visits(1));

    out_of_reach.store(true, std::sync::atomic::Ordering::Relaxed);
    for i in 0..threshold {
        source
            .try_read(&profiles, &format!("k{i}"))
            .await
            .unwrap_err();
    }
    out_of_reach.store(false, std::sync::atomic::Ordering::Relaxed);
    manual.advance(cooldown);
    let (values, asked) = source.read_many(&profiles, &["a", "b"]).await;
    assert_eq!(values, [Some(visits(1)), None]);
    assert_eq!(asked, ["a", "b"]);
}
