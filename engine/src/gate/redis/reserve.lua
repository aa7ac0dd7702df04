-- Places a batch of holds. ARGV[1]: the requests' records back to back, each as it will be stored: 32 hex chars
-- of the member and 4 digits of the quantity. ARGV[2]: the most records one stream entry holds.
-- Returns { 0, entry ids (space-separated, '' when nothing was granted), available after, outcomes } where outcomes
-- is '' when every request was granted, else one letter per request: 'g' granted, 's' sold out, 'l' limit
-- exceeded. The granted holds are the records of the entries in order, ARGV[2] to an entry: a later transition of
-- one hold reads its whole entry (XRANGE), and a string entering Lua is hashed whole, so a large entry would make
-- every transition of its holds pay for all of them. Returns { -1 } when the drop is not loaded.
-- Per request: one HINCRBY (two when refused) and one 32-byte string. Per call: one HMGET, two HINCRBY, one XADD
-- per ARGV[2] grants and one PUBLISH (the note that wakes the instances' journals).
local cfg = redis.call('HMGET', C, 'avail', 'limit')
if not cfg[1] then return { -1 } end
local avail, limit = tonumber(cfg[1]), tonumber(cfg[2])
local all = ARGV[1]
local count = #all / REC
local outcomes, units, refused = {}, 0, false
for i = 1, count do
  local off = (i - 1) * REC
  if avail == 0 then
    outcomes[i] = 's'
    refused = true
  else
    local d1, d2, d3, d4 = string.byte(all, off + 33, off + 36)
    local q = (d1 - 48) * 1000 + (d2 - 48) * 100 + (d3 - 48) * 10 + (d4 - 48)
    local member = string.sub(all, off + 1, off + 32)
    local n = redis.call('HINCRBY', M, member, q)
    if n > limit then
      redis.call('HINCRBY', M, member, -q)
      outcomes[i] = 'l'
      refused = true
    elseif q > avail then
      redis.call('HINCRBY', M, member, -q)
      outcomes[i] = 's'
      refused = true
    else
      avail = avail - q
      units = units + q
      outcomes[i] = 'g'
    end
  end
end
local entry = ''
if units > 0 then
  local records = all
  if refused then
    local granted = {}
    for i = 1, count do
      if outcomes[i] == 'g' then
        local off = (i - 1) * REC
        granted[#granted + 1] = string.sub(all, off + 1, off + REC)
      end
    end
    records = table.concat(granted)
  end
  redis.call('HINCRBY', C, 'avail', -units)
  redis.call('HINCRBY', C, 'held', units)
  local span = (tonumber(ARGV[2]) or count) * REC
  local entries = {}
  for from = 1, #records, span do
    entries[#entries + 1] = redis.call('XADD', E, '*', 'r', string.sub(records, from, from + span - 1))
  end
  entry = table.concat(entries, ' ')
  note('r', avail)
end
if not refused then return { 0, entry, avail, '' } end
return { 0, entry, avail, table.concat(outcomes) }
