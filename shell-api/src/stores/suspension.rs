//! An admin's suspension and restoration of a store: `PUT /api/v1/admin/stores/{id}/status {status}`.
//!
//! The status is the one fact every consequence reads, where it is read: a suspended store leaves the store search
//! and the followed list (here), its products leave the product list (`catalog::products::IN_SUSPENDED_STORE`), its
//! shelf products cannot be ordered or put in a cart and its products get no new drop (409 `store_suspended`, read
//! with the product by `shop` and `drops`). Drops already scheduled or open are not touched, and restoring the store
//! brings everything back, since nothing was deleted.

use axum::extract::State;
use axum::Json;
use serde::Deserialize;
use uuid::Uuid;

use super::{store_not_found, StoreBody, StoreStatus, STORE_COLUMNS};
use crate::auth::{AuthMember, Role};
use crate::error::ApiError;
use crate::extract::{ApiJson, ApiPath};
use crate::AppState;

#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct StatusInput {
    #[schema(value_type = StoreStatus, required = true)]
    pub status: Option<String>,
}

/// Suspends or restores a store (admin).
#[utoipa::path(put, path = "/api/v1/admin/stores/{id}/status", tag = "stores", security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "The store")), request_body = StatusInput,
    responses((status = 200, description = "The store with its new status", body = StoreBody),
        (status = 403, description = "`forbidden`: not an admin", body = crate::error::ErrorBody),
        (status = 404, description = "`store_not_found`", body = crate::error::ErrorBody),
        (status = 422, description = "`validation`: status is not active or suspended", body = crate::error::ErrorBody)))]
pub async fn set_status(
    State(state): State<AppState>,
    caller: AuthMember,
    ApiPath(id): ApiPath<Uuid>,
    ApiJson(input): ApiJson<StatusInput>,
) -> Result<Json<StoreBody>, ApiError> {
    caller.require(&[Role::Admin])?;
    let status = match input.status.as_deref() {
        None => return Err(ApiError::invalid("status", "required")),
        Some(text) => StoreStatus::parse(text)
            .ok_or_else(|| ApiError::invalid("status", "must be active or suspended"))?,
    };
    let client = state.db.get().await?;
    let row = client
        .query_opt(
            &format!(
                "UPDATE stores SET status = $2, updated_at = now() WHERE id = $1 RETURNING {STORE_COLUMNS}"
            ),
            &[&id, &status.as_str()],
        )
        .await?
        .ok_or_else(store_not_found)?;
    StoreBody::from_row(&row).map(Json)
}
