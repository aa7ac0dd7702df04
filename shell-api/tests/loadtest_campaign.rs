//! The load harness's `campaign` scenario against the real binary: a short run, one campaign funded and one not,
//! must pass every check once the server's own campaign loop has decided both and refunded the unfunded one; then
//! the same verification must fail once, behind the server's back, a refund is removed from the gateway's history
//! or from Postgres, a refund is paid twice at the gateway, or a purchase of the funded campaign is marked refunded.
//!
//! It lives here rather than in `loadtest/` because it needs `flashsale` itself (`CARGO_BIN_EXE_flashsale`).
#![allow(clippy::unwrap_used)]
#![allow(
    clippy::too_many_lines,
    reason = "each test is one scenario read top to bottom: its setup, the load, and every planted fault"
)]

mod common;

use clap::Parser;
use common::{TestDb, TestServer};
use loadtest::config::{Cli, Command};
use loadtest::verify::{Check, Verdict};
use uuid::Uuid;

const ADMIN_EMAIL: &str = "admin@campaign-load.test";
const ADMIN_PASSWORD: &str = "campaign-load-admin-password";

fn failed(checks: &[Check]) -> Vec<&'static str> {
    checks
        .iter()
        .filter(|c| c.verdict == Verdict::Fail)
        .map(|c| c.name)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_campaign_run_passes_and_a_removed_duplicated_or_invented_refund_fails_it() {
    let db = TestDb::new().await;
    db.create_admin(ADMIN_EMAIL, ADMIN_PASSWORD).await;
    // The gateway's refunds kept in Postgres, where the harness reads them; the campaign loop every 100 ms.
    let server = TestServer::start(
        &db.url,
        &[
            ("SIMULATED_GATEWAY_LEDGER", "true"),
            ("CAMPAIGN_TICK_MS", "100"),
            ("REAPER_INTERVAL_MS", "200"),
        ],
    )
    .await;
    let reports = std::env::temp_dir().join(format!("fs-load-{}", Uuid::new_v4().simple()));
    std::fs::create_dir_all(&reports).unwrap();
    let summary_file = reports.join("campaign.summary.json");

    // 24 buyers: all go for 10 units (goal 6), 6 of them also for a campaign whose goal is 8.
    let cli = Cli::try_parse_from([
        "flashsale-load",
        "campaign",
        "--base-url",
        &server.base_url,
        "--database-url",
        &db.url,
        "--admin-email",
        ADMIN_EMAIL,
        "--admin-password",
        ADMIN_PASSWORD,
        "--buyers",
        "24",
        "--funded-stock",
        "10",
        "--funded-goal",
        "6",
        "--unfunded-stock",
        "10",
        "--unfunded-goal",
        "8",
        "--unfunded-buyers",
        "6",
        "--cancel-rate",
        "0.2",
        "--decline-rate",
        "0.2",
        "--opens-in-ms",
        "1500",
        "--campaign-seconds",
        "3",
        "--close-wait-seconds",
        "20",
        "--report-file",
        reports.join("campaign.html").to_str().unwrap(),
        "--summary-file",
        summary_file.to_str().unwrap(),
        "--threshold",
        "error-rate<1%",
        "--quiet",
    ])
    .unwrap();
    let Command::Campaign(args) = cli.command else {
        unreachable!("parsed the campaign subcommand")
    };
    let (summary, run) = loadtest::run::campaign_run(args).await.unwrap();
    let report = loadtest::campaign::render(&summary);
    assert!(summary.passed, "{report}");
    let [funded, unfunded] = [
        &summary.observations.campaigns[0],
        &summary.observations.campaigns[1],
    ];
    // Refused buyers waited for the two cancelled units (one in five of the ten holds at the opening): the funded
    // one sold out; the other sold to 5 of its 6 buyers (one in five declined).
    assert_eq!(funded.sold, 10, "{report}");
    assert_eq!(summary.outcomes[0].cancelled, 2, "{report}");
    assert_eq!(unfunded.sold, 5, "{report}");
    assert_eq!(unfunded.gateway_refunds, unfunded.sold, "{report}");
    let written: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&summary_file).unwrap()).unwrap();
    assert_eq!(written["passed"], true);
    assert_eq!(written["drop_id"], funded.drop_id.as_str());

    let client = db.client().await;
    let unfunded_drop: Uuid = unfunded.drop_id.parse().unwrap();
    let funded_drop: Uuid = funded.drop_id.parse().unwrap();
    let reverify = || async {
        loadtest::run::reverify_campaign(&run, &db.url)
            .await
            .unwrap()
    };
    assert!(failed(&reverify().await).is_empty());

    // 1. A refund disappears from the gateway's history.
    let gone = client
        .query_one(
            "DELETE FROM simulated_gateway_refunds WHERE refund_id =
                 (SELECT id FROM purchases WHERE drop_id = $1 ORDER BY id LIMIT 1)
             RETURNING refund_id, charge_key, amount",
            &[&unfunded_drop],
        )
        .await
        .unwrap();
    assert_eq!(
        failed(&reverify().await),
        ["unfunded refunded once (gateway)"]
    );
    let (refund_id, charge_key, amount): (Uuid, Uuid, i64) =
        (gone.get(0), gone.get(1), gone.get(2));
    client
        .execute(
            "INSERT INTO simulated_gateway_refunds (refund_id, charge_key, amount) VALUES ($1, $2, $3)",
            &[&refund_id, &charge_key, &amount],
        )
        .await
        .unwrap();
    assert!(failed(&reverify().await).is_empty());

    // 2. The gateway pays one refund twice (under a second refund id).
    let twice = Uuid::now_v7();
    client
        .execute(
            "INSERT INTO simulated_gateway_refunds (refund_id, charge_key, amount) VALUES ($1, $2, $3)",
            &[&twice, &charge_key, &amount],
        )
        .await
        .unwrap();
    assert_eq!(
        failed(&reverify().await),
        ["unfunded refunded once (gateway)"]
    );
    client
        .execute(
            "DELETE FROM simulated_gateway_refunds WHERE refund_id = $1",
            &[&twice],
        )
        .await
        .unwrap();

    // 3. The server's own record of a refund disappears: the purchase reads `paid` again.
    let record = client
        .query_one(
            "DELETE FROM purchase_refunds WHERE purchase_id = $1 RETURNING refunded_at, created_at",
            &[&refund_id],
        )
        .await
        .unwrap();
    assert_eq!(
        failed(&reverify().await),
        [
            "unfunded refunded once (Postgres)",
            "buyers read their purchases' outcome"
        ]
    );
    let (refunded_at, created_at): (chrono::DateTime<chrono::Utc>, chrono::DateTime<chrono::Utc>) =
        (record.get(0), record.get(1));
    client
        .execute(
            "INSERT INTO purchase_refunds (purchase_id, drop_id, member_id, charge_key, amount, currency,
                                           created_at, refunded_at)
             SELECT id, drop_id, member_id, reservation_id, amount, currency, $2, $3 FROM purchases WHERE id = $1",
            &[&refund_id, &created_at, &refunded_at],
        )
        .await
        .unwrap();
    assert!(failed(&reverify().await).is_empty());

    // 4. A purchase of the funded campaign is marked refunded.
    client
        .execute(
            "INSERT INTO purchase_refunds (purchase_id, drop_id, member_id, charge_key, amount, currency,
                                           created_at, refunded_at)
             SELECT id, drop_id, member_id, reservation_id, amount, currency, now(), now()
             FROM purchases WHERE drop_id = $1 ORDER BY id LIMIT 1",
            &[&funded_drop],
        )
        .await
        .unwrap();
    assert_eq!(
        failed(&reverify().await),
        [
            "funded never refunded",
            "buyers read their purchases' outcome"
        ]
    );

    let _ = std::fs::remove_dir_all(&reports);
    assert!(server.terminate(std::time::Duration::from_secs(15)).await);
}
