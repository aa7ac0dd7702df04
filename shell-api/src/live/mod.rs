//! Live (API.md, "Live" and the "Hearts" bullet of "Regular shop"): drop event streams over SSE, the live drop
//! page, hearts (the wishlist, which is also the subscription to a product's drops) and notifications.
//!
//! - `events.rs`: `GET /api/v1/drops/{id}/events`. One producer task per drop and instance reads the drop's counts
//!   every `LIVE_POLL_INTERVAL_MS` and publishes a change (already serialized) on a `watch` channel that every
//!   watcher of the drop reads: 10,000 watchers cost one read of the counts, and a slow watcher only ever skips to
//!   the latest state. The producer ends with its last watcher.
//! - `page.rs` (+ `page.html`, `page.css`, `page.js`): `GET /live/drops/{id}`, a page fed by that stream.
//! - `hearts.rs`: `PUT|DELETE /api/v1/products/{id}/heart`, `GET /api/v1/members/me/hearts`.
//! - `notifications.rs`: the notifier task (drop scheduled, opened, restocked; exactly once across instances by
//!   marker rows and unique indexes), `refund_decided`, the list, read marks and the notification stream.
//! - `streams.rs`: the caps on open streams (per instance, per member) and the `?access_token=` extractor that lets a
//!   browser's EventSource, which cannot set headers, sign in.

pub mod events;
pub mod hearts;
pub mod notifications;
pub mod page;
pub mod report_page;
pub mod streams;

use std::time::Duration;

use axum::routing::{get, post, put};
use clap::Args;
use tokio::sync::watch;

/// This module's part of the OpenAPI document (`crate::openapi`): every handler the router names.
#[derive(utoipa::OpenApi)]
#[openapi(paths(
    events::drop_events,
    page::live_page,
    page::asset,
    hearts::heart,
    hearts::unheart,
    hearts::my_hearts,
    notifications::list,
    notifications::mark_read,
    notifications::stream,
    report_page::report_page,
))]
pub struct Doc;

pub fn router() -> crate::Routes {
    crate::Routes::new()
        .route(api!("/drops/{id}/events"), get(events::drop_events))
        .route("/live/drops/{id}", get(page::live_page))
        .route("/live/drops/{id}/report", get(report_page::report_page))
        .route("/live/assets/{file}", get(page::asset))
        .route(
            api!("/products/{id}/heart"),
            put(hearts::heart).delete(hearts::unheart),
        )
        .route(api!("/members/me/hearts"), get(hearts::my_hearts))
        .route(api!("/members/me/notifications"), get(notifications::list))
        .route(
            api!("/members/me/notifications/read"),
            post(notifications::mark_read),
        )
        .route(
            api!("/members/me/notifications/stream"),
            get(notifications::stream),
        )
}

/// Limits and intervals of the live part (`LiveArgs` on the command line).
#[derive(Debug, Clone, Copy)]
pub struct LiveConfig {
    /// Event streams open at once on this instance.
    pub streams_max: usize,
    /// Event streams one member may keep open on this instance.
    pub streams_per_member_max: usize,
    /// Longest life of one stream; the client reconnects after it.
    pub stream_max: Duration,
    /// How often a drop's producer reads the counts; also the shortest gap between two drop events (at most
    /// 1 s / poll_interval events a second).
    pub poll_interval: Duration,
    /// Longest gap between two drop events: the heartbeat, which is the current drop again.
    pub heartbeat: Duration,
    /// How often the notifier runs.
    pub notify_interval: Duration,
    /// Units coming back to a sold-out drop within this long of the last restock notice do not notify again.
    pub restock_window: Duration,
}

impl Default for LiveConfig {
    /// The command line's defaults.
    fn default() -> Self {
        Self {
            streams_max: 20_000,
            streams_per_member_max: 8,
            stream_max: Duration::from_secs(600),
            poll_interval: Duration::from_millis(100),
            heartbeat: Duration::from_secs(5),
            notify_interval: Duration::from_millis(500),
            restock_window: Duration::from_secs(60),
        }
    }
}

/// The live part's state in one instance: the stream caps, the drops' producers, the notification subscribers.
pub struct Live {
    pub config: LiveConfig,
    pub streams: std::sync::Arc<streams::StreamCounter>,
    pub drops: events::DropChannels,
    pub notices: notifications::Subscribers,
    shutdown: watch::Sender<bool>,
}

impl std::fmt::Debug for Live {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Live")
            .field("config", &self.config)
            .field("streams_open", &self.streams.open())
            .finish_non_exhaustive()
    }
}

impl Live {
    pub fn new(config: LiveConfig) -> Self {
        Self {
            config,
            streams: std::sync::Arc::new(streams::StreamCounter::new(
                config.streams_max,
                config.streams_per_member_max,
            )),
            drops: events::DropChannels::default(),
            notices: notifications::Subscribers::default(),
            shutdown: watch::channel(false).0,
        }
    }

    /// Ends every stream and producer (graceful shutdown: streams never end by themselves).
    pub fn shutdown(&self) {
        self.shutdown.send_replace(true);
    }

    /// A receiver that turns `true` on `shutdown`, for a stream to hold and wait on.
    pub fn stop_signal(&self) -> watch::Receiver<bool> {
        self.shutdown.subscribe()
    }

    /// Completes when `shutdown` was called.
    pub fn stopped(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut stop = self.shutdown.subscribe();
        async move {
            let _ = stop.wait_for(|stop| *stop).await;
        }
    }
}

impl From<&LiveArgs> for LiveConfig {
    fn from(args: &LiveArgs) -> Self {
        use std::time::Duration;
        Self {
            streams_max: args.live_streams_max,
            streams_per_member_max: args.live_streams_per_member_max,
            stream_max: Duration::from_secs(args.live_stream_max_seconds.max(1)),
            poll_interval: Duration::from_millis(args.live_poll_interval_ms.max(10)),
            notify_interval: Duration::from_millis(args.live_notify_interval_ms.max(10)),
            restock_window: Duration::from_secs(args.live_restock_window_seconds),
            ..Self::default()
        }
    }
}

/// Limits of the live part: event streams (drop events, notifications) and the notifier.
#[derive(Debug, Clone, Args)]
pub struct LiveArgs {
    /// Event streams (drop events and notification streams) this instance keeps open at once; past it, 429 with
    /// Retry-After.
    #[arg(long, env = "LIVE_STREAMS_MAX", default_value_t = 20_000)]
    pub live_streams_max: usize,
    /// Event streams one signed-in member may keep open on this instance; past it, 429 with Retry-After.
    #[arg(long, env = "LIVE_STREAMS_PER_MEMBER_MAX", default_value_t = 8)]
    pub live_streams_per_member_max: usize,
    /// Longest life of one event stream; then it ends and the browser's EventSource reconnects (the token is
    /// checked again and the current state sent at once), so dead or revoked streams never stay.
    #[arg(long, env = "LIVE_STREAM_MAX_SECONDS", default_value_t = 600)]
    pub live_stream_max_seconds: u64,
    /// How often a drop's producer reads its counts (one read per drop, whatever the number of watchers).
    #[arg(long, env = "LIVE_POLL_INTERVAL_MS", default_value_t = 100)]
    pub live_poll_interval_ms: u64,
    /// How often the notifier looks for drops scheduled, opened or restocked, and for new notifications of
    /// members with an open notification stream.
    #[arg(long, env = "LIVE_NOTIFY_INTERVAL_MS", default_value_t = 500)]
    pub live_notify_interval_ms: u64,
    /// A restock burst: units that come back to a sold-out drop within this long of the last restock
    /// notification do not notify again.
    #[arg(long, env = "LIVE_RESTOCK_WINDOW_SECONDS", default_value_t = 60)]
    pub live_restock_window_seconds: u64,
}
