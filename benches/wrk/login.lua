-- wrk script: a login storm. POSTs the same member's credentials to /api/v1/auth/login over and over (each one
-- costs the server an argon2 verification). Settings from the environment: WRK_EMAIL, WRK_PASSWORD.
-- At the end it prints the counts of 200, 429 and other answers.
local body = string.format('{"email":"%s","password":"%s"}', os.getenv("WRK_EMAIL") or "", os.getenv("WRK_PASSWORD") or "")
ok, limited, other = 0, 0, 0
local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

function request()
  return wrk.format("POST", "/api/v1/auth/login", { ["Content-Type"] = "application/json" }, body)
end

function response(status, headers, body)
  if status == 200 then ok = ok + 1 elseif status == 429 then limited = limited + 1 else other = other + 1 end
end

function done(summary, latency, requests)
  local o, l, x = 0, 0, 0
  for _, thread in ipairs(threads) do
    o = o + thread:get("ok"); l = l + thread:get("limited"); x = x + thread:get("other")
  end
  io.write(string.format("logins 200=%d 429=%d other=%d\n", o, l, x))
end
