//! After a `campaign` run: waits for the servers' campaign loop to decide both campaigns and finish the refunds,
//! then reads what the checks judge: each campaign's drop on every instance and its buyers' purchases through the
//! API, and in Postgres the drop rows, purchases, holds, the server's refund records (`purchase_refunds`), the
//! gateway's own history of refunds (the simulated gateway's ledger, `simulated_gateway_refunds`, kept with
//! `SIMULATED_GATEWAY_LEDGER=true`) and the notifications. Read-only: the harness never writes to Postgres.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use chrono::{DateTime, Utc};
use futures_util::StreamExt;
use goose::prelude::GooseUser;
use serde_json::Value;
use tokio_postgres::Client;
use uuid::Uuid;

use super::checks::{ApiDrop, CampaignFacts, Observations};
use super::{Acknowledged, CampaignDrop, Goal, Granted, Outcomes};
use crate::client::{send, Call, Targets};
use crate::config::CampaignSettings;
use crate::drop_funnel::instant_of;
use crate::setup::{progress, Member, API};
use crate::verify::DropCounts;

/// Timeout of the connection and of each batch of verification queries.
const DB_TIMEOUT: Duration = Duration::from_secs(15);
/// How often Postgres is read while waiting for the outcome, and how often that wait says so.
const OUTCOME_POLL_INTERVAL: Duration = Duration::from_millis(250);
const PROGRESS_EVERY: Duration = Duration::from_secs(3);
/// Most purchases of each campaign read back through the API, and how many at once.
const READ_BACK_MAX: usize = 1_000;
const READ_BACK_CONCURRENCY: usize = 16;

/// Everything a finished `campaign` run saw, enough to verify it (again, after a fault is planted).
pub struct CampaignRun {
    pub settings: CampaignSettings,
    pub drops: [CampaignDrop; 2],
    pub opens_at: DateTime<Utc>,
    pub closes_at: DateTime<Utc>,
    pub outcomes: [Outcomes; 2],
    /// 201 holds of each campaign, with the state each must end in.
    pub holds: [Vec<Granted>; 2],
    /// 200 payments of each campaign.
    pub purchases: [Vec<Acknowledged>; 2],
    pub unexpected: BTreeMap<String, u64>,
    pub server_failures: u64,
    pub(super) buyers: Vec<Member>,
    pub(super) reader: GooseUser,
    pub(super) targets: Arc<Targets>,
}

impl std::fmt::Debug for CampaignRun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CampaignRun")
            .field("drops", &self.drops)
            .field("outcomes", &self.outcomes)
            .finish_non_exhaustive()
    }
}

impl CampaignRun {
    /// Waits (up to `close_wait_seconds` past `closes_at`) for both campaigns to be decided and the unfunded one's
    /// refunds to be done, then reads the observations. Waiting ends early only on the outcome, never on a guess.
    pub async fn observe(&self, database_url: &str) -> anyhow::Result<Observations> {
        let (client, connection) = tokio::time::timeout(
            DB_TIMEOUT,
            tokio_postgres::connect(database_url, tokio_postgres::NoTls),
        )
        .await
        .context("connecting to Postgres timed out")?
        .context("connecting to Postgres (--database-url)")?;
        let connection = tokio::spawn(connection);
        let deadline =
            instant_of(self.closes_at) + Duration::from_secs(self.settings.close_wait_seconds);
        let waited = std::time::Instant::now();
        let decided = self.wait_for_outcome(&client, deadline).await?;
        let waited_ms = u64::try_from(waited.elapsed().as_millis()).unwrap_or(u64::MAX);
        progress(format!(
            "verify: {} after {:.1} s; reading the campaigns through the API and Postgres",
            if decided {
                "both campaigns decided and the refunds done"
            } else {
                "gave up waiting for the outcome"
            },
            waited_ms as f64 / 1000.0
        ));
        let mut campaigns = Vec::with_capacity(2);
        for goal in Goal::BOTH {
            let mut facts = tokio::time::timeout(DB_TIMEOUT, self.db_facts(&client, goal))
                .await
                .context("verification queries timed out")?
                .context("verification queries")?;
            facts.instances = self.read_instances(goal).await;
            (facts.purchases_read, facts.purchases_misread) = self.read_back(goal).await;
            campaigns.push(facts);
        }
        drop(client);
        let _ = connection.await;
        Ok(Observations {
            campaigns,
            waited_for_outcome_ms: waited_ms,
            server_failures: i64::try_from(self.server_failures).unwrap_or(i64::MAX),
        })
    }

    fn drop_uuid(&self, goal: Goal) -> anyhow::Result<Uuid> {
        self.drops[goal.index()]
            .drop_id
            .parse()
            .context("a drop id is not a UUID")
    }

    /// Polls the drop rows until the funded campaign is decided and the unfunded one's refunds are done, or the
    /// deadline; whether they were.
    async fn wait_for_outcome(
        &self,
        client: &Client,
        deadline: tokio::time::Instant,
    ) -> anyhow::Result<bool> {
        let ids = [
            self.drop_uuid(Goal::Funded)?,
            self.drop_uuid(Goal::Unfunded)?,
        ];
        let mut said = tokio::time::Instant::now();
        loop {
            let row = client
                .query_one(
                    "SELECT count(*) FILTER (WHERE id = $1 AND campaign_closed_at IS NOT NULL)
                          + count(*) FILTER (WHERE id = $2 AND refunds_done_at IS NOT NULL)
                     FROM drops WHERE id = ANY($3)",
                    &[&ids[0], &ids[1], &ids.as_slice()],
                )
                .await
                .context("reading the campaigns' state")?;
            if row.get::<_, i64>(0) == 2 {
                return Ok(true);
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Ok(false);
            }
            if now.duration_since(said) >= PROGRESS_EVERY {
                said = now;
                progress("verify: waiting for the servers to decide both campaigns and refund the unfunded one");
            }
            tokio::time::sleep(OUTCOME_POLL_INTERVAL).await;
        }
    }

    /// One campaign's facts in Postgres.
    #[allow(
        clippy::too_many_lines,
        reason = "every Postgres fact of one campaign the checks need, read in one place"
    )]
    async fn db_facts(&self, client: &Client, goal: Goal) -> anyhow::Result<CampaignFacts> {
        let drop = self.drop_uuid(goal)?;
        let created = &self.drops[goal.index()];
        let uuids = |ids: Vec<&String>| -> anyhow::Result<Vec<Uuid>> {
            ids.into_iter()
                .map(|id| id.parse().with_context(|| format!("not a UUID: {id}")))
                .collect()
        };
        let acknowledged = uuids(
            self.purchases[goal.index()]
                .iter()
                .map(|p| &p.purchase_id)
                .collect(),
        )?;
        let holds = uuids(self.holds[goal.index()].iter().map(|h| &h.id).collect())?;
        let settled: Vec<&str> = self.holds[goal.index()].iter().map(|h| h.settled).collect();
        let row = client
            .query_one(
                "SELECT stock, sold, goal_units, campaign, campaign_closed_at IS NOT NULL,
                        refunds_done_at IS NOT NULL
                 FROM drops WHERE id = $1",
                &[&drop],
            )
            .await?;
        let mut facts = CampaignFacts {
            goal,
            drop_id: created.drop_id.clone(),
            stock: i64::from(row.get::<_, i32>(0)),
            sold: i64::from(row.get::<_, i32>(1)),
            goal_units: row.get::<_, Option<i32>>(2).map_or(0, i64::from),
            state: row.get(3),
            closed: row.get(4),
            refunds_done: row.get(5),
            acknowledged: i64::try_from(acknowledged.len())?,
            holds_acknowledged: i64::try_from(holds.len())?,
            ..CampaignFacts::default()
        };
        let purchases = client
            .query_one(
                "SELECT count(*), COALESCE(sum(quantity), 0)::int8, count(DISTINCT member_id),
                        count(*) FILTER (WHERE id = ANY($2))
                 FROM purchases WHERE drop_id = $1",
                &[&drop, &acknowledged],
            )
            .await?;
        facts.purchase_rows = purchases.get(0);
        facts.purchase_units = purchases.get(1);
        facts.buyers = purchases.get(2);
        facts.acknowledged_found = purchases.get(3);
        // Each 201 hold, stored in the state its buyer left it in (paid, or released by a cancel or a decline).
        facts.holds_found = client
            .query_one(
                "SELECT count(*) FROM stored_holds h
                 JOIN unnest($1::uuid[], $2::text[]) AS a(id, settled) ON a.id = h.id
                 WHERE h.drop_id = $3 AND h.status = a.settled",
                &[&holds, &settled, &drop],
            )
            .await?
            .get(0);
        // The server's refund records: one per purchase, refunded, of the purchase's amount.
        let refunds = client
            .query_one(
                "SELECT count(*),
                        count(*) FILTER (WHERE r.refunded_at IS NOT NULL AND r.amount = p.amount
                                         AND r.charge_key = p.reservation_id)
                 FROM purchase_refunds r LEFT JOIN purchases p ON p.id = r.purchase_id
                 WHERE r.drop_id = $1 OR p.drop_id = $1",
                &[&drop],
            )
            .await?;
        facts.refund_rows = refunds.get(0);
        facts.refunded_in_full = refunds.get(1);
        // The gateway's history: refunds it paid against this campaign's charges (a purchase is charged under its
        // reservation id), and the purchases it refunded exactly once, in full.
        let gateway = client
            .query_one(
                "SELECT (SELECT count(*) FROM simulated_gateway_refunds g
                         JOIN purchases p ON p.reservation_id = g.charge_key WHERE p.drop_id = $1),
                        (SELECT count(*) FROM purchases p WHERE p.drop_id = $1
                           AND (SELECT count(*) FROM simulated_gateway_refunds g
                                WHERE g.charge_key = p.reservation_id) = 1
                           AND (SELECT sum(g.amount) FROM simulated_gateway_refunds g
                                WHERE g.charge_key = p.reservation_id) = p.amount),
                        (SELECT count(*) FROM simulated_gateway_refunds)",
                &[&drop],
            )
            .await?;
        facts.gateway_refunds = gateway.get(0);
        facts.gateway_refunded_once = gateway.get(1);
        facts.gateway_ledger_rows = gateway.get(2);
        let notices = client
            .query_one(
                "SELECT count(*) FILTER (WHERE kind = 'campaign_funded'),
                        count(DISTINCT member_id) FILTER (WHERE kind = 'campaign_funded'),
                        count(*) FILTER (WHERE kind = 'campaign_unfunded'),
                        count(DISTINCT member_id) FILTER (WHERE kind = 'campaign_unfunded'),
                        count(DISTINCT member_id) FILTER (WHERE NOT EXISTS (
                            SELECT 1 FROM purchases p WHERE p.drop_id = $1 AND p.member_id = n.member_id))
                 FROM notifications n
                 WHERE drop_id = $1 AND kind IN ('campaign_funded', 'campaign_unfunded')",
                &[&drop],
            )
            .await?;
        facts.funded_notices = notices.get(0);
        facts.funded_notified = notices.get(1);
        facts.unfunded_notices = notices.get(2);
        facts.unfunded_notified = notices.get(3);
        facts.notified_non_buyers = notices.get(4);
        Ok(facts)
    }

    /// The campaign's drop as each instance serves it now.
    async fn read_instances(&self, goal: Goal) -> Vec<Option<ApiDrop>> {
        let drop_id = &self.drops[goal.index()].drop_id;
        let mut user = self.reader.clone();
        let mut read = Vec::with_capacity(self.targets.count());
        for instance in 0..self.targets.count() {
            let call = Call::get("/drops/{id}", format!("{API}/drops/{drop_id}")).on(instance);
            let reply = send(&mut user, &self.targets, &call, |r| r.status == 200).await;
            read.push(
                (reply.status == 200)
                    .then(|| api_drop(&reply.body))
                    .flatten(),
            );
        }
        read
    }

    /// Reads the campaign's acknowledged purchases back as their buyers see them (`GET /purchases/{id}`, on
    /// another instance than the buyer's own): each must say `paid` (funded) or `refunded` (unfunded), with a
    /// `refunded_at` exactly when refunded. (read, misread)
    async fn read_back(&self, goal: Goal) -> (i64, i64) {
        let sample = &self.purchases[goal.index()];
        let sample = &sample[..sample.len().min(READ_BACK_MAX)];
        let want = match goal {
            Goal::Funded => "paid",
            Goal::Unfunded => "refunded",
        };
        let misread = futures_util::stream::iter(sample)
            .map(|purchase| {
                let mut user = self.reader.clone();
                let member = &self.buyers[purchase.buyer];
                let call = Call::get(
                    "/purchases/{id}",
                    format!("{API}/purchases/{}", purchase.purchase_id),
                )
                .auth(&member.token)
                .on(self.targets.next(member.home, 1));
                async move {
                    let reply = send(&mut user, &self.targets, &call, |r| r.status == 200).await;
                    let refunded_at = reply.body.get("refunded_at").is_some_and(Value::is_string);
                    reply.status != 200
                        || reply.str_field("status") != Some(want)
                        || refunded_at != (goal == Goal::Unfunded)
                }
            })
            .buffer_unordered(READ_BACK_CONCURRENCY)
            .filter(|misread| std::future::ready(*misread))
            .count()
            .await;
        (
            i64::try_from(sample.len()).unwrap_or(i64::MAX),
            i64::try_from(misread).unwrap_or(i64::MAX),
        )
    }
}

/// A drop body's counts, status and campaign state.
fn api_drop(body: &Value) -> Option<ApiDrop> {
    let n = |key: &str| body.get(key).and_then(Value::as_i64);
    Some(ApiDrop {
        counts: DropCounts {
            stock: n("stock")?,
            available: n("available")?,
            held: n("held")?,
            sold: n("sold")?,
        },
        status: body.get("status")?.as_str()?.to_owned(),
        campaign: body
            .get("campaign")
            .and_then(Value::as_str)
            .map(str::to_owned),
    })
}
