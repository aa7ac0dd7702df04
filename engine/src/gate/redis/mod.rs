//! `RedisGate`: Redis is the stock authority, so any number of instances sell one drop.
//!
//! Every decision is one Lua script over the four keys of one drop (all under the hash tag `{drop:<id>}`, so the
//! scripts run unchanged on Redis Cluster; see `prelude.lua`). Reservations are batched per drop: requests that
//! arrive while a script call is in flight go together in the next call (no timer, so a lone request goes at
//! once), and one call answers each of them. A hold is recorded only as a record in a reserve entry of the drop's
//! stream; its id names that entry (`ids.rs`), so any instance finds any hold from its id, the stream in time order
//! is the expiry index the reaper walks, and the stream is the journal that `journal.rs` writes to Postgres through
//! a consumer group. Expiry follows Redis's clock (`TIME` and stream ids), one clock for every instance.
//!
//! Fail closed: every call is bounded by `call_timeout`; an error or a timeout answers `GateUnavailable`, never a
//! grant. When a script finds a drop's keys gone (Redis lost its data), the gate reloads the drop from Postgres
//! (paid purchases and live holds) before answering, so a unit paid in Postgres is never sold again.

mod conn;
pub mod ids;
mod journal;

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use dashmap::DashMap;
use deadpool_postgres::Pool;
use parking_lot::Mutex;
use redis::{Script, Value};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use uuid::Uuid;

pub use conn::RedisConn;
use ids::HoldRef;

use super::{Gate, GateResult, GateUnavailable, Reaped, Restore};
use crate::clock::to_datetime;
use crate::core::{
    Counts, HoldState, HoldView, ReleaseReason, ReserveRejection, RestoreError, TransitionError,
};
use crate::types::DropSpec;
use crate::writer::{self, WriterHandle};

const PRELUDE: &str = include_str!("prelude.lua");

/// Settings of the Redis gate.
#[derive(Debug, Clone)]
pub struct RedisGateConfig {
    /// One URL for a single server; several for the seed nodes of a Redis Cluster.
    pub urls: Vec<String>,
    /// Treat a single URL as a cluster seed.
    pub cluster: bool,
    /// Put in front of every key, so deployments (and tests) can share one Redis.
    pub key_prefix: String,
    /// Longest wait for one Redis call; past it the request is refused (503), never granted.
    pub call_timeout: Duration,
    /// Most reservations in one script call.
    pub batch_max: usize,
    /// Reserve script calls one drop may have in flight at once on this instance.
    pub calls_in_flight: usize,
    /// How long a `paying` hold belongs to the payment that began it; past it any instance's reaper fences the
    /// payment in Postgres and settles the hold (paid if its purchase is stored, else released and refunded).
    pub pay_lease: Duration,
    /// How often a sold-out drop's available units are read, to clear the local sold-out flag when stock returns.
    pub sold_out_poll: Duration,
    /// How long the journal waits when its stream had nothing new.
    pub journal_idle: Duration,
    /// A journal entry delivered to a consumer and not acknowledged for this long is claimed by another.
    pub journal_claim_idle: Duration,
    /// Most stream entries the journal writes in one go.
    pub journal_batch_max: usize,
    /// How long the keys of a drop whose sale is over stay in Redis after an instance unloads it.
    pub settled_ttl: Duration,
    /// Whether this instance runs the journal (reads the streams into Postgres). Every instance does by default;
    /// one that does not leaves the writing to the others (and a benchmark measures the gate alone).
    pub journal: bool,
}

impl RedisGateConfig {
    pub fn new(urls: Vec<String>) -> Self {
        Self {
            urls,
            cluster: false,
            key_prefix: "flashsale:".into(),
            call_timeout: Duration::from_millis(1000),
            batch_max: 512,
            calls_in_flight: 2,
            pay_lease: Duration::from_secs(120),
            sold_out_poll: Duration::from_millis(50),
            journal_idle: Duration::from_millis(20),
            journal_claim_idle: Duration::from_secs(5),
            journal_batch_max: 512,
            journal: true,
            settled_ttl: Duration::from_secs(7 * 24 * 60 * 60),
        }
    }
}

/// Why the gate could not set up.
#[derive(Debug, thiserror::Error)]
pub enum RedisGateError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
}

/// The scripts, loaded once per server and called by hash (EVALSHA, falling back to EVAL on NOSCRIPT).
struct Scripts {
    reserve: Script,
    transition: Script,
    reap: Script,
    init: Script,
}

/// The reserve script as the gate runs it, for tools and benchmarks that call it directly (one request per call is
/// the baseline the batched gate is measured against).
pub fn reserve_script() -> Script {
    Script::new(&format!("{PRELUDE}\n{}", include_str!("reserve.lua")))
}

impl Scripts {
    fn new() -> Self {
        let script = |body: &str| Script::new(&format!("{PRELUDE}\n{body}"));
        Self {
            reserve: script(include_str!("reserve.lua")),
            transition: script(include_str!("transition.lua")),
            reap: script(include_str!("reap.lua")),
            init: script(include_str!("init.lua")),
        }
    }
}

/// One drop as this instance serves it: its keys, its local sold-out flag and the queue of its reservation batcher.
struct Lane {
    drop: Uuid,
    seq: u32,
    hold_ms: i64,
    keys: DropKeys,
    sold_out: AtomicBool,
    /// When the oldest stream entry this instance's journal has read and not yet written was appended (Redis's
    /// clock, unix ms), or 0 when its last read found nothing new: how far the drop's journal is behind.
    journal_behind_since_ms: AtomicI64,
    requests: mpsc::Sender<Request>,
    /// Tells the lane's batchers and journal to stop (unload, shutdown); the journal writes out what it has first.
    stop: watch::Sender<bool>,
    /// The lane's batchers and journal, awaited at shutdown.
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

struct Request {
    member: Uuid,
    quantity: u32,
    reply: oneshot::Sender<GateResult<Result<HoldView, ReserveRejection>>>,
}

type Grant = Result<HoldView, ReserveRejection>;

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

fn unavailable(err: impl std::fmt::Display) -> GateUnavailable {
    GateUnavailable(err.to_string())
}

/// The keys of one drop, in the order the scripts take them (see `prelude.lua`).
pub type DropKeys = [String; 5];
/// Index in `DropKeys` of the counters hash.
const COUNTERS: usize = 0;
/// Index in `DropKeys` of the hold states hash.
const STATES: usize = 2;
/// Index in `DropKeys` of the stream.
const STREAM: usize = 3;

/// The key names of one drop under `prefix`, all with the hash tag `{drop:<id>}`: counters, members, states,
/// stream, payments in progress.
pub fn drop_keys(prefix: &str, drop: Uuid) -> DropKeys {
    let base = format!("{prefix}{{drop:{drop}}}");
    [
        format!("{base}:c"),
        format!("{base}:m"),
        format!("{base}:s"),
        format!("{base}:e"),
        format!("{base}:p"),
    ]
}

fn int(value: &Value) -> Option<i64> {
    match value {
        Value::Int(n) => Some(*n),
        Value::BulkString(bytes) => std::str::from_utf8(bytes).ok()?.parse().ok(),
        Value::SimpleString(text) => text.parse().ok(),
        _ => None,
    }
}

fn text(value: &Value) -> Option<&str> {
    match value {
        Value::BulkString(bytes) => std::str::from_utf8(bytes).ok(),
        Value::SimpleString(text) => Some(text),
        _ => None,
    }
}

fn array(value: Value) -> Option<Vec<Value>> {
    match value {
        Value::Array(items) => Some(items),
        _ => None,
    }
}

fn malformed(what: &str) -> GateUnavailable {
    GateUnavailable(format!("malformed reply from Redis ({what})"))
}

/// Bytes of one hold record in a reserve entry: the member's 32 hex digits and the quantity's 4 digits.
const RECORD_BYTES: usize = 36;

/// Writes a hold record into `out` and returns it.
fn write_record(out: &mut [u8; RECORD_BYTES], member: Uuid, quantity: u32) -> &[u8; RECORD_BYTES] {
    member.simple().encode_lower(&mut out[..32]);
    // Quantities are at most 9999 (the gate refuses larger ones before a script sees them).
    let mut q = quantity.min(9999);
    for digit in out[32..].iter_mut().rev() {
        *digit = b'0' + (q % 10) as u8;
        q /= 10;
    }
    out
}

fn member_hex(member: Uuid) -> String {
    member.simple().to_string()
}

fn parse_member(hex: &str) -> Option<Uuid> {
    Uuid::try_parse(hex).ok()
}

fn state_of(text: &str) -> HoldState {
    match text.as_bytes().first() {
        Some(b'p') => HoldState::Paying,
        Some(b'P') => HoldState::Paid,
        Some(b'x') => HoldState::Released(reason_of(text.get(2..).unwrap_or(""))),
        _ => HoldState::Held,
    }
}

fn reason_of(code: &str) -> ReleaseReason {
    match code {
        "c" => ReleaseReason::Cancelled,
        "d" => ReleaseReason::PaymentDeclined,
        _ => ReleaseReason::Expired,
    }
}

/// What a transition script answered.
enum Moved {
    Unloaded,
    Done(Result<HoldView, TransitionError>),
}

impl RedisGate {
    /// Connects (lazily for a single server) and starts the sold-out poller. `db` is where lost Redis state is
    /// rebuilt from; the journal writes through the writer given to `use_writer`.
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
            config,
        });
        let poller = tokio::spawn(poll_sold_out(Arc::clone(&inner)));
        inner.tasks.lock().push(poller);
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

    /// Rebuilds a drop's Redis state from Postgres, replacing whatever Redis holds for it: `reconcile`'s repair.
    /// Holds in Redis that Postgres does not have yet are lost, so this is for data that Redis already lost.
    pub async fn rebuild(&self, drop: &DropSpec) -> GateResult<Result<(), RestoreError>> {
        let keys = self.keys_of(drop.id);
        let mut conn = self.inner.conn.clone();
        self.inner
            .bounded(
                redis::cmd("DEL")
                    .arg(&keys[..])
                    .query_async::<()>(&mut conn),
            )
            .await?;
        let restore = self.inner.restore_from_db(drop.id).await?;
        self.inner.init(drop, &keys, restore).await
    }
}

/// What `reconcile` found for one drop, and did about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reconciled {
    /// Redis agrees with Postgres: its counters add up to the stock and every purchase is paid (or being paid) in
    /// Redis.
    Consistent(Counts),
    /// Redis had nothing of the drop; it was loaded from Postgres.
    Missing(Counts),
    /// Redis had lost data; the drop was rebuilt from Postgres.
    Rebuilt {
        /// Purchases in Postgres that Redis did not have as paid.
        lost_purchases: usize,
        /// Redis's counters before, when they did not add up to the drop's stock.
        broken_counts: Option<Counts>,
        after: Counts,
    },
}

impl RedisGate {
    /// Checks a drop's Redis state against Postgres and rebuilds it from Postgres where Redis lost data: keys gone,
    /// counters that do not add up, or a purchase Redis does not have as paid (the one loss that could sell a unit
    /// twice). Holds in Redis that Postgres does not have are lost by a rebuild; with data already lost, Postgres
    /// is the better record.
    pub async fn reconcile(&self, drop: &DropSpec) -> GateResult<Result<Reconciled, RestoreError>> {
        let keys = self.keys_of(drop.id);
        let Some(counts) = self.inner.read_counts(&keys).await? else {
            if let Err(err) = self.rebuild(drop).await? {
                return Ok(Err(err));
            }
            return Ok(Ok(Reconciled::Missing(self.counts_now(&keys).await?)));
        };
        let conserved = counts.stock == drop.stock
            && u64::from(counts.available) + u64::from(counts.held) + u64::from(counts.paid)
                == u64::from(drop.stock);
        let lost_purchases = self.inner.purchases_not_paid(drop, &keys).await?;
        if conserved && lost_purchases == 0 {
            return Ok(Ok(Reconciled::Consistent(counts)));
        }
        if let Err(err) = self.rebuild(drop).await? {
            return Ok(Err(err));
        }
        Ok(Ok(Reconciled::Rebuilt {
            lost_purchases,
            broken_counts: (!conserved).then_some(counts),
            after: self.counts_now(&keys).await?,
        }))
    }

    async fn counts_now(&self, keys: &DropKeys) -> GateResult<Counts> {
        self.inner
            .read_counts(keys)
            .await?
            .ok_or_else(|| GateUnavailable("drop state vanished right after a rebuild".into()))
    }
}

impl Inner {
    /// The counters of a drop in Redis, `None` when its keys are gone.
    async fn read_counts(&self, keys: &DropKeys) -> GateResult<Option<Counts>> {
        let mut conn = self.conn.clone();
        let values: Vec<Option<u32>> = self
            .bounded(
                redis::cmd("HMGET")
                    .arg(&keys[COUNTERS])
                    .arg(&["stock", "avail", "held", "paid"])
                    .query_async(&mut conn),
            )
            .await?;
        Ok(match values[..] {
            [Some(stock), Some(available), Some(held), Some(paid)] => Some(Counts {
                stock,
                available,
                held,
                paid,
            }),
            _ => None,
        })
    }

    /// How many of the drop's purchases in Postgres Redis has neither as paid nor as being paid.
    async fn purchases_not_paid(&self, drop: &DropSpec, keys: &DropKeys) -> GateResult<usize> {
        const CHUNK: usize = 1000;
        let seq = drop_seq(drop)?;
        let client = self.db.get().await.map_err(unavailable)?;
        let rows = client
            .query(
                "SELECT reservation_id FROM purchases WHERE drop_id = $1",
                &[&drop.id],
            )
            .await
            .map_err(unavailable)?;
        std::mem::drop(client);
        let refs: Vec<String> = rows
            .iter()
            .filter_map(|row| HoldRef::from_id(row.get(0)))
            .filter(|place| place.drop_seq == seq)
            .map(|place| place.state_ref())
            .collect();
        let mut lost = 0;
        for chunk in refs.chunks(CHUNK) {
            let mut pipe = redis::pipe();
            for state_ref in chunk {
                pipe.cmd("HGET").arg(&keys[STATES]).arg(state_ref);
            }
            let mut conn = self.conn.clone();
            let states: Vec<Option<String>> = self.bounded(pipe.query_async(&mut conn)).await?;
            lost += states
                .iter()
                .filter(|state| !state.as_deref().is_some_and(|s| s.starts_with(['P', 'p'])))
                .count();
        }
        Ok(lost)
    }

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

    /// The drop's state as Postgres has it (paid units per member, live holds).
    async fn restore_from_db(&self, drop: Uuid) -> GateResult<Restore> {
        let client = self.db.get().await.map_err(unavailable)?;
        let now = to_datetime(chrono::Utc::now().timestamp_millis());
        let mut restored = crate::store::restore(&**client, Some(drop), now)
            .await
            .map_err(unavailable)?;
        Ok(restored.remove(&drop).unwrap_or_default())
    }

    /// Loads a drop into Redis from `restore` unless Redis has it already. Live holds go back under their own
    /// entry ids; holds whose ids this gate did not make (an embedded gate's, from before a switch to Redis)
    /// cannot be found by their ids in Redis, so they are released as expired instead of stranding their units.
    async fn init(
        &self,
        drop: &DropSpec,
        keys: &DropKeys,
        restore: Restore,
    ) -> GateResult<Result<(), RestoreError>> {
        let seq = drop_seq(drop)?;
        let paid_total: u64 = restore
            .paid
            .iter()
            .map(|&(_, units)| u64::from(units))
            .sum();
        let held_total: u64 = restore.held.iter().map(|h| u64::from(h.quantity)).sum();
        if paid_total + held_total > u64::from(drop.stock) {
            return Ok(Err(RestoreError::Oversold {
                stock: drop.stock,
                committed: paid_total + held_total,
            }));
        }
        let mut entries: std::collections::BTreeMap<(u64, u64), Vec<(u32, String)>> =
            Default::default();
        let mut foreign = Vec::new();
        for hold in &restore.held {
            match HoldRef::from_id(hold.id).filter(|place| place.drop_seq == seq) {
                Some(place) if (1..=9999).contains(&hold.quantity) => {
                    let mut record = [0u8; RECORD_BYTES];
                    write_record(&mut record, hold.member, hold.quantity);
                    let record = String::from_utf8_lossy(&record).into_owned();
                    entries
                        .entry((place.ms, place.seq))
                        .or_default()
                        .push((place.index, record));
                }
                _ => foreign.push(*hold),
            }
        }
        let mut invocation = self.scripts.init.prepare_invoke();
        for key in keys {
            invocation.key(key);
        }
        invocation
            .arg(drop.stock)
            .arg(drop.per_member_limit)
            .arg(i64::from(drop.hold_seconds) * 1000)
            .arg(paid_total)
            .arg(restore.paid.len());
        for (member, units) in &restore.paid {
            invocation.arg(member_hex(*member)).arg(*units);
        }
        let paid_refs: Vec<String> = restore
            .paid_holds
            .iter()
            .filter_map(|id| HoldRef::from_id(*id).filter(|place| place.drop_seq == seq))
            .map(|place| place.state_ref())
            .collect();
        invocation.arg(paid_refs.len());
        for paid_ref in &paid_refs {
            invocation.arg(paid_ref);
        }
        for ((ms, entry_seq), mut records) in entries {
            records.sort_by_key(|(index, _)| *index);
            // Records keep their index in the entry; the gaps (holds since paid or released) are zero records.
            let mut value = String::new();
            let mut next = 0;
            for (index, record) in records {
                while next < index {
                    value.push_str(&"0".repeat(36));
                    next += 1;
                }
                value.push_str(&record);
                next = index + 1;
            }
            invocation.arg(format!("{ms}-{entry_seq}")).arg(value);
        }
        let mut conn = self.conn.clone();
        let loaded: i64 = self.bounded(invocation.invoke_async(&mut conn)).await?;
        // Any instance can then tell this drop from the seq in its hold ids (`locate`).
        self.bounded(
            redis::cmd("HSET")
                .arg(format!("{}drop-seqs", self.config.key_prefix))
                .arg(seq)
                .arg(drop.id.to_string())
                .query_async::<()>(&mut conn),
        )
        .await?;
        if loaded == 1 && !foreign.is_empty() {
            let now = chrono::Utc::now();
            let released = foreign
                .iter()
                .map(|hold| {
                    let row = writer::HoldRow {
                        id: hold.id,
                        drop_id: drop.id,
                        member_id: hold.member,
                        quantity: hold.quantity,
                        created_at: to_datetime(hold.created_at_ms),
                        expires_at: to_datetime(hold.expires_at_ms),
                    };
                    (row, ReleaseReason::Expired, now)
                })
                .collect();
            let stored = match self.writer() {
                Ok(writer) => writer
                    .journal(Vec::new(), released)
                    .await
                    .map_err(|err| err.to_string()),
                Err(err) => Err(err.to_string()),
            };
            if let Err(err) = stored {
                tracing::warn!(error = %err, drop = %drop.id, "holds of another gate not released in Postgres");
            }
        }
        if loaded == 1 {
            tracing::info!(drop = %drop.id, paid = paid_total, held = held_total, "drop loaded into Redis from Postgres");
        }
        Ok(Ok(()))
    }

    /// Loads a drop whose keys Redis lost, from Postgres.
    async fn reload(&self, lane: &Lane) -> GateResult<()> {
        let client = self.db.get().await.map_err(unavailable)?;
        let spec = crate::store::load_drop(&**client, lane.drop)
            .await
            .map_err(unavailable)?
            .ok_or_else(|| GateUnavailable(format!("drop {} is not in Postgres", lane.drop)))?;
        drop(client);
        tracing::warn!(drop = %lane.drop, "drop state missing in Redis; rebuilding it from Postgres");
        let restore = self.restore_from_db(lane.drop).await?;
        self.init(&spec, &lane.keys, restore)
            .await?
            .map_err(|err| GateUnavailable(format!("cannot rebuild drop {}: {err}", lane.drop)))
    }

    /// One reserve script call for a batch.
    async fn reserve_once(&self, lane: &Lane, batch: &[Request]) -> GateResult<Option<Vec<Grant>>> {
        let mut invocation = self.scripts.reserve.prepare_invoke();
        for key in &lane.keys {
            invocation.key(key);
        }
        let mut records = Vec::with_capacity(batch.len() * RECORD_BYTES);
        let mut record = [0u8; RECORD_BYTES];
        for request in batch {
            records.extend_from_slice(write_record(&mut record, request.member, request.quantity));
        }
        invocation.arg(records);
        let mut conn = self.conn.clone();
        let reply: Vec<Value> = self.bounded(invocation.invoke_async(&mut conn)).await?;
        let mut reply = reply.into_iter();
        let status = reply
            .next()
            .as_ref()
            .and_then(int)
            .ok_or_else(|| malformed("reserve"))?;
        if status == -1 {
            return Ok(None);
        }
        let entry = reply.next().ok_or_else(|| malformed("reserve entry"))?;
        let entry = text(&entry).unwrap_or("").to_owned();
        let available = reply
            .next()
            .as_ref()
            .and_then(int)
            .ok_or_else(|| malformed("reserve"))?;
        if available == 0 {
            lane.sold_out.store(true, Ordering::Release);
        }
        // Every grant of the call is a record of this one entry: parse its id once.
        let entry = match entry.as_str() {
            "" => None,
            id => Some(
                HoldRef::from_entry(lane.seq, id, 0)
                    .ok_or_else(|| malformed("reserve entry id"))?,
            ),
        };
        let outcomes = reply.next().ok_or_else(|| malformed("reserve outcomes"))?;
        let outcomes = text(&outcomes).ok_or_else(|| malformed("reserve outcomes"))?;
        // '' means every request was granted.
        let all_granted = vec![b'g'; if outcomes.is_empty() { batch.len() } else { 0 }];
        let outcomes = if outcomes.is_empty() {
            &all_granted[..]
        } else {
            outcomes.as_bytes()
        };
        if outcomes.len() != batch.len() {
            return Err(malformed("reserve outcome count"));
        }
        let mut grants = Vec::with_capacity(batch.len());
        let mut index = 0;
        for (request, &outcome) in batch.iter().zip(outcomes) {
            grants.push(match outcome {
                b'g' => {
                    let place = entry
                        .filter(|_| index <= ids::INDEX_MAX)
                        .map(|entry| HoldRef { index, ..entry })
                        .ok_or_else(|| malformed("reserve grant"))?;
                    index += 1;
                    let created = i64::try_from(place.ms).unwrap_or(i64::MAX);
                    Ok(HoldView {
                        id: place.id(),
                        member: request.member,
                        quantity: request.quantity,
                        state: HoldState::Held,
                        created_at_ms: created,
                        expires_at_ms: created.saturating_add(lane.hold_ms),
                    })
                }
                b'l' => Err(ReserveRejection::LimitExceeded),
                _ => Err(ReserveRejection::SoldOut),
            });
        }
        Ok(Some(grants))
    }

    async fn reserve_batch(&self, lane: &Lane, batch: &[Request]) -> GateResult<Vec<Grant>> {
        if let Some(grants) = self.reserve_once(lane, batch).await? {
            return Ok(grants);
        }
        self.reload(lane).await?;
        self.reserve_once(lane, batch)
            .await?
            .ok_or_else(|| GateUnavailable("drop state vanished again after a reload".into()))
    }

    /// One transition script call on the hold `place` of `lane`.
    async fn transition_once(
        &self,
        lane: &Lane,
        place: &HoldRef,
        op: &str,
        member: Option<Uuid>,
    ) -> GateResult<Moved> {
        let mut invocation = self.scripts.transition.prepare_invoke();
        for key in &lane.keys {
            invocation.key(key);
        }
        invocation
            .arg(place.entry())
            .arg(place.index)
            .arg(op)
            .arg(member.map(member_hex).unwrap_or_default())
            .arg(u64::try_from(self.config.pay_lease.as_millis()).unwrap_or(u64::MAX));
        let mut conn = self.conn.clone();
        let reply: Vec<Value> = self.bounded(invocation.invoke_async(&mut conn)).await?;
        let code = reply
            .first()
            .and_then(int)
            .ok_or_else(|| malformed("transition"))?;
        if code == -1 {
            return Ok(Moved::Unloaded);
        }
        if code == 1 {
            return Ok(Moved::Done(Err(TransitionError::NotFound)));
        }
        let field = |index: usize| reply.get(index).ok_or_else(|| malformed("transition view"));
        let member = text(field(1)?)
            .and_then(parse_member)
            .ok_or_else(|| malformed("member"))?;
        let quantity = int(field(2)?)
            .and_then(|q| u32::try_from(q).ok())
            .ok_or_else(|| malformed("quantity"))?;
        let created_at_ms = int(field(3)?).ok_or_else(|| malformed("created"))?;
        let expires_at_ms = int(field(4)?).ok_or_else(|| malformed("expires"))?;
        let state = state_of(text(field(5)?).unwrap_or("h"));
        let view = HoldView {
            id: place.id(),
            member,
            quantity,
            state,
            created_at_ms,
            expires_at_ms,
        };
        Ok(Moved::Done(match code {
            0 => Ok(view),
            2 => Err(TransitionError::NotOwner),
            3 => Err(TransitionError::Expired),
            4 => Err(TransitionError::AlreadyReleased(match state {
                HoldState::Released(reason) => reason,
                _ => ReleaseReason::Expired,
            })),
            5 => Err(TransitionError::AlreadyPaid),
            6 => Err(TransitionError::PaymentInFlight),
            _ => Err(TransitionError::NotPaying),
        }))
    }

    async fn transition(
        &self,
        drop: Uuid,
        hold: Uuid,
        op: &str,
        member: Option<Uuid>,
    ) -> GateResult<Result<HoldView, TransitionError>> {
        let Some(lane) = self.lane(drop) else {
            return Ok(Err(TransitionError::NotFound));
        };
        let Some(place) = HoldRef::from_id(hold).filter(|place| place.drop_seq == lane.seq) else {
            return Ok(Err(TransitionError::NotFound));
        };
        let moved = match self.transition_once(&lane, &place, op, member).await? {
            Moved::Unloaded => {
                self.reload(&lane).await?;
                self.transition_once(&lane, &place, op, member).await?
            }
            moved => moved,
        };
        let Moved::Done(result) = moved else {
            return Err(GateUnavailable(
                "drop state vanished again after a reload".into(),
            ));
        };
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

/// A drop's `seq`, which hold ids carry in 32 bits.
fn drop_seq(drop: &DropSpec) -> GateResult<u32> {
    u32::try_from(drop.seq)
        .map_err(|_| GateUnavailable(format!("drop seq {} does not fit a hold id", drop.seq)))
}

/// One of a drop's `calls_in_flight` batchers: takes whatever queued while the other calls were in flight (up to
/// `batch_max`), makes one script call for it and answers each request. With more than one batcher, one gathers the
/// next batch while another's call runs, so Redis and this process work at the same time instead of in turn; the
/// scripts are atomic, so the calls need no order between them.
async fn run_lane(
    inner: Arc<Inner>,
    lane: Arc<Lane>,
    requests: Arc<tokio::sync::Mutex<mpsc::Receiver<Request>>>,
) {
    let mut stop = lane.stop.subscribe();
    let batch_max = inner.config.batch_max.clamp(1, ids::INDEX_MAX as usize + 1);
    let mut batch: Vec<Request> = Vec::with_capacity(batch_max);
    loop {
        {
            let mut requests = tokio::select! {
                requests = requests.lock() => requests,
                _ = stop.wait_for(|stop| *stop) => return,
            };
            let first = tokio::select! {
                request = requests.recv() => match request {
                    Some(request) => request,
                    None => return,
                },
                _ = stop.wait_for(|stop| *stop) => return,
            };
            batch.push(first);
            while batch.len() < batch_max {
                match requests.try_recv() {
                    Ok(request) => batch.push(request),
                    Err(_) => break,
                }
            }
        }
        match inner.reserve_batch(&lane, &batch).await {
            Ok(grants) => {
                for (request, grant) in batch.drain(..).zip(grants) {
                    let _ = request.reply.send(Ok(grant));
                }
            }
            Err(err) => {
                for request in batch.drain(..) {
                    let _ = request.reply.send(Err(err.clone()));
                }
            }
        }
    }
}

/// Clears the local sold-out flags of drops whose stock came back (released on another instance), within
/// `sold_out_poll` plus one Redis round trip.
async fn poll_sold_out(inner: Arc<Inner>) {
    let mut stop = inner.stop.subscribe();
    let mut ticker = tokio::time::interval(inner.config.sold_out_poll);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = stop.wait_for(|stop| *stop) => return,
        }
        let flagged: Vec<Arc<Lane>> = inner
            .lanes
            .iter()
            .filter(|lane| lane.sold_out.load(Ordering::Acquire))
            .map(|lane| Arc::clone(&lane))
            .collect();
        for lane in flagged {
            let mut conn = inner.conn.clone();
            let available: GateResult<Option<i64>> = inner
                .bounded(
                    redis::cmd("HGET")
                        .arg(&lane.keys[COUNTERS])
                        .arg("avail")
                        .query_async(&mut conn),
                )
                .await;
            // Missing keys (lost data) also clear the flag: the next reservation reloads the drop and decides.
            if let Ok(None) = available {
                lane.sold_out.store(false, Ordering::Release);
            }
            if let Ok(Some(units)) = available {
                if units > 0 {
                    lane.sold_out.store(false, Ordering::Release);
                }
            }
        }
    }
}

#[async_trait]
impl Gate for RedisGate {
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
            let lane = Arc::new(Lane {
                drop: drop.id,
                seq,
                hold_ms: i64::from(drop.hold_seconds) * 1000,
                keys,
                sold_out: AtomicBool::new(available == Some(0)),
                journal_behind_since_ms: AtomicI64::new(0),
                requests,
                stop: watch::channel(false).0,
                tasks: Mutex::new(Vec::new()),
            });
            vacant.insert(Arc::clone(&lane));
            inner.seqs.insert(seq, drop.id);
            let receiver = Arc::new(tokio::sync::Mutex::new(receiver));
            let mut tasks = lane.tasks.lock();
            for _ in 0..inner.config.calls_in_flight.max(1) {
                tasks.push(tokio::spawn(run_lane(
                    Arc::clone(inner),
                    Arc::clone(&lane),
                    Arc::clone(&receiver),
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
        self.inner
            .transition(drop, hold, "begin", Some(member))
            .await
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

    async fn reap(&self, _now_ms: i64, out: &mut Reaped) -> GateResult<usize> {
        /// Reserve entries one script call visits, and calls per drop per pass: bounded work per pass.
        const ENTRIES_PER_CALL: i64 = 256;
        const CALLS_PER_PASS: usize = 16;
        let lanes: Vec<Arc<Lane>> = self
            .inner
            .lanes
            .iter()
            .map(|lane| Arc::clone(&lane))
            .collect();
        let mut total = 0;
        for lane in lanes {
            let mut stale = Vec::new();
            for call in 0..CALLS_PER_PASS {
                let mut invocation = self.inner.scripts.reap.prepare_invoke();
                for key in &lane.keys {
                    invocation.key(key);
                }
                invocation.arg(ENTRIES_PER_CALL);
                let mut conn = self.inner.conn.clone();
                let reply: Vec<Value> = self
                    .inner
                    .bounded(invocation.invoke_async(&mut conn))
                    .await?;
                let released = reply.first().and_then(int).unwrap_or(-1);
                if released < 0 {
                    // Lost data: the next reservation or transition reloads the drop.
                    break;
                }
                let visited = reply.get(1).and_then(int).unwrap_or(0);
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
                for record in reply.get(3..).unwrap_or_default().chunks(3) {
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
