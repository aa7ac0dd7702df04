//! In-process tests of the drop routes over the real engine and a real Postgres: the hold life cycle, the
//! payment outcomes, idempotency, back-pressure, fail-closed, and every bad input answering a 4xx, never a 500.
#![allow(
    clippy::too_many_lines,
    reason = "each test is one scenario read top to bottom: its setup, the fault or load, and every check"
)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use axum::http::StatusCode;
use chrono::Utc;
use common::{drop_state, keyed, pay, purchase_rows, reserve, TestApp};
use engine::clock::ManualClock;
use engine::core::{Counts, HoldView, ReserveRejection, TransitionError};
use engine::gate::{EmbeddedGate, Gate, GateResult, GateUnavailable, Reaped, Restore};
use engine::types::DropSpec;
use serde_json::{json, Value};
use shell_api::auth::Role;
use shell_api::config::EngineArgs;
use uuid::Uuid;

#[tokio::test]
async fn a_paid_hold_is_durable_when_the_payment_answers() {
    let app = TestApp::new().await;
    let (_, drop) = app
        .open_drop(3, 50_000, json!({ "per_member_limit": 2 }))
        .await;
    assert_eq!(drop["status"], "open");
    assert_eq!(drop["available"], 3);
    let buyer = app.member(Role::Customer).await;

    let held = reserve(&app, &buyer, &drop, 2).await;
    assert_eq!(held.status, StatusCode::CREATED, "{:?}", held.body);
    assert_eq!(held.body["status"], "held");
    assert_eq!(held.body["quantity"], 2);
    assert_eq!(held.body["member_id"], buyer.id.to_string());
    let id = held.body["id"].as_str().unwrap().to_owned();
    let state = drop_state(&app, &drop).await;
    assert_eq!(
        (state["available"].as_u64(), state["held"].as_u64()),
        (Some(1), Some(2))
    );

    let paid = pay(&app, &buyer, &id, "tok_ok").await;
    assert_eq!(paid.status, StatusCode::OK, "{:?}", paid.body);
    assert_eq!(paid.body["status"], "paid");
    assert_eq!(paid.body["amount"], 100_000);
    assert_eq!(paid.body["currency"], "KRW");
    // The 200 means the purchase is already committed: no waiting, no flush.
    assert_eq!(purchase_rows(&app, &id).await, 1);

    let again = pay(&app, &buyer, &id, "tok_ok").await;
    assert_eq!(again.status, StatusCode::OK);
    assert_eq!(again.body, paid.body, "paying twice answers the same body");
    assert_eq!(purchase_rows(&app, &id).await, 1);
    assert_eq!(app.gateway.charges(), 1, "charged once");

    let state = drop_state(&app, &drop).await;
    assert_eq!(
        (state["sold"].as_u64(), state["held"].as_u64()),
        (Some(2), Some(0))
    );

    let view = app
        .call(
            "GET",
            &format!("/api/v1/reservations/{id}"),
            Some(&buyer.token),
            None,
        )
        .await;
    assert_eq!(view.body["status"], "paid");
    assert_eq!(view.body["purchase_id"], paid.body["purchase_id"]);

    let purchases = app
        .call(
            "GET",
            "/api/v1/members/me/purchases",
            Some(&buyer.token),
            None,
        )
        .await;
    assert_eq!(purchases.status, StatusCode::OK);
    let items = purchases.body["items"].as_array().unwrap();
    assert_eq!(items.len(), 1);
    assert_eq!(items[0]["id"], paid.body["purchase_id"]);
    assert_eq!(items[0]["quantity"], 2);

    // A paid hold cannot be cancelled, and its units stay sold.
    let cancel = app
        .call(
            "DELETE",
            &format!("/api/v1/reservations/{id}"),
            Some(&buyer.token),
            None,
        )
        .await;
    assert_eq!(cancel.status, StatusCode::CONFLICT);
    assert_eq!(cancel.code(), "already_paid");
}

#[tokio::test]
async fn holds_settled_before_a_restart_answer_as_they_did() {
    let mut app = TestApp::new().await;
    let (_, drop) = app.open_drop(5, 10_000, json!({})).await;
    let (paid_by, cancelled_by, declined_by, holding) = (
        app.member(Role::Customer).await,
        app.member(Role::Customer).await,
        app.member(Role::Customer).await,
        app.member(Role::Customer).await,
    );
    let hold_for = |response: common::TestResponse| {
        assert_eq!(response.status, StatusCode::CREATED, "{:?}", response.body);
        response.body["id"].as_str().unwrap().to_owned()
    };
    let paid = hold_for(reserve(&app, &paid_by, &drop, 1).await);
    let cancelled = hold_for(reserve(&app, &cancelled_by, &drop, 1).await);
    let declined = hold_for(reserve(&app, &declined_by, &drop, 1).await);
    let live = hold_for(reserve(&app, &holding, &drop, 1).await);
    let first = pay(&app, &paid_by, &paid, "tok_ok").await;
    assert_eq!(first.status, StatusCode::OK, "{:?}", first.body);
    let path = |id: &str| format!("/api/v1/reservations/{id}");
    let cancel = app
        .call("DELETE", &path(&cancelled), Some(&cancelled_by.token), None)
        .await;
    assert_eq!(cancel.status, StatusCode::NO_CONTENT);
    assert_eq!(
        pay(&app, &declined_by, &declined, "tok_declined")
            .await
            .status,
        StatusCode::PAYMENT_REQUIRED
    );

    // A new process knows only the live hold; the rest are known to Postgres alone.
    app = app.restart().await;

    // Paying again across the restart answers the same purchase, to its owner only, and charges nothing.
    let again = pay(&app, &paid_by, &paid, "tok_ok").await;
    assert_eq!(again.status, StatusCode::OK, "{:?}", again.body);
    for field in [
        "reservation_id",
        "purchase_id",
        "status",
        "amount",
        "currency",
    ] {
        assert_eq!(again.body[field], first.body[field], "{field}");
    }
    assert_eq!(app.gateway.charges(), 0);
    assert_eq!(purchase_rows(&app, &paid).await, 1);
    let stranger = pay(&app, &holding, &paid, "tok_ok").await;
    assert_eq!(stranger.status, StatusCode::FORBIDDEN);
    let cancel_paid = app
        .call("DELETE", &path(&paid), Some(&paid_by.token), None)
        .await;
    assert_eq!(cancel_paid.code(), "already_paid");

    // Released holds stay released, with their reason.
    for (member, id) in [(&cancelled_by, &cancelled), (&declined_by, &declined)] {
        let repay = pay(&app, member, id, "tok_ok").await;
        assert_eq!(repay.status, StatusCode::CONFLICT, "{:?}", repay.body);
        assert_eq!(repay.code(), "already_released");
        let recancel = app
            .call("DELETE", &path(id), Some(&member.token), None)
            .await;
        assert_eq!(recancel.code(), "already_released");
    }
    let view = app
        .call("GET", &path(&cancelled), Some(&cancelled_by.token), None)
        .await;
    assert_eq!(view.body["status"], "released");
    assert_eq!(view.body["reason"], "cancelled");

    // The live hold came back with its id and can be paid; unknown ids are still 404.
    let live_paid = pay(&app, &holding, &live, "tok_ok").await;
    assert_eq!(live_paid.status, StatusCode::OK, "{:?}", live_paid.body);
    let unknown = pay(&app, &holding, &Uuid::now_v7().to_string(), "tok_ok").await;
    assert_eq!(unknown.code(), "reservation_not_found");
    let state = drop_state(&app, &drop).await;
    assert_eq!(
        (
            state["sold"].as_u64(),
            state["held"].as_u64(),
            state["available"].as_u64()
        ),
        (Some(2), Some(0), Some(3))
    );
}

#[tokio::test]
async fn listing_by_status_fills_pages_and_misses_no_drop() {
    let app = TestApp::new().await;
    let buyer = app.member(Role::Customer).await;
    // Oldest first: open, sold out, sold out, open, sold out, open. Lists run newest first.
    let mut open = Vec::new();
    let mut sold_out = Vec::new();
    for sells_out in [false, true, true, false, true, false] {
        let (_, drop) = app.open_drop(1, 1_000, json!({})).await;
        if sells_out {
            assert_eq!(
                reserve(&app, &buyer, &drop, 1).await.status,
                StatusCode::CREATED
            );
            sold_out.push(drop["id"].as_str().unwrap().to_owned());
        } else {
            open.push(drop["id"].as_str().unwrap().to_owned());
        }
    }
    open.reverse();
    sold_out.reverse();

    // Follows cursors; every page but the last is full.
    let walk = |status: &'static str, limit: usize| {
        let app = &app;
        async move {
            let mut seen = Vec::new();
            let mut cursor: Option<String> = None;
            loop {
                let mut path = format!("/api/v1/drops?status={status}&limit={limit}");
                if let Some(cursor) = &cursor {
                    path.push_str(&format!("&cursor={cursor}"));
                }
                let page = app.call("GET", &path, None, None).await;
                assert_eq!(page.status, StatusCode::OK, "{:?}", page.body);
                let items = page.body["items"].as_array().unwrap().clone();
                for item in &items {
                    assert_eq!(item["status"], status);
                    seen.push(item["id"].as_str().unwrap().to_owned());
                }
                match page.body["next_cursor"].as_str() {
                    Some(next) => {
                        assert_eq!(items.len(), limit, "a page before the last is full");
                        cursor = Some(next.to_owned());
                    }
                    None => return seen,
                }
            }
        }
    };
    assert_eq!(walk("open", 1).await, open);
    assert_eq!(walk("open", 2).await, open);
    assert_eq!(walk("sold_out", 2).await, sold_out);
    assert_eq!(walk("sold_out", 3).await, sold_out);
    let everything = app.call("GET", "/api/v1/drops?limit=100", None, None).await;
    assert_eq!(everything.body["items"].as_array().unwrap().len(), 6);
    assert!(everything.body["next_cursor"].is_null());
}

#[tokio::test]
async fn released_holds_return_to_sale_and_clear_the_sold_out_flag() {
    let app = TestApp::new().await;
    let (_, drop) = app.open_drop(1, 1000, json!({})).await;
    let (a, b) = (
        app.member(Role::Customer).await,
        app.member(Role::Customer).await,
    );

    // Cancel.
    let held = reserve(&app, &a, &drop, 1).await;
    assert_eq!(held.status, StatusCode::CREATED);
    let sold_out = reserve(&app, &b, &drop, 1).await;
    assert_eq!(sold_out.status, StatusCode::CONFLICT);
    assert_eq!(sold_out.code(), "sold_out");
    assert_eq!(drop_state(&app, &drop).await["status"], "sold_out");
    let id = held.body["id"].as_str().unwrap();
    let cancel = app
        .call(
            "DELETE",
            &format!("/api/v1/reservations/{id}"),
            Some(&a.token),
            None,
        )
        .await;
    assert_eq!(cancel.status, StatusCode::NO_CONTENT);
    let view = app
        .call(
            "GET",
            &format!("/api/v1/reservations/{id}"),
            Some(&a.token),
            None,
        )
        .await;
    assert_eq!(
        (view.body["status"].as_str(), view.body["reason"].as_str()),
        (Some("released"), Some("cancelled"))
    );
    assert_eq!(pay(&app, &a, id, "tok_ok").await.code(), "already_released");

    // Decline: 402, and the unit is back.
    let held = reserve(&app, &b, &drop, 1).await;
    assert_eq!(
        held.status,
        StatusCode::CREATED,
        "the flag cleared: {:?}",
        held.body
    );
    let id = held.body["id"].as_str().unwrap();
    let declined = pay(&app, &b, id, "tok_declined").await;
    assert_eq!(declined.status, StatusCode::PAYMENT_REQUIRED);
    assert_eq!(declined.code(), "payment_declined");
    let view = app
        .call(
            "GET",
            &format!("/api/v1/reservations/{id}"),
            Some(&b.token),
            None,
        )
        .await;
    assert_eq!(view.body["reason"], "payment_declined");
    assert_eq!(drop_state(&app, &drop).await["available"], 1);

    // Gateway unavailable: 503 with Retry-After, the hold is kept, and a retry pays.
    let held = reserve(&app, &a, &drop, 1).await;
    assert_eq!(held.status, StatusCode::CREATED);
    let id = held.body["id"].as_str().unwrap();
    let unavailable = pay(&app, &a, id, "tok_unavailable").await;
    assert_eq!(unavailable.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(unavailable.headers.contains_key("retry-after"));
    let view = app
        .call(
            "GET",
            &format!("/api/v1/reservations/{id}"),
            Some(&a.token),
            None,
        )
        .await;
    assert_eq!(view.body["status"], "held");
    assert_eq!(pay(&app, &a, id, "tok_ok").await.status, StatusCode::OK);
    let state = drop_state(&app, &drop).await;
    assert_eq!(
        (state["sold"].as_u64(), state["status"].as_str()),
        (Some(1), Some("sold_out"))
    );
}

#[tokio::test]
async fn expired_holds_are_reaped_and_cannot_be_paid() {
    let opens = Utc::now() - chrono::Duration::seconds(5);
    let clock = Arc::new(ManualClock::new(Utc::now().timestamp_millis()));
    let app = TestApp::with_clock(EngineArgs::default(), clock.clone()).await;
    let seller = app.member(Role::Seller).await;
    let product = app.product(&seller, 10).await;
    let drop = app
        .drop(&seller, json!({ "product_id": product, "stock": 2, "opens_at": opens.to_rfc3339(), "hold_seconds": 60 }))
        .await;
    let (a, b) = (
        app.member(Role::Customer).await,
        app.member(Role::Customer).await,
    );
    let first = reserve(&app, &a, &drop, 1).await.body["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let second = reserve(&app, &b, &drop, 1).await.body["id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(drop_state(&app, &drop).await["available"], 0);

    clock.advance_ms(60_000);
    // Paying at or past expiry: 409, and the unit returns at once.
    let late = pay(&app, &a, &first, "tok_ok").await;
    assert_eq!(late.status, StatusCode::CONFLICT);
    assert_eq!(late.code(), "hold_expired");
    assert_eq!(drop_state(&app, &drop).await["available"], 1);
    assert_eq!(
        app.gateway.charges(),
        0,
        "nothing charged for an expired hold"
    );

    // The reaper returns the other one.
    assert_eq!(app.state.engine.reap().await.unwrap(), 1);
    let state = drop_state(&app, &drop).await;
    assert_eq!(
        (state["available"].as_u64(), state["held"].as_u64()),
        (Some(2), Some(0))
    );
    let view = app
        .call(
            "GET",
            &format!("/api/v1/reservations/{second}"),
            Some(&b.token),
            None,
        )
        .await;
    assert_eq!(
        (view.body["status"].as_str(), view.body["reason"].as_str()),
        (Some("released"), Some("expired"))
    );
    // The releases reach Postgres too.
    app.state.engine.writer().flush().await.unwrap();
    let released: i64 = app
        .db
        .client()
        .await
        .query_one(
            "SELECT count(*) FROM reservations WHERE status = 'released' AND reason = 'expired'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(released, 2);
    // Stock that came back is sellable again.
    assert_eq!(
        reserve(&app, &b, &drop, 1).await.status,
        StatusCode::CREATED
    );
}

#[tokio::test]
async fn a_drop_refuses_reservations_before_it_opens_to_the_millisecond() {
    let clock = Arc::new(ManualClock::new(Utc::now().timestamp_millis()));
    let app = TestApp::with_clock(EngineArgs::default(), clock.clone()).await;
    let seller = app.member(Role::Seller).await;
    let product = app.product(&seller, 10).await;
    let opens_ms = engine::clock::Clock::now_ms(&*clock) + 10_000;
    let opens = chrono::DateTime::from_timestamp_millis(opens_ms).unwrap();
    let closes = opens + chrono::Duration::seconds(30);
    let drop = app
        .drop(&seller, json!({ "product_id": product, "stock": 5, "opens_at": opens.to_rfc3339(), "closes_at": closes.to_rfc3339() }))
        .await;
    assert_eq!(drop["status"], "scheduled");
    let buyer = app.member(Role::Customer).await;

    clock.set_ms(opens_ms - 1);
    let early = reserve(&app, &buyer, &drop, 1).await;
    assert_eq!(early.status, StatusCode::CONFLICT);
    assert_eq!(early.code(), "not_open");

    clock.set_ms(opens_ms);
    let on_time = reserve(&app, &buyer, &drop, 1).await;
    assert_eq!(on_time.status, StatusCode::CREATED);
    assert_eq!(drop_state(&app, &drop).await["status"], "open");

    clock.set_ms(closes.timestamp_millis());
    let late = reserve(&app, &app.member(Role::Customer).await, &drop, 1).await;
    assert_eq!(late.status, StatusCode::CONFLICT);
    assert_eq!(late.code(), "closed");
    assert_eq!(drop_state(&app, &drop).await["status"], "closed");
}

#[tokio::test]
async fn bad_input_is_refused_with_the_right_status() {
    let app = TestApp::new().await;
    let (seller, drop) = app.open_drop(5, 10, json!({ "per_member_limit": 2 })).await;
    let (a, b) = (
        app.member(Role::Customer).await,
        app.member(Role::Customer).await,
    );

    let unknown = app
        .call(
            "POST",
            &format!("/api/v1/drops/{}/reservations", Uuid::now_v7()),
            Some(&a.token),
            Some(json!({})),
        )
        .await;
    assert_eq!(
        (unknown.status, unknown.code()),
        (StatusCode::NOT_FOUND, "drop_not_found")
    );
    let not_uuid = app
        .call(
            "POST",
            "/api/v1/drops/not-a-uuid/reservations",
            Some(&a.token),
            Some(json!({})),
        )
        .await;
    assert_eq!(not_uuid.status, StatusCode::NOT_FOUND);
    assert_eq!(
        app.call(
            "GET",
            &format!("/api/v1/drops/{}", Uuid::now_v7()),
            None,
            None
        )
        .await
        .status,
        StatusCode::NOT_FOUND
    );

    for quantity in [0, -1, 3] {
        let bad = reserve(&app, &a, &drop, quantity).await;
        assert_eq!(
            bad.status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "quantity {quantity}: {:?}",
            bad.body
        );
        assert_eq!(bad.code(), "validation");
    }
    let path = format!(
        "/api/v1/drops/{}/reservations",
        drop["id"].as_str().unwrap()
    );
    let text = app
        .call(
            "POST",
            &path,
            Some(&a.token),
            Some(json!({ "quantity": "two" })),
        )
        .await;
    assert_eq!(text.status, StatusCode::UNPROCESSABLE_ENTITY);
    let malformed = app
        .send(
            axum::http::Request::post(&path)
                .header("authorization", format!("Bearer {}", a.token))
                .header("content-type", "application/json")
                .body(axum::body::Body::from("{\"quantity\":"))
                .unwrap(),
        )
        .await;
    assert_eq!(malformed.status, StatusCode::BAD_REQUEST);
    let anonymous = app.call("POST", &path, None, Some(json!({}))).await;
    assert_eq!(anonymous.status, StatusCode::UNAUTHORIZED);
    // An empty body means quantity 1.
    let empty = app.call("POST", &path, Some(&b.token), None).await;
    assert_eq!(empty.status, StatusCode::CREATED, "{:?}", empty.body);

    // The limit counts held and paid units.
    let held = reserve(&app, &a, &drop, 2).await;
    assert_eq!(held.status, StatusCode::CREATED);
    let over = reserve(&app, &a, &drop, 1).await;
    assert_eq!(
        (over.status, over.code()),
        (StatusCode::CONFLICT, "limit_exceeded")
    );

    // Another member's hold: not yours to pay, read or cancel.
    let id = held.body["id"].as_str().unwrap();
    assert_eq!(
        pay(&app, &b, id, "tok_ok").await.status,
        StatusCode::FORBIDDEN
    );
    let read = app
        .call(
            "GET",
            &format!("/api/v1/reservations/{id}"),
            Some(&b.token),
            None,
        )
        .await;
    assert_eq!(read.status, StatusCode::FORBIDDEN);
    let cancel = app
        .call(
            "DELETE",
            &format!("/api/v1/reservations/{id}"),
            Some(&b.token),
            None,
        )
        .await;
    assert_eq!(cancel.status, StatusCode::FORBIDDEN);
    // The seller (not admin) may read it neither.
    let read = app
        .call(
            "GET",
            &format!("/api/v1/reservations/{id}"),
            Some(&seller.token),
            None,
        )
        .await;
    assert_eq!(read.status, StatusCode::FORBIDDEN);
    let admin = app.member(Role::Admin).await;
    let read = app
        .call(
            "GET",
            &format!("/api/v1/reservations/{id}"),
            Some(&admin.token),
            None,
        )
        .await;
    assert_eq!(read.status, StatusCode::OK);
    let missing = pay(&app, &a, &Uuid::now_v7().to_string(), "tok_ok").await;
    assert_eq!(
        (missing.status, missing.code()),
        (StatusCode::NOT_FOUND, "reservation_not_found")
    );
    let no_token = app
        .call(
            "POST",
            &format!("/api/v1/reservations/{id}/payment"),
            Some(&a.token),
            Some(json!({})),
        )
        .await;
    assert_eq!(no_token.status, StatusCode::UNPROCESSABLE_ENTITY);
    let bad_key = app
        .call_with(
            "POST",
            &path,
            &b.token,
            &[("idempotency-key", &"k".repeat(129))],
            Some(json!({})),
        )
        .await;
    assert_eq!(bad_key.status, StatusCode::UNPROCESSABLE_ENTITY);

    // Creating drops: validation, roles, ownership.
    let product = app.product(&seller, 10).await;
    let now = Utc::now().to_rfc3339();
    let customer = app
        .call(
            "POST",
            "/api/v1/drops",
            Some(&a.token),
            Some(json!({ "product_id": product, "stock": 1, "opens_at": now })),
        )
        .await;
    assert_eq!(customer.status, StatusCode::FORBIDDEN);
    let other_seller = app.member(Role::Seller).await;
    let not_owner = app
        .call(
            "POST",
            "/api/v1/drops",
            Some(&other_seller.token),
            Some(json!({ "product_id": product, "stock": 1, "opens_at": now })),
        )
        .await;
    assert_eq!(not_owner.status, StatusCode::FORBIDDEN);
    let invalid = app
        .call(
            "POST",
            "/api/v1/drops",
            Some(&seller.token),
            Some(json!({ "product_id": product, "stock": 0, "opens_at": now, "hold_seconds": 0, "per_member_limit": -1,
                         "closes_at": "2000-01-01T00:00:00Z" })),
        )
        .await;
    assert_eq!(invalid.status, StatusCode::UNPROCESSABLE_ENTITY);
    for field in ["stock", "hold_seconds", "per_member_limit", "closes_at"] {
        assert!(
            invalid.body["error"]["fields"][field].is_string(),
            "{field}: {:?}",
            invalid.body
        );
    }
    let no_product = app
        .call(
            "POST",
            "/api/v1/drops",
            Some(&seller.token),
            Some(json!({ "product_id": Uuid::now_v7(), "stock": 1, "opens_at": now })),
        )
        .await;
    assert_eq!(no_product.status, StatusCode::UNPROCESSABLE_ENTITY);
    let bad_time = app
        .call(
            "POST",
            "/api/v1/drops",
            Some(&seller.token),
            Some(json!({ "product_id": product, "stock": 1, "opens_at": "tomorrow" })),
        )
        .await;
    assert_eq!(bad_time.status, StatusCode::UNPROCESSABLE_ENTITY);
    let by_admin = app
        .call(
            "POST",
            "/api/v1/drops",
            Some(&admin.token),
            Some(json!({ "product_id": product, "stock": 1, "opens_at": now })),
        )
        .await;
    assert_eq!(by_admin.status, StatusCode::CREATED);
    let list = app
        .call("GET", "/api/v1/drops?status=bogus", None, None)
        .await;
    assert_eq!(list.status, StatusCode::UNPROCESSABLE_ENTITY);
}

#[tokio::test]
async fn idempotency_keys_replay_the_first_answer() {
    let app = TestApp::new().await;
    let (_, drop) = app
        .open_drop(10, 700, json!({ "per_member_limit": 5 }))
        .await;
    let buyer = app.member(Role::Customer).await;
    let path = format!(
        "/api/v1/drops/{}/reservations",
        drop["id"].as_str().unwrap()
    );

    // Ten concurrent retries of one request: one hold.
    let mut tasks = Vec::new();
    let app = Arc::new(app);
    for _ in 0..10 {
        let (app, path, token) = (app.clone(), path.clone(), buyer.token.clone());
        tasks.push(tokio::spawn(async move {
            app.call_with(
                "POST",
                &path,
                &token,
                &[("idempotency-key", "order-1")],
                Some(json!({ "quantity": 1 })),
            )
            .await
        }));
    }
    let mut ids = Vec::new();
    for task in tasks {
        let response = task.await.unwrap();
        assert_eq!(response.status, StatusCode::CREATED);
        ids.push(response.body["id"].as_str().unwrap().to_owned());
    }
    ids.dedup();
    assert_eq!(ids.len(), 1, "one hold for one key");
    assert_eq!(drop_state(&app, &drop).await["held"], 1);

    // Another key is another hold; the same key on another member is that member's own.
    let second = keyed(&app, &path, &buyer, "order-2", json!({})).await;
    assert_ne!(second.body["id"].as_str().unwrap(), ids[0]);
    let other = app.member(Role::Customer).await;
    let theirs = keyed(&app, &path, &other, "order-1", json!({})).await;
    assert_ne!(theirs.body["id"].as_str().unwrap(), ids[0]);

    // Payments: the same key answers the same body, one charge.
    let pay_path = format!("/api/v1/reservations/{}/payment", ids[0]);
    let first = keyed(
        &app,
        &pay_path,
        &buyer,
        "pay-1",
        json!({ "payment_token": "tok_ok" }),
    )
    .await;
    let repeat = keyed(
        &app,
        &pay_path,
        &buyer,
        "pay-1",
        json!({ "payment_token": "tok_ok" }),
    )
    .await;
    assert_eq!(first.status, StatusCode::OK);
    assert_eq!(repeat.status, StatusCode::OK);
    assert_eq!(first.body, repeat.body);
    assert_eq!(repeat.headers.get("idempotent-replayed").unwrap(), "true");
    assert_eq!(app.gateway.charges(), 1);

    // A refusal that did something (402 releases the hold) is replayed too, not retried.
    let declined_id = second.body["id"].as_str().unwrap();
    let pay_path = format!("/api/v1/reservations/{declined_id}/payment");
    let declined = keyed(
        &app,
        &pay_path,
        &buyer,
        "pay-2",
        json!({ "payment_token": "tok_declined" }),
    )
    .await;
    let replayed = keyed(
        &app,
        &pay_path,
        &buyer,
        "pay-2",
        json!({ "payment_token": "tok_ok" }),
    )
    .await;
    assert_eq!(declined.status, StatusCode::PAYMENT_REQUIRED);
    assert_eq!(
        (replayed.status, replayed.body.clone()),
        (declined.status, declined.body)
    );
}

/// A gate that can be switched off (fail closed), made slow (to fill the in-flight bound), or made to believe its
/// drops have `extra_stock` more units than they do (as a gate that lost or never had the truth might).
struct TestGate {
    inner: EmbeddedGate,
    down: AtomicBool,
    slow: AtomicBool,
    extra_stock: u32,
}

impl TestGate {
    fn new(slow: bool, extra_stock: u32) -> Self {
        Self {
            inner: EmbeddedGate::new(4),
            down: AtomicBool::new(false),
            slow: AtomicBool::new(slow),
            extra_stock,
        }
    }
}

#[async_trait]
impl Gate for TestGate {
    async fn load(
        &self,
        drop: &DropSpec,
        restore: Restore,
    ) -> GateResult<Result<(), engine::core::RestoreError>> {
        let believed = DropSpec {
            stock: drop.stock + self.extra_stock,
            ..drop.clone()
        };
        self.inner.load(&believed, restore).await
    }
    fn is_sold_out(&self, drop: Uuid) -> bool {
        self.inner.is_sold_out(drop)
    }
    async fn reserve(
        &self,
        drop: Uuid,
        hold: Uuid,
        member: Uuid,
        quantity: u32,
        now_ms: i64,
    ) -> GateResult<Result<HoldView, ReserveRejection>> {
        if self.down.load(Ordering::SeqCst) {
            return Err(GateUnavailable("switched off by the test".into()));
        }
        if self.slow.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(400)).await;
        }
        self.inner
            .reserve(drop, hold, member, quantity, now_ms)
            .await
    }
    async fn locate(&self, hold: Uuid) -> GateResult<Option<Uuid>> {
        self.inner.locate(hold).await
    }
    async fn begin_payment(
        &self,
        drop: Uuid,
        hold: Uuid,
        member: Uuid,
        now_ms: i64,
    ) -> GateResult<Result<HoldView, TransitionError>> {
        self.inner.begin_payment(drop, hold, member, now_ms).await
    }
    async fn complete_payment(
        &self,
        drop: Uuid,
        hold: Uuid,
    ) -> GateResult<Result<HoldView, TransitionError>> {
        self.inner.complete_payment(drop, hold).await
    }
    async fn abort_payment(
        &self,
        drop: Uuid,
        hold: Uuid,
    ) -> GateResult<Result<HoldView, TransitionError>> {
        self.inner.abort_payment(drop, hold).await
    }
    async fn decline_payment(
        &self,
        drop: Uuid,
        hold: Uuid,
    ) -> GateResult<Result<HoldView, TransitionError>> {
        self.inner.decline_payment(drop, hold).await
    }
    async fn cancel(
        &self,
        drop: Uuid,
        hold: Uuid,
        member: Uuid,
    ) -> GateResult<Result<HoldView, TransitionError>> {
        self.inner.cancel(drop, hold, member).await
    }
    async fn release_fenced(
        &self,
        drop: Uuid,
        hold: Uuid,
    ) -> GateResult<Result<HoldView, TransitionError>> {
        self.inner.release_fenced(drop, hold).await
    }
    async fn reap(&self, now_ms: i64, out: &mut Reaped) -> GateResult<usize> {
        self.inner.reap(now_ms, out).await
    }
    async fn hold(&self, drop: Uuid, hold: Uuid) -> GateResult<Option<HoldView>> {
        self.inner.hold(drop, hold).await
    }
    async fn unload(&self, drop: Uuid) {
        self.inner.unload(drop).await
    }
    async fn counts(&self, drop: Uuid) -> GateResult<Option<Counts>> {
        self.inner.counts(drop).await
    }
}

#[tokio::test]
async fn an_unreachable_gate_refuses_with_503_and_grants_nothing() {
    let gate = Arc::new(TestGate::new(false, 0));
    let app = TestApp::with_gate(EngineArgs::default(), gate.clone()).await;
    let (_, drop) = app.open_drop(5, 10, json!({})).await;
    let buyer = app.member(Role::Customer).await;
    gate.down.store(true, Ordering::SeqCst);
    let refused = reserve(&app, &buyer, &drop, 1).await;
    assert_eq!(
        (refused.status, refused.code()),
        (StatusCode::SERVICE_UNAVAILABLE, "gate_unavailable")
    );
    assert!(refused.headers.contains_key("retry-after"));
    let state = drop_state(&app, &drop).await;
    assert_eq!(
        (state["available"].as_u64(), state["held"].as_u64()),
        (Some(5), Some(0))
    );
    gate.down.store(false, Ordering::SeqCst);
    assert_eq!(
        reserve(&app, &buyer, &drop, 1).await.status,
        StatusCode::CREATED
    );
}

#[tokio::test]
async fn past_the_in_flight_bound_reservations_get_429_at_once() {
    let gate = Arc::new(TestGate::new(true, 0));
    let args = EngineArgs {
        reserve_inflight_max: 2,
        ..EngineArgs::default()
    };
    let app = Arc::new(TestApp::with_gate(args, gate.clone()).await);
    let (_, drop) = app.open_drop(100, 10, json!({})).await;
    let mut tasks = Vec::new();
    for _ in 0..6 {
        let app = app.clone();
        let drop = drop.clone();
        let buyer = app.member(Role::Customer).await;
        tasks.push(tokio::spawn(async move {
            let started = std::time::Instant::now();
            let response = reserve(&app, &buyer, &drop, 1).await;
            (response, started.elapsed())
        }));
    }
    let mut created = 0;
    let mut refused = 0;
    for task in tasks {
        let (response, elapsed) = task.await.unwrap();
        match response.status {
            StatusCode::CREATED => created += 1,
            StatusCode::TOO_MANY_REQUESTS => {
                refused += 1;
                assert_eq!(response.headers.get("retry-after").unwrap(), "1");
                assert!(
                    elapsed < Duration::from_millis(300),
                    "refused at once, not queued: {elapsed:?}"
                );
            }
            other => panic!("unexpected {other}: {:?}", response.body),
        }
    }
    assert_eq!(created, 2, "exactly the bound got through");
    assert_eq!(refused, 4);
    assert_eq!(drop_state(&app, &drop).await["held"], 2);
}

/// A process that sells drops for weeks keeps only live ones: a settled drop leaves memory, and everything about it
/// is still answered, from Postgres, exactly as before.
#[tokio::test]
async fn settled_drops_leave_memory_and_still_answer_the_same() {
    let args = EngineArgs {
        drop_retain_seconds: 0,
        // The test unloads by hand; the reaper's own sweeps (every tick at a retention of 0) would race it.
        reaper_interval_ms: 3_600_000,
        ..EngineArgs::default()
    };
    let app = TestApp::with_engine_args(args).await;
    let (_, live) = app.open_drop(5, 10, json!({})).await;
    let (_, drop) = app.open_drop(1, 10, json!({})).await;
    let buyer = app.member(Role::Customer).await;
    let held = reserve(&app, &buyer, &drop, 1).await;
    let id = held.body["id"].as_str().unwrap().to_owned();
    let paid = pay(&app, &buyer, &id, "tok_ok").await;
    assert_eq!(paid.status, StatusCode::OK);
    app.state.engine.writer().flush().await.unwrap();
    let engine = &app.state.engine;
    assert_eq!(engine.loaded_drops(), 2);
    let journal_rows = |drop: &Value| {
        let drop: Uuid = drop["id"].as_str().unwrap().parse().unwrap();
        let db = &app.db;
        async move {
            let row = db
                .client()
                .await
                .query_one(
                    "SELECT count(*) FROM hold_batches WHERE drop_id = $1",
                    &[&drop],
                )
                .await
                .unwrap();
            row.get::<_, i64>(0)
        }
    };
    assert_eq!(journal_rows(&drop).await, 1, "the hold was journaled");
    // The sold-out drop with no holds is settled; the other still sells.
    assert_eq!(engine.unload_settled().await.unwrap(), 1);
    assert_eq!(engine.loaded_drops(), 1);
    assert_eq!(
        journal_rows(&drop).await,
        0,
        "an unloaded drop's journal is gone"
    );
    assert_eq!(
        engine.unload_settled().await.unwrap(),
        0,
        "a live drop stays"
    );
    let state = drop_state(&app, &drop).await;
    assert_eq!(
        (state["sold"].as_u64(), state["status"].as_str()),
        (Some(1), Some("sold_out"))
    );
    let again = pay(&app, &buyer, &id, "tok_ok").await;
    assert_eq!((again.status, &again.body), (StatusCode::OK, &paid.body));
    let read = app
        .call(
            "GET",
            &format!("/api/v1/reservations/{id}"),
            Some(&buyer.token),
            None,
        )
        .await;
    assert_eq!(read.body["status"], "paid");
    assert_eq!(reserve(&app, &buyer, &drop, 1).await.code(), "sold_out");
    assert_eq!(
        reserve(&app, &buyer, &live, 1).await.status,
        StatusCode::CREATED
    );
    assert_eq!(purchase_rows(&app, &id).await, 1);
}

/// One request through `service`: status, the headers a client reads, and the body as JSON.
async fn answer_of(
    service: impl tower::Service<
        axum::http::Request<axum::body::Body>,
        Response = axum::response::Response,
        Error = std::convert::Infallible,
    >,
    request: axum::http::Request<axum::body::Body>,
) -> (StatusCode, [Option<String>; 3], Value) {
    use http_body_util::BodyExt;
    use tower::ServiceExt;
    let response = service.oneshot(request).await.unwrap();
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .map(|v| v.to_str().unwrap().to_owned())
    };
    let headers = [
        header("content-type"),
        header("retry-after"),
        header("x-request-id"),
    ];
    let status = response.status();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        headers,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

#[tokio::test]
async fn the_hot_path_answers_every_reservation_as_the_routed_handler_does() {
    let app = TestApp::new().await;
    let (_, open) = app.open_drop(2, 100, json!({})).await;
    let (_, gone) = app.open_drop(1, 100, json!({})).await;
    let (_, later) = app
        .open_drop(
            5,
            100,
            json!({ "opens_at": (Utc::now() + chrono::Duration::hours(1)).to_rfc3339() }),
        )
        .await;
    let first = app.member(Role::Customer).await;
    assert_eq!(
        reserve(&app, &first, &gone, 1).await.status,
        StatusCode::CREATED
    );
    let [hot_buyer, routed_buyer] = [
        app.member(Role::Customer).await,
        app.member(Role::Customer).await,
    ];
    let path = |drop: &Value| {
        format!(
            "/api/v1/drops/{}/reservations",
            drop["id"].as_str().unwrap()
        )
    };
    let request = |path: &str, token: Option<&str>, headers: &[(&str, &str)], body: &str| {
        let mut builder = axum::http::Request::post(path);
        if let Some(token) = token {
            builder = builder.header("authorization", format!("Bearer {token}"));
        }
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        builder
            .body(axum::body::Body::from(body.to_owned()))
            .unwrap()
    };
    let long_key = "k".repeat(200);
    let huge = format!(r#"{{"quantity":1,"pad":"{}"}}"#, "x".repeat(1_100_000));
    let token = Some(hot_buyer.token.as_str());
    let refusals: Vec<(&str, axum::http::Request<axum::body::Body>, StatusCode)> = vec![
        (
            "no token",
            request(&path(&gone), None, &[], ""),
            StatusCode::UNAUTHORIZED,
        ),
        (
            "bad token",
            request(&path(&gone), Some("x.y.z"), &[], ""),
            StatusCode::UNAUTHORIZED,
        ),
        (
            "sold out",
            request(&path(&gone), token, &[], "{}"),
            StatusCode::CONFLICT,
        ),
        (
            "not open",
            request(&path(&later), token, &[], ""),
            StatusCode::CONFLICT,
        ),
        (
            "no such drop",
            request(
                &format!("/api/v1/drops/{}/reservations", Uuid::now_v7()),
                token,
                &[],
                "",
            ),
            StatusCode::NOT_FOUND,
        ),
        (
            "not a uuid",
            request("/api/v1/drops/nope/reservations", token, &[], ""),
            StatusCode::NOT_FOUND,
        ),
        (
            "zero",
            request(&path(&open), token, &[], r#"{"quantity":0}"#),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "over the limit",
            request(&path(&open), token, &[], r#"{"quantity":2}"#),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "unknown field",
            request(&path(&open), token, &[], r#"{"qty":1}"#),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "malformed",
            request(&path(&open), token, &[], "{"),
            StatusCode::BAD_REQUEST,
        ),
        (
            "bad key",
            request(&path(&open), token, &[("idempotency-key", &long_key)], ""),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "too large",
            request(
                &path(&open),
                token,
                &[("content-length", &huge.len().to_string())],
                &huge,
            ),
            StatusCode::PAYLOAD_TOO_LARGE,
        ),
    ];
    for (case, hot_request, expected) in refusals {
        let (method, uri, headers) = (
            hot_request.method().clone(),
            hot_request.uri().clone(),
            hot_request.headers().clone(),
        );
        let (parts, body) = hot_request.into_parts();
        let body = http_body_util::BodyExt::collect(body)
            .await
            .unwrap()
            .to_bytes();
        let mut routed_request = axum::http::Request::builder().method(method).uri(uri);
        *routed_request.headers_mut().unwrap() = headers;
        let routed_request = routed_request
            .body(axum::body::Body::from(body.clone()))
            .unwrap();
        let hot = answer_of(
            app.router.clone(),
            axum::http::Request::from_parts(parts, axum::body::Body::from(body)),
        )
        .await;
        let routed = answer_of(app.router.router().clone(), routed_request).await;
        assert_eq!(hot.0, expected, "{case}: {:?}", hot.2);
        assert_eq!(hot.0, routed.0, "{case}");
        assert_eq!(
            hot.1[..2],
            routed.1[..2],
            "{case}: content type and retry-after"
        );
        assert!(
            hot.1[2].is_some() && routed.1[2].is_some(),
            "{case}: a request id on both"
        );
        assert_eq!(hot.2, routed.2, "{case}: the same body");
    }

    // Granted the same way, and each member's limit counts holds made either way.
    let grant = |member: &common::TestMember, key: Option<&str>| {
        let headers: Vec<(&str, &str)> = key.map(|k| ("idempotency-key", k)).into_iter().collect();
        request(&path(&open), Some(&member.token), &headers, "")
    };
    let hot = answer_of(app.router.clone(), grant(&hot_buyer, Some("same-key"))).await;
    let routed = answer_of(app.router.router().clone(), grant(&routed_buyer, None)).await;
    assert_eq!(
        (hot.0, routed.0),
        (StatusCode::CREATED, StatusCode::CREATED)
    );
    assert_eq!(hot.1[0], routed.1[0]);
    let keys = |body: &Value| {
        body.as_object()
            .unwrap()
            .keys()
            .cloned()
            .collect::<Vec<_>>()
    };
    assert_eq!(keys(&hot.2), keys(&routed.2));
    for (body, member) in [(&hot.2, &hot_buyer), (&routed.2, &routed_buyer)] {
        assert_eq!(body["drop_id"], open["id"]);
        assert_eq!(body["member_id"], json!(member.id));
        assert_eq!(
            (body["quantity"].clone(), body["status"].clone()),
            (json!(1), json!("held"))
        );
        let expires: chrono::DateTime<Utc> = body["expires_at"].as_str().unwrap().parse().unwrap();
        assert!(expires > Utc::now());
    }
    // The hold as the hot path wrote it reads back the same through the router's GET.
    let read = app
        .call(
            "GET",
            &format!("/api/v1/reservations/{}", hot.2["id"].as_str().unwrap()),
            Some(&hot_buyer.token),
            None,
        )
        .await;
    assert_eq!(read.body, hot.2);
    // A retry with the key through the router gets the hot path's first answer, not a second hold.
    let replay = answer_of(
        app.router.router().clone(),
        grant(&hot_buyer, Some("same-key")),
    )
    .await;
    assert_eq!((replay.0, &replay.2), (StatusCode::CREATED, &hot.2));
    let again_hot = answer_of(app.router.clone(), grant(&routed_buyer, None)).await;
    let again_routed = answer_of(app.router.router().clone(), grant(&hot_buyer, None)).await;
    assert_eq!(
        (again_hot.0, again_routed.0),
        (StatusCode::CONFLICT, StatusCode::CONFLICT)
    );
    assert_eq!(again_hot.2, again_routed.2);
    assert_eq!(again_hot.2["error"]["code"], "limit_exceeded");
}

#[tokio::test]
async fn a_reservation_past_the_request_deadline_is_a_503_on_both_paths_and_holds_nothing() {
    let gate = Arc::new(TestGate::new(true, 0));
    let app = TestApp::with_gate(EngineArgs::default(), gate.clone()).await;
    let (_, drop) = app.open_drop(5, 10, json!({})).await;
    // The same engine behind an app whose requests may take 150 ms; the gate takes 400.
    let settings = shell_api::Settings {
        request_timeout: Duration::from_millis(150),
        ..shell_api::Settings::for_tests()
    };
    let hurried = shell_api::app(shell_api::AppState::new(
        app.state.db.clone(),
        settings,
        Arc::clone(&app.state.engine),
        None,
    ));
    let path = format!(
        "/api/v1/drops/{}/reservations",
        drop["id"].as_str().unwrap()
    );
    for (way, service) in [
        (
            "hot",
            tower::util::BoxCloneSyncService::new(hurried.clone()),
        ),
        (
            "routed",
            tower::util::BoxCloneSyncService::new(hurried.router().clone()),
        ),
    ] {
        let buyer = app.member(Role::Customer).await;
        let request = axum::http::Request::post(&path)
            .header("authorization", format!("Bearer {}", buyer.token))
            .body(axum::body::Body::empty())
            .unwrap();
        let (status, headers, body) = answer_of(service, request).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{way}: {body}");
        assert_eq!(body["error"]["code"], "request_timeout", "{way}");
        assert!(
            headers[1].is_some() && headers[2].is_some(),
            "{way}: Retry-After and a request id"
        );
    }
    // The stalled reservations were dropped before the gate granted them: nothing is held.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let state = drop_state(&app, &drop).await;
    assert_eq!(
        (state["available"].as_u64(), state["held"].as_u64()),
        (Some(5), Some(0))
    );
}

/// Guarantee 5a's backstop: a gate that believes a drop has twice its stock grants twice the holds, and every one of
/// them is paid for; Postgres stores exactly the stock, and each payment past it is refunded and answered 409
/// hold_expired, its hold released.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_refuses_paid_units_past_the_stock_whatever_the_gate_says() {
    const STOCK: usize = 3;
    let gate = Arc::new(TestGate::new(false, STOCK as u32));
    let app = Arc::new(TestApp::with_gate(EngineArgs::default(), gate).await);
    let (_, drop) = app.open_drop(STOCK as u32, 10, json!({})).await;
    let mut holds = Vec::new();
    for _ in 0..2 * STOCK {
        let buyer = app.member(Role::Customer).await;
        let hold = reserve(&app, &buyer, &drop, 1).await;
        assert_eq!(hold.status, StatusCode::CREATED, "the lying gate grants");
        holds.push((buyer, hold.body["id"].as_str().unwrap().to_owned()));
    }
    // Two alone (in batches of their own), then the rest at once (batches that pass the stock together).
    let mut answers = Vec::new();
    for (buyer, id) in holds.drain(..2) {
        answers.push(pay(&app, &buyer, &id, "tok_ok").await);
    }
    let tasks: Vec<_> = holds
        .into_iter()
        .map(|(buyer, id)| {
            let app = app.clone();
            tokio::spawn(async move { pay(&app, &buyer, &id, "tok_ok").await })
        })
        .collect();
    for task in tasks {
        answers.push(task.await.unwrap());
    }
    let paid = answers
        .iter()
        .filter(|a| a.status == StatusCode::OK)
        .count();
    let refused: Vec<_> = answers
        .iter()
        .filter(|a| a.status != StatusCode::OK)
        .map(|a| (a.status, a.code().to_owned()))
        .collect();
    assert_eq!(paid, STOCK, "{answers:?}");
    assert_eq!(
        refused,
        vec![(StatusCode::CONFLICT, "hold_expired".to_owned()); STOCK]
    );
    let id: Uuid = drop["id"].as_str().unwrap().parse().unwrap();
    assert_eq!(
        common::purchase_tally(&app.db, id).await,
        (STOCK as i64, STOCK as i64, STOCK as i64)
    );
    assert_eq!(common::stored_sold(&app.db, id).await as usize, STOCK);
    assert_eq!(
        app.gateway.charges(),
        STOCK,
        "the refused charges were refunded"
    );
    assert_eq!(app.gateway.refunds(), STOCK as u64);
    // The refused holds are released, not left paying or held.
    let state = drop_state(&app, &drop).await;
    assert_eq!(state["held"], 0, "{state}");
    assert_eq!(state["sold"], STOCK as u64, "{state}");
}

/// A gateway that hangs is given up after PAYMENT_TIMEOUT_MS: the payment answers 503 payment_unavailable at once
/// rather than when (if ever) the gateway answers, nothing stays charged, and the hold is held again, so its unit is
/// never stranded (here the buyer cancels and the unit is back on sale).
#[tokio::test]
async fn a_hung_gateway_is_given_up_after_the_payment_timeout_and_strands_no_unit() {
    let args = EngineArgs {
        payment_latency_ms: 600_000,
        payment_timeout_ms: 300,
        ..EngineArgs::default()
    };
    let app = TestApp::with_engine_args(args).await;
    let (_, drop) = app.open_drop(1, 10, json!({})).await;
    let buyer = app.member(Role::Customer).await;
    let hold = reserve(&app, &buyer, &drop, 1).await;
    let id = hold.body["id"].as_str().unwrap().to_owned();
    let started = std::time::Instant::now();
    let answer = pay(&app, &buyer, &id, "tok_ok").await;
    assert_eq!(
        (answer.status, answer.code()),
        (StatusCode::SERVICE_UNAVAILABLE, "payment_unavailable")
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(app.gateway.charges(), 0);
    let view = common::read_reservation(&app, &buyer, &id).await;
    assert_eq!(view.body["status"], "held");
    assert_eq!(
        common::cancel(&app, &buyer, &id).await.status,
        StatusCode::NO_CONTENT
    );
    let state = drop_state(&app, &drop).await;
    assert_eq!(
        (state["available"].as_u64(), state["sold"].as_u64()),
        (Some(1), Some(0))
    );
}

/// The id of a granted hold.
fn hold_id(response: &common::TestResponse) -> String {
    assert_eq!(response.status, StatusCode::CREATED, "{:?}", response.body);
    response.body["id"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn the_drop_report_counts_every_decision_in_its_second_and_in_total() {
    let start = Utc::now().timestamp_millis();
    let clock = Arc::new(ManualClock::new(start));
    let app = TestApp::with_clock(EngineArgs::default(), clock.clone()).await;
    let seller = app.member(Role::Seller).await;
    let product = app.product(&seller, 10).await;
    let opens = chrono::DateTime::from_timestamp_millis(start - 500).unwrap();
    let drop = app
        .drop(&seller, json!({ "product_id": product, "stock": 3, "opens_at": opens.to_rfc3339(), "hold_seconds": 60 }))
        .await;
    let id = drop["id"].as_str().unwrap().to_owned();
    let mut buyers = Vec::new();
    for _ in 0..6 {
        buyers.push(app.member(Role::Customer).await);
    }
    // Second 0: a hold, paid.
    let paid = hold_id(&reserve(&app, &buyers[0], &drop, 1).await);
    assert_eq!(
        pay(&app, &buyers[0], &paid, "tok_ok").await.status,
        StatusCode::OK
    );
    // Second 1: a hold cancelled, a hold declined, and a buyer over the limit.
    clock.advance_ms(1_000);
    let cancelled = hold_id(&reserve(&app, &buyers[1], &drop, 1).await);
    assert_eq!(
        common::cancel(&app, &buyers[1], &cancelled).await.status,
        StatusCode::NO_CONTENT
    );
    let declined = hold_id(&reserve(&app, &buyers[2], &drop, 1).await);
    assert_eq!(
        pay(&app, &buyers[2], &declined, "tok_declined")
            .await
            .status,
        StatusCode::PAYMENT_REQUIRED
    );
    assert_eq!(
        reserve(&app, &buyers[0], &drop, 1).await.code(),
        "limit_exceeded"
    );
    // Second 2: the last two units held, then sold out.
    clock.advance_ms(1_000);
    hold_id(&reserve(&app, &buyers[3], &drop, 1).await);
    hold_id(&reserve(&app, &buyers[4], &drop, 1).await);
    assert_eq!(reserve(&app, &buyers[5], &drop, 1).await.code(), "sold_out");
    // The reaper's tick takes the counts every second; a minute later both holds expire.
    app.state.engine.record_report().await;
    clock.advance_ms(60_000);
    assert_eq!(app.state.engine.reap().await.unwrap(), 2);
    app.state.engine.record_report().await;
    app.state.engine.writer().flush().await.unwrap();

    let path = format!("/api/v1/drops/{id}/report");
    let report = app.call("GET", &path, Some(&seller.token), None).await;
    assert_eq!(report.status, StatusCode::OK, "{:?}", report.body);
    let body = &report.body;
    assert_eq!(
        body["funnel"],
        json!({ "reserved": 5, "paid": 1, "expired": 2, "cancelled": 1, "declined": 1,
                "refused_sold_out": 1, "refused_limit": 1, "refused_overload": 0 })
    );
    assert_eq!(
        (body["stock"].as_i64(), body["sold"].as_i64()),
        (Some(3), Some(1))
    );
    assert!(body["sold_out_at"].is_null() && body["seconds_to_sell_out"].is_null());
    assert_eq!(body["peak_reservations_per_second"], 2);
    let series = body["series"].as_array().unwrap();
    assert_eq!(series.len(), 63, "every second from 0 to the last counted");
    let second = |s: usize| {
        let v = &series[s];
        (
            v["second"].as_i64().unwrap(),
            v["reserved"].as_i64().unwrap(),
            v["paid"].as_i64().unwrap(),
            v["released"].as_i64().unwrap(),
            v["refused"].as_i64().unwrap(),
        )
    };
    assert_eq!(second(0), (0, 1, 1, 0, 0));
    assert_eq!(second(1), (1, 2, 0, 2, 1));
    assert_eq!(second(2), (2, 2, 0, 0, 1));
    assert_eq!(second(30), (30, 0, 0, 0, 0));
    assert_eq!(second(62), (62, 0, 0, 2, 0));

    // The drop's seller and admins only; an unknown drop is a 404.
    let admin = app.member(Role::Admin).await;
    assert_eq!(
        app.call("GET", &path, Some(&admin.token), None)
            .await
            .status,
        StatusCode::OK
    );
    let other = app.member(Role::Seller).await;
    assert_eq!(
        app.call("GET", &path, Some(&other.token), None)
            .await
            .status,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        app.call("GET", &path, Some(&buyers[0].token), None)
            .await
            .status,
        StatusCode::FORBIDDEN
    );
    let missing = format!("/api/v1/drops/{}/report", Uuid::now_v7());
    assert_eq!(
        app.call("GET", &missing, Some(&admin.token), None)
            .await
            .code(),
        "drop_not_found"
    );
}

#[tokio::test]
async fn the_drop_report_says_when_the_last_unit_was_paid() {
    let start = Utc::now().timestamp_millis();
    let clock = Arc::new(ManualClock::new(start));
    let app = TestApp::with_clock(EngineArgs::default(), clock.clone()).await;
    let seller = app.member(Role::Seller).await;
    let product = app.product(&seller, 10).await;
    let opens = chrono::DateTime::from_timestamp_millis(start).unwrap();
    let drop = app
        .drop(
            &seller,
            json!({ "product_id": product, "stock": 2, "opens_at": opens.to_rfc3339() }),
        )
        .await;
    for step in 0..2 {
        clock.advance_ms(1_250);
        let buyer = app.member(Role::Customer).await;
        let hold = hold_id(&reserve(&app, &buyer, &drop, 1).await);
        assert_eq!(
            pay(&app, &buyer, &hold, "tok_ok").await.status,
            StatusCode::OK,
            "step {step}"
        );
    }
    app.state.engine.record_report().await;
    app.state.engine.writer().flush().await.unwrap();
    let path = format!("/api/v1/drops/{}/report", drop["id"].as_str().unwrap());
    let body = app.call("GET", &path, Some(&seller.token), None).await.body;
    assert_eq!(body["sold"], 2);
    assert_eq!(body["seconds_to_sell_out"].as_f64(), Some(2.5));
    let sold_out_at =
        chrono::DateTime::parse_from_rfc3339(body["sold_out_at"].as_str().unwrap()).unwrap();
    assert_eq!(sold_out_at.timestamp_millis(), start + 2_500);
    assert_eq!(body["funnel"]["paid"], 2);
}
