//! The epoch fence kept where the data lives, in SQL (SQLite): a process that stopped following
//! a shared migration cannot land a late write on either owner after the cut-over.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use headroom_core::Namespace;
use headroom_core::memory::MemoryMigrationStore;
use headroom_shard::{JumpRouter, Migration, Phase, SharedMigration, Topology};
use rusqlite::{Connection, named_params};

type Node = &'static str;

/// Shards 0..4 on `a`, 4..8 on `b`; the target moves 6..8 from `b` to `c`.
fn topology(epoch: u64) -> Arc<Topology<Node, JumpRouter>> {
    let last = if epoch == 1 { "b" } else { "c" };
    let mut builder = Topology::builder(JumpRouter::new(8).unwrap())
        .epoch(epoch)
        .node("a", "a")
        .node("b", "b");
    if last != "b" {
        builder = builder.node(last, last);
    }
    Arc::new(
        builder
            .shards(0..4, "a", &[])
            .shards(4..6, "b", &[])
            .shards(6..8, last, &[])
            .build()
            .unwrap(),
    )
}

fn database() -> Connection {
    let db = Connection::open_in_memory().unwrap();
    db.execute_batch(
        "CREATE TABLE items (id INTEGER PRIMARY KEY, body TEXT NOT NULL, epoch INTEGER NOT NULL);
         CREATE TABLE shard_fence (shard INTEGER PRIMARY KEY, epoch INTEGER NOT NULL);",
    )
    .unwrap();
    db
}

/// One statement: the shard's fence and the row's epoch must both be at most the write's.
/// Returns whether the row was written (false: fenced; route again).
fn fenced_write(db: &Connection, shard: u32, id: u64, body: &str, epoch: u64) -> bool {
    let changed = db
        .execute(
            "INSERT INTO items (id, body, epoch)
             SELECT :id, :body, :epoch
             WHERE COALESCE((SELECT epoch FROM shard_fence WHERE shard = :shard), 0) <= :epoch
             ON CONFLICT (id) DO UPDATE SET body = excluded.body, epoch = excluded.epoch
             WHERE items.epoch <= excluded.epoch",
            named_params! { ":id": id, ":body": body, ":epoch": epoch, ":shard": shard },
        )
        .unwrap();
    changed == 1
}

fn body(db: &Connection, id: u64) -> Option<String> {
    db.query_row("SELECT body FROM items WHERE id = ?1", [id], |row| {
        row.get(0)
    })
    .ok()
}

async fn participant(
    store: &MemoryMigrationStore,
    id: &str,
    lease: Duration,
) -> SharedMigration<Node, JumpRouter, MemoryMigrationStore> {
    let migration = Migration::new("sql", topology(1), topology(2)).unwrap();
    let key = Namespace::new("sql").unwrap().key("m").unwrap();
    SharedMigration::new(migration, store.clone(), key, id)
        .lease(lease)
        .poll(Duration::from_millis(100))
        .join()
        .await
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn the_sql_fence_refuses_a_partitioned_process_after_the_cut_over() {
    let databases: HashMap<Node, Connection> =
        ["a", "b", "c"].map(|node| (node, database())).into();
    let store = MemoryMigrationStore::new();
    let driver = participant(&store, "driver", Duration::from_secs(60)).await;
    let partitioned = participant(&store, "partitioned", Duration::from_secs(2)).await;
    let key = (0..1000u64)
        .find(|k| {
            topology(1).write(k).unwrap().node_id() != topology(2).write(k).unwrap().node_id()
        })
        .unwrap();
    driver.migration().report_copied(1, 1);
    driver.advance().await.unwrap();
    driver.advance().await.unwrap();
    partitioned.refresh().await.unwrap();
    assert_eq!(partitioned.migration().phase(), Phase::ShadowRead);

    // From here on `partitioned` hears nothing; the cut-over stops waiting once its lease ends.
    assert_eq!(driver.advance().await.unwrap(), Phase::CutOver);
    // Close the old owner of the moving shards, where its data lives.
    for shard in 6..8 {
        databases["b"]
            .execute(
                "INSERT INTO shard_fence (shard, epoch) VALUES (?1, 2)",
                [shard],
            )
            .unwrap();
    }
    let live = driver.migration().write(&key).unwrap();
    assert_eq!(live.owner().node_id(), "c");
    let written = fenced_write(
        &databases["c"],
        live.owner().shard().0,
        key,
        "live",
        live.epoch(),
    );
    assert!(written);
    drop(live);

    // The partitioned process still routes by its last phase: old owner, mirrored to the new.
    let late = partitioned.migration().write(&key).unwrap();
    assert_eq!(late.epoch(), 1);
    let owner = late.owner();
    assert!(!fenced_write(
        &databases[owner.node_id()],
        owner.shard().0,
        key,
        "late",
        late.epoch()
    ));
    let mirror = late.mirror().unwrap();
    assert!(!fenced_write(
        &databases[mirror.node_id()],
        mirror.shard().0,
        key,
        "late",
        late.epoch()
    ));
    drop(late);
    assert_eq!(body(&databases["b"], key), None);
    assert_eq!(body(&databases["c"], key).as_deref(), Some("live"));

    // Once it hears from the store again, it routes under the new epoch and its write lands.
    assert_eq!(partitioned.refresh().await.unwrap(), Phase::CutOver);
    let retry = partitioned.migration().write(&key).unwrap();
    assert!(fenced_write(
        &databases[retry.owner().node_id()],
        retry.owner().shard().0,
        key,
        "late",
        retry.epoch()
    ));
    assert_eq!(body(&databases["c"], key).as_deref(), Some("late"));
}
