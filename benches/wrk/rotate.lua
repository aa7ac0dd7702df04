-- wrk script: POST (or GET) to one path, rotating the Authorization token over many members so each request is
-- a different buyer. Settings come from the environment:
--   WRK_TOKENS  file with one access token per line    WRK_PATH  the request path
--   WRK_METHOD  POST (default) or GET                  WRK_BODY  request body (default "{}")
--   WRK_PASSES  optional file with one admission pass per line, for the token on the same line of WRK_TOKENS
--               (sent as Admission-Pass: a queue drop's reservations)
-- At the end it prints the counts of 2xx, 409 and other answers, so a run shows it measured what it meant to.
local tokens = {}
local passes = {}
local index = 0
local path = os.getenv("WRK_PATH") or "/healthz"
local method = os.getenv("WRK_METHOD") or "POST"
local body = os.getenv("WRK_BODY") or "{}"
-- Counted per thread as plain numbers (wrk copies only plain values between threads).
ok, conflict, other = 0, 0, 0
local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  local file = os.getenv("WRK_TOKENS")
  if file then
    for line in io.lines(file) do
      if #line > 0 then table.insert(tokens, line) end
    end
  end
  local pass_file = os.getenv("WRK_PASSES")
  if pass_file then
    for line in io.lines(pass_file) do
      if #line > 0 then table.insert(passes, line) end
    end
  end
  -- Threads start at different offsets so they do not send the same member at once.
  index = math.random(0, math.max(#tokens - 1, 0))
end

function request()
  local headers = { ["Content-Type"] = "application/json" }
  if #tokens > 0 then
    index = index % #tokens + 1
    headers["Authorization"] = "Bearer " .. tokens[index]
    if passes[index] then headers["Admission-Pass"] = passes[index] end
  end
  if method == "GET" then return wrk.format("GET", path, headers) end
  return wrk.format(method, path, headers, body)
end

function response(status, headers, body)
  if status < 300 then ok = ok + 1 elseif status == 409 then conflict = conflict + 1 else other = other + 1 end
end

function done(summary, latency, requests)
  local total = { ok = 0, conflict = 0, other = 0 }
  for _, thread in ipairs(threads) do
    for key, _ in pairs(total) do total[key] = total[key] + thread:get(key) end
  end
  io.write(string.format("status 2xx=%d 409=%d other=%d\n", total.ok, total.conflict, total.other))
end
