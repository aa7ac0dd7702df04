#!/usr/bin/env bash
# The seeded chaos rehearsal (issue #21): builds the debug server and harness, makes PostgreSQL and a
# redis-server binary available (scripts/services.sh), and runs
#   target/debug/flashsale-load chaos "$@"
# which starts its own database (on the DATABASE_URL server, behind a proxy it can cut), its own Redis and
# --instances servers, sells one drop while killing, pausing and slowing them on a schedule derived from --seed,
# then checks the recorded history against Postgres. Its exit status is this script's: 0 clean, 1 a violation,
# 2 the run could not be carried out.
#
#   scripts/chaos.sh --seconds 60 --seed 1          the usual run (about two minutes in all)
#   scripts/chaos.sh --seconds 1200 --seed 7        twenty minutes, each kind of fault at least ten times
#   scripts/chaos.sh --help                         every option
#
# Reports go to reports/chaos-<timestamp>/ (history.jsonl, schedule.json, summary.txt, violations.json and the
# processes' logs) unless --out says otherwise. The harness has a hard deadline of its own; `timeout` here is a
# second one, a little later, in case the harness itself hangs.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"
cd "$ROOT"
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}

say() { printf 'chaos: %s\n' "$*" >&2; }

# The load window, to bound the whole run from outside: --seconds N or --seconds=N (default 60).
seconds=60
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
  case ${args[i]} in
  --seconds) seconds=${args[i + 1]:-60} ;;
  --seconds=*) seconds=${args[i]#--seconds=} ;;
  esac
done
case $seconds in '' | *[!0-9]*) seconds=60 ;; esac

eval "$("$ROOT/scripts/services.sh")"
export REDIS_SERVER_BIN="${REDIS_SERVER_BIN:-$(command -v redis-server || echo redis-server)}"

# CHAOS_BUILD=0 uses the debug binaries already built (CI: the test run built the server and .ci/run the harness;
# a `cargo build` of both packages together unifies features differently and would rebuild part of the tree).
if [ "${CHAOS_BUILD:-1}" = 0 ]; then
  for bin in flashsale flashsale-load; do
    [ -x "$TARGET/debug/$bin" ] || { say "error: CHAOS_BUILD=0 but $TARGET/debug/$bin is missing"; exit 2; }
  done
else
  say "building the debug server and harness"
  cargo build -q -p shell-api --bin flashsale -p loadtest --bin flashsale-load
fi

# The harness's own deadline is the load window plus setup and settling margins (at most ~4 minutes more);
# this one comes after it and only matters if the harness hangs. SIGTERM first (the harness kills its children
# and drops its database on it), SIGKILL 30 s later.
limit=$((seconds + 400))
rc=0
timeout --foreground --signal=TERM --kill-after=30 "$limit" "$TARGET/debug/flashsale-load" chaos "$@" || rc=$?
if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
  say "error: flashsale-load chaos did not finish within ${limit}s"
  exit 2
fi
exit "$rc"
