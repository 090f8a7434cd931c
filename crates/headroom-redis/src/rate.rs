use std::sync::LazyLock;
use std::time::Duration;

use headroom_core::rate::{Gcra, RateDecision, RateStore};
use headroom_core::{BackendError, BackendErrorKind, Key};
use redis::{Script, ScriptInvocation};

use crate::Redis;

// The scripts do only what must happen on the server, in as few Lua steps as they can (each
// step costs the server time on every decision): read the server's clock and the cells, and
// charge them if every one admits the cost. Each cell holds its theoretical arrival time in µs
// of server time and expires when it is full again. ARGV holds, for each cell in the order of
// KEYS, the cost's charge (cost × emission interval) and the tolerance (burst × emission
// interval), in µs. The answer is how far each cell's arrival time ran ahead of now before the
// decision (zero when full), from which [`RateDecision::of_cells`] derives the figures. A cell
// a decision leaves full (a cost of zero) is not written: it reads as full without a key.
// A cell that does not hold a time (not a number, NaN, a key of another type) reads as full
// too, and is overwritten when charged; the comparisons are written so that NaN fails them.

/// One cell. Answers the ahead when it charged the cell, and `-1 - ahead` when it did not.
static APPLY_ONE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local t = redis.call('TIME')
local now = t[1] * 1000000 + t[2]
local tat = tonumber(redis.pcall('GET', KEYS[1]))
if not (tat and tat >= now) then
  tat = now
end
local new = tat + tonumber(ARGV[1])
if new - now > tonumber(ARGV[2]) then
  return now - tat - 1
end
if new > now then
  redis.call('SET', KEYS[1], new, 'PX', math.ceil((new - now) / 1000))
end
return tat - now
",
    )
});

/// Every cell of KEYS together: all are charged, or none. Answers `{charged (1 or 0), ahead
/// of each cell...}`.
static APPLY_ALL: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local t = redis.call('TIME')
local now = t[1] * 1000000 + t[2]
local answer = {1}
for i = 1, #KEYS do
  local ahead = (tonumber(redis.pcall('GET', KEYS[i])) or now) - now
  if not (ahead > 0) then
    ahead = 0
  end
  answer[i + 1] = ahead
  if ahead + ARGV[2 * i - 1] > tonumber(ARGV[2 * i]) then
    answer[1] = 0
  end
end
if answer[1] == 1 then
  for i = 1, #KEYS do
    local tat = now + answer[i + 1] + ARGV[2 * i - 1]
    if tat > now then
      redis.call('SET', KEYS[i], tat, 'PX', math.ceil((tat - now) / 1000))
    end
  end
end
return answer
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
        if let [(key, gcra)] = cells {
            let gcra = on_server(gcra, cost)?;
            let mut invocation = APPLY_ONE.prepare_invoke();
            arguments(&mut invocation, key, gcra, cost);
            let answer: i64 = self.redis.invoke(&invocation).await?;
            let charged = answer >= 0;
            let ahead = if charged { answer } else { -1 - answer };
            return decided([(gcra, ahead)], cost, charged);
        }
        if cells.is_empty() {
            return Err(BackendError::with_detail(
                BackendErrorKind::Config,
                "a rate decision needs at least one cell",
            ));
        }
        let mut invocation = APPLY_ALL.prepare_invoke();
        let mut held = Vec::with_capacity(cells.len());
        for (key, gcra) in cells {
            let gcra = on_server(gcra, cost)?;
            arguments(&mut invocation, key, gcra, cost);
            held.push(gcra);
        }
        let answer: Vec<i64> = self.redis.invoke(&invocation).await?;
        let [charged, aheads @ ..] = answer.as_slice() else {
            return Err(malformed(&answer));
        };
        if aheads.len() != held.len() {
            return Err(malformed(&answer));
        }
        decided(
            held.into_iter().zip(aheads.iter().copied()),
            cost,
            *charged == 1,
        )
    }
}

/// The limit as the server holds it, in whole microseconds; refuses one that cannot admit
/// `cost`.
fn on_server(gcra: &Gcra, cost: u32) -> Result<Gcra, BackendError> {
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
    Ok(Gcra {
        emission_interval: Duration::from_micros(interval),
        burst: gcra.burst,
    })
}

fn arguments(invocation: &mut ScriptInvocation<'_>, key: &Key, gcra: Gcra, cost: u32) {
    invocation
        .key(key.as_bytes())
        .arg(micros(gcra.emission_interval.saturating_mul(cost)))
        .arg(micros(gcra.tolerance()));
}

/// The decision from the cells' aheads (µs) the script answered, which must agree with
/// whether it charged them.
fn decided(
    cells: impl IntoIterator<Item = (Gcra, i64), IntoIter: Clone>,
    cost: u32,
    charged: bool,
) -> Result<RateDecision, BackendError> {
    // An ahead is never negative, except a time too far for Redis's integer replies (a
    // corrupt cell), which arrives as the most negative integer: as far as it gets.
    let cells = cells.into_iter().map(|(gcra, ahead)| {
        let ahead = Duration::from_micros(u64::try_from(ahead).unwrap_or(u64::MAX));
        (gcra, ahead)
    });
    let decision = RateDecision::of_cells(cells, cost);
    if decision.allowed == charged {
        Ok(decision)
    } else {
        Err(BackendError::with_detail(
            BackendErrorKind::Protocol,
            "the rate script charged cells that do not admit the cost, or the reverse",
        ))
    }
}

fn malformed(answer: &[i64]) -> BackendError {
    BackendError::with_detail(
        BackendErrorKind::Protocol,
        format!(
            "the rate script answered {} values for its cells",
            answer.len()
        ),
    )
}
