//! Draw drops (API.md, "Launch modes", Draw), in process over a real Postgres with a manual clock: the
//! commitment published before any entry and the seed revealed by the draw, the ranking recomputed here from the
//! seed and the ids, one entry per member, the draw happening once whoever runs it, the waitlist selling every
//! unit when winners let their holds expire (on the embedded gate and on three instances over Redis, where Redis's
//! clock decides expiry), and what a draw drop refuses.
#![allow(
    clippy::too_many_lines,
    reason = "each test is one scenario read top to bottom: its setup, the draw, and every check"
)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use chrono::{DateTime, Utc};
use common::{pay, reserve, TestApp, TestMember};
use engine::clock::{Clock, ManualClock};
use futures_util::StreamExt;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use shell_api::auth::Role;
use shell_api::config::EngineArgs;
use shell_api::drops::draw;
use uuid::Uuid;

/// HMAC-SHA256 written here from RFC 2104, apart from the server's, so the ranking is checked independently.
fn hmac(key: &[u8], message: &[u8]) -> Vec<u8> {
    assert!(key.len() <= 64, "a draw's key is its 32-byte seed");
    let mut k = key.to_vec();
    k.resize(64, 0);
    let ipad: Vec<u8> = k.iter().map(|b| b ^ 0x36).collect();
    let opad: Vec<u8> = k.iter().map(|b| b ^ 0x5c).collect();
    let mut inner = Sha256::new();
    inner.update(&ipad);
    inner.update(message);
    let mut outer = Sha256::new();
    outer.update(&opad);
    outer.update(inner.finalize());
    outer.finalize().to_vec()
}

fn recompute_ranking(seed_hex: &str, ids: &[String]) -> Vec<String> {
    let seed = hex::decode(seed_hex).unwrap();
    let mut ids = ids.to_vec();
    ids.sort_by_key(|id| hmac(&seed, id.as_bytes()));
    ids
}

struct DrawSetup {
    app: TestApp,
    clock: Arc<ManualClock>,
    drop: Value,
    draw_at: DateTime<Utc>,
}

/// A draw drop open for entries now, drawn `draw_in_s` seconds later.
async fn draw_drop(stock: u32, draw_in_s: i64, extra: Value) -> DrawSetup {
    // Whole milliseconds, as the manual clock counts, so `set_ms(draw_at)` is exactly `draw_at`.
    let now = engine::clock::to_datetime(Utc::now().timestamp_millis());
    let clock = Arc::new(ManualClock::new(now.timestamp_millis()));
    let app = TestApp::with_clock(EngineArgs::default(), clock.clone()).await;
    let seller = app.member(Role::Seller).await;
    let product = app.product(&seller, 1_000).await;
    let draw_at = now + chrono::Duration::seconds(draw_in_s);
    let mut body = json!({
        "product_id": product, "stock": stock, "mode": "draw",
        "opens_at": (now - chrono::Duration::seconds(1)).to_rfc3339(),
        "draw_at": draw_at.to_rfc3339(),
    });
    for (key, value) in extra.as_object().unwrap() {
        body[key] = value.clone();
    }
    let drop = app.drop(&seller, body).await;
    DrawSetup {
        app,
        clock,
        drop,
        draw_at,
    }
}

fn path(drop: &Value, rest: &str) -> String {
    format!("/api/v1/drops/{}{rest}", drop["id"].as_str().unwrap())
}

async fn enter(
    app: &TestApp,
    member: &TestMember,
    drop: &Value,
    quantity: u32,
) -> common::TestResponse {
    app.call(
        "POST",
        &path(drop, "/entries"),
        Some(&member.token),
        Some(json!({ "quantity": quantity })),
    )
    .await
}

/// Every page of the ranking, following cursors.
async fn full_ranking(app: &TestApp, drop: &Value, limit: u32) -> Vec<(u64, String)> {
    let mut out = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut url = format!("{}?limit={limit}", path(drop, "/draw/ranking"));
        if let Some(c) = &cursor {
            url.push_str(&format!("&cursor={c}"));
        }
        let page = app.call("GET", &url, None, None).await;
        assert_eq!(page.status, StatusCode::OK, "{:?}", page.body);
        for item in page.body["items"].as_array().unwrap() {
            out.push((
                item["rank"].as_u64().unwrap(),
                item["entry_id"].as_str().unwrap().to_owned(),
            ));
        }
        match page.body["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => return out,
        }
    }
}

/// An entry as stored: id, member, status, rank, reservation.
type EntryRow = (Uuid, Uuid, String, Option<i32>, Option<Uuid>);

async fn entry_rows(app: &TestApp, drop: &Value) -> Vec<EntryRow> {
    let id: Uuid = drop["id"].as_str().unwrap().parse().unwrap();
    app.db
        .client()
        .await
        .query(
            "SELECT id, member_id, status, rank, reservation_id FROM drop_entries WHERE drop_id = $1
             ORDER BY rank NULLS LAST",
            &[&id],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4)))
        .collect()
}

#[tokio::test]
async fn the_commitment_comes_first_and_the_seed_it_reveals_ranks_the_entries() {
    let DrawSetup {
        app,
        clock,
        drop,
        draw_at,
    } = draw_drop(3, 60, json!({ "per_member_limit": 2, "hold_seconds": 120 })).await;
    assert_eq!(drop["mode"], "draw");
    assert_eq!(
        drop["draw_at"]
            .as_str()
            .unwrap()
            .parse::<DateTime<Utc>>()
            .unwrap()
            .timestamp_micros(),
        draw_at.timestamp_micros()
    );

    // Before any entry: the commitment, nothing else.
    let before = app.call("GET", &path(&drop, "/draw"), None, None).await;
    assert_eq!(before.status, StatusCode::OK, "{:?}", before.body);
    let commitment = before.body["commitment"].as_str().unwrap().to_owned();
    assert_eq!(commitment.len(), 64);
    assert!(commitment
        .chars()
        .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
    for field in ["seed", "entries", "entries_digest", "drawn_at"] {
        assert!(
            before.body[field].is_null(),
            "{field} before the draw: {:?}",
            before.body
        );
    }
    let not_drawn = app
        .call("GET", &path(&drop, "/draw/ranking"), None, None)
        .await;
    assert_eq!(
        (not_drawn.status, not_drawn.code()),
        (StatusCode::CONFLICT, "not_drawn")
    );

    let mut members = Vec::new();
    for _ in 0..10 {
        let member = app.member(Role::Customer).await;
        let entered = enter(&app, &member, &drop, 1).await;
        assert_eq!(entered.status, StatusCode::CREATED, "{:?}", entered.body);
        assert_eq!(entered.body["status"], "entered");
        assert!(entered.body["rank"].is_null() && entered.body["reservation_id"].is_null());
        let again = enter(&app, &member, &drop, 1).await;
        assert_eq!(again.status, StatusCode::OK);
        assert_eq!(
            again.body["id"], entered.body["id"],
            "entering again answers the same entry"
        );
        members.push(member);
    }
    let too_many = enter(&app, &members[0], &drop, 3).await;
    assert_eq!(too_many.status, StatusCode::UNPROCESSABLE_ENTITY);
    // A plain reservation on a draw drop is refused: its holds come from the draw.
    let plain = reserve(&app, &members[0], &drop, 1).await;
    assert_eq!(
        (plain.status, plain.code()),
        (StatusCode::FORBIDDEN, "not_admitted")
    );
    // One member withdraws before the draw.
    let gone = app
        .call(
            "DELETE",
            &path(&drop, "/entries/me"),
            Some(&members[9].token),
            None,
        )
        .await;
    assert_eq!(gone.status, StatusCode::NO_CONTENT);
    let mine = app
        .call(
            "GET",
            &path(&drop, "/entries/me"),
            Some(&members[9].token),
            None,
        )
        .await;
    assert_eq!(
        (mine.status, mine.code()),
        (StatusCode::NOT_FOUND, "not_entered")
    );
    let withdrawn = members.pop().unwrap();

    // From draw_at on, entries and withdrawals are closed (before the draw task has run, too).
    clock.set_ms(draw_at.timestamp_millis());
    let late = enter(&app, &withdrawn, &drop, 1).await;
    assert_eq!((late.status, late.code()), (StatusCode::CONFLICT, "closed"));
    let leave = app
        .call(
            "DELETE",
            &path(&drop, "/entries/me"),
            Some(&members[0].token),
            None,
        )
        .await;
    assert_eq!(
        (leave.status, leave.code()),
        (StatusCode::CONFLICT, "closed")
    );

    draw::tick(&app.state).await.unwrap();
    let after = app.call("GET", &path(&drop, "/draw"), None, None).await;
    assert_eq!(
        after.body["commitment"],
        commitment.as_str(),
        "the commitment never changes"
    );
    let seed = after.body["seed"].as_str().unwrap();
    assert_eq!(
        hex::encode(Sha256::digest(hex::decode(seed).unwrap())),
        commitment
    );
    assert_eq!(after.body["entries"], 9);
    assert!(after.body["drawn_at"].is_string());

    let rows = entry_rows(&app, &drop).await;
    let mut ids: Vec<String> = rows.iter().map(|row| row.0.to_string()).collect();
    ids.sort();
    let digest = hex::encode(Sha256::digest(ids.join("\n").as_bytes()));
    assert_eq!(after.body["entries_digest"], digest.as_str());

    let expected = recompute_ranking(seed, &ids);
    let served = full_ranking(&app, &drop, 4).await;
    assert_eq!(
        served.iter().map(|(rank, _)| *rank).collect::<Vec<_>>(),
        (1..=9).collect::<Vec<_>>()
    );
    assert_eq!(
        served.iter().map(|(_, id)| id.clone()).collect::<Vec<_>>(),
        expected
    );

    // The first three in rank order hold a unit each; the rest wait.
    for (index, row) in rows.iter().enumerate() {
        assert_eq!(row.0.to_string(), expected[index]);
        let status = if index < 3 { "won" } else { "waitlisted" };
        assert_eq!(row.2, status, "rank {}", index + 1);
        assert_eq!(row.4.is_some(), index < 3);
    }
    let by_member: HashMap<Uuid, &TestMember> = members.iter().map(|m| (m.id, m)).collect();
    let (winner_id, hold) = (rows[0].1, rows[0].4.unwrap());
    let winner = by_member[&winner_id];
    let mine = app
        .call(
            "GET",
            &path(&drop, "/entries/me"),
            Some(&winner.token),
            None,
        )
        .await;
    assert_eq!(mine.body["status"], "won");
    assert_eq!(mine.body["rank"], 1);
    assert_eq!(mine.body["reservation_id"], hold.to_string().as_str());
    // A winner pays the ordinary way.
    let paid = pay(&app, winner, &hold.to_string(), "tok_ok").await;
    assert_eq!(paid.status, StatusCode::OK, "{:?}", paid.body);

    // At closes_at... this drop has none; a loser asks and is still waitlisted while units are held.
    let loser = by_member[&rows[8].1];
    let waiting = app
        .call("GET", &path(&drop, "/entries/me"), Some(&loser.token), None)
        .await;
    assert_eq!(waiting.body["status"], "waitlisted");
    assert_eq!(waiting.body["rank"], 9);
}

#[tokio::test]
async fn concurrent_duplicate_entries_of_one_member_make_one_entry() {
    let DrawSetup { app, drop, .. } = draw_drop(5, 60, json!({})).await;
    let member = app.member(Role::Customer).await;
    let app = Arc::new(app);
    let member = Arc::new(member);
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let (app, member, drop) = (Arc::clone(&app), Arc::clone(&member), drop.clone());
        tasks.push(tokio::spawn(
            async move { enter(&app, &member, &drop, 1).await },
        ));
    }
    let mut created = 0;
    let mut ids = Vec::new();
    for task in tasks {
        let answer = task.await.unwrap();
        match answer.status {
            StatusCode::CREATED => created += 1,
            StatusCode::OK => {}
            other => panic!("entering: {other} {:?}", answer.body),
        }
        ids.push(answer.body["id"].as_str().unwrap().to_owned());
    }
    assert_eq!(created, 1, "one 201, nineteen 200");
    ids.dedup();
    assert_eq!(ids.len(), 1, "every answer is the same entry");
    assert_eq!(entry_rows(&app, &drop).await.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_draw_happens_once_whichever_instances_run_it() {
    let DrawSetup {
        app,
        clock,
        drop,
        draw_at,
    } = draw_drop(5, 30, json!({})).await;
    let other = app.sharing_db_with_clock(clock.clone()).await;
    for _ in 0..30 {
        let member = app.member(Role::Customer).await;
        assert_eq!(
            enter(&app, &member, &drop, 1).await.status,
            StatusCode::CREATED
        );
    }
    clock.set_ms(draw_at.timestamp_millis() + 1);
    let now = clock.now_ms();
    let states = [app.state.clone(), other.state.clone()];
    let drop_id: Uuid = drop["id"].as_str().unwrap().parse().unwrap();
    let mut tasks = Vec::new();
    for index in 0..8 {
        let state = states[index % 2].clone();
        tasks.push(tokio::spawn(async move {
            // Half the passes look for due draws; half go straight to the claim, as a pass that found the drop
            // due just before another drew it would.
            if index < 4 {
                draw::draw_due(&state, engine::clock::to_datetime(now))
                    .await
                    .unwrap()
            } else {
                let mut client = state.db.get().await.unwrap();
                usize::from(
                    draw::draw_one(&mut client, drop_id, engine::clock::to_datetime(now))
                        .await
                        .unwrap(),
                )
            }
        }));
    }
    let mut drawn = 0;
    for task in tasks {
        drawn += task.await.unwrap();
    }
    assert_eq!(drawn, 1, "eight passes on two instances drew the drop once");
    // Later passes, and a late claim, find nothing to draw.
    clock.advance_ms(10_000);
    assert_eq!(
        draw::draw_due(&other.state, other.state.engine.now())
            .await
            .unwrap(),
        0
    );
    let mut client = other.state.db.get().await.unwrap();
    assert!(
        !draw::draw_one(&mut client, drop_id, other.state.engine.now())
            .await
            .unwrap()
    );
    let body = app
        .call("GET", &path(&drop, "/draw"), None, None)
        .await
        .body;
    assert_eq!(
        body["drawn_at"]
            .as_str()
            .unwrap()
            .parse::<DateTime<Utc>>()
            .unwrap(),
        engine::clock::to_datetime(now)
    );
    let mut ranks: Vec<i32> = entry_rows(&app, &drop)
        .await
        .iter()
        .map(|row| row.3.unwrap())
        .collect();
    ranks.sort_unstable();
    assert_eq!(ranks, (1..=30).collect::<Vec<_>>());
}

/// Entries and units of the waitlist test (API.md's example: 5,000 entries for 100 units), and the winners who
/// let their holds expire (a third).
const WAITLIST_ENTRIES: usize = 5_000;
const WAITLIST_UNITS: usize = 100;
const WAITLIST_EXPIRED: usize = 33;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_waitlist_sells_every_unit_when_a_third_of_the_winners_let_their_holds_expire() {
    let DrawSetup {
        app,
        clock,
        drop,
        draw_at,
    } = draw_drop(WAITLIST_UNITS as u32, 60, json!({ "hold_seconds": 60 })).await;
    // 5,000 members enter, sixteen at a time.
    let entered: Vec<TestMember> = futures_util::stream::iter(0..WAITLIST_ENTRIES)
        .map(|_| async {
            let member = app.member(Role::Customer).await;
            assert_eq!(
                enter(&app, &member, &drop, 1).await.status,
                StatusCode::CREATED
            );
            member
        })
        .buffer_unordered(16)
        .collect()
        .await;
    let members: HashMap<Uuid, TestMember> = entered.into_iter().map(|m| (m.id, m)).collect();
    assert_eq!(members.len(), WAITLIST_ENTRIES);
    clock.set_ms(draw_at.timestamp_millis());
    draw::tick(&app.state).await.unwrap();
    let seed = app
        .call("GET", &path(&drop, "/draw"), None, None)
        .await
        .body["seed"]
        .as_str()
        .unwrap()
        .to_owned();
    let rows = entry_rows(&app, &drop).await;
    let ids: Vec<String> = rows.iter().map(|row| row.0.to_string()).collect();
    let mut sorted = ids.clone();
    sorted.sort();
    assert_eq!(
        recompute_ranking(&seed, &sorted),
        ids,
        "entries ranked as anyone recomputes"
    );
    let winners: Vec<_> = rows.iter().filter(|row| row.2 == "won").collect();
    assert_eq!(winners.len(), WAITLIST_UNITS);
    assert!(
        winners
            .iter()
            .all(|row| row.3.unwrap() as usize <= WAITLIST_UNITS),
        "the first 100 ranks win"
    );

    // Two thirds pay; a third (33) let their holds expire.
    for row in winners.iter().skip(WAITLIST_EXPIRED) {
        let paid = pay(
            &app,
            &members[&row.1],
            &row.4.unwrap().to_string(),
            "tok_ok",
        )
        .await;
        assert_eq!(paid.status, StatusCode::OK, "{:?}", paid.body);
    }
    clock.advance_ms(60_000);
    app.state.engine.reap().await.unwrap();
    draw::tick(&app.state).await.unwrap();
    let rows = entry_rows(&app, &drop).await;
    let next_ranks = WAITLIST_UNITS + 1..=WAITLIST_UNITS + WAITLIST_EXPIRED;
    let second: Vec<_> = rows
        .iter()
        .filter(|row| row.2 == "won" && next_ranks.contains(&(row.3.unwrap() as usize)))
        .collect();
    assert_eq!(
        second.len(),
        WAITLIST_EXPIRED,
        "the next 33 ranks get the released units"
    );
    for row in &second {
        let paid = pay(
            &app,
            &members[&row.1],
            &row.4.unwrap().to_string(),
            "tok_ok",
        )
        .await;
        assert_eq!(paid.status, StatusCode::OK, "{:?}", paid.body);
    }
    // Sold out with nothing held: the rest lose.
    draw::tick(&app.state).await.unwrap();
    let rows = entry_rows(&app, &drop).await;
    let count = |status: &str| rows.iter().filter(|row| row.2 == status).count();
    let won = WAITLIST_UNITS + WAITLIST_EXPIRED;
    assert_eq!(
        (count("won"), count("waitlisted"), count("lost")),
        (won, 0, WAITLIST_ENTRIES - won)
    );
    let state = app.call("GET", &path(&drop, ""), None, None).await.body;
    assert_eq!(
        (state["sold"].as_u64(), state["held"].as_u64()),
        (Some(WAITLIST_UNITS as u64), Some(0))
    );
    let drop_id: Uuid = drop["id"].as_str().unwrap().parse().unwrap();
    let (purchases, units): (i64, i64) = {
        let row = app
            .db
            .client()
            .await
            .query_one(
                "SELECT count(*), coalesce(sum(quantity), 0)::int8 FROM purchases WHERE drop_id = $1",
                &[&drop_id],
            )
            .await
            .unwrap();
        (row.get(0), row.get(1))
    };
    assert_eq!(
        (purchases, units),
        (WAITLIST_UNITS as i64, WAITLIST_UNITS as i64),
        "every unit sold once, never more than the stock"
    );
}

#[tokio::test]
async fn closes_at_makes_the_waitlist_lose() {
    let DrawSetup {
        app,
        clock,
        drop,
        draw_at,
    } = draw_drop(
        1,
        60,
        json!({ "closes_at": (Utc::now() + chrono::Duration::seconds(600)).to_rfc3339() }),
    )
    .await;
    let mut entrants = Vec::new();
    for _ in 0..3 {
        let member = app.member(Role::Customer).await;
        assert_eq!(
            enter(&app, &member, &drop, 1).await.status,
            StatusCode::CREATED
        );
        entrants.push(member);
    }
    clock.set_ms(draw_at.timestamp_millis());
    draw::tick(&app.state).await.unwrap();
    let statuses = |rows: Vec<EntryRow>| rows.into_iter().map(|row| row.2).collect::<Vec<_>>();
    assert_eq!(
        statuses(entry_rows(&app, &drop).await),
        ["won", "waitlisted", "waitlisted"]
    );
    clock.advance_ms(600_000);
    draw::tick(&app.state).await.unwrap();
    // Ticking again changes nothing and tells nobody twice.
    draw::tick(&app.state).await.unwrap();
    assert_eq!(
        statuses(entry_rows(&app, &drop).await),
        ["won", "lost", "lost"]
    );
    // Each entrant was told once, on the drop: the winner draw_won, the others draw_lost.
    let mut told = HashMap::new();
    for member in &entrants {
        let list = app
            .call(
                "GET",
                "/api/v1/members/me/notifications",
                Some(&member.token),
                None,
            )
            .await
            .body;
        let items = list["items"].as_array().unwrap();
        assert_eq!(items.len(), 1, "{list}");
        assert_eq!(items[0]["drop_id"], drop["id"]);
        *told
            .entry(items[0]["kind"].as_str().unwrap().to_owned())
            .or_insert(0) += 1;
    }
    assert_eq!(
        told,
        HashMap::from([("draw_won".to_owned(), 1), ("draw_lost".to_owned(), 2)])
    );
}

#[tokio::test]
async fn drop_modes_are_validated_and_a_first_come_drop_takes_no_entries() {
    let app = TestApp::new().await;
    let seller = app.member(Role::Seller).await;
    let product = app.product(&seller, 1_000).await;
    let opens = Utc::now() + chrono::Duration::seconds(60);
    let at = |s: i64| (opens + chrono::Duration::seconds(s)).to_rfc3339();
    let create = |body: Value| {
        let app = &app;
        let seller = &seller;
        async move {
            app.call("POST", "/api/v1/drops", Some(&seller.token), Some(body))
                .await
        }
    };
    let base = json!({ "product_id": product, "stock": 5, "opens_at": at(0) });
    let with = |extra: Value| {
        let mut body = base.clone();
        for (key, value) in extra.as_object().unwrap() {
            body[key] = value.clone();
        }
        body
    };
    for (extra, field) in [
        (json!({ "mode": "queue", "draw_at": at(10) }), "draw_at"),
        (json!({ "mode": "lottery" }), "mode"),
        (json!({ "mode": "draw" }), "draw_at"),
        (json!({ "mode": "draw", "draw_at": at(0) }), "draw_at"),
        (
            json!({ "mode": "draw", "draw_at": at(100), "closes_at": at(100) }),
            "draw_at",
        ),
        (json!({ "draw_at": at(10) }), "draw_at"),
    ] {
        let refused = create(with(extra.clone())).await;
        assert_eq!(
            refused.status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{extra}: {:?}",
            refused.body
        );
        assert!(
            refused.body["error"]["fields"][field].is_string(),
            "{extra}: {:?}",
            refused.body
        );
    }
    let drawn = create(with(
        json!({ "mode": "draw", "draw_at": at(10), "closes_at": at(100) }),
    ))
    .await;
    assert_eq!(drawn.status, StatusCode::CREATED, "{:?}", drawn.body);
    let plain = create(base.clone()).await;
    assert_eq!(plain.status, StatusCode::CREATED);
    assert_eq!(plain.body["mode"], "first_come");
    assert!(plain.body["draw_at"].is_null());
    let member = app.member(Role::Customer).await;
    let entry = enter(&app, &member, &plain.body, 1).await;
    assert_eq!(
        (entry.status, entry.code()),
        (StatusCode::CONFLICT, "not_a_draw")
    );
    let draw_of = app
        .call("GET", &path(&plain.body, "/draw"), None, None)
        .await;
    assert_eq!(
        (draw_of.status, draw_of.code()),
        (StatusCode::CONFLICT, "not_a_draw")
    );
    let early = enter(&app, &member, &drawn.body, 1).await;
    assert_eq!(
        (early.status, early.code()),
        (StatusCode::CONFLICT, "not_open")
    );
    let unknown = app
        .call(
            "POST",
            &format!("/api/v1/drops/{}/entries", Uuid::now_v7()),
            Some(&member.token),
            None,
        )
        .await;
    assert_eq!(
        (unknown.status, unknown.code()),
        (StatusCode::NOT_FOUND, "drop_not_found")
    );
}

/// The draw happens once even when the instance drawing it is SIGKILLed in the middle: instance A (the real binary,
/// with the test hook `DRAW_TEST_PAUSE_MS`) claims the draw and is killed while its transaction is open; Postgres
/// rolls the claim back, and instance B draws it, ranking every entry once. Were the claim committed apart from
/// the ranking, A's death would leave the drop "drawn" with no ranks, and this test would fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_killed_in_the_middle_of_a_draw_leaves_it_to_another_which_draws_once() {
    let db = common::TestDb::new().await;
    let seller = common::seed_member(&db, Role::Seller).await;
    let product = common::seed_product(&db, &seller, 1_000).await;
    let a = common::TestServer::start(&db.url, &[("DRAW_TEST_PAUSE_MS", "60000")]).await;
    let http = reqwest::Client::new();
    let now = Utc::now();
    let draw_at = now + chrono::Duration::milliseconds(2_500);
    let (status, drop) = common::post_json(
        &http,
        a.url("/api/v1/drops"),
        &seller,
        json!({ "product_id": product, "stock": 5, "mode": "draw",
                "opens_at": (now - chrono::Duration::seconds(1)).to_rfc3339(), "draw_at": draw_at.to_rfc3339() }),
    )
    .await
    .unwrap();
    assert_eq!(status, reqwest::StatusCode::CREATED, "{drop}");
    let drop_id: Uuid = drop["id"].as_str().unwrap().parse().unwrap();
    for _ in 0..30 {
        let member = common::seed_member(&db, Role::Customer).await;
        let entry = format!("/api/v1/drops/{drop_id}/entries");
        let (status, body) = common::post_json(&http, a.url(&entry), &member, json!({}))
            .await
            .unwrap();
        assert_eq!(status, reqwest::StatusCode::CREATED, "{body}");
    }
    // Wait for A's claim: its transaction has updated the drop row and sits open (the hook's pause).
    let client = db.client().await;
    let claimed = async {
        loop {
            let open: i64 = client
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity
                     WHERE datname = current_database() AND state = 'idle in transaction'
                       AND query LIKE 'UPDATE drops SET drawn_at%'",
                    &[],
                )
                .await
                .unwrap()
                .get(0);
            if open == 1 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(20), claimed)
        .await
        .expect("instance A never claimed the draw");
    a.kill().await;
    let b = common::TestServer::start(&db.url, &[]).await;
    // B's draw task (every 200 ms) finds the drop undrawn once A's transaction is rolled back.
    let drawn = async {
        loop {
            let row = client
                .query_one(
                    "SELECT drawn_at IS NOT NULL, draw_entries FROM drops WHERE id = $1",
                    &[&drop_id],
                )
                .await
                .unwrap();
            if row.get::<_, bool>(0) {
                return row.get::<_, Option<i32>>(1);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let entries = tokio::time::timeout(Duration::from_secs(20), drawn)
        .await
        .expect("instance B never drew");
    assert_eq!(entries, Some(30));
    let ranks: Vec<i32> = client
        .query(
            "SELECT rank FROM drop_entries WHERE drop_id = $1 AND rank IS NOT NULL ORDER BY rank",
            &[&drop_id],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(
        ranks,
        (1..=30).collect::<Vec<i32>>(),
        "every entry ranked once"
    );
    // The ranking B published is the one the seed gives.
    let draw: Value = http
        .get(b.url(&format!("/api/v1/drops/{drop_id}/draw")))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let ids: Vec<String> = client
        .query(
            "SELECT id::text FROM drop_entries WHERE drop_id = $1 ORDER BY rank",
            &[&drop_id],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(recompute_ranking(draw["seed"].as_str().unwrap(), &ids), ids);
    b.kill().await;
}

/// How the four winners who do not buy in `redis_draw_down_the_ranking` let their units go.
#[derive(Clone, Copy, PartialEq, Eq)]
enum LetGo {
    /// They cancel, each on another instance than the one that gave their hold.
    Cancel,
    /// They let their holds expire, by Redis's clock (which the test cannot set: the holds last `EXPIRING_HOLD`).
    Expire,
}

/// The draw and its allocator on three instances over one Redis (the stock authority every instance shares): all
/// three run their draw pass at once, the draw happens once and ranks as the seed says, the first `stock` ranks win;
/// winners who cancel (on another instance than the one that gave their hold) free units that go to the next ranks,
/// exactly those, and no more units are sold than the stock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_three_redis_instances_the_draw_happens_once_and_released_units_go_down_the_ranking() {
    redis_draw_down_the_ranking(LetGo::Cancel).await;
}

/// The same with winners who let their holds expire: Redis's reapers release them, and their units go to the next
/// ranks, exactly those.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_three_redis_instances_units_of_expired_winning_holds_go_down_the_ranking() {
    redis_draw_down_the_ranking(LetGo::Expire).await;
}

/// How long the holds of `LetGo::Expire` last, by Redis's real clock: the winners who pay must pay within it, and the
/// test waits it out for the others. With 5 s, and the payments made one after the other after two reads, a payment
/// answered `hold_expired` once in CI: nothing but Redis's clock expires these holds, so the loaded suite took that
/// long (here it takes about 0.1 s). 10 s, with the payments made at once and first, leaves a wide margin and costs
/// the test 5 s more.
const EXPIRING_HOLD: Duration = Duration::from_secs(10);

async fn redis_draw_down_the_ranking(let_go: LetGo) {
    const STOCK: usize = 10;
    let hold_seconds = if let_go == LetGo::Expire {
        EXPIRING_HOLD.as_secs()
    } else {
        60
    };
    let now = engine::clock::to_datetime(Utc::now().timestamp_millis());
    let clock = Arc::new(ManualClock::new(now.timestamp_millis()));
    let db = Arc::new(common::TestDb::new().await);
    let prefix = common::redis_prefix();
    let mut apps = Vec::new();
    for _ in 0..3 {
        apps.push(
            TestApp::redis_instance_with_clock(
                Arc::clone(&db),
                EngineArgs {
                    reaper_interval_ms: 100,
                    ..EngineArgs::default()
                },
                &[common::redis_url()],
                &prefix,
                clock.clone(),
            )
            .await,
        );
    }
    let seller = apps[0].member(Role::Seller).await;
    let product = apps[0].product(&seller, 1_000).await;
    let draw_at = now + chrono::Duration::seconds(60);
    let drop = apps[0]
        .drop(
            &seller,
            json!({ "product_id": product, "stock": STOCK, "mode": "draw", "hold_seconds": hold_seconds,
                    "opens_at": (now - chrono::Duration::seconds(1)).to_rfc3339(),
                    "draw_at": draw_at.to_rfc3339() }),
        )
        .await;
    let mut members = HashMap::new();
    for i in 0..60 {
        let member = apps[i % 3].member(Role::Customer).await;
        let entered = enter(&apps[i % 3], &member, &drop, 1).await;
        assert_eq!(entered.status, StatusCode::CREATED, "{:?}", entered.body);
        members.insert(member.id, member);
    }
    clock.set_ms(draw_at.timestamp_millis());
    let all_tick = || async {
        let passes = apps.iter().map(|app| draw::tick(&app.state));
        for pass in futures_util::future::join_all(passes).await {
            pass.unwrap();
        }
    };
    all_tick().await;
    let rows = entry_rows(&apps[2], &drop).await;
    let winners: Vec<EntryRow> = rows.iter().filter(|row| row.2 == "won").cloned().collect();
    assert_eq!(winners.len(), STOCK);
    assert!(winners.iter().all(|row| row.3.unwrap() <= STOCK as i32));

    // Four winners cancel on one instance (or let their holds expire), the rest pay on another, all at once and
    // before anything else is checked (their holds are running out by Redis's clock).
    let payments = winners.iter().enumerate().skip(4).map(|(i, row)| {
        let hold = row.4.unwrap().to_string();
        let (app, member) = (&apps[(i + 2) % 3], &members[&row.1]);
        async move { pay(app, member, &hold, "tok_ok").await }
    });
    for paid in futures_util::future::join_all(payments).await {
        assert_eq!(paid.status, StatusCode::OK, "{:?}", paid.body);
    }
    let seed = apps[1]
        .call("GET", &path(&drop, "/draw"), None, None)
        .await
        .body["seed"]
        .as_str()
        .unwrap()
        .to_owned();
    let ids: Vec<String> = rows.iter().map(|row| row.0.to_string()).collect();
    assert_eq!(
        recompute_ranking(&seed, &ids),
        ids,
        "ranked once, as the seed says"
    );
    for (i, row) in winners.iter().enumerate().take(4) {
        let (member, hold) = (&members[&row.1], row.4.unwrap().to_string());
        if let_go == LetGo::Cancel {
            let cancelled = common::cancel(&apps[(i + 1) % 3], member, &hold).await;
            assert_eq!(
                cancelled.status,
                StatusCode::NO_CONTENT,
                "{:?}",
                cancelled.body
            );
        }
    }
    if let_go == LetGo::Expire {
        for (i, row) in winners.iter().take(4).enumerate() {
            let (member, hold) = (&members[&row.1], row.4.unwrap().to_string());
            let app = &apps[(i + 1) % 3];
            common::eventually(
                "a winning hold left unpaid released as expired",
                EXPIRING_HOLD + Duration::from_secs(20),
                || async {
                    let read = common::read_reservation(app, member, &hold).await;
                    read.body["status"] == "released" && read.body["reason"] == "expired"
                },
            )
            .await;
        }
    }
    all_tick().await;
    let rows = entry_rows(&apps[0], &drop).await;
    let next: Vec<&EntryRow> = rows
        .iter()
        .filter(|row| row.2 == "won" && row.3.unwrap() > STOCK as i32)
        .collect();
    let ranks: Vec<i32> = next.iter().map(|row| row.3.unwrap()).collect();
    assert_eq!(
        ranks,
        [11, 12, 13, 14],
        "the released units go to the next ranks, in order"
    );
    let payments = next.iter().enumerate().map(|(i, row)| {
        let hold = row.4.unwrap().to_string();
        let (app, member) = (&apps[i % 3], &members[&row.1]);
        async move { pay(app, member, &hold, "tok_ok").await }
    });
    for paid in futures_util::future::join_all(payments).await {
        assert_eq!(paid.status, StatusCode::OK, "{:?}", paid.body);
    }
    // Sold out with nothing held: the waitlist loses, on whichever instance settles it.
    all_tick().await;
    let rows = entry_rows(&apps[1], &drop).await;
    let count = |status: &str| rows.iter().filter(|row| row.2 == status).count();
    assert_eq!(
        (count("won"), count("waitlisted"), count("lost")),
        (14, 0, 46)
    );
    let drop_id: Uuid = drop["id"].as_str().unwrap().parse().unwrap();
    let row = db
        .client()
        .await
        .query_one(
            "SELECT count(*), coalesce(sum(quantity), 0)::int8, count(DISTINCT member_id) FROM purchases
             WHERE drop_id = $1",
            &[&drop_id],
        )
        .await
        .unwrap();
    let (purchases, units, buyers): (i64, i64, i64) = (row.get(0), row.get(1), row.get(2));
    assert_eq!(
        (purchases, units, buyers),
        (10, 10, 10),
        "the stock sold once, one unit per buyer"
    );
}
