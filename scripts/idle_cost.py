#!/usr/bin/env python3
"""What live drops cost while nothing happens, on the Redis gate: for each K, a private redis-server (so its INFO
counts only this run), a fresh database and N release servers on it; K open drops, one hold in each (taken through
the instances in turn) and every drop read once through every instance (so each instance has every drop loaded);
then, after a settle period, over IDLE seconds with no request at all: Redis commands per second (INFO stats
total_commands_processed, and INFO commandstats for the breakdown), each server's CPU (utime + stime from
/proc/PID/stat) and its RSS.

    python3 scripts/idle_cost.py [--instances N] [--idle S] [--settle S] [--stock U] [--sold-out] [--latency N]
                                 K [K ...]
      e.g. python3 scripts/idle_cost.py --instances 3 50 500 5000

The flashsale binary is FLASHSALE_BIN, else $CARGO_TARGET_DIR/release/flashsale (build it first, in the same
locked command: `flock /tmp/flashsale-cargo.lock sh -c 'cargo build --release -p shell-api &&
python3 scripts/idle_cost.py ...'`); it is copied before use. Services come from scripts/services.sh (Postgres, and
REDIS_SERVER_BIN for the private Redis). The database (IDLE_DB, default flashsale_idle) is dropped and recreated
for each K. --sold-out gives each drop exactly one unit, so every drop is sold out on every instance (the sold-out
flag's path); otherwise each drop keeps stock left. Prints one row per K and, with --json FILE, writes them. With
IDLE_PERF=FILE, perf records the first server over the window and its report goes to FILE. With --latency N, N
holds are then taken one at a time in idle drops and timed from the request to their row in Postgres (the journal's
latency from idle).
"""
import argparse
import concurrent.futures
import http.client
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from datetime import datetime, timedelta, timezone

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ADMIN_EMAIL = "admin@idle.flashsale.local"
ADMIN_PASSWORD = "idle-admin-password"
MEMBER_PASSWORD = "idle-member-password"
TICKS = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
# Requests in flight while setting up (each thread keeps one connection per server).
SETUP_THREADS = 8


def say(text):
    print(f"idle_cost: {text}", file=sys.stderr, flush=True)


def services():
    out = subprocess.run([os.path.join(ROOT, "scripts/services.sh")], capture_output=True, check=True, text=True)
    env = {}
    for line in out.stdout.splitlines():
        m = re.match(r"export (\w+)=(.*)$", line)
        if m:
            env[m.group(1)] = m.group(2).strip("'\"")
    return env


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Redis:
    """A private redis-server: INFO counts only what this run's servers send."""

    def __init__(self, binary, workdir):
        self.port = free_port()
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", workdir],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(100):
            if self.cli("PING") == "PONG":
                return
            time.sleep(0.05)
        raise RuntimeError("private redis-server did not answer")

    @property
    def url(self):
        return f"redis://127.0.0.1:{self.port}"

    def cli(self, *args):
        done = subprocess.run(["redis-cli", "-p", str(self.port), *args], capture_output=True, text=True)
        return done.stdout.strip()

    def info(self, section):
        fields = {}
        for line in self.cli("INFO", section).splitlines():
            if ":" in line:
                key, value = line.split(":", 1)
                fields[key] = value.strip()
        return fields

    def stop(self):
        self.proc.terminate()
        self.proc.wait(10)


class Api:
    """One keep-alive connection per server, per thread."""

    def __init__(self, urls):
        self.urls = urls
        self.local = threading.local()

    def call(self, instance, method, path, body=None, token=None, ok=(200, 201)):
        conns = getattr(self.local, "conns", None)
        if conns is None:
            conns = self.local.conns = {}
        for attempt in range(5):
            conn = conns.get(instance)
            if conn is None:
                parsed = urllib.parse.urlparse(self.urls[instance])
                conn = conns[instance] = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=30)
            headers = {"content-type": "application/json"}
            if token:
                headers["authorization"] = f"Bearer {token}"
            try:
                conn.request(method, "/api/v1" + path, body=json.dumps(body) if body is not None else None,
                             headers=headers)
                reply = conn.getresponse()
                data = reply.read()
            except (OSError, http.client.HTTPException):
                conn.close()
                conns.pop(instance, None)
                continue
            if reply.status in (429, 503):
                time.sleep(0.2 * (attempt + 1))
                continue
            if reply.status not in ok:
                raise RuntimeError(f"{method} {path} on instance {instance}: {reply.status} {data[:300]!r}")
            return json.loads(data) if data else None
        raise RuntimeError(f"{method} {path} on instance {instance}: no answer after retries")


def proc_cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # utime and stime are fields 14 and 15 of the whole line (1-based); after ") " the state is field 3.
    return (int(fields[11]) + int(fields[12])) / TICKS


def proc_rss_mb(pid):
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * PAGE / 1e6


def start_servers(binary, n, env, workdir):
    procs, urls = [], []
    for i in range(n):
        out = open(os.path.join(workdir, f"server-{i}.out"), "w")
        err = open(os.path.join(workdir, f"server-{i}.log"), "w")
        procs.append(subprocess.Popen([binary, "serve"], env=env, stdout=out, stderr=err))
    for i, proc in enumerate(procs):
        path = os.path.join(workdir, f"server-{i}.out")
        for _ in range(600):
            with open(path) as f:
                m = re.search(r"^listening on (http://\S+)$", f.read(), re.M)
            if m:
                urls.append(m.group(1))
                break
            if proc.poll() is not None:
                raise RuntimeError(f"server {i} exited; see {workdir}/server-{i}.log")
            time.sleep(0.1)
        else:
            raise RuntimeError(f"server {i} did not listen within 60 s")
    return procs, urls


def setup(api, drops, instances, stock):
    admin = api.call(0, "POST", "/auth/login", {"email": ADMIN_EMAIL, "password": ADMIN_PASSWORD})["access_token"]
    product = api.call(0, "POST", "/products", {"name": "Idle sneaker", "price": 1000, "currency": "KRW",
                                                 "kind": "preorder"}, admin)["id"]
    buyer, late_buyer = (member(api, name) for name in ("idle-buyer", "late-buyer"))
    opens = (datetime.now(timezone.utc) - timedelta(seconds=1)).isoformat()
    spec = {"product_id": product, "stock": stock, "opens_at": opens, "hold_seconds": 86_400}

    def one(i):
        drop = api.call(i % instances, "POST", "/drops", spec, admin)["id"]
        api.call(i % instances, "POST", f"/drops/{drop}/reservations", {"quantity": 1}, buyer)
        for other in range(instances):
            api.call(other, "GET", f"/drops/{drop}")
        return drop

    with concurrent.futures.ThreadPoolExecutor(SETUP_THREADS) as pool:
        return list(pool.map(one, range(drops))), late_buyer


def member(api, name):
    email = f"{name}@idle.flashsale.local"
    api.call(0, "POST", "/members", {"email": email, "password": MEMBER_PASSWORD, "name": name})
    return api.call(0, "POST", "/auth/login", {"email": email, "password": MEMBER_PASSWORD})["access_token"]


def journal_latency(api, database_url, drops, buyer, samples, instances):
    """Milliseconds from sending a reservation to its row in Postgres, on drops idle until then (one psql session
    polls, about 5 ms a query)."""
    psql = subprocess.Popen(["psql", "-X", "-At", "-d", database_url], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, bufsize=1)
    took = []
    try:
        for i in range(samples):
            drop = drops[i * len(drops) // samples]
            sent = time.monotonic()
            hold = api.call(i % instances, "POST", f"/drops/{drop}/reservations", {"quantity": 1}, buyer)["id"]
            while True:
                psql.stdin.write(f"SELECT count(*) FROM stored_holds WHERE id = '{hold}';\n")
                psql.stdin.flush()
                if psql.stdout.readline().strip() == "1":
                    break
                if time.monotonic() - sent > 10:
                    raise RuntimeError(f"hold {hold} not in Postgres after 10 s")
            took.append((time.monotonic() - sent) * 1000)
            time.sleep(0.5)
    finally:
        psql.stdin.close()
        psql.wait(10)
    took.sort()
    return {"samples": samples, "p50_ms": round(took[len(took) // 2], 1), "max_ms": round(took[-1], 1)}


def measure(redis, procs, idle):
    def sample():
        return (time.monotonic(), int(redis.info("stats")["total_commands_processed"]),
                {k: v for k, v in redis.info("commandstats").items()}, [proc_cpu_seconds(p.pid) for p in procs])

    t0, c0, s0, cpu0 = sample()
    perf = None
    if os.environ.get("IDLE_PERF"):
        # Where the first server's idle CPU goes: perf's report of the window goes to IDLE_PERF.
        perf = subprocess.Popen(["perf", "record", "-F", "999", "-g", "-o", os.environ["IDLE_PERF"] + ".data",
                                 "-p", str(procs[0].pid), "--", "sleep", str(idle)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(idle)
    t1, c1, s1, cpu1 = sample()
    if perf:
        perf.wait()
        with open(os.environ["IDLE_PERF"], "w") as out:
            subprocess.run(["perf", "report", "-i", os.environ["IDLE_PERF"] + ".data", "--no-children",
                            "--percent-limit", "1", "--stdio", "-g", "none"], stdout=out, stderr=subprocess.DEVNULL)
    seconds = t1 - t0
    calls = {}
    for key, value in s1.items():
        now = int(re.search(r"calls=(\d+)", value).group(1))
        before = int(re.search(r"calls=(\d+)", s0[key]).group(1)) if key in s0 else 0
        if now > before:
            calls[key.removeprefix("cmdstat_")] = round((now - before) / seconds, 1)
    return {
        "commands_per_s": round((c1 - c0) / seconds, 1),
        "breakdown_per_s": dict(sorted(calls.items(), key=lambda kv: -kv[1])),
        "cpu_percent": [round(100 * (b - a) / seconds, 2) for a, b in zip(cpu0, cpu1)],
        "rss_mb": [round(proc_rss_mb(p.pid), 1) for p in procs],
    }


def run(k, args, env, binary, workdir):
    db = os.environ.get("IDLE_DB", "flashsale_idle")
    base = env["DATABASE_URL"]
    admin_url = re.sub(r"^(\w[\w+.-]*://[^/?]*)(/[^?]*)?", r"\1/postgres", base)
    subprocess.run(["psql", "-X", "-q", "-d", admin_url, "-c", f"DROP DATABASE IF EXISTS {db} WITH (FORCE)"],
                   check=True, capture_output=True)
    database_url = re.sub(r"^(\w[\w+.-]*://[^/?]*)(/[^?]*)?", rf"\1/{db}", base)
    redis = Redis(env["REDIS_SERVER_BIN"], workdir)
    server_env = dict(os.environ, DATABASE_URL=database_url, REDIS_URL=redis.url, REDIS_KEY_PREFIX="idle:",
                      BIND_ADDR="127.0.0.1:0", JWT_SECRET="flashsale-idle-secret-not-for-production",
                      RUST_LOG=os.environ.get("RUST_LOG", "warn"), NO_COLOR="1")
    server_env.pop("REDIS_CLUSTER", None)
    procs = []
    try:
        subprocess.run([binary, "admin", "create", "--email", ADMIN_EMAIL, "--password", ADMIN_PASSWORD],
                       env=server_env, check=True, capture_output=True)
        procs, urls = start_servers(binary, args.instances, server_env, workdir)
        started = time.monotonic()
        api = Api(urls)
        drops, late_buyer = setup(api, k, args.instances, 1 if args.sold_out else args.stock)
        say(f"K={k}: {k} drops, one hold each, loaded on {args.instances} instance(s) in "
            f"{time.monotonic() - started:.1f} s; settling {args.settle} s")
        time.sleep(args.settle)
        result = measure(redis, procs, args.idle)
        result.update(drops=k, instances=args.instances, sold_out=args.sold_out)
        if args.latency and not args.sold_out:
            result["journal_latency"] = journal_latency(api, database_url, drops, late_buyer, args.latency,
                                                        args.instances)
        return result
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
        redis.stop()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("drops", type=int, nargs="+")
    parser.add_argument("--instances", type=int, default=3)
    parser.add_argument("--idle", type=float, default=10.0, help="seconds measured, with no request")
    parser.add_argument("--settle", type=float, default=5.0, help="seconds waited after the setup")
    parser.add_argument("--stock", type=int, default=10)
    parser.add_argument("--sold-out", action="store_true")
    parser.add_argument("--latency", type=int, default=0,
                        help="after the window, time this many holds from their request to their row in Postgres")
    parser.add_argument("--json")
    args = parser.parse_args()
    env = services()
    target = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
    source = os.environ.get("FLASHSALE_BIN", os.path.join(target, "release/flashsale"))
    workdir = tempfile.mkdtemp(prefix="flashsale-idle.")
    binary = shutil.copy(source, os.path.join(workdir, "flashsale"))
    results = []
    try:
        for k in args.drops:
            results.append(run(k, args, env, binary, workdir))
            r = results[-1]
            top = ", ".join(f"{c} {v}" for c, v in list(r["breakdown_per_s"].items())[:6])
            print(f"drops={k} instances={args.instances} commands/s={r['commands_per_s']} "
                  f"cpu%={r['cpu_percent']} rss_mb={r['rss_mb']} [{top}]"
                  f"{' journal ' + str(r['journal_latency']) if 'journal_latency' in r else ''}", flush=True)
    finally:
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1)
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
