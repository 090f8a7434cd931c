//! What the Redis rate store keeps in Redis, beyond the conformance suite.

use std::time::Duration;

use headroom_core::rate::{Gcra, RateStore};
use headroom_redis::{Redis, RedisConfig, RedisRateStore};
use headroom_testkit::{RedisServer, shared_server, unique_namespace};

const TEN_PER_SECOND: Gcra = Gcra {
    emission_interval: Duration::from_millis(100),
    burst: 5,
};

async fn store(server: &RedisServer) -> RedisRateStore {
    RedisRateStore::new(
        Redis::connect(RedisConfig::standalone(server.url()))
            .await
            .unwrap(),
    )
}

/// The store's contract: a cell expires once it is full again, so idle keys take no memory;
/// and a refused decision changes nothing.
#[tokio::test]
async fn a_cell_lives_until_it_is_full_again_and_a_refusal_leaves_it_alone() {
    let server = shared_server();
    let store = store(server).await;
    let ns = unique_namespace("rate");
    let key = ns.key("k").unwrap();
    let name = std::str::from_utf8(key.as_bytes()).unwrap();
    let pttl = || -> i64 { server.cli(&["PTTL", name]).trim().parse().unwrap() };

    // Three units of five: full again 300 ms from now.
    assert!(store.apply(&key, TEN_PER_SECOND, 3).await.unwrap().allowed);
    let ttl = pttl();
    assert!((200..=300).contains(&ttl), "{ttl} ms to full again");

    // Three more do not fit: nothing is charged, the expiry stays.
    let held = server.cli(&["GET", name]);
    let refused = store.apply(&key, TEN_PER_SECOND, 3).await.unwrap();
    assert!(!refused.allowed);
    assert_eq!(server.cli(&["GET", name]), held);
    assert!(pttl() <= ttl);

    // Two more do: full again 500 ms from now.
    assert!(store.apply(&key, TEN_PER_SECOND, 2).await.unwrap().allowed);
    let ttl = pttl();
    assert!((400..=500).contains(&ttl), "{ttl} ms to full again");

    // Several cells are each kept until they are full again.
    let other = ns.key("other").unwrap();
    let one_per_second = Gcra {
        emission_interval: Duration::from_secs(1),
        burst: 5,
    };
    let decision = store
        .apply_all(
            &[
                (other.clone(), one_per_second),
                (ns.key("third").unwrap(), TEN_PER_SECOND),
            ],
            1,
        )
        .await
        .unwrap();
    assert!(decision.allowed);
    let other_ttl: i64 = server
        .cli(&["PTTL", std::str::from_utf8(other.as_bytes()).unwrap()])
        .trim()
        .parse()
        .unwrap();
    assert!(
        (900..=1_000).contains(&other_ttl),
        "{other_ttl} ms to full again"
    );
}

/// Bad bytes in Redis: a cell that does not hold a number reads as full and is overwritten; one
/// that holds an absurd time refuses with a long wait. Neither panics or fails the call.
#[tokio::test]
async fn a_corrupt_cell_is_read_without_a_panic() {
    let server = shared_server();
    let store = store(server).await;
    let ns = unique_namespace("rate");
    let garbage = ns.key("garbage").unwrap();
    let far = ns.key("far").unwrap();
    let name = |key: &headroom_core::Key| std::str::from_utf8(key.as_bytes()).unwrap().to_owned();
    server.cli(&["SET", &name(&garbage), "not a number"]);
    server.cli(&["SET", &name(&far), "1e300"]);

    let decision = store.apply(&garbage, TEN_PER_SECOND, 1).await.unwrap();
    assert!(decision.allowed);
    assert_eq!(decision.remaining, 4);

    let refused = store.apply(&far, TEN_PER_SECOND, 1).await.unwrap();
    assert!(!refused.allowed);
    assert!(refused.retry_after > Duration::from_secs(3_600 * 24 * 365));
    let both = store
        .apply_all(&[(garbage, TEN_PER_SECOND), (far, TEN_PER_SECOND)], 1)
        .await
        .unwrap();
    assert!(!both.allowed);
    assert_eq!(both.cell, 1, "the absurd cell is the one that refuses");
}

fn name(key: &headroom_core::Key) -> String {
    std::str::from_utf8(key.as_bytes()).unwrap().to_owned()
}

/// Whether the cell at `key` holds a time the store wrote: a finite number of µs.
fn holds_a_time(server: &RedisServer, key: &headroom_core::Key) -> bool {
    server
        .cli(&["GET", &name(key)])
        .trim()
        .parse::<f64>()
        .is_ok_and(f64::is_finite)
}

/// "nan" is not a number, and "-inf" a time long past: either cell reads as full and is
/// overwritten, alone or with another cell, as a cell that does not hold a number is.
#[tokio::test]
async fn a_nan_or_minus_infinity_cell_reads_as_full_and_is_overwritten() {
    let server = shared_server();
    let store = store(server).await;
    let ns = unique_namespace("rate");
    for (i, held) in ["nan", "-inf"].into_iter().enumerate() {
        let (alone, odd, empty) = (
            ns.key(format!("alone{i}")).unwrap(),
            ns.key(format!("odd{i}")).unwrap(),
            ns.key(format!("empty{i}")).unwrap(),
        );
        server.cli(&["SET", &name(&alone), held]);
        server.cli(&["SET", &name(&odd), held]);

        let decision = store.apply(&alone, TEN_PER_SECOND, 1).await.unwrap();
        assert!(decision.allowed, "{held}");
        assert_eq!(decision.remaining, 4, "{held}");
        assert!(holds_a_time(server, &alone), "{held}");

        let both = store
            .apply_all(
                &[
                    (odd.clone(), TEN_PER_SECOND),
                    (empty.clone(), TEN_PER_SECOND),
                ],
                1,
            )
            .await
            .unwrap();
        assert!(both.allowed, "{held}");
        assert_eq!(both.remaining, 4, "{held}");
        assert!(holds_a_time(server, &odd), "{held}");
        assert!(holds_a_time(server, &empty), "{held}");
    }
}

/// "inf" is an absurd time, as "1e300" is: the cell refuses with a long wait, and a decision
/// over several cells charges none of the others.
#[tokio::test]
async fn an_infinite_cell_refuses_with_a_long_wait_and_charges_no_other_cell() {
    let server = shared_server();
    let store = store(server).await;
    let ns = unique_namespace("rate");
    let (far, empty) = (ns.key("far").unwrap(), ns.key("empty").unwrap());
    server.cli(&["SET", &name(&far), "inf"]);

    let refused = store.apply(&far, TEN_PER_SECOND, 1).await.unwrap();
    assert!(!refused.allowed);
    assert!(refused.retry_after > Duration::from_secs(3_600 * 24 * 365));

    let both = store
        .apply_all(
            &[
                (far.clone(), TEN_PER_SECOND),
                (empty.clone(), TEN_PER_SECOND),
            ],
            1,
        )
        .await
        .unwrap();
    assert!(!both.allowed);
    assert_eq!(both.cell, 0, "the infinite cell is the one that refuses");
    assert_eq!(server.cli(&["GET", &name(&empty)]).trim(), "", "charged");
    assert_eq!(server.cli(&["GET", &name(&far)]).trim(), "inf");
}

/// A key of another type where a cell belongs does not hold a number either: it reads as
/// full and is overwritten, alone or with another cell, instead of failing every decision.
#[tokio::test]
async fn a_key_of_another_type_in_a_cells_place_reads_as_full_and_is_overwritten() {
    let server = shared_server();
    let store = store(server).await;
    let ns = unique_namespace("rate");
    let (alone, list, empty) = (
        ns.key("alone").unwrap(),
        ns.key("list").unwrap(),
        ns.key("empty").unwrap(),
    );
    server.cli(&["RPUSH", &name(&alone), "a"]);
    server.cli(&["RPUSH", &name(&list), "a"]);

    let decision = store.apply(&alone, TEN_PER_SECOND, 1).await.unwrap();
    assert!(decision.allowed);
    assert_eq!(decision.remaining, 4);
    assert!(holds_a_time(server, &alone));

    let both = store
        .apply_all(
            &[
                (list.clone(), TEN_PER_SECOND),
                (empty.clone(), TEN_PER_SECOND),
            ],
            1,
        )
        .await
        .unwrap();
    assert!(both.allowed);
    assert_eq!(both.remaining, 4);
    assert!(holds_a_time(server, &list));
    assert!(holds_a_time(server, &empty));
}
