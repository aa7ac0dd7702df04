//! The reaper: releasing expired holds, settling payments whose lease ran out (the fence), and unloading settled
//! drops.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use uuid::Uuid;

use super::{bump, hold_row, Engine, EngineError};
use crate::core::{HoldView, ReleaseReason};
use crate::gate::Reaped;
use crate::store;
use crate::types::{DropSpec, Event};

impl Engine {
    /// Releases every expired hold once, and settles payments whose lease ran out; returns how many holds it
    /// released. The reaper calls this on its interval.
    pub async fn reap(&self) -> Result<usize, EngineError> {
        let now_ms = self.clock.now_ms();
        let mut reaped = Reaped::default();
        let mut count = self.gate.reap(now_ms, &mut reaped).await?;
        for (drop, hold) in &reaped.released {
            bump(&self.stats.released_expired);
            self.count(*drop, Event::Expired, now_ms);
            self.queue_release(*drop, hold, ReleaseReason::Expired, now_ms)
                .await;
        }
        for (drop, hold) in &reaped.lapsed {
            count += usize::from(self.settle_lapsed(*drop, hold).await?);
        }
        Ok(count)
    }

    /// Settles a payment whose lease ran out (its process died, paused or stalled past the lease): fences it in
    /// Postgres first, then moves the gate to what Postgres decided. Paid when its purchase is stored; else its release
    /// is stored (so the payment, should it resume, is refused there), the charge is refunded, and only then do the
    /// units return to sale. Returns whether it released the hold.
    async fn settle_lapsed(&self, drop: Uuid, hold: &HoldView) -> Result<bool, EngineError> {
        let client = self.db.get().await?;
        let fence = store::fence_payment(&**client, &hold_row(drop, hold), self.now()).await?;
        std::mem::drop(client);
        let settled = match fence {
            store::Fence::Paid => self.gate.complete_payment(drop, hold.id).await?,
            store::Fence::Released => {
                self.gateway.refund(hold.id).await;
                self.gate.release_fenced(drop, hold.id).await?
            }
        };
        tracing::warn!(%drop, hold = %hold.id, ?fence, ?settled, "settled a payment that outlived its lease");
        let released = fence == store::Fence::Released && settled.is_ok();
        if released {
            bump(&self.stats.released_expired);
            self.count(drop, Event::Expired, self.clock.now_ms());
        }
        Ok(released)
    }

    /// Unloads drops that have been settled for `settled_retain`: no holds left, and sold out or closed, so nothing
    /// about them can change. Their specs, receipts and gate state leave memory; a later request loads them again
    /// from Postgres. Returns how many were unloaded.
    pub async fn unload_settled(&self) -> Result<usize, EngineError> {
        let now_ms = self.clock.now_ms();
        let specs: Vec<Arc<DropSpec>> = self.drops.iter().map(|spec| Arc::clone(&spec)).collect();
        let retain_ms = i64::try_from(self.settled_retain.as_millis()).unwrap_or(i64::MAX);
        let mut unloaded = 0;
        for spec in specs {
            let closed = spec.closes_at_ms().is_some_and(|closes| now_ms >= closes);
            // An open drop with units left is not settled; the gate may know so from memory (on Redis, a call per
            // live drop per sweep was much of an idle marketplace's cost).
            if !closed && !self.gate.may_be_sold_out(spec.id) {
                self.settled_since.remove(&spec.id);
                continue;
            }
            let Some(counts) = self.gate.counts(spec.id).await? else {
                continue;
            };
            if counts.held > 0 || (counts.available > 0 && !closed) {
                self.settled_since.remove(&spec.id);
                continue;
            }
            let since = *self.settled_since.entry(spec.id).or_insert(now_ms);
            if now_ms.saturating_sub(since) < retain_ms {
                continue;
            }
            self.drops.remove(&spec.id);
            if let Some((_, tally)) = self.tallies.remove(&spec.id) {
                let mut rows = Vec::new();
                tally.take(&mut rows);
                if !rows.is_empty() {
                    if let Err(err) = self.writer.seconds(rows).await {
                        tracing::warn!(error = %err, drop = %spec.id, "an unloaded drop's last counts not queued");
                    }
                }
            }
            self.settled_since.remove(&spec.id);
            self.receipts
                .retain(|_, receipt| receipt.drop_id != spec.id);
            self.gate.unload(spec.id).await;
            self.room.unload(spec.id).await;
            // Its holds are all settled and stored as rows; the journal of its new holds can go.
            if let Err(err) = self.forget_journal(spec.id).await {
                tracing::warn!(error = %err, drop = %spec.id, "journal of an unloaded drop not cleared");
            }
            unloaded += 1;
            tracing::info!(drop = %spec.id, "unloaded a settled drop");
        }
        Ok(unloaded)
    }

    /// Materializes an unloaded drop's journaled holds. Every one of them settled (the drop had none left), so its
    /// row is there already unless its release was still queued; after the writer's flush it is.
    async fn forget_journal(&self, drop: Uuid) -> Result<(), EngineError> {
        self.writer
            .flush()
            .await
            .map_err(EngineError::StorageUnavailable)?;
        let client = self.db.get().await?;
        store::materialize_holds(&**client, Some(drop)).await?;
        Ok(())
    }
}

/// Releases expired holds every `interval` until told to stop. Holds only a weak reference, so a dropped
/// engine stops its reaper too.
pub(super) async fn run(
    engine: std::sync::Weak<Engine>,
    interval: Duration,
    mut stop: watch::Receiver<bool>,
) {
    /// How often the reaper also looks for settled drops to unload.
    const SWEEP_INTERVAL: Duration = Duration::from_secs(30);
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_sweep = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = stop.wait_for(|stop| *stop) => return,
        }
        let Some(engine) = engine.upgrade() else {
            return;
        };
        match engine.reap().await {
            Ok(0) => {}
            Ok(count) => tracing::debug!(count, "reaper released expired holds"),
            Err(err) => tracing::warn!(error = %err, "reaper pass failed"),
        }
        // After the reap, so the holds it released go out in the same tick.
        engine.record_report().await;
        if last_sweep.elapsed() >= SWEEP_INTERVAL.min(engine.settled_retain) {
            last_sweep = tokio::time::Instant::now();
            if let Err(err) = engine.unload_settled().await {
                tracing::warn!(error = %err, "unloading settled drops failed");
            }
        }
    }
}
