//! End-to-end stress of a drop against the real binary on port 0 and real Postgres: ten times more buyers than
//! units, all at once. Exactly `stock` holds are granted, every paid hold has exactly one purchase row, and
//! cancelled, declined and expired holds all return to sale.
#![allow(
    clippy::too_many_lines,
    reason = "each test is one scenario read top to bottom: its setup, the fault or load, and every check"
)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::{
    live_drop_state, post_json, purchase_tally, seed_member, seed_product, TestDb, TestMember,
    TestServer,
};
use reqwest::StatusCode;
use serde_json::{json, Value};
use shell_api::auth::Role;
use uuid::Uuid;

struct Client {
    http: reqwest::Client,
    server: TestServer,
}

impl Client {
    async fn post(&self, path: &str, member: &TestMember, body: Value) -> (StatusCode, Value) {
        post_json(&self.http, self.server.url(path), member, body)
            .await
            .expect("request")
    }

    async fn delete(&self, path: &str, member: &TestMember) -> StatusCode {
        self.http
            .delete(self.server.url(path))
            .bearer_auth(&member.token)
            .send()
            .await
            .expect("request")
            .status()
    }

    async fn drop_state(&self, id: &str) -> Value {
        live_drop_state(&self.http, &self.server.base_url, id).await
    }
}

async fn create_drop(
    client: &Client,
    seller: &TestMember,
    product: Uuid,
    stock: u32,
    extra: Value,
) -> String {
    let mut body = json!({
        "product_id": product,
        "stock": stock,
        "opens_at": (chrono::Utc::now() - chrono::Duration::seconds(1)).to_rfc3339(),
    });
    body.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    let (status, drop) = client.post("/api/v1/drops", seller, body).await;
    assert_eq!(status, StatusCode::CREATED, "{drop}");
    drop["id"].as_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_times_more_buyers_than_units_sell_exactly_the_stock() {
    const STOCK: u32 = 100;
    const MEMBERS: usize = 250;
    const ATTEMPTS_PER_MEMBER: usize = 4;
    let db = TestDb::new().await;
    let server = TestServer::start(&db.url, &[("RESERVE_INFLIGHT_MAX", "100000")]).await;
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .build()
        .unwrap();
    let client = std::sync::Arc::new(Client { http, server });
    let seller = seed_member(&db, Role::Seller).await;
    let product = seed_product(&db, &seller, 1_000).await;
    let drop = create_drop(
        &client,
        &seller,
        product,
        STOCK,
        json!({ "per_member_limit": 1 }),
    )
    .await;
    let mut members = Vec::new();
    for _ in 0..MEMBERS {
        members.push(seed_member(&db, Role::Customer).await);
    }

    // 1000 concurrent attempts at 100 units.
    let mut tasks = Vec::new();
    for member in &members {
        for _ in 0..ATTEMPTS_PER_MEMBER {
            let (client, member, drop) = (client.clone(), member.clone(), drop.clone());
            tasks.push(tokio::spawn(async move {
                let (status, body) = client
                    .post(
                        &format!("/api/v1/drops/{drop}/reservations"),
                        &member,
                        json!({ "quantity": 1 }),
                    )
                    .await;
                (member, status, body)
            }));
        }
    }
    let mut holds = Vec::new();
    let mut refusals = std::collections::HashMap::<String, usize>::new();
    for task in tasks {
        let (member, status, body) = task.await.unwrap();
        match status {
            StatusCode::CREATED => holds.push((member, body["id"].as_str().unwrap().to_owned())),
            StatusCode::CONFLICT => {
                *refusals
                    .entry(body["error"]["code"].as_str().unwrap().to_owned())
                    .or_default() += 1
            }
            other => panic!("unexpected {other}: {body}"),
        }
    }
    assert_eq!(
        holds.len(),
        STOCK as usize,
        "exactly the stock is held; refusals: {refusals:?}"
    );
    assert_eq!(
        holds.len() + refusals.values().sum::<usize>(),
        MEMBERS * ATTEMPTS_PER_MEMBER
    );
    let holders: HashSet<Uuid> = holds.iter().map(|(m, _)| m.id).collect();
    assert_eq!(holders.len(), holds.len(), "the per-member limit of 1 held");
    let state = client.drop_state(&drop).await;
    assert_eq!(
        (
            state["available"].as_u64(),
            state["held"].as_u64(),
            state["status"].as_str()
        ),
        (Some(0), Some(100), Some("sold_out"))
    );

    // Everyone pays at once.
    let mut tasks = Vec::new();
    for (member, id) in holds.clone() {
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            client
                .post(
                    &format!("/api/v1/reservations/{id}/payment"),
                    &member,
                    json!({ "payment_token": "tok_ok" }),
                )
                .await
        }));
    }
    let mut purchase_ids = HashSet::new();
    for task in tasks {
        let (status, body) = task.await.unwrap();
        assert_eq!(status, StatusCode::OK, "{body}");
        purchase_ids.insert(
            body["purchase_id"]
                .as_str()
                .unwrap()
                .parse::<Uuid>()
                .unwrap(),
        );
    }
    assert_eq!(purchase_ids.len(), STOCK as usize);

    let pg = db.client().await;
    let drop_id: Uuid = drop.parse().unwrap();
    let (rows, reservations, units) = purchase_tally(&db, drop_id).await;
    assert_eq!(
        (rows, reservations, units),
        (100, 100, 100),
        "one purchase row per paid reservation"
    );
    let stored: HashSet<Uuid> = pg
        .query("SELECT id FROM purchases WHERE drop_id = $1", &[&drop_id])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        stored, purchase_ids,
        "every 200 is in Postgres, nothing else is"
    );
    let state = client.drop_state(&drop).await;
    assert_eq!(
        (state["sold"].as_u64(), state["held"].as_u64()),
        (Some(100), Some(0))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_declined_and_expired_holds_return_to_sale() {
    const STOCK: u32 = 30;
    let db = TestDb::new().await;
    let server = TestServer::start(&db.url, &[("REAPER_INTERVAL_MS", "200")]).await;
    let client = Client {
        http: reqwest::Client::new(),
        server,
    };
    let seller = seed_member(&db, Role::Seller).await;
    let product = seed_product(&db, &seller, 500).await;
    let drop = create_drop(
        &client,
        &seller,
        product,
        STOCK,
        json!({ "hold_seconds": 1 }),
    )
    .await;

    let mut holds = Vec::new();
    for _ in 0..STOCK {
        let member = seed_member(&db, Role::Customer).await;
        let (status, body) = client
            .post(
                &format!("/api/v1/drops/{drop}/reservations"),
                &member,
                json!({}),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        holds.push((member, body["id"].as_str().unwrap().to_owned()));
    }
    let late = seed_member(&db, Role::Customer).await;
    let (status, _) = client
        .post(
            &format!("/api/v1/drops/{drop}/reservations"),
            &late,
            json!({}),
        )
        .await;
    assert_eq!(
        status,
        StatusCode::CONFLICT,
        "sold out while everything is held"
    );

    for (member, id) in &holds[..10] {
        assert_eq!(
            client
                .delete(&format!("/api/v1/reservations/{id}"), member)
                .await,
            StatusCode::NO_CONTENT
        );
    }
    for (member, id) in &holds[10..20] {
        let (status, _) = client
            .post(
                &format!("/api/v1/reservations/{id}/payment"),
                member,
                json!({ "payment_token": "tok_declined" }),
            )
            .await;
        assert_eq!(status, StatusCode::PAYMENT_REQUIRED);
    }
    let state = client.drop_state(&drop).await;
    assert_eq!(
        state["available"], 20,
        "cancelled and declined return at once: {state}"
    );

    // The other ten expire: within hold_seconds + one reaper interval (+ slack for a busy machine).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let state = client.drop_state(&drop).await;
        if state["available"] == STOCK {
            assert_eq!(state["held"], 0);
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "expired holds did not return: {state}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // All of it sells again, to new buyers.
    for _ in 0..STOCK {
        let member = seed_member(&db, Role::Customer).await;
        let (status, body) = client
            .post(
                &format!("/api/v1/drops/{drop}/reservations"),
                &member,
                json!({}),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
    }
}
