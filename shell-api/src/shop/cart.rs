//! The cart: a member's lines (product, quantity), priced at read time from the products, so a price change
//! shows at once and the cart never holds a stale price. Only regular products go in (preorder ones sell in
//! drops), 1..=99 units each, one currency per cart. A product deleted after it went in is left out of the cart.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use deadpool_postgres::GenericClient;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::{check_quantity, product_not_found, ITEMS_MAX, POINTS_CURRENCY};
use crate::auth::AuthMember;
use crate::catalog::products::{product_owner_and_price, ProductKind};
use crate::error::ApiError;
use crate::extract::{ApiJson, ApiPath};
use crate::AppState;

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct CartLine {
    pub product_id: Uuid,
    pub name: String,
    pub price: i64,
    pub quantity: i32,
    pub subtotal: i64,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Cart {
    pub items: Vec<CartLine>,
    pub total: i64,
    /// The currency of the cart's products; KRW for an empty cart.
    pub currency: String,
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct QuantityInput {
    #[schema(value_type = i64, required = true, minimum = 1, maximum = 99)]
    pub quantity: Option<i64>,
}

/// The cart priced now, lines in the order they were added.
pub async fn read_cart(client: &impl GenericClient, member: Uuid) -> Result<Cart, ApiError> {
    let rows = client
        .query(
            "SELECT p.id, p.name, p.price, c.quantity, p.currency
             FROM cart_items c JOIN products p ON p.id = c.product_id AND p.deleted_at IS NULL
             WHERE c.member_id = $1
             ORDER BY c.added_at, p.id",
            &[&member],
        )
        .await?;
    let mut currency = None;
    let items: Vec<CartLine> = rows
        .iter()
        .map(|row| {
            currency.get_or_insert_with(|| row.get::<_, String>(4));
            let price: i64 = row.get(2);
            let quantity: i32 = row.get(3);
            CartLine {
                product_id: row.get(0),
                name: row.get(1),
                price,
                quantity,
                subtotal: price * i64::from(quantity),
            }
        })
        .collect();
    Ok(Cart {
        total: items.iter().map(|line| line.subtotal).sum(),
        items,
        currency: currency.unwrap_or_else(|| POINTS_CURRENCY.to_owned()),
    })
}

/// My cart, priced now.
#[utoipa::path(get, path = "/api/v1/cart", tag = "shop", security(("bearer" = [])),
    responses((status = 200, description = "The cart", body = Cart)))]
pub async fn get_cart(
    State(state): State<AppState>,
    member: AuthMember,
) -> Result<Json<Cart>, ApiError> {
    let client = state.db.get().await?;
    read_cart(&client, member.id).await.map(Json)
}

/// `PUT /cart/items/{product_id}` `{quantity}`: sets the line's quantity (adding the line if new).
/// Sets a product's quantity in my cart (regular products only).
#[utoipa::path(put, path = "/api/v1/cart/items/{product_id}", tag = "shop", security(("bearer" = [])),
    params(("product_id" = Uuid, Path, description = "The product")), request_body = QuantityInput,
    responses((status = 200, description = "The cart", body = Cart),
        (status = 404, description = "`product_not_found`", body = crate::error::ErrorBody),
        (status = 409, description = "`store_suspended`: the product's store is suspended", body = crate::error::ErrorBody),
        (status = 422, description = "`validation`: a quantity outside 1..=99, a product that is not regular, \
or of another currency than the cart", body = crate::error::ErrorBody)))]
pub async fn put_item(
    State(state): State<AppState>,
    member: AuthMember,
    ApiPath(product_id): ApiPath<Uuid>,
    ApiJson(input): ApiJson<QuantityInput>,
) -> Result<Json<Cart>, ApiError> {
    let quantity =
        check_quantity(input.quantity).map_err(|reason| ApiError::invalid("quantity", reason))?;
    let client = state.db.get().await?;
    let product = product_owner_and_price(&client, product_id)
        .await?
        .ok_or_else(product_not_found)?;
    if product.kind != ProductKind::Regular {
        return Err(ApiError::invalid(
            "product_id",
            "not a regular product; preorder products sell in drops",
        ));
    }
    if product.store_suspended {
        return Err(crate::catalog::products::store_suspended());
    }
    let others = client
        .query(
            "SELECT DISTINCT p.currency, count(*) OVER ()
             FROM cart_items c JOIN products p ON p.id = c.product_id AND p.deleted_at IS NULL
             WHERE c.member_id = $1 AND c.product_id <> $2",
            &[&member.id, &product_id],
        )
        .await?;
    if others
        .iter()
        .any(|row| row.get::<_, String>(0) != product.currency)
    {
        return Err(ApiError::invalid(
            "product_id",
            "the cart holds products in another currency; order those first",
        ));
    }
    let lines: i64 = others.first().map_or(0, |row| row.get(1));
    if usize::try_from(lines).unwrap_or(usize::MAX) >= ITEMS_MAX {
        return Err(ApiError::invalid(
            "product_id",
            "the cart holds 100 products already",
        ));
    }
    client
        .execute(
            "INSERT INTO cart_items (member_id, product_id, quantity) VALUES ($1, $2, $3)
             ON CONFLICT (member_id, product_id) DO UPDATE SET quantity = EXCLUDED.quantity",
            &[&member.id, &product_id, &quantity],
        )
        .await?;
    read_cart(&client, member.id).await.map(Json)
}

/// `DELETE /cart/items/{product_id}`: the cart without that line (whether or not it was there).
/// Takes a product out of my cart.
#[utoipa::path(delete, path = "/api/v1/cart/items/{product_id}", tag = "shop", security(("bearer" = [])),
    params(("product_id" = Uuid, Path, description = "The product")),
    responses((status = 200, description = "The cart", body = Cart)))]
pub async fn delete_item(
    State(state): State<AppState>,
    member: AuthMember,
    ApiPath(product_id): ApiPath<Uuid>,
) -> Result<Json<Cart>, ApiError> {
    let client = state.db.get().await?;
    client
        .execute(
            "DELETE FROM cart_items WHERE member_id = $1 AND product_id = $2",
            &[&member.id, &product_id],
        )
        .await?;
    read_cart(&client, member.id).await.map(Json)
}

/// Empties my cart.
#[utoipa::path(delete, path = "/api/v1/cart", tag = "shop", security(("bearer" = [])),
    responses((status = 204, description = "Emptied")))]
pub async fn clear_cart(
    State(state): State<AppState>,
    member: AuthMember,
) -> Result<StatusCode, ApiError> {
    let client = state.db.get().await?;
    client
        .execute("DELETE FROM cart_items WHERE member_id = $1", &[&member.id])
        .await?;
    Ok(StatusCode::NO_CONTENT)
}
