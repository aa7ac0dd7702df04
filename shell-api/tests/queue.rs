//! Queue drops (API.md, "Launch modes", Queue; DESIGN.md guarantee 11), in process over a real Postgres with a
//! manual clock, on the embedded gate and on three instances sharing Redis (and a Redis Cluster): the pre-queue
//! shuffled at the opening and first come first served after it, admission following the stock, no reservation
//! without this member's valid pass, an expired pass freeing its place, and "sold out" for everyone waiting as soon
//! as nothing is available or held.
#![allow(
    clippy::too_many_lines,
    reason = "each test is one scenario read top to bottom: its setup, the queue, and every check"
)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use chrono::{DateTime, Utc};
use common::{pay, TestApp, TestDb, TestMember, TestResponse};
use engine::clock::{to_datetime, ManualClock};
use serde_json::{json, Value};
use shell_api::auth::Role;
use shell_api::config::EngineArgs;
use uuid::Uuid;

/// The clock's start: whole milliseconds, so `set_ms(opens_at)` is exactly `opens_at`.
fn start() -> (Arc<ManualClock>, DateTime<Utc>) {
    let now = to_datetime(Utc::now().timestamp_millis());
    (Arc::new(ManualClock::new(now.timestamp_millis())), now)
}

/// `count` customers inserted in one statement, with tokens signed by the test secret.
async fn members(db: &TestDb, count: usize) -> Vec<TestMember> {
    let ids: Vec<Uuid> = (0..count).map(|_| Uuid::now_v7()).collect();
    let emails: Vec<String> = ids
        .iter()
        .map(|id| format!("{}@queue.test", id.simple()))
        .collect();
    db.client()
        .await
        .execute(
            "INSERT INTO members (id, email, password_hash, name, role)
             SELECT id, email, 'not-a-hash', 'Queue Member', 'customer' FROM UNNEST($1::uuid[], $2::text[]) AS t (id, email)",
            &[&ids, &emails],
        )
        .await
        .unwrap();
    let keys = shell_api::auth::TokenKeys::new(common::JWT_SECRET.as_bytes(), 3600);
    ids.into_iter()
        .zip(emails)
        .map(|(id, email)| TestMember {
            id,
            token: keys.issue(id, Role::Customer, 0).unwrap(),
            email,
        })
        .collect()
}

/// A queue drop of `stock` opening `opens_in_s` after `now`, with `extra` fields.
async fn queue_drop(
    app: &TestApp,
    now: DateTime<Utc>,
    stock: u32,
    opens_in_s: i64,
    extra: Value,
) -> Value {
    let seller = app.member(Role::Seller).await;
    let product = app.product(&seller, 1_000).await;
    let mut body = json!({
        "product_id": product, "stock": stock, "mode": "queue",
        "opens_at": (now + chrono::Duration::seconds(opens_in_s)).to_rfc3339(),
        "queue_opens_at": (now - chrono::Duration::seconds(1)).to_rfc3339(),
        "hold_seconds": 60,
    });
    for (key, value) in extra.as_object().unwrap() {
        body[key] = value.clone();
    }
    app.drop(&seller, body).await
}

fn path(drop: &Value, rest: &str) -> String {
    format!("/api/v1/drops/{}{rest}", drop["id"].as_str().unwrap())
}

async fn join(app: &TestApp, member: &TestMember, drop: &Value) -> TestResponse {
    app.call("POST", &path(drop, "/queue"), Some(&member.token), None)
        .await
}

async fn me(app: &TestApp, member: &TestMember, drop: &Value) -> TestResponse {
    app.call("GET", &path(drop, "/queue/me"), Some(&member.token), None)
        .await
}

async fn reserve_with(
    app: &TestApp,
    member: &TestMember,
    drop: &Value,
    pass: Option<&str>,
) -> TestResponse {
    let headers: Vec<(&str, &str)> = pass
        .map(|pass| ("admission-pass", pass))
        .into_iter()
        .collect();
    app.call_with(
        "POST",
        &path(drop, "/reservations"),
        &member.token,
        &headers,
        Some(json!({ "quantity": 1 })),
    )
    .await
}

/// Engine settings whose admission loop waits an hour: the test takes each admission step itself (`admit`), so it
/// can read every position before anyone is admitted.
fn stepped() -> EngineArgs {
    EngineArgs {
        queue_tick_ms: 3_600_000,
        ..EngineArgs::default()
    }
}

/// One admission step on `app`.
async fn admit(app: &TestApp) -> u64 {
    app.state.engine.admit_queues().await.unwrap()
}

/// Spearman's rank correlation of two orderings of the same n items (positions 1..=n).
fn spearman(a: &[u64], b: &[u64]) -> f64 {
    let n = a.len() as f64;
    let d2: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| {
            let d = *x as f64 - *y as f64;
            d * d
        })
        .sum();
    1.0 - 6.0 * d2 / (n * (n * n - 1.0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_drop_shuffles_its_pre_queue_admits_by_the_stock_and_checks_every_pass() {
    let (clock, now) = start();
    let app = TestApp::with_clock(stepped(), clock.clone()).await;
    let drop = queue_drop(&app, now, 3, 60, json!({ "pass_seconds": 30 })).await;
    assert_eq!(drop["mode"], "queue");
    assert_eq!(drop["queue"], json!({ "waiting": 0, "admitted": 0 }));
    assert_eq!(drop["pass_seconds"], 30);
    let crowd = members(&app.db, 40).await;

    // The pre-queue: no position before the opening; joining again is the same place (200).
    for member in &crowd {
        let joined = join(&app, member, &drop).await;
        assert_eq!(joined.status, StatusCode::CREATED, "{:?}", joined.body);
        assert_eq!(joined.body["status"], "waiting");
        assert_eq!(joined.body["position"], Value::Null);
        assert_eq!(joined.body["pass"], Value::Null);
    }
    let again = join(&app, &crowd[0], &drop).await;
    assert_eq!(again.status, StatusCode::OK);
    // Nobody reserves before the opening, pass or not.
    let early = reserve_with(&app, &crowd[0], &drop, None).await;
    assert_eq!(early.status, StatusCode::FORBIDDEN, "{:?}", early.body);
    assert_eq!(early.code(), "not_admitted");

    // The opening: the pre-queue is placed in a shuffled order; a later member goes behind it.
    clock.set_ms(now.timestamp_millis() + 60_000);
    let late = members(&app.db, 1).await.remove(0);
    let late_joined = join(&app, &late, &drop).await;
    assert_eq!(late_joined.body["position"], 41, "{:?}", late_joined.body);
    let mut positions = Vec::new();
    for member in &crowd {
        let place = me(&app, member, &drop).await;
        assert_eq!(place.body["status"], "waiting");
        let position = place.body["position"].as_u64().unwrap();
        assert_eq!(place.body["ahead"].as_u64().unwrap(), position - 1);
        positions.push(position);
    }
    let mut sorted = positions.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, (1..=40).collect::<Vec<u64>>());
    let join_order: Vec<u64> = (1..=40).collect();
    assert_ne!(positions, join_order, "the pre-queue kept its join order");

    // Admission follows the stock: three units, three passes, whatever the ticks.
    let head = |k: u64| {
        let at = positions.iter().position(|p| *p == k).unwrap();
        &crowd[at]
    };
    admit(&app).await;
    admit(&app).await;
    let body = app.call("GET", &path(&drop, ""), None, None).await.body;
    assert_eq!(
        body["queue"],
        json!({ "waiting": 38, "admitted": 3 }),
        "{body}"
    );
    let first = me(&app, head(1), &drop).await.body;
    assert_eq!(first["status"], "admitted");
    let pass = first["pass"].as_str().unwrap().to_owned();
    assert!(first["pass_expires_at"].is_string());
    assert_eq!(me(&app, head(4), &drop).await.body["position"], 1);

    // No pass, another member's pass, a forged pass: refused. Its own pass: a hold.
    let none = reserve_with(&app, head(4), &drop, None).await;
    assert_eq!(
        (none.status, none.code()),
        (StatusCode::FORBIDDEN, "not_admitted")
    );
    let borrowed = reserve_with(&app, head(4), &drop, Some(&pass)).await;
    assert_eq!(
        (borrowed.status, borrowed.code()),
        (StatusCode::FORBIDDEN, "not_admitted")
    );
    // The mac's last digit changed (to another digit: replacing it with "0" would be no change one time in 16).
    let last = if pass.ends_with('0') { '1' } else { '0' };
    let forged = format!("{}{last}", &pass[..pass.len() - 1]);
    let forged = reserve_with(&app, head(1), &drop, Some(&forged)).await;
    assert_eq!(forged.code(), "not_admitted");
    let held = reserve_with(&app, head(1), &drop, Some(&pass)).await;
    assert_eq!(held.status, StatusCode::CREATED, "{:?}", held.body);

    // The second and third let their passes expire: 403 pass_expired, and their places go to the next members.
    let second_pass = me(&app, head(2), &drop).await.body["pass"]
        .as_str()
        .unwrap()
        .to_owned();
    clock.advance_ms(30_001);
    let expired = reserve_with(&app, head(2), &drop, Some(&second_pass)).await;
    assert_eq!(
        (expired.status, expired.code()),
        (StatusCode::FORBIDDEN, "pass_expired")
    );
    admit(&app).await;
    assert_eq!(me(&app, head(2), &drop).await.body["status"], "expired");
    assert_eq!(me(&app, head(3), &drop).await.body["status"], "expired");
    assert_eq!(
        me(&app, head(1), &drop).await.body["status"],
        "admitted",
        "a used pass stays admitted"
    );
    for k in [4, 5] {
        assert_eq!(me(&app, head(k), &drop).await.body["status"], "admitted");
    }
    assert_eq!(me(&app, head(6), &drop).await.body["position"], 1);
    // Joining again after an expired pass: a new place at the back (41 waited, 5 admitted, so 37th).
    let rejoined = join(&app, head(2), &drop).await;
    assert_eq!(rejoined.status, StatusCode::CREATED);
    assert_eq!(rejoined.body["position"], 37, "{:?}", rejoined.body);

    // Sell the rest: the first pays, the two admitted next reserve and pay; then, with nothing available or held,
    // everyone waiting is told "sold out" and nobody may join.
    let hold = held.body["id"].as_str().unwrap().to_owned();
    assert_eq!(
        pay(&app, head(1), &hold, "tok_ok").await.status,
        StatusCode::OK
    );
    for k in [4, 5] {
        let pass = me(&app, head(k), &drop).await.body["pass"]
            .as_str()
            .unwrap()
            .to_owned();
        let held = reserve_with(&app, head(k), &drop, Some(&pass)).await;
        assert_eq!(held.status, StatusCode::CREATED, "{:?}", held.body);
        let hold = held.body["id"].as_str().unwrap().to_owned();
        assert_eq!(
            pay(&app, head(k), &hold, "tok_ok").await.status,
            StatusCode::OK
        );
    }
    let waiting = me(&app, head(6), &drop).await.body;
    assert_eq!(waiting["status"], "sold_out", "{waiting}");
    assert_eq!(waiting["position"], Value::Null);
    let refused = join(&app, &members(&app.db, 1).await[0], &drop).await;
    assert_eq!(
        (refused.status, refused.code()),
        (StatusCode::CONFLICT, "sold_out")
    );
}

#[tokio::test]
async fn a_queue_refuses_joins_outside_its_window_and_other_modes_refuse_the_queue() {
    let (clock, now) = start();
    let app = TestApp::with_clock(EngineArgs::default(), clock.clone()).await;
    let seller = app.member(Role::Seller).await;
    let product = app.product(&seller, 1_000).await;
    let opens = now + chrono::Duration::seconds(600);
    let drop = app
        .drop(
            &seller,
            json!({ "product_id": product, "stock": 5, "mode": "queue", "opens_at": opens.to_rfc3339(),
                    "closes_at": (opens + chrono::Duration::seconds(60)).to_rfc3339() }),
        )
        .await;
    // The default queue opens 30 minutes before opens_at: 10 minutes before, it is open.
    assert_eq!(
        drop["queue_opens_at"]
            .as_str()
            .unwrap()
            .parse::<DateTime<Utc>>()
            .unwrap(),
        opens - chrono::Duration::minutes(30)
    );
    let member = members(&app.db, 1).await.remove(0);
    assert_eq!(me(&app, &member, &drop).await.code(), "not_in_queue");
    assert_eq!(join(&app, &member, &drop).await.status, StatusCode::CREATED);
    clock.set_ms(opens.timestamp_millis() + 60_000);
    let closed = join(&app, &members(&app.db, 1).await[0], &drop).await;
    assert_eq!(
        (closed.status, closed.code()),
        (StatusCode::CONFLICT, "closed")
    );
    assert_eq!(me(&app, &member, &drop).await.body["status"], "closed");

    let later = app
        .drop(
            &seller,
            json!({ "product_id": product, "stock": 5, "mode": "queue",
                    "opens_at": (now + chrono::Duration::hours(2)).to_rfc3339() }),
        )
        .await;
    clock.set_ms(now.timestamp_millis());
    let early = join(&app, &member, &later).await;
    assert_eq!(
        (early.status, early.code()),
        (StatusCode::CONFLICT, "not_open")
    );

    let (_, race) = app.open_drop(5, 1_000, json!({})).await;
    let not_a_queue = join(&app, &member, &race).await;
    assert_eq!(
        (not_a_queue.status, not_a_queue.code()),
        (StatusCode::CONFLICT, "not_a_queue")
    );

    for (body, field) in [
        (
            json!({ "queue_opens_at": (opens + chrono::Duration::seconds(1)).to_rfc3339() }),
            "queue_opens_at",
        ),
        (json!({ "pass_seconds": 0 }), "pass_seconds"),
        (json!({ "admit_per_second": 0 }), "admit_per_second"),
        (
            json!({ "mode": "first_come", "pass_seconds": 10 }),
            "pass_seconds",
        ),
    ] {
        let mut create = json!({ "product_id": product, "stock": 5, "mode": "queue", "opens_at": opens.to_rfc3339() });
        for (key, value) in body.as_object().unwrap() {
            create[key] = value.clone();
        }
        let refused = app
            .call("POST", "/api/v1/drops", Some(&seller.token), Some(create))
            .await;
        assert_eq!(
            refused.status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{field}: {:?}",
            refused.body
        );
        assert!(
            refused.body["error"]["fields"][field].is_string(),
            "{field}: {:?}",
            refused.body
        );
    }
}

/// Three instances over one Redis (or cluster) with one clock; `count` members join spread over them.
async fn queue_across_instances(urls: Vec<String>, count: usize) {
    let (clock, now) = start();
    let db = Arc::new(TestDb::new().await);
    let prefix = common::redis_prefix();
    let mut apps = Vec::new();
    for _ in 0..3 {
        apps.push(
            TestApp::redis_instance_with_clock(
                Arc::clone(&db),
                stepped(),
                &urls,
                &prefix,
                clock.clone(),
            )
            .await,
        );
    }
    let stock = 50;
    let drop = queue_drop(&apps[0], now, stock, 60, json!({})).await;
    let crowd = Arc::new(members(&db, count).await);
    let apps = Arc::new(apps);

    // Everyone joins before the opening, concurrently, each on one of the three instances.
    let mut joins = tokio::task::JoinSet::new();
    for lane in 0..8 {
        let (apps, crowd, drop) = (Arc::clone(&apps), Arc::clone(&crowd), drop.clone());
        joins.spawn(async move {
            for i in (lane..crowd.len()).step_by(8) {
                let joined = join(&apps[i % 3], &crowd[i], &drop).await;
                assert_eq!(joined.status, StatusCode::CREATED, "{:?}", joined.body);
            }
        });
    }
    while let Some(done) = joins.join_next().await {
        done.unwrap();
    }
    clock.set_ms(now.timestamp_millis() + 60_000);
    // Late joiners after the opening, in order, on rotating instances: first come first served behind the rest.
    let late = members(&db, 6).await;
    for (i, member) in late.iter().enumerate() {
        let joined = join(&apps[i % 3], member, &drop).await;
        assert_eq!(
            joined.body["position"],
            count as u64 + 1 + i as u64,
            "{:?}",
            joined.body
        );
    }
    // Positions are a permutation of 1..=count, read on any instance, and uncorrelated with the join order.
    let mut positions = Vec::with_capacity(count);
    for (i, member) in crowd.iter().enumerate() {
        let place = me(&apps[(i + 1) % 3], member, &drop).await;
        positions.push(place.body["position"].as_u64().unwrap());
    }
    let mut sorted = positions.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, (1..=count as u64).collect::<Vec<u64>>());
    let join_order: Vec<u64> = (1..=count as u64).collect();
    let rho = spearman(&join_order, &positions);
    println!(
        "pre-queue: Spearman rank correlation of join order and position over {count}: {rho:.4}"
    );
    // Under a uniform shuffle rho has a standard deviation of 1/sqrt(n-1): five of them is a bound a fair shuffle
    // passes but for about one run in a million (0.07 at 5,000 members, 0.2 at 600), and a kept join order (rho 1)
    // or a partial one fails.
    let bound = 5.0 / ((count - 1) as f64).sqrt();
    assert!(
        rho.abs() < bound,
        "pre-queue order correlates with join order: {rho} (bound {bound:.3})"
    );

    // Every instance ticks; admission still follows the stock: exactly `stock` passes, to the first `stock`.
    for app in apps.iter() {
        admit(app).await;
    }
    let body = apps[2].call("GET", &path(&drop, ""), None, None).await.body;
    assert_eq!(body["queue"]["admitted"], u64::from(stock), "{body}");
    let by_position = |k: u64| &crowd[positions.iter().position(|p| *p == k).unwrap()];
    let mut passes = HashSet::new();
    for k in 1..=u64::from(stock) {
        let place = me(&apps[(k % 3) as usize], by_position(k), &drop)
            .await
            .body;
        assert_eq!(place["status"], "admitted", "position {k}: {place}");
        passes.insert(place["pass"].as_str().unwrap().to_owned());
    }
    assert_eq!(passes.len(), stock as usize, "a pass is one member's");
    assert_eq!(
        me(&apps[0], by_position(u64::from(stock) + 1), &drop)
            .await
            .body["position"],
        1
    );

    // Each admitted member reserves on another instance than the one that admitted them, and pays; a pass lent to
    // the next member is refused.
    let lent = me(&apps[0], by_position(1), &drop).await.body["pass"]
        .as_str()
        .unwrap()
        .to_owned();
    let borrowed = reserve_with(
        &apps[1],
        by_position(u64::from(stock) + 1),
        &drop,
        Some(&lent),
    )
    .await;
    assert_eq!(borrowed.code(), "not_admitted");
    for k in 1..=u64::from(stock) {
        let member = by_position(k);
        let app = &apps[((k + 1) % 3) as usize];
        let pass = me(app, member, &drop).await.body["pass"]
            .as_str()
            .unwrap()
            .to_owned();
        let held = reserve_with(app, member, &drop, Some(&pass)).await;
        assert_eq!(held.status, StatusCode::CREATED, "{:?}", held.body);
        let hold = held.body["id"].as_str().unwrap().to_owned();
        assert_eq!(
            pay(app, member, &hold, "tok_ok").await.status,
            StatusCode::OK
        );
    }
    // Sold out with nothing held: every waiting member, asked on any instance, is told so at once (a tick is not
    // needed: it is read from the counts).
    let told = std::time::Instant::now();
    for (i, member) in crowd.iter().enumerate().step_by(97) {
        let place = me(&apps[i % 3], member, &drop).await.body;
        assert!(
            place["status"] == "sold_out" || place["status"] == "admitted",
            "{place}"
        );
    }
    assert!(told.elapsed() < std::time::Duration::from_secs(1));
    let paid: i64 = db
        .client()
        .await
        .query_one(
            "SELECT count(*) FROM purchases WHERE drop_id = $1",
            &[&drop["id"].as_str().unwrap().parse::<Uuid>().unwrap()],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(paid, i64::from(stock));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_thousand_members_queue_across_three_instances_on_redis() {
    queue_across_instances(vec![common::redis_url()], 5_000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_across_three_instances_works_on_a_redis_cluster() {
    let urls: Vec<String> = std::env::var("REDIS_CLUSTER_URLS")
        .expect("REDIS_CLUSTER_URLS (scripts/test.sh starts a cluster)")
        .split(',')
        .map(str::to_owned)
        .collect();
    queue_across_instances(urls, 600).await;
}

/// One instance on a Redis server of its own (so the test can count its calls), with a queue drop of `stock` that
/// opens a minute after the clock's start.
struct PrivateRedisQueue {
    server: common::RedisServer,
    app: TestApp,
    drop: Value,
    db: Arc<TestDb>,
    clock: Arc<ManualClock>,
    now: DateTime<Utc>,
}

impl PrivateRedisQueue {
    async fn start(stock: u32) -> Self {
        let server = common::RedisServer::start().await;
        let (clock, now) = start();
        let db = Arc::new(TestDb::new().await);
        let app = TestApp::redis_instance_with_clock(
            Arc::clone(&db),
            stepped(),
            &[server.url()],
            &common::redis_prefix(),
            clock.clone(),
        )
        .await;
        let drop = queue_drop(&app, now, stock, 60, json!({})).await;
        Self {
            server,
            app,
            drop,
            db,
            clock,
            now,
        }
    }

    /// Moves the clock past the opening.
    fn open(&self) {
        self.clock.set_ms(self.now.timestamp_millis() + 60_000);
    }

    /// The Redis server's calls of `name` since `before`.
    async fn calls_since(&self, before: &HashMap<String, u64>, name: &str) -> u64 {
        let after = self.server.command_calls().await;
        after.get(name).copied().unwrap_or(0) - before.get(name).copied().unwrap_or(0)
    }
}

/// A queue drop of `stock` on a Redis of its own and `count` members who joined before its opening, now past: all
/// waiting in line.
async fn waiting_on_private_redis(
    stock: u32,
    count: usize,
) -> (common::RedisServer, TestApp, Value, Vec<TestMember>) {
    let queue = PrivateRedisQueue::start(stock).await;
    let crowd = members(&queue.db, count).await;
    for member in &crowd {
        assert_eq!(
            join(&queue.app, member, &queue.drop).await.status,
            StatusCode::CREATED
        );
    }
    queue.open();
    (queue.server, queue.app, queue.drop, crowd)
}

/// A join on the Redis gate is one script call: the sold-out check reads the drop's counters in the same step of
/// `room.lua` as the join and the admission rate (they were an HMGET and a script call), and a member of a sold-out
/// drop takes no place.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_on_redis_is_one_script_call_and_takes_no_place_once_sold_out() {
    const JOINS: usize = 30;
    let queue = PrivateRedisQueue::start(1).await;
    queue.open();
    let (app, drop) = (&queue.app, &queue.drop);
    let crowd = members(&queue.db, JOINS + 1).await;
    let ((), sent) = queue
        .server
        .client_commands_during(async {
            for (i, member) in crowd[..JOINS].iter().enumerate() {
                let joined = join(app, member, drop).await;
                assert_eq!(joined.status, StatusCode::CREATED, "{:?}", joined.body);
                assert_eq!(joined.body["position"], i as u64 + 1, "{:?}", joined.body);
            }
        })
        .await;
    let sent = |name: &str| sent.get(name).copied().unwrap_or(0);
    // The instance's own background work (a sweep, a reaper pass) may add a script call or two meanwhile.
    assert!(
        (JOINS as u64..=JOINS as u64 + 2).contains(&sent("evalsha")),
        "{JOINS} joins made {} script calls",
        sent("evalsha")
    );
    assert_eq!(sent("hmget"), 0, "the counters read apart from the join");
    // Joining again keeps the place.
    let again = join(app, &crowd[1], drop).await;
    assert_eq!(again.status, StatusCode::OK, "{:?}", again.body);
    assert_eq!(again.body["position"], 2);

    // The one unit sold: a new member's join is refused and leaves no place; the waiting are told sold out.
    assert_eq!(admit(app).await, 1);
    let first = &crowd[0];
    let pass = me(app, first, drop).await.body["pass"]
        .as_str()
        .expect("the head of the line admitted")
        .to_owned();
    let held = reserve_with(app, first, drop, Some(&pass)).await;
    assert_eq!(held.status, StatusCode::CREATED, "{:?}", held.body);
    let hold = held.body["id"].as_str().unwrap().to_owned();
    assert_eq!(
        pay(app, first, &hold, "tok_ok").await.status,
        StatusCode::OK
    );
    let late = &crowd[JOINS];
    let refused = join(app, late, drop).await;
    assert_eq!(
        (refused.status, refused.body["error"]["code"].as_str()),
        (StatusCode::CONFLICT, Some("sold_out")),
        "{:?}",
        refused.body
    );
    assert_eq!(me(app, late, drop).await.status, StatusCode::NOT_FOUND);
    assert_eq!(me(app, &crowd[1], drop).await.body["status"], "sold_out");
}

/// Joins that share a script call each keep their own time: one made before the opening takes a pre-queue place
/// (shuffled at the opening) even when the call that carries it is made after the opening, beside joins made after
/// it, which queue behind the whole pre-queue in the order they came.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joins_sharing_a_call_across_the_opening_each_keep_their_own_time() {
    const EARLY: usize = 21;
    const LATE: usize = 20;
    let queue = PrivateRedisQueue::start(5).await;
    let (app, drop) = (&queue.app, &queue.drop);
    let crowd = members(&queue.db, EARLY + LATE).await;
    let (early, late) = crowd.split_at(EARLY);
    // Redis paused: the first early join's call waits, and every other join queues behind it for the next call,
    // the early ones before the opening, the late ones after it.
    queue.server.pause(500).await;
    let (early_joins, late_joins) = tokio::join!(
        futures_util::future::join_all(early.iter().map(|member| join(app, member, drop))),
        async {
            tokio::time::sleep(Duration::from_millis(150)).await;
            queue.open();
            let mut joins = Vec::with_capacity(LATE);
            for member in late {
                joins.push(join(app, member, drop).await);
            }
            joins
        }
    );
    for joined in &early_joins {
        assert_eq!(joined.status, StatusCode::CREATED, "{:?}", joined.body);
        assert_eq!(
            joined.body["position"],
            Value::Null,
            "in the pre-queue: {:?}",
            joined.body
        );
    }
    for (i, joined) in late_joins.iter().enumerate() {
        assert_eq!(joined.status, StatusCode::CREATED, "{:?}", joined.body);
        assert_eq!(
            joined.body["position"],
            (EARLY + 1 + i) as u64,
            "{:?}",
            joined.body
        );
    }
    let mut positions = Vec::with_capacity(EARLY);
    for member in early {
        positions.push(
            me(app, member, drop).await.body["position"]
                .as_u64()
                .unwrap(),
        );
    }
    positions.sort_unstable();
    assert_eq!(positions, (1..=EARLY as u64).collect::<Vec<_>>());
}

/// Concurrent joins of one drop on the Redis gate share script calls (the joins that queue while one call is in
/// flight go together in the next), and each member takes a place of their own, as one after the other would.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_joins_on_redis_share_script_calls_and_each_takes_a_place_of_its_own() {
    const MEMBERS: usize = 120;
    let queue = PrivateRedisQueue::start(5).await;
    queue.open();
    let (app, drop) = (&queue.app, &queue.drop);
    let crowd = members(&queue.db, MEMBERS).await;
    let before = queue.server.command_calls().await;
    let joined =
        futures_util::future::join_all(crowd.iter().map(|member| join(app, member, drop))).await;
    let scripts = queue.calls_since(&before, "evalsha").await;
    let mut positions = Vec::with_capacity(MEMBERS);
    for (member, joined) in crowd.iter().zip(&joined) {
        assert_eq!(joined.status, StatusCode::CREATED, "{:?}", joined.body);
        let position = joined.body["position"].as_u64().unwrap();
        // The place answered is the one the member keeps.
        assert_eq!(me(app, member, drop).await.body["position"], position);
        positions.push(position);
    }
    positions.sort_unstable();
    assert_eq!(
        positions,
        (1..=MEMBERS as u64).collect::<Vec<_>>(),
        "every member has a place of their own"
    );
    println!("{MEMBERS} concurrent joins: {scripts} script calls");
    assert!(
        scripts <= MEMBERS as u64 / 2,
        "{MEMBERS} concurrent joins made {scripts} script calls"
    );
    // Joining again at once: the same places, none new.
    let again =
        futures_util::future::join_all(crowd.iter().map(|member| join(app, member, drop))).await;
    for (first, again) in joined.iter().zip(&again) {
        assert_eq!(again.status, StatusCode::OK, "{:?}", again.body);
        assert_eq!(again.body["position"], first.body["position"]);
    }
}

/// A status poll on the Redis gate is one script call: the member's place, the room's admission rate and the drop's
/// counts come from one step of `room.lua` (they were three round trips: two scripts and an HMGET), and its answer
/// is the one they gave, sold out included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_status_poll_on_redis_is_one_script_call() {
    const POLLS: u64 = 40;
    let (server, app, drop, crowd) = waiting_on_private_redis(1, 3).await;
    let before = server.command_calls().await;
    for i in 0..POLLS {
        let place = me(&app, &crowd[(i % 3) as usize], &drop).await;
        assert_eq!(place.body["status"], "waiting", "{:?}", place.body);
    }
    let after = server.command_calls().await;
    let calls =
        |name: &str| after.get(name).copied().unwrap_or(0) - before.get(name).copied().unwrap_or(0);
    // The instance's own background work (a sweep, a reaper pass) may add a script call or two meanwhile.
    assert!(
        (POLLS..=POLLS + 2).contains(&calls("evalsha")),
        "{POLLS} polls made {} script calls",
        calls("evalsha")
    );
    // One unit: the first admitted member takes it and pays; the others, polling, are told sold out at once.
    assert_eq!(admit(&app).await, 1);
    let mut admitted = None;
    for member in &crowd {
        let place = me(&app, member, &drop).await.body;
        if place["status"] == "admitted" {
            admitted = Some((member, place["pass"].as_str().unwrap().to_owned()));
        }
    }
    let (admitted, pass) = admitted.expect("one member admitted");
    let held = reserve_with(&app, admitted, &drop, Some(&pass)).await;
    assert_eq!(held.status, StatusCode::CREATED, "{:?}", held.body);
    let hold = held.body["id"].as_str().unwrap().to_owned();
    assert_eq!(
        pay(&app, admitted, &hold, "tok_ok").await.status,
        StatusCode::OK
    );
    for member in crowd.iter().filter(|member| member.id != admitted.id) {
        assert_eq!(me(&app, member, &drop).await.body["status"], "sold_out");
    }
}

/// Concurrent status polls of one drop on the Redis gate share script calls (the reads that queue while one call is
/// in flight go together in the next), and each is answered with its own place, as it is when read alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_status_polls_on_redis_share_script_calls_and_each_gets_its_own_place() {
    const MEMBERS: usize = 120;
    let (server, app, drop, crowd) = waiting_on_private_redis(5, MEMBERS).await;
    let mut alone = Vec::with_capacity(MEMBERS);
    for member in &crowd {
        alone.push(me(&app, member, &drop).await.body);
    }
    let before = server.command_calls().await;
    let together =
        futures_util::future::join_all(crowd.iter().map(|member| me(&app, member, &drop))).await;
    let after = server.command_calls().await;
    for ((member, alone), together) in crowd.iter().zip(&alone).zip(&together) {
        assert_eq!(together.status, StatusCode::OK, "{:?}", together.body);
        assert_eq!(&together.body, alone, "member {}", member.id);
    }
    let positions: HashSet<u64> = together
        .iter()
        .map(|read| read.body["position"].as_u64().unwrap())
        .collect();
    assert_eq!(
        positions.len(),
        MEMBERS,
        "every member has a place of their own"
    );
    let calls = after["evalsha"] - before["evalsha"];
    println!("{MEMBERS} concurrent polls: {calls} script calls");
    // 2 to 22 here, alone, under the whole suite or eight at once; one a poll, 120, without the sharing.
    assert!(
        calls <= MEMBERS as u64 / 2,
        "{MEMBERS} concurrent polls made {calls} script calls"
    );
}
