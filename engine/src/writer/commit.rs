//! Writing a batch: retries, the backstop's one-by-one fallback, and the batch's transaction, planned first and then
//! sent as one pipelined round trip of BEGIN, one statement per kind of row, and COMMIT.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::task::Poll;
use std::time::{Duration, Instant};

use chrono::{DateTime, SubsecRound, Utc};
use deadpool_postgres::{ClientWrapper, Pool};
use tokio_postgres::types::ToSql;
use uuid::Uuid;

use super::batching::{Rows, Stored, Written};
use super::sql::{
    HoldColumns, PurchaseColumns, ReleaseColumns, SecondColumns, JOURNAL_HOLDS, PURCHASES_FENCED,
    PURCHASES_PLAIN, UPSERT_RELEASES, UPSERT_SECONDS,
};
use super::{WriteError, WriterConfig, WriterStats};
use crate::core::ReleaseReason;
use crate::types::{HoldRow, Purchase};

/// Writes a batch. When the backstop refuses it (its purchases would pass a drop's stock in Postgres, which only a
/// gate that lost or never had the truth lets happen), writes its other rows, then its purchases one at a time, so
/// that only those that do not fit are refused.
pub(super) async fn write(
    pool: &Pool,
    config: &WriterConfig,
    rows: Rows<'_>,
    stats: &WriterStats,
) -> Written {
    let all = |stored: Stored| stored.into_iter().map(|(id, p)| (id, Ok(p))).collect();
    match write_with_retries(pool, config, rows, stats).await {
        Ok(stored) => Ok(all(stored)),
        Err(BatchError::Oversold) => {
            metrics::counter!("flashsale_writer_oversold_batches_total").increment(1);
            tracing::error!(
                purchases = rows.purchases.len(),
                "a batch's purchases would pass a drop's stock in Postgres; storing them one by one"
            );
            let others = Rows {
                purchases: &[],
                ..rows
            };
            if others.len() > 0 {
                write_with_retries(pool, config, others, stats)
                    .await
                    .map_err(WriteError::from)?;
            }
            let mut outcome = HashMap::with_capacity(rows.purchases.len());
            for one in rows.purchases.chunks(1) {
                let alone = Rows {
                    journaled: &[],
                    released: &[],
                    purchases: one,
                    seconds: &[],
                };
                match write_with_retries(pool, config, alone, stats).await {
                    Ok(stored) => outcome.extend(all(stored)),
                    // Refused: left out of the outcome, so its payment is answered `Fenced`.
                    Err(BatchError::Oversold) => {}
                    Err(err) => {
                        outcome.insert(one[0].0.reservation_id, Err(WriteError::from(err)));
                    }
                }
            }
            Ok(outcome)
        }
        Err(err) => Err(err.into()),
    }
}

async fn write_with_retries(
    pool: &Pool,
    config: &WriterConfig,
    batch: Rows<'_>,
    stats: &WriterStats,
) -> Result<Stored, BatchError> {
    let mut backoff = Duration::from_millis(25);
    let mut attempt = 1;
    // Purchases are first written with plain inserts; a batch that meets a row already there is written again
    // with the statements that resolve it (at once: nothing failed, and the outcome was a rollback).
    let mut plain = config.plain_purchases;
    // Whether an attempt failed after its batch was sent: then giving up says the outcome is in doubt, even when
    // the last attempt could not reach Postgres at all.
    let mut in_doubt = false;
    loop {
        let started = Instant::now();
        let (err, doubt) = match write_batch(pool, batch, plain).await {
            Ok(stored) => {
                let micros = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
                stats.batches.fetch_add(1, Ordering::Relaxed);
                stats.rows.fetch_add(batch.len() as u64, Ordering::Relaxed);
                stats
                    .purchases
                    .fetch_add(stored.len() as u64, Ordering::Relaxed);
                stats
                    .flush_micros_total
                    .fetch_add(micros, Ordering::Relaxed);
                metrics::histogram!("flashsale_writer_batch_rows").record(batch.len() as f64);
                metrics::histogram!("flashsale_writer_flush_seconds")
                    .record(started.elapsed().as_secs_f64());
                tracing::debug!(
                    rows = batch.len(),
                    purchases = batch.purchases.len(),
                    micros,
                    "writer batch committed"
                );
                return Ok(stored);
            }
            Err(BatchError::Conflict) => {
                tracing::debug!(
                    rows = batch.len(),
                    "a purchase's rows were there already; upserting"
                );
                plain = false;
                continue;
            }
            Err(BatchError::Oversold) => return Err(BatchError::Oversold),
            Err(BatchError::Failed(err)) => (err, false),
            Err(BatchError::InDoubt(err)) => (err, true),
        };
        in_doubt |= doubt;
        if attempt < config.attempts_max {
            // A retry also settles a doubt: what an earlier attempt stored is found, not written twice.
            tracing::warn!(error = %err, attempt, rows = batch.len(), "writer batch failed; retrying");
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(2));
            attempt += 1;
            continue;
        }
        stats.failed_batches.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("flashsale_writer_failed_batches_total").increment(1);
        tracing::error!(error = %err, rows = batch.len(), in_doubt, "writer batch failed; giving up");
        return Err(if in_doubt {
            BatchError::InDoubt(err)
        } else {
            BatchError::Failed(err)
        });
    }
}

/// One statement of a batch as sent down the connection; it answers the number of rows it touched.
type Step<'a> = Pin<Box<dyn Future<Output = Result<u64, tokio_postgres::Error>> + Send + 'a>>;

/// Sends every step before waiting for any (tokio-postgres writes a request when its future is first polled, and
/// this polls them in order), then waits for all: the batch costs one round trip, not one per statement. Every
/// answer comes back, in order, even after a failure; Postgres fails the steps after a failed one in the same
/// transaction, and answers its COMMIT with a rollback.
async fn pipeline(mut steps: Vec<Step<'_>>) -> Vec<Result<u64, tokio_postgres::Error>> {
    let mut answers: Vec<Option<Result<u64, tokio_postgres::Error>>> =
        steps.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut waiting = false;
        for (step, answer) in steps.iter_mut().zip(answers.iter_mut()) {
            if answer.is_none() {
                match step.as_mut().poll(cx) {
                    Poll::Ready(result) => *answer = Some(result),
                    Poll::Pending => waiting = true,
                }
            }
        }
        if waiting {
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    })
    .await;
    answers.into_iter().flatten().collect()
}

/// Why a batch was not written.
#[derive(Debug)]
enum BatchError {
    /// A plain insert of a purchase or its paid reservation met a row already there; nothing was written.
    Conflict,
    /// The backstop: the batch's purchases would have passed a drop's stock (`drops_sold_check`); nothing was
    /// written.
    Oversold,
    /// Nothing was stored (Postgres refused a statement, or the batch was never sent).
    Failed(String),
    /// The connection failed after the batch was sent: its COMMIT may have reached Postgres, so whether it is
    /// stored is not known here.
    InDoubt(String),
}

impl From<BatchError> for WriteError {
    fn from(err: BatchError) -> Self {
        match err {
            BatchError::Oversold => WriteError::Fenced,
            BatchError::Conflict => WriteError::Failed("a row already there".into()),
            BatchError::Failed(err) => WriteError::Failed(err),
            BatchError::InDoubt(err) => WriteError::InDoubt(err),
        }
    }
}

impl BatchError {
    /// What a failed statement means for its batch; `plain` when purchases went in as plain inserts.
    fn of(err: &tokio_postgres::Error, plain: bool) -> Self {
        use tokio_postgres::error::SqlState;
        match err.code() {
            Some(code) if plain && *code == SqlState::UNIQUE_VIOLATION => Self::Conflict,
            Some(code)
                if *code == SqlState::CHECK_VIOLATION
                    && err.as_db_error().and_then(|e| e.constraint())
                        == Some("drops_sold_check") =>
            {
                Self::Oversold
            }
            // Postgres answered with an error: the transaction failed and its COMMIT rolls back.
            _ if err.as_db_error().is_some() => Self::Failed(err.to_string()),
            // The connection failed (closed, reset): the batch was sent whole, COMMIT included.
            _ => Self::InDoubt(err.to_string()),
        }
    }
}

impl From<String> for BatchError {
    fn from(err: String) -> Self {
        Self::Failed(err)
    }
}

/// Writes one batch in one transaction, pipelined (BEGIN, the statements and COMMIT in one round trip); returns
/// the stored purchases by reservation.
///
/// The purchases go in with one statement that also marks their reservations paid and raises their drops' `sold`
/// (see `PURCHASES_FENCED`): a purchase is stored only while its reservation's row is not `released` (the fence
/// against a payment that outlived its lease, decided by the row's lock in this transaction), and `sold` may not
/// pass the stock (the backstop; a batch that would is refused whole with `Oversold`).
///
/// With `plain`, a purchase and its paid reservation row are plain inserts: nearly always neither is there yet
/// (a hold of the embedded gate is journaled in `hold_batches`, not as a row), and `ON CONFLICT` costs Postgres a
/// speculative insertion per row, a fifth of a purchase's CPU there. Any row already there (a released one too)
/// fails the batch with `Conflict`, and it is written again without `plain`: upserts that keep an earlier purchase,
/// mark a reservation row paid, and refuse a released one.
async fn write_batch(pool: &Pool, batch: Rows<'_>, plain: bool) -> Result<Stored, BatchError> {
    let client = pool.get().await.map_err(|e| e.to_string())?;
    let plan = Plan::of(batch);

    let mut steps: Vec<Step<'_>> = Vec::with_capacity(plan.journaled.len() + 6);
    steps.push(Box::pin(async {
        client.batch_execute("BEGIN").await.map(|()| 0)
    }));
    steps.extend(journal_steps(&client, &plan.journaled).await?);
    let mut purchases_step = None;
    if let Some(purchases) = &plan.purchases {
        purchases_step = Some(steps.len());
        steps.push(purchase_step(&client, purchases, plain).await?);
    }
    if let Some(releases) = &plan.releases {
        steps.push(release_step(&client, releases).await?);
    }
    if let Some(seconds) = &plan.seconds {
        steps.push(seconds_step(&client, seconds).await?);
    }
    steps.push(Box::pin(async {
        client.batch_execute("COMMIT").await.map(|()| 0)
    }));

    let mut touched = Vec::with_capacity(steps.len());
    for answer in pipeline(steps).await {
        // The first failure is the cause: the steps after it fail only because the transaction had.
        touched.push(answer.map_err(|err| BatchError::of(&err, plain))?);
    }
    match purchases_step {
        // Read after the COMMIT: a failure here leaves the batch's outcome in doubt too.
        Some(step) => stored_purchases(&client, &plan.unique, touched.get(step).copied())
            .await
            .map_err(|err| match err {
                BatchError::Failed(err) => BatchError::InDoubt(err),
                other => other,
            }),
        None => Ok(HashMap::new()),
    }
}

/// A batch's rows as its statements take them.
struct Plan<'a> {
    /// The journal: one row per drop of the batch, however many holds it has.
    journaled: Vec<(Uuid, HoldColumns)>,
    /// One purchase per reservation: a second purchase of a reservation in the same batch (two attempts racing)
    /// gets the first's row back, like an attempt that finds an earlier one already stored.
    unique: Vec<&'a (Purchase, HoldRow)>,
    purchases: Option<PurchaseColumns<'a>>,
    /// One release per hold (a journal replay can name a release twice; an upsert may touch a row only once).
    releases: Option<ReleaseColumns>,
    /// A drop report's counts, one row per drop and second (summed here: an upsert may touch a row only once).
    seconds: Option<SecondColumns>,
}

impl<'a> Plan<'a> {
    fn of(batch: Rows<'a>) -> Self {
        let mut by_drop: HashMap<Uuid, Vec<&HoldRow>> = HashMap::new();
        for hold in batch.journaled {
            by_drop.entry(hold.drop_id).or_default().push(hold);
        }
        let journaled = by_drop
            .into_iter()
            .map(|(drop, holds)| (drop, HoldColumns::of(holds.into_iter())))
            .collect();
        let mut seen = HashSet::with_capacity(batch.purchases.len());
        let unique: Vec<&(Purchase, HoldRow)> = batch
            .purchases
            .iter()
            .filter(|(purchase, _)| seen.insert(purchase.reservation_id))
            .collect();
        let purchases = (!unique.is_empty()).then(|| PurchaseColumns::of(&unique));
        let mut seen = HashSet::with_capacity(batch.released.len());
        let released: Vec<&(HoldRow, ReleaseReason, DateTime<Utc>)> = batch
            .released
            .iter()
            .filter(|(hold, _, _)| seen.insert(hold.id))
            .collect();
        let releases = (!released.is_empty()).then(|| ReleaseColumns::of(&released));
        let seconds = (!batch.seconds.is_empty()).then(|| SecondColumns::of(batch.seconds));
        Self {
            journaled,
            unique,
            purchases,
            releases,
            seconds,
        }
    }
}

fn text(err: tokio_postgres::Error) -> BatchError {
    BatchError::Failed(err.to_string())
}

/// The journal's rows, one statement each (one per drop of the batch).
async fn journal_steps<'a>(
    client: &'a ClientWrapper,
    journaled: &'a [(Uuid, HoldColumns)],
) -> Result<Vec<Step<'a>>, BatchError> {
    if journaled.is_empty() {
        return Ok(Vec::new());
    }
    let insert = client.prepare_cached(JOURNAL_HOLDS).await.map_err(text)?;
    Ok(journaled
        .iter()
        .map(|(drop, c)| {
            let insert = insert.clone();
            let step: Step<'a> = Box::pin(async move {
                let params: [&(dyn ToSql + Sync); 6] = [
                    drop,
                    &c.ids,
                    &c.members,
                    &c.quantities,
                    &c.created,
                    &c.expires,
                ];
                client.execute(&insert, &params).await
            });
            step
        })
        .collect())
}

/// The purchases with their paid reservation rows and their drops' `sold`; the step answers how many purchases it
/// inserted.
async fn purchase_step<'a>(
    client: &'a ClientWrapper,
    p: &'a PurchaseColumns<'a>,
    plain: bool,
) -> Result<Step<'a>, BatchError> {
    let statement = if plain {
        PURCHASES_PLAIN
    } else {
        PURCHASES_FENCED
    };
    let insert = client.prepare_cached(statement).await.map_err(text)?;
    Ok(Box::pin(async move {
        let mut rows: Vec<&(dyn ToSql + Sync)> = p.holds.params().to_vec();
        rows.extend::<[&(dyn ToSql + Sync); 10]>([
            &p.paid_at,
            &p.ids,
            &p.reservations,
            &p.drops,
            &p.products,
            &p.members,
            &p.quantities,
            &p.amounts,
            &p.currencies,
            &p.paid_at,
        ]);
        if plain {
            // Every row goes in or the statement fails, so each drop's units are known here.
            rows.push(&p.sold_drops);
            rows.push(&p.sold_units);
            client.execute(&insert, &rows).await?;
            Ok(p.ids.len() as u64)
        } else {
            // The purchases this statement inserted.
            let row = client.query_one(&insert, &rows).await?;
            Ok(u64::try_from(row.get::<_, i64>(0)).unwrap_or(0))
        }
    }))
}

/// The releases, each with its hold's row.
async fn release_step<'a>(
    client: &'a ClientWrapper,
    r: &'a ReleaseColumns,
) -> Result<Step<'a>, BatchError> {
    let upsert = client.prepare_cached(UPSERT_RELEASES).await.map_err(text)?;
    Ok(Box::pin(async move {
        let mut params = r.holds.params().to_vec();
        params.push(&r.reasons);
        params.push(&r.at);
        client.execute(&upsert, &params).await
    }))
}

/// A drop report's counts, added to what is stored for each drop and second.
async fn seconds_step<'a>(
    client: &'a ClientWrapper,
    c: &'a SecondColumns,
) -> Result<Step<'a>, BatchError> {
    let upsert = client.prepare_cached(UPSERT_SECONDS).await.map_err(text)?;
    Ok(Box::pin(async move {
        let mut params: Vec<&(dyn ToSql + Sync)> = vec![&c.drops, &c.seconds];
        for column in &c.counts {
            params.push(column);
        }
        client.execute(&upsert, &params).await
    }))
}

/// The purchases a committed batch stored, by reservation. When the purchase step inserted every purchase, they
/// are the ones sent; otherwise some reservation was paid before (a retried payment or batch) or refused by the
/// fence, and they are read back as stored (a refused one has none).
async fn stored_purchases(
    client: &ClientWrapper,
    unique: &[&(Purchase, HoldRow)],
    inserted: Option<u64>,
) -> Result<Stored, BatchError> {
    let mut stored = HashMap::with_capacity(unique.len());
    if inserted == Some(unique.len() as u64) {
        for (purchase, _) in unique {
            let mut purchase = purchase.clone();
            // As Postgres keeps it (microseconds), so the answer equals a later read.
            purchase.paid_at = purchase.paid_at.trunc_subsecs(6);
            stored.insert(purchase.reservation_id, purchase);
        }
        return Ok(stored);
    }
    let reservations: Vec<Uuid> = unique.iter().map(|(p, _)| p.reservation_id).collect();
    let rows = client
        .query(
            "SELECT * FROM purchases WHERE reservation_id = ANY($1)",
            &[&reservations],
        )
        .await
        .map_err(text)?;
    for row in &rows {
        let purchase = crate::store::purchase_from_row(row);
        stored.insert(purchase.reservation_id, purchase);
    }
    Ok(stored)
}
