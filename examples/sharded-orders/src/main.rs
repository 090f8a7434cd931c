//! Run with: cargo run -p sharded-orders
//!
//! Orders live in four databases, split into 16 logical shards by customer id with a jump-hash
//! router: every process maps a customer to the same shard, so one customer's orders stay
//! together. A two-level cache answers "how many orders has this customer placed?" without
//! asking the shard again. Then a fifth database joins, and the resharding plan says how much
//! data moves.
//!
//! Memory backends by default; set `REDIS_URL=redis://127.0.0.1:6379` for a shared cache.
//! `--smoke` (or `HEADROOM_SMOKE=1`) places fewer orders, for CI.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use headroom::prelude::*;
use headroom::shard::{ReshardPlan, ShardId};

/// One database: order rows by customer.
#[derive(Debug, Default)]
struct OrderDb {
    rows: Mutex<Vec<(u64, u64)>>,
}

impl OrderDb {
    fn insert(&self, customer: u64, order: u64) {
        self.rows.lock().expect("rows lock").push((customer, order));
    }

    fn count(&self, customer: u64) -> u64 {
        let rows = self.rows.lock().expect("rows lock");
        rows.iter().filter(|(c, _)| *c == customer).count() as u64
    }

    fn len(&self) -> usize {
        self.rows.lock().expect("rows lock").len()
    }
}

const SHARDS: u32 = 16;

/// A topology placing each logical shard on database `owner(shard)`; each replacement takes a
/// greater `epoch` (a `Migration` between the two refuses one that does not grow).
fn topology(
    epoch: u64,
    databases: &[Arc<OrderDb>],
    owner: impl Fn(u32) -> usize,
) -> Result<Topology<Arc<OrderDb>, JumpRouter>, Box<dyn std::error::Error>> {
    let mut builder = Topology::builder(JumpRouter::new(SHARDS)?).epoch(epoch);
    let names: Vec<String> = (0..databases.len()).map(|i| format!("db-{i}")).collect();
    for (name, db) in names.iter().zip(databases) {
        builder = builder.node(name.as_str(), db.clone());
    }
    for shard in 0..SHARDS {
        let node = &names[owner(shard)];
        builder = builder.shard(ShardId(shard), node, &[]);
    }
    Ok(builder.build()?)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let smoke = std::env::args().any(|a| a == "--smoke")
        || std::env::var("HEADROOM_SMOKE").is_ok_and(|v| v == "1");
    let orders = if smoke { 2_000 } else { 40_000 };
    let builder = Headroom::builder().namespace("sharded-orders");
    let headroom = match std::env::var("REDIS_URL") {
        Ok(url) if !url.is_empty() => builder.redis(url).await?,
        _ => builder.memory()?,
    };

    let databases: Vec<Arc<OrderDb>> = (0..4).map(|_| Arc::default()).collect();
    // Logical shards are spread round robin over the databases.
    let topology = topology(1, &databases, |shard| shard as usize % 4)?;
    for order in 0..orders {
        let customer = order % 5_000;
        let target = topology.write(&customer)?;
        target.handle().insert(customer, order);
    }
    println!(
        "{orders} orders from {} customers over {SHARDS} shards on 4 databases:",
        orders.min(5_000)
    );
    for (i, db) in databases.iter().enumerate() {
        println!("  db-{i}: {} orders", db.len());
    }

    let counts: Cache<u64, u64> = headroom
        .cache("order-counts")?
        .ttl(Duration::from_secs(30))
        .build()?;
    let topology = Arc::new(topology);
    let loads = Arc::new(std::sync::atomic::AtomicU64::new(0));
    for _ in 0..2 {
        let (shard_topology, load_count) = (topology.clone(), loads.clone());
        let count = counts
            .get_or_load(&42, move |customer| async move {
                load_count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let target = shard_topology.write(&customer)?;
                Ok::<_, headroom::shard::UnknownShard>(Some(target.handle().count(customer)))
            })
            .await?;
        println!(
            "customer 42 lives on shard {} and has {} order(s); shard queried {} time(s)",
            topology.shard_of(&42_u64).0,
            count.unwrap_or(0),
            loads.load(std::sync::atomic::Ordering::Relaxed)
        );
    }

    let mut grown = databases.clone();
    grown.push(Arc::default());
    // db-4 takes one logical shard from each of three databases; the others stay put.
    let grown = self::topology(2, &grown, |shard| {
        if shard % 5 == 4 {
            4
        } else {
            shard as usize % 4
        }
    })?;
    let plan = ReshardPlan::between(&topology, &grown);
    println!(
        "adding db-4 moves {} of {SHARDS} logical shards ({:.0} % of the data)",
        plan.unit_count(),
        plan.moved_fraction().unwrap_or(0.0) * 100.0
    );
    Ok(())
}
