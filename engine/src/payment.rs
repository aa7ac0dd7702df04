//! Payment gateways. The engine charges through the `PaymentGateway` trait; `SimulatedGateway` is the bundled
//! one: it decides by test token, can add latency and random outages for the load harness, and is idempotent
//! on the reservation id, as a real gateway is on its idempotency key.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use dashmap::DashMap;
use rand::Rng;
use rustc_hash::FxBuildHasher;
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
    /// Each charge key's approved charge (the idempotency record) and history, in one entry: a payment adds one
    /// entry of fixed size, with nothing else allocated. Fx-hashed: every key is an id the service made
    /// (a reservation, an order, a balance charge), never one a client chose.
    keys: DashMap<Uuid, ChargeKey, FxBuildHasher>,
    refunds: AtomicU64,
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

/// What the simulated gateway keeps of one charge key: its approved charge until a full refund, and its history
/// for good.
#[derive(Debug, Default)]
struct ChargeKey {
    charge: Option<Charge>,
    history: ChargeHistory,
}

#[derive(Debug, Clone, Copy)]
struct Charge {
    /// Answered as `ch_<simple form>`.
    id: Uuid,
    amount: i64,
    times_asked: u32,
}

impl Charge {
    fn approved(&self) -> ChargeOutcome {
        ChargeOutcome::Approved {
            charge_id: format!("ch_{}", self.id.simple()),
        }
    }
}

impl SimulatedGateway {
    pub fn new(config: SimulatedGatewayConfig) -> Self {
        Self {
            config,
            ..Self::default()
        }
    }

    /// Approved charges not refunded in full (each reservation at most once, whatever the retries).
    pub fn charges(&self) -> usize {
        self.keys.iter().filter(|key| key.charge.is_some()).count()
    }

    /// Sum of the amounts of `charges`.
    pub fn charged_amount(&self) -> i64 {
        self.keys
            .iter()
            .filter_map(|key| key.charge.map(|charge| charge.amount))
            .sum()
    }

    /// How many times a reservation's approved charge was asked for (retries included).
    pub fn times_asked(&self, reservation_id: Uuid) -> u32 {
        self.keys
            .get(&reservation_id)
            .and_then(|key| key.charge.map(|charge| charge.times_asked))
            .unwrap_or(0)
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
        self.keys
            .get(&charge_key)
            .map_or_else(ChargeHistory::default, |key| key.history)
    }

    /// Sums over every charge key: (charges approved, amount approved, refunds paid, amount refunded).
    pub fn totals(&self) -> ChargeHistory {
        self.keys
            .iter()
            .fold(ChargeHistory::default(), |sum, key| ChargeHistory {
                approved: sum.approved + key.history.approved,
                approved_amount: sum.approved_amount + key.history.approved_amount,
                refunds: sum.refunds + key.history.refunds,
                refunded_amount: sum.refunded_amount + key.history.refunded_amount,
            })
    }
}

#[async_trait]
impl PaymentGateway for SimulatedGateway {
    async fn charge(&self, request: &ChargeRequest) -> ChargeOutcome {
        if !self.config.latency.is_zero() {
            tokio::time::sleep(self.config.latency).await;
        }
        if let Some(mut key) = self.keys.get_mut(&request.reservation_id) {
            if let Some(charge) = &mut key.charge {
                charge.times_asked += 1;
                return charge.approved();
            }
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
        let mut key = self.keys.entry(request.reservation_id).or_default();
        let key = &mut *key;
        // Under the entry's lock: of two first charges at once, one approves and the other answers its charge.
        let charge = key.charge.get_or_insert_with(|| {
            key.history.approved += 1;
            key.history.approved_amount += request.amount;
            Charge {
                id: Uuid::now_v7(),
                amount: request.amount,
                times_asked: 0,
            }
        });
        charge.approved()
    }

    async fn refund(&self, reservation_id: Uuid) {
        if let Some(mut key) = self.keys.get_mut(&reservation_id) {
            if let Some(charge) = key.charge.take() {
                self.refunds.fetch_add(1, Ordering::Relaxed);
                key.history.refunds += 1;
                key.history.refunded_amount += charge.amount;
            }
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
            let mut key = self.keys.entry(request.charge_key).or_default();
            key.history.refunds += 1;
            key.history.refunded_amount += request.amount;
        }
        RefundOutcome::Refunded
    }
}
