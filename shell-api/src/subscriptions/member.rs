//! The member's side: reading subscriptions and their charges, cancelling (now or at the period's end), pausing
//! and resuming, changing the payment, and accepting a product's new price.
//!
//! Every change locks the subscription's row (`FOR NO KEY UPDATE`), so it waits for a renewal in flight and the
//! renewal sees it afterwards. Cancelling now or pausing while an attempt a dead renewer left `pending` is still
//! unresolved is refused (409 `renewal_in_progress`): the gateway may have approved it, and the next renewal pass
//! (within a minute in `serve`) records it first. Resuming, and accepting a price while paused for it, start a new
//! period at once through the renewal code (`renew.rs`), so the first charge after a pause is charged the same way
//! as every renewal.

use axum::extract::State;
use axum::Json;
use chrono::{DateTime, Utc};
use deadpool_postgres::GenericClient;
use serde::Deserialize;
use uuid::Uuid;

use super::model::{
    charge_id, subscription_not_found, Charge, Subscription, CHARGE_COLUMNS, COLUMNS,
};
use super::renew::{renew_due, set_canceled, Options};
use crate::auth::AuthMember;
use crate::error::{ApiError, Fields};
use crate::extract::{ApiJson, ApiPath, ApiQuery};
use crate::pagination::{Page, PageQuery};
use crate::shop::orders::{check_payment, Payment, PaymentInput};
use crate::AppState;

/// A subscription by id.
pub async fn load(client: &impl GenericClient, id: Uuid) -> Result<Option<Subscription>, ApiError> {
    let row = client
        .query_opt(
            &format!("SELECT {COLUMNS} FROM subscriptions WHERE id = $1"),
            &[&id],
        )
        .await?;
    Ok(row.as_ref().map(Subscription::from_row))
}

/// The subscription, if the caller may read it: its member, the product's seller, an admin (others 403).
async fn readable(
    client: &impl GenericClient,
    caller: &AuthMember,
    id: Uuid,
) -> Result<Subscription, ApiError> {
    let subscription = load(client, id).await?.ok_or_else(subscription_not_found)?;
    if subscription.seller_id != caller.id {
        caller.require_owner_or_admin(subscription.member_id)?;
    }
    Ok(subscription)
}

/// My subscriptions, newest first.
#[utoipa::path(get, path = "/api/v1/members/me/subscriptions", tag = "subscriptions", security(("bearer" = [])),
    params(crate::pagination::PageParams),
    responses((status = 200, description = "A page of my subscriptions, newest first", body = Page<Subscription>)))]
pub async fn list_mine(
    State(state): State<AppState>,
    member: AuthMember,
    ApiQuery(page): ApiQuery<PageQuery>,
) -> Result<Json<Page<Subscription>>, ApiError> {
    let limit = page.limit()?;
    let after: Option<Uuid> = page.after()?;
    let client = state.db.get().await?;
    let rows = client
        .query(
            &format!(
                "SELECT {COLUMNS} FROM subscriptions
                 WHERE member_id = $1 AND ($2::uuid IS NULL OR id < $2)
                 ORDER BY id DESC LIMIT $3"
            ),
            &[&member.id, &after, &(limit + 1)],
        )
        .await?;
    let items = rows.iter().map(Subscription::from_row).collect();
    Ok(Json(Page::from_rows(items, limit, |s: &Subscription| s.id)))
}

/// One subscription (its member, the product's seller, admin).
#[utoipa::path(get, path = "/api/v1/subscriptions/{id}", tag = "subscriptions", security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "The subscription")),
    responses((status = 200, description = "The subscription", body = Subscription),
        (status = 403, description = "`forbidden`: not its member, seller or an admin", body = crate::error::ErrorBody),
        (status = 404, description = "`subscription_not_found`", body = crate::error::ErrorBody)))]
pub async fn get_subscription(
    State(state): State<AppState>,
    caller: AuthMember,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<Json<Subscription>, ApiError> {
    let client = state.db.get().await?;
    readable(&client, &caller, id).await.map(Json)
}

/// A subscription's charges, newest first (its member, the product's seller, admin).
#[utoipa::path(get, path = "/api/v1/subscriptions/{id}/charges", tag = "subscriptions", security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "The subscription"), crate::pagination::PageParams),
    responses((status = 200, description = "A page of charges, newest first", body = Page<Charge>),
        (status = 403, description = "`forbidden`", body = crate::error::ErrorBody),
        (status = 404, description = "`subscription_not_found`", body = crate::error::ErrorBody)))]
pub async fn charges(
    State(state): State<AppState>,
    caller: AuthMember,
    ApiPath(id): ApiPath<Uuid>,
    ApiQuery(page): ApiQuery<PageQuery>,
) -> Result<Json<Page<Charge>>, ApiError> {
    let limit = page.limit()?;
    let after: Option<(DateTime<Utc>, i32)> = page.after()?;
    let (start, attempt) = after.unzip();
    let client = state.db.get().await?;
    readable(&client, &caller, id).await?;
    let rows = client
        .query(
            &format!(
                "SELECT {CHARGE_COLUMNS} FROM subscription_charges
                 WHERE subscription_id = $1 AND status <> 'pending'
                   AND ($2::timestamptz IS NULL OR (period_start, attempt) < ($2, $3::int4))
                 ORDER BY period_start DESC, attempt DESC LIMIT $4"
            ),
            &[&id, &start, &attempt, &(limit + 1)],
        )
        .await?;
    let items = rows.iter().map(Charge::from_row).collect();
    Ok(Json(Page::from_rows(items, limit, |c: &Charge| {
        (c.period_start, c.attempt)
    })))
}

/// Locks a subscription its member (or an admin) is changing.
async fn lock(
    tx: &impl GenericClient,
    caller: &AuthMember,
    id: Uuid,
) -> Result<Subscription, ApiError> {
    let row = tx
        .query_opt(
            &format!("SELECT {COLUMNS} FROM subscriptions WHERE id = $1 FOR NO KEY UPDATE"),
            &[&id],
        )
        .await?
        .ok_or_else(subscription_not_found)?;
    let subscription = Subscription::from_row(&row);
    caller.require_owner_or_admin(subscription.member_id)?;
    Ok(subscription)
}

/// 409 while the attempt due next was begun by a renewer that died before recording it.
async fn refuse_in_flight(
    tx: &impl GenericClient,
    subscription: &Subscription,
) -> Result<(), ApiError> {
    let due = charge_id(
        subscription.id,
        subscription.current_period_end,
        subscription.renewal_attempt,
    );
    let pending = tx
        .query_opt(
            "SELECT 1 FROM subscription_charges WHERE id = $1 AND status = 'pending'",
            &[&due],
        )
        .await?;
    if pending.is_some() {
        return Err(ApiError::conflict(
            "renewal_in_progress",
            "a renewal charge of this subscription is being recorded; retry in a minute",
        ));
    }
    Ok(())
}

fn canceled_conflict() -> ApiError {
    ApiError::conflict(
        "subscription_canceled",
        "the subscription is canceled; subscribe again",
    )
}

#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
pub struct CancelInput {
    /// `true` (the default): the subscription runs to the end of the paid period, then ends without another
    /// charge. `false`: it ends now. A subscription that is past due or paused has no paid period running and
    /// ends now either way.
    pub at_period_end: Option<bool>,
}

/// Cancels now or at the end of the paid period. Cancelling a canceled subscription answers it unchanged.
#[utoipa::path(post, path = "/api/v1/subscriptions/{id}/cancel", tag = "subscriptions", security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "The subscription")), request_body = CancelInput,
    responses((status = 200, description = "The subscription", body = Subscription),
        (status = 403, description = "`forbidden`: not its member", body = crate::error::ErrorBody),
        (status = 404, description = "`subscription_not_found`", body = crate::error::ErrorBody),
        (status = 409, description = "`renewal_in_progress`: retry in a minute", body = crate::error::ErrorBody)))]
pub async fn cancel(
    State(state): State<AppState>,
    caller: AuthMember,
    ApiPath(id): ApiPath<Uuid>,
    body: axum::body::Bytes,
) -> Result<Json<Subscription>, ApiError> {
    // The body is optional: none at all is `{}`.
    let input: CancelInput = if body.iter().all(u8::is_ascii_whitespace) {
        CancelInput::default()
    } else {
        serde_json::from_slice(&body).map_err(|err| match err.classify() {
            serde_json::error::Category::Data => ApiError::invalid("body", err.to_string()),
            _ => ApiError::bad_request("malformed JSON body"),
        })?
    };
    let at_period_end = input.at_period_end.unwrap_or(true);
    let now = state.engine.now();
    let mut client = state.db.get().await?;
    let tx = client.transaction().await?;
    let subscription = lock(&tx, &caller, id).await?;
    match subscription.status.as_str() {
        "canceled" => return Ok(Json(subscription)),
        "active" if at_period_end => {
            tx.execute(
                "UPDATE subscriptions SET cancel_at_period_end = true WHERE id = $1",
                &[&id],
            )
            .await?;
        }
        _ => {
            refuse_in_flight(&tx, &subscription).await?;
            set_canceled(&tx, id, now).await?;
        }
    }
    let changed = load(&tx, id).await?.ok_or_else(subscription_not_found)?;
    tx.commit().await?;
    Ok(Json(changed))
}

/// Pauses: no charges until resumed. Pausing a paused subscription answers it unchanged.
#[utoipa::path(post, path = "/api/v1/subscriptions/{id}/pause", tag = "subscriptions", security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "The subscription")),
    responses((status = 200, description = "The subscription, `paused`", body = Subscription),
        (status = 403, description = "`forbidden`: not its member", body = crate::error::ErrorBody),
        (status = 404, description = "`subscription_not_found`", body = crate::error::ErrorBody),
        (status = 409, description = "`subscription_canceled`, or `renewal_in_progress`", body = crate::error::ErrorBody)))]
pub async fn pause(
    State(state): State<AppState>,
    caller: AuthMember,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<Json<Subscription>, ApiError> {
    let mut client = state.db.get().await?;
    let tx = client.transaction().await?;
    let subscription = lock(&tx, &caller, id).await?;
    match subscription.status.as_str() {
        "paused" => return Ok(Json(subscription)),
        "canceled" => return Err(canceled_conflict()),
        _ => {}
    }
    refuse_in_flight(&tx, &subscription).await?;
    tx.execute(
        "UPDATE subscriptions SET status = 'paused', paused_reason = 'member', next_attempt_at = NULL
         WHERE id = $1",
        &[&id],
    )
    .await?;
    let changed = load(&tx, id).await?.ok_or_else(subscription_not_found)?;
    tx.commit().await?;
    Ok(Json(changed))
}

/// Marks a paused subscription due now for a new period starting now, in the caller's transaction.
async fn reopen(tx: &impl GenericClient, id: Uuid, now: DateTime<Utc>) -> Result<(), ApiError> {
    tx.execute(
        "UPDATE subscriptions SET status = 'active', paused_reason = NULL, cancel_at_period_end = false,
             current_period_end = $2, renewal_attempt = 1, next_attempt_at = $2
         WHERE id = $1",
        &[&id, &now],
    )
    .await?;
    Ok(())
}

/// Charges the new period of a reopened subscription now (the renewal code), then reads it back.
async fn renew_now(
    state: &AppState,
    id: Uuid,
    now: DateTime<Utc>,
) -> Result<Subscription, ApiError> {
    let options = Options {
        only: Some(id),
        ..Options::default()
    };
    renew_due(&state.db, state.engine.gateway().as_ref(), now, options).await?;
    let client = state.db.get().await?;
    load(&client, id).await?.ok_or_else(subscription_not_found)
}

/// Resumes a paused subscription: a new period starts now and is charged at once (declined: `past_due`, with
/// dunning). Resuming one that is not paused answers it unchanged.
#[utoipa::path(post, path = "/api/v1/subscriptions/{id}/resume", tag = "subscriptions", security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "The subscription")),
    responses((status = 200, description = "The subscription after its new period's charge", body = Subscription),
        (status = 403, description = "`forbidden`: not its member", body = crate::error::ErrorBody),
        (status = 404, description = "`subscription_not_found`", body = crate::error::ErrorBody),
        (status = 409, description = "`subscription_canceled`", body = crate::error::ErrorBody)))]
pub async fn resume(
    State(state): State<AppState>,
    caller: AuthMember,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<Json<Subscription>, ApiError> {
    let now = state.engine.now();
    {
        let mut client = state.db.get().await?;
        let tx = client.transaction().await?;
        let subscription = lock(&tx, &caller, id).await?;
        match subscription.status.as_str() {
            "paused" => {}
            "canceled" => return Err(canceled_conflict()),
            _ => return Ok(Json(subscription)),
        }
        reopen(&tx, id, now).await?;
        tx.commit().await?;
    }
    renew_now(&state, id, now).await.map(Json)
}

/// Accepts the product's current terms (a higher price): renewals charge them from now on. A subscription paused
/// for the price resumes at once, with a new period charged at the new price.
#[utoipa::path(post, path = "/api/v1/subscriptions/{id}/accept-price", tag = "subscriptions", security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "The subscription")),
    responses((status = 200, description = "The subscription at the product's current price", body = Subscription),
        (status = 403, description = "`forbidden`: not its member", body = crate::error::ErrorBody),
        (status = 404, description = "`subscription_not_found`", body = crate::error::ErrorBody),
        (status = 409, description = "`subscription_canceled`", body = crate::error::ErrorBody)))]
pub async fn accept_price(
    State(state): State<AppState>,
    caller: AuthMember,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<Json<Subscription>, ApiError> {
    let now = state.engine.now();
    let resumed = {
        let mut client = state.db.get().await?;
        let tx = client.transaction().await?;
        let subscription = lock(&tx, &caller, id).await?;
        if subscription.status == "canceled" {
            return Err(canceled_conflict());
        }
        tx.execute(
            "UPDATE subscriptions s SET price = p.price, currency = p.currency, billing_interval = p.billing_interval
             FROM products p WHERE s.id = $1 AND p.id = s.product_id AND p.billing_interval IS NOT NULL",
            &[&id],
        )
        .await?;
        let resume = subscription.paused_reason.as_deref() == Some("price_change");
        if resume {
            reopen(&tx, id, now).await?;
        }
        tx.commit().await?;
        resume
    };
    if resumed {
        return renew_now(&state, id, now).await.map(Json);
    }
    let client = state.db.get().await?;
    load(&client, id)
        .await?
        .ok_or_else(subscription_not_found)
        .map(Json)
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct PaymentChange {
    #[schema(value_type = PaymentInput, required = true)]
    pub payment: Option<PaymentInput>,
}

/// Changes how the next charges are paid (a new card, or points); the next attempt, a dunning retry included,
/// uses it.
#[utoipa::path(put, path = "/api/v1/subscriptions/{id}/payment", tag = "subscriptions", security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "The subscription")), request_body = PaymentChange,
    responses((status = 200, description = "The subscription", body = Subscription),
        (status = 403, description = "`forbidden`: not its member", body = crate::error::ErrorBody),
        (status = 404, description = "`subscription_not_found`", body = crate::error::ErrorBody),
        (status = 409, description = "`subscription_canceled`, or `renewal_in_progress`", body = crate::error::ErrorBody),
        (status = 422, description = "`validation`", body = crate::error::ErrorBody)))]
pub async fn change_payment(
    State(state): State<AppState>,
    caller: AuthMember,
    ApiPath(id): ApiPath<Uuid>,
    ApiJson(input): ApiJson<PaymentChange>,
) -> Result<Json<Subscription>, ApiError> {
    let mut fields = Fields::default();
    let payment = check_payment(input.payment, &mut fields);
    let payment = fields.into_result(payment)?;
    let token = match &payment {
        Payment::Card { token } => Some(token.clone()),
        Payment::Points => None,
    };
    let mut client = state.db.get().await?;
    let tx = client.transaction().await?;
    let subscription = lock(&tx, &caller, id).await?;
    if subscription.status == "canceled" {
        return Err(canceled_conflict());
    }
    // An attempt left in flight is finished with the payment it began with.
    refuse_in_flight(&tx, &subscription).await?;
    if payment == Payment::Points && subscription.currency != crate::shop::POINTS_CURRENCY {
        return Err(ApiError::invalid(
            "payment.method",
            "points pay only for products priced in KRW",
        ));
    }
    tx.execute(
        "UPDATE subscriptions SET payment_method = $2, payment_token = $3 WHERE id = $1",
        &[&id, &payment.method(), &token],
    )
    .await?;
    let changed = load(&tx, id).await?.ok_or_else(subscription_not_found)?;
    tx.commit().await?;
    Ok(Json(changed))
}
