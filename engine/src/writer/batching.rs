//! Gathering queued operations into a batch (smart batching, lingering while nobody awaits), and answering the
//! batch's waiters once it is written.

use std::collections::HashMap;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use deadpool_postgres::Pool;
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use super::commit::write;
use super::{WriteError, WriteOp, WriterConfig, WriterStats};
use crate::core::ReleaseReason;
use crate::types::{HoldRow, Purchase, SecondRow};

#[derive(Default)]
struct Batch {
    /// New holds, journaled compactly (`hold_batches`): the embedded gate's, and those a gate's journal read.
    journaled: Vec<HoldRow>,
    released: Vec<(HoldRow, ReleaseReason, DateTime<Utc>)>,
    purchases: Vec<(Purchase, HoldRow)>,
    seconds: Vec<SecondRow>,
    acks: Vec<oneshot::Sender<Result<Purchase, WriteError>>>,
    journal_acks: Vec<oneshot::Sender<Result<(), WriteError>>>,
    flushes: Vec<oneshot::Sender<()>>,
    shutdown: Option<oneshot::Sender<()>>,
}

/// The rows of a batch, or of a part of one (the backstop's fallback writes a batch's purchases one by one).
#[derive(Clone, Copy)]
pub(super) struct Rows<'a> {
    pub(super) journaled: &'a [HoldRow],
    pub(super) released: &'a [(HoldRow, ReleaseReason, DateTime<Utc>)],
    pub(super) purchases: &'a [(Purchase, HoldRow)],
    pub(super) seconds: &'a [SecondRow],
}

impl Rows<'_> {
    pub(super) fn len(&self) -> usize {
        self.journaled.len() + self.released.len() + self.purchases.len() + self.seconds.len()
    }
}

/// The purchases a written batch stored, by reservation: the one sent, or the one stored first for a reservation
/// paid before. A purchase whose reservation is missing was refused by the fence.
pub(super) type Stored = HashMap<Uuid, Purchase>;

/// What a batch's writing says of each purchase, by reservation (missing: refused by the fence), or why the batch as
/// a whole was not written.
pub(super) type Written = Result<HashMap<Uuid, Result<Purchase, WriteError>>, WriteError>;

impl Batch {
    fn rows(&self) -> usize {
        self.all().len()
    }

    fn all(&self) -> Rows<'_> {
        Rows {
            journaled: &self.journaled,
            released: &self.released,
            purchases: &self.purchases,
            seconds: &self.seconds,
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
                self.journaled.extend(holds);
                self.released.extend(released);
                self.journal_acks.push(ack);
            }
            WriteOp::Seconds(rows) => self.seconds.extend(rows),
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

pub(super) async fn run(
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

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

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
