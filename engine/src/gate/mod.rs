//! The stock authority behind a narrow interface.
//!
//! The service asks a `Gate` to reserve, move holds through payment, release and reap; it never touches stock
//! itself. Two implementations:
//! - `embedded::EmbeddedGate`: the in-memory core of one instance (used when `REDIS_URL` is unset);
//! - `redis::RedisGate`: Redis is the authority (batched Lua scripts), so any number of instances share a drop.
//!
//! Outcomes are the core's plain enums; the outer `Result` is only for "the authority could not be reached",
//! which the service turns into a refusal (fail closed), never into a grant.

pub mod embedded;
pub mod redis;
pub mod room;

use async_trait::async_trait;
use uuid::Uuid;

use crate::core::{Counts, HoldView, ReserveRejection, RestoreError, TransitionError};
use crate::types::DropSpec;
pub use crate::types::Restore;

pub use embedded::EmbeddedGate;

/// The stock authority could not answer (connection lost, timed out). Nothing was granted.
#[derive(Debug, Clone, thiserror::Error)]
#[error("stock gate unavailable: {0}")]
pub struct GateUnavailable(pub String);

pub type GateResult<T> = Result<T, GateUnavailable>;

/// What one pass of a gate's reaper found.
#[derive(Debug, Default)]
pub struct Reaped {
    /// Holds released as expired by this pass, with their drops.
    pub released: Vec<(Uuid, HoldView)>,
    /// Holds still `paying` whose payment's lease ran out (its process stopped answering, or paused), with their
    /// drops. The gate leaves them as they are: the service fences each in Postgres first (guarantee 5a), then tells
    /// the gate to complete it (its purchase is stored) or to release it (its release is).
    pub lapsed: Vec<(Uuid, HoldView)>,
}

#[async_trait]
pub trait Gate: Send + Sync + 'static {
    /// Makes a drop known to this gate. `restore` is the drop's state as Postgres has it; a gate that already holds
    /// the drop's state (this process's memory, or a shared Redis another instance filled) keeps its own. A restored
    /// state that does not add up (more committed than stock) is refused rather than sold from.
    async fn load(&self, drop: &DropSpec, restore: Restore)
        -> GateResult<Result<(), RestoreError>>;
    /// The local sold-out flag: an answer from memory, no I/O, so a sold-out drop rejects for free.
    fn is_sold_out(&self, drop: Uuid) -> bool;
    /// Whether the drop may have no unit left, from memory: `false` only when it surely has some. The reaper's
    /// `unload_settled` reads the counts of an open drop only when this is true. By default always true (the embedded
    /// gate's counts cost no I/O, and its flag is set only when a reservation finds nothing left); the Redis gate's
    /// flag follows the units on every change (its notes), so it answers from the flag and an open drop with stock
    /// costs no call.
    fn may_be_sold_out(&self, _drop: Uuid) -> bool {
        true
    }
    /// Places a hold. `hold` is a fresh id from the caller, which a gate may rewrite (the embedded gate writes the
    /// hold's place into it, the Redis gate makes the id from the hold's place in the drop's stream), and `now_ms`
    /// the caller's clock, which a gate with a clock of its own (Redis) ignores. The returned view's id is the hold's
    /// id from then on.
    async fn reserve(
        &self,
        drop: Uuid,
        hold: Uuid,
        member: Uuid,
        quantity: u32,
        now_ms: i64,
    ) -> GateResult<Result<HoldView, ReserveRejection>>;
    /// Which drop a hold belongs to, if the gate can tell without Postgres. `None` sends the caller to the stored
    /// row.
    async fn locate(&self, hold: Uuid) -> GateResult<Option<Uuid>>;
    async fn begin_payment(
        &self,
        drop: Uuid,
        hold: Uuid,
        member: Uuid,
        now_ms: i64,
    ) -> GateResult<Result<HoldView, TransitionError>>;
    async fn complete_payment(
        &self,
        drop: Uuid,
        hold: Uuid,
    ) -> GateResult<Result<HoldView, TransitionError>>;
    async fn abort_payment(
        &self,
        drop: Uuid,
        hold: Uuid,
    ) -> GateResult<Result<HoldView, TransitionError>>;
    async fn decline_payment(
        &self,
        drop: Uuid,
        hold: Uuid,
    ) -> GateResult<Result<HoldView, TransitionError>>;
    async fn cancel(
        &self,
        drop: Uuid,
        hold: Uuid,
        member: Uuid,
    ) -> GateResult<Result<HoldView, TransitionError>>;
    /// `held | paying -> released(expired)`: Postgres refused the hold's purchase (its release is stored there, or its
    /// drop's stored paid units are at the stock), so the gate must stop counting its units as committed.
    async fn release_fenced(
        &self,
        drop: Uuid,
        hold: Uuid,
    ) -> GateResult<Result<HoldView, TransitionError>>;
    /// Releases expired holds of every drop into `out.released`, and reports in `out.lapsed` the payments whose lease
    /// ran out; returns how many holds it released.
    async fn reap(&self, now_ms: i64, out: &mut Reaped) -> GateResult<usize>;
    async fn hold(&self, drop: Uuid, hold: Uuid) -> GateResult<Option<HoldView>>;
    async fn counts(&self, drop: Uuid) -> GateResult<Option<Counts>>;
    /// Whether the gate records holds and releases in Postgres itself. The embedded gate does not (the service
    /// queues their rows to its writer); the Redis gate appends every change to the drop's stream in the same script
    /// that makes it, and its journal writes the stream to Postgres, so that a crashed instance loses nothing.
    fn journals_holds(&self) -> bool {
        false
    }
    /// For a gate that journals: each loaded drop with how long its oldest entry not yet written to Postgres by this
    /// instance's journal has waited (zero when it is caught up), as of `now_ms`. Read from memory, for the metrics.
    fn journal_lag(&self, _now_ms: i64) -> Vec<(Uuid, std::time::Duration)> {
        Vec::new()
    }
    /// Forgets a drop whose sale is settled (nothing about it can change any more), so a process that runs for weeks
    /// keeps only live drops in memory. A later `load` brings it back from Postgres.
    async fn unload(&self, drop: Uuid);
    /// Gives the gate the service's writer. A gate that journals writes through it, so every Postgres write of the
    /// engine shares one group commit: two writers storing the same reservations wait on each other's transactions.
    fn use_writer(&self, _writer: crate::writer::WriterHandle) {}
    /// The gate's own waiting rooms for queue drops, when it keeps them (Redis: beside each drop's keys, shared by
    /// every instance); `None`: the service keeps them in memory.
    fn waiting_room(&self) -> Option<std::sync::Arc<dyn room::WaitingRoom>> {
        None
    }
    /// Stops background work and writes out what it journals; the service calls it before draining its writer.
    async fn shutdown(&self) {}
}
