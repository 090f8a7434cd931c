//! Shard keys and hash tags from arbitrary bytes: every router answers a shard in range, the
//! same one twice, and a key with a `{hash tag}` lands in the tag's Redis Cluster slot.
#![no_main]

use std::sync::OnceLock;

use headroom_shard::{
    CLUSTER_SLOTS, JumpRouter, MaglevRouter, RendezvousRouter, RingRouter, Router, SlotRouter,
    cluster_slot,
};
use libfuzzer_sys::fuzz_target;

fn routers() -> &'static [(u32, Box<dyn Router + Send + Sync>)] {
    static ROUTERS: OnceLock<Vec<(u32, Box<dyn Router + Send + Sync>)>> = OnceLock::new();
    ROUTERS.get_or_init(|| {
        vec![
            (97, Box::new(JumpRouter::new(97).unwrap())),
            (13, Box::new(RingRouter::new(13, 160).unwrap())),
            (31, Box::new(MaglevRouter::new(31, 65_537).unwrap())),
            (7, Box::new(RendezvousRouter::new(7).unwrap())),
            (5, Box::new(SlotRouter::even(5).unwrap())),
        ]
    })
}

fuzz_target!(|key: &[u8]| {
    let slot = cluster_slot(key);
    assert!(slot < CLUSTER_SLOTS);
    if let Some(open) = key.iter().position(|&b| b == b'{') {
        let rest = &key[open + 1..];
        if let Some(len) = rest.iter().position(|&b| b == b'}')
            && len > 0
        {
            assert_eq!(slot, cluster_slot(&rest[..len]), "a hash tag decides the slot");
        }
    }
    for (shards, router) in routers() {
        let shard = router.route_bytes(key);
        assert!(shard.0 < *shards, "{shard:?} out of {shards}");
        assert_eq!(router.route_bytes(key), shard, "routing is deterministic");
    }
});
