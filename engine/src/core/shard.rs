//! One shard of a drop: a slice of its stock, the counts of the members whose home it is and the records of the
//! holds whose id points at it, all behind one lock, so that a reservation by a member on a hold id of the same
//! shard touches one lock and nothing else shared. Every method that moves units checks the shard's conservation
//! invariant.

use super::{HoldState, HoldView, IdHasher};
use std::collections::{HashMap, VecDeque};
use uuid::Uuid;

/// One expiry-queue entry: when the hold is due and which hold it is.
pub(super) type Due = (i64, Uuid);

/// What the book keeps about one hold. `stock_shard` is the one shard its units are charged to, for its whole life;
/// the record itself lives in the shard its id points at (`hold_shard`), and its member's count in the member's home
/// shard.
#[derive(Clone, Copy, Debug)]
pub(super) struct HoldRecord {
    pub(super) member: Uuid,
    pub(super) quantity: u32,
    pub(super) stock_shard: u32,
    pub(super) state: HoldState,
    pub(super) created_at_ms: i64,
    pub(super) expires_at_ms: i64,
}

impl HoldRecord {
    pub(super) fn view(&self, id: Uuid) -> HoldView {
        HoldView {
            id,
            member: self.member,
            quantity: self.quantity,
            state: self.state,
            created_at_ms: self.created_at_ms,
            expires_at_ms: self.expires_at_ms,
        }
    }

    pub(super) fn stock_shard(&self) -> usize {
        self.stock_shard as usize
    }
}

/// **Invariant:** `available + held + paid == assigned`. `held` includes `paying` holds.
#[derive(Debug, Default)]
pub(super) struct Shard {
    /// Units this shard is responsible for; the slow path of a reservation moves them between shards.
    pub(super) assigned: u32,
    pub(super) available: u32,
    pub(super) held: u32,
    pub(super) paid: u32,
    /// Holds recorded in this shard in the order they were taken, which is the order they expire in because every
    /// hold of a drop lasts `hold_ms` (restored holds are queued sorted by expiry).
    pub(super) expiry: VecDeque<Due>,
    /// Entries the reaper popped but could not settle yet (the hold was `paying`, or not yet due by the caller's
    /// clock); looked at again on every reap.
    pub(super) deferred: Vec<Due>,
    /// Units of the held, paying and paid holds of the members whose home shard this is. Members with zero units have
    /// no entry.
    pub(super) members: HashMap<Uuid, u32, IdHasher>,
    /// Records of the holds whose id points at this shard. Released and paid holds stay.
    pub(super) holds: HashMap<Uuid, HoldRecord, IdHasher>,
}

impl Shard {
    /// An empty shard whose maps and expiry queue are sized for `capacity` holds and members.
    pub(super) fn with_capacity(capacity: usize) -> Self {
        Self {
            members: HashMap::with_capacity_and_hasher(capacity, IdHasher::default()),
            holds: HashMap::with_capacity_and_hasher(capacity, IdHasher::default()),
            expiry: VecDeque::with_capacity(capacity),
            ..Self::default()
        }
    }

    pub(super) fn check(&self) {
        debug_assert_eq!(
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

    /// Gives the units of a released hold back to sale.
    pub(super) fn release(&mut self, quantity: u32) {
        debug_assert!(
            self.held >= quantity,
            "release of {quantity} from {} held",
            self.held
        );
        self.held -= quantity;
        self.available += quantity;
        self.check();
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

    /// Takes a released hold's units off its member's count, forgetting members that reach zero.
    pub(super) fn return_member_units(&mut self, member: Uuid, quantity: u32) {
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
}
