#!/usr/bin/env bash
# The hot path at wire speed: wrk against a release `flashsale serve` on this machine, side by side in one run:
#   healthz    GET /healthz (the floor: hyper, the kernel, wrk)
#   reserve    POST /api/v1/drops/{id}/reservations while stock lasts (a new buyer per request, rotating tokens)
#   sold_out   the same POST on a sold-out drop (rejected from the local flag)
#   reserve_queue  the same POST on a queue drop, each buyer with its admission pass (checked with no I/O)
#   queue_join     POST /api/v1/drops/{id}/queue by buyers already in that queue (their place, answered again: the
#                  script's read path; a first join adds one ZADD and one HSET)
#   queue_poll     GET /api/v1/drops/{id}/queue/me (a waiting room's status poll)
# The three alternate for WIRE_ROUNDS rounds (default 3), each round's ratios against its own healthz. Prints one
# line per path with the median req/s, the median ratio to healthz and every round's ratio, and writes them to
# $WIRE_OUT (default target/wire.tsv). Each run is `wrk -t1 -c64 -d${WIRE_SECONDS}s` (the issue's method); the
# generator is measured too (`cpu%` of wrk) to show it is not the bottleneck.
#
#   scripts/wire.sh [--redis]    --redis: the server uses the Redis gate (REDIS_URL from services.sh)
#
# Then it sells a drop of WIRE_SELL_UNITS (default 100000) end to end, reserve and pay, with
# `shell-api/examples/sell_out.rs` (WIRE_SELL_BUYERS concurrent buyers, default 2000), and reports the seconds it
# took and where they went: each stage's latency (buyers' view and server's), the writer's batches, and the CPU time
# of the server, Postgres, Redis and the generator against the machine's (WIRE_SELL_ONLY=1 runs only this part).
# Last, reserve latency at a fixed offered rate (WIRE_RATE_RPS, default 10000, for 10 s) from `flashsale-load
# rate --reserve`, which counts each request's latency from its intended send time (no coordinated omission).
# Settings: WIRE_MEMBERS (buyers, default 1000), WIRE_SECONDS (per path, default 5), WIRE_CONNECTIONS (64);
# WIRE_QUICK=1 stops after the wrk rounds (for profiles and before/after runs).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"
cd "$ROOT"
MEMBERS=${WIRE_MEMBERS:-1000}
SECONDS_PER_RUN=${WIRE_SECONDS:-5}
CONNECTIONS=${WIRE_CONNECTIONS:-64}
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
OUT=${WIRE_OUT:-$TARGET/wire.tsv}
DB=flashsale_wire
REDIS=0
if [ "${1:-}" = "--redis" ]; then REDIS=1; fi

say() { printf 'wire: %s\n' "$*" >&2; }
die() {
  say "error: $*"
  exit 2
}

command -v wrk >/dev/null 2>&1 || {
  say "installing wrk"
  apt-get install -y wrk >/dev/null 2>&1 || { apt-get update >/dev/null 2>&1 && apt-get install -y wrk >/dev/null 2>&1; } ||
    die "wrk is missing and could not be installed"
}
eval "$("$ROOT/scripts/services.sh")"
cargo build --release -q -p shell-api --bin flashsale --example sell_out
cargo build --release -q -p loadtest
# WIRE_BIN: another flashsale binary to measure (e.g. an older build, for a before/after in one sitting).
BIN="${WIRE_BIN:-$TARGET/release/flashsale}"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/flashsale-wire.XXXXXX")
SERVER_PID=
cleanup() {
  if [ -n "$SERVER_PID" ]; then kill -TERM "$SERVER_PID" 2>/dev/null || true; wait "$SERVER_PID" 2>/dev/null || true; fi
  rm -rf "$WORK"
}
trap cleanup EXIT

admin_url=$(printf '%s' "$DATABASE_URL" | sed -E 's#^([a-zA-Z][a-zA-Z0-9+.-]*://[^/?]*)(/[^?]*)?#\1/postgres#')
psql -X -q -d "$admin_url" -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)" >/dev/null
db_url=$(printf '%s' "$DATABASE_URL" | sed -E "s#^([a-zA-Z][a-zA-Z0-9+.-]*://[^/?]*)(/[^?]*)?#\1/$DB#")

env_args=(DATABASE_URL="$db_url" BIND_ADDR=127.0.0.1:0 JWT_SECRET=wire-bench-secret RUST_LOG=warn
  RESERVE_INFLIGHT_MAX=100000 PAY_INFLIGHT_MAX=4096 ACCESS_TOKEN_SECONDS=3600)
if [ "$REDIS" = 1 ]; then
  env_args+=(REDIS_URL="$REDIS_URL" REDIS_KEY_PREFIX="wire-$$-$(date +%s):")
else
  env_args+=(REDIS_URL=)
fi
env "${env_args[@]}" "$BIN" migrate >/dev/null
env "${env_args[@]}" "$BIN" admin create --email admin@wire.local --password wire-admin-password >/dev/null
env "${env_args[@]}" "$BIN" serve >"$WORK/server.out" 2>"$WORK/server.err" &
SERVER_PID=$!
for _ in $(seq 1 600); do
  grep -q '^listening on ' "$WORK/server.out" 2>/dev/null && break
  kill -0 "$SERVER_PID" 2>/dev/null || die "server exited: $(tail -5 "$WORK/server.err")"
  sleep 0.1
done
BASE=$(sed -n 's/^listening on //p' "$WORK/server.out" | head -1)
[ -n "$BASE" ] || die "server did not start"
say "server at $BASE ($([ "$REDIS" = 1 ] && echo 'Redis gate' || echo 'embedded gate'))"

json() { python3 -c "import json,sys; print(json.load(sys.stdin)$1)"; }
post() { curl -fsS -X POST "$BASE$1" -H 'content-type: application/json' ${3:+-H "authorization: Bearer $3"} -d "$2"; }
admin=$(post /api/v1/auth/login '{"email":"admin@wire.local","password":"wire-admin-password"}' | json '["access_token"]')
product=$(post /api/v1/products '{"name":"Wire sneakers","price":1000,"kind":"preorder"}' "$admin" | json '["id"]')
opens=$(date -u -d '-1 second' +%Y-%m-%dT%H:%M:%SZ)
# A drop on sale for the reservation runs (a new one each round, so every round sells from a fresh book).
live_drop() {
  post /api/v1/drops "{\"product_id\":\"$product\",\"stock\":10000000,\"opens_at\":\"$opens\",\"per_member_limit\":1000}" "$admin" |
    json '["id"]'
}
gone=$(post /api/v1/drops "{\"product_id\":\"$product\",\"stock\":1,\"opens_at\":\"$opens\"}" "$admin" | json '["id"]')
post "/api/v1/drops/$gone/reservations" '{}' "$admin" >/dev/null

say "signing up and logging in $MEMBERS buyers"
seq 1 "$MEMBERS" | xargs -P 8 -I{} sh -c '
  curl -fsS -X POST "$0/api/v1/members" -H "content-type: application/json" \
    -d "{\"email\":\"buyer{}@wire.local\",\"password\":\"wire-buyer-password\",\"name\":\"Buyer {}\"}" >/dev/null &&
  curl -fsS -X POST "$0/api/v1/auth/login" -H "content-type: application/json" \
    -d "{\"email\":\"buyer{}@wire.local\",\"password\":\"wire-buyer-password\"}"' "$BASE" |
  python3 -c 'import sys,json
for line in sys.stdin.read().replace("}{","}\n{").splitlines():
    print(json.loads(line)["access_token"])' >"$WORK/tokens"
[ "$(wc -l <"$WORK/tokens")" -eq "$MEMBERS" ] || die "expected $MEMBERS tokens, got $(wc -l <"$WORK/tokens")"

# CPU time (clock ticks, user + system) of processes.
cpu_of() { # pids...
  local pid total=0
  for pid in "$@"; do
    [ -r "/proc/$pid/stat" ] || continue
    total=$((total + $(sed 's/.*) //' "/proc/$pid/stat" | awk '{print $12 + $13}')))
  done
  printf '%s' "$total"
}
# Postgres's and Redis's CPU ticks now, "postgres redis".
stores_cpu() { printf '%s %s' "$(cpu_of $(pgrep -x postgres || true))" "$(cpu_of $(pgrep -x redis-server || true))"; }
TICKS_PER_SECOND=$(getconf CLK_TCK)

# One wrk run; prints "req/s wrk_cpu% statuses". With WIRE_PERF=<name>[,<name>...], the server is profiled (perf
# record) during the runs of those names, into target/wire-<name>.perf.data (the whole machine with WIRE_PERF_ALL=1;
# WIRE_PERF_CALL_GRAPH=dwarf for call stacks through code without frame pointers, WIRE_PERF_HZ for the rate).
run() {
  local name=$1 path=$2 method=$3 out perf_pid=
  if [[ ",${WIRE_PERF:-}," == *",$name,"* ]]; then
    local scope=(-p "$SERVER_PID")
    if [ -n "${WIRE_PERF_ALL:-}" ]; then scope=(-a); fi
    perf record -F "${WIRE_PERF_HZ:-999}" --call-graph "${WIRE_PERF_CALL_GRAPH:-fp}" "${scope[@]}" -o "$TARGET/wire-$name.perf.data" -- sleep "$SECONDS_PER_RUN" >/dev/null 2>&1 &
    perf_pid=$!
  fi
  # The server's CPU time over the run (perf's task-clock, all its threads): CPU per request does not depend on
  # what else the machine is doing the way req/s does.
  perf stat -e task-clock,context-switches,raw_syscalls:sys_enter -p "$SERVER_PID" -o "$WORK/stat-$name" -- sleep "$SECONDS_PER_RUN" >/dev/null 2>&1 &
  local stat_pid=$! stores_before
  stores_before=$(stores_cpu)
  out=$(WRK_TOKENS="$WORK/tokens" WRK_PATH="$path" WRK_METHOD="$method" \
    /usr/bin/time -f 'cpu %P' wrk -t1 -c"$CONNECTIONS" -d"${SECONDS_PER_RUN}s" -s "$ROOT/benches/wrk/rotate.lua" "$BASE" 2>&1)
  local stores_after
  stores_after=$(stores_cpu)
  wait "$stat_pid" || true
  local rps cpu statuses requests server_ms
  rps=$(printf '%s\n' "$out" | awk '/Requests\/sec/ {print $2}')
  requests=$(printf '%s\n' "$out" | awk '/requests in/ {print $1}')
  server_ms=$(awk '/task-clock/ {gsub(",", "", $1); print $1}' "$WORK/stat-$name")
  cpu=$(printf '%s\n' "$out" | awk '/^cpu / {print $2}')
  statuses=$(printf '%s\n' "$out" | grep '^status ' | tr '\n' ' ' || true)
  if [ -n "$perf_pid" ]; then wait "$perf_pid" || true; fi
  # Syscalls and context switches per request, to stderr: where the kernel's share of a request comes from.
  awk -v n="$requests" -v name="$name" '/context-switches/ {gsub(",", "", $1); cs=$1}
    /raw_syscalls/ {gsub(",", "", $1); sc=$1}
    END {if (n > 0) printf "wire: %s: %.2f syscalls and %.3f context switches per request\n", name, sc/n, cs/n}' \
    "$WORK/stat-$name" >&2
  # What the stores spent per request (clock ticks: about ±10 ms over the run): the server's work is not all of it.
  local pg_before redis_before pg_after redis_after
  read -r pg_before redis_before <<<"$stores_before"
  read -r pg_after redis_after <<<"$stores_after"
  awk -v n="$requests" -v name="$name" -v hz="$TICKS_PER_SECOND" -v pg=$((pg_after - pg_before)) -v rd=$((redis_after - redis_before)) \
    'BEGIN {if (n > 0) printf "wire: %s: Postgres %.1f and Redis %.1f us of CPU per request\n", name, pg*1e6/hz/n, rd*1e6/hz/n}' >&2
  printf '%s\t%s\t%s\t%s\n' "$rps" "$cpu" "$(python3 -c "print(f'{$server_ms*1000/$requests:.1f}')")" "$statuses"
}

# Waits (at most 10 s) until the server's writer has taken every row queued, so what one run left to journal is not
# written during the next run and charged to it; says how long that took.
settle() {
  local waited=0 depth
  while [ "$waited" -lt 100 ]; do
    depth=$(curl -fsS "$BASE/metrics" 2>/dev/null | awk '/^flashsale_writer_queue_depth / {print int($2)}')
    [ "${depth:-0}" -eq 0 ] && break
    sleep 0.1
    waited=$((waited + 1))
  done
  sleep 0.2 # the batch being written
  [ "$waited" -eq 0 ] || say "waited $((waited * 100)) ms for the writer's queue (depth ${depth:-?})"
}

# A queue drop for the same buyers: all join, all are admitted (the stock is far larger), and each one's pass is
# written on the line of its token (WRK_PASSES), for the reserve_queue runs (a new drop each round, like the
# first-come one).
queue_drop() {
  local queue
  queue=$(post /api/v1/drops "{\"product_id\":\"$product\",\"stock\":10000000,\"opens_at\":\"$opens\",\"per_member_limit\":1000,\"mode\":\"queue\",\"pass_seconds\":3600}" "$admin" |
    json '["id"]')
  python3 - "$BASE" "$queue" "$WORK/tokens" "$WORK/passes" <<'PY' || die "the queue drop's buyers were not all admitted"
import json, sys, time, urllib.request
from concurrent.futures import ThreadPoolExecutor
base, queue, tokens_file, passes_file = sys.argv[1:5]
tokens = [line.strip() for line in open(tokens_file) if line.strip()]
def call(method, token):
    path = f"{base}/api/v1/drops/{queue}/queue" + ("/me" if method == "GET" else "")
    request = urllib.request.Request(path, method=method, headers={"authorization": f"Bearer {token}"})
    return json.load(urllib.request.urlopen(request))
with ThreadPoolExecutor(8) as pool:
    list(pool.map(lambda token: call("POST", token), tokens))
    for _ in range(50):  # admission steps run every 100 ms
        time.sleep(0.1)
        places = list(pool.map(lambda token: call("GET", token), tokens))
        if all(place["status"] == "admitted" for place in places):
            break
    else:
        sys.exit(1)
with open(passes_file, "w") as out:
    out.writelines(place["pass"] + "\n" for place in places)
PY
  printf '%s' "$queue"
}
# The paths alternate, WIRE_ROUNDS times (default 3): this machine's speed drifts by a quarter from one run to
# the next, so each round's ratios are taken against that round's own /healthz, and the rows are the medians (the
# ratio column is the median of the rounds' ratios; every round's ratio is listed beside it).
ROUNDS=${WIRE_ROUNDS:-3}
if [ -n "${WIRE_SELL_ONLY:-}" ]; then ROUNDS=0; fi
: >"$WORK/rounds"
for round in $(seq 1 "$ROUNDS"); do
  live=$(live_drop)
  queue=$(queue_drop)
  for row in "healthz	$(settle && run healthz /healthz GET)" \
    "reserve	$(settle && run reserve "/api/v1/drops/$live/reservations" POST)" \
    "sold_out	$(settle && run sold_out "/api/v1/drops/$gone/reservations" POST)" \
    "reserve_queue	$(settle && WRK_PASSES="$WORK/passes" run reserve_queue "/api/v1/drops/$queue/reservations" POST)" \
    "queue_join	$(settle && run queue_join "/api/v1/drops/$queue/queue" POST)" \
    "queue_poll	$(settle && run queue_poll "/api/v1/drops/$queue/queue/me" GET)"; do
    printf '%s\t%s\n' "$round" "$row" >>"$WORK/rounds"
  done
  say "round $round: $(awk -F'\t' -v r="$round" '$1 == r {printf "%s %s req/s  ", $2, $3}' "$WORK/rounds")"
done
# path, median req/s, median ratio to the same round's healthz, median wrk CPU, median server µs/req, the answers
# summed over the rounds, each round's ratio.
medians() {
  python3 - "$WORK/rounds" <<'PY'
import statistics, sys
rounds = {}
for line in open(sys.argv[1]):
    rnd, path, rps, cpu, us, statuses = (line.rstrip("\n").split("\t") + [""] * 6)[:6]
    rounds.setdefault(path, []).append((int(rnd), float(rps), cpu, float(us), statuses))
healthz = {r[0]: r[1] for r in rounds["healthz"]}
for path, rows in rounds.items():
    ratios = [rps / healthz[rnd] for rnd, rps, *_ in rows]
    counts = {}
    for *_, statuses in rows:
        for part in statuses.split():
            if "=" in part:
                key, value = part.split("=")
                counts[key] = counts.get(key, 0) + int(value)
    answers = "status " + " ".join(f"{k}={v}" for k, v in counts.items())
    refused = counts.get("409", 0) + counts.get("other", 0)
    if path in ("reserve", "reserve_queue") and refused:
        # Each buyer may hold 1,000 units: past WIRE_MEMBERS x 1,000 reservations in a run the rest are refusals,
        # which are cheaper, and the row no longer measures reservations alone.
        total = sum(counts.values())
        print(f"wire: warning: {path}: {refused} of {total} answers were not grants (the buyers' limit of 1,000 each "
              f"ran out): this row mixes in refusals; raise WIRE_MEMBERS", file=sys.stderr)
    cpu = statistics.median(float(r[2].rstrip("%")) for r in rows)
    print("\t".join([path, f"{statistics.median(r[1] for r in rows):.2f}", f"{statistics.median(ratios):.2f}",
                     f"{cpu:.0f}%", f"{statistics.median(r[3] for r in rows):.1f}", answers,
                     " ".join(f"{x:.2f}" for x in ratios)]))
PY
}
# What a waiting member costs in Redis: a queue drop that opens in an hour, joined by every buyer, then the memory of
# its waiting line and member states over the buyers (MEMORY USAGE, samples 0: every element counted).
queue_memory=
if [ "$REDIS" = 1 ] && [ "$ROUNDS" -gt 0 ]; then
  later=$(date -u -d '+1 hour' +%Y-%m-%dT%H:%M:%SZ)
  waiting=$(post /api/v1/drops "{\"product_id\":\"$product\",\"stock\":10,\"opens_at\":\"$later\",\"queue_opens_at\":\"$opens\",\"mode\":\"queue\"}" "$admin" | json '["id"]')
  xargs -P 8 -I{} curl -fsS -o /dev/null -X POST "$BASE/api/v1/drops/$waiting/queue" -H "authorization: Bearer {}" \
    <"$WORK/tokens"
  prefix=$(printf '%s' "${env_args[*]}" | grep -o 'REDIS_KEY_PREFIX=[^ ]*' | cut -d= -f2)
  bytes=0
  for key in qw qs; do
    used=$(redis-cli -u "$REDIS_URL" MEMORY USAGE "$prefix{drop:$waiting}:$key" SAMPLES 0)
    bytes=$((bytes + ${used:-0}))
  done
  queue_memory=$(python3 -c "print(f'{$bytes / $MEMBERS:.0f}')")
  say "queue: $queue_memory bytes of Redis memory per waiting member ($MEMBERS waiting)"
fi
if [ -n "${WIRE_POST_FLOOR:-}" ]; then
  # The same POST (headers and body) to /healthz, answered 405 by the router's fallback: what a POST costs the
  # server before any handler runs.
  run post_floor /healthz POST | sed 's/^/post_floor\t/' >&2
fi
HEADER='path\treq_per_s\tratio_to_healthz\twrk_cpu\tserver_cpu_us_per_req\tstatuses\trounds\n'
if [ -n "${WIRE_QUICK:-}" ]; then
  # Only the wrk rows (for profiling and before/after runs of the request path), to $WIRE_OUT as well.
  { printf '%b' "$HEADER"; medians; } | tee "$OUT"
  exit 0
fi
sell_units=${WIRE_SELL_UNITS:-100000}
sell_buyers=${WIRE_SELL_BUYERS:-2000}
sell_drop=$(post /api/v1/drops "{\"product_id\":\"$product\",\"stock\":$sell_units,\"opens_at\":\"$opens\",\"per_member_limit\":1000}" "$admin" | json '["id"]')
say "selling $sell_units units end to end, $sell_buyers buyers"
settle
# CPU time (clock ticks) of the machine, before and after, and the server's metrics.
cpu_snapshot() {
  printf 'server %s\npostgres %s\nredis %s\n' "$(cpu_of "$SERVER_PID")" \
    "$(cpu_of $(pgrep -x postgres || true))" "$(cpu_of $(pgrep -x redis-server || true))"
  awk '/^cpu / {print "machine_busy", $2 + $3 + $4 + $7 + $8 + $9; print "machine_all", $2 + $3 + $4 + $5 + $6 + $7 + $8 + $9}' /proc/stat
}
cpu_snapshot >"$WORK/cpu.before"
if [ "$REDIS" = 1 ]; then redis-cli -u "$REDIS_URL" INFO commandstats >"$WORK/redis.before"; fi
curl -fsS "$BASE/metrics" >"$WORK/metrics.before"
# WIRE_SELL_PERF=<file>: the server is profiled (perf record) through the sell-out, with call graphs by frame pointer
# (WIRE_PERF_CALL_GRAPH=dwarf for stacks through code without them; WIRE_PERF_ALL=1 for the whole machine).
sell_perf=
if [ -n "${WIRE_SELL_PERF:-}" ]; then
  sell_scope=(-p "$SERVER_PID")
  if [ -n "${WIRE_PERF_ALL:-}" ]; then sell_scope=(-a); fi
  perf record -F "${WIRE_PERF_HZ:-999}" --call-graph "${WIRE_PERF_CALL_GRAPH:-fp}" "${sell_scope[@]}" -o "$WIRE_SELL_PERF" >/dev/null 2>&1 &
  sell_perf=$!
fi
sell=$("$TARGET/release/examples/sell_out" "$BASE" "$sell_drop" "$WORK/tokens" "$sell_buyers" "$SERVER_PID")
if [ -n "$sell_perf" ]; then kill -INT "$sell_perf" && wait "$sell_perf" || true; fi
cpu_snapshot >"$WORK/cpu.after"
curl -fsS "$BASE/metrics" >"$WORK/metrics.after"
printf '%s\n' "$sell" | sed 's/^/wire: /' >&2
if [ "$REDIS" = 1 ]; then
  # Where Redis's time went: its commands by total time over the sell-out (scripts' inner commands count both in
  # their script's time and in their own lines).
  redis-cli -u "$REDIS_URL" INFO commandstats >"$WORK/redis.after"
  python3 - "$WORK/redis.before" "$WORK/redis.after" "$sell_units" <<'PY' >&2
import re, sys
def stats(path):
    out = {}
    for line in open(path):
        m = re.match(r"cmdstat_([^:]+):calls=(\d+),usec=(\d+)", line.strip())
        if m:
            out[m.group(1)] = (int(m.group(2)), int(m.group(3)))
    return out
before, after, units = stats(sys.argv[1]), stats(sys.argv[2]), int(sys.argv[3])
rows = []
for name, (calls, usec) in after.items():
    c0, u0 = before.get(name, (0, 0))
    if calls > c0:
        rows.append((usec - u0, calls - c0, name))
for usec, calls, name in sorted(rows, reverse=True)[:10]:
    print(f"wire: redis {name}: {calls} calls ({calls / units:.2f} per unit), {usec / 1e6:.2f} s, "
          f"{usec / calls:.1f} us each")
PY
  # What a sold drop keeps in Redis, key by key (MEMORY USAGE, every element counted), over its units.
  prefix=$(printf '%s' "${env_args[*]}" | grep -o 'REDIS_KEY_PREFIX=[^ ]*' | cut -d= -f2)
  redis_bytes=0
  for key in $(redis-cli -u "$REDIS_URL" --scan --pattern "$prefix{drop:$sell_drop}:*"); do
    used=$(redis-cli -u "$REDIS_URL" MEMORY USAGE "$key" SAMPLES 0)
    say "redis $key: ${used:-0} bytes"
    redis_bytes=$((redis_bytes + ${used:-0}))
  done
  say "redis: $redis_bytes bytes for the drop, $((redis_bytes / sell_units)) per unit sold"
fi
sell_seconds=$(printf '%s\n' "$sell" | head -1 | awk '{print $5}')
sell_rate=$(printf '%s\n' "$sell" | head -1 | sed -E 's/.*\(([0-9]+) units\/s\).*/\1/')
# Where the seconds went: CPU by process against the machine's, the server's own time per stage, the writer.
python3 - "$WORK" "$sell_seconds" "$(getconf CLK_TCK)" "$(nproc)" "$sell" <<'PY' >&2
import re, sys
work, wall, hz, cores, sell = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
def snap(name):
    return {k: int(v) for k, v in (line.split() for line in open(f"{work}/{name}"))}
before, after = snap("cpu.before"), snap("cpu.after")
d = {k: (after[k] - before[k]) / hz for k in after}
gen = float(re.search(r"generator CPU ([0-9.]+) s", sell).group(1))
capacity = wall * cores
print(f"wire: sell CPU over {wall:.2f} s x {cores} cores = {capacity:.2f} core-s: machine busy "
      f"{d['machine_busy']:.2f} ({d['machine_busy'] / capacity:.0%}); server {d['server']:.2f}, postgres "
      f"{d['postgres']:.2f}, redis {d['redis']:.2f}, generator {gen:.2f}")
def metrics(name):
    out = {}
    for line in open(f"{work}/{name}"):
        m = re.match(r"^(\w+?)(_sum|_count)(\{.*\})? (\S+)$", line.strip())
        if m:
            out[(m.group(1), m.group(3) or "", m.group(2))] = float(m.group(4))
    return out
mb, ma = metrics("metrics.before"), metrics("metrics.after")
def delta(key):
    return ma.get(key, 0.0) - mb.get(key, 0.0)
series = sorted({(n, l) for (n, l, _) in ma})
for name, labels in series:
    count = delta((name, labels, "_count"))
    if count <= 0:
        continue
    total = delta((name, labels, "_sum"))
    if name == "flashsale_http_request_duration_seconds" and ("reservations" in labels or "payment" in labels):
        print(f"wire: server {labels}: {int(count)} answers, mean {total / count * 1000:.2f} ms")
    elif name == "flashsale_gate_call_seconds":
        print(f"wire: gate {labels}: {int(count)} calls, mean {total / count * 1000:.3f} ms")
    elif name == "flashsale_writer_batch_rows":
        print(f"wire: writer: {int(count)} batches, {total / count:.0f} rows each on average")
    elif name == "flashsale_writer_flush_seconds":
        print(f"wire: writer: {total:.2f} s committing ({total / wall:.0%} of the wall time), "
              f"mean {total / count * 1000:.1f} ms a batch")
PY
if [ "$ROUNDS" -eq 0 ]; then exit 0; fi
rate_rps=${WIRE_RATE_RPS:-10000}
say "reserve latency at $rate_rps req/s offered"
"$TARGET/release/flashsale-load" rate --base-url "$BASE" --admin-email admin@wire.local \
  --admin-password wire-admin-password --rps "$rate_rps" --seconds 10 --reserve --members 200 >"$WORK/rate.out" 2>&1 ||
  die "rate run failed: $(tail -5 "$WORK/rate.out")"
cat "$WORK/rate.out" >&2
{
  printf '%b' "$HEADER"
  medians
  printf 'sell_%s\t%s\t\t\t\tseconds %s buyers %s\n' "$sell_units" "$sell_rate" "$sell_seconds" "$sell_buyers"
  # "latency from the intended send time: p50 0.46 ms  p90 1.11 ms  p99 2.11 ms ..."
  latency=$(grep '^latency from the intended send time' "$WORK/rate.out" | sed 's/.*time: //')
  achieved=$(grep -o '= [0-9]* req/s achieved' "$WORK/rate.out" | awk '{print $2}')
  printf 'reserve_at_%s\t%s\t\t\t\t%s\n' "$rate_rps" "$achieved" "$latency"
  if [ -n "$queue_memory" ]; then printf 'queue_bytes_per_waiting\t%s\t\t\t\t\n' "$queue_memory"; fi
} | tee "$OUT"
