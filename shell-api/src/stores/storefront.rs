//! A store's life and its reads: create (names unique ignoring case, judged by the `stores_name_key` index, so
//! concurrent creates of one name give one 201 and 409s), read (a suspended store only for its seller and admins),
//! search, edit (its seller, admin), delete (its products stay, without a store: the foreign key's SET NULL), and a
//! store's products.
//!
//! Search has the quality of the product search: `name ILIKE '%q%' OR description ILIKE '%q%'` over active stores,
//! each column served by a trigram index (migration 0016), newest first by id (UUID v7), paged by keyset on the id.
//! `scripts/measure_store_search.sh` times it on 10,000 stores and 100,000 products.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use deadpool_postgres::GenericClient;
use serde::Deserialize;
use tokio_postgres::types::ToSql;
use uuid::Uuid;

use super::{store_not_found, StoreBody, STORE_COLUMNS};
use crate::auth::{AuthMember, MaybeMember, Role};
// A store's name and description follow the product's rules (1 to 200 characters, up to 5000), so they share checks.
use crate::catalog::products::{
    check_description, check_name, search_pattern, ProductBody, PRODUCT_COLUMNS,
};
use crate::error::{ApiError, Fields, OnConstraint};
use crate::extract::{nullable, ApiJson, ApiPath, ApiQuery};
use crate::pagination::{Page, PageQuery};
use crate::AppState;

/// A store to create; fields are optional in the wire type so that a missing one is reported by name.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
pub struct StoreInput {
    #[schema(value_type = String, required = true, min_length = 1, max_length = 200)]
    pub name: Option<String>,
    #[schema(max_length = 5000)]
    pub description: Option<String>,
}

/// Changes to a store; absent fields stay, `description: null` clears the description.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
pub struct StorePatch {
    #[schema(value_type = String, min_length = 1, max_length = 200)]
    pub name: Option<String>,
    #[serde(default, deserialize_with = "nullable")]
    #[schema(value_type = Option<String>, max_length = 5000)]
    pub description: Option<Option<String>>,
}

#[derive(Debug, Deserialize)]
pub struct SearchQuery {
    pub q: Option<String>,
    #[serde(flatten)]
    pub page: PageQuery,
}

/// The name and description, checked, or 422 naming each bad field.
fn validate(input: StoreInput) -> Result<(String, Option<String>), ApiError> {
    let mut fields = Fields::default();
    let name = fields.take("name", check_name(input.name.as_deref()));
    let description = fields.take("description", check_description(input.description));
    fields.into_result(name.zip(description))
}

fn name_taken() -> ApiError {
    ApiError::conflict(
        "store_name_taken",
        "a store of that name exists (names ignore case)",
    )
}

/// Opens a store owned by the caller (seller, admin).
#[utoipa::path(post, path = "/api/v1/stores", tag = "stores", security(("bearer" = [])),
    request_body = StoreInput,
    responses((status = 201, description = "The store", body = StoreBody),
        (status = 403, description = "`forbidden`: not a seller or admin", body = crate::error::ErrorBody),
        (status = 409, description = "`store_name_taken`: the name is taken, ignoring case", body = crate::error::ErrorBody),
        (status = 422, description = "`validation`", body = crate::error::ErrorBody)))]
pub async fn create(
    State(state): State<AppState>,
    caller: AuthMember,
    ApiJson(input): ApiJson<StoreInput>,
) -> Result<(StatusCode, Json<StoreBody>), ApiError> {
    caller.require(&[Role::Seller, Role::Admin])?;
    let (name, description) = validate(input)?;
    let client = state.db.get().await?;
    let row = client
        .query_one(
            &format!(
                "INSERT INTO stores (id, seller_id, name, description) VALUES ($1, $2, $3, $4)
                 RETURNING {STORE_COLUMNS}"
            ),
            &[&Uuid::now_v7(), &caller.id, &name, &description],
        )
        .await
        .on_constraint("stores_name_key", name_taken)?;
    Ok((StatusCode::CREATED, Json(StoreBody::from_row(&row)?)))
}

/// A store, if `caller` may see it (`StoreBody::visible_to`); otherwise, as for no store, `store_not_found`.
pub(crate) async fn visible_store(
    client: &impl GenericClient,
    id: Uuid,
    caller: Option<&AuthMember>,
) -> Result<StoreBody, ApiError> {
    let row = client
        .query_opt(
            &format!("SELECT {STORE_COLUMNS} FROM stores WHERE id = $1"),
            &[&id],
        )
        .await?
        .ok_or_else(store_not_found)?;
    let store = StoreBody::from_row(&row)?;
    if !store.visible_to(caller) {
        return Err(store_not_found());
    }
    Ok(store)
}

/// One store (a suspended one only for its seller and admins).
#[utoipa::path(get, path = "/api/v1/stores/{id}", tag = "stores", security((), ("bearer" = [])),
    params(("id" = Uuid, Path, description = "The store")),
    responses((status = 200, description = "The store", body = StoreBody),
        (status = 404, description = "`store_not_found` (also a suspended store, for others than its seller and admins)",
            body = crate::error::ErrorBody)))]
pub async fn get(
    State(state): State<AppState>,
    MaybeMember(caller): MaybeMember,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<Json<StoreBody>, ApiError> {
    let client = state.db.get().await?;
    visible_store(&client, id, caller.as_ref()).await.map(Json)
}

/// Active stores, newest first; with `q`, those whose name or description contains it (any case).
#[utoipa::path(get, path = "/api/v1/stores", tag = "stores",
    params(("q" = Option<String>, Query, max_length = 100,
            description = "Name or description contains (case-insensitive)"),
        crate::pagination::PageParams),
    responses((status = 200, description = "A page of active stores, newest first", body = Page<StoreBody>)))]
pub async fn search(
    State(state): State<AppState>,
    ApiQuery(query): ApiQuery<SearchQuery>,
) -> Result<Json<Page<StoreBody>>, ApiError> {
    let client = state.db.get().await?;
    search_stores(&client, &query).await.map(Json)
}

/// The search itself (also what `scripts/measure_store_search.sh` times through the endpoint). Only the filters
/// given become SQL, so each query is one the planner can serve from an index.
pub async fn search_stores(
    client: &impl GenericClient,
    query: &SearchQuery,
) -> Result<Page<StoreBody>, ApiError> {
    let limit = query.page.limit()?;
    let after = query.page.after::<Uuid>()?;
    let pattern =
        search_pattern(query.q.as_deref()).map_err(|reason| ApiError::invalid("q", reason))?;
    let fetch = limit + 1;
    let mut sql = format!("SELECT {STORE_COLUMNS} FROM stores WHERE status = 'active'");
    let mut params: Vec<&(dyn ToSql + Sync)> = Vec::new();
    if let Some(pattern) = &pattern {
        params.push(pattern);
        let at = params.len();
        sql.push_str(&format!(
            " AND (name ILIKE ${at} OR description ILIKE ${at})"
        ));
    }
    if let Some(after) = &after {
        params.push(after);
        sql.push_str(&format!(" AND id < ${}", params.len()));
    }
    params.push(&fetch);
    sql.push_str(&format!(" ORDER BY id DESC LIMIT ${}", params.len()));
    let rows = client.query(&sql, &params).await?;
    let stores = rows
        .iter()
        .map(StoreBody::from_row)
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Page::from_rows(stores, limit, |store| store.id))
}

/// Changes a store's name or description (its seller, admin).
#[utoipa::path(patch, path = "/api/v1/stores/{id}", tag = "stores", security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "The store")), request_body = StorePatch,
    responses((status = 200, description = "The store", body = StoreBody),
        (status = 403, description = "`forbidden`: not its seller", body = crate::error::ErrorBody),
        (status = 404, description = "`store_not_found`", body = crate::error::ErrorBody),
        (status = 409, description = "`store_name_taken`", body = crate::error::ErrorBody),
        (status = 422, description = "`validation`", body = crate::error::ErrorBody)))]
pub async fn update(
    State(state): State<AppState>,
    caller: AuthMember,
    ApiPath(id): ApiPath<Uuid>,
    ApiJson(patch): ApiJson<StorePatch>,
) -> Result<Json<StoreBody>, ApiError> {
    let mut client = state.db.get().await?;
    let tx = client.transaction().await?;
    // Locked while merging, so concurrent patches do not lose each other's fields.
    let row = tx
        .query_opt(
            &format!("SELECT {STORE_COLUMNS} FROM stores WHERE id = $1 FOR NO KEY UPDATE"),
            &[&id],
        )
        .await?
        .ok_or_else(store_not_found)?;
    let current = StoreBody::from_row(&row)?;
    caller.require_owner_or_admin(current.seller_id)?;
    let (name, description) = validate(StoreInput {
        name: Some(patch.name.unwrap_or(current.name)),
        description: patch.description.unwrap_or(current.description),
    })?;
    let row = tx
        .query_one(
            &format!(
                "UPDATE stores SET name = $2, description = $3, updated_at = now() WHERE id = $1
                 RETURNING {STORE_COLUMNS}"
            ),
            &[&id, &name, &description],
        )
        .await
        .on_constraint("stores_name_key", name_taken)?;
    tx.commit().await?;
    StoreBody::from_row(&row).map(Json)
}

/// Deletes a store (its seller, admin). Its products stay, with `store_id: null`; its follows go with it.
#[utoipa::path(delete, path = "/api/v1/stores/{id}", tag = "stores", security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "The store")),
    responses((status = 204, description = "Deleted; its products stay, without a store"),
        (status = 403, description = "`forbidden`: not its seller", body = crate::error::ErrorBody),
        (status = 404, description = "`store_not_found`", body = crate::error::ErrorBody)))]
pub async fn delete(
    State(state): State<AppState>,
    caller: AuthMember,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<StatusCode, ApiError> {
    let client = state.db.get().await?;
    let owner: Uuid = client
        .query_opt("SELECT seller_id FROM stores WHERE id = $1", &[&id])
        .await?
        .ok_or_else(store_not_found)?
        .get(0);
    caller.require_owner_or_admin(owner)?;
    // The foreign key's ON DELETE SET NULL takes the products out in this statement.
    let deleted = client
        .execute("DELETE FROM stores WHERE id = $1", &[&id])
        .await?;
    if deleted == 0 {
        return Err(store_not_found());
    }
    Ok(StatusCode::NO_CONTENT)
}

/// A store's live products, newest first (the store as visible as `GET /stores/{id}`).
#[utoipa::path(get, path = "/api/v1/stores/{id}/products", tag = "stores", security((), ("bearer" = [])),
    params(("id" = Uuid, Path, description = "The store"), crate::pagination::PageParams),
    responses((status = 200, description = "A page of the store's products, newest first", body = Page<ProductBody>),
        (status = 404, description = "`store_not_found`", body = crate::error::ErrorBody)))]
pub async fn products(
    State(state): State<AppState>,
    MaybeMember(caller): MaybeMember,
    ApiPath(id): ApiPath<Uuid>,
    ApiQuery(page): ApiQuery<PageQuery>,
) -> Result<Json<Page<ProductBody>>, ApiError> {
    let limit = page.limit()?;
    let after = page.after::<Uuid>()?;
    let client = state.db.get().await?;
    visible_store(&client, id, caller.as_ref()).await?;
    let rows = client
        .query(
            &format!(
                "SELECT {PRODUCT_COLUMNS} FROM products
                 WHERE store_id = $1 AND deleted_at IS NULL AND ($2::uuid IS NULL OR id < $2)
                 ORDER BY id DESC LIMIT $3"
            ),
            &[&id, &after, &(limit + 1)],
        )
        .await?;
    let products = rows
        .iter()
        .map(ProductBody::from_row)
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Json(Page::from_rows(products, limit, |product| product.id)))
}
