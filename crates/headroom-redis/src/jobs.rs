use std::sync::LazyLock;
use std::time::Duration;

use bytes::Bytes;
use headroom_core::jobs::{
    Completed, Completion, DRAIN_WINDOW, Delivery, EnqueueLimits, Enqueued, FetchRequest,
    JobNumber, JobRecord, JobState, JobStore, MAX_LANES, NewJob, PartitionStats,
};
use headroom_core::lease::Fenced;
use headroom_core::slot::hash_tag;
use headroom_core::{BackendError, BackendErrorKind, Key};
use redis::{Script, Value};

use crate::Redis;

/// The most dead letters listed per partition; older ones stay readable by `status` until
/// their retention passes.
const MAX_DEAD_LETTERS: usize = 10_000;

/// The most delayed jobs a fetch makes ready (the rest wait for the next fetch).
const MAX_DUE_PER_FETCH: u32 = 1_000;

/// The most jobs one completion script finishes; `complete_many` sends longer lists in parts.
const MAX_COMPLETIONS_PER_CALL: usize = 500;

/// The longest duration given to the server, in ms (about 35,000 years): longer ones are
/// clamped to it, so deadlines stay exact in Lua's doubles and valid for `PEXPIRE`.
const MAX_MS: u64 = 1 << 50;

// Every script runs on one partition `P` (KEYS[1]) and derives its keys from it, so they share
// its hash tag and slot:
//
// - `P:seq`: the last job number (INCR).
// - `P:j:<number>`: the record of a job, a hash: `s` state (`q` queued, `r` running, `y`
//   retrying, `d` done, `x` dead), `a` attempt, `l` lane, `e` enqueued (ms), `p` payload, `t`
//   tenant (if any), `k` subject and `kr` its rank (if any), `h` deliveries handed back (once
//   one was), `res` result, `err` error, and while running `sid` (the stream entry of the
//   current delivery), `c` (its consumer) and `f` (the token of the fetch that made it, `0`
//   for none, with `+` after it when that delivery took the job over: `recover` finds a lost
//   fetch's deliveries by it). A completion empties `p`, `sid`, `c` and `f` in the write that
//   marks the job done rather than deleting them in a call of its own. Unfinished records never expire; finished ones expire
//   after their retention.
// - `P:s:<lane>`: one stream per lane, with consumer group `w`; an entry holds `n` the job
//   number, and lives from the moment the job is ready until its delivery is acknowledged
//   (complete, retry or bury: XACK and XDEL together). So every entry is either undelivered
//   (ready) or pending (running).
// - `P:d`: sorted set of delayed and retrying job numbers by due time (ms).
// - `P:dd:<dedup key>`: the number first enqueued with the key, expiring after the window.
// - `P:n`: unfinished jobs; `P:t`: hash of unfinished jobs per tenant.
// - `P:k`: hash of the number of each subject's newest job (the last added, unless the one
//   then newest and unfinished ranked higher), while it is unfinished: its completion or
//   burial removes the field if it still names that job.
// - `P:dead`: sorted set of dead job numbers by burial order (`P:dseq`), bounded; `P:dx`: the
//   same numbers by the end of their retention, to drop them once their record expired.
// - `P:stats`: the drain rate's buckets: `b` bucket index, `c` finished in it, `p` finished in
//   the bucket before; it expires after two windows without a finished job.
// - `P:v`: hash of the visibility (ms) each consumer holding deliveries fetched with: a
//   takeover waits for the holder's too. A consumer's entry goes when it holds nothing and
//   leaves, or is forgotten: a look for lapsed deliveries drops from the groups the other
//   consumers that hold nothing and have been idle for the look's visibility, 100 at most.
// - `P:scan`: when a fetch last looked for lapsed deliveries (server ms), expiring after a
//   quarter of that fetch's visibility; `P:scanat`: hash of the pending entry each lane's next
//   look goes on from (`(<id>`), when the last one stopped half way.

/// Helpers shared by every script; `W` (the drain window in ms), `MAX_DEAD`, `MAX_DUE` and
/// `MAX_LANE` are defined before them. Each script adds only the further helpers it calls (the
/// parts below), since defining a helper costs every call of the script.
const PRELUDE: &str = r"
local P = KEYS[1]
local clock = redis.call('TIME')
local now = clock[1] * 1000 + math.floor(clock[2] / 1000)
local function num(n)
  return string.format('%.0f', n)
end
local function record(n)
  return P .. ':j:' .. n
end
local function stream(lane)
  return P .. ':s:' .. lane
end
-- Whether the lane stream `s` is there; a key of another type in its place is none of the
-- store's (it is dropped when a job is pushed to the lane).
local function lane_exists(s)
  return redis.call('TYPE', s).ok == 'stream'
end
-- The fields of record `rk`, or nil when the key holds another type: not what the store
-- wrote, so corrupt, and not an error that would stop the script half way.
local function read_record(rk, ...)
  local r = redis.pcall('HMGET', rk, ...)
  if r.err then
    return nil
  end
  return r
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
";

/// Adds an entry for job `n` to the end of `lane`'s stream, making the stream and its group
/// the first time; and delays a job. A key of another type in the place of a lane or of the
/// delayed set holds none of the store's jobs: it is dropped and made afresh, rather than fail
/// a step half way through its writes.
const LANE_PUSH: &str = r"
-- Whether `reply` (of a `pcall`) says its key holds another type; any other error (OOM, a
-- replica's READONLY) is raised, failing the step as a `call` would.
local function wrong_type(reply)
  if type(reply) ~= 'table' or not reply.err then
    return false
  end
  if string.sub(reply.err, 1, 9) == 'WRONGTYPE' then
    return true
  end
  error(reply)
end
local function push(lane, n)
  local s = stream(lane)
  local added = redis.pcall('XADD', s, 'NOMKSTREAM', '*', 'n', n)
  if wrong_type(added) then
    redis.call('DEL', s)
    added = false
  end
  if not added then
    redis.call('XGROUP', 'CREATE', s, 'w', '0', 'MKSTREAM')
    redis.call('XADD', s, '*', 'n', n)
  end
end
-- Job `n` waits in the delayed set until `due` (ms).
local function delay_job(n, due)
  if wrong_type(redis.pcall('ZADD', P .. ':d', num(due), n)) then
    redis.call('DEL', P .. ':d')
    redis.call('ZADD', P .. ':d', num(due), n)
  end
end
";

/// The partition's and tenants' unfinished counts.
const TENANT_COUNT: &str = r"
-- Takes `count` jobs that finished or can no longer run off the partition's unfinished count.
-- A count the store did not write is left as it is, for enqueues to refuse as corrupt until it
-- is reset, rather than failing a step half way through its writes.
local function unfinished_down(count)
  local left = redis.pcall('INCRBY', P .. ':n', -count)
  if type(left) == 'number' and left < 0 then
    redis.call('SET', P .. ':n', 0)
  end
end
-- Tenants' unfinished counts. A count the store did not write (not a whole number, or `P:t`
-- not a hash) is dropped rather than failing a step half way through its writes: that
-- tenant's bound counts from there again.
local function drop_tenant_count(tenant)
  local dropped = redis.pcall('HDEL', P .. ':t', tenant)
  if type(dropped) ~= 'number' then
    redis.call('DEL', P .. ':t')
  end
end
-- `tenant`'s unfinished count, a count the store did not write dropped and read as 0.
local function tenant_count(tenant)
  local raw = redis.pcall('HGET', P .. ':t', tenant)
  if not raw then
    return 0
  end
  local count = type(raw) == 'string' and int(raw)
  if not count then
    drop_tenant_count(tenant)
    return 0
  end
  return count
end
-- Adds `delta` to `tenant`'s unfinished count, dropping the count at zero.
local function count_tenant(tenant, delta)
  local t = P .. ':t'
  local left = redis.pcall('HINCRBY', t, tenant, delta)
  if type(left) ~= 'number' then
    drop_tenant_count(tenant)
    left = delta
    if delta > 0 then
      redis.call('HSET', t, tenant, delta)
    end
  end
  if left <= 0 then
    redis.call('HDEL', t, tenant)
  end
end
";

/// The subjects' newest jobs.
const SUBJECTS: &str = r"
-- Forgets `subject`'s newest job if it is job `n`, which finished. A `P:k` the store did not
-- write is dropped rather than failing a step half way through its writes.
local function forget_subject(subject, n)
  local newest = redis.pcall('HGET', P .. ':k', subject)
  if newest == n then
    redis.call('HDEL', P .. ':k', subject)
  elseif type(newest) == 'table' then
    redis.call('DEL', P .. ':k')
  end
end
";

/// The drain rate's buckets, read and written.
const DRAIN: &str = r"
-- The drain buckets rolled to now: bucket index, finished in it, finished in the one before.
-- Buckets replaced by a key of another type read as empty: they only estimate the drain rate,
-- and no step may fail on them after its own writes.
local function drain()
  local s = redis.pcall('HMGET', P .. ':stats', 'b', 'c', 'p')
  local foreign = s.err ~= nil
  if foreign then
    s = {}
  end
  local bucket = math.floor(now / W)
  local b, c, p = int(s[1]), int(s[2]) or 0, int(s[3]) or 0
  if b ~= bucket then
    if b == bucket - 1 then
      p = c
    else
      p = 0
    end
    c = 0
  end
  return bucket, c, p, foreign
end
local function drained_per_sec()
  local _, c, p = drain()
  local into = (now % W) / W
  return string.format('%.17g', (p * (1 - into) + c) / (W / 1000))
end
-- Counts `count` jobs finished now in the drain buckets.
local function drained(count)
  local bucket, c, p, foreign = drain()
  if foreign then
    redis.call('DEL', P .. ':stats')
  end
  redis.call('HSET', P .. ':stats', 'b', num(bucket), 'c', num(c + count), 'p', num(p))
  redis.call('PEXPIRE', P .. ':stats', num(2 * W))
end
-- Takes a finished job off the unfinished counts (its tenant's too) and counts it drained.
local function finished(tenant)
  unfinished_down(1)
  if tenant then
    count_tenant(tenant, -1)
  end
  drained(1)
end
";

/// Whether a consumer holds a delivery.
const HOLDS: &str = r"
-- Whether `consumer` holds a delivery in any lane.
local function holds_any(consumer)
  for lane = 0, MAX_LANE do
    local s = stream(lane)
    if lane_exists(s) and #redis.call('XPENDING', s, 'w', '-', '+', 1, consumer) > 0 then
      return true
    end
  end
  return false
end
";

/// Uncounting jobs that can no longer run.
const UNCOUNT: &str = r"
-- A job that can no longer run (its record gone, or not what the store wrote) stops counting
-- against the partition's bound and, when its record still names one, its tenant's; nor is
-- it its subject's newest job any more.
local function uncount(n)
  unfinished_down(1)
  local r = read_record(record(n), 't', 'k')
  if r and type(r[1]) == 'string' then
    count_tenant(r[1], -1)
  end
  if r and type(r[2]) == 'string' then
    forget_subject(r[2], n)
  end
end
";

/// Dropping dead letters whose record expired.
const PRUNE_DEAD: &str = r"
-- Forgets the dead letters whose record expired.
local function prune_dead()
  while true do
    local gone = redis.call('ZRANGEBYSCORE', P .. ':dx', '-inf', '(' .. num(now), 'LIMIT', 0, 500)
    if #gone == 0 then
      return
    end
    redis.call('ZREM', P .. ':dead', unpack(gone))
    redis.call('ZREM', P .. ':dx', unpack(gone))
    if #gone < 500 then
      return
    end
  end
end
";

/// ARGV: lane, delay (ms, 0 for none), payload, tenant flag (`1`/`0`), tenant, dedup flag,
/// dedup key, dedup window (ms), max length, max per tenant (empty for none), subject flag,
/// subject, subject rank.
///
/// Answers `{'a', number}`, `{'d', number}`, `{'f', tenant (1/0), depth, drained per sec,
/// unfinished}` or `{'c', what}` for a corrupt count.
const ENQUEUE: &str = r"
local dd
if ARGV[6] == '1' then
  dd = P .. ':dd:' .. ARGV[7]
  local first = redis.call('GET', dd)
  if first then
    return {'d', first}
  end
end
local tenant = false
if ARGV[4] == '1' then
  tenant = ARGV[5]
end
-- A count of another type (an error here) is as corrupt as one that is not a number.
local count = redis.pcall('GET', P .. ':n')
local unfinished = type(count) ~= 'table' and int(count or '0')
if not unfinished then
  return {'c', 'unfinished count'}
end
if tenant and ARGV[10] ~= '' then
  local depth = tenant_count(tenant)
  if depth >= tonumber(ARGV[10]) then
    return {'f', 1, depth, drained_per_sec(), unfinished}
  end
end
if unfinished >= tonumber(ARGV[9]) then
  return {'f', 0, unfinished, drained_per_sec(), unfinished}
end
local number = redis.call('INCR', P .. ':seq')
local n = num(number)
local rk = record(n)
if tenant then
  redis.call('HSET', rk, 's', 'q', 'a', '0', 'l', ARGV[1], 'e', num(now), 'p', ARGV[3], 't', tenant)
  count_tenant(tenant, 1)
else
  redis.call('HSET', rk, 's', 'q', 'a', '0', 'l', ARGV[1], 'e', num(now), 'p', ARGV[3])
end
if ARGV[11] == '1' then
  local subject, rank = ARGV[12], tonumber(ARGV[13])
  redis.call('HSET', rk, 'k', subject, 'kr', ARGV[13])
  -- The newest job of the subject stays so while unfinished if it ranks higher.
  local newest = redis.pcall('HGET', P .. ':k', subject)
  local outranked = false
  if type(newest) == 'table' then
    redis.call('DEL', P .. ':k')
  elseif newest then
    local r = read_record(record(newest), 's', 'k', 'kr')
    local other = r and int(r[3])
    outranked = other and (r[1] == 'q' or r[1] == 'y' or r[1] == 'r') and r[2] == subject
      and other > rank
  end
  if not outranked then
    redis.call('HSET', P .. ':k', subject, n)
  end
end
redis.call('INCR', P .. ':n')
if ARGV[2] ~= '0' then
  delay_job(n, now + tonumber(ARGV[2]))
else
  push(ARGV[1], n)
end
if dd then
  redis.call('SET', dd, n, 'PX', ARGV[8])
end
return {'a', number}
";

/// Fetching, as `fetch_jobs(consumer, max, visibility (ms), token, first_lane, last_lane)`: the
/// lanes to read, in order, are `ARGV[first_lane..=last_lane]`; each delivery is marked with
/// `token` (see `f` above).
///
/// Answers `{deliveries, corrupt}`: the deliveries flat, eight values each (number, attempt,
/// lane, payload, tenant or nil, enqueued ms, taken over (1/0), handed back); `corrupt` names the jobs (or stream entries) whose
/// record cannot be read, which were taken off their lanes. A corrupt record stops the fetch:
/// met before any delivery, it is taken off its lane and named (and nothing is delivered);
/// met after, it is left where it is (the next fetch meets it first), so no job is ever
/// delivered along with an error.
const FETCH_JOBS: &str = r"
local function fetch_jobs(consumer, max, visibility, token, first_lane, last_lane)
  -- Made once: each delivery writes one or the other.
  local taken_mark = token .. '+'
  -- The deliveries, eight values each, one after the other: flat, which costs less to build
  -- and to answer than a table per delivery.
  local out, corrupt = {}, {}
  local count = 0
  local stop = false

  -- The delayed jobs whose time came join the end of their lanes, in due order.
  local due = redis.pcall('ZRANGEBYSCORE', P .. ':d', '-inf', num(now), 'LIMIT', 0, MAX_DUE)
  if wrong_type(due) then
    -- Not the store's: it holds none of its jobs.
    redis.call('DEL', P .. ':d')
    due = {}
  end
  if #due > 0 then
    redis.call('ZREMRANGEBYRANK', P .. ':d', 0, #due - 1)
    for _, n in ipairs(due) do
      local r = read_record(record(n), 'l')
      local lane = r and r[1]
      if lane and string.match(lane, '^[0-7]$') then
        push(lane, n)
      else
        if redis.call('EXISTS', record(n)) == 1 then
          corrupt[#corrupt + 1] = 'job ' .. n
          stop = true
        end
        uncount(n)
      end
    end
  end

  local function drop(s, id)
    redis.call('XACK', s, 'w', id)
    redis.call('XDEL', s, id)
  end

  -- What a stream entry's job is: 'ok' with its number, record key and fields (state,
  -- attempt, enqueued, payload, tenant, handed back) when it can be delivered; 'skip' when
  -- its record is finished; 'gone' with its number when its record is missing; 'bad' with a name (and the
  -- number, when the entry names one) when its entry or record is not what the store wrote.
  local function inspect(id, fields)
    if fields == nil then
      return 'skip'
    end
    local n = type(fields) == 'table' and fields[1] == 'n' and fields[2]
    if not (type(n) == 'string' and string.match(n, '^%d+$')) then
      return 'bad', 'entry ' .. id
    end
    local rk = record(n)
    local r = read_record(rk, 's', 'a', 'e', 'p', 't', 'h', 'l')
    if not r then
      return 'bad', 'job ' .. n, n
    end
    local state = r[1]
    local attempt, enqueued, lane = int(r[2]), int(r[3]), r[7]
    -- Deliverable only with an attempt the next one still fits a u32 after, and a lane every
    -- step can read (compared as one character, as the steps do): otherwise no step could
    -- finish it, and it would come back after every visibility.
    if (state == 'q' or state == 'y' or state == 'r') and attempt and attempt < 4294967295
        and enqueued and type(lane) == 'string' and #lane == 1 and lane >= '0' and lane <= '7' then
      -- Parsed once, for `take`.
      r[2], r[3] = attempt, enqueued
      return 'ok', n, rk, r
    end
    if state == 'd' or state == 'x' then
      return 'skip'
    end
    if redis.call('EXISTS', rk) == 0 then
      return 'gone', n
    end
    return 'bad', 'job ' .. n, n
  end

  local function take(lane, id, n, rk, r, taken)
    local a = r[2] + 1
    -- A small whole number goes to Redis as its digits, and faster than `num` makes them.
    redis.call('HSET', rk, 's', 'r', 'a', a, 'sid', id, 'c', consumer, 'f', taken == 1 and taken_mark or token)
    local k = count * 8
    out[k + 1], out[k + 2], out[k + 3], out[k + 4] = n, a, lane, r[4] or ''
    out[k + 5], out[k + 6], out[k + 7], out[k + 8] = r[5], r[3], taken, r[6] and int(r[6]) or 0
    count = count + 1
  end

  -- The id just before `id`, to hand entries back to the group.
  local function before(id)
    local ms, seq = string.match(id, '^(%d+)-(%d+)$')
    if seq ~= '0' then
      return ms .. '-' .. num(tonumber(seq) - 1)
    end
    return num(tonumber(ms) - 1) .. '-18446744073709551615'
  end

  -- Deliveries idle for the visibility or longer are looked for at most once per quarter of the
  -- visibility (`P:scan` holds when the last look was, by the server's clock): a lapsed delivery
  -- waits at most that much longer for a fetch to take it over. A look that finds as many as it
  -- may take leaves the time as it was, so the next fetch looks again for the rest.
  local scan, every = false, math.floor(tonumber(visibility) / 4)
  if max > 0 and not stop then
    if every < 1 then
      scan = true
    else
      local last = int(redis.call('GET', P .. ':scan'))
      scan = not last or now - last >= every or now < last
    end
  end
  if scan then
    -- The visibility each holder last fetched with (ms, 0 when not known), read once each.
    local visibilities = {}
    local function held_for(holder)
      local v = visibilities[holder]
      if not v then
        v = int(redis.pcall('HGET', P .. ':v', holder)) or 0
        visibilities[holder] = v
      end
      return v
    end
    -- Deliveries idle for the visibility or longer and for their holder's, in every lane,
    -- longest idle first. Those held for a longer visibility (older workers, during a deploy)
    -- are passed over without counting: a lane's idle entries are paged through, 100 at a
    -- time, until `max` lapsed ones are found, the lane's end, or 1,000 looked at. A look that
    -- stops at 1,000 leaves where it stopped in `P:scanat` (`(<id>`), and the next look (the
    -- next fetch's) goes on from there to the lane's end, then from its start to there, so
    -- every entry is reached in turn. A place the store did not write is dropped.
    local candidates, went_on = {}, false
    for lane = 0, MAX_LANE do
      local s = stream(lane)
      if lane_exists(s) then
        local resumed = redis.pcall('HGET', P .. ':scanat', lane)
        if type(resumed) == 'table' then
          redis.call('DEL', P .. ':scanat')
          resumed = false
        elseif resumed and not string.match(resumed, '^%(%d+%-%d+$') then
          redis.call('HDEL', P .. ':scanat', lane)
          resumed = false
        end
        local from, to, seen, found = resumed or '-', '+', 0, 0
        while found < max do
          if seen >= 1000 then
            redis.call('HSET', P .. ':scanat', lane, from)
            went_on = true
            break
          end
          local pending = redis.call('XPENDING', s, 'w', 'IDLE', visibility, from, to, 100)
          for _, p in ipairs(pending) do
            if p[3] >= held_for(p[2]) then
              candidates[#candidates + 1] = {lane, p[1], p[3], p[2]}
              found = found + 1
            end
          end
          seen = seen + #pending
          if #pending == 100 then
            from = '(' .. pending[#pending][1]
          elseif resumed and to == '+' then
            -- The lane's end: on from its start to where this look began (the entry there
            -- was looked at by the last look).
            redis.call('HDEL', P .. ':scanat', lane)
            from, to = '-', string.sub(resumed, 2)
          else
            break
          end
        end
      end
    end
    table.sort(candidates, function(x, y)
      if x[3] ~= y[3] then
        return x[3] > y[3]
      end
      if x[1] ~= y[1] then
        return x[1] < y[1]
      end
      return x[2] < y[2]
    end)
    local owners = {}
    for i = 1, math.min(#candidates, max) do
      local c = candidates[i]
      local s = stream(c[1])
      local entry = redis.call('XRANGE', s, c[2], c[2])[1]
      local kind, n, rk, r = inspect(c[2], entry and entry[2])
      if kind == 'bad' then
        stop = true
        if count == 0 then
          drop(s, c[2])
          corrupt[#corrupt + 1] = n .. ' of lane ' .. c[1]
          if rk then
            uncount(rk)
          end
        end
        break
      elseif kind == 'gone' then
        drop(s, c[2])
        uncount(n)
      elseif kind == 'skip' then
        drop(s, c[2])
      else
        redis.call('XCLAIM', s, 'w', consumer, '0', c[2], 'JUSTID')
        take(tostring(c[1]), c[2], n, rk, r, 1)
      end
      if c[4] ~= consumer then
        owners[#owners + 1] = {s, c[4]}
      end
    end
    if every >= 1 and #candidates < max and not went_on and not stop then
      redis.call('SET', P .. ':scan', num(now), 'PX', num(every))
    end
    -- A holder left without deliveries is most likely gone: forget it (a live one comes back
    -- by itself on its next read), and its visibility once it holds nothing in any lane.
    local forgotten = {}
    for _, o in ipairs(owners) do
      if #redis.call('XPENDING', o[1], 'w', '-', '+', 1, o[2]) == 0 then
        redis.call('XGROUP', 'DELCONSUMER', o[1], 'w', o[2])
        forgotten[o[2]] = true
      end
    end
    -- So is any other consumer holding nothing and idle for the visibility: a worker that died
    -- holding nothing is never taken over from, and would stay in the groups for good. At most
    -- 100 a look, so that a look after many died stays short; the next looks forget the rest.
    local sweep = 100
    for lane = 0, MAX_LANE do
      local s = stream(lane)
      if sweep > 0 and lane_exists(s) then
        for _, c in ipairs(redis.call('XINFO', 'CONSUMERS', s, 'w')) do
          local info = {}
          for k = 1, #c - 1, 2 do
            info[c[k]] = c[k + 1]
          end
          if info.pending == 0 and info.idle >= tonumber(visibility) and info.name ~= consumer then
            redis.call('XGROUP', 'DELCONSUMER', s, 'w', info.name)
            forgotten[info.name] = true
            sweep = sweep - 1
            if sweep == 0 then
              break
            end
          end
        end
      end
    end
    for holder in pairs(forgotten) do
      if not holds_any(holder) then
        redis.call('HDEL', P .. ':v', holder)
      end
    end
  end

  -- Ready jobs, lane by lane in the order asked.
  for i = first_lane, last_lane do
    if stop or count >= max then
      break
    end
    local lane = ARGV[i]
    local s = stream(lane)
    if lane_exists(s) then
      while count < max and not stop do
        local r = redis.call('XREADGROUP', 'GROUP', 'w', consumer, 'COUNT', num(max - count), 'STREAMS', s, '>')
        if not r or not r[1] or #r[1][2] == 0 then
          break
        end
        local entries = r[1][2]
        local give_back
        for k, entry in ipairs(entries) do
          local kind, n, rk, rec = inspect(entry[1], entry[2])
          if kind == 'bad' then
            stop = true
            if count == 0 then
              drop(s, entry[1])
              corrupt[#corrupt + 1] = n .. ' of lane ' .. lane
              if rk then
                uncount(rk)
              end
              give_back = k + 1
            else
              give_back = k
            end
            break
          elseif kind == 'gone' then
            drop(s, entry[1])
            uncount(n)
          elseif kind == 'skip' then
            drop(s, entry[1])
          else
            take(lane, entry[1], n, rk, rec, 0)
          end
        end
        -- The entries read past a corrupt one go back to the group, undelivered.
        if give_back and give_back <= #entries then
          for k = give_back, #entries do
            redis.call('XACK', s, 'w', entries[k][1])
          end
          redis.call('XGROUP', 'SETID', s, 'w', before(entries[give_back][1]))
        end
      end
    end
  end
  -- This consumer's deliveries are held for its visibility, whoever looks at them.
  if count > 0 then
    redis.call('HSET', P .. ':v', consumer, visibility)
  end
  return {out, corrupt}
end
";

/// ARGV: consumer, max, visibility (ms), token, then the lanes to read in order. Answers as
/// [`FETCH_JOBS`].
const FETCH: &str = r"
return fetch_jobs(ARGV[1], tonumber(ARGV[2]), ARGV[3], ARGV[4], 5, #ARGV)
";

/// ARGV: consumer, token, max. Delivers again, as they were, up to `max` of the jobs the fetch
/// marked with `token` delivered to the consumer and that are still running at that delivery
/// (state, stream entry, consumer and mark all still the fetch's), resetting each entry's idle
/// time as an extension does. Finding them pages through the consumer's pending entries of
/// every lane; it runs only after a fetch failed. A record that is not what the store wrote
/// is passed over, left for a takeover. Answers as [`FETCH_JOBS`], never naming a corrupt
/// record.
const RECOVER: &str = r"
local consumer, token, max = ARGV[1], ARGV[2], tonumber(ARGV[3])
local taken_mark = token .. '+'
local out = {}
local count = 0
for lane = 0, MAX_LANE do
  local s = stream(lane)
  if count < max and lane_exists(s) then
    local from = '-'
    while count < max do
      local pending = redis.call('XPENDING', s, 'w', from, '+', 100, consumer)
      for _, p in ipairs(pending) do
        local id = p[1]
        local entry = redis.call('XRANGE', s, id, id)[1]
        local fields = entry and entry[2]
        local n = type(fields) == 'table' and fields[1] == 'n' and fields[2]
        if count < max and type(n) == 'string' and string.match(n, '^%d+$') then
          local r = read_record(record(n), 's', 'a', 'e', 'p', 't', 'h', 'f', 'sid', 'c')
          local mark = r and r[7]
          local attempt, enqueued = r and int(r[2]), r and int(r[3])
          if r and r[1] == 'r' and (mark == token or mark == taken_mark) and r[8] == id
              and r[9] == consumer and attempt and enqueued then
            redis.call('XCLAIM', s, 'w', consumer, '0', id, 'JUSTID')
            local k = count * 8
            out[k + 1], out[k + 2], out[k + 3], out[k + 4] = n, attempt, lane, r[4] or ''
            out[k + 5], out[k + 6] = r[5], enqueued
            out[k + 7], out[k + 8] = mark == taken_mark and 1 or 0, r[6] and int(r[6]) or 0
            count = count + 1
          end
        end
      end
      if #pending < 100 then
        break
      end
      from = '(' .. pending[#pending][1]
    end
  end
end
return {out, {}}
";

/// ARGV: number, attempt, operation (`extend`, `retry`, `release`, `bury`), then per
/// operation: nothing; delay (ms) and error (both for `retry` and `release`, which also counts
/// the delivery as handed back); error and retention (ms). Completions are [`COMPLETE`].
///
/// Answers 1 (applied), 0 (rejected) or -1 (the record is corrupt; nothing changed).
const STEP: &str = r"
local n = ARGV[1]
local rk = record(n)
local r = read_record(rk, 's', 'a', 'l', 'sid', 't', 'c', 'k')
if not r then
  return -1
end
if r[1] ~= 'r' or r[2] ~= ARGV[2] then
  return 0
end
local lane, sid, tenant, consumer = r[3], r[4], r[5], r[6]
if not (lane and string.match(lane, '^[0-7]$') and sid and string.match(sid, '^%d+%-%d+$') and consumer) then
  return -1
end
local s = stream(lane)
local op = ARGV[3]
if op == 'extend' then
  if #redis.call('XCLAIM', s, 'w', consumer, '0', sid, 'JUSTID') == 0 then
    return -1
  end
  return 1
end
if op == 'retry' or op == 'release' then
  -- Read before any write: a corrupt count changes nothing.
  local handed = 0
  if op == 'release' then
    local raw = redis.call('HGET', rk, 'h')
    if raw then
      handed = int(raw)
      if not handed then
        return -1
      end
    end
  end
  redis.call('XACK', s, 'w', sid)
  redis.call('XDEL', s, sid)
  if op == 'release' then
    -- A hand-back is no failed attempt: the last failure's error stays.
    redis.call('HSET', rk, 's', 'y', 'h', num(handed + 1))
    redis.call('HSETNX', rk, 'err', ARGV[5])
  else
    redis.call('HSET', rk, 's', 'y', 'err', ARGV[5])
  end
  redis.call('HDEL', rk, 'sid', 'c', 'f')
  delay_job(n, now + tonumber(ARGV[4]))
else
  redis.call('XACK', s, 'w', sid)
  redis.call('XDEL', s, sid)
  finished(tenant)
  if r[7] then
    forget_subject(r[7], n)
  end
  redis.call('HSET', rk, 's', 'x', 'err', ARGV[4])
  redis.call('HDEL', rk, 'sid', 'c', 'f')
  redis.call('PEXPIRE', rk, ARGV[5])
  prune_dead()
  redis.call('ZADD', P .. ':dead', redis.call('INCR', P .. ':dseq'), n)
  redis.call('ZADD', P .. ':dx', num(now + tonumber(ARGV[5])), n)
  local over = redis.call('ZCARD', P .. ':dead') - MAX_DEAD
  if over > 0 then
    local old = redis.call('ZRANGE', P .. ':dead', 0, over - 1)
    redis.call('ZREMRANGEBYRANK', P .. ':dead', 0, over - 1)
    redis.call('ZREM', P .. ':dx', unpack(old))
  end
end
return 1
";

/// Completing, as `complete_jobs(from)`: `ARGV[from]` is the retention (ms), and each job
/// after it is three arguments: number, attempt, result.
///
/// Completes the jobs in order, each as a step would (a job listed twice is completed by its
/// first entry, and the second is rejected), and answers for each 1 (applied), 0 (rejected) or
/// -1 (its record is corrupt; nothing of it changed). The stream entries of a lane are
/// acknowledged with one call and removed with one or two, and the counts and drain buckets
/// written once.
const COMPLETE_JOBS: &str = r"
-- A stream id `ms-seq` as two numbers, or nil for one past what a double holds exactly.
local function id_parts(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  if ms and #ms <= 15 and #seq <= 15 then
    return tonumber(ms), tonumber(seq)
  end
  return nil
end
-- Acknowledges the finished entries `acked` of stream `s` and removes them. If every one was
-- pending (delivered by this group), an entry before the newest of them was delivered too (the
-- group delivers in order), and one before the oldest pending entry is no longer pending: so
-- every entry before both is done with, and one XTRIM drops them all, which is much cheaper
-- than deleting each; the others are deleted by id. An id that was not pending (its lane was
-- lost and made again) says nothing about the entries before it: only `acked` are deleted.
local function ack_and_remove(s, acked)
  if redis.call('XACK', s, 'w', unpack(acked)) < #acked then
    redis.call('XDEL', s, unpack(acked))
    return
  end
  local ms, seq = {}, {}
  local bound
  for k, id in ipairs(acked) do
    ms[k], seq[k] = id_parts(id)
    if not ms[k] then
      redis.call('XDEL', s, unpack(acked))
      return
    end
    if not bound or ms[k] > ms[bound] or (ms[k] == ms[bound] and seq[k] > seq[bound]) then
      bound = k
    end
  end
  local bound_id, bound_ms, bound_seq = acked[bound], ms[bound], seq[bound]
  local oldest = redis.call('XPENDING', s, 'w', '-', '+', 1)[1]
  if oldest then
    local m, q = id_parts(oldest[1])
    if not m then
      redis.call('XDEL', s, unpack(acked))
      return
    end
    if m < bound_ms or (m == bound_ms and q < bound_seq) then
      bound_id, bound_ms, bound_seq = oldest[1], m, q
    end
  end
  redis.call('XTRIM', s, 'MINID', bound_id)
  local rest = {}
  for k, id in ipairs(acked) do
    if ms[k] > bound_ms or (ms[k] == bound_ms and seq[k] >= bound_seq) then
      rest[#rest + 1] = id
    end
  end
  if #rest > 0 then
    redis.call('XDEL', s, unpack(rest))
  end
end
local function complete_jobs(from)
  local retention = ARGV[from]
  local out, ids, tenants = {}, {}, {}
  local done = 0
  for i = from + 1, #ARGV, 3 do
    local n = ARGV[i]
    local rk = record(n)
    local r = read_record(rk, 's', 'a', 'l', 'sid', 't', 'k')
    local answer = 0
    if not r then
      answer = -1
    elseif r[1] == 'r' and r[2] == ARGV[i + 1] then
      local lane, sid, tenant = r[3], r[4], r[5]
      -- The lane compared as a one-character string: cheaper than a pattern, per job.
      if lane and #lane == 1 and lane >= '0' and lane <= '7' and sid and string.match(sid, '^%d+%-%d+$') then
        answer = 1
        done = done + 1
        local lane_ids = ids[lane]
        if not lane_ids then
          lane_ids = {}
          ids[lane] = lane_ids
        end
        lane_ids[#lane_ids + 1] = sid
        if tenant then
          tenants[tenant] = (tenants[tenant] or 0) + 1
        end
        redis.call('HSET', rk, 's', 'd', 'res', ARGV[i + 2], 'p', '', 'sid', '', 'c', '', 'f', '')
        redis.call('PEXPIRE', rk, retention)
        if r[6] then
          forget_subject(r[6], n)
        end
      else
        answer = -1
      end
    end
    out[#out + 1] = answer
  end
  if done > 0 then
    for lane, lane_ids in pairs(ids) do
      ack_and_remove(stream(lane), lane_ids)
    end
    unfinished_down(done)
    for tenant, count in pairs(tenants) do
      count_tenant(tenant, -count)
    end
    drained(done)
  end
  return out
end
";

/// ARGV: retention (ms), then for each job: number, attempt, result. Answers as
/// [`COMPLETE_JOBS`].
const COMPLETE: &str = r"
return complete_jobs(1)
";

/// ARGV: subject. Answers `{number, payload}` of the subject's newest job if it is unfinished
/// (a record the store wrote, still naming the subject), or nothing.
const NEWEST: &str = r"
local n = redis.pcall('HGET', P .. ':k', ARGV[1])
if type(n) ~= 'string' or not int(n) then
  return false
end
local r = read_record(record(n), 's', 'k', 'p')
if r and (r[1] == 'q' or r[1] == 'y' or r[1] == 'r') and r[2] == ARGV[1] and r[3] then
  return {n, r[3]}
end
return false
";

/// ARGV: max. Answers the numbers of up to `max` dead jobs still kept, newest first.
const DEAD_LETTERS: &str = r"
prune_dead()
local max = tonumber(ARGV[1])
local out, gone = {}, {}
local from = 0
while #out < max do
  local batch = redis.call('ZREVRANGE', P .. ':dead', from, from + max - 1)
  if #batch == 0 then
    break
  end
  for _, n in ipairs(batch) do
    if #out < max then
      if redis.call('EXISTS', record(n)) == 1 then
        out[#out + 1] = n
      else
        gone[#gone + 1] = n
      end
    end
  end
  from = from + #batch
end
for _, n in ipairs(gone) do
  redis.call('ZREM', P .. ':dead', n)
  redis.call('ZREM', P .. ':dx', n)
end
return out
";

/// Answers `{unfinished (raw), ready, running, delayed, oldest ready ms or nil, dead}`.
const STATS: &str = r"
prune_dead()
local ready, running, oldest = 0, 0, false
for lane = 0, MAX_LANE do
  local s = stream(lane)
  if lane_exists(s) then
    local len = redis.call('XLEN', s)
    local pending = redis.call('XPENDING', s, 'w')[1]
    running = running + pending
    if len > pending then
      ready = ready + len - pending
      local last = '0-0'
      for _, g in ipairs(redis.call('XINFO', 'GROUPS', s)) do
        local f = {}
        for i = 1, #g, 2 do
          f[g[i]] = g[i + 1]
        end
        if f['name'] == 'w' then
          last = f['last-delivered-id']
        end
      end
      local first = redis.call('XRANGE', s, '(' .. last, '+', 'COUNT', 1)[1]
      if first and type(first[2]) == 'table' and first[2][1] == 'n' and type(first[2][2]) == 'string' then
        local r = read_record(record(first[2][2]), 'e')
        local e = r and int(r[1])
        if e and (not oldest or e < oldest) then
          oldest = e
        end
      end
    end
  end
end
-- A count of another type reads as corrupt, as one that is not a number does.
local unfinished = redis.pcall('GET', P .. ':n')
if type(unfinished) == 'table' then
  unfinished = 'of another type'
end
return {
  unfinished,
  ready,
  running,
  redis.call('ZCARD', P .. ':d'),
  oldest,
  redis.call('ZCARD', P .. ':dead'),
}
";

/// ARGV: consumer. Drops the consumer from the group of every lane where it holds no entry,
/// and its visibility when it holds none in any.
const LEAVE: &str = r"
for lane = 0, MAX_LANE do
  local s = stream(lane)
  if lane_exists(s) and #redis.call('XPENDING', s, 'w', '-', '+', 1, ARGV[1]) == 0 then
    redis.call('XGROUP', 'DELCONSUMER', s, 'w', ARGV[1])
  end
end
if not holds_any(ARGV[1]) then
  redis.call('HDEL', P .. ':v', ARGV[1])
end
return 1
";

/// A script of the constants, the prelude, the helpers in `parts` and `body`.
fn script(parts: &[&str], body: &str) -> Script {
    Script::new(&format!(
        "local W = {}\nlocal MAX_DEAD = {MAX_DEAD_LETTERS}\nlocal MAX_DUE = {MAX_DUE_PER_FETCH}\n\
         local MAX_LANE = {}\n{PRELUDE}{}{body}",
        DRAIN_WINDOW.as_millis(),
        MAX_LANES - 1,
        parts.concat(),
    ))
}

static ENQUEUE_SCRIPT: LazyLock<Script> =
    LazyLock::new(|| script(&[LANE_PUSH, TENANT_COUNT, DRAIN], ENQUEUE));
static FETCH_SCRIPT: LazyLock<Script> = LazyLock::new(|| {
    script(
        &[
            LANE_PUSH,
            TENANT_COUNT,
            SUBJECTS,
            UNCOUNT,
            HOLDS,
            FETCH_JOBS,
        ],
        FETCH,
    )
});
static RECOVER_SCRIPT: LazyLock<Script> = LazyLock::new(|| script(&[], RECOVER));
static STEP_SCRIPT: LazyLock<Script> = LazyLock::new(|| {
    script(
        &[LANE_PUSH, TENANT_COUNT, DRAIN, PRUNE_DEAD, SUBJECTS],
        STEP,
    )
});
static COMPLETE_SCRIPT: LazyLock<Script> =
    LazyLock::new(|| script(&[TENANT_COUNT, DRAIN, SUBJECTS, COMPLETE_JOBS], COMPLETE));
static NEWEST_SCRIPT: LazyLock<Script> = LazyLock::new(|| script(&[], NEWEST));
static DEAD_LETTERS_SCRIPT: LazyLock<Script> =
    LazyLock::new(|| script(&[PRUNE_DEAD], DEAD_LETTERS));
static STATS_SCRIPT: LazyLock<Script> = LazyLock::new(|| script(&[PRUNE_DEAD], STATS));
static LEAVE_SCRIPT: LazyLock<Script> = LazyLock::new(|| script(&[HOLDS], LEAVE));

/// The Redis [`JobStore`]: each partition is a few keys sharing its hash tag (one cluster
/// slot), with one Redis Stream per priority lane read through a consumer group, and every
/// step is one Lua script (one round trip) on the server's clock.
///
/// - A job's record is a hash holding its state, attempt (the fencing token), lane, tenant,
///   payload, result and error; the lane streams hold just job numbers. A delivery is an entry
///   pending in the group: visibility is its idle time, so a fetch takes over the entries idle
///   for its visibility or longer (`XPENDING … IDLE`, then `XCLAIM`) that have also been idle
///   for the visibility their holder fetched with (kept per consumer), in every lane, not only
///   those it reads, longest idle first; `extend` resets the idle time. Finding them scans the
///   pending entries, so fetches look at most once per quarter of their visibility (the look
///   costs about the number of running jobs of the partition): a lapsed delivery is taken over
///   up to a quarter of the visibility after it lapsed. A look that finds as many as its fetch
///   takes lets the next fetch look again at once.
/// - `complete_many` completes a list of jobs in one script (500 at most; a longer list takes
///   several, and when one fails, the jobs of those before it get their own answers and only
///   the rest fail): the stream entries of each lane are acknowledged with one call, and the
///   counts written once. The entries older than both
///   the newest completed one and the oldest still pending are all acknowledged (the group
///   delivers in order), so one `XTRIM MINID` removes them; only the completed entries past
///   the oldest pending one are deleted by id. When a completed entry was not pending (its
///   lane was lost and made again), only the completed entries are deleted.
/// - A fetch marks each record it delivers with its token (`fetch_marked`; `fetch` marks 0),
///   in the write that marks the job running. `recover` finds a lost fetch's deliveries by
///   paging through the consumer's pending entries in every lane (it runs only after a failed
///   fetch), and delivers those still running there again, resetting their idle time.
/// - Delayed and retrying jobs wait in a sorted set by due time; each fetch moves up to 1,000
///   of those due to the end of their lanes.
/// - Unfinished records never expire; done and dead ones expire after their retention. Up to
///   10,000 dead letters are listed per partition (older ones stay readable by `status`).
/// - On Redis Cluster every partition key must carry a `{hash tag}`; one without is refused
///   with [`BackendErrorKind::Config`].
/// - A record whose fields are not what the store wrote, or a key of another type in its
///   place, yields [`BackendErrorKind::Corrupt`] (from `status`, a key of another type is
///   Redis' own error, [`BackendErrorKind::Command`]). A fetch stops at one: if it delivered
///   nothing yet, it takes the job off its lane (so it blocks nobody) and fails; otherwise it
///   answers what it delivered and leaves the corrupt job for the next fetch. No job is ever
///   delivered along with an error.
/// - The drain-rate buckets (`P:stats`) replaced by a key of another type read as empty and
///   are written afresh: they only estimate the drain rate, and no step fails on them.
#[derive(Clone, Debug)]
pub struct RedisJobStore {
    redis: Redis,
}

impl RedisJobStore {
    /// A job store on `redis`.
    pub fn new(redis: Redis) -> Self {
        Self { redis }
    }

    /// The partition's key, refused on a cluster when it has no hash tag (its keys would
    /// spread over slots).
    fn partition<'k>(&self, partition: &'k Key) -> Result<&'k [u8], BackendError> {
        let key = partition.as_bytes();
        if self.redis.is_cluster() && hash_tag(key).len() == key.len() {
            return Err(BackendError::with_detail(
                BackendErrorKind::Config,
                format!(
                    "job partition {:?} needs a {{hash tag}} on Redis Cluster",
                    key.escape_ascii().to_string()
                ),
            ));
        }
        Ok(key)
    }

    async fn step(
        &self,
        partition: &Key,
        number: JobNumber,
        attempt: u32,
        op: &str,
        args: &[&[u8]],
    ) -> Result<Fenced, BackendError> {
        let key = self.partition(partition)?;
        let mut invocation = STEP_SCRIPT.key(key);
        invocation
            .arg(number.to_string())
            .arg(attempt.to_string())
            .arg(op);
        for arg in args {
            invocation.arg(*arg);
        }
        let answer: i64 = self.redis.invoke(&invocation).await?;
        fenced(answer, number)
    }
}

/// A step's answer for job `number`: 1 applied, 0 rejected, -1 a corrupt record.
fn fenced(answer: i64, number: JobNumber) -> Result<Fenced, BackendError> {
    match answer {
        1 => Ok(Fenced::Applied),
        0 => Ok(Fenced::Rejected),
        -1 => Err(corrupt(format!(
            "job {number} has a corrupt record (lane, delivery or consumer) or its delivery is \
             missing from its lane"
        ))),
        other => Err(protocol(format!("the job step answered {other}"))),
    }
}

/// `duration` in whole ms, at least 1 ms and at most [`MAX_MS`], for a TTL.
fn ttl_millis(duration: Duration, what: &str) -> Result<String, BackendError> {
    if duration < Duration::from_millis(1) {
        return Err(BackendError::with_detail(
            BackendErrorKind::Config,
            format!("{what} {duration:?} must be at least 1 ms"),
        ));
    }
    Ok(clamped_millis(duration).to_string())
}

/// `duration` in ms, rounded up (so a non-zero delay stays non-zero), at most [`MAX_MS`].
fn delay_millis(duration: Duration) -> u64 {
    let ms = clamped_millis(duration);
    if Duration::from_millis(ms) < duration && ms < MAX_MS {
        ms + 1
    } else {
        ms
    }
}

fn clamped_millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).map_or(MAX_MS, |ms| ms.min(MAX_MS))
}

fn check_lane(lane: u8) -> Result<(), BackendError> {
    if lane < MAX_LANES {
        Ok(())
    } else {
        Err(BackendError::with_detail(
            BackendErrorKind::Config,
            format!("lane {lane} is not below {MAX_LANES}"),
        ))
    }
}

fn protocol(detail: impl Into<Box<str>>) -> BackendError {
    BackendError::with_detail(BackendErrorKind::Protocol, detail)
}

fn corrupt(detail: impl Into<Box<str>>) -> BackendError {
    BackendError::with_detail(BackendErrorKind::Corrupt, detail)
}

fn shape(value: &Value) -> &'static str {
    match value {
        Value::Nil => "nil",
        Value::Int(_) => "an integer",
        Value::BulkString(_) | Value::SimpleString(_) | Value::VerbatimString { .. } => "a string",
        Value::Array(_) | Value::Set(_) => "an array",
        Value::ServerError(_) => "an error",
        _ => "an unexpected value",
    }
}

fn array(value: Value, what: &str) -> Result<Vec<Value>, BackendError> {
    match value {
        Value::Array(items) => Ok(items),
        other => Err(protocol(format!(
            "{what}: expected an array, got {}",
            shape(&other)
        ))),
    }
}

/// A whole number from an integer reply or decimal digits; `error` makes the failure.
fn whole(value: &Value, error: impl FnOnce(String) -> BackendError) -> Result<u64, BackendError> {
    let parsed = match value {
        Value::Int(i) => u64::try_from(*i).ok(),
        Value::BulkString(bytes) => std::str::from_utf8(bytes).ok().and_then(|s| s.parse().ok()),
        Value::SimpleString(s) => s.parse().ok(),
        _ => None,
    };
    parsed.ok_or_else(|| {
        error(match value {
            Value::BulkString(bytes) => format!("{:?}", bytes.escape_ascii().to_string()),
            other => shape(other).to_owned(),
        })
    })
}

fn reply_number(value: &Value, what: &str) -> Result<u64, BackendError> {
    whole(value, |got| {
        protocol(format!("{what}: expected a number, got {got}"))
    })
}

fn stored_number(value: &Value, what: &str) -> Result<u64, BackendError> {
    whole(value, |got| {
        corrupt(format!("{what} is not a number: {got}"))
    })
}

fn bytes(value: Value, what: &str) -> Result<Option<Bytes>, BackendError> {
    match value {
        Value::Nil => Ok(None),
        Value::BulkString(bytes) => Ok(Some(Bytes::from(bytes))),
        Value::SimpleString(text) => Ok(Some(Bytes::from(text))),
        other => Err(protocol(format!(
            "{what}: expected bytes, got {}",
            shape(&other)
        ))),
    }
}

fn text(value: &Value) -> String {
    match value {
        Value::BulkString(bytes) => bytes.escape_ascii().to_string(),
        Value::SimpleString(text) => text.clone(),
        other => shape(other).to_owned(),
    }
}

fn state(code: &[u8]) -> Option<JobState> {
    Some(match code {
        b"q" => JobState::Queued,
        b"r" => JobState::Running,
        b"y" => JobState::Retrying,
        b"d" => JobState::Done,
        b"x" => JobState::Dead,
        _ => return None,
    })
}

/// The answers of a completion script for `jobs`, in order.
fn parse_completed(reply: Value, jobs: &[Completion]) -> Result<Completed, BackendError> {
    let reply = array(reply, "complete")?;
    if reply.len() != jobs.len() {
        return Err(protocol(format!(
            "the completion of {} jobs answered {}",
            jobs.len(),
            reply.len()
        )));
    }
    Ok(reply
        .iter()
        .zip(jobs)
        .map(|(answer, job)| match answer {
            Value::Int(answer) => fenced(*answer, job.number),
            other => Err(protocol(format!(
                "the completion answered {}",
                shape(other)
            ))),
        })
        .collect())
}

/// The deliveries of a fetch script, or the corrupt records it met.
fn parse_fetched(
    key: &[u8],
    deliveries: Value,
    corrupted: Value,
) -> Result<Vec<Delivery>, BackendError> {
    let values = array(deliveries, "fetch")?;
    if values.len() % 8 != 0 {
        return Err(protocol("fetch: deliveries of other than 8 fields"));
    }
    let mut values = values.into_iter();
    let mut deliveries = Vec::with_capacity(values.len() / 8);
    while values.len() > 0 {
        let fields = std::array::from_fn(|_| values.next().unwrap_or(Value::Nil));
        deliveries.push(parse_delivery(fields)?);
    }
    let corrupted = array(corrupted, "fetch")?;
    if !corrupted.is_empty() {
        let names: Vec<String> = corrupted.iter().map(text).collect();
        return Err(corrupt(format!(
            "corrupt job records in partition {:?} ({}), taken off their lanes",
            key.escape_ascii().to_string(),
            names.join(", "),
        )));
    }
    Ok(deliveries)
}

fn parse_delivery(fields: [Value; 8]) -> Result<Delivery, BackendError> {
    const WHAT: &str = "a fetched job";
    let [
        number,
        attempt,
        lane,
        payload,
        tenant,
        enqueued,
        taken,
        handed_back,
    ] = fields;
    let number = reply_number(&number, WHAT)?;
    let attempt = u32::try_from(reply_number(&attempt, WHAT)?)
        .map_err(|_| corrupt(format!("job {number} has an attempt beyond u32")))?;
    let lane = reply_number(&lane, WHAT)?;
    let lane = u8::try_from(lane)
        .ok()
        .filter(|lane| *lane < MAX_LANES)
        .ok_or_else(|| protocol(format!("{WHAT}: lane {lane}")))?;
    Ok(Delivery {
        number,
        attempt,
        lane,
        payload: bytes(payload, WHAT)?.unwrap_or_default(),
        tenant: bytes(tenant, WHAT)?,
        enqueued_at_ms: reply_number(&enqueued, WHAT)?,
        taken_over: reply_number(&taken, WHAT)? == 1,
        // The store counts only deliveries before this one; a count it did not write reads
        // as none, so every delivery is charged.
        handed_back: u32::try_from(reply_number(&handed_back, WHAT)?)
            .ok()
            .filter(|&n| n < attempt)
            .unwrap_or(0),
    })
}

/// The fields `status` reads, in order.
const RECORD_FIELDS: [&str; 8] = ["s", "a", "l", "e", "t", "p", "res", "err"];

fn parse_record(number: JobNumber, fields: Vec<Value>) -> Result<Option<JobRecord>, BackendError> {
    let Ok([s, a, l, e, t, p, res, err]) = <[Value; 8]>::try_from(fields) else {
        return Err(protocol("HMGET answered the wrong number of fields"));
    };
    if [&s, &a, &l, &e, &t, &p, &res, &err]
        .iter()
        .all(|v| matches!(v, Value::Nil))
    {
        return Ok(None);
    }
    let what = |field: &str| format!("the {field} of job {number}");
    let state = match &s {
        Value::BulkString(code) => state(code),
        _ => None,
    }
    .ok_or_else(|| corrupt(format!("{} is {}", what("state"), text(&s))))?;
    let attempt = u32::try_from(stored_number(&a, &what("attempt"))?)
        .map_err(|_| corrupt(format!("{} is beyond u32", what("attempt"))))?;
    let lane = u8::try_from(stored_number(&l, &what("lane"))?)
        .ok()
        .filter(|lane| *lane < MAX_LANES)
        .ok_or_else(|| corrupt(format!("{} is {}", what("lane"), text(&l))))?;
    // A completion empties the payload field instead of removing it (one call fewer).
    let payload = match state {
        JobState::Done => None,
        _ => bytes(p, "a job's payload")?,
    };
    Ok(Some(job_record(
        state,
        attempt,
        lane,
        stored_number(&e, &what("enqueue time"))?,
        bytes(t, "a job's tenant")?,
        payload,
        bytes(res, "a job's result")?,
        bytes(err, "a job's error")?,
    )))
}

#[allow(clippy::too_many_arguments)]
fn job_record(
    state: JobState,
    attempt: u32,
    lane: u8,
    enqueued_at_ms: u64,
    tenant: Option<Bytes>,
    payload: Option<Bytes>,
    result: Option<Bytes>,
    error: Option<Bytes>,
) -> JobRecord {
    JobRecord {
        state,
        attempt,
        lane,
        enqueued_at_ms,
        tenant,
        payload,
        result,
        error,
    }
}

impl JobStore for RedisJobStore {
    async fn enqueue(
        &self,
        partition: &Key,
        job: &NewJob,
        limits: &EnqueueLimits,
    ) -> Result<Enqueued, BackendError> {
        check_lane(job.lane)?;
        // Ranks are compared as Lua numbers, exact up to 2^53.
        if job.subject_rank > 1 << 53 {
            return Err(BackendError::with_detail(
                BackendErrorKind::Config,
                format!("subject rank {} is above 2^53", job.subject_rank),
            ));
        }
        let key = self.partition(partition)?;
        let dedup_window = match &job.dedup_key {
            Some(_) => ttl_millis(limits.dedup_window, "the dedup window")?,
            None => String::new(),
        };
        let flag = |present: bool| if present { "1" } else { "0" };
        let mut invocation = ENQUEUE_SCRIPT.key(key);
        invocation
            .arg(job.lane.to_string())
            .arg(delay_millis(job.delay).to_string())
            .arg(&job.payload[..])
            .arg(flag(job.tenant.is_some()))
            .arg(job.tenant.as_deref().unwrap_or_default())
            .arg(flag(job.dedup_key.is_some()))
            .arg(job.dedup_key.as_deref().unwrap_or_default())
            .arg(dedup_window)
            .arg(limits.max_len.to_string())
            .arg(
                limits
                    .max_per_tenant
                    .map(|max| max.to_string())
                    .unwrap_or_default(),
            )
            .arg(flag(job.subject.is_some()))
            .arg(job.subject.as_deref().unwrap_or_default())
            .arg(job.subject_rank.to_string());
        let reply = array(self.redis.invoke(&invocation).await?, "enqueue")?;
        match reply.as_slice() {
            [Value::BulkString(code), number] if code == b"a" => {
                Ok(Enqueued::Added(reply_number(number, "enqueue")?))
            }
            [Value::BulkString(code), number] if code == b"d" => Ok(Enqueued::Duplicate(
                stored_number(number, "the job number of a dedup key")?,
            )),
            [Value::BulkString(code), tenant, depth, rate, unfinished] if code == b"f" => {
                let rate = match rate {
                    Value::BulkString(text) => std::str::from_utf8(text)
                        .ok()
                        .and_then(|text| text.parse::<f64>().ok()),
                    _ => None,
                }
                .filter(|rate| rate.is_finite() && *rate >= 0.0)
                .ok_or_else(|| protocol("enqueue answered a drain rate that is not a number"))?;
                Ok(Enqueued::Full {
                    tenant: reply_number(tenant, "enqueue")? == 1,
                    depth: reply_number(depth, "enqueue")?,
                    drained_per_sec: rate,
                    unfinished: reply_number(unfinished, "enqueue")?,
                })
            }
            [Value::BulkString(code), what] if code == b"c" => Err(corrupt(format!(
                "the {} of the partition is not a number",
                text(what)
            ))),
            _ => Err(protocol("enqueue answered an unexpected reply")),
        }
    }

    async fn fetch(
        &self,
        partition: &Key,
        request: FetchRequest<'_>,
    ) -> Result<Vec<Delivery>, BackendError> {
        self.fetch_marked(partition, request, 0).await
    }

    async fn fetch_marked(
        &self,
        partition: &Key,
        request: FetchRequest<'_>,
        token: u64,
    ) -> Result<Vec<Delivery>, BackendError> {
        for &lane in request.lanes {
            check_lane(lane)?;
        }
        let key = self.partition(partition)?;
        let max = u32::try_from(request.max).unwrap_or(u32::MAX);
        let mut invocation = FETCH_SCRIPT.key(key);
        invocation
            .arg(request.consumer)
            .arg(max.to_string())
            .arg(clamped_millis(request.visibility).to_string())
            .arg(token);
        for lane in request.lanes {
            invocation.arg(lane.to_string());
        }
        let reply = array(self.redis.invoke(&invocation).await?, "fetch")?;
        let Ok([deliveries, corrupted]) = <[Value; 2]>::try_from(reply) else {
            return Err(protocol("fetch answered an unexpected reply"));
        };
        parse_fetched(key, deliveries, corrupted)
    }

    async fn recover(
        &self,
        partition: &Key,
        consumer: &str,
        token: u64,
        max: usize,
    ) -> Result<Vec<Delivery>, BackendError> {
        let key = self.partition(partition)?;
        if token == 0 || max == 0 {
            return Ok(Vec::new());
        }
        let max = u32::try_from(max).unwrap_or(u32::MAX);
        let mut invocation = RECOVER_SCRIPT.key(key);
        invocation.arg(consumer).arg(token).arg(max);
        let reply = array(self.redis.invoke(&invocation).await?, "recover")?;
        let Ok([deliveries, corrupted]) = <[Value; 2]>::try_from(reply) else {
            return Err(protocol("recover answered an unexpected reply"));
        };
        parse_fetched(key, deliveries, corrupted)
    }

    async fn extend(
        &self,
        partition: &Key,
        number: JobNumber,
        attempt: u32,
    ) -> Result<Fenced, BackendError> {
        self.step(partition, number, attempt, "extend", &[]).await
    }

    async fn complete(
        &self,
        partition: &Key,
        number: JobNumber,
        attempt: u32,
        result: Bytes,
        retention: Duration,
    ) -> Result<Fenced, BackendError> {
        let job = Completion {
            number,
            attempt,
            result,
        };
        self.complete_many(partition, std::slice::from_ref(&job), retention)
            .await?
            .pop()
            .unwrap_or_else(|| Err(protocol("the completion answered nothing")))
    }

    async fn complete_many(
        &self,
        partition: &Key,
        jobs: &[Completion],
        retention: Duration,
    ) -> Result<Completed, BackendError> {
        let retention = ttl_millis(retention, "retention")?;
        let key = self.partition(partition)?;
        let mut answers = Vec::with_capacity(jobs.len());
        for part in jobs.chunks(MAX_COMPLETIONS_PER_CALL) {
            let mut invocation = COMPLETE_SCRIPT.key(key);
            invocation.arg(retention.as_bytes());
            for job in part {
                invocation
                    .arg(job.number.to_string())
                    .arg(job.attempt.to_string())
                    .arg(&job.result[..]);
            }
            let reply = self.redis.invoke(&invocation).await;
            match reply.and_then(|reply| parse_completed(reply, part)) {
                Ok(part_answers) => answers.extend(part_answers),
                Err(failed) if answers.is_empty() => return Err(failed),
                // The calls before ran: answer for their jobs, and fail only the jobs of this
                // call and of those never sent.
                Err(failed) => {
                    let detail = format!(
                        "not completed: the call that carried this job, or one before it, \
                         failed: {failed}"
                    );
                    answers.resize_with(jobs.len(), || {
                        Err(BackendError::with_detail(failed.kind(), detail.as_str()))
                    });
                    break;
                }
            }
        }
        Ok(answers)
    }

    async fn retry(
        &self,
        partition: &Key,
        number: JobNumber,
        attempt: u32,
        delay: Duration,
        error: Bytes,
    ) -> Result<Fenced, BackendError> {
        let delay = delay_millis(delay).to_string();
        self.step(
            partition,
            number,
            attempt,
            "retry",
            &[delay.as_bytes(), &error],
        )
        .await
    }

    async fn release(
        &self,
        partition: &Key,
        number: JobNumber,
        attempt: u32,
        error: Bytes,
    ) -> Result<Fenced, BackendError> {
        self.step(partition, number, attempt, "release", &[b"0", &error])
            .await
    }

    async fn bury(
        &self,
        partition: &Key,
        number: JobNumber,
        attempt: u32,
        error: Bytes,
        retention: Duration,
    ) -> Result<Fenced, BackendError> {
        let retention = ttl_millis(retention, "retention")?;
        self.step(
            partition,
            number,
            attempt,
            "bury",
            &[&error, retention.as_bytes()],
        )
        .await
    }

    async fn status(
        &self,
        partition: &Key,
        number: JobNumber,
    ) -> Result<Option<JobRecord>, BackendError> {
        let key = self.partition(partition)?;
        let mut record = key.to_vec();
        record.extend_from_slice(format!(":j:{number}").as_bytes());
        let fields: Vec<Value> = self
            .redis
            .query(redis::cmd("HMGET").arg(record).arg(&RECORD_FIELDS[..]))
            .await?;
        parse_record(number, fields)
    }

    async fn newest_of(
        &self,
        partition: &Key,
        subject: &[u8],
    ) -> Result<Option<(JobNumber, Bytes)>, BackendError> {
        let key = self.partition(partition)?;
        let reply: Value = self
            .redis
            .invoke(NEWEST_SCRIPT.key(key).arg(subject))
            .await?;
        match reply {
            Value::Nil => Ok(None),
            Value::Array(fields) => match <[Value; 2]>::try_from(fields) {
                Ok([number, payload]) => Ok(Some((
                    stored_number(&number, "the newest job of a subject")?,
                    bytes(payload, "the payload of a subject's newest job")?.unwrap_or_default(),
                ))),
                Err(_) => Err(protocol("newest_of answered an unexpected reply")),
            },
            _ => Err(protocol("newest_of answered an unexpected reply")),
        }
    }

    async fn leave(&self, partition: &Key, consumer: &str) -> Result<(), BackendError> {
        let key = self.partition(partition)?;
        let _: i64 = self
            .redis
            .invoke(LEAVE_SCRIPT.key(key).arg(consumer))
            .await?;
        Ok(())
    }

    async fn dead_letters(
        &self,
        partition: &Key,
        max: usize,
    ) -> Result<Vec<JobNumber>, BackendError> {
        let key = self.partition(partition)?;
        if max == 0 {
            return Ok(Vec::new());
        }
        let max = max.min(MAX_DEAD_LETTERS);
        let reply = array(
            self.redis
                .invoke(DEAD_LETTERS_SCRIPT.key(key).arg(max.to_string()))
                .await?,
            "dead_letters",
        )?;
        reply
            .iter()
            .map(|number| stored_number(number, "a dead letter's job number"))
            .collect()
    }

    async fn stats(&self, partition: &Key) -> Result<PartitionStats, BackendError> {
        let key = self.partition(partition)?;
        let reply = array(self.redis.invoke(&STATS_SCRIPT.key(key)).await?, "stats")?;
        let Ok([unfinished, ready, running, delayed, oldest, dead]) = <[Value; 6]>::try_from(reply)
        else {
            return Err(protocol("stats answered an unexpected reply"));
        };
        let mut stats = PartitionStats::default();
        stats.unfinished = match unfinished {
            Value::Nil => 0,
            other => stored_number(&other, "the unfinished count of the partition")?,
        };
        stats.ready = reply_number(&ready, "stats")?;
        stats.running = reply_number(&running, "stats")?;
        stats.delayed = reply_number(&delayed, "stats")?;
        stats.oldest_ready_ms = match oldest {
            Value::Nil => None,
            other => Some(reply_number(&other, "stats")?),
        };
        stats.dead = reply_number(&dead, "stats")?;
        Ok(stats)
    }
}
