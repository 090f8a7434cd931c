use std::sync::LazyLock;
use std::time::Duration;

use headroom_core::migration::{MigrationRecord, MigrationStore, Transition};
use headroom_core::{BackendError, BackendErrorKind, Key};
use redis::Script;

use crate::Redis;

// One Redis hash per migration (so one cluster slot): `from`, `to` and `phase`, plus one field
// `p:<participant>` = `<phase>:<lease deadline, ms of server time>` per participant.

/// ARGV: from, to, phase. Returns the stored from, to, phase.
static CREATE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('HSET', KEYS[1], 'from', ARGV[1], 'to', ARGV[2], 'phase', ARGV[3])
end
return redis.call('HMGET', KEYS[1], 'from', 'to', 'phase')
",
    )
});

/// ARGV: expected from, to, phase; new phase. Returns {} when applied, else the stored record
/// (all false when there is none).
static TRANSITION: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local r = redis.call('HMGET', KEYS[1], 'from', 'to', 'phase')
if r[1] == ARGV[1] and r[2] == ARGV[2] and r[3] == ARGV[3] then
  redis.call('HSET', KEYS[1], 'phase', ARGV[4])
  return {}
end
return r
",
    )
});

/// ARGV: participant, phase, lease (ms).
static ACKNOWLEDGE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('EXISTS', KEYS[1]) == 1 then
  local t = redis.call('TIME')
  local now_ms = t[1] * 1000 + math.floor(t[2] / 1000)
  redis.call('HSET', KEYS[1], 'p:' .. ARGV[1], ARGV[2] .. ':' .. (now_ms + tonumber(ARGV[3])))
end
return 1
",
    )
});

/// ARGV: phase. Counts live participants below it and forgets expired ones.
static LAGGING: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local t = redis.call('TIME')
local now_ms = t[1] * 1000 + math.floor(t[2] / 1000)
local target = tonumber(ARGV[1])
local fields = redis.call('HGETALL', KEYS[1])
local lagging = 0
for i = 1, #fields, 2 do
  local field = fields[i]
  if string.sub(field, 1, 2) == 'p:' then
    local phase, deadline = string.match(fields[i + 1], '^(%d+):(%d+)$')
    if tonumber(deadline) <= now_ms then
      redis.call('HDEL', KEYS[1], field)
    elseif tonumber(phase) < target then
      lagging = lagging + 1
    end
  end
end
return lagging
",
    )
});

/// The Redis [`MigrationStore`]: each step is one Lua script on one key, one round trip, using
/// the server's clock for acknowledgement leases.
#[derive(Clone, Debug)]
pub struct RedisMigrationStore {
    redis: Redis,
}

impl RedisMigrationStore {
    /// A migration store on `redis`.
    pub fn new(redis: Redis) -> Self {
        Self { redis }
    }
}

fn record(reply: &[Option<String>]) -> Result<Option<MigrationRecord>, BackendError> {
    let field = |value: &Option<String>| {
        value.as_deref().map(|text| {
            text.parse::<u64>().map_err(|_| {
                BackendError::with_detail(
                    BackendErrorKind::Protocol,
                    format!("migration field {text:?} is not a number"),
                )
            })
        })
    };
    match reply {
        [from, to, phase] => match (field(from), field(to), field(phase)) {
            (None, None, None) => Ok(None),
            (Some(from), Some(to), Some(phase)) => Ok(Some(MigrationRecord {
                from_epoch: from?,
                to_epoch: to?,
                phase: u8::try_from(phase?).map_err(|_| {
                    BackendError::with_detail(BackendErrorKind::Protocol, "phase out of range")
                })?,
            })),
            _ => Err(BackendError::with_detail(
                BackendErrorKind::Protocol,
                "migration record with missing fields",
            )),
        },
        _ => Err(BackendError::with_detail(
            BackendErrorKind::Protocol,
            format!("expected 3 migration fields, got {}", reply.len()),
        )),
    }
}

impl MigrationStore for RedisMigrationStore {
    async fn create(
        &self,
        key: &Key,
        new: MigrationRecord,
    ) -> Result<MigrationRecord, BackendError> {
        let reply: Vec<Option<String>> = self
            .redis
            .invoke(
                CREATE
                    .key(key.as_bytes())
                    .arg(new.from_epoch)
                    .arg(new.to_epoch)
                    .arg(new.phase),
            )
            .await?;
        record(&reply)?.ok_or_else(|| {
            BackendError::with_detail(BackendErrorKind::Protocol, "created record missing")
        })
    }

    async fn load(&self, key: &Key) -> Result<Option<MigrationRecord>, BackendError> {
        let reply: Vec<Option<String>> = self
            .redis
            .query(
                redis::cmd("HMGET")
                    .arg(key.as_bytes())
                    .arg("from")
                    .arg("to")
                    .arg("phase"),
            )
            .await?;
        record(&reply)
    }

    async fn transition(
        &self,
        key: &Key,
        expected: MigrationRecord,
        phase: u8,
    ) -> Result<Transition, BackendError> {
        let reply: Vec<Option<String>> = self
            .redis
            .invoke(
                TRANSITION
                    .key(key.as_bytes())
                    .arg(expected.from_epoch)
                    .arg(expected.to_epoch)
                    .arg(expected.phase)
                    .arg(phase),
            )
            .await?;
        if reply.is_empty() {
            return Ok(Transition::Applied);
        }
        Ok(Transition::Rejected(record(&reply)?))
    }

    async fn acknowledge(
        &self,
        key: &Key,
        participant: &str,
        phase: u8,
        lease: Duration,
    ) -> Result<(), BackendError> {
        let _: i64 = self
            .redis
            .invoke(
                ACKNOWLEDGE
                    .key(key.as_bytes())
                    .arg(participant)
                    .arg(phase)
                    .arg(headroom_core::lasting_millis(lease)?),
            )
            .await?;
        Ok(())
    }

    async fn lagging(&self, key: &Key, phase: u8) -> Result<u64, BackendError> {
        self.redis
            .invoke(LAGGING.key(key.as_bytes()).arg(phase))
            .await
    }

    async fn remove(&self, key: &Key) -> Result<(), BackendError> {
        let _: i64 = self
            .redis
            .query(redis::cmd("DEL").arg(key.as_bytes()))
            .await?;
        Ok(())
    }
}
