//! A drop purchase as its buyer, its seller and the back office read it: what was paid, and what became of it
//! since (refunded by an unfunded campaign's close, or shipped). The engine's writer stores the purchase; the
//! campaign area records refunds (`purchase_refunds`) and shipments (`shipments`) beside it, and every reader
//! goes through `PURCHASE_SELECT`, so one query says what a purchase's `status` is.

use chrono::{DateTime, Utc};
use deadpool_postgres::GenericClient;
use serde::Serialize;
use tokio_postgres::Row;
use uuid::Uuid;

use crate::error::ApiError;

/// A purchase and its fulfilment: `p` the purchase, `r` its refund once paid, `s` its shipment. Callers add the
/// WHERE, ORDER and LIMIT.
pub(crate) const PURCHASE_SELECT: &str =
    "SELECT p.id, p.reservation_id, p.drop_id, p.product_id, p.member_id,
        p.quantity, p.amount, p.currency, p.paid_at, r.refunded_at, s.shipped_at, s.tracking
    FROM purchases p
    LEFT JOIN purchase_refunds r ON r.purchase_id = p.id AND r.refunded_at IS NOT NULL
    LEFT JOIN shipments s ON s.purchase_id = p.id";

/// `status` as a SQL condition on `PURCHASE_SELECT`'s rows, for `?status=` filters.
pub(crate) fn status_condition(status: &str) -> Option<&'static str> {
    match status {
        "paid" => Some("r.refunded_at IS NULL AND s.shipped_at IS NULL"),
        "refunded" => Some("r.refunded_at IS NOT NULL"),
        "shipped" => Some("s.shipped_at IS NOT NULL"),
        _ => None,
    }
}

/// A purchase's state, as `status` names it (documentation only).
#[derive(utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
#[allow(dead_code)]
enum PurchaseStatusName {
    Paid,
    Refunded,
    Shipped,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
#[schema(as = Purchase)]
pub(crate) struct PurchaseJson {
    pub id: Uuid,
    pub reservation_id: Uuid,
    pub drop_id: Uuid,
    pub product_id: Uuid,
    /// The buyer.
    pub member_id: Uuid,
    pub quantity: i32,
    pub amount: i64,
    pub currency: String,
    pub paid_at: DateTime<Utc>,
    #[schema(value_type = PurchaseStatusName)]
    pub status: &'static str,
    /// When an unfunded campaign's close refunded it in full.
    pub refunded_at: Option<DateTime<Utc>>,
    pub shipped_at: Option<DateTime<Utc>>,
    pub tracking: Option<String>,
}

pub(crate) fn purchase_from_row(row: &Row) -> PurchaseJson {
    let refunded_at: Option<DateTime<Utc>> = row.get("refunded_at");
    let shipped_at: Option<DateTime<Utc>> = row.get("shipped_at");
    // A refunded purchase is never shipped (only a funded campaign ships, only an unfunded one refunds); a
    // refund, if both were ever there, is what the buyer must see.
    let status = match (refunded_at, shipped_at) {
        (Some(_), _) => "refunded",
        (None, Some(_)) => "shipped",
        (None, None) => "paid",
    };
    PurchaseJson {
        id: row.get("id"),
        reservation_id: row.get("reservation_id"),
        drop_id: row.get("drop_id"),
        product_id: row.get("product_id"),
        member_id: row.get("member_id"),
        quantity: row.get("quantity"),
        amount: row.get("amount"),
        currency: row.get("currency"),
        paid_at: row.get("paid_at"),
        status,
        refunded_at,
        shipped_at,
        tracking: row.get("tracking"),
    }
}

/// A member's purchases, newest first, after the `(paid_at, id)` of the last one served.
pub(crate) async fn purchases_of_member(
    client: &impl GenericClient,
    member: Uuid,
    after: Option<(DateTime<Utc>, Uuid)>,
    limit: i64,
) -> Result<Vec<PurchaseJson>, ApiError> {
    let (after_at, after_id) = after.unzip();
    let rows = client
        .query(
            &format!(
                "{PURCHASE_SELECT}
                 WHERE p.member_id = $1 AND ($2::timestamptz IS NULL OR (p.paid_at, p.id) < ($2, $3))
                 ORDER BY p.paid_at DESC, p.id DESC LIMIT $4"
            ),
            &[&member, &after_at, &after_id, &limit],
        )
        .await?;
    Ok(rows.iter().map(purchase_from_row).collect())
}

/// One purchase, or `None`.
pub(crate) async fn purchase(
    client: &impl GenericClient,
    id: Uuid,
) -> Result<Option<PurchaseJson>, ApiError> {
    let row = client
        .query_opt(&format!("{PURCHASE_SELECT} WHERE p.id = $1"), &[&id])
        .await?;
    Ok(row.as_ref().map(purchase_from_row))
}
