//! 10,000 watchers of one drop on one release server: what each costs in server memory, and what reservations
//! the server still takes beside them.
//!
//! ```sh
//! eval "$(scripts/services.sh)"
//! cargo build --release --bin flashsale --example live_fanout
//! target/release/examples/live_fanout            # WATCHERS=10000 SECONDS=10 CONCURRENCY=32 FLASHSALE_BIN=...
//! ```
//!
//! It starts `flashsale serve` (the release binary next to this example, or `FLASHSALE_BIN`) on a fresh database
//! `fs_fanout_<id>` on `DATABASE_URL`'s server and 127.0.0.1:0, seeds a seller, buyers and a drop of 1,000,000
//! units, then: reservations for `SECONDS` with no watcher (the baseline), the server's RSS, `WATCHERS` event
//! streams opened (raw HTTP/1.1 on 127.0.0.1, each waits for its first `event: drop`), the RSS again (the delta per
//! watcher is the number reported), and reservations for `SECONDS` again while every watcher receives the drop's
//! changes (up to 10 events a second each). The load generator runs on the same machine as the server, so both
//! reservation rates are what is left beside it. Everything is bounded in time; the server and its database are
//! removed at the end.
#![allow(
    clippy::too_many_lines,
    reason = "an example is one measurement read top to bottom: its setup, the load and the report"
)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Stdio;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use shell_api::auth::{Role, TokenKeys};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use uuid::Uuid;

const JWT_SECRET: &str = "live-fanout-secret";

fn env_or<T: FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let watchers: usize = env_or("WATCHERS", 10_000);
    let seconds: u64 = env_or("SECONDS", 10);
    let concurrency: usize = env_or("CONCURRENCY", 32);
    let bin = std::env::var("FLASHSALE_BIN").unwrap_or_else(|_| {
        let me = std::env::current_exe().unwrap();
        // target/release/examples/live_fanout -> target/release/flashsale
        me.parent()
            .and_then(|examples| examples.parent())
            .unwrap()
            .join("flashsale")
            .display()
            .to_string()
    });
    let server_url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned());
    let db_name = format!("fs_fanout_{}", Uuid::new_v4().simple());
    let db_url = shell_api::db::with_database(&server_url, &db_name);

    // The server.
    let mut child = tokio::process::Command::new(&bin)
        .arg("serve")
        .env_remove("REDIS_URL")
        .env("DATABASE_URL", &db_url)
        .env("BIND_ADDR", "127.0.0.1:0")
        .env("JWT_SECRET", JWT_SECRET)
        .env("RUST_LOG", "warn")
        .env("LIVE_STREAMS_MAX", (watchers + 1000).to_string())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let pid = child.id().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let base = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if let Some(addr) = line.strip_prefix("listening on ") {
                return addr.trim().to_owned();
            }
        }
        panic!("server exited before listening");
    })
    .await?;
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    let addr = base.trim_start_matches("http://").to_owned();
    println!("server {bin} (pid {pid}) on {base}, database {db_name}");

    // Seed: a seller, buyers, a product, a drop.
    let pool = shell_api::db::connect(&shell_api::config::DbArgs {
        database_url: db_url.clone(),
        db_pool_size: 2,
        db_pool_wait_ms: 5000,
    })
    .await?;
    let keys = TokenKeys::new(JWT_SECRET.as_bytes(), 3600);
    let client = pool.get().await?;
    let member = |role: Role| {
        let id = Uuid::now_v7();
        (id, keys.issue(id, role, 0).unwrap(), role)
    };
    let seller = member(Role::Seller);
    let buyers: Vec<_> = (0..256).map(|_| member(Role::Customer)).collect();
    for (id, _, role) in std::iter::once(&seller).chain(buyers.iter()) {
        client
            .execute(
                "INSERT INTO members (id, email, password_hash, name, role) VALUES ($1, $2, 'x', 'm', $3)",
                &[id, &format!("{}@fanout.test", id.simple()), &role.as_str()],
            )
            .await?;
    }
    let product = Uuid::now_v7();
    client
        .execute(
            "INSERT INTO products (id, seller_id, name, price, currency, kind) VALUES ($1, $2, 'Fanout', 100, 'KRW', 'preorder')",
            &[&product, &seller.0],
        )
        .await?;
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(concurrency * 2)
        .build()?;
    let created: Value = http
        .post(format!("{base}/api/v1/drops"))
        .bearer_auth(&seller.1)
        .json(&json!({ "product_id": product, "stock": 1_000_000,
                       "opens_at": (chrono::Utc::now() - chrono::Duration::seconds(1)).to_rfc3339(),
                       "per_member_limit": 1000, "hold_seconds": 3600 }))
        .send()
        .await?
        .json()
        .await?;
    let drop_id = created["id"].as_str().unwrap().to_owned();
    let tokens: Arc<Vec<String>> = Arc::new(buyers.iter().map(|b| b.1.clone()).collect());

    let reserve_for = |label: &'static str| {
        let (http, base, drop_id, tokens) = (
            http.clone(),
            base.clone(),
            drop_id.clone(),
            Arc::clone(&tokens),
        );
        async move {
            let ok = Arc::new(AtomicU64::new(0));
            let other = Arc::new(AtomicU64::new(0));
            let until = Instant::now() + Duration::from_secs(seconds);
            let mut tasks = Vec::new();
            for task in 0..concurrency {
                let (http, url, tokens, ok, other) = (
                    http.clone(),
                    format!("{base}/api/v1/drops/{drop_id}/reservations"),
                    Arc::clone(&tokens),
                    Arc::clone(&ok),
                    Arc::clone(&other),
                );
                tasks.push(tokio::spawn(async move {
                    let mut n = task;
                    while Instant::now() < until {
                        let token = &tokens[n % tokens.len()];
                        n += concurrency;
                        match http
                            .post(&url)
                            .bearer_auth(token)
                            .json(&json!({"quantity": 1}))
                            .send()
                            .await
                        {
                            Ok(r) if r.status() == reqwest::StatusCode::CREATED => {
                                ok.fetch_add(1, Ordering::Relaxed);
                                let _ = r.bytes().await;
                            }
                            _ => {
                                other.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                }));
            }
            for task in tasks {
                task.await.unwrap();
            }
            let (ok, other) = (ok.load(Ordering::Relaxed), other.load(Ordering::Relaxed));
            let rate = ok as f64 / seconds as f64;
            println!("{label}: {ok} reservations in {seconds} s = {rate:.0}/s ({other} not 201)");
            rate
        }
    };

    let baseline = reserve_for("reservations, no watchers").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_before = rss_kib(pid);

    // The watchers: raw HTTP/1.1 streams, opened 200 at a time, each counted once its first event came.
    let connected = Arc::new(AtomicU64::new(0));
    let events = Arc::new(AtomicU64::new(0));
    // WATCH_PATH=/healthz measures idle keep-alive connections instead: what a connection costs without a stream.
    let path =
        std::env::var("WATCH_PATH").unwrap_or_else(|_| format!("/api/v1/drops/{drop_id}/events"));
    let request =
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\n\r\n");
    let opening = Instant::now();
    let gate = Arc::new(tokio::sync::Semaphore::new(200));
    let mut streams = Vec::with_capacity(watchers);
    for _ in 0..watchers {
        let (addr, request, connected, events, gate, path) = (
            addr.clone(),
            request.clone(),
            Arc::clone(&connected),
            Arc::clone(&events),
            Arc::clone(&gate),
            path.clone(),
        );
        streams.push(tokio::spawn(async move {
            let permit = gate.acquire_owned().await.unwrap();
            let mut socket = tokio::net::TcpStream::connect(&addr).await.unwrap();
            socket.write_all(request.as_bytes()).await.unwrap();
            let mut buf = vec![0u8; 2048];
            let mut first = true;
            let mut permit = Some(permit);
            loop {
                let n = match socket.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                let seen = buf[..n].windows(11).filter(|w| w == b"event: drop").count() as u64;
                events.fetch_add(seen, Ordering::Relaxed);
                // Connected once the response's headers came (and, for a stream, its first event).
                let answered = buf[..n].windows(4).any(|w| w == b"\r\n\r\n");
                if first && (seen > 0 || answered && !path.ends_with("/events")) {
                    first = false;
                    connected.fetch_add(1, Ordering::Relaxed);
                    permit.take();
                }
            }
        }));
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while connected.load(Ordering::Relaxed) < watchers as u64 {
        assert!(
            Instant::now() < deadline,
            "only {} watchers connected",
            connected.load(Ordering::Relaxed)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "{watchers} watchers connected in {:.1} s",
        opening.elapsed().as_secs_f64()
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_after = rss_kib(pid);
    let per_watcher = (rss_after.saturating_sub(rss_before)) as f64 * 1024.0 / watchers as f64;
    println!(
        "server RSS {} KiB -> {} KiB with {watchers} watchers: {:.0} bytes per watcher",
        rss_before, rss_after, per_watcher
    );

    let events_before = events.load(Ordering::Relaxed);
    let started = Instant::now();
    let with_watchers = reserve_for("reservations, with the watchers").await;
    let delivered = events.load(Ordering::Relaxed) - events_before;
    println!(
        "events delivered meanwhile: {delivered} ({:.0}/s, {:.1} per watcher per second)",
        delivered as f64 / started.elapsed().as_secs_f64(),
        delivered as f64 / started.elapsed().as_secs_f64() / watchers as f64
    );
    let rss_end = rss_kib(pid);
    println!("server RSS after the second run: {rss_end} KiB");
    println!(
        "summary: watchers={watchers} bytes_per_watcher={per_watcher:.0} reserve_per_s_baseline={baseline:.0} \
         reserve_per_s_with_watchers={with_watchers:.0}"
    );

    for stream in streams {
        stream.abort();
    }
    drop(client);
    pool.close();
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
    let _ = tokio::time::timeout(Duration::from_secs(15), child.wait()).await;
    let admin =
        tokio_postgres::Config::from_str(&shell_api::db::with_database(&server_url, "postgres"))?;
    let (admin, conn) = admin.connect(tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    admin
        .batch_execute(&format!(
            "DROP DATABASE IF EXISTS \"{db_name}\" WITH (FORCE)"
        ))
        .await?;
    Ok(())
}
