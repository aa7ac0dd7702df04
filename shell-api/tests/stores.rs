//! Stores against real Postgres (and Redis for the two-instance notices), in-process through `app()`: names unique
//! ignoring case under concurrent creates, only the owner (or an admin) edits, products only in their seller's own
//! stores, follower and product counts exact under concurrency, one drop notice per member and event for a member who
//! follows the store and hearts the product (two instances announcing), suspension hiding and refusing and
//! restoration bringing back, a deleted store's products still orderable, and shelf restock alerts told once per
//! asker when two restocks race.
#![allow(
    clippy::too_many_lines,
    reason = "each test is one scenario read top to bottom: its setup, the fault or load, and every check"
)]
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use common::{eventually, TestApp, TestMember, TestResponse};
use serde_json::{json, Value};
use shell_api::auth::Role;
use shell_api::config::EngineArgs;
use uuid::Uuid;

#[track_caller]
fn expect(response: &TestResponse, status: StatusCode) {
    assert_eq!(response.status, status, "body: {}", response.body);
}

#[track_caller]
fn refused(response: &TestResponse, status: StatusCode, code: &str) {
    assert_eq!(response.status, status, "body: {}", response.body);
    assert_eq!(response.code(), code, "body: {}", response.body);
}

fn id_of(body: &Value) -> Uuid {
    body["id"].as_str().unwrap().parse().unwrap()
}

async fn create_store(app: &TestApp, seller: &TestMember, name: &str) -> TestResponse {
    app.call(
        "POST",
        "/api/v1/stores",
        Some(&seller.token),
        Some(json!({ "name": name, "description": format!("{name}: cakes and tarts") })),
    )
    .await
}

async fn store(app: &TestApp, seller: &TestMember, name: &str) -> Uuid {
    let response = create_store(app, seller, name).await;
    expect(&response, StatusCode::CREATED);
    id_of(&response.body)
}

/// A product through the API; `extra` is merged over a regular product with `stock` units.
async fn create_product(
    app: &TestApp,
    seller: &TestMember,
    stock: i64,
    extra: Value,
) -> TestResponse {
    let mut body =
        json!({ "name": "Strawberry tart", "price": 1_000, "kind": "regular", "stock": stock });
    body.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    app.call("POST", "/api/v1/products", Some(&seller.token), Some(body))
        .await
}

async fn product(app: &TestApp, seller: &TestMember, stock: i64, extra: Value) -> Uuid {
    let response = create_product(app, seller, stock, extra).await;
    expect(&response, StatusCode::CREATED);
    id_of(&response.body)
}

async fn get(app: &TestApp, path: &str, member: Option<&TestMember>) -> TestResponse {
    app.call("GET", path, member.map(|m| m.token.as_str()), None)
        .await
}

async fn patch(app: &TestApp, path: &str, member: &TestMember, body: Value) -> TestResponse {
    app.call("PATCH", path, Some(&member.token), Some(body))
        .await
}

async fn follow(app: &TestApp, member: &TestMember, store: Uuid, on: bool) -> StatusCode {
    let method = if on { "PUT" } else { "DELETE" };
    app.call(
        method,
        &format!("/api/v1/stores/{store}/follow"),
        Some(&member.token),
        None,
    )
    .await
    .status
}

async fn count(app: &TestApp, sql: &str, id: Uuid) -> i64 {
    app.db
        .client()
        .await
        .query_one(sql, &[&id])
        .await
        .unwrap()
        .get(0)
}

/// The ids of a list's items.
fn ids(page: &Value) -> Vec<Uuid> {
    page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(id_of)
        .collect()
}

async fn charge(app: &TestApp, member: &TestMember, amount: i64) {
    let response = app
        .call(
            "POST",
            "/api/v1/members/me/balance/charges",
            Some(&member.token),
            Some(json!({ "amount": amount, "payment_token": "tok_ok" })),
        )
        .await;
    expect(&response, StatusCode::CREATED);
}

async fn order(app: &TestApp, member: &TestMember, product: Uuid, quantity: i64) -> TestResponse {
    app.call(
        "POST",
        "/api/v1/orders",
        Some(&member.token),
        Some(
            json!({ "items": [{ "product_id": product, "quantity": quantity }],
                     "payment": { "method": "points" } }),
        ),
    )
    .await
}

async fn notifications(app: &TestApp, member: &TestMember) -> Vec<Value> {
    let response = get(
        app,
        "/api/v1/members/me/notifications?limit=100",
        Some(member),
    )
    .await;
    expect(&response, StatusCode::OK);
    let mut items = response.body["items"].as_array().unwrap().clone();
    items.reverse(); // oldest first, for reading
    items
}

fn kinds(items: &[Value]) -> Vec<String> {
    items
        .iter()
        .map(|item| item["kind"].as_str().unwrap().to_owned())
        .collect()
}

async fn delete_store(app: &TestApp, path: &str, member: &TestMember) -> TestResponse {
    app.call("DELETE", path, Some(&member.token), None).await
}

async fn set_status(app: &TestApp, store: Uuid, member: &TestMember, status: &str) -> TestResponse {
    let path = format!("/api/v1/admin/stores/{store}/status");
    app.call(
        "PUT",
        &path,
        Some(&member.token),
        Some(json!({ "status": status })),
    )
    .await
}

async fn search(app: &TestApp, q: &str) -> TestResponse {
    get(app, &format!("/api/v1/stores?q={q}"), None).await
}

async fn ask(app: &TestApp, product: Uuid, member: &TestMember, on: bool) -> TestResponse {
    let path = format!("/api/v1/products/{product}/restock-alert");
    let method = if on { "PUT" } else { "DELETE" };
    app.call(method, &path, Some(&member.token), None).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn store_names_are_unique_ignoring_case_under_concurrent_creates() {
    let app = Arc::new(TestApp::new().await);
    let mut sellers = Vec::new();
    for _ in 0..20 {
        sellers.push(app.member(Role::Seller).await);
    }
    let names = [
        "Sweet Bakery",
        "SWEET BAKERY",
        "sweet bakery",
        "Sweet BAKERY",
    ];
    let tasks: Vec<_> = sellers
        .into_iter()
        .enumerate()
        .map(|(i, seller)| {
            let app = Arc::clone(&app);
            let name = names[i % names.len()];
            tokio::spawn(async move { create_store(&app, &seller, name).await })
        })
        .collect();
    let mut created = 0;
    for task in tasks {
        let response = task.await.unwrap();
        if response.status == StatusCode::CREATED {
            created += 1;
            assert_eq!(response.body["status"], "active");
            assert_eq!(response.body["follower_count"], 0);
            assert_eq!(response.body["product_count"], 0);
        } else {
            refused(&response, StatusCode::CONFLICT, "store_name_taken");
        }
    }
    assert_eq!(created, 1);
    let rows: i64 = app
        .db
        .client()
        .await
        .query_one(
            "SELECT count(*) FROM stores WHERE lower(name) = 'sweet bakery'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, 1);

    // Who may open one, and what a bad body answers.
    let customer = app.member(Role::Customer).await;
    refused(
        &create_store(&app, &customer, "Mine").await,
        StatusCode::FORBIDDEN,
        "forbidden",
    );
    let seller = app.member(Role::Seller).await;
    let blank = app
        .call(
            "POST",
            "/api/v1/stores",
            Some(&seller.token),
            Some(json!({ "name": "  " })),
        )
        .await;
    refused(&blank, StatusCode::UNPROCESSABLE_ENTITY, "validation");
    assert!(blank.body["error"]["fields"]["name"].is_string());
    let long = "x".repeat(201);
    refused(
        &create_store(&app, &seller, &long).await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "validation",
    );
}

#[tokio::test]
async fn only_the_owner_or_an_admin_edits_or_deletes_a_store() {
    let app = TestApp::new().await;
    let owner = app.member(Role::Seller).await;
    let other = app.member(Role::Seller).await;
    let admin = app.member(Role::Admin).await;
    let bakery = store(&app, &owner, "Corner Bakery").await;
    store(&app, &other, "Flower Shed").await;
    let path = format!("/api/v1/stores/{bakery}");

    refused(
        &patch(&app, &path, &other, json!({ "name": "Mine now" })).await,
        StatusCode::FORBIDDEN,
        "forbidden",
    );
    let renamed = patch(
        &app,
        &path,
        &owner,
        json!({ "name": "Corner Patisserie", "description": null }),
    )
    .await;
    expect(&renamed, StatusCode::OK);
    assert_eq!(renamed.body["name"], "Corner Patisserie");
    assert!(renamed.body["description"].is_null());
    // Another store's name in another case is taken; the store keeps its own.
    refused(
        &patch(&app, &path, &owner, json!({ "name": "FLOWER SHED" })).await,
        StatusCode::CONFLICT,
        "store_name_taken",
    );
    let by_admin = patch(&app, &path, &admin, json!({ "description": "Cakes" })).await;
    expect(&by_admin, StatusCode::OK);
    assert_eq!(by_admin.body["name"], "Corner Patisserie");
    assert_eq!(by_admin.body["seller_id"], owner.id.to_string());
    let read = get(&app, &path, None).await;
    expect(&read, StatusCode::OK);
    assert_eq!(read.body["description"], "Cakes");

    refused(
        &delete_store(&app, &path, &other).await,
        StatusCode::FORBIDDEN,
        "forbidden",
    );
    expect(
        &delete_store(&app, &path, &owner).await,
        StatusCode::NO_CONTENT,
    );
    refused(
        &get(&app, &path, None).await,
        StatusCode::NOT_FOUND,
        "store_not_found",
    );
    refused(
        &delete_store(&app, &path, &owner).await,
        StatusCode::NOT_FOUND,
        "store_not_found",
    );
    refused(
        &patch(&app, &path, &owner, json!({ "name": "Back" })).await,
        StatusCode::NOT_FOUND,
        "store_not_found",
    );
}

#[tokio::test]
async fn a_product_goes_only_in_its_sellers_own_stores() {
    let app = TestApp::new().await;
    let seller = app.member(Role::Seller).await;
    let other = app.member(Role::Seller).await;
    let mine = store(&app, &seller, "Dessert Market").await;
    let theirs = store(&app, &other, "Rival Desserts").await;

    refused(
        &create_product(&app, &seller, 3, json!({ "store_id": theirs })).await,
        StatusCode::FORBIDDEN,
        "forbidden",
    );
    refused(
        &create_product(&app, &seller, 3, json!({ "store_id": Uuid::now_v7() })).await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "validation",
    );
    // A bulk create with one foreign store creates nothing.
    let item = |store: Uuid| json!({ "name": "Macaron", "price": 500, "kind": "regular", "store_id": store });
    let bulk = app
        .call(
            "POST",
            "/api/v1/products/bulk",
            Some(&seller.token),
            Some(json!({ "items": [item(mine), item(theirs)] })),
        )
        .await;
    refused(&bulk, StatusCode::FORBIDDEN, "forbidden");
    assert_eq!(
        count(
            &app,
            "SELECT count(*) FROM products WHERE seller_id = $1",
            seller.id
        )
        .await,
        0
    );
    let bulk = app
        .call(
            "POST",
            "/api/v1/products/bulk",
            Some(&seller.token),
            Some(json!({ "items": [item(mine), item(mine)] })),
        )
        .await;
    expect(&bulk, StatusCode::CREATED);
    assert_eq!(bulk.body["items"][0]["store_id"], mine.to_string());

    // Moving a product: not into another seller's store, into mine, out of it.
    let loose = product(&app, &seller, 2, json!({})).await;
    let path = format!("/api/v1/products/{loose}");
    refused(
        &patch(&app, &path, &seller, json!({ "store_id": theirs })).await,
        StatusCode::FORBIDDEN,
        "forbidden",
    );
    let moved = patch(&app, &path, &seller, json!({ "store_id": mine })).await;
    expect(&moved, StatusCode::OK);
    assert_eq!(moved.body["store_id"], mine.to_string());
    let in_store = get(&app, &format!("/api/v1/stores/{mine}"), None).await;
    assert_eq!(in_store.body["product_count"], 3);
    let listed = get(
        &app,
        &format!("/api/v1/stores/{mine}/products?limit=2"),
        None,
    )
    .await;
    expect(&listed, StatusCode::OK);
    assert_eq!(ids(&listed.body), [loose, id_of(&bulk.body["items"][1])]);
    let cursor = listed.body["next_cursor"].as_str().unwrap();
    let rest = get(
        &app,
        &format!("/api/v1/stores/{mine}/products?limit=2&cursor={cursor}"),
        None,
    )
    .await;
    assert_eq!(ids(&rest.body), [id_of(&bulk.body["items"][0])]);
    assert!(rest.body["next_cursor"].is_null());
    // A patch that does not name the store keeps it; `null` takes the product out; deleting one counts too.
    let renamed = patch(&app, &path, &seller, json!({ "name": "Lemon tart" })).await;
    assert_eq!(renamed.body["store_id"], mine.to_string());
    let out = patch(&app, &path, &seller, json!({ "store_id": null })).await;
    expect(&out, StatusCode::OK);
    assert!(out.body["store_id"].is_null());
    let first = id_of(&bulk.body["items"][0]);
    expect(
        &app.call(
            "DELETE",
            &format!("/api/v1/products/{first}"),
            Some(&seller.token),
            None,
        )
        .await,
        StatusCode::NO_CONTENT,
    );
    assert_eq!(
        get(&app, &format!("/api/v1/stores/{mine}"), None)
            .await
            .body["product_count"],
        1
    );
    assert_eq!(
        get(&app, &format!("/api/v1/stores/{theirs}"), None)
            .await
            .body["product_count"],
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn follower_and_product_counts_are_exact_under_concurrency() {
    let app = Arc::new(TestApp::new().await);
    let seller = app.member(Role::Seller).await;
    let bakery = store(&app, &seller, "Busy Bakery").await;
    let mut members = Vec::new();
    for _ in 0..50 {
        members.push(Arc::new(app.member(Role::Customer).await));
    }
    // 200 calls: each member follows, unfollows and follows again, and half of them once more, all at once.
    let mut tasks = Vec::new();
    for (i, member) in members.iter().enumerate() {
        let plan: &[bool] = if i % 2 == 0 {
            &[true, false, true, true]
        } else {
            &[true, true, false, false]
        };
        for &on in plan {
            let (app, member) = (Arc::clone(&app), Arc::clone(member));
            tasks.push(tokio::spawn(async move {
                follow(&app, &member, bakery, on).await
            }));
        }
    }
    assert_eq!(tasks.len(), 200);
    for task in tasks {
        assert_eq!(task.await.unwrap(), StatusCode::NO_CONTENT);
    }
    let rows = count(
        &app,
        "SELECT count(*) FROM store_follows WHERE store_id = $1",
        bakery,
    )
    .await;
    let shown = get(&app, &format!("/api/v1/stores/{bakery}"), None).await;
    assert_eq!(shown.body["follower_count"], rows);
    // Then every member settles on a known state: the even ones follow, the odd ones do not.
    for (i, member) in members.iter().enumerate() {
        assert_eq!(
            follow(&app, member, bakery, i % 2 == 0).await,
            StatusCode::NO_CONTENT
        );
    }
    let shown = get(&app, &format!("/api/v1/stores/{bakery}"), None).await;
    assert_eq!(shown.body["follower_count"], 25);
    assert_eq!(
        count(
            &app,
            "SELECT count(*) FROM store_follows WHERE store_id = $1",
            bakery
        )
        .await,
        25
    );
    let mine = get(&app, "/api/v1/members/me/stores", Some(&members[0])).await;
    expect(&mine, StatusCode::OK);
    assert_eq!(ids(&mine.body), [bakery]);
    assert!(
        ids(&get(&app, "/api/v1/members/me/stores", Some(&members[1]))
            .await
            .body)
        .is_empty()
    );
    refused(
        &app.call(
            "PUT",
            &format!("/api/v1/stores/{}/follow", Uuid::now_v7()),
            Some(&members[0].token),
            None,
        )
        .await,
        StatusCode::NOT_FOUND,
        "store_not_found",
    );

    // Products: 40 single creates and 10 bulk creates of 10, at once, into one store.
    let mut tasks = Vec::new();
    for i in 0..50 {
        let (app, seller) = (Arc::clone(&app), seller.clone());
        tasks.push(tokio::spawn(async move {
            if i % 5 == 0 {
                let items: Vec<Value> = (0..10)
                    .map(|_| json!({ "name": "Eclair", "price": 300, "kind": "regular", "store_id": bakery }))
                    .collect();
                app.call("POST", "/api/v1/products/bulk", Some(&seller.token), Some(json!({ "items": items })))
                    .await
                    .status
            } else {
                create_product(&app, &seller, 1, json!({ "store_id": bakery })).await.status
            }
        }));
    }
    for task in tasks {
        assert_eq!(task.await.unwrap(), StatusCode::CREATED);
    }
    let shown = get(&app, &format!("/api/v1/stores/{bakery}"), None).await;
    assert_eq!(shown.body["product_count"], 140);
    assert_eq!(
        count(
            &app,
            "SELECT count(*) FROM products WHERE store_id = $1 AND deleted_at IS NULL",
            bakery
        )
        .await,
        140
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_who_follows_and_hearts_is_told_once_per_event_across_instances() {
    let args = EngineArgs {
        reaper_interval_ms: 100,
        ..EngineArgs::default()
    };
    let a = TestApp::with_redis(args).await;
    let b = a.another_instance().await;
    // Both instances run the notifier, as two `flashsale serve` would.
    let notifiers = [
        tokio::spawn(shell_api::live::notifications::notify_forever(
            a.state.clone(),
        )),
        tokio::spawn(shell_api::live::notifications::notify_forever(
            b.state.clone(),
        )),
    ];
    let seller = a.member(Role::Seller).await;
    let bakery = store(&a, &seller, "Drop Bakery").await;
    let cake = product(
        &a,
        &seller,
        0,
        json!({ "kind": "preorder", "store_id": bakery }),
    )
    .await;
    let both = a.member(Role::Customer).await;
    let follower = a.member(Role::Customer).await;
    let fan = a.member(Role::Customer).await;
    let stranger = a.member(Role::Customer).await;
    for member in [&both, &follower] {
        assert_eq!(
            follow(&a, member, bakery, true).await,
            StatusCode::NO_CONTENT
        );
    }
    for member in [&both, &fan] {
        let path = format!("/api/v1/products/{cake}/heart");
        expect(
            &a.call("PUT", &path, Some(&member.token), None).await,
            StatusCode::NO_CONTENT,
        );
    }
    let opens_at = chrono::Utc::now() + chrono::Duration::milliseconds(1000);
    let drop = a
        .drop(
            &seller,
            json!({ "product_id": cake, "stock": 3, "opens_at": opens_at.to_rfc3339() }),
        )
        .await;
    for member in [&both, &follower, &fan] {
        eventually(
            "drop_scheduled and drop_open",
            Duration::from_secs(10),
            || async { kinds(&notifications(&b, member).await) == ["drop_scheduled", "drop_open"] },
        )
        .await;
    }
    // A few more ticks of both notifiers change nothing.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for member in [&both, &follower, &fan] {
        let items = notifications(&a, member).await;
        assert_eq!(kinds(&items), ["drop_scheduled", "drop_open"]);
        for item in &items {
            assert_eq!(item["drop_id"], drop["id"]);
            assert_eq!(item["product_id"], cake.to_string());
        }
    }
    assert!(notifications(&a, &stranger).await.is_empty());
    for notifier in notifiers {
        notifier.abort();
    }
}

#[tokio::test]
async fn a_suspended_store_is_hidden_and_refused_and_restoring_brings_it_back() {
    let app = TestApp::new().await;
    let seller = app.member(Role::Seller).await;
    let admin = app.member(Role::Admin).await;
    let buyer = app.member(Role::Customer).await;
    charge(&app, &buyer, 10_000).await;
    let shed = store(&app, &seller, "Hidden Flower Shed").await;
    let roses = product(
        &app,
        &seller,
        5,
        json!({ "name": "Hidden roses", "store_id": shed }),
    )
    .await;
    let bulbs = product(
        &app,
        &seller,
        0,
        json!({ "name": "Hidden bulbs", "kind": "preorder", "store_id": shed }),
    )
    .await;
    let opens_at = (chrono::Utc::now() - chrono::Duration::seconds(1)).to_rfc3339();
    let open_drop = app
        .drop(
            &seller,
            json!({ "product_id": bulbs, "stock": 5, "opens_at": opens_at }),
        )
        .await;
    assert_eq!(
        follow(&app, &buyer, shed, true).await,
        StatusCode::NO_CONTENT
    );

    refused(
        &set_status(&app, shed, &seller, "suspended").await,
        StatusCode::FORBIDDEN,
        "forbidden",
    );
    refused(
        &set_status(&app, shed, &admin, "closed").await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "validation",
    );
    let suspended = set_status(&app, shed, &admin, "suspended").await;
    expect(&suspended, StatusCode::OK);
    assert_eq!(suspended.body["status"], "suspended");

    // Hidden: from the store search, the store's page and products (but for its seller and admins), the product
    // list and search, and the stores I follow.
    assert!(ids(&search(&app, "hidden").await.body).is_empty());
    assert!(ids(&search(&app, "").await.body).is_empty());
    let store_path = format!("/api/v1/stores/{shed}");
    refused(
        &get(&app, &store_path, None).await,
        StatusCode::NOT_FOUND,
        "store_not_found",
    );
    refused(
        &get(&app, &store_path, Some(&buyer)).await,
        StatusCode::NOT_FOUND,
        "store_not_found",
    );
    refused(
        &get(&app, &format!("{store_path}/products"), None).await,
        StatusCode::NOT_FOUND,
        "store_not_found",
    );
    assert_eq!(
        get(&app, &store_path, Some(&seller)).await.body["status"],
        "suspended"
    );
    expect(&get(&app, &store_path, Some(&admin)).await, StatusCode::OK);
    assert!(ids(&get(&app, "/api/v1/products?q=hidden", None).await.body).is_empty());
    assert!(ids(&get(&app, "/api/v1/members/me/stores", Some(&buyer))
        .await
        .body)
    .is_empty());
    let stranger = app.member(Role::Customer).await;
    refused(
        &app.call(
            "PUT",
            &format!("{store_path}/follow"),
            Some(&stranger.token),
            None,
        )
        .await,
        StatusCode::NOT_FOUND,
        "store_not_found",
    );

    // Refused: orders and carts of its shelf products, new drops of its products.
    let refused_order = order(&app, &buyer, roses, 1).await;
    refused(&refused_order, StatusCode::CONFLICT, "store_suspended");
    assert!(refused_order.body["error"]["fields"][roses.to_string()].is_string());
    let cart_path = format!("/api/v1/cart/items/{roses}");
    refused(
        &app.call(
            "PUT",
            &cart_path,
            Some(&buyer.token),
            Some(json!({ "quantity": 1 })),
        )
        .await,
        StatusCode::CONFLICT,
        "store_suspended",
    );
    let new_drop = app
        .call(
            "POST",
            "/api/v1/drops",
            Some(&seller.token),
            Some(json!({ "product_id": bulbs, "stock": 5, "opens_at": opens_at })),
        )
        .await;
    refused(&new_drop, StatusCode::CONFLICT, "store_suspended");
    assert_eq!(
        count(
            &app,
            "SELECT count(*) FROM products WHERE id = $1 AND stock = 5",
            roses
        )
        .await,
        1
    );
    // The drop already open goes on.
    let hold = common::reserve(&app, &buyer, &open_drop, 1).await;
    expect(&hold, StatusCode::CREATED);

    // Restored: everything is back.
    expect(
        &set_status(&app, shed, &admin, "active").await,
        StatusCode::OK,
    );
    assert_eq!(ids(&search(&app, "HIDDEN").await.body), [shed]);
    assert_eq!(ids(&search(&app, "cakes").await.body), [shed]); // the description matches
    expect(&get(&app, &store_path, None).await, StatusCode::OK);
    assert_eq!(
        ids(&get(&app, "/api/v1/products?q=hidden", None).await.body),
        [bulbs, roses]
    );
    assert_eq!(
        ids(&get(&app, "/api/v1/members/me/stores", Some(&buyer))
            .await
            .body),
        [shed]
    );
    expect(&order(&app, &buyer, roses, 1).await, StatusCode::CREATED);
    app.drop(
        &seller,
        json!({ "product_id": bulbs, "stock": 5, "opens_at": opens_at }),
    )
    .await;
}

#[tokio::test]
async fn deleting_a_store_leaves_its_products_orderable_without_a_store() {
    let app = TestApp::new().await;
    let seller = app.member(Role::Seller).await;
    let buyer = app.member(Role::Customer).await;
    charge(&app, &buyer, 10_000).await;
    let gone = store(&app, &seller, "Closing Down").await;
    let cookie = product(&app, &seller, 4, json!({ "store_id": gone })).await;
    assert_eq!(
        follow(&app, &buyer, gone, true).await,
        StatusCode::NO_CONTENT
    );
    expect(
        &app.call(
            "DELETE",
            &format!("/api/v1/stores/{gone}"),
            Some(&seller.token),
            None,
        )
        .await,
        StatusCode::NO_CONTENT,
    );
    let read = get(&app, &format!("/api/v1/products/{cookie}"), None).await;
    expect(&read, StatusCode::OK);
    assert!(read.body["store_id"].is_null());
    assert!(ids(&get(&app, "/api/v1/members/me/stores", Some(&buyer))
        .await
        .body)
    .is_empty());
    let placed = order(&app, &buyer, cookie, 2).await;
    expect(&placed, StatusCode::CREATED);
    assert_eq!(
        count(&app, "SELECT stock FROM products WHERE id = $1", cookie).await,
        2
    );
    // Its name is free again.
    store(&app, &seller, "closing down").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_restock_alert_is_told_once_per_asker_also_when_two_restocks_race() {
    let app = Arc::new(TestApp::new().await);
    let seller = app.member(Role::Seller).await;
    let buyer = app.member(Role::Customer).await;
    charge(&app, &buyer, 100_000).await;
    let bread = product(&app, &seller, 1, json!({})).await;
    let askers = [
        app.member(Role::Customer).await,
        app.member(Role::Customer).await,
        app.member(Role::Customer).await,
    ];
    let withdrawn = app.member(Role::Customer).await;
    refused(
        &ask(&app, bread, &askers[0], true).await,
        StatusCode::CONFLICT,
        "in_stock",
    );
    let preorder = product(&app, &seller, 0, json!({ "kind": "preorder" })).await;
    refused(
        &app.call(
            "PUT",
            &format!("/api/v1/products/{preorder}/restock-alert"),
            Some(&buyer.token),
            None,
        )
        .await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "validation",
    );
    expect(&order(&app, &buyer, bread, 1).await, StatusCode::CREATED);
    for member in askers.iter().chain([&withdrawn]) {
        expect(
            &ask(&app, bread, member, true).await,
            StatusCode::NO_CONTENT,
        );
    }
    expect(
        &ask(&app, bread, &askers[0], true).await,
        StatusCode::NO_CONTENT,
    ); // again: still one request
    expect(
        &ask(&app, bread, &withdrawn, false).await,
        StatusCode::NO_CONTENT,
    );
    expect(
        &ask(&app, bread, &withdrawn, false).await,
        StatusCode::NO_CONTENT,
    );

    // Two restocks race (two patches from 0): each asker is told once.
    let path = format!("/api/v1/products/{bread}");
    let restock = |stock: i64| {
        let (app, seller, path) = (Arc::clone(&app), seller.clone(), path.clone());
        tokio::spawn(async move {
            app.call(
                "PATCH",
                &path,
                Some(&seller.token),
                Some(json!({ "stock": stock })),
            )
            .await
        })
    };
    let (first, second) = (restock(5), restock(7));
    expect(&first.await.unwrap(), StatusCode::OK);
    expect(&second.await.unwrap(), StatusCode::OK);
    for member in &askers {
        let items = notifications(&app, member).await;
        assert_eq!(kinds(&items), ["restock"], "{items:?}");
        assert_eq!(items[0]["product_id"], bread.to_string());
        assert!(items[0].get("drop_id").is_none());
    }
    assert!(notifications(&app, &withdrawn).await.is_empty());
    assert_eq!(
        count(
            &app,
            "SELECT count(*) FROM restock_alerts WHERE product_id = $1",
            bread
        )
        .await,
        0
    );

    // The requests are used up: another restock tells nobody until they ask again. Then a refund's units and a
    // patch race back onto the empty shelf.
    let placed = order(&app, &buyer, bread, 2).await;
    expect(&placed, StatusCode::CREATED);
    expect(
        &patch(&app, &path, &seller, json!({ "stock": 0 })).await,
        StatusCode::OK,
    );
    expect(
        &patch(&app, &path, &seller, json!({ "stock": 1 })).await,
        StatusCode::OK,
    );
    expect(
        &patch(&app, &path, &seller, json!({ "stock": 0 })).await,
        StatusCode::OK,
    );
    for member in &askers {
        assert_eq!(notifications(&app, member).await.len(), 1);
        expect(
            &ask(&app, bread, member, true).await,
            StatusCode::NO_CONTENT,
        );
    }
    let refund = app
        .call(
            "POST",
            &format!(
                "/api/v1/orders/{}/refunds",
                placed.body["id"].as_str().unwrap()
            ),
            Some(&buyer.token),
            Some(json!({ "items": [{ "product_id": bread, "quantity": 2 }], "reason": "stale" })),
        )
        .await;
    expect(&refund, StatusCode::CREATED);
    let accept = {
        let (app, seller) = (Arc::clone(&app), seller.clone());
        let refund = refund.body["id"].as_str().unwrap().to_owned();
        tokio::spawn(async move {
            app.call(
                "POST",
                &format!("/api/v1/refunds/{refund}/accept"),
                Some(&seller.token),
                Some(json!({})),
            )
            .await
        })
    };
    let patched = restock(3);
    expect(&accept.await.unwrap(), StatusCode::OK);
    expect(&patched.await.unwrap(), StatusCode::OK);
    for member in &askers {
        assert_eq!(
            kinds(&notifications(&app, member).await),
            ["restock", "restock"]
        );
    }
    let stock = count(&app, "SELECT stock FROM products WHERE id = $1", bread).await;
    assert!(stock == 3 || stock == 5, "stock {stock}");
    assert_eq!(
        count(
            &app,
            "SELECT count(*) FROM restock_alerts WHERE product_id = $1",
            bread
        )
        .await,
        0
    );
}
