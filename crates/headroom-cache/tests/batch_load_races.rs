//! Races between a batch read's L1 lookup and its load: a write or another load that lands in
//! between must be seen by the batch load.

use std::borrow::Cow;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex as StdMutex, OnceLock};
use std::time::Duration;

use futures_util::FutureExt;
use headroom_cache::{Cache, CacheError, CacheKey};
use parking_lot::Mutex;
use tokio::sync::{Semaphore, mpsc};

const SEC: Duration = Duration::from_secs(1);

/// An L1-only cache: a batch read misses "a", and before its load task first runs, `insert`
/// writes "a". The load must not put a value over the insert (the old code re-read L1 after
/// taking its write marks, found the inserted value and answered with it).
#[tokio::test]
async fn a_batch_load_does_not_overwrite_an_insert_made_before_its_task_ran() {
    let cache: Cache<String, String> = Cache::builder().ttl(60 * SEC).build().unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let keys = ["a".to_owned()];
    let mut read = Box::pin({
        let calls = Arc::clone(&calls);
        cache.get_many_or_load(&keys, move |keys: Vec<String>| async move {
            calls.fetch_add(1, Ordering::SeqCst);
            Ok::<_, CacheError>(
                keys.into_iter()
                    .map(|k| (k, "loaded".to_owned()))
                    .collect::<HashMap<_, _>>(),
            )
        })
    });
    // One poll: the read misses L1 and registers its batch; its task has not run yet.
    assert!((&mut read).now_or_never().is_none());
    assert_eq!(cache.loads_in_flight(), 1);
    // The write completes at once (no L2, no bus), detaching the batch.
    cache
        .insert("a".to_owned(), "written".to_owned())
        .await
        .unwrap();
    let _ = read.await.unwrap();
    assert_eq!(
        cache.get(&"a".to_owned()).await.unwrap().as_deref(),
        Some("written"),
        "the insert, made after the batch began, was overwritten by its load"
    );
    assert_eq!(
        calls.load(Ordering::SeqCst),
        0,
        "loader called although L1 held a value"
    );
}

// --- A key whose hashing can be held, to stop a batch read between its L1 reads. ---

static ARMED: AtomicBool = AtomicBool::new(false);
static ENTERED: OnceLock<mpsc::UnboundedSender<()>> = OnceLock::new();
static RELEASE: OnceLock<StdMutex<std::sync::mpsc::Receiver<()>>> = OnceLock::new();

#[derive(Clone, PartialEq, Eq, Debug)]
struct HookKey(&'static str);

impl Hash for HookKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        if self.0 == "hook" && ARMED.swap(false, Ordering::SeqCst) {
            let _ = ENTERED.get().unwrap().send(());
            let _ = RELEASE.get().unwrap().lock().unwrap().recv();
        }
        self.0.hash(state);
    }
}

impl CacheKey for HookKey {
    fn to_key_bytes(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(self.0.as_bytes())
    }
}

/// One loader call per key per instance: a batch read that found "a" absent from L1 while a
/// load of "a" was in flight, and registers its own load just after that load ended (its
/// value is in L1 now), must not call the loader for "a" again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_that_saw_a_key_absent_does_not_load_it_again_after_its_load_filled_l1() {
    let (entered_tx, mut entered) = mpsc::unbounded_channel();
    let (release_tx, release_rx) = std::sync::mpsc::channel();
    ENTERED.set(entered_tx).unwrap();
    RELEASE.set(StdMutex::new(release_rx)).unwrap();

    let cache: Cache<HookKey, String> = Cache::builder().ttl(60 * SEC).build().unwrap();
    let loaded: Arc<Mutex<Vec<HookKey>>> = Arc::new(Mutex::new(Vec::new()));
    let gate = Arc::new(Semaphore::new(0));
    let (started_tx, mut started) = mpsc::unbounded_channel();
    // The first load of "a", held at the gate.
    let first = {
        let (cache, gate, loaded) = (cache.clone(), Arc::clone(&gate), Arc::clone(&loaded));
        tokio::spawn(async move {
            cache
                .get_or_load(&HookKey("a"), move |key| async move {
                    loaded.lock().push(key);
                    let _ = started_tx.send(());
                    let _permit = gate.acquire().await.expect("gate");
                    Ok::<_, CacheError>(Some("a-1".to_owned()))
                })
                .await
        })
    };
    started.recv().await.unwrap();
    // The batch read misses "a" in L1, then is held while hashing its next key.
    ARMED.store(true, Ordering::SeqCst);
    let batch = {
        let (cache, loaded) = (cache.clone(), Arc::clone(&loaded));
        tokio::spawn(async move {
            cache
                .get_many_or_load(
                    &[HookKey("a"), HookKey("hook")],
                    move |keys: Vec<HookKey>| async move {
                        loaded.lock().extend(keys.iter().cloned());
                        Ok::<_, CacheError>(
                            keys.into_iter()
                                .map(|k| (k.clone(), format!("{}-2", k.0)))
                                .collect::<HashMap<_, _>>(),
                        )
                    },
                )
                .await
        })
    };
    entered.recv().await.unwrap();
    // The first load ends: its value is in L1 and "a" is no longer in flight.
    gate.add_permits(1);
    assert_eq!(first.await.unwrap().unwrap().as_deref(), Some("a-1"));
    while cache.loads_in_flight() != 0 {
        tokio::task::yield_now().await;
    }
    assert_eq!(
        cache.get(&HookKey("a")).await.unwrap().as_deref(),
        Some("a-1")
    );
    release_tx.send(()).unwrap();
    let got = batch.await.unwrap().unwrap();
    let loads_of_a = loaded.lock().iter().filter(|k| k.0 == "a").count();
    assert_eq!(
        loads_of_a,
        1,
        "loader called twice for \"a\" (calls: {:?}; batch got {got:?})",
        loaded.lock()
    );
}

/// A batch read with an invalid key fails for its caller alone: a read of one of its valid
/// keys that came while the batch was starting gets that key's value, not the batch's error.
#[tokio::test]
async fn an_invalid_key_in_a_batch_fails_no_other_reader() {
    let cache: Cache<String, String> = Cache::builder()
        .ttl(60 * SEC)
        .l2(
            headroom_core::memory::MemoryKvStore::new(),
            headroom_core::Namespace::new("races").unwrap(),
        )
        .build()
        .unwrap();
    let keys = ["hot".to_owned(), "x".repeat(2_000)];
    let loader = |keys: Vec<String>| async move {
        Ok::<_, CacheError>(
            keys.into_iter()
                .map(|k| (k, "loaded".to_owned()))
                .collect::<HashMap<_, _>>(),
        )
    };
    let mut batch = Box::pin(cache.get_many_or_load(&keys, loader));
    // One poll: the batch starts; its task has not run yet.
    let first = (&mut batch).now_or_never();
    let single = cache
        .get_or_load(&"hot".to_owned(), |_| async {
            Ok::<_, CacheError>(Some("loaded alone".to_owned()))
        })
        .await;
    let batch = match first {
        Some(done) => done,
        None => batch.await,
    };
    assert!(batch.is_err(), "the batch names an invalid key");
    assert!(single.is_ok(), "{single:?}");
}
