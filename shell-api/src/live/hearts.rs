//! Hearts, a member's wishlist (API.md, "Regular shop"): `PUT|DELETE /api/v1/products/{id}/heart` (idempotent,
//! 204) and `GET /api/v1/members/me/hearts`. A heart is also the subscription to the product's drops: the notifier
//! tells the members who hearted a product when a drop of it is scheduled, opens or restocks. They live here, beside
//! the notifications they feed, rather than in `products.rs`.
//!
//! `products.heart_count` is kept exact the way feeds keep `like_count`: the heart row is inserted with
//! `ON CONFLICT DO NOTHING RETURNING` or deleted with `DELETE ... RETURNING`, and only when a row really came or went
//! does the same transaction move the count by one. The product row is locked first (`FOR NO KEY UPDATE`), which
//! also answers 404 for a missing or deleted product, so hearts of one product serialise on that row and parallel
//! hearts and unhearts leave `heart_count` equal to the number of heart rows.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::auth::AuthMember;
use crate::catalog::products::{ProductBody, PRODUCT_COLUMNS};
use crate::error::ApiError;
use crate::extract::{ApiPath, ApiQuery};
use crate::pagination::{Page, PageQuery};
use crate::AppState;

fn product_not_found() -> ApiError {
    ApiError::not_found("product_not_found").with_message("no such product")
}

/// Hearts a product (a wishlist); hearting it again changes nothing.
#[utoipa::path(put, path = "/api/v1/products/{id}/heart", tag = "live", security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "The product")),
    responses((status = 204, description = "Hearted"),
        (status = 404, description = "`product_not_found`", body = crate::error::ErrorBody)))]
pub async fn heart(
    State(state): State<AppState>,
    member: AuthMember,
    ApiPath(product): ApiPath<Uuid>,
) -> Result<StatusCode, ApiError> {
    let mut client = state.db.get().await?;
    set_heart(&mut client, member.id, product, true).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Takes a heart back; one that is not there changes nothing.
#[utoipa::path(delete, path = "/api/v1/products/{id}/heart", tag = "live", security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "The product")),
    responses((status = 204, description = "Not hearted"),
        (status = 404, description = "`product_not_found`", body = crate::error::ErrorBody)))]
pub async fn unheart(
    State(state): State<AppState>,
    member: AuthMember,
    ApiPath(product): ApiPath<Uuid>,
) -> Result<StatusCode, ApiError> {
    let mut client = state.db.get().await?;
    set_heart(&mut client, member.id, product, false).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Makes `member`'s heart of `product` present or absent. Returns whether anything changed.
pub async fn set_heart(
    client: &mut deadpool_postgres::Client,
    member: Uuid,
    product: Uuid,
    hearted: bool,
) -> Result<bool, ApiError> {
    let tx = client.transaction().await?;
    let lock = tx
        .prepare_cached(
            "SELECT 1 FROM products WHERE id = $1 AND deleted_at IS NULL FOR NO KEY UPDATE",
        )
        .await?;
    tx.query_opt(&lock, &[&product])
        .await?
        .ok_or_else(product_not_found)?;
    let toggle = tx
        .prepare_cached(if hearted {
            "INSERT INTO product_hearts (product_id, member_id) VALUES ($1, $2)
             ON CONFLICT DO NOTHING RETURNING product_id"
        } else {
            "DELETE FROM product_hearts WHERE product_id = $1 AND member_id = $2 RETURNING product_id"
        })
        .await?;
    let changed = tx.query_opt(&toggle, &[&product, &member]).await?.is_some();
    if changed {
        let delta: i32 = if hearted { 1 } else { -1 };
        let count = tx
            .prepare_cached("UPDATE products SET heart_count = heart_count + $2 WHERE id = $1")
            .await?;
        // The product is locked above, so exactly one row moves.
        let moved = tx.execute(&count, &[&product, &delta]).await?;
        debug_assert_eq!(moved, 1);
    }
    tx.commit().await?;
    Ok(changed)
}

/// `GET /members/me/hearts`: the products I hearted (not deleted), most recently hearted first.
#[utoipa::path(get, path = "/api/v1/members/me/hearts", tag = "live", security(("bearer" = [])),
    params(crate::pagination::PageParams),
    responses((status = 200, description = "A page of the products I hearted, newest heart first",
        body = Page<ProductBody>)))]
pub async fn my_hearts(
    State(state): State<AppState>,
    member: AuthMember,
    ApiQuery(page): ApiQuery<PageQuery>,
) -> Result<Json<Page<ProductBody>>, ApiError> {
    let limit = page.limit()?;
    let after: Option<(DateTime<Utc>, Uuid)> = page.after()?;
    let (after_at, after_id) = after.unzip();
    let client = state.db.get().await?;
    let rows = client
        .query(
            &format!(
                "SELECT {PRODUCT_COLUMNS}, hearted_at FROM (
                     SELECT p.*, h.created_at AS hearted_at
                     FROM product_hearts h JOIN products p ON p.id = h.product_id
                     WHERE h.member_id = $1 AND p.deleted_at IS NULL
                       AND ($2::timestamptz IS NULL OR (h.created_at, h.product_id) < ($2, $3::uuid))
                     ORDER BY h.created_at DESC, h.product_id DESC
                     LIMIT $4
                 ) hearted ORDER BY hearted_at DESC, id DESC"
            ),
            &[&member.id, &after_at, &after_id, &(limit + 1)],
        )
        .await?;
    let mut keyed = Vec::with_capacity(rows.len());
    for row in &rows {
        let hearted_at: DateTime<Utc> = row.get("hearted_at");
        keyed.push((hearted_at, ProductBody::from_row(row)?));
    }
    let page = Page::from_rows(keyed, limit, |(at, product)| (*at, product.id));
    Ok(Json(Page {
        items: page.items.into_iter().map(|(_, product)| product).collect(),
        next_cursor: page.next_cursor,
    }))
}
