use std::collections::BTreeMap;
use std::sync::LazyLock;
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::try_join_all;
use headroom_core::kv::{KvEntry, KvStore, VersionAt, check_versions};
use headroom_core::{BackendError, BackendErrorKind, Key};

use headroom_core::slot::cluster_slot;
use redis::Script;

use crate::Redis;

/// `set_if_newer` for the keys of one slot. ARGV: the 1-based index of the version's first
/// byte, that of its tie-break's first byte (0 for none), that of the byte the tie-break
/// counts only when it is at least the next argument (0 for none), that least value, the
/// marker a held value carries its version only after (empty for none), then per key: value,
/// TTL in ms. Versions are little-endian, so bytes compare from the last one down; the
/// tie-break decides between equal versions, and counts as 0 in a value that ends before it
/// or whose gate byte is missing or below its least value; an equal version is written.
/// A key of another type (another program's hash, say) is written over as bytes without the
/// marker are, rather than fail the whole call. Returns how many keys were written.
static SET_IF_NEWER: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local at, tie = tonumber(ARGV[1]), tonumber(ARGV[2])
local gate, gate_least = tonumber(ARGV[3]), tonumber(ARGV[4])
local marker = ARGV[5]
-- Whether value is newer than held in bytes first..last (most significant first); nil if equal.
local function newer_in(held, value, first, last)
  for b = first, last, -1 do
    local h, v = string.byte(held, b), string.byte(value, b)
    if h ~= v then return v > h end
  end
  return nil
end
-- The tie-break v carries.
local function tie_of(v)
  if tie == 0 or #v < tie + 1 then return 0 end
  if gate > 0 and (#v < gate or string.byte(v, gate) < gate_least) then return 0 end
  return string.byte(v, tie) + 256 * string.byte(v, tie + 1)
end
local written = 0
for i, key in ipairs(KEYS) do
  local value = ARGV[2 * i + 4]
  local held = redis.pcall('GET', key)
  -- A key of another type holds nothing of ours: absent. Any other error is raised as a call
  -- would raise it.
  if type(held) == 'table' then
    if string.sub(held.err, 1, 9) ~= 'WRONGTYPE' then error(held) end
    held = false
  end
  local newer = true
  if held and #held >= at + 7 and string.sub(held, 1, #marker) == marker then
    newer = newer_in(held, value, at + 7, at)
    if newer == nil then newer = tie_of(value) >= tie_of(held) end
  end
  if newer then
    redis.call('SET', key, value, 'PX', ARGV[2 * i + 5])
    written = written + 1
  end
end
return written
",
    )
});

/// Redis refuses `GET` of a key of another type (`WRONGTYPE`): foreign data in the key, as
/// bytes the caller cannot decode are, rather than a failing server.
fn foreign_type(error: BackendError, key: &Key) -> BackendError {
    let wrong_type = std::error::Error::source(&error)
        .and_then(|source| source.downcast_ref::<redis::RedisError>())
        .is_some_and(|source| source.code() == Some("WRONGTYPE"));
    if !wrong_type {
        return error;
    }
    BackendError::with_detail(
        BackendErrorKind::Corrupt,
        format!(
            "key {:?} holds another Redis type than a string",
            key.as_bytes().escape_ascii().to_string()
        ),
    )
    .with_source(error)
}

/// Deletes KEYS[1] only while it holds exactly ARGV[1]; a key of another type never does.
static DELETE_IF_EQ: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local held = redis.pcall('GET', KEYS[1])
if type(held) == 'table' and string.sub(held.err, 1, 9) ~= 'WRONGTYPE' then error(held) end
if held == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
",
    )
});

/// The Redis [`KvStore`]: `GET`, `MGET`, `SET PX` (pipelined for many), `DEL`, and Lua
/// scripts for the conditional writes (`set_if_newer`: one script call per cluster slot;
/// `delete_if_eq`).
///
/// Values are stored as they are given; keys are the full namespaced [`Key`]s.
///
/// A key another program filled with another Redis type (a hash, a list) fails `get` with
/// [`BackendErrorKind::Corrupt`], and reads as absent in `get_many` (`MGET` answers nil for
/// it). `set`, `set_many` and `set_if_newer` write over it (to
/// `set_if_newer` it is older than any value, as bytes without the version's marker are),
/// `delete` deletes it, and `delete_if_eq` leaves it: it never holds the expected bytes.
#[derive(Clone, Debug)]
pub struct RedisKvStore {
    redis: Redis,
    max_value_len: usize,
}

impl RedisKvStore {
    /// A store on `redis` accepting values of up to 16 MiB.
    pub fn new(redis: Redis) -> Self {
        Self {
            redis,
            max_value_len: 16 * 1024 * 1024,
        }
    }

    /// Sets the largest value accepted, in bytes. Larger values fail with
    /// [`BackendErrorKind::TooLarge`] before anything is sent.
    #[must_use]
    pub fn with_max_value_len(mut self, max_value_len: usize) -> Self {
        self.max_value_len = max_value_len;
        self
    }

    /// The connection this store uses.
    pub fn redis(&self) -> &Redis {
        &self.redis
    }

    fn check(&self, value: &Bytes, ttl: Duration) -> Result<u64, BackendError> {
        if value.len() > self.max_value_len {
            return Err(BackendError::with_detail(
                BackendErrorKind::TooLarge,
                format!(
                    "value of {} bytes exceeds the limit of {} bytes",
                    value.len(),
                    self.max_value_len
                ),
            ));
        }
        headroom_core::lasting_millis(ttl)
    }

    async fn set_pipelined(&self, entries: &[(&KvEntry, u64)]) -> Result<(), BackendError> {
        let mut pipeline = redis::pipe();
        for (entry, millis) in entries {
            pipeline
                .cmd("SET")
                .arg(entry.key.as_bytes())
                .arg(entry.value.as_ref())
                .arg("PX")
                .arg(*millis)
                .ignore();
        }
        self.redis.query_pipeline::<()>(&pipeline).await
    }

    /// Groups entries by cluster slot (all in one group on a standalone server).
    fn by_slot<'a>(&self, entries: Vec<(&'a KvEntry, u64)>) -> Vec<Vec<(&'a KvEntry, u64)>> {
        if !self.redis.is_cluster() {
            return vec![entries];
        }
        let mut by_slot: BTreeMap<u16, Vec<(&KvEntry, u64)>> = BTreeMap::new();
        for item in entries {
            by_slot
                .entry(cluster_slot(item.0.key.as_bytes()))
                .or_default()
                .push(item);
        }
        by_slot.into_values().collect()
    }

    async fn set_if_newer_in_slot(
        &self,
        entries: &[(&KvEntry, u64)],
        version: VersionAt,
    ) -> Result<u64, BackendError> {
        let mut invocation = SET_IF_NEWER.prepare_invoke();
        let (gate, gate_least) = version
            .tie_only_when()
            .map_or((0, 0), |(at, least)| (at + 1, least));
        invocation
            .arg(version.at() + 1)
            .arg(version.tie_at().map_or(0, |tie_at| tie_at + 1))
            .arg(gate)
            .arg(gate_least)
            .arg(version.marker());
        for (entry, millis) in entries {
            invocation
                .key(entry.key.as_bytes())
                .arg(entry.value.as_ref())
                .arg(*millis);
        }
        self.redis.invoke(&invocation).await
    }
}

impl KvStore for RedisKvStore {
    async fn get(&self, key: &Key) -> Result<Option<Bytes>, BackendError> {
        let value: Option<Vec<u8>> = self
            .redis
            .query(redis::cmd("GET").arg(key.as_bytes()))
            .await
            .map_err(|error| foreign_type(error, key))?;
        Ok(value.map(Bytes::from))
    }

    async fn get_many(&self, keys: &[Key]) -> Result<Vec<Option<Bytes>>, BackendError> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let mut cmd = redis::cmd("MGET");
        for key in keys {
            cmd.arg(key.as_bytes());
        }
        let values: Vec<Option<Vec<u8>>> = self.redis.query(&cmd).await?;
        if values.len() != keys.len() {
            return Err(BackendError::with_detail(
                BackendErrorKind::Protocol,
                format!(
                    "MGET of {} keys answered {} values",
                    keys.len(),
                    values.len()
                ),
            ));
        }
        Ok(values.into_iter().map(|v| v.map(Bytes::from)).collect())
    }

    async fn set(&self, key: &Key, value: Bytes, ttl: Duration) -> Result<(), BackendError> {
        let millis = self.check(&value, ttl)?;
        self.redis
            .query::<()>(
                redis::cmd("SET")
                    .arg(key.as_bytes())
                    .arg(value.as_ref())
                    .arg("PX")
                    .arg(millis),
            )
            .await
    }

    async fn set_many(&self, entries: &[KvEntry]) -> Result<(), BackendError> {
        let checked = entries
            .iter()
            .map(|entry| Ok((entry, self.check(&entry.value, entry.ttl)?)))
            .collect::<Result<Vec<_>, BackendError>>()?;
        if checked.is_empty() {
            return Ok(());
        }
        // A cluster pipeline must stay within one slot: one pipeline per slot, all at once.
        let groups = self.by_slot(checked);
        try_join_all(groups.iter().map(|group| self.set_pipelined(group))).await?;
        Ok(())
    }

    async fn set_if_newer(
        &self,
        entries: &[KvEntry],
        version: VersionAt,
    ) -> Result<u64, BackendError> {
        let checked = entries
            .iter()
            .map(|entry| Ok((entry, self.check(&entry.value, entry.ttl)?)))
            .collect::<Result<Vec<_>, BackendError>>()?;
        check_versions(entries, version)?;
        if checked.is_empty() {
            return Ok(0);
        }
        // A script touches keys of one slot: one call per slot, all at once.
        let groups = self.by_slot(checked);
        let written = try_join_all(
            groups
                .iter()
                .map(|group| self.set_if_newer_in_slot(group, version)),
        )
        .await?;
        Ok(written.into_iter().sum())
    }

    async fn delete_if_eq(&self, key: &Key, expected: &[u8]) -> Result<bool, BackendError> {
        let deleted: i64 = self
            .redis
            .invoke(DELETE_IF_EQ.key(key.as_bytes()).arg(expected))
            .await?;
        Ok(deleted == 1)
    }

    async fn delete(&self, keys: &[Key]) -> Result<u64, BackendError> {
        if keys.is_empty() {
            return Ok(0);
        }
        let mut cmd = redis::cmd("DEL");
        for key in keys {
            cmd.arg(key.as_bytes());
        }
        self.redis.query(&cmd).await
    }
}
