-- Places a batch of holds. ARGV: member (32 hex chars), quantity, member, quantity, ...
-- Returns { 0, entry id ('' when nothing was granted), available after, result per request } where a result is
-- the hold's index in the entry, -1 sold out or -2 limit exceeded; or { -1 } when the drop is not loaded.
-- Per request: one HINCRBY (two when refused). Per call: one HMGET, two HINCRBY and one XADD.
local cfg = redis.call('HMGET', C, 'avail', 'limit')
if not cfg[1] then return { -1 } end
local avail, limit = tonumber(cfg[1]), tonumber(cfg[2])
local out, recs, units = { 0, '', 0 }, {}, 0
for i = 1, #ARGV, 2 do
  local member, q = ARGV[i], tonumber(ARGV[i + 1])
  if avail == 0 then
    out[#out + 1] = -1
  else
    local n = redis.call('HINCRBY', M, member, q)
    if n > limit then
      redis.call('HINCRBY', M, member, -q)
      out[#out + 1] = -2
    elseif q > avail then
      redis.call('HINCRBY', M, member, -q)
      out[#out + 1] = -1
    else
      avail = avail - q
      units = units + q
      out[#out + 1] = #recs
      recs[#recs + 1] = member .. string.format('%04d', q)
    end
  end
end
if units > 0 then
  redis.call('HINCRBY', C, 'avail', -units)
  redis.call('HINCRBY', C, 'held', units)
  out[2] = redis.call('XADD', E, '*', 'r', table.concat(recs))
end
out[3] = avail
return out
