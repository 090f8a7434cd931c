//! A stand-in database: a fixed pool of connections, queries that take 5–20 ms and slow down
//! as more of them pile up (lock contention, cache thrashing), and a pool wait limit.
//!
//! A connection can be held across several queries (a transaction); the time it is held
//! outside a query (its holder waiting for something else) is counted as idle in transaction.
//!
//! Product rows carry a version, bumped by each price update, and the database remembers when
//! each version was replaced: the demo's ground truth for how stale a product page served from
//! a cache was.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::{Semaphore, SemaphorePermit};

use crate::payment::Gateway;

/// How long a query may wait for a connection before the pool gives up.
const POOL_WAIT: Duration = Duration::from_secs(2);

/// A query failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DbError {
    /// No connection became free within the pool's wait limit.
    PoolTimeout,
}

impl std::fmt::Display for DbError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("database pool timeout")
    }
}

impl std::error::Error for DbError {}

/// A product row.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub(crate) struct Product {
    /// Its id.
    pub(crate) id: u64,
    /// Its price in cents.
    pub(crate) price_cents: u32,
    /// How many price updates it has had.
    pub(crate) version: u64,
}

/// When each version of one product was replaced by the next: `[v]` replaced version `v`.
#[derive(Debug, Default)]
struct History {
    replaced_at: Vec<Instant>,
}

/// The database shared by every instance of the service.
#[derive(Debug)]
pub(crate) struct Database {
    connections: Semaphore,
    size: usize,
    /// Queries waiting for a connection or running.
    pending: AtomicUsize,
    peak_pending: AtomicUsize,
    queries: AtomicU64,
    busy_micros: AtomicU64,
    /// Time connections were held, and the part of it spent idle in transaction.
    held_micros: AtomicU64,
    idle_micros: AtomicU64,
    /// Committed orders by (customer, order reference).
    orders: Mutex<HashMap<(u64, u64), Order>>,
    /// Products updated at least once.
    updated: Mutex<HashMap<u64, History>>,
}

/// An order row.
#[derive(Clone, Copy, Debug, Default)]
struct Order {
    /// Times it was inserted: more than once is a duplicate order.
    placed: u32,
    /// Reservations of it while it stood: a checkout run again, which the idempotent insert
    /// absorbed.
    reserved_again: u32,
    paid: bool,
    /// Withdrawn before payment (its payment could not be queued).
    cancelled: bool,
}

/// Counters of one run.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct DbStats {
    pub(crate) queries: u64,
    pub(crate) mean_query: Duration,
    pub(crate) peak_pending: usize,
    /// Orders placed and not cancelled.
    pub(crate) orders: u64,
    pub(crate) duplicate_orders: u64,
    /// Checkouts run again for an order that stood: not duplicates, thanks to the idempotent
    /// insert, but each one the checkout's own idempotency should have replayed instead.
    pub(crate) repeated_checkouts: u64,
    pub(crate) paid_orders: u64,
    pub(crate) cancelled_orders: u64,
    /// Time connections were held, in all.
    pub(crate) connection_time: Duration,
    /// The part of it spent outside queries: idle in transaction.
    pub(crate) idle_in_transaction: Duration,
}

impl Database {
    /// A database with `size` connections.
    pub(crate) fn new(size: usize) -> Arc<Self> {
        Arc::new(Self {
            connections: Semaphore::new(size),
            size,
            pending: AtomicUsize::new(0),
            peak_pending: AtomicUsize::new(0),
            queries: AtomicU64::new(0),
            busy_micros: AtomicU64::new(0),
            held_micros: AtomicU64::new(0),
            idle_micros: AtomicU64::new(0),
            orders: Mutex::new(HashMap::new()),
            updated: Mutex::new(HashMap::new()),
        })
    }

    /// Takes a connection from the pool, waiting at most the pool's wait limit.
    pub(crate) async fn connect(&self) -> Result<Connection<'_>, DbError> {
        let _waiting = Pending::enter(self);
        let permit = tokio::time::timeout(POOL_WAIT, self.connections.acquire())
            .await
            .map_err(|_| DbError::PoolTimeout)?
            .expect("the pool is never closed");
        Ok(Connection {
            db: self,
            _permit: permit,
            opened: Instant::now(),
            querying: Duration::ZERO,
        })
    }

    /// Runs one query on a connection of its own.
    pub(crate) async fn query(&self) -> Result<(), DbError> {
        self.connect().await?.query().await;
        Ok(())
    }

    /// Reads a product.
    pub(crate) async fn product(&self, id: u64) -> Result<Product, DbError> {
        self.query().await?;
        Ok(self.row(id))
    }

    /// Changes a product's price (a new version of its row) and returns the new row.
    pub(crate) async fn update_price(&self, id: u64) -> Result<Product, DbError> {
        self.query().await?;
        let mut updated = self.updated.lock().expect("products lock");
        updated
            .entry(id)
            .or_default()
            .replaced_at
            .push(Instant::now());
        Ok(Self::row_of(id, updated.get(&id)))
    }

    /// The product's row as committed now.
    fn row(&self, id: u64) -> Product {
        Self::row_of(id, self.updated.lock().expect("products lock").get(&id))
    }

    fn row_of(id: u64, history: Option<&History>) -> Product {
        let version = history.map_or(0, |h| h.replaced_at.len() as u64);
        Product {
            id,
            // Each update moves the price by a few cents.
            price_cents: 500 + (id % 97) as u32 * 10 + (version % 10) as u32,
            version,
        }
    }

    /// How long ago `served` stopped being the product's current row, if it has: the staleness
    /// of a page showing it.
    pub(crate) fn staleness(&self, served: &Product) -> Option<Duration> {
        let updated = self.updated.lock().expect("products lock");
        let replaced = updated
            .get(&served.id)?
            .replaced_at
            .get(usize::try_from(served.version).ok()?)?;
        Some(replaced.elapsed())
    }

    /// Places an order in one transaction: reserves stock, charges the customer through
    /// `gateway` while holding the connection, then inserts the order row, paid. Returns the
    /// order number.
    pub(crate) async fn place_order_and_pay(
        &self,
        customer: u64,
        reference: u64,
        gateway: &Gateway,
    ) -> Result<u64, DbError> {
        let mut connection = self.connect().await?;
        connection.query().await;
        gateway.charge(customer, reference, None).await;
        connection.query().await;
        self.record(customer, reference, |order| {
            order.placed += 1;
            order.paid = true;
        });
        Ok(order_number(customer, reference))
    }

    /// Reserves stock and inserts the order row, awaiting payment. Idempotent: an order
    /// already inserted is left as it is (`INSERT .. ON CONFLICT DO NOTHING`).
    pub(crate) async fn reserve_order(
        &self,
        customer: u64,
        reference: u64,
    ) -> Result<u64, DbError> {
        self.query().await?;
        self.record(customer, reference, |order| {
            if order.placed > 0 && !order.cancelled {
                order.reserved_again += 1;
            }
            order.placed = order.placed.max(1);
        });
        Ok(order_number(customer, reference))
    }

    /// Withdraws an order awaiting payment.
    pub(crate) async fn cancel_order(&self, customer: u64, reference: u64) -> Result<(), DbError> {
        self.query().await?;
        self.record(customer, reference, |order| order.cancelled = !order.paid);
        Ok(())
    }

    /// Marks an order paid.
    pub(crate) async fn mark_paid(&self, customer: u64, reference: u64) -> Result<(), DbError> {
        self.query().await?;
        self.record(customer, reference, |order| order.paid = true);
        Ok(())
    }

    fn record(&self, customer: u64, reference: u64, change: impl FnOnce(&mut Order)) {
        let mut orders = self.orders.lock().expect("orders lock");
        change(orders.entry((customer, reference)).or_default());
    }

    /// The counters so far.
    pub(crate) fn stats(&self) -> DbStats {
        let queries = self.queries.load(Ordering::Relaxed);
        let busy = self.busy_micros.load(Ordering::Relaxed);
        let orders = self.orders.lock().expect("orders lock");
        DbStats {
            queries,
            mean_query: Duration::from_micros(busy.checked_div(queries).unwrap_or(0)),
            peak_pending: self.peak_pending.load(Ordering::Relaxed),
            orders: orders
                .values()
                .filter(|o| !o.cancelled)
                .map(|o| u64::from(o.placed))
                .sum(),
            duplicate_orders: orders
                .values()
                .map(|o| u64::from(o.placed.saturating_sub(1)))
                .sum(),
            repeated_checkouts: orders.values().map(|o| u64::from(o.reserved_again)).sum(),
            paid_orders: orders.values().filter(|o| o.paid).count() as u64,
            cancelled_orders: orders.values().filter(|o| o.cancelled).count() as u64,
            connection_time: Duration::from_micros(self.held_micros.load(Ordering::Relaxed)),
            idle_in_transaction: Duration::from_micros(self.idle_micros.load(Ordering::Relaxed)),
        }
    }
}

fn order_number(customer: u64, reference: u64) -> u64 {
    customer * 1_000_000 + reference % 1_000_000
}

/// A connection taken from the pool, given back when dropped.
pub(crate) struct Connection<'a> {
    db: &'a Database,
    _permit: SemaphorePermit<'a>,
    opened: Instant,
    /// Time spent in queries on it.
    querying: Duration,
}

impl Connection<'_> {
    /// Runs one query.
    pub(crate) async fn query(&mut self) {
        let db = self.db;
        let started = Instant::now();
        let pending = Pending::enter(db);
        // 5–20 ms, up to 3× slower when many queries pile up on the pool.
        let base = 5_000 + fastrand::u64(0..15_000);
        let contention = (pending.load() as f64 / db.size as f64 - 1.0).clamp(0.0, 4.0);
        let micros = (base as f64 * (1.0 + contention * 0.5)) as u64;
        tokio::time::sleep(Duration::from_micros(micros)).await;
        db.queries.fetch_add(1, Ordering::Relaxed);
        db.busy_micros.fetch_add(micros, Ordering::Relaxed);
        self.querying += started.elapsed();
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

impl Drop for Connection<'_> {
    fn drop(&mut self) {
        let held = self.opened.elapsed();
        self.db
            .held_micros
            .fetch_add(micros(held), Ordering::Relaxed);
        self.db.idle_micros.fetch_add(
            micros(held.saturating_sub(self.querying)),
            Ordering::Relaxed,
        );
    }
}

/// Counts a query as pending for as long as it lives (dropped on every path).
struct Pending<'a> {
    db: &'a Database,
    now: usize,
}

impl<'a> Pending<'a> {
    fn enter(db: &'a Database) -> Self {
        let now = db.pending.fetch_add(1, Ordering::Relaxed) + 1;
        db.peak_pending.fetch_max(now, Ordering::Relaxed);
        Self { db, now }
    }

    fn load(&self) -> usize {
        self.now.max(self.db.pending.load(Ordering::Relaxed))
    }
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        self.db.pending.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_replaced_row_is_stale_since_its_replacement() {
        let db = Database::new(2);
        let first = db.product(7).await.expect("read");
        assert_eq!((first.version, db.staleness(&first)), (0, None));
        let second = db.update_price(7).await.expect("update");
        assert_eq!(second.version, 1);
        assert_ne!(second.price_cents, first.price_cents);
        assert_eq!(db.product(7).await.expect("read"), second);
        assert!(db.staleness(&first).is_some());
        assert_eq!(db.staleness(&second), None);
        // Other products are untouched.
        assert_eq!(db.product(8).await.expect("read").version, 0);
    }

    #[tokio::test]
    async fn paying_inside_the_transaction_holds_its_connection_idle_for_the_whole_call() {
        let db = Database::new(2);
        let gateway = Gateway::default();
        db.place_order_and_pay(1, 10, &gateway)
            .await
            .expect("order");
        let stats = db.stats();
        assert_eq!((stats.orders, stats.paid_orders), (1, 1));
        // The provider takes at least 80 ms, all of it with the connection held.
        assert!(stats.idle_in_transaction >= Duration::from_millis(80));
        assert!(stats.connection_time >= stats.idle_in_transaction);
        assert_eq!(gateway.stats().charged, 1);
    }

    #[tokio::test]
    async fn a_reserved_order_is_inserted_once_and_paid_apart() {
        let db = Database::new(2);
        db.reserve_order(1, 10).await.expect("reserve");
        db.reserve_order(1, 10).await.expect("reserve again");
        assert_eq!((db.stats().orders, db.stats().paid_orders), (1, 0));
        assert_eq!(db.stats().repeated_checkouts, 1, "the second was absorbed");
        db.mark_paid(1, 10).await.expect("paid");
        let stats = db.stats();
        assert_eq!(
            (stats.orders, stats.paid_orders, stats.duplicate_orders),
            (1, 1, 0)
        );
        // Outside its queries, a connection of its own is held only for a moment.
        assert!(stats.idle_in_transaction < Duration::from_millis(1));
    }
}
