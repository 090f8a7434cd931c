use std::sync::LazyLock;
use std::time::Duration;

use headroom_core::rate::{Gcra, RateDecision, RateStore};
use headroom_core::{BackendError, BackendErrorKind, Key};
use redis::Script;

use crate::Redis;

/// GCRA on one key holding the theoretical arrival time in µs of server time; see
/// [`Gcra`] for the algorithm. ARGV: emission interval (µs), burst, cost.
/// Answers `{allowed, remaining, retry_after_us, reset_after_us}`.
static APPLY: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local t = redis.call('TIME')
local now = t[1] * 1000000 + t[2]
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local tat = tonumber(redis.call('GET', KEYS[1])) or now
if tat < now then
  tat = now
end
local tolerance = interval * burst
local new_tat = tat + cost * interval
local allow_at = new_tat - tolerance
if allow_at > now then
  return {0, math.floor((now + tolerance - tat) / interval), allow_at - now, tat - now}
end
redis.call('SET', KEYS[1], string.format('%.0f', new_tat), 'PX', math.ceil((new_tat - now) / 1000))
return {1, math.floor((now + tolerance - new_tat) / interval), 0, new_tat - now}
",
    )
});

/// The Redis [`RateStore`]: one Lua script on one key per decision (one round trip, one
/// cluster slot), on the server's clock so instances' clocks do not matter. A cell expires
/// once it is full again.
#[derive(Clone, Debug)]
pub struct RedisRateStore {
    redis: Redis,
}

impl RedisRateStore {
    /// A rate store on `redis`.
    pub fn new(redis: Redis) -> Self {
        Self { redis }
    }
}

fn micros(duration: Duration) -> u64 {
    u64::try_from(duration.as_micros()).unwrap_or(u64::MAX)
}

impl RateStore for RedisRateStore {
    async fn apply(&self, key: &Key, gcra: Gcra, cost: u32) -> Result<RateDecision, BackendError> {
        let interval = micros(gcra.emission_interval);
        if interval == 0 || gcra.burst == 0 || cost > gcra.burst {
            return Err(BackendError::with_detail(
                BackendErrorKind::Config,
                format!(
                    "cost {cost} cannot be admitted by an emission interval of {:?} and a burst of {}",
                    gcra.emission_interval, gcra.burst
                ),
            ));
        }
        let (allowed, remaining, retry_after, reset_after): (u8, i64, i64, i64) = self
            .redis
            .invoke(
                APPLY
                    .key(key.as_bytes())
                    .arg(interval)
                    .arg(gcra.burst)
                    .arg(cost),
            )
            .await?;
        let micros = |us: i64| Duration::from_micros(u64::try_from(us).unwrap_or(0));
        Ok(RateDecision {
            allowed: allowed == 1,
            remaining: u32::try_from(remaining).unwrap_or(0),
            retry_after: micros(retry_after),
            reset_after: micros(reset_after),
        })
    }
}
