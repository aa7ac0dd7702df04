//! One shard of a drop: a slice of its stock, and the counts and holds of the members whose home it is, all behind
//! one lock, so that a reservation touches one lock and nothing else shared. Every method that moves units checks
//! the shard's conservation invariant.

use super::{HoldView, IdHasher};
use std::collections::HashMap;
use uuid::Uuid;

/// **Invariant:** `available + held + paid == assigned`. `held` includes `paying` holds.
#[derive(Debug, Default)]
pub(super) struct Shard {
    /// Units this shard is responsible for; the slow path of a reservation moves them between shards.
    pub(super) assigned: u32,
    pub(super) available: u32,
    pub(super) held: u32,
    pub(super) paid: u32,
    /// Units of the held, paying and paid holds of the members whose home shard this is. Members with zero units have
    /// no entry.
    pub(super) members: HashMap<Uuid, u32, IdHasher>,
    /// Every hold of this shard's members, in the order they were taken. A hold's index here is its slot, written
    /// into its id, so finding it needs no map. Because every hold of a drop lasts `hold_ms`, this is also the order
    /// they expire in (restored holds come first, sorted by expiry), and the reaper walks it from `reap_next`.
    /// Released and paid holds stay.
    pub(super) holds: HoldList,
    /// Slots before this one have been looked at by the reaper: settled, or kept in `deferred`.
    pub(super) reap_next: usize,
    /// Slots the reaper looked at but could not settle yet (the hold was `paying`, or not yet due by the caller's
    /// clock); looked at again on every reap.
    pub(super) deferred: Vec<usize>,
}

impl Shard {
    /// An empty shard whose member map is sized for `capacity` members.
    pub(super) fn with_capacity(capacity: usize) -> Self {
        Self {
            members: HashMap::with_capacity_and_hasher(capacity, IdHasher::default()),
            ..Self::default()
        }
    }

    /// The conservation check after every change of units; compiled out of release builds, where `counts` reads
    /// it back with [`Shard::assert_conserved`].
    pub(super) fn check(&self) {
        if cfg!(debug_assertions) {
            self.assert_conserved();
        }
    }

    /// Panics unless `available + held + paid == assigned`: units made or lost must stop the process rather than
    /// let it oversell.
    pub(super) fn assert_conserved(&self) {
        assert_eq!(
            u64::from(self.available) + u64::from(self.held) + u64::from(self.paid),
            u64::from(self.assigned),
            "shard conservation broken: assigned {}, available {}, held {}, paid {}",
            self.assigned,
            self.available,
            self.held,
            self.paid
        );
    }

    /// Units the member whose home this is holds, pays for or has paid.
    pub(super) fn member_units(&self, member: Uuid) -> u32 {
        self.members.get(&member).copied().unwrap_or(0)
    }

    /// The hold at `slot`, if it is the one with this id (an id from elsewhere may name any slot).
    pub(super) fn hold_mut(&mut self, slot: usize, hold_id: Uuid) -> Option<&mut HoldView> {
        self.holds.get_mut(slot).filter(|hold| hold.id == hold_id)
    }

    /// Moves `quantity` available units into `held`; the caller has checked that they are there.
    pub(super) fn take(&mut self, quantity: u32) {
        debug_assert!(
            self.available >= quantity,
            "take of {quantity} from {} available",
            self.available
        );
        self.available -= quantity;
        self.held += quantity;
        self.check();
    }

    /// Gives the units of a released hold back to sale and takes them off its member's count, forgetting members
    /// that reach zero.
    pub(super) fn release(&mut self, member: Uuid, quantity: u32) {
        debug_assert!(
            self.held >= quantity,
            "release of {quantity} from {} held",
            self.held
        );
        self.held -= quantity;
        self.available += quantity;
        self.check();
        let Some(units) = self.members.get_mut(&member) else {
            debug_assert!(
                false,
                "member {member} returns {quantity} units it does not have"
            );
            return;
        };
        let left = units.checked_sub(quantity);
        debug_assert!(
            left.is_some(),
            "member {member} returns {quantity} of {units}"
        );
        match left.unwrap_or(0) {
            0 => {
                self.members.remove(&member);
            }
            left => *units = left,
        }
    }

    /// Moves the units of a paid hold from `held` to `paid`.
    pub(super) fn settle(&mut self, quantity: u32) {
        debug_assert!(
            self.held >= quantity,
            "settle of {quantity} from {} held",
            self.held
        );
        self.held -= quantity;
        self.paid += quantity;
        self.check();
    }

    /// Hands `quantity` available units to another shard (which must `receive` them under the same set of locks).
    pub(super) fn give(&mut self, quantity: u32) {
        debug_assert!(
            self.available >= quantity,
            "give of {quantity} from {} available",
            self.available
        );
        self.available -= quantity;
        self.assigned -= quantity;
        self.check();
    }

    pub(super) fn receive(&mut self, quantity: u32) {
        self.available += quantity;
        self.assigned += quantity;
        self.check();
    }

    /// Adds `quantity` to a member's count.
    pub(super) fn add_member_units(&mut self, member: Uuid, quantity: u32) {
        *self.members.entry(member).or_insert(0) += quantity;
    }
}

/// Holds per chunk of a hold list. A chunk of 1024 records of 56 bytes (56 KiB) stays below the allocator's
/// threshold for a fresh mapping, so chunks come from (and go back to) its heap.
const CHUNK: usize = 1024;

/// A shard's holds in the order they were taken, indexed by slot. It grows a chunk at a time and never moves a
/// record: a plain `Vec` would copy every record of the shard, under its lock, each time it doubled.
#[derive(Debug, Default)]
pub(super) struct HoldList {
    /// Every chunk but the last is full.
    chunks: Vec<Vec<HoldView>>,
}

impl HoldList {
    pub(super) fn len(&self) -> usize {
        self.chunks
            .last()
            .map_or(0, |last| (self.chunks.len() - 1) * CHUNK + last.len())
    }

    /// Appends a hold; its slot is the length before the call.
    pub(super) fn push(&mut self, hold: HoldView) {
        match self.chunks.last_mut() {
            Some(chunk) if chunk.len() < CHUNK => chunk.push(hold),
            _ => {
                let mut chunk = Vec::with_capacity(CHUNK);
                chunk.push(hold);
                self.chunks.push(chunk);
            }
        }
    }

    pub(super) fn get(&self, slot: usize) -> Option<&HoldView> {
        self.chunks.get(slot / CHUNK)?.get(slot % CHUNK)
    }

    pub(super) fn get_mut(&mut self, slot: usize) -> Option<&mut HoldView> {
        self.chunks.get_mut(slot / CHUNK)?.get_mut(slot % CHUNK)
    }
}
