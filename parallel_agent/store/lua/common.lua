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

-- Store loss (docs/store.md). The run hash (KEYS[1]) lists as fields `key:<name>` the task's keys
-- that existed after the last script touched them. Redis deletes a key a script empties, and the
-- script then drops it from the list; a listed key that is gone was evicted (maxmemory) or deleted
-- behind the scripts' back. The transition scripts run inside guarded() (see redis.py), which
-- checks the list and the run's generation marker first and updates the list last.
local function guarded(body)
  local expected = table.remove(ARGV)
  if redis.call('EXISTS', KEYS[1]) == 0 then
    return 'LOST'
  end
  if expected ~= '' then
    local generation = redis.call('HGET', KEYS[1], 'generation')
    if generation ~= expected then
      return 'LOST generation ' .. tostring(generation)
    end
  end
  local listed = {}
  for i = 2, #KEYS do
    listed[i] = redis.call('HEXISTS', KEYS[1], 'key:' .. KEYS[i]) == 1
    if listed[i] and redis.call('EXISTS', KEYS[i]) == 0 then
      return 'LOST key ' .. KEYS[i]
    end
  end
  local reply = body()
  if redis.call('EXISTS', KEYS[1]) == 1 then
    for i = 2, #KEYS do
      local present = redis.call('EXISTS', KEYS[i]) == 1
      if present and not listed[i] then
        redis.call('HSET', KEYS[1], 'key:' .. KEYS[i], 1)
      elseif listed[i] and not present then
        redis.call('HDEL', KEYS[1], 'key:' .. KEYS[i])
      end
    end
  end
  return reply
end
