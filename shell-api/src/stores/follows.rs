//! Following stores (API.md, "Stores"): `PUT|DELETE /api/v1/stores/{id}/follow` (idempotent, 204) and
//! `GET /api/v1/members/me/stores`. A follow is also the subscription to the store's drops: the notifier reads
//! `store_follows` beside the product's hearts (`live/notifications.rs`).
//!
//! `stores.follower_count` is kept exact as `products.heart_count` is: the store row is locked first (`FOR NO KEY
//! UPDATE`, which also answers 404), the follow row is inserted with `ON CONFLICT DO NOTHING RETURNING` or deleted
//! with `DELETE ... RETURNING`, and only when a row really came or went does the same transaction move the count by
//! one. Follows of one store serialise on its row, so parallel follows and unfollows leave the count equal to the
//! number of follow rows.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::{store_not_found, StoreBody, StoreStatus, STORE_COLUMNS};
use crate::auth::AuthMember;
use crate::error::ApiError;
use crate::extract::{ApiPath, ApiQuery};
use crate::pagination::{Page, PageQuery};
use crate::AppState;

/// Follows a store; following it again changes nothing.
#[utoipa::path(put, path = "/api/v1/stores/{id}/follow", tag = "stores", security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "The store")),
    responses((status = 204, description = "Following"),
        (status = 404, description = "`store_not_found` (also a suspended store, unless mine)", body = crate::error::ErrorBody)))]
pub async fn follow(
    State(state): State<AppState>,
    member: AuthMember,
    ApiPath(store): ApiPath<Uuid>,
) -> Result<StatusCode, ApiError> {
    let mut client = state.db.get().await?;
    set_follow(&mut client, &member, store, true).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Stops following a store; not following it changes nothing.
#[utoipa::path(delete, path = "/api/v1/stores/{id}/follow", tag = "stores", security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "The store")),
    responses((status = 204, description = "Not following"),
        (status = 404, description = "`store_not_found`", body = crate::error::ErrorBody)))]
pub async fn unfollow(
    State(state): State<AppState>,
    member: AuthMember,
    ApiPath(store): ApiPath<Uuid>,
) -> Result<StatusCode, ApiError> {
    let mut client = state.db.get().await?;
    set_follow(&mut client, &member, store, false).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Makes `member`'s follow of `store` present or absent. Returns whether anything changed. A suspended store can
/// be unfollowed by anyone but followed only by whoever may see it.
pub async fn set_follow(
    client: &mut deadpool_postgres::Client,
    member: &AuthMember,
    store: Uuid,
    following: bool,
) -> Result<bool, ApiError> {
    let tx = client.transaction().await?;
    let lock = tx
        .prepare_cached("SELECT status, seller_id FROM stores WHERE id = $1 FOR NO KEY UPDATE")
        .await?;
    let row = tx
        .query_opt(&lock, &[&store])
        .await?
        .ok_or_else(store_not_found)?;
    let (status, seller): (&str, Uuid) = (row.get(0), row.get(1));
    let may_see =
        status == StoreStatus::Active.as_str() || member.id == seller || member.is_admin();
    if following && !may_see {
        return Err(store_not_found());
    }
    let toggle = tx
        .prepare_cached(if following {
            "INSERT INTO store_follows (store_id, member_id) VALUES ($1, $2)
             ON CONFLICT DO NOTHING RETURNING store_id"
        } else {
            "DELETE FROM store_follows WHERE store_id = $1 AND member_id = $2 RETURNING store_id"
        })
        .await?;
    let changed = tx
        .query_opt(&toggle, &[&store, &member.id])
        .await?
        .is_some();
    if changed {
        let delta: i32 = if following { 1 } else { -1 };
        let count = tx
            .prepare_cached("UPDATE stores SET follower_count = follower_count + $2 WHERE id = $1")
            .await?;
        // The store is locked above, so exactly one row moves.
        let moved = tx.execute(&count, &[&store, &delta]).await?;
        debug_assert_eq!(moved, 1);
    }
    tx.commit().await?;
    Ok(changed)
}

/// `GET /members/me/stores`: the active stores I follow, most recently followed first.
#[utoipa::path(get, path = "/api/v1/members/me/stores", tag = "stores", security(("bearer" = [])),
    params(crate::pagination::PageParams),
    responses((status = 200, description = "A page of the active stores I follow, newest follow first",
        body = Page<StoreBody>)))]
pub async fn my_stores(
    State(state): State<AppState>,
    member: AuthMember,
    ApiQuery(page): ApiQuery<PageQuery>,
) -> Result<Json<Page<StoreBody>>, ApiError> {
    let limit = page.limit()?;
    let after: Option<(DateTime<Utc>, Uuid)> = page.after()?;
    let (after_at, after_id) = after.unzip();
    let client = state.db.get().await?;
    let rows = client
        .query(
            &format!(
                "SELECT {STORE_COLUMNS}, followed_at FROM (
                     SELECT s.*, f.created_at AS followed_at
                     FROM store_follows f JOIN stores s ON s.id = f.store_id
                     WHERE f.member_id = $1 AND s.status = 'active'
                       AND ($2::timestamptz IS NULL OR (f.created_at, f.store_id) < ($2, $3::uuid))
                     ORDER BY f.created_at DESC, f.store_id DESC
                     LIMIT $4
                 ) followed ORDER BY followed_at DESC, id DESC"
            ),
            &[&member.id, &after_at, &after_id, &(limit + 1)],
        )
        .await?;
    let mut keyed = Vec::with_capacity(rows.len());
    for row in &rows {
        let followed_at: DateTime<Utc> = row.get("followed_at");
        keyed.push((followed_at, StoreBody::from_row(row)?));
    }
    let page = Page::from_rows(keyed, limit, |(at, store)| (*at, store.id));
    Ok(Json(Page {
        items: page.items.into_iter().map(|(_, store)| store).collect(),
        next_cursor: page.next_cursor,
    }))
}
