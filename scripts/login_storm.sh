#!/usr/bin/env bash
# Reserve latency during a login storm: a release server (embedded gate) takes reservations at a constant offered
# rate (`flashsale-load rate --reserve`, latency counted from each request's intended send time) first alone, then
# while wrk hammers POST /auth/login with 64 connections (every login one argon2 verification). Run once per
# PASSWORD_HASH_CONCURRENCY given, to show what bounding the hashing buys.
#
#   scripts/login_storm.sh [CONCURRENCY...]    default: 1 (half of 2 cores, the default bound) and 64 (unbounded)
#   STORM_RPS (default 2000) reservations offered per second; STORM_SECONDS (default 10) per phase
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"
cd "$ROOT"
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
RPS=${STORM_RPS:-2000}
SECONDS_PER_PHASE=${STORM_SECONDS:-10}
DB=flashsale_storm
say() { printf 'storm: %s\n' "$*" >&2; }
die() {
  say "error: $*"
  exit 2
}
command -v wrk >/dev/null 2>&1 || { apt-get install -y wrk >/dev/null 2>&1 || die "wrk is missing"; }
eval "$("$ROOT/scripts/services.sh")"
cargo build --release -q -p shell-api --bin flashsale
cargo build --release -q -p loadtest
BIN=${STORM_BIN:-$TARGET/release/flashsale}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/flashsale-storm.XXXXXX")
SERVER_PID=
cleanup() {
  if [ -n "$SERVER_PID" ]; then kill -TERM "$SERVER_PID" 2>/dev/null || true; wait "$SERVER_PID" 2>/dev/null || true; fi
  rm -rf "$WORK"
}
trap cleanup EXIT
admin_url=$(printf '%s' "$DATABASE_URL" | sed -E 's#^([a-zA-Z][a-zA-Z0-9+.-]*://[^/?]*)(/[^?]*)?#\1/postgres#')
db_url=$(printf '%s' "$DATABASE_URL" | sed -E "s#^([a-zA-Z][a-zA-Z0-9+.-]*://[^/?]*)(/[^?]*)?#\1/$DB#")

latency() { grep '^latency from the intended send time' "$1" | sed 's/.*time: //'; }

run_one() {
  local concurrency=$1
  psql -X -q -d "$admin_url" -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)" >/dev/null
  local env_args=(DATABASE_URL="$db_url" BIND_ADDR=127.0.0.1:0 JWT_SECRET=storm-secret RUST_LOG=warn REDIS_URL=
    RESERVE_INFLIGHT_MAX=100000 PASSWORD_HASH_CONCURRENCY="$concurrency" LOGIN_FAILURES_PER_ADDRESS=1000000)
  env "${env_args[@]}" "$BIN" migrate >/dev/null
  env "${env_args[@]}" "$BIN" admin create --email admin@storm.local --password storm-admin-password >/dev/null
  env "${env_args[@]}" "$BIN" serve >"$WORK/server.out" 2>"$WORK/server.err" &
  SERVER_PID=$!
  local base=
  for _ in $(seq 1 100); do
    base=$(sed -n 's/^listening on //p' "$WORK/server.out" 2>/dev/null | head -1)
    [ -n "$base" ] && break
    kill -0 "$SERVER_PID" 2>/dev/null || die "server exited: $(tail -5 "$WORK/server.err")"
    sleep 0.1
  done
  [ -n "$base" ] || die "server did not start"
  curl -sf -X POST "$base/api/v1/members" -H 'content-type: application/json' \
    -d '{"email":"storm@storm.local","password":"storm-member-password","name":"Storm"}' >/dev/null ||
    die "signing the storm member up failed"
  local rate=("$TARGET/release/flashsale-load" rate --base-url "$base" --admin-email admin@storm.local
    --admin-password storm-admin-password --rps "$RPS" --seconds "$SECONDS_PER_PHASE" --reserve --members 200)
  "${rate[@]}" >"$WORK/quiet.out" 2>&1 || die "rate run failed: $(tail -5 "$WORK/quiet.out")"
  WRK_EMAIL=storm@storm.local WRK_PASSWORD=storm-member-password \
    wrk -t1 -c64 -d"$((SECONDS_PER_PHASE + 30))s" --timeout 30s -s "$ROOT/benches/wrk/login.lua" "$base" >"$WORK/wrk.out" 2>&1 &
  local wrk_pid=$!
  sleep 2
  "${rate[@]}" >"$WORK/storm.out" 2>&1 || die "rate run failed: $(tail -5 "$WORK/storm.out")"
  kill -INT "$wrk_pid" 2>/dev/null || true
  wait "$wrk_pid" 2>/dev/null || true
  printf 'PASSWORD_HASH_CONCURRENCY=%s, %s reservations/s offered for %ss:\n' "$concurrency" "$RPS" "$SECONDS_PER_PHASE"
  printf '  alone:            %s\n' "$(latency "$WORK/quiet.out")"
  printf '  during the storm: %s\n' "$(latency "$WORK/storm.out")"
  printf '  storm: %s; %s\n' "$(grep -E '^logins' "$WORK/wrk.out" || echo 'no wrk summary')" \
    "$(awk '/Requests\/sec/ {print $2 " logins/s"}' "$WORK/wrk.out")"
  kill -TERM "$SERVER_PID" 2>/dev/null || true
  wait "$SERVER_PID" 2>/dev/null || true
  SERVER_PID=
}

for concurrency in "${@:-1 64}"; do
  for c in $concurrency; do run_one "$c"; done
done
