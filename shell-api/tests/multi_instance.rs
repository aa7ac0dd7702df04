//! Many instances, end to end: real `flashsale serve` processes on their own ports share one Postgres and one Redis
//! (a single server, or the three-master Redis Cluster from `scripts/services.sh cluster`), driven concurrently,
//! with faults: an instance SIGKILLed mid-drop, Redis restarted or stopped, Redis losing its data, Postgres away for
//! ten seconds. Every test ends with conservation checked in Redis (every instance's counts) and in Postgres.
#![allow(
    clippy::too_many_lines,
    reason = "each test is one scenario read top to bottom: its setup, the fault or load, and every check"
)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{
    eventually, purchase_tally, redis_prefix, redis_url, seed_member, seed_product, RedisServer,
    TcpProxy, TestDb, TestMember, TestServer,
};
use reqwest::StatusCode;
use serde_json::{json, Value};
use shell_api::auth::Role;
use uuid::Uuid;

/// Instances over one database and one Redis key prefix.
struct Fleet {
    db: Arc<TestDb>,
    servers: Vec<TestServer>,
    http: reqwest::Client,
    redis_urls: String,
    prefix: String,
}

impl Fleet {
    async fn start(instances: usize, redis_urls: &str, env: &[(&str, &str)]) -> Self {
        let db = Arc::new(TestDb::new().await);
        let prefix = redis_prefix();
        let mut fleet = Self {
            db,
            servers: Vec::new(),
            http: reqwest::Client::builder()
                .pool_max_idle_per_host(256)
                .timeout(Duration::from_secs(30))
                .build()
                .unwrap(),
            redis_urls: redis_urls.to_owned(),
            prefix,
        };
        for _ in 0..instances {
            fleet.add(env, None).await;
        }
        fleet
    }

    /// Starts one more instance; `database_url` overrides the test database's own URL (to go through a proxy).
    async fn add(&mut self, env: &[(&str, &str)], database_url: Option<&str>) {
        let mut all: Vec<(&str, &str)> = vec![
            ("REDIS_URL", &self.redis_urls),
            ("REDIS_KEY_PREFIX", &self.prefix),
        ];
        all.extend_from_slice(env);
        let server = TestServer::start(database_url.unwrap_or(&self.db.url), &all).await;
        self.servers.push(server);
    }

    /// Runs a `flashsale` command (such as `reconcile`) against this fleet's database and key prefix.
    async fn flashsale(&self, redis_url: &str, args: &[&str]) -> std::process::Output {
        tokio::process::Command::new(env!("CARGO_BIN_EXE_flashsale"))
            .args(args)
            .env("DATABASE_URL", &self.db.url)
            .env("REDIS_URL", redis_url)
            .env("REDIS_KEY_PREFIX", &self.prefix)
            .env("RUST_LOG", "warn")
            .output()
            .await
            .unwrap()
    }

    fn url(&self, instance: usize, path: &str) -> String {
        self.servers[instance % self.servers.len()].url(path)
    }

    async fn post(
        &self,
        instance: usize,
        path: &str,
        member: &TestMember,
        key: Option<&str>,
        body: Value,
    ) -> Option<(StatusCode, Value)> {
        let mut request = self
            .http
            .post(self.url(instance, path))
            .bearer_auth(&member.token)
            .json(&body);
        if let Some(key) = key {
            request = request.header("idempotency-key", key);
        }
        let response = request.send().await.ok()?;
        let status = response.status();
        Some((status, response.json().await.unwrap_or(Value::Null)))
    }

    async fn create_drop(&self, stock: u32, extra: Value) -> String {
        let seller = seed_member(&self.db, Role::Seller).await;
        let product = seed_product(&self.db, &seller, 1_000).await;
        let mut body = json!({
            "product_id": product,
            "stock": stock,
            "opens_at": (chrono::Utc::now() - chrono::Duration::seconds(1)).to_rfc3339(),
        });
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        let (status, drop) = self
            .post(0, "/api/v1/drops", &seller, None, body)
            .await
            .unwrap();
        assert_eq!(status, StatusCode::CREATED, "{drop}");
        drop["id"].as_str().unwrap().to_owned()
    }

    async fn members(&self, count: usize) -> Vec<TestMember> {
        let mut members = Vec::with_capacity(count);
        for _ in 0..count {
            members.push(seed_member(&self.db, Role::Customer).await);
        }
        members
    }

    /// The drop as `instance` serves it, conservation checked.
    async fn counts(&self, instance: usize, drop: &str) -> (u64, u64, u64) {
        let body: Value = self
            .http
            .get(self.url(instance, &format!("/api/v1/drops/{drop}")))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let n = |k: &str| body[k].as_u64().unwrap_or_else(|| panic!("{k} in {body}"));
        assert_eq!(
            n("available") + n("held") + n("sold"),
            n("stock"),
            "conservation: {body}"
        );
        (n("available"), n("held"), n("sold"))
    }

    /// The counts each instance serves, in order (conservation checked on each).
    async fn all_counts(&self, drop: &str) -> Vec<(u64, u64, u64)> {
        let mut all = Vec::with_capacity(self.servers.len());
        for instance in 0..self.servers.len() {
            all.push(self.counts(instance, drop).await);
        }
        all
    }

    /// Every instance serves the same counts (for states that no longer move); returns them.
    async fn agreed_counts(&self, drop: &str) -> (u64, u64, u64) {
        let first = self.counts(0, drop).await;
        for instance in 1..self.servers.len() {
            assert_eq!(
                self.counts(instance, drop).await,
                first,
                "instance {instance} disagrees"
            );
        }
        first
    }

    /// The ids of the drop's purchases in Postgres.
    async fn purchase_ids(&self, drop: &str) -> Vec<Uuid> {
        let id: Uuid = drop.parse().unwrap();
        self.db
            .client()
            .await
            .query("SELECT id FROM purchases WHERE drop_id = $1", &[&id])
            .await
            .unwrap()
            .iter()
            .map(|row| row.get(0))
            .collect()
    }

    /// Postgres's record of the drop: its holds as stored by status (rows, and journaled holds as `held`), and
    /// purchases.
    async fn stored(&self, drop: &str) -> (HashMap<String, i64>, (i64, i64, i64)) {
        let id: Uuid = drop.parse().unwrap();
        let rows = self
            .db
            .client()
            .await
            .query(
                "SELECT status || COALESCE(':' || reason, ''), count(*) FROM stored_holds WHERE drop_id = $1 GROUP BY 1",
                &[&id],
            )
            .await
            .unwrap();
        let statuses = rows.iter().map(|row| (row.get(0), row.get(1))).collect();
        (statuses, purchase_tally(&self.db, id).await)
    }
}

fn cluster_urls() -> String {
    std::env::var("REDIS_CLUSTER_URLS").expect(
        "REDIS_CLUSTER_URLS (scripts/test.sh starts a cluster with scripts/services.sh cluster)",
    )
}

/// The drop of the issue, at scale N: three instances, 20×N attempts at N units spread over all three, payments
/// through another instance than the one that reserved, and every request retried with its Idempotency-Key on a
/// third instance.
async fn three_instances_sell_exactly_the_stock(redis_urls: &str) {
    const STOCK: usize = 40;
    const MEMBERS: usize = 200;
    const ATTEMPTS_PER_MEMBER: usize = 4; // 20 × STOCK in all
    let fleet = Arc::new(Fleet::start(3, redis_urls, &[("RESERVE_INFLIGHT_MAX", "100000")]).await);
    let drop = fleet
        .create_drop(STOCK as u32, json!({ "per_member_limit": 2 }))
        .await;
    let members = fleet.members(MEMBERS).await;
    let path = format!("/api/v1/drops/{drop}/reservations");
    let mut tasks = Vec::new();
    for (m, member) in members.iter().enumerate() {
        for attempt in 0..ATTEMPTS_PER_MEMBER {
            let (fleet, member, path) = (fleet.clone(), member.clone(), path.clone());
            tasks.push(tokio::spawn(async move {
                let key = format!("reserve-{attempt}");
                let instance = m + attempt;
                let first = fleet
                    .post(instance, &path, &member, Some(&key), json!({}))
                    .await
                    .unwrap();
                let retry = fleet
                    .post(instance + 1, &path, &member, Some(&key), json!({}))
                    .await
                    .unwrap();
                assert_eq!(
                    first, retry,
                    "a retry on another instance answers the first answer"
                );
                (m, instance, first)
            }));
        }
    }
    let mut holds = Vec::new();
    let mut per_member: HashMap<usize, usize> = HashMap::new();
    for task in tasks {
        let (m, instance, (status, body)) = task.await.unwrap();
        match status {
            StatusCode::CREATED => {
                *per_member.entry(m).or_default() += 1;
                holds.push((m, instance, body["id"].as_str().unwrap().to_owned()));
            }
            StatusCode::CONFLICT => {
                let code = body["error"]["code"].as_str().unwrap();
                assert!(code == "sold_out" || code == "limit_exceeded", "{body}");
            }
            other => panic!("unexpected {other}: {body}"),
        }
    }
    assert_eq!(holds.len(), STOCK, "exactly the stock is held");
    assert!(
        per_member.values().all(|&units| units <= 2),
        "limit across instances: {per_member:?}"
    );
    assert_eq!(fleet.agreed_counts(&drop).await, (0, STOCK as u64, 0));
    // Pay through another instance, and retry each payment with its key on a third.
    let mut payments = Vec::new();
    for (m, instance, id) in holds {
        let (fleet, member) = (fleet.clone(), members[m].clone());
        payments.push(tokio::spawn(async move {
            let path = format!("/api/v1/reservations/{id}/payment");
            let body = json!({ "payment_token": "tok_ok" });
            let key = format!("pay-{id}");
            let first = fleet
                .post(instance + 1, &path, &member, Some(&key), body.clone())
                .await
                .unwrap();
            let retry = fleet
                .post(instance + 2, &path, &member, Some(&key), body)
                .await
                .unwrap();
            assert_eq!(first.0, StatusCode::OK, "{}", first.1);
            assert_eq!(first, retry);
            first.1["purchase_id"]
                .as_str()
                .unwrap()
                .parse::<Uuid>()
                .unwrap()
        }));
    }
    let mut purchase_ids = Vec::new();
    for payment in payments {
        purchase_ids.push(payment.await.unwrap());
    }
    assert_eq!(fleet.agreed_counts(&drop).await, (0, 0, STOCK as u64));
    // Every answered purchase is the one stored, once.
    let stored = fleet.purchase_ids(&drop).await;
    purchase_ids.sort();
    let mut stored_sorted = stored.clone();
    stored_sorted.sort();
    assert_eq!(
        purchase_ids, stored_sorted,
        "every 200 names a stored purchase, each once"
    );
    eventually(
        "the journal stored every hold as paid",
        Duration::from_secs(15),
        || async {
            let (statuses, tally) = fleet.stored(&drop).await;
            statuses == HashMap::from([("paid".to_owned(), STOCK as i64)])
                && tally == (STOCK as i64, STOCK as i64, STOCK as i64)
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_instances_on_one_redis_sell_exactly_the_stock() {
    three_instances_sell_exactly_the_stock(&redis_url()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_instances_on_a_redis_cluster_sell_exactly_the_stock() {
    three_instances_sell_exactly_the_stock(&cluster_urls()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_instances_holds_expire_and_its_journal_is_written_by_another() {
    const STOCK: usize = 30;
    let env = [
        ("REAPER_INTERVAL_MS", "200"),
        ("JOURNAL_CLAIM_IDLE_MS", "500"),
    ];
    let mut fleet = Fleet::start(3, &redis_url(), &env).await;
    let drop = fleet
        .create_drop(STOCK as u32, json!({ "hold_seconds": 2 }))
        .await;
    let members = fleet.members(60).await;
    let path = format!("/api/v1/drops/{drop}/reservations");
    let fleet_ref = &fleet;
    let answers = futures_util::future::join_all(
        members
            .iter()
            .enumerate()
            .map(|(m, member)| fleet_ref.post(m, &path, member, None, json!({}))),
    )
    .await;
    let granted = answers
        .iter()
        .filter(|answer| answer.as_ref().unwrap().0 == StatusCode::CREATED)
        .count();
    assert_eq!(granted, STOCK);
    // Instance 0 dies without a word: its holds and whatever of its journal it had not written yet.
    fleet.servers.remove(0).kill().await;
    let started = Instant::now();
    eventually(
        "the dead instance's holds expired and returned",
        Duration::from_secs(10),
        || async {
            fleet
                .all_counts(&drop)
                .await
                .iter()
                .all(|&counts| counts == (STOCK as u64, 0, 0))
        },
    )
    .await;
    assert!(
        started.elapsed() < Duration::from_secs(2 + 2),
        "returned within hold_seconds + slack"
    );
    eventually(
        "every hold and its expiry stored",
        Duration::from_secs(15),
        || async {
            fleet.stored(&drop).await.0
                == HashMap::from([("released:expired".to_owned(), STOCK as i64)])
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_stopped_refuses_everything_and_a_restart_with_aof_loses_nothing() {
    const STOCK: usize = 20;
    let mut redis = RedisServer::start().await;
    let fleet = Fleet::start(2, &redis.url(), &[("REDIS_TIMEOUT_MS", "300")]).await;
    let drop = fleet.create_drop(STOCK as u32, json!({})).await;
    let members = fleet.members(40).await;
    let path = format!("/api/v1/drops/{drop}/reservations");
    let mut holds = Vec::new();
    for (m, member) in members[..12].iter().enumerate() {
        let (status, body) = fleet.post(m, &path, member, None, json!({})).await.unwrap();
        assert_eq!(status, StatusCode::CREATED, "{body}");
        holds.push((m, body["id"].as_str().unwrap().to_owned()));
    }
    for (m, id) in &holds[..6] {
        let pay = format!("/api/v1/reservations/{id}/payment");
        let (status, _) = fleet
            .post(
                m + 1,
                &pay,
                &members[*m],
                None,
                json!({ "payment_token": "tok_ok" }),
            )
            .await
            .unwrap();
        assert_eq!(status, StatusCode::OK);
    }
    assert_eq!(fleet.agreed_counts(&drop).await, (8, 6, 6));

    // Redis goes away: every reservation is refused with 503, none granted.
    redis.stop().await;
    for (m, member) in members[12..20].iter().enumerate() {
        let (status, body) = fleet.post(m, &path, member, None, json!({})).await.unwrap();
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        assert_eq!(body["error"]["code"], "gate_unavailable");
    }
    // It comes back on the same data (the AOF): service resumes by itself, and nothing granted before is lost.
    redis.restart().await;
    eventually(
        "reservations are served again",
        Duration::from_secs(10),
        || async {
            fleet
                .post(0, &path, &members[12], None, json!({}))
                .await
                .unwrap()
                .0
                == StatusCode::CREATED
        },
    )
    .await;
    assert_eq!(fleet.agreed_counts(&drop).await, (7, 7, 6));
    for (m, id) in &holds[6..] {
        let pay = format!("/api/v1/reservations/{id}/payment");
        let (status, body) = fleet
            .post(
                m + 1,
                &pay,
                &members[*m],
                None,
                json!({ "payment_token": "tok_ok" }),
            )
            .await
            .unwrap();
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    for member in &members[13..] {
        let _ = fleet.post(1, &path, member, None, json!({})).await.unwrap();
    }
    assert_eq!(fleet.agreed_counts(&drop).await, (0, 8, 12));
    let (_, tally) = fleet.stored(&drop).await;
    assert_eq!(tally, (12, 12, 12));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_redis_lost_everything_reconcile_rebuilds_it_and_nothing_paid_is_sold_again() {
    const STOCK: usize = 10;
    let redis = RedisServer::start().await;
    let fleet = Fleet::start(2, &redis.url(), &[]).await;
    let drop = fleet.create_drop(STOCK as u32, json!({})).await;
    let members = fleet.members(30).await;
    let path = format!("/api/v1/drops/{drop}/reservations");
    for (m, member) in members[..6].iter().enumerate() {
        let (status, body) = fleet.post(m, &path, member, None, json!({})).await.unwrap();
        assert_eq!(status, StatusCode::CREATED, "{body}");
        if m < 4 {
            let pay = format!(
                "/api/v1/reservations/{}/payment",
                body["id"].as_str().unwrap()
            );
            let (status, _) = fleet
                .post(
                    m + 1,
                    &pay,
                    member,
                    None,
                    json!({ "payment_token": "tok_ok" }),
                )
                .await
                .unwrap();
            assert_eq!(status, StatusCode::OK);
        }
    }
    eventually(
        "the journal stored the holds",
        Duration::from_secs(10),
        || async {
            fleet.stored(&drop).await.0
                == HashMap::from([("paid".to_owned(), 4), ("held".to_owned(), 2)])
        },
    )
    .await;
    // Data loss: Redis comes back empty.
    let mut conn = redis.connection().await.unwrap();
    let _: () = redis::cmd("FLUSHALL").query_async(&mut conn).await.unwrap();
    let output = fleet
        .flashsale(&redis.url(), &["reconcile", "--drop", &drop])
        .await;
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    // The instances may have noticed the loss first and rebuilt the drop themselves; either way Postgres's record
    // is back in Redis.
    assert!(
        stdout.contains("missing in Redis; loaded from Postgres: available 4 held 2 sold 4 of 10")
            || stdout.contains("consistent: available 4 held 2 sold 4 of 10"),
        "{stdout}"
    );
    assert_eq!(fleet.agreed_counts(&drop).await, (4, 2, 4));
    // A loss no instance notices: Redis forgets that one purchase was paid (the counters still add up).
    let paid: Uuid = fleet
        .db
        .client()
        .await
        .query_one(
            "SELECT reservation_id FROM purchases WHERE drop_id = $1 LIMIT 1",
            &[&drop.parse::<Uuid>().unwrap()],
        )
        .await
        .unwrap()
        .get(0);
    let place = engine::gate::redis::ids::HoldRef::from_id(paid).unwrap();
    let keys = engine::gate::redis::drop_keys(&fleet.prefix, drop.parse().unwrap());
    let _: () = redis::pipe()
        .cmd("HDEL")
        .arg(&keys[2])
        .arg(place.state_ref())
        .cmd("HINCRBY")
        .arg(&keys[0])
        .arg("paid")
        .arg(-1)
        .cmd("HINCRBY")
        .arg(&keys[0])
        .arg("held")
        .arg(1)
        .query_async(&mut conn)
        .await
        .unwrap();
    let output = fleet.flashsale(&redis.url(), &["reconcile"]).await;
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains("lost data: 1 purchase(s) not paid in Redis; rebuilt from Postgres: available 4 held 2 sold 4 of 10")
            && stdout.contains("repaired 1"),
        "{stdout}"
    );
    // And once more: nothing left to repair.
    let again = fleet.flashsale(&redis.url(), &["reconcile"]).await;
    let again = String::from_utf8_lossy(&again.stdout);
    assert!(
        again.contains("consistent: available 4 held 2 sold 4 of 10")
            && again.contains("repaired 0"),
        "{again}"
    );
    assert_eq!(fleet.agreed_counts(&drop).await, (4, 2, 4));
    // Everyone else tries: exactly the 4 available units sell, never a paid one again.
    let fleet_ref = &fleet;
    let answers = futures_util::future::join_all(
        members[6..]
            .iter()
            .enumerate()
            .map(|(m, member)| fleet_ref.post(m, &path, member, None, json!({}))),
    )
    .await;
    let granted = answers
        .iter()
        .filter(|answer| answer.as_ref().unwrap().0 == StatusCode::CREATED)
        .count();
    assert_eq!(granted, 4);
    assert_eq!(fleet.agreed_counts(&drop).await, (0, 6, 4));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_away_for_ten_seconds_loses_nothing_acknowledged() {
    const STOCK: usize = 40;
    let mut fleet = Fleet::start(0, &redis_url(), &[]).await;
    // The instances reach Postgres through a proxy the test can cut.
    let target = {
        let url: reqwest::Url = fleet.db.url.parse().unwrap();
        format!("{}:{}", url.host_str().unwrap(), url.port().unwrap_or(5432))
    };
    let proxy = TcpProxy::start(target).await;
    let proxied = {
        let mut url: reqwest::Url = fleet.db.url.parse().unwrap();
        url.set_host(Some("127.0.0.1")).unwrap();
        url.set_port(Some(proxy.port)).unwrap();
        url.to_string()
    };
    let env = [("DB_POOL_WAIT_MS", "1000")];
    fleet.add(&env, Some(&proxied)).await;
    fleet.add(&env, Some(&proxied)).await;
    let drop = fleet.create_drop(STOCK as u32, json!({})).await;
    let members = fleet.members(STOCK).await;
    let path = format!("/api/v1/drops/{drop}/reservations");
    // Buyers reserve and pay one after another while Postgres is cut for ten seconds in the middle.
    let fleet = Arc::new(fleet);
    let acknowledged = Arc::new(tokio::sync::Mutex::new(Vec::new()));
    let mut buyers = Vec::new();
    for (m, member) in members.into_iter().enumerate() {
        let (fleet, path, acknowledged) = (fleet.clone(), path.clone(), acknowledged.clone());
        buyers.push(tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(400 * m as u64)).await;
            let (status, body) = fleet
                .post(m, &path, &member, None, json!({}))
                .await
                .unwrap();
            assert_eq!(
                status,
                StatusCode::CREATED,
                "reservations need only Redis: {body}"
            );
            let pay = format!(
                "/api/v1/reservations/{}/payment",
                body["id"].as_str().unwrap()
            );
            loop {
                let (status, body) = fleet
                    .post(
                        m + 1,
                        &pay,
                        &member,
                        None,
                        json!({ "payment_token": "tok_ok" }),
                    )
                    .await
                    .unwrap();
                match status {
                    StatusCode::OK => {
                        acknowledged.lock().await.push(
                            body["purchase_id"]
                                .as_str()
                                .unwrap()
                                .parse::<Uuid>()
                                .unwrap(),
                        );
                        return;
                    }
                    StatusCode::SERVICE_UNAVAILABLE => {
                        tokio::time::sleep(Duration::from_millis(500)).await
                    }
                    other => panic!("payment answered {other}: {body}"),
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    proxy.cut();
    tokio::time::sleep(Duration::from_secs(10)).await;
    proxy.restore();
    for buyer in buyers {
        tokio::time::timeout(Duration::from_secs(60), buyer)
            .await
            .expect("buyer finished")
            .unwrap();
    }
    let acknowledged = acknowledged.lock().await.clone();
    assert_eq!(acknowledged.len(), STOCK);
    assert_eq!(fleet.agreed_counts(&drop).await, (0, 0, STOCK as u64));
    // Every 200 is in Postgres, once; the journal caught up with every hold.
    let stored: std::collections::HashSet<Uuid> =
        fleet.purchase_ids(&drop).await.into_iter().collect();
    assert!(acknowledged.iter().all(|id| stored.contains(id)));
    eventually("the journal caught up", Duration::from_secs(20), || async {
        let (statuses, tally) = fleet.stored(&drop).await;
        statuses == HashMap::from([("paid".to_owned(), STOCK as i64)])
            && tally == (STOCK as i64, STOCK as i64, STOCK as i64)
    })
    .await;
}

// ---- Guarantee 5a: a payment that outlives its lease is fenced at the system of record.

/// Lease and reaper short enough for a test to outlive: a payment owns its hold for one second.
const SHORT_LEASE: [(&str, &str); 2] = [("PAY_LEASE_SECONDS", "1"), ("REAPER_INTERVAL_MS", "100")];

/// The short lease and reaper, with `extra` settings of one instance (its gateway's latency).
fn short_lease_and<'a>(extra: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
    let mut env = extra.to_vec();
    env.extend_from_slice(&SHORT_LEASE);
    env
}

/// Reserves the one unit of `drop` for `member` through `instance`; returns the payment path of the hold. A unit
/// released by another instance reaches this one's local sold-out flag by its poll (every 50 ms), so a `sold_out`
/// is retried for up to two seconds.
async fn reserve_the_unit(
    fleet: &Fleet,
    instance: usize,
    drop: &str,
    member: &TestMember,
) -> String {
    let started = Instant::now();
    loop {
        let (status, hold) = fleet
            .post(
                instance,
                &format!("/api/v1/drops/{drop}/reservations"),
                member,
                None,
                json!({}),
            )
            .await
            .unwrap();
        if status == StatusCode::CONFLICT
            && hold["error"]["code"] == "sold_out"
            && started.elapsed() < Duration::from_secs(2)
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        }
        assert_eq!(status, StatusCode::CREATED, "{hold}");
        return format!(
            "/api/v1/reservations/{}/payment",
            hold["id"].as_str().unwrap()
        );
    }
}

/// Starts paying through `instance` in a task of its own; the answer comes when the payment ends.
fn pay_in_background(
    fleet: &Arc<Fleet>,
    instance: usize,
    path: String,
    member: TestMember,
) -> tokio::task::JoinHandle<(StatusCode, Value)> {
    let fleet = fleet.clone();
    tokio::spawn(async move {
        fleet
            .post(
                instance,
                &path,
                &member,
                None,
                json!({ "payment_token": "tok_ok" }),
            )
            .await
            .expect("payment answered")
    })
}

/// Waits until `instance` serves the drop's one unit as on sale again: a lapsed payment was fenced and released.
async fn until_back_on_sale(fleet: &Fleet, instance: usize, drop: &str) {
    eventually(
        "the lapsed payment is fenced and its unit back on sale",
        Duration::from_secs(10),
        || async { fleet.counts(instance, drop).await == (1, 0, 0) },
    )
    .await;
}

/// Reserves and pays the drop's one unit through `instance`, which must answer 200; returns the payment's body.
async fn buy_the_unit(fleet: &Fleet, instance: usize, drop: &str, member: &TestMember) -> Value {
    let pay = reserve_the_unit(fleet, instance, drop, member).await;
    let (status, paid) = fleet
        .post(
            instance,
            &pay,
            member,
            None,
            json!({ "payment_token": "tok_ok" }),
        )
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK, "{paid}");
    paid
}

/// What a stalled payment must come to: refused with 409 hold_expired, nothing of it stored, and the drop's one unit
/// sold at most once, to `winner` if there is one, with Postgres and every instance agreeing.
async fn assert_fenced(
    fleet: &Fleet,
    drop: &str,
    stalled: (StatusCode, Value),
    winner: Option<&Value>,
) {
    assert_eq!(
        (stalled.0, stalled.1["error"]["code"].as_str()),
        (StatusCode::CONFLICT, Some("hold_expired")),
        "the payment that outlived its lease: {}",
        stalled.1
    );
    let stored = fleet.purchase_ids(drop).await;
    let expected: Vec<Uuid> = winner
        .map(|body| body["purchase_id"].as_str().unwrap().parse().unwrap())
        .into_iter()
        .collect();
    assert_eq!(stored, expected, "purchases stored for a stock of one");
    let sold = u64::from(winner.is_some());
    let id: Uuid = drop.parse().unwrap();
    assert_eq!(
        i64::from(common::stored_sold(&fleet.db, id).await),
        sold as i64,
        "drops.sold in Postgres"
    );
    eventually("every instance agrees", Duration::from_secs(10), || async {
        fleet
            .all_counts(drop)
            .await
            .iter()
            .all(|&counts| counts == (1 - sold, 0, sold))
    })
    .await;
}

/// The reproduction: instance A's gateway takes five seconds and its lease is one; while X's payment is in
/// flight on A the lease runs out, the reaper fences it, and Y buys the unit through B. X's payment then returns from
/// the gateway: it must be refused, not stored beside Y's purchase.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_payment_that_outlives_its_lease_is_refused_while_another_instance_resells_the_unit() {
    let mut fleet = Fleet::start(0, &redis_url(), &[]).await;
    fleet
        .add(&short_lease_and(&[("PAYMENT_LATENCY_MS", "5000")]), None)
        .await;
    fleet.add(&SHORT_LEASE, None).await;
    let drop = fleet.create_drop(1, json!({ "hold_seconds": 1 })).await;
    let buyers = fleet.members(2).await;
    let fleet = Arc::new(fleet);

    let pay_x = reserve_the_unit(&fleet, 0, &drop, &buyers[0]).await;
    let stalled = pay_in_background(&fleet, 0, pay_x, buyers[0].clone());
    until_back_on_sale(&fleet, 1, &drop).await;
    let won = buy_the_unit(&fleet, 1, &drop, &buyers[1]).await;
    let stalled = tokio::time::timeout(Duration::from_secs(20), stalled)
        .await
        .expect("the stalled payment ends")
        .unwrap();
    assert_fenced(&fleet, &drop, stalled, Some(&won)).await;
}

/// The same on one instance, whose own reaper fences its own stalled payment: the second buyer's payment stalls past
/// its lease too, so nothing may be stored at all and the unit stays for sale.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_one_instance_payments_that_outlive_their_leases_are_all_refused() {
    let mut fleet = Fleet::start(0, &redis_url(), &[]).await;
    fleet
        .add(&short_lease_and(&[("PAYMENT_LATENCY_MS", "4000")]), None)
        .await;
    let drop = fleet.create_drop(1, json!({ "hold_seconds": 1 })).await;
    let buyers = fleet.members(2).await;
    let fleet = Arc::new(fleet);

    let pay_x = reserve_the_unit(&fleet, 0, &drop, &buyers[0]).await;
    let first = pay_in_background(&fleet, 0, pay_x, buyers[0].clone());
    until_back_on_sale(&fleet, 0, &drop).await;
    let pay_y = reserve_the_unit(&fleet, 0, &drop, &buyers[1]).await;
    let second = pay_in_background(&fleet, 0, pay_y, buyers[1].clone());
    let first = first.await.unwrap();
    let second = second.await.unwrap();
    assert_fenced(&fleet, &drop, second, None).await;
    assert_fenced(&fleet, &drop, first, None).await;
}

/// An instance paused (SIGSTOP) in the middle of a payment for longer than the lease, then resumed (SIGCONT): the
/// other instance fences the payment and resells the unit meanwhile, and the resumed payment is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_instance_resumed_after_its_lease_cannot_store_its_payment() {
    let mut fleet = Fleet::start(0, &redis_url(), &[]).await;
    fleet
        .add(&short_lease_and(&[("PAYMENT_LATENCY_MS", "600")]), None)
        .await;
    fleet.add(&SHORT_LEASE, None).await;
    let drop = fleet.create_drop(1, json!({ "hold_seconds": 30 })).await;
    let buyers = fleet.members(2).await;
    let paused = fleet.servers[0].child.id().expect("pid").to_string();
    let fleet = Arc::new(fleet);

    let pay_x = reserve_the_unit(&fleet, 0, &drop, &buyers[0]).await;
    let stalled = pay_in_background(&fleet, 0, pay_x, buyers[0].clone());
    // The payment is at the gateway (600 ms) when the process stops.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let signal = |name: &str| {
        let status = std::process::Command::new("kill")
            .args([name, &paused])
            .status()
            .unwrap();
        assert!(status.success(), "kill {name}");
    };
    signal("-STOP");
    let resume = scopeguard(|| signal("-CONT"));
    until_back_on_sale(&fleet, 1, &drop).await;
    let won = buy_the_unit(&fleet, 1, &drop, &buyers[1]).await;
    std::mem::drop(resume);
    let stalled = tokio::time::timeout(Duration::from_secs(20), stalled)
        .await
        .expect("the resumed payment ends")
        .unwrap();
    assert_fenced(&fleet, &drop, stalled, Some(&won)).await;
}

/// Runs `f` when dropped: a stopped process is resumed even when an assertion fails first.
fn scopeguard(f: impl FnOnce()) -> impl Drop {
    struct Guard<F: FnOnce()>(Option<F>);
    impl<F: FnOnce()> Drop for Guard<F> {
        fn drop(&mut self) {
            if let Some(f) = self.0.take() {
                f();
            }
        }
    }
    Guard(Some(f))
}
