#!/usr/bin/env bash
# Benchmarks, each beside a naive baseline, measured side by side in one run, and the benchmark sheet.
#
#   scripts/bench.sh             everything, then writes docs/BENCHMARKS.md:
#                                  criterion: the engine core (core_reserve), the batched writer (writer) and the
#                                  batched Redis gate (redis_gate), each beside its baseline;
#                                  scripts/wire.sh on the embedded gate and on the Redis gate: wrk against a release
#                                  server (reserve and sold-out beside /healthz), 100,000 units sold end to end, and
#                                  reserve latency at a fixed offered rate; then launch day (#27): the same wrk
#                                  rows with SERVE_RUNTIMES=per-core on both gates, the opening burst
#                                  (scripts/burst.sh, both gates, shared and per-core) and the idle cost of live
#                                  drops (scripts/idle_cost.py --instances 3 50 500 5000).
#   scripts/bench.sh ARGS...     only `cargo bench -p benches ARGS` (e.g. --bench writer); no sheet.
#
# services.sh brings Postgres and Redis up first. Criterion's reports land in target/criterion/.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"
cd "$ROOT"

services=$("$ROOT/scripts/services.sh") || {
  echo "bench.sh: scripts/services.sh failed; no Postgres/Redis to benchmark against" >&2
  exit 1
}
eval "$services"
export DATABASE_URL REDIS_URL

if [ $# -gt 0 ]; then
  exec cargo bench -p benches "$@"
fi

say() { printf '\n==> bench: %s (at %ds)\n' "$*" "$SECONDS" >&2; }
started=$(date -u +%Y-%m-%dT%H:%M:%SZ)
rm -rf "${CARGO_TARGET_DIR:-$ROOT/target}/criterion"
say "criterion benchmarks"
cargo bench -p benches
say "wire, embedded gate"
WIRE_OUT="${CARGO_TARGET_DIR:-$ROOT/target}/wire-embedded.tsv" "$ROOT/scripts/wire.sh"
say "wire, Redis gate"
WIRE_OUT="${CARGO_TARGET_DIR:-$ROOT/target}/wire-redis.tsv" "$ROOT/scripts/wire.sh" --redis

OUT_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
say "wire, runtime per core, embedded gate"
SERVE_RUNTIMES=per-core WIRE_QUICK=1 WIRE_OUT="$OUT_DIR/wire-embedded-per-core.tsv" "$ROOT/scripts/wire.sh"
say "wire, runtime per core, Redis gate"
SERVE_RUNTIMES=per-core WIRE_QUICK=1 WIRE_OUT="$OUT_DIR/wire-redis-per-core.tsv" "$ROOT/scripts/wire.sh" --redis
for runtimes in shared per-core; do
  for gate in embedded redis; do
    say "opening burst, $gate gate, $runtimes"
    rm -f "$OUT_DIR/burst-$gate-$runtimes.json"
    # A missed target exits 1 and is on the sheet as missed; a run that could not be carried out has no file.
    SERVE_RUNTIMES=$runtimes LOAD_BURST_JSON="$OUT_DIR/burst-$gate-$runtimes.json" \
      "$ROOT/scripts/burst.sh" $([ "$gate" = redis ] && echo --redis) || true
  done
done
say "idle cost of live drops"
python3 "$ROOT/scripts/idle_cost.py" --instances 3 --json "$OUT_DIR/idle-cost.json" 50 500 5000

say "writing docs/BENCHMARKS.md"
mkdir -p "$ROOT/docs"
# Written beside, then moved: the sheet keeps the "Measurement log" of the one it replaces.
python3 "$ROOT/scripts/benchmarks_sheet.py" "$ROOT" "$started" >"$ROOT/docs/BENCHMARKS.md.new"
mv "$ROOT/docs/BENCHMARKS.md.new" "$ROOT/docs/BENCHMARKS.md"
say "done: docs/BENCHMARKS.md"
head -20 "$ROOT/docs/BENCHMARKS.md" >&2
