-- KEYS: run, counters, meta, ready, delayed, leases, failed.
-- ARGV: index, token, error, retry_in_s ('' = no retry), now ('' = server time).
-- Returns the chunk's state after the call.
if redis.call('EXISTS', KEYS[1]) == 0 then
  return 'LOST'
end
local index = ARGV[1]
local m = load(KEYS[3], index)
if not m then
  return 'missing'
end
if m.state ~= 'leased' or m.tok ~= tonumber(ARGV[2]) then
  return m.state
end
m.err = ARGV[3]
m.owner = nil
redis.call('ZREM', KEYS[6], index)
redis.call('HINCRBY', KEYS[2], 'leased', -1)
if ARGV[4] == '' then
  m.state = 'failed'
  redis.call('ZADD', KEYS[7], index, index)
  redis.call('HINCRBY', KEYS[2], 'failed', 1)
else
  local now = clock(ARGV[5])
  m.state = 'pending'
  m.nb = now + tonumber(ARGV[4])
  if m.nb <= now then
    redis.call('ZADD', KEYS[4], index, index)
  else
    redis.call('ZADD', KEYS[5], num(m.nb), index)
  end
  redis.call('HINCRBY', KEYS[2], 'pending', 1)
end
save(KEYS[3], index, m)
return m.state
