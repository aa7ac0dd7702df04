//! Points balances: one `balances` row per member beside an append-only ledger (`balance_entries`), in KRW.
//!
//! The balance moves only through `move_balance`, one statement that updates the row conditionally
//! (`balance + amount >= 0`) and appends the entry with the balance after it, inside the caller's transaction. So
//! the balance always equals the sum of its ledger, a debit that does not fit moves nothing, and concurrent
//! charges, orders and refunds add up exactly (each waits for the row lock of the one before).

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::{DateTime, Utc};
use deadpool_postgres::GenericClient;
use engine::payment::{ChargeOutcome, ChargeRequest};
use serde::{Deserialize, Serialize};
use tokio_postgres::Row;
use uuid::Uuid;

use super::{check_token, payment_declined, payment_unavailable, POINTS_CURRENCY};
use crate::auth::AuthMember;
use crate::error::{ApiError, Fields};
use crate::extract::{ApiJson, ApiQuery};
use crate::idempotency::IdempotencyKey;
use crate::pagination::{Page, PageQuery};
use crate::AppState;

/// Largest single point charge: far above any real top-up, far below where sums overflow.
pub const CHARGE_MAX: i64 = 100_000_000_000;

/// Why a ledger entry moved the balance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum EntryKind {
    Charge,
    Order,
    Refund,
    /// A subscription's period paid with points (`subscriptions/`).
    Subscription,
}

impl EntryKind {
    fn as_str(self) -> &'static str {
        match self {
            EntryKind::Charge => "charge",
            EntryKind::Order => "order",
            EntryKind::Refund => "refund",
            EntryKind::Subscription => "subscription",
        }
    }

    fn from_db(text: &str) -> Result<Self, ApiError> {
        match text {
            "charge" => Ok(EntryKind::Charge),
            "order" => Ok(EntryKind::Order),
            "refund" => Ok(EntryKind::Refund),
            "subscription" => Ok(EntryKind::Subscription),
            other => Err(ApiError::internal(anyhow::anyhow!(
                "unknown ledger kind {other:?}"
            ))),
        }
    }
}

/// A ledger entry as the API shows it; `amount` is signed, `balance` is the balance right after it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Entry {
    pub id: Uuid,
    pub kind: EntryKind,
    pub amount: i64,
    pub balance: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub order_id: Option<Uuid>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refund_id: Option<Uuid>,
    /// The subscription charge a `subscription` entry paid.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subscription_charge_id: Option<Uuid>,
    pub created_at: DateTime<Utc>,
}

const ENTRY_COLUMNS: &str =
    "id, kind, amount, balance, order_id, refund_id, created_at, subscription_charge_id";

impl Entry {
    fn from_row(row: &Row) -> Result<Self, ApiError> {
        Ok(Self {
            id: row.get(0),
            kind: EntryKind::from_db(row.get(1))?,
            amount: row.get(2),
            balance: row.get(3),
            order_id: row.get(4),
            refund_id: row.get(5),
            created_at: row.get(6),
            subscription_charge_id: row.get(7),
        })
    }
}

/// What moved a balance, for its ledger entry.
#[derive(Debug, Clone, Copy)]
pub struct Movement {
    pub id: Uuid,
    pub member: Uuid,
    pub kind: EntryKind,
    /// Signed: a debit is negative. Never zero (the ledger has no empty entries).
    pub amount: i64,
    pub order_id: Option<Uuid>,
    pub refund_id: Option<Uuid>,
    pub subscription_charge_id: Option<Uuid>,
}

/// Moves a balance and appends its ledger entry, in the caller's transaction. `None` when a debit would take the
/// balance below zero: then nothing moved. Locks the member's balance row until the transaction ends.
pub async fn move_balance(
    tx: &impl GenericClient,
    movement: Movement,
) -> Result<Option<Entry>, ApiError> {
    debug_assert_ne!(movement.amount, 0, "the ledger has no empty entries");
    if movement.amount > 0 {
        tx.execute(
            "INSERT INTO balances (member_id, currency) VALUES ($1, $2) ON CONFLICT DO NOTHING",
            &[&movement.member, &POINTS_CURRENCY],
        )
        .await?;
    }
    let row = tx
        .query_opt(
            &format!(
                "WITH moved AS (
                     UPDATE balances SET balance = balance + $2, updated_at = now()
                     WHERE member_id = $1 AND balance + $2 >= 0
                     RETURNING balance
                 )
                 INSERT INTO balance_entries
                     (id, member_id, kind, amount, balance, order_id, refund_id, created_at, subscription_charge_id)
                 SELECT $3, $1, $4, $2, balance, $5, $6, now(), $7 FROM moved
                 RETURNING {ENTRY_COLUMNS}"
            ),
            &[
                &movement.member,
                &movement.amount,
                &movement.id,
                &movement.kind.as_str(),
                &movement.order_id,
                &movement.refund_id,
                &movement.subscription_charge_id,
            ],
        )
        .await?;
    let entry = row.as_ref().map(Entry::from_row).transpose()?;
    if let Some(entry) = &entry {
        // Conservation, checked where the balance moves: never negative after any entry.
        debug_assert!(entry.balance >= 0);
    }
    Ok(entry)
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct BalanceBody {
    pub balance: i64,
    pub currency: &'static str,
}

/// A member's balance; 0 for a member who never charged.
pub async fn balance_of(client: &impl GenericClient, member: Uuid) -> Result<i64, ApiError> {
    let row = client
        .query_opt(
            "SELECT balance FROM balances WHERE member_id = $1",
            &[&member],
        )
        .await?;
    Ok(row.map_or(0, |row| row.get(0)))
}

/// My points balance.
#[utoipa::path(get, path = "/api/v1/members/me/balance", tag = "shop", security(("bearer" = [])),
    responses((status = 200, description = "The balance", body = BalanceBody)))]
pub async fn get_balance(
    State(state): State<AppState>,
    member: AuthMember,
) -> Result<Json<BalanceBody>, ApiError> {
    let client = state.db.get().await?;
    Ok(Json(BalanceBody {
        balance: balance_of(&client, member.id).await?,
        currency: POINTS_CURRENCY,
    }))
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct ChargeInput {
    /// Points to add, 1..=100000000000.
    #[schema(value_type = i64, required = true, minimum = 1, maximum = 100_000_000_000_i64)]
    pub amount: Option<i64>,
    /// The card token (`tok_ok` charges, `tok_declined` is declined).
    #[schema(value_type = String, required = true, min_length = 1, max_length = 256)]
    pub payment_token: Option<String>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ChargeBody {
    pub id: Uuid,
    pub amount: i64,
    pub balance: i64,
    pub created_at: DateTime<Utc>,
}

/// `POST /members/me/balance/charges`: pays `amount` by card, then credits it. Replays by `Idempotency-Key`.
#[utoipa::path(post, path = "/api/v1/members/me/balance/charges", tag = "shop", security(("bearer" = [])),
    params(crate::idempotency::IdempotencyParams), request_body = ChargeInput,
    responses((status = 201, description = "Charged; `balance` is the balance after it", body = ChargeBody),
        (status = 402, description = "`payment_declined`: nothing was charged", body = crate::error::ErrorBody),
        (status = 422, description = "`validation`: an amount that is not positive, or no token", body = crate::error::ErrorBody),
        (status = 503, description = "`payment_unavailable`: nothing was charged, retry", body = crate::error::ErrorBody)))]
pub async fn charge(
    State(state): State<AppState>,
    member: AuthMember,
    IdempotencyKey(key): IdempotencyKey,
    ApiJson(input): ApiJson<ChargeInput>,
) -> Result<Response, ApiError> {
    let mut fields = Fields::default();
    let amount = fields.take(
        "amount",
        match input.amount {
            None => Err("required"),
            Some(amount) if (1..=CHARGE_MAX).contains(&amount) => Ok(amount),
            Some(_) => Err("must be between 1 and 100000000000"),
        },
    );
    let token = fields.take("payment_token", check_token(input.payment_token.as_deref()));
    let (amount, token) = fields.into_result(amount.zip(token))?;
    // In a task of its own: a card charged is never left without its points or its refund.
    crate::guard::run_to_completion(async move {
        let state = &state;
        Ok(state
            .idempotency
            .run(member.id, "balance_charge", key, || async move {
                match charge_points(state, member.id, amount, token).await {
                    Ok(body) => (StatusCode::CREATED, Json(body)).into_response(),
                    Err(err) => err.into_response(),
                }
            })
            .await)
    })
    .await
}

/// Charges the card, then credits the balance in one transaction; if that transaction fails, the card charge is
/// refunded before answering, so a failure leaves neither a charge nor points behind.
async fn charge_points(
    state: &AppState,
    member: Uuid,
    amount: i64,
    token: String,
) -> Result<ChargeBody, ApiError> {
    let id = Uuid::now_v7();
    let gateway = state.engine.gateway();
    let request = ChargeRequest {
        reservation_id: id,
        member_id: member,
        amount,
        currency: POINTS_CURRENCY.to_owned(),
        payment_token: token,
    };
    match gateway.charge(&request).await {
        ChargeOutcome::Approved { .. } => {}
        ChargeOutcome::Declined => return Err(payment_declined()),
        ChargeOutcome::Unavailable => return Err(payment_unavailable()),
    }
    let credited = async {
        let mut client = state.db.get().await?;
        let tx = client.transaction().await?;
        let entry = move_balance(
            &tx,
            Movement {
                id,
                member,
                kind: EntryKind::Charge,
                amount,
                order_id: None,
                refund_id: None,
                subscription_charge_id: None,
            },
        )
        .await?
        .ok_or_else(|| ApiError::internal(anyhow::anyhow!("a credit found no balance row")))?;
        tx.commit().await?;
        Ok::<_, ApiError>(entry)
    }
    .await;
    match credited {
        Ok(entry) => Ok(ChargeBody {
            id: entry.id,
            amount: entry.amount,
            balance: entry.balance,
            created_at: entry.created_at,
        }),
        Err(err) => {
            // A commit whose answer was lost may still have committed: then the points stand, and so does the charge.
            if let Some(entry) = stored_entry(state, id).await {
                return Ok(ChargeBody {
                    id: entry.id,
                    amount: entry.amount,
                    balance: entry.balance,
                    created_at: entry.created_at,
                });
            }
            tracing::warn!(code = err.code(), charge = %id, "points not credited; refunding the card charge");
            gateway.refund(id).await;
            Err(err)
        }
    }
}

/// The ledger entry `id`, if it is stored. A failed look counts as not stored.
async fn stored_entry(state: &AppState, id: Uuid) -> Option<Entry> {
    let client = state.db.get().await.ok()?;
    let row = client
        .query_opt(
            &format!("SELECT {ENTRY_COLUMNS} FROM balance_entries WHERE id = $1"),
            &[&id],
        )
        .await
        .ok()??;
    Entry::from_row(&row).ok()
}

/// `GET /members/me/balance/history`: the ledger, newest first.
#[utoipa::path(get, path = "/api/v1/members/me/balance/history", tag = "shop", security(("bearer" = [])),
    params(crate::pagination::PageParams),
    responses((status = 200, description = "A page of ledger entries, newest first", body = Page<Entry>)))]
pub async fn history(
    State(state): State<AppState>,
    member: AuthMember,
    ApiQuery(page): ApiQuery<PageQuery>,
) -> Result<Json<Page<Entry>>, ApiError> {
    let limit = page.limit()?;
    let after: Option<Uuid> = page.after()?;
    let client = state.db.get().await?;
    let rows = client
        .query(
            &format!(
                "SELECT {ENTRY_COLUMNS} FROM balance_entries
                 WHERE member_id = $1 AND ($2::uuid IS NULL OR id < $2)
                 ORDER BY id DESC LIMIT $3"
            ),
            &[&member.id, &after, &(limit + 1)],
        )
        .await?;
    let entries = rows
        .iter()
        .map(Entry::from_row)
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Json(Page::from_rows(entries, limit, |entry| entry.id)))
}
