//! Subscriptions as a goose scenario, named `subscribe`: signed-in members subscribe to the run's subscription
//! products (points through the ledger, cards through the gateway, some of them `tok_declined`), look at their
//! subscriptions and charges, pause, resume and cancel, change their cards (some to one that declines), top up
//! their points and accept a raised price; the seller raises one product's price once the first renewals are done.
//! Meanwhile `renewals` runs the real `flashsale renew --at` in rounds, several processes at once, each round
//! further on the test clock; after goose, one last round catches every subscription up.
//!
//! Setup (`test_start`) creates the seller, three products (weekly, monthly, and a weekly one whose price rises)
//! and members with points. After the run `checks` reads Postgres and the gateway's records (`gateway_charges`).

pub mod checks;
pub mod renewals;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use goose::prelude::{GooseError, GooseUser, Scenario, Transaction, TransactionFunction};
use rand::Rng;
use serde::Serialize;
use serde_json::{json, Value};
use tokio::task::JoinHandle;
use uuid::Uuid;

use crate::attack::Ended;
use crate::client::{send, send_retrying, success, Call, Reply, RetryPolicy, Targets};
use crate::config::{SubscribeArgs, TargetArgs};
use crate::lock;
use crate::setup::{self, progress, Member, API};
use crate::summary::threshold_line;
use crate::verify::Check;
use renewals::{RenewRun, Schedule};

/// A member's pause between clicks.
const THINK_MIN: Duration = Duration::from_millis(100);
const THINK_MAX: Duration = Duration::from_millis(500);
/// Subscriptions remembered for later steps; the oldest are forgotten past this (the verification reads Postgres).
const LIVE_MAX: usize = 10_000;
/// A points top-up during the run.
const TOP_UP: i64 = 20_000;
/// The products, by index: (name, interval, price per period).
const PRODUCTS: [(&str, &str, i64); 3] = [
    ("Weekly flowers", "week", 3_000),
    ("Monthly box", "month", 9_900),
    ("Weekly coffee", "week", 4_000),
];
/// The product whose price the seller raises during the run, and its new price.
const RAISED: usize = 2;
const RAISED_PRICE: i64 = 5_000;
/// How members pay when they subscribe: points, then a good card; the rest with a card that declines.
const PAY_POINTS: f64 = 0.4;
const PAY_CARD: f64 = 0.45;
/// How a changed payment goes: to a card that declines, then a good card; the rest to points.
const CHANGE_DECLINING: f64 = 0.4;
const CHANGE_CARD: f64 = 0.4;

/// Shared by every member, setup, the renewal rounds and the verification.
#[derive(Debug)]
pub struct Subscribers {
    args: SubscribeArgs,
    target: TargetArgs,
    targets: Arc<Targets>,
    fixture: OnceLock<Fixture>,
    book: Mutex<Book>,
    server_failures: AtomicI64,
    /// Whether goose's users are still acting (renewal rounds note it).
    goose_running: Arc<AtomicBool>,
    /// Set after the first renewal round: the seller raises the price after renewals at the old one.
    first_round_done: Arc<AtomicBool>,
    raised: AtomicBool,
    renewals: Mutex<Option<JoinHandle<Vec<RenewRun>>>>,
}

#[derive(Debug)]
struct Fixture {
    seller: String,
    products: Vec<String>,
    members: Vec<Member>,
    schedule: Schedule,
}

/// What the run was answered, for later steps and the verification.
#[derive(Debug, Default)]
struct Book {
    /// Subscriptions answered 201.
    acknowledged: Vec<String>,
    /// (subscription, its member's index, its product's index), for later steps.
    live: Vec<(String, usize, usize)>,
    /// Subscriptions a resume or an accept-price was asked for: either may start a new period at once, before the
    /// paid one ends, so their paid periods need not follow one another.
    reopened: HashSet<String>,
    /// Subscriptions whose member asked to accept the raised price.
    accepted: HashSet<String>,
    declined_first: u64,
    short_of_points: u64,
    already_subscribed: u64,
}

/// Answers a member expects: 2xx, a declined card or a balance short of points, and the conflicts a subscription's
/// state makes (already subscribed, canceled, a renewal being recorded).
fn expected(reply: &Reply) -> bool {
    success(reply)
        || matches!(
            (reply.status, reply.error_code()),
            (402, Some("payment_declined" | "insufficient_balance"))
                | (
                    409,
                    Some("already_subscribed" | "subscription_canceled" | "renewal_in_progress")
                )
        )
}

impl Subscribers {
    pub fn new(args: SubscribeArgs, target: TargetArgs, targets: Arc<Targets>) -> Arc<Self> {
        Arc::new(Self {
            args,
            target,
            targets,
            fixture: OnceLock::new(),
            book: Mutex::new(Book::default()),
            server_failures: AtomicI64::new(0),
            goose_running: Arc::new(AtomicBool::new(true)),
            first_round_done: Arc::new(AtomicBool::new(false)),
            raised: AtomicBool::new(false),
            renewals: Mutex::new(None),
        })
    }

    /// Setup, run from goose's `test_start`: the seller, the products, the members with their points; then the
    /// renewal rounds start.
    pub async fn setup(
        &self,
        user: &mut GooseUser,
        setup_concurrency: usize,
    ) -> anyhow::Result<()> {
        let tag = setup::run_tag();
        progress(format!(
            "subscribe setup: {} products, {} members with {} points (run tag {tag})",
            PRODUCTS.len(),
            self.args.members,
            self.args.points
        ));
        let targets = &self.targets;
        let seller = setup::seller(
            user,
            targets,
            &self.target.admin_email,
            &self.target.admin_password,
            &tag,
        )
        .await?;
        let products = create_products(user, targets, &seller, &tag).await?;
        let members =
            setup::members(user, targets, &tag, self.args.members, setup_concurrency).await?;
        if self.args.points > 0 {
            for member in &members {
                let reply = send(user, targets, &top_up(member, self.args.points), success).await;
                setup::expect(&reply, 201, "charging a member's points")?;
            }
        }
        let schedule = Schedule {
            flashsale_bin: self.args.flashsale_bin.clone(),
            database_url: self.target.database_url.clone(),
            origin: chrono::Utc::now(),
            step: chrono::Duration::days(i64::from(self.args.renew_step_days)),
            rounds: self.args.renew_rounds,
            renewers: self.args.renewers,
            every: Duration::from_millis(self.args.renew_every_ms),
        };
        let driver = tokio::spawn(renewals::drive(
            schedule.clone(),
            Arc::clone(&self.goose_running),
            Arc::clone(&self.first_round_done),
        ));
        *lock(&self.renewals) = Some(driver);
        let fixture = Fixture {
            seller,
            products,
            members,
            schedule,
        };
        anyhow::ensure!(
            self.fixture.set(fixture).is_ok(),
            "the subscriptions were set up twice"
        );
        Ok(())
    }

    /// The goose scenario, by weight: subscribe (4), my subscriptions (2), a subscription's charges (1), pause (1),
    /// resume (1), cancel (1), change the payment (1), accept the price (1), top up points (1), the seller raises a
    /// price (1; once, after the first renewal round).
    pub fn scenario(self: &Arc<Self>) -> Result<Scenario, GooseError> {
        let subscribers = Arc::clone(self);
        let claim: TransactionFunction = Arc::new(move |user| {
            let subscribers = Arc::clone(&subscribers);
            Box::pin(async move {
                let count = subscribers.fixture.get().map_or(0, |f| f.members.len());
                if count > 0 {
                    user.set_session_data(user.weighted_users_index % count);
                }
                Ok(())
            })
        });
        let step = |weight: usize, name: &str, f: Step| {
            let subscribers = Arc::clone(self);
            let function: TransactionFunction = Arc::new(move |user| {
                let subscribers = Arc::clone(&subscribers);
                Box::pin(async move {
                    if let Some(fixture) = subscribers.fixture.get() {
                        f(&subscribers, fixture, user).await;
                    }
                    // Without a fixture, setup failed (it said why, and stopped the run).
                    Ok(())
                })
            });
            Transaction::new(function).set_name(name).set_weight(weight)
        };
        let scenario = Scenario::new("subscribe")
            .set_wait_time(THINK_MIN, THINK_MAX)?
            .register_transaction(
                Transaction::new(claim)
                    .set_name("sign in as a member")
                    .set_on_start(),
            )
            .register_transaction(step(4, "subscribe", |s, f, u| Box::pin(s.subscribe(f, u)))?)
            .register_transaction(step(2, "my subscriptions", |s, f, u| {
                Box::pin(s.mine(f, u))
            })?)
            .register_transaction(step(1, "charges", |s, f, u| Box::pin(s.charges(f, u)))?)
            .register_transaction(step(1, "pause", |s, f, u| Box::pin(s.pause(f, u)))?)
            .register_transaction(step(1, "resume", |s, f, u| Box::pin(s.resume(f, u)))?)
            .register_transaction(step(1, "cancel", |s, f, u| Box::pin(s.cancel(f, u)))?)
            .register_transaction(step(1, "change payment", |s, f, u| {
                Box::pin(s.change_payment(f, u))
            })?)
            .register_transaction(step(1, "accept price", |s, f, u| {
                Box::pin(s.accept_price(f, u))
            })?)
            .register_transaction(step(1, "top up points", |s, f, u| {
                Box::pin(s.top_up(f, u))
            })?)
            .register_transaction(step(1, "raise a price", |s, f, u| {
                Box::pin(s.raise_price(f, u))
            })?);
        Ok(scenario)
    }

    async fn call(&self, user: &mut GooseUser, call: &Call) -> Reply {
        let reply = send(user, &self.targets, call, expected).await;
        if reply.is_server_failure() {
            self.server_failures.fetch_add(1, Ordering::Relaxed);
        }
        reply
    }

    fn member<'a>(fixture: &'a Fixture, user: &GooseUser) -> Option<(usize, &'a Member)> {
        let index = *user.get_session_data::<usize>()?;
        fixture.members.get(index).map(|m| (index, m))
    }

    /// A subscription the run made (any member's: its member acts on it), with that member.
    fn some_subscription<'a>(
        &self,
        fixture: &'a Fixture,
        product: Option<usize>,
    ) -> Option<(String, &'a Member)> {
        let book = lock(&self.book);
        let candidates: Vec<&(String, usize, usize)> = book
            .live
            .iter()
            .filter(|(_, _, p)| product.is_none_or(|want| *p == want))
            .collect();
        if candidates.is_empty() {
            return None;
        }
        let (id, member, _) = candidates[rand::thread_rng().gen_range(0..candidates.len())];
        Some((id.clone(), fixture.members.get(*member)?))
    }

    async fn subscribe(&self, fixture: &Fixture, user: &mut GooseUser) {
        let Some((index, member)) = Self::member(fixture, user) else {
            return;
        };
        let (product, payment) = {
            let mut rng = rand::thread_rng();
            let product = rng.gen_range(0..fixture.products.len());
            let roll: f64 = rng.gen();
            let payment = if roll < PAY_POINTS {
                json!({ "method": "points" })
            } else if roll < PAY_POINTS + PAY_CARD {
                json!({ "method": "card", "payment_token": "tok_ok" })
            } else {
                json!({ "method": "card", "payment_token": "tok_declined" })
            };
            (product, payment)
        };
        let call = Call::post(
            "/subscriptions",
            format!("{API}/subscriptions"),
            json!({ "product_id": fixture.products[product], "payment": payment }),
        )
        .auth(&member.token)
        .idempotency_key(Uuid::new_v4().to_string())
        .on(member.home);
        let reply = self.call(user, &call).await;
        let mut book = lock(&self.book);
        match (reply.status, reply.error_code()) {
            (201, _) => {
                if let Some(id) = reply.str_field("id") {
                    book.acknowledged.push(id.to_owned());
                    if book.live.len() == LIVE_MAX {
                        book.live.remove(0);
                    }
                    book.live.push((id.to_owned(), index, product));
                }
            }
            (402, Some("payment_declined")) => book.declined_first += 1,
            (402, _) => book.short_of_points += 1,
            (409, Some("already_subscribed")) => book.already_subscribed += 1,
            _ => {}
        }
    }

    async fn mine(&self, fixture: &Fixture, user: &mut GooseUser) {
        let Some((_, member)) = Self::member(fixture, user) else {
            return;
        };
        let call = Call::get(
            "/members/me/subscriptions",
            format!("{API}/members/me/subscriptions?limit=20"),
        )
        .auth(&member.token)
        .on(member.home);
        self.call(user, &call).await;
    }

    async fn charges(&self, fixture: &Fixture, user: &mut GooseUser) {
        let Some((id, member)) = self.some_subscription(fixture, None) else {
            return;
        };
        let call = Call::get(
            "/subscriptions/{id}/charges",
            format!("{API}/subscriptions/{id}/charges?limit=20"),
        )
        .auth(&member.token)
        .on(member.home);
        self.call(user, &call).await;
    }

    /// POSTs `action` (pause, resume, cancel, accept-price) for a subscription as its member.
    async fn act(
        &self,
        user: &mut GooseUser,
        name: &'static str,
        action: &str,
        body: Value,
        id: &str,
        member: &Member,
    ) {
        let call = Call::post(name, format!("{API}/subscriptions/{id}/{action}"), body)
            .auth(&member.token)
            .on(member.home);
        self.call(user, &call).await;
    }

    async fn pause(&self, fixture: &Fixture, user: &mut GooseUser) {
        if let Some((id, member)) = self.some_subscription(fixture, None) {
            self.act(
                user,
                "/subscriptions/{id}/pause",
                "pause",
                json!({}),
                &id,
                member,
            )
            .await;
        }
    }

    async fn resume(&self, fixture: &Fixture, user: &mut GooseUser) {
        if let Some((id, member)) = self.some_subscription(fixture, None) {
            lock(&self.book).reopened.insert(id.clone());
            self.act(
                user,
                "/subscriptions/{id}/resume",
                "resume",
                json!({}),
                &id,
                member,
            )
            .await;
        }
    }

    async fn cancel(&self, fixture: &Fixture, user: &mut GooseUser) {
        if let Some((id, member)) = self.some_subscription(fixture, None) {
            let at_period_end = rand::thread_rng().gen_bool(0.5);
            let body = json!({ "at_period_end": at_period_end });
            self.act(
                user,
                "/subscriptions/{id}/cancel",
                "cancel",
                body,
                &id,
                member,
            )
            .await;
        }
    }

    async fn accept_price(&self, fixture: &Fixture, user: &mut GooseUser) {
        if let Some((id, member)) = self.some_subscription(fixture, Some(RAISED)) {
            {
                let mut book = lock(&self.book);
                book.reopened.insert(id.clone());
                book.accepted.insert(id.clone());
            }
            let name = "/subscriptions/{id}/accept-price";
            self.act(user, name, "accept-price", json!({}), &id, member)
                .await;
        }
    }

    async fn change_payment(&self, fixture: &Fixture, user: &mut GooseUser) {
        let Some((id, member)) = self.some_subscription(fixture, None) else {
            return;
        };
        let roll: f64 = rand::thread_rng().gen();
        let payment = if roll < CHANGE_DECLINING {
            json!({ "method": "card", "payment_token": "tok_declined" })
        } else if roll < CHANGE_DECLINING + CHANGE_CARD {
            json!({ "method": "card", "payment_token": "tok_ok" })
        } else {
            json!({ "method": "points" })
        };
        let call = Call::put(
            "/subscriptions/{id}/payment",
            format!("{API}/subscriptions/{id}/payment"),
            Some(json!({ "payment": payment })),
        )
        .auth(&member.token)
        .on(member.home);
        self.call(user, &call).await;
    }

    async fn top_up(&self, fixture: &Fixture, user: &mut GooseUser) {
        if let Some((_, member)) = Self::member(fixture, user) {
            self.call(user, &top_up(member, TOP_UP)).await;
        }
    }

    /// The seller raises one product's price, once, after the first renewal round: its subscribers are told, and
    /// their next renewal pauses them unless they accept.
    async fn raise_price(&self, fixture: &Fixture, user: &mut GooseUser) {
        if !self.first_round_done.load(Ordering::Relaxed)
            || self.raised.swap(true, Ordering::Relaxed)
        {
            return;
        }
        let product = &fixture.products[RAISED];
        let call = Call::patch(
            "/products/{id}",
            format!("{API}/products/{product}"),
            json!({ "price": RAISED_PRICE }),
        )
        .auth(&fixture.seller);
        let reply = self.call(user, &call).await;
        if reply.status != 200 {
            // Not raised after all: another user may try again.
            self.raised.store(false, Ordering::Relaxed);
        }
    }

    /// Ends the renewals: waits for the rounds (those goose outlived run now), then runs the final round, which
    /// catches every subscription up to one step past the last round. Goose's users must be done.
    pub async fn finish_renewals(&self) -> anyhow::Result<Vec<RenewRun>> {
        self.goose_running.store(false, Ordering::Relaxed);
        let fixture = self
            .fixture
            .get()
            .ok_or_else(|| anyhow::anyhow!("the subscriptions were never set up"))?;
        let driver = lock(&self.renewals).take();
        let mut runs = match driver {
            Some(driver) => driver.await?,
            None => Vec::new(),
        };
        let schedule = &fixture.schedule;
        runs.extend(
            renewals::run_round(
                schedule,
                schedule.rounds + 1,
                1,
                std::time::Instant::now(),
                &self.goose_running,
            )
            .await,
        );
        Ok(runs)
    }

    /// What the run did, for the verification.
    pub fn run(&self, renewals: Vec<RenewRun>) -> Option<SubscribeRun> {
        let fixture = self.fixture.get()?;
        let book = lock(&self.book);
        let sorted = |set: &HashSet<String>| {
            let mut ids: Vec<String> = set.iter().cloned().collect();
            ids.sort();
            ids
        };
        Some(SubscribeRun {
            products: fixture.products.clone(),
            members: fixture.members.iter().map(|m| m.id.clone()).collect(),
            acknowledged: book.acknowledged.clone(),
            reopened: sorted(&book.reopened),
            accepted: sorted(&book.accepted),
            declined_first: book.declined_first,
            short_of_points: book.short_of_points,
            already_subscribed: book.already_subscribed,
            price_raised: self.raised.load(Ordering::Relaxed),
            final_at: setup::rfc3339(fixture.schedule.at(fixture.schedule.rounds + 1)),
            renewals,
            server_failures: self.server_failures.load(Ordering::Relaxed),
        })
    }
}

/// A finished subscribe run, as the verification needs it.
#[derive(Debug, Clone, Serialize)]
pub struct SubscribeRun {
    pub products: Vec<String>,
    pub members: Vec<String>,
    /// Subscriptions answered 201.
    pub acknowledged: Vec<String>,
    /// Subscriptions a resume or an accept-price was asked for (a new period may start before the paid one ends).
    pub reopened: Vec<String>,
    /// Subscriptions whose member asked to accept the raised price.
    pub accepted: Vec<String>,
    /// Subscribes answered 402 `payment_declined` (a card that declines), and 402 `insufficient_balance`.
    pub declined_first: u64,
    pub short_of_points: u64,
    pub already_subscribed: u64,
    pub price_raised: bool,
    /// The test clock of the final round: every subscription is caught up to it.
    pub final_at: String,
    pub renewals: Vec<RenewRun>,
    pub server_failures: i64,
}

/// Everything the run's summary says, also written as JSON with `--summary-file`.
#[derive(Debug, Clone, Serialize)]
pub struct SubscribeSummary {
    pub scenario: &'static str,
    pub passed: bool,
    pub settings: SubscribeArgs,
    pub run: SubscribeRun,
    pub facts: checks::SubscribeFacts,
    pub checks: Vec<Check>,
    pub thresholds_failed: Vec<String>,
    pub report_files: Vec<String>,
}

impl SubscribeSummary {
    pub fn new(
        settings: SubscribeArgs,
        run: SubscribeRun,
        (facts, checks): (checks::SubscribeFacts, Vec<Check>),
        ended: &Ended,
    ) -> Self {
        let thresholds_failed: Vec<String> =
            ended.thresholds_failed.iter().map(threshold_line).collect();
        Self {
            scenario: "subscribe",
            passed: crate::verify::passed(&checks) && thresholds_failed.is_empty(),
            settings,
            run,
            facts,
            checks,
            thresholds_failed,
            report_files: ended.report_files.clone(),
        }
    }
}

type Step = for<'a> fn(
    &'a Subscribers,
    &'a Fixture,
    &'a mut GooseUser,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + 'a>>;

/// The run's subscription products (`PRODUCTS`), created by the seller; their ids.
async fn create_products(
    user: &mut GooseUser,
    targets: &Targets,
    seller: &str,
    tag: &str,
) -> anyhow::Result<Vec<String>> {
    let mut products = Vec::with_capacity(PRODUCTS.len());
    for (name, interval, price) in PRODUCTS {
        let call = Call::post(
            "/products",
            format!("{API}/products"),
            json!({
                "name": format!("{name} {tag}"),
                "price": price,
                "currency": "KRW",
                "kind": "subscription",
                "interval": interval,
            }),
        )
        .auth(seller);
        let reply = send_retrying(user, targets, &call, RetryPolicy::OVERLOAD, success).await;
        products.push(setup::expect_field(
            &reply,
            201,
            "creating a subscription product",
            "id",
        )?);
    }
    Ok(products)
}

fn top_up(member: &Member, amount: i64) -> Call {
    Call::post(
        "/members/me/balance/charges",
        format!("{API}/members/me/balance/charges"),
        json!({ "amount": amount, "payment_token": "tok_ok" }),
    )
    .auth(&member.token)
    .idempotency_key(Uuid::new_v4().to_string())
    .on(member.home)
}
