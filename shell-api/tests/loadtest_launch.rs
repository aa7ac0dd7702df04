//! The fair launches through the load harness against the real binary: a short goose `queue` run and a short
//! `draw` run must pass every check; then a violation planted in Postgres behind the server's back (a hold nobody
//! was admitted for; a winner off the ranking) must make the same checks fail.
//!
//! Beside `loadtest_drop.rs`, for the same reason: it needs `flashsale` itself (`CARGO_BIN_EXE_flashsale`).
#![allow(clippy::unwrap_used)]

mod common;

use clap::Parser;
use common::{TestDb, TestServer};
use loadtest::config::{Cli, Command};
use loadtest::verify::{self, Verdict};

const ADMIN_EMAIL: &str = "admin@launch.test";
const ADMIN_PASSWORD: &str = "launch-test-admin-password";

async fn create_admin(db: &TestDb) {
    db.create_admin(ADMIN_EMAIL, ADMIN_PASSWORD).await;
}

/// The command line of a short run of `mode` against `server`, with `extra` options.
fn command(
    mode: &str,
    server: &TestServer,
    db: &TestDb,
    report: &std::path::Path,
    extra: &[&str],
) -> Command {
    let mut args = vec![
        "flashsale-load",
        mode,
        "--base-url",
        &server.base_url,
        "--database-url",
        &db.url,
        "--admin-email",
        ADMIN_EMAIL,
        "--admin-password",
        ADMIN_PASSWORD,
        "--buyers",
        "40",
        "--hold-seconds",
        "2",
        "--opens-in-ms",
        "2500",
        "--poll-ms",
        "100",
        "--report-file",
        report.to_str().unwrap(),
        "--quiet",
    ];
    args.extend_from_slice(extra);
    Cli::try_parse_from(args).unwrap().command
}

fn failed(checks: &[verify::Check]) -> Vec<&'static str> {
    checks
        .iter()
        .filter(|c| c.verdict == Verdict::Fail)
        .map(|c| c.name)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_run_passes_and_a_hold_without_a_pass_fails_its_verification() {
    let db = TestDb::new().await;
    create_admin(&db).await;
    let server = TestServer::start(
        &db.url,
        &[("REAPER_INTERVAL_MS", "200"), ("QUEUE_TICK_MS", "50")],
    )
    .await;
    let report =
        std::env::temp_dir().join(format!("fs-queue-{}.html", uuid::Uuid::new_v4().simple()));

    // 40 members for 10 units: a fifth join before the opening; passes abandoned, holds cancelled and declined send
    // units back to the line, and the rest are told sold_out.
    let Command::Queue(args) = command(
        "queue",
        &server,
        &db,
        &report,
        &[
            "--stock",
            "10",
            "--pass-seconds",
            "2",
            "--pre-share",
            "0.2",
            "--late-join-ms",
            "800",
        ],
    ) else {
        unreachable!("parsed the queue subcommand")
    };
    let outcome = loadtest::run::queue(args).await.unwrap();
    let summary = &outcome.summary;
    let text = summary.render();
    assert!(summary.passed, "{text}");
    for name in [
        "no reservation without a pass",
        "admission order equals the published order",
        "first come first served after the opening, the pre-queue first",
        "everyone waiting told sold_out within 1 s",
        "a live pass finds a unit",
    ] {
        let verdict = summary
            .checks
            .iter()
            .find(|c| c.name == name)
            .map(|c| c.verdict);
        assert_eq!(verdict, Some(Verdict::Pass), "{name}\n{text}");
    }

    // Plant a hold of a member who was never admitted.
    let drop: uuid::Uuid = summary.drop_id.as_deref().unwrap().parse().unwrap();
    db.client()
        .await
        .execute(
            "INSERT INTO reservations (id, drop_id, member_id, quantity, status, reason, created_at, expires_at, \
             updated_at) VALUES ($1, $2, $3, 1, 'released', 'cancelled', now(), now(), now())",
            &[&uuid::Uuid::new_v4(), &drop, &uuid::Uuid::new_v4()],
        )
        .await
        .unwrap();
    let (checks, _) = loadtest::run::judge_launch(&outcome.run).await.unwrap();
    assert_eq!(failed(&checks), vec!["no reservation without a pass"]);

    let _ = std::fs::remove_file(&report);
    assert!(server.terminate(std::time::Duration::from_secs(15)).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draw_run_passes_and_a_winner_off_the_ranking_fails_its_verification() {
    let db = TestDb::new().await;
    create_admin(&db).await;
    let server = TestServer::start(&db.url, &[("REAPER_INTERVAL_MS", "200")]).await;
    let report =
        std::env::temp_dir().join(format!("fs-draw-{}.html", uuid::Uuid::new_v4().simple()));

    // 40 members for 8 units: some withdraw, winners pay, are declined, cancel or let the hold expire, and the
    // units go down the ranking until the drop is sold out and the waitlist loses.
    let Command::Draw(args) = command(
        "draw",
        &server,
        &db,
        &report,
        &[
            "--stock",
            "8",
            "--entry-window-ms",
            "1500",
            "--closes-after-ms",
            "60000",
        ],
    ) else {
        unreachable!("parsed the draw subcommand")
    };
    let outcome = loadtest::run::draw(args).await.unwrap();
    let summary = &outcome.summary;
    let text = summary.render();
    assert!(summary.passed, "{text}");
    assert!(
        summary.figures["lost"].as_u64().unwrap() > 0,
        "the waitlist lost once sold out: {text}"
    );

    // Plant a winner off the ranking: the last-ranked entry marked won.
    let drop: uuid::Uuid = summary.drop_id.as_deref().unwrap().parse().unwrap();
    let changed = db
        .client()
        .await
        .execute(
            "UPDATE drop_entries SET status = 'won' WHERE drop_id = $1 \
             AND rank = (SELECT max(rank) FROM drop_entries WHERE drop_id = $1)",
            &[&drop],
        )
        .await
        .unwrap();
    assert_eq!(changed, 1);
    let (checks, _) = loadtest::run::judge_launch(&outcome.run).await.unwrap();
    let failed = failed(&checks);
    assert!(failed.contains(&"winners follow the ranking"), "{failed:?}");

    let _ = std::fs::remove_file(&report);
    assert!(server.terminate(std::time::Duration::from_secs(15)).await);
}
