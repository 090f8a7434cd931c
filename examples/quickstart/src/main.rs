//! Run with: cargo run -p quickstart
//!
//! One [`Headroom`] picks the backend (memory, or Redis when `REDIS_URL` is set) and wires it
//! into every part: a cache, an idempotent operation, a bulkhead with load shedding and a
//! circuit breaker. It finishes in well under a second; `--smoke` (or `HEADROOM_SMOKE=1`) is
//! accepted so CI runs every example the same way.

use std::time::Duration;

use headroom::prelude::*;

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
struct User {
    name: String,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let builder = Headroom::builder().namespace("quickstart");
    let headroom = match std::env::var("REDIS_URL") {
        Ok(url) if !url.is_empty() => builder.redis(url).await?,
        _ => builder.memory()?,
    };
    println!("backend: {}", headroom.backend());

    // A two-level cache: the loader runs once, later reads are hits.
    let users: Cache<u64, User> = headroom
        .cache("users")?
        .ttl(Duration::from_secs(60))
        .build()?;
    for _ in 0..3 {
        let user = users
            .get_or_load(&1, |id| async move {
                println!("  loading user {id} from the database");
                Ok::<_, std::io::Error>(Some(User { name: "Ada".into() }))
            })
            .await?;
        println!("user 1: {:?}", user.map(|u| u.name));
    }

    // An idempotent operation: the retry replays the first outcome. The key is unique per run
    // so a shared Redis does not replay an earlier run.
    let idempotency = headroom.idempotency().build()?;
    let scope = Scope::new("customer-1", "transfer")?;
    let key = IdempotencyKey::new(&format!(
        "transfer-{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_nanos()
    ))?;
    for attempt in 1..=2 {
        let done = idempotency
            .execute(&scope, &key, b"amount=100", || async {
                println!("  moving the money");
                Ok::<_, std::io::Error>(String::from("transfer-7"))
            })
            .await?;
        println!(
            "attempt {attempt}: {} (replayed: {})",
            done.value, done.replayed
        );
    }

    // Admission control: refuse the least important work first when saturated.
    // At 80 % in use, sheddable work (refused from 70 %) goes and default work (from 90 %)
    // still gets in.
    let bulkhead = headroom.bulkhead("reports").max_concurrent(10).build()?;
    let shedder = LoadShedder::builder(bulkhead).build()?;
    let mut running = Vec::new();
    for _ in 0..8 {
        running.push(shedder.acquire(Priority::Critical).await?);
    }
    for priority in [Priority::Sheddable, Priority::Default] {
        match shedder.check(priority) {
            Ok(()) => println!("{priority} work admitted at 80 % load"),
            Err(overloaded) => println!("{priority} work refused at 80 % load: {overloaded}"),
        }
    }

    // A circuit breaker around a dependency.
    let breaker = headroom
        .circuit_breaker::<std::io::Error>("inventory")
        .build()?;
    let stock = breaker.call(async { Ok::<_, std::io::Error>(12) }).await?;
    println!("stock: {stock} (breaker {:?})", breaker.state());
    Ok(())
}
