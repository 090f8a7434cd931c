//! Write-behind on the memory job store, on paused time.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use headroom_core::ManualClock;
use headroom_core::memory::MemoryJobStore;
use headroom_jobs::{EnqueueError, Flusher, JobError, QueueConfig, Write, WriteBehind};
use support::{Fault, Faults, SlowStore};

mod support;

/// Rows by key: the version written last and the value (`None` once deleted).
type Rows = HashMap<Bytes, (u64, Option<Bytes>)>;

/// A database that applies a write only over an older version, and counts its calls.
#[derive(Clone, Default)]
struct Database {
    rows: Arc<Mutex<Rows>>,
    calls: Arc<AtomicU64>,
    writes: Arc<AtomicU64>,
}

impl Database {
    fn apply(&self, batch: Vec<Write>) {
        self.calls.fetch_add(1, Ordering::Relaxed);
        self.writes.fetch_add(batch.len() as u64, Ordering::Relaxed);
        let mut rows = self.rows.lock().unwrap();
        let mut keys = std::collections::HashSet::new();
        for write in batch {
            assert!(keys.insert(write.key.clone()), "a key twice in one batch");
            let row = rows.entry(write.key).or_insert((0, None));
            if row.0 < write.version {
                *row = (write.version, write.value);
            }
        }
    }

    /// Starts a flusher writing to this database.
    fn flusher<S: headroom_core::jobs::JobStore>(self, writes: &WriteBehind<S>) -> Flusher {
        writes.start(move |batch: Vec<Write>| {
            let db = self.clone();
            async move {
                db.apply(batch);
                Ok(())
            }
        })
    }

    /// Starts a flusher writing to this database, whose first call takes `first_takes`.
    fn slow_first_flusher<S: headroom_core::jobs::JobStore>(
        self,
        writes: &WriteBehind<S>,
        first_takes: Duration,
    ) -> Flusher {
        writes.start(move |batch: Vec<Write>| {
            let db = self.clone();
            async move {
                if db.calls.load(Ordering::Relaxed) == 0 {
                    db.calls.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(first_takes).await;
                    db.calls.fetch_sub(1, Ordering::Relaxed);
                }
                db.apply(batch);
                Ok(())
            }
        })
    }

    /// The row of `key`: the version written last and the value (`None` once deleted).
    fn row(&self, key: &str) -> Option<(u64, Option<Bytes>)> {
        self.rows.lock().unwrap().get(key.as_bytes()).cloned()
    }

    fn value(&self, key: &str) -> Option<Bytes> {
        self.rows
            .lock()
            .unwrap()
            .get(key.as_bytes())
            .and_then(|(_, v)| v.clone())
    }
}

#[tokio::test(start_paused = true)]
async fn a_hundred_thousand_writes_on_a_thousand_keys_coalesce_per_flush_window() {
    let writes = WriteBehind::builder("profiles", MemoryJobStore::new())
        .flush_interval(Duration::from_secs(1))
        .build()
        .unwrap();
    let database = Database::default();
    let flusher = database.clone().flusher(&writes);
    let start = tokio::time::Instant::now();
    let mut last = HashMap::new();
    let mut previous_version = 0;
    for round in 0..100u64 {
        for i in 0..1_000u64 {
            let key = format!("user:{}", (i * 7 + round) % 1_000);
            let value = format!("{round}-{i}");
            let version = writes.put(key.clone(), value.clone()).await.unwrap();
            assert!(version > previous_version);
            previous_version = version;
            last.insert(key, value);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let report = flusher.shutdown(Duration::from_secs(30)).await;
    let windows = (start.elapsed().as_secs_f64() / 1.0).ceil() as u64 + 1;
    let (calls, handed) = (
        database.calls.load(Ordering::Relaxed),
        database.writes.load(Ordering::Relaxed),
    );
    assert!(
        calls <= 1_000 * windows,
        "{calls} writer calls in {windows} windows"
    );
    assert!(
        handed <= 1_000 * windows,
        "{handed} writes handed over for 1,000 keys in {windows} windows"
    );
    assert_eq!(report.coalesced + report.writes, 100_000);
    assert_eq!((report.calls, report.writes), (calls, handed));
    for (key, value) in &last {
        assert_eq!(
            database.value(key).as_deref(),
            Some(value.as_bytes()),
            "{key}"
        );
    }
    assert_eq!(writes.queue().stats().await.unwrap().unfinished, 0);
}

/// One writer call: when it was made (since the writer started failing), whether it failed,
/// and the writes it was handed, by key and version.
#[derive(Debug)]
struct Call {
    at: Duration,
    failed: bool,
    writes: Vec<(Bytes, u64)>,
}

/// Writes made while the writer fails wait in the store, and a batch the writer failed is
/// kept and handed over again: once the writer recovers, the database has every key's last
/// write, including those of keys written only during the outage and never after.
#[tokio::test(start_paused = true)]
async fn a_writer_failing_for_thirty_seconds_then_recovering_loses_nothing() {
    let outage = Duration::from_secs(30);
    let writes = WriteBehind::builder("orders", MemoryJobStore::new())
        .flush_interval(Duration::from_millis(200))
        .build()
        .unwrap();
    // Each key's last write: its version, its value (`None`: deleted) and when it was made.
    let mut last: HashMap<String, (u64, Option<String>, Duration)> = HashMap::new();
    // Written once, before the flusher starts: the first batch the writer fails holds them.
    let early: Vec<String> = (0..10).map(|i| format!("early:{i}")).collect();
    for key in &early {
        let version = writes.put(key.clone(), "early").await.unwrap();
        last.insert(
            key.clone(),
            (version, Some("early".to_owned()), Duration::ZERO),
        );
    }
    let database = Database::default();
    let db = database.clone();
    let start = tokio::time::Instant::now();
    let calls: Arc<Mutex<Vec<Call>>> = Arc::default();
    let seen = calls.clone();
    let flusher = writes.start(move |batch: Vec<Write>| {
        let (db, seen) = (db.clone(), seen.clone());
        async move {
            let failed = start.elapsed() < outage;
            seen.lock().unwrap().push(Call {
                at: start.elapsed(),
                failed,
                writes: batch.iter().map(|w| (w.key.clone(), w.version)).collect(),
            });
            if failed {
                return Err(JobError::retry("database unreachable"));
            }
            db.apply(batch);
            Ok(())
        }
    });
    // `order:*` is written every second, through the outage and after it; `outage:{i}` only
    // from the first to the `1 + i % 25`th second, all within the outage.
    let during: Vec<String> = (0..50).map(|i| format!("outage:{i}")).collect();
    for second in 0..40u64 {
        let keys = (0..50u64).map(|i| (format!("order:{i}"), i)).chain(
            (0..50u64)
                .filter(|i| (1..=1 + i % 25).contains(&second))
                .map(|i| (format!("outage:{i}"), i)),
        );
        for (key, i) in keys {
            let at = start.elapsed();
            if second % 3 == 2 && i % 5 == 0 {
                let version = writes.delete(key.clone()).await.unwrap();
                last.insert(key, (version, None, at));
            } else {
                let value = format!("{second}");
                let version = writes.put(key.clone(), value.clone()).await.unwrap();
                last.insert(key, (version, Some(value), at));
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let report = flusher.shutdown(Duration::from_secs(60)).await;
    let calls = std::mem::take(&mut *calls.lock().unwrap());
    let failures = calls.iter().filter(|call| call.failed).count() as u64;
    assert!(failures >= 5, "the writer failed {failures} times");
    assert_eq!(report.failures, failures);
    let first_failure = calls.iter().position(|call| call.failed).unwrap();
    // Handed to the writer in a call it took, after the first failure.
    let taken_after_failure = |key: &str, version: u64| {
        calls[first_failure + 1..].iter().any(|call| {
            !call.failed
                && call
                    .writes
                    .contains(&(Bytes::copy_from_slice(key.as_bytes()), version))
        })
    };
    for key in &early {
        let version = last[key].0;
        assert!(
            calls[first_failure]
                .writes
                .contains(&(Bytes::copy_from_slice(key.as_bytes()), version)),
            "{key} was in the batch that failed first: {:?}",
            calls[first_failure]
        );
        assert!(
            taken_after_failure(key, version),
            "{key} v{version} handed over again"
        );
    }
    for key in &during {
        let (version, _, at) = &last[key];
        assert!(
            calls[first_failure].at < *at && *at < outage,
            "{key} last written at {at:?}, during the outage"
        );
        assert!(
            taken_after_failure(key, *version),
            "{key} v{version}, written during the outage, handed over once it ended"
        );
    }
    for (key, (version, value, _)) in &last {
        assert_eq!(
            database.row(key),
            Some((
                *version,
                value
                    .as_deref()
                    .map(|v| Bytes::copy_from_slice(v.as_bytes()))
            )),
            "{key}"
        );
    }
    let stats = writes.queue().stats().await.unwrap();
    assert_eq!((stats.unfinished, stats.dead), (0, 0));
}

#[tokio::test(start_paused = true)]
async fn shutdown_flushes_every_pending_write() {
    let writes = WriteBehind::builder("carts", MemoryJobStore::new())
        .flush_interval(Duration::from_secs(3600))
        .build()
        .unwrap();
    let database = Database::default();
    let flusher = database.clone().flusher(&writes);
    tokio::time::sleep(Duration::from_secs(1)).await;
    for i in 0..10 {
        writes.put(format!("cart:{i}"), "full").await.unwrap();
    }
    let report = flusher.shutdown(Duration::from_secs(5)).await;
    assert_eq!(report.writes, 10);
    assert!((0..10).all(|i| database.value(&format!("cart:{i}")).is_some()));
}

/// A writer that answers `JobError::fatal` says a batch can never be written: the flusher
/// hands its writes over one at a time, writes the others, and buries the one that fails
/// alone as a dead letter, instead of retrying the batch for ever behind it.
#[tokio::test(start_paused = true)]
async fn a_write_the_writer_refuses_for_good_is_dead_and_holds_back_no_other() {
    let writes = WriteBehind::builder("accounts", MemoryJobStore::new())
        .flush_interval(Duration::from_millis(100))
        .build()
        .unwrap();
    let database = Database::default();
    let db = database.clone();
    let flusher = writes.start(move |batch: Vec<Write>| {
        let db = db.clone();
        async move {
            if batch.iter().any(|write| write.key == "poison") {
                return Err(JobError::fatal("a constraint is violated"));
            }
            db.apply(batch);
            Ok(())
        }
    });
    // The poisoned key's earlier write, coalesced under the refused one, is not written
    // either: it is a dead letter too, not silently done.
    for (key, value) in [
        ("a", "v"),
        ("poison", "earlier"),
        ("poison", "v"),
        ("b", "v"),
    ] {
        writes.put(key, value).await.unwrap();
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(database.value("a").is_some() && database.value("b").is_some());
    let dead = writes.queue().dead_letters(10).await.unwrap();
    assert_eq!(dead.len(), 2, "{dead:?}");
    for id in dead {
        let status = writes.queue().status(id).await.unwrap().unwrap();
        assert!(
            status
                .error
                .as_deref()
                .unwrap()
                .contains("a constraint is violated"),
            "{status:?}"
        );
    }
    assert_eq!(writes.queue().stats().await.unwrap().unfinished, 0);
    flusher.shutdown(Duration::from_secs(1)).await;
}

/// A blip of the store while the shutdown flushes costs a retry, not the writes: the grace
/// is there to be used.
#[tokio::test(start_paused = true)]
async fn shutdown_flushes_every_pending_write_through_a_blip_of_the_store() {
    let store: SlowStore = SlowStore::default();
    let writes = WriteBehind::builder("carts", store.clone())
        .flush_interval(Duration::from_secs(3600))
        .build()
        .unwrap();
    let database = Database::default();
    let flusher = database.clone().flusher(&writes);
    tokio::time::sleep(Duration::from_secs(1)).await;
    for i in 0..10 {
        writes.put(format!("cart:{i}"), "full").await.unwrap();
    }
    store.failing_fetches.store(3, Ordering::Relaxed);
    let report = flusher.shutdown(Duration::from_secs(5)).await;
    assert_eq!(
        store.failing_fetches.load(Ordering::Relaxed),
        0,
        "the shutdown met every failing fetch of the blip"
    );
    assert_eq!(
        (report.writes, report.calls, report.abandoned),
        (10, 1, 0),
        "{report:?}"
    );
    assert_eq!(
        (
            database.calls.load(Ordering::Relaxed),
            database.writes.load(Ordering::Relaxed)
        ),
        (1, 10)
    );
    assert!((0..10).all(|i| database.value(&format!("cart:{i}")).is_some()));
}

#[tokio::test(start_paused = true)]
async fn a_full_backlog_refuses_writes_instead_of_buffering_without_end() {
    let writes = WriteBehind::builder("bounded", MemoryJobStore::new())
        .queue({
            let mut config = QueueConfig::default();
            config.max_len = 10;
            config
        })
        .build()
        .unwrap();
    for i in 0..10 {
        writes.put(format!("k{i}"), "v").await.unwrap();
    }
    let refused = writes.put("k10", "v").await.unwrap_err();
    assert!(
        matches!(refused, EnqueueError::Full { depth: 10, .. }),
        "{refused:?}"
    );
}

/// The value of `series` as `handle` renders it, if recorded.
fn value_of(handle: &metrics_exporter_prometheus::PrometheusHandle, series: &str) -> Option<f64> {
    handle
        .render()
        .lines()
        .find(|line| line.starts_with(series) && line[series.len()..].starts_with(' '))
        .map(|line| line[series.len()..].trim().parse::<f64>().unwrap())
}

/// The lag gauge of queue `queue`, as `handle` renders it.
fn lag_of(handle: &metrics_exporter_prometheus::PrometheusHandle, queue: &str) -> f64 {
    let series = format!(r#"headroom_jobs_write_behind_lag_seconds{{queue="{queue}"}}"#);
    value_of(handle, &series).unwrap()
}

#[test]
fn the_lag_grows_while_the_writer_fails_and_falls_when_it_recovers() {
    use metrics_exporter_prometheus::PrometheusBuilder;

    let recorder = PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    let lag = || lag_of(&handle, "lagging");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap();
    runtime.block_on(async {
        let writes = WriteBehind::builder("lagging", MemoryJobStore::new())
            .flush_interval(Duration::from_secs(1))
            .build()
            .unwrap();
        let start = tokio::time::Instant::now();
        let flusher = metrics::with_local_recorder(&recorder, || {
            writes.start(move |_batch: Vec<Write>| async move {
                if start.elapsed() < Duration::from_secs(30) {
                    return Err(JobError::retry("database unreachable"));
                }
                Ok(())
            })
        });
        writes.put("k", "v").await.unwrap();
        tokio::time::sleep(Duration::from_secs(20)).await;
        assert!(lag() >= 15.0, "lag {} s after 20 s of failures", lag());
        tokio::time::sleep(Duration::from_secs(45)).await;
        assert!(lag() <= 2.0, "lag {} s after the writer recovered", lag());
        flusher.shutdown(Duration::from_secs(1)).await;
    });
}

/// The store out of reach says nothing of the writes waiting in it: the lag does not fall to
/// zero, which would clear the alert on it, but goes on growing from its last reading.
#[test]
fn the_lag_goes_on_growing_while_the_store_is_out_of_reach() {
    use metrics_exporter_prometheus::PrometheusBuilder;

    let recorder = PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    support::current_thread().block_on(async {
        let store: SlowStore = SlowStore::default();
        let writes = WriteBehind::builder("unreachable", store.clone())
            .flush_interval(Duration::from_secs(1))
            .build()
            .unwrap();
        store.failing_fetches.store(usize::MAX, Ordering::Relaxed);
        let flusher = metrics::with_local_recorder(&recorder, || {
            writes.start(|_batch: Vec<Write>| async { Ok(()) })
        });
        writes.put("k", "v").await.unwrap();
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert!(lag_of(&handle, "unreachable") >= 8.0);
        store.failing_stats.store(true, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_secs(10)).await;
        let lag = lag_of(&handle, "unreachable");
        assert!(
            lag >= 18.0,
            "lag {lag} s after 10 s of the store out of reach"
        );
        store.failing_stats.store(false, Ordering::Relaxed);
        store.failing_fetches.store(0, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_secs(5)).await;
        let lag = lag_of(&handle, "unreachable");
        assert!(lag <= 2.0, "lag {lag} s once the store is back");
        flusher.shutdown(Duration::from_secs(1)).await;
    });
}

/// A flusher that starts (an instance restarting) while the store is out of reach, with an
/// acknowledged write still unwritten in it, has no reading to grow from: its lag grows from
/// its start rather than standing at zero for the whole outage.
#[test]
fn the_lag_grows_from_its_start_for_a_flusher_that_never_read_the_store() {
    use metrics_exporter_prometheus::PrometheusBuilder;

    let recorder = PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    support::current_thread().block_on(async {
        let store: SlowStore = SlowStore::default();
        let writes = WriteBehind::builder("restarted", store.clone())
            .flush_interval(Duration::from_secs(1))
            .build()
            .unwrap();
        writes.put("k", "v").await.unwrap();
        store.failing_fetches.store(usize::MAX, Ordering::Relaxed);
        store.failing_stats.store(true, Ordering::Relaxed);
        let database = Database::default();
        let flusher = metrics::with_local_recorder(&recorder, || database.clone().flusher(&writes));
        tokio::time::sleep(Duration::from_secs(10)).await;
        let lag = lag_of(&handle, "restarted");
        assert!(
            lag >= 8.0,
            "lag {lag} s after 10 s of a store out of reach since the flusher started"
        );
        store.failing_stats.store(false, Ordering::Relaxed);
        store.failing_fetches.store(0, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_secs(5)).await;
        let lag = lag_of(&handle, "restarted");
        assert!(lag <= 2.0, "lag {lag} s once the store is back");
        assert_eq!(database.value("k").as_deref(), Some(&b"v"[..]));
        flusher.shutdown(Duration::from_secs(1)).await;
    });
}

/// At low traffic the last reading can find no write waiting. A write acknowledged after it
/// and unwritten when the store goes out of reach then waits unseen: the lag grows from that
/// reading rather than standing at zero for the whole outage.
#[test]
fn the_lag_grows_through_an_outage_that_follows_a_reading_of_no_write() {
    use metrics_exporter_prometheus::PrometheusBuilder;

    let recorder = PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    support::current_thread().block_on(async {
        let store: SlowStore = SlowStore::default();
        let writes = WriteBehind::builder("quiet", store.clone())
            .flush_interval(Duration::from_secs(1))
            .build()
            .unwrap();
        let flusher = metrics::with_local_recorder(&recorder, || {
            writes.start(|_batch: Vec<Write>| async { Ok(()) })
        });
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert_eq!(lag_of(&handle, "quiet"), 0.0, "no write yet");
        // Reads fail from now on; the write itself is acknowledged.
        store.failing_fetches.store(usize::MAX, Ordering::Relaxed);
        store.failing_stats.store(true, Ordering::Relaxed);
        writes.put("k", "v").await.unwrap();
        tokio::time::sleep(Duration::from_secs(10)).await;
        let lag = lag_of(&handle, "quiet");
        assert!(
            lag >= 8.0,
            "lag {lag} s after 10 s of the store out of reach with a write unwritten"
        );
        store.failing_stats.store(false, Ordering::Relaxed);
        store.failing_fetches.store(0, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_secs(5)).await;
        let lag = lag_of(&handle, "quiet");
        assert!(lag <= 2.0, "lag {lag} s once the store is back");
        flusher.shutdown(Duration::from_secs(1)).await;
    });
}

/// A write buried as a dead letter counts in `headroom_jobs_attempts_total{outcome="dead"}`,
/// as a worker's dead job does: a corrupt write as well as one the writer refuses for good,
/// each once its burial landed. A burial the store failed leaves the write to be delivered
/// again, and buried then: it is counted once.
#[test]
fn writes_buried_as_dead_are_counted_dead_once() {
    use headroom_jobs::{Job, WriteBehindConfig};
    use metrics_exporter_prometheus::PrometheusBuilder;

    let recorder = PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    let dead = || {
        value_of(
            &handle,
            r#"headroom_jobs_attempts_total{queue="graveyard",outcome="dead"}"#,
        )
        .unwrap_or(0.0)
    };
    support::current_thread().block_on(async {
        let store: SlowStore = SlowStore::default();
        let (writes, flusher) = metrics::with_local_recorder(&recorder, || {
            let writes = WriteBehind::builder("graveyard", store.clone())
                .config({
                    let mut config = WriteBehindConfig::default();
                    config.flush_interval = Duration::from_millis(100);
                    config.visibility = Duration::from_secs(1);
                    config
                })
                .build()
                .unwrap();
            let flusher = writes.start(|batch: Vec<Write>| async move {
                if batch.iter().any(|write| write.key == "poison") {
                    return Err(JobError::fatal("a constraint is violated"));
                }
                Ok(())
            });
            (writes, flusher)
        });
        let dead_letters = || async { writes.queue().dead_letters(10).await.unwrap().len() };

        writes
            .queue()
            .enqueue(Job::new(Bytes::from_static(b"not a write")))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!((dead_letters().await, dead()), (1, 1.0), "a corrupt write");

        store.failing_buries.store(1, Ordering::Relaxed);
        writes.put("poison", "v").await.unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(store.failing_buries.load(Ordering::Relaxed), 0);
        assert_eq!(
            (dead_letters().await, dead()),
            (1, 1.0),
            "a refused write whose burial failed"
        );
        // Delivered again once its visibility ran out, and buried.
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(
            (dead_letters().await, dead()),
            (2, 2.0),
            "a refused write buried"
        );
        flusher.shutdown(Duration::from_secs(1)).await;
    });
}

/// A writer that blocks its thread is not cut off when the grace ends: the shutdown still
/// returns within its bound (the grace, then half the visibility for the hand-back). Real
/// time: a writer that blocks a thread needs a multi-threaded runtime, which cannot pause
/// time; real time is only the outer limit here, with slack for scheduling.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_returns_within_its_bound_though_the_writer_never_yields() {
    let (grace, visibility) = (Duration::from_secs(1), Duration::from_secs(1));
    let writes = WriteBehind::builder("stuck", MemoryJobStore::new())
        .config({
            let mut config = headroom_jobs::WriteBehindConfig::default();
            config.visibility = visibility;
            config
        })
        .build()
        .unwrap();
    writes.put("k", "v").await.unwrap();
    let started = Arc::new(tokio::sync::Notify::new());
    let (release, released) = std::sync::mpsc::channel::<()>();
    let released = Arc::new(Mutex::new(released));
    let notify = started.clone();
    let flusher = writes.start(move |_batch: Vec<Write>| {
        notify.notify_one();
        let _ = released.lock().unwrap().recv();
        std::future::ready(Ok(()))
    });
    started.notified().await;

    let bound = grace + visibility / 2;
    let shutdown =
        tokio::time::timeout(bound + Duration::from_secs(2), flusher.shutdown(grace)).await;
    release.send(()).unwrap();
    let report = shutdown.unwrap_or_else(|_| {
        panic!("shutdown({grace:?}) did not return within its bound of {bound:?}")
    });
    assert_eq!(
        (report.writes, report.calls, report.abandoned),
        (0, 0, 1),
        "the blocked write is reported as abandoned: {report:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_shutdown_with_an_endless_grace_returns_once_every_write_is_written() {
    let writes = WriteBehind::builder("endless", MemoryJobStore::new())
        .build()
        .unwrap();
    let database = Database::default();
    let flusher = database.clone().flusher(&writes);
    writes.put("k", "v").await.unwrap();
    let report = flusher.shutdown(Duration::MAX).await;
    assert_eq!((report.writes, report.abandoned), (1, 0));
    assert_eq!(database.value("k").as_deref(), Some(&b"v"[..]));
}

/// A shutdown out of time counts as abandoned only the writes its flusher neither wrote nor
/// handed back: not a corrupt write it buried, nor those of a chunk the writer took, nor those
/// it handed back before the store stopped answering.
#[tokio::test(start_paused = true)]
async fn only_writes_neither_written_nor_handed_back_are_abandoned() {
    use headroom_jobs::{Job, WriteBehindConfig};

    // The five writes of the chunk written, then two of the next, are handed back.
    let store = SlowStore::hanging_releases_after(7);
    let writes = WriteBehind::builder("stuck", store)
        .config({
            let mut config = WriteBehindConfig::default();
            config.batch = 5;
            config
        })
        .build()
        .unwrap();
    writes
        .queue()
        .enqueue(Job::new(Bytes::from_static(b"not a write")))
        .await
        .unwrap();
    for i in 0..10 {
        writes.put(format!("k{i}"), "v").await.unwrap();
    }
    let database = Database::default();
    let db = database.clone();
    // The first chunk is written; the second call never answers.
    let flusher = writes.start(move |batch: Vec<Write>| {
        let db = db.clone();
        async move {
            if db.calls.load(Ordering::Relaxed) > 0 {
                std::future::pending::<()>().await;
            }
            db.apply(batch);
            Ok(())
        }
    });
    let report = flusher.shutdown(Duration::from_secs(1)).await;
    assert_eq!(database.writes.load(Ordering::Relaxed), 5);
    assert_eq!(report.abandoned, 3, "{report:?}");
}

/// A shutdown that starts while the writer is busy still flushes the writes made meanwhile,
/// though the next flush interval is far off: the flusher sees the shutdown once the writer
/// returns rather than waiting for a later signal.
#[tokio::test(start_paused = true)]
async fn a_shutdown_during_a_writer_call_flushes_the_writes_made_meanwhile() {
    let writes = WriteBehind::builder("slow", MemoryJobStore::new())
        .flush_interval(Duration::from_secs(3600))
        .build()
        .unwrap();
    let database = Database::default();
    let db = database.clone();
    let entered = Arc::new(tokio::sync::Notify::new());
    let release = Arc::new(tokio::sync::Notify::new());
    let (on_entry, on_release) = (entered.clone(), release.clone());
    let flusher = writes.start(move |batch: Vec<Write>| {
        let (db, on_entry, on_release) = (db.clone(), on_entry.clone(), on_release.clone());
        async move {
            // Only the first call is held.
            if db.calls.load(Ordering::Relaxed) == 0 {
                on_entry.notify_one();
                on_release.notified().await;
            }
            db.apply(batch);
            Ok(())
        }
    });
    writes.put("a", "1").await.unwrap();
    // The next pass, an interval from now, hands "a" over.
    entered.notified().await;
    let shutdown = tokio::spawn(flusher.shutdown(Duration::from_secs(5)));
    tokio::task::yield_now().await;
    writes.put("b", "2").await.unwrap();
    release.notify_one();
    let report = shutdown.await.unwrap();
    assert_eq!(database.value("a").as_deref(), Some(&b"1"[..]));
    assert_eq!(database.value("b").as_deref(), Some(&b"2"[..]));
    assert_eq!(report.writes, 2);
}

/// A writer that panics while making its future, not only while running it, fails that call
/// only: the batch is written on a later call.
#[tokio::test(start_paused = true)]
async fn a_writer_panicking_before_its_future_is_called_again() {
    let writes = WriteBehind::builder("panicky", MemoryJobStore::new())
        .flush_interval(Duration::from_millis(100))
        .build()
        .unwrap();
    let database = Database::default();
    let db = database.clone();
    let calls = Arc::new(AtomicU64::new(0));
    let counted = calls.clone();
    let flusher = writes.start(move |batch: Vec<Write>| {
        assert!(
            counted.fetch_add(1, Ordering::Relaxed) > 0,
            "the writer's pool is empty"
        );
        let db = db.clone();
        async move {
            db.apply(batch);
            Ok(())
        }
    });
    writes.put("k", "v").await.unwrap();
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(database.value("k").as_deref(), Some(&b"v"[..]));
    let report = flusher.shutdown(Duration::from_secs(5)).await;
    assert_eq!((report.writes, report.failures), (1, 1));
}

/// Every partition's writes reach the writer in each round: a large backlog in one partition
/// does not hold back the others' until it is gone, not even writes made while it drains.
#[tokio::test(start_paused = true)]
async fn a_backlog_in_one_partition_does_not_hold_back_the_others() {
    use headroom_jobs::{Job, JobQueue, WriteBehindConfig};

    let two = || {
        let mut config = QueueConfig::default();
        config.partitions = 2;
        config
    };
    // A write goes to its partition by its key, as a job does by its route: the partition in
    // a job's id tells which.
    let probe = JobQueue::builder("probe", MemoryJobStore::new())
        .config(two())
        .build()
        .unwrap();
    let mut first = Vec::new();
    let mut second = None;
    for i in 0.. {
        let key = format!("k{i}");
        let id = probe
            .enqueue(Job::new("").route(key.clone()))
            .await
            .unwrap()
            .id;
        if id.to_string().starts_with("0-") {
            first.push(key);
        } else if second.is_none() {
            second = Some(key);
        }
        if first.len() == 1_000 && second.is_some() {
            break;
        }
    }
    let second = second.unwrap();
    let writes = Arc::new(
        WriteBehind::builder("fair", MemoryJobStore::new())
            .queue(two())
            .config({
                let mut config = WriteBehindConfig::default();
                config.batch = 10;
                config
            })
            .build()
            .unwrap(),
    );
    // A hundred batches in the first partition; the second is empty when flushing starts.
    for key in &first {
        writes.put(key.clone(), "v").await.unwrap();
    }
    let calls: Arc<Mutex<Vec<Vec<Bytes>>>> = Arc::default();
    let seen = calls.clone();
    // The twelfth writer call (in the first partition's second pass, after the second's
    // first, empty one) waits while the test writes to the second partition.
    let (write_now, mut told) =
        tokio::sync::mpsc::unbounded_channel::<tokio::sync::oneshot::Sender<()>>();
    let flusher = writes.start(move |batch: Vec<Write>| {
        let call = {
            let mut calls = seen.lock().unwrap();
            calls.push(batch.into_iter().map(|w| w.key).collect());
            calls.len()
        };
        let write_now = write_now.clone();
        async move {
            if call == 12 {
                let (done, written) = tokio::sync::oneshot::channel();
                write_now.send(done).unwrap();
                written.await.unwrap();
            }
            Ok(())
        }
    });
    let resume = told.recv().await.unwrap();
    writes.put(second.clone(), "v").await.unwrap();
    resume.send(()).unwrap();
    let report = flusher.shutdown(Duration::from_secs(60)).await;
    assert_eq!(report.writes, 1_001);
    let calls = calls.lock().unwrap();
    let at = calls
        .iter()
        .position(|call| call.iter().any(|key| key == second.as_bytes()))
        .unwrap();
    assert!(
        at <= 20,
        "the second partition's write came after {at} calls of the first"
    );
}

/// A corrupt write in a pass is buried, and the rest of the pass is written by one writer
/// call however long it takes: the buried write is no longer the pass's to extend, so it does
/// not end the pass as if it had been taken over.
#[tokio::test(start_paused = true)]
async fn a_corrupt_write_does_not_cut_off_a_slow_writer_call() {
    use headroom_jobs::Job;

    let writes = WriteBehind::builder("slow_db", MemoryJobStore::new())
        .flush_interval(Duration::from_millis(100))
        .build()
        .unwrap();
    writes
        .queue()
        .enqueue(Job::new(Bytes::from_static(b"not a write")))
        .await
        .unwrap();
    writes.put("k", "v").await.unwrap();
    let database = Database::default();
    let db = database.clone();
    let calls = Arc::new(AtomicU64::new(0));
    let counted = calls.clone();
    // The first call takes 30 s, past a third of the visibility (60 s).
    let flusher = writes.start(move |batch: Vec<Write>| {
        let db = db.clone();
        let first = counted.fetch_add(1, Ordering::Relaxed) == 0;
        async move {
            if first {
                tokio::time::sleep(Duration::from_secs(30)).await;
            }
            db.apply(batch);
            Ok(())
        }
    });
    tokio::time::sleep(Duration::from_secs(40)).await;
    assert_eq!(database.value("k").as_deref(), Some(&b"v"[..]));
    let report = flusher.shutdown(Duration::from_secs(5)).await;
    assert_eq!(
        calls.load(Ordering::Relaxed),
        1,
        "the slow call was not cut off"
    );
    assert_eq!((report.writes, report.calls), (1, 1));
}

/// A store out of reach for half the visibility (every call a round trip of 500 ms), from
/// just before the pass's first extension is due, costs the flusher none of its writes: an
/// extension that failed is tried again soon, so one lands before the hold runs out and no
/// other flusher takes the pass over while the writer works.
#[tokio::test(start_paused = true)]
async fn a_pass_stays_held_through_a_store_outage_of_half_its_visibility() {
    use headroom_chaos::{ChaosJobStore, Delay, Experiment, ExperimentConfig};
    use headroom_jobs::WriteBehindConfig;

    let experiment = Experiment::builder("outage").seed(7).build().unwrap();
    let store = ChaosJobStore::new(MemoryJobStore::new(), experiment.clone());
    let config = {
        let mut config = WriteBehindConfig::default();
        config.visibility = Duration::from_secs(30);
        config.flush_interval = Duration::from_millis(100);
        config
    };
    let instance = || {
        WriteBehind::builder("outage", store.clone())
            .config(config.clone())
            .build()
            .unwrap()
    };
    let (a, b) = (instance(), instance());
    for i in 0..10 {
        a.put(format!("k{i}"), "v").await.unwrap();
    }
    let round_trip = || Delay::Fixed(Duration::from_millis(500));
    let an_hour = Duration::from_secs(3600);
    experiment
        .start(ExperimentConfig::new(an_hour).latency(1.0, round_trip()))
        .unwrap();
    let start = tokio::time::Instant::now();
    let database = Database::default();
    // The first call takes 45 s.
    let slow = database
        .clone()
        .slow_first_flusher(&a, Duration::from_secs(45));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let other = database.clone().flusher(&b);
    tokio::time::sleep_until(start + Duration::from_secs(10)).await;
    experiment.stop();
    experiment
        .start(
            ExperimentConfig::new(an_hour)
                .latency(1.0, round_trip())
                .fault(1.0),
        )
        .unwrap();
    tokio::time::sleep_until(start + Duration::from_secs(25)).await;
    experiment.stop();
    experiment
        .start(ExperimentConfig::new(an_hour).latency(1.0, round_trip()))
        .unwrap();
    tokio::time::sleep_until(start + Duration::from_secs(60)).await;
    let held = slow.shutdown(Duration::from_secs(5)).await;
    let other = other.shutdown(Duration::from_secs(5)).await;
    assert_eq!(
        (held.writes, other.writes),
        (10, 0),
        "the pass was written by its holder, none of it taken over"
    );
    assert_eq!(
        database.writes.load(Ordering::Relaxed),
        10,
        "each key written once"
    );
}

/// A pass holding many writes keeps every one of them held while a slow writer works, even
/// when each extension takes a while: the writes are extended together, not one after the
/// other, so none goes a visibility unextended, is taken over by another flusher, and cuts
/// the writer's call off.
#[tokio::test(start_paused = true)]
async fn a_large_pass_stays_held_while_a_slow_writer_works() {
    use headroom_chaos::{ChaosJobStore, Delay, Experiment, ExperimentConfig};
    use headroom_jobs::WriteBehindConfig;

    let experiment = Experiment::builder("slow_store").seed(7).build().unwrap();
    let store = ChaosJobStore::new(MemoryJobStore::new(), experiment.clone());
    let config = {
        let mut config = WriteBehindConfig::default();
        config.batch = 100;
        config.visibility = Duration::from_secs(3);
        config.flush_interval = Duration::from_millis(100);
        config
    };
    let instance = || {
        WriteBehind::builder("held", store.clone())
            .config(config.clone())
            .build()
            .unwrap()
    };
    let (a, b) = (instance(), instance());
    for i in 0..1_000 {
        a.put(format!("k{i}"), "v").await.unwrap();
    }
    // From now on every store call takes 10 ms: a thousand extensions in a row, 10 s.
    experiment
        .start(
            ExperimentConfig::new(Duration::from_secs(3600))
                .latency(1.0, Delay::Fixed(Duration::from_millis(10))),
        )
        .unwrap();
    let database = Database::default();
    // The first call (the first chunk of A's pass) takes 20 s.
    let slow = database
        .clone()
        .slow_first_flusher(&a, Duration::from_secs(20));
    tokio::time::sleep(Duration::from_secs(1)).await;
    // Another instance's flusher, looking for writes whose holder went quiet.
    let other = database.clone().flusher(&b);
    tokio::time::sleep(Duration::from_secs(40)).await;
    let held = slow.shutdown(Duration::from_secs(5)).await;
    let other = other.shutdown(Duration::from_secs(5)).await;
    assert_eq!(
        (held.writes, other.writes),
        (1_000, 0),
        "the pass was written by its holder, none of it taken over"
    );
    assert_eq!(
        database.writes.load(Ordering::Relaxed),
        1_000,
        "each key written once"
    );
}

/// Writes taken by a fetch the store ran but whose reply was lost (a timeout) are not
/// stranded for their visibility (60 s): the flusher takes them back at its next pass and
/// hands them to the writer then.
#[tokio::test(start_paused = true)]
async fn writes_whose_fetch_reply_was_lost_reach_the_writer_at_the_next_pass() {
    let store = SlowStore::first_fetch_reply_lost(MemoryJobStore::new());
    let writes = WriteBehind::builder("carts", store).build().unwrap();
    for i in 0..10 {
        writes.put(format!("cart:{i}"), "full").await.unwrap();
    }
    let database = Database::default();
    let flusher = database.clone().flusher(&writes);
    // A few flush intervals (1 s), far within the visibility.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let written = (0..10)
        .filter(|i| database.value(&format!("cart:{i}")).is_some())
        .count();
    assert_eq!(written, 10, "the writes of the lost fetch waited");
    let report = flusher.shutdown(Duration::from_secs(5)).await;
    assert_eq!((report.writes, report.calls), (10, 1), "{report:?}");
    assert_eq!(writes.queue().stats().await.unwrap().unfinished, 0);
}

/// Of two instances' writes of a key, the one pending is the one the writer keeps, the
/// higher version, whichever reached the store last: here the instance whose clock is ahead
/// records its write first.
#[tokio::test(start_paused = true)]
async fn the_pending_write_of_a_key_is_its_highest_version() {
    let store = MemoryJobStore::new();
    let now = Duration::from_secs(1_700_000_000);
    let ahead = ManualClock::starting_at(now + Duration::from_millis(5));
    let behind = ManualClock::starting_at(now);
    let instance = |clock: &ManualClock| {
        WriteBehind::builder("profiles", store.clone())
            .clock(clock.clock())
            .build()
            .unwrap()
    };
    let (a, b) = (instance(&ahead), instance(&behind));
    let a_version = a.put(&b"ada"[..], &b"from a"[..]).await.unwrap();
    let b_version = b.put(&b"ada"[..], &b"from b"[..]).await.unwrap();
    assert!(b_version < a_version);
    let pending = a.pending(b"ada").await.unwrap().expect("a pending write");
    assert_eq!(
        (pending.version, pending.value),
        (a_version, Some(Bytes::from_static(b"from a")))
    );
}

/// Versions rise across the handles of a process, not per handle: a key's later write made
/// through another handle is kept by a writer that applies versions, though the first handle's
/// versions ran ahead of the clock (two writes within a microsecond; paused time stands still).
#[tokio::test(start_paused = true)]
async fn a_later_write_through_another_handle_of_the_process_is_kept() {
    let store = MemoryJobStore::new();
    let handle = || {
        WriteBehind::builder("profiles", store.clone())
            .build()
            .unwrap()
    };
    let (first, second) = (handle(), handle());
    first.put("bob", "b").await.unwrap();
    let earlier = first.put("ada", "from the first").await.unwrap();
    let later = second.put("ada", "from the second").await.unwrap();
    let database = Database::default();
    let report = database
        .clone()
        .flusher(&second)
        .shutdown(Duration::from_secs(5))
        .await;
    assert_eq!(report.writes, 2, "{report:?}");
    assert!(earlier < later, "versions {earlier} then {later}");
    assert_eq!(
        database.value("ada").as_deref(),
        Some(&b"from the second"[..])
    );
}

/// The memory store whose hand-backs (`release`) each take `takes` (a round trip), and are
/// refused with a timeout when `refused`, as by a store out of reach, without reaching it.
fn hand_backs(takes: Duration, refused: bool) -> Faults {
    let store = Faults::default();
    let fault = if refused {
        Fault::Hang(takes)
    } else {
        Fault::Delay(takes)
    };
    store.inject(&[support::Call::Release], None, fault, None);
    store
}

/// A writer whose calls never answer.
fn never_answering() -> impl headroom_jobs::Writer {
    |_batch: Vec<Write>| std::future::pending::<Result<(), JobError>>()
}

/// A write whose hand-back the store refused is neither written nor handed back: it waits
/// out its visibility like one a shutdown out of time leaves held, and is counted abandoned
/// with them, though the hand-backs ended within the bound.
#[tokio::test(start_paused = true)]
async fn writes_whose_hand_back_the_store_refused_are_abandoned() {
    let store = hand_backs(Duration::ZERO, true);
    let writes = WriteBehind::builder("refused", store).build().unwrap();
    for i in 0..10 {
        writes.put(format!("k{i}"), "v").await.unwrap();
    }
    let flusher = writes.start(never_answering());
    tokio::time::sleep(Duration::from_millis(100)).await;
    let report = flusher.shutdown(Duration::from_secs(1)).await;
    assert_eq!(report.abandoned, 10, "{report:?}");
    // Still held by the stopped flusher, not handed back.
    let stats = writes.queue().stats().await.unwrap();
    assert_eq!((stats.running, stats.ready), (10, 0), "{stats:?}");
}

/// A pass holds up to ten batches; handed back one after the other at 5 ms a round trip,
/// a thousand writes would take 5 s, past the shutdown's budget of half the visibility
/// (500 ms here). Handed back together, every one is back in the store within it.
#[tokio::test(start_paused = true)]
async fn a_full_pass_is_handed_back_within_the_shutdown_budget() {
    use headroom_jobs::WriteBehindConfig;

    let store = hand_backs(Duration::from_millis(5), false);
    let writes = WriteBehind::builder("handing-back", store.clone())
        .config({
            let mut config = WriteBehindConfig::default();
            config.batch = 100;
            config.visibility = Duration::from_secs(1);
            config
        })
        .build()
        .unwrap();
    for i in 0..1_000 {
        writes.put(format!("k{i}"), "v").await.unwrap();
    }
    let flusher = writes.start(never_answering());
    tokio::time::sleep(Duration::from_millis(100)).await;
    let grace = Duration::from_secs(1);
    let started = tokio::time::Instant::now();
    let report = flusher.shutdown(grace).await;
    assert_eq!(report.abandoned, 0, "{report:?}");
    assert!(started.elapsed() <= grace + Duration::from_millis(500));
    assert_eq!(store.reached(support::Call::Release), 1_000);
    // Back in the store, none held (waiting for the next fetch to make them ready).
    let stats = writes.queue().stats().await.unwrap();
    assert_eq!((stats.unfinished, stats.running), (1_000, 0), "{stats:?}");
}

/// How long a call to the partition out of reach takes to fail: a Redis client's command
/// timeout.
const HANG: Duration = Duration::from_secs(2);

/// The memory job store with one partition's node out of reach (the key whose local part is
/// `local`: a Redis Cluster master failing over): until healed, each fetch or recovery there
/// waits [`HANG`], then fails with a timeout without reaching the store.
fn hanging_partition(local: &str) -> Faults {
    let store = Faults::default();
    store.inject(
        &[support::Call::Fetch, support::Call::Recover],
        Some(local),
        Fault::Hang(HANG),
        None,
    );
    store
}

/// A queue configuration of four partitions.
fn four_partitions() -> QueueConfig {
    let mut config = QueueConfig::default();
    config.partitions = 4;
    config
}

/// `n` keys whose writes go to `partition` of a four-partition queue: a write goes to its
/// partition by its key, as a job does by its route, which the partition in a probe job's id
/// tells.
async fn keys_in(partition: u16, n: usize) -> Vec<String> {
    use headroom_jobs::{Job, JobQueue};

    let probe = JobQueue::builder("probe", MemoryJobStore::new())
        .config(four_partitions())
        .build()
        .unwrap();
    let mut keys = Vec::new();
    for i in 0.. {
        let key = format!("key-{i}");
        let id = probe
            .enqueue(Job::new("").route(key.clone()))
            .await
            .unwrap()
            .id;
        if id.partition() == partition {
            keys.push(key);
            if keys.len() == n {
                break;
            }
        }
    }
    keys
}

/// A writer that notes when it was handed each key.
fn noting_writer(
    seen: Arc<Mutex<HashMap<Bytes, tokio::time::Instant>>>,
) -> impl headroom_jobs::Writer {
    move |batch: Vec<Write>| {
        let now = tokio::time::Instant::now();
        let mut seen = seen.lock().unwrap();
        for write in batch {
            seen.entry(write.key).or_insert(now);
        }
        async { Ok(()) }
    }
}

/// Waits until the writer was handed `key`; answers when.
async fn handed_at(
    seen: &Mutex<HashMap<Bytes, tokio::time::Instant>>,
    key: &str,
) -> tokio::time::Instant {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(&at) = seen.lock().unwrap().get(key.as_bytes()) {
            return at;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{key} never reached the writer"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// One partition out of reach (its master failing over; each fetch or recovery there takes
/// the command timeout, 2 s, to fail) does not slow the flushing of the others: their writes
/// reach the writer within a flush interval, pass after pass, rather than each pass waiting
/// for another timeout.
#[tokio::test(start_paused = true)]
async fn a_partition_out_of_reach_holds_back_no_other_partitions_writes() {
    let interval = Duration::from_secs(1);
    let store = hanging_partition("{failover.0}");
    let writes = WriteBehind::builder("failover", store.clone())
        .queue(four_partitions())
        .flush_interval(interval)
        .build()
        .unwrap();
    let mut keys = Vec::new();
    for partition in 1..4 {
        keys.push(keys_in(partition, 10).await);
    }
    let seen: Arc<Mutex<HashMap<Bytes, tokio::time::Instant>>> = Arc::default();
    let flusher = writes.start(noting_writer(seen.clone()));
    // The flusher has met the outage.
    while store.failures() == 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let tried = store.failures();
    // Thirty writes over about 40 s, at varying points of the flush interval, through the
    // partition's tries again after its backoffs.
    for i in 0..30 {
        let key = &keys[i % 3][i / 3];
        let put = tokio::time::Instant::now();
        writes.put(key.clone(), "v").await.unwrap();
        let took = handed_at(&seen, key).await - put;
        assert!(
            took <= interval + Duration::from_millis(100),
            "write {i} (partition {}) reached the writer {took:?} after it was made, with a flush interval of {interval:?} ({} calls to the partition out of reach had failed)",
            1 + i % 3,
            store.failures(),
        );
        tokio::time::sleep(Duration::from_millis(330)).await;
    }
    assert!(
        store.failures() > tried + 3,
        "the partition out of reach was tried {} times more during the outage",
        store.failures() - tried
    );
    flusher.shutdown(Duration::from_secs(1)).await;
}

/// A partition whose node answers with an error no retry cures (a script error, say) is no
/// partition out of reach: it is not left out of the passes, so its writes are flushed at the
/// next interval once the error is gone.
#[tokio::test(start_paused = true)]
async fn a_partition_refusing_its_calls_is_tried_again_at_the_next_interval() {
    let interval = Duration::from_secs(1);
    let store = Faults::default();
    store.inject(
        &[support::Call::Fetch, support::Call::Recover],
        Some("{refusing.0}"),
        Fault::Fail(headroom_core::BackendErrorKind::Command),
        None,
    );
    let writes = WriteBehind::builder("refusing", store.clone())
        .queue(four_partitions())
        .flush_interval(interval)
        .build()
        .unwrap();
    let key = keys_in(0, 1).await.remove(0);
    let seen: Arc<Mutex<HashMap<Bytes, tokio::time::Instant>>> = Arc::default();
    let flusher = writes.start(noting_writer(seen.clone()));
    // Refused for long enough that a backoff would have grown to its top.
    while store.failures() < 8 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    store.heal();
    let back = tokio::time::Instant::now();
    writes.put(key.clone(), "v").await.unwrap();
    let took = handed_at(&seen, &key).await - back;
    assert!(
        took <= interval + Duration::from_millis(100),
        "the write reached the writer {took:?} after the refusals ended, with a flush interval of {interval:?}"
    );
    flusher.shutdown(Duration::from_secs(1)).await;
}

/// A backlog in one partition (ten passes' worth) is flushed pass after pass, each following
/// at once, while another partition is out of reach: only the first pass meets its timeout.
#[tokio::test(start_paused = true)]
async fn a_backlog_beside_a_partition_out_of_reach_is_flushed_pass_after_pass() {
    use headroom_jobs::WriteBehindConfig;

    let store = hanging_partition("{backlog.0}");
    let writes = WriteBehind::builder("backlog", store.clone())
        .queue(four_partitions())
        .config({
            let mut config = WriteBehindConfig::default();
            config.batch = 10;
            config
        })
        .build()
        .unwrap();
    let keys = keys_in(1, 1_000).await;
    for key in &keys {
        writes.put(key.clone(), "v").await.unwrap();
    }
    let seen: Arc<Mutex<HashMap<Bytes, tokio::time::Instant>>> = Arc::default();
    let start = tokio::time::Instant::now();
    let flusher = writes.start(noting_writer(seen.clone()));
    let mut last = start;
    for key in &keys {
        last = last.max(handed_at(&seen, key).await);
    }
    let took = last - start;
    assert!(
        took <= HANG + Duration::from_millis(100),
        "a backlog of ten passes took {took:?} to reach the writer ({} calls to the partition out of reach failed meanwhile)",
        store.failures(),
    );
    flusher.shutdown(Duration::from_secs(1)).await;
}

/// A partition that was out of reach is flushed again once it answers: the writes made to it
/// during the outage reach the writer within its longest backoff (5 s), one failing call
/// (the command timeout) and a flush interval of the end of the outage.
#[tokio::test(start_paused = true)]
async fn writes_made_to_a_partition_out_of_reach_are_flushed_once_it_is_back() {
    let store = hanging_partition("{failback.0}");
    let writes = WriteBehind::builder("failback", store.clone())
        .queue(four_partitions())
        .build()
        .unwrap();
    let stranded = keys_in(0, 10).await;
    let seen: Arc<Mutex<HashMap<Bytes, tokio::time::Instant>>> = Arc::default();
    let flusher = writes.start(noting_writer(seen.clone()));
    for key in &stranded {
        writes.put(key.clone(), "v").await.unwrap();
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
    assert!(store.failures() > 0);
    assert!(seen.lock().unwrap().is_empty());
    store.heal();
    let back = tokio::time::Instant::now();
    for key in &stranded {
        let took = handed_at(&seen, key).await.saturating_duration_since(back);
        assert!(
            took <= Duration::from_secs(5) + HANG + Duration::from_secs(1),
            "{key} reached the writer {took:?} after its partition was back"
        );
    }
    let report = flusher.shutdown(Duration::from_secs(5)).await;
    assert_eq!(report.writes, 10, "{report:?}");
    assert_eq!(writes.queue().stats().await.unwrap().unfinished, 0);
}
