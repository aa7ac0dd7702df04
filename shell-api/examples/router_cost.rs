//! How much of a request the router and handlers cost, without the network: `/healthz` beside a refused
//! reservation (sold out) and a granted one, called in-process through `app()` many times.
//! `cargo run --release -p shell-api --example router_cost` (needs Postgres: DATABASE_URL).
#![allow(clippy::unwrap_used, clippy::expect_used)]
#![allow(
    clippy::too_many_lines,
    reason = "an example is one measurement read top to bottom: its setup, the load and the report"
)]

use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::http::Request;
use shell_api::config::{DbArgs, EngineArgs, RedisArgs};
use tower::ServiceExt;

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/flashsale".into());
    let url = shell_api::db::with_database(&url, "flashsale_router_cost");
    let pool = shell_api::db::connect(&DbArgs {
        database_url: url,
        db_pool_size: 4,
        db_pool_wait_ms: 5000,
    })
    .await
    .unwrap();
    shell_api::db::migrate(&pool).await.unwrap();
    let started = shell_api::start_engine(
        pool.clone(),
        &EngineArgs::default(),
        &RedisArgs::default(),
        Arc::new(engine::clock::SystemClock),
    )
    .await
    .unwrap();
    let state = shell_api::AppState::new(
        pool.clone(),
        shell_api::Settings::for_tests(),
        started.engine.clone(),
        None,
    );
    let client = pool.get().await.unwrap();
    let member = uuid::Uuid::now_v7();
    client
        .execute(
            "INSERT INTO members (id, email, password_hash, name, role) VALUES ($1, $2, 'x', 'Bench', 'admin')",
            &[&member, &format!("{}@bench.local", member.simple())],
        )
        .await
        .unwrap();
    let product = uuid::Uuid::now_v7();
    client
        .execute(
            "INSERT INTO products (id, seller_id, name, price, currency, kind) VALUES ($1, $2, 'x', 1, 'KRW', 'preorder')",
            &[&product, &member],
        )
        .await
        .unwrap();
    let token = state
        .tokens
        .issue(member, shell_api::auth::Role::Admin, 0)
        .unwrap();
    let router = shell_api::app(state.clone());
    let create = |stock: u32| {
        Request::post("/api/v1/drops")
            .header("authorization", format!("Bearer {token}"))
            .header("content-type", "application/json")
            .body(Body::from(format!(
                r#"{{"product_id":"{product}","stock":{stock},"opens_at":"2020-01-01T00:00:00Z","per_member_limit":1000}}"#
            )))
            .unwrap()
    };
    let body = |r: axum::response::Response| async move {
        let bytes = axum::body::to_bytes(r.into_body(), 1 << 20).await.unwrap();
        serde_json::from_slice::<serde_json::Value>(&bytes).unwrap()
    };
    let sold = body(router.clone().oneshot(create(1)).await.unwrap()).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let live = body(router.clone().oneshot(create(10_000_000)).await.unwrap()).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let reserve = |drop: &str| {
        Request::post(format!("/api/v1/drops/{drop}/reservations"))
            .header("authorization", format!("Bearer {token}"))
            .header("content-type", "application/json")
            .body(Body::from("{}"))
            .unwrap()
    };
    router.clone().oneshot(reserve(&sold)).await.unwrap();
    const N: u32 = 200_000;
    for (name, make) in [
        (
            "healthz",
            Box::new(|| Request::get("/healthz").body(Body::empty()).unwrap())
                as Box<dyn Fn() -> Request<Body>>,
        ),
        ("sold_out", Box::new(|| reserve(&sold))),
        ("reserve", Box::new(|| reserve(&live))),
    ] {
        let n = if name == "reserve" { 900 } else { N };
        let began = Instant::now();
        for _ in 0..n {
            let response = router.clone().oneshot(make()).await.unwrap();
            let _ = axum::body::to_bytes(response.into_body(), 1 << 16)
                .await
                .unwrap();
        }
        println!(
            "{name:>9}: {:.2} µs per request in-process",
            began.elapsed().as_secs_f64() * 1e6 / f64::from(n)
        );
    }
}
