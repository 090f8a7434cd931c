//! Shard lookups do not allocate: every router, topology routing (writes, reads under each
//! policy, sessions), topology snapshots and migration routing, measured with a counting
//! global allocator on the measuring thread only (other tests run beside it on their own
//! threads).

use std::sync::Arc;
use std::time::Duration;

use headroom_shard::{
    BoundedLoadRouter, Directory, JumpRouter, MaglevRouter, Migration, RangeRouter, ReadPolicy,
    RendezvousRouter, ReplicaStatus, RingRouter, Router, Session, ShardId, SlotRouter, Topology,
    TopologyHandle, cluster_slot,
};

/// Runs `f` and asserts that it allocated (or reallocated) nothing on this thread.
fn assert_no_alloc(what: &str, f: impl FnOnce()) {
    let counted = allocation_counter::measure(f);
    assert_eq!(counted.count_total, 0, "{what} allocated: {counted:?}");
}

fn topology(epoch: u64, primary: &str) -> Topology<(), JumpRouter> {
    Topology::builder(JumpRouter::new(16).unwrap())
        .epoch(epoch)
        .node("a", ())
        .node("b", ())
        .node("r1", ())
        .node("r2", ())
        .shards(0..16, primary, &["r1", "r2"])
        .build()
        .unwrap()
}

#[test]
fn lookups_do_not_allocate() {
    let keys: Vec<String> = (0..256).map(|i| format!("tenant:{i}:order")).collect();
    let routers: Vec<(&str, Box<dyn Router>)> = vec![
        ("jump", Box::new(JumpRouter::new(1000).unwrap())),
        ("rendezvous", Box::new(RendezvousRouter::new(100).unwrap())),
        ("ring", Box::new(RingRouter::new(100, 160).unwrap())),
        ("maglev", Box::new(MaglevRouter::new(100, 65_537).unwrap())),
        ("slots", Box::new(SlotRouter::even(10).unwrap())),
        (
            "range",
            Box::new(
                RangeRouter::builder(ShardId(0))
                    .split_at("t", ShardId(1))
                    .build()
                    .unwrap(),
            ),
        ),
        (
            "directory",
            Box::new(
                Directory::new(
                    JumpRouter::new(8).unwrap(),
                    [("tenant:7:order", ShardId(9))],
                )
                .unwrap(),
            ),
        ),
    ];
    for (name, router) in &routers {
        assert_no_alloc(name, || {
            for key in &keys {
                std::hint::black_box(router.route_bytes(key.as_bytes()));
            }
        });
    }
    let rendezvous = RendezvousRouter::new(100).unwrap();
    let bounded = BoundedLoadRouter::new(10, 1.25).unwrap();
    assert_no_alloc("top_k, bounded loads, cluster_slot", || {
        let mut top = [ShardId(0); 3];
        for key in &keys {
            rendezvous.top_k(key.as_bytes(), &mut top);
            let guard = bounded.acquire(key.as_str());
            std::hint::black_box((guard.shard(), cluster_slot(key.as_bytes())));
        }
    });

    let handle = TopologyHandle::new(topology(1, "a"));
    handle.load().report(
        "r1",
        ReplicaStatus {
            lag: Some(Duration::ZERO),
            position: Some(10),
        },
    );
    let mut session = Session::new();
    session.record_write(&handle.load().write_shard(ShardId(3)).unwrap(), 5);
    let policies = [
        ReadPolicy::Primary,
        ReadPolicy::RoundRobin,
        ReadPolicy::LeastInFlight,
        ReadPolicy::LagAware {
            max_lag: Duration::from_millis(10),
        },
    ];
    assert_no_alloc("topology routing", || {
        for key in &keys {
            let topology = handle.load();
            drop(topology.write(key.as_str()).unwrap());
            for policy in &policies {
                drop(topology.read(key.as_str(), policy).unwrap());
                drop(
                    topology
                        .read_session(key.as_str(), policy, &session)
                        .unwrap(),
                );
            }
        }
    });

    let migration =
        Migration::new("m", Arc::new(topology(1, "a")), Arc::new(topology(2, "b"))).unwrap();
    assert_no_alloc("migration routing", || {
        for key in &keys {
            drop(migration.write(key.as_str()).unwrap());
            drop(
                migration
                    .read(key.as_str(), &ReadPolicy::RoundRobin)
                    .unwrap(),
            );
        }
    });
}
