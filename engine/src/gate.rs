//! The stock authority behind a narrow interface.
//!
//! The service asks a `Gate` to reserve, move holds through payment, release and reap; it never touches stock
//! itself. `EmbeddedGate` is the in-memory core of one instance (used when `REDIS_URL` is unset); a Redis gate
//! implements the same trait so many instances can share one drop. Outcomes are the core's plain enums; the
//! outer `Result` is only for "the authority could not be reached", which the service turns into a refusal
//! (fail closed), never into a grant.

use async_trait::async_trait;
use dashmap::DashMap;
use std::sync::Arc;
use uuid::Uuid;

use crate::core::{
    Counts, DropBook, DropParams, HoldView, ReserveRejection, RestoreError, RestoredHold,
    TransitionError,
};
use crate::types::DropSpec;

/// The stock authority could not answer (connection lost, timed out). Nothing was granted.
#[derive(Debug, thiserror::Error)]
#[error("stock gate unavailable: {0}")]
pub struct GateUnavailable(pub String);

/// A drop's state rebuilt from Postgres at load time.
#[derive(Debug, Default)]
pub struct Restore {
    /// Units paid per member.
    pub paid: Vec<(Uuid, u32)>,
    /// Holds still alive.
    pub held: Vec<RestoredHold>,
}

pub type GateResult<T> = Result<T, GateUnavailable>;

#[async_trait]
pub trait Gate: Send + Sync + 'static {
    /// Makes a drop known to this gate with its restored state. Loading a drop twice keeps the first. A restored
    /// state that does not add up (more committed than stock) is refused rather than sold from.
    async fn load(&self, drop: &DropSpec, restore: Restore)
        -> GateResult<Result<(), RestoreError>>;
    /// The local sold-out flag: an answer from memory, no I/O, so a sold-out drop rejects for free.
    fn is_sold_out(&self, drop: Uuid) -> bool;
    /// Places a hold. `hold` is a fresh id from the caller; a gate may rewrite its random bits (the embedded gate
    /// writes the hold's place into them), so the returned view's id is the hold's id from then on.
    async fn reserve(
        &self,
        drop: Uuid,
        hold: Uuid,
        member: Uuid,
        quantity: u32,
        now_ms: i64,
    ) -> GateResult<Result<HoldView, ReserveRejection>>;
    async fn begin_payment(
        &self,
        drop: Uuid,
        hold: Uuid,
        member: Uuid,
        now_ms: i64,
    ) -> GateResult<Result<HoldView, TransitionError>>;
    async fn complete_payment(
        &self,
        drop: Uuid,
        hold: Uuid,
    ) -> GateResult<Result<HoldView, TransitionError>>;
    async fn abort_payment(
        &self,
        drop: Uuid,
        hold: Uuid,
    ) -> GateResult<Result<HoldView, TransitionError>>;
    async fn decline_payment(
        &self,
        drop: Uuid,
        hold: Uuid,
    ) -> GateResult<Result<HoldView, TransitionError>>;
    async fn cancel(
        &self,
        drop: Uuid,
        hold: Uuid,
        member: Uuid,
    ) -> GateResult<Result<HoldView, TransitionError>>;
    /// Releases expired holds of every drop, appending `(drop, hold)` for each released one.
    async fn reap(&self, now_ms: i64, out: &mut Vec<(Uuid, HoldView)>) -> GateResult<usize>;
    async fn hold(&self, drop: Uuid, hold: Uuid) -> GateResult<Option<HoldView>>;
    async fn counts(&self, drop: Uuid) -> GateResult<Option<Counts>>;
}

/// One instance's in-memory authority: a `DropBook` per drop.
pub struct EmbeddedGate {
    books: DashMap<Uuid, Arc<DropBook>>,
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
            books: DashMap::new(),
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
        let book = match DropBook::restore(params, restore.paid, restore.held) {
            Ok(book) => book,
            Err(err) => return Ok(Err(err)),
        };
        self.books.entry(drop.id).or_insert_with(|| Arc::new(book));
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
        Ok(book.reserve(hold, member, quantity, now_ms))
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

    async fn reap(&self, now_ms: i64, out: &mut Vec<(Uuid, HoldView)>) -> GateResult<usize> {
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
            out.extend(released.drain(..).map(|hold| (drop, hold)));
        }
        Ok(total)
    }

    async fn hold(&self, drop: Uuid, hold: Uuid) -> GateResult<Option<HoldView>> {
        Ok(self.book(drop).and_then(|book| book.hold(hold)))
    }

    async fn counts(&self, drop: Uuid) -> GateResult<Option<Counts>> {
        Ok(self.book(drop).map(|book| book.counts()))
    }
}
