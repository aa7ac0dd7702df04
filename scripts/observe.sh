#!/usr/bin/env bash
# The dashboards and alerts of deploy/ checked offline and against the real thing.
#
#   scripts/observe.sh --check   promtool check config (deploy/prometheus/prometheus.yml, which checks alerts.yml),
#                                promtool check rules, promtool test rules (alerts.test.yml: every alert fires where
#                                it should and not where it should not), and the Grafana dashboard's structure
#                                (scripts/observe_check.py dashboard). Seconds; CI runs it.
#   scripts/observe.sh           all of --check, then the live run (well under two minutes after the build):
#     1. a `flashsale serve` (release, or OBSERVE_BIN_DIR's) on the Redis gate, on a private redis-server (free
#        port, no persistence) and a fresh database (OBSERVE_DB, default flashsale_observe), and a real Prometheus
#        (Debian's binary, data under <target>/observe/prometheus, a free port) scraping it every second with
#        deploy/prometheus/alerts.yml loaded;
#     2. a small demo drop from the goose harness (`flashsale-load drop`, as scripts/demo.sh runs it);
#     3. every PromQL expression of the alert rules and of the dashboard through Prometheus's /api/v1/query: any
#        that errors or returns no series fails. An alert condition may be empty while all is well (`x > 0.05`):
#        such an expression is queried again without its trailing `<op> <number>`, and that must return series
#        (scripts/observe_check.py says exactly what it substitutes);
#     4. one alert fired on purpose: the private Redis is SIGKILLed under the server and FlashsaleRedisUnreachable
#        must go pending and then firing (its `for: 30s` as shipped) in /api/v1/alerts within OBSERVE_ALERT_SECONDS.
#
# Settings: OBSERVE_BIN_DIR=DIR runs the flashsale and flashsale-load binaries in DIR instead of building release
# ones (CI: the debug binaries its test and chaos steps built); OBSERVE_DB; OBSERVE_LIMIT_SECONDS (170): the live run (after the build) is stopped past it; OBSERVE_RULES and
# OBSERVE_DASHBOARD check other files than deploy/'s (to see the check fail on a planted mistake).
# Prometheus and promtool come from Debian's `prometheus` package, installed with apt-get when missing (root or
# password-less sudo), as scripts/services.sh installs the databases. Output: <target>/observe/ (prometheus.yml,
# queries.txt, the harness's report, the logs). Exit status: 0 every check held, 1 one failed, 2 the run could not
# be carried out.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"
cd "$ROOT"
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
case $TARGET_DIR in /*) ;; *) TARGET_DIR=$ROOT/$TARGET_DIR ;; esac
OUT=$TARGET_DIR/observe
RULES=${OBSERVE_RULES:-$ROOT/deploy/prometheus/alerts.yml}
DASHBOARD=${OBSERVE_DASHBOARD:-$ROOT/deploy/grafana/dashboards/flashsale.json}
OBSERVE_DB=${OBSERVE_DB:-flashsale_observe}
LIMIT_SECONDS=${OBSERVE_LIMIT_SECONDS:-170}
# The alert's `for: 30s`, one evaluation and one scrape, and margin for a loaded machine.
ALERT_SECONDS=${OBSERVE_ALERT_SECONDS:-60}
SERVER_START_SECONDS=60
PROMETHEUS_START_SECONDS=30
ADMIN_EMAIL=admin@flashsale.local
ADMIN_PASSWORD=observe-admin-password
CHECK=$ROOT/scripts/observe_check.py

step() { printf '\n==> observe: %s (at %ds)\n' "$*" "$SECONDS" >&2; }
say() { printf 'observe: %s\n' "$*" >&2; }
die() {
  say "error: $*"
  exit 2
}
have() { command -v "$1" >/dev/null 2>&1; }
usage() { sed -n '2,30s/^# \{0,1\}//p' "$0"; }

MODE=live
case ${1:-} in
  '') ;;
  --check) MODE=check ;;
  -h | --help)
    usage
    exit 0
    ;;
  *)
    usage >&2
    exit 2
    ;;
esac
case $OBSERVE_DB in
  '' | *[!a-z0-9_]*) die "OBSERVE_DB must be a plain lower-case name (got '$OBSERVE_DB')" ;;
  flashsale | postgres | template0 | template1) die "OBSERVE_DB=$OBSERVE_DB is not a scratch database; it is never dropped" ;;
esac

# Debian's prometheus package (server and promtool), installed when missing. Its own service is not ours to run:
# whatever its postinst starts is left as it is.
ensure_prometheus() {
  if have promtool && have prometheus; then return 0; fi
  local sudo=() aptlog
  have apt-get || die "promtool/prometheus missing and no apt-get; install Prometheus 2.x yourself"
  if [ "$(id -u)" -ne 0 ]; then
    if have sudo && sudo -n true 2>/dev/null; then sudo=(sudo -n); else die "need root or password-less sudo to install prometheus"; fi
  fi
  mkdir -p "$OUT"
  aptlog=$OUT/apt.log
  say "installing Debian's prometheus package (log: $aptlog)"
  ${sudo[@]+"${sudo[@]}"} env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 update \
    </dev/null >"$aptlog" 2>&1 || say "warning: apt-get update failed; trying the install anyway"
  ${sudo[@]+"${sudo[@]}"} env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install -y \
    --no-install-recommends prometheus </dev/null >>"$aptlog" 2>&1 || {
    tail -n 20 "$aptlog" >&2
    die "apt-get install prometheus failed"
  }
  hash -r
  have promtool && have prometheus || die "the prometheus package brought no promtool/prometheus"
}

run_checks() {
  step "promtool $(promtool --version 2>&1 | head -n 1 | awk '{print $3}'): check config, check rules, test rules"
  promtool check config "$ROOT/deploy/prometheus/prometheus.yml"
  promtool check rules "$RULES"
  promtool test rules "$TESTS"

  step "Grafana dashboard and provisioning"
  python3 "$CHECK" dashboard "$DASHBOARD" "$ROOT/deploy/grafana/provisioning/datasources/prometheus.yml" \
    "$ROOT/deploy/grafana/provisioning/dashboards/flashsale.yml" "$ROOT/docker-compose.yaml"
}

ensure_prometheus
TESTS=$ROOT/deploy/prometheus/alerts.test.yml
PLANT=
if [ -n "${OBSERVE_RULES:-}" ]; then
  # The unit tests name `alerts.yml` beside themselves: a planted rules file goes beside a copy of them.
  PLANT=$(mktemp -d "${TMPDIR:-/tmp}/flashsale-observe-rules.XXXXXX")
  trap 'rm -rf "$PLANT"' EXIT
  cp "$RULES" "$PLANT/alerts.yml"
  cp "$TESTS" "$PLANT/alerts.test.yml"
  RULES=$PLANT/alerts.yml
  TESTS=$PLANT/alerts.test.yml
fi
run_checks
if [ "$MODE" = check ]; then
  step "all checks held"
  exit 0
fi

# ---------------------------------------------------------------- the live run

step "services (Postgres; a redis-server binary)"
services=$("$ROOT/scripts/services.sh") || die "scripts/services.sh failed"
eval "$services"
REDIS_SERVER=${REDIS_SERVER_BIN:-$(command -v redis-server || true)}
[ -n "$REDIS_SERVER" ] || die "no redis-server binary (scripts/services.sh exported no REDIS_SERVER_BIN)"

BIN_DIR=${OBSERVE_BIN_DIR:-}
if [ -n "$BIN_DIR" ]; then
  for bin in flashsale flashsale-load; do
    [ -x "$BIN_DIR/$bin" ] || die "OBSERVE_BIN_DIR=$BIN_DIR has no $bin"
  done
else
  step "release build of flashsale and flashsale-load"
  cargo build --release --manifest-path "$ROOT/Cargo.toml" -p shell-api --bin flashsale -p loadtest --bin flashsale-load
  BIN_DIR=$TARGET_DIR/release
fi

LIVE_STARTED=$SECONDS
rm -rf "$OUT/prometheus" "$OUT/work"
mkdir -p "$OUT/prometheus" "$OUT/work"
WORK=$OUT/work
# Run copies: a build elsewhere in the same target folder must not swap the binaries under a running server.
cp "$BIN_DIR/flashsale" "$BIN_DIR/flashsale-load" "$WORK/"
SERVER_PID= PROMETHEUS_PID= REDIS_PID= WATCHDOG_PID=

stop_pid() { # PID SECONDS: SIGTERM, a bounded wait, then SIGKILL
  local pid=$1 i
  [ -n "$pid" ] || return 0
  kill -TERM "$pid" 2>/dev/null || return 0
  for ((i = 0; i < $2 * 10; i++)); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}
# shellcheck disable=SC2317 # invoked by the EXIT trap
cleanup() {
  local status=$?
  [ -z "$WATCHDOG_PID" ] || kill "$WATCHDOG_PID" 2>/dev/null || true
  stop_pid "$SERVER_PID" 15
  stop_pid "$PROMETHEUS_PID" 10
  stop_pid "$REDIS_PID" 5
  rm -f "$WORK/flashsale" "$WORK/flashsale-load"
  [ -z "$PLANT" ] || rm -rf "$PLANT"
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'say "error: stopped after OBSERVE_LIMIT_SECONDS=$LIMIT_SECONDS"; exit 2' TERM
# The whole live run is bounded: past the limit the watchdog stops it (cleanup still runs).
(
  sleep "$LIMIT_SECONDS"
  kill -TERM $$ 2>/dev/null
) </dev/null >/dev/null 2>&1 &
WATCHDOG_PID=$!

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

step "private redis-server"
REDIS_PORT=$(free_port)
"$REDIS_SERVER" --port "$REDIS_PORT" --bind 127.0.0.1 --dir "$WORK" --save '' --appendonly no \
  </dev/null >"$WORK/redis.log" 2>&1 &
REDIS_PID=$!
for _ in $(seq 1 100); do
  if (exec 4<>"/dev/tcp/127.0.0.1/$REDIS_PORT") 2>/dev/null; then break; fi
  kill -0 "$REDIS_PID" 2>/dev/null || die "redis-server exited; see $WORK/redis.log"
  sleep 0.1
done
say "redis-server pid $REDIS_PID on 127.0.0.1:$REDIS_PORT"

step "fresh database $OBSERVE_DB, admin, server on the Redis gate"
DB_URL=$(printf '%s' "$DATABASE_URL" | sed -E "s#^([a-zA-Z][a-zA-Z0-9+.-]*://[^/?]*)(/[^?]*)?#\\1/$OBSERVE_DB#")
ADMIN_DB_URL=$(printf '%s' "$DATABASE_URL" | sed -E 's#^([a-zA-Z][a-zA-Z0-9+.-]*://[^/?]*)(/[^?]*)?#\1/postgres#')
PSQL=$(command -v psql || ls /usr/lib/postgresql/*/bin/psql 2>/dev/null | tail -n 1 || true)
[ -n "$PSQL" ] || die "no psql to drop the scratch database $OBSERVE_DB"
PGCONNECT_TIMEOUT=5 "$PSQL" -X -w -q -v ON_ERROR_STOP=1 -d "$ADMIN_DB_URL" \
  -c "DROP DATABASE IF EXISTS $OBSERVE_DB WITH (FORCE)" >&2
DATABASE_URL=$DB_URL "$WORK/flashsale" admin create --email "$ADMIN_EMAIL" --password "$ADMIN_PASSWORD" >&2
env DATABASE_URL="$DB_URL" REDIS_URL="redis://127.0.0.1:$REDIS_PORT" REDIS_KEY_PREFIX=observe: \
  BIND_ADDR=127.0.0.1:0 JWT_SECRET=flashsale-observe-secret-not-for-production REAPER_INTERVAL_MS=200 \
  PASSWORD_HASH_CONCURRENCY=2 RUST_LOG="${RUST_LOG:-warn}" NO_COLOR=1 \
  "$WORK/flashsale" serve >"$WORK/server.out" 2>"$WORK/server.log" &
SERVER_PID=$!
BASE_URL=
for _ in $(seq 1 $((SERVER_START_SECONDS * 10))); do
  BASE_URL=$(sed -n 's#^listening on \(http://[^ ]*\)$#\1#p' "$WORK/server.out" | head -n 1)
  [ -n "$BASE_URL" ] && break
  kill -0 "$SERVER_PID" 2>/dev/null || die "the server exited before listening; see $WORK/server.log"
  sleep 0.1
done
[ -n "$BASE_URL" ] || die "the server did not print its address within ${SERVER_START_SECONDS}s"
INSTANCE=${BASE_URL#http://}
say "server pid $SERVER_PID on $BASE_URL"

step "Prometheus scraping $INSTANCE every second, rules from ${RULES#"$ROOT"/}"
PROM_PORT=$(free_port)
PROM=http://127.0.0.1:$PROM_PORT
# The shipped config's job and rules, with this run's target and a one-second interval.
cat >"$OUT/prometheus.yml" <<EOF
global:
  scrape_interval: 1s
  scrape_timeout: 1s
  evaluation_interval: 1s
rule_files:
  - $RULES
scrape_configs:
  - job_name: flashsale
    metrics_path: /metrics
    static_configs:
      - targets: ["$INSTANCE"]
EOF
promtool check config "$OUT/prometheus.yml" >/dev/null
prometheus --config.file="$OUT/prometheus.yml" --storage.tsdb.path="$OUT/prometheus" \
  --web.listen-address="127.0.0.1:$PROM_PORT" --storage.tsdb.retention.time=1h --log.level=warn \
  </dev/null >"$WORK/prometheus.log" 2>&1 &
PROMETHEUS_PID=$!
ready=0
for _ in $(seq 1 $((PROMETHEUS_START_SECONDS * 10))); do
  if curl -fsS "$PROM/-/ready" >/dev/null 2>&1; then
    ready=1
    break
  fi
  kill -0 "$PROMETHEUS_PID" 2>/dev/null || die "prometheus exited; see $WORK/prometheus.log"
  sleep 0.1
done
[ "$ready" = 1 ] || die "prometheus was not ready within ${PROMETHEUS_START_SECONDS}s; see $WORK/prometheus.log"
say "prometheus pid $PROMETHEUS_PID on $PROM"

step "a demo drop (flashsale-load drop: 120 buyers x 2 tabs, 40 units; $(basename "$BIN_DIR") binaries)"
# What scripts/demo.sh runs, smaller: it sells out, holds are abandoned (cancelled, expired), declined and paid.
LOAD_ADMIN_PASSWORD=$ADMIN_PASSWORD timeout 120 "$WORK/flashsale-load" drop --base-url "$BASE_URL" \
  --database-url "$DB_URL" --admin-email "$ADMIN_EMAIL" --buyers 120 --attempts-per-buyer 2 --stock 40 \
  --hold-seconds 3 --opens-in-ms 2000 --restock-slack-seconds 2 --reaper-interval-ms 200 \
  --report-file "$OUT/drop.html" --summary-file "$OUT/drop.summary.json" --quiet >"$WORK/load.out" 2>&1 || {
  tail -n 30 "$WORK/load.out" >&2
  die "the demo drop failed (exit $?); see $WORK/load.out"
}
grep -E '^flashsale-load drop:|^final' "$WORK/load.out" >&2 || true
# Two more scrapes and an evaluation after the last request, so every rate sees the drop's end.
sleep 3

step "every PromQL expression of the rules and the dashboard (${DASHBOARD#"$ROOT"/}) against Prometheus"
status=0
python3 "$CHECK" queries "$PROM" "$RULES" "$DASHBOARD" | tee "$OUT/queries.txt" || status=1
[ "$status" = 0 ] || {
  say "some expressions failed; see $OUT/queries.txt"
  exit 1
}

step "firing FlashsaleRedisUnreachable: SIGKILL the server's Redis"
python3 "$CHECK" quiet "$PROM" FlashsaleRedisUnreachable
kill -KILL "$REDIS_PID"
wait "$REDIS_PID" 2>/dev/null || true
REDIS_PID=
python3 "$CHECK" alert "$PROM" FlashsaleRedisUnreachable "$INSTANCE" "$ALERT_SECONDS" | tee -a "$OUT/queries.txt" ||
  exit 1

step "all checks held (live run: $((SECONDS - LIVE_STARTED))s after the build)"
