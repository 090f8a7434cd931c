//! Loading topologies from configuration.
#![cfg(feature = "serde")]

use std::time::Duration;

use headroom_shard::{
    ConfigErrorKind, ReadPolicy, Router, Session, ShardId, TopologyConfig, TopologyHandle,
};

fn parse(json: &str) -> TopologyConfig {
    serde_json::from_str(json).unwrap()
}

fn with_router(router: &str) -> String {
    format!(
        r#"{{ "epoch": 1, "router": {router},
             "nodes": [{{ "id": "a", "address": "10.0.0.1" }}, {{ "id": "b", "address": "10.0.0.2" }}],
             "shards": [{{ "range": [0, 4], "primary": "a", "replicas": ["b"] }}] }}"#
    )
}

#[test]
fn every_router_kind_loads() {
    let routers = [
        r#"{ "kind": "jump", "shards": 4 }"#,
        r#"{ "kind": "rendezvous", "shards": [{ "shard": 0 }, { "shard": 1, "weight": 2.0 }, { "shard": 3 }] }"#,
        r#"{ "kind": "ring", "shards": 4, "vnodes": 40 }"#,
        r#"{ "kind": "maglev", "shards": 4, "table_size": 251 }"#,
        r#"{ "kind": "range", "first": 0, "splits": [{ "at": "m", "shard": 3 }] }"#,
        r#"{ "kind": "slots", "shards": 4 }"#,
        r#"{ "kind": "slot_ranges", "ranges": [{ "start": 0, "end": 100, "shard": 1 }, { "start": 100, "end": 16384, "shard": 2 }] }"#,
        r#"{ "kind": "directory", "base": { "kind": "jump", "shards": 3 }, "overrides": [{ "key": "vip", "shard": 3 }] }"#,
    ];
    for router in routers {
        let config = parse(&with_router(router));
        let topology = config
            .build(|node| Ok::<_, std::io::Error>(node.address.clone()))
            .unwrap_or_else(|e| panic!("{router}: {e}"));
        let write = topology.write("key").unwrap();
        assert_eq!(*write.handle(), "10.0.0.1");
        assert!(topology.router().route("key") < ShardId(4));
    }
    let directory = parse(&with_router(routers[7]))
        .build(|_| Ok::<_, std::io::Error>(()))
        .unwrap();
    assert_eq!(directory.shard_of("vip"), ShardId(3));
}

#[test]
fn configurations_round_trip_and_swap_in() {
    let config = parse(&with_router(r#"{ "kind": "jump", "shards": 4 }"#));
    let json = serde_json::to_string(&config).unwrap();
    assert_eq!(parse(&json), config);
    let handle = TopologyHandle::new(config.build(|_| Ok::<_, std::io::Error>(())).unwrap());
    let mut next = config.clone();
    next.epoch = 2;
    next.shards[0].primary = "b".into();
    next.shards[0].replicas = vec!["a".into()];
    handle
        .replace(next.build(|_| Ok::<_, std::io::Error>(())).unwrap())
        .unwrap();
    assert_eq!(handle.load().write("k").unwrap().node_id(), "b");
}

#[test]
fn read_policies_deserialize_with_human_durations() {
    let policy: ReadPolicy =
        serde_json::from_str(r#"{ "policy": "lag_aware", "max_lag": "250ms" }"#).unwrap();
    assert_eq!(
        policy,
        ReadPolicy::LagAware {
            max_lag: Duration::from_millis(250)
        }
    );
    let policy: ReadPolicy = serde_json::from_str(r#"{ "policy": "round_robin" }"#).unwrap();
    assert_eq!(policy, ReadPolicy::RoundRobin);
    // A field the policy does not take is an error, not ignored.
    for policy in [
        r#"{ "policy": "round_robin", "max_lag": "250ms" }"#,
        r#"{ "policy": "lag_aware", "max_lag": "250ms", "max_lags": "1s" }"#,
    ] {
        assert!(
            serde_json::from_str::<ReadPolicy>(policy).is_err(),
            "{policy}"
        );
    }
}

#[test]
fn bad_configurations_are_typed_errors() {
    let kind = |router: &str| {
        parse(&with_router(router))
            .build(|_| Ok::<_, std::io::Error>(()))
            .unwrap_err()
            .kind()
    };
    assert_eq!(
        kind(r#"{ "kind": "jump", "shards": 0 }"#),
        ConfigErrorKind::Empty
    );
    assert_eq!(
        kind(r#"{ "kind": "jump", "shards": 5 }"#),
        ConfigErrorKind::MissingShard
    );
    assert_eq!(
        kind(r#"{ "kind": "maglev", "shards": 4, "table_size": 100 }"#),
        ConfigErrorKind::InvalidTableSize
    );
    // No virtual nodes would leave one point per member: balance left to chance.
    assert_eq!(
        kind(r#"{ "kind": "ring", "shards": 4, "vnodes": 0 }"#),
        ConfigErrorKind::InvalidValue
    );
    // A report that never counts would keep every read off the replicas.
    let zero_ttl = with_router(r#"{ "kind": "jump", "shards": 4 }"#).replacen(
        "\"epoch\": 1,",
        "\"epoch\": 1, \"status_ttl\": \"0s\",",
        1,
    );
    assert_eq!(
        parse(&zero_ttl)
            .build(|_| Ok::<_, std::io::Error>(()))
            .unwrap_err()
            .kind(),
        ConfigErrorKind::InvalidValue
    );
    assert_eq!(
        kind(r#"{ "kind": "maglev", "shards": [{ "shard": 0, "weight": 2.0 }], "table_size": 7 }"#),
        ConfigErrorKind::InvalidWeight
    );
    assert_eq!(
        kind(r#"{ "kind": "rendezvous", "shards": [{ "shard": 0, "weight": -1.0 }] }"#),
        ConfigErrorKind::InvalidWeight
    );
    assert_eq!(
        kind(
            r#"{ "kind": "range", "first": 0, "splits": [{ "at": "m", "shard": 1 }, { "at": "c", "shard": 2 }] }"#
        ),
        ConfigErrorKind::UnorderedBounds
    );
    assert_eq!(
        kind(r#"{ "kind": "slot_ranges", "ranges": [{ "start": 0, "end": 100, "shard": 1 }] }"#),
        ConfigErrorKind::InvalidSlot
    );
    assert_eq!(
        kind(r#"{ "kind": "slot_ranges", "ranges": [{ "start": 0, "end": 16385, "shard": 1 }] }"#),
        ConfigErrorKind::InvalidSlot
    );
    assert_eq!(
        kind(
            r#"{ "kind": "slot_ranges", "ranges": [{ "start": 0, "end": 9000, "shard": 0 }, { "start": 8000, "end": 16384, "shard": 1 }] }"#
        ),
        ConfigErrorKind::Duplicate
    );
    assert_eq!(
        kind(r#"{ "kind": "slots", "shards": 16385 }"#),
        ConfigErrorKind::TooLarge
    );
    // Refused before any member is built: a typo of a count must not exhaust memory.
    for router in ["rendezvous", "ring", "maglev"] {
        assert_eq!(
            kind(&format!(
                r#"{{ "kind": "{router}", "shards": 4294967295 }}"#
            )),
            ConfigErrorKind::TooLarge,
            "{router}"
        );
    }
    assert_eq!(
        kind(
            r#"{ "kind": "directory", "base": { "kind": "jump", "shards": 4 }, "overrides": [{ "key": "x", "shard": 1 }, { "key": "x", "shard": 2 }] }"#
        ),
        ConfigErrorKind::Duplicate
    );
    let unknown_node = parse(
        &with_router(r#"{ "kind": "jump", "shards": 4 }"#)
            .replace(r#""replicas": ["b"]"#, r#""replicas": ["z"]"#),
    );
    assert_eq!(
        unknown_node
            .build(|_| Ok::<_, std::io::Error>(()))
            .unwrap_err()
            .kind(),
        ConfigErrorKind::UnknownNode
    );
    let failing = parse(&with_router(r#"{ "kind": "jump", "shards": 4 }"#))
        .build(|_| Err::<(), _>(std::io::Error::other("refused")))
        .unwrap_err();
    assert_eq!(failing.kind(), ConfigErrorKind::Handle);
    assert_eq!(
        std::error::Error::source(&failing).unwrap().to_string(),
        "refused"
    );
    assert!(serde_json::from_str::<TopologyConfig>(r#"{ "epoch": 1, "surprise": 1 }"#).is_err());
}

#[tokio::test(start_paused = true)]
async fn status_ttl_and_label_limit_load_from_configuration() {
    let json = r#"{ "epoch": 1, "status_ttl": "2s", "max_shard_labels": 4,
        "router": { "kind": "jump", "shards": 2 },
        "nodes": [{ "id": "a", "address": "x" }, { "id": "b", "address": "y" }],
        "shards": [{ "range": [0, 2], "primary": "a", "replicas": ["b"] }] }"#;
    let config = parse(json);
    assert_eq!(config.status_ttl, Some(Duration::from_secs(2)));
    assert_eq!(config.max_shard_labels, Some(4));
    let round_trip: TopologyConfig =
        serde_json::from_str(&serde_json::to_string(&config).unwrap()).unwrap();
    assert_eq!(round_trip, config);
    let topology = config.build(|_| Ok::<_, std::io::Error>(())).unwrap();
    let fresh = headroom_shard::ReplicaStatus {
        lag: Some(Duration::ZERO),
        position: Some(1),
    };
    topology.report("b", fresh);
    tokio::time::advance(Duration::from_millis(1900)).await;
    assert_eq!(topology.node("b").unwrap().status(), fresh);
    tokio::time::advance(Duration::from_millis(200)).await;
    assert_eq!(topology.node("b").unwrap().status(), Default::default());
}

/// A session serialized before sessions named their primary (`[[shard, position]]`) still
/// loads, during a rolling deploy say: its positions name no primary, so its shards are read
/// from their primaries until it writes again, never from a replica without its writes.
#[test]
fn a_session_in_the_earlier_form_loads_and_reads_from_the_primary() {
    let old: Session = serde_json::from_str(r#"{"positions":[[3,1000]]}"#).unwrap();
    assert_eq!(old.required(ShardId(3), "a"), Some(u64::MAX));
    assert_eq!(old.required(ShardId(4), "a"), None);
    let round_trip: Session = serde_json::from_str(&serde_json::to_string(&old).unwrap()).unwrap();
    assert_eq!(round_trip, old);
}

/// A session serialized when positions were kept per shard (`{shard, primary, position}`)
/// loads with them: the position counts on its primary, and its shard is marked as written
/// there.
#[test]
fn a_session_in_the_per_shard_form_loads_with_its_positions() {
    let a = headroom_shard::hash::key_hash(b"a");
    let old: Session = serde_json::from_str(&format!(
        r#"{{"positions":[{{"shard":3,"primary":{a},"position":1000}}]}}"#
    ))
    .unwrap();
    assert_eq!(old.required(ShardId(3), "a"), Some(1000));
    assert_eq!(old.required(ShardId(4), "a"), Some(1000));
    assert_eq!(old.required(ShardId(3), "b"), Some(u64::MAX));
    assert_eq!(old.required(ShardId(4), "b"), None);
    let round_trip: Session = serde_json::from_str(&serde_json::to_string(&old).unwrap()).unwrap();
    assert_eq!(round_trip, old);
}

/// A session as this version writes it is read by the version before, which kept a position
/// per shard and knew no other field, so that instances of both can share sessions during a
/// rolling deploy.
#[test]
fn a_session_written_now_is_read_in_the_per_shard_form() {
    #[derive(serde::Deserialize)]
    struct PerShard {
        positions: Vec<Written>,
    }
    #[derive(serde::Deserialize, Debug, PartialEq)]
    struct Written {
        shard: u32,
        primary: u64,
        position: u64,
    }
    let (a, b) = (
        headroom_shard::hash::key_hash(b"a"),
        headroom_shard::hash::key_hash(b"b"),
    );
    let session: Session = serde_json::from_str(&format!(
        r#"{{"positions":[{{"shard":3,"primary":{a},"position":1000}},{{"shard":4,"primary":{b},"position":70}},{{"shard":5,"primary":{a},"position":400}}]}}"#
    ))
    .unwrap();
    let earlier: PerShard = serde_json::from_str(&serde_json::to_string(&session).unwrap())
        .expect("the per-shard form reads it");
    let mut positions = earlier.positions;
    positions.sort_by_key(|w| w.shard);
    assert_eq!(
        positions,
        [
            Written {
                shard: 3,
                primary: a,
                position: 1000
            },
            Written {
                shard: 4,
                primary: b,
                position: 70
            },
            Written {
                shard: 5,
                primary: a,
                position: 1000
            },
        ],
        "each shard with its primary and the furthest position reached there"
    );
}
