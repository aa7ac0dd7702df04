#!/usr/bin/env bash
# A demo drop, end to end: a fresh database, real servers on free ports, and the goose drop scenario
# (`flashsale-load drop`): 600 buyers with 5 tabs each reserve at once when a 120-unit drop opens; of the holders 20%
# abandon (cancel, or let the hold expire), 20% of the rest are declined, the others pay; refused buyers retry while
# stock comes back. Goose writes its HTML report; the harness then verifies the invariants through the API and in
# Postgres and prints its summary.
#
#   scripts/demo.sh [--mode MODE] [--redis] [--instances N] [-- DRIVER_ARGS...]
#     e.g. scripts/demo.sh -- --buyers 2000 --stock 500
#          scripts/demo.sh -- --threshold "p99<500ms" --threshold "error-rate<1%"
#          scripts/demo.sh --redis --instances 3
#
# Without options: one server on the embedded gate (its in-memory core is the stock authority).
# --mode MODE      the goose scenario to run, a subcommand of flashsale-load with its own checks afterwards:
#                  drop (the default, the funnel above); queue (a waiting room: 400 members join before and after the
#                  opening, reserve with their admission pass); draw (400 members enter a raffle, winners pay or pass
#                  their hold down the ranking, which the harness recomputes from the revealed seed);
#                  subscribe (members subscribe, pause, resume, cancel and change cards while `flashsale renew --at`
#                  runs in rounds, two processes at once, each round 8 days further on the test clock; then one
#                  charge per period, the ledgers and the gateway's records are checked);
#                  campaign (200 buyers buy into two preorder campaigns at once, one reaches its goal and one does
#                  not; after closes_at the servers refund the failed one, and the harness checks in Postgres and in
#                  the gateway's refund ledger that each of its purchases was refunded once and none of the other's).
# --redis          the servers use the Redis gate: REDIS_URL from scripts/services.sh, and a key prefix of this
#                  run's own (REDIS_KEY_PREFIX=demo-<timestamp>-<pid>:) whose keys are deleted at the end.
# --instances N    start N servers (default 1, at most 16) on one database and one Redis, all selling the same
#                  drop; N > 1 needs --redis. The harness spreads buyers over them round robin and pays or cancels
#                  each hold through another instance than the one that granted it; its checks add that every
#                  instance serves the same counts at the end.
# DRIVER_ARGS (after --) go to `flashsale-load MODE` (see `flashsale-load MODE --help`: the scenario's settings and
# goose's options, such as --threshold); they override the LOAD_* settings.
# Settings: DEMO_DB (database name, default flashsale_demo; dropped and recreated on every run),
# DEMO_SERVER_ENV (extra VAR=value settings for every server, space-separated, e.g. "RESERVE_INFLIGHT_MAX=512"),
# and every LOAD_* variable of the harness.
#
# Exits with the harness's status: 0 every invariant (and threshold) held, 1 one failed, 2 the run could not be
# carried out (also for bad options).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"
ADMIN_EMAIL=admin@flashsale.local
ADMIN_PASSWORD=demo-admin-password
DEMO_DB=${DEMO_DB:-flashsale_demo}
# The server must print its address within this long (it migrates a fresh database first).
SERVER_START_SECONDS=60
# After SIGTERM the servers finish requests and drain their writers (SHUTDOWN_GRACE_MS, 10 s by default).
SERVER_STOP_SECONDS=20
INSTANCES_MAX=16

step() { printf '\n==> demo: %s (at %ds)\n' "$*" "$SECONDS" >&2; }
say() { printf 'demo: %s\n' "$*" >&2; }
die() {
  say "error: $*"
  exit 2
}

usage() {
  cat <<'USAGE'
usage: scripts/demo.sh [--mode MODE] [--redis] [--instances N] [-- DRIVER_ARGS...]

  --mode MODE      the goose scenario (a flashsale-load subcommand, checked afterwards): drop (default),
                   queue, draw, subscribe (subscriptions renewed by `flashsale renew --at` rounds during the run),
                   campaign (one campaign funded, one refunded)
  --redis          use the Redis gate (REDIS_URL from scripts/services.sh) under a fresh REDIS_KEY_PREFIX,
                   whose keys are deleted at the end
  --instances N    run N servers on one database and one Redis, selling the same drop (default 1, at most 16;
                   N > 1 needs --redis)
  -h, --help       this text
  DRIVER_ARGS      options of `flashsale-load MODE` and goose, e.g. -- --buyers 2000 --stock 500
                   or -- --threshold "p99<500ms"

Settings: DEMO_DB (default flashsale_demo, recreated every run), DEMO_SERVER_ENV (extra VAR=value settings for
every server), and the harness's LOAD_* variables. Exit status: 0 every invariant (and threshold) held, 1 one
failed, 2 the run could not be carried out.
USAGE
}
usage_error() {
  say "error: $*"
  usage >&2
  exit 2
}

USE_REDIS=0
INSTANCES=1
MODE=drop
# The scenarios demo.sh runs: each is a flashsale-load subcommand that takes the target's options and
# --summary-file, and exits 0 / 1 / 2 as the drop funnel does.
MODES="drop queue draw subscribe campaign"
while [ $# -gt 0 ]; do
  case $1 in
    --mode)
      [ $# -ge 2 ] || usage_error "--mode needs a name ($MODES)"
      MODE=$2
      shift
      ;;
    --mode=*) MODE=${1#--mode=} ;;
    --redis) USE_REDIS=1 ;;
    --instances)
      [ $# -ge 2 ] || usage_error "--instances needs a number"
      INSTANCES=$2
      shift
      ;;
    --instances=*) INSTANCES=${1#--instances=} ;;
    -h | --help)
      usage
      exit 0
      ;;
    --)
      shift
      break
      ;;
    *) usage_error "unknown option '$1' (options of the harness go after --)" ;;
  esac
  shift
done
case " $MODES " in
  *" $MODE "*) ;;
  *) usage_error "unknown --mode '$MODE' (one of: $MODES)" ;;
esac
case $INSTANCES in
  '' | *[!0-9]* | 0*) usage_error "--instances must be a whole number from 1 to $INSTANCES_MAX (got '$INSTANCES')" ;;
esac
[ "$INSTANCES" -le "$INSTANCES_MAX" ] || usage_error "--instances must be at most $INSTANCES_MAX (got $INSTANCES)"
if [ "$INSTANCES" -gt 1 ] && [ "$USE_REDIS" -eq 0 ]; then
  usage_error "--instances $INSTANCES needs --redis: on the embedded gate each server is the stock authority of its own, so only one may sell a drop"
fi

case $DEMO_DB in
  '' | *[!a-z0-9_]*) die "DEMO_DB must be a plain lower-case name (got '$DEMO_DB')" ;;
  flashsale | postgres | template0 | template1) die "DEMO_DB=$DEMO_DB is not a demo database; it is never dropped" ;;
esac

WORK=$(mktemp -d "${TMPDIR:-/tmp}/flashsale-demo.XXXXXX")
# The running servers (pids, in instance order; emptied by stop_servers), and how each one ended.
SERVER_PIDS=()
SERVER_STATUSES=()
# Set once the servers may have written keys under it; cleanup deletes them.
REDIS_PREFIX=
# SIGTERM to every server (each finishes requests and drains its writer), one bounded wait for all of them, then
# SIGKILL for any still running. Sets SERVER_STATUSES (exit status, or "killed").
stop_servers() {
  [ "${#SERVER_PIDS[@]}" -gt 0 ] || return 0
  local pid i running
  for pid in "${SERVER_PIDS[@]}"; do
    kill -TERM "$pid" 2>/dev/null || true
  done
  for _ in $(seq 1 $((SERVER_STOP_SECONDS * 10))); do
    running=0
    for pid in "${SERVER_PIDS[@]}"; do
      if kill -0 "$pid" 2>/dev/null; then running=1; fi
    done
    [ "$running" -eq 1 ] || break
    sleep 0.1
  done
  SERVER_STATUSES=()
  for i in "${!SERVER_PIDS[@]}"; do
    pid=${SERVER_PIDS[$i]}
    if kill -0 "$pid" 2>/dev/null; then
      say "server $((i + 1)) (pid $pid) did not stop within ${SERVER_STOP_SECONDS}s; killing it"
      kill -KILL "$pid" 2>/dev/null || true
      wait "$pid" 2>/dev/null || true
      SERVER_STATUSES[i]=killed
    else
      SERVER_STATUSES[i]=0
      wait "$pid" 2>/dev/null || SERVER_STATUSES[i]=$?
    fi
  done
  SERVER_PIDS=()
}
# Best effort: the run's Redis keys go (only those under its own prefix), once no server can write them again.
# shellcheck disable=SC2317 # invoked from cleanup
delete_redis_keys() {
  [ -n "$REDIS_PREFIX" ] || return 0
  case ${REDIS_URL:-} in
    '') return 0 ;;
    *,*)
      say "not deleting Redis keys under '$REDIS_PREFIX': REDIS_URL names several nodes"
      return 0
      ;;
  esac
  if ! command -v redis-cli >/dev/null 2>&1; then
    say "no redis-cli: the keys under '$REDIS_PREFIX' stay in Redis"
    return 0
  fi
  local keys deleted
  if keys=$(timeout 30 redis-cli -u "$REDIS_URL" --scan --pattern "${REDIS_PREFIX}*" 2>/dev/null) &&
    deleted=$(printf '%s\n' "$keys" | sed '/^$/d' | timeout 30 xargs -r -d '\n' -n 500 redis-cli -u "$REDIS_URL" DEL 2>/dev/null |
      awk '{ n += $1 } END { print n + 0 }'); then
    say "deleted $deleted Redis key(s) under '$REDIS_PREFIX'"
  else
    say "could not delete the Redis keys under '$REDIS_PREFIX' (best effort; they hold scratch data only)"
  fi
}
# On any exit: no server left behind, no Redis keys of the run, no scratch folder.
# shellcheck disable=SC2317 # invoked by the EXIT trap
cleanup() {
  local status=$?
  if [ "${#SERVER_PIDS[@]}" -gt 0 ]; then
    say "stopping ${#SERVER_PIDS[@]} server(s) (pids ${SERVER_PIDS[*]})"
    stop_servers
  fi
  delete_redis_keys || true
  rm -rf "$WORK"
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

step "services (Postgres, Redis)"
services=$("$ROOT/scripts/services.sh") || die "scripts/services.sh failed"
eval "$services"
if [ "$USE_REDIS" -eq 1 ] && [ -z "${REDIS_URL:-}" ]; then
  die "--redis: scripts/services.sh exported no REDIS_URL"
fi

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

mkdir -p "$ROOT/reports"
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
# Goose's reports (HTML for people, JSON for tools) and the harness's summary of the funnel and its checks.
HTML_REPORT=$ROOT/reports/$MODE-$STAMP.html
JSON_REPORT=$ROOT/reports/$MODE-$STAMP.json
SUMMARY=$ROOT/reports/$MODE-$STAMP.summary.json
read -r -a server_env <<<"${DEMO_SERVER_ENV:-}"
# Server settings a mode needs (DEMO_SERVER_ENV, after them, still overrides): the campaign scenario counts refunds
# in the simulated gateway's ledger, which it keeps in Postgres only when asked, and waits for the campaign loop.
mode_env=()
case $MODE in
  campaign) mode_env=(SIMULATED_GATEWAY_LEDGER=true CAMPAIGN_TICK_MS=200) ;;
esac
# Every server signs with the same JWT secret, so a token from one is good on all of them.
common_env=(BIND_ADDR=127.0.0.1:0 JWT_SECRET=flashsale-demo-secret-not-for-production RUST_LOG="${RUST_LOG:-info}" NO_COLOR=1)
if [ "$USE_REDIS" -eq 1 ]; then
  # Redis is the stock authority; a prefix of this run's own keeps it apart from other runs and deployments.
  REDIS_PREFIX="demo-$STAMP-$$:"
  gate_env=(env "REDIS_KEY_PREFIX=$REDIS_PREFIX")
  GATE="the Redis gate ($REDIS_URL, keys under '$REDIS_PREFIX')"
else
  # One instance on the embedded gate; REDIS_URL (exported by services.sh) is only for the Redis gate.
  gate_env=(env -u REDIS_URL)
  GATE="the embedded gate"
fi
server_log() {
  if [ "$INSTANCES" -eq 1 ]; then
    printf '%s\n' "$ROOT/reports/demo-$STAMP.server.log"
  else
    printf '%s\n' "$ROOT/reports/demo-$STAMP.server-$1.log"
  fi
}

step "$INSTANCES server(s) on free ports, on $GATE"
# All start at once (migrations take an advisory lock); then each must print its address.
for i in $(seq 1 "$INSTANCES"); do
  "${gate_env[@]}" "${common_env[@]}" "${mode_env[@]}" "${server_env[@]}" "$FLASHSALE" serve \
    >"$WORK/server-$i.out" 2>"$(server_log "$i")" &
  SERVER_PIDS+=("$!")
done
BASE_URLS=()
for i in $(seq 1 "$INSTANCES"); do
  pid=${SERVER_PIDS[$((i - 1))]}
  log=$(server_log "$i")
  url=
  for _ in $(seq 1 $((SERVER_START_SECONDS * 10))); do
    url=$(sed -n 's#^listening on \(http://[^ ]*\)$#\1#p' "$WORK/server-$i.out" | head -n 1)
    [ -n "$url" ] && break
    kill -0 "$pid" 2>/dev/null || die "server $i exited before listening; see $log"
    sleep 0.1
  done
  [ -n "$url" ] || die "server $i did not print its address within ${SERVER_START_SECONDS}s; see $log"
  BASE_URLS+=("$url")
  say "server $i pid $pid listening on $url (log: $log)"
done
BASE_URL_LIST=$(
  IFS=,
  printf '%s' "${BASE_URLS[*]}"
)

# Options only some scenarios take: subscribe spawns `flashsale renew`, the run's own copy.
mode_args=()
case $MODE in
  subscribe) mode_args=(--flashsale-bin "$FLASHSALE") ;;
esac
step "flashsale-load $MODE (goose) ${mode_args[*]} $*"
set +e
LOAD_ADMIN_PASSWORD=$ADMIN_PASSWORD "$LOAD" "$MODE" --base-url "$BASE_URL_LIST" --database-url "$DATABASE_URL" \
  --admin-email "$ADMIN_EMAIL" --report-file "$HTML_REPORT" --report-file "$JSON_REPORT" \
  --summary-file "$SUMMARY" "${mode_args[@]}" "$@"
LOAD_STATUS=$?
set -e

# The drop report, as its page (inline SVG, no assets from elsewhere), saved before the servers stop: signed in as
# the demo's admin, from the first server, after the servers' next tick has written their last counts.
DROP_REPORT=$ROOT/reports/$MODE-$STAMP.report.html
save_drop_report() {
  local drop token
  # A scenario without a drop (no drop_id in its summary) has no drop report.
  drop=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1])).get("drop_id") or "")' "$SUMMARY" 2>/dev/null) || return 1
  [ -n "$drop" ] || return 0
  token=$(curl -fsS -H 'content-type: application/json' \
    -d "{\"email\":\"$ADMIN_EMAIL\",\"password\":\"$ADMIN_PASSWORD\"}" "${BASE_URLS[0]}/api/v1/auth/login" |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["access_token"])') || return 1
  sleep 1
  curl -fsS -H "authorization: Bearer $token" "${BASE_URLS[0]}/live/drops/$drop/report" -o "$DROP_REPORT" || return 1
  say "drop report: $DROP_REPORT (served at ${BASE_URLS[0]}/live/drops/$drop/report for the drop's seller and admins)"
}
if [ -s "$SUMMARY" ]; then
  save_drop_report || say "the drop report could not be saved"
fi

step "stopping $INSTANCES server(s) (SIGTERM: finish requests, drain the writer)"
stop_servers
for i in "${!SERVER_STATUSES[@]}"; do
  say "server $((i + 1)) stopped (exit ${SERVER_STATUSES[$i]}); $(tail -n 1 "$(server_log $((i + 1)))" 2>/dev/null || true)"
done

report_line() {
  if [ -s "$HTML_REPORT" ]; then
    say "goose's HTML report: $HTML_REPORT ($(wc -c <"$HTML_REPORT") bytes); JSON: $JSON_REPORT; summary: $SUMMARY"
    if [ -s "$DROP_REPORT" ]; then say "the drop report page: $DROP_REPORT"; fi
  else
    say "goose wrote no HTML report at $HTML_REPORT"
  fi
}
case $LOAD_STATUS in
  0)
    step "PASS: every invariant held"
    report_line
    ;;
  1)
    step "FAIL: an invariant or a threshold did not hold (see the checks above)"
    report_line
    ;;
  *) step "ERROR: the harness could not finish (exit $LOAD_STATUS)" ;;
esac
exit "$LOAD_STATUS"
