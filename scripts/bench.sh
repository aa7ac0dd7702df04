#!/usr/bin/env bash
# Benchmarks, each beside a naive baseline, measured side by side in one run, and the benchmark sheet.
#
#   scripts/bench.sh             everything, then writes docs/BENCHMARKS.md:
#                                  criterion: the engine core (core_reserve), the batched writer (writer) and the
#                                  batched Redis gate (redis_gate), each beside its baseline;
#                                  scripts/wire.sh on the embedded gate and on the Redis gate: wrk against a release
#                                  server (reserve and sold-out beside /healthz), 100,000 units sold end to end, and
#                                  reserve latency at a fixed offered rate.
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

say "writing docs/BENCHMARKS.md"
mkdir -p "$ROOT/docs"
# Written beside, then moved: the sheet keeps the "Measurement log" of the one it replaces.
python3 "$ROOT/scripts/benchmarks_sheet.py" "$ROOT" "$started" >"$ROOT/docs/BENCHMARKS.md.new"
mv "$ROOT/docs/BENCHMARKS.md.new" "$ROOT/docs/BENCHMARKS.md"
say "done: docs/BENCHMARKS.md"
cat "$ROOT/docs/BENCHMARKS.md" | head -20 >&2
