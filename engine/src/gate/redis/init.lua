-- Loads a drop's state from Postgres's record, unless Redis already has it. ARGV: stock, limit, hold_ms, paid
-- units, number of paid members N, then N pairs (member, units), then the number of paid hold refs K, then K refs
-- (marked paid, so a paid reservation reads as paid and is never paid twice), then pairs (entry id, records) of
-- live holds in ascending entry order, each written back under its own entry id so its reservation id finds it.
-- Returns 1 when it loaded the drop, 0 when Redis already had it.
if redis.call('EXISTS', C) == 1 then return 0 end
redis.call('DEL', M, S, E)
local stock, paid = tonumber(ARGV[1]), tonumber(ARGV[4])
local n = tonumber(ARGV[5])
local i = 6
for _ = 1, n do
  redis.call('HINCRBY', M, ARGV[i], tonumber(ARGV[i + 1]))
  i = i + 2
end
local k = tonumber(ARGV[i])
i = i + 1
for _ = 1, k do
  redis.call('HSET', S, ARGV[i], 'P')
  i = i + 1
end
local held = 0
while i <= #ARGV do
  local id, rec = ARGV[i], ARGV[i + 1]
  for idx = 0, #rec / REC - 1 do
    local off = idx * REC
    local q = tonumber(string.sub(rec, off + 33, off + 36))
    if q > 0 then
      held = held + q
      redis.call('HINCRBY', M, string.sub(rec, off + 1, off + 32), q)
    end
  end
  redis.call('XADD', E, id, 'r', rec)
  i = i + 2
end
if paid + held > stock then return redis.error_reply('restored state commits more than the stock') end
redis.call('HSET', C, 'stock', stock, 'avail', stock - paid - held, 'held', held, 'paid', paid,
  'limit', tonumber(ARGV[2]), 'hold_ms', tonumber(ARGV[3]), 'reaped', '0-0')
-- The journal's readers start after the restored holds, which Postgres already has.
redis.call('XGROUP', 'CREATE', E, 'journal', '$', 'MKSTREAM')
-- Instances that knew the drop before Redis lost it learn its units again (their sold-out flags).
note('i', stock - paid - held)
return 1
