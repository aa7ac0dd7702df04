//! `Idempotency-Key` for POSTs that create holds and payments: a repeat with the same key from the same member
//! on the same route gets the first response (same status, same body), and a repeat that arrives while the
//! first is still running waits for it instead of running again.
//!
//! Only answers that did something are remembered. Refusals that change nothing and invite a retry (429, 5xx)
//! are not, so a client that retries with the same key after "overloaded" gets a real second attempt.
//!
//! With Redis (many instances), the records live there instead, so a retry that lands on another instance still
//! gets the first answer: a `SET NX` with a short TTL claims the key while the first request runs, the answer
//! replaces it with a TTL of a day, and a retry that finds the claim polls until the answer is there (or the
//! claim lapsed because its instance died, and then runs itself).

use std::future::Future;
use std::time::{Duration, Instant};

use axum::body::{to_bytes, Body};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use dashmap::mapref::entry::Entry;
use dashmap::DashMap;
use engine::gate::redis::RedisConn;
use tokio::sync::watch;
use uuid::Uuid;

use crate::error::ApiError;

/// The `Idempotency-Key` header of POSTs that create holds, payments, charges and orders.
#[derive(Debug, utoipa::IntoParams)]
#[into_params(parameter_in = Header)]
pub struct IdempotencyParams {
    /// Up to 128 characters; a repeat with the same key and member returns the first response.
    #[param(rename = "Idempotency-Key", max_length = 128)]
    pub idempotency_key: Option<String>,
}

/// Longest key accepted.
pub const KEY_CHARS_MAX: usize = 128;
/// How long a key's answer is remembered.
const ENTRY_TTL: Duration = Duration::from_secs(24 * 60 * 60);
/// Most keys remembered in process memory. At the cap, expired ones are swept; if none has expired, a request with
/// a new key is refused (503, retry later) rather than run without the protection of its key.
const ENTRIES_MAX: usize = 1_000_000;
/// Largest body remembered; drop and payment answers are a few hundred bytes.
const BODY_BYTES_MAX: usize = 64 * 1024;

#[derive(Debug, Clone)]
struct Stored {
    status: StatusCode,
    body: axum::body::Bytes,
    at: Instant,
}

#[derive(Debug)]
enum Slot {
    Running(watch::Receiver<Option<Stored>>),
    Done(Stored),
}

type Key = (Uuid, &'static str, String);

/// Remembered answers per (member, route, key): in this process, or in Redis when instances share it.
#[derive(Debug)]
pub struct IdempotencyStore {
    slots: DashMap<Key, Slot>,
    shared: Option<Shared>,
    /// Most keys kept in process memory (`ENTRIES_MAX` unless a test sets it).
    cap: usize,
}

impl Default for IdempotencyStore {
    fn default() -> Self {
        Self::with_cap(ENTRIES_MAX)
    }
}

/// The Redis side of the store.
#[derive(Debug)]
struct Shared {
    conn: RedisConn,
    prefix: String,
}

/// How long a claim on a key lasts while its request runs; a request outliving it may be run a second time by a
/// retry, so it is far above any request's time (the gate and payment calls are bounded well below it).
const CLAIM_TTL: Duration = Duration::from_secs(60);
/// How often a retry that found the key claimed looks again.
const CLAIM_POLL: Duration = Duration::from_millis(10);
/// Marker stored while the first request runs.
const RUNNING: &[u8] = b"running";

/// Reads and checks the header: absent is fine, present must be 1..=128 visible ASCII characters.
pub fn key_from(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(value) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    let key = value
        .to_str()
        .ok()
        .filter(|key| !key.is_empty() && key.len() <= KEY_CHARS_MAX)
        .ok_or_else(|| {
            ApiError::invalid(
                "Idempotency-Key",
                "must be 1 to 128 visible ASCII characters",
            )
        })?;
    Ok(Some(key.to_owned()))
}

/// The `Idempotency-Key` of a request, checked as `key_from` does, read from the headers in place (taking a whole
/// `HeaderMap` would copy it on every request).
#[derive(Debug)]
pub struct IdempotencyKey(pub Option<String>);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for IdempotencyKey {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _state: &S,
    ) -> Result<Self, ApiError> {
        key_from(&parts.headers).map(IdempotencyKey)
    }
}

/// Removes a `Running` slot if its request is dropped before finishing (client went away), so waiters and later
/// retries run the request themselves rather than wait forever.
struct RunningGuard<'a> {
    store: &'a IdempotencyStore,
    key: Option<Key>,
}

impl Drop for RunningGuard<'_> {
    fn drop(&mut self) {
        if let Some(key) = self.key.take() {
            self.store
                .slots
                .remove_if(&key, |_, slot| matches!(slot, Slot::Running(_)));
        }
    }
}

impl IdempotencyStore {
    /// A store in process memory holding at most `cap` keys.
    pub fn with_cap(cap: usize) -> Self {
        Self {
            slots: DashMap::new(),
            shared: None,
            cap,
        }
    }

    /// A store whose records live in Redis under `prefix`, shared by every instance on that Redis (each kept a
    /// day, so Redis bounds them).
    pub fn shared(conn: RedisConn, prefix: &str) -> Self {
        Self {
            shared: Some(Shared {
                conn,
                prefix: format!("{prefix}idem:"),
            }),
            ..Self::default()
        }
    }

    /// Runs `handler` once per key; repeats replay its answer.
    #[allow(
        clippy::too_many_lines,
        reason = "a key's claim, run, record and replay, each outcome beside the claim it answers"
    )]
    pub async fn run<F, Fut>(
        &self,
        member: Uuid,
        route: &'static str,
        key: Option<String>,
        handler: F,
    ) -> Response
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Response>,
    {
        let Some(key) = key else {
            return handler().await;
        };
        if let Some(shared) = &self.shared {
            return match shared.run(member, route, &key, handler).await {
                Ok(response) => response,
                Err(err) => {
                    tracing::warn!(error = %err, "idempotency store unreachable");
                    ApiError::unavailable("gate_unavailable", 1).into_response()
                }
            };
        }
        let key: Key = (member, route, key);
        if self.slots.len() >= self.cap && !self.slots.contains_key(&key) && !self.make_room() {
            return ApiError::unavailable("overloaded", 1).into_response();
        }
        let tx = loop {
            let waiting = match self.slots.entry(key.clone()) {
                Entry::Occupied(mut occupied) => match occupied.get() {
                    Slot::Done(stored) if stored.at.elapsed() < ENTRY_TTL => {
                        return replay(stored.clone());
                    }
                    Slot::Done(_) => {
                        let (tx, rx) = watch::channel(None);
                        occupied.insert(Slot::Running(rx));
                        break tx;
                    }
                    Slot::Running(rx) => rx.clone(),
                },
                Entry::Vacant(vacant) => {
                    let (tx, rx) = watch::channel(None);
                    vacant.insert(Slot::Running(rx));
                    break tx;
                }
            };
            let mut waiting = waiting;
            // Either the first request finishes (a value) or it was dropped (the channel closes): then look again.
            let finished = match waiting.wait_for(Option::is_some).await {
                Ok(stored) => stored.clone(),
                Err(_) => None,
            };
            if let Some(stored) = finished {
                return replay(stored);
            }
        };
        let mut guard = RunningGuard {
            store: self,
            key: Some(key.clone()),
        };
        let response = handler().await;
        let status = response.status();
        let remember = !(status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error());
        if !remember {
            // Dropping the guard frees the key; waiters see the channel close and run themselves.
            return response;
        }
        let (parts, body) = response.into_parts();
        let bytes = match to_bytes(body, BODY_BYTES_MAX).await {
            Ok(bytes) => bytes,
            Err(err) => {
                return ApiError::internal(anyhow::anyhow!("buffering response: {err}"))
                    .into_response()
            }
        };
        let stored = Stored {
            status,
            body: bytes.clone(),
            at: Instant::now(),
        };
        guard.key = None;
        self.slots.insert(key, Slot::Done(stored.clone()));
        let _ = tx.send(Some(stored));
        Response::from_parts(parts, Body::from(bytes))
    }

    /// Sweeps expired answers; whether there is room for one more key.
    fn make_room(&self) -> bool {
        self.slots.retain(
            |_, slot| !matches!(slot, Slot::Done(stored) if stored.at.elapsed() >= ENTRY_TTL),
        );
        self.slots.len() < self.cap
    }
}

impl Shared {
    async fn run<F, Fut>(
        &self,
        member: Uuid,
        route: &'static str,
        key: &str,
        handler: F,
    ) -> redis::RedisResult<Response>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Response>,
    {
        let redis_key = format!("{}{member}:{route}:{key}", self.prefix);
        let mut conn = self.conn.clone();
        let deadline = Instant::now() + CLAIM_TTL;
        loop {
            let claimed: Option<String> = redis::cmd("SET")
                .arg(&redis_key)
                .arg(RUNNING)
                .arg("NX")
                .arg("PX")
                .arg(millis(CLAIM_TTL))
                .query_async(&mut conn)
                .await?;
            if claimed.is_some() {
                break;
            }
            let found: Option<Vec<u8>> = redis::cmd("GET")
                .arg(&redis_key)
                .query_async(&mut conn)
                .await?;
            match found {
                Some(value) if value != RUNNING => {
                    if let Some(stored) = decode(&value) {
                        return Ok(replay(stored));
                    }
                }
                _ => {}
            }
            if Instant::now() >= deadline {
                return Err(redis::RedisError::from((
                    redis::ErrorKind::Client,
                    "timed out waiting for the first request with this key",
                )));
            }
            tokio::time::sleep(CLAIM_POLL).await;
        }
        let response = handler().await;
        let status = response.status();
        if status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error() {
            let _: () = redis::cmd("DEL")
                .arg(&redis_key)
                .query_async(&mut conn)
                .await?;
            return Ok(response);
        }
        let (parts, body) = response.into_parts();
        let bytes = match to_bytes(body, BODY_BYTES_MAX).await {
            Ok(bytes) => bytes,
            Err(err) => {
                return Ok(
                    ApiError::internal(anyhow::anyhow!("buffering response: {err}"))
                        .into_response(),
                )
            }
        };
        let mut value = Vec::with_capacity(3 + bytes.len());
        value.extend_from_slice(status.as_str().as_bytes());
        value.extend_from_slice(&bytes);
        let _: () = redis::cmd("SET")
            .arg(&redis_key)
            .arg(value)
            .arg("PX")
            .arg(millis(ENTRY_TTL))
            .query_async(&mut conn)
            .await?;
        Ok(Response::from_parts(parts, Body::from(bytes)))
    }
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// A stored answer: three status digits, then the body.
fn decode(value: &[u8]) -> Option<Stored> {
    let status = std::str::from_utf8(value.get(..3)?).ok()?.parse().ok()?;
    Some(Stored {
        status: StatusCode::from_u16(status).ok()?,
        body: axum::body::Bytes::copy_from_slice(value.get(3..)?),
        at: Instant::now(),
    })
}

fn replay(stored: Stored) -> Response {
    let mut response = (stored.status, stored.body).into_response();
    response.headers_mut().insert(
        axum::http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
        .headers_mut()
        .insert("idempotent-replayed", HeaderValue::from_static("true"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn created() -> Response {
        (StatusCode::CREATED, "{}").into_response()
    }

    #[tokio::test]
    async fn the_store_is_bounded_and_a_full_store_refuses_new_keys_but_replays_old_ones() {
        let store = IdempotencyStore::with_cap(2);
        let member = Uuid::now_v7();
        for key in ["a", "b"] {
            let response = store
                .run(member, "reserve", Some(key.into()), || async { created() })
                .await;
            assert_eq!(response.status(), StatusCode::CREATED);
        }
        let full = store
            .run(member, "reserve", Some("c".into()), || async { created() })
            .await;
        assert_eq!(full.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(full.headers().contains_key("retry-after"));
        let replayed = store
            .run(member, "reserve", Some("a".into()), || async {
                panic!("a replay runs nothing")
            })
            .await;
        assert_eq!(replayed.status(), StatusCode::CREATED);
        assert_eq!(replayed.headers()["idempotent-replayed"], "true");
        assert_eq!(store.slots.len(), 2);
    }
}
