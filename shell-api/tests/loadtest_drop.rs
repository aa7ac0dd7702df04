//! The load harness against the real binary: a short goose drop run must pass every check, write goose's HTML
//! report, and, once a purchase row is deleted behind the server's back, the same verification must fail. A short
//! shop run likewise passes, and fails once a shelf's stock or a balance is changed behind the server's back.
//!
//! A small opening burst (500 clients at one instant) must add up, and fail once a journaled hold is deleted behind
//! the server's back and the server restarts from Postgres.
//!
//! It lives here rather than in `loadtest/` because it needs `flashsale` itself (`CARGO_BIN_EXE_flashsale`).
#![allow(clippy::unwrap_used)]
#![allow(
    clippy::too_many_lines,
    reason = "each test is one scenario read top to bottom: its setup, the fault or load, and every check"
)]

mod common;

use clap::Parser;
use common::{TestDb, TestServer};
use loadtest::config::{Cli, Command};
use loadtest::verify::{self, Verdict};

const ADMIN_EMAIL: &str = "admin@load.test";
const ADMIN_PASSWORD: &str = "load-test-admin-password";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drop_run_passes_and_a_deleted_purchase_fails_its_verification() {
    let db = TestDb::new().await;
    db.create_admin(ADMIN_EMAIL, ADMIN_PASSWORD).await;
    let server = TestServer::start(&db.url, &[("REAPER_INTERVAL_MS", "200")]).await;
    let reports = std::env::temp_dir().join(format!("fs-load-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&reports).unwrap();
    let html = reports.join("drop.html");

    // 12 buyers x 3 tabs for 6 units: it sells out, holds are abandoned, declined and paid, refused buyers wait.
    let cli = Cli::try_parse_from([
        "flashsale-load",
        "drop",
        "--base-url",
        &server.base_url,
        "--database-url",
        &db.url,
        "--admin-email",
        ADMIN_EMAIL,
        "--admin-password",
        ADMIN_PASSWORD,
        "--buyers",
        "12",
        "--attempts-per-buyer",
        "3",
        "--stock",
        "6",
        "--hold-seconds",
        "2",
        "--opens-in-ms",
        "1500",
        "--restock-slack-seconds",
        "2",
        "--reaper-interval-ms",
        "200",
        "--report-file",
        html.to_str().unwrap(),
        "--threshold",
        "error-rate<1%",
        "--quiet",
    ])
    .unwrap();
    let Command::Drop(args) = cli.command else {
        unreachable!("parsed the drop subcommand")
    };
    let mut outcome = loadtest::run::drop(args).await.unwrap();
    let summary = &outcome.summary;
    let report = loadtest::summary::render(summary);
    assert!(summary.passed, "{report}");
    assert_eq!(summary.final_state.unwrap().sold, 6, "{report}");
    assert_eq!(summary.outcomes.paid, 6, "{report}");
    assert!(summary.outcomes.holds_at_opening >= 6, "{report}");
    assert!(summary.checks.iter().all(|c| c.verdict != Verdict::Fail));
    // The server's drop report tells the same story as the harness's answers, count for count.
    let reported = summary
        .checks
        .iter()
        .find(|c| c.name == "the drop report matches the run");
    assert_eq!(reported.map(|c| c.verdict), Some(Verdict::Pass), "{report}");
    let html_len = std::fs::metadata(&html).unwrap().len();
    assert!(html_len > 10_000, "goose's HTML report is {html_len} bytes");

    // Plant a violation: one acknowledged purchase disappears from Postgres.
    let purchase: uuid::Uuid = outcome.run.purchases[0].parse().unwrap();
    let deleted = db
        .client()
        .await
        .execute("DELETE FROM purchases WHERE id = $1", &[&purchase])
        .await
        .unwrap();
    assert_eq!(deleted, 1);
    let checks = loadtest::run::reverify(&mut outcome.run, &db.url)
        .await
        .unwrap();
    assert!(!verify::passed(&checks));
    let failed: Vec<&str> = checks
        .iter()
        .filter(|c| c.verdict == Verdict::Fail)
        .map(|c| c.name)
        .collect();
    assert!(
        failed.contains(&"purchases in Postgres == sold"),
        "{failed:?}"
    );
    assert!(
        failed.contains(&"every 200 payment is durable"),
        "{failed:?}"
    );

    let _ = std::fs::remove_dir_all(&reports);
    assert!(server.terminate(std::time::Duration::from_secs(15)).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shop_run_passes_and_a_tampered_shelf_or_balance_fails_its_verification() {
    let db = TestDb::new().await;
    db.create_admin(ADMIN_EMAIL, ADMIN_PASSWORD).await;
    let server = TestServer::start(&db.url, &[]).await;
    let reports = std::env::temp_dir().join(format!("fs-load-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&reports).unwrap();
    let html = reports.join("shop.html");

    // 3 products of 15 units for 10 shoppers over 8 s: shelves run out, balances run low, refunds are decided.
    let cli = Cli::try_parse_from([
        "flashsale-load",
        "shop",
        "--base-url",
        &server.base_url,
        "--database-url",
        &db.url,
        "--admin-email",
        ADMIN_EMAIL,
        "--admin-password",
        ADMIN_PASSWORD,
        "--shelf-products",
        "3",
        "--shelf-stock",
        "15",
        "--shop-members",
        "10",
        "--points",
        "150000",
        "-u",
        "10",
        "-t",
        "8s",
        "--report-file",
        html.to_str().unwrap(),
        "--quiet",
    ])
    .unwrap();
    let Command::Shop(args) = cli.command else {
        unreachable!("parsed the shop subcommand")
    };
    let outcome = loadtest::run::shop(args).await.unwrap();
    let report = loadtest::summary::render_checks(&outcome.checks);
    assert!(outcome.passed(), "{report}");
    assert!(
        !outcome.run.orders.is_empty(),
        "no order was placed: {report}"
    );
    let ordered: i64 = db
        .client()
        .await
        .query_one(
            "SELECT COALESCE(sum(quantity), 0)::bigint FROM order_items WHERE product_id::text = ANY($1)",
            &[&outcome.run.products],
        )
        .await
        .unwrap()
        .get(0);
    assert!(ordered > 0, "{report}");
    let html_len = std::fs::metadata(&html).unwrap().len();
    assert!(html_len > 10_000, "goose's HTML report is {html_len} bytes");

    // Plant violations: a unit appears on a shelf, and a point in a balance, without an order or a ledger entry.
    let client = db.client().await;
    let product: uuid::Uuid = outcome.run.products[0].parse().unwrap();
    let member: uuid::Uuid = outcome.run.members[0].parse().unwrap();
    client
        .execute(
            "UPDATE products SET stock = stock + 1 WHERE id = $1",
            &[&product],
        )
        .await
        .unwrap();
    let checks = loadtest::run::reverify_shop(&outcome.run, &db.url)
        .await
        .unwrap();
    let failed = |checks: &[verify::Check]| -> Vec<&'static str> {
        checks
            .iter()
            .filter(|c| c.verdict == Verdict::Fail)
            .map(|c| c.name)
            .collect()
    };
    assert_eq!(failed(&checks), vec!["shelf stock conserved"]);
    client
        .execute(
            "UPDATE products SET stock = stock - 1 WHERE id = $1",
            &[&product],
        )
        .await
        .unwrap();
    client
        .execute(
            "UPDATE balances SET balance = balance + 1 WHERE member_id = $1",
            &[&member],
        )
        .await
        .unwrap();
    let checks = loadtest::run::reverify_shop(&outcome.run, &db.url)
        .await
        .unwrap();
    assert_eq!(failed(&checks), vec!["balances equal their ledgers"]);

    let _ = std::fs::remove_dir_all(&reports);
    assert!(server.terminate(std::time::Duration::from_secs(15)).await);
}

/// The burst mode on a small scale: 500 clients connected before the opening, one reservation each at it. Every
/// client is answered, the grants are the stock, the rest are told sold out, and the drop's counts add up to what
/// the clients saw. The server serves with a runtime per core (SERVE_RUNTIMES=per-core), so that path sells a
/// drop here. Then a batch of journaled holds is deleted from Postgres and the server restarted (shared runtime):
/// the drop comes back with fewer holds than the clients were granted, and the same checks fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_adds_up_and_a_deleted_hold_fails_its_accounting() {
    let db = TestDb::new().await;
    db.create_admin(ADMIN_EMAIL, ADMIN_PASSWORD).await;
    let server = TestServer::start(&db.url, &[("SERVE_RUNTIMES", "per-core")]).await;
    let pid = server.child.id().unwrap().to_string();
    let cli = Cli::try_parse_from([
        "flashsale-load",
        "burst",
        "--base-url",
        &server.base_url,
        "--admin-email",
        ADMIN_EMAIL,
        "--admin-password",
        ADMIN_PASSWORD,
        "--clients",
        "500",
        "--members",
        "10",
        "--stock",
        "40",
        "--opens-in-ms",
        "3000",
        // A debug build beside the rest of the suite: the figure that matters here is the accounting.
        "--within-ms",
        "20000",
        "--server-pid",
        &pid,
    ])
    .unwrap();
    let Command::Burst(args) = cli.command else {
        unreachable!("parsed the burst subcommand")
    };
    let mut outcome = loadtest::run::burst(args).await.unwrap();
    let shown = outcome.render();
    assert!(outcome.passed(), "{shown}");
    let report = &outcome.report;
    assert_eq!(report.answered(), 500, "{shown}");
    assert_eq!(report.with_status(201), 40, "{shown}");
    assert_eq!(report.answers.get("409 sold_out"), Some(&460), "{shown}");
    assert_eq!(report.connected_before_opening, 500, "{shown}");
    assert!(
        report.max_ms >= report.p50_ms && report.p50_ms > 0.0,
        "{shown}"
    );
    let memory = &report.servers[0];
    assert!(
        memory.rss_before_kb > 0
            && memory.rss_connected_kb > 0
            && memory.hwm_kb >= memory.rss_after_kb,
        "{shown}"
    );
    let held = report.drop.unwrap().held;
    assert_eq!(held, 40, "{shown}");

    // Plant a violation: the server drains its writer at shutdown, then one batch of journaled holds disappears.
    assert!(server.terminate(std::time::Duration::from_secs(15)).await);
    let drop: uuid::Uuid = outcome.drop_id.parse().unwrap();
    let deleted = db
        .client()
        .await
        .execute(
            "DELETE FROM hold_batches WHERE ctid = (SELECT ctid FROM hold_batches WHERE drop_id = $1 LIMIT 1)",
            &[&drop],
        )
        .await
        .unwrap();
    assert_eq!(deleted, 1);
    let restarted = TestServer::start(&db.url, &[]).await;
    loadtest::run::reverify_burst(&mut outcome, &restarted.base_url)
        .await
        .unwrap();
    let failed: Vec<&str> = outcome
        .checks
        .iter()
        .filter(|c| c.verdict == Verdict::Fail)
        .map(|c| c.name)
        .collect();
    assert!(outcome.report.drop.unwrap().held < 40);
    assert_eq!(
        failed,
        [
            "the drop's holds are the grants",
            "sold out only when nothing was left"
        ],
        "{}",
        outcome.render()
    );
    assert!(
        restarted
            .terminate(std::time::Duration::from_secs(15))
            .await
    );
}
