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

/// The answer to [`RateStore::apply`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateDecision {
    /// Whether the cost was admitted (and charged).
    pub allowed: bool,
    /// Units that could still be spent right now after this decision.
    pub remaining: u32,
    /// When rejected: how long until the same cost would be admitted. Zero when allowed.
    pub retry_after: Duration,
    /// How long until the cell is full again (all `burst` units available).
    pub reset_after: Duration,
}

/// Stores GCRA cells keyed by [`Key`], shared by every instance of a service.
///
/// # Contract
///
/// - `apply` is one atomic step (one round trip, one Lua script touching one key on Redis):
///   it charges `cost` units if the cell admits them, and otherwise changes nothing.
/// - Time is the store's clock (Redis server time), so instances' clocks do not matter.
/// - A cost greater than `burst` can never be admitted; it is rejected with
///   [`BackendErrorKind::Config`](crate::BackendErrorKind::Config).
/// - A cell expires once it is full again, so idle keys take no memory.
pub trait RateStore: Send + Sync + fmt::Debug + 'static {
    /// Applies `cost` units to the cell at `key`.
    fn apply(
        &self,
        key: &Key,
        gcra: Gcra,
        cost: u32,
    ) -> impl Future<Output = Result<RateDecision, BackendError>> + Send;
}

type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Object-safe mirror of [`RateStore`], implemented for every store.
trait ErasedRateStore: Send + Sync + fmt::Debug + 'static {
    fn apply<'a>(
        &'a self,
        key: &'a Key,
        gcra: Gcra,
        cost: u32,
    ) -> BoxFuture<'a, Result<RateDecision, BackendError>>;
}

impl<S: RateStore> ErasedRateStore for S {
    fn apply<'a>(
        &'a self,
        key: &'a Key,
        gcra: Gcra,
        cost: u32,
    ) -> BoxFuture<'a, Result<RateDecision, BackendError>> {
        Box::pin(RateStore::apply(self, key, gcra, cost))
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
    async fn apply(&self, key: &Key, gcra: Gcra, cost: u32) -> Result<RateDecision, BackendError> {
        self.0.apply(key, gcra, cost).await
    }
}
