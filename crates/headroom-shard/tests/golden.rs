//! Golden vectors: fixed keys map to fixed shards for every router, so any change to a hash
//! function or a router's construction (which would re-route keys in production) fails here.

use headroom_shard::hash::{crc16, key_hash, mix};
use headroom_shard::{
    BoundedLoadRouter, Directory, JumpRouter, MaglevRouter, RangeRouter, RendezvousRouter,
    RingRouter, Router, ShardId, SlotRouter, cluster_slot, jump_hash,
};

const KEYS: [&str; 6] = ["", "a", "user:1", "user:42", "order:9", "{user1}.following"];

fn routes(router: &impl Router) -> Vec<u32> {
    KEYS.iter().map(|key| router.route(*key).0).collect()
}

#[test]
fn key_hash_is_xxh3_64_with_seed_zero() {
    // Published XXH3-64 vectors.
    assert_eq!(key_hash(b""), 0x2d06_8005_38d3_94c2);
    assert_eq!(key_hash(b"a"), 0xe6c6_32b6_1e96_4e1f);
    assert_eq!(key_hash(b"abc"), 0x78af_5f94_892f_3950);
    assert_eq!(key_hash(b"user:42"), 0x9fc1_e605_fa71_74aa);
    assert_eq!(mix(1, 2), 0xe850_28e6_b31f_8e7a);
}

#[test]
fn redis_cluster_vectors() {
    // From the Redis Cluster specification.
    assert_eq!(crc16(b"123456789"), 0x31C3);
    assert_eq!(cluster_slot(b"123456789"), 0x31C3);
    assert_eq!(
        cluster_slot(b"{user1}.following"),
        cluster_slot(b"{user1}.followers")
    );
    assert_eq!(cluster_slot(b"{user1}.following"), cluster_slot(b"user1"));
    assert_eq!(cluster_slot(b"foo{}{bar}"), crc16(b"foo{}{bar}") % 16384);
    assert_eq!(cluster_slot(b"foo{{bar}}zap"), cluster_slot(b"{bar"));
    assert_eq!(cluster_slot(b"foo{bar}{zap}"), cluster_slot(b"bar"));
    assert_eq!(cluster_slot(b""), 0);
    assert_eq!(cluster_slot(b"a"), 15495);
    assert_eq!(cluster_slot(b"user:42"), 15880);
    let router = SlotRouter::even(3).unwrap();
    assert_eq!(routes(&router), [0, 2, 1, 2, 2, 1]);
    assert_eq!(
        router.route("{user1}.following"),
        router.route("{user1}.followers")
    );
}

/// The algorithm exactly as printed in the paper (Lamping and Veach, figure 1).
fn paper_jump(mut key: u64, num_buckets: i32) -> i32 {
    let (mut b, mut j): (i64, i64) = (-1, 0);
    while j < i64::from(num_buckets) {
        b = j;
        key = key.wrapping_mul(2862933555777941757).wrapping_add(1);
        j = ((b + 1) as f64 * ((1i64 << 31) as f64 / ((key >> 33) + 1) as f64)) as i64;
    }
    b as i32
}

#[test]
fn jump_matches_the_paper() {
    assert_eq!(jump_hash(0, 1), 0);
    assert_eq!(jump_hash(1, 10), 6);
    assert_eq!(jump_hash(0xdead_beef, 100), 87);
    assert_eq!(jump_hash(u64::MAX, 1000), 313);
    assert_eq!(jump_hash(42, 7), 2);
    for i in 0..10_000u64 {
        let key = mix(i, 7);
        for buckets in [1, 2, 3, 10, 1000, 65_536] {
            assert_eq!(
                jump_hash(key, buckets) as i32,
                paper_jump(key, buckets as i32)
            );
        }
    }
    assert_eq!(
        routes(&JumpRouter::new(1000).unwrap()),
        [241, 350, 198, 848, 602, 415]
    );
}

#[test]
fn rendezvous_vectors() {
    let router = RendezvousRouter::new(100).unwrap();
    assert_eq!(routes(&router), [22, 24, 16, 98, 88, 16]);
    let mut top = [ShardId(0); 3];
    assert_eq!(router.top_k(b"user:42", &mut top), 3);
    assert_eq!(top, [ShardId(98), ShardId(89), ShardId(11)]);
    let weighted =
        RendezvousRouter::weighted([(ShardId(0), 1.0), (ShardId(1), 2.0), (ShardId(5), 0.5)])
            .unwrap();
    assert_eq!(routes(&weighted), [0, 0, 1, 0, 1, 1]);
}

#[test]
fn ring_vectors() {
    assert_eq!(
        routes(&RingRouter::new(100, 160).unwrap()),
        [76, 76, 26, 73, 56, 60]
    );
}

#[test]
fn maglev_vectors() {
    assert_eq!(
        routes(&MaglevRouter::new(100, 65_537).unwrap()),
        [72, 71, 41, 25, 29, 37]
    );
}

#[test]
fn range_and_directory_vectors() {
    let range = RangeRouter::builder(ShardId(0))
        .split_at("o", ShardId(1))
        .split_at("user:2", ShardId(2))
        .build()
        .unwrap();
    assert_eq!(routes(&range), [0, 0, 1, 2, 1, 2]);
    let directory = Directory::new(
        JumpRouter::new(1000).unwrap(),
        [("user:42", ShardId(7)), ("", ShardId(3))],
    )
    .unwrap();
    assert_eq!(routes(&directory), [3, 350, 198, 7, 602, 415]);
}

#[test]
fn bounded_load_follows_the_ring_when_unloaded() {
    let bounded = BoundedLoadRouter::new(100, 1.25).unwrap();
    let ring = RingRouter::new(100, BoundedLoadRouter::DEFAULT_VNODES).unwrap();
    for key in KEYS {
        assert_eq!(bounded.acquire(key).shard(), ring.route(key));
    }
}
