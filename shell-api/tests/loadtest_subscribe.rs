//! The `subscribe` scenario against the real binary: a short run, with `flashsale renew --at` rounds of two
//! processes at once while goose's members act, must pass every check; then a paid charge duplicated, an approval
//! at the gateway without a charge, or a ledger row changed behind the server's back must each fail the same
//! verification.
//!
//! It lives here rather than in `loadtest/` because it needs `flashsale` itself (`CARGO_BIN_EXE_flashsale`).
#![allow(clippy::unwrap_used)]
#![allow(
    clippy::too_many_lines,
    reason = "one scenario read top to bottom: the run, then each fault and its verdict"
)]

mod common;

use clap::Parser;
use common::{TestDb, TestServer};
use loadtest::config::{Cli, Command};
use loadtest::verify::{Check, Verdict};

const ADMIN_EMAIL: &str = "admin@load.test";
const ADMIN_PASSWORD: &str = "load-test-admin-password";

fn failed(checks: &[Check]) -> Vec<&'static str> {
    checks
        .iter()
        .filter(|c| c.verdict == Verdict::Fail)
        .map(|c| c.name)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscribe_run_passes_and_a_duplicated_charge_or_changed_ledger_fails_it() {
    let db = TestDb::new().await;
    db.create_admin(ADMIN_EMAIL, ADMIN_PASSWORD).await;
    let server = TestServer::start(&db.url, &[]).await;
    let reports = std::env::temp_dir().join(format!("fs-load-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&reports).unwrap();
    let html = reports.join("subscribe.html");
    let summary_file = reports.join("subscribe.summary.json");

    // 8 members, 6 goose users for 8 s; three rounds of two renewers 1.5 s apart, then the final round.
    let cli = Cli::try_parse_from([
        "flashsale-load",
        "subscribe",
        "--base-url",
        &server.base_url,
        "--database-url",
        &db.url,
        "--admin-email",
        ADMIN_EMAIL,
        "--admin-password",
        ADMIN_PASSWORD,
        "--flashsale-bin",
        env!("CARGO_BIN_EXE_flashsale"),
        "--subscribe-members",
        "8",
        "--renew-rounds",
        "3",
        "--renew-every-ms",
        "1500",
        "-u",
        "6",
        "-t",
        "8s",
        "--report-file",
        html.to_str().unwrap(),
        "--summary-file",
        summary_file.to_str().unwrap(),
        "--quiet",
    ])
    .unwrap();
    let Command::Subscribe(args) = cli.command else {
        unreachable!("parsed the subscribe subcommand")
    };
    let outcome = loadtest::run::subscribe(args).await.unwrap();
    let summary = &outcome.summary;
    let report = loadtest::summary::render_checks(&summary.checks);
    assert!(summary.passed, "{report}");
    assert!(!summary.run.acknowledged.is_empty(), "{report}");
    assert!(summary.facts.renewals_paid > 0, "{report}");
    // Three rounds of two and the final one; the rounds ran while goose's members acted.
    assert_eq!(summary.run.renewals.len(), 7, "{report}");
    assert!(
        summary
            .run
            .renewals
            .iter()
            .filter(|r| r.during_goose)
            .count()
            >= 2,
        "{:?}",
        summary.run.renewals
    );
    let written: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&summary_file).unwrap()).unwrap();
    assert_eq!(written["passed"], true);
    assert_eq!(
        written["checks"].as_array().map(Vec::len),
        Some(summary.checks.len())
    );

    let client = db.client().await;
    let run = &summary.run;
    // A paid charge duplicated, a second late: the period is paid twice.
    let members: Vec<uuid::Uuid> = run.members.iter().map(|m| m.parse().unwrap()).collect();
    let reopened: Vec<uuid::Uuid> = run.reopened.iter().map(|m| m.parse().unwrap()).collect();
    let copy: uuid::Uuid = client
        .query_one(
            "INSERT INTO subscription_charges (id, subscription_id, member_id, seller_id, product_id, period_start,
                 period_end, attempt, amount, currency, payment_method, status, created_at, paid_at)
             SELECT gen_random_uuid(), subscription_id, member_id, seller_id, product_id,
                    period_start + interval '1 second', period_end + interval '1 second', attempt, amount, currency,
                    payment_method, status, created_at, paid_at
             FROM subscription_charges
             WHERE id = (SELECT id FROM subscription_charges WHERE status = 'paid' AND member_id = ANY($1)
                         AND NOT subscription_id = ANY($2) LIMIT 1)
             RETURNING id",
            &[&members, &reopened],
        )
        .await
        .unwrap()
        .get(0);
    let (_, checks) = loadtest::run::reverify_subscribe(run, &db.url)
        .await
        .unwrap();
    assert!(
        failed(&checks).contains(&"one paid charge per period"),
        "{:?}",
        failed(&checks)
    );
    client
        .execute("DELETE FROM subscription_charges WHERE id = $1", &[&copy])
        .await
        .unwrap();
    let (_, checks) = loadtest::run::reverify_subscribe(run, &db.url)
        .await
        .unwrap();
    assert_eq!(failed(&checks), Vec::<&str>::new(), "the copy is gone");

    // The gateway approved a charge that no paid charge records.
    client
        .execute(
            "INSERT INTO gateway_charges (charge_key, member_id, amount, currency, outcome)
             VALUES (gen_random_uuid(), $1, 3000, 'KRW', 'approved')",
            &[&members[0]],
        )
        .await
        .unwrap();
    let (_, checks) = loadtest::run::reverify_subscribe(run, &db.url)
        .await
        .unwrap();
    assert_eq!(
        failed(&checks),
        vec!["the gateway charged each period once"]
    );
    client
        .execute(
            "UPDATE gateway_charges SET refunded = true WHERE member_id = $1 AND charge_key NOT IN (
                 SELECT id FROM subscription_charges)",
            &[&members[0]],
        )
        .await
        .unwrap();

    // A ledger row changed: a balance no longer equals its ledger.
    let changed = client
        .execute(
            "UPDATE balance_entries SET amount = amount - 1
             WHERE id = (SELECT id FROM balance_entries WHERE member_id = ANY($1) ORDER BY created_at LIMIT 1)",
            &[&members],
        )
        .await
        .unwrap();
    assert_eq!(changed, 1);
    let (_, checks) = loadtest::run::reverify_subscribe(run, &db.url)
        .await
        .unwrap();
    assert_eq!(failed(&checks), vec!["balances equal their ledgers"]);

    let _ = std::fs::remove_dir_all(&reports);
    assert!(server.terminate(std::time::Duration::from_secs(15)).await);
}
