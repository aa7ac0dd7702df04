//! Products (`/api/v1/products*`): seller-owned, regular (shelf stock), preorder (stock lives in drops) or
//! subscription (a price per `interval`, sold by `subscriptions/`). Changing a subscription product tells its
//! subscribers (`subscription_changed`) in the patch's transaction.
//!
//! Deleting a product is soft (`deleted_at`): drops and purchases keep a valid reference, every read here skips
//! deleted rows. Lists are newest first by id (UUID v7, so creation order), paged by keyset on the id. Name search
//! is a case-insensitive substring match (`ILIKE`) served by a trigram index. Bulk create validates every item
//! first and then inserts all of them in one statement (UNNEST), so it is all or nothing.
//!
//! A product may sit in one of its seller's stores (`store_id`, API.md "Stores"). The catalogue knows stores only as
//! SQL: the owner check of a `store_id`, and the join that hides the products of a suspended store from the list and
//! tells drops and the shop that a product's store is suspended (`ProductRef::store_suspended`,
//! `store_suspended()`), so neither of them imports the `stores` area.

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post, put};
use axum::Json;
use chrono::{DateTime, Utc};
use deadpool_postgres::GenericClient;
use serde::{Deserialize, Serialize};
use tokio_postgres::types::ToSql;
use tokio_postgres::Row;
use uuid::Uuid;

use crate::auth::{AuthMember, Role};
use crate::error::{ApiError, Fields, OnConstraint};
use crate::extract::{nullable, ApiJson, ApiPath, ApiQuery};
use crate::pagination::{Page, PageQuery};
use crate::AppState;

pub const NAME_CHARS_MAX: usize = 200;
pub const DESCRIPTION_CHARS_MAX: usize = 5000;
/// Far above any real price in any currency's smallest unit, and far below where `price * quantity` overflows.
pub const PRICE_MAX: i64 = 1_000_000_000_000;
/// Largest shelf stock of a regular product (a drop is bounded lower: `drops::DROP_STOCK_MAX`).
pub const SHELF_STOCK_MAX: i64 = 1_000_000_000;
pub const BULK_ITEMS_MAX: usize = 1000;
pub const SEARCH_CHARS_MAX: usize = 100;
pub const CURRENCY_DEFAULT: &str = "KRW";

/// Every column `ProductBody::from_row` reads, in its order (`heart_count`: see `live/hearts.rs`).
pub(crate) const PRODUCT_COLUMNS: &str =
    "id, seller_id, name, description, price, currency, kind, stock, created_at, updated_at, heart_count, store_id, \
     billing_interval";
/// A condition on `products` (unaliased) that holds when the product's store is suspended.
pub(crate) const IN_SUSPENDED_STORE: &str =
    "EXISTS (SELECT 1 FROM stores s WHERE s.id = products.store_id AND s.status = 'suspended')";

/// This module's part of the OpenAPI document (`crate::openapi`): every handler the router names.
#[derive(utoipa::OpenApi)]
#[openapi(
    paths(create_handler, list_handler, bulk_create_handler, get_handler, update_handler, delete_handler,
        crate::catalog::search::recent, crate::catalog::search::popular,
        crate::catalog::restock::ask, crate::catalog::restock::withdraw),
    tags((name = "products", description = "The catalogue: regular (shelf) and preorder (drop) products"))
)]
pub struct Doc;

pub fn router() -> crate::Routes {
    crate::Routes::new()
        .route(api!("/products"), post(create_handler).get(list_handler))
        .route(api!("/products/bulk"), post(bulk_create_handler))
        .route(
            api!("/products/{id}/restock-alert"),
            put(crate::catalog::restock::ask).delete(crate::catalog::restock::withdraw),
        )
        .route(
            api!("/products/{id}"),
            get(get_handler)
                .patch(update_handler)
                .delete(delete_handler),
        )
        .route(api!("/search/recent"), get(crate::catalog::search::recent))
        .route(
            api!("/search/popular"),
            get(crate::catalog::search::popular),
        )
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ProductKind {
    Regular,
    Preorder,
    Subscription,
}

impl ProductKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ProductKind::Regular => "regular",
            ProductKind::Preorder => "preorder",
            ProductKind::Subscription => "subscription",
        }
    }

    pub fn parse(text: &str) -> Option<ProductKind> {
        match text {
            "regular" => Some(ProductKind::Regular),
            "preorder" => Some(ProductKind::Preorder),
            "subscription" => Some(ProductKind::Subscription),
            _ => None,
        }
    }

    fn from_db(text: &str) -> Result<Self, ApiError> {
        Self::parse(text).ok_or_else(|| {
            ApiError::internal(anyhow::anyhow!("unknown product kind {text:?} in products"))
        })
    }
}

/// A product as the API shows it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
#[schema(as = Product)]
pub struct ProductBody {
    pub id: Uuid,
    pub seller_id: Uuid,
    pub name: String,
    pub description: Option<String>,
    pub price: i64,
    pub currency: String,
    pub kind: ProductKind,
    pub stock: i64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// Members who hearted it, exact (moved in the heart's transaction, see `live/hearts.rs`).
    pub heart_count: i32,
    /// The seller's store it sits in, if any.
    pub store_id: Option<Uuid>,
    /// A subscription product's billing period, `week` or `month`; absent for other kinds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub interval: Option<String>,
}

impl ProductBody {
    /// From a row selected with `PRODUCT_COLUMNS`.
    pub(crate) fn from_row(row: &Row) -> Result<Self, ApiError> {
        Ok(Self {
            id: row.get(0),
            seller_id: row.get(1),
            name: row.get(2),
            description: row.get(3),
            price: row.get(4),
            currency: row.get(5),
            kind: ProductKind::from_db(row.get(6))?,
            stock: row.get(7),
            created_at: row.get(8),
            updated_at: row.get(9),
            heart_count: row.get(10),
            store_id: row.get(11),
            interval: row.get(12),
        })
    }
}

/// What other modules need to know about a product (drops: who may sell it, at what price).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProductRef {
    pub id: Uuid,
    pub seller_id: Uuid,
    pub price: i64,
    pub currency: String,
    pub kind: ProductKind,
    /// Its store is suspended: it takes no new drop and cannot be ordered (`store_suspended()`).
    pub store_suspended: bool,
}

/// 409 `store_suspended`: the product's store is suspended by an admin.
pub fn store_suspended() -> ApiError {
    ApiError::conflict(
        "store_suspended",
        "the product's store is suspended; it takes no new drops or orders",
    )
}

/// Loads a live (not deleted) product's owner, price and kind; `None` when there is no such product.
/// Works on a pooled connection or inside a transaction.
pub async fn product_owner_and_price(
    client: &impl GenericClient,
    id: Uuid,
) -> Result<Option<ProductRef>, ApiError> {
    let row = client
        .query_opt(
            &format!(
                "SELECT seller_id, price, currency, kind, {IN_SUSPENDED_STORE} FROM products
                 WHERE id = $1 AND deleted_at IS NULL"
            ),
            &[&id],
        )
        .await?;
    row.map(|row| {
        Ok(ProductRef {
            id,
            seller_id: row.get(0),
            price: row.get(1),
            currency: row.get(2),
            kind: ProductKind::from_db(row.get(3))?,
            store_suspended: row.get(4),
        })
    })
    .transpose()
}

/// A product to create. Every field is optional in the wire type so that a missing one is reported by name.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
pub struct ProductInput {
    #[schema(value_type = String, required = true, min_length = 1, max_length = 200)]
    pub name: Option<String>,
    #[schema(max_length = 5000)]
    pub description: Option<String>,
    #[schema(value_type = i64, required = true, minimum = 0, maximum = 1_000_000_000_000_i64)]
    pub price: Option<i64>,
    /// Three letters (ISO 4217); default `KRW`.
    #[schema(value_type = String, example = "KRW")]
    pub currency: Option<String>,
    #[schema(value_type = ProductKind, required = true)]
    pub kind: Option<String>,
    /// Shelf stock of a regular product (ignored for preorder products); default 0.
    #[schema(value_type = i64, minimum = 0, maximum = 1_000_000_000)]
    pub stock: Option<i64>,
    /// One of the seller's own stores (403 for another seller's, 422 for none).
    pub store_id: Option<Uuid>,
    /// A subscription product's billing period, `week` or `month` (required for it, ignored for other kinds).
    #[schema(value_type = String, example = "month")]
    pub interval: Option<String>,
}

/// Changes to a product; absent fields stay, `description: null` clears the description.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
pub struct ProductPatch {
    #[schema(value_type = String, min_length = 1, max_length = 200)]
    pub name: Option<String>,
    #[serde(default, deserialize_with = "nullable")]
    #[schema(value_type = Option<String>, max_length = 5000)]
    pub description: Option<Option<String>>,
    #[schema(value_type = i64, minimum = 0, maximum = 1_000_000_000_000_i64)]
    pub price: Option<i64>,
    #[schema(value_type = String)]
    pub currency: Option<String>,
    #[schema(value_type = ProductKind)]
    pub kind: Option<String>,
    #[schema(value_type = i64, minimum = 0, maximum = 1_000_000_000)]
    pub stock: Option<i64>,
    /// Moves it into one of the seller's own stores; `null` takes it out of its store.
    #[serde(default, deserialize_with = "nullable")]
    #[schema(value_type = Option<Uuid>)]
    pub store_id: Option<Option<Uuid>>,
    #[schema(value_type = String)]
    pub interval: Option<String>,
}

/// `items` stay raw JSON until validation, so a wrongly typed item is reported as `items[i]` instead of
/// failing the whole body without saying which item.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct BulkBody {
    /// 1 to 1000 products, all created or none.
    #[schema(value_type = Vec<ProductInput>, required = true, min_items = 1, max_items = 1000)]
    pub items: Option<Vec<serde_json::Value>>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct BulkCreated {
    pub items: Vec<ProductBody>,
}

#[derive(Debug, Deserialize)]
pub struct ListQuery {
    pub kind: Option<String>,
    pub q: Option<String>,
    #[serde(flatten)]
    pub page: PageQuery,
}

/// A validated product, ready to store.
#[derive(Debug)]
struct NewProduct {
    name: String,
    description: Option<String>,
    price: i64,
    currency: String,
    kind: ProductKind,
    /// Always 0 for preorder and subscription products.
    stock: i64,
    store_id: Option<Uuid>,
    /// Set for subscription products only.
    interval: Option<&'static str>,
}

impl ProductInput {
    /// Checks every field, recording reasons under `{prefix}{field}`; `Some` only when all are valid.
    fn validate(self, prefix: &str, fields: &mut Fields) -> Option<NewProduct> {
        let key = |field: &str| format!("{prefix}{field}");
        let name = fields.take(&key("name"), check_name(self.name.as_deref()));
        let description = fields.take(&key("description"), check_description(self.description));
        let price = fields.take(&key("price"), check_price(self.price));
        let currency = fields.take(&key("currency"), check_currency(self.currency.as_deref()));
        let kind = fields.take(&key("kind"), check_kind(self.kind.as_deref()));
        let stock = fields.take(&key("stock"), check_stock(self.stock, kind));
        let interval = fields.take(
            &key("interval"),
            check_interval(self.interval.as_deref(), kind),
        );
        Some(NewProduct {
            name: name?,
            description: description?,
            price: price?,
            currency: currency?,
            kind: kind?,
            stock: stock?,
            store_id: self.store_id,
            interval: interval?,
        })
    }
}

pub(crate) fn check_name(name: Option<&str>) -> Result<String, &'static str> {
    match name.map(str::trim) {
        None => Err("required"),
        Some("") => Err("must not be empty"),
        Some(name) if name.chars().count() > NAME_CHARS_MAX => {
            Err("must be at most 200 characters")
        }
        Some(name) if !crate::error::storable(name) => Err(crate::error::NUL_REASON),
        Some(name) => Ok(name.to_owned()),
    }
}

/// A blank description is no description.
pub(crate) fn check_description(
    description: Option<String>,
) -> Result<Option<String>, &'static str> {
    match description {
        Some(text) if text.trim().is_empty() => Ok(None),
        Some(text) if text.chars().count() > DESCRIPTION_CHARS_MAX => {
            Err("must be at most 5000 characters")
        }
        Some(text) if !crate::error::storable(&text) => Err(crate::error::NUL_REASON),
        other => Ok(other),
    }
}

fn check_price(price: Option<i64>) -> Result<i64, &'static str> {
    match price {
        None => Err("required"),
        Some(price) if (0..=PRICE_MAX).contains(&price) => Ok(price),
        Some(_) => Err("must be between 0 and 1000000000000"),
    }
}

/// Currency codes are upper case (ISO 4217); "krw" is accepted as the "KRW" the user surely meant.
fn check_currency(currency: Option<&str>) -> Result<String, &'static str> {
    let code = currency.map_or(CURRENCY_DEFAULT.to_owned(), |code| {
        code.trim().to_ascii_uppercase()
    });
    if code.len() == 3 && code.bytes().all(|b| b.is_ascii_uppercase()) {
        Ok(code)
    } else {
        Err("must be a three-letter currency code")
    }
}

fn check_kind(kind: Option<&str>) -> Result<ProductKind, &'static str> {
    kind.map_or(Err("required"), |kind| {
        ProductKind::parse(kind).ok_or("must be regular, preorder or subscription")
    })
}

/// A subscription product's billing period; other kinds have none, and whatever came is ignored (as before
/// subscriptions existed).
fn check_interval(
    interval: Option<&str>,
    kind: Option<ProductKind>,
) -> Result<Option<&'static str>, &'static str> {
    match (kind, interval) {
        (Some(ProductKind::Subscription), None) => Err("required for a subscription product"),
        (Some(ProductKind::Subscription), Some("week")) => Ok(Some("week")),
        (Some(ProductKind::Subscription), Some("month")) => Ok(Some("month")),
        (Some(ProductKind::Subscription), Some(_)) => Err("must be week or month"),
        _ => Ok(None),
    }
}

/// Shelf stock of a regular product. A preorder product's stock lives in its drops: whatever came is ignored.
fn check_stock(stock: Option<i64>, kind: Option<ProductKind>) -> Result<i64, &'static str> {
    match (kind, stock.unwrap_or(0)) {
        (Some(ProductKind::Regular), stock) if !(0..=SHELF_STOCK_MAX).contains(&stock) => {
            Err("must be between 0 and 1000000000")
        }
        (Some(ProductKind::Regular), stock) => Ok(stock),
        _ => Ok(0),
    }
}

impl ProductPatch {
    /// The product as it would be after this patch, in the create shape, so one validation serves both.
    fn apply_to(self, current: ProductBody) -> ProductInput {
        ProductInput {
            name: Some(self.name.unwrap_or(current.name)),
            description: self.description.unwrap_or(current.description),
            price: Some(self.price.unwrap_or(current.price)),
            currency: Some(self.currency.unwrap_or(current.currency)),
            kind: Some(
                self.kind
                    .unwrap_or_else(|| current.kind.as_str().to_owned()),
            ),
            stock: Some(self.stock.unwrap_or(current.stock)),
            store_id: self.store_id.unwrap_or(current.store_id),
            interval: self.interval.or(current.interval),
        }
    }
}

/// Creates a product owned by the caller (seller, admin).
#[utoipa::path(post, path = "/api/v1/products", tag = "products", security(("bearer" = [])),
    request_body = ProductInput,
    responses((status = 201, description = "The product", body = ProductBody),
        (status = 403, description = "`forbidden`: not a seller or admin", body = crate::error::ErrorBody)))]
async fn create_handler(
    State(state): State<AppState>,
    caller: AuthMember,
    ApiJson(input): ApiJson<ProductInput>,
) -> Result<(StatusCode, Json<ProductBody>), ApiError> {
    let product = create_product(&state, caller, input).await?;
    Ok((StatusCode::CREATED, Json(product)))
}

/// Creates up to 1000 products at once, all or nothing (seller, admin).
#[utoipa::path(post, path = "/api/v1/products/bulk", tag = "products", security(("bearer" = [])),
    request_body = BulkBody,
    responses((status = 201, description = "The products, in the order given", body = BulkCreated),
        (status = 403, description = "`forbidden`: not a seller or admin", body = crate::error::ErrorBody),
        (status = 422, description = "`validation`: `fields` names each bad item as `items[i].field`",
            body = crate::error::ErrorBody)))]
async fn bulk_create_handler(
    State(state): State<AppState>,
    caller: AuthMember,
    ApiJson(body): ApiJson<BulkBody>,
) -> Result<(StatusCode, Json<BulkCreated>), ApiError> {
    let items = create_products(&state, caller, body).await?;
    Ok((StatusCode::CREATED, Json(BulkCreated { items })))
}

/// Products, newest first. A signed-in member's search (`q`) is remembered for the shop's search terms, after the list is read and off
/// the request path (`search::record`).
#[utoipa::path(get, path = "/api/v1/products", tag = "products", security((), ("bearer" = [])),
    params(("kind" = Option<ProductKind>, Query, description = "Only products of this kind"),
        ("q" = Option<String>, Query, max_length = 100,
            description = "Name contains (case-insensitive); remembered for a signed-in member"),
        crate::pagination::PageParams),
    responses((status = 200, description = "A page of products, newest first", body = Page<ProductBody>)))]
async fn list_handler(
    State(state): State<AppState>,
    crate::auth::MaybeMember(member): crate::auth::MaybeMember,
    ApiQuery(query): ApiQuery<ListQuery>,
) -> Result<Json<Page<ProductBody>>, ApiError> {
    let q = query.q.clone();
    let page = list_products(&state, query).await?;
    if let (Some(member), Some(q)) = (member, q) {
        crate::catalog::search::record(&state, member.id, &q);
    }
    Ok(Json(page))
}

/// One product.
#[utoipa::path(get, path = "/api/v1/products/{id}", tag = "products",
    params(("id" = Uuid, Path, description = "The product")),
    responses((status = 200, description = "The product", body = ProductBody),
        (status = 404, description = "`product_not_found`", body = crate::error::ErrorBody)))]
async fn get_handler(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<Json<ProductBody>, ApiError> {
    find_product(&state, id)
        .await?
        .map(Json)
        .ok_or_else(product_not_found)
}

/// Changes a product (its seller, admin).
#[utoipa::path(patch, path = "/api/v1/products/{id}", tag = "products", security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "The product")), request_body = ProductPatch,
    responses((status = 200, description = "The product", body = ProductBody),
        (status = 403, description = "`forbidden`: not its seller", body = crate::error::ErrorBody),
        (status = 404, description = "`product_not_found`", body = crate::error::ErrorBody)))]
async fn update_handler(
    State(state): State<AppState>,
    caller: AuthMember,
    ApiPath(id): ApiPath<Uuid>,
    ApiJson(patch): ApiJson<ProductPatch>,
) -> Result<Json<ProductBody>, ApiError> {
    update_product(&state, caller, id, patch).await.map(Json)
}

/// Deletes a product (its seller, admin).
#[utoipa::path(delete, path = "/api/v1/products/{id}", tag = "products", security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "The product")),
    responses((status = 204, description = "Deleted"),
        (status = 403, description = "`forbidden`: not its seller", body = crate::error::ErrorBody),
        (status = 404, description = "`product_not_found`", body = crate::error::ErrorBody)))]
async fn delete_handler(
    State(state): State<AppState>,
    caller: AuthMember,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<StatusCode, ApiError> {
    delete_product(&state, caller, id).await?;
    Ok(StatusCode::NO_CONTENT)
}

fn product_not_found() -> ApiError {
    ApiError::not_found("product_not_found").with_message("no such product")
}

/// A `store_id` naming no store (also when the store is deleted while the product is written: the foreign key).
fn store_not_found() -> ApiError {
    ApiError::invalid("store_id", "no such store")
}

/// Every store named must exist (422) and belong to `seller`, the products' seller (403). A store's seller never
/// changes, so the check cannot be outrun; a store deleted meanwhile is caught by `products_store_fkey`.
async fn check_stores(
    client: &impl GenericClient,
    seller: Uuid,
    stores: &[Option<Uuid>],
) -> Result<(), ApiError> {
    let mut named: Vec<Uuid> = stores.iter().flatten().copied().collect();
    named.sort_unstable();
    named.dedup();
    if named.is_empty() {
        return Ok(());
    }
    let rows = client
        .query("SELECT seller_id FROM stores WHERE id = ANY($1)", &[&named])
        .await?;
    if rows.len() != named.len() {
        return Err(store_not_found());
    }
    if rows.iter().any(|row| row.get::<_, Uuid>(0) != seller) {
        return Err(
            ApiError::forbidden().with_message("store_id is not one of the seller's stores")
        );
    }
    Ok(())
}

/// Creates one product owned by the caller (a seller or an admin).
pub async fn create_product(
    state: &AppState,
    caller: AuthMember,
    input: ProductInput,
) -> Result<ProductBody, ApiError> {
    caller.require(&[Role::Seller, Role::Admin])?;
    let mut fields = Fields::default();
    let product = input.validate("", &mut fields);
    let product = fields.into_result(product)?;
    let mut stored = insert_products(state, caller.id, vec![product]).await?;
    stored
        .pop()
        .ok_or_else(|| ApiError::internal(anyhow::anyhow!("insert returned no product")))
}

/// Creates up to `BULK_ITEMS_MAX` products, all or nothing: every item is validated before anything is written.
pub async fn create_products(
    state: &AppState,
    caller: AuthMember,
    body: BulkBody,
) -> Result<Vec<ProductBody>, ApiError> {
    caller.require(&[Role::Seller, Role::Admin])?;
    let items = body
        .items
        .ok_or_else(|| ApiError::invalid("items", "required"))?;
    if items.is_empty() || items.len() > BULK_ITEMS_MAX {
        return Err(ApiError::invalid("items", "must hold 1 to 1000 products"));
    }
    let mut fields = Fields::default();
    let mut products = Vec::with_capacity(items.len());
    for (index, item) in items.into_iter().enumerate() {
        let prefix = format!("items[{index}]");
        match serde_json::from_value::<ProductInput>(item) {
            Ok(input) => products.extend(input.validate(&format!("{prefix}."), &mut fields)),
            Err(err) => {
                fields.add(&prefix, format!("not a product: {err}"));
            }
        }
    }
    fields.finish()?;
    insert_products(state, caller.id, products).await
}

/// One INSERT ... SELECT FROM UNNEST for any number of rows: one round trip, one statement, atomic.
async fn insert_products(
    state: &AppState,
    seller: Uuid,
    products: Vec<NewProduct>,
) -> Result<Vec<ProductBody>, ApiError> {
    // `now_v7` ids from one process are strictly increasing, so sorting by id restores the request's order.
    let ids: Vec<Uuid> = products.iter().map(|_| Uuid::now_v7()).collect();
    let mut names = Vec::with_capacity(products.len());
    let mut descriptions = Vec::with_capacity(products.len());
    let mut prices = Vec::with_capacity(products.len());
    let mut currencies = Vec::with_capacity(products.len());
    let mut kinds = Vec::with_capacity(products.len());
    let mut stocks = Vec::with_capacity(products.len());
    let mut stores = Vec::with_capacity(products.len());
    let mut intervals = Vec::with_capacity(products.len());
    for product in products {
        names.push(product.name);
        descriptions.push(product.description);
        prices.push(product.price);
        currencies.push(product.currency);
        kinds.push(product.kind.as_str());
        stocks.push(product.stock);
        stores.push(product.store_id);
        intervals.push(product.interval);
    }
    let client = state.db.get().await?;
    check_stores(&client, seller, &stores).await?;
    let rows = client
        .query(
            &format!(
                "INSERT INTO products (id, seller_id, name, description, price, currency, kind, stock, store_id,
                                       billing_interval)
                 SELECT id, $1, name, description, price, currency, kind, stock, store_id, billing_interval
                 FROM UNNEST($2::uuid[], $3::text[], $4::text[], $5::bigint[], $6::text[], $7::text[],
                             $8::bigint[], $9::uuid[], $10::text[])
                      AS t (id, name, description, price, currency, kind, stock, store_id, billing_interval)
                 RETURNING {PRODUCT_COLUMNS}"
            ),
            &[
                &seller,
                &ids,
                &names,
                &descriptions,
                &prices,
                &currencies,
                &kinds,
                &stocks,
                &stores,
                &intervals,
            ],
        )
        .await
        .on_constraint("products_store_fkey", store_not_found)?;
    let mut stored = rows
        .iter()
        .map(ProductBody::from_row)
        .collect::<Result<Vec<_>, _>>()?;
    stored.sort_by_key(|product| product.id);
    Ok(stored)
}

pub async fn find_product(state: &AppState, id: Uuid) -> Result<Option<ProductBody>, ApiError> {
    let client = state.db.get().await?;
    client
        .query_opt(
            &format!("SELECT {PRODUCT_COLUMNS} FROM products WHERE id = $1 AND deleted_at IS NULL"),
            &[&id],
        )
        .await?
        .as_ref()
        .map(ProductBody::from_row)
        .transpose()
}

/// Newest first, optionally of one kind and/or whose name contains `q` (any case).
pub async fn list_products(
    state: &AppState,
    query: ListQuery,
) -> Result<Page<ProductBody>, ApiError> {
    let limit = query.page.limit()?;
    let after = query.page.after::<Uuid>()?;
    let mut fields = Fields::default();
    let kind = fields.take(
        "kind",
        query
            .kind
            .as_deref()
            .map(|kind| check_kind(Some(kind)))
            .transpose(),
    );
    let pattern = fields.take("q", search_pattern(query.q.as_deref()));
    let (kind, pattern) = fields.into_result(kind.zip(pattern))?;

    // Only the filters given become SQL, so each query is one the planner can serve from an index.
    let kind = kind.map(ProductKind::as_str);
    let fetch = limit + 1;
    let mut sql = format!(
        "SELECT {PRODUCT_COLUMNS} FROM products WHERE deleted_at IS NULL AND NOT {IN_SUSPENDED_STORE}"
    );
    let mut params: Vec<&(dyn ToSql + Sync)> = Vec::new();
    if let Some(kind) = &kind {
        params.push(kind);
        sql.push_str(&format!(" AND kind = ${}", params.len()));
    }
    if let Some(pattern) = &pattern {
        params.push(pattern);
        sql.push_str(&format!(" AND name ILIKE ${}", params.len()));
    }
    if let Some(after) = &after {
        params.push(after);
        sql.push_str(&format!(" AND id < ${}", params.len()));
    }
    params.push(&fetch);
    sql.push_str(&format!(" ORDER BY id DESC LIMIT ${}", params.len()));

    let client = state.db.get().await?;
    let rows = client.query(&sql, &params).await?;
    let products = rows
        .iter()
        .map(ProductBody::from_row)
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Page::from_rows(products, limit, |product| product.id))
}

/// `%text%` for ILIKE with the user's `%`, `_` and `\` escaped, so they match themselves. Blank: no filter.
pub(crate) fn search_pattern(q: Option<&str>) -> Result<Option<String>, &'static str> {
    let Some(text) = q.map(str::trim).filter(|text| !text.is_empty()) else {
        return Ok(None);
    };
    if text.chars().count() > SEARCH_CHARS_MAX {
        return Err("must be at most 100 characters");
    }
    if !crate::error::storable(text) {
        return Err(crate::error::NUL_REASON);
    }
    Ok(Some(contains_pattern(text)))
}

/// `%text%` for ILIKE with LIKE's own characters (`%`, `_`, `\`) escaped, so they match themselves (also the back
/// office's search).
pub fn contains_pattern(text: &str) -> String {
    let mut pattern = String::with_capacity(text.len() + 2);
    pattern.push('%');
    for c in text.chars() {
        if matches!(c, '%' | '_' | '\\') {
            pattern.push('\\');
        }
        pattern.push(c);
    }
    pattern.push('%');
    pattern
}

/// Applies a patch (owner or admin). The row is locked while merging so concurrent patches do not lose fields.
pub async fn update_product(
    state: &AppState,
    caller: AuthMember,
    id: Uuid,
    patch: ProductPatch,
) -> Result<ProductBody, ApiError> {
    let mut client = state.db.get().await?;
    let tx = client.transaction().await?;
    let current = tx
        .query_opt(
            &format!(
                "SELECT {PRODUCT_COLUMNS} FROM products WHERE id = $1 AND deleted_at IS NULL FOR UPDATE"
            ),
            &[&id],
        )
        .await?
        .ok_or_else(product_not_found)?;
    let current = ProductBody::from_row(&current)?;
    caller.require_owner_or_admin(current.seller_id)?;
    let before = current.clone();
    let (seller, stock_before) = (current.seller_id, current.stock);
    let mut fields = Fields::default();
    let product = patch.apply_to(current).validate("", &mut fields);
    let product = fields.into_result(product)?;
    check_stores(&tx, seller, &[product.store_id]).await?;
    let row = tx
        .query_one(
            &format!(
                "UPDATE products
                 SET name = $2, description = $3, price = $4, currency = $5, kind = $6, stock = $7,
                     store_id = $8, billing_interval = $9, updated_at = now()
                 WHERE id = $1 RETURNING {PRODUCT_COLUMNS}"
            ),
            &[
                &id,
                &product.name,
                &product.description,
                &product.price,
                &product.currency,
                &product.kind.as_str(),
                &product.stock,
                &product.store_id,
                &product.interval,
            ],
        )
        .await
        .on_constraint("products_store_fkey", store_not_found)?;
    // Under the row lock taken above, so of two racing restocks only the first sees the shelf at 0.
    if stock_before == 0 && product.stock > 0 {
        crate::catalog::restock::restocked(&tx, &[id]).await?;
    }
    let after = ProductBody::from_row(&row)?;
    if before.kind == ProductKind::Subscription && subscription_terms_changed(&before, &after) {
        notify_subscribers(&tx, id).await?;
    }
    tx.commit().await?;
    Ok(after)
}

/// Whether a patch changed what a subscriber pays for (name, price, currency, interval, kind).
fn subscription_terms_changed(before: &ProductBody, after: &ProductBody) -> bool {
    before.name != after.name
        || before.price != after.price
        || before.currency != after.currency
        || before.interval != after.interval
        || before.kind != after.kind
}

/// Tells every subscriber of a subscription product that is not canceled `subscription_changed`, in the patch's
/// transaction, so the notices exist exactly when the change does. What a higher price does to a renewal is the
/// subscriptions area's (it compares the product's price with the price each member agreed to); the catalogue
/// only reads who subscribes, by SQL, so it does not import that area (which reads products).
async fn notify_subscribers(tx: &impl GenericClient, product: Uuid) -> Result<(), ApiError> {
    let rows = tx
        .query(
            "SELECT id, member_id FROM subscriptions WHERE product_id = $1 AND status <> 'canceled'",
            &[&product],
        )
        .await?;
    for row in rows {
        let about = crate::notify::About {
            product_id: Some(product),
            subscription_id: Some(row.get(0)),
            ..crate::notify::About::default()
        };
        let member: Uuid = row.get(1);
        crate::notify::notify_members(
            tx,
            crate::notify::Kind::SubscriptionChanged,
            &[member],
            about,
        )
        .await?;
    }
    Ok(())
}

/// Soft-deletes a product (owner or admin).
pub async fn delete_product(
    state: &AppState,
    caller: AuthMember,
    id: Uuid,
) -> Result<(), ApiError> {
    let client = state.db.get().await?;
    let owner = product_owner_and_price(&client, id)
        .await?
        .ok_or_else(product_not_found)?
        .seller_id;
    caller.require_owner_or_admin(owner)?;
    let deleted = client
        .execute(
            "UPDATE products SET deleted_at = now(), updated_at = now()
             WHERE id = $1 AND deleted_at IS NULL",
            &[&id],
        )
        .await?;
    // Zero rows: a concurrent delete won; the product is gone either way, as for any later delete.
    if deleted == 0 {
        return Err(product_not_found());
    }
    Ok(())
}
