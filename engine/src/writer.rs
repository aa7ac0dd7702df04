//! The asynchronous, batched Postgres writer (group commit).
//!
//! New holds, their releases and purchases flow through one bounded channel to one task. It takes whatever has
//! queued up (up to `batch_rows_max`), optionally lingers `linger` for more (a batch that nobody awaits, only new
//! holds and releases, lingers `unawaited_linger`, 5 ms by default, until something awaited arrives: a commit
//! costs Postgres far more than a journal row), and writes the lot in one transaction,
//! pipelined: BEGIN, every statement and COMMIT go out before any answer is awaited, so a batch costs one round
//! trip. (Writing two batches at once, each on its own connection, measured no faster: Postgres's CPU per row is
//! the bound, not the wait.) A purchase's sender awaits the commit of its batch: that is what lets a payment answer 200 only once the
//! purchase is durable. A `Shutdown` op drains everything queued before it.
//!
//! A new hold of the embedded gate is journaled compactly: the holds of one batch and drop are one row of
//! `hold_batches` (arrays of ids, members, quantities and times), because a row per hold cost Postgres about as much
//! CPU as the whole reservation cost the server. A hold gets its own `reservations` row when it settles: the
//! purchase upserts it as `paid`, a release upserts it as `released` (each carries the hold's row, so it need not
//! exist yet). `store::materialize_holds` turns journaled holds into rows when a drop is loaded or unloaded.
//! Every write is idempotent (upserts on ids; a journal batch written twice names the same holds twice, which
//! materializing folds), so a batch retried after an unknown outcome stores nothing twice, and a purchase of a
//! reservation stored before answers with the purchase stored then.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use chrono::{DateTime, SubsecRound, Utc};
use deadpool_postgres::Pool;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use uuid::Uuid;

use crate::core::ReleaseReason;
pub use crate::types::HoldRow;
use crate::types::{reason_name, Purchase};

/// Limits of the writer.
#[derive(Debug, Clone, Copy)]
pub struct WriterConfig {
    /// Most operations written in one transaction.
    pub batch_rows_max: usize,
    /// Bound of the queue in front of the writer; senders wait when it is full (back-pressure).
    pub channel_capacity: usize,
    /// How long a batch that is not full waits for more before it is written; zero writes at once (smart
    /// batching: whatever queued while the previous batch was in flight goes into the next).
    pub linger: Duration,
    /// How long a batch that nobody awaits (new holds and releases only: no purchase, journal, flush or shutdown)
    /// waits for more, if longer than `linger`. Such rows are not promised durable when they are queued, and each
    /// commit costs Postgres far more than a row of the journal, so lingering here turns a thousand small commits
    /// a second into a few large ones. Anything awaited that arrives ends the wait.
    pub unawaited_linger: Duration,
    /// Attempts per batch before its purchases are answered with an error.
    pub attempts_max: u32,
    /// Whether a purchase is first written with plain inserts (see `write_batch`): right when a purchase rarely
    /// finds its reservation's row there already, as with the embedded gate's journal; the engine turns it off for
    /// a gate that stores every hold as a row.
    pub plain_purchases: bool,
}

impl Default for WriterConfig {
    fn default() -> Self {
        Self {
            batch_rows_max: 1000,
            channel_capacity: 16_384,
            linger: Duration::ZERO,
            unawaited_linger: Duration::from_millis(5),
            attempts_max: 5,
            plain_purchases: true,
        }
    }
}

/// The writer is gone (shut down) or gave up on a batch; nothing is known to be stored.
#[derive(Debug, Clone, thiserror::Error)]
pub enum WriteError {
    #[error("the writer has shut down")]
    Closed,
    #[error("storing the batch failed: {0}")]
    Failed(String),
    /// Postgres refused the purchase (guarantee 5a): its hold's release is stored (a payment that outlived its
    /// lease), or its drop's stored paid units would pass the stock. Nothing of it was stored.
    #[error("the hold no longer owns its units in Postgres; the purchase was refused")]
    Fenced,
}

enum WriteOp {
    Hold(HoldRow),
    Released {
        hold: HoldRow,
        reason: ReleaseReason,
        at: DateTime<Utc>,
    },
    Purchase {
        purchase: Purchase,
        hold: HoldRow,
        ack: oneshot::Sender<Result<Purchase, WriteError>>,
    },
    /// Holds and releases that must be known committed (a journal acknowledges its source only then). A release
    /// carries its hold's row, which is inserted first if missing, so releases may arrive before their holds.
    Journal {
        holds: Vec<HoldRow>,
        released: Vec<(HoldRow, ReleaseReason, DateTime<Utc>)>,
        ack: oneshot::Sender<Result<(), WriteError>>,
    },
    /// Answered once everything queued before it is committed.
    Flush(oneshot::Sender<()>),
    /// Like Flush, then the writer stops.
    Shutdown(oneshot::Sender<()>),
}

/// Counters per batch, for the report and the logs.
#[derive(Debug, Default)]
pub struct WriterStats {
    pub batches: AtomicU64,
    pub rows: AtomicU64,
    pub purchases: AtomicU64,
    pub failed_batches: AtomicU64,
    pub flush_micros_total: AtomicU64,
}

/// Sends work to the writer. Cheap to clone.
#[derive(Clone)]
pub struct WriterHandle {
    tx: mpsc::Sender<WriteOp>,
    stats: Arc<WriterStats>,
}

impl std::fmt::Debug for WriterHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WriterHandle").finish_non_exhaustive()
    }
}

impl WriterHandle {
    /// Queues a new hold's row; waits only while the queue is full.
    pub async fn hold_created(&self, row: HoldRow) -> Result<(), WriteError> {
        self.send(WriteOp::Hold(row)).await
    }

    /// Queues a release; the hold's row comes along, as its row may not be stored yet (new holds are journaled
    /// compactly, see the module docs).
    pub async fn hold_released(
        &self,
        hold: HoldRow,
        reason: ReleaseReason,
        at: DateTime<Utc>,
    ) -> Result<(), WriteError> {
        self.send(WriteOp::Released { hold, reason, at }).await
    }

    /// Stores a purchase (and marks its reservation paid) and returns once that is committed, with the purchase as
    /// stored: the one given, or the one an earlier attempt at the same reservation stored first.
    pub async fn purchase(
        &self,
        purchase: Purchase,
        hold: HoldRow,
    ) -> Result<Purchase, WriteError> {
        let (ack, done) = oneshot::channel();
        self.send(WriteOp::Purchase {
            purchase,
            hold,
            ack,
        })
        .await?;
        done.await.unwrap_or(Err(WriteError::Closed))
    }

    /// Stores holds and releases and returns once they are committed.
    pub async fn journal(
        &self,
        holds: Vec<HoldRow>,
        released: Vec<(HoldRow, ReleaseReason, DateTime<Utc>)>,
    ) -> Result<(), WriteError> {
        let (ack, done) = oneshot::channel();
        self.send(WriteOp::Journal {
            holds,
            released,
            ack,
        })
        .await?;
        done.await.unwrap_or(Err(WriteError::Closed))
    }

    /// Returns once everything queued so far is committed (or given up on).
    pub async fn flush(&self) -> Result<(), WriteError> {
        let (tx, rx) = oneshot::channel();
        self.send(WriteOp::Flush(tx)).await?;
        rx.await.map_err(|_| WriteError::Closed)
    }

    /// Drains the queue, then stops the writer.
    pub async fn shutdown(&self) -> Result<(), WriteError> {
        let (tx, rx) = oneshot::channel();
        self.send(WriteOp::Shutdown(tx)).await?;
        rx.await.map_err(|_| WriteError::Closed)
    }

    pub fn stats(&self) -> &WriterStats {
        &self.stats
    }

    /// Operations queued and not yet taken by the writer.
    pub fn queue_depth(&self) -> usize {
        self.tx.max_capacity() - self.tx.capacity()
    }

    async fn send(&self, op: WriteOp) -> Result<(), WriteError> {
        self.tx.send(op).await.map_err(|_| WriteError::Closed)
    }
}

/// Starts the writer task.
pub fn spawn(pool: Pool, config: WriterConfig) -> (WriterHandle, JoinHandle<()>) {
    let (tx, rx) = mpsc::channel(config.channel_capacity.max(1));
    let stats = Arc::new(WriterStats::default());
    let task = tokio::spawn(run(pool, config, rx, Arc::clone(&stats)));
    (WriterHandle { tx, stats }, task)
}

#[derive(Default)]
struct Batch {
    /// New holds of the embedded gate, journaled compactly (`hold_batches`).
    journaled: Vec<HoldRow>,
    /// New holds from a gate's journal (`Journal`), stored as rows.
    holds: Vec<HoldRow>,
    released: Vec<(HoldRow, ReleaseReason, DateTime<Utc>)>,
    purchases: Vec<(Purchase, HoldRow)>,
    acks: Vec<oneshot::Sender<Result<Purchase, WriteError>>>,
    journal_acks: Vec<oneshot::Sender<Result<(), WriteError>>>,
    flushes: Vec<oneshot::Sender<()>>,
    shutdown: Option<oneshot::Sender<()>>,
}

/// The rows of a batch, or of a part of one (the backstop's fallback writes a batch's purchases one by one).
#[derive(Clone, Copy)]
struct Rows<'a> {
    journaled: &'a [HoldRow],
    holds: &'a [HoldRow],
    released: &'a [(HoldRow, ReleaseReason, DateTime<Utc>)],
    purchases: &'a [(Purchase, HoldRow)],
}

impl Rows<'_> {
    fn len(&self) -> usize {
        self.journaled.len() + self.holds.len() + self.released.len() + self.purchases.len()
    }
}

/// The purchases a written batch stored, by reservation: the one sent, or the one stored first for a reservation
/// paid before. A purchase whose reservation is missing was refused by the fence.
type Stored = HashMap<Uuid, Purchase>;

/// What a batch's writing says of each purchase, by reservation (missing: refused by the fence), or why the batch as
/// a whole was not written.
type Written = Result<HashMap<Uuid, Result<Purchase, WriteError>>, WriteError>;

impl Batch {
    fn rows(&self) -> usize {
        self.all().len()
    }

    fn all(&self) -> Rows<'_> {
        Rows {
            journaled: &self.journaled,
            holds: &self.holds,
            released: &self.released,
            purchases: &self.purchases,
        }
    }

    fn push(&mut self, op: WriteOp) {
        match op {
            WriteOp::Hold(row) => self.journaled.push(row),
            WriteOp::Released { hold, reason, at } => self.released.push((hold, reason, at)),
            WriteOp::Purchase {
                purchase,
                hold,
                ack,
            } => {
                self.purchases.push((purchase, hold));
                self.acks.push(ack);
            }
            WriteOp::Journal {
                holds,
                released,
                ack,
            } => {
                self.holds.extend(holds);
                self.released.extend(released);
                self.journal_acks.push(ack);
            }
            WriteOp::Flush(done) => self.flushes.push(done),
            WriteOp::Shutdown(done) => self.shutdown = Some(done),
        }
    }

    fn closed(&self) -> bool {
        self.shutdown.is_some()
    }

    /// Whether anyone waits on this batch's commit.
    fn awaited(&self) -> bool {
        !self.acks.is_empty()
            || !self.journal_acks.is_empty()
            || !self.flushes.is_empty()
            || self.shutdown.is_some()
    }
}

async fn run(
    pool: Pool,
    config: WriterConfig,
    mut rx: mpsc::Receiver<WriteOp>,
    stats: Arc<WriterStats>,
) {
    let rows_max = config.batch_rows_max.max(1);
    loop {
        let Some(first) = rx.recv().await else {
            return;
        };
        let batch = take_batch(first, &mut rx, rows_max, config).await;
        let result = if batch.rows() == 0 {
            Ok(HashMap::new())
        } else {
            write(&pool, &config, batch.all(), &stats).await
        };
        if answer(batch, &result) {
            rx.close();
            tracing::info!("writer drained and stopped");
            return;
        }
    }
}

/// The batch that starts with `first`: whatever else has queued, up to `rows_max` rows or a shutdown, and for
/// `linger` more if it is not full (`unawaited_linger`, when longer, while nobody awaits the batch).
async fn take_batch(
    first: WriteOp,
    rx: &mut mpsc::Receiver<WriteOp>,
    rows_max: usize,
    config: WriterConfig,
) -> Batch {
    let mut batch = Batch::default();
    batch.push(first);
    drain(&mut batch, rx, rows_max);
    let started = tokio::time::Instant::now();
    let deadline_of = |batch: &Batch| {
        let linger = if batch.awaited() {
            config.linger
        } else {
            config.linger.max(config.unawaited_linger)
        };
        started + linger
    };
    let mut deadline = deadline_of(&batch);
    if deadline == started || batch.rows() >= rows_max || batch.closed() {
        return batch;
    }
    // One timer for the whole wait, reset only when the batch becomes awaited.
    let sleep = tokio::time::sleep_until(deadline);
    tokio::pin!(sleep);
    while batch.rows() < rows_max && !batch.closed() {
        tokio::select! {
            biased;
            op = rx.recv() => {
                let Some(op) = op else { break };
                batch.push(op);
                let now_due = deadline_of(&batch);
                if now_due != deadline {
                    deadline = now_due;
                    if deadline <= tokio::time::Instant::now() {
                        // Awaited now and past its own linger: take what else is queued and go.
                        drain(&mut batch, rx, rows_max);
                        break;
                    }
                    sleep.as_mut().reset(deadline);
                }
            }
            () = &mut sleep => break,
        }
    }
    batch
}

/// Moves whatever is queued now into `batch`, up to `rows_max` rows or a shutdown.
fn drain(batch: &mut Batch, rx: &mut mpsc::Receiver<WriteOp>, rows_max: usize) {
    while batch.rows() < rows_max && !batch.closed() {
        match rx.try_recv() {
            Ok(op) => batch.push(op),
            Err(_) => break,
        }
    }
}

/// Answers everyone waiting on a written batch; true when it held the shutdown.
fn answer(mut batch: Batch, result: &Written) -> bool {
    for (ack, (purchase, _)) in batch.acks.drain(..).zip(&batch.purchases) {
        let stored = match result {
            Ok(stored) => stored
                .get(&purchase.reservation_id)
                .cloned()
                .unwrap_or(Err(WriteError::Fenced)),
            Err(err) => Err(err.clone()),
        };
        let _ = ack.send(stored);
    }
    for ack in batch.journal_acks.drain(..) {
        let _ = ack.send(result.as_ref().map(|_| ()).map_err(Clone::clone));
    }
    for done in batch.flushes.drain(..) {
        let _ = done.send(());
    }
    match batch.shutdown.take() {
        Some(done) => {
            let _ = done.send(());
            true
        }
        None => false,
    }
}

/// Writes a batch. When the backstop refuses it (its purchases would pass a drop's stock in Postgres, which only a
/// gate that lost or never had the truth lets happen), writes its other rows, then its purchases one at a time, so
/// that only those that do not fit are refused.
async fn write(pool: &Pool, config: &WriterConfig, rows: Rows<'_>, stats: &WriterStats) -> Written {
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
                    holds: &[],
                    released: &[],
                    purchases: one,
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
    loop {
        let started = Instant::now();
        match write_batch(pool, batch, plain).await {
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
            }
            Err(BatchError::Oversold) => return Err(BatchError::Oversold),
            Err(BatchError::Failed(err)) if attempt < config.attempts_max => {
                tracing::warn!(error = %err, attempt, rows = batch.len(), "writer batch failed; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
                attempt += 1;
            }
            Err(BatchError::Failed(err)) => {
                stats.failed_batches.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("flashsale_writer_failed_batches_total").increment(1);
                tracing::error!(error = %err, rows = batch.len(), "writer batch failed; giving up");
                return Err(BatchError::Failed(err));
            }
        }
    }
}

fn quantity(q: u32) -> i32 {
    // Quantities are bounded by a drop's stock, which the API caps far below i32::MAX.
    i32::try_from(q).unwrap_or(i32::MAX)
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
    Failed(String),
}

impl From<BatchError> for WriteError {
    fn from(err: BatchError) -> Self {
        match err {
            BatchError::Oversold => WriteError::Fenced,
            BatchError::Conflict => WriteError::Failed("a row already there".into()),
            BatchError::Failed(err) => WriteError::Failed(err),
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
            _ => Self::Failed(err.to_string()),
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
    let text = |e: tokio_postgres::Error| e.to_string();

    // The journal: one row per drop of this batch, however many holds it has.
    let mut by_drop: HashMap<Uuid, Vec<&HoldRow>> = HashMap::new();
    for hold in batch.journaled {
        by_drop.entry(hold.drop_id).or_default().push(hold);
    }
    let journaled: Vec<(Uuid, HoldColumns)> = by_drop
        .into_iter()
        .map(|(drop, holds)| (drop, HoldColumns::of(holds.into_iter())))
        .collect();
    let holds = (!batch.holds.is_empty()).then(|| HoldColumns::of(batch.holds.iter()));
    // One row per reservation: a second purchase of a reservation in the same batch (two attempts racing) gets
    // the first's row back, like an attempt that finds an earlier one already stored.
    let mut seen = HashSet::with_capacity(batch.purchases.len());
    let unique: Vec<&(Purchase, HoldRow)> = batch
        .purchases
        .iter()
        .filter(|(purchase, _)| seen.insert(purchase.reservation_id))
        .collect();
    let purchases = (!unique.is_empty()).then(|| PurchaseColumns::of(&unique));
    // One row per hold (a journal replay can name a release twice; an upsert may touch a row only once).
    let mut seen = HashSet::with_capacity(batch.released.len());
    let released: Vec<&(HoldRow, ReleaseReason, DateTime<Utc>)> = batch
        .released
        .iter()
        .filter(|(hold, _, _)| seen.insert(hold.id))
        .collect();
    let releases = (!released.is_empty()).then(|| ReleaseColumns::of(&released));

    let mut steps: Vec<Step<'_>> = Vec::with_capacity(journaled.len() + 6);
    steps.push(Box::pin(async {
        client.batch_execute("BEGIN").await.map(|()| 0)
    }));
    if !journaled.is_empty() {
        let insert = client
            .prepare_cached(
                "INSERT INTO hold_batches (drop_id, ids, member_ids, quantities, created_at, expires_at)
                 VALUES ($1, $2, $3, $4, $5, $6)",
            )
            .await
            .map_err(text)?;
        for (drop, c) in &journaled {
            let insert = insert.clone();
            let client = &client;
            steps.push(Box::pin(async move {
                client
                    .execute(
                        &insert,
                        &[
                            drop,
                            &c.ids,
                            &c.members,
                            &c.quantities,
                            &c.created,
                            &c.expires,
                        ],
                    )
                    .await
            }));
        }
    }
    if let Some(c) = &holds {
        let insert = client
            .prepare_cached(
                "INSERT INTO reservations (id, drop_id, member_id, quantity, status, created_at, expires_at, updated_at)
                 SELECT u.id, u.drop_id, u.member_id, u.quantity, 'held', u.created_at, u.expires_at, u.created_at
                 FROM UNNEST($1::uuid[], $2::uuid[], $3::uuid[], $4::int4[], $5::timestamptz[], $6::timestamptz[])
                      AS u(id, drop_id, member_id, quantity, created_at, expires_at)
                 ON CONFLICT (id) DO NOTHING",
            )
            .await
            .map_err(text)?;
        let client = &client;
        steps.push(Box::pin(async move {
            client
                .execute(
                    &insert,
                    &[
                        &c.ids,
                        &c.drops,
                        &c.members,
                        &c.quantities,
                        &c.created,
                        &c.expires,
                    ],
                )
                .await
        }));
    }
    let mut purchases_step = None;
    if let Some(p) = &purchases {
        let statement = if plain {
            PURCHASES_PLAIN
        } else {
            PURCHASES_FENCED
        };
        let insert = client.prepare_cached(statement).await.map_err(text)?;
        let client = &client;
        let h = &p.holds;
        purchases_step = Some(steps.len());
        steps.push(Box::pin(async move {
            let rows: [&(dyn tokio_postgres::types::ToSql + Sync); 16] = [
                &h.ids,
                &h.drops,
                &h.members,
                &h.quantities,
                &h.created,
                &h.expires,
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
            ];
            if plain {
                // Every row goes in or the statement fails, so each drop's units are known here.
                let mut params = rows.to_vec();
                params.push(&p.sold_drops);
                params.push(&p.sold_units);
                client.execute(&insert, &params).await?;
                Ok(p.ids.len() as u64)
            } else {
                // The purchases this statement inserted.
                let row = client.query_one(&insert, &rows).await?;
                Ok(u64::try_from(row.get::<_, i64>(0)).unwrap_or(0))
            }
        }));
    }
    if let Some(r) = &releases {
        // A paid hold is never released: the guard keeps a late or replayed release from touching it.
        let upsert = client
            .prepare_cached(
                "INSERT INTO reservations (id, drop_id, member_id, quantity, status, reason, created_at, expires_at, updated_at)
                 SELECT u.id, u.drop_id, u.member_id, u.quantity, 'released', u.reason, u.created_at, u.expires_at, u.at
                 FROM UNNEST($1::uuid[], $2::uuid[], $3::uuid[], $4::int4[], $5::timestamptz[], $6::timestamptz[],
                             $7::text[], $8::timestamptz[])
                      AS u(id, drop_id, member_id, quantity, created_at, expires_at, reason, at)
                 ON CONFLICT (id) DO UPDATE SET status = 'released', reason = EXCLUDED.reason,
                                                updated_at = EXCLUDED.updated_at
                 WHERE reservations.status <> 'paid'",
            )
            .await
            .map_err(text)?;
        let client = &client;
        let h = &r.holds;
        steps.push(Box::pin(async move {
            client
                .execute(
                    &upsert,
                    &[
                        &h.ids,
                        &h.drops,
                        &h.members,
                        &h.quantities,
                        &h.created,
                        &h.expires,
                        &r.reasons,
                        &r.at,
                    ],
                )
                .await
        }));
    }
    steps.push(Box::pin(async {
        client.batch_execute("COMMIT").await.map(|()| 0)
    }));

    let mut touched = Vec::with_capacity(steps.len());
    for answer in pipeline(steps).await {
        // The first failure is the cause: the steps after it fail only because the transaction had.
        touched.push(answer.map_err(|err| BatchError::of(&err, plain))?);
    }

    let mut stored = HashMap::with_capacity(unique.len());
    let Some(step) = purchases_step else {
        return Ok(stored);
    };
    if touched.get(step).copied() == Some(unique.len() as u64) {
        for (purchase, _) in &unique {
            let mut purchase = purchase.clone();
            // As Postgres keeps it (microseconds), so the answer equals a later read.
            purchase.paid_at = purchase.paid_at.trunc_subsecs(6);
            stored.insert(purchase.reservation_id, purchase);
        }
    } else {
        // Some reservation was paid before (a retried payment or batch), or refused by the fence: answer with the
        // purchases as stored; a refused one has none.
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
    }
    Ok(stored)
}

/// A purchase's reservation row, as paid (`$1`..`$7`); the two statements below differ only in what they do with a
/// row already there.
macro_rules! paid_rows {
    () => {
        "INSERT INTO reservations (id, drop_id, member_id, quantity, status, created_at, expires_at, updated_at)
     SELECT u.id, u.drop_id, u.member_id, u.quantity, 'paid', u.created_at, u.expires_at, u.paid_at
     FROM UNNEST($1::uuid[], $2::uuid[], $3::uuid[], $4::int4[], $5::timestamptz[], $6::timestamptz[],
                 $7::timestamptz[])
          AS u(id, drop_id, member_id, quantity, created_at, expires_at, paid_at)"
    };
}
/// The purchases (`$8`..`$16`); likewise.
macro_rules! purchase_rows {
    () => {
        "INSERT INTO purchases (id, reservation_id, drop_id, product_id, member_id, quantity, amount, currency, paid_at)
     SELECT p.* FROM UNNEST($8::uuid[], $9::uuid[], $10::uuid[], $11::uuid[], $12::uuid[], $13::int4[],
                            $14::int8[], $15::text[], $16::timestamptz[])
          AS p(id, reservation_id, drop_id, product_id, member_id, quantity, amount, currency, paid_at)"
    };
}
/// Purchases and their paid reservation rows where none is expected (`write_batch`'s `plain`): any row already
/// there, a released one included, fails the batch, which is then written with `PURCHASES_FENCED`. Each drop's
/// `sold` rises by its units in the batch (`$17`, `$18`: known before, as every row goes in or none), once per drop
/// per batch; its CHECK against the stock is the backstop.
const PURCHASES_PLAIN: &str = concat!(
    "WITH paid AS (",
    paid_rows!(),
    "), stored AS (",
    purchase_rows!(),
    ")
     UPDATE drops d SET sold = d.sold + u.units
     FROM UNNEST($17::uuid[], $18::int4[]) AS u(drop_id, units)
     WHERE d.id = u.drop_id"
);
/// The same over rows that may be there: a reservation row is marked paid unless it is `released` (the fence), a
/// purchase is stored only for a reservation so marked, and a reservation paid before keeps the purchase stored
/// then. Each drop's `sold` rises by the units of the purchases this statement inserted, and it answers how many
/// that was.
const PURCHASES_FENCED: &str = concat!(
    "WITH paid AS (",
    paid_rows!(),
    " ON CONFLICT (id) DO UPDATE SET status = 'paid', reason = NULL, updated_at = EXCLUDED.updated_at
     WHERE reservations.status <> 'released'
     RETURNING id), stored AS (",
    purchase_rows!(),
    " WHERE p.reservation_id IN (SELECT id FROM paid)
     ON CONFLICT (reservation_id) DO NOTHING
     RETURNING drop_id, quantity),
     counted AS (
         UPDATE drops d SET sold = d.sold + s.units
         FROM (SELECT drop_id, sum(quantity)::int4 AS units FROM stored GROUP BY drop_id) s
         WHERE d.id = s.drop_id)
     SELECT count(*) FROM stored"
);

/// Purchases as the column arrays their statements take (with their holds').
struct PurchaseColumns<'a> {
    holds: HoldColumns,
    ids: Vec<Uuid>,
    reservations: Vec<Uuid>,
    drops: Vec<Uuid>,
    products: Vec<Uuid>,
    members: Vec<Uuid>,
    quantities: Vec<i32>,
    amounts: Vec<i64>,
    currencies: Vec<&'a str>,
    paid_at: Vec<DateTime<Utc>>,
    /// Units per drop, for `PURCHASES_PLAIN`.
    sold_drops: Vec<Uuid>,
    sold_units: Vec<i32>,
}

impl<'a> PurchaseColumns<'a> {
    fn of(purchases: &[&'a (Purchase, HoldRow)]) -> Self {
        let mut units: HashMap<Uuid, i32> = HashMap::new();
        for (p, _) in purchases {
            *units.entry(p.drop_id).or_default() += quantity(p.quantity);
        }
        let (sold_drops, sold_units) = units.into_iter().unzip();
        Self {
            holds: HoldColumns::of(purchases.iter().map(|(_, hold)| hold)),
            ids: purchases.iter().map(|(p, _)| p.id).collect(),
            reservations: purchases.iter().map(|(p, _)| p.reservation_id).collect(),
            drops: purchases.iter().map(|(p, _)| p.drop_id).collect(),
            products: purchases.iter().map(|(p, _)| p.product_id).collect(),
            members: purchases.iter().map(|(p, _)| p.member_id).collect(),
            quantities: purchases
                .iter()
                .map(|(p, _)| quantity(p.quantity))
                .collect(),
            amounts: purchases.iter().map(|(p, _)| p.amount).collect(),
            currencies: purchases.iter().map(|(p, _)| p.currency.as_str()).collect(),
            paid_at: purchases.iter().map(|(p, _)| p.paid_at).collect(),
            sold_drops,
            sold_units,
        }
    }
}

/// Releases as the column arrays their statement takes.
struct ReleaseColumns {
    holds: HoldColumns,
    reasons: Vec<&'static str>,
    at: Vec<DateTime<Utc>>,
}

impl ReleaseColumns {
    fn of(released: &[&(HoldRow, ReleaseReason, DateTime<Utc>)]) -> Self {
        Self {
            holds: HoldColumns::of(released.iter().map(|(hold, _, _)| hold)),
            reasons: released.iter().map(|r| reason_name(r.1)).collect(),
            at: released.iter().map(|r| r.2).collect(),
        }
    }
}

/// Holds as the column arrays the statements above take.
struct HoldColumns {
    ids: Vec<Uuid>,
    drops: Vec<Uuid>,
    members: Vec<Uuid>,
    quantities: Vec<i32>,
    created: Vec<DateTime<Utc>>,
    expires: Vec<DateTime<Utc>>,
}

impl HoldColumns {
    fn of<'a>(holds: impl ExactSizeIterator<Item = &'a HoldRow>) -> Self {
        let n = holds.len();
        let mut c = Self {
            ids: Vec::with_capacity(n),
            drops: Vec::with_capacity(n),
            members: Vec::with_capacity(n),
            quantities: Vec::with_capacity(n),
            created: Vec::with_capacity(n),
            expires: Vec::with_capacity(n),
        };
        for hold in holds {
            c.ids.push(hold.id);
            c.drops.push(hold.drop_id);
            c.members.push(hold.member_id);
            c.quantities.push(quantity(hold.quantity));
            c.created.push(hold.created_at);
            c.expires.push(hold.expires_at);
        }
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hold() -> HoldRow {
        let now = Utc::now();
        HoldRow {
            id: Uuid::now_v7(),
            drop_id: Uuid::now_v7(),
            member_id: Uuid::now_v7(),
            quantity: 1,
            created_at: now,
            expires_at: now + chrono::Duration::seconds(300),
        }
    }

    fn purchase() -> (WriteOp, oneshot::Receiver<Result<Purchase, WriteError>>) {
        let hold = hold();
        let (ack, done) = oneshot::channel();
        let purchase = Purchase {
            id: Uuid::now_v7(),
            reservation_id: hold.id,
            drop_id: hold.drop_id,
            product_id: Uuid::now_v7(),
            member_id: hold.member_id,
            quantity: 1,
            amount: 100,
            currency: "KRW".into(),
            paid_at: hold.created_at,
        };
        (
            WriteOp::Purchase {
                purchase,
                hold,
                ack,
            },
            done,
        )
    }

    fn lingers(unawaited_ms: u64) -> WriterConfig {
        WriterConfig {
            unawaited_linger: Duration::from_millis(unawaited_ms),
            ..WriterConfig::default()
        }
    }

    /// Sends `ops` into `tx` after `after`, from a task of their own.
    fn send_later(tx: &mpsc::Sender<WriteOp>, after: Duration, ops: Vec<WriteOp>) {
        let tx = tx.clone();
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            for op in ops {
                tx.send(op).await.ok();
            }
        });
    }

    #[tokio::test]
    async fn holds_alone_wait_out_the_unawaited_linger_for_more() {
        let (tx, mut rx) = mpsc::channel(64);
        send_later(&tx, Duration::from_millis(20), vec![WriteOp::Hold(hold())]);
        let started = Instant::now();
        let batch = take_batch(WriteOp::Hold(hold()), &mut rx, 100, lingers(300)).await;
        assert_eq!(
            batch.journaled.len(),
            2,
            "the hold sent during the wait joins"
        );
        assert!(
            started.elapsed() >= Duration::from_millis(300),
            "{:?}",
            started.elapsed()
        );
        assert!(rx.try_recv().is_err());
    }

    #[tokio::test]
    async fn a_purchase_or_a_flush_ends_the_wait_at_once() {
        let (tx, mut rx) = mpsc::channel(64);
        for ending in ["purchase", "flush"] {
            let (op, _done) = purchase();
            let (flushed, _flush_done) = oneshot::channel();
            let op = if ending == "purchase" {
                op
            } else {
                WriteOp::Flush(flushed)
            };
            send_later(
                &tx,
                Duration::from_millis(20),
                vec![WriteOp::Hold(hold()), op],
            );
            let started = Instant::now();
            let batch = take_batch(WriteOp::Hold(hold()), &mut rx, 100, lingers(60_000)).await;
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "{ending}: waited {:?}",
                started.elapsed()
            );
            assert_eq!(batch.journaled.len(), 2, "{ending}");
            assert!(batch.awaited(), "{ending}");
            assert_eq!(batch.purchases.len(), usize::from(ending == "purchase"));
        }
    }

    #[tokio::test]
    async fn an_awaited_batch_and_a_zero_linger_take_only_what_is_queued() {
        let (tx, mut rx) = mpsc::channel(64);
        let (op, _done) = purchase();
        tx.send(WriteOp::Hold(hold())).await.ok();
        let started = Instant::now();
        let batch = take_batch(op, &mut rx, 100, lingers(60_000)).await;
        assert!(started.elapsed() < Duration::from_secs(10));
        assert_eq!((batch.purchases.len(), batch.journaled.len()), (1, 1));

        tx.send(WriteOp::Hold(hold())).await.ok();
        send_later(&tx, Duration::from_millis(50), vec![WriteOp::Hold(hold())]);
        let batch = take_batch(WriteOp::Hold(hold()), &mut rx, 100, lingers(0)).await;
        assert_eq!(
            batch.journaled.len(),
            2,
            "no wait: the later hold is left for the next batch"
        );
        assert!(!batch.awaited());
    }

    #[tokio::test]
    async fn a_full_batch_does_not_wait() {
        let (tx, mut rx) = mpsc::channel(64);
        for _ in 0..3 {
            tx.send(WriteOp::Hold(hold())).await.ok();
        }
        let started = Instant::now();
        let batch = take_batch(WriteOp::Hold(hold()), &mut rx, 4, lingers(60_000)).await;
        assert!(started.elapsed() < Duration::from_secs(10));
        assert_eq!(batch.journaled.len(), 4);
    }
}
