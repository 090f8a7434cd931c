//! Golden vectors: fixed keys map to fixed shards for every router, so any change to a hash
//! function or a router's construction (which would re-route keys in production) fails here.

use headroom_shard::ConfigErrorKind;
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
        SlotRouter::even(0).unwrap_err().kind(),
        ConfigErrorKind::Empty
    );
    assert_eq!(
        SlotRouter::even(16385).unwrap_err().kind(),
        ConfigErrorKind::TooLarge
    );
    assert_eq!(
        SlotRouter::even(16384).unwrap().slot_owner(16383),
        ShardId(16383)
    );
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
    assert_eq!(
        router.top_k(b"user:42", &mut []),
        0,
        "an empty buffer gets nothing"
    );
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

#[test]
fn slot_assignments_may_not_overlap() {
    let overlapping = SlotRouter::builder()
        .assign(0..9000, ShardId(0))
        .assign(8999..16384, ShardId(1))
        .build()
        .unwrap_err();
    assert_eq!(overlapping.kind(), ConfigErrorKind::Duplicate);
    assert!(overlapping.to_string().contains("8999"), "{overlapping}");
    let adjacent = SlotRouter::builder()
        .assign(0..9000, ShardId(0))
        .assign(9000..16384, ShardId(1))
        .build()
        .unwrap();
    assert_eq!(adjacent.slot_owner(8999), ShardId(0));
    assert_eq!(adjacent.slot_owner(9000), ShardId(1));
}

/// Keys of every shape the slot function must handle: plain, hash tags (empty, nested,
/// unclosed, several), unicode, and bytes that are not UTF-8.
fn slot_keys() -> Vec<Vec<u8>> {
    let mut rng = fastrand::Rng::with_seed(16384);
    let mut keys: Vec<Vec<u8>> = [
        "",
        "{}",
        "{}{a}",
        "a{}b",
        "{a}{}",
        "{{a}}",
        "{a",
        "a}",
        "}{a}",
        "{",
        "}",
        "{}}",
        "{{}}",
        "foo{}{bar}",
        "foo{{bar}}zap",
        "foo{bar}{zap}",
        "{user1}.following",
        "日本{語}",
        "{é}",
        "🦀{🦀}🦀",
        "ключ",
        "{\u{0}}",
    ]
    .iter()
    .map(|key| key.as_bytes().to_vec())
    .collect();
    keys.push(vec![0]);
    keys.push(vec![0xff, b'{', 0xfe, b'}', 0]);
    keys.push(b"{\x00}".to_vec());
    const PIECES: [&str; 10] = ["{", "}", "{}", "user", "é", "語", "🦀", ":", "\0", "x"];
    for i in 0..4000 {
        let len = rng.usize(0..24);
        let key = match i % 4 {
            // Arbitrary bytes, most of them not UTF-8.
            0 => (0..len).map(|_| rng.u8(..)).collect(),
            // Bytes drawn mostly from the braces.
            1 => {
                const BYTES: [u8; 7] = [b'{', b'}', b'{', b'}', b'a', 0, 0xff];
                (0..len).map(|_| BYTES[rng.usize(..BYTES.len())]).collect()
            }
            // Printable pieces, unicode included.
            _ => (0..len / 3)
                .flat_map(|_| PIECES[rng.usize(..PIECES.len())].bytes())
                .collect(),
        };
        keys.push(key);
    }
    keys
}

/// The slot function agrees with a live Redis Cluster's `CLUSTER KEYSLOT` on thousands of keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_slot_agrees_with_a_live_cluster() {
    let cluster = headroom_testkit::shared_cluster();
    let node = &cluster.urls()[0];
    let redis = headroom_redis::Redis::connect(
        headroom_redis::RedisConfig::standalone(node.as_str())
            .with_command_timeout(std::time::Duration::from_secs(10)),
    )
    .await
    .unwrap();
    let keys = slot_keys();
    assert!(keys.len() > 4000);
    let mut pipeline = redis::pipe();
    for key in &keys {
        pipeline.cmd("CLUSTER").arg("KEYSLOT").arg(key.as_slice());
    }
    let slots: Vec<u16> = redis.query_pipeline(&pipeline).await.unwrap();
    assert_eq!(slots.len(), keys.len());
    for (key, live) in keys.iter().zip(slots) {
        assert_eq!(
            cluster_slot(key),
            live,
            "key {:?}",
            String::from_utf8_lossy(key)
        );
    }
    // And one key checked through the test kit's own client, as a cross-check of the pipeline.
    assert_eq!(cluster.keyslot("{user1}.following"), cluster_slot(b"user1"));
}
