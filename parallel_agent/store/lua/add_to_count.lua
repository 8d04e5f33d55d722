-- KEYS: run, extra. ARGV: key, amount.
-- Returns the new value of the run's shared count extra[key], or 'LOST'.
if redis.call('EXISTS', KEYS[1]) == 0 then
  return 'LOST'
end
local value = tonumber(redis.call('HGET', KEYS[2], ARGV[1]) or '0') or 0
value = value + tonumber(ARGV[2])
redis.call('HSET', KEYS[2], ARGV[1], tostring(value))
return value
