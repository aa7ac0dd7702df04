//! Newsfeed benchmark: every scope x sort of `GET /api/v1/feed`, first page, fifth page and a deep page, and the
//! activity feed, on a seeded database of (by default) 10,000 members, 100,000 posts, 1,000,000 likes and ~50
//! follows per member; the `following` scope and the activity feed also for a heavy viewer who follows the 100
//! busiest authors.
//!
//! `cargo run --release -p shell-api --example feed_bench` (reads `DATABASE_URL`, a server it may create
//! databases on). It creates its own database `fs_bench_<uuid>`, migrates it with the service's migrations, seeds
//! it in SQL, and drops it at the end (`--keep` leaves it for psql, `--reuse NAME` measures it again without
//! seeding). Timings call `feeds::feed::feed_page` and `feeds::activity::activity_page`, the functions the
//! handlers call, so they measure the shipped statements through a pooled connection with cached prepared
//! statements, as the service runs them: three passes (cold-ish, warm, forced generic plan), median and p95 of
//! each. Then it prints `EXPLAIN (ANALYZE, BUFFERS)` of each query, first page and middle page.
//!
//! The data is skewed the way a shop's social side is: a few authors write most posts (author rank ~ U^2), a few
//! posts get most likes (Pareto, capped at one like per member), and members follow popular authors more often.
#![allow(
    clippy::too_many_lines,
    reason = "an example is one measurement read top to bottom: its setup, the load and the report"
)]

use std::time::{Duration, Instant};

use anyhow::Context;
use chrono::{DateTime, Utc};
use clap::Parser;
use shell_api::config::DbArgs;
use shell_api::db;
use shell_api::feeds::activity::{activity_page, ACTIVITY_SQL};
use shell_api::feeds::feed::{feed_page, FeedKey, FeedParams, FeedRequest, Scope, Sort};
use tokio_postgres::types::ToSql;
use tokio_postgres::NoTls;
use uuid::Uuid;

#[derive(Debug, Parser)]
#[command(about = "Seeds a feeds database and measures every newsfeed query")]
struct Args {
    /// Postgres server to create the benchmark database on (its database name is replaced).
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres"
    )]
    database_url: String,
    /// Members to seed.
    #[arg(long, default_value_t = 10_000)]
    members: i32,
    /// Posts to seed.
    #[arg(long, default_value_t = 100_000)]
    posts: i32,
    /// Post likes to seed (distinct member/post pairs).
    #[arg(long, default_value_t = 1_000_000)]
    likes: i64,
    /// Follows drawn per member (duplicates and self-follows are dropped, so slightly fewer remain).
    #[arg(long, default_value_t = 52)]
    follows_per_member: i32,
    /// Timed runs per query and page; following-scope runs cycle through this many different viewers.
    #[arg(long, default_value_t = 50)]
    runs: usize,
    /// Page size (`limit`).
    #[arg(long, default_value_t = 20)]
    page_size: i64,
    /// Keep the database afterwards and print its name.
    #[arg(long)]
    keep: bool,
    /// Measure on this already seeded database (left by `--keep`) instead of creating and seeding one.
    #[arg(long)]
    reuse: Option<String>,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let name = args
        .reuse
        .clone()
        .unwrap_or_else(|| format!("fs_bench_{}", Uuid::new_v4().simple()));
    // A `dbname` parameter overrides the URL's path, whatever the URL looked like.
    let separator = if args.database_url.contains('?') {
        '&'
    } else {
        '?'
    };
    let url = format!("{}{separator}dbname={name}", args.database_url);
    let db_args = DbArgs {
        database_url: url,
        db_pool_size: 2,
        db_pool_wait_ms: 30_000,
    };
    let pool = db::connect(&db_args).await?;
    println!("database {name}");
    let outcome = async {
        let client = pool.get().await.context("connecting")?;
        if args.reuse.is_none() {
            db::migrate(&pool).await?;
            seed(&client, &args).await?;
        }
        measure(&client, &args).await
    }
    .await;
    pool.close();
    if args.keep || args.reuse.is_some() {
        println!("kept database {name}");
    } else {
        drop_database(&args.database_url, &name).await?;
    }
    outcome
}

async fn drop_database(server_url: &str, name: &str) -> anyhow::Result<()> {
    let (client, connection) = tokio_postgres::connect(server_url, NoTls).await?;
    let driver = tokio::spawn(connection);
    client
        .batch_execute(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
        .await
        .context("dropping the benchmark database")?;
    drop(client);
    driver.abort();
    Ok(())
}

/// Seeds everything in SQL, counts consistent with the rows, then VACUUM ANALYZE.
async fn seed(client: &deadpool_postgres::Client, args: &Args) -> anyhow::Result<()> {
    let (members, posts, likes, follows) = (
        args.members,
        args.posts,
        args.likes,
        args.follows_per_member,
    );
    let steps: Vec<(&str, String)> = vec![
        (
            "members",
            format!(
                "INSERT INTO members (id, email, password_hash, name, role)
                 SELECT gen_random_uuid(), 'bench' || n || '@example.test', 'not a hash', 'Member ' || n,
                        CASE WHEN n % 20 = 0 THEN 'seller' ELSE 'customer' END
                 FROM generate_series(0, {members} - 1) n;
                 CREATE TEMP TABLE m (n int PRIMARY KEY, id uuid NOT NULL);
                 INSERT INTO m SELECT row_number() OVER (ORDER BY id) - 1, id FROM members;"
            ),
        ),
        (
            "posts (author rank ~ U^2 over 90 days)",
            format!(
                "INSERT INTO posts (id, author_id, title, content, created_at, updated_at)
                 SELECT gen_random_uuid(), m.id, 'Post ' || s.g, repeat('Drop news and chatter. ', 12), s.t, s.t
                 FROM (SELECT g, floor({members} * random() ^ 2)::int AS a,
                              now() - random() * interval '90 days' AS t
                       FROM generate_series(1, {posts}) g) s
                 JOIN m ON m.n = s.a;
                 CREATE TEMP TABLE p (n int PRIMARY KEY, id uuid NOT NULL, author_id uuid NOT NULL,
                                      created_at timestamptz NOT NULL);
                 INSERT INTO p SELECT row_number() OVER (ORDER BY id) - 1, id, author_id, created_at FROM posts;"
            ),
        ),
        (
            "post likes (Pareto per post, distinct members)",
            // Post n gets L distinct likers: members (n * 7919 + j * 7) mod members for j < L, distinct because
            // 7 is coprime with the member count's usual factors; ON CONFLICT guards the rest.
            format!(
                "INSERT INTO post_likes (post_id, member_id, created_at)
                 SELECT p.id, m.id, p.created_at + random() * (now() - p.created_at)
                 FROM (SELECT n, id, created_at,
                              least({members}, floor(3 / (1 - random()) ^ (1 / 1.3)))::int AS l
                       FROM p) p
                 CROSS JOIN LATERAL generate_series(0, p.l - 1) j
                 JOIN m ON m.n = (p.n * 7919 + j * 7) % {members}
                 LIMIT {likes}
                 ON CONFLICT DO NOTHING;
                 UPDATE posts SET like_count = c.n
                 FROM (SELECT post_id, count(*)::int AS n FROM post_likes GROUP BY post_id) c
                 WHERE posts.id = c.post_id;"
            ),
        ),
        (
            "follows (followee rank ~ U^2)",
            format!(
                "INSERT INTO follows (follower_id, followee_id, created_at)
                 SELECT f.id, m.id, now() - random() * interval '180 days'
                 FROM m f
                 -- `WHERE f.n >= 0` makes the draw depend on the follower, so it is drawn again per member.
                 CROSS JOIN LATERAL (SELECT floor({members} * random() ^ 2)::int AS n
                                     FROM generate_series(1, {follows}) WHERE f.n >= 0) pick
                 JOIN m ON m.n = pick.n
                 WHERE m.id <> f.id
                 ON CONFLICT DO NOTHING;"
            ),
        ),
        (
            "activities (posted, liked, followed)",
            "INSERT INTO activities (id, actor_id, kind, post_id, target_member_id, created_at)
             SELECT gen_random_uuid(), author_id, 'posted', id, NULL, created_at FROM posts;
             INSERT INTO activities (id, actor_id, kind, post_id, target_member_id, created_at)
             SELECT gen_random_uuid(), l.member_id, 'liked', l.post_id, p.author_id, l.created_at
             FROM post_likes l JOIN p ON p.id = l.post_id;
             INSERT INTO activities (id, actor_id, kind, target_member_id, created_at)
             SELECT gen_random_uuid(), follower_id, 'followed', followee_id, created_at FROM follows;"
                .to_owned(),
        ),
        ("vacuum analyze", "VACUUM ANALYZE".to_owned()),
    ];
    for (what, sql) in steps {
        let started = Instant::now();
        client
            .batch_execute(&sql)
            .await
            .with_context(|| format!("seeding {what}"))?;
        println!("seeded {what} in {:.1} s", started.elapsed().as_secs_f64());
    }
    let stats = client
        .query_one(
            "SELECT (SELECT count(*) FROM members), (SELECT count(*) FROM posts),
                    (SELECT count(*) FROM post_likes), (SELECT count(*) FROM follows),
                    (SELECT count(*) FROM activities),
                    (SELECT max(like_count) FROM posts),
                    (SELECT count(*) FROM posts p
                     WHERE p.like_count <> (SELECT count(*) FROM post_likes l WHERE l.post_id = p.id))",
            &[],
        )
        .await?;
    let (likes_seeded, mismatched): (i64, i64) = (stats.get(2), stats.get(6));
    println!(
        "data: {} members, {} posts, {likes_seeded} likes (max {} on one post), {} follows, {} activities",
        stats.get::<_, i64>(0),
        stats.get::<_, i64>(1),
        stats.get::<_, i32>(5),
        stats.get::<_, i64>(3),
        stats.get::<_, i64>(4),
    );
    anyhow::ensure!(
        mismatched == 0,
        "{mismatched} posts with a wrong like_count"
    );
    anyhow::ensure!(
        likes_seeded == likes,
        "seeded {likes_seeded} likes, wanted {likes}: raise the Pareto scale"
    );
    Ok(())
}

/// Which page a run fetches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Depth {
    First,
    /// Page 5, reached by following cursors from the first page.
    Fifth,
    /// The middle of the viewer's whole newsfeed (`all`: post 50,000 of 100,000).
    Middle,
}

/// What a run asks for.
#[derive(Debug, Clone, Copy)]
enum Query {
    Feed(Scope, Sort),
    Activity,
}

/// Where a run starts.
#[derive(Debug, Clone, Copy)]
enum After {
    Feed(Option<FeedKey>),
    Activity(Option<(DateTime<Utc>, Uuid)>),
}

/// One timed call: the query, whose it is, and where it starts.
#[derive(Debug, Clone, Copy)]
struct Run {
    query: Query,
    viewer: Uuid,
    after: After,
    fetch: i64,
}

/// Calls the function the handler calls; returns the rows it gave.
async fn execute(client: &deadpool_postgres::Client, run: &Run) -> anyhow::Result<usize> {
    Ok(match (run.query, run.after) {
        (Query::Feed(scope, sort), After::Feed(after)) => {
            let request = feed_request(run, scope, sort, after);
            feed_page(client, &request).await?.len()
        }
        (Query::Activity, After::Activity(after)) => {
            activity_page(client, run.viewer, after, run.fetch)
                .await
                .map_err(|err| anyhow::anyhow!("activity page: {err:?}"))?
                .len()
        }
        _ => anyhow::bail!("a run's position does not match its query"),
    })
}

fn feed_request(run: &Run, scope: Scope, sort: Sort, after: Option<FeedKey>) -> FeedRequest {
    FeedRequest {
        viewer: run.viewer,
        scope,
        sort,
        after,
        fetch: run.fetch,
    }
}

/// Makes one member follow the 100 most prolific authors (replacing its follows and their activities): the
/// worst realistic viewer for the `following` scope and the activity feed.
async fn heavy_viewer(client: &deadpool_postgres::Client) -> anyhow::Result<Uuid> {
    let viewer: Uuid = client
        .query_one("SELECT id FROM members ORDER BY email LIMIT 1", &[])
        .await?
        .get(0);
    let viewer_literal = format!("'{viewer}'::uuid");
    client
        .batch_execute(&format!(
            "BEGIN;
             DELETE FROM follows WHERE follower_id = {viewer_literal};
             DELETE FROM activities WHERE actor_id = {viewer_literal} AND kind = 'followed';
             CREATE TEMP TABLE busiest AS
                 SELECT author_id FROM posts WHERE author_id <> {viewer_literal}
                 GROUP BY author_id ORDER BY count(*) DESC LIMIT 100;
             INSERT INTO follows (follower_id, followee_id) SELECT {viewer_literal}, author_id FROM busiest;
             INSERT INTO activities (id, actor_id, kind, target_member_id)
                 SELECT gen_random_uuid(), {viewer_literal}, 'followed', author_id FROM busiest;
             DROP TABLE busiest;
             COMMIT;"
        ))
        .await?;
    client.batch_execute("VACUUM ANALYZE follows").await?;
    Ok(viewer)
}

async fn measure(client: &deadpool_postgres::Client, args: &Args) -> anyhow::Result<()> {
    // Viewers: random members, each following someone.
    let viewers: Vec<Uuid> = client
        .query(
            "SELECT id FROM members WHERE EXISTS (SELECT 1 FROM follows WHERE follower_id = members.id)
             ORDER BY random() LIMIT $1",
            &[&i64::try_from(args.runs)?],
        )
        .await?
        .iter()
        .map(|row| row.get(0))
        .collect();
    let heavy = heavy_viewer(client).await?;
    let viewers: Vec<Uuid> = viewers.into_iter().filter(|v| *v != heavy).collect();
    let sizes = client
        .query_one(
            "SELECT percentile_disc(0.5) WITHIN GROUP (ORDER BY followees),
                    percentile_disc(0.5) WITHIN GROUP (ORDER BY feed),
                    max(feed) FILTER (WHERE v <> $2::uuid),
                    max(feed) FILTER (WHERE v = $2::uuid)
             FROM (SELECT v,
                          (SELECT count(*) FROM follows f WHERE f.follower_id = v) AS followees,
                          (SELECT count(*) FROM follows f JOIN posts p ON p.author_id = f.followee_id
                           WHERE f.follower_id = v) AS feed
                   FROM unnest($1::uuid[] || $2::uuid) v) s",
            &[&viewers, &heavy],
        )
        .await?;
    println!(
        "viewers: {} sampled, median follows {}, following-feed size median {} max {}; \
         heavy viewer follows the 100 busiest authors, feed size {}",
        viewers.len(),
        sizes.get::<_, i64>(0),
        sizes.get::<_, i64>(1),
        sizes.get::<_, i64>(2),
        sizes.get::<_, i64>(3),
    );

    let all = [Depth::First, Depth::Fifth, Depth::Middle];
    let sorts = [Sort::Recent, Sort::Popular];
    // (label, query, viewers, depths)
    let mut cases: Vec<(String, Query, &[Uuid], &[Depth])> = Vec::new();
    for sort in sorts {
        let query = Query::Feed(Scope::All, sort);
        cases.push((format!("all/{sort:?}"), query, &viewers, &all));
    }
    let heavy = [heavy];
    for sort in sorts {
        let query = Query::Feed(Scope::Following, sort);
        cases.push((format!("following/{sort:?}"), query, &viewers, &all));
        let label = format!("following/{sort:?} heavy");
        cases.push((label, query, &heavy, &all));
    }
    let shallow = [Depth::First, Depth::Fifth];
    cases.push(("activity".to_owned(), Query::Activity, &viewers, &shallow));
    cases.push((
        "activity heavy".to_owned(),
        Query::Activity,
        &heavy,
        &shallow,
    ));

    println!();
    println!("times in ms; cold = first query of most viewers, warm = the same again, generic = forced generic plan");
    println!(
        "{:<26} {:<7} {:>8} {:>8} {:>8} {:>8} {:>8} {:>6}",
        "query", "page", "cold p50", "cold p95", "warm p50", "warm p95", "gen p50", "rows"
    );
    let mut explains = Vec::new();
    for (label, query, viewers, depths) in cases {
        for &depth in depths {
            let mut runs = Vec::with_capacity(args.runs);
            for n in 0..args.runs {
                let viewer = viewers[n % viewers.len()];
                runs.push(position(client, args, viewer, query, depth).await?);
            }
            // Pass 1 is most viewers' first query (cold-ish caches); pass 2 repeats it warm; pass 3 forces the
            // generic plan, which Postgres may switch a cached statement to after five executions.
            let (cold, rows) = time_runs(client, &runs).await?;
            let (warm, _) = time_runs(client, &runs).await?;
            client
                .batch_execute("SET plan_cache_mode = force_generic_plan")
                .await?;
            let generic = time_runs(client, &runs).await;
            client.batch_execute("RESET plan_cache_mode").await?;
            let (generic, _) = generic?;
            println!(
                "{:<26} {:<7} {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>6.1}",
                label.to_lowercase(),
                format!("{depth:?}").to_lowercase(),
                percentile(&cold, 0.5),
                percentile(&cold, 0.95),
                percentile(&warm, 0.5),
                percentile(&warm, 0.95),
                percentile(&generic, 0.5),
                rows,
            );
            if depth != Depth::Fifth {
                explains.push((label.clone(), depth, runs[0]));
            }
        }
    }
    for (label, depth, run) in explains {
        println!("\n== EXPLAIN (ANALYZE, BUFFERS) {label}, {depth:?} page ==");
        let (sql, params) = match (run.query, run.after) {
            (Query::Feed(scope, sort), After::Feed(after)) => {
                let request = feed_request(&run, scope, sort, after);
                (request.sql(), Params::Feed(request.params()))
            }
            (Query::Activity, After::Activity(after)) => {
                let (at, id) = after.unzip();
                (
                    ACTIVITY_SQL,
                    Params::Activity(run.viewer, at, id, run.fetch),
                )
            }
            _ => anyhow::bail!("a run's position does not match its query"),
        };
        let explain = format!("EXPLAIN (ANALYZE, BUFFERS) {sql}");
        let rows = match &params {
            Params::Feed(params) => client.query(&explain, &params.as_refs()).await?,
            Params::Activity(viewer, at, id, fetch) => {
                client.query(&explain, &[viewer, at, id, fetch]).await?
            }
        };
        for row in rows {
            println!("{}", row.get::<_, String>(0));
        }
    }
    Ok(())
}

/// Owned parameters of a statement to EXPLAIN.
enum Params {
    Feed(FeedParams),
    Activity(Uuid, Option<DateTime<Utc>>, Option<Uuid>, i64),
}

/// Runs the first few untimed (to prepare the statement, and past the 5 custom plans after which Postgres may
/// switch a prepared statement to its generic plan), then all of them timed. Returns the timings in ms and the mean
/// number of rows a page returned (to show that pages were full).
async fn time_runs(
    client: &deadpool_postgres::Client,
    runs: &[Run],
) -> anyhow::Result<(Vec<f64>, f64)> {
    for run in runs.iter().take(6) {
        execute(client, run).await?;
    }
    let mut timings = Vec::with_capacity(runs.len());
    let mut rows = 0usize;
    for run in runs {
        let started = Instant::now();
        let returned = execute(client, run).await?;
        timings.push(ms(started.elapsed()));
        rows += returned.min(usize::try_from(run.fetch - 1)?);
    }
    let mean_rows = rows as f64 / runs.len().max(1) as f64;
    Ok((timings, mean_rows))
}

/// The run for `viewer` at `depth`: no position for the first page, the cursor after page 4, or the key of the
/// row in the middle of the viewer's whole newsfeed.
async fn position(
    client: &deadpool_postgres::Client,
    args: &Args,
    viewer: Uuid,
    query: Query,
    depth: Depth,
) -> anyhow::Result<Run> {
    let fetch = args.page_size + 1;
    let first = Run {
        query,
        viewer,
        after: match query {
            Query::Feed(..) => After::Feed(None),
            Query::Activity => After::Activity(None),
        },
        fetch,
    };
    match (depth, query) {
        (Depth::First, _) => Ok(first),
        (Depth::Fifth, Query::Feed(scope, sort)) => {
            let mut after = None;
            for _ in 0..4 {
                let request = feed_request(&first, scope, sort, after);
                let page = feed_page(
                    client,
                    &FeedRequest {
                        fetch: args.page_size,
                        ..request
                    },
                )
                .await?;
                after = page.last().map(|post| FeedKey::of(post, sort)).or(after);
            }
            Ok(Run {
                after: After::Feed(after),
                ..first
            })
        }
        (Depth::Fifth, Query::Activity) => {
            let mut after = None;
            for _ in 0..4 {
                let page = activity_page(client, viewer, after, args.page_size)
                    .await
                    .map_err(|err| anyhow::anyhow!("activity page: {err:?}"))?;
                after = page.last().map(|a| (a.created_at, a.id)).or(after);
            }
            Ok(Run {
                after: After::Activity(after),
                ..first
            })
        }
        (Depth::Middle, Query::Feed(scope, sort)) => {
            let (authors, params): (&str, Vec<&(dyn ToSql + Sync)>) = match scope {
                Scope::All => ("TRUE", vec![]),
                Scope::Following => (
                    "p.author_id IN (SELECT followee_id FROM follows WHERE follower_id = $1)",
                    vec![&viewer],
                ),
            };
            let order = match sort {
                Sort::Recent => "p.created_at DESC, p.id DESC",
                Sort::Popular => "p.like_count DESC, p.created_at DESC, p.id DESC",
            };
            let sql = format!(
                "SELECT p.like_count, p.created_at, p.id FROM posts p
                 WHERE {authors}
                 ORDER BY {order}
                 OFFSET (SELECT count(*) / 2 FROM posts p WHERE {authors}) LIMIT 1"
            );
            let row = client.query_opt(&sql, &params).await?;
            let after = row.map(|row| match sort {
                Sort::Recent => FeedKey::Recent(row.get(1), row.get(2)),
                Sort::Popular => FeedKey::Popular(row.get(0), row.get(1), row.get(2)),
            });
            Ok(Run {
                after: After::Feed(after),
                ..first
            })
        }
        (Depth::Middle, Query::Activity) => anyhow::bail!("no middle page for the activity feed"),
    }
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
