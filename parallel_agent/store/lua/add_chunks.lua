-- KEYS: run, nodes, counters, meta, payload, ready, records.
-- ARGV: node, then (index, first, count, payload, records)...; empty records: numbered in a row.
-- Idempotent per index: a chunk already present is left alone.
if redis.call('EXISTS', KEYS[1]) == 0 then
  return 'LOST'
end
if not redis.call('ZSCORE', KEYS[2], ARGV[1]) then
  redis.call('ZADD', KEYS[2], redis.call('ZCARD', KEYS[2]), ARGV[1])
end
local added, items = 0, 0
for i = 2, #ARGV, 5 do
  local index = ARGV[i]
  if redis.call('HEXISTS', KEYS[4], index) == 0 then
    local count = tonumber(ARGV[i + 2])
    save(KEYS[4], index, {state = 'pending', tok = 0, att = 0, first = tonumber(ARGV[i + 1]),
                          count = count, nb = 0})
    redis.call('HSET', KEYS[5], index, ARGV[i + 3])
    if ARGV[i + 4] ~= '' then
      redis.call('HSET', KEYS[7], index, ARGV[i + 4])
    end
    redis.call('ZADD', KEYS[6], index, index)
    added = added + 1
    items = items + count
  end
end
redis.call('HINCRBY', KEYS[3], 'chunks_total', added)
redis.call('HINCRBY', KEYS[3], 'pending', added)
redis.call('HINCRBY', KEYS[3], 'items_total', items)
return added
