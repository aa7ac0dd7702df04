-- Shared by every script of the Redis gate (prepended to each body). KEYS of every script are the same five
-- keys of one drop, all under the hash tag {drop:<id>} so a script runs on Redis Cluster unchanged:
--   KEYS[1] c: hash of counters and settings (stock, avail, held, paid, limit, hold_ms, reaped)
--   KEYS[2] m: hash member -> units held, paying or paid
--   KEYS[3] s: hash hold ref -> state, for holds that left `held` ("p:<lease until ms>", "P", "x:c|e|d")
--   KEYS[4] e: the drop's stream: every hold (in reserve entries) and every release, in order
--   KEYS[5] p: sorted set hold ref -> lease end (ms) of the holds being paid, so the reaper finds payments whose
--              instance died
-- A hold is record `idx` of reserve entry `<ms>-<seq>` (field "r": fixed-width records of 32 hex member chars and
-- 4 quantity digits). Its ref is "<ms>-<seq>:<idx>". It was created at <ms> (Redis's clock) and expires at
-- <ms> + hold_ms. A hold with no state that the reaper's cursor has passed was released as expired.
local C, M, S, E, P = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local REC = 36

-- Tells every instance that this drop's stream or stock moved (notes.rs): PUBLISH on `<prefix>notes`, the prefix
-- and the drop read from the counters key, so no script needs another argument. The note is
-- "<drop>:<kind>:<available units or ->": kind r new holds, x released, l a payment's lease began, i loaded. Plain
-- PUBLISH, not SPUBLISH: on Redis Cluster it reaches a subscriber on any node, so one subscription per instance
-- hears every drop.
local function note(kind, avail)
  local prefix, drop = string.match(C, '^(.*){drop:([^}]*)}')
  redis.call('PUBLISH', prefix .. 'notes', drop .. ':' .. kind .. ':' .. (avail or '-'))
end

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function parse_id(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  return tonumber(ms), tonumber(seq)
end

-- a <= b for stream ids
local function id_le(a, b)
  local am, as = parse_id(a)
  local bm, bs = parse_id(b)
  return am < bm or (am == bm and as <= bs)
end

-- Reserve entries' records as this call read them (false: no reserve entry there), so the moves of one call that
-- name holds of one entry read it once.
local records = {}

-- The hold at record `idx` of entry `entry`, with its state; nil if there is no such hold.
local function find(entry, idx, hold_ms, reaped)
  local rec = records[entry]
  if rec == nil then
    local r = redis.call('XRANGE', E, entry, entry)
    rec = #r > 0 and r[1][2][1] == 'r' and r[1][2][2]
    records[entry] = rec
  end
  if not rec then return nil end
  local off = idx * REC
  if idx < 0 or off + REC > #rec then return nil end
  local q = tonumber(string.sub(rec, off + 33, off + 36))
  if not q or q == 0 then return nil end
  local ms = parse_id(entry)
  local ref = entry .. ':' .. idx
  local state = redis.call('HGET', S, ref)
  if not state then
    if reaped and id_le(entry, reaped) then state = 'x:e' else state = 'h' end
  end
  return { member = string.sub(rec, off + 1, off + 32), q = q, created = ms, expires = ms + hold_ms,
           ref = ref, state = state }
end

-- The answer of every transition script: { code, member, quantity, created_ms, expires_ms, state }.
local function view(code, h, state)
  return { code, h.member, h.q, h.created, h.expires, state or h.state }
end

-- Returns a hold's units to sale and records why, in the state hash and in the stream.
local function release(h, reason)
  redis.call('ZREM', P, h.ref)
  local avail = redis.call('HINCRBY', C, 'avail', h.q)
  redis.call('HINCRBY', C, 'held', -h.q)
  redis.call('HINCRBY', M, h.member, -h.q)
  redis.call('HSET', S, h.ref, 'x:' .. reason)
  redis.call('XADD', E, '*', 'x', h.ref .. ',' .. h.member .. ',' .. h.q .. ',' .. reason .. ';')
  note('x', avail)
  return 'x:' .. reason
end
