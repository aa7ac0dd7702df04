//! Renewals and dunning: `flashsale renew [--at]` and the loop in `serve` run this same code.
//!
//! A pass claims up to `batch` due subscriptions (`next_attempt_at <= now`) in one transaction with
//! `FOR NO KEY UPDATE SKIP LOCKED`, so renewers on any number of processes take disjoint sets without waiting for
//! each other, and each claim is held until the transaction that records its outcome commits (never released
//! before the charge is recorded). For each claimed subscription it decides what is due: cancel (at period end, or
//! the product is gone), pause (the product's price rose above what the member agreed to), or a charge attempt for
//! the period starting at `current_period_end`. Card attempts are written `pending` on a second connection and
//! committed, then the gateway is asked with the attempt's id as its key (`gateway.rs`); points attempts need no
//! gateway. Then the claim's transaction records every outcome (paid: the period advances and the member is told
//! `subscription_renewed`; declined: `past_due` and the next retry, or `canceled` after the last, and the member is
//! told `subscription_payment_failed`) and commits.
//!
//! A renewer that dies anywhere in this leaves at most committed `pending` attempts and gateway decisions; its
//! claims vanish with its connection, the next pass claims the same subscriptions, derives the same attempt ids,
//! and the gateway answers each with its first decision: nothing is charged twice and no approval is forgotten.
//! Postgres's partial unique index on paid charges is the last word if anything else went wrong.

use std::time::Duration;

use chrono::{DateTime, Utc};
use clap::Args;
use deadpool_postgres::{GenericClient, Pool};
use engine::payment::{ChargeOutcome, ChargeRequest, PaymentGateway};
use futures_util::{StreamExt, TryStreamExt};
use uuid::Uuid;

use super::model::{charge_id, retry_at, Interval, Subscription, ATTEMPTS_MAX, COLUMNS};
use super::subscribe::{record_failed, record_paid, Attempt};
use crate::config::{DbArgs, EngineArgs};
use crate::error::ApiError;
use crate::notify::{notify_members, About, Kind};

/// Subscriptions claimed per transaction.
pub const BATCH_DEFAULT: i64 = 500;
/// Gateway calls in flight at once within a pass, each on a pooled connection of its own (so their commits share
/// Postgres's WAL flushes); with the pass's own connection, at most this plus one of the pool's connections.
const GATEWAY_CONCURRENCY: usize = 8;
/// How long a renewal the gateway could not decide (unavailable) waits before it is asked again.
const UNAVAILABLE_RETRY: chrono::Duration = chrono::Duration::minutes(10);
/// How often `serve` runs renewals.
const SERVE_INTERVAL: Duration = Duration::from_secs(60);

/// How a pass runs.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// Subscriptions claimed per transaction.
    pub batch: i64,
    /// Only this subscription (a resume charges its new period at once).
    pub only: Option<Uuid>,
    /// Test hook: the process exits right after the gateway approves a charge, before the outcome is committed.
    pub exit_after_approval: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            batch: BATCH_DEFAULT,
            only: None,
            exit_after_approval: false,
        }
    }
}

/// What a run did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Tally {
    pub claimed: u64,
    pub renewed: u64,
    pub failed: u64,
    pub canceled: u64,
    pub paused: u64,
    pub postponed: u64,
}

impl Tally {
    fn add(&mut self, other: Tally) {
        self.claimed += other.claimed;
        self.renewed += other.renewed;
        self.failed += other.failed;
        self.canceled += other.canceled;
        self.paused += other.paused;
        self.postponed += other.postponed;
    }
}

/// Runs every renewal due at `now`, pass after pass, until a pass finds nothing left to claim.
pub async fn renew_due(
    pool: &Pool,
    gateway: &dyn PaymentGateway,
    now: DateTime<Utc>,
    options: Options,
) -> Result<Tally, ApiError> {
    let mut total = Tally::default();
    loop {
        let tally = renew_pass(pool, gateway, now, options).await?;
        total.add(tally);
        if tally.claimed == 0 {
            return Ok(total);
        }
    }
}

/// What is due for one claimed subscription.
#[derive(Debug, Clone)]
enum Plan {
    /// Canceled at its period's end, or its product is gone.
    Cancel,
    /// The product's terms moved against the member (a higher price, another currency or interval): it waits for
    /// `accept-price`.
    PauseForPrice,
    Charge(Attempt),
}

/// A subscription product's terms now, as a renewal compares them.
#[derive(Debug, Clone)]
struct Terms {
    price: i64,
    currency: String,
    interval: Option<String>,
    deleted: bool,
}

/// One pass: claim, ask the gateway, record, commit.
async fn renew_pass(
    pool: &Pool,
    gateway: &dyn PaymentGateway,
    now: DateTime<Utc>,
    options: Options,
) -> Result<Tally, ApiError> {
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    let claimed = claim(&tx, now, options).await?;
    if claimed.is_empty() {
        return Ok(Tally::default());
    }
    let terms = product_terms(&tx, &claimed).await?;
    let pending = pending_amounts(&tx, &claimed).await?;
    let plans: Vec<(Subscription, Plan)> = claimed
        .into_iter()
        .map(|subscription| {
            let due = due_attempt(&subscription);
            let plan = match pending.get(&due) {
                // An attempt a dead renewer left in flight is finished as it was begun, whatever changed since:
                // the gateway may have approved it.
                Some(amount) => Plan::Charge(attempt(&subscription, *amount)),
                None => plan(&subscription, terms.get(&subscription.product_id)),
            };
            (subscription, plan)
        })
        .collect();
    let outcomes = ask_gateway(pool, gateway, &plans, now).await?;
    if options.exit_after_approval
        && outcomes
            .iter()
            .any(|outcome| matches!(outcome, Some(ChargeOutcome::Approved { .. })))
    {
        tracing::warn!("test hook: exiting after the gateway's approval, before the commit");
        std::process::exit(86);
    }
    let mut tally = Tally {
        claimed: plans.len() as u64,
        ..Tally::default()
    };
    // Pipelined on the claim's connection: each subscription's statements run in order, and different
    // subscriptions touch different rows (and members), so their statements may interleave.
    let mut applies = Vec::with_capacity(plans.len());
    for ((subscription, plan), outcome) in plans.iter().zip(outcomes) {
        applies.push(apply(&tx, subscription, plan, outcome, now));
    }
    for applied in futures_util::future::try_join_all(applies).await? {
        tally.add(applied);
    }
    tx.commit().await?;
    Ok(tally)
}

/// Claims due subscriptions, skipping any another renewer holds.
async fn claim(
    tx: &impl GenericClient,
    now: DateTime<Utc>,
    options: Options,
) -> Result<Vec<Subscription>, ApiError> {
    let rows = tx
        .query(
            &format!(
                "SELECT {COLUMNS} FROM subscriptions
                 WHERE next_attempt_at <= $1 AND ($3::uuid IS NULL OR id = $3)
                 ORDER BY next_attempt_at LIMIT $2
                 FOR NO KEY UPDATE SKIP LOCKED"
            ),
            &[&now, &options.batch, &options.only],
        )
        .await?;
    Ok(rows.iter().map(Subscription::from_row).collect())
}

async fn product_terms(
    tx: &impl GenericClient,
    claimed: &[Subscription],
) -> Result<std::collections::HashMap<Uuid, Terms>, ApiError> {
    let ids: Vec<Uuid> = claimed.iter().map(|s| s.product_id).collect();
    let rows = tx
        .query(
            "SELECT id, price, currency, billing_interval, deleted_at IS NOT NULL FROM products WHERE id = ANY($1)",
            &[&ids],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|row| {
            let terms = Terms {
                price: row.get(1),
                currency: row.get(2),
                interval: row.get(3),
                deleted: row.get(4),
            };
            (row.get(0), terms)
        })
        .collect())
}

/// The id of the attempt due next for `subscription`.
fn due_attempt(subscription: &Subscription) -> Uuid {
    charge_id(
        subscription.id,
        subscription.current_period_end,
        subscription.renewal_attempt,
    )
}

/// Attempts already written `pending` (by a renewer that died before recording them), by id, with their amounts.
async fn pending_amounts(
    tx: &impl GenericClient,
    claimed: &[Subscription],
) -> Result<std::collections::HashMap<Uuid, i64>, ApiError> {
    let ids: Vec<Uuid> = claimed.iter().map(due_attempt).collect();
    let rows = tx
        .query(
            "SELECT id, amount FROM subscription_charges WHERE id = ANY($1) AND status = 'pending'",
            &[&ids],
        )
        .await?;
    Ok(rows.iter().map(|row| (row.get(0), row.get(1))).collect())
}

/// What is due for `subscription`, given its product's terms now. A lower price applies by itself; a higher one
/// (or other terms) only after the member's consent.
fn plan(subscription: &Subscription, terms: Option<&Terms>) -> Plan {
    let Some(terms) = terms.filter(|terms| !terms.deleted) else {
        return Plan::Cancel;
    };
    if subscription.cancel_at_period_end {
        return Plan::Cancel;
    }
    let same_terms = terms.currency == subscription.currency
        && terms.interval.as_deref() == Some(subscription.interval.as_str());
    if !same_terms || terms.price > subscription.price {
        return Plan::PauseForPrice;
    }
    Plan::Charge(attempt(subscription, terms.price.min(subscription.price)))
}

/// The attempt due next for `subscription`, for `amount`: the period starting at its current period's end.
fn attempt(subscription: &Subscription, amount: i64) -> Attempt {
    let interval = Interval::parse(&subscription.interval).unwrap_or(Interval::Month);
    let start = subscription.current_period_end;
    Attempt {
        id: due_attempt(subscription),
        subscription: subscription.id,
        member: subscription.member_id,
        seller: subscription.seller_id,
        product: subscription.product_id,
        period_start: start,
        period_end: interval.after(start),
        attempt: subscription.renewal_attempt,
        amount,
        currency: subscription.currency.clone(),
        method: subscription.payment_method.clone(),
    }
}

/// Asks the gateway for every card attempt (after writing each `pending` and committing it), at most
/// `GATEWAY_CONCURRENCY` at once. `None` where no gateway call is due (points, cancel, pause).
async fn ask_gateway(
    pool: &Pool,
    gateway: &dyn PaymentGateway,
    plans: &[(Subscription, Plan)],
    now: DateTime<Utc>,
) -> Result<Vec<Option<ChargeOutcome>>, ApiError> {
    let card_attempts: Vec<&Attempt> = plans
        .iter()
        .filter_map(|(subscription, plan)| match plan {
            Plan::Charge(attempt) if subscription.payment_token.is_some() => Some(attempt),
            _ => None,
        })
        .collect();
    if card_attempts.is_empty() {
        return Ok(vec![None; plans.len()]);
    }
    // Every card attempt of the pass is committed `pending` at once, before any gateway call.
    let client = pool.get().await?;
    insert_pending(&client, &card_attempts, now).await?;
    drop(client);
    // Made first and streamed after: a closure inside the stream trips the compiler's Send inference.
    let mut calls = Vec::with_capacity(plans.len());
    for (subscription, plan) in plans {
        calls.push(ask_one(pool, gateway, subscription, plan));
    }
    futures_util::stream::iter(calls)
        .buffered(GATEWAY_CONCURRENCY)
        .try_collect()
        .await
}

/// One subscription's gateway call, if a card attempt is due (already committed `pending`).
async fn ask_one<'a>(
    pool: &'a Pool,
    gateway: &'a dyn PaymentGateway,
    subscription: &'a Subscription,
    plan: &'a Plan,
) -> Result<Option<ChargeOutcome>, ApiError> {
    let (Plan::Charge(attempt), Some(token)) = (plan, &subscription.payment_token) else {
        return Ok(None);
    };
    let outside = pool.get().await?;
    let outside: &deadpool_postgres::Client = &outside;
    let request = ChargeRequest {
        reservation_id: attempt.id,
        member_id: attempt.member,
        amount: attempt.amount,
        currency: attempt.currency.clone(),
        payment_token: token.clone(),
    };
    super::gateway::charge(outside, gateway, &request)
        .await
        .map(Some)
}

/// Writes card attempts `pending` in one statement (an attempt already written, by a renewer that died, stays).
async fn insert_pending(
    client: &impl GenericClient,
    attempts: &[&Attempt],
    now: DateTime<Utc>,
) -> Result<(), ApiError> {
    let column = |get: fn(&Attempt) -> Uuid| attempts.iter().map(|a| get(a)).collect::<Vec<_>>();
    let ids = column(|a| a.id);
    let subscriptions = column(|a| a.subscription);
    let members = column(|a| a.member);
    let sellers = column(|a| a.seller);
    let products = column(|a| a.product);
    let starts: Vec<DateTime<Utc>> = attempts.iter().map(|a| a.period_start).collect();
    let ends: Vec<DateTime<Utc>> = attempts.iter().map(|a| a.period_end).collect();
    let numbers: Vec<i32> = attempts.iter().map(|a| a.attempt).collect();
    let amounts: Vec<i64> = attempts.iter().map(|a| a.amount).collect();
    let currencies: Vec<&str> = attempts.iter().map(|a| a.currency.as_str()).collect();
    client
        .execute(
            "INSERT INTO subscription_charges (id, subscription_id, member_id, seller_id, product_id, period_start,
                 period_end, attempt, amount, currency, payment_method, status, created_at)
             SELECT id, subscription_id, member_id, seller_id, product_id, period_start, period_end, attempt, amount,
                    currency, 'card', 'pending', $11
             FROM UNNEST($1::uuid[], $2::uuid[], $3::uuid[], $4::uuid[], $5::uuid[], $6::timestamptz[],
                         $7::timestamptz[], $8::int4[], $9::int8[], $10::text[])
                  AS t (id, subscription_id, member_id, seller_id, product_id, period_start, period_end, attempt,
                        amount, currency)
             ON CONFLICT (id) DO NOTHING",
            &[
                &ids,
                &subscriptions,
                &members,
                &sellers,
                &products,
                &starts,
                &ends,
                &numbers,
                &amounts,
                &currencies,
                &now,
            ],
        )
        .await?;
    Ok(())
}

/// Records one subscription's outcome in the claim's transaction.
async fn apply(
    tx: &impl GenericClient,
    subscription: &Subscription,
    plan: &Plan,
    outcome: Option<ChargeOutcome>,
    now: DateTime<Utc>,
) -> Result<Tally, ApiError> {
    let attempt = match plan {
        Plan::Cancel => {
            set_canceled(tx, subscription.id, now).await?;
            return Ok(Tally {
                canceled: 1,
                ..Tally::default()
            });
        }
        Plan::PauseForPrice => {
            tx.execute(
                "UPDATE subscriptions SET status = 'paused', paused_reason = 'price_change', next_attempt_at = NULL
                 WHERE id = $1",
                &[&subscription.id],
            )
            .await?;
            return Ok(Tally {
                paused: 1,
                ..Tally::default()
            });
        }
        Plan::Charge(attempt) => attempt,
    };
    let paid = match outcome {
        Some(ChargeOutcome::Unavailable) => {
            tx.execute(
                "UPDATE subscriptions SET next_attempt_at = $2 WHERE id = $1",
                &[&subscription.id, &(now + UNAVAILABLE_RETRY)],
            )
            .await?;
            return Ok(Tally {
                postponed: 1,
                ..Tally::default()
            });
        }
        Some(ChargeOutcome::Declined) => false,
        Some(ChargeOutcome::Approved { .. }) | None => match record_paid(tx, attempt, now).await {
            Ok(()) => true,
            Err(err) if err.code() == "insufficient_balance" => false,
            Err(err) => return Err(err),
        },
    };
    if paid {
        advance(tx, subscription, attempt).await?;
        return Ok(Tally {
            renewed: 1,
            ..Tally::default()
        });
    }
    record_failed(tx, attempt, now).await?;
    dun(tx, subscription, attempt, now).await
}

/// The paid period becomes the current one; the next renewal is due at its end.
async fn advance(
    tx: &impl GenericClient,
    subscription: &Subscription,
    attempt: &Attempt,
) -> Result<(), ApiError> {
    tx.execute(
        "UPDATE subscriptions SET status = 'active', current_period_start = $2, current_period_end = $3,
             renewal_attempt = 1, next_attempt_at = $3, price = $4
         WHERE id = $1",
        &[
            &subscription.id,
            &attempt.period_start,
            &attempt.period_end,
            &attempt.amount,
        ],
    )
    .await?;
    tell(tx, subscription, Kind::SubscriptionRenewed).await
}

/// A declined attempt: `past_due` until the next retry, or `canceled` after the last.
async fn dun(
    tx: &impl GenericClient,
    subscription: &Subscription,
    attempt: &Attempt,
    now: DateTime<Utc>,
) -> Result<Tally, ApiError> {
    let next = attempt.attempt + 1;
    let mut tally = Tally {
        failed: 1,
        ..Tally::default()
    };
    match retry_at(attempt.period_start, next).filter(|_| next <= ATTEMPTS_MAX) {
        Some(at) => {
            tx.execute(
                "UPDATE subscriptions SET status = 'past_due', renewal_attempt = $2, next_attempt_at = $3
                 WHERE id = $1",
                &[&subscription.id, &next, &at],
            )
            .await?;
        }
        None => {
            set_canceled(tx, subscription.id, now).await?;
            tally.canceled = 1;
        }
    }
    tell(tx, subscription, Kind::SubscriptionPaymentFailed).await?;
    Ok(tally)
}

pub(super) async fn set_canceled(
    tx: &impl GenericClient,
    id: Uuid,
    now: DateTime<Utc>,
) -> Result<(), ApiError> {
    tx.execute(
        "UPDATE subscriptions SET status = 'canceled', next_attempt_at = NULL, paused_reason = NULL,
             cancel_at_period_end = false, canceled_at = $2
         WHERE id = $1",
        &[&id, &now],
    )
    .await?;
    Ok(())
}

/// Tells the member `kind` about the subscription, in the transaction that makes it true.
async fn tell(
    tx: &impl GenericClient,
    subscription: &Subscription,
    kind: Kind,
) -> Result<(), ApiError> {
    let about = About {
        product_id: Some(subscription.product_id),
        subscription_id: Some(subscription.id),
        ..About::default()
    };
    notify_members(tx, kind, &[subscription.member_id], about).await?;
    Ok(())
}

/// Runs renewals every minute until the process ends, by the engine's clock.
pub async fn renew_forever(state: crate::AppState) {
    loop {
        let now = state.engine.now();
        match renew_due(
            &state.db,
            state.engine.gateway().as_ref(),
            now,
            Options::default(),
        )
        .await
        {
            Ok(tally) if tally.claimed > 0 => tracing::info!(?tally, "renewals"),
            Ok(_) => {}
            Err(err) => tracing::warn!(code = err.code(), "renewals failed; retrying later"),
        }
        tokio::time::sleep(SERVE_INTERVAL).await;
    }
}

/// `flashsale renew [--at RFC3339]`.
#[derive(Debug, Clone, Args)]
pub struct RenewArgs {
    #[command(flatten)]
    pub db: DbArgs,
    /// The payment gateway's settings (`PAYMENT_LATENCY_MS`, `PAYMENT_FAILURE_RATE`) come from here.
    #[command(flatten)]
    pub engine: EngineArgs,
    /// Run renewals as if the time were this (RFC 3339; default now): the test clock.
    #[arg(long)]
    pub at: Option<DateTime<Utc>>,
    /// Subscriptions claimed per transaction.
    #[arg(long, env = "RENEW_BATCH_MAX", default_value_t = BATCH_DEFAULT, value_parser = clap::value_parser!(i64).range(1..=10_000))]
    pub batch: i64,
    /// Test hook: exit right after the gateway approves a charge, before recording it (for crash tests).
    #[arg(long, env = "RENEW_TEST_EXIT_AFTER_APPROVAL", hide = true)]
    pub exit_after_approval: bool,
}

/// `flashsale renew`: every renewal due at `--at`, then a line saying what was done and how fast.
pub async fn run(args: RenewArgs) -> anyhow::Result<()> {
    let pool = crate::db::connect(&args.db).await?;
    crate::db::migrate(&pool).await?;
    let gateway = engine::payment::SimulatedGateway::new(args.engine.gateway_config());
    let now = args.at.unwrap_or_else(Utc::now);
    let options = Options {
        batch: args.batch,
        only: None,
        exit_after_approval: args.exit_after_approval,
    };
    let started = std::time::Instant::now();
    let tally = renew_due(&pool, &gateway, now, options)
        .await
        .map_err(|err| anyhow::anyhow!("renewals failed: {}", err.code()))?;
    let seconds = started.elapsed().as_secs_f64();
    println!(
        "renewals at {}: claimed {}, renewed {}, failed {}, canceled {}, paused {}, postponed {} in {seconds:.2} s ({:.0} renewed/s)",
        now.to_rfc3339(),
        tally.claimed,
        tally.renewed,
        tally.failed,
        tally.canceled,
        tally.paused,
        tally.postponed,
        tally.renewed as f64 / seconds.max(1e-9),
    );
    Ok(())
}
