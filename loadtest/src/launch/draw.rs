//! The `draw` scenario: members enter a draw drop between its opening and `draw_at` (some enter twice, some
//! withdraw), look at their entry after the draw until it is `won` or `lost`, and act on a won hold by the funnel
//! rates: pay, be declined, cancel, or let it expire, each of which hands the units down the ranking.
//!
//! The checks (`verify`) after the run:
//! - **the commitment held**: before the draw `GET .../draw` showed the commitment and no seed; after it the seed
//!   hashes (SHA-256) to that commitment;
//! - **the published entries are the entries**: the count and `entries_digest` recomputed from the ids the members
//!   were given (withdrawn ones left out) and from Postgres;
//! - **the ranking recomputed from the seed**: HMAC-SHA256(seed, id) ascending, with the `hmac` crate (not the
//!   server's own code), equals `GET .../draw/ranking` page by page;
//! - **winners follow the ranking**: the entries that won are exactly ranks 1..W, every other entry lost, every
//!   winner's hold is its entry's reservation, and every hold of the drop in Postgres is a winner's;
//! - **one entry per member**: entering again answered 200 with the same entry, one row per member in Postgres;
//! - **told once**: each winner one `draw_won`, each loser one `draw_lost`;
//! - and the stock checks every launch shares (`super::stock_checks`).

use std::collections::{HashMap, HashSet};

use goose::prelude::GooseUser;
use hmac::{Hmac, KeyInit, Mac};
use serde::Serialize;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use super::{now_ms, role_of, sleep_until_ms, weyl, Fixture, Launch};
use crate::client::{jitter, Call};
use crate::lock;
use crate::setup::API;
use crate::verify::{check, Check};

/// An entry is made no later than this before `draw_at`.
const ENTRY_MARGIN_MS: i64 = 400;
/// A member stops looking this long after the draw, whatever it was told.
const LOOK_DEADLINE_MS: i64 = 180_000;
/// One in this many members enters twice, and reads the draw before it happens.
const REENTER_EVERY: usize = 10;
const EARLY_DRAW_READ_EVERY: usize = 25;
/// Ranking pages are read this big.
const RANKING_PAGE: usize = 100;

/// The draw terms of a run.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Terms {
    /// Entries are taken for this long after the opening; the draw is then.
    pub entry_window_ms: u64,
    /// The drop closes this long after the draw.
    pub closes_after_ms: u64,
    /// Share of members who withdraw their entry before the draw.
    pub withdraw_rate: f64,
    pub poll_ms: u64,
}

/// What one member saw.
#[derive(Debug, Clone, Default, Serialize)]
pub struct MemberLog {
    pub member: usize,
    /// The entry's id, as the 201 gave it.
    pub entry: Option<String>,
    /// Entering again answered 200 with the same id (`None`: not tried).
    pub reentered_same: Option<bool>,
    pub withdrawn: bool,
    /// `won` (with the hold), `lost`, or the last status seen when it stopped looking.
    pub status: Option<String>,
    pub hold: Option<String>,
}

/// `GET .../draw` read before the draw: the commitment, and whether a seed showed.
#[derive(Debug, Clone, Serialize)]
pub struct Probe {
    pub commitment: Option<String>,
    pub seed_shown: bool,
}

/// One member's whole part: enter, maybe withdraw, look after the draw, act on a win.
#[allow(
    clippy::too_many_lines,
    reason = "one member's path through the draw, in the order it happens"
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
    let draw_at = fixture.draw_at_ms.unwrap_or(fixture.opens_at_ms);
    let window = (draw_at - ENTRY_MARGIN_MS - fixture.opens_at_ms).max(1);
    sleep_until_ms(
        fixture.opens_at_ms + i64::try_from(jitter(window.unsigned_abs()).as_millis()).unwrap_or(0),
    )
    .await;
    let path = format!("{API}/drops/{}/entries", fixture.drop_id);
    let enter = Call::post(
        "/drops/{id}/entries",
        path.clone(),
        json!({ "quantity": 1 }),
    )
    .auth(&me.token)
    .on(me.home);
    let reply = launch.send(user, &enter, |r| r.status == 201).await;
    let Some(id) = reply
        .str_field("id")
        .filter(|_| reply.status == 201)
        .map(str::to_owned)
    else {
        launch.unexpected("enter", &reply);
        return log;
    };
    log.entry = Some(id.clone());
    if index % REENTER_EVERY == 0 {
        let again = launch
            .send(user, &enter.clone().on(me.home + 1), |r| r.status == 200)
            .await;
        log.reentered_same = Some(again.status == 200 && again.str_field("id") == Some(&id));
    }
    if index % EARLY_DRAW_READ_EVERY == 0 {
        let call = Call::get(
            "/drops/{id}/draw",
            format!("{API}/drops/{}/draw", fixture.drop_id),
        )
        .on(me.home);
        let reply = launch.send(user, &call, |r| r.status == 200).await;
        lock(&launch.draw_probes).push(Probe {
            commitment: reply.str_field("commitment").map(str::to_owned),
            seed_shown: !reply.body.get("seed").is_none_or(Value::is_null),
        });
    }
    let mine = Call::get("/drops/{id}/entries/me", format!("{path}/me"))
        .auth(&me.token)
        .on(me.home);
    if weyl(index as u64 + 7_919) < terms.withdraw_rate {
        let call = Call::delete("/drops/{id}/entries/me", format!("{path}/me"))
            .auth(&me.token)
            .on(me.home);
        let reply = launch.send(user, &call, |r| r.status == 204).await;
        if reply.status == 204 {
            log.withdrawn = true;
            let gone = launch
                .send(user, &mine, |r| {
                    r.status == 404 && r.error_code() == Some("not_entered")
                })
                .await;
            if gone.status != 404 {
                launch.unexpected("entry after withdrawing", &gone);
            }
        } else {
            launch.unexpected("withdraw", &reply);
        }
        return log;
    }
    sleep_until_ms(draw_at).await;
    let deadline = draw_at + LOOK_DEADLINE_MS;
    loop {
        let reply = launch.send(user, &mine, |r| r.status == 200).await;
        let status = reply.str_field("status").map(str::to_owned);
        match status.as_deref() {
            Some("won") => {
                log.status = status;
                log.hold = reply.str_field("reservation_id").map(str::to_owned);
                break;
            }
            Some("lost") => {
                log.status = status;
                return log;
            }
            Some(_) => log.status = status,
            None => launch.unexpected("look at the entry", &reply),
        }
        if now_ms() > deadline {
            return log;
        }
        tokio::time::sleep(
            std::time::Duration::from_millis(terms.poll_ms) + jitter(terms.poll_ms / 4),
        )
        .await;
    }
    if let Some(hold) = log.hold.clone() {
        let role = role_of(
            launch
                .given
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            &launch.args,
        );
        launch.settle(user, index, hold, role).await;
    }
    log
}

/// The draw as `GET .../draw` and `.../draw/ranking` published it after the run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Published {
    pub commitment: Option<String>,
    pub seed: Option<String>,
    pub entries: Option<i64>,
    pub entries_digest: Option<String>,
    /// (rank, entry id), every page.
    pub ranking: Vec<(i64, String)>,
}

/// Reads the published draw and its whole ranking.
pub async fn read_published(launch: &Launch, drop: &str) -> anyhow::Result<Published> {
    let mut user = launch
        .reader()
        .ok_or_else(|| anyhow::anyhow!("no reader: setup never finished"))?;
    let call = Call::get("/drops/{id}/draw", format!("{API}/drops/{drop}/draw"));
    let reply = launch.send(&mut user, &call, |r| r.status == 200).await;
    anyhow::ensure!(reply.status == 200, "reading the draw: {}", reply.label());
    let mut published = Published {
        commitment: reply.str_field("commitment").map(str::to_owned),
        seed: reply.str_field("seed").map(str::to_owned),
        entries: reply.body.get("entries").and_then(Value::as_i64),
        entries_digest: reply.str_field("entries_digest").map(str::to_owned),
        ranking: Vec::new(),
    };
    let mut cursor: Option<String> = None;
    loop {
        let mut path = format!("{API}/drops/{drop}/draw/ranking?limit={RANKING_PAGE}");
        if let Some(cursor) = &cursor {
            path.push_str(&format!("&cursor={cursor}"));
        }
        let reply = launch
            .send(
                &mut user,
                &Call::get("/drops/{id}/draw/ranking", path),
                |r| r.status == 200,
            )
            .await;
        anyhow::ensure!(
            reply.status == 200,
            "reading the ranking: {}",
            reply.label()
        );
        for item in reply
            .body
            .get("items")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let (Some(rank), Some(id)) = (
                item.get("rank").and_then(Value::as_i64),
                item.get("entry_id").and_then(Value::as_str),
            ) else {
                anyhow::bail!("a ranking item without rank or entry_id: {item}");
            };
            published.ranking.push((rank, id.to_owned()));
        }
        cursor = reply.str_field("next_cursor").map(str::to_owned);
        if cursor.is_none() {
            return Ok(published);
        }
    }
}

/// What Postgres holds of the draw: every entry (id, member, status, rank, reservation) and the notices.
#[derive(Debug, Clone, Default, Serialize)]
pub struct DrawFacts {
    pub entries: Vec<EntryRow>,
    /// (member, kind) -> notices of the drop.
    pub notices: HashMap<String, (i64, i64)>,
}

#[derive(Debug, Clone, Serialize)]
pub struct EntryRow {
    pub id: String,
    pub member: String,
    pub status: String,
    pub rank: Option<i64>,
    pub reservation: Option<String>,
}

pub async fn draw_facts(client: &tokio_postgres::Client, drop: &str) -> anyhow::Result<DrawFacts> {
    let drop: uuid::Uuid = drop.parse()?;
    let entries = client
        .query(
            "SELECT id::text, member_id::text, status, rank::bigint, reservation_id::text \
             FROM drop_entries WHERE drop_id = $1",
            &[&drop],
        )
        .await?
        .iter()
        .map(|r| EntryRow {
            id: r.get(0),
            member: r.get(1),
            status: r.get(2),
            rank: r.get(3),
            reservation: r.get(4),
        })
        .collect();
    let notices = client
        .query(
            "SELECT member_id::text, count(*) FILTER (WHERE kind = 'draw_won'), \
                    count(*) FILTER (WHERE kind = 'draw_lost') \
             FROM notifications WHERE drop_id = $1 GROUP BY member_id",
            &[&drop],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2))))
        .collect();
    Ok(DrawFacts { entries, notices })
}

/// The ranking anyone can recompute: entry ids sorted by HMAC-SHA256(key = seed bytes, message = id), as bytes.
pub fn recompute_ranking(seed: &[u8], ids: &[String]) -> Vec<String> {
    let mut keyed: Vec<(Vec<u8>, &String)> = ids
        .iter()
        .filter_map(|id| {
            // HMAC takes a key of any length: this never skips.
            let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(seed).ok()?;
            mac.update(id.as_bytes());
            Some((mac.finalize().into_bytes().to_vec(), id))
        })
        .collect();
    keyed.sort();
    keyed.into_iter().map(|(_, id)| id.clone()).collect()
}

/// Hex SHA-256 of the ids sorted ascending and joined with `\n`.
pub fn entries_digest(ids: &[String]) -> String {
    let mut sorted: Vec<&str> = ids.iter().map(String::as_str).collect();
    sorted.sort_unstable();
    hex::encode(Sha256::digest(sorted.join("\n").as_bytes()))
}

/// Every check of a draw run that is particular to the draw (the stock checks come from `stock_checks`).
#[allow(
    clippy::too_many_lines,
    reason = "every check of the draw in report order, each beside the numbers it compares"
)]
pub fn verify(
    logs: &[MemberLog],
    probes: &[Probe],
    published: &Published,
    facts: &DrawFacts,
    reservations: &[(String, String, i64)],
) -> Vec<Check> {
    let mut checks = Vec::new();
    let seed = published.seed.as_deref().and_then(|s| hex::decode(s).ok());
    let commitment_ok = match (&seed, &published.commitment) {
        (Some(seed), Some(commitment)) => hex::encode(Sha256::digest(seed)) == *commitment,
        _ => false,
    };
    let early_seed = probes.iter().filter(|p| p.seed_shown).count();
    let early_other = probes
        .iter()
        .filter(|p| p.commitment != published.commitment)
        .count();
    checks.push(check(
        "the seed matches the commitment published before the draw",
        commitment_ok && !probes.is_empty() && early_seed == 0 && early_other == 0,
        format!(
            "sha256(seed) {} the commitment; {} reads before the draw: {early_seed} showed a seed, {early_other} \
             another commitment",
            if commitment_ok { "equals" } else { "does NOT equal" },
            probes.len()
        ),
    ));
    let ours: Vec<String> = logs
        .iter()
        .filter(|l| !l.withdrawn)
        .filter_map(|l| l.entry.clone())
        .collect();
    let stored: Vec<String> = facts.entries.iter().map(|e| e.id.clone()).collect();
    let digest = entries_digest(&ours);
    let same_set = {
        let a: HashSet<&String> = ours.iter().collect();
        let b: HashSet<&String> = stored.iter().collect();
        a == b
    };
    checks.push(check(
        "the published entries are the entries",
        published.entries == i64::try_from(ours.len()).ok()
            && published.entries_digest.as_deref() == Some(digest.as_str())
            && same_set,
        format!(
            "published {} entries, digest {}; the members hold {} entries (withdrawn left out), Postgres {}; \
             the recomputed digest {}",
            published.entries.map_or_else(|| "no".to_owned(), |n| n.to_string()),
            published.entries_digest.as_deref().unwrap_or("-"),
            ours.len(),
            stored.len(),
            if published.entries_digest.as_deref() == Some(digest.as_str()) { "matches" } else { "differs" }
        ),
    ));
    let recomputed = seed
        .as_deref()
        .map(|seed| recompute_ranking(seed, &ours))
        .unwrap_or_default();
    let served: Vec<String> = published.ranking.iter().map(|(_, id)| id.clone()).collect();
    let ranks_in_order = published
        .ranking
        .iter()
        .enumerate()
        .all(|(i, (rank, _))| usize::try_from(*rank).ok() == Some(i + 1));
    let first_difference = recomputed.iter().zip(&served).position(|(a, b)| a != b);
    checks.push(check(
        "the ranking recomputed from the seed",
        !recomputed.is_empty() && recomputed == served && ranks_in_order,
        format!(
            "{} entries ranked by HMAC-SHA256(seed, id); the published ranking has {}{}",
            recomputed.len(),
            served.len(),
            first_difference
                .map(|i| format!(", first difference at rank {}", i + 1))
                .unwrap_or_default()
        ),
    ));
    // Winners are a prefix of the ranking; everyone else lost; a winner's hold is its entry's reservation.
    let rank_of: HashMap<&str, i64> = published
        .ranking
        .iter()
        .map(|(r, id)| (id.as_str(), *r))
        .collect();
    let mut won_ranks: Vec<i64> = facts
        .entries
        .iter()
        .filter(|e| e.status == "won")
        .filter_map(|e| e.rank)
        .collect();
    won_ranks.sort_unstable();
    let prefix = won_ranks
        .iter()
        .enumerate()
        .all(|(i, r)| usize::try_from(*r).ok() == Some(i + 1));
    let unsettled = facts
        .entries
        .iter()
        .filter(|e| e.status != "won" && e.status != "lost")
        .count();
    let stored_by_id: HashMap<&str, &EntryRow> =
        facts.entries.iter().map(|e| (e.id.as_str(), e)).collect();
    let told_wrong = logs
        .iter()
        .filter(|l| !l.withdrawn)
        .filter(|l| {
            let Some(row) = l.entry.as_deref().and_then(|id| stored_by_id.get(id)) else {
                return true;
            };
            l.status.as_deref() != Some(row.status.as_str())
                || (row.status == "won" && l.hold != row.reservation)
        })
        .count();
    let winners_holds: HashSet<&str> = facts
        .entries
        .iter()
        .filter_map(|e| e.reservation.as_deref())
        .collect();
    let stray_holds = reservations
        .iter()
        .filter(|(id, _, _)| !winners_holds.contains(id.as_str()))
        .count();
    let ranks_agree = facts
        .entries
        .iter()
        .all(|e| e.rank == rank_of.get(e.id.as_str()).copied());
    checks.push(check(
        "winners follow the ranking",
        prefix && unsettled == 0 && told_wrong == 0 && stray_holds == 0 && ranks_agree,
        format!(
            "{} won (ranks 1..{} {}), {} lost, {unsettled} neither; {told_wrong} member(s) told otherwise than \
             Postgres says; {stray_holds} of {} holds of the drop are not a winner's; ranks in Postgres {} the \
             published ones",
            won_ranks.len(),
            won_ranks.len(),
            if prefix { "exactly" } else { "NOT a prefix" },
            facts.entries.iter().filter(|e| e.status == "lost").count(),
            reservations.len(),
            if ranks_agree { "equal" } else { "differ from" }
        ),
    ));
    let reentries: Vec<bool> = logs.iter().filter_map(|l| l.reentered_same).collect();
    let mut per_member: HashMap<&str, usize> = HashMap::new();
    for e in &facts.entries {
        *per_member.entry(e.member.as_str()).or_default() += 1;
    }
    let doubled = per_member.values().filter(|n| **n > 1).count();
    let withdrawn_stored = logs
        .iter()
        .filter(|l| l.withdrawn)
        .filter(|l| {
            l.entry
                .as_deref()
                .is_some_and(|id| stored_by_id.contains_key(id))
        })
        .count();
    checks.push(check(
        "one entry per member",
        reentries.iter().all(|s| *s) && doubled == 0 && withdrawn_stored == 0,
        format!(
            "{} entered again: {} got the same entry; {doubled} member(s) with two rows; {} withdrew, {withdrawn_stored} \
             of those still stored",
            reentries.len(),
            reentries.iter().filter(|s| **s).count(),
            logs.iter().filter(|l| l.withdrawn).count()
        ),
    ));
    let wrong_notices = facts
        .entries
        .iter()
        .filter(|e| {
            let (won, lost) = facts
                .notices
                .get(e.member.as_str())
                .copied()
                .unwrap_or_default();
            match e.status.as_str() {
                "won" => (won, lost) != (1, 0),
                "lost" => (won, lost) != (0, 1),
                _ => true,
            }
        })
        .count();
    checks.push(check(
        "winners told draw_won once, losers draw_lost once",
        wrong_notices == 0,
        format!(
            "{wrong_notices} of {} entrants with other notices",
            facts.entries.len()
        ),
    ));
    checks
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_digest_and_ranking_follow_the_published_definitions() {
        // SHA-256 of "a\nb" (sorted), and of nothing.
        assert_eq!(
            entries_digest(&["b".to_owned(), "a".to_owned()]),
            hex::encode(Sha256::digest(b"a\nb"))
        );
        // RFC 4231 test case 2: HMAC-SHA256("Jefe", "what do ya want for nothing?").
        let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(b"Jefe").unwrap();
        mac.update(b"what do ya want for nothing?");
        assert_eq!(
            hex::encode(mac.finalize().into_bytes()),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        let ids: Vec<String> = (0..50).map(|i| format!("id-{i}")).collect();
        let ranked = recompute_ranking(&[7; 32], &ids);
        assert_eq!(ranked.len(), 50);
        assert_ne!(ranked, ids, "a keyed ranking is not the input order");
        assert_eq!(
            recompute_ranking(&[7; 32], &ranked),
            ranked,
            "the ranking depends on the ids, not their order"
        );
        assert_ne!(
            recompute_ranking(&[8; 32], &ids),
            ranked,
            "another seed, another ranking"
        );
    }

    fn published(seed: &[u8], ids: &[String]) -> Published {
        Published {
            commitment: Some(hex::encode(Sha256::digest(seed))),
            seed: Some(hex::encode(seed)),
            entries: Some(ids.len() as i64),
            entries_digest: Some(entries_digest(ids)),
            ranking: recompute_ranking(seed, ids)
                .into_iter()
                .enumerate()
                .map(|(i, id)| (i as i64 + 1, id))
                .collect(),
        }
    }

    #[test]
    #[allow(
        clippy::too_many_lines,
        reason = "one fair draw built by hand, then each fault beside the check it must fail"
    )]
    fn a_fair_draw_passes_and_a_winner_off_the_ranking_fails() {
        let seed = [3u8; 32];
        let ids: Vec<String> = (0..6).map(|i| format!("e{i}")).collect();
        let p = published(&seed, &ids);
        let rank_of: HashMap<String, i64> =
            p.ranking.iter().map(|(r, id)| (id.clone(), *r)).collect();
        let entries: Vec<EntryRow> = ids
            .iter()
            .enumerate()
            .map(|(i, id)| {
                let rank = rank_of[id];
                EntryRow {
                    id: id.clone(),
                    member: format!("m{i}"),
                    status: if rank <= 2 { "won" } else { "lost" }.to_owned(),
                    rank: Some(rank),
                    reservation: (rank <= 2).then(|| format!("h{i}")),
                }
            })
            .collect();
        let logs: Vec<MemberLog> = entries
            .iter()
            .enumerate()
            .map(|(i, e)| MemberLog {
                member: i,
                entry: Some(e.id.clone()),
                status: Some(e.status.clone()),
                hold: e.reservation.clone(),
                ..MemberLog::default()
            })
            .collect();
        let notices = entries
            .iter()
            .map(|e| {
                (
                    e.member.clone(),
                    if e.status == "won" { (1, 0) } else { (0, 1) },
                )
            })
            .collect();
        let facts = DrawFacts { entries, notices };
        let holds: Vec<(String, String, i64)> = facts
            .entries
            .iter()
            .filter_map(|e| Some((e.reservation.clone()?, e.member.clone(), 0)))
            .collect();
        let probes = [Probe {
            commitment: p.commitment.clone(),
            seed_shown: false,
        }];
        let failed = |checks: Vec<Check>| -> Vec<&'static str> {
            checks
                .into_iter()
                .filter(|c| c.verdict == crate::verify::Verdict::Fail)
                .map(|c| c.name)
                .collect()
        };
        assert!(failed(verify(&logs, &probes, &p, &facts, &holds)).is_empty());
        // The third-ranked entry marked a winner instead of the second: not a prefix.
        let mut skipped = facts.clone();
        for e in &mut skipped.entries {
            match e.rank {
                Some(2) => e.status = "lost".to_owned(),
                Some(3) => e.status = "won".to_owned(),
                _ => {}
            }
        }
        assert!(failed(verify(&logs, &probes, &p, &skipped, &holds))
            .contains(&"winners follow the ranking"));
        // A published ranking that is not the seed's.
        let mut swapped = p.clone();
        swapped.ranking.swap(0, 1);
        assert!(failed(verify(&logs, &probes, &swapped, &facts, &holds))
            .contains(&"the ranking recomputed from the seed"));
        // A seed that was visible before the draw.
        let early = [Probe {
            commitment: p.commitment.clone(),
            seed_shown: true,
        }];
        assert!(failed(verify(&logs, &early, &p, &facts, &holds))
            .contains(&"the seed matches the commitment published before the draw"));
        // A hold of the drop that is no winner's.
        let mut stray = holds.clone();
        stray.push(("h-stray".to_owned(), "m5".to_owned(), 0));
        assert!(failed(verify(&logs, &probes, &p, &facts, &stray))
            .contains(&"winners follow the ranking"));
    }
}
