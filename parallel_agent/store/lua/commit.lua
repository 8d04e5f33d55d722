-- KEYS: run, counters, meta, payload, result, errors, leases, done, records, result_records,
--       partial.
-- ARGV: index, token, result, errors, items_ok, items_failed, duration_s, result's records,
--       the consuming aggregates' partials (empty: none), the number of outputs.
-- Fenced: only the current token of a LEASED chunk commits; the same lease again returns 1.
if redis.call('EXISTS', KEYS[1]) == 0 then
  return 'LOST'
end
local index, token = ARGV[1], tonumber(ARGV[2])
local m = load(KEYS[3], index)
if not m or m.tok ~= token then
  return 0
end
if m.state == 'done' then
  return 1
end
if m.state ~= 'leased' then
  return 0
end
m.state = 'done'
m.owner = nil
m.ok = tonumber(ARGV[5])
m.bad = tonumber(ARGV[6])
m.dur = tonumber(ARGV[7])
save(KEYS[3], index, m)
redis.call('HSET', KEYS[5], index, ARGV[3])
redis.call('HSET', KEYS[6], index, ARGV[4])
redis.call('HDEL', KEYS[4], index)
redis.call('HDEL', KEYS[9], index)
if ARGV[8] ~= '' then
  redis.call('HSET', KEYS[10], index, ARGV[8])
end
if ARGV[9] ~= '' then
  redis.call('HSET', KEYS[11], index, ARGV[9])
end
redis.call('ZREM', KEYS[7], index)
redis.call('ZADD', KEYS[8], index, index)
redis.call('HINCRBY', KEYS[2], 'leased', -1)
redis.call('HINCRBY', KEYS[2], 'done', 1)
redis.call('HINCRBY', KEYS[2], 'items_done', m.ok)
redis.call('HINCRBY', KEYS[2], 'items_failed', m.bad)
redis.call('HINCRBY', KEYS[2], 'items_out', tonumber(ARGV[10]))
return 1
