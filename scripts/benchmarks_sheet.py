#!/usr/bin/env python3
"""Writes docs/BENCHMARKS.md from one run's criterion estimates and scripts/wire.sh tables (see scripts/bench.sh)."""
import csv, glob, json, os, platform, subprocess, sys

root, started = sys.argv[1], sys.argv[2]
target_dir = os.environ.get("CARGO_TARGET_DIR") or f"{root}/target"

def sh(cmd):
    try:
        return subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=30).stdout.strip()
    except Exception:
        return "?"

def per_second(path):
    with open(path) as f:
        return 1e9 / json.load(f)["mean"]["point_estimate"]

crit = {}
for path in glob.glob(f"{target_dir}/criterion/*/*/*/new/estimates.json"):
    name = path.split("/criterion/")[1].rsplit("/new/", 1)[0]
    crit[name] = per_second(path)

def wire(kind):
    rows = {}
    with open(f"{target_dir}/wire-{kind}.tsv") as f:
        for row in csv.DictReader(f, delimiter="\t"):
            rows[row["path"]] = row
    return rows

embedded, redis = wire("embedded"), wire("redis")

def fmt(n):
    return f"{n:,.0f}"

def optional_wire(kind):
    try:
        return wire(kind)
    except FileNotFoundError:
        return None

def optional_json(name):
    try:
        with open(f"{target_dir}/{name}") as f:
            return json.load(f)
    except FileNotFoundError:
        return None

def met(ok):
    return "met" if ok else "**missed**"

def launch_day():
    """#27's figures against its targets: serving per core beside shared, the opening burst, the idle cost."""
    per_core = {"embedded": optional_wire("embedded-per-core"), "Redis": optional_wire("redis-per-core")}
    if any(per_core.values()):
        w("")
        w("### Launch day (#27): a runtime per core, beside the shared runtime")
        w("")
        w("`SERVE_RUNTIMES=shared` is the rows above; `per-core` is `SERVE_RUNTIMES=per-core WIRE_QUICK=1 "
          "scripts/wire.sh [--redis]` in the same `bench.sh` run, each ratio against its own round's `/healthz`.")
        w("")
        w("| gate | `SERVE_RUNTIMES` | `/healthz` req/s (server µs) | reserve (rounds) | sold-out refusal (rounds) | targets |")
        w("|---|---|---|---|---|---|")
        for kind, shared in (("embedded", embedded), ("Redis", redis)):
            for runtimes, rows in (("shared", shared), ("per-core", per_core[kind])):
                if not rows:
                    continue
                h, r, o = rows["healthz"], rows["reserve"], rows["sold_out"]
                targets = ""
                if runtimes == "per-core":
                    ratio = float(r["ratio_to_healthz"])
                    if kind == "embedded":
                        refusal = float(o["ratio_to_healthz"])
                        targets = (f"reserve ≥ 0.85×: {met(ratio >= 0.85)}; sold-out ≥ 0.95×: {met(refusal >= 0.95)}; ")
                    else:
                        targets = f"reserve ≥ 0.7×: {met(ratio >= 0.7)}; "
                    faster = float(h["req_per_s"]) >= float(shared["healthz"]["req_per_s"])
                    targets += f"`/healthz` at least as fast as shared: {met(faster)}"
                w(f"| {kind} | {runtimes} | {fmt(float(h['req_per_s']))} ({h['server_cpu_us_per_req']}) | "
                  f"**{r['ratio_to_healthz']}×** ({r.get('rounds', '')}) | **{o['ratio_to_healthz']}×** "
                  f"({o.get('rounds', '')}) | {targets} |")
    bursts = [(gate, runtimes, optional_json(f"burst-{gate}-{runtimes}.json"))
              for runtimes in ("shared", "per-core") for gate in ("embedded", "redis")]
    if any(b for _, _, b in bursts):
        w("")
        w("### Launch day (#27): the opening burst")
        w("")
        w("`scripts/burst.sh [--redis]`: `BURST_CLIENTS` (16,000) connections open before the opening, each sends its reservation at "
          "the opening instant (`flashsale-load burst`, the generator on the same two cores); latencies from the "
          "opening. Targets: every client answered (201, 409, or 429 with `Retry-After`), 0 connection errors, "
          "0 5xx, the last answer within 1 s (embedded, one instance) or 2 s (Redis, three instances).")
        w("")
        w("| gate | `SERVE_RUNTIMES` | answered / clients | connection errors | answers | p50 / p99 / last | "
          "server RSS peak | target |")
        w("|---|---|---|---|---|---|---|---|")
        for gate, runtimes, b in bursts:
            label = "embedded, 1 instance" if gate == "embedded" else "Redis, 3 instances"
            if not b:
                w(f"| {label} | {runtimes} | not carried out | | | | | |")
                continue
            r = b["report"]
            answered = sum(r["answers"].values())
            answers = ", ".join(f"{k}: {fmt(v)}" for k, v in r["answers"].items())
            peak = ", ".join(f"{s['hwm_kb'] / 1024:.0f} MB" for s in r["servers"])
            w(f"| {label} | {runtimes} | {fmt(answered)} / {fmt(r['clients'])} | {fmt(r['connect_errors'])} | "
              f"{answers} | {r['p50_ms'] / 1000:.2f} / {r['p99_ms'] / 1000:.2f} / {r['max_ms'] / 1000:.2f} s | "
              f"{peak} | {b['within_ms'] / 1000:.0f} s: {met(b['passed'])} |")
    idle = optional_json("idle-cost.json")
    if idle:
        w("")
        w("### Launch day (#27): what live drops cost while idle")
        w("")
        w("`python3 scripts/idle_cost.py --instances 3 50 500 5000`: Redis gate, K open drops with one hold each, "
          "every drop loaded on every instance, then 10 s with no request. Target at 5,000 drops on 3 instances: "
          "under 1,000 Redis commands/s and under 2% CPU per instance.")
        w("")
        w("| live drops | instances | Redis commands/s | CPU per instance | RSS per instance | target |")
        w("|---|---|---|---|---|---|")
        for r in idle:
            target = ""
            if r["drops"] >= 5000:
                target = met(r["commands_per_s"] < 1000 and max(r["cpu_percent"]) < 2)
            w(f"| {fmt(r['drops'])} | {r['instances']} | {fmt(r['commands_per_s'])} | "
              f"{', '.join(f'{c:.2f}%' for c in r['cpu_percent'])} | {', '.join(f'{m:.0f} MB' for m in r['rss_mb'])} | "
              f"{target} |")

cpu = sh("lscpu | sed -n 's/^Model name: *//p'") or platform.processor()
memory = sh("free -g | awk '/Mem:/ {print $2}'")
postgres = sh("psql --version")
redis_version = sh("redis-server --version | cut -d' ' -f1-3")
wrk_version = sh("wrk --version 2>&1 | head -1 | cut -d' ' -f1-2")
commit = sh(f"git -C {root} rev-parse --short HEAD")
out = []
w = out.append
w("# Benchmarks")
w("")
w(f"Written by `scripts/bench.sh` on {started} at commit `{commit}`. "
  "Every ratio below comes from one run, its two sides measured one after the other on the same machine; "
  "run `scripts/bench.sh` to measure again.")
w("")
w(f"Machine: {os.cpu_count()} vCPUs ({cpu}), {memory} GiB, {platform.system()} {platform.release()}; {postgres}; "
  f"{redis_version}; {wrk_version}. Server, Postgres, Redis and the load generator share the machine.")
w("")
w("| | measured | baseline | ratio | target |")
w("|---|---|---|---|---|")
def wire_row(label, rows, name, target):
    r, h = rows[name], rows["healthz"]
    w(f"| {label} | {fmt(float(r['req_per_s']))} req/s ({r['server_cpu_us_per_req']} µs server CPU/req) | "
      f"`GET /healthz` {fmt(float(h['req_per_s']))} req/s ({h['server_cpu_us_per_req']} µs) | **{r['ratio_to_healthz']}×** "
      f"(rounds: {', '.join(r.get('rounds', '').split())}) | {target} |")
wire_row("(a) reserve while stock lasts, embedded gate", embedded, "reserve", "≥ 0.7×")
wire_row("(b) sold-out rejection, embedded gate", embedded, "sold_out", "≥ 0.85×")
wire_row("(a) reserve while stock lasts, Redis gate", redis, "reserve", "")
wire_row("(b) sold-out rejection, Redis gate", redis, "sold_out", "")
def queue_row(kind, rows):
    # The queue drop's reserve against the same round's first-come reserve: both ratios are to that round's
    # /healthz, so their quotient is the round's queue/first-come ratio.
    q, r = rows.get("reserve_queue"), rows.get("reserve")
    if not q or not r:
        return
    per_round = [a / b for a, b in zip(map(float, q["rounds"].split()), map(float, r["rounds"].split()))]
    median = sorted(per_round)[len(per_round) // 2]
    w(f"| (g) reserve with an admission pass, queue drop, {kind} gate | {fmt(float(q['req_per_s']))} req/s "
      f"({q['server_cpu_us_per_req']} µs server CPU/req) | first-come reserve {fmt(float(r['req_per_s']))} req/s "
      f"({r['server_cpu_us_per_req']} µs) | **{median:.2f}×** (rounds: {', '.join(f'{x:.2f}' for x in per_round)}) | ≥ 0.9× |")
    for name, label in (("queue_join", "joining again (the place answered)"), ("queue_poll", "status poll (`GET .../queue/me`)")):
        j = rows.get(name)
        if j:
            w(f"| (g) queue {label}, {kind} gate | {fmt(float(j['req_per_s']))} req/s ({j['server_cpu_us_per_req']} µs "
              f"server CPU/req) | `GET /healthz` {fmt(float(rows['healthz']['req_per_s']))} req/s | {j['ratio_to_healthz']}× | |")
    memory = rows.get("queue_bytes_per_waiting")
    if memory:
        w(f"| (g) Redis memory per waiting member | {memory['req_per_s']} bytes (`MEMORY USAGE` of the waiting line and "
          f"member states over the members waiting) | | | |")
queue_row("embedded", embedded)
queue_row("Redis", redis)
b, m, p = (crit.get(f"redis_gate_reserve/{n}/256", 0) for n in ("batched_gate", "one_evalsha_multiplexed", "one_evalsha_bb8_pool"))
if b and m:
    w(f"| (c) Redis gate, batched Lua | {fmt(b)} reservations/s | one EVALSHA per request: {fmt(m)}/s multiplexed, {fmt(p)}/s bb8 pool | **{b/m:.1f}×** | ≥ 4× and ≥ 250,000/s |")
for in_flight in (256, 1024):
    g, t = crit.get(f"writer/group_commit/{in_flight}", 0), crit.get(f"writer/transaction_per_purchase/{in_flight}", 0)
    if g and t:
        w(f"| (d) writer, batched insert (group commit), {in_flight:,} purchases in flight | {fmt(g)} purchases/s | one transaction per purchase: {fmt(t)}/s | **{g/t:.1f}×** | ≥ 20× |")
for kind, rows in (("embedded", embedded), ("Redis", redis)):
    sell = next((v for k, v in rows.items() if k.startswith("sell_")), None)
    if sell:
        units = sell["path"].split("_")[1]
        # "seconds 3.91 buyers 2000" (older sheets: "seconds 7.12", 128 buyers)
        fields = sell["statuses"].split()
        seconds = fields[1]
        buyers = int(fields[3]) if len(fields) > 3 else 128
        target = {"embedded": "≤ 4 s", "Redis": "≤ 6 s"}[kind] if buyers == 2000 else ""
        w(f"| (e) sell {int(units):,} units end to end (reserve + pay), {buyers:,} buyers, {kind} gate | {seconds} s | | {fmt(float(sell['req_per_s']))} units/s | {target} |")
for kind, rows in (("embedded", embedded), ("Redis", redis)):
    rate = next((v for k, v in rows.items() if k.startswith("reserve_at_")), None)
    if rate:
        offered = rate["path"].split("_")[-1]
        w(f"| (f) reserve latency at {int(offered):,} req/s offered, {kind} gate | {rate['statuses']} | | achieved {fmt(float(rate['req_per_s'] or 0))} req/s | |")
core = [(k, v) for k, v in sorted(crit.items()) if k.startswith("core_reserve/")]
if core:
    w("")
    w("Engine core (`core_reserve`, holds/s, `DropBook` beside one mutex over hash maps): " +
      ", ".join(f"{k.split('/', 1)[1]} {fmt(v)}" for k, v in core) + ".")
launch_day()
w("")
w("## How each is measured")
w("")
w("- (a), (b): `scripts/wire.sh [--redis]`: a release `flashsale serve`, then `wrk -t1 -c64 -d5s` with "
  "`benches/wrk/rotate.lua` rotating 1,000 buyers' tokens, on `GET /healthz`, on `POST /api/v1/drops/{id}/reservations` "
  "for a drop of 10,000,000 units (every answer a 201; the status counts are in the table below) and on the same POST "
  "for a sold-out drop (every answer a 409). The three alternate for three rounds (a fresh drop each round); each "
  "round's ratio is taken against that round's `/healthz`, because this machine's speed drifts by a quarter between "
  "runs minutes apart, and the table gives the medians with every round's ratio. Server CPU per request is perf's "
  "task-clock of the server over the run divided by the requests. wrk's own CPU (below) stays under one core, so "
  "the generator is not what saturates.")
w("- (c): `cargo bench -p benches --bench redis_gate`: 256 concurrent clients, a new member per hold, drops of "
  "100,000 units, the journal off; the baseline calls the same reserve script once per request.")
w("- (d): `cargo bench -p benches --bench writer`: 256, then 1,024 purchases in flight (the service's default "
  "`PAY_INFLIGHT_MAX`); the engine's writer (one pipelined transaction per batch) beside one transaction per "
  "purchase from a 16-connection pool, the same rows written, each answered only after its commit.")
w("- (e): `shell-api/examples/sell_out.rs` inside `scripts/wire.sh`: 2,000 concurrent buyers (`WIRE_SELL_BUYERS`) "
  "reserve and pay (`tok_ok`) until the drop answers `sold_out`; wall time from the first request to the last "
  "payment. The server runs with `PAY_INFLIGHT_MAX=4096`, above the buyers, so no payment waits out a 429; "
  "`WIRE_SELL_ONLY=1 scripts/wire.sh [--redis]` runs this part alone and prints where the time went.")
w("- (f): `flashsale-load rate --reserve` inside `scripts/wire.sh`: a constant arrival rate over 64 raw HTTP/1.1 "
  "connections; latency counts from each request's intended send time, so a stall shows in every request it delayed.")
w("")
w("## wire.sh rows")
w("")
wire_tables = [("embedded gate", embedded), ("Redis gate", redis),
               ("embedded gate, `SERVE_RUNTIMES=per-core`", optional_wire("embedded-per-core")),
               ("Redis gate, `SERVE_RUNTIMES=per-core`", optional_wire("redis-per-core"))]
for kind, rows in ((k, r) for k, r in wire_tables if r):
    w(f"{kind}:")
    w("")
    w("| path | req/s | ratio | rounds' ratios | wrk CPU | server µs/req | answers |")
    w("|---|---|---|---|---|---|---|")
    for r in rows.values():
        w(f"| {r['path']} | {r['req_per_s']} | {r['ratio_to_healthz']} | {r.get('rounds') or ''} | {r['wrk_cpu']} | "
          f"{r['server_cpu_us_per_req']} | {r['statuses']} |")
    w("")
# The hand-kept "Measurement log" of the sheet being replaced goes on unchanged after the new tables.
try:
    with open(f"{root}/docs/BENCHMARKS.md") as f:
        previous = f.read()
except FileNotFoundError:
    previous = ""
marker = "\n## Measurement log\n"
if marker in previous:
    w(marker.strip("\n"))
    w(previous.split(marker, 1)[1].rstrip("\n"))
print("\n".join(out))
