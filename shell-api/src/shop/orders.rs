//! Orders of regular products from their shelf stock, paid with points or by card, all or nothing.
//!
//! Placing an order: validate the body, read the products (422 for unknown, non-regular or mixed-currency items,
//! 409 `out_of_stock` when the shelf visibly lacks units, so a refused order is normally never charged), charge
//! the card if paying by card (outside any transaction: no row lock is held across the gateway's call), then one
//! transaction: lock the product rows in ascending id order (`FOR UPDATE` under `ORDER BY id`, so concurrent
//! multi-item orders cannot deadlock), check stock and prices again under the locks, take the stock, insert the
//! order, debit the points (conditional, 402 `insufficient_balance`), empty the cart lines ordered, commit. If the
//! transaction fails after a card charge (stock taken by another order between the first read and the locks, a
//! price change, a database error), the charge is refunded through the gateway before answering.

use std::collections::BTreeMap;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::{DateTime, Utc};
use deadpool_postgres::GenericClient;
use engine::payment::{ChargeOutcome, ChargeRequest};
use serde::{Deserialize, Serialize};
use tokio_postgres::Row;
use uuid::Uuid;

use super::balance::{move_balance, EntryKind, Movement};
use super::{
    check_items, check_token, insufficient_balance, payment_declined, payment_unavailable,
    ItemInput, Lines, POINTS_CURRENCY,
};
use crate::auth::AuthMember;
use crate::catalog::products::{ProductKind, IN_SUSPENDED_STORE};
use crate::error::{ApiError, Fields};
use crate::extract::{ApiJson, ApiPath, ApiQuery};
use crate::idempotency::IdempotencyKey;
use crate::pagination::{Page, PageQuery};
use crate::AppState;

#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct OrderInput {
    /// Absent: order the cart.
    #[schema(max_items = 100)]
    pub items: Option<Vec<ItemInput>>,
    #[schema(value_type = PaymentInput, required = true)]
    pub payment: Option<PaymentInput>,
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct PaymentInput {
    /// `points` or `card`.
    #[schema(value_type = String, required = true, example = "points")]
    pub method: Option<String>,
    /// With `card`: the card token.
    #[schema(max_length = 256)]
    pub payment_token: Option<String>,
}

/// How an order is paid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Payment {
    Points,
    Card { token: String },
}

impl Payment {
    pub fn method(&self) -> &'static str {
        match self {
            Payment::Points => "points",
            Payment::Card { .. } => "card",
        }
    }
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct OrderItem {
    pub product_id: Uuid,
    pub seller_id: Uuid,
    pub quantity: i32,
    pub unit_price: i64,
    pub subtotal: i64,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Order {
    pub id: Uuid,
    pub member_id: Uuid,
    pub status: &'static str,
    pub items: Vec<OrderItem>,
    pub total: i64,
    pub currency: String,
    pub payment_method: String,
    pub created_at: DateTime<Utc>,
    pub paid_at: DateTime<Utc>,
}

/// A product as an order sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Shelf {
    id: Uuid,
    seller_id: Uuid,
    price: i64,
    currency: String,
    kind: ProductKind,
    stock: i64,
    /// Its store is suspended by an admin: it cannot be ordered.
    store_suspended: bool,
}

impl Shelf {
    fn from_row(row: &Row) -> Result<Self, ApiError> {
        let kind: &str = row.get(4);
        Ok(Self {
            id: row.get(0),
            seller_id: row.get(1),
            price: row.get(2),
            currency: row.get(3),
            kind: ProductKind::parse(kind).ok_or_else(|| {
                ApiError::internal(anyhow::anyhow!("unknown product kind {kind:?}"))
            })?,
            stock: row.get(5),
            store_suspended: row.get(6),
        })
    }
}

/// The columns `Shelf::from_row` reads (the last: `catalog::products::IN_SUSPENDED_STORE`).
const SHELF_COLUMNS: &str = "id, seller_id, price, currency, kind, stock";

/// Orders the items given, or the cart; all or nothing across stock, items and payment.
#[utoipa::path(post, path = "/api/v1/orders", tag = "shop", security(("bearer" = [])),
    params(crate::idempotency::IdempotencyParams), request_body = OrderInput,
    responses((status = 201, description = "The paid order", body = Order),
        (status = 402, description = "`insufficient_balance` or `payment_declined`: nothing was taken", body = crate::error::ErrorBody),
        (status = 409, description = "`out_of_stock`: `fields` names the products short of stock; `store_suspended`: \
`fields` names the products whose store is suspended", body = crate::error::ErrorBody),
        (status = 422, description = "`validation`: empty, unknown or non-regular items, mixed currencies", body = crate::error::ErrorBody),
        (status = 503, description = "`payment_unavailable`: nothing was taken, retry", body = crate::error::ErrorBody)))]
pub async fn create_order(
    State(state): State<AppState>,
    member: AuthMember,
    IdempotencyKey(key): IdempotencyKey,
    ApiJson(input): ApiJson<OrderInput>,
) -> Result<Response, ApiError> {
    let (lines, payment) = check_order(input)?;
    // In a task of its own: a card charged is never left without its order or its refund.
    crate::guard::run_to_completion(async move {
        let state = &state;
        Ok(state
            .idempotency
            .run(member.id, "order", key, || async move {
                match place_order(state, member.id, lines, payment).await {
                    Ok(order) => (StatusCode::CREATED, Json(order)).into_response(),
                    Err(err) => err.into_response(),
                }
            })
            .await)
    })
    .await
}

/// The order's items (`None`: the cart) and payment, or every validation failure at once.
fn check_order(input: OrderInput) -> Result<(Option<Lines>, Payment), ApiError> {
    let lines = input.items.map(check_items).transpose();
    let mut fields = Fields::default();
    let payment = check_payment(input.payment, &mut fields);
    // Item errors come first: they say more about what is wrong with the order.
    let lines = lines?;
    let payment = fields.into_result(payment)?;
    Ok((lines, payment))
}

/// A `payment` body (`{method: "points"}` or `{method: "card", payment_token}`), its failures recorded in
/// `fields` under `payment.*`; orders and subscriptions take the same shape.
pub(crate) fn check_payment(payment: Option<PaymentInput>, fields: &mut Fields) -> Option<Payment> {
    match payment {
        None => {
            fields.add("payment", "required");
            None
        }
        Some(payment) => match payment.method.as_deref() {
            Some("points") => Some(Payment::Points),
            Some("card") => fields
                .take(
                    "payment.payment_token",
                    check_token(payment.payment_token.as_deref()),
                )
                .map(|token| Payment::Card { token }),
            Some(_) => {
                fields.add("payment.method", "must be points or card");
                None
            }
            None => {
                fields.add("payment.method", "required");
                None
            }
        },
    }
}

/// Places an order: see the module comment for the steps and why in this order.
pub async fn place_order(
    state: &AppState,
    member: Uuid,
    lines: Option<Lines>,
    payment: Payment,
) -> Result<Order, ApiError> {
    let from_cart = lines.is_none();
    let mut lines = match lines {
        Some(lines) => lines,
        None => cart_lines(state, member).await?,
    };
    lines.sort_by_key(|(product, _)| *product);
    let ids: Vec<Uuid> = lines.iter().map(|(product, _)| *product).collect();

    // First look, without locks: every refusal that needs no lock is answered before anything is charged.
    let seen = {
        let client = state.db.get().await?;
        read_shelves(&client, &ids, false).await?
    };
    let (total, currency) = check_shelves(&lines, &seen, &payment)?;
    check_stores_open(&seen)?;
    check_stock(&lines, &seen)?;

    let order_id = Uuid::now_v7();
    let gateway = state.engine.gateway();
    if let Payment::Card { token } = &payment {
        let request = ChargeRequest {
            reservation_id: order_id,
            member_id: member,
            amount: total,
            currency: currency.clone(),
            payment_token: token.clone(),
        };
        match gateway.charge(&request).await {
            ChargeOutcome::Approved { .. } => {}
            ChargeOutcome::Declined => return Err(payment_declined()),
            ChargeOutcome::Unavailable => return Err(payment_unavailable()),
        }
    }
    let stored = store_order(
        state, member, order_id, &lines, &seen, &payment, total, &currency, from_cart,
    )
    .await;
    let err = match stored {
        Ok(order) => return Ok(order),
        Err(err) => err,
    };
    if matches!(payment, Payment::Card { .. }) {
        // A commit whose answer was lost may still have committed: then the order stands, and so does its charge.
        if committed(state, order_id).await {
            tracing::warn!(order = %order_id, "the order committed although its commit failed to answer");
            let client = state.db.get().await?;
            let owner = AuthMember {
                id: member,
                role: crate::auth::Role::Customer,
            };
            return load_order(&client, &owner, order_id).await;
        }
        // Nothing of the order was committed, so nothing was sold: the charge goes back.
        tracing::info!(order = %order_id, code = err.code(), "order not stored; refunding its card charge");
        gateway.refund(order_id).await;
    }
    Err(err)
}

/// Whether the order is stored. A failed look counts as not stored: the transaction most likely never committed.
async fn committed(state: &AppState, order_id: Uuid) -> bool {
    let Ok(client) = state.db.get().await else {
        return false;
    };
    client
        .query_opt("SELECT 1 FROM orders WHERE id = $1", &[&order_id])
        .await
        .is_ok_and(|row| row.is_some())
}

/// The transaction of an order. `seen` is the first look at the products; if anything the charge was computed
/// from changed since, the order is refused rather than sold at another price.
#[allow(clippy::too_many_arguments)]
#[allow(
    clippy::too_many_lines,
    reason = "one order's transaction in its lock order (products in id order, then the balance), kept in one place"
)]
async fn store_order(
    state: &AppState,
    member: Uuid,
    order_id: Uuid,
    lines: &[(Uuid, i32)],
    seen: &BTreeMap<Uuid, Shelf>,
    payment: &Payment,
    total: i64,
    currency: &str,
    from_cart: bool,
) -> Result<Order, ApiError> {
    let ids: Vec<Uuid> = lines.iter().map(|(product, _)| *product).collect();
    let mut client = state.db.get().await?;
    let tx = client.transaction().await?;
    let locked = read_shelves(&tx, &ids, true).await?;
    let (locked_total, _) = check_shelves(lines, &locked, payment)?;
    let changed = locked.iter().any(|(id, shelf)| {
        seen.get(id)
            .is_none_or(|before| before.price != shelf.price || before.currency != shelf.currency)
    });
    if changed || locked_total != total {
        return Err(ApiError::conflict(
            "price_changed",
            "a price changed while ordering; nothing was taken, order again",
        ));
    }
    check_stores_open(&locked)?;
    check_stock(lines, &locked)?;

    let quantities: Vec<i64> = lines.iter().map(|(_, q)| i64::from(*q)).collect();
    let taken = tx
        .execute(
            "UPDATE products SET stock = products.stock - t.quantity, updated_at = now()
             FROM UNNEST($1::uuid[], $2::bigint[]) AS t (id, quantity)
             WHERE products.id = t.id AND products.stock >= t.quantity",
            &[&ids, &quantities],
        )
        .await?;
    // Under the row locks the check above cannot be outrun; the conditional UPDATE asserts it again.
    if taken != ids.len() as u64 {
        return Err(ApiError::internal(anyhow::anyhow!(
            "stock changed under the row locks of order {order_id}"
        )));
    }

    let order_row = tx
        .query_one(
            "INSERT INTO orders (id, member_id, total, currency, payment_method, created_at, paid_at)
             VALUES ($1, $2, $3, $4, $5, now(), now())
             RETURNING created_at, paid_at",
            &[&order_id, &member, &total, &currency, &payment.method()],
        )
        .await?;
    let paid_at: DateTime<Utc> = order_row.get(1);
    let items: Vec<OrderItem> = lines
        .iter()
        .map(|(product, quantity)| {
            let shelf = &locked[product];
            OrderItem {
                product_id: *product,
                seller_id: shelf.seller_id,
                quantity: *quantity,
                unit_price: shelf.price,
                subtotal: shelf.price * i64::from(*quantity),
            }
        })
        .collect();
    let sellers: Vec<Uuid> = items.iter().map(|item| item.seller_id).collect();
    let item_quantities: Vec<i32> = items.iter().map(|item| item.quantity).collect();
    let prices: Vec<i64> = items.iter().map(|item| item.unit_price).collect();
    let subtotals: Vec<i64> = items.iter().map(|item| item.subtotal).collect();
    tx.execute(
        "INSERT INTO order_items (order_id, product_id, seller_id, quantity, unit_price, subtotal, currency, paid_at)
         SELECT $1, product_id, seller_id, quantity, unit_price, subtotal, $7, $8
         FROM UNNEST($2::uuid[], $3::uuid[], $4::int[], $5::bigint[], $6::bigint[])
              AS t (product_id, seller_id, quantity, unit_price, subtotal)",
        &[
            &order_id,
            &ids,
            &sellers,
            &item_quantities,
            &prices,
            &subtotals,
            &currency,
            &paid_at,
        ],
    )
    .await?;

    if *payment == Payment::Points && total > 0 {
        let debited = move_balance(
            &tx,
            Movement {
                id: Uuid::now_v7(),
                member,
                kind: EntryKind::Order,
                amount: -total,
                order_id: Some(order_id),
                refund_id: None,
                subscription_charge_id: None,
            },
        )
        .await?;
        if debited.is_none() {
            return Err(insufficient_balance());
        }
    }
    if from_cart {
        tx.execute(
            "DELETE FROM cart_items WHERE member_id = $1 AND product_id = ANY($2)",
            &[&member, &ids],
        )
        .await?;
    }
    tx.commit().await?;
    Ok(Order {
        id: order_id,
        member_id: member,
        status: "paid",
        items,
        total,
        currency: currency.to_owned(),
        payment_method: payment.method().to_owned(),
        created_at: order_row.get(0),
        paid_at,
    })
}

/// The member's cart as order lines; 422 when it is empty.
async fn cart_lines(state: &AppState, member: Uuid) -> Result<Lines, ApiError> {
    let client = state.db.get().await?;
    let rows = client
        .query(
            "SELECT product_id, quantity FROM cart_items WHERE member_id = $1 ORDER BY product_id",
            &[&member],
        )
        .await?;
    if rows.is_empty() {
        return Err(ApiError::invalid(
            "items",
            "the cart is empty; give items or fill the cart",
        ));
    }
    Ok(rows.iter().map(|row| (row.get(0), row.get(1))).collect())
}

/// The live products among `ids`; with `lock`, their rows locked in ascending id order.
async fn read_shelves(
    client: &impl GenericClient,
    ids: &[Uuid],
    lock: bool,
) -> Result<BTreeMap<Uuid, Shelf>, ApiError> {
    let lock = if lock { " FOR UPDATE OF products" } else { "" };
    let rows = client
        .query(
            &format!(
                "SELECT {SHELF_COLUMNS}, {IN_SUSPENDED_STORE} FROM products
                 WHERE id = ANY($1) AND deleted_at IS NULL
                 ORDER BY id{lock}"
            ),
            &[&ids],
        )
        .await?;
    rows.iter()
        .map(|row| Shelf::from_row(row).map(|shelf| (shelf.id, shelf)))
        .collect()
}

/// 422 for unknown or non-regular items, mixed currencies, or points for a currency other than the points';
/// otherwise the total and its currency.
fn check_shelves(
    lines: &[(Uuid, i32)],
    shelves: &BTreeMap<Uuid, Shelf>,
    payment: &Payment,
) -> Result<(i64, String), ApiError> {
    let mut fields = Fields::default();
    let mut currencies = std::collections::BTreeSet::new();
    let mut total: i64 = 0;
    for (index, (product, quantity)) in lines.iter().enumerate() {
        let field = format!("items[{index}].product_id");
        match shelves.get(product) {
            None => {
                fields.add(&field, "no such product");
            }
            Some(shelf) if shelf.kind != ProductKind::Regular => {
                fields.add(
                    &field,
                    "not a regular product; preorder products sell in drops",
                );
            }
            Some(shelf) => {
                currencies.insert(shelf.currency.clone());
                // Prices are at most 10^12 and quantities at most 99 over at most 100 items: no overflow.
                total = total.saturating_add(shelf.price.saturating_mul(i64::from(*quantity)));
            }
        }
    }
    if currencies.len() > 1 {
        fields.add("items", "mixed currencies; order each currency separately");
    }
    let currency = currencies
        .into_iter()
        .next()
        .unwrap_or_else(|| POINTS_CURRENCY.to_owned());
    if *payment == Payment::Points && currency != POINTS_CURRENCY {
        fields.add("payment.method", "points pay for KRW products only");
    }
    fields.finish()?;
    Ok((total, currency))
}

/// 409 `store_suspended` naming every product whose store is suspended (API.md, "Stores"). Read with the shelf, in
/// the first look and again under the row locks; a suspension that commits after the locks were taken lets that
/// one order through, as an order that came a moment earlier would.
fn check_stores_open(shelves: &BTreeMap<Uuid, Shelf>) -> Result<(), ApiError> {
    let suspended: BTreeMap<String, String> = shelves
        .values()
        .filter(|shelf| shelf.store_suspended)
        .map(|shelf| (shelf.id.to_string(), "its store is suspended".to_owned()))
        .collect();
    if suspended.is_empty() {
        return Ok(());
    }
    Err(crate::catalog::products::store_suspended().with_fields(suspended))
}

/// 409 `out_of_stock` naming every product whose shelf holds fewer units than ordered.
fn check_stock(lines: &[(Uuid, i32)], shelves: &BTreeMap<Uuid, Shelf>) -> Result<(), ApiError> {
    let short: BTreeMap<String, String> = lines
        .iter()
        .filter_map(|(product, quantity)| {
            let stock = shelves.get(product)?.stock;
            (stock < i64::from(*quantity))
                .then(|| (product.to_string(), format!("{stock} left on the shelf")))
        })
        .collect();
    if short.is_empty() {
        return Ok(());
    }
    Err(ApiError::conflict(
        "out_of_stock",
        "the shelf holds fewer units than ordered; nothing was taken",
    )
    .with_fields(short))
}

const ORDER_COLUMNS: &str = "id, member_id, total, currency, payment_method, created_at, paid_at";

/// Orders by id, with their items, in the order of `rows`.
async fn orders_from_rows(
    client: &impl GenericClient,
    rows: &[Row],
) -> Result<Vec<Order>, ApiError> {
    let ids: Vec<Uuid> = rows.iter().map(|row| row.get(0)).collect();
    let item_rows = client
        .query(
            "SELECT order_id, product_id, seller_id, quantity, unit_price, subtotal FROM order_items
             WHERE order_id = ANY($1) ORDER BY order_id, product_id",
            &[&ids],
        )
        .await?;
    let mut items: BTreeMap<Uuid, Vec<OrderItem>> = BTreeMap::new();
    for row in &item_rows {
        items.entry(row.get(0)).or_default().push(OrderItem {
            product_id: row.get(1),
            seller_id: row.get(2),
            quantity: row.get(3),
            unit_price: row.get(4),
            subtotal: row.get(5),
        });
    }
    Ok(rows
        .iter()
        .map(|row| {
            let id: Uuid = row.get(0);
            Order {
                id,
                member_id: row.get(1),
                status: "paid",
                items: items.remove(&id).unwrap_or_default(),
                total: row.get(2),
                currency: row.get(3),
                payment_method: row.get(4),
                created_at: row.get(5),
                paid_at: row.get(6),
            }
        })
        .collect())
}

/// One order, for the buyer, a seller of one of its items, or an admin; 403 for anyone else.
pub async fn load_order(
    client: &impl GenericClient,
    caller: &AuthMember,
    id: Uuid,
) -> Result<Order, ApiError> {
    let rows = client
        .query(
            &format!("SELECT {ORDER_COLUMNS} FROM orders WHERE id = $1"),
            &[&id],
        )
        .await?;
    let order = orders_from_rows(client, &rows)
        .await?
        .pop()
        .ok_or_else(order_not_found)?;
    let sells_in_it = order.items.iter().any(|item| item.seller_id == caller.id);
    if order.member_id != caller.id && !sells_in_it && !caller.is_admin() {
        return Err(ApiError::forbidden());
    }
    Ok(order)
}

pub(crate) fn order_not_found() -> ApiError {
    ApiError::not_found("order_not_found").with_message("no such order")
}

/// One order (its buyer, a seller of one of its items, admin).
#[utoipa::path(get, path = "/api/v1/orders/{id}", tag = "shop", security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "The order")),
    responses((status = 200, description = "The order", body = Order),
        (status = 403, description = "`forbidden`: neither its buyer nor one of its sellers", body = crate::error::ErrorBody),
        (status = 404, description = "`order_not_found`", body = crate::error::ErrorBody)))]
pub async fn get_order(
    State(state): State<AppState>,
    member: AuthMember,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<Json<Order>, ApiError> {
    let client = state.db.get().await?;
    load_order(&client, &member, id).await.map(Json)
}

/// `GET /orders`: mine, newest first.
#[utoipa::path(get, path = "/api/v1/orders", tag = "shop", security(("bearer" = [])),
    params(crate::pagination::PageParams),
    responses((status = 200, description = "A page of my orders, newest first", body = Page<Order>)))]
pub async fn list_orders(
    State(state): State<AppState>,
    member: AuthMember,
    ApiQuery(page): ApiQuery<PageQuery>,
) -> Result<Json<Page<Order>>, ApiError> {
    let limit = page.limit()?;
    let after: Option<Uuid> = page.after()?;
    let client = state.db.get().await?;
    let rows = client
        .query(
            &format!(
                "SELECT {ORDER_COLUMNS} FROM orders
                 WHERE member_id = $1 AND ($2::uuid IS NULL OR id < $2)
                 ORDER BY id DESC LIMIT $3"
            ),
            &[&member.id, &after, &(limit + 1)],
        )
        .await?;
    let orders = orders_from_rows(&client, &rows).await?;
    Ok(Json(Page::from_rows(orders, limit, |order| order.id)))
}
