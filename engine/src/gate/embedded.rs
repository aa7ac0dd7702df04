//! `EmbeddedGate`: one instance's in-memory stock authority, a `core::DropBook` per drop. Used when `REDIS_URL` is
//! unset; the process that holds the books is the only one that may sell their drops.

use async_trait::async_trait;
use dashmap::DashMap;
use std::sync::Arc;
use uuid::Uuid;

use super::{Gate, GateResult, Reaped, Restore};
use crate::core::{
    Counts, DropBook, DropParams, HoldView, IdHasher, ReserveRejection, RestoreError,
    TransitionError,
};
use crate::types::DropSpec;

/// One instance's in-memory authority: a `DropBook` per drop.
pub struct EmbeddedGate {
    /// Fx-hashed: drop ids are made by the service, never chosen by a client.
    books: DashMap<Uuid, Arc<DropBook>, IdHasher>,
    /// Which drop each hold of this process belongs to, so requests by reservation id find their book without I/O.
    /// Fx-hashed like the books' own maps: every key in it is a hold id a book made, so a client can look ids up
    /// but cannot choose ones that collide. With SipHash this insert was 4% of the server's CPU on the reserve path.
    hold_drop: DashMap<Uuid, Uuid, IdHasher>,
    shards: usize,
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
            hold_drop: DashMap::with_hasher(IdHasher::default()),
            shards,
        }
    }

    fn book(&self, drop: Uuid) -> Option<Arc<DropBook>> {
        // Clone the Arc out so no map guard is held while the book works.
        self.books.get(&drop).map(|book| Arc::clone(&book))
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
            vacant.insert(Arc::new(book));
            for hold in held {
                self.hold_drop.insert(hold, drop.id);
            }
        }
        Ok(Ok(()))
    }

    fn is_sold_out(&self, drop: Uuid) -> bool {
        self.books.get(&drop).is_some_and(|book| book.is_sold_out())
    }

    async fn reserve(
        &self,
        drop: Uuid,
        hold: Uuid,
        member: Uuid,
        quantity: u32,
        now_ms: i64,
    ) -> GateResult<Result<HoldView, ReserveRejection>> {
        let Some(book) = self.book(drop) else {
            // The service loads a drop before reserving on it; an unknown drop here has nothing to sell.
            return Ok(Err(ReserveRejection::SoldOut));
        };
        // The book makes the hold's id from this seed, naming the hold's place so that every later call finds it
        // under one lock.
        let result = book.reserve(hold, member, quantity, now_ms);
        if let Ok(hold) = &result {
            self.hold_drop.insert(hold.id, drop);
        }
        Ok(result)
    }

    async fn locate(&self, hold: Uuid) -> GateResult<Option<Uuid>> {
        Ok(self.hold_drop.get(&hold).map(|drop| *drop))
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
            .map(|entry| (*entry.key(), Arc::clone(entry.value())))
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
        if self.books.remove(&drop).is_some() {
            self.hold_drop.retain(|_, of| *of != drop);
        }
    }

    async fn counts(&self, drop: Uuid) -> GateResult<Option<Counts>> {
        Ok(self.book(drop).map(|book| book.counts()))
    }
}
