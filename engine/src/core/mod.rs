//! The pure in-memory core of one drop: sharded stock, holds and per-member counts, with no I/O, no async and no
//! clock reads, so that the hot path is plain code that cannot fail for outside reasons and can be model-checked.
//!
//! Time comes in as `now_ms` (unix milliseconds). One [`DropBook`] serves one drop and is shared between threads
//! (`Arc<DropBook>`); every method takes `&self`.
//!
//! **Structure:** the book is a fixed set of shards, each one cache-padded lock over a slice of the stock and the
//! counts and holds of the members whose home shard it is. The book makes each hold's id, and the id names the
//! hold's shard and its slot in that shard's hold list, so a reservation and every later transition of the hold take
//! one lock and find the hold without a map. When more than one shard is locked, they are locked in ascending index
//! order (the one lock rule, see `book.rs`).
//!
//! **Invariant (conservation):** in every snapshot from [`DropBook::counts`],
//! `available + held + paid == stock`, where `held` counts both `held` and `paying` holds.
//! **Invariant (member limit):** for every member, the units of its `held`, `paying` and `paid` holds never exceed
//! `per_member_limit` (units restored as already paid may, see [`DropBook::restore`]).
//! **Invariant (exactly once):** a hold leaves `held`/`paying` at most once; a released hold is never paid.

mod book;
mod shard;
#[cfg(test)]
mod tests;

pub use book::{DropBook, IdHasher};
use uuid::Uuid;

/// The fixed settings of one drop's book.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DropParams {
    /// Units on sale in this drop.
    pub stock: u32,
    /// Most units one member may have held, paying or paid at once.
    pub per_member_limit: u32,
    /// How long a hold lasts before the reaper may release it; the same for every hold of the drop, which is what
    /// keeps each shard's hold list in expiry order for the reaper.
    pub hold_ms: i64,
    /// Number of stock shards. Rounded up to a power of two and kept within `1..=MAX_SHARDS`.
    pub shards: usize,
}

/// Stock shards per drop unless configured otherwise. On two cores, 16 shards make two reservations meet on one lock
/// once in 16 and measured faster than 8 in the `core_reserve` benchmark; more buy nothing there and make the slow
/// path (which locks every shard) longer.
pub const DEFAULT_SHARDS: usize = 16;

/// Most stock shards a book will use; more only costs memory and makes the slow path and `counts` slower.
pub const MAX_SHARDS: usize = 256;

/// A consistent snapshot of a drop's stock: `available + held + paid == stock`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Counts {
    pub stock: u32,
    pub available: u32,
    /// Units in `held` or `paying` holds.
    pub held: u32,
    pub paid: u32,
}

impl Counts {
    /// Nothing left to sell or to come back (no unit available or held): a queue drop's waiting members are told
    /// `sold_out`, and no one takes a place. `room.lua` applies the same rule to the counters in Redis.
    pub fn gone(&self) -> bool {
        self.available == 0 && self.held == 0
    }
}

/// Where a hold is in its life: `held -> paying -> paid`, with `released` reachable from `held` and `paying`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum HoldState {
    Held,
    /// A payment call is in flight; the reaper leaves the hold alone until the call ends.
    Paying,
    Paid,
    Released(ReleaseReason),
}

/// Why a hold gave its units back.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ReleaseReason {
    Cancelled,
    Expired,
    PaymentDeclined,
}

/// A copy of one hold as it was when the call that returned it decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct HoldView {
    pub id: Uuid,
    pub member: Uuid,
    pub quantity: u32,
    pub state: HoldState,
    pub created_at_ms: i64,
    pub expires_at_ms: i64,
}

/// Why a reservation was refused. Checked in this order: `InvalidQuantity`, `SoldOut` (local flag), `LimitExceeded`,
/// `SoldOut` (fewer than `quantity` units available).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ReserveRejection {
    /// Fewer units are available than were asked for (zero, when the local sold-out flag is set).
    SoldOut,
    /// The member's held, paying and paid units plus this quantity would pass `per_member_limit`.
    LimitExceeded,
    /// The quantity is zero or above `per_member_limit`, so no state of the drop could grant it.
    InvalidQuantity,
}

/// Why a state transition of a hold was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TransitionError {
    NotFound,
    /// The hold belongs to another member; nothing about it is revealed.
    NotOwner,
    /// The hold was past its expiry and has just been released as `Expired` by this call.
    Expired,
    AlreadyReleased(ReleaseReason),
    AlreadyPaid,
    /// A payment call for this hold is in flight.
    PaymentInFlight,
    /// The call needs a `paying` hold and this one is `held`.
    NotPaying,
}

/// A hold to keep when a book is rebuilt after a restart; it comes back as `held`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RestoredHold {
    pub id: Uuid,
    pub member: Uuid,
    pub quantity: u32,
    pub created_at_ms: i64,
    pub expires_at_ms: i64,
}

/// Why [`DropBook::restore`] could not rebuild a book from the stored state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RestoreError {
    /// The paid units and the held units together pass the drop's stock.
    #[error("restored state commits {committed} units but the drop has only {stock}")]
    Oversold { stock: u32, committed: u64 },
    #[error("hold {0} appears twice in the restored state")]
    DuplicateHold(Uuid),
    #[error("hold {0} has quantity zero")]
    ZeroQuantity(Uuid),
}
