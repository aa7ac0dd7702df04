//! `RedisRoom`: the waiting rooms of queue drops in Redis (`room.lua`), beside each drop's keys under its hash tag,
//! so every instance sees one queue and the script can read the drop's counters and members atomically with the
//! admission step (it works on Redis Cluster unchanged). The rules are `gate/room.rs`'s.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use dashmap::DashMap;
use parking_lot::Mutex;
use redis::{Script, Value};
use tokio::sync::oneshot;
use uuid::Uuid;

use super::codec::{array, int, malformed, member_hex, text, unavailable};
use super::conn::RedisConn;
use crate::core::Counts;
use crate::gate::room::{Place, Sighting, WaitingRoom};
use crate::gate::{GateResult, GateUnavailable};
use crate::types::{DropSpec, QueueCounts};

/// Below this, a pre-queue member's random key (2^52: every such integer is exact in a double score).
const PRE_QUEUE_KEYS: u64 = 1 << 52;

pub struct RedisRoom {
    inner: Arc<Calls>,
    /// Each drop's status reads waiting for the next `sighting` call.
    polls: DashMap<Uuid, Arc<Polls>>,
    /// How long a settled drop's room stays in Redis after an instance unloads it (the gate's `settled_ttl`).
    settled_ttl: Duration,
}

/// What a call of `room.lua` needs, shared with the tasks that make a drop's status reads.
struct Calls {
    conn: RedisConn,
    prefix: String,
    script: Script,
    timeout: Duration,
}

/// The most members one `sighting` call reads.
const SIGHTINGS_PER_CALL: usize = 128;

/// A drop's status reads waiting for a call, and whether a task is making calls for them: the first read that finds
/// none starts one, which takes whatever has queued, up to `SIGHTINGS_PER_CALL`, into each call until none is left.
/// No task waits while a drop has no reads.
#[derive(Default)]
struct Polls {
    state: Mutex<PollState>,
}

#[derive(Default)]
struct PollState {
    waiting: Vec<Poll>,
    calling: bool,
}

struct Poll {
    member: Uuid,
    now_ms: i64,
    reply: oneshot::Sender<GateResult<Option<Sighting>>>,
}

impl std::fmt::Debug for RedisRoom {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisRoom")
            .field("prefix", &self.inner.prefix)
            .finish_non_exhaustive()
    }
}

impl RedisRoom {
    pub(super) fn new(
        conn: RedisConn,
        prefix: &str,
        timeout: Duration,
        settled_ttl: Duration,
    ) -> Self {
        Self {
            inner: Arc::new(Calls {
                conn,
                prefix: prefix.to_owned(),
                script: Script::new(include_str!("room.lua")),
                timeout,
            }),
            polls: DashMap::new(),
            settled_ttl,
        }
    }
}

impl Calls {
    /// The room's keys of `drop`, in `room.lua`'s order: the gate's counters and members, then the room's own.
    fn keys(&self, drop: Uuid) -> [String; 6] {
        let base = format!("{}{{drop:{drop}}}", self.prefix);
        [
            format!("{base}:c"),
            format!("{base}:m"),
            format!("{base}:qw"),
            format!("{base}:qa"),
            format!("{base}:qs"),
            format!("{base}:qm"),
        ]
    }

    async fn call(&self, drop: Uuid, args: &[String]) -> GateResult<Value> {
        let mut invocation = self.script.prepare_invoke();
        for key in self.keys(drop) {
            invocation.key(key);
        }
        for arg in args {
            invocation.arg(arg);
        }
        let mut conn = self.conn.clone();
        match tokio::time::timeout(self.timeout, invocation.invoke_async(&mut conn)).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(err)) => Err(unavailable(err)),
            Err(_) => Err(GateUnavailable("redis call timed out".into())),
        }
    }

    /// What each of `members` would be told at `now_ms`, in order, from one call.
    async fn sightings(
        &self,
        drop: Uuid,
        opens_ms: i64,
        now_ms: i64,
        members: impl Iterator<Item = Uuid>,
    ) -> GateResult<Vec<Option<Sighting>>> {
        let mut args = vec![
            "sighting".to_owned(),
            now_ms.to_string(),
            opens_ms.to_string(),
        ];
        args.extend(members.map(member_hex));
        let asked = args.len() - 3;
        let mut reply = texts(self.call(drop, &args).await?)?.into_iter();
        let (Some(rate), Some(counters)) = (reply.next(), reply.next()) else {
            return Err(bad());
        };
        let admit_rate = rate_of(&rate)?;
        let counts = match texts(counters)?.as_slice() {
            // The drop's keys are gone: the gate's own read rebuilds them.
            [] => None,
            [stock, available, held, paid] => Some(Counts {
                stock: count_of(stock)?,
                available: count_of(available)?,
                held: count_of(held)?,
                paid: count_of(paid)?,
            }),
            _ => return Err(bad()),
        };
        let seen = reply
            .map(|place| match texts(place)?.as_slice() {
                [] => Ok(None),
                [kind, value] => Ok(Some(Sighting {
                    place: place_of(text(kind).ok_or_else(bad)?, text(value).ok_or_else(bad)?)?,
                    admit_rate,
                    counts,
                })),
                _ => Err(bad()),
            })
            .collect::<GateResult<Vec<_>>>()?;
        if seen.len() != asked {
            return Err(bad());
        }
        Ok(seen)
    }
}

/// Makes `polls`' calls until none is waiting; each call is made at the latest `now_ms` among the reads it carries
/// (none of them was answered before it began).
async fn make_sightings(calls: Arc<Calls>, polls: Arc<Polls>, drop: Uuid, opens_ms: i64) {
    loop {
        let batch: Vec<Poll> = {
            let mut state = polls.state.lock();
            // A read whose caller gave up (its client left, or it timed out behind a Redis that does not answer)
            // is not asked for.
            state.waiting.retain(|poll| !poll.reply.is_closed());
            if state.waiting.is_empty() {
                state.calling = false;
                return;
            }
            let take = state.waiting.len().min(SIGHTINGS_PER_CALL);
            state.waiting.drain(..take).collect()
        };
        let now_ms = batch
            .iter()
            .map(|poll| poll.now_ms)
            .max()
            .unwrap_or_default();
        let seen = calls
            .sightings(drop, opens_ms, now_ms, batch.iter().map(|poll| poll.member))
            .await;
        match seen {
            Ok(seen) => {
                for (poll, sighting) in batch.into_iter().zip(seen) {
                    let _ = poll.reply.send(Ok(sighting));
                }
            }
            Err(err) => {
                for poll in batch {
                    let _ = poll.reply.send(Err(err.clone()));
                }
            }
        }
    }
}

fn bad() -> GateUnavailable {
    malformed("waiting room")
}

/// A place as `room.lua` answers it: kind and value.
fn place_of(kind: &str, value: &str) -> GateResult<Place> {
    let number: i64 = value.parse().map_err(|_| bad())?;
    Ok(match kind {
        "w" => Place::Waiting {
            position: u64::try_from(number).ok(),
        },
        "a" | "u" => Place::Admitted {
            pass_expires_ms: number,
            used: kind == "u",
        },
        "x" => Place::Expired,
        _ => return Err(bad()),
    })
}

fn texts(reply: Value) -> GateResult<Vec<Value>> {
    array(reply).ok_or_else(bad)
}

/// The admission rate as `room.lua` answers it (a number in text).
fn rate_of(value: &Value) -> GateResult<f64> {
    text(value)
        .and_then(|rate| rate.parse().ok())
        .ok_or_else(bad)
}

/// A counter of the drop as `room.lua` answers it (HMGET's text).
fn count_of(value: &Value) -> GateResult<u32> {
    text(value)
        .and_then(|count| count.parse().ok())
        .ok_or_else(bad)
}

#[async_trait]
impl WaitingRoom for RedisRoom {
    async fn join(&self, drop: &DropSpec, member: Uuid, now_ms: i64) -> GateResult<(Place, bool)> {
        let (place, new, _) = self.join_rated(drop, member, now_ms).await?;
        Ok((place, new))
    }

    async fn join_rated(
        &self,
        drop: &DropSpec,
        member: Uuid,
        now_ms: i64,
    ) -> GateResult<(Place, bool, f64)> {
        let key = rand::random::<u64>() % PRE_QUEUE_KEYS;
        let reply = self
            .inner
            .call(
                drop.id,
                &[
                    "join".into(),
                    member_hex(member),
                    now_ms.to_string(),
                    drop.opens_at_ms().to_string(),
                    key.to_string(),
                ],
            )
            .await?;
        let reply = texts(reply)?;
        let [kind, value, new, rate] = reply.as_slice() else {
            return Err(bad());
        };
        let place = place_of(text(kind).ok_or_else(bad)?, text(value).ok_or_else(bad)?)?;
        Ok((place, int(new) == Some(1), rate_of(rate)?))
    }

    async fn place(&self, drop: &DropSpec, member: Uuid, now_ms: i64) -> GateResult<Option<Place>> {
        // The service reads places through `sighting`; this is the same read, without what it adds.
        Ok(self
            .sighting(drop, member, now_ms)
            .await?
            .map(|seen| seen.place))
    }

    async fn sighting(
        &self,
        drop: &DropSpec,
        member: Uuid,
        now_ms: i64,
    ) -> GateResult<Option<Sighting>> {
        let (reply, answer) = oneshot::channel();
        let polls = match self.polls.get(&drop.id) {
            Some(polls) => Arc::clone(&polls),
            None => Arc::clone(&self.polls.entry(drop.id).or_default()),
        };
        let start = {
            let mut state = polls.state.lock();
            state.waiting.push(Poll {
                member,
                now_ms,
                reply,
            });
            !std::mem::replace(&mut state.calling, true)
        };
        if start {
            // Its own task: a read given up by its client must not stop the calls the others wait on.
            tokio::spawn(make_sightings(
                Arc::clone(&self.inner),
                polls,
                drop.id,
                drop.opens_at_ms(),
            ));
        }
        // The calls ahead of this read's, and its own, each end within the call timeout.
        match tokio::time::timeout(self.inner.timeout * 2, answer).await {
            Ok(Ok(seen)) => seen,
            Ok(Err(_)) => Err(GateUnavailable("status read not answered".into())),
            Err(_) => Err(GateUnavailable("redis call timed out".into())),
        }
    }

    async fn tick(&self, drop: &DropSpec, now_ms: i64, _counts: Counts) -> GateResult<u64> {
        // The script reads the drop's counters itself, in the same atomic step as the admission.
        let Some(terms) = drop.queue.as_ref() else {
            return Ok(0);
        };
        let reply = self
            .inner
            .call(
                drop.id,
                &[
                    "tick".into(),
                    now_ms.to_string(),
                    (u64::from(terms.pass_seconds) * 1000).to_string(),
                    terms.admit_per_second.unwrap_or(0).to_string(),
                ],
            )
            .await?;
        int(&reply)
            .and_then(|admitted| u64::try_from(admitted).ok())
            .ok_or_else(bad)
    }

    async fn counts(&self, drop: &DropSpec, now_ms: i64) -> GateResult<QueueCounts> {
        let reply = self
            .inner
            .call(drop.id, &["counts".into(), now_ms.to_string()])
            .await?;
        let reply = texts(reply)?;
        let [waiting, admitted, rate] = reply.as_slice() else {
            return Err(bad());
        };
        Ok(QueueCounts {
            waiting: int(waiting)
                .and_then(|n| u64::try_from(n).ok())
                .ok_or_else(bad)?,
            admitted: int(admitted)
                .and_then(|n| u64::try_from(n).ok())
                .ok_or_else(bad)?,
            admit_rate: rate_of(rate)?,
        })
    }

    async fn unload(&self, drop: Uuid) {
        // Like the gate's own keys: the room of a settled drop leaves Redis after `settled_ttl`.
        let ttl_ms = u64::try_from(self.settled_ttl.as_millis()).unwrap_or(u64::MAX);
        let mut pipe = redis::pipe();
        for key in &self.inner.keys(drop)[2..] {
            pipe.cmd("PEXPIRE").arg(key).arg(ttl_ms).ignore();
        }
        self.polls.remove(&drop);
        let mut conn = self.inner.conn.clone();
        if let Err(err) = pipe.query_async::<()>(&mut conn).await {
            tracing::warn!(error = %err, %drop, "waiting room keys not set to expire");
        }
    }
}
