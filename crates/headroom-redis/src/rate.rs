use std::sync::LazyLock;
use std::time::Duration;

use headroom_core::rate::{Gcra, RateDecision, RateStore};
use headroom_core::{BackendError, BackendErrorKind, Key};
use redis::Script;

use crate::Redis;

/// GCRA on every key of KEYS together, each holding its cell's theoretical arrival time in µs
/// of server time; see [`Gcra`] for the algorithm. ARGV: the cost, then the emission interval
/// (µs) and the burst of each cell in the order of KEYS. Every cell is decided before any is
/// written: all are charged, or none. Answers `{allowed, remaining, retry_after_us,
/// reset_after_us, cell}` as [`RateDecision`] describes them (`cell` counted from 0).
static APPLY_ALL: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local t = redis.call('TIME')
local now = t[1] * 1000000 + t[2]
local cost = tonumber(ARGV[1])
local tats, intervals, tolerances = {}, {}, {}
local wait, cell = 0, 1
for i = 1, #KEYS do
  local interval = tonumber(ARGV[2 * i])
  local tolerance = interval * tonumber(ARGV[2 * i + 1])
  local tat = tonumber(redis.call('GET', KEYS[i])) or now
  if tat < now then
    tat = now
  end
  tats[i], intervals[i], tolerances[i] = tat, interval, tolerance
  local late = tat + cost * interval - tolerance - now
  if late > wait then
    wait, cell = late, i
  end
end
local allowed = 1
if wait > 0 then
  allowed = 0
end
local remaining, reset = nil, 0
for i = 1, #KEYS do
  local interval = intervals[i]
  local tat = tats[i]
  if allowed == 1 then
    tat = tat + cost * interval
    redis.call('SET', KEYS[i], string.format('%.0f', tat), 'PX', math.ceil((tat - now) / 1000))
  end
  local left = math.floor((now + tolerances[i] - tat) / interval)
  if remaining == nil or left < remaining then
    remaining = left
    if allowed == 1 then
      cell = i
    end
  end
  if tat - now > reset then
    reset = tat - now
  end
end
return {allowed, remaining, wait, reset, cell - 1}
",
    )
});

/// The Redis [`RateStore`]: one Lua script per decision over the cells it names (one round
/// trip; their keys share a hash tag, so one cluster slot), on the server's clock so instances'
/// clocks do not matter. A cell expires once it is full again.
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
    async fn apply_all(
        &self,
        cells: &[(Key, Gcra)],
        cost: u32,
    ) -> Result<RateDecision, BackendError> {
        if cells.is_empty() {
            return Err(BackendError::with_detail(
                BackendErrorKind::Config,
                "a rate decision needs at least one cell",
            ));
        }
        let mut invocation = APPLY_ALL.prepare_invoke();
        invocation.arg(cost);
        for (key, gcra) in cells {
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
            invocation.key(key.as_bytes()).arg(interval).arg(gcra.burst);
        }
        let (allowed, remaining, retry_after, reset_after, cell): (u8, i64, i64, i64, i64) =
            self.redis.invoke(&invocation).await?;
        let micros = |us: i64| Duration::from_micros(u64::try_from(us).unwrap_or(0));
        Ok(RateDecision {
            allowed: allowed == 1,
            remaining: u32::try_from(remaining).unwrap_or(0),
            retry_after: micros(retry_after),
            reset_after: micros(reset_after),
            cell: usize::try_from(cell).unwrap_or(0).min(cells.len() - 1),
        })
    }
}
