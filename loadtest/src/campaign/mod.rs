//! The `campaign` scenario (API.md, "Preorder campaigns and fulfilment"; DESIGN.md guarantee 13): two preorder
//! campaigns open and close at the same instants, and buyers buy into both under load. One is set up to be funded
//! (its goal is within reach of the buyers who pay), the other to fail (fewer of its buyers than its goal, one unit
//! each). After `closes_at` the servers' own campaign loop decides both and refunds the failed one; the run waits
//! for that, then checks it (`observe.rs` reads, `checks.rs` judges):
//!
//! 1. setup (`test_start`, not measured): a fresh seller, a preorder product per campaign, the buyers signed up and
//!    logged in, then both campaigns created, opening `opens_in_ms` later and closing `campaign_seconds` after;
//! 2. `on_start`: each goose user claims one buyer and waits for the opening;
//! 3. "reserve at the opening": a unit of the funded campaign, and (for the first `unfunded_buyers`) one of the
//!    unfunded one, in an order that alternates between buyers, so both campaigns see their spike at once;
//! 4. "pay or cancel": holders of the funded campaign pay, or cancel by `cancel_rate`; holders of the unfunded one
//!    pay, or are declined by `decline_rate`; each through another instance than the one that granted the hold;
//! 5. "wait for stock": a buyer refused by the funded campaign retries with backoff while cancelled units come
//!    back, until served, every unit is paid, or shortly before `closes_at`; whatever it gets it pays for.
//!
//! With several instances (one Redis, one Postgres), buyer `i` lives on instance `i mod n` as in the drop funnel.
//! Every loop is bounded by a count or a deadline, so a run ends by itself whatever the server does.

mod checks;
mod observe;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use chrono::{DateTime, Utc};
use goose::prelude::{GooseUser, Scenario, Transaction, TransactionFunction, TransactionResult};
use serde::Serialize;
use serde_json::json;
use tokio::sync::watch;
use uuid::Uuid;

use crate::client::{jitter, send_retrying, Call, Reply, RetryPolicy, Targets};
use crate::config::{CampaignSettings, TargetArgs};
use crate::drop_funnel::{instant_of, reserve_at_opening};
use crate::lock;
use crate::setup::{self, progress, Member, API};

pub use checks::{render, verify, ApiDrop, CampaignFacts, CampaignSummary, Observations};
pub use observe::CampaignRun;

const EP_RESERVE: &str = "/drops/{id}/reservations";
const EP_PAY: &str = "/reservations/{id}/payment";
const EP_CANCEL: &str = "/reservations/{id}";

/// Backoff of buyers waiting for cancelled units: doubling from the minimum to the maximum, jittered.
const RESTOCK_DELAY_MIN: Duration = Duration::from_millis(100);
const RESTOCK_DELAY_MAX: Duration = Duration::from_millis(800);
const RESTOCK_TRIES_MAX: u32 = 200;
/// Waiting buyers stop this long before `closes_at`, so that every hold is paid before the close (a hold left
/// open at `closes_at` only delays the decision until it settles).
const CLOSE_MARGIN: Duration = Duration::from_secs(1);

/// The outcome a campaign of the run is set up for; also its index in the run's pairs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Goal {
    #[default]
    Funded,
    Unfunded,
}

impl Goal {
    pub const BOTH: [Goal; 2] = [Goal::Funded, Goal::Unfunded];

    pub fn index(self) -> usize {
        match self {
            Goal::Funded => 0,
            Goal::Unfunded => 1,
        }
    }

    /// The `campaign` state it must end in.
    pub fn state(self) -> &'static str {
        match self {
            Goal::Funded => "funded",
            Goal::Unfunded => "unfunded",
        }
    }
}

/// One campaign of the run, as created.
#[derive(Debug, Clone, Serialize)]
pub struct CampaignDrop {
    pub goal: Goal,
    pub drop_id: String,
    pub stock: u32,
    pub goal_units: u32,
}

/// What the buyers of one campaign did and were told.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Outcomes {
    /// Final answers to reservations (after any 429/503 retries), at the opening and while waiting.
    pub reserve_answers: BTreeMap<String, u64>,
    pub holds: u64,
    pub paid: u64,
    pub cancelled: u64,
    pub declined: u64,
}

/// A 201 hold, read back from Postgres after the run with the state it must have reached.
#[derive(Debug, Clone, Serialize)]
pub struct Granted {
    pub id: String,
    /// `paid` or `released`.
    pub settled: &'static str,
}

/// A 200 payment: its purchase, and the buyer who reads it back after the run.
#[derive(Debug, Clone)]
pub struct Acknowledged {
    pub purchase_id: String,
    pub buyer: usize,
}

#[derive(Debug, Default)]
struct Tally {
    outcomes: [Outcomes; 2],
    holds: [Vec<Granted>; 2],
    purchases: [Vec<Acknowledged>; 2],
    /// Answers no step expected, by step and answer (e.g. `pay funded: 409 hold_expired`).
    unexpected: BTreeMap<String, u64>,
    /// Of those, server errors (5xx other than back-pressure) and calls with no answer.
    server_failures: u64,
}

/// What setup made: the two campaigns, when they open and close, and the buyers.
#[derive(Debug)]
struct Ready {
    drops: [CampaignDrop; 2],
    opens_at: DateTime<Utc>,
    closes_at: DateTime<Utc>,
    opens_at_instant: tokio::time::Instant,
    closes_at_instant: tokio::time::Instant,
    buyers: Vec<Member>,
}

/// A hold as the reservation answer gave it.
#[derive(Debug, Clone)]
struct Hold {
    id: String,
    granted_by: usize,
}

/// A goose user's buyer, kept in its session.
#[derive(Debug, Clone)]
struct Buyer {
    index: usize,
    held: Vec<(Goal, Hold)>,
    /// Refused by the funded campaign at the opening: waits for stock.
    refused: bool,
}

/// Shared by every goose user of the scenario, by setup, and by the verification after the run.
#[derive(Debug)]
pub struct Campaigns {
    args: CampaignSettings,
    target: TargetArgs,
    targets: Arc<Targets>,
    ready: OnceLock<Ready>,
    next_buyer: AtomicUsize,
    /// Holds granted so far per campaign: the `k` of each hold's pick (`picked`).
    holds_granted: [AtomicU64; 2],
    funded_paid: AtomicU64,
    /// Set once every unit of the funded campaign is paid: nothing can come back, so waiting buyers stop.
    sold_out_for_good: watch::Sender<bool>,
    tally: Mutex<Tally>,
    /// A user that records nothing, kept from setup for the reads after the run.
    reader: Mutex<Option<GooseUser>>,
}

/// Whether the `k`-th hold (from 0) is one of the `rate` share picked to cancel or be declined: of the first `n`
/// holds, exactly `floor(n x rate)` are, whatever order they arrive in.
pub fn picked(k: u64, rate: f64) -> bool {
    ((k + 1) as f64 * rate).floor() > (k as f64 * rate).floor()
}

impl Campaigns {
    pub fn new(args: CampaignSettings, target: TargetArgs, targets: Arc<Targets>) -> Arc<Self> {
        Arc::new(Self {
            args,
            target,
            targets,
            ready: OnceLock::new(),
            next_buyer: AtomicUsize::new(0),
            holds_granted: [AtomicU64::new(0), AtomicU64::new(0)],
            funded_paid: AtomicU64::new(0),
            sold_out_for_good: watch::channel(false).0,
            tally: Mutex::new(Tally::default()),
            reader: Mutex::new(None),
        })
    }

    /// Goose users: one per buyer.
    pub fn users(&self) -> usize {
        self.args.buyers as usize
    }

    fn tally<R>(&self, f: impl FnOnce(&mut Tally) -> R) -> R {
        f(&mut lock(&self.tally))
    }

    fn unexpected(&self, step: String, reply: &Reply) {
        let failure = reply.is_server_failure();
        self.tally(|t| {
            *t.unexpected
                .entry(format!("{step}: {}", reply.label()))
                .or_default() += 1;
            if failure {
                t.server_failures += 1;
            }
        });
    }

    /// Setup, run from goose's `test_start`: seller, products, buyers, then both campaigns.
    pub async fn setup(self: &Arc<Self>, user: &mut GooseUser) -> anyhow::Result<()> {
        let (targets, args) = (&self.targets, &self.args);
        let tag = setup::run_tag();
        progress(format!(
            "campaign setup: seller and two products (run tag {tag}) on {}; {} buyers over {} instance(s)",
            targets.base(0),
            args.buyers,
            targets.count()
        ));
        let seller = setup::seller(
            user,
            targets,
            &self.target.admin_email,
            &self.target.admin_password,
            &tag,
        )
        .await?;
        let buyers = setup::members(
            user,
            targets,
            &tag,
            args.buyers,
            self.target.setup_concurrency,
        )
        .await?;
        let opens_at_wanted =
            Utc::now() + chrono::Duration::milliseconds(i64::try_from(args.opens_in_ms)?);
        let closes_at_wanted =
            opens_at_wanted + chrono::Duration::seconds(i64::try_from(args.campaign_seconds)?);
        let mut drops = Vec::with_capacity(2);
        let mut opens_at = opens_at_wanted;
        for goal in Goal::BOTH {
            let (drop, stored_opens_at) = self
                .create_campaign(
                    user,
                    &seller,
                    &tag,
                    goal,
                    (opens_at_wanted, closes_at_wanted),
                )
                .await?;
            opens_at = stored_opens_at;
            drops.push(drop);
        }
        let drops: [CampaignDrop; 2] = drops
            .try_into()
            .map_err(|_| anyhow::anyhow!("two campaigns were not created"))?;
        progress(format!(
            "campaign setup: both open at {} and close at {}",
            setup::rfc3339(opens_at),
            setup::rfc3339(closes_at_wanted)
        ));
        let ready = Ready {
            drops,
            opens_at,
            closes_at: closes_at_wanted,
            opens_at_instant: instant_of(opens_at),
            closes_at_instant: instant_of(closes_at_wanted),
            buyers,
        };
        anyhow::ensure!(
            self.ready.set(ready).is_ok(),
            "the campaigns were set up twice"
        );
        *lock(&self.reader) = Some(user.clone());
        Ok(())
    }

    /// One campaign of the seller's, on a product of its own; the campaign and `opens_at` as stored.
    async fn create_campaign(
        &self,
        user: &mut GooseUser,
        seller: &str,
        tag: &str,
        goal: Goal,
        (opens_at, closes_at): (DateTime<Utc>, DateTime<Utc>),
    ) -> anyhow::Result<(CampaignDrop, DateTime<Utc>)> {
        let args = &self.args;
        let (stock, goal_units) = match goal {
            Goal::Funded => (args.funded_stock, args.funded_goal),
            Goal::Unfunded => (args.unfunded_stock, args.unfunded_goal),
        };
        let name = format!("{tag} {}", goal.state());
        let product = setup::preorder_product(user, &self.targets, seller, &name).await?;
        let (drop_id, stored_opens_at) = setup::create_drop(
            user,
            &self.targets,
            seller,
            json!({
                "product_id": product,
                "stock": stock,
                "goal_units": goal_units,
                "opens_at": setup::rfc3339(opens_at),
                "closes_at": setup::rfc3339(closes_at),
                "per_member_limit": 1,
                "hold_seconds": args.hold_seconds,
            }),
        )
        .await?;
        progress(format!(
            "campaign setup: {} campaign {drop_id}: {stock} units, goal {goal_units}",
            goal.state()
        ));
        let drop = CampaignDrop {
            goal,
            drop_id,
            stock,
            goal_units,
        };
        Ok((drop, stored_opens_at))
    }

    /// The goose scenario, named `campaign`.
    pub fn scenario(self: &Arc<Self>) -> Scenario {
        Scenario::new("campaign")
            .register_transaction(
                transaction(self, |c, u| Box::pin(c.claim(u)))
                    .set_name("claim a buyer, wait for the opening")
                    .set_on_start(),
            )
            .register_transaction(
                transaction(self, |c, u| Box::pin(c.reserve_at_opening(u)))
                    .set_name("reserve at the opening")
                    .set_sequence(1),
            )
            .register_transaction(
                transaction(self, |c, u| Box::pin(c.pay_or_cancel(u)))
                    .set_name("pay or cancel")
                    .set_sequence(2),
            )
            .register_transaction(
                transaction(self, |c, u| Box::pin(c.wait_for_stock(u)))
                    .set_name("wait for stock")
                    .set_sequence(3),
            )
    }

    fn buyer(user: &GooseUser) -> Option<Buyer> {
        user.get_session_data::<Buyer>().cloned()
    }

    /// on_start: the next buyer, then wait for the opening.
    async fn claim(self: Arc<Self>, user: &mut GooseUser) -> TransactionResult {
        // Without `ready`, setup failed (it said why, and stopped the run).
        let Some(ready) = self.ready.get() else {
            return Ok(());
        };
        let index = self.next_buyer.fetch_add(1, Ordering::Relaxed);
        if index < ready.buyers.len() {
            user.set_session_data(Buyer {
                index,
                held: Vec::new(),
                refused: false,
            });
            tokio::time::sleep_until(ready.opens_at_instant).await;
        }
        Ok(())
    }

    /// The campaigns this buyer joins, in its order: even buyers start with the funded one, odd ones with the
    /// unfunded one, so both see their spike at the same moment.
    fn joins(&self, index: usize) -> Vec<Goal> {
        let mut goals = vec![Goal::Funded];
        if index < self.args.unfunded_buyers as usize {
            goals.push(Goal::Unfunded);
        }
        if index % 2 == 1 {
            goals.reverse();
        }
        goals
    }

    /// One reservation into each campaign the buyer joins.
    async fn reserve_at_opening(self: Arc<Self>, user: &mut GooseUser) -> TransactionResult {
        let (Some(mut buyer), Some(ready)) = (Self::buyer(user), self.ready.get()) else {
            return Ok(());
        };
        for goal in self.joins(buyer.index) {
            let reply = self.reserve(user, ready, goal, buyer.index).await;
            match (reply.status, reply.error_code()) {
                (201, _) => {
                    if let Some(hold) = self.granted(goal, &reply) {
                        buyer.held.push((goal, hold));
                    }
                }
                (409, Some("sold_out")) | (429 | 503, _)
                    if goal == Goal::Funded && !reply.is_server_failure() =>
                {
                    buyer.refused = true;
                }
                _ => self.unexpected(format!("reserve {}", goal.state()), &reply),
            }
        }
        user.set_session_data(buyer);
        Ok(())
    }

    /// A reservation of one unit, with an `Idempotency-Key`, retried as the drop funnel's at the opening.
    async fn reserve(
        &self,
        user: &mut GooseUser,
        ready: &Ready,
        goal: Goal,
        buyer: usize,
    ) -> Reply {
        let member = &ready.buyers[buyer];
        let drop_id = &ready.drops[goal.index()].drop_id;
        let call = Call::post(
            EP_RESERVE,
            format!("{API}/drops/{drop_id}/reservations"),
            json!({ "quantity": 1 }),
        )
        .auth(&member.token)
        .idempotency_key(Uuid::new_v4().to_string())
        .on(member.home);
        let reply = reserve_at_opening(user, &self.targets, call).await;
        self.tally(|t| {
            *t.outcomes[goal.index()]
                .reserve_answers
                .entry(reply.label())
                .or_default() += 1;
        });
        reply
    }

    /// A 201's hold, counted; `None` (and counted as unexpected) for a body without an id.
    fn granted(&self, goal: Goal, reply: &Reply) -> Option<Hold> {
        let Some(id) = reply.str_field("id") else {
            self.unexpected(format!("reserve {} (bad body)", goal.state()), reply);
            return None;
        };
        self.tally(|t| t.outcomes[goal.index()].holds += 1);
        Some(Hold {
            id: id.to_owned(),
            granted_by: reply.instance,
        })
    }

    /// Each hold is paid, cancelled (funded, by `cancel_rate`) or declined (unfunded, by `decline_rate`).
    async fn pay_or_cancel(self: Arc<Self>, user: &mut GooseUser) -> TransactionResult {
        let (Some(buyer), Some(ready)) = (Self::buyer(user), self.ready.get()) else {
            return Ok(());
        };
        for (goal, hold) in &buyer.held {
            let k = self.holds_granted[goal.index()].fetch_add(1, Ordering::Relaxed);
            let member = &ready.buyers[buyer.index];
            match goal {
                Goal::Funded if picked(k, self.args.cancel_rate) => {
                    self.cancel(user, member, hold).await;
                }
                Goal::Unfunded if picked(k, self.args.decline_rate) => {
                    self.pay(user, *goal, buyer.index, member, hold, "tok_declined")
                        .await;
                }
                _ => {
                    self.pay(user, *goal, buyer.index, member, hold, "tok_ok")
                        .await;
                }
            }
        }
        Ok(())
    }

    /// Pays a hold through another instance than the one that granted it; `tok_declined` must be declined.
    async fn pay(
        &self,
        user: &mut GooseUser,
        goal: Goal,
        buyer: usize,
        member: &Member,
        hold: &Hold,
        token: &'static str,
    ) {
        let declined = token == "tok_declined";
        let call = Call::post(
            EP_PAY,
            format!("{API}/reservations/{}/payment", hold.id),
            json!({ "payment_token": token }),
        )
        .auth(&member.token)
        .idempotency_key(Uuid::new_v4().to_string())
        .on(self.targets.next(hold.granted_by, 1));
        let expected: crate::client::Expect = if declined {
            |r| r.status == 402 && r.error_code() == Some("payment_declined")
        } else {
            |r| r.status == 200
        };
        let reply =
            send_retrying(user, &self.targets, &call, RetryPolicy::OVERLOAD, expected).await;
        let purchase = reply.str_field("purchase_id").map(str::to_owned);
        match (expected(&reply), purchase) {
            (true, _) if declined => self.tally(|t| {
                t.outcomes[goal.index()].declined += 1;
                t.holds[goal.index()].push(Granted {
                    id: hold.id.clone(),
                    settled: "released",
                });
            }),
            (true, Some(purchase_id)) => {
                self.tally(|t| {
                    t.outcomes[goal.index()].paid += 1;
                    t.holds[goal.index()].push(Granted {
                        id: hold.id.clone(),
                        settled: "paid",
                    });
                    t.purchases[goal.index()].push(Acknowledged { purchase_id, buyer });
                });
                if goal == Goal::Funded {
                    let paid = self.funded_paid.fetch_add(1, Ordering::Relaxed) + 1;
                    if paid >= u64::from(self.args.funded_stock) {
                        // send_replace: stores the value even while no buyer is subscribed yet.
                        self.sold_out_for_good.send_replace(true);
                    }
                }
            }
            _ => self.unexpected(format!("pay {} {token}", goal.state()), &reply),
        }
    }

    async fn cancel(&self, user: &mut GooseUser, member: &Member, hold: &Hold) {
        let call = Call::delete(EP_CANCEL, format!("{API}/reservations/{}", hold.id))
            .auth(&member.token)
            .on(self.targets.next(hold.granted_by, 1));
        let reply = send_retrying(user, &self.targets, &call, RetryPolicy::OVERLOAD, |r| {
            r.status == 204
        })
        .await;
        if reply.status == 204 {
            self.tally(|t| {
                t.outcomes[Goal::Funded.index()].cancelled += 1;
                t.holds[Goal::Funded.index()].push(Granted {
                    id: hold.id.clone(),
                    settled: "released",
                });
            });
        } else {
            self.unexpected("cancel funded".to_owned(), &reply);
        }
    }

    /// A buyer refused by the funded campaign retries, backing off, until it has a unit, every unit is paid, or
    /// shortly before `closes_at`; a unit it gets it pays for.
    async fn wait_for_stock(self: Arc<Self>, user: &mut GooseUser) -> TransactionResult {
        let (Some(buyer), Some(ready)) = (Self::buyer(user), self.ready.get()) else {
            return Ok(());
        };
        if !buyer.refused {
            return Ok(());
        }
        let deadline = ready.closes_at_instant - CLOSE_MARGIN;
        let mut stop = self.sold_out_for_good.subscribe();
        let mut delay = RESTOCK_DELAY_MIN;
        for _ in 0..RESTOCK_TRIES_MAX {
            let wake =
                (tokio::time::Instant::now() + delay / 2 + jitter_up_to(delay)).min(deadline);
            tokio::select! {
                () = tokio::time::sleep_until(wake) => {}
                _ = stop.wait_for(|done| *done) => return Ok(()),
            }
            if tokio::time::Instant::now() >= deadline {
                return Ok(());
            }
            let reply = self.reserve(user, ready, Goal::Funded, buyer.index).await;
            match (reply.status, reply.error_code()) {
                (201, _) => {
                    if let Some(hold) = self.granted(Goal::Funded, &reply) {
                        let member = &ready.buyers[buyer.index];
                        self.pay(user, Goal::Funded, buyer.index, member, &hold, "tok_ok")
                            .await;
                    }
                    return Ok(());
                }
                (409, Some("sold_out")) | (429 | 503, _) if !reply.is_server_failure() => {
                    delay = (delay * 2).min(RESTOCK_DELAY_MAX);
                }
                _ => {
                    self.unexpected("reserve funded (waiting for stock)".to_owned(), &reply);
                    return Ok(());
                }
            }
        }
        Ok(())
    }

    /// After the goose run: what the run saw, to verify. `None` when setup never finished.
    pub fn collect(&self) -> anyhow::Result<Option<CampaignRun>> {
        let Some(ready) = self.ready.get() else {
            return Ok(None);
        };
        let reader = lock(&self.reader)
            .take()
            .ok_or_else(|| anyhow::anyhow!("no reader kept from setup"))?;
        let tally = std::mem::take(&mut *lock(&self.tally));
        Ok(Some(CampaignRun {
            settings: self.args.clone(),
            drops: ready.drops.clone(),
            opens_at: ready.opens_at,
            closes_at: ready.closes_at,
            outcomes: tally.outcomes,
            holds: tally.holds,
            purchases: tally.purchases,
            unexpected: tally.unexpected,
            server_failures: tally.server_failures,
            buyers: ready.buyers.clone(),
            reader,
            targets: Arc::clone(&self.targets),
        }))
    }
}

/// A step of the scenario: a method of `Campaigns` over one goose user.
type Step = for<'a> fn(
    Arc<Campaigns>,
    &'a mut GooseUser,
) -> std::pin::Pin<
    Box<dyn std::future::Future<Output = TransactionResult> + Send + 'a>,
>;

fn transaction(campaigns: &Arc<Campaigns>, step: Step) -> Transaction {
    let campaigns = Arc::clone(campaigns);
    let function: TransactionFunction = Arc::new(move |user| step(Arc::clone(&campaigns), user));
    Transaction::new(function)
}

fn jitter_up_to(delay: Duration) -> Duration {
    jitter(u64::try_from(delay.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_take_the_rate_of_every_prefix() {
        for rate in [0.0, 0.1, 0.25, 0.5, 0.99] {
            let mut picked_so_far = 0u64;
            for k in 0..1_000u64 {
                picked_so_far += u64::from(picked(k, rate));
                assert_eq!(
                    picked_so_far,
                    ((k + 1) as f64 * rate).floor() as u64,
                    "{rate} {k}"
                );
            }
        }
        assert!(!picked(0, 0.1) && picked(9, 0.1));
    }
}
