-- KEYS: bucket. ARGV: rate (tokens/s), burst (capacity), want, now ('' = server time).
-- A token bucket every process of a run draws from (server clock): refills at `rate` up to
-- `burst` (it starts empty, so a run opens at the rate, not with a burst), hands out up to
-- `want` whole tokens. Returns {granted, seconds until the next token}.
-- The key expires when unused for a minute.
local rate, burst, want = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local now = clock(ARGV[4])
local state = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(state[1]) or 0
local at = tonumber(state[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - at) * rate)
local granted = math.min(want, math.floor(tokens))
tokens = tokens - granted
redis.call('HSET', KEYS[1], 'tokens', num(tokens), 'at', num(now))
redis.call('PEXPIRE', KEYS[1], 60000)
local wait = 0
if granted < want then
  wait = (1 - (tokens - math.floor(tokens))) / rate
end
return {granted, num(wait)}
