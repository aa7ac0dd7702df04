//! Draw drops (API.md, "Launch modes", Draw): entries, the verifiable draw, and the allocator that gives holds
//! down the ranking.
//!
//! The seed is stored with the drop at its creation (`engine::types::DrawTerms`); its SHA-256 is published at once
//! as `commitment`. The draw is one transaction: a conditional UPDATE (`drawn_at IS NULL`) claims it, and the same
//! transaction ranks every entry, so whichever instances run it (and whichever crash meanwhile) it happens once.
//! Entering and leaving take the drop row `FOR SHARE`, so an entry is either in the draw or refused `closed`.
//! The allocator (every instance, every `DRAW_TICK`) gives holds in rank order through the ordinary engine
//! reservation (`Engine::reserve_drawn`), one entry per transaction under a per-drop advisory lock, so two
//! instances never give one entry two holds. A crash between the reservation and its record leaves a hold nobody
//! recorded: it expires after `hold_seconds` and its units go down the ranking again.

use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use chrono::{DateTime, Utc};
use deadpool_postgres::GenericClient;
use engine::EngineError;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio_postgres::Row;
use uuid::Uuid;

use crate::auth::AuthMember;
use crate::error::ApiError;
use crate::extract::{ApiPath, ApiQuery, OptionalJson};
use crate::notify::{notify_members, About, Kind};
use crate::pagination::{Page, PageQuery};
use crate::AppState;

/// How often every instance looks for due draws and allocates holds: a released hold reaches the next waitlisted
/// entry within about this long.
pub const DRAW_TICK: Duration = Duration::from_millis(200);

/// HMAC-SHA256 (RFC 2104) over `sha2`: the ranking's key function. Fifteen lines here instead of a dependency.
pub fn hmac_sha256(key: &[u8], message: &[u8]) -> [u8; 32] {
    let mut block = [0u8; 64];
    if key.len() > block.len() {
        block[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        block[..key.len()].copy_from_slice(key);
    }
    // On the stack: the admission pass is checked with this on the reservation path.
    let pad = |byte: u8| block.map(|b| b ^ byte);
    let inner = Sha256::new()
        .chain_update(pad(0x36))
        .chain_update(message)
        .finalize();
    Sha256::new()
        .chain_update(pad(0x5c))
        .chain_update(inner)
        .finalize()
        .into()
}

/// The published commitment to a seed: lowercase hex SHA-256 of its bytes.
pub fn commitment(seed: &[u8]) -> String {
    hex::encode(Sha256::digest(seed))
}

/// Hex SHA-256 of the entry ids (lowercase hyphenated) sorted ascending and joined with `\n`.
pub fn entries_digest(ids: &[Uuid]) -> String {
    let mut texts: Vec<String> = ids.iter().map(Uuid::to_string).collect();
    texts.sort_unstable();
    hex::encode(Sha256::digest(texts.join("\n").as_bytes()))
}

/// The entries in rank order: ascending HMAC-SHA256(seed, id string), compared as bytes (rank 1 first).
pub fn ranking(seed: &[u8], ids: &[Uuid]) -> Vec<Uuid> {
    let mut keyed: Vec<([u8; 32], Uuid)> = ids
        .iter()
        .map(|id| (hmac_sha256(seed, id.to_string().as_bytes()), *id))
        .collect();
    keyed.sort_unstable();
    keyed.into_iter().map(|(_, id)| id).collect()
}

/// A new draw seed from the operating system's CSPRNG.
pub fn new_seed() -> [u8; 32] {
    use rand::RngCore;
    let mut seed = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut seed);
    seed
}

fn not_a_draw() -> ApiError {
    ApiError::conflict(
        "not_a_draw",
        "this drop is not a draw; reserve it with POST .../reservations",
    )
}

fn drop_not_found() -> ApiError {
    engine::EngineError::DropNotFound.into()
}

fn closed() -> ApiError {
    ApiError::conflict("closed", "entries to this draw are closed")
}

/// What the entry routes need of a drop, read under `FOR SHARE` (the draw's UPDATE waits for it).
struct DrawDrop {
    mode: String,
    opens_at: DateTime<Utc>,
    draw_at: Option<DateTime<Utc>>,
    per_member_limit: i32,
    drawn_at: Option<DateTime<Utc>>,
}

async fn draw_drop_for_share(
    client: &impl GenericClient,
    drop: Uuid,
) -> Result<DrawDrop, ApiError> {
    let row = client
        .query_opt(
            "SELECT mode, opens_at, draw_at, per_member_limit, drawn_at FROM drops WHERE id = $1 FOR SHARE",
            &[&drop],
        )
        .await?
        .ok_or_else(drop_not_found)?;
    let found = DrawDrop {
        mode: row.get("mode"),
        opens_at: row.get("opens_at"),
        draw_at: row.get("draw_at"),
        per_member_limit: row.get("per_member_limit"),
        drawn_at: row.get("drawn_at"),
    };
    if found.mode != "draw" {
        return Err(not_a_draw());
    }
    Ok(found)
}

impl DrawDrop {
    /// Entries are taken from `opens_at` until `draw_at` (and never once drawn).
    fn check_entries_open(&self, now: DateTime<Utc>) -> Result<(), ApiError> {
        if now < self.opens_at {
            return Err(ApiError::conflict(
                "not_open",
                "the draw does not take entries yet",
            ));
        }
        if self.drawn_at.is_some() || self.draw_at.is_none_or(|at| now >= at) {
            return Err(closed());
        }
        Ok(())
    }
}

/// An entry's state, as `status` names it (documentation only).
#[derive(utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
#[allow(dead_code)]
enum EntryStatusName {
    Entered,
    Won,
    Waitlisted,
    Lost,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
#[schema(as = Entry)]
pub(crate) struct EntryJson {
    id: Uuid,
    drop_id: Uuid,
    member_id: Uuid,
    quantity: i32,
    #[schema(value_type = EntryStatusName)]
    status: String,
    /// Set by the draw.
    rank: Option<i32>,
    /// The hold a `won` entry was given.
    reservation_id: Option<Uuid>,
    created_at: DateTime<Utc>,
}

const ENTRY_COLUMNS: &str =
    "id, drop_id, member_id, quantity, status, rank, reservation_id, created_at";

fn entry_from_row(row: &Row) -> EntryJson {
    EntryJson {
        id: row.get("id"),
        drop_id: row.get("drop_id"),
        member_id: row.get("member_id"),
        quantity: row.get("quantity"),
        status: row.get("status"),
        rank: row.get("rank"),
        reservation_id: row.get("reservation_id"),
        created_at: row.get("created_at"),
    }
}

#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct EnterBody {
    /// Default 1; at most the drop's per-member limit.
    #[schema(minimum = 1)]
    quantity: Option<i64>,
}

/// Enters a draw drop (one entry per member; entering again answers the same entry). The body is optional.
#[utoipa::path(post, path = "/api/v1/drops/{id}/entries", tag = "drops", security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "The draw drop")), request_body = Option<EnterBody>,
    responses((status = 201, description = "The new entry, stored", body = EntryJson),
        (status = 200, description = "The member's entry, already there", body = EntryJson),
        (status = 404, description = "`drop_not_found`", body = crate::error::ErrorBody),
        (status = 409, description = "`not_open` (before `opens_at`), `closed` (from `draw_at` on), `not_a_draw` \
(a drop of another mode)", body = crate::error::ErrorBody),
        (status = 422, description = "`validation`: quantity outside 1..=per_member_limit",
            body = crate::error::ErrorBody)))]
pub(crate) async fn enter(
    State(state): State<AppState>,
    member: AuthMember,
    ApiPath(drop_id): ApiPath<Uuid>,
    OptionalJson(body): OptionalJson<EnterBody>,
) -> Result<(StatusCode, Json<EntryJson>), ApiError> {
    let quantity = body.quantity.unwrap_or(1);
    let mut client = state.db.get().await?;
    let tx = client.transaction().await?;
    let drop = draw_drop_for_share(&tx, drop_id).await?;
    drop.check_entries_open(state.engine.now())?;
    if !(1..=i64::from(drop.per_member_limit)).contains(&quantity) {
        return Err(ApiError::invalid(
            "quantity",
            "must be between 1 and the drop's per-member limit",
        ));
    }
    let quantity = i32::try_from(quantity).unwrap_or(i32::MAX);
    let inserted = tx
        .query_opt(
            &format!(
                "INSERT INTO drop_entries (id, drop_id, member_id, quantity, created_at)
                 VALUES ($1, $2, $3, $4, $5) ON CONFLICT (drop_id, member_id) DO NOTHING
                 RETURNING {ENTRY_COLUMNS}"
            ),
            &[
                &Uuid::now_v7(),
                &drop_id,
                &member.id,
                &quantity,
                &state.engine.now(),
            ],
        )
        .await?;
    let answer = match inserted {
        Some(row) => (StatusCode::CREATED, entry_from_row(&row)),
        None => (StatusCode::OK, my_entry(&tx, drop_id, member.id).await?),
    };
    tx.commit().await?;
    Ok((answer.0, Json(answer.1)))
}

async fn my_entry(
    client: &impl GenericClient,
    drop: Uuid,
    member: Uuid,
) -> Result<EntryJson, ApiError> {
    client
        .query_opt(
            &format!(
                "SELECT {ENTRY_COLUMNS} FROM drop_entries WHERE drop_id = $1 AND member_id = $2"
            ),
            &[&drop, &member],
        )
        .await?
        .map(|row| entry_from_row(&row))
        .ok_or_else(|| {
            ApiError::not_found("not_entered").with_message("you have not entered this draw")
        })
}

/// The caller's entry in a draw drop.
#[utoipa::path(get, path = "/api/v1/drops/{id}/entries/me", tag = "drops", security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "The draw drop")),
    responses((status = 200, description = "The entry", body = EntryJson),
        (status = 404, description = "`not_entered`", body = crate::error::ErrorBody)))]
pub(crate) async fn get_my_entry(
    State(state): State<AppState>,
    member: AuthMember,
    ApiPath(drop_id): ApiPath<Uuid>,
) -> Result<Json<EntryJson>, ApiError> {
    let client = state.db.get().await?;
    Ok(Json(my_entry(&client, drop_id, member.id).await?))
}

/// Withdraws the caller's entry, before `draw_at`.
#[utoipa::path(delete, path = "/api/v1/drops/{id}/entries/me", tag = "drops", security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "The draw drop")),
    responses((status = 204, description = "Withdrawn"),
        (status = 404, description = "`drop_not_found`, `not_entered`", body = crate::error::ErrorBody),
        (status = 409, description = "`closed` (from `draw_at` on), `not_open`, `not_a_draw`",
            body = crate::error::ErrorBody)))]
pub(crate) async fn withdraw(
    State(state): State<AppState>,
    member: AuthMember,
    ApiPath(drop_id): ApiPath<Uuid>,
) -> Result<StatusCode, ApiError> {
    let mut client = state.db.get().await?;
    let tx = client.transaction().await?;
    let drop = draw_drop_for_share(&tx, drop_id).await?;
    let now = state.engine.now();
    if drop.drawn_at.is_some() || drop.draw_at.is_none_or(|at| now >= at) {
        return Err(closed());
    }
    let deleted = tx
        .execute(
            "DELETE FROM drop_entries WHERE drop_id = $1 AND member_id = $2",
            &[&drop_id, &member.id],
        )
        .await?;
    tx.commit().await?;
    if deleted == 0 {
        return Err(
            ApiError::not_found("not_entered").with_message("you have not entered this draw")
        );
    }
    Ok(StatusCode::NO_CONTENT)
}

/// What anyone can check a draw with.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[schema(as = Draw)]
pub(crate) struct DrawJson {
    drop_id: Uuid,
    draw_at: DateTime<Utc>,
    /// Lowercase hex SHA-256 of the seed's 32 bytes, published from the drop's creation.
    commitment: String,
    /// Hex of the 32-byte seed; null until the draw.
    seed: Option<String>,
    /// How many entries were ranked; null until the draw.
    entries: Option<i32>,
    /// Hex SHA-256 of the entry ids sorted ascending, joined with `\n`; null until the draw.
    entries_digest: Option<String>,
    drawn_at: Option<DateTime<Utc>>,
}

/// The draw's commitment, and after the draw its seed and what it ranked (public).
#[utoipa::path(get, path = "/api/v1/drops/{id}/draw", tag = "drops",
    params(("id" = Uuid, Path, description = "The draw drop")),
    responses((status = 200, description = "The draw", body = DrawJson),
        (status = 404, description = "`drop_not_found`", body = crate::error::ErrorBody),
        (status = 409, description = "`not_a_draw`", body = crate::error::ErrorBody)))]
pub(crate) async fn get_draw(
    State(state): State<AppState>,
    ApiPath(drop_id): ApiPath<Uuid>,
) -> Result<Json<DrawJson>, ApiError> {
    let client = state.db.get().await?;
    let row = client
        .query_opt(
            "SELECT mode, draw_at, draw_seed, drawn_at, draw_entries, draw_entries_digest
             FROM drops WHERE id = $1",
            &[&drop_id],
        )
        .await?
        .ok_or_else(drop_not_found)?;
    let (Some(draw_at), Some(seed)) = (
        row.get::<_, Option<DateTime<Utc>>>("draw_at"),
        row.get::<_, Option<Vec<u8>>>("draw_seed"),
    ) else {
        return Err(not_a_draw());
    };
    let drawn_at: Option<DateTime<Utc>> = row.get("drawn_at");
    Ok(Json(DrawJson {
        drop_id,
        draw_at,
        commitment: commitment(&seed),
        seed: drawn_at.map(|_| hex::encode(&seed)),
        entries: row.get("draw_entries"),
        entries_digest: row.get("draw_entries_digest"),
        drawn_at,
    }))
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
#[schema(as = RankedEntry)]
pub(crate) struct RankedJson {
    rank: i32,
    entry_id: Uuid,
}

/// The draw's ranking, rank 1 first (public, after the draw; paged).
#[utoipa::path(get, path = "/api/v1/drops/{id}/draw/ranking", tag = "drops",
    params(("id" = Uuid, Path, description = "The draw drop"), crate::pagination::PageParams),
    responses((status = 200, description = "A page of the ranking", body = Page<RankedJson>),
        (status = 404, description = "`drop_not_found`", body = crate::error::ErrorBody),
        (status = 409, description = "`not_drawn` (before the draw), `not_a_draw`", body = crate::error::ErrorBody)))]
pub(crate) async fn get_ranking(
    State(state): State<AppState>,
    ApiPath(drop_id): ApiPath<Uuid>,
    ApiQuery(page): ApiQuery<PageQuery>,
) -> Result<Json<Page<RankedJson>>, ApiError> {
    let limit = page.limit()?;
    let after: i32 = page.after()?.unwrap_or(0);
    let client = state.db.get().await?;
    let row = client
        .query_opt(
            "SELECT mode, drawn_at FROM drops WHERE id = $1",
            &[&drop_id],
        )
        .await?
        .ok_or_else(drop_not_found)?;
    if row.get::<_, String>("mode") != "draw" {
        return Err(not_a_draw());
    }
    if row.get::<_, Option<DateTime<Utc>>>("drawn_at").is_none() {
        return Err(ApiError::conflict(
            "not_drawn",
            "the draw has not happened yet",
        ));
    }
    let rows = client
        .query(
            "SELECT rank, id FROM drop_entries WHERE drop_id = $1 AND rank > $2 ORDER BY rank LIMIT $3",
            &[&drop_id, &after, &(limit + 1)],
        )
        .await?;
    let items = rows
        .iter()
        .map(|row| RankedJson {
            rank: row.get("rank"),
            entry_id: row.get("id"),
        })
        .collect();
    Ok(Json(Page::from_rows(items, limit, |item| item.rank)))
}

/// Runs the draw task until shutdown: every `DRAW_TICK`, `tick`.
pub async fn draw_forever(state: AppState) {
    let mut ticker = tokio::time::interval(DRAW_TICK);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let stopped = state.live.stopped();
    tokio::pin!(stopped);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            () = &mut stopped => return,
        }
        if let Err(err) = tick(&state).await {
            tracing::warn!(code = err.code(), "draw pass failed");
        }
    }
}

/// One pass at the engine's time: draws every due draw, then allocates holds down every drawn ranking.
pub async fn tick(state: &AppState) -> Result<(), ApiError> {
    let now = state.engine.now();
    draw_due(state, now).await?;
    allocate_all(state, now).await
}

/// Draws every draw drop whose `draw_at` has come; returns how many this call drew.
pub async fn draw_due(state: &AppState, now: DateTime<Utc>) -> Result<usize, ApiError> {
    let due: Vec<Uuid> = {
        let client = state.db.get().await?;
        client
            .query(
                "SELECT id FROM drops WHERE mode = 'draw' AND drawn_at IS NULL AND draw_at <= $1",
                &[&now],
            )
            .await?
            .iter()
            .map(|row| row.get("id"))
            .collect()
    };
    let mut drawn = 0;
    for drop in due {
        let mut client = state.db.get().await?;
        if draw_one(&mut client, drop, now).await? {
            drawn += 1;
        }
    }
    Ok(drawn)
}

/// A test hook: `DRAW_TEST_PAUSE_MS` makes every draw wait that long after its claim, inside its transaction, so a
/// test can SIGKILL the process mid-draw (tests/draw.rs). Unset in production; read once.
fn test_pause() -> Option<Duration> {
    static PAUSE: std::sync::OnceLock<Option<Duration>> = std::sync::OnceLock::new();
    *PAUSE.get_or_init(|| {
        std::env::var("DRAW_TEST_PAUSE_MS")
            .ok()
            .and_then(|ms| ms.parse().ok())
            .map(Duration::from_millis)
    })
}

/// Draws one drop if nobody has: the claim (`drawn_at IS NULL`), the ranks and what the draw reveals are one
/// transaction. Returns whether this call drew it.
pub async fn draw_one(
    client: &mut deadpool_postgres::Object,
    drop: Uuid,
    now: DateTime<Utc>,
) -> Result<bool, ApiError> {
    let tx = client.transaction().await?;
    let Some(claimed) = tx
        .query_opt(
            "UPDATE drops SET drawn_at = $2 WHERE id = $1 AND drawn_at IS NULL AND draw_at <= $2
             RETURNING draw_seed",
            &[&drop, &now],
        )
        .await?
    else {
        return Ok(false);
    };
    if let Some(pause) = test_pause() {
        // The crash test's window: this instance has claimed the draw in an open transaction and is killed here.
        tracing::warn!(%drop, ?pause, "draw claimed; pausing inside its transaction (DRAW_TEST_PAUSE_MS)");
        tokio::time::sleep(pause).await;
    }
    let seed: Vec<u8> = claimed.get("draw_seed");
    let ids: Vec<Uuid> = tx
        .query("SELECT id FROM drop_entries WHERE drop_id = $1", &[&drop])
        .await?
        .iter()
        .map(|row| row.get("id"))
        .collect();
    let ranked = ranking(&seed, &ids);
    let ranks: Vec<i32> = (1..=i32::try_from(ranked.len()).unwrap_or(i32::MAX)).collect();
    tx.execute(
        "UPDATE drop_entries e SET rank = r.rank, status = 'waitlisted'
         FROM UNNEST($1::uuid[], $2::int4[]) AS r (id, rank) WHERE e.id = r.id",
        &[&ranked, &ranks],
    )
    .await?;
    let count = i32::try_from(ids.len()).unwrap_or(i32::MAX);
    tx.execute(
        "UPDATE drops SET draw_entries = $2, draw_entries_digest = $3 WHERE id = $1",
        &[&drop, &count, &entries_digest(&ids)],
    )
    .await?;
    tx.commit().await?;
    tracing::info!(%drop, entries = count, "drew");
    Ok(true)
}

/// Allocates holds down the ranking of every drawn drop that still has waitlisted entries.
pub async fn allocate_all(state: &AppState, now: DateTime<Utc>) -> Result<(), ApiError> {
    let drops: Vec<Uuid> = {
        let client = state.db.get().await?;
        client
            .query(
                "SELECT id FROM drops
                 WHERE mode = 'draw' AND drawn_at IS NOT NULL AND draw_settled_at IS NULL",
                &[],
            )
            .await?
            .iter()
            .map(|row| row.get("id"))
            .collect()
    };
    for drop in drops {
        allocate(state, drop, now).await?;
    }
    Ok(())
}

/// What one allocation step did.
enum Step {
    /// Gave a hold, or passed over an entry that does not fit now; look further down.
    Next(i32),
    /// Nothing more to do on this drop this tick.
    Done,
}

/// Gives holds to waitlisted entries in rank order while units are available; settles the drop (waitlisted ->
/// `lost`) when it is sold out with nothing held, or closed, or nobody is waiting.
async fn allocate(state: &AppState, drop: Uuid, now: DateTime<Utc>) -> Result<(), ApiError> {
    let mut after = 0;
    loop {
        let info = state.engine.drop_info(drop).await?;
        let closed = info.spec.closes_at.is_some_and(|at| now >= at);
        if closed || (info.counts.available == 0 && info.counts.held == 0) {
            return settle(state, drop, now).await;
        }
        if info.counts.available == 0 {
            return Ok(());
        }
        match allocate_next(state, drop, after, now).await? {
            Step::Next(rank) => after = rank,
            Step::Done => return Ok(()),
        }
    }
}

/// Tries the first waitlisted entry ranked after `after`, under the drop's advisory lock (one allocator per drop
/// at a time, across instances) and the entry's row lock.
async fn allocate_next(
    state: &AppState,
    drop: Uuid,
    after: i32,
    now: DateTime<Utc>,
) -> Result<Step, ApiError> {
    let mut client = state.db.get().await?;
    let tx = client.transaction().await?;
    let locked: bool = tx
        .query_one(
            "SELECT pg_try_advisory_xact_lock(hashtextextended('draw:' || $1::uuid::text, 0))",
            &[&drop],
        )
        .await?
        .get(0);
    if !locked {
        return Ok(Step::Done);
    }
    let Some(entry) = tx
        .query_opt(
            "SELECT id, member_id, quantity, rank FROM drop_entries
             WHERE drop_id = $1 AND status = 'waitlisted' AND rank > $2 ORDER BY rank LIMIT 1 FOR UPDATE",
            &[&drop, &after],
        )
        .await?
    else {
        let waiting: i64 = tx
            .query_one(
                "SELECT count(*) FROM drop_entries WHERE drop_id = $1 AND status = 'waitlisted'",
                &[&drop],
            )
            .await?
            .get(0);
        tx.commit().await?;
        if waiting == 0 {
            settle(state, drop, now).await?;
        }
        return Ok(Step::Done);
    };
    let rank: i32 = entry.get("rank");
    let quantity = u32::try_from(entry.get::<_, i32>("quantity")).unwrap_or(0);
    let member: Uuid = entry.get("member_id");
    match state.engine.reserve_drawn(drop, member, quantity).await {
        Ok(hold) => {
            tx.execute(
                "UPDATE drop_entries SET status = 'won', reservation_id = $2 WHERE id = $1",
                &[&entry.get::<_, Uuid>("id"), &hold.id],
            )
            .await?;
            notify_members(&tx, Kind::DrawWon, &[member], about(drop)).await?;
            tx.commit().await?;
            Ok(Step::Next(rank))
        }
        // Too many units for what is left, or an unrecorded hold of this member (a crash after a reservation)
        // still counting against the limit: pass over it now; it is tried again on later ticks.
        Err(EngineError::SoldOut | EngineError::LimitExceeded | EngineError::InvalidQuantity) => {
            Ok(Step::Next(rank))
        }
        Err(EngineError::Closed) => Ok(Step::Done),
        Err(err) => Err(err.into()),
    }
}

/// What a draw's notifications are about: the drop.
fn about(drop: Uuid) -> About {
    About {
        drop_id: Some(drop),
        ..About::default()
    }
}

/// The waitlist loses: every waitlisted entry becomes `lost` (each told `draw_lost` in the same transaction), and
/// the drop needs no more allocation.
async fn settle(state: &AppState, drop: Uuid, now: DateTime<Utc>) -> Result<(), ApiError> {
    let mut client = state.db.get().await?;
    let tx = client.transaction().await?;
    let losers: Vec<Uuid> = tx
        .query(
            "UPDATE drop_entries SET status = 'lost' WHERE drop_id = $1 AND status = 'waitlisted'
             RETURNING member_id",
            &[&drop],
        )
        .await?
        .iter()
        .map(|row| row.get(0))
        .collect();
    notify_members(&tx, Kind::DrawLost, &losers, about(drop)).await?;
    tx.execute(
        "UPDATE drops SET draw_settled_at = $2 WHERE id = $1 AND draw_settled_at IS NULL",
        &[&drop, &now],
    )
    .await?;
    tx.commit().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hmac_matches_rfc_4231_case_2() {
        let mac = hmac_sha256(b"Jefe", b"what do ya want for nothing?");
        assert_eq!(
            hex::encode(mac),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn hmac_hashes_a_long_key_first() {
        // RFC 4231 case 6: a 131-byte key.
        let mac = hmac_sha256(
            &[0xaa; 131],
            b"Test Using Larger Than Block-Size Key - Hash Key First",
        );
        assert_eq!(
            hex::encode(mac),
            "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54"
        );
    }
}
