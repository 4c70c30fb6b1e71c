//! The Lua scripts that do every write, each atomic: a publish assigns ids,
//! appends to the history streams, trims them, advances the partition's feed
//! sequence, logs and publishes the feed payload, and records the
//! idempotency answer, all or nothing. Every argument is checked before the
//! first write, because a script that fails half-way keeps what it wrote.
//!
//! Numbers pass through Lua as doubles: exact up to 2^53, well above any id
//! (a floor is milliseconds x 1000, about 1.8e15 in 2026), and printed with
//! `%d` (Lua's `tostring` switches to exponent form at 1e14).

use std::sync::LazyLock;

use redis::Script;

/// The publish script. KEYS: the idempotency key, then per partition group
/// its record, heads, origins, names and log, then one stream per message.
/// ARGV: now (ms), lossy ("1": a Redis restart may have lost writes),
/// fingerprint ("" without a key), idempotency ttl (ms), the number of
/// groups G and of messages N, the log's length, sharded ("1": SPUBLISH);
/// then per group its feed channel and whether this node saw it before
/// ("1"); then per message its group (1-based), channel, event, kind, data,
/// properties, history size and age limit (ms, 0 none).
///
/// Answers `{"ok", id, time, id, time, ...}` in message order,
/// `{"replay", "id,id,..."}` for a key already answered, or `{"conflict"}`.
const PUBLISH: &str = r#"
local now, lossy, fp = tonumber(ARGV[1]), ARGV[2] == '1', ARGV[3]
local ttl, G, N, loglen = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local sharded = ARGV[8] == '1'
if not (now and ttl and G and N and loglen) or G < 1 or N < 1 then
  return redis.error_reply('ERR herald publish: bad arguments')
end
if #KEYS ~= 1 + 5 * G + N or #ARGV ~= 8 + 2 * G + 8 * N then
  return redis.error_reply('ERR herald publish: wrong number of arguments')
end
local m0 = 8 + 2 * G
for i = 0, N - 1 do
  local b = m0 + i * 8 + 1
  local g, size, age = tonumber(ARGV[b]), tonumber(ARGV[b + 6]), tonumber(ARGV[b + 7])
  if not (g and size and age) or g < 1 or g > G or tonumber(ARGV[b + 3]) == nil then
    return redis.error_reply('ERR herald publish: bad message ' .. (i + 1))
  end
end

if fp ~= '' then
  local prior = redis.call('GET', KEYS[1])
  if prior then
    local bar = string.find(prior, '|', 1, true)
    if not bar or string.sub(prior, 1, bar - 1) ~= fp then return {'conflict'} end
    return {'replay', string.sub(prior, bar + 1)}
  end
end

local function ns(s) return #s .. ':' .. s end
local function int(n) return string.format('%d', n) end

-- Which Redis process this is: a new run id means Redis restarted (or
-- failed over). Where that may have lost writes, ids go on from a floor
-- above any id handed out before (ms x 1000 of Redis's clock), never reused.
local run = string.match(redis.call('INFO', 'server'), 'run_id:(%x+)') or ''
local t = redis.call('TIME')
local clock_floor = tonumber(t[1]) * 1000000 + math.floor(tonumber(t[2]) / 1000) * 1000

local floors, qs, times, bodies = {}, {}, {}, {}
for g = 1, G do
  local k = 1 + (g - 1) * 5
  local st = redis.call('HMGET', KEYS[k + 1], 'q', 'floor', 'run', 't')
  local floor = tonumber(st[2]) or 0
  if not st[3] then
    -- A partition never written, or one Redis lost whole: a node that saw
    -- it before knows which.
    if ARGV[8 + (g - 1) * 2 + 2] == '1' then floor = math.max(floor, clock_floor) end
    redis.call('HSET', KEYS[k + 1], 'run', run, 'floor', int(floor))
  elseif st[3] ~= run then
    if lossy then floor = math.max(floor, clock_floor) end
    redis.call('HSET', KEYS[k + 1], 'run', run, 'floor', int(floor))
  end
  floors[g], qs[g], times[g], bodies[g] = floor, tonumber(st[1]) or 0, math.max(now, tonumber(st[4]) or 0), {}
end

local heads, answer = {}, {'ok'}
for i = 0, N - 1 do
  local b = m0 + i * 8 + 1
  local g, ch, ev, kind, data, meta = tonumber(ARGV[b]), ARGV[b + 1], ARGV[b + 2], ARGV[b + 3], ARGV[b + 4], ARGV[b + 5]
  local size, age = tonumber(ARGV[b + 6]), tonumber(ARGV[b + 7])
  local k = 1 + (g - 1) * 5
  local stream = KEYS[1 + 5 * G + i + 1]
  local head = heads[ch]
  if not head then
    head = tonumber(redis.call('HGET', KEYS[k + 2], ch))
    if not head then
      head = 0
      redis.call('ZADD', KEYS[k + 4], 0, ch)
    end
  end
  if head < floors[g] then
    -- Begins (again) past the floor: readers from 0 start at the origin.
    head = floors[g]
    redis.call('HSET', KEYS[k + 3], ch, int(head))
  end
  local id, tm = head + 1, times[g]
  heads[ch] = id
  redis.call('HSET', KEYS[k + 2], ch, int(id))
  if size > 0 then
    local f = {'XADD', stream, 'MAXLEN', int(size), int(id) .. '-0', 'k', kind, 't', int(tm), 'd', data}
    if ev ~= '' then f[#f + 1] = 'e'; f[#f + 1] = ev end
    if meta ~= '' then f[#f + 1] = 'm'; f[#f + 1] = meta end
    redis.call(unpack(f))
    -- Entries are in time order: when the oldest has expired, drop the
    -- expired ones from the front (most publishes look at one entry only).
    local oldest = age > 0 and redis.call('XRANGE', stream, '-', '+', 'COUNT', 1)[1]
    if oldest and tonumber(oldest[2][4]) < tm - age then
      local cutoff, keep = tm - age, nil
      local old = redis.call('XRANGE', stream, '-', '+', 'COUNT', 64)
      for _, e in ipairs(old) do
        if tonumber(e[2][4]) >= cutoff then keep = e[1]; break end
      end
      if keep then
        redis.call('XTRIM', stream, 'MINID', keep)
      elseif #old > 0 then
        -- All 64 expired (the new entry is not among them): drop those,
        -- the rest go with later publishes; reads skip expired ones.
        redis.call('XTRIM', stream, 'MINID', int(tonumber(string.match(old[#old][1], '^(%d+)')) + 1) .. '-0')
      end
    end
  elseif redis.call('EXISTS', stream) == 1 then
    redis.call('DEL', stream)
  end
  local body = bodies[g]
  body[#body + 1] = ns(ch) .. ns(int(id)) .. ns(ev) .. ns(kind) .. ns(int(tm)) .. ns(data) .. ns(meta)
  answer[#answer + 1] = id
  answer[#answer + 1] = tm
end

local ids = {}
for i = 2, #answer, 2 do ids[#ids + 1] = int(answer[i]) end
for g = 1, G do
  if #bodies[g] > 0 then
    local k = 1 + (g - 1) * 5
    local q = qs[g] + 1
    redis.call('HSET', KEYS[k + 1], 'q', int(q), 't', int(times[g]))
    local payload = ns('M') .. ns(int(q)) .. table.concat(bodies[g])
    redis.call('XADD', KEYS[k + 5], 'MAXLEN', '~', int(loglen), int(q) .. '-0', 'p', payload)
    redis.call(sharded and 'SPUBLISH' or 'PUBLISH', ARGV[8 + (g - 1) * 2 + 1], payload)
  end
end
if fp ~= '' then
  redis.call('SET', KEYS[1], fp .. '|' .. table.concat(ids, ','), 'PX', int(ttl))
end
return answer
"#;

/// A signal, or a broker record written with its announcement. KEYS: the
/// partition's record and log, and the records hash (unused for a bare
/// signal). ARGV: the feed channel, the log's length, sharded, the signal's
/// fields (kind, key, body, already framed), then the op (`sig`, `put`,
/// `del`), the record's field and value.
const SIGNAL: &str = r#"
local loglen, sharded, op = tonumber(ARGV[2]), ARGV[3] == '1', ARGV[5]
if not loglen or #KEYS ~= 3 or #ARGV ~= 7 or (op ~= 'sig' and op ~= 'put' and op ~= 'del') then
  return redis.error_reply('ERR herald signal: bad arguments')
end
local function ns(s) return #s .. ':' .. s end
local q = (tonumber(redis.call('HGET', KEYS[1], 'q')) or 0) + 1
local qs = string.format('%d', q)
redis.call('HSET', KEYS[1], 'q', qs)
if op == 'put' then redis.call('HSET', KEYS[3], ARGV[6], ARGV[7]) end
if op == 'del' then redis.call('HDEL', KEYS[3], ARGV[6]) end
local payload = ns('S') .. ns(qs) .. ARGV[4]
redis.call('XADD', KEYS[2], 'MAXLEN', '~', string.format('%d', loglen), qs .. '-0', 'p', payload)
redis.call(sharded and 'SPUBLISH' or 'PUBLISH', ARGV[1], payload)
return q
"#;

/// One channel's window and the messages after a cursor. KEYS: heads,
/// origins, stream. ARGV: channel, after, limit, the age cutoff (ms; 0 for
/// none) and the history size. Answers `{head, first, origin, entries}`.
const READ: &str = r#"#!lua flags=no-writes
local ch, after, limit, cutoff, size = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local head = tonumber(redis.call('HGET', KEYS[1], ch)) or 0
local origin = tonumber(redis.call('HGET', KEYS[2], ch)) or 0
local first = head + 1
local from = '-'
while true do
  local page = redis.call('XRANGE', KEYS[3], from, '+', 'COUNT', 64)
  local found = false
  for _, e in ipairs(page) do
    if tonumber(e[2][4]) >= cutoff then
      first = tonumber(string.match(e[1], '^(%d+)'))
      found = true
      break
    end
  end
  if found or #page < 64 then break end
  from = '(' .. page[#page][1]
end
-- The stream keeps `size` entries (trimmed at each publish); a size
-- lowered since shows before the next publish trims.
local len = redis.call('XLEN', KEYS[3])
if len > size then
  local over = redis.call('XRANGE', KEYS[3], '-', '+', 'COUNT', len - size + 1)
  local id = tonumber(string.match(over[#over][1], '^(%d+)'))
  if size == 0 then first = head + 1 elseif id > first then first = id end
end
local start = math.max(after, first - 1, 0)
local entries = {}
if limit > 0 and start < head then
  entries = redis.call('XRANGE', KEYS[3], '(' .. string.format('%d', start) .. '-0', '+', 'COUNT', limit)
end
return {head, first, origin, entries}
"#;

/// Read marks merged in place. KEYS: the user's read state hash. ARGV: per
/// mark its channel, `all` or `ids`, and the head or the ids
/// (comma-separated). The state's text form is `upto,id,id,...` (ids above
/// `upto`, sorted). Answers the merged state of each marked channel.
const MARK_READ: &str = r#"
if #ARGV % 3 ~= 0 or #KEYS ~= 1 then return redis.error_reply('ERR herald mark: bad arguments') end
for i = 1, #ARGV, 3 do
  if ARGV[i + 1] ~= 'all' and ARGV[i + 1] ~= 'ids' then return redis.error_reply('ERR herald mark: bad mark') end
  for n in string.gmatch(ARGV[i + 2], '[^,]+') do
    if not tonumber(n) then return redis.error_reply('ERR herald mark: bad id') end
  end
end
local out = {}
for i = 1, #ARGV, 3 do
  local ch = ARGV[i]
  local upto, ids = 0, {}
  local cur = redis.call('HGET', KEYS[1], ch)
  if cur then
    local first = true
    for n in string.gmatch(cur, '[^,]+') do
      if first then upto = tonumber(n); first = false else ids[tonumber(n)] = true end
    end
  end
  if ARGV[i + 1] == 'all' then
    upto = math.max(upto, tonumber(ARGV[i + 2]))
  else
    for n in string.gmatch(ARGV[i + 2], '[^,]+') do
      local id = tonumber(n)
      if id > upto then ids[id] = true end
    end
  end
  while ids[upto + 1] do ids[upto + 1] = nil; upto = upto + 1 end
  local sorted = {}
  for id, _ in pairs(ids) do if id > upto then sorted[#sorted + 1] = id end end
  table.sort(sorted)
  local text = {string.format('%d', upto)}
  for _, id in ipairs(sorted) do text[#text + 1] = string.format('%d', id) end
  local state = table.concat(text, ',')
  redis.call('HSET', KEYS[1], ch, state)
  out[#out + 1] = ch
  out[#out + 1] = state
end
return out
"#;

pub(crate) static PUBLISH_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(PUBLISH));
pub(crate) static SIGNAL_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(SIGNAL));
pub(crate) static READ_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(READ));
pub(crate) static MARK_READ_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(MARK_READ));
