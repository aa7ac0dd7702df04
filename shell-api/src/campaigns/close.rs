//! The campaign loop every instance runs: tell the buyers of newly funded campaigns, decide each campaign due at
//! `closes_at`, and refund the purchases of the unfunded ones (`refunds.rs`).
//!
//! A campaign is decided once its sale is settled: `closes_at` has passed and no hold is left that could still
//! be paid (the gate's `held` counts `held` and `paying` holds). From then its stored `sold` is final, so the
//! outcome is the one its counts show (`drops::campaign_state`). The decision is one conditional UPDATE
//! (`campaign_closed_at IS NULL`): whichever instances run the loop, one wins each campaign, and the others find
//! it decided. A funded campaign's buyers are told `campaign_funded` in the transaction that marks them told (and
//! again at the close, for later buyers: the unique index makes it once per buyer); an unfunded one's buyers are
//! told `campaign_unfunded` with their refund.

use chrono::{DateTime, Utc};
use deadpool_postgres::GenericClient;
use uuid::Uuid;

use crate::error::ApiError;
use crate::notify::{notify_members, About, Kind};
use crate::AppState;

/// Runs the campaign loop until shutdown: every `CampaignConfig::tick`, `tick`.
pub async fn campaigns_forever(state: AppState) {
    let mut ticker = tokio::time::interval(state.settings.campaigns.tick);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let stopped = state.live.stopped();
    tokio::pin!(stopped);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            () = &mut stopped => return,
        }
        if let Err(err) = tick(&state).await {
            tracing::warn!(code = err.code(), "campaign pass failed");
        }
    }
}

/// What one pass did, for tests and logs.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Pass {
    /// Campaigns whose buyers this pass told `campaign_funded`.
    pub funded_notified: usize,
    /// Campaigns this pass decided funded at their close.
    pub closed_funded: usize,
    /// Campaigns this pass decided unfunded.
    pub closed_unfunded: usize,
    /// Purchases this pass refunded.
    pub refunded: usize,
}

/// One pass at the engine's time.
pub async fn tick(state: &AppState) -> Result<Pass, ApiError> {
    let now = state.engine.now();
    let mut pass = Pass {
        funded_notified: notify_funded(state, now).await?,
        ..Pass::default()
    };
    for drop in due(state, now).await? {
        match close_one(state, drop, now).await? {
            Some(Outcome::Funded) => pass.closed_funded += 1,
            Some(Outcome::Unfunded) => pass.closed_unfunded += 1,
            None => {}
        }
    }
    pass.refunded = super::refunds::refund_unfunded(state, now).await?;
    Ok(pass)
}

/// How a close decided a campaign.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Funded,
    Unfunded,
}

/// The buyers of a drop, each once.
pub(crate) async fn buyers(client: &impl GenericClient, drop: Uuid) -> Result<Vec<Uuid>, ApiError> {
    Ok(client
        .query(
            "SELECT DISTINCT member_id FROM purchases WHERE drop_id = $1",
            &[&drop],
        )
        .await?
        .iter()
        .map(|row| row.get(0))
        .collect())
}

/// Tells the buyers of every campaign funded since the last pass; returns how many campaigns.
async fn notify_funded(state: &AppState, now: DateTime<Utc>) -> Result<usize, ApiError> {
    let mut client = state.db.get().await?;
    let tx = client.transaction().await?;
    let funded: Vec<Uuid> = tx
        .query(
            "UPDATE drops SET funded_notified_at = $1
             WHERE campaign = 'funded' AND funded_notified_at IS NULL RETURNING id",
            &[&now],
        )
        .await?
        .iter()
        .map(|row| row.get(0))
        .collect();
    for &drop in &funded {
        let members = buyers(&tx, drop).await?;
        notify_members(&tx, Kind::CampaignFunded, &members, about(drop)).await?;
    }
    tx.commit().await?;
    Ok(funded.len())
}

fn about(drop: Uuid) -> About {
    About {
        drop_id: Some(drop),
        ..About::default()
    }
}

/// Campaigns past `closes_at` and not decided yet.
async fn due(state: &AppState, now: DateTime<Utc>) -> Result<Vec<Uuid>, ApiError> {
    let client = state.db.get().await?;
    Ok(client
        .query(
            "SELECT id FROM drops
             WHERE campaign IS NOT NULL AND campaign_closed_at IS NULL AND closes_at <= $1",
            &[&now],
        )
        .await?
        .iter()
        .map(|row| row.get(0))
        .collect())
}

/// Decides one campaign if its sale is settled and nobody has: returns the outcome when this call decided it.
pub async fn close_one(
    state: &AppState,
    drop: Uuid,
    now: DateTime<Utc>,
) -> Result<Option<Outcome>, ApiError> {
    let info = state.engine.drop_info(drop).await?;
    if info.counts.held > 0 {
        // A hold taken before the close may still be paid: its units could fund the campaign.
        return Ok(None);
    }
    let mut client = state.db.get().await?;
    let tx = client.transaction().await?;
    let Some(row) = tx
        .query_opt(
            "UPDATE drops
             SET campaign = CASE WHEN campaign = 'funded' OR sold >= goal_units THEN 'funded' ELSE 'unfunded' END,
                 campaign_closed_at = $2
             WHERE id = $1 AND campaign IS NOT NULL AND campaign_closed_at IS NULL AND closes_at <= $2
             RETURNING campaign, sold",
            &[&drop, &now],
        )
        .await?
    else {
        return Ok(None);
    };
    let outcome = if row.get::<_, String>("campaign") == "funded" {
        // Every buyer, later ones included, is told once (the unique index drops the repeats).
        let members = buyers(&tx, drop).await?;
        notify_members(&tx, Kind::CampaignFunded, &members, about(drop)).await?;
        Outcome::Funded
    } else {
        Outcome::Unfunded
    };
    tx.commit().await?;
    tracing::info!(%drop, ?outcome, sold = row.get::<_, i32>("sold"), "campaign closed");
    Ok(Some(outcome))
}
