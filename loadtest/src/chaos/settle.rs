//! After the load window: wait until every hold has expired and been reaped, run `flashsale reconcile` (which
//! rebuilds Redis from Postgres where a Redis kill lost writes), read the drop from every instance (recorded as
//! `drop_read` ops) and read the drop's rows from Postgres directly, for the checker.

use std::time::Duration;

use anyhow::Context;
use hyper::Method;
use tokio::time::Instant;
use uuid::Uuid;

use super::checker::{DbSnapshot, PurchaseRow, ReservationRow};
use super::history::{Entry, Op, OpKind, Recorder};
use super::http::{Client, Request};
use super::world::World;
use crate::setup::API;

/// Longest `flashsale reconcile` may take.
const RECONCILE_TIMEOUT: Duration = Duration::from_secs(60);
/// Between two polls of the drop while waiting for holds to drain.
const POLL_INTERVAL: Duration = Duration::from_millis(250);

/// Polls every instance until each says `held == 0`, for at most `limit`; whether they all did.
pub async fn drain(world: &World, drop_id: &str, limit: Duration) -> bool {
    let mut client = Client::new(world.addrs.clone(), Duration::from_secs(5));
    let request = Request::new(Method::GET, format!("{API}/drops/{drop_id}"));
    let until = Instant::now() + limit;
    loop {
        let mut drained = true;
        for instance in 0..world.addrs.len() {
            let answer = client.send(instance, &request).await;
            let held = answer.body.get("held").and_then(serde_json::Value::as_i64);
            drained &= answer.status() == Some(200) && held == Some(0);
        }
        if drained {
            return true;
        }
        if Instant::now() + POLL_INTERVAL > until {
            return false;
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// `flashsale reconcile --drop <id>` with the instances' environment; what it printed, or why it failed (a
/// failure is reported, not fatal: the checks say what is wrong).
pub async fn reconcile(world: &World, drop_id: &str) -> String {
    match world
        .spec
        .run(&["reconcile", "--drop", drop_id], RECONCILE_TIMEOUT)
        .await
    {
        Ok(stdout) => stdout.trim().to_owned(),
        Err(err) => format!("reconcile FAILED: {err:#}"),
    }
}

/// Reads of one instance's drop before its last answer counts, when it keeps failing.
const FINAL_READ_TRIES_MAX: u32 = 3;

/// Reads the drop from every instance (again, a few times, while an instance does not answer 200), recording
/// each read; the checker takes each instance's last.
pub async fn final_reads(world: &World, recorder: &Recorder, drop_id: &str) {
    let mut client = Client::new(world.addrs.clone(), Duration::from_secs(10));
    let request = Request::new(Method::GET, format!("{API}/drops/{drop_id}"));
    for instance in 0..world.addrs.len() {
        for _ in 0..FINAL_READ_TRIES_MAX {
            if final_read(&mut client, recorder, &request, instance).await == Some(200) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

/// One recorded read; its status.
async fn final_read(
    client: &mut Client,
    recorder: &Recorder,
    request: &Request,
    instance: usize,
) -> Option<u16> {
    let op_id = recorder.next_op_id();
    let invoke_ms = recorder.now_ms();
    let answer = client.send(instance, request).await;
    let op = Op {
        op: op_id,
        kind: OpKind::DropRead,
        buyer: None,
        member: None,
        instance,
        reservation: None,
        method: "GET".into(),
        path: request.path.clone(),
        body: None,
        idempotency_key: None,
        invoke_ms,
        complete_ms: recorder.now_ms(),
        status: answer.outcome,
        response: answer.body,
    };
    let status = op.http_status();
    recorder.record(Entry::Op(op)).await;
    status
}

/// The drop's stock and limit, purchases and reservations, read from Postgres directly (not through the proxy).
pub async fn snapshot(world: &World, drop_id: &str) -> anyhow::Result<DbSnapshot> {
    let id: Uuid = drop_id.parse().context("the drop id is not a UUID")?;
    let client = world.db.connect().await?;
    let drop = client
        .query_one(
            "SELECT stock::bigint, per_member_limit::bigint FROM drops WHERE id = $1",
            &[&id],
        )
        .await
        .context("reading the drop from Postgres")?;
    let purchases = client
        .query(
            "SELECT id::text, reservation_id::text, member_id::text, quantity::bigint
             FROM purchases WHERE drop_id = $1 ORDER BY id",
            &[&id],
        )
        .await
        .context("reading purchases")?
        .iter()
        .map(|row| {
            Ok(PurchaseRow {
                id: row.try_get(0)?,
                reservation_id: row.try_get(1)?,
                member_id: row.try_get(2)?,
                quantity: row.try_get(3)?,
            })
        })
        .collect::<Result<_, tokio_postgres::Error>>()
        .context("reading a purchase row")?;
    let reservations = client
        .query(
            "SELECT id::text, member_id::text, quantity::bigint, status, reason
             FROM stored_holds WHERE drop_id = $1 ORDER BY id",
            &[&id],
        )
        .await
        .context("reading reservations")?
        .iter()
        .map(|row| {
            Ok(ReservationRow {
                id: row.try_get(0)?,
                member_id: row.try_get(1)?,
                quantity: row.try_get(2)?,
                status: row.try_get(3)?,
                reason: row.try_get(4)?,
            })
        })
        .collect::<Result<_, tokio_postgres::Error>>()
        .context("reading a reservation row")?;
    Ok(DbSnapshot {
        stock: drop.try_get(0)?,
        per_member_limit: drop.try_get(1)?,
        purchases,
        reservations,
    })
}
