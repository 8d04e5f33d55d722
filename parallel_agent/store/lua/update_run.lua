-- KEYS: run, extra. ARGV: n_fields, field/value..., extra field/value...
-- Returns the run's status (JSON) after the update, or 'LOST'.
if redis.call('EXISTS', KEYS[1]) == 0 then
  return 'LOST'
end
local n = tonumber(ARGV[1])
local i = 2
while i < 2 + 2 * n do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
  i = i + 2
end
while i <= #ARGV do
  redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1])
  i = i + 2
end
return redis.call('HGET', KEYS[1], 'status')
