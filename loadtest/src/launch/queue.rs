//! The `queue` scenario: members join a queue drop's waiting room, some before the opening (the pre-queue) and the
//! rest after it, poll their place, reserve with the pass they are given, and pay, cancel or are declined; some
//! never use their pass. Probes along the way: a reservation without a pass, with another member's pass and with an
//! expired one must each be refused.
//!
//! The checks (`verify`) after the run:
//! - **no reservation without a pass**: every probe refused with the right code, and every hold of the drop in
//!   Postgres belongs to a member the run saw admitted, created within that member's pass;
//! - **admission order equals the published order**: whenever a member was told "position p", exactly p - 1 of the
//!   members admitted between that answer and the member's own admission were admitted before it (counted with
//!   the answer's send/receive window, and a slack for the tick's clock reading; see `order_violations`);
//! - **first come first served after the opening, the pre-queue first**: a member whose join was answered before
//!   another's was sent is not admitted after it, and no pre-queue member after one who joined later;
//! - **the pre-queue is a uniform shuffle**: the rank correlation (Spearman) of join order and admission order
//!   over the pre-queue is within 5/sqrt(n-1) of zero (reported);
//! - **sold out within 1 s**: no member is told "waiting" on a look sent more than 1 s after the poller first saw
//!   nothing available and nothing held, and every member not admitted by then ends `sold_out`;
//! - **a live pass finds a unit**: admission follows the stock, so a reservation with a live pass is granted;
//! - and the stock checks every launch shares (`super::stock_checks`).

use std::collections::{HashMap, HashSet};

use goose::prelude::GooseUser;
use serde::Serialize;
use serde_json::{json, Value};
use uuid::Uuid;

use super::{now_ms, role_of, sleep_until_ms, time_ms, weyl, Fixture, Launch, Role, Snapshot};
use crate::client::{jitter, Call, Reply};
use crate::setup::API;
use crate::verify::{check, Check, Verdict};

/// Slack for the clock reading of an admission tick: an admission stamped up to this long before a look was sent
/// may still have been invisible to it (the tick reads the clock, then runs).
pub const TICK_SLACK_MS: i64 = 250;
/// "Sold out" must reach every waiting member within this long.
pub const SOLD_OUT_WITHIN_MS: i64 = 1_000;
/// A member joins the pre-queue no later than this before the opening.
const PRE_QUEUE_MARGIN_MS: i64 = 400;
/// A member stops looking this long after the opening, whatever it was told.
const LOOK_DEADLINE_MS: i64 = 180_000;
/// One in this many members joins twice (the same place), and tries to reserve before being admitted.
const REJOIN_EVERY: usize = 10;
const NO_PASS_PROBE_EVERY: usize = 5;
/// One in this many admitted members first offers its pass under another member's name.
const FOREIGN_PASS_PROBE_EVERY: usize = 7;

/// The queue terms of a run.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Terms {
    pub pass_seconds: u32,
    pub admit_per_second: Option<u32>,
    /// Share of members who join before the opening.
    pub pre_share: f64,
    /// Members who join after the opening do so within this long after it.
    pub late_join_ms: u64,
    /// How often a waiting member looks at its place.
    pub poll_ms: u64,
}

/// A look at one's place while waiting in line: the answer's window and the position it gave.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Look {
    pub sent_ms: i64,
    pub answered_ms: i64,
    pub position: u64,
}

/// What one member saw.
#[derive(Debug, Clone, Default, Serialize)]
pub struct MemberLog {
    pub member: usize,
    /// The join's window; `None` if it never joined.
    pub join: Option<(i64, i64)>,
    /// Joined the pre-queue (the join answered `position: null` before the opening).
    pub pre_queue: bool,
    /// Joining again answered 200 with the same status (`None`: not tried).
    pub rejoin_same: Option<bool>,
    pub looks: Vec<Look>,
    /// The admission time (the pass's expiry less `pass_seconds`).
    pub admitted_ms: Option<i64>,
    pub pass_expires_ms: Option<i64>,
    /// The answer to a reservation without a pass, while waiting (`None`: not tried).
    pub no_pass: Option<String>,
    /// The answer to this member's pass offered under another member's token.
    pub foreign_pass: Option<String>,
    /// The answer to a reservation with the pass after it expired (members who abandon it).
    pub expired_pass: Option<String>,
    /// The answer to the reservation with a live pass.
    pub reserved: Option<String>,
    /// The send time of the last look answered "waiting".
    pub last_waiting_sent_ms: Option<i64>,
    /// When it was first told `sold_out` (the answer's arrival).
    pub sold_out_ms: Option<i64>,
    /// The last status it was told.
    pub last_status: Option<String>,
}

fn reserve_call(fixture: &Fixture, member: usize, token_of: usize, pass: Option<&str>) -> Call {
    let token = &fixture.members[token_of];
    let mut call = Call::post(
        "/drops/{id}/reservations",
        format!("{API}/drops/{}/reservations", fixture.drop_id),
        json!({ "quantity": 1 }),
    )
    .auth(&token.token)
    .idempotency_key(Uuid::new_v4().to_string())
    .on(fixture.members[member].home);
    if let Some(pass) = pass {
        call = call.header("Admission-Pass", pass);
    }
    call
}

fn refused(reply: &Reply) -> bool {
    reply.status == 403
}

/// One member's whole part: join at its time, look until admitted or sold out, act on the pass.
#[allow(
    clippy::too_many_lines,
    reason = "one member's path through the waiting room, in the order it happens"
)]
pub(super) async fn take_part(
    launch: &Launch,
    fixture: &Fixture,
    terms: &Terms,
    user: &mut GooseUser,
    index: usize,
) -> MemberLog {
    let mut log = MemberLog {
        member: index,
        ..MemberLog::default()
    };
    let me = &fixture.members[index];
    let pre = weyl(index as u64) < terms.pre_share;
    let join_at = if pre {
        let window = (fixture.opens_at_ms - PRE_QUEUE_MARGIN_MS - fixture.ready_ms).max(1);
        fixture.ready_ms + i64::try_from(jitter(window.unsigned_abs()).as_millis()).unwrap_or(0)
    } else {
        fixture.opens_at_ms + i64::try_from(jitter(terms.late_join_ms).as_millis()).unwrap_or(0)
    };
    sleep_until_ms(join_at).await;
    let join = Call::post(
        "/drops/{id}/queue",
        format!("{API}/drops/{}/queue", fixture.drop_id),
        json!({}),
    )
    .auth(&me.token)
    .on(me.home);
    let sent = now_ms();
    let reply = launch
        .send(user, &join, |r| {
            r.status == 201 || (r.status == 409 && r.error_code() == Some("sold_out"))
        })
        .await;
    let answered = now_ms();
    match reply.status {
        201 => {
            log.join = Some((sent, answered));
            log.pre_queue = reply.body.get("position").is_some_and(Value::is_null)
                && reply.str_field("status") == Some("waiting");
        }
        409 if reply.error_code() == Some("sold_out") => {
            log.sold_out_ms = Some(answered);
            log.last_status = Some("sold_out".to_owned());
            return log;
        }
        _ => {
            launch.unexpected("join", &reply);
            return log;
        }
    }
    if index % REJOIN_EVERY == 0 {
        let again = launch.send(user, &join, |r| r.status == 200).await;
        log.rejoin_same = Some(again.status == 200 && kept_place(&reply, &again));
    }
    if index % NO_PASS_PROBE_EVERY == 0 {
        let call = reserve_call(fixture, index, index, None);
        let answer = launch.send(user, &call, refused).await;
        log.no_pass = Some(answer.label());
    }
    let look = Call::get(
        "/drops/{id}/queue/me",
        format!("{API}/drops/{}/queue/me", fixture.drop_id),
    )
    .auth(&me.token)
    .on(me.home);
    let deadline = fixture.opens_at_ms + LOOK_DEADLINE_MS;
    let mut first = Some(reply);
    let pass = loop {
        let sent = now_ms();
        let reply = match first.take() {
            Some(reply) => reply,
            None => launch.send(user, &look, |r| r.status == 200).await,
        };
        let answered = now_ms();
        if reply.status != 200 && reply.status != 201 {
            launch.unexpected("look", &reply);
        }
        let status = reply.str_field("status").map(str::to_owned);
        match status.as_deref() {
            Some("waiting") => {
                log.last_waiting_sent_ms = Some(sent);
                if let Some(position) = reply.body.get("position").and_then(Value::as_u64) {
                    log.looks.push(Look {
                        sent_ms: sent,
                        answered_ms: answered,
                        position,
                    });
                }
            }
            Some("admitted") => {
                let expires = time_ms(&reply.body, "pass_expires_at");
                let pass = reply.str_field("pass").map(str::to_owned);
                if let (Some(expires), Some(pass)) = (expires, pass) {
                    log.pass_expires_ms = Some(expires);
                    log.admitted_ms = Some(expires - i64::from(terms.pass_seconds) * 1000);
                    log.last_status = status;
                    break Some(pass);
                }
                launch.unexpected("look: admitted without a pass", &reply);
                break None;
            }
            Some("sold_out") => {
                log.sold_out_ms.get_or_insert(answered);
                log.last_status = status;
                break None;
            }
            Some(_) => {
                launch.unexpected("look", &reply);
                log.last_status = status;
                break None;
            }
            None => {}
        }
        if now_ms() > deadline {
            break None;
        }
        tokio::time::sleep(
            std::time::Duration::from_millis(terms.poll_ms) + jitter(terms.poll_ms / 4),
        )
        .await;
    };
    let Some(pass) = pass else {
        return log;
    };
    if index % FOREIGN_PASS_PROBE_EVERY == 0 {
        let other = (index + 1) % fixture.members.len();
        let call = reserve_call(fixture, index, other, Some(&pass));
        log.foreign_pass = Some(launch.send(user, &call, refused).await.label());
    }
    let role = role_of(
        launch
            .given
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        &launch.args,
    );
    if role == Role::Abandon {
        // Never used: the place is freed at expiry and the next member admitted; the pass is now refused.
        sleep_until_ms(log.pass_expires_ms.unwrap_or_default() + 300).await;
        let call = reserve_call(fixture, index, index, Some(&pass));
        log.expired_pass = Some(launch.send(user, &call, refused).await.label());
        return log;
    }
    let call = reserve_call(fixture, index, index, Some(&pass));
    let reply = launch.send(user, &call, |r| r.status == 201).await;
    log.reserved = Some(reply.label());
    match reply.str_field("id") {
        Some(hold) if reply.status == 201 => {
            launch.settle(user, index, hold.to_owned(), role).await;
        }
        _ => launch.unexpected("reserve with a live pass", &reply),
    }
    log
}

/// Members whose looks contradict the admission order: for each look at position p, the admissions strictly
/// after the answer and before the member's own (all ahead of it under first come first served) must be at most
/// p - 1, and the admissions from `TICK_SLACK_MS` before the look was sent up to the member's own (every member
/// ahead of it is admitted in that span) at least p - 1. Returns (looks checked, violations with an example).
pub fn order_violations(logs: &[MemberLog]) -> (usize, Vec<String>) {
    let mut admissions: Vec<i64> = logs.iter().filter_map(|l| l.admitted_ms).collect();
    admissions.sort_unstable();
    let count_in = |from: i64, to: i64, from_inclusive: bool, to_inclusive: bool| {
        let lo = if from_inclusive {
            admissions.partition_point(|&a| a < from)
        } else {
            admissions.partition_point(|&a| a <= from)
        };
        let hi = if to_inclusive {
            admissions.partition_point(|&a| a <= to)
        } else {
            admissions.partition_point(|&a| a < to)
        };
        hi.saturating_sub(lo)
    };
    let mut checked = 0;
    let mut violations = Vec::new();
    for log in logs {
        let Some(admitted) = log.admitted_ms else {
            continue;
        };
        for look in log.looks.iter().filter(|l| l.answered_ms < admitted) {
            checked += 1;
            let ahead = usize::try_from(look.position.saturating_sub(1)).unwrap_or(usize::MAX);
            // Strictly between the answer and the member's own tick: certainly after the look, before the member.
            let at_least = count_in(look.answered_ms, admitted, false, false);
            // From a tick slack before the look up to the member's own tick, less the member itself.
            let at_most =
                count_in(look.sent_ms - TICK_SLACK_MS, admitted, true, true).saturating_sub(1);
            if at_least > ahead || ahead > at_most {
                violations.push(format!(
                    "member {} told position {} at {}..{} ms, admitted at {admitted}: {at_least}..{at_most} \
                     admissions in between",
                    log.member, look.position, look.sent_ms, look.answered_ms
                ));
            }
        }
    }
    (checked, violations)
}

/// Pairs admitted out of join order: a member whose join was answered before another's was sent admitted after
/// it (among those who joined the line after the opening), or a pre-queue member admitted after a later joiner.
pub fn fifo_violations(logs: &[MemberLog]) -> (usize, Vec<String>) {
    let mut late: Vec<(i64, i64, i64, usize)> = Vec::new();
    let mut last_pre_admission = None::<(i64, usize)>;
    for log in logs {
        let (Some((sent, answered)), Some(admitted)) = (log.join, log.admitted_ms) else {
            continue;
        };
        if log.pre_queue {
            if last_pre_admission.is_none_or(|(a, _)| admitted > a) {
                last_pre_admission = Some((admitted, log.member));
            }
        } else {
            late.push((sent, answered, admitted, log.member));
        }
    }
    let mut violations = Vec::new();
    if let Some((pre, pre_member)) = last_pre_admission {
        for &(_, _, admitted, member) in &late {
            if admitted < pre {
                violations.push(format!(
                    "member {member} joined after the opening and was admitted at {admitted}, before pre-queue \
                     member {pre_member} at {pre}"
                ));
            }
        }
    }
    // By send time: a member's join answered before a later one was sent must not be admitted after it. Sorted by
    // answer time, the admissions of members whose joins are certainly ordered must not decrease.
    late.sort_unstable_by_key(|&(_, answered, _, _)| answered);
    let mut pairs = 0;
    for (i, &(_, answered_a, admitted_a, member_a)) in late.iter().enumerate() {
        for &(sent_b, _, admitted_b, member_b) in &late[i + 1..] {
            if answered_a < sent_b {
                pairs += 1;
                if admitted_a > admitted_b {
                    violations.push(format!(
                        "member {member_a} joined before member {member_b} but was admitted later ({admitted_a} > \
                         {admitted_b})"
                    ));
                }
            }
        }
    }
    (pairs, violations)
}

/// Spearman's rank correlation of two equally long series (ties get their average rank); `None` under 3 points.
pub fn spearman(x: &[f64], y: &[f64]) -> Option<f64> {
    let n = x.len();
    if n < 3 || y.len() != n {
        return None;
    }
    let (rx, ry) = (ranks(x), ranks(y));
    let mean = (n as f64 + 1.0) / 2.0;
    let (mut cov, mut vx, mut vy) = (0.0, 0.0, 0.0);
    for i in 0..n {
        let (dx, dy) = (rx[i] - mean, ry[i] - mean);
        cov += dx * dy;
        vx += dx * dx;
        vy += dy * dy;
    }
    (vx > 0.0 && vy > 0.0).then(|| cov / (vx * vy).sqrt())
}

fn ranks(values: &[f64]) -> Vec<f64> {
    let mut order: Vec<usize> = (0..values.len()).collect();
    order.sort_by(|&a, &b| values[a].total_cmp(&values[b]));
    let mut ranks = vec![0.0; values.len()];
    let mut i = 0;
    while i < order.len() {
        let mut j = i;
        while j + 1 < order.len() && values[order[j + 1]] == values[order[i]] {
            j += 1;
        }
        let average = (i + j) as f64 / 2.0 + 1.0;
        for &k in &order[i..=j] {
            ranks[k] = average;
        }
        i = j + 1;
    }
    ranks
}

/// Whether a member's second join (`again`, answered 200) kept the place their first (`first`) gave: the same status
/// and no position further back (one in the pre-queue has none before the opening), or admitted since: the admission
/// loop may run between the two calls (it made this check fail on a slow machine when it asked for the same status).
fn kept_place(first: &Reply, again: &Reply) -> bool {
    let position = |reply: &Reply| reply.body.get("position").and_then(Value::as_u64);
    match (first.str_field("status"), again.str_field("status")) {
        (Some("waiting"), Some("admitted")) => true,
        (before, after) if before == after => match (position(first), position(again)) {
            (Some(before), Some(after)) => after <= before,
            // In the pre-queue (no position yet) before the opening, or a status without one.
            (None, _) => true,
            (Some(_), None) => false,
        },
        _ => false,
    }
}

/// The pre-queue's join order against its admission order: (members, rho, the bound it must stay within).
pub fn pre_queue_correlation(logs: &[MemberLog]) -> Option<(usize, f64, f64)> {
    let (joins, admissions): (Vec<f64>, Vec<f64>) = logs
        .iter()
        .filter(|l| l.pre_queue)
        .filter_map(|l| Some((l.join?.1 as f64, l.admitted_ms? as f64)))
        .unzip();
    let rho = spearman(&joins, &admissions)?;
    let n = joins.len();
    Some((n, rho, 5.0 / ((n - 1) as f64).sqrt()))
}

/// When the poller first saw nothing available and nothing held.
pub fn sold_out_since(snapshots: &[Snapshot]) -> Option<i64> {
    snapshots
        .iter()
        .find(|s| s.available == 0 && s.held == 0)
        .map(|s| s.at_ms)
}

/// Every check of a queue run that is particular to the waiting room (the stock checks come from `stock_checks`).
#[allow(
    clippy::too_many_lines,
    reason = "every check of the waiting room in report order, each beside the numbers it compares"
)]
pub fn verify(
    logs: &[MemberLog],
    snapshots: &[Snapshot],
    reservations: &[(String, String, i64)],
    member_ids: &[String],
) -> Vec<Check> {
    let mut checks = Vec::new();
    let probes = |pick: fn(&MemberLog) -> Option<&String>, want: &str| {
        let answers: Vec<&String> = logs.iter().filter_map(pick).collect();
        let wrong: Vec<&&String> = answers.iter().filter(|a| a.as_str() != want).collect();
        (
            answers.len(),
            wrong.len(),
            wrong.first().map(|w| (**w).clone()),
        )
    };
    let (no_pass, no_pass_wrong, first_no_pass) =
        probes(|l| l.no_pass.as_ref(), "403 not_admitted");
    let (foreign, foreign_wrong, first_foreign) =
        probes(|l| l.foreign_pass.as_ref(), "403 not_admitted");
    let (expired, expired_wrong, first_expired) =
        probes(|l| l.expired_pass.as_ref(), "403 pass_expired");
    // Every hold in Postgres: a member the run saw admitted, created within its pass (a second of slack for the
    // hold's own clock reading after the check).
    let passes: HashMap<&str, (i64, i64)> = logs
        .iter()
        .filter_map(|l| {
            Some((
                member_ids.get(l.member)?.as_str(),
                (l.admitted_ms?, l.pass_expires_ms?),
            ))
        })
        .collect();
    let outside: Vec<&(String, String, i64)> = reservations
        .iter()
        .filter(|(_, member, created)| match passes.get(member.as_str()) {
            Some(&(from, to)) => *created < from - TICK_SLACK_MS || *created > to + 1_000,
            None => true,
        })
        .collect();
    checks.push(check(
        "no reservation without a pass",
        no_pass + foreign + expired > 0 && no_pass_wrong + foreign_wrong + expired_wrong == 0 && outside.is_empty(),
        format!(
            "without a pass {no_pass} tried, {no_pass_wrong} not 403 not_admitted{}; another's pass {foreign} tried, \
             {foreign_wrong} not refused{}; expired pass {expired} tried, {expired_wrong} not 403 pass_expired{}; \
             {} of {} holds in Postgres outside an admitted member's pass{}",
            first_no_pass.map(|w| format!(" (e.g. {w})")).unwrap_or_default(),
            first_foreign.map(|w| format!(" (e.g. {w})")).unwrap_or_default(),
            first_expired.map(|w| format!(" (e.g. {w})")).unwrap_or_default(),
            outside.len(),
            reservations.len(),
            outside.first().map(|(id, m, _)| format!(" (e.g. {id} of {m})")).unwrap_or_default(),
        ),
    ));
    let (looks, order) = order_violations(logs);
    checks.push(check(
        "admission order equals the published order",
        looks > 0 && order.is_empty(),
        format!(
            "{looks} looks at a position checked against the admissions after them, {} contradict it{}",
            order.len(),
            order.first().map(|v| format!(": {v}")).unwrap_or_default()
        ),
    ));
    let (pairs, fifo) = fifo_violations(logs);
    let late_admitted = logs
        .iter()
        .filter(|l| !l.pre_queue && l.admitted_ms.is_some())
        .count();
    checks.push(if late_admitted == 0 {
        Check {
            name: "first come first served after the opening, the pre-queue first",
            verdict: Verdict::Skip,
            detail: "nobody who joined after the opening was admitted (a smaller --pre-share reaches them)".to_owned(),
        }
    } else {
        check(
            "first come first served after the opening, the pre-queue first",
            fifo.is_empty(),
            format!(
                "{late_admitted} later joiners admitted; {pairs} pairs of them in a certain join order, {} admitted out of order{}",
                fifo.len(),
                fifo.first().map(|v| format!(": {v}")).unwrap_or_default()
            ),
        )
    });
    checks.push(match pre_queue_correlation(logs) {
        Some((n, rho, bound)) => check(
            "pre-queue order uncorrelated with join order",
            rho.abs() < bound,
            format!(
                "Spearman rho {rho:+.3} over {n} admitted pre-queue members (bound +-{bound:.3})"
            ),
        ),
        None => Check {
            name: "pre-queue order uncorrelated with join order",
            verdict: Verdict::Skip,
            detail: "fewer than 3 pre-queue members were admitted".to_owned(),
        },
    });
    match sold_out_since(snapshots) {
        Some(since) => {
            let late: Vec<&MemberLog> = logs
                .iter()
                .filter(|l| {
                    l.last_waiting_sent_ms
                        .is_some_and(|sent| sent > since + SOLD_OUT_WITHIN_MS)
                })
                .collect();
            let waiting_then: Vec<&MemberLog> = logs
                .iter()
                .filter(|l| l.join.is_some() && l.admitted_ms.is_none_or(|a| a > since))
                .collect();
            let not_told = waiting_then
                .iter()
                .filter(|l| l.admitted_ms.is_none() && l.sold_out_ms.is_none())
                .count();
            let mut delays: Vec<i64> = waiting_then
                .iter()
                .filter_map(|l| l.sold_out_ms.map(|t| (t - since).max(0)))
                .collect();
            delays.sort_unstable();
            checks.push(check(
                "everyone waiting told sold_out within 1 s",
                late.is_empty() && not_told == 0,
                format!(
                    "nothing available or held from {since} (poller); {} member(s) told \"waiting\" on a look sent \
                     over 1 s later, {not_told} never told sold_out; first sold_out answer after {} ms (median), {} \
                     ms (last), with looks every poll interval",
                    late.len(),
                    delays.get(delays.len() / 2).copied().unwrap_or_default(),
                    delays.last().copied().unwrap_or_default()
                ),
            ));
        }
        None => checks.push(Check {
            name: "everyone waiting told sold_out within 1 s",
            verdict: Verdict::Skip,
            detail: "the drop did not sell out during the run".to_owned(),
        }),
    }
    let reserved: Vec<&String> = logs.iter().filter_map(|l| l.reserved.as_ref()).collect();
    let refused: Vec<&&String> = reserved.iter().filter(|r| r.as_str() != "201").collect();
    checks.push(check(
        "a live pass finds a unit",
        !reserved.is_empty() && refused.is_empty(),
        format!(
            "{} reservations with a live pass, {} refused{}",
            reserved.len(),
            refused.len(),
            refused
                .first()
                .map(|r| format!(" (e.g. {r})"))
                .unwrap_or_default()
        ),
    ));
    let rejoins: Vec<bool> = logs.iter().filter_map(|l| l.rejoin_same).collect();
    let joined: HashSet<usize> = logs
        .iter()
        .filter(|l| l.join.is_some())
        .map(|l| l.member)
        .collect();
    checks.push(check(
        "joining again keeps one's place",
        rejoins.iter().all(|same| *same),
        format!(
            "{} of {} members joined again: {} answered 200 with the same status; {} members joined",
            rejoins.len(),
            logs.len(),
            rejoins.iter().filter(|same| **same).count(),
            joined.len()
        ),
    ));
    checks
}

#[cfg(test)]
mod tests {
    use super::*;

    fn place(status: &str, position: Option<u64>) -> Reply {
        Reply {
            status: 200,
            body: json!({ "status": status, "position": position }),
            retry_after: None,
            instance: 0,
        }
    }

    #[test]
    fn joining_again_keeps_the_place_or_moves_it_forward_only() {
        let waiting = |position| place("waiting", position);
        assert!(kept_place(&waiting(Some(5)), &waiting(Some(5))));
        assert!(kept_place(&waiting(Some(5)), &waiting(Some(3))));
        assert!(kept_place(&waiting(Some(5)), &place("admitted", None)));
        assert!(kept_place(&waiting(None), &waiting(Some(9))));
        assert!(
            !kept_place(&waiting(Some(5)), &waiting(Some(6))),
            "sent back"
        );
        assert!(!kept_place(&waiting(Some(5)), &waiting(None)));
        assert!(!kept_place(&place("admitted", None), &waiting(Some(1))));
        assert!(!kept_place(&waiting(Some(5)), &place("expired", None)));
    }

    fn admitted(
        member: usize,
        join: (i64, i64),
        pre: bool,
        at: i64,
        looks: Vec<Look>,
    ) -> MemberLog {
        MemberLog {
            member,
            join: Some(join),
            pre_queue: pre,
            looks,
            admitted_ms: Some(at),
            pass_expires_ms: Some(at + 5_000),
            ..MemberLog::default()
        }
    }

    fn look(sent: i64, position: u64) -> Look {
        Look {
            sent_ms: sent,
            answered_ms: sent + 5,
            position,
        }
    }

    #[test]
    fn positions_that_match_the_admissions_pass_and_a_jump_fails() {
        // Three in line, admitted a second apart; the third looked at 500 ms and was told position 3.
        let logs = vec![
            admitted(0, (0, 1), false, 1_000, vec![]),
            admitted(1, (2, 3), false, 2_000, vec![look(500, 2)]),
            admitted(2, (4, 5), false, 3_000, vec![look(500, 3), look(1_500, 2)]),
        ];
        assert_eq!(order_violations(&logs), (3, vec![]));
        let mut jumped = logs.clone();
        // Told position 3 but admitted first: nobody was admitted between, so it was not 2 behind.
        jumped[2].admitted_ms = Some(900);
        jumped[2].looks = vec![look(500, 3)];
        // It and the member it jumped both see the contradiction.
        assert_eq!(order_violations(&jumped).1.len(), 2);
        // Told position 1 but two were admitted before it: overtaken.
        let mut overtaken = logs;
        overtaken[2].looks = vec![look(500, 1)];
        assert_eq!(order_violations(&overtaken).1.len(), 1);
    }

    #[test]
    fn later_joiners_admitted_first_fail_and_the_pre_queue_goes_first() {
        let fair = vec![
            admitted(0, (0, 10), true, 1_000, vec![]),
            admitted(1, (100, 110), false, 2_000, vec![]),
            admitted(2, (200, 210), false, 2_000, vec![]),
        ];
        assert!(fifo_violations(&fair).1.is_empty());
        let mut unfair = fair.clone();
        unfair[1].admitted_ms = Some(3_000);
        assert_eq!(fifo_violations(&unfair).1.len(), 1);
        let mut pre_last = fair;
        pre_last[0].admitted_ms = Some(5_000);
        assert_eq!(fifo_violations(&pre_last).1.len(), 2);
    }

    #[test]
    fn spearman_sees_order_and_its_absence() {
        let x: Vec<f64> = (0..100).map(f64::from).collect();
        assert!((spearman(&x, &x).unwrap() - 1.0).abs() < 1e-9);
        let reversed: Vec<f64> = x.iter().rev().copied().collect();
        assert!((spearman(&x, &reversed).unwrap() + 1.0).abs() < 1e-9);
        // A fixed pseudo-random permutation: far from both.
        let shuffled: Vec<f64> = (0..100u64).map(|i| ((i * 37 + 11) % 100) as f64).collect();
        assert!(spearman(&x, &shuffled).unwrap().abs() < 0.5);
        assert_eq!(ranks(&[3.0, 1.0, 3.0]), vec![2.5, 1.0, 2.5]);
    }

    #[test]
    fn a_member_told_waiting_long_after_the_sell_out_fails() {
        let snapshots = [Snapshot {
            at_ms: 10_000,
            stock: 1,
            available: 0,
            held: 0,
            sold: 1,
            waiting: Some(1),
        }];
        let mut told = MemberLog {
            member: 0,
            join: Some((0, 1)),
            last_waiting_sent_ms: Some(10_500),
            sold_out_ms: Some(10_700),
            ..MemberLog::default()
        };
        let name = "everyone waiting told sold_out within 1 s";
        let verdict = |log: &MemberLog| {
            verify(std::slice::from_ref(log), &snapshots, &[], &[])
                .into_iter()
                .find(|c| c.name == name)
                .unwrap()
                .verdict
        };
        assert_eq!(verdict(&told), Verdict::Pass);
        told.last_waiting_sent_ms = Some(11_200);
        assert_eq!(verdict(&told), Verdict::Fail);
        told.last_waiting_sent_ms = Some(10_500);
        told.sold_out_ms = None;
        assert_eq!(verdict(&told), Verdict::Fail);
    }

    #[test]
    fn a_hold_of_a_member_never_admitted_fails() {
        let logs = vec![MemberLog {
            no_pass: Some("403 not_admitted".to_owned()),
            ..admitted(0, (0, 1), false, 1_000, vec![])
        }];
        let ids = vec!["a".to_owned(), "b".to_owned()];
        let name = "no reservation without a pass";
        let verdict = |holds: &[(String, String, i64)]| {
            verify(&logs, &[], holds, &ids)
                .into_iter()
                .find(|c| c.name == name)
                .unwrap()
                .verdict
        };
        assert_eq!(verdict(&[("h1".into(), "a".into(), 1_200)]), Verdict::Pass);
        assert_eq!(verdict(&[("h2".into(), "b".into(), 1_200)]), Verdict::Fail);
        assert_eq!(verdict(&[("h3".into(), "a".into(), 9_000)]), Verdict::Fail);
    }
}
