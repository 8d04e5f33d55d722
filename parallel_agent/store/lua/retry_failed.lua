-- KEYS: run, counters, meta, ready, failed. FAILED -> PENDING with attempts reset; tokens kept.
if redis.call('EXISTS', KEYS[1]) == 0 then
  return 'LOST'
end
local moved = redis.call('ZRANGE', KEYS[5], 0, -1)
for _, index in ipairs(moved) do
  local m = load(KEYS[3], index)
  m.state = 'pending'
  m.att = 0
  m.nb = 0
  save(KEYS[3], index, m)
  redis.call('ZADD', KEYS[4], index, index)
end
if #moved > 0 then
  redis.call('DEL', KEYS[5])
  redis.call('HINCRBY', KEYS[2], 'failed', -#moved)
  redis.call('HINCRBY', KEYS[2], 'pending', #moved)
end
return #moved
