//! The engine as the HTTP layer sees it: drops, reservations, payments and purchases over a `Gate` (the stock
//! authority), a `PaymentGateway`, the batched writer and the reaper.
//!
//! The hot path (`reserve`) is: a permit from a bounded semaphore (or 429 at once), the drop's spec from memory,
//! the clock check, the local sold-out flag (reject with no I/O), one gate call, and a queued (not awaited) row
//! for the writer. A payment marks the hold `paying`, charges, and answers only after the writer has committed
//! the purchase; then it marks the hold `paid`. Hold transitions are decided once, inside the gate.
//!
//! The files by role: this one is `Engine` (its settings, start, drops, the reservation path, cancel, unload);
//! `errors.rs` why it refuses; `stats.rs` its counters; `pay.rs` payments; `reaper.rs` expiry, lapsed payments and
//! the sweep of settled drops.

mod errors;
mod pay;
mod queue;
mod reaper;
mod stats;
mod tally;

pub use errors::EngineError;
pub use queue::{QueueStatus, Standing, QUEUE_TICK};
use stats::bump;
pub use stats::{Counter, EngineStats};
use tally::DropTally;

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use dashmap::DashMap;
use deadpool_postgres::Pool;
use parking_lot::Mutex;
use tokio::sync::{watch, OnceCell, Semaphore};
use tokio::task::JoinHandle;
use uuid::Uuid;

use crate::clock::{to_datetime, Clock};
use crate::core::{
    HoldState, HoldView, IdHasher, ReleaseReason, ReserveRejection, TransitionError,
};
use crate::gate::room::{MemoryRoom, WaitingRoom};
use crate::gate::{Gate, Restore};
use crate::payment::PaymentGateway;
use crate::store;
use crate::types::{
    DropInfo, DropMode, DropSpec, DropStatus, Event, NewDrop, Purchase, Reservation,
};
use crate::writer::{self, HoldRow, WriterConfig, WriterHandle};

/// What a loaded drop keeps of a purchase: the rest of it (product, currency, reservation) comes from the drop's
/// spec and the key, so a receipt allocates nothing and is about half a `Purchase`.
#[derive(Debug, Clone, Copy)]
struct Receipt {
    id: Uuid,
    drop_id: Uuid,
    member_id: Uuid,
    quantity: u32,
    amount: i64,
    paid_at: DateTime<Utc>,
}

impl Receipt {
    fn of(purchase: &Purchase) -> Self {
        Self {
            id: purchase.id,
            drop_id: purchase.drop_id,
            member_id: purchase.member_id,
            quantity: purchase.quantity,
            amount: purchase.amount,
            paid_at: purchase.paid_at,
        }
    }
}

/// Limits and intervals of the engine.
#[derive(Debug, Clone, Copy)]
pub struct EngineConfig {
    /// Reservations in flight at once; past it, reservations are refused at once (429).
    pub reserve_inflight_max: usize,
    /// Payments in flight at once; past it, payments are refused at once (429).
    pub pay_inflight_max: usize,
    /// How often the reaper releases expired holds.
    pub reaper_interval: Duration,
    /// How often an admission step runs for each loaded queue drop.
    pub queue_tick: Duration,
    /// Longest wait for the payment gateway's answer to a charge. Past it the charge is given up: refunded (in case
    /// it went through) and answered as the gateway being unavailable, and the hold goes back to `held`. A hung
    /// gateway never keeps a unit from sale.
    pub payment_timeout: Duration,
    /// How long a drop whose sale is settled (no holds left, and sold out or closed) stays in memory before it is
    /// unloaded; reads of it after that come from Postgres.
    pub settled_retain: Duration,
    /// Whether each drop's decisions are counted for its report (`tally.rs`); off only to measure what counting
    /// costs.
    pub report_counts: bool,
    pub writer: WriterConfig,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            reserve_inflight_max: 4096,
            pay_inflight_max: 1024,
            reaper_interval: Duration::from_secs(1),
            queue_tick: queue::QUEUE_TICK,
            payment_timeout: Duration::from_secs(30),
            settled_retain: Duration::from_secs(60 * 60),
            report_counts: true,
            writer: WriterConfig::default(),
        }
    }
}

/// Most batches of drop rows one list request reads while looking for drops of the wanted status.
const LIST_SCAN_BATCHES: usize = 10;
/// Largest page allocated up front.
const LIST_PAGE_PRESIZE_MAX: usize = 100;

/// A drop's load as every request that waited on it sees it: the drop, or the failure they share.
type Loaded = Result<Arc<DropSpec>, Arc<EngineError>>;

/// The engine. Create with `Engine::start`; stop with `shutdown` (drains the writer).
pub struct Engine {
    db: Pool,
    gate: Arc<dyn Gate>,
    /// The waiting rooms of queue drops: the gate's own (Redis: shared by every instance) or one in memory.
    room: Arc<dyn WaitingRoom>,
    gateway: Arc<dyn PaymentGateway>,
    clock: Arc<dyn Clock>,
    /// Fx-hashed (like the gate's maps): every key is a drop id the service made, so a client can look ids up but
    /// cannot choose ones that collide; every reservation and refusal reads it.
    drops: DashMap<Uuid, Arc<DropSpec>, IdHasher>,
    /// The load from Postgres under way for each drop not loaded yet, which every request for it waits on, and its
    /// outcome, failures included, for those that waited (`spec`). SipHash: its keys are any ids clients send, known
    /// drops or not.
    loading: DashMap<Uuid, Arc<OnceCell<Loaded>>>,
    /// Each loaded drop's counts for its report, taken by the reaper's tick (`tally.rs`); none when
    /// `EngineConfig::report_counts` is off.
    tallies: DashMap<Uuid, Arc<DropTally>, IdHasher>,
    report_counts: bool,
    /// When each loaded drop was first seen settled (unix ms); it is unloaded `settled_retain` later.
    settled_since: DashMap<Uuid, i64>,
    settled_retain: Duration,
    /// Purchases by reservation, so a repeated payment answers the same body. Fx-hashed too: its keys are hold ids
    /// the gate made, and every payment inserts one.
    receipts: DashMap<Uuid, Receipt, IdHasher>,
    writer: WriterHandle,
    writer_task: Mutex<Option<JoinHandle<()>>>,
    reaper_task: Mutex<Option<JoinHandle<()>>>,
    queue_task: Mutex<Option<JoinHandle<()>>>,
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
        let (writer, writer_task) = writer::spawn(db.clone(), config.writer);
        gate.use_writer(writer.clone());
        let (stop, stop_rx) = watch::channel(false);
        let room = gate
            .waiting_room()
            .unwrap_or_else(|| Arc::new(MemoryRoom::default()));
        let engine = Arc::new(Self {
            db,
            gate,
            room,
            gateway,
            clock,
            drops: DashMap::with_hasher(IdHasher::default()),
            loading: DashMap::new(),
            tallies: DashMap::with_hasher(IdHasher::default()),
            report_counts: config.report_counts,
            settled_since: DashMap::new(),
            settled_retain: config.settled_retain,
            receipts: DashMap::with_hasher(IdHasher::default()),
            writer,
            writer_task: Mutex::new(Some(writer_task)),
            reaper_task: Mutex::new(None),
            queue_task: Mutex::new(None),
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
        let reaper = tokio::spawn(reaper::run(
            Arc::downgrade(&engine),
            config.reaper_interval,
            stop_rx.clone(),
        ));
        *engine.reaper_task.lock() = Some(reaper);
        let admission = tokio::spawn(queue::run(
            Arc::downgrade(&engine),
            config.queue_tick,
            stop_rx,
        ));
        *engine.queue_task.lock() = Some(admission);
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
        if self.report_counts {
            self.tallies
                .entry(spec.id)
                .or_insert_with(|| Arc::new(DropTally::new(spec.id, spec.opens_at_ms())));
        }
        let spec = Arc::new(spec);
        Ok(Arc::clone(
            self.drops.entry(spec.id).or_insert(spec).value(),
        ))
    }

    /// The drop's spec from memory, or from Postgres the first time this instance hears of it. The requests that
    /// find a drop not loaded (at its opening, thousands on an instance that has not served it yet) wait for one
    /// load rather than each taking a connection of the pool for the same rows and the pool's wait running out; if
    /// that load fails or is dropped, the next of them tries again.
    async fn spec(&self, drop: Uuid) -> Result<Arc<DropSpec>, EngineError> {
        if let Some(spec) = self.drops.get(&drop) {
            return Ok(Arc::clone(&spec));
        }
        let cell = Arc::clone(self.loading.entry(drop).or_default().value());
        // Every request that waited on this load shares its outcome: a failed load (Postgres away, or no such drop)
        // answers them all at once, where each waiter would otherwise try again after the one before had failed,
        // one at a time. A load whose request went away before it ended is taken over by the next waiter.
        let loaded = cell
            .get_or_init(|| async { self.load(drop).await.map_err(Arc::new) })
            .await
            .clone();
        // The next request after this one ends tries again.
        self.loading
            .remove_if(&drop, |_, waited| Arc::ptr_eq(waited, &cell));
        loaded.map_err(EngineError::shared)
    }

    /// Loads the drop from Postgres and installs it, unless a load that ended as this one was asked for did.
    async fn load(&self, drop: Uuid) -> Result<Arc<DropSpec>, EngineError> {
        if let Some(spec) = self.drops.get(&drop) {
            return Ok(Arc::clone(&spec));
        }
        bump(&self.stats.drops_loaded);
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
            mode: new.mode,
            draw_at: new.draw.as_ref().map(|draw| draw.draw_at),
            queue: new.queue,
            goal_units: new.goal_units,
        };
        let client = self.db.get().await?;
        let seed = new.draw.as_ref().map(|draw| &draw.seed[..]);
        spec.seq = store::insert_drop(&**client, &spec, seed).await?;
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
            queue: self.queue_counts(spec).await?,
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

    /// Places a hold of `quantity` units of the drop for `member`. A draw drop refuses (`NotAdmitted`): its holds
    /// are given by its draw (`reserve_drawn`).
    pub async fn reserve(
        &self,
        drop: Uuid,
        member: Uuid,
        quantity: u32,
    ) -> Result<Reservation, EngineError> {
        self.reserve_as(drop, member, quantity, DropMode::FirstCome)
            .await
    }

    /// Places a hold for an entry the draw of a draw drop admitted: the same path as `reserve`, for the draw's
    /// allocator only.
    pub async fn reserve_drawn(
        &self,
        drop: Uuid,
        member: Uuid,
        quantity: u32,
    ) -> Result<Reservation, EngineError> {
        self.reserve_as(drop, member, quantity, DropMode::Draw)
            .await
    }

    /// `admitted_as`: the mode whose admission the caller speaks for; a drop of another mode refuses.
    async fn reserve_as(
        &self,
        drop: Uuid,
        member: Uuid,
        quantity: u32,
        admitted_as: DropMode,
    ) -> Result<Reservation, EngineError> {
        // Admission of a loaded drop comes from memory before a permit is taken: a refusal there (not open, closed,
        // sold out) does no I/O, so it needs no place among the requests in flight and touches no shared counter of
        // them. A drop not loaded yet is read from Postgres under a permit, like any other I/O.
        let now_ms = self.clock.now_ms();
        let admitted = self
            .drops
            .get(&drop)
            .map(|spec| self.admit(&spec, now_ms, quantity, admitted_as));
        let Ok(_permit) = (match admitted {
            Some(admitted) => {
                admitted?;
                self.reserve_permits.try_acquire()
            }
            None => {
                let permit = self.reserve_permits.try_acquire();
                if permit.is_ok() {
                    let spec = self.spec(drop).await?;
                    self.admit(&spec, now_ms, quantity, admitted_as)?;
                }
                permit
            }
        }) else {
            bump(&self.stats.rejected_overloaded);
            self.count(drop, Event::RefusedOverload, now_ms);
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
                    ReserveRejection::SoldOut => {
                        bump(&self.stats.rejected_sold_out);
                        self.count(drop, Event::RefusedSoldOut, now_ms);
                    }
                    ReserveRejection::LimitExceeded => {
                        bump(&self.stats.rejected_limit);
                        self.count(drop, Event::RefusedLimit, now_ms);
                    }
                    _ => {}
                }
                return Err(rejection.into());
            }
        };
        bump(&self.stats.reservations);
        self.count(drop, Event::Reserved, now_ms);
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
    fn admit(
        &self,
        spec: &DropSpec,
        now_ms: i64,
        quantity: u32,
        admitted_as: DropMode,
    ) -> Result<(), EngineError> {
        // One enum compare on the first-come path.
        if spec.mode != admitted_as {
            return Err(EngineError::NotAdmitted);
        }
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
            self.count(spec.id, Event::RefusedSoldOut, now_ms);
            return Err(EngineError::SoldOut);
        }
        Ok(())
    }

    /// Counts `event` of a loaded drop for its report.
    fn count(&self, drop: Uuid, event: Event, now_ms: i64) {
        if !self.report_counts {
            return;
        }
        if let Some(tally) = self.tallies.get(&drop) {
            tally.count(event, now_ms);
        }
    }

    /// Queues for the writer what every loaded drop counted for its report since the last call (the reaper's tick
    /// calls it; tests call it, then flush the writer, to read a report at once).
    pub async fn record_report(&self) {
        let mut rows = Vec::new();
        for tally in &self.tallies {
            tally.take(&mut rows);
        }
        if rows.is_empty() {
            return;
        }
        if let Err(err) = self.writer.seconds(rows).await {
            tracing::warn!(error = %err, "a drop report's counts not queued");
        }
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
        let kept = self.receipts.get(&reservation).map(|receipt| *receipt);
        if let Some(purchase) = kept.and_then(|receipt| self.purchase_of(reservation, receipt)) {
            return Ok(purchase);
        }
        let client = self.db.get().await?;
        let purchase = store::purchase_by_reservation(&**client, reservation)
            .await?
            .ok_or(EngineError::ReservationNotFound)?;
        self.receipts.insert(reservation, Receipt::of(&purchase));
        Ok(purchase)
    }

    /// A kept receipt as its purchase, with what its drop's spec says of every purchase of the drop; `None` when
    /// the spec is not loaded.
    fn purchase_of(&self, reservation: Uuid, receipt: Receipt) -> Option<Purchase> {
        let spec = self.drops.get(&receipt.drop_id)?;
        Some(Purchase {
            id: receipt.id,
            reservation_id: reservation,
            drop_id: receipt.drop_id,
            product_id: spec.product_id,
            member_id: receipt.member_id,
            quantity: receipt.quantity,
            amount: receipt.amount,
            currency: spec.currency.clone(),
            paid_at: receipt.paid_at,
        })
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
        self.count(drop, Event::Cancelled, self.clock.now_ms());
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
        let admission = self.queue_task.lock().take();
        if let Some(admission) = admission {
            let _ = admission.await;
        }
        // The reports' last counts go out with everything else the writer drains.
        self.record_report().await;
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
