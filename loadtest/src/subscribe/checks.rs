//! The `subscribe` run's guarantees, read from Postgres and from the gateway's records (`gateway_charges`, where
//! the bundled gateway keeps every decision by idempotency key) after the final renewal round, and judged by a pure
//! function (`verify`) so that each check can be shown to fail.
//!
//! One charge per period: no subscription has two paid charges for one period, at the gateway either; none is
//! missing: an active subscription's current period is paid and nothing is left due at the final round's time.
//! Money: balances equal their ledgers, each points charge is one debit, each approved card charge is a paid charge
//! (or was given back). Subscribing: every 201 is stored, nothing of a declined subscribe is kept. Statuses follow
//! the charges (past due after a declined renewal, nothing charged past a pause or a cancel), and a raised price is
//! charged only to members who accepted it.

use std::time::Duration;

use anyhow::Context;
use chrono::{DateTime, Utc};
use serde::Serialize;
use uuid::Uuid;

use super::renewals::most_at_once;
use super::SubscribeRun;
use crate::shopping::{balances_off, uuids};
use crate::verify::{check, Check};

const DB_TIMEOUT: Duration = Duration::from_secs(30);

/// What Postgres and the gateway's records hold for a subscribe run (counts of what breaks a guarantee are 0 in a
/// good run).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct SubscribeFacts {
    pub acknowledged: i64,
    /// Acknowledged subscriptions with a row.
    pub acknowledged_found: i64,
    /// Subscriptions of the run's members that no 201 answered (kept from a declined or failed subscribe).
    pub unacknowledged: i64,
    /// Subscriptions whose first period (starting at `created_at`) has no paid charge.
    pub first_unpaid: i64,
    pub by_status: StatusCounts,
    pub charges_paid: i64,
    pub charges_failed: i64,
    /// Paid charges of periods after the first (renewals and resumes), and failed ones.
    pub renewals_paid: i64,
    pub renewals_failed: i64,
    pub pending_left: i64,
    /// (subscription, period start) with more than one paid charge.
    pub periods_paid_twice: i64,
    /// Subscriptions never reopened whose paid periods do not follow one another (a gap or an overlap).
    pub chains_broken: i64,
    /// (subscription, period start) with more than one approved card charge not given back, at the gateway.
    pub gateway_periods_twice: i64,
    /// Approved gateway charges, not given back, without a paid card charge.
    pub gateway_unrecorded: i64,
    /// Paid card charges without an approved gateway charge.
    pub gateway_missing: i64,
    pub gateway_approved: i64,
    pub gateway_declined: i64,
    /// Declined gateway charges that are no subscription's charge: declined subscribes.
    pub gateway_declined_unkept: i64,
    pub balances_off: i64,
    pub balances_negative: i64,
    /// Paid points charges without exactly one debit of their amount, and subscription debits of no paid charge.
    pub debits_off: i64,
    /// Active subscriptions whose current period has no paid charge, or that are due at or before the final round.
    pub active_unpaid: i64,
    /// Past-due subscriptions without a failed attempt of the period due, with a paid one, or due before the end.
    pub past_due_off: i64,
    /// Subscriptions never reopened, paused or canceled, with a paid charge for a period at or after their end.
    pub charged_after_stop: i64,
    /// Subscriptions that did not accept the raised price with a paid charge above their first one.
    pub raised_without_consent: i64,
    pub paused_for_price: i64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct StatusCounts {
    pub active: i64,
    pub past_due: i64,
    pub paused: i64,
    pub canceled: i64,
}

/// The checks, in report order; a pure function of the run and the facts.
#[allow(
    clippy::too_many_lines,
    reason = "every check in report order, each beside the numbers it compares"
)]
pub fn verify(run: &SubscribeRun, f: &SubscribeFacts) -> Vec<Check> {
    let renewers_ok = run.renewals.iter().filter(|r| r.succeeded()).count();
    let during = run.renewals.iter().filter(|r| r.during_goose).count();
    let at_once = most_at_once(&run.renewals);
    vec![
        check(
            "renew processes",
            !run.renewals.is_empty() && renewers_ok == run.renewals.len() && at_once >= 2,
            format!(
                "{renewers_ok} of {} flashsale renew --at exited 0 with their report ({during} ended while goose \
                 ran; up to {at_once} at once)",
                run.renewals.len()
            ),
        ),
        check(
            "renewals happened",
            f.renewals_paid > 0,
            format!(
                "{} later periods paid, {} attempts declined; {} charges paid in all",
                f.renewals_paid, f.renewals_failed, f.charges_paid
            ),
        ),
        check(
            "every 201 is stored",
            f.acknowledged_found == f.acknowledged,
            format!(
                "{} of {} acknowledged subscriptions found",
                f.acknowledged_found, f.acknowledged
            ),
        ),
        check(
            "declined subscribes kept nothing",
            f.unacknowledged == 0 && f.first_unpaid == 0,
            format!(
                "{} declined and {} short of points answered 402; {} subscriptions without a 201, {} without \
                 their first period paid; {} declined at the gateway without a charge row",
                run.declined_first,
                run.short_of_points,
                f.unacknowledged,
                f.first_unpaid,
                f.gateway_declined_unkept
            ),
        ),
        check(
            "one paid charge per period",
            f.periods_paid_twice == 0 && f.chains_broken == 0,
            format!(
                "{} periods paid twice; {} subscriptions (of those never reopened) whose paid periods do not \
                 follow one another",
                f.periods_paid_twice, f.chains_broken
            ),
        ),
        check(
            "the gateway charged each period once",
            f.gateway_periods_twice == 0 && f.gateway_unrecorded == 0 && f.gateway_missing == 0,
            format!(
                "{} approved, {} declined at the gateway; {} periods approved twice, {} approvals without a paid \
                 charge, {} paid card charges without an approval",
                f.gateway_approved,
                f.gateway_declined,
                f.gateway_periods_twice,
                f.gateway_unrecorded,
                f.gateway_missing
            ),
        ),
        check(
            "none missing",
            f.active_unpaid == 0 && f.pending_left == 0,
            format!(
                "{} active subscriptions unpaid for their current period or still due at {}; {} attempts left \
                 pending",
                f.active_unpaid, run.final_at, f.pending_left
            ),
        ),
        check(
            "balances equal their ledgers",
            f.balances_off == 0 && f.balances_negative == 0 && f.debits_off == 0,
            format!(
                "{} differ from their ledger, {} below zero, {} points charges not debited exactly once",
                f.balances_off, f.balances_negative, f.debits_off
            ),
        ),
        check(
            "statuses follow the charges",
            f.past_due_off == 0 && f.charged_after_stop == 0,
            format!(
                "active {}, past_due {}, paused {}, canceled {}; {} past due without a declined attempt for the \
                 period due, {} charged after a pause or a cancel",
                f.by_status.active,
                f.by_status.past_due,
                f.by_status.paused,
                f.by_status.canceled,
                f.past_due_off,
                f.charged_after_stop
            ),
        ),
        check(
            "a raised price needs consent",
            f.raised_without_consent == 0,
            format!(
                "price raised: {}; {} accepted, {} paused for the price, {} charged more without consent",
                run.price_raised,
                run.accepted.len(),
                f.paused_for_price,
                f.raised_without_consent
            ),
        ),
        check(
            "no server errors",
            run.server_failures == 0,
            format!("{} 5xx or unanswered calls", run.server_failures),
        ),
    ]
}

/// Reads the facts of a subscribe run from Postgres.
pub async fn facts(database_url: &str, run: &SubscribeRun) -> anyhow::Result<SubscribeFacts> {
    let members = uuids(&run.members, "member")?;
    let acknowledged = uuids(&run.acknowledged, "subscription")?;
    let reopened = uuids(&run.reopened, "subscription")?;
    let accepted = uuids(&run.accepted, "subscription")?;
    let final_at: DateTime<Utc> = run.final_at.parse().context("the final round's time")?;
    let (client, connection) = crate::verify::connect(database_url, DB_TIMEOUT).await?;
    let mut facts = SubscribeFacts {
        acknowledged: i64::try_from(acknowledged.len()).unwrap_or(i64::MAX),
        ..SubscribeFacts::default()
    };
    let read = async {
        // The run's subscriptions and charges, as temporary tables every query below reads.
        client
            .batch_execute("DROP TABLE IF EXISTS pg_temp.subs, pg_temp.charges")
            .await?;
        client
            .execute(
                "CREATE TEMP TABLE subs AS SELECT * FROM subscriptions WHERE member_id = ANY($1)",
                &[&members],
            )
            .await?;
        client
            .batch_execute(
                "CREATE TEMP TABLE charges AS
                   SELECT c.* FROM subscription_charges c JOIN subs s ON s.id = c.subscription_id",
            )
            .await?;
        subscribing(&client, &acknowledged, &mut facts).await?;
        periods(&client, &reopened, &mut facts).await?;
        gateway(&client, &members, &mut facts).await?;
        ledger(&client, &members, &mut facts).await?;
        statuses(&client, &reopened, &accepted, final_at, &mut facts).await?;
        anyhow::Ok(())
    };
    tokio::time::timeout(DB_TIMEOUT, read)
        .await
        .context("reading the subscriptions' facts from Postgres timed out")?
        .context("reading the subscriptions' facts from Postgres")?;
    connection.abort();
    Ok(facts)
}

async fn one_row(
    client: &tokio_postgres::Client,
    sql: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> anyhow::Result<tokio_postgres::Row> {
    Ok(client.query_one(sql, params).await?)
}

/// Every 201 stored, nothing else stored, every first period paid.
async fn subscribing(
    client: &tokio_postgres::Client,
    acknowledged: &[Uuid],
    f: &mut SubscribeFacts,
) -> anyhow::Result<()> {
    let row = one_row(
        client,
        "SELECT (SELECT count(*) FROM subscriptions WHERE id = ANY($1)),
                (SELECT count(*) FROM subs WHERE NOT id = ANY($1)),
                (SELECT count(*) FROM subs s WHERE NOT EXISTS (
                     SELECT 1 FROM charges c WHERE c.subscription_id = s.id AND c.status = 'paid'
                       AND c.period_start = s.created_at AND c.attempt = 1))",
        &[&acknowledged],
    )
    .await?;
    f.acknowledged_found = row.get(0);
    f.unacknowledged = row.get(1);
    f.first_unpaid = row.get(2);
    Ok(())
}

/// Charges by outcome, periods paid twice, and the chain of paid periods of subscriptions never reopened.
async fn periods(
    client: &tokio_postgres::Client,
    reopened: &[Uuid],
    f: &mut SubscribeFacts,
) -> anyhow::Result<()> {
    let row = one_row(
        client,
        "SELECT count(*) FILTER (WHERE c.status = 'paid'),
                count(*) FILTER (WHERE c.status = 'failed'),
                count(*) FILTER (WHERE c.status = 'paid' AND c.period_start > s.created_at),
                count(*) FILTER (WHERE c.status = 'failed' AND c.period_start > s.created_at),
                count(*) FILTER (WHERE c.status = 'pending')
         FROM charges c JOIN subs s ON s.id = c.subscription_id",
        &[],
    )
    .await?;
    f.charges_paid = row.get(0);
    f.charges_failed = row.get(1);
    f.renewals_paid = row.get(2);
    f.renewals_failed = row.get(3);
    f.pending_left = row.get(4);
    let row = one_row(
        client,
        "SELECT (SELECT count(*) FROM (SELECT 1 FROM charges WHERE status = 'paid'
                                       GROUP BY subscription_id, period_start HAVING count(*) > 1) twice),
                (SELECT count(DISTINCT subscription_id) FROM (
                     SELECT c.subscription_id, c.period_start, s.created_at,
                            lag(c.period_end) OVER (PARTITION BY c.subscription_id ORDER BY c.period_start) AS prev_end
                     FROM charges c JOIN subs s ON s.id = c.subscription_id
                     WHERE c.status = 'paid' AND NOT s.id = ANY($1)) chain
                 WHERE period_start <> COALESCE(prev_end, created_at))",
        &[&reopened],
    )
    .await?;
    f.periods_paid_twice = row.get(0);
    f.chains_broken = row.get(1);
    Ok(())
}

/// The gateway's records against the paid card charges.
async fn gateway(
    client: &tokio_postgres::Client,
    members: &[Uuid],
    f: &mut SubscribeFacts,
) -> anyhow::Result<()> {
    let row = one_row(
        client,
        "WITH g AS (SELECT * FROM gateway_charges WHERE member_id = ANY($1))
         SELECT count(*) FILTER (WHERE g.outcome = 'approved'),
                count(*) FILTER (WHERE g.outcome = 'declined'),
                count(*) FILTER (WHERE g.outcome = 'declined'
                                 AND NOT EXISTS (SELECT 1 FROM charges c WHERE c.id = g.charge_key)),
                count(*) FILTER (WHERE g.outcome = 'approved' AND NOT g.refunded
                                 AND NOT EXISTS (SELECT 1 FROM charges c WHERE c.id = g.charge_key
                                                 AND c.status = 'paid' AND c.payment_method = 'card')),
                (SELECT count(*) FROM charges c WHERE c.status = 'paid' AND c.payment_method = 'card'
                   AND NOT EXISTS (SELECT 1 FROM g WHERE g.charge_key = c.id AND g.outcome = 'approved'
                                   AND NOT g.refunded)),
                (SELECT count(*) FROM (SELECT 1 FROM charges c JOIN g ON g.charge_key = c.id
                                       WHERE g.outcome = 'approved' AND NOT g.refunded
                                       GROUP BY c.subscription_id, c.period_start HAVING count(*) > 1) twice)
         FROM g",
        &[&members],
    )
    .await?;
    f.gateway_approved = row.get(0);
    f.gateway_declined = row.get(1);
    f.gateway_declined_unkept = row.get(2);
    f.gateway_unrecorded = row.get(3);
    f.gateway_missing = row.get(4);
    f.gateway_periods_twice = row.get(5);
    Ok(())
}

/// Balances against their ledgers, and one debit per paid points charge.
async fn ledger(
    client: &tokio_postgres::Client,
    members: &[Uuid],
    f: &mut SubscribeFacts,
) -> anyhow::Result<()> {
    (f.balances_off, f.balances_negative) = balances_off(client, members).await?;
    let row = one_row(
        client,
        "SELECT (SELECT count(*) FROM charges c WHERE c.status = 'paid' AND c.payment_method = 'points'
                   AND c.amount > 0
                   AND (SELECT count(*) FROM balance_entries e WHERE e.subscription_charge_id = c.id
                          AND e.kind = 'subscription' AND e.amount = -c.amount) <> 1)
              + (SELECT count(*) FROM balance_entries e WHERE e.member_id = ANY($1) AND e.kind = 'subscription'
                   AND NOT EXISTS (SELECT 1 FROM charges c WHERE c.id = e.subscription_charge_id
                                   AND c.status = 'paid' AND c.payment_method = 'points'
                                   AND e.amount = -c.amount))",
        &[&members],
    )
    .await?;
    f.debits_off = row.get(0);
    Ok(())
}

/// Statuses against the charges, after the final round at `final_at`.
async fn statuses(
    client: &tokio_postgres::Client,
    reopened: &[Uuid],
    accepted: &[Uuid],
    final_at: DateTime<Utc>,
    f: &mut SubscribeFacts,
) -> anyhow::Result<()> {
    let row = one_row(
        client,
        "SELECT count(*) FILTER (WHERE status = 'active'), count(*) FILTER (WHERE status = 'past_due'),
                count(*) FILTER (WHERE status = 'paused'), count(*) FILTER (WHERE status = 'canceled'),
                count(*) FILTER (WHERE status = 'paused' AND paused_reason = 'price_change'),
                count(*) FILTER (WHERE status = 'active' AND (next_attempt_at <= $1 OR NOT EXISTS (
                    SELECT 1 FROM charges c WHERE c.subscription_id = s.id AND c.status = 'paid'
                      AND c.period_start = s.current_period_start AND c.period_end = s.current_period_end))),
                count(*) FILTER (WHERE status = 'past_due' AND (next_attempt_at <= $1
                    OR EXISTS (SELECT 1 FROM charges c WHERE c.subscription_id = s.id AND c.status = 'paid'
                                 AND c.period_start = s.current_period_end)
                    OR NOT EXISTS (SELECT 1 FROM charges c WHERE c.subscription_id = s.id AND c.status = 'failed'
                                     AND c.period_start = s.current_period_end
                                     AND c.attempt = s.renewal_attempt - 1))),
                count(*) FILTER (WHERE status IN ('paused', 'canceled') AND NOT s.id = ANY($2) AND EXISTS (
                    SELECT 1 FROM charges c WHERE c.subscription_id = s.id AND c.status = 'paid'
                      AND c.period_start >= s.current_period_end)),
                count(*) FILTER (WHERE NOT s.id = ANY($3) AND EXISTS (
                    SELECT 1 FROM charges c WHERE c.subscription_id = s.id AND c.status = 'paid'
                      AND c.amount > (SELECT first.amount FROM charges first WHERE first.subscription_id = s.id
                                        AND first.period_start = s.created_at AND first.status = 'paid')))
         FROM subs s",
        &[&final_at, &reopened, &accepted],
    )
    .await?;
    f.by_status = StatusCounts {
        active: row.get(0),
        past_due: row.get(1),
        paused: row.get(2),
        canceled: row.get(3),
    };
    f.paused_for_price = row.get(4);
    f.active_unpaid = row.get(5);
    f.past_due_off = row.get(6);
    f.charged_after_stop = row.get(7);
    f.raised_without_consent = row.get(8);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::renewals::RenewRun;
    use super::*;
    use crate::verify::{passed, Verdict};

    fn renewer(round: u32, started_ms: u64, ended_ms: u64) -> RenewRun {
        RenewRun {
            round,
            at: "2030-01-01T00:00:00.000Z".to_owned(),
            started_ms,
            ended_ms,
            exit: Some(0),
            line: "renewals at 2030-01-01T00:00:00+00:00: claimed 3, renewed 3".to_owned(),
            during_goose: true,
        }
    }

    fn good() -> (SubscribeRun, SubscribeFacts) {
        let run = SubscribeRun {
            products: vec!["p".into()],
            members: vec!["m".into()],
            acknowledged: vec!["s".into(); 10],
            reopened: Vec::new(),
            accepted: Vec::new(),
            declined_first: 2,
            short_of_points: 1,
            already_subscribed: 0,
            price_raised: true,
            final_at: "2030-01-01T00:00:00.000Z".to_owned(),
            renewals: vec![
                renewer(1, 0, 100),
                renewer(1, 10, 120),
                renewer(2, 500, 600),
            ],
            server_failures: 0,
        };
        let facts = SubscribeFacts {
            acknowledged: 10,
            acknowledged_found: 10,
            charges_paid: 25,
            renewals_paid: 15,
            ..SubscribeFacts::default()
        };
        (run, facts)
    }

    fn failed(run: &SubscribeRun, facts: &SubscribeFacts) -> Vec<&'static str> {
        verify(run, facts)
            .into_iter()
            .filter(|c| c.verdict == Verdict::Fail)
            .map(|c| c.name)
            .collect()
    }

    #[test]
    fn a_clean_run_passes_every_check() {
        let (run, facts) = good();
        assert!(passed(&verify(&run, &facts)), "{:?}", failed(&run, &facts));
    }

    #[test]
    fn each_broken_guarantee_fails_its_own_check() {
        type Breaker = fn(&mut SubscribeFacts);
        let cases: [(&str, Breaker); 14] = [
            ("renewals happened", |f| f.renewals_paid = 0),
            ("every 201 is stored", |f| f.acknowledged_found -= 1),
            ("declined subscribes kept nothing", |f| f.unacknowledged = 1),
            ("declined subscribes kept nothing", |f| f.first_unpaid = 1),
            ("one paid charge per period", |f| f.periods_paid_twice = 1),
            ("one paid charge per period", |f| f.chains_broken = 1),
            ("the gateway charged each period once", |f| {
                f.gateway_periods_twice = 1
            }),
            ("the gateway charged each period once", |f| {
                f.gateway_unrecorded = 1
            }),
            ("the gateway charged each period once", |f| {
                f.gateway_missing = 1
            }),
            ("none missing", |f| f.active_unpaid = 1),
            ("balances equal their ledgers", |f| f.balances_off = 1),
            ("balances equal their ledgers", |f| f.debits_off = 1),
            ("statuses follow the charges", |f| f.past_due_off = 1),
            ("a raised price needs consent", |f| {
                f.raised_without_consent = 1
            }),
        ];
        for (name, break_it) in cases {
            let (run, mut facts) = good();
            break_it(&mut facts);
            assert_eq!(failed(&run, &facts), vec![name]);
        }
    }

    #[test]
    fn renewers_that_fail_or_never_overlap_fail_the_run() {
        let (mut run, facts) = good();
        run.renewals[2].exit = Some(1);
        assert_eq!(failed(&run, &facts), vec!["renew processes"]);
        let (mut run, facts) = good();
        run.renewals[1].started_ms = 110;
        assert_eq!(failed(&run, &facts), vec!["renew processes"]);
        let (mut run, facts) = good();
        run.server_failures = 1;
        assert_eq!(failed(&run, &facts), vec!["no server errors"]);
    }
}
