//! Notifications (API.md, "Live"): what a member is told, stored in Postgres, listed, marked read, and streamed.
//!
//! **Who is told what.** Hearts are the subscription: the members who hearted a product are told when a drop of it
//! is scheduled (`drop_scheduled`), when it opens (`drop_open`) and when units come back to it while it was sold out
//! (`restock`); the followers of the product's store are told the first two as well (once, if they also hearted
//! it); a buyer is told when a refund is decided (`refund_decided`, written by `refund_decided` from the
//! refund's code).
//!
//! **Exactly once across instances.** Every instance runs the notifier (`notify_forever`). For drop_scheduled and
//! drop_open it inserts a marker row per drop (`drop_notices`, ON CONFLICT DO NOTHING RETURNING) and, in the same
//! transaction, one notification per hearting member: only the instance whose marker insert returned a row writes
//! them, a second instance's insert waits for the first's commit and then does nothing, and a crash rolls back both.
//! The unique indexes on notifications say the same once more. A restock is seen by whichever instances have the
//! drop loaded (with the Redis gate they all read the same counts): the drop went from `available == 0` to
//! `available > 0` between two looks. It starts a burst only if the drop's last burst (`drop_restocks`, one row
//! per drop, decided by one conditional upsert) began more than `restock_window` ago, so a member gets one restock
//! notification per drop per burst, not one per unit and not one per instance.
//!
//! **The stream sees every instance's notifications.** Rather than LISTEN/NOTIFY (a dedicated connection per
//! instance, and one query per notified member on a big drop_open), the notifier reads, on each tick and only while
//! someone is connected, the new rows of the members with an open stream on this instance: one query per tick,
//! `member_id = ANY(connected) AND created_at > last poll - overlap`. The overlap (5 s) re-reads recent rows so that a
//! transaction that committed up to that late is not missed; rows already delivered are skipped by id. (A row whose
//! transaction took longer than the overlap reaches the list but not the open streams.) Each member's streams
//! share a bounded broadcast channel; a stream that falls behind skips what it missed (the list has everything).

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::IntoResponse;
use axum::Json;
use chrono::{DateTime, Utc};
use deadpool_postgres::GenericClient;
use futures_util::stream;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;
use tokio_postgres::Row;
use uuid::Uuid;

use super::streams::{StreamCaller, StreamPermit};
use crate::auth::AuthMember;
use crate::error::ApiError;
use crate::extract::{ApiJson, ApiQuery};
use crate::notify::Kind;
use crate::pagination::{Page, PageQuery};
use crate::AppState;

/// How far back each delivery poll re-reads, so a row whose transaction committed after a later one is not missed.
const DELIVERY_OVERLAP: Duration = Duration::from_secs(5);
/// Notifications a member's stream may fall behind by before it skips.
const MEMBER_CHANNEL_CAPACITY: usize = 64;
/// Drops announced per kind and notifier tick (bounds one transaction; the rest follow on the next tick).
const ANNOUNCE_DROPS_MAX: i64 = 100;

/// A notification on the wire.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct NotificationJson {
    pub id: Uuid,
    /// `drop_scheduled`, `drop_open`, `restock`, `refund_decided`, `draw_won`, `draw_lost`, `campaign_funded`,
    /// `campaign_unfunded`, `shipped`, `subscription_renewed`, `subscription_payment_failed` or
    /// `subscription_changed`.
    #[schema(example = "drop_open")]
    pub kind: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub drop_id: Option<Uuid>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub product_id: Option<Uuid>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refund_id: Option<Uuid>,
    /// The purchase a `shipped` notification is about.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub purchase_id: Option<Uuid>,
    /// The subscription a `subscription_*` notification is about.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subscription_id: Option<Uuid>,
    pub read: bool,
    pub created_at: DateTime<Utc>,
}

const NOTIFICATION_COLUMNS: &str =
    "id, kind, drop_id, product_id, refund_id, read, created_at, member_id, purchase_id, subscription_id";

impl NotificationJson {
    /// From a row selected with `NOTIFICATION_COLUMNS`.
    fn from_row(row: &Row) -> Self {
        Self {
            id: row.get(0),
            kind: row.get(1),
            drop_id: row.get(2),
            product_id: row.get(3),
            refund_id: row.get(4),
            read: row.get(5),
            created_at: row.get(6),
            purchase_id: row.get(8),
            subscription_id: row.get(9),
        }
    }
}

/// `GET /members/me/notifications`: a page, newest first, with my unread count.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct NotificationPage {
    pub items: Vec<NotificationJson>,
    pub next_cursor: Option<String>,
    pub unread: i64,
}

#[utoipa::path(get, path = "/api/v1/members/me/notifications", tag = "live", security(("bearer" = [])),
    params(crate::pagination::PageParams),
    responses((status = 200, description = "A page of my notifications, newest first, with my unread count",
        body = NotificationPage)))]
pub async fn list(
    State(state): State<AppState>,
    member: AuthMember,
    ApiQuery(page): ApiQuery<PageQuery>,
) -> Result<Json<NotificationPage>, ApiError> {
    let limit = page.limit()?;
    let after: Option<Uuid> = page.after()?;
    let client = state.db.get().await?;
    let rows = client
        .query(
            &format!(
                "SELECT {NOTIFICATION_COLUMNS} FROM notifications
                 WHERE member_id = $1 AND ($2::uuid IS NULL OR id < $2)
                 ORDER BY id DESC LIMIT $3"
            ),
            &[&member.id, &after, &(limit + 1)],
        )
        .await?;
    let unread: i64 = client
        .query_one(
            "SELECT count(*) FROM notifications WHERE member_id = $1 AND NOT read",
            &[&member.id],
        )
        .await?
        .get(0);
    let page = Page::from_rows(
        rows.iter().map(NotificationJson::from_row).collect(),
        limit,
        |item| item.id,
    );
    Ok(Json(NotificationPage {
        items: page.items,
        next_cursor: page.next_cursor,
        unread,
    }))
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReadBody {
    up_to: Uuid,
}

/// `POST /members/me/notifications/read {up_to}`: my notifications up to and including that id are read (ids
/// are UUID v7, so "up to" is "created no later than").
#[utoipa::path(post, path = "/api/v1/members/me/notifications/read", tag = "live", security(("bearer" = [])),
    request_body = ReadBody,
    responses((status = 204, description = "Read up to that id")))]
pub async fn mark_read(
    State(state): State<AppState>,
    member: AuthMember,
    ApiJson(body): ApiJson<ReadBody>,
) -> Result<StatusCode, ApiError> {
    let client = state.db.get().await?;
    client
        .execute(
            "UPDATE notifications SET read = true WHERE member_id = $1 AND id <= $2 AND NOT read",
            &[&member.id, &body.up_to],
        )
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Tells `member` that the refund `refund` was decided; returns whether a notification was written (once per
/// member and refund, so calling it again, or from another instance, writes nothing). Call it in the transaction
/// that decides the refund, so the notification exists exactly when the decision does.
pub async fn refund_decided(
    client: &impl GenericClient,
    member: Uuid,
    refund: Uuid,
) -> Result<bool, ApiError> {
    let written = client
        .execute(
            "INSERT INTO notifications (id, member_id, kind, refund_id) VALUES ($1, $2, 'refund_decided', $3)
             ON CONFLICT DO NOTHING",
            &[&Uuid::now_v7(), &member, &refund],
        )
        .await?;
    Ok(written == 1)
}

/// One notification per member who hearted `product`, and for drop_scheduled and drop_open also per member who
/// follows its store (API.md, "Stores"). The UNION makes a member who does both one recipient, and ON CONFLICT DO
/// NOTHING with the unique indexes keeps each kind once per member and drop, or burst. Returns how many were
/// written. The store follows are read as SQL (`store_follows` joined through `products.store_id`), so `live` does
/// not import the `stores` area.
async fn notify_hearts(
    tx: &impl GenericClient,
    kind: Kind,
    drop: Uuid,
    product: Uuid,
    burst: Option<Uuid>,
) -> Result<u64, ApiError> {
    let followers_too = matches!(kind, Kind::DropScheduled | Kind::DropOpen);
    let members: Vec<Uuid> = tx
        .query(
            "SELECT member_id FROM product_hearts WHERE product_id = $1
             UNION
             SELECT f.member_id FROM store_follows f JOIN products p ON p.store_id = f.store_id
             WHERE p.id = $1 AND $2",
            &[&product, &followers_too],
        )
        .await?
        .iter()
        .map(|row| row.get(0))
        .collect();
    if members.is_empty() {
        return Ok(0);
    }
    let ids: Vec<Uuid> = members.iter().map(|_| Uuid::now_v7()).collect();
    let written = tx
        .execute(
            "INSERT INTO notifications (id, member_id, kind, drop_id, product_id, burst_id)
             SELECT id, member_id, $3, $4, $5, $6 FROM UNNEST($1::uuid[], $2::uuid[]) AS t (id, member_id)
             ON CONFLICT DO NOTHING",
            &[&ids, &members, &kind.as_str(), &drop, &product, &burst],
        )
        .await?;
    Ok(written)
}

/// Announces drops newly scheduled (created within the last hour) or newly open (opened within the last hour and not
/// closed) to the members who hearted their product, exactly once per drop: the marker row and the notifications
/// commit together. Returns how many drops this instance announced.
async fn announce(client: &mut deadpool_postgres::Client, kind: Kind) -> Result<usize, ApiError> {
    let condition = match kind {
        Kind::DropScheduled => "d.created_at > now() - interval '1 hour'",
        Kind::DropOpen => {
            "d.opens_at <= now() AND d.opens_at > now() - interval '1 hour'
             AND (d.closes_at IS NULL OR d.closes_at > now())"
        }
        _ => return Ok(0),
    };
    let tx = client.transaction().await?;
    let rows = tx
        .query(
            &format!(
                "WITH marked AS (
                     INSERT INTO drop_notices (drop_id, kind)
                     SELECT d.id, $1 FROM drops d
                     WHERE {condition}
                       AND NOT EXISTS (SELECT 1 FROM drop_notices n WHERE n.drop_id = d.id AND n.kind = $1)
                     LIMIT $2
                     ON CONFLICT DO NOTHING RETURNING drop_id
                 )
                 SELECT d.id, d.product_id FROM marked JOIN drops d ON d.id = marked.drop_id"
            ),
            &[&kind.as_str(), &ANNOUNCE_DROPS_MAX],
        )
        .await?;
    for row in &rows {
        notify_hearts(&tx, kind, row.get(0), row.get(1), None).await?;
    }
    tx.commit().await?;
    Ok(rows.len())
}

/// Starts a restock burst of `drop` unless one began within `window`; when it does, notifies the product's hearts
/// in the same transaction. Returns whether this call started a burst.
async fn restock(
    client: &mut deadpool_postgres::Client,
    drop: Uuid,
    product: Uuid,
    window: Duration,
) -> Result<bool, ApiError> {
    let tx = client.transaction().await?;
    let burst = Uuid::now_v7();
    let started = tx
        .query_opt(
            "INSERT INTO drop_restocks (drop_id, burst_id, at) VALUES ($1, $2, now())
             ON CONFLICT (drop_id) DO UPDATE SET burst_id = EXCLUDED.burst_id, at = EXCLUDED.at
             WHERE drop_restocks.at <= now() - make_interval(secs => $3)
             RETURNING burst_id",
            &[&drop, &burst, &window.as_secs_f64()],
        )
        .await?
        .is_some();
    if started {
        notify_hearts(&tx, Kind::Restock, drop, product, Some(burst)).await?;
    }
    tx.commit().await?;
    Ok(started)
}

/// What the notifier remembers between ticks: the last `available` seen of each watched drop.
#[derive(Debug, Default)]
struct Watch {
    available: HashMap<Uuid, u32>,
}

/// Looks at the open drops of hearted products that this instance has loaded: a drop seen sold out last time and
/// with units available now was restocked.
async fn look_for_restocks(state: &AppState, seen: &mut Watch) -> Result<usize, ApiError> {
    let mut client = state.db.get().await?;
    let candidates: Vec<(Uuid, Uuid)> = client
        .query(
            "SELECT d.id, d.product_id FROM drops d JOIN products p ON p.id = d.product_id
             WHERE d.opens_at <= now() AND d.opens_at > now() - interval '7 days'
               AND (d.closes_at IS NULL OR d.closes_at > now()) AND p.heart_count > 0",
            &[],
        )
        .await?
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .filter(|(drop, _)| state.engine.is_loaded(*drop))
        .collect();
    let mut available = HashMap::with_capacity(candidates.len());
    let mut started = 0;
    for (drop, product) in candidates {
        let Ok(info) = state.engine.drop_info(drop).await else {
            continue;
        };
        let now = info.counts.available;
        if seen.available.get(&drop) == Some(&0)
            && now > 0
            && restock(&mut client, drop, product, state.live.config.restock_window).await?
        {
            started += 1;
        }
        available.insert(drop, now);
    }
    seen.available = available;
    Ok(started)
}

/// Runs the notifier every `notify_interval` until the instance shuts down: announces scheduled and opened drops,
/// looks for restocks, and delivers new notifications to this instance's streams.
pub async fn notify_forever(state: AppState) {
    let mut ticker = tokio::time::interval(state.live.config.notify_interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let stopped = state.live.stopped();
    tokio::pin!(stopped);
    let mut seen = Watch::default();
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            () = &mut stopped => return,
        }
        if let Err(err) = notify_once(&state, &mut seen).await {
            tracing::warn!(code = err.code(), "notifier pass failed");
        }
    }
}

async fn notify_once(state: &AppState, seen: &mut Watch) -> Result<(), ApiError> {
    {
        let mut client = state.db.get().await?;
        announce(&mut client, Kind::DropScheduled).await?;
        announce(&mut client, Kind::DropOpen).await?;
    }
    look_for_restocks(state, seen).await?;
    state.live.notices.deliver(state).await
}

/// The notification streams open on this instance, by member, and what the delivery poll has seen.
#[derive(Debug, Default)]
pub struct Subscribers {
    members: Mutex<HashMap<Uuid, broadcast::Sender<Arc<NotificationJson>>>>,
    delivered: Mutex<Delivered>,
}

#[derive(Debug, Default)]
struct Delivered {
    /// The newest `created_at` read; the next poll reads from `DELIVERY_OVERLAP` before it.
    high_water: Option<DateTime<Utc>>,
    /// Ids delivered within the overlap, so a re-read row is not sent twice.
    ids: HashMap<Uuid, DateTime<Utc>>,
}

impl Subscribers {
    fn subscribe(&self, member: Uuid) -> broadcast::Receiver<Arc<NotificationJson>> {
        self.members
            .lock()
            .entry(member)
            .or_insert_with(|| broadcast::channel(MEMBER_CHANNEL_CAPACITY).0)
            .subscribe()
    }

    /// Reads the new notifications of the members with an open stream here and hands each to their streams.
    async fn deliver(&self, state: &AppState) -> Result<(), ApiError> {
        let members: Vec<Uuid> = {
            let mut map = self.members.lock();
            map.retain(|_, sender| sender.receiver_count() > 0);
            map.keys().copied().collect()
        };
        if members.is_empty() {
            *self.delivered.lock() = Delivered::default();
            return Ok(());
        }
        let overlap = chrono::Duration::from_std(DELIVERY_OVERLAP).unwrap_or_default();
        let since = self.delivered.lock().high_water.unwrap_or_else(Utc::now) - overlap;
        // The next poll starts from here even when no row came, so each poll reads about one tick plus the overlap.
        let polled_at = Utc::now();
        let client = state.db.get().await?;
        let rows = client
            .query(
                &format!(
                    "SELECT {NOTIFICATION_COLUMNS} FROM notifications
                     WHERE member_id = ANY($1) AND created_at > $2 ORDER BY id"
                ),
                &[&members, &since],
            )
            .await?;
        let mut delivered = self.delivered.lock();
        let map = self.members.lock();
        for row in &rows {
            let notification = NotificationJson::from_row(row);
            let member: Uuid = row.get(7);
            delivered.high_water =
                Some(delivered.high_water.map_or(notification.created_at, |at| {
                    at.max(notification.created_at)
                }));
            if delivered
                .ids
                .insert(notification.id, notification.created_at)
                .is_some()
            {
                continue;
            }
            if let Some(sender) = map.get(&member) {
                // No receiver left is fine: the member went away since the poll began.
                let _ = sender.send(Arc::new(notification));
            }
        }
        delivered.high_water = Some(
            delivered
                .high_water
                .map_or(polled_at, |at| at.max(polled_at)),
        );
        delivered.ids.retain(|_, at| *at > since);
        Ok(())
    }
}

/// One stream's side: new notifications of its member created since it connected.
struct Listener {
    receiver: broadcast::Receiver<Arc<NotificationJson>>,
    since: DateTime<Utc>,
    ends_at: tokio::time::Instant,
    stop: tokio::sync::watch::Receiver<bool>,
    _permit: StreamPermit,
}

impl Listener {
    async fn next(&mut self) -> Option<Event> {
        loop {
            if *self.stop.borrow() {
                return None;
            }
            let notification = tokio::select! {
                received = self.receiver.recv() => match received {
                    Ok(notification) => notification,
                    Err(broadcast::error::RecvError::Lagged(skipped)) => {
                        tracing::debug!(skipped, "a notification stream fell behind and skipped");
                        continue;
                    }
                    Err(broadcast::error::RecvError::Closed) => return None,
                },
                () = tokio::time::sleep_until(self.ends_at) => return None,
                _ = self.stop.changed() => return None,
            };
            if notification.created_at < self.since {
                continue;
            }
            let Ok(json) = serde_json::to_string(&*notification) else {
                continue;
            };
            return Some(
                Event::default()
                    .event("notification")
                    .id(notification.id.to_string())
                    .data(json),
            );
        }
    }
}

/// `GET /members/me/notifications/stream` (auth by header or `?access_token=`): `event: notification` for each new
/// one, and a comment every heartbeat so dead connections are found.
#[utoipa::path(get, path = "/api/v1/members/me/notifications/stream", tag = "live",
    security(("bearer" = [])),
    params(("access_token" = Option<String>, Query,
        description = "The token instead of the header, for EventSource (which cannot set headers)")),
    responses((status = 200, description = "`text/event-stream`: `event: notification` with each new one \
(as in the list), and a comment every heartbeat", content_type = "text/event-stream", body = String),
        (status = 401, description = "`unauthorized`: no token, or `invalid_token`", body = crate::error::ErrorBody),
        (status = 429, description = "`too_many_requests`: too many streams open; see `Retry-After`", body = crate::error::ErrorBody)))]
pub async fn stream(
    State(state): State<AppState>,
    StreamCaller(caller): StreamCaller,
) -> Result<impl IntoResponse, ApiError> {
    let member =
        caller.ok_or_else(|| ApiError::unauthorized("unauthorized", "missing bearer token"))?;
    let permit = state.live.streams.acquire(Some(member.id))?;
    let config = state.live.config;
    let listener = Listener {
        receiver: state.live.notices.subscribe(member.id),
        since: Utc::now(),
        ends_at: tokio::time::Instant::now() + config.stream_max,
        stop: state.live.stop_signal(),
        _permit: permit,
    };
    let events = stream::unfold(listener, |mut listener| async move {
        let event = listener.next().await?;
        Some((Ok::<_, Infallible>(event), listener))
    });
    Ok((
        [(
            axum::http::header::HeaderName::from_static("x-accel-buffering"),
            axum::http::HeaderValue::from_static("no"),
        )],
        Sse::new(events).keep_alive(KeepAlive::new().interval(config.heartbeat)),
    ))
}
