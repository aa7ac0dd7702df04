//! The `campaign` scenario's checks, a pure function of what `observe.rs` read (unit-tested on fabricated facts:
//! a consistent run passes, each broken guarantee fails its own check), and its summary, printed after goose's
//! tables and written as JSON with `--summary-file`.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::{CampaignDrop, Goal, Outcomes};
use crate::config::CampaignSettings;
use crate::setup::rfc3339;
use crate::summary::{render_checks, tallies};
use crate::verify::{check, Check, DropCounts};

/// A campaign's drop as one instance served it after the run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ApiDrop {
    pub counts: DropCounts,
    pub status: String,
    pub campaign: Option<String>,
}

/// What Postgres and the API say about one campaign after the run.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct CampaignFacts {
    /// The outcome it was set up for.
    pub goal: Goal,
    pub drop_id: String,
    pub stock: i64,
    pub goal_units: i64,
    /// `drops.sold`.
    pub sold: i64,
    /// `drops.campaign`.
    pub state: Option<String>,
    /// `campaign_closed_at` is set: the close decided it.
    pub closed: bool,
    /// `refunds_done_at` is set: every purchase has its refund.
    pub refunds_done: bool,
    pub purchase_rows: i64,
    pub purchase_units: i64,
    /// Distinct members among the purchases.
    pub buyers: i64,
    /// Purchases answered 200, and how many of them are stored.
    pub acknowledged: i64,
    pub acknowledged_found: i64,
    /// Holds answered 201, and how many are stored in the state their buyer left them (paid or released).
    pub holds_acknowledged: i64,
    pub holds_found: i64,
    /// The server's refund records (`purchase_refunds`) for the campaign's purchases, and those refunded in full
    /// under the purchase's charge.
    pub refund_rows: i64,
    pub refunded_in_full: i64,
    /// Refunds the gateway paid against the campaign's charges, and purchases it refunded exactly once in full.
    pub gateway_refunds: i64,
    pub gateway_refunded_once: i64,
    /// Refunds in the gateway's ledger, all campaigns (0: the servers do not keep one).
    pub gateway_ledger_rows: i64,
    pub funded_notices: i64,
    pub funded_notified: i64,
    pub unfunded_notices: i64,
    pub unfunded_notified: i64,
    /// Members told about the campaign's outcome who bought nothing from it.
    pub notified_non_buyers: i64,
    /// The drop on each instance (`None`: it could not be read there).
    pub instances: Vec<Option<ApiDrop>>,
    /// Acknowledged purchases read back through the API, and those that did not say what the outcome implies.
    pub purchases_read: i64,
    pub purchases_misread: i64,
}

/// Everything the checks look at: the funded campaign's facts, then the unfunded one's.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Observations {
    pub campaigns: Vec<CampaignFacts>,
    /// How long after the goose run the servers took to decide both and finish the refunds (or the wait gave up).
    pub waited_for_outcome_ms: u64,
    /// Server errors (5xx other than back-pressure) and calls that got no answer, during the run.
    pub server_failures: i64,
}

impl CampaignFacts {
    fn ended_as_set_up(&self) -> bool {
        let reached = self.sold >= self.goal_units;
        self.closed
            && self.state.as_deref() == Some(self.goal.state())
            && match self.goal {
                Goal::Funded => reached,
                Goal::Unfunded => !reached && self.refunds_done,
            }
    }

    /// Every instance serves the outcome, closed, conserved, nothing held, with Postgres's `sold`.
    fn served_everywhere(&self) -> bool {
        !self.instances.is_empty()
            && self.instances.iter().all(|read| {
                read.as_ref().is_some_and(|d| {
                    let c = &d.counts;
                    d.campaign.as_deref() == Some(self.goal.state())
                        && d.status == "closed"
                        && c.available + c.held + c.sold == c.stock
                        && c.held == 0
                        && c.sold == self.sold
                })
            })
    }

    /// The refund figures of an unfunded campaign: exactly one, in full, per purchase, and something to refund.
    fn refunded_once(&self, recorded: i64, in_full: i64) -> bool {
        self.purchase_rows > 0 && recorded == self.purchase_rows && in_full == self.purchase_rows
    }

    fn told_once(&self) -> bool {
        let (told, told_members, other) = match self.goal {
            Goal::Funded => (
                self.funded_notices,
                self.funded_notified,
                self.unfunded_notices,
            ),
            Goal::Unfunded => (
                self.unfunded_notices,
                self.unfunded_notified,
                self.funded_notices,
            ),
        };
        self.buyers > 0
            && told == self.buyers
            && told_members == self.buyers
            && other == 0
            && self.notified_non_buyers == 0
    }

    fn label(&self) -> &'static str {
        self.goal.state()
    }
}

/// Both campaigns' details of one check, as one line.
fn both(campaigns: &[CampaignFacts], detail: impl Fn(&CampaignFacts) -> String) -> String {
    campaigns
        .iter()
        .map(|c| format!("{}: {}", c.label(), detail(c)))
        .collect::<Vec<_>>()
        .join("; ")
}

fn of(campaigns: &[CampaignFacts], goal: Goal) -> Option<&CampaignFacts> {
    campaigns.iter().find(|c| c.goal == goal)
}

/// Every check, in report order. The run passes when none is `Fail`.
#[allow(
    clippy::too_many_lines,
    reason = "every check in report order, each beside the numbers it compares"
)]
pub fn verify(obs: &Observations) -> Vec<Check> {
    let all = &obs.campaigns;
    let each = |ok: fn(&CampaignFacts) -> bool| all.len() == 2 && all.iter().all(ok);
    let funded = of(all, Goal::Funded);
    let unfunded = of(all, Goal::Unfunded);
    let mut checks = vec![
        check(
            "each campaign ended as set up",
            each(CampaignFacts::ended_as_set_up),
            both(all, |c| {
                format!(
                    "{} (closed {}, refunds done {}), sold {} of goal {}",
                    c.state.as_deref().unwrap_or("no campaign"),
                    c.closed,
                    c.refunds_done,
                    c.sold,
                    c.goal_units
                )
            }),
        ),
        check(
            "every instance serves the outcome",
            each(CampaignFacts::served_everywhere),
            both(all, |c| {
                c.instances
                    .iter()
                    .map(|read| match read {
                        Some(d) => format!(
                            "{} {} {}+{}+{}",
                            d.campaign.as_deref().unwrap_or("-"),
                            d.status,
                            d.counts.available,
                            d.counts.held,
                            d.counts.sold
                        ),
                        None => "unreadable".to_owned(),
                    })
                    .collect::<Vec<_>>()
                    .join(", ")
            }),
        ),
        check(
            "sold <= stock, purchases == sold",
            each(|c| c.sold <= c.stock && c.purchase_units == c.sold),
            both(all, |c| {
                format!(
                    "sold {} of {}, {} units in {} purchase rows",
                    c.sold, c.stock, c.purchase_units, c.purchase_rows
                )
            }),
        ),
        check(
            "every 200 payment is durable",
            each(|c| c.acknowledged_found == c.acknowledged),
            both(all, |c| {
                format!("{} of {} found", c.acknowledged_found, c.acknowledged)
            }),
        ),
        check(
            "every 201 hold is stored as settled",
            each(|c| c.holds_found == c.holds_acknowledged),
            both(all, |c| {
                format!("{} of {} found", c.holds_found, c.holds_acknowledged)
            }),
        ),
    ];
    let ledger_hint = |c: &CampaignFacts| {
        if c.gateway_ledger_rows == 0 {
            " (the gateway's ledger is empty: do the servers run with SIMULATED_GATEWAY_LEDGER=true?)"
        } else {
            ""
        }
    };
    checks.push(match unfunded {
        Some(c) => check(
            "unfunded refunded once (Postgres)",
            c.refunded_once(c.refund_rows, c.refunded_in_full),
            format!(
                "{} purchases: {} refund records, {} refunded in full under their charge",
                c.purchase_rows, c.refund_rows, c.refunded_in_full
            ),
        ),
        None => check(
            "unfunded refunded once (Postgres)",
            false,
            "no unfunded campaign".to_owned(),
        ),
    });
    checks.push(match unfunded {
        Some(c) => check(
            "unfunded refunded once (gateway)",
            c.refunded_once(c.gateway_refunds, c.gateway_refunded_once),
            format!(
                "{} purchases: {} refunds paid by the gateway, {} purchases refunded exactly once in full{}",
                c.purchase_rows,
                c.gateway_refunds,
                c.gateway_refunded_once,
                ledger_hint(c)
            ),
        ),
        None => check("unfunded refunded once (gateway)", false, "no unfunded campaign".to_owned()),
    });
    checks.push(match funded {
        Some(c) => check(
            "funded never refunded",
            c.purchase_rows > 0 && c.refund_rows == 0 && c.gateway_refunds == 0,
            format!(
                "{} purchases: {} refund records, {} refunds paid by the gateway",
                c.purchase_rows, c.refund_rows, c.gateway_refunds
            ),
        ),
        None => check(
            "funded never refunded",
            false,
            "no funded campaign".to_owned(),
        ),
    });
    checks.push(check(
        "each buyer told the outcome once",
        each(CampaignFacts::told_once),
        both(all, |c| {
            format!(
                "{} buyers; campaign_funded {} to {}, campaign_unfunded {} to {}, {} told without buying",
                c.buyers,
                c.funded_notices,
                c.funded_notified,
                c.unfunded_notices,
                c.unfunded_notified,
                c.notified_non_buyers
            )
        }),
    ));
    checks.push(check(
        "buyers read their purchases' outcome",
        each(|c| c.purchases_read > 0 && c.purchases_misread == 0),
        both(all, |c| {
            format!(
                "{} of {} read back wrong",
                c.purchases_misread, c.purchases_read
            )
        }),
    ));
    checks.push(check(
        "no server errors",
        obs.server_failures == 0,
        format!("{} 5xx or unanswered calls", obs.server_failures),
    ));
    checks
}

/// Everything the summary says, also written as JSON with `--summary-file`.
#[derive(Debug, Serialize)]
pub struct CampaignSummary {
    pub scenario: &'static str,
    pub passed: bool,
    /// The funded campaign, whose drop report `scripts/demo.sh` saves.
    pub drop_id: String,
    pub campaigns: Vec<CampaignDrop>,
    pub opens_at: DateTime<Utc>,
    pub closes_at: DateTime<Utc>,
    pub settings: CampaignSettings,
    /// What the buyers of each campaign did, funded first.
    pub outcomes: Vec<Outcomes>,
    pub unexpected: BTreeMap<String, u64>,
    pub observations: Observations,
    pub checks: Vec<Check>,
    pub thresholds_failed: Vec<String>,
    pub report_files: Vec<String>,
}

/// The human-readable summary.
pub fn render(s: &CampaignSummary) -> String {
    let mut out = String::new();
    // Writing to a String cannot fail.
    let mut line = |text: String| {
        let _ = writeln!(out, "{text}");
    };
    line(String::new());
    line(format!(
        "flashsale-load {}: {}",
        s.scenario,
        if s.passed { "PASS" } else { "FAIL" }
    ));
    line(format!(
        "  {} buyers; both open {} and close {}; decided and refunded {:.1} s after goose ended",
        s.settings.buyers,
        rfc3339(s.opens_at),
        rfc3339(s.closes_at),
        s.observations.waited_for_outcome_ms as f64 / 1000.0
    ));
    for (created, o) in s.campaigns.iter().zip(&s.outcomes) {
        let facts = of(&s.observations.campaigns, created.goal);
        line(format!(
            "  {:<9} {}: stock {}, goal {}; holds {}, paid {}, cancelled {}, declined {}; reserve answers: {}",
            created.goal.state(),
            created.drop_id,
            created.stock,
            created.goal_units,
            o.holds,
            o.paid,
            o.cancelled,
            o.declined,
            tallies(&o.reserve_answers)
        ));
        if let Some(f) = facts {
            line(format!(
                "            Postgres: {} ({}), sold {}, {} purchases by {} buyers; refunds: {} recorded, {} paid by the gateway",
                f.state.as_deref().unwrap_or("-"),
                if f.closed { "closed" } else { "not closed" },
                f.sold,
                f.purchase_rows,
                f.buyers,
                f.refund_rows,
                f.gateway_refunds
            ));
        }
    }
    line(format!("  unexpected answers: {}", tallies(&s.unexpected)));
    line("checks".to_owned());
    line(render_checks(&s.checks).trim_end().to_owned());
    for rule in &s.thresholds_failed {
        line(format!("  FAIL  threshold {rule}"));
    }
    for file in &s.report_files {
        line(format!("goose report: {file}"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::verify::{passed, Verdict};

    fn served(state: &str, sold: i64) -> Option<ApiDrop> {
        Some(ApiDrop {
            counts: DropCounts {
                stock: 60,
                available: 60 - sold,
                held: 0,
                sold,
            },
            status: "closed".to_owned(),
            campaign: Some(state.to_owned()),
        })
    }

    fn good() -> Observations {
        let funded = CampaignFacts {
            goal: Goal::Funded,
            stock: 60,
            goal_units: 30,
            sold: 60,
            state: Some("funded".to_owned()),
            closed: true,
            purchase_rows: 60,
            purchase_units: 60,
            buyers: 60,
            acknowledged: 60,
            acknowledged_found: 60,
            holds_acknowledged: 66,
            holds_found: 66,
            gateway_ledger_rows: 35,
            funded_notices: 60,
            funded_notified: 60,
            instances: vec![served("funded", 60), served("funded", 60)],
            purchases_read: 60,
            ..CampaignFacts::default()
        };
        let unfunded = CampaignFacts {
            goal: Goal::Unfunded,
            goal_units: 50,
            sold: 35,
            state: Some("unfunded".to_owned()),
            refunds_done: true,
            purchase_rows: 35,
            purchase_units: 35,
            buyers: 35,
            acknowledged: 35,
            acknowledged_found: 35,
            holds_acknowledged: 40,
            holds_found: 40,
            refund_rows: 35,
            refunded_in_full: 35,
            gateway_refunds: 35,
            gateway_refunded_once: 35,
            funded_notices: 0,
            funded_notified: 0,
            unfunded_notices: 35,
            unfunded_notified: 35,
            instances: vec![served("unfunded", 35), served("unfunded", 35)],
            purchases_read: 35,
            ..funded.clone()
        };
        Observations {
            campaigns: vec![funded, unfunded],
            waited_for_outcome_ms: 1_500,
            server_failures: 0,
        }
    }

    fn failed(obs: &Observations) -> Vec<&'static str> {
        verify(obs)
            .into_iter()
            .filter(|c| c.verdict == Verdict::Fail)
            .map(|c| c.name)
            .collect()
    }

    #[test]
    fn a_consistent_run_passes_every_check() {
        let checks = verify(&good());
        assert!(passed(&checks), "{}", render_checks(&checks));
    }

    #[test]
    fn each_broken_guarantee_fails_its_own_check() {
        type Breaker = fn(&mut Observations);
        let cases: [(&str, Breaker); 14] = [
            ("each campaign ended as set up", |o| {
                o.campaigns[1].refunds_done = false
            }),
            ("each campaign ended as set up", |o| {
                o.campaigns[0].state = Some("unfunded".to_owned());
            }),
            ("every instance serves the outcome", |o| {
                o.campaigns[1].instances[1] = None
            }),
            ("every instance serves the outcome", |o| {
                o.campaigns[0].instances[0] = served("live", 60);
            }),
            ("sold <= stock, purchases == sold", |o| {
                o.campaigns[1].purchase_units = 34
            }),
            ("every 200 payment is durable", |o| {
                o.campaigns[0].acknowledged_found = 59
            }),
            ("every 201 hold is stored as settled", |o| {
                o.campaigns[1].holds_found = 39
            }),
            ("unfunded refunded once (Postgres)", |o| {
                o.campaigns[1].refund_rows = 34
            }),
            ("unfunded refunded once (gateway)", |o| {
                o.campaigns[1].gateway_refunds = 36
            }),
            ("unfunded refunded once (gateway)", |o| {
                o.campaigns[1].gateway_refunded_once = 34
            }),
            ("funded never refunded", |o| {
                o.campaigns[0].gateway_refunds = 1
            }),
            ("each buyer told the outcome once", |o| {
                o.campaigns[0].funded_notices = 61
            }),
            ("each buyer told the outcome once", |o| {
                o.campaigns[1].funded_notices = 1
            }),
            ("buyers read their purchases' outcome", |o| {
                o.campaigns[1].purchases_misread = 1
            }),
        ];
        for (name, break_it) in cases {
            let mut obs = good();
            break_it(&mut obs);
            assert_eq!(failed(&obs), vec![name], "{name}");
        }
        let mut obs = good();
        obs.server_failures = 1;
        assert_eq!(failed(&obs), vec!["no server errors"]);
    }

    #[test]
    fn an_unfunded_campaign_with_nothing_to_refund_proves_nothing() {
        let mut obs = good();
        let c = &mut obs.campaigns[1];
        (
            c.purchase_rows,
            c.purchase_units,
            c.sold,
            c.acknowledged,
            c.acknowledged_found,
        ) = (0, 0, 0, 0, 0);
        (
            c.refund_rows,
            c.refunded_in_full,
            c.gateway_refunds,
            c.gateway_refunded_once,
        ) = (0, 0, 0, 0);
        for d in c.instances.iter_mut().flatten() {
            d.counts.sold = 0;
            d.counts.available = 60;
        }
        let failed = failed(&obs);
        assert!(
            failed.contains(&"unfunded refunded once (Postgres)"),
            "{failed:?}"
        );
        assert!(
            failed.contains(&"unfunded refunded once (gateway)"),
            "{failed:?}"
        );
    }
}
