//! `RedisGate`: Redis is the stock authority, so any number of instances sell one drop.
//!
//! Every decision is one Lua script over the four keys of one drop (all under the hash tag `{drop:<id>}`, so the
//! scripts run unchanged on Redis Cluster; see `prelude.lua`). Reservations and transitions are batched per drop:
//! requests that arrive while a script call is in flight go together in the next call (no timer, so a lone request goes at
//! once), and one call answers each of them. A hold is recorded only as a record in a reserve entry of the drop's
//! stream; its id names that entry (`ids.rs`), so any instance finds any hold from its id, the stream in time order
//! is the expiry index the reaper walks, and the stream is the journal that `journal.rs` writes to Postgres through
//! a consumer group. Expiry follows Redis's clock (`TIME` and stream ids), one clock for every instance.
//!
//! Fail closed: every call is bounded by `call_timeout`; an error or a timeout answers `GateUnavailable`, never a
//! grant. When a script finds a drop's keys gone (Redis lost its data), the gate reloads the drop from Postgres
//! (paid purchases and live holds) before answering, so a unit paid in Postgres is never sold again.
//!
//! The files by role: this one is the gate itself (`RedisGate`, its shared state and the `Gate` methods);
//! `config.rs` its settings; `codec.rs` the scripts, a drop's key names and the codecs of what the scripts take and
//! answer; `lanes.rs` a drop's reservation batchers and deadlines; `moves.rs` its transition batchers; `notes.rs` the
//! wake-ups (one subscription per instance to the notes the scripts publish, and the sweeps that cover lost ones);
//! `rebuild.rs` loading a drop from Postgres and `reconcile`; `journal.rs` the stream to Postgres; `conn.rs` the
//! connection (one server or a cluster); `ids.rs` hold ids that name their stream entry.

mod codec;
mod config;
mod conn;
pub mod ids;
mod journal;
mod lanes;
mod moves;
mod notes;
mod rebuild;
mod room;

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use dashmap::DashMap;
use deadpool_postgres::Pool;
use parking_lot::Mutex;
use redis::Value;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use uuid::Uuid;

use codec::{array, drop_seq, int, parse_member, text, unavailable, Scripts, COUNTERS};
pub use codec::{drop_keys, reserve_script, DropKeys};
pub use config::{RedisGateConfig, RedisGateError};
pub use conn::RedisConn;
use ids::HoldRef;
use lanes::{run_lane, Lane, Request, NEVER};
use moves::{run_moves, Move};
pub use rebuild::Reconciled;

use super::{Gate, GateResult, GateUnavailable, Reaped, Restore};
use crate::core::{
    Counts, HoldState, HoldView, ReleaseReason, ReserveRejection, RestoreError, TransitionError,
};
use crate::types::DropSpec;
use crate::writer::WriterHandle;

struct Inner {
    conn: RedisConn,
    config: RedisGateConfig,
    db: Pool,
    scripts: Scripts,
    lanes: DashMap<Uuid, Arc<Lane>>,
    seqs: DashMap<u32, Uuid>,
    /// This instance's consumer name in every drop's journal group.
    consumer: String,
    /// The service's writer (`Gate::use_writer`): the journal writes through it, so every Postgres write of the
    /// engine goes through one group commit.
    writer: std::sync::OnceLock<WriterHandle>,
    stop: watch::Sender<bool>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    /// The origin of `local_ms`, the clock of the lanes' deadlines.
    started: std::time::Instant,
}

/// Redis as the stock authority; see the module documentation.
pub struct RedisGate {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for RedisGate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisGate")
            .field("drops", &self.inner.lanes.len())
            .field("consumer", &self.inner.consumer)
            .finish_non_exhaustive()
    }
}

impl RedisGate {
    /// Connects (lazily for a single server) and starts the note subscription and the backstop sweep. `db` is where
    /// lost Redis state is rebuilt from; the journal writes through the writer given to `use_writer`.
    pub async fn connect(config: RedisGateConfig, db: Pool) -> Result<Self, RedisGateError> {
        let conn = RedisConn::connect(&config.urls, config.cluster, config.call_timeout).await?;
        let (stop, _) = watch::channel(false);
        let inner = Arc::new(Inner {
            conn,
            db,
            scripts: Scripts::new(),
            lanes: DashMap::new(),
            seqs: DashMap::new(),
            consumer: format!("instance-{}", Uuid::now_v7().simple()),
            writer: std::sync::OnceLock::new(),
            stop,
            tasks: Mutex::new(Vec::new()),
            started: std::time::Instant::now(),
            config,
        });
        let backstop = tokio::spawn(notes::backstop(Arc::clone(&inner)));
        inner.tasks.lock().push(backstop);
        if inner.config.notes {
            let listener = tokio::spawn(notes::listen(Arc::clone(&inner)));
            inner.tasks.lock().push(listener);
        }
        Ok(Self { inner })
    }

    /// The connection, for tools that inspect or repair Redis state (reconcile, tests).
    pub fn connection(&self) -> RedisConn {
        self.inner.conn.clone()
    }

    /// Key names of a drop under this gate's prefix: counters, members, states, stream.
    pub fn keys_of(&self, drop: Uuid) -> DropKeys {
        drop_keys(&self.inner.config.key_prefix, drop)
    }
}

impl Inner {
    /// The writer the journal writes through.
    fn writer(&self) -> GateResult<&WriterHandle> {
        self.writer
            .get()
            .ok_or_else(|| GateUnavailable("no writer given to the Redis gate".into()))
    }

    /// Runs one Redis call under the call timeout; a failure or a timeout is `GateUnavailable`.
    async fn bounded<T>(
        &self,
        call: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> GateResult<T> {
        match tokio::time::timeout(self.config.call_timeout, call).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(err)) => Err(unavailable(err)),
            Err(_) => Err(GateUnavailable("redis call timed out".into())),
        }
    }

    fn lane(&self, drop: Uuid) -> Option<Arc<Lane>> {
        self.lanes.get(&drop).map(|lane| Arc::clone(&lane))
    }

    async fn transition(
        &self,
        drop: Uuid,
        hold: Uuid,
        op: &'static str,
        member: Option<Uuid>,
    ) -> GateResult<Result<HoldView, TransitionError>> {
        let Some(lane) = self.lane(drop) else {
            return Ok(Err(TransitionError::NotFound));
        };
        let Some(place) = HoldRef::from_id(hold).filter(|place| place.drop_seq == lane.seq) else {
            return Ok(Err(TransitionError::NotFound));
        };
        let result = self.move_one(&lane, Move { place, op, member }).await?;
        let released = match &result {
            Ok(view) => op != "read" && matches!(view.state, HoldState::Released(_)),
            Err(err) => *err == TransitionError::Expired,
        };
        if released {
            lane.sold_out.store(false, Ordering::Release);
        }
        Ok(result)
    }
}

#[async_trait]
impl Gate for RedisGate {
    #[allow(
        clippy::too_many_lines,
        reason = "one drop's load: its lane, batchers, journal and sold-out flag, set up in the order they depend on each other"
    )]
    async fn load(
        &self,
        drop: &DropSpec,
        restore: Restore,
    ) -> GateResult<Result<(), RestoreError>> {
        let inner = &self.inner;
        if inner.lanes.contains_key(&drop.id) {
            return Ok(Ok(()));
        }
        let seq = drop_seq(drop)?;
        let keys = drop_keys(&inner.config.key_prefix, drop.id);
        // A Redis that does not answer now does not keep the drop (or the process) from starting: the lane is
        // registered anyway, its requests are refused (503) while Redis is away, and the first script that runs
        // once it is back finds the drop's keys or loads them from Postgres.
        // Redis's paid and held units cover every unit Postgres has as paid (a purchase is committed while its hold
        // is `paying`, which counts as held), unless Redis lost data: then Postgres is the better record.
        let paid_in_postgres: u64 = restore
            .paid
            .iter()
            .map(|&(_, units)| u64::from(units))
            .sum();
        if let Ok(Some(counts)) = inner.read_counts(&keys).await {
            if u64::from(counts.paid) + u64::from(counts.held) < paid_in_postgres {
                tracing::warn!(drop = %drop.id, ?counts, paid_in_postgres, "Redis lost paid units; rebuilding the drop from Postgres");
                let mut conn = inner.conn.clone();
                inner
                    .bounded(
                        redis::cmd("DEL")
                            .arg(&keys[..])
                            .query_async::<()>(&mut conn),
                    )
                    .await?;
            }
        }
        let available = match inner.init(drop, &keys, restore).await {
            Ok(Err(err)) => return Ok(Err(err)),
            Ok(Ok(())) => {
                let mut conn = inner.conn.clone();
                inner
                    .bounded(
                        redis::cmd("HGET")
                            .arg(&keys[COUNTERS])
                            .arg("avail")
                            .query_async::<Option<i64>>(&mut conn),
                    )
                    .await
                    .ok()
                    .flatten()
            }
            Err(err) => {
                tracing::warn!(error = %err, drop = %drop.id, "Redis unavailable; the drop loads when it answers");
                None
            }
        };
        if let dashmap::Entry::Vacant(vacant) = inner.lanes.entry(drop.id) {
            let (requests, receiver) = mpsc::channel(inner.config.batch_max.max(1) * 8);
            let (moves, moves_receiver) = mpsc::channel(inner.config.batch_max.max(1) * 8);
            let lane = Arc::new(Lane {
                drop: drop.id,
                seq,
                hold_ms: i64::from(drop.hold_seconds) * 1000,
                keys,
                sold_out: AtomicBool::new(available == Some(0)),
                journal_behind_since_ms: AtomicI64::new(0),
                wake: tokio::sync::Notify::new(),
                // A first claim soon after loading: entries an instance that died before this one started left
                // pending were announced to nobody here.
                claim_at_ms: AtomicI64::new(inner.local_ms().saturating_add(
                    i64::try_from(inner.config.journal_claim_idle.as_millis()).unwrap_or(NEVER),
                )),
                reap_due_ms: AtomicI64::new(0),
                requests,
                moves,
                stop: watch::channel(false).0,
                tasks: Mutex::new(Vec::new()),
            });
            vacant.insert(Arc::clone(&lane));
            inner.seqs.insert(seq, drop.id);
            let receiver = Arc::new(tokio::sync::Mutex::new(receiver));
            let moves_receiver = Arc::new(tokio::sync::Mutex::new(moves_receiver));
            let mut tasks = lane.tasks.lock();
            for _ in 0..inner.config.calls_in_flight.max(1) {
                tasks.push(tokio::spawn(run_lane(
                    Arc::clone(inner),
                    Arc::clone(&lane),
                    Arc::clone(&receiver),
                )));
                tasks.push(tokio::spawn(run_moves(
                    Arc::clone(inner),
                    Arc::clone(&lane),
                    Arc::clone(&moves_receiver),
                )));
            }
            if inner.config.journal {
                tasks.push(tokio::spawn(journal::run(
                    Arc::clone(inner),
                    Arc::clone(&lane),
                )));
            }
        }
        Ok(Ok(()))
    }

    fn is_sold_out(&self, drop: Uuid) -> bool {
        self.inner
            .lanes
            .get(&drop)
            .is_some_and(|lane| lane.sold_out.load(Ordering::Acquire))
    }

    fn may_be_sold_out(&self, drop: Uuid) -> bool {
        self.is_sold_out(drop)
    }

    async fn reserve(
        &self,
        drop: Uuid,
        _hold: Uuid,
        member: Uuid,
        quantity: u32,
        _now_ms: i64,
    ) -> GateResult<Result<HoldView, ReserveRejection>> {
        let Some(lane) = self.inner.lane(drop) else {
            return Ok(Err(ReserveRejection::SoldOut));
        };
        if quantity == 0 || quantity > 9999 {
            return Ok(Err(ReserveRejection::InvalidQuantity));
        }
        let (reply, answer) = oneshot::channel();
        lane.requests
            .send(Request {
                member,
                quantity,
                reply,
            })
            .await
            .map_err(|_| GateUnavailable("the gate is shutting down".into()))?;
        // The batcher answers within one call timeout of the batch taking this request; a request that waited
        // behind a full queue gets the same bound again.
        match tokio::time::timeout(self.inner.config.call_timeout * 2, answer).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(GateUnavailable("the gate is shutting down".into())),
            Err(_) => Err(GateUnavailable("reservation timed out".into())),
        }
    }

    async fn locate(&self, hold: Uuid) -> GateResult<Option<Uuid>> {
        let Some(place) = HoldRef::from_id(hold) else {
            return Ok(None);
        };
        if let Some(drop) = self.inner.seqs.get(&place.drop_seq) {
            return Ok(Some(*drop));
        }
        // Another instance loaded this drop; it registered the drop's seq when it did.
        let mut conn = self.inner.conn.clone();
        let drop: Option<String> = self
            .inner
            .bounded(
                redis::cmd("HGET")
                    .arg(format!("{}drop-seqs", self.inner.config.key_prefix))
                    .arg(place.drop_seq)
                    .query_async(&mut conn),
            )
            .await?;
        Ok(drop.and_then(|drop| Uuid::try_parse(&drop).ok()))
    }

    async fn begin_payment(
        &self,
        drop: Uuid,
        hold: Uuid,
        member: Uuid,
        _now_ms: i64,
    ) -> GateResult<Result<HoldView, TransitionError>> {
        let begun = self
            .inner
            .transition(drop, hold, "begin", Some(member))
            .await?;
        if begun.is_ok() {
            // Its lease's end, as the note will say; scheduled here too, so a lost note cannot leave a payment
            // this instance began unsettled past its lease.
            if let Some(lane) = self.inner.lane(drop) {
                lane.reap_by(self.inner.local_ms().saturating_add(
                    i64::try_from(self.inner.config.pay_lease.as_millis()).unwrap_or(i64::MAX),
                ));
            }
        }
        Ok(begun)
    }

    async fn complete_payment(
        &self,
        drop: Uuid,
        hold: Uuid,
    ) -> GateResult<Result<HoldView, TransitionError>> {
        self.inner.transition(drop, hold, "complete", None).await
    }

    async fn abort_payment(
        &self,
        drop: Uuid,
        hold: Uuid,
    ) -> GateResult<Result<HoldView, TransitionError>> {
        self.inner.transition(drop, hold, "abort", None).await
    }

    async fn decline_payment(
        &self,
        drop: Uuid,
        hold: Uuid,
    ) -> GateResult<Result<HoldView, TransitionError>> {
        self.inner.transition(drop, hold, "decline", None).await
    }

    async fn cancel(
        &self,
        drop: Uuid,
        hold: Uuid,
        member: Uuid,
    ) -> GateResult<Result<HoldView, TransitionError>> {
        self.inner
            .transition(drop, hold, "cancel", Some(member))
            .await
    }

    async fn release_fenced(
        &self,
        drop: Uuid,
        hold: Uuid,
    ) -> GateResult<Result<HoldView, TransitionError>> {
        self.inner.transition(drop, hold, "fence", None).await
    }

    #[allow(
        clippy::too_many_lines,
        reason = "one pass of the reap script over every lane, its answer decoded where it is used"
    )]
    async fn reap(&self, _now_ms: i64, out: &mut Reaped) -> GateResult<usize> {
        /// Reserve entries one script call visits, and calls per drop per pass: bounded work per pass.
        const ENTRIES_PER_CALL: i64 = 256;
        const CALLS_PER_PASS: usize = 16;
        // Only drops whose first expiry or lease end has come (as the last pass or a note said) cost a call.
        let now = self.inner.local_ms();
        let lanes: Vec<Arc<Lane>> = self
            .inner
            .lanes
            .iter()
            .filter(|lane| lane.reap_due_ms.load(Ordering::Acquire) <= now)
            .map(|lane| Arc::clone(&lane))
            .collect();
        let mut total = 0;
        for lane in lanes {
            // A failed call leaves the drop due, so the next pass tries again.
            let due_before = lane.reap_due_ms.swap(NEVER, Ordering::AcqRel);
            let mut stale = Vec::new();
            for call in 0..CALLS_PER_PASS {
                let mut invocation = self.inner.scripts.reap.prepare_invoke();
                for key in &lane.keys {
                    invocation.key(key);
                }
                invocation.arg(ENTRIES_PER_CALL);
                let mut conn = self.inner.conn.clone();
                let reply: Vec<Value> =
                    match self.inner.bounded(invocation.invoke_async(&mut conn)).await {
                        Ok(reply) => reply,
                        Err(err) => {
                            lane.reap_by(due_before);
                            return Err(err);
                        }
                    };
                let released = reply.first().and_then(int).unwrap_or(-1);
                if released < 0 {
                    // Lost data: the next reservation or transition reloads the drop; until then a pass each tick.
                    lane.reap_by(now);
                    break;
                }
                // Milliseconds until the drop's next expiry or lease end; more entries past the cursor are due now.
                let due_in = reply.get(3).and_then(int).unwrap_or(0);
                let visited = reply.get(1).and_then(int).unwrap_or(0);
                if visited >= ENTRIES_PER_CALL {
                    lane.reap_by(now);
                } else if due_in >= 0 {
                    lane.reap_by(self.inner.local_ms().saturating_add(due_in));
                }
                if call == 0 {
                    stale = reply
                        .get(2)
                        .cloned()
                        .and_then(array)
                        .unwrap_or_default()
                        .iter()
                        .filter_map(|place| {
                            text(place).and_then(|place| HoldRef::from_ref(lane.seq, place))
                        })
                        .collect();
                }
                for record in reply.get(4..).unwrap_or_default().chunks(3) {
                    let [place, member, quantity] = record else {
                        continue;
                    };
                    let Some(place) =
                        text(place).and_then(|place| HoldRef::from_ref(lane.seq, place))
                    else {
                        continue;
                    };
                    let created = i64::try_from(place.ms).unwrap_or(i64::MAX);
                    out.released.push((
                        lane.drop,
                        HoldView {
                            id: place.id(),
                            member: text(member).and_then(parse_member).unwrap_or_default(),
                            quantity: int(quantity)
                                .and_then(|q| u32::try_from(q).ok())
                                .unwrap_or(0),
                            state: HoldState::Released(ReleaseReason::Expired),
                            created_at_ms: created,
                            expires_at_ms: created.saturating_add(lane.hold_ms),
                        },
                    ));
                }
                if released > 0 {
                    lane.sold_out.store(false, Ordering::Release);
                }
                total += usize::try_from(released).unwrap_or(0);
                if visited < ENTRIES_PER_CALL {
                    break;
                }
            }
            // Payments whose lease ran out go to the service as they are now (still paying, unless they ended
            // since), for it to fence.
            for place in stale {
                if let Ok(hold) = self
                    .inner
                    .transition(lane.drop, place.id(), "read", None)
                    .await?
                {
                    if hold.state == HoldState::Paying {
                        out.lapsed.push((lane.drop, hold));
                    }
                }
            }
        }
        Ok(total)
    }

    async fn hold(&self, drop: Uuid, hold: Uuid) -> GateResult<Option<HoldView>> {
        Ok(self.inner.transition(drop, hold, "read", None).await?.ok())
    }

    async fn counts(&self, drop: Uuid) -> GateResult<Option<Counts>> {
        let Some(lane) = self.inner.lane(drop) else {
            return Ok(None);
        };
        for _ in 0..2 {
            if let Some(counts) = self.inner.read_counts(&lane.keys).await? {
                debug_assert_eq!(
                    counts.available + counts.held + counts.paid,
                    counts.stock,
                    "conservation in Redis"
                );
                return Ok(Some(counts));
            }
            self.inner.reload(&lane).await?;
        }
        Err(GateUnavailable(
            "drop state vanished again after a reload".into(),
        ))
    }

    fn journals_holds(&self) -> bool {
        true
    }

    fn journal_lag(&self, now_ms: i64) -> Vec<(Uuid, std::time::Duration)> {
        if !self.inner.config.journal {
            return Vec::new();
        }
        self.inner
            .lanes
            .iter()
            .map(|lane| {
                let since = lane.journal_behind_since_ms.load(Ordering::Relaxed);
                let behind_ms = if since > 0 {
                    u64::try_from(now_ms.saturating_sub(since)).unwrap_or(0)
                } else {
                    0
                };
                (lane.drop, std::time::Duration::from_millis(behind_ms))
            })
            .collect()
    }

    fn use_writer(&self, writer: WriterHandle) {
        let _ = self.inner.writer.set(writer);
    }

    fn waiting_room(&self) -> Option<Arc<dyn crate::gate::room::WaitingRoom>> {
        let config = &self.inner.config;
        Some(Arc::new(room::RedisRoom::new(
            self.inner.conn.clone(),
            &config.key_prefix,
            config.call_timeout,
            config.settled_ttl,
        )))
    }

    async fn unload(&self, drop: Uuid) {
        let Some((_, lane)) = self.inner.lanes.remove(&drop) else {
            return;
        };
        self.inner.seqs.remove(&lane.seq);
        let _ = lane.stop.send(true);
        // Nothing about a settled drop changes any more; its keys leave Redis after `settled_ttl`, and any instance
        // that needs the drop again loads it from Postgres.
        let mut conn = self.inner.conn.clone();
        let ttl_ms = u64::try_from(self.inner.config.settled_ttl.as_millis()).unwrap_or(u64::MAX);
        let mut pipe = redis::pipe();
        for key in &lane.keys {
            pipe.cmd("PEXPIRE").arg(key).arg(ttl_ms).ignore();
        }
        if let Err(err) = self.inner.bounded(pipe.query_async::<()>(&mut conn)).await {
            tracing::warn!(error = %err, %drop, "could not set the expiry of a settled drop's keys");
        }
    }

    async fn shutdown(&self) {
        let mut tasks: Vec<JoinHandle<()>> = self.inner.tasks.lock().drain(..).collect();
        for lane in self.inner.lanes.iter() {
            let _ = lane.stop.send(true);
            tasks.extend(lane.tasks.lock().drain(..));
        }
        let _ = self.inner.stop.send(true);
        for task in tasks {
            let _ = task.await;
        }
    }
}
