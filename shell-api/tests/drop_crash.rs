//! Crash test: SIGKILL the real server in the middle of a drop, after some payments answered 200, restart it on
//! the same database, and check that nothing acknowledged was lost and nothing paid is sold again.
#![allow(
    clippy::too_many_lines,
    reason = "each test is one scenario read top to bottom: its setup, the fault or load, and every check"
)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use common::{
    live_drop_state, post_json, purchase_tally, seed_member, seed_product, TestDb, TestMember,
    TestServer,
};
use reqwest::StatusCode;
use serde_json::{json, Value};
use shell_api::auth::Role;
use tokio::sync::Mutex;
use uuid::Uuid;

const STOCK: u64 = 60;

async fn post(
    http: &reqwest::Client,
    url: String,
    member: &TestMember,
    body: Value,
) -> Option<(StatusCode, Value)> {
    post_json(http, url, member, body).await
}

async fn drop_state(http: &reqwest::Client, server: &TestServer, drop: &str) -> Value {
    live_drop_state(http, &server.base_url, drop).await
}

/// Reserves and pays for one unit; records the purchase id of every 200.
async fn buy(
    http: reqwest::Client,
    base: String,
    drop: String,
    member: TestMember,
    paid: Arc<Mutex<Vec<Uuid>>>,
) {
    let Some((StatusCode::CREATED, hold)) = post(
        &http,
        format!("{base}/api/v1/drops/{drop}/reservations"),
        &member,
        json!({}),
    )
    .await
    else {
        return;
    };
    let id = hold["id"].as_str().unwrap();
    if let Some((StatusCode::OK, body)) = post(
        &http,
        format!("{base}/api/v1/reservations/{id}/payment"),
        &member,
        json!({ "payment_token": "tok_ok" }),
    )
    .await
    {
        paid.lock()
            .await
            .push(body["purchase_id"].as_str().unwrap().parse().unwrap());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_server_loses_no_acknowledged_purchase_and_resells_nothing() {
    let db = TestDb::new().await;
    // Payments take a while, so the kill lands with some answered and others in flight.
    let env = [("PAYMENT_LATENCY_MS", "30"), ("REAPER_INTERVAL_MS", "200")];
    let server = TestServer::start(&db.url, &env).await;
    let http = reqwest::Client::new();
    let seller = seed_member(&db, Role::Seller).await;
    let product = seed_product(&db, &seller, 2_500).await;
    let opens = (chrono::Utc::now() - chrono::Duration::seconds(1)).to_rfc3339();
    let (status, drop) = post(
        &http,
        server.url("/api/v1/drops"),
        &seller,
        json!({ "product_id": product, "stock": STOCK, "opens_at": opens, "hold_seconds": 2 }),
    )
    .await
    .unwrap();
    assert_eq!(status, StatusCode::CREATED, "{drop}");
    let drop = drop["id"].as_str().unwrap().to_owned();

    let paid = Arc::new(Mutex::new(Vec::new()));
    let mut members = Vec::new();
    for _ in 0..STOCK {
        members.push(seed_member(&db, Role::Customer).await);
    }
    // Buyers arrive a few milliseconds apart, so purchases complete over time rather than all at once.
    let mut buyers = Vec::new();
    for member in members {
        buyers.push(tokio::spawn(buy(
            http.clone(),
            server.base_url.clone(),
            drop.clone(),
            member,
            paid.clone(),
        )));
        tokio::time::sleep(Duration::from_millis(15)).await;
        if paid.lock().await.len() >= 20 {
            break;
        }
    }
    // Kill once a third have been acknowledged.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while paid.lock().await.len() < 20 {
        assert!(
            std::time::Instant::now() < deadline,
            "payments did not progress"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    server.kill().await;
    for buyer in buyers {
        buyer.await.unwrap();
    }
    let acknowledged: HashSet<Uuid> = paid.lock().await.iter().copied().collect();
    assert!(acknowledged.len() >= 20);
    assert!(
        acknowledged.len() < STOCK as usize,
        "the kill landed mid-drop"
    );

    // Every 200 is in Postgres, once.
    let drop_id: Uuid = drop.parse().unwrap();
    let pg = db.client().await;
    let stored: HashSet<Uuid> = pg
        .query("SELECT id FROM purchases WHERE drop_id = $1", &[&drop_id])
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert!(
        acknowledged.is_subset(&stored),
        "lost: {:?}",
        acknowledged.difference(&stored).collect::<Vec<_>>()
    );

    // Restart: sold is rebuilt from purchases; what was held comes back as held and then expires.
    let server = TestServer::start(&db.url, &env).await;
    let state = drop_state(&http, &server, &drop).await;
    assert_eq!(
        state["sold"].as_u64().unwrap(),
        stored.len() as u64,
        "{state}"
    );

    // Sell out the rest to new buyers, waiting out restored holds, then count: exactly the stock, never more.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let state = drop_state(&http, &server, &drop).await;
        if state["sold"].as_u64().unwrap() == STOCK {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "could not sell out after restart: {state}"
        );
        let mut round = Vec::new();
        for _ in 0..state["available"].as_u64().unwrap() {
            let member = seed_member(&db, Role::Customer).await;
            round.push(tokio::spawn(buy(
                http.clone(),
                server.base_url.clone(),
                drop.clone(),
                member,
                paid.clone(),
            )));
        }
        for buyer in round {
            buyer.await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (rows, reservations, units) = purchase_tally(&db, drop_id).await;
    assert_eq!(
        (rows, reservations, units),
        (STOCK as i64, STOCK as i64, STOCK as i64),
        "no paid unit sold twice"
    );
    let buyers: i64 = pg
        .query_one(
            "SELECT count(DISTINCT member_id) FROM purchases WHERE drop_id = $1",
            &[&drop_id],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        buyers, STOCK as i64,
        "limit 1: every unit went to a different member"
    );
    let state = drop_state(&http, &server, &drop).await;
    assert_eq!(
        (state["available"].as_u64(), state["held"].as_u64()),
        (Some(0), Some(0))
    );
    assert!(
        server.terminate(Duration::from_secs(15)).await,
        "clean shutdown after the drop"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_the_writer_before_the_process_exits() {
    let db = TestDb::new().await;
    // A writer that lingers, so rows are still queued when the signal arrives.
    let server = TestServer::start(&db.url, &[("WRITER_FLUSH_INTERVAL_MS", "200")]).await;
    let http = reqwest::Client::new();
    let seller = seed_member(&db, Role::Seller).await;
    let product = seed_product(&db, &seller, 100).await;
    let opens = (chrono::Utc::now() - chrono::Duration::seconds(1)).to_rfc3339();
    let (status, drop) = post(
        &http,
        server.url("/api/v1/drops"),
        &seller,
        json!({ "product_id": product, "stock": 500, "opens_at": opens }),
    )
    .await
    .unwrap();
    assert_eq!(status, StatusCode::CREATED, "{drop}");
    let drop = drop["id"].as_str().unwrap().to_owned();
    let mut held = Vec::new();
    for _ in 0..50 {
        let member = seed_member(&db, Role::Customer).await;
        let (status, body) = post(
            &http,
            server.url(&format!("/api/v1/drops/{drop}/reservations")),
            &member,
            json!({}),
        )
        .await
        .unwrap();
        assert_eq!(status, StatusCode::CREATED);
        held.push(body["id"].as_str().unwrap().parse::<Uuid>().unwrap());
    }
    assert!(
        server.terminate(Duration::from_secs(15)).await,
        "clean exit"
    );
    let stored: HashSet<Uuid> = db
        .client()
        .await
        .query("SELECT id FROM stored_holds WHERE status = 'held'", &[])
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    let missing: Vec<_> = held.iter().filter(|id| !stored.contains(id)).collect();
    assert!(
        missing.is_empty(),
        "holds acknowledged but not written at shutdown: {missing:?}"
    );
}
