//! Criterion benchmark of reservations through the Redis gate: the gate as built (requests that arrive while a
//! script call is in flight go together in the next call) beside the naive path, one EVALSHA of the same script
//! per reservation, from the same number of concurrent clients over one multiplexed connection (which pipelines
//! them) and over a bb8 pool of connections. Reported as reservations/s.
//!
//! Every reservation is by a new member, for one unit, on a drop with stock for all of them, so each one succeeds
//! and does the full work (limit check, stock, hold record). The gate's journal is off: this measures the stock
//! authority, not Postgres. Needs Redis: `REDIS_URL` (default the local one); `scripts/bench.sh --bench redis_gate`
//! brings one up. Keys live under a prefix of their own and are deleted after each measurement.

#![allow(
    clippy::expect_used,
    reason = "a benchmark without its Redis cannot run"
)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use engine::gate::redis::{
    drop_keys, reserve_script, DropKeys, RedisConn, RedisGate, RedisGateConfig,
};
use engine::gate::{Gate, Restore};
use engine::types::{DropMode, DropSpec};
use uuid::Uuid;

/// Concurrent clients, as a spike's requests in flight on one instance.
const CLIENTS: usize = 256;
/// Units of each drop the benchmark sells: one drop per 100,000 reservations, as a large real drop.
const DROP_STOCK: u64 = 100_000;
/// Connections in the bb8 pool of the baseline.
const POOL_SIZE: u32 = 16;

fn redis_url() -> String {
    std::env::var("REDIS_URL")
        .ok()
        .filter(|url| !url.is_empty())
        .unwrap_or_else(|| "redis://127.0.0.1:6379".to_owned())
}

fn prefix() -> String {
    format!("bench-{}:", Uuid::new_v4().simple())
}

fn spec(stock: u32) -> DropSpec {
    let now = Utc::now();
    DropSpec {
        id: Uuid::now_v7(),
        // Any seq that fits a hold id; the benchmark never looks holds up by id.
        seq: i64::from(rand_seq()),
        product_id: Uuid::nil(),
        seller_id: Uuid::nil(),
        stock,
        opens_at: now,
        closes_at: None,
        per_member_limit: 1,
        hold_seconds: 300,
        price: 100,
        currency: "KRW".into(),
        created_at: now,
        mode: DropMode::FirstCome,
        draw_at: None,
        queue: None,
        goal_units: None,
    }
}

/// A new member id, cheaply: the benchmark measures the gate, not the client's random number generator.
fn member() -> Uuid {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    static BASE: std::sync::OnceLock<u128> = std::sync::OnceLock::new();
    let base = *BASE.get_or_init(|| Uuid::new_v4().as_u128());
    Uuid::from_u128(base ^ u128::from(NEXT.fetch_add(1, Ordering::Relaxed)))
}

fn rand_seq() -> u32 {
    (Uuid::new_v4().as_u128() as u32) >> 1
}

/// A gate whose Postgres pool never connects (a drop with keys in Redis never needs it) and whose journal is off.
async fn gate(prefix: &str) -> RedisGate {
    let mut config = RedisGateConfig::new(vec![redis_url()]);
    config.key_prefix = prefix.to_owned();
    config.journal = false;
    // Pools connect lazily: this one never does.
    let mut pg = deadpool_postgres::Config::new();
    pg.url = Some("postgres://postgres@127.0.0.1:1/unused".into());
    let db = pg
        .create_pool(
            Some(deadpool_postgres::Runtime::Tokio1),
            deadpool_postgres::tokio_postgres::NoTls,
        )
        .expect("a pool (it is never used)");
    RedisGate::connect(config, db).await.expect("redis gate")
}

async fn delete_keys(conn: &mut RedisConn, prefix: &str, drop: Uuid) {
    let keys = drop_keys(prefix, drop);
    let _: () = redis::cmd("DEL")
        .arg(&keys[..])
        .query_async(conn)
        .await
        .expect("delete keys");
}

/// `count` reservations by new members from `CLIENTS` concurrent clients; returns how long they took.
async fn batched(gate: &Arc<RedisGate>, drop: Uuid, count: u64) -> Duration {
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let (gate, next) = (Arc::clone(gate), Arc::clone(&next));
            tokio::spawn(async move {
                while next.fetch_add(1, Ordering::Relaxed) < count {
                    let hold = gate
                        .reserve(drop, Uuid::nil(), member(), 1, 0)
                        .await
                        .expect("redis answers");
                    assert!(hold.is_ok(), "stock for everyone: {hold:?}");
                }
            })
        })
        .collect();
    for client in clients {
        client.await.expect("client");
    }
    started.elapsed()
}

/// Where the baseline sends its one-request script calls.
#[derive(Clone)]
enum Naive {
    Multiplexed(redis::aio::MultiplexedConnection),
    Pool(bb8::Pool<redis::Client>),
}

async fn unbatched(naive: &Naive, keys: Arc<DropKeys>, count: u64) -> Duration {
    let script = Arc::new(reserve_script());
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let (naive, keys, script, next) = (
                naive.clone(),
                Arc::clone(&keys),
                Arc::clone(&script),
                Arc::clone(&next),
            );
            tokio::spawn(async move {
                while next.fetch_add(1, Ordering::Relaxed) < count {
                    let mut call = script.prepare_invoke();
                    for key in keys.iter() {
                        call.key(key);
                    }
                    call.arg(format!("{}0001", member().simple()));
                    let reply: Vec<redis::Value> = match &naive {
                        Naive::Multiplexed(conn) => call.invoke_async(&mut conn.clone()).await,
                        Naive::Pool(pool) => {
                            let mut conn = pool.get().await.expect("pooled connection");
                            call.invoke_async(&mut *conn).await
                        }
                    }
                    .expect("redis answers");
                    // { status, entry, available, outcomes }: '' when every request (here, the one) was granted.
                    assert_eq!(
                        reply.last(),
                        Some(&redis::Value::BulkString(Vec::new())),
                        "{reply:?}"
                    );
                    assert!(reply
                        .get(1)
                        .is_some_and(|entry| entry != &redis::Value::BulkString(Vec::new())));
                }
            })
        })
        .collect();
    for client in clients {
        client.await.expect("client");
    }
    started.elapsed()
}

/// Runs `iters` reservations as drops of `DROP_STOCK` units (a new drop, loaded before and deleted after, outside
/// the time measured), so both paths work on hashes and streams of the same size, as a real drop of that size.
async fn by_drops<F, Fut>(
    gate: &RedisGate,
    conn: &mut RedisConn,
    prefix: &str,
    iters: u64,
    mut run: F,
) -> Duration
where
    F: FnMut(Uuid, u64) -> Fut,
    Fut: std::future::Future<Output = Duration>,
{
    let mut total = Duration::ZERO;
    let mut left = iters;
    while left > 0 {
        let count = left.min(DROP_STOCK);
        let drop = spec(u32::try_from(count).expect("a drop's stock fits"));
        gate.load(&drop, Restore::default())
            .await
            .expect("redis answers")
            .expect("fresh drop");
        total += run(drop.id, count).await;
        delete_keys(conn, prefix, drop.id).await;
        left -= count;
    }
    total
}

fn reserve_throughput(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let prefix = prefix();
    let gate = Arc::new(runtime.block_on(gate(&prefix)));
    let mut conn = gate.connection();
    let client = redis::Client::open(redis_url()).expect("redis url");
    let multiplexed = runtime
        .block_on(client.get_multiplexed_async_connection())
        .expect("multiplexed connection");
    let pool = runtime
        .block_on(
            bb8::Pool::builder()
                .max_size(POOL_SIZE)
                .build(client.clone()),
        )
        .expect("bb8 pool");

    let mut group = c.benchmark_group("redis_gate_reserve");
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(8));
    group.throughput(Throughput::Elements(1));
    group.bench_function(BenchmarkId::new("batched_gate", CLIENTS), |b| {
        b.iter_custom(|iters| {
            runtime.block_on(by_drops(&gate, &mut conn, &prefix, iters, |drop, count| {
                let gate = Arc::clone(&gate);
                async move { batched(&gate, drop, count).await }
            }))
        })
    });
    for (name, naive) in [
        (
            "one_evalsha_multiplexed",
            Naive::Multiplexed(multiplexed.clone()),
        ),
        ("one_evalsha_bb8_pool", Naive::Pool(pool.clone())),
    ] {
        group.bench_function(BenchmarkId::new(name, CLIENTS), |b| {
            b.iter_custom(|iters| {
                runtime.block_on(by_drops(&gate, &mut conn, &prefix, iters, |drop, count| {
                    let (naive, keys) = (naive.clone(), Arc::new(drop_keys(&prefix, drop)));
                    async move { unbatched(&naive, keys, count).await }
                }))
            })
        });
    }
    group.finish();
    runtime.block_on(async {
        let _: () = redis::cmd("DEL")
            .arg(format!("{prefix}drop-seqs"))
            .query_async(&mut conn)
            .await
            .expect("delete");
        gate.shutdown().await;
    });
}

criterion_group!(benches, reserve_throughput);
criterion_main!(benches);
