//! Payment gateways. The engine charges through the `PaymentGateway` trait; `SimulatedGateway` is the bundled
//! one: it decides by test token, can add latency and random outages for the load harness, and is idempotent
//! on the reservation id, as a real gateway is on its idempotency key.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use dashmap::DashMap;
use rand::Rng;
use uuid::Uuid;

/// One charge: the reservation id is the idempotency key, so a retried charge is never charged twice.
#[derive(Debug, Clone)]
pub struct ChargeRequest {
    pub reservation_id: Uuid,
    pub member_id: Uuid,
    pub amount: i64,
    pub currency: String,
    pub payment_token: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChargeOutcome {
    Approved {
        charge_id: String,
    },
    Declined,
    /// The gateway could not decide now; nothing was charged. The caller may retry.
    Unavailable,
}

/// A refund of part (or all) of an approved charge, named by the charge's idempotency key. `refund_id` is the
/// refund's own idempotency key: a retried refund is paid once.
#[derive(Debug, Clone)]
pub struct RefundRequest {
    pub charge_key: Uuid,
    pub refund_id: Uuid,
    pub amount: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefundOutcome {
    Refunded,
    /// The gateway could not refund now; nothing was refunded. The caller may retry with the same `refund_id`.
    Unavailable,
}

#[async_trait]
pub trait PaymentGateway: Send + Sync + 'static {
    async fn charge(&self, request: &ChargeRequest) -> ChargeOutcome;
    /// Gives an approved charge back (used when the purchase could not be stored).
    async fn refund(&self, reservation_id: Uuid);
    /// Gives `amount` of an approved charge back, once per `refund_id` (the shop's seller-accepted refunds).
    async fn refund_amount(&self, request: &RefundRequest) -> RefundOutcome;
}

/// Where the simulated gateway keeps the idempotency records of its refunds when they must outlive the process,
/// as a real gateway's do: a test that kills an instance in the middle of refunding, restarts it and counts the
/// refunds "at the gateway" needs the gateway's memory to survive the kill. Without one, the records live in the
/// gateway's own memory.
#[async_trait]
pub trait RefundLedger: std::fmt::Debug + Send + Sync + 'static {
    /// Records the refund once per `refund_id`: `Ok(true)` when this call paid it, `Ok(false)` when that id was
    /// paid before (a retry, answered as refunded without paying again), `Err` when it could not be recorded (the
    /// gateway is unavailable and nothing was paid).
    async fn record(&self, request: &RefundRequest) -> Result<bool, String>;
}

/// Settings of the simulated gateway.
#[derive(Debug, Clone, Copy, Default)]
pub struct SimulatedGatewayConfig {
    /// Added to every charge, to model a real gateway's round trip.
    pub latency: Duration,
    /// Probability (0..=1) that a charge answers Unavailable, to exercise retries.
    pub failure_rate: f64,
}

/// The bundled gateway: `tok_declined` declines, `tok_unavailable` is unavailable, any other `tok_*` pays, and
/// anything else is declined as an invalid token.
#[derive(Debug, Default)]
pub struct SimulatedGateway {
    config: SimulatedGatewayConfig,
    /// Approved charges by reservation: the idempotency record.
    charges: DashMap<Uuid, ChargeRecord>,
    refunds: AtomicU64,
    /// What happened to each charge key, kept after a full refund so tests can count charges and refunds.
    history: DashMap<Uuid, ChargeHistory>,
    /// Refund ids already paid: the idempotency record of `refund_amount` (unless `ledger` is set).
    refund_ids: DashMap<Uuid, i64>,
    /// A durable idempotency record of refunds, set once at start when the deployment asks for one.
    ledger: std::sync::OnceLock<std::sync::Arc<dyn RefundLedger>>,
}

/// What the simulated gateway did for one charge key.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ChargeHistory {
    /// Charges approved (a replay of an approved charge is not a new one).
    pub approved: u32,
    pub approved_amount: i64,
    /// Refunds paid, full (`refund`) and partial (`refund_amount`).
    pub refunds: u32,
    pub refunded_amount: i64,
}

#[derive(Debug, Clone)]
struct ChargeRecord {
    charge_id: String,
    amount: i64,
    times_asked: u32,
}

impl SimulatedGateway {
    pub fn new(config: SimulatedGatewayConfig) -> Self {
        Self {
            config,
            ..Self::default()
        }
    }

    /// Approved charges (each reservation at most once, whatever the retries).
    pub fn charges(&self) -> usize {
        self.charges.len()
    }

    /// Sum of approved amounts.
    pub fn charged_amount(&self) -> i64 {
        self.charges.iter().map(|c| c.amount).sum()
    }

    /// How many times a reservation's approved charge was asked for (retries included).
    pub fn times_asked(&self, reservation_id: Uuid) -> u32 {
        self.charges
            .get(&reservation_id)
            .map_or(0, |c| c.times_asked)
    }

    /// Keeps the idempotency records of `refund_amount` in `ledger` from now on; a second call is ignored (the
    /// first ledger stays, so two records never disagree).
    pub fn use_refund_ledger(&self, ledger: std::sync::Arc<dyn RefundLedger>) {
        let _ = self.ledger.set(ledger);
    }

    pub fn refunds(&self) -> u64 {
        self.refunds.load(Ordering::Relaxed)
    }

    /// Charges and refunds of one charge key (a reservation, an order, a balance charge).
    pub fn history(&self, charge_key: Uuid) -> ChargeHistory {
        self.history
            .get(&charge_key)
            .map_or_else(ChargeHistory::default, |history| *history)
    }

    /// Sums over every charge key: (charges approved, amount approved, refunds paid, amount refunded).
    pub fn totals(&self) -> ChargeHistory {
        self.history
            .iter()
            .fold(ChargeHistory::default(), |sum, entry| ChargeHistory {
                approved: sum.approved + entry.approved,
                approved_amount: sum.approved_amount + entry.approved_amount,
                refunds: sum.refunds + entry.refunds,
                refunded_amount: sum.refunded_amount + entry.refunded_amount,
            })
    }
}

#[async_trait]
impl PaymentGateway for SimulatedGateway {
    async fn charge(&self, request: &ChargeRequest) -> ChargeOutcome {
        if !self.config.latency.is_zero() {
            tokio::time::sleep(self.config.latency).await;
        }
        if let Some(mut existing) = self.charges.get_mut(&request.reservation_id) {
            existing.times_asked += 1;
            return ChargeOutcome::Approved {
                charge_id: existing.charge_id.clone(),
            };
        }
        match request.payment_token.as_str() {
            "tok_declined" => return ChargeOutcome::Declined,
            "tok_unavailable" => return ChargeOutcome::Unavailable,
            token if !token.starts_with("tok_") => return ChargeOutcome::Declined,
            _ => {}
        }
        if self.config.failure_rate > 0.0
            && rand::thread_rng().gen_bool(self.config.failure_rate.min(1.0))
        {
            return ChargeOutcome::Unavailable;
        }
        let record = self
            .charges
            .entry(request.reservation_id)
            .or_insert_with(|| {
                let mut history = self.history.entry(request.reservation_id).or_default();
                history.approved += 1;
                history.approved_amount += request.amount;
                ChargeRecord {
                    charge_id: format!("ch_{}", Uuid::now_v7().simple()),
                    amount: request.amount,
                    times_asked: 0,
                }
            });
        ChargeOutcome::Approved {
            charge_id: record.charge_id.clone(),
        }
    }

    async fn refund(&self, reservation_id: Uuid) {
        if let Some((_, record)) = self.charges.remove(&reservation_id) {
            self.refunds.fetch_add(1, Ordering::Relaxed);
            let mut history = self.history.entry(reservation_id).or_default();
            history.refunds += 1;
            history.refunded_amount += record.amount;
        }
    }

    async fn refund_amount(&self, request: &RefundRequest) -> RefundOutcome {
        if !self.config.latency.is_zero() {
            tokio::time::sleep(self.config.latency).await;
        }
        let paid_now = match self.ledger.get() {
            Some(ledger) => match ledger.record(request).await {
                Ok(paid_now) => paid_now,
                Err(err) => {
                    tracing::warn!(error = %err, "the simulated gateway's refund ledger is unavailable");
                    return RefundOutcome::Unavailable;
                }
            },
            None => match self.refund_ids.entry(request.refund_id) {
                dashmap::mapref::entry::Entry::Vacant(vacant) => {
                    vacant.insert(request.amount);
                    true
                }
                dashmap::mapref::entry::Entry::Occupied(_) => false,
            },
        };
        if paid_now {
            self.refunds.fetch_add(1, Ordering::Relaxed);
            let mut history = self.history.entry(request.charge_key).or_default();
            history.refunds += 1;
            history.refunded_amount += request.amount;
        }
        RefundOutcome::Refunded
    }
}
