//! `GET /api/v1/drops/{id}/events`: a drop's state as server-sent events, `event: drop` with the body of
//! `GET /api/v1/drops/{id}` (the same wire type), at once on connect, on every change, and again as a heartbeat
//! when nothing changed for `heartbeat`.
//!
//! **One producer per drop and instance.** The first watcher of a drop starts a task that reads the drop's counts
//! every `poll_interval` and, when they (or the status) changed, serializes the drop once and stores it in a
//! `watch` channel. Every watcher holds a receiver: a change wakes them all, each sends the latest value it finds,
//! so a watcher that is slow to write skips to the newest state and never holds up the producer or the others (a
//! watch channel has no queue to fill). Changes are coalesced to at most one event per `poll_interval` (10 a
//! second at the default 100 ms). The producer ends at its first tick without watchers, under the map's lock, so a
//! new watcher either finds the running producer or starts the next one.
//!
//! Polling, rather than a change notification from the engine, keeps the engine untouched and makes every instance
//! stream the same counts on the Redis gate, where the counts live in Redis and change on any instance: each
//! instance's producer reads them from Redis (one call per drop per tick, whatever the number of watchers).

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::header::{HeaderName, HeaderValue};
use axum::response::sse::{Event, Sse};
use axum::response::IntoResponse;
use engine::core::Counts;
use engine::types::DropStatus;
use futures_util::stream::{self, Stream};
use parking_lot::Mutex;
use tokio::sync::watch;
use uuid::Uuid;

use super::streams::{StreamCaller, StreamPermit};
use crate::drops::DropJson;
use crate::error::ApiError;
use crate::extract::ApiPath;
use crate::AppState;

/// How long a client should wait before reconnecting after a stream ends (the SSE `retry:` field).
const RECONNECT_AFTER: Duration = Duration::from_secs(1);

/// A drop as last read by its producer: what decides "changed", and the event body, serialized once for every
/// watcher.
#[derive(Debug, Clone)]
pub struct DropSnapshot {
    pub counts: Counts,
    pub status: DropStatus,
    /// A queue drop's waiting and admitted members (the rate is not part of "changed").
    pub queue: Option<(u64, u64)>,
    pub json: Arc<str>,
}

impl DropSnapshot {
    fn of(info: engine::types::DropInfo) -> Result<Self, ApiError> {
        let (counts, status) = (info.counts, info.status);
        let queue = queue_of(&info);
        // Conservation, asserted where the stream reads the counts (and checked by the tests in every event).
        debug_assert_eq!(
            u64::from(counts.available) + u64::from(counts.held) + u64::from(counts.paid),
            u64::from(counts.stock)
        );
        let json = serde_json::to_string(&DropJson::from(info)).map_err(ApiError::internal)?;
        Ok(Self {
            counts,
            status,
            queue,
            json: json.into(),
        })
    }

    fn same_state(&self, info: &engine::types::DropInfo) -> bool {
        self.counts == info.counts && self.status == info.status && self.queue == queue_of(info)
    }
}

fn queue_of(info: &engine::types::DropInfo) -> Option<(u64, u64)> {
    info.queue.map(|queue| (queue.waiting, queue.admitted))
}

/// The producers of this instance: one `watch` channel per watched drop.
#[derive(Debug, Default)]
pub struct DropChannels {
    channels: Mutex<HashMap<Uuid, watch::Sender<DropSnapshot>>>,
}

impl DropChannels {
    /// Drops with a running producer.
    pub fn producers(&self) -> usize {
        self.channels.lock().len()
    }

    /// A receiver of the drop's state, starting its producer if none runs. Reads the drop first when no producer
    /// runs (404 for an unknown drop).
    pub async fn subscribe(
        &self,
        state: &AppState,
        drop: Uuid,
    ) -> Result<watch::Receiver<DropSnapshot>, ApiError> {
        if let Some(sender) = self.channels.lock().get(&drop) {
            return Ok(sender.subscribe());
        }
        let first = DropSnapshot::of(state.engine.drop_info(drop).await?)?;
        let mut channels = self.channels.lock();
        if let Some(sender) = channels.get(&drop) {
            return Ok(sender.subscribe());
        }
        let (sender, receiver) = watch::channel(first);
        channels.insert(drop, sender.clone());
        tokio::spawn(produce(state.clone(), drop, sender));
        Ok(receiver)
    }

    /// Removes the drop's channel when nobody watches it any more; returns whether it did. Under the map's lock, so a
    /// watcher that subscribes at the same moment finds either this channel before it goes or none at all.
    fn release_if_unwatched(&self, drop: Uuid, sender: &watch::Sender<DropSnapshot>) -> bool {
        let mut channels = self.channels.lock();
        if sender.receiver_count() > 0 {
            return false;
        }
        channels.remove(&drop);
        true
    }

    fn remove(&self, drop: Uuid) {
        self.channels.lock().remove(&drop);
    }
}

/// The producer of one drop: reads the counts every `poll_interval`, publishes when they changed, and ends when the
/// drop has no watcher left or the instance shuts down.
async fn produce(state: AppState, drop: Uuid, sender: watch::Sender<DropSnapshot>) {
    let live = &state.live;
    let mut ticker = tokio::time::interval(live.config.poll_interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker.tick().await;
    let mut stop = live.stop_signal();
    let mut failures: u32 = 0;
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = stop.changed() => {}
        }
        if *stop.borrow() {
            live.drops.remove(drop);
            return;
        }
        if live.drops.release_if_unwatched(drop, &sender) {
            return;
        }
        match state.engine.drop_info(drop).await {
            Ok(info) => {
                failures = 0;
                if sender.borrow().same_state(&info) {
                    continue;
                }
                match DropSnapshot::of(info) {
                    Ok(snapshot) => {
                        sender.send_replace(snapshot);
                    }
                    Err(err) => tracing::warn!(code = err.code(), %drop, "drop event not built"),
                }
            }
            // Watchers keep the last state (and its heartbeat) until the counts can be read again.
            Err(err) => {
                failures = failures.saturating_add(1);
                if failures == 1 || failures % 100 == 0 {
                    tracing::warn!(error = %err, %drop, failures, "drop producer cannot read the counts");
                }
            }
        }
    }
}

/// One watcher's side of the stream.
struct Watcher {
    receiver: watch::Receiver<DropSnapshot>,
    first: bool,
    heartbeat: Duration,
    ends_at: tokio::time::Instant,
    stop: watch::Receiver<bool>,
    _permit: StreamPermit,
}

impl Watcher {
    /// The next event: the current state at once on connect, then the latest on change or after `heartbeat`;
    /// `None` ends the stream (its time is up, the producer is gone, or the instance shuts down).
    async fn next(&mut self) -> Option<Event> {
        if self.first {
            self.first = false;
            return Some(self.event().retry(RECONNECT_AFTER));
        }
        if *self.stop.borrow() {
            return None;
        }
        tokio::select! {
            changed = self.receiver.changed() => changed.ok()?,
            () = tokio::time::sleep(self.heartbeat) => {}
            () = tokio::time::sleep_until(self.ends_at) => return None,
            _ = self.stop.changed() => return None,
        }
        Some(self.event())
    }

    fn event(&mut self) -> Event {
        let json = Arc::clone(&self.receiver.borrow_and_update().json);
        Event::default().event("drop").data(&*json)
    }
}

/// The event stream of one watcher, holding its permit until it ends.
pub fn watch_stream(
    receiver: watch::Receiver<DropSnapshot>,
    permit: StreamPermit,
    state: &AppState,
) -> impl Stream<Item = Result<Event, Infallible>> + Send + 'static {
    let config = state.live.config;
    let watcher = Watcher {
        receiver,
        first: true,
        heartbeat: config.heartbeat,
        ends_at: tokio::time::Instant::now() + config.stream_max,
        stop: state.live.stop_signal(),
        _permit: permit,
    };
    stream::unfold(watcher, |mut watcher| async move {
        let event = watcher.next().await?;
        Some((Ok(event), watcher))
    })
}

/// `GET /api/v1/drops/{id}/events`. Anyone may watch; a signed-in watcher (header or `?access_token=`) also counts
/// against the per-member cap.
#[utoipa::path(get, path = "/api/v1/drops/{id}/events", tag = "live", security((), ("bearer" = [])),
    params(("id" = Uuid, Path, description = "The drop"),
        ("access_token" = Option<String>, Query, description = "A token for clients that cannot set headers (EventSource)")),
    responses((status = 200, description = "`text/event-stream`: `event: drop` with the drop body (as `GET /drops/{id}`) \
at once, on every change (at most 10 a second) and at least every 5 s", content_type = "text/event-stream", body = String),
        (status = 401, description = "`invalid_token`: an `access_token` that is not valid", body = crate::error::ErrorBody),
        (status = 404, description = "`drop_not_found`", body = crate::error::ErrorBody),
        (status = 429, description = "`too_many_requests`: too many streams open; see `Retry-After`", body = crate::error::ErrorBody)))]
pub async fn drop_events(
    State(state): State<AppState>,
    ApiPath(drop): ApiPath<Uuid>,
    StreamCaller(caller): StreamCaller,
) -> Result<impl IntoResponse, ApiError> {
    let permit = state.live.streams.acquire(caller.map(|member| member.id))?;
    let receiver = state.live.drops.subscribe(&state, drop).await?;
    Ok(sse(watch_stream(receiver, permit, &state)))
}

/// An SSE response that proxies must not buffer.
pub fn sse<S>(stream: S) -> impl IntoResponse
where
    S: Stream<Item = Result<Event, Infallible>> + Send + 'static,
{
    (
        [(
            HeaderName::from_static("x-accel-buffering"),
            HeaderValue::from_static("no"),
        )],
        Sse::new(stream),
    )
}
