-- KEYS: run, counters, meta, ready, leases. ARGV: index, token.
-- Back to PENDING at once without consuming the attempt. Fenced.
if redis.call('EXISTS', KEYS[1]) == 0 then
  return 'LOST'
end
local index = ARGV[1]
local m = load(KEYS[3], index)
if not m or m.state ~= 'leased' or m.tok ~= tonumber(ARGV[2]) then
  return 0
end
if m.att > 1 then
  redis.call('HINCRBY', KEYS[2], 'retries', -1)
end
m.state = 'pending'
m.att = m.att - 1
m.owner = nil
m.nb = 0
save(KEYS[3], index, m)
redis.call('ZREM', KEYS[5], index)
redis.call('ZADD', KEYS[4], index, index)
redis.call('HINCRBY', KEYS[2], 'leased', -1)
redis.call('HINCRBY', KEYS[2], 'pending', 1)
return 1
