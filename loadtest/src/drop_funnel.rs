//! The drop funnel as a goose scenario:
//!
//! 1. setup (`test_start`, not measured): a fresh seller and preorder product; every buyer signs up and logs in
//!    and its token is cached; then the drop is created, opening `opens_in_ms` later, and a poller starts reading
//!    it on every instance;
//! 2. `on_start` (not measured: goose resets its metrics once every user is started): each goose user claims one
//!    tab of one buyer and waits for `opens_at`;
//! 3. "reserve at the opening": every tab fires one reservation at once;
//! 4. "act on the hold": holders abandon (cancel, or let the hold expire), get declined or pay, by the funnel
//!    rates (`role_of`); a buyer refused at the opening (sold out, or overloaded) sends as many tabs as it is short
//!    of units on to
//! 5. "wait for stock": retry with jittered backoff while abandoned and declined units come back, until served,
//!    the deadline, or every unit is paid; whatever it gets now it pays for.
//!
//! Then `collect` and `observe` gather what the run saw and what the API and Postgres say, for `verify`.
//!
//! With several instances (one Redis, one Postgres), setup goes to the first; buyer `i` signs up, logs in and
//! reserves on instance `i mod n`; each hold is paid or cancelled on the instance after the one that granted it,
//! and read back on yet another; retries of idempotent calls move on to the next instance.
//!
//! Every loop here is bounded by a count or a deadline, so a run ends by itself whatever the server does.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use anyhow::Context;
use chrono::{DateTime, Utc};
use futures_util::future::join_all;
use goose::prelude::{GooseUser, Scenario, Transaction, TransactionFunction, TransactionResult};
use serde::Serialize;
use serde_json::{json, Value};
use tokio::sync::watch;
use uuid::Uuid;

use crate::client::{jitter, send, send_retrying, Call, Reply, RetryPolicy, Targets};
use crate::config::{FunnelArgs, Shares, TargetArgs};
use crate::setup::{self, progress, Member, API};
use crate::verify::{DbFacts, DropCounts, Observations, ReportCounts, ReportFunnel};

const EP_RESERVE: &str = "/drops/{id}/reservations";
const EP_PAY: &str = "/reservations/{id}/payment";
const EP_CANCEL: &str = "/reservations/{id}";
const EP_DROP: &str = "/drops/{id}";
const EP_RESERVATION: &str = "/reservations/{id}";

/// A reservation that lands a hair before `opens_at` (clock granularity) is tried again this often.
const NOT_OPEN_RETRIES_MAX: u32 = 20;
const NOT_OPEN_RETRY_DELAY: Duration = Duration::from_millis(20);
/// Backoff of buyers waiting for stock to come back: doubling from the minimum to the maximum, jittered.
const RESTOCK_DELAY_MIN: Duration = Duration::from_millis(100);
const RESTOCK_DELAY_MAX: Duration = Duration::from_millis(1600);
/// Most reservation tries of one waiting tab, whatever the deadline.
const RESTOCK_TRIES_MAX: u32 = 200;
/// How long a refused tab waits for its buyer's other tabs to hear back from the opening.
const SIBLINGS_WAIT: Duration = Duration::from_secs(60);
/// How often the drop state is polled during the run, the most snapshots kept, and how often progress is printed.
const MONITOR_INTERVAL: Duration = Duration::from_millis(100);
const MONITOR_SNAPSHOTS_MAX: usize = 20_000;
const PROGRESS_EVERY_POLLS: u32 = 10;
/// How often the drop is read while waiting for expired holds, and the slack on top of expiry + reaper interval.
const DRAIN_POLL_INTERVAL: Duration = Duration::from_millis(250);
const DRAIN_SLACK: Duration = Duration::from_secs(3);
/// Most released holds read back one by one after the run.
const RELEASED_CHECKS_MAX: usize = 2_000;
/// Probe "not open yet" only when at least this much time is left before `opens_at`.
const EARLY_PROBE_MARGIN: Duration = Duration::from_millis(300);
/// Timeout of each verification query.
const DB_TIMEOUT: Duration = Duration::from_secs(15);
/// A finished tab of a run that goes on (the `mixed` blend) idles this long per iteration, so it neither spins
/// nor holds up goose's shutdown (which waits for the transaction in progress).
const IDLE_TICK: Duration = Duration::from_millis(500);

/// What a holder does with a hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Pay,
    Decline,
    Cancel,
    Expire,
}

/// The role of the `k`-th hold of the opening. A Weyl sequence (multiples of the golden ratio, mod 1) spreads
/// over [0, 1) so evenly that every prefix of holders gets the shares to within a hold or two, without a lock
/// or a random seed, whatever order holds arrive in.
pub fn role_of(k: u64, shares: Shares) -> Role {
    const GOLDEN: f64 = 0.618_033_988_749_894_9;
    let x = ((k as f64 + 0.5) * GOLDEN).fract();
    if x < shares.cancel {
        Role::Cancel
    } else if x < shares.cancel + shares.expire {
        Role::Expire
    } else if x < shares.cancel + shares.expire + shares.decline {
        Role::Decline
    } else {
        Role::Pay
    }
}

/// Whether a tab refused at the opening goes on waiting for stock: its buyer got `holds` at the opening, wants
/// `want` units, and this tab is the `waiter`-th of its refused tabs to ask (counting from 0).
pub fn should_wait(want: u32, holds: u32, waiter: u32) -> bool {
    holds.saturating_add(waiter) < want
}

/// A hold as the reservation answer gave it.
#[derive(Debug, Clone)]
pub struct Hold {
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
pub struct Released {
    id: String,
    /// Its owner's token.
    token: String,
    /// The reason it must carry.
    reason: &'static str,
    /// Where to read it: the instance after the last one that touched it.
    read_on: usize,
}

/// What buyers did and were told.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Outcomes {
    /// Final answers to the attempts fired at the opening instant (after any 429/503 retries).
    pub spike_answers: BTreeMap<String, u64>,
    /// Answers to the reservation retries of tabs waiting for stock to come back.
    pub restock_answers: BTreeMap<String, u64>,
    pub holds_at_opening: u64,
    pub holds_in_restock: u64,
    pub paid: u64,
    pub declined: u64,
    pub cancelled: u64,
    pub expired: u64,
    /// Tabs refused at the opening that then waited for stock.
    pub waiting_tabs: u64,
    /// Of those, tabs still without a unit when they stopped.
    pub unserved_tabs: u64,
    /// Tabs that started after `opens_at` (goose could not start every user in time).
    pub late_tabs: u64,
    /// Answers no step expected, by step and answer (e.g. `pay: 409 hold_expired`).
    pub unexpected: BTreeMap<String, u64>,
    /// Of those, server errors (5xx other than back-pressure) and calls with no answer.
    pub server_failures: u64,
}

#[derive(Debug, Default)]
struct Tally {
    outcomes: Outcomes,
    /// `purchase_id`s of 200 payments.
    purchases: Vec<String>,
    released: Vec<Released>,
    /// The latest expiry of any hold granted, to bound the wait for the reaper.
    latest_expiry: Option<DateTime<Utc>>,
}

/// One buyer: a member and what its tabs heard at the opening.
#[derive(Debug)]
struct Buyer {
    member: Member,
    /// Tabs that have their answer from the opening.
    answered: watch::Sender<u32>,
    holds_at_opening: AtomicU32,
    /// Refused tabs that asked whether to wait for stock.
    waiters: AtomicU32,
}

/// What setup made: the drop and its buyers.
#[derive(Debug)]
struct Ready {
    drop_id: String,
    opens_at: DateTime<Utc>,
    opens_at_instant: tokio::time::Instant,
    buyers: Vec<Buyer>,
    early_probe: Option<String>,
}

/// A goose user's part in the funnel, kept in its session.
#[derive(Debug, Clone)]
enum Tab {
    /// Claimed tab `k` of buyer `buyer`, waiting for the opening.
    Waiting {
        buyer: usize,
    },
    Held {
        buyer: usize,
        hold: Hold,
        role: Role,
    },
    Refused {
        buyer: usize,
    },
    /// Refused and chosen to wait for stock.
    Restocking {
        buyer: usize,
    },
    Done,
}

/// One reading of the drop during the run, `t_ms` after `opens_at` (negative before it), on one instance.
#[derive(Debug, Clone, Serialize)]
pub struct Snapshot {
    pub t_ms: i64,
    pub instance: usize,
    #[serde(flatten)]
    pub counts: DropCounts,
    pub status: String,
}

/// Shared by every goose user of the funnel, by setup, and by the verification after the run.
pub struct Funnel {
    args: FunnelArgs,
    target: TargetArgs,
    targets: Arc<Targets>,
    /// End the goose run (killswitch) once every tab is done, for runs whose other users would go on.
    end_run_when_done: bool,
    ready: OnceLock<Ready>,
    next_tab: AtomicUsize,
    tabs_done: AtomicUsize,
    holds_assigned: AtomicU64,
    units_paid: AtomicU64,
    /// Set once every unit is paid: nothing can come back to sale, so waiting tabs stop.
    sold_out_for_good: watch::Sender<bool>,
    tally: Mutex<Tally>,
    /// A user that records nothing, kept from setup for the poller and the reads after the run.
    reader: Mutex<Option<GooseUser>>,
    monitor_stop: watch::Sender<bool>,
    monitor: Mutex<Option<tokio::task::JoinHandle<Vec<Snapshot>>>>,
}

impl std::fmt::Debug for Funnel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Funnel").field("args", &self.args).finish()
    }
}

impl Funnel {
    pub fn new(
        args: FunnelArgs,
        target: TargetArgs,
        targets: Arc<Targets>,
        end_run_when_done: bool,
    ) -> Arc<Self> {
        Arc::new(Self {
            args,
            target,
            targets,
            end_run_when_done,
            ready: OnceLock::new(),
            next_tab: AtomicUsize::new(0),
            tabs_done: AtomicUsize::new(0),
            holds_assigned: AtomicU64::new(0),
            units_paid: AtomicU64::new(0),
            sold_out_for_good: watch::channel(false).0,
            tally: Mutex::new(Tally::default()),
            reader: Mutex::new(None),
            monitor_stop: watch::channel(false).0,
            monitor: Mutex::new(None),
        })
    }

    /// Goose users this funnel needs: one per tab.
    pub fn users(&self) -> usize {
        self.args.users()
    }

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
        let failure = reply.is_server_failure();
        self.tally(|t| {
            *t.outcomes.unexpected.entry(key).or_default() += 1;
            if failure {
                t.outcomes.server_failures += 1;
            }
        });
    }

    fn reserve_call(&self, ready: &Ready, member: &Member) -> Call {
        Call::post(
            EP_RESERVE,
            format!("{API}/drops/{}/reservations", ready.drop_id),
            json!({ "quantity": 1 }),
        )
        .auth(&member.token)
        .idempotency_key(Uuid::new_v4().to_string())
        .on(member.home)
    }

    fn release(&self, hold: Hold, member: &Member, reason: &'static str, last_touched_by: usize) {
        let released = Released {
            id: hold.id,
            token: member.token.clone(),
            reason,
            read_on: self.targets.next(last_touched_by, 1),
        };
        self.tally(|t| t.released.push(released));
    }

    /// Setup, run from goose's `test_start`: seller, product, buyers, the drop, the early probe, the poller.
    #[allow(
        clippy::too_many_lines,
        reason = "the drop's whole set-up in goose's test_start, in the order it happens"
    )]
    pub async fn setup(self: &Arc<Self>, user: &mut GooseUser) -> anyhow::Result<()> {
        let targets = &self.targets;
        let args = &self.args;
        let tag = setup::run_tag();
        progress(format!(
            "drop setup: seller and product (run tag {tag}) on {}{}",
            targets.base(0),
            if targets.count() > 1 {
                format!("; buyers spread over {} instances", targets.count())
            } else {
                String::new()
            }
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
        progress(format!(
            "drop setup: signing up and logging in {} buyers ({} at a time)",
            args.buyers, self.target.setup_concurrency
        ));
        let started = std::time::Instant::now();
        let members = setup::members(
            user,
            targets,
            &tag,
            args.buyers,
            self.target.setup_concurrency,
        )
        .await?;
        progress(format!(
            "drop setup: {} buyers ready in {:.1} s",
            members.len(),
            started.elapsed().as_secs_f64()
        ));
        let opens_at_wanted =
            Utc::now() + chrono::Duration::milliseconds(i64::try_from(args.opens_in_ms)?);
        let (drop_id, opens_at) = setup::create_drop(
            user,
            targets,
            &seller,
            json!({
                "product_id": product,
                "stock": args.stock,
                "opens_at": setup::rfc3339(opens_at_wanted),
                "per_member_limit": args.per_member_limit,
                "hold_seconds": args.hold_seconds,
            }),
        )
        .await?;
        let opens_at_instant = instant_of(opens_at);
        progress(format!(
            "drop setup: drop {drop_id}: {} units, limit {}, hold {} s, opens at {}; {} goose users (tabs)",
            args.stock,
            args.per_member_limit,
            args.hold_seconds,
            setup::rfc3339(opens_at),
            self.users()
        ));
        let early_probe = self
            .probe_before_opening(user, &drop_id, &members[0], opens_at_instant)
            .await;
        let buyers = members
            .into_iter()
            .map(|member| Buyer {
                member,
                answered: watch::channel(0).0,
                holds_at_opening: AtomicU32::new(0),
                waiters: AtomicU32::new(0),
            })
            .collect();
        let ready = Ready {
            drop_id: drop_id.clone(),
            opens_at,
            opens_at_instant,
            buyers,
            early_probe,
        };
        anyhow::ensure!(self.ready.set(ready).is_ok(), "the funnel was set up twice");
        *self
            .reader
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(user.clone());
        let monitor = tokio::spawn(monitor(
            Arc::clone(self),
            user.clone(),
            drop_id,
            opens_at_instant,
            self.monitor_stop.subscribe(),
        ));
        *self
            .monitor
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(monitor);
        Ok(())
    }

    /// One reservation before opening must be refused, on every instance; skipped when the opening is too close
    /// to tell.
    async fn probe_before_opening(
        &self,
        user: &mut GooseUser,
        drop_id: &str,
        member: &Member,
        opens_at: tokio::time::Instant,
    ) -> Option<String> {
        if opens_at.saturating_duration_since(tokio::time::Instant::now()) <= EARLY_PROBE_MARGIN {
            return None;
        }
        let mut answers = Vec::with_capacity(self.targets.count());
        for instance in 0..self.targets.count() {
            let call = Call::post(
                EP_RESERVE,
                format!("{API}/drops/{drop_id}/reservations"),
                json!({ "quantity": 1 }),
            )
            .auth(&member.token)
            .on(instance);
            let reply = send(user, &self.targets, &call, |_| true).await;
            if reply.status == 201 {
                // A bug in the server; give the unit back so the rest of the run still means something.
                if let Some(hold) = Hold::from_reply(&reply) {
                    let cancel = Call::delete(EP_CANCEL, format!("{API}/reservations/{}", hold.id))
                        .auth(&member.token)
                        .on(instance);
                    send(user, &self.targets, &cancel, |_| true).await;
                }
            }
            answers.push(reply.label());
        }
        Some(early_probe_answer(&answers))
    }

    /// The goose scenario of the funnel, named `drop`.
    pub fn scenario(self: &Arc<Self>) -> Scenario {
        Scenario::new("drop")
            .register_transaction(
                transaction(self, |f, u| Box::pin(f.claim(u)))
                    .set_name("claim a tab, wait for the opening")
                    .set_on_start(),
            )
            .register_transaction(
                transaction(self, |f, u| Box::pin(f.reserve_at_opening(u)))
                    .set_name("reserve at the opening")
                    .set_sequence(1),
            )
            .register_transaction(
                transaction(self, |f, u| Box::pin(f.act_on_hold(u)))
                    .set_name("act on the hold")
                    .set_sequence(2),
            )
            .register_transaction(
                transaction(self, |f, u| Box::pin(f.wait_for_stock(u)))
                    .set_name("wait for stock")
                    .set_sequence(3),
            )
    }

    fn tab(user: &GooseUser) -> Tab {
        user.get_session_data::<Tab>().cloned().unwrap_or(Tab::Done)
    }

    /// on_start: take the next tab (tab `k` belongs to buyer `k mod buyers`, so the first users started are one
    /// tab of each buyer), and wait for the opening.
    async fn claim(self: Arc<Self>, user: &mut GooseUser) -> TransactionResult {
        let Some(ready) = self.ready.get() else {
            // Setup failed (it said why, and stopped the run).
            user.set_session_data(Tab::Done);
            return Ok(());
        };
        let k = self.next_tab.fetch_add(1, Ordering::Relaxed);
        if k >= self.users() {
            user.set_session_data(Tab::Done);
            return Ok(());
        }
        let buyer = k % ready.buyers.len();
        if tokio::time::Instant::now() > ready.opens_at_instant {
            self.tally(|t| t.outcomes.late_tabs += 1);
        }
        user.set_session_data(Tab::Waiting { buyer });
        tokio::time::sleep_until(ready.opens_at_instant).await;
        Ok(())
    }

    /// One attempt at the opening: 429/503 retried as the server asks, `not_open` retried briefly in case the
    /// timer fired a hair early. Each retry (same `Idempotency-Key`) goes to the next instance.
    async fn reserve_at_opening(self: Arc<Self>, user: &mut GooseUser) -> TransactionResult {
        let (Tab::Waiting { buyer }, Some(ready)) = (Self::tab(user), self.ready.get()) else {
            return self.idle(user).await;
        };
        let b = &ready.buyers[buyer];
        let reply =
            reserve_at_opening(user, &self.targets, self.reserve_call(ready, &b.member)).await;
        self.tally(|t| *t.outcomes.spike_answers.entry(reply.label()).or_default() += 1);
        let next = match (reply.status, reply.error_code()) {
            (201, _) => match Hold::from_reply(&reply) {
                Some(hold) => {
                    b.holds_at_opening.fetch_add(1, Ordering::Relaxed);
                    self.tally(|t| t.outcomes.holds_at_opening += 1);
                    let k = self.holds_assigned.fetch_add(1, Ordering::Relaxed);
                    let role = role_of(k, self.args.shares());
                    Tab::Held { buyer, hold, role }
                }
                None => {
                    self.unexpected("reserve (bad body)", &reply);
                    Tab::Done
                }
            },
            (409, Some("sold_out")) | (429 | 503, _) if !reply.is_server_failure() => {
                Tab::Refused { buyer }
            }
            (409, Some("limit_exceeded")) => Tab::Done,
            _ => {
                self.unexpected("reserve", &reply);
                Tab::Done
            }
        };
        // Counted after the hold, so a sibling that sees every tab answered sees every hold too.
        b.answered.send_modify(|n| *n += 1);
        user.set_session_data(next);
        Ok(())
    }

    /// A holder pays, is declined, cancels or walks away; a refused tab decides whether to wait for stock.
    async fn act_on_hold(self: Arc<Self>, user: &mut GooseUser) -> TransactionResult {
        let Some(ready) = self.ready.get() else {
            return Ok(());
        };
        match Self::tab(user) {
            Tab::Held { buyer, hold, role } => {
                let member = &ready.buyers[buyer].member;
                self.settle(user, member, hold, role).await;
                user.set_session_data(Tab::Done);
            }
            Tab::Refused { buyer } => {
                let b = &ready.buyers[buyer];
                let attempts = self.args.attempts_per_buyer;
                let mut answered = b.answered.subscribe();
                // Bounded: a sibling that never hears back must not hold this tab forever.
                let _ = tokio::time::timeout(SIBLINGS_WAIT, answered.wait_for(|n| *n >= attempts))
                    .await;
                let want = attempts.min(self.args.per_member_limit);
                let holds = b.holds_at_opening.load(Ordering::Relaxed);
                let waiter = b.waiters.fetch_add(1, Ordering::Relaxed);
                if should_wait(want, holds, waiter) {
                    self.tally(|t| t.outcomes.waiting_tabs += 1);
                    user.set_session_data(Tab::Restocking { buyer });
                } else {
                    user.set_session_data(Tab::Done);
                }
            }
            Tab::Waiting { .. } | Tab::Restocking { .. } | Tab::Done => {}
        }
        Ok(())
    }

    /// A refused tab retries, backing off, until it has a unit, the deadline passes, or every unit is paid (then
    /// nothing can come back). Whatever it gets now it pays for: it came back to buy.
    async fn wait_for_stock(self: Arc<Self>, user: &mut GooseUser) -> TransactionResult {
        let Some(ready) = self.ready.get() else {
            return Ok(());
        };
        if let Tab::Restocking { buyer } = Self::tab(user) {
            let served = self.restock(user, ready, buyer).await;
            if !served {
                self.tally(|t| t.outcomes.unserved_tabs += 1);
            }
        }
        // The end of a tab's first iteration is the end of its funnel; later iterations (in a run that goes on)
        // only idle.
        if user.get_iterations() == 0 {
            user.set_session_data(Tab::Done);
            self.tab_done();
        }
        Ok(())
    }

    /// Counts a finished tab; the last one ends a run that would go on without it.
    fn tab_done(&self) {
        let done = self.tabs_done.fetch_add(1, Ordering::Relaxed) + 1;
        if done == self.users() {
            progress("drop: every tab is done");
            if self.end_run_when_done {
                goose::trigger_killswitch("the drop funnel is done");
            }
        }
    }

    async fn idle(&self, _user: &mut GooseUser) -> TransactionResult {
        tokio::time::sleep(IDLE_TICK).await;
        Ok(())
    }

    async fn restock(&self, user: &mut GooseUser, ready: &Ready, buyer: usize) -> bool {
        let member = &ready.buyers[buyer].member;
        let deadline = tokio::time::Instant::now() + self.args.restock_window();
        let mut stop = self.sold_out_for_good.subscribe();
        let mut delay = RESTOCK_DELAY_MIN;
        for _ in 0..RESTOCK_TRIES_MAX {
            if *stop.borrow() {
                return false;
            }
            let wake =
                (tokio::time::Instant::now() + delay / 2 + jitter_up_to(delay)).min(deadline);
            tokio::select! {
                () = tokio::time::sleep_until(wake) => {}
                _ = stop.changed() => return false,
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            let reply = send_retrying(
                user,
                &self.targets,
                &self.reserve_call(ready, member),
                RetryPolicy::OVERLOAD,
                reserve_expected,
            )
            .await;
            self.tally(|t| *t.outcomes.restock_answers.entry(reply.label()).or_default() += 1);
            match (reply.status, reply.error_code()) {
                (201, _) => {
                    let Some(hold) = Hold::from_reply(&reply) else {
                        self.unexpected("reserve (bad body)", &reply);
                        return false;
                    };
                    self.tally(|t| t.outcomes.holds_in_restock += 1);
                    return self.settle(user, member, hold, Role::Pay).await;
                }
                (409, Some("sold_out")) | (429 | 503, _) if !reply.is_server_failure() => {
                    delay = (delay * 2).min(RESTOCK_DELAY_MAX);
                }
                // The buyer has its units (a sibling got them).
                (409, Some("limit_exceeded")) => return true,
                _ => {
                    self.unexpected("reserve (waiting for stock)", &reply);
                    return false;
                }
            }
        }
        false
    }

    /// Pays, declines, cancels or abandons one hold; true when it ended paid.
    #[allow(
        clippy::too_many_lines,
        reason = "one hold's funnel step (pay, decline, abandon), each with the answers it accepts"
    )]
    async fn settle(&self, user: &mut GooseUser, member: &Member, hold: Hold, role: Role) -> bool {
        self.tally(|t| t.latest_expiry = t.latest_expiry.max(Some(hold.expires_at)));
        // Paid or cancelled through another instance than the one that granted the hold (when there are several).
        let settle_on = self.targets.next(hold.granted_by, 1);
        let pay = |token: &'static str| {
            Call::post(
                EP_PAY,
                format!("{API}/reservations/{}/payment", hold.id),
                json!({ "payment_token": token }),
            )
            .auth(&member.token)
            .idempotency_key(Uuid::new_v4().to_string())
            .on(settle_on)
        };
        match role {
            Role::Pay => {
                let reply = send_retrying(
                    user,
                    &self.targets,
                    &pay("tok_ok"),
                    RetryPolicy::OVERLOAD,
                    |r| r.status == 200,
                )
                .await;
                match reply.str_field("purchase_id") {
                    Some(purchase) if reply.status == 200 => {
                        let purchase = purchase.to_owned();
                        self.tally(|t| {
                            t.outcomes.paid += 1;
                            t.purchases.push(purchase);
                        });
                        let paid = self.units_paid.fetch_add(1, Ordering::Relaxed) + 1;
                        if paid >= u64::from(self.args.stock) {
                            // send_replace: stores the value even while no tab is subscribed yet.
                            self.sold_out_for_good.send_replace(true);
                        }
                        true
                    }
                    _ => {
                        self.unexpected("pay tok_ok", &reply);
                        false
                    }
                }
            }
            Role::Decline => {
                let reply = send_retrying(
                    user,
                    &self.targets,
                    &pay("tok_declined"),
                    RetryPolicy::OVERLOAD,
                    |r| r.status == 402 && r.error_code() == Some("payment_declined"),
                )
                .await;
                if reply.status == 402 && reply.error_code() == Some("payment_declined") {
                    self.tally(|t| t.outcomes.declined += 1);
                    self.release(hold, member, "payment_declined", reply.instance);
                } else {
                    self.unexpected("pay tok_declined", &reply);
                }
                false
            }
            Role::Cancel => {
                let call = Call::delete(EP_CANCEL, format!("{API}/reservations/{}", hold.id))
                    .auth(&member.token)
                    .on(settle_on);
                let reply = send_retrying(user, &self.targets, &call, RetryPolicy::OVERLOAD, |r| {
                    r.status == 204
                })
                .await;
                if reply.status == 204 {
                    self.tally(|t| t.outcomes.cancelled += 1);
                    self.release(hold, member, "cancelled", reply.instance);
                } else {
                    self.unexpected("cancel", &reply);
                }
                false
            }
            Role::Expire => {
                self.tally(|t| t.outcomes.expired += 1);
                let granted_by = hold.granted_by;
                self.release(hold, member, "expired", granted_by);
                false
            }
        }
    }

    /// After the goose run: stops the poller and hands over what the run saw. `None` when setup never finished.
    pub async fn collect(&self) -> anyhow::Result<Option<FunnelRun>> {
        let _ = self.monitor_stop.send(true);
        let monitor = self
            .monitor
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        let timeline = match monitor {
            Some(task) => task.await.context("the drop poller panicked")?,
            None => Vec::new(),
        };
        let Some(ready) = self.ready.get() else {
            return Ok(None);
        };
        let reader = self
            .reader
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
            .context("no reader kept from setup")?;
        let (outcomes, purchases, released, latest_expiry) = self.tally(|t| {
            (
                t.outcomes.clone(),
                std::mem::take(&mut t.purchases),
                std::mem::take(&mut t.released),
                t.latest_expiry,
            )
        });
        Ok(Some(FunnelRun {
            drop_id: ready.drop_id.clone(),
            opens_at: ready.opens_at,
            opens_at_instant: ready.opens_at_instant,
            stock: self.args.stock,
            per_member_limit: self.args.per_member_limit,
            reaper_interval: Duration::from_millis(self.args.reaper_interval_ms),
            units_acknowledged: self.units_paid.load(Ordering::Relaxed),
            early_probe: ready.early_probe.clone(),
            outcomes,
            purchases,
            released,
            latest_expiry,
            timeline,
            reader,
            targets: Arc::clone(&self.targets),
        }))
    }
}

/// A step of the funnel: a method of `Funnel` over one goose user.
type Step = for<'a> fn(
    Arc<Funnel>,
    &'a mut GooseUser,
) -> std::pin::Pin<
    Box<dyn std::future::Future<Output = TransactionResult> + Send + 'a>,
>;

/// A goose transaction over a step of the funnel.
fn transaction(funnel: &Arc<Funnel>, step: Step) -> Transaction {
    let funnel = Arc::clone(funnel);
    let function: TransactionFunction = Arc::new(move |user| step(Arc::clone(&funnel), user));
    Transaction::new(function)
}

/// A reservation sent at the opening (with an `Idempotency-Key`): 429/503 retried as the server asks, on the next
/// instance, and `not_open` retried briefly in case the timer fired a hair early. The last answer.
pub(crate) async fn reserve_at_opening(
    user: &mut GooseUser,
    targets: &Targets,
    mut call: Call,
) -> Reply {
    let mut reply = send_retrying(
        user,
        targets,
        &call,
        RetryPolicy::OVERLOAD,
        reserve_expected,
    )
    .await;
    for _ in 0..NOT_OPEN_RETRIES_MAX {
        if reply.error_code() != Some("not_open") {
            break;
        }
        tokio::time::sleep(NOT_OPEN_RETRY_DELAY).await;
        call = call.on(targets.next(reply.instance, 1));
        reply = send_retrying(
            user,
            targets,
            &call,
            RetryPolicy::OVERLOAD,
            reserve_expected,
        )
        .await;
    }
    reply
}

/// Answers a reservation may get in a drop that is selling out.
pub(crate) fn reserve_expected(reply: &Reply) -> bool {
    reply.status == 201
        || (reply.status == 409
            && matches!(
                reply.error_code(),
                Some("sold_out" | "limit_exceeded" | "not_open")
            ))
}

fn jitter_up_to(delay: Duration) -> Duration {
    jitter(u64::try_from(delay.as_millis()).unwrap_or(u64::MAX))
}

/// Everything a finished funnel run saw, enough to verify it (again, after a fault is planted).
pub struct FunnelRun {
    pub drop_id: String,
    pub opens_at: DateTime<Utc>,
    opens_at_instant: tokio::time::Instant,
    pub stock: u32,
    pub per_member_limit: u32,
    reaper_interval: Duration,
    /// Units paid with a 200.
    pub units_acknowledged: u64,
    pub early_probe: Option<String>,
    pub outcomes: Outcomes,
    /// `purchase_id`s of the 200 payments.
    pub purchases: Vec<String>,
    released: Vec<Released>,
    latest_expiry: Option<DateTime<Utc>>,
    pub timeline: Vec<Snapshot>,
    reader: GooseUser,
    targets: Arc<Targets>,
}

impl std::fmt::Debug for FunnelRun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FunnelRun")
            .field("drop_id", &self.drop_id)
            .field("outcomes", &self.outcomes)
            .finish_non_exhaustive()
    }
}

/// The drop as every instance served it after the run, and the instance that read each.
#[derive(Debug, Clone, Serialize)]
pub struct InstanceState {
    pub base_url: String,
    /// Calls the harness sent there.
    pub requests: u64,
    pub final_state: Option<DropCounts>,
    pub final_status: Option<String>,
}

impl FunnelRun {
    /// Reads the drop (waiting out abandoned holds), the released holds and Postgres: the observations the
    /// checks judge, and each instance's final state.
    pub async fn observe(
        &mut self,
        database_url: &str,
    ) -> anyhow::Result<(Observations, Vec<InstanceState>)> {
        let drain_deadline = self
            .latest_expiry
            .map_or_else(tokio::time::Instant::now, instant_of)
            + self.reaper_interval
            + DRAIN_SLACK;
        progress(format!(
            "verify: waiting up to {:.1} s for expired holds to return",
            drain_deadline
                .saturating_duration_since(tokio::time::Instant::now())
                .as_secs_f64()
        ));
        let targets = Arc::clone(&self.targets);
        let final_drop =
            wait_for_drained(&mut self.reader, &targets, &self.drop_id, drain_deadline).await;
        let mut snapshots: Vec<DropCounts> = self.timeline.iter().map(|s| s.counts).collect();
        if let Some((counts, status)) = &final_drop {
            self.timeline.push(Snapshot {
                t_ms: ms_since(self.opens_at_instant),
                instance: 0,
                counts: *counts,
                status: status.clone(),
            });
            snapshots.push(*counts);
        }
        // Then every instance must serve the same counts (the first included: read again, after the others).
        let mut instance_finals = Vec::with_capacity(targets.count());
        for instance in 0..targets.count() {
            instance_finals.push(if targets.count() > 1 {
                read_drop(&mut self.reader, &targets, &self.drop_id, instance).await
            } else {
                final_drop.clone()
            });
        }
        let (released_checked, released_mismatched) =
            check_released(&self.reader, &targets, &self.released).await;
        progress("verify: reading purchases from Postgres");
        let db = db_facts(
            database_url,
            &self.drop_id,
            self.per_member_limit,
            &self.purchases,
        )
        .await?;
        let instances = instance_states(&targets, &instance_finals);
        let observations = Observations {
            stock: i64::from(self.stock),
            snapshots,
            final_state: final_drop.as_ref().map(|(counts, _)| *counts),
            db,
            units_acknowledged: i64::try_from(self.units_acknowledged)?,
            unserved_buyers: i64::try_from(self.outcomes.unserved_tabs)?,
            early_probe: self.early_probe.clone(),
            released_checked,
            released_mismatched,
            instance_finals: instances.iter().map(|i| i.final_state).collect(),
            server_failures: i64::try_from(self.outcomes.server_failures)?,
            report: report_counts(database_url, &self.drop_id, self.harness_funnel()).await,
        };
        Ok((observations, instances))
    }
}

/// Each instance as the run left it: its address, the requests sent to it and its final reading of the drop.
fn instance_states(
    targets: &Targets,
    finals: &[Option<(DropCounts, String)>],
) -> Vec<InstanceState> {
    targets
        .bases()
        .iter()
        .zip(finals)
        .zip(targets.sent())
        .map(|((base, reading), requests)| InstanceState {
            base_url: base.clone(),
            requests,
            final_state: reading.as_ref().map(|(counts, _)| *counts),
            final_status: reading.as_ref().map(|(_, status)| status.clone()),
        })
        .collect()
}

impl FunnelRun {
    /// The drop report's funnel as this run's answers tell it.
    fn harness_funnel(&self) -> ReportFunnel {
        let o = &self.outcomes;
        let answers = |label: &str| {
            let count = |answers: &BTreeMap<String, u64>| answers.get(label).copied().unwrap_or(0);
            count(&o.spike_answers) + count(&o.restock_answers)
        };
        let n = |count: u64| i64::try_from(count).unwrap_or(i64::MAX);
        ReportFunnel {
            reserved: n(o.holds_at_opening + o.holds_in_restock),
            paid: n(o.paid),
            expired: n(o.expired),
            cancelled: n(o.cancelled),
            declined: n(o.declined),
            refused_sold_out: n(answers("409 sold_out")),
            refused_limit: n(answers("409 limit_exceeded")),
        }
    }
}

/// The drop report's funnel beside `harness`, read from `drop_seconds` (what the report sums). Every instance
/// writes its counts on its reaper's tick, so this reads again for up to 5 s until they agree; `None` when it
/// cannot be read.
async fn report_counts(
    database_url: &str,
    drop_id: &str,
    harness: ReportFunnel,
) -> Option<ReportCounts> {
    let drop: Uuid = drop_id.parse().ok()?;
    let (client, connection) = tokio::time::timeout(
        DB_TIMEOUT,
        tokio_postgres::connect(database_url, tokio_postgres::NoTls),
    )
    .await
    .ok()?
    .ok()?;
    let connection = tokio::spawn(connection);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let mut server = None;
    loop {
        let row = client
            .query_one(
                "SELECT COALESCE(sum(reserved), 0)::int8, COALESCE(sum(paid), 0)::int8,
                        COALESCE(sum(expired), 0)::int8, COALESCE(sum(cancelled), 0)::int8,
                        COALESCE(sum(declined), 0)::int8, COALESCE(sum(refused_sold_out), 0)::int8,
                        COALESCE(sum(refused_limit), 0)::int8
                 FROM drop_seconds WHERE drop_id = $1",
                &[&drop],
            )
            .await;
        let Ok(row) = row else { break };
        let read = ReportFunnel {
            reserved: row.get(0),
            paid: row.get(1),
            expired: row.get(2),
            cancelled: row.get(3),
            declined: row.get(4),
            refused_sold_out: row.get(5),
            refused_limit: row.get(6),
        };
        server = Some(read);
        if read == harness || tokio::time::Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    connection.abort();
    server.map(|server| ReportCounts { server, harness })
}

/// Reads the drop's counters and status on one instance.
async fn read_drop(
    user: &mut GooseUser,
    targets: &Targets,
    drop_id: &str,
    instance: usize,
) -> Option<(DropCounts, String)> {
    let call = Call::get(EP_DROP, format!("{API}/drops/{drop_id}")).on(instance);
    let reply = send(user, targets, &call, |r| r.status == 200).await;
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

/// Polls the drop on every instance until told to stop, keeping at most `MONITOR_SNAPSHOTS_MAX` readings, and
/// prints a progress line every second.
async fn monitor(
    funnel: Arc<Funnel>,
    mut user: GooseUser,
    drop_id: String,
    opens_at: tokio::time::Instant,
    mut stop: watch::Receiver<bool>,
) -> Vec<Snapshot> {
    let targets = Arc::clone(&funnel.targets);
    let mut timeline = Vec::new();
    let mut polls = 0u32;
    while timeline.len() < MONITOR_SNAPSHOTS_MAX && !*stop.borrow() {
        let t_ms = ms_since(opens_at);
        for instance in 0..targets.count() {
            if let Some((counts, status)) = read_drop(&mut user, &targets, &drop_id, instance).await
            {
                if instance == 0 && polls % PROGRESS_EVERY_POLLS == 0 {
                    let (paid, tabs_done) = (
                        funnel.units_paid.load(Ordering::Relaxed),
                        funnel.tabs_done.load(Ordering::Relaxed),
                    );
                    progress(format!(
                        "drop {:+.1} s: available {} held {} sold {} ({status}); {paid} paid, {tabs_done}/{} tabs done",
                        t_ms as f64 / 1000.0,
                        counts.available,
                        counts.held,
                        counts.sold,
                        funnel.users()
                    ));
                }
                timeline.push(Snapshot {
                    t_ms,
                    instance,
                    counts,
                    status,
                });
            }
        }
        polls = polls.wrapping_add(1);
        tokio::select! {
            () = tokio::time::sleep(MONITOR_INTERVAL) => {}
            _ = stop.changed() => break,
        }
    }
    timeline
}

/// Reads the drop on the first instance until no unit is held or the deadline passes; the last reading.
async fn wait_for_drained(
    user: &mut GooseUser,
    targets: &Targets,
    drop_id: &str,
    deadline: tokio::time::Instant,
) -> Option<(DropCounts, String)> {
    loop {
        let reading = read_drop(user, targets, drop_id, 0).await;
        let drained = reading.as_ref().is_some_and(|(c, _)| c.held == 0);
        if drained || tokio::time::Instant::now() >= deadline {
            return reading;
        }
        tokio::time::sleep(DRAIN_POLL_INTERVAL).await;
    }
}

/// Reads back released holds: each must be `released` with the reason its buyer caused. (checked, mismatched)
async fn check_released(user: &GooseUser, targets: &Targets, released: &[Released]) -> (i64, i64) {
    let sample = &released[..released.len().min(RELEASED_CHECKS_MAX)];
    let replies = join_all(sample.iter().map(|r| {
        let mut user = user.clone();
        async move {
            let call = Call::get(EP_RESERVATION, format!("{API}/reservations/{}", r.id))
                .auth(&r.token)
                .on(r.read_on);
            send(&mut user, targets, &call, |r| r.status == 200).await
        }
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
async fn db_facts(
    database_url: &str,
    drop_id: &str,
    per_member_limit: u32,
    purchases: &[String],
) -> anyhow::Result<DbFacts> {
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
        tokio_postgres::connect(database_url, tokio_postgres::NoTls),
    )
    .await
    .context("connecting to Postgres timed out")?
    .context("connecting to Postgres (--database-url)")?;
    let connection = tokio::spawn(connection);
    let limit = i64::from(per_member_limit);
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
pub(crate) fn instant_of(at: DateTime<Utc>) -> tokio::time::Instant {
    let now = tokio::time::Instant::now();
    match (at - Utc::now()).to_std() {
        Ok(ahead) => now + ahead,
        Err(_) => now,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shares(cancel: f64, expire: f64, decline: f64) -> Shares {
        Shares {
            cancel,
            expire,
            decline,
        }
    }

    #[test]
    fn roles_follow_the_funnel_over_any_prefix() {
        // The default funnel: 20% abandon (half cancel, half let expire), 20% of the rest are declined.
        let shares = shares(0.1, 0.1, 0.16);
        for holders in [25u64, 200, 1000] {
            let mut counts = BTreeMap::new();
            for k in 0..holders {
                *counts
                    .entry(format!("{:?}", role_of(k, shares)))
                    .or_insert(0u64) += 1;
            }
            let share = |role: &str| counts.get(role).copied().unwrap_or(0) as f64 / holders as f64;
            // Within two holds of the exact share.
            let tolerance = 2.0 / holders as f64;
            assert!((share("Cancel") - 0.1).abs() <= tolerance, "{counts:?}");
            assert!((share("Expire") - 0.1).abs() <= tolerance, "{counts:?}");
            assert!((share("Decline") - 0.16).abs() <= tolerance, "{counts:?}");
            assert!((share("Pay") - 0.64).abs() <= tolerance, "{counts:?}");
        }
    }

    #[test]
    fn zero_rates_mean_everyone_pays_and_full_abandon_means_nobody_does() {
        assert!((0..1000).all(|k| role_of(k, shares(0.0, 0.0, 0.0)) == Role::Pay));
        assert!((0..1000).all(|k| role_of(k, shares(1.0, 0.0, 0.0)) == Role::Cancel));
        assert!((0..1000).all(|k| role_of(k, shares(0.0, 1.0, 0.0)) != Role::Pay));
    }

    #[test]
    fn a_refused_buyer_sends_as_many_tabs_as_it_lacks_units() {
        // Limit 2, no hold at the opening: the first two refused tabs wait, the rest do not.
        assert!(should_wait(2, 0, 0));
        assert!(should_wait(2, 0, 1));
        assert!(!should_wait(2, 0, 2));
        // One hold already: only one tab waits.
        assert!(should_wait(2, 1, 0));
        assert!(!should_wait(2, 1, 1));
        // Served at the opening (even if that hold was then cancelled or declined): nobody waits.
        assert!(!should_wait(1, 1, 0));
    }

    #[test]
    fn reservation_answers_of_a_selling_out_drop_are_expected() {
        let reply = |status: u16, code: Option<&str>| Reply {
            status,
            body: code.map_or(Value::Null, |c| json!({ "error": { "code": c } })),
            retry_after: None,
            instance: 0,
        };
        assert!(reserve_expected(&reply(201, None)));
        assert!(reserve_expected(&reply(409, Some("sold_out"))));
        assert!(reserve_expected(&reply(409, Some("limit_exceeded"))));
        assert!(!reserve_expected(&reply(409, Some("closed"))));
        assert!(!reserve_expected(&reply(500, None)));
        assert!(reply(500, None).is_server_failure());
        assert!(reply(0, None).is_server_failure());
    }

    #[test]
    fn the_probe_names_instances_only_when_they_disagree() {
        let same = ["409 not_open".to_owned(), "409 not_open".to_owned()];
        assert_eq!(early_probe_answer(&same), "409 not_open");
        let differ = ["409 not_open".to_owned(), "201".to_owned()];
        assert_eq!(
            early_probe_answer(&differ),
            "409 not_open (instance 1), 201 (instance 2)"
        );
    }
}
