-- KEYS: run, counters, meta, payload, ready, delayed, leases, failed, records.
-- ARGV: owner, lease_s, limit, max_attempts, now ('' = server time).
-- Returns 'LOST', 'CANCELLED' (the run was cancelled: nobody takes new work) or a flat list of
-- (index, token, attempt, first, count, payload, expires_at, records).
if redis.call('EXISTS', KEYS[1]) == 0 then
  return 'LOST'
end
if redis.call('HGET', KEYS[1], 'status') == '"cancelled"' then
  return 'CANCELLED'
end
local owner, lease_s = ARGV[1], tonumber(ARGV[2])
local limit, max_attempts = tonumber(ARGV[3]), tonumber(ARGV[4])
local now = clock(ARGV[5])

-- backoff over: delayed -> ready
local due = redis.call('ZRANGEBYSCORE', KEYS[6], '-inf', num(now))
for _, index in ipairs(due) do
  redis.call('ZREM', KEYS[6], index)
  redis.call('ZADD', KEYS[5], index, index)
end

-- expired leases: reclaimable, or FAILED when out of attempts
local candidates = {}
local exhausted = 0
for _, index in ipairs(redis.call('ZRANGEBYSCORE', KEYS[7], '-inf', num(now))) do
  local m = load(KEYS[3], index)
  if m.att >= max_attempts then
    m.state = 'failed'
    m.err = 'lease expired after ' .. m.att .. ' attempts'
    m.owner = nil
    save(KEYS[3], index, m)
    redis.call('ZREM', KEYS[7], index)
    redis.call('ZADD', KEYS[8], index, index)
    exhausted = exhausted + 1
  else
    table.insert(candidates, {tonumber(index), m, false})
  end
end
if exhausted > 0 then
  redis.call('HINCRBY', KEYS[2], 'leased', -exhausted)
  redis.call('HINCRBY', KEYS[2], 'failed', exhausted)
end

for _, index in ipairs(redis.call('ZRANGE', KEYS[5], 0, limit - 1)) do
  table.insert(candidates, {tonumber(index), nil, true})
end
table.sort(candidates, function(a, b) return a[1] < b[1] end)

local out = {}
local from_ready, retries = 0, 0
for i = 1, math.min(limit, #candidates) do
  local index = tostring(candidates[i][1])
  local m = candidates[i][2] or load(KEYS[3], index)
  if candidates[i][3] then
    redis.call('ZREM', KEYS[5], index)
    from_ready = from_ready + 1
  end
  m.state = 'leased'
  m.tok = m.tok + 1
  m.att = m.att + 1
  m.owner = owner
  m.exp = now + lease_s
  if m.att > 1 then
    retries = retries + 1
  end
  save(KEYS[3], index, m)
  redis.call('ZADD', KEYS[7], num(m.exp), index)
  local payload = redis.call('HGET', KEYS[4], index) or ''
  local records = redis.call('HGET', KEYS[9], index) or ''
  for _, v in ipairs({index, m.tok, m.att, m.first, m.count, payload, num(m.exp), records}) do
    table.insert(out, v)
  end
end
if from_ready > 0 then
  redis.call('HINCRBY', KEYS[2], 'pending', -from_ready)
  redis.call('HINCRBY', KEYS[2], 'leased', from_ready)
end
if retries > 0 then
  redis.call('HINCRBY', KEYS[2], 'retries', retries)
end
return out
