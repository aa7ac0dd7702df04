#!/usr/bin/env bash
# Renewal throughput: `flashsale renew --at` over N due subscriptions (default 100000) in a database of its own,
# half paid by card (through the simulated gateway, recorded in gateway_charges) and half with points (a ledger
# debit each). Seeds the rows with SQL, runs one renew, prints its line (time and renewals per second), then checks
# one paid renewal per subscription, one approved gateway charge per card subscription, and every balance equal to
# its ledger.
#
#   scripts/renew_bench.sh [N]        RENEW_BIN: the flashsale binary (default: the release build, built here)
#                                     RENEW_BATCH_MAX: subscriptions claimed per transaction (default 500)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"
cd "$ROOT"
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
N=${1:-100000}
DB=flashsale_bench_renew
say() { printf 'renew_bench: %s\n' "$*" >&2; }

eval "$("$ROOT/scripts/services.sh")"
if [ -z "${RENEW_BIN:-}" ]; then
  cargo build --release -q -p shell-api --bin flashsale
  RENEW_BIN=$TARGET/release/flashsale
fi
ADMIN_URL=$(printf '%s' "$DATABASE_URL" | sed -E 's#^([a-zA-Z][a-zA-Z0-9+.-]*://[^/?]*)(/[^?]*)?#\1/postgres#')
BENCH_URL=$(printf '%s' "$DATABASE_URL" | sed -E "s#^([a-zA-Z][a-zA-Z0-9+.-]*://[^/?]*)(/[^?]*)?#\\1/$DB#")
psql -X -q -w -d "$ADMIN_URL" -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)"
DATABASE_URL=$BENCH_URL "$RENEW_BIN" migrate >/dev/null

say "seeding $N subscriptions due at 2026-01-01T00:00:00Z"
psql -X -q -w -v ON_ERROR_STOP=1 -v n="$N" -d "$BENCH_URL" <<'SQL'
INSERT INTO members (id, email, password_hash, name, role)
VALUES ('00000000-0000-7000-8000-000000000001', 'seller@bench.test', 'x', 'Seller', 'seller');
INSERT INTO products (id, seller_id, name, price, currency, kind, billing_interval)
VALUES ('00000000-0000-7000-8000-000000000002', '00000000-0000-7000-8000-000000000001', 'Box', 1000, 'KRW',
        'subscription', 'month');
CREATE TEMP TABLE seed AS
SELECT i, gen_random_uuid() AS member_id, gen_random_uuid() AS subscription_id FROM generate_series(1, :n) AS i;
INSERT INTO members (id, email, password_hash, name, role)
SELECT member_id, 'm' || i || '@bench.test', 'x', 'Member', 'customer' FROM seed;
INSERT INTO balances (member_id, balance) SELECT member_id, 5000 FROM seed WHERE i % 2 = 1;
INSERT INTO balance_entries (id, member_id, kind, amount, balance)
SELECT gen_random_uuid(), member_id, 'charge', 5000, 5000 FROM seed WHERE i % 2 = 1;
INSERT INTO subscriptions (id, product_id, member_id, seller_id, status, price, currency, billing_interval,
    payment_method, payment_token, current_period_start, current_period_end, next_attempt_at, created_at)
SELECT subscription_id, '00000000-0000-7000-8000-000000000002', member_id, '00000000-0000-7000-8000-000000000001',
       'active', 1000, 'KRW', 'month',
       CASE WHEN i % 2 = 0 THEN 'card' ELSE 'points' END, CASE WHEN i % 2 = 0 THEN 'tok_ok' END,
       '2025-12-01T00:00:00Z', '2026-01-01T00:00:00Z', '2026-01-01T00:00:00Z', '2025-12-01T00:00:00Z'
FROM seed;
ANALYZE;
SQL

say "renewing with $RENEW_BIN"
DATABASE_URL=$BENCH_URL RUST_LOG=warn "$RENEW_BIN" renew --at 2026-01-01T00:01:00Z

psql -X -q -w -v ON_ERROR_STOP=1 -v n="$N" -d "$BENCH_URL" <<'SQL'
\set QUIET on
SELECT (SELECT count(*) FROM subscription_charges WHERE status = 'paid') AS paid_renewals,
       (SELECT count(DISTINCT subscription_id) FROM subscription_charges WHERE status = 'paid') AS subscriptions_paid,
       (SELECT count(*) FROM gateway_charges WHERE outcome = 'approved') AS approved_at_gateway,
       (SELECT count(*) FROM balances b WHERE b.balance <>
           (SELECT COALESCE(sum(amount), 0) FROM balance_entries e WHERE e.member_id = b.member_id)) AS off_ledger;
SELECT CASE WHEN (SELECT count(*) FROM subscription_charges WHERE status = 'paid') = :n
             AND (SELECT count(DISTINCT subscription_id) FROM subscription_charges WHERE status = 'paid') = :n
             AND (SELECT count(*) FROM gateway_charges WHERE outcome = 'approved') = :n / 2
       THEN 'ok: one charge per subscription for the period' ELSE 'FAILED' END AS verdict;
SQL
