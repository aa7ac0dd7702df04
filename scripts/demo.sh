#!/usr/bin/env bash
# A demo drop, end to end: a fresh database, a real server on a free port, and `flashsale-load drop` driving
# 600 buyers firing 5 attempts each at 120 units; the driver verifies the invariants and writes a report.
#
#   scripts/demo.sh [-- DRIVER_ARGS...]   e.g. scripts/demo.sh -- --buyers 2000 --stock 500
#
# DRIVER_ARGS go to `flashsale-load drop` (see `flashsale-load drop --help`); they override the LOAD_* settings.
# Settings: DEMO_DB (database name, default flashsale_demo; dropped and recreated on every run),
# DEMO_SERVER_ENV (extra VAR=value settings for the server, space-separated, e.g. "RESERVE_INFLIGHT_MAX=512"),
# and every LOAD_* variable of the driver.
#
# Exits with the driver's status: 0 every invariant held, 1 one failed, 2 the run could not be carried out.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"
ADMIN_EMAIL=admin@flashsale.local
ADMIN_PASSWORD=demo-admin-password
DEMO_DB=${DEMO_DB:-flashsale_demo}
# The server must print its address within this long (it migrates a fresh database first).
SERVER_START_SECONDS=60
# After SIGTERM the server finishes requests and drains its writer (SHUTDOWN_GRACE_MS, 10 s by default).
SERVER_STOP_SECONDS=20

step() { printf '\n==> demo: %s (at %ds)\n' "$*" "$SECONDS" >&2; }
say() { printf 'demo: %s\n' "$*" >&2; }
die() {
  say "error: $*"
  exit 2
}

if [ "${1:-}" = "--" ]; then shift; fi

case $DEMO_DB in
  '' | *[!a-z0-9_]*) die "DEMO_DB must be a plain lower-case name (got '$DEMO_DB')" ;;
  flashsale | postgres | template0 | template1) die "DEMO_DB=$DEMO_DB is not a demo database; it is never dropped" ;;
esac

WORK=$(mktemp -d "${TMPDIR:-/tmp}/flashsale-demo.XXXXXX")
SERVER_PID=
SERVER_STATUS=
# SIGTERM (the server finishes requests and drains its writer), a bounded wait, then SIGKILL. Sets SERVER_STATUS.
stop_server() {
  [ -n "$SERVER_PID" ] || return 0
  kill -TERM "$SERVER_PID" 2>/dev/null || true
  for _ in $(seq 1 $((SERVER_STOP_SECONDS * 10))); do
    kill -0 "$SERVER_PID" 2>/dev/null || break
    sleep 0.1
  done
  if kill -0 "$SERVER_PID" 2>/dev/null; then
    say "the server did not stop within ${SERVER_STOP_SECONDS}s; killing it"
    kill -KILL "$SERVER_PID" 2>/dev/null || true
    SERVER_STATUS=killed
  else
    SERVER_STATUS=0
    wait "$SERVER_PID" 2>/dev/null || SERVER_STATUS=$?
  fi
  SERVER_PID=
}
# On any exit: no server left behind, no scratch folder.
# shellcheck disable=SC2317 # invoked by the EXIT trap
cleanup() {
  local status=$?
  if [ -n "$SERVER_PID" ]; then
    say "stopping the server (pid $SERVER_PID)"
    stop_server
  fi
  rm -rf "$WORK"
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

step "services (Postgres, Redis)"
services=$("$ROOT/scripts/services.sh") || die "scripts/services.sh failed"
eval "$services"

step "release build of flashsale and flashsale-load"
cargo build --release --manifest-path "$ROOT/Cargo.toml" -p shell-api -p loadtest
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
case $TARGET_DIR in /*) ;; *) TARGET_DIR=$ROOT/$TARGET_DIR ;; esac
# Run copies: a build elsewhere in the same target folder must not swap the binaries under a running demo.
cp "$TARGET_DIR/release/flashsale" "$TARGET_DIR/release/flashsale-load" "$WORK/"
FLASHSALE=$WORK/flashsale
LOAD=$WORK/flashsale-load

step "fresh database $DEMO_DB"
# Same server and credentials as DATABASE_URL, another database.
DEMO_DATABASE_URL=$(printf '%s' "$DATABASE_URL" | sed -E "s#^([a-zA-Z][a-zA-Z0-9+.-]*://[^/?]*)(/[^?]*)?#\\1/$DEMO_DB#")
ADMIN_DATABASE_URL=$(printf '%s' "$DATABASE_URL" | sed -E 's#^([a-zA-Z][a-zA-Z0-9+.-]*://[^/?]*)(/[^?]*)?#\1/postgres#')
PSQL=
for p in "$(command -v psql 2>/dev/null || true)" /usr/lib/postgresql/*/bin/psql; do
  if [ -n "$p" ] && [ -x "$p" ]; then
    PSQL=$p
    break
  fi
done
if [ -n "$PSQL" ]; then
  PGCONNECT_TIMEOUT=5 "$PSQL" -X -w -q -v ON_ERROR_STOP=1 -d "$ADMIN_DATABASE_URL" \
    -c "DROP DATABASE IF EXISTS $DEMO_DB WITH (FORCE)" >&2
  say "dropped $DEMO_DB (flashsale creates it again)"
else
  # Without psql, a database of its own per run keeps reruns clean just the same.
  DEMO_DB=${DEMO_DB}_$(date +%Y%m%d%H%M%S)
  DEMO_DATABASE_URL=$(printf '%s' "$DATABASE_URL" | sed -E "s#^([a-zA-Z][a-zA-Z0-9+.-]*://[^/?]*)(/[^?]*)?#\\1/$DEMO_DB#")
  say "no psql to drop the old demo database; using a new one, $DEMO_DB"
fi
export DATABASE_URL=$DEMO_DATABASE_URL

step "admin $ADMIN_EMAIL"
"$FLASHSALE" admin create --email "$ADMIN_EMAIL" --password "$ADMIN_PASSWORD"

step "server on a free port"
mkdir -p "$ROOT/reports"
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
SERVER_LOG=$ROOT/reports/demo-$STAMP.server.log
export LOAD_REPORT=${LOAD_REPORT:-$ROOT/reports/drop-$STAMP.json}
read -r -a server_env <<<"${DEMO_SERVER_ENV:-}"
# The demo runs one instance on the embedded gate; REDIS_URL (exported by services.sh) is for the Redis gate.
env -u REDIS_URL BIND_ADDR=127.0.0.1:0 JWT_SECRET=flashsale-demo-secret-not-for-production RUST_LOG="${RUST_LOG:-info}" NO_COLOR=1 \
  "${server_env[@]}" "$FLASHSALE" serve >"$WORK/server.out" 2>"$SERVER_LOG" &
SERVER_PID=$!
BASE_URL=
for _ in $(seq 1 $((SERVER_START_SECONDS * 10))); do
  BASE_URL=$(sed -n 's#^listening on \(http://[^ ]*\)$#\1#p' "$WORK/server.out" | head -n 1)
  [ -n "$BASE_URL" ] && break
  kill -0 "$SERVER_PID" 2>/dev/null || die "the server exited before listening; see $SERVER_LOG"
  sleep 0.1
done
[ -n "$BASE_URL" ] || die "the server did not print its address within ${SERVER_START_SECONDS}s; see $SERVER_LOG"
say "server pid $SERVER_PID listening on $BASE_URL (log: $SERVER_LOG)"

step "flashsale-load drop $*"
set +e
LOAD_ADMIN_PASSWORD=$ADMIN_PASSWORD "$LOAD" drop --base-url "$BASE_URL" --database-url "$DATABASE_URL" \
  --admin-email "$ADMIN_EMAIL" "$@"
LOAD_STATUS=$?
set -e

step "stopping the server (SIGTERM: finish requests, drain the writer)"
stop_server
say "server stopped (exit $SERVER_STATUS); $(tail -n 1 "$SERVER_LOG" 2>/dev/null || true)"

case $LOAD_STATUS in
  0) step "PASS: every invariant held (the report's path is above)" ;;
  1) step "FAIL: an invariant did not hold (the report's path is above)" ;;
  *) step "ERROR: the driver could not finish (exit $LOAD_STATUS)" ;;
esac
exit "$LOAD_STATUS"
