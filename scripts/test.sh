#!/usr/bin/env bash
# Runs the whole test suite against real PostgreSQL, Redis and a 3-master Redis Cluster, which
# scripts/services.sh makes reachable (`scripts/services.sh` and `scripts/services.sh cluster`). The tests get
# DATABASE_URL, REDIS_URL, REDIS_CLUSTER_URLS and REDIS_SERVER_BIN (a redis-server binary for the fault tests
# that spawn their own servers); when any of them cannot be provided the run fails instead of skipping tests.
#
#   scripts/test.sh [ARGS...]   ARGS go to `cargo nextest run` (or `cargo test` where nextest is missing),
#                               e.g. scripts/test.sh -p engine   or   scripts/test.sh -E 'test(reserve)'
#
# Exits with the test runner's exit code.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"
cd "$ROOT"

say() { printf 'test.sh: %s\n' "$*" >&2; }

services=$("$ROOT/scripts/services.sh") || {
  say "scripts/services.sh failed; no Postgres/Redis to test against"
  exit 1
}
eval "$services"
cluster=$("$ROOT/scripts/services.sh" cluster) || {
  say "scripts/services.sh cluster failed (see above); no Redis Cluster to test against"
  say "set REDIS_CLUSTER_URLS to a healthy cluster's nodes, or fix what stops the private one (.services/redis-cluster/)"
  exit 1
}
eval "$cluster"
if [ -z "${REDIS_CLUSTER_URLS:-}" ]; then
  say "scripts/services.sh cluster printed no REDIS_CLUSTER_URLS; refusing to run the tests without a Redis Cluster"
  exit 1
fi
if [ -z "${REDIS_SERVER_BIN:-}" ] || [ ! -x "$REDIS_SERVER_BIN" ]; then
  say "no redis-server binary (REDIS_SERVER_BIN='${REDIS_SERVER_BIN:-}') for the fault tests; install redis-server"
  exit 1
fi
export DATABASE_URL REDIS_URL REDIS_CLUSTER_URLS REDIS_SERVER_BIN
export RUST_BACKTRACE="${RUST_BACKTRACE:-1}"

# Tests create one database each, named fs_test_*, and drop it when they finish; a test that panics or a run
# that is killed leaves its database behind. Drop those left from earlier runs. Only databases older than
# TEST_DB_MIN_AGE_SECONDS and with nobody connected go (a plain DROP also refuses one in use), so another
# run against the same server is left alone. Best effort: never fails the run.
#
# The databases with fixed names that the suite uses (the writer bench, run once in test mode) are dropped too,
# whatever their age, so every run is a first run for them: a defect that only shows on a new database (two
# processes migrating it at once, say) fails here, not first on a user's fresh machine.
FIXED_DATABASES='flashsale_bench_writer'
cleanup_test_databases() {
  local psql='' admin_url out dropped min_age=${TEST_DB_MIN_AGE_SECONDS:-300} p
  for p in "$(command -v psql 2>/dev/null || true)" /usr/lib/postgresql/*/bin/psql; do
    if [ -x "$p" ]; then psql=$p; fi
    if [ -n "$psql" ]; then break; fi
  done
  case $min_age in '' | *[!0-9]*) min_age=300 ;; esac
  if [ -z "$psql" ]; then
    say "no psql; leftover fs_test_* databases not cleaned"
    return 0
  fi
  # Same server and credentials, database `postgres` (the app's own may not exist yet).
  admin_url=$(printf '%s' "$DATABASE_URL" | sed -E 's#^([a-zA-Z][a-zA-Z0-9+.-]*://[^/?]*)(/[^?]*)?#\1/postgres#')
  # PG_VERSION is written once when a database is created: its mtime is the database's age.
  out=$(PGCONNECT_TIMEOUT=5 "$psql" -X -w -d "$admin_url" -v min_age="$min_age" -v fixed="$FIXED_DATABASES" 2>&1 <<'SQL'
SELECT format('DROP DATABASE IF EXISTS %I', d.datname)
FROM pg_database d
WHERE ((d.datname LIKE 'fs\_test\_%'
        AND (pg_stat_file('base/' || d.oid || '/PG_VERSION', true)).modification
            < now() - make_interval(secs => :min_age))
       OR d.datname = ANY (string_to_array(:'fixed', ' ')))
  AND NOT EXISTS (SELECT 1 FROM pg_stat_activity a WHERE a.datid = d.oid)
\gexec
SQL
  ) || true
  dropped=$(printf '%s\n' "$out" | grep -c '^DROP DATABASE' || true)
  if printf '%s\n' "$out" | grep -q 'ERROR\|FATAL\|error:'; then
    say "cleanup of old fs_test_* databases was partial: $(printf '%s\n' "$out" | grep -m1 'ERROR\|FATAL\|error:')"
  fi
  say "dropped $dropped leftover fs_test_* or fixed-name ($FIXED_DATABASES) database(s)"
}

# The whole workspace, unless the caller picked packages (`--workspace` would override `-p`).
scope=(--workspace)
for arg in "$@"; do
  case $arg in -p | -p* | --package | --package=*) scope=() ;; esac
done

if cargo nextest --version >/dev/null 2>&1; then
  runner=(cargo nextest run ${scope[@]+"${scope[@]}"} --all-targets)
  # A filter that matches nothing (or a crate without tests yet) is not a failure.
  export NEXTEST_NO_TESTS="${NEXTEST_NO_TESTS:-warn}"
else
  runner=(cargo test ${scope[@]+"${scope[@]}"} --all-targets)
fi

mask() { printf '%s' "$1" | sed -E 's#://([^:@/]*):[^@/]*@#://\1:***@#'; }
say "DATABASE_URL=$(mask "$DATABASE_URL")"
say "REDIS_URL=$(mask "$REDIS_URL")"
say "REDIS_CLUSTER_URLS=$(printf '%s' "$REDIS_CLUSTER_URLS" | sed -E 's#://([^:@/,]*):[^@/,]*@#://\1:***@#g')"
say "REDIS_SERVER_BIN=$REDIS_SERVER_BIN"
say "$(cargo --version), target dir ${CARGO_TARGET_DIR:-$ROOT/target}"
cleanup_test_databases || true
say "running: ${runner[*]} $*"

exec "${runner[@]}" "$@"
