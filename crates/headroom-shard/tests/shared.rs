//! Migrations shared by several routers through a migration store: in memory, and on a real
//! Redis with three routers on separate connections migrating together under writes.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use headroom_core::memory::MemoryMigrationStore;
use headroom_core::migration::MigrationStore;
use headroom_core::migration::{MigrationRecord, Transition};
use headroom_core::{BackendError, Key, Namespace};
use headroom_redis::{Redis, RedisConfig, RedisMigrationStore};
use headroom_shard::{
    JumpRouter, Migration, MigrationError, MigrationErrorKind, Phase, ReadPolicy, Session,
    SharedMigration, Topology,
};
use headroom_testkit::RedisServer;

type Node = &'static str;
type Shared = Arc<Topology<Node, JumpRouter>>;

/// 8 logical shards: `a` holds 0..4 and `b` 4..8; the target moves 6..8 from `b` to `c`.
fn topologies() -> (Shared, Shared) {
    let build = |epoch, last: Node| {
        Topology::builder(JumpRouter::new(8).unwrap())
            .epoch(epoch)
            .node("a", "a")
            .node("b", "b")
            .node(last, last)
            .shards(0..4, "a", &[])
            .shards(4..6, "b", &[])
            .shards(6..8, last, &[])
            .build()
            .unwrap()
    };
    let from = Topology::builder(JumpRouter::new(8).unwrap())
        .epoch(1)
        .node("a", "a")
        .node("b", "b")
        .shards(0..4, "a", &[])
        .shards(4..8, "b", &[])
        .build()
        .unwrap();
    (Arc::new(from), Arc::new(build(2, "c")))
}

async fn join<S: MigrationStore + Clone>(
    store: &S,
    ns: &Namespace,
    id: &str,
) -> SharedMigration<Node, JumpRouter, S> {
    participant(store, ns, id, Duration::from_secs(60)).await
}

async fn participant<S: MigrationStore + Clone>(
    store: &S,
    ns: &Namespace,
    id: &str,
    lease: Duration,
) -> SharedMigration<Node, JumpRouter, S> {
    let (from, to) = topologies();
    let migration = Migration::new("shared", from, to).unwrap();
    SharedMigration::new(migration, store.clone(), ns.key("m").unwrap(), id)
        .lease(lease)
        .poll(Duration::from_millis(100))
        .join()
        .await
        .unwrap()
}

/// A key that moves from `b` to `c`.
fn moving_key() -> u64 {
    let (from, to) = topologies();
    (0..1000u64)
        .find(|k| from.write(k).unwrap().node_id() != to.write(k).unwrap().node_id())
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn participants_follow_the_shared_phase() {
    let store = MemoryMigrationStore::new();
    let ns = Namespace::new("follow").unwrap();
    let driver = join(&store, &ns, "driver").await;
    let other = join(&store, &ns, "other").await;
    let key = moving_key();
    driver.migration().report_copied(1, 1);
    assert_eq!(driver.advance().await.unwrap(), Phase::DualWrite);
    // The other router learns the phase from the store, not from the driver.
    assert_eq!(other.migration().phase(), Phase::Copy);
    assert_eq!(other.refresh().await.unwrap(), Phase::DualWrite);
    assert_eq!(driver.advance().await.unwrap(), Phase::ShadowRead);
    let (from, to) = topologies();
    let stale = Migration::new("stale", from, to).unwrap();
    let stale = SharedMigration::new(stale, store.clone(), ns.key("m").unwrap(), "late")
        .join()
        .await
        .unwrap();
    assert_eq!(stale.migration().phase(), Phase::ShadowRead);

    // The cut-over waits for `other`, which still has a write in flight to the old owner.
    let held = other.migration().write(&key).unwrap();
    assert_eq!(held.owner().node_id(), "b");
    assert_eq!(held.mirror().unwrap().node_id(), "c");
    let driver = Arc::new(driver);
    let cut_over = tokio::spawn({
        let driver = Arc::clone(&driver);
        async move { driver.advance().await }
    });
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(
        !cut_over.is_finished(),
        "cut-over ended with a participant behind"
    );
    // `other` sees the cut-over, stops routing to `b`, and acknowledges once its write is done.
    assert_eq!(stale.refresh().await.unwrap(), Phase::CutOver);
    let refresh = other.refresh();
    tokio::pin!(refresh);
    tokio::select! {
        _ = &mut refresh => panic!("acknowledged the cut-over with a write in flight"),
        () = tokio::time::sleep(Duration::from_secs(1)) => {}
    }
    assert_eq!(
        other.migration().write(&key).unwrap().owner().node_id(),
        "c"
    );
    drop(held);
    assert_eq!(refresh.await.unwrap(), Phase::CutOver);
    assert_eq!(cut_over.await.unwrap().unwrap(), Phase::CutOver);
    assert_eq!(driver.settled().await.unwrap(), Phase::CutOver);
    // Too late to roll back.
    assert_eq!(
        other.rollback().await.unwrap_err().kind(),
        MigrationErrorKind::RolledBack
    );
}

/// A driver leaves the copy of a sampled plan only once it is reported, even when no sample
/// key moved (a jump from a million shards to one more): the plan may miss real moves.
#[tokio::test(start_paused = true)]
async fn a_shared_copy_of_an_empty_sampled_plan_ends_only_once_reported() {
    let build = |epoch, shards: u32| {
        Topology::builder(JumpRouter::new(shards).unwrap())
            .epoch(epoch)
            .node("a", "a")
            .node("b", "b")
            .shards(0..1_000_000, "a", &[])
            .shards(1_000_000..shards, "b", &[])
            .build()
            .unwrap()
    };
    let migration = Migration::new(
        "sampled",
        Arc::new(build(1, 1_000_000)),
        Arc::new(build(2, 1_000_001)),
    )
    .unwrap();
    assert_eq!(migration.plan().unit_count(), 0, "no sample key moved");
    let store = MemoryMigrationStore::new();
    let ns = Namespace::new("sampled").unwrap();
    let driver = SharedMigration::new(migration, store, ns.key("m").unwrap(), "driver")
        .join()
        .await
        .unwrap();
    for step in [
        driver.advance().await,
        driver.advance_to(Phase::DualWrite).await,
    ] {
        assert_eq!(
            step.map_err(|e| e.kind()),
            Err(MigrationErrorKind::CopyIncomplete)
        );
    }
    driver.migration().report_copied(1, 1);
    assert_eq!(driver.advance().await.unwrap(), Phase::DualWrite);
}

/// A step taken by phase is taken once: a second driver asking for the same step, or a retry
/// after a lost answer, moves nothing, and a step past the next phase is refused (not to be
/// retried: `advance` would move one step further from wherever the phase is).
#[tokio::test(start_paused = true)]
async fn a_step_taken_twice_moves_the_phase_once() {
    let store = MemoryMigrationStore::new();
    let ns = Namespace::new("step-twice").unwrap();
    let first = join(&store, &ns, "first").await;
    let second = join(&store, &ns, "second").await;
    for driver in [&first, &second] {
        driver.migration().report_copied(1, 1);
    }
    assert_eq!(
        first.advance_to(Phase::DualWrite).await.unwrap(),
        Phase::DualWrite
    );
    assert_eq!(
        second.advance_to(Phase::DualWrite).await.unwrap(),
        Phase::DualWrite
    );
    assert_eq!(first.refresh().await.unwrap(), Phase::DualWrite);
    // Past the next phase: shadow reads would be skipped.
    let skipped = second.advance_to(Phase::CutOver).await.unwrap_err();
    assert_eq!(skipped.kind(), MigrationErrorKind::Conflict);
    // A retry policy leaves a refused step alone: the driver decides again.
    assert!(!headroom_core::Classify::is_retryable(&skipped));
    assert_eq!(
        second.advance_to(Phase::ShadowRead).await.unwrap(),
        Phase::ShadowRead
    );
    assert_eq!(first.refresh().await.unwrap(), Phase::ShadowRead);
    // Behind the shared phase: refused, nothing moves.
    let behind = first.advance_to(Phase::DualWrite).await.unwrap_err();
    assert_eq!(behind.kind(), MigrationErrorKind::Conflict);
    // Into the cut-over, taken twice: the second waits for the participants as the first did.
    let cut_over = first.advance_to(Phase::CutOver);
    let taken_on = async {
        tokio::time::sleep(Duration::from_secs(1)).await;
        second.refresh().await
    };
    let (cut_over, taken_on) = tokio::join!(cut_over, taken_on);
    assert_eq!(cut_over.unwrap(), Phase::CutOver);
    assert_eq!(taken_on.unwrap(), Phase::CutOver);
    assert_eq!(
        second.advance_to(Phase::CutOver).await.unwrap(),
        Phase::CutOver
    );
    assert_eq!(first.refresh().await.unwrap(), Phase::CutOver);
}

/// A store that sends every transition twice and answers the second (as a cluster client
/// does when the connection drops before the first answer): the first applies it.
#[derive(Clone, Debug, Default)]
struct SentTwice(MemoryMigrationStore);

impl MigrationStore for SentTwice {
    async fn create(
        &self,
        key: &Key,
        record: MigrationRecord,
    ) -> Result<MigrationRecord, BackendError> {
        self.0.create(key, record).await
    }

    async fn load(&self, key: &Key) -> Result<Option<MigrationRecord>, BackendError> {
        self.0.load(key).await
    }

    async fn transition(
        &self,
        key: &Key,
        expected: MigrationRecord,
        phase: u8,
    ) -> Result<Transition, BackendError> {
        self.0.transition(key, expected, phase).await?;
        self.0.transition(key, expected, phase).await
    }

    async fn acknowledge(
        &self,
        key: &Key,
        participant: &str,
        phase: u8,
        lease: Duration,
    ) -> Result<(), BackendError> {
        self.0.acknowledge(key, participant, phase, lease).await
    }

    async fn lagging(&self, key: &Key, phase: u8) -> Result<u64, BackendError> {
        self.0.lagging(key, phase).await
    }

    async fn remove(&self, key: &Key) -> Result<(), BackendError> {
        self.0.remove(key).await
    }
}

/// A step whose transition was applied by a first sending, whose answer was lost, is taken:
/// `advance_to` answers the phase, and into the cut-over waits for the participants, rather
/// than report a conflict with itself.
#[tokio::test(start_paused = true)]
async fn a_step_sent_twice_is_taken_and_waits_for_the_participants() {
    let store = SentTwice::default();
    let ns = Namespace::new("sent-twice").unwrap();
    let driver = join(&store, &ns, "driver").await;
    let other = join(&store, &ns, "other").await;
    driver.migration().report_copied(1, 1);
    for phase in [Phase::DualWrite, Phase::ShadowRead] {
        assert_eq!(driver.advance_to(phase).await.unwrap(), phase);
    }
    assert_eq!(other.refresh().await.unwrap(), Phase::ShadowRead);
    let cut_over = driver.advance_to(Phase::CutOver);
    tokio::pin!(cut_over);
    tokio::select! {
        ended = &mut cut_over => panic!("the cut-over ended with a participant behind: {ended:?}"),
        () = tokio::time::sleep(Duration::from_secs(1)) => {}
    }
    assert_eq!(other.refresh().await.unwrap(), Phase::CutOver);
    assert_eq!(cut_over.await.unwrap(), Phase::CutOver);
}

type Participant = Arc<SharedMigration<Node, JumpRouter, MemoryMigrationStore>>;

/// Two participants in a memory store under namespace `ns`, with `lease`: a driver, and
/// another that follows the shared phase in a task of its own.
async fn driver_and_follower(
    ns: &str,
    lease: Duration,
) -> (Participant, Participant, tokio::task::JoinHandle<()>) {
    let store = MemoryMigrationStore::new();
    let ns = Namespace::new(ns).unwrap();
    let driver = Arc::new(participant(&store, &ns, "driver", lease).await);
    let other = Arc::new(participant(&store, &ns, "other", lease).await);
    let following = tokio::spawn({
        let other = Arc::clone(&other);
        async move { other.follow().await }
    });
    (driver, other, following)
}

/// A participant that follows the phase but whose write to an old owner outlasts its lease is
/// alive: the cut-over waits for it, however long the write takes.
#[tokio::test(start_paused = true)]
async fn a_live_participant_whose_write_outlasts_its_lease_is_waited_for() {
    let lease = Duration::from_secs(2);
    let (driver, other, following) = driver_and_follower("long-write", lease).await;
    driver.migration().report_copied(1, 1);
    assert_eq!(driver.advance().await.unwrap(), Phase::DualWrite);
    assert_eq!(driver.advance().await.unwrap(), Phase::ShadowRead);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(other.migration().phase(), Phase::ShadowRead);

    let held = other.migration().write(&moving_key()).unwrap();
    assert_eq!(held.owner().node_id(), "b");
    let cut_over = tokio::spawn({
        let driver = Arc::clone(&driver);
        async move { driver.advance().await }
    });
    tokio::time::sleep(5 * lease).await;
    assert!(
        !cut_over.is_finished(),
        "the cut-over ended while a live participant still writes to an old owner"
    );
    drop(held);
    assert_eq!(cut_over.await.unwrap().unwrap(), Phase::CutOver);
    following.abort();
}

/// A second refresh in the same participant (a request handler's, beside its follow task)
/// while the cut-over waits for its write to an old owner does not acknowledge the cut-over
/// for it: the write is still in flight.
#[tokio::test(start_paused = true)]
async fn a_second_refresh_during_the_wait_does_not_acknowledge_the_cut_over_early() {
    let lease = Duration::from_secs(2);
    let (driver, other, following) = driver_and_follower("second-refresh", lease).await;
    driver.migration().report_copied(1, 1);
    assert_eq!(driver.advance().await.unwrap(), Phase::DualWrite);
    assert_eq!(driver.advance().await.unwrap(), Phase::ShadowRead);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(other.migration().phase(), Phase::ShadowRead);

    let held = other.migration().write(&moving_key()).unwrap();
    // Polls (every 100 ms) at distinct instants: the follow task renews at x00, the second
    // refresh at x15, and the driver checks at x30, after both.
    let ms = Duration::from_millis;
    tokio::time::sleep(ms(30)).await;
    let cut_over = tokio::spawn({
        let driver = Arc::clone(&driver);
        async move { driver.advance().await }
    });
    // The follow task has taken the cut-over on (at 1.1 s) and waits for the write.
    tokio::time::sleep(ms(85)).await;
    assert_eq!(other.migration().phase(), Phase::CutOver);
    let second = tokio::spawn({
        let other = Arc::clone(&other);
        async move { other.refresh().await }
    });
    tokio::time::sleep(5 * lease).await;
    assert!(
        !cut_over.is_finished(),
        "the cut-over ended while a live participant still writes to an old owner"
    );
    drop(held);
    assert_eq!(cut_over.await.unwrap().unwrap(), Phase::CutOver);
    assert_eq!(second.await.unwrap().unwrap(), Phase::CutOver);
    following.abort();
}

/// A shared rollback returns once no live participant has a mirrored write in flight, so the
/// copies on the new owners can be dropped then, not before.
#[tokio::test(start_paused = true)]
async fn a_shared_rollback_waits_for_every_participants_mirrored_writes() {
    let lease = Duration::from_secs(2);
    let (driver, other, following) = driver_and_follower("rollback-wait", lease).await;
    driver.migration().report_copied(1, 1);
    assert_eq!(driver.advance().await.unwrap(), Phase::DualWrite);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(other.migration().phase(), Phase::DualWrite);

    let held = other.migration().write(&moving_key()).unwrap();
    assert!(held.mirror().is_some());
    let rollback = tokio::spawn({
        let driver = Arc::clone(&driver);
        async move { driver.rollback().await }
    });
    tokio::time::sleep(5 * lease).await;
    assert!(
        !rollback.is_finished(),
        "the rollback ended while a live participant still mirrors a write"
    );
    assert_eq!(other.migration().phase(), Phase::RolledBack);
    drop(held);
    rollback.await.unwrap().unwrap();
    following.abort();
}

/// A cut-over whose wait was dropped is waited for again before the cleanup: the next step
/// does not start while a participant still routes to an old owner.
#[tokio::test(start_paused = true)]
async fn the_step_after_an_abandoned_cut_over_waits_for_the_participants() {
    let store = MemoryMigrationStore::new();
    let ns = Namespace::new("abandoned").unwrap();
    let driver = join(&store, &ns, "driver").await;
    let other = join(&store, &ns, "other").await;
    driver.migration().report_copied(1, 1);
    assert_eq!(driver.advance().await.unwrap(), Phase::DualWrite);
    assert_eq!(driver.advance().await.unwrap(), Phase::ShadowRead);
    assert_eq!(other.refresh().await.unwrap(), Phase::ShadowRead);
    // `other` stops refreshing; the driver gives up waiting for its acknowledgement.
    let cut_over = tokio::time::timeout(Duration::from_secs(1), driver.advance()).await;
    assert!(cut_over.is_err(), "the cut-over waits for `other`");
    let cleanup = tokio::time::timeout(Duration::from_secs(5), driver.advance()).await;
    assert!(
        cleanup.is_err(),
        "the cleanup began while `other` still routes to an old owner"
    );
    assert_eq!(other.refresh().await.unwrap(), Phase::CutOver);
    assert_eq!(driver.advance().await.unwrap(), Phase::Cleanup);
}

type InMemory = SharedMigration<Node, JumpRouter, MemoryMigrationStore>;

/// A driver and another participant in shadow reads, and the driver's cut-over, spawned and
/// waiting for the other to take it on.
async fn cut_over_waiting_for_another(
    store: &MemoryMigrationStore,
    ns: &Namespace,
) -> (
    Arc<InMemory>,
    InMemory,
    tokio::task::JoinHandle<Result<Phase, MigrationError>>,
) {
    let driver = Arc::new(join(store, ns, "driver").await);
    let other = join(store, ns, "other").await;
    driver.migration().report_copied(1, 1);
    assert_eq!(driver.advance().await.unwrap(), Phase::DualWrite);
    assert_eq!(driver.advance().await.unwrap(), Phase::ShadowRead);
    assert_eq!(other.refresh().await.unwrap(), Phase::ShadowRead);
    let cut_over = tokio::spawn({
        let driver = Arc::clone(&driver);
        async move { driver.advance().await }
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!cut_over.is_finished(), "the cut-over waits for `other`");
    (driver, other, cut_over)
}

/// A session that wrote a moved key under the cut-over, through a process that took it on,
/// reads it back through a process that has not yet: from the new owner, which has the write,
/// not from the old one, which never gets it.
#[tokio::test(start_paused = true)]
async fn a_session_reads_its_write_after_the_cut_over_through_a_process_still_before_it() {
    let store = MemoryMigrationStore::new();
    let ns = Namespace::new("session-cut-over").unwrap();
    let (driver, other, _cut_over) = cut_over_waiting_for_another(&store, &ns).await;
    let key = moving_key();
    let mut session = Session::new();
    let written = driver.migration().write(&key).unwrap();
    assert_eq!(written.owner().node_id(), "c");
    assert!(written.mirror().is_none());
    session.record_write(written.owner(), 10);
    drop(written);
    assert_eq!(other.migration().phase(), Phase::ShadowRead);
    for policy in [ReadPolicy::Primary, ReadPolicy::RoundRobin] {
        let read = other
            .migration()
            .read_session(&key, &policy, &session)
            .unwrap();
        assert_eq!(
            read.target.node_id(),
            "c",
            "{policy:?}: read from the owner the session's write never reached"
        );
    }
}

/// A record that vanishes while the cut-over waits (removed, or lost by the store) counts no
/// participant, so it cannot show that every live one has left the old owners: the cut-over
/// fails with `Diverged` rather than returning as if they had.
#[tokio::test(start_paused = true)]
async fn the_cut_over_fails_when_the_shared_record_vanishes_during_the_wait() {
    let store = MemoryMigrationStore::new();
    let ns = Namespace::new("vanished").unwrap();
    let (_driver, other, cut_over) = cut_over_waiting_for_another(&store, &ns).await;
    store.remove(&ns.key("m").unwrap()).await.unwrap();
    let outcome = tokio::time::timeout(Duration::from_secs(1), cut_over)
        .await
        .expect("the cut-over noticed within a poll interval")
        .unwrap();
    assert_eq!(outcome.unwrap_err().kind(), MigrationErrorKind::Diverged);
    assert_eq!(
        other.refresh().await.unwrap_err().kind(),
        MigrationErrorKind::Diverged
    );
}

/// A shared phase that goes back (a store failover that lost the write) leaves the processes
/// that took on the later phase there and lets others join behind it: neither a waiting
/// cut-over nor the next step waits for them forever, each fails with `Diverged`, and a
/// participant ahead of the record reports it and keeps its phase.
#[tokio::test(start_paused = true)]
async fn the_cut_over_fails_when_the_shared_phase_goes_back() {
    let store = MemoryMigrationStore::new();
    let ns = Namespace::new("went-back").unwrap();
    let key = ns.key("m").unwrap();
    let (driver, _other, cut_over) = cut_over_waiting_for_another(&store, &ns).await;

    // The store loses the cut-over; a participant joining now follows the earlier phase.
    let record = store.load(&key).await.unwrap().unwrap();
    assert_eq!(record.phase, Phase::CutOver as u8);
    let lost = store
        .transition(&key, record, Phase::ShadowRead as u8)
        .await
        .unwrap();
    assert_eq!(lost, headroom_core::migration::Transition::Applied);
    let late = Arc::new(join(&store, &ns, "late").await);
    assert_eq!(late.migration().phase(), Phase::ShadowRead);
    let following = tokio::spawn({
        let late = Arc::clone(&late);
        async move { late.follow().await }
    });
    let outcome = tokio::time::timeout(Duration::from_secs(1), cut_over)
        .await
        .expect("the cut-over noticed within a poll interval")
        .unwrap();
    assert_eq!(outcome.unwrap_err().kind(), MigrationErrorKind::Diverged);
    let next = tokio::time::timeout(Duration::from_secs(5), driver.advance())
        .await
        .expect("the next step does not wait forever");
    assert_eq!(next.unwrap_err().kind(), MigrationErrorKind::Diverged);
    assert_eq!(driver.migration().phase(), Phase::CutOver);
    following.abort();
}

/// A participant renews its acknowledgement every poll interval (plus the refresh's own time):
/// a lease shorter than two intervals could lapse while it is alive, so the cut-over would
/// stop waiting for it; and a zero interval would spin. Both are refused at `join`.
#[tokio::test(start_paused = true)]
async fn join_refuses_a_zero_poll_and_a_lease_under_two_polls() {
    let store = MemoryMigrationStore::new();
    let ns = Namespace::new("settings").unwrap();
    let join_with = |lease, poll| {
        let (from, to) = topologies();
        let migration = Migration::new("shared", from, to).unwrap();
        SharedMigration::new(migration, store.clone(), ns.key("m").unwrap(), "p")
            .lease(lease)
            .poll(poll)
            .join()
    };
    let ms = Duration::from_millis;
    for (lease, poll) in [(ms(1_000), ms(0)), (ms(100), ms(100)), (ms(199), ms(100))] {
        let refused = join_with(lease, poll).await.unwrap_err();
        assert_eq!(
            refused.kind(),
            MigrationErrorKind::InvalidValue,
            "lease {lease:?}, poll {poll:?}"
        );
    }
    assert!(
        store.load(&ns.key("m").unwrap()).await.unwrap().is_none(),
        "a refused participant creates no record"
    );
    join_with(ms(200), ms(100)).await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_silent_participant_is_waited_for_no_longer_than_its_lease() {
    let store = MemoryMigrationStore::new();
    let ns = Namespace::new("silent").unwrap();
    let driver = join(&store, &ns, "driver").await;
    let _silent = participant(&store, &ns, "silent", Duration::from_secs(30)).await;
    // `silent` acknowledged Copy with a 30 s lease at join; it never refreshes again.
    driver.migration().report_copied(1, 1);
    for _ in 0..2 {
        driver.advance().await.unwrap();
    }
    let started = tokio::time::Instant::now();
    assert_eq!(driver.advance().await.unwrap(), Phase::CutOver);
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_secs(29) && waited <= Duration::from_secs(31),
        "waited {waited:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn rollback_before_the_cut_over_returns_every_router_to_the_old_owners() {
    let store = MemoryMigrationStore::new();
    let ns = Namespace::new("rollback").unwrap();
    let driver = join(&store, &ns, "driver").await;
    let other = join(&store, &ns, "other").await;
    let key = moving_key();
    driver.migration().report_copied(1, 1);
    driver.advance().await.unwrap();
    driver.advance().await.unwrap();
    other.refresh().await.unwrap();
    assert!(other.migration().write(&key).unwrap().mirror().is_some());
    driver.rollback().await.unwrap();
    assert_eq!(other.refresh().await.unwrap(), Phase::RolledBack);
    let route = other.migration().write(&key).unwrap();
    assert_eq!(route.owner().node_id(), "b");
    assert!(route.mirror().is_none());
    drop(route);
    let read = other
        .migration()
        .read(&key, &headroom_shard::ReadPolicy::Primary)
        .unwrap();
    assert_eq!(read.target.node_id(), "b");
    assert!(read.shadow.is_none());
    assert_eq!(
        driver.advance().await.unwrap_err().kind(),
        MigrationErrorKind::RolledBack
    );
}

/// Adds `member` to `key`'s set on `node` if the write's epoch passes both fences where the
/// data lives: the node's fence for the shard (raised on an old owner at the cut-over) and the
/// key's own epoch (a late mirror, stamped with the old epoch, cannot land on a key the new
/// owner already took writes for under the new epoch). Returns 1, or 0 when fenced.
const FENCED_ADD: &str = r"
local fence = tonumber(redis.call('GET', KEYS[1]) or '0')
local row = tonumber(redis.call('GET', KEYS[2]) or '0')
local epoch = tonumber(ARGV[1])
if epoch < fence or epoch < row then
  return 0
end
redis.call('SET', KEYS[2], ARGV[1])
redis.call('SADD', KEYS[3], ARGV[2])
return 1
";

struct Data {
    redis: Redis,
    script: redis::Script,
}

impl Data {
    async fn connect(url: &str) -> Self {
        Self {
            redis: Redis::connect(RedisConfig::standalone(url)).await.unwrap(),
            script: redis::Script::new(FENCED_ADD),
        }
    }

    async fn add(&self, node: &str, shard: u32, key: u64, member: &str, epoch: u64) -> bool {
        let mut invocation = self.script.key(format!("{node}:fence:{shard}"));
        invocation
            .key(format!("{node}:{key}:epoch"))
            .key(format!("{node}:{key}:set"))
            .arg(epoch)
            .arg(member);
        let added: i64 = self.redis.invoke(&invocation).await.unwrap();
        added == 1
    }

    async fn members(&self, node: &str, key: u64) -> HashSet<String> {
        self.redis
            .query(redis::cmd("SMEMBERS").arg(format!("{node}:{key}:set")))
            .await
            .unwrap()
    }
}

const KEYS: u64 = 64;

/// Three routers, each with its own connections to the migration store and to the data, walk
/// a migration together while each of them writes: every acknowledged write ends on its key's
/// owner, none is accepted by a retired owner after the cut-over, and no key lands on a node
/// that never owns it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_routers_migrate_together_on_redis_under_writes() {
    let coordination = RedisServer::start();
    let data_server = RedisServer::start();
    let ns = headroom_testkit::unique_namespace("three");
    let (from, to) = topologies();

    // Data written before the migration, on the old owners.
    let seed = Data::connect(&data_server.url()).await;
    for key in 0..KEYS {
        let owner = from.write(&key).unwrap();
        assert!(
            seed.add(
                owner.node_id(),
                owner.shard().0,
                key,
                &format!("seed-{key}"),
                1
            )
            .await
        );
    }

    let mut routers = Vec::new();
    for id in ["r0", "r1", "r2"] {
        let store = RedisMigrationStore::new(
            Redis::connect(RedisConfig::standalone(coordination.url()))
                .await
                .unwrap(),
        );
        let migration = Migration::new("three", Arc::clone(&from), Arc::clone(&to)).unwrap();
        let shared = SharedMigration::new(migration, store, ns.key("m").unwrap(), id)
            .lease(Duration::from_secs(5))
            .poll(Duration::from_millis(20))
            .join()
            .await
            .unwrap();
        routers.push(Arc::new(shared));
    }
    let followers: Vec<_> = routers
        .iter()
        .map(|router| {
            let router = Arc::clone(router);
            tokio::spawn(async move { router.follow().await })
        })
        .collect();

    let stop = Arc::new(AtomicBool::new(false));
    let cut_over_done = Arc::new(AtomicBool::new(false));
    let acknowledged: Arc<Mutex<Vec<(u64, String)>>> = Arc::default();
    let after_cut_over = Arc::new(AtomicU64::new(0));
    let mut writers = Vec::new();
    for (r, router) in routers.iter().enumerate() {
        for w in 0..2 {
            let router = Arc::clone(router);
            let (stop, cut_over_done) = (Arc::clone(&stop), Arc::clone(&cut_over_done));
            let (acknowledged, after_cut_over) =
                (Arc::clone(&acknowledged), Arc::clone(&after_cut_over));
            let to = Arc::clone(&to);
            let data = Data::connect(&data_server.url()).await;
            writers.push(tokio::spawn(async move {
                let mut rng = fastrand::Rng::with_seed((r * 2 + w) as u64);
                let mut n = 0u64;
                while !stop.load(Ordering::Acquire) {
                    let key = rng.u64(..KEYS);
                    let member = format!("r{r}w{w}-{n}");
                    n += 1;
                    loop {
                        let after = cut_over_done.load(Ordering::Acquire);
                        let route = router.migration().write(&key).unwrap();
                        if after {
                            // Once the cut-over returned, no router routes to a retired owner.
                            assert_eq!(route.owner().node_id(), to.write(&key).unwrap().node_id());
                            after_cut_over.fetch_add(1, Ordering::Relaxed);
                        }
                        let owner = route.owner();
                        let mut ok = data
                            .add(
                                owner.node_id(),
                                owner.shard().0,
                                key,
                                &member,
                                route.epoch(),
                            )
                            .await;
                        if ok && let Some(mirror) = route.mirror() {
                            ok = data
                                .add(
                                    mirror.node_id(),
                                    mirror.shard().0,
                                    key,
                                    &member,
                                    route.epoch(),
                                )
                                .await;
                        }
                        drop(route);
                        if ok {
                            acknowledged.lock().unwrap().push((key, member));
                            break;
                        }
                        // Fenced: the phase moved on; learn it and route again.
                        router.refresh().await.unwrap();
                    }
                }
            }));
        }
    }

    // The driver: backfill the moving keys, then walk every phase while the writers run.
    let driver = &routers[0];
    let copier = Data::connect(&data_server.url()).await;
    let wait_for_writes = |min: usize| {
        let acknowledged = Arc::clone(&acknowledged);
        async move {
            let deadline = std::time::Instant::now() + Duration::from_secs(20);
            while acknowledged.lock().unwrap().len() < min {
                assert!(std::time::Instant::now() < deadline, "writers stalled");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    };
    wait_for_writes(50).await;
    for key in 0..KEYS {
        let (old, new) = (from.write(&key).unwrap(), to.write(&key).unwrap());
        if old.node_id() != new.node_id() {
            for member in copier.members(old.node_id(), key).await {
                // Copy under the old epoch: never over a key the new owner took under the new one.
                copier
                    .add(new.node_id(), new.shard().0, key, &member, 1)
                    .await;
            }
        }
    }
    driver.migration().report_copied(1, 1);
    for phase in [Phase::DualWrite, Phase::ShadowRead] {
        assert_eq!(driver.advance().await.unwrap(), phase);
        let seen = acknowledged.lock().unwrap().len();
        wait_for_writes(seen + 100).await;
    }
    assert_eq!(driver.advance().await.unwrap(), Phase::CutOver);
    // Every router has left the old owners: fence them where the data lives.
    let fences = Data::connect(&data_server.url()).await;
    for shard in 6..8 {
        let _: () = fences
            .redis
            .query(redis::cmd("SET").arg(format!("b:fence:{shard}")).arg(2))
            .await
            .unwrap();
    }
    cut_over_done.store(true, Ordering::Release);
    let seen = acknowledged.lock().unwrap().len();
    wait_for_writes(seen + 200).await;
    for phase in [Phase::Cleanup, Phase::Done] {
        assert_eq!(driver.advance().await.unwrap(), phase);
    }
    stop.store(true, Ordering::Release);
    for writer in writers {
        writer.await.unwrap();
    }
    for follower in followers {
        follower.abort();
    }

    // Every acknowledged write is on its key's owner under the new topology.
    let check = Data::connect(&data_server.url()).await;
    let acknowledged = acknowledged.lock().unwrap().clone();
    assert!(after_cut_over.load(Ordering::Relaxed) >= 100);
    let mut by_key: HashMap<u64, HashSet<String>> = HashMap::new();
    for key in 0..KEYS {
        let owner = to.write(&key).unwrap();
        by_key.insert(key, check.members(owner.node_id(), key).await);
    }
    let lost: Vec<_> = acknowledged
        .iter()
        .filter(|(key, member)| !by_key[key].contains(member))
        .collect();
    assert!(
        lost.is_empty(),
        "{} of {} writes lost: {:?}",
        lost.len(),
        acknowledged.len(),
        &lost[..lost.len().min(5)]
    );
    for key in 0..KEYS {
        assert!(
            by_key[&key].contains(&format!("seed-{key}")),
            "seed of {key} lost"
        );
    }
    // No key on a node that owns it in neither topology.
    for node in ["a", "b", "c"] {
        for key in 0..KEYS {
            let owners = [
                from.write(&key).unwrap().node_id(),
                to.write(&key).unwrap().node_id(),
            ];
            if !owners.contains(&node) {
                assert!(
                    check.members(node, key).await.is_empty(),
                    "{key} misrouted to {node}"
                );
            }
        }
    }
}
