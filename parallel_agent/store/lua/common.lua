-- Prepended to every script. Redis turns Lua numbers into integers when they are passed to
-- redis.call or returned, so every float (time, scores) goes through num() as a string. A
-- negative zero becomes "-0", which HINCRBY rejects: guard increments that may be zero.
local function num(x)
  return string.format('%.17g', x)
end

-- The caller's clock when it passes one (tests), else the server's: one clock for all machines.
local function clock(arg)
  if arg ~= nil and arg ~= '' then
    return tonumber(arg)
  end
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end

local function load(meta_key, index)
  local raw = redis.call('HGET', meta_key, index)
  if not raw then
    return nil
  end
  return cjson.decode(raw)
end

local function save(meta_key, index, m)
  redis.call('HSET', meta_key, index, cjson.encode(m))
end
