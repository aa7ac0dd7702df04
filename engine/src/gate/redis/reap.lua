-- Releases the expired holds of up to ARGV[1] reserve entries past the reaper's cursor, by Redis's clock, and
-- moves the cursor. Holds that are paying are left to their payment (abort releases them if expired).
-- Returns { holds released, entries visited, payments whose lease ran out (refs, at most ARGV[1]), ms until this drop
-- next needs a pass (-1: nothing will expire), then ref, member, quantity of each released hold }, or { -1 } when
-- the drop is not loaded.
local cfg = redis.call('HMGET', C, 'hold_ms', 'reaped')
if not cfg[1] then return { -1 } end
local hold_ms, cursor = tonumber(cfg[1]), cfg[2] or '0-0'
local now = now_ms()
local upto = now - hold_ms

-- When the next pass has something to do: the first entry past the cursor expires at its ms + hold_ms, the first
-- lease ends at its score. An instance skips the drop until then (or until a note says a hold or a lease began).
local function next_due()
  local due = -1
  local after = redis.call('XRANGE', E, '(' .. cursor, '+', 'COUNT', 1)
  if #after > 0 then due = parse_id(after[1][1]) + hold_ms end
  local lease = redis.call('ZRANGE', P, 0, 0, 'WITHSCORES')
  if #lease > 0 and (due < 0 or tonumber(lease[2]) < due) then due = tonumber(lease[2]) end
  if due < 0 then return -1 end
  return math.max(0, due - now)
end

-- Payments whose lease ran out: their instance died or paused between charging and answering. The caller fences
-- each in Postgres and then completes it (its purchase is stored) or releases it (its release is).
local stale = redis.call('ZRANGEBYSCORE', P, '-inf', string.format('%d', now), 'LIMIT', 0, tonumber(ARGV[1]))
if upto < 0 then return { 0, 0, stale, next_due() } end
local entries = redis.call('XRANGE', E, '(' .. cursor, string.format('%d', upto), 'COUNT', tonumber(ARGV[1]))
local out, recs, units = { 0, #entries, stale, 0 }, {}, 0
for _, entry in ipairs(entries) do
  local id, f = entry[1], entry[2]
  if f[1] == 'r' then
    local rec = f[2]
    for idx = 0, #rec / REC - 1 do
      local off = idx * REC
      local q = tonumber(string.sub(rec, off + 33, off + 36))
      local ref = id .. ':' .. idx
      if q and q > 0 and not redis.call('HGET', S, ref) then
        local member = string.sub(rec, off + 1, off + 32)
        redis.call('HINCRBY', M, member, -q)
        units = units + q
        recs[#recs + 1] = ref .. ',' .. member .. ',' .. q .. ',e;'
        out[#out + 1] = ref
        out[#out + 1] = member
        out[#out + 1] = q
      end
    end
  end
  cursor = id
end
if #entries > 0 then redis.call('HSET', C, 'reaped', cursor) end
if units > 0 then
  local avail = redis.call('HINCRBY', C, 'avail', units)
  redis.call('HINCRBY', C, 'held', -units)
  redis.call('XADD', E, '*', 'x', table.concat(recs))
  note('x', avail)
end
out[1] = #recs
out[4] = next_due()
return out
