//! The memory job store's bound in bytes, on a manual clock.

use std::time::Duration;

use bytes::Bytes;
use headroom_core::jobs::{EnqueueLimits, Enqueued, FetchRequest, JobStore, NewJob};
use headroom_core::memory::MemoryJobStore;
use headroom_core::{BackendErrorKind, Key, ManualClock, Namespace};

fn limits() -> EnqueueLimits {
    EnqueueLimits {
        max_len: u64::MAX,
        max_per_tenant: None,
        dedup_window: Duration::from_secs(60),
    }
}

#[tokio::test]
async fn the_store_refuses_jobs_past_its_bytes_and_takes_them_back_as_records_expire() {
    let clock = ManualClock::new();
    let store = MemoryJobStore::builder()
        .clock(clock.clock())
        .max_bytes(64 * 1024)
        .build();
    let p = Namespace::new("jobs").unwrap().key("{q}").unwrap();
    let big = NewJob::new(Bytes::from(vec![7u8; 10 * 1024]));
    let mut added = 0;
    let refused = loop {
        match store.enqueue(&p, &big, &limits()).await {
            Ok(Enqueued::Added(_)) => added += 1,
            Ok(other) => panic!("{other:?}"),
            Err(error) => break error,
        }
        assert!(added <= 6, "64 KiB held more than six 10 KiB jobs");
    };
    assert_eq!(refused.kind(), BackendErrorKind::Unavailable);
    assert_eq!(added, 6);
    assert!(store.bytes() <= 64 * 1024);

    // Completing drops the payload; the record goes with its retention.
    let request = FetchRequest {
        consumer: "w",
        lanes: &[0],
        max: 6,
        visibility: Duration::from_secs(60),
    };
    for delivery in store.fetch(&p, request).await.unwrap() {
        store
            .complete(
                &p,
                delivery.number,
                delivery.attempt,
                Bytes::new(),
                Duration::from_secs(1),
            )
            .await
            .unwrap();
    }
    assert!(
        store.bytes() < 6 * 1024,
        "{} bytes after completion",
        store.bytes()
    );
    clock.advance(Duration::from_secs(1));
    assert!(matches!(
        store.enqueue(&p, &big, &limits()).await,
        Ok(Enqueued::Added(_))
    ));
    // Only the new job is left: six finished records went with their retention.
    assert!(store.bytes() < 11 * 1024, "{} bytes", store.bytes());
}

#[tokio::test]
async fn finished_records_make_room_for_new_jobs_before_their_retention_ends() {
    let store = MemoryJobStore::builder().max_bytes(64 * 1024).build();
    let p = Namespace::new("jobs").unwrap().key("{q}").unwrap();
    let job = NewJob::new(Bytes::from(vec![1u8; 1024]));
    let request = FetchRequest {
        consumer: "w",
        lanes: &[0],
        max: 1,
        visibility: Duration::from_secs(60),
    };
    // Far more jobs than the bound holds, each finished with a day's retention.
    for _ in 0..2_000 {
        assert!(matches!(
            store.enqueue(&p, &job, &limits()).await,
            Ok(Enqueued::Added(_))
        ));
        let delivery = store.fetch(&p, request).await.unwrap().pop().unwrap();
        store
            .complete(
                &p,
                delivery.number,
                delivery.attempt,
                Bytes::from(vec![2u8; 512]),
                Duration::from_secs(86_400),
            )
            .await
            .unwrap();
    }
    assert!(store.bytes() <= 64 * 1024);
}

/// Dedup keys of finished jobs do not fill the store for their window: once no finished
/// record is left to drop, the keys whose window ends first go, and new work is taken.
#[tokio::test]
async fn dedup_keys_make_room_for_new_jobs_before_their_window_ends() {
    let store = MemoryJobStore::builder().max_bytes(64 * 1024).build();
    let p = Namespace::new("jobs").unwrap().key("{q}").unwrap();
    let day = day_window();
    // Far more keys than the bound holds, each job done at once.
    finish_keyed_jobs(&store, &p, 0, &day).await;
    assert!(store.bytes() <= 64 * 1024);
    // The latest key still answers with its job.
    let again = NewJob::new(Bytes::from_static(b"x")).dedup_key(format!("{:0>255}", 1_999));
    assert!(matches!(
        store.enqueue(&p, &again, &day).await,
        Ok(Enqueued::Duplicate(_))
    ));
}

/// Making room never costs an unfinished job its dedup key: a retried keyed enqueue of a job
/// still queued answers that job, however full the store.
#[tokio::test]
async fn dedup_keys_of_unfinished_jobs_stay() {
    let store = MemoryJobStore::builder().max_bytes(64 * 1024).build();
    let p = Namespace::new("jobs").unwrap().key("{q}").unwrap();
    let day = day_window();
    let first = NewJob::new(Bytes::from_static(b"charge")).dedup_key("order-1");
    let Ok(Enqueued::Added(number)) = store.enqueue(&p, &first, &day).await else {
        panic!("added");
    };
    // Far more keys than the bound holds, each job (in another lane) done at once.
    finish_keyed_jobs(&store, &p, 1, &day).await;
    let retried = store.enqueue(&p, &first, &day).await.unwrap();
    assert!(
        matches!(retried, Enqueued::Duplicate(n) if n == number),
        "{retried:?}"
    );
}

/// Past any number of unfinished keyed jobs whose keys end first, the keys of finished jobs
/// still make room: only unfinished work filling the bound refuses an enqueue.
#[tokio::test]
async fn dedup_keys_of_finished_jobs_make_room_behind_many_unfinished_ones() {
    let time = ManualClock::new();
    let store = MemoryJobStore::builder()
        .clock(time.clock())
        .max_bytes(64 * 1024)
        .build();
    let p = Namespace::new("jobs").unwrap().key("{q}").unwrap();
    let day = day_window();
    for i in 0..100 {
        let job = NewJob::new(Bytes::from_static(b"charge")).dedup_key(format!("order-{i}"));
        assert!(matches!(
            store.enqueue(&p, &job, &day).await,
            Ok(Enqueued::Added(_))
        ));
    }
    // Their windows end first.
    time.advance(Duration::from_millis(1));
    finish_keyed_jobs(&store, &p, 1, &day).await;
    assert!(store.bytes() <= 64 * 1024);
}

/// An enqueue the queue's bound refuses makes no room: kept results and the dedup keys of
/// finished jobs go only for work that is taken, so a refusal does not let a retried keyed
/// enqueue run its job a second time.
#[tokio::test]
async fn a_refused_enqueue_drops_no_kept_result_or_dedup_key() {
    let one = EnqueueLimits {
        max_len: 1,
        ..day_window()
    };
    // Too large to fit beside what is kept, and refused by the queue's bound anyway.
    let refused = refusal_keeps_what_was_kept(&one, 512, 1_200).await;
    assert!(matches!(refused, Ok(Enqueued::Full { .. })), "{refused:?}");
}

/// The same for an enqueue the store's bytes refuse: when dropping every kept result and
/// finished job's key would not make room for it (unfinished work fills the bound), nothing
/// is dropped.
#[tokio::test]
async fn an_enqueue_no_room_can_be_made_for_drops_no_kept_result_or_dedup_key() {
    let refused = refusal_keeps_what_was_kept(&day_window(), 1_200, 600).await;
    assert_eq!(refused.unwrap_err().kind(), BackendErrorKind::Unavailable);
}

/// On a store of 2 KiB: a keyed job done, a job of `queued` bytes queued, then an enqueue of
/// `refused` bytes, whose answer is returned, after checking that the done job's result and
/// dedup key are still kept.
async fn refusal_keeps_what_was_kept(
    limits: &EnqueueLimits,
    queued: usize,
    refused: usize,
) -> Result<Enqueued, headroom_core::BackendError> {
    let store = MemoryJobStore::builder().max_bytes(2 * 1024).build();
    let p = Namespace::new("jobs").unwrap().key("{q}").unwrap();
    let keyed = NewJob::new(Bytes::from_static(b"charge")).dedup_key("order-1");
    let Ok(Enqueued::Added(number)) = store.enqueue(&p, &keyed, limits).await else {
        panic!("added");
    };
    let request = FetchRequest {
        consumer: "w",
        lanes: &[0],
        max: 1,
        visibility: Duration::from_secs(60),
    };
    let delivery = store.fetch(&p, request).await.unwrap().pop().unwrap();
    let retention = day_window().dedup_window;
    store
        .complete(
            &p,
            number,
            delivery.attempt,
            Bytes::from_static(b"ok"),
            retention,
        )
        .await
        .unwrap();
    let queued = NewJob::new(Bytes::from(vec![b'q'; queued]));
    assert!(matches!(
        store.enqueue(&p, &queued, limits).await,
        Ok(Enqueued::Added(_))
    ));
    let answer = store
        .enqueue(&p, &NewJob::new(Bytes::from(vec![b'l'; refused])), limits)
        .await;
    assert!(
        store.status(&p, number).await.unwrap().is_some(),
        "the finished job's result was dropped for a refused enqueue"
    );
    let retried = store.enqueue(&p, &keyed, limits).await.unwrap();
    assert!(
        matches!(retried, Enqueued::Duplicate(n) if n == number),
        "the dedup key was dropped for a refused enqueue: {retried:?}"
    );
    answer
}

/// Limits with a dedup window of a day.
fn day_window() -> EnqueueLimits {
    EnqueueLimits {
        dedup_window: Duration::from_secs(86_400),
        ..limits()
    }
}

/// Enqueues 2,000 jobs in `lane`, each with its own 255-byte dedup key, and completes each
/// at once.
async fn finish_keyed_jobs(store: &MemoryJobStore, p: &Key, lane: u8, day: &EnqueueLimits) {
    let request = FetchRequest {
        consumer: "w",
        lanes: &[lane],
        max: 1,
        visibility: Duration::from_secs(60),
    };
    for i in 0..2_000 {
        let job = NewJob::new(Bytes::from_static(b"x"))
            .lane(lane)
            .dedup_key(format!("{i:0>255}"));
        let added = store.enqueue(p, &job, day).await;
        assert!(
            matches!(added, Ok(Enqueued::Added(_))),
            "job {i}: {added:?}"
        );
        let delivery = store.fetch(p, request).await.unwrap().pop().unwrap();
        store
            .complete(
                p,
                delivery.number,
                delivery.attempt,
                Bytes::new(),
                Duration::from_secs(60),
            )
            .await
            .unwrap();
    }
}
