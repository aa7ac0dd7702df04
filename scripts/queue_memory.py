#!/usr/bin/env python3
"""Redis memory per waiting member of a queue drop: calls the waiting room's own script (room.lua, op `join`)
for N members of a drop that opens in an hour, then sums MEMORY USAGE (every element counted) of the waiting line
and the member states. Uses redis-cli against REDIS_URL (default redis://127.0.0.1:6379); deletes its keys.

    python3 scripts/queue_memory.py [N ...]     (default 1000 10000 100000)
"""
import os
import random
import subprocess
import sys
import time
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379")


def cli(*args, stdin=None):
    done = subprocess.run(["redis-cli", "-u", URL, *args], input=stdin, capture_output=True, check=True)
    return done.stdout.decode().strip()


def main():
    counts = [int(n) for n in sys.argv[1:]] or [1000, 10000, 100000]
    with open(os.path.join(ROOT, "engine/src/gate/redis/room.lua"), "rb") as script:
        sha = cli("-x", "SCRIPT", "LOAD", stdin=script.read())
    base = f"queue-memory:{{drop:{uuid.uuid4()}}}"
    keys = [f"{base}:{suffix}" for suffix in ("c", "m", "qw", "qa", "qs", "qm")]
    now = int(time.time() * 1000)
    opens = now + 3_600_000
    try:
        for n in counts:
            cli("DEL", *keys)
            joins = (
                " ".join(["EVALSHA", sha, "6", *keys, "join", uuid.uuid4().hex, str(now), str(opens),
                          str(random.randrange(1 << 52))])
                for _ in range(n)
            )
            cli(stdin="\n".join(joins).encode())
            waiting = int(cli("ZCARD", keys[2]))
            assert waiting == n, f"{waiting} waiting of {n} joined"
            used = sum(int(cli("MEMORY", "USAGE", key, "SAMPLES", "0")) for key in (keys[2], keys[4]))
            print(f"{n} waiting: {used} bytes, {used / n:.0f} bytes per waiting member")
    finally:
        cli("DEL", *keys)


if __name__ == "__main__":
    main()
