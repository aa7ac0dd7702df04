//! Refunds, requested by the buyer and decided once by the seller.
//!
//! A request claims its units on the order's item rows (`refund_claimed`, locked in product id order, never past
//! what was ordered: 409 `refund_exceeds_order`), so two requests can never together pass the order. A decision is
//! one conditional UPDATE (`WHERE status = 'requested'`): of concurrent accepts and rejects exactly one finds the
//! refund requested, and the others see the decided row. Accepting then, in the same transaction, pays a card
//! refund through the gateway (the refund's id is its idempotency key, so a retry after a failed commit pays
//! once), puts the units back on the shelf (product rows in id order) and credits points to the balance (the
//! ledger's `refund` entry). Rejecting gives the claimed units back to the order, so they can be asked again.

use std::collections::BTreeMap;

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use chrono::{DateTime, Utc};
use deadpool_postgres::GenericClient;
use engine::payment::{RefundOutcome, RefundRequest};
use serde::{Deserialize, Serialize};
use tokio_postgres::Row;
use uuid::Uuid;

use super::balance::{move_balance, EntryKind, Movement};
use super::orders::order_not_found;
use super::{check_items, require_seller, ItemInput};
use crate::auth::AuthMember;
use crate::error::{ApiError, Fields};
use crate::extract::{ApiJson, ApiPath, ApiQuery};
use crate::pagination::{Page, PageQuery};
use crate::AppState;

/// Longest reason, in characters.
pub const REASON_CHARS_MAX: usize = 1000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum RefundStatus {
    Requested,
    Accepted,
    Rejected,
}

impl RefundStatus {
    fn as_str(self) -> &'static str {
        match self {
            RefundStatus::Requested => "requested",
            RefundStatus::Accepted => "accepted",
            RefundStatus::Rejected => "rejected",
        }
    }

    fn parse(text: &str) -> Option<Self> {
        match text {
            "requested" => Some(RefundStatus::Requested),
            "accepted" => Some(RefundStatus::Accepted),
            "rejected" => Some(RefundStatus::Rejected),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct RefundItem {
    pub product_id: Uuid,
    pub quantity: i32,
    pub unit_price: i64,
    pub amount: i64,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Refund {
    pub id: Uuid,
    pub order_id: Uuid,
    pub seller_id: Uuid,
    pub member_id: Uuid,
    pub items: Vec<RefundItem>,
    pub amount: i64,
    pub currency: String,
    pub status: RefundStatus,
    pub reason: String,
    pub decision_reason: Option<String>,
    pub created_at: DateTime<Utc>,
    pub decided_at: Option<DateTime<Utc>>,
}

const REFUND_COLUMNS: &str =
    "id, order_id, seller_id, member_id, amount, currency, status, reason, \
                              decision_reason, created_at, decided_at";

/// Refunds of `rows` (selected with `REFUND_COLUMNS`) with their items, in the order of `rows`.
async fn refunds_from_rows(
    client: &impl GenericClient,
    rows: &[Row],
) -> Result<Vec<Refund>, ApiError> {
    let ids: Vec<Uuid> = rows.iter().map(|row| row.get(0)).collect();
    let item_rows = client
        .query(
            "SELECT refund_id, product_id, quantity, unit_price, amount FROM refund_items
             WHERE refund_id = ANY($1) ORDER BY refund_id, product_id",
            &[&ids],
        )
        .await?;
    let mut items: BTreeMap<Uuid, Vec<RefundItem>> = BTreeMap::new();
    for row in &item_rows {
        items.entry(row.get(0)).or_default().push(RefundItem {
            product_id: row.get(1),
            quantity: row.get(2),
            unit_price: row.get(3),
            amount: row.get(4),
        });
    }
    rows.iter()
        .map(|row| {
            let id: Uuid = row.get(0);
            let status: &str = row.get(6);
            Ok(Refund {
                id,
                order_id: row.get(1),
                seller_id: row.get(2),
                member_id: row.get(3),
                items: items.remove(&id).unwrap_or_default(),
                amount: row.get(4),
                currency: row.get(5),
                status: RefundStatus::parse(status).ok_or_else(|| {
                    ApiError::internal(anyhow::anyhow!("unknown refund status {status:?}"))
                })?,
                reason: row.get(7),
                decision_reason: row.get(8),
                created_at: row.get(9),
                decided_at: row.get(10),
            })
        })
        .collect()
}

async fn find_refund(client: &impl GenericClient, id: Uuid) -> Result<Refund, ApiError> {
    let rows = client
        .query(
            &format!("SELECT {REFUND_COLUMNS} FROM refunds WHERE id = $1"),
            &[&id],
        )
        .await?;
    refunds_from_rows(client, &rows)
        .await?
        .pop()
        .ok_or_else(refund_not_found)
}

fn refund_not_found() -> ApiError {
    ApiError::not_found("refund_not_found").with_message("no such refund")
}

fn already_decided(status: RefundStatus) -> ApiError {
    ApiError::conflict(
        "already_decided",
        format!("the refund was already {}", status.as_str()),
    )
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct RefundInput {
    #[schema(value_type = Vec<ItemInput>, required = true, min_items = 1, max_items = 100)]
    pub items: Option<Vec<ItemInput>>,
    #[schema(value_type = String, required = true, min_length = 1, max_length = 1000)]
    pub reason: Option<String>,
}

/// `POST /orders/{id}/refunds` (the buyer).
#[utoipa::path(post, path = "/api/v1/orders/{id}/refunds", tag = "shop", security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "The order")), request_body = RefundInput,
    responses((status = 201, description = "The refund, `requested`", body = Refund),
        (status = 403, description = "`forbidden`: not the order's buyer", body = crate::error::ErrorBody),
        (status = 404, description = "`order_not_found`", body = crate::error::ErrorBody),
        (status = 409, description = "`refund_exceeds_order`: more than was ordered and not yet refunded", body = crate::error::ErrorBody),
        (status = 422, description = "`validation`: items not all of one seller, or not in the order", body = crate::error::ErrorBody)))]
pub async fn request_refund(
    State(state): State<AppState>,
    member: AuthMember,
    ApiPath(order_id): ApiPath<Uuid>,
    ApiJson(input): ApiJson<RefundInput>,
) -> Result<(StatusCode, Json<Refund>), ApiError> {
    let mut fields = Fields::default();
    crate::error::check_text(
        &mut fields,
        "reason",
        input.reason.as_deref(),
        true,
        REASON_CHARS_MAX,
    );
    let items = input
        .items
        .ok_or_else(|| ApiError::invalid("items", "required"))?;
    let mut lines = check_items(items)?;
    fields.finish()?;
    let reason = input.reason.unwrap_or_default().trim().to_owned();
    lines.sort_by_key(|(product, _)| *product);
    let refund = open_refund(&state, member.id, order_id, &lines, &reason).await?;
    Ok((StatusCode::CREATED, Json(refund)))
}

/// Opens a refund of `lines` (sorted by product) of the buyer's order in one transaction: the order's items are
/// locked and claimed, then the refund and its items are stored.
async fn open_refund(
    state: &AppState,
    buyer: Uuid,
    order_id: Uuid,
    lines: &[(Uuid, i32)],
    reason: &str,
) -> Result<Refund, ApiError> {
    let mut client = state.db.get().await?;
    let tx = client.transaction().await?;
    let order = tx
        .query_opt(
            "SELECT member_id, currency, payment_method FROM orders WHERE id = $1",
            &[&order_id],
        )
        .await?
        .ok_or_else(order_not_found)?;
    let currency: String = order.get(1);
    if order.get::<_, Uuid>(0) != buyer {
        return Err(ApiError::forbidden());
    }
    let (seller, items) = claim_items(&tx, order_id, lines).await?;
    let id = Uuid::now_v7();
    let amount: i64 = items.iter().map(|item| item.amount).sum();
    tx.execute(
        "INSERT INTO refunds (id, order_id, seller_id, member_id, amount, currency, reason)
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
        &[&id, &order_id, &seller, &buyer, &amount, &currency, &reason],
    )
    .await?;
    let ids: Vec<Uuid> = items.iter().map(|item| item.product_id).collect();
    let quantities: Vec<i32> = items.iter().map(|item| item.quantity).collect();
    let prices: Vec<i64> = items.iter().map(|item| item.unit_price).collect();
    let amounts: Vec<i64> = items.iter().map(|item| item.amount).collect();
    tx.execute(
        "INSERT INTO refund_items (refund_id, product_id, quantity, unit_price, amount)
         SELECT $1, product_id, quantity, unit_price, amount
         FROM UNNEST($2::uuid[], $3::int[], $4::bigint[], $5::bigint[])
              AS t (product_id, quantity, unit_price, amount)",
        &[&id, &ids, &quantities, &prices, &amounts],
    )
    .await?;
    let refund = find_refund(&tx, id).await?;
    tx.commit().await?;
    Ok(refund)
}

/// Locks the order's items named by `lines` (in product order, the lock order), checks them (all in the order, of
/// one seller, within what was ordered and not yet claimed) and claims them; returns the seller and the refund's
/// items.
async fn claim_items(
    tx: &deadpool_postgres::Transaction<'_>,
    order_id: Uuid,
    lines: &[(Uuid, i32)],
) -> Result<(Uuid, Vec<RefundItem>), ApiError> {
    let ids: Vec<Uuid> = lines.iter().map(|(product, _)| *product).collect();
    let rows = tx
        .query(
            "SELECT product_id, seller_id, quantity, unit_price, refund_claimed FROM order_items
             WHERE order_id = $1 AND product_id = ANY($2)
             ORDER BY product_id FOR UPDATE",
            &[&order_id, &ids],
        )
        .await?;
    let ordered: BTreeMap<Uuid, &Row> = rows.iter().map(|row| (row.get(0), row)).collect();
    let mut fields = Fields::default();
    let mut sellers = std::collections::BTreeSet::new();
    let mut exceeded = false;
    let mut items = Vec::with_capacity(lines.len());
    for (index, (product, quantity)) in lines.iter().enumerate() {
        let Some(row) = ordered.get(product) else {
            fields.add(
                &format!("items[{index}].product_id"),
                "not an item of this order",
            );
            continue;
        };
        sellers.insert(row.get::<_, Uuid>(1));
        let (bought, claimed): (i32, i32) = (row.get(2), row.get(4));
        exceeded |= claimed + quantity > bought;
        let unit_price: i64 = row.get(3);
        items.push(RefundItem {
            product_id: *product,
            quantity: *quantity,
            unit_price,
            amount: unit_price * i64::from(*quantity),
        });
    }
    if sellers.len() > 1 {
        fields.add(
            "items",
            "items of more than one seller; request one refund per seller",
        );
    }
    fields.finish()?;
    if exceeded {
        return Err(ApiError::conflict(
            "refund_exceeds_order",
            "with the refunds already requested or accepted, this passes what was ordered",
        ));
    }
    let seller = sellers
        .into_iter()
        .next()
        .ok_or_else(|| ApiError::internal(anyhow::anyhow!("a checked refund has no seller")))?;
    let quantities: Vec<i32> = items.iter().map(|item| item.quantity).collect();
    tx.execute(
        "UPDATE order_items SET refund_claimed = refund_claimed + t.quantity
         FROM UNNEST($2::uuid[], $3::int[]) AS t (product_id, quantity)
         WHERE order_items.order_id = $1 AND order_items.product_id = t.product_id",
        &[&order_id, &ids, &quantities],
    )
    .await?;
    Ok((seller, items))
}

/// The buyer, that seller, or an admin.
/// One refund (its buyer, its seller, admin).
#[utoipa::path(get, path = "/api/v1/refunds/{id}", tag = "shop", security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "The refund")),
    responses((status = 200, description = "The refund", body = Refund),
        (status = 403, description = "`forbidden`: neither its buyer nor its seller", body = crate::error::ErrorBody),
        (status = 404, description = "`refund_not_found`", body = crate::error::ErrorBody)))]
pub async fn get_refund(
    State(state): State<AppState>,
    member: AuthMember,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<Json<Refund>, ApiError> {
    let client = state.db.get().await?;
    let refund = find_refund(&client, id).await?;
    if refund.member_id != member.id && refund.seller_id != member.id && !member.is_admin() {
        return Err(ApiError::forbidden());
    }
    Ok(Json(refund))
}

/// The refund, after checking that `member` may decide it (its seller, or an admin).
async fn decidable(
    client: &impl GenericClient,
    member: &AuthMember,
    id: Uuid,
) -> Result<Refund, ApiError> {
    let refund = find_refund(client, id).await?;
    member.require_owner_or_admin(refund.seller_id)?;
    Ok(refund)
}

/// `POST /refunds/{id}/accept`: exactly once; accepting again answers the same refund and moves nothing.
/// Accepts a refund (its seller, admin): units back on the shelf, money back where it came from, exactly once.
#[utoipa::path(post, path = "/api/v1/refunds/{id}/accept", tag = "shop", security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "The refund")),
    responses((status = 200, description = "The refund, `accepted` (again the same for a repeat)", body = Refund),
        (status = 403, description = "`forbidden`: not its seller", body = crate::error::ErrorBody),
        (status = 404, description = "`refund_not_found`", body = crate::error::ErrorBody),
        (status = 409, description = "`already_decided`: it was rejected", body = crate::error::ErrorBody),
        (status = 503, description = "`payment_unavailable`: the card refund did not go through; nothing moved", body = crate::error::ErrorBody)))]
pub async fn accept_refund(
    State(state): State<AppState>,
    member: AuthMember,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<Json<Refund>, ApiError> {
    // In a task of its own: a card refunded is never left with its refund undecided.
    crate::guard::run_to_completion(async move { accept(&state, &member, id).await.map(Json) })
        .await
}

#[allow(
    clippy::too_many_lines,
    reason = "one acceptance's transaction in its lock order (refund, products, order items, balance), kept in one place"
)]
async fn accept(state: &AppState, member: &AuthMember, id: Uuid) -> Result<Refund, ApiError> {
    let mut client = state.db.get().await?;
    decidable(&client, member, id).await?;
    let tx = client.transaction().await?;
    let decided = tx
        .query_opt(
            "UPDATE refunds SET status = 'accepted', decided_at = now()
             WHERE id = $1 AND status = 'requested'
             RETURNING order_id, member_id, amount",
            &[&id],
        )
        .await?;
    let Some(decided) = decided else {
        // Someone decided first (the UPDATE waited for their commit): accepted is this answer, rejected is not.
        drop(tx);
        let refund = find_refund(&client, id).await?;
        return match refund.status {
            RefundStatus::Accepted => Ok(refund),
            status => Err(already_decided(status)),
        };
    };
    let order_id: Uuid = decided.get(0);
    let buyer: Uuid = decided.get(1);
    let amount: i64 = decided.get(2);
    let method: String = tx
        .query_one(
            "SELECT payment_method FROM orders WHERE id = $1",
            &[&order_id],
        )
        .await?
        .get(0);

    // The card first: if the gateway cannot refund now, nothing else moves and the refund stays requested.
    if method == "card" && amount > 0 {
        let request = RefundRequest {
            charge_key: order_id,
            refund_id: id,
            amount,
        };
        if state.engine.gateway().refund_amount(&request).await == RefundOutcome::Unavailable {
            return Err(
                ApiError::unavailable("payment_unavailable", 1).with_message(
                    "the payment gateway cannot refund now; the refund is still requested, retry",
                ),
            );
        }
    }
    let items = tx
        .query(
            "SELECT product_id, quantity FROM refund_items WHERE refund_id = $1 ORDER BY product_id",
            &[&id],
        )
        .await?;
    let products: Vec<Uuid> = items.iter().map(|row| row.get(0)).collect();
    let quantities: Vec<i64> = items
        .iter()
        .map(|row| i64::from(row.get::<_, i32>(1)))
        .collect();
    // Lock the product rows in id order (as orders do) before putting the units back; a shelf found empty under
    // its lock is restocked by this refund, and its restock alerts are used up below.
    let emptied: Vec<Uuid> = tx
        .query(
            "SELECT id, stock FROM products WHERE id = ANY($1) ORDER BY id FOR UPDATE",
            &[&products],
        )
        .await?
        .iter()
        .filter(|row| row.get::<_, i64>(1) == 0)
        .map(|row| row.get(0))
        .collect();
    tx.execute(
        "UPDATE products SET stock = products.stock + t.quantity, updated_at = now()
         FROM UNNEST($1::uuid[], $2::bigint[]) AS t (id, quantity)
         WHERE products.id = t.id",
        &[&products, &quantities],
    )
    .await?;
    // Refund items have positive quantities, so every emptied shelf is above 0 now.
    crate::catalog::restock::restocked(&tx, &emptied).await?;
    if method == "points" && amount > 0 {
        move_balance(
            &tx,
            Movement {
                id: Uuid::now_v7(),
                member: buyer,
                kind: EntryKind::Refund,
                amount,
                order_id: Some(order_id),
                refund_id: Some(id),
                subscription_charge_id: None,
            },
        )
        .await?
        .ok_or_else(|| ApiError::internal(anyhow::anyhow!("a credit found no balance row")))?;
    }
    // In the deciding transaction: the buyer's notification exists exactly when the decision does.
    crate::live::notifications::refund_decided(&tx, buyer, id).await?;
    let refund = find_refund(&tx, id).await?;
    tx.commit().await?;
    Ok(refund)
}

#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
pub struct RejectInput {
    #[schema(value_type = String, required = true, min_length = 1, max_length = 1000)]
    pub reason: Option<String>,
}

/// `POST /refunds/{id}/reject` `{reason}`: exactly once; the claimed units go back to the order.
#[utoipa::path(post, path = "/api/v1/refunds/{id}/reject", tag = "shop", security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "The refund")), request_body = RejectInput,
    responses((status = 200, description = "The refund, `rejected`", body = Refund),
        (status = 403, description = "`forbidden`: not its seller", body = crate::error::ErrorBody),
        (status = 404, description = "`refund_not_found`", body = crate::error::ErrorBody),
        (status = 409, description = "`already_decided`: it was accepted", body = crate::error::ErrorBody)))]
pub async fn reject_refund(
    State(state): State<AppState>,
    member: AuthMember,
    ApiPath(id): ApiPath<Uuid>,
    ApiJson(input): ApiJson<RejectInput>,
) -> Result<Json<Refund>, ApiError> {
    let mut fields = Fields::default();
    crate::error::check_text(
        &mut fields,
        "reason",
        input.reason.as_deref(),
        false,
        REASON_CHARS_MAX,
    );
    fields.finish()?;
    let reason = input.reason.map(|reason| reason.trim().to_owned());
    let mut client = state.db.get().await?;
    decidable(&client, &member, id).await?;
    let tx = client.transaction().await?;
    let decided = tx
        .query_opt(
            "UPDATE refunds SET status = 'rejected', decided_at = now(), decision_reason = $2
             WHERE id = $1 AND status = 'requested'
             RETURNING order_id, member_id",
            &[&id, &reason],
        )
        .await?;
    let Some(decided) = decided else {
        drop(tx);
        let refund = find_refund(&client, id).await?;
        return match refund.status {
            RefundStatus::Rejected => Ok(Json(refund)),
            status => Err(already_decided(status)),
        };
    };
    let order_id: Uuid = decided.get(0);
    // Lock the order's item rows in product id order (as requests do) before giving the units back.
    tx.query(
        "SELECT 1 FROM order_items
         WHERE order_id = $1 AND product_id IN (SELECT product_id FROM refund_items WHERE refund_id = $2)
         ORDER BY product_id FOR UPDATE",
        &[&order_id, &id],
    )
    .await?;
    tx.execute(
        "UPDATE order_items SET refund_claimed = order_items.refund_claimed - r.quantity
         FROM refund_items r
         WHERE r.refund_id = $2 AND order_items.order_id = $1 AND order_items.product_id = r.product_id",
        &[&order_id, &id],
    )
    .await?;
    let buyer: Uuid = decided.get(1);
    crate::live::notifications::refund_decided(&tx, buyer, id).await?;
    let refund = find_refund(&tx, id).await?;
    tx.commit().await?;
    Ok(Json(refund))
}

#[derive(Debug, Deserialize)]
pub struct SellerRefundsQuery {
    pub status: Option<String>,
    #[serde(flatten)]
    pub page: PageQuery,
}

/// `GET /sellers/me/refunds?status=`: refunds of my sales, newest first.
#[utoipa::path(get, path = "/api/v1/sellers/me/refunds", tag = "shop", security(("bearer" = [])),
    params(("status" = Option<RefundStatus>, Query, description = "Only refunds in this state"),
        crate::pagination::PageParams),
    responses((status = 200, description = "A page of refunds of my sales, newest first", body = Page<Refund>),
        (status = 403, description = "`forbidden`: not a seller or admin", body = crate::error::ErrorBody)))]
pub async fn seller_refunds(
    State(state): State<AppState>,
    member: AuthMember,
    ApiQuery(query): ApiQuery<SellerRefundsQuery>,
) -> Result<Json<Page<Refund>>, ApiError> {
    require_seller(&member)?;
    let status = query
        .status
        .as_deref()
        .map(|text| {
            RefundStatus::parse(text).ok_or_else(|| {
                ApiError::invalid("status", "must be requested, accepted or rejected")
            })
        })
        .transpose()?
        .map(RefundStatus::as_str);
    let limit = query.page.limit()?;
    let after: Option<Uuid> = query.page.after()?;
    let client = state.db.get().await?;
    let rows = client
        .query(
            &format!(
                "SELECT {REFUND_COLUMNS} FROM refunds
                 WHERE seller_id = $1 AND ($2::text IS NULL OR status = $2)
                   AND ($3::uuid IS NULL OR id < $3)
                 ORDER BY id DESC LIMIT $4"
            ),
            &[&member.id, &status, &after, &(limit + 1)],
        )
        .await?;
    let refunds = refunds_from_rows(&client, &rows).await?;
    Ok(Json(Page::from_rows(refunds, limit, |refund| refund.id)))
}
