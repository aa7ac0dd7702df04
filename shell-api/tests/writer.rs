//! The batched purchase writer against real Postgres: concurrent purchases share commits (group commit), a
//! purchase stored twice is stored once (a second attempt answers with the first), a drop with sales cannot be
//! deleted, shutdown drains the queue, and a purchase that cannot be stored is
//! never acknowledged (the payment answers 503, the charge is refunded, the hold is kept).
#![allow(
    clippy::too_many_lines,
    reason = "each test is one scenario read top to bottom: its setup, the fault or load, and every check"
)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use chrono::Utc;
use common::{TestApp, TestDb};
use engine::types::Purchase;
use engine::writer::{self, HoldRow, WriterConfig};
use serde_json::json;
use shell_api::auth::Role;
use uuid::Uuid;

/// A drop row for the writer's rows to point at.
async fn seed_drop(db: &TestDb) -> Uuid {
    let client = db.client().await;
    let (member, product, drop) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
    client
        .execute(
            "INSERT INTO members (id, email, password_hash, name, role) VALUES ($1, $2, 'x', 'Seller', 'seller')",
            &[&member, &format!("{member}@example.test")],
        )
        .await
        .unwrap();
    client
        .execute(
            "INSERT INTO products (id, seller_id, name, price, kind) VALUES ($1, $2, 'Item', 100, 'preorder')",
            &[&product, &member],
        )
        .await
        .unwrap();
    client
        .execute(
            "INSERT INTO drops (id, product_id, seller_id, stock, opens_at, per_member_limit, hold_seconds, price, currency)
             VALUES ($1, $2, $3, 100000, now(), 1, 300, 100, 'KRW')",
            &[&drop, &product, &member],
        )
        .await
        .unwrap();
    drop
}

fn purchase_for(drop: Uuid) -> (Purchase, HoldRow) {
    let now = Utc::now();
    let reservation = Uuid::now_v7();
    let member = Uuid::now_v7();
    let purchase = Purchase {
        id: Uuid::now_v7(),
        reservation_id: reservation,
        drop_id: drop,
        product_id: Uuid::now_v7(),
        member_id: member,
        quantity: 1,
        amount: 100,
        currency: "KRW".into(),
        paid_at: now,
    };
    let hold = HoldRow {
        id: reservation,
        drop_id: drop,
        member_id: member,
        quantity: 1,
        created_at: now,
        expires_at: now + chrono::Duration::seconds(300),
    };
    (purchase, hold)
}

async fn count(db: &TestDb, sql: &str) -> i64 {
    db.client().await.query_one(sql, &[]).await.unwrap().get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_purchases_share_commits_and_are_all_durable_when_acknowledged() {
    let db = TestDb::new().await;
    let drop = seed_drop(&db).await;
    let (handle, task) = writer::spawn(db.pool.clone(), WriterConfig::default());
    let mut acks = Vec::new();
    for _ in 0..400 {
        let handle = handle.clone();
        let (purchase, hold) = purchase_for(drop);
        acks.push(tokio::spawn(async move {
            handle.purchase(purchase, hold).await
        }));
    }
    for ack in acks {
        ack.await.unwrap().unwrap();
    }
    // Acknowledged means committed: every row is there without any flush.
    assert_eq!(count(&db, "SELECT count(*) FROM purchases").await, 400);
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM reservations WHERE status = 'paid'"
        )
        .await,
        400
    );
    let batches = handle.stats().batches.load(Ordering::Relaxed);
    assert!(
        batches < 400,
        "group commit: 400 purchases took {batches} commits"
    );
    println!("400 concurrent purchases committed in {batches} batches");
    handle.shutdown().await.unwrap();
    task.await.unwrap();
}

#[tokio::test]
async fn a_purchase_stored_twice_is_stored_once() {
    let db = TestDb::new().await;
    let drop = seed_drop(&db).await;
    let (handle, _task) = writer::spawn(db.pool.clone(), WriterConfig::default());
    let (purchase, hold) = purchase_for(drop);
    handle
        .purchase(purchase.clone(), hold.clone())
        .await
        .unwrap();
    handle.purchase(purchase, hold).await.unwrap();
    assert_eq!(count(&db, "SELECT count(*) FROM purchases").await, 1);
}

/// Purchases go in as plain inserts first; one whose reservation was paid before sends its batch through the upserts
/// again, and every purchase beside it in that batch (one of a hold a journal stored) is stored all the same, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purchases_meeting_rows_already_there_are_stored_beside_fresh_ones() {
    // Plain inserts first (the default), and upserts only.
    for plain_purchases in [true, false] {
        purchases_beside_rows_already_there(WriterConfig {
            plain_purchases,
            ..WriterConfig::default()
        })
        .await;
    }
}

async fn purchases_beside_rows_already_there(config: WriterConfig) {
    let db = TestDb::new().await;
    let drop = seed_drop(&db).await;
    let (handle, task) = writer::spawn(db.pool.clone(), config);
    let (held, held_row) = purchase_for(drop);
    handle
        .journal(vec![held_row.clone()], vec![])
        .await
        .unwrap();
    let (paid, paid_row) = purchase_for(drop);
    let paid_first = handle
        .purchase(paid.clone(), paid_row.clone())
        .await
        .unwrap();

    let mut acks = Vec::new();
    let retried = Purchase {
        id: Uuid::now_v7(),
        ..paid.clone()
    };
    let mut sent = vec![(held.clone(), held_row), (retried, paid_row)];
    sent.extend((0..60).map(|_| purchase_for(drop)));
    for (purchase, hold) in sent {
        let handle = handle.clone();
        acks.push(tokio::spawn(async move {
            handle.purchase(purchase, hold).await
        }));
    }
    let mut answers = Vec::new();
    for ack in acks {
        answers.push(ack.await.unwrap().unwrap());
    }
    assert_eq!(
        answers[0].id, held.id,
        "the held reservation's purchase is stored"
    );
    assert_eq!(
        answers[1], paid_first,
        "a repeat answers the purchase stored first"
    );
    assert_eq!(count(&db, "SELECT count(*) FROM purchases").await, 62);
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM reservations WHERE status = 'paid'"
        )
        .await,
        62
    );
    assert_eq!(count(&db, "SELECT count(*) FROM reservations").await, 62);
    handle.shutdown().await.unwrap();
    task.await.unwrap();
}

#[tokio::test]
async fn a_second_purchase_of_a_reservation_answers_with_the_one_stored_first() {
    let db = TestDb::new().await;
    let drop = seed_drop(&db).await;
    let (handle, _task) = writer::spawn(db.pool.clone(), WriterConfig::default());
    let (first, hold) = purchase_for(drop);
    let stored = handle.purchase(first.clone(), hold.clone()).await.unwrap();
    assert_eq!(stored.id, first.id);
    // Postgres keeps microseconds; the answer is the purchase as stored.
    assert_eq!(stored.paid_at.timestamp_subsec_nanos() % 1000, 0);
    let again = Purchase {
        id: Uuid::now_v7(),
        ..first.clone()
    };
    let answered = handle.purchase(again, hold).await.unwrap();
    assert_eq!(
        answered, stored,
        "the purchase stored first, not the second attempt's"
    );
    assert_eq!(count(&db, "SELECT count(*) FROM purchases").await, 1);
}

#[tokio::test]
async fn a_drop_with_sales_cannot_be_deleted_nor_its_id_changed() {
    let db = TestDb::new().await;
    let (sold, unsold) = (seed_drop(&db).await, seed_drop(&db).await);
    let (handle, _task) = writer::spawn(db.pool.clone(), WriterConfig::default());
    let (purchase, hold) = purchase_for(sold);
    handle.purchase(purchase, hold).await.unwrap();
    let client = db.client().await;
    for sql in [
        "DELETE FROM drops WHERE id = $1",
        "UPDATE drops SET id = gen_random_uuid() WHERE id = $1",
    ] {
        let err = client.execute(sql, &[&sold]).await.unwrap_err();
        assert_eq!(
            err.code(),
            Some(&tokio_postgres::error::SqlState::FOREIGN_KEY_VIOLATION),
            "{sql}: {err}"
        );
    }
    client
        .execute("UPDATE drops SET stock = stock + 1 WHERE id = $1", &[&sold])
        .await
        .unwrap();
    assert_eq!(
        client
            .execute("DELETE FROM drops WHERE id = $1", &[&unsold])
            .await
            .unwrap(),
        1,
        "a drop without sales can go"
    );
}

#[tokio::test]
async fn shutdown_drains_everything_queued_before_it() {
    let db = TestDb::new().await;
    let drop = seed_drop(&db).await;
    let config = WriterConfig {
        batch_rows_max: 50,
        ..WriterConfig::default()
    };
    let (handle, task) = writer::spawn(db.pool.clone(), config);
    for _ in 0..1000 {
        let (_, hold) = purchase_for(drop);
        handle.hold_created(hold).await.unwrap();
    }
    handle.shutdown().await.unwrap();
    task.await.unwrap();
    // New holds are journaled in batches (hold_batches); `stored_holds` reads them as holds, and no hold has a row of
    // its own until it settles.
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM stored_holds WHERE status = 'held'"
        )
        .await,
        1000
    );
    assert_eq!(count(&db, "SELECT count(*) FROM reservations").await, 0);
    let (_, hold) = purchase_for(drop);
    assert!(
        handle.hold_created(hold).await.is_err(),
        "a stopped writer refuses new work"
    );
}

#[tokio::test]
async fn a_purchase_that_cannot_be_stored_is_never_acknowledged() {
    let app = TestApp::new().await;
    let (_, drop) = app.open_drop(5, 100, json!({})).await;
    let buyer = app.member(Role::Customer).await;
    let held = app
        .call(
            "POST",
            &format!(
                "/api/v1/drops/{}/reservations",
                drop["id"].as_str().unwrap()
            ),
            Some(&buyer.token),
            Some(json!({})),
        )
        .await;
    let id = held.body["id"].as_str().unwrap().to_owned();
    app.state.engine.writer().flush().await.unwrap();

    // Postgres refuses purchases for a while.
    let client = app.db.client().await;
    client
        .batch_execute("ALTER TABLE purchases RENAME TO purchases_away")
        .await
        .unwrap();
    let pay_path = format!("/api/v1/reservations/{id}/payment");
    let failed = app
        .call(
            "POST",
            &pay_path,
            Some(&buyer.token),
            Some(json!({ "payment_token": "tok_ok" })),
        )
        .await;
    assert_eq!(
        failed.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{:?}",
        failed.body
    );
    assert_eq!(failed.code(), "storage_unavailable");
    assert!(failed.headers.contains_key("retry-after"));
    assert_eq!(app.gateway.refunds(), 1, "the charge was given back");
    assert_eq!(app.gateway.charges(), 0);
    let view = app
        .call(
            "GET",
            &format!("/api/v1/reservations/{id}"),
            Some(&buyer.token),
            None,
        )
        .await;
    assert_eq!(view.body["status"], "held", "the hold is kept for a retry");

    // Once Postgres is back, the retry pays, once.
    client
        .batch_execute("ALTER TABLE purchases_away RENAME TO purchases")
        .await
        .unwrap();
    let paid = app
        .call(
            "POST",
            &pay_path,
            Some(&buyer.token),
            Some(json!({ "payment_token": "tok_ok" })),
        )
        .await;
    assert_eq!(paid.status, StatusCode::OK, "{:?}", paid.body);
    assert_eq!(count(&app.db, "SELECT count(*) FROM purchases").await, 1);
    let state = app
        .call(
            "GET",
            &format!("/api/v1/drops/{}", drop["id"].as_str().unwrap()),
            None,
            None,
        )
        .await;
    assert_eq!(
        (
            state.body["sold"].as_u64(),
            state.body["available"].as_u64()
        ),
        (Some(1), Some(4))
    );
}

// ---- Guarantee 5a at the system of record: the fence and the backstop.

/// A drop of `stock` units for the writer's rows to point at.
async fn seed_drop_of(db: &TestDb, stock: i32) -> Uuid {
    let drop = seed_drop(db).await;
    db.client()
        .await
        .execute(
            "UPDATE drops SET stock = $2 WHERE id = $1",
            &[&drop, &stock],
        )
        .await
        .unwrap();
    drop
}

/// A purchase whose hold's release is stored (a payment that outlived its lease) is refused, inside a batch whose
/// other purchases are stored: the fence is per row, not per batch. Both ways of writing purchases.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purchase_of_a_released_hold_is_refused_and_the_rest_of_its_batch_stored() {
    for plain in [true, false] {
        let db = TestDb::new().await;
        let drop = seed_drop(&db).await;
        let (fenced, fenced_row) = purchase_for(drop);
        let fence = engine::store::fence_payment(&**db.client().await, &fenced_row, Utc::now())
            .await
            .unwrap();
        assert_eq!(fence, engine::store::Fence::Released);
        let config = WriterConfig {
            plain_purchases: plain,
            // One batch for all of them.
            linger: std::time::Duration::from_millis(200),
            ..WriterConfig::default()
        };
        let (handle, _task) = writer::spawn(db.pool.clone(), config);
        let mut sent = vec![(fenced, fenced_row)];
        sent.extend((0..20).map(|_| purchase_for(drop)));
        let answers: Vec<_> = sent
            .into_iter()
            .map(|(purchase, hold)| {
                let handle = handle.clone();
                tokio::spawn(async move { handle.purchase(purchase, hold).await })
            })
            .collect();
        let mut results = Vec::new();
        for answer in answers {
            results.push(answer.await.unwrap());
        }
        assert!(
            matches!(results[0], Err(writer::WriteError::Fenced)),
            "plain {plain}: {:?}",
            results[0]
        );
        assert!(results[1..].iter().all(Result::is_ok), "plain {plain}");
        assert_eq!(count(&db, "SELECT count(*) FROM purchases").await, 20);
        assert_eq!(
            count(
                &db,
                "SELECT count(*) FROM reservations WHERE status = 'released'"
            )
            .await,
            1,
            "the fenced hold stays released"
        );
        assert_eq!(common::stored_sold(&db, drop).await, 20, "plain {plain}");
    }
}

/// The fence against the purchase, raced: for each hold a settling reaper fences it while its payment stores the
/// purchase, at the same moment. Exactly one wins each time: stored and answered paid, or released and refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fence_and_a_purchase_racing_never_both_win() {
    const HOLDS: usize = 60;
    let db = TestDb::new().await;
    let drop = seed_drop(&db).await;
    let (handle, _task) = writer::spawn(db.pool.clone(), WriterConfig::default());
    // The pool has 8 connections: the writer needs one while the fences hold theirs.
    let fences = std::sync::Arc::new(tokio::sync::Semaphore::new(4));
    let mut races = Vec::new();
    for i in 0..HOLDS {
        let (purchase, hold) = purchase_for(drop);
        let (handle, pool, fences) = (handle.clone(), db.pool.clone(), fences.clone());
        // Fences that start from at once to a few milliseconds after the purchase, so both sides win some races.
        let lag = std::time::Duration::from_micros(250 * (i as u64 % 20));
        let fence_row = hold.clone();
        races.push(tokio::spawn(async move {
            let _turn = fences.acquire().await.unwrap();
            let client = pool.get().await.unwrap();
            let (stored, fence) = tokio::join!(handle.purchase(purchase, hold), async {
                tokio::time::sleep(lag).await;
                engine::store::fence_payment(&**client, &fence_row, Utc::now()).await
            });
            (fence_row.id, stored, fence.unwrap())
        }));
    }
    let (mut paid, mut released) = (0, 0);
    for race in races {
        let (id, stored, fence) = race.await.unwrap();
        let rows = common::purchases_of_reservation(&db, id).await;
        let status: String = db
            .client()
            .await
            .query_one("SELECT status FROM reservations WHERE id = $1", &[&id])
            .await
            .unwrap()
            .get(0);
        match fence {
            engine::store::Fence::Paid => {
                assert!(stored.is_ok(), "{id}: fence says paid, purchase {stored:?}");
                assert_eq!((rows, status.as_str()), (1, "paid"), "{id}");
                paid += 1;
            }
            engine::store::Fence::Released => {
                assert!(
                    matches!(stored, Err(writer::WriteError::Fenced)),
                    "{id}: fence says released, purchase {stored:?}"
                );
                assert_eq!((rows, status.as_str()), (0, "released"), "{id}");
                released += 1;
            }
        }
    }
    assert_eq!(paid + released, HOLDS);
    assert_eq!(common::stored_sold(&db, drop).await as usize, paid);
    println!("{paid} purchases won their race, {released} fences did");
    assert!(paid > 0 && released > 0, "both sides won some races");
}

/// The backstop: a batch whose purchases would pass the drop's stock in Postgres (a gate that lost the truth sold
/// them) is refused by `drops_sold_check`, and its purchases are then stored one by one: exactly the stock is
/// stored, the rest are refused, and the holds and releases beside them in the batch are stored all the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purchases_past_a_drops_stock_are_refused_in_postgres() {
    const STOCK: i32 = 3;
    let db = TestDb::new().await;
    let drop = seed_drop_of(&db, STOCK).await;
    let config = WriterConfig {
        linger: std::time::Duration::from_millis(200),
        ..WriterConfig::default()
    };
    let (handle, _task) = writer::spawn(db.pool.clone(), config);
    let (_, released_hold) = purchase_for(drop);
    handle
        .hold_released(
            released_hold,
            engine::core::ReleaseReason::Cancelled,
            Utc::now(),
        )
        .await
        .unwrap();
    let answers: Vec<_> = (0..8)
        .map(|_| {
            let (purchase, hold) = purchase_for(drop);
            let handle = handle.clone();
            tokio::spawn(async move { handle.purchase(purchase, hold).await })
        })
        .collect();
    let (mut stored, mut refused) = (0, 0);
    for answer in answers {
        match answer.await.unwrap() {
            Ok(_) => stored += 1,
            Err(writer::WriteError::Fenced) => refused += 1,
            Err(other) => panic!("{other}"),
        }
    }
    assert_eq!((stored, refused), (STOCK, 8 - STOCK));
    assert_eq!(
        count(&db, "SELECT count(*) FROM purchases").await,
        i64::from(STOCK)
    );
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM reservations WHERE status = 'paid'"
        )
        .await,
        i64::from(STOCK),
        "no paid row without its purchase"
    );
    assert_eq!(common::stored_sold(&db, drop).await, STOCK);
    handle.flush().await.unwrap();
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM reservations WHERE status = 'released'"
        )
        .await,
        1,
        "the release in the refused batch is stored"
    );
    // A direct write past the stock is refused by Postgres itself.
    let past = db
        .client()
        .await
        .execute("UPDATE drops SET sold = stock + 1 WHERE id = $1", &[&drop])
        .await;
    assert!(past.is_err());
}

/// A purchase whose batch's COMMIT reached Postgres while its connection was cut (the writer saw the connection
/// fail, and its retries could not reach Postgres) is in doubt, not lost: the payment reads Postgres once it answers,
/// finds the purchase and answers it paid, keeping the charge. It refunded the charge and put the hold back to `held`
/// for a retry while Postgres held the purchase, so the hold could expire and its units and the member's limit be
/// sold again (the chaos rehearsal's `member_over_limit`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purchase_whose_commit_outcome_is_in_doubt_is_read_back_not_refunded() {
    let db = Arc::new(TestDb::new().await);
    let target = {
        let url: reqwest::Url = db.url.parse().unwrap();
        format!("127.0.0.1:{}", url.port().unwrap_or(5432))
    };
    let proxy = common::TcpProxy::start(target).await;
    let proxied = {
        let mut url: reqwest::Url = db.url.parse().unwrap();
        url.set_host(Some("127.0.0.1")).unwrap();
        url.set_port(Some(proxy.port)).unwrap();
        url.to_string()
    };
    let engine_pool = shell_api::db::connect(&shell_api::config::DbArgs {
        database_url: proxied,
        db_pool_size: 4,
        db_pool_wait_ms: 300,
    })
    .await
    .unwrap();
    let app = Arc::new(TestApp::with_engine_pool(Arc::clone(&db), engine_pool).await);
    let (_, drop) = app.open_drop(5, 100, json!({})).await;
    let buyer = app.member(Role::Customer).await;
    let held = common::reserve(&app, &buyer, &drop, 1).await;
    assert_eq!(held.status, StatusCode::CREATED, "{:?}", held.body);
    let id = held.body["id"].as_str().unwrap().to_owned();
    app.state.engine.writer().flush().await.unwrap();

    // Postgres holds the purchase's statement for 600 ms; the COMMIT sent behind it waits in its socket.
    db.client()
        .await
        .batch_execute(
            "CREATE FUNCTION slow_purchase() RETURNS trigger LANGUAGE plpgsql AS
               $$ BEGIN PERFORM pg_sleep(0.6); RETURN NULL; END $$;
             CREATE TRIGGER slow_purchase AFTER INSERT ON purchases
               FOR EACH STATEMENT EXECUTE FUNCTION slow_purchase();",
        )
        .await
        .unwrap();
    let paying = {
        let (app, buyer, id) = (Arc::clone(&app), buyer.clone(), id.clone());
        tokio::spawn(async move {
            app.call(
                "POST",
                &format!("/api/v1/reservations/{id}/payment"),
                Some(&buyer.token),
                Some(json!({ "payment_token": "tok_ok" })),
            )
            .await
        })
    };
    // Cut while the batch waits in Postgres: the writer's connection fails after its COMMIT was sent, and every
    // retry is refused, for longer than the writer retries.
    tokio::time::sleep(Duration::from_millis(250)).await;
    proxy.cut();
    tokio::time::sleep(Duration::from_millis(2_000)).await;
    proxy.restore();
    let paid = paying.await.unwrap();

    let stored = db
        .client()
        .await
        .query_opt(
            "SELECT id FROM purchases WHERE reservation_id = $1",
            &[&id.parse::<Uuid>().unwrap()],
        )
        .await
        .unwrap()
        .map(|row| row.get::<_, Uuid>(0));
    let stored = stored.expect("the COMMIT sent before the cut reached Postgres");
    assert_eq!(paid.status, StatusCode::OK, "{:?}", paid.body);
    assert_eq!(paid.body["purchase_id"], stored.to_string());
    assert_eq!(
        app.gateway.refunds(),
        0,
        "the charge of a stored purchase was kept"
    );
    let view = common::read_reservation(&app, &buyer, &id).await;
    assert_eq!(view.body["status"], "paid", "{:?}", view.body);
}
