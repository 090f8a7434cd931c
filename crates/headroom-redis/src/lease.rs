use std::sync::LazyLock;
use std::time::Duration;

use bytes::Bytes;
use headroom_core::lease::{Begin, BeginId, Fenced, FencingToken, LeaseStore};
use headroom_core::{BackendError, BackendErrorKind, Key};
use redis::Script;

use crate::Redis;

/// One Redis hash per record (so one cluster slot): `st` (`p` in progress, `c` completed, `r`
/// released), `fp` fingerprint, `tok` fencing token, `exp` lease deadline (ms, server time),
/// `by` the id of the begin that took the lease, `out` outcome, `no` the ids of the last eight
/// begins released by their id, space-separated (a copy of one that reaches Redis later takes
/// nothing). A step never shortens the record's expiry, so those ids are kept as long as
/// their release asked.
///
/// An expired lease is taken over only by a begin with its fingerprint; another fingerprint is
/// answered `{'p', fp, '0'}` (in progress, no time left) and changes nothing.
///
/// Tokens are `max(previous + 1, server time in µs)`: they grow across releases (a released
/// record keeps its token for the rest of its expiry, at least one lease) and, by the server's
/// clock, even after the record expired.
///
/// A record missing a field its state needs (`fp`, `tok` and `exp` in progress; `fp`, `tok`
/// and `out` completed; `tok` released), with a token or deadline that is not a whole number,
/// an unknown state, fields without a state, or a key of another type in its place is not what
/// the store wrote: `begin` answers `{'x', what, ''}` and changes nothing.
static BEGIN: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local t = redis.call('TIME')
local now_ms = t[1] * 1000 + math.floor(t[2] / 1000)
local now_us = t[1] * 1000000 + t[2]
local lease = tonumber(ARGV[2])
local function corrupt(what)
  return {'x', what, ''}
end
-- A key of another type is corrupt, not an error that would read as the store being down.
local r = redis.pcall('HMGET', KEYS[1], 'st', 'fp', 'tok', 'exp', 'out', 'by', 'no')
if r.err then
  return corrupt('the key holds another type')
end
if r[7] and string.find(' ' .. r[7] .. ' ', ' ' .. ARGV[3] .. ' ', 1, true) then
  -- Released by its id before it got here: its caller is gone.
  return {'n', '', ''}
end
-- A whole number the store wrote (at most 2^53, exact in a double), or nil.
local function int(v)
  if type(v) == 'string' and #v <= 16 and string.match(v, '^%d+$') then
    local x = tonumber(v)
    if x <= 9007199254740992 then
      return x
    end
  end
  return nil
end
local st, fp, tok, exp = r[1], r[2], int(r[3]), int(r[4])
if r[3] and not tok then
  return corrupt('its token is not a whole number')
end
if st == 'c' then
  if not (fp and tok and r[5]) then
    return corrupt('a completion lacks its fingerprint, token or outcome')
  end
  return {'c', fp, r[5]}
end
local took_over = '0'
if st == 'p' then
  if not (fp and tok and exp) then
    return corrupt('a lease lacks its fingerprint, token or a whole-number deadline')
  end
  local remaining = exp - now_ms
  if remaining > 0 then
    if r[6] == ARGV[3] and fp == ARGV[1] then
      -- Sent again by the begin that took it: its token.
      return {'a', r[3], '0'}
    end
    return {'p', fp, string.format('%.0f', remaining)}
  end
  if fp ~= ARGV[1] then
    -- The run under this lease may have taken effect: only its own request takes it over.
    return {'p', fp, '0'}
  end
  took_over = '1'
elseif st == 'r' then
  if not tok then
    return corrupt('a release lacks its token')
  end
elseif st then
  return corrupt('its state is unknown')
elseif r[2] or r[3] or r[4] or r[5] or r[6] then
  return corrupt('it has fields but no state')
end
local next_tok = string.format('%.0f', math.max((tok or 0) + 1, now_us))
redis.call('HSET', KEYS[1], 'st', 'p', 'fp', ARGV[1], 'tok', next_tok, 'exp', string.format('%.0f', now_ms + lease), 'by', ARGV[3])
local ttl = lease + math.max(lease, 1000)
if redis.call('PTTL', KEYS[1]) < ttl then
  redis.call('PEXPIRE', KEYS[1], ttl)
end
return {'a', next_tok, took_over}
",
    )
});

/// ARGV: token, then per operation: outcome and retention (complete), lease (extend), nothing (release).
///
/// Answers 1 (applied), 0 (rejected) or -1 (a key of another type in the record's place). A
/// record that is gone is rejected too: a holder tells that apart from another's token with a
/// `begin` of its fingerprint, which acquires the key only if nobody holds it.
static CHANGE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local r = redis.pcall('HMGET', KEYS[1], 'st', 'tok')
if r.err then
  return -1
end
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
  redis.call('HSET', KEYS[1], 'exp', string.format('%.0f', t[1] * 1000 + math.floor(t[2] / 1000) + lease))
  local ttl = lease + math.max(lease, 1000)
  if redis.call('PTTL', KEYS[1]) < ttl then
    redis.call('PEXPIRE', KEYS[1], ttl)
  end
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

/// ARGV: the id of the begin whose lease is released, if that begin still holds it, and how
/// long (ms) its id is kept at least, so that a copy of that begin reaching Redis later takes
/// nothing. Answers as [`CHANGE`].
static RELEASE_BEGUN: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local r = redis.pcall('HMGET', KEYS[1], 'st', 'by', 'no')
if r.err then
  return -1
end
local released = 0
if r[1] == 'p' and r[2] == ARGV[1] then
  -- As a release: the token stays until the record expires.
  redis.call('HSET', KEYS[1], 'st', 'r')
  redis.call('HDEL', KEYS[1], 'fp', 'exp', 'by')
  released = 1
end
-- A completion answers every begin with its outcome; otherwise the begin's id is kept.
if r[1] ~= 'c' then
  local ids = {}
  for id in string.gmatch(r[3] or '', '%S+') do
    ids[#ids + 1] = id
  end
  while #ids >= 8 do
    table.remove(ids, 1)
  end
  ids[#ids + 1] = ARGV[1]
  redis.call('HSET', KEYS[1], 'no', table.concat(ids, ' '))
  if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[2]) then
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
  end
end
return released
",
    )
});

/// How long a begin released by its id is remembered at least: past the client library's own
/// resends of a timed-out command and a slow connection's delivery.
const RELEASED_BEGIN_KEPT: Duration = Duration::from_secs(60);

/// The Redis [`LeaseStore`]: each step is one Lua script on one key, one round trip, using the
/// server's clock for lease deadlines.
///
/// A record that is not what the store wrote (a field its state needs missing, a token or
/// deadline that is not a whole number, an unknown state), or a key of another type in its
/// place, is [`BackendErrorKind::Corrupt`] to `begin`, and a key of another type is to every
/// step; nothing is changed. Such a record stays until it expires or is deleted.
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
        let answer: i64 = self.redis.invoke(&invocation).await?;
        fenced(answer, key)
    }
}

/// A change script's answer: 1 applied, 0 rejected, -1 a key of another type at `key`.
fn fenced(answer: i64, key: &Key) -> Result<Fenced, BackendError> {
    match answer {
        1 => Ok(Fenced::Applied),
        0 => Ok(Fenced::Rejected),
        -1 => Err(corrupt(key, "the key holds another type")),
        other => Err(protocol(format!("a lease step answered {other}"))),
    }
}

fn millis(duration: Duration) -> Result<String, BackendError> {
    Ok(headroom_core::lasting_millis(duration)?.to_string())
}

fn protocol(detail: impl Into<Box<str>>) -> BackendError {
    BackendError::with_detail(BackendErrorKind::Protocol, detail)
}

fn corrupt(key: &Key, what: &str) -> BackendError {
    BackendError::with_detail(
        BackendErrorKind::Corrupt,
        format!(
            "lease record {:?} is not what the store wrote: {what}",
            key.as_bytes().escape_ascii().to_string()
        ),
    )
}

fn number(bytes: &[u8]) -> Option<u64> {
    std::str::from_utf8(bytes).ok()?.parse().ok()
}

fn text(bytes: &[u8]) -> String {
    bytes.escape_ascii().to_string()
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
            // The token may be the record's own (a begin sent again).
            b"a" => Ok(Begin::Acquired {
                token: FencingToken(number(&a).ok_or_else(|| {
                    corrupt(key, &format!("its token {:?} is not a number", text(&a)))
                })?),
                took_over: b == b"1",
            }),
            b"p" => Ok(Begin::InProgress {
                fingerprint: Bytes::from(a),
                lease_remaining: Duration::from_millis(number(&b).ok_or_else(|| {
                    protocol(format!(
                        "begin answered a remaining lease of {:?}",
                        text(&b)
                    ))
                })?),
            }),
            b"c" => Ok(Begin::Completed {
                fingerprint: Bytes::from(a),
                outcome: Bytes::from(b),
            }),
            b"x" => Err(corrupt(key, &String::from_utf8_lossy(&a))),
            b"n" => Err(BackendError::with_detail(
                BackendErrorKind::Command,
                "this begin was released by its id before it reached Redis; it took nothing",
            )),
            other => Err(protocol(format!(
                "begin answered an unknown state {:?}",
                text(other)
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
        let answer: i64 = self
            .redis
            .invoke(
                RELEASE_BEGUN
                    .key(key.as_bytes())
                    .arg(id.0)
                    .arg(millis(RELEASED_BEGIN_KEPT)?),
            )
            .await?;
        fenced(answer, key)
    }
}
