//! Products over HTTP, in-process against a private Postgres database: ownership and roles, validation, bulk
//! atomicity and limits, keyset pagination under concurrent inserts, search and filters.
#![allow(
    clippy::too_many_lines,
    reason = "each test is one scenario read top to bottom: its setup, the fault or load, and every check"
)]
// Helpers outside #[test] functions panic on unexpected answers too: that is how a test fails.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashSet;

use axum::http::StatusCode;
use common::TestApp;
use serde_json::{json, Value};
use shell_api::auth::Role;
use shell_api::products::{product_owner_and_price, ProductKind};
use uuid::Uuid;

fn product(name: &str) -> Value {
    json!({"name": name, "price": 50000, "kind": "regular", "stock": 10})
}

async fn create(app: &TestApp, token: &str, body: Value) -> Value {
    let response = app
        .call("POST", "/api/v1/products", Some(token), Some(body))
        .await;
    assert_eq!(response.status, StatusCode::CREATED, "{:?}", response.body);
    response.body
}

async fn bulk(app: &TestApp, token: &str, body: Value) -> common::TestResponse {
    app.call("POST", "/api/v1/products/bulk", Some(token), Some(body))
        .await
}

async fn count_products(app: &TestApp) -> i64 {
    app.db
        .client()
        .await
        .query_one("SELECT count(*) FROM products", &[])
        .await
        .unwrap()
        .get(0)
}

/// Every page of `query` (which has no `cursor`), following `next_cursor`; `between` runs between fetches.
async fn all_pages(app: &TestApp, query: &str, mut between: impl AsyncFnMut(usize)) -> Vec<String> {
    let mut names = Vec::new();
    let mut cursor: Option<String> = None;
    for page in 0.. {
        let path = match &cursor {
            Some(cursor) => format!("/api/v1/products?{query}&cursor={cursor}"),
            None => format!("/api/v1/products?{query}"),
        };
        let response = app.call("GET", &path, None, None).await;
        assert_eq!(response.status, StatusCode::OK, "{:?}", response.body);
        for item in response.body["items"].as_array().unwrap() {
            names.push(item["name"].as_str().unwrap().to_owned());
        }
        match response.body["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => break,
        }
        between(page).await;
    }
    names
}

#[tokio::test]
async fn sellers_create_products_with_defaults_and_customers_cannot() {
    let app = TestApp::new().await;
    let seller = app.member(Role::Seller).await;
    let customer = app.member(Role::Customer).await;

    let regular = create(&app, &seller.token, product("Sneaker")).await;
    assert_eq!(regular["seller_id"], seller.id.to_string());
    assert_eq!(regular["currency"], "KRW");
    assert_eq!(regular["stock"], 10);
    assert_eq!(regular["kind"], "regular");
    assert!(regular["description"].is_null());

    let preorder = create(
        &app,
        &seller.token,
        json!({"name": "Album", "price": 0, "kind": "preorder", "stock": 500, "currency": "usd",
               "description": "Signed"}),
    )
    .await;
    assert_eq!(
        preorder["stock"], 0,
        "a preorder's stock lives in its drops"
    );
    assert_eq!(preorder["currency"], "USD");
    assert_eq!(preorder["description"], "Signed");

    let fetched = app
        .call(
            "GET",
            &format!("/api/v1/products/{}", regular["id"].as_str().unwrap()),
            None,
            None,
        )
        .await;
    assert_eq!(fetched.status, StatusCode::OK);
    assert_eq!(fetched.body, regular);

    let denied = app
        .call(
            "POST",
            "/api/v1/products",
            Some(&customer.token),
            Some(product("Nope")),
        )
        .await;
    assert_eq!(denied.status, StatusCode::FORBIDDEN);
    let anonymous = app
        .call("POST", "/api/v1/products", None, Some(product("Nope")))
        .await;
    assert_eq!(anonymous.status, StatusCode::UNAUTHORIZED);
    assert_eq!(count_products(&app).await, 2);

    // What the drops module reads.
    let id: Uuid = regular["id"].as_str().unwrap().parse().unwrap();
    let reference = product_owner_and_price(&app.db.client().await, id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(reference.seller_id, seller.id);
    assert_eq!(reference.price, 50000);
    assert_eq!(reference.currency, "KRW");
    assert_eq!(reference.kind, ProductKind::Regular);
    let missing = product_owner_and_price(&app.db.client().await, Uuid::now_v7())
        .await
        .unwrap();
    assert!(missing.is_none());
}

#[tokio::test]
async fn product_validation_names_each_bad_field() {
    let app = TestApp::new().await;
    let seller = app.member(Role::Seller).await;
    let cases = [
        (json!({"price": 1, "kind": "regular"}), "name"),
        (json!({"name": "  ", "price": 1, "kind": "regular"}), "name"),
        (
            json!({"name": "x".repeat(201), "price": 1, "kind": "regular"}),
            "name",
        ),
        (json!({"name": "a", "kind": "regular"}), "price"),
        (
            json!({"name": "a", "price": -1, "kind": "regular"}),
            "price",
        ),
        (
            json!({"name": "a", "price": 1, "kind": "regular", "currency": "WON!"}),
            "currency",
        ),
        (
            json!({"name": "a", "price": 1, "kind": "regular", "currency": "kr"}),
            "currency",
        ),
        (json!({"name": "a", "price": 1}), "kind"),
        (json!({"name": "a", "price": 1, "kind": "auction"}), "kind"),
        (
            json!({"name": "a", "price": 1, "kind": "regular", "stock": -1}),
            "stock",
        ),
        (
            json!({"name": "a", "price": 1, "kind": "regular", "description": "d".repeat(5001)}),
            "description",
        ),
    ];
    for (body, field) in cases {
        let response = app
            .call(
                "POST",
                "/api/v1/products",
                Some(&seller.token),
                Some(body.clone()),
            )
            .await;
        assert_eq!(response.status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
        let fields = response.body["error"]["fields"].as_object().unwrap();
        assert_eq!(
            fields.keys().collect::<Vec<_>>(),
            [field],
            "{body}: {fields:?}"
        );
    }
    assert_eq!(count_products(&app).await, 0);
}

#[tokio::test]
async fn only_the_owner_or_an_admin_edits_or_deletes() {
    let app = TestApp::new().await;
    let owner = app.member(Role::Seller).await;
    let rival = app.member(Role::Seller).await;
    let admin = app.member(Role::Admin).await;
    let created = create(&app, &owner.token, product("Jacket")).await;
    let path = format!("/api/v1/products/{}", created["id"].as_str().unwrap());

    let rival_edit = app
        .call(
            "PATCH",
            &path,
            Some(&rival.token),
            Some(json!({"price": 1})),
        )
        .await;
    assert_eq!(rival_edit.status, StatusCode::FORBIDDEN);
    let rival_delete = app.call("DELETE", &path, Some(&rival.token), None).await;
    assert_eq!(rival_delete.status, StatusCode::FORBIDDEN);
    let unchanged = app.call("GET", &path, None, None).await;
    assert_eq!(unchanged.body["price"], 50000);

    let edited = app
        .call(
            "PATCH",
            &path,
            Some(&owner.token),
            Some(json!({"price": 45000, "description": "Warm"})),
        )
        .await;
    assert_eq!(edited.status, StatusCode::OK, "{:?}", edited.body);
    assert_eq!(edited.body["price"], 45000);
    assert_eq!(edited.body["description"], "Warm");
    assert_eq!(edited.body["name"], "Jacket", "absent fields stay");
    assert_eq!(edited.body["stock"], 10);

    let invalid = app
        .call(
            "PATCH",
            &path,
            Some(&owner.token),
            Some(json!({"price": -5})),
        )
        .await;
    assert_eq!(invalid.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(invalid.body["error"]["fields"]["price"].is_string());

    let by_admin = app
        .call(
            "PATCH",
            &path,
            Some(&admin.token),
            Some(json!({"name": "Admin Jacket", "description": null})),
        )
        .await;
    assert_eq!(by_admin.status, StatusCode::OK);
    assert_eq!(by_admin.body["name"], "Admin Jacket");
    assert!(by_admin.body["description"].is_null());
    assert_eq!(
        by_admin.body["seller_id"],
        owner.id.to_string(),
        "still the owner's"
    );

    let deleted = app.call("DELETE", &path, Some(&admin.token), None).await;
    assert_eq!(deleted.status, StatusCode::NO_CONTENT);
    let gone = app.call("GET", &path, None, None).await;
    assert_eq!(gone.status, StatusCode::NOT_FOUND);
    assert_eq!(gone.code(), "product_not_found");
    let twice = app.call("DELETE", &path, Some(&owner.token), None).await;
    assert_eq!(twice.status, StatusCode::NOT_FOUND);

    // The owner deletes its own.
    let second = create(&app, &owner.token, product("Scarf")).await;
    let second_path = format!("/api/v1/products/{}", second["id"].as_str().unwrap());
    let own_delete = app
        .call("DELETE", &second_path, Some(&owner.token), None)
        .await;
    assert_eq!(own_delete.status, StatusCode::NO_CONTENT);
    let listed = app.call("GET", "/api/v1/products", None, None).await;
    assert_eq!(
        listed.body["items"],
        json!([]),
        "deleted products are not listed"
    );

    let missing = app
        .call(
            "GET",
            &format!("/api/v1/products/{}", Uuid::now_v7()),
            None,
            None,
        )
        .await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
    assert_eq!(missing.code(), "product_not_found");
    let not_uuid = app.call("GET", "/api/v1/products/abc", None, None).await;
    assert_eq!(not_uuid.status, StatusCode::NOT_FOUND);
    let not_uuid_patch = app
        .call(
            "PATCH",
            "/api/v1/products/abc",
            Some(&owner.token),
            Some(json!({})),
        )
        .await;
    assert_eq!(not_uuid_patch.status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn bulk_create_is_all_or_nothing() {
    let app = TestApp::new().await;
    let seller = app.member(Role::Seller).await;
    let mut items: Vec<Value> = (0..50).map(|i| product(&format!("item {i}"))).collect();
    items[3]["price"] = json!(-1);
    items[7] = json!({"name": "wrong type", "price": "a lot", "kind": "regular"});
    items[9]["kind"] = json!("gift");

    let response = bulk(&app, &seller.token, json!({"items": items})).await;
    assert_eq!(response.status, StatusCode::UNPROCESSABLE_ENTITY);
    let fields = response.body["error"]["fields"].as_object().unwrap();
    assert_eq!(
        fields.keys().collect::<Vec<_>>(),
        ["items[3].price", "items[7]", "items[9].kind"],
        "{fields:?}"
    );
    assert_eq!(count_products(&app).await, 0, "nothing stored");

    let customer = app.member(Role::Customer).await;
    let denied = bulk(&app, &customer.token, json!({"items": [product("x")]})).await;
    assert_eq!(denied.status, StatusCode::FORBIDDEN);

    for bad in [json!({"items": []}), json!({})] {
        let response = bulk(&app, &seller.token, bad).await;
        assert_eq!(response.status, StatusCode::UNPROCESSABLE_ENTITY);
        assert!(response.body["error"]["fields"]["items"].is_string());
    }
}

#[tokio::test]
async fn bulk_create_takes_1000_items_in_order_and_refuses_1001() {
    let app = TestApp::new().await;
    let seller = app.member(Role::Seller).await;
    let items: Vec<Value> = (0..1000)
        .map(|i| product(&format!("bulk {i:04}")))
        .collect();
    let response = bulk(&app, &seller.token, json!({"items": items})).await;
    assert_eq!(
        response.status,
        StatusCode::CREATED,
        "{:?}",
        response.body["error"]
    );
    let created = response.body["items"].as_array().unwrap();
    assert_eq!(created.len(), 1000);
    for (i, item) in created.iter().enumerate() {
        assert_eq!(item["name"], format!("bulk {i:04}"), "the request's order");
        assert_eq!(item["seller_id"], seller.id.to_string());
    }
    assert_eq!(count_products(&app).await, 1000);

    let too_many: Vec<Value> = (0..1001).map(|i| product(&format!("over {i}"))).collect();
    let response = bulk(&app, &seller.token, json!({"items": too_many})).await;
    assert_eq!(response.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(response.body["error"]["fields"]["items"].is_string());
    assert_eq!(count_products(&app).await, 1000);
}

#[tokio::test]
async fn pages_neither_skip_nor_repeat_while_rows_are_inserted() {
    let app = TestApp::new().await;
    let seller = app.member(Role::Seller).await;
    let items: Vec<Value> = (0..25).map(|i| product(&format!("old {i:02}"))).collect();
    let created = bulk(&app, &seller.token, json!({"items": items})).await;
    assert_eq!(created.status, StatusCode::CREATED);

    let seen = all_pages(&app, "limit=7", async |page| {
        // New products arrive between every page fetch.
        for i in 0..3 {
            create(&app, &seller.token, product(&format!("new {page}-{i}"))).await;
        }
    })
    .await;
    let old: Vec<&String> = seen.iter().filter(|name| name.starts_with("old")).collect();
    let expected: Vec<String> = (0..25).rev().map(|i| format!("old {i:02}")).collect();
    assert_eq!(
        old,
        expected.iter().collect::<Vec<_>>(),
        "every old row once, newest first"
    );
    let unique: HashSet<&String> = seen.iter().collect();
    assert_eq!(unique.len(), seen.len(), "no repeats");
    assert!(
        seen.iter().all(|name| name.starts_with("old")),
        "rows newer than page 1 come on a fresh listing"
    );

    // A fresh listing sees everything, newest first.
    let fresh = all_pages(&app, "limit=100", async |_| {}).await;
    assert_eq!(fresh.len(), 25 + 3 * 3);
    assert!(fresh[0].starts_with("new"));
}

#[tokio::test]
async fn search_is_case_insensitive_and_filters_by_kind() {
    let app = TestApp::new().await;
    let seller = app.member(Role::Seller).await;
    for (name, kind) in [
        ("Red SNEAKER", "regular"),
        ("blue sneaker", "preorder"),
        ("Sneakers 100% cotton", "regular"),
        ("Hat", "regular"),
        ("snake_case mug", "preorder"),
    ] {
        create(
            &app,
            &seller.token,
            json!({"name": name, "price": 1, "kind": kind}),
        )
        .await;
    }
    let names = async |query: &str| {
        let mut names = all_pages(&app, query, async |_| {}).await;
        names.sort();
        names
    };
    assert_eq!(
        names("q=sNeAkEr").await,
        ["Red SNEAKER", "Sneakers 100% cotton", "blue sneaker"]
    );
    assert_eq!(names("q=sneaker&kind=preorder").await, ["blue sneaker"]);
    assert_eq!(
        names("kind=preorder").await,
        ["blue sneaker", "snake_case mug"]
    );
    assert_eq!(names("kind=regular").await.len(), 3);
    // `%` and `_` match themselves, not any text.
    assert_eq!(names("q=100%25").await, ["Sneakers 100% cotton"]);
    assert_eq!(names("q=e_c").await, ["snake_case mug"]);
    assert!(names("q=%25").await.len() == 1);
    assert_eq!(names("q=").await.len(), 5, "a blank query filters nothing");

    for query in [
        "limit=0",
        "limit=101",
        "kind=gift",
        "cursor=zz",
        "limit=ten",
    ] {
        let response = app
            .call("GET", &format!("/api/v1/products?{query}"), None, None)
            .await;
        assert_eq!(response.status, StatusCode::UNPROCESSABLE_ENTITY, "{query}");
        assert_eq!(response.code(), "validation");
    }
    let page = app
        .call("GET", "/api/v1/products?limit=2", None, None)
        .await;
    assert_eq!(page.body["items"].as_array().unwrap().len(), 2);
    assert!(page.body["next_cursor"].is_string());
}
