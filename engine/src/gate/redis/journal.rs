//! The journal: every instance reads each loaded drop's stream through one consumer group and writes what it
//! reads to Postgres (new holds, releases), acknowledging entries (XACK) only after their batch committed. An
//! entry delivered to an instance that died stays pending; after `journal_claim_idle` a live instance claims it
//! (XAUTOCLAIM) and writes it. Every write is idempotent (holds insert-if-missing, releases upsert), so an entry
//! written twice, or a release written before its hold, stores the same rows.
//!
//! An idle journal makes no call: it waits for a note (`notes.rs`) saying its stream moved, and claims only
//! `journal_claim_idle` after a note (the entry it announced may have gone to an instance that died since) or when a
//! sweep asks.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use redis::Value;

use super::codec::{array, parse_member, reason_of, text, STREAM};
use super::ids::HoldRef;
use super::lanes::{Lane, NEVER};
use super::Inner;
use crate::clock::to_datetime;
use crate::core::ReleaseReason;
use crate::types::HoldRow;

const GROUP: &str = "journal";

/// One stream entry as the journal needs it.
struct Entry {
    id: String,
    fields: Vec<Value>,
}

/// Rows decoded from a run of entries.
#[derive(Default)]
struct Rows {
    holds: Vec<HoldRow>,
    released: Vec<(HoldRow, ReleaseReason, DateTime<Utc>)>,
}

fn row(lane: &Lane, place: HoldRef, member: uuid::Uuid, quantity: u32) -> HoldRow {
    let created = i64::try_from(place.ms).unwrap_or(i64::MAX);
    HoldRow {
        id: place.id(),
        drop_id: lane.drop,
        member_id: member,
        quantity,
        created_at: to_datetime(created),
        expires_at: to_datetime(created.saturating_add(lane.hold_ms)),
    }
}

/// Decodes entries into rows. Entries of other kinds (paid: the purchase's own transaction wrote it) add nothing;
/// a malformed record is logged and skipped rather than blocking the journal forever.
fn decode(lane: &Lane, entries: &[Entry], rows: &mut Rows) {
    for entry in entries {
        let (Some(kind), Some(value)) = (
            entry.fields.first().and_then(text),
            entry.fields.get(1).and_then(text),
        ) else {
            continue;
        };
        match kind {
            "r" => {
                for (index, record) in value.as_bytes().chunks(36).enumerate() {
                    let record = std::str::from_utf8(record).unwrap_or("");
                    let member = record.get(..32).and_then(parse_member);
                    let quantity = record.get(32..).and_then(|q| q.parse::<u32>().ok());
                    let place = u32::try_from(index)
                        .ok()
                        .and_then(|index| HoldRef::from_entry(lane.seq, &entry.id, index));
                    match (member, quantity, place) {
                        (Some(member), Some(quantity), Some(place)) if quantity > 0 => {
                            rows.holds.push(row(lane, place, member, quantity));
                        }
                        (_, Some(0), _) => {}
                        _ => {
                            tracing::error!(entry = %entry.id, index, "malformed hold record in the journal")
                        }
                    }
                }
            }
            "x" => {
                let at = entry_ms(&entry.id)
                    .map(to_datetime)
                    .unwrap_or_else(Utc::now);
                for record in value.split(';').filter(|record| !record.is_empty()) {
                    let parts: Vec<&str> = record.split(',').collect();
                    let decoded = match parts[..] {
                        [place, member, quantity, reason] => HoldRef::from_ref(lane.seq, place)
                            .zip(parse_member(member))
                            .zip(quantity.parse::<u32>().ok())
                            .map(|((place, member), quantity)| {
                                (place, member, quantity, reason_of(reason))
                            }),
                        _ => None,
                    };
                    match decoded {
                        Some((place, member, quantity, reason)) => {
                            rows.released
                                .push((row(lane, place, member, quantity), reason, at));
                        }
                        None => {
                            tracing::error!(entry = %entry.id, record, "malformed release record in the journal")
                        }
                    }
                }
            }
            _ => {}
        }
    }
}

/// When a stream entry was appended: the milliseconds part of its id (`<ms>-<seq>`, Redis's clock).
fn entry_ms(id: &str) -> Option<i64> {
    id.split_once('-')?.0.parse().ok().filter(|&ms| ms > 0)
}

/// Entries from an XREADGROUP reply (`[[key, [[id, [field, value, ...]], ...]]]`) or an XAUTOCLAIM reply's
/// second element (`[[id, fields], ...]`).
fn entries_of(list: Value) -> Vec<Entry> {
    array(list)
        .unwrap_or_default()
        .into_iter()
        .filter_map(|entry| {
            let mut parts = array(entry)?.into_iter();
            let id = text(&parts.next()?)?.to_owned();
            // A claimed entry that was deleted meanwhile comes back with nil fields.
            let fields = array(parts.next()?).unwrap_or_default();
            Some(Entry { id, fields })
        })
        .collect()
}

impl Inner {
    /// Reads up to `journal_batch_max` entries: `start` "0" for this consumer's own pending entries, ">" for new
    /// ones. `Ok(None)` when the group is gone (Redis lost the drop's data).
    async fn read_group(&self, lane: &Lane, start: &str) -> super::GateResult<Option<Vec<Entry>>> {
        let mut conn = self.conn.clone();
        let reply: Result<Value, _> = self
            .bounded(
                redis::cmd("XREADGROUP")
                    .arg("GROUP")
                    .arg(GROUP)
                    .arg(&self.consumer)
                    .arg("COUNT")
                    .arg(self.config.journal_batch_max)
                    .arg("STREAMS")
                    .arg(&lane.keys[STREAM])
                    .arg(start)
                    .query_async(&mut conn),
            )
            .await;
        let reply = match reply {
            Ok(reply) => reply,
            Err(err) if err.0.contains("NOGROUP") => return Ok(None),
            Err(err) => return Err(err),
        };
        let Some(streams) = array(reply) else {
            return Ok(Some(Vec::new()));
        };
        let Some(stream) = streams.into_iter().next().and_then(array) else {
            return Ok(Some(Vec::new()));
        };
        Ok(Some(
            stream
                .into_iter()
                .nth(1)
                .map(entries_of)
                .unwrap_or_default(),
        ))
    }

    /// Takes over entries another consumer was given and has not acknowledged for `journal_claim_idle`. When none
    /// is idle that long but some are pending, looks again `journal_claim_idle` later: a claim runs only while
    /// entries are pending.
    async fn claim(&self, lane: &Lane) -> super::GateResult<Vec<Entry>> {
        let claimed = self.claim_idle(lane).await?;
        if claimed.is_empty() {
            let mut conn = self.conn.clone();
            let summary: Value = self
                .bounded(
                    redis::cmd("XPENDING")
                        .arg(&lane.keys[STREAM])
                        .arg(GROUP)
                        .query_async(&mut conn),
                )
                .await?;
            let pending = array(summary)
                .and_then(|parts| parts.first().and_then(super::codec::int))
                .unwrap_or(0);
            if pending > 0 {
                let idle_ms =
                    i64::try_from(self.config.journal_claim_idle.as_millis()).unwrap_or(NEVER);
                lane.claim_by(self.local_ms().saturating_add(idle_ms));
            }
        }
        Ok(claimed)
    }

    async fn claim_idle(&self, lane: &Lane) -> super::GateResult<Vec<Entry>> {
        let mut conn = self.conn.clone();
        let idle_ms = u64::try_from(self.config.journal_claim_idle.as_millis()).unwrap_or(u64::MAX);
        let reply: Value = self
            .bounded(
                redis::cmd("XAUTOCLAIM")
                    .arg(&lane.keys[STREAM])
                    .arg(GROUP)
                    .arg(&self.consumer)
                    .arg(idle_ms)
                    .arg("0-0")
                    .arg("COUNT")
                    .arg(self.config.journal_batch_max)
                    .query_async(&mut conn),
            )
            .await?;
        Ok(array(reply)
            .and_then(|parts| parts.into_iter().nth(1))
            .map(entries_of)
            .unwrap_or_default())
    }

    /// Writes entries to Postgres and acknowledges them once committed.
    async fn write_and_ack(&self, lane: &Lane, entries: &[Entry]) -> super::GateResult<()> {
        let mut rows = Rows::default();
        decode(lane, entries, &mut rows);
        if !rows.holds.is_empty() || !rows.released.is_empty() {
            self.writer()?
                .journal(rows.holds, rows.released)
                .await
                .map_err(|err| super::GateUnavailable(format!("journal not stored: {err}")))?;
        }
        let ids: Vec<&str> = entries.iter().map(|entry| entry.id.as_str()).collect();
        let mut conn = self.conn.clone();
        self.bounded(
            redis::cmd("XACK")
                .arg(&lane.keys[STREAM])
                .arg(GROUP)
                .arg(&ids)
                .query_async::<i64>(&mut conn),
        )
        .await?;
        Ok(())
    }

    /// Makes the drop's keys and its journal group exist again after Redis lost them. The group starts at the
    /// stream's beginning: whatever is there is written again, which stores nothing twice.
    async fn recreate_group(&self, lane: &Lane) -> super::GateResult<()> {
        self.reload(lane).await?;
        let mut conn = self.conn.clone();
        let created: Result<(), _> = self
            .bounded(
                redis::cmd("XGROUP")
                    .arg("CREATE")
                    .arg(&lane.keys[STREAM])
                    .arg(GROUP)
                    .arg("0")
                    .arg("MKSTREAM")
                    .query_async(&mut conn),
            )
            .await;
        match created {
            Err(err) if !err.0.contains("BUSYGROUP") => Err(err),
            _ => Ok(()),
        }
    }

    /// One pass: this consumer's own pending entries when a write of them failed (`own_pending`, cleared once there
    /// are none), else new ones, else, when `claim` is set, others' stale ones (`claim` stays set while a claim finds
    /// some, as more may be pending). Returns how many entries were written.
    async fn journal_pass(
        &self,
        lane: &Lane,
        own_pending: &mut bool,
        claim: &mut bool,
    ) -> super::GateResult<usize> {
        let mut entries = Vec::new();
        for start in ["0", ">"] {
            if start == "0" && !*own_pending {
                continue;
            }
            let Some(read) = self.read_group(lane, start).await? else {
                self.recreate_group(lane).await?;
                return Ok(0);
            };
            if start == "0" && read.is_empty() {
                *own_pending = false;
            }
            if !read.is_empty() {
                entries = read;
                break;
            }
        }
        if entries.is_empty() && *claim {
            entries = self.claim(lane).await?;
            *claim = !entries.is_empty();
        }
        // Entries come in stream order, so the first is the oldest not yet written; nothing read means caught up. A
        // failed write leaves the mark where it is (the same entries are read again), so the lag keeps growing.
        let behind_since = entries.first().and_then(|entry| entry_ms(&entry.id));
        lane.journal_behind_since_ms
            .store(behind_since.unwrap_or(0), Ordering::Relaxed);
        if entries.is_empty() {
            return Ok(0);
        }
        self.write_and_ack(lane, &entries).await?;
        Ok(entries.len())
    }
}

/// The journal task of one drop on this instance. On shutdown (or unload) it writes out what the stream already
/// has, so a stopping instance leaves nothing of its own pending. After a pass that did not fill a read it waits for
/// a note or its claim's time, never less than `journal_idle` (so a busy drop's notes cost at most one read and one
/// commit per `journal_idle`: a commit per read cost Postgres about twice the CPU of the holds it wrote).
pub(super) async fn run(inner: Arc<Inner>, lane: Arc<Lane>) {
    let mut stop = lane.stop.subscribe();
    let mut failures: u32 = 0;
    let mut own_pending = true;
    let mut claim = false;
    loop {
        let stopping = *stop.borrow();
        if !claim && lane.claim_at_ms.load(Ordering::Acquire) <= inner.local_ms() {
            lane.claim_at_ms.store(NEVER, Ordering::Release);
            claim = true;
        }
        let pause = match inner
            .journal_pass(&lane, &mut own_pending, &mut claim)
            .await
        {
            Ok(0) if stopping => return,
            // A full read: more is waiting.
            Ok(written) if written >= inner.config.journal_batch_max || stopping => {
                failures = 0;
                continue;
            }
            // Caught up, or nearly: the next read waits out `journal_idle` (or a note after it), so that a busy drop's
            // holds go to Postgres in a few large commits a second rather than one small commit per read.
            Ok(_) => {
                failures = 0;
                inner.config.journal_idle
            }
            Err(err) => {
                failures = failures.saturating_add(1);
                own_pending = true;
                if stopping && failures >= 3 {
                    tracing::warn!(error = %err, drop = %lane.drop, "journal stopped with entries unwritten; another instance will write them");
                    return;
                }
                tracing::warn!(error = %err, drop = %lane.drop, failures, "journal pass failed; retrying");
                (inner.config.journal_idle * 2u32.saturating_pow(failures.min(6)))
                    .min(std::time::Duration::from_secs(2))
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = stop.wait_for(|stop| *stop), if !stopping => continue,
        }
        // A claim that took some entries leaves `claim` set: others may not have been idle long enough yet. Claim
        // again now (finding none idle, it schedules the next claim for when they will be) rather than wait for a
        // note: a drop gone quiet sends none, and its entries would stay pending on the dead consumer.
        if failures > 0 || claim {
            continue;
        }
        let claim_at = lane.claim_at_ms.load(Ordering::Acquire);
        let until_claim = u64::try_from(claim_at.saturating_sub(inner.local_ms())).unwrap_or(0);
        tokio::select! {
            _ = lane.wake.notified() => {}
            _ = tokio::time::sleep(std::time::Duration::from_millis(until_claim)), if claim_at != NEVER => {}
            _ = stop.wait_for(|stop| *stop), if !stopping => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_decode_from_both_reply_shapes() {
        let bulk = |text: &str| Value::BulkString(text.as_bytes().to_vec());
        let entry = Value::Array(vec![
            bulk("17-0"),
            Value::Array(vec![bulk("p"), bulk("17-0:0")]),
        ]);
        let deleted = Value::Array(vec![bulk("18-0"), Value::Nil]);
        let entries = entries_of(Value::Array(vec![entry, deleted]));
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[0].id, "17-0");
        assert_eq!(entries[0].fields.len(), 2);
        assert!(entries[1].fields.is_empty());
    }

    #[test]
    fn an_entry_is_dated_by_its_id() {
        assert_eq!(entry_ms("1733490000123-7"), Some(1_733_490_000_123));
        assert_eq!(entry_ms("0-1"), None);
        assert_eq!(entry_ms("garbage"), None);
    }
}
