//! Subscriptions against real Postgres (DESIGN.md guarantee 14: one charge per period): subscribing charges the
//! first period and keeps nothing when declined; renewals by three `flashsale renew` processes at once, and by two
//! `flashsale serve` instances, charge each period once, counted at the gateway and in the ledger; a renewer killed
//! between the gateway's approval and its commit is re-run and charges nothing twice; dunning on days 1, 3 and 5
//! then cancel, a new card on a retry; pause, resume and cancel at period end; a price rise without consent pauses,
//! with consent charges the new price; the seller's view. Time is the test's: `renew --at` and a manual clock.
#![allow(
    clippy::too_many_lines,
    reason = "each test is one scenario read top to bottom: its setup, the fault or load, and every check"
)]
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use chrono::{DateTime, Utc};
use common::{TestApp, TestMember, TestResponse};
use engine::clock::ManualClock;
use serde_json::{json, Value};
use shell_api::auth::Role;
use shell_api::config::EngineArgs;
use shell_api::subscriptions::renew::{renew_due, Options, Tally};
use uuid::Uuid;

#[track_caller]
fn expect(response: &TestResponse, status: StatusCode) {
    assert_eq!(response.status, status, "body: {}", response.body);
}

/// A subscription product of `seller` at `price` per `interval`.
async fn plan(app: &TestApp, seller: &TestMember, price: i64, interval: &str) -> Uuid {
    let response = app
        .call(
            "POST",
            "/api/v1/products",
            Some(&seller.token),
            Some(json!({"name": "Flowers", "price": price, "kind": "subscription", "interval": interval})),
        )
        .await;
    expect(&response, StatusCode::CREATED);
    assert_eq!(response.body["interval"], interval);
    response.body["id"].as_str().unwrap().parse().unwrap()
}

async fn top_up(app: &TestApp, member: &TestMember, amount: i64) {
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

fn card(token: &str) -> Value {
    json!({"method": "card", "payment_token": token})
}

fn points() -> Value {
    json!({"method": "points"})
}

async fn subscribe(
    app: &TestApp,
    member: &TestMember,
    product: Uuid,
    payment: Value,
) -> TestResponse {
    app.call(
        "POST",
        "/api/v1/subscriptions",
        Some(&member.token),
        Some(json!({"product_id": product, "payment": payment})),
    )
    .await
}

/// Subscribes and returns the subscription's id and the end of its first period.
async fn subscribed(
    app: &TestApp,
    member: &TestMember,
    product: Uuid,
    payment: Value,
) -> (Uuid, DateTime<Utc>) {
    let response = subscribe(app, member, product, payment).await;
    expect(&response, StatusCode::CREATED);
    (
        response.body["id"].as_str().unwrap().parse().unwrap(),
        response.body["current_period_end"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap(),
    )
}

async fn get(app: &TestApp, member: &TestMember, path: &str) -> Value {
    let response = app.call("GET", path, Some(&member.token), None).await;
    expect(&response, StatusCode::OK);
    response.body
}

async fn post(app: &TestApp, member: &TestMember, path: &str, body: Option<Value>) -> TestResponse {
    app.call("POST", path, Some(&member.token), body).await
}

/// Renewals in-process, as `serve`'s loop runs them, at `at`.
async fn renew(app: &TestApp, at: DateTime<Utc>) -> Tally {
    renew_due(
        &app.db.pool,
        app.state.engine.gateway().as_ref(),
        at,
        Options::default(),
    )
    .await
    .unwrap()
}

/// `flashsale renew --at <at>` as a separate process over the test's database, with extra environment.
async fn renew_process(
    app: &TestApp,
    at: DateTime<Utc>,
    env: &[(&str, &str)],
) -> std::process::Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_flashsale"))
        .args(["renew", "--at", &at.to_rfc3339()])
        .env("DATABASE_URL", &app.db.url)
        .env("RUST_LOG", "warn")
        .envs(env.iter().copied())
        .output()
        .await
        .unwrap()
}

async fn scalar(app: &TestApp, sql: &str, id: Uuid) -> i64 {
    app.db
        .client()
        .await
        .query_one(sql, &[&id])
        .await
        .unwrap()
        .get(0)
}

/// Paid charges of a subscription.
async fn paid(app: &TestApp, subscription: Uuid) -> i64 {
    scalar(
        app,
        "SELECT count(*) FROM subscription_charges WHERE subscription_id = $1 AND status = 'paid'",
        subscription,
    )
    .await
}

/// Charges the gateway approved for a member (each member here has one subscription).
async fn approved_at_gateway(app: &TestApp, member: Uuid) -> i64 {
    scalar(
        app,
        "SELECT count(*) FROM gateway_charges WHERE member_id = $1 AND outcome = 'approved'",
        member,
    )
    .await
}

/// Asserts every balance equals the sum of its ledger.
async fn balances_equal_ledgers(app: &TestApp) {
    let off: i64 = app
        .db
        .client()
        .await
        .query_one(
            "SELECT count(*) FROM balances b
             WHERE b.balance <> (SELECT COALESCE(sum(amount), 0) FROM balance_entries e WHERE e.member_id = b.member_id)",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(off, 0, "balances that differ from their ledger");
}

async fn notifications(app: &TestApp, member: Uuid, kind: &str) -> i64 {
    app.db
        .client()
        .await
        .query_one(
            "SELECT count(*) FROM notifications WHERE member_id = $1 AND kind = $2",
            &[&member, &kind],
        )
        .await
        .unwrap()
        .get(0)
}

fn at(time: DateTime<Utc>, days: i64, seconds: i64) -> DateTime<Utc> {
    time + chrono::Duration::days(days) + chrono::Duration::seconds(seconds)
}

#[tokio::test]
async fn subscribing_charges_the_first_period_at_once_and_a_decline_keeps_nothing() {
    let app = TestApp::new().await;
    let seller = app.member(Role::Seller).await;
    let product = plan(&app, &seller, 9_000, "month").await;
    let member = app.member(Role::Customer).await;
    top_up(&app, &member, 20_000).await;

    let first = app
        .call_with(
            "POST",
            "/api/v1/subscriptions",
            &member.token,
            &[("idempotency-key", "sub-1")],
            Some(json!({"product_id": product, "payment": points()})),
        )
        .await;
    expect(&first, StatusCode::CREATED);
    assert_eq!(first.body["status"], "active");
    assert_eq!(first.body["price"], 9_000);
    assert_eq!(first.body["interval"], "month");
    assert_eq!(first.body["cancel_at_period_end"], false);
    let replay = app
        .call_with(
            "POST",
            "/api/v1/subscriptions",
            &member.token,
            &[("idempotency-key", "sub-1")],
            Some(json!({"product_id": product, "payment": points()})),
        )
        .await;
    assert_eq!(replay.body, first.body);
    let id: Uuid = first.body["id"].as_str().unwrap().parse().unwrap();
    assert_eq!(
        get(&app, &member, "/api/v1/members/me/balance").await["balance"],
        11_000
    );
    let charges = get(
        &app,
        &member,
        &format!("/api/v1/subscriptions/{id}/charges"),
    )
    .await;
    assert_eq!(charges["items"].as_array().unwrap().len(), 1);
    assert_eq!(charges["items"][0]["status"], "paid");
    assert_eq!(charges["items"][0]["amount"], 9_000);
    let again = subscribe(&app, &member, product, points()).await;
    assert_eq!(
        (again.status, again.code()),
        (StatusCode::CONFLICT, "already_subscribed")
    );

    // Declined card, and points that do not cover it: 402, nothing kept.
    let declined = app.member(Role::Customer).await;
    let response = subscribe(&app, &declined, product, card("tok_declined")).await;
    assert_eq!(
        (response.status, response.code()),
        (StatusCode::PAYMENT_REQUIRED, "payment_declined")
    );
    let response = subscribe(&app, &declined, product, points()).await;
    assert_eq!(
        (response.status, response.code()),
        (StatusCode::PAYMENT_REQUIRED, "insufficient_balance")
    );
    let kept = scalar(
        &app,
        "SELECT count(*) FROM subscriptions WHERE member_id = $1",
        declined.id,
    )
    .await
        + scalar(
            &app,
            "SELECT count(*) FROM subscription_charges WHERE member_id = $1",
            declined.id,
        )
        .await;
    assert_eq!(kept, 0);
    assert_eq!(approved_at_gateway(&app, declined.id).await, 0);

    // Only subscription products; regular products are as they were (no interval).
    let shelf = app
        .call(
            "POST",
            "/api/v1/products",
            Some(&seller.token),
            Some(json!({"name": "Vase", "price": 100, "kind": "regular", "stock": 3})),
        )
        .await;
    expect(&shelf, StatusCode::CREATED);
    assert!(shelf.body.get("interval").is_none());
    let shelf_id: Uuid = shelf.body["id"].as_str().unwrap().parse().unwrap();
    let response = subscribe(&app, &member, shelf_id, points()).await;
    assert_eq!(response.status, StatusCode::UNPROCESSABLE_ENTITY);
    let no_interval = app
        .call(
            "POST",
            "/api/v1/products",
            Some(&seller.token),
            Some(json!({"name": "Box", "price": 100, "kind": "subscription"})),
        )
        .await;
    assert_eq!(no_interval.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(no_interval.body["error"]["fields"]["interval"].is_string());

    // Card: the first period is charged at the gateway once.
    let carded = app.member(Role::Customer).await;
    let (card_sub, _) = subscribed(&app, &carded, product, card("tok_ok")).await;
    assert_eq!(approved_at_gateway(&app, carded.id).await, 1);
    assert_eq!(paid(&app, card_sub).await, 1);
    // Readable by its member, the seller and admins; not by others.
    let other = app.member(Role::Customer).await;
    let response = app
        .call(
            "GET",
            &format!("/api/v1/subscriptions/{card_sub}"),
            Some(&other.token),
            None,
        )
        .await;
    assert_eq!(response.status, StatusCode::FORBIDDEN);
    get(&app, &seller, &format!("/api/v1/subscriptions/{card_sub}")).await;
    let mine = get(&app, &carded, "/api/v1/members/me/subscriptions").await;
    assert_eq!(mine["items"][0]["id"], card_sub.to_string());
}

/// `count` members subscribed to one monthly product, alternately by card and by points (with 3 periods' worth of
/// points); returns the members and their subscriptions, and the latest first period's end.
async fn subscribers(app: &TestApp, count: usize) -> (Vec<(TestMember, Uuid)>, DateTime<Utc>) {
    let seller = app.member(Role::Seller).await;
    let product = plan(app, &seller, 1_000, "month").await;
    let mut subscribed_members = Vec::new();
    let mut latest = DateTime::<Utc>::MIN_UTC;
    for i in 0..count {
        let member = app.member(Role::Customer).await;
        let payment = if i % 2 == 0 {
            card("tok_ok")
        } else {
            top_up(app, &member, 3_000).await;
            points()
        };
        let (id, end) = subscribed(app, &member, product, payment).await;
        latest = latest.max(end);
        subscribed_members.push((member, id));
    }
    (subscribed_members, latest)
}

/// Each subscription paid twice (its first period and one renewal), twice at the gateway for card members, and
/// points balances equal to their ledgers.
async fn each_charged_once_for_the_period(
    app: &TestApp,
    subscribed_members: &[(TestMember, Uuid)],
) {
    for (i, (member, id)) in subscribed_members.iter().enumerate() {
        assert_eq!(
            paid(app, *id).await,
            2,
            "subscription {i}: first period and one renewal"
        );
        if i % 2 == 0 {
            assert_eq!(approved_at_gateway(app, member.id).await, 2, "card {i}");
        } else {
            assert_eq!(
                get(app, member, "/api/v1/members/me/balance").await["balance"],
                1_000
            );
        }
    }
    balances_equal_ledgers(app).await;
}

#[tokio::test]
async fn three_renew_processes_at_once_charge_each_subscription_once_for_the_period() {
    let app = TestApp::new().await;
    let (subscribed_members, end) = subscribers(&app, 40).await;
    let after = at(end, 0, 60);
    let runs = futures_util::future::join_all((0..3).map(|_| {
        renew_process(
            &app,
            after,
            &[("RENEW_BATCH_MAX", "5"), ("PAYMENT_LATENCY_MS", "5")],
        )
    }))
    .await;
    for run in &runs {
        assert!(
            run.status.success(),
            "renew: {}",
            String::from_utf8_lossy(&run.stderr)
        );
    }
    each_charged_once_for_the_period(&app, &subscribed_members).await;
    // The work was shared: no process renewed everything alone would be luck, but every one of the 40 was renewed
    // once in total.
    let renewed: u64 = runs
        .iter()
        .map(|run| {
            let out = String::from_utf8_lossy(&run.stdout).into_owned();
            let renewed = out
                .split("renewed ")
                .nth(1)
                .unwrap()
                .split(',')
                .next()
                .unwrap()
                .to_owned();
            renewed.parse::<u64>().unwrap()
        })
        .sum();
    assert_eq!(renewed, 40);
    // And running it again changes nothing.
    let again = renew_process(&app, after, &[]).await;
    assert!(again.status.success());
    each_charged_once_for_the_period(&app, &subscribed_members).await;
    for (member, _) in &subscribed_members {
        assert_eq!(
            notifications(&app, member.id, "subscription_renewed").await,
            1
        );
    }
}

#[tokio::test]
async fn two_serve_instances_renewing_the_same_due_subscriptions_charge_each_once() {
    let app = TestApp::new().await;
    let (subscribed_members, _) = subscribers(&app, 20).await;
    // Due now by the real clock `serve` runs on: the first periods ended a minute ago.
    app.db
        .client()
        .await
        .execute(
            "UPDATE subscriptions SET current_period_start = now() - interval '1 month 1 minute',
                 current_period_end = now() - interval '1 minute', next_attempt_at = now() - interval '1 minute'",
            &[],
        )
        .await
        .unwrap();
    let env = [("PAYMENT_LATENCY_MS", "5")];
    let (one, two) = tokio::join!(
        common::TestServer::start(&app.db.url, &env),
        common::TestServer::start(&app.db.url, &env)
    );
    let ids: Vec<Uuid> = subscribed_members.iter().map(|(_, id)| *id).collect();
    common::eventually("every subscription renewed", Duration::from_secs(30), || async {
        let renewed: i64 = app
            .db
            .client()
            .await
            .query_one(
                "SELECT count(*) FROM subscriptions WHERE id = ANY($1) AND current_period_end > now()",
                &[&ids],
            )
            .await
            .unwrap()
            .get(0);
        renewed == 20
    })
    .await;
    one.kill().await;
    two.kill().await;
    for (i, (member, id)) in subscribed_members.iter().enumerate() {
        assert_eq!(paid(&app, *id).await, 2, "subscription {i}");
        if i % 2 == 0 {
            assert_eq!(approved_at_gateway(&app, member.id).await, 2, "card {i}");
        }
    }
    balances_equal_ledgers(&app).await;
}

#[tokio::test]
async fn a_renewer_killed_between_the_gateways_approval_and_its_commit_is_rerun_and_charges_nothing_twice(
) {
    let app = TestApp::new().await;
    let seller = app.member(Role::Seller).await;
    let product = plan(&app, &seller, 2_500, "week").await;
    let member = app.member(Role::Customer).await;
    let (id, end) = subscribed(&app, &member, product, card("tok_ok")).await;
    let after = at(end, 0, 1);

    let killed = renew_process(&app, after, &[("RENEW_TEST_EXIT_AFTER_APPROVAL", "true")]).await;
    assert_eq!(
        killed.status.code(),
        Some(86),
        "the hook must fire: {}",
        String::from_utf8_lossy(&killed.stderr)
    );
    // The gateway approved the renewal; nothing of it was committed but the pending attempt.
    assert_eq!(approved_at_gateway(&app, member.id).await, 2);
    assert_eq!(paid(&app, id).await, 1);
    let pending = scalar(
        &app,
        "SELECT count(*) FROM subscription_charges WHERE subscription_id = $1 AND status = 'pending'",
        id,
    )
    .await;
    assert_eq!(pending, 1);

    let rerun = renew_process(&app, after, &[]).await;
    assert!(
        rerun.status.success(),
        "{}",
        String::from_utf8_lossy(&rerun.stderr)
    );
    assert_eq!(
        approved_at_gateway(&app, member.id).await,
        2,
        "charged once at the gateway"
    );
    assert_eq!(paid(&app, id).await, 2, "and recorded once");
    let asked = scalar(
        &app,
        "SELECT max(times_asked)::int8 FROM gateway_charges WHERE member_id = $1",
        member.id,
    )
    .await;
    assert_eq!(asked, 2, "the renewal's key was asked twice");
    let body = get(&app, &member, &format!("/api/v1/subscriptions/{id}")).await;
    assert_eq!(body["status"], "active");
    assert_eq!(
        body["current_period_start"]
            .as_str()
            .unwrap()
            .parse::<DateTime<Utc>>()
            .unwrap(),
        end
    );
    assert_eq!(
        notifications(&app, member.id, "subscription_renewed").await,
        1
    );

    // Killed again on the next period: until a renewer records the approved attempt, the member cannot cancel the
    // subscription (or change its payment) out from under it.
    let next = at(end, 7, 1);
    let killed = renew_process(&app, next, &[("RENEW_TEST_EXIT_AFTER_APPROVAL", "true")]).await;
    assert_eq!(killed.status.code(), Some(86));
    let cancel = format!("/api/v1/subscriptions/{id}/cancel");
    let response = post(
        &app,
        &member,
        &cancel,
        Some(json!({"at_period_end": false})),
    )
    .await;
    assert_eq!(
        (response.status, response.code()),
        (StatusCode::CONFLICT, "renewal_in_progress")
    );
    assert!(renew_process(&app, next, &[]).await.status.success());
    assert_eq!(
        (
            approved_at_gateway(&app, member.id).await,
            paid(&app, id).await
        ),
        (3, 3)
    );
    let response = post(
        &app,
        &member,
        &cancel,
        Some(json!({"at_period_end": false})),
    )
    .await;
    expect(&response, StatusCode::OK);
    assert_eq!(response.body["status"], "canceled");
}

#[tokio::test]
async fn a_declined_card_goes_past_due_retries_on_days_1_3_and_5_then_cancels() {
    let app = TestApp::new().await;
    let seller = app.member(Role::Seller).await;
    let product = plan(&app, &seller, 4_000, "month").await;
    let member = app.member(Role::Customer).await;
    let (id, end) = subscribed(&app, &member, product, card("tok_ok")).await;
    let response = app
        .call(
            "PUT",
            &format!("/api/v1/subscriptions/{id}/payment"),
            Some(&member.token),
            Some(json!({"payment": card("tok_declined")})),
        )
        .await;
    expect(&response, StatusCode::OK);

    let path = format!("/api/v1/subscriptions/{id}");
    assert_eq!(renew(&app, at(end, 0, 1)).await.failed, 1);
    let body = get(&app, &member, &path).await;
    assert_eq!(body["status"], "past_due");
    assert_eq!(
        body["next_attempt_at"]
            .as_str()
            .unwrap()
            .parse::<DateTime<Utc>>()
            .unwrap(),
        at(end, 1, 0)
    );
    // Nothing is due before the retry's day, however often renewals run.
    assert_eq!(renew(&app, at(end, 0, 43_200)).await.claimed, 0);
    for (day, failures) in [(1, 2), (3, 3)] {
        assert_eq!(
            renew(&app, at(end, day, 1)).await.failed,
            1,
            "retry on day {day}"
        );
        assert_eq!(get(&app, &member, &path).await["status"], "past_due");
        assert_eq!(
            notifications(&app, member.id, "subscription_payment_failed").await,
            failures
        );
    }
    assert_eq!(
        renew(&app, at(end, 4, 1)).await.claimed,
        0,
        "no retry on day 4"
    );
    let last = renew(&app, at(end, 5, 1)).await;
    assert_eq!((last.failed, last.canceled), (1, 1));
    let body = get(&app, &member, &path).await;
    assert_eq!(body["status"], "canceled");
    assert!(body["next_attempt_at"].is_null());
    assert_eq!(renew(&app, at(end, 40, 0)).await.claimed, 0);
    let charges = get(&app, &member, &format!("{path}/charges")).await;
    let statuses: Vec<(&str, i64)> = charges["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["status"].as_str().unwrap(),
                c["attempt"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        statuses,
        [
            ("failed", 4),
            ("failed", 3),
            ("failed", 2),
            ("failed", 1),
            ("paid", 1)
        ]
    );
    assert_eq!(approved_at_gateway(&app, member.id).await, 1);
    assert_eq!(
        notifications(&app, member.id, "subscription_payment_failed").await,
        4
    );
}

#[tokio::test]
async fn a_new_card_on_the_second_retry_renews_the_period() {
    let app = TestApp::new().await;
    let seller = app.member(Role::Seller).await;
    let product = plan(&app, &seller, 4_000, "week").await;
    let member = app.member(Role::Customer).await;
    let (id, end) = subscribed(&app, &member, product, card("tok_ok")).await;
    let payment = format!("/api/v1/subscriptions/{id}/payment");
    let change = |token: &'static str| {
        let app = &app;
        let member = &member;
        let payment = payment.clone();
        async move {
            let response = app
                .call(
                    "PUT",
                    &payment,
                    Some(&member.token),
                    Some(json!({"payment": card(token)})),
                )
                .await;
            expect(&response, StatusCode::OK);
        }
    };
    change("tok_declined").await;
    assert_eq!(renew(&app, at(end, 0, 1)).await.failed, 1);
    assert_eq!(renew(&app, at(end, 1, 1)).await.failed, 1, "first retry");
    change("tok_new_card").await;
    assert_eq!(
        renew(&app, at(end, 3, 1)).await.renewed,
        1,
        "second retry, new card"
    );
    let body = get(&app, &member, &format!("/api/v1/subscriptions/{id}")).await;
    assert_eq!(body["status"], "active");
    // The period stays anchored: the renewed period starts where the last paid one ended.
    assert_eq!(
        body["current_period_start"]
            .as_str()
            .unwrap()
            .parse::<DateTime<Utc>>()
            .unwrap(),
        end
    );
    assert_eq!(paid(&app, id).await, 2);
    assert_eq!(approved_at_gateway(&app, member.id).await, 2);
    assert_eq!(
        notifications(&app, member.id, "subscription_renewed").await,
        1
    );
}

#[tokio::test]
async fn pause_resume_and_cancel_at_period_end() {
    let start = Utc::now();
    let clock = Arc::new(ManualClock::new(start.timestamp_millis()));
    let app = TestApp::with_clock(EngineArgs::default(), clock.clone()).await;
    let seller = app.member(Role::Seller).await;
    let product = plan(&app, &seller, 1_000, "week").await;
    let member = app.member(Role::Customer).await;
    top_up(&app, &member, 10_000).await;
    let (id, end) = subscribed(&app, &member, product, points()).await;
    let path = format!("/api/v1/subscriptions/{id}");

    let paused = post(&app, &member, &format!("{path}/pause"), None).await;
    expect(&paused, StatusCode::OK);
    assert_eq!(paused.body["status"], "paused");
    assert_eq!(
        renew(&app, at(end, 14, 0)).await.claimed,
        0,
        "no charges while paused"
    );
    assert_eq!(paid(&app, id).await, 1);

    // Resuming 20 days in starts a new period then, charged at once.
    let resumed_at = at(start, 20, 0);
    clock.set_ms(resumed_at.timestamp_millis());
    let resumed = post(&app, &member, &format!("{path}/resume"), None).await;
    expect(&resumed, StatusCode::OK);
    assert_eq!(resumed.body["status"], "active");
    let period_start: DateTime<Utc> = resumed.body["current_period_start"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(
        period_start.timestamp_millis(),
        resumed_at.timestamp_millis()
    );
    assert_eq!(paid(&app, id).await, 2);
    assert_eq!(
        get(&app, &member, "/api/v1/members/me/balance").await["balance"],
        8_000
    );

    // Cancel at period end (the default): runs to the end, then ends with no charge.
    let canceled = post(&app, &member, &format!("{path}/cancel"), Some(json!({}))).await;
    expect(&canceled, StatusCode::OK);
    assert_eq!(canceled.body["status"], "active");
    assert_eq!(canceled.body["cancel_at_period_end"], true);
    let new_end: DateTime<Utc> = canceled.body["current_period_end"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(renew(&app, at(new_end, 0, -1)).await.claimed, 0);
    assert_eq!(renew(&app, at(new_end, 0, 1)).await.canceled, 1);
    let body = get(&app, &member, &path).await;
    assert_eq!(body["status"], "canceled");
    assert_eq!(paid(&app, id).await, 2);
    assert_eq!(
        get(&app, &member, "/api/v1/members/me/balance").await["balance"],
        8_000
    );
    balances_equal_ledgers(&app).await;
    // A canceled subscription cannot be paused or resumed; a new one may be taken.
    let response = post(&app, &member, &format!("{path}/resume"), None).await;
    assert_eq!(
        (response.status, response.code()),
        (StatusCode::CONFLICT, "subscription_canceled")
    );
    expect(
        &subscribe(&app, &member, product, points()).await,
        StatusCode::CREATED,
    );
}

#[tokio::test]
async fn a_price_rise_without_consent_pauses_and_with_consent_charges_the_new_price() {
    let app = TestApp::new().await;
    let seller = app.member(Role::Seller).await;
    let product = plan(&app, &seller, 1_000, "month").await;
    let consenting = app.member(Role::Customer).await;
    let silent = app.member(Role::Customer).await;
    let (agreed, end) = subscribed(&app, &consenting, product, card("tok_ok")).await;
    let (unagreed, _) = subscribed(&app, &silent, product, card("tok_ok")).await;

    let response = app
        .call(
            "PATCH",
            &format!("/api/v1/products/{product}"),
            Some(&seller.token),
            Some(json!({"price": 1_500})),
        )
        .await;
    expect(&response, StatusCode::OK);
    assert_eq!(
        notifications(&app, consenting.id, "subscription_changed").await,
        1
    );
    assert_eq!(
        notifications(&app, silent.id, "subscription_changed").await,
        1
    );
    let accepted = post(
        &app,
        &consenting,
        &format!("/api/v1/subscriptions/{agreed}/accept-price"),
        None,
    )
    .await;
    expect(&accepted, StatusCode::OK);
    assert_eq!(accepted.body["price"], 1_500);

    let tally = renew(&app, at(end, 0, 5)).await;
    assert_eq!((tally.renewed, tally.paused), (1, 1));
    let charges = get(
        &app,
        &consenting,
        &format!("/api/v1/subscriptions/{agreed}/charges"),
    )
    .await;
    assert_eq!(charges["items"][0]["amount"], 1_500);
    let body = get(&app, &silent, &format!("/api/v1/subscriptions/{unagreed}")).await;
    assert_eq!(body["status"], "paused");
    assert_eq!(body["paused_reason"], "price_change");
    assert_eq!(paid(&app, unagreed).await, 1, "no charge without consent");
    // Consent later resumes it with a new period at the new price.
    let resumed = post(
        &app,
        &silent,
        &format!("/api/v1/subscriptions/{unagreed}/accept-price"),
        None,
    )
    .await;
    expect(&resumed, StatusCode::OK);
    assert_eq!(resumed.body["status"], "active");
    assert_eq!(paid(&app, unagreed).await, 2);
    let charges = get(
        &app,
        &silent,
        &format!("/api/v1/subscriptions/{unagreed}/charges"),
    )
    .await;
    assert_eq!(charges["items"][0]["amount"], 1_500);

    // The seller's view: subscribers, the dashboard's figures, subscription sales.
    let list = get(
        &app,
        &seller,
        &format!("/api/v1/sellers/me/subscriptions?product_id={product}"),
    )
    .await;
    assert_eq!(list["items"].as_array().unwrap().len(), 2);
    let dashboard = get(&app, &seller, "/api/v1/sellers/me/dashboard").await;
    assert_eq!(dashboard["subscriptions"]["active"], 2);
    assert_eq!(dashboard["subscriptions"]["past_due"], 0);
    assert_eq!(
        dashboard["subscriptions"]["monthly_recurring_revenue"],
        3_000
    );
    let sales = get(&app, &seller, "/api/v1/sellers/me/sales").await;
    let subscription_sales: i64 = sales["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|sale| sale["kind"] == "subscription")
        .map(|sale| sale["amount"].as_i64().unwrap())
        .sum();
    assert_eq!(subscription_sales, 1_000 + 1_000 + 1_500 + 1_500);
    // The settlement counts the periods paid on their day.
    let client = app.db.client().await;
    let today = Utc::now().date_naive();
    shell_api::shop::settlement::settle(&client, today, 0)
        .await
        .unwrap();
    let gross: i64 = client
        .query_one(
            "SELECT gross FROM settlements WHERE seller_id = $1 AND day = $2",
            &[&seller.id, &today],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(gross, 1_000 + 1_000 + 1_500);
}
