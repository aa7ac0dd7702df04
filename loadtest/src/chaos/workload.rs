//! The buyers: plain tokio tasks, each acting as a few members, looping until the load window ends. A session
//! reserves on a seeded instance, then with seeded odds pays (`tok_ok`, or `tok_declined`; on the same instance
//! or another), cancels, reads, or abandons the hold (sometimes reading it again once it must have expired).
//! 429/503 and calls without an answer are retried a few times with a small seeded backoff, with the same
//! `Idempotency-Key` (so a retry cannot take a second hold or charge twice) and on the next instance. Every call
//! is recorded in the history.
//!
//! Paying is paced so that the stock sells out near the end of the window rather than in its first seconds (a
//! sold-out drop has nothing left to go wrong): a session that would pay ahead of the pace pays with a declined
//! token, cancels or abandons instead. For long runs raise `--stock` (and `--per-member-limit` or `--members`)
//! so that successful payments stay frequent. The odds and the choices are seeded per buyer; the pace depends on time, so two runs of one seed
//! make the same kinds of choices but not the same calls.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hyper::Method;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

use super::history::{Entry, Op, OpKind, Recorder};
use super::http::{Addrs, Client, Request};
use crate::setup::{Member, API};

/// What every buyer shares.
#[derive(Debug)]
pub struct Shared {
    pub recorder: Arc<Recorder>,
    pub addrs: Arc<Addrs>,
    pub drop_id: String,
    pub stock: i64,
    pub per_member_limit: u32,
    pub hold_seconds: u32,
    /// The load window, in milliseconds of the run's clock.
    pub load_ms: u64,
    pub op_timeout: Duration,
    pub seed: u64,
    /// Units paid with a 200 so far, for the pace.
    pub paid_units: AtomicI64,
}

impl Shared {
    fn over(&self) -> bool {
        self.recorder.now_ms() >= self.load_ms
    }

    /// Whether one more payment keeps to the pace: the stock sold out at 85% of the window.
    fn pay_on_pace(&self) -> bool {
        let elapsed = self.recorder.now_ms() as f64 / (self.load_ms as f64 * SELL_OUT_AT);
        let target = (self.stock as f64 * elapsed).ceil() as i64;
        self.paid_units.load(Ordering::Relaxed) < target.max(1)
    }
}

/// Where in the window the pace sells the last unit.
const SELL_OUT_AT: f64 = 0.85;
/// Retries of a call answered 429/503 or not at all.
const RETRIES_MAX: u32 = 4;
/// Seeded backoff before a retry, in milliseconds.
const BACKOFF_MS: std::ops::RangeInclusive<u64> = 100..=400;
/// Odds of what a session does with its hold (the rest abandon it).
const PAY_OK: f64 = 0.40;
const PAY_DECLINED: f64 = 0.10;
const CANCEL: f64 = 0.15;
const READ_THEN_PAY: f64 = 0.10;
/// Odds of paying through another instance than the one that granted the hold.
const PAY_ELSEWHERE: f64 = 0.3;

/// A member a buyer acts as, and the units it was told are paid.
struct Account {
    member: Member,
    paid: u32,
}

/// What a session does with its hold.
enum Choice {
    Pay,
    Decline,
    Cancel,
    ReadThenPay,
    Abandon,
    AbandonThenRead,
}

/// A hold a session got.
struct Hold {
    id: String,
    quantity: u32,
    instance: usize,
}

/// One buyer task.
pub struct Buyer {
    shared: Arc<Shared>,
    index: u32,
    client: Client,
    rng: StdRng,
    accounts: Vec<Account>,
    /// Calls made, for idempotency keys.
    calls: u64,
}

impl Buyer {
    pub fn new(shared: Arc<Shared>, index: u32, members: Vec<Member>) -> Self {
        let seed = shared.seed ^ u64::from(index).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        Self {
            client: Client::new(Arc::clone(&shared.addrs), shared.op_timeout),
            rng: StdRng::seed_from_u64(seed),
            accounts: members
                .into_iter()
                .map(|member| Account { member, paid: 0 })
                .collect(),
            shared,
            index,
            calls: 0,
        }
    }

    /// Sessions until the window ends.
    pub async fn run(mut self) {
        while !self.shared.over() && !self.accounts.is_empty() {
            let account = self.pick_account();
            if let Some(hold) = self.reserve(account).await {
                self.think(0..=300).await;
                self.settle(account, hold).await;
            }
            self.think(50..=400).await;
        }
    }

    /// A member still under the limit, or (when all reached it, to see the limit hold) any, after a pause.
    fn pick_account(&mut self) -> usize {
        let limit = self.shared.per_member_limit;
        let open: Vec<usize> = (0..self.accounts.len())
            .filter(|i| self.accounts[*i].paid < limit)
            .collect();
        match open.len() {
            0 => self.rng.gen_range(0..self.accounts.len()),
            n => open[self.rng.gen_range(0..n)],
        }
    }

    async fn think(&mut self, ms: std::ops::RangeInclusive<u64>) {
        let pause = self.rng.gen_range(ms);
        tokio::time::sleep(Duration::from_millis(pause)).await;
    }

    fn instances(&self) -> usize {
        self.shared.addrs.len()
    }

    fn key(&mut self, what: &str) -> String {
        self.calls += 1;
        format!(
            "chaos-{}-{}-{what}-{}",
            self.shared.seed, self.index, self.calls
        )
    }

    /// Reserves one or two units; the hold, or `None` after a refusal (and a pause fitting it).
    async fn reserve(&mut self, account: usize) -> Option<Hold> {
        let two = self.shared.per_member_limit >= 2 && self.rng.gen_bool(0.2);
        let quantity = if two { 2 } else { 1 };
        let instance = self.rng.gen_range(0..self.instances());
        let mut request = Request::new(
            Method::POST,
            format!("{API}/drops/{}/reservations", self.shared.drop_id),
        );
        request.body = Some(json!({ "quantity": quantity }));
        request.idempotency_key = Some(self.key("reserve"));
        let op = self
            .call_retrying(OpKind::Reserve, account, instance, None, request)
            .await?;
        match (op.http_status(), op.code()) {
            (Some(201), _) => Some(Hold {
                id: op.reservation.clone()?,
                quantity,
                instance: op.instance,
            }),
            (Some(409), Some("sold_out")) => {
                self.think(200..=600).await;
                None
            }
            (Some(409), Some("limit_exceeded")) if self.all_at_limit() => {
                self.think(500..=1000).await;
                None
            }
            _ => None,
        }
    }

    fn all_at_limit(&self) -> bool {
        let limit = self.shared.per_member_limit;
        self.accounts.iter().all(|a| a.paid >= limit)
    }

    /// What the session does with its hold.
    async fn settle(&mut self, account: usize, hold: Hold) {
        match self.choose() {
            Choice::Pay => self.pay(account, &hold, "tok_ok").await,
            Choice::Decline => self.pay(account, &hold, "tok_declined").await,
            Choice::Cancel => self.cancel(account, &hold).await,
            Choice::ReadThenPay => {
                self.read(account, &hold).await;
                if self.shared.pay_on_pace() {
                    self.pay(account, &hold, "tok_ok").await;
                }
            }
            Choice::Abandon => {}
            Choice::AbandonThenRead => {
                // Come back once it must have expired, and see that it did.
                let wait =
                    u64::from(self.shared.hold_seconds) * 1000 + self.rng.gen_range(300..=1500);
                tokio::time::sleep(Duration::from_millis(wait)).await;
                self.read(account, &hold).await;
            }
        }
    }

    /// A seeded roll of the odds; a payment ahead of the pace becomes a declined payment (it still goes through
    /// the gateway, slow or not, and the lease), a cancel or an abandon.
    fn choose(&mut self) -> Choice {
        let roll: f64 = self.rng.gen();
        let coin = self.rng.gen_bool(0.5);
        let instead = self.rng.gen_range(0..3);
        if roll < PAY_OK {
            match (self.shared.pay_on_pace(), instead) {
                (true, _) => Choice::Pay,
                (false, 0) => Choice::Decline,
                (false, 1) => Choice::Cancel,
                (false, _) => Choice::Abandon,
            }
        } else if roll < PAY_OK + PAY_DECLINED {
            Choice::Decline
        } else if roll < PAY_OK + PAY_DECLINED + CANCEL {
            Choice::Cancel
        } else if roll < PAY_OK + PAY_DECLINED + CANCEL + READ_THEN_PAY {
            Choice::ReadThenPay
        } else if coin {
            Choice::AbandonThenRead
        } else {
            Choice::Abandon
        }
    }

    /// Pays, then sometimes reads the hold back or pays it again elsewhere (the same 200 must come back).
    async fn pay(&mut self, account: usize, hold: &Hold, token: &str) {
        let instance = if self.rng.gen_bool(PAY_ELSEWHERE) {
            (hold.instance + self.rng.gen_range(1..self.instances().max(2))) % self.instances()
        } else {
            hold.instance
        };
        let path = format!("{API}/reservations/{}/payment", hold.id);
        let mut request = Request::new(Method::POST, path);
        request.body = Some(json!({ "payment_token": token }));
        request.idempotency_key = Some(self.key("pay"));
        let Some(op) = self
            .call_retrying(
                OpKind::Pay,
                account,
                instance,
                Some(&hold.id),
                request.clone(),
            )
            .await
        else {
            return;
        };
        match op.http_status() {
            Some(200) => {
                self.accounts[account].paid += hold.quantity;
                self.shared
                    .paid_units
                    .fetch_add(i64::from(hold.quantity), Ordering::Relaxed);
                if self.rng.gen_bool(0.3) {
                    self.read(account, hold).await;
                }
                if self.rng.gen_bool(0.1) && !self.shared.over() {
                    request.idempotency_key = None;
                    let elsewhere = (op.instance + 1) % self.instances();
                    self.call(OpKind::Pay, account, elsewhere, Some(&hold.id), &request)
                        .await;
                }
            }
            // No answer: look at what became of it.
            None => self.read(account, hold).await,
            Some(_) => {}
        }
    }

    async fn cancel(&mut self, account: usize, hold: &Hold) {
        let instance = self.rng.gen_range(0..self.instances());
        let request = Request::new(Method::DELETE, format!("{API}/reservations/{}", hold.id));
        self.call_retrying(OpKind::Cancel, account, instance, Some(&hold.id), request)
            .await;
    }

    async fn read(&mut self, account: usize, hold: &Hold) {
        let instance = self.rng.gen_range(0..self.instances());
        let request = Request::new(Method::GET, format!("{API}/reservations/{}", hold.id));
        self.call_retrying(OpKind::Read, account, instance, Some(&hold.id), request)
            .await;
    }

    /// Calls, and again after 429/503 or no answer (on the next instance, after a seeded backoff), at most
    /// `RETRIES_MAX` more times; the last op, or `None` when the window was over before the first call (a
    /// session ends with the window; only calls already made finish). A retry without an idempotency key is only
    /// made for reads and cancels, which are idempotent.
    async fn call_retrying(
        &mut self,
        kind: OpKind,
        account: usize,
        mut instance: usize,
        reservation: Option<&str>,
        request: Request,
    ) -> Option<Op> {
        if self.shared.over() {
            return None;
        }
        let mut op = self
            .call(kind, account, instance, reservation, &request)
            .await;
        for _ in 0..RETRIES_MAX {
            let retry = matches!(op.http_status(), None | Some(429 | 503));
            if !retry || self.shared.over() {
                break;
            }
            self.think(BACKOFF_MS).await;
            instance = (instance + 1) % self.instances();
            op = self
                .call(kind, account, instance, reservation, &request)
                .await;
        }
        Some(op)
    }

    /// One call, recorded.
    async fn call(
        &mut self,
        kind: OpKind,
        account: usize,
        instance: usize,
        reservation: Option<&str>,
        request: &Request,
    ) -> Op {
        let member = &self.accounts[account].member;
        let mut request = request.clone();
        request.token = Some(member.token.clone());
        let recorder = &self.shared.recorder;
        let op_id = recorder.next_op_id();
        let invoke_ms = recorder.now_ms();
        let answer = self.client.send(instance, &request).await;
        let complete_ms = recorder.now_ms();
        let granted = (kind == OpKind::Reserve && answer.status() == Some(201))
            .then(|| {
                answer
                    .body
                    .get("id")
                    .and_then(Value::as_str)
                    .map(str::to_owned)
            })
            .flatten();
        let op = Op {
            op: op_id,
            kind,
            buyer: Some(self.index),
            member: Some(member.id.clone()),
            instance,
            reservation: reservation.map(str::to_owned).or(granted),
            method: request.method.to_string(),
            path: request.path.clone(),
            body: request.body.clone(),
            idempotency_key: request.idempotency_key.clone(),
            invoke_ms,
            complete_ms,
            status: answer.outcome,
            response: answer.body,
        };
        recorder.record(Entry::Op(op.clone())).await;
        op
    }
}

/// Members dealt to buyers round robin: buyer `b` gets members `b`, `b + buyers`, ...
pub fn deal(members: Vec<Member>, buyers: u32) -> Vec<Vec<Member>> {
    let buyers = buyers.max(1) as usize;
    let mut dealt: Vec<Vec<Member>> = (0..buyers).map(|_| Vec::new()).collect();
    for (i, member) in members.into_iter().enumerate() {
        dealt[i % buyers].push(member);
    }
    dealt
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(i: usize) -> Member {
        Member {
            id: format!("m{i}"),
            token: String::new(),
            home: 0,
        }
    }

    #[test]
    fn members_are_dealt_round_robin() {
        let dealt = deal((0..5).map(member).collect(), 2);
        let ids: Vec<Vec<&str>> = dealt
            .iter()
            .map(|d| d.iter().map(|m| m.id.as_str()).collect())
            .collect();
        assert_eq!(ids, [vec!["m0", "m2", "m4"], vec!["m1", "m3"]]);
    }

    #[test]
    fn the_odds_leave_room_to_abandon() {
        let taken = PAY_OK + PAY_DECLINED + CANCEL + READ_THEN_PAY;
        assert!(taken < 1.0 && taken > 0.5);
    }
}
