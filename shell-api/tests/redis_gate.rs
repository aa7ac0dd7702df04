//! The Redis gate, in-process: two or more engines over one Postgres and one Redis (separate gates, memories and
//! idempotency stores, as separate processes would have), checked against the guarantees of DESIGN.md that need
//! many instances: one stock, any instance serves any hold, shared idempotency, one clock for expiry, the sold-out
//! flag clearing everywhere, the journal reaching Postgres, fail closed, and recovery after Redis lost its data.
#![allow(
    clippy::too_many_lines,
    reason = "each test is one scenario read top to bottom: its setup, the fault or load, and every check"
)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use common::{
    cancel, drop_state, eventually, keyed, pay, purchase_tally, read_reservation, redis_prefix,
    redis_url, reserve, test_redis_args, TestApp, TestDb, TestMember,
};
use engine::clock::SystemClock;
use serde_json::{json, Value};
use shell_api::auth::Role;
use shell_api::config::EngineArgs;
use uuid::Uuid;

fn fast_reaper() -> EngineArgs {
    EngineArgs {
        reaper_interval_ms: 100,
        ..EngineArgs::default()
    }
}

/// A Redis gate that hears no note at all (as if every one were lost, its subscription never cut, so no
/// resubscribe sweep), with a backstop sweep too slow to matter (ten minutes): what it schedules itself is all that
/// settles its holds and payments on time.
fn every_note_lost() -> engine::gate::redis::RedisGateConfig {
    let mut config = test_redis_args(&[redis_url()], &redis_prefix())
        .gate_config()
        .unwrap();
    config.notes = false;
    config.sweep_period_min = Duration::from_secs(600);
    config
}

fn drop_id(drop: &Value) -> Uuid {
    drop["id"].as_str().unwrap().parse().unwrap()
}

/// The holds of a drop by status as stored (rows, and journaled holds as `held`), as the journal wrote them.
async fn stored_statuses(app: &TestApp, drop: Uuid) -> Vec<(String, i64)> {
    app.db
        .client()
        .await
        .query(
            "SELECT status || COALESCE(':' || reason, ''), count(*) FROM stored_holds WHERE drop_id = $1
             GROUP BY 1 ORDER BY 1",
            &[&drop],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_sell_exactly_the_stock_and_keep_the_limit_across_them() {
    const STOCK: u32 = 60;
    let a = Arc::new(TestApp::with_redis(EngineArgs::default()).await);
    let b = Arc::new(a.another_instance().await);
    let (seller, drop) = a
        .open_drop(STOCK, 100, json!({ "per_member_limit": 2 }))
        .await;
    let mut members = Vec::new();
    for _ in 0..100 {
        members.push(a.member(Role::Customer).await);
    }
    // Every member tries three single units, alternating instances: the limit (2) must hold across both.
    let mut tasks = Vec::new();
    for (n, member) in members.iter().enumerate() {
        for attempt in 0..3 {
            let app = if (n + attempt) % 2 == 0 {
                a.clone()
            } else {
                b.clone()
            };
            let (member, drop) = (member.clone(), drop.clone());
            tasks.push(tokio::spawn(async move {
                let response = reserve(&app, &member, &drop, 1).await;
                (member.id, response.status, response.code().to_owned())
            }));
        }
    }
    let mut granted = std::collections::HashMap::<Uuid, u32>::new();
    let (mut sold_out, mut over_limit) = (0, 0);
    for task in tasks {
        let (member, status, code) = task.await.unwrap();
        match status {
            StatusCode::CREATED => *granted.entry(member).or_default() += 1,
            StatusCode::CONFLICT if code == "sold_out" => sold_out += 1,
            StatusCode::CONFLICT if code == "limit_exceeded" => over_limit += 1,
            other => panic!("unexpected {other} {code}"),
        }
    }
    assert_eq!(
        granted.values().sum::<u32>(),
        STOCK,
        "exactly the stock is held"
    );
    assert!(
        granted.values().all(|&units| units <= 2),
        "limit across instances"
    );
    assert!(sold_out > 0);
    for app in [&a, &b] {
        let state = drop_state(app, &drop).await;
        assert_eq!(
            (state["available"].as_u64(), state["held"].as_u64()),
            (Some(0), Some(u64::from(STOCK)))
        );
        assert_eq!(state["status"], "sold_out");
    }
    // The journal writes every hold to Postgres, whichever instance made it.
    let id = drop_id(&drop);
    eventually("every hold stored", Duration::from_secs(10), || async {
        stored_statuses(&a, id).await == vec![("held".to_owned(), i64::from(STOCK))]
    })
    .await;
    // The drop report adds up what each instance decided: it equals what the clients were answered.
    for app in [&a, &b] {
        app.state.engine.record_report().await;
        app.state.engine.writer().flush().await.unwrap();
    }
    let report = b
        .call(
            "GET",
            &format!("/api/v1/drops/{id}/report"),
            Some(&seller.token),
            None,
        )
        .await;
    let funnel = &report.body["funnel"];
    assert_eq!(
        (
            funnel["reserved"].as_u64(),
            funnel["refused_sold_out"].as_u64(),
            funnel["refused_limit"].as_u64()
        ),
        (Some(u64::from(STOCK)), Some(sold_out), Some(over_limit)),
        "{}",
        report.body
    );
}

/// At a drop's opening, an instance that has not served the drop yet gets hundreds of requests for it at once. They
/// wait for one load from Postgres, not one each: each load took a connection of the pool for the same rows, and in
/// the opening burst on three instances (`scripts/burst.sh --redis`) 1,930 requests waited out the pool and were
/// answered 503.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_for_a_drop_this_instance_has_not_loaded_wait_for_one_load() {
    const STOCK: u32 = 50;
    const REQUESTS: usize = 300;
    let a = TestApp::with_redis(EngineArgs::default()).await;
    // Started before the drop exists, so it has not loaded it: its first requests for it load it.
    let b = Arc::new(a.another_instance().await);
    let (_, drop) = a
        .open_drop(STOCK, 100, json!({ "per_member_limit": 1 }))
        .await;
    let buyer = a.member(Role::Customer).await;
    assert!(!b.state.engine.is_loaded(drop_id(&drop)));
    let tasks: Vec<_> = (0..REQUESTS)
        .map(|_| {
            let (b, buyer, drop) = (Arc::clone(&b), buyer.clone(), drop.clone());
            tokio::spawn(async move { reserve(&b, &buyer, &drop, 1).await })
        })
        .collect();
    let mut answers = std::collections::BTreeMap::<String, usize>::new();
    for task in tasks {
        let response = task.await.unwrap();
        let label = match response.status {
            StatusCode::CREATED => "201".to_owned(),
            status => format!("{} {}", status.as_u16(), response.code()),
        };
        *answers.entry(label).or_default() += 1;
    }
    assert_eq!(
        b.state.engine.stats().drops_loaded.get(),
        1,
        "one load for {REQUESTS} requests; answers {answers:?}"
    );
    // The buyer's limit is 1: one grant, the rest refused on the limit, none failed.
    assert_eq!(answers.get("201"), Some(&1), "{answers:?}");
    assert_eq!(
        answers.get("409 limit_exceeded"),
        Some(&(REQUESTS - 1)),
        "{answers:?}"
    );
}

/// The requests that wait on a drop's load share its outcome when it fails too: each got the failure only after
/// trying the load again itself, one waiter after the other (at an opening with Postgres away, each waiting out the
/// pool in turn). A drop that does not exist is that failure, made at will.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_that_waited_on_a_failed_load_share_its_failure() {
    const REQUESTS: usize = 200;
    let app = Arc::new(TestApp::with_redis(EngineArgs::default()).await);
    let buyer = app.member(Role::Customer).await;
    let missing = json!({ "id": Uuid::now_v7().to_string() });
    let tasks: Vec<_> = (0..REQUESTS)
        .map(|_| {
            let (app, buyer, missing) = (Arc::clone(&app), buyer.clone(), missing.clone());
            tokio::spawn(async move { reserve(&app, &buyer, &missing, 1).await })
        })
        .collect();
    for task in tasks {
        let response = task.await.unwrap();
        assert_eq!(
            (response.status, response.code()),
            (StatusCode::NOT_FOUND, "drop_not_found")
        );
    }
    let loads = app.state.engine.stats().drops_loaded.get();
    println!("{REQUESTS} requests for a drop that does not exist: {loads} loads");
    // A load begins again only for requests that arrive after the last one ended: a few here; one each without the
    // sharing.
    assert!(
        loads <= REQUESTS as u64 / 10,
        "{loads} loads for {REQUESTS} requests"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hold_made_on_one_instance_is_read_paid_and_answered_on_another() {
    let a = TestApp::with_redis(EngineArgs::default()).await;
    let b = a.another_instance().await;
    let (_, drop) = a.open_drop(5, 1500, json!({ "per_member_limit": 2 })).await;
    let buyer = a.member(Role::Customer).await;
    let held = reserve(&a, &buyer, &drop, 2).await;
    assert_eq!(held.status, StatusCode::CREATED, "{:?}", held.body);
    let id = held.body["id"].as_str().unwrap().to_owned();
    // Before any Postgres write could have happened, B reads it from Redis.
    let read = read_reservation(&b, &buyer, &id.to_string()).await;
    assert_eq!(read.status, StatusCode::OK, "{:?}", read.body);
    assert_eq!(
        (read.body["status"].as_str(), read.body["quantity"].as_u64()),
        (Some("held"), Some(2))
    );
    assert_eq!(read.body["expires_at"], held.body["expires_at"]);
    let stranger = a.member(Role::Customer).await;
    assert_eq!(
        pay(&b, &stranger, &id, "tok_ok").await.status,
        StatusCode::FORBIDDEN
    );
    let paid = pay(&b, &buyer, &id, "tok_ok").await;
    assert_eq!(paid.status, StatusCode::OK, "{:?}", paid.body);
    assert_eq!(paid.body["amount"], 3000);
    // Paying again through A answers the same purchase, whose id is the one stored.
    let again = pay(&a, &buyer, &id, "tok_ok").await;
    assert_eq!((again.status, &again.body), (StatusCode::OK, &paid.body));
    let stored: Uuid =
        a.db.client()
            .await
            .query_one(
                "SELECT id FROM purchases WHERE reservation_id = $1",
                &[&id.parse::<Uuid>().unwrap()],
            )
            .await
            .unwrap()
            .get(0);
    assert_eq!(paid.body["purchase_id"], stored.to_string());
    assert_eq!(purchase_tally(&a.db, drop_id(&drop)).await, (1, 1, 2));
    let read = read_reservation(&a, &buyer, &id.to_string()).await;
    assert_eq!(read.body["status"], "paid");
    assert_eq!(read.body["purchase_id"], paid.body["purchase_id"]);
    assert_eq!(drop_state(&b, &drop).await["sold"], 2);
    // Cancel through the other instance than the one that reserved.
    let second = reserve(&b, &stranger, &drop, 1).await;
    let second_id = second.body["id"].as_str().unwrap();
    let cancelled = cancel(&a, &stranger, second_id).await;
    assert_eq!(cancelled.status, StatusCode::NO_CONTENT);
    let read = read_reservation(&b, &stranger, second_id).await;
    assert_eq!(
        (read.body["status"].as_str(), read.body["reason"].as_str()),
        (Some("released"), Some("cancelled"))
    );
    let state = drop_state(&a, &drop).await;
    assert_eq!(
        (state["available"].as_u64(), state["sold"].as_u64()),
        (Some(3), Some(2))
    );
    eventually(
        "journal stored the cancel and the payment",
        Duration::from_secs(10),
        || async {
            stored_statuses(&a, drop_id(&drop)).await
                == vec![("paid".to_owned(), 1), ("released:cancelled".to_owned(), 1)]
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_on_another_instance_replays_the_first_answer() {
    let a = Arc::new(TestApp::with_redis(EngineArgs::default()).await);
    let b = Arc::new(a.another_instance().await);
    let (_, drop) = a.open_drop(10, 100, json!({})).await;
    let buyer = a.member(Role::Customer).await;
    let path = format!(
        "/api/v1/drops/{}/reservations",
        drop["id"].as_str().unwrap()
    );
    // Ten concurrent retries with one key, spread over both instances: one hold.
    let mut tasks = Vec::new();
    for n in 0..10 {
        let app = if n % 2 == 0 { a.clone() } else { b.clone() };
        let (path, buyer) = (path.clone(), buyer.clone());
        tasks.push(tokio::spawn(async move {
            keyed(&app, &path, &buyer, "hold-1", json!({ "quantity": 1 })).await
        }));
    }
    let mut answers = Vec::new();
    for task in tasks {
        let response = task.await.unwrap();
        assert_eq!(response.status, StatusCode::CREATED, "{:?}", response.body);
        answers.push(response.body);
    }
    assert!(
        answers.windows(2).all(|pair| pair[0] == pair[1]),
        "one answer: {answers:?}"
    );
    assert_eq!(drop_state(&a, &drop).await["held"], 1);
    let id = answers[0]["id"].as_str().unwrap();
    let pay_path = format!("/api/v1/reservations/{id}/payment");
    let first = keyed(
        &b,
        &pay_path,
        &buyer,
        "pay-1",
        json!({ "payment_token": "tok_ok" }),
    )
    .await;
    let retry = keyed(
        &a,
        &pay_path,
        &buyer,
        "pay-1",
        json!({ "payment_token": "tok_ok" }),
    )
    .await;
    assert_eq!(first.status, StatusCode::OK);
    assert_eq!((retry.status, &retry.body), (first.status, &first.body));
    assert_eq!(retry.headers.get("idempotent-replayed").unwrap(), "true");
    assert_eq!(purchase_tally(&a.db, drop_id(&drop)).await, (1, 1, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holds_expire_by_one_clock_and_their_stock_clears_sold_out_everywhere() {
    let a = TestApp::with_redis(fast_reaper()).await;
    let b = a.another_instance().await;
    let (_, drop) = a.open_drop(1, 100, json!({ "hold_seconds": 1 })).await;
    let first = a.member(Role::Customer).await;
    let second = a.member(Role::Customer).await;
    let held = reserve(&a, &first, &drop, 1).await;
    assert_eq!(held.status, StatusCode::CREATED);
    // B learns the drop is sold out from Redis and then rejects from its local flag.
    assert_eq!(reserve(&b, &second, &drop, 1).await.code(), "sold_out");
    assert!(b.state.engine.is_sold_out_locally(drop_id(&drop)));
    // The hold expires by Redis's clock; either instance's reaper returns it, and B's flag clears.
    let released_at = Instant::now();
    eventually(
        "B's sold-out flag cleared",
        Duration::from_secs(5),
        || async { !b.state.engine.is_sold_out_locally(drop_id(&drop)) },
    )
    .await;
    let took = released_at.elapsed();
    assert!(
        took < Duration::from_millis(1000 + 100 + 300),
        "flag cleared {took:?} after the hold was placed"
    );
    let id = held.body["id"].as_str().unwrap();
    let late = pay(&b, &first, id, "tok_ok").await;
    assert_eq!(
        (late.status, late.code()),
        (StatusCode::CONFLICT, "already_released")
    );
    assert_eq!(
        reserve(&b, &second, &drop, 1).await.status,
        StatusCode::CREATED
    );
    eventually(
        "journal stored the expiry",
        Duration::from_secs(10),
        || async {
            stored_statuses(&a, drop_id(&drop)).await
                == vec![("held".to_owned(), 1), ("released:expired".to_owned(), 1)]
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sold_out_flag_clears_on_every_instance_within_100_ms_of_a_release() {
    let a = TestApp::with_redis(EngineArgs::default()).await;
    let b = a.another_instance().await;
    a_release_on_a_clears_b_s_flag_within_100_ms(&a, &b).await;
}

/// A one-unit drop held on A and refused on B: A's cancel clears B's sold-out flag within 100 ms (by the note the
/// release publishes; nothing polls), and B then sells the unit.
async fn a_release_on_a_clears_b_s_flag_within_100_ms(a: &TestApp, b: &TestApp) {
    let (_, drop) = a.open_drop(1, 100, json!({})).await;
    let holder = a.member(Role::Customer).await;
    let other = a.member(Role::Customer).await;
    let held = reserve(a, &holder, &drop, 1).await;
    assert_eq!(reserve(b, &other, &drop, 1).await.code(), "sold_out");
    let id = held.body["id"].as_str().unwrap();
    let cancelled_at = Instant::now();
    let cancel = cancel(a, &holder, id).await;
    assert_eq!(cancel.status, StatusCode::NO_CONTENT);
    eventually("B's flag cleared", Duration::from_secs(2), || async {
        !b.state.engine.is_sold_out_locally(drop_id(&drop))
    })
    .await;
    let took = cancelled_at.elapsed();
    assert!(took <= Duration::from_millis(100), "cleared after {took:?}");
    assert_eq!(
        reserve(b, &other, &drop, 1).await.status,
        StatusCode::CREATED
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_redis_refuses_with_503_and_grants_nothing() {
    let up = TestApp::with_redis(EngineArgs::default()).await;
    let (_, drop) = up.open_drop(5, 100, json!({})).await;
    // An instance whose Redis is a port nobody listens on: every reservation is refused, none granted.
    let dead = TestApp::redis_instance(
        Arc::clone(&up.db),
        EngineArgs::default(),
        &["redis://127.0.0.1:1".to_owned()],
        &up.redis.as_ref().unwrap().key_prefix,
    )
    .await;
    let buyer = up.member(Role::Customer).await;
    let refused = reserve(&dead, &buyer, &drop, 1).await;
    assert_eq!(
        (refused.status, refused.code()),
        (StatusCode::SERVICE_UNAVAILABLE, "gate_unavailable")
    );
    assert!(refused.headers.contains_key("retry-after"));
    let state = drop_state(&up, &drop).await;
    assert_eq!(
        (state["available"].as_u64(), state["held"].as_u64()),
        (Some(5), Some(0))
    );
    assert_eq!(
        dead.call("GET", "/readyz", None, None).await.status,
        StatusCode::SERVICE_UNAVAILABLE
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_redis_lost_a_drop_it_is_rebuilt_from_postgres_and_nothing_paid_is_sold_again() {
    let a = TestApp::with_redis(EngineArgs::default()).await;
    let (_, drop) = a.open_drop(3, 100, json!({})).await;
    let buyers: Vec<TestMember> =
        futures_util::future::join_all((0..3).map(|_| a.member(Role::Customer))).await;
    let paid = reserve(&a, &buyers[0], &drop, 1).await;
    let paid_id = paid.body["id"].as_str().unwrap().to_owned();
    assert_eq!(
        pay(&a, &buyers[0], &paid_id, "tok_ok").await.status,
        StatusCode::OK
    );
    let held = reserve(&a, &buyers[1], &drop, 1).await;
    let held_id = held.body["id"].as_str().unwrap().to_owned();
    let id = drop_id(&drop);
    eventually(
        "the hold is in Postgres",
        Duration::from_secs(10),
        || async {
            stored_statuses(&a, id).await == vec![("held".to_owned(), 1), ("paid".to_owned(), 1)]
        },
    )
    .await;
    // Redis loses everything of the drop.
    let mut conn = a.redis.as_ref().unwrap().conn.clone();
    let keys = engine::gate::redis::drop_keys(&a.redis.as_ref().unwrap().key_prefix, id);
    let _: () = redis::cmd("DEL")
        .arg(&keys[..])
        .query_async(&mut conn)
        .await
        .unwrap();
    // The next read rebuilds it from Postgres: the paid unit stays sold, the live hold keeps its id.
    let state = drop_state(&a, &drop).await;
    assert_eq!(
        (
            state["available"].as_u64(),
            state["held"].as_u64(),
            state["sold"].as_u64()
        ),
        (Some(1), Some(1), Some(1))
    );
    let read = a
        .call(
            "GET",
            &format!("/api/v1/reservations/{held_id}"),
            Some(&buyers[1].token),
            None,
        )
        .await;
    assert_eq!(read.body["status"], "held", "{:?}", read.body);
    assert_eq!(
        pay(&a, &buyers[1], &held_id, "tok_ok").await.status,
        StatusCode::OK
    );
    // One unit left to sell, and no more.
    assert_eq!(
        reserve(&a, &buyers[2], &drop, 1).await.status,
        StatusCode::CREATED
    );
    assert_eq!(reserve(&a, &buyers[0], &drop, 1).await.code(), "sold_out");
    assert_eq!(purchase_tally(&a.db, id).await, (2, 2, 2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payments_left_by_a_dead_instance_are_settled_from_postgres() {
    // A one-second lease, so the reaper looks when the leases end, as the notes of their payments told it to.
    let a = TestApp::redis_instance_with_args(
        Arc::new(TestDb::new().await),
        fast_reaper(),
        shell_api::config::RedisArgs {
            pay_lease_seconds: 1,
            ..test_redis_args(&[redis_url()], &redis_prefix())
        },
        Arc::new(SystemClock),
    )
    .await;
    let (_, drop) = a.open_drop(5, 700, json!({})).await;
    let id = drop_id(&drop);
    let committed = a.member(Role::Customer).await;
    let abandoned = a.member(Role::Customer).await;
    let first = reserve(&a, &committed, &drop, 1).await.body["id"]
        .as_str()
        .unwrap()
        .parse::<Uuid>()
        .unwrap();
    let second = reserve(&a, &abandoned, &drop, 1).await.body["id"]
        .as_str()
        .unwrap()
        .parse::<Uuid>()
        .unwrap();
    eventually("holds stored", Duration::from_secs(10), || async {
        stored_statuses(&a, id).await == vec![("held".to_owned(), 2)]
    })
    .await;
    // Two instances began paying and died: one after committing its purchase, one before. Their leases run out a
    // second from now. The purchase goes in first, so the reaper cannot find the lease ended before it is stored.
    let product: Uuid = drop["product_id"].as_str().unwrap().parse().unwrap();
    a.db.client()
        .await
        .execute(
            "INSERT INTO purchases (id, reservation_id, drop_id, product_id, member_id, quantity, amount, currency, paid_at)
             VALUES ($1, $2, $3, $4, $5, 1, 700, 'KRW', now())",
            &[&Uuid::now_v7(), &first, &id, &product, &committed.id],
        )
        .await
        .unwrap();
    // What transition.lua's `begin` writes and publishes: the lease in the hold's state and the lease set, and a note.
    let redis = a.redis.as_ref().unwrap();
    let keys = engine::gate::redis::drop_keys(&redis.key_prefix, id);
    let mut conn = redis.conn.clone();
    let lease_end = chrono::Utc::now().timestamp_millis() + 1000;
    for hold in [first, second] {
        let place = engine::gate::redis::ids::HoldRef::from_id(hold)
            .unwrap()
            .state_ref();
        let _: () = redis::pipe()
            .cmd("HSET")
            .arg(&keys[2])
            .arg(&place)
            .arg(format!("p:{lease_end}"))
            .cmd("ZADD")
            .arg(&keys[4])
            .arg(lease_end)
            .arg(&place)
            .cmd("PUBLISH")
            .arg(format!("{}notes", redis.key_prefix))
            .arg(format!("{id}:l:-"))
            .query_async(&mut conn)
            .await
            .unwrap();
    }
    // The reaper fences both in Postgres: the committed one is sold; the other's release is stored first (so its
    // payment, should it resume, is refused), then its unit returns to sale.
    eventually("stale payments settled", Duration::from_secs(5), || async {
        let state = drop_state(&a, &drop).await;
        (
            state["available"].as_u64(),
            state["held"].as_u64(),
            state["sold"].as_u64(),
        ) == (Some(4), Some(0), Some(1))
    })
    .await;
    let paid = read_reservation(&a, &committed, &first.to_string()).await;
    assert_eq!(paid.body["status"], "paid");
    let released = read_reservation(&a, &abandoned, &second.to_string()).await;
    assert_eq!(
        (&released.body["status"], &released.body["reason"]),
        (&json!("released"), &json!("expired"))
    );
    let stored: String =
        a.db.client()
            .await
            .query_one("SELECT status FROM reservations WHERE id = $1", &[&second])
            .await
            .unwrap()
            .get(0);
    assert_eq!(stored, "released", "the fence is stored in Postgres");
    // The buyer whose payment lapsed cannot pay it now; its unit is for sale again.
    let retry = pay(&a, &abandoned, &second.to_string(), "tok_ok").await;
    assert_eq!(
        (retry.status, retry.code()),
        (StatusCode::CONFLICT, "already_released")
    );
    assert_eq!(drop_state(&a, &drop).await["sold"], 1);
    assert_eq!(purchase_tally(&a.db, id).await.0, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_settled_drop_leaves_memory_and_its_keys_expire_from_redis() {
    let args = EngineArgs {
        drop_retain_seconds: 0,
        ..EngineArgs::default()
    };
    let a = TestApp::with_redis(args).await;
    let (_, drop) = a.open_drop(1, 10, json!({})).await;
    let buyer = a.member(Role::Customer).await;
    let id = reserve(&a, &buyer, &drop, 1).await.body["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let paid = pay(&a, &buyer, &id, "tok_ok").await;
    assert_eq!(paid.status, StatusCode::OK);
    eventually(
        "journal stored the paid hold",
        Duration::from_secs(10),
        || async { stored_statuses(&a, drop_id(&drop)).await == vec![("paid".to_owned(), 1)] },
    )
    .await;
    assert_eq!(a.state.engine.unload_settled().await.unwrap(), 1);
    assert_eq!(a.state.engine.loaded_drops(), 0);
    let redis = a.redis.as_ref().unwrap();
    let keys = engine::gate::redis::drop_keys(&redis.key_prefix, drop_id(&drop));
    let mut conn = redis.conn.clone();
    let ttl: i64 = redis::cmd("PTTL")
        .arg(&keys[0])
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(ttl > 0, "the settled drop's keys expire: {ttl}");
    // Still answered the same, after the keys are gone too.
    let _: () = redis::cmd("DEL")
        .arg(&keys[..])
        .query_async(&mut conn)
        .await
        .unwrap();
    let again = pay(&a, &buyer, &id, "tok_ok").await;
    assert_eq!((again.status, &again.body), (StatusCode::OK, &paid.body));
    let state = drop_state(&a, &drop).await;
    assert_eq!(
        (state["sold"].as_u64(), state["status"].as_str()),
        (Some(1), Some("sold_out"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn journal_entries_a_dead_consumer_left_pending_are_claimed_and_written() {
    const TRIES: i64 = 40;
    let a = TestApp::with_redis(EngineArgs::default()).await;
    let (_, drop) = a.open_drop(TRIES as u32, 100, json!({})).await;
    let id = drop_id(&drop);
    let redis = a.redis.as_ref().unwrap();
    let stream = engine::gate::redis::drop_keys(&redis.key_prefix, id)[3].clone();
    let mut conn = redis.conn.clone();
    // A consumer of the journal group that takes entries and then dies without writing or acknowledging them. It
    // races the live journal for each new entry, so it reads after each of at least five reservations, and after
    // more until it has taken some.
    let (mut ghost_took, mut holds) = (0, 0);
    while holds < 5 || (ghost_took == 0 && holds < TRIES) {
        let buyer = a.member(Role::Customer).await;
        assert_eq!(
            reserve(&a, &buyer, &drop, 1).await.status,
            StatusCode::CREATED
        );
        holds += 1;
        let taken: redis::Value = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg("journal")
            .arg("ghost")
            .arg("COUNT")
            .arg(100)
            .arg("STREAMS")
            .arg(&stream)
            .arg(">")
            .query_async(&mut conn)
            .await
            .unwrap();
        if let redis::Value::Array(streams) = taken {
            ghost_took += streams.len();
        }
    }
    assert!(ghost_took > 0, "the ghost took some entries");
    // The live journal claims them once idle past JOURNAL_CLAIM_IDLE_MS and writes every hold.
    eventually("every hold stored", Duration::from_secs(10), || async {
        stored_statuses(&a, id).await == vec![("held".to_owned(), holds)]
    })
    .await;
    eventually("nothing left pending", Duration::from_secs(5), || async {
        pending_on(&mut redis.conn.clone(), &stream)
            .await
            .is_empty()
    })
    .await;
}

/// A claim that finds some of a dead consumer's entries idle long enough, and others not yet, claims the others
/// once they are, though the drop has gone quiet (no note comes to wake its journal). The dead consumer's entries are
/// made deterministic with `XCLAIM ... FORCE` (which makes an entry pending on a consumer, as if delivered to it): one
/// idle for a minute, one kept fresh by claiming it again every 20 ms until the live journal has claimed the first,
/// which leaves it pending and not yet idle when the journal's claim runs. (Without the claim running again, the
/// journal waited for a note, and the entry stayed pending until the backstop sweep, up to 30 s later.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_consumers_entries_not_yet_idle_at_a_claim_are_claimed_once_idle_on_a_quiet_drop() {
    let a = TestApp::with_redis(EngineArgs::default()).await;
    let (_, drop) = a.open_drop(10, 100, json!({})).await;
    let id = drop_id(&drop);
    let redis = a.redis.as_ref().unwrap();
    let stream = engine::gate::redis::drop_keys(&redis.key_prefix, id)[3].clone();
    let mut conn = redis.conn.clone();
    for _ in 0..2 {
        let buyer = a.member(Role::Customer).await;
        assert_eq!(
            reserve(&a, &buyer, &drop, 1).await.status,
            StatusCode::CREATED
        );
    }
    eventually("both holds stored", Duration::from_secs(10), || async {
        stored_statuses(&a, id).await == vec![("held".to_owned(), 2)]
    })
    .await;
    let entries: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
        .arg(&stream)
        .arg("-")
        .arg("+")
        .query_async(&mut conn)
        .await
        .unwrap();
    let ids: Vec<String> = entries.into_iter().map(|(id, _)| id).collect();
    let [idle, fresh] = &ids[..] else {
        panic!("two reserve entries expected: {ids:?}")
    };
    let to_ghost = |entry: &str, idle_ms: u64| {
        let mut command = redis::cmd("XCLAIM");
        command
            .arg(&stream)
            .arg("journal")
            .arg("ghost")
            .arg(0)
            .arg(entry)
            .arg("IDLE")
            .arg(idle_ms)
            .arg("FORCE")
            .arg("JUSTID");
        command
    };
    let _: Vec<String> = to_ghost(idle, 60_000).query_async(&mut conn).await.unwrap();
    let _: Vec<String> = to_ghost(fresh, 0).query_async(&mut conn).await.unwrap();
    let refreshing = {
        let (mut conn, command) = (conn.clone(), to_ghost(fresh, 0));
        tokio::spawn(async move {
            loop {
                let _: Vec<String> = command.query_async(&mut conn).await.unwrap();
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    // One more reservation: its note makes the journal claim JOURNAL_CLAIM_IDLE_MS (+ a margin) later.
    let buyer = a.member(Role::Customer).await;
    assert_eq!(
        reserve(&a, &buyer, &drop, 1).await.status,
        StatusCode::CREATED
    );
    eventually(
        "the idle entry claimed from the dead consumer",
        Duration::from_secs(5),
        || async {
            !pending_on(&mut redis.conn.clone(), &stream)
                .await
                .contains(idle)
        },
    )
    .await;
    refreshing.abort();
    assert!(
        pending_on(&mut conn, &stream).await.contains(fresh),
        "the fresh entry was still the dead consumer's at that claim"
    );
    // The drop is quiet from here on: no note, and the backstop sweep is up to 30 s away.
    eventually(
        "the other entry claimed once idle, with no note",
        Duration::from_secs(3),
        || async {
            pending_on(&mut redis.conn.clone(), &stream)
                .await
                .is_empty()
        },
    )
    .await;
    assert_eq!(stored_statuses(&a, id).await, vec![("held".to_owned(), 3)]);
}

/// The ids of the journal group's pending entries of `stream` (whoever they were delivered to).
async fn pending_on(conn: &mut impl redis::aio::ConnectionLike, stream: &str) -> Vec<String> {
    let pending: Vec<(String, String, u64, u64)> = redis::cmd("XPENDING")
        .arg(stream)
        .arg("journal")
        .arg("-")
        .arg("+")
        .arg(100)
        .query_async(conn)
        .await
        .unwrap();
    pending.into_iter().map(|(id, ..)| id).collect()
}

/// Commands a Redis server has processed (those its scripts call included), from INFO.
async fn commands_processed(server: &common::RedisServer) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg("stats")
        .query_async(&mut server.connection().await.unwrap())
        .await
        .unwrap();
    info.lines()
        .find_map(|line| line.strip_prefix("total_commands_processed:"))
        .and_then(|count| count.trim().parse().ok())
        .expect("total_commands_processed in INFO stats")
}

/// `count` open drops of one seller, each with one hold (stock left), on `app`.
async fn idle_drops(app: &TestApp, count: usize) -> Vec<Value> {
    let seller = app.member(Role::Seller).await;
    let product = app.product(&seller, 100).await;
    let buyer = app.member(Role::Customer).await;
    let mut drops = Vec::with_capacity(count);
    for _ in 0..count {
        let drop = app
            .drop(
                &seller,
                json!({
                    "product_id": product,
                    "stock": 5,
                    "opens_at": (chrono::Utc::now() - chrono::Duration::seconds(1)).to_rfc3339(),
                    "hold_seconds": 3600,
                }),
            )
            .await;
        assert_eq!(
            reserve(app, &buyer, &drop, 1).await.status,
            StatusCode::CREATED
        );
        drops.push(drop);
    }
    drops
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_drops_cost_redis_a_bounded_number_of_calls_whatever_their_number() {
    // A Redis of the test's own, so INFO counts only what these two instances send.
    let server = common::RedisServer::start().await;
    let db = Arc::new(common::TestDb::new().await);
    let prefix = common::redis_prefix();
    let a = TestApp::redis_instance(Arc::clone(&db), fast_reaper(), &[server.url()], &prefix).await;
    let b = TestApp::redis_instance(db, fast_reaper(), &[server.url()], &prefix).await;
    const DROPS: usize = 300;
    let drops = idle_drops(&a, DROPS).await;
    // B loads every drop too, as an instance that served a request about it would.
    for drop in &drops {
        assert_eq!(drop_state(&b, drop).await["held"], 1);
    }
    // Settle: the journals write the holds, the claims announced by the notes run (JOURNAL_CLAIM_IDLE_MS is 300 in
    // tests), each drop's first reaper pass learns its next expiry (an hour away).
    eventually("every hold journaled", Duration::from_secs(20), || async {
        let client = a.db.client().await;
        let row = client
            .query_one("SELECT count(*) FROM stored_holds", &[])
            .await
            .unwrap();
        row.get::<_, i64>(0) == DROPS as i64
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let window = Duration::from_secs(3);
    let before = commands_processed(&server).await;
    tokio::time::sleep(window).await;
    let per_second = (commands_processed(&server).await - before) as f64 / window.as_secs_f64();
    eprintln!("{DROPS} idle drops on 2 instances: {per_second:.0} Redis commands/s");
    // Polling cost about 4 calls per drop per instance per second (2,400/s here); now the backstop sweeps at most
    // 10 drops a second per instance (a read of the units, a journal read and claim, a reaper script: about 10
    // calls each, about 220/s here), whatever the number of drops.
    assert!(
        per_second < 400.0,
        "{DROPS} idle drops on 2 instances cost {per_second:.0} Redis commands/s"
    );
    // Still live after the quiet: a release on A clears B's sold-out flag at once.
    a_release_on_a_clears_b_s_flag_within_100_ms(&a, &b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_note_lost_while_the_subscription_was_cut_is_caught_by_the_sweep_on_resubscribing() {
    let server = common::RedisServer::start().await;
    let db = Arc::new(common::TestDb::new().await);
    let prefix = common::redis_prefix();
    let a = TestApp::redis_instance(db, EngineArgs::default(), &[server.url()], &prefix).await;
    let (_, drop) = a.open_drop(1, 100, json!({})).await;
    let id = drop_id(&drop);
    let holder = a.member(Role::Customer).await;
    let held = reserve(&a, &holder, &drop, 1).await;
    assert_eq!(held.status, StatusCode::CREATED);
    assert!(a.state.engine.is_sold_out_locally(id));
    // A unit comes back without a note reaching A (as if A's subscription was down when it was sent).
    let keys = engine::gate::redis::drop_keys(&prefix, id);
    let mut conn = server.connection().await.unwrap();
    let () = redis::pipe()
        .cmd("HINCRBY")
        .arg(&keys[0])
        .arg("avail")
        .arg(1)
        .ignore()
        .cmd("HINCRBY")
        .arg(&keys[0])
        .arg("stock")
        .arg(1)
        .ignore()
        .query_async(&mut conn)
        .await
        .unwrap();
    // Nothing polls: A still believes the drop is sold out.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(a.state.engine.is_sold_out_locally(id), "no note, no change");
    // The subscription is cut; A subscribes again and sweeps every drop, which finds the unit.
    let killed: i64 = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("pubsub")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(killed, 1, "A's one subscription");
    eventually(
        "A's flag cleared by the sweep",
        Duration::from_secs(5),
        || async { !a.state.engine.is_sold_out_locally(id) },
    )
    .await;
    // And notes flow again on the new subscription: a sale on another instance sets A's flag at once.
    let b = a.another_instance().await;
    let buyer = b.member(Role::Customer).await;
    assert_eq!(
        reserve(&b, &buyer, &drop, 1).await.status,
        StatusCode::CREATED
    );
    eventually(
        "A's flag set by the note",
        Duration::from_secs(1),
        || async { a.state.engine.is_sold_out_locally(id) },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_redis_cluster_notes_reach_every_instance_from_every_node() {
    let urls: Vec<String> = std::env::var("REDIS_CLUSTER_URLS")
        .expect("REDIS_CLUSTER_URLS (scripts/test.sh starts a cluster with scripts/services.sh cluster)")
        .split(',')
        .map(str::to_owned)
        .collect();
    let db = Arc::new(common::TestDb::new().await);
    let prefix = common::redis_prefix();
    let a = TestApp::redis_instance(Arc::clone(&db), EngineArgs::default(), &urls, &prefix).await;
    let b = TestApp::redis_instance(db, EngineArgs::default(), &urls, &prefix).await;
    // Drops land in slots on different masters; each instance subscribes on one node and hears them all: a hold is
    // journaled within a second (nothing polls; the backstop would take 30 s), and B's sold-out flag follows A.
    for _ in 0..4 {
        let (_, drop) = a.open_drop(5, 100, json!({})).await;
        assert_eq!(drop_state(&b, &drop).await["available"], 5);
        let buyer = a.member(Role::Customer).await;
        let held = reserve(&a, &buyer, &drop, 1).await;
        assert_eq!(held.status, StatusCode::CREATED);
        let placed = Instant::now();
        eventually("the hold journaled", Duration::from_secs(5), || async {
            stored_statuses(&a, drop_id(&drop)).await == vec![("held".to_owned(), 1)]
        })
        .await;
        assert!(
            placed.elapsed() < Duration::from_secs(1),
            "journaled after {:?}",
            placed.elapsed()
        );
    }
    a_release_on_a_clears_b_s_flag_within_100_ms(&a, &b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_larger_than_one_entry_spreads_its_holds_over_entries_and_each_is_paid_by_its_id() {
    // A Redis of the test's own, paused while the reservations queue, so one script call carries most of them.
    let server = common::RedisServer::start().await;
    let db = Arc::new(common::TestDb::new().await);
    let prefix = common::redis_prefix();
    let a = TestApp::redis_instance(db, fast_reaper(), &[server.url()], &prefix).await;
    const HOLDS: usize = 100;
    let (_, drop) = a
        .open_drop(HOLDS as u32, 500, json!({ "per_member_limit": 1 }))
        .await;
    let id = drop_id(&drop);
    let buyers = futures_util::future::join_all((0..HOLDS).map(|_| a.member(Role::Customer))).await;
    // Loads the drop, so the paused calls below are reservations.
    assert_eq!(drop_state(&a, &drop).await["available"], HOLDS as u64);
    server.pause(300).await;
    let holds =
        futures_util::future::join_all(buyers.iter().map(|b| reserve(&a, b, &drop, 1))).await;
    let holds: Vec<String> = holds
        .iter()
        .map(|hold| {
            assert_eq!(hold.status, StatusCode::CREATED, "{:?}", hold.body);
            hold.body["id"].as_str().unwrap().to_owned()
        })
        .collect();
    // The stream: every reserve entry holds at most 32 records, and a call that granted more wrote full entries.
    let mut admin = server.connection().await.unwrap();
    let keys = engine::gate::redis::drop_keys(&prefix, id);
    let entries: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
        .arg(&keys[3])
        .arg("-")
        .arg("+")
        .query_async(&mut admin)
        .await
        .unwrap();
    let records: Vec<usize> = entries
        .iter()
        .filter_map(|(_, fields)| fields.first().filter(|(f, _)| f == "r"))
        .map(|(_, rec)| rec.len() / 36)
        .collect();
    assert_eq!(records.iter().sum::<usize>(), HOLDS, "{records:?}");
    assert!(records.iter().all(|&n| n <= 32), "{records:?}");
    assert!(
        records.contains(&32),
        "no call granted a full entry's worth: {records:?}"
    );
    // Every hold is found and paid from its id, whichever entry and index it names.
    for (buyer, hold) in buyers.iter().zip(&holds) {
        let paid = pay(&a, buyer, hold, "tok_ok").await;
        assert_eq!(paid.status, StatusCode::OK, "{:?}", paid.body);
    }
    let state = drop_state(&a, &drop).await;
    assert_eq!(
        (state["sold"].as_u64(), state["held"].as_u64()),
        (Some(HOLDS as u64), Some(0))
    );
}

/// Script calls (EVALSHA, and EVAL after a NOSCRIPT) a Redis server has answered, from INFO.
async fn script_calls(server: &common::RedisServer) -> u64 {
    let calls = server.command_calls().await;
    ["evalsha", "eval"]
        .iter()
        .map(|name| calls.get(*name).copied().unwrap_or(0))
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transitions_queued_together_go_in_a_few_script_calls_and_each_is_answered_as_if_alone() {
    // A Redis of the test's own, paused while the transitions queue, so each script call carries many of them.
    let server = common::RedisServer::start().await;
    let db = Arc::new(common::TestDb::new().await);
    let prefix = common::redis_prefix();
    let a = TestApp::redis_instance(db, EngineArgs::default(), &[server.url()], &prefix).await;
    const HOLDS: usize = 40;
    let (_, drop) = a
        .open_drop(HOLDS as u32, 500, json!({ "per_member_limit": 1 }))
        .await;
    let buyers = futures_util::future::join_all((0..HOLDS).map(|_| a.member(Role::Customer))).await;
    let mut holds = Vec::new();
    for buyer in &buyers {
        let hold = reserve(&a, buyer, &drop, 1).await;
        assert_eq!(hold.status, StatusCode::CREATED, "{:?}", hold.body);
        holds.push(hold.body["id"].as_str().unwrap().to_owned());
    }
    // Holds 0..30 are paid by their owners (a begin and a complete each); 25..35 are paid by the next buyer too,
    // who does not own them (refused: 30..35 stay held); 35..40 are cancelled by their owners. The answers differ by
    // hold, so an answer given to the wrong move shows.
    let calls_before = script_calls(&server).await;
    server.pause(300).await;
    let owners = (0..30).map(|i| pay(&a, &buyers[i], &holds[i], "tok_ok"));
    let strangers = (25..35).map(|i| pay(&a, &buyers[(i + 1) % HOLDS], &holds[i], "tok_ok"));
    let cancels = (35..HOLDS).map(|i| cancel(&a, &buyers[i], &holds[i]));
    let (owners, strangers, cancels) = tokio::join!(
        futures_util::future::join_all(owners),
        futures_util::future::join_all(strangers),
        futures_util::future::join_all(cancels),
    );
    let calls = script_calls(&server).await - calls_before;
    for (i, paid) in owners.iter().enumerate() {
        assert_eq!(paid.status, StatusCode::OK, "hold {i}: {:?}", paid.body);
        assert_eq!(paid.body["reservation_id"], holds[i].as_str(), "hold {i}");
    }
    for (i, refused) in (25..35).zip(&strangers) {
        assert_eq!(
            refused.status,
            StatusCode::FORBIDDEN,
            "hold {i}: {:?}",
            refused.body
        );
    }
    for (i, cancelled) in (35..HOLDS).zip(&cancels) {
        assert_eq!(
            cancelled.status,
            StatusCode::NO_CONTENT,
            "hold {i}: {:?}",
            cancelled.body
        );
    }
    for (i, hold) in holds.iter().enumerate() {
        let read = read_reservation(&a, &buyers[i], hold).await;
        let expected = match i {
            0..30 => "paid",
            30..35 => "held",
            _ => "released",
        };
        assert_eq!(read.body["status"], expected, "hold {i}: {:?}", read.body);
    }
    let state = drop_state(&a, &drop).await;
    assert_eq!(
        (
            state["sold"].as_u64(),
            state["held"].as_u64(),
            state["available"].as_u64()
        ),
        (Some(30), Some(5), Some(5))
    );
    // 75 moves (30 begins, 30 completes, 10 refused begins, 5 cancels) went in a handful of calls (two in flight at a
    // time per drop; the reaper may add one); one call a move would be 75.
    assert!(calls <= 15, "{calls} script calls for 75 transitions");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_every_note_lost_the_instance_that_made_a_hold_still_releases_it_at_expiry() {
    // An instance that hears no note at all (every one lost, its subscription never cut, so no resubscribe sweep):
    // what it schedules itself must release its holds on time (hold expiry plus the reaper's interval), not the
    // backstop sweep, whose period here is ten minutes.
    let a = TestApp::redis_instance_with_config(
        Arc::new(TestDb::new().await),
        fast_reaper(),
        every_note_lost(),
        Arc::new(SystemClock),
    )
    .await;
    let (_, drop) = a.open_drop(2, 100, json!({ "hold_seconds": 1 })).await;
    // The drop is loaded and its first reaper pass has found nothing to schedule.
    assert_eq!(drop_state(&a, &drop).await["available"], 2);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let holder = a.member(Role::Customer).await;
    let held = reserve(&a, &holder, &drop, 1).await;
    assert_eq!(held.status, StatusCode::CREATED);
    let reserved_at = Instant::now();
    eventually("the hold released", Duration::from_secs(3), || async {
        drop_state(&a, &drop).await["held"] == 0
    })
    .await;
    let elapsed = reserved_at.elapsed();
    assert!(
        elapsed >= Duration::from_millis(900) && elapsed < Duration::from_millis(1800),
        "released after {elapsed:?}, for a 1 s hold and a 100 ms reaper"
    );
    assert_eq!(drop_state(&a, &drop).await["available"], 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_every_note_lost_a_payment_past_its_lease_is_still_fenced_by_its_own_instance() {
    // No note heard, a 1 s lease and a gateway that takes 2.5 s: the lease end this instance scheduled itself when
    // the payment began must fence it (guarantee 5a), so the late charge is refused and the unit sells again.
    let mut config = every_note_lost();
    config.pay_lease = Duration::from_secs(1);
    let a = TestApp::redis_instance_with_config(
        Arc::new(TestDb::new().await),
        EngineArgs {
            payment_latency_ms: 2500,
            ..fast_reaper()
        },
        config,
        Arc::new(SystemClock),
    )
    .await;
    let (_, drop) = a.open_drop(1, 100, json!({})).await;
    assert_eq!(drop_state(&a, &drop).await["available"], 1);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let buyer = a.member(Role::Customer).await;
    let held = reserve(&a, &buyer, &drop, 1).await;
    assert_eq!(held.status, StatusCode::CREATED);
    let hold = held.body["id"].as_str().unwrap().to_owned();
    let began = Instant::now();
    let (paid, returned_at) = tokio::join!(pay(&a, &buyer, &hold, "tok_ok"), async {
        eventually("the unit back on sale", Duration::from_secs(5), || async {
            drop_state(&a, &drop).await["available"] == 1
        })
        .await;
        began.elapsed()
    });
    assert!(
        returned_at < Duration::from_millis(2000),
        "the unit came back {returned_at:?} after the payment began, for a 1 s lease"
    );
    assert_eq!(
        (paid.status, paid.code()),
        (StatusCode::CONFLICT, "hold_expired")
    );
    let state = drop_state(&a, &drop).await;
    assert_eq!(
        (state["sold"].as_u64(), state["held"].as_u64()),
        (Some(0), Some(0))
    );
    assert_eq!(purchase_tally(&a.db, drop_id(&drop)).await.0, 0);
}
