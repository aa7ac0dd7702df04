//! `EmbeddedGate`: one instance's in-memory stock authority, a `core::DropBook` per drop. Used when `REDIS_URL` is
//! unset; the process that holds the books is the only one that may sell their drops.

use async_trait::async_trait;
use dashmap::DashMap;
use rand::Rng;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use uuid::Uuid;

use super::{Gate, GateResult, Reaped, Restore};
use crate::core::{
    Counts, DropBook, DropParams, HoldView, IdHasher, ReserveRejection, RestoreError,
    TransitionError,
};
use crate::types::DropSpec;

/// Numbers a book can have: the 24 bits of a hold id's bytes 9..12.
const NUMBER_MASK: u32 = (1 << 24) - 1;

/// One instance's in-memory authority: a `DropBook` per drop.
///
/// A request by reservation id finds its drop with no I/O and no map of holds: each loaded book has a number, the
/// ids of its holds carry it (bytes 9..12; the book adds the hold's place in bytes 12..16), and the book confirms
/// that the hold is its own. Holds restored at load were made by an earlier process, whose numbers mean nothing
/// now, so they alone are kept in a map.
pub struct EmbeddedGate {
    /// Fx-hashed: drop ids are made by the service, never chosen by a client.
    books: DashMap<Uuid, Loaded, IdHasher>,
    /// The drop of each loaded book's number.
    numbered: DashMap<u32, Uuid, IdHasher>,
    /// The drop of each hold restored at load, while its drop is loaded. Fx-hashed like the books' own maps: every
    /// key in it is a hold id an earlier book made.
    restored: DashMap<Uuid, Uuid, IdHasher>,
    /// The next number to try; starts at random, so that ids of an earlier process rarely carry a number in use
    /// (the book's check makes them harmless anyway).
    next_number: AtomicU32,
    shards: usize,
}

/// A loaded drop's book and its number.
struct Loaded {
    book: Arc<DropBook>,
    number: u32,
}

/// `seed` with `number` in bytes 9..12.
fn numbered_seed(seed: Uuid, number: u32) -> Uuid {
    let mut bytes = *seed.as_bytes();
    bytes[9..12].copy_from_slice(&number.to_be_bytes()[1..]);
    Uuid::from_bytes(bytes)
}

/// The book number a hold id carries.
fn number_of(hold: Uuid) -> u32 {
    let bytes = hold.as_bytes();
    u32::from_be_bytes([0, bytes[9], bytes[10], bytes[11]])
}

impl std::fmt::Debug for EmbeddedGate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedGate")
            .field("drops", &self.books.len())
            .field("shards", &self.shards)
            .finish()
    }
}

impl EmbeddedGate {
    /// `shards` per drop, as `DropParams::shards` (each book rounds it to a power of two within `1..=MAX_SHARDS`).
    pub fn new(shards: usize) -> Self {
        Self {
            books: DashMap::with_hasher(IdHasher::default()),
            numbered: DashMap::with_hasher(IdHasher::default()),
            restored: DashMap::with_hasher(IdHasher::default()),
            next_number: AtomicU32::new(rand::thread_rng().gen::<u32>() & NUMBER_MASK),
            shards,
        }
    }

    fn book(&self, drop: Uuid) -> Option<Arc<DropBook>> {
        // Clone the Arc out so no map guard is held while the book works.
        self.books.get(&drop).map(|loaded| Arc::clone(&loaded.book))
    }

    /// A number no loaded book has, now given to `drop`. There are 2^24 of them, far more than drops loaded at once.
    fn number(&self, drop: Uuid) -> u32 {
        loop {
            let number = self.next_number.fetch_add(1, Ordering::Relaxed) & NUMBER_MASK;
            if let dashmap::Entry::Vacant(vacant) = self.numbered.entry(number) {
                vacant.insert(drop);
                return number;
            }
        }
    }

    fn with_book<T>(
        &self,
        drop: Uuid,
        f: impl FnOnce(&DropBook) -> Result<T, TransitionError>,
    ) -> GateResult<Result<T, TransitionError>> {
        Ok(match self.book(drop) {
            Some(book) => f(&book),
            None => Err(TransitionError::NotFound),
        })
    }
}

#[async_trait]
impl Gate for EmbeddedGate {
    async fn load(
        &self,
        drop: &DropSpec,
        restore: Restore,
    ) -> GateResult<Result<(), RestoreError>> {
        if self.books.contains_key(&drop.id) {
            return Ok(Ok(()));
        }
        let params = DropParams {
            stock: drop.stock,
            per_member_limit: drop.per_member_limit,
            hold_ms: i64::from(drop.hold_seconds) * 1000,
            shards: self.shards,
        };
        let held: Vec<Uuid> = restore.held.iter().map(|hold| hold.id).collect();
        let book = match DropBook::restore(params, restore.paid, restore.held) {
            Ok(book) => book,
            Err(err) => return Ok(Err(err)),
        };
        if let dashmap::Entry::Vacant(vacant) = self.books.entry(drop.id) {
            let number = self.number(drop.id);
            vacant.insert(Loaded {
                book: Arc::new(book),
                number,
            });
            for hold in held {
                self.restored.insert(hold, drop.id);
            }
        }
        Ok(Ok(()))
    }

    fn is_sold_out(&self, drop: Uuid) -> bool {
        self.books
            .get(&drop)
            .is_some_and(|loaded| loaded.book.is_sold_out())
    }

    async fn reserve(
        &self,
        drop: Uuid,
        hold: Uuid,
        member: Uuid,
        quantity: u32,
        now_ms: i64,
    ) -> GateResult<Result<HoldView, ReserveRejection>> {
        let Some((book, number)) = self
            .books
            .get(&drop)
            .map(|loaded| (Arc::clone(&loaded.book), loaded.number))
        else {
            // The service loads a drop before reserving on it; an unknown drop here has nothing to sell.
            return Ok(Err(ReserveRejection::SoldOut));
        };
        // The book makes the hold's id from this seed, naming the hold's place so that every later call finds it
        // under one lock; the seed names the book.
        Ok(book.reserve(numbered_seed(hold, number), member, quantity, now_ms))
    }

    async fn locate(&self, hold: Uuid) -> GateResult<Option<Uuid>> {
        if let Some(drop) = self.restored.get(&hold).map(|drop| *drop) {
            return Ok(Some(drop));
        }
        let Some(drop) = self.numbered.get(&number_of(hold)).map(|drop| *drop) else {
            return Ok(None);
        };
        // Any id can carry a number in use; only the book knows whether the hold is one of its own.
        Ok(self
            .book(drop)
            .filter(|book| book.hold(hold).is_some())
            .map(|_| drop))
    }

    async fn begin_payment(
        &self,
        drop: Uuid,
        hold: Uuid,
        member: Uuid,
        now_ms: i64,
    ) -> GateResult<Result<HoldView, TransitionError>> {
        self.with_book(drop, |book| book.begin_payment(hold, member, now_ms))
    }

    async fn complete_payment(
        &self,
        drop: Uuid,
        hold: Uuid,
    ) -> GateResult<Result<HoldView, TransitionError>> {
        self.with_book(drop, |book| book.complete_payment(hold))
    }

    async fn abort_payment(
        &self,
        drop: Uuid,
        hold: Uuid,
    ) -> GateResult<Result<HoldView, TransitionError>> {
        self.with_book(drop, |book| book.abort_payment(hold))
    }

    async fn decline_payment(
        &self,
        drop: Uuid,
        hold: Uuid,
    ) -> GateResult<Result<HoldView, TransitionError>> {
        self.with_book(drop, |book| book.decline_payment(hold))
    }

    async fn cancel(
        &self,
        drop: Uuid,
        hold: Uuid,
        member: Uuid,
    ) -> GateResult<Result<HoldView, TransitionError>> {
        self.with_book(drop, |book| book.cancel(hold, member))
    }

    async fn release_fenced(
        &self,
        drop: Uuid,
        hold: Uuid,
    ) -> GateResult<Result<HoldView, TransitionError>> {
        self.with_book(drop, |book| book.release_fenced(hold))
    }

    /// Releases expired holds. A payment here never outlives its lease unseen: it runs in this process, bounded by
    /// the payment timeout, and the process that would stop it stops this reaper too; so `lapsed` stays empty.
    async fn reap(&self, now_ms: i64, out: &mut Reaped) -> GateResult<usize> {
        let books: Vec<(Uuid, Arc<DropBook>)> = self
            .books
            .iter()
            .map(|entry| (*entry.key(), Arc::clone(&entry.value().book)))
            .collect();
        let mut released = Vec::new();
        let mut total = 0;
        for (drop, book) in books {
            released.clear();
            total += book.reap(now_ms, &mut released);
            out.released
                .extend(released.drain(..).map(|hold| (drop, hold)));
        }
        Ok(total)
    }

    async fn hold(&self, drop: Uuid, hold: Uuid) -> GateResult<Option<HoldView>> {
        Ok(self.book(drop).and_then(|book| book.hold(hold)))
    }

    async fn unload(&self, drop: Uuid) {
        if let Some((_, loaded)) = self.books.remove(&drop) {
            self.numbered.remove(&loaded.number);
            self.restored.retain(|_, of| *of != drop);
        }
    }

    async fn counts(&self, drop: Uuid) -> GateResult<Option<Counts>> {
        Ok(self.book(drop).map(|book| book.counts()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::RestoredHold;

    const NOW_MS: i64 = 1_000_000;

    fn drop_spec(stock: u32) -> DropSpec {
        DropSpec::for_tests(stock, 5, crate::types::DropMode::FirstCome)
    }

    async fn reserve(gate: &EmbeddedGate, drop: Uuid) -> HoldView {
        gate.reserve(drop, Uuid::now_v7(), Uuid::now_v7(), 1, NOW_MS)
            .await
            .unwrap()
            .unwrap()
    }

    #[tokio::test]
    async fn a_hold_id_finds_its_own_drop_and_no_other_id_finds_one() {
        let gate = EmbeddedGate::new(4);
        let (a, b) = (drop_spec(100), drop_spec(100));
        for spec in [&a, &b] {
            gate.load(spec, Restore::default()).await.unwrap().unwrap();
        }
        let mut holds = Vec::new();
        for _ in 0..50 {
            holds.push((reserve(&gate, a.id).await.id, a.id));
            holds.push((reserve(&gate, b.id).await.id, b.id));
        }
        for &(hold, drop) in &holds {
            assert_eq!(gate.locate(hold).await.unwrap(), Some(drop));
        }
        let (hold, _) = holds[0];
        // The number of a loaded book and the place of one of its holds, but another id: not a hold of that book.
        let mut bytes = *hold.as_bytes();
        bytes[0] ^= 0x01;
        assert_eq!(gate.locate(Uuid::from_bytes(bytes)).await.unwrap(), None);
        assert_eq!(gate.locate(Uuid::now_v7()).await.unwrap(), None);
        // A paid hold is found as long as its drop is loaded, as the pay path's "paid before" answer needs.
        gate.begin_payment(
            a.id,
            hold,
            gate.hold(a.id, hold).await.unwrap().unwrap().member,
            NOW_MS,
        )
        .await
        .unwrap()
        .unwrap();
        gate.complete_payment(a.id, hold).await.unwrap().unwrap();
        assert_eq!(gate.locate(hold).await.unwrap(), Some(a.id));

        // Unloaded, a drop's number goes, and a drop loaded later never answers for its holds.
        gate.unload(a.id).await;
        let c = drop_spec(100);
        gate.load(&c, Restore::default()).await.unwrap().unwrap();
        reserve(&gate, c.id).await;
        for &(hold, drop) in &holds {
            let expected = (drop == b.id).then_some(b.id);
            assert_eq!(gate.locate(hold).await.unwrap(), expected);
        }
    }

    #[tokio::test]
    async fn holds_restored_from_an_earlier_process_are_found_and_never_shadowed() {
        let gate = EmbeddedGate::new(1);
        let spec = drop_spec(10);
        // Ids an earlier process made: the numbers they carry mean nothing to this gate.
        let earlier: Vec<Uuid> = (0..3).map(|_| Uuid::now_v7()).collect();
        let restore = Restore {
            held: earlier
                .iter()
                .map(|&id| RestoredHold {
                    id,
                    member: Uuid::now_v7(),
                    quantity: 1,
                    created_at_ms: NOW_MS,
                    expires_at_ms: NOW_MS + 60_000,
                })
                .collect(),
            ..Restore::default()
        };
        gate.load(&spec, restore).await.unwrap().unwrap();
        let new = reserve(&gate, spec.id).await;
        assert!(!earlier.contains(&new.id));
        for id in earlier.iter().chain([&new.id]) {
            assert_eq!(gate.locate(*id).await.unwrap(), Some(spec.id), "{id}");
        }
        gate.unload(spec.id).await;
        for id in earlier.iter().chain([&new.id]) {
            assert_eq!(gate.locate(*id).await.unwrap(), None, "{id}");
        }
    }
}
