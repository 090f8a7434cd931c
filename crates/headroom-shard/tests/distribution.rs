//! Balance, disruption and bounded-load properties over one million keys.
//!
//! One million keys over 1000 shards is 1000 keys per shard, so sampling noise alone puts the
//! busiest shard near 1.10× the mean even for a perfect router. Balance tests therefore check
//! two things: a bound on max/mean that such noise respects, and a chi-square test that the
//! loads are what an ideal uniform router would produce (a biased router fails it). Maglev's
//! key-space share is exact (its table) and is held to the 1.01 bound directly.

use headroom_shard::{
    BoundedLoadRouter, JumpRouter, LoadGuard, MaglevRouter, RendezvousRouter, RingRouter, Router,
    ShardId,
};
use proptest::prelude::*;

const KEYS: u64 = 1_000_000;

fn loads(router: &impl Router, shards: usize) -> Vec<u64> {
    let mut loads = vec![0u64; shards];
    for key in 0..KEYS {
        loads[router.route(&key).index()] += 1;
    }
    loads
}

fn max_over_mean(loads: &[u64]) -> f64 {
    let max = *loads.iter().max().unwrap() as f64;
    max / (loads.iter().sum::<u64>() as f64 / loads.len() as f64)
}

/// Asserts the loads fit a uniform distribution: chi-square within 5 standard deviations of
/// its expectation (n − 1 degrees of freedom).
fn assert_uniform(loads: &[u64]) {
    let n = loads.len() as f64;
    let expected = loads.iter().sum::<u64>() as f64 / n;
    let chi2: f64 = loads
        .iter()
        .map(|&l| (l as f64 - expected).powi(2) / expected)
        .sum();
    let dof = n - 1.0;
    assert!(
        (chi2 - dof).abs() < 5.0 * (2.0 * dof).sqrt(),
        "chi-square {chi2:.0} for {dof} degrees of freedom"
    );
}

/// The fraction of keys whose shard changes, asserting every moved key went to `added`.
fn moved_to(before: &impl Router, after: &impl Router, added: ShardId) -> f64 {
    let mut moved = 0u64;
    for key in 0..KEYS {
        let (a, b) = (before.route(&key), after.route(&key));
        if a != b {
            assert_eq!(
                b, added,
                "key {key} moved from {a} to {b}, not to the new shard"
            );
            moved += 1;
        }
    }
    moved as f64 / KEYS as f64
}

#[test]
fn jump_balance_at_1000_shards() {
    let loads = loads(&JumpRouter::new(1000).unwrap(), 1000);
    let ratio = max_over_mean(&loads);
    // Measured 1.093; an ideal router gives about 1.10 at 1000 keys per shard.
    assert!(ratio <= 1.15, "max/mean {ratio}");
    assert_uniform(&loads);
}

#[test]
fn maglev_balance_at_1000_shards() {
    let router = MaglevRouter::new(1000, MaglevRouter::DEFAULT_TABLE_SIZE).unwrap();
    let mut share = vec![0u64; 1000];
    for shard in router.table() {
        share[shard.index()] += 1;
    }
    // Each shard owns 65 or 66 of the 65537 entries: 1.0071 exactly.
    let exact = max_over_mean(&share);
    assert!(exact <= 1.01, "table share max/mean {exact}");
    assert!(share.iter().all(|&s| s == 65 || s == 66));
    let loads = loads(&router, 1000);
    assert!(max_over_mean(&loads) <= 1.15);
    assert_uniform(&loads);
}

#[test]
fn maglev_with_a_larger_table_is_even_closer() {
    let router = MaglevRouter::new(1000, 1_000_003).unwrap();
    let mut share = vec![0u64; 1000];
    for shard in router.table() {
        share[shard.index()] += 1;
    }
    assert!(max_over_mean(&share) <= 1.001);
}

#[test]
fn ring_balance_is_within_its_stated_bound() {
    // Each shard's share is a sum of 160 arcs: standard deviation 1/√160 ≈ 8%, so the busiest
    // of 1000 shards carries about 1.25× the mean (measured 1.235).
    let ratio = max_over_mean(&loads(&RingRouter::new(1000, 160).unwrap(), 1000));
    assert!(ratio <= 1.35, "160 vnodes, 1000 shards: max/mean {ratio}");
    let ratio = max_over_mean(&loads(&RingRouter::new(100, 160).unwrap(), 100));
    assert!(ratio <= 1.25, "160 vnodes, 100 shards: max/mean {ratio}");
}

#[test]
fn rendezvous_balance_is_within_its_stated_bound() {
    // 100 shards (lookup is O(n) per key, so 1000 shards × 1M keys is bench territory).
    let loads = loads(&RendezvousRouter::new(100).unwrap(), 100);
    let ratio = max_over_mean(&loads);
    assert!(ratio <= 1.05, "max/mean {ratio}");
    assert_uniform(&loads);
}

#[test]
fn weighted_routers_follow_their_weights() {
    let members = [
        (ShardId(0), 1.0),
        (ShardId(1), 2.0),
        (ShardId(2), 3.0),
        (ShardId(3), 4.0),
    ];
    let rendezvous = loads(&RendezvousRouter::weighted(members).unwrap(), 4);
    let ring = loads(&RingRouter::weighted(members, 1000).unwrap(), 4);
    for (i, (_, weight)) in members.iter().enumerate() {
        let ideal = KEYS as f64 * weight / 10.0;
        let r = rendezvous[i] as f64 / ideal;
        assert!((r - 1.0).abs() < 0.01, "rendezvous shard {i}: {r}");
        let g = ring[i] as f64 / ideal;
        assert!((g - 1.0).abs() < 0.1, "ring shard {i}: {g}");
    }
}

#[test]
fn adding_a_shard_moves_about_one_in_n_plus_one() {
    let jump = moved_to(
        &JumpRouter::new(1000).unwrap(),
        &JumpRouter::new(1001).unwrap(),
        ShardId(1000),
    );
    assert!((jump * 1001.0 - 1.0).abs() < 0.2, "jump moved {jump}");

    let rendezvous = moved_to(
        &RendezvousRouter::new(100).unwrap(),
        &RendezvousRouter::new(101).unwrap(),
        ShardId(100),
    );
    assert!(
        (rendezvous * 101.0 - 1.0).abs() < 0.1,
        "rendezvous moved {rendezvous}"
    );

    // The new shard's share varies with its 160 arcs (±8% standard deviation).
    let ring = moved_to(
        &RingRouter::new(100, 160).unwrap(),
        &RingRouter::new(101, 160).unwrap(),
        ShardId(100),
    );
    assert!((ring * 101.0 - 1.0).abs() < 0.35, "ring moved {ring}");
}

#[test]
fn maglev_disruption_is_small_but_not_minimal() {
    // Measured: 1.04× the ideal at 10 shards, 1.6× at 100, 6.8× at 1000.
    for (n, bound) in [(10u32, 1.1), (100, 2.0), (1000, 8.0)] {
        let before = MaglevRouter::new(n, MaglevRouter::DEFAULT_TABLE_SIZE).unwrap();
        let after = MaglevRouter::new(n + 1, MaglevRouter::DEFAULT_TABLE_SIZE).unwrap();
        let changed = before
            .table()
            .iter()
            .zip(after.table())
            .filter(|(a, b)| a != b)
            .count() as f64
            / f64::from(MaglevRouter::DEFAULT_TABLE_SIZE);
        let ideal = 1.0 / f64::from(n + 1);
        // At least the new shard's share moves; Maglev moves somewhat more.
        assert!(changed >= ideal * 0.99, "{n} shards: {changed}");
        assert!(
            changed <= ideal * bound,
            "{n} shards: {changed} vs ideal {ideal}"
        );
    }
}

#[test]
fn bounded_loads_never_exceed_the_cap() {
    let router = BoundedLoadRouter::new(100, 1.25).unwrap();
    let mut held: Vec<LoadGuard<'_>> = Vec::with_capacity(KEYS as usize);
    for key in 0..KEYS {
        // Half the keys are one hot key, which must spill over rather than pile up.
        let guard = if key % 2 == 0 {
            router.acquire("hot")
        } else {
            router.acquire(&key)
        };
        let cap = router.capacity(router.total_load());
        assert!(router.load(guard.shard()) <= cap);
        held.push(guard);
    }
    let cap = router.capacity(KEYS);
    for shard in 0..100 {
        assert!(
            router.load(ShardId(shard)) <= cap,
            "shard {shard} over {cap}"
        );
    }
    let max = (0..100).map(|s| router.load(ShardId(s))).max().unwrap();
    assert!(max as f64 <= 1.25 * KEYS as f64 / 100.0 + 1.0);
    drop(held);
    assert_eq!(router.total_load(), 0);
    assert!((0..100).all(|s| router.load(ShardId(s)) == 0));
}

proptest! {
    #[test]
    fn rendezvous_ranking_is_the_fallback_order(
        shards in 2u32..40,
        key in proptest::collection::vec(any::<u8>(), 0..32),
    ) {
        let router = RendezvousRouter::new(shards).unwrap();
        let mut top = [ShardId(0); 3];
        let k = router.top_k(&key, &mut top);
        prop_assert_eq!(k, 3.min(shards as usize));
        prop_assert_eq!(top[0], router.route_bytes(&key));
        let mut distinct = top[..k].to_vec();
        distinct.sort();
        distinct.dedup();
        prop_assert_eq!(distinct.len(), k);
        // Without the first choice, the key goes to the second: replicas are the failover.
        let without_first = RendezvousRouter::weighted(
            (0..shards).map(ShardId).filter(|s| *s != top[0]).map(|s| (s, 1.0)),
        )
        .unwrap();
        prop_assert_eq!(without_first.route_bytes(&key), top[1]);
    }

    #[test]
    fn routers_always_return_a_member(key in proptest::collection::vec(any::<u8>(), 0..64)) {
        let jump = JumpRouter::new(7).unwrap();
        prop_assert!(jump.route_bytes(&key) < ShardId(7));
        let ring = RingRouter::weighted([(ShardId(3), 1.0), (ShardId(9), 0.5)], 16).unwrap();
        prop_assert!([ShardId(3), ShardId(9)].contains(&ring.route_bytes(&key)));
        let maglev = MaglevRouter::with_members([ShardId(2), ShardId(5)], 13).unwrap();
        prop_assert!([ShardId(2), ShardId(5)].contains(&maglev.route_bytes(&key)));
    }
}
