//! One stock shard: a slice of a drop's stock with its own lock, so that reservations on different shards never
//! wait for each other. Every method that moves units checks the shard's conservation invariant.

use std::collections::VecDeque;
use uuid::Uuid;

/// One expiry-queue entry: when the hold is due and which hold it is.
pub(super) type Due = (i64, Uuid);

/// **Invariant:** `available + held + paid == assigned`. `held` includes `paying` holds.
#[derive(Debug, Default)]
pub(super) struct Shard {
    /// Units this shard is responsible for; the slow path of a reservation moves them between shards.
    pub(super) assigned: u32,
    pub(super) available: u32,
    pub(super) held: u32,
    pub(super) paid: u32,
    /// Holds charged to this shard in the order they were taken, which is the order they expire in because every
    /// hold of a drop lasts `hold_ms`.
    pub(super) expiry: VecDeque<Due>,
    /// Entries the reaper popped but could not settle yet (the hold was `paying`, or its reservation had not
    /// finished recording it); looked at again on every reap.
    pub(super) deferred: Vec<Due>,
}

impl Shard {
    pub(super) fn check(&self) {
        debug_assert_eq!(
            u64::from(self.available) + u64::from(self.held) + u64::from(self.paid),
            u64::from(self.assigned),
            "shard conservation broken: {self:?}"
        );
    }

    /// Takes `quantity` available units into `held` and queues the hold's expiry, or does nothing and returns
    /// false when the shard has too few.
    pub(super) fn try_take(&mut self, quantity: u32, due: Due) -> bool {
        if self.available < quantity {
            return false;
        }
        self.available -= quantity;
        self.held += quantity;
        self.expiry.push_back(due);
        self.check();
        true
    }

    /// Gives the units of a released hold back to sale.
    pub(super) fn release(&mut self, quantity: u32) {
        debug_assert!(self.held >= quantity, "release of {quantity} from {self:?}");
        self.held -= quantity;
        self.available += quantity;
        self.check();
    }

    /// Moves the units of a paid hold from `held` to `paid`.
    pub(super) fn settle(&mut self, quantity: u32) {
        debug_assert!(self.held >= quantity, "settle of {quantity} from {self:?}");
        self.held -= quantity;
        self.paid += quantity;
        self.check();
    }

    /// Hands `quantity` available units to another shard (which must `receive` them under the same set of locks).
    pub(super) fn give(&mut self, quantity: u32) {
        debug_assert!(
            self.available >= quantity,
            "give of {quantity} from {self:?}"
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
}
