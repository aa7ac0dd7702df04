//! Criterion benchmark of `DropBook::reserve` beside the one-global-lock baseline, at 1 and 2 threads sharing one
//! drop, each reservation by a new member (a flash sale's shape). Reported as holds per second.
//!
//! Run: `scripts/bench.sh` (or `cargo bench -p benches --bench core_reserve`). The book has the engine's default shard
//! count (`SHARDS=n` overrides it); `BATCH=n` sets the holds per thread per drop.
//! Every measured reservation must succeed, so each batch gets a fresh drop with exactly enough stock; building the
//! drop, making the ids and dropping the drop happen outside the timed region.

use benches::MutexBook;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use engine::core::{DropBook, DropParams};
use std::hint::black_box;
use std::sync::Barrier;
use std::time::{Duration, Instant};
use uuid::{Builder, Uuid};

const T0: i64 = 1_700_000_000_000;
const HOLD_MS: i64 = 600_000;
const PER_MEMBER_LIMIT: u32 = 2;
/// Reservations per thread on one drop before it is replaced: a drop of 50k units per thread.
const BATCH_PER_THREAD: u64 = 50_000;

/// splitmix64: cheap, reproducible randomness for ids, so id making costs little wall time.
fn next(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Refills `script` with `count` `(hold id, member)` pairs: hold ids are v7 (as the service makes them), members
/// v4, all distinct.
fn fill(script: &mut Vec<(Uuid, Uuid)>, seed: u64, count: u64) {
    let mut state = seed;
    script.clear();
    script.extend((0..count).map(|_| {
        let (a, b, c) = (next(&mut state), next(&mut state), next(&mut state));
        let mut tail = [0u8; 10];
        tail[..8].copy_from_slice(&a.to_le_bytes());
        tail[8..].copy_from_slice(&b.to_le_bytes()[..2]);
        let hold = Builder::from_unix_timestamp_millis(T0 as u64, &tail).into_uuid();
        let member_bytes = (u128::from(b) << 64 | u128::from(c)).to_le_bytes();
        (hold, Builder::from_random_bytes(member_bytes).into_uuid())
    }));
}

/// Times `iters` reservations split over `threads` threads, on a fresh book per batch with stock for a full batch.
/// The time of a batch is the slowest thread's, measured from a common start.
fn run<B: Sync>(
    threads: u64,
    iters: u64,
    make: impl Fn(u32) -> B,
    reserve: impl Fn(&B, Uuid, Uuid) -> bool + Sync,
) -> Duration {
    let batch_max = std::env::var("BATCH")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(BATCH_PER_THREAD);
    let stock = (batch_max * threads) as u32;
    let mut scripts: Vec<Vec<(Uuid, Uuid)>> = (0..threads)
        .map(|_| Vec::with_capacity(batch_max as usize))
        .collect();
    let mut total = Duration::ZERO;
    let mut left = iters.div_ceil(threads);
    let mut seed = 1;
    // Every book has the same size and the previous one is dropped only after the next is built and used, so the
    // allocator hands each new book the memory of the one before instead of returning it to the kernel and
    // faulting fresh pages in (glibc trims the heap top when a book of many shard tables is freed at once). Both
    // books are treated alike; this measures the reservation path with its memory already mapped, as in a service.
    let mut previous = None;
    while left > 0 {
        let batch = left.min(batch_max);
        left -= batch;
        for script in &mut scripts {
            seed += 1;
            fill(script, seed, batch);
        }
        let book = make(stock);
        let start = Barrier::new(threads as usize);
        let elapsed = std::thread::scope(|scope| {
            let workers: Vec<_> = scripts
                .iter()
                .map(|script| {
                    let (book, reserve, start) = (&book, &reserve, &start);
                    scope.spawn(move || {
                        start.wait();
                        let began = Instant::now();
                        for &(hold, member) in script {
                            // A refusal would measure the wrong path; the book has stock for every one.
                            assert!(reserve(book, hold, member));
                        }
                        began.elapsed()
                    })
                })
                .collect();
            workers
                .into_iter()
                .map(|worker| worker.join().unwrap_or_default())
                .max()
                .unwrap_or_default()
        });
        total += elapsed;
        drop(previous.replace(book));
    }
    total
}

fn drop_book(stock: u32) -> DropBook {
    DropBook::new(DropParams {
        stock,
        per_member_limit: PER_MEMBER_LIMIT,
        hold_ms: HOLD_MS,
        shards: std::env::var("SHARDS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(engine::core::DEFAULT_SHARDS),
    })
}

fn core_reserve(c: &mut Criterion) {
    let mut group = c.benchmark_group("core_reserve");
    group
        .throughput(Throughput::Elements(1))
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(6));
    for threads in [1u64, 2] {
        group.bench_with_input(
            BenchmarkId::new("drop_book", threads),
            &threads,
            |b, &threads| {
                b.iter_custom(|iters| {
                    // The script's hold id is the seed the book makes the hold's id from, as in the service.
                    run(threads, iters, drop_book, |book, seed, member| {
                        black_box(book.reserve(seed, member, 1, T0)).is_ok()
                    })
                })
            },
        );
        group.bench_with_input(
            BenchmarkId::new("mutex_baseline", threads),
            &threads,
            |b, &threads| {
                b.iter_custom(|iters| {
                    run(
                        threads,
                        iters,
                        |stock| MutexBook::new(stock, PER_MEMBER_LIMIT, HOLD_MS),
                        |book, hold, member| black_box(book.reserve(hold, member, 1, T0)).is_ok(),
                    )
                })
            },
        );
    }
    group.finish();
}

criterion_group!(benches, core_reserve);
criterion_main!(benches);
