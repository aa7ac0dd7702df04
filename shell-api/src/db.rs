//! Postgres: the pool, creating the database when it is missing, and the versioned migrations.

use std::str::FromStr;
use std::time::Duration;

use anyhow::Context;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio_postgres::NoTls;

use crate::config::DbArgs;

/// Migrations in the order they apply. A version, once released, never changes; fixes are new versions.
const MIGRATIONS: &[(i32, &str, &str)] = &[
    (1, "members", include_str!("../migrations/0001_members.sql")),
    (
        2,
        "products",
        include_str!("../migrations/0002_products.sql"),
    ),
    (3, "drops", include_str!("../migrations/0003_drops.sql")),
    (4, "feeds", include_str!("../migrations/0004_feeds.sql")),
    (
        5,
        "member_auth_changes",
        include_str!("../migrations/0005_member_auth_changes.sql"),
    ),
    (
        6,
        "drop_seq",
        include_str!("../migrations/0006_drop_seq.sql"),
    ),
    (
        7,
        "drop_reservations_member_idx",
        include_str!("../migrations/0007_drop_reservations_member_idx.sql"),
    ),
    (8, "shop", include_str!("../migrations/0008_shop.sql")),
    (9, "live", include_str!("../migrations/0009_live.sql")),
    (
        10,
        "hold_batches",
        include_str!("../migrations/0010_hold_batches.sql"),
    ),
    (
        11,
        "sales_without_drop_fkeys",
        include_str!("../migrations/0011_sales_without_drop_fkeys.sql"),
    ),
    (
        12,
        "purchase_fence",
        include_str!("../migrations/0012_purchase_fence.sql"),
    ),
    (
        13,
        "drop_seconds",
        include_str!("../migrations/0013_drop_seconds.sql"),
    ),
    (14, "draw", include_str!("../migrations/0014_draw.sql")),
    (
        15,
        "notification_kinds",
        include_str!("../migrations/0015_notification_kinds.sql"),
    ),
    (16, "stores", include_str!("../migrations/0016_stores.sql")),
    (
        17,
        "campaigns",
        include_str!("../migrations/0017_campaigns.sql"),
    ),
    (
        18,
        "subscriptions",
        include_str!("../migrations/0018_subscriptions.sql"),
    ),
    (19, "queue", include_str!("../migrations/0019_queue.sql")),
    (
        20,
        "draw_notices",
        include_str!("../migrations/0020_draw_notices.sql"),
    ),
    (
        21,
        "admin_store_search",
        include_str!("../migrations/0021_admin_store_search.sql"),
    ),
];

/// Any fixed number: every instance takes this advisory lock so concurrent starts migrate once.
const MIGRATION_LOCK_KEY: i64 = 0x666c_6173_6873_616c;

/// `url` (a Postgres URL) with its database name replaced by `name`, keeping user, host, port and query
/// parameters: the same server, another database.
pub fn with_database(url: &str, name: &str) -> String {
    let scheme_end = url.find("://").map_or(0, |i| i + 3);
    let (head, query) = match url.find('?') {
        Some(q) => (&url[..q], &url[q..]),
        None => (url, ""),
    };
    let authority_end = head[scheme_end..]
        .find('/')
        .map_or(head.len(), |i| scheme_end + i);
    format!("{}/{}{}", &head[..authority_end], name, query)
}

/// Creates the database if missing, then builds the pool.
pub async fn connect(args: &DbArgs) -> anyhow::Result<Pool> {
    let config = tokio_postgres::Config::from_str(&args.database_url)
        .context("DATABASE_URL is not a valid Postgres URL")?;
    ensure_database(&config).await?;
    let manager = Manager::from_config(
        config,
        NoTls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    let wait = Duration::from_millis(args.db_pool_wait_ms);
    let pool = Pool::builder(manager)
        .max_size(args.db_pool_size.max(1))
        .wait_timeout(Some(wait))
        .create_timeout(Some(wait))
        .recycle_timeout(Some(wait))
        .runtime(Runtime::Tokio1)
        .build()
        .context("building the Postgres pool")?;
    // Fail at start, not on the first request, when the server is unreachable.
    drop(pool.get().await.context("connecting to Postgres")?);
    Ok(pool)
}

/// Connects to the server's `postgres` database and creates the target database when it does not exist.
async fn ensure_database(config: &tokio_postgres::Config) -> anyhow::Result<()> {
    let Some(name) = config.get_dbname().map(str::to_owned) else {
        return Ok(());
    };
    if config.connect(NoTls).await.is_ok() {
        return Ok(());
    }
    let mut admin = config.clone();
    admin.dbname("postgres");
    let (client, connection) = admin
        .connect(NoTls)
        .await
        .context("connecting to Postgres to create the database")?;
    let driver = tokio::spawn(connection);
    let exists = client
        .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&name])
        .await?
        .is_some();
    if !exists {
        let quoted = format!("\"{}\"", name.replace('"', "\"\""));
        match client
            .batch_execute(&format!("CREATE DATABASE {quoted}"))
            .await
        {
            Ok(()) => tracing::info!(database = %name, "created database"),
            // Another instance created it at the same moment: Postgres says so with duplicate_database, or, when
            // the two CREATEs race inside the catalog, with a unique violation on pg_database's name index.
            Err(err)
                if err.code() == Some(&tokio_postgres::error::SqlState::DUPLICATE_DATABASE)
                    || err.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION) => {}
            Err(err) => return Err(err).context("creating the database"),
        }
    }
    drop(client);
    driver.abort();
    Ok(())
}

/// Applies pending migrations, each in its own transaction, under an advisory lock taken before anything is
/// created: any number of processes may migrate one database at once, new or not (`CREATE TABLE IF NOT EXISTS` is
/// not safe against a concurrent creator in Postgres, so even the bookkeeping table waits for the lock). Returns
/// the versions this call applied.
pub async fn migrate(pool: &Pool) -> anyhow::Result<Vec<i32>> {
    let mut client = pool.get().await.context("connecting to Postgres")?;
    client
        .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK_KEY])
        .await
        .context("taking the migration lock")?;
    let result = apply_pending(&mut client).await;
    let unlocked = client
        .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK_KEY])
        .await;
    let applied = result?;
    unlocked.context("releasing the migration lock")?;
    Ok(applied)
}

async fn apply_pending(client: &mut deadpool_postgres::Client) -> anyhow::Result<Vec<i32>> {
    client
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (
                version integer PRIMARY KEY,
                name text NOT NULL,
                applied_at timestamptz NOT NULL DEFAULT now()
            )",
        )
        .await
        .context("creating schema_migrations")?;
    let applied: Vec<i32> = client
        .query("SELECT version FROM schema_migrations", &[])
        .await?
        .iter()
        .map(|row| row.get(0))
        .collect();
    let mut done = Vec::new();
    for &(version, name, sql) in MIGRATIONS {
        if applied.contains(&version) {
            continue;
        }
        let tx = client.transaction().await?;
        tx.batch_execute(sql)
            .await
            .with_context(|| format!("migration {version} ({name})"))?;
        tx.execute(
            "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
            &[&version, &name],
        )
        .await?;
        tx.commit().await?;
        tracing::info!(version, name, "applied migration");
        done.push(version);
    }
    Ok(done)
}
