//! Restock alerts on shelf products (API.md, "Stores": "tell me when it is back"): `PUT|DELETE
//! /api/v1/products/{id}/restock-alert`, and `restocked`, which whoever takes a product's shelf stock from 0 to more
//! calls in that transaction (a seller's patch here, an accepted refund in `shop/refunds.rs`).
//!
//! **Once per request.** A request is a row of `restock_alerts`. `restocked` deletes the product's requests with
//! `DELETE ... RETURNING` and writes one `restock` notification per deleted row in the same transaction, so a request
//! is used exactly once: a second restock finds no row, a rollback keeps both. The callers hold the product's row
//! lock (`FOR UPDATE`) when they read the stock they compare with 0, so of two racing restocks only the first sees
//! the shelf empty. Asking takes the same row with `FOR SHARE` and checks the shelf is empty under it, so a request
//! never slips in after the restock that should have answered it. The notification carries the request's id in
//! `burst_id`, and migration 0016's unique index keeps it once per member and request.

use axum::extract::State;
use axum::http::StatusCode;
use deadpool_postgres::GenericClient;
use uuid::Uuid;

use crate::auth::AuthMember;
use crate::catalog::products::ProductKind;
use crate::error::ApiError;
use crate::extract::ApiPath;
use crate::notify::Kind;
use crate::AppState;

fn product_not_found() -> ApiError {
    ApiError::not_found("product_not_found").with_message("no such product")
}

/// Asks to be told when a sold-out shelf product is back; asking again changes nothing.
#[utoipa::path(put, path = "/api/v1/products/{id}/restock-alert", tag = "products", security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "The product")),
    responses((status = 204, description = "Asked: a `restock` notification comes when its shelf stock rises from 0"),
        (status = 404, description = "`product_not_found`", body = crate::error::ErrorBody),
        (status = 409, description = "`in_stock`: the shelf holds units now", body = crate::error::ErrorBody),
        (status = 422, description = "`validation`: not a regular product", body = crate::error::ErrorBody)))]
pub async fn ask(
    State(state): State<AppState>,
    member: AuthMember,
    ApiPath(product): ApiPath<Uuid>,
) -> Result<StatusCode, ApiError> {
    let mut client = state.db.get().await?;
    let tx = client.transaction().await?;
    let row = tx
        .query_opt(
            "SELECT kind, stock FROM products WHERE id = $1 AND deleted_at IS NULL FOR SHARE",
            &[&product],
        )
        .await?
        .ok_or_else(product_not_found)?;
    if ProductKind::parse(row.get(0)) != Some(ProductKind::Regular) {
        return Err(ApiError::invalid(
            "product_id",
            "not a regular product; preorder products sell in drops",
        ));
    }
    if row.get::<_, i64>(1) > 0 {
        return Err(ApiError::conflict(
            "in_stock",
            "the shelf holds units of this product now; order it",
        ));
    }
    tx.execute(
        "INSERT INTO restock_alerts (id, product_id, member_id) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
        &[&Uuid::now_v7(), &product, &member.id],
    )
    .await?;
    tx.commit().await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Withdraws my restock alert; one that is not there changes nothing.
#[utoipa::path(delete, path = "/api/v1/products/{id}/restock-alert", tag = "products", security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "The product")),
    responses((status = 204, description = "No alert pending"),
        (status = 404, description = "`product_not_found`", body = crate::error::ErrorBody)))]
pub async fn withdraw(
    State(state): State<AppState>,
    member: AuthMember,
    ApiPath(product): ApiPath<Uuid>,
) -> Result<StatusCode, ApiError> {
    let client = state.db.get().await?;
    let exists = client
        .query_opt(
            "SELECT 1 FROM products WHERE id = $1 AND deleted_at IS NULL",
            &[&product],
        )
        .await?;
    exists.ok_or_else(product_not_found)?;
    client
        .execute(
            "DELETE FROM restock_alerts WHERE product_id = $1 AND member_id = $2",
            &[&product, &member.id],
        )
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The shelf stock of `products` just rose from 0: uses up their restock requests, one `restock` notification
/// each, in the caller's transaction. The caller holds the products' row locks and has checked that each was at 0.
/// Returns how many notifications were written.
pub async fn restocked(tx: &impl GenericClient, products: &[Uuid]) -> Result<u64, ApiError> {
    let used = tx
        .query(
            "DELETE FROM restock_alerts WHERE product_id = ANY($1) RETURNING id, member_id, product_id",
            &[&products],
        )
        .await?;
    if used.is_empty() {
        return Ok(0);
    }
    let requests: Vec<Uuid> = used.iter().map(|row| row.get(0)).collect();
    let members: Vec<Uuid> = used.iter().map(|row| row.get(1)).collect();
    let restocked: Vec<Uuid> = used.iter().map(|row| row.get(2)).collect();
    let ids: Vec<Uuid> = used.iter().map(|_| Uuid::now_v7()).collect();
    // `notify::notify_members` writes one `about` for every member; here each row has its own product and request.
    let written = tx
        .execute(
            "INSERT INTO notifications (id, member_id, kind, product_id, burst_id)
             SELECT id, member_id, $5, product_id, request_id
             FROM UNNEST($1::uuid[], $2::uuid[], $3::uuid[], $4::uuid[]) AS t (id, member_id, product_id, request_id)
             ON CONFLICT DO NOTHING",
            &[&ids, &members, &restocked, &requests, &Kind::Restock.as_str()],
        )
        .await?;
    Ok(written)
}
