#!/usr/bin/env bash
# Runs the criterion benchmarks, each beside its naive baseline: today the engine core's reservation path
# (benches/benches/core_reserve.rs). Reports land in target/criterion/.
#
#   scripts/bench.sh [ARGS...]   ARGS go to `cargo bench -p benches`, e.g. scripts/bench.sh -- drop_book
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"
cd "$ROOT"
exec cargo bench -p benches "$@"
