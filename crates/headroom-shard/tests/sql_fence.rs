//! The epoch and version fence kept where the data lives, in SQL (SQLite): a process that
//! stopped following a shared migration cannot land a late write on either owner after the
//! cut-over, mirrors landing out of order keep the later write, and a delete during the copy
//! stays deleted.

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
        "CREATE TABLE items (id INTEGER PRIMARY KEY, body TEXT, deleted INTEGER NOT NULL,
                              epoch INTEGER NOT NULL, version INTEGER NOT NULL);
         CREATE TABLE shard_fence (shard INTEGER PRIMARY KEY, epoch INTEGER NOT NULL);",
    )
    .unwrap();
    db
}

/// The databases of nodes `a`, `b` and `c`.
fn databases() -> HashMap<Node, Connection> {
    ["a", "b", "c"].map(|node| (node, database())).into()
}

/// What a write did.
#[derive(Debug, PartialEq)]
enum Written {
    Landed,
    /// Under an epoch older than the shard's fence or the row's: route again, and retry.
    Fenced,
    /// A later version of the key is there: the write is done.
    Superseded,
}

/// One statement: the shard's fence and the row's epoch must be at most the write's epoch,
/// and the row's version at most the write's: so a late write of an old epoch is fenced, and
/// of two writes of a key the later version stays, in whichever order they land and whatever
/// epoch a retry carries. `body` is `None` for a delete, kept as a tombstone row so that no
/// older write or copy brings the key back. When nothing changed, the row and the fence tell
/// a fenced write from a superseded one.
fn versioned_write(
    db: &Connection,
    shard: u32,
    id: u64,
    body: Option<&str>,
    epoch: u64,
    version: u64,
) -> Written {
    let changed = db
        .execute(
            "INSERT INTO items (id, body, deleted, epoch, version)
             SELECT :id, :body, :deleted, :epoch, :version
             WHERE COALESCE((SELECT epoch FROM shard_fence WHERE shard = :shard), 0) <= :epoch
             ON CONFLICT (id) DO UPDATE SET body = excluded.body, deleted = excluded.deleted,
                 epoch = excluded.epoch, version = excluded.version
             WHERE items.epoch <= excluded.epoch AND items.version <= excluded.version",
            named_params! {
                ":id": id, ":body": body, ":deleted": body.is_none(), ":epoch": epoch,
                ":version": version, ":shard": shard,
            },
        )
        .unwrap();
    if changed == 1 {
        return Written::Landed;
    }
    let fenced: bool = db
        .query_row(
            "SELECT COALESCE((SELECT epoch FROM shard_fence WHERE shard = :shard), 0) > :epoch
                 OR COALESCE((SELECT epoch FROM items WHERE id = :id), 0) > :epoch",
            named_params! { ":id": id, ":epoch": epoch, ":shard": shard },
            |row| row.get(0),
        )
        .unwrap();
    if fenced {
        Written::Fenced
    } else {
        Written::Superseded
    }
}

fn body(db: &Connection, id: u64) -> Option<String> {
    db.query_row(
        "SELECT body FROM items WHERE id = ?1 AND NOT deleted",
        [id],
        |row| row.get(0),
    )
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
    let databases = databases();
    let store = MemoryMigrationStore::new();
    let driver = participant(&store, "driver", Duration::from_secs(60)).await;
    let partitioned = participant(&store, "partitioned", Duration::from_secs(2)).await;
    let key = moving_key();
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
    let written = versioned_write(
        &databases["c"],
        live.owner().shard().0,
        key,
        Some("live"),
        live.epoch(),
        1,
    );
    assert_eq!(written, Written::Landed);
    drop(live);

    // The partitioned process still routes by its last phase: old owner, mirrored to the new.
    let late = partitioned.migration().write(&key).unwrap();
    assert_eq!(late.epoch(), 1);
    let owner = late.owner();
    assert_eq!(
        versioned_write(
            &databases[owner.node_id()],
            owner.shard().0,
            key,
            Some("late"),
            late.epoch(),
            2,
        ),
        Written::Fenced
    );
    let mirror = late.mirror().unwrap();
    assert_eq!(
        versioned_write(
            &databases[mirror.node_id()],
            mirror.shard().0,
            key,
            Some("late"),
            late.epoch(),
            2,
        ),
        Written::Fenced
    );
    drop(late);
    assert_eq!(body(&databases["b"], key), None);
    assert_eq!(body(&databases["c"], key).as_deref(), Some("live"));

    // Once it hears from the store again, it routes under the new epoch and its write lands.
    assert_eq!(partitioned.refresh().await.unwrap(), Phase::CutOver);
    let retry = partitioned.migration().write(&key).unwrap();
    assert_eq!(
        versioned_write(
            &databases[retry.owner().node_id()],
            retry.owner().shard().0,
            key,
            Some("late"),
            retry.epoch(),
            2,
        ),
        Written::Landed
    );
    assert_eq!(body(&databases["c"], key).as_deref(), Some("late"));
}

/// A key that moves from `b` to `c`.
fn moving_key() -> u64 {
    (0..1000u64)
        .find(|k| {
            topology(1).write(k).unwrap().node_id() != topology(2).write(k).unwrap().node_id()
        })
        .unwrap()
}

/// Two writes of one key during the dual writes, whose mirrors reach the new owner in the
/// other order: after the cut-over the new owner answers the later write, as the old one did.
#[tokio::test]
async fn mirrors_landing_out_of_order_leave_the_later_write_on_the_new_owner() {
    let databases = databases();
    let migration = Migration::new("sql", topology(1), topology(2)).unwrap();
    let key = moving_key();
    migration.report_copied(1, 1);
    assert_eq!(migration.advance().await.unwrap(), Phase::DualWrite);
    let first = migration.write(&key).unwrap();
    let second = migration.write(&key).unwrap();
    let apply = |route: &headroom_shard::WriteRoute<'_, Node>, body, version, to_mirror: bool| {
        let target = if to_mirror {
            route.mirror().unwrap()
        } else {
            route.owner()
        };
        versioned_write(
            &databases[target.node_id()],
            target.shard().0,
            key,
            Some(body),
            route.epoch(),
            version,
        )
    };
    // The owner takes them in order, the mirror the other way round.
    apply(&first, "first", 1, false);
    apply(&second, "second", 2, false);
    apply(&second, "second", 2, true);
    assert_eq!(apply(&first, "first", 1, true), Written::Superseded);
    drop((first, second));
    assert_eq!(body(&databases["b"], key).as_deref(), Some("second"));
    assert_eq!(migration.advance().await.unwrap(), Phase::ShadowRead);
    assert_eq!(migration.advance().await.unwrap(), Phase::CutOver);
    let read = migration
        .read(&key, &headroom_shard::ReadPolicy::Primary)
        .unwrap();
    assert_eq!(
        body(&databases[read.target.node_id()], key).as_deref(),
        Some("second"),
        "an acknowledged, read write went back to an earlier one at the cut-over"
    );
    // The earlier write, tried again under the new epoch, is still the earlier one.
    let retry = migration.write(&key).unwrap();
    let owner = retry.owner();
    let retried = versioned_write(
        &databases[owner.node_id()],
        owner.shard().0,
        key,
        Some("first"),
        retry.epoch(),
        1,
    );
    assert_eq!(retried, Written::Superseded);
    assert_eq!(body(&databases["c"], key).as_deref(), Some("second"));
}

/// A key deleted during the copy, after the backfill read it: the backfill's copy does not
/// bring it back on the new owner.
#[tokio::test]
async fn a_delete_during_the_copy_is_not_undone_by_the_backfill() {
    let databases = databases();
    let migration = Migration::new("sql", topology(1), topology(2)).unwrap();
    let key = moving_key();
    let old = topology(1).write(&key).unwrap().shard().0;
    let new = topology(2).write(&key).unwrap().shard().0;
    assert_eq!(
        versioned_write(&databases["b"], old, key, Some("kept"), 1, 1),
        Written::Landed
    );
    // The backfill reads the row; then the key is deleted, on the owner and the mirror.
    let copied = body(&databases["b"], key).unwrap();
    let delete = migration.write(&key).unwrap();
    assert_eq!(
        versioned_write(&databases["b"], old, key, None, delete.epoch(), 2),
        Written::Landed
    );
    let mirror = delete.mirror().unwrap();
    assert_eq!(
        versioned_write(
            &databases[mirror.node_id()],
            new,
            key,
            None,
            delete.epoch(),
            2
        ),
        Written::Landed
    );
    drop(delete);
    // The backfill writes what it read, at the version it read, under the old epoch.
    assert_eq!(
        versioned_write(&databases["c"], new, key, Some(&copied), 1, 1),
        Written::Superseded
    );
    migration.report_copied(1, 1);
    for _ in 0..3 {
        migration.advance().await.unwrap();
    }
    assert_eq!(migration.phase(), Phase::CutOver);
    let read = migration
        .read(&key, &headroom_shard::ReadPolicy::Primary)
        .unwrap();
    assert_eq!(read.target.node_id(), "c");
    assert_eq!(
        body(&databases["c"], key),
        None,
        "the deleted key came back"
    );
}
