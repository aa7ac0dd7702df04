//! The engine as the HTTP layer sees it: drops, reservations, payments and purchases over a `Gate` (the stock
//! authority), a `PaymentGateway`, the batched writer and the reaper.
//!
//! The hot path (`reserve`) is: a permit from a bounded semaphore (or 429 at once), the drop's spec from memory,
//! the clock check, the local sold-out flag (reject with no I/O), one gate call, and a queued (not awaited) row
//! for the writer. A payment marks the hold `paying`, charges, and answers only after the writer has committed
//! the purchase; then it marks the hold `paid`. Hold transitions are decided once, inside the gate.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use dashmap::DashMap;
use deadpool_postgres::Pool;
use parking_lot::Mutex;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinHandle;
use uuid::Uuid;

use crate::clock::{to_datetime, Clock};
use crate::core::{
    HoldState, HoldView, IdHasher, ReleaseReason, ReserveRejection, TransitionError,
};
use crate::gate::{Gate, GateUnavailable, Reaped, Restore};
use crate::payment::{ChargeOutcome, ChargeRequest, PaymentGateway};
use crate::store;
use crate::types::{DropInfo, DropSpec, DropStatus, NewDrop, Purchase, Reservation};
use crate::writer::{self, HoldRow, WriteError, WriterConfig, WriterHandle};

/// Limits and intervals of the engine.
#[derive(Debug, Clone, Copy)]
pub struct EngineConfig {
    /// Reservations in flight at once; past it, reservations are refused at once (429).
    pub reserve_inflight_max: usize,
    /// Payments in flight at once; past it, payments are refused at once (429).
    pub pay_inflight_max: usize,
    /// How often the reaper releases expired holds.
    pub reaper_interval: Duration,
    /// Longest wait for the payment gateway's answer to a charge. Past it the charge is given up: refunded (in case
    /// it went through) and answered as the gateway being unavailable, and the hold goes back to `held`. A hung
    /// gateway never keeps a unit from sale.
    pub payment_timeout: Duration,
    /// How long a drop whose sale is settled (no holds left, and sold out or closed) stays in memory before it is
    /// unloaded; reads of it after that come from Postgres.
    pub settled_retain: Duration,
    pub writer: WriterConfig,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            reserve_inflight_max: 4096,
            pay_inflight_max: 1024,
            reaper_interval: Duration::from_secs(1),
            payment_timeout: Duration::from_secs(30),
            settled_retain: Duration::from_secs(60 * 60),
            writer: WriterConfig::default(),
        }
    }
}

/// Why the engine refused. Hot-path outcomes (sold out, limit) are ordinary variants, not failures.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("no such drop")]
    DropNotFound,
    #[error("the drop is not open yet")]
    NotOpen,
    #[error("the drop is closed")]
    Closed,
    #[error("sold out")]
    SoldOut,
    #[error("per-member limit reached")]
    LimitExceeded,
    #[error("quantity must be between 1 and the per-member limit")]
    InvalidQuantity,
    #[error("too many requests in flight")]
    Overloaded,
    #[error(transparent)]
    GateUnavailable(#[from] GateUnavailable),
    #[error("no such reservation")]
    ReservationNotFound,
    #[error("not your reservation")]
    NotOwner,
    #[error("the hold expired")]
    HoldExpired,
    #[error("the hold was already released")]
    AlreadyReleased(ReleaseReason),
    #[error("the reservation is already paid")]
    AlreadyPaid,
    #[error("a payment for this reservation is in progress")]
    PaymentInFlight,
    #[error("payment declined")]
    PaymentDeclined,
    #[error("the payment gateway is unavailable")]
    PaymentUnavailable,
    #[error("the purchase could not be stored")]
    StorageUnavailable(#[source] WriteError),
    #[error("stored state of a drop does not add up: {0}")]
    Restore(#[from] crate::core::RestoreError),
    #[error("database: {0}")]
    Db(#[from] tokio_postgres::Error),
    #[error("database pool: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
}

impl From<ReserveRejection> for EngineError {
    fn from(rejection: ReserveRejection) -> Self {
        match rejection {
            ReserveRejection::SoldOut => EngineError::SoldOut,
            ReserveRejection::LimitExceeded => EngineError::LimitExceeded,
            ReserveRejection::InvalidQuantity => EngineError::InvalidQuantity,
        }
    }
}

impl From<TransitionError> for EngineError {
    fn from(err: TransitionError) -> Self {
        match err {
            TransitionError::NotFound => EngineError::ReservationNotFound,
            TransitionError::NotOwner => EngineError::NotOwner,
            TransitionError::Expired => EngineError::HoldExpired,
            TransitionError::AlreadyReleased(reason) => EngineError::AlreadyReleased(reason),
            TransitionError::AlreadyPaid => EngineError::AlreadyPaid,
            TransitionError::PaymentInFlight | TransitionError::NotPaying => {
                EngineError::PaymentInFlight
            }
        }
    }
}

/// Most batches of drop rows one list request reads while looking for drops of the wanted status.
const LIST_SCAN_BATCHES: usize = 10;
/// Largest page allocated up front.
const LIST_PAGE_PRESIZE_MAX: usize = 100;

/// Counters for the report: what happened, not how long it took.
#[derive(Debug, Default)]
pub struct EngineStats {
    pub reservations: Counter,
    pub rejected_sold_out: Counter,
    pub rejected_limit: Counter,
    pub rejected_not_open: Counter,
    pub rejected_overloaded: Counter,
    pub payments: Counter,
    pub payments_declined: Counter,
    pub payments_unavailable: Counter,
    /// Payments Postgres refused (guarantee 5a): they outlived their lease, or their drop was full there. Each was
    /// refunded.
    pub payments_fenced: Counter,
    pub released_cancelled: Counter,
    pub released_expired: Counter,
}

/// Slots of a `Counter`; threads spread over them.
const COUNTER_SLOTS: usize = 4;

/// A counter bumped from many threads at once: one slot per thread (round robin), each on its own cache line, so
/// two cores counting refusals do not pass one line back and forth on every request.
#[derive(Debug, Default)]
pub struct Counter([crossbeam_utils::CachePadded<AtomicU64>; COUNTER_SLOTS]);

impl Counter {
    pub fn get(&self) -> u64 {
        self.0.iter().map(|slot| slot.load(Ordering::Relaxed)).sum()
    }

    fn bump(&self) {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        thread_local! {
            static SLOT: usize = NEXT.fetch_add(1, Ordering::Relaxed) % COUNTER_SLOTS;
        }
        let slot = SLOT.with(|slot| *slot);
        self.0[slot].fetch_add(1, Ordering::Relaxed);
    }
}

fn bump(counter: &Counter) {
    counter.bump();
}

/// The engine. Create with `Engine::start`; stop with `shutdown` (drains the writer).
pub struct Engine {
    db: Pool,
    gate: Arc<dyn Gate>,
    gateway: Arc<dyn PaymentGateway>,
    clock: Arc<dyn Clock>,
    /// Fx-hashed (like the gate's maps): every key is a drop id the service made, so a client can look ids up but
    /// cannot choose ones that collide; every reservation and refusal reads it.
    drops: DashMap<Uuid, Arc<DropSpec>, IdHasher>,
    /// When each loaded drop was first seen settled (unix ms); it is unloaded `settled_retain` later.
    settled_since: DashMap<Uuid, i64>,
    settled_retain: Duration,
    /// Purchases by reservation, so a repeated payment answers the same body.
    receipts: DashMap<Uuid, Purchase>,
    writer: WriterHandle,
    writer_task: Mutex<Option<JoinHandle<()>>>,
    reaper_task: Mutex<Option<JoinHandle<()>>>,
    stop: watch::Sender<bool>,
    reserve_permits: Semaphore,
    pay_permits: Semaphore,
    reserve_permits_max: usize,
    pay_permits_max: usize,
    payment_timeout: Duration,
    stats: EngineStats,
    /// How long the gate takes to decide a reservation (a no-op handle when no metrics recorder is installed).
    gate_reserve_seconds: metrics::Histogram,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("drops", &self.drops.len())
            .finish_non_exhaustive()
    }
}

impl Engine {
    /// Starts the writer, rebuilds every drop from Postgres into the gate, and starts the reaper.
    pub async fn start(
        db: Pool,
        config: EngineConfig,
        gate: Arc<dyn Gate>,
        gateway: Arc<dyn PaymentGateway>,
        clock: Arc<dyn Clock>,
    ) -> Result<Arc<Self>, EngineError> {
        // A gate that journals its own holds stores each as a row, which every purchase then finds: its purchases
        // go straight to the upserts.
        let writer_config = WriterConfig {
            plain_purchases: config.writer.plain_purchases && !gate.journals_holds(),
            ..config.writer
        };
        let (writer, writer_task) = writer::spawn(db.clone(), writer_config);
        gate.use_writer(writer.clone());
        let (stop, stop_rx) = watch::channel(false);
        let engine = Arc::new(Self {
            db,
            gate,
            gateway,
            clock,
            drops: DashMap::with_hasher(IdHasher::default()),
            settled_since: DashMap::new(),
            settled_retain: config.settled_retain,
            receipts: DashMap::new(),
            writer,
            writer_task: Mutex::new(Some(writer_task)),
            reaper_task: Mutex::new(None),
            stop,
            reserve_permits: Semaphore::new(config.reserve_inflight_max.max(1)),
            pay_permits: Semaphore::new(config.pay_inflight_max.max(1)),
            reserve_permits_max: config.reserve_inflight_max.max(1),
            pay_permits_max: config.pay_inflight_max.max(1),
            payment_timeout: config.payment_timeout,
            stats: EngineStats::default(),
            gate_reserve_seconds: metrics::histogram!("flashsale_gate_call_seconds", "call" => "reserve"),
        });
        engine.load_all().await?;
        let reaper = tokio::spawn(reaper(
            Arc::downgrade(&engine),
            config.reaper_interval,
            stop_rx,
        ));
        *engine.reaper_task.lock() = Some(reaper);
        Ok(engine)
    }

    async fn load_all(&self) -> Result<(), EngineError> {
        let client = self.db.get().await?;
        let now = to_datetime(self.clock.now_ms());
        let specs = store::load_all_drops(&**client).await?;
        let mut restored = store::restore(&**client, None, now).await?;
        let now_ms = self.clock.now_ms();
        for spec in specs {
            let restore = restored.remove(&spec.id).unwrap_or_default();
            // Drops whose sale is settled stay in Postgres until someone asks for them.
            let paid: u64 = restore
                .paid
                .iter()
                .map(|&(_, units)| u64::from(units))
                .sum();
            let closed = spec.closes_at_ms().is_some_and(|closes| now_ms >= closes);
            if restore.held.is_empty() && (paid >= u64::from(spec.stock) || closed) {
                continue;
            }
            self.install(spec, restore).await?;
        }
        tracing::info!(drops = self.drops.len(), "engine loaded drops");
        Ok(())
    }

    async fn install(
        &self,
        spec: DropSpec,
        restore: Restore,
    ) -> Result<Arc<DropSpec>, EngineError> {
        self.gate.load(&spec, restore).await??;
        let spec = Arc::new(spec);
        Ok(Arc::clone(
            self.drops.entry(spec.id).or_insert(spec).value(),
        ))
    }

    /// The drop's spec from memory, or from Postgres the first time this instance hears of it.
    async fn spec(&self, drop: Uuid) -> Result<Arc<DropSpec>, EngineError> {
        if let Some(spec) = self.drops.get(&drop) {
            return Ok(Arc::clone(&spec));
        }
        let client = self.db.get().await?;
        let Some(spec) = store::load_drop(&**client, drop).await? else {
            return Err(EngineError::DropNotFound);
        };
        let now = to_datetime(self.clock.now_ms());
        let restore = store::restore(&**client, Some(drop), now)
            .await?
            .remove(&drop)
            .unwrap_or_default();
        self.install(spec, restore).await
    }

    pub fn now(&self) -> DateTime<Utc> {
        to_datetime(self.clock.now_ms())
    }

    /// This instance's sold-out flag for a drop: what a reservation is rejected on without asking the gate.
    pub fn is_sold_out_locally(&self, drop: Uuid) -> bool {
        self.gate.is_sold_out(drop)
    }

    pub fn stats(&self) -> &EngineStats {
        &self.stats
    }

    /// Reservations and payments in flight (holding a permit), for the metrics.
    pub fn in_flight(&self) -> (usize, usize) {
        (
            self.reserve_permits_max - self.reserve_permits.available_permits(),
            self.pay_permits_max - self.pay_permits.available_permits(),
        )
    }

    /// In-flight permits (`RESERVE_INFLIGHT_MAX`, `PAY_INFLIGHT_MAX`).
    pub fn in_flight_max(&self) -> (usize, usize) {
        (self.reserve_permits_max, self.pay_permits_max)
    }

    /// Writes queued for the writer and not yet taken, for the metrics.
    pub fn writer_queue_depth(&self) -> usize {
        self.writer.queue_depth()
    }

    /// For each loaded drop whose gate journals (Redis), how long the oldest entry this instance's journal has not
    /// yet written to Postgres has waited; zero when caught up. For the metrics.
    pub fn journal_lag(&self) -> Vec<(Uuid, Duration)> {
        self.gate.journal_lag(self.clock.now_ms())
    }

    /// The payment gateway, for the shell's other payments (the regular shop's orders, charges and refunds).
    pub fn gateway(&self) -> &Arc<dyn PaymentGateway> {
        &self.gateway
    }

    pub fn writer(&self) -> &WriterHandle {
        &self.writer
    }

    /// Stores a new drop and makes it sellable from `opens_at`.
    pub async fn create_drop(&self, new: NewDrop) -> Result<DropInfo, EngineError> {
        let mut spec = DropSpec {
            id: Uuid::now_v7(),
            seq: 0,
            product_id: new.product_id,
            seller_id: new.seller_id,
            stock: new.stock,
            opens_at: new.opens_at,
            closes_at: new.closes_at,
            per_member_limit: new.per_member_limit,
            hold_seconds: new.hold_seconds,
            price: new.price,
            currency: new.currency,
            created_at: self.now(),
        };
        let client = self.db.get().await?;
        spec.seq = store::insert_drop(&**client, &spec).await?;
        let spec = self.install(spec, Restore::default()).await?;
        self.info(&spec).await
    }

    async fn info(&self, spec: &Arc<DropSpec>) -> Result<DropInfo, EngineError> {
        let counts = self
            .gate
            .counts(spec.id)
            .await?
            .ok_or(EngineError::DropNotFound)?;
        let status = spec.status(self.clock.now_ms(), &counts);
        Ok(DropInfo {
            spec: DropSpec::clone(spec),
            counts,
            status,
        })
    }

    /// A drop with its live counts and status.
    pub async fn drop_info(&self, drop: Uuid) -> Result<DropInfo, EngineError> {
        let spec = self.spec(drop).await?;
        self.info(&spec).await
    }

    /// Drops newest first; `after` is the last id served. Returns the page and the id to continue after, if
    /// more drops exist. `status` filters; when the filter depends on stock (open, sold_out) a page may hold
    /// fewer than `limit` drops, but the cursor still moves forward.
    pub async fn list_drops(
        &self,
        after: Option<Uuid>,
        limit: i64,
        status: Option<DropStatus>,
    ) -> Result<(Vec<DropInfo>, Option<Uuid>), EngineError> {
        let window = usize::try_from(limit.max(1)).unwrap_or(usize::MAX);
        let mut infos = Vec::with_capacity(window.min(LIST_PAGE_PRESIZE_MAX));
        let mut cursor = after;
        // Postgres filters by time; open and sold_out also depend on the stock, known only here, so rows are read
        // in batches until the page is full, the rows run out, or LIST_SCAN_BATCHES were read (then a short page
        // with a cursor, so a client following cursors still sees every drop).
        for _ in 0..LIST_SCAN_BATCHES {
            let specs = {
                let client = self.db.get().await?;
                store::list_drops(
                    &**client,
                    cursor,
                    limit.max(1).saturating_add(1),
                    status,
                    self.now(),
                )
                .await?
            };
            let more_rows = specs.len() > window;
            let taken = specs.len().min(window);
            for (index, spec) in specs.into_iter().take(window).enumerate() {
                cursor = Some(spec.id);
                let spec = self.spec(spec.id).await?;
                let info = self.info(&spec).await?;
                if status.is_some_and(|wanted| wanted != info.status) {
                    continue;
                }
                infos.push(info);
                if infos.len() == window {
                    let rows_after = index + 1 < taken || more_rows;
                    return Ok((infos, cursor.filter(|_| rows_after)));
                }
            }
            if !more_rows {
                return Ok((infos, None));
            }
        }
        Ok((infos, cursor))
    }

    /// Places a hold of `quantity` units of the drop for `member`.
    pub async fn reserve(
        &self,
        drop: Uuid,
        member: Uuid,
        quantity: u32,
    ) -> Result<Reservation, EngineError> {
        // Admission of a loaded drop comes from memory before a permit is taken: a refusal there (not open, closed,
        // sold out) does no I/O, so it needs no place among the requests in flight and touches no shared counter of
        // them. A drop not loaded yet is read from Postgres under a permit, like any other I/O.
        let now_ms = self.clock.now_ms();
        let admitted = self
            .drops
            .get(&drop)
            .map(|spec| self.admit(&spec, now_ms, quantity));
        let Ok(_permit) = (match admitted {
            Some(admitted) => {
                admitted?;
                self.reserve_permits.try_acquire()
            }
            None => {
                let permit = self.reserve_permits.try_acquire();
                if permit.is_ok() {
                    let spec = self.spec(drop).await?;
                    self.admit(&spec, now_ms, quantity)?;
                }
                permit
            }
        }) else {
            bump(&self.stats.rejected_overloaded);
            return Err(EngineError::Overloaded);
        };
        let hold_id = Uuid::now_v7();
        let asked = std::time::Instant::now();
        let decided = self
            .gate
            .reserve(drop, hold_id, member, quantity, now_ms)
            .await;
        self.gate_reserve_seconds
            .record(asked.elapsed().as_secs_f64());
        let hold = match decided? {
            Ok(hold) => hold,
            Err(rejection) => {
                match rejection {
                    ReserveRejection::SoldOut => bump(&self.stats.rejected_sold_out),
                    ReserveRejection::LimitExceeded => bump(&self.stats.rejected_limit),
                    _ => {}
                }
                return Err(rejection.into());
            }
        };
        bump(&self.stats.reservations);
        if !self.gate.journals_holds() {
            if let Err(err) = self.writer.hold_created(hold_row(drop, &hold)).await {
                // Shutting down: the hold stands in memory; its row is lost with this process, and its stock
                // comes back on restart, which can never oversell.
                tracing::warn!(error = %err, hold = %hold.id, "hold row not queued");
            }
        }
        Ok(Reservation::from_hold(drop, &hold, None))
    }

    /// The checks a reservation passes before it may ask the gate: the drop is open and not closed, the quantity is
    /// possible, and the local sold-out flag is clear.
    fn admit(&self, spec: &DropSpec, now_ms: i64, quantity: u32) -> Result<(), EngineError> {
        if now_ms < spec.opens_at_ms() {
            bump(&self.stats.rejected_not_open);
            return Err(EngineError::NotOpen);
        }
        if spec.closes_at_ms().is_some_and(|closes| now_ms >= closes) {
            return Err(EngineError::Closed);
        }
        if quantity == 0 || quantity > spec.per_member_limit {
            return Err(EngineError::InvalidQuantity);
        }
        if self.gate.is_sold_out(spec.id) {
            bump(&self.stats.rejected_sold_out);
            return Err(EngineError::SoldOut);
        }
        Ok(())
    }

    /// Which drop a reservation belongs to: the gate's answer (memory, or the id itself), then its stored row.
    async fn locate(&self, reservation: Uuid) -> Result<Uuid, EngineError> {
        if let Some(drop) = self.gate.locate(reservation).await? {
            return Ok(drop);
        }
        let client = self.db.get().await?;
        let row = store::reservation(&**client, reservation)
            .await?
            .ok_or(EngineError::ReservationNotFound)?;
        Ok(row.drop_id)
    }

    /// A reservation as it stands now.
    pub async fn reservation(&self, id: Uuid) -> Result<Reservation, EngineError> {
        let drop = self.locate(id).await?;
        self.spec(drop).await?;
        if let Some(hold) = self.gate.hold(drop, id).await? {
            let purchase_id = match hold.state {
                HoldState::Paid => Some(self.receipt(id).await?.id),
                _ => None,
            };
            return Ok(Reservation::from_hold(drop, &hold, purchase_id));
        }
        self.stored(id).await
    }

    /// A reservation's stored row: the answer for holds the gate does not know, which are those settled before this
    /// process started (the gate rebuilds only live holds).
    async fn stored(&self, id: Uuid) -> Result<Reservation, EngineError> {
        let client = self.db.get().await?;
        store::reservation(&**client, id)
            .await?
            .ok_or(EngineError::ReservationNotFound)
    }

    async fn receipt(&self, reservation: Uuid) -> Result<Purchase, EngineError> {
        if let Some(purchase) = self.receipts.get(&reservation) {
            return Ok(purchase.clone());
        }
        let client = self.db.get().await?;
        let purchase = store::purchase_by_reservation(&**client, reservation)
            .await?
            .ok_or(EngineError::ReservationNotFound)?;
        self.receipts.insert(reservation, purchase.clone());
        Ok(purchase)
    }

    /// Pays for a hold: `paying`, charge, durable purchase, `paid`. Paying a paid hold again answers the same
    /// purchase.
    pub async fn pay(
        &self,
        reservation: Uuid,
        member: Uuid,
        payment_token: &str,
    ) -> Result<Purchase, EngineError> {
        let Ok(_permit) = self.pay_permits.try_acquire() else {
            bump(&self.stats.rejected_overloaded);
            return Err(EngineError::Overloaded);
        };
        let drop = self.locate(reservation).await?;
        let spec = self.spec(drop).await?;
        let now_ms = self.clock.now_ms();
        let hold = match self
            .gate
            .begin_payment(drop, reservation, member, now_ms)
            .await?
        {
            Ok(hold) => hold,
            Err(TransitionError::AlreadyPaid) => {
                return self.paid_receipt(reservation, member).await
            }
            Err(TransitionError::NotFound) => {
                return match self.settled_before_start(reservation, member).await? {
                    HoldState::Paid => self.paid_receipt(reservation, member).await,
                    HoldState::Released(reason) => Err(EngineError::AlreadyReleased(reason)),
                    HoldState::Held | HoldState::Paying => Err(EngineError::ReservationNotFound),
                };
            }
            Err(TransitionError::Expired) => {
                // begin_payment released it as expired; record that like the reaper would.
                bump(&self.stats.released_expired);
                if let Some(view) = self.gate.hold(drop, reservation).await? {
                    self.queue_release(drop, &view, ReleaseReason::Expired, now_ms)
                        .await;
                }
                return Err(EngineError::HoldExpired);
            }
            Err(err) => return Err(err.into()),
        };
        let amount = spec.price.saturating_mul(i64::from(hold.quantity));
        let request = ChargeRequest {
            reservation_id: reservation,
            member_id: member,
            amount,
            currency: spec.currency.clone(),
            payment_token: payment_token.to_owned(),
        };
        let Ok(outcome) =
            tokio::time::timeout(self.payment_timeout, self.gateway.charge(&request)).await
        else {
            // No answer in time. The charge may yet go through at the gateway: refund it (refunds are idempotent on
            // the reservation), and the hold is `held` again for a retry.
            tracing::warn!(%reservation, timeout = ?self.payment_timeout, "payment gateway did not answer; giving the charge up");
            bump(&self.stats.payments_unavailable);
            self.gateway.refund(reservation).await;
            self.gate.abort_payment(drop, reservation).await??;
            return Err(EngineError::PaymentUnavailable);
        };
        match outcome {
            ChargeOutcome::Approved { .. } => {}
            ChargeOutcome::Declined => {
                bump(&self.stats.payments_declined);
                let released = self.gate.decline_payment(drop, reservation).await??;
                self.queue_release(
                    drop,
                    &released,
                    ReleaseReason::PaymentDeclined,
                    self.clock.now_ms(),
                )
                .await;
                return Err(EngineError::PaymentDeclined);
            }
            ChargeOutcome::Unavailable => {
                bump(&self.stats.payments_unavailable);
                self.gate.abort_payment(drop, reservation).await??;
                return Err(EngineError::PaymentUnavailable);
            }
        }
        let purchase = Purchase {
            id: Uuid::now_v7(),
            reservation_id: reservation,
            drop_id: drop,
            product_id: spec.product_id,
            member_id: member,
            quantity: hold.quantity,
            amount,
            currency: spec.currency.clone(),
            paid_at: self.now(),
        };
        // The stored purchase comes back: if an earlier attempt at this reservation (on any instance) stored one
        // first, that one is the purchase, and its id is the one answered.
        let purchase = match self.writer.purchase(purchase, hold_row(drop, &hold)).await {
            Ok(stored) => stored,
            Err(WriteError::Fenced) => {
                // Postgres refused it (guarantee 5a): this payment outlived its lease and the hold's release is stored
                // (its units may be another buyer's by now), or the drop's stored paid units are at its stock. Give
                // the charge back, and make sure the gate no longer counts the hold (a no-op when it was released).
                bump(&self.stats.payments_fenced);
                tracing::warn!(%reservation, "purchase refused by Postgres (the hold no longer owns its units); refunding");
                self.gateway.refund(reservation).await;
                match self.gate.release_fenced(drop, reservation).await? {
                    Ok(released) => {
                        bump(&self.stats.released_expired);
                        self.queue_release(
                            drop,
                            &released,
                            ReleaseReason::Expired,
                            self.clock.now_ms(),
                        )
                        .await;
                    }
                    Err(TransitionError::AlreadyReleased(_)) => {}
                    Err(err) => {
                        tracing::error!(?err, %reservation, "a fenced payment's hold could not be released in the gate")
                    }
                }
                return Err(EngineError::HoldExpired);
            }
            Err(err) => {
                // Not durable, so not paid: give the charge back and the hold returns to `held` for a retry.
                tracing::error!(error = %err, %reservation, "purchase not stored; refunding");
                self.gateway.refund(reservation).await;
                self.gate.abort_payment(drop, reservation).await??;
                return Err(EngineError::StorageUnavailable(err));
            }
        };
        self.receipts.insert(reservation, purchase.clone());
        // The purchase is durable from here on, so the answer is 200 whatever the gate says now. A gate that cannot
        // be reached leaves the hold `paying`, which no reaper expires; the gate settles it from Postgres later.
        match self.gate.complete_payment(drop, reservation).await {
            Ok(Ok(paid)) => debug_assert_eq!(paid.state, HoldState::Paid),
            Ok(Err(TransitionError::AlreadyPaid)) => {}
            Ok(Err(err)) => {
                tracing::error!(?err, %reservation, "stored purchase, but the gate refused to mark it paid")
            }
            Err(err) => {
                tracing::warn!(error = %err, %reservation, "stored purchase, gate not told yet")
            }
        }
        bump(&self.stats.payments);
        Ok(purchase)
    }

    /// The purchase of a paid reservation, for its owner: paying again answers the same purchase.
    async fn paid_receipt(&self, reservation: Uuid, member: Uuid) -> Result<Purchase, EngineError> {
        let purchase = self.receipt(reservation).await?;
        if purchase.member_id != member {
            return Err(EngineError::NotOwner);
        }
        Ok(purchase)
    }

    /// The stored state of a reservation the gate does not know, for its owner, so that a client retrying a payment
    /// across a restart gets the same purchase rather than a 404.
    async fn settled_before_start(
        &self,
        reservation: Uuid,
        member: Uuid,
    ) -> Result<HoldState, EngineError> {
        let stored = self.stored(reservation).await?;
        if stored.member_id != member {
            return Err(EngineError::NotOwner);
        }
        Ok(stored.state)
    }

    /// Releases a held reservation at its owner's request.
    pub async fn cancel(&self, reservation: Uuid, member: Uuid) -> Result<(), EngineError> {
        let drop = self.locate(reservation).await?;
        self.spec(drop).await?;
        let released = match self.gate.cancel(drop, reservation, member).await? {
            Ok(released) => released,
            Err(TransitionError::NotFound) => {
                return Err(
                    match self.settled_before_start(reservation, member).await? {
                        HoldState::Paid => EngineError::AlreadyPaid,
                        HoldState::Released(reason) => EngineError::AlreadyReleased(reason),
                        HoldState::Held | HoldState::Paying => EngineError::ReservationNotFound,
                    },
                );
            }
            Err(err) => return Err(err.into()),
        };
        bump(&self.stats.released_cancelled);
        self.queue_release(
            drop,
            &released,
            ReleaseReason::Cancelled,
            self.clock.now_ms(),
        )
        .await;
        Ok(())
    }

    async fn queue_release(&self, drop: Uuid, hold: &HoldView, reason: ReleaseReason, at_ms: i64) {
        if self.gate.journals_holds() {
            return;
        }
        if let Err(err) = self
            .writer
            .hold_released(hold_row(drop, hold), reason, to_datetime(at_ms))
            .await
        {
            tracing::warn!(error = %err, hold = %hold.id, "release row not queued");
        }
    }

    /// Releases every expired hold once, and settles payments whose lease ran out; returns how many holds it
    /// released. The reaper calls this on its interval.
    pub async fn reap(&self) -> Result<usize, EngineError> {
        let now_ms = self.clock.now_ms();
        let mut reaped = Reaped::default();
        let mut count = self.gate.reap(now_ms, &mut reaped).await?;
        for (drop, hold) in &reaped.released {
            bump(&self.stats.released_expired);
            self.queue_release(*drop, hold, ReleaseReason::Expired, now_ms)
                .await;
        }
        for (drop, hold) in &reaped.lapsed {
            count += usize::from(self.settle_lapsed(*drop, hold).await?);
        }
        Ok(count)
    }

    /// Settles a payment whose lease ran out (its process died, paused or stalled past the lease): fences it in
    /// Postgres first, then moves the gate to what Postgres decided. Paid when its purchase is stored; else its release
    /// is stored (so the payment, should it resume, is refused there), the charge is refunded, and only then do the
    /// units return to sale. Returns whether it released the hold.
    async fn settle_lapsed(&self, drop: Uuid, hold: &HoldView) -> Result<bool, EngineError> {
        let client = self.db.get().await?;
        let fence = store::fence_payment(&**client, &hold_row(drop, hold), self.now()).await?;
        std::mem::drop(client);
        let settled = match fence {
            store::Fence::Paid => self.gate.complete_payment(drop, hold.id).await?,
            store::Fence::Released => {
                self.gateway.refund(hold.id).await;
                self.gate.release_fenced(drop, hold.id).await?
            }
        };
        tracing::warn!(%drop, hold = %hold.id, ?fence, ?settled, "settled a payment that outlived its lease");
        let released = fence == store::Fence::Released && settled.is_ok();
        if released {
            bump(&self.stats.released_expired);
        }
        Ok(released)
    }

    /// Unloads drops that have been settled for `settled_retain`: no holds left, and sold out or closed, so nothing
    /// about them can change. Their specs, receipts and gate state leave memory; a later request loads them again
    /// from Postgres. Returns how many were unloaded.
    pub async fn unload_settled(&self) -> Result<usize, EngineError> {
        let now_ms = self.clock.now_ms();
        let specs: Vec<Arc<DropSpec>> = self.drops.iter().map(|spec| Arc::clone(&spec)).collect();
        let retain_ms = i64::try_from(self.settled_retain.as_millis()).unwrap_or(i64::MAX);
        let mut unloaded = 0;
        for spec in specs {
            let Some(counts) = self.gate.counts(spec.id).await? else {
                continue;
            };
            let closed = spec.closes_at_ms().is_some_and(|closes| now_ms >= closes);
            if counts.held > 0 || (counts.available > 0 && !closed) {
                self.settled_since.remove(&spec.id);
                continue;
            }
            let since = *self.settled_since.entry(spec.id).or_insert(now_ms);
            if now_ms.saturating_sub(since) < retain_ms {
                continue;
            }
            self.drops.remove(&spec.id);
            self.settled_since.remove(&spec.id);
            self.receipts
                .retain(|_, purchase| purchase.drop_id != spec.id);
            self.gate.unload(spec.id).await;
            // Its holds are all settled and stored as rows; the journal of its new holds can go.
            if let Err(err) = self.forget_journal(spec.id).await {
                tracing::warn!(error = %err, drop = %spec.id, "journal of an unloaded drop not cleared");
            }
            unloaded += 1;
            tracing::info!(drop = %spec.id, "unloaded a settled drop");
        }
        Ok(unloaded)
    }

    /// Materializes an unloaded drop's journaled holds. Every one of them settled (the drop had none left), so its
    /// row is there already unless its release was still queued; after the writer's flush it is.
    async fn forget_journal(&self, drop: Uuid) -> Result<(), EngineError> {
        self.writer
            .flush()
            .await
            .map_err(EngineError::StorageUnavailable)?;
        let client = self.db.get().await?;
        store::materialize_holds(&**client, Some(drop)).await?;
        Ok(())
    }

    /// Drops loaded in memory now.
    pub fn loaded_drops(&self) -> usize {
        self.drops.len()
    }

    /// Whether this instance has the drop in memory: only a loaded drop can change (a settled one is unloaded), so
    /// watchers of counts (the live notifier) read only these and never load a drop back just to look at it.
    pub fn is_loaded(&self, drop: Uuid) -> bool {
        self.drops.contains_key(&drop)
    }

    /// A member's purchases, newest first.
    pub async fn purchases_of(
        &self,
        member: Uuid,
        after: Option<(DateTime<Utc>, Uuid)>,
        limit: i64,
    ) -> Result<Vec<Purchase>, EngineError> {
        let client = self.db.get().await?;
        Ok(store::purchases_of(&**client, member, after, limit).await?)
    }

    /// Stops the reaper and the gate's background work, then drains the writer: everything acknowledged is
    /// committed before this returns.
    pub async fn shutdown(&self) {
        let _ = self.stop.send(true);
        let reaper = self.reaper_task.lock().take();
        if let Some(reaper) = reaper {
            let _ = reaper.await;
        }
        self.gate.shutdown().await;
        if let Err(err) = self.writer.shutdown().await {
            tracing::warn!(error = %err, "writer already stopped");
        }
        let writer = self.writer_task.lock().take();
        if let Some(writer) = writer {
            let _ = writer.await;
        }
    }
}

fn hold_row(drop: Uuid, hold: &HoldView) -> HoldRow {
    HoldRow {
        id: hold.id,
        drop_id: drop,
        member_id: hold.member,
        quantity: hold.quantity,
        created_at: to_datetime(hold.created_at_ms),
        expires_at: to_datetime(hold.expires_at_ms),
    }
}

/// Releases expired holds every `interval` until told to stop. Holds only a weak reference, so a dropped
/// engine stops its reaper too.
async fn reaper(
    engine: std::sync::Weak<Engine>,
    interval: Duration,
    mut stop: watch::Receiver<bool>,
) {
    /// How often the reaper also looks for settled drops to unload.
    const SWEEP_INTERVAL: Duration = Duration::from_secs(30);
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_sweep = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = stop.wait_for(|stop| *stop) => return,
        }
        let Some(engine) = engine.upgrade() else {
            return;
        };
        match engine.reap().await {
            Ok(0) => {}
            Ok(count) => tracing::debug!(count, "reaper released expired holds"),
            Err(err) => tracing::warn!(error = %err, "reaper pass failed"),
        }
        if last_sweep.elapsed() >= SWEEP_INTERVAL.min(engine.settled_retain) {
            last_sweep = tokio::time::Instant::now();
            if let Err(err) = engine.unload_settled().await {
                tracing::warn!(error = %err, "unloading settled drops failed");
            }
        }
    }
}
