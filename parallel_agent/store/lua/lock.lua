-- KEYS: lock. ARGV: op (acquire|renew|release), owner, ttl_ms. The key's PX expiry is the lease.
local holder = redis.call('GET', KEYS[1])
local op = ARGV[1]
if op == 'acquire' then
  if not holder then
    redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
    return 1
  end
end
if holder ~= ARGV[2] then
  return 0
end
if op == 'release' then
  redis.call('DEL', KEYS[1])
else
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
end
return 1
