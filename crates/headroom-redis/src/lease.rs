use std::sync::LazyLock;
use std::time::Duration;

use bytes::Bytes;
use headroom_core::lease::{Begin, BeginId, Fenced, FencingToken, LeaseStore};
use headroom_core::{BackendError, BackendErrorKind, Key};
use redis::Script;

use crate::Redis;

/// One Redis hash per record (so one cluster slot): `st` (`p` in progress, `c` completed, `r`
/// released), `fp` fingerprint, `tok` fencing token, `exp` lease deadline (ms, server time),
/// `by` the id of the begin that took the lease, `out` outcome.
///
/// Tokens are `max(previous + 1, server time in µs)`: they grow across releases (a released
/// record keeps its token for the rest of its expiry, at least one lease) and, by the server's
/// clock, even after the record expired.
static BEGIN: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local t = redis.call('TIME')
local now_ms = t[1] * 1000 + math.floor(t[2] / 1000)
local now_us = t[1] * 1000000 + t[2]
local lease = tonumber(ARGV[2])
local r = redis.call('HMGET', KEYS[1], 'st', 'fp', 'tok', 'exp', 'out', 'by')
if r[1] == 'c' then
  return {'c', r[2], r[5]}
end
local took_over = '0'
if r[1] == 'p' then
  local remaining = tonumber(r[4]) - now_ms
  if remaining > 0 then
    if r[6] == ARGV[3] and r[2] == ARGV[1] then
      -- Sent again by the begin that took it: its token.
      return {'a', r[3], '0'}
    end
    return {'p', r[2], tostring(remaining)}
  end
  took_over = '1'
end
local tok = string.format('%.0f', math.max((tonumber(r[3]) or 0) + 1, now_us))
redis.call('HSET', KEYS[1], 'st', 'p', 'fp', ARGV[1], 'tok', tok, 'exp', now_ms + lease, 'by', ARGV[3])
redis.call('PEXPIRE', KEYS[1], lease + math.max(lease, 1000))
return {'a', tok, took_over}
",
    )
});

/// ARGV: token, then per operation: outcome and retention (complete), lease (extend), nothing (release).
static CHANGE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local r = redis.call('HMGET', KEYS[1], 'st', 'tok')
local op = ARGV[2]
if r[2] ~= ARGV[1] then
  return 0
end
if r[1] ~= 'p' then
  -- A completion repeated by its holder (the first answer lost) stands: it is applied.
  if r[1] == 'c' and op == 'complete' then
    return 1
  end
  return 0
end
if op == 'complete' then
  redis.call('HSET', KEYS[1], 'st', 'c', 'out', ARGV[3])
  redis.call('HDEL', KEYS[1], 'exp', 'by')
  redis.call('PEXPIRE', KEYS[1], ARGV[4])
elseif op == 'extend' then
  local t = redis.call('TIME')
  local lease = tonumber(ARGV[3])
  redis.call('HSET', KEYS[1], 'exp', t[1] * 1000 + math.floor(t[2] / 1000) + lease)
  redis.call('PEXPIRE', KEYS[1], lease + math.max(lease, 1000))
else
  -- Released: the key is free again, but the token stays until the record expires (at least
  -- one lease from its last begin or extend), so the next token is greater.
  redis.call('HSET', KEYS[1], 'st', 'r')
  redis.call('HDEL', KEYS[1], 'fp', 'exp', 'by')
end
return 1
",
    )
});

/// ARGV: the id of the begin whose lease is released, if that begin still holds it.
static RELEASE_BEGUN: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local r = redis.call('HMGET', KEYS[1], 'st', 'by')
if r[1] ~= 'p' or r[2] ~= ARGV[1] then
  return 0
end
-- As a release: the token stays until the record expires.
redis.call('HSET', KEYS[1], 'st', 'r')
redis.call('HDEL', KEYS[1], 'fp', 'exp', 'by')
return 1
",
    )
});

/// The Redis [`LeaseStore`]: each step is one Lua script on one key, one round trip, using the
/// server's clock for lease deadlines.
#[derive(Clone, Debug)]
pub struct RedisLeaseStore {
    redis: Redis,
}

impl RedisLeaseStore {
    /// A lease store on `redis`.
    pub fn new(redis: Redis) -> Self {
        Self { redis }
    }

    async fn change(
        &self,
        key: &Key,
        token: FencingToken,
        op: &str,
        args: &[&[u8]],
    ) -> Result<Fenced, BackendError> {
        let mut invocation = CHANGE.key(key.as_bytes());
        invocation.arg(token.0.to_string()).arg(op);
        for arg in args {
            invocation.arg(*arg);
        }
        let applied: i64 = self.redis.invoke(&invocation).await?;
        Ok(fenced(applied))
    }
}

/// A change script's answer: 1 when it was made.
fn fenced(applied: i64) -> Fenced {
    if applied == 1 {
        Fenced::Applied
    } else {
        Fenced::Rejected
    }
}

fn millis(duration: Duration) -> Result<String, BackendError> {
    Ok(headroom_core::lasting_millis(duration)?.to_string())
}

fn protocol(detail: impl Into<Box<str>>) -> BackendError {
    BackendError::with_detail(BackendErrorKind::Protocol, detail)
}

fn number(bytes: &[u8]) -> Result<u64, BackendError> {
    std::str::from_utf8(bytes)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| {
            protocol(format!(
                "expected a number, got {:?}",
                bytes.escape_ascii().to_string()
            ))
        })
}

impl LeaseStore for RedisLeaseStore {
    async fn begin(
        &self,
        key: &Key,
        fingerprint: &[u8],
        lease: Duration,
        id: BeginId,
    ) -> Result<Begin, BackendError> {
        let lease = millis(lease)?;
        let reply: Vec<Vec<u8>> = self
            .redis
            .invoke(
                BEGIN
                    .key(key.as_bytes())
                    .arg(fingerprint)
                    .arg(lease)
                    .arg(id.0),
            )
            .await?;
        let [state, a, b] = <[Vec<u8>; 3]>::try_from(reply)
            .map_err(|reply| protocol(format!("begin answered {} fields", reply.len())))?;
        match state.as_slice() {
            b"a" => Ok(Begin::Acquired {
                token: FencingToken(number(&a)?),
                took_over: b == b"1",
            }),
            b"p" => Ok(Begin::InProgress {
                fingerprint: Bytes::from(a),
                lease_remaining: Duration::from_millis(number(&b)?),
            }),
            b"c" => Ok(Begin::Completed {
                fingerprint: Bytes::from(a),
                outcome: Bytes::from(b),
            }),
            other => Err(protocol(format!(
                "unknown record state {:?}",
                other.escape_ascii().to_string()
            ))),
        }
    }

    async fn complete(
        &self,
        key: &Key,
        token: FencingToken,
        outcome: Bytes,
        retention: Duration,
    ) -> Result<Fenced, BackendError> {
        let retention = millis(retention)?;
        self.change(key, token, "complete", &[&outcome, retention.as_bytes()])
            .await
    }

    async fn extend(
        &self,
        key: &Key,
        token: FencingToken,
        lease: Duration,
    ) -> Result<Fenced, BackendError> {
        let lease = millis(lease)?;
        self.change(key, token, "extend", &[lease.as_bytes()]).await
    }

    async fn release(&self, key: &Key, token: FencingToken) -> Result<Fenced, BackendError> {
        self.change(key, token, "release", &[]).await
    }

    async fn release_begun(&self, key: &Key, id: BeginId) -> Result<Fenced, BackendError> {
        let released: i64 = self
            .redis
            .invoke(RELEASE_BEGUN.key(key.as_bytes()).arg(id.0))
            .await?;
        Ok(fenced(released))
    }
}
