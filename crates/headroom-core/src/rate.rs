//! The rate store behind distributed rate limits: GCRA cells shared by every instance.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use crate::{BackendError, Key};

/// The parameters of one GCRA cell.
///
/// A cell admits one unit of cost every `emission_interval` on average, with bursts of up to
/// `burst` units at once.
///
/// The algorithm, shared by every implementation: a cell holds its theoretical arrival time
/// `tat` (initially now). A request of cost `n` at `now` computes
/// `new_tat = max(tat, now) + n × emission_interval`; it is admitted if
/// `new_tat − burst × emission_interval ≤ now`, and then `tat = new_tat`. When rejected,
/// `retry_after` is exactly the time until that inequality holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Gcra {
    /// The time one unit of cost takes to replenish (period / rate). Never zero.
    pub emission_interval: Duration,
    /// How many units may be spent at once. At least 1.
    pub burst: u32,
}

impl Gcra {
    /// The delay variation tolerance: how far ahead of now the theoretical arrival time may run.
    pub fn tolerance(&self) -> Duration {
        self.emission_interval.saturating_mul(self.burst)
    }
}

/// The answer to [`RateStore::apply_all`] (and [`RateStore::apply`], one cell).
///
/// Over several cells, each figure is the one that binds: the fewest units left, the longest
/// wait, the longest time to full.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateDecision {
    /// Whether the cost was admitted (and charged).
    pub allowed: bool,
    /// Units that could still be spent right now after this decision: the fewest any cell
    /// has left.
    pub remaining: u32,
    /// When rejected: how long until the same cost would be admitted, the longest wait of any
    /// cell. Zero when allowed.
    pub retry_after: Duration,
    /// How long until every cell is full again (all `burst` units available).
    pub reset_after: Duration,
    /// The index of the cell that decided: when rejected, the one with the longest wait; when
    /// allowed, the one with the fewest units left (the first of equals). 0 for one cell.
    pub cell: usize,
}

impl RateDecision {
    /// What GCRA decides of `cost` units over cells given as each one's limit and how far its
    /// theoretical arrival time runs ahead of now (zero for a cell that is full): admitted if
    /// every cell admits the cost, with the figures that bind. Every store decides through
    /// this, so they agree to the nanosecond.
    ///
    /// The caller has checked the cells: at least one, non-zero intervals and bursts, and
    /// `cost` within every burst.
    pub fn of_cells(
        cells: impl IntoIterator<Item = (Gcra, Duration), IntoIter: Clone>,
        cost: u32,
    ) -> Self {
        let cells = cells.into_iter();
        let charge = |gcra: Gcra| gcra.emission_interval.saturating_mul(cost);
        // The longest wait of any cell, the first of equals.
        let mut refused: Option<(usize, Duration)> = None;
        for (index, (gcra, ahead)) in cells.clone().enumerate() {
            let wait = ahead
                .saturating_add(charge(gcra))
                .saturating_sub(gcra.tolerance());
            if !wait.is_zero() && refused.is_none_or(|(_, longest)| wait > longest) {
                refused = Some((index, wait));
            }
        }
        let mut decision = Self {
            allowed: refused.is_none(),
            remaining: u32::MAX,
            retry_after: refused.map_or(Duration::ZERO, |(_, wait)| wait),
            reset_after: Duration::ZERO,
            cell: refused.map_or(0, |(index, _)| index),
        };
        for (index, (gcra, mut ahead)) in cells.enumerate() {
            if decision.allowed {
                ahead = ahead.saturating_add(charge(gcra));
            }
            let headroom = gcra.tolerance().saturating_sub(ahead);
            let left = u32::try_from(headroom.as_nanos() / gcra.emission_interval.as_nanos())
                .unwrap_or(u32::MAX);
            // The fewest units left, the first of equals.
            if left < decision.remaining {
                decision.remaining = left;
                if decision.allowed {
                    decision.cell = index;
                }
            }
            decision.reset_after = decision.reset_after.max(ahead);
        }
        decision
    }
}

/// Stores GCRA cells keyed by [`Key`], shared by every instance of a service.
///
/// # Contract
///
/// - `apply_all` is one atomic step over one or more cells (one round trip, one Lua script on
///   Redis): it charges `cost` units to every cell if each of them admits them, and otherwise
///   changes nothing. The keys of one call are distinct and share a Redis Cluster slot (a
///   common `{hash tag}`).
/// - Time is the store's clock (Redis server time), so instances' clocks do not matter.
/// - A cost greater than the `burst` of any cell can never be admitted, and an empty list of
///   cells decides nothing: both are rejected with
///   [`BackendErrorKind::Config`](crate::BackendErrorKind::Config).
/// - A cell expires once it is full again, so idle keys take no memory.
pub trait RateStore: Send + Sync + fmt::Debug + 'static {
    /// Applies `cost` units to every cell of `cells` (a key and its limit) together: all of
    /// them are charged, or none.
    fn apply_all(
        &self,
        cells: &[(Key, Gcra)],
        cost: u32,
    ) -> impl Future<Output = Result<RateDecision, BackendError>> + Send;

    /// Applies `cost` units to the one cell at `key`.
    fn apply(
        &self,
        key: &Key,
        gcra: Gcra,
        cost: u32,
    ) -> impl Future<Output = Result<RateDecision, BackendError>> + Send {
        let cells = [(key.clone(), gcra)];
        async move { self.apply_all(&cells, cost).await }
    }
}

type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Object-safe mirror of [`RateStore`], implemented for every store.
trait ErasedRateStore: Send + Sync + fmt::Debug + 'static {
    fn apply_all<'a>(
        &'a self,
        cells: &'a [(Key, Gcra)],
        cost: u32,
    ) -> BoxFuture<'a, Result<RateDecision, BackendError>>;
}

impl<S: RateStore> ErasedRateStore for S {
    fn apply_all<'a>(
        &'a self,
        cells: &'a [(Key, Gcra)],
        cost: u32,
    ) -> BoxFuture<'a, Result<RateDecision, BackendError>> {
        Box::pin(RateStore::apply_all(self, cells, cost))
    }
}

/// A [`RateStore`] chosen at run time (memory or Redis), behind one cheap-to-clone type.
///
/// Each call boxes its future; use the concrete store type where that matters.
#[derive(Clone, Debug)]
pub struct DynRateStore(Arc<dyn ErasedRateStore>);

impl DynRateStore {
    /// Erases the type of `store`.
    pub fn new(store: impl RateStore) -> Self {
        Self(Arc::new(store))
    }
}

impl RateStore for DynRateStore {
    async fn apply_all(
        &self,
        cells: &[(Key, Gcra)],
        cost: u32,
    ) -> Result<RateDecision, BackendError> {
        self.0.apply_all(cells, cost).await
    }
}
