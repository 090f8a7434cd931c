//! Rate limits: GCRA in process, per key, per tier, and shared across instances.
//!
//! Every limiter here runs GCRA (the generic cell rate algorithm, as `governor` and
//! `redis-cell` do): a [`Quota`] of `limit` units per `period` becomes one unit every
//! `period / limit`, with bursts of up to `burst` units. A cell is one timestamp, its
//! theoretical arrival time; a rejection says exactly how long until the request would fit
//! ([`RateLimited::retry_after`]).
//!
//! | type | scope | state |
//! |---|---|---|
//! | [`DirectLimiter`] | one resource | one `AtomicU64`: a compare-and-swap per check, no lock, no allocation |
//! | [`KeyedLimiter`] | one cell per key | sharded maps, capped under any number of keys |
//! | [`LocalRateLimiter`] | quotas per tier ([`TierConfig`]), a cell per key and quota | one keyed limiter per tier, replaceable at run time |
//! | [`DistributedRateLimiter`] | shared by every instance | a [`RateStore`](headroom_core::rate::RateStore) (Redis), one round trip per decision, or batched; a [`Fallback`] when it is unreachable |
//!
//! A tier may hold several quotas ([`Quotas`], "10 a second and 1,000 a day"): a request is
//! admitted only if every quota admits it, a refused request is charged to none of them, and
//! its `retry_after` is the longest wait among the quotas that refuse. Both tiered limiters
//! can also wait for a permit that is near ([`RateLimit::acquire`]) instead of refusing.
//!
//! A [`Resolve`]r tells a request's tier, key and cost; the tower layer
//! (`tower::RateLimitLayer`, feature `tower`) answers HTTP requests over their quota with
//! `429 Too Many Requests`, `Retry-After` and the IETF `RateLimit` / `RateLimit-Policy`
//! headers.
//!
//! The guide in `docs/rate-limits.md` explains how to choose quotas, the local and
//! distributed modes and their bounds, and the fallbacks.

mod cells;
mod distributed;
mod error;
mod limiter;
mod local;
mod quota;
mod reserved;
mod table;
mod tier;
mod wait;

use std::time::Duration;

pub use distributed::{
    DistributedConfig, DistributedRateLimiter, DistributedRateLimiterBuilder, Fallback,
};
pub use error::{RateError, RateErrorKind, RateLimited};
pub use limiter::{LocalRateLimiter, LocalRateLimiterBuilder, RateLimit};
pub use local::{DirectLimiter, DirectLimiterBuilder, KeyedLimiter, KeyedLimiterBuilder};
pub use quota::{MAX_BURST_TIME, Quota, Quotas};
pub use tier::{RateKey, Resolve, TierConfig};

/// An admitted request: what is left of its quota, for the `RateLimit` response header.
///
/// For a tier of several [`Quotas`], the figures are those that bind: the quota with the fewest
/// units left, those units, and the time until every quota is full again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Admitted {
    quota: Quota,
    remaining: u32,
    reset_after: Duration,
}

impl Admitted {
    /// The quota the request was charged to (of several, the one with the fewest units left).
    pub fn quota(&self) -> Quota {
        self.quota
    }

    /// Units that could still be spent right now.
    pub fn remaining(&self) -> u32 {
        self.remaining
    }

    /// How long until the whole burst is available again (of every quota).
    pub fn reset_after(&self) -> Duration {
        self.reset_after
    }
}
