//! `DropBook`: one drop's stock, hold records and per-member counts, partitioned into shards so that a reservation
//! touches one shard's lock and cache lines, and reservations on different shards never wait for each other.
//!
//! Everything about a member lives in the member's home shard (`home_shard`, a hash of the member id): its count,
//! its holds, and the stock its holds are charged to. A hold is recorded by appending it to its shard's hold list,
//! and its id names its place: the book makes the id from the caller's seed, writing the shard and the slot (the
//! index in that list) into its last four bytes (`mint`). So a reservation is
//! one lock, one member-map entry and one append, with no map of holds to insert into, and every later transition
//! of the hold reads its place from the id and takes the same one lock. Holds restored after a restart keep the ids
//! an earlier book made; the book keeps their places in a map fixed at restore (`restored`), read without a lock.
//!
//! **The one lock rule:** whenever more than one shard lock is held at once, all of them were taken in ascending
//! shard index order (the slow path of a reservation, `counts` and test snapshots). Every other lock is taken alone.
//! So no cycle of waits, and no deadlock, is possible.

use super::shard::Shard;
use super::{
    Counts, DropParams, HoldState, HoldView, ReleaseReason, ReserveRejection, RestoreError,
    RestoredHold, TransitionError, MAX_SHARDS,
};
use crossbeam_utils::CachePadded;
use parking_lot::{Mutex, MutexGuard};
use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use uuid::Uuid;

/// The hasher of the book's maps, keyed by ids. Fx rather than SipHash: the keys are member ids (random, or random
/// in their low bits) and ids an earlier book made, so no client can choose keys that collide, and Fx is several
/// times cheaper.
pub type IdHasher = rustc_hash::FxBuildHasher;

/// Most members the member maps of all shards together are sized for up front: a big drop should not allocate for
/// every buyer before it opens.
const PRESIZE_MAX: usize = 1 << 16;

/// Where a hold sits: its shard, and its index in that shard's hold list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Place {
    shard: usize,
    slot: usize,
}

/// Why a reservation stopped under its shard lock.
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
    /// The places of the holds given to `restore`, whose ids an earlier book made. Never changed after the book is
    /// built; empty for a new drop.
    restored: HashMap<Uuid, Place, IdHasher>,
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
        let capacity = presize(params);
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
        Self::assemble(params, shards, HashMap::default())
    }

    /// Rebuilds a book after a restart: `paid` = units already paid per member (from Postgres; a member may appear
    /// more than once), `held` = holds to keep, which come back as `held` with their own ids and expiry (a hold
    /// already past it is released by the next `reap`). Member counts start at paid + held units, even above the
    /// limit.
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

        // Each shard's hold list must be in expiry order for `reap` to stop at the first hold that is not due.
        held.sort_by_key(|hold| hold.expires_at_ms);
        let shard_mask = params.shards - 1;
        let capacity = presize(params);
        let mut shards: Vec<Shard> = (0..params.shards)
            .map(|_| Shard::with_capacity(capacity))
            .collect();
        let mut restored = HashMap::with_capacity_and_hasher(held.len(), IdHasher::default());
        for hold in &held {
            // Recorded and charged in the member's home shard, as a reservation by that member would be.
            let home = home_shard(hold.member, shard_mask);
            let shard = &mut shards[home];
            let place = Place {
                shard: home,
                slot: shard.holds.len(),
            };
            match restored.entry(hold.id) {
                Entry::Occupied(_) => return Err(RestoreError::DuplicateHold(hold.id)),
                Entry::Vacant(vacant) => {
                    vacant.insert(place);
                }
            }
            shard.holds.push(HoldView {
                id: hold.id,
                member: hold.member,
                quantity: hold.quantity,
                state: HoldState::Held,
                created_at_ms: hold.created_at_ms,
                expires_at_ms: hold.expires_at_ms,
            });
            shard.add_member_units(hold.member, hold.quantity);
            shard.held += hold.quantity;
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
        Ok(Self::assemble(params, shards, restored))
    }

    fn assemble(
        params: DropParams,
        shards: Vec<Shard>,
        restored: HashMap<Uuid, Place, IdHasher>,
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
            restored,
        }
    }

    /// The parameters in force (with `shards` normalized).
    pub fn params(&self) -> DropParams {
        self.params
    }

    /// Takes `quantity` units for `member` into a new `held` hold that expires `hold_ms` after `now_ms`.
    /// Succeeds if and only if the quantity is valid, the member stays within the limit and at least `quantity`
    /// units are available in total (over all shards).
    ///
    /// The hold's id is made from `seed` (see `mint`): it keeps the seed's first 12 bytes (a UUIDv7's timestamp,
    /// version, variant and counter) and writes the hold's place into the last four, so it is unique in this book
    /// whatever the seed, and unique among all holds of the process when seeds come from `Uuid::now_v7`. The
    /// returned view carries it; every later call about the hold takes that id.
    pub fn reserve(
        &self,
        seed: Uuid,
        member: Uuid,
        quantity: u32,
        now_ms: i64,
    ) -> Result<HoldView, ReserveRejection> {
        let limit = self.params.per_member_limit;
        if quantity == 0 || quantity > limit {
            return Err(ReserveRejection::InvalidQuantity);
        }
        // The flag is set only while total available is zero and cleared by any release, so refusing on it sells
        // nothing short; it keeps the request storm on a sold-out drop off every lock.
        if self.sold_out.load(Ordering::Acquire) {
            return Err(ReserveRejection::SoldOut);
        }
        let home = home_shard(member, self.shard_mask);
        let hold = HoldView {
            id: seed,
            member,
            quantity,
            state: HoldState::Held,
            created_at_ms: now_ms,
            expires_at_ms: now_ms.saturating_add(self.params.hold_ms),
        };
        // The fast path: one lock, and nothing else shared is touched.
        let outcome = self.reserve_locked(&mut self.shards[home].lock(), home, hold);
        match outcome {
            Ok(hold) => Ok(hold),
            Err(Stop::Refused(rejection)) => Err(rejection),
            // The lock is dropped: the slow path takes all of them, in index order.
            Err(Stop::Short) => self.reserve_slow(home, hold),
        }
    }

    /// The slow path: with every shard locked, the total is exact. If it covers `quantity`, the available units are
    /// spread again so that the home shard has `quantity` more than an even share, and the hold is charged there;
    /// this is what makes the last units sellable however they are spread, and the even spread keeps later
    /// reservations on their fast path. With no unit left at all, the sold-out flag is set.
    fn reserve_slow(&self, home: usize, hold: HoldView) -> Result<HoldView, ReserveRejection> {
        let quantity = hold.quantity;
        let mut guards = self.lock_all();
        // Everything is checked again: other reservations may have run between the fast path's unlock and here.
        let units = guards[home].member_units(hold.member);
        if u64::from(units) + u64::from(quantity) > u64::from(self.params.per_member_limit) {
            return Err(ReserveRejection::LimitExceeded);
        }
        let total: u64 = guards.iter().map(|shard| u64::from(shard.available)).sum();
        if total < u64::from(quantity) {
            if total == 0 {
                self.sold_out.store(true, Ordering::Release);
            }
            return Err(ReserveRejection::SoldOut);
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
        let outcome = self.reserve_locked(&mut guards[home], home, hold);
        debug_assert!(
            outcome.is_ok(),
            "the slow path refused after its own checks"
        );
        match outcome {
            Ok(hold) => Ok(hold),
            Err(Stop::Refused(rejection)) => Err(rejection),
            Err(Stop::Short) => Err(ReserveRejection::SoldOut),
        }
    }

    /// Checks and records a reservation under the lock of the member's home shard (`shard`, at index `home`): the
    /// stock, then the member limit; then takes the units, bumps the member's count and appends the hold with its
    /// id minted from `hold.id` (the seed). Nothing is changed unless all checks pass.
    fn reserve_locked(
        &self,
        shard: &mut Shard,
        home: usize,
        mut hold: HoldView,
    ) -> Result<HoldView, Stop> {
        let quantity = hold.quantity;
        if shard.available < quantity {
            return Err(Stop::Short);
        }
        // The slot must fit the bits of the id that carry it: past 2^32 holds in a drop (about 240 GiB of records)
        // a shard refuses as sold out rather than give an id that names another hold.
        if shard.holds.len() as u64 >= self.slots_per_shard() {
            return Err(Stop::Refused(ReserveRejection::SoldOut));
        }
        // One lookup of the member: the entry found for the limit check is the one written.
        let limit = self.params.per_member_limit;
        match shard.members.entry(hold.member) {
            Entry::Occupied(mut occupied) => {
                let units = occupied.get_mut();
                if u64::from(*units) + u64::from(quantity) > u64::from(limit) {
                    return Err(Stop::Refused(ReserveRejection::LimitExceeded));
                }
                *units += quantity;
            }
            Entry::Vacant(vacant) => {
                // `reserve` refused quantities above the limit.
                vacant.insert(quantity);
            }
        }
        let place = Place {
            shard: home,
            slot: shard.holds.len(),
        };
        hold.id = self.mint(hold.id, place);
        shard.holds.push(hold);
        shard.take(quantity);
        Ok(hold)
    }

    /// The id of the hold at `place`, made from `seed`: its last four bytes (random in a UUIDv7 or v4) are
    /// replaced by `slot << shard_bits | shard` (big-endian), the first twelve are the seed's. Two holds of this book
    /// never share a place, so their ids differ. Holds of other books (other drops) differ in their seeds' first
    /// twelve bytes: the embedded gate writes each book's own number into bytes 9..12 of the seeds it gives (and
    /// for other `Uuid::now_v7` seeds they are the millisecond and a counter the process increments for every id it
    /// makes in that millisecond). In the rare case that the id equals a restored hold's (made by an earlier
    /// process, so only if the clock went back), the twelve bits after the version are changed until it does not.
    fn mint(&self, seed: Uuid, place: Place) -> Uuid {
        // The shard is below MAX_SHARDS = 2^8 and the slot was checked to fit the rest of the 32 bits.
        let packed = ((place.slot as u32) << self.shard_bits()) | place.shard as u32;
        let mut bytes = *seed.as_bytes();
        bytes[12..].copy_from_slice(&packed.to_be_bytes());
        let mut id = Uuid::from_bytes(bytes);
        while !self.restored.is_empty() && self.restored.contains_key(&id) {
            let bits = u16::from_be_bytes([bytes[6], bytes[7]]);
            let bumped = (bits & 0xf000) | (bits.wrapping_add(1) & 0x0fff);
            bytes[6..8].copy_from_slice(&bumped.to_be_bytes());
            id = Uuid::from_bytes(bytes);
        }
        id
    }

    /// Bits of a hold id's last four bytes that carry the shard; the rest carry the slot.
    fn shard_bits(&self) -> u32 {
        self.shard_mask.count_ones()
    }

    /// Holds one shard can record: as many slots as fit beside the shard in 32 bits. The shards of a book together
    /// always have 2^32.
    fn slots_per_shard(&self) -> u64 {
        1u64 << (32 - self.shard_bits())
    }

    /// Where the hold with this id would be: a restored hold's place from the map, any other's from the id itself.
    /// Whether a hold with this id is really there is for the caller to check under the shard's lock.
    fn locate(&self, hold_id: Uuid) -> Place {
        if !self.restored.is_empty() {
            if let Some(&place) = self.restored.get(&hold_id) {
                return place;
            }
        }
        let bytes = hold_id.as_bytes();
        let packed = u32::from_be_bytes([bytes[12], bytes[13], bytes[14], bytes[15]]);
        Place {
            shard: packed as usize & self.shard_mask,
            slot: (packed >> self.shard_bits()) as usize,
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
        let hold = self.apply(hold_id, |hold| {
            if hold.member != member {
                return Err(TransitionError::NotOwner);
            }
            match hold.state {
                HoldState::Held if hold.expires_at_ms <= now_ms => {
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
        self.apply(hold_id, |hold| match hold.state {
            HoldState::Paying => Ok(to),
            other => Err(refusal(other)),
        })
    }

    /// `held | paying -> released(Expired)`: Postgres refused this hold's purchase (its release is stored there, or its
    /// drop's stored paid units are at the stock), so its units must not stay committed here.
    pub fn release_fenced(&self, hold_id: Uuid) -> Result<HoldView, TransitionError> {
        self.apply(hold_id, |hold| match hold.state {
            HoldState::Held | HoldState::Paying => Ok(HoldState::Released(ReleaseReason::Expired)),
            other => Err(refusal(other)),
        })
    }

    /// `held -> released(Cancelled)`, for the hold's owner; refused while a payment is in flight.
    pub fn cancel(&self, hold_id: Uuid, member: Uuid) -> Result<HoldView, TransitionError> {
        self.apply(hold_id, |hold| {
            if hold.member != member {
                return Err(TransitionError::NotOwner);
            }
            match hold.state {
                HoldState::Held => Ok(HoldState::Released(ReleaseReason::Cancelled)),
                other => Err(refusal(other)),
            }
        })
    }

    /// Decides a transition under the lock of the hold's shard and does its accounting there: the hold, its units
    /// and its member's count all live in that one shard. `decide_to` sees the hold and returns the next state or
    /// the refusal.
    fn apply(
        &self,
        hold_id: Uuid,
        decide_to: impl FnOnce(&HoldView) -> Result<HoldState, TransitionError>,
    ) -> Result<HoldView, TransitionError> {
        let place = self.locate(hold_id);
        let mut guard = self.shards[place.shard].lock();
        let shard = &mut *guard;
        let hold = shard
            .hold_mut(place.slot, hold_id)
            .ok_or(TransitionError::NotFound)?;
        let to = decide_to(hold)?;
        let from = hold.state;
        hold.state = to;
        let hold = *hold;
        match (from, to) {
            (HoldState::Held | HoldState::Paying, HoldState::Released(_)) => {
                shard.release(hold.member, hold.quantity);
                self.clear_sold_out();
            }
            (HoldState::Paying, HoldState::Paid) => shard.settle(hold.quantity),
            (HoldState::Held, HoldState::Paying) | (HoldState::Paying, HoldState::Held) => {}
            // Every `decide_to` refuses other moves; reaching this is a bug in this file.
            (from, to) => debug_assert!(false, "no transition from {from:?} to {to:?}"),
        }
        Ok(hold)
    }

    /// Releases every `held` hold whose `expires_at_ms <= now_ms`, pushes each into `out` and returns how many.
    /// Only due holds are visited: each shard's list is walked from where the last reap stopped to the first hold not
    /// yet due. A hold that is `paying` is kept aside and looked at again on every later call, so that after
    /// `abort_payment` it still expires.
    pub fn reap(&self, now_ms: i64, out: &mut Vec<HoldView>) -> usize {
        let before = out.len();
        for shard in self.shards.iter() {
            let mut guard = shard.lock();
            let shard = &mut *guard;
            let start = shard.reap_next;
            let mut end = start;
            while shard
                .holds
                .get(end)
                .is_some_and(|hold| hold.expires_at_ms <= now_ms)
            {
                end += 1;
            }
            shard.reap_next = end;
            let mut released = false;
            let deferred = std::mem::take(&mut shard.deferred);
            for slot in deferred.into_iter().chain(start..end) {
                let Some(hold) = shard.holds.get_mut(slot) else {
                    debug_assert!(false, "slot {slot} past the hold list");
                    continue;
                };
                match hold.state {
                    HoldState::Held if hold.expires_at_ms <= now_ms => {
                        hold.state = HoldState::Released(ReleaseReason::Expired);
                        let hold = *hold;
                        shard.release(hold.member, hold.quantity);
                        out.push(hold);
                        released = true;
                    }
                    // Paying, or not yet due by this call's clock (a caller's clock behind an earlier one's).
                    HoldState::Held | HoldState::Paying => shard.deferred.push(slot),
                    HoldState::Paid | HoldState::Released(_) => {}
                }
            }
            if released {
                self.clear_sold_out();
            }
        }
        out.len() - before
    }

    /// Cleared after a release's units are back, under the lock of the shard they went to, so a reservation that then
    /// reads `false` can find them. The flag is set only under every shard lock, so a set that saw zero happened
    /// before this release's lock, and this load sees it.
    fn clear_sold_out(&self) {
        if self.sold_out.load(Ordering::Acquire) {
            self.sold_out.store(false, Ordering::Release);
        }
    }

    /// The hold as it is now, if the book has it (released and paid holds stay in the book).
    pub fn hold(&self, hold_id: Uuid) -> Option<HoldView> {
        let place = self.locate(hold_id);
        let mut shard = self.shards[place.shard].lock();
        shard.hold_mut(place.slot, hold_id).map(|hold| *hold)
    }

    /// A consistent snapshot: every shard is locked (in index order) while it is read.
    pub fn counts(&self) -> Counts {
        let (mut assigned, mut available, mut held, mut paid) = (0u64, 0u64, 0u64, 0u64);
        for shard in self.lock_all().iter() {
            // The read-back half of the conservation check, in release builds too.
            shard.assert_conserved();
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

    /// The shard and slot a hold is recorded at, for tests.
    #[cfg(test)]
    pub(super) fn place_of(&self, hold_id: Uuid) -> Option<(usize, usize)> {
        let place = self.locate(hold_id);
        let mut shard = self.shards[place.shard].lock();
        shard
            .hold_mut(place.slot, hold_id)
            .map(|_| (place.shard, place.slot))
    }

    /// The shard a member's count, holds and stock live in, for tests.
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

/// The shard a member's count, holds and stock live in. Member ids are random (v4) or random in their low bits (v7),
/// and a multiply folds both halves into the top bits, so members spread evenly without hashing the whole id.
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

/// Members each shard's map is sized for: its even share of the stock (one buyer per unit is the busy case), with the
/// whole book capped at `PRESIZE_MAX`.
fn presize(params: DropParams) -> usize {
    (params.stock as usize)
        .min(PRESIZE_MAX)
        .div_ceil(params.shards)
}
