//! The stand-in database, hosted by the driver: the truth the trial measures against.
//!
//! It keeps every product's current version, counts loads per product and executions per
//! idempotency key, and serves a bounded number of calls at once, each taking a fixed time.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::proto::{DbRequest, DbResponse, serve_lines};

/// How long each kind of call takes.
#[derive(Clone, Copy, Debug)]
pub struct Latency {
    /// A product read (a cache load).
    pub get: Duration,
    /// A product write.
    pub put: Duration,
    /// An order.
    pub checkout: Duration,
    /// A report: the heavy work that overload piles up.
    pub report: Duration,
}

#[derive(Debug, Default)]
struct Truth {
    versions: HashMap<String, u64>,
    loads: HashMap<String, u64>,
    /// Per product, when its first load was answered.
    first_answered: HashMap<String, tokio::time::Instant>,
    /// Per product, the loads decided (the cache missed L2) once an earlier one had been
    /// answered and its value had time to reach L2 ([`WRITE_BACK`]): loads of a product the
    /// cache should have held.
    reloads: HashMap<String, u64>,
    /// Per product, how its latest reload came: see [`Reload`].
    last_reloads: HashMap<String, Reload>,
    /// Per idempotency key: the order of each execution.
    executions: HashMap<String, Vec<u64>>,
    next_order: u64,
}

/// Time enough for a loaded value to reach L2 after the database answered (one Redis round
/// trip, with room to spare).
pub const WRITE_BACK: Duration = Duration::from_millis(100);

/// How a reload came, to tell a hidden entry from a slow write-back or a long queue.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Reload {
    /// How long after the first load's answer the load was decided.
    pub decided_after: Duration,
    /// How long it then queued in its instance.
    pub queued: Duration,
}

/// The database. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Database {
    truth: Arc<Mutex<Truth>>,
    capacity: Arc<Semaphore>,
    latency: Latency,
}

impl Database {
    /// A database serving `capacity` calls at once.
    pub fn new(capacity: usize, latency: Latency) -> Self {
        Self {
            truth: Arc::default(),
            capacity: Arc::new(Semaphore::new(capacity)),
            latency,
        }
    }

    /// Serves the database on a loopback port until the runtime ends; returns its address.
    pub async fn serve(&self) -> std::io::Result<SocketAddr> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let db = self.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let db = db.clone();
                tokio::spawn(serve_lines(stream, move |request| {
                    let db = db.clone();
                    async move { db.handle(request).await }
                }));
            }
        });
        Ok(addr)
    }

    async fn handle(&self, request: DbRequest) -> DbResponse {
        let took = match &request {
            DbRequest::Get { .. } => self.latency.get,
            DbRequest::Put { .. } => self.latency.put,
            DbRequest::Checkout { .. } => self.latency.checkout,
            DbRequest::Report => self.latency.report,
        };
        let arrived = tokio::time::Instant::now();
        let _permit = self.capacity.acquire().await;
        tokio::time::sleep(took).await;
        let mut truth = self.lock();
        let value = match request {
            DbRequest::Get { key, queued_us } => {
                *truth.loads.entry(key.clone()).or_default() += 1;
                let answered = *truth
                    .first_answered
                    .entry(key.clone())
                    .or_insert_with(tokio::time::Instant::now);
                let decided = arrived
                    .checked_sub(Duration::from_micros(queued_us))
                    .unwrap_or(arrived);
                if answered + WRITE_BACK <= decided {
                    *truth.reloads.entry(key.clone()).or_default() += 1;
                    let reload = Reload {
                        decided_after: decided - answered,
                        queued: arrived - decided,
                    };
                    truth.last_reloads.insert(key.clone(), reload);
                }
                truth.versions.get(&key).copied().unwrap_or(0)
            }
            DbRequest::Put { key } => {
                let version = truth.versions.entry(key).or_default();
                *version += 1;
                *version
            }
            DbRequest::Checkout { key } => {
                truth.next_order += 1;
                let order = truth.next_order;
                truth.executions.entry(key).or_default().push(order);
                order
            }
            DbRequest::Report => 0,
        };
        DbResponse { value }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Truth> {
        self.truth.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Loads per product so far.
    pub fn loads(&self) -> HashMap<String, u64> {
        self.lock().loads.clone()
    }

    /// Per product so far, the loads decided (their arrival less the time they queued in
    /// their instance) once an earlier load of it had been answered [`WRITE_BACK`] before: its
    /// value was in L2 by then, unless written or hidden since. (A load in flight with the
    /// first, on another instance, is not one, nor one that missed L2 before the first value
    /// reached it and then waited behind its instance's shedder.)
    pub fn reloads(&self) -> HashMap<String, u64> {
        self.lock().reloads.clone()
    }

    /// Per product reloaded so far, how its latest reload came.
    pub fn last_reloads(&self) -> HashMap<String, Reload> {
        self.lock().last_reloads.clone()
    }

    /// The orders placed per idempotency key so far (more than one is a duplicate execution).
    pub fn executions(&self) -> HashMap<String, Vec<u64>> {
        self.lock().executions.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// A database whose product reads take `get`.
    fn database(get: Duration) -> Database {
        let other = ms(1);
        Database::new(
            8,
            Latency {
                get,
                put: other,
                checkout: other,
                report: other,
            },
        )
    }

    /// A load of `key` that waited `queued` in its instance before it was sent.
    async fn load(db: Database, key: &'static str, queued: Duration) {
        let queued_us = u64::try_from(queued.as_micros()).unwrap();
        let key = key.to_owned();
        db.handle(DbRequest::Get { key, queued_us }).await;
    }

    /// A load in flight with the first (another instance missing L2 before the first value
    /// reached it) is not a reload; one arriving once the first value had time to reach L2 is.
    #[tokio::test(start_paused = true)]
    async fn only_loads_after_the_first_value_could_be_in_l2_are_reloads() {
        let db = database(ms(50));
        let first = tokio::spawn(load(db.clone(), "hot-0", ms(0)));
        tokio::time::sleep(ms(10)).await;
        let alongside = tokio::spawn(load(db.clone(), "hot-0", ms(0)));
        first.await.unwrap();
        alongside.await.unwrap();
        assert_eq!(db.loads()["hot-0"], 2);
        assert!(db.reloads().is_empty(), "{:?}", db.reloads());
        tokio::time::sleep(WRITE_BACK).await;
        load(db.clone(), "hot-0", ms(0)).await;
        assert_eq!(db.reloads()["hot-0"], 1);
    }

    /// A load decided (the cache missed L2) before the first value could reach L2 is not a
    /// reload, however long it then waited in its instance before it reached the database.
    #[tokio::test(start_paused = true)]
    async fn a_load_decided_before_the_first_value_could_be_in_l2_is_no_reload() {
        let db = database(ms(5));
        load(db.clone(), "tail-7", ms(0)).await;
        // Decided 20 ms after the first answer, queued 150 ms behind the shedder.
        tokio::time::sleep(ms(170)).await;
        load(db.clone(), "tail-7", ms(150)).await;
        assert_eq!(db.loads()["tail-7"], 2);
        assert!(db.reloads().is_empty(), "{:?}", db.reloads());
        // Decided once the first value had time to reach L2, queued or not.
        load(db.clone(), "tail-7", ms(50)).await;
        assert_eq!(db.reloads()["tail-7"], 1);
        let reload = Reload {
            decided_after: ms(125),
            queued: ms(50),
        };
        assert_eq!(db.last_reloads()["tail-7"], reload);
    }
}
