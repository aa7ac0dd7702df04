//! The seller's side: who subscribes to the seller's products (the dashboard's figures and the sales are in
//! `shop/sales.rs`, read from the same tables).

use axum::extract::State;
use axum::Json;
use serde::Deserialize;
use uuid::Uuid;

use super::model::{Subscription, COLUMNS};
use crate::auth::AuthMember;
use crate::error::ApiError;
use crate::extract::ApiQuery;
use crate::pagination::{Page, PageQuery};
use crate::AppState;

#[derive(Debug, Deserialize)]
pub struct SubscribersQuery {
    pub product_id: Option<Uuid>,
    #[serde(flatten)]
    pub page: PageQuery,
}

/// The subscriptions of my products (of one with `product_id`), newest first, whatever their status.
#[utoipa::path(get, path = "/api/v1/sellers/me/subscriptions", tag = "subscriptions", security(("bearer" = [])),
    params(("product_id" = Option<Uuid>, Query, description = "Only this product's subscribers"),
        crate::pagination::PageParams),
    responses((status = 200, description = "A page of subscriptions, newest first", body = Page<Subscription>),
        (status = 403, description = "`forbidden`: not a seller or admin", body = crate::error::ErrorBody)))]
pub async fn subscribers(
    State(state): State<AppState>,
    member: AuthMember,
    ApiQuery(query): ApiQuery<SubscribersQuery>,
) -> Result<Json<Page<Subscription>>, ApiError> {
    crate::shop::require_seller(&member)?;
    let limit = query.page.limit()?;
    let after: Option<Uuid> = query.page.after()?;
    let client = state.db.get().await?;
    let rows = client
        .query(
            &format!(
                "SELECT {COLUMNS} FROM subscriptions
                 WHERE seller_id = $1 AND ($2::uuid IS NULL OR product_id = $2) AND ($3::uuid IS NULL OR id < $3)
                 ORDER BY id DESC LIMIT $4"
            ),
            &[&member.id, &query.product_id, &after, &(limit + 1)],
        )
        .await?;
    let items = rows.iter().map(Subscription::from_row).collect();
    Ok(Json(Page::from_rows(items, limit, |s: &Subscription| s.id)))
}
