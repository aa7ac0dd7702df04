#!/usr/bin/env bash
# The opening burst against release servers on this machine: `flashsale-load burst` opens BURST_CLIENTS
# connections (default 16000) before a drop opens and has each send its reservation at the opening instant, then
# prints the time until every client had an answer, the answers by status, connection errors, latency and each
# server's memory, and its checks against the targets.
#
#   scripts/burst.sh            one instance, embedded gate; target: every answer within 1 s (BURST_WITHIN_MS)
#   scripts/burst.sh --redis    three instances on the Redis gate (REDIS_URL from services.sh); target 2 s
#
# Settings: BURST_CLIENTS (16000), BURST_MEMBERS (200: signed up through the API, two argon2 hashes each; client i
# reserves as member i mod BURST_MEMBERS), BURST_STOCK (1000), BURST_WITHIN_MS, BURST_OPENS_IN_MS (10000: every connection must be open by then), BURST_DB (flashsale_burst, dropped
# and made again), BURST_BIN (another flashsale binary). The servers' environment passes through (e.g.
# SERVE_RUNTIMES=shared|per-core, RESERVE_INFLIGHT_MAX), and so does LOAD_BURST_JSON (a file for the report as JSON,
# which scripts/bench.sh puts on the sheet). Exits as flashsale-load does: 0 pass, 1 a target failed,
# 2 the run could not be carried out.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"
cd "$ROOT"
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
REDIS=0
if [ "${1:-}" = "--redis" ]; then REDIS=1; fi
INSTANCES=$([ "$REDIS" = 1 ] && echo 3 || echo 1)
WITHIN_MS=${BURST_WITHIN_MS:-$([ "$REDIS" = 1 ] && echo 2000 || echo 1000)}
DB=${BURST_DB:-flashsale_burst}

say() { printf 'burst: %s\n' "$*" >&2; }
die() {
  say "error: $*"
  exit 2
}

eval "$("$ROOT/scripts/services.sh")"
cargo build --release -q -p shell-api --bin flashsale
cargo build --release -q -p loadtest
BIN="${BURST_BIN:-$TARGET/release/flashsale}"
LOAD="$TARGET/release/flashsale-load"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/flashsale-burst.XXXXXX")
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT

admin_url=$(printf '%s' "$DATABASE_URL" | sed -E 's#^([a-zA-Z][a-zA-Z0-9+.-]*://[^/?]*)(/[^?]*)?#\1/postgres#')
psql -X -q -d "$admin_url" -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)" >/dev/null
db_url=$(printf '%s' "$DATABASE_URL" | sed -E "s#^([a-zA-Z][a-zA-Z0-9+.-]*://[^/?]*)(/[^?]*)?#\1/$DB#")

# Signing the members up is argon2 on the server: both cores for it during setup, none of it during the burst.
env_args=(DATABASE_URL="$db_url" BIND_ADDR=127.0.0.1:0 JWT_SECRET=burst-secret
  RUST_LOG="${RUST_LOG:-warn,shell_api::server=info}" PASSWORD_HASH_CONCURRENCY=2)
if [ "$REDIS" = 1 ]; then
  env_args+=(REDIS_URL="$REDIS_URL" REDIS_KEY_PREFIX="burst-$$-$(date +%s):")
else
  env_args+=(REDIS_URL=)
fi
env "${env_args[@]}" "$BIN" migrate >/dev/null
env "${env_args[@]}" "$BIN" admin create --email admin@burst.local --password burst-admin-password >/dev/null
bases=()
for i in $(seq 1 "$INSTANCES"); do
  env "${env_args[@]}" "$BIN" serve >"$WORK/server$i.out" 2>"$WORK/server$i.err" &
  PIDS+=($!)
  for _ in $(seq 1 600); do
    grep -q '^listening on ' "$WORK/server$i.out" 2>/dev/null && break
    kill -0 "${PIDS[-1]}" 2>/dev/null || die "server $i exited: $(tail -5 "$WORK/server$i.err")"
    sleep 0.1
  done
  base=$(sed -n 's/^listening on //p' "$WORK/server$i.out" | head -1)
  [ -n "$base" ] || die "server $i did not start"
  bases+=("$base")
  # The open-files line (raised, or too low for the settings).
  grep -i 'open-files\|runtime per core' "$WORK/server$i.err" | sed "s/^/burst: server $i: /" >&2 || true
done
say "$INSTANCES server(s) at ${bases[*]} ($([ "$REDIS" = 1 ] && echo 'Redis gate' || echo 'embedded gate')); somaxconn $(cat /proc/sys/net/core/somaxconn), open files $(ulimit -Hn) (hard)"

status=0
"$LOAD" burst --base-url "$(IFS=,; echo "${bases[*]}")" --admin-email admin@burst.local \
  --admin-password burst-admin-password --clients "${BURST_CLIENTS:-16000}" --members "${BURST_MEMBERS:-200}" \
  --stock "${BURST_STOCK:-1000}" --within-ms "$WITHIN_MS" --opens-in-ms "${BURST_OPENS_IN_MS:-10000}" --setup-concurrency 16 \
  --server-pid "$(IFS=,; echo "${PIDS[*]}")" || status=$?
for i in $(seq 1 "$INSTANCES"); do
  if grep -qi 'warn\|error' "$WORK/server$i.err"; then
    say "server $i logged:"
    grep -i 'warn\|error' "$WORK/server$i.err" | tail -5 >&2
  fi
done
exit "$status"
