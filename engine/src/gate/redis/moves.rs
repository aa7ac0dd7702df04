//! A drop's transitions (begin, complete, abort, decline, cancel, fence, read), batched per drop the way its
//! reservations are: the moves that queue while a transition call is in flight go together in the next call of
//! `transition.lua` (no timer, so a lone move goes at once), and one call answers each. Every move is decided in the
//! script as if it ran alone, so batching changes what a move costs (one script call, one lease note and one
//! round trip shared by the batch), never what it does.

use std::sync::Arc;

use redis::Value;
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use super::codec::{array, int, malformed, member_hex, parse_member, state_of, text};
use super::ids::HoldRef;
use super::lanes::{answer, next_batch, Lane};
use super::Inner;
use crate::core::{HoldState, HoldView, ReleaseReason, TransitionError};
use crate::gate::{GateResult, GateUnavailable};

/// One move of one hold: `op` is one of the script's operations; `member`, when given, must own the hold.
pub(super) struct Move {
    pub(super) place: HoldRef,
    pub(super) op: &'static str,
    pub(super) member: Option<Uuid>,
}

/// What became of one move.
pub(super) type Moved = Result<HoldView, TransitionError>;

/// A move waiting in its drop's queue for the next transition call.
pub(super) struct MoveRequest {
    step: Move,
    reply: oneshot::Sender<GateResult<Moved>>,
}

impl Inner {
    /// One transition script call for `moves` of `lane`, answered in order; `None` when the drop's keys are gone.
    async fn moves_once(&self, lane: &Lane, moves: &[&Move]) -> GateResult<Option<Vec<Moved>>> {
        let mut invocation = self.scripts.transition.prepare_invoke();
        for key in &lane.keys {
            invocation.key(key);
        }
        invocation.arg(u64::try_from(self.config.pay_lease.as_millis()).unwrap_or(u64::MAX));
        for step in moves {
            invocation
                .arg(step.place.entry())
                .arg(step.place.index)
                .arg(step.op)
                .arg(step.member.map(member_hex).unwrap_or_default());
        }
        let mut conn = self.conn.clone();
        let reply: Vec<Value> = self.bounded(invocation.invoke_async(&mut conn)).await?;
        if reply.first().and_then(int) == Some(-1) {
            return Ok(None);
        }
        if reply.len() != moves.len() {
            return Err(malformed("transition answer count"));
        }
        reply
            .into_iter()
            .zip(moves)
            .map(|(answer, step)| decode(&step.place, answer))
            .collect::<GateResult<Vec<Moved>>>()
            .map(Some)
    }

    /// `moves` of `lane` in one call, reloading the drop from Postgres once if its keys are gone.
    async fn moves(&self, lane: &Lane, moves: &[&Move]) -> GateResult<Vec<Moved>> {
        self.reloading(lane, || self.moves_once(lane, moves)).await
    }

    /// Moves one hold through its drop's batchers, or in a call of its own once they have stopped (the drop is
    /// being unloaded, or the gate shuts down): a move they never took has not run.
    pub(super) async fn move_one(&self, lane: &Lane, step: Move) -> GateResult<Moved> {
        let (reply, answer) = oneshot::channel();
        let step = match lane.moves.send(MoveRequest { step, reply }).await {
            Ok(()) => {
                // The batcher answers within one call timeout of taking this move; a move that waited behind a full
                // queue gets the same bound again.
                match tokio::time::timeout(self.config.call_timeout * 2, answer).await {
                    Ok(Ok(result)) => return result,
                    Ok(Err(_)) => None,
                    Err(_) => return Err(GateUnavailable("hold transition timed out".into())),
                }
            }
            Err(mpsc::error::SendError(request)) => Some(request.step),
        };
        let Some(step) = step else {
            return Err(GateUnavailable(
                "the drop's transitions stopped before this one was taken".into(),
            ));
        };
        let mut moved = self.moves(lane, &[&step]).await?;
        moved
            .pop()
            .ok_or_else(|| malformed("transition answer count"))
    }
}

/// One of a drop's `calls_in_flight` transition batchers, as `lanes::run_lane` is for reservations.
pub(super) async fn run_moves(
    inner: Arc<Inner>,
    lane: Arc<Lane>,
    requests: Arc<tokio::sync::Mutex<mpsc::Receiver<MoveRequest>>>,
) {
    let mut stop = lane.stop.subscribe();
    let batch_max = inner.config.batch_max.max(1);
    let mut batch: Vec<MoveRequest> = Vec::new();
    while next_batch(&requests, &mut stop, batch_max, &mut batch).await {
        let steps: Vec<&Move> = batch.iter().map(|request| &request.step).collect();
        let moved = inner.moves(&lane, &steps).await;
        answer(&mut batch, moved, |request| request.reply);
    }
}

/// One move's answer: `{ 1 }` (no such hold) or `{ code, member, quantity, created_ms, expires_ms, state }`.
fn decode(place: &HoldRef, answer: Value) -> GateResult<Moved> {
    let answer = array(answer).ok_or_else(|| malformed("transition"))?;
    let code = answer
        .first()
        .and_then(int)
        .ok_or_else(|| malformed("transition"))?;
    if code == 1 {
        return Ok(Err(TransitionError::NotFound));
    }
    let field = |index: usize| {
        answer
            .get(index)
            .ok_or_else(|| malformed("transition view"))
    };
    let member = text(field(1)?)
        .and_then(parse_member)
        .ok_or_else(|| malformed("member"))?;
    let quantity = int(field(2)?)
        .and_then(|q| u32::try_from(q).ok())
        .ok_or_else(|| malformed("quantity"))?;
    let created_at_ms = int(field(3)?).ok_or_else(|| malformed("created"))?;
    let expires_at_ms = int(field(4)?).ok_or_else(|| malformed("expires"))?;
    let state = state_of(text(field(5)?).unwrap_or("h"));
    let view = HoldView {
        id: place.id(),
        member,
        quantity,
        state,
        created_at_ms,
        expires_at_ms,
    };
    Ok(match code {
        0 => Ok(view),
        2 => Err(TransitionError::NotOwner),
        3 => Err(TransitionError::Expired),
        4 => Err(TransitionError::AlreadyReleased(match state {
            HoldState::Released(reason) => reason,
            _ => ReleaseReason::Expired,
        })),
        5 => Err(TransitionError::AlreadyPaid),
        6 => Err(TransitionError::PaymentInFlight),
        _ => Err(TransitionError::NotPaying),
    })
}
