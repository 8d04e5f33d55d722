-- KEYS: run, nodes, counters, meta, payload, ready, records, result, errors, done,
--       result_records, partial.
-- ARGV: node, then (index, first, count, payload, records, partial, joined)...; empty records:
-- numbered in a row; joined = 1: the payload is the one given followed by the partial. A chunk with a partial is added DONE, as a claim and commit would leave it (no
-- result, no errors, every item ok), unless the run was cancelled; the others PENDING.
-- Idempotent per index: a chunk already present is left alone.
if redis.call('EXISTS', KEYS[1]) == 0 then
  return 'LOST'
end
if not redis.call('ZSCORE', KEYS[2], ARGV[1]) then
  redis.call('ZADD', KEYS[2], redis.call('ZCARD', KEYS[2]), ARGV[1])
end
local committing = redis.call('HGET', KEYS[1], 'status') ~= '"cancelled"'
local added, items, done, items_done = 0, 0, 0, 0
for i = 2, #ARGV, 7 do
  local index = ARGV[i]
  if redis.call('HEXISTS', KEYS[4], index) == 0 then
    local count = tonumber(ARGV[i + 2])
    local records, partial = ARGV[i + 4], ARGV[i + 5]
    if partial == '' or not committing then
      save(KEYS[4], index, {state = 'pending', tok = 0, att = 0, first = tonumber(ARGV[i + 1]),
                            count = count, nb = 0})
      local payload = ARGV[i + 3]
      if ARGV[i + 6] == '1' then
        payload = payload .. partial
      end
      redis.call('HSET', KEYS[5], index, payload)
      if records ~= '' then
        redis.call('HSET', KEYS[7], index, records)
      end
      redis.call('ZADD', KEYS[6], index, index)
    else
      save(KEYS[4], index, {state = 'done', tok = 0, att = 0, first = tonumber(ARGV[i + 1]),
                            count = count, nb = 0, ok = count, bad = 0, dur = 0})
      redis.call('HSET', KEYS[8], index, '')
      redis.call('HSET', KEYS[9], index, '[]')
      if records ~= '' then
        redis.call('HSET', KEYS[11], index, records)
      end
      redis.call('HSET', KEYS[12], index, partial)
      redis.call('ZADD', KEYS[10], index, index)
      done = done + 1
      items_done = items_done + count
    end
    added = added + 1
    items = items + count
  end
end
redis.call('HINCRBY', KEYS[3], 'chunks_total', added)
redis.call('HINCRBY', KEYS[3], 'pending', added - done)
redis.call('HINCRBY', KEYS[3], 'items_total', items)
if done > 0 then
  redis.call('HINCRBY', KEYS[3], 'done', done)
  redis.call('HINCRBY', KEYS[3], 'items_done', items_done)
  redis.call('HINCRBY', KEYS[3], 'items_out', items_done)
end
return added
