//! Rebuilding a drop's Redis state from Postgres: loading a drop (`init`), reloading one whose keys Redis lost, and
//! `reconcile`'s check and repair.

use std::collections::BTreeMap;

use uuid::Uuid;

use super::codec::{
    drop_seq, member_hex, unavailable, write_record, DropKeys, COUNTERS, RECORD_BYTES, STATES,
};
use super::ids::HoldRef;
use super::lanes::Lane;
use super::{Inner, RedisGate};
use crate::clock::to_datetime;
use crate::core::{Counts, ReleaseReason, RestoreError, RestoredHold};
use crate::gate::{GateResult, GateUnavailable, Restore};
use crate::types::DropSpec;
use crate::writer;

impl RedisGate {
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

    pub(super) async fn counts_now(&self, keys: &DropKeys) -> GateResult<Counts> {
        self.inner
            .read_counts(keys)
            .await?
            .ok_or_else(|| GateUnavailable("drop state vanished right after a rebuild".into()))
    }
}

impl Inner {
    /// The counters of a drop in Redis, `None` when its keys are gone.
    pub(super) async fn read_counts(&self, keys: &DropKeys) -> GateResult<Option<Counts>> {
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
    pub(super) async fn purchases_not_paid(
        &self,
        drop: &DropSpec,
        keys: &DropKeys,
    ) -> GateResult<usize> {
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

    /// The drop's state as Postgres has it (paid units per member, live holds).
    pub(super) async fn restore_from_db(&self, drop: Uuid) -> GateResult<Restore> {
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
    pub(super) async fn init(
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
        let (entries, foreign) = stream_entries(&restore.held, seq);
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
        for ((ms, entry_seq), records) in entries {
            invocation
                .arg(format!("{ms}-{entry_seq}"))
                .arg(entry_value(records));
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
            self.release_foreign(drop.id, &foreign).await;
        }
        if loaded == 1 {
            tracing::info!(drop = %drop.id, paid = paid_total, held = held_total, "drop loaded into Redis from Postgres");
        }
        Ok(Ok(()))
    }

    /// Loads a drop whose keys Redis lost, from Postgres.
    pub(super) async fn reload(&self, lane: &Lane) -> GateResult<()> {
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

    /// Releases, as expired, live holds whose ids this gate did not make (`init`), in Postgres.
    async fn release_foreign(&self, drop: Uuid, foreign: &[RestoredHold]) {
        let now = chrono::Utc::now();
        let released = foreign
            .iter()
            .map(|hold| {
                let row = writer::HoldRow {
                    id: hold.id,
                    drop_id: drop,
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
            tracing::warn!(error = %err, %drop, "holds of another gate not released in Postgres");
        }
    }
}

/// Stream entries by id (ms, seq), each with its records by index.
type Entries = BTreeMap<(u64, u64), Vec<(u32, String)>>;

/// The stream entries that hold `held` under their own ids, by entry id (ms, seq): each hold's record at its index.
/// Holds whose ids this gate did not make (another drop seq, or no hold id of the Redis gate) come back apart.
fn stream_entries(held: &[RestoredHold], seq: u32) -> (Entries, Vec<RestoredHold>) {
    let mut entries = Entries::new();
    let mut foreign = Vec::new();
    for hold in held {
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
    (entries, foreign)
}

/// One stream entry's value: its records in index order, the gaps (holds since paid or released) as zero records.
fn entry_value(mut records: Vec<(u32, String)>) -> String {
    records.sort_by_key(|(index, _)| *index);
    let mut value = String::new();
    let mut next = 0;
    for (index, record) in records {
        while next < index {
            value.push_str(&"0".repeat(RECORD_BYTES));
            next += 1;
        }
        value.push_str(&record);
        next = index + 1;
    }
    value
}
