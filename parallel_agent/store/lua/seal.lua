-- KEYS: run, nodes, counters. ARGV: node.
if redis.call('EXISTS', KEYS[1]) == 0 then
  return 'LOST'
end
if not redis.call('ZSCORE', KEYS[2], ARGV[1]) then
  redis.call('ZADD', KEYS[2], redis.call('ZCARD', KEYS[2]), ARGV[1])
end
redis.call('HSET', KEYS[3], 'sealed', 1)
return 1
