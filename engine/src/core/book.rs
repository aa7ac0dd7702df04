//! `DropBook`: one drop's stock, hold records and per-member counts, partitioned into shards so that a reservation
//! touches one shard's lock and cache lines, and reservations on different shards never wait for each other.
//!
//! Everything is partitioned by shard: a member's count lives in its home shard (`home_shard`, a hash of the member
//! id), a hold's record and expiry entry in the shard its id points at (`hold_shard`, the low bits of the id's last
//! byte), and a hold's units in the shard they were taken from (its `stock_shard`, the member's home shard at the
//! time). [`DropBook::hold_id_for`] makes ids that point at the member's home shard, so that for those ids all three
//! are the same shard and a reservation or transition takes exactly one lock. Any other id still works; it only
//! costs a second lock.
//!
//! **The one lock rule:** whenever more than one shard lock is held at once, they were taken in ascending shard
//! index order (two shards for a reservation whose hold id points away from the member's home shard; all of them
//! for the slow path of a reservation, `counts` and test snapshots). Every other lock is taken alone. So no cycle
//! of waits, and no deadlock, is possible.

use super::shard::{Due, HoldRecord, Shard};
use super::{
    Counts, DropParams, HoldState, HoldView, ReleaseReason, ReserveRejection, RestoreError,
    RestoredHold, TransitionError, MAX_SHARDS,
};
use crossbeam_utils::CachePadded;
use parking_lot::{Mutex, MutexGuard};
use std::collections::hash_map::Entry;
use std::sync::atomic::{AtomicBool, Ordering};
use uuid::Uuid;

/// The hasher of the book's maps, keyed by ids. Fx rather than SipHash: the keys are server-made UUIDs (random or
/// random in their low bits), so no client can choose keys that collide, and Fx is several times cheaper.
pub type IdHasher = rustc_hash::FxBuildHasher;

/// Most entries the maps of all shards together are sized for up front: a big drop should not allocate its whole
/// hold table before it opens.
const MAP_PRESIZE_MAX: usize = 1 << 16;

/// What the reaper does with an expiry entry it could not settle now.
enum Reap {
    /// Look again on the next reap: the hold is `paying`, or not yet due by this call's clock.
    Later,
    /// Forget the entry: the hold is already paid or released.
    Done,
}

/// Why a reservation stopped under its shard lock(s).
enum Stop {
    Refused(ReserveRejection),
    /// The home shard has fewer than `quantity` units available; the slow path looks at all shards.
    Short,
}

/// One drop's stock, holds and member counts. See the module documentation for the one lock rule.
pub struct DropBook {
    params: DropParams,
    /// `shards.len() - 1`; the shard count is a power of two, at most `MAX_SHARDS` (so the mask fits in a byte).
    shard_mask: usize,
    shards: Box<[CachePadded<Mutex<Shard>>]>,
    /// Set only while every shard is locked and total available is zero; cleared by every release that finds it set.
    sold_out: CachePadded<AtomicBool>,
}

impl std::fmt::Debug for DropBook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DropBook")
            .field("params", &self.params)
            .field("sold_out", &self.is_sold_out())
            .finish_non_exhaustive()
    }
}

impl DropBook {
    /// A book with all of `params.stock` available, split evenly over the shards.
    pub fn new(params: DropParams) -> Self {
        let params = normalize(params);
        let capacity = map_capacity(params);
        let shards = (0..params.shards)
            .map(|index| {
                let units = split(params.stock, params.shards, index);
                Shard {
                    assigned: units,
                    available: units,
                    ..Shard::with_capacity(capacity)
                }
            })
            .collect();
        Self::assemble(params, shards)
    }

    /// Rebuilds a book after a restart: `paid` = units already paid per member (from Postgres; a member may appear
    /// more than once), `held` = holds to keep, which come back as `held` with their own expiry (a hold already past
    /// it is released by the next `reap`). Member counts start at paid + held units, even above the limit.
    pub fn restore(
        params: DropParams,
        paid: impl IntoIterator<Item = (Uuid, u32)>,
        held: impl IntoIterator<Item = RestoredHold>,
    ) -> Result<Self, RestoreError> {
        let params = normalize(params);
        let paid: Vec<(Uuid, u32)> = paid.into_iter().filter(|&(_, units)| units > 0).collect();
        let mut held: Vec<RestoredHold> = held.into_iter().collect();
        if let Some(hold) = held.iter().find(|hold| hold.quantity == 0) {
            return Err(RestoreError::ZeroQuantity(hold.id));
        }
        let paid_total: u64 = paid.iter().map(|&(_, units)| u64::from(units)).sum();
        let held_total: u64 = held.iter().map(|hold| u64::from(hold.quantity)).sum();
        let committed = paid_total + held_total;
        if committed > u64::from(params.stock) {
            return Err(RestoreError::Oversold {
                stock: params.stock,
                committed,
            });
        }
        // From here on every sum is at most `stock`, so it fits in a u32.
        let (paid_total, committed) = (paid_total as u32, committed as u32);

        // Each shard's queue must be in expiry order for `reap` to stop at the first entry that is not due.
        held.sort_by_key(|hold| hold.expires_at_ms);
        let shard_mask = params.shards - 1;
        let capacity = map_capacity(params);
        let mut shards: Vec<Shard> = (0..params.shards)
            .map(|_| Shard::with_capacity(capacity))
            .collect();
        for hold in &held {
            // The units are charged to the member's home shard, as a reservation by that member would charge them.
            let home = home_shard(hold.member, shard_mask);
            let holder = &mut shards[hold_shard(hold.id, shard_mask)];
            match holder.holds.entry(hold.id) {
                Entry::Occupied(_) => return Err(RestoreError::DuplicateHold(hold.id)),
                Entry::Vacant(vacant) => {
                    vacant.insert(HoldRecord {
                        member: hold.member,
                        quantity: hold.quantity,
                        stock_shard: home as u32,
                        state: HoldState::Held,
                        created_at_ms: hold.created_at_ms,
                        expires_at_ms: hold.expires_at_ms,
                    });
                }
            }
            holder.expiry.push_back((hold.expires_at_ms, hold.id));
            let home = &mut shards[home];
            home.add_member_units(hold.member, hold.quantity);
            home.held += hold.quantity;
        }
        for &(member, units) in &paid {
            shards[home_shard(member, shard_mask)].add_member_units(member, units);
        }
        let available = params.stock - committed;
        for (index, shard) in shards.iter_mut().enumerate() {
            shard.paid = split(paid_total, params.shards, index);
            shard.available = split(available, params.shards, index);
            shard.assigned = shard.available + shard.held + shard.paid;
        }
        Ok(Self::assemble(params, shards))
    }

    fn assemble(params: DropParams, shards: Vec<Shard>) -> Self {
        let available: u64 = shards.iter().map(|shard| u64::from(shard.available)).sum();
        let assigned: u64 = shards.iter().map(|shard| u64::from(shard.assigned)).sum();
        debug_assert_eq!(assigned, u64::from(params.stock));
        shards.iter().for_each(Shard::check);
        Self {
            shard_mask: params.shards - 1,
            params,
            shards: shards
                .into_iter()
                .map(|shard| CachePadded::new(Mutex::new(shard)))
                .collect(),
            sold_out: CachePadded::new(AtomicBool::new(available == 0)),
        }
    }

    /// The parameters in force (with `shards` normalized).
    pub fn params(&self) -> DropParams {
        self.params
    }

    /// `seed` with the low bits of its last byte replaced so that the id points at `member`'s home shard: a
    /// reservation by `member` under the returned id, and every later transition of that hold, takes one shard lock.
    /// The last byte of a UUIDv7 (or v4) is random bits, so the result is as valid an id as `seed`; it is as unique
    /// as `seed` is in its other bits. Any id works with the book; this one is only faster.
    pub fn hold_id_for(&self, member: Uuid, seed: Uuid) -> Uuid {
        // The mask is below MAX_SHARDS = 256, so both casts to a byte are exact.
        let mask = self.shard_mask as u8;
        let home = home_shard(member, self.shard_mask) as u8;
        let mut bytes = *seed.as_bytes();
        bytes[15] = (bytes[15] & !mask) | home;
        Uuid::from_bytes(bytes)
    }

    /// Takes `quantity` units for `member` into a new `held` hold that expires `hold_ms` after `now_ms`.
    /// Succeeds if and only if the quantity is valid, the member stays within the limit, at least `quantity` units
    /// are available in total (over all shards) and `hold_id` is new.
    pub fn reserve(
        &self,
        hold_id: Uuid,
        member: Uuid,
        quantity: u32,
        now_ms: i64,
    ) -> Result<HoldView, ReserveRejection> {
        if quantity == 0 || quantity > self.params.per_member_limit {
            return Err(ReserveRejection::InvalidQuantity);
        }
        // The flag is set only while total available is zero and cleared by any release, so refusing on it sells
        // nothing short; it keeps the request storm on a sold-out drop off every lock.
        if self.sold_out.load(Ordering::Acquire) {
            return Err(ReserveRejection::SoldOut);
        }
        let home = home_shard(member, self.shard_mask);
        let holder = hold_shard(hold_id, self.shard_mask);
        let record = HoldRecord {
            member,
            quantity,
            stock_shard: home as u32,
            state: HoldState::Held,
            created_at_ms: now_ms,
            expires_at_ms: now_ms.saturating_add(self.params.hold_ms),
        };
        let limit = self.params.per_member_limit;
        let outcome = if holder == home {
            // The fast path: one lock, and nothing else shared is touched.
            let mut shard = self.shards[home].lock();
            reserve_locked(&mut shard, None, hold_id, record, limit)
        } else {
            let (mut home_guard, mut holder_guard) = self.lock_two(home, holder);
            reserve_locked(
                &mut home_guard,
                Some(&mut holder_guard),
                hold_id,
                record,
                limit,
            )
        };
        match outcome {
            Ok(()) => Ok(record.view(hold_id)),
            Err(Stop::Refused(rejection)) => Err(rejection),
            // The lock(s) are dropped: the slow path takes all of them, in index order.
            Err(Stop::Short) => self.reserve_slow(hold_id, record, limit),
        }
    }

    /// The slow path: with every shard locked, the total is exact. If it covers `quantity`, the available units are
    /// spread again so that the home shard has `quantity` more than an even share, and the hold is charged there;
    /// this is what makes the last units sellable however they are spread, and the even spread keeps later
    /// reservations on their fast path. With no unit left at all, the sold-out flag is set.
    fn reserve_slow(
        &self,
        hold_id: Uuid,
        record: HoldRecord,
        limit: u32,
    ) -> Result<HoldView, ReserveRejection> {
        let home = record.stock_shard();
        let holder = hold_shard(hold_id, self.shard_mask);
        let quantity = record.quantity;
        let mut guards = self.lock_all();
        // Everything is checked again: other reservations may have run between the fast path's unlock and here.
        let units = guards[home].member_units(record.member);
        if u64::from(units) + u64::from(quantity) > u64::from(limit) {
            return Err(ReserveRejection::LimitExceeded);
        }
        let total: u64 = guards.iter().map(|shard| u64::from(shard.available)).sum();
        if total < u64::from(quantity) {
            if total == 0 {
                self.sold_out.store(true, Ordering::Release);
            }
            return Err(ReserveRejection::SoldOut);
        }
        if guards[holder].holds.contains_key(&hold_id) {
            return Err(ReserveRejection::DuplicateHold);
        }
        // `total` is at most `stock`, a u32, so the cast is exact.
        let rest = total as u32 - quantity;
        let shards = guards.len();
        let target =
            |index: usize| split(rest, shards, index) + if index == home { quantity } else { 0 };
        for (index, shard) in guards.iter_mut().enumerate() {
            let target = target(index);
            let available = shard.available;
            if available > target {
                shard.give(available - target);
            }
        }
        for (index, shard) in guards.iter_mut().enumerate() {
            let target = target(index);
            let available = shard.available;
            if available < target {
                shard.receive(target - available);
            }
        }
        debug_assert_eq!(
            guards
                .iter()
                .map(|shard| u64::from(shard.assigned))
                .sum::<u64>(),
            u64::from(self.params.stock),
            "the spread made or lost units"
        );
        let (home_shard, holder_shard) = pair_mut(&mut guards, home, holder);
        let outcome = reserve_locked(home_shard, holder_shard, hold_id, record, limit);
        debug_assert!(
            outcome.is_ok(),
            "the slow path refused after its own checks"
        );
        match outcome {
            Ok(()) => Ok(record.view(hold_id)),
            Err(Stop::Refused(rejection)) => Err(rejection),
            Err(Stop::Short) => Err(ReserveRejection::SoldOut),
        }
    }

    /// Locks shards `a` and `b` (which differ), the lower index first, and returns their guards as `(a, b)`.
    fn lock_two(&self, a: usize, b: usize) -> (MutexGuard<'_, Shard>, MutexGuard<'_, Shard>) {
        debug_assert_ne!(a, b);
        if a < b {
            let first = self.shards[a].lock();
            (first, self.shards[b].lock())
        } else {
            let first = self.shards[b].lock();
            (self.shards[a].lock(), first)
        }
    }

    /// Locks every shard in index order.
    fn lock_all(&self) -> Vec<MutexGuard<'_, Shard>> {
        self.shards.iter().map(|shard| shard.lock()).collect()
    }

    /// `held -> paying`, for the hold's owner. A hold at or past its expiry is released as `Expired` instead, and
    /// the call fails with [`TransitionError::Expired`].
    pub fn begin_payment(
        &self,
        hold_id: Uuid,
        member: Uuid,
        now_ms: i64,
    ) -> Result<HoldView, TransitionError> {
        let hold = self.apply(hold_id, |record| {
            if record.member != member {
                return Err(TransitionError::NotOwner);
            }
            match record.state {
                HoldState::Held if record.expires_at_ms <= now_ms => {
                    Ok(HoldState::Released(ReleaseReason::Expired))
                }
                HoldState::Held => Ok(HoldState::Paying),
                other => Err(refusal(other)),
            }
        })?;
        if hold.state == HoldState::Released(ReleaseReason::Expired) {
            return Err(TransitionError::Expired);
        }
        Ok(hold)
    }

    /// `paying -> paid`: the units stay sold and keep counting towards the member's limit.
    pub fn complete_payment(&self, hold_id: Uuid) -> Result<HoldView, TransitionError> {
        self.apply_from_paying(hold_id, HoldState::Paid)
    }

    /// `paying -> held`, when the payment call could not be made (gateway unavailable). The hold keeps its expiry; if
    /// that has passed, the next `reap` releases it.
    pub fn abort_payment(&self, hold_id: Uuid) -> Result<HoldView, TransitionError> {
        self.apply_from_paying(hold_id, HoldState::Held)
    }

    /// `paying -> released(PaymentDeclined)`: the units return to sale.
    pub fn decline_payment(&self, hold_id: Uuid) -> Result<HoldView, TransitionError> {
        self.apply_from_paying(hold_id, HoldState::Released(ReleaseReason::PaymentDeclined))
    }

    fn apply_from_paying(&self, hold_id: Uuid, to: HoldState) -> Result<HoldView, TransitionError> {
        self.apply(hold_id, |record| match record.state {
            HoldState::Paying => Ok(to),
            other => Err(refusal(other)),
        })
    }

    /// `held -> released(Cancelled)`, for the hold's owner; refused while a payment is in flight.
    pub fn cancel(&self, hold_id: Uuid, member: Uuid) -> Result<HoldView, TransitionError> {
        self.apply(hold_id, |record| {
            if record.member != member {
                return Err(TransitionError::NotOwner);
            }
            match record.state {
                HoldState::Held => Ok(HoldState::Released(ReleaseReason::Cancelled)),
                other => Err(refusal(other)),
            }
        })
    }

    /// Releases every `held` hold whose `expires_at_ms <= now_ms`, pushes each into `out` and returns how many.
    /// Only due queue entries are visited. A hold that is `paying` is kept aside and looked at again on every later
    /// call, so that after `abort_payment` it still expires.
    pub fn reap(&self, now_ms: i64, out: &mut Vec<HoldView>) -> usize {
        let before = out.len();
        let mut due: Vec<Due> = Vec::new();
        let mut elsewhere: Vec<Pending> = Vec::new();
        for (index, shard) in self.shards.iter().enumerate() {
            {
                let mut guard = shard.lock();
                let shard = &mut *guard;
                due.append(&mut shard.deferred);
                while shard.expiry.front().is_some_and(|&(at, _)| at <= now_ms) {
                    due.extend(shard.expiry.pop_front());
                }
                // An entry's hold is recorded in the shard whose queue holds it, so it is decided under this lock.
                for (at, hold_id) in due.drain(..) {
                    let reaped = decide(shard, hold_id, Reap::Done, |record| match record.state {
                        HoldState::Held if record.expires_at_ms <= now_ms => {
                            Ok(HoldState::Released(ReleaseReason::Expired))
                        }
                        // Not yet due: a caller's clock behind this entry's.
                        HoldState::Held | HoldState::Paying => Err(Reap::Later),
                        HoldState::Paid | HoldState::Released(_) => Err(Reap::Done),
                    });
                    match reaped {
                        Ok(pending) => {
                            out.push(pending.hold);
                            elsewhere.extend(self.account_in(shard, index, pending));
                        }
                        Err(Reap::Later) => shard.deferred.push((at, hold_id)),
                        Err(Reap::Done) => {}
                    }
                }
            }
            // The shard is unlocked again: the rest of the accounting takes other shards' locks, one at a time.
            for pending in elsewhere.drain(..) {
                self.account_rest(pending);
            }
        }
        out.len() - before
    }

    /// Decides a transition under the lock of the shard the hold's id points at, and does the accounting that
    /// belongs to that shard under the same lock; what belongs to other shards is done after, one lock at a time.
    /// `decide` sees the record and returns the next state or the refusal.
    fn apply(
        &self,
        hold_id: Uuid,
        decide_to: impl FnOnce(&HoldRecord) -> Result<HoldState, TransitionError>,
    ) -> Result<HoldView, TransitionError> {
        let index = hold_shard(hold_id, self.shard_mask);
        let (hold, rest) = {
            let mut shard = self.shards[index].lock();
            let pending = decide(&mut shard, hold_id, TransitionError::NotFound, decide_to)?;
            (pending.hold, self.account_in(&mut shard, index, pending))
        };
        if let Some(pending) = rest {
            self.account_rest(pending);
        }
        Ok(hold)
    }

    /// Does the part of a decided transition's accounting that belongs to shard `index` (locked as `shard`), and
    /// returns what is left for other shards, if anything.
    fn account_in(&self, shard: &mut Shard, index: usize, mut pending: Pending) -> Option<Pending> {
        if pending.stock_left && pending.stock_shard == index {
            pending.settle_stock(shard);
            if pending.released() {
                self.clear_sold_out();
            }
        }
        if pending.member_left && pending.home_shard(self.shard_mask) == index {
            pending.settle_member(shard);
        }
        pending.is_left().then_some(pending)
    }

    /// The accounting of a decided transition left for shards other than the hold's: each shard locked alone.
    fn account_rest(&self, mut pending: Pending) {
        if pending.stock_left {
            pending.settle_stock(&mut self.shards[pending.stock_shard].lock());
            if pending.released() {
                self.clear_sold_out();
            }
        }
        if pending.member_left {
            let home = pending.home_shard(self.shard_mask);
            pending.settle_member(&mut self.shards[home].lock());
        }
    }

    /// Cleared after a release's units are back, so a reservation that then reads `false` can find them. Any set that
    /// saw zero happened under all shard locks, so before the release took its stock shard's lock, and this load sees
    /// it.
    fn clear_sold_out(&self) {
        if self.sold_out.load(Ordering::Acquire) {
            self.sold_out.store(false, Ordering::Release);
        }
    }

    /// The hold as it is now, if the book has it (released and paid holds stay in the book).
    pub fn hold(&self, hold_id: Uuid) -> Option<HoldView> {
        let shard = self.shards[hold_shard(hold_id, self.shard_mask)].lock();
        shard.holds.get(&hold_id).map(|record| record.view(hold_id))
    }

    /// A consistent snapshot: every shard is locked (in index order) while it is read.
    pub fn counts(&self) -> Counts {
        let (mut assigned, mut available, mut held, mut paid) = (0u64, 0u64, 0u64, 0u64);
        for shard in self.lock_all().iter() {
            // Read-back half of the conservation check; a failure means units were made or lost, which must stop
            // the process rather than let it oversell.
            assert_eq!(
                u64::from(shard.available) + u64::from(shard.held) + u64::from(shard.paid),
                u64::from(shard.assigned),
                "shard conservation broken: assigned {}, available {}, held {}, paid {}",
                shard.assigned,
                shard.available,
                shard.held,
                shard.paid
            );
            assigned += u64::from(shard.assigned);
            available += u64::from(shard.available);
            held += u64::from(shard.held);
            paid += u64::from(shard.paid);
        }
        let stock = u64::from(self.params.stock);
        assert!(
            assigned == stock && available + held + paid == stock,
            "conservation broken: stock {stock}, assigned {assigned}, available {available}, held {held}, paid {paid}"
        );
        // Each part is at most `stock`, a u32, so the casts are exact.
        Counts {
            stock: self.params.stock,
            available: available as u32,
            held: held as u32,
            paid: paid as u32,
        }
    }

    /// The local sold-out flag: one atomic load, no lock. It may still be false for a moment after the last unit is
    /// taken (the next reservation sets it), and is never true while any unit is available.
    pub fn is_sold_out(&self) -> bool {
        self.sold_out.load(Ordering::Acquire)
    }

    /// Units of the member's held, paying and paid holds.
    pub fn member_units(&self, member: Uuid) -> u32 {
        self.shards[home_shard(member, self.shard_mask)]
            .lock()
            .member_units(member)
    }

    /// Per shard `(assigned, available, held, paid)`, for tests of where units sit.
    #[cfg(test)]
    pub(super) fn shard_counts(&self) -> Vec<(u32, u32, u32, u32)> {
        self.lock_all()
            .iter()
            .map(|shard| (shard.assigned, shard.available, shard.held, shard.paid))
            .collect()
    }

    /// The shard a hold's units are charged to, for tests.
    #[cfg(test)]
    pub(super) fn stock_shard_of(&self, hold_id: Uuid) -> Option<usize> {
        let shard = self.shards[hold_shard(hold_id, self.shard_mask)].lock();
        shard.holds.get(&hold_id).map(HoldRecord::stock_shard)
    }

    /// The shard a hold's record lives in, for tests.
    #[cfg(test)]
    pub(super) fn record_shard_of(&self, hold_id: Uuid) -> usize {
        hold_shard(hold_id, self.shard_mask)
    }

    /// The shard a member's reservations start from, for tests.
    #[cfg(test)]
    pub(super) fn home_of(&self, member: Uuid) -> usize {
        home_shard(member, self.shard_mask)
    }
}

/// Checks and records a reservation under the lock of the member's home shard `home` and, when the hold id points
/// elsewhere, of that shard `holder` too: the member limit and the stock in `home`, the id in the holder; then takes
/// the units from `home`, bumps the member's count there and records the hold and its expiry in the holder. Refusals
/// come in the documented order; nothing is changed unless all checks pass.
fn reserve_locked(
    home: &mut Shard,
    holder: Option<&mut Shard>,
    hold_id: Uuid,
    record: HoldRecord,
    limit: u32,
) -> Result<(), Stop> {
    let quantity = record.quantity;
    if home.available < quantity {
        return Err(Stop::Short);
    }
    // One lookup of the member: the entry found for the limit check is the one written back.
    let units = match home.members.entry(record.member) {
        Entry::Occupied(occupied) => {
            let before = *occupied.get();
            if u64::from(before) + u64::from(quantity) > u64::from(limit) {
                return Err(Stop::Refused(ReserveRejection::LimitExceeded));
            }
            MemberSlot::Occupied(occupied, before)
        }
        Entry::Vacant(vacant) => {
            if quantity > limit {
                return Err(Stop::Refused(ReserveRejection::LimitExceeded));
            }
            MemberSlot::Vacant(vacant)
        }
    };
    let (holds, expiry) = match holder {
        Some(holder) => (&mut holder.holds, &mut holder.expiry),
        None => (&mut home.holds, &mut home.expiry),
    };
    match holds.entry(hold_id) {
        Entry::Occupied(_) => return Err(Stop::Refused(ReserveRejection::DuplicateHold)),
        Entry::Vacant(vacant) => {
            vacant.insert(record);
        }
    }
    expiry.push_back((record.expires_at_ms, hold_id));
    match units {
        MemberSlot::Occupied(mut occupied, before) => *occupied.get_mut() = before + quantity,
        MemberSlot::Vacant(vacant) => {
            vacant.insert(quantity);
        }
    }
    home.take(quantity);
    Ok(())
}

/// The member's map slot, found once and written after the hold is in.
enum MemberSlot<'a> {
    Occupied(
        std::collections::hash_map::OccupiedEntry<'a, Uuid, u32>,
        u32,
    ),
    Vacant(std::collections::hash_map::VacantEntry<'a, Uuid, u32>),
}

/// The guards at `home` and `holder` (the same shard when they are equal, returned once), from all the guards.
fn pair_mut<'a, 'g>(
    guards: &'a mut [MutexGuard<'g, Shard>],
    home: usize,
    holder: usize,
) -> (&'a mut Shard, Option<&'a mut Shard>) {
    if home == holder {
        return (&mut guards[home], None);
    }
    let (low, high) = guards.split_at_mut(home.max(holder));
    let (at_low, at_high) = (&mut *low[home.min(holder)], &mut *high[0]);
    if home < holder {
        (at_low, Some(at_high))
    } else {
        (at_high, Some(at_low))
    }
}

/// A transition decided under the hold's lock, with the accounting still to do (`*_left`).
struct Pending {
    hold: HoldView,
    from: HoldState,
    stock_shard: usize,
    stock_left: bool,
    member_left: bool,
}

impl Pending {
    fn released(&self) -> bool {
        matches!(self.hold.state, HoldState::Released(_))
    }

    fn home_shard(&self, shard_mask: usize) -> usize {
        home_shard(self.hold.member, shard_mask)
    }

    fn is_left(&self) -> bool {
        self.stock_left || self.member_left
    }

    /// Returns a released hold's units to sale, or settles a paid one's, in its stock shard (locked as `shard`).
    fn settle_stock(&mut self, shard: &mut Shard) {
        let quantity = self.hold.quantity;
        match (self.from, self.hold.state) {
            (HoldState::Held | HoldState::Paying, HoldState::Released(_)) => {
                shard.release(quantity)
            }
            (HoldState::Paying, HoldState::Paid) => shard.settle(quantity),
            (HoldState::Held, HoldState::Paying) | (HoldState::Paying, HoldState::Held) => {}
            // Every `decide` refuses other moves; reaching this is a bug in this file.
            (from, to) => debug_assert!(false, "no transition from {from:?} to {to:?}"),
        }
        self.stock_left = false;
    }

    /// Gives a released hold's units back to its member, in the member's home shard (locked as `shard`).
    fn settle_member(&mut self, shard: &mut Shard) {
        if self.released() {
            shard.return_member_units(self.hold.member, self.hold.quantity);
        }
        self.member_left = false;
    }
}

/// Decides a transition of the hold recorded in `shard` (the shard its id points at, locked) and writes the new
/// state; the accounting is left to the caller. `missing` is the refusal for an id the shard does not have.
fn decide<E>(
    shard: &mut Shard,
    hold_id: Uuid,
    missing: E,
    decide_to: impl FnOnce(&HoldRecord) -> Result<HoldState, E>,
) -> Result<Pending, E> {
    let Some(record) = shard.holds.get_mut(&hold_id) else {
        return Err(missing);
    };
    let to = decide_to(record)?;
    let from = record.state;
    record.state = to;
    let moves_units = matches!(
        (from, to),
        (_, HoldState::Released(_)) | (_, HoldState::Paid)
    );
    Ok(Pending {
        hold: record.view(hold_id),
        from,
        stock_shard: record.stock_shard(),
        stock_left: moves_units,
        member_left: matches!(to, HoldState::Released(_)),
    })
}

/// Why a transition cannot start from `state`.
fn refusal(state: HoldState) -> TransitionError {
    match state {
        HoldState::Held => TransitionError::NotPaying,
        HoldState::Paying => TransitionError::PaymentInFlight,
        HoldState::Paid => TransitionError::AlreadyPaid,
        HoldState::Released(reason) => TransitionError::AlreadyReleased(reason),
    }
}

/// The shard a member's count lives in and its reservations take stock from. Member ids are random (v4) or random
/// in their low bits (v7), and a multiply folds both halves into the top bits, so members spread evenly without
/// hashing the whole id.
fn home_shard(member: Uuid, shard_mask: usize) -> usize {
    let (high, low) = member.as_u64_pair();
    ((high ^ low).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32) as usize & shard_mask
}

/// The shard a hold's record and expiry entry live in: read from the id itself (the low bits of its last byte,
/// random in v4 and v7 ids), so finding a hold needs no lookup. See [`DropBook::hold_id_for`].
fn hold_shard(hold_id: Uuid, shard_mask: usize) -> usize {
    usize::from(hold_id.as_bytes()[15]) & shard_mask
}

/// `total` split over `parts`, the first `total % parts` parts getting one more.
fn split(total: u32, parts: usize, index: usize) -> u32 {
    // `parts` is at most MAX_SHARDS, so both casts are exact.
    let (parts, index) = (parts as u32, index as u32);
    total / parts + u32::from(index < total % parts)
}

fn normalize(params: DropParams) -> DropParams {
    DropParams {
        shards: params.shards.clamp(1, MAX_SHARDS).next_power_of_two(),
        ..params
    }
}

/// Entries each shard's maps are sized for: its even share of the stock (one hold per unit is the busy case), with
/// the whole book capped at `MAP_PRESIZE_MAX`.
fn map_capacity(params: DropParams) -> usize {
    (params.stock as usize)
        .min(MAP_PRESIZE_MAX)
        .div_ceil(params.shards)
}
