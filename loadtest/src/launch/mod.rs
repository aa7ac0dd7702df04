//! The fair launches as goose scenarios (API.md "Launch modes"; DESIGN.md guarantees 11 and 12): `queue` (a
//! waiting room) and `draw` (a raffle). One goose user per member, one pass each: the member joins or enters, polls
//! its place like a browser tab would, and acts on what it is given (a pass, a won hold) by the same funnel rates
//! as the drop scenario: some abandon, some cancel, some are declined, the rest pay.
//!
//! Setup (`test_start`): a seller, a preorder product, the members (signed up and logged in), the drop in its mode,
//! and a poller that reads the drop every 100 ms during the run. After the run the checks (`queue::verify`,
//! `draw::verify`, pure functions of what the run saw and what Postgres holds) judge it; the summary lists them.
//!
//! Times are wall-clock milliseconds on this machine, the same clock the servers stamp passes, holds and draws
//! with (the harness only drives servers on loopback). Every loop is bounded by a deadline.

pub mod draw;
pub mod queue;

use std::collections::BTreeMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use anyhow::Context;
use chrono::{DateTime, Utc};
use goose::prelude::{GooseUser, Scenario, Transaction, TransactionFunction};
use serde::Serialize;
use serde_json::{json, Value};
use tokio::sync::watch;
use uuid::Uuid;

use crate::client::{send_retrying, Call, Reply, RetryPolicy, Targets};
use crate::config::{LaunchArgs, TargetArgs};
use crate::lock;
use crate::setup::{self, progress, Member, API};
use crate::verify::{check, Check};

/// How often the drop is read during the run, and the most readings kept.
const MONITOR_INTERVAL: Duration = Duration::from_millis(100);
const MONITOR_SNAPSHOTS_MAX: usize = 50_000;
/// How long the verification waits for the last holds to drain, on top of the hold time.
const DRAIN_SLACK: Duration = Duration::from_secs(5);
/// Timeout of the connection the verification reads Postgres through.
pub const DB_TIMEOUT: Duration = Duration::from_secs(30);

/// Wall-clock milliseconds now.
pub fn now_ms() -> i64 {
    Utc::now().timestamp_millis()
}

/// Sleeps until the wall-clock time `at_ms` (at once if it has passed).
pub async fn sleep_until_ms(at_ms: i64) {
    let wait = at_ms - now_ms();
    if wait > 0 {
        tokio::time::sleep(Duration::from_millis(wait.unsigned_abs())).await;
    }
}

/// What a member does with what it is given: a pass or a won hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Queue: never uses the pass (it expires); draw: lets the won hold expire.
    Abandon,
    Cancel,
    Decline,
    Pay,
}

/// The role of the `k`-th member given something, spread evenly over the shares as in the drop funnel (a Weyl
/// sequence), whatever order they arrive in.
pub fn role_of(k: u64, args: &LaunchArgs) -> Role {
    let x = weyl(k);
    if x < args.abandon_rate {
        Role::Abandon
    } else if x < args.abandon_rate + args.cancel_rate {
        Role::Cancel
    } else if x < args.abandon_rate + args.cancel_rate + args.decline_rate {
        Role::Decline
    } else {
        Role::Pay
    }
}

/// The `k`-th element of the golden-ratio Weyl sequence in [0, 1).
pub fn weyl(k: u64) -> f64 {
    const GOLDEN: f64 = 0.618_033_988_749_894_9;
    ((k as f64 + 0.5) * GOLDEN).fract()
}

/// The drop's counters, as `GET /drops/{id}` served them, at the time the answer came.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Snapshot {
    pub at_ms: i64,
    pub stock: i64,
    pub available: i64,
    pub held: i64,
    pub sold: i64,
    /// A queue drop's `queue.waiting`.
    pub waiting: Option<i64>,
}

impl Snapshot {
    fn of(body: &Value, at_ms: i64) -> Option<Self> {
        let int = |key: &str| body.get(key).and_then(Value::as_i64);
        Some(Self {
            at_ms,
            stock: int("stock")?,
            available: int("available")?,
            held: int("held")?,
            sold: int("sold")?,
            waiting: body
                .get("queue")
                .and_then(|q| q.get("waiting"))
                .and_then(Value::as_i64),
        })
    }

    fn conserved(&self) -> bool {
        self.available + self.held + self.sold == self.stock
    }
}

/// A hold some member got, and how it ended as far as the harness knows.
#[derive(Debug, Clone, Serialize)]
pub struct HoldSeen {
    pub member: usize,
    pub id: String,
    pub role: Role,
    /// The purchase a 200 payment named.
    pub purchase: Option<String>,
}

/// Tallies shared by every user of a run.
#[derive(Debug, Default, Serialize)]
pub struct Tally {
    pub holds: Vec<HoldSeen>,
    /// Answers nobody expected, by step and label.
    pub unexpected: BTreeMap<String, u64>,
    /// 5xx without Retry-After, and calls without an answer.
    pub server_failures: u64,
}

/// What setup made.
#[derive(Debug)]
pub struct Fixture {
    pub drop_id: String,
    pub opens_at_ms: i64,
    /// When setup finished (the pre-queue joins between this and the opening).
    pub ready_ms: i64,
    /// Queue: `pass_seconds`; draw: the draw's time.
    pub draw_at_ms: Option<i64>,
    pub members: Vec<Member>,
}

/// Which fair launch a run drives, with its own terms.
#[derive(Debug, Clone)]
pub enum Kind {
    Queue(queue::Terms),
    Draw(draw::Terms),
}

/// One run of a fair launch: shared by setup, every goose user and the verification.
#[derive(Debug)]
pub struct Launch {
    pub kind: Kind,
    pub args: LaunchArgs,
    pub target: TargetArgs,
    pub targets: Arc<Targets>,
    pub fixture: OnceLock<Fixture>,
    pub tally: Mutex<Tally>,
    /// Members given something so far (a pass, a won hold): picks each one's role.
    pub given: AtomicU64,
    pub queue_log: Mutex<Vec<queue::MemberLog>>,
    pub draw_log: Mutex<Vec<draw::MemberLog>>,
    pub draw_probes: Mutex<Vec<draw::Probe>>,
    monitor: Mutex<Option<tokio::task::JoinHandle<Vec<Snapshot>>>>,
    monitor_stop: watch::Sender<bool>,
    /// The poller's readings and the drained state, once `finish` has them.
    finished: tokio::sync::Mutex<Option<(Vec<Snapshot>, Option<Snapshot>)>>,
    reader: Mutex<Option<GooseUser>>,
}

impl Launch {
    pub fn new(
        kind: Kind,
        args: LaunchArgs,
        target: TargetArgs,
        targets: Arc<Targets>,
    ) -> Arc<Self> {
        Arc::new(Self {
            kind,
            args,
            target,
            targets,
            fixture: OnceLock::new(),
            tally: Mutex::new(Tally::default()),
            given: AtomicU64::new(0),
            queue_log: Mutex::new(Vec::new()),
            draw_log: Mutex::new(Vec::new()),
            draw_probes: Mutex::new(Vec::new()),
            monitor: Mutex::new(None),
            monitor_stop: watch::channel(false).0,
            finished: tokio::sync::Mutex::new(None),
            reader: Mutex::new(None),
        })
    }

    /// One goose user per member.
    pub fn users(&self) -> usize {
        self.args.buyers as usize
    }

    pub fn name(&self) -> &'static str {
        match self.kind {
            Kind::Queue(_) => "queue",
            Kind::Draw(_) => "draw",
        }
    }

    /// Setup, from goose's `test_start`: seller, product, members, the drop in its mode, and the poller.
    #[allow(
        clippy::too_many_lines,
        reason = "the launch's whole set-up in goose's test_start, in the order it happens"
    )]
    pub async fn setup(self: &Arc<Self>, user: &mut GooseUser) -> anyhow::Result<()> {
        let targets = &self.targets;
        let tag = setup::run_tag();
        progress(format!(
            "{} setup: seller and product (run tag {tag}); {} members over {} instance(s)",
            self.name(),
            self.args.buyers,
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
        let product = setup::preorder_product(user, targets, &seller, &tag).await?;
        let started = std::time::Instant::now();
        let members = setup::members(
            user,
            targets,
            &tag,
            self.args.buyers,
            self.target.setup_concurrency,
        )
        .await?;
        progress(format!(
            "{} setup: {} members ready in {:.1} s",
            self.name(),
            members.len(),
            started.elapsed().as_secs_f64()
        ));
        let now = Utc::now();
        let opens_at = now + chrono::Duration::milliseconds(i64::try_from(self.args.opens_in_ms)?);
        let mut body = json!({
            "product_id": product,
            "stock": self.args.stock,
            "opens_at": setup::rfc3339(opens_at),
            "per_member_limit": 1,
            "hold_seconds": self.args.hold_seconds,
        });
        let mut draw_at_ms = None;
        match &self.kind {
            Kind::Queue(terms) => {
                body["mode"] = json!("queue");
                body["queue_opens_at"] = json!(setup::rfc3339(now));
                body["pass_seconds"] = json!(terms.pass_seconds);
                if let Some(rate) = terms.admit_per_second {
                    body["admit_per_second"] = json!(rate);
                }
            }
            Kind::Draw(terms) => {
                let draw_at = opens_at
                    + chrono::Duration::milliseconds(i64::try_from(terms.entry_window_ms)?);
                let closes_at =
                    draw_at + chrono::Duration::milliseconds(i64::try_from(terms.closes_after_ms)?);
                body["mode"] = json!("draw");
                body["draw_at"] = json!(setup::rfc3339(draw_at));
                body["closes_at"] = json!(setup::rfc3339(closes_at));
                draw_at_ms = Some(draw_at.timestamp_millis());
            }
        }
        let (drop_id, opens_at) = setup::create_drop(user, targets, &seller, body).await?;
        progress(format!(
            "{} setup: drop {drop_id}: {} units, hold {} s, opens at {}",
            self.name(),
            self.args.stock,
            self.args.hold_seconds,
            setup::rfc3339(opens_at)
        ));
        let fixture = Fixture {
            drop_id,
            opens_at_ms: opens_at.timestamp_millis(),
            ready_ms: now_ms(),
            draw_at_ms,
            members,
        };
        anyhow::ensure!(self.fixture.set(fixture).is_ok(), "set up twice");
        *lock(&self.reader) = Some(user.clone());
        let monitor = tokio::spawn(monitor(
            Arc::clone(self),
            user.clone(),
            self.monitor_stop.subscribe(),
        ));
        *lock(&self.monitor) = Some(monitor);
        Ok(())
    }

    /// The goose scenario: each user takes its member and runs that member's whole part once.
    pub fn scenario(self: &Arc<Self>) -> Scenario {
        let launch = Arc::clone(self);
        let function: TransactionFunction = Arc::new(move |user| {
            let launch = Arc::clone(&launch);
            Box::pin(async move {
                // Without a fixture, setup failed (it said why, and stopped the run).
                if let Some(fixture) = launch.fixture.get() {
                    let index = user.weighted_users_index % fixture.members.len().max(1);
                    match &launch.kind {
                        Kind::Queue(terms) => {
                            let log = queue::take_part(&launch, fixture, terms, user, index).await;
                            lock(&launch.queue_log).push(log);
                        }
                        Kind::Draw(terms) => {
                            let log = draw::take_part(&launch, fixture, terms, user, index).await;
                            lock(&launch.draw_log).push(log);
                        }
                    }
                }
                Ok(())
            })
        });
        Scenario::new(self.name()).register_transaction(Transaction::new(function).set_name(
            match self.kind {
                Kind::Queue(_) => "join, wait, reserve with the pass",
                Kind::Draw(_) => "enter, wait for the draw, act on the result",
            },
        ))
    }

    /// Counts an answer nobody expected under `step`.
    pub fn unexpected(&self, step: &str, reply: &Reply) {
        let mut tally = lock(&self.tally);
        *tally
            .unexpected
            .entry(format!("{step}: {}", reply.label()))
            .or_default() += 1;
        if reply.is_server_failure() {
            tally.server_failures += 1;
        }
    }

    /// Sends with the buyers' retry policy; a 5xx or no answer is tallied.
    pub async fn send(
        &self,
        user: &mut GooseUser,
        call: &Call,
        expect: crate::client::Expect,
    ) -> Reply {
        let reply = send_retrying(user, &self.targets, call, RetryPolicy::OVERLOAD, expect).await;
        if reply.is_server_failure() {
            lock(&self.tally).server_failures += 1;
        }
        reply
    }

    /// Pays (or is declined), cancels or abandons a hold as `role` says, through another instance than `member`'s
    /// home; records it.
    pub async fn settle(&self, user: &mut GooseUser, member: usize, hold: String, role: Role) {
        let Some(fixture) = self.fixture.get() else {
            return;
        };
        let who = &fixture.members[member];
        let on = self.targets.next(who.home, 1);
        let pay = |token: &str| {
            Call::post(
                "/reservations/{id}/payment",
                format!("{API}/reservations/{hold}/payment"),
                json!({ "payment_token": token }),
            )
            .auth(&who.token)
            .idempotency_key(Uuid::new_v4().to_string())
            .on(on)
        };
        let mut purchase = None;
        match role {
            Role::Pay => {
                let reply = self.send(user, &pay("tok_ok"), |r| r.status == 200).await;
                match reply.str_field("purchase_id") {
                    Some(id) if reply.status == 200 => purchase = Some(id.to_owned()),
                    _ => self.unexpected("pay tok_ok", &reply),
                }
            }
            Role::Decline => {
                let reply = self
                    .send(user, &pay("tok_declined"), |r| {
                        r.status == 402 && r.error_code() == Some("payment_declined")
                    })
                    .await;
                if reply.status != 402 {
                    self.unexpected("pay tok_declined", &reply);
                }
            }
            Role::Cancel => {
                let call = Call::delete("/reservations/{id}", format!("{API}/reservations/{hold}"))
                    .auth(&who.token)
                    .on(on);
                let reply = self.send(user, &call, |r| r.status == 204).await;
                if reply.status != 204 {
                    self.unexpected("cancel", &reply);
                }
            }
            Role::Abandon => {}
        }
        lock(&self.tally).holds.push(HoldSeen {
            member,
            id: hold,
            role,
            purchase,
        });
    }

    /// After goose: stops the poller, waits for the holds to drain, and reads the drop's last state (once; later
    /// calls answer the same).
    pub async fn finish(&self) -> anyhow::Result<(Vec<Snapshot>, Option<Snapshot>)> {
        let mut finished = self.finished.lock().await;
        if let Some(done) = finished.as_ref() {
            return Ok(done.clone());
        }
        let done = self.drain().await?;
        *finished = Some(done.clone());
        Ok(done)
    }

    async fn drain(&self) -> anyhow::Result<(Vec<Snapshot>, Option<Snapshot>)> {
        let _ = self.monitor_stop.send(true);
        let monitor = lock(&self.monitor).take();
        let snapshots = match monitor {
            Some(task) => task.await.context("the drop poller panicked")?,
            None => Vec::new(),
        };
        let Some(fixture) = self.fixture.get() else {
            return Ok((snapshots, None));
        };
        let Some(mut user) = lock(&self.reader).clone() else {
            return Ok((snapshots, None));
        };
        let deadline = now_ms()
            + i64::from(self.args.hold_seconds) * 1000
            + i64::try_from(DRAIN_SLACK.as_millis())?;
        let mut last = None;
        loop {
            last = read_drop(&mut user, &self.targets, &fixture.drop_id, 0)
                .await
                .or(last);
            if last.is_some_and(|s: Snapshot| s.held == 0) || now_ms() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        Ok((snapshots, last))
    }

    /// The drop as every instance serves it now.
    pub async fn on_every_instance(&self) -> Vec<Option<Snapshot>> {
        let (Some(fixture), Some(mut user)) = (self.fixture.get(), lock(&self.reader).clone())
        else {
            return Vec::new();
        };
        let mut states = Vec::new();
        for instance in 0..self.targets.count() {
            states.push(read_drop(&mut user, &self.targets, &fixture.drop_id, instance).await);
        }
        states
    }

    /// A goose user for reads after the run.
    pub fn reader(&self) -> Option<GooseUser> {
        lock(&self.reader).clone()
    }
}

async fn read_drop(
    user: &mut GooseUser,
    targets: &Targets,
    drop: &str,
    instance: usize,
) -> Option<Snapshot> {
    let call = Call::get("/drops/{id}", format!("{API}/drops/{drop}")).on(instance);
    let reply = send_retrying(user, targets, &call, RetryPolicy::OVERLOAD, |r| {
        r.status == 200
    })
    .await;
    (reply.status == 200)
        .then(|| Snapshot::of(&reply.body, now_ms()))
        .flatten()
}

/// Reads the drop every `MONITOR_INTERVAL`, round robin over the instances, until told to stop.
async fn monitor(
    launch: Arc<Launch>,
    mut user: GooseUser,
    mut stop: watch::Receiver<bool>,
) -> Vec<Snapshot> {
    let Some(fixture) = launch.fixture.get() else {
        return Vec::new();
    };
    let mut snapshots = Vec::new();
    let mut instance = 0;
    while !*stop.borrow() && snapshots.len() < MONITOR_SNAPSHOTS_MAX {
        if let Some(snapshot) =
            read_drop(&mut user, &launch.targets, &fixture.drop_id, instance).await
        {
            snapshots.push(snapshot);
        }
        instance = launch.targets.next(instance, 1);
        tokio::select! {
            () = tokio::time::sleep(MONITOR_INTERVAL) => {}
            _ = stop.changed() => {}
        }
    }
    snapshots
}

/// What Postgres holds of a fair launch's drop, for both modes.
#[derive(Debug, Clone, Default, Serialize)]
pub struct DbFacts {
    /// Every reservation of the drop: (id, member, created_at ms).
    pub reservations: Vec<(String, String, i64)>,
    pub purchase_rows: i64,
    pub purchase_units: i64,
    pub distinct_reservations: i64,
    /// Members with more units than the limit (1).
    pub members_over_limit: i64,
    /// Purchase ids of the drop.
    pub purchases: Vec<String>,
}

pub async fn db_facts(client: &tokio_postgres::Client, drop: &str) -> anyhow::Result<DbFacts> {
    let drop: Uuid = drop.parse().context("the drop id")?;
    let reservations = client
        .query(
            "SELECT id::text, member_id::text, (extract(epoch FROM created_at) * 1000)::bigint \
             FROM stored_holds WHERE drop_id = $1",
            &[&drop],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    let row = client
        .query_one(
            "SELECT count(*), coalesce(sum(quantity), 0)::bigint, count(DISTINCT reservation_id), \
                    (SELECT count(*) FROM (SELECT member_id FROM purchases WHERE drop_id = $1 \
                        GROUP BY member_id HAVING sum(quantity) > 1) o) \
             FROM purchases WHERE drop_id = $1",
            &[&drop],
        )
        .await?;
    let purchases = client
        .query(
            "SELECT id::text FROM purchases WHERE drop_id = $1",
            &[&drop],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    Ok(DbFacts {
        reservations,
        purchase_rows: row.get(0),
        purchase_units: row.get(1),
        distinct_reservations: row.get(2),
        members_over_limit: row.get(3),
        purchases,
    })
}

/// The checks every fair launch shares: the drop's counters, what was sold against what was paid, and the 5xx.
#[allow(
    clippy::too_many_lines,
    reason = "every stock check in report order, each beside the numbers it compares"
)]
pub fn stock_checks(
    stock: i64,
    snapshots: &[Snapshot],
    last: Option<Snapshot>,
    instances: &[Option<Snapshot>],
    db: &DbFacts,
    holds: &[HoldSeen],
    server_failures: u64,
) -> Vec<Check> {
    let mut checks = Vec::new();
    let broken = snapshots
        .iter()
        .chain(&last)
        .filter(|s| !s.conserved() || s.stock != stock || s.available < 0)
        .count();
    checks.push(check(
        "conservation",
        broken == 0 && !snapshots.is_empty() && last.is_some(),
        format!(
            "available + held + sold == {stock}, none negative: {broken} broken of {} readings",
            snapshots.len() + usize::from(last.is_some())
        ),
    ));
    let acknowledged: Vec<&str> = holds.iter().filter_map(|h| h.purchase.as_deref()).collect();
    let paid = i64::try_from(acknowledged.len()).unwrap_or(i64::MAX);
    match last {
        Some(last) => checks.push(check(
            "sold <= stock, sold == 200 payments, holds drained",
            last.sold <= stock && last.sold == paid && last.held == 0,
            format!(
                "sold {} of {stock}, {paid} payments answered 200, held {} at the end",
                last.sold, last.held
            ),
        )),
        None => checks.push(check(
            "sold <= stock, sold == 200 payments, holds drained",
            false,
            "the drop could not be read after the run".to_owned(),
        )),
    }
    let differing = instances
        .iter()
        .filter(|s| match (s, last) {
            (Some(s), Some(last)) => {
                (s.available, s.held, s.sold) != (last.available, last.held, last.sold)
            }
            _ => true,
        })
        .count();
    checks.push(check(
        "every instance serves the same counts",
        differing == 0,
        format!("{differing} of {} instance(s) differ", instances.len()),
    ));
    let stored: std::collections::HashSet<&str> = db.purchases.iter().map(String::as_str).collect();
    let missing = acknowledged
        .iter()
        .filter(|id| !stored.contains(**id))
        .count();
    checks.push(check(
        "every 200 payment stored, one purchase per reservation",
        missing == 0
            && db.purchase_rows == paid
            && db.distinct_reservations == db.purchase_rows
            && db.purchase_units <= stock,
        format!(
            "{paid} purchases acknowledged, {missing} missing; {} rows ({} units) over {} reservations",
            db.purchase_rows, db.purchase_units, db.distinct_reservations
        ),
    ));
    checks.push(check(
        "per-member limit",
        db.members_over_limit == 0,
        format!("{} member(s) over the limit of 1", db.members_over_limit),
    ));
    checks.push(check(
        "no server errors",
        server_failures == 0,
        format!("{server_failures} 5xx (without Retry-After) or calls without an answer"),
    ));
    checks
}

/// A finished fair launch: the checks, and the figures worth reporting, as the summary file stores them.
#[derive(Debug, Serialize)]
pub struct LaunchSummary {
    pub scenario: &'static str,
    pub passed: bool,
    pub drop_id: Option<String>,
    pub args: LaunchArgs,
    pub figures: BTreeMap<&'static str, Value>,
    pub unexpected: BTreeMap<String, u64>,
    pub checks: Vec<Check>,
    pub thresholds_failed: Vec<String>,
    pub report_files: Vec<String>,
}

impl LaunchSummary {
    pub fn render(&self) -> String {
        use std::fmt::Write as _;
        let mut out = format!(
            "\n{} summary (drop {})\n",
            self.scenario,
            self.drop_id.as_deref().unwrap_or("-")
        );
        for (name, value) in &self.figures {
            let _ = writeln!(out, "  {name:<34} {value}");
        }
        for (what, count) in &self.unexpected {
            let _ = writeln!(out, "  unexpected: {what} x{count}");
        }
        out.push_str(&crate::summary::render_checks(&self.checks));
        for rule in &self.thresholds_failed {
            let _ = writeln!(out, "  FAIL  threshold {rule}");
        }
        let _ = writeln!(
            out,
            "\nflashsale-load {}: {}",
            self.scenario,
            if self.passed { "PASS" } else { "FAIL" }
        );
        out
    }

    pub fn write_json(&self, path: &std::path::Path) -> anyhow::Result<()> {
        crate::summary::write_json(self, path)
    }
}

/// Parses an RFC 3339 time field of a body into milliseconds.
pub fn time_ms(body: &Value, key: &str) -> Option<i64> {
    body.get(key)?
        .as_str()?
        .parse::<DateTime<Utc>>()
        .ok()
        .map(|t| t.timestamp_millis())
}
