-- KEYS: workers index, this worker's key. ARGV: worker id, state (JSON), ttl_ms.
-- The heartbeat lives ttl_ms; the index entry carries the same expiry (server clock, ms), and
-- entries of workers that stopped beating are pruned here.
local now = math.floor(clock('') * 1000)
local ttl = tonumber(ARGV[3])
redis.call('SET', KEYS[2], ARGV[2], 'PX', ttl)
redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
return 1
