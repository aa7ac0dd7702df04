//! Smoke tests of the service frame: health, unknown routes and the real binary's start-up contract.
#![allow(
    clippy::too_many_lines,
    reason = "each test is one scenario read top to bottom: its setup, the fault or load, and every check"
)]

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
async fn the_server_raises_its_open_files_limit_to_the_hard_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    // The server starts with a soft limit far below the hard one (it inherits this process's).
    setrlimit(Resource::RLIMIT_NOFILE, 256.min(hard), hard).unwrap();
    let db = TestDb::new().await;
    let server = TestServer::start(&db.url, &[]).await;
    setrlimit(Resource::RLIMIT_NOFILE, soft, hard).unwrap();
    let pid = server.child.id().unwrap();
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|line| line.starts_with("Max open files"))
        .unwrap();
    let (server_soft, server_hard) = match line.split_whitespace().collect::<Vec<_>>()[..] {
        [_, _, _, soft, hard, ..] => (soft.to_owned(), hard.to_owned()),
        _ => panic!("{line}"),
    };
    assert_eq!(server_hard, hard.to_string(), "{line}");
    assert_eq!(server_soft, server_hard, "soft raised to hard: {line}");
    assert!(server.terminate(Duration::from_secs(15)).await);
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

/// Drops a database by name when the test ends, pass or fail (the processes under test created it).
struct DropDatabase(String);

impl Drop for DropDatabase {
    fn drop(&mut self) {
        let admin = shell_api::db::with_database(&common::server_url(), "postgres");
        let name = self.0.clone();
        let _ = std::process::Command::new("psql")
            .args(["-X", "-q", "-d", &admin, "-c"])
            .arg(format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
            .status();
    }
}

/// First boot of a fleet: `flashsale migrate` and `flashsale serve` processes all started at the same moment on
/// a database that does not exist yet. Every one of them succeeds, every migration is applied, and no migration
/// is applied by two processes (each `migrate` prints the versions it applied; their lists are disjoint and
/// together with what the servers applied they cover each version once).
#[tokio::test]
async fn a_fleet_started_at_once_on_a_new_database_migrates_it_once() {
    const MIGRATORS: usize = 6;
    const SERVERS: usize = 3;
    let name = format!("fs_test_{}", uuid::Uuid::new_v4().simple());
    let _cleanup = DropDatabase(name.clone());
    let url = shell_api::db::with_database(&common::server_url(), &name);

    let migrators: Vec<_> = (0..MIGRATORS)
        .map(|_| {
            tokio::process::Command::new(env!("CARGO_BIN_EXE_flashsale"))
                .arg("migrate")
                .env("DATABASE_URL", &url)
                .env("RUST_LOG", "info")
                .kill_on_drop(true)
                .output()
        })
        .collect();
    let servers: Vec<_> = (0..SERVERS)
        .map(|_| TestServer::start(&url, &[("RUST_LOG", "shell_api::db=info")]))
        .collect();
    let (outputs, servers) = tokio::join!(
        futures_util::future::join_all(migrators),
        futures_util::future::join_all(servers)
    );

    let mut applied_by_migrators = Vec::new();
    for output in outputs {
        let output = output.expect("run flashsale migrate");
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "flashsale migrate failed: {}\nstdout: {stdout}\nstderr: {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        let list = stdout
            .lines()
            .find_map(|line| line.strip_prefix("applied migrations: "))
            .expect("migrate prints what it applied");
        let list = list.trim().trim_start_matches('[').trim_end_matches(']');
        applied_by_migrators.extend(
            list.split(',')
                .map(str::trim)
                .filter(|v| !v.is_empty())
                .map(|v| v.parse::<i32>().expect("a version")),
        );
    }
    for server in &servers {
        let health = reqwest::get(server.url("/readyz")).await.expect("readyz");
        assert_eq!(health.status(), reqwest::StatusCode::OK);
    }

    let mut unique = applied_by_migrators.clone();
    unique.sort_unstable();
    unique.dedup();
    assert_eq!(
        unique.len(),
        applied_by_migrators.len(),
        "a migration applied by two processes: {applied_by_migrators:?}"
    );
    let db = shell_api::db::connect(&shell_api::config::DbArgs {
        database_url: url.clone(),
        db_pool_size: 1,
        db_pool_wait_ms: 5000,
    })
    .await
    .expect("connect");
    let client = db.get().await.expect("connection");
    let versions: Vec<i32> = client
        .query(
            "SELECT version FROM schema_migrations ORDER BY version",
            &[],
        )
        .await
        .expect("schema_migrations")
        .iter()
        .map(|row| row.get(0))
        .collect();
    // The numbers of the files in migrations/: each branch takes its own number, so they need not be contiguous
    // until every branch has landed.
    let mut expected: Vec<i32> =
        std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/migrations"))
            .expect("migrations dir")
            .filter_map(|entry| {
                let name = entry.ok()?.file_name().into_string().ok()?;
                name.strip_suffix(".sql")?.split('_').next()?.parse().ok()
            })
            .collect();
    expected.sort_unstable();
    assert_eq!(versions, expected, "every migration applied, in order");
    assert!(
        applied_by_migrators.iter().all(|v| versions.contains(v)),
        "a migrator reported a version the table lacks"
    );
    drop(client);
    db.close();
    for server in servers {
        server.kill().await;
    }
}
