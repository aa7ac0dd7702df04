//! Refunding an unfunded campaign, every purchase exactly once (DESIGN.md guarantee 13), whichever instances run
//! and whichever crash meanwhile.
//!
//! 1. **Recorded before the gateway is asked.** Each purchase gets a `purchase_refunds` row (ON CONFLICT DO
//!    NOTHING, committed on its own) before any refund call; the purchase's id is the refund's idempotency key at
//!    the gateway, fixed by that row.
//! 2. **One refunder per purchase at a time.** A batch takes pending rows `FOR UPDATE SKIP LOCKED`, asks the
//!    gateway for each, and marks them `refunded_at` (and tells the buyer `campaign_unfunded`) in the same
//!    transaction: two instances take disjoint batches and never ask for one refund twice.
//! 3. **A crash between the gateway's answer and the record** rolls the batch back: its rows are pending again,
//!    the next pass (here or on another instance, after a restart) asks again under the same keys, and the
//!    gateway, idempotent on the key, pays each once. Nothing is lost (the rows exist before any call) and
//!    nothing is paid twice (the key never changes).
//!
//! The pass resumes wherever it stopped, because the state is all in Postgres: purchases without a row, rows
//! without `refunded_at`. A campaign is done when neither is left.

use std::sync::atomic::{AtomicU64, Ordering};

use chrono::{DateTime, Utc};
use engine::payment::{RefundOutcome, RefundRequest};
use uuid::Uuid;

use crate::error::ApiError;
use crate::notify::{notify_members, About, Kind};
use crate::AppState;

/// Refunds the gateway answered in this process (read only by the test hook `CAMPAIGN_REFUND_PAUSE_AFTER`).
static ANSWERED: AtomicU64 = AtomicU64::new(0);

/// Refunds every pending purchase of every unfunded campaign not done yet; returns how many this call refunded.
pub async fn refund_unfunded(state: &AppState, now: DateTime<Utc>) -> Result<usize, ApiError> {
    let drops: Vec<Uuid> = {
        let client = state.db.get().await?;
        client
            .query(
                "SELECT id FROM drops WHERE campaign = 'unfunded' AND refunds_done_at IS NULL",
                &[],
            )
            .await?
            .iter()
            .map(|row| row.get(0))
            .collect()
    };
    let mut refunded = 0;
    for drop in drops {
        refunded += refund_campaign(state, drop, now).await?;
    }
    Ok(refunded)
}

/// Records a refund row for every purchase of `drop` that has none, then refunds the pending rows batch by batch
/// until none is left that another instance is not working on; marks the campaign done when nothing is pending.
pub async fn refund_campaign(
    state: &AppState,
    drop: Uuid,
    now: DateTime<Utc>,
) -> Result<usize, ApiError> {
    record_pending(state, drop, now).await?;
    let mut refunded = 0;
    loop {
        match refund_batch(state, drop, now).await? {
            Batch::Refunded(0) => break,
            Batch::Refunded(n) => refunded += n,
            Batch::GatewayUnavailable(n) => {
                refunded += n;
                tracing::warn!(%drop, "the gateway cannot refund now; the campaign's refunds resume next pass");
                return Ok(refunded);
            }
        }
    }
    finish_if_done(state, drop, now).await?;
    Ok(refunded)
}

/// Step 1: a pending row per purchase without one, committed before any gateway call.
async fn record_pending(state: &AppState, drop: Uuid, now: DateTime<Utc>) -> Result<u64, ApiError> {
    let client = state.db.get().await?;
    Ok(client
        .execute(
            "INSERT INTO purchase_refunds (purchase_id, drop_id, member_id, charge_key, amount, currency, created_at)
             SELECT p.id, p.drop_id, p.member_id, p.reservation_id, p.amount, p.currency, $2
             FROM purchases p
             WHERE p.drop_id = $1
               AND NOT EXISTS (SELECT 1 FROM purchase_refunds r WHERE r.purchase_id = p.id)
             ON CONFLICT (purchase_id) DO NOTHING",
            &[&drop, &now],
        )
        .await?)
}

enum Batch {
    /// Refunded and recorded this many (0: nothing pending that is not locked by another refunder).
    Refunded(usize),
    /// Recorded this many, then the gateway could not refund the next one.
    GatewayUnavailable(usize),
}

/// Steps 2 and 3: one batch of pending rows, locked, refunded at the gateway, recorded, committed.
async fn refund_batch(state: &AppState, drop: Uuid, now: DateTime<Utc>) -> Result<Batch, ApiError> {
    let config = state.settings.campaigns;
    let mut client = state.db.get().await?;
    let tx = client.transaction().await?;
    let rows = tx
        .query(
            "SELECT purchase_id, member_id, charge_key, amount FROM purchase_refunds
             WHERE drop_id = $1 AND refunded_at IS NULL
             ORDER BY purchase_id LIMIT $2 FOR UPDATE SKIP LOCKED",
            &[&drop, &config.refund_batch_rows],
        )
        .await?;
    let mut done: Vec<Uuid> = Vec::with_capacity(rows.len());
    let mut members: Vec<Uuid> = Vec::with_capacity(rows.len());
    let mut unavailable = false;
    for row in &rows {
        let request = RefundRequest {
            charge_key: row.get("charge_key"),
            refund_id: row.get("purchase_id"),
            amount: row.get("amount"),
        };
        if state.engine.gateway().refund_amount(&request).await == RefundOutcome::Unavailable {
            unavailable = true;
            break;
        }
        pause_if_asked(config.refund_pause_after).await;
        done.push(request.refund_id);
        members.push(row.get("member_id"));
    }
    tx.execute(
        "UPDATE purchase_refunds SET refunded_at = $2 WHERE purchase_id = ANY($1) AND refunded_at IS NULL",
        &[&done, &now],
    )
    .await?;
    members.sort_unstable();
    members.dedup();
    let about = About {
        drop_id: Some(drop),
        ..About::default()
    };
    notify_members(&tx, Kind::CampaignUnfunded, &members, about).await?;
    tx.commit().await?;
    Ok(if unavailable {
        Batch::GatewayUnavailable(done.len())
    } else {
        Batch::Refunded(done.len())
    })
}

/// The test hook `CAMPAIGN_REFUND_PAUSE_AFTER`: after that many refunds answered by the gateway in this process,
/// the refunder stops for good right after the gateway's answer and before its record, holding its batch open, so
/// a test can SIGKILL the process in exactly that window. Off (`None`) unless set.
async fn pause_if_asked(pause_after: Option<u64>) {
    let answered = ANSWERED.fetch_add(1, Ordering::SeqCst) + 1;
    if pause_after.is_some_and(|limit| answered >= limit) {
        tracing::warn!(
            answered,
            "CAMPAIGN_REFUND_PAUSE_AFTER reached: refunds paused before their record"
        );
        std::future::pending::<()>().await;
    }
}

/// Marks the campaign done when every purchase has a refund row and every row is refunded. The close waited for
/// the sale to settle, so no purchase can come after this.
async fn finish_if_done(
    state: &AppState,
    drop: Uuid,
    now: DateTime<Utc>,
) -> Result<bool, ApiError> {
    let client = state.db.get().await?;
    let marked = client
        .execute(
            "UPDATE drops SET refunds_done_at = $2
             WHERE id = $1 AND refunds_done_at IS NULL
               AND NOT EXISTS (SELECT 1 FROM purchase_refunds r WHERE r.drop_id = $1 AND r.refunded_at IS NULL)
               AND NOT EXISTS (SELECT 1 FROM purchases p WHERE p.drop_id = $1
                   AND NOT EXISTS (SELECT 1 FROM purchase_refunds r WHERE r.purchase_id = p.id))",
            &[&drop, &now],
        )
        .await?;
    Ok(marked == 1)
}
