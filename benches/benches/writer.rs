//! Criterion benchmark of durable purchases: the engine's batched writer (group commit; each payment awaits the
//! commit of its batch) beside the naive path, one transaction per purchase from a connection pool, as a
//! synchronous service writes. Both store the same rows (the reservation, the purchase, the reservation marked
//! paid) and both answer only after the commit; both have the same purchases in flight. Reported as purchases/s.
//!
//! Needs Postgres: `scripts/bench.sh --bench writer` (it brings one up), or `DATABASE_URL` set. The database
//! `flashsale_bench_writer` on that server is created if missing; each run writes under a drop of its own and
//! deletes its rows at the end, so runs (and test runners running each benchmark once, in parallel) do not meet.

#![allow(
    clippy::expect_used,
    reason = "a benchmark without its database cannot run"
)]

use chrono::Utc;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use deadpool_postgres::Pool;
use engine::types::Purchase;
use engine::writer::{self, HoldRow, WriterConfig};
use shell_api::config::DbArgs;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;
use uuid::Uuid;

/// Purchases in flight at once, as many concurrent payments would have: 256, and the service's default bound on
/// payments in flight (`PAY_INFLIGHT_MAX`).
const IN_FLIGHT: [usize; 2] = [256, 1024];
/// Connections in the pool, as the service's default.
const POOL_SIZE: usize = 16;
const DATABASE: &str = "flashsale_bench_writer";

/// `DATABASE_URL` (or the default) with its database replaced by the benchmark's own.
fn database_url() -> String {
    let url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/flashsale".to_owned());
    shell_api::db::with_database(&url, DATABASE)
}

/// Connects, migrates and makes this run's drop for the purchases to point at. Its stock is far above what a run sells:
/// Postgres refuses purchases past a drop's stock (`drops_sold_check`), and a long run stores over a million.
async fn setup() -> (Pool, Uuid) {
    let args = DbArgs {
        database_url: database_url(),
        db_pool_size: POOL_SIZE,
        db_pool_wait_ms: 30_000,
    };
    let pool = shell_api::db::connect(&args).await.expect("bench database");
    shell_api::db::migrate(&pool).await.expect("migrations");
    let client = pool.get().await.expect("connection");
    let drop = Uuid::now_v7();
    client
        .execute(
            "WITH seller AS (
                 INSERT INTO members (id, email, password_hash, name, role)
                 VALUES (gen_random_uuid(), $2, 'x', 'Seller', 'seller') RETURNING id),
             product AS (
                 INSERT INTO products (id, seller_id, name, price, kind)
                 SELECT gen_random_uuid(), id, 'Item', 100, 'preorder' FROM seller RETURNING id, seller_id)
             INSERT INTO drops (id, product_id, seller_id, stock, opens_at, per_member_limit, hold_seconds, price,
                                currency)
             SELECT $1, id, seller_id, 2000000000, now(), 1, 300, 100, 'KRW' FROM product",
            &[&drop, &format!("bench-{drop}@example.test")],
        )
        .await
        .expect("seed drop");
    (pool, drop)
}

/// Deletes what this run wrote: its purchases, reservations, drop, product and seller.
async fn cleanup(pool: &Pool, drop: Uuid) {
    let client = pool.get().await.expect("connection");
    // One statement after another: a drop with sales cannot be deleted, and a statement's own sub-statements
    // would not see each other's deletes.
    for sql in [
        "DELETE FROM purchases WHERE drop_id = $1",
        "DELETE FROM reservations WHERE drop_id = $1",
        "DELETE FROM hold_batches WHERE drop_id = $1",
    ] {
        client.execute(sql, &[&drop]).await.expect("cleanup");
    }
    client
        .execute(
            "WITH drop_gone AS (DELETE FROM drops WHERE id = $1 RETURNING product_id, seller_id),
                  product_gone AS (DELETE FROM products WHERE id IN (SELECT product_id FROM drop_gone))
             DELETE FROM members WHERE id IN (SELECT seller_id FROM drop_gone)",
            &[&drop],
        )
        .await
        .expect("cleanup");
}

fn purchase_for(drop: Uuid) -> (Purchase, HoldRow) {
    let now = Utc::now();
    let (reservation, member) = (Uuid::now_v7(), Uuid::now_v7());
    let purchase = Purchase {
        id: Uuid::now_v7(),
        reservation_id: reservation,
        drop_id: drop,
        product_id: drop,
        member_id: member,
        quantity: 1,
        amount: 100,
        currency: "KRW".into(),
        paid_at: now,
    };
    let hold = HoldRow {
        id: reservation,
        drop_id: drop,
        member_id: member,
        quantity: 1,
        created_at: now,
        expires_at: now + chrono::Duration::seconds(300),
    };
    (purchase, hold)
}

/// The naive path: the reservation, the purchase and the paid mark in one transaction of their own.
async fn store_alone(pool: &Pool, purchase: &Purchase, hold: &HoldRow) {
    let mut client = pool.get().await.expect("connection");
    let tx = client.transaction().await.expect("begin");
    let quantity = hold.quantity as i32;
    tx.execute(
        "INSERT INTO reservations (id, drop_id, member_id, quantity, status, created_at, expires_at, updated_at)
         VALUES ($1, $2, $3, $4, 'held', $5, $6, $5) ON CONFLICT (id) DO NOTHING",
        &[&hold.id, &hold.drop_id, &hold.member_id, &quantity, &hold.created_at, &hold.expires_at],
    )
    .await
    .expect("reservation");
    tx.execute(
        "INSERT INTO purchases (id, reservation_id, drop_id, product_id, member_id, quantity, amount, currency, paid_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) ON CONFLICT DO NOTHING",
        &[
            &purchase.id,
            &purchase.reservation_id,
            &purchase.drop_id,
            &purchase.product_id,
            &purchase.member_id,
            &quantity,
            &purchase.amount,
            &purchase.currency,
            &purchase.paid_at,
        ],
    )
    .await
    .expect("purchase");
    tx.execute(
        "UPDATE reservations SET status = 'paid', reason = NULL, updated_at = $2 WHERE id = $1",
        &[&purchase.reservation_id, &purchase.paid_at],
    )
    .await
    .expect("paid");
    tx.commit().await.expect("commit");
}

#[derive(Clone, Copy)]
enum Path {
    Writer,
    OneTransactionEach,
}

/// Stores `count` purchases with at most `in_flight` waiting at once; the time until the last is acknowledged.
async fn run(path: Path, pool: &Pool, drop_id: Uuid, count: u64, in_flight: usize) -> Duration {
    let (handle, task) = writer::spawn(pool.clone(), WriterConfig::default());
    let slots = Arc::new(Semaphore::new(in_flight));
    let began = Instant::now();
    let mut acks = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let permit = Arc::clone(&slots)
            .acquire_owned()
            .await
            .expect("semaphore open");
        let (purchase, hold) = purchase_for(drop_id);
        let (handle, pool) = (handle.clone(), pool.clone());
        acks.push(tokio::spawn(async move {
            match path {
                Path::Writer => {
                    handle
                        .purchase(purchase, hold)
                        .await
                        .expect("purchase stored");
                }
                Path::OneTransactionEach => store_alone(&pool, &purchase, &hold).await,
            }
            drop(permit);
        }));
    }
    for ack in acks {
        ack.await.expect("purchase task");
    }
    let elapsed = began.elapsed();
    handle.shutdown().await.expect("writer shutdown");
    task.await.expect("writer task");
    elapsed
}

fn writer(c: &mut Criterion) {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    // Set up on the first measurement, not here: `--list` (as test runners call it) must not touch the database.
    let database = std::cell::OnceCell::new();
    let mut group = c.benchmark_group("writer");
    group
        .throughput(Throughput::Elements(1))
        .sample_size(10)
        .warm_up_time(Duration::from_secs(2))
        .measurement_time(Duration::from_secs(8));
    for in_flight in IN_FLIGHT {
        for (name, path) in [
            ("group_commit", Path::Writer),
            ("transaction_per_purchase", Path::OneTransactionEach),
        ] {
            group.bench_with_input(BenchmarkId::new(name, in_flight), &path, |b, &path| {
                b.iter_custom(|iters| {
                    let (pool, drop_id) = database.get_or_init(|| runtime.block_on(setup()));
                    runtime.block_on(run(path, pool, *drop_id, iters, in_flight))
                })
            });
        }
    }
    group.finish();
    if let Some((pool, drop_id)) = database.get() {
        runtime.block_on(cleanup(pool, *drop_id));
    }
}

criterion_group!(benches, writer);
criterion_main!(benches);
