//! The invariant checks of a drop run, as a pure function of what was observed (drop states read from the API,
//! facts read from Postgres, the harness's own tallies). No I/O here, so the checks themselves are unit-tested
//! against fabricated numbers: a consistent run passes, an oversold or undersold one fails.

use serde::Serialize;

/// A drop's counters as `GET /drops/{id}` reported them. Signed, so a negative `available` would show.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct DropCounts {
    pub stock: i64,
    pub available: i64,
    pub held: i64,
    pub sold: i64,
}

impl DropCounts {
    fn conserved(&self) -> bool {
        self.available + self.held + self.sold == self.stock
    }
}

/// What Postgres says about the drop's purchases.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct DbFacts {
    /// Purchase rows of the drop.
    pub purchase_rows: i64,
    /// Units over those rows.
    pub purchase_units: i64,
    /// Distinct reservations among those rows.
    pub distinct_reservations: i64,
    /// Members whose units in the drop exceed the per-member limit.
    pub members_over_limit: i64,
    /// Distinct `purchase_id`s the driver received with a 200 payment.
    pub acknowledged_purchases: i64,
    /// How many of those exist in the purchases table.
    pub acknowledged_found: i64,
}

/// A drop report's funnel (`GET /drops/{id}/report`, read from `drop_seconds`), or the same counted by the harness
/// from the answers it got.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ReportFunnel {
    pub reserved: i64,
    pub paid: i64,
    pub expired: i64,
    pub cancelled: i64,
    pub declined: i64,
    pub refused_sold_out: i64,
    pub refused_limit: i64,
}

/// The server's report of the drop beside the harness's own counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ReportCounts {
    pub server: ReportFunnel,
    pub harness: ReportFunnel,
}

/// Everything the checks look at.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Observations {
    /// The stock the drop was created with.
    pub stock: i64,
    /// Drop states polled during the run, the reading after holds drained last.
    pub snapshots: Vec<DropCounts>,
    /// The drop after abandoned holds were waited out (`None` if it could not be read).
    pub final_state: Option<DropCounts>,
    pub db: DbFacts,
    /// Units the driver was told were paid (200), counted once per reservation.
    pub units_acknowledged: i64,
    /// Tabs of buyers still short of the units they wanted when they stopped retrying (they saw `sold_out`).
    pub unserved_buyers: i64,
    /// The answer to a reservation attempted before `opens_at` (`None` if the probe was skipped).
    pub early_probe: Option<String>,
    /// Released holds (declined, cancelled, abandoned) read back with `GET /reservations/{id}`.
    pub released_checked: i64,
    /// Those whose status or reason was not the expected `released` + reason.
    pub released_mismatched: i64,
    /// The drop as each instance served it after the run, in instance order (`None`: it could not be read there).
    /// One entry per instance; with one instance, its `final_state`.
    pub instance_finals: Vec<Option<DropCounts>>,
    /// Server errors (5xx other than back-pressure with `Retry-After`) and calls that got no answer.
    pub server_failures: i64,
    /// The drop report's funnel beside the harness's counts (`None`: it could not be read).
    pub report: Option<ReportCounts>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Verdict {
    Pass,
    Fail,
    /// The check does not apply to this run (said why in the detail).
    Skip,
}

#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub name: &'static str,
    pub verdict: Verdict,
    pub detail: String,
}

pub(crate) fn check(name: &'static str, ok: bool, detail: String) -> Check {
    Check {
        name,
        verdict: if ok { Verdict::Pass } else { Verdict::Fail },
        detail,
    }
}

fn skip(name: &'static str, detail: impl Into<String>) -> Check {
    Check {
        name,
        verdict: Verdict::Skip,
        detail: detail.into(),
    }
}

fn show(c: &DropCounts) -> String {
    format!(
        "available {} + held {} + sold {} vs stock {}",
        c.available, c.held, c.sold, c.stock
    )
}

/// Every check, in report order. The run passes when none is `Fail`.
#[allow(
    clippy::too_many_lines,
    reason = "every check in report order, each beside the numbers it compares"
)]
pub fn verify(obs: &Observations) -> Vec<Check> {
    let mut checks = Vec::new();

    let broken: Vec<&DropCounts> = obs
        .snapshots
        .iter()
        .filter(|c| !c.conserved() || c.stock != obs.stock)
        .collect();
    checks.push(check(
        "conservation during the run",
        !obs.snapshots.is_empty() && broken.is_empty(),
        match broken.first() {
            Some(first) => format!(
                "{} of {} snapshots broken; first: {}",
                broken.len(),
                obs.snapshots.len(),
                show(first)
            ),
            None if obs.snapshots.is_empty() => "no snapshot was read".to_owned(),
            None => format!(
                "available + held + sold == {} in all {} snapshots",
                obs.stock,
                obs.snapshots.len()
            ),
        },
    ));

    let negative = obs
        .snapshots
        .iter()
        .chain(&obs.final_state)
        .filter(|c| c.available < 0 || c.held < 0 || c.sold < 0)
        .count();
    checks.push(check(
        "available never negative",
        negative == 0,
        format!("{negative} snapshot(s) with a negative counter"),
    ));

    let Some(fin) = obs.final_state else {
        checks.push(check(
            "final drop state",
            false,
            "the drop could not be read after the run".to_owned(),
        ));
        return checks;
    };
    checks.push(check(
        "final conservation",
        fin.conserved() && fin.stock == obs.stock,
        show(&fin),
    ));
    checks.push(same_on_every_instance(obs, &fin));
    checks.push(check(
        "holds drained after expiry",
        fin.held == 0 && fin.sold + fin.available == fin.stock,
        format!(
            "held {}, sold {} + available {} vs stock {}",
            fin.held, fin.sold, fin.available, fin.stock
        ),
    ));
    checks.push(check(
        "sold == min(stock, 200 payments)",
        obs.units_acknowledged <= obs.stock && fin.sold == obs.stock.min(obs.units_acknowledged),
        format!(
            "{} units paid with 200, sold {}, stock {}",
            obs.units_acknowledged, fin.sold, obs.stock
        ),
    ));

    let db = &obs.db;
    checks.push(check(
        "purchases in Postgres == sold",
        db.purchase_units == fin.sold,
        format!(
            "{} units in {} purchase rows, sold {}",
            db.purchase_units, db.purchase_rows, fin.sold
        ),
    ));
    checks.push(check(
        "one purchase per paid reservation",
        db.purchase_rows == db.distinct_reservations,
        format!(
            "{} rows, {} distinct reservations",
            db.purchase_rows, db.distinct_reservations
        ),
    ));
    checks.push(check(
        "per-member limit",
        db.members_over_limit == 0,
        format!("{} member(s) over the limit", db.members_over_limit),
    ));
    checks.push(check(
        "every 200 payment is durable",
        db.acknowledged_found == db.acknowledged_purchases,
        format!(
            "{} of {} acknowledged purchase ids found",
            db.acknowledged_found, db.acknowledged_purchases
        ),
    ));

    checks.push(if obs.unserved_buyers > 0 {
        check(
            "no undersell",
            fin.sold == fin.stock,
            format!(
                "{} buyer(s) turned away; sold {} of {}",
                obs.unserved_buyers, fin.sold, fin.stock
            ),
        )
    } else {
        skip(
            "no undersell",
            "demand did not exceed stock: no buyer was turned away",
        )
    });

    checks.push(check(
        "no unexpected 5xx",
        obs.server_failures == 0,
        format!(
            "{} server error(s) or unanswered call(s) (429/503 with Retry-After is back-pressure, retried)",
            obs.server_failures
        ),
    ));

    checks.push(match &obs.early_probe {
        Some(answer) => check(
            "closed before opens_at",
            answer == "409 not_open",
            format!("a reservation before opens_at got {answer}"),
        ),
        None => skip(
            "closed before opens_at",
            "too little time before opens_at to probe",
        ),
    });

    checks.push(if obs.released_checked > 0 {
        check(
            "released holds carry their reason",
            obs.released_mismatched == 0,
            format!(
                "{} of {} declined/cancelled/expired holds read back wrong",
                obs.released_mismatched, obs.released_checked
            ),
        )
    } else {
        skip(
            "released holds carry their reason",
            "no hold was declined, cancelled or abandoned",
        )
    });

    checks.push(match obs.report {
        None => skip("the drop report matches the run", "the report could not be read"),
        Some(report) => check(
            "the drop report matches the run",
            report.server == report.harness,
            format!(
                "server {} / harness {} (reserved, paid, expired, cancelled, declined, refused sold out, refused \
                 over the limit; refusals for overload are not compared: the harness retries them)",
                show_funnel(&report.server),
                show_funnel(&report.harness)
            ),
        ),
    });
    checks
}

/// Every instance serves the drop after the run, conserved, with the counts of the final reading.
fn same_on_every_instance(obs: &Observations, fin: &DropCounts) -> Check {
    const NAME: &str = "same counts on every instance";
    let n = obs.instance_finals.len();
    if n <= 1 {
        return skip(NAME, "one instance: see final conservation");
    }
    let wrong: Vec<String> = obs
        .instance_finals
        .iter()
        .enumerate()
        .filter_map(|(i, reading)| match reading {
            None => Some(format!("instance {}: not readable", i + 1)),
            Some(c) if !c.conserved() || c.stock != obs.stock || c != fin => {
                Some(format!("instance {}: {}", i + 1, show(c)))
            }
            Some(_) => None,
        })
        .collect();
    check(
        NAME,
        wrong.is_empty(),
        if wrong.is_empty() {
            format!("{n} instances, each: {}", show(fin))
        } else {
            format!(
                "{} of {n} instances differ from {}: {}",
                wrong.len(),
                show(fin),
                wrong.join("; ")
            )
        },
    )
}

/// True when no check failed.
pub fn passed(checks: &[Check]) -> bool {
    checks.iter().all(|c| c.verdict != Verdict::Fail)
}

/// A Postgres connection for reading a run's facts afterwards (`--database-url`), bounded by `timeout`; abort the
/// task when done.
pub async fn connect(
    database_url: &str,
    timeout: std::time::Duration,
) -> anyhow::Result<(tokio_postgres::Client, tokio::task::JoinHandle<()>)> {
    use anyhow::Context;
    let (client, connection) = tokio::time::timeout(
        timeout,
        tokio_postgres::connect(database_url, tokio_postgres::NoTls),
    )
    .await
    .context("connecting to Postgres timed out")?
    .context("connecting to Postgres (--database-url)")?;
    let connection = tokio::spawn(async move {
        // The connection ends with an error when the task is aborted or the server goes; the reads then fail.
        let _ = connection.await;
    });
    Ok((client, connection))
}

fn show_funnel(f: &ReportFunnel) -> String {
    format!(
        "{}/{}/{}/{}/{}/{}/{}",
        f.reserved, f.paid, f.expired, f.cancelled, f.declined, f.refused_sold_out, f.refused_limit
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const STOCK: i64 = 200;

    fn counts(available: i64, held: i64, sold: i64) -> DropCounts {
        DropCounts {
            stock: STOCK,
            available,
            held,
            sold,
        }
    }

    /// A sold-out run: 200 sold, 150 of them acknowledged in the spike and 50 to buyers who came back.
    fn consistent() -> Observations {
        Observations {
            stock: STOCK,
            snapshots: vec![
                counts(200, 0, 0),
                counts(0, 180, 20),
                counts(15, 40, 145),
                counts(0, 0, 200),
            ],
            final_state: Some(counts(0, 0, 200)),
            db: DbFacts {
                purchase_rows: 200,
                purchase_units: 200,
                distinct_reservations: 200,
                members_over_limit: 0,
                acknowledged_purchases: 200,
                acknowledged_found: 200,
            },
            units_acknowledged: 200,
            unserved_buyers: 600,
            early_probe: Some("409 not_open".to_owned()),
            released_checked: 50,
            released_mismatched: 0,
            instance_finals: vec![Some(counts(0, 0, 200)); 3],
            server_failures: 0,
            report: Some(ReportCounts {
                server: funnel(),
                harness: funnel(),
            }),
        }
    }

    fn funnel() -> ReportFunnel {
        ReportFunnel {
            reserved: 260,
            paid: 200,
            expired: 30,
            cancelled: 20,
            declined: 10,
            refused_sold_out: 900,
            refused_limit: 0,
        }
    }

    #[test]
    fn a_report_that_differs_from_the_run_fails() {
        assert_eq!(
            verdict(&verify(&consistent()), "the drop report matches the run"),
            Verdict::Pass
        );
        let mut obs = consistent();
        if let Some(report) = obs.report.as_mut() {
            report.server.paid -= 1;
        }
        assert_eq!(failed(&obs), vec!["the drop report matches the run"]);
        obs.report = None;
        assert_eq!(
            verdict(&verify(&obs), "the drop report matches the run"),
            Verdict::Skip
        );
    }

    fn verdict(checks: &[Check], name: &str) -> Verdict {
        checks
            .iter()
            .find(|c| c.name == name)
            .map(|c| c.verdict)
            .unwrap()
    }

    fn failed(obs: &Observations) -> Vec<&'static str> {
        verify(obs)
            .into_iter()
            .filter(|c| c.verdict == Verdict::Fail)
            .map(|c| c.name)
            .collect()
    }

    #[test]
    fn a_consistent_run_passes() {
        let checks = verify(&consistent());
        assert!(passed(&checks), "{checks:#?}");
        assert!(checks.iter().all(|c| c.verdict == Verdict::Pass));
    }

    #[test]
    fn an_oversold_snapshot_fails() {
        let mut obs = consistent();
        obs.snapshots.push(counts(1, 0, 200));
        assert_eq!(failed(&obs), ["conservation during the run"]);
        assert!(!passed(&verify(&obs)));
    }

    #[test]
    fn an_oversold_final_state_fails() {
        let mut obs = consistent();
        obs.final_state = Some(counts(0, 0, 201));
        obs.db.purchase_rows = 201;
        obs.db.purchase_units = 201;
        obs.db.distinct_reservations = 201;
        let failed = failed(&obs);
        assert!(failed.contains(&"final conservation"), "{failed:?}");
        assert!(failed.contains(&"holds drained after expiry"), "{failed:?}");
    }

    #[test]
    fn more_acknowledged_payments_than_stock_fail() {
        let mut obs = consistent();
        obs.units_acknowledged = STOCK + 1;
        assert_eq!(failed(&obs), ["sold == min(stock, 200 payments)"]);
        // Fewer 200s than units sold: a sale nobody was told of.
        obs.units_acknowledged = STOCK - 1;
        assert_eq!(failed(&obs), ["sold == min(stock, 200 payments)"]);
    }

    #[test]
    fn a_negative_available_fails() {
        let mut obs = consistent();
        obs.snapshots.push(counts(-1, 1, 200));
        assert!(failed(&obs).contains(&"available never negative"));
    }

    #[test]
    fn purchases_that_disagree_with_sold_fail() {
        let mut obs = consistent();
        obs.db.purchase_units = 199;
        obs.db.purchase_rows = 199;
        obs.db.distinct_reservations = 199;
        assert_eq!(failed(&obs), ["purchases in Postgres == sold"]);
    }

    #[test]
    fn two_purchases_for_one_reservation_fail() {
        let mut obs = consistent();
        obs.db.distinct_reservations = 199;
        assert_eq!(failed(&obs), ["one purchase per paid reservation"]);
    }

    #[test]
    fn a_member_over_the_limit_fails() {
        let mut obs = consistent();
        obs.db.members_over_limit = 1;
        assert_eq!(failed(&obs), ["per-member limit"]);
    }

    #[test]
    fn an_acknowledged_purchase_missing_from_postgres_fails() {
        let mut obs = consistent();
        obs.db.acknowledged_found = 199;
        assert_eq!(failed(&obs), ["every 200 payment is durable"]);
    }

    #[test]
    fn holds_left_after_expiry_fail() {
        let mut obs = consistent();
        obs.final_state = Some(counts(0, 10, 190));
        obs.db.purchase_units = 190;
        obs.db.purchase_rows = 190;
        obs.db.distinct_reservations = 190;
        obs.units_acknowledged = 190;
        let failed = failed(&obs);
        assert!(failed.contains(&"holds drained after expiry"), "{failed:?}");
        assert!(failed.contains(&"no undersell"), "{failed:?}");
    }

    #[test]
    fn undersell_fails_only_when_buyers_were_turned_away() {
        let mut obs = consistent();
        obs.final_state = Some(counts(10, 0, 190));
        obs.snapshots.push(counts(10, 0, 190));
        obs.instance_finals = vec![obs.final_state; 3];
        obs.db.purchase_units = 190;
        obs.db.purchase_rows = 190;
        obs.db.distinct_reservations = 190;
        obs.db.acknowledged_purchases = 190;
        obs.db.acknowledged_found = 190;
        obs.units_acknowledged = 190;
        assert_eq!(failed(&obs), ["no undersell"]);

        obs.unserved_buyers = 0;
        let checks = verify(&obs);
        assert!(passed(&checks), "{checks:#?}");
        assert_eq!(verdict(&checks, "no undersell"), Verdict::Skip);
    }

    #[test]
    fn a_reservation_before_opens_at_fails() {
        let mut obs = consistent();
        obs.early_probe = Some("201".to_owned());
        assert_eq!(failed(&obs), ["closed before opens_at"]);
        obs.early_probe = None;
        assert_eq!(
            verdict(&verify(&obs), "closed before opens_at"),
            Verdict::Skip
        );
    }

    #[test]
    fn an_unexpected_server_error_fails() {
        let mut obs = consistent();
        obs.server_failures = 1;
        assert_eq!(failed(&obs), ["no unexpected 5xx"]);
    }

    #[test]
    fn a_released_hold_with_the_wrong_reason_fails() {
        let mut obs = consistent();
        obs.released_mismatched = 1;
        assert_eq!(failed(&obs), ["released holds carry their reason"]);
    }

    #[test]
    fn an_instance_that_serves_other_counts_fails() {
        let mut obs = consistent();
        obs.instance_finals[2] = Some(counts(1, 0, 199));
        assert_eq!(failed(&obs), ["same counts on every instance"]);
        let mut obs = consistent();
        obs.instance_finals[1] = None;
        assert_eq!(failed(&obs), ["same counts on every instance"]);
        let mut obs = consistent();
        obs.instance_finals[0] = Some(counts(1, 0, 200));
        assert_eq!(failed(&obs), ["same counts on every instance"]);
    }

    #[test]
    fn one_instance_skips_the_agreement_check() {
        let mut obs = consistent();
        obs.instance_finals = vec![obs.final_state];
        let checks = verify(&obs);
        assert!(passed(&checks), "{checks:#?}");
        assert_eq!(
            verdict(&checks, "same counts on every instance"),
            Verdict::Skip
        );
    }

    #[test]
    fn no_snapshots_or_no_final_state_fail() {
        let mut obs = consistent();
        obs.snapshots.clear();
        assert_eq!(failed(&obs), ["conservation during the run"]);
        let mut obs = consistent();
        obs.final_state = None;
        assert_eq!(failed(&obs), ["final drop state"]);
    }
}
