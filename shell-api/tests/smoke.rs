//! Smoke tests of the service frame: health, unknown routes and the real binary's start-up contract.

mod common;

use std::time::Duration;

use axum::http::StatusCode;
use common::{TestApp, TestDb, TestServer};

#[tokio::test]
async fn health_and_unknown_routes_answer_json() {
    let app = TestApp::new().await;
    let health = app.call("GET", "/healthz", None, None).await;
    assert_eq!(health.status, StatusCode::OK);
    assert_eq!(health.body["status"], "ok");

    let ready = app.call("GET", "/readyz", None, None).await;
    assert_eq!(ready.status, StatusCode::OK);

    let missing = app.call("GET", "/api/v1/nope", None, None).await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
    assert_eq!(missing.code(), "not_found");
}

#[tokio::test]
async fn binary_serves_on_port_zero_and_stops_on_sigterm() {
    let db = TestDb::new().await;
    let server = TestServer::start(&db.url, &[]).await;
    let health: serde_json::Value = reqwest::get(server.url("/healthz"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(health["status"], "ok");
    assert!(
        server.terminate(Duration::from_secs(15)).await,
        "clean exit on SIGTERM"
    );
}

#[tokio::test]
async fn serve_refuses_to_start_without_a_jwt_secret() {
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_flashsale"))
        .arg("serve")
        .env_remove("JWT_SECRET")
        .env("BIND_ADDR", "127.0.0.1:0")
        .env("DATABASE_URL", "postgres://postgres@127.0.0.1:1/none")
        .output()
        .await
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("JWT_SECRET"), "stderr: {stderr}");
}
