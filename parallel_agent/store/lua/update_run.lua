-- KEYS: run, extra, nodes (only checked by guarded(): the finished TTL reaches the node keys
-- through it). ARGV: keep (a JSON status that must not be overwritten, or ''), n_fields,
-- field/value..., extra field/value...
-- Returns the run's status (JSON) after the update, or 'LOST'.
if redis.call('EXISTS', KEYS[1]) == 0 then
  return 'LOST'
end
local kept = ARGV[1] ~= '' and redis.call('HGET', KEYS[1], 'status') == ARGV[1]
local n = tonumber(ARGV[2])
local i = 3
while i < 3 + 2 * n do
  if not (kept and ARGV[i] == 'status') then
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
  end
  i = i + 2
end
while i <= #ARGV do
  redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1])
  i = i + 2
end
return redis.call('HGET', KEYS[1], 'status')
