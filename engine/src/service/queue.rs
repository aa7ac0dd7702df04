//! Queue drops as the service sees them: joining, a member's standing, the room's counts, and the admission loop
//! (`gate/room.rs` keeps the room; this file adds the drop's clock and counts to it). A reservation on a queue
//! drop goes through `Engine::reserve_admitted`, which the HTTP layer calls only with a valid admission pass.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use uuid::Uuid;

use super::{Engine, EngineError};
use crate::core::Counts;
use crate::gate::room::{Joining, Place};
use crate::types::{DropMode, DropSpec, QueueCounts, Reservation};

/// How often each instance runs an admission step for each queue drop it has loaded, by default
/// (`EngineConfig::queue_tick`).
pub const QUEUE_TICK: Duration = Duration::from_millis(100);

/// What a member is told about their place (API.md's queue body, without the pass itself).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueStatus {
    Waiting,
    Admitted,
    SoldOut,
    Closed,
    Expired,
}

impl QueueStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            QueueStatus::Waiting => "waiting",
            QueueStatus::Admitted => "admitted",
            QueueStatus::SoldOut => "sold_out",
            QueueStatus::Closed => "closed",
            QueueStatus::Expired => "expired",
        }
    }
}

/// A member's standing in a drop's queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Standing {
    pub status: QueueStatus,
    pub position: Option<u64>,
    pub ahead: Option<u64>,
    pub eta_seconds: Option<u64>,
    /// The admitted member's pass expiry (unix ms); the HTTP layer signs the pass from it.
    pub pass_expires_ms: Option<i64>,
}

impl Engine {
    /// A loaded queue drop's spec, or why not.
    async fn queue_spec(&self, drop: Uuid) -> Result<Arc<DropSpec>, EngineError> {
        let spec = self.spec(drop).await?;
        if spec.mode != DropMode::Queue {
            return Err(EngineError::NotAQueue);
        }
        Ok(spec)
    }

    /// Joins `member` to a queue drop's waiting room (or finds their place); `true` when they took a new place.
    pub async fn queue_join(
        &self,
        drop: Uuid,
        member: Uuid,
    ) -> Result<(Standing, bool), EngineError> {
        let spec = self.queue_spec(drop).await?;
        let now_ms = self.clock.now_ms();
        let terms = spec.queue.as_ref().ok_or(EngineError::NotAQueue)?;
        if now_ms < terms.queue_opens_at.timestamp_millis() {
            return Err(EngineError::NotOpen);
        }
        if spec.closes_at_ms().is_some_and(|closes| now_ms >= closes) {
            return Err(EngineError::Closed);
        }
        if let Some(joining) = self.room.join_counted(&spec, member, now_ms).await? {
            return match joining {
                Joining::SoldOut => Err(EngineError::SoldOut),
                Joining::Placed {
                    place,
                    new,
                    admit_rate,
                    counts,
                } => Ok((standing(&spec, place, &counts, admit_rate, now_ms), new)),
            };
        }
        let counts = self.counts_of(&spec).await?;
        if counts.gone() {
            return Err(EngineError::SoldOut);
        }
        let (place, new) = self.room.join(&spec, member, now_ms).await?;
        let rate = self.room.counts(&spec, now_ms).await?.admit_rate;
        Ok((standing(&spec, place, &counts, rate, now_ms), new))
    }

    /// A member's standing in a queue drop, or `None` if they never joined.
    pub async fn queue_standing(
        &self,
        drop: Uuid,
        member: Uuid,
    ) -> Result<Option<Standing>, EngineError> {
        let spec = self.queue_spec(drop).await?;
        let now_ms = self.clock.now_ms();
        let Some(seen) = self.room.sighting(&spec, member, now_ms).await? else {
            return Ok(None);
        };
        let counts = match seen.counts {
            Some(counts) => counts,
            None => self.counts_of(&spec).await?,
        };
        Ok(Some(standing(
            &spec,
            seen.place,
            &counts,
            seen.admit_rate,
            now_ms,
        )))
    }

    /// The waiting room's numbers of a queue drop; `None` for other modes.
    pub async fn queue_counts(&self, spec: &DropSpec) -> Result<Option<QueueCounts>, EngineError> {
        if spec.mode != DropMode::Queue {
            return Ok(None);
        }
        Ok(Some(self.room.counts(spec, self.clock.now_ms()).await?))
    }

    /// Places a hold for a member the waiting room of a queue drop admitted (the caller checked their pass): the
    /// same path as `reserve`; the room stops counting the member against the units available.
    pub async fn reserve_admitted(
        &self,
        drop: Uuid,
        member: Uuid,
        quantity: u32,
    ) -> Result<Reservation, EngineError> {
        let reservation = self
            .reserve_as(drop, member, quantity, DropMode::Queue)
            .await?;
        self.room.reserved(drop, member);
        Ok(reservation)
    }

    async fn counts_of(&self, spec: &DropSpec) -> Result<Counts, EngineError> {
        self.gate
            .counts(spec.id)
            .await?
            .ok_or(EngineError::DropNotFound)
    }

    /// One admission step for every loaded queue drop that is open; returns how many members were admitted.
    pub async fn admit_queues(&self) -> Result<u64, EngineError> {
        let now_ms = self.clock.now_ms();
        let open: Vec<Arc<DropSpec>> = self
            .drops
            .iter()
            .filter(|spec| {
                spec.mode == DropMode::Queue
                    && now_ms >= spec.opens_at_ms()
                    && spec.closes_at_ms().is_none_or(|closes| now_ms < closes)
            })
            .map(|spec| Arc::clone(&spec))
            .collect();
        let mut admitted = 0;
        for spec in open {
            let counts = self.counts_of(&spec).await?;
            admitted += self.room.tick(&spec, now_ms, counts).await?;
        }
        Ok(admitted)
    }
}

/// The standing of `place` given the drop's counts and clock.
fn standing(spec: &DropSpec, place: Place, counts: &Counts, rate: f64, now_ms: i64) -> Standing {
    let closed = spec.closes_at_ms().is_some_and(|closes| now_ms >= closes);
    let bare = |status| Standing {
        status,
        position: None,
        ahead: None,
        eta_seconds: None,
        pass_expires_ms: None,
    };
    match place {
        Place::Admitted {
            pass_expires_ms, ..
        } => Standing {
            pass_expires_ms: Some(pass_expires_ms),
            ..bare(QueueStatus::Admitted)
        },
        Place::Expired => bare(QueueStatus::Expired),
        Place::Waiting { .. } if closed => bare(QueueStatus::Closed),
        Place::Waiting { .. } if counts.gone() => bare(QueueStatus::SoldOut),
        Place::Waiting { position } => {
            let ahead = position.map(|position| position - 1);
            // While nothing is available only held units could come back: no honest estimate.
            let eta_seconds = ahead
                .filter(|_| counts.available > 0 && rate > 0.0)
                .map(|ahead| (ahead as f64 / rate).ceil() as u64);
            Standing {
                position,
                ahead,
                eta_seconds,
                ..bare(QueueStatus::Waiting)
            }
        }
    }
}

/// The admission loop: one step per `tick` until `stop`.
pub(super) async fn run(
    engine: std::sync::Weak<Engine>,
    tick: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let mut interval = tokio::time::interval(tick);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = interval.tick() => {}
            _ = stop.changed() => return,
        }
        let Some(engine) = engine.upgrade() else {
            return;
        };
        if let Err(err) = engine.admit_queues().await {
            tracing::warn!(error = %err, "queue admission step failed; next tick retries");
        }
    }
}
