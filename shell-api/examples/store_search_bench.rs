//! Store search benchmark: `GET /api/v1/stores?q=` on a seeded database of (by default) 10,000 stores of 1,000
//! sellers and 100,000 products in them, 2% of the stores suspended.
//!
//! `scripts/measure_store_search.sh` runs it (it brings up Postgres first); directly:
//! `cargo run -p shell-api --example store_search_bench` (reads `DATABASE_URL`, a server it may create databases
//! on). It creates its own database `fs_bench_<uuid>`, migrates it with the service's migrations (so the product
//! count triggers run as the rows go in), seeds it in SQL, and drops it at the end. Each timing calls
//! `stores::storefront::search_stores`, the function the handler calls, through a pooled connection, so it measures
//! the shipped statement as the service runs it: a common word, a two-word phrase, two common words that never
//! appear together, a rare term, a phrase found only in descriptions, a term that matches nothing, three letters,
//! no `q`, and the fifth page of the common word. It
//! prints p50 and p95 per query and over all of them, then `EXPLAIN ANALYZE` of the common word's first page.
#![allow(
    clippy::too_many_lines,
    reason = "an example is one measurement read top to bottom: its setup, the load and the report"
)]

use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use shell_api::config::DbArgs;
use shell_api::db;
use shell_api::pagination::PageQuery;
use shell_api::stores::storefront::{search_stores, SearchQuery};
use tokio_postgres::NoTls;
use uuid::Uuid;

#[derive(Debug, Parser)]
#[command(about = "Seeds a stores database and measures the store search")]
struct Args {
    /// Postgres server to create the benchmark database on (its database name is replaced).
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres"
    )]
    database_url: String,
    /// Stores to seed.
    #[arg(long, default_value_t = 10_000)]
    stores: i32,
    /// Products to seed, spread over the stores.
    #[arg(long, default_value_t = 100_000)]
    products: i32,
    /// Timed runs per query.
    #[arg(long, default_value_t = 200)]
    runs: usize,
}

/// Each query: its label, `q`, and how many pages deep the timed page is.
const QUERIES: &[(&str, &str, usize)] = &[
    ("common word", "bakery", 1),
    ("two words", "velvet kitchen", 1),
    ("common trigrams, none", "velvet cakes", 1),
    ("rare term", "7777", 1),
    ("description only", "since 1999", 1),
    ("no match", "xyzzy", 1),
    ("three letters", "ros", 1),
    ("no q (browse)", "", 1),
    ("common word, page 5", "bakery", 5),
];

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let name = format!("fs_bench_{}", Uuid::new_v4().simple());
    let separator = if args.database_url.contains('?') {
        '&'
    } else {
        '?'
    };
    let db_args = DbArgs {
        database_url: format!("{}{separator}dbname={name}", args.database_url),
        db_pool_size: 2,
        db_pool_wait_ms: 30_000,
    };
    let pool = db::connect(&db_args).await?;
    println!("database {name}");
    let outcome = async {
        let client = pool.get().await.context("connecting")?;
        db::migrate(&pool).await?;
        seed(&client, &args).await?;
        measure(&client, &args).await
    }
    .await;
    pool.close();
    // The server's own `postgres` database, since the URL's may not exist.
    let admin_url = format!("{}{separator}dbname=postgres", args.database_url);
    let (client, connection) = tokio_postgres::connect(&admin_url, NoTls).await?;
    let driver = tokio::spawn(connection);
    client
        .batch_execute(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
        .await
        .context("dropping the benchmark database")?;
    driver.abort();
    outcome
}

/// Seeds sellers, stores (names and descriptions from small word lists, so common words match many stores) and
/// products in SQL, then VACUUM ANALYZE.
async fn seed(client: &deadpool_postgres::Client, args: &Args) -> anyhow::Result<()> {
    let started = Instant::now();
    client
        .batch_execute(&format!(
            "INSERT INTO members (id, email, password_hash, name, role)
             SELECT gen_random_uuid(), 'seller' || i || '@bench.test', 'x', 'Seller ' || i, 'seller'
             FROM generate_series(1, 1000) i;

             CREATE TEMP TABLE words (kind text, n int, word text);
             INSERT INTO words SELECT 'adj', ord, w FROM unnest(ARRAY['Sweet', 'Golden', 'Little', 'Rose', 'Velvet',
                 'Honey', 'Sunny', 'Maple', 'Silver', 'Wild']) WITH ORDINALITY AS t (w, ord);
             INSERT INTO words SELECT 'noun', ord, w FROM unnest(ARRAY['Bakery', 'Patisserie', 'Flowers', 'Garden',
                 'Cakes', 'Bouquet', 'Kitchen', 'Tarts', 'Blossom', 'Studio']) WITH ORDINALITY AS t (w, ord);

             WITH sellers AS (SELECT id, row_number() OVER (ORDER BY id) AS n FROM members WHERE role = 'seller')
             INSERT INTO stores (id, seller_id, name, description, status, created_at)
             SELECT
                 -- v7-shaped ids in creation order: the time prefix grows with i.
                 (lpad(to_hex(1700000000000 + i), 12, '0') || '7' || substr(md5(i::text), 1, 19))::uuid,
                 sellers.id,
                 a.word || ' ' || b.word || ' ' || i,
                 'Handmade ' || lower(c.word) || ' and ' || lower(d.word) || ' since ' || (1970 + i % 50),
                 CASE WHEN i % 50 = 0 THEN 'suspended' ELSE 'active' END,
                 now() - make_interval(secs => {stores} - i)
             FROM generate_series(1, {stores}) i
             JOIN sellers ON sellers.n = 1 + i % 1000
             JOIN words a ON a.kind = 'adj' AND a.n = 1 + (i * 7) % 10
             JOIN words b ON b.kind = 'noun' AND b.n = 1 + (i * 3) % 10
             JOIN words c ON c.kind = 'noun' AND c.n = 1 + (i * 11 / 10) % 10
             JOIN words d ON d.kind = 'noun' AND d.n = 1 + (i / 7) % 10;

             WITH numbered AS (SELECT id, seller_id, row_number() OVER (ORDER BY id) AS n FROM stores)
             INSERT INTO products (id, seller_id, name, price, kind, stock, store_id)
             SELECT (lpad(to_hex(1700000000000 + i), 12, '0') || '7' || substr(md5('p' || i), 1, 19))::uuid,
                    s.seller_id, 'Item ' || i, 1000 + i % 5000, 'regular', i % 20, s.id
             FROM generate_series(1, {products}) i
             JOIN numbered s ON s.n = 1 + (i * 7919) % {stores};",
            stores = args.stores,
            products = args.products,
        ))
        .await
        .context("seeding")?;
    // On its own: a multi-statement batch runs as one transaction, and VACUUM refuses to run in one.
    client
        .batch_execute("VACUUM ANALYZE")
        .await
        .context("vacuum")?;
    let row = client
        .query_one(
            "SELECT (SELECT count(*) FROM stores), (SELECT count(*) FROM products),
                    (SELECT sum(product_count) FROM stores)::bigint,
                    (SELECT count(*) FROM stores WHERE status = 'suspended')",
            &[],
        )
        .await?;
    let (stores, products, counted, suspended): (i64, i64, i64, i64) =
        (row.get(0), row.get(1), row.get(2), row.get(3));
    anyhow::ensure!(
        counted == products,
        "product_count sums to {counted}, not {products}"
    );
    println!(
        "seeded {stores} stores ({suspended} suspended) and {products} products in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn query(q: &str, cursor: Option<String>) -> SearchQuery {
    SearchQuery {
        q: (!q.is_empty()).then(|| q.to_owned()),
        page: PageQuery {
            limit: Some(20),
            cursor,
        },
    }
}

/// The cursor of page `page` (1-based) of `q`.
async fn cursor_of_page(
    client: &deadpool_postgres::Client,
    q: &str,
    page: usize,
) -> anyhow::Result<Option<String>> {
    let mut cursor = None;
    for _ in 1..page {
        let found = search_stores(client, &query(q, cursor))
            .await
            .map_err(|err| anyhow::anyhow!("search failed: {}", err.code()))?;
        cursor = found.next_cursor;
    }
    Ok(cursor)
}

async fn measure(client: &deadpool_postgres::Client, args: &Args) -> anyhow::Result<()> {
    println!(
        "{:<22} {:>9} {:>9} {:>6}",
        "query", "p50 ms", "p95 ms", "rows"
    );
    let mut all = Vec::new();
    for (label, q, page) in QUERIES {
        let cursor = cursor_of_page(client, q, *page).await?;
        let mut times = Vec::with_capacity(args.runs);
        let mut rows = 0;
        // One untimed run warms the plan cache and the buffers, as a running service has them.
        search_stores(client, &query(q, cursor.clone()))
            .await
            .map_err(|err| anyhow::anyhow!("search failed: {}", err.code()))?;
        for _ in 0..args.runs {
            let started = Instant::now();
            let found = search_stores(client, &query(q, cursor.clone()))
                .await
                .map_err(|err| anyhow::anyhow!("search failed: {}", err.code()))?;
            times.push(ms(started.elapsed()));
            rows = found.items.len();
        }
        println!(
            "{label:<22} {:>9.3} {:>9.3} {rows:>6}",
            percentile(&times, 0.5),
            percentile(&times, 0.95)
        );
        all.extend(times);
    }
    println!(
        "{:<22} {:>9.3} {:>9.3}",
        "all queries",
        percentile(&all, 0.5),
        percentile(&all, 0.95)
    );
    let plan = client
        .query(
            "EXPLAIN (ANALYZE, BUFFERS) SELECT id FROM stores WHERE status = 'active'
             AND (name ILIKE '%bakery%' OR description ILIKE '%bakery%') ORDER BY id DESC LIMIT 21",
            &[],
        )
        .await?;
    println!("\nEXPLAIN ANALYZE, common word, first page:");
    for row in plan {
        println!("  {}", row.get::<_, String>(0));
    }
    Ok(())
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

/// The `q` quantile (nearest rank) of `values`.
fn percentile(values: &[f64], q: f64) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}
