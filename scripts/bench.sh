#!/usr/bin/env bash
# Runs the criterion benchmarks of the engine core, the Redis gate and the writer, each beside its naive
# baseline. The gate and writer benchmarks need real services, so services.sh brings them up first.
#
#   scripts/bench.sh [ARGS...]   ARGS go to `cargo bench -p benches`, e.g. scripts/bench.sh -- core
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"
cd "$ROOT"

services=$("$ROOT/scripts/services.sh") || {
  echo "bench.sh: scripts/services.sh failed; no Postgres/Redis to benchmark against" >&2
  exit 1
}
eval "$services"
export DATABASE_URL REDIS_URL

exec cargo bench -p benches "$@"
