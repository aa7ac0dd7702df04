//! `DropBook`: one drop's sharded stock, hold records and per-member counts, shared by many threads without a
//! global lock on the reservation path.
//!
//! Locks, and the one order they are taken in (so no cycle, and no DashMap self-deadlock, is possible):
//! 1. a member's entry in `members` (held for the whole of a reservation, which makes the limit check atomic);
//! 2. stock shards: one at a time, or all of them in index order (slow path of a reservation, `counts`);
//! 3. a hold's entry in `holds`.
//!
//! A transition decides under the hold's entry alone, unlocks it, and only then does the shard and member
//! accounting, so no code ever holds a hold entry while it takes a shard or member lock, and no code ever holds two
//! entries of the same map.

use super::shard::{Due, Shard};
use super::{
    Counts, DropParams, HoldState, HoldView, ReleaseReason, ReserveRejection, RestoreError,
    RestoredHold, TransitionError, MAX_SHARDS,
};
use crossbeam_utils::CachePadded;
use dashmap::mapref::entry::Entry;
use dashmap::DashMap;
use parking_lot::{Mutex, MutexGuard};
use std::sync::atomic::{AtomicBool, Ordering};
use uuid::Uuid;

/// The hasher of the book's maps, keyed by ids. Fx rather than SipHash: the keys are server-made UUIDs (random or
/// random in their low bits), so no client can choose keys that collide, and Fx is several times cheaper.
pub type IdHasher = rustc_hash::FxBuildHasher;

/// Shards of each DashMap. Explicit rather than DashMap's default (4 x cores), so that two threads working on
/// unrelated holds rarely meet on one map lock.
const MAP_SHARDS: usize = 64;

/// Most entries a map is sized for up front: a big drop should not allocate its whole hold table before it opens.
const MAP_PRESIZE_MAX: usize = 1 << 16;

/// What the book keeps about one hold. `shard` is the one shard its units are charged to, for its whole life.
#[derive(Clone, Copy, Debug)]
struct HoldRecord {
    member: Uuid,
    quantity: u32,
    shard: u32,
    state: HoldState,
    created_at_ms: i64,
    expires_at_ms: i64,
}

impl HoldRecord {
    fn view(&self, id: Uuid) -> HoldView {
        HoldView {
            id,
            member: self.member,
            quantity: self.quantity,
            state: self.state,
            created_at_ms: self.created_at_ms,
            expires_at_ms: self.expires_at_ms,
        }
    }

    fn shard(&self) -> usize {
        self.shard as usize
    }
}

/// What the reaper does with an expiry entry it could not settle now.
enum Reap {
    /// Look again on the next reap: the hold is `paying`, not yet due, or its reservation is still being recorded.
    Later,
    /// Forget the entry: the hold is already paid or released.
    Done,
}

/// One drop's stock, holds and member counts. See the module documentation for the lock order.
pub struct DropBook {
    params: DropParams,
    /// `shards.len() - 1`; the shard count is a power of two.
    shard_mask: usize,
    shards: Box<[CachePadded<Mutex<Shard>>]>,
    /// Set only while every shard is locked and total available is zero; cleared by every release that finds it set.
    sold_out: CachePadded<AtomicBool>,
    /// Units of each member's held, paying and paid holds. Members with zero units have no entry.
    members: DashMap<Uuid, u32, IdHasher>,
    holds: DashMap<Uuid, HoldRecord, IdHasher>,
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
        let shards = (0..params.shards)
            .map(|index| {
                let units = split(params.stock, params.shards, index);
                Shard {
                    assigned: units,
                    available: units,
                    ..Shard::default()
                }
            })
            .collect();
        Self::assemble(params, shards, new_map(params.stock), new_map(params.stock))
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
        let mut shards: Vec<Shard> = (0..params.shards).map(|_| Shard::default()).collect();
        let holds = new_map(params.stock);
        let members = new_map(params.stock);
        for hold in &held {
            let home = home_shard(hold.member, shard_mask);
            match holds.entry(hold.id) {
                Entry::Occupied(_) => return Err(RestoreError::DuplicateHold(hold.id)),
                Entry::Vacant(vacant) => {
                    vacant.insert(HoldRecord {
                        member: hold.member,
                        quantity: hold.quantity,
                        shard: home as u32,
                        state: HoldState::Held,
                        created_at_ms: hold.created_at_ms,
                        expires_at_ms: hold.expires_at_ms,
                    });
                }
            }
            *members.entry(hold.member).or_insert(0) += hold.quantity;
            let shard = &mut shards[home];
            shard.held += hold.quantity;
            shard.expiry.push_back((hold.expires_at_ms, hold.id));
        }
        for &(member, units) in &paid {
            *members.entry(member).or_insert(0) += units;
        }
        let available = params.stock - committed;
        for (index, shard) in shards.iter_mut().enumerate() {
            shard.paid = split(paid_total, params.shards, index);
            shard.available = split(available, params.shards, index);
            shard.assigned = shard.available + shard.held + shard.paid;
        }
        Ok(Self::assemble(params, shards, holds, members))
    }

    fn assemble(
        params: DropParams,
        shards: Vec<Shard>,
        holds: DashMap<Uuid, HoldRecord, IdHasher>,
        members: DashMap<Uuid, u32, IdHasher>,
    ) -> Self {
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
            members,
            holds,
        }
    }

    /// The parameters in force (with `shards` normalized).
    pub fn params(&self) -> DropParams {
        self.params
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
        let expires_at_ms = now_ms.saturating_add(self.params.hold_ms);

        // The member's entry stays locked until its count is written back: check and take are one step per member.
        let member_entry = self.members.entry(member);
        let units_before = match &member_entry {
            Entry::Occupied(occupied) => *occupied.get(),
            Entry::Vacant(_) => 0,
        };
        if u64::from(units_before) + u64::from(quantity) > u64::from(self.params.per_member_limit) {
            return Err(ReserveRejection::LimitExceeded);
        }
        let home = home_shard(member, self.shard_mask);
        let shard = self
            .take_stock(home, quantity, (expires_at_ms, hold_id))
            .ok_or(ReserveRejection::SoldOut)?;

        let record = HoldRecord {
            member,
            quantity,
            shard: shard as u32,
            state: HoldState::Held,
            created_at_ms: now_ms,
            expires_at_ms,
        };
        // Checked after the stock is taken, with a single lookup, because a repeated id is a caller bug and the
        // common path should not pay twice for it. The hold's expiry entry stays queued; the reaper finds it
        // belongs to another hold (or none) and drops it in due course.
        let vacant = match self.holds.entry(hold_id) {
            Entry::Vacant(vacant) => Some(vacant),
            Entry::Occupied(_) => None,
        };
        let Some(vacant) = vacant else {
            self.return_units(shard, quantity);
            return Err(ReserveRejection::DuplicateHold);
        };
        // Both writes land in table slots that are usually not in cache. Doing them back to back, before either
        // entry is unlocked, lets the two misses overlap: an unlock is an atomic that waits for every earlier store.
        let _member_units = match member_entry {
            Entry::Occupied(mut occupied) => {
                *occupied.get_mut() = units_before + quantity;
                occupied.into_ref()
            }
            Entry::Vacant(vacant) => vacant.insert(quantity),
        };
        vacant.insert(record);
        Ok(record.view(hold_id))
    }

    /// Takes `quantity` units from the home shard, else from the first other shard that has them, else (slow path)
    /// from all shards at once; returns the shard the hold is charged to, or `None` if fewer units are available
    /// in total.
    fn take_stock(&self, home: usize, quantity: u32, due: Due) -> Option<usize> {
        if self.shards[home].lock().try_take(quantity, due) {
            return Some(home);
        }
        // One lock at a time, so stealing never waits on two shards and cannot deadlock with anything.
        for step in 1..self.shards.len() {
            let index = (home + step) & self.shard_mask;
            if self.shards[index].lock().try_take(quantity, due) {
                return Some(index);
            }
        }
        self.rebalance_take(home, quantity, due)
    }

    /// The slow path: with every shard locked, the total is exact. If it covers `quantity`, units move into the
    /// home shard until it alone does, and the hold is charged there. This is what makes the last units sellable
    /// however they are spread.
    fn rebalance_take(&self, home: usize, quantity: u32, due: Due) -> Option<usize> {
        let mut guards = self.lock_all();
        let total: u64 = guards.iter().map(|shard| u64::from(shard.available)).sum();
        if total < u64::from(quantity) {
            if total == 0 {
                self.sold_out.store(true, Ordering::Release);
            }
            return None;
        }
        let mut missing = quantity.saturating_sub(guards[home].available);
        for step in 1..guards.len() {
            if missing == 0 {
                break;
            }
            let index = (home + step) & self.shard_mask;
            let moved = missing.min(guards[index].available);
            guards[index].give(moved);
            guards[home].receive(moved);
            missing -= moved;
        }
        let taken = guards[home].try_take(quantity, due);
        debug_assert!(
            taken,
            "rebalance left the home shard short: {:?}",
            *guards[home]
        );
        taken.then_some(home)
    }

    /// Locks every shard in index order, the one order in which more than one shard is ever locked.
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
        let hold = self.apply(hold_id, TransitionError::NotFound, |record| {
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
        self.apply(hold_id, TransitionError::NotFound, |record| {
            match record.state {
                HoldState::Paying => Ok(to),
                other => Err(refusal(other)),
            }
        })
    }

    /// `held -> released(Cancelled)`, for the hold's owner; refused while a payment is in flight.
    pub fn cancel(&self, hold_id: Uuid, member: Uuid) -> Result<HoldView, TransitionError> {
        self.apply(hold_id, TransitionError::NotFound, |record| {
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
        let mut later: Vec<Due> = Vec::new();
        for shard in self.shards.iter() {
            {
                let mut shard = shard.lock();
                due.append(&mut shard.deferred);
                while shard.expiry.front().is_some_and(|&(at, _)| at <= now_ms) {
                    due.extend(shard.expiry.pop_front());
                }
            }
            // The shard is unlocked again: releasing a hold takes its hold entry, then a shard lock.
            for (at, hold_id) in due.drain(..) {
                let reaped = self.apply(hold_id, Reap::Later, |record| match record.state {
                    HoldState::Held if record.expires_at_ms <= now_ms => {
                        Ok(HoldState::Released(ReleaseReason::Expired))
                    }
                    // Not yet due: a caller's clock behind this entry's, or the entry of a refused duplicate id.
                    HoldState::Held | HoldState::Paying => Err(Reap::Later),
                    HoldState::Paid | HoldState::Released(_) => Err(Reap::Done),
                });
                match reaped {
                    Ok(hold) => out.push(hold),
                    Err(Reap::Later) => later.push((at, hold_id)),
                    Err(Reap::Done) => {}
                }
            }
            if !later.is_empty() {
                shard.lock().deferred.append(&mut later);
            }
        }
        out.len() - before
    }

    /// Decides a transition under the hold's entry alone, then, with the entry unlocked, moves the units it frees
    /// or settles. `decide` sees the record and returns the next state or the refusal.
    fn apply<E>(
        &self,
        hold_id: Uuid,
        missing: E,
        decide: impl FnOnce(&HoldRecord) -> Result<HoldState, E>,
    ) -> Result<HoldView, E> {
        let (from, hold, shard) = {
            let Some(mut record) = self.holds.get_mut(&hold_id) else {
                return Err(missing);
            };
            let to = decide(&record)?;
            let from = record.state;
            record.state = to;
            (from, record.view(hold_id), record.shard())
        };
        match (from, hold.state) {
            (HoldState::Held | HoldState::Paying, HoldState::Released(_)) => {
                self.return_units(shard, hold.quantity);
                self.return_member_units(hold.member, hold.quantity);
            }
            (HoldState::Paying, HoldState::Paid) => self.shards[shard].lock().settle(hold.quantity),
            (HoldState::Held, HoldState::Paying) | (HoldState::Paying, HoldState::Held) => {}
            // Every `decide` refuses other moves; reaching this is a bug in this file.
            (from, to) => debug_assert!(false, "no transition from {from:?} to {to:?}"),
        }
        Ok(hold)
    }

    /// Returns a released hold's units to sale and clears the sold-out flag.
    fn return_units(&self, shard: usize, quantity: u32) {
        self.shards[shard].lock().release(quantity);
        // Cleared after the units are back, so a reservation that then reads `false` can find them. Any set that
        // saw zero happened under this shard's lock before our release took it, so this load sees it.
        if self.sold_out.load(Ordering::Acquire) {
            self.sold_out.store(false, Ordering::Release);
        }
    }

    fn return_member_units(&self, member: Uuid, quantity: u32) {
        match self.members.entry(member) {
            Entry::Occupied(mut occupied) => {
                let left = occupied.get().checked_sub(quantity);
                debug_assert!(
                    left.is_some(),
                    "member {member} returns {quantity} of {}",
                    occupied.get()
                );
                match left.unwrap_or(0) {
                    0 => {
                        occupied.remove();
                    }
                    left => *occupied.get_mut() = left,
                }
            }
            Entry::Vacant(_) => debug_assert!(
                false,
                "member {member} returns {quantity} units it does not have"
            ),
        }
    }

    /// The hold as it is now, if the book has it (released and paid holds stay in the book).
    pub fn hold(&self, hold_id: Uuid) -> Option<HoldView> {
        self.holds.get(&hold_id).map(|record| record.view(hold_id))
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
                "shard conservation broken: {:?}",
                **shard
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
        self.members.get(&member).map_or(0, |units| *units)
    }

    /// Per shard `(assigned, available, held, paid)`, for tests of where units sit.
    #[cfg(test)]
    pub(super) fn shard_counts(&self) -> Vec<(u32, u32, u32, u32)> {
        self.lock_all()
            .iter()
            .map(|shard| (shard.assigned, shard.available, shard.held, shard.paid))
            .collect()
    }

    /// The shard a hold is charged to, for tests.
    #[cfg(test)]
    pub(super) fn hold_shard(&self, hold_id: Uuid) -> Option<usize> {
        self.holds.get(&hold_id).map(|record| record.shard())
    }

    /// The shard a member's reservations start from, for tests.
    #[cfg(test)]
    pub(super) fn home_of(&self, member: Uuid) -> usize {
        home_shard(member, self.shard_mask)
    }
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

/// The shard a member's reservations try first. Member ids are random (v4) or random in their low bits (v7), and a
/// multiply folds both halves into the top bits, so members spread evenly without hashing the whole id.
fn home_shard(member: Uuid, shard_mask: usize) -> usize {
    let (high, low) = member.as_u64_pair();
    ((high ^ low).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32) as usize & shard_mask
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

fn new_map<V>(stock: u32) -> DashMap<Uuid, V, IdHasher> {
    let capacity = (stock as usize).min(MAP_PRESIZE_MAX);
    DashMap::with_capacity_and_hasher_and_shard_amount(capacity, IdHasher::default(), MAP_SHARDS)
}
