//! Queue drops (API.md, "Launch modes", Queue): joining the waiting room, a member's place, and the admission pass.
//!
//! The room itself is the engine's (`engine::gate::room`: in memory on the embedded gate, in Redis under the drop's
//! hash tag otherwise); this file speaks HTTP for it and signs passes. A pass is `<expiry ms>.<mac>`, the mac the
//! first 16 bytes of HMAC-SHA256 over `<drop>.<member>.<expiry ms>` with a key derived from the service's JWT secret,
//! which every instance shares: any instance checks any pass with two hashes and no I/O, so the reservation path
//! stays hot. A pass names its member and drop, so it is worth nothing to anyone else.

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::{DateTime, Utc};
use engine::clock::to_datetime;
use engine::{QueueStatus, QueueTerms, Standing};
use serde::Serialize;
use uuid::Uuid;

use super::draw::hmac_sha256;
use super::CreateDrop;
use crate::auth::AuthMember;
use crate::error::{ApiError, Fields};
use crate::extract::ApiPath;
use crate::AppState;

/// The header a reservation of a queue drop carries its pass in.
pub const PASS_HEADER: &str = "admission-pass";
/// How long before `opens_at` a queue opens when the drop does not say.
const QUEUE_LEAD_SECONDS: i64 = 30 * 60;
const PASS_SECONDS_DEFAULT: i64 = 120;
const PASS_SECONDS_MAX: i64 = 3_600;
const ADMIT_PER_SECOND_MAX: i64 = 100_000;
/// Bytes of the HMAC a pass carries (128 bits).
const MAC_BYTES: usize = 16;

/// The queue terms of a create body, checked into `fields`: `Some` for a queue drop.
pub(super) fn check_terms(
    body: &CreateDrop,
    queue: bool,
    fields: &mut Fields,
) -> Option<QueueTerms> {
    let pass_seconds = body.pass_seconds.unwrap_or(PASS_SECONDS_DEFAULT);
    let queue_opens_at = body
        .queue_opens_at
        .unwrap_or(body.opens_at - chrono::Duration::seconds(QUEUE_LEAD_SECONDS));
    fields
        .check(
            queue_opens_at <= body.opens_at,
            "queue_opens_at",
            "must not be after opens_at",
        )
        .check(
            (1..=PASS_SECONDS_MAX).contains(&pass_seconds),
            "pass_seconds",
            "must be between 1 and 3600",
        )
        .check(
            body.admit_per_second
                .is_none_or(|rate| (1..=ADMIT_PER_SECOND_MAX).contains(&rate)),
            "admit_per_second",
            "must be between 1 and 100000",
        );
    if !queue {
        for (given, field) in [
            (body.queue_opens_at.is_some(), "queue_opens_at"),
            (body.pass_seconds.is_some(), "pass_seconds"),
            (body.admit_per_second.is_some(), "admit_per_second"),
        ] {
            fields.check(!given, field, "only a queue drop has it");
        }
        return None;
    }
    let to_u32 = |v: i64| u32::try_from(v).unwrap_or(u32::MAX);
    Some(QueueTerms {
        queue_opens_at,
        pass_seconds: to_u32(pass_seconds),
        admit_per_second: body.admit_per_second.map(to_u32),
    })
}

/// The key passes are signed with, derived from the service's secret (so it is never the JWT key itself); derived
/// once, at start (`AppInner::admission_key`).
pub fn pass_key(secret: &[u8]) -> [u8; 32] {
    hmac_sha256(secret, b"flashsale admission pass v1")
}

fn mac(key: &[u8; 32], drop: Uuid, member: Uuid, expires_ms: i64) -> [u8; MAC_BYTES] {
    let message = format!("{drop}.{member}.{expires_ms}");
    let full = hmac_sha256(key, message.as_bytes());
    let mut out = [0u8; MAC_BYTES];
    out.copy_from_slice(&full[..MAC_BYTES]);
    out
}

/// The pass of `member` for `drop`, valid until `expires_ms`.
pub fn sign_pass(key: &[u8; 32], drop: Uuid, member: Uuid, expires_ms: i64) -> String {
    let mac = mac(key, drop, member, expires_ms);
    format!("{expires_ms}.{}", hex::encode(mac))
}

/// Why a pass does not admit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PassRefused {
    /// Malformed, forged, or another member's or drop's.
    NotAdmitted,
    Expired,
}

impl From<PassRefused> for ApiError {
    fn from(refused: PassRefused) -> Self {
        match refused {
            PassRefused::NotAdmitted => ApiError::new(
                StatusCode::FORBIDDEN,
                "not_admitted",
                "this drop admits through its waiting room: join it (POST .../queue) and reserve with the \
                 Admission-Pass it gives you",
            ),
            PassRefused::Expired => ApiError::new(
                StatusCode::FORBIDDEN,
                "pass_expired",
                "your admission pass expired; join the queue again",
            ),
        }
    }
}

/// Checks `pass` for `member` and `drop` at `now_ms`, with no I/O.
pub fn check_pass(
    key: &[u8; 32],
    pass: &str,
    drop: Uuid,
    member: Uuid,
    now_ms: i64,
) -> Result<(), PassRefused> {
    let (expires, given) = pass.split_once('.').ok_or(PassRefused::NotAdmitted)?;
    let expires_ms: i64 = expires.parse().map_err(|_| PassRefused::NotAdmitted)?;
    let mut given_mac = [0u8; MAC_BYTES];
    hex::decode_to_slice(given, &mut given_mac).map_err(|_| PassRefused::NotAdmitted)?;
    let expected = mac(key, drop, member, expires_ms);
    // Constant time: every byte is compared whatever the first difference.
    let differs = expected
        .iter()
        .zip(given_mac)
        .fold(0u8, |acc, (a, b)| acc | (a ^ b));
    if differs != 0 {
        return Err(PassRefused::NotAdmitted);
    }
    if expires_ms <= now_ms {
        return Err(PassRefused::Expired);
    }
    Ok(())
}

/// The pass a reservation request carries, if any (not UTF-8: treated as a wrong pass).
pub fn pass_of(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(PASS_HEADER)
        .map(|value| value.to_str().unwrap_or(""))
}

/// A member's place in a queue drop's waiting room.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[schema(as = QueuePlace)]
pub struct QueueJson {
    drop_id: Uuid,
    /// `waiting`, `admitted`, `sold_out`, `closed` or `expired`.
    #[schema(example = "waiting")]
    status: &'static str,
    /// 1-based among those still waiting; null in the pre-queue (before `opens_at`) and when not waiting.
    position: Option<u64>,
    /// People ahead; null where `position` is.
    ahead: Option<u64>,
    /// From the measured admission rate; null while nothing is available (only held units could come back) or
    /// before any admission was measured.
    eta_seconds: Option<u64>,
    /// The admission pass (send it as `Admission-Pass` when reserving); null unless admitted.
    pass: Option<String>,
    pass_expires_at: Option<DateTime<Utc>>,
}

impl QueueJson {
    fn of(state: &AppState, drop: Uuid, member: Uuid, standing: Standing) -> Self {
        let admitted = standing.status == QueueStatus::Admitted;
        let pass_expires_ms = standing.pass_expires_ms.filter(|_| admitted);
        Self {
            drop_id: drop,
            status: standing.status.as_str(),
            position: standing.position,
            ahead: standing.ahead,
            eta_seconds: standing.eta_seconds,
            pass: pass_expires_ms
                .map(|expires| sign_pass(&state.admission_key, drop, member, expires)),
            pass_expires_at: pass_expires_ms.map(to_datetime),
        }
    }
}

/// Joins the drop's waiting room: 201 with a new place, 200 with the same place when joining again.
#[utoipa::path(post, path = "/api/v1/drops/{id}/queue", tag = "drops", security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "A queue drop")),
    responses((status = 201, description = "Joined: the new place", body = QueueJson),
        (status = 200, description = "Already in the queue: the same place", body = QueueJson),
        (status = 404, description = "`drop_not_found`", body = crate::error::ErrorBody),
        (status = 409, description = "`not_open` (before `queue_opens_at`), `closed` (from `closes_at` on), \
`sold_out` (nothing available or held), `not_a_queue`", body = crate::error::ErrorBody)))]
pub async fn join(
    State(state): State<AppState>,
    member: AuthMember,
    ApiPath(drop): ApiPath<Uuid>,
) -> Result<Response, ApiError> {
    let (standing, new) = state.engine.queue_join(drop, member.id).await?;
    let status = if new {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((
        status,
        Json(QueueJson::of(&state, drop, member.id, standing)),
    )
        .into_response())
}

/// My place in the drop's waiting room.
#[utoipa::path(get, path = "/api/v1/drops/{id}/queue/me", tag = "drops", security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "A queue drop")),
    responses((status = 200, description = "My place", body = QueueJson),
        (status = 404, description = "`drop_not_found`, `not_in_queue`", body = crate::error::ErrorBody),
        (status = 409, description = "`not_a_queue`", body = crate::error::ErrorBody)))]
pub async fn my_place(
    State(state): State<AppState>,
    member: AuthMember,
    ApiPath(drop): ApiPath<Uuid>,
) -> Result<Json<QueueJson>, ApiError> {
    let standing = state
        .engine
        .queue_standing(drop, member.id)
        .await?
        .ok_or_else(|| {
            ApiError::not_found("not_in_queue")
                .with_message("you have not joined this drop's queue")
        })?;
    Ok(Json(QueueJson::of(&state, drop, member.id, standing)))
}

/// A queue drop's waiting room in the drop body and its event stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct QueueCountsJson {
    /// Members waiting (the pre-queue included).
    waiting: u64,
    /// Admitted members whose pass is valid and who have not reserved yet.
    admitted: u64,
}

impl From<engine::QueueCounts> for QueueCountsJson {
    fn from(counts: engine::QueueCounts) -> Self {
        Self {
            waiting: counts.waiting,
            admitted: counts.admitted,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pass_admits_its_member_at_its_drop_until_it_expires_and_nobody_else() {
        let state = &pass_key(b"a test secret");
        let (drop, member) = (Uuid::now_v7(), Uuid::now_v7());
        let pass = sign_pass(state, drop, member, 10_000);
        assert_eq!(check_pass(state, &pass, drop, member, 9_999), Ok(()));
        assert_eq!(
            check_pass(state, &pass, drop, member, 10_000),
            Err(PassRefused::Expired)
        );
        let refused = Err(PassRefused::NotAdmitted);
        assert_eq!(check_pass(state, &pass, drop, Uuid::now_v7(), 0), refused);
        assert_eq!(check_pass(state, &pass, Uuid::now_v7(), member, 0), refused);
        // A later expiry with the old mac, a flipped mac digit, garbage.
        let forged = pass.replacen("10000.", "20000.", 1);
        assert_eq!(check_pass(state, &forged, drop, member, 0), refused);
        let mut flipped = pass.clone().into_bytes();
        let last = flipped.len() - 1;
        flipped[last] = if flipped[last] == b'0' { b'1' } else { b'0' };
        let flipped = String::from_utf8(flipped).unwrap();
        assert_eq!(check_pass(state, &flipped, drop, member, 0), refused);
        for junk in ["", ".", "abc", "10000.zz", "10000"] {
            assert_eq!(check_pass(state, junk, drop, member, 0), refused, "{junk}");
        }
    }
}
