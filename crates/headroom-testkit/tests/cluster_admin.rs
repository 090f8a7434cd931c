//! The cluster admin helpers act on a real cluster: a migrated slot takes its keys along, and a
//! killed master is replaced by its replica.

use headroom_testkit::RedisCluster;

#[test]
fn migrate_slot_moves_the_slot_and_its_keys() {
    let cluster = RedisCluster::start_with(3, 0);
    let slot = cluster.keyslot("{fleet}:a");
    let from = cluster.slot_owner(slot);
    cluster.nodes()[from].cli(&["SET", "{fleet}:a", "1"]);
    cluster.nodes()[from].cli(&["SET", "{fleet}:b", "2"]);
    let to = (from + 1) % cluster.masters();

    cluster.migrate_slot(slot, to);

    assert_eq!(cluster.slot_owner(slot), to);
    let target = &cluster.nodes()[to];
    assert_eq!(target.cli(&["GET", "{fleet}:a"]).trim(), "1");
    assert_eq!(target.cli(&["GET", "{fleet}:b"]).trim(), "2");
    assert!(
        cluster.nodes()[from]
            .cli(&["CLUSTER", "COUNTKEYSINSLOT", &slot.to_string()])
            .trim()
            == "0"
    );
}

#[test]
fn fail_over_promotes_the_replica() {
    let cluster = RedisCluster::start_with(3, 1);
    let slot = cluster.keyslot("failover-key");
    let master = cluster.slot_owner(slot);

    let promoted = cluster.fail_over(master);

    assert_ne!(promoted, master);
    assert_eq!(cluster.slot_owner(slot), promoted);
    assert!(!cluster.nodes()[master].is_running());
}
