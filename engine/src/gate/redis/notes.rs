//! Wake-ups on activity instead of a timer per drop: every script that moves a drop's stream or stock PUBLISHes a
//! note (`prelude.lua`'s `note`), each instance keeps one subscription to `<prefix>notes`, and a note wakes only the
//! drop it names: its journal reads, its sold-out flag follows the available units the note carries, its reaper pass
//! and its claim of entries a dead instance left pending are scheduled. A drop nobody touches costs no Redis call.
//!
//! Pub/sub is not durable, so two sweeps cover what a note could miss: every (re)subscription sweeps every drop at
//! once (notes sent while no subscription was up are lost), and a slow backstop sweeps a few drops a second in turn
//! (`sweep_lanes_per_second`, each drop at least every `sweep_period_min`), so its cost does not grow with the
//! number of drops. A sweep of a drop is what a note does plus one read of its available units.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use redis::Value;
use uuid::Uuid;

use super::codec::COUNTERS;
use super::lanes::Lane;
use super::{GateResult, Inner};

/// How often an idle subscription is pinged, so a connection that died without a word is noticed and replaced (and
/// its lost notes swept).
const PING_INTERVAL: Duration = Duration::from_secs(5);
/// The longest wait before subscribing again after a failure.
const RETRY_MAX: Duration = Duration::from_secs(2);
/// How often the backstop sweep takes its next drops.
const SWEEP_TICK: Duration = Duration::from_secs(1);

/// One note as published: the drop, what happened, and the available units after it when the script knew them.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Note {
    pub(super) drop: Uuid,
    pub(super) kind: u8,
    pub(super) available: Option<i64>,
}

impl Note {
    /// Parses `<drop>:<kind>:<available or ->`; `None` for anything else.
    pub(super) fn parse(payload: &[u8]) -> Option<Self> {
        let text = std::str::from_utf8(payload).ok()?;
        let mut parts = text.split(':');
        let drop = Uuid::try_parse(parts.next()?).ok()?;
        let kind = *parts.next()?.as_bytes().first()?;
        let available = match parts.next()? {
            "-" => None,
            units => Some(units.parse().ok()?),
        };
        parts.next().is_none().then_some(Self {
            drop,
            kind,
            available,
        })
    }
}

impl Inner {
    /// Milliseconds since this gate started: the clock of lane deadlines (`reap_due_ms`, `claim_at_ms`), which only
    /// order this instance's own work.
    pub(super) fn local_ms(&self) -> i64 {
        i64::try_from(self.started.elapsed().as_millis()).unwrap_or(i64::MAX)
    }

    fn claim_idle_ms(&self) -> i64 {
        i64::try_from(self.config.journal_claim_idle.as_millis()).unwrap_or(i64::MAX)
    }

    /// What a note does to its drop on this instance.
    pub(super) fn apply(&self, note: &Note) {
        let Some(lane) = self.lane(note.drop) else {
            return;
        };
        let now = self.local_ms();
        match note.kind {
            // New holds expire hold_ms from now; a payment's lease ends pay_lease from now: the reaper looks then.
            b'r' => lane.reap_by(now.saturating_add(lane.hold_ms)),
            b'l' => lane.reap_by(now.saturating_add(
                i64::try_from(self.config.pay_lease.as_millis()).unwrap_or(i64::MAX),
            )),
            _ => {}
        }
        // Every change of the available units sends a note, in the order the scripts ran, so the last note is right.
        if let Some(available) = note.available {
            lane.sold_out.store(available == 0, Ordering::Release);
        }
        // An entry another instance was given and never acknowledged (it died) is claimable claim_idle from now.
        lane.claim_by(
            now.saturating_add(self.claim_idle_ms())
                .saturating_add(CLAIM_MARGIN_MS),
        );
        lane.wake.notify_one();
    }

    /// A sweep of one drop: everything a note could have said, then its available units read to set the sold-out
    /// flag.
    async fn sweep(&self, lane: &Lane) -> GateResult<()> {
        let now = self.local_ms();
        lane.reap_by(now);
        lane.claim_by(now);
        lane.wake.notify_one();
        let mut conn = self.conn.clone();
        let available: Option<i64> = self
            .bounded(
                redis::cmd("HGET")
                    .arg(&lane.keys[COUNTERS])
                    .arg("avail")
                    .query_async(&mut conn),
            )
            .await?;
        // Missing keys (lost data) clear the flag: the next reservation reloads the drop and decides.
        lane.sold_out.store(available == Some(0), Ordering::Release);
        Ok(())
    }

    /// Sweeps every loaded drop: after a (re)subscription, when any note may have been lost.
    async fn sweep_all(&self) {
        let lanes: Vec<Arc<Lane>> = self.lanes.iter().map(|lane| Arc::clone(&lane)).collect();
        for lane in lanes {
            if let Err(err) = self.sweep(&lane).await {
                tracing::warn!(error = %err, drop = %lane.drop, "sweep of a drop failed; the backstop retries");
            }
        }
    }
}

/// Slack past `journal_claim_idle` before a claim, so the entries it is meant for are idle long enough by then.
const CLAIM_MARGIN_MS: i64 = 200;

/// Connects to `url` and subscribes to `channel`.
async fn subscribe(
    url: &str,
    channel: &str,
    timeout: Duration,
) -> redis::RedisResult<redis::aio::PubSub> {
    let client = redis::Client::open(url)?;
    let connect = async {
        let mut pubsub = client.get_async_pubsub().await?;
        pubsub.subscribe(channel).await?;
        Ok(pubsub)
    };
    tokio::time::timeout(timeout, connect)
        .await
        .unwrap_or_else(|_| {
            Err(redis::RedisError::from((
                redis::ErrorKind::Io,
                "subscribe timed out",
            )))
        })
}

/// The subscription of this instance: applies every note, and after each (re)subscription sweeps every drop. On a
/// cluster any node hears every PUBLISH; a node that fails is replaced by the next URL.
pub(super) async fn listen(inner: Arc<Inner>) {
    let mut stop = inner.stop.subscribe();
    let channel = format!("{}notes", inner.config.key_prefix);
    let mut failures: u32 = 0;
    let mut url = 0;
    loop {
        let Some(target) = inner.config.urls.get(url % inner.config.urls.len().max(1)) else {
            return;
        };
        match subscribe(target, &channel, inner.config.call_timeout).await {
            Ok(pubsub) => {
                failures = 0;
                let (mut sink, mut messages) = pubsub.split();
                inner.sweep_all().await;
                let mut ping = tokio::time::interval(PING_INTERVAL);
                ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    // The select ends before any await of its own: a held `wait_for` guard is not `Send`.
                    let message = tokio::select! {
                        message = messages.next() => match message {
                            Some(message) => Some(message),
                            None => break,
                        },
                        _ = ping.tick() => None,
                        _ = stop.wait_for(|stop| *stop) => return,
                    };
                    match message {
                        Some(message) => {
                            if let Some(note) = Note::parse(message.get_payload_bytes()) {
                                inner.apply(&note);
                            }
                        }
                        None => {
                            let pong = tokio::time::timeout(
                                inner.config.call_timeout,
                                sink.ping::<Value>(),
                            )
                            .await;
                            if !matches!(pong, Ok(Ok(_))) {
                                break;
                            }
                        }
                    }
                }
                tracing::warn!("the note subscription ended; subscribing again");
            }
            Err(err) => {
                failures = failures.saturating_add(1);
                url += 1;
                tracing::warn!(error = %err, failures, "could not subscribe to notes; retrying");
            }
        }
        let pause =
            (Duration::from_millis(50) * 2u32.saturating_pow(failures.min(6))).min(RETRY_MAX);
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = stop.wait_for(|stop| *stop) => return,
        }
    }
}

/// The backstop: sweeps drops in turn, `sweep_lanes_per_second` at most and each drop at least every
/// `sweep_period_min`, against notes lost without the subscription dropping (a cluster bus link that failed).
pub(super) async fn backstop(inner: Arc<Inner>) {
    let mut stop = inner.stop.subscribe();
    let mut ticker = tokio::time::interval(SWEEP_TICK);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut next = 0usize;
    let mut quota = Quota::default();
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = stop.wait_for(|stop| *stop) => return,
        }
        let lanes: Vec<Arc<Lane>> = inner.lanes.iter().map(|lane| Arc::clone(&lane)).collect();
        let count = quota.take(
            lanes.len(),
            inner.config.sweep_lanes_per_second,
            inner.config.sweep_period_min,
        );
        for _ in 0..count {
            next = next.wrapping_add(1);
            let Some(lane) = lanes.get(next % lanes.len().max(1)) else {
                break;
            };
            if let Err(err) = inner.sweep(lane).await {
                tracing::warn!(error = %err, drop = %lane.drop, "backstop sweep of a drop failed");
            }
        }
    }
}

/// How many drops the backstop sweeps in a tick: `lanes / period_min` a second, the remainder carried between ticks
/// (counted in drop-ticks, so a few drops are swept once every `period_min` rather than every tick), and never more
/// than `per_second`.
#[derive(Debug, Default)]
pub(super) struct Quota {
    credit: u64,
}

impl Quota {
    pub(super) fn take(&mut self, lanes: usize, per_second: usize, period_min: Duration) -> usize {
        let ticks = u64::try_from(period_min.as_millis() / SWEEP_TICK.as_millis().max(1))
            .unwrap_or(u64::MAX)
            .max(1);
        let cap = u64::try_from(per_second.max(1)).unwrap_or(u64::MAX);
        let lanes = u64::try_from(lanes).unwrap_or(u64::MAX);
        self.credit = self
            .credit
            .saturating_add(lanes)
            .min(cap.saturating_mul(ticks));
        let count = self.credit / ticks;
        self.credit %= ticks;
        usize::try_from(count).unwrap_or(usize::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notes_parse_as_the_scripts_write_them() {
        let drop = Uuid::now_v7();
        assert_eq!(
            Note::parse(format!("{drop}:x:3").as_bytes()),
            Some(Note {
                drop,
                kind: b'x',
                available: Some(3)
            })
        );
        assert_eq!(
            Note::parse(format!("{drop}:l:-").as_bytes()).map(|note| note.available),
            Some(None)
        );
        assert_eq!(Note::parse(b"not-a-drop:x:3"), None);
        assert_eq!(Note::parse(format!("{drop}:x").as_bytes()), None);
        assert_eq!(Note::parse(format!("{drop}:x:many").as_bytes()), None);
    }

    #[test]
    fn the_backstop_sweeps_each_drop_every_period_and_never_more_than_its_rate() {
        let period = Duration::from_secs(30);
        let swept = |lanes: usize, ticks: usize| {
            let mut quota = Quota::default();
            (0..ticks)
                .map(|_| quota.take(lanes, 10, period))
                .sum::<usize>()
        };
        assert_eq!(swept(0, 60), 0);
        // One drop: once per 30 s, not once a tick.
        assert_eq!(swept(1, 29), 0);
        assert_eq!(swept(1, 60), 2);
        // 50 drops: each once per 30 s.
        assert_eq!(swept(50, 30), 50);
        // Past 300 drops the rate caps it: 10 a second, whatever the number.
        assert_eq!(swept(300, 30), 300);
        assert_eq!(swept(5_000, 30), 300);
    }
}
