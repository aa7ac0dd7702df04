//! `flashsale reconcile [--drop ID]`: checks each drop's Redis state against Postgres and rebuilds it from Postgres
//! where Redis lost data, printing one line per drop with what it found and what it changed.

use anyhow::Context;
use engine::gate::redis::{Reconciled, RedisGate};
use engine::gate::Gate;

use crate::db;
use clap::Args;

use crate::config::{DbArgs, RedisArgs};

/// Runs the check; returns how many drops were repaired.
pub async fn run(args: ReconcileArgs) -> anyhow::Result<usize> {
    let Some(config) = args.redis.gate_config() else {
        anyhow::bail!("reconcile checks Redis against Postgres: set REDIS_URL");
    };
    let pool = db::connect(&args.db).await?;
    let drops = {
        let client = pool.get().await.context("connecting to Postgres")?;
        match args.drop {
            Some(id) => engine::store::load_drop(&**client, id)
                .await?
                .map(|drop| vec![drop])
                .with_context(|| format!("no drop {id} in Postgres"))?,
            None => engine::store::load_all_drops(&**client).await?,
        }
    };
    let gate = RedisGate::connect(config, pool.clone())
        .await
        .context("connecting to Redis")?;
    // A rebuild releases holds the gate cannot restore, through a writer of its own.
    let (writer, writer_task) =
        engine::writer::spawn(pool, engine::writer::WriterConfig::default());
    gate.use_writer(writer.clone());
    let mut repaired = 0;
    for drop in &drops {
        let outcome = gate
            .reconcile(drop)
            .await
            .with_context(|| format!("reconciling drop {}", drop.id))?
            .with_context(|| format!("drop {}: Postgres's record does not add up", drop.id))?;
        let line = match outcome {
            Reconciled::Consistent(c) => format!(
                "consistent: available {} held {} sold {} of {}",
                c.available, c.held, c.paid, c.stock
            ),
            Reconciled::Missing(c) => {
                repaired += 1;
                format!(
                    "missing in Redis; loaded from Postgres: available {} held {} sold {} of {}",
                    c.available, c.held, c.paid, c.stock
                )
            }
            Reconciled::Rebuilt {
                lost_purchases,
                broken_counts,
                after,
            } => {
                repaired += 1;
                let broken = broken_counts
                    .map(|c| {
                        format!(
                            "; counters did not add up (available {} held {} sold {} of {})",
                            c.available, c.held, c.paid, c.stock
                        )
                    })
                    .unwrap_or_default();
                format!(
                    "lost data: {lost_purchases} purchase(s) not paid in Redis{broken}; rebuilt from Postgres: \
                     available {} held {} sold {} of {}",
                    after.available, after.held, after.paid, after.stock
                )
            }
        };
        println!("drop {}: {line}", drop.id);
    }
    println!("reconciled {} drop(s), repaired {repaired}", drops.len());
    gate.shutdown().await;
    writer.shutdown().await.context("draining the writer")?;
    writer_task.await.context("writer task")?;
    Ok(repaired)
}

#[derive(Debug, Clone, Args)]
pub struct ReconcileArgs {
    #[command(flatten)]
    pub db: DbArgs,
    #[command(flatten)]
    pub redis: RedisArgs,
    /// Only this drop (default: every drop).
    #[arg(long = "drop")]
    pub drop: Option<uuid::Uuid>,
}
