#!/usr/bin/env bash
# Runs the criterion benchmarks, each beside its naive baseline: the engine core's reservation path
# (benches/benches/core_reserve.rs), the batched purchase writer (benches/benches/writer.rs, which needs
# Postgres) and the batched Redis gate (benches/benches/redis_gate.rs, which needs Redis); services.sh brings both
# up first. Reports land in target/criterion/.
#
#   scripts/bench.sh [ARGS...]   ARGS go to `cargo bench -p benches`, e.g. scripts/bench.sh --bench writer
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"
cd "$ROOT"

services=$("$ROOT/scripts/services.sh") || {
  echo "bench.sh: scripts/services.sh failed; no Postgres to benchmark the writer against" >&2
  exit 1
}
eval "$services"
export DATABASE_URL REDIS_URL

exec cargo bench -p benches "$@"
