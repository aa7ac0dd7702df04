//! A drop's lane: the reservation batchers of one drop on this instance (requests that arrive while a script call is
//! in flight go together in the next call), and when its journal and reaper next have work (`notes.rs` sets it).

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::{mpsc, oneshot, watch, Notify};
use tokio::task::JoinHandle;
use uuid::Uuid;

use redis::Value;

use super::codec::{int, malformed, text, write_record, DropKeys, RECORD_BYTES};
use super::ids::{self, HoldRef};
use super::moves::MoveRequest;
use super::Inner;
use crate::core::{HoldState, HoldView, ReserveRejection};
use crate::gate::{GateResult, GateUnavailable};

/// One drop as this instance serves it: its keys, its local sold-out flag and the queue of its reservation batcher.
pub(super) struct Lane {
    pub(super) drop: Uuid,
    pub(super) seq: u32,
    pub(super) hold_ms: i64,
    pub(super) keys: DropKeys,
    pub(super) sold_out: AtomicBool,
    /// When the oldest stream entry this instance's journal has read and not yet written was appended (Redis's
    /// clock, unix ms), or 0 when its last read found nothing new: how far the drop's journal is behind.
    pub(super) journal_behind_since_ms: AtomicI64,
    /// Wakes the journal: a note said the stream moved, or a sweep asks for a look.
    pub(super) wake: Notify,
    /// When (`Inner::local_ms`) the journal next claims entries other instances left pending; `NEVER` when no note
    /// since the last claim gave a reason to.
    pub(super) claim_at_ms: AtomicI64,
    /// When (`Inner::local_ms`) the reaper next has work on this drop: the first expiry or lease end it knows of.
    pub(super) reap_due_ms: AtomicI64,
    pub(super) requests: mpsc::Sender<Request>,
    /// The queue of its transition batchers (`moves.rs`).
    pub(super) moves: mpsc::Sender<MoveRequest>,
    /// Tells the lane's batchers and journal to stop (unload, shutdown); the journal writes out what it has first.
    pub(super) stop: watch::Sender<bool>,
    /// The lane's batchers and journal, awaited at shutdown.
    pub(super) tasks: Mutex<Vec<JoinHandle<()>>>,
}

/// No deadline.
pub(super) const NEVER: i64 = i64::MAX;

impl Lane {
    /// Brings the reaper's next pass on this drop forward to `at` (never later).
    pub(super) fn reap_by(&self, at: i64) {
        self.reap_due_ms.fetch_min(at, Ordering::AcqRel);
    }

    /// Brings the journal's next claim forward to `at` (never later).
    pub(super) fn claim_by(&self, at: i64) {
        self.claim_at_ms.fetch_min(at, Ordering::AcqRel);
    }
}

pub(super) struct Request {
    pub(super) member: Uuid,
    pub(super) quantity: u32,
    pub(super) reply: oneshot::Sender<GateResult<Result<HoldView, ReserveRejection>>>,
}

pub(super) type Grant = Result<HoldView, ReserveRejection>;

impl Inner {
    /// One reserve script call for a batch.
    pub(super) async fn reserve_once(
        &self,
        lane: &Lane,
        batch: &[Request],
    ) -> GateResult<Option<Vec<Grant>>> {
        let mut invocation = self.scripts.reserve.prepare_invoke();
        for key in &lane.keys {
            invocation.key(key);
        }
        let mut records = Vec::with_capacity(batch.len() * RECORD_BYTES);
        let mut record = [0u8; RECORD_BYTES];
        for request in batch {
            records.extend_from_slice(write_record(&mut record, request.member, request.quantity));
        }
        invocation.arg(records).arg(RECORDS_PER_ENTRY);
        let mut conn = self.conn.clone();
        let reply: Vec<Value> = self.bounded(invocation.invoke_async(&mut conn)).await?;
        let mut reply = reply.into_iter();
        let status = reply
            .next()
            .as_ref()
            .and_then(int)
            .ok_or_else(|| malformed("reserve"))?;
        if status == -1 {
            return Ok(None);
        }
        let entry = reply.next().ok_or_else(|| malformed("reserve entry"))?;
        let entry = text(&entry).unwrap_or("").to_owned();
        let available = reply
            .next()
            .as_ref()
            .and_then(int)
            .ok_or_else(|| malformed("reserve"))?;
        if available == 0 {
            lane.sold_out.store(true, Ordering::Release);
        }
        // The grants of the call are the records of these entries, `RECORDS_PER_ENTRY` to an entry: parse each id once.
        let entries = entry
            .split_ascii_whitespace()
            .map(|id| {
                HoldRef::from_entry(lane.seq, id, 0).ok_or_else(|| malformed("reserve entry id"))
            })
            .collect::<GateResult<Vec<HoldRef>>>()?;
        if !entries.is_empty() {
            // The new holds expire hold_ms from now, as the note will say; scheduled here too, so a lost note cannot
            // leave the holds this instance made unreleased past their expiry.
            lane.reap_by(self.local_ms().saturating_add(lane.hold_ms));
        }
        let outcomes = reply.next().ok_or_else(|| malformed("reserve outcomes"))?;
        let outcomes = text(&outcomes).ok_or_else(|| malformed("reserve outcomes"))?;
        grants(lane, batch, &entries, outcomes).map(Some)
    }

    pub(super) async fn reserve_batch(
        &self,
        lane: &Lane,
        batch: &[Request],
    ) -> GateResult<Vec<Grant>> {
        self.reloading(lane, || self.reserve_once(lane, batch))
            .await
    }

    /// Runs a script call, and once more after reloading the drop from Postgres if it found the drop's keys gone
    /// (`None`).
    pub(super) async fn reloading<T, Call>(
        &self,
        lane: &Lane,
        call: impl Fn() -> Call,
    ) -> GateResult<T>
    where
        Call: std::future::Future<Output = GateResult<Option<T>>>,
    {
        if let Some(answer) = call().await? {
            return Ok(answer);
        }
        self.reload(lane).await?;
        call()
            .await?
            .ok_or_else(|| GateUnavailable("drop state vanished again after a reload".into()))
    }
}

/// One of a drop's `calls_in_flight` batchers: takes whatever queued while the other calls were in flight (up to
/// `batch_max`), makes one script call for it and answers each request. With more than one batcher, one gathers the
/// next batch while another's call runs, so Redis and this process work at the same time instead of in turn; the
/// scripts are atomic, so the calls need no order between them.
pub(super) async fn run_lane(
    inner: Arc<Inner>,
    lane: Arc<Lane>,
    requests: Arc<tokio::sync::Mutex<mpsc::Receiver<Request>>>,
) {
    let mut stop = lane.stop.subscribe();
    let batch_max = inner.config.batch_max.clamp(1, ids::INDEX_MAX as usize + 1);
    let mut batch: Vec<Request> = Vec::new();
    while next_batch(&requests, &mut stop, batch_max, &mut batch).await {
        let grants = inner.reserve_batch(&lane, &batch).await;
        answer(&mut batch, grants, |request| request.reply);
    }
}

/// Answers each request of a batch with its own outcome, or every one with the call's error, and empties the batch.
pub(super) fn answer<R, T>(
    batch: &mut Vec<R>,
    outcomes: GateResult<Vec<T>>,
    reply: fn(R) -> oneshot::Sender<GateResult<T>>,
) {
    match outcomes {
        Ok(outcomes) => {
            for (request, outcome) in batch.drain(..).zip(outcomes) {
                let _ = reply(request).send(Ok(outcome));
            }
        }
        Err(err) => {
            for request in batch.drain(..) {
                let _ = reply(request).send(Err(err.clone()));
            }
        }
    }
}

/// Waits for a first request and takes whatever else has queued, up to `max`, into `batch`; `false` once the lane
/// stops or its queue closes. A drop's batchers share the receiver: the one holding it gathers the next batch while
/// the others' calls are in flight. A batcher's `batch` starts empty and grows with what it carries, so an idle drop's
/// batchers hold no buffer (a loaded drop costs memory on every instance).
pub(super) async fn next_batch<T>(
    requests: &tokio::sync::Mutex<mpsc::Receiver<T>>,
    stop: &mut watch::Receiver<bool>,
    max: usize,
    batch: &mut Vec<T>,
) -> bool {
    let mut requests = tokio::select! {
        requests = requests.lock() => requests,
        _ = stop.wait_for(|stop| *stop) => return false,
    };
    let first = tokio::select! {
        request = requests.recv() => match request {
            Some(request) => request,
            None => return false,
        },
        _ = stop.wait_for(|stop| *stop) => return false,
    };
    batch.push(first);
    while batch.len() < max {
        match requests.try_recv() {
            Ok(request) => batch.push(request),
            Err(_) => break,
        }
    }
    true
}

/// The most holds one reserve entry of the stream holds. A transition reads its hold's whole entry, and Redis's Lua
/// hashes every string it is handed in full, so an entry of a 512-request batch (18 KB) made each payment of its
/// holds cost Redis about 60 µs; at 32 records (1.2 KB) a batch costs one more XADD per 32 grants.
pub(super) const RECORDS_PER_ENTRY: u32 = 32;

/// Each request's answer from a reserve call's outcomes (`g` granted, `l` over the member's limit, else sold out;
/// '' when every request was granted): the grants are the records of `entries`, in order, `RECORDS_PER_ENTRY` to
/// an entry.
fn grants(
    lane: &Lane,
    batch: &[Request],
    entries: &[HoldRef],
    outcomes: &str,
) -> GateResult<Vec<Grant>> {
    // '' means every request was granted.
    let all_granted = vec![b'g'; if outcomes.is_empty() { batch.len() } else { 0 }];
    let outcomes = if outcomes.is_empty() {
        &all_granted[..]
    } else {
        outcomes.as_bytes()
    };
    if outcomes.len() != batch.len() {
        return Err(malformed("reserve outcome count"));
    }
    let mut grants = Vec::with_capacity(batch.len());
    let mut granted: u32 = 0;
    for (request, &outcome) in batch.iter().zip(outcomes) {
        grants.push(match outcome {
            b'g' => {
                let place = entries
                    .get((granted / RECORDS_PER_ENTRY) as usize)
                    .map(|entry| HoldRef {
                        index: granted % RECORDS_PER_ENTRY,
                        ..*entry
                    })
                    .ok_or_else(|| malformed("reserve grant"))?;
                granted += 1;
                let created = i64::try_from(place.ms).unwrap_or(i64::MAX);
                Ok(HoldView {
                    id: place.id(),
                    member: request.member,
                    quantity: request.quantity,
                    state: HoldState::Held,
                    created_at_ms: created,
                    expires_at_ms: created.saturating_add(lane.hold_ms),
                })
            }
            b'l' => Err(ReserveRejection::LimitExceeded),
            _ => Err(ReserveRejection::SoldOut),
        });
    }
    Ok(grants)
}
