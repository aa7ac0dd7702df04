//! Baselines that the criterion benchmarks in `benches/` measure the engine against: the naive version of each
//! part, doing the same logical work, so a benchmark shows what the engine's design buys.

use engine::core::{HoldState, HoldView, IdHasher};
use parking_lot::Mutex;
use std::collections::hash_map::Entry;
use std::collections::{HashMap, VecDeque};
use uuid::Uuid;

/// The naive reservation path: one drop behind one global lock over hash maps of members and holds keyed by the
/// caller's ids, plus an expiry queue. It does the same logical work as `DropBook::reserve` (quantity and member-limit
/// checks, stock decrement, a hold record its id can find, an expiry order), with the same hasher and the same
/// up-front table size, so the difference measured is the engine's design: shards, and holds appended to a list
/// their id points into instead of inserted into a map.
pub struct MutexBook {
    per_member_limit: u32,
    hold_ms: i64,
    inner: Mutex<Inner>,
}

struct Inner {
    available: u32,
    held: u32,
    members: HashMap<Uuid, u32, IdHasher>,
    holds: HashMap<Uuid, HoldView, IdHasher>,
    expiry: VecDeque<(i64, Uuid)>,
}

/// Why the baseline refused a reservation: the engine's reasons, and a repeated id (the engine makes its own ids,
/// so it has no such case).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    InvalidQuantity,
    LimitExceeded,
    SoldOut,
    DuplicateHold,
}

/// Same cap on up-front table size as the engine's.
const PRESIZE_MAX: usize = 1 << 16;

impl MutexBook {
    pub fn new(stock: u32, per_member_limit: u32, hold_ms: i64) -> Self {
        let capacity = (stock as usize).min(PRESIZE_MAX);
        Self {
            per_member_limit,
            hold_ms,
            inner: Mutex::new(Inner {
                available: stock,
                held: 0,
                members: HashMap::with_capacity_and_hasher(capacity, IdHasher::default()),
                holds: HashMap::with_capacity_and_hasher(capacity, IdHasher::default()),
                expiry: VecDeque::new(),
            }),
        }
    }

    pub fn reserve(
        &self,
        hold_id: Uuid,
        member: Uuid,
        quantity: u32,
        now_ms: i64,
    ) -> Result<HoldView, Refusal> {
        if quantity == 0 || quantity > self.per_member_limit {
            return Err(Refusal::InvalidQuantity);
        }
        let mut inner = self.inner.lock();
        let inner = &mut *inner;
        let units = inner.members.entry(member).or_insert(0);
        if *units + quantity > self.per_member_limit {
            return Err(Refusal::LimitExceeded);
        }
        if inner.available < quantity {
            return Err(Refusal::SoldOut);
        }
        let hold = HoldView {
            id: hold_id,
            member,
            quantity,
            state: HoldState::Held,
            created_at_ms: now_ms,
            expires_at_ms: now_ms + self.hold_ms,
        };
        match inner.holds.entry(hold_id) {
            Entry::Occupied(_) => return Err(Refusal::DuplicateHold),
            Entry::Vacant(vacant) => {
                vacant.insert(hold);
            }
        }
        *units += quantity;
        inner.available -= quantity;
        inner.held += quantity;
        inner.expiry.push_back((hold.expires_at_ms, hold_id));
        Ok(hold)
    }

    /// Units not held, for checking a benchmark run.
    pub fn available(&self) -> u32 {
        self.inner.lock().available
    }
}
