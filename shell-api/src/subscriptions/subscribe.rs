//! Subscribing: the first period is charged at once, and nothing is kept when it is declined.
//!
//! Points: one transaction stores the subscription, its first charge and the ledger debit, or none of them (402
//! `insufficient_balance`). Card: the gateway is asked first, outside any transaction, with the first charge's id
//! as its key; then one transaction stores the subscription and the paid charge; if that fails, the card charge is
//! refunded before answering (as `shop/orders.rs` does). `Idempotency-Key` replays the first answer.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::{DateTime, Utc};
use deadpool_postgres::GenericClient;
use engine::payment::{ChargeOutcome, ChargeRequest};
use serde::Deserialize;
use uuid::Uuid;

use super::model::{charge_id, Interval, Subscription, COLUMNS};
use crate::auth::AuthMember;
use crate::error::{ApiError, Fields, OnConstraint};
use crate::extract::ApiJson;
use crate::idempotency::IdempotencyKey;
use crate::shop::balance::{move_balance, EntryKind, Movement};
use crate::shop::orders::{check_payment, Payment, PaymentInput};
use crate::shop::{
    insufficient_balance, payment_declined, payment_unavailable, product_not_found, POINTS_CURRENCY,
};
use crate::AppState;

#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct SubscribeInput {
    #[schema(value_type = Uuid, required = true)]
    pub product_id: Option<Uuid>,
    #[schema(value_type = PaymentInput, required = true)]
    pub payment: Option<PaymentInput>,
}

/// Subscribes to a subscription product and pays its first period.
#[utoipa::path(post, path = "/api/v1/subscriptions", tag = "subscriptions", security(("bearer" = [])),
    params(crate::idempotency::IdempotencyParams), request_body = SubscribeInput,
    responses((status = 201, description = "The subscription, its first period paid", body = Subscription),
        (status = 402, description = "`payment_declined` or `insufficient_balance`: nothing was kept", body = crate::error::ErrorBody),
        (status = 404, description = "`product_not_found`", body = crate::error::ErrorBody),
        (status = 409, description = "`already_subscribed`: a live subscription of this product exists", body = crate::error::ErrorBody),
        (status = 422, description = "`validation`: not a subscription product, or a bad payment", body = crate::error::ErrorBody),
        (status = 503, description = "`payment_unavailable`: nothing was kept, retry", body = crate::error::ErrorBody)))]
pub async fn create_subscription(
    State(state): State<AppState>,
    member: AuthMember,
    IdempotencyKey(key): IdempotencyKey,
    ApiJson(input): ApiJson<SubscribeInput>,
) -> Result<Response, ApiError> {
    let mut fields = Fields::default();
    let product = fields.take("product_id", input.product_id.ok_or("required"));
    let payment = check_payment(input.payment, &mut fields);
    let (product, payment) = fields.into_result(product.zip(payment))?;
    // In a task of its own: a card charged is never left without its subscription or its refund.
    crate::guard::run_to_completion(async move {
        let state = &state;
        Ok(state
            .idempotency
            .run(member.id, "subscription", key, || async move {
                match subscribe(state, member.id, product, payment).await {
                    Ok(body) => (StatusCode::CREATED, Json(body)).into_response(),
                    Err(err) => err.into_response(),
                }
            })
            .await)
    })
    .await
}

/// A subscription product's terms as they are now.
#[derive(Debug, Clone)]
pub(super) struct Offer {
    pub seller_id: Uuid,
    pub price: i64,
    pub currency: String,
    pub interval: Interval,
}

/// The terms of a live subscription product: 404 for no product, 422 for a product of another kind.
async fn read_offer(client: &impl GenericClient, product: Uuid) -> Result<Offer, ApiError> {
    let row = client
        .query_opt(
            "SELECT seller_id, price, currency, billing_interval FROM products
             WHERE id = $1 AND deleted_at IS NULL",
            &[&product],
        )
        .await?
        .ok_or_else(product_not_found)?;
    let interval: Option<&str> = row.get(3);
    let Some(interval) = interval else {
        return Err(ApiError::invalid(
            "product_id",
            "must be a subscription product",
        ));
    };
    Ok(Offer {
        seller_id: row.get(0),
        price: row.get(1),
        currency: row.get(2),
        interval: Interval::from_db(interval)?,
    })
}

fn already_subscribed() -> ApiError {
    ApiError::conflict(
        "already_subscribed",
        "you already have a live subscription of this product",
    )
}

/// Subscribes `member` to `product`: see the module comment for the steps and why in this order.
pub async fn subscribe(
    state: &AppState,
    member: Uuid,
    product: Uuid,
    payment: Payment,
) -> Result<Subscription, ApiError> {
    let offer = {
        let client = state.db.get().await?;
        let offer = read_offer(&client, product).await?;
        let live = client
            .query_opt(
                "SELECT 1 FROM subscriptions WHERE member_id = $1 AND product_id = $2 AND status <> 'canceled'",
                &[&member, &product],
            )
            .await?;
        if live.is_some() {
            return Err(already_subscribed());
        }
        offer
    };
    if payment == Payment::Points && offer.currency != POINTS_CURRENCY {
        return Err(ApiError::invalid(
            "payment.method",
            "points pay only for products priced in KRW",
        ));
    }
    let now = state.engine.now();
    let id = Uuid::now_v7();
    let charge = charge_id(id, now, 1);
    let gateway = state.engine.gateway();
    if let Payment::Card { token } = &payment {
        let request = ChargeRequest {
            reservation_id: charge,
            member_id: member,
            amount: offer.price,
            currency: offer.currency.clone(),
            payment_token: token.clone(),
        };
        let client = state.db.get().await?;
        match super::gateway::charge(&client, gateway.as_ref(), &request).await? {
            ChargeOutcome::Approved { .. } => {}
            ChargeOutcome::Declined => return Err(payment_declined()),
            ChargeOutcome::Unavailable => return Err(payment_unavailable()),
        }
    }
    let new = NewSubscription {
        id,
        product,
        member,
        offer,
        payment: payment.clone(),
        now,
    };
    let err = match store(state, &new).await {
        Ok(subscription) => return Ok(subscription),
        Err(err) => err,
    };
    if matches!(payment, Payment::Card { .. }) {
        let client = state.db.get().await?;
        // A commit whose answer was lost may still have committed: then the subscription stands, and its charge.
        if let Some(stored) = super::member::load(&client, id).await? {
            return Ok(stored);
        }
        tracing::info!(subscription = %id, code = err.code(), "subscription not stored; refunding its first charge");
        super::gateway::refund(&client, gateway.as_ref(), charge).await?;
    }
    Err(err)
}

struct NewSubscription {
    id: Uuid,
    product: Uuid,
    member: Uuid,
    offer: Offer,
    payment: Payment,
    now: DateTime<Utc>,
}

/// The subscription, its paid first charge and (points) the debit, in one transaction.
async fn store(state: &AppState, new: &NewSubscription) -> Result<Subscription, ApiError> {
    let end = new.offer.interval.after(new.now);
    let token = match &new.payment {
        Payment::Card { token } => Some(token.as_str()),
        Payment::Points => None,
    };
    let interval = match new.offer.interval {
        Interval::Week => "week",
        Interval::Month => "month",
    };
    let mut client = state.db.get().await?;
    let tx = client.transaction().await?;
    let row = tx
        .query_one(
            &format!(
                "INSERT INTO subscriptions (id, product_id, member_id, seller_id, status, price, currency,
                     billing_interval, payment_method, payment_token, current_period_start, current_period_end,
                     next_attempt_at, created_at)
                 VALUES ($1, $2, $3, $4, 'active', $5, $6, $7, $8, $9, $10, $11, $11, $10)
                 RETURNING {COLUMNS}"
            ),
            &[
                &new.id,
                &new.product,
                &new.member,
                &new.offer.seller_id,
                &new.offer.price,
                &new.offer.currency,
                &interval,
                &new.payment.method(),
                &token,
                &new.now,
                &end,
            ],
        )
        .await
        .on_constraint("subscriptions_one_live_per_member", already_subscribed)?;
    let subscription = Subscription::from_row(&row);
    let charge = Attempt::first(&subscription);
    record_paid(&tx, &charge, new.now).await?;
    tx.commit().await?;
    Ok(subscription)
}

/// One charge attempt: which subscription, period and attempt, and how much.
#[derive(Debug, Clone)]
pub(super) struct Attempt {
    pub id: Uuid,
    pub subscription: Uuid,
    pub member: Uuid,
    pub seller: Uuid,
    pub product: Uuid,
    pub period_start: DateTime<Utc>,
    pub period_end: DateTime<Utc>,
    pub attempt: i32,
    pub amount: i64,
    pub currency: String,
    pub method: String,
}

impl Attempt {
    /// The first period of a subscription just stored.
    fn first(subscription: &Subscription) -> Self {
        Self {
            id: charge_id(subscription.id, subscription.current_period_start, 1),
            subscription: subscription.id,
            member: subscription.member_id,
            seller: subscription.seller_id,
            product: subscription.product_id,
            period_start: subscription.current_period_start,
            period_end: subscription.current_period_end,
            attempt: 1,
            amount: subscription.price,
            currency: subscription.currency.clone(),
            method: subscription.payment_method.clone(),
        }
    }
}

/// Writes the attempt with `status` unless it is already written (a card attempt is written `pending` before the
/// gateway is asked, so a re-run finds it). Returns whether this call wrote it.
pub(super) async fn insert_attempt(
    client: &impl GenericClient,
    charge: &Attempt,
    status: &str,
    now: DateTime<Utc>,
) -> Result<bool, ApiError> {
    let paid_at = (status == "paid").then_some(now);
    let written = client
        .execute(
            "INSERT INTO subscription_charges (id, subscription_id, member_id, seller_id, product_id, period_start,
                 period_end, attempt, amount, currency, payment_method, status, created_at, paid_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)
             ON CONFLICT (id) DO NOTHING",
            &[
                &charge.id,
                &charge.subscription,
                &charge.member,
                &charge.seller,
                &charge.product,
                &charge.period_start,
                &charge.period_end,
                &charge.attempt,
                &charge.amount,
                &charge.currency,
                &charge.method,
                &status,
                &now,
                &paid_at,
            ],
        )
        .await?;
    Ok(written == 1)
}

/// Records the attempt paid, in the caller's transaction: a card attempt's pending row becomes paid; a points
/// attempt is written paid with its ledger debit (402 `insufficient_balance` when the balance does not cover it,
/// and then nothing of it is written). The partial unique index on paid charges refuses a second paid charge of
/// the period whatever called this.
pub(super) async fn record_paid(
    tx: &impl GenericClient,
    charge: &Attempt,
    now: DateTime<Utc>,
) -> Result<(), ApiError> {
    if charge.method == "card" {
        let updated = tx
            .execute(
                "UPDATE subscription_charges SET status = 'paid', paid_at = $2 WHERE id = $1 AND status = 'pending'",
                &[&charge.id, &now],
            )
            .await?;
        if updated == 0 {
            insert_attempt(tx, charge, "paid", now).await?;
        }
        return Ok(());
    }
    if !insert_attempt(tx, charge, "paid", now).await? {
        // Already recorded (under the subscription's row lock this is a replay): it was debited then.
        return Ok(());
    }
    if charge.amount > 0 {
        let debited = move_balance(
            tx,
            Movement {
                id: Uuid::now_v7(),
                member: charge.member,
                kind: EntryKind::Subscription,
                amount: -charge.amount,
                order_id: None,
                refund_id: None,
                subscription_charge_id: Some(charge.id),
            },
        )
        .await?;
        if debited.is_none() {
            // Nothing of an unpaid attempt stays; the caller records it failed, or rolls back.
            tx.execute(
                "DELETE FROM subscription_charges WHERE id = $1",
                &[&charge.id],
            )
            .await?;
            return Err(insufficient_balance());
        }
    }
    Ok(())
}

/// Records the attempt failed, in the caller's transaction (a card attempt's pending row, or a new row).
pub(super) async fn record_failed(
    tx: &impl GenericClient,
    charge: &Attempt,
    now: DateTime<Utc>,
) -> Result<(), ApiError> {
    let updated = tx
        .execute(
            "UPDATE subscription_charges SET status = 'failed' WHERE id = $1 AND status = 'pending'",
            &[&charge.id],
        )
        .await?;
    if updated == 0 {
        insert_attempt(tx, charge, "failed", now).await?;
    }
    Ok(())
}
