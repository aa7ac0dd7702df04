-- Moves holds: one or many in a call (a drop's transitions are batched like its reservations), each move as if
-- it ran alone; two moves of one hold in a call apply in order.
-- ARGV[1]: lease_ms; then four per move: entry id, index, operation, member (32 hex, '' when not checked).
-- Operations: begin (held -> paying, with a lease), complete (paying -> paid), abort (paying -> held, or released as
-- expired when past expiry), decline (paying -> released), cancel (held -> released), read (no change), and fence
-- (held or paying -> released as expired: Postgres refused the hold's purchase, see the service's fence). A payment
-- whose lease ran out is never taken over here: the service fences it in Postgres first, then completes or fences it.
-- Answers { -1 } when the drop is not loaded, else one answer per move, in order: { 1 } when there is no such hold,
-- else the hold's view with a code: 0 done, 2 not owner, 3 expired (released by this call), 4 already released,
-- 5 already paid, 6 payment in flight, 7 not paying.
-- `paid` needs no stream entry: the purchase was stored in Postgres before the gate was told, so the journal has
-- nothing to write for it.
local cfg = redis.call('HMGET', C, 'hold_ms', 'reaped')
if not cfg[1] then return { -1 } end
local hold_ms, reaped = tonumber(cfg[1]), cfg[2]
local lease_ms = tonumber(ARGV[1])
local now = now_ms()
local began = false

local function move(entry, idx, op, member)
  local h = find(entry, idx, hold_ms, reaped)
  if not h then return { 1 } end
  if op == 'read' then return view(0, h) end
  if member ~= '' and member ~= h.member then return view(2, h) end
  local kind = string.sub(h.state, 1, 1)
  local function refuse()
    if kind == 'P' then return view(5, h) end
    if kind == 'x' then return view(4, h) end
    if kind == 'p' then return view(6, h) end
    return view(7, h)
  end
  if op == 'begin' then
    if kind ~= 'h' then return refuse() end
    if now >= h.expires then return view(3, h, release(h, 'e')) end
    local lease_end = now + lease_ms
    local lease = 'p:' .. string.format("%d", lease_end)
    redis.call('HSET', S, h.ref, lease)
    redis.call('ZADD', P, lease_end, h.ref)
    began = true
    return view(0, h, lease)
  elseif op == 'complete' then
    if kind ~= 'p' then return refuse() end
    redis.call('ZREM', P, h.ref)
    redis.call('HSET', S, h.ref, 'P')
    redis.call('HINCRBY', C, 'held', -h.q)
    redis.call('HINCRBY', C, 'paid', h.q)
    return view(0, h, 'P')
  elseif op == 'abort' then
    if kind ~= 'p' then return refuse() end
    if now >= h.expires then return view(0, h, release(h, 'e')) end
    redis.call('ZREM', P, h.ref)
    redis.call('HDEL', S, h.ref)
    return view(0, h, 'h')
  elseif op == 'decline' then
    if kind ~= 'p' then return refuse() end
    return view(0, h, release(h, 'd'))
  elseif op == 'cancel' then
    if kind ~= 'h' then return refuse() end
    return view(0, h, release(h, 'c'))
  elseif op == 'fence' then
    if kind ~= 'h' and kind ~= 'p' then return refuse() end
    return view(0, h, release(h, 'e'))
  end
  error('unknown operation ' .. op)
end

local out = {}
for i = 2, #ARGV, 4 do
  out[#out + 1] = move(ARGV[i], tonumber(ARGV[i + 1]), ARGV[i + 2], ARGV[i + 3])
end
-- One note for every lease the call began: each ends lease_ms from now.
if began then note('l') end
return out
