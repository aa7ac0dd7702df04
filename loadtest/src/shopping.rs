//! The regular shop as a goose scenario, named `shop`: signed-in members charge points, fill their carts, order
//! (the cart with points, or one item by card), look at their orders and ask for refunds, which the run's seller
//! accepts or rejects. Setup (`test_start`) creates the seller, a small catalog of regular products with a shelf
//! stock each (small, so that orders contend for the last units), and members with a points balance.
//!
//! After the run, the shop's guarantees are checked in Postgres (`ShopFacts`, judged by `verify_shop`): every
//! product's shelf stock plus its units ordered minus its units refunded equals the stock it started with, every
//! balance equals the sum of its ledger and none is negative, every order answered 201 is stored with its total,
//! each points order is debited once, each accepted refund of a points order credited once (and a rejected one
//! never), and no call failed with a 5xx.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use anyhow::Context;
use goose::prelude::{GooseError, GooseUser, Scenario, Transaction, TransactionFunction};
use rand::Rng;
use serde::Serialize;
use serde_json::{json, Value};
use uuid::Uuid;

use crate::client::{send, success, Call, Reply, Targets};
use crate::config::{ShelfArgs, TargetArgs};
use crate::lock;
use crate::setup::{self, progress, Member, API};
use crate::verify::{check, Check};

/// A shopper's pause between clicks.
const THINK_MIN: Duration = Duration::from_millis(100);
const THINK_MAX: Duration = Duration::from_millis(500);
/// Orders and refunds remembered for later steps; the oldest are forgotten past these.
const PENDING_MAX: usize = 10_000;
/// Of the refunds the seller decides, this share is rejected.
const REJECT_SHARE: f64 = 0.2;
/// A points top-up during the run.
const TOP_UP: i64 = 200_000;
const DB_TIMEOUT: Duration = Duration::from_secs(30);

/// Shared by every shopper, setup and the verification.
#[derive(Debug)]
pub struct Shoppers {
    args: ShelfArgs,
    target: TargetArgs,
    targets: Arc<Targets>,
    fixture: OnceLock<Fixture>,
    /// Orders answered 201 (all of them, for the verification) and those not yet asked to be refunded.
    orders: Mutex<Orders>,
    /// Refunds requested and not yet decided.
    refunds: Mutex<VecDeque<String>>,
    server_failures: AtomicI64,
}

#[derive(Debug)]
struct Fixture {
    seller: String,
    products: Vec<String>,
    members: Vec<Member>,
}

#[derive(Debug, Default)]
struct Orders {
    acknowledged: Vec<String>,
    /// (order id, a product of it, its buyer's index) not yet asked to be refunded.
    refundable: VecDeque<(String, String, usize)>,
}

/// A shopper's session: its member, and whether its cart has something in it.
#[derive(Debug, Clone)]
struct Shopper {
    member: usize,
    cart_filled: bool,
}

/// Answers a shopper expects: 2xx, a shelf short of stock, a balance short of points.
fn expected(reply: &Reply) -> bool {
    success(reply)
        || matches!(
            (reply.status, reply.error_code()),
            (409, Some("out_of_stock")) | (402, Some("insufficient_balance"))
        )
}

/// Answers a deciding seller expects: 2xx, or a refund the other way already (another decision won).
fn decided(reply: &Reply) -> bool {
    success(reply) || (reply.status == 409 && reply.error_code() == Some("already_decided"))
}

impl Shoppers {
    pub fn new(args: ShelfArgs, target: TargetArgs, targets: Arc<Targets>) -> Arc<Self> {
        Arc::new(Self {
            args,
            target,
            targets,
            fixture: OnceLock::new(),
            orders: Mutex::new(Orders::default()),
            refunds: Mutex::new(VecDeque::new()),
            server_failures: AtomicI64::new(0),
        })
    }

    /// Setup, run from goose's `test_start`: the seller, the shelf and the members with their points.
    pub async fn setup(
        &self,
        user: &mut GooseUser,
        setup_concurrency: usize,
    ) -> anyhow::Result<()> {
        let tag = setup::run_tag();
        progress(format!(
            "shop setup: {} products with {} units each, {} members with {} points (run tag {tag})",
            self.args.shelf_products,
            self.args.shelf_stock,
            self.args.shop_members,
            self.args.points
        ));
        let seller = setup::seller(
            user,
            &self.targets,
            &self.target.admin_email,
            &self.target.admin_password,
            &tag,
        )
        .await?;
        let products = setup::catalog(
            user,
            &self.targets,
            &seller,
            &tag,
            self.args.shelf_products,
            self.args.shelf_stock,
        )
        .await?;
        let members = setup::members(
            user,
            &self.targets,
            &tag,
            self.args.shop_members,
            setup_concurrency,
        )
        .await?;
        if self.args.points > 0 {
            for member in &members {
                let reply = send(
                    user,
                    &self.targets,
                    &charge(member, self.args.points),
                    success,
                )
                .await;
                setup::expect(&reply, 201, "charging a member's points")?;
            }
        }
        let fixture = Fixture {
            seller,
            products,
            members,
        };
        anyhow::ensure!(
            self.fixture.set(fixture).is_ok(),
            "the shop was set up twice"
        );
        Ok(())
    }

    /// The goose scenario, by weight: add to the cart (4), view the cart (2), order the cart with points (2),
    /// order one item by card (1), top up points (1), my orders (1), ask for a refund (1), decide a refund as the
    /// seller (1).
    pub fn scenario(self: &Arc<Self>) -> Result<Scenario, GooseError> {
        let shoppers = Arc::clone(self);
        let claim: TransactionFunction = Arc::new(move |user| {
            let shoppers = Arc::clone(&shoppers);
            Box::pin(async move {
                let count = shoppers.fixture.get().map_or(0, |f| f.members.len());
                if count > 0 {
                    user.set_session_data(Shopper {
                        member: user.weighted_users_index % count,
                        cart_filled: false,
                    });
                }
                Ok(())
            })
        });
        let step = |weight: usize, name: &str, f: Step| {
            let shoppers = Arc::clone(self);
            let function: TransactionFunction = Arc::new(move |user| {
                let shoppers = Arc::clone(&shoppers);
                Box::pin(async move {
                    if let Some(fixture) = shoppers.fixture.get() {
                        f(&shoppers, fixture, user).await;
                    }
                    // Without a fixture, setup failed (it said why, and stopped the run).
                    Ok(())
                })
            });
            Transaction::new(function).set_name(name).set_weight(weight)
        };
        let scenario = Scenario::new("shop")
            .set_wait_time(THINK_MIN, THINK_MAX)?
            .register_transaction(
                Transaction::new(claim)
                    .set_name("sign in as a member")
                    .set_on_start(),
            )
            .register_transaction(step(4, "add to cart", |s, f, u| {
                Box::pin(s.add_to_cart(f, u))
            })?)
            .register_transaction(step(2, "view cart", |s, f, u| Box::pin(s.view_cart(f, u)))?)
            .register_transaction(step(2, "order the cart", |s, f, u| {
                Box::pin(s.order_cart(f, u))
            })?)
            .register_transaction(step(1, "order by card", |s, f, u| {
                Box::pin(s.order_by_card(f, u))
            })?)
            .register_transaction(step(1, "top up points", |s, f, u| {
                Box::pin(s.top_up(f, u))
            })?)
            .register_transaction(step(1, "my orders", |s, f, u| Box::pin(s.my_orders(f, u)))?)
            .register_transaction(step(1, "ask for a refund", |s, f, u| {
                Box::pin(s.ask_refund(f, u))
            })?)
            .register_transaction(step(1, "decide a refund", |s, f, u| {
                Box::pin(s.decide_refund(f, u))
            })?);
        Ok(scenario)
    }

    fn shopper(user: &GooseUser) -> Option<Shopper> {
        user.get_session_data::<Shopper>().cloned()
    }

    fn some_product(fixture: &Fixture) -> String {
        let products = &fixture.products;
        products[rand::thread_rng().gen_range(0..products.len())].clone()
    }

    async fn call(
        &self,
        user: &mut GooseUser,
        call: &Call,
        expect: crate::client::Expect,
    ) -> Reply {
        let reply = send(user, &self.targets, call, expect).await;
        if reply.is_server_failure() {
            self.server_failures.fetch_add(1, Ordering::Relaxed);
        }
        reply
    }

    async fn add_to_cart(&self, fixture: &Fixture, user: &mut GooseUser) {
        let Some(mut shopper) = Self::shopper(user) else {
            return;
        };
        let member = &fixture.members[shopper.member];
        let product = Self::some_product(fixture);
        let quantity = rand::thread_rng().gen_range(1..=3);
        let call = Call::put(
            "/cart/items/{id}",
            format!("{API}/cart/items/{product}"),
            Some(json!({ "quantity": quantity })),
        )
        .auth(&member.token)
        .on(member.home);
        if self.call(user, &call, success).await.status == 200 {
            shopper.cart_filled = true;
            user.set_session_data(shopper);
        }
    }

    async fn view_cart(&self, fixture: &Fixture, user: &mut GooseUser) {
        let Some(shopper) = Self::shopper(user) else {
            return;
        };
        let member = &fixture.members[shopper.member];
        let call = Call::get("/cart", format!("{API}/cart"))
            .auth(&member.token)
            .on(member.home);
        self.call(user, &call, success).await;
    }

    async fn order_cart(&self, fixture: &Fixture, user: &mut GooseUser) {
        let Some(mut shopper) = Self::shopper(user) else {
            return;
        };
        if !shopper.cart_filled {
            return;
        }
        let body = json!({ "payment": { "method": "points" } });
        if self.order(fixture, user, &shopper, body).await {
            // The cart is emptied by its order.
            shopper.cart_filled = false;
            user.set_session_data(shopper);
        }
    }

    async fn order_by_card(&self, fixture: &Fixture, user: &mut GooseUser) {
        let Some(shopper) = Self::shopper(user) else {
            return;
        };
        let body = json!({
            "items": [{ "product_id": Self::some_product(fixture), "quantity": 1 }],
            "payment": { "method": "card", "payment_token": "tok_ok" },
        });
        self.order(fixture, user, &shopper, body).await;
    }

    /// Places an order (with an Idempotency-Key, so a retry after back-pressure is the same order); whether it
    /// was placed.
    async fn order(
        &self,
        fixture: &Fixture,
        user: &mut GooseUser,
        shopper: &Shopper,
        body: Value,
    ) -> bool {
        let member = &fixture.members[shopper.member];
        let call = Call::post("/orders", format!("{API}/orders"), body)
            .auth(&member.token)
            .idempotency_key(Uuid::new_v4().to_string())
            .on(member.home);
        let reply = self.call(user, &call, expected).await;
        if reply.status != 201 {
            return false;
        }
        let id = reply.str_field("id").map(str::to_owned);
        let product = reply.body["items"][0]["product_id"]
            .as_str()
            .map(str::to_owned);
        if let Some(id) = id {
            let mut orders = lock(&self.orders);
            orders.acknowledged.push(id.clone());
            if let Some(product) = product {
                if orders.refundable.len() == PENDING_MAX {
                    orders.refundable.pop_front();
                }
                orders.refundable.push_back((id, product, shopper.member));
            }
        }
        true
    }

    async fn top_up(&self, fixture: &Fixture, user: &mut GooseUser) {
        let Some(shopper) = Self::shopper(user) else {
            return;
        };
        let member = &fixture.members[shopper.member];
        self.call(user, &charge(member, TOP_UP), success).await;
    }

    async fn my_orders(&self, fixture: &Fixture, user: &mut GooseUser) {
        let Some(shopper) = Self::shopper(user) else {
            return;
        };
        let member = &fixture.members[shopper.member];
        let call = Call::get("/orders", format!("{API}/orders?limit=20"))
            .auth(&member.token)
            .on(member.home);
        self.call(user, &call, success).await;
    }

    /// One unit of an order placed earlier (by any shopper: its buyer asks).
    async fn ask_refund(&self, fixture: &Fixture, user: &mut GooseUser) {
        let Some((order, product, buyer)) = lock(&self.orders).refundable.pop_front() else {
            return;
        };
        let member = &fixture.members[buyer];
        let call = Call::post(
            "/orders/{id}/refunds",
            format!("{API}/orders/{order}/refunds"),
            json!({
                "items": [{ "product_id": product, "quantity": 1 }],
                "reason": "changed my mind",
            }),
        )
        .auth(&member.token)
        .on(member.home);
        let reply = self.call(user, &call, success).await;
        if reply.status == 201 {
            if let Some(id) = reply.str_field("id") {
                let mut refunds = lock(&self.refunds);
                if refunds.len() == PENDING_MAX {
                    refunds.pop_front();
                }
                refunds.push_back(id.to_owned());
            }
        }
    }

    /// The seller decides the oldest refund asked for: accepts most, rejects some.
    async fn decide_refund(&self, fixture: &Fixture, user: &mut GooseUser) {
        let Some(refund) = lock(&self.refunds).pop_front() else {
            return;
        };
        let seller = &fixture.seller;
        let call = if rand::thread_rng().gen_bool(REJECT_SHARE) {
            Call::post(
                "/refunds/{id}/reject",
                format!("{API}/refunds/{refund}/reject"),
                json!({ "reason": "the seal is broken" }),
            )
        } else {
            Call::post(
                "/refunds/{id}/accept",
                format!("{API}/refunds/{refund}/accept"),
                json!({}),
            )
        };
        let instance = self.targets.next(user.weighted_users_index, 0);
        self.call(user, &call.auth(seller).on(instance), decided)
            .await;
    }

    /// What the run did, for the verification: its products, members and acknowledged orders.
    pub fn run(&self) -> Option<ShopRun> {
        let fixture = self.fixture.get()?;
        Some(ShopRun {
            products: fixture.products.clone(),
            members: fixture.members.iter().map(|m| m.id.clone()).collect(),
            shelf_stock: i64::from(self.args.shelf_stock),
            orders: lock(&self.orders).acknowledged.clone(),
            server_failures: self.server_failures.load(Ordering::Relaxed),
        })
    }
}

type Step = for<'a> fn(
    &'a Shoppers,
    &'a Fixture,
    &'a mut GooseUser,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + 'a>>;

fn charge(member: &Member, amount: i64) -> Call {
    Call::post(
        "/members/me/balance/charges",
        format!("{API}/members/me/balance/charges"),
        json!({ "amount": amount, "payment_token": "tok_ok" }),
    )
    .auth(&member.token)
    .idempotency_key(Uuid::new_v4().to_string())
    .on(member.home)
}

/// A finished shop run, as the verification needs it.
#[derive(Debug, Clone, Serialize)]
pub struct ShopRun {
    pub products: Vec<String>,
    pub members: Vec<String>,
    pub shelf_stock: i64,
    /// Orders answered 201.
    pub orders: Vec<String>,
    pub server_failures: i64,
}

/// What Postgres holds for a shop run.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ShopFacts {
    /// Products whose `stock + ordered - refunded` is not the stock they started with (or whose stock is below 0).
    pub shelves_off: Vec<String>,
    pub units_ordered: i64,
    pub units_refunded: i64,
    /// Balances of the run's members that differ from the sum of their ledger.
    pub balances_off: i64,
    pub balances_negative: i64,
    pub orders_acknowledged: i64,
    /// Acknowledged orders with a row.
    pub orders_found: i64,
    /// Orders of the run's members whose total is not the sum of their items.
    pub totals_off: i64,
    /// Points orders without exactly one debit.
    pub debits_off: i64,
    /// Refunds of points orders with other than one credit (accepted) or none (otherwise).
    pub credits_off: i64,
    pub refunds_accepted: i64,
    pub refunds_rejected: i64,
    pub server_failures: i64,
}

/// The shop's guarantees as checks, in report order; a pure function of the facts.
pub fn verify_shop(f: &ShopFacts) -> Vec<Check> {
    vec![
        check(
            "shelf stock conserved",
            f.shelves_off.is_empty(),
            if f.shelves_off.is_empty() {
                format!(
                    "stock + {} units ordered - {} refunded == starting stock, every product",
                    f.units_ordered, f.units_refunded
                )
            } else {
                format!("off for {}", f.shelves_off.join(", "))
            },
        ),
        check(
            "balances equal their ledgers",
            f.balances_off == 0 && f.balances_negative == 0,
            format!(
                "{} differ from their ledger, {} below zero",
                f.balances_off, f.balances_negative
            ),
        ),
        check(
            "every 201 order is stored",
            f.orders_found == f.orders_acknowledged,
            format!(
                "{} of {} acknowledged orders found",
                f.orders_found, f.orders_acknowledged
            ),
        ),
        check(
            "order totals add up",
            f.totals_off == 0,
            format!("{} orders whose total is not their items' sum", f.totals_off),
        ),
        check(
            "each points order debited once",
            f.debits_off == 0,
            format!("{} points orders without exactly one debit", f.debits_off),
        ),
        check(
            "refunds credited exactly once",
            f.credits_off == 0,
            format!(
                "{} accepted, {} rejected; {} refunds of points orders credited other than once if accepted, \
                 never otherwise",
                f.refunds_accepted, f.refunds_rejected, f.credits_off
            ),
        ),
        check(
            "no server errors",
            f.server_failures == 0,
            format!("{} 5xx or unanswered calls", f.server_failures),
        ),
    ]
}

/// Of `members`' balances, how many differ from the sum of their ledger, and how many are below zero.
pub async fn balances_off(
    client: &tokio_postgres::Client,
    members: &[Uuid],
) -> Result<(i64, i64), tokio_postgres::Error> {
    let row = client
        .query_one(
            "SELECT count(*) FILTER (WHERE b.balance <> COALESCE(e.total, 0)),
                    count(*) FILTER (WHERE b.balance < 0)
             FROM balances b
             LEFT JOIN (SELECT member_id, sum(amount)::bigint AS total FROM balance_entries
                        WHERE member_id = ANY($1) GROUP BY member_id) e USING (member_id)
             WHERE b.member_id = ANY($1)",
            &[&members],
        )
        .await?;
    Ok((row.get(0), row.get(1)))
}

/// Parses the run's ids of `what` (all UUIDs) for a query.
pub fn uuids(ids: &[String], what: &str) -> anyhow::Result<Vec<Uuid>> {
    ids.iter()
        .map(|id| {
            id.parse()
                .with_context(|| format!("a {what} id is not a UUID: {id}"))
        })
        .collect()
}

/// Reads the facts of a shop run from Postgres.
#[allow(
    clippy::too_many_lines,
    reason = "every fact the shop's checks need, read in one place so each is one snapshot"
)]
pub async fn shop_facts(database_url: &str, run: &ShopRun) -> anyhow::Result<ShopFacts> {
    let products = uuids(&run.products, "product")?;
    let members = uuids(&run.members, "member")?;
    let orders = uuids(&run.orders, "order")?;
    let (client, connection) = crate::verify::connect(database_url, DB_TIMEOUT).await?;
    let facts = tokio::time::timeout(DB_TIMEOUT, async {
        let shelves = client
            .query(
                "SELECT p.id::text, p.stock,
                        COALESCE((SELECT sum(oi.quantity) FROM order_items oi WHERE oi.product_id = p.id), 0)::bigint,
                        COALESCE((SELECT sum(ri.quantity) FROM refund_items ri JOIN refunds r ON r.id = ri.refund_id
                                  WHERE ri.product_id = p.id AND r.status = 'accepted'), 0)::bigint
                 FROM products p WHERE p.id = ANY($1) ORDER BY p.id",
                &[&products],
            )
            .await?;
        let mut facts = ShopFacts {
            orders_acknowledged: i64::try_from(orders.len()).unwrap_or(i64::MAX),
            server_failures: run.server_failures,
            ..ShopFacts::default()
        };
        for row in &shelves {
            let (stock, ordered, refunded): (i64, i64, i64) = (row.get(1), row.get(2), row.get(3));
            facts.units_ordered += ordered;
            facts.units_refunded += refunded;
            if stock < 0 || stock + ordered - refunded != run.shelf_stock {
                facts.shelves_off.push(row.get(0));
            }
        }
        if shelves.len() != products.len() {
            facts.shelves_off.push(format!(
                "{} products missing",
                products.len() - shelves.len()
            ));
        }
        (facts.balances_off, facts.balances_negative) = balances_off(&client, &members).await?;
        facts.orders_found = client
            .query_one("SELECT count(*) FROM orders WHERE id = ANY($1)", &[&orders])
            .await?
            .get(0);
        let orders_off = client
            .query_one(
                "SELECT
                   count(*) FILTER (WHERE o.total <> (SELECT COALESCE(sum(subtotal), 0) FROM order_items
                                                     WHERE order_id = o.id)),
                   count(*) FILTER (WHERE o.payment_method = 'points'
                                    AND (SELECT count(*) FROM balance_entries e
                                         WHERE e.order_id = o.id AND e.kind = 'order') <> 1)
                 FROM orders o WHERE o.member_id = ANY($1)",
                &[&members],
            )
            .await?;
        facts.totals_off = orders_off.get(0);
        facts.debits_off = orders_off.get(1);
        let refunds = client
            .query_one(
                "SELECT
                   count(*) FILTER (WHERE o.payment_method = 'points' AND r.amount > 0
                                    AND (SELECT count(*) FROM balance_entries e WHERE e.refund_id = r.id)
                                        <> CASE WHEN r.status = 'accepted' THEN 1 ELSE 0 END),
                   count(*) FILTER (WHERE r.status = 'accepted'),
                   count(*) FILTER (WHERE r.status = 'rejected')
                 FROM refunds r JOIN orders o ON o.id = r.order_id WHERE r.member_id = ANY($1)",
                &[&members],
            )
            .await?;
        facts.credits_off = refunds.get(0);
        facts.refunds_accepted = refunds.get(1);
        facts.refunds_rejected = refunds.get(2);
        anyhow::Ok(facts)
    })
    .await
    .context("reading the shop's facts from Postgres timed out")?
    .context("reading the shop's facts from Postgres")?;
    connection.abort();
    Ok(facts)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::verify::{passed, Verdict};

    fn good() -> ShopFacts {
        ShopFacts {
            units_ordered: 40,
            units_refunded: 3,
            orders_acknowledged: 25,
            orders_found: 25,
            refunds_accepted: 3,
            refunds_rejected: 1,
            ..ShopFacts::default()
        }
    }

    fn failed(facts: &ShopFacts) -> Vec<&'static str> {
        verify_shop(facts)
            .into_iter()
            .filter(|c| c.verdict == Verdict::Fail)
            .map(|c| c.name)
            .collect()
    }

    #[test]
    fn a_clean_run_passes_every_check() {
        assert!(passed(&verify_shop(&good())));
    }

    #[test]
    fn each_broken_guarantee_fails_its_own_check() {
        type Breaker = fn(&mut ShopFacts);
        let cases: [(&str, Breaker); 7] = [
            ("shelf stock conserved", |f| f.shelves_off.push("p".into())),
            ("balances equal their ledgers", |f| f.balances_off = 1),
            ("balances equal their ledgers", |f| f.balances_negative = 1),
            ("every 201 order is stored", |f| f.orders_found -= 1),
            ("order totals add up", |f| f.totals_off = 2),
            ("each points order debited once", |f| f.debits_off = 1),
            ("refunds credited exactly once", |f| f.credits_off = 1),
        ];
        for (name, break_it) in cases {
            let mut facts = good();
            break_it(&mut facts);
            assert_eq!(failed(&facts), vec![name]);
        }
        let mut facts = good();
        facts.server_failures = 1;
        assert_eq!(failed(&facts), vec!["no server errors"]);
    }
}
