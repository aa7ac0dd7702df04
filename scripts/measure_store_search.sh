#!/usr/bin/env bash
# Measures the store search (`GET /api/v1/stores?q=`, through the function its handler calls) on 10,000 stores and
# 100,000 products in a scratch database, and prints p50/p95 per query: see shell-api/examples/store_search_bench.rs.
#
#   scripts/measure_store_search.sh [ARGS...]   ARGS go to the example, e.g. --stores 20000 --runs 500
#
# Postgres comes from scripts/services.sh (a running one, or a private one it starts). Run it under the build lock
# with your own target dir, like every cargo command here.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"
cd "$ROOT"
services=$("$ROOT/scripts/services.sh")
eval "$services"
export DATABASE_URL
exec cargo run -q -p shell-api --example store_search_bench -- "$@"
