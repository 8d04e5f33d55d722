-- KEYS: run, nodes, the node's keys (counters first). Read-only: the node's counters, once
-- guarded() found every listed key of the node present.
return redis.call('HGETALL', KEYS[3])
