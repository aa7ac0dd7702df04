//! A seller's sales and dashboard. Sales are shelf order items, drop purchases and paid subscription periods of the
//! seller's products alike (drop purchases belong to the seller of their drop); all are read straight from the rows
//! the orders, the engine's writer and the renewals stored, so the figures are what was sold, not a counter kept
//! beside it.

use axum::extract::State;
use axum::Json;
use chrono::{DateTime, Duration, Utc};
use deadpool_postgres::GenericClient;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::{require_seller, POINTS_CURRENCY};
use crate::auth::AuthMember;
use crate::error::ApiError;
use crate::extract::ApiQuery;
use crate::pagination::{Page, PageQuery};
use crate::AppState;

/// A seller's sales in `[$2, $3)`: `(kind, source_id, product_id, quantity, amount, currency, paid_at)`. Both
/// branches are served by an index on the seller (`order_items_seller_idx`, `drops_seller_idx`).
macro_rules! sales_of_seller {
    () => {
        "SELECT 'order' AS kind, i.order_id AS source_id, i.product_id, i.quantity, i.subtotal AS amount,
                i.currency, i.paid_at
         FROM order_items i WHERE i.seller_id = $1 AND i.paid_at >= $2 AND i.paid_at < $3
         UNION ALL
         SELECT 'drop', p.id, p.product_id, p.quantity, p.amount, p.currency, p.paid_at
         FROM purchases p JOIN drops d ON d.id = p.drop_id
         WHERE d.seller_id = $1 AND p.paid_at >= $2 AND p.paid_at < $3
         UNION ALL
         SELECT 'subscription', c.id, c.product_id, 1, c.amount, c.currency, c.paid_at
         FROM subscription_charges c
         WHERE c.seller_id = $1 AND c.status = 'paid' AND c.paid_at >= $2 AND c.paid_at < $3"
    };
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Sale {
    pub kind: String,
    pub source_id: Uuid,
    pub product_id: Uuid,
    pub quantity: i32,
    pub amount: i64,
    pub currency: String,
    pub paid_at: DateTime<Utc>,
}

#[derive(Debug, Deserialize)]
pub struct SalesQuery {
    pub from: Option<DateTime<Utc>>,
    pub to: Option<DateTime<Utc>>,
    #[serde(flatten)]
    pub page: PageQuery,
}

/// Beyond any sale: the default upper bound of `to`.
fn far_future() -> DateTime<Utc> {
    DateTime::from_timestamp(253_402_300_799, 0).unwrap_or(DateTime::<Utc>::MAX_UTC)
}

/// `GET /sellers/me/sales?from=&to=`: newest first; `from` inclusive, `to` exclusive, both optional.
#[utoipa::path(get, path = "/api/v1/sellers/me/sales", tag = "shop", security(("bearer" = [])),
    params(("from" = Option<chrono::DateTime<chrono::Utc>>, Query, description = "From (inclusive), RFC 3339"),
        ("to" = Option<chrono::DateTime<chrono::Utc>>, Query, description = "To (exclusive), RFC 3339"),
        crate::pagination::PageParams),
    responses((status = 200, description = "A page of sales, newest first: shelf orders and drop purchases", body = Page<Sale>),
        (status = 403, description = "`forbidden`: not a seller or admin", body = crate::error::ErrorBody)))]
pub async fn list_sales(
    State(state): State<AppState>,
    member: AuthMember,
    ApiQuery(query): ApiQuery<SalesQuery>,
) -> Result<Json<Page<Sale>>, ApiError> {
    require_seller(&member)?;
    let from = query.from.unwrap_or(DateTime::UNIX_EPOCH);
    let to = query.to.unwrap_or_else(far_future);
    if from >= to {
        return Err(ApiError::invalid("to", "must be after from"));
    }
    let limit = query.page.limit()?;
    let after: Option<(DateTime<Utc>, Uuid, Uuid)> = query.page.after()?;
    let (at, source, product) = after.unwrap_or((to, Uuid::max(), Uuid::max()));
    let client = state.db.get().await?;
    let rows = client
        .query(
            concat!(
                "SELECT kind, source_id, product_id, quantity, amount, currency, paid_at FROM (",
                sales_of_seller!(),
                ") s WHERE (paid_at, source_id, product_id) < ($4, $5, $6)
                 ORDER BY paid_at DESC, source_id DESC, product_id DESC LIMIT $7"
            ),
            &[&member.id, &from, &to, &at, &source, &product, &(limit + 1)],
        )
        .await?;
    let sales = rows
        .iter()
        .map(|row| Sale {
            kind: row.get(0),
            source_id: row.get(1),
            product_id: row.get(2),
            quantity: row.get(3),
            amount: row.get(4),
            currency: row.get(5),
            paid_at: row.get(6),
        })
        .collect();
    Ok(Json(Page::from_rows(sales, limit, |sale| {
        (sale.paid_at, sale.source_id, sale.product_id)
    })))
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Revenue {
    pub today: i64,
    pub last_7_days: i64,
    pub last_30_days: i64,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct TopProduct {
    pub product_id: Uuid,
    pub name: String,
    pub units: i64,
    pub revenue: i64,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct DropSummary {
    pub drop_id: Uuid,
    pub stock: i32,
    pub sold: i64,
    /// `sold / stock`, from 0.0 to 1.0.
    pub sell_through: f64,
    /// The drop report's page (`/live/drops/{id}/report`); its JSON is `/api/v1/drops/{id}/report`.
    pub report_url: String,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Dashboard {
    /// Gross sales (before refunds and fees) in `currency`; today is the UTC day.
    pub revenue: Revenue,
    pub currency: &'static str,
    /// Shelf orders, drop purchases and subscription periods paid today.
    pub orders_today: i64,
    pub refunds_pending: i64,
    /// The best sellers of the last 30 days by units, at most 5.
    pub top_products: Vec<TopProduct>,
    /// The seller's latest drops, at most 10.
    pub drops: Vec<DropSummary>,
    pub subscriptions: SubscriptionFigures,
}

/// The seller's subscriptions on the dashboard.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct SubscriptionFigures {
    pub active: i64,
    pub past_due: i64,
    /// What the active subscriptions bring in a month, in `currency`.
    pub monthly_recurring_revenue: i64,
}

/// `GET /sellers/me/dashboard`. Money is in KRW, the shop's currency; sales in other currencies are left out
/// here (settlements keep one row per currency).
#[utoipa::path(get, path = "/api/v1/sellers/me/dashboard", tag = "shop", security(("bearer" = [])),
    responses((status = 200, description = "Revenue, orders, pending refunds, best sellers and drops", body = Dashboard),
        (status = 403, description = "`forbidden`: not a seller or admin", body = crate::error::ErrorBody)))]
pub async fn dashboard(
    State(state): State<AppState>,
    member: AuthMember,
) -> Result<Json<Dashboard>, ApiError> {
    require_seller(&member)?;
    let client = state.db.get().await?;
    Ok(Json(
        seller_dashboard(&client, member.id, Utc::now()).await?,
    ))
}

/// A seller's dashboard as of `now`.
async fn seller_dashboard(
    client: &impl GenericClient,
    seller: Uuid,
    now: DateTime<Utc>,
) -> Result<Dashboard, ApiError> {
    let today = now
        .date_naive()
        .and_hms_opt(0, 0, 0)
        .map_or(now, |midnight| midnight.and_utc());
    let week = now - Duration::days(7);
    let month = now - Duration::days(30);
    let end = now + Duration::days(1);
    let totals = client
        .query_one(
            concat!(
                "SELECT COALESCE(sum(amount) FILTER (WHERE paid_at >= $5), 0)::int8,
                        COALESCE(sum(amount) FILTER (WHERE paid_at >= $6), 0)::int8,
                        COALESCE(sum(amount), 0)::int8,
                        count(DISTINCT kind || source_id::text) FILTER (WHERE paid_at >= $5)
                 FROM (",
                sales_of_seller!(),
                ") s WHERE currency = $4"
            ),
            &[&seller, &month, &end, &POINTS_CURRENCY, &today, &week],
        )
        .await?;
    let pending: i64 = client
        .query_one(
            "SELECT count(*) FROM refunds WHERE seller_id = $1 AND status = 'requested'",
            &[&seller],
        )
        .await?
        .get(0);
    Ok(Dashboard {
        revenue: Revenue {
            today: totals.get(0),
            last_7_days: totals.get(1),
            last_30_days: totals.get(2),
        },
        currency: POINTS_CURRENCY,
        orders_today: totals.get(3),
        refunds_pending: pending,
        top_products: top_products(client, seller, month, end).await?,
        drops: latest_drops(client, seller).await?,
        subscriptions: subscription_figures(client, seller).await?,
    })
}

/// The seller's subscriptions now: how many are active and past due, and the monthly recurring revenue of the
/// active ones (a weekly price counts 52/12 times a month, rounded down), in the points currency.
async fn subscription_figures(
    client: &impl GenericClient,
    seller: Uuid,
) -> Result<SubscriptionFigures, ApiError> {
    let row = client
        .query_one(
            "SELECT count(*) FILTER (WHERE status = 'active'),
                    count(*) FILTER (WHERE status = 'past_due'),
                    COALESCE(sum(CASE billing_interval WHEN 'month' THEN price ELSE price * 52 / 12 END)
                             FILTER (WHERE status = 'active' AND currency = $2), 0)::int8
             FROM subscriptions WHERE seller_id = $1 AND status IN ('active', 'past_due')",
            &[&seller, &POINTS_CURRENCY],
        )
        .await?;
    Ok(SubscriptionFigures {
        active: row.get(0),
        past_due: row.get(1),
        monthly_recurring_revenue: row.get(2),
    })
}

/// The seller's best sellers between `from` and `to`, by units, at most 5.
async fn top_products(
    client: &impl GenericClient,
    seller: Uuid,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> Result<Vec<TopProduct>, ApiError> {
    let rows = client
        .query(
            concat!(
                "SELECT s.product_id, p.name, sum(s.quantity)::int8 AS units, sum(s.amount)::int8 AS revenue
                 FROM (",
                sales_of_seller!(),
                ") s JOIN products p ON p.id = s.product_id
                 WHERE s.currency = $4
                 GROUP BY s.product_id, p.name
                 ORDER BY units DESC, revenue DESC, s.product_id LIMIT 5"
            ),
            &[&seller, &from, &to, &POINTS_CURRENCY],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|row| TopProduct {
            product_id: row.get(0),
            name: row.get(1),
            units: row.get(2),
            revenue: row.get(3),
        })
        .collect())
}

/// The seller's latest drops, at most 10, with their sell-through.
async fn latest_drops(
    client: &impl GenericClient,
    seller: Uuid,
) -> Result<Vec<DropSummary>, ApiError> {
    let rows = client
        .query(
            "SELECT d.id, d.stock,
                    (SELECT COALESCE(sum(p.quantity), 0)::int8 FROM purchases p WHERE p.drop_id = d.id)
             FROM drops d WHERE d.seller_id = $1
             ORDER BY d.opens_at DESC, d.id DESC LIMIT 10",
            &[&seller],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|row| {
            let stock: i32 = row.get(1);
            let sold: i64 = row.get(2);
            let drop_id: Uuid = row.get(0);
            DropSummary {
                drop_id,
                report_url: format!("/live/drops/{drop_id}/report"),
                stock,
                sold,
                sell_through: if stock > 0 {
                    sold as f64 / f64::from(stock)
                } else {
                    0.0
                },
            }
        })
        .collect())
}
