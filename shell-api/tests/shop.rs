//! The regular shop against real Postgres, in-process through `app()`: shelf stock never oversold under
//! concurrent orders, orders all or nothing (a card charge refunded when a later step fails), points balances
//! equal to their ledger and never negative, one decision per refund, idempotent orders, settlement figures that
//! a rerun rewrites, carts, search terms, and bad input answered with its status and code (never a 500).
#![allow(
    clippy::too_many_lines,
    reason = "each test is one scenario read top to bottom: its setup, the fault or load, and every check"
)]
// Helpers outside `#[test]` functions unwrap too: a panic there is a failed test, which is what we want.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use common::{TestApp, TestMember, TestResponse};
use serde_json::{json, Value};
use shell_api::auth::Role;
use shell_api::config::EngineArgs;
use uuid::Uuid;

/// Asserts the status, showing the body when it differs.
#[track_caller]
fn expect(response: &TestResponse, status: StatusCode) {
    assert_eq!(response.status, status, "body: {}", response.body);
}

/// Asserts status and error code.
#[track_caller]
fn refused(response: &TestResponse, status: StatusCode, code: &str) {
    assert_eq!(response.status, status, "body: {}", response.body);
    assert_eq!(response.code(), code, "body: {}", response.body);
}

/// A product created through the API by `seller`; `extra` fields are merged over a regular product's.
async fn product(app: &TestApp, seller: &TestMember, price: i64, stock: i64, extra: Value) -> Uuid {
    let mut body =
        json!({ "name": "Shelf item", "price": price, "kind": "regular", "stock": stock });
    body.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    let response = app
        .call("POST", "/api/v1/products", Some(&seller.token), Some(body))
        .await;
    expect(&response, StatusCode::CREATED);
    response.body["id"].as_str().unwrap().parse().unwrap()
}

/// Charges `amount` points to `member` by card.
async fn charge(app: &TestApp, member: &TestMember, amount: i64) -> TestResponse {
    app.call(
        "POST",
        "/api/v1/members/me/balance/charges",
        Some(&member.token),
        Some(json!({ "amount": amount, "payment_token": "tok_ok" })),
    )
    .await
}

async fn funded(app: &TestApp, amount: i64) -> TestMember {
    let member = app.member(Role::Customer).await;
    expect(&charge(app, &member, amount).await, StatusCode::CREATED);
    member
}

async fn order(
    app: &TestApp,
    member: &TestMember,
    items: &[(Uuid, i64)],
    payment: Value,
) -> TestResponse {
    let items: Vec<Value> = items
        .iter()
        .map(|(product, quantity)| json!({ "product_id": product, "quantity": quantity }))
        .collect();
    app.call(
        "POST",
        "/api/v1/orders",
        Some(&member.token),
        Some(json!({ "items": items, "payment": payment })),
    )
    .await
}

fn points() -> Value {
    json!({ "method": "points" })
}

fn card(token: &str) -> Value {
    json!({ "method": "card", "payment_token": token })
}

async fn balance(app: &TestApp, member: &TestMember) -> i64 {
    let response = app
        .call(
            "GET",
            "/api/v1/members/me/balance",
            Some(&member.token),
            None,
        )
        .await;
    expect(&response, StatusCode::OK);
    assert_eq!(response.body["currency"], "KRW");
    response.body["balance"].as_i64().unwrap()
}

/// `(balance row, sum of the ledger, lowest balance after any entry)`: the first two must always be equal.
async fn ledger(app: &TestApp, member: &TestMember) -> (i64, i64, i64) {
    let row = app
        .db
        .client()
        .await
        .query_one(
            "SELECT COALESCE((SELECT balance FROM balances WHERE member_id = $1), 0),
                    COALESCE((SELECT sum(amount) FROM balance_entries WHERE member_id = $1), 0)::int8,
                    COALESCE((SELECT min(balance) FROM balance_entries WHERE member_id = $1), 0)",
            &[&member.id],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1), row.get(2))
}

/// `(stock on the shelf, units in orders, units in accepted refunds)` of a product, read in one snapshot.
async fn shelf(app: &TestApp, product: Uuid) -> (i64, i64, i64) {
    let row = app
        .db
        .client()
        .await
        .query_one(
            "SELECT (SELECT stock FROM products WHERE id = $1),
                    COALESCE((SELECT sum(quantity) FROM order_items WHERE product_id = $1), 0)::int8,
                    COALESCE((SELECT sum(ri.quantity) FROM refund_items ri JOIN refunds r ON r.id = ri.refund_id
                              WHERE ri.product_id = $1 AND r.status = 'accepted'), 0)::int8",
            &[&product],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1), row.get(2))
}

async fn count(app: &TestApp, sql: &str) -> i64 {
    app.db
        .client()
        .await
        .query_one(sql, &[])
        .await
        .unwrap()
        .get(0)
}

/// Polls the shelf while orders run: stock never negative, and stock + units sold - units refunded is the
/// starting stock in every snapshot. `stop` ends it; awaiting the handle fails the test if a snapshot broke.
struct ShelfWatch {
    stop: Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<usize>,
}

impl ShelfWatch {
    fn start(app: &Arc<TestApp>, product: Uuid, start: i64) -> Self {
        let app = Arc::clone(app);
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopped = Arc::clone(&stop);
        let task = tokio::spawn(async move {
            let mut reads = 0;
            while !stopped.load(std::sync::atomic::Ordering::Relaxed) {
                let (stock, sold, refunded) = shelf(&app, product).await;
                assert!(stock >= 0, "shelf stock went negative: {stock}");
                assert_eq!(stock + sold - refunded, start, "conservation");
                reads += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            reads
        });
        Self { stop, task }
    }

    async fn finish(self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let reads = self.task.await.unwrap();
        assert!(reads > 0, "the watch read the shelf");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_concurrent_orders_for_ten_units_sell_exactly_ten() {
    let app = Arc::new(TestApp::new().await);
    let seller = app.member(Role::Seller).await;
    let item = product(&app, &seller, 1_000, 10, json!({})).await;
    let mut buyers = Vec::new();
    for _ in 0..50 {
        buyers.push(funded(&app, 5_000).await);
    }
    let watcher = ShelfWatch::start(&app, item, 10);
    let mut tasks = Vec::new();
    for buyer in buyers.clone() {
        let app = Arc::clone(&app);
        tasks.push(tokio::spawn(async move {
            order(&app, &buyer, &[(item, 1)], points()).await
        }));
    }
    let mut sold = 0;
    let mut outcomes = Vec::new();
    for task in tasks {
        let response = task.await.unwrap();
        match response.status {
            StatusCode::CREATED => {
                sold += 1;
                outcomes.push(true);
            }
            _ => {
                refused(&response, StatusCode::CONFLICT, "out_of_stock");
                assert!(
                    response.body["error"]["fields"][item.to_string()].is_string(),
                    "fields name the short product: {}",
                    response.body
                );
                outcomes.push(false);
            }
        }
    }
    watcher.finish().await;
    assert_eq!(sold, 10, "exactly what the shelf held");
    assert_eq!(shelf(&app, item).await, (0, 10, 0));
    for (buyer, won) in buyers.iter().zip(outcomes) {
        let (row, sum, lowest) = ledger(&app, buyer).await;
        assert_eq!(row, sum);
        assert!(lowest >= 0);
        // The refused were charged nothing: their balance is what they charged.
        assert_eq!(row, if won { 4_000 } else { 5_000 });
    }
    assert_eq!(count(&app, "SELECT count(*) FROM orders").await, 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_card_orders_sell_the_shelf_and_refund_every_refused_charge() {
    let app = Arc::new(TestApp::new().await);
    let seller = app.member(Role::Seller).await;
    let item = product(&app, &seller, 2_500, 10, json!({})).await;
    let watcher = ShelfWatch::start(&app, item, 10);
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let app = Arc::clone(&app);
        tasks.push(tokio::spawn(async move {
            let buyer = app.member(Role::Customer).await;
            order(&app, &buyer, &[(item, 1)], card("tok_ok")).await
        }));
    }
    let mut sold = 0;
    for task in tasks {
        let response = task.await.unwrap();
        if response.status == StatusCode::CREATED {
            sold += 1;
        } else {
            refused(&response, StatusCode::CONFLICT, "out_of_stock");
        }
    }
    watcher.finish().await;
    assert_eq!(sold, 10);
    assert_eq!(shelf(&app, item).await, (0, 10, 0));
    // A refused order either was never charged or had its charge refunded: what stays charged is the ten sold.
    let totals = app.gateway.totals();
    assert_eq!(totals.approved - totals.refunds, 10, "{totals:?}");
    assert_eq!(
        totals.approved_amount - totals.refunded_amount,
        10 * 2_500,
        "{totals:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_charges_and_orders_add_up_to_the_ledger() {
    let app = Arc::new(TestApp::new().await);
    let seller = app.member(Role::Seller).await;
    let item = product(&app, &seller, 1_000, 1_000, json!({})).await;
    let buyer = funded(&app, 10_000).await;
    let mut tasks = Vec::new();
    for i in 0..60 {
        let (app, buyer) = (Arc::clone(&app), buyer.clone());
        tasks.push(tokio::spawn(async move {
            if i % 3 == 0 {
                ("charge", charge(&app, &buyer, 1_000).await)
            } else {
                ("order", order(&app, &buyer, &[(item, 1)], points()).await)
            }
        }));
    }
    let (mut charges, mut orders) = (0, 0);
    for task in tasks {
        let (kind, response) = task.await.unwrap();
        match (kind, response.status) {
            ("charge", StatusCode::CREATED) => charges += 1,
            ("order", StatusCode::CREATED) => orders += 1,
            ("order", _) => refused(
                &response,
                StatusCode::PAYMENT_REQUIRED,
                "insufficient_balance",
            ),
            _ => panic!("charge failed: {}", response.body),
        }
    }
    assert_eq!(charges, 20);
    let (row, sum, lowest) = ledger(&app, &buyer).await;
    assert_eq!(row, sum, "balance equals its ledger");
    assert!(lowest >= 0, "never below zero");
    assert_eq!(row, 10_000 + 20 * 1_000 - orders * 1_000);
    assert_eq!(shelf(&app, item).await, (1_000 - orders, orders, 0));

    // An order larger than the balance takes nothing.
    let big = product(&app, &seller, row + 1, 5, json!({})).await;
    let entries = count(&app, "SELECT count(*) FROM balance_entries").await;
    let response = order(&app, &buyer, &[(big, 1)], points()).await;
    refused(
        &response,
        StatusCode::PAYMENT_REQUIRED,
        "insufficient_balance",
    );
    assert_eq!(balance(&app, &buyer).await, row);
    assert_eq!(shelf(&app, big).await, (5, 0, 0));
    assert_eq!(
        count(&app, "SELECT count(*) FROM balance_entries").await,
        entries
    );

    // The history is the ledger, newest first, each entry with the balance after it.
    let history = app
        .call(
            "GET",
            "/api/v1/members/me/balance/history?limit=100",
            Some(&buyer.token),
            None,
        )
        .await;
    expect(&history, StatusCode::OK);
    let items = history.body["items"].as_array().unwrap();
    assert_eq!(items[0]["balance"].as_i64().unwrap(), row);
    let total: i64 = items.iter().map(|e| e["amount"].as_i64().unwrap()).sum();
    assert_eq!(total, row);
    assert!(items
        .iter()
        .any(|e| e["kind"] == "order" && e["order_id"].is_string()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn multi_item_orders_in_opposite_orders_neither_deadlock_nor_split() {
    let app = Arc::new(TestApp::new().await);
    let seller = app.member(Role::Seller).await;
    let a = product(&app, &seller, 100, 25, json!({})).await;
    let b = product(&app, &seller, 100, 25, json!({})).await;
    let mut tasks = Vec::new();
    for i in 0..40 {
        let app = Arc::clone(&app);
        tasks.push(tokio::spawn(async move {
            let buyer = funded(&app, 1_000).await;
            let items = if i % 2 == 0 {
                [(a, 1), (b, 1)]
            } else {
                [(b, 1), (a, 1)]
            };
            order(&app, &buyer, &items, points()).await
        }));
    }
    let run = async {
        let mut sold = 0;
        for task in tasks {
            let response = task.await.unwrap();
            if response.status == StatusCode::CREATED {
                assert_eq!(response.body["items"].as_array().unwrap().len(), 2);
                sold += 1;
            } else {
                // Never a deadlock victim (500): only a clean refusal.
                refused(&response, StatusCode::CONFLICT, "out_of_stock");
            }
        }
        sold
    };
    let sold = tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .expect("orders finished (no deadlock)");
    assert_eq!(sold, 25);
    assert_eq!(shelf(&app, a).await, (0, 25, 0));
    assert_eq!(shelf(&app, b).await, (0, 25, 0));
    // No partial order: every order has both items.
    assert_eq!(
        count(
            &app,
            "SELECT count(*) FROM (SELECT order_id FROM order_items GROUP BY order_id HAVING count(*) <> 2) o"
        )
        .await,
        0
    );
}

/// A buyer with a paid points order of `quantity` units of a fresh product of `seller`; returns the order.
async fn paid_order(
    app: &TestApp,
    seller: &TestMember,
    quantity: i64,
    payment: Value,
) -> (TestMember, Uuid, Value) {
    let item = product(app, seller, 1_000, 10, json!({})).await;
    let buyer = funded(app, 10_000).await;
    let response = order(app, &buyer, &[(item, quantity)], payment).await;
    expect(&response, StatusCode::CREATED);
    (buyer, item, response.body)
}

async fn request_refund(
    app: &TestApp,
    buyer: &TestMember,
    order: &Value,
    items: Value,
) -> TestResponse {
    let path = format!("/api/v1/orders/{}/refunds", order["id"].as_str().unwrap());
    app.call(
        "POST",
        &path,
        Some(&buyer.token),
        Some(json!({ "items": items, "reason": "arrived damaged" })),
    )
    .await
}

async fn decide(app: &TestApp, seller: &TestMember, refund: &str, decision: &str) -> TestResponse {
    let path = format!("/api/v1/refunds/{refund}/{decision}");
    let body = (decision == "reject").then(|| json!({ "reason": "used" }));
    let body = body.unwrap_or_else(|| json!({}));
    app.call("POST", &path, Some(&seller.token), Some(body))
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_refund_is_decided_once_and_paid_once() {
    let app = Arc::new(TestApp::new().await);
    let seller = app.member(Role::Seller).await;

    // Accepting twice: the same 200, one refund, units and points back once.
    let (buyer, item, placed) = paid_order(&app, &seller, 3, points()).await;
    let refund = request_refund(
        &app,
        &buyer,
        &placed,
        json!([{ "product_id": item, "quantity": 2 }]),
    )
    .await;
    expect(&refund, StatusCode::CREATED);
    assert_eq!(refund.body["status"], "requested");
    assert_eq!(refund.body["amount"], 2_000);
    let id = refund.body["id"].as_str().unwrap().to_owned();
    let first = decide(&app, &seller, &id, "accept").await;
    expect(&first, StatusCode::OK);
    assert_eq!(first.body["status"], "accepted");
    let again = decide(&app, &seller, &id, "accept").await;
    expect(&again, StatusCode::OK);
    assert_eq!(
        again.body, first.body,
        "accepting again answers the same refund"
    );
    refused(
        &decide(&app, &seller, &id, "reject").await,
        StatusCode::CONFLICT,
        "already_decided",
    );
    assert_eq!(shelf(&app, item).await, (9, 3, 2));
    assert_eq!(balance(&app, &buyer).await, 10_000 - 3_000 + 2_000);
    // The buyer is told once, however often the decision is asked for.
    let told = app
        .call(
            "GET",
            "/api/v1/members/me/notifications",
            Some(&buyer.token),
            None,
        )
        .await;
    expect(&told, StatusCode::OK);
    let decided: Vec<&serde_json::Value> = told.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| n["kind"] == "refund_decided")
        .collect();
    assert_eq!(decided.len(), 1, "{:?}", told.body);
    assert_eq!(decided[0]["refund_id"], id.as_str());
    let (row, sum, _) = ledger(&app, &buyer).await;
    assert_eq!(row, sum);
    // One more unit may be asked back, not two.
    refused(
        &request_refund(
            &app,
            &buyer,
            &placed,
            json!([{ "product_id": item, "quantity": 2 }]),
        )
        .await,
        StatusCode::CONFLICT,
        "refund_exceeds_order",
    );

    // Accepts and rejects at once: one decision, everything moved once or not at all.
    for round in 0..3 {
        let (buyer, item, placed) = paid_order(&app, &seller, 2, points()).await;
        let refund = request_refund(
            &app,
            &buyer,
            &placed,
            json!([{ "product_id": item, "quantity": 2 }]),
        )
        .await;
        expect(&refund, StatusCode::CREATED);
        let id = refund.body["id"].as_str().unwrap().to_owned();
        let mut tasks = Vec::new();
        for i in 0..10 {
            let (app, seller, id) = (Arc::clone(&app), seller.clone(), id.clone());
            let decision = if (i + round) % 2 == 0 {
                "accept"
            } else {
                "reject"
            };
            tasks.push(tokio::spawn(async move {
                (decision, decide(&app, &seller, &id, decision).await)
            }));
        }
        let mut winners = std::collections::BTreeSet::new();
        for task in tasks {
            let (decision, response) = task.await.unwrap();
            if response.status == StatusCode::OK {
                winners.insert(decision);
                assert_eq!(response.body["status"], format!("{decision}ed"));
            } else {
                refused(&response, StatusCode::CONFLICT, "already_decided");
            }
        }
        assert_eq!(winners.len(), 1, "one decision: {winners:?}");
        assert_eq!(
            count(
                &app,
                &format!(
                    "SELECT count(*) FROM notifications WHERE kind = 'refund_decided' AND refund_id = '{id}'"
                )
            )
            .await,
            1,
            "one notification of the one decision"
        );
        let accepted = winners.contains("accept");
        assert_eq!(
            shelf(&app, item).await,
            (
                if accepted { 10 } else { 8 },
                2,
                if accepted { 2 } else { 0 }
            )
        );
        assert_eq!(
            balance(&app, &buyer).await,
            if accepted { 10_000 } else { 8_000 }
        );
        assert_eq!(
            count(
                &app,
                &format!("SELECT count(*) FROM balance_entries WHERE refund_id = '{id}'")
            )
            .await,
            i64::from(accepted)
        );
    }

    // A card order's refund is paid through the gateway once, however many accepts race.
    let (buyer, item, placed) = paid_order(&app, &seller, 1, card("tok_ok")).await;
    let order_id: Uuid = placed["id"].as_str().unwrap().parse().unwrap();
    let refund = request_refund(
        &app,
        &buyer,
        &placed,
        json!([{ "product_id": item, "quantity": 1 }]),
    )
    .await;
    let id = refund.body["id"].as_str().unwrap().to_owned();
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (app, seller, id) = (Arc::clone(&app), seller.clone(), id.clone());
        tasks.push(tokio::spawn(async move {
            decide(&app, &seller, &id, "accept").await
        }));
    }
    for task in tasks {
        expect(&task.await.unwrap(), StatusCode::OK);
    }
    let history = app.gateway.history(order_id);
    assert_eq!((history.approved, history.refunds), (1, 1), "{history:?}");
    assert_eq!(history.refunded_amount, 1_000);
    assert_eq!(shelf(&app, item).await, (10, 1, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_order_retried_with_the_same_key_is_placed_and_charged_once() {
    let app = Arc::new(TestApp::new().await);
    let seller = app.member(Role::Seller).await;
    let item = product(&app, &seller, 700, 10, json!({})).await;
    let buyer = app.member(Role::Customer).await;
    let body = json!({
        "items": [{ "product_id": item, "quantity": 2 }],
        "payment": card("tok_ok"),
    });
    let mut tasks = Vec::new();
    for _ in 0..10 {
        let (app, token, body) = (Arc::clone(&app), buyer.token.clone(), body.clone());
        tasks.push(tokio::spawn(async move {
            app.call_with(
                "POST",
                "/api/v1/orders",
                &token,
                &[("idempotency-key", "order-7")],
                Some(body),
            )
            .await
        }));
    }
    let mut bodies = Vec::new();
    for task in tasks {
        let response = task.await.unwrap();
        expect(&response, StatusCode::CREATED);
        bodies.push(response.body);
    }
    let later = app
        .call_with(
            "POST",
            "/api/v1/orders",
            &buyer.token,
            &[("idempotency-key", "order-7")],
            Some(body.clone()),
        )
        .await;
    bodies.push(later.body);
    assert!(
        bodies.windows(2).all(|pair| pair[0] == pair[1]),
        "the same body every time"
    );
    assert_eq!(count(&app, "SELECT count(*) FROM orders").await, 1);
    assert_eq!(shelf(&app, item).await, (8, 2, 0));
    let order_id: Uuid = bodies[0]["id"].as_str().unwrap().parse().unwrap();
    assert_eq!(app.gateway.history(order_id).approved, 1);
    assert_eq!(app.gateway.totals().approved, 1, "one charge in all");

    // Point charges replay the same way.
    let charge_body = json!({ "amount": 5_000, "payment_token": "tok_ok" });
    let path = "/api/v1/members/me/balance/charges";
    let first = app
        .call_with(
            "POST",
            path,
            &buyer.token,
            &[("idempotency-key", "top-up")],
            Some(charge_body.clone()),
        )
        .await;
    let second = app
        .call_with(
            "POST",
            path,
            &buyer.token,
            &[("idempotency-key", "top-up")],
            Some(charge_body),
        )
        .await;
    expect(&first, StatusCode::CREATED);
    assert_eq!(first.body, second.body);
    assert_eq!(balance(&app, &buyer).await, 5_000);
    assert_eq!(app.gateway.totals().approved, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_card_charge_is_refunded_when_the_stock_is_gone_by_the_commit() {
    // The gateway takes 1.5 s per call, so another order can take the last unit after this order's first look at
    // the shelf and before its transaction: the order then fails after its card was charged.
    let args = EngineArgs {
        payment_latency_ms: 1_500,
        ..EngineArgs::default()
    };
    let app = Arc::new(TestApp::with_engine_args(args).await);
    let seller = app.member(Role::Seller).await;
    let item = product(&app, &seller, 3_000, 1, json!({})).await;
    let rival = funded(&app, 10_000).await;
    let before = app.gateway.totals();
    let buyer = app.member(Role::Customer).await;
    let slow = {
        let (app, buyer) = (Arc::clone(&app), buyer.clone());
        tokio::spawn(async move { order(&app, &buyer, &[(item, 1)], card("tok_ok")).await })
    };
    tokio::time::sleep(Duration::from_millis(400)).await;
    expect(
        &order(&app, &rival, &[(item, 1)], points()).await,
        StatusCode::CREATED,
    );
    let response = slow.await.unwrap();
    refused(&response, StatusCode::CONFLICT, "out_of_stock");
    let after = app.gateway.totals();
    assert_eq!(after.approved - before.approved, 1, "the card was charged");
    assert_eq!(after.refunds - before.refunds, 1, "and refunded");
    assert_eq!(after.refunded_amount - before.refunded_amount, 3_000);
    assert_eq!(shelf(&app, item).await, (0, 1, 0));
    let orders = app
        .call("GET", "/api/v1/orders", Some(&buyer.token), None)
        .await;
    assert_eq!(
        orders.body["items"].as_array().unwrap().len(),
        0,
        "nothing left behind"
    );
}

/// Every settlement row: `(seller, day, currency, [orders, gross, refunds, fee, net])`.
async fn settlement_rows(app: &TestApp) -> Vec<(Uuid, chrono::NaiveDate, String, [i64; 5])> {
    let client = app.db.client().await;
    let rows = client
        .query(
            "SELECT seller_id, day, currency, orders, gross, refunds, fee, net FROM settlements
             ORDER BY seller_id, day, currency",
            &[],
        )
        .await
        .unwrap();
    rows.iter()
        .map(|row| {
            let figures = [
                i64::from(row.get::<_, i32>(3)),
                row.get(4),
                row.get(5),
                row.get(6),
                row.get(7),
            ];
            (row.get(0), row.get(1), row.get(2), figures)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settlement_rewrites_the_same_rows_from_sales_refunds_and_fee() {
    let app = TestApp::new().await;
    let seller = app.member(Role::Seller).await;
    // A shelf order of 3 x 1000, one unit refunded and accepted.
    let (buyer, item, placed) = paid_order(&app, &seller, 3, points()).await;
    let refund = request_refund(
        &app,
        &buyer,
        &placed,
        json!([{ "product_id": item, "quantity": 1 }]),
    )
    .await;
    expect(
        &decide(&app, &seller, refund.body["id"].as_str().unwrap(), "accept").await,
        StatusCode::OK,
    );
    // A drop purchase of 5000 of the same seller.
    let preorder = app.product(&seller, 5_001).await;
    let drop = app
        .drop(
            &seller,
            json!({
                "product_id": preorder,
                "stock": 5,
                "opens_at": (chrono::Utc::now() - chrono::Duration::seconds(1)).to_rfc3339(),
            }),
        )
        .await;
    let hold = common::reserve(&app, &buyer, &drop, 1).await;
    expect(&hold, StatusCode::CREATED);
    expect(
        &common::pay(&app, &buyer, hold.body["id"].as_str().unwrap(), "tok_ok").await,
        StatusCode::OK,
    );
    // Someone else's sale is not this seller's.
    let other = app.member(Role::Seller).await;
    paid_order(&app, &other, 1, points()).await;

    let sales = app
        .call("GET", "/api/v1/sellers/me/sales", Some(&seller.token), None)
        .await;
    expect(&sales, StatusCode::OK);
    let kinds: Vec<&str> = sales.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|sale| sale["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["drop", "order"], "{}", sales.body);
    assert_eq!(sales.body["items"][0]["amount"], 5_001);
    // Paged by keyset: one at a time, the same two sales.
    let first = app
        .call(
            "GET",
            "/api/v1/sellers/me/sales?limit=1",
            Some(&seller.token),
            None,
        )
        .await;
    assert_eq!(first.body["items"][0], sales.body["items"][0]);
    let cursor = first.body["next_cursor"].as_str().unwrap();
    let second = app
        .call(
            "GET",
            &format!("/api/v1/sellers/me/sales?limit=1&cursor={cursor}"),
            Some(&seller.token),
            None,
        )
        .await;
    assert_eq!(second.body["items"][0], sales.body["items"][1]);
    assert!(second.body["next_cursor"].is_null());
    refused(
        &app.call(
            "GET",
            "/api/v1/sellers/me/sales?from=2020-01-02T00:00:00Z&to=2020-01-01T00:00:00Z",
            Some(&seller.token),
            None,
        )
        .await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "validation",
    );
    // Bounds: nothing sold before yesterday.
    let old = app
        .call(
            "GET",
            "/api/v1/sellers/me/sales?from=2020-01-01T00:00:00Z&to=2020-01-02T00:00:00Z",
            Some(&seller.token),
            None,
        )
        .await;
    assert_eq!(old.body["items"].as_array().unwrap().len(), 0);

    let today = chrono::Utc::now().date_naive();
    let client = app.db.client().await;
    shell_api::shop::settlement::settle(&client, today, 300)
        .await
        .unwrap();
    let first = settlement_rows(&app).await;
    // Run again through the binary, as operators do: the same rows, not added to.
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_flashsale"))
        .args(["settle", "--date", &today.to_string()])
        .env("DATABASE_URL", &app.db.url)
        .env("SETTLEMENT_FEE_BPS", "300")
        .status()
        .unwrap();
    assert!(status.success());
    assert_eq!(
        settlement_rows(&app).await,
        first,
        "a rerun rewrites the same rows"
    );
    assert_eq!(first.len(), 2, "one row per seller");
    let mine = first.iter().find(|row| row.0 == seller.id).unwrap();
    // gross 3000 + 5001; refunds 1000; fee 3% of 8001 = 240.03, rounded down; net 6761; one order and one drop
    // purchase.
    assert_eq!(mine.3, [2, 8_001, 1_000, 240, 6_761]);

    let listed = app
        .call(
            "GET",
            "/api/v1/sellers/me/settlements",
            Some(&seller.token),
            None,
        )
        .await;
    expect(&listed, StatusCode::OK);
    assert_eq!(
        listed.body["items"][0],
        json!({ "date": today.to_string(), "currency": "KRW", "orders": 2, "gross": 8001,
                "refunds": 1000, "fee": 240, "net": 6761 })
    );

    let dashboard = app
        .call(
            "GET",
            "/api/v1/sellers/me/dashboard",
            Some(&seller.token),
            None,
        )
        .await;
    expect(&dashboard, StatusCode::OK);
    assert_eq!(dashboard.body["revenue"]["today"], 8_001);
    assert_eq!(dashboard.body["orders_today"], 2);
    assert_eq!(dashboard.body["refunds_pending"], 0);
    assert_eq!(dashboard.body["drops"][0]["sold"], 1);
    let drop_id = dashboard.body["drops"][0]["drop_id"].as_str().unwrap();
    assert_eq!(
        dashboard.body["drops"][0]["report_url"],
        format!("/live/drops/{drop_id}/report")
    );
    assert_eq!(dashboard.body["top_products"][0]["units"], 3);
    let customer = app.member(Role::Customer).await;
    refused(
        &app.call(
            "GET",
            "/api/v1/sellers/me/dashboard",
            Some(&customer.token),
            None,
        )
        .await,
        StatusCode::FORBIDDEN,
        "forbidden",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_orders_are_refused_with_their_code_and_leave_nothing() {
    let app = TestApp::new().await;
    let seller = app.member(Role::Seller).await;
    let item = product(&app, &seller, 1_000, 5, json!({})).await;
    let dollars = product(&app, &seller, 10, 5, json!({ "currency": "USD" })).await;
    let preorder = app.product(&seller, 1_000).await;
    let buyer = funded(&app, 50_000).await;
    let unknown = Uuid::now_v7();
    let v = StatusCode::UNPROCESSABLE_ENTITY;

    refused(&order(&app, &buyer, &[], points()).await, v, "validation");
    for quantity in [0, -1, 100] {
        refused(
            &order(&app, &buyer, &[(item, quantity)], points()).await,
            v,
            "validation",
        );
    }
    refused(
        &order(&app, &buyer, &[(unknown, 1)], points()).await,
        v,
        "validation",
    );
    refused(
        &order(&app, &buyer, &[(preorder, 1)], points()).await,
        v,
        "validation",
    );
    refused(
        &order(&app, &buyer, &[(item, 1), (dollars, 1)], card("tok_ok")).await,
        v,
        "validation",
    );
    refused(
        &order(&app, &buyer, &[(dollars, 1)], points()).await,
        v,
        "validation",
    );
    refused(
        &order(&app, &buyer, &[(item, 1), (item, 1)], points()).await,
        v,
        "validation",
    );
    refused(
        &order(&app, &buyer, &[(item, 1)], json!({ "method": "cash" })).await,
        v,
        "validation",
    );
    refused(
        &order(&app, &buyer, &[(item, 1)], json!({ "method": "card" })).await,
        v,
        "validation",
    );
    refused(
        &order(&app, &buyer, &[(item, 6)], points()).await,
        StatusCode::CONFLICT,
        "out_of_stock",
    );
    let no_payment = app
        .call(
            "POST",
            "/api/v1/orders",
            Some(&buyer.token),
            Some(json!({ "items": [{ "product_id": item, "quantity": 1 }] })),
        )
        .await;
    refused(&no_payment, v, "validation");
    let empty_cart = app
        .call(
            "POST",
            "/api/v1/orders",
            Some(&buyer.token),
            Some(json!({ "payment": points() })),
        )
        .await;
    refused(&empty_cart, v, "validation");
    refused(
        &order(&app, &buyer, &[(item, 1)], card("tok_declined")).await,
        StatusCode::PAYMENT_REQUIRED,
        "payment_declined",
    );
    refused(
        &order(&app, &buyer, &[(item, 1)], card("tok_unavailable")).await,
        StatusCode::SERVICE_UNAVAILABLE,
        "payment_unavailable",
    );
    let anonymous = app
        .call(
            "POST",
            "/api/v1/orders",
            None,
            Some(json!({ "payment": points() })),
        )
        .await;
    assert_eq!(anonymous.status, StatusCode::UNAUTHORIZED);
    // Nothing was taken or charged by any of them.
    assert_eq!(count(&app, "SELECT count(*) FROM orders").await, 0);
    assert_eq!(shelf(&app, item).await, (5, 0, 0));
    assert_eq!(balance(&app, &buyer).await, 50_000);
    assert_eq!(app.gateway.totals().approved, 1, "only the points charge");

    // Balance charges.
    let charges = "/api/v1/members/me/balance/charges";
    for amount in [0, -5] {
        let response = app
            .call(
                "POST",
                charges,
                Some(&buyer.token),
                Some(json!({ "amount": amount, "payment_token": "tok_ok" })),
            )
            .await;
        refused(&response, v, "validation");
    }
    let declined = app
        .call(
            "POST",
            charges,
            Some(&buyer.token),
            Some(json!({ "amount": 10, "payment_token": "tok_declined" })),
        )
        .await;
    refused(&declined, StatusCode::PAYMENT_REQUIRED, "payment_declined");
    assert_eq!(balance(&app, &buyer).await, 50_000);

    // Orders and refunds of someone else.
    let placed = order(&app, &buyer, &[(item, 2)], points()).await;
    expect(&placed, StatusCode::CREATED);
    let path = format!("/api/v1/orders/{}", placed.body["id"].as_str().unwrap());
    let stranger = app.member(Role::Customer).await;
    refused(
        &app.call("GET", &path, Some(&stranger.token), None).await,
        StatusCode::FORBIDDEN,
        "forbidden",
    );
    expect(
        &app.call("GET", &path, Some(&seller.token), None).await,
        StatusCode::OK,
    );
    expect(
        &app.call("GET", &path, Some(&buyer.token), None).await,
        StatusCode::OK,
    );
    refused(
        &app.call(
            "GET",
            &format!("/api/v1/orders/{unknown}"),
            Some(&buyer.token),
            None,
        )
        .await,
        StatusCode::NOT_FOUND,
        "order_not_found",
    );
    refused(
        &request_refund(
            &app,
            &stranger,
            &placed.body,
            json!([{ "product_id": item, "quantity": 1 }]),
        )
        .await,
        StatusCode::FORBIDDEN,
        "forbidden",
    );
    refused(
        &request_refund(
            &app,
            &buyer,
            &placed.body,
            json!([{ "product_id": item, "quantity": 3 }]),
        )
        .await,
        StatusCode::CONFLICT,
        "refund_exceeds_order",
    );
    refused(
        &request_refund(
            &app,
            &buyer,
            &placed.body,
            json!([{ "product_id": item, "quantity": 0 }]),
        )
        .await,
        v,
        "validation",
    );
    refused(
        &request_refund(
            &app,
            &buyer,
            &placed.body,
            json!([{ "product_id": unknown, "quantity": 1 }]),
        )
        .await,
        v,
        "validation",
    );
    let refund = request_refund(
        &app,
        &buyer,
        &placed.body,
        json!([{ "product_id": item, "quantity": 1 }]),
    )
    .await;
    expect(&refund, StatusCode::CREATED);
    let refund_id = refund.body["id"].as_str().unwrap();
    let other_seller = app.member(Role::Seller).await;
    refused(
        &decide(&app, &other_seller, refund_id, "accept").await,
        StatusCode::FORBIDDEN,
        "forbidden",
    );
    refused(
        &decide(&app, &buyer, refund_id, "accept").await,
        StatusCode::FORBIDDEN,
        "forbidden",
    );
    refused(
        &app.call(
            "GET",
            &format!("/api/v1/refunds/{refund_id}"),
            Some(&stranger.token),
            None,
        )
        .await,
        StatusCode::FORBIDDEN,
        "forbidden",
    );
    let pending = app
        .call(
            "GET",
            "/api/v1/sellers/me/refunds?status=requested",
            Some(&seller.token),
            None,
        )
        .await;
    assert_eq!(pending.body["items"][0]["id"], refund_id);
    refused(
        &app.call(
            "GET",
            "/api/v1/sellers/me/refunds?status=maybe",
            Some(&seller.token),
            None,
        )
        .await,
        v,
        "validation",
    );
    refused(
        &app.call(
            "GET",
            "/api/v1/sellers/me/refunds",
            Some(&buyer.token),
            None,
        )
        .await,
        StatusCode::FORBIDDEN,
        "forbidden",
    );
    // Refused decisions moved nothing.
    assert_eq!(shelf(&app, item).await, (3, 2, 0));

    // A refund spanning two sellers.
    let theirs = product(&app, &other_seller, 1_000, 5, json!({})).await;
    let mixed = order(&app, &buyer, &[(item, 1), (theirs, 1)], points()).await;
    expect(&mixed, StatusCode::CREATED);
    refused(
        &request_refund(
            &app,
            &buyer,
            &mixed.body,
            json!([{ "product_id": item, "quantity": 1 }, { "product_id": theirs, "quantity": 1 }]),
        )
        .await,
        v,
        "validation",
    );
    assert_eq!(count(&app, "SELECT count(*) FROM refunds").await, 1);
}

#[tokio::test]
async fn the_cart_is_priced_at_read_time_and_ordered_whole() {
    let app = TestApp::new().await;
    let seller = app.member(Role::Seller).await;
    let shoes = product(&app, &seller, 1_000, 10, json!({ "name": "Shoes" })).await;
    let socks = product(&app, &seller, 200, 10, json!({ "name": "Socks" })).await;
    let preorder = app.product(&seller, 1_000).await;
    let buyer = funded(&app, 10_000).await;
    let put = |product: Uuid, quantity: i64| {
        let (app, token) = (&app, buyer.token.clone());
        async move {
            app.call(
                "PUT",
                &format!("/api/v1/cart/items/{product}"),
                Some(&token),
                Some(json!({ "quantity": quantity })),
            )
            .await
        }
    };
    expect(&put(shoes, 2).await, StatusCode::OK);
    let cart = put(socks, 3).await;
    expect(&cart, StatusCode::OK);
    assert_eq!(cart.body["total"], 2_600);
    assert_eq!(cart.body["currency"], "KRW");
    assert_eq!(cart.body["items"][0]["name"], "Shoes");
    assert_eq!(cart.body["items"][1]["subtotal"], 600);
    for quantity in [0, 100, -1] {
        refused(
            &put(socks, quantity).await,
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation",
        );
    }
    refused(
        &put(preorder, 1).await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "validation",
    );
    refused(
        &put(Uuid::now_v7(), 1).await,
        StatusCode::NOT_FOUND,
        "product_not_found",
    );

    // A price change shows at the next read.
    let patch = app
        .call(
            "PATCH",
            &format!("/api/v1/products/{socks}"),
            Some(&seller.token),
            Some(json!({ "price": 300 })),
        )
        .await;
    expect(&patch, StatusCode::OK);
    let cart = app
        .call("GET", "/api/v1/cart", Some(&buyer.token), None)
        .await;
    assert_eq!(cart.body["total"], 2_900);

    // Ordering the cart (no items) takes all of it and empties it.
    let placed = app
        .call(
            "POST",
            "/api/v1/orders",
            Some(&buyer.token),
            Some(json!({ "payment": points() })),
        )
        .await;
    expect(&placed, StatusCode::CREATED);
    assert_eq!(placed.body["total"], 2_900);
    assert_eq!(placed.body["payment_method"], "points");
    assert_eq!(balance(&app, &buyer).await, 10_000 - 2_900);
    let cart = app
        .call("GET", "/api/v1/cart", Some(&buyer.token), None)
        .await;
    assert_eq!(cart.body["items"].as_array().unwrap().len(), 0);

    expect(&put(shoes, 1).await, StatusCode::OK);
    let removed = app
        .call(
            "DELETE",
            &format!("/api/v1/cart/items/{shoes}"),
            Some(&buyer.token),
            None,
        )
        .await;
    expect(&removed, StatusCode::OK);
    assert_eq!(removed.body["total"], 0);
    expect(&put(shoes, 1).await, StatusCode::OK);
    expect(
        &app.call("DELETE", "/api/v1/cart", Some(&buyer.token), None)
            .await,
        StatusCode::NO_CONTENT,
    );
    let cart = app
        .call("GET", "/api/v1/cart", Some(&buyer.token), None)
        .await;
    assert_eq!(cart.body["items"].as_array().unwrap().len(), 0);

    // My orders, newest first, paged.
    let second = order(&app, &buyer, &[(shoes, 1)], points()).await;
    let page = app
        .call("GET", "/api/v1/orders?limit=1", Some(&buyer.token), None)
        .await;
    assert_eq!(page.body["items"][0]["id"], second.body["id"]);
    let cursor = page.body["next_cursor"].as_str().unwrap();
    let next = app
        .call(
            "GET",
            &format!("/api/v1/orders?limit=1&cursor={cursor}"),
            Some(&buyer.token),
            None,
        )
        .await;
    assert_eq!(next.body["items"][0]["id"], placed.body["id"]);
    assert!(next.body["next_cursor"].is_null());
}

#[tokio::test]
async fn search_terms_are_remembered_for_signed_in_members() {
    let app = TestApp::new().await;
    let me = app.member(Role::Customer).await;
    let other = app.member(Role::Customer).await;
    for (member, q) in [
        (&me, "Boots"),
        (&me, "air max"),
        (&other, "AIR  max"),
        (&me, "boots"),
    ] {
        let path = format!("/api/v1/products?q={}", q.replace(' ', "%20"));
        expect(
            &app.call("GET", &path, Some(&member.token), None).await,
            StatusCode::OK,
        );
        // Recording is off the request path; give each one time to land so "newest" is well defined.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    expect(
        &app.call("GET", "/api/v1/products?q=anonymous", None, None)
            .await,
        StatusCode::OK,
    );
    let bad = app
        .call("GET", "/api/v1/products?q=x", Some("not-a-token"), None)
        .await;
    assert_eq!(bad.status, StatusCode::UNAUTHORIZED);

    let mut recent = Value::Null;
    for _ in 0..100 {
        recent = app
            .call("GET", "/api/v1/search/recent", Some(&me.token), None)
            .await
            .body;
        if recent["items"]
            .as_array()
            .is_some_and(|items| items.first().is_some_and(|t| t["term"] == "boots"))
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let terms: Vec<&str> = recent["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|term| term["term"].as_str().unwrap())
        .collect();
    assert_eq!(terms, ["boots", "air max"], "distinct, newest first");

    let popular = app.call("GET", "/api/v1/search/popular", None, None).await;
    expect(&popular, StatusCode::OK);
    let counted: Vec<(String, i64)> = popular.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|term| {
            (
                term["term"].as_str().unwrap().to_owned(),
                term["count"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        counted,
        [("air max".to_owned(), 2), ("boots".to_owned(), 2)]
    );
    let anonymous = app.call("GET", "/api/v1/search/recent", None, None).await;
    assert_eq!(anonymous.status, StatusCode::UNAUTHORIZED);
}
