-- Moves one hold. ARGV: entry id, index, operation, member (32 hex, '' when not checked), lease_ms.
-- Operations: begin (held -> paying, with a lease), complete (paying -> paid), abort (paying -> held, or released as
-- expired when past expiry), decline (paying -> released), cancel (held -> released), read (no change), and fence
-- (held or paying -> released as expired: Postgres refused the hold's purchase, see the service's fence). A payment
-- whose lease ran out is never taken over here: the service fences it in Postgres first, then completes or fences it.
-- Codes: -1 not loaded, 0 done, 1 not found, 2 not owner, 3 expired (released by this call), 4 already released,
-- 5 already paid, 6 payment in flight, 7 not paying.
local h, err = load_hold()
if not h then return err end
local op, member = ARGV[3], ARGV[4]
if op == 'read' then return view(0, h) end
if member ~= '' and member ~= h.member then return view(2, h) end
local st = h.state
local kind = string.sub(st, 1, 1)
local function refuse()
  if kind == 'P' then return view(5, h) end
  if kind == 'x' then return view(4, h) end
  if kind == 'p' then return view(6, h) end
  return view(7, h)
end
local now = now_ms()
if op == 'begin' then
  if kind ~= 'h' then return refuse() end
  if now >= h.expires then return view(3, h, release(h, 'e')) end
  local lease_end = now + tonumber(ARGV[5])
  local lease = 'p:' .. string.format("%d", lease_end)
  redis.call('HSET', S, h.ref, lease)
  redis.call('ZADD', P, lease_end, h.ref)
  note('l')
  return view(0, h, lease)
end
if op == 'complete' then
  if kind ~= 'p' then return refuse() end
  redis.call('ZREM', P, h.ref)
  redis.call('HSET', S, h.ref, 'P')
  redis.call('HINCRBY', C, 'held', -h.q)
  redis.call('HINCRBY', C, 'paid', h.q)
  redis.call('XADD', E, '*', 'p', h.ref)
  note('p')
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
return redis.error_reply('unknown operation ' .. op)
