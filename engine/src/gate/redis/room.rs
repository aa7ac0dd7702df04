//! `RedisRoom`: the waiting rooms of queue drops in Redis (`room.lua`), beside each drop's keys under its hash tag,
//! so every instance sees one queue and the script can read the drop's counters and members atomically with the
//! admission step (it works on Redis Cluster unchanged). The rules are `gate/room.rs`'s.

use std::future::Future;
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
use crate::gate::room::{Joining, Place, Sighting, WaitingRoom};
use crate::gate::{GateResult, GateUnavailable};
use crate::types::{DropSpec, QueueCounts};

/// Below this, a pre-queue member's random key (2^52: every such integer is exact in a double score).
const PRE_QUEUE_KEYS: u64 = 1 << 52;

/// A join's random key for the pre-queue (used if the join is made before the opening).
fn pre_queue_key() -> u64 {
    rand::random::<u64>() % PRE_QUEUE_KEYS
}

pub struct RedisRoom {
    inner: Arc<Calls>,
    /// Each drop's status reads waiting for the next `sighting` call.
    polls: DashMap<Uuid, Arc<Pending<Look>>>,
    /// Each drop's joins waiting for the next `joins` call.
    joins: DashMap<Uuid, Arc<Pending<Join>>>,
    /// How long a settled drop's room stays in Redis after an instance unloads it (the gate's `settled_ttl`).
    settled_ttl: Duration,
}

/// What a call of `room.lua` needs, shared with the tasks that make a drop's shared calls.
struct Calls {
    conn: RedisConn,
    prefix: String,
    script: Script,
    timeout: Duration,
}

/// The most requests one shared call carries.
const ASKS_PER_CALL: usize = 128;

/// A kind of request a drop's concurrent requests make in shared `room.lua` calls (status reads, joins): what one
/// asks, what it is answered, and the call that answers many at once, each as if asked alone.
trait Shared: Sized + Send + 'static {
    type Answer: Send + 'static;

    /// The answers to `asks`, in order, from one call made at `now_ms`.
    fn call(
        calls: &Calls,
        drop: Uuid,
        opens_ms: i64,
        now_ms: i64,
        asks: &[Self],
    ) -> impl Future<Output = GateResult<Vec<Self::Answer>>> + Send;
}

/// A status read: the member whose place is asked for.
struct Look(Uuid);

/// A join: the member, the random key that places them in the pre-queue if they join before the opening, and when
/// they joined (a call made after the opening still joins one made before it to the pre-queue).
struct Join {
    member: Uuid,
    key: u64,
    now_ms: i64,
}

/// A drop's requests of one kind waiting for a call, and whether a task is making calls for them: the first request
/// that finds none starts one, which takes whatever has queued, up to `ASKS_PER_CALL`, into each call until none is
/// left. No task waits while a drop has no requests of the kind.
struct Pending<T: Shared> {
    state: Mutex<PendingState<T>>,
}

impl<T: Shared> Default for Pending<T> {
    fn default() -> Self {
        Self {
            state: Mutex::new(PendingState {
                waiting: Vec::new(),
                calling: false,
            }),
        }
    }
}

struct PendingState<T: Shared> {
    waiting: Vec<Waiter<T>>,
    calling: bool,
}

struct Waiter<T: Shared> {
    ask: T,
    now_ms: i64,
    reply: oneshot::Sender<GateResult<T::Answer>>,
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
            joins: DashMap::new(),
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
}

impl Shared for Look {
    type Answer = Option<Sighting>;

    /// What each member would be told at `now_ms`.
    async fn call(
        calls: &Calls,
        drop: Uuid,
        opens_ms: i64,
        now_ms: i64,
        asks: &[Self],
    ) -> GateResult<Vec<Option<Sighting>>> {
        let mut args = vec![
            "sighting".to_owned(),
            now_ms.to_string(),
            opens_ms.to_string(),
        ];
        args.extend(asks.iter().map(|Look(member)| member_hex(*member)));
        let mut reply = texts(calls.call(drop, &args).await?)?.into_iter();
        let (Some(rate), Some(counters)) = (reply.next(), reply.next()) else {
            return Err(bad());
        };
        let admit_rate = rate_of(&rate)?;
        let counts = counts_of(counters)?;
        each_of(reply, asks.len(), |place| match place {
            [] => Ok(None),
            [kind, value] => Ok(Some(Sighting {
                place: place_of(kind, value)?,
                admit_rate,
                counts,
            })),
            _ => Err(bad()),
        })
    }
}

impl Shared for Join {
    /// `None` when the drop's keys are gone (no one joined; the gate's read rebuilds them).
    type Answer = Option<Joining>;

    /// Each member joined at the time of their join, if the drop is not sold out (`Counts::gone`) at `now_ms`, in
    /// the order asked.
    async fn call(
        calls: &Calls,
        drop: Uuid,
        opens_ms: i64,
        now_ms: i64,
        asks: &[Self],
    ) -> GateResult<Vec<Option<Joining>>> {
        let mut args = Vec::with_capacity(3 + 3 * asks.len());
        args.extend(["joins".to_owned(), now_ms.to_string(), opens_ms.to_string()]);
        for join in asks {
            args.push(member_hex(join.member));
            args.push(join.key.to_string());
            args.push(join.now_ms.to_string());
        }
        let mut reply = texts(calls.call(drop, &args).await?)?.into_iter();
        let Some(counters) = reply.next() else {
            return Ok(asks.iter().map(|_| None).collect());
        };
        let Some(counts) = counts_of(counters)? else {
            return Err(bad());
        };
        let Some(rate) = reply.next() else {
            return Ok(asks.iter().map(|_| Some(Joining::SoldOut)).collect());
        };
        let admit_rate = rate_of(&rate)?;
        each_of(reply, asks.len(), |joined| match joined {
            [kind, value, new] => Ok(Some(Joining::Placed {
                place: place_of(kind, value)?,
                new: int(new) == Some(1),
                admit_rate,
                counts,
            })),
            _ => Err(bad()),
        })
    }
}

/// The answers of a shared call for each of the `asked` requests, one list each in order, read by `answer`.
fn each_of<T>(
    reply: impl Iterator<Item = Value>,
    asked: usize,
    mut answer: impl FnMut(&[Value]) -> GateResult<T>,
) -> GateResult<Vec<T>> {
    let answers = reply
        .map(|one| answer(&texts(one)?))
        .collect::<GateResult<Vec<_>>>()?;
    if answers.len() != asked {
        return Err(bad());
    }
    Ok(answers)
}

/// Makes `pending`'s calls until none is waiting; each call is made at the latest `now_ms` among the requests it
/// carries (none of them was answered before it began).
async fn make_calls<T: Shared>(
    calls: Arc<Calls>,
    pending: Arc<Pending<T>>,
    drop: Uuid,
    opens_ms: i64,
) {
    loop {
        let batch: Vec<Waiter<T>> = {
            let mut state = pending.state.lock();
            // A request whose caller gave up (its client left, or it timed out behind a Redis that does not
            // answer) is not asked for.
            state.waiting.retain(|waiter| !waiter.reply.is_closed());
            if state.waiting.is_empty() {
                state.calling = false;
                return;
            }
            let take = state.waiting.len().min(ASKS_PER_CALL);
            state.waiting.drain(..take).collect()
        };
        let now_ms = batch
            .iter()
            .map(|waiter| waiter.now_ms)
            .max()
            .unwrap_or_default();
        let (asks, replies): (Vec<T>, Vec<_>) = batch
            .into_iter()
            .map(|waiter| (waiter.ask, waiter.reply))
            .unzip();
        match T::call(&calls, drop, opens_ms, now_ms, &asks).await {
            Ok(answers) => {
                for (reply, answer) in replies.into_iter().zip(answers) {
                    let _ = reply.send(Ok(answer));
                }
            }
            Err(err) => {
                for reply in replies {
                    let _ = reply.send(Err(err.clone()));
                }
            }
        }
    }
}

impl RedisRoom {
    /// Asks `ask` of `drop` in a call shared with the drop's other requests of its kind waiting in `pending`.
    async fn shared<T: Shared>(
        &self,
        pending: &DashMap<Uuid, Arc<Pending<T>>>,
        drop: &DropSpec,
        ask: T,
        now_ms: i64,
    ) -> GateResult<T::Answer> {
        let (reply, answer) = oneshot::channel();
        let queue = match pending.get(&drop.id) {
            Some(queue) => Arc::clone(&queue),
            None => Arc::clone(&pending.entry(drop.id).or_default()),
        };
        let start = {
            let mut state = queue.state.lock();
            state.waiting.push(Waiter { ask, now_ms, reply });
            !std::mem::replace(&mut state.calling, true)
        };
        if start {
            // Its own task: a request given up by its client must not stop the calls the others wait on.
            tokio::spawn(make_calls(
                Arc::clone(&self.inner),
                queue,
                drop.id,
                drop.opens_at_ms(),
            ));
        }
        // The calls ahead of this request's, and its own, each end within the call timeout.
        match tokio::time::timeout(self.inner.timeout * 2, answer).await {
            Ok(Ok(answered)) => answered,
            Ok(Err(_)) => Err(GateUnavailable("room request not answered".into())),
            Err(_) => Err(GateUnavailable("redis call timed out".into())),
        }
    }
}

fn bad() -> GateUnavailable {
    malformed("waiting room")
}

/// A place as `room.lua` answers it: kind and value.
fn place_of(kind: &Value, value: &Value) -> GateResult<Place> {
    let kind = text(kind).ok_or_else(bad)?;
    let number: i64 = text(value)
        .and_then(|value| value.parse().ok())
        .ok_or_else(bad)?;
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

/// The drop's counters as `room.lua` answers them (stock, available, held, paid), or `None` when the drop's keys
/// are gone (an empty list).
fn counts_of(counters: Value) -> GateResult<Option<Counts>> {
    Ok(match texts(counters)?.as_slice() {
        [] => None,
        [stock, available, held, paid] => Some(Counts {
            stock: count_of(stock)?,
            available: count_of(available)?,
            held: count_of(held)?,
            paid: count_of(paid)?,
        }),
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
        let reply = self
            .inner
            .call(
                drop.id,
                &[
                    "join".into(),
                    member_hex(member),
                    now_ms.to_string(),
                    drop.opens_at_ms().to_string(),
                    pre_queue_key().to_string(),
                ],
            )
            .await?;
        let reply = texts(reply)?;
        let [kind, value, new, _rate] = reply.as_slice() else {
            return Err(bad());
        };
        Ok((place_of(kind, value)?, int(new) == Some(1)))
    }

    async fn join_counted(
        &self,
        drop: &DropSpec,
        member: Uuid,
        now_ms: i64,
    ) -> GateResult<Option<Joining>> {
        let join = Join {
            member,
            key: pre_queue_key(),
            now_ms,
        };
        self.shared(&self.joins, drop, join, now_ms).await
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
        self.shared(&self.polls, drop, Look(member), now_ms).await
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
        self.joins.remove(&drop);
        let mut conn = self.inner.conn.clone();
        if let Err(err) = pipe.query_async::<()>(&mut conn).await {
            tracing::warn!(error = %err, %drop, "waiting room keys not set to expire");
        }
    }
}
