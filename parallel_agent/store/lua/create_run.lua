-- KEYS: run, extra, runs index. ARGV: task_id, created_at, generation (JSON, as stored), n_fields, field/value..., extra field/value...
-- Create-if-absent; the same generation again (a retried call) counts as success.
if redis.call('EXISTS', KEYS[1]) == 1 then
  local existing = redis.call('HGET', KEYS[1], 'generation')
  if existing == ARGV[3] then
    return 1
  end
  return 0
end
local n = tonumber(ARGV[4])
local i = 5
while i < 5 + 2 * n do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
  i = i + 2
end
while i <= #ARGV do
  redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1])
  i = i + 2
end
redis.call('ZADD', KEYS[3], ARGV[2], ARGV[1])
if redis.call('EXISTS', KEYS[2]) == 1 then
  redis.call('HSET', KEYS[1], 'key:' .. KEYS[2], 1)  -- store loss: see common.lua
end
return 1
