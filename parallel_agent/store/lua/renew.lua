-- KEYS: run, meta, leases. ARGV: index, token, lease_s, now ('' = server time).
if redis.call('EXISTS', KEYS[1]) == 0 then
  return 'LOST'
end
local m = load(KEYS[2], ARGV[1])
if not m or m.state ~= 'leased' or m.tok ~= tonumber(ARGV[2]) then
  return 0
end
m.exp = clock(ARGV[4]) + tonumber(ARGV[3])
save(KEYS[2], ARGV[1], m)
redis.call('ZADD', KEYS[3], num(m.exp), ARGV[1])
return 1
