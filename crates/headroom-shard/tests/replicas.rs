//! Topologies, read policies, read-your-writes sessions and runtime replacement.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use common::{TestRecorder, poll_once};
use headroom_core::{Classify, Clock, ManualClock};
use headroom_shard::{
    ConfigErrorKind, JumpRouter, ReadPolicy, ReplicaStatus, Role, Session, ShardId, Topology,
    TopologyHandle, UnknownShard, monitor_lag,
};
use proptest::prelude::*;

/// One logical shard space of 8 on a primary with three replicas.
fn topology(epoch: u64) -> Topology<&'static str, JumpRouter> {
    Topology::builder(JumpRouter::new(8).unwrap())
        .name("test")
        .epoch(epoch)
        .node("p", "primary")
        .node("r1", "replica-1")
        .node("r2", "replica-2")
        .node("r3", "replica-3")
        .shards(0..8, "p", &["r1", "r2", "r3"])
        .build()
        .unwrap()
}

const FRESH: ReplicaStatus = ReplicaStatus {
    lag: Some(Duration::from_millis(5)),
    position: Some(100),
};

#[test]
fn writes_go_to_the_primary_and_primary_policy_reads_there() {
    let topology = topology(1);
    for key in 0..100u64 {
        let write = topology.write(&key).unwrap();
        assert_eq!((write.node_id(), write.role()), ("p", Role::Primary));
        assert_eq!(*write.handle(), "primary");
        assert_eq!(write.shard(), topology.shard_of(&key));
        let read = topology.read(&key, &ReadPolicy::Primary).unwrap();
        assert_eq!(read.node_id(), "p");
    }
}

#[test]
fn round_robin_takes_replicas_in_turn() {
    let topology = topology(1);
    let ids: Vec<&str> = (0..6)
        .map(|_| {
            topology
                .read_shard(ShardId(0), &ReadPolicy::RoundRobin, None)
                .unwrap()
                .node_id()
        })
        .collect();
    assert_eq!(ids, ["r1", "r2", "r3", "r1", "r2", "r3"]);
}

#[test]
fn least_in_flight_avoids_busy_replicas() {
    let topology = topology(1);
    // Keep r1 and r2 busy; power of two choices must then prefer r3 whenever it is drawn, and
    // never pick the busiest replica.
    let busy: Vec<_> = (0..10)
        .map(|_| {
            topology
                .read_shard(ShardId(0), &ReadPolicy::RoundRobin, None)
                .unwrap()
        })
        .filter(|t| t.node_id() != "r3")
        .collect();
    assert!(topology.node("r1").unwrap().in_flight() > 0);
    let mut r3 = 0;
    for _ in 0..300 {
        let read = topology
            .read_shard(ShardId(0), &ReadPolicy::LeastInFlight, None)
            .unwrap();
        assert_eq!(read.role(), Role::Replica);
        if read.node_id() == "r3" {
            r3 += 1;
        }
    }
    // r3 is drawn in 2 of 3 pairs and wins each of them.
    assert!(r3 > 150, "r3 chosen {r3} times of 300");
    drop(busy);
    assert!(topology.nodes().iter().all(|n| n.in_flight() == 0));
}

#[test]
fn lag_aware_skips_stale_and_unknown_replicas() {
    let recorder = TestRecorder::default();
    let topology = metrics::with_local_recorder(&recorder, || topology(1));
    let policy = ReadPolicy::LagAware {
        max_lag: Duration::from_millis(50),
    };
    // No status known yet: every replica is rejected, the primary serves.
    assert_eq!(
        topology
            .read_shard(ShardId(0), &policy, None)
            .unwrap()
            .node_id(),
        "p"
    );
    topology.report(
        "r1",
        ReplicaStatus {
            lag: Some(Duration::from_secs(2)),
            position: Some(1),
        },
    );
    topology.report("r2", FRESH);
    for _ in 0..50 {
        let read = topology.read_shard(ShardId(0), &policy, None).unwrap();
        assert_eq!(read.node_id(), "r2");
    }
    assert!(recorder.counter("headroom_shard_lag_rejections_total{node=r1,topology=test}") >= 51);
    assert_eq!(
        recorder.counter("headroom_shard_reads_total{node=r2,role=replica,topology=test}"),
        50
    );
    assert_eq!(
        recorder.counter("headroom_shard_reads_total{node=p,role=primary,topology=test}"),
        1
    );
    assert_eq!(
        recorder.counter("headroom_shard_routed_total{op=read,shard=0,topology=test}"),
        51
    );
    drop(topology.write_shard(ShardId(3)).unwrap());
    assert_eq!(
        recorder.counter("headroom_shard_routed_total{op=write,shard=3,topology=test}"),
        1
    );
}

#[test]
fn session_reads_wait_for_replicas_to_catch_up() {
    let topology = topology(1);
    let mut session = Session::new();
    let shard = topology.shard_of("cart:1");
    let write = topology.write_shard(shard).unwrap();
    session.record_write(&write, 500);
    session.record_write(&write, 400); // positions never go backwards
    drop(write);
    assert_eq!(session.required(shard, "p"), Some(500));
    topology.report(
        "r1",
        ReplicaStatus {
            lag: Some(Duration::ZERO),
            position: Some(499),
        },
    );
    let read = topology
        .read_session("cart:1", &ReadPolicy::RoundRobin, &session)
        .unwrap();
    assert_eq!(read.role(), Role::Primary);
    topology.report(
        "r2",
        ReplicaStatus {
            lag: Some(Duration::ZERO),
            position: Some(500),
        },
    );
    for _ in 0..10 {
        let read = topology
            .read_session("cart:1", &ReadPolicy::RoundRobin, &session)
            .unwrap();
        assert_eq!(read.node_id(), "r2");
    }
    // Another shard has no requirement: any replica may serve it.
    let other = (0..100u64).find(|k| topology.shard_of(k) != shard).unwrap();
    let read = topology
        .read_session(&other, &ReadPolicy::RoundRobin, &session)
        .unwrap();
    assert_eq!(read.role(), Role::Replica);
}

/// A session's positions count on the primary they were written on: once its shard has
/// another primary (a failover, a cut-over), another replication stream numbers positions,
/// so its replicas cannot be judged by them, and the session reads from the primary.
#[test]
fn a_session_written_on_another_primary_reads_from_the_new_one() {
    let before = topology(1);
    let mut session = Session::new();
    let shard = before.shard_of("cart:1");
    session.record_write(&before.write_shard(shard).unwrap(), 500);
    let after = Topology::builder(JumpRouter::new(8).unwrap())
        .epoch(2)
        .node("p2", "primary-2")
        .node("s1", "replica-of-p2")
        .shards(0..8, "p2", &["s1"])
        .build()
        .unwrap();
    after.report(
        "s1",
        ReplicaStatus {
            lag: Some(Duration::ZERO),
            position: Some(10_000),
        },
    );
    let read = after
        .read_session("cart:1", &ReadPolicy::RoundRobin, &session)
        .unwrap();
    assert_eq!(
        read.node_id(),
        "p2",
        "a position of p's stream says nothing of s1"
    );
}

#[derive(Clone, Debug)]
enum Op {
    Write,
    Replay { replica: usize, by: u64 },
    Probe { replica: usize },
    Read { policy: u8 },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        Just(Op::Write),
        (0..3usize, 0..4u64).prop_map(|(replica, by)| Op::Replay { replica, by }),
        (0..3usize).prop_map(|replica| Op::Probe { replica }),
        (0..4u8).prop_map(|policy| Op::Read { policy }),
    ]
}

proptest! {
    /// After a write at position p, a session never reads from a replica that has not
    /// replayed p, whatever the policy, replication progress and probe timing.
    #[test]
    fn read_your_writes_never_reads_behind_the_session(ops in proptest::collection::vec(op(), 1..200)) {
        let topology = topology(1);
        let names = ["r1", "r2", "r3"];
        let mut primary = 0u64;
        let mut replayed = [0u64; 3];
        let mut session = Session::new();
        let shard = topology.shard_of("k");
        for op in ops {
            match op {
                Op::Write => {
                    let write = topology.write("k").unwrap();
                    primary += 1;
                    session.record_write(&write, primary);
                }
                Op::Replay { replica, by } => {
                    replayed[replica] = (replayed[replica] + by).min(primary);
                }
                Op::Probe { replica } => {
                    let lag = Duration::from_millis((primary - replayed[replica]) * 10);
                    topology.report(names[replica], ReplicaStatus {
                        lag: Some(lag),
                        position: Some(replayed[replica]),
                    });
                }
                Op::Read { policy } => {
                    let policy = match policy {
                        0 => ReadPolicy::Primary,
                        1 => ReadPolicy::RoundRobin,
                        2 => ReadPolicy::LeastInFlight,
                        _ => ReadPolicy::LagAware { max_lag: Duration::from_millis(20) },
                    };
                    let read = topology.read_session("k", &policy, &session).unwrap();
                    if read.role() == Role::Replica {
                        let at = names.iter().position(|n| *n == read.node_id()).unwrap();
                        prop_assert!(
                            replayed[at] >= session.required(shard, "p").unwrap_or(0),
                            "{} at {} served a session at {:?}", read.node_id(), replayed[at], session.required(shard, "p")
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn unknown_shards_are_typed_errors() {
    let topology = topology(1);
    let err = topology.write_shard(ShardId(99)).unwrap_err();
    assert_eq!(err, UnknownShard(ShardId(99)));
    assert!(!err.is_retryable());
    assert!(
        topology
            .read_shard(ShardId(8), &ReadPolicy::RoundRobin, None)
            .is_err()
    );
    assert!(!topology.report("nope", FRESH));
}

#[test]
fn invalid_topologies_are_rejected() {
    let kind = |b: headroom_shard::TopologyBuilder<(), JumpRouter>| b.build().unwrap_err().kind();
    let base = || Topology::builder(JumpRouter::new(2).unwrap());
    assert_eq!(kind(base()), ConfigErrorKind::Empty);
    assert_eq!(
        kind(base().node("a", ()).node("a", ()).shards(0..2, "a", &[])),
        ConfigErrorKind::Duplicate
    );
    assert_eq!(
        kind(base().node("a", ()).shard(ShardId(0), "a", &[])),
        ConfigErrorKind::MissingShard
    );
    assert_eq!(
        kind(base().node("a", ()).shards(0..2, "a", &["b"])),
        ConfigErrorKind::UnknownNode
    );
    assert_eq!(
        kind(
            base()
                .node("a", ())
                .shards(0..2, "a", &[])
                .shard(ShardId(1), "a", &[])
        ),
        ConfigErrorKind::Duplicate
    );
}

/// A primary listed as its own replica would be read as a replica (counted under
/// `role=replica`, refused by `LagAware` for want of a lag report) and follow itself.
#[test]
fn a_primary_listed_as_its_own_replica_is_refused() {
    let err = Topology::builder(JumpRouter::new(8).unwrap())
        .node("a", ())
        .node("r", ())
        .shards(0..4, "a", &["r"])
        .shards(4..8, "a", &["r", "a"])
        .build()
        .map(|_| ())
        .unwrap_err();
    assert_eq!(err.kind(), ConfigErrorKind::Duplicate);
    assert!(err.to_string().contains("node a"), "{err}");
}

/// A replica listed twice would take two turns of every round.
#[test]
fn a_replica_listed_twice_for_a_shard_is_refused() {
    let err = Topology::builder(JumpRouter::new(8).unwrap())
        .node("a", ())
        .node("r1", ())
        .node("r2", ())
        .shard(ShardId(0), "a", &["r1", "r2", "r1"])
        .shards(1..8, "a", &["r1", "r2"])
        .build()
        .map(|_| ())
        .unwrap_err();
    assert_eq!(err.kind(), ConfigErrorKind::Duplicate);
    assert!(err.to_string().contains("node r1"), "{err}");
}

#[test]
fn replacement_needs_a_greater_epoch_and_keeps_node_state() {
    let handle = TopologyHandle::new(topology(5));
    handle.load().report("r1", FRESH);
    let err = handle.replace(topology(5)).unwrap_err();
    assert_eq!(err.kind(), ConfigErrorKind::StaleEpoch);
    let previous = handle.replace(topology(6)).unwrap();
    assert_eq!(previous.epoch(), 5);
    let current = handle.load();
    assert_eq!(current.epoch(), 6);
    assert_eq!(current.node("r1").unwrap().status(), FRESH);
    assert_eq!(
        current.node("r2").unwrap().status(),
        ReplicaStatus::default()
    );
}

#[test]
fn readers_see_epochs_only_grow_while_topologies_are_replaced() {
    let handle = Arc::new(TopologyHandle::new(topology(1)));
    let stop = Arc::new(AtomicBool::new(false));
    let readers: Vec<_> = (0..2)
        .map(|_| {
            let (handle, stop) = (Arc::clone(&handle), Arc::clone(&stop));
            std::thread::spawn(move || {
                let mut last = 0;
                let mut reads = 0u64;
                while !stop.load(Ordering::Acquire) || reads == 0 {
                    let topology = handle.load();
                    let write = topology.write(&reads).unwrap();
                    assert!(write.epoch() >= last, "epoch went back");
                    last = write.epoch();
                    reads += 1;
                }
                last
            })
        })
        .collect();
    for epoch in 2..=200 {
        handle.replace(topology(epoch)).unwrap();
    }
    stop.store(true, Ordering::Release);
    for reader in readers {
        assert!(reader.join().unwrap() <= 200);
    }
    assert!(handle.load().nodes().iter().all(|n| n.in_flight() == 0));
}

#[tokio::test]
async fn a_dropped_request_releases_its_in_flight_mark() {
    let topology = topology(1);
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let request = async {
        let target = topology
            .read_shard(ShardId(0), &ReadPolicy::RoundRobin, None)
            .unwrap();
        rx.await.ok();
        drop(target);
    };
    let mut request = Box::pin(request);
    // Poll once so the target is held at the await point, then drop the future.
    assert!(poll_once(request.as_mut()).await.is_none());
    assert_eq!(topology.node("r1").unwrap().in_flight(), 1);
    drop(request);
    drop(tx);
    assert!(topology.nodes().iter().all(|n| n.in_flight() == 0));
}

/// The topology of [`topology`] on a manual clock, whose reports count for one second.
fn topology_on(clock: &Clock) -> Topology<&'static str, JumpRouter> {
    Topology::builder(JumpRouter::new(8).unwrap())
        .name("test")
        .clock(clock.clone())
        .status_ttl(Duration::from_secs(1))
        .node("p", "primary")
        .node("r1", "replica-1")
        .node("r2", "replica-2")
        .node("r3", "replica-3")
        .shards(0..8, "p", &["r1", "r2", "r3"])
        .build()
        .unwrap()
}

#[test]
fn reports_older_than_the_status_ttl_count_as_unknown() {
    let manual = ManualClock::new();
    let topology = topology_on(&manual.clock());
    let policy = ReadPolicy::LagAware {
        max_lag: Duration::from_millis(50),
    };
    let mut session = Session::new();
    session.record_write(&topology.write_shard(ShardId(0)).unwrap(), 100);
    for id in ["r1", "r2", "r3"] {
        topology.report(id, FRESH);
    }
    manual.advance(Duration::from_millis(900));
    assert_eq!(topology.node("r1").unwrap().status(), FRESH);
    let read = topology.read_shard(ShardId(0), &policy, None).unwrap();
    assert_eq!(read.role(), Role::Replica);
    drop(read);
    // Nobody reported for longer than the TTL: lag and position are unknown again, so neither
    // lag-aware nor session reads trust a replica on a report that may be arbitrarily old.
    manual.advance(Duration::from_millis(200));
    assert_eq!(
        topology.node("r1").unwrap().status(),
        ReplicaStatus::default()
    );
    let read = topology.read_shard(ShardId(0), &policy, None).unwrap();
    assert_eq!(read.node_id(), "p");
    drop(read);
    let read = topology
        .read_shard(
            ShardId(0),
            &ReadPolicy::RoundRobin,
            session.required(ShardId(0), "p"),
        )
        .unwrap();
    assert_eq!(read.node_id(), "p");
    drop(read);
    // A fresh report counts again.
    topology.report("r2", FRESH);
    let read = topology.read_shard(ShardId(0), &policy, None).unwrap();
    assert_eq!(read.node_id(), "r2");
}

#[tokio::test]
async fn probes_run_concurrently_and_a_hung_probe_times_out() {
    let manual = ManualClock::new();
    let topology = topology_on(&manual.clock());
    topology.report("r1", FRESH);
    let probe = |id: &str, _: &&'static str| {
        let hangs = id == "r1";
        async move {
            if hangs {
                std::future::pending::<()>().await;
            }
            Some(FRESH)
        }
    };
    let round = topology.probe_nodes(&probe, Duration::from_millis(100));
    tokio::pin!(round);
    // r1 hangs, yet every other node is probed at once.
    assert!(poll_once(round.as_mut()).await.is_none());
    for id in ["p", "r2", "r3"] {
        assert_eq!(topology.node(id).unwrap().status(), FRESH, "{id}");
    }
    // Once the timeout passes, the round ends and r1's old report is replaced by unknown.
    manual.advance(Duration::from_millis(100));
    assert!(poll_once(round.as_mut()).await.is_some());
    assert_eq!(
        topology.node("r1").unwrap().status(),
        ReplicaStatus::default()
    );
}

#[tokio::test]
async fn the_lag_monitor_reports_probe_answers() {
    let manual = ManualClock::new();
    let clock: Clock = manual.clock();
    let handle = TopologyHandle::new(topology_on(&clock));
    let round = Arc::new(AtomicU64::new(0));
    let probe = {
        let round = Arc::clone(&round);
        move |id: &str, _: &&'static str| {
            let n = round.load(Ordering::Acquire);
            let answer = (id != "r3").then_some(ReplicaStatus {
                lag: Some(Duration::from_millis(n)),
                position: Some(n),
            });
            async move { answer }
        }
    };
    let monitor = monitor_lag(
        &handle,
        &probe,
        Duration::from_secs(1),
        Duration::from_secs(1),
    );
    tokio::pin!(monitor);
    // First round runs immediately.
    assert!(poll_once(monitor.as_mut()).await.is_none());
    assert_eq!(handle.load().node("r1").unwrap().status().position, Some(0));
    assert_eq!(
        handle.load().node("r3").unwrap().status(),
        ReplicaStatus::default()
    );
    round.store(7, Ordering::Release);
    manual.advance(Duration::from_secs(1));
    assert!(poll_once(monitor.as_mut()).await.is_none());
    assert_eq!(handle.load().node("r2").unwrap().status().position, Some(7));
}

#[test]
fn shard_labels_are_bounded() {
    let recorder = TestRecorder::default();
    let build = |shards: u32| {
        metrics::with_local_recorder(&recorder, || {
            Topology::builder(JumpRouter::new(shards).unwrap())
                .name(format!("t{shards}"))
                .node("p", ())
                .shards(0..shards, "p", &[])
                .build()
                .unwrap()
        })
    };
    // A small topology labels each shard.
    let small = build(64);
    drop(small.write_shard(ShardId(63)).unwrap());
    assert_eq!(
        recorder.counter("headroom_shard_routed_total{op=write,shard=63,topology=t64}"),
        1
    );
    // A large one must not create a series per shard (up to 2^20 of them): past the label
    // limit, its shards share one label.
    let large = build(1 << 16);
    drop(large.write_shard(ShardId(40_000)).unwrap());
    drop(large.write_shard(ShardId(7)).unwrap());
    assert_eq!(
        recorder.counter("headroom_shard_routed_total{op=write,shard=all,topology=t65536}"),
        2
    );
    let series = recorder.series("headroom_shard_routed_total");
    assert!(series <= 2 * 64 + 2 * 1024, "{series} series");
}

/// `shards` shards, all on primary "a" with replica "a-r".
fn on_one_primary(shards: u32, epoch: u64) -> Topology<&'static str, JumpRouter> {
    Topology::builder(JumpRouter::new(shards).unwrap())
        .epoch(epoch)
        .node("a", "primary")
        .node("a-r", "replica")
        .shards(0..shards, "a", &["a-r"])
        .build()
        .unwrap()
}

/// Positions count per primary, whatever shard they were written on: after a topology change
/// that moves a key to another shard of the same primary (a router with more shards), a
/// replica behind the session's write does not serve it.
#[test]
fn a_session_keeps_its_writes_when_its_key_moves_to_another_shard_of_the_primary() {
    let (before, after) = (on_one_primary(2, 1), on_one_primary(4, 2));
    let key = (0..1_000u64)
        .find(|k| before.shard_of(k) != after.shard_of(k))
        .expect("a key that moves");
    let mut session = Session::new();
    session.record_write(&before.write(&key).unwrap(), 1_000);
    after.report(
        "a-r",
        ReplicaStatus {
            lag: Some(Duration::ZERO),
            position: Some(990),
        },
    );
    let read = after
        .read_session(&key, &ReadPolicy::RoundRobin, &session)
        .unwrap();
    assert_eq!(read.node_id(), "a", "a-r is behind the session's write");
}

/// The same move onto a shard the session also wrote on, earlier and less far: the read needs
/// the furthest position the session reached on the primary, not that shard's own.
#[test]
fn a_session_keeps_its_writes_when_its_key_moves_onto_a_shard_it_wrote_on_earlier() {
    let (before, after) = (on_one_primary(4, 1), on_one_primary(2, 2));
    let moved = (0..1_000u64)
        .find(|k| before.shard_of(k) != after.shard_of(k))
        .expect("a key that moves");
    let earlier = (0..1_000u64)
        .find(|k| before.shard_of(k) == after.shard_of(&moved))
        .expect("a key on the shard it moves to");
    let mut session = Session::new();
    session.record_write(&before.write(&earlier).unwrap(), 500);
    session.record_write(&before.write(&moved).unwrap(), 1_000);
    after.report(
        "a-r",
        ReplicaStatus {
            lag: Some(Duration::ZERO),
            position: Some(700),
        },
    );
    let read = after
        .read_session(&moved, &ReadPolicy::RoundRobin, &session)
        .unwrap();
    assert_eq!(read.node_id(), "a", "a-r is behind the session's write");
}

/// After a router change a shard number covers other keys, maybe on another primary: a write
/// there must not erase what the session reached on the primary that shard number had
/// before, where its earlier key still lives under another number.
#[test]
fn a_session_keeps_its_writes_on_a_primary_when_their_shard_number_moves_to_another() {
    let v1 = on_one_primary(4, 1);
    // Even shards on a (with a-r), odd ones on b.
    let v2 = (0..8)
        .fold(
            Topology::builder(JumpRouter::new(8).unwrap())
                .epoch(2)
                .node("a", "primary")
                .node("a-r", "replica")
                .node("b", "primary b"),
            |builder, shard| match shard % 2 {
                0 => builder.shard(ShardId(shard), "a", &["a-r"]),
                _ => builder.shard(ShardId(shard), "b", &[]),
            },
        )
        .build()
        .unwrap();
    let m = (0..10_000u64)
        .find(|k| v1.shard_of(k) == ShardId(1) && v2.shard_of(k) == ShardId(4))
        .expect("a key on shard 1, then 4");
    let k = (0..10_000u64)
        .find(|k| v2.shard_of(k) == ShardId(1))
        .expect("a key on shard 1 of the new router");
    let handle = TopologyHandle::new(v1);
    let mut session = Session::new();
    session.record_write(&handle.load().write(&m).unwrap(), 100);
    handle.replace(v2).unwrap();
    let current = handle.load();
    session.record_write(&current.write(&k).unwrap(), 700);
    current.report(
        "a-r",
        ReplicaStatus {
            lag: Some(Duration::ZERO),
            position: Some(50),
        },
    );
    let read = current
        .read_session(&m, &ReadPolicy::RoundRobin, &session)
        .unwrap();
    assert_eq!(
        read.node_id(),
        "a",
        "a-r is behind the session's write of m"
    );
}

/// A replica whose shard has another primary after a failover replays another stream: its
/// last report, positions of the old primary's stream, no longer says how far it is, so it
/// serves no session read until it reports again.
#[test]
fn a_replica_that_follows_a_new_primary_is_not_trusted_on_its_old_report() {
    let before = Topology::builder(JumpRouter::new(1).unwrap())
        .epoch(1)
        .node("p", "old primary")
        .node("r1", "replica")
        .node("r2", "replica")
        .shard(ShardId(0), "p", &["r1", "r2"])
        .build()
        .unwrap();
    let handle = TopologyHandle::new(before);
    handle.load().report(
        "r2",
        ReplicaStatus {
            lag: Some(Duration::ZERO),
            position: Some(10_000),
        },
    );
    let after = Topology::builder(JumpRouter::new(1).unwrap())
        .epoch(2)
        .node("p", "old primary")
        .node("r1", "new primary")
        .node("r2", "replica")
        .shard(ShardId(0), "r1", &["r2"])
        .build()
        .unwrap();
    handle.replace(after).unwrap();
    let current = handle.load();
    let mut session = Session::new();
    session.record_write(&current.write(&7u64).unwrap(), 9_600);
    let read = current
        .read_session(&7u64, &ReadPolicy::RoundRobin, &session)
        .unwrap();
    assert_eq!(
        read.node_id(),
        "r1",
        "r2's report was of the old primary's stream"
    );
    // Once it reports on the new stream, it serves the session again.
    current.report(
        "r2",
        ReplicaStatus {
            lag: Some(Duration::ZERO),
            position: Some(9_700),
        },
    );
    let read = current
        .read_session(&7u64, &ReadPolicy::RoundRobin, &session)
        .unwrap();
    assert_eq!(read.node_id(), "r2");
}

/// A lag probe that was in flight when the failover replaced the topology answers with a
/// position of the old primary's stream: that answer is dropped, not recorded over the
/// forgotten report.
#[tokio::test]
async fn a_probe_answer_from_before_a_failover_is_not_recorded_after_it() {
    let build = |epoch, primary: &str, replicas: &[&str]| {
        Topology::builder(JumpRouter::new(1).unwrap())
            .epoch(epoch)
            .node("p", "p")
            .node("r1", "r1")
            .node("r2", "r2")
            .shard(ShardId(0), primary, replicas)
            .build()
            .unwrap()
    };
    let handle = TopologyHandle::new(build(1, "p", &["r1", "r2"]));
    let before = handle.snapshot();
    let release = Arc::new(tokio::sync::Notify::new());
    let probe = {
        let release = release.clone();
        move |_: &str, _: &&str| {
            let release = release.clone();
            async move {
                release.notified().await;
                Some(ReplicaStatus {
                    lag: Some(Duration::ZERO),
                    position: Some(10_000),
                })
            }
        }
    };
    let round = tokio::spawn(async move {
        before.probe_nodes(&probe, Duration::from_secs(60)).await;
    });
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    handle.replace(build(2, "r1", &["r2"])).unwrap();
    release.notify_waiters();
    round.await.expect("no panic");
    let current = handle.load();
    assert_eq!(current.node("r2").unwrap().status().position, None);
    let mut session = Session::new();
    session.record_write(&current.write(&7u64).unwrap(), 9_600);
    let read = current
        .read_session(&7u64, &ReadPolicy::RoundRobin, &session)
        .unwrap();
    assert_eq!(read.node_id(), "r1");
}
