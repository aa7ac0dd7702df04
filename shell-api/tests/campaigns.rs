//! Preorder campaigns and fulfilment (API.md, "Preorder campaigns and fulfilment"; DESIGN.md guarantee 13): a
//! funded and an unfunded campaign closing at one moment, on the embedded gate and across three instances over
//! Redis; instances closing one campaign at once; the real binary SIGKILLed between the gateway's refund answers
//! and their record, then restarted; shipments repeated and racing, and refused for a campaign that is not
//! funded; the back office's search.
//!
//! Refunds are counted at the gateway: every instance's simulated gateway keeps its refund idempotency records in
//! Postgres (`SIMULATED_GATEWAY_LEDGER`, table `simulated_gateway_refunds`, one row per refund paid, `calls`
//! counting every request for it), so the count survives the kill of the process that made it.
#![allow(
    clippy::too_many_lines,
    reason = "each test is one scenario read top to bottom: its setup, the close, and every check"
)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use chrono::{DateTime, Utc};
use common::{
    eventually, pay, reserve, seed_member, seed_product, TestApp, TestMember, TestServer,
};
use engine::clock::ManualClock;
use serde_json::{json, Value};
use shell_api::auth::Role;
use shell_api::campaigns::close;
use shell_api::config::EngineArgs;
use uuid::Uuid;

fn ledger_args() -> EngineArgs {
    EngineArgs {
        simulated_gateway_ledger: true,
        ..EngineArgs::default()
    }
}

/// Whole milliseconds, as the manual clock counts.
fn now_ms() -> DateTime<Utc> {
    engine::clock::to_datetime(Utc::now().timestamp_millis())
}

/// A campaign of `stock` units with goal `goal`, open now and closing at `closes_at`, by a new seller.
async fn campaign(
    app: &TestApp,
    stock: u32,
    goal: u32,
    price: i64,
    closes_at: DateTime<Utc>,
) -> (TestMember, Value) {
    let seller = app.member(Role::Seller).await;
    let product = app.product(&seller, price).await;
    let drop = app
        .drop(
            &seller,
            json!({
                "product_id": product, "stock": stock, "goal_units": goal, "per_member_limit": 5,
                // Before the manual clock, whenever the test set it.
                "opens_at": (now_ms() - chrono::Duration::hours(1)).to_rfc3339(),
                "closes_at": closes_at.to_rfc3339(),
            }),
        )
        .await;
    assert_eq!(drop["goal_units"], goal);
    assert_eq!(drop["campaign"], "live");
    (seller, drop)
}

fn id_of(value: &Value) -> Uuid {
    value["id"].as_str().unwrap().parse().unwrap()
}

/// `buyers` new members each reserve and pay one unit through `apps` in turn; returns them.
async fn buy(apps: &[TestApp], drop: &Value, buyers: usize) -> Vec<TestMember> {
    let mut out = Vec::new();
    for i in 0..buyers {
        let app = &apps[i % apps.len()];
        let buyer = app.member(Role::Customer).await;
        let hold = reserve(app, &buyer, drop, 1).await;
        assert_eq!(hold.status, StatusCode::CREATED, "{:?}", hold.body);
        // Paid through another instance than the one that granted the hold.
        let payer = &apps[(i + 1) % apps.len()];
        let paid = pay(payer, &buyer, hold.body["id"].as_str().unwrap(), "tok_ok").await;
        assert_eq!(paid.status, StatusCode::OK, "{:?}", paid.body);
        out.push(buyer);
    }
    out
}

/// Refunds the gateway paid, per charge key (a reservation): (rows, calls) from the durable ledger.
async fn gateway_refunds(app: &TestApp) -> HashMap<Uuid, (i64, i64, i64)> {
    app.db
        .client()
        .await
        .query(
            "SELECT charge_key, count(*), sum(amount)::int8, sum(calls)::int8 FROM simulated_gateway_refunds
             GROUP BY charge_key",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| (row.get(0), (row.get(1), row.get(2), row.get(3))))
        .collect()
}

/// `(charge_key, amount)` of every purchase of `drop`.
async fn purchases_of(app: &TestApp, drop: Uuid) -> Vec<(Uuid, i64)> {
    app.db
        .client()
        .await
        .query(
            "SELECT reservation_id, amount FROM purchases WHERE drop_id = $1",
            &[&drop],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect()
}

/// How many notifications of `kind` about `drop` exist, and for how many distinct members.
async fn notices(app: &TestApp, kind: &str, drop: Uuid) -> (i64, i64) {
    let row = app
        .db
        .client()
        .await
        .query_one(
            "SELECT count(*), count(DISTINCT member_id) FROM notifications WHERE kind = $1 AND drop_id = $2",
            &[&kind, &drop],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1))
}

/// Every instance runs its campaign pass at once; returns the passes.
async fn tick_all(apps: &[TestApp]) -> Vec<close::Pass> {
    let passes = futures_util::future::join_all(apps.iter().map(|app| {
        let state = app.state.clone();
        tokio::spawn(async move { close::tick(&state).await.unwrap() })
    }))
    .await;
    passes.into_iter().map(Result::unwrap).collect()
}

fn sum(passes: &[close::Pass], field: fn(&close::Pass) -> usize) -> usize {
    passes.iter().map(field).sum()
}

/// The scenario of both outcomes at one moment, over `apps` (one instance, or several on one Redis), which share
/// `clock`.
async fn funded_and_unfunded_at_one_moment(apps: Vec<TestApp>, clock: Arc<ManualClock>) {
    let app = &apps[0];
    let closes_at = now_ms() + chrono::Duration::minutes(1);
    let (seller_a, funded) = campaign(app, 6, 3, 1_000, closes_at).await;
    let (seller_b, unfunded) = campaign(app, 6, 4, 2_500, closes_at).await;
    let funded_buyers = buy(&apps, &funded, 4).await;
    let unfunded_buyers = buy(&apps, &unfunded, 3).await;
    let (funded_id, unfunded_id) = (id_of(&funded), id_of(&unfunded));

    // Funded the moment the goal is met, in the drop body and in Postgres.
    let body = common::drop_state(app, &funded).await;
    assert_eq!(body["campaign"], "funded", "{body}");
    assert_eq!(common::drop_state(app, &unfunded).await["campaign"], "live");
    let passes = tick_all(&apps).await;
    assert_eq!(sum(&passes, |p| p.funded_notified), 1, "{passes:?}");
    assert_eq!(notices(app, "campaign_funded", funded_id).await, (4, 4));
    // Shipping waits for the goal: the live campaign is refused.
    let early = app
        .call(
            "POST",
            &format!("/api/v1/drops/{unfunded_id}/shipments"),
            Some(&seller_b.token),
            Some(json!({"items": [{"purchase_id": Uuid::now_v7()}]})),
        )
        .await;
    assert_eq!(early.status, StatusCode::CONFLICT);
    assert_eq!(early.code(), "campaign_not_funded");

    // Both close at the same moment, on every instance at once.
    clock.set_ms(closes_at.timestamp_millis());
    let passes = tick_all(&apps).await;
    assert_eq!(sum(&passes, |p| p.closed_funded), 1, "{passes:?}");
    assert_eq!(sum(&passes, |p| p.closed_unfunded), 1, "{passes:?}");
    // Whatever the passes left (one instance's pass may find the rows locked by another's), the next finishes.
    tick_all(&apps).await;
    assert_eq!(common::drop_state(app, &funded).await["campaign"], "funded");
    assert_eq!(
        common::drop_state(app, &unfunded).await["campaign"],
        "unfunded"
    );

    // Every purchase of the unfunded one refunded once, in full, at the gateway; none of the funded one.
    let refunds = gateway_refunds(app).await;
    let unfunded_purchases = purchases_of(app, unfunded_id).await;
    assert_eq!(unfunded_purchases.len(), 3);
    for (charge, amount) in &unfunded_purchases {
        assert_eq!(refunds.get(charge), Some(&(1, *amount, 1)), "{charge}");
    }
    for (charge, _) in purchases_of(app, funded_id).await {
        assert!(
            !refunds.contains_key(&charge),
            "a funded purchase was refunded"
        );
    }
    assert_eq!(refunds.len(), 3);
    assert_eq!(notices(app, "campaign_unfunded", unfunded_id).await, (3, 3));
    assert_eq!(notices(app, "campaign_unfunded", funded_id).await, (0, 0));
    assert_eq!(notices(app, "campaign_funded", funded_id).await, (4, 4));

    // The live page carries the goal and the outcome it shows.
    let page = app
        .call("GET", &format!("/live/drops/{unfunded_id}"), None, None)
        .await;
    assert!(page.text.contains(r#""goal_units":4"#), "{}", page.text);
    assert!(page.text.contains(r#""campaign":"unfunded""#));

    // The buyers see it.
    for buyer in &unfunded_buyers {
        let mine = app
            .call(
                "GET",
                "/api/v1/members/me/purchases",
                Some(&buyer.token),
                None,
            )
            .await;
        let item = &mine.body["items"][0];
        assert_eq!(item["status"], "refunded", "{item}");
        assert!(item["refunded_at"].is_string());
    }
    let mine = app
        .call(
            "GET",
            "/api/v1/members/me/purchases",
            Some(&funded_buyers[0].token),
            None,
        )
        .await;
    assert_eq!(mine.body["items"][0]["status"], "paid");

    // Closing again, anywhere, does nothing more.
    let passes = tick_all(&apps).await;
    assert_eq!(
        passes
            .iter()
            .map(|p| p.closed_funded + p.closed_unfunded + p.refunded)
            .sum::<usize>(),
        0
    );
    assert_eq!(gateway_refunds(app).await, refunds);

    // The unfunded seller's settlement for the day nets the refunds out.
    let client = app.db.client().await;
    shell_api::shop::settlement::settle(&client, closes_at.date_naive(), 0)
        .await
        .unwrap();
    let row = client
        .query_one(
            "SELECT gross, refunds, net FROM settlements WHERE seller_id = $1 AND day = $2",
            &[&seller_b.id, &closes_at.date_naive()],
        )
        .await
        .unwrap();
    let (gross, refunded, net): (i64, i64, i64) = (row.get(0), row.get(1), row.get(2));
    assert_eq!((gross, refunded, net), (7_500, 7_500, 0));

    // The funded one ships; the unfunded one is refused.
    let refused = app
        .call(
            "POST",
            &format!("/api/v1/drops/{unfunded_id}/shipments"),
            Some(&seller_b.token),
            Some(json!({"items": [{"purchase_id": Uuid::now_v7()}]})),
        )
        .await;
    assert_eq!(refused.status, StatusCode::CONFLICT);
    assert_eq!(refused.code(), "campaign_not_funded");
    let supporters = app
        .call(
            "GET",
            &format!("/api/v1/drops/{funded_id}/purchases?limit=2"),
            Some(&seller_a.token),
            None,
        )
        .await;
    assert_eq!(supporters.status, StatusCode::OK, "{:?}", supporters.body);
    assert_eq!(supporters.body["items"].as_array().unwrap().len(), 2);
    assert!(supporters.body["next_cursor"].is_string());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_funded_and_an_unfunded_campaign_close_at_one_moment_on_the_embedded_gate() {
    let clock = Arc::new(ManualClock::new(now_ms().timestamp_millis()));
    let app = TestApp::with_clock(ledger_args(), clock.clone()).await;
    funded_and_unfunded_at_one_moment(vec![app], clock).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_funded_and_an_unfunded_campaign_close_at_one_moment_across_three_instances() {
    let clock = Arc::new(ManualClock::new(now_ms().timestamp_millis()));
    let first = TestApp::with_redis_clock(ledger_args(), clock.clone()).await;
    let second = first.another_instance_with_clock(clock.clone()).await;
    let third = first.another_instance_with_clock(clock.clone()).await;
    funded_and_unfunded_at_one_moment(vec![first, second, third], clock).await;
}

/// Purchases of `drop` written straight into Postgres (as the writer stores them), by `members` buyers in turn:
/// a campaign's refunds need only its stored purchases, and a thousand go in at once.
async fn seed_purchases(db: &common::TestDb, drop: &Value, count: usize, members: &[Uuid]) {
    let ids: Vec<Uuid> = (0..count).map(|_| Uuid::now_v7()).collect();
    let holds: Vec<Uuid> = (0..count).map(|_| Uuid::now_v7()).collect();
    let buyers: Vec<Uuid> = (0..count).map(|i| members[i % members.len()]).collect();
    let amounts: Vec<i64> = (0..count).map(|i| 1_000 + i as i64).collect();
    let drop_id = id_of(drop);
    let product: Uuid = drop["product_id"].as_str().unwrap().parse().unwrap();
    let client = db.client().await;
    client
        .execute(
            "INSERT INTO purchases (id, reservation_id, drop_id, product_id, member_id, quantity, amount, currency, paid_at)
             SELECT t.id, t.hold, $4, $5, t.member, 1, t.amount, 'KRW', now()
             FROM UNNEST($1::uuid[], $2::uuid[], $3::uuid[], $6::int8[]) AS t (id, hold, member, amount)",
            &[&ids, &holds, &buyers, &drop_id, &product, &amounts],
        )
        .await
        .unwrap();
    client
        .execute(
            "UPDATE drops SET sold = sold + $2 WHERE id = $1",
            &[&drop_id, &i32::try_from(count).unwrap()],
        )
        .await
        .unwrap();
}

/// Instances closing one campaign at once: one decides it, and every purchase is asked of the gateway once.
async fn closers_race(apps: Vec<TestApp>, clock: Arc<ManualClock>) {
    let app = &apps[0];
    let closes_at = now_ms() + chrono::Duration::minutes(1);
    let (_, drop) = campaign(app, 1_000, 1_000, 1_000, closes_at).await;
    let mut members = Vec::new();
    for _ in 0..20 {
        members.push(app.member(Role::Customer).await.id);
    }
    seed_purchases(&app.db, &drop, 300, &members).await;
    clock.set_ms(closes_at.timestamp_millis());
    let passes = tick_all(&apps).await;
    assert_eq!(
        sum(&passes, |p| p.closed_unfunded),
        1,
        "one closer wins: {passes:?}"
    );
    let drop_id = id_of(&drop);
    // Two closers straight at one campaign, again: nobody decides it twice.
    let again = futures_util::future::join_all(
        apps.iter()
            .map(|app| close::close_one(&app.state, drop_id, closes_at)),
    )
    .await;
    assert!(again.into_iter().all(|outcome| outcome.unwrap().is_none()));
    let mut rounds = 0;
    loop {
        let passes = tick_all(&apps).await;
        rounds += 1;
        if sum(&passes, |p| p.refunded) == 0 || rounds > 10 {
            break;
        }
    }
    let refunds = gateway_refunds(app).await;
    let purchases = purchases_of(app, drop_id).await;
    assert_eq!(refunds.len(), purchases.len());
    for (charge, amount) in purchases {
        // One refund, asked for once: the refunders never worked on the same purchase.
        assert_eq!(refunds.get(&charge), Some(&(1, amount, 1)), "{charge}");
    }
    assert_eq!(notices(app, "campaign_unfunded", drop_id).await, (20, 20));
    let done: Option<DateTime<Utc>> = app
        .db
        .client()
        .await
        .query_one(
            "SELECT refunds_done_at FROM drops WHERE id = $1",
            &[&drop_id],
        )
        .await
        .unwrap()
        .get(0);
    assert!(done.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_instances_closing_one_campaign_at_once_refund_each_purchase_once() {
    let clock = Arc::new(ManualClock::new(now_ms().timestamp_millis()));
    let first = TestApp::with_clock(ledger_args(), clock.clone()).await;
    let second = first.sharing_db_with_clock(clock.clone()).await;
    closers_race(vec![first, second], clock).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_instances_over_redis_closing_one_campaign_at_once_refund_each_purchase_once() {
    let clock = Arc::new(ManualClock::new(now_ms().timestamp_millis()));
    let first = TestApp::with_redis_clock(ledger_args(), clock.clone()).await;
    let second = first.another_instance_with_clock(clock.clone()).await;
    let third = first.another_instance_with_clock(clock.clone()).await;
    closers_race(vec![first, second, third], clock).await;
}

/// The real binary refunding 1,000 purchases is SIGKILLed right after the gateway answered a refund and before
/// its record (the test hook `CAMPAIGN_REFUND_PAUSE_AFTER` holds it there); after a restart, every purchase is
/// refunded exactly once at the gateway, and the refunds answered but unrecorded were asked again under the same
/// key.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_instance_killed_between_the_gateway_and_the_record_refunds_every_purchase_once() {
    let db = common::TestDb::new().await;
    let base_env = [
        ("SIMULATED_GATEWAY_LEDGER", "true"),
        ("CAMPAIGN_TICK_MS", "50"),
        ("CAMPAIGN_REFUND_BATCH_ROWS", "100"),
    ];
    let mut env = base_env.to_vec();
    env.push(("CAMPAIGN_REFUND_PAUSE_AFTER", "250"));
    let server = TestServer::start(&db.url, &env).await;
    let seller = seed_member(&db, Role::Seller).await;
    let product = seed_product(&db, &seller, 1_000).await;
    let http = reqwest::Client::new();
    let closes_at = Utc::now() + chrono::Duration::seconds(2);
    let created = http
        .post(server.url("/api/v1/drops"))
        .bearer_auth(&seller.token)
        .json(&json!({
            "product_id": product, "stock": 2_000, "goal_units": 2_000,
            "opens_at": (Utc::now() - chrono::Duration::seconds(1)).to_rfc3339(),
            "closes_at": closes_at.to_rfc3339(),
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), StatusCode::CREATED);
    let drop: Value = created.json().await.unwrap();
    let mut members = Vec::new();
    for _ in 0..50 {
        members.push(seed_member(&db, Role::Customer).await.id);
    }
    seed_purchases(&db, &drop, 1_000, &members).await;
    let drop_id = id_of(&drop);

    let client = db.client().await;
    let count = |sql: &'static str| {
        let client = &client;
        async move { client.query_one(sql, &[]).await.unwrap().get::<_, i64>(0) }
    };
    eventually(
        "the refunder paused after 250 gateway answers",
        Duration::from_secs(30),
        || async { count("SELECT count(*) FROM simulated_gateway_refunds").await >= 250 },
    )
    .await;
    // In the crash window: the gateway paid 250, the records say fewer.
    let answered = count("SELECT count(*) FROM simulated_gateway_refunds").await;
    let recorded =
        count("SELECT count(*) FROM purchase_refunds WHERE refunded_at IS NOT NULL").await;
    assert_eq!(answered, 250);
    assert_eq!(
        recorded, 200,
        "two batches of 100 recorded, the third held open at its 50th answer"
    );
    server.kill().await;

    let restarted = TestServer::start(&db.url, &base_env).await;
    eventually(
        "every refund recorded after the restart",
        Duration::from_secs(60),
        || async {
            count("SELECT count(*) FROM drops WHERE refunds_done_at IS NOT NULL").await == 1
        },
    )
    .await;
    let rows = client
        .query(
            "SELECT p.reservation_id, p.amount, count(g.refund_id), COALESCE(sum(g.amount), 0)::int8,
                    COALESCE(sum(g.calls), 0)::int8
             FROM purchases p LEFT JOIN simulated_gateway_refunds g ON g.charge_key = p.reservation_id
             WHERE p.drop_id = $1 GROUP BY p.reservation_id, p.amount",
            &[&drop_id],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), 1_000);
    let mut asked_twice = 0;
    for row in &rows {
        let (amount, refunds, refunded, calls): (i64, i64, i64, i64) =
            (row.get(1), row.get(2), row.get(3), row.get(4));
        assert_eq!(
            (refunds, refunded),
            (1, amount),
            "each purchase refunded once, in full"
        );
        if calls == 2 {
            asked_twice += 1;
        }
    }
    // The 50 answered and unrecorded were asked again after the restart, and paid once.
    assert_eq!(asked_twice, 50);
    assert_eq!(
        count("SELECT count(*) FROM simulated_gateway_refunds").await,
        1_000
    );
    assert_eq!(
        count("SELECT count(*) FROM purchase_refunds WHERE refunded_at IS NOT NULL").await,
        1_000
    );
    assert_eq!(
        count(
            "SELECT count(DISTINCT member_id) FROM notifications WHERE kind = 'campaign_unfunded'"
        )
        .await,
        50
    );
    assert_eq!(
        count("SELECT count(*) FROM notifications WHERE kind = 'campaign_unfunded'").await,
        50
    );
    restarted.kill().await;
}

/// Shipments repeated and racing across instances ship and notify each purchase once; the wrong purchases are
/// refused.
async fn shipments_race(apps: Vec<TestApp>) {
    let app = &apps[0];
    let (seller, drop) = campaign(app, 10, 2, 1_000, now_ms() + chrono::Duration::hours(1)).await;
    let buyers = buy(&apps, &drop, 4).await;
    let drop_id = id_of(&drop);
    let ids: Vec<Uuid> = app
        .db
        .client()
        .await
        .query(
            "SELECT id FROM purchases WHERE drop_id = $1 ORDER BY id",
            &[&drop_id],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(ids.len(), 4);
    let items: Vec<Value> = ids
        .iter()
        .map(|id| json!({"purchase_id": id, "tracking": format!("TRK-{id}")}))
        .collect();
    let path = format!("/api/v1/drops/{drop_id}/shipments");
    let sends = (0..8).map(|i| {
        let app = &apps[i % apps.len()];
        app.call(
            "POST",
            &path,
            Some(&seller.token),
            Some(json!({ "items": items })),
        )
    });
    let answers = futures_util::future::join_all(sends).await;
    let mut shipped = 0;
    for answer in &answers {
        assert_eq!(answer.status, StatusCode::OK, "{:?}", answer.body);
        shipped += answer.body["shipped"].as_u64().unwrap();
    }
    assert_eq!(shipped, 4, "each purchase shipped once, whoever raced");
    let again = app
        .call(
            "POST",
            &path,
            Some(&seller.token),
            Some(json!({ "items": items })),
        )
        .await;
    assert_eq!(again.body["shipped"], 0);
    assert_eq!(notices(app, "shipped", drop_id).await, (4, 4));
    for buyer in &buyers {
        let mine = app
            .call(
                "GET",
                "/api/v1/members/me/purchases",
                Some(&buyer.token),
                None,
            )
            .await;
        let item = &mine.body["items"][0];
        assert_eq!(item["status"], "shipped", "{item}");
        assert!(item["shipped_at"].is_string());
        assert!(item["tracking"].as_str().unwrap().starts_with("TRK-"));
        let one = app
            .call(
                "GET",
                &format!("/api/v1/purchases/{}", item["id"].as_str().unwrap()),
                Some(&buyer.token),
                None,
            )
            .await;
        assert_eq!(one.body["status"], "shipped");
    }
    let filtered = app
        .call(
            "GET",
            &format!("/api/v1/drops/{drop_id}/purchases?status=shipped"),
            Some(&seller.token),
            None,
        )
        .await;
    assert_eq!(filtered.body["items"].as_array().unwrap().len(), 4);
    // Someone else's purchase, or a stranger: refused.
    let (_, other) = campaign(app, 10, 1, 1_000, now_ms() + chrono::Duration::hours(1)).await;
    buy(&apps, &other, 1).await;
    let other_purchase: Uuid = app
        .db
        .client()
        .await
        .query_one(
            "SELECT id FROM purchases WHERE drop_id = $1",
            &[&id_of(&other)],
        )
        .await
        .unwrap()
        .get(0);
    let wrong = app
        .call(
            "POST",
            &path,
            Some(&seller.token),
            Some(json!({"items": [{"purchase_id": other_purchase}]})),
        )
        .await;
    assert_eq!(wrong.status, StatusCode::UNPROCESSABLE_ENTITY);
    let stranger = app.member(Role::Seller).await;
    let forbidden = app
        .call(
            "POST",
            &path,
            Some(&stranger.token),
            Some(json!({ "items": items })),
        )
        .await;
    assert_eq!(forbidden.status, StatusCode::FORBIDDEN);
    let empty = app
        .call(
            "POST",
            &path,
            Some(&seller.token),
            Some(json!({"items": []})),
        )
        .await;
    assert_eq!(empty.status, StatusCode::UNPROCESSABLE_ENTITY);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shipments_repeated_and_racing_ship_each_purchase_once() {
    let app = TestApp::new().await;
    shipments_race(vec![app]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shipments_racing_across_three_instances_ship_each_purchase_once() {
    let first = TestApp::with_redis(EngineArgs::default()).await;
    let second = first.another_instance().await;
    let third = first.another_instance().await;
    shipments_race(vec![first, second, third]).await;
}

#[tokio::test]
async fn a_campaign_needs_a_goal_within_its_stock_and_a_close() {
    let app = TestApp::new().await;
    let seller = app.member(Role::Seller).await;
    let product = app.product(&seller, 1_000).await;
    let opens = (Utc::now() - chrono::Duration::seconds(1)).to_rfc3339();
    let closes = (Utc::now() + chrono::Duration::hours(1)).to_rfc3339();
    for (body, field) in [
        (
            json!({"product_id": product, "stock": 5, "goal_units": 6, "opens_at": opens, "closes_at": closes}),
            "goal_units",
        ),
        (
            json!({"product_id": product, "stock": 5, "goal_units": 0, "opens_at": opens, "closes_at": closes}),
            "goal_units",
        ),
        (
            json!({"product_id": product, "stock": 5, "goal_units": 2, "opens_at": opens}),
            "goal_units",
        ),
    ] {
        let answer = app
            .call("POST", "/api/v1/drops", Some(&seller.token), Some(body))
            .await;
        assert_eq!(answer.status, StatusCode::UNPROCESSABLE_ENTITY);
        assert!(
            answer.body["error"]["fields"][field].is_string(),
            "{:?}",
            answer.body
        );
    }
    let plain = app
        .drop(
            &seller,
            json!({"product_id": product, "stock": 5, "opens_at": opens}),
        )
        .await;
    assert!(plain["goal_units"].is_null());
    assert!(plain["campaign"].is_null());
}

#[tokio::test]
async fn the_back_office_finds_members_products_drops_and_stores() {
    let app = TestApp::new().await;
    let admin = app.member(Role::Admin).await;
    let seller = app.member(Role::Seller).await;
    let tag = Uuid::new_v4().simple().to_string()[..10].to_owned();
    let client = app.db.client().await;
    client
        .execute(
            "UPDATE members SET name = $2 WHERE id = $1",
            &[&seller.id, &format!("Maker {tag}")],
        )
        .await
        .unwrap();
    let product = app.product(&seller, 1_000).await;
    client
        .execute(
            "UPDATE products SET name = $2 WHERE id = $1",
            &[&product, &format!("Boots {tag}")],
        )
        .await
        .unwrap();
    let drop = app
        .drop(
            &seller,
            json!({"product_id": product, "stock": 5,
                   "opens_at": (Utc::now() + chrono::Duration::hours(1)).to_rfc3339()}),
        )
        .await;
    // A store, suspended: the back office still finds it (newest of the four).
    let store = app
        .call(
            "POST",
            "/api/v1/stores",
            Some(&seller.token),
            Some(json!({ "name": format!("Bakery {tag}") })),
        )
        .await;
    assert_eq!(store.status, StatusCode::CREATED, "{:?}", store.body);
    let suspended = app
        .call(
            "PUT",
            &format!(
                "/api/v1/admin/stores/{}/status",
                store.body["id"].as_str().unwrap()
            ),
            Some(&admin.token),
            Some(json!({ "status": "suspended" })),
        )
        .await;
    assert_eq!(suspended.status, StatusCode::OK, "{:?}", suspended.body);
    let search = |query: String| {
        let token = admin.token.clone();
        let app = &app;
        async move {
            app.call(
                "GET",
                &format!("/api/v1/admin/search?{query}"),
                Some(&token),
                None,
            )
            .await
        }
    };
    let all = search(format!("q={tag}")).await;
    assert_eq!(all.status, StatusCode::OK, "{:?}", all.body);
    let kinds: Vec<&str> = all.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["kind"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds,
        ["store", "drop", "product", "member"],
        "newest first"
    );
    let stores = search(format!("q={tag}&kind=store")).await;
    assert_eq!(
        stores.body["items"][0]["id"], store.body["id"],
        "{:?}",
        stores.body
    );
    assert_eq!(stores.body["items"][0]["title"], format!("Bakery {tag}"));
    let by_id = search(format!("q={}&kind=drop", drop["id"].as_str().unwrap())).await;
    assert_eq!(by_id.body["items"][0]["id"], drop["id"], "{:?}", by_id.body);
    let members = search(format!("q={}&kind=member", &seller.email[20..32])).await;
    assert_eq!(
        members.body["items"][0]["id"],
        seller.id.to_string(),
        "{:?}",
        members.body
    );
    let paged = search(format!("q={tag}&limit=2")).await;
    assert_eq!(paged.body["items"].as_array().unwrap().len(), 2);
    let next = search(format!(
        "q={tag}&limit=2&cursor={}",
        paged.body["next_cursor"].as_str().unwrap()
    ))
    .await;
    assert_eq!(next.body["items"][0]["kind"], "product");
    assert_eq!(next.body["items"][1]["kind"], "member");
    assert!(next.body["next_cursor"].is_null());
    let literal = search("q=%25&kind=product".to_owned()).await;
    assert_eq!(
        literal.body["items"].as_array().unwrap().len(),
        0,
        "% is a character, not a wildcard"
    );
    let customer = app.member(Role::Customer).await;
    let refused = app
        .call(
            "GET",
            &format!("/api/v1/admin/search?q={tag}"),
            Some(&customer.token),
            None,
        )
        .await;
    assert_eq!(refused.status, StatusCode::FORBIDDEN);
    assert_eq!(
        search("q=".to_owned()).await.status,
        StatusCode::UNPROCESSABLE_ENTITY
    );
}
