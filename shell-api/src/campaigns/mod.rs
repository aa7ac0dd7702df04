//! Preorder campaigns and fulfilment (API.md, "Preorder campaigns and fulfilment"; DESIGN.md guarantee 13): the
//! close that decides each campaign once (`close.rs`), the refunds of an unfunded one, each exactly once
//! (`refunds.rs`), and fulfilment, the drop's purchases for its seller and its shipments (`fulfilment.rs`).
//!
//! A campaign is a drop with `goal_units` (created and rendered by `drops`, whose `campaign_state` reads its
//! state from its counts). It may import `drops` (the purchase as read, `drops::purchases`).

pub mod close;
pub mod fulfilment;
pub mod refunds;

use std::time::Duration;

use axum::routing::{get, post};
use clap::Args;

/// This module's part of the OpenAPI document (`crate::openapi`).
#[derive(utoipa::OpenApi)]
#[openapi(
    paths(fulfilment::drop_purchases, fulfilment::ship, fulfilment::get_purchase),
    tags((name = "campaigns", description = "Preorder campaigns: supporters, shipments and purchases"))
)]
pub struct Doc;

pub fn router() -> crate::Routes {
    crate::Routes::new()
        .route(
            api!("/drops/{id}/purchases"),
            get(fulfilment::drop_purchases),
        )
        .route(api!("/drops/{id}/shipments"), post(fulfilment::ship))
        .route(api!("/purchases/{id}"), get(fulfilment::get_purchase))
}

/// How the campaign loop runs (`CampaignArgs` on the command line).
#[derive(Debug, Clone, Copy)]
pub struct CampaignConfig {
    /// How often every instance runs the campaign loop: a campaign is decided within about this long of its
    /// sale settling.
    pub tick: Duration,
    /// Refunds one transaction takes, asks the gateway for and records.
    pub refund_batch_rows: i64,
    /// Test hook: pause the refunder for good after this many gateway answers in this process (see
    /// `refunds::pause_if_asked`). `None` in every real deployment.
    pub refund_pause_after: Option<u64>,
}

impl Default for CampaignConfig {
    /// The command line's defaults.
    fn default() -> Self {
        Self {
            tick: Duration::from_millis(500),
            refund_batch_rows: 100,
            refund_pause_after: None,
        }
    }
}

impl From<&CampaignArgs> for CampaignConfig {
    fn from(args: &CampaignArgs) -> Self {
        Self {
            tick: Duration::from_millis(args.campaign_tick_ms.max(10)),
            refund_batch_rows: i64::try_from(args.campaign_refund_batch_rows.clamp(1, 1_000))
                .unwrap_or(100),
            refund_pause_after: args.campaign_refund_pause_after,
        }
    }
}

/// The campaign loop's settings.
#[derive(Debug, Clone, Args)]
pub struct CampaignArgs {
    /// How often every instance looks for campaigns to decide and purchases to refund, in milliseconds.
    #[arg(long, env = "CAMPAIGN_TICK_MS", default_value_t = 500)]
    pub campaign_tick_ms: u64,
    /// Refunds of an unfunded campaign taken, refunded and recorded per transaction (1..=1000).
    #[arg(long, env = "CAMPAIGN_REFUND_BATCH_ROWS", default_value_t = 100)]
    pub campaign_refund_batch_rows: usize,
    /// Test hook, never for production: after this many refunds answered by the gateway, the refunder stops for
    /// good between the gateway's answer and its record, so a crash test can kill the process in that window.
    #[arg(long, env = "CAMPAIGN_REFUND_PAUSE_AFTER")]
    pub campaign_refund_pause_after: Option<u64>,
}
