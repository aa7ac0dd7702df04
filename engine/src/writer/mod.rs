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
//! A new hold (the embedded gate's, or one the Redis gate's journal read from a stream) is journaled compactly: the
//! holds of one batch and drop are one row of
//! `hold_batches` (arrays of ids, members, quantities and times), because a row per hold cost Postgres about as much
//! CPU as the whole reservation cost the server. A hold gets its own `reservations` row when it settles: the
//! purchase upserts it as `paid`, a release upserts it as `released` (each carries the hold's row, so it need not
//! exist yet). `store::materialize_holds` turns journaled holds into rows when a drop is loaded or unloaded.
//! Every write is idempotent (upserts on ids; a journal batch written twice names the same holds twice, which
//! materializing folds), so a batch retried after an unknown outcome stores nothing twice, and a purchase of a
//! reservation stored before answers with the purchase stored then.

//!
//! The files by role: this one is the writer's face (its settings, errors, handle and task); `batching.rs` gathers
//! queued operations into a batch and answers its waiters; `commit.rs` writes a batch (retries, the backstop's
//! fallback, the pipelined transaction); `sql.rs` holds the statements and the column arrays they take.

mod batching;
mod commit;
mod sql;

use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use deadpool_postgres::Pool;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::core::ReleaseReason;
pub use crate::types::HoldRow;
use crate::types::{Purchase, SecondRow};

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
    /// finds its reservation's row there already, as with either gate's journal (new holds go to `hold_batches`).
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
    /// The connection failed after the batch was sent, and no retry reached Postgres: its COMMIT may have landed,
    /// so whether it is stored is not known until Postgres is read.
    #[error("storing the batch failed, and it may have been stored: {0}")]
    InDoubt(String),
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
    /// Holds and releases that must be known committed (a journal acknowledges its source only then). The holds are
    /// journaled compactly like the embedded gate's; a release carries its hold's row, which is inserted first if
    /// missing, so releases may arrive before their holds.
    Journal {
        holds: Vec<HoldRow>,
        released: Vec<(HoldRow, ReleaseReason, DateTime<Utc>)>,
        ack: oneshot::Sender<Result<(), WriteError>>,
    },
    /// A drop report's counts (`service::tally`), added to what is stored; nobody awaits them.
    Seconds(Vec<SecondRow>),
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

    /// Queues a drop report's counts; waits only while the queue is full.
    pub async fn seconds(&self, rows: Vec<SecondRow>) -> Result<(), WriteError> {
        self.send(WriteOp::Seconds(rows)).await
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
    let task = tokio::spawn(batching::run(pool, config, rx, Arc::clone(&stats)));
    (WriterHandle { tx, stats }, task)
}
