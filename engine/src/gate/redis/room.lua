-- The waiting room of a queue drop (gate/room.rs has the rules; this is the same behaviour in Redis, so any
-- instance serves any member). Not prepended with prelude.lua. KEYS, all under the drop's hash tag:
--   KEYS[1] c: the drop's counters (the gate's; read for `avail`, and all four for a sighting)
--   KEYS[2] m: member -> units held, paying or paid (the gate's; a member with units has used their pass)
--   KEYS[3] w: sorted set of waiting members: a pre-queue member's random key in [0, 2^52), drawn at the join,
--              or 2^52 + the join's sequence number after `opens_at`; so the pre-queue comes first, shuffled, then
--              the later members in join order, and ZRANK is the position
--   KEYS[4] a: sorted set member -> pass expiry (ms) of admitted members who have not reserved yet
--   KEYS[5] s: hash member -> state: "w" waiting, "a:<expiry>" admitted, "u:<expiry>" admitted and reserved,
--              "x" pass expired unused
--   KEYS[6] q: hash of the room's own numbers: seq, tokens, last (ms of the last step), r0/rn/rp (rate window)
-- Times come from ARGV (the service's clock), as the pass's expiry is checked against the same clock.
local C, M, W, A, S, Q = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local PRE = 4503599627370496
local WINDOW = 10000

local function int(n)
  return string.format('%.0f', n)
end

-- {kind, value}: "w" with the 1-based position (-1 before the opening), "a"/"u" with the pass expiry, "x" with 0;
-- or nil when the member never joined.
local function place(member, now, opens)
  local st = redis.call('HGET', S, member)
  if not st then return nil end
  if st == 'w' then
    if now < opens then return {'w', -1} end
    return {'w', redis.call('ZRANK', W, member) + 1}
  end
  local kind, exp = string.match(st, '^(%a):(%d+)$')
  if kind == 'u' then return {'u', exp} end
  if kind == 'a' and tonumber(exp) > now then return {'a', exp} end
  return {'x', '0'}
end

local function rate(now)
  local rp = redis.call('HGET', Q, 'rp')
  if rp then return rp end
  local r0 = tonumber(redis.call('HGET', Q, 'r0') or '0')
  if r0 == 0 then return '0' end
  local rn = tonumber(redis.call('HGET', Q, 'rn') or '0')
  return tostring(rn * 1000 / math.max(1000, now - r0))
end

local function record(now, admitted)
  local r0 = tonumber(redis.call('HGET', Q, 'r0') or '0')
  if r0 == 0 then
    redis.call('HSET', Q, 'r0', int(now))
  elseif now - r0 >= WINDOW then
    local rn = tonumber(redis.call('HGET', Q, 'rn') or '0')
    redis.call('HSET', Q, 'rp', tostring(rn * 1000 / (now - r0)), 'r0', int(now), 'rn', '0')
  end
  redis.call('HINCRBY', Q, 'rn', admitted)
end

-- Puts member in the line (or finds their place): {kind, value, new} with new 1 when they took a new place (first
-- join, or again after their pass expired). key: a random integer below 2^52, used before the opening.
local function join(member, now, opens, key)
  local p = place(member, now, opens)
  if p and p[1] ~= 'x' then return {p[1], tostring(p[2]), 0} end
  redis.call('ZREM', A, member)
  local score = key
  if now >= opens then score = int(PRE + redis.call('HINCRBY', Q, 'seq', 1)) end
  redis.call('ZADD', W, score, member)
  redis.call('HSET', S, member, 'w')
  p = place(member, now, opens)
  return {p[1], tostring(p[2]), 1}
end

-- The drop's counters (stock, avail, held, paid), or {} when the drop's keys are gone (for the gate to rebuild).
local function counters()
  local c = redis.call('HMGET', C, 'stock', 'avail', 'held', 'paid')
  if not (c[1] and c[2] and c[3] and c[4]) then return {} end
  return c
end

local op = ARGV[1]
if op == 'join' then
  -- member, now, opens, key: the join alone, with the rate
  local now = tonumber(ARGV[3])
  local out = join(ARGV[2], now, tonumber(ARGV[4]), ARGV[5])
  out[4] = rate(now)
  return out
elseif op == 'joins' then
  -- now, opens, then a member, a key and the join's own time for each join: the joins of a drop that arrived
  -- together, in one step with the sold-out check before them. Each join is made at its own time, so one made before
  -- the opening takes a pre-queue place even in a call made after it. {} when the drop's keys are gone (no one
  -- joined); {counters} when nothing is left to sell or to come back (avail and held 0, Counts::gone: no one
  -- joined); else {counters, rate, then each member's {kind, value, new}} in order.
  local now, opens = tonumber(ARGV[2]), tonumber(ARGV[3])
  local c = counters()
  if #c == 0 then return {} end
  if tonumber(c[2]) == 0 and tonumber(c[3]) == 0 then return {c} end
  local out = {c, rate(now)}
  for i = 4, #ARGV, 3 do
    out[#out + 1] = join(ARGV[i], tonumber(ARGV[i + 2]), opens, ARGV[i + 1])
  end
  return out
elseif op == 'sighting' then
  -- now, opens, then members: what a status read needs, for every member named, in one step: the rate, the drop's
  -- counters (stock, avail, held, paid; {} when the drop's keys are gone, for the gate to rebuild them), then each
  -- member's place ({} for one who never joined). A drop's concurrent status reads share one call.
  local now, opens = tonumber(ARGV[2]), tonumber(ARGV[3])
  local out = {rate(now), counters()}
  for i = 4, #ARGV do
    local p = place(ARGV[i], now, opens)
    if p then out[#out + 1] = {p[1], tostring(p[2])} else out[#out + 1] = {} end
  end
  return out
elseif op == 'tick' then
  -- now, pass ms, admissions per second (0: no ceiling)
  local now, pass_ms, cap = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
  local out = redis.call('ZRANGE', A, 0, -1, 'WITHSCORES')
  for i = 1, #out, 2 do
    local member, exp = out[i], tonumber(out[i + 1])
    if tonumber(redis.call('HGET', M, member) or '0') > 0 then
      redis.call('ZREM', A, member)
      redis.call('HSET', S, member, 'u:' .. int(exp))
    elseif exp <= now then
      redis.call('ZREM', A, member)
      redis.call('HSET', S, member, 'x')
    end
  end
  local avail = tonumber(redis.call('HGET', C, 'avail') or '0')
  local admit = math.min(avail - redis.call('ZCARD', A), redis.call('ZCARD', W))
  if cap > 0 then
    local last = tonumber(redis.call('HGET', Q, 'last') or '0')
    local tokens = tonumber(redis.call('HGET', Q, 'tokens') or '0')
    local elapsed = 1
    if last > 0 then elapsed = math.max(0, now - last) / 1000 end
    tokens = math.min(cap, tokens + elapsed * cap)
    admit = math.min(admit, math.floor(tokens))
    if admit > 0 then tokens = tokens - admit end
    redis.call('HSET', Q, 'tokens', tostring(tokens))
  end
  redis.call('HSET', Q, 'last', int(now))
  if admit < 0 then admit = 0 end
  if admit > 0 then
    local exp = int(now + pass_ms)
    local popped = redis.call('ZPOPMIN', W, admit)
    for i = 1, #popped, 2 do
      redis.call('ZADD', A, exp, popped[i])
      redis.call('HSET', S, popped[i], 'a:' .. exp)
    end
  end
  record(now, admit)
  return admit
elseif op == 'counts' then
  return {redis.call('ZCARD', W), redis.call('ZCARD', A), rate(tonumber(ARGV[2]))}
end
return redis.error_reply('unknown room op ' .. tostring(op))
