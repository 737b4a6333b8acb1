"""Lua scripts of the Redis quota store: one round trip to admit, one to settle, one per live charge.

Admission checks every (limit, dimension) item of a request and consumes all of them only when
every enforced item passes. Time comes from Redis (``TIME``), never from pod clocks.

Each item uses two KEYS (the second only for tokens and budgets) and four ARGV values:
``dimension code, limit value, shadow flag, extra`` (extra: the refill rate for burst buckets, the
subject for budgets, '' for route-scoped ones). The ARGV head is ``lease id, tokens, lease
microseconds, item count, cost`` (cost: the reserved micro-units of cost budgets).

Data structures, all under the route's hash tag so one admission touches one Cluster slot:
- requests per minute / hour: a sorted set of admitted request ids scored by admission time — a
  sliding log, exact: at most N entries in any window;
- tokens per minute: the same sliding log plus a hash of each entry's charge and the running total
  (field ``_total``); settlement rewrites an entry's charge in place;
- concurrent requests: a sorted set of lease ids scored by lease expiry;
- burst: a token bucket hash (``tokens``, ``ts``);
- day / month budgets (tokens or cost): a hash per subject holding the window id ``w``, the window's
  total ``u`` and one field per unsettled lease (its charge), expiring a minute after the window's
  end (UTC calendar windows, ``WINDOW_LUA``); the first admission of a new window starts it afresh.
  Settlement adds (actual - charged) to ``u`` when the lease's field is still there in the window it
  was charged in (idempotent: the field is removed). Beside it, per limit and dimension, a sorted set
  of each subject's spend in the window (member ``_w`` scored ``-window id`` marks the window), read
  by the operator for status.budgets' top consumers.
"""

from __future__ import annotations

DIMENSION_CODES = {
    "requestsPerMinute": 1,
    "requestsPerHour": 2,
    "tokensPerMinute": 3,
    "concurrentRequests": 4,
    "burst": 5,
    "tokensPerDay": 6,
    "tokensPerMonth": 7,
    "costPerDay": 8,
    "costPerMonth": 9,
}

#: Budget keys live this long past their window's end (milliseconds).
BUDGET_GRACE_MS = 60_000

#: UTC calendar windows from a time in microseconds: day id, day end, month id, month end (us).
#: Mirrors ``windows.py`` (Hinnant's civil-date algorithms).
WINDOW_LUA = r"""
local function days_from_civil(y, m, d)
  if m <= 2 then y = y - 1 end
  local era = math.floor(y / 400)
  local yoe = y - era * 400
  local mm = m + 9
  if m > 2 then mm = m - 3 end
  local doy = math.floor((153 * mm + 2) / 5) + d - 1
  local doe = yoe * 365 + math.floor(yoe / 4) - math.floor(yoe / 100) + doy
  return era * 146097 + doe - 719468
end

local function windows(now_us)
  local days = math.floor(math.floor(now_us / 1000000) / 86400)
  local z = days + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local leap = math.floor(doe / 1460) - math.floor(doe / 36524) + math.floor(doe / 146096)
  local yoe = math.floor((doe - leap) / 365)
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local m = mp - 9
  if mp < 10 then m = mp + 3 end
  local y = yoe + era * 400
  if m <= 2 then y = y + 1 end
  local ny, nm = y, m + 1
  if m == 12 then ny, nm = y + 1, 1 end
  return days, (days + 1) * 86400000000, y * 12 + m - 1, days_from_civil(ny, nm, 1) * 86400000000
end
"""

#: Evaluates ``windows(ARGV[1])`` (tests compare it with ``windows.py``).
WINDOWS_PROBE = WINDOW_LUA + "return {windows(tonumber(ARGV[1]))}"

ADMIT = (
    WINDOW_LUA
    + r"""
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local lease_id = ARGV[1]
local tokens = tonumber(ARGV[2])
local lease_us = tonumber(ARGV[3])
local n = tonumber(ARGV[4])
local cost = tonumber(ARGV[5])
local GRACE_MS = 60000 -- BUDGET_GRACE_MS
local MINUTE = 60000000
local HOUR = 3600000000
local day, day_end, month, month_end
local out = {0, now}
local state = {}
local admitted = 1

local function prune_log(key, window)
  redis.call('ZREMRANGEBYSCORE', key, '-inf', '(' .. (now - window))
end

-- Expired entries leave in chunks: Lua's unpack() takes at most ~8,000 values, and a quiet minute
-- after a busy one can expire tens of thousands at once. Each entry is pruned once (amortised O(1)).
local CHUNK = 1000
local function prune_tokens(key, hkey, window)
  local cut = '(' .. (now - window)
  while true do
    local expired = redis.call('ZRANGEBYSCORE', key, '-inf', cut, 'LIMIT', 0, CHUNK)
    if #expired == 0 then break end
    local costs = redis.call('HMGET', hkey, unpack(expired))
    local freed = 0
    for i = 1, #costs do freed = freed + (tonumber(costs[i]) or 0) end
    redis.call('HDEL', hkey, unpack(expired))
    redis.call('ZREMRANGEBYRANK', key, 0, #expired - 1)
    redis.call('HINCRBY', hkey, '_total', -freed)
    if #expired < CHUNK then break end
  end
  return tonumber(redis.call('HGET', hkey, '_total') or '0')
end

-- When enough of the log's charges, oldest first, leave the window for ``tokens`` to fit (read in chunks).
local function tokens_retry(key, hkey, total, limit)
  local used = total
  local start = 0
  while true do
    local entries = redis.call('ZRANGE', key, start, start + 127, 'WITHSCORES')
    if #entries == 0 then return MINUTE end
    local ids = {}
    for j = 1, #entries, 2 do ids[#ids + 1] = entries[j] end
    local costs = redis.call('HMGET', hkey, unpack(ids))
    for j = 1, #ids do
      used = used - (tonumber(costs[j]) or 0)
      if used + tokens <= limit then return tonumber(entries[2 * j]) + MINUTE - now end
    end
    start = start + 128
  end
end

for i = 1, n do
  local key = KEYS[2 * i - 1]
  local hkey = KEYS[2 * i]
  local base = 5 + (i - 1) * 4
  local dim = tonumber(ARGV[base + 1])
  local limit = tonumber(ARGV[base + 2])
  local shadow = tonumber(ARGV[base + 3])
  local extra = ARGV[base + 4]
  local pass, remaining, retry, reset = 1, 0, 0, 0
  if dim == 1 or dim == 2 then
    local window = (dim == 1) and MINUTE or HOUR
    prune_log(key, window)
    local count = redis.call('ZCARD', key)
    if count + 1 > limit then
      pass = 0
      remaining = limit - count
      if limit <= 0 then
        retry = window
      else
        local k = count - limit
        local entry = redis.call('ZRANGE', key, k, k, 'WITHSCORES')
        retry = tonumber(entry[2]) + window - now
      end
    else
      remaining = limit - count - 1
    end
    if pass == 1 then
      reset = window
    else
      local newest = redis.call('ZRANGE', key, -1, -1, 'WITHSCORES')
      if newest[2] then reset = tonumber(newest[2]) + window - now end
    end
  elseif dim == 3 then
    local total = prune_tokens(key, hkey, MINUTE)
    if total + tokens > limit then
      pass = 0
      remaining = limit - total
      if tokens > limit then
        remaining = 0
        retry = MINUTE
      else
        retry = tokens_retry(key, hkey, total, limit)
      end
    else
      remaining = limit - total - tokens
    end
    if pass == 1 and tokens > 0 then
      reset = MINUTE
    else
      local newest = redis.call('ZRANGE', key, -1, -1, 'WITHSCORES')
      if newest[2] then reset = tonumber(newest[2]) + MINUTE - now end
    end
  elseif dim == 4 then
    redis.call('ZREMRANGEBYSCORE', key, '-inf', '(' .. now)
    local count = redis.call('ZCARD', key)
    if count + 1 > limit then
      pass = 0
      remaining = limit - count
      retry = 1000000
    else
      remaining = limit - count - 1
    end
  elseif dim == 5 then
    local rate = tonumber(extra) / MINUTE
    local bucket = redis.call('HMGET', key, 'tokens', 'ts')
    local level = tonumber(bucket[1]) or limit
    local ts = tonumber(bucket[2]) or now
    level = math.min(limit, level + math.max(0, now - ts) * rate)
    state[i] = level
    if level < 1 then
      pass = 0
      remaining = 0
      if rate > 0 then retry = math.ceil((1 - level) / rate) else retry = MINUTE end
    else
      remaining = math.floor(level - 1)
    end
    if rate > 0 then reset = math.ceil((limit - level + pass) / rate) end
  elseif dim >= 6 then
    if day == nil then day, day_end, month, month_end = windows(now) end
    local wid, wend = day, day_end
    if dim == 7 or dim == 9 then wid, wend = month, month_end end
    local charge = tokens
    if dim >= 8 then charge = cost end
    local cur = redis.call('HMGET', key, 'w', 'u')
    local used = 0
    if tonumber(cur[1]) == wid then used = tonumber(cur[2]) or 0 end
    if used + charge > limit then
      pass = 0
      remaining = limit - used
      if charge > limit then remaining = 0 end
      retry = wend - now
    else
      remaining = limit - used - charge
    end
    if used + pass * charge > 0 then reset = wend - now end
  end
  if remaining < 0 then remaining = 0 end
  if pass == 0 and shadow == 0 then admitted = 0 end
  table.insert(out, pass)
  table.insert(out, remaining)
  table.insert(out, retry)
  table.insert(out, reset)
end
table.insert(out, day or 0)
table.insert(out, month or 0)

if admitted == 1 then
  for i = 1, n do
    local key = KEYS[2 * i - 1]
    local hkey = KEYS[2 * i]
    local base = 5 + (i - 1) * 4
    local dim = tonumber(ARGV[base + 1])
    if dim == 1 then
      redis.call('ZADD', key, now, lease_id)
      redis.call('PEXPIRE', key, 61000)
    elseif dim == 2 then
      redis.call('ZADD', key, now, lease_id)
      redis.call('PEXPIRE', key, 3601000)
    elseif dim == 3 then
      redis.call('ZADD', key, now, lease_id)
      redis.call('HSET', hkey, lease_id, tokens)
      redis.call('HINCRBY', hkey, '_total', tokens)
      redis.call('PEXPIRE', key, 61000)
      redis.call('PEXPIRE', hkey, 61000)
    elseif dim == 4 then
      redis.call('ZADD', key, now + lease_us, lease_id)
      local ttl = redis.call('PTTL', key)
      local want = math.floor(lease_us / 1000) + 1000
      if ttl < want then redis.call('PEXPIRE', key, want) end
    elseif dim == 5 then
      local limit = tonumber(ARGV[base + 2])
      local rate = tonumber(ARGV[base + 4]) / MINUTE
      redis.call('HSET', key, 'tokens', tostring(math.max(0, state[i] - 1)), 'ts', now)
      local refill_ms = 1000
      if rate > 0 then refill_ms = math.ceil(limit / rate / 1000) + 1000 end
      redis.call('PEXPIRE', key, refill_ms)
    elseif dim >= 6 then
      local wid, wend = day, day_end
      if dim == 7 or dim == 9 then wid, wend = month, month_end end
      local charge = tokens
      if dim >= 8 then charge = cost end
      local expire_at = math.floor(wend / 1000) + GRACE_MS
      if tonumber(redis.call('HGET', key, 'w')) ~= wid then
        redis.call('DEL', key)
        redis.call('HSET', key, 'w', wid)
      end
      redis.call('HINCRBY', key, 'u', charge)
      redis.call('HSET', key, lease_id, charge)
      redis.call('PEXPIREAT', key, expire_at)
      local member = ARGV[base + 4]
      if member ~= '' then
        if tonumber(redis.call('ZSCORE', hkey, '_w')) ~= -wid then
          redis.call('DEL', hkey)
          redis.call('ZADD', hkey, -wid, '_w')
        end
        redis.call('ZINCRBY', hkey, charge, member)
        redis.call('PEXPIREAT', hkey, expire_at)
      end
    end
  end
  out[1] = 1
end
return out
"""
)

#: A lease's charge of a day/month budget replaced by ``spent`` in the window it was made in (if that
#: window is still the budget's): total and the subject's top-consumers spend move by the difference;
#: the lease's field goes, so a second settlement changes nothing.
SETTLE_BUDGET_LUA = r"""
local function settle_budget(key, top, lease_id, wid, spent, member)
  local cur = redis.call('HMGET', key, 'w', lease_id)
  if tonumber(cur[1]) == wid and cur[2] then
    local delta = spent - tonumber(cur[2])
    redis.call('HDEL', key, lease_id)
    redis.call('HINCRBY', key, 'u', delta)
    if member ~= '' and tonumber(redis.call('ZSCORE', top, '_w')) == -wid then
      redis.call('ZINCRBY', top, delta, member)
    end
  end
end
"""

#: ARGV: lease id, actual tokens, item count, the items' dimension codes, then actual cost, the
#: lease's day and month ids and the items' budget subjects ('' for none).
SETTLE = (
    SETTLE_BUDGET_LUA
    + r"""
local lease_id = ARGV[1]
local actual = tonumber(ARGV[2])
local n = tonumber(ARGV[3])
local cost = tonumber(ARGV[4 + n])
local day = tonumber(ARGV[5 + n])
local month = tonumber(ARGV[6 + n])
for i = 1, n do
  local key = KEYS[2 * i - 1]
  local hkey = KEYS[2 * i]
  local dim = tonumber(ARGV[3 + i])
  if dim == 3 then
    local charged = redis.call('HGET', hkey, lease_id)
    if charged then
      redis.call('HSET', hkey, lease_id, actual)
      redis.call('HINCRBY', hkey, '_total', actual - tonumber(charged))
    end
  elseif dim == 4 then
    redis.call('ZREM', key, lease_id)
  elseif dim >= 6 then
    local wid = day
    if dim == 7 or dim == 9 then wid = month end
    local spent = actual
    if dim >= 8 then spent = cost end
    settle_budget(key, hkey, lease_id, wid, spent, ARGV[6 + n + i])
  end
end
return 1
"""
)

#: Live usage of a stream: raise each tokensPerMinute entry of the lease to ARGV[2] (never lower it),
#: and the lease's charge of each day/month budget (tokens: ARGV[2], cost: ARGV[4] unless it is -1)
#: in the window it was admitted in. KEYS: (log, charges) per tokensPerMinute item, then (budget,
#: top) per budget item; ARGV: lease id, tokens so far, tokensPerMinute items, cost so far, the
#: lease's day and month, then (dimension code, subject) per budget item. Returns the charges raised.
CHARGE = r"""
local lease_id = ARGV[1]
local tokens = tonumber(ARGV[2])
local tpm_items = tonumber(ARGV[3])
local cost = tonumber(ARGV[4])
local day = tonumber(ARGV[5])
local month = tonumber(ARGV[6])
local raised = 0
for i = 1, tpm_items do
  local hkey = KEYS[2 * i]
  local charged = tonumber(redis.call('HGET', hkey, lease_id))
  if charged and tokens > charged then
    redis.call('HSET', hkey, lease_id, tokens)
    redis.call('HINCRBY', hkey, '_total', tokens - charged)
    raised = raised + 1
  end
end
for j = 1, #KEYS / 2 - tpm_items do
  local key = KEYS[2 * (tpm_items + j) - 1]
  local top = KEYS[2 * (tpm_items + j)]
  local dim = tonumber(ARGV[5 + 2 * j])
  local member = ARGV[6 + 2 * j]
  local want = tokens
  if dim >= 8 then want = cost end
  local wid = day
  if dim == 7 or dim == 9 then wid = month end
  if want >= 0 then
    local cur = redis.call('HMGET', key, 'w', lease_id)
    local charged = tonumber(cur[2])
    if tonumber(cur[1]) == wid and charged and want > charged then
      redis.call('HSET', key, lease_id, want)
      redis.call('HINCRBY', key, 'u', want - charged)
      if member ~= '' and tonumber(redis.call('ZSCORE', top, '_w')) == -wid then
        redis.call('ZINCRBY', top, want - charged, member)
      end
      raised = raised + 1
    end
  end
end
return raised
"""

#: Undo an admission whose request never reached an upstream (every candidate's own quota rejected
#: it): as if it had been rejected. Removes the lease's entries from the request and token logs,
#: its concurrency slots and budget charges, and gives a burst bucket its request back. For a lease
#: not settled yet; a second cancel does nothing (the lease is no longer where it was admitted).
#: KEYS: (key, hkey) per item, as admitted; ARGV: lease id, item count, the lease's day and month,
#: then (dimension code, limit value, budget subject) per item.
CANCEL = (
    SETTLE_BUDGET_LUA
    + r"""
local lease_id = ARGV[1]
local n = tonumber(ARGV[2])
local day = tonumber(ARGV[3])
local month = tonumber(ARGV[4])
-- Once only: the lease must still be in the first log, set or budget it was admitted to.
for i = 1, n do
  local dim = tonumber(ARGV[4 + (i - 1) * 3 + 1])
  if dim ~= 5 then
    local present
    if dim <= 4 then
      present = redis.call('ZSCORE', KEYS[2 * i - 1], lease_id)
    else
      present = redis.call('HEXISTS', KEYS[2 * i - 1], lease_id) == 1
    end
    if not present then return 0 end
    break
  end
end
for i = 1, n do
  local key = KEYS[2 * i - 1]
  local hkey = KEYS[2 * i]
  local base = 4 + (i - 1) * 3
  local dim = tonumber(ARGV[base + 1])
  if dim == 1 or dim == 2 or dim == 4 then
    redis.call('ZREM', key, lease_id)
  elseif dim == 3 then
    redis.call('ZREM', key, lease_id)
    local charged = redis.call('HGET', hkey, lease_id)
    if charged then
      redis.call('HDEL', hkey, lease_id)
      redis.call('HINCRBY', hkey, '_total', -tonumber(charged))
    end
  elseif dim == 5 then
    local level = tonumber(redis.call('HGET', key, 'tokens'))
    if level then
      redis.call('HSET', key, 'tokens', tostring(math.min(tonumber(ARGV[base + 2]), level + 1)))
    end
  elseif dim >= 6 then
    local wid = day
    if dim == 7 or dim == 9 then wid = month end
    settle_budget(key, hkey, lease_id, wid, 0, ARGV[base + 3])
  end
end
return 1
"""
)
