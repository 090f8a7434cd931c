//! Run with: cargo run -p idempotent-payments
//!
//! Clients retry payments: after a timeout, a dropped connection, a double click. Here every
//! payment is sent by several clients at once and then retried; the card is charged once per
//! idempotency key, every caller gets the same charge id, and reusing a key for another amount
//! is refused.
//!
//! Memory backends by default; set `REDIS_URL=redis://127.0.0.1:6379` to keep the records in
//! Redis (shared by every instance). `--smoke` (or `HEADROOM_SMOKE=1`) sends fewer payments.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use headroom::idempotency::IdempotencyError;
use headroom::prelude::*;

/// The payment provider: slow, and it charges every call it gets.
#[derive(Debug, Default)]
struct Provider {
    charges: AtomicU64,
}

impl Provider {
    async fn charge(&self, amount: u64) -> Result<String, std::io::Error> {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let n = self.charges.fetch_add(1, Ordering::Relaxed) + 1;
        Ok(format!("ch_{n}_{amount}"))
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let smoke = std::env::args().any(|a| a == "--smoke")
        || std::env::var("HEADROOM_SMOKE").is_ok_and(|v| v == "1");
    let payments: u64 = if smoke { 20 } else { 200 };
    let builder = Headroom::builder().namespace("idempotent-payments");
    let headroom = match std::env::var("REDIS_URL") {
        Ok(url) if !url.is_empty() => builder.redis(url).await?,
        _ => builder.memory()?,
    };
    let idempotency = headroom.idempotency().build()?;
    let provider = Arc::new(Provider::default());
    // Keys unique per run, so a shared Redis never replays an earlier run's payments.
    let run = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_nanos();

    let mut tasks = Vec::new();
    for payment in 0..payments {
        // Four clients send the same payment at once (a double click and its retries).
        for _ in 0..4 {
            let (idempotency, provider) = (idempotency.clone(), provider.clone());
            tasks.push(tokio::spawn(async move {
                let scope = Scope::new(format!("merchant-{}", payment % 7), "charge")?;
                let key = IdempotencyKey::new(&format!("pay-{run}-{payment}"))?;
                let amount = 100 + payment;
                let charged = idempotency
                    .execute(&scope, &key, &amount.to_be_bytes(), || {
                        provider.charge(amount)
                    })
                    .await?;
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>((payment, charged.value))
            }));
        }
    }
    let mut charge_ids = std::collections::HashMap::new();
    for task in tasks {
        let (payment, charge) = task.await??;
        let first = charge_ids.entry(payment).or_insert_with(|| charge.clone());
        if *first != charge {
            return Err(format!("payment {payment} answered {first} and {charge}").into());
        }
    }
    let charges = provider.charges.load(Ordering::Relaxed);
    println!(
        "{} requests for {payments} payments: the provider charged {charges} times",
        payments * 4
    );

    // A late retry replays; the same key with another amount is refused.
    let scope = Scope::new("merchant-0", "charge")?;
    let key = IdempotencyKey::new(&format!("pay-{run}-0"))?;
    let late = idempotency
        .execute(&scope, &key, &100_u64.to_be_bytes(), || {
            provider.charge(100)
        })
        .await?;
    println!(
        "late retry of payment 0: {} (replayed: {})",
        late.value, late.replayed
    );
    let reused = idempotency
        .execute(&scope, &key, &999_u64.to_be_bytes(), || {
            provider.charge(999)
        })
        .await;
    match reused {
        Err(IdempotencyError::KeyReused) => println!("same key, other amount: refused"),
        other => return Err(format!("key reuse was not refused: {other:?}").into()),
    }
    if charges != payments {
        return Err(format!("{charges} charges for {payments} payments").into());
    }
    Ok(())
}
