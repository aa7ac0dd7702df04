//! The regular shop (API.md, "Regular shop"): points balances, carts, orders of shelf stock, refunds decided by
//! the seller, a seller's sales, dashboard and daily settlement. Hearts live in `live/`, and remembered search
//! terms with the catalogue (`search.rs`).
//!
//! Postgres is the judge of every rule that money and stock depend on. Each order, charge and refund is one
//! transaction that moves stock, the balance and its ledger together, so a failure leaves nothing behind; stock
//! and balances only move by conditional UPDATEs (and CHECKs forbid a negative value as a last line).
//!
//! Lock order, to keep concurrent writers free of deadlocks: a refund row, then product rows in ascending id
//! order, then order item rows in ascending product id order, then the buyer's balance row. Every writer takes
//! the subset it needs in that order.
//!
//! Card payments go through the engine's `PaymentGateway` outside any transaction (no row lock is held across
//! the call). A charge whose order then fails to commit is refunded before the answer; a seller's refund is paid
//! through the gateway with the refund's id as its idempotency key, inside the decision's transaction, so a
//! retry after a failed commit never pays twice.
//!
//! - `balance.rs`: the balance, its ledger and point charges.
//! - `cart.rs`: the cart, priced at read time.
//! - `orders.rs`: placing and reading orders.
//! - `refunds.rs`: requesting and deciding refunds.
//! - `sales.rs`: a seller's sales and dashboard.
//! - `settlement.rs`: the daily settlement (`flashsale settle`, and once a day in `serve`).

pub mod balance;
pub mod cart;
pub mod orders;
pub mod refunds;
pub mod sales;
pub mod settlement;

use axum::http::StatusCode;
use axum::routing::{get, post, put};
use serde::Deserialize;
use uuid::Uuid;

use crate::error::ApiError;
use clap::Args;

/// The currency of points balances. Products default to it; only products priced in it can be paid with points.
pub const POINTS_CURRENCY: &str = "KRW";
/// Most units of one product in a cart line, an order item or a refund item.
pub const QUANTITY_MAX: i64 = 99;
/// Most distinct products in one cart or order.
pub const ITEMS_MAX: usize = 100;
/// Longest payment token accepted (as for drop payments).
pub const PAYMENT_TOKEN_CHARS_MAX: usize = 256;

/// This module's part of the OpenAPI document (`crate::openapi`): every handler the router names.
#[derive(utoipa::OpenApi)]
#[openapi(paths(
    balance::get_balance,
    balance::charge,
    balance::history,
    cart::get_cart,
    cart::clear_cart,
    cart::put_item,
    cart::delete_item,
    orders::create_order,
    orders::list_orders,
    orders::get_order,
    refunds::request_refund,
    refunds::get_refund,
    refunds::accept_refund,
    refunds::reject_refund,
    refunds::seller_refunds,
    sales::list_sales,
    sales::dashboard,
    settlement::list_settlements,
))]
pub struct Doc;

pub fn router() -> crate::Routes {
    crate::Routes::new()
        .route(api!("/members/me/balance"), get(balance::get_balance))
        .route(api!("/members/me/balance/charges"), post(balance::charge))
        .route(api!("/members/me/balance/history"), get(balance::history))
        .route(api!("/cart"), get(cart::get_cart).delete(cart::clear_cart))
        .route(
            api!("/cart/items/{product_id}"),
            put(cart::put_item).delete(cart::delete_item),
        )
        .route(
            api!("/orders"),
            post(orders::create_order).get(orders::list_orders),
        )
        .route(api!("/orders/{id}"), get(orders::get_order))
        .route(api!("/orders/{id}/refunds"), post(refunds::request_refund))
        .route(api!("/refunds/{id}"), get(refunds::get_refund))
        .route(api!("/refunds/{id}/accept"), post(refunds::accept_refund))
        .route(api!("/refunds/{id}/reject"), post(refunds::reject_refund))
        .route(api!("/sellers/me/refunds"), get(refunds::seller_refunds))
        .route(api!("/sellers/me/sales"), get(sales::list_sales))
        .route(api!("/sellers/me/dashboard"), get(sales::dashboard))
        .route(
            api!("/sellers/me/settlements"),
            get(settlement::list_settlements),
        )
}

/// One `{product_id, quantity}` of an order or refund body. Fields are optional so a missing one is named.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct ItemInput {
    #[schema(value_type = Uuid, required = true)]
    pub product_id: Option<Uuid>,
    #[schema(value_type = i64, required = true, minimum = 1, maximum = 99)]
    pub quantity: Option<i64>,
}

/// An order's or refund's items as `(product, quantity)`, one per product.
pub type Lines = Vec<(Uuid, i32)>;

/// A validated item list: distinct products, each with 1..=`QUANTITY_MAX` units.
pub(crate) fn check_items(items: Vec<ItemInput>) -> Result<Lines, ApiError> {
    if items.is_empty() || items.len() > ITEMS_MAX {
        return Err(ApiError::invalid("items", "must hold 1 to 100 items"));
    }
    let mut fields = crate::error::Fields::default();
    let mut lines = Vec::with_capacity(items.len());
    for (index, item) in items.into_iter().enumerate() {
        let product = fields.take(
            &format!("items[{index}].product_id"),
            item.product_id.ok_or("required"),
        );
        let quantity = fields.take(
            &format!("items[{index}].quantity"),
            check_quantity(item.quantity),
        );
        if let (Some(product), Some(quantity)) = (product, quantity) {
            if lines.iter().any(|(seen, _)| *seen == product) {
                fields.add(
                    &format!("items[{index}].product_id"),
                    "listed twice; give one item per product",
                );
            }
            lines.push((product, quantity));
        }
    }
    fields.finish()?;
    Ok(lines)
}

/// A quantity of 1..=`QUANTITY_MAX` units.
pub(crate) fn check_quantity(quantity: Option<i64>) -> Result<i32, &'static str> {
    match quantity {
        None => Err("required"),
        Some(q) if (1..=QUANTITY_MAX).contains(&q) => Ok(i32::try_from(q).unwrap_or(1)),
        Some(_) => Err("must be between 1 and 99"),
    }
}

/// A payment token as drop payments accept it.
pub(crate) fn check_token(token: Option<&str>) -> Result<String, &'static str> {
    match token {
        None => Err("required"),
        Some(token) if token.is_empty() || token.len() > PAYMENT_TOKEN_CHARS_MAX => {
            Err("must be 1 to 256 characters")
        }
        Some(token) => Ok(token.to_owned()),
    }
}

pub(crate) fn payment_declined() -> ApiError {
    ApiError::new(
        StatusCode::PAYMENT_REQUIRED,
        "payment_declined",
        "the payment was declined; nothing was charged",
    )
}

pub(crate) fn payment_unavailable() -> ApiError {
    ApiError::unavailable("payment_unavailable", 1)
        .with_message("the payment gateway is unavailable; nothing was charged, retry")
}

pub(crate) fn insufficient_balance() -> ApiError {
    ApiError::new(
        StatusCode::PAYMENT_REQUIRED,
        "insufficient_balance",
        "the points balance does not cover this; nothing was taken",
    )
}

pub(crate) fn product_not_found() -> ApiError {
    ApiError::not_found("product_not_found").with_message("no such product")
}

/// Callers of the seller routes: sellers, and admins (who see what they sell themselves).
pub(crate) fn require_seller(member: &crate::auth::AuthMember) -> Result<(), ApiError> {
    member.require(&[crate::auth::Role::Seller, crate::auth::Role::Admin])
}

/// Settings of the regular shop.
#[derive(Debug, Clone, Args)]
pub struct ShopArgs {
    /// The marketplace fee taken in the daily settlement, in basis points of gross sales (300 = 3%), rounded
    /// down; at most 10000.
    #[arg(long, env = "SETTLEMENT_FEE_BPS", default_value_t = 300, value_parser = clap::value_parser!(u32).range(0..=10_000))]
    pub settlement_fee_bps: u32,
}
