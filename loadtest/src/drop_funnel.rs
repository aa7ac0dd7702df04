//! The drop funnel, end to end against a running server:
//!
//! 1. setup: the admin logs in and promotes a fresh seller, who creates a preorder product; every buyer signs up
//!    and logs in (bounded concurrency: argon2 is the cost); then the seller creates the drop, opening
//!    `opens_in_ms` later, and the driver opens its connections;
//! 2. spike: at `opens_at` every buyer fires its reservation attempts at once;
//! 3. settle: each hold is paid, declined, cancelled or abandoned by the configured shares; buyers refused with
//!    `sold_out` keep retrying (jittered backoff, until a deadline) while that stock comes back, and pay for what
//!    they get;
//! 4. verify: wait out the abandoned holds, read the drop (on every instance), the released reservations and
//!    Postgres, and check the invariants (`verify::verify`).
//!
//! With several instances (one Redis, one Postgres), setup goes to the first; buyer `i` signs up, logs in and
//! reserves on instance `i mod n`; each hold is paid or cancelled on the instance after the one that granted it,
//! and read back on yet another; retries of idempotent requests move on to the next instance; the poller reads
//! the drop on every instance.
//!
//! Every loop here is bounded by a count or a deadline, so a run ends by itself whatever the server does.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use chrono::{DateTime, SecondsFormat, Utc};
use futures_util::future::join_all;
use futures_util::{StreamExt, TryStreamExt};
use serde::Serialize;
use serde_json::{json, Value};
use tokio::sync::watch;
use uuid::Uuid;

use crate::api::{jitter, Api, Reply, Request, RetryPolicy};
use crate::config::DropArgs;
use crate::metrics::Phase;
use crate::report::{InstanceReport, Milestones, PhaseReport, Report};
use crate::verify::{self, DbFacts, DropCounts, Observations};

const API: &str = "/api/v1";
const EP_HEALTH: &str = "GET /healthz";
const EP_SIGNUP: &str = "POST /members";
const EP_LOGIN: &str = "POST /auth/login";
const EP_ROLE: &str = "PUT /members/{id}/role";
const EP_PRODUCT: &str = "POST /products";
const EP_CREATE_DROP: &str = "POST /drops";
const EP_DROP: &str = "GET /drops/{id}";
const EP_RESERVE: &str = "POST /drops/{id}/reservations";
const EP_PAY: &str = "POST /reservations/{id}/payment";
const EP_CANCEL: &str = "DELETE /reservations/{id}";
const EP_RESERVATION: &str = "GET /reservations/{id}";

/// Buyer accounts are throwaway; a per-run tag in their emails keeps reruns against one database apart.
const BUYER_PASSWORD: &str = "demo-buyer-password";
const PRODUCT_PRICE: i64 = 129_000;

/// A reservation that lands a hair before `opens_at` (clock granularity) is tried again this often.
const NOT_OPEN_RETRIES_MAX: u32 = 20;
const NOT_OPEN_RETRY_DELAY: Duration = Duration::from_millis(20);
/// Backoff of buyers waiting for stock to come back: doubling from the minimum to the maximum, jittered.
const RESTOCK_DELAY_MIN: Duration = Duration::from_millis(100);
const RESTOCK_DELAY_MAX: Duration = Duration::from_millis(1600);
/// Most reservation tries of one waiting buyer, whatever the deadline.
const RESTOCK_TRIES_MAX: u32 = 200;
/// How often the drop state is polled during the run, and the most snapshots kept.
const MONITOR_INTERVAL: Duration = Duration::from_millis(100);
const MONITOR_SNAPSHOTS_MAX: usize = 20_000;
/// How often the drop is read while waiting for expired holds, and the slack on top of expiry + reaper interval.
const DRAIN_POLL_INTERVAL: Duration = Duration::from_millis(250);
const DRAIN_SLACK: Duration = Duration::from_secs(3);
/// Most released holds read back one by one after the run.
const RELEASED_CHECKS_MAX: usize = 2_000;
/// Probe "not open yet" only when at least this much time is left before `opens_at`.
const EARLY_PROBE_MARGIN: Duration = Duration::from_millis(300);
/// Timeout of each verification query.
const DB_TIMEOUT: Duration = Duration::from_secs(15);

/// What a holder does with a hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Pay,
    Decline,
    Cancel,
    Abandon,
}

/// Shares of holds that are declined, cancelled and abandoned; the rest are paid.
#[derive(Debug, Clone, Copy)]
pub struct Shares {
    pub decline: f64,
    pub cancel: f64,
    pub abandon: f64,
}

/// The role of the `k`-th hold of the spike. A Weyl sequence (multiples of the golden ratio, mod 1) spreads
/// over [0, 1) so evenly that every prefix of holders gets the shares to within a hold or two, without a lock
/// or a random seed, whatever order holds arrive in.
pub fn role_of(k: u64, shares: Shares) -> Role {
    const GOLDEN: f64 = 0.618_033_988_749_894_9;
    let x = ((k as f64 + 0.5) * GOLDEN).fract();
    if x < shares.decline {
        Role::Decline
    } else if x < shares.decline + shares.cancel {
        Role::Cancel
    } else if x < shares.decline + shares.cancel + shares.abandon {
        Role::Abandon
    } else {
        Role::Pay
    }
}

/// A signed-in buyer.
#[derive(Debug, Clone)]
struct Buyer {
    token: String,
    /// The instance it signs up, logs in and reserves on.
    home: usize,
}

/// A hold as the reservation answer gave it.
#[derive(Debug, Clone)]
struct Hold {
    id: String,
    expires_at: DateTime<Utc>,
    /// The instance that granted it.
    granted_by: usize,
}

impl Hold {
    fn from_reply(reply: &Reply) -> Option<Self> {
        Some(Self {
            id: reply.str_field("id")?.to_owned(),
            expires_at: reply.str_field("expires_at")?.parse().ok()?,
            granted_by: reply.instance,
        })
    }
}

/// A released hold to read back after the run.
#[derive(Debug, Clone)]
struct Released {
    id: String,
    /// Its owner's token.
    token: String,
    /// The reason it must carry.
    reason: &'static str,
    /// Where to read it: the instance after the last one that touched it.
    read_on: usize,
}

/// What buyers did and were told, beyond the per-endpoint status counts.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Outcomes {
    /// Final answers to the attempts fired at the opening instant (after any 429/503 retries).
    pub spike_answers: BTreeMap<String, u64>,
    /// Answers to the reservation retries of buyers waiting for stock to come back.
    pub restock_answers: BTreeMap<String, u64>,
    pub holds_in_spike: u64,
    pub holds_in_restock: u64,
    pub paid: u64,
    pub declined: u64,
    pub cancelled: u64,
    pub abandoned: u64,
    /// Buyers refused with `sold_out` (or overloaded) who then waited for stock to come back.
    pub waiting_buyers: u64,
    /// Of those, buyers still short of their units when they stopped.
    pub unserved_buyers: u64,
    /// Answers no step expected, by step and answer (e.g. `pay: 409 hold_expired`).
    pub unexpected: BTreeMap<String, u64>,
}

#[derive(Debug, Default)]
struct Tally {
    outcomes: Outcomes,
    /// `purchase_id`s of 200 payments.
    purchases: Vec<String>,
    /// Released holds to read back.
    released: Vec<Released>,
    /// The latest expiry of any hold granted, to bound the wait for the reaper.
    latest_expiry: Option<DateTime<Utc>>,
}

/// Shared by every buyer task of a run.
struct Ctx {
    api: Arc<Api>,
    drop_id: String,
    opens_at: tokio::time::Instant,
    attempts: u32,
    /// Units each buyer wants: its attempts, but never past the per-member limit.
    want: u32,
    stock: u64,
    shares: Shares,
    restock_window: Duration,
    holds_assigned: AtomicU64,
    units_paid: AtomicU64,
    /// Microseconds from `opens_at` to the last spike attempt's final answer.
    spike_end_us: AtomicU64,
    /// Set once every unit is paid: nothing can come back to sale, so waiting buyers stop.
    sold_out_for_good: watch::Sender<bool>,
    tally: Mutex<Tally>,
}

impl Ctx {
    fn tally<R>(&self, f: impl FnOnce(&mut Tally) -> R) -> R {
        // Only plain counter updates run under this lock; a poisoned one still holds usable counts.
        let mut tally = self
            .tally
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        f(&mut tally)
    }

    fn unexpected(&self, step: &str, reply: &Reply) {
        let key = format!("{step}: {}", reply.label());
        self.tally(|t| *t.outcomes.unexpected.entry(key).or_default() += 1);
    }

    fn reserve_request(&self, buyer: &Buyer) -> Request {
        Request::post(
            format!("{API}/drops/{}/reservations", self.drop_id),
            json!({ "quantity": 1 }),
        )
        .auth(&buyer.token)
        .idempotency_key(Uuid::new_v4().to_string())
        .on(buyer.home)
    }

    fn release(&self, hold: Hold, buyer: &Buyer, reason: &'static str, last_touched_by: usize) {
        let released = Released {
            id: hold.id,
            token: buyer.token.clone(),
            reason,
            read_on: self.api.next_instance(last_touched_by, 1),
        };
        self.tally(|t| t.released.push(released));
    }
}

/// Runs the whole funnel and returns the report (`report.passed` says whether every invariant held).
pub async fn run(args: &DropArgs) -> anyhow::Result<Report> {
    args.validate()?;
    let started_at = Utc::now();
    let run_started = Instant::now();
    let api = Arc::new(Api::new(
        &args.base_urls,
        args.concurrency,
        Duration::from_millis(args.request_timeout_ms),
    )?);
    let instances = api.instances();
    for (i, base) in args.base_urls.iter().enumerate() {
        let health = api
            .send(Phase::Setup, EP_HEALTH, &Request::get("/healthz").on(i))
            .await;
        if health.status != 200 {
            bail!("{base} does not answer /healthz (got {})", health.label());
        }
    }

    // ---- setup
    let tag = Uuid::new_v4().simple().to_string()[..8].to_owned();
    progress(format!(
        "setup: admin login, seller, product (run tag {tag}) on {}{}",
        args.base_urls[0],
        if instances > 1 {
            format!("; buyers spread over {instances} instances")
        } else {
            String::new()
        }
    ));
    let admin = login(&api, 0, &args.admin_email, &args.admin_password)
        .await
        .context("admin login (was `flashsale admin create` run with these credentials?)")?;
    let seller_email = format!("seller-{tag}@demo.flashsale.local");
    let seller_id = signup(&api, 0, &seller_email, "Demo seller").await?;
    let promoted = api
        .send(
            Phase::Setup,
            EP_ROLE,
            &Request::put(
                format!("{API}/members/{seller_id}/role"),
                json!({ "role": "seller" }),
            )
            .auth(&admin),
        )
        .await;
    expect(&promoted, 200, "promoting the seller")?;
    let seller = login(&api, 0, &seller_email, BUYER_PASSWORD).await?;
    let product = api
        .send(
            Phase::Setup,
            EP_PRODUCT,
            &Request::post(
                format!("{API}/products"),
                json!({
                    "name": format!("Demo sneaker {tag}"),
                    "description": "flashsale-load demo drop",
                    "price": PRODUCT_PRICE,
                    "currency": "KRW",
                    "kind": "preorder",
                }),
            )
            .auth(&seller),
        )
        .await;
    let product_id = expect_field(&product, 201, "creating the product", "id")?;

    progress(format!(
        "setup: signing up and logging in {} buyers ({} at a time)",
        args.buyers, args.setup_concurrency
    ));
    let buyers_started = Instant::now();
    let buyers: Vec<Buyer> = futures_util::stream::iter(0..args.buyers)
        .map(|i| {
            let api = &api;
            let email = format!("buyer-{tag}-{i}@demo.flashsale.local");
            let home = api.next_instance(i as usize, 0);
            async move {
                signup(api, home, &email, &format!("Buyer {i}")).await?;
                let token = login(api, home, &email, BUYER_PASSWORD).await?;
                anyhow::Ok(Buyer { token, home })
            }
        })
        .buffer_unordered(args.setup_concurrency)
        .try_collect()
        .await
        .context("signing up buyers")?;
    let buyers_seconds = buyers_started.elapsed().as_secs_f64();
    progress(format!(
        "setup: {} buyers ready in {buyers_seconds:.1} s",
        buyers.len()
    ));

    let opens_at_wanted =
        Utc::now() + chrono::Duration::milliseconds(i64::try_from(args.opens_in_ms)?);
    let created = api
        .send(
            Phase::Setup,
            EP_CREATE_DROP,
            &Request::post(
                format!("{API}/drops"),
                json!({
                    "product_id": product_id,
                    "stock": args.stock,
                    "opens_at": opens_at_wanted.to_rfc3339_opts(SecondsFormat::Millis, true),
                    "per_member_limit": args.per_member_limit,
                    "hold_seconds": args.hold_seconds,
                }),
            )
            .auth(&seller),
        )
        .await;
    let drop_id = expect_field(&created, 201, "creating the drop", "id")?;
    let opens_at: DateTime<Utc> = expect_field(&created, 201, "creating the drop", "opens_at")?
        .parse()
        .context("creating the drop: opens_at is not a time")?;
    let opens_at_instant = instant_of(opens_at);
    progress(format!(
        "setup: drop {drop_id}: {} units, limit {}, hold {} s, opens at {}",
        args.stock,
        args.per_member_limit,
        args.hold_seconds,
        opens_at.to_rfc3339_opts(SecondsFormat::Millis, true)
    ));

    // One reservation before opening must be refused, on every instance; skipped when the opening is too close
    // to tell.
    let early_probe = if opens_at_instant.saturating_duration_since(tokio::time::Instant::now())
        > EARLY_PROBE_MARGIN
    {
        let buyer = &buyers[0];
        let mut answers = Vec::with_capacity(instances);
        for instance in 0..instances {
            let reply = api
                .send(
                    Phase::Setup,
                    EP_RESERVE,
                    &Request::post(
                        format!("{API}/drops/{drop_id}/reservations"),
                        json!({ "quantity": 1 }),
                    )
                    .auth(&buyer.token)
                    .on(instance),
                )
                .await;
            if reply.status == 201 {
                // A bug in the server; give the unit back so the rest of the run still means something.
                if let Some(hold) = Hold::from_reply(&reply) {
                    api.send(
                        Phase::Setup,
                        EP_CANCEL,
                        &Request::delete(format!("{API}/reservations/{}", hold.id))
                            .auth(&buyer.token)
                            .on(instance),
                    )
                    .await;
                }
            }
            answers.push(reply.label());
        }
        Some(early_probe_answer(&answers))
    } else {
        None
    };

    // Open the connections the spike will use, as real clients would have them open already.
    let total_attempts = args.buyers as usize * args.attempts_per_buyer as usize;
    let warm = args.concurrency.min(total_attempts);
    let health: Vec<Request> = (0..instances)
        .map(|i| Request::get("/healthz").on(i))
        .collect();
    join_all((0..warm).map(|k| api.send(Phase::Setup, EP_HEALTH, &health[k % instances]))).await;
    let setup_seconds = run_started.elapsed().as_secs_f64();

    // ---- spike and settle
    let (stop_tx, _) = watch::channel(false);
    let ctx = Arc::new(Ctx {
        api: Arc::clone(&api),
        drop_id: drop_id.clone(),
        opens_at: opens_at_instant,
        attempts: args.attempts_per_buyer,
        want: args.attempts_per_buyer.min(args.per_member_limit),
        stock: u64::from(args.stock),
        shares: Shares {
            decline: args.decline_share,
            cancel: args.cancel_share,
            abandon: args.abandon_share,
        },
        restock_window: Duration::from_secs(
            u64::from(args.hold_seconds) + args.restock_slack_seconds,
        ),
        holds_assigned: AtomicU64::new(0),
        units_paid: AtomicU64::new(0),
        spike_end_us: AtomicU64::new(0),
        sold_out_for_good: stop_tx,
        tally: Mutex::new(Tally::default()),
    });
    let (monitor_stop, monitor_stop_rx) = watch::channel(false);
    let monitor = tokio::spawn(monitor(
        Arc::clone(&api),
        drop_id.clone(),
        opens_at_instant,
        monitor_stop_rx,
    ));
    progress(format!(
        "spike: {} buyers x {} attempts waiting for the opening",
        args.buyers, args.attempts_per_buyer
    ));
    let tasks: Vec<_> = buyers
        .iter()
        .cloned()
        .map(|buyer| tokio::spawn(buyer_flow(Arc::clone(&ctx), buyer)))
        .collect();
    for task in join_all(tasks).await {
        task.context("a buyer task panicked")?;
    }
    let settle_seconds = opens_at_instant.elapsed().as_secs_f64();
    let spike_seconds = ctx.spike_end_us.load(Ordering::Relaxed) as f64 / 1e6;
    progress(format!(
        "spike: attempts answered in {spike_seconds:.2} s; settle: done after {settle_seconds:.1} s"
    ));

    // ---- verify
    let verify_started = Instant::now();
    let latest_expiry = ctx.tally(|t| t.latest_expiry);
    let drain_deadline = latest_expiry.map_or_else(tokio::time::Instant::now, instant_of)
        + Duration::from_millis(args.reaper_interval_ms)
        + DRAIN_SLACK;
    progress(format!(
        "verify: waiting up to {:.1} s for expired holds to return",
        drain_deadline
            .saturating_duration_since(tokio::time::Instant::now())
            .as_secs_f64()
    ));
    let final_drop = wait_for_drained(&api, &drop_id, drain_deadline).await;
    let _ = monitor_stop.send(true);
    let mut timeline = monitor.await.context("the monitor task panicked")?;
    // The poller may stop just before the last sale; the drained reading closes the timeline.
    if let Some((counts, status)) = &final_drop {
        timeline.push(Snapshot {
            t_ms: ms_since(opens_at_instant),
            instance: 0,
            counts: *counts,
            status: status.clone(),
        });
    }
    // Then every instance must serve the same counts (the first included: read again, after the others' reads).
    let instance_finals = if instances > 1 {
        join_all((0..instances).map(|i| read_drop(&api, Phase::Verify, &drop_id, i))).await
    } else {
        vec![final_drop.clone()]
    };

    let (outcomes, purchases, released) = ctx.tally(|t| {
        (
            t.outcomes.clone(),
            std::mem::take(&mut t.purchases),
            std::mem::take(&mut t.released),
        )
    });
    let (released_checked, released_mismatched) = check_released(&api, &released).await;
    progress("verify: reading purchases from Postgres".to_owned());
    let db = db_facts(args, &drop_id, &purchases).await?;
    let verify_seconds = verify_started.elapsed().as_secs_f64();
    let sent = api.sent_per_instance();
    let instance_reports: Vec<InstanceReport> = args
        .base_urls
        .iter()
        .zip(&instance_finals)
        .zip(sent)
        .map(|((base, reading), requests)| InstanceReport {
            base_url: base.clone(),
            requests,
            final_state: reading.as_ref().map(|(counts, _)| *counts),
            final_status: reading.as_ref().map(|(_, status)| status.clone()),
        })
        .collect();

    let observations = Observations {
        stock: i64::from(args.stock),
        snapshots: timeline.iter().map(|s| s.counts).collect(),
        final_state: final_drop.as_ref().map(|(counts, _)| *counts),
        db,
        units_acknowledged: i64::try_from(ctx.units_paid.load(Ordering::Relaxed))?,
        unserved_buyers: i64::try_from(outcomes.unserved_buyers)?,
        early_probe,
        released_checked,
        released_mismatched,
        instance_finals: instance_reports.iter().map(|i| i.final_state).collect(),
    };
    let checks = verify::verify(&observations);
    let recorder = api.recorder();
    let phase = |phase: Phase, seconds: f64| PhaseReport::new(phase, seconds, recorder);
    Ok(Report {
        started_at,
        finished_at: Utc::now(),
        base_url: args.base_urls[0].clone(),
        instances: instance_reports,
        config: args.clone(),
        drop_id,
        opens_at,
        buyers_ready_seconds: buyers_seconds,
        phases: vec![
            phase(Phase::Setup, setup_seconds),
            phase(Phase::Spike, spike_seconds),
            phase(Phase::Settle, settle_seconds),
            phase(Phase::Verify, verify_seconds),
            phase(Phase::Monitor, settle_seconds + verify_seconds),
        ],
        outcomes,
        final_state: observations.final_state,
        final_status: final_drop.map(|(_, status)| status),
        db: observations.db,
        milestones: Milestones::from_timeline(&timeline),
        timeline,
        passed: verify::passed(&checks),
        checks,
    })
}

/// One buyer: wait for the opening, fire every attempt at once, act on the holds, wait for stock if refused.
async fn buyer_flow(ctx: Arc<Ctx>, buyer: Buyer) {
    tokio::time::sleep_until(ctx.opens_at).await;
    let answers = join_all((0..ctx.attempts).map(|_| spike_attempt(&ctx, &buyer))).await;
    let done_us = u64::try_from(ctx.opens_at.elapsed().as_micros()).unwrap_or(u64::MAX);
    ctx.spike_end_us.fetch_max(done_us, Ordering::Relaxed);

    let mut got = 0u32;
    let mut refused_for_now = false;
    for reply in &answers {
        ctx.tally(|t| *t.outcomes.spike_answers.entry(reply.label()).or_default() += 1);
        match (reply.status, reply.error_code()) {
            (201, _) => {
                got += 1;
                let Some(hold) = Hold::from_reply(reply) else {
                    ctx.unexpected("reserve (bad body)", reply);
                    continue;
                };
                ctx.tally(|t| t.outcomes.holds_in_spike += 1);
                let k = ctx.holds_assigned.fetch_add(1, Ordering::Relaxed);
                act_on_hold(&ctx, &buyer, hold, role_of(k, ctx.shares), Phase::Settle).await;
            }
            (409, Some("sold_out")) | (429 | 503, _) => refused_for_now = true,
            (409, Some("limit_exceeded")) => {}
            _ => ctx.unexpected("reserve", reply),
        }
    }
    if got < ctx.want && refused_for_now {
        wait_for_stock(&ctx, &buyer, ctx.want - got).await;
    }
}

/// One attempt at the opening instant: 429/503 retried as the server asks, `not_open` retried briefly in case
/// the driver's timer fired a hair early. Each retry (same `Idempotency-Key`) goes to the next instance.
async fn spike_attempt(ctx: &Ctx, buyer: &Buyer) -> Reply {
    let mut request = ctx.reserve_request(buyer);
    let mut reply = ctx
        .api
        .send_retrying(Phase::Spike, EP_RESERVE, &request, RetryPolicy::OVERLOAD)
        .await;
    for _ in 0..NOT_OPEN_RETRIES_MAX {
        if reply.error_code() != Some("not_open") {
            break;
        }
        tokio::time::sleep(NOT_OPEN_RETRY_DELAY).await;
        request = request.on(ctx.api.next_instance(reply.instance, 1));
        reply = ctx
            .api
            .send_retrying(Phase::Spike, EP_RESERVE, &request, RetryPolicy::OVERLOAD)
            .await;
    }
    reply
}

/// A buyer refused at the opening retries, backing off, until it has its units, the deadline passes, or every
/// unit is paid (then nothing can come back). Whatever it gets now it pays for: it came back to buy.
async fn wait_for_stock(ctx: &Ctx, buyer: &Buyer, mut missing: u32) {
    ctx.tally(|t| t.outcomes.waiting_buyers += 1);
    let deadline = tokio::time::Instant::now() + ctx.restock_window;
    let mut stop = ctx.sold_out_for_good.subscribe();
    let mut delay = RESTOCK_DELAY_MIN;
    for _ in 0..RESTOCK_TRIES_MAX {
        if missing == 0 || *stop.borrow() {
            break;
        }
        let wake = (tokio::time::Instant::now() + delay / 2 + jitter_up_to(delay)).min(deadline);
        tokio::select! {
            () = tokio::time::sleep_until(wake) => {}
            _ = stop.changed() => break,
        }
        if tokio::time::Instant::now() >= deadline {
            break;
        }
        let reply = ctx
            .api
            .send_retrying(
                Phase::Settle,
                EP_RESERVE,
                &ctx.reserve_request(buyer),
                RetryPolicy::OVERLOAD,
            )
            .await;
        ctx.tally(|t| *t.outcomes.restock_answers.entry(reply.label()).or_default() += 1);
        match (reply.status, reply.error_code()) {
            (201, _) => {
                let Some(hold) = Hold::from_reply(&reply) else {
                    ctx.unexpected("reserve (bad body)", &reply);
                    break;
                };
                ctx.tally(|t| t.outcomes.holds_in_restock += 1);
                if act_on_hold(ctx, buyer, hold, Role::Pay, Phase::Settle).await {
                    missing -= 1;
                }
                delay = RESTOCK_DELAY_MIN;
            }
            (409, Some("sold_out")) | (429 | 503, _) => {
                delay = (delay * 2).min(RESTOCK_DELAY_MAX);
            }
            _ => {
                ctx.unexpected("reserve (waiting for stock)", &reply);
                break;
            }
        }
    }
    if missing > 0 {
        ctx.tally(|t| t.outcomes.unserved_buyers += 1);
    }
}

fn jitter_up_to(delay: Duration) -> Duration {
    jitter(u64::try_from(delay.as_millis()).unwrap_or(u64::MAX))
}

/// Pays, declines, cancels or abandons one hold; true when it ended paid.
async fn act_on_hold(ctx: &Ctx, buyer: &Buyer, hold: Hold, role: Role, phase: Phase) -> bool {
    ctx.tally(|t| {
        t.latest_expiry = t.latest_expiry.max(Some(hold.expires_at));
    });
    // Paid or cancelled through another instance than the one that granted the hold (when there are several).
    let settle_on = ctx.api.next_instance(hold.granted_by, 1);
    let pay = |token: &'static str| {
        let request = Request::post(
            format!("{API}/reservations/{}/payment", hold.id),
            json!({ "payment_token": token }),
        )
        .auth(&buyer.token)
        .idempotency_key(Uuid::new_v4().to_string())
        .on(settle_on);
        async move {
            ctx.api
                .send_retrying(phase, EP_PAY, &request, RetryPolicy::OVERLOAD)
                .await
        }
    };
    match role {
        Role::Pay => {
            let reply = pay("tok_ok").await;
            match reply.str_field("purchase_id") {
                Some(purchase) if reply.status == 200 => {
                    let purchase = purchase.to_owned();
                    ctx.tally(|t| {
                        t.outcomes.paid += 1;
                        t.purchases.push(purchase);
                    });
                    let paid = ctx.units_paid.fetch_add(1, Ordering::Relaxed) + 1;
                    if paid >= ctx.stock {
                        // send_replace: stores the value even while no buyer is subscribed yet.
                        ctx.sold_out_for_good.send_replace(true);
                    }
                    true
                }
                _ => {
                    ctx.unexpected("pay tok_ok", &reply);
                    false
                }
            }
        }
        Role::Decline => {
            let reply = pay("tok_declined").await;
            if reply.status == 402 && reply.error_code() == Some("payment_declined") {
                ctx.tally(|t| t.outcomes.declined += 1);
                ctx.release(hold, buyer, "payment_declined", reply.instance);
            } else {
                ctx.unexpected("pay tok_declined", &reply);
            }
            false
        }
        Role::Cancel => {
            let reply = ctx
                .api
                .send_retrying(
                    phase,
                    EP_CANCEL,
                    &Request::delete(format!("{API}/reservations/{}", hold.id))
                        .auth(&buyer.token)
                        .on(settle_on),
                    RetryPolicy::OVERLOAD,
                )
                .await;
            if reply.status == 204 {
                ctx.tally(|t| t.outcomes.cancelled += 1);
                ctx.release(hold, buyer, "cancelled", reply.instance);
            } else {
                ctx.unexpected("cancel", &reply);
            }
            false
        }
        Role::Abandon => {
            ctx.tally(|t| t.outcomes.abandoned += 1);
            let granted_by = hold.granted_by;
            ctx.release(hold, buyer, "expired", granted_by);
            false
        }
    }
}

/// One reading of the drop during the run, `t_ms` after `opens_at` (negative before it), on one instance.
#[derive(Debug, Clone, Serialize)]
pub struct Snapshot {
    pub t_ms: i64,
    /// Index of the instance read (in `base_urls` order).
    pub instance: usize,
    #[serde(flatten)]
    pub counts: DropCounts,
    pub status: String,
}

/// Reads the drop's counters and status on one instance.
async fn read_drop(
    api: &Api,
    phase: Phase,
    drop_id: &str,
    instance: usize,
) -> Option<(DropCounts, String)> {
    let reply = api
        .send(
            phase,
            EP_DROP,
            &Request::get(format!("{API}/drops/{drop_id}")).on(instance),
        )
        .await;
    if reply.status != 200 {
        return None;
    }
    let n = |key: &str| reply.body.get(key).and_then(Value::as_i64);
    Some((
        DropCounts {
            stock: n("stock")?,
            available: n("available")?,
            held: n("held")?,
            sold: n("sold")?,
        },
        reply.str_field("status")?.to_owned(),
    ))
}

/// Polls the drop on every instance until told to stop, keeping at most `MONITOR_SNAPSHOTS_MAX` readings.
async fn monitor(
    api: Arc<Api>,
    drop_id: String,
    opens_at: tokio::time::Instant,
    mut stop: watch::Receiver<bool>,
) -> Vec<Snapshot> {
    let mut timeline = Vec::new();
    while timeline.len() < MONITOR_SNAPSHOTS_MAX && !*stop.borrow() {
        let t_ms = ms_since(opens_at);
        let readings =
            join_all((0..api.instances()).map(|i| read_drop(&api, Phase::Monitor, &drop_id, i)))
                .await;
        for (instance, reading) in readings.into_iter().enumerate() {
            if let Some((counts, status)) = reading {
                timeline.push(Snapshot {
                    t_ms,
                    instance,
                    counts,
                    status,
                });
            }
        }
        tokio::select! {
            () = tokio::time::sleep(MONITOR_INTERVAL) => {}
            _ = stop.changed() => break,
        }
    }
    timeline
}

/// Reads the drop on the first instance until no unit is held or the deadline passes; the last reading.
async fn wait_for_drained(
    api: &Api,
    drop_id: &str,
    deadline: tokio::time::Instant,
) -> Option<(DropCounts, String)> {
    loop {
        let reading = read_drop(api, Phase::Verify, drop_id, 0).await;
        let drained = reading.as_ref().is_some_and(|(c, _)| c.held == 0);
        if drained || tokio::time::Instant::now() >= deadline {
            return reading;
        }
        tokio::time::sleep(DRAIN_POLL_INTERVAL).await;
    }
}

/// Reads back released holds: each must be `released` with the reason its buyer caused. (checked, mismatched)
async fn check_released(api: &Api, released: &[Released]) -> (i64, i64) {
    let sample = &released[..released.len().min(RELEASED_CHECKS_MAX)];
    let replies = join_all(sample.iter().map(|r| async move {
        let request = Request::get(format!("{API}/reservations/{}", r.id))
            .auth(&r.token)
            .on(r.read_on);
        api.send(Phase::Verify, EP_RESERVATION, &request).await
    }))
    .await;
    let mismatched = sample
        .iter()
        .zip(&replies)
        .filter(|(r, reply)| {
            reply.status != 200
                || reply.str_field("status") != Some("released")
                || reply.str_field("reason") != Some(r.reason)
        })
        .count();
    (
        i64::try_from(sample.len()).unwrap_or(i64::MAX),
        i64::try_from(mismatched).unwrap_or(i64::MAX),
    )
}

/// What Postgres holds for the drop: purchases, their reservations, members over the limit, and which of the
/// acknowledged purchase ids exist.
async fn db_facts(args: &DropArgs, drop_id: &str, purchases: &[String]) -> anyhow::Result<DbFacts> {
    let drop_uuid: Uuid = drop_id.parse().context("drop id is not a UUID")?;
    let acknowledged: Vec<Uuid> = purchases
        .iter()
        .map(|p| p.parse())
        .collect::<Result<std::collections::BTreeSet<Uuid>, _>>()
        .context("a purchase_id is not a UUID")?
        .into_iter()
        .collect();
    let (client, connection) = tokio::time::timeout(
        DB_TIMEOUT,
        tokio_postgres::connect(&args.database_url, tokio_postgres::NoTls),
    )
    .await
    .context("connecting to Postgres timed out")?
    .context("connecting to Postgres (--database-url)")?;
    let connection = tokio::spawn(connection);
    let limit = i64::from(args.per_member_limit);
    let facts = tokio::time::timeout(DB_TIMEOUT, async {
        let totals = client
            .query_one(
                "SELECT count(*), COALESCE(sum(quantity), 0)::bigint, count(DISTINCT reservation_id)
                 FROM purchases WHERE drop_id = $1",
                &[&drop_uuid],
            )
            .await?;
        let over = client
            .query_one(
                "SELECT count(*) FROM (
                     SELECT member_id FROM purchases WHERE drop_id = $1
                     GROUP BY member_id HAVING sum(quantity) > $2
                 ) AS over_limit",
                &[&drop_uuid, &limit],
            )
            .await?;
        let found = client
            .query_one(
                "SELECT count(*) FROM purchases WHERE drop_id = $1 AND id = ANY($2)",
                &[&drop_uuid, &acknowledged],
            )
            .await?;
        anyhow::Ok(DbFacts {
            purchase_rows: totals.get(0),
            purchase_units: totals.get(1),
            distinct_reservations: totals.get(2),
            members_over_limit: over.get(0),
            acknowledged_purchases: i64::try_from(acknowledged.len())?,
            acknowledged_found: found.get(0),
        })
    })
    .await
    .context("verification queries timed out")?
    .context("verification queries")?;
    drop(client);
    let _ = connection.await;
    Ok(facts)
}

/// The answer of the probe before `opens_at`: the instances' common answer, or each one's when they differ.
fn early_probe_answer(answers: &[String]) -> String {
    match answers {
        [first, rest @ ..] if rest.iter().all(|a| a == first) => first.clone(),
        _ => answers
            .iter()
            .enumerate()
            .map(|(i, a)| format!("{a} (instance {})", i + 1))
            .collect::<Vec<_>>()
            .join(", "),
    }
}

async fn signup(api: &Api, instance: usize, email: &str, name: &str) -> anyhow::Result<String> {
    let body = json!({ "email": email, "password": BUYER_PASSWORD, "name": name });
    let request = Request::post(format!("{API}/members"), body).on(instance);
    let reply = api
        .send_retrying(Phase::Setup, EP_SIGNUP, &request, RetryPolicy::OVERLOAD)
        .await;
    expect_field(&reply, 201, "signup", "id")
}

async fn login(api: &Api, instance: usize, email: &str, password: &str) -> anyhow::Result<String> {
    let body = json!({ "email": email, "password": password });
    let request = Request::post(format!("{API}/auth/login"), body).on(instance);
    let reply = api
        .send_retrying(Phase::Setup, EP_LOGIN, &request, RetryPolicy::OVERLOAD)
        .await;
    expect_field(&reply, 200, "login", "access_token")
}

/// The body of an answer with the expected status, or an error that shows what came instead.
fn expect<'a>(reply: &'a Reply, status: u16, what: &str) -> anyhow::Result<&'a Value> {
    if reply.status == status {
        Ok(&reply.body)
    } else {
        bail!(
            "{what}: expected {status}, got {} {}",
            reply.status,
            reply.body
        )
    }
}

/// A string field of an answer with the expected status.
fn expect_field(reply: &Reply, status: u16, what: &str, field: &str) -> anyhow::Result<String> {
    expect(reply, status, what)?
        .get(field)
        .and_then(Value::as_str)
        .map(str::to_owned)
        .with_context(|| format!("{what}: answer without {field}"))
}

/// Milliseconds from `origin` to now, negative before it.
fn ms_since(origin: tokio::time::Instant) -> i64 {
    let now = tokio::time::Instant::now();
    let ms = |d: Duration| i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
    if now >= origin {
        ms(now - origin)
    } else {
        -ms(origin - now)
    }
}

/// The monotonic instant of a wall-clock time (both clocks are this machine's, as is the server's).
fn instant_of(at: DateTime<Utc>) -> tokio::time::Instant {
    let now = tokio::time::Instant::now();
    match (at - Utc::now()).to_std() {
        Ok(ahead) => now + ahead,
        Err(_) => now,
    }
}

fn progress(message: String) {
    eprintln!(
        "flashsale-load: [{}] {message}",
        Utc::now().format("%H:%M:%S%.3f")
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_follow_the_shares_over_any_prefix() {
        let shares = Shares {
            decline: 0.1,
            cancel: 0.1,
            abandon: 0.05,
        };
        for holders in [20u64, 200, 1000] {
            let mut counts = BTreeMap::new();
            for k in 0..holders {
                *counts
                    .entry(format!("{:?}", role_of(k, shares)))
                    .or_insert(0u64) += 1;
            }
            let share = |role: &str| counts.get(role).copied().unwrap_or(0) as f64 / holders as f64;
            // Within two holds of the exact share.
            let tolerance = 2.0 / holders as f64;
            assert!((share("Decline") - 0.1).abs() <= tolerance, "{counts:?}");
            assert!((share("Cancel") - 0.1).abs() <= tolerance, "{counts:?}");
            assert!((share("Abandon") - 0.05).abs() <= tolerance, "{counts:?}");
        }
    }

    #[test]
    fn zero_shares_mean_everyone_pays() {
        let shares = Shares {
            decline: 0.0,
            cancel: 0.0,
            abandon: 0.0,
        };
        assert!((0..1000).all(|k| role_of(k, shares) == Role::Pay));
    }
}
