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

#[async_trait]
pub trait PaymentGateway: Send + Sync + 'static {
    async fn charge(&self, request: &ChargeRequest) -> ChargeOutcome;
    /// Gives an approved charge back (used when the purchase could not be stored).
    async fn refund(&self, reservation_id: Uuid);
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

    pub fn refunds(&self) -> u64 {
        self.refunds.load(Ordering::Relaxed)
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
            .or_insert_with(|| ChargeRecord {
                charge_id: format!("ch_{}", Uuid::now_v7().simple()),
                amount: request.amount,
                times_asked: 0,
            });
        ChargeOutcome::Approved {
            charge_id: record.charge_id.clone(),
        }
    }

    async fn refund(&self, reservation_id: Uuid) {
        if self.charges.remove(&reservation_id).is_some() {
            self.refunds.fetch_add(1, Ordering::Relaxed);
        }
    }
}
