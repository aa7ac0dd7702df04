//! Health: `/healthz` (the process answers) and `/readyz` (its databases answer).

use axum::Json;
use serde_json::json;

use crate::error::ApiError;
use crate::AppState;

/// Up: the process answers.
#[utoipa::path(get, path = "/healthz", tag = "operations",
    responses((status = 200, description = "`{\"status\": \"ok\"}`", body = serde_json::Value)))]
pub async fn healthz() -> Json<serde_json::Value> {
    Json(json!({ "status": "ok" }))
}

/// Ready when Postgres answers a query, and Redis a PING when it is configured.
#[utoipa::path(get, path = "/readyz", tag = "operations",
    responses((status = 200, description = "`{\"status\": \"ready\"}`", body = serde_json::Value),
        (status = 503, description = "`database_unavailable` or `redis_unavailable`", body = crate::error::ErrorBody)))]
pub async fn readyz(
    axum::extract::State(state): axum::extract::State<AppState>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let client = state.db.get().await?;
    client
        .query_one("SELECT 1", &[])
        .await
        .map_err(|_| ApiError::unavailable("database_unavailable", 1))?;
    if state.redis_answers(std::time::Duration::from_secs(1)).await == Some(false) {
        return Err(ApiError::unavailable("redis_unavailable", 1));
    }
    Ok(Json(json!({ "status": "ready" })))
}
