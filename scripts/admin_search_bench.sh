#!/usr/bin/env bash
# Measures the back office's search (GET /api/v1/admin/search) on 100k members, 100k products and 10k drops:
# seeds a private database with SQL, starts `flashsale serve` on it, and times each kind of query over HTTP with
# curl (N requests each, one at a time), printing p50 / p95 / max in milliseconds. Not part of the test suite.
#
#   scripts/admin_search_bench.sh            FLASHSALE_BIN (default: $CARGO_TARGET_DIR/release/flashsale, built
#                                            with `cargo build --release -p shell-api` if missing), N=200
#
# Needs psql and curl. The database `flashsale_admin_search_bench` is dropped and made again on every run.
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(scripts/services.sh)"

N="${N:-200}"
TARGET="${CARGO_TARGET_DIR:-target}"
BIN="${FLASHSALE_BIN:-$TARGET/release/flashsale}"
if [[ ! -x "$BIN" ]]; then
    cargo build --release -p shell-api
fi
NAME=flashsale_admin_search_bench
ADMIN_URL="${DATABASE_URL%/*}/postgres"
BENCH_URL="${DATABASE_URL%/*}/$NAME"
psql -q "$ADMIN_URL" -c "DROP DATABASE IF EXISTS $NAME" -c "CREATE DATABASE $NAME"
DATABASE_URL="$BENCH_URL" "$BIN" migrate >/dev/null

echo "seeding 100k members, 100k products, 10k drops..." >&2
psql -q "$BENCH_URL" <<'SQL'
INSERT INTO members (id, email, password_hash, name, role)
SELECT gen_random_uuid(), 'member' || i || '@bench.test', 'x', 'Member ' || i || ' ' || md5(i::text),
       CASE WHEN i = 1 THEN 'seller' ELSE 'customer' END
FROM generate_series(1, 100000) AS i;
INSERT INTO products (id, seller_id, name, price, currency, kind)
SELECT gen_random_uuid(), (SELECT id FROM members WHERE email = 'member1@bench.test'),
       'Product ' || i || ' ' || md5('p' || i::text), 1000, 'KRW', 'preorder'
FROM generate_series(1, 100000) AS i;
INSERT INTO drops (id, product_id, seller_id, stock, opens_at, per_member_limit, hold_seconds, price, currency)
SELECT gen_random_uuid(), p.id, p.seller_id, 10, now() + interval '1 day', 1, 300, 1000, 'KRW'
FROM (SELECT id, seller_id FROM products ORDER BY id LIMIT 10000) p;
ANALYZE members; ANALYZE products; ANALYZE drops;
SQL

DATABASE_URL="$BENCH_URL" "$BIN" admin create --email admin@bench.test --password bench-password >/dev/null
LOG=$(mktemp)
DATABASE_URL="$BENCH_URL" BIND_ADDR=127.0.0.1:0 JWT_SECRET=bench RUST_LOG=warn "$BIN" serve >"$LOG" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null; rm -f "$LOG"' EXIT
for _ in $(seq 1 1200); do
    grep -q "listening on" "$LOG" && break
    sleep 0.1
done
BASE=$(sed -n 's/^listening on //p' "$LOG" | head -1)
TOKEN=$(curl -sf "$BASE/api/v1/auth/login" -H 'content-type: application/json' \
    -d '{"email":"admin@bench.test","password":"bench-password"}' | sed -n 's/.*"access_token":"\([^"]*\)".*/\1/p')
DROP_ID=$(psql -qtA "$BENCH_URL" -c "SELECT id FROM drops ORDER BY id LIMIT 1 OFFSET 4242")

measure() {
    local label="$1" query="$2"
    local times
    times=$(for _ in $(seq 1 "$N"); do
        curl -s -o /dev/null -w '%{time_total}\n' -H "authorization: Bearer $TOKEN" \
            "$BASE/api/v1/admin/search?$query"
    done | sort -n)
    local p50 p95 max
    p50=$(sed -n "$((N / 2))p" <<<"$times")
    p95=$(sed -n "$((N * 95 / 100))p" <<<"$times")
    max=$(tail -1 <<<"$times")
    local status
    status=$(curl -s -o /dev/null -w '%{http_code}' -H "authorization: Bearer $TOKEN" "$BASE/api/v1/admin/search?$query")
    awk -v l="$label" -v a="$p50" -v b="$p95" -v c="$max" -v s="$status" \
        'BEGIN { printf "%-44s %s  p50 %7.2f ms  p95 %7.2f ms  max %7.2f ms\n", l, s, a*1000, b*1000, c*1000 }'
}

echo "N=$N requests per query, one at a time, against $BIN" >&2
measure "member by email (member4242@)" "q=member4242%40&kind=member"
measure "member by name fragment (md5 slice)" "q=$(psql -qtA "$BENCH_URL" -c "SELECT substr(md5('777'), 5, 8)")&kind=member"
measure "product by name (Product 99999)" "q=Product%2099999&kind=product"
measure "drop by id" "q=$DROP_ID&kind=drop"
measure "drop by product name" "q=$(psql -qtA "$BENCH_URL" -c "SELECT substr(md5('p42'), 3, 8)")&kind=drop"
measure "all kinds, selective (4242)" "q=4242"
measure "all kinds, matches every row (Member)" "q=Member&limit=20"
measure "all kinds, 2 chars (no trigram: a scan)" "q=ab"
