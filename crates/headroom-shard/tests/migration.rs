//! Resharding plans and a simulated live migration under concurrent reads and writes.

mod common;

use std::collections::HashMap;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use common::{TestRecorder, poll_once};
use headroom_core::Classify;
use headroom_shard::{
    Directory, EpochFence, JumpRouter, KeyRange, Migration, MigrationErrorKind, Phase, RangeRouter,
    ReadPolicy, ReplicaStatus, ReshardPlan, Router, Session, ShardId, SlotRouter, Topology, Units,
};

fn jump_topology(
    epoch: u64,
    placement: &[(std::ops::Range<u32>, &str)],
) -> Topology<(), JumpRouter> {
    let mut builder = Topology::builder(JumpRouter::new(16).unwrap()).epoch(epoch);
    let mut nodes: Vec<&str> = placement.iter().map(|(_, n)| *n).collect();
    nodes.sort_unstable();
    nodes.dedup();
    for node in nodes {
        builder = builder.node(node, ());
    }
    for (shards, node) in placement {
        builder = builder.shards(shards.clone(), node, &[]);
    }
    builder.build().unwrap()
}

/// A plan's moves as (from, to, units).
fn moves_of(plan: &ReshardPlan) -> Vec<(&str, &str, Units)> {
    plan.moves()
        .iter()
        .map(|m| (m.from(), m.to(), m.units().clone()))
        .collect()
}

#[test]
fn plans_list_moving_logical_shards() {
    let from = jump_topology(1, &[(0..8, "a"), (8..16, "b")]);
    let to = jump_topology(2, &[(0..6, "a"), (6..8, "c"), (8..14, "b"), (14..16, "c")]);
    let plan = ReshardPlan::between(&from, &to);
    assert_eq!((plan.from_epoch(), plan.to_epoch()), (1, 2));
    let moves = moves_of(&plan);
    assert_eq!(
        moves,
        [
            ("a", "c", Units::Shards(vec![ShardId(6), ShardId(7)])),
            ("b", "c", Units::Shards(vec![ShardId(14), ShardId(15)])),
        ]
    );
    assert_eq!(plan.unit_count(), 4);
    let fraction = plan.moved_fraction().unwrap();
    assert!((fraction - 0.25).abs() < 0.01, "moved {fraction}");
}

#[test]
fn plans_list_moving_slot_ranges_exactly() {
    let build = |epoch, router: SlotRouter, nodes: &[&str]| {
        let mut builder = Topology::builder(router).epoch(epoch);
        for (i, node) in nodes.iter().enumerate() {
            builder = builder.node(*node, ()).shard(ShardId(i as u32), node, &[]);
        }
        builder.build().unwrap()
    };
    let from = build(1, SlotRouter::even(2).unwrap(), &["a", "b"]);
    let to = build(
        2,
        SlotRouter::builder()
            .assign(0..8000, ShardId(0))
            .assign(8000..8192, ShardId(2))
            .assign(8192..16000, ShardId(1))
            .assign(16000..16384, ShardId(2))
            .build()
            .unwrap(),
        &["a", "b", "c"],
    );
    let plan = ReshardPlan::between(&from, &to);
    let moves: Vec<_> = plan
        .moves()
        .iter()
        .map(|m| (m.from(), m.to(), m.units().clone(), m.fraction()))
        .collect();
    assert_eq!(
        moves,
        [
            (
                "a",
                "c",
                Units::Slots(vec![Range {
                    start: 8000,
                    end: 8192
                }]),
                Some(192.0 / 16384.0)
            ),
            (
                "b",
                "c",
                Units::Slots(vec![Range {
                    start: 16000,
                    end: 16384
                }]),
                Some(384.0 / 16384.0)
            ),
        ]
    );
    assert_eq!(plan.unit_count(), 576);
}

#[test]
fn plans_list_moving_key_ranges() {
    let build = |epoch, router: RangeRouter| {
        Topology::builder(router)
            .epoch(epoch)
            .node("a", ())
            .node("b", ())
            .shard(ShardId(0), "a", &[])
            .shard(ShardId(1), "b", &[])
            .build()
            .unwrap()
    };
    let from = build(
        1,
        RangeRouter::builder(ShardId(0))
            .split_at("m", ShardId(1))
            .build()
            .unwrap(),
    );
    let to = build(
        2,
        RangeRouter::builder(ShardId(0))
            .split_at("t", ShardId(1))
            .build()
            .unwrap(),
    );
    let plan = ReshardPlan::between(&from, &to);
    assert_eq!(plan.moves().len(), 1);
    assert_eq!((plan.moves()[0].from(), plan.moves()[0].to()), ("b", "a"));
    assert_eq!(
        plan.moves()[0].units(),
        &Units::KeyRanges(vec![KeyRange {
            start: b"m".as_slice().into(),
            end: Some(b"t".as_slice().into())
        }])
    );
    assert_eq!(plan.moved_fraction(), None);
}

/// Nodes a, b and c, shards 0, 1 and 2 on the nodes `placement` names.
fn three_nodes(
    epoch: u64,
    router: headroom_shard::AnyRouter,
    placement: [&str; 3],
) -> Topology<(), headroom_shard::AnyRouter> {
    let mut builder = Topology::builder(router).epoch(epoch);
    for node in ["a", "b", "c"] {
        builder = builder.node(node, ());
    }
    for (shard, node) in placement.into_iter().enumerate() {
        builder = builder.shard(ShardId(shard as u32), node, &[]);
    }
    builder.build().unwrap()
}

/// Asserts that every key of `keys` that changes node between `from` and `to` is in a move of
/// `plan` from its old node to its new one: in one of its key ranges, or among its keys.
fn assert_plan_covers<R: Router>(
    plan: &ReshardPlan,
    from: &Topology<(), R>,
    to: &Topology<(), R>,
    keys: &[String],
) {
    for key in keys {
        let (a, b) = (
            from.write(key.as_str()).unwrap().node_id(),
            to.write(key.as_str()).unwrap().node_id(),
        );
        if a == b {
            continue;
        }
        let covered = plan.moves().iter().any(|m| {
            (m.from(), m.to()) == (a, b)
                && match m.units() {
                    Units::KeyRanges(ranges) => ranges.iter().any(|r| {
                        *r.start <= *key.as_bytes()
                            && r.end.as_deref().is_none_or(|end| key.as_bytes() < end)
                    }),
                    Units::Keys(pinned) => pinned.iter().any(|k| **k == *key.as_bytes()),
                    _ => false,
                }
        });
        assert!(covered, "{key} moves from {a} to {b}: {:?}", plan.moves());
    }
}

/// Between a range router and a hash router, every key that changes node is in a move of its
/// pair of nodes, whichever range it falls in (a sample of keys would all fall in the first
/// range); the moves are key ranges, without a fraction (it depends on the keys). The same
/// range router under a new placement moves shards, without a fraction either.
#[test]
fn plans_between_ranges_and_a_hash_router_cover_every_range() {
    use headroom_shard::AnyRouter;

    let build = |epoch, router: AnyRouter| three_nodes(epoch, router, ["a", "b", "c"]);
    let ranges = || {
        AnyRouter::from(
            RangeRouter::builder(ShardId(0))
                .split_at("g", ShardId(1))
                .split_at("p", ShardId(2))
                .build()
                .unwrap(),
        )
    };
    let jump = || AnyRouter::from(JumpRouter::new(3).unwrap());
    // Redis Cluster slots spread keys by hash too.
    let slots = || AnyRouter::from(headroom_shard::SlotRouter::even(3).unwrap());
    let keys: Vec<String> = (0..2_000)
        .map(|i| format!("{}{i}", ["apple", "hat", "zebra"][i % 3]))
        .collect();
    for (from, to) in [
        (build(1, ranges()), build(2, jump())),
        (build(1, jump()), build(2, ranges())),
        (build(1, ranges()), build(2, slots())),
        (build(1, slots()), build(2, ranges())),
    ] {
        let plan = ReshardPlan::between(&from, &to);
        assert_eq!(plan.moved_fraction(), None);
        assert!(
            plan.moves()
                .iter()
                .all(|m| matches!(m.units(), Units::KeyRanges(_)))
        );
        assert_plan_covers(&plan, &from, &to, &keys);
    }
    let moved = three_nodes(3, ranges(), ["a", "c", "c"]);
    let plan = ReshardPlan::between(&build(1, ranges()), &moved);
    assert_eq!(
        moves_of(&plan),
        [("b", "c", Units::Shards(vec![ShardId(1)]))]
    );
    assert_eq!(plan.moved_fraction(), None);
    // A directory over the same ranges moves only its pinned keys.
    let pinned = AnyRouter::Directory(Box::new(
        Directory::new(ranges(), [("apple", ShardId(2))]).unwrap(),
    ));
    let plan = ReshardPlan::between(&build(1, ranges()), &build(2, pinned));
    assert_eq!(
        moves_of(&plan),
        [("a", "c", Units::Keys(vec![b"apple".as_slice().into()]))]
    );
}

/// A directory keeps its base router's units: over ranges, the ranges that change node are
/// listed whatever the other side is, and the pinned keys besides.
#[test]
fn plans_with_a_directory_over_ranges_cover_every_key_that_moves() {
    use headroom_shard::AnyRouter;

    let build = |epoch, router: AnyRouter| three_nodes(epoch, router, ["a", "b", "c"]);
    let ranges = |splits: &[(&str, u32)]| {
        let mut builder = RangeRouter::builder(ShardId(0));
        for &(at, shard) in splits {
            builder = builder.split_at(at, ShardId(shard));
        }
        builder.build().unwrap()
    };
    let plain = || AnyRouter::from(ranges(&[("g", 1), ("p", 2)]));
    let directory = || {
        AnyRouter::Directory(Box::new(
            Directory::new(
                AnyRouter::from(ranges(&[("g", 1), ("k", 2)])),
                [("apple", ShardId(2))],
            )
            .unwrap(),
        ))
    };
    let jump = || AnyRouter::from(JumpRouter::new(3).unwrap());
    let keys: Vec<String> = (0..3_000)
        .map(|i| format!("{}{i}", ["apple", "hat", "lemon", "zebra"][i % 4]))
        .chain(["apple".to_owned()])
        .collect();
    for (from, to) in [
        (build(1, plain()), build(2, directory())),
        (build(1, directory()), build(2, plain())),
        (build(1, directory()), build(2, jump())),
        (build(1, jump()), build(2, directory())),
    ] {
        let plan = ReshardPlan::between(&from, &to);
        assert_plan_covers(&plan, &from, &to, &keys);
    }
    // The same directory under a new placement moves shards, with no fraction: its base
    // router's ranges give none.
    let placed = three_nodes(3, directory(), ["a", "c", "c"]);
    let plan = ReshardPlan::between(&build(2, directory()), &placed);
    assert_eq!(plan.moved_fraction(), None, "{:?}", plan.moves());
}

#[test]
fn plans_between_different_hash_routers_are_sampled() {
    let build = |epoch, shards: u32| {
        let mut builder = Topology::builder(JumpRouter::new(shards).unwrap()).epoch(epoch);
        for s in 0..shards {
            let id = format!("n{s}");
            builder = builder.node(id.as_str(), ()).shard(ShardId(s), &id, &[]);
        }
        builder.build().unwrap()
    };
    let plan = ReshardPlan::between(&build(1, 4), &build(2, 5));
    assert!(
        plan.moves()
            .iter()
            .all(|m| m.to() == "n4" && m.units() == &Units::Sampled(1 << 16))
    );
    let fraction = plan.moved_fraction().unwrap();
    assert!((fraction - 0.2).abs() < 0.01, "moved {fraction}");
}

/// Only plans between routers that both spread keys by hash, with no unit in common, are
/// sampled; the others list every unit that changes node.
#[test]
fn only_plans_between_different_hash_routers_are_sampled() {
    use headroom_shard::AnyRouter;

    let build = |epoch, router: AnyRouter| three_nodes(epoch, router, ["a", "b", "c"]);
    let jump = |n| AnyRouter::from(JumpRouter::new(n).unwrap());
    let slots = || AnyRouter::from(SlotRouter::even(3).unwrap());
    let ranges = || {
        AnyRouter::from(
            RangeRouter::builder(ShardId(0))
                .split_at("g", ShardId(1))
                .split_at("p", ShardId(2))
                .build()
                .unwrap(),
        )
    };
    let pinned = |base| {
        AnyRouter::Directory(Box::new(
            Directory::new(base, [("apple", ShardId(2))]).unwrap(),
        ))
    };
    let sampled = |from: AnyRouter, to: AnyRouter| {
        ReshardPlan::between(&build(1, from), &build(2, to)).is_sampled()
    };
    assert!(sampled(jump(3), slots()));
    assert!(sampled(slots(), jump(3)));
    assert!(sampled(pinned(jump(3)), slots()));
    assert!(!sampled(jump(3), jump(3)));
    assert!(!sampled(
        slots(),
        AnyRouter::from(SlotRouter::even(2).unwrap())
    ));
    assert!(!sampled(ranges(), jump(3)));
    assert!(!sampled(pinned(ranges()), jump(3)));
    // Different routers over hash: compared on samples, even when one only pins keys.
    assert!(sampled(jump(3), pinned(jump(3))));
    let moved = three_nodes(2, jump(3), ["a", "c", "c"]);
    assert!(!ReshardPlan::between(&build(1, jump(3)), &moved).is_sampled());
}

/// Jump from a million shards to one more, the last on a new node: about one key in a million
/// moves, so the 2^16 sample keys likely miss it and the plan can be empty.
fn a_million_jump_shards(epoch: u64, shards: u32) -> Topology<(), JumpRouter> {
    let mut builder = Topology::builder(JumpRouter::new(shards).unwrap())
        .epoch(epoch)
        .node("a", ())
        .shards(0..1_000_000, "a", &[]);
    if shards > 1_000_000 {
        builder = builder.node("b", ()).shards(1_000_000..shards, "b", &[]);
    }
    builder.build().unwrap()
}

/// A sampled plan can miss real moves: an empty one says nothing about what the copier must
/// do, so the copy ends only once the copier reports it done.
#[tokio::test]
async fn an_empty_sampled_plan_does_not_end_the_copy_without_a_report() {
    let from = Arc::new(a_million_jump_shards(1, 1_000_000));
    let to = Arc::new(a_million_jump_shards(2, 1_000_001));
    let migration = Migration::new("sampled", from, to).unwrap();
    assert_eq!(migration.plan().unit_count(), 0, "no sample key moved");
    assert!(migration.plan().is_sampled());
    // Yet keys move: one is mirrored to the new node.
    let moving = (0..u64::from(u32::MAX))
        .find(|k| migration.to_topology().shard_of(k) == ShardId(1_000_000))
        .unwrap();
    assert_eq!(
        migration
            .write(&moving)
            .unwrap()
            .mirror()
            .unwrap()
            .node_id(),
        "b"
    );
    assert_eq!(
        migration.advance().await.map_err(|e| e.kind()),
        Err(MigrationErrorKind::CopyIncomplete),
        "nothing was reported copied"
    );
    assert_eq!(migration.phase(), Phase::Copy);
    assert_eq!(migration.progress(), 0.0);
    // The copier scanned every old node and copied what moves.
    migration.report_copied(1, 1);
    assert_eq!(migration.advance().await, Ok(Phase::DualWrite));
}

/// An exact plan with no moves has nothing to copy: the copy ends without a report.
#[tokio::test]
async fn an_exact_plan_with_no_moves_ends_the_copy_without_a_report() {
    let from = Arc::new(jump_topology(1, &[(0..8, "a"), (8..16, "b")]));
    let to = Arc::new(jump_topology(2, &[(0..8, "a"), (8..16, "b")]));
    let migration = Migration::new("exact", from, to).unwrap();
    assert_eq!(migration.plan().unit_count(), 0);
    assert!(!migration.plan().is_sampled());
    assert_eq!(migration.progress(), 1.0);
    assert_eq!(migration.advance().await, Ok(Phase::DualWrite));
}

/// A key pinned to another node moves: the plan lists it, so the copy is not skipped.
#[tokio::test]
async fn plans_list_the_pinned_keys_that_move() {
    let build = |epoch, pins: &[(&str, u32)]| {
        let router = Directory::new(
            JumpRouter::new(8).unwrap(),
            pins.iter().map(|&(key, shard)| (key, ShardId(shard))),
        )
        .unwrap();
        Topology::builder(router)
            .epoch(epoch)
            .node("a", ())
            .node("b", ())
            .shards(0..4, "a", &[])
            .shards(4..8, "b", &[])
            .build()
            .unwrap()
    };
    // A key the base puts on `a`, pinned to shard 7 on `b`; another pinned where it was.
    let pinned = (0..1000)
        .map(|i| format!("tenant:{i}"))
        .find(|key| JumpRouter::new(8).unwrap().route(key.as_str()).0 < 4)
        .unwrap();
    let from = Arc::new(build(1, &[("tenant:stays", 1)]));
    let to = Arc::new(build(2, &[(pinned.as_str(), 7), ("tenant:stays", 1)]));
    let plan = ReshardPlan::between(&from, &to);
    let moves = moves_of(&plan);
    assert_eq!(
        moves,
        [("a", "b", Units::Keys(vec![pinned.as_bytes().into()]))]
    );
    assert_eq!(plan.unit_count(), 1);

    let migration = Migration::new("pin", from, to).unwrap();
    assert_eq!(
        migration
            .write(pinned.as_str())
            .unwrap()
            .mirror()
            .unwrap()
            .node_id(),
        "b"
    );
    assert_eq!(
        migration.advance().await.unwrap_err().kind(),
        MigrationErrorKind::CopyIncomplete,
        "the pinned key's data is not copied yet"
    );
}

#[tokio::test]
async fn rollback_is_allowed_until_the_cut_over() {
    let from = Arc::new(jump_topology(1, &[(0..16, "a")]));
    let to = Arc::new(jump_topology(2, &[(0..8, "a"), (8..16, "b")]));
    let moving = (0..1000u64)
        .find(|k| to.write(k).unwrap().node_id() == "b")
        .unwrap();
    let migration = Migration::new("m", Arc::clone(&from), Arc::clone(&to)).unwrap();
    migration.report_copied(8, 8);
    migration.advance().await.unwrap();
    assert!(migration.write(&moving).unwrap().mirror().is_some());
    migration.rollback().await.unwrap();
    assert_eq!(migration.phase(), Phase::RolledBack);
    let route = migration.write(&moving).unwrap();
    assert_eq!(route.owner().node_id(), "a");
    assert!(route.mirror().is_none());
    drop(route);
    migration.rollback().await.unwrap();
    assert_eq!(
        migration.advance().await.unwrap_err().kind(),
        MigrationErrorKind::RolledBack
    );

    let migration = Migration::new("m", from, to).unwrap();
    migration.report_copied(8, 8);
    for _ in 0..3 {
        migration.advance().await.unwrap();
    }
    assert_eq!(
        migration.rollback().await.unwrap_err().kind(),
        MigrationErrorKind::RolledBack
    );
    assert_eq!(migration.phase(), Phase::CutOver);
}

/// The copies on the new owners may be dropped once a rollback returns, so it returns only
/// once no mirrored write is in flight: one landing afterwards would leave a stale copy there
/// (a key deleted on the old owner meanwhile would come back with a later migration).
#[tokio::test]
async fn rollback_waits_for_mirrored_writes_in_flight() {
    let from = Arc::new(jump_topology(1, &[(0..16, "a")]));
    let to = Arc::new(jump_topology(2, &[(0..8, "a"), (8..16, "b")]));
    let moving = (0..1000u64)
        .find(|k| to.write(k).unwrap().node_id() == "b")
        .unwrap();
    let migration = Migration::new("m", from, to).unwrap();
    migration.report_copied(8, 8);
    migration.advance().await.unwrap();
    let mirrored = migration.write(&moving).unwrap();
    assert!(mirrored.mirror().is_some());

    let mut rollback = std::pin::pin!(migration.rollback());
    assert!(
        poll_once(rollback.as_mut()).await.is_none(),
        "a mirrored write is in flight"
    );
    // Routing has already changed: new writes go to the old owner alone.
    assert_eq!(migration.phase(), Phase::RolledBack);
    assert!(migration.write(&moving).unwrap().mirror().is_none());
    drop(mirrored);
    poll_once(rollback.as_mut())
        .await
        .expect("no mirrored write is left")
        .unwrap();
}

#[tokio::test]
async fn phases_advance_in_order_with_checks() {
    let recorder = TestRecorder::default();
    let from = Arc::new(jump_topology(1, &[(0..16, "a")]));
    let to = Arc::new(jump_topology(2, &[(0..8, "a"), (8..16, "b")]));
    let stale = Migration::new("m", Arc::clone(&to), Arc::clone(&from)).unwrap_err();
    assert_eq!(stale.kind(), MigrationErrorKind::StaleEpoch);
    let migration =
        metrics::with_local_recorder(&recorder, || Migration::new("m", from, to).unwrap());
    assert_eq!(migration.plan().unit_count(), 8);
    let err = migration.advance().await.unwrap_err();
    assert_eq!(err.kind(), MigrationErrorKind::CopyIncomplete);
    migration.report_copied(4, 8);
    assert_eq!(
        recorder.gauge("headroom_shard_migration_progress_ratio{migration=m}"),
        0.5
    );
    migration.report_copied(8, 8);
    for expected in [
        Phase::DualWrite,
        Phase::ShadowRead,
        Phase::CutOver,
        Phase::Cleanup,
        Phase::Done,
    ] {
        assert_eq!(migration.advance().await.unwrap(), expected);
        assert_eq!(
            recorder.gauge("headroom_shard_migration_phase{migration=m}"),
            f64::from(expected as u8)
        );
    }
    assert_eq!(
        migration.advance().await.unwrap_err().kind(),
        MigrationErrorKind::Finished
    );
}

/// A write of a key that stays where it is counts once in `headroom_shard_routed_total`
/// during a migration, not once more for the new topology's primary it does not go to.
#[tokio::test]
async fn a_write_that_does_not_move_is_counted_once() {
    let recorder = TestRecorder::default();
    let migration = metrics::with_local_recorder(&recorder, || {
        let from = Arc::new(jump_topology(1, &[(0..16, "a")]));
        let to = Arc::new(jump_topology(2, &[(0..8, "a"), (8..16, "b")]));
        Migration::new("m", from, to).unwrap()
    });
    let staying = (0..1000u64)
        .find(|k| migration.to_topology().shard_of(k) < ShardId(8))
        .unwrap();
    let shard = migration.to_topology().shard_of(&staying);
    let route = migration.write(&staying).unwrap();
    assert!(route.mirror().is_none());
    drop(route);
    let series = format!("headroom_shard_routed_total{{op=write,shard={shard},topology=default}}");
    assert_eq!(recorder.counter(&series), 1, "{series}");
}

#[tokio::test]
async fn routing_follows_the_phase_table() {
    let recorder = TestRecorder::default();
    let from = Arc::new(jump_topology(1, &[(0..16, "a")]));
    let to = Arc::new(jump_topology(2, &[(0..8, "a"), (8..16, "b")]));
    let migration =
        metrics::with_local_recorder(&recorder, || Migration::new("m", from, to).unwrap());
    let moving = (0..1000u64)
        .find(|k| migration.to_topology().shard_of(k) >= ShardId(8))
        .unwrap();
    let staying = (0..1000u64)
        .find(|k| migration.to_topology().shard_of(k) < ShardId(8))
        .unwrap();
    let write = |key: &u64| {
        let route = migration.write(key).unwrap();
        (
            route.owner().node_id().to_owned(),
            route.mirror().map(|m| m.node_id().to_owned()),
            route.epoch(),
        )
    };
    let read = |key: &u64| {
        let route = migration.read(key, &ReadPolicy::Primary).unwrap();
        (
            route.target.node_id().to_owned(),
            route.shadow.map(|s| s.node_id().to_owned()),
        )
    };
    assert_eq!(write(&moving), ("a".into(), Some("b".into()), 1));
    assert_eq!(write(&staying), ("a".into(), None, 1));
    assert_eq!(read(&moving), ("a".into(), None));
    migration.report_copied(8, 8);
    migration.advance().await.unwrap();
    migration.advance().await.unwrap();
    assert_eq!(migration.phase(), Phase::ShadowRead);
    assert_eq!(read(&moving), ("a".into(), Some("b".into())));
    assert_eq!(read(&staying), ("a".into(), None));
    migration.record_shadow(true);
    migration.record_shadow(false);
    assert_eq!(
        recorder.counter("headroom_shard_shadow_reads_total{migration=m,outcome=mismatch}"),
        1
    );
    migration.advance().await.unwrap();
    assert_eq!(write(&moving), ("b".into(), None, 2));
    assert_eq!(write(&staying), ("a".into(), None, 2));
    assert_eq!(read(&moving), ("b".into(), None));
}

/// `shards` logical shards all on one primary `node`, with `replicas`.
fn one_primary(
    epoch: u64,
    shards: u32,
    node: &'static str,
    replicas: &[&'static str],
) -> Topology<(), JumpRouter> {
    let mut builder = Topology::builder(JumpRouter::new(shards).unwrap())
        .epoch(epoch)
        .node(node, ());
    for &replica in replicas {
        builder = builder.node(replica, ());
    }
    builder.shards(0..shards, node, replicas).build().unwrap()
}

/// Reads through a migration keep a session's writes: before the cut-over on the old owner,
/// after it on the new, never from a replica behind what the session wrote. A write recorded
/// on the old owner only (its mirror's position unknown) sends the key's reads to the new
/// primary after the cut-over, whatever shard numbers the two routers use.
#[tokio::test]
async fn session_reads_through_a_migration_never_go_behind_the_sessions_writes() {
    let (from, to) = (
        one_primary(1, 4, "a", &["a-r"]),
        one_primary(2, 8, "b", &["b-r"]),
    );
    let key = (0..1_000u64)
        .find(|k| to.shard_of(k) >= ShardId(4))
        .expect("a key on a shard the old router does not have");
    let migration = Migration::new("m", Arc::new(from), Arc::new(to)).unwrap();
    let behind = |node: &str, topology: &Topology<(), JumpRouter>| {
        topology.report(
            node,
            ReplicaStatus {
                lag: Some(std::time::Duration::ZERO),
                position: Some(900),
            },
        );
    };
    behind("a-r", migration.from_topology());
    behind("b-r", migration.to_topology());
    let mut session = Session::new();
    session.record_write(migration.write(&key).unwrap().owner(), 1_000);
    let read = || {
        migration
            .read_session(&key, &ReadPolicy::RoundRobin, &session)
            .unwrap()
            .target
            .node_id()
            .to_owned()
    };
    assert_eq!(read(), "a", "a-r is behind the write");

    migration.report_copied(1, 1);
    for _ in 0..3 {
        migration.advance().await.unwrap();
    }
    assert_eq!(migration.phase(), Phase::CutOver);
    assert_eq!(read(), "b", "b-r may not have the mirrored write");
    let mut session = Session::new();
    session.record_write(migration.write(&key).unwrap().owner(), 1_000);
    let read = migration
        .read_session(&key, &ReadPolicy::RoundRobin, &session)
        .unwrap();
    assert_eq!(read.target.node_id(), "b", "b-r is behind the write");
}

/// Before the cut-over, a session's reads stay on the old owner unless its last write of the
/// key's new shard went to the new owner under the new topology: not for a write of the same
/// shard number under the old topology (on the old primary), nor, during the copy, for a
/// recorded mirror, when the new owner may not have the other keys yet.
#[tokio::test]
async fn session_reads_before_the_cut_over_stay_on_the_old_owner_without_a_write_past_it() {
    let (from, to) = (one_primary(1, 4, "a", &[]), one_primary(2, 8, "b", &[]));
    let same_number = (0..1_000u64)
        .find(|k| to.shard_of(k) == from.shard_of(k))
        .unwrap();
    let mut session = Session::new();
    session.record_write(&from.write(&same_number).unwrap(), 1_000);
    let migration = Migration::new("m", Arc::new(from), Arc::new(to)).unwrap();
    let read = |key: &u64, session: &Session| {
        migration
            .read_session(key, &ReadPolicy::Primary, session)
            .unwrap()
            .target
            .node_id()
            .to_owned()
    };
    assert_eq!(read(&same_number, &session), "a");
    let mirrored = migration.write(&1u64).unwrap();
    session.record_write(mirrored.mirror().unwrap(), 5);
    drop(mirrored);
    let other = (2..1_000u64)
        .find(|k| migration.to_topology().shard_of(k) == migration.to_topology().shard_of(&1u64))
        .unwrap();
    assert_eq!(read(&other, &session), "a", "read during the copy from b");
    migration.report_copied(1, 1);
    migration.advance().await.unwrap();
    let mut old_only = Session::new();
    old_only.record_write(
        &migration.from_topology().write(&same_number).unwrap(),
        1_000,
    );
    assert_eq!(read(&same_number, &old_only), "a");
}

/// A moved key the session wrote through a process still before the cut-over, whose mirror
/// position it did not record, is read from the new primary by such a process once the
/// session wrote there under the new topology: a replica past that other write may not have
/// the mirror, written later.
#[tokio::test]
async fn a_read_before_the_cut_over_of_a_moved_key_goes_to_the_new_primary_not_a_replica() {
    let from = Arc::new(one_primary(1, 4, "a", &[]));
    let to = Arc::new(one_primary(2, 8, "b", &["b-r"]));
    let moved: Vec<u64> = (0..10_000u64)
        .filter(|k| to.shard_of(k) == ShardId(5))
        .take(2)
        .collect();
    let (j, k) = (moved[0], moved[1]);
    let past = Migration::new("past", Arc::clone(&from), Arc::clone(&to)).unwrap();
    let lagging = Migration::new("lagging", Arc::clone(&from), Arc::clone(&to)).unwrap();
    for migration in [&past, &lagging] {
        migration.report_copied(1, 1);
    }
    for _ in 0..3 {
        past.advance().await.unwrap();
    }
    for _ in 0..2 {
        lagging.advance().await.unwrap();
    }
    let mut session = Session::new();
    session.record_write(past.write(&j).unwrap().owner(), 100);
    // Its mirror lands on `b` at 200, unrecorded.
    session.record_write(lagging.write(&k).unwrap().owner(), 50);
    to.report(
        "b-r",
        ReplicaStatus {
            lag: Some(std::time::Duration::ZERO),
            position: Some(150),
        },
    );
    let read = lagging
        .read_session(&k, &ReadPolicy::RoundRobin, &session)
        .unwrap();
    assert_eq!(read.target.node_id(), "b");
}

/// A node both topologies of a migration keep is one node: the replica status reported to
/// the topology being replaced (the one `monitor_lag` probes through the handle) serves the
/// reads the new topology routes from the cut-over on, so lag-aware reads of a key that stays
/// still go to its replica rather than all to the primaries.
#[tokio::test]
async fn after_the_cut_over_reads_use_the_status_reported_to_the_old_topology() {
    let from = Topology::builder(JumpRouter::new(4).unwrap())
        .epoch(1)
        .node("a", ())
        .node("b", ())
        .node("b-r", ())
        .shards(0..2, "a", &[])
        .shards(2..4, "b", &["b-r"])
        .build()
        .unwrap();
    let to = one_primary(2, 8, "b", &["b-r"]);
    let stays = (0..1_000u64)
        .find(|k| from.shard_of(k) >= ShardId(2))
        .expect("a key on b in both topologies");
    let migration = Migration::new("m", Arc::new(from), Arc::new(to)).unwrap();
    migration.from_topology().report(
        "b-r",
        ReplicaStatus {
            lag: Some(std::time::Duration::ZERO),
            position: Some(1),
        },
    );
    let policy = ReadPolicy::LagAware {
        max_lag: std::time::Duration::from_secs(1),
    };
    let replica = |migration: &Migration<(), JumpRouter>| {
        migration
            .read(&stays, &policy)
            .unwrap()
            .target
            .node_id()
            .to_owned()
    };
    assert_eq!(replica(&migration), "b-r");
    migration.report_copied(1, 1);
    for _ in 0..3 {
        migration.advance().await.unwrap();
    }
    assert_eq!(migration.phase(), Phase::CutOver);
    assert_eq!(replica(&migration), "b-r");
}

/// A session that wrote on the new primary before the cut-over (a key that stays there)
/// knows a position there older than the mirror of a key it wrote on its old primary: after
/// the cut-over that key is read from the new primary until the session writes there under
/// the new topology (or recorded the mirror's write), not from a replica that has only
/// reached the earlier position.
#[tokio::test]
async fn a_moved_key_is_read_from_the_new_primary_despite_earlier_writes_there() {
    let from = Topology::builder(JumpRouter::new(4).unwrap())
        .epoch(1)
        .node("a", ())
        .node("a-r", ())
        .node("b", ())
        .node("b-r", ())
        .shards(0..2, "a", &["a-r"])
        .shards(2..4, "b", &["b-r"])
        .build()
        .unwrap();
    let to = one_primary(2, 8, "b", &["b-r"]);
    let stays = (0..1_000u64)
        .find(|k| from.shard_of(k) >= ShardId(2))
        .expect("a key on b in both topologies");
    let moves = (0..1_000u64)
        .find(|k| from.shard_of(k) < ShardId(2) && to.shard_of(k) != from.shard_of(k))
        .expect("a key moving from a to b");
    let migration = Migration::new("m", Arc::new(from), Arc::new(to)).unwrap();
    let report = |position| {
        migration.to_topology().report(
            "b-r",
            ReplicaStatus {
                lag: Some(std::time::Duration::ZERO),
                position: Some(position),
            },
        );
    };
    let mut session = Session::new();
    session.record_write(migration.write(&stays).unwrap().owner(), 500);
    let route = migration.write(&moves).unwrap();
    assert_eq!(route.mirror().map(|m| m.node_id()), Some("b"));
    session.record_write(route.owner(), 100);
    // Its mirror lands on b at 600: `session` does not record it, `mirrored` does.
    let mut mirrored = session.clone();
    mirrored.record_write(route.mirror().unwrap(), 600);
    drop(route);
    report(550);
    migration.report_copied(1, 1);
    for _ in 0..3 {
        migration.advance().await.unwrap();
    }
    assert_eq!(migration.phase(), Phase::CutOver);
    let read = |session: &Session| {
        migration
            .read_session(&moves, &ReadPolicy::RoundRobin, session)
            .unwrap()
            .target
            .node_id()
            .to_owned()
    };
    assert_eq!(
        read(&session),
        "b",
        "b-r at 550 may not have the mirror at 600"
    );

    // Recording the mirror's write lets a replica that has it serve the key.
    assert_eq!(read(&mirrored), "b", "b-r is behind the mirror");
    report(600);
    assert_eq!(read(&mirrored), "b-r");

    // So does a write on b after the cut-over, which comes after every mirror.
    report(550);
    session.record_write(migration.write(&stays).unwrap().owner(), 700);
    assert_eq!(read(&session), "b", "b-r is behind the session's write");
    report(700);
    assert_eq!(read(&session), "b-r");
}

#[tokio::test]
async fn cut_over_waits_for_writes_to_old_owners_and_survives_cancellation() {
    let from = Arc::new(jump_topology(1, &[(0..16, "a")]));
    let to = Arc::new(jump_topology(2, &[(0..16, "b")]));
    let migration = Migration::new("m", from, to).unwrap();
    migration.report_copied(1, 1);
    migration.advance().await.unwrap();
    migration.advance().await.unwrap();
    let in_flight = migration.write("k").unwrap();
    assert_eq!(in_flight.owner().node_id(), "a");
    {
        // The cut-over switches routing at once, then waits for the write in flight.
        let advance = migration.advance();
        tokio::pin!(advance);
        assert!(poll_once(advance.as_mut()).await.is_none());
        assert_eq!(migration.phase(), Phase::CutOver);
        assert_eq!(migration.write("k").unwrap().owner().node_id(), "b");
        // Dropping the waiting advance leaves the phase advanced and leaks nothing.
    }
    assert_eq!(migration.writes_to_old_owners(), 1);
    {
        // The next step waits for the same writes: the cleanup never starts with one open.
        let advance = migration.advance();
        tokio::pin!(advance);
        assert!(
            poll_once(advance.as_mut()).await.is_none(),
            "left the cut-over with a write to an old owner in flight"
        );
        assert_eq!(migration.phase(), Phase::CutOver);
    }
    let drained = migration.drained();
    tokio::pin!(drained);
    assert!(poll_once(drained.as_mut()).await.is_none());
    drop(in_flight);
    assert!(poll_once(drained.as_mut()).await.is_some());
    assert_eq!(migration.writes_to_old_owners(), 0);
    assert_eq!(migration.advance().await.unwrap(), Phase::Cleanup);
}

#[test]
fn epoch_fences_refuse_older_routes() {
    let fence = EpochFence::new(1);
    assert!(fence.admit(1).is_ok());
    fence.raise(3);
    fence.raise(2); // never lowered
    let err = fence.admit(2).unwrap_err();
    assert_eq!(err.kind(), MigrationErrorKind::Fenced);
    assert!(err.is_retryable() && err.is_rejected());
    assert!(fence.admit(3).is_ok());
}

/// A storage node: versioned values, last writer (highest version) wins, and a log of writes
/// that arrived after the node was retired for moving keys.
#[derive(Default)]
struct Store {
    values: Mutex<HashMap<u64, u64>>,
    fence: EpochFence,
    late_writes: AtomicU64,
}

impl Store {
    fn put(&self, key: u64, version: u64) {
        let mut values = self.values.lock().unwrap();
        let slot = values.entry(key).or_default();
        *slot = (*slot).max(version);
    }

    fn get(&self, key: u64) -> u64 {
        self.values.lock().unwrap().get(&key).copied().unwrap_or(0)
    }
}

/// Waits (cooperatively, bounded) until `n` more writes have completed.
async fn writes_pass(completed: &AtomicU64, n: u64) {
    let target = completed.load(Ordering::Acquire) + n;
    for _ in 0..10_000_000 {
        if completed.load(Ordering::Acquire) >= target {
            return;
        }
        tokio::task::yield_now().await;
    }
    panic!("writers stalled");
}

/// Writers, readers and a copier run while the driver walks every phase: no acknowledged write
/// is lost, reads never go back in time, and no write reaches the retired owner after the
/// cut-over (the retired owner's fence refuses the old epoch and the test counts it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_migration_loses_no_write() {
    const KEYS: u64 = 64;
    const WRITERS: u64 = 4;
    let from = Arc::new(jump_topology(1, &[(0..16, "a")]));
    let to = Arc::new(jump_topology(2, &[(0..8, "a"), (8..16, "b")]));
    let migration = Arc::new(Migration::new("sim", from, to).unwrap());
    let stores: Arc<HashMap<&'static str, Store>> = Arc::new(
        [("a", Store::default()), ("b", Store::default())]
            .into_iter()
            .collect(),
    );
    let moving: Vec<u64> = (0..KEYS)
        .filter(|k| migration.to_topology().shard_of(k) >= ShardId(8))
        .collect();
    assert!(!moving.is_empty());
    // acknowledged[k]: the highest version whose write completed.
    let acknowledged: Arc<Vec<AtomicU64>> =
        Arc::new((0..KEYS).map(|_| AtomicU64::new(0)).collect());
    let completed = Arc::new(AtomicU64::new(0));
    let cut_over = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));

    let mut tasks = Vec::new();
    for writer in 0..WRITERS {
        let (migration, stores, acknowledged, completed, cut_over, stop, moving) = (
            Arc::clone(&migration),
            Arc::clone(&stores),
            Arc::clone(&acknowledged),
            Arc::clone(&completed),
            Arc::clone(&cut_over),
            Arc::clone(&stop),
            moving.clone(),
        );
        tasks.push(tokio::spawn(async move {
            // Each writer owns the keys congruent to its number, so versions grow per key.
            let mut version = 0;
            while !stop.load(Ordering::Acquire) && version < 1_000_000 {
                version += 1;
                let key = (version * 7 + writer) % KEYS / WRITERS * WRITERS + writer;
                let route = migration.write(&key).unwrap();
                tokio::task::yield_now().await;
                let owner = &stores[route.owner().node_id()];
                let late = owner.fence.admit(route.epoch()).is_err()
                    || (cut_over.load(Ordering::Acquire)
                        && route.owner().node_id() == "a"
                        && moving.contains(&key));
                if late {
                    owner.late_writes.fetch_add(1, Ordering::Relaxed);
                }
                owner.put(key, version);
                tokio::task::yield_now().await;
                if let Some(mirror) = route.mirror() {
                    stores[mirror.node_id()].put(key, version);
                }
                drop(route);
                acknowledged[key as usize].fetch_max(version, Ordering::AcqRel);
                completed.fetch_add(1, Ordering::AcqRel);
            }
        }));
    }
    for _ in 0..2 {
        let (migration, stores, acknowledged, stop) = (
            Arc::clone(&migration),
            Arc::clone(&stores),
            Arc::clone(&acknowledged),
            Arc::clone(&stop),
        );
        tasks.push(tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(Ordering::Acquire) && i < 10_000_000 {
                i += 1;
                let key = i % KEYS;
                let floor = acknowledged[key as usize].load(Ordering::Acquire);
                let route = migration.read(&key, &ReadPolicy::Primary).unwrap();
                tokio::task::yield_now().await;
                let seen = stores[route.target.node_id()].get(key);
                assert!(
                    seen >= floor,
                    "key {key}: read {seen} after {floor} was acknowledged"
                );
                if let Some(shadow) = route.shadow {
                    migration.record_shadow(stores[shadow.node_id()].get(key) == seen);
                }
            }
        }));
    }

    writes_pass(&completed, 200).await;
    // The copier backfills moving keys from the old owner without overwriting newer data,
    // while writes keep landing.
    for (done, key) in moving.iter().enumerate() {
        let value = stores["a"].get(*key);
        writes_pass(&completed, 5).await;
        stores["b"].put(*key, value);
        migration.report_copied(done as u64 + 1, moving.len() as u64);
    }
    for phase in [Phase::DualWrite, Phase::ShadowRead, Phase::CutOver] {
        writes_pass(&completed, 200).await;
        assert_eq!(migration.advance().await.unwrap(), phase);
    }
    cut_over.store(true, Ordering::Release);
    // The retired owner now refuses the old epoch: a write routed before the cut-over that
    // arrived now would be counted as late.
    stores["a"].fence.raise(2);
    assert_eq!(migration.writes_to_old_owners(), 0);
    for phase in [Phase::Cleanup, Phase::Done] {
        writes_pass(&completed, 200).await;
        assert_eq!(migration.advance().await.unwrap(), phase);
    }
    writes_pass(&completed, 200).await;
    stop.store(true, Ordering::Release);
    for task in tasks {
        task.await.unwrap();
    }

    assert_eq!(stores["a"].late_writes.load(Ordering::Relaxed), 0);
    for key in 0..KEYS {
        let owner = if moving.contains(&key) { "b" } else { "a" };
        let acked = acknowledged[key as usize].load(Ordering::Acquire);
        assert_eq!(stores[owner].get(key), acked, "key {key} lost a write");
    }
}

#[derive(Clone, Debug)]
enum Step {
    Write(u64),
    Finish(usize),
    Read(u64),
    Copied(u64),
    Advance,
    Rollback,
}

fn step() -> impl proptest::strategy::Strategy<Value = Step> {
    use proptest::prelude::*;
    prop_oneof![
        (0..64u64).prop_map(Step::Write),
        (0..8usize).prop_map(Step::Finish),
        (0..64u64).prop_map(Step::Read),
        (0..=8u64).prop_map(Step::Copied),
        Just(Step::Advance),
        Just(Step::Rollback),
    ]
}

proptest::proptest! {
    /// Random interleavings of writes (held open or finished), reads, copy progress and phase
    /// steps (including cut-overs abandoned while they wait): phases only move forward, Copy is
    /// left only once copied, moving writes are mirrored before the cut-over, and once the
    /// cut-over has drained no route leads to the retired owner. A rollback succeeds only
    /// before the cut-over, returns only once no mirrored write is open, and then routes
    /// everything to the old owner, unmirrored, for good.
    #[test]
    fn the_phase_machine_keeps_its_invariants(steps in proptest::collection::vec(step(), 1..120)) {
        let from = Arc::new(jump_topology(1, &[(0..16, "a")]));
        let to = Arc::new(jump_topology(2, &[(0..8, "a"), (8..16, "b")]));
        let migration = Migration::new("prop", from, to).unwrap();
        let moving = |key: &u64| migration.to_topology().shard_of(key) >= ShardId(8);
        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let mut open = Vec::new();
        let mut copied = 0;
        let mut phase = Phase::Copy;
        for step in steps {
            match step {
                Step::Write(key) => {
                    let route = migration.write(&key).unwrap();
                    if phase == Phase::RolledBack {
                        proptest::prop_assert_eq!(route.owner().node_id(), "a");
                        proptest::prop_assert!(route.mirror().is_none());
                    } else if phase < Phase::CutOver {
                        proptest::prop_assert_eq!(route.owner().node_id(), "a");
                        proptest::prop_assert_eq!(route.mirror().is_some(), moving(&key));
                    } else {
                        proptest::prop_assert_eq!(route.owner().node_id(), if moving(&key) { "b" } else { "a" });
                        proptest::prop_assert!(route.mirror().is_none());
                    }
                    open.push(route);
                }
                Step::Finish(i) => {
                    if !open.is_empty() {
                        let at = i % open.len();
                        drop(open.swap_remove(at));
                    }
                }
                Step::Read(key) => {
                    let route = migration.read(&key, &ReadPolicy::Primary).unwrap();
                    let new_owner_serves = matches!(phase, Phase::CutOver | Phase::Cleanup | Phase::Done);
                    let expected = if new_owner_serves && moving(&key) { "b" } else { "a" };
                    proptest::prop_assert_eq!(route.target.node_id(), expected);
                    proptest::prop_assert_eq!(
                        route.shadow.is_some(),
                        phase == Phase::ShadowRead && moving(&key)
                    );
                }
                Step::Copied(n) => {
                    copied = n;
                    migration.report_copied(n, 8);
                }
                Step::Advance => {
                    let outcome = runtime.block_on(async {
                        let advance = migration.advance();
                        tokio::pin!(advance);
                        poll_once(advance.as_mut()).await
                    });
                    match outcome {
                        Some(Ok(next)) => {
                            proptest::prop_assert!(next > phase);
                            proptest::prop_assert!(phase != Phase::Copy || copied == 8);
                            phase = next;
                        }
                        Some(Err(err)) => match err.kind() {
                            MigrationErrorKind::CopyIncomplete => proptest::prop_assert!(copied < 8),
                            MigrationErrorKind::Finished => proptest::prop_assert_eq!(phase, Phase::Done),
                            MigrationErrorKind::RolledBack => proptest::prop_assert_eq!(phase, Phase::RolledBack),
                            other => proptest::prop_assert!(false, "unexpected {:?}", other),
                        },
                        // The cut-over waits for open writes to the old owner; abandoning the
                        // wait leaves the phase advanced.
                        None => {
                            proptest::prop_assert_eq!(migration.phase(), Phase::CutOver);
                            proptest::prop_assert!(migration.writes_to_old_owners() > 0);
                            phase = Phase::CutOver;
                        }
                    }
                    proptest::prop_assert_eq!(migration.phase(), phase);
                }
                Step::Rollback => {
                    let allowed = matches!(
                        phase,
                        Phase::Copy | Phase::DualWrite | Phase::ShadowRead | Phase::RolledBack
                    );
                    let outcome = runtime.block_on(async {
                        let rollback = migration.rollback();
                        tokio::pin!(rollback);
                        poll_once(rollback.as_mut()).await
                    });
                    let mirrored = open.iter().any(|route| route.mirror().is_some());
                    match outcome {
                        Some(Ok(())) => {
                            proptest::prop_assert!(allowed, "rolled back from {:?}", phase);
                            proptest::prop_assert!(!mirrored, "returned with a mirrored write open");
                            phase = Phase::RolledBack;
                        }
                        Some(Err(err)) => {
                            proptest::prop_assert!(!allowed, "refused from {:?}", phase);
                            proptest::prop_assert_eq!(err.kind(), MigrationErrorKind::RolledBack);
                        }
                        // The rollback waits for mirrored writes; abandoning the wait leaves
                        // the migration rolled back.
                        None => {
                            proptest::prop_assert!(allowed && mirrored);
                            phase = Phase::RolledBack;
                        }
                    }
                    proptest::prop_assert_eq!(migration.phase(), phase);
                }
            }
            let old_routes = open.iter().filter(|r| r.epoch() == 1).count();
            proptest::prop_assert_eq!(migration.writes_to_old_owners(), old_routes);
        }
        drop(open);
        proptest::prop_assert_eq!(migration.writes_to_old_owners(), 0);
    }
}
